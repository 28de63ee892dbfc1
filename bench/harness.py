"""``pigeon bench``: load runs against a real server, measured from the OS.

    pigeon bench throughput --clients 1000 --messages 100 --json
    pigeon bench idle --clients 2000 --json
    pigeon bench link --links 200 --json
    pigeon bench group --members 1024 --offline-fraction 0.9 --json

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

Latency: ``pigeon bench latency`` sends open loop at a fixed rate from
``--load-procs`` load processes (bench/openloop.py: a lean driver of the
SDK's sans-IO core, paced by a kernel timer, bench/pacer.py).  The rate and
the messages are split evenly between them, their schedules interleaved
into one evenly spaced stream, and every delivery's latency sample is
merged before the percentiles.  Each run also reports the load processes'
own CPU (``load_cpu_us_per_msg``, and ``load_cpu_busiest_pct``: the busiest
one's share of a core; near 100% the load tool, not the server, is the
limit).  ``--floor`` then runs the same load against bench/floor.py, a
trivial in-memory router, and reports it as ``load_floor``: the latency
the load tool itself adds (``pigeon bench floor`` runs that alone).

Honesty: lost = acknowledged by the server but never handed to a recipient
application; duplicated = handed to an application twice.  A run that lost
or duplicated anything says so in its JSON and exits with status 1.

Progress: ``--messages`` is per client (the startup line on stderr says
clients x messages = total).  Each load process prints its counts (sent,
acked, delivered, receipts, errors) every 0.5 s; on a terminal they feed a
progress bar on stderr (tqdm), never stdout.  They also decide when a run
has stalled: no new ack, delivery, receipt or error in any load process for
``--stall-timeout`` s while sending (``--drain-timeout`` s after) ends the
run.  The load processes are told to stop, report the messages they still
wait for, and the harness names them per load process (sent but not acked,
acked but not delivered, delivered without a receipt; a few as client
number and message number) on stderr and in the JSON's "stalled", prints
the figures gathered so far ("partial": true when the sends were cut
short) and exits with status 1.  There is no bound on a run's length:
a long run that keeps moving is let finish.

Output: ``--json`` prints the result as one JSON object; without it, a
headline in words (messages sent, delivered and lost, server CPU per
message, msg/s, the latency percentiles; per bench what it is for), then
every figure aligned, one a line.  ``pigeon bench report`` draws saved
results, one series per configuration (``CONFIG_KEYS``), and skips with a
note what it cannot draw, so a whole results folder can be given.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import select
import selectors
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from types import SimpleNamespace

import orjson

#: Settings of the bench profile: what a benchmark must not trip over.
BENCH_PROFILE = {
    "register_per_phone": 1_000_000,
    "register_per_phone_total": 1_000_000,
    "register_per_ip": 1_000_000,
    "login_failures": 1_000_000,
    "max_connections_per_ip": 1_000_000,
    "idle_timeout": 3600,
    "login_timeout": 120,
    "log_level": "warning",
    "metrics_listen": "off",
    # no media service (its fixed port would collide with any other server here);
    # ``pigeon bench media`` gives it a free port of its own
    "media_listen": "off",
    # anti-spam: a load generator is exactly what these limits stop
    "message_rate": 0,
    "messages_per_day": 0,
    "typing_rate": 0,
    "new_chats": 0,
    # (the load's users are strangers to each other: without these a queue stopped
    # taking them at 1,000 entries, and `bench group --messages 1000` failed)
    "stranger_queue_count": 0,
    "stranger_queue_bytes": 0,
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

    def start(self, workers: int, extra: dict, creds_count: int, creds_path: str,
              devices: int = 1) -> None:  # fmt: skip
        from pigeon.server.provision import provision
        from pigeon.server.store import Store

        self._tmp = tempfile.mkdtemp(prefix="pigeon-bench-")
        self.data_dir = os.path.join(self._tmp, "data")
        os.makedirs(self.data_dir)
        store = Store(os.path.join(self.data_dir, "store"), map_size=4 << 30)
        try:
            provision(store, creds_count, creds_path, devices=devices)
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
        if self._ready_line("pigeon: serving on", 60) is None:
            self.log.flush()
            with open(self.log_path(), "rb") as f:  # (stop() deletes it with the data)
                tail = f.read()[-3000:].decode(errors="replace")
            self.stop()
            raise BenchError("the server did not start; the end of its log:\n" + tail)

    def start_floor(self, creds_path: str, receipts: bool = True) -> None:
        """Start the load floor (bench/floor.py) on a free loopback port instead."""
        self.proc = subprocess.Popen([sys.executable, "-m", "pigeon.bench.floor", "--creds",
                                      creds_path, "--listen", "127.0.0.1:0"]
                                     + ([] if receipts else ["--no-receipts"]),
                                     stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)  # fmt: skip
        self.pid = self.proc.pid
        line = self._ready_line("floor: serving on", 30)
        if line is None:
            self.stop()
            raise BenchError("the floor server did not start (its error is above)")
        self.target = line.split()[-1]

    def _ready_line(self, prefix: str, timeout: float) -> str | None:
        """The first stdout line starting with ``prefix``; None at EOF or after ``timeout`` s."""
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if sel.select(0.2):
                    line = self.proc.stdout.readline().decode()
                    if line.startswith(prefix):
                        return line.strip()
                    if not line:
                        return None
            return None
        finally:
            sel.close()

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

    def cpu_ns(self) -> int | None:
        """Nanoseconds on CPU (user + system) of every thread of the server's processes,
        from Linux's /proc/PID/task/TID/schedstat: exact where ``cpu`` counts in the
        kernel's 10 ms clock ticks, which for a figure as small as the CPU of one
        login (1,000 of them in ~0.3 s over three processes) is an error of up to
        a tenth.  None where schedstat is not there (then use ``cpu``).  Threads
        that ended before the second reading are not counted (the workers keep
        theirs)."""
        total = 0
        try:
            procs = self.processes()
        except self.psutil.NoSuchProcess:
            return None
        for p in procs:
            try:
                tids = os.listdir(f"/proc/{p.pid}/task")
            except OSError:
                return None
            for tid in tids:
                try:
                    with open(f"/proc/{p.pid}/task/{tid}/schedstat") as f:
                        total += int(f.read().split()[0])
                except (OSError, ValueError, IndexError):
                    continue  # (a thread that just ended)
        return total

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


#: The counts in a load process's progress lines (see bench/load.py).
PROGRESS_KEYS = ("sent", "acked", "delivered", "receipts", "errors", "copies")


class LoadProc:
    """One bench/load.py process, spoken to by lines on its stdin and stdout.

    Its stdout is read into our own buffer (``os.read`` after ``select``):
    a buffered reader could hold a whole line that ``select`` then never
    reports.  Progress and ``sent_done`` lines are taken in as they come
    (``progress``, ``sent_done``); ``line`` returns the other ones.
    """

    def __init__(self, args: list[str], clients: tuple[int, int] = (0, 0),
                 module: str = "pigeon.bench.load"):  # fmt: skip
        self.proc = subprocess.Popen([sys.executable, "-m", module, *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     bufsize=0)  # fmt: skip
        self.fd = self.proc.stdout.fileno()
        os.set_blocking(self.fd, True)
        self.clients = clients  # [first, last) of the provisioned devices it drives
        self.buf = bytearray()
        self.scan = 0  # where the search for the next newline goes on
        self.eof = False
        self.progress = dict.fromkeys(PROGRESS_KEYS, 0)
        self.progress_at = time.monotonic()
        self.sent_done: int | None = None
        self._ps = None

    def cpu(self) -> float:
        """User + system seconds this load process has used so far (psutil)."""
        import psutil

        try:
            if self._ps is None:
                self._ps = psutil.Process(self.proc.pid)
            t = self._ps.cpu_times()
        except psutil.NoSuchProcess:
            return 0.0
        return t.user + t.system

    def feed(self) -> None:
        """Read what its stdout has (call when select says it is readable)."""
        data = os.read(self.fd, 1 << 20)
        if not data:
            self.eof = True
        self.buf += data

    def next_line(self) -> str | None:
        """The next whole line that is not progress or ``sent_done``, if one is buffered."""
        while True:
            k = self.buf.find(b"\n", self.scan)
            if k < 0:
                self.scan = len(self.buf)
                return None
            line = self.buf[:k].decode().strip()
            del self.buf[: k + 1]
            self.scan = 0
            if line.startswith('{"progress"'):
                self.progress = orjson.loads(line)["progress"]
                self.progress_at = time.monotonic()
            elif line.startswith('{"sent_done"'):
                self.sent_done = orjson.loads(line)["sent_done"]
            else:
                return line

    def exited(self) -> BenchError:
        return BenchError(f"a load process exited (status {self.proc.wait()})")

    def line(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while (line := self.next_line()) is None:
            if self.eof:
                raise self.exited()
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise BenchError(f"a load process said nothing for {timeout} s")
            self.feed()
        return line

    def say(self, word: str) -> None:
        self.proc.stdin.write(word.encode() + b"\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def _total(loads, key: str) -> int:
    return sum(lp.progress.get(key, 0) for lp in loads)


def _watch(loads, done, stall_timeout: float, bar=None) -> bool:
    """Take in the load processes' progress lines until ``done()`` (True) or until
    nothing moved for ``stall_timeout`` s (False): no new ack, delivery, receipt or
    error in any of them.  Silence is no progress, so a hung load process stalls too."""
    sel = selectors.DefaultSelector()
    for lp in loads:
        sel.register(lp.fd, selectors.EVENT_READ, lp)
    last, since = None, time.monotonic()
    try:
        while True:
            for key, _ in sel.select(0.25):
                lp = key.data
                lp.feed()
                if (line := lp.next_line()) is not None:
                    raise BenchError(f"a load process said {line[:200]!r} in the middle of a run")
                if lp.eof:
                    raise lp.exited()
            now = time.monotonic()
            moved = tuple(_total(loads, k) for k in ("acked", "delivered", "receipts", "errors",
                                                     "copies"))  # fmt: skip
            if moved != last:
                last, since = moved, now
            if bar is not None:
                bar.show(loads)
            if done():
                return True
            if now - since >= stall_timeout:
                return False
    finally:
        sel.close()


class _Bar:
    """A progress bar on stderr when it is a terminal (tqdm), else nothing: the counts
    of the load processes' progress lines, deliveries against the messages planned."""

    def __init__(self, total: int, desc: str):
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="msg", unit_scale=True,
                            file=sys.stderr, dynamic_ncols=True, leave=False)  # fmt: skip

    def show(self, loads) -> None:
        if self.bar is not None:
            self.bar.n = _total(loads, "delivered")
            self.bar.set_postfix_str(
                ", ".join(f"{k} {_total(loads, k):,}" for k in ("acked", "receipts", "errors")),
                refresh=False,
            )
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def note(text: str) -> None:
    """A line for the person running the bench (stderr: --json keeps stdout to itself)."""
    print(f"pigeon bench: {text}", file=sys.stderr, flush=True)


