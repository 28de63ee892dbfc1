"""Protocol events: what a Connection hands the application and what it sends.

One class per node of the core protocol (docs/PROTOCOL.md), plus ``Hello``
(the peer's preamble) and ``ConnectionClosed``.  Each class knows its tag,
which role sends it, how to build its node and how to read one back.
Reading validates every attribute (ids, numbers, addresses) and raises a
non-fatal ``RemoteProtocolError`` (BAD_REQUEST, with the request's id) for a
node that is well-formed but wrong, so the receiver can answer and go on.

Sending checks the same rules (h11's rule: what the application builds is
checked when it is sent).  Each class's ``check()`` tests the fields it would
carry, as its ``from_node`` tests the attributes it reads, and raises
``LocalProtocolError`` naming the event and the field: a bug on this side is
caught here, before its frame reaches a peer that would refuse it.
``Connection.send`` runs it.  An event ``from_node`` built has passed the
reader's rules already, so it is not checked again if it is sent on (a
relay, a test): ``from_node`` marks the instance (``_parsed``, a field that
is not an argument and that equality and ``repr`` ignore; a copy made with
``dataclasses.replace`` starts unmarked and is checked like any new event).

The same tag can mean different things by direction: ``message`` from a
client is ``Message`` (it names the recipient), from the server it is
``IncomingMessage`` (it names the sender, the server time and the
per-device sequence).  ``CLIENT_SENT`` and ``SERVER_SENT`` map tags to classes.
One server tag names two events: ``devices`` with a ``seq`` is the queued
``DevicesChanged`` notice, with an ``id`` the ``DeviceList`` answer to a query
(``SERVER_SENT`` holds ``DeviceList``, whose reader tells them apart).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import ClassVar

from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from .node import address_kind, valid_phone

CLIENT = "client"
SERVER = "server"
BOTH = "both"

_ID_RE = re.compile(r"[\x21-\x7e]{1,64}")
_UINT_RE = re.compile(r"0|[1-9][0-9]{0,19}")
MAX_UINT64 = (1 << 64) - 1
SCRAM_MECHANISM = "SCRAM-SHA-256"


_id_match = _ID_RE.fullmatch


def valid_id(s) -> bool:
    """Message and request ids: 1 to 64 printable ASCII bytes (0x21-0x7e)."""
    return isinstance(s, str) and _id_match(s) is not None


def _bad(node, text: str) -> RemoteProtocolError:
    rid = node.attrs.get("id")
    return RemoteProtocolError(
        f"<{node.tag}>: {text}",
        ErrorCode.BAD_REQUEST,
        request_id=rid if valid_id(rid) else None,
    )


def _attr(node, key: str) -> str:
    v = node.attrs.get(key)
    if v is None:
        raise _bad(node, f"missing attribute {key!r}")
    return v


def _id(node, key: str = "id") -> str:
    v = _attr(node, key)
    if not valid_id(v):
        raise _bad(node, f"{key!r} must be 1-64 printable ASCII characters")
    return v


def _uint(node, key: str) -> int:
    v = _attr(node, key)
    if not _UINT_RE.fullmatch(v) or int(v) > MAX_UINT64:
        raise _bad(node, f"{key!r} must be a decimal unsigned integer")
    return int(v)


def _opt_uint(node, key: str) -> int | None:
    return None if node.attrs.get(key) is None else _uint(node, key)


def _phone(node, key: str = "phone") -> str:
    v = _attr(node, key)
    if not valid_phone(v):
        raise _bad(node, f"{key!r} must be an E.164 number: 8-15 digits, no '+'")
    return v


def _address(node, key: str, *kinds: str) -> str:
    v = _attr(node, key)
    if address_kind(v) not in kinds:
        raise _bad(node, f"{key!r} must be a {' or '.join(kinds)} address")
    return v


def _bytes(node, *, size: int | None = None, max_size: int | None = None) -> bytes:
    c = node.content
    if not isinstance(c, (bytes, bytearray, memoryview)):
        raise _bad(node, "content must be bytes")
    c = bytes(c)
    if size is not None and len(c) != size:
        raise _bad(node, f"content must be {size} bytes")
    if max_size is not None and len(c) > max_size:
        raise _bad(node, f"content must be at most {max_size} bytes")
    return c


def _choice(node, key: str, allowed: frozenset) -> str:
    v = _attr(node, key)
    if v not in allowed:
        raise _bad(node, f"{key!r} must be one of {sorted(allowed)}")
    return v


@dataclass(frozen=True, slots=True)
class Event:
    """Base class. ``TAG``: the node tag; ``SENDER``: CLIENT, SERVER or BOTH."""

    #: True on an instance from_node built (see the module docstring).  Not an
    #: argument, not compared, not shown: not part of the event's value.
    _parsed: bool = field(default=False, init=False, repr=False, compare=False)
    TAG: ClassVar[str] = ""
    SENDER: ClassVar[str] = BOTH

    def to_node(self, node_cls):
        raise NotImplementedError

    @classmethod
    def from_node(cls, node):
        raise NotImplementedError

    def check(self) -> None:
        """Raise LocalProtocolError unless every field is one the peer's from_node accepts."""
        raise NotImplementedError


_mark_parsed = Event._parsed.__set__  # type: ignore[attr-defined]


def _read(event):
    """``event``, marked as built by from_node (see the module docstring)."""
    _mark_parsed(event, True)
    return event


# -- the sending side's checks: from_node's rules, on Python values ----------
# Each predicate also checks the Python type, since the codec would encode
# what the reader refuses (True as "True", "5" for a number).


def _wrong(event, name: str, what: str, value) -> LocalProtocolError:
    return LocalProtocolError(
        f"cannot send {type(event).__name__}: {name!r} must be {what}, got {_show(value)}"
    )


def _show(value) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"{type(value).__name__} of {_nbytes(value)} bytes"
    r = repr(value)
    return r if len(r) <= 80 else r[:76] + "..."


def _nbytes(value) -> int | None:
    """The length of opaque content, or None if ``value`` is not bytes-like."""
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, memoryview):
        return value.nbytes
    return None


def _is_uint(v) -> bool:
    # bool is an int whose str() is "True": never a number on the wire
    return (type(v) is int or (isinstance(v, int) and not isinstance(v, bool))) and (
        0 <= v <= MAX_UINT64
    )


def _is_phone(v) -> bool:
    return isinstance(v, str) and valid_phone(v)


def _is_user_value(v) -> bool:
    return isinstance(v, str) and address_kind(v) == "user"


def _is_choice(v, allowed: frozenset) -> bool:
    return isinstance(v, str) and v in allowed


# The helpers below run for every event an application sends, so each is one
# call deep with the common case first (an exact str, int or bytes).

_ID = "1-64 printable ASCII characters"
_UINT = "an int from 0 to 2**64-1"
_PHONE = "an E.164 number: 8-15 digits, no '+'"
_USER = ("user",)
_DEVICE = ("device",)
_USER_OR_GROUP = ("user", "group")
_USER_GROUP_DEVICE = ("user", "group", "device")
_USER_OR_DEVICE = ("user", "device")


def _check_id(event, name: str, v) -> None:
    if not (isinstance(v, str) and _id_match(v) is not None):
        raise _wrong(event, name, _ID, v)


def _check_uint(event, name: str, v) -> None:
    if not (type(v) is int and 0 <= v <= MAX_UINT64) and not _is_uint(v):
        raise _wrong(event, name, _UINT, v)


def _check_address(event, name: str, v, kinds: tuple) -> None:
    if not (isinstance(v, str) and address_kind(v) in kinds):
        raise _wrong(event, name, f"a {' or '.join(kinds)} address", v)


def _check_choice(event, name: str, v, allowed: frozenset) -> None:
    if not (isinstance(v, str) and v in allowed):
        raise _wrong(event, name, f"one of {sorted(allowed)}", v)


def _check_bytes(event, name: str, v, size: int | None = None, max_size: int | None = None):
    n = len(v) if type(v) is bytes else _nbytes(v)
    if n is None:
        raise _wrong(event, name, "bytes", v)
    if size is not None and n != size:
        raise _wrong(event, name, f"{size} bytes", v)
    if max_size is not None and n > max_size:
        raise _wrong(event, name, f"at most {max_size} bytes", v)


def _check_items(event, name: str, v, ok, what: str) -> None:
    if not isinstance(v, (tuple, list)):
        raise _wrong(event, name, "a tuple (or list)", v)
    for i, item in enumerate(v):
        if not ok(item):
            raise _wrong(event, f"{name}[{i}]", what, item)


@dataclass(frozen=True, slots=True)
class _IdOnly(Event):
    """A node whose only attribute is a request ``id`` (subclasses set TAG and SENDER)."""

    id: str

    def to_node(self, N):
        return N(self.TAG, {"id": self.id})

    @classmethod
    def from_node(cls, node):
        return _read(cls(_id(node)))

    def check(self) -> None:
        _check_id(self, "id", self.id)


@dataclass(frozen=True, slots=True)
class _UserRequest(Event):
    """A request ``id`` about user ``to`` (subclasses set TAG)."""

    SENDER: ClassVar[str] = CLIENT
    id: str
    to: str

    def to_node(self, N):
        return N(self.TAG, {"id": self.id, "to": self.to})

    @classmethod
    def from_node(cls, node):
        return _read(cls(_id(node), _address(node, "to", "user")))

    def check(self) -> None:
        _check_id(self, "id", self.id)
        _check_address(self, "to", self.to, _USER)


@dataclass(frozen=True, slots=True)
class Hello(Event):
    """The peer's preamble: its protocol version and dictionary version.

    A client's names the dictionary the connection will use; a server's names
    the newest dictionary it knows.
    """

    protocol: int
    dictionary: int

    def check(self) -> None:
        # never sent with send(): each is one byte of the preamble (wire.preamble)
        for name in ("protocol", "dictionary"):
            v = getattr(self, name)
            if not (_is_uint(v) and v <= 255):
                raise _wrong(self, name, "an int from 0 to 255", v)


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """The peer closed its side (``receive_data(b"")``)."""

    def check(self) -> None:
        pass  # carries nothing (and is never sent)


# -- registration -----------------------------------------------------------


REGISTER_METHODS = frozenset({"sms", "voice"})


@dataclass(frozen=True, slots=True)
class Register(Event):
    """Ask for a one-time code to be sent to ``phone``."""

    TAG: ClassVar[str] = "register"
    SENDER: ClassVar[str] = CLIENT
    id: str
    phone: str
    method: str = "sms"

    def to_node(self, N):
        return N("register", {"id": self.id, "phone": self.phone, "method": self.method})

    @classmethod
    def from_node(cls, node):
        method = node.attrs.get("method", "sms")
        if method not in ("sms", "voice"):
            raise _bad(node, "'method' must be sms or voice")
        return _read(cls(_id(node), _phone(node), method))

    def check(self) -> None:
        _check_id(self, "id", self.id)
        if not _is_phone(self.phone):
            raise _wrong(self, "phone", _PHONE, self.phone)
        _check_choice(self, "method", self.method, REGISTER_METHODS)


@dataclass(frozen=True, slots=True)
class CodeSent(Event):
    """A code was sent; it is valid for ``ttl`` seconds."""

    TAG: ClassVar[str] = "code"
    SENDER: ClassVar[str] = SERVER
    id: str
    ttl: int

    def to_node(self, N):
        return N("code", {"id": self.id, "ttl": str(self.ttl)})

    @classmethod
    def from_node(cls, node):
        return _read(cls(_id(node), _uint(node, "ttl")))

    def check(self) -> None:
        _check_id(self, "id", self.id)
        _check_uint(self, "ttl", self.ttl)


