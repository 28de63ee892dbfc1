"""The message's path through a worker in isolation: frame in, stored entry, frame out.

What the server does with the typical 1:1 message (12-digit recipient,
16-hex-digit id, type "text", 100 bytes of opaque content) between the
socket and LMDB, without the store: the hot path reads it from the received
buffer (``FrameReader.next_hot``), the entry that would be stored is made
once (``Codec.queue_entry``), and the delivery frame is spliced from it
into a connection's output buffer (``Codec.write_entry_frame``).  The full
path (``next_node`` + the event class) is measured beside it, and the same
for a message of three per-device payloads (``*_payloads_*``).  Both codec
implementations.  ``extra_info["frames"]`` is the batch, for messages/s.

    pytest bench/bench_hotpath.py --benchmark-enable --benchmark-json=bench/results/hotpath.json
"""

import pytest

from pigeon.core.events import Message
from pigeon.core.node import Limits
from pigeon.core.tokens import DICTIONARIES

pytestmark = pytest.mark.benchmark(min_time=0.001, max_time=2.0)

BATCH = 256


def frames(impl) -> bytes:
    node = impl.Node(
        "message", {"to": "491701234567", "id": "3eb0c1f2a4d5e6f7", "type": "text"}, bytes(100)
    )
    return impl.Codec().encode_frame(node) * BATCH


def test_read_hot(benchmark, impl):
    """256 messages from one received chunk, read by the hot path."""
    codec, data = impl.Codec(), frames(impl)

    def read():
        r = impl.FrameReader()
        r.feed(data)
        n = 0
        while (h := r.next_hot(codec)) is not None:
            n += h.kind
        return n

    assert benchmark(read) == BATCH
    benchmark.extra_info["frames"] = BATCH


def test_read_full(benchmark, impl):
    """The same 256 through the full decoder and the event class (the path before)."""
    codec, data = impl.Codec(), frames(impl)

    def read():
        r = impl.FrameReader()
        r.feed(data)
        n = 0
        while (node := r.next_node(codec)) is not None:
            n += len(Message.from_node(node).body) > 0
        return n

    assert benchmark(read) == BATCH
    benchmark.extra_info["frames"] = BATCH


def test_entry_and_delivery_frame(benchmark, impl):
    """Per message: the stored entry once, its delivery frame into an output buffer."""
    store_codec = impl.Codec(DICTIONARIES[1], Limits(max_frame=0xFFFFFF))
    body = bytes(100)

    def path():
        out = bytearray()
        for seq in range(1, BATCH + 1):
            entry = store_codec.queue_entry(0, 1_764_000_000_000, False, "491701234567:0",
                                            "3eb0c1f2a4d5e6f7", "text", body)  # fmt: skip
            store_codec.write_entry_frame(out, entry, seq)
        return len(out)

    assert benchmark(path) > BATCH * 100
    benchmark.extra_info["frames"] = BATCH


def payload_frames(impl) -> bytes:
    """A message to a user with two devices from a sender with one other
    device: three per-device payloads of 100 bytes (docs/PROTOCOL.md 9)."""
    devices = ["491701234567:0", "491701234567:1", "491709876543:2"]
    node = impl.Node(
        "message",
        {"to": "491701234567", "id": "3eb0c1f2a4d5e6f7", "type": "text"},
        [impl.Node("payload", {"device": d}, bytes(100)) for d in devices],
    )
    return impl.Codec().encode_frame(node) * BATCH


def test_read_payloads_hot(benchmark, impl):
    """256 three-payload messages read by the hot path (no Node per payload)."""
    codec, data = impl.Codec(), payload_frames(impl)

    def read():
        r = impl.FrameReader()
        r.feed(data)
        n = 0
        while (h := r.next_hot(codec)) is not None:
            n += len(h.payloads)
        return n

    assert benchmark(read) == 3 * BATCH
    benchmark.extra_info["frames"] = BATCH


def test_read_payloads_full(benchmark, impl):
    """The same 256 through the full decoder and the event class (the path before)."""
    codec, data = impl.Codec(), payload_frames(impl)

    def read():
        r = impl.FrameReader()
        r.feed(data)
        n = 0
        while (node := r.next_node(codec)) is not None:
            n += len(Message.from_node(node).payloads)
        return n

    assert benchmark(read) == 3 * BATCH
    benchmark.extra_info["frames"] = BATCH
