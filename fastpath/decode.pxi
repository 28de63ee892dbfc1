# Node decoding and the envelope peek.  Included by _codec.pyx.


cdef inline int _need(Buf* b, Py_ssize_t n) except -1:
    if b.end - b.pos < n:
        raise MalformedNode(f"truncated node: expected {n} more bytes")
    return 0


cdef inline int _byte(Buf* b) except -1:
    if b.pos >= b.end:
        raise MalformedNode("truncated node: expected another byte")
    b.pos += 1
    return b.data[b.pos - 1]


cdef inline Py_ssize_t _uint(Buf* b, int width) except -1:
    cdef Py_ssize_t v = 0
    cdef int i
    _need(b, width)
    for i in range(width):
        v = (v << 8) | b.data[b.pos + i]
    b.pos += width
    return v


cdef inline Py_ssize_t _list_size(Buf* b, int t) except -1:
    if t == LIST_8:
        return _byte(b)
    return _uint(b, 2)


cdef int _unpack(Buf* b, char* out, bint digits_only) except -1:
    """Read a PACKED body (count byte + nibbles) into out; returns the count."""
    cdef int n = _byte(b)
    cdef Py_ssize_t nbytes = (n + 1) >> 1
    cdef const unsigned char* src
    cdef int i, nib
    _need(b, nbytes)
    src = b.data + b.pos
    for i in range(n):
        nib = (src[i >> 1] >> 4) if (i & 1) == 0 else (src[i >> 1] & 15)
        out[i] = HEX[nib]
    if (n & 1) and (src[nbytes - 1] & 15):
        raise MalformedNode("packed string with a non-zero pad nibble")
    if digits_only:
        for i in range(n):
            if out[i] > 57:  # past '9'
                raise MalformedNode(
                    f"address digits must be 0-9: {PyUnicode_DecodeASCII(out, n, NULL)!r}")
    b.pos += nbytes
    return n


cdef object _packed_str(Buf* b):
    """A PACKED body as a new compact ASCII str, written in place."""
    cdef int n = _byte(b)
    cdef Py_ssize_t nbytes = (n + 1) >> 1, i
    cdef const unsigned char* src
    cdef Py_UCS1* dst
    _need(b, nbytes)
    src = b.data + b.pos
    if (n & 1) and (src[nbytes - 1] & 15):
        raise MalformedNode("packed string with a non-zero pad nibble")
    s = PyUnicode_New(n, 127)
    dst = <Py_UCS1*>PyUnicode_DATA(s)
    for i in range(n >> 1):
        dst[2 * i] = HEX[src[i] >> 4]
        dst[2 * i + 1] = HEX[src[i] & 15]
    if n & 1:
        dst[n - 1] = HEX[src[nbytes - 1] >> 4]
    b.pos += nbytes
    return s


