"""Device queues on a real LMDB in a temp dir, with a controllable clock (server/queues.py)."""

import lmdb
import pytest

from pigeon.core import codec as core_codec
from pigeon.core.errors import ErrorCode
from pigeon.core.events import IncomingMessage, IncomingReceipt
from pigeon.server.queues import FrameEncoder, QueueLimits, Queues, Send
from pigeon.server.store import FORMAT_VERSION, Store, StoreError

ALICE, BOB, CAROL = "491701234567", "4915112345678", "447700900123"
KEYS = (b"salt", b"stored", b"server", 4096)
DAY = 86_400_000


class Clock:
    def __init__(self):
        self.t = 1_763_830_000_000

    def __call__(self):
        return self.t


@pytest.fixture(params=sorted(core_codec.implementations()))
def impl(request):
    return core_codec.implementations()[request.param]


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(tmp_path, clock):
    s = Store(str(tmp_path / "store"), map_size=64 << 20, clock=clock, sync="os")
    yield s
    s.close()


def make_queues(store, impl=core_codec, **limits):
    return Queues(store, QueueLimits(**limits), FrameEncoder(impl=impl))


def user(store, phone) -> str:
    device, _ = store.register_device(phone, b"i" * 32, KEYS)
    return device


def contact(store, phone, other) -> None:
    """``other`` joins ``phone``'s contact set (as a discover would)."""
    with store.env.begin(write=True) as txn:
        txn.put(f"{phone}\x00{other}".encode(), b"", db=store._db["contacts"])
        txn.put(f"{other}\x00{phone}".encode(), b"", db=store._db["rcontacts"])


def decode(frame, impl=core_codec):
    node = impl.Codec().decode(frame[3:])
    cls = IncomingMessage if node.tag == "message" else IncomingReceipt
    return cls.from_node(node)


def send(q, device, to, mid, body=b"x", cls="message", typ="text"):
    s = Send(device, cls, mid, to, typ, body if cls == "message" else None)
    pushes = q.commit([s], {})
    return s, pushes


def test_offline_queue_keeps_order_and_ack_deletes_exactly_that(store, clock, impl):
    q = make_queues(store, impl)
    a, b = user(store, ALICE), user(store, BOB)
    for i in range(5):
        s, pushes = send(q, a, BOB, f"m{i}", f"body {i}".encode())
        assert s.error is None and s.t == clock.t
        assert [(p.device, p.seq, p.worker) for p in pushes] == [(b, i + 1, None)]
        clock.t += 1
    entries = q.read(b, 0, 100)
    assert [seq for seq, _ in entries] == [1, 2, 3, 4, 5]
    evs = [decode(frame, impl) for _, frame in entries]
    assert [(e.sender, e.id, e.body, e.seq) for e in evs] == [
        (a, f"m{i}", f"body {i}".encode(), i + 1) for i in range(5)
    ]
    assert [e.t for e in evs] == [clock.t - 5 + i for i in range(5)]
    assert q.read(b, 2, 2) == entries[2:4]
    # ack 3: exactly 1..3 go; alice gets three delivered receipts, in order
    pushes = q.commit([], {b: 3})
    assert [seq for seq, _ in q.read(b, 0, 100)] == [4, 5]
    receipts = [decode(q.encoder.frame(p.entry, p.seq), impl) for p in pushes]
    assert [
        (p.device, r.sender, r.id, r.type, r.seq) for p, r in zip(pushes, receipts, strict=True)
    ] == [(a, BOB, f"m{i}", "delivered", i + 1) for i in range(3)]
    stats = q.stats()
    assert stats["count"] == 5 and stats["devices_with_queue"] == 2  # 2 left for bob, 3 for alice
    assert stats["top"][0]["device"] == a and stats["top"][0]["count"] == 3
    # acking again, or below, changes nothing; acking past the end empties the queue
    assert q.commit([], {b: 2}) == []
    q.commit([], {b: 99})
    assert q.read(b, 0, 100) == []
    # sequences keep growing after the queue emptied
    _, pushes = send(q, a, BOB, "m5")
    assert pushes[0].seq == 6


