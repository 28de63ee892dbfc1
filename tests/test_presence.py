"""Presence, typing, privacy, contact discovery, blocking and the anti-spam limits,
on a real server with two workers, the real SDK and the server's clock moved
forward through its test clock file (never by sleeping through a window)."""

from __future__ import annotations

import asyncio
import os

import pytest
from serverutil import Server, on_other_worker, until

from pigeon.client import ServerError
from pigeon.client._core import ScramLogin
from pigeon.core.connection import NEED_DATA, Connection, Role
from pigeon.core.errors import ErrorCode, LocalProtocolError
from pigeon.core.events import (
    AuthChallenge,
    AuthSuccess,
    IncomingChatState,
    IncomingMessage,
    PresenceUpdate,
    Privacy,
    PrivacySettings,
)
from pigeon.core.tokens import LATEST_VERSION
from pigeon.server.social import Social
from pigeon.server.store import Store

ALICE, BOB, CAROL, DAVE, EVE = (
    "491701234567", "4915112345678", "447700900123", "33612345678", "4930123456789",
)  # fmt: skip
NOBODY = "15550001111"  # never registered
DAY = 86_400


def run(coro, timeout=90):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def start(tmp_path, **options) -> Server:
    return Server(tmp_path / "data", workers=2, **options).start()


@pytest.fixture
def server(tmp_path):
    srv = start(tmp_path)
    yield srv
    assert srv.stop() == 0, srv.log_text()[-3000:]


async def next_of(client, kind, timeout=10.0):
    """The next event of type ``kind``, skipping (and acking) anything else."""
    while True:
        ev = await client.next_event(timeout)
        if isinstance(ev, kind):
            return ev
        if hasattr(ev, "seq"):
            await client.ack(ev.seq)


async def no_event(client, seconds=0.5):
    """Nothing at all arrives within ``seconds``."""
    with pytest.raises(TimeoutError):
        ev = await client.next_event(seconds)
        raise AssertionError(f"unexpected event {ev}")


def store_of(srv: Server) -> Store:
    return Store(str(srv.data_dir / "store"), map_size=256 << 20, create=False)


async def users(srv, *phones):
    return [await srv.register(p) for p in phones]


def test_presence_is_seen_across_workers_with_a_durable_last_seen(server):
    async def main():
        a_creds, b_creds = await users(server, ALICE, BOB)
        bob = await server.login(b_creds)
        await until(lambda: b_creds.device in server.sessions(BOB))
        bob_worker = server.sessions(BOB)[b_creds.device]["worker"]
        alice = await on_other_worker(server, a_creds, ALICE, bob_worker)

        await bob.subscribe(ALICE)
        first = await next_of(bob, PresenceUpdate)
        assert (first.sender, first.type, first.last) == (
            ALICE,
            "unavailable",
            None,
        )  # never online

        await alice.set_presence(True)
        ev = await next_of(bob, PresenceUpdate)
        assert (ev.sender, ev.type, ev.last) == (ALICE, "available", None)

        await alice.set_presence(False)
        ev = await next_of(bob, PresenceUpdate)
        assert ev.type == "unavailable" and ev.last is not None
        last = ev.last

        await alice.set_presence(True)
        assert (await next_of(bob, PresenceUpdate)).type == "available"
        await alice.close()  # disconnecting ends the availability too
        ev = await next_of(bob, PresenceUpdate)
        assert ev.type == "unavailable" and ev.last >= last

        # a second device of the user keeps it online while the first goes
        await bob.unsubscribe(ALICE)
        await alice_again(server, a_creds, bob)
        await bob.close()

    async def alice_again(server, a_creds, bob):
        alice = await server.login(a_creds)
        await alice.set_presence(True)
        await asyncio.sleep(0.3)
        await no_event(bob, 0.5)  # unsubscribed: no pushes
        await alice.close()

    run(main())
    # last seen is durable: read straight from the store after a restart
    server.stop()
    server.start()
    store = store_of(server)
    try:
        rec = Social(store, None).presence(ALICE)
        assert rec["a"] == {} and rec["last"] is not None
    finally:
        store.close()

    async def after_restart():
        bob = await server.login((await users(server, CAROL))[0])
        await bob.subscribe(ALICE)
        ev = await next_of(bob, PresenceUpdate)
        assert ev.type == "unavailable" and ev.last == rec["last"]
        await bob.close()

    run(after_restart())


