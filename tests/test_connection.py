"""The sans-IO Connection, both roles, both codec implementations."""

import gc
import tracemalloc

import pytest

from pigeon.core.connection import NEED_DATA, TRANSITIONS, Connection, Role, State
from pigeon.core.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from pigeon.core.events import (
    CLIENT_SENT,
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
from pigeon.core.tokens import DICTIONARIES, LATEST_VERSION, Dictionary
from pigeon.core.wire import preamble

ALICE, BOB = "491701234567", "4915112345678"
ALICE_DEV = ALICE + ":0"

SAMPLES = [
    Register("r1", ALICE),
    CodeSent("r1", 300),
    Verify("r2", ALICE, "123456", b"k" * 32),
    Registered("r2", ALICE_DEV, b"s" * 32),
    AuthStart(b"n,,n=491701234567:0,r=abc"),
    AuthChallenge(b"r=abcdef,s=c2FsdA==,i=4096"),
    AuthResponse(b"c=biws,r=abcdef,p=cHJvb2Y="),
    AuthSuccess(b"v=c2lnbmF0dXJl", 1763830000123),
    Message(BOB, "3eb0c1f2a4d5e6f7", "text", b"\x01" * 100),
    Message("g:120363012345", "m2", "media", b""),
    IncomingMessage(ALICE_DEV, "3eb0c1f2a4d5e6f7", "text", 1763830000123, 42, b"\x01" * 100),
    ServerAck("3eb0c1f2a4d5e6f7", 1763830000123),
    ServerAck("r9", 1763830000123, "receipt"),
    DeviceAck(42),
    Receipt(ALICE, "3eb0c1f2a4d5e6f7", "read"),
    IncomingReceipt(BOB, "3eb0c1f2a4d5e6f7", "delivered", 1763830000999, 7),
    Presence("available"),
    PresenceUpdate(BOB, "unavailable", 1763830000000),
    PresenceUpdate(BOB, "available"),
    Presence("subscribe", BOB),
    Presence("unsubscribe", BOB),
    ChatState(BOB, "recording"),
    IncomingChatState(ALICE, "paused"),
    Privacy("p1"),
    Privacy("p2", last="nobody", online="contacts"),
    PrivacySettings("p2", "nobody", "contacts"),
    Discover("d1", "add", (BOB, "447700900123")),
    Discover("d2", "remove", ()),
    DiscoverResult("d1", (BOB,), 1998),
    DiscoverResult("d3", (), 0),
    Block("b1", BOB),
    Unblock("b2", BOB),
    BlocklistQuery("b3"),
    Blocklist("b3", (BOB, "447700900123")),
    ServerAck("b1", 1763830000123, "block"),
    Error(ErrorCode.UNKNOWN_RECIPIENT, "no such user", "m1"),
    Error(ErrorCode.TIMEOUT, "login deadline passed"),
    Ping("p1"),
    Pong("p1"),
    Pair("p1", "qr", b"k" * 32, name="desktop"),
    Pair("p2", "code", b"k" * 32, ALICE),
    PairCode("p1", 60, ref="ab" * 16),
    PairCode("p2", 60, code="ABCD2345"),
    Link("l1", ref="ab" * 16, key=b"k" * 32, signature=b"s" * 64),
    Link("l2", code="ABCD2345"),
    LinkKey("l2", "ABCD2345", b"k" * 32),
    DevicesQuery("d1", ALICE),
    DevicesBatchQuery("d2", (ALICE, BOB)),
    DeviceLists("d2", ((ALICE, (DeviceInfo(ALICE_DEV, 1, b"k" * 32),)), (BOB, ()))),
    DeviceLists("d3", ()),
    DeviceList("d1", ALICE, (DeviceInfo(ALICE_DEV, 1, b"k" * 32),
                             DeviceInfo(ALICE + ":3", 2, b"k" * 32, "desktop", b"s" * 64))),
    Unlink("u1", ALICE + ":3"),
    UploadRequest("m1", 2_000_016, bytes(32), "image"),
    UploadGrant("m1", "https://media.example.com/v1/upload/" + "ab" * 32, 600, bytes(69)),
    ServerAck("l1", 1763830000123, "link", ALICE + ":3"),
    # groups (issue 17)
    GroupRequest("g1", "create", None, (BOB, "447700900123"), "trip"),
    GroupRequest("g2", "settings", "g:12", announce=True, approval=False),
    GroupRequest("g3", "description", "g:12", description="bring boots\nand a hat"),
    GroupRequest("g4", "join", code="AbCdEfGhIjKlMnOpQrStUv"),
    GroupResult("g1", "create", "g:12", (("subject", "trip"), ("t", "1763830000123")),
                failed=((BOB, 433),)),
    GroupResult("g5", "info", "g:12", (("subject", "trip"), ("creator", ALICE)),
                (GroupMember(ALICE, "admin", 1), GroupMember(BOB, "member", 2)),
                description="d"),
    GroupResult("g6", "list", items=(("g:12", "trip", 1763830000123),)),
    GroupNotice("g:12", "add", ALICE, 1763830000123, 10, (BOB,)),
    GroupNotice("g:12", "settings", ALICE, 1763830000123, 11, (), (("announce", "1"),)),
    IncomingMessage(ALICE_DEV, "m9", "text", 1763830000123, 45, b"x", None, "g:12"),
    IncomingMessage(ALICE_DEV, "m9", "text", 1763830000123, 46, b"x", None, "g:12", b"key"),
    Message("g:12", "m9", "skmsg", b"x", ((BOB + ":0", b"k1"), (ALICE + ":2", b"k2"))),
    ServerAck("m9", 1763830000123, "message", None, (BOB,)),
    IncomingReceipt("g:12", "m9", "delivered", 1763830000999, 47, None, (BOB, "447700900123")),
    Receipt("g:12", "m9", "read", ALICE),
    Privacy("p3", groupadd="contacts"),
    PrivacySettings("p3", "everyone", "everyone", "nobody"),
    # multi-device (issue 15)
    DevicesChanged(ALICE, 1763830000123, 9),
    Message(BOB, "m3", "pkmsg", b"", ((BOB + ":0", b"a"), (ALICE + ":2", b""))),
    Message(ALICE + ":3", "h1", "history", b"bundle"),
    IncomingMessage(ALICE_DEV, "m4", "text", 1763830000123, 43, b"x", BOB),
    IncomingMessage(ALICE_DEV, "h1", "history", 1763830000123, 44, b"x", ALICE + ":3"),
    IncomingReceipt(BOB, "m5", "read", 1763830000999, 8, ALICE),
    Error(ErrorCode.STALE_DEVICES, "stale", "m3", (BOB + ":2",), (BOB + ":7", ALICE + ":0")),
    # the key directory (issue 16)
    KeysUpload("k1", b"c" * 32, b"e" * 32, (SignedKey("AAAAAAAAAAA", b"o" * 32, b"s" * 64),),
               SignedKey("AAAAAAAAAAE", b"f" * 32, b"t" * 64, True)),
    KeysUpload("k2", b"c" * 32, b"e" * 32),
    KeysQuery("k3", (ALICE, BOB)),
    KeysCountQuery("k4"),
    KeysCount("k1", 7),
    KeyBundles("k3", (KeyBundle(ALICE_DEV, b"c" * 32, b"e" * 32,
                                SignedKey("AAAAAAAAAAA", b"o" * 32, b"s" * 64)),
                      KeyBundle(ALICE + ":3", b"c" * 32, b"e" * 32,
                                SignedKey("AAAAAAAAAAE", b"f" * 32, b"t" * 64, True)),
                      KeyBundle(BOB + ":0", b"c" * 32, b"e" * 32), KeyBundle(BOB + ":2"))),
    KeysLow(ALICE_DEV, 1763830000123, 12),
    KeysChanged(BOB, 1763830000123, 13),
    Receipt(BOB, "m6", "retry"),
    IncomingReceipt(BOB + ":2", "m6", "retry", 1763830000999, 14),
    PushTarget("w1", "set", "fcm", b"registration-token", 1763830000123, True),
    PushTarget("w2", "remove"),
]  # fmt: skip


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: type(e).__name__)
def test_event_node_roundtrip(impl, event):
    node = event.to_node(impl.Node)
    c = impl.Codec()
    back = c.decode(c.encode(node))
    table = CLIENT_SENT if event.SENDER == "client" else SERVER_SENT
    if event.SENDER == "both":
        table = CLIENT_SENT
    assert table[back.tag].from_node(back) == event