def test_delivered_receipt_once_per_user_to_every_sender_device(store):
    q = make_queues(store)
    a0 = user(store, ALICE)
    a1 = store.link_device(ALICE, b"j" * 32, KEYS)
    b0 = user(store, BOB)
    b1 = store.link_device(BOB, b"j" * 32, KEYS)
    _, pushes = send(q, a0, BOB, "hello")
    assert sorted(p.device for p in pushes) == sorted([b0, b1, a1])  # a1: the sync copy
    assert q.commit([], {a1: 1}) == []  # a sync copy's ack: no receipt
    receipts = q.commit([], {b1: 1})  # the first of bob's devices
    assert sorted(p.device for p in receipts) == [a0, a1]
    assert {decode(q.encoder.frame(p.entry, p.seq)).type for p in receipts} == {"delivered"}
    assert q.commit([], {b0: 1}) == []  # the second: no receipt again
    assert q.read(b0, 0, 10) == [] and q.read(b1, 0, 10) == []


def test_read_receipts_go_to_every_device_of_the_user_and_are_deduplicated(store, clock):
    q = make_queues(store)
    a0, b0 = user(store, ALICE), user(store, BOB)
    a1 = store.link_device(ALICE, b"j" * 32, KEYS)
    contact(store, ALICE, BOB)  # else a receipt about no message of hers is dropped
    s, pushes = send(q, b0, ALICE, "m1", cls="receipt", typ="read")
    assert s.error is None and sorted(p.device for p in pushes) == [a0, a1]
    ev = decode(q.encoder.frame(pushes[0].entry, pushes[0].seq))
    assert (ev.sender, ev.id, ev.type) == (BOB, "m1", "read")
    again, pushes = send(q, b0, ALICE, "m1", cls="receipt", typ="read")
    assert again.t == s.t and pushes == []
    played, pushes = send(q, b0, ALICE, "m1", cls="receipt", typ="played")
    assert played.error is None and len(pushes) == 2  # another receipt type is another receipt
    assert q.commit([], {a0: 99}) == []  # acking a receipt makes no receipt


def test_retries_are_stored_once_within_the_dedup_window(store, clock):
    q = make_queues(store, dedup_window_ms=DAY)
    a, b = user(store, ALICE), user(store, BOB)
    first, pushes = send(q, a, BOB, "same")
    assert len(pushes) == 1
    clock.t += 1000
    retry, pushes = send(q, a, BOB, "same")
    assert retry.error is None and retry.t == first.t and pushes == []
    # even after the recipient acked and the entry is gone
    q.commit([], {b: 1})
    clock.t += DAY - 2000  # still in the first generation
    assert send(q, a, BOB, "same")[1] == []
    clock.t += DAY  # a rotation: the id is in the previous generation, still known
    assert send(q, a, BOB, "same")[1] == []
    # another device may use the same id
    c = user(store, CAROL)
    assert len(send(q, c, BOB, "same")[1]) == 1
    clock.t += DAY  # a second rotation: forgotten, stored again
    fresh, pushes = send(q, a, BOB, "same")
    assert fresh.t == clock.t and len(pushes) == 1
    # a batch holding the same id twice stores it once
    s1 = Send(a, "message", "twice", BOB, "text", b"1")
    s2 = Send(a, "message", "twice", BOB, "text", b"1")
    pushes = q.commit([s1, s2], {})
    assert len(pushes) == 1 and s1.t == s2.t


def test_unknown_recipient_and_account_without_devices(store):
    q = make_queues(store)
    a, b = user(store, ALICE), user(store, BOB)
    s, pushes = send(q, a, CAROL, "x")
    assert s.error[0] == ErrorCode.UNKNOWN_RECIPIENT and pushes == []
    assert store.remove_device(b)
    s, pushes = send(q, a, BOB, "y")
    assert s.error[0] == ErrorCode.NO_DEVICE and pushes == []
    # the error was not remembered: once bob has a device the same id is stored
    b2 = user(store, BOB)
    s, pushes = send(q, a, BOB, "y")
    assert s.error is None and [p.device for p in pushes] == [b2]


@pytest.mark.parametrize("limit", ["count", "bytes"])
def test_a_full_queue_refuses_with_402_and_stores_nothing(store, limit):
    q = make_queues(store, **({"max_count": 3} if limit == "count" else {"max_bytes": 600}))
    a, b = user(store, ALICE), user(store, BOB)
    b1 = store.link_device(BOB, b"j" * 32, KEYS)
    for i in range(3):
        assert send(q, a, BOB, f"m{i}", b"x" * 100)[0].error is None
    # fill only b1 further via acks on b: b has room, b1 does not -> nothing is stored
    q.commit([], {b: 3})
    s, pushes = send(q, a, BOB, "m3", b"x" * 100)
    assert s.error[0] == ErrorCode.QUEUE_FULL and pushes == []
    assert [seq for seq, _ in q.read(b, 0, 10)] == []
    q.commit([], {b1: 3})
    s, pushes = send(q, a, BOB, "m3", b"x" * 100)  # room again, same id: stored now
    assert s.error is None and len(pushes) == 2


