"""bench/locustfile.py under real locust, headless, against a real server on loopback."""

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from serverutil import Server

from pigeon.server.provision import provision
from pigeon.server.store import Store

LOCUSTFILE = Path(__file__).resolve().parents[1] / "bench" / "locustfile.py"

# Never import locust here: it monkey-patches the whole process for gevent
# (select.epoll goes), which would break the trio tests that run later.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("locust") is None, reason="locust is in the test and bench extras"
)


def test_locust_users_log_in_send_and_receive(tmp_path):
    srv = Server(tmp_path / "data", workers=2).start()
    try:
        store = Store(str(srv.data_dir / "store"), map_size=256 << 20)
        try:
            provision(store, 12, str(tmp_path / "creds.jsonl"))
        finally:
            store.close()
        proc = subprocess.run(
            [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
             "-u", "10", "-r", "10", "-t", "6s", "--host", f"tcp://127.0.0.1:{srv.port}",
             "--creds", str(tmp_path / "creds.jsonl"), "--csv", str(tmp_path / "run"),
             "--only-summary", "--stop-timeout", "5"],
            capture_output=True, text=True, timeout=120, cwd=tmp_path,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        with open(tmp_path / "run_stats.csv") as f:
            rows = {r["Name"]: r for r in csv.DictReader(f)}
        assert int(rows["login"]["Request Count"]) == 10
        for name in ("login", "send-to-ack", "send-to-delivery"):
            assert int(rows[name]["Failure Count"]) == 0, rows[name]
        assert int(rows["send-to-ack"]["Request Count"]) >= 20
        assert int(rows["send-to-delivery"]["Request Count"]) >= 10
    finally:
        assert srv.stop() == 0
