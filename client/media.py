"""Media by link, the client's half: encrypt, upload with resume, download, decrypt.

A file never goes through the chat connection.  ``send_media`` encrypts it
with a fresh random AES-256 key in GCM mode (``cryptography``'s streaming
``Cipher(AES, GCM)``: one key and one random 96-bit nonce per file, the
16-byte tag after the ciphertext; nothing here is a home-made
construction), into a temporary file, so memory does not grow with the
file.  It asks the chat server for an upload grant (size and SHA-256 of
the ciphertext, ``request_upload``), PUTs the ciphertext to the media
service with aiohttp (asking the offset first and resuming from it after a
broken connection), and sends a message whose body is the media payload
(``Media.pack``: msgpack of the URL, media id, download token, key, nonce,
hashes, sizes, mime type, file name, and a small JPEG thumbnail for images
when Pillow is installed).  The body is what the application encrypts end
to end; the chat server and the media service then see neither the key
nor the plaintext.

``download`` GETs the ciphertext (the token in ``Authorization: Bearer``,
resuming with a Range request after a broken connection), checks its
SHA-256 against the payload before anything is decrypted, decrypts into a
temporary file next to ``dest`` and renames it into place only when the
GCM tag verified: a tampered or truncated file raises ``MediaError`` and
leaves nothing at ``dest``.  Progress callbacks get (bytes done, total).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import mimetypes
import os
import ssl as _ssl
import tempfile
from dataclasses import dataclass

import aiohttp
import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

CHUNK = 256 << 10
TAG_SIZE = 16
PAYLOAD_VERSION = 1
THUMB_MAX = 96  # pixels, the longer side
#: the largest ciphertext ``download`` fetches by default: the server's own
#: media-max-bytes default (100 MiB) and its tag
DOWNLOAD_MAX = (100 << 20) + TAG_SIZE
_CLASSES = {"image": "image", "video": "video", "audio": "audio"}


class MediaError(Exception):
    """An upload or download that failed (``status``: the HTTP status, if any;
    ``body``: the service's JSON refusal, if any)."""

    def __init__(self, text: str, status: int | None = None, body: dict | None = None):
        super().__init__(text)
        self.status = status
        self.body = body or {}


@dataclass(frozen=True, slots=True)
class Media:
    """What a media message carries: everything a recipient needs, nothing the
    servers need to keep."""

    url: str  # where to GET the ciphertext
    id: str  # the ciphertext's SHA-256, hex: the media id
    token: bytes  # the download capability (Authorization: Bearer)
    key: bytes  # AES-256 key
    nonce: bytes  # GCM nonce, 12 bytes
    sha256: bytes  # of the ciphertext (what the recipient checks first)
    size: int  # of the plaintext
    enc_size: int  # of the ciphertext (plaintext + 16-byte tag)
    mime: str
    name: str | None = None
    thumbnail: bytes | None = None

    def pack(self) -> bytes:
        d = {"v": PAYLOAD_VERSION, "url": self.url, "id": self.id, "token": self.token,
             "key": self.key, "nonce": self.nonce, "sha256": self.sha256, "size": self.size,
             "enc_size": self.enc_size, "mime": self.mime}  # fmt: skip
        if self.name is not None:
            d["name"] = self.name
        if self.thumbnail is not None:
            d["thumb"] = self.thumbnail
        return msgpack.packb(d)

    @classmethod
    def unpack(cls, body: bytes) -> Media:
        try:
            d = msgpack.unpackb(body)
            if d.get("v") != PAYLOAD_VERSION:
                raise MediaError(f"media payload version {d.get('v')!r} unknown")
            m = cls(d["url"], d["id"], d["token"], d["key"], d["nonce"], d["sha256"],
                    d["size"], d["enc_size"], d["mime"], d.get("name"), d.get("thumb"))  # fmt: skip
        except (ValueError, TypeError, KeyError, AttributeError, msgpack.UnpackException) as exc:
            raise MediaError(f"not a media payload: {exc}") from None
        # every field of its type: a peer's payload with "size": "huge" or "name": 7
        # reached the chat's rendering and ended it (probe, 2026-12-04)
        if not (isinstance(m.url, str) and isinstance(m.id, str) and isinstance(m.mime, str)
                and isinstance(m.token, bytes) and isinstance(m.key, bytes)
                and isinstance(m.nonce, bytes) and isinstance(m.sha256, bytes)
                and type(m.size) is int and type(m.enc_size) is int
                and (m.name is None or isinstance(m.name, str))
                and (m.thumbnail is None or isinstance(m.thumbnail, bytes))):  # fmt: skip
            raise MediaError("not a media payload: a field of the wrong type")
        if len(m.key) != 32 or len(m.nonce) != 12 or len(m.sha256) != 32:
            raise MediaError("not a media payload: bad key, nonce or hash length")
        if m.size < 0 or m.enc_size != m.size + TAG_SIZE:
            raise MediaError("not a media payload: its sizes do not agree")
        return m


def class_of_mime(mime: str) -> str:
    """The media class of a mime type: image, video, audio, else document."""
    return _CLASSES.get(mime.partition("/")[0], "document")


def encrypt_file(src: str, dst: str, key: bytes, nonce: bytes) -> tuple[int, int, bytes]:
    """Encrypt ``src`` into ``dst`` (AES-256-GCM, tag appended), streaming; returns
    (plaintext size, ciphertext size, SHA-256 of the ciphertext)."""
    enc = Cipher(algorithms.AES(key), modes.GCM(nonce)).encryptor()
    h = hashlib.sha256()
    size = 0
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(src, "rb") as fin, open(fd, "wb") as fout:
        while chunk := fin.read(CHUNK):
            size += len(chunk)
            out = enc.update(chunk)
            h.update(out)
            fout.write(out)
        out = enc.finalize() + enc.tag
        h.update(out)
        fout.write(out)
    return size, size + TAG_SIZE, h.digest()


def decrypt_file(src: str, dst: str, key: bytes, nonce: bytes) -> None:
    """Decrypt ``src`` (ciphertext + tag) into ``dst``; raises MediaError if the tag
    does not verify (``dst`` is then removed)."""
    total = os.path.getsize(src)
    if total < TAG_SIZE:
        raise MediaError("ciphertext shorter than its tag")
    with open(src, "rb") as fin:
        fin.seek(total - TAG_SIZE)
        tag = fin.read(TAG_SIZE)
        fin.seek(0)
        dec = Cipher(algorithms.AES(key), modes.GCM(nonce, tag)).decryptor()
        left = total - TAG_SIZE
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "wb") as fout:
            while left:
                chunk = fin.read(min(CHUNK, left))
                left -= len(chunk)
                fout.write(dec.update(chunk))
            try:
                fout.write(dec.finalize())
            except InvalidTag:
                fout.close()
                os.unlink(dst)
                raise MediaError("the file was tampered with: its tag does not verify") from None


