"""Metrics: counted in each worker, gathered and served by the supervisor.

Each worker keeps plain counters (``WorkerStats``) and sends a snapshot,
one JSON line on its status pipe, every ``SNAPSHOT_INTERVAL`` seconds.  The
supervisor keeps the latest snapshot per worker, carries the counters of
workers that exited (so totals never go backwards across a restart), and
serves the Prometheus text format (prometheus-client) plus a health check
on ``metrics-listen``:

    GET /metrics   counters and gauges below, aggregated across workers
    GET /health    200 "ready" once every worker listens; 503 "starting"
                   or "stopping" otherwise (for load balancers)
    GET /status    one JSON object (orjson) for operators and scripts, in the
                   manner of nats-server's /varz: the same state as /health,
                   version, workers (pid, state, uptime, connections), queue
                   and store totals, counters, listeners; always 200
                   (``pigeon admin status`` reads it)

Queue figures and LMDB map use are read from the store at scrape time
(cached for a second), so they are right even with a worker down.  Process
figures (CPU seconds, resident memory, open files) are read at scrape time
too: the supervisor's by prometheus-client's ProcessCollector, each
worker's from ``/proc/PID`` by its pid (psutil where there is no /proc, as
on FreeBSD, when it is installed; without either they are left out).

The listener is a thread per connection (``ThreadingMixIn``), so a client
that connects and stalls holds one thread, never the others' answers.  Two
bounds keep stalled clients from piling up: at most ``metrics-connections``
at once (past it a new connection is closed unanswered), and each is closed
``metrics-timeout`` seconds after it was accepted, whatever it is doing (a
deadline, not a per-read timeout, so trickling a byte a second buys
nothing).  Why not aiohttp: the supervisor is a synchronous selector loop
with nothing else asynchronous to share a loop with, aiohttp is not a
dependency of the server, and its server has no deadline for reading a
request's head; the standard library's threads with a deadline are enough
for a scrape every few seconds.
"""

from __future__ import annotations

import bisect
import logging
import os
import platform
import socket
import socketserver
import threading
import time
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from .config import split_hostport

SNAPSHOT_INTERVAL = 1.0

#: Upper bounds of the commit-latency histogram, seconds.
COMMIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                  0.25, 1.0)  # fmt: skip

#: Upper bounds of the store-write-wait histogram, seconds.  Taking a free
#: writer lock costs a few microseconds, so the low buckets tell "no wait"
#: from waiting behind another worker's commit.
WAIT_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                0.01, 0.025, 0.05, 0.1, 0.25, 1.0)  # fmt: skip

COUNTERS = {
    "logins": "devices logged in",
    "login_failures": "failed logins (a bad proof, or a challenge never answered)",
    "login_refused": "logins refused (error 302): too many failures from the address, or too many "
    "logins of the device (device-logins)",
    "evicted": "connections not logged in closed (503) to make room for a new one past "
    "max-connections",
    "client_logs_suppressed": "log lines about client misbehaviour not written (client-log-lines)",
    "messages_in": "messages and read receipts accepted from clients (stored)",
    "entries_out": "queue entries pushed to devices (messages and receipts)",
    "device_acks": "cumulative acks received from devices",
    "commits": "group commits (write transactions of queued work)",
    "presence_changes": "users whose presence (or who may see it) changed, noted to the workers",
    "presence_pushes": "presence updates pushed to subscribers",
    "typing": "typing indicators routed (to online devices; never stored)",
    "bus_bytes_out": "bytes written to the other workers over the worker bus",
    "bus_pushes_held": "pushes to another worker left out: the device's session there is paused",
    "bus_pushes_dropped": "pushes to another worker left out: the bus to it is past bus-buffer-high",
    "bus_catchups": "devices on another worker told to read pushes left out from their queue",
    "bus_congested": "times the bus to another worker passed bus-buffer-high",
    "rate_limited": "nodes refused or dropped by a per-connection rate limit (error 405)",
}


