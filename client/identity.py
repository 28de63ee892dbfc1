"""A device's identity key pair, and the QR text of a pairing.

The identity key is an Ed25519 key pair made with ``cryptography``; the
server gets only the raw 32-byte public key (at ``verify`` and ``pair``),
and the private key stays with the device's credentials (``Credentials.identity``,
saved with them in a file only its owner reads).  Everything that makes or
uses one goes through ``new_identity`` and ``Identity``, so the end-to-end
issue can move them to vodozemac's Ed25519 key in one place.

QR text: ``PGN1,<ref>,<key>,<host:port>``: the pairing reference (32 hex
characters), the companion's public key in base64url without padding, and
the server the companion is connected to.  ``format_qr`` and ``parse_qr``
are the only places that write and read it.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pigeon.core.keys import link_payload, verify_link

__all__ = ["Identity", "PairingQR", "format_qr", "new_identity", "parse_qr", "verify_link"]

_RAW = serialization.Encoding.Raw


class Identity:
    """An Ed25519 identity key pair (``public``: the raw 32-byte public key)."""

    __slots__ = ("_key", "public")

    def __init__(self, key: Ed25519PrivateKey):
        self._key = key
        self.public = key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> Identity:
        return cls(Ed25519PrivateKey.from_private_bytes(bytes(raw)))

    def private_bytes(self) -> bytes:
        """The raw 32-byte private key: keep it as secret as the device secret."""
        return self._key.private_bytes(
            _RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def sign_link(self, user: str, companion_key: bytes) -> bytes:
        """The primary's signature that links the device with ``companion_key`` to ``user``."""
        return self.sign(link_payload(user, companion_key))

    def __repr__(self) -> str:  # never the private key
        return f"<Identity {self.public.hex()[:16]}...>"


def new_identity() -> Identity:
    """A fresh identity key pair for a new device."""
    return Identity(Ed25519PrivateKey.generate())


QR_PREFIX = "PGN1"
_QR_RE = re.compile(r"PGN1,([0-9a-f]{32}),([A-Za-z0-9_-]{43}),([^,\s]{1,300})")


@dataclass(frozen=True, slots=True)
class PairingQR:
    """What a companion's QR code holds."""

    ref: str
    key: bytes
    server: str  # host:port


def format_qr(ref: str, key: bytes, server: str) -> str:
    """The QR text of a pairing: ``PGN1,<ref>,<base64url key, no padding>,<host:port>``."""
    b64 = base64.urlsafe_b64encode(bytes(key)).rstrip(b"=").decode()
    return f"{QR_PREFIX},{ref},{b64},{server}"


def parse_qr(text: str) -> PairingQR:
    """Read a QR text; ValueError saying why if it is not one."""
    m = _QR_RE.fullmatch(text.strip())
    if m is None:
        raise ValueError("not a pigeon pairing code (PGN1,<ref>,<key>,<host:port>)")
    key = base64.urlsafe_b64decode(m.group(2) + "=")
    if len(key) != 32:
        raise ValueError("the key in the pairing code is not 32 bytes")
    return PairingQR(m.group(1), key, m.group(3))
