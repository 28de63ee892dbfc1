"""Groups on a real server with 2 workers and the real SDK (issue 17, the server side).

Members are placed on both workers (``on_other_worker``); offline members
log in later and read their queues.  The store is inspected with LMDB
itself (a read transaction on the server's store) to show that a group
message's body is stored once, whatever the member count.
"""

import asyncio
import itertools
import os

import pytest
from serverutil import Server, on_other_worker, until

from pigeon.client import Credentials, ServerError
from pigeon.core import _pycodec
from pigeon.core.errors import ErrorCode
from pigeon.core.events import GroupNotice, IncomingMessage, IncomingReceipt
from pigeon.core.node import Limits
from pigeon.core.tokens import LATEST
from pigeon.server.groups import notice_entry
from pigeon.server.provision import provision
from pigeon.server.queues import GREF, FrameEncoder, body_number
from pigeon.server.store import Store

PHONES = (f"4940{n:08d}" for n in itertools.count(30_000_000))
QUEUE_MAX = 8


def run(coro, timeout=240):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    # new-chats off: the big groups here are of strangers (adding one costs a new chat;
    # test_hardening::test_a_group_of_strangers_costs_new_chats)
    s = Server(tmp_path_factory.mktemp("groups") / "data", workers=2, register_per_ip=1000,
               message_rate=0, queue_max_count=QUEUE_MAX, new_chats=0)  # fmt: skip
    s.start()
    yield s
    assert s.stop() == 0, s.log_text()[-3000:]


def impls():
    out = [_pycodec]
    try:
        from pigeon.fastpath import _codec

        out.append(_codec)
    except ImportError:  # a build without the compiled path
        pass
    return out


def open_store(srv) -> Store:
    return Store(str(srv.data_dir / "store"), map_size=256 << 20, create=False)


def worker_of(srv, creds) -> int:
    phone = creds.device.partition(":")[0]
    return srv.sessions(phone)[creds.device]["worker"]


async def users(srv, n):
    """``n`` registered users: (phone, credentials) each."""
    out = []
    for _ in range(n):
        phone = next(PHONES)
        out.append((phone, await srv.register(phone)))
    return out


async def deliveries(client, n, timeout=15.0, receipts=None) -> list:
    """The next ``n`` messages and notices, each acked; group receipts in between
    are acked and go to ``receipts`` (a list), if given."""
    out = []
    while len(out) < n:
        ev = await client.next_event(timeout)
        await client.ack(ev.seq)
        if isinstance(ev, IncomingReceipt):
            if receipts is not None:
                receipts.append(ev)
            continue
        assert isinstance(ev, (IncomingMessage, GroupNotice)), ev
        out.append(ev)
    return out


async def group_receipts(client, users, timeout=15.0) -> dict:
    """Group receipts until every one of ``users`` is named: {user: receipt}."""
    got = {}
    while not set(users) <= set(got):
        ev = await client.next_event(timeout)
        await client.ack(ev.seq)
        assert isinstance(ev, IncomingReceipt), ev
        for u in ev.members:
            assert u not in got, f"{u} named twice"
            got[u] = ev
    return got


async def nothing_more(client, wait=0.5) -> None:
    await client.ping()
    with pytest.raises(asyncio.TimeoutError):
        await client.next_event(wait)


def gbody_records(srv, notices: bool = False) -> list[bytes]:
    """The keys of ``gbody``: the group message bodies' records (with ``notices``:
    the notice bodies' instead, numbers with the top bit set)."""
    store = open_store(srv)
    try:
        with store.read() as txn:
            return [bytes(k) for k, _ in txn.cursor(db=store._db["gbody"])
                    if bool(k[0] & 0x80) == notices]  # fmt: skip
    finally:
        store.close()


def refs_to_last_notice(srv) -> int:
    """The queue references to the newest notice body."""
    store = open_store(srv)
    try:
        with store.read() as txn:
            last = max(k[:8] for k in txn.cursor(db=store._db["gbody"]).iternext(values=False)
                       if k[0] & 0x80)  # fmt: skip
            return sum(v[0] == GREF and body_number(v) == last
                       for _, v in txn.cursor(db=store._db["queue"]))  # fmt: skip
    finally:
        store.close()


def queue_bytes(srv) -> int:
    """What the queues and ``gbody`` hold, in bytes of keys and values."""
    store = open_store(srv)
    try:
        with store.read() as txn:
            return sum(len(k) + len(v) for table in ("queue", "gbody")
                       for k, v in txn.cursor(db=store._db[table]))  # fmt: skip
    finally:
        store.close()


def refs_in_queues(srv, notices: bool = False) -> int:
    """The references in the queues to group message bodies (``notices``: to notice
    bodies, numbers with the top bit set)."""
    store = open_store(srv)
    try:
        with store.read() as txn:
            return sum(v[0] == GREF and bool(body_number(v)[0] & 0x80) == notices
                       for _, v in txn.cursor(db=store._db["queue"]))  # fmt: skip
    finally:
        store.close()


# -- the entry kinds, both codecs ----------------------------------------------------


