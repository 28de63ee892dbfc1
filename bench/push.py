"""Push wake-ups: server CPU per wake-up, and delivery latency with and without a
stalled push endpoint.

One real server (2 workers, ``sync = "os"``), a local webhook endpoint on
127.0.0.1 (aiohttp, in a thread), and the SDK in this process: device A
sends ``--messages`` 100-byte messages to the online device B, one at a
time (each waits for its server ack), and after each one a message to one
of ``--offline`` offline devices with webhook targets, round robin; with
``push-coalesce`` at 0.05 s nearly every one of those wakes its device.
Three runs with the same workload:

    off      no push configured (the baseline)
    fast     the endpoint answers at once
    stalled  the endpoint never answers within push-request-timeout (30 s):
             the gateway's requests pile up to push-concurrency and its
             queue fills, then wake-ups are dropped

Reported per run: B's delivery latency (A's send to B's receipt of the
frame) p50/p99, the workers' CPU seconds during the message phase (utime +
stime from /proc; the logins and registrations before it are not counted),
and the push counts from /status.  CPU per wake-up = (fast - off) / sent.
``--linger 0`` sends each tick's wake-ups at once (a webhook POST per
wake-up here, as FCM, APNs and Web Push always cost one request each); the
default (push-linger 0.05 s) lets a burst share one webhook POST.

    .venv/bin/python -m pigeon.bench.push [--messages 2000] [--offline 200] [--linger 0]
                                          [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import orjson

from pigeon.client import Client, Credentials
from pigeon.server.provision import provision
from pigeon.server.store import Store


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Endpoint:
    """A webhook endpoint in a thread: answers after ``delay`` seconds."""

    def __init__(self, delay: float):
        self.delay = delay
        self.port = _free_port()
        self.count = 0
        self.ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self._run, daemon=True).start()
        self.ready.wait(10)

    def _run(self):
        from aiohttp import web

        asyncio.set_event_loop(self.loop)

        async def handle(request):
            await request.read()
            self.count += 1
            if self.delay:
                await asyncio.sleep(self.delay)
            return web.Response(body=b"{}", content_type="application/json")

        async def main():
            self.stop_ev = asyncio.Event()
            app = web.Application()
            app.router.add_post("/wake", handle)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            self.ready.set()
            await self.stop_ev.wait()
            await runner.shutdown()
            await runner.cleanup()

        self.loop.run_until_complete(main())

    def stop(self):
        self.loop.call_soon_threadsafe(self.stop_ev.set)


def _cpu(pids) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def _serve(data: str, port: int, mport: int, options: dict) -> subprocess.Popen:
    args = [sys.executable, "-m", "pigeon.tools.cli", "serve", "--workers", "2",
            "--listen", f"127.0.0.1:{port}", "--data-dir", data, "--sync", "os",
            "--metrics-listen", f"127.0.0.1:{mport}", "--map-size", str(1 << 30),
            "--log-level", "warning", "--message-burst", "100000", "--message-rate", "100000"]  # fmt: skip
    for k, v in options.items():
        args += ["--" + k.replace("_", "-"), str(v)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    out, deadline = b"", time.monotonic() + 60
    while time.monotonic() < deadline and b"serving on" not in out:
        if sel.select(0.2):
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            out += chunk
    sel.close()
    if b"serving on" not in out:
        proc.kill()
        raise RuntimeError("server did not start")
    return proc


def _status(mport: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{mport}/status", timeout=5) as r:
        return orjson.loads(r.read())


async def _workload(port: int, creds: list[dict], n_msgs: int, n_offline: int, push: bool,
                    pids: list[int]):  # fmt: skip
    def cred(c):
        return Credentials(c["device"], bytes.fromhex(c["secret"]))

    a_c, b_c, offline = creds[0], creds[1], creds[2 : 2 + n_offline]
    if push:  # register the offline devices' targets, then leave
        for c in offline:
            cl = await Client.connect("127.0.0.1", port, plaintext=True)
            await cl.login(cred(c))
            await cl.set_push("webhook", f"tok-{c['phone']}")
            await cl.close()
    a = await Client.connect("127.0.0.1", port, plaintext=True)
    await a.login(cred(a_c))
    b = await Client.connect("127.0.0.1", port, plaintext=True)
    await b.login(cred(b_c))
    await asyncio.sleep(0.5)
    lat: list[float] = []
    sent_at: dict[str, float] = {}
    got = asyncio.Event()

    async def reader():
        while len(lat) < n_msgs:
            ev = await b.next_event(30)
            if getattr(ev, "body", None) is not None and ev.id in sent_at:
                lat.append(time.perf_counter() - sent_at.pop(ev.id))
            if hasattr(ev, "seq"):
                await b.ack(ev.seq)
        got.set()

    task = asyncio.create_task(reader())
    body = b"x" * 100
    cpu0 = _cpu(pids)  # the message phase only: not the logins and registrations
    for i in range(n_msgs):
        mid = f"b{i}"
        sent_at[mid] = time.perf_counter()
        await a.send(b_c["phone"], body, id=mid)
        await a.send(offline[i % n_offline]["phone"], body, id=f"o{i}")
    await asyncio.wait_for(got.wait(), 60)
    await task
    await asyncio.sleep(1.0)  # the gateway's last requests
    cpu = _cpu(pids) - cpu0
    await a.close()
    await b.close()
    lat.sort()
    return lat, cpu


def run_one(mode: str, n_msgs: int, n_offline: int, linger: float) -> dict:
    endpoint = None if mode == "off" else Endpoint(0.0 if mode == "fast" else 60.0)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        os.makedirs(data, mode=0o700)
        store = Store(os.path.join(data, "store"), map_size=1 << 30)
        creds = provision(store, 2 + n_offline, os.path.join(tmp, "creds.jsonl"))
        store.close()
        port, mport = _free_port(), _free_port()
        options = {
            "push_coalesce": 0.05,
            "push_request_timeout": 30,
            "push_retries": 0,
            "new_chats": 0,
            "push_linger": linger,
        }
        if endpoint is not None:
            options["push_webhook_url"] = f"http://127.0.0.1:{endpoint.port}/wake"
        proc = _serve(data, port, mport, options)
        try:
            pids = _children(proc.pid)
            lat, cpu = asyncio.run(
                _workload(port, creds, n_msgs, n_offline, endpoint is not None, pids)
            )
            time.sleep(1.5)  # the workers' last snapshot
            push = _status(mport).get("push", {})
            requests = 0 if endpoint is None else endpoint.count
        finally:
            proc.send_signal(signal.SIGKILL if mode == "stalled" else signal.SIGTERM)
            proc.wait(30)
            if endpoint is not None:
                endpoint.stop()

    def pct(q):
        return round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3, 3)

    counts: dict[str, int] = {}
    for key, n in push.items():
        result = key.split(" ", 1)[0]
        counts[result] = counts.get(result, 0) + n
    return {"mode": mode, "linger_s": linger, "messages": n_msgs, "offline_devices": n_offline,
            "delivery_ms_p50": pct(0.5), "delivery_ms_p99": pct(0.99),
            "worker_cpu_s": round(cpu, 3), "push": counts,
            "endpoint_requests": requests}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pigeon.bench.push", description=__doc__.split("\n")[0]
    )
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--offline", type=int, default=200)
    p.add_argument("--modes", default="off,fast,stalled")
    p.add_argument("--linger", type=float, default=0.05, help="push-linger of the server")
    p.add_argument("--repeat", type=int, default=3, help="runs of each mode (medians)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if not (1 <= args.messages <= 100_000 and 1 <= args.offline <= 10_000
            and 1 <= args.repeat <= 20):  # fmt: skip
        p.error("--messages 1..100000, --offline 1..10000, --repeat 1..20")
    runs = []
    for _ in range(args.repeat):  # the modes interleaved, so drift hits each alike
        for m in args.modes.split(","):
            r = run_one(m, args.messages, args.offline, args.linger)
            print(orjson.dumps(r).decode(), file=sys.stderr)
            runs.append(r)
    results = []
    for m in args.modes.split(","):
        mine = [r for r in runs if r["mode"] == m]
        med = {k: statistics.median(r[k] for r in mine)
               for k in ("delivery_ms_p50", "delivery_ms_p99", "worker_cpu_s")}  # fmt: skip
        results.append({**mine[-1], **med, "runs": len(mine),
                        "sent": statistics.median(r["push"].get("sent", 0) for r in mine)})  # fmt: skip
    by = {r["mode"]: r for r in results}
    if "off" in by and "fast" in by and by["fast"]["sent"]:
        extra = by["fast"]["worker_cpu_s"] - by["off"]["worker_cpu_s"]
        per = extra / by["fast"]["sent"]
        results.append({"cpu_us_per_wakeup": round(per * 1e6, 1),
                        "note": "median of runs; /proc CPU has 10 ms resolution"})  # fmt: skip
    for r in results:
        print(orjson.dumps(r).decode())
    if args.json:
        from pigeon.bench.harness import machine

        doc = {"bench": "push", "argv": sys.argv[1:] if argv is None else list(argv),
               "machine": machine(), "load_average": os.getloadavg(), "results": results,
               "runs": runs}  # fmt: skip
        with open(args.json, "wb") as f:
            f.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
