"""Pure-Python framing and node codec: the reference implementation.

``pigeon.fastpath._codec`` is its Cython twin with the same API; tests run
both against the same tables, and ``pigeon.core.codec`` picks one at import.

Framing: ``FrameReader`` keeps the chunks it was fed.  ``next_frame`` hands
out a payload as a memoryview: of the chunk it arrived in when it lies inside
one (no copy), of a fresh copy only when it straddles chunks.  ``next_node``
and ``next_envelope`` decode or peek the next frame where it lies.  A length
past ``max_frame`` is rejected as soon as its header arrives, so a peer can
never make the reader hold more than one maximal frame.

Nodes: a node is a list item: tag, attribute key/value pairs, then optional
content.  ``Codec.peek`` reads just the envelope (tag, to, id, type) of a
top-level node and notes where its byte content lies in the received buffer,
which is what the router forwards without building or copying anything.
"""

from __future__ import annotations

import struct
from collections import deque

from .errors import EmptyFrame, FrameTooLarge, LimitExceeded, MalformedNode, UnknownToken
from .node import DEFAULT_LIMITS, DEVICE_RE, GROUP_RE, MAX_DEVICE, Limits, Node, valid_phone
from .tokens import LATEST, Dictionary
from .wire import (
    ADDR_DEVICE,
    ADDR_GROUP,
    BIN_8,
    BIN_16,
    BIN_32,
    LIST_8,
    LIST_16,
    MAX_PACKED,
    PACKED,
    PACKED_ALPHABET,
)

IMPLEMENTATION = "python"

#: Kinds of queue entry (see Codec.queue_entry) and the tag each is delivered as.
ENTRY_MESSAGE, ENTRY_RECEIPT, ENTRY_DEVICES, ENTRY_KEYS = 0, 1, 2, 3
#: group notice (head and content made by server/groups.py), group message body
#: (stored once, in ``gbody``), and the per-device reference to one (never a frame)
ENTRY_GROUP, ENTRY_GMESSAGE, ENTRY_GREF, ENTRY_GPAYLOAD, ENTRY_GRECEIPT = 4, 5, 6, 7, 8
_ENTRY_TAGS = ("message", "receipt", "devices", "keys", "group", "message")
#: Flag bits of a queue entry: the recipient user had several devices (the fan
#: record); a copy for the sender's own account (sync copy, device-to-device):
#: its ack makes no delivered receipt.
ENTRY_FAN, ENTRY_SYNC = 1, 2

_PACKED_VALUE = {c: i for i, c in enumerate(PACKED_ALPHABET)}


class Envelope:
    """What ``Codec.peek`` reads of a top-level node.

    tag, to, id, type: the attribute values (None when absent).
    payload, start, end: the byte content is ``payload[start:end]``; start and
    end are -1 when the node has no byte content (none, or child nodes).
    ``content`` makes that slice as a memoryview, without copying.
    """

    __slots__ = ("tag", "to", "id", "type", "payload", "start", "end")

    def __init__(self, tag, to, id, type, payload, start, end):
        self.tag = tag
        self.to = to
        self.id = id
        self.type = type
        self.payload = payload
        self.start = start
        self.end = end

    @property
    def content(self) -> memoryview | None:
        if self.start < 0:
            return None
        return memoryview(self.payload)[self.start : self.end]

    def __repr__(self) -> str:
        size = self.end - self.start if self.start >= 0 else None
        return (
            f"Envelope(tag={self.tag!r}, to={self.to!r}, id={self.id!r}, "
            f"type={self.type!r}, content_bytes={size})"
        )


class Hot:
    """A message, receipt or device ack read by ``FrameReader.next_hot``.

    kind: 1 message (to, id, type, body), 2 receipt (to, id, type),
    3 ack (seq).  A message with per-device payloads has body b"" and
    payloads ((device, bytes), ...), as ``Message.payloads``; else payloads
    is None.  Every field was checked as the event classes check it."""

    __slots__ = ("kind", "to", "id", "type", "body", "seq", "payloads")

    def __init__(self, kind, to=None, id=None, type=None, body=None, seq=None, payloads=None):
        self.kind, self.to, self.id, self.type, self.body, self.seq = kind, to, id, type, body, seq
        self.payloads = payloads

    def __repr__(self) -> str:
        return (f"Hot(kind={self.kind}, to={self.to!r}, id={self.id!r}, type={self.type!r}, "
                f"body={self.body!r}, seq={self.seq!r}, payloads={self.payloads!r})")  # fmt: skip


HOT_MESSAGE, HOT_RECEIPT, HOT_ACK = 1, 2, 3
_HOT_KEYS = {"message": {"to", "id", "type"}, "receipt": {"to", "id", "type"}, "ack": {"seq"}}
_ID_CHARS = frozenset(range(0x21, 0x7F))


def _printable_id(s: str) -> bool:
    return 1 <= len(s) <= 64 and s.isascii() and all(ord(ch) in _ID_CHARS for ch in s)


def _valid_device(s: str) -> bool:
    """A device address (node.address_kind(s) == "device")."""
    m = DEVICE_RE.fullmatch(s)
    return m is not None and int(m.group(2)) <= MAX_DEVICE


#: longer payload lists are left to the full path (fastpath/hot.pxi says why)
HOT_MAX_PAYLOADS = 32


def _hot_payloads(children: list) -> tuple | None:
    """((device, bytes), ...) of a message's children if each is a
    ``<payload device=D>`` with bytes and nothing else, every D a device
    address named once, the list not empty (events._payloads); else None."""
    if not 1 <= len(children) <= HOT_MAX_PAYLOADS:
        return None
    out = []
    seen = set()
    for child in children:
        d = child.attrs.get("device")
        if child.tag != "payload" or len(child.attrs) != 1 or d is None or d in seen:
            return None
        if type(child.content) is not bytes or not _valid_device(d):
            return None
        seen.add(d)
        out.append((d, child.content))
    return tuple(out)


