"""What this side sends is checked when it is sent (h11's rule), both codecs.

Every event class has a ``check`` with its ``from_node``'s rules, run by
``Connection.send``/``send_into`` for events the application built: a bad
field is a LocalProtocolError naming the event and the field, and nothing is
written.  Events ``from_node`` built are not checked again.  The rules are the
reader's: for any event of well-typed fields, ``check`` passes exactly when
the peer reads the same event back.  The SDK refuses such an event before it
waits for an answer or keeps it for a replay.
"""

import asyncio
import dataclasses
import os
import random
import signal

import pytest
from serverutil import Server, until
from test_connection import ALICE, ALICE_DEV, BOB, SAMPLES, pair

from pigeon.core.connection import TRANSITIONS, State
from pigeon.core.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from pigeon.core.events import (
    ACK_CLASSES,
    CHAT_STATES,
    CLIENT_SENT,
    DISCOVER_TYPES,
    MAX_UINT64,
    PRESENCE_REQUESTS,
    PRIVACY_VALUES,
    RECEIPT_TYPES,
    SCRAM_MECHANISM,
    SERVER_SENT,
    AuthChallenge,
    AuthResponse,
    AuthStart,
    AuthSuccess,
    Block,
    Blocklist,
    BlocklistQuery,
    ChatState,
    CodeSent,
    ConnectionClosed,
    DeleteAccount,
    DeviceAck,
    DeviceInfo,
    DeviceList,
    DeviceLists,
    DevicesBatchQuery,
    DevicesChanged,
    DevicesQuery,
    Discover,
    DiscoverResult,
    Error,
    Event,
    GroupMember,
    GroupNotice,
    GroupRequest,
    GroupResult,
    Hello,
    IncomingChatState,
    IncomingMessage,
    IncomingReceipt,
    KeyBundle,
    KeyBundles,
    KeysChanged,
    KeysCount,
    KeysCountQuery,
    KeysLow,
    KeysQuery,
    KeysUpload,
    Link,
    LinkKey,
    Logout,
    Message,
    Pair,
    PairCode,
    Ping,
    Pong,
    Presence,
    PresenceUpdate,
    Privacy,
    PrivacySettings,
    PushTarget,
    Receipt,
    Register,
    Registered,
    ServerAck,
    SignedKey,
    Unblock,
    Unlink,
    UploadGrant,
    UploadRequest,
    Verify,
)

# (DevicesChanged shares the server's tag ``devices`` with DeviceList, whose reader
# hands a notice over: SERVER_SENT names DeviceList only)
# (likewise ``keys``: KeysUpload and KeysCount read the others of their direction)
SENT = sorted(
    set(CLIENT_SENT.values())
    | set(SERVER_SENT.values())
    | {
        DevicesChanged,
        DevicesBatchQuery,
        DeviceLists,
        KeysQuery,
        KeysCountQuery,
        KeyBundles,
        KeysLow,
        KeysChanged,
        GroupNotice,
    },
    key=lambda c: c.__name__,
)


def sender(impl, cls):
    """A connection of the role that sends ``cls``, in a state that allows it."""
    client, server = pair(impl)
    conn = client if cls.SENDER in ("client", "both") else server
    if cls is not Error:
        conn.state = next(st for (st, ev) in TRANSITIONS if ev is cls)
    return conn


def test_every_event_class_has_its_own_check():
    for cls in [*SENT, Hello, ConnectionClosed]:
        assert cls.check is not Event.check, cls


