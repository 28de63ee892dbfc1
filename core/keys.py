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
``cryptography``.

``valid_public_key``: ``Ed25519PublicKey.from_public_bytes`` takes any 32
bytes (it does not decode the point), so the encoding is also checked as
RFC 8032 section 5.1.3 decodes it: y below p, and x^2 = (y^2 - 1) / (d y^2 + 1)
with a square root (and x = 0 only with the sign bit clear).  About half of
all random 32-byte strings are not points: such a "key" could never verify
a signature, and is refused at registration and at pairing (error 200).
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

__all__ = ["LINK_CONTEXT", "link_payload", "valid_public_key", "verify_link"]

LINK_CONTEXT = b"pigeon-link-v1\x00"

_P = 2**255 - 19
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


def _is_point(raw: bytes) -> bool:
    """RFC 8032 5.1.3: does ``raw`` decode to a point of edwards25519?"""
    y = int.from_bytes(raw, "little") & ((1 << 255) - 1)
    sign = raw[31] >> 7
    if y >= _P:
        return False
    u = (y * y - 1) % _P
    v = (_D * y * y + 1) % _P
    x = u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P) % _P
    vx2 = v * x * x % _P
    if vx2 == (-u) % _P:
        x = x * _SQRT_M1 % _P
    elif vx2 != u:
        return False
    return not (x == 0 and sign)


def valid_public_key(raw) -> bool:
    """True if ``raw`` is 32 bytes that encode an Ed25519 public key."""
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != 32:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(bytes(raw))
    except ValueError:
        return False
    return _is_point(bytes(raw))


def link_payload(user: str, companion_key: bytes) -> bytes:
    """The bytes the primary of ``user`` signs to link the device with ``companion_key``."""
    return LINK_CONTEXT + user.encode("ascii") + b"\x00" + bytes(companion_key)


def verify_link(primary_key: bytes, user: str, companion_key: bytes, signature: bytes) -> bool:
    """True if ``signature`` is the primary's (``primary_key``) over ``companion_key``."""
    if not valid_public_key(primary_key) or len(signature) != 64:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(bytes(primary_key)).verify(
            bytes(signature), link_payload(user, companion_key)
        )
    except InvalidSignature:
        return False
    return True
