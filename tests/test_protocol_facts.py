"""What docs/PROTOCOL.md tells client developers about edge cases, on a real server.

Each test checks one statement of the document a client relies on (the
section is named in the test), against a real 1-worker server on loopback,
driven by the SDK or by a raw socket running the sans-IO core.  Raw clients
skip the server's Hello and loop on next_event before reading the socket.
Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest
from serverutil import Server, next_message, until

from pigeon.client import ServerError
from pigeon.client._core import Credentials, ScramLogin
from pigeon.client.identity import new_identity
from pigeon.core.codec import Codec, Node
from pigeon.core.connection import NEED_DATA, Connection, Role
from pigeon.core.errors import ErrorCode
from pigeon.core.events import (
    AuthStart,
    CodeSent,
    DeviceAck,
    Error,
    Hello,
    IncomingMessage,
    IncomingReceipt,
    Link,
    Pair,
    PairCode,
    Ping,
    Pong,
    Privacy,
    PrivacySettings,
    Receipt,
    Register,
    Registered,
    ServerAck,
    Verify,
)
from pigeon.core.tokens import DICTIONARIES
from pigeon.core.wire import ADDR_DEVICE, ADDR_GROUP

from wirebuild import binary, frame, lst, packed, tok

# each test its own numbers: the server is shared by the module
PHONES = iter(f"4917{n:08d}" for n in range(10_000_000, 10_001_000))


def run(coro, timeout=120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    # many registrations come from 127.0.0.1: lift that limit, keep the others
    s = Server(
        tmp_path_factory.mktemp("facts") / "data",
        workers=1,
        register_per_ip=1000,
        verify_failures=100,
    )
    s.start()
    yield s
    assert s.stop() == 0


class Raw:
    """A client on a plain socket running the sans-IO core; ``frames`` keeps what
    arrived, byte for byte, after the server's preamble."""

    def __init__(self, port: int, dictionary_version: int | None = None, timeout: float = 10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        kw = {} if dictionary_version is None else {"dictionary_version": dictionary_version}
        self.conn = Connection(Role.CLIENT, **kw)
        self.received = bytearray()
        self.sock.sendall(self.conn.initiate())

    def send(self, event) -> None:
        self.sock.sendall(self.conn.send(event))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def next_event(self):
        while True:
            ev = self.conn.next_event()
            if isinstance(ev, Hello):
                continue
            if ev is not NEED_DATA:
                return ev
            data = self.sock.recv(65536)
            self.received += data
            self.conn.receive_data(data)

    def closed_by_server(self, timeout: float = 10.0) -> bool:
        """True if the server closes (EOF or reset) within ``timeout`` s."""
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if not self.sock.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
        return False

    def login(self, creds: Credentials) -> None:
        scram = ScramLogin(creds)
        self.send(scram.first())
        self.send(scram.final(self.next_event()))
        ev = self.next_event()
        assert not isinstance(ev, Error), ev
        scram.check(ev)

    def still_open(self) -> None:
        """A ping is answered: the connection goes on (and nothing else came first)."""
        self.send(Ping("still"))
        ev = self.next_event()
        assert isinstance(ev, Pong) and ev.id == "still", ev

    def close(self) -> None:
        self.sock.close()


def other_frame(event) -> bytes:
    """The frame of ``event`` as a client writes it, with neither the state's nor the
    fields' checks of a Connection, so a test can send what its own connection
    would refuse to (a request in the wrong state, a field the server refuses)."""
    return Codec().encode_frame(event.to_node(Node))


def wrong(code: str) -> str:
    return f"{(int(code) + 1) % 10**6:06d}"


# -- section 7: registration -----------------------------------------------------------


def test_the_login_deadline_closes_a_registration_and_verify_works_on_a_new_connection(
    tmp_path,
):
    srv = Server(tmp_path / "data", workers=1, login_timeout=1.5).start()
    try:
        phone = next(PHONES)
        a = Raw(srv.port)
        a.send(Register("r1", phone))
        assert isinstance(a.next_event(), CodeSent)
        ev = a.next_event()  # nobody typed the code within login-timeout
        assert isinstance(ev, Error) and ev.code == ErrorCode.TIMEOUT, ev
        assert a.closed_by_server()
        a.close()
        b = Raw(srv.port)  # the code is still valid on a new connection
        b.send(Verify("r2", phone, srv.code_for(phone), new_identity().public))
        ev = b.next_event()
        assert isinstance(ev, Registered) and ev.device == phone + ":0", ev
        b.login(Credentials(ev.device, ev.secret))
        b.still_open()
        b.close()
    finally:
        assert srv.stop() == 0


def test_code_attempts_wrong_codes_then_the_right_one(srv):
    # code-attempts = 5: four wrong tries, then the right code still works
    phone = next(PHONES)
    raw = Raw(srv.port)
    raw.send(Register("r1", phone))
    assert isinstance(raw.next_event(), CodeSent)
    code = srv.code_for(phone)
    for i in range(4):
        raw.send(Verify(f"w{i}", phone, wrong(code), new_identity().public))
        ev = raw.next_event()
        assert isinstance(ev, Error) and ev.code == ErrorCode.BAD_CODE and ev.id == f"w{i}"
    raw.still_open()  # 301 is not fatal
    raw.send(Verify("ok", phone, code, new_identity().public))
    assert isinstance(raw.next_event(), Registered)
    raw.close()
    # five wrong tries void it: the right code then gets 301 too
    phone = next(PHONES)
    raw = Raw(srv.port)
    raw.send(Register("r1", phone))
    assert isinstance(raw.next_event(), CodeSent)
    code = srv.code_for(phone)
    for i in range(5):
        raw.send(Verify(f"w{i}", phone, wrong(code), new_identity().public))
        ev = raw.next_event()
        assert isinstance(ev, Error) and ev.code == ErrorCode.BAD_CODE
    raw.send(Verify("late", phone, code, new_identity().public))
    ev = raw.next_event()
    assert isinstance(ev, Error) and ev.code == ErrorCode.BAD_CODE and ev.id == "late"
    # a new register sends a new code, which works
    raw.send(Register("r2", phone))
    assert isinstance(raw.next_event(), CodeSent)
    raw.send(Verify("again", phone, srv.code_for(phone), new_identity().public))
    assert isinstance(raw.next_event(), Registered)
    raw.close()


@pytest.mark.parametrize("size", [0, 31, 33, 64])
def test_an_identity_key_of_the_wrong_length_is_200_and_spends_no_attempt(srv, size):
    phone = next(PHONES)
    raw = Raw(srv.port)
    raw.send(Register("r1", phone))
    assert isinstance(raw.next_event(), CodeSent)
    code = srv.code_for(phone)
    # Verify checks the length when it reads a node, so build the node by hand
    node = (
        lst(8) + tok("verify") + tok("id") + binary(b"v1") + tok("phone") + packed(phone)
        + tok("code") + packed(code) + binary(os.urandom(size))
    )  # fmt: skip
    for _ in range(6):  # more than code-attempts: none of them counts
        raw.send_raw(frame(node))
        ev = raw.next_event()
        assert isinstance(ev, Error) and ev.code == ErrorCode.BAD_REQUEST and ev.id == "v1", ev
        assert "32 bytes" in ev.text
    raw.send(Verify("v2", phone, code, new_identity().public))
    assert isinstance(raw.next_event(), Registered)
    raw.close()


def test_an_identity_key_is_checked_by_use_a_primary_whose_key_is_no_point_cannot_link(srv):
    # section 7: only the length is checked; b"k" * 32 is 32 bytes but no Ed25519
    # public key (it decodes to no point of edwards25519), so it is registered as
    # sent, and no link signature verifies against it (section 7a: 309)
    phone = next(PHONES)
    raw = Raw(srv.port)
    raw.send(Register("r1", phone))
    assert isinstance(raw.next_event(), CodeSent)
    raw.send(Verify("v1", phone, srv.code_for(phone), b"k" * 32))
    reg = raw.next_event()
    assert isinstance(reg, Registered), reg
    raw.login(Credentials(reg.device, reg.secret))
    companion = Raw(srv.port)
    key = new_identity().public
    companion.send(Pair("p1", "qr", key))
    ref = companion.next_event()
    assert isinstance(ref, PairCode) and ref.ref, ref
    for i, signer in enumerate((new_identity(), new_identity())):  # any signer: none verifies
        raw.send(Link(f"l{i}", ref=ref.ref, key=key, signature=signer.sign_link(phone, key)))
        ev = raw.next_event()
        assert isinstance(ev, Error) and ev.code == ErrorCode.BAD_SIGNATURE, ev
    raw.still_open()
    companion.close()
    raw.close()


@pytest.mark.parametrize("size", [0, 31, 33])
def test_a_pair_key_of_the_wrong_length_is_200_and_the_connection_stays_open(srv, size):
    # section 7a: pair's content is the companion's 32-byte key; Pair checks the
    # length when it reads a node, so build the node by hand
    raw = Raw(srv.port)
    node = lst(6) + tok("pair") + tok("id") + binary(b"p1") + tok("type") + tok("qr")
    raw.send_raw(frame(node + binary(os.urandom(size))))
    ev = raw.next_event()
    assert isinstance(ev, Error) and ev.code == ErrorCode.BAD_REQUEST and ev.id == "p1", ev
    assert "32 bytes" in ev.text
    raw.send(Pair("p2", "qr", new_identity().public))  # a right one is answered
    ev = raw.next_event()
    assert isinstance(ev, PairCode) and ev.id == "p2", ev
    raw.close()


# -- section 8: login ------------------------------------------------------------------


def test_a_mechanism_other_than_scram_sha_256_is_200_and_the_connection_stays_open(srv):
    creds = run(srv.register(next(PHONES)))
    raw = Raw(srv.port)
    for mech in ("PLAIN", "SCRAM-SHA-1", "scram-sha-256"):
        raw.send_raw(other_frame(AuthStart(ScramLogin(creds).first().data, mech)))
        ev = raw.next_event()
        assert isinstance(ev, Error) and ev.code == ErrorCode.BAD_REQUEST and ev.id is None, ev
        assert "SCRAM-SHA-256" in ev.text
        raw.still_open()
    raw.login(creds)  # still unauthenticated: the right mechanism logs in
    raw.still_open()
    raw.close()


def test_an_unknown_device_gets_its_300_after_the_response(srv):
    raw = Raw(srv.port)
    scram = ScramLogin(Credentials(next(PHONES) + ":0", new_identity().public))
    raw.send(scram.first())
    ev = raw.next_event()
    assert not isinstance(ev, Error), ev  # a challenge, like a real device's
    raw.send(scram.final(ev))
    ev = raw.next_event()
    assert isinstance(ev, Error) and ev.code == ErrorCode.NOT_AUTHORIZED, ev
    assert raw.closed_by_server()
    raw.close()


# -- section 3/4: addresses on the wire ------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        bytes([ADDR_DEVICE, 0]) + packed("1234567")[1:],  # 7 digits
        bytes([ADDR_DEVICE, 0]) + packed("1234567890123456")[1:],  # 16 digits
        bytes([ADDR_DEVICE, 0]) + packed("0491701234567")[1:],  # leading 0
        bytes([ADDR_DEVICE, 0, 0]),  # no digits
        bytes([ADDR_GROUP]) + packed("1" * 21)[1:],
        bytes([ADDR_GROUP, 0]),
    ],
    ids=["7-digits", "16-digits", "leading-0", "empty", "group-21", "group-0"],
)
def test_an_out_of_range_address_on_the_wire_is_120_and_closes(srv, address):
    raw = Raw(srv.port)
    raw.send_raw(frame(lst(3) + tok("ping") + tok("id") + address))
    ev = raw.next_event()
    assert isinstance(ev, Error) and ev.code == ErrorCode.MALFORMED_NODE, ev
    assert raw.closed_by_server()
    raw.close()


