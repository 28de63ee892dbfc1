# Framing: 3-byte big-endian length + payload.  Included by _codec.pyx.


@cython.final
cdef class FrameReader:
    """Split a byte stream into frame payloads (3-byte big-endian length + payload).

    ``next_frame`` returns a memoryview: of the chunk the payload arrived in
    when it lies inside one (no copy), of a fresh copy when it straddles
    chunks.  ``next_node`` and ``next_envelope`` decode or peek in place.
    """

    cdef public Py_ssize_t max_frame  # raised once a connection has logged in
    # What is buffered: the chunk being read (None: nothing) and the later
    # ones, in a deque made when a second chunk arrives and dropped once
    # everything is read: an idle connection holds none (an empty deque is
    # over 600 bytes), a busy one keeps its deque while bytes are pending.
    cdef bytes _first
    cdef object _rest            # deque of bytes, or None
    cdef Py_ssize_t _offset      # consumed bytes of _first
    cdef Py_ssize_t _size        # unconsumed bytes in all chunks

    def __init__(self, Py_ssize_t max_frame=DEFAULT_LIMITS.max_frame):
        self.max_frame = max_frame
        self._first = None
        self._rest = None
        self._offset = 0
        self._size = 0

    @property
    def buffered(self):
        """Bytes received but not yet returned as frames."""
        return self._size

    def feed(self, data):
        if not data:
            return
        if not PyBytes_CheckExact(data):
            data = bytes(data)  # the caller may reuse its buffer; we keep views
        if self._first is None:
            self._first = data
        else:
            if self._rest is None:
                self._rest = deque()
            self._rest.append(data)
        self._size += PyBytes_GET_SIZE(data)

    cdef inline void _advance(self, Py_ssize_t n):
        self._offset += n
        self._size -= n
        if self._offset == PyBytes_GET_SIZE(self._first):
            self._offset = 0
            if self._rest:
                self._first = self._rest.popleft()
            else:
                self._first = None
                self._rest = None

    cdef bytes _gather(self, Py_ssize_t n):
        """Consume the next n bytes from several chunks into one bytes object."""
        cdef bytes out = PyBytes_FromStringAndSize(NULL, n)
        cdef char* dst = PyBytes_AS_STRING(out)
        cdef Py_ssize_t filled = 0, part
        cdef bytes chunk
        while filled < n:
            chunk = self._first
            part = PyBytes_GET_SIZE(chunk) - self._offset
            if part > n - filled:
                part = n - filled
            memcpy(dst + filled, PyBytes_AS_STRING(chunk) + self._offset, part)
            filled += part
            self._advance(part)
        return out

    cdef bytes _next(self, Py_ssize_t* start, Py_ssize_t* end):
        """Consume the next complete payload: the bytes it lies in, and where.

        Returns None (leaving start/end alone) if more data is needed.
        """
        cdef bytes first, buf, chunk
        cdef const unsigned char* p
        cdef unsigned char hdr[3]
        cdef Py_ssize_t avail, n, i, off
        if self._size < 3:
            return None
        first = self._first
        avail = PyBytes_GET_SIZE(first) - self._offset
        p = <const unsigned char*>PyBytes_AS_STRING(first) + self._offset
        if avail >= 3:
            n = (p[0] << 16) | (p[1] << 8) | p[2]
        else:
            # header straddles chunks: read it without consuming (the rest
            # of the first chunk, then later ones; _size >= 3 says they exist)
            i = 0
            while i < avail:
                hdr[i] = p[i]
                i += 1
            for chunk in self._rest:
                p = <const unsigned char*>PyBytes_AS_STRING(chunk)
                off = 0
                while off < PyBytes_GET_SIZE(chunk) and i < 3:
                    hdr[i] = p[off]
                    i += 1
                    off += 1
                if i == 3:
                    break
            n = (hdr[0] << 16) | (hdr[1] << 8) | hdr[2]
        if n == 0:
            raise EmptyFrame("frame of length 0")
        if n > self.max_frame:
            raise FrameTooLarge(f"frame of {n} bytes exceeds the maximum of {self.max_frame}")
        if self._size < 3 + n:
            return None
        if avail >= 3 + n:
            start[0] = self._offset + 3
            end[0] = start[0] + n
            self._advance(3 + n)
            return first
        if avail >= 3:
            self._advance(3)
        else:
            self._gather(3)
        buf = self._gather(n)
        start[0] = 0
        end[0] = n
        return buf

    def next_frame(self):
        """The next complete payload, or None if more data is needed."""
        cdef Py_ssize_t start = 0, end = 0
        buf = self._next(&start, &end)
        if buf is None:
            return None
        return _memoryview(buf)[start:end]

    def next_node(self, Codec codec):
        """Decode the next complete frame with ``codec``; None if more data is needed."""
        cdef Py_ssize_t start = 0, end = 0
        cdef Buf b
        buf = self._next(&start, &end)
        if buf is None:
            return None
        b.data = <const unsigned char*>PyBytes_AS_STRING(buf)
        b.pos = start
        b.end = end
        return _decode_top(codec, &b)

    def next_envelope(self, Codec codec):
        """Peek the next complete frame with ``codec``; None if more data is needed."""
        cdef Py_ssize_t start = 0, end = 0
        cdef Buf b
        buf = self._next(&start, &end)
        if buf is None:
            return None
        b.data = <const unsigned char*>PyBytes_AS_STRING(buf)
        b.pos = start
        b.end = end
        return _peek(codec, &b, buf)

    def next_hot(self, Codec codec):
        """The next frame as a ``Hot`` (a message, receipt or device ack that
        passes every check of its event class) or, for anything else, as the
        decoded Node; None if more data is needed.  Raises what next_node raises."""
        cdef Py_ssize_t start = 0, end = 0
        cdef Buf b
        buf = self._next(&start, &end)
        if buf is None:
            return None
        b.data = <const unsigned char*>PyBytes_AS_STRING(buf)
        b.pos = start
        b.end = end
        try:
            h = _hot(codec, &b)
        except (MalformedNode, UnknownToken, LimitExceeded):
            h = None  # the full decode below raises the error, worded as always
        if h is not None:
            return h
        b.pos = start
        return _decode_top(codec, &b)