def _is_code(code: str) -> bool:
    return len(code) == 6 and code.isascii() and code.isdigit()


@dataclass(frozen=True, slots=True)
class Verify(Event):
    """Prove the code; content: the device's 32-byte identity public key."""

    TAG: ClassVar[str] = "verify"
    SENDER: ClassVar[str] = CLIENT
    id: str
    phone: str
    code: str
    identity_key: bytes

    def to_node(self, N):
        return N(
            "verify", {"id": self.id, "phone": self.phone, "code": self.code}, self.identity_key
        )

    @classmethod
    def from_node(cls, node):
        code = _attr(node, "code")
        if not _is_code(code):
            raise _bad(node, "'code' must be 6 digits")
        return _read(cls(_id(node), _phone(node), code, _bytes(node, size=32)))

    def check(self) -> None:
        _check_id(self, "id", self.id)
        if not _is_phone(self.phone):
            raise _wrong(self, "phone", _PHONE, self.phone)
        if not (isinstance(self.code, str) and _is_code(self.code)):
            raise _wrong(self, "code", "6 digits", self.code)
        _check_bytes(self, "identity_key", self.identity_key, 32)


@dataclass(frozen=True, slots=True)
class Registered(Event):
    """The account exists; content: the 32-byte device secret (sent only here, once)."""

    TAG: ClassVar[str] = "registered"
    SENDER: ClassVar[str] = SERVER
    id: str
    device: str
    secret: bytes

    def to_node(self, N):
        return N("registered", {"id": self.id, "device": self.device}, self.secret)

    @classmethod
    def from_node(cls, node):
        return _read(cls(_id(node), _address(node, "device", "device"), _bytes(node, size=32)))

    def check(self) -> None:
        _check_id(self, "id", self.id)
        _check_address(self, "device", self.device, _DEVICE)
        _check_bytes(self, "secret", self.secret, 32)


# -- login (SCRAM-SHA-256, RFC 5802 / RFC 7677) -----------------------------


#: Bytes of a SCRAM message (auth, challenge, response, success content).
SCRAM_MAX = 1024


@dataclass(frozen=True, slots=True)
class AuthStart(Event):
    """SCRAM client-first-message; its username is the device address."""

    TAG: ClassVar[str] = "auth"
    SENDER: ClassVar[str] = CLIENT
    data: bytes
    mechanism: str = SCRAM_MECHANISM

    def to_node(self, N):
        return N("auth", {"mech": self.mechanism}, self.data)

    @classmethod
    def from_node(cls, node):
        mech = _attr(node, "mech")
        if mech != SCRAM_MECHANISM:
            raise _bad(node, f"unsupported mechanism; use {SCRAM_MECHANISM}")
        return _read(cls(_bytes(node, max_size=SCRAM_MAX), mech))

    def check(self) -> None:
        _check_bytes(self, "data", self.data, None, SCRAM_MAX)
        if self.mechanism != SCRAM_MECHANISM:
            raise _wrong(self, "mechanism", repr(SCRAM_MECHANISM), self.mechanism)


@dataclass(frozen=True, slots=True)
class AuthChallenge(Event):
    """SCRAM server-first-message (nonce, salt, iterations)."""

    TAG: ClassVar[str] = "challenge"
    SENDER: ClassVar[str] = SERVER
    data: bytes

    def to_node(self, N):
        return N("challenge", {}, self.data)

    @classmethod
    def from_node(cls, node):
        return _read(cls(_bytes(node, max_size=SCRAM_MAX)))

    def check(self) -> None:
        _check_bytes(self, "data", self.data, None, SCRAM_MAX)


@dataclass(frozen=True, slots=True)
class AuthResponse(Event):
    """SCRAM client-final-message (the client's proof)."""

    TAG: ClassVar[str] = "response"
    SENDER: ClassVar[str] = CLIENT
    data: bytes

    def to_node(self, N):
        return N("response", {}, self.data)

    @classmethod
    def from_node(cls, node):
        return _read(cls(_bytes(node, max_size=SCRAM_MAX)))

    def check(self) -> None:
        _check_bytes(self, "data", self.data, None, SCRAM_MAX)


@dataclass(frozen=True, slots=True)
class AuthSuccess(Event):
    """SCRAM server-final-message (the server's signature); ``t``: server time, ms."""

    TAG: ClassVar[str] = "success"
    SENDER: ClassVar[str] = SERVER
    data: bytes
    t: int

    def to_node(self, N):
        return N("success", {"t": str(self.t)}, self.data)

    @classmethod
    def from_node(cls, node):
        return _read(cls(_bytes(node, max_size=SCRAM_MAX), _uint(node, "t")))

    def check(self) -> None:
        _check_bytes(self, "data", self.data, None, SCRAM_MAX)
        _check_uint(self, "t", self.t)


# -- messaging --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message(Event):
    """A client sends an opaque (end-to-end encrypted) body to a user or group,
    or to another device of its own account (``to`` a device address).

    ``payloads``: instead of one ``body`` for every device, one payload per
    device, ((device address, bytes), ...): one for each device of ``to``
    and one for each other device of the sender's account (``body`` is then
    b"").  The server refuses a set that is not exactly the current device
    lists (error 408, ``Error.missing`` / ``Error.extra``).  To a group,
    ``payloads`` go with the ``body`` (one ciphertext for every member): each
    named device also gets its payload (sender-key distribution); the node's
    content is then a ``<body>`` child and the ``<payload>`` children."""

    TAG: ClassVar[str] = "message"
    SENDER: ClassVar[str] = CLIENT
    to: str
    id: str
    type: str
    body: bytes
    payloads: tuple = ()

    def to_node(self, N):
        attrs = {"to": self.to, "id": self.id, "type": self.type}
        if self.payloads:
            children = [N("payload", {"device": d}, b) for d, b in self.payloads]
            if address_kind(self.to) == "group":
                children.insert(0, N("body", None, self.body))
            return N("message", attrs, children)
        return N("message", attrs, self.body)

    @classmethod
    def from_node(cls, node):
        t = _attr(node, "type")
        if not valid_id(t):
            raise _bad(node, "'type' must be 1-64 printable ASCII characters")
        to = _address(node, "to", "user", "group", "device")
        if isinstance(node.content, list):
            kind = address_kind(to)
            if kind == "group":
                c = node.content
                if not c or c[0].tag != "body" or c[0].attrs:
                    raise _bad(node, "a group message's children are <body> and then <payload>s")
                body = _bytes(c[0])
                return _read(cls(to, _id(node), t, body, _payloads(node, 1)))
            if kind != "user":
                raise _bad(node, "per-device payloads go to a user or a group")
            return _read(cls(to, _id(node), t, b"", _payloads(node)))
        return _read(cls(to, _id(node), t, _bytes(node)))

    def check(self) -> None:
        _check_address(self, "to", self.to, _USER_GROUP_DEVICE)
        _check_id(self, "id", self.id)
        _check_id(self, "type", self.type)
        _check_bytes(self, "body", self.body)
        if self.payloads:
            if not isinstance(self.payloads, tuple):
                raise _wrong(self, "payloads", "a tuple of (device, bytes)", self.payloads)
            group = address_kind(self.to) == "group"
            if address_kind(self.to) != "user" and not group:
                raise _wrong(self, "to", "a user or group address (per-device payloads)",
                             self.to)  # fmt: skip
            if _nbytes(self.body) and not group:
                raise _wrong(self, "body", "empty beside payloads", self.body)
            seen = set()
            for i, item in enumerate(self.payloads):
                if not (isinstance(item, tuple) and len(item) == 2):
                    raise _wrong(self, f"payloads[{i}]", "a (device, bytes) pair", item)
                _check_address(self, f"payloads[{i}][0]", item[0], _DEVICE)
                _check_bytes(self, f"payloads[{i}][1]", item[1])
                if item[0] in seen:
                    raise _wrong(self, f"payloads[{i}][0]", "a device named once", item[0])
                seen.add(item[0])


def _payloads(node, start: int = 0) -> tuple:
    """The (device, bytes) pairs of a message's ``payload`` children (from ``start``)."""
    out = []
    seen = set()
    for child in node.content[start:]:
        if child.tag != "payload":
            raise _bad(node, "content must be bytes or a list of <payload> nodes")
        d = child.attrs.get("device")
        if d is None or address_kind(d) != "device":
            raise _bad(node, "<payload device=...> must be a device address")
        if d in seen:
            raise _bad(node, f"two payloads for {d}")
        seen.add(d)
        c = child.content
        if not isinstance(c, (bytes, bytearray, memoryview)):
            raise _bad(node, "<payload> content must be bytes")
        out.append((d, bytes(c)))
    if not out:
        raise _bad(node, "a list of payloads must not be empty")
    return tuple(out)


@dataclass(frozen=True, slots=True)
class IncomingMessage(Event):
    """The server delivers a message to one device, from its queue.

    ``sender``: the sending device's address, set by the server from the
    authenticated session.  ``t``: server time (ms) when it was accepted.
    ``seq``: this device's queue sequence, the number the device acknowledges.
    ``to``: None for a message to this device's user; on a copy for the
    sender's own account it names the recipient: the user the message went
    to (a sync copy, sent from another device of this account), or this
    device's address (a device-to-device message).
    """

    TAG: ClassVar[str] = "message"
    SENDER: ClassVar[str] = SERVER
    sender: str
    id: str
    type: str
    t: int
    seq: int
    body: bytes
    to: str | None = None
    group: str | None = None
    #: a group message that named this device: its payload (sender-key distribution)
    payload: bytes | None = None

    def to_node(self, N):
        if self.group is not None:  # from the group; the sending device is the participant
            attrs = {"from": self.group, "participant": self.sender}
        else:
            attrs = {"from": self.sender}
        if self.to is not None:
            attrs["to"] = self.to
        attrs.update(id=self.id, type=self.type, t=str(self.t), seq=str(self.seq))
        if self.payload is not None:
            return N("message", attrs, [N("body", None, self.body),
                                        N("payload", None, self.payload)])  # fmt: skip
        return N("message", attrs, self.body)

    @classmethod
    def from_node(cls, node):
        to = node.attrs.get("to")
        group = None
        if node.attrs.get("participant") is not None:
            group = _address(node, "from", "group")
            sender = _address(node, "participant", "device")
        else:
            sender = _address(node, "from", "device")
        c = node.content
        payload = None
        if group is not None and isinstance(c, list):
            if len(c) != 2 or c[0].tag != "body" or c[1].tag != "payload":
                raise _bad(node, "a group message's children are <body> and <payload>")
            body, payload = _bytes(c[0]), _bytes(c[1])
        else:
            body = _bytes(node)
        return _read(
            cls(
                sender,
                _id(node),
                _attr(node, "type"),
                _uint(node, "t"),
                _uint(node, "seq"),
                body,
                None if to is None else _address(node, "to", "user", "device"),
                group,
                payload,
            )
        )

    def check(self) -> None:
        _check_address(self, "sender", self.sender, _DEVICE)
        if self.group is not None:
            _check_address(self, "group", self.group, ("group",))
        if self.payload is not None:
            if self.group is None:
                raise _wrong(self, "payload", "None but in a group message", self.payload)
            _check_bytes(self, "payload", self.payload)
        _check_id(self, "id", self.id)
        if not isinstance(self.type, str):  # any text: the reader takes what it is given
            raise _wrong(self, "type", "a str", self.type)
        _check_uint(self, "t", self.t)
        _check_uint(self, "seq", self.seq)
        _check_bytes(self, "body", self.body)
        if self.to is not None:
            _check_address(self, "to", self.to, _USER_OR_DEVICE)


