"""Groups through the SDK over a real server (2 workers), encrypted end to end (issue 17).

Three users, each an encrypting client (Megolm sender keys shared over Olm:
client/group_crypto.py) connected through a recording TCP relay on
loopback, so the test holds every byte that crossed the wire: no plaintext
crosses it or lands in the server's files, and the body a removed member
would have needed is taken from what the server delivered to the others.
"""

import asyncio
import itertools
import time
from types import SimpleNamespace

import pytest
from e2eutil import (
    Relay,
    companion,
    connect,
    grep_dir,
    on_other_worker,
    provision_keyed,
    register,
)
from serverutil import Server, until

from pigeon.client import ServerError
from pigeon.client.group_crypto import UnknownSession
from pigeon.client.secure import GroupDecryptionFailed, GroupMessage, SafetyNumberChanged
from pigeon.core.errors import ErrorCode
from pigeon.core.events import (
    DevicesBatchQuery,
    DevicesChanged,
    GroupNotice,
    IncomingMessage,
    IncomingReceipt,
    KeysChanged,
)
from pigeon.server.queues import GPAYLOAD, entry_fields
from pigeon.server.store import Store

PHONES = (f"4932{n:08d}" for n in itertools.count(30_000_000))


def run(coro, timeout=180):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def body_of(node) -> bytes:
    """A delivered group message's body (its content, or its ``body`` child)."""
    if isinstance(node.content, list):
        return bytes(next(c.content for c in node.content if c.tag == "body"))
    return bytes(node.content)


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    # new_chats=0: the 1,024-member groups are of strangers, each add a new chat
    # (test_hardening::test_a_group_of_strangers_costs_new_chats)
    s = Server(tmp_path_factory.mktemp("gsdk") / "data", workers=2, register_per_ip=1000,
               message_rate=0, new_chats=0)  # fmt: skip
    s.start()
    yield s
    assert s.stop() == 0, s.log_text()[-3000:]


def worker(srv, client) -> int:
    return srv.sessions(client.creds.user)[client.creds.device]["worker"]


async def group_event(client, timeout=15.0):
    """The next group message, failure or notice; other notices before it are acked."""
    while True:
        ev = await client.next_event(timeout)
        if isinstance(ev, SafetyNumberChanged):
            continue
        await client.ack(ev.seq)
        if isinstance(ev, (IncomingReceipt, DevicesChanged, KeysChanged)):
            continue
        return ev


async def message(client, timeout=15.0):
    """The next group message (or failure); notices before it are skipped."""
    while True:
        ev = await group_event(client, timeout)
        if not isinstance(ev, GroupNotice):
            return ev


async def notice(client, op, timeout=15.0) -> GroupNotice:
    while True:
        ev = await group_event(client, timeout)
        assert isinstance(ev, GroupNotice), ev
        if ev.op == op:
            return ev


