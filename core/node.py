"""The node model and address syntax shared by both codec implementations.

A node is a tag, an ordered mapping of attributes (str -> str) and optional
content: child nodes or opaque bytes.  Each codec implementation has its own
``Node`` class (the fastpath's is a compiled class); both have the same
attributes, compare equal to each other, and either codec encodes either.
``pigeon.core.Node`` is the one that goes with the selected codec.

Addresses are strings with a fixed syntax; the encoder gives the device and
group forms a compact encoding, and decoding gives back the same text:

    491701234567        a user: E.164 digits without "+", 8 to 15, no leading 0
    491701234567:2      device 2 of that user (0 = primary, up to 255)
    g:120363012345      a group (1 to 20 digits)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MIN_PHONE_DIGITS = 8
MAX_PHONE_DIGITS = 15
MAX_DEVICE = 255
MAX_GROUP_DIGITS = 20

_PHONE = r"[1-9][0-9]{7,14}"
_DEVICE_NO = r"(?:0|[1-9][0-9]{0,2})"
USER_RE = re.compile(_PHONE)
DEVICE_RE = re.compile(rf"({_PHONE}):({_DEVICE_NO})")
GROUP_RE = re.compile(r"g:([0-9]{1,20})")


def valid_phone(phone: str) -> bool:
    """An E.164 number as the protocol writes it: 8-15 ASCII digits, no leading 0."""
    return USER_RE.fullmatch(phone) is not None


def address_kind(text: str) -> str | None:
    """'user', 'device' or 'group', or None if ``text`` is not an address."""
    if USER_RE.fullmatch(text):
        return "user"
    m = DEVICE_RE.fullmatch(text)
    if m and int(m.group(2)) <= MAX_DEVICE:
        return "device"
    if GROUP_RE.fullmatch(text):
        return "group"
    return None


def device_address(phone: str, device: int) -> str:
    if not valid_phone(phone):
        raise ValueError(f"not an E.164 phone number (8-15 digits, no '+'): {phone!r}")
    if not 0 <= device <= MAX_DEVICE:
        raise ValueError(f"device number out of range 0-{MAX_DEVICE}: {device}")
    return f"{phone}:{device}"


def split_device(address: str) -> tuple[str, int]:
    """(phone, device number) of a device address; ValueError otherwise."""
    m = DEVICE_RE.fullmatch(address)
    if not m or int(m.group(2)) > MAX_DEVICE:
        raise ValueError(f"not a device address: {address!r}")
    return m.group(1), int(m.group(2))


def group_address(gid: str) -> str:
    if not GROUP_RE.fullmatch("g:" + gid):
        raise ValueError(f"not a group id (1-20 digits): {gid!r}")
    return "g:" + gid


class Node:
    """tag, attrs (dict of str -> str), content (None, bytes, or list of nodes)."""

    __slots__ = ("tag", "attrs", "content")

    def __init__(self, tag: str, attrs: dict | None = None, content=None):
        self.tag = tag
        self.attrs = {} if attrs is None else attrs
        self.content = content

    def __eq__(self, other: object) -> bool:
        try:
            return (
                self.tag == other.tag  # type: ignore[attr-defined]
                and self.attrs == other.attrs  # type: ignore[attr-defined]
                and self.content == other.content  # type: ignore[attr-defined]
            )
        except AttributeError:
            return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def get(self, key: str, default=None):
        return self.attrs.get(key, default)

    def __repr__(self) -> str:
        return format_node(self)


def format_node(node, *, max_bytes: int = 16) -> str:
    """Render a node in the XML-like notation used by docs/PROTOCOL.md.

    Content bytes show as hex when at most ``max_bytes`` long, else as
    ``{N bytes}``.
    """
    parts = [node.tag]
    for k, v in node.attrs.items():
        parts.append(f'{k}="{v}"')
    head = " ".join(parts)
    c = node.content
    if c is None:
        return f"<{head}/>"
    if isinstance(c, (bytes, bytearray, memoryview)):
        b = bytes(c)
        inner = ("0x" + b.hex()) if len(b) <= max_bytes else f"{{{len(b)} bytes}}"
    else:
        inner = "".join(format_node(ch, max_bytes=max_bytes) for ch in c)
    return f"<{head}>{inner}</{node.tag}>"


@dataclass(frozen=True, slots=True)
class Limits:
    """Decoder and encoder limits; every one is checked and is configurable.

    max_frame:    largest frame payload in bytes (the 3-byte header caps it at 16 MiB - 1)
    max_depth:    deepest nesting of nodes (a top-level node is depth 1)
    max_attrs:    most attributes on one node
    max_string:   longest literal tag, attribute name or value, in bytes
                  (packed digit/hex strings carry at most 255 symbols by construction)
    max_children: most child nodes in one content list
    """

    max_frame: int = 1 << 20
    max_depth: int = 8
    max_attrs: int = 32
    max_string: int = 1024
    max_children: int = 1024

    def __post_init__(self):
        if not 1 <= self.max_frame <= 0xFFFFFF:
            raise ValueError("max_frame must be between 1 and 16777215 (3-byte length)")
        for name in ("max_depth", "max_attrs", "max_string", "max_children"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_attrs > 32767 or self.max_children > 65535:
            raise ValueError("max_attrs/max_children exceed what a list header can carry")


DEFAULT_LIMITS = Limits()
