"""Service integration: sd_notify with a real server, the systemd unit, the rc.d script."""

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from serverutil import Server

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "tools" / "systemd" / "pigeon.service"
RCD = ROOT / "tools" / "rc.d" / "pigeon"


def read_notify(sock: socket.socket, want: str, timeout: float = 30.0) -> dict:
    """Datagrams until one has the field ``want``; returns its fields."""
    sock.settimeout(timeout)
    while True:
        data = sock.recv(4096).decode()
        fields = dict(line.split("=", 1) for line in data.splitlines() if "=" in line)
        if want in fields:
            return fields


def test_sd_notify_ready_reloading_and_stopping(tmp_path, monkeypatch):
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        srv = Server(tmp_path / "data", workers=2).start()
        try:
            ready = read_notify(sock, "READY")
            assert ready["READY"] == "1" and int(ready["MAINPID"]) == srv.proc.pid
            assert ready["STATUS"].startswith(f"serving on 127.0.0.1:{srv.port}")

            async def ping():
                c = await srv.client()
                try:
                    await c.ping()
                finally:
                    await c.close()

            async def burst(n=40):
                # READY=1 of a reload means no old worker listens any more: a
                # client that connects now never gets the old one's 503
                await asyncio.gather(*(ping() for _ in range(n)))

            workers = set(srv.worker_pids())
            srv.proc.send_signal(signal.SIGHUP)  # a reload: RELOADING=1, then READY=1 again
            assert read_notify(sock, "RELOADING")["RELOADING"] == "1"
            again = read_notify(sock, "READY")
            assert again["STATUS"] == "serving (generation 1)"
            asyncio.run(burst())
            deadline = time.monotonic() + 20
            while workers & set(srv.worker_pids()) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not workers & set(srv.worker_pids())  # the old generation is gone
            asyncio.run(ping())
            srv.proc.send_signal(signal.SIGTERM)
            assert read_notify(sock, "STOPPING")["STOPPING"] == "1"
            assert srv.proc.wait(30) == 0
        finally:
            srv.stop()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is missing")
def test_systemd_unit_verifies(tmp_path):
    pigeon = shutil.which("pigeon", path=os.path.dirname(sys.executable)) or shutil.which("pigeon")
    assert pigeon, "the pigeon command is not installed next to this python"
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/pigeon serve" in text
    for needed in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "LimitNOFILE=",
                   "User=pigeon", "StateDirectory=pigeon", "--data-dir /var/lib/pigeon",
                   "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes"):  # fmt: skip
        assert needed in text, needed
    copy = tmp_path / "pigeon.service"
    copy.write_text(text.replace("/usr/local/bin/pigeon", pigeon))
    proc = subprocess.run(["systemd-analyze", "verify", str(copy)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    complaints = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "pigeon.service" in ln]
    assert proc.returncode == 0 and not complaints, proc.stdout + proc.stderr


def test_rcd_script_parses_and_has_what_rc_needs():
    for shell in ("sh", "dash"):
        if shutil.which(shell):
            proc = subprocess.run([shell, "-n", str(RCD)], capture_output=True, text=True)
            assert proc.returncode == 0, proc.stderr
    text = RCD.read_text()
    for needed in ('rcvar="pigeon_enable"', 'pidfile="/var/run/${name}.pid"', "load_rc_config",
                   'sig_reload="HUP"', "pigeon_flags", "pigeon_config", "pigeon_datadir",
                   "/usr/sbin/daemon", "run_rc_command"):  # fmt: skip
        assert needed in text, needed
    assert os.access(RCD, os.X_OK)


def test_a_second_server_on_the_same_data_dir_is_refused(tmp_path):
    srv = Server(tmp_path / "data", workers=1).start()
    try:
        second = Server(tmp_path / "data", workers=1)
        with pytest.raises(RuntimeError, match="did not become ready"):
            second.start()
        assert "another pigeon server is running with the data directory" in second.log_text()
        assert (tmp_path / "data" / "control.sock").exists()  # the first one's, untouched
    finally:
        assert srv.stop() == 0


def test_the_banner_names_the_metrics_address_and_where_codes_go(tmp_path):
    from serverutil import free_port

    mport = free_port()
    srv = Server(tmp_path / "data", workers=1, metrics_listen=f"127.0.0.1:{mport}").start()
    try:
        lines = srv.banner_lines
        assert lines[0].startswith(f"pigeon: serving on 127.0.0.1:{srv.port} with 1 workers")
        outbox = (tmp_path / "data").resolve() / "sms-outbox.txt"
        assert (
            f"pigeon: metrics on http://127.0.0.1:{mport}/metrics, "
            f"health on http://127.0.0.1:{mport}/health"
        ) in lines
        assert any("sms-gateway = log" in ln and str(outbox) in ln for ln in lines), lines
    finally:
        assert srv.stop() == 0
    # metrics off and codes sent by a webhook: nothing to point at
    srv = Server(tmp_path / "data2", workers=1, sms_gateway="webhook",
                 sms_webhook_url="http://127.0.0.1:9/sms").start()  # fmt: skip
    try:
        assert len(srv.banner_lines) == 1 and "serving on" in srv.banner_lines[0]
    finally:
        assert srv.stop() == 0


def _capped_lines(srv) -> list[dict]:
    import json

    out = []
    for line in srv.log_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("msg") == "connections capped by the open-files limit":
            out.append(rec)
    return out


def _soft_open_files(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    return int(line.split()[3])
    except OSError:
        return None  # no /proc (FreeBSD without linprocfs)
    return None


def test_open_files_warning_once_and_only_when_the_limit_is_too_small(tmp_path):
    import resource

    # A hard limit of 512 leaves 448 connections a worker: said once, by the supervisor,
    # not by every worker.
    srv = Server(tmp_path / "data", workers=2, open_files=512).start()
    try:
        capped = _capped_lines(srv)
        assert len(capped) == 1, capped
        assert capped[0]["open_files_limit"] == 512
        assert capped[0]["each_worker_accepts"] == 512 - 64
        assert capped[0]["max_connections"] == 100_000
    finally:
        assert srv.stop() == 0
    # A low soft limit under a hard one that is high enough: raised, and nothing said.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    wanted = min(100_000, room - 64)  # the default, where the hard limit allows it
    assert wanted > 1024
    srv = Server(tmp_path / "data3", workers=2, open_files=(256, hard), max_connections=wanted)
    srv.start()
    try:
        assert _capped_lines(srv) == []
        for pid in srv.worker_pids():
            soft = _soft_open_files(pid)
            assert soft is None or soft >= wanted + 64, (pid, soft)
    finally:
        assert srv.stop() == 0