def _send_and_drain(loads, opts, want_receipts: bool, bar, copies_per_msg: int = 0) -> dict | None:
    """Watch one run of the load processes (after their go or run word): the send
    phase, stalled after ``--stall-timeout`` s without progress, then the drain until
    every acked message arrived (and its receipt), stalled after ``--drain-timeout``
    s without progress.  None, or what stalled: {"phase", "seconds", "partial"}."""
    try:
        if not _watch(loads, lambda: all(lp.sent_done is not None for lp in loads),
                      opts.stall_timeout, bar):  # fmt: skip
            return {"phase": "sending", "seconds": opts.stall_timeout, "partial": True}
        acked_total = sum(lp.sent_done for lp in loads)

        def drained() -> bool:
            return (
                _total(loads, "delivered") >= acked_total
                and (not want_receipts or _total(loads, "receipts") >= acked_total)
                and _total(loads, "copies") >= acked_total * copies_per_msg
            )

        if not _watch(loads, drained, opts.drain_timeout, bar):
            return {"phase": "waiting for deliveries", "seconds": opts.drain_timeout,
                    "partial": False}  # fmt: skip
        return None
    finally:
        bar.close()


def _missing(loads, results: list[dict], want_receipts: bool, examples: int = 5) -> list[dict]:
    """Per load process: the messages its clients sent that are not acked, acked and
    not delivered (to anyone), delivered without their receipt; a few of each as
    [client, n] (the n-th message, from 0, of provisioned client number ``client``)."""
    delivered = set()
    for r in results:
        delivered.update(r["delivered"])

    def ids(keys: list[int]) -> list[list[int]]:
        return [[k >> 32, k & 0xFFFFFFFF] for k in keys[:examples]]

    out = []
    for k, (lp, r) in enumerate(zip(loads, results, strict=True)):
        not_delivered = [m for m in r["acked"] if m not in delivered]
        no_receipt = [m for m in r["no_receipt"] if m in delivered] if want_receipts else []
        out.append({
            "load_process": k,
            "clients": list(lp.clients),
            "sent_not_acked": len(r["unacked"]),
            "acked_not_delivered": len(not_delivered),
            "delivered_no_receipt": len(no_receipt),
            "last_progress_s_ago": round(time.monotonic() - lp.progress_at, 1),
            "examples": {
                "sent_not_acked": ids(r["unacked"]),
                "acked_not_delivered": ids(sorted(not_delivered)),
                "delivered_no_receipt": ids(no_receipt),
            },
        })  # fmt: skip
    return out


def stall_message(stalled: dict) -> str:
    """What a stalled run says on stderr: where it stopped and what is missing."""
    head = (
        f"no progress for {stalled['seconds']:g} s while {stalled['phase']} (no new ack, "
        "delivery, receipt or error): stopped"
        + (", the figures are partial" if stalled["partial"] else "")
    )
    lines = [head]
    for m in stalled["missing"]:
        first, last = m["clients"]
        parts = []
        for what, label in (("sent_not_acked", "sent but not acked"),
                            ("acked_not_delivered", "acked but not delivered"),
                            ("delivered_no_receipt", "delivered without a receipt")):  # fmt: skip
            if m[what]:
                eg = ", ".join(f"client {c} #{n}" for c, n in m["examples"][what])
                parts.append(f"{m[what]:,} {label} (e.g. {eg})")
        silent = (f"; its last progress line came {m['last_progress_s_ago']:g} s ago"
                  if m["last_progress_s_ago"] >= stalled["seconds"] else "")  # fmt: skip
        lines.append(f"  load process {m['load_process']} (clients {first} to {last - 1}): "
                     + ("; ".join(parts) or "nothing missing") + silent)  # fmt: skip
    return "\n".join(lines)


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


def _results(loads, word: str) -> list[dict]:
    out = []
    for lp in loads:
        lp.say(word)
        out.append(orjson.loads(lp.line(60)))
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
    """Closed-loop load: every client keeps up to ``window`` messages unacked.

    With ``--devices-per-user N`` every client is a user with N devices (a
    primary that sends and N-1 linked companions that receive and ack, all
    logged in, spread over the workers by the kernel like any connection):
    each message is 2N-1 device copies (N to the recipient's devices, N-1
    sync copies to the sender's other devices), counted as they arrive
    (``device_copies_delivered``; ``lost`` counts missing copies too) and
    ``server_cpu_us_per_copy`` is the server CPU per copy."""
    devices = getattr(opts, "devices_per_user", 1)
    if not 1 <= devices <= 5:
        raise BenchError("--devices-per-user must be 1 to 5 (a primary and up to 4 companions)")
    note(f"throughput: {opts.clients:,} clients x {opts.messages:,} messages = "
         f"{opts.clients * opts.messages:,} messages (window {opts.window}, "
         f"{opts.size} bytes)")  # fmt: skip
    with _bench_run(opts) as run:
        server, creds, loads = run.server, run.creds, run.loads
        if opts.target is None:
            server.start(
                opts.workers,
                {"sync": opts.sync, "delivered_receipts": not opts.no_receipts},
                opts.clients,
                creds,
                devices=devices,
            )
        login_cpu0, login_ns0 = server.cpu(), server.cpu_ns()
        for first, last in _split(opts.clients, opts.load_procs):
            loads.append(LoadProc([
                "--target", server.target, "--creds", creds, "--first", str(first),
                "--last", str(last), "--messages", str(opts.messages), "--window",
                str(opts.window), "--size", str(opts.size), "--seed", str(opts.seed + first),
            ], (first, last)))  # fmt: skip
        for lp in loads:
            if lp.line(120) != "ready":
                raise BenchError("a load process failed to log in its clients")
        server.sample_peak()
        cpu0, login_ns1 = server.cpu(), server.cpu_ns()
        # the connects, preambles, SCRAM exchanges and session records of every client
        # (the server idles meanwhile otherwise: a few ms a second)
        login_cpu = sum(cpu0) - sum(login_cpu0)
        if login_ns0 is not None and login_ns1 is not None:
            login_cpu = (login_ns1 - login_ns0) / 1e9
        note(f"{opts.clients:,} clients logged in; sending")
        t0 = time.monotonic()
        for lp in loads:
            lp.say("go")
        # drain: wait until every acked message has arrived (and its delivered
        # receipt, unless --no-receipts)
        want_receipts = opts.target is None and not opts.no_receipts
        bar = _Bar(opts.clients * opts.messages, "delivered")
        # each message: one copy per device of the recipient, one per other device of
        # the sender (sync copies)
        per_msg = 2 * devices - 1
        stalled = _send_and_drain(loads, opts, want_receipts, bar, per_msg)
        elapsed = time.monotonic() - t0
        cpu1 = server.cpu()
        peak = server.peak_rss
        results = _results(loads, "stop")
    if stalled is not None:
        stalled["missing"] = _missing(loads, results, want_receipts)
    tally = _tally(results)
    lat = tally.pop("_lat")
    user, system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    delivered_n = tally["delivered"]
    n = delivered_n or 1
    cpu_s = user + system
    copies = sum(r.get("copies", 0) for r in results)
    copies_missing = max(0, tally["acked"] * per_msg - copies)
    # lost: acked messages no recipient application got, or device copies missing
    tally["lost"] = max(tally["lost"], copies_missing)
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
        "devices_per_user": devices,
        "device_copies_delivered": copies,
        "device_copies_missing": copies_missing,
        "server_cpu_us_per_copy": round(cpu_s / (copies or 1) * 1e6, 2),
        "msgs_per_s": round(delivered_n / elapsed, 1),
        "per_core_msgs_per_s": round(delivered_n / cpu_s, 1) if cpu_s else None,
        "p50_ms": _percentile(lat, 0.50),
        "p99_ms": _percentile(lat, 0.99),
        "p999_ms": _percentile(lat, 0.999),
        "server_peak_rss_kib": peak // 1024,
        "login_cpu_ms": round(login_cpu / opts.clients * 1e3, 3),
        "latency_cdf": _cdf(lat),
        "partial": bool(stalled and stalled["partial"]),
        "stalled": stalled,
        "machine": machine(),
    }


