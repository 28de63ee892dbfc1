"""1:1 copies and device acks (issues 14 and 15): the per-device kernels
(``copies``, ``copies_room``, ``ack_walk``) of both implementations give the same
answers and leave the same states, and the stores a multi-device conversation
drives through each end up byte-for-byte the same."""

import random
import struct

import lmdb
import pytest

from pigeon.core.errors import ErrorCode
from pigeon.server.queues import FrameEncoder, QueueLimits, Queues, Send
from pigeon.server.store import Store

KEYS = (b"salt", b"stored", b"server", 4096)
QS = struct.Struct(">QQQ")
MISSING = object()


def copies_case(seed: int):
    rnd = random.Random(seed)
    n = rnd.randint(1, 6)
    dstrs = [f"49{rnd.randint(10**9, 10**10):010d}:{d}" for d in range(n)]
    dks = [d.encode() for d in dstrs]
    stored = {dk: QS.pack(rnd.randint(1, 1 << 40), rnd.randint(0, 12), rnd.randint(0, 5000))
              for dk in dks if rnd.random() < 0.5}  # fmt: skip
    states = {dk: QS.pack(rnd.randint(1, 1 << 40), rnd.randint(0, 12), rnd.randint(0, 5000))
              for dk in dks if dk not in stored and rnd.random() < 0.5}  # fmt: skip
    if rnd.random() < 0.5:
        entries = bytes(rnd.randint(10, 300))
    else:
        entries = [bytes(rnd.randint(10, 300)) for _ in dks]
    skip = rnd.choice([None, rnd.choice(dks)])
    sessions = {d: rnd.choice((None, 0, 1, MISSING)) for d in dstrs if rnd.random() < 0.8}
    limits = rnd.randint(0, 14), rnd.randint(0, 6000)
    return dks, dstrs, entries, skip, states, stored, sessions, *limits


