"""What a logged-in user controls that grew without bound (the probe's limits),
each on a real server with the real SDK.

- a group's subject and description: group-subject-max, group-description-max
  (below the protocol's own 100 characters / 512 bytes), error 200;
- join requests waiting for an admin: dropped after group-request-expiry;
- member changes by one admin in one group: group-member-changes per window, 302;
- messages and read receipts of one device: messages-per-day (each keeps a dedup
  record for the dedup window), 302;
- group adds of a user who blocks the adder (433) or whose queue holds the
  strangers' share (402): a stranger's add/remove loop filled it before.

Time moves with the server's injectable clock (``Server.advance_clock``), never
with a sleep; every wait is bounded.
"""

from __future__ import annotations

import asyncio

import pytest
from serverutil import Server, until

from pigeon.client import ServerError
from pigeon.core.errors import ErrorCode
from pigeon.core.events import MAX_GROUP_DESCRIPTION, MAX_GROUP_SUBJECT, IncomingMessage
from pigeon.server.config import ConfigError, load
from pigeon.server.limits import Bucket
from pigeon.server.store import Store

ALICE, BOB, CAROL, DAVE = "491701234567", "4915112345678", "4917612345678", "4917612340000"


def run(coro, timeout=180):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def start(tmp_path, workers=2, **options) -> Server:
    return Server(tmp_path / "data", workers=workers, **options).start()


def table_entries(srv: Server, table: str) -> int:
    store = Store(str(srv.data_dir / "store"), map_size=256 << 20, create=False)
    try:
        with store.read() as txn:
            return txn.stat(store._db[table])["entries"]
    finally:
        store.close()


async def drain(client, wait=0.3) -> int:
    """Ack whatever is delivered until nothing comes for ``wait`` s; how many."""
    n = 0
    while True:
        try:
            ev = await client.next_event(wait)
        except TimeoutError:
            return n
        if getattr(ev, "seq", None) is not None:
            await client.ack(ev.seq)
        n += 1


# -- 1. subject and description ----------------------------------------------------------


def test_a_subject_or_description_past_the_servers_limit_is_refused_and_changes_nothing(
    tmp_path,
):
    srv = start(tmp_path, group_subject_max=10, group_description_max=20)
    try:

        async def main():
            alice = await srv.login(await srv.register(ALICE))
            with pytest.raises(ServerError) as e:  # 11 characters: within the protocol's 100
                await alice.group("create", subject="s" * 11)
            assert e.value.code == ErrorCode.BAD_REQUEST and "group-subject-max" in e.value.text
            assert await alice.groups() == ()  # nothing created
            g = (await alice.group("create", subject="s" * 10)).group
            with pytest.raises(ServerError) as e:
                await alice.group_subject(g, "t" * 11)
            assert e.value.code == ErrorCode.BAD_REQUEST and "group-subject-max" in e.value.text
            # bytes of UTF-8, not characters: 11 of them are 22 bytes
            with pytest.raises(ServerError) as e:
                await alice.group_description(g, "é" * 11)
            assert e.value.code == ErrorCode.BAD_REQUEST
            assert "group-description-max" in e.value.text
            info = await alice.group_info(g)
            assert (info.subject, info.description) == ("s" * 10, None)  # unchanged
            await alice.group_subject(g, "t" * 10)
            await alice.group_description(g, "é" * 10)  # 20 bytes: at the limit
            info = await alice.group_info(g)
            assert (info.subject, info.description) == ("t" * 10, "é" * 10)
            await alice.ping()  # not fatal
            await alice.close()

        run(main())
    finally:
        assert srv.stop() == 0


