# The common 1:1 message of a group commit (server/queues.py ``Queues.commit``):
# the twin of pigeon.core._pycodec's ``store_plain`` (documented there).
# Included by _codec.pyx after copies.pxi (copies_room, copies, _put_be64).
# One C loop over the commit's sends, in order: a plain 1:1 message whose every
# check passes from the caches is stored here (dedup look-ups, room, copies, the
# fan record, the dedup record); any other send goes to ``fallback``
# (``Queues._store_one``) before anything is written for it.

cdef int _PLAIN_FAN = 1
cdef int _PLAIN_SYNC = 2

# ``entry_fn`` is in practice a Codec's own ``queue_entry`` (Queues._entry): then the
# entry is made by a C call, not a Python call of the bound method (the last one
# seen is remembered: Queues passes the same bound method every time)
cdef object _entry_fn_seen = None
cdef Codec _entry_codec_seen = None


cdef Codec _entry_codec(object entry_fn):
    """The Codec whose ``queue_entry`` ``entry_fn`` is, or None (a stand-in: called)."""
    global _entry_fn_seen, _entry_codec_seen
    cdef object owner
    if entry_fn is _entry_fn_seen:
        return _entry_codec_seen
    owner = getattr(entry_fn, "__self__", None)
    if type(owner) is Codec and getattr(entry_fn, "__func__", None) is Codec.queue_entry:
        _entry_codec_seen = <Codec>owner
    else:
        _entry_codec_seen = None
    _entry_fn_seen = entry_fn
    return _entry_codec_seen


cdef extern from "Python.h":
    long long PyLong_AsLongLong(object) except? -1


cdef inline long long _seq_of(object upto):
    """An ack's sequence as a C integer, or -1 (not an int in 0..2**63-1: the caller
    takes the Python route, which raises what it always did)."""
    if type(upto) is not int:
        return -1
    try:
        return PyLong_AsLongLong(upto)
    except OverflowError:
        return -1


cdef inline object _make_entry(Codec codec, object entry_fn, int kind, unsigned long long t,
                               int flags, str origin, str mid, str typ, object body, object to):
    if codec is None:
        return entry_fn(kind, t, flags, origin, mid, typ, body, to)
    _claim(codec)
    try:
        return _queue_entry(codec, kind, t, flags, origin, mid, typ, body, to)
    finally:
        codec._busy = False


cdef object _plain_one(object s, object get, object put, object cur, object prev, object fan_db,
                     dict devkeys, dict blockers, dict qstate, dict states, object load,
                     list items, list pushes, dict sessions, object missing, object worker_of,
                     object entry_fn, unsigned long long now, object t,
                     unsigned long long max_count, unsigned long long max_bytes,
                     unsigned long long s_count, unsigned long long s_bytes, object chat):
    # True: done here (stored, or refused by ``chat``: the new-chats limit); else what _store_one is to be given as the send's dedup
    # record (``missing``: not looked up yet)
    cdef PyObject* raw
    cdef object to, me, sender, typ, dkey, got, tkeys, skeys, rk, rs, mk, ms, mine
    cdef object entry, sync_entry = None, skip, digest, stamp, mid
    cdef Py_ssize_t nsync, dlen
    cdef unsigned char* p
    if s.cls != "message":
        return missing
    entry = s.entry
    to = s.to
    me = s.device
    if (not PyBytes_CheckExact(entry) or PyBytes_GET_SIZE(entry) < 10
            or type(to) is not str or not to or to[0] == "g" or ":" in to
            or type(me) is not str):
        return missing
    sender = me.partition(":")[0]
    typ = s.type
    if sender == to or typ == "retry":
        return missing
    dkey = s.dkey
    digest = s.digest
    if not PyBytes_CheckExact(digest):
        return missing
    got = get(dkey, None, cur)  # (positional: no keyword dict per call)
    if not got:
        got = get(dkey, None, prev)
    if got is not None:  # a retry or a reused id
        return got
    raw = PyDict_GetItem(devkeys, to)
    if raw == NULL:
        return got
    tkeys = <object>raw
    if tkeys is None:
        return got
    rk, rs = tkeys
    if not rs:
        return got
    raw = PyDict_GetItem(blockers, to)
    if raw == NULL or <object>raw is not False:
        return got
    raw = PyDict_GetItem(blockers, sender)
    if raw == NULL or <object>raw is not False:
        return got
    raw = PyDict_GetItem(devkeys, sender)
    if raw == NULL:
        return got
    skeys = <object>raw
    mk = ms = None
    nsync = 0
    if skeys is not None:
        mk, ms = skeys
        nsync = len(ms) - (me in ms)
    if qstate:  # (states as lists: _store_one folds them)
        return got
    mid = s.id
    if nsync:
        sync_entry = _make_entry(_entry_codec(entry_fn), entry_fn, 0, t, _PLAIN_SYNC, me, mid, typ,
                                 s.body, to)
        skip = me.encode()  # (the sending device gets no sync copy)
    if copies_room(rk, entry, None, states, load, max_count, max_bytes, s_count, s_bytes,
                   len(rk)) is not None:
        return got
    if nsync and copies_room(mk, sync_entry, skip, states, load, max_count, max_bytes,
                             0, 0, 0) is not None:
        return got
    if chat is not None and not chat(s, sender, to):  # the new-chats limit (s.error set)
        return True
    # stored from here on
    if len(rs) > 1:
        dlen = PyBytes_GET_SIZE(entry)
        got = PyBytes_FromStringAndSize(PyBytes_AS_STRING(entry), dlen)
        p = <unsigned char*>PyBytes_AS_STRING(got)
        p[9] |= _PLAIN_FAN
        entry = got
        put((me + "\x00" + mid + "\x00" + to).encode(), b"", db=fan_db)
    copies(rk, rs, entry, None, states, load, items, pushes, sessions, missing, worker_of)
    if nsync:
        copies(mk, ms, sync_entry, skip, states, load, items, pushes, sessions, missing,
               worker_of)
    dlen = PyBytes_GET_SIZE(digest)
    stamp = PyBytes_FromStringAndSize(NULL, 8 + dlen)
    p = <unsigned char*>PyBytes_AS_STRING(stamp)
    _put_be64(p, now)
    memcpy(p + 8, PyBytes_AS_STRING(digest), dlen)
    put(dkey, stamp, db=cur)
    s.t = t
    return True


