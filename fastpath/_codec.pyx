# cython: language_level=3
"""Cython framing and node codec: the twin of pigeon.core._pycodec.

Same classes, same methods, same exceptions, byte-for-byte the same output;
tests run both against one table of inputs.  What differs is how:

* decoding walks a raw pointer over the received chunk and builds strings
  straight from it; one-byte tokens are shared str objects; ``Node`` is a
  compiled class with a freelist;
* ``FrameReader.next_node`` / ``next_envelope`` decode or peek a frame where
  it lies in the chunk it arrived in, with no per-frame buffer object;
* peek reads only the envelope and records where the content lies, so the
  router forwards it without building or copying anything;
* encoding writes into one preallocated, growable buffer per Codec and
  back-fills the frame length; ``write_frame`` appends to the caller's
  bytearray, so many frames for one socket become one write.  That buffer
  is scratch: nothing in it outlives the call, so one Codec serves every
  connection of a thread (core/connection.py ``shared_codec``).  A call
  that comes back into the same Codec while it encodes (only a callback of
  the object being encoded could) raises RuntimeError instead of
  overwriting the outer call's bytes.

Bounds and wraparound checks are compiled out (setup.py); every read is
guarded by an explicit length check instead, which is what turns garbage
into MalformedNode rather than a crash.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_Check, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.ref cimport Py_INCREF, PyObject
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_New, PyTuple_SET_ITEM
from cpython.unicode cimport PyUnicode_DecodeASCII, PyUnicode_DecodeUTF8
from libc.string cimport memcmp, memcpy

from collections import deque

from pigeon.core.errors import EmptyFrame, FrameTooLarge, LimitExceeded, MalformedNode, UnknownToken
from pigeon.core.node import DEFAULT_LIMITS, format_node
from pigeon.core.tokens import LATEST


cdef extern from "Python.h":
    ctypedef unsigned char Py_UCS1
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) except NULL
    object PyUnicode_New(Py_ssize_t size, Py_UCS4 maxchar)
    void* PyUnicode_DATA(object s)


IMPLEMENTATION = "fastpath"

cdef enum:
    ADDR_DEVICE = 0xF0
    ADDR_GROUP = 0xF1
    LIST_8 = 0xF8
    LIST_16 = 0xF9
    PACKED = 0xFA
    BIN_8 = 0xFC
    BIN_16 = 0xFD
    BIN_32 = 0xFE
    SINGLE_LAST = 0xEB
    DOUBLE_FIRST = 0xEC
    DOUBLE_LAST = 0xEF
    MAX_PACKED = 255

cdef const char* HEX = b"0123456789abcdef"
cdef object _memoryview = memoryview


cdef struct Buf:
    const unsigned char* data
    Py_ssize_t pos
    Py_ssize_t end


@cython.final
@cython.freelist(256)
cdef class Node:
    """tag, attrs (dict of str -> str), content (None, bytes, or list of nodes)."""

    cdef public object tag
    cdef public object attrs
    cdef public object content

    def __init__(self, tag, attrs=None, content=None):
        self.tag = tag
        self.attrs = {} if attrs is None else attrs
        self.content = content

    def __eq__(self, other):
        try:
            return (self.tag == other.tag and self.attrs == other.attrs
                    and self.content == other.content)
        except AttributeError:
            return NotImplemented

    __hash__ = None

    def get(self, key, default=None):
        return self.attrs.get(key, default)

    def __repr__(self):
        return format_node(self)

    def __reduce__(self):
        return (Node, (self.tag, self.attrs, self.content))


@cython.final
@cython.freelist(64)
cdef class Envelope:
    """What ``Codec.peek`` reads of a top-level node.

    tag, to, id, type: the attribute values (None when absent).
    payload, start, end: the byte content is ``payload[start:end]``; start and
    end are -1 when the node has no byte content (none, or child nodes).
    ``content`` makes that slice as a memoryview, without copying.
    """

    cdef public object tag
    cdef public object to
    cdef public object id
    cdef public object type
    cdef public object payload
    cdef public Py_ssize_t start
    cdef public Py_ssize_t end

    @property
    def content(self):
        if self.start < 0:
            return None
        return _memoryview(self.payload)[self.start:self.end]

    def __repr__(self):
        size = self.end - self.start if self.start >= 0 else None
        return (f"Envelope(tag={self.tag!r}, to={self.to!r}, id={self.id!r}, "
                f"type={self.type!r}, content_bytes={size})")


cdef int _one_byte_code(dict codes, str s):
    code = codes.get(s)
    return code if code is not None and code < 0x100 else -1


include "hot.pxi"
include "framing.pxi"
include "decode.pxi"
include "encode.pxi"
include "entry.pxi"
include "fanout.pxi"
include "copies.pxi"
include "commit.pxi"


cdef inline int _claim(Codec c) except -1:
    if c._busy:
        raise RuntimeError("this Codec is already encoding: it was called again from a "
                           "callback of the object being encoded")
    c._busy = True
    return 0


@cython.final
cdef class Codec:
    """Encode and decode nodes with one dictionary version and one set of limits."""

    cdef readonly object dictionary
    cdef readonly object limits
    cdef tuple _single
    cdef tuple _double
    cdef dict _codes
    cdef Py_ssize_t max_frame, max_depth, max_attrs, max_string, max_children
    cdef int _tok_to, _tok_id, _tok_type    # one-byte codes of the envelope keys, or -1
    cdef int _tok_seq, _tok_message, _tok_receipt, _tok_ack   # and of the hot kinds (hot.pxi)
    cdef int _tok_payload, _tok_device      # per-device payloads (hot.pxi), or -1
    cdef unsigned char* _buf
    cdef Py_ssize_t _cap, _len
    cdef unsigned char _seq_key[8]          # the "seq" attribute name, encoded (<= 5 bytes)
    cdef Py_ssize_t _seq_len
    # the constant strings of a queue entry's head (entry.pxi, _ENTRY_NAMES), encoded
    # once: a tag or attribute name as its token (or its plain form, <= 15 bytes; else -1)
    cdef unsigned char _ek[_ENTRY_NAME_COUNT][16]
    cdef Py_ssize_t _ekl[_ENTRY_NAME_COUNT]
    cdef bint _busy                         # _buf is in use (an encode is running)

    def __cinit__(self, dictionary=LATEST, limits=DEFAULT_LIMITS):
        self._buf = <unsigned char*>PyMem_Malloc(1024)
        if self._buf == NULL:
            raise MemoryError()
        self._cap = 1024
        self._len = 0

    def __init__(self, dictionary=LATEST, limits=DEFAULT_LIMITS):
        cdef int k
        self.dictionary = dictionary
        self.limits = limits
        self._single = dictionary.single
        self._double = dictionary.double
        self._codes = dictionary.codes
        self._tok_to = _one_byte_code(self._codes, "to")
        self._tok_id = _one_byte_code(self._codes, "id")
        self._tok_type = _one_byte_code(self._codes, "type")
        self._tok_seq = _one_byte_code(self._codes, "seq")
        self._tok_message = _one_byte_code(self._codes, "message")
        self._tok_receipt = _one_byte_code(self._codes, "receipt")
        self._tok_ack = _one_byte_code(self._codes, "ack")
        self._tok_payload = _one_byte_code(self._codes, "payload")
        self._tok_device = _one_byte_code(self._codes, "device")
        self.max_frame = limits.max_frame
        self.max_depth = limits.max_depth
        self.max_attrs = limits.max_attrs
        self.max_string = limits.max_string
        self.max_children = limits.max_children
        self._len = 0
        _enc_string(self, "seq", "attribute name")
        self._seq_len = self._len
        memcpy(self._seq_key, self._buf, self._len)
        for k in range(_ENTRY_NAME_COUNT):
            self._len = 0
            _enc_string(self, _ENTRY_NAMES[k], "attribute name")
            if self._len <= 15:
                memcpy(self._ek[k], self._buf, self._len)
                self._ekl[k] = self._len
            else:
                self._ekl[k] = -1
        self._len = 0

    def __dealloc__(self):
        PyMem_Free(self._buf)

    # -- decoding ---------------------------------------------------------

    def decode(self, payload):
        """Decode one frame payload; it must hold exactly one node."""
        cdef Py_buffer view
        cdef Buf b
        if PyBytes_CheckExact(payload):
            b.data = <const unsigned char*>PyBytes_AS_STRING(payload)
            b.pos = 0
            b.end = PyBytes_GET_SIZE(payload)
            return _decode_top(self, &b)
        PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
        try:
            b.data = <const unsigned char*>view.buf
            b.pos = 0
            b.end = view.len
            return _decode_top(self, &b)
        finally:
            PyBuffer_Release(&view)

    def peek(self, payload):
        """The envelope (tag, to, id, type) of a top-level node, without building it.

        Every attribute is syntax-checked (tokens, lengths, UTF-8, addresses);
        repeats are rejected for to/id/type, the envelope the router uses.
        Child nodes are not walked.  ``Envelope.payload`` is ``payload``.
        """
        cdef Py_buffer view
        cdef Buf b
        if PyBytes_CheckExact(payload):
            b.data = <const unsigned char*>PyBytes_AS_STRING(payload)
            b.pos = 0
            b.end = PyBytes_GET_SIZE(payload)
            return _peek(self, &b, payload)
        PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
        try:
            b.data = <const unsigned char*>view.buf
            b.pos = 0
            b.end = view.len
            return _peek(self, &b, payload)
        finally:
            PyBuffer_Release(&view)

    # -- queue entries (layout: pigeon.core._pycodec, "queue entries") -----

    def queue_entry(self, int kind, unsigned long long t, int flags, str origin, str mid, str typ,
                    body=None, to=None):
        """The stored form of a message (kind 0, with ``body``), receipt (kind 1)
        or device-list notice (kind 2: ``mid`` and ``typ`` empty); ``to``: the
        recipient a sync copy names."""
        _claim(self)
        try:
            return _queue_entry(self, kind, t, flags, origin, mid, typ, body, to)
        finally:
            self._busy = False

    def write_entry_frame(self, bytearray out, entry, unsigned long long seq):
        """Append the delivery frame of a queue entry, as sequence ``seq``, to ``out``.

        Returns the frame's length (header included)."""
        cdef Py_buffer view
        if PyBytes_CheckExact(entry):
            return _write_entry_frame(self, out, <const unsigned char*>PyBytes_AS_STRING(entry),
                                      PyBytes_GET_SIZE(entry), seq)
        PyObject_GetBuffer(entry, &view, PyBUF_SIMPLE)
        try:
            return _write_entry_frame(self, out, <const unsigned char*>view.buf, view.len, seq)
        finally:
            PyBuffer_Release(&view)

    # -- encoding ---------------------------------------------------------

    def encode(self, node):
        """The payload of one frame (no header)."""
        _claim(self)
        try:
            self._len = 0
            _enc_node(self, node, 1)
            if self._len > self.max_frame:
                raise FrameTooLarge(
                    f"encoded node of {self._len} bytes exceeds the maximum of {self.max_frame}")
            return PyBytes_FromStringAndSize(<char*>self._buf, self._len)
        finally:
            self._busy = False

    def encode_frame(self, node):
        """Header plus payload, ready for the wire."""
        _claim(self)
        try:
            _enc_frame(self, node)
            return PyBytes_FromStringAndSize(<char*>self._buf, self._len)
        finally:
            self._busy = False

    def write_ack(self, bytearray out, str cls, str mid, unsigned long long t):
        """Append the frame of ``<ack class=cls id=mid t=t/>``: the bytes
        ``write_frame`` makes of that node (attributes in that order), with
        no node built.  The answer to every message; returns the payload length."""
        _claim(self)
        try:
            self._len = 3
            _list_header(self, 7)
            _enc_string(self, "ack", "tag")
            _enc_string(self, "class", "attribute name")
            _enc_string(self, cls, "attribute value")
            _enc_string(self, "id", "attribute name")
            _enc_string(self, mid, "attribute value")
            _enc_string(self, "t", "attribute name")
            _enc_string(self, str(t), "attribute value")
            self._buf[0] = <unsigned char>((self._len - 3) >> 16)
            self._buf[1] = <unsigned char>((self._len - 3) >> 8)
            self._buf[2] = <unsigned char>(self._len - 3)
            return _append_frame(self, out)
        finally:
            self._busy = False

    def write_frame(self, bytearray out, node):
        """Append a whole frame for ``node`` to ``out``; returns the payload length.

        On error ``out`` is left as it was.
        """
        _claim(self)
        try:
            _enc_frame(self, node)
            return _append_frame(self, out)
        finally:
            self._busy = False
