"""The SDK's end-to-end layer on its own (client/e2e.py): real vodozemac accounts
and sessions, real files; no server (tests/test_e2e.py runs it over one)."""

from __future__ import annotations

import os
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from pigeon.client import e2e
from pigeon.client.identity import new_identity
from pigeon.core.events import DeviceInfo

A, B = "4915112345678:0", "491701234567:0"


def pair():
    """Alice's device opens an outbound session with Bob's from one of his one-time keys."""
    alice, bob = e2e.OlmDevice(), e2e.OlmDevice()
    ((_, otk),) = bob.new_one_time_keys(1)
    bob.mark_published()
    alice.start_session(B, bob.curve25519, otk)
    return alice, bob


def test_pre_key_then_normal_messages_both_ways():
    alice, bob = pair()
    first = alice.encrypt(B, b"hello bob")
    assert first[0] == e2e.PRE_KEY and first[1:33] == alice.curve25519
    assert b"hello bob" not in first
    assert bob.decrypt(A, first) == b"hello bob"
    # a second pre-key message of the same session (Bob has not answered yet)
    assert bob.decrypt(A, alice.encrypt(B, b"again")) == b"again"
    reply = bob.encrypt(A, b"hi alice")
    assert reply[0] == e2e.NORMAL
    assert alice.decrypt(B, reply) == b"hi alice"
    after = alice.encrypt(B, b"now normal")
    assert after[0] == e2e.NORMAL
    assert bob.decrypt(A, after) == b"now normal"


def test_one_time_key_is_used_once():
    alice, bob = pair()
    carol = e2e.OlmDevice()
    msg = alice.encrypt(B, b"x")
    assert bob.decrypt(A, msg) == b"x"
    # Carol replays Alice's pre-key message as her own: vodozemac refuses the key
    forged = msg[:1] + carol.curve25519 + msg[33:]
    with pytest.raises(e2e.DecryptError):
        bob.decrypt("4915199999999:0", forged)


def test_corrupted_payload_is_an_error_and_the_next_one_decrypts():
    alice, bob = pair()
    assert bob.decrypt(A, alice.encrypt(B, b"one")) == b"one"
    assert alice.decrypt(B, bob.encrypt(A, b"ack")) == b"ack"
    bad = bytearray(alice.encrypt(B, b"two"))
    bad[-5] ^= 0x40
    with pytest.raises(e2e.DecryptError):
        bob.decrypt(A, bytes(bad))
    assert bob.decrypt(A, alice.encrypt(B, b"three")) == b"three"
    for junk in (b"", b"\x07abc", b"\x01", b"\x00" + b"\x00" * 10):
        with pytest.raises(e2e.DecryptError):
            bob.decrypt(A, junk)


def test_lost_session_recovers_with_a_new_one():
    alice, bob = pair()
    assert bob.decrypt(A, alice.encrypt(B, b"one")) == b"one"
    bob.forget(A)  # Bob lost his state for Alice
    with pytest.raises(e2e.DecryptError):
        bob.decrypt(A, alice.encrypt(B, b"lost"))
    # Bob opens a new session from a fresh one-time key of Alice's
    ((_, otk),) = alice.new_one_time_keys(1)
    alice.mark_published()
    bob.start_session(A, alice.curve25519, otk)
    assert alice.decrypt(B, bob.encrypt(A, b"retry please")) == b"retry please"
    # Alice's answer goes through the newest session, which Bob has
    assert bob.decrypt(A, alice.encrypt(B, b"resent")) == b"resent"


def test_no_session_and_key_mismatch():
    alice, bob = pair()
    with pytest.raises(e2e.NoSession):
        bob.encrypt(A, b"x")
    other = e2e.OlmDevice()
    ((_, otk),) = other.new_one_time_keys(1)
    with pytest.raises(e2e.KeyMismatch):
        alice.start_session(B, other.curve25519, otk)
    with pytest.raises(e2e.E2EError):
        alice.start_session("x:1", b"\x00" * 31, otk)