def store_plain(list sends, object fallback, object w, object t, object cur, object prev,
                object get, object put, object fan_db, dict devkeys, dict blockers,
                dict qstate, dict states, object load, list items, list pushes,
                dict sessions, object missing, object worker_of, object entry_fn,
                unsigned long long max_count, unsigned long long max_bytes,
                unsigned long long s_count, unsigned long long s_bytes, object chat=None):
    """pigeon.core._pycodec.store_plain, compiled."""
    cdef Py_ssize_t done = 0
    cdef unsigned long long now = t
    cdef object got
    for s in sends:
        got = _plain_one(s, get, put, cur, prev, fan_db, devkeys, blockers, qstate, states, load,
                         items, pushes, sessions, missing, worker_of, entry_fn, now, t,
                         max_count, max_bytes, s_count, s_bytes, chat)
        if got is True:
            done += 1
        else:
            fallback(w, s, t, cur, prev, got)
    return done


cpdef delivered(list values, object w, str user, object t, object fallback, object delete,
              object fan_db, dict devkeys, object devkeys_of, dict states, object load,
              list items, list pushes, dict sessions, object missing, object worker_of,
              object entry_fn):
    """pigeon.core._pycodec.delivered, compiled."""
    cdef Py_ssize_t vlen, olen, mlen, done = 0
    cdef const unsigned char* vp
    cdef PyObject* raw
    cdef object value, origin, mid, keys
    cdef Codec codec = _entry_codec(entry_fn)
    for value in values:
        if not PyBytes_CheckExact(value):
            fallback(w, value, user, t)
            continue
        vlen = PyBytes_GET_SIZE(value)
        vp = <const unsigned char*>PyBytes_AS_STRING(value)
        if vlen < 12 or 12 + <Py_ssize_t>vp[10] > vlen:
            fallback(w, value, user, t)
            continue
        olen = vp[10]
        mlen = vp[11 + olen]
        if 12 + olen + mlen > vlen:
            fallback(w, value, user, t)
            continue
        origin = PyUnicode_DecodeUTF8(<const char*>vp + 11, olen, NULL)
        mid = PyUnicode_DecodeUTF8(<const char*>vp + 12 + olen, mlen, NULL)
        if vp[9] & _PLAIN_FAN and not delete((origin + "\x00" + mid + "\x00" + user).encode(),
                                            db=fan_db):
            continue  # another device of this user acked first
        origin = origin.partition(":")[0]
        raw = PyDict_GetItem(devkeys, origin)
        keys = devkeys_of(origin) if raw == NULL else <object>raw
        if not keys or not keys[0]:
            continue  # the sender's account is gone
        copies(keys[0], keys[1],
               _make_entry(codec, entry_fn, 1, t, 0, user, mid, "delivered", None, None), None,
               states, load, items, pushes, sessions, missing, worker_of)
        done += 1
    return done