@pytest.mark.parametrize("seed", range(80))
def test_both_copies_give_the_same_answer_and_states(both, seed):
    got = []
    for impl in both:
        dks, dstrs, entries, skip, states, stored, sessions, lim_n, lim_b = copies_case(seed)
        loads, asked = [], []

        def load(dk, stored=stored, loads=loads):
            loads.append(dk)
            return stored.get(dk)

        def worker_of(d, asked=asked):
            asked.append(d)
            return 7

        room = [impl.copies_room(dks, entries, skip, dict(states), load, lim_n, lim_b,
                                 lim_n // 2, lim_b // 2, t) for t in (0, len(dks))]  # fmt: skip
        items, pushes = [], []
        n = impl.copies(dks, dstrs, entries, skip, states, load, items, pushes, sessions,
                        MISSING, worker_of)  # fmt: skip
        got.append((room, n, items, [(p.device, p.seq, p.entry, p.worker) for p in pushes],
                    states, loads, asked, [repr(p) for p in pushes]))  # fmt: skip
    assert got[0] == got[1]
    room, n, items, pushes, states, loads, asked, _ = got[0]
    want = [i for i, dk in enumerate(copies_case(seed)[0]) if dk != copies_case(seed)[3]]
    assert n == len(items) == len(pushes) == len(want)
    for (key, entry), (device, seq, pentry, _) in zip(items, pushes, strict=True):
        assert key == device.encode() + b"\x00" + seq.to_bytes(8, "big") and entry is pentry
        assert QS.unpack(states[device.encode()])[0] == seq + 1


def test_copies_reject_what_they_cannot_read(both):
    for impl in both:
        dks, dstrs = [b"4915112345678:0"], ["4915112345678:0"]
        for states in ({dks[0]: b"short"},):
            with pytest.raises(ValueError):
                impl.copies(dks, dstrs, b"e", None, states, lambda dk: None, [], [], {},
                            MISSING, lambda d: None)  # fmt: skip
            with pytest.raises(ValueError):
                impl.copies_room(dks, b"e", None, states, lambda dk: None, 9, 9, 9, 9, 1)
        with pytest.raises(ValueError):  # one entry per device, or one for all
            impl.copies(dks, dstrs, [b"a", b"b"], None, {}, lambda dk: None, [], [], {},
                        MISSING, lambda d: None)  # fmt: skip


def queue_db(path):
    env = lmdb.open(str(path), map_size=64 << 20, max_dbs=2)
    return env, env.open_db(b"queue")


@pytest.mark.parametrize("seed", range(30))
def test_both_ack_walks_delete_and_list_the_same(tmp_path, both, seed):
    rnd = random.Random(seed)
    devices = [b"4915112345678:0", b"4915112345678:1", b"4915112345679:0"]
    rows = []
    for dev in devices:
        for seq in range(1, rnd.randint(1, 20)):
            kind = rnd.choice((0, 0, 0, 1, 2, 6, 7))
            flags = rnd.choice((0, 1, 2, 3))
            rows.append((dev + b"\x00" + seq.to_bytes(8, "big"),
                         bytes((kind,)) + bytes(8) + bytes((flags,)) + bytes(rnd.randint(2, 40))))  # fmt: skip
    device = rnd.choice(devices)
    upto = rnd.randint(0, 22)
    limit = rnd.choice((-1, -1, 0, 1, 3, 50))
    receipts = rnd.random() < 0.7
    got = []
    for n, impl in enumerate(both):
        env, db = queue_db(tmp_path / f"e{n}")
        with env.begin(write=True) as txn:
            for k, v in rows:
                txn.put(k, v, db=db)
            with txn.cursor(db=db) as c:
                out = impl.ack_walk(c, device + b"\x00", device + b"\x00" + upto.to_bytes(8, "big"),
                                    limit, receipts)  # fmt: skip
            left = list(txn.cursor(db=db))
        env.close()
        got.append((out, left))
    assert got[0] == got[1]
    (deleted, nbytes, listed, done), left = got[0]
    mine = [(k, v) for k, v in rows if k.startswith(device + b"\x00")
            and int.from_bytes(k[-8:], "big") <= upto]  # fmt: skip
    gone = mine if limit < 0 else mine[:limit]
    assert deleted == len(gone) and done == (len(gone) == len(mine))
    assert left == sorted(r for r in rows if r not in gone)
    assert listed == [v for _, v in gone if v[0] in (6, 7)
                      or receipts and v[0] == 0 and not v[9] & 2]  # fmt: skip
    assert nbytes == sum(len(v) for _, v in gone if v[0] not in (6, 7))


def conversation(path, impl):
    """Three users with 1 to 3 devices writing to each other, some acks, some
    full queues: every kind of 1:1 copy (recipients, sync copies, receipts)."""
    clock = iter(range(1_700_000_000_000, 1_800_000_000_000, 7))
    store = Store(str(path), map_size=256 << 20, sync="os", clock=lambda: next(clock))
    phones = ["4915111111111", "4915122222222", "4915133333333"]
    devs = {p: [store.register_device(p, b"i" * 32, KEYS)[0]] for p in phones}
    for p, extra in zip(phones, (2, 1, 0), strict=True):
        for _ in range(extra):
            devs[p].append(store.link_device(p, b"j" * 32, KEYS))
    q = Queues(store, QueueLimits(max_count=9), FrameEncoder(impl=impl))
    rnd = random.Random(5)
    answers = []
    acked = {d: 0 for ds in devs.values() for d in ds}
    for i in range(60):
        sender = rnd.choice(phones)
        dev = rnd.choice(devs[sender])
        to = rnd.choice(phones)
        if rnd.random() < 0.2:
            s = Send(dev, "receipt", f"m{rnd.randrange(i + 1)}", to, "read")
        else:
            s = Send(dev, "message", f"m{i}", to, "text", bytes([i]) * rnd.randint(1, 60))
        acks = {}
        for d in rnd.sample(list(acked), 2):
            acked[d] += rnd.randint(0, 4)
            acks[d] = acked[d]
        pushes = q.commit([s], acks, ack_limit=rnd.choice((None, None, 2)))
        answers.append((s.t, s.error, sorted((p.device, p.seq, p.entry) for p in pushes)))
    with store.read() as txn:
        dump = {name: list(txn.cursor(db=store._db[name])) for name in ("queue", "qstate", "fan",
                                                                        "dedup0")}  # fmt: skip
    store.close()
    return answers, dump


def test_both_implementations_store_the_same_conversation(tmp_path, both):
    a, b = (conversation(tmp_path / f"s{n}", impl) for n, impl in enumerate(both))
    assert a == b
    answers, dump = a
    assert any(e is not None and e[0] == ErrorCode.QUEUE_FULL for _, e, _ in answers)
    assert sum(e is None for _, e, _ in answers) > 30
    assert dump["queue"] and dump["qstate"]
    # every state counts exactly what its queue holds
    counts = {}
    for k, v in dump["queue"]:
        c = counts.setdefault(k[:-9], [0, 0])
        c[0] += 1
        c[1] += len(v)
    for dk, raw in dump["qstate"]:
        assert list(QS.unpack(raw)[1:]) == counts.get(dk, [0, 0])


def plain_conversation(path, impl, plain: bool, seed: int, new_chats: int = 0,
                       receipts: bool = True, stand_in: bool = False):  # fmt: skip
    """Four users with 1 to 3 devices and a number that is not a user, commits of
    1 to 6 sends in every shape (plain messages, retries, reused ids, receipts,
    notes to self, device-to-device, per-device payloads, blocked users, full
    queues, the stranger limits, a device linked midway) and random acks: what
    ``Queues.commit`` answers, pushes and stores, with the plain 1:1 messages
    in the codec's ``store_plain`` (``plain``) or each through ``_store_one``.
    ``stand_in``: the entries are made through a stand-in for the codec's
    ``queue_entry`` (the compiled loops call it; the codec's own they call in C)."""
    from pigeon.core.events import GroupRequest
    from pigeon.server.groups import GroupLimits, Groups
    from pigeon.server.social import pair
    from pigeon.server.store import bump_version

    clock = iter(range(1_700_000_000_000, 1_800_000_000_000, 97))  # (dedup generations turn)
    store = Store(str(path), map_size=256 << 20, sync="os", clock=lambda: next(clock))
    phones = ["4915111111111", "4915122222222", "4915133333333", "4915144444444"]
    devs = {p: [store.register_device(p, b"i" * 32, KEYS)[0]] for p in phones}
    for p, extra in zip(phones, (2, 1, 0, 1), strict=True):
        for _ in range(extra):
            devs[p].append(store.link_device(p, b"j" * 32, KEYS))
    lim = QueueLimits(max_count=14, stranger_count=8, new_chats=new_chats, dedup_window_ms=2500)
    q = Queues(store, lim, FrameEncoder(impl=impl), receipts=receipts)
    q.plain = plain
    if stand_in:
        entry = q._entry
        q._entry = lambda *a: entry(*a)
    db = store._db
    with store.write() as txn:  # a group of all four: its entries in the acks' walks
        res, _ = Groups(store, q, GroupLimits()).handle(
            txn, store.clock(), phones[0], GroupRequest("c1", "create", None, tuple(phones[1:]), "g"))  # fmt: skip
    gid = res.group
    rnd = random.Random(seed)
    answers, sent, stored_here, blocked = [], [], [], []
    inner = q.encoder.store_plain
    q.encoder.store_plain = lambda *a: stored_here.append(inner(*a))
    acked = {d: 0 for ds in devs.values() for d in ds}
    for c in range(60):
        if c == 30:  # a device linked midway: the device caches start again
            devs[phones[3]].append(store.link_device(phones[3], b"k" * 32, KEYS))
            acked[devs[phones[3]][-1]] = 0
        sends = []
        for i in range(rnd.randint(1, 6)):
            sender = rnd.choice(phones)
            dev = rnd.choice(devs[sender])
            to = rnd.choice([p for p in phones if p != sender] if rnd.random() < 0.8
                            else phones + ["4915199999999"])  # fmt: skip
            r = rnd.random()
            if sent and r < 0.1:  # a retry, or the same id for something else
                dev, mid, to, body = rnd.choice(sent)
                if rnd.random() < 0.3:
                    body = body + b"!"
                s = Send(dev, "message", mid, to, "text", body)
            elif r < 0.2:
                s = Send(dev, "receipt", f"m{rnd.randrange(c + 1)}.0", to,
                         rnd.choice(("read", "retry")))  # fmt: skip
            elif r < 0.25:
                s = Send(dev, "message", f"m{c}.{i}", rnd.choice(devs[sender]), "text", b"h")
            elif r < 0.34:
                s = Send(dev, "message", f"m{c}.{i}", gid, "text", b"g" * rnd.randint(1, 30))
            elif r < 0.38:
                mine = [d for d in devs[sender] if d != dev]
                payloads = [(d, b"p" + d.encode()) for d in devs.get(to, []) + mine
                            if to != sender or d != dev]  # fmt: skip
                if rnd.random() < 0.3 or not payloads:  # (a stale list: 408)
                    payloads = payloads[1:] or [(dev, b"p")]
                s = Send(dev, "message", f"m{c}.{i}", to, "text", payloads=tuple(payloads))
            else:
                body = bytes([c]) * rnd.randint(1, 80)
                typ = "retry" if rnd.random() < 0.1 else "text"
                s = Send(dev, "message", f"m{c}.{i}", to, typ, body)
                sent.append((dev, s.id, to, body))
            sends.append(s)
        jobs = []
        if rnd.random() < 0.1:  # a block (most soon undone) or a contact
            undo = bool(blocked) and rnd.random() < 0.6
            if undo:
                a, b = blocked.pop(rnd.randrange(len(blocked)))
                table = "blocks"
            else:
                a, b = rnd.sample(phones, 2)
                table = rnd.choice(("blocks", "contacts"))
                if table == "blocks":
                    blocked.append((a, b))

            def job(txn, now, a=a, b=b, table=table, undo=undo):
                if undo:
                    txn.delete(pair(a, b), db=db[table])
                else:
                    txn.put(pair(a, b), now.to_bytes(8, "big"), db=db[table])
                bump_version(txn, db)

            jobs.append(job)
        acks = {}
        for d in rnd.sample(list(acked), 4):
            acked[d] += rnd.randint(0, 8)
            acks[d] = acked[d]
        left = {}
        pushes = q.commit(sends, acks, ack_limit=rnd.choice((None, None, 3)), left=left,
                          jobs=jobs)  # fmt: skip
        answers.append(([(s.t, s.error, s.failed) for s in sends], left,
                        [(p.device, p.seq, p.entry, p.worker) for p in pushes]))  # fmt: skip
    with store.read() as txn:
        dump = {name: list(txn.cursor(db=db[name]))
                for name in ("queue", "qstate", "fan", "dedup0", "dedup1", "conv0", "conv1",
                             "limits", "blocks", "contacts", "gbody")}  # fmt: skip
    store.close()
    return answers, dump, sum(stored_here)


@pytest.mark.parametrize("seed,receipts", [(s, True) for s in range(6)] + [(6, False), (7, False)])
def test_plain_messages_store_as_store_one_does(tmp_path, both, seed, receipts):
    """The codec's ``store_plain`` (both implementations) against each send
    through ``_store_one``: the same answers, pushes in the same order, and
    byte-for-byte the same store."""
    runs = [plain_conversation(tmp_path / f"s{n}", impl, plain, seed, receipts=receipts,
                               stand_in=stand_in)
            for n, (impl, plain, stand_in) in enumerate([
                (both[1], False, False), (both[1], True, False), (both[0], True, False),
                (both[0], False, False), (both[1], True, True)])]  # fmt: skip
    base = runs[0][:2]
    for run in runs[1:]:
        assert run[:2] == base
    answers, dump, _ = runs[0]
    assert runs[0][2] == runs[3][2] == 0
    n_ok = sum(e is None for a in answers for _, e, _ in a[0])
    assert runs[1][2] == runs[2][2] == runs[4][2] and n_ok // 8 < runs[1][2] < n_ok  # many, not all
    errors = {e[0] for a in answers for _, e, _ in a[0] if e is not None}
    assert ErrorCode.QUEUE_FULL in errors and ErrorCode.ID_REUSED in errors
    assert dump["dedup0"] and any(e[0] == 0 and e[9] & 1 for a in answers for _, _, e, _ in a[2])


def test_plain_messages_with_the_new_chats_limit(tmp_path, both):
    """With the new-chats limit on, the plain messages still go through the loop,
    which makes ``_chat_allowed``'s check where ``_store_one`` makes it: the same
    answers (the limit's 404 included) and the same store."""
    runs = [plain_conversation(tmp_path / f"s{n}", impl, plain, 3, new_chats=2)
            for n, (impl, plain) in enumerate([(both[1], False), (both[1], True),
                                               (both[0], True)])]  # fmt: skip
    assert runs[1][:2] == runs[0][:2] == runs[2][:2]
    assert runs[1][2] == runs[2][2] > 0  # done in the loop, in both implementations
    assert any(e is not None and e[0] == ErrorCode.NEW_CHAT_LIMIT
               for a in runs[0][0] for _, e, _ in a[0])  # fmt: skip