ACK_CLASSES = frozenset(
    {"message", "receipt", "logout", "delete", "block", "unblock", "link", "unlink", "push"}
)


@dataclass(frozen=True, slots=True)
class ServerAck(Event):
    """One tick: the server holds the message (or receipt) ``id`` durably.

    ``t`` is the server time (ms) it was accepted, the same ``t`` its
    recipients see.  With ``cls`` "logout" or "delete" it confirms a
    ``Logout`` or ``DeleteAccount`` request instead; the server then closes.
    With ``cls`` "link" it confirms a ``Link`` and ``device`` names the new
    device; with "unlink" an ``Unlink``.
    """

    TAG: ClassVar[str] = "ack"
    SENDER: ClassVar[str] = SERVER
    id: str
    t: int
    cls: str = "message"
    device: str | None = None
    #: a group message: the member users whose queues could not take it (stored
    #: for every other member device; PROTOCOL.md section 9)
    failed: tuple[str, ...] = ()

    def to_node(self, N):
        if self.device is None:
            attrs = {"class": self.cls, "id": self.id, "t": str(self.t)}
        else:
            attrs = {"class": self.cls, "id": self.id, "device": self.device, "t": str(self.t)}
        if self.failed:
            return N("ack", attrs, [N("failed", {"user": u}) for u in self.failed])
        return N("ack", attrs)

    @classmethod
    def from_node(cls, node):
        device = None if node.attrs.get("device") is None else _address(node, "device", "device")
        failed = ()
        if isinstance(node.content, list):  # other children: a later version's, ignored
            failed = tuple(_address(c, "user", "user") for c in node.content if c.tag == "failed")
        return _read(cls(_id(node), _uint(node, "t"), _choice(node, "class", ACK_CLASSES), device,
                         failed))  # fmt: skip

    def check(self) -> None:
        # One per message the server accepts: the usual case is one test.
        t, c, i = self.t, self.cls, self.id
        if type(t) is int and 0 <= t <= MAX_UINT64 and type(c) is str and c in ACK_CLASSES:
            if (type(i) is str and _id_match(i) is not None and self.device is None
                    and not self.failed):  # fmt: skip
                return
        _check_items(self, "failed", self.failed, _is_user_value, "a user address")
        if not valid_id(self.id):
            raise _wrong(self, "id", _ID, self.id)
        if not _is_uint(self.t):
            raise _wrong(self, "t", _UINT, self.t)
        if not _is_choice(self.cls, ACK_CLASSES):
            raise _wrong(self, "cls", f"one of {sorted(ACK_CLASSES)}", self.cls)
        if self.device is not None:
            _check_address(self, "device", self.device, _DEVICE)


@dataclass(frozen=True, slots=True)
class DeviceAck(Event):
    """The device holds everything in its queue up to and including ``seq``."""

    TAG: ClassVar[str] = "ack"
    SENDER: ClassVar[str] = CLIENT
    seq: int

    def to_node(self, N):
        return N("ack", {"seq": str(self.seq)})

    @classmethod
    def from_node(cls, node):
        return _read(cls(_uint(node, "seq")))

    def check(self) -> None:
        _check_uint(self, "seq", self.seq)


RECEIPT_TYPES = frozenset({"delivered", "read", "played", "retry"})
#: what a client may send (delivered receipts are the server's).  "retry": this
#: device could not decrypt message ``id``; the sender's device should start a
#: new session and send it again (a new message, a new id).  It carries no
#: payload and is delivered ``from`` the failing device's address.
CLIENT_RECEIPT_TYPES = frozenset({"read", "played", "retry"})


@dataclass(frozen=True, slots=True)
class Receipt(Event):
    """A client tells the sender of message ``id`` it was read (or played).

    In a group: ``to`` is the group and ``participant`` the user who sent the
    message (read and played only)."""

    TAG: ClassVar[str] = "receipt"
    SENDER: ClassVar[str] = CLIENT
    to: str
    id: str
    type: str = "read"
    participant: str | None = None

    def to_node(self, N):
        if self.participant is not None:
            return N("receipt", {"to": self.to, "participant": self.participant, "id": self.id,
                                 "type": self.type})  # fmt: skip
        return N("receipt", {"to": self.to, "id": self.id, "type": self.type})

    @classmethod
    def from_node(cls, node):
        typ = _choice(node, "type", CLIENT_RECEIPT_TYPES)
        if node.attrs.get("participant") is not None:
            if typ == "retry":
                raise _bad(node, "a group's receipt is read or played")
            return _read(cls(_address(node, "to", "group"), _id(node), typ,
                             _address(node, "participant", "user")))  # fmt: skip
        return _read(cls(_address(node, "to", "user"), _id(node), typ))

    def check(self) -> None:
        if self.participant is None:
            _check_address(self, "to", self.to, _USER)
        else:
            _check_address(self, "to", self.to, ("group",))
            _check_address(self, "participant", self.participant, _USER)
        _check_id(self, "id", self.id)
        _check_choice(self, "type", self.type, CLIENT_RECEIPT_TYPES)
        if self.participant is not None and self.type == "retry":
            raise _wrong(self, "type", "read or played (a group's receipt)", self.type)


@dataclass(frozen=True, slots=True)
class IncomingReceipt(Event):
    """Two ticks (delivered) or blue ticks (read) for message ``id``, from user ``sender``.

    Queued and acknowledged like a message: ``seq`` is in the same per-device
    sequence.  ``to``: None, except on a read sync copy: another device of
    this account read a message of user ``to`` (``sender`` is this user).
    A ``retry`` receipt's ``sender`` is the device address that failed to decrypt.
    A group's receipts for one of this account's messages to it: ``sender`` is
    the group and ``members`` the member users it is about (the receipts of
    one commit, coalesced).
    """

    TAG: ClassVar[str] = "receipt"
    SENDER: ClassVar[str] = SERVER
    sender: str
    id: str
    type: str
    t: int
    seq: int
    to: str | None = None
    members: tuple[str, ...] = ()

    def to_node(self, N):
        attrs = {"from": self.sender}
        if self.to is not None:
            attrs["to"] = self.to
        attrs.update(id=self.id, type=self.type, t=str(self.t), seq=str(self.seq))
        if self.members:
            return N("receipt", attrs, [N("member", {"user": u}) for u in self.members])
        return N("receipt", attrs)

    @classmethod
    def from_node(cls, node):
        to = node.attrs.get("to")
        typ = _choice(node, "type", RECEIPT_TYPES)
        frm = node.attrs.get("from")
        if frm is not None and address_kind(frm) == "group":  # a group's, coalesced
            if typ == "retry" or to is not None:
                raise _bad(node, "a group's receipt is delivered, read or played, with no 'to'")
            return _read(cls(_address(node, "from", "group"), _id(node), typ, _uint(node, "t"),
                             _uint(node, "seq"), None, _group_members(node)))  # fmt: skip
        return _read(
            cls(
                _address(node, "from", *(_DEVICE if typ == "retry" else _USER)),
                _id(node),
                typ,
                _uint(node, "t"),
                _uint(node, "seq"),
                None if to is None else _address(node, "to", "user"),
            )
        )

    def check(self) -> None:
        _check_choice(self, "type", self.type, RECEIPT_TYPES)
        if self.members or (isinstance(self.sender, str) and address_kind(self.sender) == "group"):
            _check_address(self, "sender", self.sender, ("group",))
            if self.type == "retry":
                raise _wrong(self, "type", "delivered, read or played (a group's)", self.type)
            if self.to is not None:
                raise _wrong(self, "to", "None (a group's receipt)", self.to)
            _check_items(self, "members", self.members, _is_user_value, "a user address")
        else:
            _check_address(self, "sender", self.sender,
                           _DEVICE if self.type == "retry" else _USER)  # fmt: skip
        _check_id(self, "id", self.id)
        _check_uint(self, "t", self.t)
        _check_uint(self, "seq", self.seq)
        if self.to is not None:
            _check_address(self, "to", self.to, _USER)


PRESENCE_TYPES = frozenset({"available", "unavailable"})
PRESENCE_REQUESTS = frozenset({"available", "unavailable", "subscribe", "unsubscribe"})


@dataclass(frozen=True, slots=True)
class Presence(Event):
    """A device marks itself available or unavailable, or (with ``to``) subscribes
    to or unsubscribes from the presence of user ``to``."""

    TAG: ClassVar[str] = "presence"
    SENDER: ClassVar[str] = CLIENT
    type: str
    to: str | None = None

    def to_node(self, N):
        if self.to is None:
            return N("presence", {"type": self.type})
        return N("presence", {"type": self.type, "to": self.to})

    @classmethod
    def from_node(cls, node):
        typ = _choice(node, "type", PRESENCE_REQUESTS)
        if typ in PRESENCE_TYPES:
            return _read(cls(typ))
        return _read(cls(typ, _address(node, "to", "user")))

    def check(self) -> None:
        _check_choice(self, "type", self.type, PRESENCE_REQUESTS)
        if self.type not in PRESENCE_TYPES:
            _check_address(self, "to", self.to, _USER)
        elif self.to is not None:  # the reader would drop it: a bug, not a request
            raise _wrong(self, "to", f"None with type {self.type!r}", self.to)


@dataclass(frozen=True, slots=True)
class PresenceUpdate(Event):
    """User ``sender`` is now available or unavailable; ``last``: last seen, ms (if shared)."""

    TAG: ClassVar[str] = "presence"
    SENDER: ClassVar[str] = SERVER
    sender: str
    type: str
    last: int | None = None

    def to_node(self, N):
        attrs = {"from": self.sender, "type": self.type}
        if self.last is not None:
            attrs["last"] = str(self.last)
        return N("presence", attrs)

    @classmethod
    def from_node(cls, node):
        return _read(
            cls(
                _address(node, "from", "user"),
                _choice(node, "type", PRESENCE_TYPES),
                _opt_uint(node, "last"),
            )
        )

    def check(self) -> None:
        _check_address(self, "sender", self.sender, _USER)
        _check_choice(self, "type", self.type, PRESENCE_TYPES)
        if self.last is not None:
            _check_uint(self, "last", self.last)


CHAT_STATES = frozenset({"composing", "paused", "recording"})


@dataclass(frozen=True, slots=True)
class ChatState(Event):
    """Typing indicator for user ``to``: never stored, never acknowledged."""

    TAG: ClassVar[str] = "chatstate"
    SENDER: ClassVar[str] = CLIENT
    to: str
    type: str = "composing"

    def to_node(self, N):
        return N("chatstate", {"to": self.to, "type": self.type})

    @classmethod
    def from_node(cls, node):
        return _read(cls(_address(node, "to", "user"), _choice(node, "type", CHAT_STATES)))

    def check(self) -> None:
        _check_address(self, "to", self.to, _USER)
        _check_choice(self, "type", self.type, CHAT_STATES)


@dataclass(frozen=True, slots=True)
class IncomingChatState(Event):
    """User ``sender`` is typing (composing), stopped (paused) or recording audio."""

    TAG: ClassVar[str] = "chatstate"
    SENDER: ClassVar[str] = SERVER
    sender: str
    type: str

    def to_node(self, N):
        return N("chatstate", {"from": self.sender, "type": self.type})

    @classmethod
    def from_node(cls, node):
        return _read(cls(_address(node, "from", "user"), _choice(node, "type", CHAT_STATES)))

    def check(self) -> None:
        _check_address(self, "sender", self.sender, _USER)
        _check_choice(self, "type", self.type, CHAT_STATES)


PRIVACY_VALUES = frozenset({"everyone", "contacts", "nobody"})