# (event, the field its error must name): every class sent, every kind of rule
BAD = [
    (Register("", ALICE), "id"),
    (Register("r1", "+491701234567"), "phone"),
    (Register("r1", ALICE, "fax"), "method"),
    (CodeSent("r1", -1), "ttl"),
    (CodeSent("r1", "300"), "ttl"),
    (CodeSent("r1", True), "ttl"),
    (Verify("r2", ALICE, "12345", b"k" * 32), "code"),
    (Verify("r2", ALICE, 123456, b"k" * 32), "code"),
    (Verify("r2", ALICE, "123456", b"k" * 31), "identity_key"),
    (Registered("r2", ALICE, b"s" * 32), "device"),
    (Registered("r2", ALICE_DEV, "s" * 32), "secret"),
    (AuthStart(b"x" * 1025), "data"),
    (AuthStart(b"n,,n=x,r=y", "PLAIN"), "mechanism"),
    (AuthChallenge("r=abc"), "data"),
    (AuthResponse(b"x" * 1025), "data"),
    (AuthSuccess(b"v=x", -1), "t"),
    (Message("12345", "m1", "text", b"x"), "to"),
    (Message(ALICE_DEV, "m1", "text", b"", ((ALICE + ":1", b"x"),)), "to"),
    (Message(BOB, "m1", "text", b"x", ((BOB + ":1", b"x"),)), "body"),
    (Message(BOB, "m1", "text", b"", [(BOB + ":1", b"x")]), "payloads"),
    (Message(BOB, "m1", "text", b"", ((BOB, b"x"),)), "payloads[0][0]"),
    (Message(BOB, "m1", "text", b"", ((BOB + ":1", "x"),)), "payloads[0][1]"),
    (Message(BOB, "m1", "text", b"", ((BOB + ":1", b"x"), (BOB + ":1", b"y"))), "payloads[1][0]"),
    (DevicesChanged(ALICE_DEV, 1, 1), "sender"),
    (DevicesChanged(ALICE, -1, 1), "t"),
    (DevicesChanged(ALICE, 1, "1"), "seq"),
    (IncomingMessage(ALICE_DEV, "m1", "text", 1, 1, b"x", "g:1"), "to"),
    (IncomingReceipt(BOB, "m1", "read", 1, 1, ALICE_DEV), "to"),
    (Error(ErrorCode.STALE_DEVICES, "x", "m1", (BOB,)), "missing[0]"),
    (Error(ErrorCode.STALE_DEVICES, "x", "m1", (), "g:1"), "extra"),
    (Message(491701234567, "m1", "text", b"x"), "to"),
    (Message(BOB, "x y", "text", b"x"), "id"),
    (Message(BOB, "m1", "a" * 65, b"x"), "type"),
    (Message(BOB, "m1", "text", "hello"), "body"),
    (IncomingMessage(ALICE, "m1", "text", 1, 1, b"x"), "sender"),
    (IncomingMessage(ALICE_DEV, "m1", 5, 1, 1, b"x"), "type"),
    (IncomingMessage(ALICE_DEV, "m1", "text", 1.5, 1, b"x"), "t"),
    (IncomingMessage(ALICE_DEV, "m1", "text", 1, MAX_UINT64 + 1, b"x"), "seq"),
    (ServerAck("", 1), "id"),
    (ServerAck("m1", -1), "t"),
    (ServerAck("m1", True), "t"),
    (ServerAck("m1", 1, "nope"), "cls"),
    (ServerAck("m1", 1, ["message"]), "cls"),
    (DeviceAck(-1), "seq"),
    (DeviceAck(None), "seq"),
    (Receipt(ALICE, "m1", "delivered"), "type"),
    (Receipt("g:1", "m1", "read"), "to"),
    (IncomingReceipt(ALICE_DEV, "m1", "read", 1, 1), "sender"),
    (IncomingReceipt(BOB, "m1", "seen", 1, 1), "type"),
    (IncomingReceipt(BOB, "m1", "read", 1, "7"), "seq"),
    (Presence("away"), "type"),
    (Presence("subscribe"), "to"),
    (Presence("available", BOB), "to"),
    (PresenceUpdate(BOB, "subscribe"), "type"),
    (PresenceUpdate(BOB, "available", -5), "last"),
    (ChatState(BOB, "typing"), "type"),
    (IncomingChatState(ALICE_DEV, "paused"), "sender"),
    (Privacy("p1", last="friends"), "last"),
    (Privacy("p1", online=True), "online"),
    (PrivacySettings("p2", "nobody", None), "online"),
    (Discover("d1", "merge", ()), "type"),
    (Discover("d1", "add", (BOB, "+4917")), "phones[1]"),
    (Discover("d1", "add", BOB), "phones"),
    (DiscoverResult("d1", (ALICE_DEV,), 1), "users[0]"),
    (DiscoverResult("d1", (), -1), "limit"),
    (Block("b1", ALICE_DEV), "to"),
    (Unblock("x" * 65, BOB), "id"),
    (BlocklistQuery(""), "id"),
    (Blocklist("b3", [5]), "users[0]"),
    (Logout(None), "id"),
    (DeleteAccount("é"), "id"),
    (Error(-1, "x"), "code"),
    (Error(True, "x"), "code"),
    (Error(ErrorCode.BAD_REQUEST, None), "text"),
    (Error(ErrorCode.BAD_REQUEST, "x", ""), "id"),
    (Ping(""), "id"),
    (Pong("a b"), "id"),
    (Pair("p1", "fax", b"k" * 32), "type"),
    (Pair("p1", "qr", b"k" * 31), "identity_key"),
    (Pair("p1", "code", b"k" * 32), "phone"),
    (Pair("p1", "qr", b"k" * 32, name="a" * 65), "name"),
    (PairCode("p1", 60), "ref"),
    (PairCode("p1", 60, code="ABCD1234"), "code"),
    (Link("l1", ref="AB" * 16, key=b"k" * 32, signature=b"s" * 64), "ref"),
    (Link("l1", ref="ab" * 16), "key"),
    (Link("l1", code="ABCD2345", key=b"k" * 32, signature=b"s" * 63), "signature"),
    (LinkKey("l1", "abcd2345", b"k" * 32), "code"),
    (DevicesQuery("d1", ALICE_DEV), "user"),
    (DeviceList("d1", ALICE, (DeviceInfo(ALICE, 1, b"k" * 32),)), "items[0].device"),
    (DevicesBatchQuery("d2", ()), "users"),
    (DevicesBatchQuery("d2", (BOB, ALICE_DEV)), "users[1]"),
    (DeviceLists("d2", ((ALICE_DEV, ()),)), "lists[0][0]"),
    (DeviceLists("d2", ((ALICE, (DeviceInfo(ALICE, 1, b"k" * 32),)),)), "lists[0][1][0].device"),
    (DeviceLists("d2", (ALICE,)), "lists[0]"),
    (Unlink("u1", ALICE), "device"),
    (UploadRequest("m1", -1, bytes(32), "image"), "size"),
    (UploadRequest("m1", 10, bytes(31), "image"), "sha256"),
    (UploadRequest("m1", 10, bytes(32), "photo"), "media_class"),
    (UploadGrant("m1", "ftp://x/y", 600, b"t"), "url"),
    (UploadGrant("m1", "https://x/y", 600, bytes(1025)), "token"),
    (ServerAck("l1", 1, "link", ALICE), "device"),
    # the key directory (issue 16)
    (KeysUpload("k1", b"c" * 31, b"e" * 32), "curve25519"),
    (KeysUpload("k1", b"c" * 32, "e" * 32), "ed25519"),
    (
        KeysUpload("k1", b"c" * 32, b"e" * 32, [SignedKey("a b", b"o" * 32, b"s" * 64)]),
        "one_time_keys[0].key_id",
    ),
    (
        KeysUpload("k1", b"c" * 32, b"e" * 32, (), SignedKey("f", b"o" * 32, b"s" * 63)),
        "fallback.signature",
    ),
    (KeysQuery("k2", ()), "users"),
    (KeysQuery("k2", (ALICE_DEV,)), "users[0]"),
    (KeysCountQuery(""), "id"),
    (KeysCount("k1", -1), "count"),
    (KeyBundles("k3", (KeyBundle(ALICE),)), "bundles[0].device"),
    (KeyBundles("k3", (KeyBundle(ALICE_DEV, b"c" * 32, b"e" * 31),)), "bundles[0].ed25519"),
    (KeysLow(ALICE, 1, 1), "device"),
    (KeysChanged(ALICE_DEV, 1, 1), "sender"),
    (IncomingReceipt(BOB, "m1", "retry", 1, 1), "sender"),
    # groups (issue 17)
    (GroupRequest("g1", "explode"), "op"),
    (GroupRequest("g1", "info", BOB), "group"),
    (GroupRequest("g1", "add", "g:1", (ALICE_DEV,)), "members[0]"),
    (GroupRequest("g1", "create", subject=""), "subject"),
    (GroupRequest("g1", "join", code="short"), "code"),
    (GroupRequest("g1", "settings", "g:1", announce="1"), "announce"),
    (GroupResult("g1", "nope"), "op"),
    (GroupNotice("g:1", "add", ALICE_DEV, 1, 1), "by"),
    (GroupNotice(BOB, "add", ALICE, 1, 1), "group"),
    (IncomingMessage(ALICE_DEV, "m1", "text", 1, 1, b"x", None, BOB), "group"),
    (ServerAck("m1", 1, "message", None, (ALICE_DEV,)), "failed[0]"),
    (Privacy("p1", groupadd="friends"), "groupadd"),
    (IncomingReceipt("g:1", "m1", "delivered", 1, 1, None, (ALICE_DEV,)), "members[0]"),
    (IncomingReceipt(BOB, "m1", "delivered", 1, 1, None, (ALICE,)), "sender"),
    (Receipt("g:1", "m1", "read", ALICE_DEV), "participant"),
    (Receipt(BOB, "m1", "read", ALICE), "to"),
    # push targets (issue 19)
    (PushTarget("w1", "set", "sms", b"t"), "kind"),
    (PushTarget("w1", "set", "fcm", b""), "token"),
    (PushTarget("w1", "set", "fcm", b"t", -1), "mute"),
    (PushTarget("w1", "set", "fcm", b"t", quiet="1"), "quiet"),
    (PushTarget("w1", "add", "fcm", b"t"), "type"),
    (PushTarget("w1", "remove", "fcm"), "kind"),
]