def knote_rows(store) -> list[bytes]:
    with store.read() as txn:
        return [bytes(k) for k, _ in txn.cursor(db=store._db["knote"])]


def test_the_purge_drops_knote_rows_of_empty_queues(store, clock):
    """A "keys changed" notice keeps its seq in ``knote`` (keys_changed); once the
    device acked it and its queue is empty, the purge drops the row (they piled up:
    one per device and user ever notified, review finding).  A queue that still
    holds the notice keeps it, and a newer notice still replaces the older."""
    q = make_queues(store)
    user(store, ALICE)
    b, c = user(store, BOB), user(store, CAROL)
    with store.write() as txn:
        q.keys_changed(txn, [BOB, CAROL], ALICE, clock())
    assert len(knote_rows(store)) == 2
    ((seq, _),) = q.read(b, 0, 10)
    q.commit([], {b: seq})  # bob's device has it; carol's has not
    start = b""
    while True:
        _, start = q.purge_expired(start)
        if not start:
            break
    assert knote_rows(store) == [f"{c}\x00{ALICE}".encode()]
    with store.write() as txn:  # the kept row still points at carol's notice
        q.keys_changed(txn, [CAROL], ALICE, clock())
    assert len(q.read(c, 0, 10)) == 1 and len(knote_rows(store)) == 1


def test_expired_entries_are_purged_in_slices(store, clock):
    q = make_queues(store, max_age_ms=30 * DAY)
    a = user(store, ALICE)
    devices = [user(store, f"4930000000{i:02d}") for i in range(3)]
    for i, d in enumerate(devices):
        send(q, a, d.partition(":")[0], f"old{i}")
    clock.t += 10 * DAY
    send(q, a, devices[0].partition(":")[0], "young")
    clock.t += 20 * DAY + 1  # the old ones are 30 days + 1 ms old, "young" is 20 days
    total, start, calls = 0, b"", 0
    while True:
        n, start = q.purge_expired(start, max_devices=1)
        total, calls = total + n, calls + 1
        if not start:
            break
    assert total == 3 and calls >= 3
    assert [decode(f).id for _, f in q.read(devices[0], 0, 10)] == ["young"]
    assert q.read(devices[1], 0, 10) == []
    assert q.stats()["count"] == 1


def test_a_full_map_raises_and_writes_nothing(tmp_path, clock):
    store = Store(str(tmp_path / "small"), map_size=1 << 20, clock=clock, sync="os")
    q = make_queues(store, max_bytes=1 << 30, max_count=1 << 20)
    a, b = user(store, ALICE), user(store, BOB)
    batch = [Send(a, "message", f"m{i}", BOB, "text", b"x" * 4000) for i in range(400)]
    with pytest.raises(lmdb.MapFullError):
        q.commit(batch, {})
    assert q.read(b, 0, 10) == [] and q.stats()["count"] == 0
    assert send(q, a, BOB, "small")[0].error is None  # a smaller batch still fits
    store.close()


def test_removing_a_device_drops_its_queue(store):
    q = make_queues(store)
    a, b = user(store, ALICE), user(store, BOB)
    send(q, a, BOB, "x")
    assert store.remove_device(b)
    assert q.read(b, 0, 10) == [] and q.stats()["count"] == 0


def test_receipts_can_be_turned_off(store):
    q = Queues(store, QueueLimits(), FrameEncoder(), receipts=False)
    a, b = user(store, ALICE), user(store, BOB)
    send(q, a, BOB, "x")
    assert q.commit([], {b: 1}) == [] and q.read(a, 0, 10) == []


def test_store_format_is_checked_and_format_1_is_upgraded(tmp_path):
    path = str(tmp_path / "store")
    s = Store(path, map_size=8 << 20)
    with s.write() as txn:
        txn.put(b"format", b"1", db=s._db["meta"])
    s.close()
    s = Store(path, map_size=8 << 20)  # upgraded in place
    with s.read() as txn:
        assert int(txn.get(b"format", db=s._db["meta"])) == FORMAT_VERSION
    with s.write() as txn:
        txn.put(b"format", str(FORMAT_VERSION + 1).encode(), db=s._db["meta"])
    s.close()
    with pytest.raises(StoreError, match=f"format {FORMAT_VERSION + 1}"):
        Store(path, map_size=8 << 20)
    with pytest.raises(StoreError, match="no store"):
        Store(str(tmp_path / "nothing"), create=False)


