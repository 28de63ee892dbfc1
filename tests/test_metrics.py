"""The metrics and health listener of a real server, scraped during traffic."""

import asyncio
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
        assert "pigeon_loop_lag_seconds{worker=0}" in m
        # a worker killed and restarted: its counts stay in the totals
        old = srv.worker_pid(0)
        os.kill(old, signal.SIGKILL)
        await until(lambda: old not in srv.worker_pids() and get(port, "/health")[0] == 200,
                    timeout=30)  # fmt: skip
        after = scrape(port)
        assert after["pigeon_messages_in_total"] >= 7 and after["pigeon_logins_total"] >= 1
        await alice.close()

    try:
        asyncio.run(asyncio.wait_for(main(), 90))
    finally:
        assert srv.stop() == 0


def test_health_flips_during_startup_and_shutdown(tmp_path):
    port, mport = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pigeon.tools.cli", "serve", "--workers", "2",
         "--listen", f"127.0.0.1:{port}", "--metrics-listen", f"127.0.0.1:{mport}",
         "--data-dir", str(tmp_path / "data"), "--map-size", str(64 << 20)],
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
             "--data-dir", str(tmp_path / "data")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{mport} (metrics-listen)" in proc.stderr
    assert "metrics-listen = off" in proc.stderr
