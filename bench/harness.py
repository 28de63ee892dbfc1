"""``pigeon bench``: load runs against a real server, measured from the OS.

    pigeon bench throughput --clients 1000 --messages 100 --json
    pigeon bench idle --clients 2000 --json

By default a run starts its own server (``pigeon serve`` in a temporary
data directory, with the *bench profile*: registration, login,
per-address and anti-spam limits (message and typing rates, new
conversations with non-contacts) lifted so the load is not refused, logs at
warning; the JSON's "limits_lifted" lists them),
provisions the accounts straight into its store, and drives them from
separate load processes (bench/load.py) so the load generator's CPU is
never counted as the server's.  ``--target HOST:PORT --server-pid PID``
measures a server you started instead (its store must hold the accounts:
``pigeon admin provision``, then ``--creds FILE``).

Server CPU is the user+system time the OS reports for the supervisor and
every worker (psutil), taken just before the load starts and after the
last delivery arrived, so logins are not in it.  Memory is sampled every
0.1 s as the sum over the server's processes; the peak is reported.

Honesty: lost = acknowledged by the server but never handed to a recipient
application; duplicated = handed to an application twice.  A run that lost
or duplicated anything says so in its JSON and exits with status 1.
"""

from __future__ import annotations

import contextlib
import os
import platform
import selectors
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from types import SimpleNamespace

import orjson

#: Settings of the bench profile: what a benchmark must not trip over.
BENCH_PROFILE = {
    "register_per_phone": 1_000_000,
    "register_per_ip": 1_000_000,
    "login_failures": 1_000_000,
    "max_connections_per_ip": 1_000_000,
    "idle_timeout": 3600,
    "login_timeout": 120,
    "log_level": "warning",
    "metrics_listen": "off",
    # anti-spam: a load generator is exactly what these limits stop
    "message_rate": 0,
    "typing_rate": 0,
    "new_chats": 0,
}


class BenchError(Exception):
    """The run could not be done; the message says why."""


def machine() -> dict:
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        try:
            model = subprocess.run(["sysctl", "-n", "hw.model"], capture_output=True,
                                   text=True, timeout=5).stdout.strip() or model  # fmt: skip
        except OSError:
            pass
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerUnderTest:
    """A server this run started (or one given by PID) and its OS-level measurements."""

    def __init__(self, pid: int | None = None, target: str | None = None):
        import psutil

        self.psutil = psutil
        self.proc: subprocess.Popen | None = None
        self.pid = pid
        self.target = target
        self.data_dir: str | None = None
        self._tmp: str | None = None
        self.peak_rss = 0
        self._sampling = False

    def start(self, workers: int, extra: dict, creds_count: int, creds_path: str) -> None:
        from pigeon.server.provision import provision
        from pigeon.server.store import Store

        self._tmp = tempfile.mkdtemp(prefix="pigeon-bench-")
        self.data_dir = os.path.join(self._tmp, "data")
        os.makedirs(self.data_dir)
        store = Store(os.path.join(self.data_dir, "store"), map_size=4 << 30)
        try:
            provision(store, creds_count, creds_path)
        finally:
            store.close()
        port = _free_port()
        self.target = f"127.0.0.1:{port}"
        args = [sys.executable, "-m", "pigeon.tools.cli", "serve", "--workers", str(workers),
                "--listen", self.target, "--data-dir", self.data_dir, "--map-size", str(4 << 30),
                "--log-format", "json"]  # fmt: skip
        for k, v in {**BENCH_PROFILE, **extra}.items():
            args += ["--" + k.replace("_", "-"), str(v)]
        self.log = open(os.path.join(self._tmp, "server.log"), "wb")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.log,
                                     stdin=subprocess.DEVNULL)  # fmt: skip
        self.pid = self.proc.pid
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if sel.select(0.2):
                line = self.proc.stdout.readline().decode()
                if line.startswith("pigeon: serving on"):
                    return
                if not line:
                    break
        self.stop()
        raise BenchError("the server did not start; see its log: " + self.log_path())

    def log_path(self) -> str:
        return os.path.join(self._tmp or "", "server.log")

    def processes(self):
        root = self.psutil.Process(self.pid)
        return [root, *root.children(recursive=True)]

    def cpu(self) -> tuple[float, float]:
        user = system = 0.0
        for p in self.processes():
            try:
                t = p.cpu_times()
            except self.psutil.NoSuchProcess:
                continue
            user += t.user
            system += t.system
        return user, system

    def rss(self) -> int:
        total = 0
        for p in self.processes():
            try:
                total += p.memory_info().rss
            except self.psutil.NoSuchProcess:
                pass
        return total

    def memory(self) -> tuple[int, str]:
        """(bytes, method): PSS summed over the processes where the OS has it, else RSS."""
        total, method = 0, "pss"
        for p in self.processes():
            try:
                full = p.memory_full_info()
                pss = getattr(full, "pss", None)
                if pss is None:
                    method = "rss"
                    total += full.rss
                else:
                    total += pss
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                pass
        return total, method

    def sample_peak(self) -> None:
        self._sampling = True

        def loop():
            while self._sampling:
                try:
                    self.peak_rss = max(self.peak_rss, self.rss())
                except Exception:  # a worker between restarts
                    pass
                time.sleep(0.1)

        threading.Thread(target=loop, daemon=True).start()

    def stop(self) -> None:
        self._sampling = False
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)