def _hot(node) -> Hot | None:
    """A hot kind with exactly its attributes and the content its event reads,
    passing every check of its event class; else None.  (The compiled reader
    also leaves frames not in their short form, such as a key spelled out
    instead of its token, to the full decode: the events are the same.)"""
    keys = _HOT_KEYS.get(node.tag)
    if keys is None or len(node.attrs) != len(keys) or not set(node.attrs) <= keys:
        return None
    a = node.attrs
    if node.tag == "ack":
        v = a["seq"]
        if node.content is not None or not (v.isdigit() and v.isascii()) or len(v) > 20:
            return None
        if (len(v) > 1 and v[0] == "0") or int(v) > 0xFFFFFFFFFFFFFFFF:
            return None
        return Hot(HOT_ACK, seq=int(v))
    if not valid_phone(a["to"]) or not _printable_id(a["id"]):
        return None
    if node.tag == "message":
        if not _printable_id(a["type"]):
            return None
        if type(node.content) is list:
            payloads = _hot_payloads(node.content)
            if payloads is None:
                return None
            return Hot(HOT_MESSAGE, a["to"], a["id"], a["type"], b"", payloads=payloads)
        if type(node.content) is not bytes:
            return None
        return Hot(HOT_MESSAGE, a["to"], a["id"], a["type"], node.content)
    if node.content is not None or a["type"] not in ("read", "played"):
        return None
    return Hot(HOT_RECEIPT, a["to"], a["id"], a["type"])


class FrameReader:
    """Split a byte stream into frame payloads (3-byte big-endian length + payload)."""

    __slots__ = ("max_frame", "_first", "_rest", "_offset", "_size")

    def __init__(self, max_frame: int = DEFAULT_LIMITS.max_frame):
        self.max_frame = max_frame
        # What is buffered: the chunk being read (None: nothing) and the
        # later ones, in a deque made when a second chunk arrives and
        # dropped once everything is read: an idle connection holds none (an
        # empty deque is over 600 bytes), a busy one keeps its deque while
        # bytes are pending.
        self._first: bytes | None = None
        self._rest: deque[bytes] | None = None
        self._offset = 0  # consumed bytes of _first
        self._size = 0  # unconsumed bytes in all chunks

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return self._size

    def feed(self, data) -> None:
        if not data:
            return
        if type(data) is not bytes:
            data = bytes(data)  # the caller may reuse its buffer; we keep views
        if self._first is None:
            self._first = data
        else:
            if self._rest is None:
                self._rest = deque()
            self._rest.append(data)
        self._size += len(data)

    def _pop(self) -> None:
        """_first is consumed: the next chunk, if any, becomes the current one."""
        if self._rest:
            self._first = self._rest.popleft()
        else:
            self._first = None
            self._rest = None

    def _take(self, n: int) -> tuple[bytes, int]:
        """Consume the next n bytes (n <= _size): (buffer, offset) where they lie."""
        first = self._first
        off = self._offset
        if len(first) - off >= n:
            if off + n == len(first):
                self._pop()
                self._offset = 0
            else:
                self._offset = off + n
            self._size -= n
            return first, off
        out = bytearray(n)
        filled = 0
        while filled < n:
            chunk = self._first
            part = min(len(chunk) - off, n - filled)
            out[filled : filled + part] = chunk[off : off + part]
            filled += part
            off += part
            if off == len(chunk):
                self._pop()
                off = 0
        self._offset = off
        self._size -= n
        return bytes(out), 0

    def _next(self) -> tuple[bytes, int, int] | None:
        """(buffer, start, end) of the next complete payload, consumed."""
        if self._size < 3:
            return None
        first = self._first
        off = self._offset
        if len(first) - off >= 3:
            h = first[off : off + 3]
        else:
            # The header straddles chunks: look at no more than the 3 it needs
            # (joining everything buffered would be quadratic for a slow drip).
            h = first[off:]
            for chunk in self._rest:
                h += chunk[: 3 - len(h)]
                if len(h) == 3:
                    break
        n = (h[0] << 16) | (h[1] << 8) | h[2]
        if n == 0:
            raise EmptyFrame("frame of length 0")
        if n > self.max_frame:
            raise FrameTooLarge(f"frame of {n} bytes exceeds the maximum of {self.max_frame}")
        if self._size < 3 + n:
            return None
        self._take(3)
        buf, start = self._take(n)
        return buf, start, start + n

    def next_frame(self) -> memoryview | None:
        """The next complete payload, or None if more data is needed."""
        span = self._next()
        if span is None:
            return None
        buf, start, end = span
        return memoryview(buf)[start:end]

    def next_node(self, codec: Codec):
        """Decode the next complete frame with ``codec``; None if more data is needed."""
        span = self._next()
        if span is None:
            return None
        return codec._decode_span(*span)

    def next_hot(self, codec: Codec):
        """The next frame as a ``Hot`` (a message, receipt or device ack that
        passes every check of its event class) or, for anything else, as the
        decoded Node; None if more data is needed.  Raises what next_node raises."""
        span = self._next()
        if span is None:
            return None
        node = codec._decode_span(*span)
        hot = _hot(node)
        return node if hot is None else hot

    def next_envelope(self, codec: Codec) -> Envelope | None:
        """Peek the next complete frame with ``codec``; None if more data is needed."""
        span = self._next()
        if span is None:
            return None
        return codec._peek_span(*span)