@dataclass(frozen=True, slots=True)
class Privacy(Event):
    """Read (no settings given) or change who sees this user's last seen and online
    status, and who may add this user to a group (``groupadd``)."""

    TAG: ClassVar[str] = "privacy"
    SENDER: ClassVar[str] = CLIENT
    id: str
    last: str | None = None
    online: str | None = None
    groupadd: str | None = None

    def to_node(self, N):
        attrs = {"id": self.id}
        if self.last is not None:
            attrs["last"] = self.last
        if self.online is not None:
            attrs["online"] = self.online
        if self.groupadd is not None:
            attrs["groupadd"] = self.groupadd
        return N("privacy", attrs)

    @classmethod
    def from_node(cls, node):
        rid = _id(node)
        vals = []
        for key in ("last", "online", "groupadd"):
            vals.append(None if node.attrs.get(key) is None else _choice(node, key, PRIVACY_VALUES))
        return _read(cls(rid, *vals))

    def check(self) -> None:
        _check_id(self, "id", self.id)
        for name in ("last", "online", "groupadd"):
            if getattr(self, name) is not None:
                _check_choice(self, name, getattr(self, name), PRIVACY_VALUES)


@dataclass(frozen=True, slots=True)
class PrivacySettings(Event):
    """The user's privacy settings, in answer to ``Privacy`` (after any change)."""

    TAG: ClassVar[str] = "privacy"
    SENDER: ClassVar[str] = SERVER
    id: str
    last: str
    online: str
    groupadd: str = "everyone"

    def to_node(self, N):
        return N("privacy", {"id": self.id, "last": self.last, "online": self.online,
                             "groupadd": self.groupadd})  # fmt: skip

    @classmethod
    def from_node(cls, node):
        groupadd = "everyone"  # a server from before groups
        if node.attrs.get("groupadd") is not None:
            groupadd = _choice(node, "groupadd", PRIVACY_VALUES)
        return _read(
            cls(
                _id(node),
                _choice(node, "last", PRIVACY_VALUES),
                _choice(node, "online", PRIVACY_VALUES),
                groupadd,
            )
        )

    def check(self) -> None:
        _check_id(self, "id", self.id)
        _check_choice(self, "last", self.last, PRIVACY_VALUES)
        _check_choice(self, "online", self.online, PRIVACY_VALUES)
        _check_choice(self, "groupadd", self.groupadd, PRIVACY_VALUES)


def _items(node, key: str, check, what: str) -> tuple[str, ...]:
    """The ``key`` attribute of each ``item`` child (an empty content list is fine)."""
    c = node.content
    if c is None:
        return ()
    if not isinstance(c, list):
        raise _bad(node, "content must be a list of <item> nodes")
    out = []
    for child in c:
        if child.tag != "item" or child.content is not None:
            raise _bad(node, "content must be a list of <item> nodes")
        v = child.attrs.get(key)
        if v is None or not check(v):
            raise _bad(node, f"<item {key}=...> must be {what}, got {v!r}")
        out.append(v)
    return tuple(out)


def _item_nodes(N, key: str, values) -> list:
    return [N("item", {key: v}) for v in values]


def _is_user(v: str) -> bool:
    return address_kind(v) == "user"


DISCOVER_TYPES = frozenset({"full", "add", "remove"})


@dataclass(frozen=True, slots=True)
class Discover(Event):
    """Contact discovery: which of these phone numbers are pigeon users?

    ``type``: "full" (these are the whole address book: the contact set
    becomes the registered ones among them), "add" (add the registered ones)
    or "remove" (take these numbers out of the contact set; nothing is looked up).
    """

    TAG: ClassVar[str] = "discover"
    SENDER: ClassVar[str] = CLIENT
    id: str
    type: str
    phones: tuple[str, ...]

    def to_node(self, N):
        return N(
            "discover", {"id": self.id, "type": self.type}, _item_nodes(N, "phone", self.phones)
        )

    @classmethod
    def from_node(cls, node):
        return _read(
            cls(
                _id(node),
                _choice(node, "type", DISCOVER_TYPES),
                _items(node, "phone", valid_phone, "an E.164 number (8-15 digits, no '+')"),
            )
        )

    def check(self) -> None:
        _check_id(self, "id", self.id)
        _check_choice(self, "type", self.type, DISCOVER_TYPES)
        _check_items(self, "phones", self.phones, _is_phone, _PHONE)


@dataclass(frozen=True, slots=True)
class DiscoverResult(Event):
    """The registered users among the numbers asked (now in the contact set);
    ``limit``: how many more numbers may be looked up in the current window."""

    TAG: ClassVar[str] = "discover"
    SENDER: ClassVar[str] = SERVER
    id: str
    users: tuple[str, ...]
    limit: int

    def to_node(self, N):
        return N(
            "discover",
            {"id": self.id, "limit": str(self.limit)},
            _item_nodes(N, "user", self.users),
        )

    @classmethod
    def from_node(cls, node):
        return _read(cls(_id(node), _items(node, "user", _is_user, "a user"), _uint(node, "limit")))

    def check(self) -> None:
        _check_id(self, "id", self.id)
        _check_items(self, "users", self.users, _is_user_value, "a user address")
        _check_uint(self, "limit", self.limit)


@dataclass(frozen=True, slots=True)
class Block(_UserRequest):
    """Block user ``to``: their messages are acked to them and dropped, they see no presence."""

    TAG: ClassVar[str] = "block"


@dataclass(frozen=True, slots=True)
class Unblock(_UserRequest):
    """Unblock user ``to``."""

    TAG: ClassVar[str] = "unblock"


@dataclass(frozen=True, slots=True)
class BlocklistQuery(_IdOnly):
    """Ask for the users this user blocks."""

    TAG: ClassVar[str] = "blocklist"
    SENDER: ClassVar[str] = CLIENT


@dataclass(frozen=True, slots=True)
class Blocklist(Event):
    """The users this user blocks, in the order they were blocked."""

    TAG: ClassVar[str] = "blocklist"
    SENDER: ClassVar[str] = SERVER
    id: str
    users: tuple[str, ...]

    def to_node(self, N):
        return N("blocklist", {"id": self.id}, _item_nodes(N, "user", self.users))

    @classmethod
    def from_node(cls, node):
        return _read(cls(_id(node), _items(node, "user", _is_user, "a user")))

    def check(self) -> None:
        _check_id(self, "id", self.id)
        _check_items(self, "users", self.users, _is_user_value, "a user address")


# -- leaving ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Logout(_IdOnly):
    """This device removes itself: its login secret, keys and queue are deleted.

    The server answers ``ack`` with class "logout" and closes the connection;
    the device must register again to come back.
    """

    TAG: ClassVar[str] = "logout"
    SENDER: ClassVar[str] = CLIENT


_DELETE_TYPES = frozenset({"account"})


@dataclass(frozen=True, slots=True)
class DeleteAccount(Event):
    """Delete the whole account: every device, queue and key of this user.

    The server answers ``ack`` with class "delete", closes this connection
    and revokes the user's other devices (error 304).
    """

    TAG: ClassVar[str] = "delete"
    SENDER: ClassVar[str] = CLIENT
    id: str

    def to_node(self, N):
        return N("delete", {"id": self.id, "type": "account"})

    @classmethod
    def from_node(cls, node):
        _choice(node, "type", _DELETE_TYPES)
        return _read(cls(_id(node)))

    def check(self) -> None:
        _check_id(self, "id", self.id)


# -- either side --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Error(Event):
    """An error with a stable ``code`` (ErrorCode) and a human-readable ``text``.

    ``id`` names the request it answers, when there is one.  After an error
    whose code is fatal (errors.FATAL_CODES) its sender closes the connection.
    ``missing`` / ``extra``: with 408 (STALE_DEVICES), the devices a message's
    per-device payloads lacked and the ones they named that are not (or no
    longer) devices of the account, as ``<missing device=..>`` and
    ``<extra device=..>`` children.
    """

    TAG: ClassVar[str] = "error"
    SENDER: ClassVar[str] = BOTH
    code: int
    text: str
    id: str | None = None
    missing: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()

    def to_node(self, N):
        attrs = {"code": str(int(self.code)), "text": self.text}
        if self.id is not None:
            attrs["id"] = self.id
        if self.missing or self.extra:
            children = [N("missing", {"device": d}) for d in self.missing]
            children += [N("extra", {"device": d}) for d in self.extra]
            return N("error", attrs, children)
        return N("error", attrs)

    @classmethod
    def from_node(cls, node):
        rid = node.attrs.get("id")
        missing, extra = [], []
        if isinstance(node.content, list):
            for child in node.content:  # other children: a later version's, ignored
                if child.tag in ("missing", "extra"):
                    d = child.attrs.get("device")
                    if d is None or address_kind(d) != "device":
                        raise _bad(node, f"<{child.tag} device=...> must be a device address")
                    (missing if child.tag == "missing" else extra).append(d)
        return _read(
            cls(
                _uint(node, "code"),
                _attr(node, "text"),
                rid if valid_id(rid) else None,
                tuple(missing),
                tuple(extra),
            )
        )

    def check(self) -> None:
        _check_uint(self, "code", self.code)
        if not isinstance(self.text, str):
            raise _wrong(self, "text", "a str", self.text)
        if self.id is not None:  # the reader would drop a bad id: say so here
            _check_id(self, "id", self.id)
        for name in ("missing", "extra"):
            _check_items(self, name, getattr(self, name), _is_device_value, "a device address")


def _is_device_value(v) -> bool:
    return isinstance(v, str) and address_kind(v) == "device"


@dataclass(frozen=True, slots=True)
class Ping(_IdOnly):
    TAG: ClassVar[str] = "ping"
    SENDER: ClassVar[str] = BOTH


@dataclass(frozen=True, slots=True)
class Pong(_IdOnly):
    TAG: ClassVar[str] = "pong"
    SENDER: ClassVar[str] = BOTH


# -- linked devices (issue 15: pairing, linking, device lists, unlink) ----------------

PAIR_TYPES = frozenset({"qr", "code"})
#: the characters of a link code: no 0/O, no 1/I (read aloud, typed on a phone)
LINK_CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
LINK_CODE_LENGTH = 8
MAX_DEVICE_NAME = 64  # bytes of UTF-8
_REF_RE = re.compile(r"[0-9a-f]{32}")
_CODE_SET = frozenset(LINK_CODE_ALPHABET)


def normalize_link_code(text) -> str | None:
    """A link code as sent: ``ABCD-2345``, ``abcd2345``, ``ABCD 2345`` -> ``ABCD2345``;
    None if it is not 8 characters of the alphabet once the dash and spaces are gone."""
    if not isinstance(text, str):
        return None
    code = "".join(text.split()).replace("-", "").upper()
    if len(code) != LINK_CODE_LENGTH or not set(code) <= _CODE_SET:
        return None
    return code


def _is_ref(v) -> bool:
    return isinstance(v, str) and _REF_RE.fullmatch(v) is not None


def _is_link_code(v) -> bool:
    return isinstance(v, str) and len(v) == LINK_CODE_LENGTH and set(v) <= _CODE_SET


def _is_name(v) -> bool:
    return isinstance(v, str) and 0 < len(v.encode()) <= MAX_DEVICE_NAME and v.isprintable()


def _children(node) -> dict:
    """The ``key`` and ``signature`` children of a node: {tag: bytes}."""
    c = node.content
    if c is None:
        return {}
    if not isinstance(c, list):
        raise _bad(node, "content must be <key> and <signature> nodes")
    out = {}
    for child in c:
        size = {"key": 32, "signature": 64}.get(child.tag)
        if size is None or child.tag in out:
            raise _bad(node, "content must be one <key> and at most one <signature>")
        out[child.tag] = _bytes(child, size=size)
    return out