def acks(dict acks, object w, object t, Py_ssize_t limit, bint receipts, object rest,
         object cursor, dict qstate, dict states, object load, object fold, object fallback,
         object delete, object fan_db, dict devkeys, object devkeys_of, list pushes,
         dict sessions, object missing, object worker_of, object entry_fn):
    """pigeon.core._pycodec.acks, compiled."""
    cdef list unfinished = []
    cdef list items, listed
    cdef object device, upto, user, dk, prefix, end, st, walked
    cdef PyObject* raw
    cdef Py_ssize_t deleted, i, n, klen
    cdef long long seq
    cdef unsigned long long nxt, ucount, usize, nbytes
    cdef long long count, size
    cdef const unsigned char* rp
    cdef unsigned char* wp
    cdef bint done, odd
    cdef int kind
    for device, upto in acks.items():
        user = device.partition(":")[0]
        items = w.items
        if items:  # (an ack deletes what this commit queued before it, as ever)
            if len(items) == 1:
                cursor.put(*items[0])
            else:
                cursor.putmulti(items)
            w.items = []
        dk = device.encode()
        seq = _seq_of(upto)
        if seq >= 0 and PyBytes_CheckExact(dk):
            # (dk NUL and dk NUL seq, made here; else as they always were, with their errors)
            klen = PyBytes_GET_SIZE(dk)
            prefix = PyBytes_FromStringAndSize(PyBytes_AS_STRING(dk), klen + 1)
            wp = <unsigned char*>PyBytes_AS_STRING(prefix)
            wp[klen] = 0
            end = PyBytes_FromStringAndSize(NULL, klen + 9)
            wp = <unsigned char*>PyBytes_AS_STRING(end)
            memcpy(wp, PyBytes_AS_STRING(prefix), klen + 1)
            _put_be64(wp + klen + 1, <unsigned long long>seq)
        else:
            prefix = dk + b"\x00"
            end = prefix + upto.to_bytes(8, "big")
        walked = ack_walk(cursor, prefix, end, limit, receipts)
        deleted = walked[0]
        done = walked[3]
        if not done:
            unfinished.append((device, upto))
        if not deleted:
            continue
        listed = walked[2]
        odd = False
        for i in range(len(listed)):
            kind = (<const unsigned char*>PyBytes_AS_STRING(listed[i]))[0]
            if kind == COPY_GREF_KIND or kind == COPY_GPAYLOAD_KIND:
                odd = True
                break
        if not odd:
            if qstate:
                fold()
            raw = PyDict_GetItem(states, dk)
            st = load(dk) if raw == NULL else <object>raw
            if st is None:
                nxt, ucount, usize = 1, 0, 0
            elif PyBytes_CheckExact(st) and PyBytes_GET_SIZE(st) == 24:
                rp = <const unsigned char*>PyBytes_AS_STRING(st)
                nxt, ucount, usize = _be64(rp), _be64(rp + 8), _be64(rp + 16)
            else:
                odd = True
        if not odd:
            nbytes = walked[1]
            if ucount >> 62 or usize >> 62 or nbytes >> 62:
                odd = True
            else:
                count = <long long>ucount - deleted
                size = <long long>usize - <long long>nbytes
                if count > 0 and size < 0:
                    odd = True  # (rest raises as _ack would)
        if odd:
            rest(w, dk, user, deleted, walked[1], listed, t)
            continue
        st = PyBytes_FromStringAndSize(NULL, 24)
        wp = <unsigned char*>PyBytes_AS_STRING(st)
        _put_be64(wp, nxt)
        _put_be64(wp + 8, count if count > 0 else 0)
        _put_be64(wp + 16, size if count > 0 else 0)
        states[dk] = st
        if listed:
            delivered(listed, w, user, t, fallback, delete, fan_db, devkeys, devkeys_of,
                      states, load, w.items, pushes, sessions, missing, worker_of, entry_fn)
    return unfinished