def test_group_encrypted_end_to_end_and_a_removed_member_cannot_read_on(srv, tmp_path):
    secrets = [b"group secret one: the vault code is 4417", b"group secret two, from bob",
               b"group secret three, after carol left"]  # fmt: skip

    async def main():
        relay = await Relay(srv.port).start()
        pa, pb, pc = next(PHONES), next(PHONES), next(PHONES)
        a = await register(srv, relay, pa, tmp_path / "a.json")
        b = await register(srv, relay, pb, tmp_path / "b.json")
        c = await register(srv, relay, pc, tmp_path / "c.json")
        b = await on_other_worker(srv, relay, b, tmp_path / "b.json", worker(srv, a))
        made = await a.group_create("team", [pb, pc])
        g = made.group
        assert made.failed == ()
        for cl in (b, c):
            n = await notice(cl, "create")
            assert (n.group, n.by) == (g, pa)
        info = await b.group_info(g)
        assert (info.subject, set(info.users), info.admins) == ("team", {pa, pb, pc}, (pa,))

        # one ciphertext for both members, each decrypts it; then bob writes back
        ack = await a.send(g, secrets[0])
        for cl in (b, c):
            ev = await message(cl)
            assert type(ev) is GroupMessage, ev
            assert (ev.group, ev.sender, ev.id, ev.type, ev.body) == (g, a.device, ack.id,
                                                                       "text", secrets[0])  # fmt: skip
        await b.send(g, secrets[1])
        for cl in (a, c):
            ev = await message(cl)
            assert (type(ev), ev.sender, ev.body) == (GroupMessage, b.device, secrets[1])
        first = relay.delivered(g)
        assert len(first) == 4 and all(secrets[0] not in body_of(n) for n in first)

        # carol removed: alice's next message starts a new session that carol never gets
        await a.group_remove(g, [pc])
        assert (await notice(c, "remove")).members == (pc,)
        old_sid = a.secure.groups.outbound[g].session.session_id
        ack = await a.send(g, secrets[2])
        assert a.secure.groups.outbound[g].session.session_id != old_sid
        ev = await message(b)
        assert (type(ev), ev.body) == (GroupMessage, secrets[2])
        with pytest.raises(TimeoutError):  # the server sends her nothing more
            await message(c, timeout=1.0)
        (last,) = [n for n in relay.delivered(g) if n.attrs.get("id") == ack.id]
        with pytest.raises(UnknownSession):  # and the body, had she got it, is closed to her
            c.secure.groups.decrypt(g, a.device, body_of(last), ack.id)
        as_delivered = IncomingMessage(a.device, ack.id, "skmsg", int(last.attrs["t"]), 1,
                                       body_of(last), None, g)  # fmt: skip
        ev = c.secure.decrypt_group(as_delivered, None)
        assert type(ev) is GroupDecryptionFailed and ev.unknown_session

        # bob loses his copy of alice's key: the next message fails for him, his SDK
        # asks alice's device (a 1:1 encrypted request) and the one after is his again
        b.secure.groups.inbound.clear()
        await a.send(g, b"lost on bob")
        ev = await message(b)
        assert type(ev) is GroupDecryptionFailed and ev.unknown_session
        await until(lambda: b.device not in a.secure.groups.outbound[g].shared)
        await a.send(g, b"yours again")
        ev = await message(b)
        assert (type(ev), ev.body) == (GroupMessage, b"yours again")

        # nothing in clear on the wire or in the server's files
        assert not any(s in relay.captured for s in secrets)
        for cl in (a, b, c):
            await cl.close()
        await relay.close()
        assert grep_dir(srv.data_dir, secrets) == []
        for f in tmp_path.iterdir():  # the SDK's profiles neither
            assert not any(s in f.read_bytes() for s in secrets), f

    run(main())


def test_trio_client_creates_reads_sends_and_receives_encrypted(srv, tmp_path):
    import trio

    from pigeon.client.trio import open_client

    pa, pb = next(PHONES), next(PHONES)

    async def make(phone):
        async with open_client("127.0.0.1", srv.port, profile=tmp_path / f"{phone}.json") as c:
            await c.register(phone)
            creds = await c.verify(phone, srv.code_for(phone))
            await c.login(creds)  # the keys go up
            return creds

    async def main():
        ca, cb = await make(pa), await make(pb)
        async with (
            open_client("127.0.0.1", srv.port, profile=tmp_path / f"{pa}.json") as a,
            open_client("127.0.0.1", srv.port, profile=tmp_path / f"{pb}.json") as b,
        ):
            await a.login(ca)
            await b.login(cb)
            g = (await a.group_create("trio folk", [pb])).group
            info = await b.group_info(g)
            assert (info.subject, info.admins, set(info.users)) == ("trio folk", (pa,), {pa, pb})
            assert (g, "trio folk") in [(i[0], i[1]) for i in await b.groups()]
            ack = await a.send(g, b"over trio, encrypted")
            while True:
                ev = await b.next_event(15)
                await b.ack(ev.seq)
                if isinstance(ev, GroupMessage):
                    break
            assert (ev.group, ev.sender, ev.id, ev.body) == (g, ca.device, ack.id,
                                                             b"over trio, encrypted")  # fmt: skip

    trio.run(main)


def shares(relay, group, mid) -> int:
    """How many deliveries of message ``mid`` carried a key share."""
    return sum(isinstance(n.content, list) for n in relay.delivered(group)
               if n.attrs.get("id") == mid)  # fmt: skip


