"""The key directory on real servers with 2 workers, the real SDK and real vodozemac keys
(issue 16; docs/PROTOCOL.md section 9c).

Each device here is a vodozemac ``Account`` whose Ed25519 key is the identity key
it registered with (``AccountIdentity``); its keys are uploaded with the
signatures the server checks (``pigeon.client.keys``).  The store is read
straight from LMDB where a test checks what was deleted.
"""

import asyncio
import itertools

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from serverutil import Server, on_other_worker, until

from pigeon.client import ServerError
from pigeon.client.keys import AccountIdentity, identity_keys, sign_key, vodozemac_keys
from pigeon.core.errors import ErrorCode
from pigeon.core.events import (
    DevicesChanged,
    IncomingMessage,
    IncomingReceipt,
    KeysChanged,
    KeysLow,
    SignedKey,
    signed_key_message,
)
from pigeon.server.store import Store

vodozemac = pytest.importorskip("vodozemac")

PHONES = (f"4931{n:08d}" for n in itertools.count(30_000_000))


def run(coro, timeout=120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    # keys-per-device lifted: tests here take many keys of one device from one user (the
    # per-device share has its own test, with its own server)
    s = Server(tmp_path_factory.mktemp("keys") / "data", workers=2, register_per_ip=1000,
               message_rate=0, keys_per_device=0)  # fmt: skip
    s.start()
    yield s
    assert s.stop() == 0, s.log_text()[-3000:]


@pytest.fixture(scope="module")
def tight(tmp_path_factory):
    """A server with small fetch and lookup limits."""
    s = Server(tmp_path_factory.mktemp("keys-tight") / "data", workers=2, register_per_ip=1000,
               message_rate=0, keys_fetch_per_account=3, discover_numbers=2)  # fmt: skip
    s.start()
    yield s
    assert s.stop() == 0, s.log_text()[-3000:]


class Device:
    """A logged-in device with a vodozemac account."""

    def __init__(self, phone, account, creds, client):
        self.phone, self.account, self.creds, self.client = phone, account, creds, client

    @property
    def address(self):
        return self.creds.device

    async def upload(self, otks=0, fallback=False):
        if otks:
            self.account.generate_one_time_keys(otks)
        if fallback:
            self.account.generate_fallback_key()
        self.sent = vodozemac_keys(self.account, self.address)
        n = await self.client.upload_keys(**self.sent)
        self.account.mark_keys_as_published()
        return n


async def device(server, phone=None, other_than=None) -> Device:
    phone = phone or next(PHONES)
    account = vodozemac.Account()
    c = await server.client()
    try:
        await c.register(phone)
        creds = await c.verify(phone, server.code_for(phone), identity=AccountIdentity(account))
    finally:
        await c.close()
    if other_than is None:
        client = await server.login(creds)
        await until(lambda: creds.device in server.sessions(phone))
    else:
        client = await on_other_worker(server, creds, phone, other_than)
    return Device(phone, account, creds, client)


def worker(server, d: Device) -> int:
    return server.sessions(d.phone)[d.address]["worker"]


def signature_ok(ed25519: bytes, device: str, k: SignedKey) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(ed25519).verify(
            k.signature, signed_key_message(device, k.key_id, k.key, k.fallback)
        )
    except Exception:
        return False
    return True


async def nothing_more(client, wait=0.5):
    await client.ping()  # a barrier: what the server had for it has been pushed
    with pytest.raises(asyncio.TimeoutError):
        await client.next_event(wait)


async def next_of(client, kind, timeout=10.0):
    """The next delivery of type ``kind`` (others before it acked and skipped)."""
    while True:
        ev = await client.next_event(timeout)
        if hasattr(ev, "seq"):
            await client.ack(ev.seq)
        if isinstance(ev, kind):
            return ev
        assert isinstance(ev, (DevicesChanged, IncomingReceipt, KeysChanged)), ev


async def close(*devices):
    for d in devices:
        await d.client.close()


def test_upload_then_fetch_gives_a_bundle_an_olm_session_opens_with(srv):
    async def go():
        alice = await device(srv)
        bob = await device(srv, other_than=worker(srv, alice))
        await bob.client.discover([alice.phone])  # a contact: the fetch is free
        assert await alice.upload(otks=5, fallback=True) == 5
        assert await alice.client.key_count() == 5
        (bundle,) = await bob.client.fetch_keys(alice.phone)
        curve, ed = identity_keys(alice.account)
        assert (bundle.device, bundle.curve25519, bundle.ed25519) == (alice.address, curve, ed)
        otk = bundle.one_time_key
        assert otk is not None and not otk.fallback and len(otk.key) == 32
        assert signature_ok(ed, alice.address, otk)
        assert await alice.client.key_count() == 4
        # the bundle is real: bob opens an Olm session, alice decrypts its first message
        session = bob.account.create_outbound_session(
            vodozemac.Curve25519PublicKey.from_bytes(bundle.curve25519),
            vodozemac.Curve25519PublicKey.from_bytes(otk.key),
        )
        pre = session.encrypt(b"hello over olm")
        bob_curve = identity_keys(bob.account)[0]
        result = alice.account.create_inbound_session(
            vodozemac.Curve25519PublicKey.from_bytes(bob_curve), pre.to_pre_key()
        )
        _, plaintext = result  # (inbound session, plaintext)
        assert plaintext == b"hello over olm"
        await close(alice, bob)

    run(go())


def test_one_time_keys_go_out_once_under_concurrent_fetches_from_both_workers(srv):
    async def go():
        alice = await device(srv)
        n = 30
        await alice.upload(otks=n, fallback=True)
        uploaded = {k.key_id: k.key for k in alice.sent["one_time_keys"]}
        fetchers = [await device(srv), await device(srv)]
        fetchers += [await device(srv, other_than=worker(srv, fetchers[0])) for _ in range(2)]
        assert {worker(srv, f) for f in fetchers} == {0, 1}
        for f in fetchers:
            await f.client.discover([alice.phone])

        async def fetch(f):
            (b,) = await f.client.fetch_keys(alice.phone)
            return b.one_time_key

        # 4 fetchers on both workers, 8 fetches each in flight at once: 32 > 30 keys
        got = await asyncio.gather(*(fetch(f) for f in fetchers for _ in range(8)))
        ids = [k.key_id for k in got if not k.fallback]
        assert sorted(ids) == sorted(uploaded)  # each key exactly once
        assert all(uploaded[k.key_id] == k.key for k in got if not k.fallback)
        fallbacks = [k for k in got if k.fallback]
        assert len(fallbacks) == 2
        assert {k.key_id for k in fallbacks} == {alice.sent["fallback"].key_id}
        assert await alice.client.key_count() == 0
        await close(alice, *fetchers)

    run(go())


def test_exhausted_device_hands_out_its_fallback_key_flagged(srv):
    async def go():
        alice = await device(srv)
        bob = await device(srv)
        await bob.client.discover([alice.phone])
        await alice.upload(otks=1, fallback=True)
        first = (await bob.client.fetch_keys(alice.phone))[0].one_time_key
        assert not first.fallback
        for _ in range(2):  # not consumed: the same each time
            k = (await bob.client.fetch_keys(alice.phone))[0].one_time_key
            assert k.fallback and (k.key_id, k.key) == (
                alice.sent["fallback"].key_id,
                alice.sent["fallback"].key,
            )
            assert signature_ok(identity_keys(alice.account)[1], alice.address, k)
        # without a fallback key either: no key at all, the identity keys still
        carol = await device(srv)
        await carol.upload()
        (b,) = await bob.client.fetch_keys(carol.phone)
        assert b.one_time_key is None and b.curve25519 == identity_keys(carol.account)[0]
        await close(alice, bob, carol)

    run(go())


def test_low_keys_notice_then_reupload(srv):
    async def go():
        alice = await device(srv)
        bob = await device(srv, other_than=worker(srv, alice))
        await bob.client.discover([alice.phone])
        await alice.upload(otks=12)
        for _ in range(2):  # 11 left, then 10: not below one-time-keys-low (10)
            await bob.client.fetch_keys(alice.phone)
        await nothing_more(alice.client)
        await bob.client.fetch_keys(alice.phone)  # 9 left: alice is told
        ev = await alice.client.next_event(10)
        assert isinstance(ev, KeysLow) and ev.device == alice.address
        await alice.client.ack(ev.seq)
        await bob.client.fetch_keys(alice.phone)  # 8: no second notice (once per crossing)
        await nothing_more(alice.client)
        assert await alice.client.key_count() == 8
        assert await alice.upload(otks=20) == 28
        for _ in range(19):  # down to 9 again: a new crossing, a new notice
            await bob.client.fetch_keys(alice.phone)
        ev = await alice.client.next_event(10)
        assert isinstance(ev, KeysLow) and ev.device == alice.address
        await close(alice, bob)

    run(go())


def test_bad_signature_wrong_identity_and_too_many_keys_are_refused(srv):
    async def go():
        alice = await device(srv)
        alice.account.generate_one_time_keys(3)
        args = vodozemac_keys(alice.account, alice.address)
        k = args["one_time_keys"][1]
        bad = SignedKey(k.key_id, k.key, bytes([k.signature[0] ^ 1]) + k.signature[1:])
        forged = dict(args, one_time_keys=(args["one_time_keys"][0], bad))
        with pytest.raises(ServerError) as e:
            await alice.client.upload_keys(**forged)
        assert e.value.code == ErrorCode.KEY_SIGNATURE and k.key_id in e.value.text
        # signed for another device: refused too
        other = sign_key(alice.account, alice.phone + ":7", k.key_id, k.key)
        with pytest.raises(ServerError) as e:
            await alice.client.upload_keys(**dict(args, one_time_keys=(other,)))
        assert e.value.code == ErrorCode.KEY_SIGNATURE
        # another account's Ed25519 key (its own signatures fine): not this device's key
        mallory = vodozemac.Account()
        mallory.generate_one_time_keys(1)
        with pytest.raises(ServerError) as e:
            await alice.client.upload_keys(**vodozemac_keys(mallory, alice.address))
        assert e.value.code == ErrorCode.KEY_MISMATCH
        assert await alice.client.key_count() == 0  # nothing was stored
        # one-time-keys-max (50): 30 held, 30 more refused whole
        assert await alice.upload(otks=27) == 30
        with pytest.raises(ServerError) as e:
            await alice.upload(otks=30)
        assert e.value.code == ErrorCode.KEYS_FULL
        assert await alice.client.key_count() == 30
        await close(alice)

    run(go())


def test_fetches_are_limited_per_account_and_strangers_cost_lookups(tight):
    async def go():
        alice = await device(tight)
        await alice.upload(otks=10)
        bob = await device(tight)
        # keys-fetch-per-account is 3 bundles; discover-numbers 2 (bob's discover costs one)
        await bob.client.discover([alice.phone])
        for _ in range(3):
            await bob.client.fetch_keys(alice.phone)
        with pytest.raises(ServerError) as e:
            await bob.client.fetch_keys(alice.phone)
        assert e.value.code == ErrorCode.RATE_LIMITED and "key fetch limit" in e.value.text
        assert await alice.client.key_count() == 7  # the refused fetch took nothing
        # carol has no contacts: each user she asks about is a discover-numbers lookup
        carol = await device(tight)
        await carol.client.fetch_keys(alice.phone)
        with pytest.raises(ServerError) as e:
            await carol.client.fetch_keys("4939999999999")  # unknown: 400, but charged
        assert e.value.code == ErrorCode.UNKNOWN_RECIPIENT
        with pytest.raises(ServerError) as e:
            await carol.client.fetch_keys(alice.phone)
        assert e.value.code == ErrorCode.RATE_LIMITED and "discovery" in e.value.text
        (own,) = await carol.client.fetch_keys(carol.phone)  # herself: free
        assert own.device == carol.address and own.curve25519 is None
        await close(alice, bob, carol)

    run(go())


def test_keys_changed_goes_to_contacts_and_conversation_partners_only(srv):
    async def go():
        alice = await device(srv)
        bob = await device(srv)  # has alice as a contact
        carol = await device(srv)  # alice wrote to her
        dave = await device(srv)  # wrote to alice; alice never answered
        eve = await device(srv)  # nothing to do with alice
        await bob.client.discover([alice.phone])
        await alice.client.send(carol.phone, b"hi carol")
        await dave.client.send(alice.phone, b"hi alice")
        await next_of(carol.client, IncomingMessage)
        await alice.upload(otks=2)  # a first upload: a new identity key
        for d in (bob, carol):
            ev = await next_of(d.client, KeysChanged)
            assert ev.sender == alice.phone
        # alice registers again (a new device, a new account): told again
        await alice.client.close()
        again = await device(srv, alice.phone)
        for d in (bob, carol):
            ev = await next_of(d.client, KeysChanged)
            assert ev.sender == alice.phone
            await nothing_more(d.client)
        await nothing_more(dave.client)  # (alice never acked his message: no receipt either)
        await nothing_more(eve.client)
        # the old device's keys went with it: the new device has published nothing
        (b,) = await bob.client.fetch_keys(alice.phone)
        assert b.device == again.address and b.curve25519 is None
        await close(again, bob, carol, dave, eve)

    run(go())


def test_linking_a_companion_tells_the_contacts(srv):
    async def go():
        phone = next(PHONES)
        creds = await srv.register(phone)  # an Ed25519 identity of the SDK's own
        alice = await srv.login(creds)
        bob = await device(srv)
        await bob.client.discover([phone])
        comp = await srv.client()
        it = comp.pair_qr(name="desktop")
        code = await it.__anext__()
        device_, ccreds = await asyncio.gather(alice.link(code.qr), it.__anext__())
        ev = await next_of(bob.client, KeysChanged)
        assert ev.sender == phone
        await nothing_more(bob.client)
        await it.aclose()
        for c in (comp, alice):
            await c.close()
        await close(bob)

    run(go())


def test_keys_are_deleted_with_the_device(srv):
    async def go():
        alice = await device(srv)
        await alice.upload(otks=4, fallback=True)
        await alice.client.logout()
        await alice.client.close()
        store = Store(str(srv.data_dir / "store"), map_size=256 << 20, create=False)
        try:
            with store.read() as txn:
                assert txn.get(alice.address.encode(), db=store._db["keys"]) is None
                with txn.cursor(db=store._db["otks"]) as c:
                    prefix = alice.address.encode() + b"\x00"
                    assert not (c.set_range(prefix) and c.key().startswith(prefix))
        finally:
            store.close()

    run(go())


def test_retry_receipt_reaches_the_sender_from_the_failing_device(srv):
    async def go():
        alice = await device(srv)
        bob = await device(srv, other_than=worker(srv, alice))
        await alice.client.send(bob.phone, b"\x00undecryptable", id="m1")
        msg = await next_of(bob.client, IncomingMessage)
        await bob.client.retry_receipt(alice.phone, msg.id)
        ev = await next_of(alice.client, IncomingReceipt)
        while ev.type == "delivered":
            ev = await next_of(alice.client, IncomingReceipt)
        assert (ev.type, ev.sender, ev.id) == ("retry", bob.address, "m1")
        await close(alice, bob)

    run(go())


def test_identity_key_changes_are_limited_and_drop_the_old_accounts_keys(tmp_path):
    """A device that publishes another Curve25519 identity key loses the one-time
    and fallback keys of the old one (no one can open a session with them), tells
    its contacts, and may do so key-changes times per key-changes-window per account: each
    change writes a notice for everyone who has the account as a contact."""
    s = Server(tmp_path / "data", workers=2, message_rate=0, key_changes=2).start()
    try:

        async def go():
            alice = await device(s)
            bob = await device(s)
            await bob.client.discover([alice.phone])
            assert await alice.upload(otks=5, fallback=True) == 5
            await next_of(bob.client, KeysChanged)
            ed = alice.sent["ed25519"]
            for _ in range(2):  # two changes a day
                new = vodozemac.Account()
                curve = new.curve25519_key.to_bytes()
                assert await alice.client.upload_keys(curve, ed) == 0  # the old otks are gone
                assert (await next_of(bob.client, KeysChanged)).sender == alice.phone
                (b,) = await bob.client.fetch_keys(alice.phone)
                assert b.curve25519 == curve and b.one_time_key is None  # no old fallback
            with pytest.raises(ServerError) as info:
                await alice.client.upload_keys(vodozemac.Account().curve25519_key.to_bytes(), ed)
            assert info.value.code == ErrorCode.RATE_LIMITED
            assert "(key-changes)" in info.value.text
            await nothing_more(bob.client)
            assert await alice.client.upload_keys(curve, ed) == 0  # the same key: no change
            s.advance_clock(86_401)
            assert await alice.client.upload_keys(vodozemac.Account().curve25519_key.to_bytes(),
                                                  ed) == 0  # fmt: skip
            await close(alice, bob)

        run(go())
    finally:
        assert s.stop() == 0, s.log_text()[-3000:]


def test_the_sweep_keeps_identity_change_records_for_their_whole_window(tmp_path):
    """The rate-limit sweep drops records older than the longest window of any
    limit: key-changes-window (and keys-fetch-window, verify-window) count in
    it, or with every other window short the identity-change limit would be
    forgotten after the first sweep."""
    s = Server(tmp_path / "data", workers=2, message_rate=0, key_changes=1, purge_interval=0.2,
               register_window=60, new_chats_window=60, discover_window=60,
               login_window=60, verify_window=60)  # fmt: skip
    s.start()
    try:

        async def go():
            alice = await device(s)
            await alice.upload(otks=1)
            ed = alice.sent["ed25519"]
            await alice.client.upload_keys(vodozemac.Account().curve25519_key.to_bytes(), ed)
            s.advance_clock(120)  # past every other window, inside key-changes-window
            await asyncio.sleep(1.0)  # sweeps every 0.2 s
            with pytest.raises(ServerError) as info:
                await alice.client.upload_keys(vodozemac.Account().curve25519_key.to_bytes(), ed)
            assert info.value.code == ErrorCode.RATE_LIMITED
            await close(alice)

        run(go())
    finally:
        assert s.stop() == 0, s.log_text()[-3000:]


def test_an_upload_with_more_keys_than_the_maximum_is_refused_before_its_signatures(srv):
    """One frame holds up to 1,024 children: an upload repeating one signed key id 1,000
    times is one key stored, but had the worker verify 1,000 signatures on its loop
    (150 ms each upload, at message-rate).  It is 313 before any is checked, and an
    upload of more than one-time-keys-max keys is 313 even with a bad signature in it."""

    async def go():
        alice = await device(srv)
        alice.account.generate_one_time_keys(1)
        args = vodozemac_keys(alice.account, alice.address)
        k = args["one_time_keys"][0]
        with pytest.raises(ServerError) as e:
            await alice.client.upload_keys(**dict(args, one_time_keys=(k,) * 1000))
        assert e.value.code == ErrorCode.KEYS_FULL and "1000 here" in e.value.text
        alice.account.generate_one_time_keys(50)
        args = vodozemac_keys(alice.account, alice.address)
        keys = args["one_time_keys"]
        assert len(keys) == 51
        bad = SignedKey(keys[-1].key_id, keys[-1].key, bytes(64))
        with pytest.raises(ServerError) as e:
            await alice.client.upload_keys(**dict(args, one_time_keys=(*keys[:-1], bad)))
        assert e.value.code == ErrorCode.KEYS_FULL
        assert await alice.client.key_count() == 0
        assert await alice.client.upload_keys(**dict(args, one_time_keys=keys[:50])) == 50
        await close(alice)

    run(go())


def test_one_user_takes_a_few_one_time_keys_of_a_device_then_its_fallback(tmp_path):
    """A stranger took all 50 one-time keys of a device in 0.4 s (50 fetches, one lookup
    each), and every sender after it got the fallback key.  Now a user takes at most
    keys-per-device of another user's device per keys-fetch-window, then gets the
    fallback key with nothing consumed: the others still get one-time keys, and an
    account's own devices are not limited."""
    s = Server(tmp_path / "data", workers=2, register_per_ip=1000, message_rate=0,
               keys_per_device=3)  # fmt: skip
    s.start()

    async def go():
        alice = await device(s)
        await alice.upload(otks=10, fallback=True)
        mallory, bob = await device(s), await device(s)
        got = [(await mallory.client.fetch_keys(alice.phone))[0].one_time_key for _ in range(6)]
        assert [k.fallback for k in got] == [False] * 3 + [True] * 3
        assert await alice.client.key_count() == 7
        (b,) = await bob.client.fetch_keys(alice.phone)
        assert not b.one_time_key.fallback and await alice.client.key_count() == 6
        # a companion of alice's own account fetching her primary: no limit
        companion = s.link_device(alice.phone)
        c = await s.login(companion)
        for _ in range(4):
            bundles = await c.fetch_keys(alice.phone)
            primary = [x for x in bundles if x.device == alice.address][0]
            assert not primary.one_time_key.fallback
        assert await alice.client.key_count() == 2
        await c.close()
        await close(alice, mallory, bob)

    try:
        run(go())
    finally:
        assert s.stop() == 0, s.log_text()[-3000:]


def test_key_uploads_are_limited_per_device_before_their_signatures(tmp_path):
    """Each upload of 50 keys cost the worker's loop 9 ms of signature checks, and a
    device could send 100 a second (message-rate): 0.9 s of a worker's CPU each second.
    A device uploads key-uploads times per keys-fetch-window; past it 302, before any
    signature is checked (a bad one is not even looked at) and nothing is stored."""
    s = Server(tmp_path / "data", workers=2, register_per_ip=1000, message_rate=0,
               key_uploads=3)  # fmt: skip
    s.start()

    async def go():
        alice = await device(s)
        for n in (5, 10, 15):
            assert await alice.upload(otks=5) == n
        alice.account.generate_one_time_keys(1)
        args = vodozemac_keys(alice.account, alice.address)
        k = args["one_time_keys"][0]
        bad = SignedKey(k.key_id, k.key, bytes(64))
        for keys in ((k,), (bad,)):
            with pytest.raises(ServerError) as e:
                await alice.client.upload_keys(**dict(args, one_time_keys=keys))
            assert e.value.code == ErrorCode.RATE_LIMITED and "key-uploads" in e.value.text
        assert await alice.client.key_count() == 15
        await close(alice)

    try:
        run(go())
    finally:
        assert s.stop() == 0, s.log_text()[-3000:]


def _queue(server, device: str) -> tuple[list[bytes], int]:
    """(the entries of ``device``'s queue, its qstate count), read from the store."""
    store = Store(str(server.data_dir / "store"), map_size=256 << 20, create=False)
    try:
        with store.read() as txn:
            prefix = device.encode() + b"\x00"
            out = []
            with txn.cursor(db=store._db["queue"]) as c:
                if c.set_range(prefix):
                    for key, value in c:
                        if not bytes(key).startswith(prefix):
                            break
                        out.append(bytes(value))
            raw = txn.get(device.encode(), db=store._db["qstate"])
            return out, 0 if raw is None else int.from_bytes(bytes(raw)[8:16], "big")
    finally:
        store.close()


async def _link_and_upload(alice, server) -> str:
    """Link a companion to ``alice``'s account, let it log in and upload its first
    keys, then unlink it: two "keys changed" notices before they were coalesced."""
    comp = await server.client()
    it = comp.pair_qr(name="loop")
    code = await it.__anext__()
    address, ccreds = await asyncio.gather(alice.link(code.qr), it.__anext__())
    await it.aclose()
    await comp.close()
    c = await server.login(ccreds)
    ident = ccreds.identity_key()
    key = vodozemac.Account().curve25519_key.to_bytes()
    otk = SignedKey("k", key, ident.sign(signed_key_message(address, "k", key, False)))
    await c.upload_keys(vodozemac.Account().curve25519_key.to_bytes(), ident.public, [otk])
    await c.close()
    await alice.unlink(address)
    return address


def test_a_loop_of_links_queues_one_keys_notice_per_correspondent_device(srv):
    """Each link and each new device's first upload queued a "keys changed" notice for
    every correspondent, outside key-changes: link-per-account (10 an hour) let one
    account put about 480 a day in each contact device's queue.  At most one is
    undelivered per (device, user): a newer one replaces it, at the tail."""

    async def go():
        phone = next(PHONES)
        alice = await srv.login(await srv.register(phone))
        bob = await device(srv)
        await bob.client.discover([phone])  # alice is bob's contact: he is told
        await bob.client.close()  # offline: his queue keeps what comes
        for _ in range(3):
            await _link_and_upload(alice, srv)
        entries, count = _queue(srv, bob.address)
        notices = [e for e in entries if e[0] == 3]
        assert len(notices) == 1 and count == len(entries), (len(notices), count, len(entries))
        bob.client = await srv.login(bob.creds)
        ev = await next_of(bob.client, KeysChanged)
        assert ev.sender == phone
        await nothing_more(bob.client)
        # one delivered and acked: the next change is told again (online, bob may get
        # the link's and the upload's, acking the first before the second is queued)
        await _link_and_upload(alice, srv)
        assert (await next_of(bob.client, KeysChanged)).sender == phone
        while True:
            try:
                ev = await bob.client.next_event(0.5)
            except TimeoutError:
                break
            assert isinstance(ev, KeysChanged) and ev.sender == phone
            await bob.client.ack(ev.seq)
        await bob.client.ping()
        await until(lambda: _queue(srv, bob.address) == ([], 0))
        await alice.close()
        await close(bob)

    run(go())


def test_a_newer_keys_notice_replaces_one_pushed_but_not_acked(srv):
    """A notice pushed to an online device but not yet acked is replaced too: the device
    gets the newer one after it (it may have read the device list before the change)."""

    async def go():
        alice = await device(srv)
        bob = await device(srv)
        await bob.client.discover([alice.phone])
        await alice.upload(otks=1)
        first = await bob.client.next_event(10)  # not acked
        assert isinstance(first, KeysChanged) and first.sender == alice.phone
        await alice.client.close()
        again = await device(srv, alice.phone)  # registered again: a new device
        second = await bob.client.next_event(10)
        assert isinstance(second, KeysChanged) and second.sender == alice.phone
        assert second.seq > first.seq
        entries, count = _queue(srv, bob.address)
        assert len(entries) == count == 1  # the first one went: one is queued
        await bob.client.ack(second.seq)
        await bob.client.ping()
        await until(lambda: _queue(srv, bob.address) == ([], 0))
        await nothing_more(bob.client)
        await close(again, bob)

    run(go())


def test_no_keys_notice_goes_past_a_full_queue_or_a_strangers_share(tmp_path):
    """A "keys changed" notice was queued past queue-max-count and past the strangers'
    share of a user who does not know the changed account; now such a queue gets none
    (the next per-device send is still checked against the device lists: 408)."""
    s = Server(tmp_path / "data", workers=1, register_per_ip=1000, message_rate=0,
               queue_max_count=4, stranger_queue_count=2).start()  # fmt: skip
    try:

        async def go():
            alice, bob, carol, dave, eve = [await device(s) for _ in range(5)]
            await bob.client.discover([alice.phone, carol.phone])  # knows both
            await eve.client.discover([alice.phone])  # knows alice, queue empty
            await alice.client.send(dave.phone, b"hi dave")  # dave: a conversation partner
            for i in range(4):
                await carol.client.send(bob.phone, b"to bob", id=f"b{i}")  # bob's queue: full
            await carol.client.send(dave.phone, b"to dave")  # dave's: the strangers' share
            for d in (bob, dave):
                await d.client.close()
            assert _queue(s, bob.address)[1] == 4 and _queue(s, dave.address)[1] == 2
            await alice.upload(otks=1)  # a first upload: its correspondents are told
            assert (await next_of(eve.client, KeysChanged)).sender == alice.phone
            assert _queue(s, bob.address)[1] == 4  # full: none
            assert _queue(s, dave.address)[1] == 2  # dave does not know alice: none
            await close(alice, carol, eve)

        run(go())
    finally:
        assert s.stop() == 0, s.log_text()[-3000:]
