"""Media capabilities: upload grants and download tokens, HMAC-SHA256 with one server key.

The chat server grants an upload (``issue``) and the media service checks
it (``check``); they share nothing but the key in ``DATA_DIR/media.key``
(32 random bytes, 0600, made by the supervisor at its first start:
``load_key``).  A grant binds the account, the exact size and SHA-256 of
the ciphertext, the media class and an expiry (ms, the server's clock), so
it cannot be used for another file, another size or after it expires; the
media service also refuses a grant presented for a URL naming another hash.

A download token is ``HMAC(key, "download" || sha256)``: whoever finished
an upload of a file is handed it (it is the same for every uploader of the
same ciphertext) and passes it to its recipients inside the end-to-end
encrypted message.  It cannot be computed from the hash without the key,
so knowing a hash (say, from a forwarded link) gives nothing; and, since
the media service hands it only after a whole upload whose hash it checked,
re-uploading is no shortcut either.  Both travel base64url-encoded in the
``Authorization: Bearer`` header, never in a URL.

HMAC and the comparison are the standard library's (``hmac``,
``hashlib``, ``hmac.compare_digest``); nothing here is hand-made crypto.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import struct
from dataclasses import dataclass

KEY_FILE = "media.key"
_VERSION = 1
_HEAD = struct.Struct(">BQQ32s")  # version, expires (ms), size, sha256
_UPLOAD = b"pigeon-media-upload\x00"
_DOWNLOAD = b"pigeon-media-download\x00"
MAC_SIZE = 32


class GrantError(Exception):
    """A token that is malformed, forged or expired (``str`` says which)."""


@dataclass(frozen=True, slots=True)
class Grant:
    account: str
    size: int
    sha256: bytes
    media_class: str
    expires: int  # ms


def load_key(data_dir: str, create: bool = False) -> bytes:
    """The media key from ``data_dir/media.key``; made (0600, O_EXCL) when ``create``."""
    path = os.path.join(data_dir, KEY_FILE)
    if create:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            try:
                os.write(fd, os.urandom(32))
                os.fsync(fd)
            finally:
                os.close(fd)
        os.chmod(path, 0o600)
    with open(path, "rb") as f:
        key = f.read()
    if len(key) != 32:
        raise ValueError(f"{path}: a media key is 32 bytes, this one {len(key)}")
    return key


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise GrantError("not base64url") from None


def issue(key: bytes, g: Grant) -> bytes:
    """The upload grant's bytes (what the chat server sends in its ``upload`` answer)."""
    acct, cls = g.account.encode(), g.media_class.encode()
    if len(acct) > 255 or len(cls) > 255 or len(g.sha256) != 32:
        raise ValueError("account or class too long, or a hash that is not 32 bytes")
    body = _HEAD.pack(_VERSION, g.expires, g.size, g.sha256) + bytes([len(cls)]) + cls
    body += bytes([len(acct)]) + acct
    return body + hmac.new(key, _UPLOAD + body, hashlib.sha256).digest()


def check(key: bytes, token: bytes, now: int) -> Grant:
    """The grant ``token`` carries, if its MAC is right and it has not expired."""
    if len(token) < _HEAD.size + 2 + MAC_SIZE:
        raise GrantError("too short for an upload grant")
    body, mac = token[:-MAC_SIZE], token[-MAC_SIZE:]
    if not hmac.compare_digest(mac, hmac.new(key, _UPLOAD + body, hashlib.sha256).digest()):
        raise GrantError("not a grant of this server")
    version, expires, size, sha = _HEAD.unpack_from(body)
    if version != _VERSION:
        raise GrantError(f"grant version {version} unknown")
    i = _HEAD.size
    n = body[i]
    cls = body[i + 1 : i + 1 + n]
    i += 1 + n
    if i >= len(body) or i + 1 + body[i] != len(body):
        raise GrantError("malformed grant")
    acct = body[i + 1 :]
    if expires <= now:
        raise GrantError("the grant has expired: ask for a new one")
    return Grant(acct.decode(errors="replace"), size, sha, cls.decode(errors="replace"), expires)


def download_token(key: bytes, sha256: bytes) -> bytes:
    """The capability that lets its holder download the file ``sha256``."""
    return hmac.new(key, _DOWNLOAD + sha256, hashlib.sha256).digest()


def download_ok(key: bytes, sha256: bytes, token: bytes) -> bool:
    return hmac.compare_digest(download_token(key, sha256), token)
