"""Linked devices (docs/PROTOCOL.md section 7a): pairing, linking by QR code and by
link code, device lists, unlink, companion expiry; on real 2-worker servers with
the real SDK.  The QR test renders the QR text to a PNG with segno and reads it
back with zxing-cpp before the primary "scans" it.  Every wait is bounded."""

from __future__ import annotations

import asyncio
import io
import os

import pytest
import segno
import zxingcpp
from PIL import Image
from serverutil import Server, next_message, on_other_worker, until

from pigeon.client import ConnectionLost, Credentials, ServerError
from pigeon.client._core import LINK, PairingCode, StaleDevices
from pigeon.client.identity import new_identity, parse_qr, verify_link
from pigeon.core.codec import Codec
from pigeon.core.errors import ErrorCode
from pigeon.core.events import DeviceList, DevicesChanged, Link
from pigeon.server import linking
from pigeon.server.accounts import device_keys
from pigeon.server.queues import Queues
from pigeon.server.store import Store

PHONES = iter(f"4917{n:08d}" for n in range(20_000_000, 20_001_000))
BOB = "4915112345678"


def run(coro, timeout=120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("linking") / "data", workers=2, register_per_ip=1000,
               pair_per_ip=1000, link_per_account=1000, pair_per_address=100)  # fmt: skip
    s.start()
    yield s
    assert s.stop() == 0


def pair_record(server, key: str):
    store = Store(str(server.data_dir / "store"), map_size=256 << 20)
    try:
        with store.read() as txn:
            return linking._get(store, txn, key)
    finally:
        store.close()


def scan(qr_text: str) -> str:
    """Render the QR code to a PNG and read it back, as a phone's camera would."""
    png = io.BytesIO()
    segno.make(qr_text, error="m").save(png, kind="png", scale=4, border=4)
    png.seek(0)
    found = zxingcpp.read_barcodes(Image.open(png))
    assert len(found) == 1 and found[0].format == zxingcpp.BarcodeFormat.QRCode
    return found[0].text


async def primary(server, phone=None):
    phone = phone or next(PHONES)
    creds = await server.register(phone)
    return phone, creds, await server.login(creds)


async def companion_waiting(server, kind="qr", phone=None, name="desktop", other_than=None):
    """A new device pairing (by QR or code); with ``other_than`` (a worker id), on
    another worker than that one (the pairing record says where it waits)."""
    for _ in range(40):
        comp = await server.client()
        it = comp.pair_qr(name=name) if kind == "qr" else comp.pair_code(phone, name=name)
        code = await it.__anext__()
        key = "r:" + code.ref if kind == "qr" else "c:" + code.code
        if other_than is None or pair_record(server, key)["worker"] != other_than:
            return comp, it, code
        await it.aclose()
        await comp.close()
    raise AssertionError("no pairing connection on another worker in 40 tries")


async def notices(client, n: int, user: str, timeout: float = 10.0) -> None:
    """The client's next ``n`` deliveries are device-list notices about ``user`` (acked),
    and nothing else comes."""
    for _ in range(n):
        ev = await client.next_event(timeout)
        assert isinstance(ev, DevicesChanged) and ev.sender == user, ev
        await client.ack(ev.seq)
    await nothing_more(client)


async def nothing_more(client, wait: float = 0.5) -> None:
    await client.ping()  # a barrier: what the server had for it has been pushed
    with pytest.raises(asyncio.TimeoutError):
        await client.next_event(wait)


async def link_by_qr(server, phone, alice, name="desktop"):
    comp, it, code = await companion_waiting(server, name=name)
    device, creds = await asyncio.gather(alice.link(scan(code.qr)), it.__anext__())
    assert isinstance(creds, Credentials) and creds.device == device
    return comp, creds