def test_last_seen_and_online_privacy_for_all_three_settings(server):
    async def main():
        a_creds, b_creds, c_creds = await users(server, ALICE, BOB, CAROL)
        alice = await server.login(a_creds)
        res = await alice.discover([BOB, NOBODY])  # bob becomes alice's contact
        assert res.users == (BOB,)
        bob, carol = await server.login(b_creds), await server.login(c_creds)
        await alice.set_presence(True)
        await alice.set_presence(False)  # now alice has a last seen
        await alice.ping()
        for c in (bob, carol):
            await c.subscribe(ALICE)
        seen_b = await next_of(bob, PresenceUpdate)
        seen_c = await next_of(carol, PresenceUpdate)
        assert seen_b.last is not None and seen_c.last == seen_b.last  # everyone (the default)

        settings = await alice.privacy(last="contacts")
        assert (settings.last, settings.online) == ("contacts", "everyone")
        # carol's view changed (no last any more): pushed; bob's did not
        ev = await next_of(carol, PresenceUpdate)
        assert ev.type == "unavailable" and ev.last is None
        await no_event(bob)

        await alice.privacy(last="nobody")
        ev = await next_of(bob, PresenceUpdate)
        assert ev.last is None
        await no_event(carol)  # already hidden

        await alice.privacy(last="everyone", online="contacts")
        assert (await next_of(bob, PresenceUpdate)).last == seen_b.last
        assert (await next_of(carol, PresenceUpdate)).last == seen_b.last
        await alice.set_presence(True)
        assert (await next_of(bob, PresenceUpdate)).type == "available"
        await no_event(carol)  # may not see online: still "unavailable", nothing changed

        await alice.privacy(online="nobody")
        ev = await next_of(bob, PresenceUpdate)
        assert ev.type == "unavailable"  # hidden online, with the last seen she shares
        await alice.privacy(online="everyone")
        assert (await next_of(bob, PresenceUpdate)).type == "available"
        assert (await next_of(carol, PresenceUpdate)).type == "available"
        assert (await alice.privacy()).online == "everyone"  # a read changes nothing
        for c in (alice, bob, carol):
            await c.close()

    run(main())


def test_typing_goes_to_online_devices_only_and_is_never_stored(server):
    async def main():
        a_creds, b_creds = await users(server, ALICE, BOB)
        alice = await server.login(a_creds)
        await until(lambda: a_creds.device in server.sessions(ALICE))
        await alice.typing(BOB, "composing")  # bob is offline: dropped
        await alice.send(BOB, b"after the typing")
        bob = await on_other_worker(
            server, b_creds, BOB, server.sessions(ALICE)[a_creds.device]["worker"]
        )
        ev = await bob.next_event(10)
        assert isinstance(ev, IncomingMessage) and ev.body == b"after the typing"
        await bob.ack(ev.seq)
        assert server.queue_stats()["count"] <= 1  # only the delivered receipt, if any

        await alice.typing(BOB, "composing")  # bob online, on the other worker
        ev = await next_of(bob, IncomingChatState)
        assert (ev.sender, ev.type) == (ALICE, "composing")
        await alice.typing(BOB, "paused")
        assert (await next_of(bob, IncomingChatState)).type == "paused"
        await alice.close()
        await bob.close()

    run(main())