def _key_nodes(N, key, signature) -> list | None:
    out = []
    if key is not None:
        out.append(N("key", {}, key))
    if signature is not None:
        out.append(N("signature", {}, signature))
    return out or None


@dataclass(frozen=True, slots=True)
class Pair(Event):
    """A new (companion) device asks to be linked; content: its 32-byte Ed25519
    identity public key.  ``type`` "qr": the answer is a pairing reference to show
    as a QR code; "code": an 8-character code to type on the primary of ``phone``."""

    TAG: ClassVar[str] = "pair"
    SENDER: ClassVar[str] = CLIENT
    id: str
    type: str
    identity_key: bytes
    phone: str | None = None
    name: str | None = None

    def to_node(self, N):
        attrs = {"id": self.id, "type": self.type}
        if self.phone is not None:
            attrs["phone"] = self.phone
        if self.name is not None:
            attrs["name"] = self.name
        return N("pair", attrs, self.identity_key)

    @classmethod
    def from_node(cls, node):
        rid = _id(node)
        typ = _choice(node, "type", PAIR_TYPES)
        phone = _phone(node) if typ == "code" else None
        if typ == "qr" and node.attrs.get("phone") is not None:
            raise _bad(node, "'phone' goes only with type code")
        name = node.attrs.get("name")
        if name is not None and not _is_name(name):
            raise _bad(node, f"'name' must be 1-{MAX_DEVICE_NAME} bytes of printable text")
        return _read(cls(rid, typ, _bytes(node, size=32), phone, name))

    def check(self) -> None:
        _check_id(self, "id", self.id)
        _check_choice(self, "type", self.type, PAIR_TYPES)
        _check_bytes(self, "identity_key", self.identity_key, 32)
        if self.type == "code" and not _is_phone(self.phone):
            raise _wrong(self, "phone", _PHONE, self.phone)
        if self.type == "qr" and self.phone is not None:
            raise _wrong(self, "phone", "None with type 'qr'", self.phone)
        if self.name is not None and not _is_name(self.name):
            raise _wrong(self, "name", f"1-{MAX_DEVICE_NAME} bytes of printable text", self.name)


@dataclass(frozen=True, slots=True)
class PairCode(Event):
    """The server's answer to ``Pair`` (and each refresh): a pairing ``ref`` (32 hex
    characters, type qr) or a link ``code`` (type code), valid ``ttl`` seconds."""

    TAG: ClassVar[str] = "pair"
    SENDER: ClassVar[str] = SERVER
    id: str
    ttl: int
    ref: str | None = None
    code: str | None = None

    def to_node(self, N):
        attrs = {"id": self.id}
        if self.ref is not None:
            attrs["ref"] = self.ref
        if self.code is not None:
            attrs["code"] = self.code
        attrs["ttl"] = str(self.ttl)
        return N("pair", attrs)

    @classmethod
    def from_node(cls, node):
        ref, code = node.attrs.get("ref"), node.attrs.get("code")
        if (ref is None) == (code is None):
            raise _bad(node, "exactly one of 'ref' and 'code'")
        if ref is not None and not _is_ref(ref):
            raise _bad(node, "'ref' must be 32 lowercase hex characters")
        if code is not None and not _is_link_code(code):
            raise _bad(node, "'code' must be 8 characters of the link code alphabet")
        return _read(cls(_id(node), _uint(node, "ttl"), ref, code))

    def check(self) -> None:
        _check_id(self, "id", self.id)
        _check_uint(self, "ttl", self.ttl)
        if (self.ref is None) == (self.code is None):
            raise _wrong(self, "ref", "set, or code set (exactly one)", self.ref)
        if self.ref is not None and not _is_ref(self.ref):
            raise _wrong(self, "ref", "32 lowercase hex characters", self.ref)
        if self.code is not None and not _is_link_code(self.code):
            raise _wrong(self, "code", "8 characters of the link code alphabet", self.code)


@dataclass(frozen=True, slots=True)
class Link(Event):
    """The primary links a companion: by pairing ``ref`` (with the ``key`` it read
    from the QR code and its ``signature`` over it), or by ``code``: first without
    key and signature (the server answers ``LinkKey``), then with both."""

    TAG: ClassVar[str] = "link"
    SENDER: ClassVar[str] = CLIENT
    id: str
    ref: str | None = None
    code: str | None = None
    key: bytes | None = None
    signature: bytes | None = None

    def to_node(self, N):
        attrs = {"id": self.id}
        if self.ref is not None:
            attrs["ref"] = self.ref
        if self.code is not None:
            attrs["code"] = self.code
        return N("link", attrs, _key_nodes(N, self.key, self.signature))

    @classmethod
    def from_node(cls, node):
        rid = _id(node)
        ref, code = node.attrs.get("ref"), node.attrs.get("code")
        if (ref is None) == (code is None):
            raise _bad(node, "exactly one of 'ref' and 'code'")
        if ref is not None and not _is_ref(ref):
            raise _bad(node, "'ref' must be 32 lowercase hex characters")
        if code is not None:
            code = normalize_link_code(code)
            if code is None:
                raise _bad(node, "'code' must be 8 characters of the link code alphabet")
        kids = _children(node)
        key, sig = kids.get("key"), kids.get("signature")
        if (key is None) != (sig is None) or (ref is not None and key is None):
            raise _bad(node, "<key> and <signature> go together (and are needed with 'ref')")
        return _read(cls(rid, ref, code, key, sig))

    def check(self) -> None:
        _check_id(self, "id", self.id)
        if (self.ref is None) == (self.code is None):
            raise _wrong(self, "ref", "set, or code set (exactly one)", self.ref)
        if self.ref is not None and not _is_ref(self.ref):
            raise _wrong(self, "ref", "32 lowercase hex characters", self.ref)
        if self.code is not None and not _is_link_code(self.code):
            raise _wrong(self, "code", "8 characters of the link code alphabet", self.code)
        if (self.key is None) != (self.signature is None) or (
            self.ref is not None and self.key is None
        ):
            raise _wrong(self, "key", "given with signature (both needed with ref)", self.key)
        if self.key is not None:
            _check_bytes(self, "key", self.key, 32)
            _check_bytes(self, "signature", self.signature, 64)


@dataclass(frozen=True, slots=True)
class LinkKey(Event):
    """The identity key of the companion waiting with link ``code`` (for the primary to sign)."""

    TAG: ClassVar[str] = "link"
    SENDER: ClassVar[str] = SERVER
    id: str
    code: str
    key: bytes

    def to_node(self, N):
        return N("link", {"id": self.id, "code": self.code}, [N("key", {}, self.key)])

    @classmethod
    def from_node(cls, node):
        code = _attr(node, "code")
        if not _is_link_code(code):
            raise _bad(node, "'code' must be 8 characters of the link code alphabet")
        kids = _children(node)
        if set(kids) != {"key"}:
            raise _bad(node, "content must be one <key>")
        return _read(cls(_id(node), code, kids["key"]))

    def check(self) -> None:
        _check_id(self, "id", self.id)
        if not _is_link_code(self.code):
            raise _wrong(self, "code", "8 characters of the link code alphabet", self.code)
        _check_bytes(self, "key", self.key, 32)


@dataclass(frozen=True, slots=True)
class DevicesQuery(Event):
    """Ask for user ``user``'s current devices (ids, identity keys, link signatures)."""

    TAG: ClassVar[str] = "devices"
    SENDER: ClassVar[str] = CLIENT
    id: str
    user: str

    def to_node(self, N):
        return N("devices", {"id": self.id, "user": self.user})

    @classmethod
    def from_node(cls, node):
        if node.attrs.get("user") is None and node.content is not None:
            return DevicesBatchQuery.from_node(node)  # <item user> children: several users
        return _read(cls(_id(node), _address(node, "user", "user")))

    def check(self) -> None:
        _check_id(self, "id", self.id)
        _check_address(self, "user", self.user, _USER)


@dataclass(frozen=True, slots=True)
class DevicesBatchQuery(Event):
    """Ask for the device lists of several users in one request (``users``: one
    ``<item user>`` each, no ``user`` attribute); answered by ``DeviceLists``."""

    TAG: ClassVar[str] = "devices"
    SENDER: ClassVar[str] = CLIENT
    id: str
    users: tuple[str, ...]

    def to_node(self, N):
        return N("devices", {"id": self.id}, _item_nodes(N, "user", self.users))

    @classmethod
    def from_node(cls, node):
        users = _items(node, "user", _is_user, "a user")
        if not users:
            raise _bad(node, "name a user (user=) or at least one <item user=...>")
        return _read(cls(_id(node), users))

    def check(self) -> None:
        _check_id(self, "id", self.id)
        _check_items(self, "users", self.users, _is_user_value, "a user address")
        if not self.users:
            raise _wrong(self, "users", "at least one user", self.users)


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """One device of a ``DeviceList``: its address, when it was added (ms), its
    identity key, and for a companion its name and the primary's link signature."""

    device: str
    t: int
    key: bytes
    name: str | None = None
    signature: bytes | None = None


@dataclass(frozen=True, slots=True)
class DeviceList(Event):
    """The answer to ``DevicesQuery``: ``user``'s devices, primary first."""

    TAG: ClassVar[str] = "devices"
    SENDER: ClassVar[str] = SERVER
    id: str
    user: str
    items: tuple[DeviceInfo, ...]

    def to_node(self, N):
        return N("devices", {"id": self.id, "user": self.user}, _device_item_nodes(N, self.items))

    @classmethod
    def from_node(cls, node):
        if node.attrs.get("seq") is not None:  # a queued notice, not an answer
            return DevicesChanged.from_node(node)
        if node.attrs.get("user") is None and node.attrs.get("id") is not None:
            return DeviceLists.from_node(node)  # the answer to a DevicesBatchQuery
        return _read(cls(_id(node), _address(node, "user", "user"), _device_items(node)))

    def check(self) -> None:
        _check_id(self, "id", self.id)
        _check_address(self, "user", self.user, _USER)
        _check_device_items(self, "items", self.items)


def _device_item_nodes(N, items) -> list:
    out = []
    for d in items:
        attrs = {"device": d.device, "t": str(d.t)}
        if d.name is not None:
            attrs["name"] = d.name
        out.append(N("item", attrs, _key_nodes(N, d.key, d.signature)))
    return out


def _device_items(node) -> tuple[DeviceInfo, ...]:
    """The ``<item>`` children of a device list (``DeviceList``, ``DeviceLists``)."""
    c = node.content
    if c is not None and not isinstance(c, list):
        raise _bad(node, "content must be a list of <item> nodes")
    items = []
    for child in c or ():
        if child.tag != "item":
            raise _bad(node, "content must be a list of <item> nodes")
        device = _address(child, "device", "device")
        name = child.attrs.get("name")
        if name is not None and not _is_name(name):
            raise _bad(node, "an item's 'name' must be printable text")
        kids = _children(child)
        if "key" not in kids:
            raise _bad(node, "each <item> holds a <key>")
        items.append(
            DeviceInfo(device, _uint(child, "t"), kids["key"], name, kids.get("signature"))
        )
    return tuple(items)


def _check_device_items(event, name: str, items) -> None:
    if not isinstance(items, (tuple, list)):
        raise _wrong(event, name, "a tuple (or list)", items)
    for i, d in enumerate(items):
        if not isinstance(d, DeviceInfo):
            raise _wrong(event, f"{name}[{i}]", "a DeviceInfo", d)
        _check_address(event, f"{name}[{i}].device", d.device, _DEVICE)
        _check_uint(event, f"{name}[{i}].t", d.t)
        _check_bytes(event, f"{name}[{i}].key", d.key, 32)
        if d.signature is not None:
            _check_bytes(event, f"{name}[{i}].signature", d.signature, 64)
        if d.name is not None and not _is_name(d.name):
            raise _wrong(event, f"{name}[{i}].name", "printable text", d.name)


