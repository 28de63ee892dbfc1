"""End-to-end encryption over a real server (2 workers) with the real SDK (issue 16).

Two users with two devices each (the companions linked with the pairing
protocol, so their keys carry the primary's real signature), every client
connected through a recording TCP relay on loopback, so the test holds every
byte that crossed the wire.  After the run neither that capture nor any file
of the server's data directory contains a plaintext.
"""

import asyncio
import itertools

import pytest
from e2eutil import Relay, companion, connect, grep_dir, on_other_worker, register
from serverutil import Server, until

from pigeon.client.secure import DecryptedMessage, DecryptionFailed, SafetyNumberChanged
from pigeon.core.events import DevicesChanged, IncomingReceipt, KeysChanged

PHONES = (f"4931{n:08d}" for n in itertools.count(30_000_000))


def run(coro, timeout=180):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("e2e") / "data", workers=2, register_per_ip=1000,
               message_rate=0)  # fmt: skip
    s.start()
    yield s
    assert s.stop() == 0, s.log_text()[-3000:]


async def decrypted(client, timeout=15.0):
    """The next DecryptedMessage or DecryptionFailed; notices before it are acked."""
    while True:
        ev = await client.next_event(timeout)
        if isinstance(ev, SafetyNumberChanged):
            continue
        if isinstance(ev, (IncomingReceipt, DevicesChanged, KeysChanged)):
            await client.ack(ev.seq)
            continue
        await client.ack(ev.seq)
        return ev


def test_encrypted_both_ways_across_workers_and_nothing_in_clear(srv, tmp_path):
    async def main():
        relay = await Relay(srv.port).start()
        alice_phone, bob_phone = next(PHONES), next(PHONES)
        a0 = await register(srv, relay, alice_phone, tmp_path / "a0.json")
        b0 = await register(srv, relay, bob_phone, tmp_path / "b0.json")
        a1 = await companion(srv, relay, a0, tmp_path / "a1.json")
        b1 = await companion(srv, relay, b0, tmp_path / "b1.json")
        w = srv.sessions(alice_phone)[a0.creds.device]["worker"]
        a1 = await on_other_worker(srv, relay, a1, tmp_path / "a1.json", w)
        w = srv.sessions(bob_phone)[b0.creds.device]["worker"]
        b1 = await on_other_worker(srv, relay, b1, tmp_path / "b1.json", w)
        await a0.discover([bob_phone])
        await b0.discover([alice_phone])
        secrets = [b"first secret: the vault code is 7319", b"second secret, bob to alice",
                   b"third secret after a reload"]  # fmt: skip

        # alice:0 -> bob: both of bob's devices and alice:1 (the sync copy) decrypt it
        ack = await a0.send(bob_phone, secrets[0])
        for c in (b0, b1, a1):
            ev = await decrypted(c)
            assert type(ev) is DecryptedMessage, ev
            assert (ev.body, ev.type, ev.id, ev.sender) == (secrets[0], "text", ack.id, a0.device)
        # bob:1 -> alice: the other way, from the other worker
        await b1.send(alice_phone, secrets[1], type="text")
        for c in (a0, a1, b0):
            ev = await decrypted(c)
            assert (type(ev), ev.body, ev.sender) == (DecryptedMessage, secrets[1], b1.device)

        # a corrupted ciphertext: an error event, then a retry receipt brings a resend
        # (a new id, resend_of the broken one), and the next message decrypts
        bad_body = b"the corrupted one"
        devices = [b0.device, b1.device, a1.device]
        mtype, payloads = a0.secure.encrypt(devices, a0.secure.seal("text", bad_body))
        payloads[b0.device] = payloads[b0.device][:-3] + bytes(3)
        mid = a0.new_id()
        a0.secure.remember_sent(mid, bob_phone, "text", bad_body)  # as send() would
        await a0.send(bob_phone, payloads, type=mtype, id=mid)
        failed = await decrypted(b0)
        assert type(failed) is DecryptionFailed and failed.id == mid, failed
        resent = await decrypted(b0)
        assert (type(resent), resent.body, resent.resend_of) == (DecryptedMessage, bad_body, mid)
        assert resent.id != mid
        for c in (b1, a1):  # the good copies, then the resend dropped as seen
            assert (await decrypted(c)).body == bad_body
        await a0.send(bob_phone, b"after the error")
        for c in (b0, b1, a1):
            assert (await decrypted(c)).body == b"after the error"

        # a profile reloaded from disk continues its sessions
        creds = b0.creds
        await b0.close()
        b0 = await connect(relay, tmp_path / "b0.json")
        await b0.login(creds)
        await a0.send(bob_phone, secrets[2])
        for c in (b0, b1, a1):
            ev = await decrypted(c)
            assert (type(ev), ev.body) == (DecryptedMessage, secrets[2]), ev
        for c in (a0, a1, b0, b1):
            await c.close()
        await relay.close()
        return relay.captured, secrets, bob_phone

    captured, secrets, bob_phone = run(main())
    assert len(captured) > 10_000  # the relay did see the traffic
    for s in (*secrets, b"the corrupted one", b"after the error"):
        assert s not in captured
    assert grep_dir(srv.data_dir, [*secrets, b"the corrupted one"]) == []
    assert grep_dir(srv.data_dir, [bob_phone.encode()])  # the grep does read the store
    # nor do the clients' own profiles hold them
    assert grep_dir(tmp_path, secrets) == []


