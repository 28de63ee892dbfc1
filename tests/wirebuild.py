"""Tiny helpers to write raw payloads by hand in tests (independent of the encoder)."""

from pigeon.core.tokens import LATEST
from pigeon.core.wire import BIN_8, BIN_16, BIN_32, LIST_8, LIST_16, PACKED


def tok(s: str) -> bytes:
    code = LATEST.codes[s]
    return bytes([code]) if code < 0x100 else code.to_bytes(2, "big")


def lst(n: int) -> bytes:
    return bytes([LIST_8, n]) if n < 256 else bytes([LIST_16]) + n.to_bytes(2, "big")


def binary(raw: bytes, width: int = 0) -> bytes:
    if width == 0:
        width = 1 if len(raw) < 256 else 2 if len(raw) < 65536 else 4
    head = {1: BIN_8, 2: BIN_16, 4: BIN_32}[width]
    return bytes([head]) + len(raw).to_bytes(width, "big") + raw


def packed(s: str) -> bytes:
    return bytes([PACKED, len(s)]) + bytes.fromhex(s + "0" if len(s) & 1 else s)


def frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + payload