def test_subject_and_description_limits_cannot_pass_the_protocols():
    assert load().group_subject_max == MAX_GROUP_SUBJECT
    assert load().group_description_max == MAX_GROUP_DESCRIPTION
    for key, top in (("group_subject_max", MAX_GROUP_SUBJECT),
                     ("group_description_max", MAX_GROUP_DESCRIPTION)):  # fmt: skip
        assert getattr(load(overrides={key: top - 1}), key) == top - 1
        with pytest.raises(ConfigError) as e:
            load(overrides={key: top + 1})
        assert key.replace("_", "-") in str(e.value)


# -- 2. join requests expire ------------------------------------------------------------------


def test_a_join_request_past_group_request_expiry_is_dropped(tmp_path):
    srv = start(tmp_path, group_request_expiry=600, purge_interval=0.2)
    try:

        async def main():
            alice, bob, carol = [await srv.login(await srv.register(p))
                                 for p in (ALICE, BOB, CAROL)]  # fmt: skip
            g = (await alice.group("create", subject="club")).group
            await alice.group_settings(g, approval=True)
            code = await alice.group_invite(g)
            assert (await bob.group_join(code)).get("requested") == "1"
            assert await alice.group_requests(g) == (BOB,)
            assert table_entries(srv, "grq") == 1
            srv.advance_clock(400)
            assert (await carol.group_join(code)).get("requested") == "1"
            srv.advance_clock(201)  # bob's request is 601 s old, carol's 201 s
            await until(lambda: table_entries(srv, "grq") == 1, timeout=20)
            assert await alice.group_requests(g) == (CAROL,)
            # bob may ask again; the group itself is untouched
            assert (await bob.group_join(code)).get("requested") == "1"
            assert set(await alice.group_requests(g)) == {BOB, CAROL}
            assert (await alice.group_info(g)).subject == "club"
            srv.advance_clock(601)
            await until(lambda: table_entries(srv, "grq") == 0, timeout=20)
            assert await alice.group_requests(g) == ()
            for c in (alice, bob, carol):
                await c.close()

        run(main())
    finally:
        assert srv.stop() == 0


# -- 3. member changes by one admin ---------------------------------------------------------


def test_member_changes_by_one_admin_in_one_group_stop_at_group_member_changes(tmp_path):
    srv = start(tmp_path, group_member_changes=4, group_member_changes_window=600,
                message_rate=0)  # fmt: skip
    try:

        async def main():
            alice, bob, carol, dave = [await srv.login(await srv.register(p))
                                       for p in (ALICE, BOB, CAROL, DAVE)]  # fmt: skip
            g = (await alice.group("create", subject="g", members=[BOB, CAROL])).group
            await alice.group_promote(g, [BOB])  # 1
            await alice.group_remove(g, [CAROL])  # 2
            await alice.group_add(g, [CAROL, DAVE])  # 3: one request, two members
            await alice.group_promote(g, [CAROL])  # 4
            for op in (alice.group_demote, alice.group_remove, alice.group_add,
                       alice.group_promote):  # fmt: skip
                with pytest.raises(ServerError) as e:
                    await op(g, [CAROL])
                assert e.value.code == ErrorCode.RATE_LIMITED
                assert "member changes" in e.value.text
            info = await alice.group_info(g)  # nothing changed by the refusals
            roles = {m.user: m.role for m in info.members}
            assert roles == {ALICE: "admin", BOB: "admin", CAROL: "admin", DAVE: "member"}
            # per admin and per group: bob may, and alice may in another group
            await bob.group_demote(g, [CAROL])
            h = (await alice.group("create", subject="h", members=[BOB])).group
            await alice.group_promote(h, [BOB])
            await alice.ping()  # not fatal
            srv.advance_clock(601)  # the window passed
            await alice.group_promote(g, [CAROL])
            for c in (alice, bob, carol, dave):
                await c.close()

        run(main())
    finally:
        assert srv.stop() == 0


# -- 4. messages per day ------------------------------------------------------------------------


