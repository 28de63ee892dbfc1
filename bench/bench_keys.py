"""Key-bundle fetch (issue 16): what one bundle costs.

``test_take_bundle_in_a_write_txn``: the store's part, one device's bundle
taken in its own LMDB write transaction (read the record, take and delete
the first one-time key, write the count back, commit; sync "os"), as the
worker's commit does it (server/keydir.py ``_take``).
``test_fetch_keys_round_trip``: the whole request on a real server (2
workers, loopback, the asyncio SDK): ``fetch_keys`` of a user with one
device, answered with a consumed one-time key; the uploading device tops
its keys up between rounds (not timed).

    pytest bench/bench_keys.py --benchmark-enable --benchmark-json=bench/results/keys.json
"""

import asyncio
import os
import sys
from pathlib import Path

import msgpack
import pytest

from pigeon.server import keydir
from pigeon.server.queues import Queues
from pigeon.server.store import Store

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

ROUNDS = 300


def test_take_bundle_in_a_write_txn(benchmark, tmp_path):
    store = Store(str(tmp_path / "store"), map_size=256 << 20, sync="os")
    queues = Queues(store)
    db = store._db
    device = "491701234567:0"
    n = ROUNDS * 4 + 10
    with store.write() as txn:
        rec = [
            os.urandom(32),
            os.urandom(32),
            ["AAAAAAAAAAI", os.urandom(32), os.urandom(64)],
            n,
            0,
        ]
        txn.put(device.encode(), msgpack.packb(rec, use_bin_type=True), db=db["keys"])
        for i in range(n):
            key = f"{device}\x00{i:011d}".encode()
            txn.put(key, msgpack.packb([os.urandom(32), os.urandom(64)]), db=db["otks"])

    def take():
        with store.write() as txn:
            b = keydir._take(txn, db, device, 0, queues, 1, [])
        return b.one_time_key

    k = benchmark.pedantic(take, rounds=ROUNDS, iterations=1, warmup_rounds=5)
    assert k is not None and not k.fallback
    store.close()


def test_fetch_keys_round_trip(benchmark, tmp_path):
    vodozemac = pytest.importorskip("vodozemac")
    from serverutil import Server, until

    from pigeon.client.keys import AccountIdentity, vodozemac_keys

    srv = Server(tmp_path / "data", workers=2, register_per_ip=1000, message_rate=0,
                 keys_fetch_per_account=1_000_000, keys_per_device=0, sync="os")  # fmt: skip
    srv.start()
    loop = asyncio.new_event_loop()
    try:
        account = vodozemac.Account()

        async def setup():
            out = []
            for phone, ident in (
                ("491701234567", AccountIdentity(account)),
                ("4915112345678", None),
            ):
                c = await srv.client()
                await c.register(phone)
                creds = await c.verify(phone, srv.code_for(phone), identity=ident)
                await c.close()
                client = await srv.login(creds)
                await until(lambda p=phone, d=creds.device: d in srv.sessions(p))
                out.append((client, creds.device))
            (alice, device), (bob, _) = out
            await bob.discover(["491701234567"])
            return alice, device, bob

        alice, device, bob = loop.run_until_complete(setup())

        def top_up():  # not timed: keeps a one-time key there for every round
            async def go():
                if await alice.key_count() < 2:
                    account.generate_one_time_keys(40)
                    await alice.upload_keys(**vodozemac_keys(account, device))
                    account.mark_keys_as_published()
                while True:  # the low-keys notices, acked
                    try:
                        ev = await alice.next_event(0.05)
                    except TimeoutError:
                        return
                    await alice.ack(ev.seq)

            loop.run_until_complete(go())

        def fetch():
            return loop.run_until_complete(bob.fetch_keys("491701234567"))

        (b,) = benchmark.pedantic(fetch, setup=top_up, rounds=ROUNDS, iterations=1,
                                  warmup_rounds=3)  # fmt: skip
        assert b.one_time_key is not None and not b.one_time_key.fallback
        for c in (alice, bob):
            loop.run_until_complete(c.close())
    finally:
        loop.close()
        assert srv.stop() == 0, srv.log_text()[-3000:]
