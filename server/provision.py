"""Create many accounts straight in the store, for load tools and benchmarks.

No one-time codes and no SMS: each account gets one device with a random
32-byte secret and SCRAM keys derived like a real registration's, and an
Ed25519 identity key pair as the SDK makes one.  The credentials go to a
JSON-lines file (``{"phone", "device", "secret", "identity"}``, secret and
identity private key in hex), created with mode 0600: they log in as those
devices (and can link companions).
An existing account with the same number gets a new device (as a
re-registration does).  With ``devices`` > 1 each account also gets
``devices - 1`` linked companions (``Store.link_device``), listed in the
line's ``"companions"`` ([{"device", "secret"}, ...]): the multi-device
bench logs them all in.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from .accounts import device_keys
from .config import MIN_SCRAM_ITERATIONS
from .store import Store


def phone_number(prefix: str, index: int, width: int) -> str:
    return f"{prefix}{index:0{width}d}"


def provision(
    store: Store,
    count: int,
    out_path: str,
    *,
    prefix: str = "999",
    iterations: int = 4096,
    first: int = 0,
    devices: int = 1,
) -> list[dict]:
    """Create ``count`` accounts numbered prefix + index, each with ``devices``
    devices (a primary and linked companions); returns their credentials."""
    width = 12 - len(prefix)
    if not prefix.isdigit() or width < 5:
        raise ValueError(f"--prefix must be 1 to 7 digits, got {prefix!r}")
    if iterations < MIN_SCRAM_ITERATIONS:
        raise ValueError(
            f"--iterations must be at least {MIN_SCRAM_ITERATIONS} (RFC 7677), got {iterations}"
        )
    if count < 1 or first + count > 10**width:
        raise ValueError(f"--count must be between 1 and {10**width - first}")

    def derive(i: int):
        secrets = [os.urandom(32) for _ in range(devices)]
        keys = [device_keys(s, iterations) for s in secrets]  # as a registration derives them
        idents = [Ed25519PrivateKey.generate() for _ in range(devices)]
        return phone_number(prefix, first + i, width), secrets, keys, idents

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        derived = list(pool.map(derive, range(count)))  # PBKDF2 runs outside the GIL
    creds = []
    for phone, secrets, keys, idents in derived:
        public = [k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw) for k in idents]
        device, _ = store.register_device(phone, public[0], keys[0])
        private = idents[0].private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        line = {"phone": phone, "device": device, "secret": secrets[0].hex(),
                "identity": private.hex()}  # fmt: skip
        if devices > 1:  # (their identity private keys are not kept: the bench needs none)
            line["companions"] = [
                {"device": store.link_device(phone, p, k), "secret": s.hex()}
                for s, k, p in zip(secrets[1:], keys[1:], public[1:], strict=True)
            ]
        creds.append(line)
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        for c in creds:
            f.write(orjson.dumps(c) + b"\n")
    return creds


def load_credentials(path: str) -> list[dict]:
    with open(path, "rb") as f:
        return [orjson.loads(line) for line in f if line.strip()]
