"""A worker process: one uvloop loop, its own listening socket, its sessions.

Theory of operation.  Every worker binds the listening port itself with
SO_REUSEPORT (SO_REUSEPORT_LB on FreeBSD), so the kernel spreads new
connections over the workers; nothing Python-level is shared between them.
Each connection is a ``Session`` (an asyncio Protocol) driving the sans-IO
``Connection``: bytes in, events out, and every frame for the connection
appended to one output buffer that is written once per loop tick.

Store and forward (server/queues.py).  What a worker's connections ask for
during one loop tick (messages and receipts to store, cumulative device
acks) is gathered and written in one LMDB write transaction at the end of
the tick (``Worker.tick``); only after it commits do senders get their
``ack`` and recipients their entries.  Every delivery comes from the
device's queue: the committing worker pushes the entries it just stored to
the devices it holds, and sends a PUSH record (the stored entry) over the
bus (server/bus.py) to the worker that holds any other recipient device
(the store's session table says which).  A delivery frame is spliced from
the stored entry straight into the connection's output buffer
(``FrameEncoder.write``): the body is never re-encoded.  Records for one
peer are batched per tick.

Flow control.  A session pushes at most ``delivery_window`` entries past
the device's last ack; the rest stay in LMDB and are read from there as acks
come (``Session.refill``), which is also how a device's backlog is served
at login.  When the transport's buffer passes ``write_buffer_high`` the
session stops pushing and stops reading the client until it drains below
``write_buffer_low``: a client that does not read cannot grow server memory.

Presence (server/presence.py, server/social.py): a device's availability
is written to the store; the users whose presence changed during the tick
are noted to every other worker at the end of it (a PRESENCE record) and
each worker pushes the change to its own subscribers, as each may see it.
Typing indicators (``chatstate``) go straight to the recipient's connected
devices (a TYPING record for another worker's) and are never stored.
Per-connection token buckets limit messages and requests (``message-rate``)
and typing (``typing-rate``).

The worker exits by itself when the supervisor goes (the parent-death pipe
reaches EOF, whatever killed the supervisor), and drains on SIGTERM.  Its
settings arrive on a pipe (``--config-fd``), never in argv, which any local
user can read; with them comes what the supervisor runs (its worker module
file and codec), and a worker that runs other code refuses to start.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import signal
import socket
import ssl
import sys
import time
from collections import Counter

import lmdb
import orjson
from scramp import ScramException

from pigeon.core import codec as core_codec
from pigeon.core.connection import NEED_DATA, Connection, Role
from pigeon.core.errors import ErrorCode, LocalProtocolError, RemoteProtocolError, is_fatal
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
    Discover,
    DiscoverResult,
    Error,
    Logout,
    Message,
    Ping,
    Pong,
    Presence,
    Privacy,
    PrivacySettings,
    Receipt,
    Register,
    Registered,
    ServerAck,
    Unblock,
    Verify,
)
from pigeon.core.node import DEFAULT_LIMITS, Limits, address_kind

from . import log
from .accounts import Accounts, ServiceError, make_gateway
from .bus import Bus
from .config import load
from .limits import Bucket, LeakyTable, source_key
from .metrics import SNAPSHOT_INTERVAL, WorkerStats
from .presence import PresenceHub
from .queues import FrameEncoder, QueueLimits, Queues, Send
from .social import Social
from .store import Store

# Bytes a delivery frame may add to the payload of the message it carries
# (from, t, seq in place of to): a message body may be at most
# max_frame - PAYLOAD_HEADROOM bytes, so its delivery always fits in a frame.
PAYLOAD_HEADROOM = 256

logger = logging.getLogger("pigeon.worker")

HOT = core_codec.Hot
HOT_MESSAGE, HOT_ACK = 1, 3  # Hot.kind (2 is a receipt)

#: Requests that draw on a connection's message-rate bucket (typing has its own).
RATED = frozenset({Message, Receipt, Presence, Privacy, Discover, Block, Unblock, BlocklistQuery})

SWEEP_INTERVAL = 1.0
LINGER = 2.0  # seconds a closing connection waits for the client to close
WID_STRIDE = 1024  # worker id = generation * WID_STRIDE + index
FULL_LOG_INTERVAL = 10.0


def reuseport_option() -> int | None:
    """The socket option that spreads connections over listeners on this OS."""
    if sys.platform.startswith("freebsd"):
        # FreeBSD 12+: plain SO_REUSEPORT lets one socket take every connection.
        return getattr(socket, "SO_REUSEPORT_LB", 0x00010000)
    return getattr(socket, "SO_REUSEPORT", None)


def listen_socket(hostport: str, backlog: int = 1024) -> socket.socket:
    host, _, port = hostport.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        opt = reuseport_option()
        if opt is not None:
            sock.setsockopt(socket.SOL_SOCKET, opt, 1)
        sock.bind((host, int(port)))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def raise_open_files_limit(want: int | None = None) -> int | None:
    """Lift the soft RLIMIT_NOFILE toward the hard one: to ``want`` descriptors if given
    (never lowering it), else all the way.  Returns the soft limit now in force, or
    None if there is none (or no ``resource`` module to ask)."""
    try:
        import resource
    except ImportError:  # not a Unix
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if want is not None:
        target = min(target, want)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def scram_username(client_first: bytes) -> str | None:
    """The n= field of a SCRAM client-first-message ("n,,n=USER,r=NONCE")."""
    try:
        text = client_first.decode("ascii")
    except UnicodeDecodeError:
        return None
    parts = text.split(",")
    if len(parts) < 4 or not parts[2].startswith("n="):
        return None
    return parts[2][2:].replace("=2C", ",").replace("=3D", "=")


class Session(asyncio.Protocol):
    """One client connection."""

    def __init__(self, worker: Worker, tls: ssl.SSLContext | None = None):
        self.worker = worker
        self.tls = tls  # the server context of a TLS listener's connection
        self.transport = None  # for TLS: set once the handshake is done
        self.id = next(worker.ids)
        self.conn = Connection(Role.SERVER, limits=worker.limits, hot_path=True)
        self.out = bytearray()
        self.flush_pending = False
        self.closing = False
        self.ip = "?"
        self.source = "?"  # the unit of per-address limits (limits.source_key)
        self.device: str | None = None
        self.user: str | None = None
        self.scram = None
        self.login_user: str | None = None
        self.last_seen = 0.0
        self.deadline = None
        # delivery: highest seq written to this connection, highest acked,
        # whether the queue may hold more than was pushed, transport too full
        self.pushed = 0
        self.acked = 0
        self.backlog = False
        self.paused = False
        self.linger = None  # the abort timer of a graceful close
        # made on first use: presence subscriptions, rate buckets
        self.subs: set[str] | None = None
        self.bucket: Bucket | None = None
        self.typing: Bucket | None = None
        self.typing_warned = 0.0

    # -- transport callbacks ----------------------------------------------

    def connection_made(self, transport) -> None:
        if self.tls is None:
            peer = transport.get_extra_info("peername")
            self.accepted(peer[0] if peer else "?")
        # TLS: counted at the TCP accept (Worker.accept_tls); the handshake is done now
        self._ready(transport)

    def accepted(self, ip: str) -> bool:
        """A TCP connection was accepted: count it, start the login deadline.

        Every limit counts from here, TLS or not (a TLS connection is counted
        before its handshake, which the login deadline bounds).  False: a
        TLS connection past a cap, to be closed at once without a handshake
        (no error can reach it before one, and handshakes are what a flood
        of them would cost); a plain one is told why instead.
        """
        w = self.worker
        self.ip = ip
        self.source = source_key(ip)
        self.last_seen = w.loop.time()
        self.out += self.conn.initiate()
        w.sessions[self.id] = self
        w.per_ip[self.source] += 1
        refuse = None
        if len(w.sessions) > w.max_connections:
            w.refused_full += 1
            refuse = (ErrorCode.UNAVAILABLE, "the server is at its connection limit; try later")
        elif w.per_ip[self.source] > w.config.max_connections_per_ip:
            refuse = (ErrorCode.RATE_LIMITED, "too many connections from this address")
        elif w.draining:
            refuse = (ErrorCode.SHUTTING_DOWN, "the server is shutting down; reconnect later")
        if refuse is None:
            self.deadline = w.loop.call_later(w.config.login_timeout, self._login_timeout)
            return True
        if self.tls is not None and refuse[0] != ErrorCode.SHUTTING_DOWN:
            self.closing = True
            self.connection_lost(None)
            return False
        self.fail(*refuse)  # written once the transport is up
        return True

    def _ready(self, transport) -> None:
        """The transport to write on (plain TCP at once; TLS after its handshake)."""
        w = self.worker
        self.transport = transport
        transport.set_write_buffer_limits(
            high=w.config.write_buffer_high, low=w.config.write_buffer_low
        )
        self._schedule_flush()

    async def handshake(self, sock) -> None:
        """TLS on an accepted socket, within what is left of the login deadline."""
        w = self.worker
        timeout = max(0.1, w.config.login_timeout - (w.loop.time() - self.last_seen))
        try:
            await w.loop.connect_accepted_socket(
                lambda: self,
                sock,
                ssl=self.tls,
                ssl_handshake_timeout=timeout,
            )
        except Exception:  # a failed or timed-out handshake, a reset: the connection is over
            sock.close()
            self.connection_lost(None)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            # Closing: what still arrives is dropped unread (and does not
            # count as traffic); the linger timer ends the connection.
            return
        self.last_seen = self.worker.loop.time()
        self.conn.receive_data(data)
        while not self.closing:
            try:
                ev = self.conn.next_event()
            except RemoteProtocolError as err:
                self.send(Error(err.code, err.text, err.request_id))
                if err.fatal:
                    self.close_soon()
                continue
            if ev is NEED_DATA:
                break
            try:
                self.handle(ev)
            except ServiceError as err:
                self.send(Error(err.code, err.text, getattr(ev, "id", None)))
            except lmdb.Error as exc:
                self.store_failed(exc, getattr(ev, "id", None))

    def store_failed(self, exc: lmdb.Error, request_id: str | None) -> None:
        """A store error inside a request: the documented error, never a traceback."""
        w = self.worker
        if isinstance(exc, lmdb.MapFullError):
            w.store_full_log(exc)
            self.send(Error(ErrorCode.STORE_FULL, "the server cannot store this now; retry later",
                            request_id))  # fmt: skip
            return
        log.event(logger, logging.ERROR, "store error", worker=w.index, conn=self.id,
                  error=str(exc))  # fmt: skip
        self.fail(ErrorCode.INTERNAL, "internal error; reconnect later")

    def eof_received(self):
        self.conn.receive_data(b"")
        return False

    def pause_writing(self) -> None:
        # The client is not reading: stop pushing, and stop reading what it
        # sends (its acks and answers would pile up here otherwise).
        self.paused = True
        if not self.closing:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if not self.closing:
            self.transport.resume_reading()
            if self.backlog:
                self.refill()
            if self.subs:
                self.worker.presence.refresh(self)

    def connection_lost(self, exc) -> None:
        self.closing = True
        if self.deadline is not None:
            self.deadline.cancel()
        if self.linger is not None:
            self.linger.cancel()
        w = self.worker
        if w.sessions.pop(self.id, None) is None:
            return  # already gone (a TLS connection can be told twice)
        w.per_ip[self.source] -= 1
        if w.per_ip[self.source] <= 0:
            del w.per_ip[self.source]
        if self.scram is not None and self.device is None and not w.draining:
            self._login_failed("abandoned")  # a challenge nobody answered counts too
        if self.device is not None:
            try:
                w.detach(self)
            except lmdb.Error as exc:
                log.event(logger, logging.ERROR, "could not clear a session", worker=w.index,
                          device=self.device, error=str(exc))  # fmt: skip
        if self.subs is not None:
            w.presence.drop(self)

    # -- output -------------------------------------------------------------

    def send(self, event) -> None:
        if self.closing and self.transport is None:
            return
        if type(event) is Error:
            self.worker.stats.error(int(event.code))
        try:
            self.conn.send_into(self.out, event)
        except LocalProtocolError as exc:
            log.event(
                logger,
                logging.WARNING,
                "dropped an event the state forbids",
                conn=self.id,
                event=type(event).__name__,
                why=str(exc),
            )
            return
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self.flush_pending:
            self.flush_pending = True
            self.worker.dirty(self)

    def _flush(self) -> None:
        self.flush_pending = False
        if self.transport is None or self.transport.is_closing():
            return
        if self.out:
            out, self.out = self.out, bytearray()
            self.transport.write(out)
        if self.closing and self.linger is None:
            self._linger()

    def _linger(self) -> None:
        """Close gracefully: send EOF after the last frame and let the client close.

        Closing a socket that still holds unread input makes the kernel send
        a reset, and a reset can destroy the client's copy of the error that
        explains the close.  So: half-close, ignore what still arrives, and
        abort only if the client has not closed within LINGER seconds.
        """
        t = self.transport
        self.linger = self.worker.loop.call_later(LINGER, t.abort)
        try:
            if t.can_write_eof():
                t.write_eof()
                return
        except (NotImplementedError, OSError, RuntimeError):
            pass
        t.close()  # TLS cannot half-close: close_notify, aborted like the rest

    def fail(self, code: ErrorCode, text: str) -> None:
        self.send(Error(code, text))
        self.close_soon()

    def close_soon(self) -> None:
        """Close after what is buffered has been written."""
        self.closing = True
        self._schedule_flush()

    def _login_timeout(self) -> None:
        if self.transport is None:
            # Still in the TLS handshake, whose own timeout (what was left of
            # this one) ends it; if it ends well just now, look again soon.
            self.deadline = self.worker.loop.call_later(0.5, self._login_timeout)
            return
        if self.device is None and not self.closing:
            self.fail(ErrorCode.TIMEOUT, "login not finished in time")

    # -- delivery from the queue --------------------------------------------------

    def offer(self, seq: int, entry) -> None:
        """An entry just committed to this device's queue: push it if the window allows."""
        if seq <= self.pushed or self.closing or self.device is None:
            return
        if (
            seq == self.pushed + 1
            and not self.backlog
            and not self.paused
            and seq - self.acked <= self.worker.delivery_window
            and self.buffered() < self.worker.write_buffer_high
        ):
            self.worker.encode_entry(self.out, entry, seq)
            self.pushed = seq
            self.worker.stats.counters["entries_out"] += 1
            self._schedule_flush()
            return
        # Out of order (another worker's commit overtook), window full or
        # transport full: it is in the queue; read it from there when there is room.
        self.backlog = True
        self.refill()

    def buffered(self) -> int:
        """Bytes waiting to reach the client: this tick's output and the transport's buffer."""
        t = self.transport
        return len(self.out) + (t.get_write_buffer_size() if t is not None else 0)

    def refill(self) -> None:
        """Push queued entries past ``pushed``: as many as the window has room for and
        as many bytes as fit under write-buffer-high (whichever ends first)."""
        w = self.worker
        room = w.delivery_window - (self.pushed - self.acked)
        if room <= 0 or self.paused or self.closing or self.device is None:
            return
        budget = w.write_buffer_high - self.buffered()
        if budget <= 0:
            self.backlog = True
            return
        n, size, last = w.queues.read_into(self.out, self.device, self.pushed, room, budget)
        if n:
            self.pushed = last
            self.worker.stats.counters["entries_out"] += n
            self._schedule_flush()
        self.backlog = n == room or size >= budget

    def device_ack(self, seq: int) -> None:
        self.worker.stats.counters["device_acks"] += 1
        if seq <= self.acked:
            return
        self.acked = seq
        if seq > self.pushed:
            self.pushed = seq  # acked from an earlier connection: nothing to push below it
        self.worker.ack(self.device, seq)
        if self.backlog:
            self.refill()

    # -- events ---------------------------------------------------------------

    def allowed(self, ev) -> bool:
        """Draw on the connection's message-rate bucket; answer 405 if it is empty."""
        w = self.worker
        now = w.loop.time()
        if self.bucket is None:
            self.bucket = Bucket(w.config.message_rate, w.config.message_burst, now)
        if self.bucket.take(now):
            return True
        w.stats.counters["rate_limited"] += 1
        self.send(Error(ErrorCode.TOO_FAST,
                        f"sending too fast: at most {w.config.message_rate:g} a second "
                        f"(bursts of {w.config.message_burst}); retry later",
                        getattr(ev, "id", None)))  # fmt: skip
        return False

    def handle(self, ev) -> None:
        t = type(ev)
        w = self.worker
        if t is HOT:  # a message, receipt or ack the hot path read (core/connection.py)
            kind = ev.kind
            if kind == HOT_ACK:
                self.device_ack(ev.seq)
            elif self.allowed(ev):
                w.route(self, ev.to, ev.id, "message" if kind == HOT_MESSAGE else "receipt",
                        ev.type, ev.body)  # fmt: skip
            return
        if t in RATED and not self.allowed(ev):
            return
        if t is Message:
            w.route(self, ev.to, ev.id, "message", ev.type, ev.body)
        elif t is DeviceAck:
            self.device_ack(ev.seq)
        elif t is Receipt:
            w.route(self, ev.to, ev.id, "receipt", ev.type, None)
        elif t is Ping:
            self.send(Pong(ev.id))
        elif t is ChatState:
            w.chatstate(self, ev)
        elif t is Presence:
            w.presence_request(self, ev)
        elif t is Privacy:
            changes = {k: v for k, v in (("last", ev.last), ("online", ev.online)) if v}
            settings, changed = w.social.privacy(self.user, changes)
            self.send(PrivacySettings(ev.id, settings["last"], settings["online"]))
            if changed:
                w.presence.note(self.user)
        elif t is Discover:
            users, left, changed = w.social.discover(self.user, ev.type, ev.phones)
            self.send(DiscoverResult(ev.id, tuple(users), left))
            if changed:
                w.presence.note(self.user)  # who counts as a contact changed
        elif t is Block:
            self.send(ServerAck(ev.id, w.social.block(self.user, ev.to), "block"))
            w.presence.note(self.user)
        elif t is Unblock:
            self.send(ServerAck(ev.id, w.social.unblock(self.user, ev.to), "unblock"))
            w.presence.note(self.user)
        elif t is BlocklistQuery:
            self.send(Blocklist(ev.id, tuple(w.social.blocklist(self.user))))
        elif t is Register:
            w.spawn(self._register(ev))
        elif t is Verify:
            w.spawn(self._verify(ev))
        elif t is AuthStart:
            self._auth_start(ev)
        elif t is AuthResponse:
            self._auth_response(ev)
        elif t is Logout:
            self._leave(ev.id, "logout")
        elif t is DeleteAccount:
            self._leave(ev.id, "delete")
        elif t is Error:
            if w.client_log(self):
                log.event(logger, logging.INFO, "client reported an error", conn=self.id,
                          ip=self.ip, code=ev.code)  # fmt: skip
            if is_fatal(ev.code):
                self.close_soon()  # the client is closing: so do we (its state is CLOSED)
        elif t is ConnectionClosed:
            self.close_soon()
        # Hello, Pong: nothing to do

    async def _register(self, ev: Register) -> None:
        try:
            ttl = await self.worker.accounts.request_code(ev.phone, ev.method, self.ip)
        except ServiceError as err:
            self.send(Error(err.code, err.text, ev.id))
            return
        except lmdb.Error as exc:
            self.store_failed(exc, ev.id)
            return
        self.send(CodeSent(ev.id, ttl))

    async def _verify(self, ev: Verify) -> None:
        w = self.worker
        try:
            # PBKDF2 for the new device's SCRAM keys: off the loop.
            address, secret, removed = await asyncio.to_thread(
                w.accounts.verify, ev.phone, ev.code, ev.identity_key
            )
        except ServiceError as err:
            self.send(Error(err.code, err.text, ev.id))
            return
        except lmdb.Error as exc:
            self.store_failed(exc, ev.id)
            return
        for old in removed:
            w.revoke(old, ErrorCode.REVOKED, "this number was registered on another device")
        log.event(logger, logging.INFO, "device registered", device=address)
        self.send(Registered(ev.id, address, secret))

    def _leave(self, request_id: str, what: str) -> None:
        """Logout (this device goes) or account deletion (every device goes)."""
        w = self.worker
        device = self.device
        w.detach(self)
        self.device = None
        if what == "logout":
            w.store.remove_device(device)
            others = []
        else:
            others = [d for d in w.store.delete_account(self.user) if d != device]
        self.send(ServerAck(request_id, w.store.clock(), what))
        self.close_soon()
        for d in others:
            w.revoke(d, ErrorCode.REVOKED, "the account was deleted")
        log.event(
            logger,
            logging.INFO,
            "device logged out" if what == "logout" else "account deleted",
            device=device,
            devices_removed=1 + len(others),
        )

    def _auth_start(self, ev: AuthStart) -> None:
        w = self.worker
        acc = w.accounts
        user = scram_username(ev.data)
        if user is None or address_kind(user) != "device":
            return self.fail(
                ErrorCode.NOT_AUTHORIZED, "login failed: the SCRAM user must be a device address"
            )
        if not acc.login_allowed(user, self.ip):
            w.stats.counters["login_refused"] += 1
            return self.fail(ErrorCode.RATE_LIMITED, "too many failed logins; try again later")
        acct = w.store.account(user.partition(":")[0])
        if acct is not None and acct.get("disabled"):
            return self.fail(ErrorCode.NOT_AUTHORIZED, "login refused: this account is disabled")
        self.scram = acc.scram_server()
        try:
            self.scram.set_client_first(ev.data.decode("ascii"))
            first = self.scram.get_server_first()
        except ScramException:
            self.scram = None
            return self.fail(ErrorCode.NOT_AUTHORIZED, "login failed: bad SCRAM message")
        self.login_user = user
        self.send(AuthChallenge(first.encode()))

    def _login_failed(self, why: str) -> None:
        """Count a failed or abandoned login (the challenge was sent, no valid proof came)."""
        w = self.worker
        self.scram = None
        w.accounts.login_failed(self.login_user, self.ip)
        w.stats.counters["login_failures"] += 1
        if w.client_log(self):
            log.event(logger, logging.INFO, "login failed", device=self.login_user, ip=self.ip,
                      why=why)  # fmt: skip

    def _auth_response(self, ev: AuthResponse) -> None:
        w = self.worker
        try:
            self.scram.set_client_final(ev.data.decode("ascii"))
            final = self.scram.get_server_final()
        except (ScramException, UnicodeDecodeError):
            self._login_failed("bad proof")
            return self.fail(ErrorCode.NOT_AUTHORIZED, "login failed")
        self.scram = None
        self.device = self.login_user
        self.user = self.device.partition(":")[0]
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        try:
            w.attach(self)
        except lmdb.Error as exc:  # the session table could not be written: no login
            self.device = self.user = None
            self.store_failed(exc, None)
            return self.close_soon()
        self.send(AuthSuccess(final.encode(), w.store.clock()))
        self.backlog = True  # serve what waited in the queue
        self.refill()


