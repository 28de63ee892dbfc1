"""``pigeon admin provision`` and ``pigeon bench`` end to end (tiny loads: a smoke test, not a measurement)."""

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from serverutil import Server

from pigeon.client import Credentials
from pigeon.tools.cli import main

REQUIRED = {
    "sent", "acked", "delivered", "lost", "duplicated", "redelivered_on_wire", "server_user_s",
    "server_sys_s", "server_cpu_us_per_msg", "server_user_us_per_msg", "msgs_per_s",
    "per_core_msgs_per_s", "p50_ms", "p99_ms", "p999_ms", "server_peak_rss_kib", "window",
    "sync", "receipts", "profile", "machine",
}  # fmt: skip


def pigeon(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "pigeon.tools.cli", *args],
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_throughput_json_counts_every_message():
    proc = pigeon("bench", "throughput", "--clients", "6", "--messages", "25", "--window", "4",
                  "--workers", "2", "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1  # exactly one JSON object
    r = orjson.loads(lines[0])
    assert REQUIRED <= set(r)
    assert (r["sent"], r["acked"], r["delivered"], r["lost"], r["duplicated"]) == (
        150,
        150,
        150,
        0,
        0,
    )
    assert r["profile"] == "bench" and r["window"] == 4
    assert (r["sync"], r["receipts"]) == ("os", True)
    # read from schedstat (ns) where Linux has it; else 6 logins can fall inside one
    # 10 ms CPU-clock tick
    assert (
        r["login_cpu_ms"] > 0 if os.path.exists("/proc/self/schedstat") else r["login_cpu_ms"] >= 0
    )
    assert (r["receipts_received"], r["receipts_missing"], r["receipts_duplicated"]) == (150, 0, 0)
    # (150 messages can take less CPU than one 10 ms clock tick of the OS counters)
    assert r["server_cpu_us_per_msg"] >= 0 and r["p50_ms"] <= r["p99_ms"] <= r["p999_ms"]
    assert r["machine"]["cores"] >= 1


def test_a_bench_runs_beside_another_server_on_the_default_ports():
    """The bench's server takes free ports only: a process holding the media
    service's default port (127.0.0.1:7652: another pigeon here) does not stop it."""
    import socket

    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", 7652))
        holder.listen()
    except OSError:  # already taken by something else: the same situation
        pass
    try:
        proc = pigeon("bench", "throughput", "--clients", "2", "--messages", "3", "--workers", "1",
                      "--json")  # fmt: skip
    finally:
        holder.close()
    assert proc.returncode == 0, proc.stderr
    assert orjson.loads(proc.stdout)["lost"] == 0


def test_throughput_with_several_devices_per_user_counts_every_copy():
    """3 devices a user: each message is 3 copies to the recipient's devices and 2
    sync copies to the sender's others, every one counted at a device."""
    proc = pigeon("bench", "throughput", "--clients", "4", "--messages", "10", "--window", "2",
                  "--workers", "2", "--devices-per-user", "3", "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    r = orjson.loads(proc.stdout)
    assert (r["acked"], r["delivered"], r["lost"], r["devices_per_user"]) == (40, 40, 0, 3)
    assert (r["device_copies_delivered"], r["device_copies_missing"]) == (200, 0)
    assert r["receipts_missing"] == 0 and r["server_cpu_us_per_copy"] >= 0


def test_throughput_without_receipts_with_fsync():
    proc = pigeon("bench", "throughput", "--clients", "4", "--messages", "10", "--window", "2",
                  "--workers", "1", "--sync", "fsync", "--no-receipts", "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    r = orjson.loads(proc.stdout)
    assert (r["delivered"], r["lost"], r["sync"], r["receipts"]) == (40, 0, "fsync", False)
    assert (r["receipts_received"], r["receipts_missing"]) == (0, None)


def test_latency_fixed_rate_and_report(tmp_path):
    out = tmp_path / "lat.json"
    proc = pigeon("bench", "latency", "--clients", "6", "--rate", "200", "--seconds", "1",
                  "--workers", "2", "--json", "--plot", str(tmp_path / "lat.png"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    r = orjson.loads(proc.stdout)
    assert (r["bench"], r["rate"], r["sent"], r["acked"], r["delivered"], r["lost"]) == (
        "latency", 200, 200, 200, 200, 0,
    )  # fmt: skip
    assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["p999_ms"] <= r["max_ms"]
    assert r["latency_cdf"][0][1] == 0 and r["latency_cdf"][-1][1] > 0.999
    assert (tmp_path / "lat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out.write_text(proc.stdout)
    tp = pigeon("bench", "throughput", "--clients", "4", "--messages", "5", "--window", "2",
                "--workers", "1", "--json")  # fmt: skip
    (tmp_path / "tp.json").write_text(tp.stdout)
    rep = pigeon("bench", "report", str(out), str(tmp_path / "tp.json"),
                 "--out", str(tmp_path / "report.png"))  # fmt: skip
    assert rep.returncode == 0, rep.stderr
    assert (tmp_path / "report.png").stat().st_size > 10_000
    bad = pigeon("bench", "report", str(tmp_path / "nothing.json"), "--out", "x.png")
    assert bad.returncode == 1 and "cannot read" in bad.stderr


def test_find_max_rate_is_bounded_and_reports_every_run():
    proc = pigeon("bench", "latency", "--clients", "4", "--rate", "100", "--seconds", "0.5",
                  "--find-max-rate", "0.001", "--workers", "1", "--load-procs", "2", "--json")  # fmt: skip
    # a 1 us p99 bound is never met: no rate qualifies, and the search stops by itself
    r = orjson.loads(proc.stdout)
    assert r["max_rate"] is None and 1 <= len(r["runs"]) <= 10 and r["load_processes"] == 2
    for run in r["runs"]:  # every run's messages, split over both processes, all counted
        assert run["lost"] == 0 and run["sent"] == int(run["rate"] * 0.5)
        assert run["latencies"] == run["delivered"] == run["sent"]


FLOOR_FIELDS = {
    "rate", "sent", "delivered", "lost", "achieved_msgs_per_s", "p50_ms", "p99_ms", "p999_ms",
    "max_ms", "latencies", "load_cpu_us_per_msg", "load_cpu_busiest_pct", "floor_cpu_us_per_msg",
    "load_processes", "load_pacer", "latency_cdf",
}  # fmt: skip


def test_latency_merges_every_load_process_and_measures_the_floor():
    """Two load processes share the rate; the latencies of both are merged (one sample
    per delivered message, whoever received it); --floor then runs the same load
    against bench/floor.py and reports it beside the server's figures."""
    from pigeon.bench.harness import _human

    proc = pigeon("bench", "latency", "--clients", "6", "--rate", "200", "--seconds", "1",
                  "--workers", "1", "--load-procs", "2", "--floor", "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    r = orjson.loads(proc.stdout)
    assert (r["load_processes"], r["sent"], r["delivered"], r["lost"]) == (2, 200, 200, 0)
    assert r["latencies"] == r["delivered"] and r["receipts_missing"] == 0
    assert r["load_cpu_us_per_msg"] >= 0 and 0 <= r["load_cpu_busiest_pct"]
    assert r["server_cpu_us_per_msg"] > 0 and r["p50_ms"] <= r["p99_ms"] <= r["p999_ms"]
    f = r["load_floor"]
    assert FLOOR_FIELDS <= set(f) and f["stalled"] is None
    assert (f["rate"], f["sent"], f["delivered"], f["lost"], f["load_processes"]) == (
        200, 200, 200, 0, 2,
    )  # fmt: skip
    assert f["latencies"] == 200 and 0 < f["p50_ms"] <= f["p99_ms"] <= f["p999_ms"]
    assert f["achieved_msgs_per_s"] > 0 and f["floor_cpu_us_per_msg"] >= 0
    assert f["load_pacer"] in ("timerfd", "loop timer")
    lines = _human(r).splitlines()
    assert lines[3].startswith("load CPU ") and "busiest of 2 load processes" in lines[3]
    assert lines[4].startswith("load floor, the same load against a trivial router")
    assert "load floor (bench/floor.py):" in lines


def test_floor_bench_alone():
    proc = pigeon("bench", "floor", "--clients", "4", "--rate", "100", "--seconds", "0.5",
                  "--load-procs", "2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("floor: 50 messages sent at 100.0 msg/s"), proc.stdout
    assert ", 50 delivered, 0 lost" in lines[0]
    assert lines[1].startswith("the load tool's own send-to-delivery p50 ")
    assert "busiest of 2 load processes" in lines[2] and "the router's CPU" in lines[2]


def test_floor_server_speaks_the_protocol(tmp_path):
    """bench/floor.py with the real SDK: SCRAM login (the SDK checks the server's proof),
    message -> ack and delivery, device ack -> delivered receipt, a delivery kept for a
    user not connected yet, ping, a clear error for what it does not do, a wrong
    secret refused."""
    from pigeon.bench.floor import write_credentials
    from pigeon.bench.harness import ServerUnderTest
    from pigeon.client import Client, ServerError
    from pigeon.core.events import IncomingMessage, IncomingReceipt

    path = tmp_path / "creds.jsonl"
    creds = write_credentials(3, str(path))
    assert path.stat().st_mode & 0o777 == 0o600
    floor = ServerUnderTest()
    floor.start_floor(str(path))
    host, _, port = floor.target.rpartition(":")

    async def login(k, secret=None):
        c = await Client.connect(host, int(port), plaintext=True)
        await c.login(Credentials(creds[k]["device"],
                                  secret or bytes.fromhex(creds[k]["secret"])))  # fmt: skip
        return c

    async def talk():
        a, b = await login(0), await login(1)
        ack = await a.send(creds[1]["phone"], b"hello")
        ev = await b.next_event(10)
        assert type(ev) is IncomingMessage
        assert (ev.sender, ev.id, ev.body, ev.seq) == (creds[0]["device"], ack.id, b"hello", 1)
        await b.ack(ev.seq)
        rc = await a.next_event(10)
        assert type(rc) is IncomingReceipt
        assert (rc.sender, rc.id, rc.type, rc.seq) == (creds[1]["phone"], ack.id, "delivered", 1)
        await a.ack(rc.seq)
        await a.ping(10)
        with pytest.raises(ServerError) as refused:
            await a.privacy(timeout=10)
        assert refused.value.code == 201 and "floor" in refused.value.text
        later = await a.send(creds[2]["phone"], b"later")
        c = await login(2)
        ev = await c.next_event(10)
        assert (ev.id, ev.body) == (later.id, b"later")
        with pytest.raises(ServerError) as wrong:
            await login(0, secret=bytes(32))
        assert wrong.value.code == 300
        for x in (a, b, c):
            await x.close()

    try:
        asyncio.run(asyncio.wait_for(talk(), 60))
    finally:
        floor.stop()
    assert floor.proc.returncode is not None


def test_floor_without_receipts_sends_none(tmp_path):
    """``--no-receipts``: the floor of ``bench throughput --no-receipts`` (whose
    server sends no delivered receipts) does not send them either."""
    from pigeon.bench.floor import write_credentials
    from pigeon.bench.harness import ServerUnderTest
    from pigeon.client import Client

    creds = write_credentials(2, str(tmp_path / "creds.jsonl"))
    floor = ServerUnderTest()
    floor.start_floor(str(tmp_path / "creds.jsonl"), receipts=False)
    host, _, port = floor.target.rpartition(":")

    async def talk():
        a, b = [await Client.connect(host, int(port), plaintext=True) for _ in range(2)]
        for c, k in ((a, 0), (b, 1)):
            await c.login(Credentials(creds[k]["device"], bytes.fromhex(creds[k]["secret"])))
        for i in range(3):
            await a.send(creds[1]["phone"], b"m%d" % i)
        for i in range(3):
            ev = await b.next_event(10)
            assert ev.body == b"m%d" % i
            await b.ack(ev.seq)
        await a.ping(10)  # the acks were handled before this pong
        await b.ping(10)
        await a.ping(10)
        with pytest.raises(TimeoutError):
            await a.next_event(0.5)  # no receipt came
        await a.close()
        await b.close()

    try:
        asyncio.run(asyncio.wait_for(talk(), 60))
    finally:
        floor.stop()


def test_pacer_wakes_at_the_deadline_and_never_spins(monkeypatch):
    """The open-loop sender waits with bench/pacer.py.  Its kernel timer fires once, at
    the deadline, never before; without one, the fallback sleeps at least a
    millisecond at a time: uvloop rounds shorter sleeps to 0 ms, and a sender
    sleeping "the 0.3 ms left" spins the loop at 100% CPU."""
    import time

    import uvloop

    from pigeon.bench import pacer

    async def wait(ms: float) -> tuple[str, int]:
        p = pacer.Pacer()
        due, wakes = time.monotonic_ns() + int(ms * 1e6), 0
        try:
            while time.monotonic_ns() < due:  # the sender's loop: check the clock, wait
                await p.until(due)
                wakes += 1
        finally:
            p.close()
        return p.kind, wakes

    kind, wakes = uvloop.run(wait(20))
    if sys.platform.startswith("linux"):
        assert kind == "timerfd"
    if kind == "timerfd":
        assert wakes == 1

    def no_timerfd():
        raise OSError("no timerfd here")

    monkeypatch.setattr(pacer, "_TimerFD", no_timerfd)
    for ms in (20, 2.4, 0.3):
        kind, wakes = uvloop.run(wait(ms))
        assert kind == "loop timer" and 1 <= wakes <= 5, (ms, wakes)


def test_idle_json():
    proc = pigeon("bench", "idle", "--clients", "20", "--workers", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    r = orjson.loads(proc.stdout)
    assert r["memory_method"] in ("pss", "rss") and r["clients"] == 20
    assert r["server_memory_after_kib"] > 0


def test_link_json_counts_every_link():
    """6 primaries each link a companion by QR code through the SDK (2 workers):
    every link completes, and the server CPU per link is reported."""
    proc = pigeon("bench", "link", "--links", "6", "--window", "2", "--workers", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1  # exactly one JSON object
    r = orjson.loads(lines[0])
    assert (r["bench"], r["links"], r["links_completed"], r["links_failed"]) == ("link", 6, 6, 0)
    assert r["errors"] == {} and (r["workers"], r["window"]) == (2, 2)
    assert {"pair_per_ip", "pair_per_address", "link_per_account"} <= set(r["limits_lifted"])
    # (6 links can take less CPU than one 10 ms clock tick of the OS counters)
    assert r["server_cpu_us_per_link"] >= 0 and 0 < r["link_p50_ms"] <= r["link_p99_ms"]
    assert r["machine"]["cores"] >= 1


GROUP_KEYS = {"members", "lost", "duplicated", "server_cpu_us_per_msg",
              "server_cpu_us_per_recipient", "store_bytes_per_msg", "p50_ms", "p99_ms",
              "machine", "workers", "sync"}  # fmt: skip


@pytest.mark.parametrize("offline", ["0", "0.9"])
def test_group_json_counts_every_member(offline):
    """8 members over 2 workers, 5 group messages: every online member got each one and
    (with 90% offline) every offline member's queue holds each one."""
    # (bodies of 3,000 bytes: 5 messages of 100 fit in the free room of the pages the
    # group's notices already hold, and the pages in use would not move)
    proc = pigeon("bench", "group", "--members", "8", "--messages", "5", "--workers", "2",
                  "--offline-fraction", offline, "--size", "3000", "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1  # exactly one JSON object
    r = orjson.loads(lines[0])
    assert GROUP_KEYS <= set(r)
    assert (r["members"], r["acked"], r["lost"], r["duplicated"]) == (8, 5, 0, 0)
    assert r["offline_members"] == (6 if offline == "0.9" else 0)
    assert 0 < r["p50_ms"] <= r["p99_ms"] and r["server_cpu_us_per_msg"] >= 0
    if offline == "0.9":  # the offline members' references (and the bodies) stay
        assert r["store_bytes_per_msg"] > 0


def test_group_runs_past_the_strangers_share_of_a_queue():
    """1,001 messages to offline members: the bench profile lifts stranger-queue-count
    (1,000) too, as it lifts the other anti-spam limits (the run failed with one
    failed member at the 1,000th message)."""
    proc = pigeon("bench", "group", "--members", "4", "--messages", "1001", "--workers", "2",
                  "--offline-fraction", "0.9", "--size", "10", "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    r = orjson.loads(proc.stdout.strip().splitlines()[0])
    assert (r["acked"], r["lost"], r["duplicated"], r["offline_members"]) == (1001, 0, 0, 2)
    assert "stranger_queue_count" in r["limits_lifted"]


def test_media_json_moves_every_byte():
    """3 devices upload and download a 300 KiB file each (2 workers, the media process):
    the figures the issue names are there, no errors, and curl's baseline beside them."""
    proc = pigeon("bench", "media", "--size", "300KiB", "--parallel", "3", "--workers", "2",
                  "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    r = orjson.loads(lines[0])
    assert (r["bench"], r["size_bytes"], r["parallel"], r["errors"]) == ("media", 307200, 3, {})
    assert r["upload_mb_per_s"] > 0 and r["download_mb_per_s"] > 0
    assert r["server_cpu_s_per_gb"] >= 0
    if "baseline" in r:  # curl is installed
        assert r["baseline"]["bytes"] == r["download_curl"]["bytes"] == 3 * 307200


@pytest.mark.parametrize(
    "args, message",
    [
        (["--target", "127.0.0.1:7650"], "--target and --server-pid go together"),
        (["--clients", "1"], "--clients must be at least 2"),
        (["--target", "127.0.0.1:7650", "--server-pid", "1"], "--target needs --creds"),
        # '[::1' was not checked: the load processes were started and exited with status 1
        (
            ["--target", "[::1", "--server-pid", "1", "--creds", "c"],
            "--target: an IPv6 address must be in brackets (e.g. [::1]:7650), got '[::1'",
        ),
        (["link", "--links", "0"], "--links must be at least 1"),
        (["link", "--window", "0"], "--window must be at least 1"),
        (["media", "--parallel", "0"], "--parallel must be at least 1"),
    ],
)
def test_bench_usage_errors(capsys, args, message):
    bench = [] if args[0] in ("link", "media") else ["throughput"]
    assert main(["bench", *bench, *args]) == 2
    assert message in capsys.readouterr().err


def test_provisioned_devices_log_in(tmp_path, capsys):
    data = tmp_path / "data"
    out = tmp_path / "creds.jsonl"
    assert main(["admin", "provision", "--count", "3", "--out", str(out), "--data-dir", str(data),
                 "--prefix", "4477"]) == 0  # fmt: skip
    assert "provisioned 3 accounts" in capsys.readouterr().out
    assert out.stat().st_mode & 0o777 == 0o600
    creds = [orjson.loads(line) for line in out.read_text().splitlines()]
    assert [c["phone"] for c in creds] == ["447700000000", "447700000001", "447700000002"]
    assert main(["admin", "provision", "--count", "3", "--out", str(out), "--data-dir", str(data),
                 "--prefix", "12345678"]) == 2  # fmt: skip
    assert "--prefix must be 1 to 7 digits" in capsys.readouterr().err
    srv = Server(data, workers=1).start()

    async def login_and_talk():
        a, b = creds[0], creds[1]
        ca = await srv.client()
        cb = await srv.client()
        await ca.login(Credentials(a["device"], bytes.fromhex(a["secret"])))
        await cb.login(Credentials(b["device"], bytes.fromhex(b["secret"])))
        ack = await ca.send(b["phone"], b"provisioned")
        ev = await cb.next_event(10)
        assert ev.id == ack.id
        await ca.close()
        await cb.close()

    try:
        asyncio.run(asyncio.wait_for(login_and_talk(), 60))
    finally:
        assert srv.stop() == 0


def test_summarize_compares_with_a_baseline(tmp_path, capsys):
    from pigeon.bench.summarize import main as summarize

    def run_json(path, py_median, fast_median):
        benches = [
            {"name": f"test_enqueue[{impl}]", "stats": {"median": m}, "extra_info": {"frames": 256}}
            for impl, m in (("python", py_median), ("fastpath", fast_median))
        ]
        path.write_bytes(orjson.dumps({"benchmarks": benches, "machine_info": {}}))
        return str(path)

    old = run_json(tmp_path / "old.json", 0.002, 0.001)
    new = run_json(tmp_path / "new.json", 0.002, 0.0005)
    assert summarize([new, "--baseline", old]) == 0
    row = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| test_enqueue")]
    assert row == ["| test_enqueue | 128,000 | 512,000 | 4.0x | 1.00 | 2.00 |"]
    assert summarize([str(tmp_path / "missing.json")]) == 1


def _bench_server(tmp_path, count):
    """A 2-worker server with the bench profile and ``count`` provisioned accounts."""
    from pigeon.bench.harness import BENCH_PROFILE

    data, creds = tmp_path / "data", tmp_path / "creds.jsonl"
    assert main(["admin", "provision", "--count", str(count), "--out", str(creds),
                 "--data-dir", str(data)]) == 0  # fmt: skip
    return Server(data, workers=2, **BENCH_PROFILE).start(), creds


def test_load_process_reports_progress_while_sending(tmp_path):
    """Progress lines come while the sends go on (400,000 messages are far from done
    when the first acks are in), the harness takes them in, and a stop word in the
    middle of the run gets the result at once, with what is still unacked."""
    from pigeon.bench.harness import LoadProc, _watch

    srv, creds = _bench_server(tmp_path, 4)
    lp = LoadProc(["--target", f"127.0.0.1:{srv.port}", "--creds", str(creds), "--first", "0",
                   "--last", "4", "--messages", "100000", "--window", "4",
                   "--progress-interval", "0.1"], (0, 4))  # fmt: skip
    try:
        assert lp.line(60) == "ready"
        lp.say("go")
        acked_counts = set()

        def three_progress_lines_with_acks() -> bool:
            acked_counts.add(lp.progress["acked"])
            return len(acked_counts - {0}) >= 3

        assert _watch([lp], three_progress_lines_with_acks, stall_timeout=30)
        assert lp.sent_done is None  # still sending
        p = lp.progress
        assert 0 < p["acked"] <= p["sent"] <= p["acked"] + 16 and p["errors"] == 0
        lp.say("stop")
        r = orjson.loads(lp.line(30))
        assert r["stopped_early"] and 0 < len(r["acked"]) < 400_000
        assert r["sent"] == len(r["acked"]) + len(r["unacked"]) and len(r["unacked"]) <= 16
        assert all(k >> 32 < 4 for k in r["unacked"])  # (client, n) of this process's clients
    finally:
        lp.close()
        assert srv.stop() == 0


def test_stalled_run_stops_and_names_the_missing_messages(tmp_path):
    """The server's workers are stopped (SIGSTOP) in the middle of a run: the bench
    stops after --stall-timeout without progress, says which messages are missing,
    prints the figures so far marked partial, and exits 1."""
    import os
    import selectors
    import signal
    import time

    srv, creds = _bench_server(tmp_path, 4)
    workers = srv.worker_pids()
    assert len(workers) == 2
    bench = subprocess.Popen(
        [sys.executable, "-m", "pigeon.tools.cli", "bench", "throughput", "--target",
         f"127.0.0.1:{srv.port}", "--server-pid", str(srv.proc.pid), "--creds", str(creds),
         "--clients", "4", "--messages", "100000", "--window", "4", "--stall-timeout", "2",
         "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    stopped = []
    try:
        sel = selectors.DefaultSelector()
        sel.register(bench.stderr, selectors.EVENT_READ)
        err = []
        deadline = time.monotonic() + 60
        while not any("logged in; sending" in line for line in err):
            assert time.monotonic() < deadline and sel.select(deadline - time.monotonic())
            err.append(bench.stderr.readline())
            assert err[-1], "".join(err)
        time.sleep(0.3)  # some messages acked, then nothing
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        t0 = time.monotonic()
        out, rest = bench.communicate(timeout=90)
        took = time.monotonic() - t0
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        if bench.poll() is None:
            bench.kill()
            bench.wait(10)
        assert srv.stop() == 0
    err = "".join(err) + rest
    assert "4 clients x 100,000 messages = 400,000 messages" in err
    assert bench.returncode == 1, err
    assert took < 2 + 30, err  # the stall timeout plus collecting the results: bounded
    assert "no progress for 2 s while sending" in err and "figures are partial" in err
    assert "sent but not acked (e.g. client " in err, err
    r = orjson.loads(out)
    assert r["partial"] is True and r["stalled"]["phase"] == "sending"
    (m,) = r["stalled"]["missing"]
    assert m["clients"] == [0, 4] and 1 <= m["sent_not_acked"] <= 16
    assert len(m["examples"]["sent_not_acked"]) == min(5, m["sent_not_acked"])
    assert all(0 <= c < 4 and n >= 0 for c, n in m["examples"]["sent_not_acked"])
    assert r["acked"] < 400_000 and r["sent"] >= r["acked"] + m["sent_not_acked"]


def test_throughput_help_says_messages_are_per_client():
    proc = pigeon("bench", "throughput", "--help")
    assert "PER CLIENT" in proc.stdout and "--stall-timeout" in proc.stdout


RESULTS = sorted((Path(__file__).parent.parent / "bench" / "results").glob("*.json"))


def _tp(clients, sync="os", receipts=True, msgs=1000.0, cpu=100.0, **kw):
    """A throughput result as --json saves it (the fields the report reads)."""
    return {"bench": "throughput", "clients": clients, "sync": sync, "receipts": receipts,
            "window": 16, "size": 100, "messages_per_client": 100, "workers": 2,
            "load_processes": 1, "profile": "bench", "msgs_per_s": msgs,
            "server_cpu_us_per_msg": cpu, "latency_cdf": [[1.0, 0.0], [2.0, 0.5], [9.0, 1.0]],
            "machine": {"cpu": "test"}, **kw}  # fmt: skip


def _panel(fig, title):
    (ax,) = [ax for ax in fig.axes if ax.get_title() == title]
    return ax


def test_report_groups_throughput_runs_by_configuration():
    """One series per configuration, lines only within it, its own marker; runs at the
    same client count (of other configurations, or repeats) never share a position."""
    import matplotlib.pyplot as plt

    from pigeon.bench.harness import figure

    runs = [
        _tp(100, msgs=5000), _tp(1000, msgs=6000), _tp(1000, msgs=6100),  # a repeat
        _tp(100, receipts=False, msgs=7000), _tp(1000, receipts=False, msgs=8000),
        _tp(1000, sync="fsync", msgs=6500),
    ]  # fmt: skip
    fig = figure([(f"r{k}.json", r) for k, r in enumerate(runs)])
    try:
        for title, field in (("throughput against clients", "msgs_per_s"),
                             ("server CPU per message", "server_cpu_us_per_msg")):  # fmt: skip
            lines = _panel(fig, title).get_lines()
            assert sorted(ln.get_label() for ln in lines) == [
                "fsync, receipts", "os, no receipts", "os, receipts",
            ]  # fmt: skip
            assert len({ln.get_marker() for ln in lines}) == 3
            by_label = {ln.get_label(): ln for ln in lines}
            assert list(by_label["os, no receipts"].get_ydata()) == [r[field] for r in runs[3:5]]
            assert len(by_label["os, receipts"].get_xdata()) == 3
            assert len(by_label["fsync, receipts"].get_xdata()) == 1
            points = [(x, ln.get_label()) for ln in lines for x in ln.get_xdata()]
            xs = [x for x, _ in points]
            assert len(set(xs)) == len(xs) == 6  # no point on top of another
            for x, _ in points:  # each drawn near its own client count (log-axis dodge)
                assert min(abs(x / 100 - 1), abs(x / 1000 - 1)) < 0.15
            for ln in lines:  # a line joins one configuration's runs, in client order
                assert list(ln.get_xdata()) == sorted(ln.get_xdata())
    finally:
        plt.close(fig)


def test_report_draws_the_load_floor_beside_its_latency():
    import matplotlib.pyplot as plt

    from pigeon.bench.harness import figure

    cdf = [[0.2, 0.0], [0.5, 0.5], [3.0, 1.0]]
    lat = {"bench": "latency", "rate": 1000.0, "clients": 4, "machine": {"cpu": "test"},
           "latency_cdf": cdf, "load_floor": {"latency_cdf": [[0.1, 0.0], [0.3, 1.0]]}}  # fmt: skip
    alone = {"bench": "floor", "rate": 5000.0, "clients": 4, "latency_cdf": cdf}
    fig = figure([("lat.json", lat), ("floor", alone)])
    try:
        lines = _panel(fig, "latency CDF").get_lines()
        labels = [ln.get_label() for ln in lines]
        assert labels == ["lat.json (1000 msg/s)", "lat.json (1000 msg/s): load floor",
                          "floor 5000 msg/s"]  # fmt: skip
        assert lines[0].get_color() == lines[1].get_color()  # the floor in its run's colour
    finally:
        plt.close(fig)


def test_report_of_the_saved_results(tmp_path, capsys):
    """bench/results as it is (pytest-benchmark, idle, presence, latency and throughput
    JSON): the report draws what it knows, says which files it skipped, and keeps every
    throughput configuration a series of its own."""
    import matplotlib.pyplot as plt

    from pigeon.bench.harness import figure

    out = tmp_path / "report.png"
    assert main(["bench", "report", *map(str, RESULTS), "--out", str(out)]) == 0
    cap = capsys.readouterr()
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    skipped = [ln for ln in cap.err.splitlines() if ln.startswith("pigeon bench report: skipped")]
    assert any("codec.json: a pytest-benchmark result" in ln for ln in skipped), cap.err
    assert any("idle-10000.json: an idle result" in ln for ln in skipped), cap.err
    tps = [orjson.loads(p.read_bytes()) for p in RESULTS if p.name.startswith("throughput")]
    fig = figure([("x", r) for r in tps])
    try:
        lines = _panel(fig, "throughput against clients").get_lines()
        assert len(lines) == len(tps)  # five configurations, none joined to another
        assert all(len(ln.get_xdata()) == 1 for ln in lines)
    finally:
        plt.close(fig)


def test_report_skips_what_it_cannot_plot(tmp_path, capsys):
    files = {
        "bench.json": {"benchmarks": [], "machine_info": {}},
        "idle.json": {"bench": "idle", "clients": 10},
        "presence.json": {"bench": "presence", "subscribers": 10},
        "link.json": {"bench": "link", "links": 10},
        "other.json": {"hello": 1},
        "list.json": [1, 2],
        "broken.json": _tp(10, msgs=None),
        "badcdf.json": _tp(10, latency_cdf=[1, 2]),
        "search.json": {"bench": "latency", "max_rate": None, "runs": []},
        "tp.json": _tp(10),
        "lat.json": {
            "bench": "latency",
            "rate": 100.0,
            "clients": 4,
            "latency_cdf": [[1.0, 0.0], [3.0, 1.0]],
        },  # fmt: skip
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(orjson.dumps(data))
    (tmp_path / "text.json").write_text("not json\n")
    paths = sorted(str(p) for p in tmp_path.glob("*.json"))
    out = tmp_path / "r.png"
    assert main(["bench", "report", *paths, "--out", str(out)]) == 0
    cap = capsys.readouterr()
    assert "(2 results)" in cap.out and out.exists()
    notes = cap.err.splitlines()
    assert len(notes) == len(paths) - 2, cap.err  # one line per skipped file
    for name in set(files) - {"tp.json", "lat.json"} | {"text.json"}:
        assert sum(name in ln for ln in notes) == 1, (name, cap.err)
    # nothing plottable at all: a clear error, no file
    assert (
        main(["bench", "report", str(tmp_path / "idle.json"), "--out", str(tmp_path / "n.png")])
        == 1
    )
    assert "nothing to plot" in capsys.readouterr().err
    assert not (tmp_path / "n.png").exists()


def test_human_output_has_a_headline_then_aligned_details():
    from pigeon.bench.harness import _human

    r = orjson.loads((RESULTS[0].parent / "throughput-1000-os.json").read_bytes())
    lines = _human(r).splitlines()
    assert lines[0] == (
        "throughput: 100,000 messages sent, 100,000 delivered, 0 lost, 0 duplicated, "
        "0 receipts missing"
    )
    # the figures of the saved run, written as the headline writes them
    cpu, user = r["server_cpu_us_per_msg"], r["server_user_us_per_msg"]
    assert lines[1].startswith(f"server CPU {cpu:.1f} us per message ({user:.1f} us user); "
                               f"{round(1e6 / cpu):,} messages")  # fmt: skip
    assert lines[1].endswith(f"{round(r['msgs_per_s']):,} msg/s wall")
    assert lines[2].startswith(
        f"send-to-delivery p50 {round(r['p50_ms']):,} ms, p99 {round(r['p99_ms']):,} ms"
    )
    details = lines[lines.index("details:") + 1 :]
    assert "{" not in "\n".join(details)  # no dict dumps
    column = {len(ln) - len(ln[2:].split("  ", 1)[1].lstrip()) for ln in details}
    assert len(column) == 1  # every value starts in the same column
    assert any(ln.split() == ["errors", "none"] for ln in details)
    search = orjson.loads((RESULTS[0].parent / "latency-find-max-p99-50.json").read_bytes())
    text = _human(search)
    assert text.startswith("latency: the highest rate with p99 within 50.0 ms is 2,125 msg/s")
    assert "rate msg/s  achieved" in text  # the search's runs as a table


def test_human_output_of_a_run():
    proc = pigeon("bench", "throughput", "--clients", "4", "--messages", "5", "--window", "2",
                  "--workers", "1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert first.startswith("throughput: 20 messages sent, 20 delivered, 0 lost"), proc.stdout
    assert "us per message" in proc.stdout and "details:" in proc.stdout


@pytest.mark.parametrize(
    "bench", [None, "throughput", "latency", "floor", "presence", "idle", "link", "report"]
)
def test_bench_help_shows_defaults_and_no_markup(bench):
    proc = pigeon("bench", *([bench] if bench else []), "--help")
    assert proc.returncode == 0, proc.stderr
    assert "``" not in proc.stdout
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    if bench in ("throughput", "latency"):
        assert "(default: 30)" in text and "(default: os;" in text
    if bench in ("throughput", "latency", "idle"):
        assert "(default: 100)" in text and "default: one per core" in text
    if bench in ("latency", "floor"):
        assert "--load-procs" in text and "(default: 2)" in text
    if bench == "presence":
        assert "(default: 1000)" in text and "(default: 0.05)" in text
    if bench == "link":
        assert "(default: 200)" in text and "(default: 16)" in text
    if bench == "report":
        assert "pip install '.[bench]'" in text


def test_missing_extra_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    """The hint names both installs: from PyPI, and from a checkout."""
    (tmp_path / "tp.json").write_bytes(orjson.dumps(_tp(10)))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert (
        main(["bench", "report", str(tmp_path / "tp.json"), "--out", str(tmp_path / "r.png")]) == 1
    )
    err = capsys.readouterr().err
    assert (
        "matplotlib is missing: pip install 'pigeon[bench]' (from a checkout: pip install '.[bench]')"
        in err
    )
    monkeypatch.setitem(sys.modules, "psutil", None)
    assert main(["bench", "idle", "--clients", "2"]) == 1
    assert (
        "psutil is missing: pip install 'pigeon[bench]' (from a checkout: pip install '.[bench]')"
        in capsys.readouterr().err
    )
