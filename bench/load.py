"""One load-generator process of ``pigeon bench`` (started by bench/harness.py).

It logs in its share of the provisioned devices with the asyncio SDK, says
``ready`` on stdout, waits for ``go`` on stdin, runs the load, and prints one
JSON object with what its clients actually sent and received.  It runs in
its own process so its CPU is never counted as the server's.

While the load runs it prints a progress line every ``--progress-interval``
seconds (every 0.1 s once its sends are done, so the harness sees the last
delivery soon): ``{"progress": {"sent", "acked", "delivered", "receipts",
"errors"}}``, counts so far.  The harness draws its progress bar from these
and decides from them that a run has stalled; it then says ``stop`` early,
and the load process cancels its sends and prints its result at once, with
the messages still waiting for their ack (``unacked``) so the harness can
name what is missing.  Every other line is ``ready``, ``{"sent_done": N}``
or the result.

Every message body starts with (sender index, message number, send time in
monotonic ns); CLOCK_MONOTONIC is one clock for every process of the
machine, so a receiver in another load process can compute the latency.

The latency bench's load is bench/openloop.py: the same lines and options,
open-loop sends from a lean driver of the SDK's sans-IO core.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import resource
import struct
import sys
import time

import orjson

from pigeon.client import Client, Credentials, ServerError
from pigeon.core.events import IncomingMessage, IncomingReceipt, PresenceUpdate

HEADER = struct.Struct("<IIQ")  # sender index, message number, send time (monotonic ns)


def raise_open_files(wanted: int) -> tuple[int, bool]:
    """Raise the soft RLIMIT_NOFILE toward ``wanted``; returns (limit, capped)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft, soft < wanted