def test_typing_floods_are_dropped_with_one_error(tmp_path):
    srv = start(tmp_path, typing_rate=1, typing_burst=3)
    try:

        async def main():
            a_creds, b_creds = await users(srv, ALICE, BOB)
            alice, bob = await srv.login(a_creds), await srv.login(b_creds)
            for _ in range(30):
                await alice.typing(BOB, "composing")
            err = await alice.next_event(10)
            assert err.code == ErrorCode.TOO_FAST
            got = 0
            with pytest.raises(TimeoutError):
                while True:
                    await next_of(bob, IncomingChatState, timeout=1.0)
                    got += 1
            assert 3 <= got <= 5  # the burst (and what refilled meanwhile), not 30
            await alice.close()
            await bob.close()

        run(main())
    finally:
        assert srv.stop() == 0


def test_blocking_in_both_directions(server):
    async def main():
        a_creds, b_creds, c_creds = await users(server, ALICE, BOB, CAROL)
        alice, bob, carol = [await server.login(c) for c in (a_creds, b_creds, c_creds)]
        await alice.set_presence(True)
        await alice.ping()  # a barrier: the server has handled what alice sent before
        await bob.subscribe(ALICE)
        assert (await next_of(bob, PresenceUpdate)).type == "available"

        ack = await alice.block(BOB)
        assert ack.cls == "block"
        assert await alice.blocklist() == (BOB,)
        ev = await next_of(bob, PresenceUpdate)  # the blocker disappears for the blocked
        assert (ev.type, ev.last) == ("unavailable", None)

        # blocked -> blocker: acked (one tick) and dropped, not queued
        before = server.queue_stats()["count"]
        ack = await bob.send(ALICE, b"you will not see this", id="dropped-1")
        assert ack.id == "dropped-1"
        again = await bob.send(ALICE, b"you will not see this", id="dropped-1")
        assert again.t == ack.t  # a retry: the same ack again
        await bob.receipt(ALICE, "some-id", "read")  # receipts too
        await bob.typing(ALICE)
        assert server.queue_stats()["count"] == before
        await carol.send(ALICE, b"from carol")
        ev = await alice.next_event(10)  # the first thing alice gets is carol's message
        assert isinstance(ev, IncomingMessage) and ev.body == b"from carol"
        await alice.ack(ev.seq)

        # blocker -> blocked: refused, so the blocker knows to unblock first
        with pytest.raises(ServerError) as info:
            await alice.send(BOB, b"hello?")
        assert info.value.code == ErrorCode.BLOCKED
        with pytest.raises(ServerError) as info:  # a receipt too: refused, never acked for nothing
            await alice.receipt(BOB, "some-id", "read")
        assert info.value.code == ErrorCode.BLOCKED

        # a number that is not a user is blocked like one (no registration oracle)
        await alice.block(NOBODY)
        assert NOBODY in await alice.blocklist()
        await alice.unblock(NOBODY)
        # errors say what is wrong
        with pytest.raises(ServerError) as info:
            await alice.block(ALICE)
        assert info.value.code == ErrorCode.BAD_REQUEST

        await alice.unblock(BOB)
        assert await alice.blocklist() == ()
        assert (await next_of(bob, PresenceUpdate)).type == "available"
        await bob.send(ALICE, b"now you do")
        ev = await alice.next_event(10)
        assert isinstance(ev, IncomingMessage) and ev.body == b"now you do"
        await alice.send(BOB, b"hi again")
        for c in (alice, bob, carol):
            await c.close()

    run(main())