#: How far ahead of "now" a latency run's first message is due: time for every
#: load process to read its run line before its schedule starts.
START_DELAY_NS = 100_000_000


def _latency_loads(opts, target: str, creds: str, loads: list) -> None:
    """Start the latency load processes against ``target``; return once all logged in."""
    for first, last in _split(opts.clients, opts.load_procs):
        loads.append(LoadProc([
            "--target", target, "--creds", creds, "--first", str(first), "--last", str(last),
            "--size", str(opts.size), "--seed", str(opts.seed + first),
        ], (first, last), module="pigeon.bench.openloop"))  # fmt: skip
    for lp in loads:
        if lp.line(300) != "ready":
            raise BenchError("a load process failed to log in its clients")


def _latency_run(opts, server, loads, rate: float, want_receipts: bool, desc: str = "") -> dict:
    """One open-loop run at ``rate`` msg/s, split evenly between the load processes.

    Every process gets its share of the messages and of the rate and the
    same start, shifted by its place in one interval of the merged schedule
    (process k of n sends the messages k, k+n, k+2n, ... of one evenly spaced
    stream).  The latencies are the processes' own samples, merged before the
    percentiles are taken.  CPU is read from the OS for the server (or the
    floor) and for every load process, over the run.
    """
    n = len(loads)
    total = int(rate * opts.seconds)
    shares = [last - first for first, last in _split(total, n)] if total >= n else [0] * n
    shares[0] += total - sum(shares)  # fewer messages than load processes: all in the first
    cpu0, load0 = server.cpu(), [lp.cpu() for lp in loads]
    start = time.monotonic_ns() + START_DELAY_NS
    step = 1e9 / rate
    for k, lp in enumerate(loads):
        lp.sent_done = None
        lp.say(f"run {rate / n} {opts.seconds} {start + int(k * step)} {shares[k]}")
    bar = _Bar(total, desc or f"{rate:.0f} msg/s")
    stalled = _send_and_drain(loads, opts, want_receipts, bar)
    wall = max((time.monotonic_ns() - start) / 1e9, 1e-3)
    cpu1, load1 = server.cpu(), [lp.cpu() for lp in loads]
    results = _results(loads, "collect")
    if stalled is not None:
        stalled["missing"] = _missing(loads, results, want_receipts)
    tally = _tally(results)
    lat = tally.pop("_lat")
    user, system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    delivered = tally["delivered"] or 1
    send_s = max(r["send_seconds"] for r in results)
    load_s = [b - a for a, b in zip(load0, load1, strict=True)]
    return {
        "rate": rate,
        **tally,
        "receipts_missing": sum(r["receipts_missing"] for r in results) if want_receipts else None,
        "achieved_msgs_per_s": round(tally["delivered"] / max(send_s, opts.seconds), 1),
        "server_cpu_us_per_msg": round((user + system) / delivered * 1e6, 2),
        "server_user_us_per_msg": round(user / delivered * 1e6, 2),
        "load_cpu_us_per_msg": round(sum(load_s) / delivered * 1e6, 1),
        "load_cpu_busiest_pct": round(max(load_s) / wall * 100, 1),
        "load_pacer": ", ".join(sorted({r.get("pacer") or "?" for r in results})),
        "p50_ms": _percentile(lat, 0.50),
        "p99_ms": _percentile(lat, 0.99),
        "p999_ms": _percentile(lat, 0.999),
        "max_ms": lat[-1] / 1000 if lat else None,
        "latencies": len(lat),
        "latency_cdf": _cdf(lat),
        "stalled": stalled,
    }


#: The figures of a floor run that go into a latency result's ``load_floor``.
FLOOR_KEYS = ("rate", "sent", "delivered", "lost", "achieved_msgs_per_s", "p50_ms", "p99_ms",
              "p999_ms", "max_ms", "latencies", "load_cpu_us_per_msg", "load_cpu_busiest_pct",
              "floor_cpu_us_per_msg", "load_processes", "load_pacer", "latency_cdf",
              "stalled")  # fmt: skip


def _floor_run(opts, creds: str, rate: float) -> dict:
    """The same load (clients, rate, load processes, size) against the load floor,
    bench/floor.py: what the load tool itself adds to a latency."""
    note(f"load floor: the same load against the trivial router (bench/floor.py), "
         f"{rate:g} msg/s for {opts.seconds:g} s")  # fmt: skip
    floor, loads = ServerUnderTest(), []
    try:
        floor.start_floor(creds)
        _latency_loads(opts, floor.target, creds, loads)
        r = _latency_run(opts, floor, loads, rate, want_receipts=True, desc="floor")
    finally:
        for lp in loads:
            lp.close()
        floor.stop()
    r["floor_cpu_us_per_msg"] = r.pop("server_cpu_us_per_msg")
    del r["server_user_us_per_msg"]
    r["load_processes"] = len(loads)
    return r


def latency(opts) -> dict:
    """Open-loop load at a fixed rate: the send-to-delivery latency distribution.

    With ``--find-max-rate P99_MS``: runs of ``--seconds`` each, the rate
    doubling from ``--rate`` while p99 stays within the bound (and nothing is
    lost and the rate is kept up), then a bisection between the last good and
    the first bad rate; at most ``MAX_SEARCH_RUNS`` runs, one server.

    With ``--floor``: afterwards (the server stopped, when the bench started
    it) the same load at the same rate (the rate found, with
    ``--find-max-rate``) against the load floor, reported as ``load_floor``.
    """
    runs: list[dict] = []
    note(f"latency: {opts.clients:,} clients, {opts.rate:g} messages/s for {opts.seconds:g} s"
         + (f" = {int(opts.rate * opts.seconds):,} messages" if opts.find_max_rate is None
            else f" and up, runs of {opts.seconds:g} s, until p99 passes {opts.find_max_rate:g} ms")
         + f", {opts.load_procs} load processes")  # fmt: skip
    with _bench_run(opts) as run:
        server, creds, loads = run.server, run.creds, run.loads
        if opts.target is None:
            server.start(opts.workers, {"sync": opts.sync}, opts.clients, creds)
        _latency_loads(opts, server.target, creds, loads)
        note(f"{opts.clients:,} clients logged in; sending")
        want_receipts = opts.target is None

        def one_run(rate: float) -> dict:
            return _latency_run(opts, server, loads, rate, want_receipts)

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
                if r["stalled"] and r["stalled"]["partial"]:
                    break  # its load processes stopped: no run can follow
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
        n_loads = len(loads)
        floor = None
        if opts.floor:
            for lp in loads:  # the server's load ends before the floor's starts
                lp.close()
            if opts.target is None:
                server.stop()
            ok = [r for r in runs if opts.find_max_rate is None or good(r)]
            floor_rate = max(r["rate"] for r in ok) if ok else opts.rate
            fr = _floor_run(opts, creds, floor_rate)
            floor = {k: fr[k] for k in FLOOR_KEYS}
    head = {
        "bench": "latency",
        "clients": opts.clients,
        "size": opts.size,
        "seconds": opts.seconds,
        "workers": opts.workers,
        "load_processes": n_loads,
        "sync": opts.sync if opts.target is None else "external",
        "receipts": True,
        "profile": "bench" if opts.target is None else "external",
        "limits_lifted": sorted(BENCH_PROFILE) if opts.target is None else [],
        "server_peak_rss_kib": peak // 1024,
        "machine": machine(),
    }
    tail = {} if floor is None else {"load_floor": floor}
    if opts.find_max_rate is None:
        stalled = runs[0]["stalled"] or (floor and floor["stalled"])
        return {**head, **runs[0], "partial": bool(stalled and stalled["partial"]),
                "stalled": stalled, **tail}  # fmt: skip
    ok = [r for r in runs if good(r)]
    best = max(ok, key=lambda r: r["rate"]) if ok else None
    stalled = next((r["stalled"] for r in runs if r["stalled"]), None) or (
        floor and floor["stalled"]
    )
    return {
        **head,
        "find_max_rate_p99_ms": opts.find_max_rate,
        "max_rate": best["rate"] if best else None,
        **({k: v for k, v in best.items()} if best else {}),
        "partial": bool(stalled and stalled["partial"]),
        "stalled": stalled,
        "runs": [{k: v for k, v in r.items() if k != "latency_cdf"} for r in runs],
        **tail,
    }