def test_a_format_3_store_is_upgraded_with_its_queued_entries(tmp_path, clock):
    """Format 3 kept msgpack [kind, t, origin, id, fan, frame] entries and
    [next, count, bytes] states: the upgrade rewrites both, so what was
    queued is delivered byte for byte as before and still yields receipts."""
    import msgpack

    from pigeon.core.node import Node
    from pigeon.core.tokens import DICTIONARIES

    path = str(tmp_path / "store")
    s = Store(path, map_size=64 << 20, clock=clock, sync="os")
    a, b = user(s, ALICE), user(s, BOB)
    b1 = s.link_device(BOB, b"j" * 32, KEYS)
    old = core_codec.Codec(DICTIONARIES[1])
    frames = {}
    with s.write() as txn:
        for dev in (b, b1):
            for seq, body in ((1, b"one"), (2, b"x" * 300)):
                attrs = {
                    "from": a,
                    "id": f"m{seq}",
                    "type": "text",
                    "t": str(clock.t),
                    "seq": str(seq),
                }
                frame = old.encode_frame(Node("message", attrs, body))
                frames[(dev, seq)] = frame
                value = msgpack.packb([0, clock.t, a, f"m{seq}", True, frame], use_bin_type=True)
                txn.put(dev.encode() + b"\0" + seq.to_bytes(8, "big"), value, db=s._db["queue"])
                txn.put(f"{a}\0m{seq}\0{BOB}".encode(), b"", db=s._db["fan"])
            txn.put(dev.encode(), msgpack.packb([3, 2, 999]), db=s._db["qstate"])
        txn.put(b"format", b"3", db=s._db["meta"])
    s.close()
    s = Store(path, map_size=64 << 20, clock=clock, sync="os")
    try:
        with s.read() as txn:
            assert int(txn.get(b"format", db=s._db["meta"])) == FORMAT_VERSION
        q = make_queues(s)
        for dev in (b, b1):
            assert q.read(dev, 0, 10) == [(1, frames[(dev, 1)]), (2, frames[(dev, 2)])]
            assert q.head(dev) == 3
        st = q.stats()
        assert st["count"] == 4 and st["bytes"] < 4 * 999
        pushes = q.commit([], {b1: 2})  # the first of bob's devices: two receipts
        evs = [decode(q.encoder.frame(p.entry, p.seq)) for p in pushes]
        assert [(p.device, e.type, e.id, e.sender) for p, e in zip(pushes, evs, strict=True)] == [
            (a, "delivered", "m1", BOB), (a, "delivered", "m2", BOB)
        ]  # fmt: skip
        assert q.commit([], {b: 2}) == []  # the fan records were kept: no second receipt
    finally:
        s.close()


def test_the_read_caches_are_exact_across_workers(store, clock):
    """Two workers' Queues over one store: a device linked, an account deleted or a
    block written by anyone is seen by the next commit of every worker."""
    from types import SimpleNamespace

    from pigeon.server.social import Social

    q1, q2 = make_queues(store), make_queues(store)
    a, b0 = user(store, ALICE), user(store, BOB)
    _, pushes = send(q1, a, BOB, "m1")
    assert [p.device for p in pushes] == [b0] and BOB in q1.device_cache
    b1 = store.link_device(BOB, b"j" * 32, KEYS)  # another process writes accounts
    _, pushes = send(q1, a, BOB, "m2")
    assert sorted(p.device for p in pushes) == sorted([b0, b1])
    social = Social(store, SimpleNamespace(blocklist_max=10))
    social.block(BOB, ALICE)  # bob blocks alice: her messages are acked and dropped
    s, pushes = send(q1, a, BOB, "m3")
    assert s.error is None and pushes == []
    social.unblock(BOB, ALICE)
    assert [p.device for p in send(q2, a, BOB, "m4")[1]] != []
    assert sorted(p.device for p in send(q1, a, BOB, "m5")[1]) == sorted([b0, b1])
    # where a device is connected: a login on another worker, then its logout
    store.set_session(b0, 7, 1)
    assert {p.device: p.worker for p in send(q1, a, BOB, "m6")[1]}[b0] == 7
    store.set_session(b0, 9, 2)
    assert {p.device: p.worker for p in send(q1, a, BOB, "m7")[1]}[b0] == 9
    store.clear_session(b0, 9, 2)
    assert {p.device: p.worker for p in send(q1, a, BOB, "m8")[1]}[b0] is None
    store.delete_account(BOB)
    s, _ = send(q1, a, BOB, "m9")
    assert s.error[0] == ErrorCode.UNKNOWN_RECIPIENT