def test_contact_discovery_results_store_only_users_and_are_rate_limited(tmp_path):
    srv = start(tmp_path, discover_numbers=5, discover_batch=10)
    try:
        strangers = [f"4915550000{i:03d}" for i in range(12)]

        async def main():
            a_creds, *_ = await users(srv, ALICE, BOB, CAROL)
            alice = await srv.login(a_creds)
            res = await alice.discover([BOB, strangers[0], CAROL, ALICE, BOB])
            assert res.users == (BOB, CAROL) and res.limit == 2  # 3 new numbers counted
            res = await alice.discover([BOB, CAROL])  # a re-sync of known contacts is free
            assert res.users == (BOB, CAROL) and res.limit == 2
            with pytest.raises(ServerError) as info:
                await alice.discover(strangers[1:4], "add")  # 3 new, 2 left: refused whole
            assert info.value.code == ErrorCode.RATE_LIMITED and "2 more" in info.value.text
            with pytest.raises(ServerError) as info:
                await alice.discover(strangers[:11])
            assert info.value.code == ErrorCode.TOO_MANY
            srv.advance_clock(DAY + 1)  # the window slides past
            res = await alice.discover([BOB, *strangers[1:4]], "add")
            assert res.users == (BOB,) and res.limit == 2
            res = await alice.discover([BOB], "remove")
            assert res.users == ()
            res = await alice.discover([CAROL, DAVE], "full")  # dave is no user (yet)
            assert res.users == (CAROL,)
            await alice.close()

        run(main())
        store = store_of(srv)
        try:
            with store.read() as txn:
                pairs = [k.decode().split("\x00") for k, _ in txn.cursor(db=store._db["contacts"])]
                rpairs = [
                    k.decode().split("\x00") for k, _ in txn.cursor(db=store._db["rcontacts"])
                ]
            assert pairs == [[ALICE, CAROL]] and rpairs == [[CAROL, ALICE]]  # no stranger kept
            store.delete_account(CAROL)  # a deleted account leaves no pair behind
            with store.read() as txn:
                assert txn.stat(store._db["contacts"])["entries"] == 0
                assert txn.stat(store._db["rcontacts"])["entries"] == 0
        finally:
            store.close()
    finally:
        assert srv.stop() == 0


def test_device_lists_of_strangers_count_against_the_discovery_limit(tmp_path):
    """A device list says whether a number is registered, so looking up users
    outside one's contacts costs discover-numbers as discovery does: no way
    around that limit to test numbers (the account itself and contacts are free)."""
    srv = start(tmp_path, discover_numbers=3)
    try:
        strangers = [f"4915550000{i:03d}" for i in range(3)]

        async def main():
            a_creds, *_ = await users(srv, ALICE, BOB, CAROL)
            alice = await srv.login(a_creds)
            assert [d.device for d in await alice.devices(BOB)] == [f"{BOB}:0"]  # 1 of 3
            with pytest.raises(ServerError) as info:
                await alice.devices(strangers[0])  # no user: counted all the same (2 of 3)
            assert info.value.code == ErrorCode.UNKNOWN_RECIPIENT
            await alice.devices(CAROL)  # 3 of 3
            with pytest.raises(ServerError) as info:
                await alice.devices(DAVE, fresh=True)
            assert info.value.code == ErrorCode.RATE_LIMITED and "discovery" in info.value.text
            for _ in range(3):  # its own account is free, again and again
                assert await alice.devices(ALICE, fresh=True)
            srv.advance_clock(DAY + 1)
            assert (await alice.discover([BOB])).users == (BOB,)  # 1 of 3 in the new window
            for _ in range(4):  # a contact is free
                assert await alice.devices(BOB, fresh=True)
            for phone in strangers[1:]:  # 2 more strangers fit, then the limit again
                with pytest.raises(ServerError) as info:
                    await alice.devices(phone)
                assert info.value.code == ErrorCode.UNKNOWN_RECIPIENT
            with pytest.raises(ServerError) as info:
                await alice.devices(CAROL, fresh=True)
            assert info.value.code == ErrorCode.RATE_LIMITED
            await alice.close()

        run(main())
    finally:
        assert srv.stop() == 0