class Worker:
    def __init__(self, config, index: int, count: int, run_dir: str, gen: int = 0):
        self.config = config
        self.index = index
        self.count = count
        # Unique across reload generations: the session table and the bus
        # sockets name workers by it, so two generations can overlap.
        self.gen = gen
        self.wid = gen * WID_STRIDE + index
        self.run_dir = run_dir
        self.limits = (
            Limits(max_frame=config.max_frame)
            if config.max_frame != DEFAULT_LIMITS.max_frame
            else DEFAULT_LIMITS
        )
        self.ids = itertools.count(1)
        self.sessions: dict[int, Session] = {}
        self.by_device: dict[str, Session] = {}
        self.per_ip: Counter = Counter()
        self.sends: list[Send] = []
        self.acks: dict[str, int] = {}
        self.to_flush: list[Session] = []
        self.tick_pending = False
        self.stats = WorkerStats()
        self.status_fd: int | None = None
        self.next_purge = 0.0
        self.max_payload = config.max_frame - PAYLOAD_HEADROOM
        # read per push: plain attributes, not Config's __getattr__
        self.delivery_window = config.delivery_window
        self.write_buffer_high = config.write_buffer_high
        self.queues: Queues | None = None
        self.encode_entry = None  # FrameEncoder.write: a stored entry's frame into a buffer
        self.social: Social | None = None
        self.presence: PresenceHub | None = None
        self.tasks: set[asyncio.Task] = set()
        self.handshakes: set[asyncio.Task] = set()  # TLS handshakes (Session.handshake)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.store: Store | None = None
        self.accounts: Accounts | None = None
        self.bus: Bus | None = None
        self.stopping: asyncio.Event | None = None
        self.max_connections = config.max_connections
        self.refused_full = 0
        self.full_logged = float("-inf")
        self.store_full_logged = float("-inf")
        self.draining = False  # stopping: new connections are told 503
        self.closed = False  # the store is closed: no more commits
        # log lines about what clients do wrong, per source address (limits.LeakyTable)
        self.noisy = LeakyTable(config.login_table_size)

    def client_log(self, s: Session) -> bool:
        """May a log line about what client ``s`` did be written now?

        At most ``client-log-lines`` such lines per source address per
        minute; the rest are counted (``pigeon_client_logs_suppressed``), so
        a client cannot turn its own junk into an operator's disk full of log.
        """
        rate = self.config.client_log_lines
        if self.noisy.take(s.source, rate, 60.0, self.loop.time()):
            return True
        self.stats.counters["client_logs_suppressed"] += 1
        return False

    def store_full_log(self, exc) -> None:
        """Log a full store at most once a FULL_LOG_INTERVAL (it repeats with every request)."""
        now = self.loop.time()
        if now - self.store_full_logged >= FULL_LOG_INTERVAL:
            self.store_full_logged = now
            log.event(logger, logging.ERROR, "store full: refusing messages", worker=self.index,
                      error=str(exc), hint="raise map-size")  # fmt: skip

    def spawn(self, coro) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- sessions ---------------------------------------------------------------

    def attach(self, s: Session) -> None:
        # the store first: if it cannot record the session, nothing has changed
        prev, offline = self.store.set_session(s.device, self.wid, s.id)
        old = self.by_device.get(s.device)
        if old is not None and old is not s:
            old.fail(ErrorCode.REPLACED, "logged in on another connection")
        self.by_device[s.device] = s
        if offline:
            self.presence.note(s.user)
        if prev is not None and prev["worker"] != self.wid:
            self.bus.kick(prev["worker"], s.device, int(ErrorCode.REPLACED))
        self.stats.counters["logins"] += 1
        log.event(logger, logging.INFO, "login", device=s.device, conn=s.id, ip=s.ip)

    def detach(self, s: Session) -> None:
        if self.by_device.get(s.device) is s:
            del self.by_device[s.device]
            if self.store.clear_session(s.device, self.wid, s.id):
                self.presence.note(s.user)

    def revoke(self, device: str, code: ErrorCode, text: str) -> None:
        """Close a device's session wherever it is."""
        local = self.by_device.get(device)
        if local is not None:
            local.fail(code, text)
        for w in self.bus.peer_ids():
            if w != self.wid:
                self.bus.kick(w, device, int(code))

    def kick_local(self, device: str, code: int, text: str | None = None) -> None:
        s = self.by_device.get(device)
        if s is not None:
            try:
                code = ErrorCode(code)
            except ValueError:
                # the supervisor checks an operator's kick; a bad one must
                # still not end the link (and the records behind it)
                log.event(logger, logging.WARNING, "bad kick on the bus; ignored", device=device,
                          code=code)  # fmt: skip
                return
            if text is None:
                text = (
                    "logged in on another connection"
                    if code == ErrorCode.REPLACED
                    else "this device was removed"
                )
            s.fail(code, text)

    # -- the tick: one commit, then one write per connection and per peer ----------

    def dirty(self, s: Session) -> None:
        """``s`` has output; it is written at the end of this tick."""
        self.to_flush.append(s)
        self._schedule_tick()

    def _schedule_tick(self) -> None:
        if not self.tick_pending:
            self.tick_pending = True
            self.loop.call_soon(self.tick)

    def tick(self) -> None:
        self.tick_pending = False
        if self.closed:
            return
        if self.sends or self.acks:
            self.commit()
        self.presence.flush()
        flush, self.to_flush = self.to_flush, []
        for s in flush:
            s._flush()
        self.bus.flush()

    # -- routing ------------------------------------------------------------------

    def route(self, sender: Session, to: str, msg_id: str, cls: str, typ: str, body) -> None:
        """Queue a message or a read receipt for storing in this tick's commit."""
        if address_kind(to) != "user":
            sender.send(
                Error(ErrorCode.BAD_REQUEST, "group messages are not supported yet", msg_id)
            )
            return
        if body is not None and len(body) > self.max_payload:
            sender.send(
                Error(
                    ErrorCode.BAD_REQUEST,
                    f"payload too large: at most {self.max_payload} bytes",
                    msg_id,
                )
            )
            return
        self.sends.append(Send(sender.device, cls, msg_id, to, typ, body, sender))
        self._schedule_tick()

    def presence_request(self, s: Session, ev: Presence) -> None:
        if ev.to is not None:
            if ev.type == "subscribe":
                self.presence.subscribe(s, ev.to)
            else:
                self.presence.unsubscribe(s, ev.to)
        elif self.social.set_available(s.device, self.wid, s.id, ev.type == "available"):
            self.presence.note(s.user)

    def chatstate(self, s: Session, ev: ChatState) -> None:
        """Typing: to the recipient's connected devices now, or nowhere (never stored)."""
        now = self.loop.time()
        if s.typing is None:
            s.typing = Bucket(self.config.typing_rate, self.config.typing_burst, now)
        if not s.typing.take(now):
            self.stats.counters["rate_limited"] += 1
            if now - s.typing_warned >= 1.0:
                s.typing_warned = now
                s.send(Error(ErrorCode.TOO_FAST, "typing indicators too fast: some were dropped"))
            return
        targets = self.social.chatstate_targets(s.user, ev.to)
        if targets is None:
            s.send(Error(ErrorCode.UNKNOWN_RECIPIENT, "not a registered user"))
            return
        if not targets:
            return
        frame = self.queues.encoder.chatstate(s.user, ev.type)
        self.stats.counters["typing"] += 1
        for device, wid in targets.items():
            if device == s.device:
                continue  # typing to one's own user: the other devices only
            if wid == self.wid:
                self.typing_local(device, frame)
            else:
                self.bus.typing(wid, device, frame)

    def typing_local(self, device: str, frame) -> None:
        r = self.by_device.get(device)
        # a client that is not reading loses typing indicators, not memory
        if r is not None and not r.closing and not r.paused:
            r.out += frame
            r._schedule_flush()

    def ack(self, device: str, seq: int) -> None:
        """A device acknowledged its queue up to ``seq``: delete in this tick's commit."""
        if self.acks.get(device, 0) < seq:
            self.acks[device] = seq
        self._schedule_tick()

    def commit(self) -> None:
        """Write this tick's sends and acks in one transaction; then answer and push."""
        sends, self.sends = self.sends, []
        acks, self.acks = self.acks, {}
        started = time.perf_counter()
        left: dict[str, int] = {}
        try:
            pushes = self.queues.commit(sends, acks, left=left)
        except Exception as exc:  # nothing was written: refuse, never ack
            if isinstance(exc, lmdb.MapFullError):
                self.store_full_log(exc)
            elif isinstance(exc, lmdb.Error):
                log.event(logger, logging.ERROR, "store write failed", worker=self.index,
                          error=str(exc))  # fmt: skip
            else:
                logger.exception("commit failed")
            for s in sends:
                s.error = (ErrorCode.STORE_FULL, "the server cannot store this now; retry later")
            pushes = self.commit_acks(acks, left) if acks else []
        if left:
            # Not all applied (a store full to the last page frees itself in
            # steps): the rest goes again with the next commits, soon if this
            # one freed something, in a second if nothing could be applied.
            for device, upto in left.items():
                if self.acks.get(device, 0) < upto:
                    self.acks[device] = upto
            stuck = pushes is None
            self.loop.call_later(1.0 if stuck else 0.01, self._schedule_tick)
        pushes = pushes or []
        self.stats.commit(time.perf_counter() - started)
        accepted = 0
        for s in sends:
            accepted += s.error is None
            sess = s.session
            if sess.transport is None or sess.closing:
                continue  # gone: the client retries with the same id and gets the same ack
            if s.error is None:
                sess.send(ServerAck(s.id, s.t, s.cls))
            else:
                sess.send(Error(s.error[0], s.error[1], s.id))
        self.stats.counters["messages_in"] += accepted
        if accepted < len(sends) and any(
            s.error is not None and s.error[0] == ErrorCode.STORE_FULL for s in sends
        ):
            self.store_full_log("only the reserve for acks is left (store-reserve)")
        self.deliver(pushes)

    def commit_acks(self, acks: dict[str, int], left: dict[str, int]) -> list | None:
        """Apply device acks on their own, in smaller steps while the store is too full.

        Acks free space, but deleting needs pages too (and their delivered
        receipts more): when all of them at once do not fit, a few entries
        per device at a time do, and each step frees room for the next.
        Returns the entries to push, or None when nothing could be applied."""
        for limit in (None, 64, 8, 1):
            left.clear()
            try:
                return self.queues.commit([], acks, ack_limit=limit, left=left)
            except lmdb.Error as exc:
                error = exc
            except Exception as exc:  # not the store's room: smaller steps will not help
                logger.exception("device acks failed")
                error = exc
                break
        left.clear()
        left.update(acks)  # kept: retried later, and redelivered if the device reconnects
        log.event(logger, logging.ERROR, "device acks not applied", worker=self.index,
                  error=str(error))  # fmt: skip
        return None

    def deliver(self, pushes) -> None:
        """Hand committed entries to the sessions that hold their devices."""
        by_device = self.by_device
        for p in pushes:
            if p.worker is None:
                continue  # offline: it waits in the queue
            if p.worker == self.wid:
                s = by_device.get(p.device)
                if s is not None:
                    s.offer(p.seq, p.entry)
            else:
                self.bus.push(p.worker, p.device, p.seq, p.entry)

    def offer_local(self, device: str, seq: int, entry) -> None:
        s = self.by_device.get(device)
        if s is not None:
            s.offer(seq, entry)

    # -- housekeeping -------------------------------------------------------------

    def send_snapshot(self) -> None:
        """Counters to the supervisor (one line on the status pipe; dropped if it is full)."""
        if self.status_fd is None:
            return
        line = b"metrics " + orjson.dumps(self.stats.snapshot(len(self.sessions))) + b"\n"
        try:
            os.write(self.status_fd, line)
        except (BlockingIOError, BrokenPipeError):
            pass

    async def sweeper(self) -> None:
        next_snapshot = 0.0
        while True:
            before = self.loop.time()
            await asyncio.sleep(SWEEP_INTERVAL)
            now = self.loop.time()
            self.stats.loop_lag = max(0.0, now - before - SWEEP_INTERVAL)
            if now >= next_snapshot:
                self.send_snapshot()
                next_snapshot = now + SNAPSHOT_INTERVAL
            idle = self.config.idle_timeout
            for s in list(self.sessions.values()):
                if not s.closing and now - s.last_seen > idle:
                    s.fail(ErrorCode.TIMEOUT, "no traffic within the keepalive timeout")
            if self.index == 0 and now >= self.next_purge:
                self.purge_expired()
                self.next_purge = now + self.config.purge_interval
            if self.refused_full and now - self.full_logged >= FULL_LOG_INTERVAL:
                log.event(
                    logger,
                    logging.WARNING,
                    "at the connection limit: refusing new connections",
                    worker=self.index,
                    max_connections=self.max_connections,
                    refused=self.refused_full,
                )
                self.refused_full = 0
                self.full_logged = now

    def purge_expired(self) -> None:
        """Delete queue entries past queue-max-age, in slices (worker 0 does this)."""
        start, total = b"", 0
        while True:
            try:
                n, start = self.queues.purge_expired(start)
            except lmdb.Error as exc:
                log.event(logger, logging.ERROR, "purge failed", error=str(exc))
                return
            total += n
            if not start:
                break
        if total:
            log.event(logger, logging.INFO, "expired queue entries purged", entries=total)
        c = self.config
        longest = int(1000 * max(c.register_window, c.login_window, c.new_chats_window,
                                 c.discover_window))  # fmt: skip
        where, swept = (b"", b""), 0
        while True:
            try:
                n, where = self.store.sweep(longest, where)
            except lmdb.Error as exc:
                log.event(logger, logging.ERROR, "sweep failed", error=str(exc))
                return
            swept += n
            if where == (b"", b""):
                break
        if swept:
            log.event(logger, logging.INFO, "stale rate-limit records and codes swept",
                      records=swept)  # fmt: skip

    def size_for_open_files(self) -> None:
        """Cap connections under the open-files limit.

        A worker that runs out of descriptors cannot accept (libuv then
        accepts and drops connections without a word) nor open its store;
        refusing past ``limit - files_reserve`` with error 502 keeps it
        working and tells the client why.  The supervisor already raised the
        limit the workers inherit, and warned once if it is too small
        (supervisor.size_open_files): here it is only applied, quietly.
        """
        limit = raise_open_files_limit(self.max_connections + self.config.files_reserve)
        if limit is None:
            return
        budget = max(1, limit - self.config.files_reserve)
        if budget < self.max_connections:
            self.max_connections = budget
            log.event(logger, logging.DEBUG, "connections capped by the open-files limit",
                      worker=self.index, open_files_limit=limit, max_connections=budget)  # fmt: skip

    async def main(self, parent_fd: int | None, status_fd: int | None) -> None:
        self.loop = asyncio.get_running_loop()
        self.size_for_open_files()
        self.stopping = asyncio.Event()
        c = self.config
        self.store = Store(
            os.path.join(c.data_dir, "store"),
            map_size=c.map_size,
            max_readers=max(126, 8 * self.count + 16),
            sync=c.sync,
            reserve=c.map_size * c.store_reserve // 100,
            writemap=c.store_writemap,
        )
        self.queues = Queues(
            self.store,
            QueueLimits(
                max_count=c.queue_max_count,
                max_bytes=c.queue_max_bytes,
                max_age_ms=int(c.queue_max_age * 1000),
                dedup_window_ms=int(c.dedup_window * 1000),
                new_chats=c.new_chats,
                new_chats_window_ms=int(c.new_chats_window * 1000),
            ),
            FrameEncoder(),
            receipts=c.delivered_receipts,
        )
        self.queues.on_write_wait = self.stats.write_wait
        self.social = Social(self.store, c)
        self.presence = PresenceHub(self, self.social, self.queues.encoder)
        self.encode_entry = self.queues.encoder.write
        _, offline = self.store.clear_worker_sessions(self.wid)
        self.accounts = Accounts(self.store, c, make_gateway(c))
        self.bus = Bus(self)
        await self.bus.start()
        for user in offline:  # this worker's devices before a crash: now offline
            self.presence.note(user)
        # The loop serves a duplicate of each listening socket; the original
        # stays with us so that a drain can empty its accept queue (see drain()).
        # The plain listener is a loop server.  The TLS one is accepted here
        # (accept_tls): each connection is counted at the TCP accept and only
        # then handed to the loop for its handshake, so that no limit waits
        # for a handshake to end.
        listeners = [(listen_socket(c.listen), None)]
        if c.tls_enabled:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(c.tls_cert, c.tls_key or c.tls_cert)
            listeners.append((listen_socket(c.tls_listen), ctx))
        servers = []
        for raw, ctx in listeners:
            if ctx is None:
                servers.append(await self.loop.create_server(lambda: Session(self), sock=raw.dup()))
            else:
                dup = raw.dup()
                dup.setblocking(False)
                self.loop.add_reader(dup.fileno(), self.accept_tls, dup, ctx)
                servers.append(dup)
        self.loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        # SIGHUP belongs to the supervisor (a terminal hangup reaches the
        # whole group): a worker leaves it to its supervisor.
        self.loop.add_signal_handler(signal.SIGHUP, lambda: None)
        if parent_fd is not None:
            # EOF on this pipe means the supervisor is gone, however it died.
            self.loop.add_reader(parent_fd, self._parent_gone, parent_fd)
        sweeper = self.loop.create_task(self.sweeper())
        if status_fd is not None:
            os.write(status_fd, f"ready {self.index}\n".encode())
            os.set_blocking(status_fd, False)  # never stall on a busy supervisor
            self.status_fd = status_fd
            self.send_snapshot()
        log.event(
            logger,
            logging.INFO,
            "worker ready",
            worker=self.index,
            gen=self.gen,
            pid=os.getpid(),
            codec=core_codec.IMPLEMENTATION,
            module=os.path.realpath(__file__),
        )
        await self.stopping.wait()
        await self.drain(servers, listeners)
        sweeper.cancel()
        self.send_snapshot()  # the final counts, kept by the supervisor
        self.bus.close()
        self.store.clear_worker_sessions(self.wid)
        self.closed = True
        self.store.close()
        log.event(logger, logging.INFO, "worker stopped", worker=self.index)

    async def drain(self, servers, listeners) -> None:
        """Stop accepting, take what waits in the accept queues, tell every client
        to reconnect (503), let buffered output go; return when no connection
        and no store work is left, so the store can be closed.

        ``draining`` is set first: a connection whose accept was already on
        its way through the loop when the listeners closed reaches
        connection_made after the 503s went out, and is told 503 there.
        """
        self.draining = True
        for srv in servers:
            if isinstance(srv, socket.socket):
                self.loop.remove_reader(srv.fileno())
            srv.close()
        await self.drain_accept_queues(listeners)
        for s in list(self.sessions.values()):
            s.fail(ErrorCode.SHUTTING_DOWN, "the server is shutting down; reconnect later")
        # Each closing connection ends within LINGER (its abort timer).
        deadline = time.monotonic() + LINGER + 1.0
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for s in list(self.sessions.values()):
            if s.transport is not None:
                s.transport.abort()
            else:  # in its TLS handshake: dropped
                s.connection_lost(None)
        for t in list(self.handshakes):
            t.cancel()
        deadline = time.monotonic() + 1.0  # aborted transports report their loss soon
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        # Registrations in threads (they write the store), the last tick's
        # commit: before the store closes.  PBKDF2 and one short write each.
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=30.0)
        await asyncio.sleep(0)
        if self.tick_pending or self.sends or self.acks:
            self.tick()

    async def drain_accept_queues(self, listeners) -> None:
        """Accept what is still queued on the listening sockets, then close them.

        Closing a listener resets the connections waiting in its accept
        queue (Linux, without net.ipv4.tcp_migrate_req).  Emptying the queue
        first leaves a window of microseconds instead; the connections taken
        are served like the others: told 503, so their clients reconnect to
        the workers still listening (a reload's new generation).
        """
        waiting = []
        for raw, ctx in listeners:
            raw.setblocking(False)
            while True:
                try:
                    conn, addr = raw.accept()
                except OSError:  # BlockingIOError: the queue is empty
                    break
                waiting.append((conn, addr, ctx))
            raw.close()
        for conn, addr, ctx in waiting:
            if ctx is not None:
                self.tls_accepted(conn, addr, ctx)
                continue
            try:
                await self.loop.connect_accepted_socket(lambda: Session(self), conn)
            except OSError:
                conn.close()
        if waiting:
            log.event(logger, logging.INFO, "drained the accept queue", worker=self.index,
                      connections=len(waiting))  # fmt: skip

    def accept_tls(self, sock: socket.socket, ctx: ssl.SSLContext) -> None:
        """The TLS listener is readable: accept what waits (a bounded number a call)."""
        for _ in range(64):
            try:
                conn, addr = sock.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:  # out of descriptors: pause accepting for a second
                now = self.loop.time()
                if now - self.full_logged >= FULL_LOG_INTERVAL:
                    self.full_logged = now
                    log.event(logger, logging.WARNING, "cannot accept", worker=self.index,
                              error=str(exc))  # fmt: skip
                fd = sock.fileno()
                self.loop.remove_reader(fd)
                self.loop.call_later(1.0, self._resume_tls_accept, sock, ctx)
                return
            self.tls_accepted(conn, addr, ctx)

    def _resume_tls_accept(self, sock: socket.socket, ctx: ssl.SSLContext) -> None:
        if not self.draining and sock.fileno() >= 0:
            self.loop.add_reader(sock.fileno(), self.accept_tls, sock, ctx)

    def tls_accepted(self, conn: socket.socket, addr, ctx: ssl.SSLContext) -> None:
        conn.setblocking(False)
        s = Session(self, tls=ctx)
        if s.accepted(addr[0] if addr else "?"):
            task = self.loop.create_task(s.handshake(conn))
            self.handshakes.add(task)
            task.add_done_callback(self.handshakes.discard)
        else:
            conn.close()

    def _parent_gone(self, fd: int) -> None:
        try:
            data = os.read(fd, 64)
        except OSError:
            data = b""
        if not data:
            self.loop.remove_reader(fd)
            log.event(logger, logging.WARNING, "supervisor gone; worker exits", worker=self.index)
            self.stopping.set()


