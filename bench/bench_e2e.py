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
