"""The metrics and health listener of a real server, scraped during traffic."""

import asyncio
import http.client
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from serverutil import Server, free_port, until

from pigeon.client import ServerError

ALICE, BOB, CAROL = "491701234567", "4915112345678", "447700900123"


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(port: int) -> dict:
    status, text = get(port, "/metrics")
    assert status == 200
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}"
                            if s.labels else "")  # fmt: skip
            out[key] = s.value
    return out


def test_metrics_during_traffic_and_across_a_worker_restart(tmp_path):
    port = free_port()
    srv = Server(tmp_path / "data", workers=2, metrics_listen=f"127.0.0.1:{port}").start()

    async def main():
        assert get(port, "/health") == (200, "ready\n")
        assert get(port, "/nope")[0] == 404
        alice = await srv.login(await srv.register(ALICE))
        await srv.register(BOB)  # offline: what alice sends waits in bob's queue
        for _ in range(7):
            await alice.send(BOB, b"x" * 100)
        with pytest.raises(ServerError):
            await alice.send(CAROL, b"x")  # 400
        m = {}

        def settled():  # workers send their counts every second
            m.update(scrape(port))
            return m.get("pigeon_messages_in_total") == 7 and m.get("pigeon_logins_total") == 1

        await until(settled, timeout=15)
        assert m["pigeon_queue_entries"] == 7 and m["pigeon_queue_devices"] == 1
        assert m["pigeon_queue_bytes"] > 700 and m["pigeon_queue_oldest_seconds"] >= 0
        assert m["pigeon_errors_total{code=400}"] == 1
        assert m["pigeon_commit_seconds_count"] >= 1 and m["pigeon_commit_seconds_sum"] > 0
        assert 0 < m["pigeon_store_used_bytes"] <= m["pigeon_store_map_bytes"]
        assert sum(v for k, v in m.items() if k.startswith("pigeon_connections{")) >= 1
        assert "pigeon_loop_lag_seconds{generation=0,worker=0}" in m
        # a worker killed and restarted: its counts stay in the totals
        old = srv.worker_pid(0)
        os.kill(old, signal.SIGKILL)
        await until(lambda: old not in srv.worker_pids() and get(port, "/health")[0] == 200,
                    timeout=30)  # fmt: skip
        after = scrape(port)
        assert after["pigeon_messages_in_total"] >= 7 and after["pigeon_logins_total"] >= 1
        await alice.close()
        # a reload: the new workers keep their index in ``worker`` (dashboards' series go
        # on), ``generation`` tells them from the old ones (it said worker=1024 before)
        srv.proc.send_signal(signal.SIGHUP)
        await until(lambda: srv.log_text().count('"old worker drained"') >= 2, timeout=60)

        def reloaded():
            m.clear()
            try:
                m.update(scrape(port))
            except (OSError, AssertionError, http.client.HTTPException):
                return False  # (the listener answers 503 while the reload settles)
            return "pigeon_loop_lag_seconds{generation=1,worker=1}" in m

        await until(reloaded, timeout=15)
        for name in ("pigeon_worker_cpu_seconds_total", "pigeon_worker_open_fds"):
            assert sorted(k for k in m if k.startswith(name + "{")) == [
                f"{name}{{generation=1,worker={i}}}" for i in (0, 1)
            ]

    try:
        asyncio.run(asyncio.wait_for(main(), 90))
    finally:
        assert srv.stop() == 0