def test_link_by_qr_through_a_real_png_on_the_other_worker_then_both_devices_work(srv):
    async def go():
        phone, creds, alice = await primary(srv)
        bob_phone, _, bob = await primary(srv)
        where = srv.sessions(phone)[creds.device]["worker"]
        comp, it, code = await companion_waiting(srv, other_than=where)
        assert isinstance(code, PairingCode) and code.ttl == 60
        text = scan(code.qr)
        assert text == code.qr and text.startswith("PGN1," + code.ref + ",")
        assert parse_qr(text).server == f"127.0.0.1:{srv.port}"
        device, ccreds = await asyncio.gather(alice.link(text), it.__anext__())
        assert device == ccreds.device == f"{phone}:1"
        assert ccreds.identity is not None
        with pytest.raises(StopAsyncIteration):
            await it.__anext__()
        await comp.login(ccreds)  # on the pairing connection itself
        assert srv.sessions(phone)[device]["worker"] != where
        # a message to the user reaches both devices
        await bob.send(phone, b"hello both")
        for c in (alice, comp):
            ev = await next_message(c)
            assert ev.body == b"hello both"
            await c.ack(ev.seq)
        # the companion sends on its own
        await comp.send(bob_phone, b"from the desktop")
        ev = await next_message(bob)
        assert ev.sender == device and ev.body == b"from the desktop"
        # a reused ref: 307
        with pytest.raises(ServerError) as info:
            await alice.link(text)
        assert info.value.code == ErrorCode.PAIR_USED
        for c in (alice, bob, comp):
            await c.close()

    run(go())


def test_device_lists_carry_signatures_any_user_can_verify(srv):
    async def go():
        phone, _, alice = await primary(srv)
        _, _, bob = await primary(srv)
        comp, ccreds = await link_by_qr(srv, phone, alice, name="tablet")
        items = await bob.devices(phone)
        assert [d.device for d in items] == [f"{phone}:0", ccreds.device]
        first, second = items
        assert first.signature is None and first.name is None
        assert second.name == "tablet"
        assert second.key == ccreds.identity_key().public
        assert verify_link(first.key, phone, second.key, second.signature)
        assert not verify_link(first.key, phone, first.key, second.signature)
        with pytest.raises(ServerError) as info:
            await bob.devices("4930999999999")
        assert info.value.code == ErrorCode.UNKNOWN_RECIPIENT
        for c in (alice, bob, comp):
            await c.close()

    run(go())


def test_link_by_code_typed_in_lower_case_with_the_dash(srv):
    async def go():
        phone, _, alice = await primary(srv)
        comp, it, code = await companion_waiting(srv, kind="code", phone=phone)
        assert code.ref is None and len(code.code) == 8 and code.display[4] == "-"
        assert not set(code.code) & set("01OI")
        device, ccreds = await asyncio.gather(alice.link_code(code.display.lower()), it.__anext__())
        assert ccreds.device == device
        await comp.login(ccreds)
        with pytest.raises(ServerError) as info:  # single use
            await alice.link_code(code.code)
        assert info.value.code == ErrorCode.PAIR_USED
        # another account's primary cannot use this account's code
        _, _, eve = await primary(srv)
        comp2, it2, code2 = await companion_waiting(srv, kind="code", phone=phone)
        with pytest.raises(ServerError) as info:
            await eve.link_code(code2.code)
        assert info.value.code == ErrorCode.PAIR_UNKNOWN
        for c in (alice, comp, eve, comp2):
            await c.close()

    run(go())


def test_unknown_expired_mismatched_and_badly_signed_links(srv):
    async def go():
        phone, creds, alice = await primary(srv)

        async def refused(ev) -> int:
            with pytest.raises(ServerError) as info:
                await alice._request(LINK, ev.id, ev, 10)
            return info.value.code

        ident = creds.identity_key()
        comp, it, code = await companion_waiting(srv)
        key = parse_qr(code.qr).key
        other = new_identity().public
        sig = ident.sign_link(phone, key)
        assert await refused(Link("u1", ref=os.urandom(16).hex(), key=key, signature=sig)) == (
            ErrorCode.PAIR_UNKNOWN
        )
        assert await refused(Link("m1", ref=code.ref, key=other,
                                  signature=ident.sign_link(phone, other))) == (
            ErrorCode.KEY_MISMATCH
        )  # fmt: skip
        assert await refused(Link("s1", ref=code.ref, key=key, signature=bytes(64))) == (
            ErrorCode.BAD_SIGNATURE
        )
        # signed for another account: does not verify either
        assert await refused(Link("s2", ref=code.ref, key=key,
                                  signature=ident.sign_link(BOB, key))) == ErrorCode.BAD_SIGNATURE  # fmt: skip
        assert await refused(Link("k1", code="ABCD2345")) == ErrorCode.PAIR_UNKNOWN
        srv.advance_clock(61)  # past pair-ttl (the store's clock; the refresh timer has not run)
        assert await refused(Link("e1", ref=code.ref, key=key, signature=sig)) == (
            ErrorCode.PAIR_EXPIRED
        )
        # nothing was linked by any of it
        assert [d.device for d in await alice.devices(phone)] == [creds.device]
        for c in (alice, comp):
            await c.close()

    run(go())


