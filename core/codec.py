"""Choose the codec implementation once, at import.

The Cython fastpath is used when it is built; ``PIGEON_PUREPYTHON=1`` in the
environment forces the pure-Python reference codec.  ``IMPLEMENTATION`` says
which one this process runs ("fastpath" or "python"); ``pigeon --version``
and the server's startup log print it.
"""

from __future__ import annotations

import os

from . import _pycodec

if os.environ.get("PIGEON_PUREPYTHON", "") not in ("", "0"):
    _impl = _pycodec
else:
    try:
        from pigeon.fastpath import _codec as _impl  # type: ignore[no-redef]
    except ImportError:  # built with PIGEON_NO_EXTENSIONS=1, or no compiler
        _impl = _pycodec

IMPLEMENTATION: str = _impl.IMPLEMENTATION
Codec = _impl.Codec
FrameReader = _impl.FrameReader
Node = _impl.Node
Envelope = _impl.Envelope
Hot = _impl.Hot
fan_out = _impl.fan_out
fan_missing = _impl.fan_missing
Push = _impl.Push
copies = _impl.copies
copies_room = _impl.copies_room
ack_walk = _impl.ack_walk
store_plain = _impl.store_plain
delivered = _impl.delivered
acks = _impl.acks


def implementations() -> dict:
    """Both implementations by name, for tests and benchmarks that compare them."""
    out = {"python": _pycodec}
    try:
        from pigeon.fastpath import _codec

        out["fastpath"] = _codec
    except ImportError:
        pass
    return out