def test_a_cache_version_moves_once_per_transaction(store, clock):
    """meta "ver" and "sver" move once for each write transaction that writes
    accounts or sessions, however many records it writes (a tick of logins:
    one move, not two per login); an aborted one moves nothing, and the next
    transaction moves them again; another worker's cache still follows."""
    meta = store._db["meta"]

    def versions():
        with store.read() as txn:
            return tuple(
                int.from_bytes(txn.get(k, db=meta) or b"", "big") for k in (b"ver", b"sver")
            )

    q = make_queues(store)
    a, b0 = user(store, ALICE), user(store, BOB)
    send(q, a, BOB, "m0")  # q's caches hold bob's devices and where b0 is connected
    ver, sver = versions()
    with store.write() as txn:
        for device in (a, b0):  # the primaries' last_login: two account writes
            store.note_login_txn(txn, device, clock.t + 10_000_000)
        store.set_session_txn(txn, a, 1, 1, clock.t)
        store.set_session_txn(txn, b0, 1, 2, clock.t)
    assert versions() == (ver + 1, sver + 1)
    assert {p.device: p.worker for p in send(q, a, BOB, "m1")[1]}[b0] == 1
    with pytest.raises(RuntimeError), store.write() as txn:
        store.set_session_txn(txn, b0, 2, 3, clock.t)
        raise RuntimeError("aborted")
    assert versions() == (ver + 1, sver + 1)
    with store.write() as txn:
        store.set_session_txn(txn, b0, 3, 4, clock.t)
    assert versions() == (ver + 1, sver + 2)
    assert {p.device: p.worker for p in send(q, a, BOB, "m2")[1]}[b0] == 3


def test_an_aborted_commit_leaves_no_cache_behind(store, clock):
    """A job removes a device inside a commit that then fails: the device list
    that commit saw (with the uncommitted change) must not outlive it, even
    when another writer's change brings the store's version to the same number."""

    class Boom(Exception):
        pass

    class Exploding(bytes):
        def __len__(self):
            raise Boom

    class FailingQueues(Queues):  # fails after the recipient's devices were looked up
        def _prepare(self, sends, now):
            super()._prepare(sends, now)
            sends[-1].entry = Exploding(b"")

    q = FailingQueues(store, QueueLimits(), FrameEncoder())
    a, b0 = user(store, ALICE), user(store, BOB)
    b1 = store.link_device(BOB, b"j" * 32, KEYS)
    with pytest.raises(Boom):
        q.commit([Send(a, "message", "m1", BOB, "text", b"x")], {},
                 jobs=[lambda txn, now: store.remove_device_txn(txn, b1, now)])  # fmt: skip
    user(store, CAROL)  # another writer: the version moves by one, as the aborted one did
    q.__class__ = Queues
    _, pushes = send(q, a, BOB, "m2")  # the removal never happened: both devices
    assert sorted(p.device for p in pushes) == sorted([b0, b1])


# -- format 5: multi-device fan-out (issue 15) ---------------------------------


def decode_any(frame):
    from pigeon.core.events import DevicesChanged

    node = core_codec.Codec().decode(frame[3:])
    cls = {"message": IncomingMessage, "receipt": IncomingReceipt, "devices": DevicesChanged}
    return cls[node.tag].from_node(node)