class Load:
    def __init__(self, args, creds: list[dict]):
        self.args = args
        self.creds = creds  # every provisioned device; this process drives [first, last)
        self.mine = range(args.first, args.last)
        self.clients: dict[int, Client] = {}
        # the companions of each user this process drives (creds' "companions": a
        # multi-device run); they receive and ack, the primary sends
        self.companions: list[Client] = []
        self.copies = 0  # message copies handed to any device here (primaries included)
        self.latencies_us: list[int] = []
        self.delivered: set[int] = set()  # sender << 32 | number
        self.deliveries = 0
        self.acked: list[int] = []
        self.acked_ids: set[str] = set()
        self.receipt_ids: set[str] = set()
        self.receipts = 0
        self.errors: dict[str, int] = {}
        self.redelivered = 0
        self.inflight: set[int] = set()  # sent, neither acked nor failed yet
        self.key_of: dict[str, int] = {}  # message id -> sender << 32 | number (acked)
        self.next_number: dict[int, int] = {}
        self.sent = 0
        self.progress_interval = args.progress_interval

    async def login_all(self) -> None:
        host, _, port = self.args.target.rpartition(":")
        sem = asyncio.Semaphore(64)

        async def one(i: int) -> None:
            async with sem:
                c = await Client.connect(host, int(port), timeout=30, plaintext=True)
                d = self.creds[i]
                ident = d.get("identity")  # a primary's: it signs the link bench's links
                await c.login(Credentials(d["device"], bytes.fromhex(d["secret"]),
                                          ident and bytes.fromhex(ident)))  # fmt: skip
                self.clients[i] = c

        async def companion(d: dict) -> None:
            async with sem:
                c = await Client.connect(host, int(port), timeout=30, plaintext=True)
                await c.login(Credentials(d["device"], bytes.fromhex(d["secret"])))
                self.companions.append(c)

        await asyncio.gather(*(one(i) for i in self.mine),
                             *(companion(d) for i in self.mine
                               for d in self.creds[i].get("companions", ())))  # fmt: skip

    async def receive_copies(self, c: Client) -> None:
        """A companion: every message copy (as a recipient, or a sync copy of its own
        user's) is counted and acked, and so is everything else it is sent."""
        async for ev in c:
            if type(ev) is IncomingMessage:
                self.copies += 1
            await c.ack(ev.seq)

    async def receive(self, i: int) -> None:
        c = self.clients[i]
        async for ev in c:
            if type(ev) is IncomingMessage:
                now = time.monotonic_ns()
                sender, number, sent = HEADER.unpack_from(ev.body)
                self.latencies_us.append((now - sent) // 1000)
                self.deliveries += 1
                self.copies += 1
                self.delivered.add(sender << 32 | number)
                await c.ack(ev.seq)
            elif type(ev) is IncomingReceipt:
                self.receipts += 1
                self.receipt_ids.add(ev.id)
                await c.ack(ev.seq)

    async def send(self, i: int, count: int, rng: random.Random) -> None:
        c = self.clients[i]
        n_all = len(self.creds)
        pad = bytes(max(0, self.args.size - HEADER.size))
        for _ in range(count):
            peer = rng.randrange(n_all - 1)
            peer += peer >= i  # anyone but me
            number = self.next_number[i]
            self.next_number[i] += 1
            self.sent += 1
            body = HEADER.pack(i, number, time.monotonic_ns()) + pad
            key = i << 32 | number
            self.inflight.add(key)  # left in on cancellation: that message is missing
            try:
                ack = await c.send(self.creds[peer]["phone"], body)
                self.acked.append(key)
                self.acked_ids.add(ack.id)
                self.key_of[ack.id] = key
            except ServerError as exc:
                self.errors[exc.name] = self.errors.get(exc.name, 0) + 1
            except (TimeoutError, ConnectionError) as exc:
                name = type(exc).__name__
                self.errors[name] = self.errors.get(name, 0) + 1
            self.inflight.discard(key)

    async def throughput(self) -> None:
        a = self.args
        self.next_number = dict.fromkeys(self.mine, 0)
        rng = random.Random(a.seed)
        tasks = []
        for i in self.mine:
            # messages-per-client split over `window` senders: at most `window` unacked
            share = [a.messages // a.window + (k < a.messages % a.window) for k in range(a.window)]
            for k in range(a.window):
                if share[k]:
                    tasks.append(self.send(i, share[k], random.Random(rng.random())))
        await asyncio.gather(*tasks)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        await self.login_all()
        readers = [loop.create_task(self.receive(i)) for i in self.mine]
        readers += [loop.create_task(self.receive_copies(c)) for c in self.companions]
        print("ready", flush=True)
        go = await loop.run_in_executor(None, sys.stdin.readline)
        if go.strip() != "go":
            return
        t0 = time.monotonic()
        progress = loop.create_task(self.progress())
        sending = loop.create_task(self.throughput())
        # the harness's next word ends the run: after the sends, or early if it stalled
        told = loop.run_in_executor(None, sys.stdin.readline)
        await asyncio.wait({sending, told}, return_when=asyncio.FIRST_COMPLETED)
        stopped_early = not sending.done()
        if stopped_early:
            sending.cancel()
            await asyncio.gather(sending, return_exceptions=True)
        sent_s = time.monotonic() - t0
        if not stopped_early:
            print(orjson.dumps({"sent_done": len(self.acked)}).decode(), flush=True)
            # keep receiving, reporting progress, until the harness has seen everything arrive
            progress = self.faster(progress)
            await told
        progress.cancel()
        for r in readers:
            r.cancel()
        self.redelivered = sum(c.redelivered for c in self.clients.values())
        result = {
            "sent": self.sent,
            "acked": self.acked,
            "delivered": sorted(self.delivered),
            "deliveries": self.deliveries,
            "copies": self.copies,
            "redelivered_on_wire": self.redelivered,
            "receipts": len(self.receipt_ids & self.acked_ids),
            "receipts_missing": len(self.acked_ids - self.receipt_ids),
            "receipts_duplicated": self.receipts - len(self.receipt_ids),
            "latencies_us": self.latencies_us,
            "errors": self.errors,
            "send_seconds": sent_s,
            "stopped_early": stopped_early,
            **self.missing(),
        }
        print(orjson.dumps(result).decode(), flush=True)
        await self.close_all()

    async def close_all(self) -> None:
        # a stalled server may never answer the close: do not hang on it
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(c.close() for c in (*self.clients.values(), *self.companions)),
                               return_exceptions=True), 10)  # fmt: skip

    def missing(self) -> dict:
        """What this process still waits for: the messages sent and not acked (at most a
        window per client) and the acked ones whose delivered receipt did not come."""
        return {
            "unacked": sorted(self.inflight),
            "no_receipt": sorted(self.key_of[m] for m in self.acked_ids - self.receipt_ids),
        }

    def faster(self, progress: asyncio.Task) -> asyncio.Task:
        """The sends are done: a progress line now, then every 0.1 s, so the harness
        sees the last delivery (and ends the run's clock) soon after it came."""
        progress.cancel()
        self.progress_interval = min(self.args.progress_interval, 0.1)
        return asyncio.get_running_loop().create_task(self.progress())

    async def progress(self) -> None:
        """A progress line now and every ``progress_interval`` s (see the module's doc)."""
        while True:
            counts = {
                "sent": self.sent,
                "acked": len(self.acked),
                "delivered": len(self.delivered),
                "receipts": len(self.receipt_ids),
                "copies": self.copies,
                "errors": sum(self.errors.values()),
            }
            print(orjson.dumps({"progress": counts}).decode(), flush=True)
            await asyncio.sleep(self.progress_interval)


