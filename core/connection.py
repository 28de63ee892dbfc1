"""The connection state machine, for both roles, in the sans-IO style.

Theory of operation.  A ``Connection`` never touches a socket.  Bytes from
the network go in with ``receive_data``; ``next_event`` returns the next
event, or ``NEED_DATA``; ``send(event)`` returns the bytes to write (or
``send_into`` appends them to a buffer, so one write can carry many frames).
The server, both client drivers and the tests all drive this one object.

Both sides send their preamble at once on connecting (``initiate``): the
client's names the dictionary version the connection will use, the server's
the newest one it knows.  The client need not wait for the server's: it may
send its first request right behind its preamble (one round trip saved).  A server that does not know the client's version
answers with error 102, encoded without tokens so any peer can read it, and
closes.

States follow the protocol: HANDSHAKE (a server waiting for the client's
preamble; a client starts past it), UNAUTHENTICATED (registration allowed, login may start),
REGISTERING (``register`` or ``verify`` went: more of them, their answers,
then a login; no ``pair``, so that a registration's ``code`` or ``registered``
never meets a pairing connection; an answer still due when the login has
started goes out in the login's states), PAIRING (a new companion device that sent
``pair`` waits to be linked: only ``pair``, ``ping``, ``pong`` and ``error``
go, then ``registered`` and a login; no ``register`` or ``verify``), the three SCRAM
steps, AUTHENTICATED (messaging), and the terminal CLOSED and ERROR.  The
legal moves are one table, ``TRANSITIONS``, applied alike to what this side
sends and to what it receives; each event class is sent by one role only.

The hot path.  A logged-in client's messages, receipts and device acks
are most of what a server reads.  In that state a server's connection
reads each frame with ``FrameReader.next_hot``, which checks those three
kinds in their short form straight from the received buffer, as their
event classes would, and returns a ``Hot`` record (``kind``: 1 message,
2 receipt, 3 ack) in place of the event; a message's per-device payloads
(``<payload device=...>`` children) come as ``Hot.payloads``, the pairs
``Message.payloads`` holds, with no Node made for them.  Any other frame,
and any hot one that does not pass every check, is decoded in full and
goes through the event classes as before, so errors are exactly the full
path's.  It is a
shortcut inside this state machine, not another one: a ``Hot`` is legal in
the one state that allows its event and changes no state.
The server turns it on (``hot_path=True``); other users of this class
get events only, and the tests compare both paths.

Memory.  A server holds tens of thousands of idle connections, so a
connection owns only what is its own: its state, its peer's preamble and
a ``FrameReader`` that holds nothing while no bytes are pending.  What is
the same for every connection is shared: the accepted dictionaries, equal
``Hello`` records, and the ``Codec``, one per (codec module, dictionary,
limits) and thread (``shared_codec``).  A codec keeps nothing between calls
but its scratch encode buffer (the compiled one's), and an encode or
decode runs to its end without yielding, so the connections of one thread
can take turns with one; a thread of its own gets its own.

Errors.  A framing or codec error means the byte stream cannot be trusted:
``next_event`` raises a fatal ``RemoteProtocolError`` and the connection
enters ERROR, where the only thing left to do is ``send(Error(...))`` and
close.  A well-formed node that is wrong (unknown tag, bad attribute, wrong
state) raises a non-fatal ``RemoteProtocolError`` and the state is
unchanged: answer with its code and carry on.  Trying to send what the
state or role forbids, or an event with a field the peer would refuse
(events.py: each event's ``check``), raises ``LocalProtocolError`` (a bug on
this side) and sends nothing.
"""

from __future__ import annotations

import threading
from enum import Enum, StrEnum