def floor_bench(opts) -> dict:
    """``pigeon bench floor``: the latency bench's load against the load floor alone."""
    from .floor import write_credentials

    note(f"floor: {opts.clients:,} clients, {opts.rate:g} messages/s for {opts.seconds:g} s "
         f"= {int(opts.rate * opts.seconds):,} messages, {opts.load_procs} load processes")  # fmt: skip
    tmp = tempfile.mkdtemp(prefix="pigeon-bench-floor-")
    try:
        creds = opts.creds
        if creds is None:
            creds = os.path.join(tmp, "creds.jsonl")
            write_credentials(opts.clients, creds)
        r = _floor_run(opts, creds, opts.rate)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stalled = r.pop("stalled")
    return {
        "bench": "floor",
        "clients": opts.clients,
        "size": opts.size,
        "seconds": opts.seconds,
        "note": "the latency bench's load against bench/floor.py, a trivial in-memory router "
        "(ack at once, deliver, delivered receipt on the device's ack; no store): the "
        "latency the load tool itself adds",
        **r,
        "partial": bool(stalled and stalled["partial"]),
        "stalled": stalled,
        "machine": machine(),
    }


MAX_SEARCH_RUNS = 10

#: Default load processes of the latency and floor benches.  Measured against the
#: load floor with 1,000 clients at 5,000 msg/s on a 2-core VM: one process keeps
#: the rate but runs at ~75% of a core (no headroom once a real server shares the
#: cores); two run below 50% each; three and four add total load CPU and
#: scheduling on 2 cores (p50 and p99 got worse, not better).
LATENCY_LOAD_PROCS = 2
LOAD_PROCS_WHY = (
    " and the rate split evenly; the default keeps each under half a core at 5,000 msg/s "
    "on 2 cores, where one process nears a full core and more add CPU and scheduling "
    "noise; a run reports load_cpu_busiest_pct: near 100%% the load tool is the limit"
)


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


def _store_snapshot(data_dir: str, devices: list[str]) -> tuple[int, int, list[int]]:
    """(pages in use, page size, queue entries of each device): the running server's
    store, read in a read transaction of its own (LMDB readers share the file)."""
    from pigeon.server.queues import Queues
    from pigeon.server.store import Store

    store = Store(os.path.join(data_dir, "store"), map_size=4 << 30, create=False)
    try:
        with store.read() as txn:
            pages, psize = store.pages_used(txn)
            counts = [Queues.queued_txn(SimpleNamespace(db=store._db), txn, d) for d in devices]
    finally:
        store.close()
    return pages, psize, counts


