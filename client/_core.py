"""What the asyncio and trio clients share: a sans-IO client session.

``ClientCore`` wraps one ``Connection`` (client role) at a time and knows
which requests are waiting for an answer, but does no I/O and owns no
futures: ``receive(data)`` returns *outcomes* (``Answer``, ``Failure``,
``Deliver``, ``Lost``) and the driver turns them into its own futures and
queues.  A driver is then only: open a socket, pump bytes, map outcomes.

What survives a reconnect lives here too: the highest delivery sequence
handed to the application (``last_seq``, so a redelivery after a reconnect
is dropped, not shown twice), the highest one the application acknowledged
(``acked_seq``: sent again after a re-login, since an ack made while the
connection was down never reached the server, and sent at once for a
redelivery of something already acknowledged, so the server's delivery
window never fills with entries the application will not ack again), and
the messages and receipts sent but not yet acknowledged by the server
(``inflight``), which a resuming client sends again with the same ids after
it has logged in again.  So does the presence the application asked for:
whether this device is available and which users it subscribes to are sent
again after every re-login (subscriptions belong to a connection on the
server).

Keepalive: the server closes a connection it has received nothing from for
its ``idle-timeout`` (error 130; it never pings), so ``ClientAPI._keepalive``
runs beside each connection and pings once ``keepalive`` seconds have passed
without the client sending anything (other traffic resets the server's timer
just as well, so a busy connection never pings).  A ping whose pong does not
come back within ``keepalive_timeout`` means the connection is dead (a NAT
that forgot it, a phone that changed networks): the driver closes it, and
the ordinary reconnect logic takes over.  The task belongs to one
connection: started when it opens, cancelled when it ends.

Hooks: a resuming client tells the application when it goes offline and
when it is back, so a user interface can say so.  ``on_disconnect(why)`` is
called when a connection is lost and a reconnect is about to start (not when
the client ends for good: the iterator ends then, and ``closed`` says why),
``on_reconnect()`` once the device is logged in again and what was waiting
has been sent again.  Both are plain callables run in the client's task:
they must not block; an exception in one is logged and does not stop the
client.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import random
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from scramp import ScramClient, ScramException

from pigeon.core.connection import NEED_DATA, Connection, Role
from pigeon.core.errors import ErrorCode, RemoteProtocolError, is_fatal
from pigeon.core.events import (
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
    GroupNotice,
    GroupResult,
    Hello,
    IncomingMessage,
    IncomingReceipt,
    KeyBundle,
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
    Privacy,
    PrivacySettings,
    PushTarget,
    Receipt,
    Register,
    Registered,
    ServerAck,
    SignedKey,
    Unblock,
    Unlink,
    UploadGrant,
    UploadRequest,
    Verify,
    normalize_link_code,
    signed_key_message,
)
from pigeon.core.node import address_kind

from . import e2e
from .groups import GROUP_KEY_REQUEST, GroupsAPI
from .identity import Identity, format_qr, new_identity, parse_qr
from .secure import E2E_TYPES, GROUP_E2E_TYPE, DecryptionFailed, SecureState

#: After these the server will not take the device back by reconnecting:
#: the device was removed, replaced by a newer login, or its login failed.
TERMINAL_CODES = frozenset({ErrorCode.NOT_AUTHORIZED, ErrorCode.REPLACED, ErrorCode.REVOKED})

logger = logging.getLogger("pigeon.client")

#: Request kinds; a waiting request is keyed (kind, id).
REQ, MESSAGE, RECEIPT, PONG, AUTH, LOGOUT, DELETE, BLOCK, UNBLOCK = (
    "req", "message", "receipt", "pong", "auth", "logout", "delete", "block", "unblock",
)  # fmt: skip
LINK, UNLINK, PAIR, PUSH = "link", "unlink", "pair", "push"
#: Kinds whose answer is an ``ack`` of that class, or an error with the request's id.
_ID_KINDS = (REQ, MESSAGE, RECEIPT, PONG, LOGOUT, DELETE, BLOCK, UNBLOCK, LINK, UNLINK, PUSH)
#: Kinds that are safe to send again after a reconnect (idempotent by id).
REPLAYABLE = (MESSAGE, RECEIPT)


#: what the server queues for a device (acknowledged by ``seq``)
_QUEUED = frozenset(
    {IncomingMessage, IncomingReceipt, DevicesChanged, KeysLow, KeysChanged, GroupNotice}
)


@dataclass(frozen=True)
class Credentials:
    """What a device needs to log in: its address and its 32-byte secret; and its
    identity private key (``identity``, raw 32 bytes: client/identity.py), which
    signs links when the device is a primary.  Credentials saved before identity
    keys were Ed25519 have none (``identity`` None): they log in as before."""

    device: str
    secret: bytes
    identity: bytes | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        out = {"device": self.device, "secret": self.secret.hex()}
        if self.identity is not None:
            out["identity"] = self.identity.hex()
        return out

    @classmethod
    def from_json(cls, d: dict) -> Credentials:
        ident = d.get("identity")
        return cls(d["device"], bytes.fromhex(d["secret"]),
                   bytes.fromhex(ident) if ident else None)  # fmt: skip

    @property
    def user(self) -> str:
        return self.device.partition(":")[0]

    def identity_key(self) -> Identity | None:
        """The identity key pair, or None (old credentials)."""
        return None if self.identity is None else Identity.from_private_bytes(self.identity)


class ServerError(Exception):
    """The server answered with an error node."""

    def __init__(self, code: int, text: str, request_id: str | None = None):
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text
        self.request_id = request_id

    @property
    def name(self) -> str:
        try:
            return ErrorCode(self.code).name
        except ValueError:
            return str(self.code)

    @property
    def terminal(self) -> bool:
        """True when reconnecting cannot help (removed, replaced, login refused)."""
        return self.code in TERMINAL_CODES


class StaleDevices(ServerError):
    """Error 408: a message's per-device payloads did not match the device lists.

    ``missing``: devices that need a payload and had none; ``extra``: devices
    named that are not (or no longer) devices of the account.  Nothing was
    stored: refresh the lists (``devices``), encrypt for them and send again
    (the same id is fine)."""

    def __init__(self, code: int, text: str, request_id: str | None, missing, extra):
        super().__init__(code, text, request_id)
        self.missing = tuple(missing)
        self.extra = tuple(extra)


class ConnectionLost(Exception):
    """The connection closed before the answer came (or for good)."""


@dataclass(frozen=True, slots=True)
class Answer:
    key: tuple[str, str]
    value: object


@dataclass(frozen=True, slots=True)
class Failure:
    key: tuple[str, str]
    error: Exception


@dataclass(frozen=True, slots=True)
class Deliver:
    """An event for the application (deliveries, unsolicited errors, presence)."""

    event: object


@dataclass(frozen=True, slots=True)
class Lost:
    """The connection is gone; ``error`` says why (a ServerError when the server said)."""

    error: Exception


class ScramLogin:
    """The client half of the SCRAM-SHA-256 exchange.

    The password is the device secret as 64 lowercase hex characters, as the
    server derived the device's keys from it (docs/PROTOCOL.md section 8).
    ``c_nonce``: a fixed client nonce, only for reproducing a worked example
    (a real login must use a fresh random one, the default).
    """

    def __init__(self, creds: Credentials, c_nonce: str | None = None):
        self.creds = creds
        self._scram = ScramClient(
            ["SCRAM-SHA-256"], creds.device, creds.secret.hex(), c_nonce=c_nonce
        )

    def first(self) -> AuthStart:
        return AuthStart(self._scram.get_client_first().encode())

    def final(self, challenge: AuthChallenge) -> AuthResponse:
        self._scram.set_server_first(challenge.data.decode("ascii"))
        return AuthResponse(self._scram.get_client_final().encode())

    def check(self, success: AuthSuccess) -> None:
        """Raises scramp.ScramException unless the server proved it knows our keys."""
        self._scram.set_server_final(success.data.decode("ascii"))


#: Seconds without sending after which a client pings.  The server's
#: ``idle-timeout`` is 120 s by default: a quarter of it leaves room for a
#: ping that is lost and for ``DEFAULT_KEEPALIVE_TIMEOUT``.
#: ``plaintext`` of a new client: bodies travel unencrypted (benchmarks, protocol
#: tests) when True; False encrypts end to end (client/secure.py)
PLAINTEXT_DEFAULT = False

DEFAULT_KEEPALIVE = 30.0
#: Seconds a keepalive ping waits for its pong before the connection counts as dead.
DEFAULT_KEEPALIVE_TIMEOUT = 20.0


def check_keepalive(interval: float | None, timeout: float) -> float | None:
    """The keepalive interval to use (None: off); 0 or None turn it off."""
    if not (timeout > 0 and math.isfinite(timeout)):
        raise ValueError(f"keepalive_timeout must be > 0 seconds, got {timeout!r}")
    if interval is None or interval == 0:
        return None
    if not (interval > 0 and math.isfinite(interval)):
        raise ValueError(f"keepalive must be > 0 seconds, or 0/None for off, got {interval!r}")
    return float(interval)


#: users per batched device-list request (the server's devices-query-max default)
DEVICES_QUERY_CHUNK = 256
#: users per key-bundle request (the server's keys-query-max default)
KEYS_QUERY_CHUNK = 200

#: Server answers matched to a REQ waiter by their id.
_ANSWERS = frozenset({GroupResult, PrivacySettings, DiscoverResult, Blocklist, LinkKey, DeviceList,
                      DeviceLists, KeysCount, KeyBundles, UploadGrant})  # fmt: skip


@dataclass(frozen=True, slots=True)
class PairingCode:
    """What a waiting companion shows, as the server issued it: a QR pairing
    (``ref`` and the ``qr`` text to render) or a link ``code`` (``display``: as
    the user types it, ``ABCD-2345``); valid ``ttl`` seconds."""

    ttl: int
    ref: str | None = None
    code: str | None = None
    qr: str | None = None

    @property
    def display(self) -> str | None:
        return None if self.code is None else f"{self.code[:4]}-{self.code[4:]}"


def message_event(to: str, mid: str, type: str, body) -> Message:
    """The Message for ``body``: bytes for every device, a mapping
    {device address: bytes} of per-device payloads, or for a group a pair
    (body, {device address: bytes}): the one body and key shares beside it."""
    if isinstance(body, tuple):
        return Message(to, mid, type, body[0], tuple(body[1].items()))
    if isinstance(body, Mapping):
        return Message(to, mid, type, b"", tuple(body.items()))
    return Message(to, mid, type, body)


def _private(identity) -> bytes | None:
    """What Credentials keep of an identity: the raw private key of a ``cryptography``
    Identity; None for the Olm account's key, which lives in the encrypted profile."""
    return identity.private_bytes() if isinstance(identity, Identity) else None


