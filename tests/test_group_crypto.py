"""Group encryption on its own (client/group_crypto.py): real vodozemac Megolm and
Olm sessions, no server (tests/test_groups_sdk.py runs it over one)."""

from __future__ import annotations

import msgpack
import pytest

from pigeon.client import e2e
from pigeon.client.group_crypto import (
    INBOUND_KEPT,
    SEEN_INDEXES,
    GroupCrypto,
    GroupDecryptError,
    UnknownSession,
)

G = "g:1"
A, A2, B, C = "4915112345678:0", "4915112345678:1", "491701234567:0", "491709999999:0"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def devices(*names, **kw):
    """A GroupCrypto per device address, each sender with an Olm session to every other."""
    clock = kw.pop("clock", None) or Clock()
    olm = {n: e2e.OlmDevice() for n in names}
    for s in names:
        for r in names:
            if s != r:
                ((_, otk),) = olm[r].new_one_time_keys(1)
                olm[r].mark_published()
                olm[s].start_session(r, olm[r].curve25519, otk)
    return {n: GroupCrypto(olm[n], clock=clock, **kw) for n in names}, clock


def deliver(sealed, sender, receivers, mid="m1"):
    """What the server hands each receiver: its key share (if any) before the body."""
    out = {}
    for name, gc in receivers.items():
        if name in sealed.payloads:
            gc.receive_key(sealed.group, sender, sealed.payloads[name])
        out[name] = gc.decrypt(sealed.group, sender, sealed.body, mid)
    return out


def test_one_body_for_every_member_key_shares_only_the_first_time():
    gcs, _ = devices(A, B, C)
    a = gcs[A]
    first = a.seal(G, [B, C], b"hello group")
    assert set(first.payloads) == {B, C} and first.rotated
    assert b"hello group" not in first.body
    assert all(p[0] == e2e.PRE_KEY for p in first.payloads.values())  # new Olm sessions
    a.commit(first)
    assert deliver(first, A, {B: gcs[B], C: gcs[C]}) == {B: b"hello group", C: b"hello group"}
    second = a.seal(G, [B, C], b"again")
    assert second.payloads == {} and not second.rotated
    assert second.session_id == first.session_id
    a.commit(second)
    assert deliver(second, A, {B: gcs[B], C: gcs[C]}, "m2") == {B: b"again", C: b"again"}
    # the size of the body does not depend on the number of members
    assert len(second.body) == len(a.seal(G, [B], b"again").body)


def test_unacknowledged_share_is_sent_again():
    gcs, _ = devices(A, B)
    first = gcs[A].seal(G, [B], b"lost in transit")  # not committed: the send failed
    second = gcs[A].seal(G, [B], b"retry")
    assert set(second.payloads) == {B}
    gcs[A].commit(second)
    assert deliver(second, A, {B: gcs[B]}, "m2") == {B: b"retry"}
    # the first share also opens the session (an older index of the same session)
    gcs[B].receive_key(G, A, first.payloads[B])
    assert gcs[B].decrypt(G, A, first.body, "m1") == b"lost in transit"


def test_a_share_to_a_full_queue_is_sent_again():
    gcs, _ = devices(A, B, C)
    s1 = gcs[A].seal(G, [B, C], b"one")
    gcs[A].commit(s1, failed_users=[C.partition(":")[0]])  # the ack: C's queue was full
    assert deliver(s1, A, {B: gcs[B]}) == {B: b"one"}
    s2 = gcs[A].seal(G, [B, C], b"two")
    assert set(s2.payloads) == {C} and s2.session_id == s1.session_id
    gcs[A].commit(s2)
    assert deliver(s2, A, {B: gcs[B], C: gcs[C]}, "m2")[C] == b"two"