def pair(impl, **kw):
    client = Connection(Role.CLIENT, codec=impl, **kw)
    server = Connection(Role.SERVER, codec=impl)
    server.receive_data(client.initiate())
    client.receive_data(server.initiate())
    assert server.next_event() == Hello(1, client.dictionary.version)
    assert client.next_event() == Hello(1, LATEST_VERSION)
    assert client.state is server.state is State.UNAUTHENTICATED
    return client, server


def deliver(src, dst, event):
    dst.receive_data(src.send(event))
    got = dst.next_event()
    assert got == event
    assert dst.next_event() is NEED_DATA
    return got


def login(client, server):
    deliver(client, server, AuthStart(b"client-first"))
    assert client.state is server.state is State.AUTH_STARTED
    deliver(server, client, AuthChallenge(b"server-first"))
    deliver(client, server, AuthResponse(b"client-final"))
    deliver(server, client, AuthSuccess(b"server-final", 1))
    assert client.state is server.state is State.AUTHENTICATED


def test_full_session(impl):
    client, server = pair(impl)
    deliver(client, server, Register("r1", ALICE))
    deliver(server, client, CodeSent("r1", 300))
    deliver(client, server, Verify("r2", ALICE, "123456", b"k" * 32))
    deliver(server, client, Registered("r2", ALICE_DEV, b"s" * 32))
    login(client, server)
    deliver(client, server, Message(BOB, "m1", "text", b"hello"))
    deliver(server, client, ServerAck("m1", 5))
    deliver(server, client, IncomingMessage(BOB + ":1", "x9", "text", 6, 1, b"hi"))
    deliver(client, server, DeviceAck(1))
    deliver(client, server, Receipt(BOB, "x9"))
    deliver(server, client, IncomingReceipt(BOB, "m1", "delivered", 7, 2))
    deliver(client, server, Ping("p"))
    deliver(server, client, Pong("p"))
    server.receive_data(b"")
    assert server.next_event() == ConnectionClosed()
    assert server.state is State.CLOSED


