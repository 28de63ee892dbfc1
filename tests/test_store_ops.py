"""What the group commit costs LMDB: the operations docs/STORE.md states, the wait for
the one writer (a metric), and the store-writemap setting, on real stores."""

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest
from serverutil import Server, free_port, until

from pigeon.bench import store_ops
from pigeon.server.queues import QueueLimits, Queues, Send
from pigeon.server.store import Store

ROOT = Path(__file__).resolve().parent.parent
ALICE, BOB = "491701234567", "4915112345678"
KEYS = (b"salt", b"stored", b"server", 4096)


def test_the_design_note_states_the_operations_each_commit_does():
    assert store_ops.main(["--check", str(ROOT / "docs" / "STORE.md")]) == 0, (
        "run python -m pigeon.bench.store_ops docs/STORE.md"
    )


def test_the_counted_operations_are_the_store_calls(tmp_path):
    """The counting environment sees what the commit really does (not a vacuous zero)."""
    rows = {name: ops for name, ops, _io in store_ops.scenarios(str(tmp_path))}
    two = rows["message to a user with 2 devices"]
    assert two[("queue", "put")] == 2 and two[("qstate", "put")] == 2 and two[("fan", "put")] == 1
    retry = rows["message retried (dedup hit)"]
    assert not [k for k in retry if k[1] in ("put", "del")]  # a retry writes nothing
    off = rows["device ack of 1 message, delivered-receipts off"]
    assert off[("queue", "del")] == 1 and ("queue", "put") not in off


HOLDER = textwrap.dedent("""
    import sys, time
    from pigeon.server.store import Store
    store = Store(sys.argv[1], map_size=64 << 20, sync="os")
    with store.env.begin(write=True):
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
    store.close()
""")


def test_a_commit_measures_its_wait_for_another_process_holding_the_writer(tmp_path):
    path = str(tmp_path / "store")
    store = Store(path, map_size=64 << 20, sync="os")
    try:
        sender = store.register_device(ALICE, b"i" * 32, KEYS)[0]
        store.register_device(BOB, b"i" * 32, KEYS)
        q = Queues(store, QueueLimits())
        waits = []
        q.on_write_wait = waits.append
        q.commit([Send(sender, "message", "m1", BOB, "text", b"x")], {})
        assert len(waits) == 1  # one per commit, nobody else writing
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, path, "0.5"],
                                  stdout=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert holder.stdout.readline().strip() == "held"
            s = Send(sender, "message", "m2", BOB, "text", b"x")
            q.commit([s], {})
            assert s.error is None and s.t is not None
        finally:
            assert holder.wait(timeout=30) == 0
        # the other process held LMDB's one writer for 0.5 s after saying so
        assert waits[1] >= 0.25
    finally:
        store.close()


def test_store_writemap_reaches_the_workers_and_the_wait_is_a_metric(tmp_path):
    port = free_port()
    map_size = 256 << 20  # serverutil's
    srv = Server(tmp_path / "data", workers=2, metrics_listen=f"127.0.0.1:{port}",
                 store_writemap="true").start()  # fmt: skip

    def scrape() -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            lines = r.read().decode().splitlines()
        return {k: float(v) for k, v in (ln.rsplit(" ", 1) for ln in lines
                                         if ln.startswith("pigeon_") and "{" not in ln)}  # fmt: skip

    async def main():
        alice = await srv.login(await srv.register(ALICE))
        await srv.register(BOB)
        for _ in range(3):
            await alice.send(BOB, b"x" * 100)
        m = {}

        def settled():  # workers send their counts every second
            m.update(scrape())
            return m.get("pigeon_messages_in_total") == 3

        await until(settled, timeout=15)
        assert m["pigeon_store_write_wait_seconds_count"] >= 3
        # one wait per group commit, from the same snapshots
        assert m["pigeon_store_write_wait_seconds_count"] == m["pigeon_commit_seconds_count"]
        assert 0 <= m["pigeon_store_write_wait_seconds_sum"] <= m["pigeon_commit_seconds_sum"]

        def same_in_status():  # a worker's next snapshot may land between the two reads
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as r:
                status = json.loads(r.read())
            return status["write_wait"]["commits"] == scrape()["pigeon_commit_seconds_count"]

        await until(same_in_status, timeout=15)
        await alice.close()

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
        # MDB_WRITEMAP: LMDB extends the data file to the map size at open (sparse)
        assert os.stat(srv.data_dir / "store" / "data.mdb").st_size == map_size
    finally:
        assert srv.stop() == 0


def test_pigeon_admin_opens_the_store_as_the_config_says(tmp_path):
    """Processes with and without writemap must not share a store: admin takes it (and
    the map size, which writemap makes the file's length) from --config."""
    from pigeon.tools.cli import main

    data = tmp_path / "data"
    Store(str(data / "store"), map_size=64 << 20).close()
    cfg = tmp_path / "pigeon.toml"
    cfg.write_text(f'data-dir = "{data}"\nmap-size = {96 << 20}\nstore-writemap = true\n')
    assert main(["admin", "queues", "--config", str(cfg), "--json"]) == 0
    assert os.stat(data / "store" / "data.mdb").st_size == 96 << 20