def test_the_address_prefix_is_followed_by_packed_digits_without_fa(srv):
    # f0 <device> <count> <nibbles>: the address decodes, and is answered like any id
    raw = Raw(srv.port)
    raw.send_raw(frame(lst(3) + tok("ping") + tok("id") + bytes([ADDR_DEVICE, 7, 12])
                       + bytes.fromhex("491701234567")))  # fmt: skip
    ev = raw.next_event()
    assert isinstance(ev, Pong) and ev.id == "491701234567:7", ev
    raw.still_open()
    raw.close()


def test_an_address_of_the_wrong_kind_is_200(srv):
    alice = run(srv.register(next(PHONES)))
    raw = Raw(srv.port)
    raw.login(alice)
    for to in (alice.device, "491701234567:256", "+491701234567"):
        node = lst(8) + tok("message") + tok("to") + binary(to.encode()) + tok("id") + binary(b"m1")
        raw.send_raw(frame(node + tok("type") + tok("text") + binary(b"x")))
        ev = raw.next_event()
        assert isinstance(ev, Error) and ev.code == ErrorCode.BAD_REQUEST and ev.id == "m1", ev
    raw.still_open()
    raw.close()


# -- section 9: acks, receipts, messages to oneself ------------------------------------


def test_ack_seq_0_is_accepted_and_does_nothing(srv):
    alice, bob = (run(srv.register(next(PHONES))) for _ in range(2))

    async def send():
        c = await srv.login(alice)
        await c.send(bob.device.partition(":")[0], b"hi")
        await c.close()

    run(send())
    raw = Raw(srv.port)
    raw.login(bob)
    ev = raw.next_event()
    assert isinstance(ev, IncomingMessage) and ev.seq == 1
    raw.send(DeviceAck(0))
    raw.still_open()  # no answer, no error
    raw.close()
    raw = Raw(srv.port)  # and nothing was deleted: it comes again
    raw.login(bob)
    ev = raw.next_event()
    assert isinstance(ev, IncomingMessage) and ev.seq == 1
    raw.send(DeviceAck(1))
    raw.still_open()
    raw.close()