def test_messages_and_receipts_past_messages_per_day_are_refused_and_not_stored(tmp_path):
    """One worker: the count is per device and worker, kept across its connections."""
    srv = start(tmp_path, workers=1, messages_per_day=5)
    try:

        async def main():
            ac, bc = await srv.register(ALICE), await srv.register(BOB)
            alice, bob = await srv.login(ac), await srv.login(bc)
            g = (await alice.group("create", subject="g", members=[BOB])).group
            await drain(bob)
            for i in range(3):  # the hot path's messages
                await alice.send(BOB, f"m{i}".encode(), id=f"m{i}")
            await alice.group_send(g, b"to the group")  # a Message through the handlers
            await alice.receipt(BOB, "x1")  # a read receipt counts too
            with pytest.raises(ServerError) as e:
                await alice.send(BOB, b"sixth", id="m6")
            assert e.value.code == ErrorCode.RATE_LIMITED and "messages-per-day" in e.value.text
            for refused in (alice.group_send(g, b"again"), alice.receipt(BOB, "x2")):
                with pytest.raises(ServerError) as e:
                    await refused
                assert e.value.code == ErrorCode.RATE_LIMITED
            await alice.close()
            alice = await srv.login(ac)  # logging in again does not reset it
            with pytest.raises(ServerError) as e:
                await alice.send(BOB, b"seventh", id="m7")
            assert e.value.code == ErrorCode.RATE_LIMITED
            await bob.send(ALICE, b"bob's own count")  # per device
            got = []
            while True:
                try:
                    ev = await bob.next_event(1.0)
                except TimeoutError:
                    break
                await bob.ack(ev.seq)
                if isinstance(ev, IncomingMessage):
                    got.append(bytes(ev.body))
            assert sorted(got) == [b"m0", b"m1", b"m2", b"to the group"]
            for c in (alice, bob):
                await c.close()

        run(main())
    finally:
        assert srv.stop() == 0


def test_a_retry_of_a_stored_message_past_messages_per_day_gets_its_first_ack(tmp_path):
    """The day's count is taken before dedup (in the commit): a retry of a message or
    read receipt already stored got 302 at the limit, not its ack.  On the 302 path
    the dedup records are looked up: the same message again (recipient, type,
    body) gets its first ack and is stored once; anything else is still 302."""
    from pigeon.core.events import IncomingReceipt

    srv = start(tmp_path, workers=1, messages_per_day=4)
    try:

        async def main():
            ac, bc = await srv.register(ALICE), await srv.register(BOB)
            alice, bob = await srv.login(ac), await srv.login(bc)
            g = (await alice.group("create", subject="g", members=[BOB])).group
            await drain(bob)
            await bob.send(ALICE, b"read me", id="b1")
            await drain(alice)
            first = [await alice.send(BOB, f"m{i}".encode(), id=f"m{i}") for i in range(2)]
            gfirst = await alice.group_send(g, b"to the group", id="g0")  # (through handlers)
            rfirst = await alice.receipt(BOB, "b1")  # (about a message: it has a dedup record)
            with pytest.raises(ServerError) as e:  # the day's count is spent
                await alice.send(BOB, b"new", id="m9")
            assert e.value.code == ErrorCode.RATE_LIMITED
            for _ in range(2):
                again = await alice.send(BOB, b"m1", id="m1")  # the hot path's retry
                assert again.t == first[1].t
            assert (await alice.group_send(g, b"to the group", id="g0")).t == gfirst.t
            assert (await alice.receipt(BOB, "b1")).t == rfirst.t
            for other in (alice.send(BOB, b"not m1", id="m1"),  # the same id, another body
                          alice.send(CAROL, b"m1", id="m1"),  # another recipient
                          alice.group_send(g, b"other", id="g0"),
                          alice.receipt(BOB, "b1", "played")):  # fmt: skip
                with pytest.raises(ServerError) as e:
                    await other
                assert e.value.code == ErrorCode.RATE_LIMITED
            got, receipts = [], []
            while True:
                try:
                    ev = await bob.next_event(1.0)
                except TimeoutError:
                    break
                await bob.ack(ev.seq)
                if isinstance(ev, IncomingMessage):
                    got.append(bytes(ev.body))
                elif isinstance(ev, IncomingReceipt) and ev.type == "read":
                    receipts.append(ev.id)
            assert sorted(got) == [b"m0", b"m1", b"to the group"]  # stored once each
            assert receipts == ["b1"]
            for c in (alice, bob):
                await c.close()

        run(main())
    finally:
        assert srv.stop() == 0