@pytest.mark.parametrize("impl", impls(), ids=lambda m: m.IMPLEMENTATION)
def test_group_entries_splice_the_same_frames_in_both_codecs(impl):
    """A group message entry (kind 5) and a notice (kind 4) make the frames their
    events encode to, the same bytes in both codecs."""
    enc = FrameEncoder(impl=impl)
    reader = impl.Codec(LATEST, Limits())
    body = os.urandom(300)
    entry = enc.entry(5, 1763830000123, 0, "491701234567:1", "m1", "text", body, "g:12")
    frame = enc.frame(entry, 7)
    ev = IncomingMessage.from_node(reader.decode(memoryview(frame)[3:]))
    assert ev == IncomingMessage("491701234567:1", "m1", "text", 1763830000123, 7, body,
                                 group="g:12")  # fmt: skip
    assert frame == FrameEncoder(impl=_pycodec).frame(entry, 7)
    notice = notice_entry(enc, "g:12", "add", "491701234567", 5, ["4915112345678", "4917012345"], (),
                          "new rules")  # fmt: skip
    ev = GroupNotice.from_node(reader.decode(memoryview(enc.frame(notice, 9))[3:]))
    assert ev == GroupNotice("g:12", "add", "491701234567", 5, 9, ("4915112345678", "4917012345"),
                             (), "new rules")  # fmt: skip
    plain = notice_entry(enc, "g:3", "subject", "4917012345", 6, (), (("subject", "hi"),))
    ev = GroupNotice.from_node(reader.decode(memoryview(enc.frame(plain, 1))[3:]))
    assert ev == GroupNotice("g:3", "subject", "4917012345", 6, 1, (), (("subject", "hi"),))


# -- group life ----------------------------------------------------------------------


def test_group_life_roles_and_permissions(srv):
    async def main():
        (a, ac), (b, bc), (c, cc), (d, dc) = await users(srv, 4)
        alice, bob, carol = [await srv.login(x) for x in (ac, bc, cc)]
        res = await alice.group("create", subject="trip", members=[b, c, "4940999999999"])
        g = res.group
        assert g.startswith("g:") and res.get("subject") == "trip"
        assert res.failed == (("4940999999999", ErrorCode.UNKNOWN_RECIPIENT),)
        for cl in (alice, bob, carol):
            (n,) = await deliveries(cl, 1)
            assert (n.group, n.op, n.by, n.get("subject")) == (g, "create", a, "trip")
        info = await bob.group("info", g)
        assert [(m.user, m.role) for m in info.members] == [(a, "admin"), (b, "member"),
                                                           (c, "member")]  # fmt: skip
        assert (info.get("creator"), info.get("announce"), info.description) == (a, "0", None)
        assert [i[0] for i in (await carol.group("list")).items] == [g]
        # only admins change things; non-members see nothing
        for op, kw in (("add", {"members": [d]}), ("subject", {"subject": "x"}),
                       ("settings", {"announce": True}), ("invite", {})):  # fmt: skip
            with pytest.raises(ServerError) as e:
                await bob.group(op, g, **kw)
            assert e.value.code == ErrorCode.NOT_ADMIN
        dave = await srv.login(dc)
        with pytest.raises(ServerError) as e:
            await dave.group("info", g)
        assert e.value.code == ErrorCode.NOT_MEMBER
        # add (one already a member), promote, subject, description
        res = await alice.group("add", g, [d, b])
        assert res.failed == ((b, ErrorCode.ALREADY_MEMBER),)
        for cl in (alice, bob, carol, dave):
            (n,) = await deliveries(cl, 1)
            assert (n.op, n.by, n.members) == ("add", a, (d,))
        await alice.group("promote", g, [b])
        await bob.group("subject", g, subject="trip 2")
        await bob.group("description", g, description="bring boots")
        for cl in (alice, bob, carol, dave):
            got = await deliveries(cl, 3)
            assert [(n.op, n.by) for n in got] == [("promote", a), ("subject", b),
                                                   ("description", b)]  # fmt: skip
            assert got[0].members == (b,) and got[1].get("subject") == "trip 2"
            assert got[2].description == "bring boots"
        # remove: the removed member is told, then hears nothing more
        await alice.group("remove", g, [c])
        for cl in (alice, bob, carol, dave):
            (n,) = await deliveries(cl, 1)
            assert (n.op, n.members) == ("remove", (c,))
        await alice.send(g, b"after the removal")
        with pytest.raises(ServerError) as e:
            await carol.send(g, b"let me back")
        assert e.value.code == ErrorCode.NOT_MEMBER
        for cl in (bob, dave):
            (m,) = await deliveries(cl, 1)
            assert (m.group, m.sender, m.body) == (g, ac.device, b"after the removal")
        await nothing_more(carol)
        assert (await carol.group("list")).items == ()
        # announcement mode: only admins send
        res = await alice.group("settings", g, announce=True)
        assert res.get("announce") == "1"
        with pytest.raises(ServerError) as e:
            await dave.send(g, b"may I?")
        assert e.value.code == ErrorCode.ANNOUNCE_ONLY
        await bob.send(g, b"admins may")
        for cl in (alice, bob, dave):
            (n,) = await deliveries(cl, 1)
            assert (n.op, n.get("announce")) == ("settings", "1")
        for cl in (alice, dave):
            (m,) = await deliveries(cl, 1)
            assert m.body == b"admins may"
        # the admins leave: the longest-standing member left becomes admin
        await alice.group("leave", g)
        await bob.group("leave", g)
        got = await deliveries(dave, 3)
        assert [(n.op, n.by, n.members) for n in got] == [
            ("leave", a, (a,)), ("leave", b, (b,)), ("promote", b, (d,))
        ]  # fmt: skip
        info = await dave.group("info", g)
        assert [(m.user, m.role) for m in info.members] == [(d, "admin")]
        await dave.group("leave", g)  # nobody left: the group is gone
        store = open_store(srv)
        try:
            with store.read() as txn:
                assert txn.get(g[2:].encode(), db=store._db["groups"]) is None
        finally:
            store.close()
        with pytest.raises(ServerError) as e:
            await dave.group("info", g)
        assert e.value.code == ErrorCode.NOT_MEMBER
        for cl in (alice, bob, carol, dave):
            await cl.close()

    run(main())


