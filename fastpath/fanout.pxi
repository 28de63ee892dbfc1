# Group fan-out: the per-member-device part of storing one group message
# (server/queues.py ``Queues._store_group``), the twin of pigeon.core._pycodec's
# ``fan_out`` and ``fan_missing`` (documented there).  Included by _codec.pyx.
# One C loop over the member devices: each queue state is read and written as
# its stored 24 bytes, the queue key is written into a new bytes object, and
# nothing else is made per device but the (key, reference) pair putmulti takes.

cdef inline unsigned long long _be64(const unsigned char* p) noexcept:
    cdef unsigned long long v = 0
    cdef int i
    for i in range(8):
        v = (v << 8) | p[i]
    return v


cdef inline void _put_be64(unsigned char* p, unsigned long long v) noexcept:
    cdef int i
    for i in range(7, -1, -1):
        p[i] = v & 0xFF
        v >>= 8


def fan_missing(list dks, dict states):
    """The keys of ``dks`` (sorted) whose queue state ``states`` lacks, in order."""
    cdef list out = []
    cdef object dk
    for dk in dks:
        if PyDict_GetItem(states, dk) == NULL:
            out.append(dk)
    return out


def fan_out(list dks, list dstrs, list uidx, bytes multi, Py_ssize_t sender, bytes me,
            dict states, tuple refs, unsigned long long size, unsigned long long max_count,
            unsigned long long max_bytes, dict sessions, object missing, bint wake):
    """pigeon.core._pycodec.fan_out, compiled."""
    cdef object ref = refs[0], fan_ref = refs[1], sync_ref = refs[2]
    cdef list items = [], failed = [], online = []
    cdef Py_ssize_t i, n = len(dks), klen, u, last_failed = -1
    cdef const unsigned char* mp = <const unsigned char*>PyBytes_AS_STRING(multi)
    cdef const unsigned char* rp
    cdef unsigned char* kp
    cdef unsigned long long nxt, count, nbytes
    cdef PyObject* raw
    cdef PyObject* wp
    cdef object dk, key, st, wid, entry
    if len(dstrs) != n or len(uidx) != n or PyBytes_GET_SIZE(multi) != n:
        raise ValueError("fan_out: dks, dstrs, uidx and multi differ in length")
    for i in range(n):
        dk = dks[i]
        if dk == me:
            continue
        u = uidx[i]
        raw = PyDict_GetItem(states, dk)
        if raw == NULL:
            nxt, count, nbytes = 1, 0, 0
        else:
            if PyBytes_GET_SIZE(<object>raw) != 24:
                raise ValueError("fan_out: a queue state is not 24 bytes")
            rp = <const unsigned char*>PyBytes_AS_STRING(<object>raw)
            nxt, count, nbytes = _be64(rp), _be64(rp + 8), _be64(rp + 16)
        if count + 1 > max_count or nbytes + size > max_bytes:
            if last_failed != u:
                failed.append(u)
                last_failed = u
            continue
        st = PyBytes_FromStringAndSize(NULL, 24)
        kp = <unsigned char*>PyBytes_AS_STRING(st)
        _put_be64(kp, nxt + 1)
        _put_be64(kp + 8, count + 1)
        _put_be64(kp + 16, nbytes + size)
        states[dk] = st
        klen = PyBytes_GET_SIZE(dk)
        key = PyBytes_FromStringAndSize(NULL, klen + 9)
        kp = <unsigned char*>PyBytes_AS_STRING(key)
        memcpy(kp, PyBytes_AS_STRING(dk), klen)
        kp[klen] = 0
        _put_be64(kp + klen + 1, nxt)
        entry = sync_ref if u == sender else (fan_ref if mp[i] else ref)
        items.append((key, entry))
        wp = PyDict_GetItem(sessions, dstrs[i])
        wid = missing if wp == NULL else <object>wp
        if wid is not None or wake:
            online.append((dstrs[i], nxt, wid))
    return items, failed, online