def code_mismatch(expected: dict) -> str | None:
    """Why this worker is not running the code its supervisor runs, or None."""
    here = os.path.realpath(__file__)
    if expected.get("worker") not in (None, here):
        return (
            f"this worker runs {here} but the supervisor runs {expected['worker']}: "
            "a pigeon/ folder on the Python path shadows the installed package"
        )
    if expected.get("codec") not in (None, core_codec.IMPLEMENTATION):
        return (
            f"this worker loaded the {core_codec.IMPLEMENTATION} codec but the supervisor "
            f"the {expected['codec']} one"
        )
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="pigeon-worker", description="one pigeon worker (started by the supervisor)"
    )
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--gen", type=int, default=0, help="reload generation")
    p.add_argument("--run-dir", required=True)
    p.add_argument(
        "--config-fd",
        type=int,
        required=True,
        help="a pipe the supervisor writes the settings to (JSON), read once at start",
    )
    p.add_argument("--parent-fd", type=int)
    p.add_argument("--status-fd", type=int)
    args = p.parse_args(argv)
    with open(args.config_fd, "rb") as f:  # the settings never appear in argv (ps)
        private = orjson.loads(f.read())
    config = load(overrides=private["config"])
    log.setup(config.log_level, config.log_format)
    problem = code_mismatch(private.get("code") or {})
    if problem:
        # Restarting would not help: tell the supervisor, which stops.
        log.event(logger, logging.ERROR, "worker refuses to start", error=problem)
        if args.status_fd is not None:
            os.write(args.status_fd, f"fatal {problem}\n".encode())
        return 1
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides; it sends SIGTERM
    import uvloop

    worker = Worker(config, args.index, args.count, args.run_dir, args.gen)
    profile_dir = os.environ.get("PIGEON_PROFILE_DIR")
    if profile_dir:  # a development aid: cProfile the worker, dump when it stops
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
        try:
            uvloop.run(worker.main(args.parent_fd, args.status_fd))
        finally:
            prof.disable()
            prof.dump_stats(os.path.join(profile_dir, f"worker-{args.gen}-{args.index}.prof"))
        return 0
    uvloop.run(worker.main(args.parent_fd, args.status_fd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