def test_a_receipt_about_no_message_to_a_stranger_is_acked_and_dropped(srv):
    """A read receipt reaches ``to`` only if ``to`` wrote to the sender lately,
    has the sender as a contact, or sent a message with that id (section 9):
    otherwise it is acked and stored nowhere.  Once there is a conversation the
    id is not checked (the server keeps no history)."""
    alice, bob = (run(srv.register(next(PHONES))) for _ in range(2))
    bob_user = bob.device.partition(":")[0]
    alice_user = alice.device.partition(":")[0]

    async def main():
        a = await srv.login(alice)
        b = await srv.login(bob)
        ack = await a.receipt(bob_user, "never-sent")  # a stranger, no message: dropped
        assert ack.cls == "receipt"
        again = await a.receipt(bob_user, "never-sent")  # answered the same way again
        assert again.cls == "receipt"
        await b.send(alice_user, b"hi", id="m1")
        ev = await a.next_event(10)
        assert isinstance(ev, IncomingMessage) and ev.id == "m1"
        await a.ack(ev.seq)
        ev = await b.next_event(10)
        assert isinstance(ev, IncomingReceipt) and ev.type == "delivered"
        await b.ack(ev.seq)
        for mid in ("m1", "never-sent"):  # bob wrote to alice: both reach him now
            ack = await a.receipt(bob_user, mid)
            ev = await b.next_event(10)
            assert isinstance(ev, IncomingReceipt)
            assert (ev.sender, ev.id, ev.type) == (alice_user, mid, "read")
            await b.ack(ev.seq)
            again = await a.receipt(bob_user, mid)  # the same receipt: the same ack
            assert again.t == ack.t
        await a.close()
        await b.close()

    run(main())
    mine = (alice.device, bob.device)  # (the server is shared with other tests)
    run(until(lambda: not [d for d in srv.queue_stats(1000)["top"] if d["device"] in mine]))