def test_the_fifth_companion_is_refused_and_a_companion_cannot_link(srv):
    async def go():
        phone, _, alice = await primary(srv)
        comps = []
        for i in range(4):
            comp, ccreds = await link_by_qr(srv, phone, alice, name=f"d{i}")
            comps.append(comp)
        comp, it, code = await companion_waiting(srv)
        with pytest.raises(ServerError) as info:
            await alice.link(code.qr)
        assert info.value.code == ErrorCode.DEVICE_LIMIT
        # a logged-in companion (its own Ed25519 key) linking: 311
        await comps[-1].login(ccreds)
        with pytest.raises(ServerError) as info:
            await comps[-1].link(code.qr)
        assert info.value.code == ErrorCode.NOT_PRIMARY
        # numbers are never reused: unlink 1, the next one is 5
        await alice.unlink(f"{phone}:1")
        device, _ = await asyncio.gather(alice.link(code.qr), it.__anext__())
        assert device == f"{phone}:5"
        for c in (alice, comp, *comps):
            await c.close()

    run(go())


def test_a_companion_keeps_working_while_the_primary_is_offline(srv):
    async def go():
        phone, creds, alice = await primary(srv)
        bob_phone, _, bob = await primary(srv)
        comp, ccreds = await link_by_qr(srv, phone, alice)
        await comp.login(ccreds)
        await alice.close()
        await until(lambda: creds.device not in srv.sessions(phone))
        await bob.send(phone, b"while the phone is off")
        ev = await next_message(comp)
        assert ev.body == b"while the phone is off"
        await comp.ack(ev.seq)
        await comp.send(bob_phone, b"answer from the desktop")
        assert (await next_message(bob)).body == b"answer from the desktop"
        # the primary's queue kept its copy
        alice = await srv.login(creds)
        assert (await next_message(alice)).body == b"while the phone is off"
        for c in (alice, bob, comp):
            await c.close()

    run(go())


def test_unlink_closes_the_session_on_the_other_worker_and_drops_its_queue(srv):
    async def go():
        phone, creds, alice = await primary(srv)
        _, _, bob = await primary(srv)
        comp, ccreds = await link_by_qr(srv, phone, alice)
        await comp.close()
        await bob.send(phone, b"queued for the desktop")  # waits in the companion's queue
        await next_message(alice)
        where = srv.sessions(phone)[creds.device]["worker"]
        comp = await on_other_worker(srv, ccreds, phone, where)
        assert srv.queue_stats(100)["top"] and any(
            d["device"] == ccreds.device for d in srv.queue_stats(100)["top"]
        )
        ack = await alice.unlink(ccreds.device)
        assert ack.cls == "unlink"
        await until(lambda: comp.closed is not None)
        assert isinstance(comp.closed, ServerError) and comp.closed.code == ErrorCode.REVOKED
        assert comp.closed.text == "this device was unlinked"
        assert all(d["device"] != ccreds.device for d in srv.queue_stats(100)["top"])
        assert [d.device for d in await alice.devices(phone)] == [creds.device]
        late = await srv.client()
        with pytest.raises((ServerError, ConnectionLost)):
            await late.login(ccreds)
        # a companion unlinks itself; nobody unlinks the primary
        comp2, c2 = await link_by_qr(srv, phone, alice)
        await comp2.login(c2)
        with pytest.raises(ServerError) as info:
            await comp2.unlink(creds.device)
        assert info.value.code == ErrorCode.BAD_REQUEST
        with pytest.raises(ServerError) as info:
            await alice.unlink(creds.device)
        assert info.value.code == ErrorCode.BAD_REQUEST
        await comp2.unlink(c2.device)
        assert [d.device for d in await alice.devices(phone)] == [creds.device]
        for c in (alice, bob, comp, late, comp2):
            await c.close()

    run(go())