class WorkerStats:
    """What one worker counts; ``snapshot()`` is what it sends its supervisor."""

    def __init__(self):
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.errors: dict[int, int] = {}
        self.commit_buckets = [0] * (len(COMMIT_BUCKETS) + 1)
        self.commit_sum = 0.0
        self.wait_buckets = [0] * (len(WAIT_BUCKETS) + 1)
        self.wait_sum = 0.0
        self.loop_lag = 0.0
        # push wake-ups (server/push.py): "result provider reason" -> count
        self.push: dict[str, int] = {}

    def error(self, code: int) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    def commit(self, seconds: float) -> None:
        self.counters["commits"] += 1
        self.commit_sum += seconds
        self.commit_buckets[bisect.bisect_left(COMMIT_BUCKETS, seconds)] += 1

    def write_wait(self, seconds: float) -> None:
        """Time a group commit spent in ``begin(write=True)``: waiting for LMDB's one
        writer lock, held by another worker's (or tool's) write transaction."""
        self.wait_sum += seconds
        self.wait_buckets[bisect.bisect_left(WAIT_BUCKETS, seconds)] += 1

    def snapshot(self, connections: int) -> dict:
        return {
            "c": self.counters,
            "e": {str(k): v for k, v in self.errors.items()},
            "h": self.commit_buckets,
            "hs": self.commit_sum,
            "wh": self.wait_buckets,
            "ws": self.wait_sum,
            "lag": self.loop_lag,
            "conns": connections,
            "p": self.push,
        }


class Aggregate:
    """The supervisor's view: latest snapshot per worker plus what exited workers counted."""

    def __init__(self):
        self.latest: dict[int, dict] = {}
        self.retired = {"c": dict.fromkeys(COUNTERS, 0), "e": {}, "h": [0] * (len(COMMIT_BUCKETS) + 1),
                        "hs": 0.0, "wh": [0] * (len(WAIT_BUCKETS) + 1), "ws": 0.0,
                        "p": {}}  # fmt: skip
        self.lock = threading.Lock()

    def update(self, index: int, snap: dict) -> None:
        with self.lock:
            self.latest[index] = snap

    def retire(self, index: int) -> None:
        """Worker ``index`` exited: keep its counts in the totals."""
        with self.lock:
            snap = self.latest.pop(index, None)
            if snap is None:
                return
            r = self.retired
            for k, v in snap["c"].items():
                r["c"][k] = r["c"].get(k, 0) + v
            for k, v in snap["e"].items():
                r["e"][k] = r["e"].get(k, 0) + v
            r["h"] = [a + b for a, b in zip(r["h"], snap["h"], strict=True)]
            r["hs"] += snap["hs"]
            r["wh"], r["ws"] = _add_waits(r["wh"], r["ws"], snap)
            for k, v in snap.get("p", {}).items():
                r["p"][k] = r["p"].get(k, 0) + v

    def totals(self) -> tuple[dict, dict, list, float, dict, dict]:
        with self.lock:
            r = self.retired
            c, e, h, hs = dict(r["c"]), dict(r["e"]), list(r["h"]), r["hs"]
            lag, conns = {}, {}
            for index, snap in self.latest.items():
                for k, v in snap["c"].items():
                    c[k] = c.get(k, 0) + v
                for k, v in snap["e"].items():
                    e[k] = e.get(k, 0) + v
                h = [a + b for a, b in zip(h, snap["h"], strict=True)]
                hs += snap["hs"]
                lag[index] = snap["lag"]
                conns[index] = snap["conns"]
            return c, e, h, hs, lag, conns

    def push_totals(self) -> dict:
        """Push wake-up counts, "result provider reason" -> n, across workers."""
        with self.lock:
            out = dict(self.retired["p"])
            for snap in self.latest.values():
                for k, v in snap.get("p", {}).items():
                    out[k] = out.get(k, 0) + v
            return out

    def write_waits(self) -> tuple[list, float]:
        """(histogram buckets, seconds) of the group commits' waits for the writer lock."""
        with self.lock:
            wh, ws = list(self.retired["wh"]), self.retired["ws"]
            for snap in self.latest.values():
                wh, ws = _add_waits(wh, ws, snap)
            return wh, ws


def _add_waits(wh: list, ws: float, snap: dict) -> tuple[list, float]:
    return [a + b for a, b in zip(wh, snap["wh"], strict=True)], ws + snap["ws"]


#: The per-worker series: ``worker`` is the worker's index (0 .. workers-1, the
#: same across reloads, so a dashboard's series go on); ``generation`` counts
#: reloads (SIGHUP), so the old and the new worker of an index, both alive while
#: the old one drains, are two series, never one sample given twice.
WORKER = ["worker", "generation"]


