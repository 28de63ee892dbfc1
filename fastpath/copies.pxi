# 1:1 copies and device acks: the per-device part of storing a message, receipt
# or sync copy (server/queues.py ``_Txn.copies``) and of a device's ack
# (``Queues._ack``).  The twins of pigeon.core._pycodec's ``copies``,
# ``copies_room`` and ``ack_walk`` (documented there).  Included by _codec.pyx,
# after fanout.pxi (_be64, _put_be64).  One C loop per call: each queue state is
# read and written as its stored 24 bytes, the queue key is written into a new
# bytes object, and a Push is a compiled record from a freelist.

cdef bytes _NEW_QUEUE = b"\x00\x00\x00\x00\x00\x00\x00\x01" + bytes(16)

cdef enum:
    COPY_SYNC_FLAG = 2
    COPY_MESSAGE_KIND = 0
    COPY_GREF_KIND = 6
    COPY_GPAYLOAD_KIND = 7


@cython.final
@cython.freelist(512)
cdef class Push:
    """An entry committed to a device's queue; ``worker`` holds the device (None: offline).

    ``entry`` is the stored entry: FrameEncoder.write makes its frame."""

    cdef public object device
    cdef public object seq
    cdef public object entry
    cdef public object worker

    def __init__(self, device, seq, entry, worker):
        self.device = device
        self.seq = seq
        self.entry = entry
        self.worker = worker

    def __repr__(self):
        return f"Push({self.device!r}, {self.seq}, worker={self.worker})"


cdef inline object _copy_state(dict states, object dk, object load):
    cdef PyObject* raw = PyDict_GetItem(states, dk)
    cdef object st
    if raw == NULL:
        st = load(dk)
        if st is None:
            st = _NEW_QUEUE
        elif not PyBytes_CheckExact(st) or PyBytes_GET_SIZE(st) != 24:
            raise ValueError("a queue state is not 24 bytes")
        states[dk] = st
        return st
    st = <object>raw
    if not PyBytes_CheckExact(st) or PyBytes_GET_SIZE(st) != 24:
        raise ValueError("a queue state is not 24 bytes")
    return st


cpdef copies_room(list dks, object entries, object skip, dict states, object load,
                unsigned long long max_count, unsigned long long max_bytes,
                unsigned long long s_count, unsigned long long s_bytes, Py_ssize_t theirs):
    """pigeon.core._pycodec.copies_room, compiled."""
    cdef bint one = PyBytes_Check(entries)
    cdef Py_ssize_t i, n = len(dks)
    cdef unsigned long long count, nbytes, size
    cdef const unsigned char* rp
    cdef object dk
    if not one and len(entries) != n:
        raise ValueError("copies_room: dks and entries differ in length")
    for i in range(n):
        dk = dks[i]
        if dk == skip:
            continue
        size = len(entries if one else entries[i])
        rp = <const unsigned char*>PyBytes_AS_STRING(_copy_state(states, dk, load))
        count, nbytes = _be64(rp + 8), _be64(rp + 16)
        if count + 1 > max_count or nbytes + size > max_bytes:
            return i, False
        if i < theirs and (count + 1 > s_count or nbytes + size > s_bytes):
            return i, True
    return None


cpdef copies(list dks, list dstrs, object entries, object skip, dict states, object load,
           list items, list pushes, dict sessions, object missing, object worker_of):
    """pigeon.core._pycodec.copies, compiled."""
    cdef bint one = PyBytes_Check(entries)
    cdef Py_ssize_t i, n = len(dks), klen, done = 0
    cdef unsigned long long nxt, count, nbytes
    cdef const unsigned char* rp
    cdef unsigned char* kp
    cdef PyObject* wp
    cdef object dk, d, key, st, entry, wid
    cdef Push p
    if len(dstrs) != n or (not one and len(entries) != n):
        raise ValueError("copies: dks, dstrs and entries differ in length")
    for i in range(n):
        dk = dks[i]
        if dk == skip:
            continue
        if not PyBytes_CheckExact(dk):
            raise TypeError("copies: a device key is not bytes")
        entry = entries if one else entries[i]
        rp = <const unsigned char*>PyBytes_AS_STRING(_copy_state(states, dk, load))
        nxt, count, nbytes = _be64(rp), _be64(rp + 8), _be64(rp + 16)
        st = PyBytes_FromStringAndSize(NULL, 24)
        kp = <unsigned char*>PyBytes_AS_STRING(st)
        _put_be64(kp, nxt + 1)
        _put_be64(kp + 8, count + 1)
        _put_be64(kp + 16, nbytes + len(entry))
        states[dk] = st
        klen = PyBytes_GET_SIZE(dk)
        key = PyBytes_FromStringAndSize(NULL, klen + 9)
        kp = <unsigned char*>PyBytes_AS_STRING(key)
        memcpy(kp, PyBytes_AS_STRING(dk), klen)
        kp[klen] = 0
        _put_be64(kp + klen + 1, nxt)
        items.append((key, entry))
        d = dstrs[i]
        wp = PyDict_GetItem(sessions, d)
        if wp == NULL:
            wid = worker_of(d)
        else:
            wid = <object>wp
            if wid is missing:
                wid = worker_of(d)
        p = Push.__new__(Push)
        p.device = d
        p.seq = nxt
        p.entry = entry
        p.worker = wid
        pushes.append(p)
        done += 1
    return done


cpdef ack_walk(object cursor, bytes prefix, bytes end, Py_ssize_t limit, bint receipts):
    """pigeon.core._pycodec.ack_walk, compiled."""
    cdef list listed = []
    cdef Py_ssize_t deleted = 0, n = PyBytes_GET_SIZE(prefix), vlen
    cdef unsigned long long nbytes = 0
    cdef object item, delete, pair, key, value
    cdef const unsigned char* vp
    cdef int kind
    if not cursor.set_range(prefix):
        return 0, 0, listed, True
    item = cursor.item
    delete = cursor.delete
    while True:
        pair = item()
        key = <object>PyTuple_GET_ITEM(pair, 0)
        value = <object>PyTuple_GET_ITEM(pair, 1)
        if not PyBytes_CheckExact(key) or not PyBytes_CheckExact(value):
            raise TypeError("ack_walk: the cursor must return bytes")
        if (PyBytes_GET_SIZE(key) < n
                or memcmp(PyBytes_AS_STRING(key), PyBytes_AS_STRING(prefix), n) != 0
                or key > end):
            return deleted, nbytes, listed, True
        if deleted == limit:
            return deleted, nbytes, listed, False
        deleted += 1
        vlen = PyBytes_GET_SIZE(value)
        if vlen == 0:
            raise ValueError("ack_walk: an empty queue entry")
        vp = <const unsigned char*>PyBytes_AS_STRING(value)
        kind = vp[0]
        if kind == COPY_GREF_KIND or kind == COPY_GPAYLOAD_KIND:
            listed.append(value)
        else:
            if kind == COPY_MESSAGE_KIND and receipts:
                if vlen < 10:
                    raise ValueError("ack_walk: a message entry is too short")
                if not vp[9] & COPY_SYNC_FLAG:
                    listed.append(value)
            nbytes += vlen
        if not delete():
            return deleted, nbytes, listed, True