MODES = ("throughput", "idle", "presence-pub", "presence-sub", "link", "group-send", "group-recv")


def arg_parser(prog: str = "pigeon-bench-load") -> argparse.ArgumentParser:
    """The options of a load process (bench/openloop.py takes the same)."""
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("--target", required=True)
    p.add_argument("--creds", required=True)
    p.add_argument("--first", type=int, required=True)
    p.add_argument("--last", type=int, required=True)
    p.add_argument("--messages", type=int, default=0, help="per client")
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--size", type=int, default=100)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--progress-interval", type=float, default=0.5, help="s between progress lines")
    p.add_argument(
        "--mode",
        default="throughput",
        choices=MODES,
    )
    p.add_argument("--members", help="group-send: a file of the member phones, one a line "
                   "(the group is created with them)")  # fmt: skip
    p.add_argument("--changes", type=int, default=100, help="presence-pub: changes to make")
    p.add_argument("--interval", type=float, default=0.05, help="presence-pub: s between them")
    p.add_argument("--watch", help="presence-sub: the user every client subscribes to")
    return p


def main(argv=None) -> int:
    p = arg_parser()
    args = p.parse_args(argv)
    from pigeon.server.provision import load_credentials

    creds = load_credentials(args.creds)
    limit, capped = raise_open_files(args.last - args.first + 64)
    if capped:
        print(f"open-files limit {limit} caps this load process", file=sys.stderr)
    import uvloop

    load = Load(args, creds)
    if args.mode == "idle":
        uvloop.run(idle(load))
    elif args.mode == "presence-pub":
        uvloop.run(presence_pub(load))
    elif args.mode == "presence-sub":
        uvloop.run(presence_sub(load))
    elif args.mode == "link":
        uvloop.run(link(load))
    elif args.mode == "group-send":
        uvloop.run(group_send(load))
    elif args.mode == "group-recv":
        uvloop.run(group_recv(load))
    else:
        uvloop.run(load.run())
    return 0


