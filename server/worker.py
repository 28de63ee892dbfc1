"""A worker process: one uvloop loop, its listening sockets, its sessions, one
group commit per loop tick.

The worker is split along its seams:

    listeners.py  binding with SO_REUSEPORT, the TLS accept, the drain of accept queues
    session.py    one client connection (Session): bytes in, events out, output, flow control
    handlers.py   what each request does: one table from event class to handler,
                  login (SCRAM) and registration
    routing.py    where a device is and how a delivery reaches it (Router)
    bus.py        worker-to-worker records
    worker.py     this: the tick, the group commit, presence and typing, housekeeping

Store and forward (server/queues.py).  What a worker's connections ask for
during one loop tick (messages and receipts to store, cumulative device
acks) is gathered and written in one LMDB write transaction at the end of
the tick (``Worker.tick``); only after it commits do senders get their
``ack`` and recipients their entries.  Every delivery comes from the
device's queue: the committing worker hands the entries it just stored to
the router, which pushes them to the devices this worker holds and sends a
PUSH record (the stored entry) over the bus to the worker that holds any
other recipient device (the store's session table says which), unless that
device's session is paused or the bus to that worker is congested: then the
push is left out and the session reads the entry from its queue later
(server/bus.py says how).  A delivery frame is spliced from the stored
entry straight into the connection's output buffer (``FrameEncoder.write``):
the body is never re-encoded.  Records for one peer are batched per tick.

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

import asyncio
import gc
import itertools
import logging
import os
import signal
import sys
import time
from collections import Counter, OrderedDict

import lmdb
import orjson

from pigeon.core import codec as core_codec
from pigeon.core.errors import ErrorCode
from pigeon.core.events import ChatState, Error, Presence, ServerAck
from pigeon.core.node import DEFAULT_LIMITS, Limits, address_kind

from . import child, linking, log
from .accounts import Accounts, make_gateway
from .bus import Bus
from .child import code_mismatch
from .errors import ServiceError
from .groups import GroupLimits, Groups, expire_requests
from .limits import Bucket, LeakyTable
from .listeners import FULL_LOG_INTERVAL, Listeners, listen_socket, raise_open_files_limit
from .metrics import SNAPSHOT_INTERVAL, WorkerStats
from .presence import PresenceHub
from .push import PushHub, configured_kinds
from .queues import FrameEncoder, QueueLimits, Queues, Send
from .routing import Router
from .session import LINGER, Session
from .social import Social
from .store import Store, StoreFull

__all__ = ["WID_STRIDE", "Worker", "code_mismatch", "listen_socket", "main"]

# Bytes a delivery frame may add to the payload of the message it carries
# (from, t, seq in place of to): a message body may be at most
# max_frame - PAYLOAD_HEADROOM bytes, so its delivery always fits in a frame.
PAYLOAD_HEADROOM = 256

logger = logging.getLogger("pigeon.worker")

SWEEP_INTERVAL = 1.0


def _malloc_trim():
    """glibc's malloc_trim, or None (FreeBSD's jemalloc, musl: they give freed
    memory back themselves)."""
    try:
        import ctypes

        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim() if sys.platform.startswith("linux") else None


def trim_heap() -> bool:
    """Give freed heap memory back to the system.  glibc keeps what it frees
    in its arenas: an aborted TLS handshake leaves ~30 KiB of OpenSSL's
    buffers there, so 12,000 of them (probe9) held 350 MB per worker for
    good although nothing referred to it (uvloop#565, CPython gh-109534
    report it as a leak).  Measured: 300 MB given back in ~60 ms; 0.1 ms
    when there is nothing to give."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True


ACKS_AT_ONCE = 256  # devices with acks waiting that make the next tick commit them
GC_YOUNG_THRESHOLD = 10_000  # tracked allocations between young collections (main)