def test_one_time_keys_sorted_capped_and_published():
    dev = e2e.OlmDevice()
    keys = dev.new_one_time_keys(10)
    assert len(keys) == 10 and keys == sorted(keys)
    assert all(len(k) == 32 for _, k in keys)
    assert len(dev.new_one_time_keys(1000)) == dev.max_one_time_keys == 50
    dev.mark_published()
    assert dev.new_one_time_keys(0) == []
    kid, fk = dev.fallback_key()
    assert len(fk) == 32 and dev.fallback_key() == (kid, fk)


def test_signatures_are_ed25519_by_the_identity_key():
    dev = e2e.OlmDevice()
    sig = dev.sign(b"payload")
    assert len(sig) == 64 and len(dev.ed25519) == 32
    Ed25519PublicKey.from_public_bytes(dev.ed25519).verify(sig, b"payload")
    link = dev.sign_link("4915112345678", b"k" * 32)
    assert e2e.verify_link(dev.ed25519, "4915112345678", b"k" * 32, link)


def test_state_survives_a_dump_and_load(tmp_path):
    alice, bob = pair()
    assert bob.decrypt(A, alice.encrypt(B, b"before")) == b"before"
    key = e2e.ProfileKeys(tmp_path / "bob.json").load_or_create()
    saved = bob.dump(key)
    text = repr(saved)
    assert bob.curve25519.hex() not in text
    bob2 = e2e.OlmDevice.load(saved, key)
    assert bob2.ed25519 == bob.ed25519
    assert bob2.decrypt(A, alice.encrypt(B, b"after")) == b"after"
    with pytest.raises(e2e.E2EError):
        e2e.OlmDevice.load(saved, os.urandom(32))


def test_key_file_is_private_and_stable(tmp_path):
    old = os.umask(0)
    try:
        keys = e2e.ProfileKeys(tmp_path / "p.json")
        k1 = keys.load_or_create()
    finally:
        os.umask(old)
    assert len(k1) == 32
    assert stat.S_IMODE(os.stat(keys.path).st_mode) == 0o600
    assert keys.path == str(tmp_path / "p.json") + ".key"
    assert keys.load_or_create() == k1
    with open(keys.path, "wb") as f:
        f.write(b"short")
    with pytest.raises(e2e.E2EError):
        keys.load_or_create()


def test_safety_number_shape_symmetry_and_change():
    ka, kb = e2e.OlmDevice().ed25519, e2e.OlmDevice().ed25519
    n = e2e.safety_number("4915112345678", ka, "491701234567", kb)
    assert len(n) == 60 and n.isdigit()
    assert n == e2e.safety_number("491701234567", kb, "4915112345678", ka)
    assert len(e2e.format_safety_number(n).split()) == 12
    # a new key (re-registration) changes it; so does another user
    assert e2e.safety_number("4915112345678", ka, "491701234567", e2e.OlmDevice().ed25519) != n
    assert e2e.safety_number("4915112345670", ka, "491701234567", kb) != n
    qr = e2e.safety_qr("4915112345678", ka, "491701234567", kb)
    assert qr.startswith("PGNV1,")
    assert e2e.verify_safety_qr(qr, "491701234567", kb, "4915112345678", ka)
    assert not e2e.verify_safety_qr(qr, "491701234567", ka, "4915112345678", kb)


def test_safety_number_follows_the_documented_derivation():
    """Recomputed from the docstring's recipe with hashlib (not the code under test)."""
    import hashlib

    def half(user, key):
        h = hashlib.sha512(b"\x00\x00" + key + user.encode()).digest()
        for _ in range(5200):
            h = hashlib.sha512(h + key).digest()
        return "".join(
            f"{int.from_bytes(h[i : i + 5], 'big') % 100000:05d}" for i in range(0, 30, 5)
        )

    ka, kb = os.urandom(32), os.urandom(32)
    want = "".join(sorted([half("4915112345678", ka), half("491701234567", kb)]))
    assert e2e.safety_number("4915112345678", ka, "491701234567", kb) == want


