"""The latency bench's load process: open-loop sends from a lean driver of the SDK's core.

``pigeon bench latency`` measures send-to-delivery latency, so everything
this process does between a message's due time and the time stamp of its
delivery is counted, and every microsecond of CPU it spends is taken from
the server on a 2-core machine.  It therefore does not use the asyncio
SDK's ``Client`` (a reader task, a queue, a future, a timeout and a task
per message) but drives the SDK's sans-IO ``ClientCore`` (the same protocol
code: Connection, codec, SCRAM login, coalesced acks) straight from an
``asyncio.Protocol`` per device.  Measured side by side against the load
floor (one load process, 1,000 clients, a 2-core VM): 80-100 us of load CPU
per message at 5,000 msg/s where the SDK-based load took 160 us and fell
behind (p50 in seconds), 220-250 us at 1,000 msg/s against 280-310 us,
with a p50 of 0.3 ms against 0.7-1.6 ms.

- ``data_received`` feeds the core and handles its outcomes at once: a
  server ack marks the message acked; a delivery is time-stamped, counted
  and acknowledged (the core coalesces acks: one per connection per write);
  a delivered receipt is counted and acknowledged;
- sending is ``core.message(...)``, no task, no future;
- output is written once per connection per loop tick (``call_soon``), like
  the server does, so a tick's acks and sends share one write.

The schedule: messages are due at ``start + k * interval`` (the harness
gives each load process the same start, shifted by its share of one
interval, and its count), sent in turns by this process's clients to random
peers among all of them, each stamped with its *due* time (a late sender
shows up as latency: no coordinated omission).  The sender loop waits for
the next due time with ``Pacer`` (bench/pacer.py): a timerfd, so it wakes
within tens of microseconds instead of the loop's millisecond timers, and
never spins.

Lines with the harness are bench/load.py's (``ready``, progress, ``run RATE
SECONDS START_NS TOTAL``, ``collect``, one JSON result per run); its
options too (``python -m pigeon.bench.openloop --help``).  No
reconnects and no keepalive: a lost connection is an error of the run
(``ConnectionLost`` in ``errors``), and the server's idle timeout must be
longer than the longest pause between runs (the bench profile's is an hour).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import time

import orjson

from pigeon.client import ServerError
from pigeon.client._core import (
    AUTH,
    Answer,
    ClientCore,
    Credentials,
    Deliver,
    Failure,
    Lost,
    ScramLogin,
)
from pigeon.core.events import Error, IncomingMessage, IncomingReceipt

from .load import HEADER, Load, arg_parser, raise_open_files
from .pacer import Pacer


class LeanClient(asyncio.Protocol):
    """One device: a ClientCore on a transport, its outcomes handled in place."""

    def __init__(self, load: OpenLoopLoad, index: int):
        self.load = load
        self.index = index
        self.core = ClientCore()
        self.transport: asyncio.Transport | None = None
        self.auth: asyncio.Future | None = None
        self.lost = False

    # -- transport --------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.core.start()  # the preamble is the first output
        self.load.mark(self)

    def connection_lost(self, exc) -> None:
        if not self.lost:
            self.handle(self.core.receive(b""))
        self.lost = True

    def data_received(self, data: bytes) -> None:
        self.handle(self.core.receive(data))
        if self.core.has_output:
            self.load.mark(self)

    def flush(self) -> None:
        if self.core.has_output and not self.lost and not self.transport.is_closing():
            self.transport.write(self.core.take_output())

    # -- outcomes ---------------------------------------------------------------

    def handle(self, outcomes: list) -> None:
        load = self.load
        for o in outcomes:
            t = type(o)
            if t is Deliver:
                ev = o.event
                te = type(ev)
                if te is IncomingMessage:
                    sender, number, due = HEADER.unpack_from(ev.body)
                    load.latencies_us.append((time.monotonic_ns() - due) // 1000)
                    load.deliveries += 1
                    load.delivered.add(sender << 32 | number)
                    self.core.ack(ev.seq, True)
                elif te is IncomingReceipt:
                    load.receipts += 1
                    load.receipt_ids.add(ev.id)
                    self.core.ack(ev.seq, True)
                elif te is Error:
                    load.error(ServerError(ev.code, ev.text, ev.id).name)
            elif t is Answer:
                if o.key[0] == AUTH:
                    self._settle_auth(o.value, None)
                else:
                    load.answered(o.key[1], None)
            elif t is Failure:
                if o.key[0] == AUTH:
                    self._settle_auth(None, o.error)
                else:
                    load.answered(o.key[1], o.error)
            elif t is Lost:
                self.lost = True
                self._settle_auth(None, o.error)
                for _ in load.fail_all_of(self):
                    load.error("ConnectionLost")

    def _settle_auth(self, value, error) -> None:
        fut = self.auth
        if fut is not None and not fut.done():
            if error is None:
                fut.set_result(value)
            else:
                fut.set_exception(error)

    async def login(self, creds: Credentials, timeout: float) -> None:
        """The SCRAM exchange through the core, as the SDK's login does it."""
        scram = ScramLogin(creds)
        challenge = await self._auth_step(scram.first(), timeout)
        success = await self._auth_step(scram.final(challenge), timeout)
        scram.check(success)  # raises unless the server proved it holds our keys

    async def _auth_step(self, event, timeout: float):
        self.auth = asyncio.get_running_loop().create_future()
        self.core.expect(AUTH, "")
        self.core.send(event)
        self.load.mark(self)
        return await asyncio.wait_for(self.auth, timeout)