# -- messages --------------------------------------------------------------------


def test_group_message_fans_out_across_workers_and_offline_members_catch_up(srv):
    """Every member device gets it but the sending one (its other device as a sync
    copy); an offline member gets the notices and messages in order at login."""

    async def main():
        (a, ac), (b, bc), (c, cc) = await users(srv, 3)
        a1 = srv.link_device(a)
        b1 = srv.link_device(b)
        alice = await srv.login(ac)
        alice1 = await on_other_worker(srv, a1, a, worker_of(srv, ac))
        bob = await srv.login(bc)
        bob1 = await on_other_worker(srv, b1, b, worker_of(srv, bc))
        g = (await alice.group("create", subject="team", members=[b, c])).group
        for cl in (alice, alice1, bob, bob1):
            (n,) = await deliveries(cl, 1)
            assert n.op == "create"
        ack = await alice.send(g, b"hello team", id="gm1")
        assert ack.failed == ()
        for cl in (alice1, bob, bob1):
            (m,) = await deliveries(cl, 1)
            assert (m.group, m.sender, m.id, m.body, m.t) == (g, ac.device, "gm1",
                                                             b"hello team", ack.t)  # fmt: skip
        (r,) = set((await group_receipts(alice, [b])).values())  # bob's first device's ack
        assert (r.sender, r.id, r.type, r.members) == (g, "gm1", "delivered", (b,))
        await nothing_more(alice)  # (carol is offline)
        # a retry is the same message: the same ack, stored once
        again = await alice.send(g, b"hello team", id="gm1")
        assert again.t == ack.t
        await nothing_more(bob)
        with pytest.raises(ServerError) as e:
            await alice.send(g, b"something else", id="gm1")
        assert e.value.code == ErrorCode.ID_REUSED
        await bob.send(g, b"from bob")
        await alice.group("subject", g, subject="team 2")
        # carol was offline all along: the create notice, both messages, the subject
        carol = await srv.login(cc)
        got = await deliveries(carol, 4)
        assert [(type(x).__name__, getattr(x, "op", None) or x.body) for x in got] == [
            ("GroupNotice", "create"), ("IncomingMessage", b"hello team"),
            ("IncomingMessage", b"from bob"), ("GroupNotice", "subject"),
        ]  # fmt: skip
        assert [x.seq for x in got] == sorted(x.seq for x in got)
        # a non-member's message is refused, and so is one to a group that is not
        ((_, xc),) = await users(srv, 1)
        stranger = await srv.login(xc)
        for target in (g, "g:999999"):
            with pytest.raises(ServerError) as e:
                await stranger.send(target, b"let me in")
            assert e.value.code == ErrorCode.NOT_MEMBER
        for cl in (alice, alice1, bob, bob1, carol, stranger):
            await cl.close()

    run(main())


def test_the_body_goes_when_every_device_acked(srv):
    async def main():
        (a, ac), (b, bc), (c, cc) = await users(srv, 3)
        alice, bob, carol = [await srv.login(x) for x in (ac, bc, cc)]
        g = (await alice.group("create", subject="acks", members=[b, c])).group
        for cl in (alice, bob, carol):
            await deliveries(cl, 1)
        before = len(gbody_records(srv))
        await alice.send(g, b"x" * 500)
        (m,) = await deliveries(bob, 1)
        assert len(gbody_records(srv)) == before + 2  # the body and its count, once
        (m,) = await deliveries(carol, 1)
        await bob.ping()
        await carol.ping()
        await until(lambda: len(gbody_records(srv)) == before)  # acked by both: deleted
        for cl in (alice, bob, carol):
            await cl.close()

    run(main())


