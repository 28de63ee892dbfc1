"""The media service: encrypted files uploaded by link, an aiohttp application.

Theory of operation.  A client never sends a file through the chat
connection.  It encrypts the file with a fresh key, asks the chat server
for an upload (``<upload>``, docs/PROTOCOL.md section 9b), gets a grant
bound to its account and the ciphertext's size and SHA-256
(server/mediagrant.py), and PUTs the ciphertext here with the grant in the
``Authorization`` header.  When the last byte is in and the hash matches,
the file is renamed into place under its hash and the client gets the
media id (the hex hash), the download path and a download token; it sends
all three, with the key, inside the end-to-end encrypted message.  The
recipient GETs the file with that token, checks the hash and decrypts.
This process sees ciphertext only and never a key.

HTTP API (all bodies of refusals are JSON ``{"error": ..., "limit": ...}``):

* ``HEAD /v1/upload/{sha256}`` (grant): ``Upload-Offset`` is how many bytes
  of this upload the server holds (the whole size once it is stored).
* ``PUT /v1/upload/{sha256}`` (grant), ``Content-Range: bytes S-E/TOTAL``
  optional for the first part: appends from S, which must be the offset
  the server holds (416 with ``offset`` otherwise).  201 with ``{"id",
  "path", "token", "size"}`` when the file is complete and checked; 202
  with ``offset`` when a part was stored but more is due; 422 (and the
  partial file deleted) when the hash or size does not match.
* ``GET /v1/media/{sha256}`` (download token): the ciphertext, with Range
  requests (206) answered by aiohttp's FileResponse; HEAD alike.
* ``GET /v1/health``: ``{"status": "ready"|"draining"}``; ``GET /metrics``:
  Prometheus text, answered to loopback peers only (403 otherwise).

Why an offset query plus ``PUT`` with ``Content-Range`` and not tus: it is
two plain HTTP requests any client library (curl too) can make, with no
protocol headers to negotiate (tus needs ``Tus-Resumable``, a creation
step and PATCH with its own content type); the upload already has a fixed
name (its hash) and a fixed size (in the grant), which is all tus's
creation step would add.

Storage is behind ``LocalStorage`` (so an object store can sit there
later): files content-addressed by the ciphertext's SHA-256 under
``DATA_DIR/media/objects/ab/<hash>``, uploads in progress under
``DATA_DIR/media/partial/<hash>.<account>``, fsync'd and renamed into
place when complete: a crash never leaves a partial file at a final name.
A second upload of the same ciphertext is received and checked like the
first, then its partial file is dropped (one copy on disk) and the stored
file's time is renewed: ``media-ttl`` runs from the last upload.  Files
are 0600, directories 0700.

Downloads use ``loop.sendfile`` (aiohttp's FileResponse) where the loop
has it: asyncio's does on Linux and FreeBSD for plain TCP; uvloop's does
not (it raises NotImplementedError and aiohttp copies through user space),
which is why this process runs the asyncio loop unless ``media-loop``
says otherwise.  Over TLS the kernel cannot encrypt, so asyncio copies too.

Disk: a PUT is refused (507) unless the file system keeps
``media-disk-reserve`` free after its bytes, checked before it and every
DISK_CHECK bytes during it (what arrived is kept for a resume), and a
write that finds the disk full is 507 too, not a 500: uploads could fill
the disk the chat store's LMDB shares.

A grant is good for one upload: once its file is stored (201) or fails
the hash check (422) it is spent until it expires (``media-spent-grants``
of them kept, in memory): a PUT with a stored one answers the same 201
again without reading a byte, HEAD says the whole size; a failed one is
403.  Otherwise one grant let its holder send (and have hashed) any number
of times its size until it expired, past ``media-quota-bytes``.

A resume goes on from the SHA-256 state the previous part of that upload
left, kept in memory (``media-resume-states`` of them, the least recently
used dropped first): only a resume without one (after a restart, or
evicted) reads and hashes the partial file again, counted in
``pigeon_media_rehashed_bytes``.

Connections: ``media-connections`` in all and ``media-connections-per-ip``
from one source address, counted from the TCP accept, TLS handshakes too
(``_Acceptor``, ``Gate``): past the per-address cap a new one is closed
before a byte of it is read; past the total it takes the place of the
longest-idle one (only connections in the middle of a request are never
pushed out); each has ``media-header-timeout`` to send
a request's headers, from its connect and from the end of each answer (an
idle or slowly-sending connection was held for aiohttp's default hour),
and at most ``media-max-headers`` headers of ``media-max-header-bytes``.

Limits: ``media-transfers-per-ip`` requests at once and
``media-request-rate`` a second per source address (429); an upload that
receives nothing for ``media-stall-timeout`` seconds, or less than
``media-min-upload-rate`` on average over one, is cut (what arrived is
kept for a resume), a download that has not ended within
``media-stall-timeout`` plus its size at ``media-min-download-rate`` is cut.  The process
drains on SIGTERM (closes its listener, says "closed" to the supervisor,
lets transfers run up to DRAIN_TIMEOUT seconds) and leaves when its
supervisor's pipe reaches EOF.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import ipaddress
import logging
import os
import re
import signal
import ssl
import sys
import time
import weakref
from collections import OrderedDict

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from . import child, log, mediagrant
from .limits import LeakyTable, source_key
from .listeners import listen_socket, raise_open_files_limit, tls_context
from .store import default_clock, make_private

logger = logging.getLogger("pigeon.media")

CHUNK = 256 << 10
SENDFILE_PIECE = 4 * CHUNK  # a download's sendfile(2) call: each within media-stall-timeout
DISK_CHECK = 16 << 20  # an upload checks the free space again every this many bytes
DRAIN_TIMEOUT = 8.0  # the supervisor kills after 10 s
ADDRESS_TABLE = 10_000  # source addresses whose request rate is remembered
_HEX = re.compile(r"[0-9a-f]{64}")
_RANGE = re.compile(r"bytes ([0-9]+)-([0-9]+)/([0-9]+)")  # not \d: other scripts' digits
_EMPTY_SUFFIX = re.compile(r"bytes=-0+$", re.ASCII | re.IGNORECASE)  # (Range: as aiohttp reads it)


class MediaRefused(web.HTTPException):
    """A refusal with a JSON body naming the limit or the reason."""

    def __init__(self, status: int, error: str, **fields):
        self.status_code = status
        body = orjson.dumps({"error": error, **fields}).decode()
        # the same JSON in a header, for HEAD, whose answers have no body
        super().__init__(text=body, content_type="application/json",
                         headers={"Media-Error": body})  # fmt: skip


# -- storage ----------------------------------------------------------------------


class LocalStorage:
    """Content-addressed files on local disk (the interface an object store would fill).

    ``open_partial``/``commit``/``drop_partial`` carry an upload, ``stat``
    and ``path`` a download, ``purge`` expiry.  Times are the server's
    clock (ms), kept as file modification times.
    """

    def __init__(self, root: str):
        self.root = root
        self.objects = os.path.join(root, "objects")
        self.partial = os.path.join(root, "partial")
        for d in (root, self.objects, self.partial):
            os.makedirs(d, mode=0o700, exist_ok=True)
            make_private(d, 0o700)

    def path(self, sha_hex: str) -> str:
        return os.path.join(self.objects, sha_hex[:2], sha_hex)

    def partial_path(self, account: str, sha_hex: str) -> str:
        return os.path.join(self.partial, f"{sha_hex}.{account}")

    def stat(self, sha_hex: str) -> os.stat_result | None:
        try:
            return os.stat(self.path(sha_hex))
        except FileNotFoundError:
            return None

    def partial_size(self, account: str, sha_hex: str) -> int:
        try:
            return os.stat(self.partial_path(account, sha_hex)).st_size
        except FileNotFoundError:
            return 0

    def open_partial(self, account: str, sha_hex: str) -> int:
        """A descriptor of the upload's partial file (made 0600), locked for this writer;
        raises BlockingIOError if another request (any process) writes it now."""
        fd = os.open(self.partial_path(account, sha_hex), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise BlockingIOError(errno.EWOULDBLOCK, "upload in progress") from None
        return fd

    def drop_partial(self, account: str, sha_hex: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.partial_path(account, sha_hex))

    def commit(self, fd: int, account: str, sha_hex: str, now_ms: int) -> bool:
        """Put the complete, checked partial file in place (fsync, rename, fsync the
        directory); True if new, False if that ciphertext was stored already (the
        partial is dropped: one copy).  Either way the file's time is ``now_ms``."""
        final = self.path(sha_hex)
        stamp = (now_ms * 1_000_000, now_ms * 1_000_000)
        if os.path.exists(final):
            self.drop_partial(account, sha_hex)
            os.utime(final, ns=stamp)
            return False
        os.fsync(fd)
        d = os.path.dirname(final)
        os.makedirs(d, mode=0o700, exist_ok=True)
        os.utime(fd, ns=stamp)
        os.rename(self.partial_path(account, sha_hex), final)
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return True

    def free_bytes(self) -> int:
        """Bytes free for this process on the file system of the media store."""
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def usage(self) -> tuple[int, int]:
        """(files, bytes) stored."""
        files = size = 0
        for d in os.scandir(self.objects):
            if d.is_dir():
                for f in os.scandir(d.path):
                    files += 1
                    size += f.stat().st_size
        return files, size

    def purge(self, now_ms: int, ttl_ms: int, partial_ttl_ms: int) -> tuple[int, int, int]:
        """Delete files whose last upload is ``ttl_ms`` old and partial files untouched
        for ``partial_ttl_ms``; returns (files, bytes, partial files) deleted."""
        files = size = partials = 0
        for d in os.scandir(self.objects):
            if not d.is_dir():
                continue
            for f in os.scandir(d.path):
                st = f.stat()
                if st.st_mtime_ns // 1_000_000 <= now_ms - ttl_ms:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(f.path)
                        files += 1
                        size += st.st_size
        for f in os.scandir(self.partial):
            st = f.stat()
            if st.st_mtime_ns // 1_000_000 <= now_ms - partial_ttl_ms:
                try:
                    fd = os.open(f.path, os.O_RDONLY)
                except FileNotFoundError:
                    continue
                try:  # one being written now (any process holds its lock) stays
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(f.path)
                        partials += 1
                finally:
                    os.close(fd)
        return files, size, partials