def test_the_errors_a_receipt_gets(srv):
    alice, bob = (run(srv.register(next(PHONES))) for _ in range(2))
    bob_user = bob.device.partition(":")[0]

    async def main():
        a = await srv.login(alice)
        ack = await a.receipt(next(PHONES), "m1")  # not a user: acked as to a stranger
        assert ack.cls == "receipt"
        await a.block(bob_user)
        with pytest.raises(ServerError) as info:
            await a.receipt(bob_user, "m1")  # you block them
        assert info.value.code == ErrorCode.BLOCKED
        await a.unblock(bob_user)
        await a.close()

    run(main())
    raw = Raw(srv.port)
    raw.login(alice)
    for to, typ in ((bob_user, "delivered"), ("g:1", "read"), (bob.device, "read")):
        raw.send_raw(other_frame_receipt(to, typ))
        ev = raw.next_event()
        assert isinstance(ev, Error) and ev.code == ErrorCode.BAD_REQUEST and ev.id == "m1", ev
    raw.still_open()
    raw.close()


def other_frame_receipt(to: str, typ: str) -> bytes:
    node = lst(7) + tok("receipt") + tok("to") + binary(to.encode()) + tok("id") + binary(b"m1")
    return frame(node + tok("type") + tok(typ))


def test_a_message_to_ones_own_user_goes_to_the_other_devices_as_sync_copies(srv):
    me = run(srv.register(next(PHONES)))
    user = me.device.partition(":")[0]

    async def main():
        c = await srv.login(me)
        ack = await c.send(user, b"note to self", id="self1")  # one device: nowhere to go
        other = srv.link_device(user)
        c2 = await srv.login(other)
        ack2 = await c.send(user, b"note to self", id="self2")
        ev = await c2.next_event(10)
        assert isinstance(ev, IncomingMessage)
        assert (ev.sender, ev.to, ev.id, ev.body, ev.t) == (
            me.device,
            user,
            "self2",
            b"note to self",
            ack2.t,
        )
        await c2.ack(ev.seq)
        await c.ping()  # nothing came back to the sender: no copy, no delivered receipt
        with pytest.raises(asyncio.TimeoutError):
            await c.next_event(0.5)
        assert ack.t <= ack2.t
        await c.close()
        await c2.close()

    run(main())


