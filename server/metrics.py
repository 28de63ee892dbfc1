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

Queue figures and LMDB map use are read from the store at scrape time
(cached for a second), so they are right even with a worker down.
"""

from __future__ import annotations

import bisect
import socket
import threading
import time
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

SNAPSHOT_INTERVAL = 1.0

#: Upper bounds of the commit-latency histogram, seconds.
COMMIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                  0.25, 1.0)  # fmt: skip

COUNTERS = {
    "logins": "devices logged in",
    "login_failures": "failed logins (a bad proof, or a challenge never answered)",
    "login_refused": "logins refused at once: too many failures from the address (error 302)",
    "client_logs_suppressed": "log lines about client misbehaviour not written (client-log-lines)",
    "messages_in": "messages and read receipts accepted from clients (stored)",
    "entries_out": "queue entries pushed to devices (messages and receipts)",
    "device_acks": "cumulative acks received from devices",
    "commits": "group commits (write transactions of queued work)",
    "presence_changes": "users whose presence (or who may see it) changed, noted to the workers",
    "presence_pushes": "presence updates pushed to subscribers",
    "typing": "typing indicators routed (to online devices; never stored)",
    "rate_limited": "nodes refused or dropped by a per-connection rate limit (error 405)",
}


class WorkerStats:
    """What one worker counts; ``snapshot()`` is what it sends its supervisor."""

    def __init__(self):
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.errors: dict[int, int] = {}
        self.commit_buckets = [0] * (len(COMMIT_BUCKETS) + 1)
        self.commit_sum = 0.0
        self.loop_lag = 0.0

    def error(self, code: int) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    def commit(self, seconds: float) -> None:
        self.counters["commits"] += 1
        self.commit_sum += seconds
        self.commit_buckets[bisect.bisect_left(COMMIT_BUCKETS, seconds)] += 1

    def snapshot(self, connections: int) -> dict:
        return {
            "c": self.counters,
            "e": {str(k): v for k, v in self.errors.items()},
            "h": self.commit_buckets,
            "hs": self.commit_sum,
            "lag": self.loop_lag,
            "conns": connections,
        }


class Aggregate:
    """The supervisor's view: latest snapshot per worker plus what exited workers counted."""

    def __init__(self):
        self.latest: dict[int, dict] = {}
        self.retired = {"c": dict.fromkeys(COUNTERS, 0), "e": {}, "h": [0] * (len(COMMIT_BUCKETS) + 1),
                        "hs": 0.0}  # fmt: skip
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


class Collector:
    """prometheus-client collector over an Aggregate and the store."""

    def __init__(self, aggregate: Aggregate, store_path: str, map_size: int):
        self.aggregate = aggregate
        self.store_path = store_path
        self.map_size = map_size
        self._store_cache: tuple[float, dict] | None = None

    def _store_figures(self) -> dict:
        now = time.monotonic()
        if self._store_cache and now - self._store_cache[0] < 1.0:
            return self._store_cache[1]
        from .queues import Queues
        from .store import Store

        store = Store(self.store_path, map_size=self.map_size, create=False)
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
        g = GaugeMetricFamily("pigeon_connections", "open client connections", labels=["worker"])
        for index, n in sorted(conns.items()):
            g.add_metric([str(index)], n)
        yield g
        g = GaugeMetricFamily("pigeon_loop_lag_seconds",
                              "event-loop lag of each worker (latest sample)", labels=["worker"])  # fmt: skip
        for index, v in sorted(lag.items()):
            g.add_metric([str(index)], v)
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


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args) -> None:  # scrapes are not log events
        pass


def serve(hostport: str, collector: Collector, health) -> WSGIServer:
    """Start the metrics and health listener in a daemon thread; returns the server."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)

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
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: try /metrics or /health\n"]

    host, _, port = hostport.rpartition(":")
    host = host.strip("[]")

    class Server(WSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    server = make_server(host, int(port), app, server_class=Server, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