# -- the service ---------------------------------------------------------------------


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.bytes_in = Counter("pigeon_media_bytes_in", "ciphertext bytes received", registry=r)
        self.bytes_out = Counter("pigeon_media_bytes_out", "ciphertext bytes sent", registry=r)
        self.uploads = Gauge("pigeon_media_uploads_in_progress", "PUTs being received",
                             registry=r)  # fmt: skip
        self.connections = Gauge("pigeon_media_connections", "connections held", registry=r)
        self.stored_files = Gauge("pigeon_media_stored_files", "files stored", registry=r)
        self.stored_bytes = Gauge("pigeon_media_stored_bytes", "bytes stored", registry=r)
        self.completed = Counter("pigeon_media_uploads_completed",
                                 "uploads complete and checked", ["stored"], registry=r)  # fmt: skip
        self.refused = Counter("pigeon_media_refusals", "requests refused, by reason",
                               ["reason"], registry=r)  # fmt: skip
        self.purged = Counter("pigeon_media_purged_files", "files deleted by expiry",
                              registry=r)  # fmt: skip
        self.rehashed = Counter("pigeon_media_rehashed_bytes", "bytes of partial uploads "
                                "hashed again to resume them (no kept hash state)",
                                registry=r)  # fmt: skip


def _bearer(request) -> bytes:
    auth = request.headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() != "bearer" or not value:
        raise MediaRefused(401, "missing token", header="Authorization: Bearer <token>")
    try:
        return mediagrant.unb64(value.strip())
    except mediagrant.GrantError:
        raise MediaRefused(401, "malformed token") from None