def test_a_message_goes_to_every_recipient_device_and_the_senders_other_devices(store, clock):
    q = make_queues(store)
    a0, b0 = user(store, ALICE), user(store, BOB)
    a1 = store.link_device(ALICE, b"j" * 32, KEYS)
    a2 = store.link_device(ALICE, b"j" * 32, KEYS)
    b1 = store.link_device(BOB, b"j" * 32, KEYS)
    s, pushes = send(q, a1, BOB, "m1", b"hi")
    assert s.error is None
    got = {p.device: decode_any(q.encoder.frame(p.entry, p.seq)) for p in pushes}
    assert sorted(got) == sorted([b0, b1, a0, a2])  # not back to a1
    for d in (b0, b1):
        assert (got[d].sender, got[d].to, got[d].body) == (a1, None, b"hi")
    for d in (a0, a2):
        assert (got[d].sender, got[d].to, got[d].body, got[d].t) == (a1, BOB, b"hi", clock.t)
    # the sync copies share one entry, the recipients another (stored once each)
    assert len({id(p.entry) for p in pushes}) == 2
    # acks of sync copies make no delivered receipt; bob's first ack makes one
    assert q.commit([], {a0: 1, a2: 1}) == []
    receipts = q.commit([], {b0: 1})
    assert sorted(p.device for p in receipts) == sorted([a0, a1, a2])
    assert q.commit([], {b1: 1}) == []


def test_read_receipts_are_synced_to_the_readers_other_devices(store):
    q = make_queues(store)
    a0, b0 = user(store, ALICE), user(store, BOB)
    b1 = store.link_device(BOB, b"j" * 32, KEYS)
    contact(store, ALICE, BOB)
    s, pushes = send(q, b0, ALICE, "m1", cls="receipt", typ="read")
    got = {p.device: decode_any(q.encoder.frame(p.entry, p.seq)) for p in pushes}
    assert sorted(got) == sorted([a0, b1])
    assert (got[a0].sender, got[a0].to, got[a0].type) == (BOB, None, "read")
    assert (got[b1].sender, got[b1].to, got[b1].type) == (BOB, ALICE, "read")
    assert q.commit([], {b1: 9, a0: 9}) == []


def test_per_device_payloads_must_match_the_lists_and_each_queue_holds_its_own(store):
    q = make_queues(store)
    a0, b0 = user(store, ALICE), user(store, BOB)
    a1 = store.link_device(ALICE, b"j" * 32, KEYS)
    b1 = store.link_device(BOB, b"j" * 32, KEYS)
    stale = ((b0, b"for b0"), (f"{BOB}:7", b"gone"))
    s = Send(a0, "message", "m1", BOB, "text", None, payloads=stale)
    assert q.commit([s], {}) == []
    assert s.error == (
        ErrorCode.STALE_DEVICES, s.error[1], (b1, a1), (f"{BOB}:7",)
    )  # fmt: skip
    assert q.stats()["count"] == 0
    good = ((b0, b"for b0"), (b1, b"for b1"), (a1, b"for a1"))
    s = Send(a0, "message", "m1", BOB, "text", None, payloads=good)  # the same id: fine
    pushes = q.commit([s], {})
    assert s.error is None
    got = {p.device: decode_any(q.encoder.frame(p.entry, p.seq)) for p in pushes}
    assert {d: (e.body, e.to) for d, e in got.items()} == {
        b0: (b"for b0", None), b1: (b"for b1", None), a1: (b"for a1", BOB)
    }  # fmt: skip
    again = Send(a0, "message", "m1", BOB, "text", None, payloads=good)
    assert q.commit([again], {}) == [] and again.t == s.t  # a retry: stored once
    receipts = q.commit([], {b1: 1})  # the fan record: one delivered receipt
    assert sorted(p.device for p in receipts) == sorted([a0, a1])
    assert q.commit([], {b0: 1, a1: 1}) == []
    # a device of the sender itself, or of a third user, is extra
    carol = user(store, CAROL)
    bad = Send(a0, "message", "m2", BOB, "text", None, payloads=(*good, (a0, b"x"), (carol, b"y")))
    q.commit([bad], {})
    assert bad.error[0] == ErrorCode.STALE_DEVICES and bad.error[2:] == ((), (a0, carol))


def test_device_to_device_and_notes_to_self(store):
    q = make_queues(store)
    a0 = user(store, ALICE)
    alone, pushes = send(q, a0, ALICE, "n0")
    assert alone.error is None and pushes == []  # one device: a note to self goes nowhere
    a1 = store.link_device(ALICE, b"j" * 32, KEYS)
    a2 = store.link_device(ALICE, b"j" * 32, KEYS)
    s, pushes = send(q, a0, ALICE, "n1", b"note")
    got = {p.device: decode_any(q.encoder.frame(p.entry, p.seq)) for p in pushes}
    assert {d: e.to for d, e in got.items()} == {a1: ALICE, a2: ALICE}
    s, pushes = send(q, a0, a2, "h1", b"bundle", typ="history")
    assert s.error is None and [p.device for p in pushes] == [a2]
    ev = decode_any(q.encoder.frame(pushes[0].entry, pushes[0].seq))
    assert (ev.sender, ev.to, ev.type, ev.body) == (a0, a2, "history", b"bundle")
    assert q.commit([], {a1: 9, a2: 9}) == []  # no delivered receipts
    gone, _ = send(q, a0, f"{ALICE}:9", "h2")
    assert gone.error[0] == ErrorCode.UNKNOWN_RECIPIENT