def group_bench(opts) -> dict:
    """One member sends ``--messages`` plaintext messages to a group of ``--members``.

    The accounts are provisioned in the store; the sender (member 0) creates the
    group with every other member before the measurement.  The online members
    (all but ``--offline-fraction`` of them, the sender among them) are logged
    in by ``--load-procs`` receiving load processes and spread over the workers
    by the kernel; the offline ones are provisioned and never connect.  Server
    CPU is from the OS over the sends and deliveries; the store figure is the
    LMDB pages in use after the run minus before it (times the page size), per
    message; latency is from the send to the arrival at the last online member
    to get that message.  Lost: an online member missing an acked message, or an
    offline member's queue not holding one more entry per acked message."""
    n, m = opts.members, opts.messages
    if n < 2 or n > 100_000:
        raise BenchError("--members must be 2 to 100000")
    if m < 1:
        raise BenchError("--messages must be at least 1")
    if not 0 <= opts.offline_fraction < 1:
        raise BenchError("--offline-fraction must be at least 0 and below 1")
    if opts.target is not None:
        raise BenchError("the group bench starts its own server (it reads its store)")
    online = max(2, n - int(n * opts.offline_fraction))  # the sender and at least one more
    note(f"group: {n:,} members ({online - 1:,} online besides the sender, {n - online:,} "
         f"offline), {m:,} messages from one member, window {opts.window}")  # fmt: skip
    with _bench_run(opts) as run:
        server, creds, loads = run.server, run.creds, run.loads
        # (the create looks every member up: discover-numbers must cover them)
        extra = {"sync": opts.sync, "group_max_members": max(n, 1024),
                 "queue_max_count": max(10_000, 4 * m), "discover_numbers": max(2000, n)}  # fmt: skip
        server.start(opts.workers, extra, n, creds)
        from pigeon.server.provision import load_credentials

        accounts = load_credentials(creds)
        members_file = os.path.join(os.path.dirname(creds), "members.txt")
        with open(members_file, "w") as f:
            f.writelines(a["phone"] + "\n" for a in accounts[1:])
        base = ["--target", server.target, "--creds", creds]
        for first, last in _split(online - 1, opts.load_procs):
            loads.append(LoadProc(["--mode", "group-recv", *base, "--first", str(first + 1),
                                   "--last", str(last + 1)], (first + 1, last + 1)))  # fmt: skip
        for lp in loads:
            if lp.line(300) != "ready":
                raise BenchError("a load process failed to log in its members")
        sender = LoadProc(["--mode", "group-send", *base, "--first", "0", "--last", "1",
                           "--members", members_file, "--messages", str(m), "--window",
                           str(opts.window), "--size", str(opts.size)], (0, 1))  # fmt: skip
        loads.insert(0, sender)
        ready = sender.line(300)
        if not ready.startswith("ready "):
            raise BenchError("the sender failed to log in or to create the group")
        offline = [a["device"] for a in accounts[online:]]
        time.sleep(1.0)  # the create notices delivered and acked before the baseline
        pages0, psize, queued0 = _store_snapshot(server.data_dir, offline)
        server.sample_peak()
        cpu0, load0, t0 = server.cpu(), [lp.cpu() for lp in loads], time.monotonic()
        for lp in loads[1:]:
            lp.say("go")
        sender.say("go")
        bar = _Bar(m * (online - 1), "delivered")
        stalled = _send_and_drain(loads, opts, False, bar, online - 1)
        cpu1, load1, wall = server.cpu(), [lp.cpu() for lp in loads], time.monotonic() - t0
        peak = server.peak_rss
        results = _results(loads, "stop")
        time.sleep(0.5)  # the last acks' commit
        pages1, _, queued1 = _store_snapshot(server.data_dir, offline)
    sent, recv = results[0], results[1:]
    sent_ns = {int(k): v for k, v in sent["sent_ns"].items()}
    acked = len(sent_ns)
    got: dict[int, int] = {}
    last: dict[int, int] = {}
    for r in recv:
        for k, c in r["got"].items():
            got[int(k)] = got.get(int(k), 0) + c
        for k, t in r["last_ns"].items():
            last[int(k)] = max(last.get(int(k), 0), t)
    lost_online = sum(max(0, online - 1 - got.get(k, 0)) for k in sent_ns)
    grew = [b - a for a, b in zip(queued0, queued1, strict=True)]
    lost_offline = sum(max(0, acked - g) for g in grew)
    dup_offline = sum(max(0, g - acked) for g in grew)
    lat = sorted((last[k] - t) // 1000 for k, t in sent_ns.items() if got.get(k) == online - 1)
    user, system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    cpu_s = user + system
    recipients = n - 1
    grown = (pages1 - pages0) * psize
    busiest = max(b - a for a, b in zip(load0, load1, strict=True))
    if stalled is not None:
        stalled["missing"] = [{
            "load_process": 0, "clients": [0, 1], "sent_not_acked": m - acked,
            "acked_not_delivered": lost_online, "delivered_no_receipt": 0,
            "last_progress_s_ago": 0,
            "examples": {"sent_not_acked": [], "acked_not_delivered": [[0, k] for k in sorted(
                k for k in sent_ns if got.get(k, 0) < online - 1)[:5]],
                "delivered_no_receipt": []},
        }]  # fmt: skip
    return {
        "bench": "group",
        "members": n,
        "online_members": online,
        "offline_members": n - online,
        "offline_fraction": opts.offline_fraction,
        "messages": m,
        "size": opts.size,
        "window": opts.window,
        "workers": opts.workers,
        "load_processes": len(loads),
        "sync": opts.sync,
        "plaintext": True,
        "profile": "bench",
        "limits_lifted": sorted(BENCH_PROFILE),
        "note": "one group message: the send, the body stored once and a reference in every "
        "other member device's queue (one group commit), the server ack, the push to every "
        "online member device, each device's ack (the reference dropped; the body with the "
        "last); offline members' references stay queued",
        "sent": sent["sent"],
        "acked": acked,
        "errors": sent["errors"],
        "lost": lost_online + lost_offline,
        "lost_online": lost_online,
        "lost_offline": lost_offline,
        "duplicated": sum(r["duplicated"] for r in recv) + dup_offline,
        "server_user_s": round(user, 3),
        "server_sys_s": round(system, 3),
        "server_cpu_us_per_msg": round(cpu_s / (acked or 1) * 1e6, 1),
        "server_cpu_us_per_recipient": round(cpu_s / ((acked * recipients) or 1) * 1e6, 3),
        "store_bytes_per_msg": round(grown / (acked or 1), 1),
        "store_bytes_per_recipient": round(grown / ((acked * recipients) or 1), 2),
        "p50_ms": _percentile(lat, 0.50),
        "p99_ms": _percentile(lat, 0.99),
        "max_ms": lat[-1] / 1000 if lat else None,
        "elapsed_s": round(wall, 3),
        "load_cpu_busiest_pct": round(busiest / max(wall, 1e-3) * 100, 1),
        "server_peak_rss_kib": peak // 1024,
        "partial": bool(stalled and stalled["partial"]),
        "stalled": stalled,
        "machine": machine(),
    }


#: Linking limits lifted for the link bench besides BENCH_PROFILE: every link comes
#: from one address (loopback), so the per-address pairing and link caps would refuse it.
LINK_PROFILE = {
    "pair_per_ip": 1_000_000,
    "pair_per_address": 1_000_000,
    "link_per_account": 1_000_000,
}


def link_bench(opts) -> dict:
    """N primaries each link one new companion by QR code (the SDK's real pair and link).

    Server CPU per completed link covers the companion's connection and its
    ``pair`` (the pairing record, its reference), the primary's ``link`` (the
    signature check, the new device's keys: SCRAM's key derivation, the
    device-list notice to the account's devices, its ack) and the hand-over of
    the credentials to the waiting companion on whichever worker holds it; not
    the primaries' logins (before the window) nor the companion's first login.
    """
    n = opts.links
    with _bench_run(opts) as run:
        server, creds, loads = run.server, run.creds, run.loads
        if opts.target is None:
            server.start(opts.workers, {"sync": opts.sync, **LINK_PROFILE}, n, creds)
        base = ["--target", server.target, "--creds", creds, "--mode", "link",
                "--window", str(opts.window)]  # fmt: skip
        for first, last in _split(n, opts.load_procs):
            loads.append(LoadProc([*base, "--first", str(first), "--last", str(last)],
                                  clients=(first, last)))  # fmt: skip
        for lp in loads:
            if lp.line(300) != "ready":
                raise BenchError("a load process failed to log in its primaries")
        server.sample_peak()
        cpu0 = server.cpu()
        t0 = time.monotonic()
        for lp in loads:
            lp.say("go")
        results = [orjson.loads(lp.line(n * 30 + 60)) for lp in loads]
        cpu1 = server.cpu()
        elapsed = time.monotonic() - t0
        peak = server.peak_rss
        for lp in loads:
            lp.say("stop")
    durations = sorted(d for r in results for d in r["durations_us"])
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    done = len(durations)
    user, system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    return {
        "bench": "link",
        "links": n,
        "links_completed": done,
        "links_failed": n - done,
        "errors": errors,
        "window": opts.window,
        "workers": opts.workers,
        "load_processes": len(loads),
        "sync": opts.sync if opts.target is None else "external",
        "profile": "bench" if opts.target is None else "external",
        "limits_lifted": sorted({**BENCH_PROFILE, **LINK_PROFILE}) if opts.target is None else [],
        "note": "one link: a new companion connects and pairs (QR reference), the logged-in "
        "primary links it (signed), the companion receives its credentials; the primaries' "
        "logins are before the measure, the companions' first logins are not in it",
        "elapsed_s": round(elapsed, 3),
        "links_per_s": round(done / elapsed, 1) if elapsed else None,
        "server_user_s": round(user, 3),
        "server_sys_s": round(system, 3),
        "server_cpu_us_per_link": round((user + system) / (done or 1) * 1e6, 1),
        "server_user_us_per_link": round(user / (done or 1) * 1e6, 1),
        "link_p50_ms": _percentile(durations, 0.50),
        "link_p99_ms": _percentile(durations, 0.99),
        "server_peak_rss_kib": peak // 1024,
        "machine": machine(),
    }


#: What to install when a bench dependency is missing, from PyPI or from a checkout.
PIP_HINT = "pip install 'pigeon[bench]' (from a checkout: pip install '.[bench]')"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default after its help, except for flags and options whose
    default is "not set" (None): "(default: False)" tells nobody anything."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        if not action.option_strings:
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="load benchmarks against a real server",
        description="Load runs against a real server, measured from the OS: each bench "
        "starts its own server (the bench profile, limits lifted) in a temporary data "
        "directory unless --target names one, and prints a summary (--json: one JSON "
        "object). 'pigeon bench BENCH --help' lists a bench's options and defaults.",
        formatter_class=HelpFormatter,
    )
    bsub = p.add_subparsers(dest="bench_command", metavar="BENCH", required=True)

    def parser(name, **kw):
        return bsub.add_parser(name, formatter_class=HelpFormatter, **kw)

    def common(sp, clients=True, load_procs=1, load_procs_help="", server=True):
        if clients:
            sp.add_argument("--clients", type=int, default=100, metavar="N",
                            help="connected, logged-in clients")  # fmt: skip
        if server:
            sp.add_argument("--workers", type=int, default=os.cpu_count() or 1, metavar="N",
                            help="server workers (default: one per core, %(default)s here)")  # fmt: skip
        sp.add_argument("--load-procs", type=int, default=load_procs, metavar="N",
                        help="load-generator processes; the clients are split between them"
                        + load_procs_help)  # fmt: skip
        if not server:
            sp.add_argument("--creds", metavar="FILE",
                            help="credentials to log in with (default: made up for the run)")  # fmt: skip
            sp.add_argument("--json", action="store_true", help="print exactly one JSON object")
            sp.set_defaults(target=None, server_pid=None)
            return
        sp.add_argument("--target", metavar="HOST:PORT",
                        help="measure a running server instead of starting one (with "
                        "--server-pid and --creds)")  # fmt: skip
        sp.add_argument("--server-pid", type=int, metavar="PID",
                        help="the running server's supervisor PID, for its CPU and memory")  # fmt: skip
        sp.add_argument("--creds", metavar="FILE",
                        help="credentials from pigeon admin provision (with --target)")  # fmt: skip
        sp.add_argument("--json", action="store_true", help="print exactly one JSON object")

    def stall_flags(sp):
        sp.add_argument("--stall-timeout", type=float, default=30, metavar="S",
                        help="while sending, stop after S seconds without progress (no new "
                        "ack, delivery, receipt or error in any load process), say which "
                        "messages are missing and exit 1 with the figures so far, marked "
                        "partial")  # fmt: skip
        sp.add_argument("--drain-timeout", type=float, default=10, metavar="S",
                        help="after the sends, stop waiting for deliveries after S seconds "
                        "without progress; the missing messages are named")  # fmt: skip

    def sync_flag(sp):
        sp.add_argument("--sync", choices=["os", "fsync"], default="os",
                        help="the server's durability (default: %(default)s; the server's own "
                        "default is fsync)")  # fmt: skip

    def latency_flags(sp, search=True):
        sp.add_argument("--rate", type=float, default=1000, metavar="R",
                        help="messages per second, all load processes together"
                        + (" (the start of --find-max-rate)" if search else ""))  # fmt: skip
        sp.add_argument("--seconds", type=float, default=10, metavar="S",
                        help="length of the run"
                        + (" (of each run of --find-max-rate)" if search else "") + ", s")  # fmt: skip
        sp.add_argument("--size", type=int, default=100, metavar="BYTES",
                        help="message body size")  # fmt: skip
        sp.add_argument("--seed", type=int, default=1, help="seed of the random peer choice")

    def plot_flag(sp):
        sp.add_argument("--plot", metavar="FILE.png",
                        help="also draw the latency CDF into FILE.png (needs matplotlib)")  # fmt: skip

    t = parser(
        "throughput",
        help="closed-loop 1:1 messages, CPU per message",
        description="Every client sends --messages messages (per client: 1000 clients with "
        "--messages 200 are 200,000 messages) to random peers, keeping up to --window of them "
        "unacknowledged; reports server CPU per message. On a terminal a progress bar "
        "shows the deliveries.",
    )
    common(t)
    t.add_argument("--messages", type=int, default=100, metavar="M",
                   help="messages PER CLIENT: the run sends clients x M")  # fmt: skip
    t.add_argument("--size", type=int, default=100, metavar="BYTES", help="message body size")
    t.add_argument("--window", type=int, default=16, metavar="W",
                   help="messages a client keeps unacknowledged")  # fmt: skip
    sync_flag(t)
    t.add_argument("--no-receipts", action="store_true",
                   help="the server sends no delivered receipts (a message ends at the ack)")  # fmt: skip
    t.add_argument("--seed", type=int, default=1, help="seed of the random peer choice")
    t.add_argument("--devices-per-user", type=int, default=1, metavar="N",
                   help="devices of each user (1 primary + N-1 linked companions, all logged "
                   "in): a message goes to the recipient's N devices and, as sync copies, to "
                   "the sender's other N-1 (server_cpu_us_per_copy)")  # fmt: skip
    stall_flags(t)
    plot_flag(t)
    t.set_defaults(func=run, bench=throughput)
    lt = parser(
        "latency",
        help="open-loop fixed-rate load, send-to-delivery latency",
        description="Messages at a fixed rate, not waiting for acks (open loop), each stamped "
        "with the time it was due; reports the send-to-delivery latency distribution. The "
        "rate is split evenly between the load processes, their schedules interleaved; "
        "the latencies of all of them are merged before the percentiles. With --floor, "
        "the same load is then run against a trivial in-memory router (bench/floor.py) and "
        "reported as load_floor: the latency the load tool itself adds. With "
        "--find-max-rate, searches the highest rate whose p99 stays within a bound (at most "
        f"{MAX_SEARCH_RUNS} runs on one server).",
    )
    common(lt, load_procs=LATENCY_LOAD_PROCS, load_procs_help=LOAD_PROCS_WHY)
    latency_flags(lt)
    sync_flag(lt)
    lt.add_argument("--find-max-rate", type=float, metavar="P99_MS",
                    help="search the highest rate whose p99 stays within P99_MS")  # fmt: skip
    lt.add_argument("--floor", action="store_true",
                    help="then run the same load against the load floor (bench/floor.py) and "
                    "report it as load_floor: p50/p99/p99.9, achieved rate and load CPU "
                    "(with --find-max-rate: at the rate found)")  # fmt: skip
    stall_flags(lt)
    plot_flag(lt)
    lt.set_defaults(func=run, bench=latency)
    fl = parser(
        "floor",
        help="the latency load against a trivial router: the load tool's own floor",
        description="The load of 'pigeon bench latency' (same options) against bench/floor.py, "
        "a trivial in-memory router in one process (ack at once, deliver, delivered receipt "
        "on the device's ack; no store, no workers): the latencies it reports are what the "
        "load tool itself adds. 'pigeon bench latency --floor' measures it beside a server.",
    )
    common(fl, load_procs=LATENCY_LOAD_PROCS, load_procs_help=LOAD_PROCS_WHY, server=False)
    latency_flags(fl, search=False)
    stall_flags(fl)
    plot_flag(fl)
    fl.set_defaults(func=run, bench=floor_bench)
    pr = parser(
        "presence",
        help="one user's presence changes fanned out to N subscribers",
        description="One device toggles its presence; N clients subscribed to it receive "
        "every change. Reports server CPU per change and per push, and the push latency.",
    )
    common(pr, clients=False)
    pr.add_argument("--subscribers", type=int, default=1000, metavar="N",
                    help="clients subscribed to the changing user")  # fmt: skip
    pr.add_argument("--changes", type=int, default=200, metavar="K", help="presence changes")
    pr.add_argument("--interval", type=float, default=0.05, metavar="S",
                    help="seconds between changes")  # fmt: skip
    sync_flag(pr)
    pr.set_defaults(func=run, bench=presence)
    gr = parser(
        "group",
        help="group fan-out: server CPU per message and per recipient, store bytes, latency",
        description="One member sends --messages plaintext messages to a group of --members "
        "(provisioned in the store; the online ones logged in by --load-procs processes and "
        "spread over the workers, --offline-fraction of them never connected). Reports "
        "server CPU per message and per recipient device, LMDB bytes per message (pages in "
        "use after minus before), and p50/p99 from the send to the last online member's "
        "delivery. Exits 1 if an online member misses a message or an offline member's "
        "queue does not hold it.",
    )
    common(gr, clients=False, load_procs=2)
    gr.add_argument("--members", type=int, default=256, metavar="N", help="group members")
    gr.add_argument("--messages", type=int, default=100, metavar="M", help="group messages")
    gr.add_argument("--offline-fraction", type=float, default=0.0, metavar="F",
                    help="the share of members provisioned but never connected")  # fmt: skip
    gr.add_argument("--window", type=int, default=1, metavar="W",
                    help="messages the sender keeps unacknowledged")  # fmt: skip
    gr.add_argument("--size", type=int, default=100, metavar="BYTES", help="message body size")
    sync_flag(gr)
    stall_flags(gr)
    gr.set_defaults(func=run, bench=group_bench)
    lk = parser(
        "link",
        help="linking companions by QR code, server CPU per completed link",
        description="N provisioned primaries are logged in; each then links one new "
        "companion with the SDK's real flow (the companion connects and pairs, the primary "
        "links the QR reference, the companion receives its credentials), --window at a "
        "time per load process. Reports server CPU per completed link and the link time.",
    )
    common(lk, clients=False)
    lk.add_argument("--links", type=int, default=200, metavar="N",
                    help="companions to link (one per primary)")  # fmt: skip
    lk.add_argument("--window", type=int, default=16, metavar="W",
                    help="links under way at once in each load process")  # fmt: skip
    sync_flag(lk)
    lk.set_defaults(func=run, bench=link_bench)
    from . import media as media_mod

    media_mod.add_parser(parser)
    i = parser(
        "idle",
        help="memory per authenticated idle connection",
        description="Logs N clients in and leaves them idle; reports the server's memory "
        "(PSS where the OS has it) per connection: with them minus before them.",
    )
    common(i)
    i.set_defaults(func=run, bench=idle)
    rp = parser(
        "report",
        help="plot saved results: latency CDFs and throughput against clients",
        description="Read results saved with --json and draw the latency CDF of each "
        "throughput and latency run and, for throughput runs, messages per second and server "
        "CPU per message against the client count, one series per configuration (sync, "
        "receipts, window, ...). Other files (idle and presence results, pytest-benchmark "
        f"JSON) are skipped with a note, so a whole results folder can be given. Needs "
        f"matplotlib: {PIP_HINT}.",
    )
    rp.add_argument("results", nargs="+", metavar="RESULT.json", help="saved results")
    rp.add_argument("--out", required=True, metavar="FILE.png", help="the PNG to write")
    rp.set_defaults(func=report_command)


