"""Group fan-out (issue 17): the per-member-device kernel (``fan_out``) of both
implementations writes the same thing, the store they drive ends up byte-for-byte
the same, and a format-7 store (18-byte references) is upgraded in place."""

import os
import random
import struct

import pytest

from pigeon.core.events import GroupRequest
from pigeon.server.groups import GroupLimits, Groups
from pigeon.server.queues import GREF, FrameEncoder, QueueLimits, Queues, Send, body_number
from pigeon.server.store import FORMAT_VERSION, Store

KEYS = (b"salt", b"stored", b"server", 4096)
QS = struct.Struct(">QQQ")
MISSING = object()


def kernel_case(seed: int):
    rnd = random.Random(seed)
    users = [f"49{u:010d}" for u in range(rnd.randint(1, 40))]
    rows = []
    for u, user in enumerate(users):
        n = rnd.choice((1, 1, 1, 2, 3))
        rows += [(f"{user}:{d}".encode(), f"{user}:{d}", u, n > 1) for d in range(n)]
    rows.sort()
    dks, dstrs, uidx = [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
    multi = bytes(r[3] for r in rows)
    sender = rnd.randrange(len(users))
    me = rnd.choice([dk for dk, u in zip(dks, uidx, strict=True) if u == sender])
    states = {}
    for dk in dks:
        if rnd.random() < 0.7:
            states[dk] = QS.pack(rnd.randint(1, 1 << 40), rnd.randint(0, 12),
                                 rnd.randint(0, 5000))  # fmt: skip
    sessions = {d: rnd.choice((None, 0, 1)) for d in dstrs if rnd.random() < 0.8}
    refs = (b"\x06\x00\x07", b"\x06\x01\x07", b"\x06\x02\x07")
    return (dks, dstrs, uidx, multi, sender, me, states, refs, rnd.randint(1, 400),
            10, 5000, sessions, MISSING, rnd.random() < 0.5)  # fmt: skip


@pytest.mark.parametrize("seed", range(60))
def test_both_fan_outs_give_the_same_answer_and_states(both, seed):
    py, fast = both
    a, b = kernel_case(seed), kernel_case(seed)
    assert py.fan_missing(a[0], a[6]) == fast.fan_missing(b[0], b[6])
    got_py, got_fast = py.fan_out(*a), fast.fan_out(*b)
    assert got_py == got_fast
    assert a[6] == b[6]  # the queue states, updated in place
    items, failed, online = got_py
    assert [k for k, _ in items] == sorted(k for k, _ in items)  # ready for putmulti
    assert all(len(QS.unpack(v)) == 3 for v in a[6].values())
    # every device but the sending one is stored for or its user failed, and a
    # failed user has a device that was not stored for
    stored = {k[:-9] for k, _ in items}
    for dk, u in zip(a[0], a[2], strict=True):
        assert dk == a[5] or dk in stored or u in failed
    for u in failed:
        assert any(dk not in stored for dk, v in zip(a[0], a[2], strict=True) if v == u)


def test_fan_out_rejects_what_it_cannot_read(both):
    for impl in both:
        case = list(kernel_case(1))
        case[6] = {dk: b"short" for dk in case[0]}
        with pytest.raises((ValueError, struct.error)):
            impl.fan_out(*case)


def group_store(path, impl, members=40):
    store = Store(str(path), map_size=256 << 20, sync="os", clock=lambda: 1_700_000_000_000)
    phones = [f"4951{i:08d}" for i in range(members)]
    devices = [store.register_device(p, b"i" * 32, KEYS)[0] for p in phones]
    for p in phones[::7]:  # some users with two devices (fan records, sync copies)
        store.link_device(p, b"j" * 32, KEYS)
    # a small queue limit: some members fill up and go into the ack's failed list
    q = Queues(store, QueueLimits(max_count=6), FrameEncoder(impl=impl))
    groups = Groups(store, q, GroupLimits(max_members=members))
    with store.write() as txn:
        res, _ = groups.handle(txn, store.clock(), phones[0],
                               GroupRequest("c1", "create", None, tuple(phones[1:]), "g"))  # fmt: skip
    return store, q, devices, res.group


def dump(store):
    with store.read() as txn:
        out = {name: list(txn.cursor(db=store._db[name]))
               for name in ("queue", "qstate", "gbody", "meta")}  # fmt: skip
    out["meta"] = [(k, v) for k, v in out["meta"] if k != b"secret"]  # (random per store)
    return out


def test_both_implementations_write_the_same_store(tmp_path, both):
    dumps, answers = [], []
    for n, impl in enumerate(both):
        store, q, devices, gid = group_store(tmp_path / f"s{n}", impl)
        got = []
        for i in range(9):  # past the queue limit of the members who never ack
            pushes = q.commit([s := Send(devices[i % 3], "message", f"m{i}", gid, "text",
                                         bytes([i]) * 50)], {devices[5]: 99})  # fmt: skip
            got.append((s.t, s.error, s.failed, [(p.device, p.seq, p.worker) for p in pushes]))
        answers.append(got)
        dumps.append(dump(store))
        store.close()
    assert answers[0] == answers[1]
    assert dumps[0] == dumps[1]
    assert any(a[2] for a in answers[0])  # some members' queues were full
    refs = [v for _, v in dumps[0]["queue"] if v[0] == GREF and not body_number(v)[0] & 0x80]
    assert refs and all(len(v) == 3 for v in refs)  # kind, flags, number 1..9: one byte


def test_a_format_7_store_is_upgraded_with_its_references(tmp_path, impl):
    """Format 7 wrote 18-byte references (kind, t, flags, number): they are
    rewritten at open, and what waited reads, acks and expires as before."""
    path = tmp_path / "s"
    store, q, devices, gid = group_store(path, impl)
    for i in range(3):
        q.commit([Send(devices[0], "message", f"m{i}", gid, "text", b"hello %d" % i)], {})
    before = {d: q.read(d, 0, 10) for d in devices[1:]}
    with store.write() as txn:  # what format 7 wrote: t (the body's) after the kind
        qdb, gdb = store._db["queue"], store._db["gbody"]
        refs = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=qdb) if v[0] == GREF]
        for k, v in refs:
            number = body_number(v)
            t = txn.get(number + b"b", db=gdb)[1:9]
            txn.put(k, bytes((GREF,)) + t + v[1:2] + number, db=qdb)
        txn.put(b"format", b"7", db=store._db["meta"])
    with store.read() as txn:
        assert {len(v) for _, v in txn.cursor(db=qdb) if v[0] == GREF} == {18}
    store.close()
    store = Store(str(path), map_size=256 << 20, sync="os", clock=lambda: 1_700_000_000_000)
    try:
        with store.read() as txn:
            assert int(txn.get(b"format", db=store._db["meta"])) == FORMAT_VERSION == 9
            lens = {(bool(body_number(v)[0] & 0x80), len(v))
                    for _, v in txn.cursor(db=store._db["queue"]) if v[0] == GREF}  # fmt: skip
        # a message body's number is one byte here; the create notice's (stored
        # once: Queues.enqueue_shared) has the top bit set, so all 8
        assert lens == {(False, 3), (True, 10)}
        q = Queues(store, QueueLimits(max_count=6), FrameEncoder(impl=impl))
        assert {d: q.read(d, 0, 10) for d in devices[1:]} == before
        assert q.stats()["oldest_s"] is not None  # t read through the body
        with store.read() as txn:
            every = [k.decode() for k, _ in txn.cursor(db=store._db["qstate"])]
        q.commit([], {d: 99 for d in every})
        with store.read() as txn:  # every member device acked: the bodies are gone
            assert not [k for k, _ in txn.cursor(db=store._db["gbody"]) if k.endswith(b"b")]
    finally:
        store.close()