def test_a_full_queue_fails_that_member_only_and_the_ack_names_them(srv):
    """The contract's second exception: stored for every other member, and the
    ack lists the member users whose queues could not take it."""

    async def main():
        (a, ac), (b, bc), (c, cc) = await users(srv, 3)
        alice, bob = [await srv.login(x) for x in (ac, bc)]
        g = (await alice.group("create", subject="full", members=[b, c])).group
        for cl in (alice, bob):
            await deliveries(cl, 1)
        # bob's ack of the notice is committed before the messages come (else his
        # queue is one entry fuller than counted and he fails the last one too)
        await until(lambda: srv.queue_count(bc.device) == 0)
        # carol is offline: her queue holds the create notice, then messages up to QUEUE_MAX
        for i in range(QUEUE_MAX - 1):
            assert (await alice.send(g, b"m%d" % i)).failed == ()
        ack = await alice.send(g, b"one too many", id="full1")
        assert ack.failed == (c,)
        # a retry (the same id and message) is the same ack, failed users included,
        # and is stored for nobody again
        again = await alice.send(g, b"one too many", id="full1")
        assert (again.t, again.failed) == (ack.t, (c,))
        got = await deliveries(bob, QUEUE_MAX)
        assert got[-1].body == b"one too many"
        await nothing_more(bob)
        carol = await srv.login(cc)
        got = await deliveries(carol, QUEUE_MAX)
        assert got[0].op == "create" and got[-1].body == b"m%d" % (QUEUE_MAX - 2)
        await nothing_more(carol)
        for cl in (alice, bob, carol):
            await cl.close()

    run(main())


def test_a_1024_member_group_stores_one_body(srv, tmp_path):
    """1,024 members (provisioned in the store, most offline): a message is one body
    record and 1,023 references; the members online on both workers get it."""

    async def main():
        (a, ac), (b, bc) = await users(srv, 2)
        store = open_store(srv)
        try:
            extra = provision(store, 1022, str(tmp_path / "creds.jsonl"), prefix="4941",
                              iterations=4096)  # fmt: skip
        finally:
            store.close()
        members = [b] + [x["phone"] for x in extra]
        alice = await srv.login(ac)
        bob = await on_other_worker(srv, bc, b, worker_of(srv, ac))
        res = await alice.group("create", subject="big", members=members)
        assert res.failed == ()
        g = res.group
        info = await alice.group("info", g)
        assert len(info.members) == 1024
        for cl in (alice, bob):
            await deliveries(cl, 1)
        res = await alice.group("add", g, [extra[0]["phone"], "4940999999998"])
        assert res.failed == (
            (extra[0]["phone"], ErrorCode.ALREADY_MEMBER),
            ("4940999999998", ErrorCode.GROUP_FULL),
        )  # group-max-members
        refs0, bodies0 = refs_in_queues(srv), len(gbody_records(srv))
        store = open_store(srv)
        try:
            with store.read() as txn:
                pages0 = store.pages_used(txn)[0]
        finally:
            store.close()
        body = os.urandom(4000)
        ack = await alice.send(g, body)
        assert ack.failed == ()
        assert len(gbody_records(srv)) == bodies0 + 2  # one body (and its count)
        assert refs_in_queues(srv) == refs0 + 1023  # a reference per member device
        (m,) = await deliveries(bob, 1)
        assert (m.group, m.body) == (g, body)
        await until(lambda: refs_in_queues(srv) == refs0 + 1022)  # bob's ack took his
        store = open_store(srv)
        try:
            with store.read() as txn:
                pages, psize = store.pages_used(txn)
        finally:
            store.close()
        grown = (pages - pages0) * psize
        assert grown < 1023 * 200, grown  # far from 1,023 copies of 4,000 bytes
        for cl in (alice, bob):
            await cl.close()

    run(main(), timeout=600)


def test_a_big_add_stores_its_notice_once_and_offline_members_read_it_in_order(srv, tmp_path):
    """An ``add`` of 400 members queues its notice (naming all 400) for 402 devices:
    the notice is stored once with a reference per device (not 402 lists of 400
    names), delivered whole to the members online on both workers, and read at
    login by an offline member in order with the message sent after it."""

    async def main():
        (a, ac), (b, bc) = await users(srv, 2)
        store = open_store(srv)
        try:
            extra = provision(store, 400, str(tmp_path / "creds.jsonl"), prefix="4943",
                              iterations=4096)  # fmt: skip
        finally:
            store.close()
        added = [x["phone"] for x in extra]
        alice = await srv.login(ac)
        bob = await on_other_worker(srv, bc, b, worker_of(srv, ac))
        g = (await alice.group("create", subject="adds", members=[b])).group
        for cl in (alice, bob):
            await deliveries(cl, 1)
        await alice.ping()
        await bob.ping()
        bytes0 = queue_bytes(srv)
        res = await alice.group("add", g, added)
        assert res.failed == ()
        grown = queue_bytes(srv) - bytes0
        # one notice of 400 names (~17 bytes each) and 402 references, not 402 notices
        assert grown < 400 * 20 + 402 * 40, grown
        assert refs_to_last_notice(srv) == 402  # a reference per member device
        for cl in (alice, bob):
            (n,) = await deliveries(cl, 1)
            assert (n.group, n.op, n.by, n.members) == (g, "add", a, tuple(added))
        await alice.send(g, b"welcome, all 400")
        (m,) = await deliveries(bob, 1)
        assert m.body == b"welcome, all 400"
        late = await srv.login(Credentials(extra[7]["device"], bytes.fromhex(extra[7]["secret"])))
        n, m = await deliveries(late, 2)
        assert (n.op, n.members, m.body) == ("add", tuple(added), b"welcome, all 400")
        await nothing_more(late)
        for cl in (alice, bob, late):
            await cl.close()

    run(main(), timeout=600)


