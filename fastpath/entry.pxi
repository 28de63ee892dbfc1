# Queue entries: the server's stored form of a delivery, and the delivery
# frame spliced from it at push time.  Included by _codec.pyx; the layout is
# documented with the pure-Python twin (pigeon.core._pycodec, "queue entries").

cdef enum:
    ENTRY_MESSAGE_KIND = 0
    ENTRY_RECEIPT_KIND = 1
    ENTRY_DEVICES_KIND = 2       # a device-list notice: no id, no type, no body
    ENTRY_KEYS_KIND = 3          # a key-directory notice: no id, a type, no body
    ENTRY_GROUP_KIND = 4         # a group notice: made by server/groups.py, content as is
    ENTRY_GMESSAGE_KIND = 5      # a group message: from=group, participant=origin, a body
    ENTRY_GPAYLOAD_KIND = 7      # a group message with a device's payload: content as is
    ENTRY_GRECEIPT_KIND = 8      # group receipts for one message: content as is
    ENTRY_FIXED = 10             # kind, t, flags

# The constant strings of an entry's head, encoded once per Codec (Codec._ek):
# the same bytes _enc_string writes for them, without its dictionary look-up
cdef enum:
    EK_MESSAGE = 0
    EK_RECEIPT = 1
    EK_DEVICES = 2
    EK_KEYS = 3
    EK_FROM = 4
    EK_PARTICIPANT = 5
    EK_TO = 6
    EK_ID = 7
    EK_TYPE = 8
    EK_T = 9
    _ENTRY_NAME_COUNT = 10

cdef tuple _ENTRY_NAMES = ("message", "receipt", "devices", "keys", "from", "participant",
                           "to", "id", "type", "t")


cdef inline int _put_name(Codec c, int k) except -1:
    if c._ekl[k] < 0:
        return _enc_string(c, _ENTRY_NAMES[k], "attribute name")
    return _put_mem(c, c._ek[k], c._ekl[k])


cdef inline Py_ssize_t _digits(unsigned long long v, char* out):
    """Decimal digits of v into out (at least 21 bytes); returns how many."""
    cdef char tmp[21]
    cdef Py_ssize_t n = 0, i
    if v == 0:
        out[0] = 48
        return 1
    while v:
        tmp[n] = 48 + <char>(v % 10)
        v //= 10
        n += 1
    for i in range(n):
        out[i] = tmp[n - 1 - i]
    return n


cdef inline void _nibbles(unsigned char* dst, const unsigned char* p, Py_ssize_t n):
    cdef Py_ssize_t i = 0, j = 0
    while i + 1 < n:
        dst[j] = (_nibble(p[i]) << 4) | _nibble(p[i + 1])
        i += 2
        j += 1
    if n & 1:
        dst[j] = _nibble(p[n - 1]) << 4


cdef bytes _queue_entry(Codec c, int kind, unsigned long long t, int flags, str origin, str mid,
                        str typ, object body, object to):
    cdef Py_ssize_t olen, ilen, hlen, blen = 0, n, pos
    cdef const char* o = PyUnicode_AsUTF8AndSize(origin, &olen)
    cdef const char* i = PyUnicode_AsUTF8AndSize(mid, &ilen)
    cdef char digits[21]
    cdef Py_buffer view
    cdef bint have_view = False
    cdef bint notice = kind == ENTRY_DEVICES_KIND or kind == ENTRY_KEYS_KIND
    cdef bint gmessage = kind == ENTRY_GMESSAGE_KIND
    cdef bint message = kind == ENTRY_MESSAGE_KIND or gmessage
    cdef bytes out
    cdef unsigned char* p
    cdef int k, count
    if kind != ENTRY_MESSAGE_KIND and kind != ENTRY_RECEIPT_KIND and not notice and not gmessage:
        raise ValueError(f"unknown entry kind {kind}")
    if gmessage and to is None:
        raise ValueError("a group message names its group (to)")
    if not 0 < olen < 256 or not (0 if notice else 1) <= ilen < 256 or (notice and ilen):
        raise ValueError("origin and id must be 1-255 bytes (a notice has no id)")
    # the head, in the codec's buffer: tag, from, [to], [id, type], t (and seq, body later)
    count = 7 if notice else 11
    if kind == ENTRY_KEYS_KIND:
        count += 2
    if message:
        count += 1
    if to is not None:
        count += 2
    c._len = 0
    _list_header(c, count)
    _put_name(c, EK_MESSAGE if message else
              (EK_RECEIPT if kind == ENTRY_RECEIPT_KIND else
               (EK_DEVICES if kind == ENTRY_DEVICES_KIND else EK_KEYS)))
    _put_name(c, EK_FROM)
    if gmessage:
        _enc_string(c, <str?>to, "attribute value")
        _put_name(c, EK_PARTICIPANT)
        _enc_string(c, origin, "attribute value")
    else:
        _enc_string(c, origin, "attribute value")
        if to is not None:
            _put_name(c, EK_TO)
            _enc_string(c, <str?>to, "attribute value")
    if not notice:
        _put_name(c, EK_ID)
        _enc_string(c, mid, "attribute value")
        _put_name(c, EK_TYPE)
        _enc_string(c, typ, "attribute value")
    elif kind == ENTRY_KEYS_KIND:
        _put_name(c, EK_TYPE)
        _enc_string(c, typ, "attribute value")
    _put_name(c, EK_T)
    n = _digits(t, digits)
    _put(c, PACKED)
    _pack(c, <const unsigned char*>digits, n)
    hlen = c._len
    if message:
        if PyBytes_CheckExact(body):
            blen = PyBytes_GET_SIZE(body)
        else:
            PyObject_GetBuffer(body, &view, PyBUF_SIMPLE)
            have_view = True
            blen = view.len
    try:
        out = PyBytes_FromStringAndSize(NULL, ENTRY_FIXED + 1 + olen + 1 + ilen + 2 + hlen + blen)
        p = <unsigned char*>PyBytes_AS_STRING(out)
        p[0] = <unsigned char>kind
        for k in range(8):
            p[1 + k] = <unsigned char>(t >> (56 - 8 * k))
        p[9] = <unsigned char>flags
        pos = ENTRY_FIXED
        p[pos] = <unsigned char>olen
        memcpy(p + pos + 1, o, olen)
        pos += 1 + olen
        p[pos] = <unsigned char>ilen
        memcpy(p + pos + 1, i, ilen)
        pos += 1 + ilen
        p[pos] = <unsigned char>(hlen >> 8)
        p[pos + 1] = <unsigned char>hlen
        memcpy(p + pos + 2, c._buf, hlen)
        pos += 2 + hlen
        if blen:
            if have_view:
                memcpy(p + pos, view.buf, blen)
            else:
                memcpy(p + pos, PyBytes_AS_STRING(body), blen)
    finally:
        if have_view:
            PyBuffer_Release(&view)
    return out