def test_messages_per_day_zero_is_no_limit_and_the_bench_profile_sets_it():
    from pigeon.bench.harness import BENCH_PROFILE

    assert load().messages_per_day == 50_000
    assert load(overrides={"messages_per_day": 0}).messages_per_day == 0
    assert BENCH_PROFILE["messages_per_day"] == 0


def test_the_day_count_is_a_fixed_window_from_its_first_message():
    b = Bucket(0, 1, 0.0)  # no rate limit: only the count
    assert [b.count(10.0, 3, 100.0) for _ in range(4)] == [True, True, True, False]
    assert not b.count(109.9, 3, 100.0)
    assert b.count(110.0, 3, 100.0)  # a new window from here
    assert [b.count(150.0, 3, 100.0) for _ in range(3)] == [True, True, False]


# -- 5. what leaves the membership as it was leaves the workers' caches be ------------------------


def group_version(srv: Server) -> bytes | None:
    store = Store(str(srv.data_dir / "store"), map_size=256 << 20, create=False)
    try:
        with store.read() as txn:
            raw = txn.get(b"gver", db=store._db["meta"])
            return None if raw is None else bytes(raw)
    finally:
        store.close()


def test_revoke_subject_and_join_requests_do_not_restart_the_workers_group_caches(tmp_path):
    """``meta["gver"]`` moving makes every worker drop its group caches (members,
    admins, announce) at its next commit: an admin's loop of ``revoke`` did that at
    each one.  Only changes of what the caches hold move it."""
    srv = start(tmp_path, group_request_expiry=600, purge_interval=0.2)
    try:

        async def main():
            alice, bob = [await srv.login(await srv.register(p)) for p in (ALICE, BOB)]
            g = (await alice.group("create", subject="club")).group
            await alice.group_settings(g, approval=True)
            ver = group_version(srv)
            for _ in range(5):
                code = await alice.group_revoke(g)
            await alice.group_subject(g, "club 2")
            await alice.group_description(g, "about")
            await bob.group_join(code)
            await alice.group_reject(g, [BOB])
            await bob.group_join(code)
            srv.advance_clock(601)
            await until(lambda: table_entries(srv, "grq") == 0, timeout=20)
            assert await alice.group_requests(g) == ()
            assert group_version(srv) == ver
            await alice.group_add(g, [BOB])  # a member change: it moves
            assert group_version(srv) != ver
            for c in (alice, bob):
                await c.close()

        run(main())
    finally:
        assert srv.stop() == 0


# -- 5. adds that reach a user who did not ask for them -----------------------------------


def test_a_user_who_blocks_you_cannot_be_added_to_your_groups(tmp_path):
    """A block stops group adds as the groupadd privacy setting does (433): else a
    blocked user's add/remove loop queued a notice for the blocker at each step."""
    srv = start(tmp_path, new_chats=0)
    try:

        async def main():
            alice = await srv.login(await srv.register(ALICE))
            bob = await srv.login(await srv.register(BOB))
            await bob.block(ALICE)
            res = await alice.group("create", subject="spam", members=[BOB])
            assert res.failed == ((BOB, ErrorCode.ADD_REFUSED),)
            assert (await alice.group_add(res.group, [BOB])).failed == (
                (BOB, ErrorCode.ADD_REFUSED),
            )
            assert await drain(bob) == 0  # no notice reached the blocker
            await bob.unblock(ALICE)
            assert (await alice.group_add(res.group, [BOB])).failed == ()
            for c in (alice, bob):
                await c.close()

        run(main())
    finally:
        srv.stop()


