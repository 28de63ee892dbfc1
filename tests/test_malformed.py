"""A table of malformed payloads, each expecting its specific error, in both codecs.

Every entry is fed to decode and to peek, and through a FrameReader whole,
one byte at a time, and followed by trailing bytes: always the same error,
never a crash.
"""

import pytest

from pigeon.core.errors import (
    CodecError,
    ErrorCode,
    LimitExceeded,
    MalformedNode,
    UnknownToken,
)
from pigeon.core.node import Limits
from pigeon.core.tokens import DICTIONARIES, Dictionary
from pigeon.core.wire import ADDR_DEVICE, ADDR_GROUP, BIN_32, LIST_16

from wirebuild import binary, frame, lst, packed, tok

SMALL = Limits(max_depth=3, max_attrs=4, max_string=16, max_children=5)


def nested(depth):
    inner = lst(1) + tok("item")
    for _ in range(depth - 1):
        inner = lst(2) + tok("item") + lst(1) + inner
    return inner


# (id, payload, expected exception, also raised by peek?)
CASES = [
    ("empty payload", b"", MalformedNode, True),
    ("reserved type byte as node", b"\x00", MalformedNode, True),
    ("token instead of list", tok("message"), MalformedNode, True),
    ("node without tag", lst(0), MalformedNode, True),
    ("truncated list header", bytes([LIST_16, 0]), MalformedNode, True),
    ("truncated tag", lst(1), MalformedNode, True),
    ("reserved 0x00 as tag", lst(1) + b"\x00", MalformedNode, True),
    ("reserved 0xfb as tag", lst(1) + b"\xfb", MalformedNode, True),
    ("reserved 0xff as tag", lst(1) + b"\xff", MalformedNode, True),
    ("reserved 0xf5 as value", lst(3) + tok("message") + tok("id") + b"\xf5", MalformedNode, True),
    ("list as tag", lst(1) + lst(1), MalformedNode, True),
    ("unused one-byte token", lst(1) + b"\xeb", UnknownToken, True),
    ("unused two-byte token", lst(1) + b"\xef\x00", UnknownToken, True),
    ("two-byte token without index", lst(1) + b"\xec", MalformedNode, True),
    ("trailing bytes", lst(1) + tok("ping") + b"\x00", MalformedNode, True),
    (
        "trailing bytes after content",
        lst(2) + tok("message") + binary(b"ab") + b"z",
        MalformedNode,
        True,
    ),
    ("truncated packed", lst(1) + packed("1234")[:-1], MalformedNode, True),
    ("non-zero pad nibble", lst(1) + b"\xfa\x03\x12\x35", MalformedNode, True),
    ("invalid UTF-8", lst(1) + binary(b"\xc3\x28"), MalformedNode, True),
    ("truncated binary", lst(1) + b"\xfc\x05ab", MalformedNode, True),
    (
        "huge BIN_32 length",
        lst(2) + tok("message") + bytes([BIN_32]) + b"\xff\xff\xff\xff",
        MalformedNode,
        True,
    ),
    (
        "short phone in device address",
        lst(3) + tok("message") + tok("to") + bytes([ADDR_DEVICE, 1]) + packed("1234567")[1:],
        MalformedNode,
        True,
    ),
    (
        "leading zero in device address",
        lst(3) + tok("message") + tok("to") + bytes([ADDR_DEVICE, 1]) + packed("012345678")[1:],
        MalformedNode,
        True,
    ),
    (
        "hex digit in device address",
        lst(3) + tok("message") + tok("to") + bytes([ADDR_DEVICE, 1]) + packed("4917012345a7")[1:],
        MalformedNode,
        True,
    ),
    (
        "empty group id",
        lst(3) + tok("message") + tok("to") + bytes([ADDR_GROUP, 0]),
        MalformedNode,
        True,
    ),
    (
        "21-digit group id",
        lst(3) + tok("message") + tok("to") + bytes([ADDR_GROUP]) + packed("1" * 21)[1:],
        MalformedNode,
        True,
    ),
    (
        "duplicate to",
        lst(5) + tok("message") + tok("to") + packed("12345678") + tok("to") + packed("12345678"),
        MalformedNode,
        True,
    ),
    (
        "duplicate other attribute",
        lst(5) + tok("message") + tok("seq") + packed("1") + tok("seq") + packed("2"),
        MalformedNode,
        False,
    ),
    ("token content", lst(2) + tok("message") + tok("text"), MalformedNode, True),
    ("packed content", lst(2) + tok("message") + packed("12"), MalformedNode, True),
    ("truncated child", lst(2) + tok("list") + lst(2) + lst(1) + tok("item"), MalformedNode, False),
    ("child not a node", lst(2) + tok("list") + lst(1) + tok("item"), MalformedNode, False),
    ("too deep", nested(4), LimitExceeded, False),
    (
        "too many attributes",
        lst(11)
        + tok("message")
        + b"".join(tok(k) + packed("1") for k in ("to", "id", "type", "t", "seq")),
        LimitExceeded,
        True,
    ),
    ("huge list header", bytes([LIST_16, 0xFF, 0xFF]) + tok("message"), LimitExceeded, True),
    ("long string", lst(3) + tok("message") + tok("text") + binary(b"a" * 17), LimitExceeded, True),
    (
        "long string, 4-byte length",
        lst(1) + bytes([BIN_32]) + (1 << 30).to_bytes(4, "big"),
        LimitExceeded,
        True,
    ),
    (
        "too many children",
        lst(2) + tok("list") + lst(6) + (lst(1) + tok("item")) * 6,
        LimitExceeded,
        False,
    ),
]