def _refused(server, impl, event, state):
    """``event`` from the client reaches ``server`` as a non-fatal 202 in ``state``."""
    server.receive_data(impl.Codec().encode_frame(event.to_node(impl.Node)))
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event()
    err = info.value
    assert err.code == ErrorCode.WRONG_STATE and not err.fatal and err.request_id == event.id
    assert f"state {state.value}" in err.text
    assert server.state is state


@pytest.mark.parametrize("first", ["register", "verify"])
def test_registering_connection_cannot_pair(impl, first):
    """register or verify, then pair before (or after) the answer: the pair is refused
    (202), the registration's answer still goes out, and the login follows."""
    client, server = pair(impl)
    pairing = Pair("p1", "qr", b"k" * 32, name="desktop")
    if first == "register":
        deliver(client, server, Register("r1", ALICE))
        answer = CodeSent("r1", 300)
    else:
        deliver(client, server, Verify("r1", ALICE, "123456", b"k" * 32))
        answer = Registered("r1", ALICE_DEV, b"s" * 32)
    assert client.state is server.state is State.REGISTERING
    with pytest.raises(LocalProtocolError):  # the client's side refuses it too
        client.send(pairing)
    _refused(server, impl, pairing, State.REGISTERING)
    client.receive_data(server.send(Error(ErrorCode.WRONG_STATE, "no", "p1")))
    assert client.next_event() == Error(ErrorCode.WRONG_STATE, "no", "p1")
    deliver(server, client, answer)  # not dropped: the state still allows it
    _refused(server, impl, pairing, State.REGISTERING)  # nor after the answer
    if first == "register":
        deliver(client, server, Verify("r2", ALICE, "123456", b"k" * 32))
        deliver(server, client, Registered("r2", ALICE_DEV, b"s" * 32))
    login(client, server)