class ClientCore:
    def __init__(self):
        self.conn: Connection | None = None
        self.out = bytearray()
        self.waiting: set[tuple[str, str]] = set()
        #: (kind, id) -> the event, for messages and receipts not yet acked
        self.inflight: dict[tuple[str, str], object] = {}
        #: highest delivery sequence handed to the application
        self.last_seq = 0
        #: highest delivery sequence the application acknowledged
        self.acked_seq = 0
        self._ack_due = False
        #: deliveries dropped because they were seen before
        self.redelivered = 0
        self.server_hello: Hello | None = None
        #: presence the application asked for, restored after a reconnect
        self.available: bool | None = None
        self.subscriptions: set[str] = set()
        self._ids = itertools.count(1)
        self._prefix = os.urandom(4).hex()
        #: a pairing in progress: its request id, and what came for it (PairCode,
        #: Registered, Error) in order; the pairing's waiter is only woken
        self.pair_id: str | None = None
        self.pair_inbox: deque = deque()
        #: user -> their devices (``devices()``'s last answer), dropped when a
        #: ``DevicesChanged`` notice about that user arrives or a send is refused
        #: with 408 naming one of their devices; ``device_lists_gen`` counts the
        #: drops, so an answer that was under way across one is not kept
        self.device_lists: dict[str, tuple] = {}
        self.device_lists_gen = 0

    def new_id(self) -> str:
        return f"{self._prefix}{next(self._ids):x}"

    def start(self) -> None:
        """A new physical connection: fresh protocol state, the preamble queued."""
        self.conn = Connection(Role.CLIENT)
        self.out = bytearray(self.conn.initiate())
        self._ack_due = False

    def send(self, event) -> None:
        self.conn.send_into(self.out, event)

    def expect(self, kind: str, rid: str, event=None) -> tuple[str, str]:
        """Note that (kind, rid) waits for an answer; ``event`` is kept for a replay."""
        key = (kind, rid)
        self.waiting.add(key)
        if kind in REPLAYABLE and event is not None:
            self.inflight[key] = event
        return key

    def forget(self, key) -> None:
        self.waiting.discard(key)
        self.inflight.pop(key, None)

    def request(self, kind: str, rid: str, event) -> tuple[str, str]:
        # Sent first: an event the connection refuses (LocalProtocolError: a
        # field the server would not accept) is then not left waiting, nor
        # kept for a replay.
        self.send(event)
        return self.expect(kind, rid, event)

    def message(self, to: str, body, type: str, mid: str | None) -> tuple[str, str]:
        mid = mid or self.new_id()
        return self.request(MESSAGE, mid, message_event(to, mid, type, body))

    def receipt(self, to: str, mid: str, type: str, participant=None) -> tuple[str, str]:
        return self.request(RECEIPT, mid, Receipt(to, mid, type, participant))

    def ack(self, seq: int, live: bool) -> None:
        """The application acknowledges deliveries up to ``seq``.

        Acks are cumulative, so they are coalesced: ``take_output`` adds one
        ``ack`` with the highest sequence acknowledged since the last write
        (while ``live``; after a reconnect ``replay`` sends it).
        """
        if seq > self.acked_seq:
            self.acked_seq = seq
            if live:
                self._ack_due = True

    def replay(self) -> int:
        """After a re-login: the application's latest ack, then every message and
        receipt the server has not acked."""
        if self.acked_seq:
            self.send(DeviceAck(self.acked_seq))
        if self.available is not None:
            self.send(Presence("available" if self.available else "unavailable"))
        for user in self.subscriptions:
            self.send(Presence("subscribe", user))
        for event in self.inflight.values():
            self.send(event)
        return len(self.inflight)

    @property
    def has_output(self) -> bool:
        return bool(self.out) or self._ack_due

    def take_output(self) -> bytes | bytearray:
        if self._ack_due:
            self._ack_due = False
            self.send(DeviceAck(self.acked_seq))
        out, self.out = self.out, bytearray()
        return out

    def receive(self, data: bytes) -> list:
        """Feed bytes (b"" for EOF); returns the outcomes, in order."""
        self.conn.receive_data(data)
        outcomes: list = []
        while True:
            try:
                ev = self.conn.next_event()
            except RemoteProtocolError as err:
                outcomes.append(Lost(ConnectionLost(f"protocol error from the server: {err}")))
                return outcomes
            if ev is NEED_DATA:
                return outcomes
            if type(ev) is ConnectionClosed:
                outcomes.append(Lost(ConnectionLost("the server closed the connection")))
                return outcomes
            self._dispatch(ev, outcomes)

    def lost(self, why: Exception) -> list:
        """The connection is gone: every non-replayable waiter fails; replayable ones stay."""
        out = []
        for key in list(self.waiting):
            if key not in self.inflight:
                self.waiting.discard(key)
                out.append(Failure(key, ConnectionLost(str(why))))
        return out

    def fail_all(self, why: Exception) -> list:
        """Closed for good: every waiter fails."""
        out = [Failure(key, why) for key in self.waiting]
        self.waiting.clear()
        self.inflight.clear()
        return out

    def drop_device_lists(self, users) -> None:
        """Forget the cached device lists of ``users``: the next ``devices()`` asks."""
        for user in users:
            self.device_lists.pop(user, None)
        self.device_lists_gen += 1  # even with nothing cached: a query may be under way

    def _answer(self, key, value, outcomes) -> bool:
        if key not in self.waiting:
            return False
        self.forget(key)
        outcomes.append(
            Answer(key, value) if not isinstance(value, Exception) else Failure(key, value)
        )
        return True

    def _dispatch(self, ev, outcomes: list) -> None:
        t = type(ev)
        if self.pair_id is not None and (t is PairCode or t is Registered or t is Error):
            if ev.id == self.pair_id:
                self.pair_inbox.append(ev)
                self._answer((PAIR, ev.id), ev, outcomes)
                if t is Error and is_fatal(ev.code):
                    outcomes.append(Lost(ServerError(ev.code, ev.text, ev.id)))
                return
        if t is DevicesChanged:
            self.drop_device_lists((ev.sender,))  # a redelivery too: dropping is harmless
        if t is KeysChanged:
            self.drop_device_lists((ev.sender,))  # the next send checks the keys again
        if t in _QUEUED:
            if ev.seq <= self.last_seq:
                self.redelivered += 1  # seen before: at-least-once on the wire
                if ev.seq <= self.acked_seq:
                    self._ack_due = True  # acked before the connection broke: again
                return
            self.last_seq = ev.seq
            outcomes.append(Deliver(ev))
        elif t is ServerAck:
            self._answer((ev.cls, ev.id), ev, outcomes)
        elif t is CodeSent or t is Registered or t in _ANSWERS:
            self._answer((REQ, ev.id), ev, outcomes)
        elif t is AuthChallenge or t is AuthSuccess:
            self._answer((AUTH, ""), ev, outcomes)
        elif t is Hello:
            self.server_hello = ev  # the newest dictionary the server knows
        elif t is Pong:
            self._answer((PONG, ev.id), ev, outcomes)
        elif t is Ping:
            self.send(Pong(ev.id))
        elif t is Error:
            if ev.code == ErrorCode.STALE_DEVICES:
                err = StaleDevices(ev.code, ev.text, ev.id, ev.missing, ev.extra)
                self.drop_device_lists(d.partition(":")[0] for d in (*ev.missing, *ev.extra))
            else:
                err = ServerError(ev.code, ev.text, ev.id)
            handled = False
            if ev.id is not None:
                for kind in _ID_KINDS:
                    handled |= self._answer((kind, ev.id), err, outcomes)
            if not handled:
                handled = self._answer((AUTH, ""), err, outcomes)
            if not handled:
                outcomes.append(Deliver(ev))
            if is_fatal(ev.code):
                outcomes.append(Lost(err))  # the server closes after it
        else:
            outcomes.append(Deliver(ev))