def test_seq_increases_per_device_and_a_purged_entry_leaves_a_gap(tmp_path):
    srv = Server(tmp_path / "data", workers=1, queue_max_age=60, purge_interval=0.2).start()
    try:
        alice, bob = (run(srv.register(next(PHONES))) for _ in range(2))
        bob_user = bob.device.partition(":")[0]

        async def main():
            a = await srv.login(alice)
            await a.send(bob_user, b"old")
            srv.advance_clock(120)  # past queue-max-age: purged before bob comes
            await until(lambda: srv.queue_stats()["count"] == 0, timeout=20)
            b = await srv.login(bob)
            await a.send(bob_user, b"new")
            ev = await next_message(b)
            assert ev.body == b"new" and ev.seq == 2, ev  # seq 1 was purged: a gap
            await b.ack(ev.seq)
            await a.close()
            await b.close()

        run(main())
    finally:
        assert srv.stop() == 0


# -- sections 1 and 14: which dictionary each frame uses -------------------------------


def test_queued_and_pushed_frames_use_the_oldest_dictionary_answers_the_clients(srv):
    alice, bob = (run(srv.register(next(PHONES))) for _ in range(2))
    v1 = DICTIONARIES[1]
    assert "full" not in v1.codes and "online" not in v1.codes  # both came in version 2
    raw = Raw(srv.port, dictionary_version=2)
    raw.login(bob)
    start = len(raw.received)
    raw.send(Privacy("p1"))  # an answer: encoded with this connection's version (2)
    ev = raw.next_event()
    assert isinstance(ev, PrivacySettings)
    answer = bytes(raw.received[start:])
    assert bytes([DICTIONARIES[2].codes["online"]]) in answer and b"online" not in answer

    async def send():
        c = await srv.login(alice)
        await c.send(bob.device.partition(":")[0], b"x", type="full")
        await c.close()

    start = len(raw.received)
    run(send())
    ev = raw.next_event()  # a delivery: encoded with version 1, "full" as a literal
    assert isinstance(ev, IncomingMessage) and ev.type == "full"
    delivery = bytes(raw.received[start:])
    assert binary(b"full") in delivery
    raw.send(DeviceAck(ev.seq))
    raw.still_open()
    raw.close()


