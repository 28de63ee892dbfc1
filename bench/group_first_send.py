"""The SDK's first encrypted send to a big group: wall time and round trips.

A real server (2 workers, tests/serverutil.py) on loopback; ``--members`` - 1
accounts provisioned in its store with published keys
(tests/e2eutil.py ``provision_keyed``: each device's identity key is a
vodozemac Olm account's Ed25519 key, with signed one-time keys and a
fallback key in the key directory, as the SDK uploads them); the sender is a real encrypting SDK client registered over
the wire.  The sender creates the group with every member, then its first
message to the group is timed: the member list, every member's device
list, their key bundles, an Olm session per device and one Megolm key
share each, and the send itself.  A round trip is one request the SDK
waited for (a ``_request`` or the message's server ack).

    .venv/bin/python bench/group_first_send.py --members 256 1024

Prints one JSON line per size: members, devices, round_trips, seconds, ok
(and the error when the send failed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from e2eutil import provision_keyed  # noqa: E402
from serverutil import Server  # noqa: E402

from pigeon.client import Client  # noqa: E402
from pigeon.server.store import Store  # noqa: E402


async def first_send(srv: Server, members: int, tmp: Path) -> dict:
    store = Store(str(srv.data_dir / "store"), map_size=1 << 30, create=False)
    try:
        phones = provision_keyed(store, members - 1, prefix=f"49{members:04d}")
    finally:
        store.close()
    me = f"4915{members:08d}"
    c = await Client.connect("127.0.0.1", srv.port, plaintext=False, profile=tmp / me)
    try:
        await c.register(me)
        await c.login(await c.verify(me, srv.code_for(me)))
        res = await c.group_create("big", phones, timeout=120)
        assert res.failed == (), res.failed[:3]
        g = res.group
        trips = 0
        request, send_raw = c._request, c._send_raw

        async def counted_request(*a, **kw):
            nonlocal trips
            trips += 1
            return await request(*a, **kw)

        async def counted_send(*a, **kw):
            nonlocal trips
            trips += 1
            return await send_raw(*a, **kw)

        c._request, c._send_raw = counted_request, counted_send
        t0 = time.perf_counter()
        out = {"members": members, "devices": members - 1}
        try:
            ack = await c.send(g, b"hello, all of you", timeout=300)
            out.update(ok=True, failed=len(ack.failed))
        except Exception as exc:  # the figure is the failure (before the fix)
            out.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
        out.update(round_trips=trips, seconds=round(time.perf_counter() - t0, 3))
        return out
    finally:
        await c.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, nargs="+", default=[256, 1024])
    opts = ap.parse_args()
    for n in opts.members:
        with tempfile.TemporaryDirectory() as d:
            srv = Server(Path(d) / "data", workers=2, register_per_ip=1000, message_rate=0,
                         group_max_members=max(n, 1024))  # fmt: skip
            srv.start()
            try:
                print(json.dumps(asyncio.run(first_send(srv, n, Path(d)))), flush=True)
            finally:
                srv.stop()


if __name__ == "__main__":
    main()
