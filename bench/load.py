"""One load-generator process of ``pigeon bench`` (started by bench/harness.py).

It logs in its share of the provisioned devices with the asyncio SDK, says
``ready`` on stdout, waits for ``go`` on stdin, runs the load, and prints one
JSON object with what its clients actually sent and received.  It runs in
its own process so its CPU is never counted as the server's.

Every message body starts with (sender index, message number, send time in
monotonic ns); CLOCK_MONOTONIC is one clock for every process of the
machine, so a receiver in another load process can compute the latency.
"""

from __future__ import annotations

import argparse
import asyncio
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
        self.latencies_us: list[int] = []
        self.delivered: set[int] = set()  # sender << 32 | number
        self.deliveries = 0
        self.acked: list[int] = []
        self.acked_ids: set[str] = set()
        self.receipt_ids: set[str] = set()
        self.receipts = 0
        self.errors: dict[str, int] = {}
        self.redelivered = 0

    async def login_all(self) -> None:
        host, _, port = self.args.target.rpartition(":")
        sem = asyncio.Semaphore(64)

        async def one(i: int) -> None:
            async with sem:
                c = await Client.connect(host, int(port), timeout=30)
                await c.login(Credentials(self.creds[i]["device"],
                                          bytes.fromhex(self.creds[i]["secret"])))  # fmt: skip
                self.clients[i] = c

        await asyncio.gather(*(one(i) for i in self.mine))

    async def receive(self, i: int) -> None:
        c = self.clients[i]
        async for ev in c:
            if type(ev) is IncomingMessage:
                now = time.monotonic_ns()
                sender, number, sent = HEADER.unpack_from(ev.body)
                self.latencies_us.append((now - sent) // 1000)
                self.deliveries += 1
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
            body = HEADER.pack(i, number, time.monotonic_ns()) + pad
            try:
                ack = await c.send(self.creds[peer]["phone"], body)
                self.acked.append(i << 32 | number)
                self.acked_ids.add(ack.id)
            except ServerError as exc:
                self.errors[exc.name] = self.errors.get(exc.name, 0) + 1
            except (TimeoutError, ConnectionError) as exc:
                key = type(exc).__name__
                self.errors[key] = self.errors.get(key, 0) + 1

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
        print("ready", flush=True)
        go = await loop.run_in_executor(None, sys.stdin.readline)
        if go.strip() != "go":
            return
        t0 = time.monotonic()
        await self.throughput()
        sent_s = time.monotonic() - t0
        print(orjson.dumps({"sent_done": len(self.acked)}).decode(), flush=True)
        # keep receiving, reporting progress, until the harness has seen everything arrive
        progress = loop.create_task(self.progress())
        await loop.run_in_executor(None, sys.stdin.readline)
        progress.cancel()
        for r in readers:
            r.cancel()
        self.redelivered = sum(c.redelivered for c in self.clients.values())
        result = {
            "sent": sum(self.next_number.values()),
            "acked": self.acked,
            "delivered": sorted(self.delivered),
            "deliveries": self.deliveries,
            "redelivered_on_wire": self.redelivered,
            "receipts": len(self.receipt_ids & self.acked_ids),
            "receipts_missing": len(self.acked_ids - self.receipt_ids),
            "receipts_duplicated": self.receipts - len(self.receipt_ids),
            "latencies_us": self.latencies_us,
            "errors": self.errors,
            "send_seconds": sent_s,
        }
        print(orjson.dumps(result).decode(), flush=True)
        await asyncio.gather(*(c.close() for c in self.clients.values()))

    async def open_loop(self, rate: float, seconds: float) -> dict:
        """Send at a fixed ``rate`` (msg/s, this process) for ``seconds``, not waiting for acks.

        Each message is stamped with the time it was *due*, not the time it
        went out, so a stalled sender shows up as latency (no coordinated
        omission).  Senders are this process's clients in turn; recipients
        are random online peers.
        """
        loop = asyncio.get_running_loop()
        mine = list(self.mine)
        n_all = len(self.creds)
        pad = bytes(max(0, self.args.size - HEADER.size))
        rng = random.Random(self.args.seed)
        self.latencies_us = []
        self.delivered = set()
        self.deliveries = 0
        acked: list[int] = []
        errors: dict[str, int] = {}
        pending: set[asyncio.Task] = set()
        total = int(rate * seconds)
        interval_ns = int(1e9 / rate)
        start = time.monotonic_ns() + 50_000_000

        async def one(i: int, number: int, due: int) -> None:
            peer = rng.randrange(n_all - 1)
            peer += peer >= i
            body = HEADER.pack(i, number, due) + pad
            try:
                await self.clients[i].send(self.creds[peer]["phone"], body, timeout=60)
                acked.append(i << 32 | number)
            except (ServerError, TimeoutError, ConnectionError) as exc:
                key = getattr(exc, "name", type(exc).__name__)
                errors[key] = errors.get(key, 0) + 1

        k = 0
        while k < total:
            now = time.monotonic_ns()
            due = start + k * interval_ns
            if due > now:
                await asyncio.sleep((due - now) / 1e9)
                continue
            while k < total and start + k * interval_ns <= now:
                i = mine[k % len(mine)]
                number = self.next_number[i]
                self.next_number[i] += 1
                t = loop.create_task(one(i, number, start + k * interval_ns))
                pending.add(t)
                t.add_done_callback(pending.discard)
                k += 1
        send_s = (time.monotonic_ns() - start) / 1e9
        if pending:
            await asyncio.wait(pending, timeout=60)
        return {"sent": total, "acked": acked, "errors": errors, "send_seconds": send_s}

    async def latency_runs(self) -> None:
        """Serve "run RATE SECONDS" lines until "stop"; one JSON result per run."""
        loop = asyncio.get_running_loop()
        await self.login_all()
        readers = [loop.create_task(self.receive(i)) for i in self.mine]
        self.next_number = dict.fromkeys(self.mine, 0)
        print("ready", flush=True)
        while True:
            line = (await loop.run_in_executor(None, sys.stdin.readline)).split()
            if not line or line[0] != "run":
                break
            r = await self.open_loop(float(line[1]), float(line[2]))
            print(orjson.dumps({"sent_done": len(r["acked"])}).decode(), flush=True)
            progress = loop.create_task(self.progress())
            await loop.run_in_executor(None, sys.stdin.readline)  # "collect"
            progress.cancel()
            r.update(
                delivered=sorted(self.delivered),
                deliveries=self.deliveries,
                latencies_us=self.latencies_us,
                redelivered_on_wire=sum(c.redelivered for c in self.clients.values()),
                receipts=0, receipts_missing=0, receipts_duplicated=0,
            )  # fmt: skip
            print(orjson.dumps(r).decode(), flush=True)
        for t in readers:
            t.cancel()
        await asyncio.gather(*(c.close() for c in self.clients.values()))

    async def progress(self) -> None:
        while True:
            print(orjson.dumps({"delivered": len(self.delivered),
                                "receipts": len(self.receipt_ids)}).decode(), flush=True)  # fmt: skip
            await asyncio.sleep(0.1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="pigeon-bench-load")
    p.add_argument("--target", required=True)
    p.add_argument("--creds", required=True)
    p.add_argument("--first", type=int, required=True)
    p.add_argument("--last", type=int, required=True)
    p.add_argument("--messages", type=int, default=0, help="per client")
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--size", type=int, default=100)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--mode",
        default="throughput",
        choices=["throughput", "idle", "latency", "presence-pub", "presence-sub"],
    )
    p.add_argument("--changes", type=int, default=100, help="presence-pub: changes to make")
    p.add_argument("--interval", type=float, default=0.05, help="presence-pub: s between them")
    p.add_argument("--watch", help="presence-sub: the user every client subscribes to")
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
    elif args.mode == "latency":
        uvloop.run(load.latency_runs())
    elif args.mode == "presence-pub":
        uvloop.run(presence_pub(load))
    elif args.mode == "presence-sub":
        uvloop.run(presence_sub(load))
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


if __name__ == "__main__":
    sys.exit(main())