from . import codec as _selected
from .errors import (
    CodecError,
    ErrorCode,
    LocalProtocolError,
    RemoteProtocolError,
    is_fatal,
)
from .events import (
    CLIENT,
    CLIENT_SENT,
    SERVER,
    SERVER_SENT,
    AuthChallenge,
    AuthResponse,
    AuthStart,
    AuthSuccess,
    Block,
    Blocklist,
    BlocklistQuery,
    ChatState,
    CodeSent,
    ConnectionClosed,
    DeleteAccount,
    DeviceAck,
    DeviceList,
    DeviceLists,
    DevicesBatchQuery,
    DevicesChanged,
    DevicesQuery,
    Discover,
    DiscoverResult,
    Error,
    Event,
    GroupNotice,
    GroupRequest,
    GroupResult,
    Hello,
    IncomingChatState,
    IncomingMessage,
    IncomingReceipt,
    KeyBundles,
    KeysChanged,
    KeysCount,
    KeysCountQuery,
    KeysLow,
    KeysQuery,
    KeysUpload,
    Link,
    LinkKey,
    Logout,
    Message,
    Pair,
    PairCode,
    Ping,
    Pong,
    Presence,
    PresenceUpdate,
    Privacy,
    PrivacySettings,
    PushTarget,
    Receipt,
    Register,
    Registered,
    ServerAck,
    Unblock,
    Unlink,
    UploadGrant,
    UploadRequest,
    Verify,
    valid_id,
)
from .node import DEFAULT_LIMITS, Limits
from .tokens import DICTIONARIES, LATEST_VERSION, LITERAL, Dictionary
from .wire import MAGIC, PREAMBLE_SIZE, PROTOCOL_VERSION, preamble


class Role(StrEnum):
    CLIENT = CLIENT
    SERVER = SERVER


class State(Enum):
    HANDSHAKE = "handshake"
    UNAUTHENTICATED = "unauthenticated"
    REGISTERING = "registering"  # register or verify sent: no pair on this connection
    PAIRING = "pairing"  # a companion waiting to be linked (pair sent)
    AUTH_STARTED = "auth-started"  # client-first sent
    AUTH_CHALLENGED = "auth-challenged"  # server-first sent
    AUTH_RESPONDED = "auth-responded"  # client-final sent
    AUTHENTICATED = "authenticated"
    CLOSED = "closed"
    ERROR = "error"

    # Members are singletons: identity hashing is correct and, unlike Enum's
    # Python-level __hash__, costs nothing on the per-event TRANSITIONS lookup.
    __hash__ = object.__hash__


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by next_event when no complete event is buffered.
NEED_DATA = _NeedData()

_S = State
_ANY_LIVE = (_S.UNAUTHENTICATED, _S.REGISTERING, _S.PAIRING, _S.AUTH_STARTED, _S.AUTH_CHALLENGED,
             _S.AUTH_RESPONDED, _S.AUTHENTICATED)  # fmt: skip

#: (state, event class) -> next state.  Error is handled apart: allowed in
#: every state but CLOSED, it moves to CLOSED when its code is fatal.
TRANSITIONS: dict[tuple[State, type[Event]], State] = {
    (_S.HANDSHAKE, Hello): _S.UNAUTHENTICATED,
    (_S.UNAUTHENTICATED, AuthStart): _S.AUTH_STARTED,
    # a registration: a connection that sent register or verify keeps to it (more of
    # them, their answers, then login), so a pair cannot mix its answers with theirs
    (_S.UNAUTHENTICATED, Register): _S.REGISTERING,
    (_S.UNAUTHENTICATED, Verify): _S.REGISTERING,
    (_S.REGISTERING, Register): _S.REGISTERING,
    (_S.REGISTERING, CodeSent): _S.REGISTERING,
    (_S.REGISTERING, Verify): _S.REGISTERING,
    (_S.REGISTERING, Registered): _S.REGISTERING,
    (_S.REGISTERING, AuthStart): _S.AUTH_STARTED,
    # (a server sends these only in REGISTERING, where its register or verify put it;
    # a client whose request went out on bytes made elsewhere takes them as that)
    (_S.UNAUTHENTICATED, CodeSent): _S.REGISTERING,
    (_S.UNAUTHENTICATED, Registered): _S.REGISTERING,
    # a companion: pair (again after 306), refreshed refs, its device and secret, then login
    (_S.UNAUTHENTICATED, Pair): _S.PAIRING,
    (_S.PAIRING, Pair): _S.PAIRING,
    (_S.PAIRING, PairCode): _S.PAIRING,
    (_S.PAIRING, Registered): _S.PAIRING,
    (_S.PAIRING, AuthStart): _S.AUTH_STARTED,
    # a register's or verify's answer that comes after the client went on to log in
    # (it need not wait for it): still its answer, and the state stays
    **{(st, ev): st for st in (_S.AUTH_STARTED, _S.AUTH_CHALLENGED, _S.AUTH_RESPONDED,
                               _S.AUTHENTICATED) for ev in (CodeSent, Registered)},
    (_S.AUTH_STARTED, AuthChallenge): _S.AUTH_CHALLENGED,
    (_S.AUTH_CHALLENGED, AuthResponse): _S.AUTH_RESPONDED,
    (_S.AUTH_RESPONDED, AuthSuccess): _S.AUTHENTICATED,
    **{(_S.AUTHENTICATED, ev): _S.AUTHENTICATED
       for ev in (Message, IncomingMessage, ServerAck, DeviceAck, Receipt, IncomingReceipt,
                  Presence, PresenceUpdate, ChatState, IncomingChatState, Privacy,
                  PrivacySettings, Discover, DiscoverResult, Block, Unblock, BlocklistQuery,
                  Blocklist, Logout, DeleteAccount, Link, LinkKey, DevicesQuery, DeviceList,
                  DevicesBatchQuery, DeviceLists, DevicesChanged, Unlink, KeysUpload, KeysQuery, KeysCountQuery, KeysCount,
                  KeyBundles, KeysLow, KeysChanged, UploadRequest, UploadGrant, GroupRequest,
                  GroupResult, GroupNotice, PushTarget)},
    **{(st, ev): st for st in _ANY_LIVE for ev in (Ping, Pong)},
}  # fmt: skip