cdef Py_ssize_t _write_entry_frame(Codec c, bytearray out, const unsigned char* e, Py_ssize_t elen,
                                   unsigned long long seq) except -1:
    cdef Py_ssize_t pos = ENTRY_FIXED, hlen, blen = 0, nd, n, start, bh = 0
    cdef char digits[21]
    cdef unsigned char* p
    cdef bint message, verbatim
    if elen < ENTRY_FIXED + 4:
        raise ValueError("not a queue entry")
    message = e[0] == ENTRY_MESSAGE_KIND or e[0] == ENTRY_GMESSAGE_KIND
    # a notice's content, or a group message's body and payload, encoded: written as it is
    verbatim = (e[0] == ENTRY_GROUP_KIND or e[0] == ENTRY_GPAYLOAD_KIND
                or e[0] == ENTRY_GRECEIPT_KIND)
    pos += 1 + e[pos]
    if pos >= elen:
        raise ValueError("not a queue entry")
    pos += 1 + e[pos]
    if pos + 2 > elen:
        raise ValueError("not a queue entry")
    hlen = (e[pos] << 8) | e[pos + 1]
    pos += 2
    if pos + hlen > elen:
        raise ValueError("not a queue entry")
    nd = _digits(seq, digits)
    if message:
        blen = elen - pos - hlen
        bh = 2 if blen < 0x100 else (3 if blen < 0x10000 else 5)
    elif verbatim:
        blen = elen - pos - hlen
    # payload: head, the seq key (one token), PACKED count nibbles, [bin header, body]
    n = hlen + c._seq_len + 2 + (nd + 1) // 2 + bh + blen
    if n > c.max_frame:
        raise FrameTooLarge(f"encoded node of {n} bytes exceeds the maximum of {c.max_frame}")
    start = PyByteArray_GET_SIZE(out)
    PyByteArray_Resize(out, start + 3 + n)
    p = <unsigned char*>PyByteArray_AS_STRING(out) + start
    p[0] = <unsigned char>(n >> 16)
    p[1] = <unsigned char>(n >> 8)
    p[2] = <unsigned char>n
    p += 3
    memcpy(p, e + pos, hlen)
    p += hlen
    memcpy(p, c._seq_key, c._seq_len)
    p += c._seq_len
    p[0] = PACKED
    p[1] = <unsigned char>nd
    p += 2
    _nibbles(p, <const unsigned char*>digits, nd)
    p += (nd + 1) // 2
    if message:
        if blen < 0x100:
            p[0] = BIN_8
            p[1] = <unsigned char>blen
        elif blen < 0x10000:
            p[0] = BIN_16
            p[1] = <unsigned char>(blen >> 8)
            p[2] = <unsigned char>blen
        else:
            p[0] = BIN_32
            p[1] = <unsigned char>(blen >> 24)
            p[2] = <unsigned char>(blen >> 16)
            p[3] = <unsigned char>(blen >> 8)
            p[4] = <unsigned char>blen
        memcpy(p + bh, e + pos + hlen, blen)
    elif blen:
        memcpy(p, e + pos + hlen, blen)
    return 3 + n
