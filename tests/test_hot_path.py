"""The server's hot path (core/connection.py, "The hot path") against the full path.

The same byte stream goes into two logged-in server connections, one with
the hot path and one without, in both codec implementations: every event
and every error must be the same (a ``Hot`` counts as the event it stands
for).  The stream mixes what a client sends every second with every way of
getting it slightly wrong, plus random trees."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pigeon.core.connection import NEED_DATA, Connection, Role, State
from pigeon.core.errors import RemoteProtocolError
from pigeon.core.events import DeviceAck, Message, Receipt
from pigeon.core.node import DEFAULT_LIMITS, Limits
from pigeon.core.wire import ADDR_DEVICE, BIN_8, LIST_16

from strategies import trees
from wirebuild import binary, frame, lst, packed, tok

ALICE = "491701234567"


def logged_in(impl, hot: bool, limits: Limits = DEFAULT_LIMITS) -> Connection:
    from test_connection import login

    server = Connection(Role.SERVER, codec=impl, hot_path=hot, limits=limits)
    client = Connection(Role.CLIENT, codec=impl)
    server.receive_data(client.initiate())
    client.receive_data(server.initiate())
    server.next_event()
    client.next_event()
    login(client, server)
    assert server.state is State.AUTHENTICATED
    return server


def outcome(ev):
    """What the server does with ``ev``: a Hot as the event it stands for."""
    if type(ev).__name__ == "Hot":
        if ev.kind == 1:
            return Message(ev.to, ev.id, ev.type, ev.body, ev.payloads or ())
        if ev.kind == 2:
            return Receipt(ev.to, ev.id, ev.type)
        return DeviceAck(ev.seq)
    return ev


def run(server: Connection, data: bytes) -> list:
    server.receive_data(data)
    out = []
    for _ in range(10_000):
        try:
            ev = server.next_event()
        except RemoteProtocolError as err:
            out.append(("error", int(err.code), err.fatal, err.request_id, err.text))
            if err.fatal:
                break
            continue
        if ev is NEED_DATA:
            break
        out.append(outcome(ev))
    return out


def both(impl, data: bytes, limits: Limits = DEFAULT_LIMITS) -> tuple[list, list, int]:
    hot = logged_in(impl, True, limits)
    full = logged_in(impl, False, limits)
    a, b = run(hot, data), run(full, data)
    assert hot.state is full.state
    return a, b, sum(type(ev).__name__ != "tuple" for ev in a)


def hot_kinds(impl, data: bytes) -> list:
    """What ``next_hot`` makes of each frame of ``data``: a Hot with
    payloads ("payloads"), another Hot ("hot") or a Node ("node")."""
    r, c, out = impl.FrameReader(), impl.Codec(), []
    r.feed(data)
    while (x := r.next_hot(c)) is not None:
        out.append("node" if type(x).__name__ != "Hot" else "payloads" if x.payloads else "hot")
    return out


def node(impl, tag, attrs, content=None) -> bytes:
    return impl.Codec().encode_frame(impl.Node(tag, attrs, content))


def P(impl, device: str, body: bytes):
    return impl.Node("payload", {"device": device}, body)


DEV0 = bytes([ADDR_DEVICE, 0]) + packed(ALICE)[1:]  # ALICE:0, compact: device number, digits


def by_hand(device: bytes = DEV0, content: bytes | None = None, **parts: bytes) -> bytes:
    """A frame of a message with one payload child in its short form, each
    part replaceable: the list header (``count``), the ``child``'s header,
    its ``tag`` and attribute ``key``, ``device``, ``content``, ``tail`` bytes."""
    p = {"count": lst(1), "child": lst(4), "tag": tok("payload"), "key": tok("device"),
         "tail": b"", **parts}  # fmt: skip
    head = lst(8) + tok("message") + tok("to") + packed(ALICE) + tok("id") + binary(b"m9")
    head += tok("type") + tok("text") + p["count"] + p["child"] + p["tag"] + p["key"]
    return frame(head + device + (binary(b"a") if content is None else content) + p["tail"])


def payload_frames(impl) -> list[bytes]:
    """Messages with per-device payloads (docs/PROTOCOL.md 9): the ones the
    hot path reads, then near misses it must leave to the full path."""
    M = {"to": ALICE, "id": "m1", "type": "text"}
    d0, d3, d255 = ALICE + ":0", ALICE + ":3", ALICE + ":255"
    B = "491709876543"
    Node = impl.Node
    return [
        # read hot
        node(impl, "message", M, [P(impl, d0, b"a"), P(impl, d3, b"b")]),
        node(impl, "message", M, [P(impl, d0, b"a")]),
        node(impl, "message", M, [P(impl, d0, b""), P(impl, d255, b"z" * 300)]),  # empty, BIN_16
        node(impl, "message", M, [P(impl, d0, b"x" * 70_000)]),  # a 4-byte length
        node(impl, "message", M, [P(impl, f"{u}:{n}", b"p") for u in (ALICE, B) for n in range(5)]),
        node(impl, "message", {**M, "type": "sync"}, [P(impl, d3, b"a"), P(impl, B + ":1", b"b")]),
        node(impl, "message", M, [P(impl, f"{ALICE}:{n}", b"p") for n in range(32)]),
        by_hand(content=binary(b"a", 4)),  # a long length for a short body
        # near misses (a few are valid in a form only the full path reads)
        node(impl, "message", M, [P(impl, f"{ALICE}:{n}", b"p") for n in range(33)]),  # long: full
        node(impl, "message", M, [P(impl, d0, b"a"), P(impl, d0, b"b")]),  # a duplicate
        node(impl, "message", M, [P(impl, d0, b"a"), P(impl, d3, b"b"), P(impl, d0, b"c")]),
        node(impl, "message", M, [P(impl, ALICE, b"a")]),  # a user, not a device
        node(impl, "message", M, [P(impl, "g:12", b"a")]),  # a group
        node(impl, "message", M, [P(impl, ALICE + ":256", b"a")]),  # no device 256
        node(impl, "message", M, [P(impl, ALICE + ":01", b"a")]),  # a leading zero
        node(impl, "message", M, [P(impl, "0491701234:1", b"a")]),  # not an E.164 number
        node(impl, "message", M, [P(impl, "bob", b"a")]),
        node(impl, "message", M, [Node("payload", {"device": d0})]),  # no content
        node(impl, "message", M, [Node("payload", {"device": d0}, [Node("x")])]),  # not bytes
        node(impl, "message", M, [Node("payload", {}, b"a")]),  # no device
        node(impl, "message", M, [Node("payload", {"to": d0}, b"a")]),  # another attribute
        node(impl, "message", M, [Node("payload", {"device": d0, "x": "1"}, b"a")]),  # an extra
        node(impl, "message", M, [P(impl, d0, b"a"), Node("x")]),  # a child of another tag
        node(impl, "message", M, [Node("body", {"device": d0}, b"a")]),
        node(impl, "message", M, [Node("x"), P(impl, d0, b"a")]),
        node(impl, "message", M, []),  # an empty list
        node(impl, "message", {**M, "to": "g:12"}, [P(impl, d0, b"a")]),
        node(impl, "message", {**M, "to": d0}, [P(impl, d3, b"a")]),  # to a device
        node(impl, "message", {**M, "to": ALICE + ":2"}, [P(impl, d0, b"a")]),
        node(impl, "message", {**M, "extra": "1"}, [P(impl, d0, b"a")]),
        node(impl, "message", {**M, "type": "a b"}, [P(impl, d0, b"a")]),
        node(impl, "message", {**M, "id": "a" * 65}, [P(impl, d0, b"a")]),
        node(impl, "message", {"to": ALICE, "id": "m1"}, [P(impl, d0, b"a")]),  # no type
        node(impl, "receipt", {**M, "type": "read"}, [P(impl, d0, b"a")]),
        node(impl, "ack", {"seq": "1"}, [P(impl, d0, b"a")]),
        # by hand: other spellings of the same (the full path reads them), broken ones
        by_hand(binary((ALICE + ":0").encode())),  # a literal device address
        by_hand(key=binary(b"device")),
        by_hand(tag=binary(b"payload")),
        by_hand(count=bytes([LIST_16, 0, 1])),
        by_hand(child=bytes([LIST_16, 0, 4])),
        by_hand(content=lst(1) + lst(1) + tok("ack")),  # a child for content
    ]


def broken_payload_frames(impl) -> list[bytes]:
    """Payload messages the decoder refuses (fatal: the connection ends)."""
    return [
        by_hand(tail=b"\x00"),  # a trailing byte
        by_hand(count=lst(2)),  # one child short
        by_hand(content=bytes([BIN_8, 5]) + b"ab"),  # a truncated body
        by_hand(bytes([ADDR_DEVICE, 0]) + packed("0491701234")[1:]),  # a leading 0
        by_hand(bytes([ADDR_DEVICE, 0, 12, 0x49, 0x17, 0x01, 0x23, 0x45, 0x6A])),  # a nibble past 9
    ]


def stream(impl) -> list[bytes]:
    """What logged-in clients send, right and slightly wrong, one frame each."""
    M = {"to": ALICE, "id": "m1", "type": "text"}
    R = {"to": ALICE, "id": "m1", "type": "read"}
    out = [
        node(impl, "message", M, b"hello"),
        node(impl, "message", M, b""),
        node(impl, "message", M, b"x" * 70_000),  # a 4-byte length
        node(impl, "message", {**M, "type": "add"}, b"x"),  # a type that is a token
        node(impl, "message", {**M, "id": "a" * 64}, b"x"),
        node(impl, "message", {**M, "id": "a" * 65}, b"x"),  # too long: 200
        node(impl, "message", {**M, "id": "has space"}, b"x"),
        node(impl, "message", {**M, "id": "é"}, b"x"),
        node(impl, "message", {**M, "to": "g:12"}, b"x"),  # a group: the full path decides
        node(impl, "message", {**M, "to": ALICE + ":1"}, b"x"),  # a device
        node(impl, "message", {**M, "to": "0491701234"}, b"x"),  # leading 0
        node(impl, "message", {**M, "to": "1234567"}, b"x"),  # 7 digits
        node(impl, "message", {**M, "to": "1234567890123456"}, b"x"),  # 16 digits
        node(impl, "message", {**M, "extra": "1"}, b"x"),  # an attribute no event reads
        node(impl, "message", {"to": ALICE, "id": "m1"}, b"x"),  # no type
        node(impl, "message", {"id": "m1", "type": "text"}, b"x"),  # no to
        node(impl, "message", M),  # no body
        node(impl, "message", M, [impl.Node("x")]),  # children, not bytes
        *payload_frames(impl),
        node(impl, "receipt", R),
        node(impl, "receipt", {**R, "type": "played"}),
        node(impl, "receipt", {**R, "type": "delivered"}),  # a client may not send it
        node(impl, "receipt", {"to": ALICE, "id": "m1"}),  # no type
        node(impl, "receipt", R, b"content"),
        node(impl, "receipt", {**R, "to": "g:1"}),
        node(impl, "ack", {"seq": "1"}),
        node(impl, "ack", {"seq": "0"}),
        node(impl, "ack", {"seq": str((1 << 64) - 1)}),
        node(impl, "ack", {"seq": str(1 << 64)}),
        node(impl, "ack", {"seq": "99999999999999999999"}),
        node(impl, "ack", {"seq": "01"}),
        node(impl, "ack", {"seq": "-1"}),
        node(impl, "ack", {"seq": "1", "id": "x"}),
        node(impl, "ack", {}),
        node(impl, "ack", {"seq": "1"}, b"x"),
        node(impl, "ping", {"id": "p1"}),
        node(impl, "presence", {"type": "available"}),
        node(impl, "nonsense", {"id": "q"}),
        # by hand: keys spelled out, repeated, a short body length, trailing bytes
        frame(
            lst(7)
            + tok("message")
            + binary(b"to")
            + packed(ALICE)
            + tok("id")
            + binary(b"m2")
            + tok("type")
            + tok("text")
        ),  # fmt: skip
        frame(
            lst(8)
            + tok("message")
            + tok("to")
            + packed(ALICE)
            + tok("id")
            + binary(b"m2")
            + tok("type")
            + tok("text")
            + binary(b"body")
        ),  # fmt: skip
        frame(
            lst(10)
            + tok("message")
            + tok("to")
            + packed(ALICE)
            + tok("to")
            + packed(ALICE)
            + tok("id")
            + binary(b"m2")
            + tok("type")
            + tok("text")
            + binary(b"b")
        ),  # fmt: skip
        frame(lst(3) + tok("ack") + tok("seq") + packed("12")),
        frame(lst(3) + tok("ack") + tok("seq") + packed("12") + b"\x00"),  # trailing byte
        *broken_payload_frames(impl),  # fatal too: only the frame-by-frame test reaches them
        frame(lst(3) + tok("ack") + tok("seq")),  # truncated
    ]
    return out


def test_every_frame_alone_gives_the_same_events_and_errors(impl):
    hot_seen = 0
    for data in stream(impl):
        a, b, hot = both(impl, data)
        assert a == b, data.hex()
        hot_seen += hot
    assert hot_seen >= 10  # the hot path really was taken


def test_one_stream_of_everything_byte_at_a_time_and_whole(impl):
    data = b"".join(stream(impl)[:-1])  # the truncated ack last would be fatal
    a, b, _ = both(impl, data)
    assert a == b
    hot = logged_in(impl, True)
    full = logged_in(impl, False)
    drip_a, drip_b = [], []
    for i in range(0, len(data), 997):
        drip_a += run(hot, data[i : i + 997])
        drip_b += run(full, data[i : i + 997])
    assert drip_a == drip_b == a


def test_the_hot_path_reads_the_short_form_in_the_compiled_codec():
    from conftest import load_impl

    impl = load_impl("fastpath")
    c = impl.Codec(limits=Limits())
    r = impl.FrameReader()
    r.feed(node(impl, "message", {"to": ALICE, "id": "m1", "type": "text"}, b"hi"))
    h = r.next_hot(c)
    assert type(h).__name__ == "Hot" and (h.kind, h.to, h.id, h.type, h.body) == (
        1, ALICE, "m1", "text", b"hi"
    )  # fmt: skip
    r.feed(node(impl, "ping", {"id": "p"}))
    assert r.next_hot(c).tag == "ping"
    assert r.next_hot(c) is None


def test_payload_messages_are_read_hot_and_near_misses_are_not(impl):
    """The valid per-device messages become a Hot with payloads in both
    codecs; in the compiled one no near miss does (the full path judges it)."""
    frames = payload_frames(impl)
    kinds = []
    for data in frames:
        r, c = impl.FrameReader(), impl.Codec()
        r.feed(data)
        try:
            x = r.next_hot(c)
        except Exception:
            kinds.append("error")
            continue
        kinds.append("node" if type(x).__name__ != "Hot" else "payloads" if x.payloads else "hot")
    assert kinds[:8] == ["payloads"] * 8
    if impl.IMPLEMENTATION == "fastpath":
        assert "payloads" not in kinds[8:] and "hot" not in kinds[8:]
    h = impl.FrameReader()
    h.feed(frames[0])
    ev = h.next_hot(impl.Codec())
    assert (ev.body, ev.payloads) == (b"", ((ALICE + ":0", b"a"), (ALICE + ":3", b"b")))
    assert all(type(d) is str and type(b) is bytes for d, b in ev.payloads)


def test_payload_messages_byte_at_a_time(impl):
    frames = [f for f in payload_frames(impl) + broken_payload_frames(impl) if len(f) < 4096]
    data = b"".join(frames)
    whole, _, _ = both(impl, data)
    assert sum(type(ev) is Message and bool(ev.payloads) for ev in whole) >= 6

    def drip(conn):
        out = []
        for i in range(len(data)):
            out += run(conn, data[i : i + 1])
            if out and type(out[-1]) is tuple and out[-1][2]:
                break  # fatal: the connection is done
        return out

    assert drip(logged_in(impl, True)) == drip(logged_in(impl, False)) == whole


@pytest.mark.parametrize(
    "limits",
    [
        Limits(max_children=2),
        Limits(max_children=3),
        Limits(max_depth=1),
        Limits(max_attrs=2),
        Limits(max_attrs=3),
    ],  # fmt: skip
    ids=repr,
)
def test_payload_messages_under_tight_limits(impl, limits):
    """Too many payloads (max_children), nesting and attributes past their
    limits: the same error from both paths, and the same events within them.
    (A message of 3 attributes under max_attrs=2 was once read hot.)"""
    M = {"to": ALICE, "id": "m1", "type": "text"}
    for n in (0, 1, 2, 3, 4):  # 0: a body, no payloads
        content = [P(impl, f"{ALICE}:{i}", b"p") for i in range(n)] if n else b"p"
        data = node(impl, "message", M, content)
        a, b, _ = both(impl, data, limits)
        assert a == b, (limits, n)
        assert len(a) == 1


@settings(max_examples=300)
@given(trees(), st.sampled_from(["python", "fastpath"]))
def test_random_trees_give_the_same_events(tree, name):
    from conftest import load_impl
    from strategies import build

    impl = load_impl(name)
    try:
        data = impl.Codec().encode_frame(build(impl, tree))
    except Exception:
        return  # not encodable (limits): nothing to compare
    a, b, _ = both(impl, data)
    assert a == b


@pytest.mark.parametrize("tag", ["message", "receipt", "ack"])
def test_hot_kinds_with_random_attributes(impl, tag):
    import random

    rng = random.Random(tag)
    values = [ALICE, "g:5", ALICE + ":0", "m1", "read", "played", "text", "0", "1", "01", "",
              "a" * 64, "a" * 65, "x y", str(1 << 64), "18446744073709551615"]  # fmt: skip
    keys = ["to", "id", "type", "seq", "t", "from"]
    for _ in range(400):
        attrs = {k: rng.choice(values) for k in rng.sample(keys, rng.randint(0, 4))}
        content = rng.choice([None, b"", b"x", [impl.Node("c")]])
        try:
            data = node(impl, tag, attrs, content)
        except Exception:
            continue
        a, b, _ = both(impl, data)
        assert a == b, (attrs, content)


# -- the server's ack, written without an event ----------------------------------

_IDS = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=64)


@given(mid=_IDS, t=st.integers(0, 2**64 - 1), cls=st.sampled_from(["message", "receipt"]),
       name=st.sampled_from(["python", "fastpath"]))  # fmt: skip
@settings(max_examples=300, deadline=None)
def test_send_ack_into_writes_the_bytes_send_into_writes_for_the_server_ack(mid, t, cls, name):
    from pigeon.core.events import ServerAck

    from conftest import load_impl

    impl = load_impl(name)
    server = logged_in(impl, True)
    fast, full = bytearray(b"x"), bytearray(b"x")
    server.send_ack_into(fast, mid, t, cls)
    server.send_into(full, ServerAck(mid, t, cls))
    assert fast == full
    assert server.state is State.AUTHENTICATED
    node = impl.Codec(server.dictionary).decode(bytes(fast[4:]))
    assert (node.tag, node.attrs) == ("ack", {"class": cls, "id": mid, "t": str(t)})


def test_send_ack_into_refuses_where_send_into_refuses_and_leaves_out_alone(impl):
    from pigeon.core.errors import LocalProtocolError

    client = Connection(Role.CLIENT, codec=impl)
    out = bytearray(b"kept")
    with pytest.raises(LocalProtocolError, match="a client does not send ServerAck"):
        client.send_ack_into(out, "m1", 1, "message")
    fresh = Connection(Role.SERVER, codec=impl)  # not logged in
    with pytest.raises(LocalProtocolError, match="cannot send ServerAck in state"):
        fresh.send_ack_into(out, "m1", 1, "message")
    server = logged_in(impl, True)
    with pytest.raises(LocalProtocolError, match="answers messages and receipts"):
        server.send_ack_into(out, "m1", 1, "logout")  # (a logout's ack ends the session)
    with pytest.raises(LocalProtocolError):
        server.send_ack_into(out, "m1", -1, "message")
    with pytest.raises(LocalProtocolError):
        server.send_ack_into(out, "m" * 70_000, 1, "message")  # past max-string
    assert out == b"kept"
    server.send_ack_into(out, "m1", 1, "message")  # still usable: nothing advanced
    assert out.startswith(b"kept") and len(out) > 4