def notice_bodies_of(srv, group: str) -> int:
    """The notice bodies of ``group`` in ``gbody`` (their count records name it)."""
    store = open_store(srv)
    try:
        with store.read() as txn:
            return sum(k[0] & 0x80 and k.endswith(b"c") and v[8:].startswith(group.encode() + b"\0")
                       for k, v in txn.cursor(db=store._db["gbody"]))  # fmt: skip
    finally:
        store.close()


def test_a_notice_body_goes_when_every_device_acked_it(srv):
    async def main():
        (a, ac), (b, bc), (c, cc) = await users(srv, 3)
        alice, bob = [await srv.login(x) for x in (ac, bc)]
        g = (await alice.group("create", subject="gone", members=[b, c])).group
        assert notice_bodies_of(srv, g) == 1
        for cl in (alice, bob):
            await deliveries(cl, 1)
            await cl.ping()
        assert notice_bodies_of(srv, g) == 1  # carol (offline) still refers to it
        carol = await srv.login(cc)
        (n,) = await deliveries(carol, 1)
        assert (n.op, n.by) == ("create", a)
        await until(lambda: notice_bodies_of(srv, g) == 0)
        for cl in (alice, bob, carol):
            await cl.close()

    run(main())


# -- invites ------------------------------------------------------------------------


def test_invite_links_join_approval_and_revoke(srv):
    async def main():
        (a, ac), (b, bc), (c, cc) = await users(srv, 3)
        alice, bob, carol = [await srv.login(x) for x in (ac, bc, cc)]
        g = (await alice.group("create", subject="club")).group
        await deliveries(alice, 1)
        code = (await alice.group("invite", g)).get("code")
        assert (await alice.group("invite", g)).get("code") == code  # the same until revoked
        pre = await bob.group("preview", code=code)
        assert (pre.group, pre.get("subject"), pre.get("count")) == (g, "club", "1")
        await bob.group("join", code=code)
        for cl in (alice, bob):
            (n,) = await deliveries(cl, 1)
            assert (n.op, n.by, n.members) == ("join", b, (b,))
        with pytest.raises(ServerError) as e:
            await bob.group("join", code=code)
        assert e.value.code == ErrorCode.ALREADY_MEMBER
        # approval on: a join is a request until an admin approves it
        await alice.group("settings", g, approval=True)
        for cl in (alice, bob):
            await deliveries(cl, 1)
        res = await carol.group("join", code=code)
        assert res.get("requested") == "1"
        reqs = await alice.group("requests", g)
        assert [m.user for m in reqs.members] == [c]
        with pytest.raises(ServerError) as e:
            await carol.send(g, b"not yet")
        assert e.value.code == ErrorCode.NOT_MEMBER
        await alice.group("approve", g, [c])
        for cl in (alice, bob, carol):
            (n,) = await deliveries(cl, 1)
            assert (n.op, n.members) == ("add", (c,))
        assert (await alice.group("requests", g)).members == ()
        # revoke: the old code stops at once
        new = (await alice.group("revoke", g)).get("code")
        assert new != code
        ((_, dc),) = await users(srv, 1)
        dave = await srv.login(dc)
        for op in ("preview", "join"):
            with pytest.raises(ServerError) as e:
                await dave.group(op, code=code)
            assert e.value.code == ErrorCode.BAD_INVITE
        res = await dave.group("join", code=new)
        assert res.get("requested") == "1"
        await alice.group("reject", g, [dc.user])
        assert (await alice.group("requests", g)).members == ()
        for cl in (alice, bob, carol, dave):
            await cl.close()

    run(main())


# -- the store format -------------------------------------------------------------


def test_a_format_6_store_is_upgraded(tmp_path):
    s = Store(str(tmp_path / "store"))
    with s.write() as txn:
        txn.put(b"format", b"6", db=s._db["meta"])
    s.close()
    s = Store(str(tmp_path / "store"))
    try:
        with s.read() as txn:
            assert txn.get(b"format", db=s._db["meta"]) == b"9"
    finally:
        s.close()


# -- privacy: who can add me -------------------------------------------------------