def test_reregistration_changes_the_safety_number_and_warns(srv, tmp_path):
    async def main():
        relay = await Relay(srv.port).start()
        alice_phone, bob_phone = next(PHONES), next(PHONES)
        a0 = await register(srv, relay, alice_phone, tmp_path / "a0.json")
        b0 = await register(srv, relay, bob_phone, tmp_path / "b0.json")
        await b0.discover([alice_phone])  # alice is in bob's contacts: bob gets the notice
        await b0.send(alice_phone, b"hello")
        assert (await decrypted(a0)).body == b"hello"
        key_before = (await b0.devices(alice_phone))[0].key
        mine = (await b0.devices(bob_phone))[0].key
        before = b0.safety_number(alice_phone, key_before)
        await a0.close()
        # alice registers her number again: a new phone, a new primary key
        a0 = await register(srv, relay, alice_phone, tmp_path / "a0-new.json")
        while True:
            ev = await b0.next_event(15)
            await b0.ack(ev.seq)
            if isinstance(ev, KeysChanged):
                break
        assert ev.sender == alice_phone
        await b0.send(alice_phone, b"is it you?")
        while True:  # (a second notice may come: the new device's key upload)
            changed = await b0.next_event(15)
            if not isinstance(changed, KeysChanged):
                break
            await b0.ack(changed.seq)
        assert changed == SafetyNumberChanged(alice_phone, (), True)
        key_after = (await b0.devices(alice_phone))[0].key
        after = b0.safety_number(alice_phone, key_after)
        assert key_after != key_before and after != before and len(after) == 60
        assert (await decrypted(a0)).body == b"is it you?"
        from pigeon.client.e2e import safety_number

        assert after == safety_number(alice_phone, key_after, bob_phone, mine)
        for c in (a0, b0):
            await c.close()
        await relay.close()

    run(main())


def test_the_trio_client_encrypts_too(srv, tmp_path):
    import trio

    from pigeon.client.trio import open_client

    alice_phone, bob_phone = next(PHONES), next(PHONES)

    async def main():
        async with (
            open_client("127.0.0.1", srv.port, plaintext=False, profile=tmp_path / "a") as a,
            open_client("127.0.0.1", srv.port, plaintext=False, profile=tmp_path / "b") as b,
        ):
            for c, phone in ((a, alice_phone), (b, bob_phone)):
                await c.register(phone)
                await c.login(await c.verify(phone, srv.code_for(phone)))
            ack = await a.send(bob_phone, b"over trio")
            while True:
                ev = await b.next_event(15)
                await b.ack(ev.seq)
                if not isinstance(ev, (IncomingReceipt, DevicesChanged, KeysChanged)):
                    break
            assert (type(ev), ev.body, ev.id) == (DecryptedMessage, b"over trio", ack.id)

    trio.run(main)


def test_a_retry_receipt_from_someone_the_message_did_not_go_to_is_ignored(srv, tmp_path):
    """A stranger who guessed the id of alice's message to bob (ids are often a prefix
    and a counter) sent a retry receipt for it; the server lets it through (alice's
    device did send that id), and alice's SDK dropped its session with the stranger
    and sent bob the message again (probe5).  Only a device it went to may ask now."""

    async def main():
        relay = await Relay(srv.port).start()
        pa, pb, ps = next(PHONES), next(PHONES), next(PHONES)
        a = await register(srv, relay, pa, tmp_path / "a.json")
        b = await register(srv, relay, pb, tmp_path / "b.json")
        s = await register(srv, relay, ps, tmp_path / "s.json")
        bob = b.creds.device
        await b.close()  # offline: what alice sends to bob stays in his queue
        ack = await a.send(pb, b"for bob only")
        assert srv.queue_count(bob) == 1
        await s.receipt(pa, ack.id, "retry")
        for _ in range(100):  # alice's SDK takes the receipt (and acks it)
            if srv.queue_count(a.creds.device) == 0:
                break
            await asyncio.sleep(0.05)
        assert srv.queue_count(a.creds.device) == 0
        await asyncio.sleep(1.0)  # (a resend would be in bob's queue by now)
        assert srv.queue_count(bob) == 1  # no second copy
        for c in (a, s):
            await c.close()
        await relay.close()

    run(main())


def test_an_encrypted_send_while_reconnecting_waits_for_the_connection(tmp_path):
    """``Client.send`` promises that a message sent while a resuming client
    reconnects waits and goes out after the next login.  Encrypted, it raised
    ConnectionLost ("not connected (reconnecting)") at once when the SDK held no
    device list or keys for the recipient yet: fetching them is a request, and
    requests fail at once while reconnecting.  It waits for the connection now."""
    s = Server(tmp_path / "data", workers=1, register_per_ip=1000)
    s.start()

    async def main():
        relay = await Relay(s.port).start()
        alice_phone, bob_phone = next(PHONES), next(PHONES)
        bob = await register(s, relay, bob_phone, tmp_path / "b.json")
        alice = await connect(relay, tmp_path / "a.json", reconnect=True, backoff=(0.05, 0.3))
        await alice.register(alice_phone)
        await alice.login(await alice.verify(alice_phone, s.code_for(alice_phone)))
        bob_creds = bob.creds
        await bob.close()
        assert s.stop() == 0
        await until(lambda: alice.reconnects == 0 and not alice._live)
        # alice never wrote to bob: his device list and keys are not held yet
        sending = asyncio.ensure_future(alice.send(bob_phone, b"typed offline", timeout=60))
        await asyncio.sleep(1.0)
        assert not sending.done(), sending  # (it raised ConnectionLost here before)
        await asyncio.to_thread(s.start)  # the same port and data
        ack = await sending
        assert alice.reconnects == 1
        bob = await connect(relay, tmp_path / "b.json")
        await bob.login(bob_creds)
        ev = await decrypted(bob)
        assert isinstance(ev, DecryptedMessage) and ev.body == b"typed offline", ev
        assert ev.id == ack.id
        await alice.close()
        await bob.close()
        await relay.close()

    try:
        run(main(), timeout=120)
    finally:
        assert s.stop() == 0
