"""Node codec: known encodings, round trips, and the two implementations agreeing."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pigeon.core.node import Limits
from pigeon.core.tokens import LITERAL
from pigeon.core.wire import ADDR_DEVICE, ADDR_GROUP

from strategies import build, trees
from wirebuild import binary, lst, packed, tok

MSG_ATTRS = {"to": "491701234567", "id": "3eb0c1f2a4d5e6f7", "type": "text"}


def typical(impl, body=b"x" * 100):
    return impl.Node("message", dict(MSG_ATTRS), body)


def test_typical_message_bytes(impl):
    """The 1:1 chat message of the brief, byte for byte, and its size budget."""
    c = impl.Codec()
    expected = (
        lst(8)
        + tok("message")
        + tok("to")
        + packed("491701234567")
        + tok("id")
        + packed("3eb0c1f2a4d5e6f7")
        + tok("type")
        + tok("text")
        + binary(b"x" * 100)
    )
    assert c.encode(typical(impl)) == expected
    frame = c.encode_frame(typical(impl))
    assert frame == len(expected).to_bytes(3, "big") + expected
    assert len(frame) <= 140  # the budget: header included
    assert c.decode(expected) == typical(impl)


@pytest.mark.parametrize(
    "value, encoded",
    [
        ("491701234567:2", bytes([ADDR_DEVICE, 2]) + packed("491701234567")[1:]),
        ("491701234567:255", bytes([ADDR_DEVICE, 255]) + packed("491701234567")[1:]),
        ("g:120363012345", bytes([ADDR_GROUP]) + packed("120363012345")[1:]),
        ("12345", packed("12345")),
        ("deadbeef", packed("deadbeef")),
        ("", binary(b"")),
        ("DEADBEEF", binary(b"DEADBEEF")),
        ("héllo", binary("héllo".encode())),
        ("491701234567:256", binary(b"491701234567:256")),  # not a device number
        ("491701234567:02", binary(b"491701234567:02")),  # not canonical
        ("091701234567:2", binary(b"091701234567:2")),  # leading 0: not E.164
        ("g:", binary(b"g:")),
        ("text", tok("text")),
        ("SCRAM-SHA-256", tok("SCRAM-SHA-256")),
        ("account", tok("account")),  # a two-byte token
    ],
)
def test_value_encodings(impl, value, encoded):
    c = impl.Codec()
    payload = c.encode(impl.Node("x1", {"v": value}))
    # list header, tag (packed "x1"? no: "x1" is not hex, so binary), key "v" (binary)
    prefix = lst(3) + binary(b"x1") + binary(b"v")
    assert payload == prefix + encoded
    assert c.decode(payload).attrs["v"] == value


def test_two_byte_token_page(impl):
    c = impl.Codec()
    payload = c.encode(impl.Node("account"))
    assert payload[2] == 0xEC and len(payload) == 4
    assert c.decode(payload).tag == "account"


def test_children_and_empty_list(impl):
    c = impl.Codec()
    n = impl.Node("list", {}, [impl.Node("item", {"id": "1"}), impl.Node("item", {}, [])])
    assert c.decode(c.encode(n)) == n
    assert c.decode(c.encode(n)).content[1].content == []


def test_large_binary_content_uses_wider_lengths(impl):
    c = impl.Codec()
    for size, head in [(255, 0xFC), (256, 0xFD), (65535, 0xFD), (65536, 0xFE)]:
        payload = c.encode(impl.Node("message", {}, b"\xab" * size))
        assert payload[3] == head
        assert c.decode(payload).content == b"\xab" * size


def test_encoder_accepts_bytearray_and_memoryview(impl):
    c = impl.Codec()
    ref = c.encode(impl.Node("message", {}, b"abc"))
    assert c.encode(impl.Node("message", {}, bytearray(b"abc"))) == ref
    assert c.encode(impl.Node("message", {}, memoryview(b"zabc")[1:])) == ref


def test_write_frame_appends_and_rolls_back(impl):
    c = impl.Codec(limits=Limits(max_frame=200))
    out = bytearray(b"prefix")
    n = c.write_frame(out, typical(impl))
    assert out == b"prefix" + c.encode_frame(typical(impl)) and n == len(out) - 9
    with pytest.raises(impl_errors().FrameTooLarge):
        c.write_frame(out, typical(impl, body=b"y" * 500))
    assert out == b"prefix" + c.encode_frame(typical(impl))


def test_write_frame_wants_a_bytearray(impl):
    with pytest.raises(TypeError):
        impl.Codec().write_frame(b"immutable", typical(impl))


def impl_errors():
    from pigeon.core import errors

    return errors


def test_literal_dictionary_carries_every_string(impl):
    """Version 0 (no tokens) is what a peer with any dictionary can read."""
    lit = impl.Codec(LITERAL)
    payload = lit.encode(impl.Node("error", {"code": "102", "text": "unknown dictionary"}))
    assert payload.startswith(lst(5) + binary(b"error") + binary(b"code") + packed("102"))
    assert impl.Codec().decode(payload) == lit.decode(payload)


def test_encode_type_errors(impl):
    c = impl.Codec()
    with pytest.raises(TypeError):
        c.encode(impl.Node("message", {"seq": 5}))
    with pytest.raises(TypeError):
        c.encode(impl.Node(b"message"))
    with pytest.raises(TypeError):
        c.encode(impl.Node("message", {}, "text content"))
    with pytest.raises(TypeError):
        c.encode(impl.Node("message", {}, ["not a node"]))
    with pytest.raises(TypeError):
        c.encode("not a node")


@given(trees())
def test_roundtrip(tree):
    from conftest import load_impl

    for name in ("python", "fastpath"):
        impl = load_impl(name)
        node = build(impl.Node, tree)
        c = impl.Codec()
        payload = c.encode(node)
        back = c.decode(payload)
        assert back == node
        assert type(back) is impl.Node
        # decoding is deterministic and the encoding canonical
        assert c.encode(back) == payload


@given(trees())
def test_implementations_agree(tree):
    from conftest import load_impl

    py, fast = load_impl("python"), load_impl("fastpath")
    a = py.Codec().encode(build(py.Node, tree))
    b = fast.Codec().encode(build(fast.Node, tree))
    assert a == b
    # either codec encodes either Node class, identically
    assert fast.Codec().encode(build(py.Node, tree)) == a
    assert py.Codec().encode(build(fast.Node, tree)) == a
    # and the decoded nodes compare equal across classes
    assert py.Codec().decode(a) == fast.Codec().decode(a)


@given(trees(), st.binary(max_size=4))
def test_peek_matches_decode(tree, _noise):
    from conftest import load_impl

    for name in ("python", "fastpath"):
        impl = load_impl(name)
        c = impl.Codec()
        node = build(impl.Node, tree)
        payload = c.encode(node)
        env = c.peek(payload)
        assert env.tag == node.tag
        assert (env.to, env.id, env.type) == tuple(node.attrs.get(k) for k in ("to", "id", "type"))
        if isinstance(node.content, bytes):
            assert bytes(env.content) == node.content
            assert payload[env.start : env.end] == node.content
        else:
            assert env.content is None and env.start == env.end == -1


def test_peek_content_is_a_view_of_the_received_buffer(impl):
    c = impl.Codec()
    payload = bytearray(c.encode(typical(impl)))
    env = c.peek(payload)
    assert env.payload is payload
    view = env.content
    assert isinstance(view, memoryview) and view.obj is payload
    assert bytes(view) == b"x" * 100


def test_a_codec_called_again_while_it_encodes_never_mixes_the_two_outputs(impl):
    """One codec serves every connection of a thread (core/connection.py), so a
    callback of the node being encoded that encodes with it must not overwrite
    the outer call's bytes: the compiled codec refuses the inner call, the
    pure one has no shared buffer to overwrite."""
    c = impl.Codec()
    inner = []

    class Sneaky(str):
        def __hash__(self):  # called by the token lookup, in the middle of the encode
            try:
                inner.append(c.encode(impl.Node("ping", {"id": "z" * 40})))
            except RuntimeError as exc:
                inner.append(exc)
            return str.__hash__(self)

    attrs = {"to": "4915112345678", "id": "m1", "type": "text"}
    expected = impl.Codec().encode_frame(impl.Node("message", attrs, b"x" * 100))
    node = impl.Node("message", {**attrs, "type": Sneaky("text")}, b"x" * 100)
    for call in (c.encode_frame, lambda n: bytes(c.encode(n)), write_frame(c)):
        inner.clear()
        got = call(node)
        assert got in (expected, expected[3:]), "the inner encode overwrote the outer one"
        assert inner, "the callback did not run"
        if isinstance(inner[0], RuntimeError):
            assert impl.IMPLEMENTATION == "fastpath"
        else:
            assert inner[0] == impl.Codec().encode(impl.Node("ping", {"id": "z" * 40}))
    assert c.encode_frame(impl.Node("ack")) == impl.Codec().encode_frame(impl.Node("ack"))


def write_frame(c):
    def call(node):
        out = bytearray(b"before")
        c.write_frame(out, node)
        assert out[:6] == b"before"
        return bytes(out[6:])

    return call


def test_node_api(impl):
    n = impl.Node("message", {"id": "1"})
    assert n.get("id") == "1" and n.get("to") is None and n.content is None
    assert repr(n) == '<message id="1"/>'
    assert impl.Node("ack") == impl.Node("ack", {})
    assert impl.Node("ack") != impl.Node("ack", {"id": "1"})
    assert impl.Node("ack") != "ack"
    with pytest.raises(TypeError):
        hash(n)
    import pickle

    assert pickle.loads(pickle.dumps(typical(impl))) == typical(impl)


# -- queue entries: the stored form of a delivery, spliced into a frame at push --

_ids = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=64
)
_origins = st.one_of(
    st.from_regex(r"[1-9][0-9]{7,14}:[0-9]{1,2}", fullmatch=True),
    st.from_regex(r"[1-9][0-9]{7,14}", fullmatch=True),
)


@given(
    st.sampled_from([0, 1]),
    st.integers(0, 2**64 - 1),
    st.booleans(),
    _origins,
    _ids,
    st.one_of(st.sampled_from(["text", "delivered", "read", "add"]), _ids),
    st.binary(max_size=70_000),
    st.integers(0, 2**64 - 1),
    st.sampled_from(["python", "fastpath"]),
)
def test_entry_frames_are_the_frames_of_the_events(kind, t, fan, origin, mid, typ, body, seq, name):
    """write_entry_frame(queue_entry(...)) is byte for byte encode_frame of the
    IncomingMessage / IncomingReceipt node, in both implementations, and both
    make the same entries."""
    from pigeon.core.tokens import DICTIONARIES

    from conftest import load_impl

    impl = load_impl(name)
    other = load_impl("python")
    c = impl.Codec(DICTIONARIES[1], Limits(max_frame=0xFFFFFF))
    entry = c.queue_entry(kind, t, fan, origin, mid, typ, body if kind == 0 else None)
    assert entry == other.Codec(DICTIONARIES[1], Limits(max_frame=0xFFFFFF)).queue_entry(
        kind, t, fan, origin, mid, typ, body if kind == 0 else None
    )
    out = bytearray(b"ab")
    n = c.write_entry_frame(out, memoryview(entry) if seq & 1 else entry, seq)
    attrs = {"from": origin, "id": mid, "type": typ, "t": str(t), "seq": str(seq)}
    node = impl.Node("message" if kind == 0 else "receipt", attrs, body if kind == 0 else None)
    assert bytes(out) == b"ab" + c.encode_frame(node) and n == len(out) - 2


def test_entry_frame_limits_and_bad_entries(impl):
    from pigeon.core.errors import FrameTooLarge

    c = impl.Codec(limits=Limits(max_frame=200))
    entry = c.queue_entry(0, 1, False, "491701234567:0", "m1", "text", b"x" * 300)
    with pytest.raises(FrameTooLarge):
        c.write_entry_frame(bytearray(), entry, 1)
    with pytest.raises(ValueError):
        c.queue_entry(2, 1, False, "491701234567:0", "m1", "text", b"")
    with pytest.raises(ValueError):
        c.queue_entry(1, 1, False, "", "m1", "text")
    for cut in (5, 12, 20):  # the splice checks every offset it reads
        with pytest.raises(ValueError):
            c.write_entry_frame(bytearray(), entry[:cut], 1)


def test_entries_of_every_kind_agree_in_every_dictionary(both):
    """Every queue entry kind, with and without ``to``, is the same bytes in both
    implementations for every dictionary version and the literal one (the
    fastpath encodes an entry's constant names once per Codec)."""
    from pigeon.core.tokens import DICTIONARIES

    py, fast = both
    cases = [
        (0, 7, 0, "491701234567:0", "3eb0c1f2", "text", b"body", None),
        (0, 7, 2, "491701234567:1", "m.1", "text", b"b", "491709876543"),
        (1, 2**64 - 1, 0, "491701234567", "m1", "delivered", None, None),
        (1, 0, 2, "491701234567", "m1", "read", None, "491709876543"),
        (2, 5, 0, "491701234567:0", "", "", None, None),
        (3, 5, 0, "491701234567:0", "", "fallback", None, None),
        (5, 9, 0, "491701234567:0", "g1", "text", b"group body", "g:42"),
    ]
    for dictionary in [*DICTIONARIES.values(), LITERAL]:
        p, f = py.Codec(dictionary), fast.Codec(dictionary)
        for args in cases:
            assert f.queue_entry(*args) == p.queue_entry(*args), (dictionary, args)