def test_presence_of_strangers_counts_against_the_discovery_limit(tmp_path):
    """probe9: a user seen online shows a ``last`` to everyone by default, a
    number that is no user none, so subscribing told strangers which numbers
    are registered at the message rate (3,000 numbers, the discovery budget
    untouched).  A subscription outside one's contacts and groups now costs
    one number of discover-numbers (302 past it, nothing about the user sent);
    the account itself, contacts and renewals are free."""
    srv = start(tmp_path, discover_numbers=3)
    try:
        strangers = [f"4915550001{i:03d}" for i in range(4)]

        async def main():
            a_creds, b_creds, *_ = await users(srv, ALICE, BOB, CAROL)
            bob = await srv.login(b_creds)
            await bob.close()  # seen online: a last
            alice = await srv.login(a_creds)
            for phone in (BOB, strangers[0], CAROL):  # 3 of 3
                await alice.subscribe(phone)
                ev = await next_of(alice, PresenceUpdate)
                assert ev.sender == phone
            await alice.subscribe(BOB)  # held by this connection: renewing is free
            assert (await next_of(alice, PresenceUpdate)).sender == BOB
            await alice.subscribe(ALICE)  # itself: free
            assert (await next_of(alice, PresenceUpdate)).sender == ALICE
            await alice.subscribe(strangers[1])  # a 4th stranger: refused
            err = await alice.next_event(10)
            assert err.code == ErrorCode.RATE_LIMITED and "discovery" in err.text
            await no_event(alice, 0.5)  # and nothing about the number
            srv.advance_clock(DAY + 1)
            assert (await alice.discover([CAROL])).users == (CAROL,)  # 1 of 3: a contact now
            await alice.close()
            alice = await srv.login(a_creds)
            for _ in range(3):  # a contact is free, connection after connection
                await alice.subscribe(CAROL)
                assert (await next_of(alice, PresenceUpdate)).sender == CAROL
                await alice.unsubscribe(CAROL)
            for phone in strangers[2:]:  # 2 strangers fit, then the limit again
                await alice.subscribe(phone)
                assert (await next_of(alice, PresenceUpdate)).sender == phone
            await alice.subscribe(BOB)
            assert (await alice.next_event(10)).code == ErrorCode.RATE_LIMITED
            await alice.close()

        run(main())
    finally:
        assert srv.stop() == 0


def test_new_conversation_limit_triggers_and_resets_with_the_window(tmp_path):
    srv = start(tmp_path, new_chats=2, new_chats_window=DAY)
    try:

        async def main():
            creds = await users(srv, ALICE, BOB, CAROL, DAVE, EVE)
            alice, bob, carol, dave, eve = [await srv.login(c) for c in creds]
            await alice.send(BOB, b"1")  # new chat 1
            await bob.send(ALICE, b"reply")  # a reply starts nothing
            await alice.send(BOB, b"again")  # an ongoing chat is not new
            await alice.send(CAROL, b"2")  # new chat 2
            with pytest.raises(ServerError) as info:
                await alice.send(DAVE, b"3")
            assert info.value.code == ErrorCode.NEW_CHAT_LIMIT
            assert "2 new chats" in info.value.text
            await dave.discover([ALICE])  # dave has alice as a contact: not limited
            await alice.send(DAVE, b"3, to a contact")
            with pytest.raises(ServerError):
                await alice.send(EVE, b"4")
            await eve.send(ALICE, b"eve's own first message counts for eve, not alice")
            await alice.send(EVE, b"now a reply")
            frank = "4930999888777"
            await srv.register(frank)
            with pytest.raises(ServerError):
                await alice.send(frank, b"still over the limit")
            srv.advance_clock(DAY + 1)  # a fresh window: alice may start new chats again
            await alice.send(frank, b"a new chat in the new window")
            await alice.send(BOB, b"and the old chats go on")
            for c in (alice, bob, carol, dave, eve):
                await c.close()

        run(main())
    finally:
        assert srv.stop() == 0


def test_message_rate_per_connection(tmp_path):
    srv = start(tmp_path, message_rate=1, message_burst=3)
    try:

        async def main():
            a_creds, b_creds = await users(srv, ALICE, BOB)
            alice = await srv.login(a_creds)
            results = await asyncio.gather(
                *(alice.send(BOB, b"x", id=f"m{i}") for i in range(6)), return_exceptions=True
            )
            refused = [r for r in results if isinstance(r, ServerError)]
            assert 2 <= len(refused) <= 3 and all(r.code == ErrorCode.TOO_FAST for r in refused)
            await asyncio.sleep(1.2)  # the bucket refills at 1 a second
            await alice.send(BOB, b"x", id="m0")  # a retry of an accepted id: acked again
            await alice.close()

        run(main())
    finally:
        assert srv.stop() == 0


