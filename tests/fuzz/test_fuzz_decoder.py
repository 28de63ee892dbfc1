"""Decoder fuzz target (hypothesis, so it runs anywhere; see atheris_decoder.py for atheris).

Any bytes, fed to either decoder, give a node or a CodecError: never another
exception, a crash or a hang.  The two implementations must also agree on
every input: the same node, or the same error class.  Inputs are random
bytes, and valid encodings with bytes flipped, cut or inserted (which reach
much deeper into the decoder than pure noise).
"""

from hypothesis import given, settings
from hypothesis import strategies as st

from pigeon.core import _pycodec
from pigeon.core.errors import CodecError
from pigeon.core.node import Limits
from pigeon.fastpath import _codec

from strategies import build, trees

LIMITS = Limits(max_depth=4, max_attrs=8, max_string=64, max_children=8, max_frame=4096)


def outcome(codec, op, data):
    try:
        r = getattr(codec, op)(data)
    except CodecError as exc:
        return ("error", type(exc), exc.code)
    if op == "peek":
        return ("envelope", r.tag, r.to, r.id, r.type, r.start, r.end)
    return ("node", r)


def check(data: bytes) -> None:
    py, fast = _pycodec.Codec(limits=LIMITS), _codec.Codec(limits=LIMITS)
    for op in ("decode", "peek"):
        a, b = outcome(py, op, data), outcome(fast, op, data)
        assert a[0] == b[0] and a == b, (op, data.hex(), a, b)


@st.composite
def mutated(draw):
    payload = _pycodec.Codec().encode(build(_pycodec.Node, draw(trees(max_leaves=6))))
    b = bytearray(payload)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "set"]))
        pos = draw(st.integers(0, max(len(b) - 1, 0)))
        if kind == "flip" and b:
            b[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut":
            del b[pos : pos + draw(st.integers(1, 8))]
        elif kind == "insert":
            b[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif b:
            b[pos] = draw(
                st.sampled_from(
                    [0x00, 0xEB, 0xEF, 0xF0, 0xF1, 0xF8, 0xF9, 0xFA, 0xFC, 0xFD, 0xFE, 0xFF]
                )
            )
    return bytes(b)


@settings(max_examples=600)
@given(st.binary(max_size=200))
def test_random_bytes(data):
    check(data)


@settings(max_examples=800)
@given(mutated())
def test_mutated_encodings(data):
    check(data)


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=64), max_size=10))
def test_reader_on_random_chunks(chunks):
    """Random stream chunks: frames or a CodecError, the same in both, buffer bounded."""
    results = []
    for mod in (_pycodec, _codec):
        codec = mod.Codec(limits=LIMITS)
        r = mod.FrameReader(max_frame=LIMITS.max_frame)
        got = []
        try:
            for ch in chunks:
                r.feed(ch)
                while (n := r.next_node(codec)) is not None:
                    got.append(n)
                assert r.buffered <= LIMITS.max_frame + 3 + 64
        except CodecError as exc:
            got.append(type(exc))
        results.append(got)
    assert results[0] == results[1]
