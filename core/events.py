"""Protocol events: what a Connection hands the application and what it sends.

One class per node of the core protocol (docs/PROTOCOL.md), plus ``Hello``
(the peer's preamble) and ``ConnectionClosed``.  Each class knows its tag,
which role sends it, how to build its node and how to read one back.
Reading validates every attribute (ids, numbers, addresses) and raises a
non-fatal ``RemoteProtocolError`` (BAD_REQUEST, with the request's id) for a
node that is well-formed but wrong, so the receiver can answer and go on.

The same tag can mean different things by direction: ``message`` from a
client is ``Message`` (it names the recipient), from the server it is
``IncomingMessage`` (it names the sender, the server time and the
per-device sequence).  ``CLIENT_SENT`` and ``SERVER_SENT`` map tags to classes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from .errors import ErrorCode, RemoteProtocolError
from .node import address_kind, valid_phone

CLIENT = "client"
SERVER = "server"
BOTH = "both"

_ID_RE = re.compile(r"[\x21-\x7e]{1,64}")
_UINT_RE = re.compile(r"0|[1-9][0-9]{0,19}")
MAX_UINT64 = (1 << 64) - 1
SCRAM_MECHANISM = "SCRAM-SHA-256"


def valid_id(s) -> bool:
    """Message and request ids: 1 to 64 printable ASCII bytes (0x21-0x7e)."""
    return isinstance(s, str) and _ID_RE.fullmatch(s) is not None


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


class Event:
    """Base class. ``TAG``: the node tag; ``SENDER``: CLIENT, SERVER or BOTH."""

    __slots__ = ()
    TAG: ClassVar[str] = ""
    SENDER: ClassVar[str] = BOTH

    def to_node(self, node_cls):
        raise NotImplementedError

    @classmethod
    def from_node(cls, node):
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class _IdOnly(Event):
    """A node whose only attribute is a request ``id`` (subclasses set TAG and SENDER)."""

    id: str

    def to_node(self, N):
        return N(self.TAG, {"id": self.id})

    @classmethod
    def from_node(cls, node):
        return cls(_id(node))


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
        return cls(_id(node), _address(node, "to", "user"))


@dataclass(frozen=True, slots=True)
class Hello(Event):
    """The peer's preamble: its protocol version and dictionary version.

    A client's names the dictionary the connection will use; a server's names
    the newest dictionary it knows.
    """

    protocol: int
    dictionary: int


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """The peer closed its side (``receive_data(b"")``)."""


# -- registration -----------------------------------------------------------


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
        return cls(_id(node), _phone(node), method)


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
        return cls(_id(node), _uint(node, "ttl"))


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
        if not (len(code) == 6 and code.isascii() and code.isdigit()):
            raise _bad(node, "'code' must be 6 digits")
        return cls(_id(node), _phone(node), code, _bytes(node, size=32))


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
        return cls(_id(node), _address(node, "device", "device"), _bytes(node, size=32))


# -- login (SCRAM-SHA-256, RFC 5802 / RFC 7677) -----------------------------


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
        return cls(_bytes(node, max_size=1024), mech)


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
        return cls(_bytes(node, max_size=1024))


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
        return cls(_bytes(node, max_size=1024))


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
        return cls(_bytes(node, max_size=1024), _uint(node, "t"))


# -- messaging --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message(Event):
    """A client sends an opaque (end-to-end encrypted) body to a user or group."""

    TAG: ClassVar[str] = "message"
    SENDER: ClassVar[str] = CLIENT
    to: str
    id: str
    type: str
    body: bytes

    def to_node(self, N):
        return N("message", {"to": self.to, "id": self.id, "type": self.type}, self.body)

    @classmethod
    def from_node(cls, node):
        t = _attr(node, "type")
        if not valid_id(t):
            raise _bad(node, "'type' must be 1-64 printable ASCII characters")
        return cls(_address(node, "to", "user", "group"), _id(node), t, _bytes(node))


@dataclass(frozen=True, slots=True)
class IncomingMessage(Event):
    """The server delivers a message to one device, from its queue.

    ``sender``: the sending device's address, set by the server from the
    authenticated session.  ``t``: server time (ms) when it was accepted.
    ``seq``: this device's queue sequence, the number the device acknowledges.
    """

    TAG: ClassVar[str] = "message"
    SENDER: ClassVar[str] = SERVER
    sender: str
    id: str
    type: str
    t: int
    seq: int
    body: bytes

    def to_node(self, N):
        return N(
            "message",
            {
                "from": self.sender,
                "id": self.id,
                "type": self.type,
                "t": str(self.t),
                "seq": str(self.seq),
            },
            self.body,
        )

    @classmethod
    def from_node(cls, node):
        return cls(
            _address(node, "from", "device"),
            _id(node),
            _attr(node, "type"),
            _uint(node, "t"),
            _uint(node, "seq"),
            _bytes(node),
        )


ACK_CLASSES = frozenset({"message", "receipt", "logout", "delete", "block", "unblock"})


@dataclass(frozen=True, slots=True)
class ServerAck(Event):
    """One tick: the server holds the message (or receipt) ``id`` durably.

    ``t`` is the server time (ms) it was accepted, the same ``t`` its
    recipients see.  With ``cls`` "logout" or "delete" it confirms a
    ``Logout`` or ``DeleteAccount`` request instead; the server then closes.
    """

    TAG: ClassVar[str] = "ack"
    SENDER: ClassVar[str] = SERVER
    id: str
    t: int
    cls: str = "message"

    def to_node(self, N):
        return N("ack", {"class": self.cls, "id": self.id, "t": str(self.t)})

    @classmethod
    def from_node(cls, node):
        return cls(_id(node), _uint(node, "t"), _choice(node, "class", ACK_CLASSES))


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
        return cls(_uint(node, "seq"))


RECEIPT_TYPES = frozenset({"delivered", "read", "played"})


@dataclass(frozen=True, slots=True)
class Receipt(Event):
    """A client tells the sender of message ``id`` it was read (or played)."""

    TAG: ClassVar[str] = "receipt"
    SENDER: ClassVar[str] = CLIENT
    to: str
    id: str
    type: str = "read"

    def to_node(self, N):
        return N("receipt", {"to": self.to, "id": self.id, "type": self.type})

    @classmethod
    def from_node(cls, node):
        typ = _choice(node, "type", frozenset({"read", "played"}))
        return cls(_address(node, "to", "user"), _id(node), typ)


@dataclass(frozen=True, slots=True)
class IncomingReceipt(Event):
    """Two ticks (delivered) or blue ticks (read) for message ``id``, from user ``sender``.

    Queued and acknowledged like a message: ``seq`` is in the same per-device
    sequence.
    """

    TAG: ClassVar[str] = "receipt"
    SENDER: ClassVar[str] = SERVER
    sender: str
    id: str
    type: str
    t: int
    seq: int

    def to_node(self, N):
        return N(
            "receipt",
            {
                "from": self.sender,
                "id": self.id,
                "type": self.type,
                "t": str(self.t),
                "seq": str(self.seq),
            },
        )

    @classmethod
    def from_node(cls, node):
        return cls(
            _address(node, "from", "user"),
            _id(node),
            _choice(node, "type", RECEIPT_TYPES),
            _uint(node, "t"),
            _uint(node, "seq"),
        )


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
            return cls(typ)
        return cls(typ, _address(node, "to", "user"))


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
        return cls(
            _address(node, "from", "user"),
            _choice(node, "type", PRESENCE_TYPES),
            _opt_uint(node, "last"),
        )


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
        return cls(_address(node, "to", "user"), _choice(node, "type", CHAT_STATES))


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
        return cls(_address(node, "from", "user"), _choice(node, "type", CHAT_STATES))


PRIVACY_VALUES = frozenset({"everyone", "contacts", "nobody"})


@dataclass(frozen=True, slots=True)
class Privacy(Event):
    """Read (no settings given) or change who sees this user's last seen and online status."""

    TAG: ClassVar[str] = "privacy"
    SENDER: ClassVar[str] = CLIENT
    id: str
    last: str | None = None
    online: str | None = None

    def to_node(self, N):
        attrs = {"id": self.id}
        if self.last is not None:
            attrs["last"] = self.last
        if self.online is not None:
            attrs["online"] = self.online
        return N("privacy", attrs)

    @classmethod
    def from_node(cls, node):
        rid = _id(node)
        vals = []
        for key in ("last", "online"):
            vals.append(None if node.attrs.get(key) is None else _choice(node, key, PRIVACY_VALUES))
        return cls(rid, *vals)