def _num(v, unit: str = "") -> str:
    """A figure for people: thousands separated, at most 3 significant decimals."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        text = f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"
    elif isinstance(v, int):
        text = f"{v:,}"
    else:
        text = str(v)
    return text + (f" {unit}" if unit else "")


def _headline(r: dict) -> list[str]:
    """The figures a run is for, in words, before the details."""
    kind = r.get("bench")
    lines = []
    if kind == "throughput" or (kind == "latency" and "find_max_rate_p99_ms" not in r):
        head = f"{kind}: {_num(r.get('sent'))} messages sent"
        if kind == "latency":
            head += (f" at {_num(r.get('rate'))} msg/s (achieved "
                     f"{_num(r.get('achieved_msgs_per_s'))} msg/s)")  # fmt: skip
        head += (f", {_num(r.get('delivered'))} delivered, {_num(r.get('lost'))} lost, "
                 f"{_num(r.get('duplicated'))} duplicated")  # fmt: skip
        if r.get("receipts") and r.get("receipts_missing") is not None:
            head += f", {_num(r['receipts_missing'])} receipts missing"
        lines.append(head)
        cpu = (f"server CPU {_num(r.get('server_cpu_us_per_msg'), 'us')} per message "
               f"({_num(r.get('server_user_us_per_msg'), 'us')} user)")  # fmt: skip
        if kind == "throughput":
            cpu += (f"; {_num(r.get('per_core_msgs_per_s'))} messages per CPU-second, "
                    f"{_num(r.get('msgs_per_s'))} msg/s wall")  # fmt: skip
        lines.append(cpu)
        lat = (f"send-to-delivery p50 {_num(r.get('p50_ms'), 'ms')}, "
               f"p99 {_num(r.get('p99_ms'), 'ms')}, p99.9 {_num(r.get('p999_ms'), 'ms')}")  # fmt: skip
        if kind == "throughput":
            lat += " (closed loop: mostly queueing in the load process)"
        lines.append(lat)
        if kind == "latency":
            lines.append(_load_line(r))
            lines += _floor_lines(r.get("load_floor"))
    elif kind == "floor":
        lines.append(f"floor: {_num(r.get('sent'))} messages sent at {_num(r.get('rate'))} msg/s "
                     f"(achieved {_num(r.get('achieved_msgs_per_s'))} msg/s) to the trivial "
                     f"router, {_num(r.get('delivered'))} delivered, {_num(r.get('lost'))} lost")  # fmt: skip
        lines.append(f"the load tool's own send-to-delivery p50 {_num(r.get('p50_ms'), 'ms')}, "
                     f"p99 {_num(r.get('p99_ms'), 'ms')}, p99.9 {_num(r.get('p999_ms'), 'ms')}")  # fmt: skip
        lines.append(_load_line(r) + f"; the router's CPU "
                     f"{_num(r.get('floor_cpu_us_per_msg'), 'us')} per message")  # fmt: skip
    elif kind == "latency":
        bound = _num(r["find_max_rate_p99_ms"], "ms")
        runs = r.get("runs") or []
        if r.get("max_rate") is None:
            lines.append(f"latency: no rate kept p99 within {bound} ({len(runs)} runs)")
        else:
            lines.append(f"latency: the highest rate with p99 within {bound} is "
                         f"{_num(r['max_rate'])} msg/s ({len(runs)} runs)")  # fmt: skip
            lines.append(f"at that rate: p50 {_num(r.get('p50_ms'), 'ms')}, p99 "
                         f"{_num(r.get('p99_ms'), 'ms')}, server CPU "
                         f"{_num(r.get('server_cpu_us_per_msg'), 'us')} per message, "
                         f"{_num(r.get('lost'))} lost")  # fmt: skip
            lines.append(_load_line(r))
        lines += _floor_lines(r.get("load_floor"))
    elif kind == "idle":
        lines.append(f"idle: {_num(r.get('clients'))} connections, "
                     f"{_num(r.get('kib_per_conn'), 'KiB')} per connection "
                     f"({r.get('memory_method', '?')}; server memory "
                     f"{_num(r.get('server_memory_before_kib'))} -> "
                     f"{_num(r.get('server_memory_after_kib'), 'KiB')})")  # fmt: skip
    elif kind == "presence":
        lines.append(f"presence: {_num(r.get('changes'))} changes to "
                     f"{_num(r.get('subscribers'))} subscribers, "
                     f"{_num(r.get('pushes_received'))} of {_num(r.get('pushes_expected'))} "
                     f"pushes received ({_num(r.get('missing_pushes'))} missing)")  # fmt: skip
        us_change = r.get("server_cpu_us_per_change")
        lines.append(f"server CPU {_num(us_change and us_change / 1000, 'ms')} per change, "
                     f"{_num(r.get('server_cpu_us_per_push'), 'us')} per push")  # fmt: skip
        lines.append(f"push latency p50 {_num(r.get('push_p50_ms'), 'ms')}, p99 "
                     f"{_num(r.get('push_p99_ms'), 'ms')}, max "
                     f"{_num(r.get('push_max_ms'), 'ms')}")  # fmt: skip
    elif kind == "group":
        lines.append(f"group: {_num(r.get('acked'))} messages to {_num(r.get('members'))} "
                     f"members ({_num(r.get('offline_members'))} offline), "
                     f"{_num(r.get('lost'))} lost, {_num(r.get('duplicated'))} duplicated")  # fmt: skip
        lines.append(f"server CPU {_num(r.get('server_cpu_us_per_msg'), 'us')} per message, "
                     f"{_num(r.get('server_cpu_us_per_recipient'), 'us')} per recipient; "
                     f"{_num(r.get('store_bytes_per_msg'))} store bytes per message")  # fmt: skip
        lines.append(f"send to last member p50 {_num(r.get('p50_ms'), 'ms')}, p99 "
                     f"{_num(r.get('p99_ms'), 'ms')}")  # fmt: skip
    elif kind == "link":
        lines.append(f"link: {_num(r.get('links_completed'))} of {_num(r.get('links'))} "
                     f"companions linked ({_num(r.get('links_failed'))} failed)")  # fmt: skip
        us_link = r.get("server_cpu_us_per_link")
        lines.append(f"server CPU {_num(us_link and us_link / 1000, 'ms')} per completed link, "
                     f"{_num(r.get('links_per_s'))} links/s wall")  # fmt: skip
        lines.append(f"link time p50 {_num(r.get('link_p50_ms'), 'ms')}, p99 "
                     f"{_num(r.get('link_p99_ms'), 'ms')}")  # fmt: skip
    elif kind == "media":
        lines.append(f"media: {_num(r.get('parallel'))} files of {_num(r.get('size_bytes'))} "
                     f"bytes: upload {_num(r.get('upload_mb_per_s'), 'MB/s')}, download "
                     f"{_num(r.get('download_mb_per_s'), 'MB/s')}")  # fmt: skip
        lines.append(f"server CPU {_num(r.get('server_cpu_s_per_gb'), 's')} per GB moved")
        c = r.get("download_curl")
        if c:
            lines.append(f"curl from the media service: download "
                         f"{_num(c.get('download_mb_per_s'), 'MB/s')}, "
                         f"{_num(c.get('server_cpu_s_per_gb'), 's')} CPU per GB")  # fmt: skip
        b = r.get("baseline")
        if b:
            lines.append(f"baseline ({b['client']} from {b['server']}): download "
                         f"{_num(b.get('download_mb_per_s'), 'MB/s')}, "
                         f"{_num(b.get('server_cpu_s_per_gb'), 's')} CPU per GB")  # fmt: skip
    if r.get("stalled"):
        lines[0] = ("STALLED, figures partial: " if r.get("partial") else "STALLED: ") + lines[0]
    return lines


def _load_line(r: dict) -> str:
    """How hard the load processes worked: if the busiest is near 100%, it was the limit."""
    return (f"load CPU {_num(r.get('load_cpu_us_per_msg'), 'us')} per message, busiest of "
            f"{_num(r.get('load_processes'))} load processes at "
            f"{_num(r.get('load_cpu_busiest_pct'))}% of a core")  # fmt: skip


def _floor_lines(f: dict | None) -> list[str]:
    """The load floor beside a latency: what of it is the load tool's own."""
    if not f:
        return []
    return [f"load floor, the same load against a trivial router (bench/floor.py): "
            f"p50 {_num(f.get('p50_ms'), 'ms')}, p99 {_num(f.get('p99_ms'), 'ms')}, "
            f"p99.9 {_num(f.get('p999_ms'), 'ms')} at {_num(f.get('achieved_msgs_per_s'))} "
            f"msg/s; load CPU {_num(f.get('load_cpu_us_per_msg'), 'us')} per message, busiest "
            f"load process {_num(f.get('load_cpu_busiest_pct'))}% of a core"]  # fmt: skip