def test_who_can_add_me_everyone_contacts_nobody(srv):
    async def main():
        (a, ac), (b, bc), (c, cc) = await users(srv, 3)
        alice, bob, carol = [await srv.login(x) for x in (ac, bc, cc)]
        assert (await bob.privacy()).groupadd == "everyone"  # the default
        assert (await bob.privacy(groupadd="contacts")).groupadd == "contacts"
        assert (await carol.privacy(groupadd="nobody")).groupadd == "nobody"
        res = await alice.group("create", subject="p", members=[b, c])
        assert set(res.failed) == {(b, ErrorCode.ADD_REFUSED), (c, ErrorCode.ADD_REFUSED)}
        g = res.group
        await bob.discover([a])  # alice is one of bob's contacts now
        res = await alice.group("add", g, [b, c])
        assert res.failed == ((c, ErrorCode.ADD_REFUSED),)
        assert [m.user for m in (await alice.group("info", g)).members] == [a, b]
        # what is left to a user who may not be added: an invite
        code = (await alice.group("invite", g)).get("code")
        await carol.group("join", code=code)
        assert [m.user for m in (await alice.group("info", g)).members] == [a, b, c]
        await bob.privacy(groupadd="everyone")
        for cl in (alice, bob, carol):
            await cl.close()

    run(main())


def test_per_device_payloads_go_to_the_devices_named_only(srv):
    """Sender-key distribution: one body for all, a payload for each device named."""

    async def main():
        (a, ac), (b, bc), (c, cc) = await users(srv, 3)
        b1 = srv.link_device(b)
        alice, bob, carol = [await srv.login(x) for x in (ac, bc, cc)]
        bob1 = await on_other_worker(srv, b1, b, worker_of(srv, bc))
        g = (await alice.group("create", subject="keys", members=[b, c])).group
        for cl in (alice, bob, bob1, carol):
            await deliveries(cl, 1)
        body = b"megolm ciphertext"
        ack = await alice.group_send(g, body, ((b1.device, b"key for bob:1"),
                                               (cc.device, b"key for carol")))  # fmt: skip
        assert ack.failed == ()
        (m,) = await deliveries(bob, 1)
        assert (m.body, m.payload) == (body, None)
        (m,) = await deliveries(bob1, 1)
        assert (m.group, m.sender, m.body, m.payload) == (g, ac.device, body, b"key for bob:1")
        (m,) = await deliveries(carol, 1)
        assert (m.body, m.payload) == (body, b"key for carol")
        # an ack of a device's own entry makes its member's delivered receipt too
        # (carol's only device had one): both members, once each
        got = await group_receipts(alice, [b, c])
        assert {(r.type, r.id) for r in got.values()} == {("delivered", ack.id)}
        # a device that is not a member's (or the sending one) is refused, nothing stored
        ((_, xc),) = await users(srv, 1)
        for bad in (xc.device, ac.device):
            with pytest.raises(ServerError) as e:
                await alice.group_send(g, body, ((bad, b"k"),))
            assert e.value.code == ErrorCode.STALE_DEVICES and e.value.extra == (bad,)
        await nothing_more(bob)
        for cl in (alice, bob, bob1, carol):
            await cl.close()

    run(main())


def test_delivered_receipts_once_per_member_user_coalesced(srv):
    """The first ack by a device of each member makes that member's delivered
    receipt; the receipts of one commit for one message are one entry, to every
    device of the sender."""

    async def main():
        (a, ac), (b, bc), (c, cc), (d, dc) = await users(srv, 4)
        a1, b1 = srv.link_device(a), srv.link_device(b)
        alice, bob, carol, dave = [await srv.login(x) for x in (ac, bc, cc, dc)]
        alice1 = await on_other_worker(srv, a1, a, worker_of(srv, ac))
        bob1 = await on_other_worker(srv, b1, b, worker_of(srv, bc))
        g = (await alice.group("create", subject="ticks", members=[b, c, d])).group
        for cl in (alice, alice1, bob, bob1, carol, dave):
            await deliveries(cl, 1)
        ack = await alice.send(g, b"did you get it?", id="tick1")
        (m,) = await deliveries(alice1, 1)  # the sync copy: no receipt for it
        for cl in (bob, bob1, carol, dave):
            await deliveries(cl, 1)
        for cl in (alice, alice1):  # every device of the sender: each member once
            got = await group_receipts(cl, [b, c, d])
            assert set(got) == {b, c, d}
            for r in got.values():
                assert (r.sender, r.id, r.type) == (g, "tick1", "delivered") and r.t >= ack.t
        await nothing_more(alice)
        # read receipts: coalesced per commit to the sender's devices, read sync to
        # the reader's other devices; a non-member's is refused
        await bob.receipt(g, "tick1", participant=a)
        await carol.receipt(g, "tick1", participant=a)
        for cl in (alice, alice1):
            got = await group_receipts(cl, [b, c])
            assert {(r.type, r.id) for r in got.values()} == {("read", "tick1")}
        (r,) = set((await group_receipts(bob1, [b])).values())
        assert (r.sender, r.type, r.members) == (g, "read", (b,))
        await nothing_more(bob)
        ((_, xc),) = await users(srv, 1)
        stranger = await srv.login(xc)
        with pytest.raises(ServerError) as e:
            await stranger.receipt(g, "tick1", participant=a)
        assert e.value.code == ErrorCode.NOT_MEMBER
        for cl in (alice, alice1, bob, bob1, carol, dave, stranger):
            await cl.close()

    run(main())