class _Reader:
    __slots__ = ("data", "pos", "end", "dictionary", "limits")

    def __init__(self, data, pos: int, end: int, dictionary: Dictionary, limits: Limits):
        self.data = data
        self.pos = pos
        self.end = end
        self.dictionary = dictionary
        self.limits = limits

    def byte(self) -> int:
        if self.pos >= self.end:
            raise MalformedNode("truncated node: expected another byte")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def take(self, n: int) -> bytes:
        if self.end - self.pos < n:
            raise MalformedNode(f"truncated node: expected {n} more bytes")
        start = self.pos
        self.pos += n
        return self.data[start : self.pos]

    def uint(self, width: int) -> int:
        return int.from_bytes(self.take(width), "big")

    def list_size(self, t: int) -> int:
        if t == LIST_8:
            return self.byte()
        return self.uint(2)

    def packed(self, digits_only: bool) -> str:
        n = self.byte()
        raw = self.take((n + 1) // 2)
        s = raw.hex()
        if n & 1:
            if raw[-1] & 15:
                raise MalformedNode("packed string with a non-zero pad nibble")
            s = s[:-1]
        if digits_only and not s.isdigit() and s:
            raise MalformedNode(f"address digits must be 0-9: {s!r}")
        return s

    def string(self, t: int, what: str) -> str:
        """A string item whose type byte t was read."""
        if 0x01 <= t <= 0xEB:
            s = self.dictionary.single[t]
            if s is None:
                raise UnknownToken(
                    f"token 0x{t:02x} is not in dictionary version {self.dictionary.version}"
                )
            return s
        if 0xEC <= t <= 0xEF:
            i = self.byte()
            s = self.dictionary.double[t - 0xEC][i]
            if s is None:
                raise UnknownToken(
                    f"token 0x{t:02x}{i:02x} is not in dictionary version {self.dictionary.version}"
                )
            return s
        if t == PACKED:
            return self.packed(False)
        if t == ADDR_DEVICE:
            dev = self.byte()
            phone = self.packed(True)
            if not valid_phone(phone):
                raise MalformedNode(f"device address is not an E.164 number: {phone!r}")
            return f"{phone}:{dev}"
        if t == ADDR_GROUP:
            gid = self.packed(True)
            if not 1 <= len(gid) <= 20:
                raise MalformedNode(f"group id must be 1-20 digits: {gid!r}")
            return "g:" + gid
        if t == BIN_8 or t == BIN_16 or t == BIN_32:
            n = self.byte() if t == BIN_8 else self.uint(2 if t == BIN_16 else 4)
            if n > self.limits.max_string:
                raise LimitExceeded(
                    f"{what} of {n} bytes exceeds max_string={self.limits.max_string}"
                )
            raw = self.take(n)
            try:
                return str(raw, "utf-8")
            except UnicodeDecodeError:
                raise MalformedNode(f"{what} is not valid UTF-8") from None
        raise MalformedNode(f"{what}: expected a string, found type byte 0x{t:02x}")

    def node(self, depth: int) -> Node:
        if depth > self.limits.max_depth:
            raise LimitExceeded(f"nodes nested deeper than max_depth={self.limits.max_depth}")
        t = self.byte()
        if t != LIST_8 and t != LIST_16:
            raise MalformedNode(f"expected a node (list header), found type byte 0x{t:02x}")
        n = self.list_size(t)
        if n == 0:
            raise MalformedNode("a node needs at least a tag")
        tag = self.string(self.byte(), "tag")
        nattrs = (n - 1) >> 1
        if nattrs > self.limits.max_attrs:
            raise LimitExceeded(f"{nattrs} attributes exceed max_attrs={self.limits.max_attrs}")
        attrs = {}
        for _ in range(nattrs):
            key = self.string(self.byte(), "attribute name")
            if key in attrs:
                raise MalformedNode(f"duplicate attribute {key!r}")
            attrs[key] = self.string(self.byte(), "attribute value")
        content = None
        if (n - 1) & 1:
            t = self.byte()
            if t == LIST_8 or t == LIST_16:
                k = self.list_size(t)
                if k > self.limits.max_children:
                    raise LimitExceeded(
                        f"{k} child nodes exceed max_children={self.limits.max_children}"
                    )
                content = [self.node(depth + 1) for _ in range(k)]
            elif t == BIN_8 or t == BIN_16 or t == BIN_32:
                size = self.byte() if t == BIN_8 else self.uint(2 if t == BIN_16 else 4)
                content = bytes(self.take(size))
            else:
                raise MalformedNode(f"content must be a list or bytes, found type byte 0x{t:02x}")
        return Node(tag, attrs, content)

    def finish(self) -> None:
        if self.pos != self.end:
            raise MalformedNode(f"{self.end - self.pos} trailing bytes after the node")


class Codec:
    """Encode and decode nodes with one dictionary version and one set of limits."""

    __slots__ = ("dictionary", "limits", "_codes", "_max_string")

    def __init__(self, dictionary: Dictionary = LATEST, limits: Limits = DEFAULT_LIMITS):
        self.dictionary = dictionary
        self.limits = limits
        self._codes = dictionary.codes
        self._max_string = limits.max_string

    # -- decoding ---------------------------------------------------------

    def decode(self, payload) -> Node:
        """Decode one frame payload; it must hold exactly one node."""
        data = payload if type(payload) is bytes else bytes(payload)
        return self._decode_span(data, 0, len(data))

    def _decode_span(self, data: bytes, start: int, end: int) -> Node:
        r = _Reader(data, start, end, self.dictionary, self.limits)
        node = r.node(1)
        r.finish()
        return node

    def peek(self, payload) -> Envelope:
        """The envelope (tag, to, id, type) of a top-level node, without building it.

        Every attribute is syntax-checked (tokens, lengths, UTF-8, addresses);
        repeats are rejected for to/id/type, the envelope the router uses.
        Child nodes are not walked.  ``Envelope.payload`` is ``payload``.
        """
        if type(payload) is bytes:
            return self._peek_span(payload, 0, len(payload))
        env = self._peek_span(bytes(payload), 0, len(payload))
        env.payload = payload
        return env

    def _peek_span(self, data: bytes, start: int, end: int) -> Envelope:
        r = _Reader(data, start, end, self.dictionary, self.limits)
        t = r.byte()
        if t != LIST_8 and t != LIST_16:
            raise MalformedNode(f"expected a node (list header), found type byte 0x{t:02x}")
        n = r.list_size(t)
        if n == 0:
            raise MalformedNode("a node needs at least a tag")
        tag = r.string(r.byte(), "tag")
        nattrs = (n - 1) >> 1
        if nattrs > self.limits.max_attrs:
            raise LimitExceeded(f"{nattrs} attributes exceed max_attrs={self.limits.max_attrs}")
        to = mid = mtype = None
        for _ in range(nattrs):
            key = r.string(r.byte(), "attribute name")
            v = r.string(r.byte(), "attribute value")
            if key == "to":
                if to is not None:
                    raise MalformedNode("duplicate attribute 'to'")
                to = v
            elif key == "id":
                if mid is not None:
                    raise MalformedNode("duplicate attribute 'id'")
                mid = v
            elif key == "type":
                if mtype is not None:
                    raise MalformedNode("duplicate attribute 'type'")
                mtype = v
        cstart = cend = -1
        if (n - 1) & 1:
            t = r.byte()
            if t == BIN_8 or t == BIN_16 or t == BIN_32:
                size = r.byte() if t == BIN_8 else r.uint(2 if t == BIN_16 else 4)
                if r.end - r.pos < size:
                    raise MalformedNode(f"truncated node: expected {size} more bytes")
                cstart = r.pos
                cend = r.pos = r.pos + size
                r.finish()
            elif t != LIST_8 and t != LIST_16:
                raise MalformedNode(f"content must be a list or bytes, found type byte 0x{t:02x}")
        else:
            r.finish()
        return Envelope(tag, to, mid, mtype, data, cstart, cend)

    # -- queue entries ----------------------------------------------------
    #
    # What the server stores for one delivery, written once and turned into
    # the delivery frame only when it is pushed, by splicing the device's
    # sequence number between the stored envelope and the body (format 5):
    #
    #     kind u8 | t u64 | flags u8 | len u8, origin | len u8, id | len u16, head | body
    #
    # kind 0 message (body follows), 1 receipt, 2 device-list notice (nothing
    # follows; no id: its length is 0), 3 key-directory notice (``<keys from
    # type t>``: no id, a type; nothing follows), 4 group notice (``<group from=g:N
    # type by t ...>``: no id; what follows the head is the node's content, already
    # encoded (a list header and children), written after ``seq`` as it is), 5 group
    # message (``<message from=g:N participant=S:k id type t>``: ``to`` names the
    # group, ``origin`` the sending device; the body follows, as for kind 0).  Kind
    # 6 is the queue's reference to a kind-5 (or kind-4) entry stored once (server/queues.py):
    # never made or spliced here.  Kind 7, a group message with a payload for this
    # device: made by server/queues.py like kind 4 (its content, ``<body>`` and
    # ``<payload>``, written after ``seq`` as it is), ``origin`` the sending device.
    # Kind 8, group receipts for one message (``<receipt from=g:N id type t seq>`` with
    # ``<member user/>`` children), made and spliced like kind 4.  Flags bit 0 (ENTRY_FAN): the recipient
    # user had several devices (the fan record); bit 1 (ENTRY_SYNC): a copy for
    # the sender's own account (a sync copy or a device-to-device message),
    # whose ack makes no delivered receipt.  ``head`` is the frame payload up
    # to the ``seq`` attribute: the list header, the tag and ``from``, ``to``
    # (sync copies only), ``id`` (kinds 0, 1), ``type`` (not kind 2), ``t``, encoded
    # with this codec's dictionary.  All integers are big-endian.  The frame
    # is byte for byte what encoding IncomingMessage / IncomingReceipt /
    # DevicesChanged / KeysLow / KeysChanged would give.

    def queue_entry(self, kind: int, t: int, flags: int, origin: str, mid: str, typ: str,
                    body=None, to: str | None = None) -> bytes:  # fmt: skip
        """The stored form of a message (kind 0, with ``body``), receipt (kind 1),
        device-list notice (kind 2: ``mid`` and ``typ`` empty) or key-directory
        notice (kind 3: ``mid`` empty, ``typ`` low or changed); ``to``: the
        recipient a sync copy names."""
        if kind not in (ENTRY_MESSAGE, ENTRY_RECEIPT, ENTRY_DEVICES, ENTRY_KEYS, ENTRY_GMESSAGE):
            raise ValueError(f"unknown entry kind {kind}")
        o, i = origin.encode(), mid.encode()
        gmessage = kind == ENTRY_GMESSAGE
        if gmessage and to is None:
            raise ValueError("a group message names its group (to)")
        notice = kind in (ENTRY_DEVICES, ENTRY_KEYS)
        if not 0 < len(o) < 256 or not (0 if notice else 1) <= len(i) < 256 or (notice and i):
            raise ValueError("origin and id must be 1-255 bytes (a notice has no id)")
        head = bytearray()
        message = kind == ENTRY_MESSAGE or gmessage
        if gmessage:
            attrs = [("from", to), ("participant", origin)]
        else:
            attrs = [("from", origin)]
            if to is not None:
                attrs.append(("to", to))
        if not notice:
            attrs += (("id", mid), ("type", typ))
        elif kind == ENTRY_KEYS:
            attrs.append(("type", typ))
        attrs.append(("t", str(t)))
        self._list_header(head, 3 + 2 * len(attrs) + message)
        self._string(head, _ENTRY_TAGS[kind], "tag")
        for key, value in attrs:
            self._string(head, key, "attribute name")
            self._string(head, value, "attribute value")
        out = bytearray((kind,))
        out += t.to_bytes(8, "big")
        out.append(int(flags) & 0xFF)
        out.append(len(o))
        out += o
        out.append(len(i))
        out += i
        out += len(head).to_bytes(2, "big")
        out += head
        if message:
            out += body
        return bytes(out)

    def write_entry_frame(self, out: bytearray, entry, seq: int) -> int:
        """Append the delivery frame of a queue entry, as sequence ``seq``, to ``out``.

        Returns the frame's length (header included)."""
        size = len(entry)
        p = 10
        if size < p + 4:
            raise ValueError("not a queue entry")
        p += 1 + entry[p]
        if p >= size:
            raise ValueError("not a queue entry")
        p += 1 + entry[p]
        if p + 2 > size:
            raise ValueError("not a queue entry")
        hlen = int.from_bytes(entry[p : p + 2], "big")
        p += 2
        if p + hlen > size:
            raise ValueError("not a queue entry")
        payload = bytearray(entry[p : p + hlen])
        self._string(payload, "seq", "attribute name")
        self._string(payload, str(seq), "attribute value")
        kind = entry[0]
        if kind == ENTRY_MESSAGE or kind == ENTRY_GMESSAGE:
            body = memoryview(entry)[p + hlen :]
            self._bin_header(payload, len(body))
            payload += body
        elif kind == ENTRY_GROUP or kind == ENTRY_GPAYLOAD or kind == ENTRY_GRECEIPT:
            payload += memoryview(entry)[p + hlen :]  # encoded content, or nothing
        n = len(payload)
        if n > self.limits.max_frame:
            raise FrameTooLarge(
                f"encoded node of {n} bytes exceeds the maximum of {self.limits.max_frame}"
            )
        out += n.to_bytes(3, "big")
        out += payload
        return n + 3

    # -- encoding ---------------------------------------------------------

    def encode(self, node) -> bytes:
        """The payload of one frame (no header)."""
        out = bytearray()
        self._node(out, node, 1)
        if len(out) > self.limits.max_frame:
            raise FrameTooLarge(
                f"encoded node of {len(out)} bytes exceeds the maximum of {self.limits.max_frame}"
            )
        return bytes(out)

    def encode_frame(self, node) -> bytes:
        """Header plus payload, ready for the wire."""
        out = bytearray()
        self.write_frame(out, node)
        return bytes(out)

    def write_ack(self, out: bytearray, cls: str, mid: str, t: int) -> int:
        """Append the frame of ``<ack class=cls id=mid t=t/>``: the bytes
        ``write_frame`` makes of that node (attributes in that order), with
        no node built.  The answer to every message; returns the payload length."""
        if type(out) is not bytearray:
            raise TypeError(f"out must be a bytearray, not {type(out).__name__}")
        if type(t) is not int or not 0 <= t <= 0xFFFFFFFFFFFFFFFF:
            raise OverflowError(f"t must be a u64, not {t!r}")
        start = len(out)
        out += b"\0\0\0"
        try:
            self._list_header(out, 7)
            string = self._string
            string(out, "ack", "tag")
            string(out, "class", "attribute name")
            string(out, cls, "attribute value")
            string(out, "id", "attribute name")
            string(out, mid, "attribute value")
            string(out, "t", "attribute name")
            string(out, str(t), "attribute value")
        except BaseException:
            del out[start:]
            raise
        n = len(out) - start - 3
        out[start : start + 3] = n.to_bytes(3, "big")
        return n

    def write_frame(self, out: bytearray, node) -> int:
        """Append a whole frame for ``node`` to ``out``; returns the payload length.

        On error ``out`` is left as it was.
        """
        if type(out) is not bytearray:
            raise TypeError(f"out must be a bytearray, not {type(out).__name__}")
        start = len(out)
        out += b"\0\0\0"
        try:
            self._node(out, node, 1)
            n = len(out) - start - 3
            if n > self.limits.max_frame:
                raise FrameTooLarge(
                    f"encoded node of {n} bytes exceeds the maximum of {self.limits.max_frame}"
                )
        except BaseException:
            del out[start:]
            raise
        out[start : start + 3] = n.to_bytes(3, "big")
        return n

    def _string(self, out: bytearray, s, what: str) -> None:
        if not isinstance(s, str):
            raise TypeError(f"{what} must be str, not {type(s).__name__}")
        code = self._codes.get(s)
        if code is not None:
            if code < 0x100:
                out.append(code)
            else:
                out += code.to_bytes(2, "big")
            return
        n = len(s)
        if 0 < n <= MAX_PACKED and all(c in _PACKED_VALUE for c in s):
            out.append(PACKED)
            out.append(n)
            self._pack(out, s)
            return
        if ":" in s:
            m = DEVICE_RE.fullmatch(s)
            if m and int(m.group(2)) <= MAX_DEVICE:
                out.append(ADDR_DEVICE)
                out.append(int(m.group(2)))
                out.append(len(m.group(1)))
                self._pack(out, m.group(1))
                return
            m = GROUP_RE.fullmatch(s)
            if m:
                out.append(ADDR_GROUP)
                out.append(len(m.group(1)))
                self._pack(out, m.group(1))
                return
        raw = s.encode("utf-8")
        n = len(raw)
        if n > self._max_string:
            raise LimitExceeded(f"{what} of {n} bytes exceeds max_string={self._max_string}")
        self._bin_header(out, n)
        out += raw

    @staticmethod
    def _pack(out: bytearray, s: str) -> None:
        out += bytes.fromhex(s + "0" if len(s) & 1 else s)

    @staticmethod
    def _bin_header(out: bytearray, n: int) -> None:
        if n < 0x100:
            out.append(BIN_8)
            out.append(n)
        elif n < 0x10000:
            out.append(BIN_16)
            out += n.to_bytes(2, "big")
        else:
            out.append(BIN_32)
            out += n.to_bytes(4, "big")

    def _node(self, out: bytearray, node, depth: int) -> None:
        limits = self.limits
        if depth > limits.max_depth:
            raise LimitExceeded(f"nodes nested deeper than max_depth={limits.max_depth}")
        try:
            tag, attrs, content = node.tag, node.attrs, node.content
        except AttributeError:
            raise TypeError(f"expected a node, not {type(node).__name__}") from None
        if len(attrs) > limits.max_attrs:
            raise LimitExceeded(f"{len(attrs)} attributes exceed max_attrs={limits.max_attrs}")
        n = 1 + 2 * len(attrs) + (content is not None)
        self._list_header(out, n)
        self._string(out, tag, "tag")
        for k, v in attrs.items():
            self._string(out, k, "attribute name")
            self._string(out, v, "attribute value")
        if content is None:
            return
        if isinstance(content, (bytes, bytearray, memoryview)):
            size = content.nbytes if isinstance(content, memoryview) else len(content)
            self._bin_header(out, size)
            out += content
        elif isinstance(content, (list, tuple)):
            if len(content) > limits.max_children:
                raise LimitExceeded(
                    f"{len(content)} child nodes exceed max_children={limits.max_children}"
                )
            self._list_header(out, len(content))
            for child in content:
                self._node(out, child, depth + 1)
        else:
            raise TypeError(
                f"content must be bytes or a list of nodes, not {type(content).__name__}"
            )

    @staticmethod
    def _list_header(out: bytearray, n: int) -> None:
        if n < 0x100:
            out.append(LIST_8)
            out.append(n)
        else:
            out.append(LIST_16)
            out += n.to_bytes(2, "big")


# -- group fan-out (server/queues.py ``Queues._store_group``) -----------------------
#
# The per-member-device part of storing one group message, with no store access:
# the caller reads the queue states it lacks in one batch (``fan_missing``, then
# one ``getmulti``) and writes the references in one (``putmulti``).  ``states``
# maps a device's key (``device`` UTF-8) to its queue state as stored in
# ``qstate`` (three big-endian u64: next sequence, count, bytes; absent: a new
# queue) and is updated in place.  The fastpath twin (fastpath/fanout.pxi) does
# the same with no interpreted loop.

_QSTATE = struct.Struct(">QQQ")
_SEQ = struct.Struct(">Q")


def fan_missing(dks: list, states: dict) -> list:
    """The keys of ``dks`` (sorted) whose queue state ``states`` lacks, in order."""
    return [dk for dk in dks if dk not in states]


def fan_out(dks: list, dstrs: list, uidx: list, multi: bytes, sender: int, me: bytes,
            states: dict, refs: tuple, size: int, max_count: int, max_bytes: int,
            sessions: dict, missing, wake: bool) -> tuple:  # fmt: skip
    """One group message's references for the member devices ``dks`` (sorted keys;
    ``dstrs`` the same as str, ``uidx`` each one's user's place in the group,
    ``multi[i]`` 1 if that user has several devices) but ``me``, the sending one.

    ``refs`` is (reference, fan reference, sync reference): the sender's own
    devices (user ``sender``) get the sync one, a user with several devices the
    fan one.  A device whose queue cannot take ``size`` more bytes or one more
    entry is skipped and its user's place goes into ``failed``.  ``sessions``
    maps a device (str) to the worker holding it (None: offline); a device it
    does not know is answered with ``missing`` as its worker.  An offline one
    is listed (with worker None) only when ``wake`` is true.

    Returns (items: [(queue key, reference)] sorted, for ``putmulti``,
    failed: [user place] (each once, in key order),
    online: [(device, seq, worker)] for every device not known to be offline)."""
    ref, fan_ref, sync_ref = refs
    items, failed, online = [], [], []
    unpack, pack, seq_pack = _QSTATE.unpack, _QSTATE.pack, _SEQ.pack
    get, where = states.get, sessions.get
    for i, dk in enumerate(dks):
        if dk == me:
            continue
        u = uidx[i]
        raw = get(dk)
        nxt, count, nbytes = (1, 0, 0) if raw is None else unpack(raw)
        if count + 1 > max_count or nbytes + size > max_bytes:
            if not failed or failed[-1] != u:
                failed.append(u)
            continue
        states[dk] = pack(nxt + 1, count + 1, nbytes + size)
        items.append((dk + b"\x00" + seq_pack(nxt),
                      sync_ref if u == sender else fan_ref if multi[i] else ref))  # fmt: skip
        wid = where(dstrs[i], missing)
        if wid is not None or wake:
            online.append((dstrs[i], nxt, wid))
    return items, failed, online


# -- 1:1 copies and device acks (server/queues.py ``_Txn.copies``, ``Queues._ack``) ----
#
# The per-device part of storing a 1:1 message, a receipt or a sync copy, and of
# a device's ack, with ``states`` as for ``fan_out`` (device key -> the 24 bytes
# of its ``qstate`` record, updated in place).  A state ``states`` lacks is read
# with ``load(key)`` (None: a new queue) and kept there.  The fastpath twin
# (fastpath/copies.pxi) does the same with no interpreted loop and makes its
# ``Push`` records in C.

_NEW_QUEUE = _QSTATE.pack(1, 0, 0)
_SYNC_FLAG = 2  # an entry's flags bit 1 (server/queues.py SYNC): no delivered receipt
_MESSAGE_KIND, _GREF_KIND, _GPAYLOAD_KIND = 0, 6, 7  # entry kinds (server/queues.py)


class Push:
    """An entry committed to a device's queue; ``worker`` holds the device (None: offline).

    ``entry`` is the stored entry: FrameEncoder.write makes its frame."""

    __slots__ = ("device", "seq", "entry", "worker")

    def __init__(self, device, seq, entry, worker):
        self.device = device
        self.seq = seq
        self.entry = entry
        self.worker = worker

    def __repr__(self) -> str:
        return f"Push({self.device!r}, {self.seq}, worker={self.worker})"


def _state(states: dict, dk: bytes, load) -> bytes:
    raw = states.get(dk)
    if raw is None:
        raw = load(dk)
        if raw is None:
            raw = _NEW_QUEUE
        elif len(raw) != 24:
            raise ValueError("a queue state is not 24 bytes")
        states[dk] = raw
    elif len(raw) != 24:
        raise ValueError("a queue state is not 24 bytes")
    return raw


def copies_room(dks: list, entries, skip, states: dict, load, max_count: int,
                max_bytes: int, s_count: int, s_bytes: int, theirs: int):  # fmt: skip
    """Can every queue of ``dks`` (device keys but ``skip``) take one more entry:
    ``entries`` (one bytes object for all, or a list, one per device)?  The
    first ``theirs`` devices are also held to ``s_count``/``s_bytes`` (the
    stranger limits).  Returns None if all can, else (i, stranger): the first
    device that cannot, and whether only the stranger limit stops it."""
    one = isinstance(entries, bytes)
    for i, dk in enumerate(dks):
        if dk == skip:
            continue
        size = len(entries if one else entries[i])
        _, count, nbytes = _QSTATE.unpack(_state(states, dk, load))
        if count + 1 > max_count or nbytes + size > max_bytes:
            return i, False
        if i < theirs and (count + 1 > s_count or nbytes + size > s_bytes):
            return i, True
    return None


def copies(dks: list, dstrs: list, entries, skip, states: dict, load, items: list,
           pushes: list, sessions: dict, missing, worker_of) -> int:  # fmt: skip
    """Queue ``entries`` (one bytes object for all, or a list, one per device) for
    each device of ``dks`` (keys; ``dstrs`` the same as str) but ``skip``:
    takes its sequence from its state (updated), appends (queue key, entry) to
    ``items`` (for one ``putmulti``) and a ``Push`` to ``pushes``, whose worker
    is ``sessions``' (device str -> worker, None: offline) or, for a device it
    does not know (``missing``), ``worker_of(device)``.  Returns how many."""
    one = isinstance(entries, bytes)
    n = 0
    unpack, pack, seq_pack = _QSTATE.unpack, _QSTATE.pack, _SEQ.pack
    if len(dstrs) != len(dks) or not one and len(entries) != len(dks):
        raise ValueError("copies: dks, dstrs and entries differ in length")
    for i, dk in enumerate(dks):
        if dk == skip:
            continue
        entry = entries if one else entries[i]
        nxt, count, nbytes = unpack(_state(states, dk, load))
        states[dk] = pack(nxt + 1, count + 1, nbytes + len(entry))
        items.append((dk + b"\x00" + seq_pack(nxt), entry))
        d = dstrs[i]
        wid = sessions.get(d, missing)
        if wid is missing:
            wid = worker_of(d)
        pushes.append(Push(d, nxt, entry, wid))
        n += 1
    return n


def ack_walk(cursor, prefix: bytes, end: bytes, limit: int, receipts: bool) -> tuple:
    """Delete one device's queue entries (keys ``prefix`` + seq) up to key ``end``,
    at most ``limit`` of them (negative: no limit), with ``cursor`` on its
    table.  Returns (deleted, the bytes of the ones not listed, listed, done):
    ``listed`` holds in order the values the caller still has to act on (a
    group reference or payload entry: its body's count; with ``receipts`` a
    message entry not flagged sync: its delivered receipt), and ``done`` is
    false when ``limit`` stopped it before ``end``."""
    listed = []
    deleted = nbytes = 0
    if not cursor.set_range(prefix):
        return 0, 0, listed, True
    item, delete = cursor.item, cursor.delete
    n = len(prefix)
    while True:
        key, value = item()
        if key[:n] != prefix or key > end:
            return deleted, nbytes, listed, True
        if deleted == limit:
            return deleted, nbytes, listed, False
        deleted += 1
        kind = value[0]
        if kind == _GREF_KIND or kind == _GPAYLOAD_KIND:
            listed.append(value)
        else:
            if kind == _MESSAGE_KIND and receipts and not value[9] & _SYNC_FLAG:
                listed.append(value)
            nbytes += len(value)
        if not delete():
            return deleted, nbytes, listed, True


_PLAIN_FAN = 1  # an entry's flags bit 0 (server/queues.py FAN)


def _plain_one(s, get, put, cur, prev, fan_db, devkeys: dict, blockers: dict, qstate: dict,
               states: dict, load, items: list, pushes: list, sessions: dict, missing,
               worker_of, entry_fn, now: int, max_count: int, max_bytes: int, s_count: int,
               s_bytes: int, chat=None):  # fmt: skip
    """store_plain's one send: True if done here (stored, or refused by ``chat``),
    else what the fallback is to be given as its dedup record (``missing``: not
    looked up yet; nothing written for it)."""
    if s.cls != "message":
        return missing
    entry, to, me = s.entry, s.to, s.device
    if (type(entry) is not bytes or len(entry) < 10 or type(to) is not str or not to
            or to[0] == "g" or ":" in to or type(me) is not str):  # fmt: skip
        return missing
    sender = me.partition(":")[0]
    typ = s.type
    if sender == to or typ == "retry":
        return missing
    dkey, digest = s.dkey, s.digest
    if type(digest) is not bytes:
        return missing
    got = get(dkey, db=cur) or get(dkey, db=prev)
    if got is not None:  # a retry or a reused id
        return got
    tkeys = devkeys.get(to, missing)
    if tkeys is missing or tkeys is None:
        return got
    rk, rs = tkeys
    if not rs or blockers.get(to) is not False or blockers.get(sender) is not False:
        return got
    skeys = devkeys.get(sender, missing)
    if skeys is missing:
        return got
    mk = ms = None
    nsync = 0
    if skeys is not None:
        mk, ms = skeys
        nsync = len(ms) - (me in ms)
    if qstate:  # (states as lists: _store_one folds them)
        return got
    mid = s.id
    sync_entry = entry_fn(0, now, _SYNC_FLAG, me, mid, typ, s.body, to) if nsync else None
    skip = me.encode()
    if copies_room(rk, entry, None, states, load, max_count, max_bytes, s_count, s_bytes,
                   len(rk)) is not None:  # fmt: skip
        return got
    if nsync and copies_room(mk, sync_entry, skip, states, load, max_count, max_bytes,
                             0, 0, 0) is not None:  # fmt: skip
        return got
    if chat is not None and not chat(s, sender, to):  # the new-chats limit (s.error set)
        return True
    # stored from here on
    if len(rs) > 1:
        fan = bytearray(entry)
        fan[9] |= _PLAIN_FAN
        entry = bytes(fan)
        put(f"{me}\x00{mid}\x00{to}".encode(), b"", db=fan_db)
    copies(rk, rs, entry, None, states, load, items, pushes, sessions, missing, worker_of)
    if nsync:
        copies(mk, ms, sync_entry, skip, states, load, items, pushes, sessions, missing,
               worker_of)  # fmt: skip
    put(dkey, now.to_bytes(8, "big") + digest, db=cur)
    s.t = now
    return True


def store_plain(sends: list, fallback, w, now: int, cur, prev, get, put, fan_db,
                devkeys: dict, blockers: dict, qstate: dict, states: dict, load,
                items: list, pushes: list, sessions: dict, missing, worker_of, entry_fn,
                max_count: int, max_bytes: int, s_count: int, s_bytes: int,
                chat=None) -> int:  # fmt: skip
    """Store a group commit's ``sends`` in order (server/queues.py ``Queues.commit``):
    a plain 1:1 message (one body, to a user who is neither the sender nor a
    group, not a retry receipt's type, new in both dedup generations ``cur`` and
    ``prev``, both users' device keys in ``devkeys``, neither in ``blockers`` as
    anything but False, no queue state held as a list in ``qstate``, room in
    every queue it goes to, the stranger limits ``s_count``/``s_bytes`` included)
    is stored here as ``Queues._store_one`` stores it: the recipient's copies (with
    the fan flag and a ``fan_db`` record for several devices), the sender's other
    devices' sync copies (``entry_fn``: Codec.queue_entry), the dedup record
    (``put``), ``t``.  Every other send, before anything is written for it, is
    ``fallback(w, s, now, cur, prev, raw)``, ``raw`` its dedup record if it was
    looked up (else ``missing``).  ``get``/``put`` are the transaction's;
    ``states`` … ``worker_of`` are as for ``copies``.  With the new-chats limit
    on, ``chat(s, sender, to)`` is its check (``Queues._chat_allowed``), made
    where ``_store_one`` makes it, after the room checks: False means refused
    (it set ``s.error``), nothing stored.  Returns how many were done here."""
    done = 0
    for s in sends:
        got = _plain_one(s, get, put, cur, prev, fan_db, devkeys, blockers, qstate, states, load,
                         items, pushes, sessions, missing, worker_of, entry_fn, now, max_count,
                         max_bytes, s_count, s_bytes, chat)  # fmt: skip
        if got is True:
            done += 1
        else:
            fallback(w, s, now, cur, prev, got)
    return done


def delivered(values: list, w, user: str, now: int, fallback, delete, fan_db, devkeys: dict,
              devkeys_of, states: dict, load, items: list, pushes: list, sessions: dict,
              missing, worker_of, entry_fn) -> int:  # fmt: skip
    """The delivered receipts of a device ack (server/queues.py ``Queues._ack``):
    for each message entry of ``values`` (acked by a device of ``user``), unless
    it has the fan flag and another device of ``user`` acked it first (its
    record in ``fan_db`` is gone: ``delete``), one receipt entry (``entry_fn``:
    Codec.queue_entry) for every device of the message's sender (``devkeys``,
    else ``devkeys_of``), queued as ``copies`` does.  An entry too short for its
    origin and id is ``fallback(w, value, user, now)`` (``Queues._delivered``).
    Returns how many receipts were queued."""
    done = 0
    for value in values:
        vlen = len(value)
        if type(value) is not bytes or vlen < 12 or 12 + value[10] > vlen:
            fallback(w, value, user, now)
            continue
        olen = value[10]
        mlen = value[11 + olen]
        if 12 + olen + mlen > vlen:
            fallback(w, value, user, now)
            continue
        origin = value[11 : 11 + olen].decode()
        mid = value[12 + olen : 12 + olen + mlen].decode()
        if value[9] & _PLAIN_FAN and not delete(f"{origin}\x00{mid}\x00{user}".encode(),
                                                db=fan_db):  # fmt: skip
            continue  # another device of this user acked first
        origin = origin.partition(":")[0]
        keys = devkeys.get(origin, missing)
        if keys is missing:
            keys = devkeys_of(origin)
        if not keys or not keys[0]:
            continue  # the sender's account is gone
        copies(keys[0], keys[1], entry_fn(1, now, 0, user, mid, "delivered"), None, states, load,
               items, pushes, sessions, missing, worker_of)  # fmt: skip
        done += 1
    return done


def acks(acks: dict, w, now: int, limit: int, receipts: bool, rest, cursor, qstate: dict,
         states: dict, load, fold, fallback, delete, fan_db, devkeys: dict, devkeys_of,
         pushes: list, sessions: dict, missing, worker_of, entry_fn) -> list:  # fmt: skip
    """A group commit's device acks ({device: seq}, server/queues.py
    ``Queues._ack`` for each, in order) with ``cursor`` on the queue table: the
    commit's queued entries (``w.items``) put first, then ``ack_walk`` (at most
    ``limit`` entries; negative: no limit), the device's queue state (in
    ``states``, else ``load``; ``fold`` first when ``qstate`` holds states as
    lists) less what it deleted, and ``delivered`` for the message entries it
    listed.  A walk that listed a group entry, or a state that is not as
    stored, goes on as ``rest(w, dk, user, deleted, nbytes, listed, now)``
    (``Queues._ack_rest``).  Returns [(device, seq)] of the acks not fully applied."""
    unfinished = []
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
        prefix = dk + b"\x00"
        deleted, nbytes, listed, done = ack_walk(cursor, prefix,
                                                 prefix + upto.to_bytes(8, "big"), limit,
                                                 receipts)  # fmt: skip
        if not done:
            unfinished.append((device, upto))
        if not deleted:
            continue
        odd = any(v[0] == _GREF_KIND or v[0] == _GPAYLOAD_KIND for v in listed)
        if not odd:
            if qstate:
                fold()
            st = states.get(dk)
            if st is None:
                st = load(dk)
            if st is None:
                nxt, count, size = 1, 0, 0
            elif type(st) is bytes and len(st) == 24:
                nxt, count, size = _QSTATE.unpack(st)
            else:
                odd = True
        if not odd:
            if count >> 62 or size >> 62 or nbytes >> 62:
                odd = True
            else:
                count -= deleted
                size -= nbytes
                odd = count > 0 and size < 0  # (rest raises as _ack would)
        if odd:
            rest(w, dk, user, deleted, nbytes, listed, now)
            continue
        states[dk] = _QSTATE.pack(nxt, count, size) if count > 0 else _QSTATE.pack(nxt, 0, 0)
        if listed:
            delivered(listed, w, user, now, fallback, delete, fan_db, devkeys, devkeys_of,
                      states, load, w.items, pushes, sessions, missing, worker_of, entry_fn)  # fmt: skip
    return unfinished
