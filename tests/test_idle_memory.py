"""Memory per idle authenticated connection, on a real 1-worker server (issue 14, item 8).

What is measured is the worker's PSS (Linux: /proc/PID/smaps), as
``pigeon bench idle`` does, between two sets of logged-in idle connections:
the first set warms up what is made once (code paths, caches, the store's
first pages), so the difference is what each further connection costs.
Only the mappings a connection can grow count: anonymous memory and the
store's file.  The PSS of shared libraries moves with every other process
on the machine that maps them (on a shared CI machine, by a megabyte or
more between two readings), which is noise, not connections.

The bound is the issue's target, with margin over what is measured today
(about 2 KiB here; 4.6 KiB before the codec was shared and the frame reader
stopped holding a deque).  Memory is asserted, never time; every wait is
bounded.
"""

from __future__ import annotations

import asyncio
import os
import resource
import sys

import pytest
from serverutil import Server

from pigeon.client import Client, Credentials
from pigeon.server.provision import provision
from pigeon.server.store import Store

WARM, COUNT = 200, 2000  # connections: the warm-up set, then the measured set
BOUND = 3 * 1024  # bytes of worker PSS per idle authenticated connection


def pss_kib(pid: int, data_dir) -> int:
    """PSS of ``pid``'s anonymous mappings and of its mappings of files under
    ``data_dir`` (the store), KiB."""
    inside = os.path.realpath(data_dir) + os.sep
    total, counted, keep = 0, False, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split(None, 5)
            if not parts[0].endswith(":"):  # a mapping's header: range, perms, ..., path
                path = parts[5].strip() if len(parts) > 5 else ""
                keep = not path or path.startswith("[") or path.startswith(inside)
            elif parts[0] == "Pss:" and keep:
                total += int(parts[1])
                counted = True
    assert counted, "no Pss lines in smaps"
    return total


def raise_open_files(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"needs {wanted} open files; the hard limit is {hard}")
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and os.path.exists("/proc/self/smaps")),
    reason="reads PSS from /proc/PID/smaps",
)
def test_idle_authenticated_connections_cost_under_3_kib_each(tmp_path):
    raise_open_files(WARM + COUNT + 256)
    data = tmp_path / "data"
    data.mkdir()
    store = Store(str(data / "store"), map_size=256 << 20)
    try:
        creds = provision(store, WARM + COUNT, str(tmp_path / "creds.jsonl"))
    finally:
        store.close()
    srv = Server(data, workers=1, open_files=WARM + COUNT + 512, login_timeout=120,
                 max_connections_per_ip=10 * (WARM + COUNT)).start()  # fmt: skip
    clients: list[Client] = []

    async def log_in(batch) -> None:
        sem = asyncio.Semaphore(64)

        async def one(c) -> None:
            async with sem:
                cl = await Client.connect("127.0.0.1", srv.port, timeout=30, plaintext=True)
                clients.append(cl)
                await cl.login(Credentials(c["device"], bytes.fromhex(c["secret"])))

        await asyncio.gather(*(one(c) for c in batch))
        await clients[-1].ping()  # the worker has handled everything sent before it

    async def scenario() -> tuple[int, int, list[int]]:
        try:
            await log_in(creds[:WARM])
            before = pss_kib(pid, data)
            await log_in(creds[WARM:])
            after = pss_kib(pid, data)
            return before, after, srv.worker_pids()
        finally:
            await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)

    try:
        (pid,) = srv.worker_pids()
        before, after, workers = asyncio.run(asyncio.wait_for(scenario(), 300))
        per_conn = (after - before) * 1024 / COUNT
        print(f"worker PSS {before} -> {after} KiB for {COUNT} more idle logged-in "
              f"connections: {per_conn:.0f} bytes each")  # fmt: skip
        assert workers == [pid], "the worker was restarted during the test"
        assert per_conn < BOUND, f"{per_conn:.0f} bytes of PSS per idle connection"
    finally:
        assert srv.stop() == 0


def _rss_anon_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))


def _aborted_handshakes(port: int, hello: bytes, sources: int, each: int) -> None:
    """``sources`` x ``each`` connections that send a ClientHello cut short, then close."""
    import socket
    import time

    held = []
    for k in range(sources):
        for _ in range(each):
            s = socket.socket()
            s.bind((f"127.0.0.{10 + k}", 0))
            s.connect(("127.0.0.1", port))
            s.sendall(hello[:-20])
            held.append(s)
    time.sleep(1)  # the worker has read them all
    for s in held:
        s.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and glibc's arenas")
def test_memory_freed_by_aborted_tls_handshakes_goes_back_to_the_system(tmp_path):
    """probe9: 12,000 TLS handshakes cut short by their peers left a worker
    350 MB larger for good (freed by OpenSSL, held by glibc's arenas: uvloop
    #565); memory-trim-interval gives it back.  Memory is asserted with a wide
    margin, never time."""
    import ssl
    import time

    from pigeon.server.worker import trim_heap

    if not trim_heap():
        pytest.skip("no malloc_trim in this C library: it gives freed memory back itself")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 8000:
        pytest.skip(f"needs 8,000 open files, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 20000)), hard))
    s = Server(tmp_path / "data", workers=1, tls=True, memory_trim_interval=1,
               max_connections_per_ip=2000, unauth_rate=0)  # fmt: skip
    s.start()
    try:
        [pid] = s.worker_pids()
        cctx = ssl.create_default_context()
        cctx.check_hostname, cctx.verify_mode = False, ssl.CERT_NONE
        out = ssl.MemoryBIO()
        obj = cctx.wrap_bio(ssl.MemoryBIO(), out)
        with pytest.raises(ssl.SSLWantReadError):
            obj.do_handshake()
        hello = out.read()
        _aborted_handshakes(s.tls_port, hello, 1, 500)  # the first ones warm up what stays
        time.sleep(3)
        base = _rss_anon_kib(pid)
        for _ in range(2):
            _aborted_handshakes(s.tls_port, hello, 4, 1500)
        time.sleep(3)  # at least one trim after the last close
        grown = _rss_anon_kib(pid) - base
        # without the trim: ~150 MB here (12,000: 350 MB); with it a few MB
        assert grown < 60_000, f"worker kept {grown} KiB after 12,000 aborted handshakes"
    finally:
        assert s.stop() == 0