@dataclass(frozen=True, slots=True)
class PrivacySettings(Event):
    """The user's privacy settings, in answer to ``Privacy`` (after any change)."""

    TAG: ClassVar[str] = "privacy"
    SENDER: ClassVar[str] = SERVER
    id: str
    last: str
    online: str

    def to_node(self, N):
        return N("privacy", {"id": self.id, "last": self.last, "online": self.online})

    @classmethod
    def from_node(cls, node):
        return cls(
            _id(node),
            _choice(node, "last", PRIVACY_VALUES),
            _choice(node, "online", PRIVACY_VALUES),
        )


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
        return cls(
            _id(node),
            _choice(node, "type", DISCOVER_TYPES),
            _items(node, "phone", valid_phone, "an E.164 number (8-15 digits, no '+')"),
        )


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
        return cls(_id(node), _items(node, "user", _is_user, "a user"), _uint(node, "limit"))


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
        return cls(_id(node), _items(node, "user", _is_user, "a user"))


# -- leaving ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Logout(_IdOnly):
    """This device removes itself: its login secret, keys and queue are deleted.

    The server answers ``ack`` with class "logout" and closes the connection;
    the device must register again to come back.
    """

    TAG: ClassVar[str] = "logout"
    SENDER: ClassVar[str] = CLIENT


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
        _choice(node, "type", frozenset({"account"}))
        return cls(_id(node))