def test_keys_follow_new_members_companions_and_unlinked_devices(srv, tmp_path):
    async def main():
        relay = await Relay(srv.port).start()
        pa, pb, pc = next(PHONES), next(PHONES), next(PHONES)
        a = await register(srv, relay, pa, tmp_path / "a.json")
        a1 = await companion(srv, relay, a, tmp_path / "a1.json")
        b = await register(srv, relay, pb, tmp_path / "b.json")
        c = await register(srv, relay, pc, tmp_path / "c.json")
        g = (await a.group_create("keys", [pb])).group

        # b and alice's laptop (the sent-sync copy) each get a share with the first one
        ack = await a.send(g, b"one")
        for cl in (b, a1):
            ev = await message(cl)
            assert (type(ev), ev.sender, ev.body) == (GroupMessage, a.device, b"one")
        assert shares(relay, g, ack.id) == 2
        ack = await a.send(g, b"two")  # they hold the key now: the body alone
        for cl in (b, a1):
            assert (await message(cl)).body == b"two"
        assert shares(relay, g, ack.id) == 0

        # carol added: only she gets a share, and reads from there on
        await a.group_add(g, [pc])
        sid = a.secure.groups.outbound[g].session.session_id
        ack = await a.send(g, b"three")
        assert a.secure.groups.outbound[g].session.session_id == sid  # no rotation for a join
        for cl in (b, a1, c):
            assert (await message(cl)).body == b"three"
        assert shares(relay, g, ack.id) == 1
        # the laptop writes with its own session: everyone else decrypts it
        await a1.send(g, b"from the laptop")
        for cl in (a, b, c):
            ev = await message(cl)
            assert (type(ev), ev.sender, ev.body) == (GroupMessage, a1.device, b"from the laptop")

        # the laptop unlinked: alice's next message starts a new session without it
        await a.unlink(a1.device)
        ack = await a.send(g, b"four")
        assert a.secure.groups.outbound[g].session.session_id != sid
        for cl in (b, c):
            assert (await message(cl)).body == b"four"
        assert shares(relay, g, ack.id) == 2  # b and c again, not the laptop
        for cl in (a, b, c):
            await cl.close()
        await relay.close()

    run(main())