def _is_loopback(ip: str | None) -> bool:
    try:
        return ip is not None and ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


class MediaService:
    def __init__(self, config, key: bytes, clock=None):
        self.config = config
        self.key = key
        self.clock = clock or default_clock()
        self.storage = LocalStorage(os.path.join(config.data_dir, "media"))
        self.metrics = Metrics()
        self.draining = False
        self.in_flight: dict[str, int] = {}
        self.rates = LeakyTable(ADDRESS_TABLE)
        # (account, hash) -> (offset, SHA-256 state of the partial's first offset bytes)
        self.hashes: OrderedDict[tuple[str, str], tuple[int, object]] = OrderedDict()
        # grants used up (their MAC -> (expiry, stored)), oldest first: see _spend
        self.spent: OrderedDict[bytes, tuple[int, bool]] = OrderedDict()
        files, size = self.storage.usage()
        self.metrics.stored_files.set(files)
        self.metrics.stored_bytes.set(size)

    def refuse(self, status: int, reason: str, **fields):
        self.metrics.refused.labels(reason).inc()
        return MediaRefused(status, reason, **fields)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.guard], client_max_size=1024)
        app.router.add_route("HEAD", "/v1/upload/{id}", self.upload_offset)
        app.router.add_route("PUT", "/v1/upload/{id}", self.upload)
        app.router.add_route("GET", "/v1/media/{id}", self.download)
        app.router.add_route("HEAD", "/v1/media/{id}", self.download)  # (GET gives no HEAD)
        app.router.add_route("GET", "/v1/health", self.health)
        app.router.add_route("GET", "/metrics", self.metrics_page)
        return app

    @web.middleware
    async def guard(self, request, handler):
        """Per-address limits, and JSON bodies for every refusal (aiohttp's own too)."""
        ip = source_key(request.remote or "?")
        c = self.config
        if not self.rates.take(ip, max(1, round(c.media_request_rate)), 1.0, time.monotonic()):
            exc = self.refuse(429, "request rate", limit="media-request-rate",
                              value=c.media_request_rate)  # fmt: skip
            # and the connection closes: requests pipelined behind it are not each
            # answered (probe8: 430,000 429s in 3 s to 62 connections that read nothing)
            exc.force_close()
            raise exc
        n = self.in_flight.get(ip, 0)
        if n >= c.media_transfers_per_ip:
            raise self.refuse(429, "transfers at once", limit="media-transfers-per-ip",
                              value=c.media_transfers_per_ip)  # fmt: skip
        self.in_flight[ip] = n + 1
        release = _Release(self.in_flight, ip)
        try:
            resp = await handler(request)
        except MediaRefused:
            release()
            raise
        except web.HTTPException as exc:  # the router's 404/405, aiohttp's 416...
            release()
            if exc.status_code >= 400:
                self.metrics.refused.labels(str(exc.status_code)).inc()
                raise MediaRefused(exc.status_code, exc.reason) from None
            raise
        except BaseException:
            release()
            raise
        if isinstance(resp, _TimedFile):
            # a download's body is sent after the handler returns (aiohttp's
            # prepare): it holds its transfer slot until then; the finalizer is
            # for a response dropped unsent (the client gone before prepare)
            resp.release = release
            weakref.finalize(resp, release)
        else:
            release()
        return resp

    def _media_id(self, request) -> str:
        sha_hex = request.match_info["id"]
        if not _HEX.fullmatch(sha_hex):
            raise self.refuse(404, "not a media id", expected="64 lowercase hex digits")
        return sha_hex

    def _grant(self, request, sha_hex: str) -> tuple[mediagrant.Grant, bytes, bool]:
        """The request's grant, its MAC (what names it in ``spent``) and whether an
        upload with it was stored already; 403 for a bad one or one spent on a
        mismatch."""
        token = _bearer(request)
        try:
            g = mediagrant.check(self.key, token, self.clock())
        except mediagrant.GrantError as exc:
            raise self.refuse(403, "bad grant", why=str(exc)) from None
        if g.sha256.hex() != sha_hex:
            raise self.refuse(403, "bad grant", why="the grant is for another file")
        mac = token[-mediagrant.MAC_SIZE :]
        spent = self.spent.get(mac)
        if spent is not None and not spent[1]:
            raise self.refuse(403, "grant used", why="an upload with this grant failed its "
                              "hash check; ask for a new grant")  # fmt: skip
        return g, mac, spent is not None

    def _spend(self, mac: bytes, g: mediagrant.Grant, stored: bool) -> None:
        """A grant is good for one upload: once it is stored (201) or fails its hash
        check (422), the grant is spent until it expires.  Expired ones leave first, then
        the oldest past media-spent-grants."""
        spent, now = self.spent, self.clock()
        spent[mac] = (g.expires, stored)
        while spent:
            first = next(iter(spent.values()))
            if first[0] > now and len(spent) <= self.config.media_spent_grants:
                break
            spent.popitem(last=False)

    def _stored_answer(self, sha_hex: str, g: mediagrant.Grant):
        return web.json_response(
            {"id": sha_hex, "path": f"/v1/media/{sha_hex}", "size": g.size,
             "token": mediagrant.b64(mediagrant.download_token(self.key, g.sha256))},
            status=201,
        )  # fmt: skip

    async def upload_offset(self, request):
        sha_hex = self._media_id(request)
        g, _, stored = self._grant(request, sha_hex)
        # 0 for a file stored already by anyone: this uploader still sends it all, and
        # it is checked (knowing a hash is no shortcut); the whole size once this grant's
        # upload is stored (a lost 201: the PUT of the rest, none, answers it again)
        have = g.size if stored else self.storage.partial_size(g.account, sha_hex)
        return web.Response(headers={"Upload-Offset": str(have), "Upload-Length": str(g.size)})

    async def upload(self, request):
        sha_hex = self._media_id(request)
        g, mac, stored = self._grant(request, sha_hex)
        if stored:  # this grant's upload is in: the same answer, nothing more received
            return self._stored_answer(sha_hex, g)
        c = self.config
        if self.draining:
            raise self.refuse(503, "draining", retry="resume on the next connection")
        if g.size > c.media_max_bytes:
            raise self.refuse(413, "too big", limit="media-max-bytes", value=c.media_max_bytes)
        length = request.content_length
        if length is None:
            raise self.refuse(411, "Content-Length required")
        start = 0
        cr = request.headers.get("Content-Range")
        if cr is not None:
            m = _RANGE.fullmatch(cr.strip())
            if not m:
                raise self.refuse(400, "malformed Content-Range", expected="bytes S-E/TOTAL")
            start, end, total = (int(x) for x in m.groups())
            if total != g.size or end < start or end - start + 1 != length:
                raise self.refuse(400, "Content-Range does not match the grant or the body")
        if start + length > g.size:
            raise self.refuse(413, "more bytes than the grant's size", limit="grant size")
        self._check_disk(length)
        try:
            fd = self.storage.open_partial(g.account, sha_hex)
        except BlockingIOError:
            raise self.refuse(409, "upload in progress", why="another request writes it") from None
        self.metrics.uploads.inc()
        try:
            return await self._receive(request, fd, g, mac, sha_hex, start, length)
        finally:
            self.metrics.uploads.dec()
            os.close(fd)

    async def _receive(self, request, fd, g, mac, sha_hex, start, length):
        stamp = self.clock() * 1_000_000
        os.utime(fd, ns=(stamp, stamp))  # the server's clock, as media-partial-ttl reads it
        have = os.fstat(fd).st_size
        if start != have:
            raise self.refuse(416, "wrong offset", offset=have)
        # a resume goes on from the hash state the last part left (kept in memory):
        # hashing the partial again each time made every 1-byte part cost up to
        # media-max-bytes of SHA-256 (86 ms of CPU after 90 MiB, at media-request-rate)
        kept = self.hashes.pop((g.account, sha_hex), None)
        if kept is not None and kept[0] == have:
            h = kept[1]
        else:
            h = hashlib.sha256()
            if have:  # none kept (evicted, or a restart): off the loop, up to 100 MiB
                self.metrics.rehashed.inc(have)
                await asyncio.to_thread(_hash_prefix, h, fd, have)
        os.lseek(fd, have, os.SEEK_SET)
        hashed = have
        stall = self.config.media_stall_timeout
        rate = self.config.media_min_upload_rate
        left = length
        check_at = length - DISK_CHECK  # the free space is checked again every DISK_CHECK
        # every stall seconds at least rate x stall bytes (or the rest) must have come:
        # a byte every stall - 1 s kept an upload (its connection, its file) forever
        loop = asyncio.get_running_loop()
        window_end, window_need, window_got = loop.time() + stall, min(left, rate * stall), 0
        try:
            content = request.content
            while left:
                # asyncio.timeout, not wait_for: no task per chunk
                async with asyncio.timeout(stall):
                    chunk = await content.readany()
                if not chunk:
                    break
                if len(chunk) > left:  # (aiohttp stops at Content-Length: never happens)
                    chunk = chunk[:left]
                if left <= check_at:
                    self._check_disk(left, offset=hashed)
                    check_at = left - DISK_CHECK
                try:
                    _write_all(fd, chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    raise self.refuse(507, "disk full", why="no space left on the media "
                                      "store", offset=os.fstat(fd).st_size) from None  # fmt: skip
                h.update(chunk)
                hashed += len(chunk)
                left -= len(chunk)
                self.metrics.bytes_in.inc(len(chunk))
                window_got += len(chunk)
                if left and (now := loop.time()) >= window_end:
                    if window_got < window_need:
                        raise self.refuse(408, "too slow", limit="media-min-upload-rate",
                                          value=rate, offset=hashed)  # fmt: skip
                    window_end, window_need, window_got = now + stall, min(left, rate * stall), 0
        except TimeoutError:
            raise self.refuse(408, "stalled", limit="media-stall-timeout", value=stall,
                              offset=os.fstat(fd).st_size) from None  # fmt: skip
        finally:
            stamp = self.clock() * 1_000_000
            os.utime(fd, ns=(stamp, stamp))  # media-partial-ttl runs from the last byte in
            have = os.fstat(fd).st_size
            if have == hashed and have < g.size:  # (a failed write: hashed again next time)
                self._keep_hash(g.account, sha_hex, have, h)
        if left:
            raise self.refuse(400, "body shorter than Content-Length", offset=have)
        if have < g.size:
            return web.json_response({"offset": have, "size": g.size}, status=202)
        if h.digest() != g.sha256:
            self.storage.drop_partial(g.account, sha_hex)
            self._spend(mac, g, False)
            raise self.refuse(422, "hash mismatch", why="the bytes received are not the "
                              "granted SHA-256; the partial upload is deleted")  # fmt: skip
        new = await asyncio.to_thread(self.storage.commit, fd, g.account, sha_hex, self.clock())
        self.metrics.completed.labels("new" if new else "existing").inc()
        if new:
            self.metrics.stored_files.inc()
            self.metrics.stored_bytes.inc(g.size)
        self._spend(mac, g, True)
        log.event(logger, logging.INFO, "media stored", size=g.size, new=new)
        return self._stored_answer(sha_hex, g)

    def _check_disk(self, length: int, **fields) -> None:
        """507 unless the media store's file system keeps media-disk-reserve free
        after ``length`` more bytes (the chat store usually shares it: LMDB on a full
        disk fails its writes)."""
        reserve = self.config.media_disk_reserve
        if self.storage.free_bytes() - length < reserve:
            raise self.refuse(507, "disk full", limit="media-disk-reserve", value=reserve,
                              **fields)  # fmt: skip

    def _keep_hash(self, account: str, sha_hex: str, offset: int, h) -> None:
        """Keep ``h`` (the hash of the partial's first ``offset`` bytes) for the next
        part; the least recently kept goes past media-resume-states."""
        states = self.hashes
        states[(account, sha_hex)] = (offset, h)
        while len(states) > self.config.media_resume_states:
            states.popitem(last=False)

    async def download(self, request):
        sha_hex = self._media_id(request)
        token = _bearer(request)
        if not mediagrant.download_ok(self.key, bytes.fromhex(sha_hex), token):
            raise self.refuse(403, "bad download token")
        path = self.storage.path(sha_hex)
        st = self.storage.stat(sha_hex)
        if st is None:
            raise self.refuse(404, "no such media", why="never stored, or expired")
        # aiohttp's FileResponse serves the Range unless an If-Range date is older than
        # the file (then the whole file, 200): the same test here, so that every 416
        # it would answer (with no body) is answered here first, with one
        if_range = request.if_range
        if if_range is None or st.st_mtime <= if_range.timestamp():
            self._check_range(request, st.st_size)
        deadline = (
            self.config.media_stall_timeout + st.st_size / self.config.media_min_download_rate
        )
        return _TimedFile(self.metrics, deadline, self.config.media_stall_timeout, path,
                          chunk_size=CHUNK,
                          headers={"Content-Type": "application/octet-stream",
                                   "Cache-Control": "private, no-store"})  # fmt: skip

    def _check_range(self, request, size: int) -> None:
        """A Range past the end, an empty suffix (``bytes=-0``: no bytes, which
        aiohttp reads as ``bytes=0-``, the whole file) or one aiohttp cannot serve
        is 416 with a JSON body here: aiohttp's FileResponse answers it with no body."""
        try:
            rng = request.http_range
        except ValueError:
            exc = self.refuse(416, "bad range", why="one range, bytes=START-END or "
                              "bytes=-SUFFIX", size=size)  # fmt: skip
        else:
            start = rng.start
            if start is None:
                return
            if start == 0 and _EMPTY_SUFFIX.match(request.headers.get("Range", "")):
                exc = self.refuse(416, "empty suffix range", why="bytes=-0 asks for no "
                                  "bytes", size=size)  # fmt: skip
            elif (max(0, start + size) if start < 0 else start) < size:  # (<0: a suffix)
                return
            else:
                exc = self.refuse(416, "range past the end", size=size)
        exc.headers["Content-Range"] = f"bytes */{size}"
        raise exc

    async def health(self, request):
        return web.json_response({"status": "draining" if self.draining else "ready"})

    async def metrics_page(self, request):
        if not _is_loopback(request.remote):
            raise self.refuse(403, "metrics are for loopback peers")
        return web.Response(body=generate_latest(self.metrics.registry),
                            content_type="text/plain", charset="utf-8")  # fmt: skip

    async def purger(self) -> None:
        c = self.config
        while True:
            try:
                files, size, partials = await asyncio.to_thread(
                    self.storage.purge, self.clock(), c.media_ttl * 1000,
                    c.media_partial_ttl * 1000,
                )  # fmt: skip
            except OSError as exc:
                log.event(logger, logging.ERROR, "media purge failed", error=str(exc))
            else:
                if files or partials:
                    self.metrics.purged.inc(files)
                    self.metrics.stored_files.dec(files)
                    self.metrics.stored_bytes.dec(size)
                    log.event(logger, logging.INFO, "media purged", files=files, bytes=size,
                              partial_files=partials)  # fmt: skip
            await asyncio.sleep(c.purge_interval)


class _Release:
    """Give back one transfer slot of a source address, once."""

    __slots__ = ("table", "ip", "done")

    def __init__(self, table: dict, ip: str):
        self.table, self.ip, self.done = table, ip, False

    def __call__(self) -> None:
        if self.done:
            return
        self.done = True
        left = self.table[self.ip] - 1
        if left:
            self.table[self.ip] = left
        else:
            del self.table[self.ip]


class _TimedFile(web.FileResponse):
    """aiohttp's FileResponse (Range, If-Range, HEAD) with two limits: a deadline
    for the whole transfer, and ``stall`` seconds for each chunk to be taken by
    the client (a reader that stops reading is cut then, not at the deadline).
    Past either the connection is aborted and counted as a refusal.
    ``release`` (the guard's transfer slot) is called when it is done."""

    def __init__(self, metrics: Metrics, deadline: float, stall: float, *args, **kw):
        super().__init__(*args, **kw)
        self._metrics = metrics
        self._deadline = deadline
        self._stall = stall
        self.release = None

    async def prepare(self, request):
        try:
            writer = await asyncio.wait_for(super().prepare(request), self._deadline)
        except TimeoutError:
            self._cut(request, "download too slow")
            raise
        finally:
            if self.release is not None:
                self.release()
        if request.method == "GET" and self.status in (200, 206):
            self._metrics.bytes_out.inc(self.content_length or 0)
        return writer

    def _cut(self, request, reason: str) -> None:
        self._metrics.refused.labels(reason).inc()
        if request.transport is not None:
            request.transport.abort()

    async def _sendfile(self, request, fobj, offset: int, count: int):
        # (FileResponse's hook for the body, once it has chosen the range.)  The
        # body goes in pieces, each of which the client must take within
        # media-stall-timeout: with sendfile(2) where the loop has it, SENDFILE_PIECE
        # at a time; else (uvloop, or TLS on some loops) copied CHUNK by CHUNK
        writer = await web.StreamResponse.prepare(self, request)
        loop = asyncio.get_running_loop()
        transport = request.transport
        if transport is None:
            raise ConnectionResetError("connection lost")
        native = not self.compression
        while count > 0:
            if native:
                n = min(SENDFILE_PIECE, count)
                try:
                    await self._in_time(request, loop.sendfile(transport, fobj, offset, n))
                except NotImplementedError:
                    native = False
                    continue
            else:
                chunk = await loop.run_in_executor(None, _read_at, fobj, offset,
                                                   min(self._chunk_size, count))  # fmt: skip
                if not chunk:
                    break
                n = len(chunk)
                await self._in_time(request, writer.write(chunk))
            offset += n
            count -= n
        await self._in_time(request, writer.drain())
        if native:
            await web.StreamResponse.write_eof(self)
        return writer

    async def _in_time(self, request, aw) -> None:
        try:
            await asyncio.wait_for(aw, self._stall)
        except TimeoutError:
            self._cut(request, "download stalled")
            raise ConnectionResetError("download stalled") from None


def _read_at(fobj, offset: int, n: int) -> bytes:
    fobj.seek(offset)
    return fobj.read(n)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _hash_prefix(h, fd: int, n: int) -> None:
    off = 0
    while off < n:
        chunk = os.pread(fd, min(CHUNK * 4, n - off), off)
        if not chunk:
            break
        h.update(chunk)
        off += len(chunk)


def connection_budget(config) -> int:
    """media-connections, lowered to fit the open-files limit (lifted toward it first):
    a connection's socket and the file its transfer holds, plus files-reserve."""
    want = config.media_connections
    limit = raise_open_files_limit(2 * want + config.files_reserve)
    if limit is None:
        return want
    return max(1, min(want, (limit - config.files_reserve) // 2))


def handler_limits(config) -> dict:
    """What aiohttp's request handler is given: no access log, media-header-timeout
    for a request's headers (aiohttp's keep-alive timer runs from the connect and from
    the end of each answer, and closes a connection still waiting for a request's
    headers when it fires: a slow sender of headers too), and media-max-headers of at
    most media-max-header-bytes each (what one connection can make it buffer)."""
    size = config.media_max_header_bytes
    return {"access_log": None, "keepalive_timeout": config.media_header_timeout,
            "max_headers": config.media_max_headers, "max_line_size": size,
            "max_field_size": size}  # fmt: skip


class Gate:
    """The connections the media service holds: ``total`` in all, ``per_ip`` from one
    source address (``source_key``), counted from the TCP accept (a TLS handshake
    too).  Past ``per_ip`` a new connection is closed before a byte of it is read.
    Past ``total`` it takes the place of the longest-idle one: one in its TLS
    handshake, or with no request being handled (still sending its headers, or
    kept alive between requests).  Otherwise 32 source addresses could fill
    ``total`` with connections that never finish a request and hold every other
    client out for media-header-timeout at a time; only connections in the
    middle of a request (each held to the per-address transfer limit and the
    minimum rates) are never pushed out.  Only when all are busy is the new one
    closed."""

    __slots__ = ("total", "per_ip", "count", "by_ip", "metrics", "idle")

    def __init__(self, total: int, per_ip: int, metrics: Metrics):
        self.total, self.per_ip, self.metrics = total, per_ip, metrics
        self.count = 0
        self.by_ip: dict[str, int] = {}
        self.idle: OrderedDict[object, object] = OrderedDict()  # conn -> its close(), oldest first

    def enter(self, ip: str) -> str | None:
        """The source key counted for a new connection from ``ip``, or None if it is
        refused."""
        key = source_key(ip)
        n = self.by_ip.get(key, 0)
        if n >= self.per_ip:
            self.metrics.refused.labels("connections per ip").inc()
            return None
        if self.count >= self.total:
            if not self.idle:
                self.metrics.refused.labels("connections").inc()
                return None
            _, close = self.idle.popitem(last=False)
            self.metrics.refused.labels("idle connection closed").inc()
            close()  # its leave() follows, now or from its connection_lost
        self.count += 1
        self.by_ip[key] = n + 1
        self.metrics.connections.set(self.count)
        return key

    def leave(self, key: str, conn) -> None:
        self.idle.pop(conn, None)
        self.count -= 1
        n = self.by_ip[key] - 1
        if n:
            self.by_ip[key] = n
        else:
            del self.by_ip[key]
        self.metrics.connections.set(self.count)

    def resting(self, conn, close) -> None:
        """``conn`` handles no request now: it may be pushed out (``close()``)."""
        self.idle[conn] = close
        self.idle.move_to_end(conn)

    def busy(self, conn) -> None:
        """``conn`` is handling a request: it stays."""
        self.idle.pop(conn, None)


class _GatedHandler(web.RequestHandler):
    """aiohttp's request handler for a connection the ``Gate`` counted at its accept."""

    __slots__ = ("_gate", "_gate_key", "_abort")

    def __init__(self, gate: Gate, key: str, manager, **kw):
        super().__init__(manager, **kw)
        self._gate = gate
        self._gate_key = key
        self._abort = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._abort = transport.abort
        self._gate.resting(self, self._abort)

    async def _handle_request(self, request, start_time, request_handler):
        # aiohttp's: one request, from its handler to the last byte of its answer
        self._gate.busy(self)
        try:
            return await super()._handle_request(request, start_time, request_handler)
        finally:
            if self._gate_key is not None:
                self._gate.resting(self, self._abort)

    def connection_lost(self, exc) -> None:
        key, self._gate_key = self._gate_key, None
        if key is not None:
            self._gate.leave(key, self)
        super().connection_lost(exc)

    def gone(self) -> None:
        """Not served (a failed TLS handshake): uncounted, once."""
        key, self._gate_key = self._gate_key, None
        if key is not None:
            self._gate.leave(key, self)


class _Acceptor:
    """Accepts on the media listener itself, so the ``Gate`` counts a connection
    from its TCP accept, before a TLS handshake (asyncio's server would show it
    to the handler only after one: handshakes stalled at no cost to the
    sender were held outside every limit)."""

    def __init__(self, loop, sock, gate: Gate, handler, tls, handshake_timeout: float):
        self.loop, self.sock, self.gate, self.handler = loop, sock, gate, handler
        self.tls, self.timeout = tls, handshake_timeout
        self.tasks: set = set()
        loop.add_reader(sock.fileno(), self.accept)

    def accept(self) -> None:
        for _ in range(64):
            try:
                conn, addr = self.sock.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:  # out of descriptors: pause for a second
                log.event(logger, logging.WARNING, "media cannot accept", error=str(exc))
                self.loop.remove_reader(self.sock.fileno())
                self.loop.call_later(1.0, self._resume)
                return
            key = self.gate.enter(addr[0] if addr else "?")
            if key is None:
                conn.close()
                continue
            conn.setblocking(False)
            h = self.handler(key)
            task = self.loop.create_task(self._serve(conn, h))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            if self.tls is not None:  # its handshake may be pushed out too
                self.gate.resting(h, task.cancel)

    def _resume(self) -> None:
        if self.sock.fileno() >= 0:
            self.loop.add_reader(self.sock.fileno(), self.accept)

    async def _serve(self, conn, h: _GatedHandler) -> None:
        try:
            await self.loop.connect_accepted_socket(
                lambda: h, conn, ssl=self.tls,
                ssl_handshake_timeout=self.timeout if self.tls is not None else None)  # fmt: skip
        except BaseException:  # a failed, timed-out or pushed-out handshake; a reset
            conn.close()
            h.gone()

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
        for t in list(self.tasks):
            if not t.done():
                t.cancel()


def ssl_context(config) -> ssl.SSLContext | None:
    if not config.tls_enabled:
        return None
    return tls_context(config)


async def serve(config, parent_fd: int | None, status_fd: int | None, index: int = 0) -> None:
    loop = asyncio.get_running_loop()
    key = mediagrant.load_key(config.data_dir)
    service = MediaService(config, key)
    handler_args = handler_limits(config)
    runner = web.AppRunner(service.app(), handle_signals=False, shutdown_timeout=1.0,
                           handler_cancellation=True, **handler_args)  # fmt: skip
    await runner.setup()
    sock = listen_socket(config.media_listen)
    gate = Gate(connection_budget(config), config.media_connections_per_ip, service.metrics)
    server = runner.server

    def handler(key):
        return _GatedHandler(gate, key, server, loop=loop, **handler_args)

    # a TLS handshake is counted from the accept and gets media-header-timeout,
    # not asyncio's 60 s
    listener = _Acceptor(loop, sock, gate, handler, ssl_context(config),
                         config.media_header_timeout)  # fmt: skip
    stopping = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)  # the supervisor's
    if parent_fd is not None:
        loop.add_reader(parent_fd, lambda: os._exit(0) if not os.read(parent_fd, 1) else None)
    purger = loop.create_task(service.purger())
    if status_fd is not None:
        os.write(status_fd, f"ready {index}\n".encode())
    log.event(logger, logging.INFO, "media ready", pid=os.getpid(), listen=config.media_listen,
              tls=config.tls_enabled, loop=type(loop).__module__)  # fmt: skip
    await stopping.wait()
    service.draining = True
    listener.close()  # the listener closes; transfers in progress go on
    if status_fd is not None:
        with contextlib.suppress(OSError):
            os.write(status_fd, b"closed\n")
    purger.cancel()
    # transfers in progress finish first (aiohttp's own shutdown closes connections
    # at once, which stops an upload reading); what is left at DRAIN_TIMEOUT is cut
    # (an upload keeps what arrived, for a resume on the new generation)
    deadline = loop.time() + DRAIN_TIMEOUT
    while service.in_flight and loop.time() < deadline:
        await asyncio.sleep(0.05)
    await runner.cleanup()
    log.event(logger, logging.INFO, "media stopped")


def main(argv=None) -> int:
    started = child.start("pigeon-media", "the media service (started by the supervisor)", argv)
    if isinstance(started, int):
        return started
    args, config = started
    if config.media_loop == "uvloop":
        import uvloop

        uvloop.run(serve(config, args.parent_fd, args.status_fd, args.index))
    else:
        asyncio.run(serve(config, args.parent_fd, args.status_fd, args.index))
    return 0


if __name__ == "__main__":
    sys.exit(main())
