"""Group fan-out micro-benchmarks: one message to a 1,024-member group, on a real LMDB.

``fanout_commit`` is the store work of one group message from one member
(the commit: dedup, the membership and device-list caches, the body stored
once, a reference in each of the 1,023 other member devices' queues, the
queue states), with every member offline (the 90%-offline shape's store
work: no push); ``fanout_push`` the delivery side, the 1,023 frames
spliced from the one stored body as sessions do at push time;
``fanout_ack`` the 1,023 device acks of one such message in one commit
(each reference dropped, the body deleted with the last); ``fanout_kernel``
the per-member-device part of the commit alone (``fan_out``: the queue
states, the keys and references for ``putmulti``, who is online), with no
LMDB work, for each implementation.
``extra_info["frames"]`` is the device copies per round, so the summariser
reports copies per second; the CPU per device copy is the round's median
divided by 1,023.  The store runs with ``sync = "os"`` in a temp dir.

    pytest bench/bench_groups.py --benchmark-enable --benchmark-json=bench/results/groups.json
    python -m pigeon.bench.summarize bench/results/groups.json
"""

import itertools

import pytest

from pigeon.core.events import GroupRequest
from pigeon.server.groups import GroupLimits, Groups
from pigeon.server.queues import FrameEncoder, QueueLimits, Queues, Send
from pigeon.server.store import Store

MEMBERS = 1024
COPIES = MEMBERS - 1  # every member device but the sending one
KEYS = (b"salt", b"stored", b"server", 4096)

pytestmark = pytest.mark.benchmark(min_time=0.01, max_time=2.0)


@pytest.fixture
def group(tmp_path, impl):
    store = Store(str(tmp_path / "store"), map_size=4 << 30, sync="os")
    phones = [f"4950{i:08d}" for i in range(MEMBERS)]
    devices = [store.register_device(p, b"i" * 32, KEYS)[0] for p in phones]
    q = Queues(store, QueueLimits(max_count=1 << 30, max_bytes=1 << 40), FrameEncoder(impl=impl))
    groups = Groups(store, q, GroupLimits(max_members=MEMBERS))
    with store.write() as txn:
        res, _ = groups.handle(txn, store.clock(), phones[0],
                               GroupRequest("c1", "create", None, tuple(phones[1:]), "bench"))  # fmt: skip
    assert not res.failed
    ids = itertools.count()
    send = lambda: q.commit([Send(devices[0], "message", f"g{next(ids)}", res.group,  # noqa: E731
                                  "text", bytes(100))], {})  # fmt: skip
    send()  # warm: the caches hold the group and its members' device lists
    q.group_name = res.group  # (for test_store_bytes_per_message)
    yield q, devices, send
    store.close()


def test_fanout_commit(benchmark, group):
    q, devices, send = group
    benchmark(send)
    assert q.head(devices[-1]) > 2
    benchmark.extra_info["frames"] = COPIES


def test_fanout_kernel(benchmark, group, impl):
    q, devices, send = group
    for d in devices[1:10]:  # a few online members (the 90%-offline shape)
        q.session_cache[d] = 0
    gid = q.group_name[2:]
    plan = q.fan_plans[gid]
    dks = plan[0]
    with q.store.read() as txn:
        states = dict(txn.cursor(db=q.store._db["qstate"]).getmulti(dks))
    refs = (b"\x06\x00\x01", b"\x06\x01\x01", b"\x06\x02\x01")
    args = (dks, plan[1], plan[2], plan[3], 0, devices[0].encode(), states, refs, 150,
            1 << 30, 1 << 40, q.session_cache, None, False)  # fmt: skip
    items, failed, online = benchmark(impl.fan_out, *args)
    assert len(items) == COPIES and not failed and len(online) == 9
    benchmark.extra_info["frames"] = COPIES


def test_fanout_push(benchmark, group):
    q, devices, send = group
    for d in devices[1:]:  # every member online on this worker (the cache stays: no login)
        q.session_cache[d] = 0
    pushes = send()
    assert len(pushes) == COPIES
    write = q.encoder.write

    def splice():
        out = bytearray()
        for p in pushes:
            write(out, p.entry, p.seq)
        return out

    assert len(benchmark(splice)) > COPIES * 100
    benchmark.extra_info["frames"] = COPIES


def test_fanout_ack(benchmark, group):
    q, devices, send = group

    def setup():
        send()
        return ({d: q.head(d) - 1 for d in devices[1:]},), {}

    benchmark.pedantic(lambda acks: q.commit([], acks), setup=setup, rounds=20)
    benchmark.extra_info["frames"] = COPIES


@pytest.mark.parametrize("body", [100, 4000])
def test_store_bytes_per_message(benchmark, group, body):
    """LMDB pages in use after N messages, divided by N (the issue's store-growth
    figure): ``extra_info["store_bytes_per_msg"]`` and ``..._per_recipient``."""
    q, devices, send = group
    store = q.store
    ids = itertools.count()
    with store.read() as txn:
        before, psize = store.pages_used(txn)
    msg = lambda: q.commit([Send(devices[0], "message", f"b{next(ids)}", q.group_name,  # noqa: E731
                                 "text", bytes(body))], {})  # fmt: skip
    benchmark.pedantic(msg, rounds=20)
    with store.read() as txn:
        after, _ = store.pages_used(txn)
    per = (after - before) * psize / 20
    benchmark.extra_info.update(frames=COPIES, body=body, store_bytes_per_msg=per,
                                store_bytes_per_recipient=per / COPIES)  # fmt: skip
    print(f"\nbody {body}: {per:.0f} store bytes per message, {per / COPIES:.1f} per recipient")