def test_every_group_operation_through_the_sdk(srv):
    """Each SDK method once, with the permission errors it can meet (the server's
    rules are tests/test_groups.py's; this is the SDK's side of them)."""
    from pigeon.client import ServerError
    from pigeon.core.errors import ErrorCode

    async def main():
        phones = [next(PHONES) for _ in range(5)]
        pa, pb, pc, pd, pe = phones
        a, b, c, d, e = [await srv.login(await srv.register(p)) for p in phones]
        made = await a.group_create("ops", [pb, "4400000000000"])
        g = made.group
        assert made.failed == (("4400000000000", ErrorCode.UNKNOWN_RECIPIENT),)
        assert [(i[0], i[1]) for i in await b.groups()] == [(g, "ops")]

        await a.group_subject(g, "ops 2")
        assert (await notice(b, "subject")).get("subject") == "ops 2"
        await a.group_description(g, "what we do")
        info = await b.group_info(g)
        assert (info.subject, info.description, info.creator) == ("ops 2", "what we do", pa)
        with pytest.raises(ServerError) as err:
            await b.group_add(g, [pc])
        assert err.value.code == ErrorCode.NOT_ADMIN

        # announcement mode: only admins send; a plaintext client sends the body as given
        await a.group_settings(g, announce=True)
        assert (await b.group_info(g)).announce
        with pytest.raises(ServerError) as err:
            await b.send(g, b"may I?")
        assert err.value.code == ErrorCode.ANNOUNCE_ONLY
        await a.group_promote(g, [pb])
        assert set((await a.group_info(g)).admins) == {pa, pb}
        await b.send(g, b"admins may")
        while True:
            ev = await group_event(a)
            if isinstance(ev, IncomingMessage):
                break
        assert (ev.group, ev.sender, ev.body) == (g, b.device, b"admins may")
        await a.group_demote(g, [pb])
        await a.group_settings(g, announce=False)
        assert (await a.group_info(g)).admins == (pa,)

        # "who can add me": nobody, so carol is invited instead
        settings = await c.privacy(groupadd="nobody")
        assert settings.groupadd == "nobody"
        r = await a.group_add(g, [pc])
        assert r.failed == ((pc, ErrorCode.ADD_REFUSED),)
        code = await a.group_invite(g)
        assert code == await a.group_invite(g)  # the same code until revoked
        preview = await c.group_preview(code)
        assert (preview.group, preview.get("subject"), preview.get("count")) == (g, "ops 2", "2")
        joined = await c.group_join(code)
        assert joined.group == g and joined.get("requested") is None
        assert pc in (await a.group_info(g)).users

        # revoke: the old code stops at once; approval: requests, approve, reject
        new = await a.group_revoke(g)
        assert new != code
        with pytest.raises(ServerError) as err:
            await d.group_preview(code)
        assert err.value.code == ErrorCode.BAD_INVITE
        await a.group_settings(g, approval=True)
        assert (await d.group_join(new)).get("requested") == "1"
        assert (await e.group_join(new)).get("requested") == "1"
        assert set(await a.group_requests(g)) == {pd, pe}
        assert (await a.group_approve(g, [pd])).failed == ()
        assert (await a.group_reject(g, pe)).failed == ()
        assert await a.group_requests(g) == ()
        users = (await a.group_info(g)).users
        assert pd in users and pe not in users

        # remove and leave: out is out
        await a.group_remove(g, [pc])
        assert (await notice(c, "remove")).members == (pc,)
        with pytest.raises(ServerError) as err:
            await c.group_info(g)
        assert err.value.code == ErrorCode.NOT_MEMBER
        await b.group_leave(g)
        assert await b.groups() == ()
        for cl in (a, b, c, d, e):
            await cl.close()

    run(main())


def test_an_offline_member_reads_notices_and_messages_in_order_at_login(srv, tmp_path):
    async def main():
        relay = await Relay(srv.port).start()
        pa, pb = next(PHONES), next(PHONES)
        a = await register(srv, relay, pa, tmp_path / "a.json")
        b = await register(srv, relay, pb, tmp_path / "b.json")
        creds = b.creds
        await b.close()  # offline from here on: its keys are on the server
        g = (await a.group_create("later", [pb])).group
        await a.group_subject(g, "later on")
        acks = [await a.send(g, b"while you were away %d" % i) for i in range(3)]
        await a.group_subject(g, "last")
        b = await connect(relay, tmp_path / "b.json")
        await b.login(creds)
        got = []
        for _ in range(6):
            ev = await group_event(b)
            got.append((ev.op, ev.get("subject")) if isinstance(ev, GroupNotice)
                       else (type(ev).__name__, ev.id, ev.body))  # fmt: skip
        assert got == [("create", "later"), ("subject", "later on"),
                       *[("GroupMessage", ack.id, b"while you were away %d" % i)
                         for i, ack in enumerate(acks)],
                       ("subject", "last")]  # fmt: skip
        for cl in (a, b):
            await cl.close()
        await relay.close()

    run(main())


# -- a big group: the first send reaches every device, within the lookup limits ---------


def keyed_members(srv, count: int, prefix: str) -> list[str]:
    """``provision_keyed`` on ``srv``'s store: ``count`` offline users with keys."""
    store = Store(str(srv.data_dir / "store"), map_size=256 << 20, create=False)
    try:
        return provision_keyed(store, count, prefix=prefix)
    finally:
        store.close()


def payload_entries(srv, mid) -> int:
    """Queue entries holding message ``mid`` with a device's own key share (kind 7)."""
    store = Store(str(srv.data_dir / "store"), map_size=256 << 20, create=False)
    try:
        with store.read() as txn:
            return sum(v[0] == GPAYLOAD and entry_fields(v)[4] == mid
                       for _, v in txn.cursor(db=store._db["queue"]))  # fmt: skip
    finally:
        store.close()