class ClientAPI(GroupsAPI):
    """The SDK's methods, written once for both drivers (the group ones: client/groups.py).

    A driver supplies ``core`` (a ClientCore), the attributes ``closed``,
    ``device``, ``_creds`` and ``_live``, ``_wait(key, timeout)`` (flush, then
    wait for the outcome of ``key``) and ``ack(seq)``.
    """

    core: ClientCore
    closed: Exception | None
    device: str | None
    reconnect: bool
    reconnects: int
    backoff: tuple[float, float]
    connect_timeout: float
    _creds: Credentials | None
    _live: bool
    _closing: bool
    #: users per batched devices request (smaller once a server answered 406)
    _devices_chunk: int = DEVICES_QUERY_CHUNK
    #: users per key-bundle request (smaller once a server answered 406)
    _keys_chunk: int = KEYS_QUERY_CHUNK

    #: what a reconnection attempt may fail with and still be retried
    RETRY_ERRORS: tuple = (OSError, ConnectionLost, TimeoutError, ScramException)
    #: reconnection attempts that failed (refused, reset, timed out) before one succeeded
    reconnect_failures: int = 0
    #: seconds without sending after which the client pings (None: never)
    keepalive: float | None = None
    #: seconds a keepalive ping waits for its pong before the connection is dropped
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT
    #: keepalive pings sent, and connections dropped because a pong did not come
    keepalive_pings: int = 0
    keepalive_failures: int = 0
    #: the driver's clock when it last wrote to the connection
    _sent_at: float = 0.0
    #: called with the reason when a connection is lost and a reconnect starts
    on_disconnect = None
    #: called when the device is logged in again after ``on_disconnect``
    on_reconnect = None
    #: end-to-end state (client/secure.py); None in plaintext mode
    secure: SecureState | None = None

    # -- what a driver supplies --------------------------------------------------

    async def _wait(self, key, timeout: float | None):
        """Flush, then wait for the answer to ``key``."""
        raise NotImplementedError

    async def _open(self) -> None:
        """Open a connection, ``core.start()`` it, start pumping it."""
        raise NotImplementedError

    async def _connection_ended(self) -> Exception:
        """Wait until the current connection is gone; returns why."""
        raise NotImplementedError

    def _drop_connection(self) -> None:
        raise NotImplementedError

    async def _sleep(self, seconds: float) -> None:
        raise NotImplementedError

    async def _flush_now(self) -> None:
        raise NotImplementedError

    def _clock(self) -> float:
        """Monotonic seconds, the clock ``_sent_at`` is read on."""
        raise NotImplementedError

    def _connection_dead(self, why: Exception) -> None:
        """Close the current connection, which stopped answering; ``why`` is its end's reason."""
        raise NotImplementedError

    def _push(self, item) -> None:
        """Hand an event (or the final exception) to the application's iterator."""
        raise NotImplementedError

    def _settle(self, key, value, error) -> None:
        """Resolve the waiter of ``key`` with a value or an error."""
        raise NotImplementedError

    def _spawn(self, coro) -> None:
        """Run ``coro`` beside the client (the SDK's own background work)."""
        raise NotImplementedError

    # -- connection life, written once ---------------------------------------------

    def _apply(self, outcomes) -> Exception | None:
        """Hand the core's outcomes out; returns the reason if the connection is lost."""
        lost = None
        for o in outcomes:
            t = type(o)
            if t is Deliver:
                ev = o.event
                if (self.secure is not None and type(ev) is IncomingMessage
                        and ev.group is not None and ev.type == GROUP_E2E_TYPE):  # fmt: skip
                    self._deliver_group(ev)
                elif (self.secure is not None and type(ev) is IncomingMessage
                      and ev.type in E2E_TYPES and ev.group is None):  # fmt: skip
                    self._deliver_encrypted(ev)
                elif (self.secure is not None and type(ev) is IncomingMessage
                      and ev.type == GROUP_KEY_REQUEST and ev.group is None):  # fmt: skip
                    self._group_key_request(ev)  # (plaintext: client/groups.py)
                    self.core.ack(ev.seq, self._live)
                elif type(ev) is GroupNotice:
                    self._group_notice(ev)
                    self._push(ev)
                elif self.secure is not None and type(ev) is IncomingReceipt and ev.type == "retry":
                    self._spawn(self._resend(ev))
                    self.core.ack(ev.seq, self._live)  # the SDK's own business: acked here
                elif (type(ev) is IncomingReceipt and self._key_request_ids
                      and ev.id in self._key_request_ids):  # fmt: skip
                    self.core.ack(ev.seq, self._live)  # about the SDK's own key request
                elif self.secure is not None and type(ev) is KeysLow:
                    self._spawn(self._top_up())
                    self.core.ack(ev.seq, self._live)
                else:
                    self._push(ev)
            elif t is Answer:
                self._settle(o.key, o.value, None)
            elif t is Failure:
                self._settle(o.key, None, o.error)
            elif t is Lost and lost is None:
                lost = o.error
        return lost

    async def _run(self) -> None:
        """The client's life: wait for each connection to end, reconnect if asked to."""
        why: Exception = ConnectionLost("closed")
        try:
            while True:
                why = await self._connection_ended()
                if self._closing or not self.reconnect or self._creds is None:
                    break
                if isinstance(why, ServerError) and why.terminal:
                    break
                self._hook(self.on_disconnect, why)
                if not await self._reconnect():
                    why = self.closed or why
                    break
                # counted once logged in, replayed and flushed, with the hook: one
                # who waits for the count sees the hook's work done
                self.reconnects += 1
                self._hook(self.on_reconnect)
        finally:
            self._finish(why)

    @staticmethod
    def _hook(hook, *args) -> None:
        if hook is None:
            return
        try:
            hook(*args)
        except Exception:  # the application's bug must not end the connection's life
            logger.exception("pigeon client: the %s hook raised", getattr(hook, "__name__", hook))

    async def _reconnect(self) -> bool:
        """Reconnect with jittered exponential backoff, log in again, replay; False if for good."""
        low, high = self.backoff
        delay = low
        while not self._closing:
            await self._sleep(delay * (0.5 + random.random()))
            delay = min(high, delay * 2)
            try:
                await self._open()
                await self._login(self._creds, self.connect_timeout)
            except ServerError as exc:
                self._drop_connection()
                if exc.terminal:
                    self.closed = exc
                    return False
                continue
            except self.RETRY_ERRORS:
                self.reconnect_failures += 1
                self._drop_connection()
                continue
            self._live = True
            self.core.replay()
            await self._flush_now()
            return True
        return False

    async def _keepalive(self) -> None:
        """Ping after ``keepalive`` seconds without sending; drop the connection if no pong.

        Runs for one connection (the driver cancels it when the connection
        ends), also while logging in again: ``ping`` is allowed in every state.
        """
        interval = self.keepalive
        while True:
            due = self._sent_at + interval
            now = self._clock()
            if now < due:
                await self._sleep(due - now)
                continue
            pid = self.new_id()
            self.keepalive_pings += 1
            try:
                await self._wait(self.core.request(PONG, pid, Ping(pid)), self.keepalive_timeout)
            except TimeoutError:
                self.keepalive_failures += 1
                self._connection_dead(
                    ConnectionLost(f"no pong within {self.keepalive_timeout:g} s: connection dead")
                )
                return
            except ServerError:
                pass  # an answer all the same: the connection is alive
            except ConnectionLost:
                return

    def _finish(self, why: Exception) -> None:
        self._live = False
        if self.closed is None:
            self.closed = why
        self._apply(self.core.fail_all(ConnectionLost(str(why))))
        self._push(why)

    # -- the SDK's methods -----------------------------------------------------------

    @property
    def last_seq(self) -> int:
        """The highest delivery sequence handed to the application."""
        return self.core.last_seq

    @property
    def redelivered(self) -> int:
        """Deliveries dropped because the application had them already."""
        return self.core.redelivered

    @property
    def server_hello(self):
        return self.core.server_hello

    def new_id(self) -> str:
        return self.core.new_id()

    def _check_open(self) -> None:
        if self.closed is not None:
            raise ConnectionLost(str(self.closed))
        if not self._live:
            raise ConnectionLost("not connected (reconnecting)")

    async def _request(self, kind: str, rid: str, event, timeout: float | None):
        self._check_open()
        return await self._wait(self.core.request(kind, rid, event), timeout)

    async def register(self, phone: str, method: str = "sms", timeout: float = 30.0) -> int:
        """Ask for a one-time code; returns how many seconds it stays valid."""
        rid = self.new_id()
        ev = await self._request(REQ, rid, Register(rid, phone, method), timeout)
        return ev.ttl

    async def verify(
        self, phone: str, code: str, identity: Identity | None = None, timeout: float = 30.0
    ) -> Credentials:
        """Prove the code; returns the new device's credentials (keep them secret).

        ``identity``: the device's identity key pair; a new one by default
        (``new_identity``).  Its private key is part of the credentials."""
        if identity is None:
            identity = new_identity() if self.secure is None else self.secure.device
        rid = self.new_id()
        ev = await self._request(REQ, rid, Verify(rid, phone, code, identity.public), timeout)
        return Credentials(ev.device, ev.secret, _private(identity))

    async def login(self, creds: Credentials, timeout: float = 30.0) -> int:
        """SCRAM-SHA-256 login; checks the server's proof. Returns the server time (ms)."""
        self._check_open()
        t = await self._login(creds, timeout)
        self._creds = creds
        if self.secure is not None:
            try:
                await self._publish_keys()
            except ServerError as exc:  # e.g. 308: credentials made in plaintext mode
                logger.warning("pigeon client: %s: keys not published (%s): no one can "
                               "encrypt to this device", creds.device, exc)  # fmt: skip
        return t

    async def _login(self, creds: Credentials, timeout: float) -> int:
        scram = ScramLogin(creds)
        self.core.expect(AUTH, "")
        self.core.send(scram.first())
        challenge = await self._wait((AUTH, ""), timeout)
        self.core.expect(AUTH, "")
        self.core.send(scram.final(challenge))
        success = await self._wait((AUTH, ""), timeout)
        scram.check(success)  # raises if the server is not the one that holds our keys
        self.device = creds.device
        # asked again after each login: a server does not queue a stranger's membership
        # notice for a device whose queue is past the strangers' share (client/groups.py)
        self._group_members = None
        return success.t

    async def logout(self, timeout: float = 30.0):
        """Remove this device from the account for good; the server then closes."""
        rid = self.new_id()
        self._creds = None  # nothing to reconnect to
        return await self._request(LOGOUT, rid, Logout(rid), timeout)

    async def delete_account(self, timeout: float = 30.0):
        """Delete the account with all its devices; the server then closes.  From the
        primary only: a linked device gets ServerError 311 (NOT_PRIMARY), and stays
        logged in."""
        rid = self.new_id()
        creds, self._creds = self._creds, None  # (no reconnect after the server's close)
        try:
            return await self._request(DELETE, rid, DeleteAccount(rid), timeout)
        except ServerError:
            self._creds = creds  # refused: the account and this login stay
            raise

    async def send(
        self,
        to: str,
        body,
        type: str = "text",
        id: str | None = None,
        timeout: float | None = 30.0,
    ) -> ServerAck:
        """Send and wait for the server's ack (one tick); raises ServerError if refused.

        ``body``: bytes, the same for every device; or a mapping {device
        address: bytes} with one payload for each device of ``to`` and each
        other device of this account (end-to-end sessions are per device):
        if that set is not exactly the server's device lists the server
        stores nothing and this raises StaleDevices (``missing``, ``extra``).
        ``to`` may also be another device of this account (a device-to-device
        message, e.g. ``type="history"``): it goes to that device only; or a
        group (``g:N``): one body for every member device, encrypted once with
        this device's Megolm session for it (client/groups.py); the ack's
        ``failed`` names members whose queues were full.

        While a resuming client is reconnecting the message waits and goes
        out after the next login (an encrypted one waits before it is
        encrypted, as that may need the recipient's device lists and keys from
        the server; ``timeout`` counts the wait); retrying the same ``id`` is safe.  A field
        the server would refuse (``to`` not a user or group address, an
        ``id`` or ``type`` that is not 1-64 printable ASCII characters, a
        ``body`` that is not bytes) raises LocalProtocolError at once.  Past the
        device's rate (message-rate) the server answers 405, past its
        messages-per-day 302: nothing was stored either way, so the same ``id``
        may be sent again later (a retry of one stored before gets its first
        ack past messages-per-day too).
        """
        if self.secure is not None and isinstance(body, bytes | bytearray):
            # encrypting asks the server (device lists, keys) unless they are held
            # already: while reconnecting it waits for the connection first, as a
            # plaintext send waits in the replay (a request would fail at once)
            timeout = await self._until_live(timeout)
            if address_kind(to) == "group":
                return await self._send_group_secure(to, bytes(body), type, id, timeout)
            return await self._send_secure(to, bytes(body), type, id, timeout)
        return await self._send_raw(to, body, type, id, timeout)

    #: how often a send that waits for the connection looks whether it is back, s
    LIVE_POLL = 0.05

    async def _until_live(self, timeout: float | None) -> float | None:
        """Wait while a resuming client reconnects; returns what is left of
        ``timeout``.  ConnectionLost if the client closes for good meanwhile,
        TimeoutError when ``timeout`` passes first."""
        if self._live:
            return timeout
        start = self._clock()
        while not self._live:
            if self.closed is not None:
                raise ConnectionLost(str(self.closed))
            if timeout is not None and self._clock() - start >= timeout:
                raise TimeoutError(f"not connected again within {timeout:g} s")
            await self._sleep(self.LIVE_POLL)
        return None if timeout is None else max(0.0, timeout - (self._clock() - start))

    async def _send_raw(self, to, body, type, id, timeout) -> ServerAck:
        if self.closed is not None:
            raise ConnectionLost(str(self.closed))
        mid = id or self.new_id()
        if self._live:
            key = self.core.message(to, body, type, mid)
        else:
            event = message_event(to, mid, type, body)
            event.check()  # refused now, not when it is replayed after the next login
            key = self.core.expect(MESSAGE, mid, event)
        return await self._wait(key, timeout)

    # -- end-to-end encryption (client/e2e.py, client/secure.py) -----------------------

    def _init_secure(self, plaintext: bool, profile) -> None:
        """Encryption on (the default) with the state in ``profile`` (memory if None),
        or ``plaintext``: bodies travel as given (benchmarks, protocol tests)."""
        self.plaintext = plaintext
        self.secure = None if plaintext else SecureState(profile)

    def _deliver_encrypted(self, ev) -> None:
        out = self.secure.decrypt(ev)
        if out is None:  # a second copy of a resend already shown
            self.core.ack(ev.seq, self._live)
            return
        if type(out) is DecryptionFailed:
            # the broken session is gone; ask the sender's device for the message again
            self._spawn(self._ask_resend(ev.sender, ev.id))
        elif out.type == GROUP_KEY_REQUEST:  # the SDK's own business (client/groups.py)
            self._group_key_request(out)
            self.core.ack(ev.seq, self._live)
            return
        self._push(out)

    async def _ask_resend(self, device: str, mid: str) -> None:
        """``receipt type="retry"`` to the sender's user (PROTOCOL.md 9c): its device
        that sent ``mid`` opens a new session with this one and sends it again."""
        try:
            await self.receipt(device.partition(":")[0], mid, "retry")
        except (ServerError, ConnectionLost) as exc:
            logger.info("pigeon client: no retry receipt for %s to %s: %s", mid, device, exc)

    def _signed(self, kid: str, key: bytes, fallback: bool = False) -> SignedKey:
        msg = signed_key_message(self.device, kid, key, fallback)
        return SignedKey(kid, key, self.secure.device.sign(msg), fallback)

    async def _upload_keys(self, fallback, otks) -> int:
        """``upload_keys`` of this device's Olm account: the identity keys, a fallback key
        (or None) and one-time keys (sorted by key id), each signed."""
        olm = self.secure.device
        return await self.upload_keys(
            olm.curve25519, olm.ed25519, tuple(self._signed(kid, key) for kid, key in otks),
            None if fallback is None else self._signed(*fallback, fallback=True),
        )  # fmt: skip

    async def _trusted_devices(self, user: str, fresh: bool = False) -> tuple[str, ...]:
        return self._trust(user, await self.devices(user, fresh=fresh))

    def _trust(self, user: str, items) -> tuple[str, ...]:
        """The devices of ``user``'s list ``items`` that its primary linked (every one,
        or E2EError); a change of its safety number goes to the application."""
        trusted, change = self.secure.note_devices(user, items)
        if change is not None:
            self._push(change)
        bad = [d.device for d in items if d.device not in trusted]
        if bad:
            raise e2e.E2EError(
                f"{', '.join(bad)}: not linked by {user}'s primary (its signature does not "
                "verify): not encrypting for it"
            )
        return trusted

    async def _open_sessions(self, devices) -> None:
        """Open a session with every device of ``devices`` that has none, from keys
        fetched from the server's key directory (checked against the device list)."""
        olm = self.secure.device
        users = sorted({d.partition(":")[0] for d in devices if not olm.has_session(d)})
        for bundle in await self._fetch_keys_chunked(users) if users else ():
            d, otk = bundle.device, bundle.one_time_key
            if d not in devices or olm.has_session(d) or otk is None or bundle.ed25519 is None:
                continue
            if self.secure.device_keys.get(d) != bytes(bundle.ed25519):
                raise e2e.KeyMismatch(f"{d}: the key directory's identity key is not the "
                                      "one in the device list")  # fmt: skip
            if not e2e.verify_signature(bundle.ed25519, otk.signature,
                                        signed_key_message(d, otk.key_id, otk.key, otk.fallback)):  # fmt: skip
                raise e2e.KeyMismatch(f"{d}: its one-time key is not signed by its identity key")
            olm.start_session(d, bundle.curve25519, otk.key)
        missing = [d for d in devices if not olm.has_session(d)]
        if missing:
            raise e2e.NoSession(f"no keys published for {', '.join(missing)}")

    async def _send_secure(self, to, body: bytes, type: str, mid, timeout,
                           resend_of: str | None = None) -> ServerAck:  # fmt: skip
        """Encrypt for every device of ``to`` and this account's other devices, send
        the per-device payloads; a 408 (device lists changed) refreshes and tries again."""
        if self.closed is not None:
            raise ConnectionLost(str(self.closed))
        mid = mid or self.new_id()
        me, user = self._creds.user, to.partition(":")[0]
        sealed = self.secure.seal(type, body, resend_of)
        for attempt in range(3):
            if ":" in to:  # a device of this account: one payload, as the body
                devices = (to,)
            else:
                devices = []
                for u in dict.fromkeys((user, me)):
                    trusted = await self._trusted_devices(u, fresh=attempt > 0)
                    devices += [d for d in trusted if d != self.device]
            await self._open_sessions(devices)
            mtype, payloads = self.secure.encrypt(devices, sealed)
            self.secure.remember_sent(mid, to, type, body)
            try:
                return await self._send_raw(to, payloads[to] if ":" in to else payloads,
                                            mtype, mid, timeout)  # fmt: skip
            except StaleDevices:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def _resend(self, ev) -> None:
        """A peer device could not decrypt our message ``ev.id``: a new session with it,
        and the message again under a new id (``resend_of`` names the first)."""
        sent = self.secure.sent.get(ev.id)
        if sent is None:
            return  # another device of this account sent it (or too long ago)
        to = sent[0]
        asker = ev.sender.partition(":")[0]
        me = self._creds.user if self._creds is not None else None
        if asker != to.partition(":")[0] and asker != me:
            # only a device it went to asks: a stranger who guessed the id of a message
            # to someone else (ids are often a prefix and a counter) made this device
            # drop its session with him and send the message again
            return
        self.secure.device.forget(ev.sender)
        self.secure.save()
        to, mtype, body = sent
        try:
            await self._send_secure(to, body, mtype, None, None, resend_of=ev.id)
        except (ServerError, ConnectionLost, e2e.E2EError) as exc:
            logger.info("pigeon client: could not resend %s: %s", ev.id, exc)

    async def _publish_keys(self) -> None:
        """After login: the identity keys, the fallback key and one-time keys, once;
        then only what the server asks for (``_top_up``)."""
        olm = self.secure.device
        if self.secure.published:
            await self._top_up()
            return
        await self._upload_keys(olm.fallback_key(), olm.new_one_time_keys(olm.max_one_time_keys))
        olm.mark_published()
        self.secure.published = True
        self.secure.save()

    async def _top_up(self) -> None:
        """Ask how many one-time keys the server holds for this device; below half the
        maximum, upload new ones up to it (after login, and on a low-keys notice)."""
        olm = self.secure.device
        try:
            have = await self.key_count()
            if have >= olm.max_one_time_keys // 2:
                return
            otks = olm.new_one_time_keys(olm.max_one_time_keys - have)
            if otks:
                await self._upload_keys(None, otks)
        except (ServerError, ConnectionLost) as exc:
            logger.info("pigeon client: one-time keys not uploaded: %s", exc)
            return
        if otks:
            olm.mark_published()
            self.secure.save()

    def safety_number(self, user: str, their_primary_key: bytes) -> str:
        """The 60-digit safety number of this account and ``user`` (client/e2e.py)."""
        mine = self.secure.primaries.get(self._creds.user)
        if mine is None:
            raise ValueError("ask devices() of this account first")
        return e2e.safety_number(self._creds.user, mine, user, their_primary_key)

    async def receipt(
        self, to: str, id: str, type: str = "read", timeout: float | None = 30.0,
        participant: str | None = None,
    ) -> ServerAck:  # fmt: skip
        """Tell ``to`` that its message ``id`` was read (or played); waits for the server's ack.
        In a group, ``to`` is the group and ``participant`` the user who sent it."""
        if self.closed is not None:
            raise ConnectionLost(str(self.closed))
        if self._live:
            key = self.core.receipt(to, id, type, participant)
        else:
            event = Receipt(to, id, type, participant)
            event.check()  # as in send()
            key = self.core.expect(RECEIPT, id, event)
        return await self._wait(key, timeout)

    async def ping(self, timeout: float = 30.0) -> None:
        pid = self.new_id()
        await self._request(PONG, pid, Ping(pid), timeout)

    # -- presence, typing, privacy, contacts, blocking -------------------------------

    async def _tell(self, event) -> None:
        """Send a node that has no answer (while connected; else it is not sent)."""
        if self.closed is not None:
            raise ConnectionLost(str(self.closed))
        if self._live:
            self.core.send(event)
            await self._flush_now()

    async def set_presence(self, available: bool = True) -> None:
        """Mark this device available (the user has the app open) or unavailable.

        Kept and sent again after a reconnect (a new connection starts unavailable).
        """
        self.core.available = available
        await self._tell(Presence("available" if available else "unavailable"))

    async def subscribe(self, user: str) -> None:
        """Get ``user``'s presence now and on every change, as PresenceUpdate events.

        Subscriptions are renewed after a reconnect.
        """
        self.core.subscriptions.add(user)
        await self._tell(Presence("subscribe", user))

    async def unsubscribe(self, user: str) -> None:
        self.core.subscriptions.discard(user)
        await self._tell(Presence("unsubscribe", user))

    async def typing(self, to: str, state: str = "composing") -> None:
        """Typing indicator for ``to``: composing, paused or recording. Never stored:
        sent only while connected, delivered only to devices connected now."""
        await self._tell(ChatState(to, state))

    async def privacy(
        self, last: str | None = None, online: str | None = None, timeout: float = 30.0,
        groupadd: str | None = None,
    ) -> PrivacySettings:  # fmt: skip
        """Read, or change, who sees last seen / online, and who may add this user to
        groups (``groupadd``): everyone, contacts or nobody."""
        rid = self.new_id()
        return await self._request(REQ, rid, Privacy(rid, last, online, groupadd), timeout)

    async def discover(self, phones, type: str = "full", timeout: float = 30.0) -> DiscoverResult:
        """Which of ``phones`` are users (they join the contact set); ``type``: full
        (the whole address book), add, or remove. Raises ServerError 302 past the limit."""
        rid = self.new_id()
        return await self._request(REQ, rid, Discover(rid, type, tuple(phones)), timeout)

    async def block(self, user: str, timeout: float = 30.0) -> ServerAck:
        rid = self.new_id()
        return await self._request(BLOCK, rid, Block(rid, user), timeout)

    async def unblock(self, user: str, timeout: float = 30.0) -> ServerAck:
        rid = self.new_id()
        return await self._request(UNBLOCK, rid, Unblock(rid, user), timeout)

    async def set_push(self, kind: str, token: bytes | str, mute: int = 0, quiet: bool = False,
                       timeout: float = 30.0) -> ServerAck:  # fmt: skip
        """Register (or replace) this device's push target: ``kind`` webhook, fcm, apns
        or webpush, ``token`` the provider's token or endpoint; ``mute``: no wake-up
        before this server time (ms); ``quiet``: a background wake-up only.  The
        server wakes the device when something waits in its queue while it is not
        connected (docs/PROTOCOL.md 9d).  ServerError 200 (bad token), 502 (the
        server sends no push of that kind)."""
        if isinstance(token, str):
            token = token.encode()
        rid = self.new_id()
        return await self._request(PUSH, rid, PushTarget(rid, "set", kind, token, mute, quiet),
                                   timeout)  # fmt: skip

    async def remove_push(self, timeout: float = 30.0) -> ServerAck:
        """Remove this device's push target (no more wake-ups)."""
        rid = self.new_id()
        return await self._request(PUSH, rid, PushTarget(rid, "remove"), timeout)

    # -- linked devices ---------------------------------------------------------------

    def pair_qr(self, name: str | None = None, identity: Identity | None = None,
                server: str | None = None, timeout: float | None = None):  # fmt: skip
        """Pair this (new, not logged-in) device as a companion by QR code.

        An async iterator: a ``PairingCode`` with the ``qr`` text to show,
        again each time the server replaces the reference (every pair-ttl),
        then, once the primary has linked it, the device's ``Credentials``
        (with its identity private key), and it ends.  ``server``: the
        host:port the QR text names (default: the one connected to).
        Raises ServerError 306 when the last reference expires (ask again).
        """
        server = server or f"{getattr(self, 'host', '')}:{getattr(self, 'port', '')}"
        return self._pair("qr", None, name, identity, server, timeout)

    def pair_code(self, phone: str, name: str | None = None, identity: Identity | None = None,
                  timeout: float | None = None):  # fmt: skip
        """Pair as a companion of ``phone``'s account by link code: as ``pair_qr``, the
        ``PairingCode`` has a ``code`` (``display``: ``ABCD-2345``) to type on the primary."""
        return self._pair("code", phone, name, identity, None, timeout)

    async def _pair(self, typ, phone, name, identity, server, timeout):
        identity = identity or (new_identity() if self.secure is None else self.secure.device)
        core = self.core
        self._check_open()
        rid = self.new_id()
        core.send(Pair(rid, typ, identity.public, phone, name))
        core.pair_id = rid
        core.pair_inbox.clear()
        try:
            while True:
                while core.pair_inbox:
                    ev = core.pair_inbox.popleft()
                    if type(ev) is Error:
                        raise ServerError(ev.code, ev.text, ev.id)
                    if type(ev) is Registered:
                        yield Credentials(ev.device, ev.secret, _private(identity))
                        return
                    qr = None if ev.ref is None else format_qr(ev.ref, identity.public, server)
                    yield PairingCode(ev.ttl, ev.ref, ev.code, qr)
                await self._wait(core.expect(PAIR, rid), timeout)
        finally:
            if core.pair_id == rid:
                core.pair_id = None

    def _identity(self) -> Identity:
        if self.secure is not None and self._creds is not None and self._creds.identity is None:
            return self.secure.device  # the Olm account's Ed25519 key signs links
        ident = None if self._creds is None else self._creds.identity_key()
        if ident is None:
            raise ValueError(
                "these credentials have no Ed25519 identity key (made before linking "
                "existed): register this device again to link devices"
            )
        return ident

    async def link(self, qr_text: str | None = None, *, ref: str | None = None,
                   key: bytes | None = None, timeout: float = 30.0) -> str:  # fmt: skip
        """Link the companion whose QR code says ``qr_text`` (or ``ref`` and ``key``)
        to this account; only the primary may.  Returns the new device's address."""
        if qr_text is not None:
            parsed = parse_qr(qr_text)
            ref, key = parsed.ref, parsed.key
        if ref is None or key is None:
            raise ValueError("give the QR text, or ref and key")
        signature = self._identity().sign_link(self._creds.user, key)
        rid = self.new_id()
        ack = await self._request(LINK, rid, Link(rid, ref=ref, key=key, signature=signature),
                                  timeout)  # fmt: skip
        self.core.drop_device_lists((self._creds.user,))  # whether or not the notice came first
        return ack.device

    async def link_code(self, code: str, timeout: float = 30.0) -> str:
        """Link the companion that shows link ``code`` (``ABCD-2345``, any case, dash
        or not): the server is asked for its key, which is signed and sent back."""
        norm = normalize_link_code(code)
        if norm is None:
            raise ValueError(f"not a link code: {code!r} (8 letters and digits, ABCD-2345)")
        ident = self._identity()
        rid = self.new_id()
        answer = await self._request(REQ, rid, Link(rid, code=norm), timeout)
        signature = ident.sign_link(self._creds.user, answer.key)
        rid = self.new_id()
        ack = await self._request(LINK, rid, Link(rid, code=norm, key=answer.key,
                                                  signature=signature), timeout)  # fmt: skip
        self.core.drop_device_lists((self._creds.user,))
        return ack.device

    async def devices(self, user: str, timeout: float = 30.0, fresh: bool = False):
        """``user``'s devices (``DeviceInfo``: address, when added, identity key, and for a
        companion its name and the primary's link signature: check it with
        ``pigeon.client.identity.verify_link``).

        Answers are cached per user and kept fresh: a ``DevicesChanged`` notice
        about the user (the server queues one to each of a user's devices when
        their list changes, so this holds for one's own account) or a send
        refused with 408 (``StaleDevices``) naming one of the user's devices
        drops the cached list, and the next call asks the server again
        (``fresh=True`` always asks)."""
        core = self.core
        if not fresh:
            cached = core.device_lists.get(user)
            if cached is not None:
                return cached
        gen = core.device_lists_gen
        rid = self.new_id()
        items = (await self._request(REQ, rid, DevicesQuery(rid, user), timeout)).items
        if gen == core.device_lists_gen:  # no notice came meanwhile: the answer is current
            core.device_lists[user] = items
        return items

    async def devices_of(self, users, timeout: float = 30.0, fresh: bool = False) -> dict:
        """``devices`` of many users at once: {user: its DeviceInfo tuple}, in the order
        given.  Cached lists are used as ``devices`` uses them; the others are asked
        for ``DEVICES_QUERY_CHUNK`` users per request (one ``devices`` with an
        ``<item user>`` each: the server's ``devices-query-max``).  ServerError 400
        (one of them is not a registered user: its number in the text), 302; a 406
        (the server's limit is lower) makes the requests smaller, and they go on."""
        core = self.core
        users = list(dict.fromkeys(users))
        out = {}
        want = []
        for u in users:
            cached = None if fresh else core.device_lists.get(u)
            if cached is None:
                want.append(u)
            else:
                out[u] = cached

        async def ask(chunk):
            gen = core.device_lists_gen
            rid = self.new_id()
            return gen, await self._request(REQ, rid, DevicesBatchQuery(rid, chunk), timeout)

        async for gen, answer in self._batches(want, "_devices_chunk", ask):
            for u, items in answer.lists:
                out[u] = items
                if gen == core.device_lists_gen:  # no notice came meanwhile: it is current
                    core.device_lists[u] = items
        return {u: out.get(u, ()) for u in users}

    async def unlink(self, device: str, timeout: float = 30.0) -> ServerAck:
        """Unlink ``device`` (the primary: any companion; a companion: itself, after
        which the server closes this connection)."""
        rid = self.new_id()
        if device == self.device:
            self._creds = None  # nothing to reconnect to
        try:
            return await self._request(UNLINK, rid, Unlink(rid, device), timeout)
        finally:
            self.core.drop_device_lists((device.partition(":")[0],))

    # -- the key directory (PROTOCOL.md section 9c) -------------------------------------

    async def upload_keys(self, curve25519: bytes, ed25519: bytes, one_time_keys=(),
                          fallback: SignedKey | None = None, timeout: float = 30.0) -> int:  # fmt: skip
        """Publish this device's identity keys (``ed25519`` must be the identity key it
        registered or was linked with), one-time keys and a fallback key (``SignedKey``s,
        signed over ``signed_key_message``; ``pigeon.client.keys.vodozemac_keys`` makes
        them from a vodozemac ``Account``).  Returns how many one-time keys the server
        now holds for this device.  ServerError 308 (not the identity key), 312 (a bad
        signature), 313 (past ``one-time-keys-max``)."""
        rid = self.new_id()
        ev = KeysUpload(rid, curve25519, ed25519, tuple(one_time_keys), fallback)
        return (await self._request(REQ, rid, ev, timeout)).count

    async def key_count(self, timeout: float = 30.0) -> int:
        """How many of this device's one-time keys the server holds."""
        rid = self.new_id()
        return (await self._request(REQ, rid, KeysCountQuery(rid), timeout)).count

    async def fetch_keys(self, users, timeout: float = 30.0) -> tuple[KeyBundle, ...]:
        """The key bundles (``KeyBundle``) of every device of ``users`` (a user or an
        iterable of users): identity keys and one one-time key each, consumed by this
        fetch (``one_time_key.fallback`` when it is the device's fallback key; None when
        the device has none; identity keys None when it published nothing).  Verify
        each one-time key's signature with the bundle's Ed25519 key before use.
        ServerError 302 (the fetch or lookup limit), 400 (not a user), 406 (too many users)."""
        users = (users,) if isinstance(users, str) else tuple(users)
        rid = self.new_id()
        return (await self._request(REQ, rid, KeysQuery(rid, users), timeout)).bundles

    async def _fetch_keys_chunked(self, users, timeout: float = 30.0) -> list:
        """``fetch_keys`` for ``users`` in requests of at most ``_keys_chunk`` users
        (``_batches``: a refused request took no key)."""
        out = []
        async for bundles in self._batches(users, "_keys_chunk",
                                           lambda chunk: self.fetch_keys(chunk, timeout)):  # fmt: skip
            out += bundles
        return out

    async def _batches(self, items, size_attr: str, ask):
        """The answers of ``ask(chunk)`` for ``items`` in chunks of at most the
        attribute ``size_attr`` of this client; a 406 (the server's limit is lower)
        halves it and asks again, so later requests are the size the server takes."""
        i = 0
        while i < len(items):
            chunk = tuple(items[i : i + getattr(self, size_attr)])
            try:
                answer = await ask(chunk)
            except ServerError as exc:
                if exc.code != ErrorCode.TOO_MANY or len(chunk) == 1:
                    raise
                setattr(self, size_attr, max(1, len(chunk) // 2))
                continue
            i += len(chunk)
            yield answer

    async def retry_receipt(self, to: str, id: str, timeout: float | None = 30.0) -> ServerAck:
        """Ask the sender ``to`` to send message ``id`` again (this device could not
        decrypt it): a ``retry`` receipt, delivered from this device's address."""
        return await self.receipt(to, id, "retry", timeout)

    async def request_upload(self, size: int, sha256: bytes, media_class: str = "document",
                             timeout: float = 30.0):  # fmt: skip
        """Ask for the right to upload ``size`` bytes of ciphertext whose SHA-256 is
        ``sha256``: an ``UploadGrant`` (``url``, ``token``, ``ttl``); ServerError 420
        (too big), 421 (daily quota) or 405/302 (rate) if refused.  ``send_media``
        (pigeon.client.media) does the whole upload."""
        rid = self.new_id()
        return await self._request(REQ, rid, UploadRequest(rid, size, sha256, media_class),
                                   timeout)  # fmt: skip

    async def blocklist(self, timeout: float = 30.0) -> tuple[str, ...]:
        """The users this account blocks, oldest block first."""
        rid = self.new_id()
        return (await self._request(REQ, rid, BlocklistQuery(rid), timeout)).users