def test_receipts_of_one_commit_are_one_entry(tmp_path):
    """Coalescing, in the store: three members' acks in one commit make one
    receipt entry (three ``member`` children) per device of the sender."""
    from pigeon.core.codec import Codec
    from pigeon.core.events import GroupRequest
    from pigeon.server.groups import Groups
    from pigeon.server.queues import Queues, Send

    store = Store(str(tmp_path / "store"), map_size=64 << 20, sync="os")
    try:
        keys = (b"salt", b"stored", b"server", 4096)
        phones = [f"4960{i:08d}" for i in range(4)]
        devs = [store.register_device(p, b"i" * 32, keys)[0] for p in phones]
        q = Queues(store)
        with store.write() as txn:
            res, _ = Groups(store, q).handle(txn, store.clock(), phones[0],
                                             GroupRequest("c", "create", None, tuple(phones[1:]),
                                                          "s"))  # fmt: skip
        q.commit([], {d: q.head(d) - 1 for d in devs})  # the create notices
        q.commit([Send(devs[0], "message", "m1", res.group, "text", b"hi")], {})
        pushes = q.commit([], {d: q.head(d) - 1 for d in devs[1:]})
        assert [p.device for p in pushes] == [devs[0]]
        (frame,) = [f for _, f in q.read(devs[0], q.head(devs[0]) - 2, 9)]
        ev = IncomingReceipt.from_node(Codec().decode(memoryview(frame)[3:]))
        assert (ev.sender, ev.id, ev.type, set(ev.members)) == (res.group, "m1", "delivered",
                                                                 set(phones[1:]))  # fmt: skip
        assert gbody_count(store) == 0  # every reference acked: the body is gone
    finally:
        store.close()


def test_entries_with_payloads_refer_to_the_body_and_make_receipts(tmp_path):
    """Every recipient device named by a payload (their own entries, kind 7): the
    body is still one record, each ack counts it down and makes its member's
    delivered receipt (once per member with two devices), and the last ack
    deletes it and the fan record."""
    from pigeon.core.codec import Codec
    from pigeon.core.events import GroupRequest
    from pigeon.server.groups import Groups
    from pigeon.server.queues import GPAYLOAD, Queues, Send

    store = Store(str(tmp_path / "store"), map_size=64 << 20, sync="os")
    try:
        keys = (b"salt", b"stored", b"server", 4096)
        phones = [f"4961{i:08d}" for i in range(3)]
        devs = [store.register_device(p, b"i" * 32, keys)[0] for p in phones]
        b1 = store.link_device(phones[1], b"j" * 32, keys)  # bob's second device
        q = Queues(store)
        with store.write() as txn:
            res, _ = Groups(store, q).handle(txn, store.clock(), phones[0],
                                             GroupRequest("c", "create", None, tuple(phones[1:]),
                                                          "s"))  # fmt: skip
        every = [*devs, b1]
        q.commit([], {d: q.head(d) - 1 for d in every})  # the create notices
        payloads = tuple((d, f"key for {d}".encode()) for d in (devs[1], b1, devs[2]))
        send = Send(devs[0], "message", "m1", res.group, "text", b"hi", payloads=payloads)
        q.commit([send], {})
        assert send.error is None and send.failed == ()
        with store.read() as txn:
            kinds = [bytes(v)[0] for _, v in txn.cursor(db=store._db["queue"])]
        assert kinds.count(GPAYLOAD) == 3
        assert gbody_count(store) == 3  # the body, its count and bob's fan record
        # bob's two devices ack in one commit, carol in the next
        first = q.commit([], {devs[1]: q.head(devs[1]) - 1, b1: q.head(b1) - 1})
        assert [p.device for p in first] == [devs[0]]
        q.commit([], {devs[2]: q.head(devs[2]) - 1})
        frames = [f for _, f in q.read(devs[0], q.head(devs[0]) - 3, 9)]
        members = []
        for f in frames:
            ev = IncomingReceipt.from_node(Codec().decode(memoryview(f)[3:]))
            assert (ev.sender, ev.id, ev.type) == (res.group, "m1", "delivered")
            members += ev.members
        assert sorted(members) == sorted(phones[1:])  # each member once
        assert gbody_count(store) == 0
        assert q.stats()["count"] == len(frames)  # only the receipts are left
    finally:
        store.close()


def gbody_count(store) -> int:
    with store.read() as txn:
        return txn.stat(store._db["gbody"])["entries"]


def test_expired_and_removed_references_drop_the_body(tmp_path):
    """queue-max-age purges a group message's references like any entry, and a
    device that goes (its queue dropped) lets go of its reference too: the body
    goes with the last one."""
    from pigeon.core.events import GroupRequest
    from pigeon.server.groups import Groups
    from pigeon.server.queues import QueueLimits, Queues, Send

    now = [1_000_000]
    store = Store(str(tmp_path / "store"), map_size=64 << 20, sync="os", clock=lambda: now[0])
    try:
        keys = (b"salt", b"stored", b"server", 4096)
        phones = [f"4970{i:08d}" for i in range(3)]
        devs = [store.register_device(p, b"i" * 32, keys)[0] for p in phones]
        q = Queues(store, QueueLimits(max_age_ms=60_000))
        with store.write() as txn:
            res, _ = Groups(store, q).handle(txn, now[0], phones[0],
                                             GroupRequest("c", "create", None, tuple(phones[1:]),
                                                          "s"))  # fmt: skip
        q.commit([], {d: q.head(d) - 1 for d in devs})
        q.commit([Send(devs[0], "message", "m1", res.group, "text", b"x" * 100)], {})
        assert gbody_count(store) == 2  # the body and its count
        assert store.remove_device(devs[1])  # one member's device goes: its reference too
        assert gbody_count(store) == 2
        now[0] += 61_000
        purged, _ = q.purge_expired()
        assert purged == 1 and gbody_count(store) == 0  # the last reference: the body goes
        assert q.stats()["count"] == 0 and q.stats()["bytes"] == 0
    finally:
        store.close()