def test_the_first_send_to_a_1024_member_group_shares_its_key_with_every_device(srv, tmp_path):
    """1,021 provisioned members with published keys (offline) and two real SDK
    members on both workers: the sender's first message carries a key share for
    each of the 1,023 devices (device lists and keys fetched in batches, co-members
    free of discover-numbers, the one-time keys past keys-fetch-per-account
    replaced by fallback keys), and both online members decrypt it."""

    async def main():
        provisioned = keyed_members(srv, 1021, prefix="4933")
        relay = await Relay(srv.port).start()
        pa, pb, pc = next(PHONES), next(PHONES), next(PHONES)
        a = await register(srv, relay, pa, tmp_path / "a.json")
        b = await register(srv, relay, pb, tmp_path / "b.json")
        c = await register(srv, relay, pc, tmp_path / "c.json")
        b = await on_other_worker(srv, relay, b, tmp_path / "b.json", worker(srv, a))
        made = await a.group_create("big", [pb, pc, *provisioned], timeout=120)
        assert made.failed == ()
        ack = await a.send(made.group, b"to all 1,023 of you", timeout=120)
        assert ack.failed == ()
        assert payload_entries(srv, ack.id) == 1023  # a key share in every member device's queue
        for cl in (b, c):
            ev = await message(cl)
            assert (type(ev), ev.sender, ev.body) == (GroupMessage, a.device,
                                                      b"to all 1,023 of you")  # fmt: skip
        for cl in (a, b, c):
            await cl.close()
        await relay.close()

    run(main(), timeout=600)


def test_lookups_of_co_members_are_free_and_of_strangers_charged(tmp_path):
    """discover-numbers 3: adding two strangers to a group costs two; their device
    lists and keys are then free (asked again and again, batched or not); a batch
    naming two more strangers is refused (one number left), and so is a group
    with them; keys-fetch-per-account 2: a fetch of three co-members' devices gets
    two one-time keys and a fallback key instead of a refusal, while a
    non-member's fetch past it is refused as before.  devices-query-max 1: the SDK's
    batches shrink to what the server takes."""
    s = Server(tmp_path / "data", workers=2, register_per_ip=1000, message_rate=0,
               discover_numbers=3, keys_fetch_per_account=2, devices_query_max=1)  # fmt: skip
    s.start()

    async def main():
        relay = await Relay(s.port).start()
        phones = [next(PHONES) for _ in range(6)]
        a, b, c, d, e, f = [await register(s, relay, p, tmp_path / f"{p}.json") for p in phones]
        pa, pb, pc, pd, pe, pf = phones
        g = (await a.group_create("limits", [pb, pc])).group  # 2 of 3 numbers
        with pytest.raises(ServerError) as err:  # (the server's limit, as such)
            await a._request("req", "x1", DevicesBatchQuery("x1", (pb, pc)), 10)
        assert err.value.code == ErrorCode.TOO_MANY
        for _ in range(3):
            lists = await a.devices_of([pb, pc], fresh=True)
            assert [u for u in lists] == [pb, pc] and all(len(v) == 1 for v in lists.values())
            await a.devices(pb, fresh=True)
        with pytest.raises(ServerError) as err:
            await a.devices_of([pd, pe])  # strangers: 2 numbers, 1 left
        assert err.value.code == ErrorCode.RATE_LIMITED
        with pytest.raises(ServerError) as err:
            await a.group_create("more", [pd, pe])  # adding is a lookup too
        assert err.value.code == ErrorCode.RATE_LIMITED
        assert [x.device for x in (await a.devices_of([pd]))[pd]] == [d.device]  # the last one
        # keys: three co-members (one added by bob, made an admin), two one-time keys
        await a.group_promote(g, [pb])
        assert (await b.group_add(g, [pf])).failed == ()
        bundles = await a.fetch_keys([pb, pc, pf])
        assert [x.device for x in bundles] == [b.device, c.device, f.device]
        assert [x.one_time_key.fallback for x in bundles] == [False, False, True]
        with pytest.raises(ServerError) as err:  # the budget is used: strangers refused
            await e.fetch_keys([pa, pb, pc])
        assert err.value.code == ErrorCode.RATE_LIMITED
        for cl in (a, b, c, d, e, f):
            await cl.close()
        await relay.close()

    try:
        run(main())
    finally:
        assert s.stop() == 0, s.log_text()[-3000:]