def test_a_version_1_client_reads_every_frame(srv):
    alice, bob = (run(srv.register(next(PHONES))) for _ in range(2))
    raw = Raw(srv.port, dictionary_version=1)
    raw.login(bob)
    raw.send(Privacy("p1", online="contacts"))  # "online" goes as a literal
    ev = raw.next_event()
    assert isinstance(ev, PrivacySettings) and ev.online == "contacts"

    async def send():
        c = await srv.login(alice)
        await c.send(bob.device.partition(":")[0], b"x", type="full")
        await c.close()

    run(send())
    ev = raw.next_event()
    assert isinstance(ev, IncomingMessage) and ev.type == "full"
    raw.send(DeviceAck(ev.seq))
    raw.send(Receipt(alice.device.partition(":")[0], ev.id))
    ev = raw.next_event()
    assert isinstance(ev, ServerAck) and ev.cls == "receipt"
    raw.close()


# -- sections 7, 9c and 9d: the identity key, key fetches, the encrypted plaintext ---------


def _olm_device(srv, account):
    """A plaintext SDK client registered with ``account``'s Ed25519 key (section 7),
    logged in, its Olm keys uploaded: a client of its own making, as a stranger's."""
    from pigeon.client.keys import AccountIdentity, vodozemac_keys

    async def go():
        phone = next(PHONES)
        c = await srv.client()
        await c.register(phone)
        creds = await c.verify(phone, srv.code_for(phone), identity=AccountIdentity(account))
        await c.close()
        c = await srv.login(creds)
        account.generate_one_time_keys(3)
        account.generate_fallback_key()
        assert await c.upload_keys(**vodozemac_keys(account, creds.device)) == 3
        account.mark_keys_as_published()
        return phone, creds, c

    return go()


def test_a_device_registered_with_another_librarys_key_cannot_publish_olm_keys(srv):
    # section 7: the identity key must be the Olm account's Ed25519 key; 9c: 308 otherwise
    vodozemac = pytest.importorskip("vodozemac")
    from pigeon.client.keys import vodozemac_keys

    async def go():
        phone = next(PHONES)
        c = await srv.client()
        await c.register(phone)
        creds = await c.verify(phone, srv.code_for(phone), identity=new_identity())
        await c.close()
        c = await srv.login(creds)
        account = vodozemac.Account()  # made after the registration: another Ed25519 key
        account.generate_one_time_keys(1)
        with pytest.raises(ServerError) as e:
            await c.upload_keys(**vodozemac_keys(account, creds.device))
        assert e.value.code == ErrorCode.KEY_MISMATCH
        await c.close()
        # registered again with the account's own key, the same account's keys go in
        _, _, c = await _olm_device(srv, vodozemac.Account())
        await c.close()

    run(go())