def test_removed_member_cannot_read_after_the_rotation():
    gcs, _ = devices(A, B, C)
    s1 = gcs[A].seal(G, [B, C], b"before")
    gcs[A].commit(s1)
    deliver(s1, A, {B: gcs[B], C: gcs[C]})
    # C removed: the recipients shrink, so the session rotates and only B gets the key
    assert gcs[A].needs_key(G, [B]) == [B]
    s2 = gcs[A].seal(G, [B], b"after removal")
    assert s2.rotated and s2.session_id != s1.session_id and set(s2.payloads) == {B}
    gcs[A].commit(s2)
    assert deliver(s2, A, {B: gcs[B]}, "m2") == {B: b"after removal"}
    with pytest.raises(UnknownSession):  # C has the old key, not the new one
        gcs[C].decrypt(G, A, s2.body, "m2")
    # even B's key share, had it been handed to C, is encrypted for B's Olm session only
    with pytest.raises(e2e.DecryptError):
        gcs[C].receive_key(G, A, s2.payloads[B])


def test_new_member_reads_from_its_join_not_the_history():
    gcs, _ = devices(A, B, C)
    s1 = gcs[A].seal(G, [B], b"history")
    gcs[A].commit(s1)
    deliver(s1, A, {B: gcs[B]})
    s2 = gcs[A].seal(G, [B, C], b"welcome")  # C added: no rotation, a share for C
    assert not s2.rotated and set(s2.payloads) == {C}
    gcs[A].commit(s2)
    assert deliver(s2, A, {B: gcs[B], C: gcs[C]}, "m2") == {B: b"welcome", C: b"welcome"}
    with pytest.raises(GroupDecryptError, match="unknown message index"):
        gcs[C].decrypt(G, A, s1.body, "m1")


def test_rotation_after_n_messages_and_after_time_and_on_demand():
    clock = Clock()
    gcs, _ = devices(A, B, rotate_messages=3, rotate_seconds=60, clock=clock)
    a, b = gcs[A], gcs[B]
    sids = []
    for i in range(7):
        s = a.seal(G, [B], b"%d" % i)
        a.commit(s)
        assert deliver(s, A, {B: b}, f"m{i}") == {B: b"%d" % i}
        sids.append(s.session_id)
    assert [len(set(sids[:k])) for k in (3, 4, 6, 7)] == [1, 2, 2, 3]  # every 3 messages
    clock.now += 61
    s = a.seal(G, [B], b"later")
    assert s.rotated and set(s.payloads) == {B}
    a.commit(s)
    a.rotate(G)  # a membership notice
    s2 = a.seal(G, [B], b"changed")
    assert s2.rotated and s2.session_id != s.session_id
    a.commit(s2)
    assert deliver(s2, A, {B: b}, "mx") == {B: b"changed"}
    assert a.seal(G, [B], b"x").payloads == {}
    with pytest.raises(ValueError):
        GroupCrypto(e2e.OlmDevice(), rotate_messages=0)


def test_a_member_cannot_pass_a_message_off_as_another_members():
    gcs, _ = devices(A, B, C)
    s = gcs[A].seal(G, [B, C], b"from A")
    gcs[A].commit(s)
    deliver(s, A, {B: gcs[B], C: gcs[C]})
    # the server (or C) relabels A's body as C's: B has no such session from C
    with pytest.raises(UnknownSession):
        gcs[B].decrypt(G, C, s.body, "m9")
    # C shares A's session key as its own: C still cannot sign under it
    inbound = next(iter(gcs[C].inbound[(G, A)].values())).session
    stolen = msgpack.packb(["gkey", G, e2e._b64d(inbound.export_at(0).to_base64())],
                           use_bin_type=True)  # fmt: skip
    with pytest.raises(GroupDecryptError):  # an exported key is not a signed session key
        gcs[B].receive_key(G, C, gcs[C].olm.encrypt(B, stolen))
    # a body under another group's session does not decrypt in this group
    with pytest.raises(UnknownSession):
        gcs[B].decrypt("g:2", A, s.body, "m1")