def test_key_fetches_shrink_to_a_lower_keys_query_max(tmp_path):
    """keys-query-max 4, below the SDK's 200 users per key request: the first send to
    a group of 11 keyed members is refused 406 once, the SDK halves its requests
    until the server takes them (a refused request takes no key), and every member
    device gets a key share; a direct fetch of too many users is still 406."""
    s = Server(tmp_path / "data", workers=2, register_per_ip=1000, message_rate=0,
               new_chats=0, keys_query_max=4)  # fmt: skip
    s.start()

    async def main():
        provisioned = keyed_members(s, 10, prefix="4934")
        relay = await Relay(s.port).start()
        pa, pb = next(PHONES), next(PHONES)
        a = await register(s, relay, pa, tmp_path / "a.json")
        b = await register(s, relay, pb, tmp_path / "b.json")
        with pytest.raises(ServerError) as err:  # the server's limit, as such
            await a.fetch_keys([pb, *provisioned[:4]])
        assert err.value.code == ErrorCode.TOO_MANY
        made = await a.group_create("small limit", [pb, *provisioned])
        assert made.failed == ()
        ack = await a.send(made.group, b"past keys-query-max", timeout=60)
        assert ack.failed == ()
        assert a._keys_chunk <= 4
        assert payload_entries(s, ack.id) == 11  # a key share for every member device
        ev = await message(b)
        assert (type(ev), ev.sender, ev.body) == (GroupMessage, a.device, b"past keys-query-max")
        for cl in (a, b):
            await cl.close()
        await relay.close()

    try:
        run(main())
    finally:
        assert s.stop() == 0, s.log_text()[-3000:]


# -- a member past the strangers' share misses a stranger's membership notices ----------


def test_a_lost_group_key_is_asked_for_in_plaintext_and_does_not_make_the_sender_known(
    tmp_path,
):
    """Bob lost his inbound session: alice's next message fails to decrypt, his SDK
    asks alice's device for the key (``gkeyreq``) and her next message shares it
    again.  The request goes in plaintext (a group and a session id, which every
    body shows the server anyway), so the server does not take it as bob writing to
    alice: before, an encrypted request did, and a stranger who sent one message
    under a new session became "known", past the strangers' share (probe4)."""
    srv = Server(tmp_path / "data", workers=2, register_per_ip=1000, message_rate=0,
                 stranger_queue_count=3)  # fmt: skip
    srv.start()
    try:

        async def main():
            relay = await Relay(srv.port).start()
            pa, pb = next(PHONES), next(PHONES)
            a = await register(srv, relay, pa, tmp_path / "a.json")
            b = await register(srv, relay, pb, tmp_path / "b.json")
            g = (await a.group_create("team", [pb])).group  # alice is a stranger to bob
            await a.send(g, b"one")
            assert (await message(b)).body == b"one"
            b.secure.groups.inbound.clear()  # bob lost his state
            await a.send(g, b"two")
            failed = await message(b)
            assert isinstance(failed, GroupDecryptionFailed), failed
            await until(lambda: b.creds.device not in a.secure.groups.outbound[g].shared)
            ack = await a.send(g, b"three")  # shares the key with bob again
            ev = await message(b)
            assert (type(ev), ev.id, ev.body) == (GroupMessage, ack.id, b"three")
            await until(lambda: srv.queue_count(b.creds.device) == 0)
            await b.close()
            for i in range(3):  # bob is offline: a stranger stops at the share (3)
                await a.send(pb, b"x", id=f"s{i}")
            with pytest.raises(ServerError) as e:
                await a.send(pb, b"x", id="s3")
            assert e.value.code == ErrorCode.QUEUE_FULL
            await a.close()
            await relay.close()

        run(main())
    finally:
        assert srv.stop() == 0, srv.log_text()[-3000:]


