"""Store micro-benchmarks: the queue operations of one group commit, on a real LMDB.

A round is what one worker tick does for a batch of ``BATCH`` 100-byte
1:1 messages: ``enqueue`` stores them (dedup check, recipient lookup, frame
encoding, queue entry, one commit), ``read`` serves a device's window from
its queue (the delivery of a backlog), ``ack`` deletes them again with
cumulative device acks and queues the delivered receipts (one commit).
The store runs with ``sync = "os"`` in a temp dir, as ``pigeon bench``
does; frames are encoded by each codec implementation in turn.
``extra_info["frames"]`` holds the batch size, so the summariser reports
messages per second.  ``one_message_per_commit`` is the everyday-rate
shape instead (a tick holding one message, then one holding its device ack,
then one holding the ack of its delivered receipt), with LMDB's writemap
off and on (``store-writemap``): per-commit costs, not per-message ones.

    pytest bench/bench_store.py --benchmark-enable --benchmark-json=bench/results/store.json
    python -m pigeon.bench.summarize bench/results/store.json
"""

import itertools

import pytest

from pigeon.server.queues import FrameEncoder, QueueLimits, Queues, Send
from pigeon.server.store import Store

BATCH = 256
USERS = 64
KEYS = (b"salt", b"stored", b"server", 4096)

pytestmark = pytest.mark.benchmark(min_time=0.01, max_time=2.0)


@pytest.fixture
def queues(tmp_path, impl):
    store = Store(str(tmp_path / "store"), map_size=1 << 30, sync="os")
    devices = [store.register_device(f"4930{i:08d}", b"i" * 32, KEYS)[0] for i in range(USERS)]
    q = Queues(store, QueueLimits(max_count=1 << 30, max_bytes=1 << 40), FrameEncoder(impl=impl))
    yield q, devices
    store.close()


def batch(devices, ids) -> list[Send]:
    """BATCH messages, each from one device to the next user."""
    out = []
    for k in range(BATCH):
        sender = devices[k % USERS]
        to = devices[(k + 1) % USERS].partition(":")[0]
        out.append(Send(sender, "message", f"m{next(ids)}", to, "text", bytes(100)))
    return out


def test_enqueue(benchmark, queues):
    q, devices = queues
    ids = itertools.count()
    pushes = benchmark(lambda: q.commit(batch(devices, ids), {}))
    assert len(pushes) == BATCH
    benchmark.extra_info["frames"] = BATCH


def test_read_window(benchmark, queues):
    q, devices = queues
    ids = itertools.count()
    for _ in range(4):
        q.commit(batch(devices, ids), {})
    # one device's window of 16, as a login or an ack refill reads it
    entries = benchmark(q.read, devices[1], 0, 16)
    assert len(entries) == 16
    benchmark.extra_info["frames"] = 16


def test_ack_with_receipts(benchmark, queues):
    q, devices = queues
    ids = itertools.count()

    def setup():
        q.commit(batch(devices, ids), {})
        heads = {d: q.head(d) - 1 for d in devices}
        return (heads,), {}

    def ack(heads):
        return q.commit([], heads)

    benchmark.pedantic(ack, setup=setup, rounds=50)
    benchmark.extra_info["frames"] = BATCH


@pytest.mark.parametrize("writemap", [False, True], ids=["writemap-off", "writemap-on"])
def test_one_message_per_commit(benchmark, tmp_path, writemap):
    store = Store(str(tmp_path / "store"), map_size=1 << 30, sync="os", writemap=writemap)
    try:
        devices = [store.register_device(f"4930{i:08d}", b"i" * 32, KEYS)[0] for i in range(USERS)]
        q = Queues(store, QueueLimits(max_count=1 << 30, max_bytes=1 << 40))
        ids = itertools.count()

        def round_trip():
            k = next(ids)
            sender, recipient = devices[k % USERS], devices[(k + 1) % USERS]
            s = Send(sender, "message", f"m{k}", recipient.partition(":")[0], "text", bytes(100))
            (push,) = q.commit([s], {})
            (receipt,) = q.commit([], {recipient: push.seq})
            q.commit([], {sender: receipt.seq})

        benchmark(round_trip)
        benchmark.extra_info["frames"] = 1
    finally:
        store.close()