OPENER = textwrap.dedent("""
    import sys
    from pigeon.server.store import Store, StoreError
    try:
        Store(sys.argv[1], create=False, map_size=64 << 20).close()
    except StoreError as exc:
        print("refused:", exc)
    else:
        print("opened")
""")


def _open_elsewhere(path) -> str:
    """Open the store in another process: a SIGBUS ends that one, not pytest."""
    proc = subprocess.run([sys.executable, "-c", OPENER, str(path)], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, f"the open died (status {proc.returncode}): {proc.stderr}"
    return proc.stdout.strip()


def _store_with_messages(path) -> None:
    store = Store(str(path), map_size=64 << 20, sync="os")
    try:
        sender = store.register_device(ALICE, b"i" * 32, KEYS)[0]
        store.register_device(BOB, b"i" * 32, KEYS)
        q = Queues(store, QueueLimits())
        q.commit([Send(sender, "message", f"m{i}", BOB, "text", os.urandom(1000))
                  for i in range(300)], {})  # fmt: skip
    finally:
        store.close()


def test_a_truncated_data_file_is_refused_before_lmdb_maps_it(tmp_path):
    """LMDB reads its pages from the map: one past the end of a cut file is a SIGBUS."""
    import shutil

    path = tmp_path / "store"
    _store_with_messages(path)
    data = path / "data.mdb"
    size = data.stat().st_size
    assert size > 64 * 4096
    assert _open_elsewhere(path) == "opened"
    whole = data.read_bytes()
    for cut in (8192, size // 2, size - 4096):
        data.write_bytes(whole[:cut])
        out = _open_elsewhere(path)
        assert out.startswith(f"refused: {data} is truncated or corrupt"), (cut, out)
        assert "restore the store from a backup" in out
    # shorter than the meta pages, and not LMDB's at all
    for junk in (whole[:100], b"\0" * 3 * 4096):
        data.write_bytes(junk)
        assert _open_elsewhere(path).startswith(f"refused: {data} is truncated or corrupt")
    # empty: LMDB would start a new store in it; the operator is told both cases
    data.write_bytes(b"")
    out = _open_elsewhere(path)
    assert out.startswith(f"refused: {data} is empty: if this is a new store whose first "
                          "start failed, delete it; else restore"), out  # fmt: skip
    # a size that is no multiple of the page size is fine when it covers the last page
    data.write_bytes(whole + b"\0" * 100)
    assert _open_elsewhere(path) == "opened"
    # the server and pigeon admin say it in one line too
    data.write_bytes(whole[: size // 2])
    data_dir = tmp_path / "data"
    shutil.copytree(path, data_dir / "store")
    proc = subprocess.run([sys.executable, "-m", "pigeon.tools.cli", "admin", "queues",
                           "--data-dir", str(data_dir)], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert proc.returncode == 1 and "is truncated or corrupt" in proc.stderr, proc
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_data_file_that_ends_before_its_free_last_pages_still_opens(tmp_path):
    """LMDB does not write a page a transaction took and freed again ("loose"): when those
    are the last pages the file ends before the meta's last page, and that store is whole.
    """
    import random

    import lmdb

    from pigeon.server import lmdbfile

    path = tmp_path / "store"
    Store(str(path), map_size=64 << 20, sync="os").close()
    data = path / "data.mdb"

    def short() -> bool:
        with open(data, "rb") as f:
            _txnid, last, psize, _root = lmdbfile._metas(f)
        return data.stat().st_size < (last + 1) * psize

    # puts and deletes of mixed sizes (LMDB is deterministic: the same file each run)
    env = lmdb.open(str(path), map_size=64 << 20, max_dbs=40)
    db = env.open_db(b"scratch")
    rnd = random.Random(1)
    n = 0
    for _ in range(200):
        with env.begin(write=True, db=db) as txn:
            for _ in range(rnd.randint(1, 50)):
                txn.put(b"%08d" % n, b"x" * rnd.choice([50, 500, 3000, 9000]))
                n += 1
            for _ in range(rnd.randint(0, 60)):
                txn.delete(b"%08d" % rnd.randint(0, n))
        if short():
            break
    env.close()
    if not short():  # (py-lmdb bundles LMDB: this build's allocation does end short)
        pytest.skip("this LMDB build left no unwritten pages at the end in 200 commits")
    assert _open_elsewhere(path) == "opened"
    # and one page less than that is refused
    with open(data, "rb") as f:
        _txnid, need, _psize = lmdbfile._need(f)
    os.truncate(data, need - 1)
    assert "is truncated or corrupt" in _open_elsewhere(path)


def _admin(*args):
    return subprocess.run([sys.executable, "-m", "pigeon.tools.cli", "admin", *args],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def _snapshot(directory) -> dict:
    """Every file under ``directory``: its bytes' hash and its mtime."""
    import hashlib

    out = {}
    for f in sorted(Path(directory).rglob("*")):
        if f.is_file():
            out[str(f.relative_to(directory))] = (hashlib.sha256(f.read_bytes()).hexdigest(),
                                                  f.stat().st_mtime_ns)  # fmt: skip
    return out


def test_restore_refuses_a_running_servers_data_dir_and_not_a_stale_socket(tmp_path):
    import socket

    from pigeon.server.control import socket_path

    backup = tmp_path / "backup"
    _store_with_messages(tmp_path / "other" / "store")
    assert _admin("backup", str(backup), "--data-dir", str(tmp_path / "other")).returncode == 0
    srv = Server(tmp_path / "data", workers=1).start()
    try:
        before = _snapshot(srv.data_dir / "store")
        for force in ((), ("--force",)):
            proc = _admin("restore", str(backup), "--data-dir", str(srv.data_dir), *force)
            assert proc.returncode == 1, proc  # a refusal, not a usage error (2)
            assert f"the server on {srv.data_dir} is running" in proc.stderr
            assert "stop it first" in proc.stderr and len(proc.stderr.splitlines()) == 1
        assert sorted(p.name for p in srv.data_dir.iterdir() if p.name.startswith("store")) == [
            "store"
        ]  # nothing put aside
        assert _snapshot(srv.data_dir / "store")["data.mdb"] == before["data.mdb"]
    finally:
        assert srv.stop() == 0
    # a socket file left by a server that was killed answers nobody: no obstacle
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(socket_path(str(srv.data_dir)))
    stale.close()
    assert os.path.exists(socket_path(str(srv.data_dir)))
    proc = _admin("restore", str(backup), "--data-dir", str(srv.data_dir), "--force")
    assert proc.returncode == 0 and "previous store is in" in proc.stdout, proc


def test_restore_reads_the_backup_only_and_refuses_one_that_is_not_pigeons(tmp_path):
    import lmdb

    backup = tmp_path / "backup"
    _store_with_messages(tmp_path / "other" / "store")
    assert _admin("backup", str(backup), "--data-dir", str(tmp_path / "other")).returncode == 0
    before = _snapshot(backup)
    assert list(before) == ["data.mdb"]
    proc = _admin("restore", str(backup), "--data-dir", str(tmp_path / "data"))
    assert proc.returncode == 0, proc
    assert _snapshot(backup) == before  # no secret, no format record, no lock.mdb written
    assert _admin("queues", "--data-dir", str(tmp_path / "data")).returncode == 0
    # an LMDB environment that is not pigeon's is refused, and left as it was
    alien = tmp_path / "alien"
    env = lmdb.open(str(alien), map_size=16 << 20, max_dbs=2)
    with env.begin(write=True) as txn:
        txn.put(b"hello", b"world")
    env.close()
    os.unlink(alien / "lock.mdb")
    before = _snapshot(alien)
    target = tmp_path / "data3"
    proc = _admin("restore", str(alien), "--data-dir", str(target))
    assert proc.returncode == 2 and "is not a pigeon backup" in proc.stderr, proc
    assert len(proc.stderr.splitlines()) == 1
    assert _snapshot(alien) == before and not (target / "store").exists()
    # a backup of a newer pigeon's store is refused with both formats
    newer = tmp_path / "newer"
    newer.mkdir()
    (newer / "data.mdb").write_bytes((backup / "data.mdb").read_bytes())
    env = lmdb.open(str(newer), map_size=64 << 20, max_dbs=2)
    with env.begin(write=True) as txn:
        txn.put(b"format", b"99", db=env.open_db(b"meta", txn=txn))
    env.close()
    proc = _admin("restore", str(newer), "--data-dir", str(target))
    assert proc.returncode == 2 and "holds store format 99" in proc.stderr, proc
    # a backup cut short is refused, not a SIGBUS
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "data.mdb").write_bytes((backup / "data.mdb").read_bytes()[:8192])
    proc = _admin("restore", str(cut), "--data-dir", str(target))
    assert proc.returncode == 2 and "is truncated or corrupt" in proc.stderr, proc
    assert "use another backup" in proc.stderr and not (target / "store").exists()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root")
def test_a_restore_by_root_gives_the_store_to_the_data_dirs_owner(tmp_path):
    """``sudo pigeon admin restore`` into the service user's data dir made a
    root-owned store/ and data.mdb the service could not open."""
    backup = tmp_path / "backup"
    _store_with_messages(tmp_path / "other" / "store")
    assert _admin("backup", str(backup), "--data-dir", str(tmp_path / "other")).returncode == 0
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    os.chown(data, 65534, 65533)
    proc = _admin("restore", str(backup), "--data-dir", str(data))
    assert proc.returncode == 0, proc
    for p in (data / "store", data / "store" / "data.mdb"):
        st = p.stat()
        assert (st.st_uid, st.st_gid) == (65534, 65533), p
    assert (data / "store" / "data.mdb").stat().st_mode & 0o777 == 0o600
