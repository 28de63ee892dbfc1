"""FrameReader: any chunking gives the same frames; limits hold before buffering."""

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pigeon.core.errors import CodecError, EmptyFrame, ErrorCode, FrameTooLarge

from wirebuild import frame, lst, tok

PAYLOADS = [lst(1) + tok("ping"), lst(2) + tok("message") + b"\xfc\x03abc", os.urandom(70000)]


def chunkings(data):
    yield [data]
    yield [data[i : i + 1] for i in range(len(data))]
    yield [data[:1], data[1:2], data[2:5], data[5:]]
    yield [data[i : i + 7] for i in range(0, len(data), 7)]


def test_frames_whole_bytewise_and_split(impl):
    data = b"".join(frame(p) for p in PAYLOADS)
    for chunks in chunkings(data):
        r = impl.FrameReader(max_frame=1 << 20)
        got = []
        for ch in chunks:
            r.feed(ch)
            while (f := r.next_frame()) is not None:
                assert isinstance(f, memoryview)
                got.append(bytes(f))
        assert got == PAYLOADS
        assert r.buffered == 0 and r.next_frame() is None


def test_trailing_partial_frame_waits(impl):
    r = impl.FrameReader()
    data = frame(PAYLOADS[0]) + frame(PAYLOADS[1])
    r.feed(data[:-1])
    assert bytes(r.next_frame()) == PAYLOADS[0]
    assert r.next_frame() is None
    assert r.buffered == len(frame(PAYLOADS[1])) - 1
    r.feed(data[-1:])
    assert bytes(r.next_frame()) == PAYLOADS[1]


def test_frame_inside_one_chunk_is_not_copied(impl):
    r = impl.FrameReader()
    chunk = frame(PAYLOADS[0]) + frame(PAYLOADS[1])
    r.feed(chunk)
    view = r.next_frame()
    assert view.obj is chunk


def test_next_node_and_envelope(impl):
    c = impl.Codec()
    msg = impl.Node("message", {"to": "491701234567", "id": "a1", "type": "text"}, b"hi")
    data = c.encode_frame(msg) * 3
    for chunks in chunkings(data):
        r = impl.FrameReader()
        nodes, envs = [], []
        for ch in chunks:
            r.feed(ch)
            while (n := r.next_node(c)) is not None:
                nodes.append(n)
        assert nodes == [msg] * 3
        r = impl.FrameReader()
        for ch in chunks:
            r.feed(ch)
            while (e := r.next_envelope(c)) is not None:
                envs.append(e)
        assert [(e.tag, e.to, e.id, e.type, bytes(e.content)) for e in envs] == [
            ("message", "491701234567", "a1", "text", b"hi")
        ] * 3


def test_empty_frame(impl):
    r = impl.FrameReader()
    r.feed(b"\x00\x00\x00")
    with pytest.raises(EmptyFrame) as info:
        r.next_frame()
    assert info.value.code == ErrorCode.EMPTY_FRAME and info.value.fatal


def test_oversize_frame_rejected_at_its_header(impl):
    """The error comes with the header: nothing of the payload is awaited or kept."""
    r = impl.FrameReader(max_frame=1000)
    r.feed((1001).to_bytes(3, "big"))
    with pytest.raises(FrameTooLarge) as info:
        r.next_frame()
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE
    r = impl.FrameReader(max_frame=1000)
    r.feed(b"\x00")
    r.feed(b"\x03")
    assert r.next_frame() is None
    r.feed(b"\xe9")  # 1001 again, header split over three chunks
    with pytest.raises(FrameTooLarge):
        r.next_frame()


def test_max_frame_boundary(impl):
    r = impl.FrameReader(max_frame=10)
    r.feed(frame(b"a" * 10))
    assert bytes(r.next_frame()) == b"a" * 10


def test_feed_copies_mutable_buffers(impl):
    r = impl.FrameReader()
    buf = bytearray(frame(b"abc"))
    r.feed(buf)
    buf[3:6] = b"xyz"
    assert bytes(r.next_frame()) == b"abc"
    r.feed(b"")
    assert r.next_frame() is None


@given(st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=8), st.data())
def test_any_chunking(payloads, data):
    from conftest import load_impl

    stream = b"".join(frame(p) for p in payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    pieces = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)], strict=True)]
    for name in ("python", "fastpath"):
        r = load_impl(name).FrameReader()
        got = []
        for p in pieces:
            r.feed(p)
            while (f := r.next_frame()) is not None:
                got.append(bytes(f))
        assert got == payloads


def test_garbage_stream_memory_is_bounded(impl):
    """Random bytes: the reader never holds more than one maximal frame plus a chunk."""
    max_frame = 4096
    c = impl.Codec()
    rng = __import__("random").Random(7)
    r = impl.FrameReader(max_frame=max_frame)
    errors = frames = 0
    for _ in range(3000):
        chunk = rng.randbytes(rng.randint(1, 512))
        r.feed(chunk)
        try:
            while (f := r.next_frame()) is not None:
                frames += 1
                try:
                    c.decode(f)
                except CodecError:
                    errors += 1
        except CodecError:
            errors += 1
            r = impl.FrameReader(max_frame=max_frame)  # a real connection closes here
        assert r.buffered <= max_frame + 3 + 512
    assert errors > 0


def test_the_frame_limit_can_be_raised_on_a_live_reader(impl):
    # a server connection reads with login-max-frame until its login succeeds,
    # then with max-frame: the same reader, its limit raised in place
    r = impl.FrameReader(max_frame=16)
    r.feed((17).to_bytes(3, "big"))
    with pytest.raises(FrameTooLarge):
        r.next_frame()
    r = impl.FrameReader(max_frame=16)
    r.feed((17).to_bytes(3, "big") + b"x" * 17)
    r.max_frame = 1 << 20
    assert bytes(r.next_frame()) == b"x" * 17
