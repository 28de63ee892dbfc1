"""Identity keys and link signatures: what server and SDK must agree on byte for byte.

Every device's identity key (the content of ``verify`` and of ``pair``) is
a raw 32-byte Ed25519 public key (RFC 8032).  The primary links a companion
by signing, with its own identity private key,

    b"pigeon-link-v1\\x00" + user (ASCII digits) + b"\\x00" + companion key

(``link_payload``); the server checks the signature against the primary's
stored key and keeps it with the device, and device lists carry it, so any
user can check that a device was added by the account's primary and not by
the server (``verify_link``).  The signing itself is the SDK's
(client/identity.py); here is only what both sides check, with
``cryptography`` (the project writes no cryptographic primitive itself).

A key is checked by use, not decoded on arrival: the readers of ``verify``
and ``pair`` take exactly 32 bytes (error 200 otherwise), and
``Ed25519PublicKey.from_public_bytes`` accepts any 32 bytes.  Bytes that are
not an Ed25519 public key verify no signature at all, so an account whose
primary registered such a "key" cannot link a device (309).
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

__all__ = ["LINK_CONTEXT", "link_payload", "verify_link"]

LINK_CONTEXT = b"pigeon-link-v1\x00"


def link_payload(user: str, companion_key: bytes) -> bytes:
    """The bytes the primary of ``user`` signs to link the device with ``companion_key``."""
    return LINK_CONTEXT + user.encode("ascii") + b"\x00" + bytes(companion_key)


def verify_link(primary_key: bytes, user: str, companion_key: bytes, signature: bytes) -> bool:
    """True if ``signature`` is the primary's (``primary_key``) over ``companion_key``."""
    if len(primary_key) != 32 or len(signature) != 64:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(bytes(primary_key)).verify(
            bytes(signature), link_payload(user, companion_key)
        )
    except (InvalidSignature, ValueError):  # (ValueError: not a key cryptography can load)
        return False
    return True