async def offline_victim(srv):
    """Bob (offline from here: nothing is acked), whose contact is carol, and alice, a
    stranger to him: (bob's credentials, carol's client, alice's client)."""
    vc = await srv.register(BOB)
    friend = await srv.login(await srv.register(CAROL))
    victim = await srv.login(vc)
    await victim.discover([CAROL], "full")  # carol: a contact
    await victim.close()
    spammer = await srv.login(await srv.register(ALICE))
    return vc, friend, spammer


def test_a_strangers_add_remove_loop_stops_at_the_strangers_share_of_a_queue(tmp_path):
    """Adding a user who does not know the adder queues an add notice: past the
    strangers' share of their queue (stranger-queue-count) the add fails for them
    with 402, so a stranger's add/remove loop over many groups cannot fill the
    queue to queue-max-count, and the user's contacts can still write to them."""
    share = 6
    srv = start(tmp_path, new_chats=0, queue_max_count=40, stranger_queue_count=share,
                group_member_changes=0)  # fmt: skip
    try:

        async def main():
            vc, friend, spammer = await offline_victim(srv)
            groups = [(await spammer.group("create", subject=f"g{i}")).group for i in range(3)]
            refused = 0
            for _ in range(20):
                for g in groups:
                    res = await spammer.group_add(g, [BOB])
                    if res.failed:
                        assert res.failed == ((BOB, ErrorCode.QUEUE_FULL),)
                        refused += 1
                    else:
                        await spammer.group_remove(g, [BOB])
            assert refused > 0
            # the victim's queue: at most the share, one removal per group past it
            assert srv.queue_count(vc.device) <= share + len(groups)
            assert (await friend.send(BOB, b"still reachable")).t  # not 402
            for c in (spammer, friend):
                await c.close()

        run(main())
    finally:
        srv.stop()


def test_a_strangers_membership_changes_stop_at_the_strangers_share_of_other_members(tmp_path):
    """A stranger's group with the victim in it, and a puppet added and removed in a
    loop: each change queued a notice for the victim (membership notices were held to
    no share), past queue-max-count, and the victim's contacts then got 402.  Past the
    strangers' share the victim's devices no longer get the notices of a user they do
    not know; a contact's changes still reach them, and the puppet (the user the
    change is about) gets its own."""
    share = 6
    srv = start(tmp_path, new_chats=0, queue_max_count=40, stranger_queue_count=share,
                group_member_changes=0)  # fmt: skip
    try:

        async def main():
            vc, friend, spammer = await offline_victim(srv)
            pc = await srv.register(DAVE)
            puppet = await srv.login(pc)
            await puppet.discover([ALICE], "full")  # the spammer's own: it knows them
            await puppet.close()
            g = (await spammer.group("create", subject="spam", members=[BOB])).group
            for _ in range(30):
                assert (await spammer.group_add(g, [DAVE])).failed == ()
                await spammer.group_remove(g, [DAVE])
            assert srv.queue_count(vc.device) <= share + 1  # was 61, past queue-max-count
            assert srv.queue_count(pc.device) == 60  # the puppet's own add and remove notices
            assert (await friend.send(BOB, b"still reachable")).t  # not 402
            # a contact's membership changes reach the victim past the share
            before = srv.queue_count(vc.device)
            other = "4917612340001"
            await srv.register(other)
            g2 = (await friend.group("create", subject="friends", members=[BOB])).group
            assert (await friend.group_add(g2, [other])).failed == ()
            await friend.group_remove(g2, [other])
            assert srv.queue_count(vc.device) == before + 3
            for c in (spammer, friend):
                await c.close()

        run(main())
    finally:
        srv.stop()