def _runs_table(runs: list[dict]) -> list[str]:
    """The runs of a --find-max-rate search, one row each, in the order they ran."""
    cols = (("rate", "rate msg/s"), ("achieved_msgs_per_s", "achieved"), ("p50_ms", "p50 ms"),
            ("p99_ms", "p99 ms"), ("p999_ms", "p99.9 ms"), ("lost", "lost"),
            ("server_cpu_us_per_msg", "CPU us/msg"),
            ("load_cpu_busiest_pct", "busiest load %"))  # fmt: skip
    rows = [[label for _, label in cols]]
    rows += [[_num(run.get(key)) for key, _ in cols] for run in runs]
    widths = [max(len(row[k]) for row in rows) for k in range(len(cols))]
    return ["  " + "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]


def _human(result: dict) -> str:
    """What a run prints without --json: the headline, then every figure, aligned."""
    bulky = ("machine", "latency_cdf", "runs", "stalled", "note", "limits_lifted", "errors",
             "load_floor", "baseline", "download_curl")  # fmt: skip
    lines = _headline(result)
    if result.get("note"):
        lines += textwrap.wrap(f"({result['note']})", 88)
    details = [(k, _num(v)) for k, v in result.items() if k not in bulky]
    errors = result.get("errors")
    if errors is not None:
        details.append(("errors", ", ".join(f"{k}: {v:,}" for k, v in errors.items()) or "none"))
    if result.get("limits_lifted"):
        details.append(("limits_lifted", ", ".join(result["limits_lifted"])))
    m = result.get("machine") or {}
    if m:
        details.append(("machine", f"{m.get('cpu') or '?'}, {m.get('cores')} cores, "
                                   f"{m.get('os')}, Python {m.get('python')}"))  # fmt: skip
    width = max((len(k) for k, _ in details), default=0)
    lines += ["", "details:"] + [f"  {k:<{width}}  {v}" for k, v in details]
    if result.get("runs"):
        lines += ["", "runs:", *_runs_table(result["runs"])]
    floor = result.get("load_floor")
    if floor:
        shown = [(k, _num(v)) for k, v in floor.items() if k not in ("latency_cdf", "stalled")]
        w = max(len(k) for k, _ in shown)
        lines += ["", "load floor (bench/floor.py):"] + [f"  {k:<{w}}  {v}" for k, v in shown]
    return "\n".join(lines)


#: Result fields that make a throughput run's configuration: runs differing in
#: any of them are different series in the report, never joined by a line.
CONFIG_KEYS = ("sync", "receipts", "window", "size", "messages_per_client", "workers",
               "load_processes", "profile", "devices_per_user")  # fmt: skip


def _config(r: dict) -> tuple:
    return tuple(r.get(k) for k in CONFIG_KEYS)


def _config_label(config: tuple, varying: set[str]) -> str:
    """``os, receipts`` plus whatever else differs between the plotted configurations."""
    c = dict(zip(CONFIG_KEYS, config, strict=True))
    parts = [str(c["sync"]), "receipts" if c["receipts"] else "no receipts"]
    units = {"window": "window {}", "size": "{} B", "messages_per_client": "{} msg/client",
             "workers": "{} workers", "load_processes": "{} load procs", "profile": "{} profile"}  # fmt: skip
    parts += [units[k].format(c[k]) for k in CONFIG_KEYS[2:] if k in varying]
    return ", ".join(parts)


#: Markers of the configurations in the throughput panels, one each (cycled past 8).
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _dodged(points: list[tuple[int, int]], spread: float = 0.03) -> dict[tuple[int, int], float]:
    """x positions for (series, clients) points: the points sharing a client count are
    spread around it (``spread`` decades apart on the log axis) so none hides another."""
    at: dict[int, list[tuple[int, int]]] = {}
    for p in sorted(set(points)):
        at.setdefault(p[1], []).append(p)
    out = {}
    for clients, ps in at.items():
        for k, p in enumerate(ps):
            out[p] = clients * 10 ** (spread * (k - (len(ps) - 1) / 2))
    return out


def figure(results: list[tuple[str, dict]]):
    """The report's matplotlib figure: the latency CDF of every result that has one;
    for throughput runs, msg/s and server CPU per message against clients, a series
    (its own marker and colour, lines only within it) per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tps = [r for _, r in results if r.get("bench") == "throughput"]
    ncols = 3 if tps else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4.5), squeeze=False)
    ax = axes[0][0]
    for k, (name, r) in enumerate(results):
        cdf = r.get("latency_cdf") or []
        if cdf:
            what = f"{r['rate']:.0f} msg/s" if r.get("rate") else f"{r.get('clients')} clients"
            label = f"{r['bench']} {what}" if name == r["bench"] else f"{name} ({what})"
            line = ax.plot([p[0] for p in cdf], [p[1] for p in cdf], label=label,
                           linestyle=("-", "--", "-.", ":")[k % 4])[0]  # fmt: skip
            fcdf = (r.get("load_floor") or {}).get("latency_cdf") or []
            if fcdf:  # the load tool's own share, in the same colour, thin
                ax.plot([p[0] for p in fcdf], [p[1] for p in fcdf], label=f"{label}: load floor",
                        linestyle=":", linewidth=1, color=line.get_color())  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("send-to-delivery latency, ms (log)")
    ax.set_ylabel("fraction of messages")
    ax.set_title("latency CDF")
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small")
    if tps:
        configs = sorted({_config(r) for r in tps}, key=repr)
        varying = {k for n, k in enumerate(CONFIG_KEYS) if len({c[n] for c in configs}) > 1}
        # (series, clients, run) -> x; repeated runs of one configuration at the
        # same client count are dodged apart like different configurations
        seen: dict[tuple, int] = {}
        keyed = []
        for r in sorted(tps, key=lambda r: r.get("clients") or 0):
            g = configs.index(_config(r))
            rep = seen[(g, r["clients"])] = seen.get((g, r["clients"]), -1) + 1
            keyed.append(((g * 1000 + rep, r["clients"]), g, r))
        xs = _dodged([p for p, _, _ in keyed])
        clients = sorted({r["clients"] for r in tps})
        for ax, field, title, ylabel in (
            (axes[0][1], "msgs_per_s", "throughput against clients", "messages per second (wall)"),
            (axes[0][2], "server_cpu_us_per_msg", "server CPU per message", "us per message"),
        ):  # fmt: skip
            for g, config in enumerate(configs):
                mine = [(xs[p], r[field]) for p, gg, r in keyed if gg == g]
                ax.plot([x for x, _ in mine], [y for _, y in mine], marker=MARKERS[g % len(MARKERS)],
                        linestyle="-", color=f"C{g % 10}", label=_config_label(config, varying),
                        gid=repr(config))  # fmt: skip
            ax.set_xscale("log")
            ax.set_xticks(clients, [f"{c:,}" for c in clients])
            ax.minorticks_off()
            ax.set_xlabel("clients (runs at the same count drawn side by side)")
            ax.set_ylabel(ylabel)
            ax.set_ylim(bottom=0)
            ax.set_title(title)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="small")
    fig.suptitle(f"pigeon bench, {results[0][1].get('machine', {}).get('cpu', '')}")
    fig.tight_layout()
    return fig


def plot(results: list[tuple[str, dict]], out: str) -> None:
    """Write the report's figure (see ``figure``) to ``out``."""
    import matplotlib.pyplot as plt

    fig = figure(results)
    try:
        fig.savefig(out, dpi=110)
    finally:
        plt.close(fig)


def _plottable(r, path: str) -> str | None:
    """Why the report cannot draw result ``r`` (read from ``path``), or None if it can."""
    if not isinstance(r, dict):
        return "not a pigeon bench result"
    if "benchmarks" in r and "bench" not in r:
        return f"a pytest-benchmark result (its table: python -m pigeon.bench.summarize {path})"
    kind = r.get("bench")
    if kind in ("idle", "presence", "link", "media", "group"):
        return f"{'an' if kind == 'idle' else 'a'} {kind} result: nothing to plot"
    if kind not in ("throughput", "latency", "floor"):
        return "not a pigeon bench result (save one with --json)"
    need = {"throughput": ("clients", "msgs_per_s", "server_cpu_us_per_msg"), "latency": (),
            "floor": ()}  # fmt: skip
    for field in need[kind]:
        if not isinstance(r.get(field), (int, float)) or isinstance(r.get(field), bool):
            return f"a {kind} result without a number for {field!r}"
    cdf = r.get("latency_cdf")
    if cdf is not None and not (isinstance(cdf, list)
                                and all(isinstance(p, list) and len(p) == 2 for p in cdf)):  # fmt: skip
        return "a malformed latency_cdf"
    if kind in ("latency", "floor") and not cdf:
        return "a latency result without a latency distribution (a search no rate passed)"
    return None


def report_command(opts) -> int:
    results = []
    for path in opts.results:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            print(f"pigeon bench report: cannot read {path}: {exc}", file=sys.stderr)
            return 1
        try:
            r = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            print(f"pigeon bench report: skipped {path}: not JSON ({exc})", file=sys.stderr)
            continue
        why = _plottable(r, path)
        if why is not None:
            print(f"pigeon bench report: skipped {path}: {why}", file=sys.stderr)
            continue
        results.append((os.path.basename(path), r))
    if not results:
        print("pigeon bench report: nothing to plot: none of the files is a throughput or "
              "latency result (save one with --json)", file=sys.stderr)  # fmt: skip
        return 1
    try:
        plot(results, opts.out)
    except ImportError:
        print(f"pigeon bench report: matplotlib is missing: {PIP_HINT}", file=sys.stderr)
        return 1
    print(f"wrote {opts.out} ({len(results)} results)")
    return 0


# Options each bench may have, checked before it starts: the least value, or > 0.
_AT_LEAST = (("clients", 2), ("load_procs", 1), ("links", 1), ("window", 1), ("subscribers", 1),
             ("parallel", 1), ("size", 1))  # fmt: skip
_POSITIVE = ("rate", "seconds", "stall_timeout", "drain_timeout")


def run(opts) -> int:
    if (opts.target is None) != (opts.server_pid is None):
        print("pigeon bench: --target and --server-pid go together", file=sys.stderr)
        return 2
    if opts.target is not None and opts.creds is None:
        print("pigeon bench: --target needs --creds (from pigeon admin provision)",
              file=sys.stderr)  # fmt: skip
        return 2
    if opts.target is not None:
        from pigeon.server.config import split_hostport

        try:  # what the server's listen takes, before any load process is started
            split_hostport(opts.target)
        except ValueError as exc:
            print(f"pigeon bench: --target: {exc}", file=sys.stderr)
            return 2
    for flag, least in _AT_LEAST:
        if getattr(opts, flag, least) < least:
            print(f"pigeon bench: --{flag.replace('_', '-')} must be at least {least}",
                  file=sys.stderr)  # fmt: skip
            return 2
    for flag in _POSITIVE:
        if getattr(opts, flag, 1) <= 0:
            print(f"pigeon bench: --{flag.replace('_', '-')} must be positive", file=sys.stderr)
            return 2
    try:
        result = opts.bench(opts)
    except BenchError as exc:
        print(f"pigeon bench: {exc}", file=sys.stderr)
        return 1
    except ImportError as exc:
        print(f"pigeon bench: {exc.name or exc} is missing: {PIP_HINT}", file=sys.stderr)
        return 1
    if getattr(opts, "plot", None):
        try:
            plot([(result["bench"], result)], opts.plot)
        except ImportError:
            print(f"pigeon bench: --plot needs matplotlib: {PIP_HINT}", file=sys.stderr)
            return 1
    if result.get("stalled"):
        note(stall_message(result["stalled"]))
    print(orjson.dumps(result).decode() if opts.json else _human(result))
    bad = (
        result.get("stalled")
        or result.get("lost")
        or result.get("duplicated")
        or result.get("receipts_missing")
        or result.get("missing_pushes")
        or result.get("links_failed")
        or (result.get("bench") in ("media", "group") and result.get("errors"))
    )
    return 1 if bad else 0