def test_a_group_message_crosses_the_bus_once_per_worker(tmp_path):
    """Members held by the other worker get the message through one GPUSH record:
    the body crosses the bus once, not once per member device (measured by the
    sending side's bus_bytes_out)."""
    import asyncio

    from serverutil import Server, free_port, on_other_worker
    from test_durable import bus_counters
    from test_groups import deliveries, users, worker_of

    from pigeon.server.metrics import SNAPSHOT_INTERVAL

    async def settled(port) -> float:
        """bus_bytes_out once it has stopped moving (the workers report it to the
        supervisor every SNAPSHOT_INTERVAL)."""
        last = None
        for _ in range(100):
            now = bus_counters(port)["bus_bytes_out"]
            if now == last:
                return now
            last = now
            await asyncio.sleep(2.5 * SNAPSHOT_INTERVAL)
        raise AssertionError("bus_bytes_out keeps moving")

    metrics = free_port()
    srv = Server(tmp_path / "data", workers=2, message_rate=0,
                 metrics_listen=f"127.0.0.1:{metrics}").start()  # fmt: skip
    members, size = 8, 8000
    try:

        async def main():
            ((a, ac), *rest) = await users(srv, members + 1)
            alice = await srv.login(ac)
            there = worker_of(srv, ac)
            clients = [await on_other_worker(srv, c, p, there) for p, c in rest]
            g = (await alice.group("create", subject="bus", members=[p for p, _ in rest])).group
            for cl in clients:
                (n,) = await deliveries(cl, 1)
                assert n.op == "create"
            await settled(metrics)  # (the notices' acks and receipts)
            before = bus_counters(metrics)["bus_bytes_out"]
            body = os.urandom(size)
            await alice.send(g, body, id="big")
            for cl in clients:
                (m,) = await deliveries(cl, 1)
                assert (m.id, m.body) == ("big", body)
            crossed = await settled(metrics) - before
            # one body and a few dozen bytes per device (and the receipts back),
            # where a record per device would carry 8 bodies
            assert size <= crossed < 2 * size, crossed
            for cl in (alice, *clients):
                await cl.close()

        asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        assert srv.stop() == 0
