"""Count the LMDB operations of the group commit, per message, per ack and per receipt.

    python -m pigeon.bench.store_ops                   # the table, and what each commit wrote
    python -m pigeon.bench.store_ops docs/STORE.md     # rewrite the table in the design note
    python -m pigeon.bench.store_ops --check docs/STORE.md   # fail if it is stale

Each scenario runs one ``Queues.commit`` holding exactly one item (a
message, a read receipt or a device ack) on a real store in a temp dir,
through an environment whose transactions count every call into LMDB by
table: ``get``, ``put``, ``del`` (a delete by key or at a cursor), ``seek``
(a cursor's set_range) and ``next`` (a cursor step; a cursor delete also
steps, and is counted as ``del``).  Reading the key or value under a cursor
is not an operation: it searches nothing.  Every commit also reads the
dedup generation from ``meta`` (one ``get``), included in each row.

The generated table (between the BEGIN/END store-ops markers of
docs/STORE.md) holds only these counts, which depend on pigeon's code
alone; tests/test_store_ops.py fails when the code and the note disagree.
What each commit then costs LMDB (bytes written and write system calls,
from /proc/self/io, writemap off; LMDB writes whole pages) depends on the
LMDB version and on what the store holds, so it is printed here but not
checked.
"""

from __future__ import annotations

import collections
import os
import re
import sys
import tempfile

from pigeon.core.events import GroupRequest
from pigeon.server.groups import GroupLimits, Groups
from pigeon.server.queues import QueueLimits, Queues, Send
from pigeon.server.store import Store

ALICE, BOB, CAROL, DAVE = "491701234567", "4915112345678", "447700900123", "14155550100"
KEYS = (b"salt", b"stored", b"server", 4096)
OPS = ("get", "put", "del", "seek", "next", "batch")
_MARK = re.compile(r"(<!-- BEGIN store-ops -->\n)(.*?)(<!-- END store-ops -->)", re.S)


class Tally:
    """Operations by (table, kind), for the tables of one store."""

    def __init__(self, store: Store):
        self.names = {id(dbi): name for name, dbi in store._db.items()}
        self.ops: collections.Counter = collections.Counter()

    def note(self, op: str, db) -> None:
        self.ops[(self.names.get(id(db), "main"), op)] += 1


class _Cursor:
    def __init__(self, cur, tally: Tally, db):
        self._c, self._t, self._db = cur, tally, db

    def set_range(self, key):
        self._t.note("seek", self._db)
        return self._c.set_range(key)

    def next(self):
        self._t.note("next", self._db)
        return self._c.next()

    def delete(self, dupdata=False):
        self._t.note("del", self._db)
        return self._c.delete(dupdata)

    def getmulti(self, keys, *args, **kw):  # one call: a get per key, and the batch
        keys = list(keys)
        self._t.ops[(self._t.names.get(id(self._db), "main"), "get")] += len(keys)
        self._t.note("batch", self._db)
        return self._c.getmulti(keys, *args, **kw)

    def putmulti(self, items, *args, **kw):  # one call: a put per item, and the batch
        items = list(items)
        self._t.ops[(self._t.names.get(id(self._db), "main"), "put")] += len(items)
        self._t.note("batch", self._db)
        return self._c.putmulti(items, *args, **kw)

    def __iter__(self):
        while True:
            key = self._c.key()
            if not key:
                return
            yield key, self._c.value()
            if not self.next():
                return

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._c.close()

    def __getattr__(self, name):  # key(), value(), close(): no search
        return getattr(self._c, name)


class _Txn:
    def __init__(self, txn, tally: Tally):
        self._txn, self._t = txn, tally

    def get(self, key, default=None, db=None):
        self._t.note("get", db)
        return self._txn.get(key, default, db=db)

    def put(self, key, value, db=None, **kw):
        self._t.note("put", db)
        return self._txn.put(key, value, db=db, **kw)

    def delete(self, key, value=b"", db=None):
        self._t.note("del", db)
        return self._txn.delete(key, value, db=db)

    def cursor(self, db=None):
        return _Cursor(self._txn.cursor(db=db), self._t, db)

    def drop(self, db, delete=True):
        self._t.note("del", db)
        return self._txn.drop(db, delete=delete)

    def __enter__(self):
        self._txn.__enter__()
        return self

    def __exit__(self, *exc):
        return self._txn.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self._txn, name)


class _Env:
    """The store's environment, handing out counting transactions."""

    def __init__(self, env, tally: Tally):
        self._env, self._t = env, tally

    def begin(self, **kw):
        return _Txn(self._env.begin(**kw), self._t)

    def __getattr__(self, name):
        return getattr(self._env, name)


