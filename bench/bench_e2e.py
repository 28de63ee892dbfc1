"""End-to-end encryption cost on the device (client/e2e.py, vodozemac Olm).

What the SDK adds per message and per new session, measured without a
server (the server routes the ciphertext as opaque bytes, so its cost per
message does not change).  The subject is the typical 100-byte text: one
encrypt on the sender and one decrypt on the receiver of a normal Olm
message in an established session (the ratchet advancing both ways, as in
a conversation), the pre-key start of a session, and a safety number.
``extra_info`` records the payload size.

    .venv/bin/python -m pytest bench/bench_e2e.py --benchmark-enable
"""

import itertools

import pytest

from pigeon.client import e2e

A, B = "4915112345678:0", "491701234567:0"
TEXT = b"x" * 100

pytestmark = pytest.mark.benchmark(min_time=0.001, max_time=2.0)


def established():
    alice, bob = e2e.OlmDevice(), e2e.OlmDevice()
    ((_, otk),) = bob.new_one_time_keys(1)
    bob.mark_published()
    alice.start_session(B, bob.curve25519, otk)
    assert bob.decrypt(A, alice.encrypt(B, b"hi")) == b"hi"
    assert alice.decrypt(B, bob.encrypt(A, b"hi")) == b"hi"
    return alice, bob


def test_encrypt_decrypt_message(benchmark):
    """One 100-byte message: Alice encrypts, Bob decrypts (normal Olm message)."""
    alice, bob = established()

    def one():
        payload = alice.encrypt(B, TEXT)
        return payload, bob.decrypt(A, payload)

    payload, plain = benchmark(one)
    assert plain == TEXT and payload[0] == e2e.NORMAL
    benchmark.extra_info["payload_bytes"] = len(payload)


def test_conversation_turn(benchmark):
    """A message each way, so each one advances the Diffie-Hellman ratchet."""
    alice, bob = established()

    def turn():
        assert bob.decrypt(A, alice.encrypt(B, TEXT)) == TEXT
        assert alice.decrypt(B, bob.encrypt(A, TEXT)) == TEXT

    benchmark(turn)


def test_session_start(benchmark):
    """A new session: the sender's outbound session from a fetched key bundle, the
    first (pre-key) message, and the receiver's inbound session from it."""
    bob = e2e.OlmDevice()
    keys = iter([])
    senders = itertools.count()

    def start():
        nonlocal keys
        otk = next(keys, None)
        if otk is None:  # a fresh batch, as a device tops up (not timed apart)
            bob.mark_published()
            keys = iter([k for _, k in bob.new_one_time_keys(50)])
            otk = next(keys)
        alice = e2e.OlmDevice()
        alice.start_session(B, bob.curve25519, otk)
        payload = alice.encrypt(B, TEXT)
        return payload, bob.decrypt(f"4915100000000:{next(senders)}", payload)

    payload, plain = benchmark(start)
    assert plain == TEXT and payload[0] == e2e.PRE_KEY
    benchmark.extra_info["payload_bytes"] = len(payload)


def test_safety_number(benchmark):
    ka, kb = e2e.OlmDevice().ed25519, e2e.OlmDevice().ed25519
    n = benchmark(e2e.safety_number, "4915112345678", ka, "491701234567", kb)
    assert len(n) == 60


# -- with a server: the key-bundle fetch ---------------------------------------------------


@pytest.fixture(scope="module")
def keyed_pair(tmp_path_factory):
    """A real 1-worker server on loopback (tests/serverutil.py) and two encrypting
    clients: alice fetches, bob has published his keys (50 one-time keys)."""
    import asyncio
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from serverutil import Server

    from pigeon.client import Client

    tmp = tmp_path_factory.mktemp("bench-e2e")
    srv = Server(tmp / "data", workers=1, keys_fetch_per_account=100000, keys_per_device=0,
                 message_rate=0).start()  # fmt: skip
    loop = asyncio.new_event_loop()

    async def device(phone):
        c = await Client.connect("127.0.0.1", srv.port, plaintext=False, profile=tmp / phone)
        await c.register(phone)
        await c.login(await c.verify(phone, srv.code_for(phone)))
        return c

    alice = loop.run_until_complete(device("4915100000001"))
    bob = loop.run_until_complete(device("4915100000002"))
    yield loop, alice, bob
    for c in (alice, bob):
        loop.run_until_complete(c.close())
    loop.close()
    assert srv.stop() == 0


def test_key_bundle_fetch(benchmark, keyed_pair):
    """``fetch_keys`` of a one-device user over loopback (one one-time key consumed in
    the worker's commit), the signature check and the outbound session from it; 40
    rounds, so every one is a one-time key, not the fallback."""
    loop, alice, bob = keyed_pair
    user = bob.device.partition(":")[0]
    olm = alice.secure.device

    def fetch():
        (bundle,) = loop.run_until_complete(alice.fetch_keys(user))
        otk = bundle.one_time_key
        msg = e2e_signed(bundle.device, otk)
        assert e2e.verify_signature(bundle.ed25519, otk.signature, msg)
        olm.forget(bundle.device)
        olm.start_session(bundle.device, bundle.curve25519, otk.key)
        return otk

    otk = benchmark.pedantic(fetch, rounds=40, iterations=1)
    assert not otk.fallback


def e2e_signed(device, otk):
    from pigeon.core.events import signed_key_message

    return signed_key_message(device, otk.key_id, otk.key, otk.fallback)