def test_a_strangers_adds_fill_at_most_stranger_groups_of_a_users_groups(tmp_path):
    """One account could add a user to groups-per-day groups a day and leave them: in
    ten days (or with eleven accounts in one) the user was in user-groups-max groups
    and their friends' adds got 437.  A stranger's add counts in stranger-groups until
    the user writes to the group or knows the adder; joins and contacts' adds never."""
    srv = start(tmp_path, new_chats=0, stranger_groups=3, group_member_changes=0)
    try:

        async def main():
            bob = await srv.login(await srv.register(BOB))
            alice = await srv.login(await srv.register(ALICE))
            carol = await srv.login(await srv.register(CAROL))
            await bob.discover([CAROL], "full")  # carol: bob's contact
            groups = []
            for i in range(3):
                res = await alice.group("create", subject=f"spam {i}", members=[BOB])
                assert res.failed == ()
                groups.append(res.group)
                await alice.group_leave(res.group)  # bob stays in it, an admin now
            res = await alice.group("create", subject="spam 3", members=[BOB])
            assert res.failed == ((BOB, ErrorCode.STRANGER_GROUPS),)
            spare = res.group
            assert (await alice.group_add(spare, [BOB])).failed == (
                (BOB, ErrorCode.STRANGER_GROUPS),
            )
            # his contact's add, and a join by invite (his own act), are not counted
            g = (await carol.group("create", subject="friends", members=[BOB])).group
            assert BOB in (await carol.group_info(g)).users
            code = await alice.group_invite(spare)
            await bob.group_join(code)
            assert BOB in (await alice.group_info(spare)).users
            await bob.group_leave(spare)
            # bob writes to one of them: it counts no more, so there is room for one
            await bob.send(groups[0], b"hello")
            assert (await alice.group_add(spare, [BOB])).failed == ()
            await bob.group_leave(spare)  # (a marked membership left: room again)
            assert (await alice.group_add(spare, [BOB])).failed == ()
            other = (await alice.group("create", subject="spam 4", members=[BOB])).failed
            assert other == ((BOB, ErrorCode.STRANGER_GROUPS),)
            # alice becomes bob's contact: her adds count no more (checked again past it)
            await bob.discover([ALICE], "full")
            res = await alice.group("create", subject="spam 5", members=[BOB])
            assert res.failed == ()
            for c in (alice, bob, carol):
                await c.close()

        run(main())
    finally:
        assert srv.stop() == 0, srv.log_text()[-3000:]


def test_join_requests_of_a_store_from_before_grq_are_indexed_at_open_and_expire(tmp_path):
    """A store from before the grq index holds join requests with no key in it: they
    never expired (unless a newer request in the same group did).  The open indexes
    them, once."""
    srv = start(tmp_path, group_request_expiry=600, purge_interval=0.2)
    try:

        async def main():
            alice, bob = [await srv.login(await srv.register(p)) for p in (ALICE, BOB)]
            g = (await alice.group("create", subject="club")).group
            await alice.group_settings(g, approval=True)
            assert (await bob.group_join(await alice.group_invite(g))).get("requested") == "1"
            for c in (alice, bob):
                await c.close()
            return g

        g = run(main())
    finally:
        assert srv.stop() == 0
    # the store as an older pigeon left it: the request, no index key, no mark
    store = Store(str(srv.data_dir / "store"), map_size=256 << 20, create=False)
    try:
        with store.env.begin(write=True) as txn:
            txn.drop(store._db["grq"], delete=False)
            txn.delete(b"grqidx", db=store._db["meta"])
    finally:
        store.close()
    assert table_entries(srv, "grq") == 1  # (this open indexed it)
    srv.start()
    try:

        async def later():
            alice = await srv.login(await srv.register(ALICE))
            assert await alice.group_requests(g) == (BOB,)
            srv.advance_clock(601)
            await until(lambda: table_entries(srv, "grq") == 0, timeout=20)
            assert await alice.group_requests(g) == ()
            await alice.close()

        run(later())
    finally:
        assert srv.stop() == 0