@pytest.mark.parametrize(
    "late", ["auth-started", "auth-challenged", "auth-responded", "authenticated"]
)
def test_a_registration_answer_may_come_after_the_login_started(impl, late):
    """auth right behind register and verify: their answers still go out (and in)
    in each later state, changing no state."""
    client, server = pair(impl)
    deliver(client, server, Register("r1", ALICE))
    deliver(client, server, Verify("r2", ALICE, "123456", b"k" * 32))
    steps = [
        (client, AuthStart(b"client-first"), State.AUTH_STARTED),
        (server, AuthChallenge(b"server-first"), State.AUTH_CHALLENGED),
        (client, AuthResponse(b"client-final"), State.AUTH_RESPONDED),
        (server, AuthSuccess(b"server-final", 1), State.AUTHENTICATED),
    ]
    for src, event, state in steps:
        deliver(src, server if src is client else client, event)
        if state.value == late:
            deliver(server, client, CodeSent("r1", 300))
            deliver(server, client, Registered("r2", ALICE_DEV, b"s" * 32))
            assert client.state is server.state is state
    assert client.state is server.state is State.AUTHENTICATED


def test_pairing_connection_cannot_register(impl):
    client, server = pair(impl)
    deliver(client, server, Pair("p1", "qr", b"k" * 32, name="desktop"))
    assert client.state is server.state is State.PAIRING
    for event in (Register("r1", ALICE), Verify("r2", ALICE, "123456", b"k" * 32)):
        with pytest.raises(LocalProtocolError):
            client.send(event)
        _refused(server, impl, event, State.PAIRING)
    with pytest.raises(LocalProtocolError):  # nor a server answer to one
        server.send(CodeSent("r1", 300))
    deliver(server, client, PairCode("p1", 60, ref="ab" * 16))


def test_transcript_byte_at_a_time_and_batched(impl):
    """A pipelined client stream, split any way, gives the server the same events."""
    client = Connection(Role.CLIENT, codec=impl)
    out = bytearray(client.initiate())
    client.send_into(out, AuthStart(b"a"))  # right behind the preamble: no round trip
    client.receive_data(Connection(Role.SERVER).initiate())
    client.next_event()
    for ev in (AuthChallenge(b"b"), AuthSuccess(b"d", 1)):
        if isinstance(ev, AuthSuccess):
            client.send_into(out, AuthResponse(b"c"))
        client.receive_data(impl.Codec().encode_frame(ev.to_node(impl.Node)))
        assert client.next_event() == ev
    for i in range(3):
        client.send_into(out, Message(BOB, f"m{i}", "text", b"x" * i))
    data = bytes(out)
    expected = [Hello(1, LATEST_VERSION), AuthStart(b"a"), AuthResponse(b"c")] + [
        Message(BOB, f"m{i}", "text", b"x" * i) for i in range(3)
    ]
    for step in (len(data), 1, 3):
        server = Connection(Role.SERVER, codec=impl)
        events = []
        for i in range(0, len(data), step):
            server.receive_data(data[i : i + step])
            while (ev := server.next_event()) is not NEED_DATA:
                events.append(ev)
                if isinstance(ev, AuthStart):
                    server.send(AuthChallenge(b"b"))
                elif isinstance(ev, AuthResponse):
                    server.send(AuthSuccess(b"d", 1))
        assert events == expected


def test_message_before_login_is_wrong_state_not_fatal(impl):
    client, server = pair(impl)
    node = Message(BOB, "m1", "text", b"x").to_node(impl.Node)
    server.receive_data(impl.Codec().encode_frame(node))
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event()
    err = info.value
    assert err.code == ErrorCode.WRONG_STATE and not err.fatal and err.request_id == "m1"
    assert server.state is State.UNAUTHENTICATED
    # the server answers and the connection goes on
    client.receive_data(server.send(Error(err.code, err.text, err.request_id)))
    assert client.next_event() == Error(ErrorCode.WRONG_STATE, err.text, "m1")
    deliver(client, server, Register("r1", ALICE))


def test_unknown_node_and_bad_attributes_are_not_fatal(impl):
    client, server = pair(impl)
    c = impl.Codec()
    server.receive_data(c.encode_frame(impl.Node("frobnicate", {"id": "q1"})))
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event()
    assert info.value.code == ErrorCode.UNKNOWN_NODE and info.value.request_id == "q1"
    bad = [
        impl.Node("register", {"id": "r1", "phone": "+491701234567"}),
        impl.Node("register", {"id": "r1"}),
        impl.Node("register", {"id": "x" * 65, "phone": ALICE}),
        impl.Node("verify", {"id": "r1", "phone": ALICE, "code": "12345"}, b"k" * 32),
        impl.Node("verify", {"id": "r1", "phone": ALICE, "code": "123456"}, b"short"),
        impl.Node("auth", {"mech": "PLAIN"}, b"x"),
    ]
    for node in bad:
        server.receive_data(c.encode_frame(node))
        with pytest.raises(RemoteProtocolError) as info:
            server.next_event()
        assert info.value.code == ErrorCode.BAD_REQUEST and not info.value.fatal
        assert server.state is State.UNAUTHENTICATED
    deliver(client, server, Register("r1", ALICE))