def test_links_and_unlinks_notify_the_accounts_other_devices_online_or_at_login(srv):
    """A link queues a device-list notice for the account's devices (not the new
    one), an unlink for those left (not the unlinked one); an online device gets
    it at once, an offline one at its next login."""

    async def go():
        phone, creds, alice = await primary(srv)
        c1, c1creds = await link_by_qr(srv, phone, alice)
        await notices(alice, 1, phone)  # online: pushed
        await c1.login(c1creds)
        await nothing_more(c1)  # none of its own addition
        await c1.close()  # offline from here
        c2, c2creds = await link_by_qr(srv, phone, alice)
        await notices(alice, 1, phone)
        await c2.login(c2creds)
        await nothing_more(c2)
        await alice.unlink(c2creds.device)
        await until(lambda: c2.closed is not None)
        assert isinstance(c2.closed, ServerError) and c2.closed.code == ErrorCode.REVOKED
        got = []  # what reached the unlinked device before it was closed: no notice
        while True:
            try:
                got.append(await c2.next_event(5))
            except ConnectionLost:
                break
        assert not any(isinstance(ev, DevicesChanged) for ev in got), got
        await notices(alice, 1, phone)
        # the offline companion: both changes (c2 linked, c2 unlinked), at login
        c1 = await srv.login(c1creds)
        await notices(c1, 2, phone)
        assert all(d["device"] != c2creds.device for d in srv.queue_stats(100)["top"])
        for c in (alice, c1, c2):
            await c.close()

    run(go())


def test_the_pairing_sweep_notifies_the_account_of_a_linked_device_that_never_logged_in(
    tmp_path,
):
    # (the sweep's own write transaction, on a real store: the PAIRED record of a
    # dead worker never came, so the device stayed pending)
    store = Store(str(tmp_path / "store"), map_size=256 << 20)
    try:
        phone = "491700000002"
        primary_dev, _ = store.register_device(phone, new_identity().public,
                                               device_keys(b"s" * 32, 4096))  # fmt: skip
        now = store.clock()
        with store.write() as txn:
            acct = store._get(txn, "accounts", phone)
            pending = store._add_device(txn, phone, acct, new_identity().public,
                                        device_keys(b"t" * 32, 4096), now,
                                        {"pending": True})  # fmt: skip
            linking._put(store, txn, "r:" + "ab" * 16, {"expires": now, "used": True,
                                                        "device": pending})  # fmt: skip
        q = Queues(store)
        delivered = []
        removed = linking.sweep_pairs(store, q, now + 61_000, 60_000, delivered.extend)
        assert removed == [pending]
        assert [p.device for p in delivered] == [primary_dev]
        ((seq, frame),) = q.read(primary_dev, 0, 10)
        node = Codec().decode(frame[3:])
        assert DeviceList.from_node(node) == DevicesChanged(phone, now + 61_000, seq)
        assert q.read(pending, 0, 10) == []
        assert store.account(phone)["devices"] == [int(primary_dev.partition(":")[2])]
    finally:
        store.close()


def test_refreshes_the_end_error_the_pairing_deadline_and_the_per_address_cap(tmp_path):
    srv = Server(tmp_path / "data", workers=2, login_timeout=1, pair_timeout=6, pair_ttl=1,
                 pair_refreshes=2, pair_per_address=2, pair_per_ip=1000)  # fmt: skip
    srv.start()

    async def go():
        comp = await srv.client()
        refs = []
        with pytest.raises(ServerError) as info:
            async for code in comp.pair_qr(timeout=10):
                refs.append(code.ref)
        assert info.value.code == ErrorCode.PAIR_EXPIRED
        assert len(refs) == len(set(refs)) == 3  # the first and 2 refreshes
        # past login-timeout, the pairing connection is still open (its own deadline)
        await comp.ping(timeout=5)
        # ... until pair-timeout: 130, and closed
        await until(lambda: comp.closed is not None, timeout=15)
        assert isinstance(comp.closed, ServerError) and comp.closed.code == ErrorCode.TIMEOUT
        await comp.close()
        # at most pair-per-address pairing connections of one address per worker
        clients, refused = [], 0
        for _ in range(5):  # 2 workers x 2: at least one is refused
            c = await srv.client()
            clients.append(c)
            try:
                await c.pair_code("491709999999").__anext__()
            except (ServerError, ConnectionLost):
                refused += 1
        assert refused >= 1
        assert 2 <= 5 - refused <= 4
        for c in clients:
            await c.close()

    try:
        run(go())
    finally:
        assert srv.stop() == 0