def _worker_labels(wid: int) -> list[str]:
    from .worker import WID_STRIDE

    return [str(wid % WID_STRIDE), str(wid // WID_STRIDE)]


def process_figures(pid: int) -> tuple[float, int, int] | None:
    """(CPU seconds, resident bytes, open files) of process ``pid``, or None if unknown.

    ``/proc`` where it is (Linux); psutil otherwise, if installed (FreeBSD
    has no /proc unless linprocfs is mounted); None for a process that is
    gone or when neither is there.
    """
    if _HAVE_PROC:
        return proc_figures(pid)
    return psutil_figures(pid)


def proc_figures(pid: int) -> tuple[float, int, int] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        # after "pid (comm)": state is fields[0], utime [11], stime [12], rss (pages) [21]
        cpu = (int(fields[11]) + int(fields[12])) / _CLK_TCK
        rss = int(fields[21]) * _PAGE_SIZE
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, IndexError, ValueError):
        return None  # gone (or a zombie not reaped yet)
    return cpu, rss, fds


def psutil_figures(pid: int) -> tuple[float, int, int] | None:
    try:
        import psutil
    except ImportError:
        return None
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            t = p.cpu_times()
            return t.user + t.system, p.memory_info().rss, p.num_fds()
    except (psutil.Error, OSError):
        return None


try:
    _CLK_TCK = os.sysconf("SC_CLK_TCK")
    _PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
except (AttributeError, ValueError, OSError):  # not a POSIX sysconf: /proc is not there either
    _CLK_TCK, _PAGE_SIZE = 100, 4096
_HAVE_PROC = os.path.exists("/proc/self/stat")


class SelfProcessCollector:
    """The supervisor's own process_* figures where ProcessCollector has no /proc (psutil)."""

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        figures = process_figures(os.getpid())
        if figures is None:
            return
        cpu, rss, fds = figures
        yield CounterMetricFamily("process_cpu_seconds", "Total user and system CPU time "
                                  "spent in seconds.", value=cpu)  # fmt: skip
        yield GaugeMetricFamily("process_resident_memory_bytes", "Resident memory size in bytes.",
                                value=rss)  # fmt: skip
        yield GaugeMetricFamily("process_open_fds", "Number of open file descriptors.", value=fds)


def build_info() -> tuple[str, str, str]:
    """(version, codec implementation, Python version) for pigeon_build_info."""
    from pigeon.core import __version__
    from pigeon.core import codec as core_codec

    return __version__, core_codec.IMPLEMENTATION, platform.python_version()


class Collector:
    """prometheus-client collector over an Aggregate, the store and the worker processes.

    ``worker_pids()`` gives {worker id: pid} of the running workers.  Scrapes
    may run at once (one thread per connection): the store is read under a
    lock, since one process must not open the same LMDB environment twice.
    """

    def __init__(self, aggregate: Aggregate, store_path: str, map_size: int, worker_pids=dict,
                 writemap: bool = False):  # fmt: skip
        self.aggregate = aggregate
        self.store_path = store_path
        self.map_size = map_size
        self.writemap = writemap
        self.worker_pids = worker_pids
        self._store_cache: tuple[float, dict] | None = None
        self._store_lock = threading.Lock()

    def _store_figures(self) -> dict:
        with self._store_lock:
            return self._read_store()

    def _read_store(self) -> dict:
        now = time.monotonic()
        if self._store_cache and now - self._store_cache[0] < 1.0:
            return self._store_cache[1]
        from .queues import Queues
        from .store import Store

        store = Store(self.store_path, map_size=self.map_size, create=False,
                      writemap=self.writemap)  # fmt: skip
        try:
            stats = Queues(store).stats(top=0)
            info, st = store.env.info(), store.env.stat()
            stats["used"] = (info["last_pgno"] + 1) * st["psize"]
            stats["map"] = info["map_size"]
        finally:
            store.close()
        self._store_cache = (now, stats)
        return stats

    def collect(self):
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        c, e, h, hs, lag, conns = self.aggregate.totals()
        try:
            q = self._store_figures()
        except Exception:  # the store is being created or is gone: say nothing about it
            q = None
        if q is not None:
            yield GaugeMetricFamily("pigeon_queue_entries", "entries waiting in device queues",
                                    value=q["count"])  # fmt: skip
            yield GaugeMetricFamily("pigeon_queue_bytes", "bytes waiting in device queues",
                                    value=q["bytes"])  # fmt: skip
            yield GaugeMetricFamily("pigeon_queue_devices", "devices with a non-empty queue",
                                    value=q["devices_with_queue"])  # fmt: skip
            yield GaugeMetricFamily(
                "pigeon_queue_oldest_seconds", "age of the oldest queued entry",
                value=q["oldest_s"] or 0.0,
            )  # fmt: skip
            yield GaugeMetricFamily("pigeon_store_used_bytes", "LMDB pages in use",
                                    value=q["used"])  # fmt: skip
            yield GaugeMetricFamily("pigeon_store_map_bytes", "LMDB map size (the ceiling)",
                                    value=q["map"])  # fmt: skip
        g = GaugeMetricFamily("pigeon_connections", "open client connections", labels=WORKER)
        for wid, n in sorted(conns.items()):
            g.add_metric(_worker_labels(wid), n)
        yield g
        g = GaugeMetricFamily("pigeon_loop_lag_seconds",
                              "event-loop lag of each worker (latest sample)", labels=WORKER)  # fmt: skip
        for wid, v in sorted(lag.items()):
            g.add_metric(_worker_labels(wid), v)
        yield g
        for name, help_text in COUNTERS.items():
            yield CounterMetricFamily(f"pigeon_{name}", help_text, value=c.get(name, 0))
        errs = CounterMetricFamily("pigeon_errors", "error nodes sent to clients, by code",
                                   labels=["code"])  # fmt: skip
        for code, n in sorted(e.items()):
            errs.add_metric([code], n)
        yield errs
        cumulative, buckets = 0, []
        for bound, n in zip((*map(str, COMMIT_BUCKETS), "+Inf"), h, strict=True):
            cumulative += n
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily("pigeon_commit_seconds", "group commit latency",
                                    buckets=buckets, sum_value=hs)  # fmt: skip
        wakes = CounterMetricFamily(
            "pigeon_push_wakeups", "push wake-ups by provider and result (sent, coalesced, "
            "muted, cancelled, dropped, retried, failed, gone) and reason",
            labels=["provider", "result", "reason"])  # fmt: skip
        for key, n in sorted(self.aggregate.push_totals().items()):
            result, provider, reason = (key.split(" ", 2) + ["", ""])[:3]
            wakes.add_metric([provider, result, reason], n)
        yield wakes
        wh, ws = self.aggregate.write_waits()
        cumulative, buckets = 0, []
        for bound, n in zip((*map(str, WAIT_BUCKETS), "+Inf"), wh, strict=True):
            cumulative += n
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily(
            "pigeon_store_write_wait_seconds",
            "time group commits waited for the store's one writer (LMDB begin(write=True))",
            buckets=buckets, sum_value=ws,
        )  # fmt: skip
        cpu = CounterMetricFamily("pigeon_worker_cpu_seconds",
                                  "user and system CPU time of each worker process",
                                  labels=WORKER)  # fmt: skip
        rss = GaugeMetricFamily("pigeon_worker_resident_memory_bytes",
                                "resident memory of each worker process", labels=WORKER)  # fmt: skip
        fds = GaugeMetricFamily("pigeon_worker_open_fds",
                                "open file descriptors of each worker process", labels=WORKER)  # fmt: skip
        for wid, pid in sorted(self.worker_pids().items()):
            figures = process_figures(pid)
            if figures is not None:
                labels = _worker_labels(wid)
                cpu.add_metric(labels, figures[0])
                rss.add_metric(labels, figures[1])
                fds.add_metric(labels, figures[2])
        yield cpu
        yield rss
        yield fds
        info = GaugeMetricFamily("pigeon_build_info", "always 1: the version, codec "
                                 "implementation and Python version running",
                                 labels=["version", "codec", "python"])  # fmt: skip
        info.add_metric(list(build_info()), 1)
        yield info


def status_document(collector: Collector, supervisor: dict) -> dict:
    """The /status document: the supervisor's part (``Supervisor.status``) and the figures.

    ``ready`` is ``state == "ready"``, the very test /health answers 200 on.
    Per-worker connections and loop lag come from the workers' latest
    snapshots (None for a worker that has sent none yet); queue and store
    figures from the store, as /metrics reads them (None if it cannot be read).
    """
    from pigeon.core.tokens import LATEST_VERSION
    from pigeon.core.wire import PROTOCOL_VERSION

    c, e, _h, _hs, lag, conns = collector.aggregate.totals()
    wh, ws = collector.aggregate.write_waits()
    try:
        q = collector._store_figures()
    except Exception:  # the store is being created or is gone: say nothing about it
        q = None
    workers = [
        {**w, "connections": conns.get(w["id"]), "loop_lag_s": lag.get(w["id"])}
        for w in supervisor["workers"]
    ]
    version, codec, python = build_info()
    state = supervisor["state"]
    return {
        "server": "pigeon",
        "version": version,
        "codec": codec,
        "python": python,
        "protocol": PROTOCOL_VERSION,
        "dictionary": LATEST_VERSION,
        "state": state,
        "ready": state == "ready",
        "now_ms": int(time.time() * 1000),
        **{k: v for k, v in supervisor.items() if k not in ("state", "workers")},
        "workers": workers,
        "workers_ready": sum(w["state"] == "ready" for w in workers),
        "connections": sum(conns.values()),
        "queues": None if q is None else {
            "entries": q["count"], "bytes": q["bytes"], "devices": q["devices_with_queue"],
            "oldest_s": q["oldest_s"],
        },
        "store": None if q is None else {"used_bytes": q["used"], "map_bytes": q["map"]},
        "totals": {name: c.get(name, 0) for name in COUNTERS},
        "push": collector.aggregate.push_totals(),
        "write_wait": {"seconds": round(ws, 6), "commits": sum(wh)},
        "errors": e,
    }  # fmt: skip


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args) -> None:  # scrapes are not log events
        pass


