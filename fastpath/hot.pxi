# The hot kinds a logged-in client sends (message, receipt, device ack), read
# straight from the received buffer.  Included by _codec.pyx; the rules are
# those of pigeon.core._pycodec.FrameReader.next_hot, its reference twin.


cdef enum:
    HOT_MESSAGE = 1
    HOT_RECEIPT = 2
    HOT_ACK = 3


@cython.final
@cython.freelist(64)
cdef class Hot:
    """A message, receipt or device ack read by ``FrameReader.next_hot``.

    kind: 1 message (to, id, type, body), 2 receipt (to, id, type),
    3 ack (seq).  Every field was checked as the event classes check it."""

    cdef public int kind
    cdef public object to
    cdef public object id
    cdef public object type
    cdef public object body
    cdef public object seq

    def __repr__(self):
        return (f"Hot(kind={self.kind}, to={self.to!r}, id={self.id!r}, type={self.type!r}, "
                f"body={self.body!r}, seq={self.seq!r})")


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


cdef object _hot(Codec c, Buf* b):
    """The Hot for a frame of a hot kind that passes every check, else None.

    Reads only one-byte tokens for the tag and the keys it knows; anything
    else (another tag, another attribute, a repeat, a long form, a failed
    check) is None and the caller decodes the frame in full, which gives
    the node (and later the event or the error) exactly as without this."""
    cdef int t, tag, key, kind
    cdef Py_ssize_t n, nattrs, i, size
    cdef object to = None, mid = None, typ = None, seqs = None, body = None
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
        else:
            return None
        if b.end - b.pos != size:
            return None
        body = PyBytes_FromStringAndSize(<const char*>b.data + b.pos, size)
        b.pos += size
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
    return h