@dataclass(frozen=True, slots=True)
class DeviceLists(Event):
    """The answer to ``DevicesBatchQuery``: ``lists`` is (user, its DeviceInfos) for
    every user asked, in the order asked; each is a ``<devices user>`` child laid
    out as ``DeviceList``'s content."""

    TAG: ClassVar[str] = "devices"
    SENDER: ClassVar[str] = SERVER
    id: str
    lists: tuple[tuple[str, tuple[DeviceInfo, ...]], ...]

    def to_node(self, N):
        return N("devices", {"id": self.id},
                 [N("devices", {"user": u}, _device_item_nodes(N, items) or None)
                  for u, items in self.lists])  # fmt: skip

    @classmethod
    def from_node(cls, node):
        c = node.content
        if c is not None and not isinstance(c, list):
            raise _bad(node, "content must be a list of <devices user=...> nodes")
        lists = []
        for child in c or ():
            if child.tag != "devices":
                raise _bad(node, "content must be a list of <devices user=...> nodes")
            lists.append((_address(child, "user", "user"), _device_items(child)))
        return _read(cls(_id(node), tuple(lists)))

    def check(self) -> None:
        _check_id(self, "id", self.id)
        if not isinstance(self.lists, (tuple, list)):
            raise _wrong(self, "lists", "a tuple (or list)", self.lists)
        for i, entry in enumerate(self.lists):
            if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
                raise _wrong(self, f"lists[{i}]", "a (user, items) pair", entry)
            _check_address(self, f"lists[{i}][0]", entry[0], _USER)
            _check_device_items(self, f"lists[{i}][1]", entry[1])


@dataclass(frozen=True, slots=True)
class DevicesChanged(Event):
    """User ``sender``'s device list changed: ask for it again (``DevicesQuery``).

    Queued for every device of that user and acknowledged like a message:
    ``seq`` is in the same per-device sequence, ``t`` when the list changed.
    The tag is also ``DeviceList``'s: the server's ``devices`` with a ``seq`` is
    this notice, with an ``id`` the answer to a query (``DeviceList.from_node``
    tells them apart and hands a notice over).
    """

    TAG: ClassVar[str] = "devices"
    SENDER: ClassVar[str] = SERVER
    sender: str
    t: int
    seq: int

    def to_node(self, N):
        return N("devices", {"from": self.sender, "t": str(self.t), "seq": str(self.seq)})

    @classmethod
    def from_node(cls, node):
        return _read(cls(_address(node, "from", "user"), _uint(node, "t"), _uint(node, "seq")))

    def check(self) -> None:
        _check_address(self, "sender", self.sender, _USER)
        _check_uint(self, "t", self.t)
        _check_uint(self, "seq", self.seq)


@dataclass(frozen=True, slots=True)
class Unlink(Event):
    """Remove linked device ``device`` (the primary: any companion; a companion: itself)."""

    TAG: ClassVar[str] = "unlink"
    SENDER: ClassVar[str] = CLIENT
    id: str
    device: str

    def to_node(self, N):
        return N("unlink", {"id": self.id, "device": self.device})

    @classmethod
    def from_node(cls, node):
        return _read(cls(_id(node), _address(node, "device", "device")))

    def check(self) -> None:
        _check_id(self, "id", self.id)
        _check_address(self, "device", self.device, _DEVICE)


# -- the key directory (issue 16: identity, one-time and fallback keys) ------------

#: what a one-time key's signature covers: OTK_DOMAIN 00 device 00 key-id 00 key
#: (the device address and key id as ASCII, the key's 32 raw bytes); a fallback
#: key's the same with FALLBACK_DOMAIN.  vodozemac: ``account.sign(signed_key_message(...))``.
OTK_DOMAIN = b"pigeon-otk-v1"
FALLBACK_DOMAIN = b"pigeon-fallback-v1"
KEY_ID_MAX = 64
KEYS_TYPES = frozenset({"set", "get", "count"})


def signed_key_message(device: str, key_id: str, key: bytes, fallback: bool = False) -> bytes:
    """The bytes a device's Ed25519 key signs for one of its one-time (or fallback) keys."""
    domain = FALLBACK_DOMAIN if fallback else OTK_DOMAIN
    return b"\x00".join((domain, device.encode(), key_id.encode(), bytes(key)))


@dataclass(frozen=True, slots=True)
class SignedKey:
    """A Curve25519 one-time or fallback key: its id (1-64 printable ASCII, vodozemac's
    base64 key id), its 32 bytes and the device's 64-byte Ed25519 signature
    over ``signed_key_message``.  ``fallback``: True for a fallback key."""

    key_id: str
    key: bytes
    signature: bytes
    fallback: bool = False


def _signed_key(child) -> SignedKey:
    kid = _id(child)
    fb = child.attrs.get("fallback")
    if fb is not None and fb != "true":
        raise _bad(child, "'fallback' can only be \"true\"")
    kids = _children(child)
    if set(kids) != {"key", "signature"}:
        raise _bad(child, f"<{child.tag}> holds one <key> and one <signature>")
    return SignedKey(kid, kids["key"], kids["signature"], fb == "true" or child.tag == "fallback")


def _signed_key_node(N, tag: str, k: SignedKey, flag: bool = False):
    attrs = {"id": k.key_id}
    if flag and k.fallback:
        attrs["fallback"] = "true"
    return N(tag, attrs, _key_nodes(N, k.key, k.signature))


def _check_signed_key(event, name: str, k) -> None:
    if not isinstance(k, SignedKey):
        raise _wrong(event, name, "a SignedKey", k)
    _check_id(event, f"{name}.key_id", k.key_id)
    _check_bytes(event, f"{name}.key", k.key, 32)
    _check_bytes(event, f"{name}.signature", k.signature, 64)


def _identity(node) -> tuple[bytes, bytes]:
    b = _bytes(node, size=64)
    return b[:32], b[32:]


@dataclass(frozen=True, slots=True)
class KeysUpload(Event):
    """A device publishes its keys (``type="set"``): its Curve25519 and Ed25519
    identity keys (the Ed25519 one must be the device's registered identity key),
    optionally a signed fallback key and a batch of signed one-time keys.  Answer:
    ``KeysCount``.  Every ``keys`` node a client sends is read here (``type``
    "get" is ``KeysQuery``, "count" ``KeysCountQuery``)."""

    TAG: ClassVar[str] = "keys"
    SENDER: ClassVar[str] = CLIENT
    id: str
    curve25519: bytes
    ed25519: bytes
    one_time_keys: tuple[SignedKey, ...] = ()
    fallback: SignedKey | None = None

    def to_node(self, N):
        out = [N("identity", {}, b"".join((self.curve25519, self.ed25519)))]
        if self.fallback is not None:
            out.append(_signed_key_node(N, "fallback", self.fallback))
        out.extend(_signed_key_node(N, "otk", k) for k in self.one_time_keys)
        return N("keys", {"id": self.id, "type": "set"}, out)

    @classmethod
    def from_node(cls, node):
        typ = _choice(node, "type", KEYS_TYPES)
        if typ == "get":
            return KeysQuery.from_node(node)
        if typ == "count":
            return KeysCountQuery.from_node(node)
        rid = _id(node)
        c = node.content
        if not isinstance(c, list) or not c or c[0].tag != "identity":
            raise _bad(node, "content must start with an <identity> node")
        curve, ed = _identity(c[0])
        fallback, otks = None, []
        for child in c[1:]:
            if child.tag == "fallback" and fallback is None and not otks:
                fallback = _signed_key(child)
            elif child.tag == "otk":
                otks.append(_signed_key(child))
            else:
                raise _bad(node, "after <identity>: at most one <fallback>, then <otk> nodes")
        return _read(cls(rid, curve, ed, tuple(otks), fallback))

    def check(self) -> None:
        _check_id(self, "id", self.id)
        _check_bytes(self, "curve25519", self.curve25519, 32)
        _check_bytes(self, "ed25519", self.ed25519, 32)
        if not isinstance(self.one_time_keys, (tuple, list)):
            raise _wrong(self, "one_time_keys", "a tuple (or list)", self.one_time_keys)
        for i, k in enumerate(self.one_time_keys):
            _check_signed_key(self, f"one_time_keys[{i}]", k)
            if k.fallback:
                raise _wrong(self, f"one_time_keys[{i}].fallback", "False", k.fallback)
        if self.fallback is not None:
            _check_signed_key(self, "fallback", self.fallback)
            if not self.fallback.fallback:
                raise _wrong(self, "fallback.fallback", "True", self.fallback.fallback)


@dataclass(frozen=True, slots=True)
class KeysQuery(Event):
    """Ask for the key bundles of every device of ``users`` (``type="get"``): each
    device's identity keys and one of its one-time keys, consumed (``KeyBundles``)."""

    TAG: ClassVar[str] = "keys"
    SENDER: ClassVar[str] = CLIENT
    id: str
    users: tuple[str, ...]

    def to_node(self, N):
        return N("keys", {"id": self.id, "type": "get"}, _item_nodes(N, "user", self.users))

    @classmethod
    def from_node(cls, node):
        users = _items(node, "user", _is_user, "a user")
        if not users:
            raise _bad(node, "name at least one <item user=...>")
        return _read(cls(_id(node), users))

    def check(self) -> None:
        _check_id(self, "id", self.id)
        _check_items(self, "users", self.users, _is_user_value, "a user address")
        if not self.users:
            raise _wrong(self, "users", "at least one user", self.users)


@dataclass(frozen=True, slots=True)
class KeysCountQuery(_IdOnly):
    """How many one-time keys does the server hold for this device (``type="count"``)?
    Answer: ``KeysCount``."""

    TAG: ClassVar[str] = "keys"
    SENDER: ClassVar[str] = CLIENT

    def to_node(self, N):
        return N("keys", {"id": self.id, "type": "count"})


@dataclass(frozen=True, slots=True)
class KeysCount(Event):
    """The answer to ``KeysUpload`` and ``KeysCountQuery``: the number of one-time
    keys the server now holds for this device.  Every ``keys`` node a server sends
    is read here (a ``seq``: a notice; content: ``KeyBundles``)."""

    TAG: ClassVar[str] = "keys"
    SENDER: ClassVar[str] = SERVER
    id: str
    count: int

    def to_node(self, N):
        return N("keys", {"id": self.id, "count": str(self.count)})

    @classmethod
    def from_node(cls, node):
        if node.attrs.get("seq") is not None:
            typ = _choice(node, "type", _NOTICE_TYPES)
            return (KeysLow if typ == "low" else KeysChanged).from_node(node)
        if node.attrs.get("count") is None:
            return KeyBundles.from_node(node)
        return _read(cls(_id(node), _uint(node, "count")))

    def check(self) -> None:
        _check_id(self, "id", self.id)
        _check_uint(self, "count", self.count)


@dataclass(frozen=True, slots=True)
class KeyBundle:
    """One device's keys in ``KeyBundles``: ``curve25519`` and ``ed25519`` are
    None when the device has published none; ``one_time_key`` is None when it
    has no one-time key left and no fallback key (``fallback`` set on the key
    when it is the fallback key)."""

    device: str
    curve25519: bytes | None = None
    ed25519: bytes | None = None
    one_time_key: SignedKey | None = None