class Listener(socketserver.ThreadingMixIn, WSGIServer):
    """A WSGI server with a thread per connection, a cap on them and a deadline for each."""

    daemon_threads = True  # a stalled client never holds up the supervisor's exit
    block_on_close = False
    # the listen backlog (socketserver's default is 5: a burst of health checks,
    # 200 at once in probe8, waited out SYN retries, up to 8 s, or failed)
    request_queue_size = 1024

    def __init__(self, address, family, limit: int, timeout: float):
        self.address_family = family
        self.limit = limit
        self.timeout_s = timeout
        self.lock = threading.Lock()
        self.active: dict[socket.socket, float] = {}  # connection -> its deadline
        self.refused = 0
        super().__init__(address, _handler(timeout))

    def verify_request(self, request, client_address) -> bool:
        with self.lock:
            if len(self.active) >= self.limit:
                self.refused += 1
                return False  # socketserver closes it unanswered
            self.active[request] = time.monotonic() + self.timeout_s
        return True

    def handle_error(self, request, client_address) -> None:
        """A client that timed out or went away is not the server's error; anything else is."""
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            return
        logging.getLogger("pigeon.metrics").exception("metrics request failed")

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.lock:
                self.active.pop(request, None)

    def service_actions(self) -> None:
        """Called by serve_forever every poll: end connections past their deadline.

        Shutting the socket down makes the handler's blocked read or write
        fail at once, and its thread ends.
        """
        now = time.monotonic()
        with self.lock:
            late = [conn for conn, deadline in self.active.items() if deadline <= now]
        for conn in late:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by its thread