def test_a_fetch_of_ones_own_user_takes_a_one_time_key_of_the_asking_device_too(srv):
    # section 9c: no fetch of one device; every device of the user asked gives a key
    vodozemac = pytest.importorskip("vodozemac")

    async def go():
        phone, creds, c = await _olm_device(srv, vodozemac.Account())
        (bundle,) = await c.fetch_keys(phone)
        assert bundle.device == creds.device and bundle.one_time_key is not None
        assert await c.key_count() == 2
        await c.close()

    run(go())


def test_the_sdk_reads_a_strangers_olm_payload_and_refuses_a_str_body(srv, tmp_path):
    # section 9d: payload 00 + sender's Curve25519 key + Olm bytes; plaintext [str, bin]
    vodozemac = pytest.importorskip("vodozemac")
    import msgpack

    from pigeon.client import Client
    from pigeon.client.secure import DecryptedMessage, DecryptionFailed

    async def next_decrypted(client):
        while True:
            ev = await client.next_event(15)
            if hasattr(ev, "seq"):
                await client.ack(ev.seq)
            if isinstance(ev, DecryptedMessage | DecryptionFailed):
                return ev

    async def go():
        phone = next(PHONES)
        sdk = await Client.connect("127.0.0.1", srv.port, plaintext=False,
                                   profile=str(tmp_path / "p.json"))  # fmt: skip
        await sdk.register(phone)
        await sdk.login(await sdk.verify(phone, srv.code_for(phone)))
        for _ in range(100):  # the SDK publishes its keys after its login
            if await sdk.key_count() > 0:
                break
            await asyncio.sleep(0.05)
        account = vodozemac.Account()
        _, _, stranger = await _olm_device(srv, account)
        await stranger.discover([phone])
        curve = account.curve25519_key.to_bytes()

        async def send(item):
            (bundle,) = await stranger.fetch_keys(phone)  # a fresh session each time
            session = account.create_outbound_session(
                vodozemac.Curve25519PublicKey.from_bytes(bundle.curve25519),
                vodozemac.Curve25519PublicKey.from_bytes(bundle.one_time_key.key),
            )
            kind, olm = session.encrypt(msgpack.packb(item)).to_parts()
            assert kind == 0  # a pre-key message: its type byte, then the sender's key
            await stranger.send(phone, bytes([kind]) + curve + olm, type="pkmsg")

        await send(["text", "a str body"])
        ev = await next_decrypted(sdk)
        assert isinstance(ev, DecryptionFailed)
        await send(["text", b"a bin body"])
        ev = await next_decrypted(sdk)
        assert isinstance(ev, DecryptedMessage) and (ev.type, ev.body) == ("text", b"a bin body")
        await sdk.close()
        await stranger.close()

    run(go())


def test_the_safety_number_is_computed_as_written():
    # section 9d "Safety numbers", step by step with hashlib, against the SDK's
    import base64
    import hashlib

    from pigeon.client.e2e import format_safety_number, safety_number, safety_qr

    def fingerprint(user, key):
        d = hashlib.sha512(b"\x00\x00" + key + user.encode("ascii")).digest()
        for _ in range(5200):
            d = hashlib.sha512(d + key).digest()
        return d

    def digits(fp):
        return "".join(
            f"{int.from_bytes(fp[i : i + 5], 'big') % 100000:05d}" for i in range(0, 30, 5)
        )

    for _ in range(3):
        a, b = next(PHONES), next(PHONES)
        ka, kb = os.urandom(32), os.urandom(32)
        halves = sorted((digits(fp), fp) for fp in (fingerprint(a, ka), fingerprint(b, kb)))
        number = "".join(d for d, _ in halves)
        assert safety_number(a, ka, b, kb) == number == safety_number(b, kb, a, ka)
        assert len(format_safety_number(number).split(" ")) == 12
        parts = [base64.urlsafe_b64encode(fp[:32]).rstrip(b"=").decode() for _, fp in halves]
        assert safety_qr(a, ka, b, kb) == "PGNV1," + ",".join(parts)