def test_devices_changed_notices_every_device_in_the_callers_transaction(store, clock):
    from pigeon.core.events import DevicesChanged

    q = make_queues(store)
    a0, b0 = user(store, ALICE), user(store, BOB)
    send(q, b0, ALICE, "m1")
    # directly, in a write transaction of the store
    with store.write() as txn:
        a1 = store._add_device(txn, ALICE, store._get(txn, "accounts", ALICE), b"k" * 32, KEYS,
                               clock.t)  # fmt: skip
        pushes = q.devices_changed(txn, ALICE, clock.t)
    assert [(p.device, p.seq) for p in pushes] == [(a0, 2), (a1, 1)]
    assert decode_any(q.encoder.frame(pushes[0].entry, 2)) == DevicesChanged(ALICE, clock.t, 2)
    assert [decode_any(f) for _, f in q.read(a1, 0, 9)] == [DevicesChanged(ALICE, clock.t, 1)]
    # as a job of a commit, beside sends: in order, one transaction
    got = []

    def job(txn, now):
        store.remove_device_txn(txn, a1, now)
        got.extend(q.devices_changed(txn, ALICE, now))

    clock.t += 5
    s = Send(b0, "message", "m2", ALICE, "text", b"x")
    pushes = q.commit([s], {a0: 2}, jobs=[job])
    assert [(p.device, p.seq) for p in got] == [(a0, 3)]  # the removed device gets none
    assert [(p.device, p.seq) for p in pushes] == [(b0, 1), (a0, 4)]  # b0: m1 delivered
    assert [decode_any(f).__class__.__name__ for _, f in q.read(a0, 0, 9)] == [
        "DevicesChanged", "IncomingMessage"
    ]  # fmt: skip
    assert q.commit([], {a0: 4}) and q.read(a0, 0, 9) == []  # acked like any entry


@pytest.mark.parametrize("old", [b"4", b"5", b"6", b"8"])
def test_a_format_4_5_6_or_8_store_is_upgraded_with_its_entries_waiting(tmp_path, clock, old):
    """Format-4, 5 and 6 entries are format-9 entries (6 adds the key notices'
    kind and the key tables, 7 the group kinds and tables, 8 shortens the group
    references, which these formats do not have, 9 adds records the older
    formats read as none): the upgrade writes the number, and what waited is
    delivered as before and still yields its receipts."""
    path = str(tmp_path / "store")
    s = Store(path, map_size=64 << 20, clock=clock, sync="os")
    a, b = user(s, ALICE), user(s, BOB)
    b1 = s.link_device(BOB, b"j" * 32, KEYS)
    q = make_queues(s)
    send(q, a, BOB, "m1", b"one")
    send(q, a, BOB, "m2", b"two")
    before = {d: q.read(d, 0, 10) for d in (b, b1)}
    with s.write() as txn:
        txn.put(b"format", old, db=s._db["meta"])
    s.close()
    s = Store(path, map_size=64 << 20, clock=clock, sync="os")
    try:
        with s.read() as txn:
            assert int(txn.get(b"format", db=s._db["meta"])) == FORMAT_VERSION == 9
        q = make_queues(s)
        assert {d: q.read(d, 0, 10) for d in (b, b1)} == before
        assert [decode_any(f).body for _, f in before[b]] == [b"one", b"two"]
        assert len(q.commit([], {b: 2})) == 2 and q.commit([], {b1: 2}) == []
    finally:
        s.close()