def test_accounts_of_an_existing_store_log_in_and_linking_from_them_is_309(tmp_path):
    # made as before identity keys were Ed25519: random 32 bytes, credentials without one
    data = tmp_path / "data"
    store = Store(str(data / "store"), map_size=256 << 20)
    secret = os.urandom(32)
    phone = "491700000001"
    device, _ = store.register_device(phone, os.urandom(32), device_keys(secret, 4096))
    store.close()
    srv = Server(data, workers=2)
    srv.start()

    async def go():
        old = Credentials.from_json({"device": device, "secret": secret.hex()})
        assert old.identity is None
        alice = await srv.login(old)
        comp = await srv.client()
        it = comp.pair_qr()
        code = await it.__anext__()
        with pytest.raises(ValueError):
            await alice.link(code.qr)  # the SDK has no key to sign with
        key = parse_qr(code.qr).key
        ev = Link("l1", ref=code.ref, key=key, signature=new_identity().sign_link(phone, key))
        with pytest.raises(ServerError) as info:
            await alice._request(LINK, ev.id, ev, 10)
        assert info.value.code == ErrorCode.BAD_SIGNATURE
        # (keys are checked by use, not decoded: test_protocol_facts has a primary
        # whose 32 bytes are no Ed25519 point, 309, and pair's wrong lengths, 200)
        for c in (alice, comp):
            await c.close()

    try:
        run(go())
    finally:
        assert srv.stop() == 0


def test_companions_of_a_primary_absent_for_companion_expiry_are_unlinked(tmp_path):
    srv = Server(tmp_path / "data", workers=2, purge_interval=1, companion_expiry=86400)
    srv.start()

    async def go():
        phone, creds, alice = await primary(srv)
        comp, ccreds = await link_by_qr(srv, phone, alice)
        await comp.login(ccreds)
        await alice.close()
        srv.advance_clock(86400 + 3600)
        await until(lambda: comp.closed is not None, timeout=15)
        assert isinstance(comp.closed, ServerError) and comp.closed.code == ErrorCode.REVOKED
        alice = await srv.login(creds)
        # the notice of the link (pushed, never acked) and the one of the expiry
        await notices(alice, 2, phone)
        assert [d.device for d in await alice.devices(phone)] == [creds.device]
        # a primary that logs in keeps its companions
        comp, ccreds = await link_by_qr(srv, phone, alice)
        await comp.login(ccreds)  # (one that never logs in is swept with its pairing record)
        srv.advance_clock(86400 - 60)
        await asyncio.sleep(2.5)  # two sweeps
        assert [d.device for d in await alice.devices(phone)] == [creds.device, ccreds.device]
        for c in (alice, comp):
            await c.close()

    try:
        run(go())
    finally:
        assert srv.stop() == 0


def test_the_trio_client_pairs_by_code_and_links_and_unlinks(srv):
    import trio

    from pigeon.client.trio import open_client

    phone = next(PHONES)
    creds = run(srv.register(phone))

    async def main():
        with trio.fail_after(60):
            async with (
                open_client("127.0.0.1", srv.port, plaintext=True) as alice,
                open_client("127.0.0.1", srv.port, plaintext=True) as comp,
            ):
                await alice.login(creds)
                it = comp.pair_code(phone, name="trio")
                code = await it.__anext__()
                got = {}

                async def link():
                    got["device"] = await alice.link_code(code.display)

                async with trio.open_nursery() as n:
                    n.start_soon(link)
                    got["creds"] = await it.__anext__()
                assert got["creds"].device == got["device"]
                await comp.login(got["creds"])
                items = await comp.devices(phone)
                assert [d.name for d in items] == [None, "trio"]
                await alice.unlink(got["device"])
                while comp.closed is None:
                    await trio.sleep(0.05)
                assert comp.closed.code == ErrorCode.REVOKED

    trio.run(main)


def test_the_sdk_caches_device_lists_until_a_notice_or_a_408_drops_them(srv):
    async def go():
        phone, creds, alice = await primary(srv)
        bob_phone, _, bob = await primary(srv)
        first = await alice.devices(phone)
        assert await alice.devices(phone) is first  # cached: not asked again
        comp, ccreds = await link_by_qr(srv, phone, alice)
        await notices(alice, 1, phone)
        await comp.login(ccreds)
        both = await alice.devices(phone)
        assert [d.device for d in both] == [creds.device, ccreds.device]
        assert await alice.devices(phone) is both
        # a change alice did not make: only the notice tells her
        await comp.unlink(ccreds.device)
        await notices(alice, 1, phone)
        assert phone not in alice.core.device_lists
        assert [d.device for d in await alice.devices(phone)] == [creds.device]
        # another user's list: no notice reaches bob, a 408 drops it
        old = await bob.devices(phone)
        comp, ccreds = await link_by_qr(srv, phone, alice)
        await notices(alice, 1, phone)
        assert await bob.devices(phone) is old  # nothing told bob yet
        with pytest.raises(StaleDevices) as info:
            await bob.send(phone, {d.device: b"x" for d in old})
        assert info.value.missing == (ccreds.device,)
        fresh = await bob.devices(phone)
        assert [d.device for d in fresh] == [creds.device, ccreds.device]
        await bob.send(phone, {d.device: d.device.encode() for d in fresh})
        for c in (alice, bob, comp):
            await c.close()

    run(go())


