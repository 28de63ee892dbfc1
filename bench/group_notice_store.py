"""What the membership notices of a big group cost the store.

A real server (2 workers, tests/serverutil.py) on loopback; ``--members`` - 1
accounts provisioned in its store (``pigeon admin provision``'s function),
all offline, so every notice stays queued.  Two ways to a group of
``--members``: one ``create`` naming them all, and a ``create`` with one
member followed by one ``add`` of the rest (the notice that names them
all).  For each, the growth of the LMDB pages in use (times the page size)
and of the bytes of keys and values in ``queue`` and ``gbody``.

    .venv/bin/python bench/group_notice_store.py --members 1024

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from serverutil import Server  # noqa: E402

from pigeon.server.provision import provision  # noqa: E402
from pigeon.server.store import Store  # noqa: E402


def snapshot(srv: Server) -> tuple[int, int]:
    store = Store(str(srv.data_dir / "store"), map_size=1 << 30, create=False)
    try:
        with store.read() as txn:
            pages, psize = store.pages_used(txn)
            held = sum(len(k) + len(v) for table in ("queue", "gbody")
                       for k, v in txn.cursor(db=store._db[table]))  # fmt: skip
        return pages * psize, held
    finally:
        store.close()


async def measure(srv: Server, n: int, tmp: Path) -> dict:
    store = Store(str(srv.data_dir / "store"), map_size=1 << 30, create=False)
    try:
        phones = [x["phone"] for x in provision(store, n - 1, str(tmp / "creds.jsonl"),
                                                 prefix="4945", iterations=4096)]  # fmt: skip
    finally:
        store.close()
    me = "491500000001"
    creds = await srv.register(me)
    c = await srv.login(creds)
    out = {"members": n}
    try:
        p0, b0 = snapshot(srv)
        res = await c.group("create", subject="one create", members=phones)
        assert res.failed == ()
        p1, b1 = snapshot(srv)
        out["create"] = {"pages_bytes": p1 - p0, "queue_gbody_bytes": b1 - b0}
        res = await c.group("create", subject="create and add", members=phones[:1])
        p2, b2 = snapshot(srv)
        res = await c.group("add", res.group, phones[1:])
        assert res.failed == ()
        p3, b3 = snapshot(srv)
        out["add"] = {"added": n - 2, "pages_bytes": p3 - p2, "queue_gbody_bytes": b3 - b2}
    finally:
        await c.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=1024)
    opts = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        srv = Server(Path(d) / "data", workers=2, register_per_ip=1000, message_rate=0,
                     group_max_members=max(opts.members, 1024),
                     discover_numbers=4 * opts.members)  # fmt: skip
        srv.start()
        try:
            print(json.dumps(asyncio.run(measure(srv, opts.members, Path(d)))), flush=True)
        finally:
            srv.stop()


if __name__ == "__main__":
    main()