def test_bad_attributes_after_login(impl):
    client, server = pair(impl)
    login(client, server)
    c = impl.Codec()
    for attrs in (
        {"to": "12345", "id": "m1", "type": "text"},  # not a user address
        {"to": ALICE + ":x", "id": "m1", "type": "text"},  # not a device address either
        {"to": ALICE, "id": "has space", "type": "text"},
        {"to": ALICE, "type": "text"},
    ):
        server.receive_data(c.encode_frame(impl.Node("message", attrs, b"x")))
        with pytest.raises(RemoteProtocolError) as info:
            server.next_event()
        assert info.value.code == ErrorCode.BAD_REQUEST
    for seq in ("-1", "01", "x", str(1 << 64)):
        server.receive_data(c.encode_frame(impl.Node("ack", {"seq": seq})))
        with pytest.raises(RemoteProtocolError):
            server.next_event()
    deliver(client, server, DeviceAck((1 << 64) - 1))
    N = impl.Node
    for node in (
        N("presence", {"type": "subscribe"}),  # whom?
        N("presence", {"type": "subscribe", "to": ALICE + ":0"}),  # a user, not a device
        N("presence", {"type": "away"}),
        N("chatstate", {"to": BOB, "type": "shouting"}),
        N("privacy", {"id": "p1", "last": "friends"}),
        N("discover", {"id": "d1", "type": "full"}, [N("item", {"phone": "+4917012345"})]),
        N("discover", {"id": "d1", "type": "full"}, [N("user", {"phone": BOB})]),
        N("discover", {"id": "d1", "type": "full"}, b"4915112345678"),
        N("discover", {"id": "d1", "type": "merge"}, []),
        N("block", {"id": "b1", "to": "g:1234"}),
        N("unblock", {"id": "b1"}),
    ):
        server.receive_data(c.encode_frame(node))
        with pytest.raises(RemoteProtocolError) as info:
            server.next_event()
        assert info.value.code == ErrorCode.BAD_REQUEST and not info.value.fatal, node
    deliver(client, server, Presence("subscribe", BOB))


def test_codec_error_is_fatal_and_sticky(impl):
    client, server = pair(impl)
    server.receive_data(b"\x00\x00\x02\xf8\x00")  # a node without a tag
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event()
    assert info.value.code == ErrorCode.MALFORMED_NODE and info.value.fatal
    assert server.state is State.ERROR
    with pytest.raises(RemoteProtocolError):
        server.next_event()
    with pytest.raises(LocalProtocolError):
        server.send(Ping("p"))
    client.receive_data(server.send(Error(info.value.code, info.value.text)))
    assert client.next_event().code == ErrorCode.MALFORMED_NODE
    assert client.state is State.CLOSED and server.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        server.send(Error(1, "again"))


def test_oversize_frame(impl):
    from pigeon.core.node import Limits

    client, _ = pair(impl)
    server = Connection(Role.SERVER, codec=impl, limits=Limits(max_frame=100))
    server.receive_data(client.initiate() + (101).to_bytes(3, "big"))
    assert isinstance(server.next_event(), Hello)
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event()
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE and server.state is State.ERROR


@pytest.mark.parametrize(
    "pre, code",
    [
        (b"XMPP\x01", ErrorCode.BAD_PREAMBLE),
        (b"PGN\x02\x01", ErrorCode.UNSUPPORTED_PROTOCOL),
        (b"PGN\x01\x63", ErrorCode.UNSUPPORTED_DICTIONARY),
        (b"PGN\x01\x00", ErrorCode.UNSUPPORTED_DICTIONARY),
    ],
)
def test_bad_preamble(impl, pre, code):
    server = Connection(Role.SERVER, codec=impl)
    server.receive_data(pre[:2])
    assert server.next_event() is NEED_DATA
    server.receive_data(pre[2:])
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event()
    assert info.value.code == code and info.value.fatal and server.state is State.ERROR
    # The answer carries no tokens, so a client on any dictionary can read it.
    reply = server.send(Error(code, info.value.text))
    client = Connection(Role.CLIENT, codec=impl)
    client.receive_data(server.initiate() + reply)
    assert isinstance(client.next_event(), Hello)
    got = client.next_event()
    assert got == Error(code, info.value.text)
    assert client.state is State.CLOSED