def _handler(timeout: float):
    class Handler(_Quiet):
        pass

    Handler.timeout = timeout  # each read or write, on top of the connection's deadline
    return Handler


def serve(
    hostport: str,
    collector: Collector,
    health,
    supervisor_status=None,
    limit: int = 64,
    timeout: float = 5.0,
) -> Listener:
    """Start the metrics, health and status listener in a daemon thread; returns the server.

    ``health()`` gives the state ("ready", "starting", "stopping");
    ``supervisor_status()`` the supervisor's part of /status (None: no /status).
    """
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.process_collector import ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    if _HAVE_PROC:
        ProcessCollector(registry=registry)
    else:
        registry.register(SelfProcessCollector())

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            body = generate_latest(registry)
            start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
            return [body]
        if path == "/health":
            state = health()
            status = "200 OK" if state == "ready" else "503 Service Unavailable"
            start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
            return [state.encode() + b"\n"]
        if path == "/status" and supervisor_status is not None:
            import orjson

            doc = status_document(collector, supervisor_status())
            body = orjson.dumps(doc, option=orjson.OPT_APPEND_NEWLINE)
            start_response("200 OK", [("Content-Type", "application/json")])
            return [body]
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: try /metrics, /health or /status\n"]

    host, port = split_hostport(hostport)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server = Listener((host, port), family, limit, timeout)
    server.set_app(app)
    # poll often enough that a deadline is kept to within a fraction of a second
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                     name="metrics", daemon=True).start()  # fmt: skip
    return server