@pytest.mark.parametrize("name, payload, exc, peek_too", CASES, ids=[c[0] for c in CASES])
def test_decode_rejects(impl, name, payload, exc, peek_too):
    c = impl.Codec(limits=SMALL)
    with pytest.raises(exc) as info:
        c.decode(payload)
    assert info.value.code == exc.code and info.value.fatal
    assert isinstance(info.value, CodecError)
    if peek_too:
        with pytest.raises(exc):
            c.peek(payload)


@pytest.mark.parametrize("name, payload, exc, peek_too", CASES, ids=[c[0] for c in CASES])
def test_reader_feeds(impl, name, payload, exc, peek_too):
    """Whole, one byte at a time, and with trailing bytes: same error, same frame."""
    c = impl.Codec(limits=SMALL)
    if not payload:
        return  # a zero-length frame is the framing error tested in test_framing
    data = frame(payload)
    for chunks in (
        [data],
        [data[i : i + 1] for i in range(len(data))],
        [data + frame(lst(1) + tok("ping"))],
    ):
        r = impl.FrameReader()
        for ch in chunks:
            r.feed(ch)
        with pytest.raises(exc):
            r.next_node(c)
        if peek_too:
            r = impl.FrameReader()
            for ch in chunks:
                r.feed(ch)
            with pytest.raises(exc):
                r.next_envelope(c)


def test_unknown_token_depends_on_dictionary_version(impl):
    """A token appended in a later version is unknown to a connection on an older one."""
    v1 = DICTIONARIES[1]
    newer = Dictionary(2, tuple(s for _, s in v1.entries() if _ < 0x100) + ("newtoken",), ())
    payload = impl.Codec(newer).encode(impl.Node("newtoken"))
    assert impl.Codec(newer).decode(payload).tag == "newtoken"
    with pytest.raises(UnknownToken) as info:
        impl.Codec(v1).decode(payload)
    assert info.value.code == ErrorCode.UNKNOWN_TOKEN
    # and every v1 payload still decodes with the newer table
    old = impl.Codec(v1).encode(impl.Node("message", {"to": "491701234567"}))
    assert impl.Codec(newer).decode(old) == impl.Codec(v1).decode(old)


ENCODER_LIMIT_CASES = {
    "long literal string": lambda N: N("message", {"text": "z" * 17}),
    "too many attributes": lambda N: N("message", {f"k{i}": "v" for i in range(5)}),
    "too many children": lambda N: N("list", {}, [N("item") for _ in range(6)]),
    "too deep": lambda N: N("list", {}, [N("item", {}, [N("item", {}, [N("item")])])]),
}


@pytest.mark.parametrize("make", ENCODER_LIMIT_CASES.values(), ids=ENCODER_LIMIT_CASES.keys())
def test_encoder_enforces_limits(impl, make):
    with pytest.raises(LimitExceeded):
        impl.Codec(limits=SMALL).encode(make(impl.Node))


def test_packed_strings_are_bounded_by_their_count_not_max_string(impl):
    """A hex/digit string travels packed (at most 255 symbols), so max_string does not apply."""
    c = impl.Codec(limits=SMALL)
    node = impl.Node("message", {"id": "a" * 255})
    assert c.decode(c.encode(node)) == node
    with pytest.raises(LimitExceeded):
        c.encode(impl.Node("message", {"id": "a" * 256}))  # too long to pack: literal