async def bob_misses_a_removal(srv, tmp_path, ttl: float | None = None):
    """Alice (an admin bob does not know) makes a group with bob and carol; bob's
    queue then holds the strangers' share (3: alice's unread messages), so her add of
    dave and removal of carol are not queued for him (a stranger's add/remove loop
    filled a member's queue with them).  Bob reads his queue; his SDK still has the
    old member list.  Returns the scenario: the clients, phones, group, bob's first
    session id, when his member list was read, the group notices he read."""
    relay = await Relay(srv.port).start()
    pa, pb, pc, pd = next(PHONES), next(PHONES), next(PHONES), next(PHONES)
    a = await register(srv, relay, pa, tmp_path / "a.json")
    b = await register(srv, relay, pb, tmp_path / "b.json")
    c = await register(srv, relay, pc, tmp_path / "c.json")
    d = await register(srv, relay, pd, tmp_path / "d.json")
    if ttl is not None:
        b.GROUP_MEMBERS_TTL = ttl
    # everyone but bob takes the others' messages past the share (contacts)
    await a.discover([pb, pc, pd], "full")
    await d.discover([pa, pb], "full")
    g = (await a.group_create("team", [pb, pc])).group
    await b.send(g, b"hello")  # bob's session, shared with alice and carol
    read_at = time.monotonic()  # (bob's member list was read for it)
    for cl in (a, c):
        assert (await message(cl)).body == b"hello"
    old_sid = b.secure.groups.outbound[g].session.session_id
    got = set()  # bob reads what is queued so far (the receipts come in their time)
    while got != {pa, pc}:
        ev = await b.next_event(15)
        await b.ack(ev.seq)
        if isinstance(ev, IncomingReceipt) and ev.type == "delivered":
            got.update(ev.members)
    await until(lambda: srv.queue_count(b.creds.device) == 0)
    with pytest.raises(ServerError) as e:  # bob reads nothing now: his queue fills
        for _ in range(4):
            await a.send(pb, b"unread")
    assert e.value.code == ErrorCode.QUEUE_FULL
    held = srv.queue_count(b.creds.device)
    assert held >= 3
    await a.group_add(g, [pd])
    await a.group_remove(g, [pc])
    assert (await notice(c, "remove")).members == (pc,)  # carol's own
    assert srv.queue_count(b.creds.device) == held  # none for bob (2 more before)
    ops = []
    for _ in range(held):
        ev = await b.next_event(15)
        await b.ack(ev.seq)
        if isinstance(ev, GroupNotice):
            ops.append(ev.op)
    assert "add" not in ops and "remove" not in ops
    await until(lambda: srv.queue_count(b.creds.device) == 0)
    return SimpleNamespace(relay=relay, a=a, b=b, c=c, d=d, pa=pa, pb=pb, pc=pc, pd=pd, g=g,
                           old_sid=old_sid, read_at=read_at, ops=ops)  # fmt: skip


def missed_server(tmp_path) -> Server:
    return Server(tmp_path / "data", workers=2, register_per_ip=1000, message_rate=0,
                  new_chats=0, stranger_queue_count=3).start()  # fmt: skip


def test_a_connected_member_who_missed_a_removal_rotates_within_the_member_list_ttl(tmp_path):
    """bob_misses_a_removal, and nobody new writes: bob stays connected and his cached
    member list still names carol.  Once it is older than GROUP_MEMBERS_TTL his next
    send reads the members again: a new Megolm session (carol had the old one) that
    dave can read.  Without the TTL bob kept sending under carol's session, and dave
    got a body he could not decrypt."""
    srv = missed_server(tmp_path)
    try:

        async def main():
            ttl = 4.0
            m = await bob_misses_a_removal(srv, tmp_path, ttl)
            assert m.ops == []  # no notice at all reached bob
            assert (await notice(m.d, "add")).members == (m.pd,)
            assert m.pc in m.b._group_members[m.g]  # the list he has is old
            # past the TTL: no login, no notice, no new writer
            await asyncio.sleep(max(0.0, ttl + 0.2 - (time.monotonic() - m.read_at)))
            ack = await m.b.send(m.g, b"welcome")
            assert ack.failed == ()
            assert m.b.secure.groups.outbound[m.g].session.session_id != m.old_sid  # carol's
            for cl in (m.a, m.d):
                ev = await message(cl)
                assert (type(ev), ev.id, ev.body) == (GroupMessage, ack.id, b"welcome")
            for cl in (m.a, m.b, m.c, m.d):
                await cl.close()
            await m.relay.close()

        run(main())
    finally:
        assert srv.stop() == 0, srv.log_text()[-3000:]