def test_server_accepts_every_dictionary_it_knows(impl):
    v1 = DICTIONARIES[1]
    v2 = Dictionary(2, tuple(s for c, s in v1.entries() if c < 0x100) + ("newtoken",), ())
    known = {1: v1, 2: v2}
    for version in (1, 2):
        # what a client built against `version` sends
        request = impl.Codec(known[version]).encode_frame(Register("r1", ALICE).to_node(impl.Node))
        server = Connection(Role.SERVER, codec=impl, dictionaries=known)
        server.receive_data(preamble(version) + request)
        assert server.next_event() == Hello(1, version)
        assert server.dictionary is known[version]
        assert server.next_event() == Register("r1", ALICE)
    assert Connection(Role.SERVER, dictionaries=known).initiate() == preamble(2)


def test_local_errors(impl):
    client, server = pair(impl)
    with pytest.raises(LocalProtocolError):
        client.send(IncomingMessage(ALICE_DEV, "m", "text", 1, 1, b""))  # a server's event
    with pytest.raises(LocalProtocolError):
        server.send(Message(BOB, "m", "text", b""))  # a client's event
    with pytest.raises(LocalProtocolError):
        client.send(Message(BOB, "m", "text", b""))  # not logged in
    with pytest.raises(LocalProtocolError):
        server.send(AuthSuccess(b"", 1))  # out of order
    with pytest.raises(LocalProtocolError):
        client.send(Hello(1, 1))
    with pytest.raises(LocalProtocolError):
        Connection(Role.SERVER, codec=impl).send(CodeSent("r1", 1))  # before the handshake
    assert client.state is State.UNAUTHENTICATED


def test_peer_fatal_error_closes(impl):
    client, server = pair(impl)
    login(client, server)
    client.receive_data(server.send(Error(ErrorCode.REPLACED, "logged in elsewhere")))
    assert client.next_event() == Error(ErrorCode.REPLACED, "logged in elsewhere")
    assert client.state is State.CLOSED and server.state is State.CLOSED
    assert client.next_event() is NEED_DATA


def test_an_idle_server_connection_holds_only_its_own_state(impl):
    """A server holds tens of thousands of idle connections: past its handshake,
    with a frame read (over two chunks) and one sent, one costs a few hundred
    bytes: the codec, the accepted dictionaries and equal preambles are shared,
    and a frame reader with nothing pending holds no buffer."""
    client = Connection(Role.CLIENT, codec=impl)
    data = client.initiate() + client.send(Ping("p1"))
    n, out, conns = 500, bytearray(), []
    tracemalloc.start()
    try:
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(n):
            c = Connection(Role.SERVER, codec=impl, hot_path=True)
            c.receive_data(data[:7])  # the preamble and part of the frame header
            assert c.next_event() == Hello(1, LATEST_VERSION)
            c.receive_data(data[7:])
            assert c.next_event() == Ping("p1")
            assert c.next_event() is NEED_DATA and c.buffered == 0
            c.send_into(out, Pong("p1"))
            conns.append(c)
        out.clear()
        gc.collect()
        per_conn = (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()
    print(f"{per_conn:.0f} bytes per idle server connection")
    assert per_conn < 512, f"{per_conn:.0f} bytes per idle connection"
    assert len({id(c._codec) for c in conns}) == 1


def test_transition_table_reaches_every_event():
    """No event class is unreachable, and each direction's tag map holds only its sender's events."""
    in_table = {ev for (_state, ev) in TRANSITIONS}
    for table, role in ((CLIENT_SENT, "client"), (SERVER_SENT, "server")):
        for tag, cls in table.items():
            assert cls.TAG == tag and cls.SENDER in (role, "both")
            assert cls is Error or cls in in_table, f"{cls.__name__} can never be sent"
    assert CLIENT_SENT["message"] is Message and SERVER_SENT["message"] is IncomingMessage
    assert CLIENT_SENT["ack"] is DeviceAck and SERVER_SENT["ack"] is ServerAck