class Job:
    """A store write that joins the tick's commit (``Worker.write``).

    ``run(txn, now)`` does it inside the commit's transaction; it checks
    before it writes, so a refusal (ServiceError, or StoreFull past the
    store's reserve) writes nothing and is this job's alone.  After the
    commit, ``done(result)``, or the refusal goes to ``session`` as an error
    for ``request_id``; if the commit itself failed, ``failed(exc)`` (by
    default the session is told the store failed)."""

    __slots__ = ("run", "done", "failed", "session", "request_id", "result", "error")

    def __init__(self, run, done=None, session=None, request_id=None, failed=None):
        self.run = run
        self.done = done
        self.failed = failed
        self.session = session
        self.request_id = request_id
        self.result = None
        self.error = None

    def __call__(self, txn, now: int) -> None:
        self.error = None  # a retry (Worker.commit_acks) runs it again
        try:
            self.result = self.run(txn, now)
        except (ServiceError, StoreFull) as exc:
            self.error = exc

    def finish(self) -> None:
        s = self.session
        if self.error is None:
            if self.done is not None:
                self.done(self.result)
        elif s is not None and not s.closing:
            if isinstance(self.error, ServiceError):
                s.send(Error(self.error.code, self.error.text, self.request_id))
            else:
                s.store_failed(self.error, self.request_id)

    def fail(self, exc: Exception) -> None:
        if self.failed is not None:
            self.failed(exc)
        elif self.session is not None and not self.session.closing:
            self.session.store_failed(exc, self.request_id)


