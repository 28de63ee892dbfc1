# Node encoding into the Codec's growable buffer.  Included by _codec.pyx.


cdef inline int _reserve(Codec c, Py_ssize_t extra) except -1:
    cdef Py_ssize_t cap
    cdef unsigned char* nb
    if c._len + extra <= c._cap:
        return 0
    cap = c._cap * 2
    while cap < c._len + extra:
        cap *= 2
    nb = <unsigned char*>PyMem_Realloc(c._buf, cap)
    if nb == NULL:
        raise MemoryError()
    c._buf = nb
    c._cap = cap
    return 0


cdef inline int _put(Codec c, unsigned char v) except -1:
    if c._len >= c._cap:
        _reserve(c, 1)
    c._buf[c._len] = v
    c._len += 1
    return 0


cdef inline int _put_mem(Codec c, const void* p, Py_ssize_t n) except -1:
    _reserve(c, n)
    memcpy(c._buf + c._len, p, n)
    c._len += n
    return 0


cdef inline int _nibble(unsigned char ch):
    if 48 <= ch <= 57:
        return ch - 48
    if 97 <= ch <= 102:
        return ch - 87
    return -1


cdef int _pack(Codec c, const unsigned char* p, Py_ssize_t n) except -1:
    """Count byte + nibbles; the caller checked the alphabet and 1 <= n <= 255."""
    cdef Py_ssize_t i
    _reserve(c, 1 + (n + 1) // 2)
    c._buf[c._len] = <unsigned char>n
    c._len += 1
    i = 0
    while i + 1 < n:
        c._buf[c._len] = (_nibble(p[i]) << 4) | _nibble(p[i + 1])
        c._len += 1
        i += 2
    if n & 1:
        c._buf[c._len] = _nibble(p[n - 1]) << 4
        c._len += 1
    return 0


cdef int _bin_header(Codec c, Py_ssize_t n) except -1:
    _reserve(c, 5)
    if n < 0x100:
        c._buf[c._len] = BIN_8
        c._buf[c._len + 1] = <unsigned char>n
        c._len += 2
    elif n < 0x10000:
        c._buf[c._len] = BIN_16
        c._buf[c._len + 1] = <unsigned char>(n >> 8)
        c._buf[c._len + 2] = <unsigned char>n
        c._len += 3
    else:
        c._buf[c._len] = BIN_32
        c._buf[c._len + 1] = <unsigned char>(n >> 24)
        c._buf[c._len + 2] = <unsigned char>(n >> 16)
        c._buf[c._len + 3] = <unsigned char>(n >> 8)
        c._buf[c._len + 4] = <unsigned char>n
        c._len += 5
    return 0


cdef int _list_header(Codec c, Py_ssize_t n) except -1:
    _reserve(c, 3)
    if n < 0x100:
        c._buf[c._len] = LIST_8
        c._buf[c._len + 1] = <unsigned char>n
        c._len += 2
    else:
        c._buf[c._len] = LIST_16
        c._buf[c._len + 1] = <unsigned char>(n >> 8)
        c._buf[c._len + 2] = <unsigned char>n
        c._len += 3
    return 0


cdef int _enc_string(Codec c, object s, str what) except -1:
    cdef PyObject* code
    cdef long v
    cdef const unsigned char* p
    cdef Py_ssize_t n, i
    cdef bint packable
    if not isinstance(s, str):
        raise TypeError(f"{what} must be str, not {type(s).__name__}")
    code = PyDict_GetItem(c._codes, s)
    if code != NULL:
        v = <long><object>code
        if v < 0x100:
            return _put(c, <unsigned char>v)
        _reserve(c, 2)
        c._buf[c._len] = <unsigned char>(v >> 8)
        c._buf[c._len + 1] = <unsigned char>v
        c._len += 2
        return 0
    p = <const unsigned char*>PyUnicode_AsUTF8AndSize(s, &n)
    if 0 < n <= MAX_PACKED:
        packable = True
        for i in range(n):
            if _nibble(p[i]) < 0:
                packable = False
                break
        if packable:
            _put(c, PACKED)
            return _pack(c, p, n)
        if _enc_address(c, p, n):
            return 0
    if n > c.max_string:
        raise LimitExceeded(f"{what} of {n} bytes exceeds max_string={c.max_string}")
    _bin_header(c, n)
    return _put_mem(c, p, n)


cdef bint _enc_address(Codec c, const unsigned char* p, Py_ssize_t n) except -1:
    """If p[:n] is a device or group address, encode its compact form and return True.

    Must accept exactly what node.DEVICE_RE / GROUP_RE accept (device <= 255).
    """
    cdef Py_ssize_t i, colon = -1, dlen
    cdef int dev = 0
    if n >= 3 and p[0] == 103 and p[1] == 58:  # "g:"
        if n - 2 > 20:
            return False
        for i in range(2, n):
            if not 48 <= p[i] <= 57:
                return False
        _put(c, ADDR_GROUP)
        _pack(c, p + 2, n - 2)
        return True
    for i in range(n):
        if p[i] == 58:
            colon = i
            break
    if not 8 <= colon <= 15 or p[0] == 48:
        return False
    for i in range(colon):
        if not 48 <= p[i] <= 57:
            return False
    dlen = n - colon - 1
    if not 1 <= dlen <= 3 or (dlen > 1 and p[colon + 1] == 48):
        return False
    for i in range(colon + 1, n):
        if not 48 <= p[i] <= 57:
            return False
        dev = dev * 10 + (p[i] - 48)
    if dev > 255:
        return False
    _reserve(c, 2)
    c._buf[c._len] = ADDR_DEVICE
    c._buf[c._len + 1] = <unsigned char>dev
    c._len += 2
    _pack(c, p, colon)
    return True


cdef int _enc_node(Codec c, object node, Py_ssize_t depth) except -1:
    cdef Py_buffer view
    cdef Py_ssize_t nattrs, k
    if depth > c.max_depth:
        raise LimitExceeded(f"nodes nested deeper than max_depth={c.max_depth}")
    cdef Node fast
    if type(node) is Node:
        fast = <Node>node
        tag, attrs, content = fast.tag, fast.attrs, fast.content
    else:
        try:
            tag, attrs, content = node.tag, node.attrs, node.content
        except AttributeError:
            raise TypeError(f"expected a node, not {type(node).__name__}") from None
    if type(attrs) is not dict:
        attrs = dict(attrs)
    nattrs = len(<dict>attrs)
    if nattrs > c.max_attrs:
        raise LimitExceeded(f"{nattrs} attributes exceed max_attrs={c.max_attrs}")
    _list_header(c, 1 + 2 * nattrs + (content is not None))
    _enc_string(c, tag, "tag")
    for key, value in (<dict>attrs).items():
        _enc_string(c, key, "attribute name")
        _enc_string(c, value, "attribute value")
    if content is None:
        return 0
    if PyBytes_CheckExact(content):
        _bin_header(c, PyBytes_GET_SIZE(content))
        return _put_mem(c, PyBytes_AS_STRING(content), PyBytes_GET_SIZE(content))
    if isinstance(content, (bytes, bytearray, memoryview)):
        PyObject_GetBuffer(content, &view, PyBUF_SIMPLE)
        try:
            _bin_header(c, view.len)
            _put_mem(c, view.buf, view.len)
        finally:
            PyBuffer_Release(&view)
        return 0
    if isinstance(content, (list, tuple)):
        k = len(content)
        if k > c.max_children:
            raise LimitExceeded(f"{k} child nodes exceed max_children={c.max_children}")
        _list_header(c, k)
        for child in content:
            _enc_node(c, child, depth + 1)
        return 0
    raise TypeError(f"content must be bytes or a list of nodes, not {type(content).__name__}")


cdef int _enc_frame(Codec c, object node) except -1:
    """Encode node into c._buf as a whole frame (header back-filled)."""
    cdef Py_ssize_t n
    c._len = 3
    _enc_node(c, node, 1)
    n = c._len - 3
    if n > c.max_frame:
        raise FrameTooLarge(f"encoded node of {n} bytes exceeds the maximum of {c.max_frame}")
    c._buf[0] = <unsigned char>(n >> 16)
    c._buf[1] = <unsigned char>(n >> 8)
    c._buf[2] = <unsigned char>n
    return 0


cdef Py_ssize_t _append_frame(Codec c, bytearray out) except -1:
    """Append the whole frame in c._buf (header filled in) to ``out``; its payload length."""
    cdef Py_ssize_t start = PyByteArray_GET_SIZE(out)
    PyByteArray_Resize(out, start + c._len)
    memcpy(PyByteArray_AS_STRING(out) + start, c._buf, c._len)
    return c._len - 3