def test_a_companions_logout_notifies_the_devices_left_online_or_at_login(srv):
    async def go():
        phone, creds, alice = await primary(srv)
        c1, c1creds = await link_by_qr(srv, phone, alice)
        await c1.login(c1creds)
        c2, c2creds = await link_by_qr(srv, phone, alice)
        await notices(alice, 2, phone)
        await notices(c1, 1, phone)  # c2's link
        await c2.login(c2creds)
        await c1.close()  # offline from here
        await c2.logout()
        await notices(alice, 1, phone)  # online: pushed
        assert [d.device for d in await alice.devices(phone)] == [creds.device, c1creds.device]
        c1 = await srv.login(c1creds)
        await notices(c1, 1, phone)  # offline: at login
        # only the primary deletes the account: a companion is refused (311) and
        # nothing goes (it was taken before, and wiped every device: today's probe)
        with pytest.raises(ServerError) as e:
            await c1.delete_account()
        assert e.value.code == ErrorCode.NOT_PRIMARY
        assert [d.device for d in await c1.devices(phone)] == [creds.device, c1creds.device]
        assert alice.closed is None and c1.closed is None
        # from the primary: nobody is left to tell, the others go
        await alice.delete_account()
        await until(lambda: c1.closed is not None)
        assert isinstance(c1.closed, ServerError) and c1.closed.code == ErrorCode.REVOKED
        for c in (alice, c1, c2):
            await c.close()

    run(go())


def test_the_trio_client_drops_a_cached_device_list_at_a_notice(srv):
    import trio

    from pigeon.client.trio import open_client

    phone = next(PHONES)
    creds = run(srv.register(phone))

    async def main():
        with trio.fail_after(60):
            async with (
                open_client("127.0.0.1", srv.port, plaintext=True) as alice,
                open_client("127.0.0.1", srv.port, plaintext=True) as comp,
            ):
                await alice.login(creds)
                it = comp.pair_code(phone, name="trio")
                code = await it.__anext__()
                got = {}

                async def link():
                    got["device"] = await alice.link_code(code.display)

                async with trio.open_nursery() as n:
                    n.start_soon(link)
                    got["creds"] = await it.__anext__()
                await comp.login(got["creds"])
                ev = await alice.next_event(10)
                assert isinstance(ev, DevicesChanged)
                await alice.ack(ev.seq)
                listed = await alice.devices(phone)
                assert len(listed) == 2 and await alice.devices(phone) is listed
                await comp.logout()
                ev = await alice.next_event(10)
                assert isinstance(ev, DevicesChanged) and ev.sender == phone
                await alice.ack(ev.seq)
                assert [d.device for d in await alice.devices(phone)] == [creds.device]

    trio.run(main)


def test_the_primarys_logout_unlinks_its_companions_so_none_becomes_primary(srv):
    async def go():
        phone, creds, alice = await primary(srv)
        c1, c1creds = await link_by_qr(srv, phone, alice)
        where = srv.sessions(phone)[creds.device]["worker"]
        await c1.close()
        c1 = await on_other_worker(srv, c1creds, phone, where)
        c2, c2creds = await link_by_qr(srv, phone, alice)  # linked, never logged in
        await alice.logout()
        # the live companion, on the other worker, is closed at once
        await until(lambda: c1.closed is not None)
        assert isinstance(c1.closed, ServerError) and c1.closed.code == ErrorCode.REVOKED
        assert "primary device logged out" in c1.closed.text
        # neither companion can log in again, so none is left to link devices as primary
        for cr in (c1creds, c2creds):
            late = await srv.client()
            with pytest.raises((ServerError, ConnectionLost)):
                await late.login(cr)
            await late.close()
        _, _, bob = await primary(srv)
        assert [d.device for d in await bob.devices(phone)] == []  # the account, no device
        for c in (alice, c1, c2, bob):
            await c.close()

    run(go())
