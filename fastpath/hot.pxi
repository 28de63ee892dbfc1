# The hot kinds a logged-in client sends (message, receipt, device ack), read
# straight from the received buffer.  Included by _codec.pyx; the rules are
# those of pigeon.core._pycodec.FrameReader.next_hot, its reference twin.


cdef enum:
    HOT_MESSAGE = 1
    HOT_RECEIPT = 2
    HOT_ACK = 3
    # A message names each device of two accounts at most (a user has up to
    # 5): longer payload lists are left to the full decode, which keeps the
    # duplicate check here a short quadratic loop.
    HOT_MAX_PAYLOADS = 32


@cython.final
@cython.freelist(64)
cdef class Hot:
    """A message, receipt or device ack read by ``FrameReader.next_hot``.

    kind: 1 message (to, id, type, body), 2 receipt (to, id, type),
    3 ack (seq).  A message with per-device payloads has body b"" and
    payloads ((device, bytes), ...), as ``Message.payloads``; else payloads
    is None.  Every field was checked as the event classes check it."""

    cdef public int kind
    cdef public object to
    cdef public object id
    cdef public object type
    cdef public object body
    cdef public object seq
    cdef public object payloads

    def __repr__(self):
        return (f"Hot(kind={self.kind}, to={self.to!r}, id={self.id!r}, type={self.type!r}, "
                f"body={self.body!r}, seq={self.seq!r}, payloads={self.payloads!r})")


cdef inline bint _printable_id(object s):
    """1-64 printable ASCII bytes (events.valid_id)."""
    cdef Py_ssize_t n, i
    cdef const unsigned char* p = <const unsigned char*>PyUnicode_AsUTF8AndSize(s, &n)
    if not 1 <= n <= 64:
        return False
    for i in range(n):
        if not 0x21 <= p[i] <= 0x7E:
            return False
    return True


cdef inline bint _user(object s):
    """An E.164 user address: 8-15 digits, no leading 0 (node.valid_phone)."""
    cdef Py_ssize_t n, i
    cdef const unsigned char* p = <const unsigned char*>PyUnicode_AsUTF8AndSize(s, &n)
    if not 8 <= n <= 15 or p[0] == 48:
        return False
    for i in range(n):
        if not 48 <= p[i] <= 57:
            return False
    return True


cdef object _uint64(object s):
    """The value of a decimal u64 without leading zeros, or None."""
    cdef Py_ssize_t n, i
    cdef const unsigned char* p = <const unsigned char*>PyUnicode_AsUTF8AndSize(s, &n)
    cdef unsigned long long v = 0, d
    if not 1 <= n <= 20 or (n > 1 and p[0] == 48):
        return None
    for i in range(n):
        if not 48 <= p[i] <= 57:
            return None
        d = p[i] - 48
        if v > (0xFFFFFFFFFFFFFFFF - d) // 10:
            return None
        v = v * 10 + d
    return v


cdef object _payloads(Codec c, Buf* b):
    """A message's list of ``<payload device=D>{bytes}</payload>`` children,
    whose LIST_8 type byte was read, as ((device, bytes), ...); None for
    anything else, which events._payloads then judges on the full decode.

    Each child must be in its short form (a LIST_8 of 4: the ``payload``
    token, the ``device`` token, a compact device address, bytes); a
    compact device address is a valid one by construction (_string checks
    the digits, and its device number is one byte).  No Node is made: per
    payload only the pair, its device string and its bytes."""
    cdef Py_ssize_t k, i, j, size
    cdef int t
    cdef tuple out
    cdef object d, body, pair
    if c._tok_payload < 0 or c._tok_device < 0 or c.max_depth < 2:
        return None
    k = _byte(b)
    if k == 0 or k > HOT_MAX_PAYLOADS or k > c.max_children:
        return None  # an empty list is an error, a long one the full decode's
    out = PyTuple_New(k)
    for i in range(k):
        if _byte(b) != LIST_8 or _byte(b) != 4 or _byte(b) != c._tok_payload:
            return None
        if _byte(b) != c._tok_device or _byte(b) != ADDR_DEVICE:
            return None
        d = _string(c, b, ADDR_DEVICE, "attribute value")
        for j in range(i):
            if <object>PyTuple_GET_ITEM(<object>PyTuple_GET_ITEM(out, j), 0) == d:
                return None  # two payloads for one device
        t = _byte(b)
        if t == BIN_8:
            size = _byte(b)
        elif t == BIN_16:
            size = _uint(b, 2)
        elif t == BIN_32:
            size = _uint(b, 4)
        else:
            return None
        _need(b, size)
        body = PyBytes_FromStringAndSize(<const char*>b.data + b.pos, size)
        b.pos += size
        pair = (d, body)
        Py_INCREF(pair)  # PyTuple_SET_ITEM steals a reference
        PyTuple_SET_ITEM(out, i, pair)
    return out