@dataclass(frozen=True, slots=True)
class KeyBundles(Event):
    """The answer to ``KeysQuery``: a bundle for every current device of the users asked."""

    TAG: ClassVar[str] = "keys"
    SENDER: ClassVar[str] = SERVER
    id: str
    bundles: tuple[KeyBundle, ...]

    def to_node(self, N):
        out = []
        for b in self.bundles:
            kids = []
            if b.curve25519 is not None and b.ed25519 is not None:
                kids.append(N("identity", {}, b"".join((b.curve25519, b.ed25519))))
                if b.one_time_key is not None:
                    kids.append(_signed_key_node(N, "otk", b.one_time_key, flag=True))
            out.append(N("bundle", {"device": b.device}, kids or None))
        return N("keys", {"id": self.id}, out)

    @classmethod
    def from_node(cls, node):
        rid = _id(node)
        c = node.content
        if c is not None and not isinstance(c, list):
            raise _bad(node, "content must be a list of <bundle> nodes")
        out = []
        for child in c or ():
            if child.tag != "bundle":
                raise _bad(node, "content must be a list of <bundle> nodes")
            device = _address(child, "device", "device")
            kids = child.content
            if kids is None:
                out.append(KeyBundle(device))
                continue
            if (
                not isinstance(kids, list)
                or not 1 <= len(kids) <= 2
                or kids[0].tag != "identity"
                or (len(kids) == 2 and kids[1].tag != "otk")
            ):
                raise _bad(node, "a <bundle> holds an <identity> and at most one <otk>")
            curve, ed = _identity(kids[0])
            otk = _signed_key(kids[1]) if len(kids) == 2 else None
            out.append(KeyBundle(device, curve, ed, otk))
        return _read(cls(rid, tuple(out)))

    def check(self) -> None:
        _check_id(self, "id", self.id)
        if not isinstance(self.bundles, (tuple, list)):
            raise _wrong(self, "bundles", "a tuple (or list)", self.bundles)
        for i, b in enumerate(self.bundles):
            if not isinstance(b, KeyBundle):
                raise _wrong(self, f"bundles[{i}]", "a KeyBundle", b)
            _check_address(self, f"bundles[{i}].device", b.device, _DEVICE)
            if b.curve25519 is None:
                if b.ed25519 is not None or b.one_time_key is not None:
                    raise _wrong(self, f"bundles[{i}]", "identity keys with a key", b)
                continue
            _check_bytes(self, f"bundles[{i}].curve25519", b.curve25519, 32)
            _check_bytes(self, f"bundles[{i}].ed25519", b.ed25519, 32)
            if b.one_time_key is not None:
                _check_signed_key(self, f"bundles[{i}].one_time_key", b.one_time_key)


_NOTICE_TYPES = frozenset({"low", "changed"})


@dataclass(frozen=True, slots=True)
class KeysLow(Event):
    """Device ``device`` (this one) has fewer than ``one-time-keys-low`` one-time
    keys left on the server: upload more (``KeysCountQuery`` tells how many are
    left).  Queued and acknowledged like a message (``seq``, ``t``)."""

    TAG: ClassVar[str] = "keys"
    SENDER: ClassVar[str] = SERVER
    device: str
    t: int
    seq: int

    def to_node(self, N):
        return N(
            "keys", {"from": self.device, "type": "low", "t": str(self.t), "seq": str(self.seq)}
        )

    @classmethod
    def from_node(cls, node):
        return _read(cls(_address(node, "from", "device"), _uint(node, "t"), _uint(node, "seq")))

    def check(self) -> None:
        _check_address(self, "device", self.device, _DEVICE)
        _check_uint(self, "t", self.t)
        _check_uint(self, "seq", self.seq)


@dataclass(frozen=True, slots=True)
class KeysChanged(Event):
    """User ``sender`` has a new device or a device with a new identity key: fetch
    its keys again (and check its safety number).  Queued and acknowledged like
    a message (``seq``, ``t``)."""

    TAG: ClassVar[str] = "keys"
    SENDER: ClassVar[str] = SERVER
    sender: str
    t: int
    seq: int

    def to_node(self, N):
        return N(
            "keys",
            {"from": self.sender, "type": "changed", "t": str(self.t), "seq": str(self.seq)},
        )

    @classmethod
    def from_node(cls, node):
        return _read(cls(_address(node, "from", "user"), _uint(node, "t"), _uint(node, "seq")))

    def check(self) -> None:
        _check_address(self, "sender", self.sender, _USER)
        _check_uint(self, "t", self.t)
        _check_uint(self, "seq", self.seq)


MEDIA_CLASSES = frozenset({"image", "video", "audio", "document", "sticker"})


@dataclass(frozen=True, slots=True)
class UploadRequest(Event):
    """Ask for the right to upload a media file: its ``size`` in bytes, the SHA-256
    of its ciphertext (``sha256``, the content) and its ``media_class``."""

    TAG: ClassVar[str] = "upload"
    SENDER: ClassVar[str] = CLIENT
    id: str
    size: int
    sha256: bytes
    media_class: str

    def to_node(self, N):
        return N("upload", {"id": self.id, "size": str(self.size), "class": self.media_class},
                 self.sha256)  # fmt: skip

    @classmethod
    def from_node(cls, node):
        return _read(cls(_id(node), _uint(node, "size"), _bytes(node, size=32),
                         _choice(node, "class", MEDIA_CLASSES)))  # fmt: skip

    def check(self) -> None:
        _check_id(self, "id", self.id)
        _check_uint(self, "size", self.size)
        _check_bytes(self, "sha256", self.sha256, 32)
        _check_choice(self, "media_class", self.media_class, MEDIA_CLASSES)


@dataclass(frozen=True, slots=True)
class UploadGrant(Event):
    """The answer to ``UploadRequest``: PUT the ciphertext to ``url`` with ``token``
    (the content) in ``Authorization: Bearer``, within ``ttl`` seconds."""

    TAG: ClassVar[str] = "upload"
    SENDER: ClassVar[str] = SERVER
    id: str
    url: str
    ttl: int
    token: bytes

    def to_node(self, N):
        return N("upload", {"id": self.id, "url": self.url, "ttl": str(self.ttl)}, self.token)

    @classmethod
    def from_node(cls, node):
        url = _attr(node, "url")
        if not url.startswith(("http://", "https://")):
            raise _bad(node, "'url' must be an http(s) URL")
        return _read(cls(_id(node), url, _uint(node, "ttl"), _bytes(node, max_size=1024)))

    def check(self) -> None:
        _check_id(self, "id", self.id)
        if not (isinstance(self.url, str) and self.url.startswith(("http://", "https://"))):
            raise _wrong(self, "url", "an http(s) URL", self.url)
        _check_uint(self, "ttl", self.ttl)
        _check_bytes(self, "token", self.token, max_size=1024)


PUSH_KINDS = frozenset({"webhook", "fcm", "apns", "webpush"})
PUSH_REQUESTS = frozenset({"set", "remove"})
PUSH_TOKEN_MAX = 4096  # bytes of a push token or endpoint on the wire (push-token-max below it)


@dataclass(frozen=True, slots=True)
class PushTarget(Event):
    """Register (``type`` "set") or remove ("remove") this device's push target.

    ``kind``: which push service wakes the device (webhook, fcm, apns, webpush);
    ``token``: the provider's token for it (a webhook or FCM registration token,
    an APNs device token in hex, a Web Push endpoint URL), the content;
    ``mute``: no wake-up before this server time (ms; 0: none); ``quiet``: ask
    for a quiet wake-up (background, no alert).  Answered with
    ``ServerAck(id, t, "push")``."""

    TAG: ClassVar[str] = "push"
    SENDER: ClassVar[str] = CLIENT
    id: str
    type: str = "set"
    kind: str | None = None
    token: bytes | None = None
    mute: int = 0
    quiet: bool = False

    def to_node(self, N):
        if self.type == "remove":
            return N("push", {"id": self.id, "type": "remove"})
        attrs = {"id": self.id, "type": self.type}
        if self.kind is not None:
            attrs["kind"] = self.kind
        if self.mute:
            attrs["mute"] = str(self.mute)
        if self.quiet:
            attrs["quiet"] = "1"
        return N("push", attrs, self.token)

    @classmethod
    def from_node(cls, node):
        rid = _id(node)
        typ = _choice(node, "type", PUSH_REQUESTS)
        if typ == "remove":
            return _read(cls(rid, "remove"))
        kind = _choice(node, "kind", PUSH_KINDS)
        token = _bytes(node, max_size=PUSH_TOKEN_MAX)
        if not token:
            raise _bad(node, "content (the push token) must not be empty")
        mute = _opt_uint(node, "mute") or 0
        quiet = node.attrs.get("quiet")
        if quiet not in (None, "0", "1"):
            raise _bad(node, "'quiet' must be 0 or 1")
        return _read(cls(rid, "set", kind, token, mute, quiet == "1"))

    def check(self) -> None:
        _check_id(self, "id", self.id)
        _check_choice(self, "type", self.type, PUSH_REQUESTS)
        if self.type == "set":
            _check_choice(self, "kind", self.kind, PUSH_KINDS)
            _check_bytes(self, "token", self.token, max_size=PUSH_TOKEN_MAX)
            if not self.token:
                raise _wrong(self, "token", "at least 1 byte", self.token)
            _check_uint(self, "mute", self.mute)
            if self.quiet not in (True, False):  # (what reads back equal: 0 and 1 too)
                raise _wrong(self, "quiet", "a bool", self.quiet)
        else:  # a remove names nothing else (the reader would not see it)
            if self.kind is not None:
                raise _wrong(self, "kind", "None in a remove", self.kind)
            if self.token is not None:
                raise _wrong(self, "token", "None in a remove", self.token)
            if not (type(self.mute) is int and self.mute == 0):
                raise _wrong(self, "mute", "0 in a remove", self.mute)
            if self.quiet not in (False,):
                raise _wrong(self, "quiet", "False in a remove", self.quiet)


_ALL = [
    Register, CodeSent, Verify, Registered, AuthStart, AuthChallenge, AuthResponse,
    AuthSuccess, Message, IncomingMessage, ServerAck, DeviceAck, Receipt, IncomingReceipt,
    Presence, PresenceUpdate, ChatState, IncomingChatState, Privacy, PrivacySettings,
    Discover, DiscoverResult, Block, Unblock, BlocklistQuery, Blocklist,
    Logout, DeleteAccount, Error, Ping, Pong,
    Pair, PairCode, Link, LinkKey, DevicesQuery, DevicesBatchQuery, DeviceList, DeviceLists,
    DevicesChanged, Unlink,
    KeysUpload, KeysQuery, KeysCountQuery, KeysCount, KeyBundles, KeysLow, KeysChanged,
    UploadRequest, UploadGrant, PushTarget,
]  # fmt: skip

#: tag -> event class, for nodes a client sends (what a server receives)
CLIENT_SENT: dict[str, type[Event]] = {c.TAG: c for c in _ALL if c.SENDER in (CLIENT, BOTH)}
#: tag -> event class, for nodes a server sends (what a client receives)
SERVER_SENT: dict[str, type[Event]] = {c.TAG: c for c in _ALL if c.SENDER in (SERVER, BOTH)}
# Two server events share the tag ``devices``: the reader is DeviceList's, which
# tells them apart by attributes (a ``seq``: the notice; an ``id``: the answer).
SERVER_SENT["devices"] = DeviceList
# and so do the client's: DevicesQuery's reader hands a batch (no ``user``) over.
CLIENT_SENT["devices"] = DevicesQuery
# ``keys`` likewise, both ways: a client's is read by KeysUpload (by ``type``),
# a server's by KeysCount (a ``seq``: a notice; ``count``: a count; else bundles).
CLIENT_SENT["keys"] = KeysUpload
SERVER_SENT["keys"] = KeysCount