class LoadProc:
    """One bench/load.py process, spoken to by lines on its stdin and stdout."""

    def __init__(self, args: list[str]):
        self.proc = subprocess.Popen([sys.executable, "-m", "pigeon.bench.load", *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
        os.set_blocking(self.proc.stdout.fileno(), True)

    def line(self, timeout: float) -> str:
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise BenchError(f"a load process said nothing for {timeout} s")
        line = self.proc.stdout.readline().decode()
        if not line:
            raise BenchError(f"a load process exited (status {self.proc.wait()})")
        return line.strip()

    def say(self, word: str) -> None:
        self.proc.stdin.write(word.encode() + b"\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def _percentile(sorted_values: list[int], q: float) -> float | None:
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, int(q * len(sorted_values)))
    return sorted_values[k] / 1000.0  # us -> ms


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    parts = max(1, min(parts, n))
    step, extra = divmod(n, parts)
    out, start = [], 0
    for k in range(parts):
        end = start + step + (k < extra)
        out.append((start, end))
        start = end
    return out


def _cdf(sorted_us: list[int]) -> list[list[float]]:
    """[latency ms, fraction] points of the latency distribution, for plots."""
    if not sorted_us:
        return []
    qs = [i / 100 for i in range(101)] + [0.995, 0.999, 0.9999]
    return [[_percentile(sorted_us, q), q] for q in sorted(qs)]


def _drain(loads, acked_total: int, want_receipts: bool, drain_timeout: float) -> None:
    """Wait until every acked message arrived (and its receipt), or nothing moves for a while."""
    latest = [(0, 0)] * len(loads)
    last_change, last_sum = time.monotonic(), None
    while True:
        for k, lp in enumerate(loads):
            p = orjson.loads(lp.line(30))
            latest[k] = (p["delivered"], p["receipts"])
        delivered_now = sum(d for d, _ in latest)
        receipts_now = sum(r for _, r in latest)
        now = time.monotonic()
        if (delivered_now, receipts_now) != last_sum:
            last_sum, last_change = (delivered_now, receipts_now), now
        done = delivered_now >= acked_total and (not want_receipts or receipts_now >= acked_total)
        if done or now - last_change > drain_timeout:
            return


def _results(loads, word: str) -> list[dict]:
    out = []
    for lp in loads:
        lp.say(word)
        while True:
            line = lp.line(60)
            if not line.startswith('{"delivered"'):
                out.append(orjson.loads(line))
                break
    return out


def _tally(results: list[dict]) -> dict:
    """What the clients saw, summed over load processes."""
    acked, delivered, deliveries, lat, errors = set(), set(), 0, [], {}
    for r in results:
        acked.update(r["acked"])
        delivered.update(r["delivered"])
        deliveries += r["deliveries"]
        lat.extend(r["latencies_us"])
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    lat.sort()
    return {
        "sent": sum(r["sent"] for r in results),
        "acked": len(acked),
        "delivered": len(delivered),
        "lost": len(acked - delivered),
        "duplicated": deliveries - len(delivered),
        "redelivered_on_wire": sum(r["redelivered_on_wire"] for r in results),
        "errors": errors,
        "_lat": lat,
    }


@contextlib.contextmanager
def _bench_run(opts):
    """The server (started here, or the one --target names), the credentials file and
    the load processes of one bench; all ended and removed afterwards."""
    tmp = tempfile.mkdtemp(prefix="pigeon-bench-creds-")
    run = SimpleNamespace(
        server=ServerUnderTest(opts.server_pid, opts.target),
        creds=opts.creds or os.path.join(tmp, "creds.jsonl"),
        loads=[],
    )
    try:
        yield run
    finally:
        for lp in run.loads:
            lp.close()
        if opts.target is None:
            run.server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def throughput(opts) -> dict:
    """Closed-loop load: every client keeps up to ``window`` messages unacked."""
    with _bench_run(opts) as run:
        server, creds, loads = run.server, run.creds, run.loads
        if opts.target is None:
            server.start(
                opts.workers,
                {"sync": opts.sync, "delivered_receipts": not opts.no_receipts},
                opts.clients,
                creds,
            )
        login_cpu0 = server.cpu()
        for first, last in _split(opts.clients, opts.load_procs):
            loads.append(LoadProc([
                "--target", server.target, "--creds", creds, "--first", str(first),
                "--last", str(last), "--messages", str(opts.messages), "--window",
                str(opts.window), "--size", str(opts.size), "--seed", str(opts.seed + first),
            ]))  # fmt: skip
        for lp in loads:
            if lp.line(120) != "ready":
                raise BenchError("a load process failed to log in its clients")
        server.sample_peak()
        cpu0 = server.cpu()
        login_cpu = sum(cpu0) - sum(login_cpu0)
        t0 = time.monotonic()
        for lp in loads:
            lp.say("go")
        acked_total = 0
        for lp in loads:
            acked_total += orjson.loads(lp.line(opts.timeout))["sent_done"]
        # drain: wait until every acked message has arrived (and its delivered
        # receipt, unless --no-receipts), or nothing moves for a while
        want_receipts = opts.target is None and not opts.no_receipts
        _drain(loads, acked_total, want_receipts, opts.drain_timeout)
        elapsed = time.monotonic() - t0
        cpu1 = server.cpu()
        peak = server.peak_rss
        results = _results(loads, "stop")
    tally = _tally(results)
    lat = tally.pop("_lat")
    user, system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    delivered_n = tally["delivered"]
    n = delivered_n or 1
    cpu_s = user + system
    return {
        "bench": "throughput",
        "clients": opts.clients,
        "messages_per_client": opts.messages,
        "size": opts.size,
        "window": opts.window,
        "workers": opts.workers,
        "load_processes": len(loads),
        "sync": opts.sync if opts.target is None else "external",
        "receipts": not opts.no_receipts,
        "note": "one message: the send, its durable store in the recipient device's queue "
        "(one group commit per worker tick), the server ack, the push to the recipient "
        "device, that device's ack, the deletion"
        + (
            ""
            if opts.no_receipts
            else ", the delivered receipt queued for the sender, "
            "pushed, and acked by the sender's device"
        ),
        "profile": "bench" if opts.target is None else "external",
        "limits_lifted": sorted(BENCH_PROFILE) if opts.target is None else [],
        **tally,
        "receipts_received": sum(r["receipts"] for r in results),
        "receipts_missing": sum(r["receipts_missing"] for r in results)
        if not opts.no_receipts
        else None,
        "receipts_duplicated": sum(r["receipts_duplicated"] for r in results),
        "elapsed_s": round(elapsed, 3),
        "server_user_s": round(user, 3),
        "server_sys_s": round(system, 3),
        "server_cpu_us_per_msg": round(cpu_s / n * 1e6, 2),
        "server_user_us_per_msg": round(user / n * 1e6, 2),
        "msgs_per_s": round(delivered_n / elapsed, 1),
        "per_core_msgs_per_s": round(delivered_n / cpu_s, 1) if cpu_s else None,
        "p50_ms": _percentile(lat, 0.50),
        "p99_ms": _percentile(lat, 0.99),
        "p999_ms": _percentile(lat, 0.999),
        "server_peak_rss_kib": peak // 1024,
        "login_cpu_ms": round(login_cpu / opts.clients * 1e3, 3),
        "latency_cdf": _cdf(lat),
        "machine": machine(),
    }


def latency(opts) -> dict:
    """Open-loop load at a fixed rate: the send-to-delivery latency distribution.

    With ``--find-max-rate P99_MS``: runs of ``--seconds`` each, the rate
    doubling from ``--rate`` while p99 stays within the bound (and nothing is
    lost and the rate is kept up), then a bisection between the last good and
    the first bad rate; at most ``MAX_SEARCH_RUNS`` runs, one server.
    """
    runs: list[dict] = []
    with _bench_run(opts) as run:
        server, creds, loads = run.server, run.creds, run.loads
        if opts.target is None:
            server.start(opts.workers, {"sync": opts.sync}, opts.clients, creds)
        for first, last in _split(opts.clients, opts.load_procs):
            loads.append(LoadProc([
                "--mode", "latency", "--target", server.target, "--creds", creds,
                "--first", str(first), "--last", str(last), "--size", str(opts.size),
                "--seed", str(opts.seed + first),
            ]))  # fmt: skip
        for lp in loads:
            if lp.line(300) != "ready":
                raise BenchError("a load process failed to log in its clients")

        def one_run(rate: float) -> dict:
            cpu0 = server.cpu()
            for lp in loads:
                lp.say(f"run {rate / len(loads)} {opts.seconds}")
            acked_total = sum(
                orjson.loads(lp.line(opts.seconds + 120))["sent_done"] for lp in loads
            )
            _drain(loads, acked_total, opts.target is None, opts.drain_timeout)
            cpu1 = server.cpu()
            results = _results(loads, "collect")
            tally = _tally(results)
            lat = tally.pop("_lat")
            user, system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
            n = tally["delivered"] or 1
            send_s = max(r["send_seconds"] for r in results)
            return {
                "rate": rate,
                **tally,
                "achieved_msgs_per_s": round(tally["delivered"] / max(send_s, opts.seconds), 1),
                "server_cpu_us_per_msg": round((user + system) / n * 1e6, 2),
                "server_user_us_per_msg": round(user / n * 1e6, 2),
                "p50_ms": _percentile(lat, 0.50),
                "p99_ms": _percentile(lat, 0.99),
                "p999_ms": _percentile(lat, 0.999),
                "max_ms": lat[-1] / 1000 if lat else None,
                "latency_cdf": _cdf(lat),
            }

        def good(r: dict) -> bool:
            return (
                r["lost"] == 0
                and r["p99_ms"] is not None
                and r["p99_ms"] <= opts.find_max_rate
                and r["achieved_msgs_per_s"] >= 0.95 * r["rate"]
            )

        server.sample_peak()
        if opts.find_max_rate is None:
            runs.append(one_run(opts.rate))
        else:
            best, bad, rate = None, None, opts.rate
            while len(runs) < MAX_SEARCH_RUNS:
                r = one_run(rate)
                runs.append(r)
                if good(r):
                    best = r
                else:
                    bad = r
                if bad is None:
                    rate *= 2
                else:
                    low = best["rate"] if best else 0
                    if bad["rate"] - low <= max(50, 0.1 * bad["rate"]):
                        break
                    rate = (low + bad["rate"]) / 2
                    if best and rate == best["rate"]:
                        break
        peak = server.peak_rss
    head = {
        "bench": "latency",
        "clients": opts.clients,
        "size": opts.size,
        "seconds": opts.seconds,
        "workers": opts.workers,
        "load_processes": len(loads),
        "sync": opts.sync if opts.target is None else "external",
        "receipts": True,
        "profile": "bench" if opts.target is None else "external",
        "limits_lifted": sorted(BENCH_PROFILE) if opts.target is None else [],
        "server_peak_rss_kib": peak // 1024,
        "machine": machine(),
    }
    if opts.find_max_rate is None:
        return {**head, **runs[0]}
    ok = [r for r in runs if good(r)]
    best = max(ok, key=lambda r: r["rate"]) if ok else None
    return {
        **head,
        "find_max_rate_p99_ms": opts.find_max_rate,
        "max_rate": best["rate"] if best else None,
        **({k: v for k, v in best.items()} if best else {}),
        "runs": [{k: v for k, v in r.items() if k != "latency_cdf"} for r in runs],
    }


MAX_SEARCH_RUNS = 10


def idle(opts) -> dict:
    """Memory per authenticated idle connection: server memory with N clients minus with none."""
    with _bench_run(opts) as run:
        server, creds, loads = run.server, run.creds, run.loads
        if opts.target is None:
            server.start(opts.workers, {}, opts.clients, creds)
        time.sleep(1.0)  # let the workers settle after start-up before the baseline
        before, method = server.memory()
        for first, last in _split(opts.clients, opts.load_procs):
            loads.append(LoadProc(["--mode", "idle", "--target", server.target, "--creds", creds,
                                   "--first", str(first), "--last", str(last)]))  # fmt: skip
        for lp in loads:
            if lp.line(300) != "ready":
                raise BenchError("a load process failed to log in its clients")
        time.sleep(1.0)
        after, method = server.memory()
        for lp in loads:
            lp.say("stop")
    return {
        "bench": "idle",
        "clients": opts.clients,
        "workers": opts.workers,
        "profile": "bench" if opts.target is None else "external",
        "limits_lifted": sorted(BENCH_PROFILE) if opts.target is None else [],
        "memory_method": method,
        "server_memory_before_kib": before // 1024,
        "server_memory_after_kib": after // 1024,
        "kib_per_conn": round((after - before) / 1024 / opts.clients, 2),
        "machine": machine(),
    }


def presence(opts) -> dict:
    """One user changes presence; N subscribers (spread over the workers) get each change.

    Server CPU per change covers the change itself (the store write, the note
    to the other workers) and its fan-out to every subscriber: the view
    evaluation and one write per subscriber connection.  Push latency is
    from the moment the publisher sent the change to the moment a
    subscriber's SDK handed the push over, for every (change, subscriber).
    """
    n = opts.subscribers
    with _bench_run(opts) as run:
        server, creds, loads = run.server, run.creds, run.loads
        if opts.target is None:
            server.start(opts.workers, {"sync": opts.sync}, n + 1, creds)
        from pigeon.server.provision import load_credentials

        watch = load_credentials(creds)[0]["device"].partition(":")[0]
        base = ["--target", server.target, "--creds", creds]
        pub = LoadProc(["--mode", "presence-pub", *base, "--first", "0", "--last", "1",
                        "--changes", str(opts.changes), "--interval", str(opts.interval)])  # fmt: skip
        loads.append(pub)
        subs = []
        for first, last in _split(n, opts.load_procs):
            subs.append(LoadProc(["--mode", "presence-sub", *base, "--first", str(first + 1),
                                  "--last", str(last + 1), "--watch", watch]))  # fmt: skip
        loads.extend(subs)
        for lp in loads:
            if lp.line(300) != "ready":
                raise BenchError("a load process failed to log in and subscribe its clients")
        server.sample_peak()
        cpu0 = server.cpu()
        t0 = time.monotonic()
        pub.say("go")
        sent = orjson.loads(pub.line(opts.changes * opts.interval + 120))["sent_ns"]
        for lp in subs:
            lp.say(f"collect {len(sent)}")
        times = [t for lp in subs for t in orjson.loads(lp.line(120))["times_ns"]]
        cpu1 = server.cpu()
        elapsed = time.monotonic() - t0
        peak = server.peak_rss
        pub.say("stop")
    lat = sorted(
        (t - sent[k]) // 1000 for per_client in times for k, t in enumerate(per_client[: len(sent)])
    )
    received = len(lat)
    user, system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    changes = len(sent) or 1
    return {
        "bench": "presence",
        "subscribers": n,
        "changes": len(sent),
        "interval_s": opts.interval,
        "workers": opts.workers,
        "load_processes": len(loads),
        "sync": opts.sync if opts.target is None else "external",
        "profile": "bench" if opts.target is None else "external",
        "limits_lifted": sorted(BENCH_PROFILE) if opts.target is None else [],
        "note": "one change: a device's presence node, the store write, the note to the other "
        "workers, and a push to every subscriber (default privacy: everyone)",
        "pushes_expected": len(sent) * n,
        "pushes_received": received,
        "missing_pushes": len(sent) * n - received,
        "elapsed_s": round(elapsed, 3),
        "server_user_s": round(user, 3),
        "server_sys_s": round(system, 3),
        "server_cpu_us_per_change": round((user + system) / changes * 1e6, 1),
        "server_cpu_us_per_push": round((user + system) / (received or 1) * 1e6, 2),
        "push_p50_ms": _percentile(lat, 0.50),
        "push_p99_ms": _percentile(lat, 0.99),
        "push_max_ms": lat[-1] / 1000 if lat else None,
        "server_peak_rss_kib": peak // 1024,
        "machine": machine(),
    }


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="load benchmarks against a real server",
                       description=__doc__.split("\n\n")[0])  # fmt: skip
    bsub = p.add_subparsers(dest="bench_command", metavar="BENCH", required=True)

    def common(sp, clients=True):
        if clients:
            sp.add_argument("--clients", type=int, default=100, metavar="N")
        sp.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="server workers (default: one per core)")  # fmt: skip
        sp.add_argument("--load-procs", type=int, default=1,
                        help="load-generator processes (default 1)")  # fmt: skip
        sp.add_argument("--target", metavar="HOST:PORT", help="measure a running server")
        sp.add_argument("--server-pid", type=int, metavar="PID", help="its supervisor's PID")
        sp.add_argument("--creds", metavar="FILE", help="credentials from pigeon admin provision")
        sp.add_argument("--json", action="store_true", help="print exactly one JSON object")

    t = bsub.add_parser("throughput", help="closed-loop 1:1 messages, CPU per message")
    common(t)
    t.add_argument("--messages", type=int, default=100, metavar="M", help="per client")
    t.add_argument("--size", type=int, default=100, metavar="BYTES")
    t.add_argument("--window", type=int, default=16, metavar="W", help="unacked per client")
    t.add_argument(
        "--sync",
        choices=["os", "fsync"],
        default="os",
        help="the server's durability (default os; the server's own default is fsync)",
    )
    t.add_argument(
        "--no-receipts",
        action="store_true",
        help="the server sends no delivered receipts (a message ends at the ack)",
    )
    t.add_argument("--seed", type=int, default=1)
    t.add_argument("--timeout", type=float, default=600, help="bound on the send phase, s")
    t.add_argument("--drain-timeout", type=float, default=10,
                   help="stop waiting for deliveries after this long without progress, s")  # fmt: skip
    t.set_defaults(func=run, bench=throughput)
    t.add_argument("--plot", metavar="FILE.png", help="draw the latency CDF (needs matplotlib)")
    lt = bsub.add_parser(
        "latency",
        help="open-loop fixed-rate load, send-to-delivery latency",
        description="Messages at a fixed rate, not waiting for acks (open loop), each stamped "
        "with the time it was due; reports the send-to-delivery latency distribution.",
    )
    common(lt)
    lt.add_argument(
        "--rate",
        type=float,
        default=1000,
        metavar="R",
        help="messages per second (default 1000; the start of --find-max-rate)",
    )
    lt.add_argument(
        "--seconds", type=float, default=10, metavar="S", help="length of the (each) run, s"
    )
    lt.add_argument("--size", type=int, default=100, metavar="BYTES")
    lt.add_argument("--sync", choices=["os", "fsync"], default="os")
    lt.add_argument(
        "--find-max-rate",
        type=float,
        metavar="P99_MS",
        help="search the highest rate whose p99 stays within P99_MS",
    )
    lt.add_argument("--seed", type=int, default=1)
    lt.add_argument(
        "--drain-timeout",
        type=float,
        default=10,
        help="stop waiting for deliveries after this long without progress, s",
    )
    lt.add_argument("--plot", metavar="FILE.png", help="draw the latency CDF (needs matplotlib)")
    lt.set_defaults(func=run, bench=latency)
    pr = bsub.add_parser(
        "presence",
        help="one user's presence changes fanned out to N subscribers",
        description="One device toggles its presence; N clients subscribed to it receive "
        "every change. Reports server CPU per change and per push, and the push latency.",
    )
    common(pr, clients=False)
    pr.add_argument("--subscribers", type=int, default=1000, metavar="N")
    pr.add_argument("--changes", type=int, default=200, metavar="K", help="presence changes")
    pr.add_argument("--interval", type=float, default=0.05, metavar="S",
                    help="seconds between changes (default 0.05)")  # fmt: skip
    pr.add_argument("--sync", choices=["os", "fsync"], default="os")
    pr.set_defaults(func=run, bench=presence)
    i = bsub.add_parser("idle", help="memory per authenticated idle connection")
    common(i)
    i.set_defaults(func=run, bench=idle)
    rp = bsub.add_parser(
        "report",
        help="plot saved results: latency CDFs and throughput against clients",
        description="Read results saved with --json (throughput and latency runs) and draw "
        "the latency CDF of each and, for throughput runs, messages per second and server "
        "CPU per message against the client count. Needs matplotlib (pip install "
        "'pigeon[bench]').",
    )
    rp.add_argument("results", nargs="+", metavar="RESULT.json")
    rp.add_argument("--out", required=True, metavar="FILE.png")
    rp.set_defaults(func=report_command)