def test_a_dictionary_version_1_client_uses_the_new_nodes(server):
    """Version 1 lacks the token `online`: the client sends it as a literal."""

    async def main():
        (creds,) = await users(server, ALICE)
        r, w = await asyncio.open_connection("127.0.0.1", server.port)
        conn = Connection(Role.CLIENT, dictionary_version=1)
        scram = ScramLogin(creds)
        w.write(conn.initiate() + conn.send(scram.first()))

        async def event():
            while True:
                ev = conn.next_event()
                if ev is not NEED_DATA:
                    return ev
                conn.receive_data(await asyncio.wait_for(r.read(65536), 10))

        assert (await event()).dictionary == LATEST_VERSION  # the server's preamble: its newest
        challenge = await event()
        assert isinstance(challenge, AuthChallenge)
        w.write(conn.send(scram.final(challenge)))
        assert isinstance(await event(), AuthSuccess)
        w.write(conn.send(Privacy("p1", online="contacts")))
        ev = await event()
        assert ev == PrivacySettings("p1", "everyone", "contacts")
        w.close()

    run(main())


def test_worker_crash_ends_its_devices_presence(server):
    async def main():
        a_creds, b_creds = await users(server, ALICE, BOB)
        alice = await server.login(a_creds)
        await until(lambda: a_creds.device in server.sessions(ALICE))
        alice_worker = server.sessions(ALICE)[a_creds.device]["worker"]
        bob = await on_other_worker(server, b_creds, BOB, alice_worker, reconnect=True)
        await alice.set_presence(True)
        await alice.ping()  # a barrier: the server has handled what alice sent before
        await bob.subscribe(ALICE)
        assert (await next_of(bob, PresenceUpdate)).type == "available"
        os.kill(server.worker_pid(alice_worker), 9)
        ev = await next_of(bob, PresenceUpdate, timeout=20)
        assert ev.type == "unavailable" and ev.last is not None
        await alice.close()

        # bob's own worker dies: the SDK reconnects and subscribes again by itself
        os.kill(server.worker_pid(server.sessions(BOB)[b_creds.device]["worker"]), 9)
        await until(lambda: bob.reconnects == 1, timeout=30)
        ev = await next_of(bob, PresenceUpdate, timeout=20)  # the state, at the resubscribe
        assert ev.type == "unavailable"
        alice = await server.login(a_creds)
        await alice.set_presence(True)
        assert (await next_of(bob, PresenceUpdate, timeout=20)).type == "available"
        await bob.close()
        await alice.close()

    run(main())


def test_bad_presence_input_gets_clear_errors(tmp_path):
    srv = start(tmp_path, presence_subscriptions=2)
    try:

        async def main():
            (creds,) = await users(srv, ALICE)
            alice = await srv.login(creds)
            await alice.subscribe(NOBODY)  # not a user: looks like everything hidden
            ev = await next_of(alice, PresenceUpdate)
            assert (ev.sender, ev.type, ev.last) == (NOBODY, "unavailable", None)
            await alice.subscribe(BOB)
            await next_of(alice, PresenceUpdate)
            await alice.subscribe(CAROL)  # a third: past presence-subscriptions
            err = await alice.next_event(10)
            assert err.code == ErrorCode.TOO_MANY
            await alice.typing(NOBODY)  # dropped, as to a user: no error tells them apart
            await alice.ping()
            with pytest.raises(asyncio.TimeoutError):
                await alice.next_event(0.5)
            # a number the server would refuse (200) is refused before it is sent
            with pytest.raises(
                LocalProtocolError, match=r"Discover: 'phones\[0\]' must be an E.164"
            ):
                await alice.discover(["+49 170 1234567"])
            await alice.ping()  # the connection goes on
            await alice.close()

        run(main())
    finally:
        assert srv.stop() == 0