# -- groups (docs/PROTOCOL.md 10g) --------------------------------------------------

#: what a client's ``group`` request may ask (its ``type``)
GROUP_OPS = frozenset({
    "create", "info", "list", "add", "remove", "promote", "demote", "leave", "subject",
    "description", "settings", "invite", "revoke", "preview", "join", "requests", "approve",
    "reject",
})  # fmt: skip
#: what a queued group notice says happened (its ``type``)
GROUP_NOTICES = frozenset({
    "create", "add", "remove", "promote", "demote", "leave", "subject", "description",
    "settings", "join", "revoke",
})  # fmt: skip
#: the attributes a group answer or notice may carry besides its own, in this order
GROUP_ATTRS = ("subject", "creator", "t", "announce", "approval", "code", "count", "requested")
MAX_GROUP_SUBJECT = 100  # characters of a group's subject (events check it; so does the server)
MAX_GROUP_DESCRIPTION = 512  # bytes of a group's description (UTF-8; an attribute)


def _check_round_trip(event) -> None:
    """The group events' check: encode ``event`` (pure-Python codec) and read it back
    as its peer would; anything but an equal event is refused.  These events are
    rare (management, notices), and their nested fields (attribute pairs, members,
    items) are checked exactly as strictly as the reader checks them."""
    from ._pycodec import Codec, Node  # (no import cycle at module load)

    try:
        codec = Codec()
        reader = SERVER_SENT if event.SENDER == SERVER else CLIENT_SENT
        back = reader[event.TAG].from_node(codec.decode(codec.encode(event.to_node(Node))))
    except (RemoteProtocolError, TypeError, ValueError, AttributeError, KeyError) as exc:
        raise LocalProtocolError(f"cannot send {type(event).__name__}: {exc}") from None
    if back != event:
        for f in fields(event):
            sent = getattr(event, f.name)
            if f.init and getattr(back, f.name, None) != sent:
                raise _wrong(event, f.name, "what its reader reads back", sent)
        raise LocalProtocolError(f"cannot send {type(event).__name__}: read back as {back!r}")


def _group_members(node) -> tuple[str, ...]:
    """The ``user`` of each ``member`` child (other children: ignored here)."""
    out = []
    for child in node.content if isinstance(node.content, list) else ():
        if child.tag == "member":
            out.append(_address(child, "user", "user"))
    return tuple(out)


def _group_description(node) -> str | None:
    v = node.attrs.get("description")
    if v is not None and len(v.encode()) > MAX_GROUP_DESCRIPTION:
        raise _bad(node, f"a description has at most {MAX_GROUP_DESCRIPTION} bytes")
    return v


@dataclass(frozen=True, slots=True)
class GroupRequest(Event):
    """Manage a group, or ask about one: ``op`` is the request's ``type`` (GROUP_OPS).

    ``group``: the group address (every op but create, list, preview and
    join); ``members``: the users an op is about (create, add, remove,
    promote, demote, approve, reject); ``subject`` (create, subject);
    ``description`` (description); ``code`` (preview, join); ``announce`` /
    ``approval`` (settings)."""

    TAG: ClassVar[str] = "group"
    SENDER: ClassVar[str] = CLIENT
    id: str
    op: str
    group: str | None = None
    members: tuple[str, ...] = ()
    subject: str | None = None
    description: str | None = None
    code: str | None = None
    announce: bool | None = None
    approval: bool | None = None

    def to_node(self, N):
        attrs = {"id": self.id, "type": self.op}
        if self.group is not None:
            attrs["group"] = self.group
        if self.subject is not None:
            attrs["subject"] = self.subject
        if self.code is not None:
            attrs["code"] = self.code
        if self.announce is not None:
            attrs["announce"] = "1" if self.announce else "0"
        if self.approval is not None:
            attrs["approval"] = "1" if self.approval else "0"
        if self.description is not None:
            attrs["description"] = self.description
        children = [N("member", {"user": u}) for u in self.members]
        return N("group", attrs, children or None)

    @classmethod
    def from_node(cls, node):
        rid = _id(node)
        op = _choice(node, "type", GROUP_OPS)
        a = node.attrs
        group = None if a.get("group") is None else _address(node, "group", "group")
        subject = a.get("subject")
        if subject is not None and not _is_subject(subject):
            raise _bad(node, f"'subject' must be 1-{MAX_GROUP_SUBJECT} printable characters")
        code = a.get("code")
        if code is not None and not _is_invite_code(code):
            raise _bad(node, "'code' must be an invite code (16-32 letters, digits, - or _)")
        flags = []
        for key in ("announce", "approval"):
            v = a.get(key)
            if v is not None and v not in ("0", "1"):
                raise _bad(node, f"{key!r} must be 0 or 1")
            flags.append(None if v is None else v == "1")
        if node.content is not None and not isinstance(node.content, list):
            raise _bad(node, "content must be <member> nodes")
        return _read(cls(rid, op, group, _group_members(node), subject,
                         _group_description(node), code, *flags))  # fmt: skip

    def check(self) -> None:
        _check_id(self, "id", self.id)
        _check_choice(self, "op", self.op, GROUP_OPS)
        if self.group is not None:
            _check_address(self, "group", self.group, ("group",))
        _check_items(self, "members", self.members, _is_user_value, "a user address")
        if self.subject is not None and not _is_subject(self.subject):
            raise _wrong(self, "subject", f"1-{MAX_GROUP_SUBJECT} printable characters",
                         self.subject)  # fmt: skip
        if self.description is not None and not (
            isinstance(self.description, str)
            and len(self.description.encode()) <= MAX_GROUP_DESCRIPTION
        ):
            raise _wrong(self, "description", f"text of at most {MAX_GROUP_DESCRIPTION} bytes",
                         self.description)  # fmt: skip
        if self.code is not None and not _is_invite_code(self.code):
            raise _wrong(self, "code", "an invite code", self.code)
        _check_round_trip(self)  # (announce / approval: what reads back equal, True or 1)


_INVITE_RE = re.compile(r"[A-Za-z0-9_-]{16,32}")


def _is_invite_code(v) -> bool:
    return isinstance(v, str) and _INVITE_RE.fullmatch(v) is not None


def _is_subject(v) -> bool:
    return isinstance(v, str) and 1 <= len(v) <= MAX_GROUP_SUBJECT and v.isprintable()


@dataclass(frozen=True, slots=True)
class GroupMember:
    """A member in a group answer: ``role`` admin or member (None in a list of
    join requests), ``t`` when they joined (or asked to)."""

    user: str
    role: str | None = None
    t: int | None = None


@dataclass(frozen=True, slots=True)
class GroupResult(Event):
    """The answer to a ``GroupRequest`` (the same ``id`` and ``op``).

    ``attrs``: what the op answers, (name, value) pairs of GROUP_ATTRS
    (``get`` reads one); ``members``: info's members, or the users asking to
    join (requests); ``failed``: (user, error code) for the members an op
    could not do; ``items``: list's groups, (group, subject, t);
    ``description``: info's."""

    TAG: ClassVar[str] = "group"
    SENDER: ClassVar[str] = SERVER
    id: str
    op: str
    group: str | None = None
    attrs: tuple[tuple[str, str], ...] = ()
    members: tuple[GroupMember, ...] = ()
    failed: tuple[tuple[str, int], ...] = ()
    items: tuple[tuple[str, str, int], ...] = ()
    description: str | None = None

    def get(self, name: str, default=None):
        for k, v in self.attrs:
            if k == name:
                return v
        return default

    def to_node(self, N):
        attrs = {"id": self.id, "type": self.op}
        if self.group is not None:
            attrs["group"] = self.group
        attrs.update(self.attrs)
        if self.description is not None:
            attrs["description"] = self.description
        children = []
        for m in self.members:
            a = {"user": m.user}
            if m.role is not None:
                a["role"] = m.role
            if m.t is not None:
                a["t"] = str(m.t)
            children.append(N("member", a))
        children += [N("failed", {"user": u, "code": str(int(c))}) for u, c in self.failed]
        children += [N("item", {"group": g, "subject": s, "t": str(t)}) for g, s, t in self.items]
        return N("group", attrs, children or None)

    @classmethod
    def from_node(cls, node):
        if node.attrs.get("seq") is not None:  # a queued notice, not an answer
            return GroupNotice.from_node(node)
        rid = _id(node)
        op = _choice(node, "type", GROUP_OPS)
        a = node.attrs
        group = None if a.get("group") is None else _address(node, "group", "group")
        attrs = tuple((k, a[k]) for k in GROUP_ATTRS if a.get(k) is not None)
        members, failed, items = [], [], []
        for child in node.content if isinstance(node.content, list) else ():
            if child.tag == "member":
                role = child.attrs.get("role")
                t = _opt_uint(child, "t")
                members.append(GroupMember(_address(child, "user", "user"), role, t))
            elif child.tag == "failed":
                failed.append((_address(child, "user", "user"), _uint(child, "code")))
            elif child.tag == "item":
                items.append((_address(child, "group", "group"), _attr(child, "subject"),
                              _uint(child, "t")))  # fmt: skip
        return _read(cls(rid, op, group, attrs, tuple(members), tuple(failed), tuple(items),
                         _group_description(node)))  # fmt: skip

    def check(self) -> None:
        _check_id(self, "id", self.id)
        _check_choice(self, "op", self.op, GROUP_OPS)
        if self.group is not None:
            _check_address(self, "group", self.group, ("group",))
        _check_round_trip(self)


@dataclass(frozen=True, slots=True)
class GroupNotice(Event):
    """Something changed in group ``group``: queued for every member device in
    the change's transaction, in order with messages, acknowledged like them.

    ``op`` (GROUP_NOTICES): what happened; ``by``: the user who did it;
    ``members``: the users it is about; ``attrs``: the new subject or
    settings, as (name, value) pairs; ``description``: the new description
    (an attribute, as everywhere: an info answer's 1,024 members fill its
    content list)."""

    TAG: ClassVar[str] = "group"
    SENDER: ClassVar[str] = SERVER
    group: str
    op: str
    by: str
    t: int
    seq: int
    members: tuple[str, ...] = ()
    attrs: tuple[tuple[str, str], ...] = ()
    description: str | None = None

    def get(self, name: str, default=None):
        for k, v in self.attrs:
            if k == name:
                return v
        return default

    def to_node(self, N):
        attrs = {"from": self.group, "type": self.op, "by": self.by}
        attrs.update(self.attrs)
        if self.description is not None:
            attrs["description"] = self.description
        attrs.update(t=str(self.t), seq=str(self.seq))
        children = [N("member", {"user": u}) for u in self.members]
        return N("group", attrs, children or None)

    @classmethod
    def from_node(cls, node):
        a = node.attrs
        attrs = tuple((k, a[k]) for k in GROUP_ATTRS if k != "t" and a.get(k) is not None)
        return _read(cls(_address(node, "from", "group"), _choice(node, "type", GROUP_NOTICES),
                         _address(node, "by", "user"), _uint(node, "t"), _uint(node, "seq"),
                         _group_members(node), attrs, _group_description(node)))  # fmt: skip

    def check(self) -> None:
        _check_address(self, "group", self.group, ("group",))
        _check_choice(self, "op", self.op, GROUP_NOTICES)
        _check_address(self, "by", self.by, _USER)
        _check_uint(self, "t", self.t)
        _check_uint(self, "seq", self.seq)
        _check_round_trip(self)


_ALL += [GroupRequest, GroupResult, GroupNotice]
CLIENT_SENT["group"] = GroupRequest
SERVER_SENT["group"] = GroupResult