def test_health_flips_during_startup_and_shutdown(tmp_path):
    port, mport = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pigeon.tools.cli", "serve", "--workers", "2",
         "--listen", f"127.0.0.1:{port}", "--metrics-listen", f"127.0.0.1:{mport}",
         "--media-listen", "off", "--data-dir", str(tmp_path / "data"),
         "--map-size", str(64 << 20)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        seen = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "ready\n" not in seen:
            try:
                seen.append(get(mport, "/health")[1])
            except OSError:
                time.sleep(0.005)
        assert "starting\n" in seen and seen[-1] == "ready\n", seen[-5:]
        proc.send_signal(signal.SIGTERM)
        states = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                states.append(get(mport, "/health"))
            except OSError:
                states.append("refused")
        assert (503, "stopping\n") in states, states[-5:]
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_a_busy_metrics_port_is_a_clear_startup_error(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        mport = busy.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "pigeon.tools.cli", "serve", "--listen",
             f"127.0.0.1:{free_port()}", "--metrics-listen", f"127.0.0.1:{mport}",
             "--media-listen", "off", "--data-dir", str(tmp_path / "data")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{mport} (metrics-listen)" in proc.stderr
    assert "metrics-listen = off" in proc.stderr


def _stalled(port: int, request: bytes = b"GET /health HTTP/1.1\r\n"):
    """A client that sends part of a request and then nothing (it never finishes)."""
    import socket

    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(request)
    return s


def test_stalled_clients_do_not_block_health_or_metrics(tmp_path):
    import platform
    import socket

    from pigeon.core import __version__
    from pigeon.core import codec as core_codec

    port = free_port()
    # the timeout is long: what keeps /health answering is concurrency, not the timeout
    srv = Server(tmp_path / "data", workers=2, metrics_listen=f"127.0.0.1:{port}",
                 metrics_timeout=120, metrics_connections=8).start()  # fmt: skip
    stalled = []
    try:
        stalled = [_stalled(port), _stalled(port, b"GE"), _stalled(port, b"")]
        for _ in range(3):
            assert get(port, "/health") == (200, "ready\n")
        m = scrape(port)
        # process figures: the supervisor (prometheus-client's ProcessCollector) and each worker
        assert m["process_cpu_seconds_total"] > 0 and m["process_resident_memory_bytes"] > 0
        assert m["process_open_fds"] > 0
        for wid in (0, 1):
            w = f"{{generation=0,worker={wid}}}"
            assert m[f"pigeon_worker_cpu_seconds_total{w}"] > 0
            assert m[f"pigeon_worker_resident_memory_bytes{w}"] > 1 << 20
            assert m[f"pigeon_worker_open_fds{w}"] >= 3
        info = (f"pigeon_build_info{{codec={core_codec.IMPLEMENTATION},"
                f"python={platform.python_version()},version={__version__}}}")  # fmt: skip
        assert m[info] == 1
        # past metrics-connections, a new connection is closed at once (the stalled ones stay)
        stalled += [_stalled(port) for _ in range(5)]  # 8 held now
        with socket.create_connection(("127.0.0.1", port), timeout=10) as extra:
            try:
                assert extra.recv(100) == b""
            except ConnectionResetError:
                pass
        stalled.pop().close()  # one slot free again: served
        # (the server notices the close when its read fails; allow it a bounded moment)
        asyncio.run(asyncio.wait_for(_until_health(port), 30))
    finally:
        for s in stalled:
            s.close()
        assert srv.stop() == 0


async def _until_health(port):
    def ok():
        try:
            return get(port, "/health")[0] == 200
        except OSError:
            return False

    await until(ok, timeout=20)


def test_a_stalled_metrics_client_is_closed_after_metrics_timeout(tmp_path):
    port = free_port()
    srv = Server(tmp_path / "data", workers=1, metrics_listen=f"127.0.0.1:{port}",
                 metrics_timeout=1).start()  # fmt: skip
    try:
        # a slow client that keeps trickling bytes is held to the deadline too, not per read
        with _stalled(port, b"G") as s:
            closed = False
            for _ in range(40):  # bounded: 40 x 0.5 s
                time.sleep(0.5)
                try:
                    s.sendall(b"E")
                    s.settimeout(0.01)
                    if s.recv(100) == b"":
                        closed = True
                        break
                except TimeoutError:
                    continue
                except OSError:
                    closed = True
                    break
            assert closed, "the server kept a trickling client open"
        assert get(port, "/health") == (200, "ready\n")
    finally:
        assert srv.stop() == 0


def test_process_figures_from_proc_agree_with_psutil():
    """The /proc reader (Linux) and the psutil one (FreeBSD) measure the same process alike."""
    import psutil

    from pigeon.server import metrics

    sum(i * i for i in range(2_000_000))  # some CPU time to measure
    via_proc, via_psutil = metrics.proc_figures(os.getpid()), metrics.psutil_figures(os.getpid())
    assert via_proc is not None and via_psutil is not None
    (cpu1, rss1, fds1), (cpu2, rss2, fds2) = via_proc, via_psutil
    assert cpu1 > 0 and abs(cpu1 - cpu2) < 1.0
    assert abs(rss1 - rss2) < 16 << 20 and abs(fds1 - fds2) <= 2
    gone = psutil.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert metrics.proc_figures(gone.pid) is None and metrics.psutil_figures(gone.pid) is None