def test_entry_kinds_and_flags_in_both_codecs(impl):
    from pigeon.core.events import DevicesChanged
    from pigeon.core.tokens import DICTIONARIES

    c = impl.Codec(DICTIONARIES[1])
    py = core_codec.implementations()["python"].Codec(DICTIONARIES[1])
    cases = [
        ((0, 5, 2, ALICE + ":1", "m1", "text", b"body", BOB),
         IncomingMessage(ALICE + ":1", "m1", "text", 5, 9, b"body", BOB)),
        ((1, 5, 2, ALICE, "m1", "read", None, BOB),
         IncomingReceipt(ALICE, "m1", "read", 5, 9, BOB)),
        ((2, 5, 0, ALICE, "", ""), DevicesChanged(ALICE, 5, 9)),
    ]  # fmt: skip
    for args, ev in cases:
        entry = c.queue_entry(*args)
        assert entry == py.queue_entry(*args) and entry[9] == args[2]
        out = bytearray()
        c.write_entry_frame(out, entry, 9)
        assert bytes(out) == c.encode_frame(ev.to_node(impl.Node))
    with pytest.raises(ValueError):
        c.queue_entry(2, 5, 0, ALICE, "m1", "")  # a notice has no id
    with pytest.raises(ValueError):
        c.queue_entry(3, 5, 0, ALICE, "m1", "")


def test_a_commit_of_jobs_alone_touches_nothing_for_messages(store, clock):
    """A tick of logins (session records and nothing else) reads and writes no
    dedup generation: its commit holds LMDB's one writer for the jobs' work only.
    Messages after it are deduplicated as before."""
    from pigeon.server.queues import _DEDUP_META

    q = make_queues(store)
    a, b = user(store, ALICE), user(store, BOB)
    meta = store._db["meta"]
    q.commit([], {}, jobs=[lambda txn, now: store.set_session_txn(txn, a, 1, 1, now)])
    with store.read() as txn:
        assert txn.get(_DEDUP_META, db=meta) is None
        assert store._get(txn, "sessions", a)["worker"] == 1
    s1, _ = send(q, b, ALICE, "m1")
    clock.t += 1000
    s2, pushes = send(q, b, ALICE, "m1")  # a retry: the same ack, stored once
    assert s1.error is None and s2.error is None and s2.t == s1.t and pushes == []
    with store.read() as txn:
        assert txn.get(_DEDUP_META, db=meta) is not None


def test_queued_txn_counts_what_waits_as_a_read_finds_it(store, clock, impl):
    """What a login reads with its session record to decide whether to read the
    queue at all: the count of entries, 0 for a new device and once all are acked."""
    q = make_queues(store, impl)
    a, b = user(store, ALICE), user(store, BOB)

    def queued(device):
        with store.read() as txn:
            return q.queued_txn(txn, device)

    assert queued(b) == 0
    for i in range(3):
        send(q, a, BOB, f"m{i}")
    assert queued(b) == len(q.read(b, 0, 100)) == 3
    q.commit([], {b: 2})
    assert queued(b) == len(q.read(b, 0, 100)) == 1 and queued(a) == 2  # receipts for alice
    q.commit([], {b: 99, a: 99})
    assert queued(b) == queued(a) == 0 and q.read(b, 0, 100) == []


def test_message_digest_is_the_stored_formula():
    """A dedup record's digest is blake2b-128 of ``to NUL type NUL`` and the body
    (with each payload's ``NUL device NUL length NUL`` and bytes before it): the
    one-call form for a plain 1:1 body and the incremental one give the same
    bytes, so a retry of a message stored before this code is still known."""
    import hashlib
    import random

    from pigeon.server.queues import _digest

    def stored(to, typ, body, payloads=None):
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{to}\x00{typ}\x00".encode())
        for device, payload in payloads or ():
            h.update(f"\x00{device}\x00{len(payload)}\x00".encode())
            h.update(payload)
        if body is not None:
            h.update(body)
        return h.digest()

    rnd = random.Random(14)
    for _ in range(300):
        to = str(rnd.randrange(10**7, 10**15))
        typ = rnd.choice(["text", "media", "retry", "t" * 64])
        body = rnd.randbytes(rnd.randrange(0, 400))
        assert _digest(to, typ, body) == stored(to, typ, body)
        assert _digest(to, typ, memoryview(body)) == stored(to, typ, body)
        payloads = ((f"{to}:0", body), (f"{to}:1", body[:7]))
        assert _digest(to, typ, None, payloads) == stored(to, typ, None, payloads)
        assert _digest("g:" + to, typ, body, payloads) == stored("g:" + to, typ, body, payloads)
    # (a digest that left out the type, or the separator, would differ)
    assert _digest("491701234567", "text", b"ab") != _digest("491701234567", "tex", b"tab")
