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
from pigeon.core.node import Limits

from strategies import trees
from wirebuild import binary, frame, lst, packed, tok

ALICE = "491701234567"


def logged_in(impl, hot: bool) -> Connection:
    from test_connection import login, pair

    client, server = pair(impl)
    if hot:
        server = Connection(Role.SERVER, codec=impl, hot_path=True)
        server.receive_data(client.initiate())
        client2 = Connection(Role.CLIENT, codec=impl)
        client2.receive_data(server.initiate())
        server.next_event()
        client2.next_event()
        client = client2
    login(client, server)
    assert server.state is State.AUTHENTICATED
    return server


def outcome(ev):
    """What the server does with ``ev``: a Hot as the event it stands for."""
    if type(ev).__name__ == "Hot":
        if ev.kind == 1:
            return Message(ev.to, ev.id, ev.type, ev.body)
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


def both(impl, data: bytes) -> tuple[list, list, int]:
    hot = logged_in(impl, True)
    full = logged_in(impl, False)
    a, b = run(hot, data), run(full, data)
    assert hot.state is full.state
    return a, b, sum(type(ev).__name__ != "tuple" for ev in a)


def node(impl, tag, attrs, content=None) -> bytes:
    return impl.Codec().encode_frame(impl.Node(tag, attrs, content))


def P(impl, device: str, body: bytes):
    return impl.Node("payload", {"device": device}, body)


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
        # per-device payloads: the full path reads them (a Hot is never made)
        node(impl, "message", M, [P(impl, ALICE + ":0", b"a"), P(impl, ALICE + ":3", b"b")]),
        node(impl, "message", M, [P(impl, ALICE + ":0", b"a"), P(impl, ALICE + ":0", b"b")]),
        node(impl, "message", M, [P(impl, ALICE, b"a")]),  # a user, not a device
        node(impl, "message", M, [impl.Node("payload", {"device": ALICE + ":0"})]),  # no bytes
        node(impl, "message", M, [P(impl, ALICE + ":0", b"a"), impl.Node("x")]),
        node(impl, "message", M, []),  # an empty list
        node(impl, "message", {**M, "to": "g:12"}, [P(impl, ALICE + ":0", b"a")]),
        node(impl, "message", {**M, "to": ALICE + ":2"}, [P(impl, ALICE + ":0", b"a")]),
        node(impl, "message", {**M, "to": ALICE + ":2", "type": "history"}, b"bundle"),
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