# -- either side --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Error(Event):
    """An error with a stable ``code`` (ErrorCode) and a human-readable ``text``.

    ``id`` names the request it answers, when there is one.  After an error
    whose code is fatal (errors.FATAL_CODES) its sender closes the connection.
    """

    TAG: ClassVar[str] = "error"
    SENDER: ClassVar[str] = BOTH
    code: int
    text: str
    id: str | None = None

    def to_node(self, N):
        attrs = {"code": str(int(self.code)), "text": self.text}
        if self.id is not None:
            attrs["id"] = self.id
        return N("error", attrs)

    @classmethod
    def from_node(cls, node):
        rid = node.attrs.get("id")
        return cls(_uint(node, "code"), _attr(node, "text"), rid if valid_id(rid) else None)


@dataclass(frozen=True, slots=True)
class Ping(_IdOnly):
    TAG: ClassVar[str] = "ping"
    SENDER: ClassVar[str] = BOTH


@dataclass(frozen=True, slots=True)
class Pong(_IdOnly):
    TAG: ClassVar[str] = "pong"
    SENDER: ClassVar[str] = BOTH


_ALL = [
    Register, CodeSent, Verify, Registered, AuthStart, AuthChallenge, AuthResponse,
    AuthSuccess, Message, IncomingMessage, ServerAck, DeviceAck, Receipt, IncomingReceipt,
    Presence, PresenceUpdate, ChatState, IncomingChatState, Privacy, PrivacySettings,
    Discover, DiscoverResult, Block, Unblock, BlocklistQuery, Blocklist,
    Logout, DeleteAccount, Error, Ping, Pong,
]  # fmt: skip

#: tag -> event class, for nodes a client sends (what a server receives)
CLIENT_SENT: dict[str, type[Event]] = {c.TAG: c for c in _ALL if c.SENDER in (CLIENT, BOTH)}
#: tag -> event class, for nodes a server sends (what a client receives)
SERVER_SENT: dict[str, type[Event]] = {c.TAG: c for c in _ALL if c.SENDER in (SERVER, BOTH)}