def test_device_list_companions_checked_through_the_primary():
    primary, companion, rogue = new_identity(), new_identity(), new_identity()
    user = "4915112345678"
    items = (
        DeviceInfo(f"{user}:0", 1, primary.public),
        DeviceInfo(
            f"{user}:1", 2, companion.public, "laptop", primary.sign_link(user, companion.public)
        ),
        DeviceInfo(f"{user}:2", 3, rogue.public, "evil", rogue.sign_link(user, rogue.public)),
        DeviceInfo(f"{user}:3", 4, rogue.public, "none", None),
    )
    t = e2e.check_device_list(user, items)
    assert t.devices == (f"{user}:0", f"{user}:1")
    assert t.bad == (f"{user}:2", f"{user}:3")
    assert t.primary_key == primary.public


# -- SecureState: the SDK's state between the wire and the Olm layer ------------------


def incoming(sender, mid, mtype, body, seq=1):
    from pigeon.core.events import IncomingMessage

    return IncomingMessage(sender, mid, mtype, 1763830000123, seq, body)


def secure_pair(tmp_path):
    from pigeon.client.secure import SecureState

    alice, bob = SecureState(tmp_path / "alice.json"), SecureState(tmp_path / "bob.json")
    ((_, otk),) = bob.device.new_one_time_keys(1)
    bob.device.mark_published()
    alice.device.start_session(B, bob.device.curve25519, otk)
    return alice, bob


def test_secure_state_envelope_resend_and_reload(tmp_path):
    from pigeon.client.secure import DecryptedMessage, DecryptionFailed, SecureState

    alice, bob = secure_pair(tmp_path)
    mtype, payloads = alice.encrypt([B], alice.seal("text", b"secret words"))
    assert mtype == "pkmsg" and set(payloads) == {B}
    ev = bob.decrypt(incoming(A, "m1", mtype, payloads[B]))
    assert ev == DecryptedMessage(A, "m1", "text", 1763830000123, 1, b"secret words")
    # the profile on disk holds no plaintext and no key; a reload continues the session
    for f in tmp_path.iterdir():
        assert b"secret words" not in f.read_bytes()
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    bob2 = SecureState(tmp_path / "bob.json")
    _, payloads = alice.encrypt([B], alice.seal("text", b"second"))
    assert bob2.decrypt(incoming(A, "m2", "pkmsg", payloads[B], 2)).body == b"second"
    # a corrupted payload is an event, not an exception; the session is dropped
    _, payloads = alice.encrypt([B], alice.seal("text", b"third"))
    bad = payloads[B][:-4] + bytes(4)
    failed = bob2.decrypt(incoming(A, "m3", "pkmsg", bad, 3))
    assert type(failed) is DecryptionFailed and failed.id == "m3"
    assert bob2.device.has_session(A)  # a failed decryption leaves the session as it was
    # the retry receipt makes Alice open a new session from a newly fetched key;
    # the resend, under a new id, names the original; a second copy of it is dropped
    alice.device.forget(B)
    ((_, otk),) = bob2.device.new_one_time_keys(1)
    bob2.device.mark_published()
    alice.device.start_session(B, bob2.device.curve25519, otk)
    sealed = alice.seal("text", b"third", resend_of="m3")
    _, payloads = alice.encrypt([B], sealed)
    ev = bob2.decrypt(incoming(A, "m4", "pkmsg", payloads[B], 4))
    assert (ev.body, ev.resend_of) == (b"third", "m3")
    _, payloads = alice.encrypt([B], sealed)
    assert bob2.decrypt(incoming(A, "m5", "pkmsg", payloads[B], 5)) is None


def test_secure_state_notices_changed_keys():
    from pigeon.client.secure import SafetyNumberChanged, SecureState

    user = "4915112345678"
    state = SecureState()
    p1, comp = new_identity(), new_identity()
    items = (DeviceInfo(f"{user}:0", 1, p1.public),
             DeviceInfo(f"{user}:1", 2, comp.public, "pc", p1.sign_link(user, comp.public)))  # fmt: skip
    assert state.note_devices(user, items) == ((f"{user}:0", f"{user}:1"), None)
    assert state.note_devices(user, items)[1] is None
    p2 = new_identity()  # re-registered: a new primary; the old companion's link no longer verifies
    items2 = (DeviceInfo(f"{user}:2", 3, p2.public), items[1])
    devices, change = state.note_devices(user, items2)
    assert devices == (f"{user}:2",)
    assert change == SafetyNumberChanged(user, (), True)