cdef object _hot(Codec c, Buf* b):
    """The Hot for a frame of a hot kind that passes every check, else None.

    Reads only one-byte tokens for the tag and the keys it knows; anything
    else (another tag, another attribute, a repeat, a long form, a failed
    check) is None and the caller decodes the frame in full, which gives
    the node (and later the event or the error) exactly as without this."""
    cdef int t, tag, key, kind
    cdef Py_ssize_t n, nattrs, i, size
    cdef object to = None, mid = None, typ = None, seqs = None, body = None, payloads = None
    cdef Hot h
    t = _byte(b)
    if t != LIST_8:
        return None
    n = _byte(b)
    tag = _byte(b)
    if tag == c._tok_message:
        kind = HOT_MESSAGE
    elif tag == c._tok_receipt:
        kind = HOT_RECEIPT
    elif tag == c._tok_ack:
        kind = HOT_ACK
    else:
        return None
    nattrs = (n - 1) >> 1
    if nattrs > c.max_attrs:
        return None
    for i in range(nattrs):
        key = _byte(b)
        if key == c._tok_to and kind != HOT_ACK and to is None:
            to = _string(c, b, _byte(b), "attribute value")
        elif key == c._tok_id and kind != HOT_ACK and mid is None:
            mid = _string(c, b, _byte(b), "attribute value")
        elif key == c._tok_type and kind != HOT_ACK and typ is None:
            typ = _string(c, b, _byte(b), "attribute value")
        elif key == c._tok_seq and kind == HOT_ACK and seqs is None:
            seqs = _string(c, b, _byte(b), "attribute value")
        else:
            return None
    if (n - 1) & 1:
        if kind != HOT_MESSAGE:
            return None
        t = _byte(b)
        if t == BIN_8:
            size = _byte(b)
        elif t == BIN_16:
            size = _uint(b, 2)
        elif t == BIN_32:
            size = _uint(b, 4)
        elif t == LIST_8:
            payloads = _payloads(c, b)
            if payloads is None:
                return None
            size = -1
        else:
            return None
        if size >= 0:
            if b.end - b.pos != size:
                return None
            body = PyBytes_FromStringAndSize(<const char*>b.data + b.pos, size)
            b.pos += size
        else:
            body = b""
    elif kind == HOT_MESSAGE:
        return None
    if b.pos != b.end:
        return None
    h = Hot.__new__(Hot)
    h.kind = kind
    if kind == HOT_ACK:
        if seqs is None:
            return None
        h.seq = _uint64(seqs)
        if h.seq is None:
            return None
        return h
    if to is None or mid is None or typ is None or not _user(to) or not _printable_id(mid):
        return None
    if kind == HOT_MESSAGE:
        if not _printable_id(typ):
            return None
    elif typ != "read" and typ != "played":
        return None
    h.to = to
    h.id = mid
    h.type = typ
    h.body = body
    h.payloads = payloads
    return h