class OpenLoopLoad(Load):
    """bench/load.py's Load, with lean clients and the open-loop runs."""

    def __init__(self, args, creds: list[dict]):
        super().__init__(args, creds)
        self.lean: dict[int, LeanClient] = {}
        self._dirty: set[LeanClient] = set()
        self._flush_scheduled = False
        #: message id -> (client index, key), sent and not yet answered
        self._waiting: dict[str, tuple[int, int]] = {}
        self._all_answered: asyncio.Event | None = None

    # -- output batching ----------------------------------------------------------

    def mark(self, client: LeanClient) -> None:
        self._dirty.add(client)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, set()
        for c in dirty:
            c.flush()

    # -- bookkeeping the clients call ----------------------------------------------

    def error(self, name: str) -> None:
        self.errors[name] = self.errors.get(name, 0) + 1

    def answered(self, mid: str, error: Exception | None) -> None:
        entry = self._waiting.pop(mid, None)
        if entry is None:
            return
        _, key = entry
        self.inflight.discard(key)
        if error is None:
            self.acked.append(key)
            self.acked_ids.add(mid)
            self.key_of[mid] = key
        else:
            self.error(getattr(error, "name", type(error).__name__))
        if not self._waiting and self._all_answered is not None:
            self._all_answered.set()

    def fail_all_of(self, client: LeanClient) -> list[str]:
        """The messages of a lost connection that will never be answered (they stay
        in ``inflight``: the harness names them as sent but not acked)."""
        gone = [mid for mid, (i, _) in self._waiting.items() if i == client.index]
        for mid in gone:
            del self._waiting[mid]
        if not self._waiting and self._all_answered is not None:
            self._all_answered.set()
        return gone

    # -- connections ----------------------------------------------------------------

    async def login_all(self) -> None:
        loop = asyncio.get_running_loop()
        host, _, port = self.args.target.rpartition(":")
        sem = asyncio.Semaphore(64)

        async def one(i: int) -> None:
            async with sem:
                _, c = await asyncio.wait_for(
                    loop.create_connection(lambda: LeanClient(self, i), host, int(port)), 30
                )
                cr = self.creds[i]
                await c.login(Credentials(cr["device"], bytes.fromhex(cr["secret"])), 30)
                self.lean[i] = c

        await asyncio.gather(*(one(i) for i in self.mine))

    async def close_all(self) -> None:
        for c in self.lean.values():
            c.flush()
            if c.transport is not None:
                c.transport.close()
        await asyncio.sleep(0)

    # -- the runs ---------------------------------------------------------------------

    async def open_loop(self, rate: float, seconds: float, start: int | None = None,
                        total: int | None = None) -> None:  # fmt: skip
        """Send ``total`` messages (default rate x seconds) at ``rate`` msg/s from
        ``start`` (monotonic ns; default 50 ms from now), then wait (at most 60 s)
        for the server's answers.  See the module's doc."""
        mine = list(self.mine)
        n_all = len(self.creds)
        pad = bytes(max(0, self.args.size - HEADER.size))
        rng = random.Random(self.args.seed)
        if total is None:
            total = int(rate * seconds)
        interval_ns = int(1e9 / rate)
        if start is None:
            start = time.monotonic_ns() + 50_000_000
        self._all_answered = asyncio.Event()
        pacer = Pacer()
        self.pacer = pacer.kind
        k = 0
        try:
            while k < total:
                now = time.monotonic_ns()
                due = start + k * interval_ns
                if due > now:
                    await pacer.until(due)
                    continue
                while k < total and due <= now:
                    i = mine[k % len(mine)]
                    c = self.lean.get(i)
                    number = self.next_number[i]
                    self.next_number[i] = number + 1
                    self.sent += 1
                    key = i << 32 | number
                    self.inflight.add(key)
                    if c is None or c.lost:
                        self.error("ConnectionLost")
                    else:
                        peer = rng.randrange(n_all - 1)
                        peer += peer >= i  # anyone but me
                        body = HEADER.pack(i, number, due) + pad
                        _, mid = c.core.message(self.creds[peer]["phone"], body, "text", None)
                        self._waiting[mid] = (i, key)
                        self.mark(c)
                    k += 1
                    due = start + k * interval_ns
            self.send_seconds = (time.monotonic_ns() - start) / 1e9
            if self._waiting:
                self._all_answered.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._all_answered.wait(), 60)
        finally:
            pacer.close()

    async def latency_runs(self) -> None:
        """Serve "run RATE SECONDS [START_NS TOTAL]" lines until "stop"; one JSON result
        per run."""
        loop = asyncio.get_running_loop()
        await self.login_all()
        self.next_number = dict.fromkeys(self.mine, 0)
        print("ready", flush=True)
        while True:
            line = (await loop.run_in_executor(None, sys.stdin.readline)).split()
            if not line or line[0] != "run":
                break
            self.latencies_us, self.delivered, self.deliveries = [], set(), 0
            self.acked, self.errors, self.inflight, self.sent = [], {}, set(), 0
            self.acked_ids, self.receipt_ids, self.key_of, self.receipts = set(), set(), {}, 0
            self._waiting = {}
            t0 = time.monotonic()
            self.send_seconds = None
            progress = loop.create_task(self.progress())
            start, total = (int(line[3]), int(line[4])) if len(line) > 4 else (None, None)
            sending = loop.create_task(self.open_loop(float(line[1]), float(line[2]), start,
                                                      total))  # fmt: skip
            told = loop.run_in_executor(None, sys.stdin.readline)  # "collect", maybe early
            await asyncio.wait({sending, told}, return_when=asyncio.FIRST_COMPLETED)
            stopped_early = not sending.done()
            if stopped_early:
                sending.cancel()
                await asyncio.gather(sending, return_exceptions=True)
            else:
                print(orjson.dumps({"sent_done": len(self.acked)}).decode(), flush=True)
                progress = self.faster(progress)
                await told
            progress.cancel()
            self.progress_interval = self.args.progress_interval
            r = {
                "sent": self.sent,
                "acked": self.acked,
                "errors": self.errors,
                "send_seconds": self.send_seconds or time.monotonic() - t0,
                "delivered": sorted(self.delivered),
                "deliveries": self.deliveries,
                "latencies_us": self.latencies_us,
                "redelivered_on_wire": sum(c.core.redelivered for c in self.lean.values()),
                "receipts": len(self.receipt_ids & self.acked_ids),
                "receipts_missing": len(self.acked_ids - self.receipt_ids),
                "receipts_duplicated": self.receipts - len(self.receipt_ids),
                "stopped_early": stopped_early,
                "pacer": self.pacer,
                **self.missing(),
            }  # fmt: skip
            print(orjson.dumps(r).decode(), flush=True)
            if stopped_early:
                break
        await self.close_all()


def main(argv=None) -> int:
    args = arg_parser("pigeon-bench-openloop").parse_args(argv)
    from pigeon.server.provision import load_credentials

    creds = load_credentials(args.creds)
    limit, capped = raise_open_files(args.last - args.first + 64)
    if capped:
        print(f"open-files limit {limit} caps this load process", file=sys.stderr)
    import uvloop

    uvloop.run(OpenLoopLoad(args, creds).latency_runs())
    return 0


if __name__ == "__main__":
    sys.exit(main())