#: The dictionaries a server accepts by default (every one but the literal 0).
_ACCEPTED: dict[int, Dictionary] = {k: v for k, v in DICTIONARIES.items() if k > 0}

#: Equal preambles share one Hello (they are frozen).  Only preambles that
#: passed the checks are kept: one protocol version, so at most 256.
_HELLOS: dict[tuple[int, int], Hello] = {}

_local = threading.local()
_CODECS_PER_THREAD = 16  # a bound for processes that make many Limits (tests)


def shared_codec(impl, dictionary: Dictionary, limits: Limits):
    """The one ``impl.Codec(dictionary, limits)`` of this thread (see "Memory")."""
    key = (impl, dictionary, limits)  # a Dictionary by identity, Limits by value
    try:
        codecs = _local.codecs
    except AttributeError:
        codecs = _local.codecs = {}
    codec = codecs.get(key)
    if codec is None:
        if len(codecs) >= _CODECS_PER_THREAD:
            del codecs[next(iter(codecs))]  # the oldest
        codec = codecs[key] = impl.Codec(dictionary, limits)
    return codec


class Connection:
    """One end of a pigeon connection (``role`` is Role.CLIENT or Role.SERVER).

    client: ``dictionary_version`` is the version this connection will use.
    server: ``dictionaries`` are the versions it accepts (default: all known).
    ``codec``: the codec module (pigeon.core._pycodec or pigeon.fastpath._codec);
    default: the one pigeon.core.codec selected.
    """

    __slots__ = ("role", "limits", "_impl", "_dictionaries", "peer_hello", "_pre", "_reader",
                 "_eof", "_error", "dictionary", "_inbound", "state", "_codec", "_node_cls",
                 "hot")  # fmt: skip

    def __init__(
        self,
        role: Role | str,
        *,
        dictionary_version: int = LATEST_VERSION,
        dictionaries: dict[int, Dictionary] | None = None,
        limits: Limits = DEFAULT_LIMITS,
        codec=None,
        hot_path: bool = False,
        login_max_frame: int | None = None,
    ):
        self.role = Role(role)
        self.limits = limits
        self._impl = codec if codec is not None else _selected
        self._dictionaries = (
            _ACCEPTED if not dictionaries else {k: v for k, v in dictionaries.items() if k > 0}
        )
        #: the peer's preamble, once received
        self.peer_hello: Hello | None = None
        self._pre = b""
        # A server reads at most ``login_max_frame`` per frame until the login
        # succeeds (what a peer that has not logged in can make it buffer per
        # connection), ``limits.max_frame`` from then on (``_advance``).
        first = limits.max_frame
        if login_max_frame is not None and self.role is Role.SERVER:
            first = min(login_max_frame, first)
        self._reader = self._impl.FrameReader(first)
        self._eof = False
        self._error: RemoteProtocolError | None = None
        if self.role is Role.CLIENT:
            if dictionary_version not in DICTIONARIES or dictionary_version == 0:
                raise ValueError(f"unknown dictionary version {dictionary_version}")
            self.dictionary = DICTIONARIES[dictionary_version]
            self._inbound = SERVER_SENT
            self.state = State.UNAUTHENTICATED
        else:
            # Until the client's preamble names one, speak without tokens.
            self.dictionary = LITERAL
            self._inbound = CLIENT_SENT
            self.state = State.HANDSHAKE
        self._codec = shared_codec(self._impl, self.dictionary, limits)
        self._node_cls = self._impl.Node
        #: the Hot class of this codec when the hot path is on (a server only)
        self.hot = self._impl.Hot if hot_path and self.role is Role.SERVER else None

    # -- output -----------------------------------------------------------

    def initiate(self) -> bytes:
        """This side's preamble, to write as soon as the transport is up."""
        if self.role is Role.CLIENT:
            return preamble(self.dictionary.version)
        return preamble(max(self._dictionaries))

    def send(self, event: Event) -> bytes:
        """The bytes of one event; the state moves as the protocol says."""
        out = bytearray()
        self.send_into(out, event)
        return bytes(out)

    def send_into(self, out: bytearray, event: Event) -> None:
        """Append the frame for ``event`` to ``out`` (one write for many frames).

        Raises LocalProtocolError, leaving ``out`` and the state as they were,
        for an event the role or state forbids or whose fields break the
        protocol's rules (``Event.check``; not run again for an event
        ``from_node`` built).
        """
        self._check_send(event)
        if not event._parsed:
            event.check()
        node = event.to_node(self._node_cls)
        try:
            self._codec.write_frame(out, node)
        except CodecError as exc:
            raise LocalProtocolError(
                f"cannot encode {type(event).__name__}: {exc}", exc.code
            ) from exc
        self._advance(event)

    def send_ack_into(self, out: bytearray, mid: str, t: int, cls: str = "message") -> None:
        """Append ``ServerAck(mid, t, cls)``'s frame to ``out``, byte for byte
        what ``send_into`` writes for it, without building the event: the
        server's answer to every message and receipt.

        ``mid`` is the id of a message or receipt this peer sent (checked
        when it was read); ``cls`` is "message" or "receipt".  Raises
        LocalProtocolError, leaving ``out`` as it was, where ``send_into``
        would: a client, or a connection not logged in (an ack changes no
        state, so there is nothing to advance)."""
        if self.state is not State.AUTHENTICATED or self.role is not Role.SERVER:
            self._check_send(ServerAck(mid, t, cls))  # (raises: the state forbids it)
            raise LocalProtocolError(f"cannot send ServerAck in state {self.state.value}")
        if cls != "message" and cls != "receipt":
            raise LocalProtocolError(f"send_ack_into answers messages and receipts, not {cls!r}")
        try:
            self._codec.write_ack(out, cls, mid, t)
        except (CodecError, TypeError, OverflowError) as exc:
            raise LocalProtocolError(f"cannot encode ServerAck: {exc}") from exc

    def _check_send(self, event: Event) -> None:
        if isinstance(event, (Hello, ConnectionClosed)):
            raise LocalProtocolError(f"{type(event).__name__} is not sent with send()")
        if event.SENDER not in (self.role, "both"):  # a StrEnum: equal to its value
            raise LocalProtocolError(f"a {self.role.value} does not send {type(event).__name__}")
        if self.state is State.CLOSED:
            raise LocalProtocolError("the connection is closed")
        if isinstance(event, Error):
            return
        if self.state is State.ERROR:
            raise LocalProtocolError("after a protocol error only an error can be sent")
        if (self.state, type(event)) not in TRANSITIONS:
            raise LocalProtocolError(
                f"cannot send {type(event).__name__} in state {self.state.value}"
            )

    def _advance(self, event: Event) -> None:
        if isinstance(event, Error):
            if is_fatal(event.code):
                self.state = State.CLOSED
            return
        state = TRANSITIONS[(self.state, type(event))]
        if state is State.AUTHENTICATED and self.state is not state:
            self._reader.max_frame = self.limits.max_frame  # logged in: the full limit
        self.state = state

    # -- input ------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer; ``b""`` means the peer closed its side.

        Once the connection is over (CLOSED, or ERROR after a protocol
        error) nothing more will be parsed, so what arrives is dropped, not
        buffered: a peer that keeps sending after a fatal error cannot grow
        this side's memory.
        """
        if not data:
            self._eof = True
        elif self.state is State.CLOSED or self.state is State.ERROR:
            return
        elif self.peer_hello is None:
            self._pre += data
        else:
            self._reader.feed(data)

    @property
    def buffered(self) -> int:
        """Received bytes not yet turned into events."""
        return len(self._pre) + self._reader.buffered

    def next_event(self):
        """The next event, or NEED_DATA.  Raises RemoteProtocolError (see module doc)."""
        if self._error is not None:
            raise self._error
        if self.state is State.CLOSED:
            return NEED_DATA
        if self.peer_hello is None:
            if len(self._pre) < PREAMBLE_SIZE:
                return self._closed_or_need()
            return self._handshake()
        try:
            if self.hot is not None and self.state is State.AUTHENTICATED:
                node = self._reader.next_hot(self._codec)
                if type(node) is self.hot:
                    return node
            else:
                node = self._reader.next_node(self._codec)
        except CodecError as exc:
            text = exc.text
            if exc.code == ErrorCode.FRAME_TOO_LARGE and self.state is not State.AUTHENTICATED:
                text += " before login (login-max-frame)"
            raise self._fail(RemoteProtocolError(text, exc.code)) from exc
        if node is None:
            return self._closed_or_need()
        return self._dispatch(node)

    def _closed_or_need(self):
        if self._eof and self.state is not State.CLOSED:
            self.state = State.CLOSED
            return ConnectionClosed()
        return NEED_DATA

    def _fail(self, err: RemoteProtocolError) -> RemoteProtocolError:
        self.state = State.ERROR
        self._error = err
        return err

    def _handshake(self) -> Hello:
        pre, rest = self._pre[:PREAMBLE_SIZE], self._pre[PREAMBLE_SIZE:]
        self._pre = b""
        if pre[:3] != MAGIC:
            raise self._fail(
                RemoteProtocolError(
                    f"bad preamble: expected magic {MAGIC!r}, got {pre[:3]!r}",
                    ErrorCode.BAD_PREAMBLE,
                )
            )
        hello = Hello(pre[3], pre[4])
        if hello.protocol != PROTOCOL_VERSION:
            raise self._fail(
                RemoteProtocolError(
                    f"protocol version {hello.protocol} is not supported (this side speaks "
                    f"{PROTOCOL_VERSION})",
                    ErrorCode.UNSUPPORTED_PROTOCOL,
                )
            )
        if self.role is Role.SERVER:
            if hello.dictionary not in self._dictionaries:
                known = ", ".join(map(str, sorted(self._dictionaries)))
                raise self._fail(
                    RemoteProtocolError(
                        f"token dictionary version {hello.dictionary} is not supported "
                        f"(known: {known})",
                        ErrorCode.UNSUPPORTED_DICTIONARY,
                    )
                )
            self.dictionary = self._dictionaries[hello.dictionary]
            self._codec = shared_codec(self._impl, self.dictionary, self.limits)
            self.state = TRANSITIONS[(State.HANDSHAKE, Hello)]
        hello = self.peer_hello = _HELLOS.setdefault((hello.protocol, hello.dictionary), hello)
        if rest:
            self._reader.feed(rest)
        return hello

    def _dispatch(self, node) -> Event:
        cls = self._inbound.get(node.tag)
        if cls is None:
            rid = node.attrs.get("id")
            raise RemoteProtocolError(
                f"unknown node <{node.tag}>",
                ErrorCode.UNKNOWN_NODE,
                request_id=rid if valid_id(rid) else None,
            )
        event = cls.from_node(node)
        if isinstance(event, Error):
            if is_fatal(event.code):
                self.state = State.CLOSED
            return event
        nxt = TRANSITIONS.get((self.state, cls))
        if nxt is None:
            raise RemoteProtocolError(
                f"<{node.tag}> is not allowed in state {self.state.value}",
                ErrorCode.WRONG_STATE,
                request_id=getattr(event, "id", None),
            )
        self.state = nxt
        return event
