"""One client connection: a ``Session`` (an asyncio Protocol) driving the sans-IO
``Connection``.

Bytes in, events out: each event goes to ``handlers.handle``.  Every frame
for the connection is appended to one output buffer (``out``) that is
written once per loop tick (``Worker.tick`` calls ``_flush``); ``push``
appends a finished frame, ``offer`` and ``refill`` splice delivery frames
from queue entries straight into it.

Flow control.  A session pushes at most ``delivery_window`` entries past
the device's last ack; the rest stay in LMDB and are read from there as acks
come and as the connection drains (``refill``, at most write-buffer-high
bytes at a time), which is also how a device's backlog is served at login.
When the transport's buffer passes ``write_buffer_high`` the session stops
pushing and stops reading the client until it drains below
``write_buffer_low``: a client that does not read cannot grow server memory.
What is committed meanwhile is dropped here (``backlog`` is set) and read
from the queue on resume.  Pushes from another worker are dropped too, and
that worker is asked to hold them (``hold``: a HOLD record, so a paused
device costs the bus nothing) until the session resumes or ends
(``release``); what it held then comes as a CATCHUP (``catch_up``), as does
what it left out while the bus to this worker was congested.  Any entry
past the next expected one, or a CATCHUP, sends the session to its queue:
a push that never comes loses no message.

Closing is graceful (``_linger``): the last frames, then EOF, and an abort
timer of LINGER seconds whatever the client does.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING

import lmdb

from pigeon.core.connection import NEED_DATA, Connection, Role
from pigeon.core.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from pigeon.core.events import Error

from . import handlers, linking, log
from .accounts import ServiceError
from .handlers import handle
from .limits import Bucket, source_key

if TYPE_CHECKING:
    from .worker import Worker

logger = logging.getLogger("pigeon.worker")

LINGER = 2.0  # seconds a closing connection waits for the client to close


class Session(asyncio.Protocol):
    """One client connection."""

    # Tens of thousands of these sit idle: slots, no per-instance dict.
    __slots__ = ("worker", "tls", "transport", "id", "conn", "out", "flush_pending", "closing",
                 "ip", "source", "device", "user", "scram", "login_user", "last_seen",
                 "deadline", "pushed", "acked", "backlog", "paused", "linger", "subs", "bucket",
                 "typing", "typing_warned", "holders", "pairing", "unauth",
                 "in_flight", "handshaking", "held")  # fmt: skip

    def __init__(self, worker: Worker, tls: ssl.SSLContext | None = None):
        self.worker = worker
        self.tls = tls  # the server context of a TLS listener's connection
        self.transport = None  # for TLS: set once the handshake is done
        self.id = next(worker.ids)
        self.conn = Connection(Role.SERVER, limits=worker.limits, hot_path=True,
                               login_max_frame=worker.login_max_frame)  # fmt: skip
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
        self.unauth: Bucket | None = None  # register, verify, pair (unauth-rate)
        self.in_flight = 0  # register and verify requests not answered yet
        self.holders: set[int] | None = None  # workers asked to hold pushes while paused
        self.pairing = None  # a companion waiting to be linked (server/linking.py)
        self.handshaking = None  # the task of a TLS handshake in progress (Listeners)
        self.held = False  # reading paused for the loop's next turn (read-frames-per-turn)

    # -- transport callbacks ----------------------------------------------

    def connection_made(self, transport) -> None:
        if self.tls is None:
            peer = transport.get_extra_info("peername")
            self.accepted(peer[0] if peer else "?")
        # TLS: counted at the TCP accept (Listeners.accept_tls); the handshake is done now
        self._ready(transport)

    def accepted(self, ip: str) -> bool:
        """A TCP connection was accepted: count it, start the login deadline.

        Every limit counts from here, TLS or not (a TLS connection is counted
        before its handshake, which the login deadline bounds).  False: a
        TLS connection past a cap, to be closed at once without a handshake
        (no error can reach it before one, and handshakes are what a flood
        of them would cost); a plain one is told why instead.

        Past max-connections a new connection takes the place of the oldest
        one not logged in (``Worker.strangers``), which is told 502 and closed:
        otherwise connections that never log in, from enough addresses to pass
        max-connections-per-ip, held every new client out, login-timeout at a
        time.  Only when every connection is logged in is the new one refused.
        """
        w = self.worker
        self.ip = ip
        self.source = source_key(ip)
        self.last_seen = w.loop.time()
        self.out += self.conn.initiate()
        w.sessions[self.id] = self
        w.per_ip[self.source] += 1
        refuse = None
        if w.per_ip[self.source] > w.config.max_connections_per_ip:
            refuse = (ErrorCode.RATE_LIMITED, "too many connections from this address")
        elif w.draining:
            refuse = (
                ErrorCode.SHUTTING_DOWN,
                "this worker is stopping (a reload or a shutdown); reconnect",
            )
        elif len(w.sessions) > w.max_connections and not w.evict_stranger():
            w.refused_full += 1
            refuse = (ErrorCode.UNAVAILABLE, "the server is at its connection limit; try later")
        if refuse is None:
            self.deadline = w.loop.call_later(w.config.login_timeout, self._login_timeout)
            w.strangers[self.id] = self
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
        except (Exception, asyncio.CancelledError):
            # a failed, timed-out or cancelled (evicted, draining) handshake, a reset:
            # the connection is over
            sock.close()
            self.connection_lost(None)
        finally:
            self.handshaking = None

    def data_received(self, data: bytes) -> None:
        if self.closing:
            # Closing: what still arrives is dropped unread (and does not
            # count as traffic); the linger timer ends the connection.
            return
        self.last_seen = self.worker.loop.time()
        self.conn.receive_data(data)
        if not self.held:
            self._read_events()

    def _read_events(self) -> None:
        """Handle what was received, at most read-frames-per-turn events a turn.

        The loop reads a readable socket again and again in one turn while it
        has data (libuv: up to 32 reads of 256 KiB), so a client that floods
        tiny frames (pings, refused requests) held the worker's loop, and every
        other connection on it, for seconds.  Past the budget the reading
        pauses and the rest waits for the loop's next turn (``_next_turn``),
        after every other ready connection and the tick."""
        budget = self.worker.config.read_frames_per_turn
        n = 0
        while not self.closing:
            if budget and n >= budget:
                self.held = True
                if not self.paused and self.transport is not None:
                    self.transport.pause_reading()
                self.worker.loop.call_soon(self._next_turn)
                return
            n += 1
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
                handle(self, ev)
            except ServiceError as err:
                self.send(Error(err.code, err.text, getattr(ev, "id", None)))
            except lmdb.Error as exc:
                self.store_failed(exc, getattr(ev, "id", None))

    def _next_turn(self) -> None:
        """Go on with the input held back by ``_read_events``; read the socket again
        once it is all handled (unless the client is not reading: resume_writing)."""
        self.held = False
        if self.closing:
            return
        self._read_events()
        if not self.held and not self.paused and self.transport is not None:
            self.transport.resume_reading()

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
        if self.holders:
            self.release()
        if not self.closing:
            if not self.held:  # (else _next_turn resumes it)
                self.transport.resume_reading()
            if self.backlog:
                self.refill()
            if self.subs:
                self.worker.presence.refresh(self)

    def connection_lost(self, exc) -> None:
        self.closing = True
        if self.holders:
            self.release()
        if self.deadline is not None:
            self.deadline.cancel()
        if self.linger is not None:
            self.linger.cancel()
        w = self.worker
        if w.sessions.pop(self.id, None) is None:
            return  # already gone (a TLS connection can be told twice)
        w.strangers.pop(self.id, None)
        w.per_ip[self.source] -= 1
        if w.per_ip[self.source] <= 0:
            del w.per_ip[self.source]
        if self.pairing is not None:
            linking.release(self)
        if self.scram is not None and self.device is None and not w.draining:
            handlers.login_failed(self, "abandoned")  # a challenge nobody answered counts too
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
            # a late answer to a connection that closed is a client's doing:
            # throttled per source address like any line about clients
            if self.worker.client_log(self):
                log.event(logger, logging.WARNING, "dropped an event the state forbids",
                          conn=self.id, event=type(event).__name__, why=str(exc))  # fmt: skip
            return
        self._schedule_flush()

    def send_ack(self, mid: str, t: int, cls: str) -> None:
        """``send(ServerAck(mid, t, cls))`` for a message or receipt this
        client sent, with no event built (``Connection.send_ack_into``)."""
        if self.closing and self.transport is None:
            return
        try:
            self.conn.send_ack_into(self.out, mid, t, cls)
        except LocalProtocolError as exc:
            if self.worker.client_log(self):
                log.event(logger, logging.WARNING, "dropped an event the state forbids",
                          conn=self.id, event="ServerAck", why=str(exc))  # fmt: skip
            return
        self._schedule_flush()

    def push(self, frame) -> None:
        """Append a finished frame for this client (a presence or typing push);
        it is written at the end of the tick."""
        self.out += frame
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self.flush_pending:
            self.flush_pending = True
            self.worker.dirty(self)

    def _flush(self) -> None:
        self.flush_pending = False
        if self.transport is None or self.transport.is_closing() or self.linger is not None:
            return  # (after the EOF of a graceful close nothing more may be written)
        if self.out:
            out, self.out = self.out, bytearray()
            self.transport.write(out)
        if self.closing:
            if self.linger is None:
                self._linger()
        elif self.backlog and not self.paused:
            # A refill stops at write-buffer-high counting this tick's output,
            # which the socket may take at once, leaving the transport unpaused:
            # then no resume_writing comes, so read on here (an ack, a push or a
            # resume are not the only ways the connection makes room).
            self.refill()

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
        if self.holders:
            self.release()  # the device may log in elsewhere at once
        self._schedule_flush()

    def evict(self) -> None:
        """Make room for a new connection (Worker.evict_stranger): told 502, closed.
        A login it was in does not count as a failed one (the server ended it)."""
        self.scram = None
        if self.handshaking is not None:  # no error can reach it before its handshake
            self.handshaking.cancel()
        elif not self.closing:
            self.fail(ErrorCode.UNAVAILABLE, "the server is at its connection limit; try later")

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
        w = self.worker
        if (
            seq == self.pushed + 1
            and not self.backlog
            and not self.paused
            and seq - self.acked <= w.delivery_window
            and self.buffered() < w.write_buffer_high
        ):
            w.encode_entry(self.out, entry, seq)
            self.pushed = seq
            w.stats.counters["entries_out"] += 1
            if not self.flush_pending:  # (_schedule_flush)
                self.flush_pending = True
                w.dirty(self)
            return
        # Out of order (another worker's commit overtook), window full or
        # transport full: it is in the queue; read it from there when there is room.
        self.backlog = True
        self.refill()

    def hold(self, wid: int) -> None:
        """Paused: ask worker ``wid`` to hold its pushes to this device.

        Asked again at each push it drops (only until the HOLD arrives), so a
        worker that forgot (its link to this one broke) is asked again."""
        if self.holders is None:
            self.holders = set()
        self.holders.add(wid)
        self.worker.bus.ask_hold(wid, self.device, True)

    def release(self) -> None:
        """Resumed or ending: the workers that hold pushes to this device push again
        (and send a CATCHUP for what they held)."""
        holders, self.holders = self.holders, None
        if self.device is None:  # (callers release before they clear the device)
            return
        bus = self.worker.bus
        for wid in holders:
            bus.ask_hold(wid, self.device, False)

    def catch_up(self, seq: int) -> None:
        """Entries up to ``seq`` were committed and not pushed: read them from the queue."""
        if seq > self.pushed and not self.closing and self.device is not None:
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
        if seq > self.pushed:
            # Acked from an earlier connection: nothing to push below it.  Or never
            # delivered at all: an ack past the queue's end made this connection skip
            # every entry below it (pushed) and deleted those not yet delivered.
            try:
                end = self.worker.queues.next_seq(self.device)
            except lmdb.Error:
                end = seq + 1  # (as before: the ack is taken)
            if seq >= end:
                self.send(Error(ErrorCode.BAD_REQUEST,
                                f"ack seq={seq}: no entry of this device's queue has that seq "
                                f"(the last one given is {end - 1}); nothing acknowledged"))  # fmt: skip
                return
            self.pushed = seq
        self.acked = seq
        self.worker.ack(self.device, seq)
        if self.backlog:
            self.refill()

    # -- events ---------------------------------------------------------------

    def unauth_allowed(self) -> bool:
        """Draw on the bucket of requests a stranger may send (register, verify,
        pair); past it 302 and the connection closes, the rest of its input
        unread: a flood of them costs one error, never a store write each."""
        w = self.worker
        now = w.loop.time()
        if self.unauth is None:
            self.unauth = Bucket(w.config.unauth_rate, w.config.unauth_burst, now)
        if self.unauth.take(now):
            return True
        w.stats.counters["rate_limited"] += 1
        self.fail(ErrorCode.RATE_LIMITED, "too many registration or pairing requests on this "
                  "connection; reconnect later")  # fmt: skip
        return False

    def allowed(self, ev, cost: float = 1.0, day: bool = False) -> bool:
        """Draw ``cost`` on the device's message-rate bucket (Worker.rate_bucket: the
        same across its connections to this worker); answer 405 if it is empty.
        ``day``: a message or read receipt, also counted in the device's
        messages-per-day (kept in the same bucket); 302 past it, unless it is a
        retry of one stored (``_stored_retry``, on that path only).  Each one
        accepted keeps a dedup record for the dedup window: without this a device
        could make the store hold as many as message-rate allows."""
        w = self.worker
        now = w.loop.time()
        bucket = self.bucket
        if bucket is None:
            bucket = self.bucket = (
                w.rate_bucket(self.device, now)
                if self.device is not None
                else Bucket(w.config.message_rate, w.config.message_burst, now)
            )
        if not bucket.take(now, cost):
            w.stats.counters["rate_limited"] += 1
            self.send(Error(ErrorCode.TOO_FAST,
                            f"sending too fast: at most {w.config.message_rate:g} a second "
                            f"(bursts of {w.config.message_burst}); retry later",
                            getattr(ev, "id", None)))  # fmt: skip
            return False
        limit = w.messages_per_day
        if not day or not limit or bucket.count(now, limit):
            return True
        if self._stored_retry(ev):
            return True  # (uncounted: the commit answers it as the retry it is)
        w.stats.counters["rate_limited"] += 1
        self.send(Error(ErrorCode.RATE_LIMITED,
                        f"at most {limit} messages and receipts a day from one device "
                        f"(messages-per-day); try again later", getattr(ev, "id", None)))  # fmt: skip
        return False

    def _stored_retry(self, ev) -> bool:
        """Past messages-per-day only (the count is taken before dedup, which is in
        the commit): is ``ev`` a retry of a message or read receipt of this device
        that its dedup records hold (the same recipient, type and body)?  Then it
        goes on, uncounted, and the commit answers it with its first ack, storing
        nothing: a retry at the limit is not told 302 for what was stored."""
        t = type(ev)
        if t is handlers.HOT:
            cls = "message" if ev.kind == handlers.HOT_MESSAGE else "receipt"
            participant = None
        elif t in handlers.COUNTED:
            cls = "message" if t is not handlers.Receipt else "receipt"
            participant = getattr(ev, "participant", None)
        else:
            return False
        body = ev.body if cls == "message" else None
        try:
            return self.worker.queues.stored_retry(self.device, cls, ev.id, ev.to, ev.type, body,
                                                   getattr(ev, "payloads", None) or None,
                                                   participant)  # fmt: skip
        except lmdb.Error:
            return False  # (then 302, as before)