def thumbnail(path: str) -> bytes | None:
    """A small JPEG of an image, or None (no Pillow, or not an image it reads)."""
    try:
        from PIL import Image
    except ImportError:
        return None
    try:
        import io

        with Image.open(path) as im:
            im.thumbnail((THUMB_MAX, THUMB_MAX))
            out = io.BytesIO()
            im.convert("RGB").save(out, "JPEG", quality=60)
            return out.getvalue()
    except (OSError, ValueError):
        return None


def _auth(token: bytes) -> dict:
    import base64

    return {"Authorization": "Bearer " + base64.urlsafe_b64encode(token).rstrip(b"=").decode()}


async def _refusal(resp) -> MediaError:
    try:
        if resp.method == "HEAD":  # no body: the service repeats it in a header
            body = json.loads(resp.headers.get("Media-Error", "{}"))
        else:
            body = await resp.json(content_type=None)
    except (ValueError, aiohttp.ClientError):
        body = {}
    if not isinstance(body, dict):
        body = {}
    return MediaError(f"media service: {resp.status} {body.get('error', resp.reason)}",
                      resp.status, body)  # fmt: skip


def _ssl_for(url: str, ssl):
    if not url.startswith("https://"):
        return None
    return ssl if ssl is not None else _ssl.create_default_context()


