"""pigeon.core: the sans-IO protocol.

Token dictionary, node model, framing and node codec, events, and the
connection state machine for both roles.  Nothing here does I/O: the server,
the asyncio and trio clients, the load tools and the tests all drive the same
objects with bytes.
"""

from .errors import (
    CodecError,
    EmptyFrame,
    ErrorCode,
    FrameTooLarge,
    LimitExceeded,
    LocalProtocolError,
    MalformedNode,
    ProtocolError,
    RemoteProtocolError,
    UnknownToken,
)
from .node import (
    DEFAULT_LIMITS,
    Limits,
    address_kind,
    device_address,
    format_node,
    group_address,
    split_device,
    valid_phone,
)
from .tokens import DICTIONARIES, LATEST, LATEST_VERSION, Dictionary

__version__ = "0.1.0"

# The codec names resolve on first use (PEP 562): pigeon.fastpath imports
# pigeon.core submodules while it initialises, and must not trigger the
# implementation choice (which imports pigeon.fastpath) half-way through.
_FROM_CODEC = {"IMPLEMENTATION", "Codec", "Envelope", "FrameReader", "Node"}


def __getattr__(name: str):
    if name in _FROM_CODEC:
        from . import codec

        return getattr(codec, name)
    raise AttributeError(f"module 'pigeon.core' has no attribute {name!r}")


__all__ = [
    "IMPLEMENTATION",
    "Codec",
    "FrameReader",
    "CodecError",
    "EmptyFrame",
    "ErrorCode",
    "FrameTooLarge",
    "LimitExceeded",
    "LocalProtocolError",
    "MalformedNode",
    "ProtocolError",
    "RemoteProtocolError",
    "UnknownToken",
    "DEFAULT_LIMITS",
    "Envelope",
    "Limits",
    "Node",
    "address_kind",
    "device_address",
    "group_address",
    "split_device",
    "valid_phone",
    "format_node",
    "DICTIONARIES",
    "LATEST",
    "LATEST_VERSION",
    "Dictionary",
    "__version__",
]