def test_the_bad_table_covers_every_class():
    assert {type(ev) for ev, _ in BAD} == set(SENT)


@pytest.mark.parametrize(("event", "field"), BAD, ids=[f"{type(e).__name__}-{f}" for e, f in BAD])
def test_a_bad_field_is_a_local_error_and_writes_nothing(impl, event, field):
    conn = sender(impl, type(event))
    state = conn.state
    out = bytearray(b"frames before")
    with pytest.raises(LocalProtocolError) as info:
        conn.send_into(out, event)
    assert info.value.text.startswith(f"cannot send {type(event).__name__}: {field!r} must be ")
    assert out == b"frames before" and conn.state is state
    with pytest.raises(LocalProtocolError):
        conn.send(event)
    conn.send(SAMPLE[type(event)])  # the state did not move: a good event still goes


#: a good event of each class sent
SAMPLE = {type(ev): ev for ev in reversed(SAMPLES)} | {
    Logout: Logout("l1"),
    DeleteAccount: DeleteAccount("x1"),
}

# good events whose fields are not of the exact type the reader builds
ALSO_GOOD = [
    Message(BOB, "m1", "text", bytearray(b"body")),
    Message(BOB, "m1", "text", memoryview(b"body")),
    IncomingMessage(ALICE_DEV, "m1", "", 1, 0, b""),
    Discover("d1", "add", [BOB]),
    Blocklist("b3", []),
    Error(ErrorCode.QUEUE_FULL, "full", "m1"),
    Error(999, ""),
    ServerAck("m" * 64, MAX_UINT64, "unblock"),
]