def test_corrupted_replayed_and_foreign_input_are_errors():
    gcs, _ = devices(A, B)
    s = gcs[A].seal(G, [B], b"text")
    gcs[A].commit(s)
    assert deliver(s, A, {B: gcs[B]}, "m1") == {B: b"text"}
    assert gcs[B].decrypt(G, A, s.body, "m1") == b"text"  # a redelivery of the same id
    with pytest.raises(GroupDecryptError, match="replayed"):
        gcs[B].decrypt(G, A, s.body, "m-other")
    bad = bytearray(gcs[A].seal(G, [B], b"two").body)
    bad[-10] ^= 1
    with pytest.raises(GroupDecryptError):
        gcs[B].decrypt(G, A, bytes(bad), "m2")
    for junk in (b"", b"\x01", b"\x02" + bytes(40), b"\x01" + bytes(32) + b"\x03"):
        with pytest.raises(GroupDecryptError):
            gcs[B].decrypt(G, A, junk, "m3")
    # key shares: not an Olm payload, a 1:1 envelope instead of a share, another group
    with pytest.raises(e2e.DecryptError):
        gcs[B].receive_key(G, A, b"\x01junk")
    envelope = msgpack.packb(["text", b"hi"], use_bin_type=True)
    with pytest.raises(GroupDecryptError, match="not a group key share"):
        gcs[B].receive_key(G, A, gcs[A].olm.encrypt(B, envelope))
    other = gcs[A].seal("g:2", [B], b"elsewhere")
    with pytest.raises(GroupDecryptError, match="g:2"):
        gcs[B].receive_key(G, A, other.payloads[B])
    bad_key = msgpack.packb(["gkey", G, b"\x02" + bytes(10)], use_bin_type=True)
    with pytest.raises(GroupDecryptError):
        gcs[B].receive_key(G, A, gcs[A].olm.encrypt(B, bad_key))


def test_senders_other_devices_read_the_sent_sync_copy():
    gcs, _ = devices(A, A2, B)
    s = gcs[A].seal(G, [A2, B], b"synced")
    assert set(s.payloads) == {A2, B}
    gcs[A].commit(s)
    assert deliver(s, A, {A2: gcs[A2], B: gcs[B]}) == {A2: b"synced", B: b"synced"}
    # A2 sends with its own session: B keeps one per sender device
    s2 = gcs[A2].seal(G, [A, B], b"from the laptop")
    gcs[A2].commit(s2)
    assert deliver(s2, A2, {A: gcs[A], B: gcs[B]}, "m2") == {A: b"from the laptop",
                                                              B: b"from the laptop"}  # fmt: skip
    assert set(gcs[B].inbound) == {(G, A), (G, A2)}


def test_old_sessions_still_decrypt_late_messages_within_the_bound():
    gcs, _ = devices(A, B, rotate_messages=1)
    sealed = []
    for i in range(INBOUND_KEPT + 1):
        s = gcs[A].seal(G, [B], b"%d" % i)
        gcs[A].commit(s)
        gcs[B].receive_key(G, A, s.payloads[B])
        sealed.append(s)
    assert len({s.session_id for s in sealed}) == INBOUND_KEPT + 1
    assert gcs[B].decrypt(G, A, sealed[1].body, "m1") == b"1"  # late, still kept
    with pytest.raises(UnknownSession):  # the oldest was dropped
        gcs[B].decrypt(G, A, sealed[0].body, "m0")


def test_replay_memory_is_bounded():
    gcs, _ = devices(A, B, rotate_messages=10**9)
    a, b = gcs[A], gcs[B]
    s = a.seal(G, [B], b"0")
    a.commit(s)
    b.receive_key(G, A, s.payloads[B])
    b.decrypt(G, A, s.body, "m0")
    for i in range(1, SEEN_INDEXES + 5):
        b.decrypt(G, A, a.seal(G, [B], b"x").body, f"m{i}")
    (inbound,) = b.inbound[(G, A)].values()
    assert len(inbound.seen) == SEEN_INDEXES