def test_a_deleted_account_leaves_its_groups(srv):
    async def main():
        (a, ac), (b, bc) = await users(srv, 2)
        alice, bob = [await srv.login(x) for x in (ac, bc)]
        g = (await alice.group("create", subject="bye", members=[b])).group
        for cl in (alice, bob):
            await deliveries(cl, 1)
        await alice.delete_account()
        (n,) = await deliveries(bob, 1)
        assert (n.op, n.by, n.members) == ("leave", a, (a,))
        (n,) = await deliveries(bob, 1)  # the last admin went: bob is one now
        assert (n.op, n.members) == ("promote", (b,))
        info = await bob.group("info", g)
        assert [(m.user, m.role) for m in info.members] == [(b, "admin")]
        await alice.close()
        await bob.close()

    run(main())


def test_kill_9_of_a_worker_during_a_big_fan_out_loses_and_duplicates_nothing(tmp_path):
    """A group of 306 (most offline, members online on both workers, resuming
    clients) takes 60 messages; worker 0 is killed with SIGKILL a third of the
    way in.  Every acked id reaches each online member's application exactly
    once, and an offline member's queue holds each exactly once."""
    import signal
    from collections import Counter

    # new-chats off: a group of strangers (adding each costs a new chat)
    srv = Server(tmp_path / "data", workers=2, register_per_ip=1000, message_rate=0,
                 new_chats=0)  # fmt: skip
    srv.start()
    try:

        async def main():
            people = await users(srv, 7)
            store = open_store(srv)
            try:
                extra = provision(store, 299, str(tmp_path / "creds.jsonl"), prefix="4942",
                                  iterations=4096)  # fmt: skip
            finally:
                store.close()
            (_, ac), rest = people[0], people[1:]
            alice = await srv.login(ac, reconnect=True)
            online = {}
            for i, (p, c) in enumerate(rest):  # on both workers
                if i % 2:
                    online[p] = await on_other_worker(srv, c, p, worker_of(srv, ac),
                                                      reconnect=True)  # fmt: skip
                else:
                    online[p] = await srv.login(c, reconnect=True)
            members = [p for p, _ in rest] + [x["phone"] for x in extra]
            g = (await alice.group("create", subject="crash", members=members)).group
            got = {p: Counter() for p in online}

            async def consume(p):
                c = online[p]
                while True:
                    ev = await c.next_event(None)
                    if isinstance(ev, IncomingMessage) and ev.group == g:
                        got[p][ev.id] += 1
                    if hasattr(ev, "seq"):
                        await c.ack(ev.seq)

            consumers = [asyncio.ensure_future(consume(p)) for p in online]
            acked, sem = set(), asyncio.Semaphore(8)

            async def one(n):
                async with sem:
                    await alice.send(g, os.urandom(200), id=f"k{n}", timeout=None)
                acked.add(f"k{n}")

            sending = asyncio.ensure_future(asyncio.gather(*(one(n) for n in range(60))))
            await until(lambda: len(acked) >= 20, timeout=60, interval=0.01)
            os.kill(srv.worker_pid(0), signal.SIGKILL)
            await asyncio.wait_for(sending, 120)
            want = {f"k{n}" for n in range(60)}
            assert acked == want
            await until(lambda: all(set(c) == want for c in got.values()), timeout=60)
            for p, c in got.items():
                assert max(c.values()) == 1, (p, [m for m, k in c.items() if k > 1])
            assert sum(c.reconnects for c in [alice, *online.values()]) >= 1  # worker 0's
            for c in consumers:
                c.cancel()
            for c in [alice, *online.values()]:
                await c.close()
            # an offline member: the create notice, then each message once, in order
            offline = [x for x in extra if x["phone"] == members[-1]][0]
            from pigeon.client import Credentials

            late = await srv.login(Credentials(offline["device"], bytes.fromhex(offline["secret"])))
            seen = []
            while len(seen) < 61:
                ev = await late.next_event(15)
                await late.ack(ev.seq)
                seen.append(ev)
            assert seen[0].op == "create"
            ids = [ev.id for ev in seen[1:]]
            assert sorted(ids) == sorted(want) and len(set(ids)) == 60
            await nothing_more(late)
            await late.close()

        run(main(), timeout=400)
    finally:
        assert srv.stop() == 0, srv.log_text()[-3000:]