WID_STRIDE = 1024  # worker id = generation * WID_STRIDE + index


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
        # the sessions not logged in, oldest first (Session.accepted: evicted past
        # max-connections)
        self.strangers: OrderedDict[int, Session] = OrderedDict()
        self.by_device: dict[str, Session] = {}
        self.per_ip: Counter = Counter()
        self.pairing_per_ip: Counter = Counter()  # connections waiting to be paired (linking.py)
        self.sends: list[Send] = []
        self.acks: dict[str, int] = {}
        self.jobs: list[Job] = []
        self.send_bytes = 0  # body bytes in self.sends (commit-max-bytes)
        self.ack_delay = config.ack_delay
        self.acks_due = False  # the acks gathered must go in the next tick's commit
        self.ack_timer = None
        self.commit_max_bytes = config.commit_max_bytes
        self.to_flush: list[Session] = []
        self.tick_pending = False
        self.stats = WorkerStats()
        self.status_fd: int | None = None
        self.next_purge = 0.0
        self.next_trim = 0.0  # (memory-trim-interval)
        self.max_payload = config.max_frame - PAYLOAD_HEADROOM
        self.login_max_frame = config.login_max_frame
        # read per push: plain attributes, not Config's __getattr__
        self.delivery_window = config.delivery_window
        self.write_buffer_high = config.write_buffer_high
        self.queues: Queues | None = None
        self.groups: Groups | None = None
        self.push: PushHub | None = None  # push wake-ups for offline devices (server/push.py)
        self.encode_entry = None  # FrameEncoder.write: a stored entry's frame into a buffer
        self.social: Social | None = None
        self.presence: PresenceHub | None = None
        self.tasks: set[asyncio.Task] = set()
        self.unauth_in_flight = 0  # register and verify requests of all connections (handlers)
        self.listeners = Listeners(self, Session)
        self.router: Router | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.store: Store | None = None
        self.accounts: Accounts | None = None
        self.bus: Bus | None = None
        self.stopping: asyncio.Event | None = None
        # message-rate buckets by device, kept after a disconnect so that
        # logging in again does not refill one (rate_bucket); at most
        # rate-buckets of them, the most recently used last
        self.rate_buckets: dict[str, Bucket] = {}
        self.rate_buckets_max = config.rate_buckets
        # messages and receipts a device may send a day (Session.counted; 0: no limit)
        self.messages_per_day = config.messages_per_day
        self.max_connections = config.max_connections
        self.refused_full = 0
        self.evicted_logged = 0  # counters["evicted"] when the limit was last logged
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

    def write(self, run, done=None, session=None, request_id=None, failed=None,
              ordered: bool = False) -> None:  # fmt: skip
        """Run ``run(txn, now)`` in this tick's commit, then ``done(result)`` (see Job).

        Jobs run before the tick's messages in the commit.  ``ordered``: the
        job changes how a message is handled (a block, a contact): the
        messages already gathered are committed first, so a client's
        message followed by its block is handled in that order."""
        if ordered and self.sends:
            self.commit()
        self.jobs.append(Job(run, done, session, request_id, failed))
        self._schedule_tick()

    def evict_stranger(self) -> bool:
        """Close the oldest connection not logged in, to make room; False if none."""
        if not self.strangers:
            return False
        _, s = self.strangers.popitem(last=False)
        self.stats.counters["evicted"] += 1
        s.evict()
        return True

    def attach(self, s: Session, device: str, done) -> None:
        """Log ``s`` in as ``device``: its session record joins this tick's commit;
        after it, ``s`` holds the device and ``done(queued)`` runs, ``queued``
        being how many entries waited in its queue at that commit.  If the record
        cannot be written, nothing has changed and the client is told."""
        wid, conn = self.wid, s.id
        key, devices = device.encode(), self.store._db["devices"]

        def record(txn, now):
            if txn.get(key, db=devices) is None:
                # unlinked (or logged out, or its account deleted) since its
                # credentials were read for the challenge: no session for it
                return None
            self.store.note_login_txn(txn, device, now)
            if self.push is not None:
                self.push.login_txn(txn, device)
            prev, offline = self.store.set_session_txn(txn, device, wid, conn, now)
            # Read with the record, so exact: an entry any later commit adds is
            # pushed to this session (that commit sees the record), and one an
            # earlier commit added is counted here.
            return prev, offline, self.queues.queued_txn(txn, device)

        def failed(exc):
            if not s.closing:
                s.store_failed(exc, None)
                s.close_soon()

        self.write(record, lambda r: self._attached(s, device, r, done), failed=failed)

    def _attached(self, s: Session, device: str, recorded, done) -> None:
        if recorded is None:  # the device is gone: as a wrong proof
            if not s.closing:
                s.fail(ErrorCode.NOT_AUTHORIZED, "login failed")
            return
        prev, offline, queued = recorded
        s.device = device
        self.strangers.pop(s.id, None)
        s.bucket = None  # the device's own, at the first request (rate_bucket)
        s.user = device.partition(":")[0]
        old = self.by_device.get(s.device)
        if old is not None and old is not s:
            old.fail(ErrorCode.REPLACED, "logged in on another connection")
        self.by_device[s.device] = s
        if offline:
            self.presence.note(s.user)
        if prev is not None and prev["worker"] != self.wid:
            self.router.kick(s.device, ErrorCode.REPLACED, "logged in on another connection",
                             where=prev["worker"])  # fmt: skip
        self.stats.counters["logins"] += 1
        log.event(logger, logging.INFO, "login", device=s.device, conn=s.id, ip=s.ip)
        if s.closing:  # gone while its record was written: as if it logged in and left
            self.detach(s)
            return
        done(queued)

    def rate_bucket(self, device: str, now: float) -> Bucket:
        """``device``'s message-rate bucket, the one its earlier connections to this
        worker drew on if it is still remembered (once per connection, not per
        message: the session keeps it).  A device that reconnects to the other
        worker draws on that worker's bucket, so with N workers it may send at
        most N times message-rate; reconnecting to the same one gains nothing."""
        buckets = self.rate_buckets
        b = buckets.pop(device, None)
        if b is None:
            if len(buckets) >= self.rate_buckets_max:
                self._shed_buckets(now)
            b = Bucket(self.config.message_rate, self.config.message_burst, now)
        buckets[device] = b  # the most recently used last
        return b

    def _shed_buckets(self, now: float) -> None:
        """The bucket table is full: drop every bucket that has refilled (it is no
        different from a new one) of a device not connected here, then, if that
        freed less than an eighth, the least recently used, down to 7/8 full.
        (A whole pass per eighth of the table: amortised O(1) per login.)"""
        buckets, held = self.rate_buckets, self.by_device
        rate, burst = self.config.message_rate, self.config.message_burst
        for device, b in list(buckets.items()):
            refilled = rate <= 0 or b.tokens + (now - b.stamp) * rate >= burst
            counted = b.day and now < b.day_end  # (its messages-per-day count is live)
            if device not in held and refilled and not counted:
                del buckets[device]
        keep = self.rate_buckets_max - max(1, self.rate_buckets_max // 8)
        while len(buckets) > keep:
            del buckets[next(iter(buckets))]

    def detach(self, s: Session) -> None:
        """``s`` no longer holds its device: the record goes in this tick's commit."""
        if self.by_device.get(s.device) is s:
            del self.by_device[s.device]
            device, user, wid, conn = s.device, s.user, self.wid, s.id

            def offline(gone: bool) -> None:
                if gone:
                    self.presence.note(user)

            def failed(exc) -> None:
                log.event(logger, logging.ERROR, "could not clear a session", worker=self.index,
                          device=device, error=str(exc))  # fmt: skip

            self.write(lambda txn, now: self.store.clear_session_txn(txn, device, wid, conn, now),
                       offline, failed=failed)  # fmt: skip

    def revoke(self, device: str, code: ErrorCode, text: str) -> None:
        """Close a device's session wherever it is."""
        self.router.kick(device, code, text)

    def paired_local(self, conn: int, rid: str, device: str, secret: bytes) -> None:
        """A companion waiting on connection ``conn`` here was linked (a PAIRED record)."""
        linking.paired_local(self, conn, rid, device, secret)

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
        if self.sends or self.jobs or (self.acks and self.acks_due):
            self.commit()
        elif not self.acks:
            self.acks_due = False  # (a retry timer can fire after a commit took the acks)
        self.presence.flush()
        flush, self.to_flush = self.to_flush, []
        for s in flush:
            s._flush()
        self.bus.flush()

    # -- routing ------------------------------------------------------------------

    def route(self, sender: Session, to: str, msg_id: str, cls: str, typ: str, body,
              payloads=None, participant: str | None = None, kind: str | None = None) -> None:  # fmt: skip
        """Queue a message or a read receipt for storing in this tick's commit.

        ``to``: a user, or (messages) a device of the sender's own account;
        ``payloads``: per-device payloads instead of ``body`` (Queues); ``kind``:
        ``address_kind(to)`` when the caller knows it (a Hot's ``to`` is a user)."""
        if kind is None:
            kind = address_kind(to)
        if kind != "user":
            if kind == "group" and (cls == "message" or participant is not None):
                pass  # fanned out to the members in the commit (Queues._store_group)
            elif kind == "device" and cls == "message":
                if to.partition(":")[0] != sender.user or to == sender.device:
                    sender.send(Error(ErrorCode.BAD_REQUEST, "a device address as `to` must "
                                      "be another device of your own account", msg_id))  # fmt: skip
                    return
            else:
                sender.send(Error(ErrorCode.BAD_REQUEST, "a receipt goes to a user", msg_id))
                return
        if payloads and kind == "group":  # the body for all, a payload for some
            largest = len(body) + max(len(p) for _, p in payloads)
            size = len(body) + sum(len(p) for _, p in payloads)
        elif payloads:  # each payload is what one device gets: each has the limit
            largest = max(len(p) for _, p in payloads)
            size = sum(len(p) for _, p in payloads)
            body = None
        else:
            largest = size = 0 if body is None else len(body)
        if largest > self.max_payload:
            sender.send(
                Error(
                    ErrorCode.BAD_REQUEST,
                    f"payload too large: at most {self.max_payload} bytes",
                    msg_id,
                )
            )
            return
        send = Send(sender.device, cls, msg_id, to, typ, body, sender, payloads)
        if participant is not None:  # a group's read receipt: whose message it is
            send.body = participant
        self.sends.append(send)
        if size:
            self.send_bytes += size
            if self.send_bytes >= self.commit_max_bytes:
                # LMDB keeps a write's dirty pages in memory until it commits:
                # what one tick gathers is bounded by writing it now
                self.commit()
        self._schedule_tick()

    def presence_request(self, s: Session, ev: Presence) -> None:
        if ev.to is not None:
            if ev.type == "subscribe":
                self.presence_subscribe(s, ev.to)
            else:
                self.presence.unsubscribe(s, ev.to)
        else:
            device, user, wid, conn = s.device, s.user, self.wid, s.id
            available = ev.type == "available"

            def changed(yes: bool) -> None:
                if yes:
                    self.presence.note(user)

            self.write(lambda txn, now: self.social.set_available_txn(txn, now, device, wid, conn,
                                                                      available),
                       changed, s)  # fmt: skip

    def looked_up(self, s: Session, target: str, read, done, request_id=None) -> None:
        """``done(read(txn))`` for ``s.user`` looking ``target`` up (a device list,
        a presence subscription: anything that tells whether a number is
        registered).  Free for the user itself, its contacts and its groups'
        members (``Social.lookup_free``): then from a read transaction, now.
        Anyone else costs one number of ``discover-numbers``: then in the
        tick's commit, charged first (``Social.charge_lookup_txn``, 302 past
        it: ``done`` is not called and the client gets the error)."""
        with self.store.read() as txn:
            free = self.social.lookup_free(txn, s.user, target)
            result = read(txn) if free else None
        if free:
            done(result)
            return
        user, charge = s.user, self.social.charge_lookup_txn

        def run(txn, now):
            charge(txn, now, user, target)
            return read(txn)

        self.write(run, done, s, request_id)

    def presence_subscribe(self, s: Session, target: str) -> None:
        """A subscription tells whether ``target`` is registered (a user seen
        online has a ``last``): charged as a lookup (``looked_up``: free for
        contacts and group members, else one number of ``discover-numbers``).
        Once held, renewing it is free."""
        held = s.subs or ()
        if target in held or target == s.user or len(held) >= self.presence.limit:
            self.presence.subscribe(s, target)  # (past presence-subscriptions: its 406, free)
            return

        def subscribe(_) -> None:
            if not s.closing:
                self.presence.subscribe(s, target)

        self.looked_up(s, target, lambda txn: None, subscribe)

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
        if not targets:
            return
        frame = self.queues.encoder.chatstate(s.user, ev.type)
        self.stats.counters["typing"] += 1
        for device, wid in targets.items():
            if device != s.device:  # typing to one's own user: the other devices only
                self.router.typing(device, wid, frame)

    def typing_local(self, device: str, frame) -> None:
        """A typing frame from another worker for a device held here."""
        self.router.typing(device, self.wid, frame)

    def ack(self, device: str, seq: int) -> None:
        """A device acknowledged its queue up to ``seq``: delete in a commit soon.

        Acks (and the delivered receipts they make) are off every message's
        path to its recipient, so a tick with nothing but acks waits up to
        ``ack-delay`` for more to share its commit; any commit before then
        takes them along.  A crash in between redelivers what was acked, as
        a crash between an ack and its commit always could; so does the
        device logging in again on another worker within it (the SDK hands
        the application each message once)."""
        if self.acks.get(device, 0) < seq:
            self.acks[device] = seq
        if self.acks_due:
            self._schedule_tick()  # (a no-op while one is pending)
            return
        if self.ack_delay <= 0 or len(self.acks) >= ACKS_AT_ONCE:
            self._acks_due()
        elif self.ack_timer is None:
            self.ack_timer = self.loop.call_later(self.ack_delay, self._acks_due)

    def _acks_due(self) -> None:
        if self.ack_timer is not None:
            self.ack_timer.cancel()
            self.ack_timer = None
        self.acks_due = True
        self._schedule_tick()

    def commit(self) -> None:
        """Write this tick's sends and acks in one transaction; then answer and push."""
        sends, self.sends = self.sends, []
        acks, self.acks = self.acks, {}
        jobs, self.jobs = self.jobs, []
        self.send_bytes = 0
        self.acks_due = False
        if self.ack_timer is not None:
            self.ack_timer.cancel()
            self.ack_timer = None
        started = time.perf_counter()
        left: dict[str, int] = {}
        try:
            pushes = self.queues.commit(sends, acks, left=left, jobs=jobs)
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
            pushes, jobs = self.commit_acks(acks, left, jobs) if acks or jobs else ([], [])
        if left:
            # Not all applied (a store full to the last page frees itself in
            # steps): the rest goes again with the next commits, soon if this
            # one freed something, in a second if nothing could be applied.
            for device, upto in left.items():
                if self.acks.get(device, 0) < upto:
                    self.acks[device] = upto
            stuck = pushes is None
            if self.ack_timer is not None:
                self.ack_timer.cancel()
            self.ack_timer = self.loop.call_later(1.0 if stuck else 0.01, self._acks_due)
        pushes = pushes or []
        self.stats.commit(time.perf_counter() - started)
        for job in jobs:
            try:
                job.finish()
            except Exception:  # one request's answer must not cost the others theirs
                logger.exception("answering a store write failed")
        accepted = 0
        for s in sends:
            accepted += s.error is None
            sess = s.session
            if sess.transport is None or sess.closing:
                continue  # gone: the client retries with the same id and gets the same ack
            if s.error is None:
                if s.failed:  # a group message some member queues could not take
                    sess.send(ServerAck(s.id, s.t, s.cls, None, s.failed))
                else:
                    sess.send_ack(s.id, s.t, s.cls)
            elif len(s.error) == 4:  # 408: the devices missing and extra
                sess.send(Error(s.error[0], s.error[1], s.id, s.error[2], s.error[3]))
            else:
                sess.send(Error(s.error[0], s.error[1], s.id))
        self.stats.counters["messages_in"] += accepted
        if accepted < len(sends) and any(
            s.error is not None and s.error[0] == ErrorCode.STORE_FULL for s in sends
        ):
            self.store_full_log("only the reserve for acks is left (store-reserve)")
        self.deliver(pushes)

    def commit_acks(self, acks: dict[str, int], left: dict[str, int], jobs=()) -> tuple:
        """Apply device acks (and the tick's other writes) without the sends, in
        smaller steps while the store is too full.

        Acks free space, but deleting needs pages too (and their delivered
        receipts more): when all of them at once do not fit, a few entries
        per device at a time do, and each step frees room for the next.  The
        other writes (session records, presence, blocks) go with the first
        try only: they are small and bounded, or check the store's room
        themselves, so logins share the reserve acks have.  Returns (the
        entries to push, or None when no ack could be applied; the jobs
        committed, to answer)."""
        jobs = list(jobs)
        error = None
        for limit in (None, 64, 8, 1):
            left.clear()
            try:
                return self.queues.commit([], acks, ack_limit=limit, left=left, jobs=jobs), jobs
            except lmdb.Error as exc:
                error = exc
                retry = True
            except Exception as exc:  # not the store's room: smaller steps will not help,
                logger.exception("device acks failed")
                error = exc
                retry = bool(jobs)  # unless a job was the cause
            for job in jobs:  # the other writes had their one try
                job.fail(error)
            jobs = []
            if not acks or not retry:
                break
        left.clear()
        left.update(acks)  # kept: retried later, and redelivered if the device reconnects
        if acks:
            log.event(logger, logging.ERROR, "device acks not applied", worker=self.index,
                      error=str(error))  # fmt: skip
        return None, []

    def deliver(self, pushes) -> None:
        self.router.deliver(pushes)

    def offer_local(self, device: str, seq: int, entry, origin: int | None = None) -> None:
        """A committed entry from worker ``origin`` for a device held here."""
        self.router.offer(device, seq, entry, origin)

    def catch_up_local(self, device: str, seq: int) -> None:
        """Another worker committed entries up to ``seq`` for a device held here
        and did not push them: the session reads them from the queue."""
        self.router.catch_up(device, seq)

    # -- housekeeping -------------------------------------------------------------

    def send_snapshot(self) -> None:
        """Counters to the supervisor (one line on the status pipe; dropped if it is full)."""
        if self.status_fd is None:
            return
        self._tell_supervisor(
            b"metrics " + orjson.dumps(self.stats.snapshot(len(self.sessions))) + b"\n"
        )

    def _tell_supervisor(self, line: bytes) -> None:
        """One line on the status pipe (dropped if the pipe is full or gone)."""
        if self.status_fd is None:
            return
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
            trim = self.config.memory_trim_interval
            if trim and now >= self.next_trim:
                trim_heap()
                self.next_trim = now + trim
            if self.index == 0 and now >= self.next_purge:
                self.purge_expired()
                self.next_purge = now + self.config.purge_interval
            evicted = self.stats.counters["evicted"] - self.evicted_logged
            if (self.refused_full or evicted) and now - self.full_logged >= FULL_LOG_INTERVAL:
                log.event(
                    logger,
                    logging.WARNING,
                    "at the connection limit: refusing new connections "
                    "(or closing ones not logged in for them)",
                    worker=self.index,
                    max_connections=self.max_connections,
                    refused=self.refused_full,
                    evicted=evicted,
                )
                self.refused_full = 0
                self.evicted_logged += evicted
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
        try:
            requests = expire_requests(self.groups, self.store.clock())
        except lmdb.Error as exc:
            log.event(logger, logging.ERROR, "group request expiry failed", error=str(exc))
        else:
            if requests:
                log.event(logger, logging.INFO, "expired group join requests dropped",
                          requests=requests)  # fmt: skip
        c = self.config
        # the longest window of any limit (with the media service on, a day: its daily
        # quotas, server/handlers.py)
        media_day = 86_400 if c.media_listen != "off" else 0
        longest = int(1000 * max(c.register_window, c.login_window, c.new_chats_window,
                                 c.discover_window, c.verify_window, c.keys_fetch_window,
                                 c.key_changes_window, media_day,
                                 c.group_window, c.group_notice_window,
                                 c.group_member_changes_window))  # fmt: skip
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
        linking.housekeeping(self)

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
                stranger_count=c.stranger_queue_count,
                stranger_bytes=c.stranger_queue_bytes,
            ),
            FrameEncoder(),
            receipts=c.delivered_receipts,
        )
        self.queues.on_write_wait = self.stats.write_wait
        self.groups = Groups(self.store, self.queues,
                             GroupLimits(max_members=c.group_max_members,
                                         user_groups_max=c.user_groups_max,
                                         per_day=c.groups_per_day,
                                         joins_per_day=c.group_joins_per_day,
                                         window_ms=int(c.group_window * 1000),
                                         discover_numbers=c.discover_numbers,
                                         discover_window_ms=int(c.discover_window * 1000),
                                         notice_bytes=c.group_notice_bytes,
                                         notice_window_ms=int(c.group_notice_window * 1000),
                                         subject_max=c.group_subject_max,
                                         description_max=c.group_description_max,
                                         request_expiry_ms=int(c.group_request_expiry * 1000),
                                         stranger_groups=c.stranger_groups,
                                         member_changes=c.group_member_changes,
                                         member_changes_window_ms=int(
                                             c.group_member_changes_window * 1000)))  # fmt: skip
        self.social = Social(self.store, c)
        self.presence = PresenceHub(self, self.social, self.queues.encoder)
        self.encode_entry = self.queues.encoder._codec.write_entry_frame  # (FrameEncoder.write)
        _, offline = self.store.clear_worker_sessions(self.wid)
        self.accounts = Accounts(self.store, c, make_gateway(c))
        self.bus = Bus(self)
        self.router = Router(self)
        if configured_kinds(c):
            self.push = PushHub(self, c)
            self.queues.wake_offline = True  # (group fan-out: Push records for offline devices)
            self.push.task = self.loop.create_task(self.push.run())
        await self.bus.start()
        for user in offline:  # this worker's devices before a crash: now offline
            self.presence.note(user)
        self.listeners.open(c)
        await self.listeners.start()
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
        await self.drain()
        sweeper.cancel()
        if self.push is not None and self.push.task is not None:
            self.push.task.cancel()
        await self.accounts.gateway.close()
        self.send_snapshot()  # the final counts, kept by the supervisor
        self.bus.close()
        self.store.clear_worker_sessions(self.wid)
        self.closed = True
        self.store.close()
        log.event(logger, logging.INFO, "worker stopped", worker=self.index)

    async def drain(self) -> None:
        """Stop accepting, take what waits in the accept queues, tell every client
        to reconnect (503), let buffered output go; return when no connection
        and no store work is left, so the store can be closed.

        ``draining`` is set first: a connection whose accept was already on
        its way through the loop when the listeners closed reaches
        connection_made after the 503s went out, and is told 503 there.
        """
        self.draining = True
        self.listeners.stop_accepting()
        await self.listeners.drain_accept_queues()
        self._tell_supervisor(f"closed {self.index}\n".encode())  # a reload's READY waits for it
        for s in list(self.sessions.values()):
            s.fail(
                ErrorCode.SHUTTING_DOWN,
                "this worker is stopping (a reload or a shutdown); reconnect",
            )
        # Each closing connection ends within LINGER (its abort timer).
        deadline = time.monotonic() + LINGER + 1.0
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for s in list(self.sessions.values()):
            if s.transport is not None:
                s.transport.abort()
            else:  # in its TLS handshake: dropped
                s.connection_lost(None)
        self.listeners.cancel_handshakes()
        deadline = time.monotonic() + 1.0  # aborted transports report their loss soon
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        # Registrations in threads (they write the store), the last tick's
        # commit: before the store closes.  PBKDF2 and one short write each.
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=30.0)
        await asyncio.sleep(0)
        if self.tick_pending or self.sends or self.acks or self.jobs:
            self.acks_due = True
            self.tick()

    def _parent_gone(self, fd: int) -> None:
        try:
            data = os.read(fd, 64)
        except OSError:
            data = b""
        if not data:
            self.loop.remove_reader(fd)
            log.event(logger, logging.WARNING, "supervisor gone; worker exits", worker=self.index)
            self.stopping.set()


def main(argv=None) -> int:
    started = child.start("pigeon-worker", "one pigeon worker (started by the supervisor)", argv)
    if isinstance(started, int):
        return started
    args, config = started
    import uvloop

    worker = Worker(config, args.index, args.count, args.run_dir, args.gen)
    # What was made at start lives as long as the process: out of the cyclic
    # collector's sight.  A message allocates a few tracked objects (its Send,
    # Push, lists) that refcounting frees; with the default threshold (700) a
    # young collection ran every ~70 messages, 2.4% of a worker's CPU under
    # `pigeon bench throughput` (measured with gc.callbacks).
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
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
