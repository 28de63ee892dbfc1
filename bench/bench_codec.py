"""Codec micro-benchmarks: encode, decode, peek, and parsing a 64 KiB buffer of frames.

The subject is the brief's typical client-to-server 1:1 chat message: a
12-digit recipient, a 16-hex-digit id, type "text", 100 bytes of opaque
content.  Each benchmark runs against both implementations; ``extra_info``
records the frame size and, for the buffer benchmarks, the frame count, so
frames/s can be derived from the mean.
"""

import pytest

BUFFER_SIZE = 64 * 1024

# Rounds of at least 1 ms: a single sub-microsecond call per round would
# mostly measure the timer on a VM.
pytestmark = pytest.mark.benchmark(min_time=0.001, max_time=2.0)


def message(impl):
    return impl.Node(
        "message", {"to": "491701234567", "id": "3eb0c1f2a4d5e6f7", "type": "text"}, bytes(100)
    )


def buffer_of_frames(impl):
    frame = impl.Codec().encode_frame(message(impl))
    return frame * (BUFFER_SIZE // len(frame)), BUFFER_SIZE // len(frame)


def test_encode_frame(benchmark, impl):
    codec, node = impl.Codec(), message(impl)
    frame = benchmark(codec.encode_frame, node)
    benchmark.extra_info["frame_bytes"] = len(frame)
    assert len(frame) <= 140


def test_write_frame_batch(benchmark, impl):
    """16 frames appended to one output buffer, as a connection's flush would."""
    codec, node = impl.Codec(), message(impl)

    def batch():
        out = bytearray()
        for _ in range(16):
            codec.write_frame(out, node)
        return out

    out = benchmark(batch)
    benchmark.extra_info["frames"] = 16
    assert len(out) == 16 * len(codec.encode_frame(node))


def test_decode(benchmark, impl):
    codec = impl.Codec()
    payload = codec.encode(message(impl))
    node = benchmark(codec.decode, payload)
    assert node == message(impl)


def test_peek(benchmark, impl):
    codec = impl.Codec()
    payload = codec.encode(message(impl))
    env = benchmark(codec.peek, payload)
    assert (env.to, env.id, env.end - env.start) == ("491701234567", "3eb0c1f2a4d5e6f7", 100)


@pytest.mark.parametrize("method", ["next_frame", "next_node", "next_envelope"])
def test_parse_64k_buffer(benchmark, impl, method):
    """Frame (and decode or peek) every frame of a 64 KiB read."""
    codec = impl.Codec()
    data, count = buffer_of_frames(impl)

    if method == "next_frame":

        def parse():
            r = impl.FrameReader()
            r.feed(data)
            n = 0
            while r.next_frame() is not None:
                n += 1
            return n
    else:
        step = getattr(impl.FrameReader, method)

        def parse():
            r = impl.FrameReader()
            r.feed(data)
            n = 0
            while step(r, codec) is not None:
                n += 1
            return n

    assert benchmark(parse) == count
    benchmark.extra_info["frames"] = count