async def upload_file(url: str, token: bytes, path: str, *, ssl=None, progress=None,
                      attempts: int = 5, session: aiohttp.ClientSession | None = None,
                      timeout: float = 60.0) -> dict:  # fmt: skip
    """PUT the file at ``path`` to ``url`` with the grant ``token``, resuming from the
    offset the service holds after a broken connection (up to ``attempts`` tries);
    returns the service's answer (``id``, ``path``, ``token``, ``size``)."""
    total = os.path.getsize(path)
    headers = _auth(token)
    sslctx = _ssl_for(url, ssl)
    own = session is None
    if own:
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(sock_read=timeout))
    try:
        last: Exception | None = None
        for _ in range(attempts):
            try:
                async with session.head(url, headers=headers, ssl=sslctx) as r:
                    if r.status != 200:
                        raise await _refusal(r)
                    offset = int(r.headers["Upload-Offset"])
                send = total - offset
                h = {**headers, "Content-Length": str(send),
                     "Content-Type": "application/octet-stream"}  # fmt: skip
                if offset:
                    h["Content-Range"] = f"bytes {offset}-{total - 1}/{total}"
                async with session.put(url, data=_chunks(path, offset, total, progress),
                                       headers=h, ssl=sslctx) as r:  # fmt: skip
                    if r.status == 201:
                        return await r.json()
                    if r.status in (408, 409, 503):  # stalled, busy, draining: ask again
                        last = await _refusal(r)
                        await asyncio.sleep(0.2)
                        continue
                    raise await _refusal(r)
            except (TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
                last = exc
                await asyncio.sleep(0.2)
        raise MediaError(f"upload failed after {attempts} attempts: {last}")
    finally:
        if own:
            await session.close()


async def _chunks(path: str, offset: int, total: int, progress):
    with open(path, "rb") as f:
        f.seek(offset)
        done = offset
        while chunk := await asyncio.to_thread(f.read, CHUNK):
            yield chunk
            done += len(chunk)
            if progress is not None:
                progress(done, total)


async def send_media(client, to: str, path: str, *, media_class: str | None = None,
                     mime: str | None = None, progress=None, ssl=None,
                     type: str | None = None) -> tuple[object, Media]:  # fmt: skip
    """Encrypt, upload and send the file at ``path`` to ``to``; returns (the message's
    ServerAck, the Media sent).  ``progress(done, total)`` follows the upload."""
    mime = mime or mimetypes.guess_type(path)[0] or "application/octet-stream"
    media_class = media_class or class_of_mime(mime)
    key, nonce = os.urandom(32), os.urandom(12)
    fd, tmp = tempfile.mkstemp(prefix="pigeon-media-")
    os.close(fd)
    try:
        size, enc_size, sha = await asyncio.to_thread(encrypt_file, path, tmp, key, nonce)
        grant = await client.request_upload(enc_size, sha, media_class)
        sslctx = ssl if ssl is not None else getattr(client, "ssl", None)
        done = await upload_file(grant.url, grant.token, tmp, ssl=sslctx, progress=progress)
    finally:
        os.unlink(tmp)
    base = grant.url.split("/v1/", 1)[0]
    thumb = await asyncio.to_thread(thumbnail, path) if media_class == "image" else None
    m = Media(base + done["path"], done["id"], _unb64(done["token"]), key, nonce, sha, size,
              enc_size, mime, os.path.basename(path), thumb)  # fmt: skip
    ack = await client.send(to, m.pack(), type=type or media_class)
    return ack, m


def _unb64(text: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


async def download(media: Media, dest: str, *, ssl=None, progress=None, attempts: int = 5,
                   timeout: float = 60.0, max_bytes: int = DOWNLOAD_MAX) -> str:  # fmt: skip
    """GET ``media`` into ``dest`` (a file path), check its hash, decrypt; returns
    ``dest``.  Raises MediaError on a refusal, a hash mismatch or a bad tag, and
    before any request when the payload says more than ``max_bytes`` (its size is
    the sender's word: a peer's 120 MiB payload filled the disk before the hash
    check)."""
    if media.enc_size > max_bytes:
        raise MediaError(f"{media.enc_size} bytes is more than this client downloads "
                         f"({max_bytes}: max_bytes)")  # fmt: skip
    sslctx = _ssl_for(media.url, ssl)
    headers = _auth(media.token)
    d = os.path.dirname(os.path.abspath(dest))
    fd, enc = tempfile.mkstemp(prefix=".pigeon-media-", dir=d)
    os.close(fd)
    try:
        h = hashlib.sha256()
        have = 0
        last: Exception | None = None
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(sock_read=timeout)) as s:
            for _ in range(attempts):
                if have >= media.enc_size:
                    break
                hh = dict(headers)
                if have:
                    hh["Range"] = f"bytes={have}-"
                try:
                    async with s.get(media.url, headers=hh, ssl=sslctx) as r:
                        if r.status not in (200, 206):
                            raise await _refusal(r)
                        if have and r.status != 206:
                            raise MediaError("the service ignored the Range request", r.status)
                        with open(enc, "ab") as f:
                            async for chunk in r.content.iter_chunked(CHUNK):
                                have += len(chunk)
                                if have > media.enc_size:
                                    raise MediaError("more bytes than the payload's size")
                                f.write(chunk)
                                h.update(chunk)
                                if progress is not None:
                                    progress(have, media.enc_size)
                except (TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
                    last = exc
                    await asyncio.sleep(0.2)
        if have != media.enc_size:
            raise MediaError(f"download incomplete ({have} of {media.enc_size} bytes): {last}")
        if h.digest() != media.sha256:
            raise MediaError("the file's hash does not match the message: not decrypting")
        part = dest + ".part"
        await asyncio.to_thread(decrypt_file, enc, part, media.key, media.nonce)
        os.replace(part, dest)
        return dest
    finally:
        os.unlink(enc)
