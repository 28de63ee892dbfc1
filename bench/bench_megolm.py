"""Group encryption cost on the device (client/group_crypto.py, vodozemac Megolm).

A group message is encrypted once whatever the number of members (the
server stores and fans out that one body), plus one Olm-encrypted key share
per device that does not hold the sender's session key yet (a new member or
device, or every device after a rotation).  Measured without a server: the
sender's encrypt of a 100-byte text, a receiver's decrypt, the key shares of
a rotation for 32 devices, and a receiver opening a share.
``extra_info`` records the body size.

    .venv/bin/python -m pytest bench/bench_megolm.py --benchmark-enable
"""

import itertools

import pytest

from pigeon.client import e2e
from pigeon.client.group_crypto import GroupCrypto

G = "g:1"
A = "4915112345678:0"
TEXT = b"x" * 100

pytestmark = pytest.mark.benchmark(min_time=0.001, max_time=2.0)


def group(n: int):
    """Alice's GroupCrypto with an Olm session to each of ``n`` member devices."""
    alice = e2e.OlmDevice()
    members = {}
    for i in range(n):
        d = f"49170{i:07d}:0"
        olm = e2e.OlmDevice()
        ((_, otk),) = olm.new_one_time_keys(1)
        olm.mark_published()
        alice.start_session(d, olm.curve25519, otk)
        members[d] = GroupCrypto(olm)
    return GroupCrypto(alice, rotate_messages=10**9), members


def test_encrypt_one_message(benchmark):
    """Alice encrypts one 100-byte message for a group whose members hold her key."""
    alice, members = group(8)
    first = alice.seal(G, members, b"hi")
    alice.commit(first)
    sealed = benchmark(alice.seal, G, members, TEXT)
    assert sealed.payloads == {}
    benchmark.extra_info["body_bytes"] = len(sealed.body)


def test_decrypt_one_message(benchmark):
    """A member decrypts one 100-byte message (a new one each round: a new index)."""
    alice, members = group(1)
    ((d, bob),) = members.items()
    first = alice.seal(G, [d], b"hi")
    alice.commit(first)
    bob.receive_key(G, A, first.payloads[d])
    ids = itertools.count()

    def setup():  # not timed: the sender's part
        return (alice.seal(G, [d], TEXT).body, f"m{next(ids)}"), {}

    def one(body, mid):
        return bob.decrypt(G, A, body, mid)

    assert benchmark.pedantic(one, setup=setup, rounds=5000) == TEXT


def test_rotation_shares_for_32_devices(benchmark):
    """A rotation: a new session and a key share over Olm for each of 32 devices."""
    alice, members = group(32)

    def rotate_and_seal():
        alice.rotate(G)
        return alice.seal(G, members, TEXT)

    sealed = benchmark(rotate_and_seal)
    assert len(sealed.payloads) == 32
    benchmark.extra_info["share_bytes"] = len(next(iter(sealed.payloads.values())))


def test_open_a_key_share(benchmark):
    """A member opens a key share (Olm decrypt + a new inbound Megolm session)."""
    alice, members = group(1)
    ((d, bob),) = members.items()

    def setup():  # not timed: the sender's part
        alice.rotate(G)
        return (alice.seal(G, [d], TEXT).payloads[d],), {}

    benchmark.pedantic(lambda share: bob.receive_key(G, A, share), setup=setup, rounds=2000)