def _human(result: dict) -> str:
    skip = ("machine", "latency_cdf", "runs")
    return "\n".join(f"{k:>26}: {v}" for k, v in result.items() if k not in skip) + (
        f"\n{'machine':>26}: {result['machine']}"
    )


def plot(results: list[tuple[str, dict]], out: str) -> None:
    """Latency CDFs of every result; throughput and CPU per message against clients."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tps = sorted((r for _, r in results if r.get("bench") == "throughput"),
                 key=lambda r: r["clients"])  # fmt: skip
    ncols = 2 if tps else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4.5), squeeze=False)
    ax = axes[0][0]
    for name, r in results:
        cdf = r.get("latency_cdf") or []
        if cdf:
            what = f"{r['rate']:.0f} msg/s" if r.get("rate") else f"{r.get('clients')} clients"
            label = f"{r['bench']} {what}" if name == r["bench"] else f"{name} ({what})"
            ax.plot([p[0] for p in cdf], [p[1] for p in cdf], label=label)
    ax.set_xscale("log")
    ax.set_xlabel("send-to-delivery latency, ms (log)")
    ax.set_ylabel("fraction of messages")
    ax.set_title("latency CDF")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    if tps:
        ax = axes[0][1]
        clients = [r["clients"] for r in tps]
        ax.plot(clients, [r["msgs_per_s"] for r in tps], "o-", label="msg/s (wall)")
        ax.set_xlabel("clients")
        ax.set_ylabel("messages per second")
        ax2 = ax.twinx()
        ax2.plot(clients, [r["server_cpu_us_per_msg"] for r in tps], "s--", color="tab:red",
                 label="server CPU us/msg")  # fmt: skip
        ax2.set_ylabel("server CPU per message, us")
        ax.set_title("throughput against clients")
        ax.grid(True, alpha=0.3)
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize="small")
    fig.suptitle(f"pigeon bench, {results[0][1].get('machine', {}).get('cpu', '')}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def report_command(opts) -> int:
    results = []
    for path in opts.results:
        try:
            with open(path, "rb") as f:
                r = orjson.loads(f.read())
        except (OSError, orjson.JSONDecodeError) as exc:
            print(f"pigeon bench report: cannot read {path}: {exc}", file=sys.stderr)
            return 1
        if r.get("bench") not in ("throughput", "latency"):
            print(f"pigeon bench report: {path} is not a throughput or latency result "
                  "(save one with --json)", file=sys.stderr)  # fmt: skip
            return 1
        results.append((os.path.basename(path), r))
    try:
        plot(results, opts.out)
    except ImportError:
        print("pigeon bench report: matplotlib is missing: pip install 'pigeon[bench]'",
              file=sys.stderr)  # fmt: skip
        return 1
    print(f"wrote {opts.out}")
    return 0


def run(opts) -> int:
    if (opts.target is None) != (opts.server_pid is None):
        print("pigeon bench: --target and --server-pid go together", file=sys.stderr)
        return 2
    if opts.target is not None and opts.creds is None:
        print("pigeon bench: --target needs --creds (from pigeon admin provision)",
              file=sys.stderr)  # fmt: skip
        return 2
    if getattr(opts, "clients", 2) < 2:
        print("pigeon bench: --clients must be at least 2", file=sys.stderr)
        return 2
    if getattr(opts, "subscribers", 1) < 1:
        print("pigeon bench: --subscribers must be at least 1", file=sys.stderr)
        return 2
    try:
        result = opts.bench(opts)
    except BenchError as exc:
        print(f"pigeon bench: {exc}", file=sys.stderr)
        return 1
    except ImportError as exc:
        print(f"pigeon bench: {exc.name} is missing: pip install 'pigeon[bench]'", file=sys.stderr)
        return 1
    if getattr(opts, "plot", None):
        try:
            plot([(result["bench"], result)], opts.plot)
        except ImportError:
            print("pigeon bench: --plot needs matplotlib: pip install 'pigeon[bench]'",
                  file=sys.stderr)  # fmt: skip
            return 1
    print(orjson.dumps(result).decode() if opts.json else _human(result))
    bad = (
        result.get("lost")
        or result.get("duplicated")
        or result.get("receipts_missing")
        or result.get("missing_pushes")
    )
    return 1 if bad else 0