@pytest.mark.parametrize(
    "event", [*SAMPLE.values(), *SAMPLES, *ALSO_GOOD], ids=lambda e: type(e).__name__
)
def test_good_events_encode_as_before(impl, event):
    """Byte for byte what the codec makes of the event's node, as before the checks."""
    conn = sender(impl, type(event))
    out = bytearray(b"frames before")
    conn.send_into(out, event)
    want = impl.Codec(conn.dictionary).encode_frame(event.to_node(impl.Node))
    assert out == b"frames before" + want


class CountedError(Error):
    """Error (which every state may send) that counts its checks."""

    checks = 0

    def check(self) -> None:
        CountedError.checks += 1
        super().check()


def test_a_parsed_event_is_not_checked_again(impl):
    client, server = pair(impl)
    node = impl.Codec(client.dictionary).decode(
        client.send(Error(ErrorCode.TOO_FAST, "slow down", "m1"))[3:]
    )
    CountedError.checks = 0
    parsed = CountedError.from_node(node)
    assert CountedError.checks == 0 and parsed._parsed
    frame = server.send(parsed)
    for _ in range(3):
        assert server.send(parsed) == frame  # sent on, as often as wanted: never checked
    assert CountedError.checks == 0
    built = CountedError(ErrorCode.TOO_FAST, "slow down", "m1")
    assert built == parsed and not built._parsed
    assert server.send(built) == frame and CountedError.checks == 1
    # a copy with a field changed is a new event: checked like any other
    with pytest.raises(LocalProtocolError, match="'id'"):
        server.send(dataclasses.replace(parsed, id="not an id"))
    assert CountedError.checks == 2


def test_an_event_the_connection_read_is_sent_on_unchecked(impl):
    """Through the real receive path: the server reads a ping and sends that same
    event back.  Its fields are trusted (the reader checked them), so even one
    changed behind the frozen dataclass's back is not looked at again, while a
    new event with that field is refused."""
    client, server = pair(impl)
    server.receive_data(client.send(Ping("p1")))
    ping = server.next_event()
    assert ping == Ping("p1") and ping._parsed
    object.__setattr__(ping, "id", "")
    assert server.send(ping) == impl.Codec(server.dictionary).encode_frame(
        impl.Node("ping", {"id": ""})
    )
    with pytest.raises(LocalProtocolError, match="cannot send Ping: 'id'"):
        server.send(Ping(""))