cdef object _string(Codec c, Buf* b, int t, str what):
    """A string item whose type byte t was read."""
    cdef object s
    cdef Py_ssize_t n
    cdef int i, dev
    cdef char tmp[264]
    if 0x01 <= t <= SINGLE_LAST:
        s = <object>PyTuple_GET_ITEM(c._single, t)
        if s is None:
            raise UnknownToken(
                f"token 0x{t:02x} is not in dictionary version {c.dictionary.version}")
        return s
    if t == PACKED:
        return _packed_str(b)
    if DOUBLE_FIRST <= t <= DOUBLE_LAST:
        i = _byte(b)
        s = <object>PyTuple_GET_ITEM(<tuple>PyTuple_GET_ITEM(c._double, t - DOUBLE_FIRST), i)
        if s is None:
            raise UnknownToken(
                f"token 0x{t:02x}{i:02x} is not in dictionary version {c.dictionary.version}")
        return s
    if t == BIN_8 or t == BIN_16 or t == BIN_32:
        n = _byte(b) if t == BIN_8 else _uint(b, 2 if t == BIN_16 else 4)
        if n > c.max_string:
            raise LimitExceeded(f"{what} of {n} bytes exceeds max_string={c.max_string}")
        _need(b, n)
        try:
            s = PyUnicode_DecodeUTF8(<const char*>b.data + b.pos, n, NULL)
        except UnicodeDecodeError:
            raise MalformedNode(f"{what} is not valid UTF-8") from None
        b.pos += n
        return s
    if t == ADDR_DEVICE:
        dev = _byte(b)
        n = _unpack(b, tmp, True)
        if not (8 <= n <= 15 and tmp[0] != 48):
            raise MalformedNode(
                f"device address is not an E.164 number: {PyUnicode_DecodeASCII(tmp, n, NULL)!r}")
        tmp[n] = 58  # ':'
        n += 1
        if dev >= 100:
            tmp[n] = 48 + dev // 100
            n += 1
        if dev >= 10:
            tmp[n] = 48 + (dev // 10) % 10
            n += 1
        tmp[n] = 48 + dev % 10
        return PyUnicode_DecodeASCII(tmp, n + 1, NULL)
    if t == ADDR_GROUP:
        tmp[0] = 103  # 'g'
        tmp[1] = 58   # ':'
        n = _unpack(b, tmp + 2, True)
        if not 1 <= n <= 20:
            raise MalformedNode(
                f"group id must be 1-20 digits: {PyUnicode_DecodeASCII(tmp + 2, n, NULL)!r}")
        return PyUnicode_DecodeASCII(tmp, n + 2, NULL)
    raise MalformedNode(f"{what}: expected a string, found type byte 0x{t:02x}")


cdef Node _node(Codec c, Buf* b, Py_ssize_t depth):
    cdef int t
    cdef Py_ssize_t n, nattrs, i, k
    cdef dict attrs
    cdef list children
    cdef Node node
    if depth > c.max_depth:
        raise LimitExceeded(f"nodes nested deeper than max_depth={c.max_depth}")
    t = _byte(b)
    if t != LIST_8 and t != LIST_16:
        raise MalformedNode(f"expected a node (list header), found type byte 0x{t:02x}")
    n = _list_size(b, t)
    if n == 0:
        raise MalformedNode("a node needs at least a tag")
    tag = _string(c, b, _byte(b), "tag")
    nattrs = (n - 1) >> 1
    if nattrs > c.max_attrs:
        raise LimitExceeded(f"{nattrs} attributes exceed max_attrs={c.max_attrs}")
    attrs = {}
    for i in range(nattrs):
        key = _string(c, b, _byte(b), "attribute name")
        if key in attrs:
            raise MalformedNode(f"duplicate attribute {key!r}")
        attrs[key] = _string(c, b, _byte(b), "attribute value")
    content = None
    if (n - 1) & 1:
        t = _byte(b)
        if t == LIST_8 or t == LIST_16:
            k = _list_size(b, t)
            if k > c.max_children:
                raise LimitExceeded(f"{k} child nodes exceed max_children={c.max_children}")
            children = []
            for i in range(k):
                children.append(_node(c, b, depth + 1))
            content = children
        elif t == BIN_8 or t == BIN_16 or t == BIN_32:
            k = _byte(b) if t == BIN_8 else _uint(b, 2 if t == BIN_16 else 4)
            _need(b, k)
            content = PyBytes_FromStringAndSize(<const char*>b.data + b.pos, k)
            b.pos += k
        else:
            raise MalformedNode(f"content must be a list or bytes, found type byte 0x{t:02x}")
    node = Node.__new__(Node)
    node.tag = tag
    node.attrs = attrs
    node.content = content
    return node


cdef Node _decode_top(Codec c, Buf* b):
    cdef Node node = _node(c, b, 1)
    if b.pos != b.end:
        raise MalformedNode(f"{b.end - b.pos} trailing bytes after the node")
    return node


cdef Envelope _peek(Codec c, Buf* b, object payload):
    cdef int t, which
    cdef Py_ssize_t n, nattrs, i, size, cstart = -1, cend = -1
    cdef object to = None, mid = None, mtype = None
    cdef Envelope env
    t = _byte(b)
    if t != LIST_8 and t != LIST_16:
        raise MalformedNode(f"expected a node (list header), found type byte 0x{t:02x}")
    n = _list_size(b, t)
    if n == 0:
        raise MalformedNode("a node needs at least a tag")
    tag = _string(c, b, _byte(b), "tag")
    nattrs = (n - 1) >> 1
    if nattrs > c.max_attrs:
        raise LimitExceeded(f"{nattrs} attributes exceed max_attrs={c.max_attrs}")
    for i in range(nattrs):
        # Envelope keys are recognised by their token byte; only a literal
        # key costs a string.
        t = _byte(b)
        if t == c._tok_to:
            which = 0
        elif t == c._tok_id:
            which = 1
        elif t == c._tok_type:
            which = 2
        else:
            key = _string(c, b, t, "attribute name")
            which = 0 if key == "to" else 1 if key == "id" else 2 if key == "type" else -1
        v = _string(c, b, _byte(b), "attribute value")
        if which == 0:
            if to is not None:
                raise MalformedNode("duplicate attribute 'to'")
            to = v
        elif which == 1:
            if mid is not None:
                raise MalformedNode("duplicate attribute 'id'")
            mid = v
        elif which == 2:
            if mtype is not None:
                raise MalformedNode("duplicate attribute 'type'")
            mtype = v
    if (n - 1) & 1:
        t = _byte(b)
        if t == BIN_8 or t == BIN_16 or t == BIN_32:
            size = _byte(b) if t == BIN_8 else _uint(b, 2 if t == BIN_16 else 4)
            _need(b, size)
            cstart = b.pos
            b.pos += size
            cend = b.pos
            if b.pos != b.end:
                raise MalformedNode(f"{b.end - b.pos} trailing bytes after the node")
        elif t != LIST_8 and t != LIST_16:
            raise MalformedNode(f"content must be a list or bytes, found type byte 0x{t:02x}")
    elif b.pos != b.end:
        raise MalformedNode(f"{b.end - b.pos} trailing bytes after the node")
    env = Envelope.__new__(Envelope)
    env.tag = tag
    env.to = to
    env.id = mid
    env.type = mtype
    env.payload = payload
    env.start = cstart
    env.end = cend
    return env