def _io() -> tuple[int, int] | None:
    """(bytes written, write system calls) of this process so far; None without /proc."""
    try:
        with open("/proc/self/io") as f:
            fields = dict(line.split(": ") for line in f.read().splitlines())
        return int(fields["wchar"]), int(fields["syscw"])
    except (OSError, KeyError, ValueError):
        return None


class Bench:
    """A store with four users (CAROL has two devices) and a counting Queues over it."""

    def __init__(self, path: str, *, receipts: bool = True, new_chats: int = 0,
                 writemap: bool = False):  # fmt: skip
        self.store = Store(path, map_size=256 << 20, sync="os", writemap=writemap)
        self.dev = {}
        for phone in (ALICE, BOB, CAROL, DAVE):
            self.dev[phone] = self.store.register_device(phone, b"i" * 32, KEYS)[0]
        self.carol2 = self.store.link_device(CAROL, b"j" * 32, KEYS)
        self.tally = Tally(self.store)
        self.q = Queues(self.store, QueueLimits(new_chats=new_chats), receipts=receipts)
        self.n = 0
        # the first commits write the dedup (and new-chats) generation records once
        self.send(DAVE, CAROL)
        self.clear()
        self.q.env = _Env(self.store.env, self.tally)

    def close(self) -> None:
        self.store.close()

    def send(self, frm: str, to: str, cls: str = "message", mid: str | None = None,
             typ: str = "text", payloads=None, device: str | None = None) -> Send:  # fmt: skip
        if mid is None:
            self.n += 1
            mid = f"m{self.n}"
        body = b"x" * 100 if cls == "message" and not payloads else None
        s = Send(device or self.dev[frm], cls, mid, to, typ, body, payloads=payloads)
        self.q.commit([s], {})
        assert s.error is None, s.error
        return s

    def clear(self) -> None:
        """Ack every queue empty (twice: acks queue delivered receipts), uncounted."""
        env, self.q.env = self.q.env, self.store.env
        for _ in range(2):
            for device in (*self.dev.values(), self.carol2):
                self.ack(device)()
        self.q.env = env

    def ack(self, device: str):
        """A commit acking everything queued for ``device`` (its head read beforehand)."""
        with self.store.env.begin() as txn:
            raw = txn.get(device.encode(), db=self.store._db["qstate"])
        upto = 0 if raw is None else int.from_bytes(raw[:8], "big") - 1
        return lambda: self.q.commit([], {device: upto})

    def measure(self, fn) -> tuple[collections.Counter, tuple[int, int] | None]:
        """The operations of ``fn`` (one commit), and the bytes and write calls it cost."""
        self.tally.ops.clear()
        before = _io()
        fn()
        after = _io()
        io = None if before is None or after is None else (
            after[0] - before[0], after[1] - before[1])  # fmt: skip
        return collections.Counter(self.tally.ops), io