# -- the rules are the reader's -----------------------------------------------------

WORDS = sorted(
    ACK_CLASSES | RECEIPT_TYPES | PRESENCE_REQUESTS | CHAT_STATES | PRIVACY_VALUES
    | DISCOVER_TYPES | {"sms", "voice", "fax", "account", SCRAM_MECHANISM, "PLAIN"}
)  # fmt: skip
STRS = WORDS + [ALICE, BOB, ALICE_DEV, BOB + ":255", ALICE + ":256", ALICE + ":01", "g:5", "g:",
                "g:" + "1" * 21, "0123456789", "+491701234567", "m1", "", "a" * 64, "a" * 65,
                "x y", "é", "123456", "12345", "12345a", "ab" * 16, "AB" * 16, "ABCD2345",
                "abcd2345", "ABCD-2345", "ABCD1234", "qr", "code"]  # fmt: skip
INTS = [0, 1, 42, 255, 256, MAX_UINT64, MAX_UINT64 + 1, -1]
BYTES = [b"", b"x", b"k" * 32, b"k" * 33, b"k" * 1024, b"k" * 1025]
TUPLES = [(), (BOB,), (BOB, "447700900123"), ("+4917",), (ALICE_DEV,), ("g:5",), (BOB, "")]
INFOS = [(), (DeviceInfo(ALICE_DEV, 1, b"k" * 32),), (DeviceInfo(ALICE, 1, b"k" * 32),),
         (DeviceInfo(ALICE_DEV, 1, b"k" * 31),), (DeviceInfo(ALICE_DEV, -1, b"k" * 32),),
         (DeviceInfo(ALICE_DEV, 1, b"k" * 32, "x y", b"s" * 64),),
         (DeviceInfo(ALICE_DEV, 1, b"k" * 32, "", b"s" * 63),)]  # fmt: skip
PAYLOADS = [(), ((BOB + ":0", b"x"),), ((ALICE_DEV, b""), (BOB + ":1", b"k" * 33)),
            ((BOB, b"x"),), ((BOB + ":0", b"x"), (BOB + ":0", b"y"))]  # fmt: skip
_SK = SignedKey("AAAAAAAAAAA", b"o" * 32, b"s" * 64)
SKEYS = [_SK, SignedKey("AAAAAAAAAAE", b"f" * 32, b"t" * 64, True), SignedKey("a b", b"o" * 32, b"s" * 64),
         SignedKey("x", b"o" * 31, b"s" * 64), SignedKey("x", b"o" * 32, b"s" * 65)]  # fmt: skip
BUNDLES = [(), (KeyBundle(ALICE_DEV),), (KeyBundle(ALICE),), (KeyBundle(ALICE_DEV, b"c" * 32),),
           (KeyBundle(ALICE_DEV, b"c" * 32, b"e" * 32, SKEYS[1]),),
           (KeyBundle(ALICE_DEV, None, None, _SK),), (KeyBundle(ALICE_DEV, b"c" * 31, b"e" * 32),),
           (KeyBundle(ALICE_DEV, b"c" * 32, b"e" * 32, SKEYS[3]),)]  # fmt: skip
LISTS = [(), ((ALICE, ()),), ((ALICE, INFOS[1]),), ((ALICE_DEV, ()),), ((ALICE, INFOS[2]),),
         ((BOB, INFOS[1]), (ALICE, ())), ((BOB, INFOS[3]),)]  # fmt: skip
GATTRS = [
    (),
    (("subject", "x"),),
    (("subject", "x"), ("t", "5")),
    (("t", "5"), ("subject", "x")),
    (("bogus", "x"),),
    (("announce", "1"),),
]
GMEMBERS = [
    (),
    (GroupMember(BOB, "admin", 1),),
    (GroupMember(ALICE_DEV),),
    (GroupMember(BOB, None, -1),),
    (GroupMember(BOB), GroupMember(ALICE, "member")),
]
GFAILED = [(), ((BOB, 433),), ((ALICE_DEV, 433),), ((BOB, -1),)]
GITEMS = [(), (("g:5", "x", 1),), ((BOB, "x", 1),), (("g:5", "x", -1),)]
POOLS = {"str": STRS, "int": INTS, "bytes": BYTES, "bool": [True, False, 0, 1, "1"],
         "tuple[tuple[str, str], ...]": GATTRS, "tuple[GroupMember, ...]": GMEMBERS,
         "tuple[tuple[str, int], ...]": GFAILED, "tuple[tuple[str, str, int], ...]": GITEMS,
         "tuple[str, ...]": TUPLES, "tuple": PAYLOADS,
         "tuple[DeviceInfo, ...]": INFOS, "tuple[SignedKey, ...]": [(), *[(k,) for k in SKEYS]],
         "SignedKey": SKEYS, "tuple[KeyBundle, ...]": BUNDLES,
         "tuple[tuple[str, tuple[DeviceInfo, ...]], ...]": LISTS}  # fmt: skip


