"""Key-directory helpers for a vodozemac ``Account`` (docs/PROTOCOL.md section 9c).

The SDK's ``upload_keys`` takes raw keys and ``SignedKey``s; this module makes
them from a vodozemac ``Account`` with the signatures the server checks
(``signed_key_message``, signed by the account's Ed25519 key).  vodozemac is
imported by the caller: nothing here needs it at import time.
"""

from __future__ import annotations

import base64

from pigeon.core.events import SignedKey, signed_key_message


def b64decode(text: str) -> bytes:
    """vodozemac's unpadded base64 (keys, signatures) as bytes."""
    return base64.b64decode(text + "=" * (-len(text) % 4))


def identity_keys(account) -> tuple[bytes, bytes]:
    """(Curve25519, Ed25519) identity public keys of ``account``, 32 bytes each."""
    return account.curve25519_key.to_bytes(), b64decode(account.ed25519_key.to_base64())


def sign_key(account, device: str, key_id: str, key: bytes, fallback: bool = False) -> SignedKey:
    """``key`` (32 bytes) signed by ``account`` for device address ``device``."""
    sig = account.sign(signed_key_message(device, key_id, key, fallback))
    return SignedKey(key_id, bytes(key), b64decode(sig.to_base64()), fallback)


def vodozemac_keys(account, device: str) -> dict:
    """The ``upload_keys`` arguments for ``account``'s unpublished one-time keys and
    its fallback key (if it has one): ``await client.upload_keys(**vodozemac_keys(a, d))``,
    then ``account.mark_keys_as_published()``."""
    curve, ed = identity_keys(account)
    otks = tuple(
        sign_key(account, device, kid, k.to_bytes()) for kid, k in account.one_time_keys.items()
    )
    fallback = None
    for kid, k in account.fallback_key.items():
        fallback = sign_key(account, device, kid, k.to_bytes(), True)
    return {"curve25519": curve, "ed25519": ed, "one_time_keys": otks, "fallback": fallback}


class AccountIdentity:
    """A vodozemac ``Account``'s Ed25519 key as the ``identity`` of ``Client.verify``
    (``public``: its 32 bytes).  vodozemac keeps the private key inside the account
    (pickle the account to keep it), so ``private_bytes`` is None: such credentials
    carry no separate identity key, and link signatures are the account's to make."""

    def __init__(self, account):
        self.public = identity_keys(account)[1]

    def private_bytes(self):
        return None