def scenarios(tmp: str, writemap: bool = False):
    """(name, operations, io) of each scenario, in the order of the table."""
    out = []

    def run(name, fn, bench):
        ops, io = bench.measure(fn)
        out.append((name, ops, io))

    b = Bench(os.path.join(tmp, "a"), writemap=writemap)
    try:
        run("commit with nothing in it", lambda: b.q.commit([], {}), b)
        run("message to a user with 1 device", lambda: b.send(ALICE, BOB), b)
        run("message to a user with 2 devices", lambda: b.send(ALICE, CAROL), b)
        b.send(ALICE, BOB)
        run("message retried (dedup hit)", lambda: b.send(ALICE, BOB, mid=f"m{b.n}"), b)
        b.clear()
        b.send(ALICE, BOB)
        run("device ack of 1 message (delivered receipt to 1 device)", b.ack(b.dev[BOB]), b)
        run("delivered receipt acked by its device", b.ack(b.dev[ALICE]), b)
        for _ in range(16):
            b.send(ALICE, BOB)
        run("device ack of 16 messages (cumulative)", b.ack(b.dev[BOB]), b)
        b.clear()
        b.send(BOB, CAROL)
        run("device ack, first of 2 devices (receipt written)", b.ack(b.dev[CAROL]), b)
        run("device ack, second of 2 devices (no receipt)", b.ack(b.carol2), b)
        b.clear()
        # a receipt about a message its recipient sent (one about none, to a
        # user who does not know the sender, is dropped: Queues._receipt_wanted)
        read = b.send(ALICE, BOB).id
        b.clear()
        run("read receipt to a user with 1 device",
            lambda: b.send(BOB, ALICE, cls="receipt", mid=read, typ="read"), b)  # fmt: skip
        run("read receipt acked by its device", b.ack(b.dev[ALICE]), b)
        b.clear()
        # multi-device: what an extra device copy costs
        run("message from a user with 2 devices (1 sync copy)", lambda: b.send(CAROL, BOB), b)
        run("sync copy acked by its device (no receipt)", b.ack(b.carol2), b)
        b.clear()
        run("message with per-device payloads to a user with 2 devices",
            lambda: b.send(ALICE, CAROL, payloads=((b.dev[CAROL], b"x" * 100),
                                                   (b.carol2, b"y" * 100))), b)  # fmt: skip
        read = b.send(ALICE, CAROL).id
        b.clear()
        run("read receipt from a user with 2 devices (1 read-sync copy)",
            lambda: b.send(CAROL, ALICE, cls="receipt", mid=read, typ="read"), b)  # fmt: skip
        b.clear()
        run("device-to-device message", lambda: b.send(CAROL, b.carol2, typ="history"), b)
    finally:
        b.close()
    b = Bench(os.path.join(tmp, "g"), writemap=writemap)
    try:  # a group of the four users (5 devices: CAROL has two), created uncounted
        env, b.q.env = b.q.env, b.store.env
        groups = Groups(b.store, b.q, GroupLimits())
        with b.store.write() as txn:
            res, _ = groups.handle(txn, b.store.clock(), ALICE,
                                   GroupRequest("c1", "create", None, (BOB, CAROL, DAVE), "g"))  # fmt: skip
        gid = res.group
        b.send(ALICE, gid)  # the caches warm (the group, its devices, the fan-out plan)
        b.clear()
        b.q.env = env
        run("group message to 4 members (4 other devices)", lambda: b.send(ALICE, gid), b)
        run("group reference acked (member's delivered receipt, coalesced)",
            b.ack(b.dev[BOB]), b)  # fmt: skip
        run("group reference acked, first of 2 devices", b.ack(b.dev[CAROL]), b)
        run("group reference acked, second of 2 devices", b.ack(b.carol2), b)
        run("group reference acked by the last device (body deleted)", b.ack(b.dev[DAVE]), b)
    finally:
        b.close()
    b = Bench(os.path.join(tmp, "b"), receipts=False, writemap=writemap)
    try:
        b.send(ALICE, BOB)
        run("device ack of 1 message, delivered-receipts off", b.ack(b.dev[BOB]), b)
    finally:
        b.close()
    b = Bench(os.path.join(tmp, "c"), new_chats=100, writemap=writemap)
    try:
        run("message with new-chats on: a new conversation", lambda: b.send(ALICE, BOB), b)
        run("message with new-chats on: the conversation again", lambda: b.send(ALICE, BOB), b)
    finally:
        b.close()
    return out


def _cell(ops: collections.Counter) -> str:
    tables = sorted({t for t, _ in ops})
    parts = []
    for t in tables:
        kinds = " ".join(f"{ops[(t, k)]} {k}" for k in OPS if ops[(t, k)])
        parts.append(f"{t}: {kinds}")
    return "; ".join(parts)


def table(rows) -> str:
    """The generated section of docs/STORE.md."""
    out = [
        "| one commit holding | LMDB operations, by table | ops | B-trees read / written |",
        "|---|---|---|---|",
    ]
    for name, ops, _io in rows:
        written = {t for (t, k), n in ops.items() if k in ("put", "del") and n}
        read = {t for t, _ in ops}
        out.append(f"| {name} | {_cell(ops)} | {sum(ops.values())} | "
                   f"{len(read)} / {len(written)} |")  # fmt: skip
    return "\n".join(out) + "\n"


def render(text: str, rows) -> str:
    if not _MARK.search(text):
        raise KeyError("no <!-- BEGIN store-ops --> ... <!-- END store-ops --> section")
    return _MARK.sub(lambda m: m.group(1) + table(rows) + m.group(3), text)


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in args
    paths = [a for a in args if a != "--check"]
    with tempfile.TemporaryDirectory(prefix="pigeon-store-ops-") as tmp:
        rows = scenarios(tmp)
    if not paths:
        print(table(rows))
        print("bytes written and write calls of each commit (writemap off, sync os):")
        for name, _ops, io in rows:
            print(f"  {name}: " + ("unknown (no /proc/self/io)" if io is None
                                   else f"{io[0]} bytes in {io[1]} write calls"))  # fmt: skip
        return 0
    if len(paths) != 1:
        print("usage: python -m pigeon.bench.store_ops [--check] [docs/STORE.md]", file=sys.stderr)
        return 2
    with open(paths[0], encoding="utf-8") as f:
        text = f.read()
    try:
        new = render(text, rows)
    except KeyError as exc:
        print(f"{paths[0]}: {exc.args[0]}", file=sys.stderr)
        return 1
    if check:
        if new != text:
            print(f"{paths[0]} is out of date: run python -m pigeon.bench.store_ops {paths[0]}",
                  file=sys.stderr)  # fmt: skip
            return 1
        return 0
    with open(paths[0], "w", encoding="utf-8") as f:
        f.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