def test_state_survives_a_dump_and_load():
    gcs, clock = devices(A, B, C)
    key = bytes(range(32))
    s = gcs[A].seal(G, [B, C], b"one")
    gcs[A].commit(s)
    deliver(s, A, {B: gcs[B], C: gcs[C]})
    gcs[A].rotate("g:other")  # no session there: nothing to mark
    data_a, data_b = gcs[A].dump(key), gcs[B].dump(key)
    assert "one" not in repr(data_a) and repr(gcs[A]).startswith("<GroupCrypto 1 outbound")
    a2 = GroupCrypto(gcs[A].olm, clock=clock)
    a2.load(data_a, key)
    b2 = GroupCrypto(gcs[B].olm, clock=clock)
    b2.load(data_b, key)
    s2 = a2.seal(G, [B, C], b"two")
    assert s2.session_id == s.session_id and s2.payloads == {}  # shares remembered
    assert b2.decrypt(G, A, s2.body, "m2") == b"two"
    with pytest.raises(GroupDecryptError, match="replayed"):  # the replay memory too
        b2.decrypt(G, A, s.body, "other")
    a2.rotate(G)
    a3 = GroupCrypto(gcs[A].olm, clock=clock)
    a3.load(a2.dump(key), key)
    assert a3.seal(G, [B, C], b"three").rotated
    with pytest.raises(e2e.E2EError):
        GroupCrypto(gcs[A].olm).load(data_a, bytes(32))
    a3.forget_group(G)
    assert a3.outbound == {} and all(k[0] != G for k in a3.inbound)


def test_secure_state_keeps_group_sessions_in_its_profile(tmp_path):
    """SecureState: the envelope inside Megolm, the events, and the sessions saved
    in the profile (no plaintext or key in it), continued after a reload."""
    import stat

    from pigeon.client.secure import GroupDecryptionFailed, GroupMessage, SecureState
    from pigeon.core.events import IncomingMessage

    alice, bob = SecureState(tmp_path / "a.json"), SecureState(tmp_path / "b.json")
    ((_, otk),) = bob.device.new_one_time_keys(1)
    bob.device.mark_published()
    alice.device.start_session(B, bob.device.curve25519, otk)

    def incoming(mid, sealed, seq):
        return IncomingMessage(A, mid, "skmsg", 1763830000123, seq, sealed.body, None, G)

    s1 = alice.seal_group(G, [B], "text", b"secret group words")
    alice.commit_group(s1)
    ev = bob.decrypt_group(incoming("m1", s1, 1), s1.payloads[B])
    assert ev == GroupMessage(G, A, "m1", "text", 1763830000123, 1, b"secret group words")
    for f in tmp_path.iterdir():
        assert b"secret group words" not in f.read_bytes()
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    # both reload from their profiles: no new share is needed, and bob still decrypts
    alice2, bob2 = SecureState(tmp_path / "a.json"), SecureState(tmp_path / "b.json")
    s2 = alice2.seal_group(G, [B], "text", b"after the reload")
    assert s2.payloads == {} and s2.session_id == s1.session_id
    alice2.commit_group(s2)
    assert bob2.decrypt_group(incoming("m2", s2, 2), None).body == b"after the reload"
    # a body under a session bob never got, and a corrupted one: events, not exceptions
    alice2.groups.rotate(G)
    s3 = alice2.seal_group(G, [B], "text", b"unshared")
    failed = bob2.decrypt_group(incoming("m3", s3, 3), None)
    assert type(failed) is GroupDecryptionFailed and failed.unknown_session
    bad = IncomingMessage(A, "m4", "skmsg", 1, 4, s2.body[:-3] + b"xyz", None, G)
    failed = bob2.decrypt_group(bad, None)
    assert type(failed) is GroupDecryptionFailed and not failed.unknown_session
    assert bob2.decrypt_group(incoming("m3", s3, 5), s3.payloads[B]).body == b"unshared"


def test_a_device_that_lost_the_key_gets_it_again_on_request():
    gcs, _ = devices(A, B, C)
    s1 = gcs[A].seal(G, [B, C], b"one")
    gcs[A].commit(s1)
    deliver(s1, A, {B: gcs[B], C: gcs[C]})
    gcs[C].inbound.clear()  # C lost its state
    assert not gcs[A].reshare(G, "not-the-session", C)
    assert not gcs[A].reshare(G, s1.session_id, "491700000000:0")  # never had it
    assert gcs[A].reshare(G, s1.session_id, C)
    s2 = gcs[A].seal(G, [B, C], b"two")
    assert set(s2.payloads) == {C} and s2.session_id == s1.session_id
    gcs[A].commit(s2)
    assert deliver(s2, A, {B: gcs[B], C: gcs[C]}, "m2") == {B: b"two", C: b"two"}