def pool(annotation: str) -> list:
    if annotation.endswith(" | None"):
        return POOLS[annotation[: -len(" | None")]] + [None]
    return POOLS[annotation]


@pytest.mark.parametrize("cls", SENT, ids=lambda c: c.__name__)
def test_check_passes_exactly_when_the_peer_reads_the_same_event(impl, cls):
    """Random events of well-typed fields (each field either the sample's good value
    or one from a pool of near misses): check() passes if and only if the peer's
    from_node reads back an equal event; never stricter, never laxer."""
    rng = random.Random(cls.__name__)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    good = SAMPLE[cls]
    reader = (CLIENT_SENT if cls.SENDER in ("client", "both") else SERVER_SENT)[cls.TAG]
    codec = impl.Codec()
    seen = {True: 0, False: 0}
    for _ in range(400):
        values = {
            f.name: getattr(good, f.name) if rng.random() < 0.5 else rng.choice(pool(f.type))
            for f in fields
        }
        event = cls(**values)
        try:
            event.check()
            ok = True
        except LocalProtocolError:
            ok = False
        try:
            back = reader.from_node(codec.decode(codec.encode(event.to_node(impl.Node))))
            same = back == event
        except RemoteProtocolError:
            same = False
        assert ok == same, event
        seen[ok] += 1
    assert seen[True] and seen[False], seen


def test_check_accepts_every_sample_and_what_the_reader_built(impl):
    codec = impl.Codec()
    for event in SAMPLES:
        event.check()
        reader = (CLIENT_SENT if event.SENDER in ("client", "both") else SERVER_SENT)[event.TAG]
        reader.from_node(codec.decode(codec.encode(event.to_node(impl.Node)))).check()


def test_the_state_is_checked_before_the_fields(impl):
    client, _ = pair(impl)
    assert client.state is State.UNAUTHENTICATED
    with pytest.raises(LocalProtocolError, match="cannot send Message in state"):
        client.send(Message(ALICE_DEV, "m1", "text", b"x"))


# -- the SDK ------------------------------------------------------------------------


def test_the_sdk_refuses_a_bad_message_at_once_and_never_replays_it(tmp_path):
    """A bad field raises LocalProtocolError from send() itself, while connected and
    while reconnecting, and leaves nothing waiting: the replay after the next login
    goes through and the client carries on."""
    srv = Server(tmp_path / "data", workers=1).start()
    try:

        async def main():
            alice_creds = await srv.register(ALICE)
            await srv.register(BOB)
            lost = asyncio.Event()
            alice = await srv.login(
                alice_creds, reconnect=True, on_disconnect=lambda why: lost.set()
            )
            for to, body, typ in (("12345", b"x", "text"), (BOB, "text", "text"),
                                  (BOB, b"x", "x y")):  # fmt: skip
                with pytest.raises(LocalProtocolError, match="cannot send Message"):
                    await alice.send(to, body, type=typ)
            with pytest.raises(LocalProtocolError, match="cannot send Receipt"):
                await alice.receipt("g:1", "m1")
            await alice.ping()  # nothing was sent: the connection goes on
            os.kill(srv.worker_pid(0), signal.SIGKILL)
            await asyncio.wait_for(lost.wait(), 20)
            with pytest.raises(LocalProtocolError, match="cannot send Message"):
                await alice.send("12345", b"while reconnecting")
            with pytest.raises(LocalProtocolError, match="cannot send Receipt"):
                await alice.receipt(BOB, "m1", "delivered")
            ack = await alice.send(BOB, b"after", timeout=30)  # waits for the re-login
            assert isinstance(ack, ServerAck) and alice.reconnects >= 1
            await until(lambda: alice.closed is None and alice.reconnects >= 1)
            await alice.ping()
            await alice.close()

        asyncio.run(asyncio.wait_for(main(), 90))
    finally:
        assert srv.stop() == 0, srv.log_text()[-3000:]