def test_a_member_who_missed_a_strangers_membership_notices_recovers_on_its_next_send(tmp_path):
    """bob_misses_a_removal; dave's first message to the group tells bob's SDK that its
    member list is old, and bob's next message starts a new Megolm session (carol had
    the old one) that dave can read."""
    srv = missed_server(tmp_path)
    try:

        async def main():
            m = await bob_misses_a_removal(srv, tmp_path)
            assert (await notice(m.d, "add")).members == (m.pd,)
            assert (await m.d.send(m.g, b"new here")).failed == ()  # shared with a and b
            for cl in (m.a, m.b):
                ev = await message(cl)
                assert (type(ev), ev.body) == (GroupMessage, b"new here")
            ack = await m.b.send(m.g, b"welcome")
            assert ack.failed == ()
            assert m.b.secure.groups.outbound[m.g].session.session_id != m.old_sid  # carol's
            for cl in (m.a, m.d):
                ev = await message(cl)
                assert (type(ev), ev.id, ev.body) == (GroupMessage, ack.id, b"welcome")
            for cl in (m.a, m.b, m.c, m.d):
                await cl.close()
            await m.relay.close()

        run(main())
    finally:
        assert srv.stop() == 0, srv.log_text()[-3000:]


def test_key_requests_to_one_device_are_bounded_per_window(tmp_path):
    """A sender picks a new session id for every message it likes: 1,000 bodies under
    sessions a member never got made its SDK send 981 key requests (probe5).  Now at
    most KEY_REQUESTS_PER_DEVICE per sending device per KEY_REQUEST_WINDOW."""
    import os

    from pigeon.client.group_crypto import BODY_VERSION, SESSION_ID_BYTES
    from pigeon.client.groups import GROUP_KEY_REQUEST, KEY_REQUESTS_PER_DEVICE

    srv = Server(tmp_path / "data", workers=2, register_per_ip=1000, message_rate=0)
    srv.start()
    try:

        async def main():
            relay = await Relay(srv.port).start()
            pa, pb = next(PHONES), next(PHONES)
            b = await register(srv, relay, pb, tmp_path / "b.json")  # encrypting
            a = await srv.login(await srv.register(pa))  # plaintext: bodies as given
            g = (await a.group_create("g", [pb])).group
            n = 3 * KEY_REQUESTS_PER_DEVICE
            for _ in range(n):  # each under a session id b never got
                body = bytes([BODY_VERSION]) + os.urandom(SESSION_ID_BYTES) + os.urandom(40)
                await a.send(g, body, type="skmsg")
            failures = 0
            while failures < n:
                ev = await b.next_event(15)
                await b.ack(ev.seq)
                failures += isinstance(ev, GroupDecryptionFailed)
            requests = 0
            deadline = time.monotonic() + 3  # (b's requests are all out by then)
            while time.monotonic() < deadline:
                try:
                    ev = await a.next_event(deadline - time.monotonic())
                except TimeoutError:
                    break
                await a.ack(ev.seq)
                requests += isinstance(ev, IncomingMessage) and ev.type == GROUP_KEY_REQUEST
            assert requests == KEY_REQUESTS_PER_DEVICE
            # alice acked them: their delivered receipts are the SDK's, not bob's app's
            shown = []
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                try:
                    ev = await b.next_event(deadline - time.monotonic())
                except TimeoutError:
                    break
                await b.ack(ev.seq)
                shown.append(ev)
            assert not [ev for ev in shown if isinstance(ev, IncomingReceipt)], shown
            for c in (a, b):
                await c.close()
            await relay.close()

        run(main())
    finally:
        assert srv.stop() == 0, srv.log_text()[-3000:]