async def idle(load: Load) -> None:
    loop = asyncio.get_running_loop()
    await load.login_all()
    print("ready", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    await asyncio.gather(*(c.close() for c in load.clients.values()))


async def presence_pub(load: Load) -> None:
    """One device changes its presence ``--changes`` times, one every ``--interval`` s
    (paced by due time); prints the monotonic time each change was sent."""
    loop = asyncio.get_running_loop()
    await load.login_all()
    (client,) = load.clients.values()
    print("ready", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)  # "go"
    sent = []
    start = time.monotonic()
    for k in range(load.args.changes):
        delay = start + k * load.args.interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        sent.append(time.monotonic_ns())
        await client.set_presence(k % 2 == 0)
    print(orjson.dumps({"sent_ns": sent}).decode(), flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    await client.close()


async def presence_sub(load: Load) -> None:
    """Every client subscribes to ``--watch`` and records when each push arrives."""
    loop = asyncio.get_running_loop()
    await load.login_all()
    times: dict[int, list[int]] = {i: [] for i in load.mine}

    async def first(i: int) -> None:
        await load.clients[i].subscribe(load.args.watch)
        while not isinstance(await load.clients[i].next_event(60), PresenceUpdate):
            pass  # the current state, sent at once

    async def watch(i: int) -> None:
        c = load.clients[i]
        while True:
            ev = await c.next_event()
            if isinstance(ev, PresenceUpdate):
                times[i].append(time.monotonic_ns())

    await asyncio.gather(*(first(i) for i in load.mine))
    tasks = [loop.create_task(watch(i)) for i in load.mine]
    print("ready", flush=True)
    want = int((await loop.run_in_executor(None, sys.stdin.readline)).split()[1])  # "collect K"
    last, idle_since = -1, time.monotonic()
    while time.monotonic() - idle_since < 10:  # until all arrived, or 10 s without progress
        got = sum(len(t) for t in times.values())
        if got >= want * len(times):
            break
        if got != last:
            last, idle_since = got, time.monotonic()
        await asyncio.sleep(0.02)
    for t in tasks:
        t.cancel()
    print(orjson.dumps({"times_ns": list(times.values())}).decode(), flush=True)
    await asyncio.gather(*(c.close() for c in load.clients.values()), return_exceptions=True)


async def link(load: Load) -> None:
    """Every primary links one new companion by QR code, the real flow of the SDK:
    the companion connects and asks to pair, the primary links the reference the
    QR text carries, the companion gets its credentials.  ``--window`` links run
    at once.  Prints each completed link's duration (companion connect to its
    credentials) and the errors; the primaries ack their device-list notices."""
    loop = asyncio.get_running_loop()
    host, _, port = load.args.target.rpartition(":")
    await load.login_all()

    async def ack_all(c: Client) -> None:
        async for ev in c:
            if getattr(ev, "seq", None) is not None:
                await c.ack(ev.seq)

    acking = [loop.create_task(ack_all(c)) for c in load.clients.values()]
    print("ready", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)  # "go"
    sem = asyncio.Semaphore(load.args.window)
    durations_us: list[int] = []
    companions: list[Client] = []

    async def one(i: int) -> None:
        async with sem:
            t0 = time.monotonic_ns()
            try:
                comp = await Client.connect(host, int(port), timeout=30, plaintext=True)
                companions.append(comp)
                pairing = comp.pair_qr(name=f"bench-{i}", timeout=30)
                code = await anext(pairing)
                await load.clients[i].link(code.qr)
                creds = await anext(pairing)
                assert isinstance(creds, Credentials), creds
            except Exception as exc:  # counted by kind, never as a link
                key = f"{exc.code}" if isinstance(exc, ServerError) else type(exc).__name__
                load.errors[key] = load.errors.get(key, 0) + 1
                return
            durations_us.append((time.monotonic_ns() - t0) // 1000)

    await asyncio.gather(*(one(i) for i in load.mine))
    print(orjson.dumps({"durations_us": durations_us, "errors": load.errors}).decode(), flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)  # "stop"
    for t in acking:
        t.cancel()
    await asyncio.gather(*(c.close() for c in [*companions, *load.clients.values()]),
                         return_exceptions=True)  # fmt: skip


async def group_send(load: Load) -> None:
    """One member creates the group (every phone of ``--members``), prints its address
    with ``ready``, then on ``go`` sends ``--messages`` plaintext group messages (no
    Megolm: the server's work is measured), ``--window`` unacked at a time; prints
    ``sent_done`` and, on ``stop``, the numbers acked and their send times."""
    loop = asyncio.get_running_loop()
    await load.login_all()
    ((me, client),) = load.clients.items()
    with open(load.args.members) as f:
        members = [ln.strip() for ln in f if ln.strip()]
    res = await client.group("create", subject="bench", members=members, timeout=120)
    if res.failed:
        raise SystemExit(f"group-send: members not added: {res.failed[:5]}")

    async def ack_all() -> None:  # the create notice, the members' delivered receipts
        async for ev in client:
            if getattr(ev, "seq", None) is not None:
                await client.ack(ev.seq)

    acking = loop.create_task(ack_all())
    print(f"ready {res.group}", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)  # "go"
    progress = loop.create_task(load.progress())
    sem = asyncio.Semaphore(load.args.window)
    sent_ns: dict[int, int] = {}
    pad = bytes(max(0, load.args.size - HEADER.size))

    async def one(k: int) -> None:
        async with sem:
            t = time.monotonic_ns()
            load.sent += 1
            try:
                ack = await client.group_send(res.group, HEADER.pack(me, k, t) + pad)
            except Exception as exc:  # counted by kind, never as acked
                key = f"{exc.code}" if isinstance(exc, ServerError) else type(exc).__name__
                load.errors[key] = load.errors.get(key, 0) + 1
                return
            if ack.failed:
                load.errors["failed_members"] = load.errors.get("failed_members", 0) + 1
                return
            sent_ns[k] = t
            load.acked.append(k)

    sending = asyncio.ensure_future(asyncio.gather(*(one(k) for k in range(load.args.messages))))
    stop = loop.run_in_executor(None, sys.stdin.readline)
    await asyncio.wait([sending, stop], return_when=asyncio.FIRST_COMPLETED)
    if sending.done():
        print(orjson.dumps({"sent_done": len(load.acked)}).decode(), flush=True)
        await stop  # "stop"
    sending.cancel()
    progress.cancel()
    print(orjson.dumps({"group": res.group, "sent": load.sent, "sent_ns": sent_ns,
                        "errors": load.errors}, option=orjson.OPT_NON_STR_KEYS).decode(),
          flush=True)  # fmt: skip
    acking.cancel()
    await client.close()


async def group_recv(load: Load) -> None:
    """Online members: every group message is timed and acked (so is every other
    event); on ``stop`` prints, per message number, how many of this process's
    clients got it and the latest arrival, and the duplicates."""
    loop = asyncio.get_running_loop()
    await load.login_all()
    got: dict[int, set[int]] = {}  # message number -> clients here that got it
    last_ns: dict[int, int] = {}
    dups = 0

    async def consume(i: int) -> None:
        nonlocal dups
        c = load.clients[i]
        async for ev in c:
            if type(ev) is IncomingMessage and ev.group is not None:
                now = time.monotonic_ns()
                _, k, _ = HEADER.unpack_from(ev.body)
                seen = got.setdefault(k, set())
                if i in seen:
                    dups += 1
                else:
                    seen.add(i)
                    load.copies += 1
                    load.delivered.add(k)
                    last_ns[k] = max(last_ns.get(k, 0), now)
            if getattr(ev, "seq", None) is not None:
                await c.ack(ev.seq)

    tasks = [loop.create_task(consume(i)) for i in load.mine]
    print("ready", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)  # "go"
    print(orjson.dumps({"sent_done": 0}).decode(), flush=True)  # (it sends nothing)
    progress = loop.create_task(load.progress())
    await loop.run_in_executor(None, sys.stdin.readline)  # "stop"
    progress.cancel()
    for t in tasks:
        t.cancel()
    print(orjson.dumps({"got": {k: len(v) for k, v in got.items()}, "last_ns": last_ns,
                        "duplicated": dups, "clients": len(load.mine)},
                       option=orjson.OPT_NON_STR_KEYS).decode(), flush=True)  # fmt: skip
    await asyncio.gather(*(c.close() for c in load.clients.values()), return_exceptions=True)


if __name__ == "__main__":
    sys.exit(main())
