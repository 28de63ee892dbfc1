"""Push wake-ups: wake a device that is not connected when something waits in its queue.

Theory of operation.  A device registers one push target (``<push type=set>``,
docs/PROTOCOL.md 9d): a kind (``webhook``, ``fcm``, ``apns``, ``webpush``), the
provider's token for it, and its settings (``mute`` until a time, ``quiet``).
The record lives in the ``push`` table, keyed by the device, and goes with the
device (``drop_device_push``, called wherever a device's queue is dropped).

When a commit stores an entry for a device nobody holds (``Push.worker`` is
None), the router calls ``PushHub.offline(device)``: nothing happens for a
device that is connected (the hot path is untouched), and for an offline one
a set of devices waits for the next tick's commit, where one job decides for
all of them inside the transaction: a device that has connected meanwhile is
skipped; one with no target, or muted, is skipped; one woken less than
``push-coalesce`` ago (the ``pushwake`` table: device -> u64 ms, written by
whichever worker woke it, so the window holds across workers: LMDB has one
writer) is coalesced; the others get their wake time written and a wake-up
each, handed to the gateway task after the commit.  A login deletes the
device's ``pushwake`` record (in the login's own commit), so a device that
connected and went away again is woken for the next entry at once.  The
worker also remembers, per offline device, until when it need not ask the
store again (``recent``: one float and the kind per device per window,
forgotten whenever any session changes, i.e. when the store's ``sver``
moves): a burst of 100 entries costs one store check, not 100.

The gateway is one asyncio task per worker with a bounded queue
(``push-queue``): when it is full, wake-ups are dropped and counted (a
wake-up is a hint; the queue is the truth).  It takes what is queued in one
go (what gathered within ``push-linger`` of the first, at most ``push-batch``),
drops the ones whose device has
connected since (one read transaction), and sends: the webhook as one JSON
POST per batch, FCM, APNs and Web Push one request per device, at most
``push-concurrency`` requests in flight.  Every request has a timeout
(``push-request-timeout``) and is retried ``push-retries`` times with doubling
backoff (``push-backoff``) when the provider is unreachable, overloaded
(429) or fails (5xx).  A target the provider says is gone (FCM
``UNREGISTERED``, APNs 410, Web Push 404/410, a webhook's ``gone`` list) is
removed in a later commit, unless it was replaced meanwhile.

What a wake-up carries: the target's opaque wake id (random, made at
registration, device-scoped) and the quiet flag.  Never a message, its
sender, its id or the device's address.  HTTP is aiohttp (webhook, FCM, Web
Push) and httpx with h2 (APNs needs HTTP/2); JWTs are PyJWT (ES256 for APNs,
RS256 for FCM's OAuth assertion), VAPID is py-vapid; none of it is written
here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import ssl
import time
from urllib.parse import urlsplit

import msgpack
import orjson

from . import log

logger = logging.getLogger("pigeon.push")

PUSH_TABLES = ("push", "pushwake")
KINDS = ("webhook", "fcm", "apns", "webpush")
_REASON = re.compile(r"[a-z0-9_.-]{1,40}")
RECENT_MAX = 100_000  # devices a worker remembers as "no need to ask the store" (then cleared)
MAX_SECRET_FILE = 65536

FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"


def drop_device_push(txn, db: dict, device: str) -> None:
    """Delete a device's push target and wake record inside ``txn`` (the device is gone)."""
    key = device.encode()
    txn.delete(key, db=db["push"])
    txn.delete(key, db=db["pushwake"])


def read_private(path: str, what: str) -> bytes:
    """A secret file's bytes; ValueError unless only its owner may read it (0600/0400)."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if mode & 0o077:
                raise ValueError(f"{what} {path} may be read or written by other users "
                                 f"(mode {mode & 0o777:04o}): chmod 600 it")  # fmt: skip
            raw = f.read(MAX_SECRET_FILE + 1)
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror}") from None
    if len(raw) > MAX_SECRET_FILE:
        raise ValueError(f"{what} {path} is larger than {MAX_SECRET_FILE} bytes")
    return raw


def authorization(path: str | None, var: str | None, what: str) -> str | None:
    """An Authorization header value from a private file or an environment variable."""
    if path:
        raw = read_private(path, what + "-file")
        origin = f"{what}-file {path}"
    elif var:
        raw = os.environb.get(var.encode(), b"")
        origin = f"the environment variable {var} ({what}-env)"
    else:
        return None
    value = raw.strip().decode("ascii", errors="replace")
    if not value or not value.isprintable() or "\ufffd" in value:
        raise ValueError(f"{origin} must hold one line of printable ASCII")
    return value


class Wake:
    """One wake-up for the gateway: which device, through what, with which wake id."""

    __slots__ = ("device", "kind", "token", "wake_id", "quiet")

    def __init__(self, device: str, kind: str, token: bytes, wake_id: str, quiet: bool):
        self.device = device
        self.kind = kind
        self.token = token
        self.wake_id = wake_id
        self.quiet = quiet

    def __repr__(self) -> str:  # never the token
        return f"Wake({self.device!r}, {self.kind})"


class Outcome(Exception):
    """A request's end that is not "sent": ``reason`` for the metrics; ``gone``:
    the provider says the target no longer exists; ``retry``: worth another try."""

    def __init__(self, reason: str, retry: bool = False, gone: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.retry = retry
        self.gone = gone


def _status_outcome(status: int, reason: str | None = None) -> Outcome:
    why = reason or f"http-{status}"
    return Outcome(why, retry=status == 429 or status >= 500)


# -- the gateways ---------------------------------------------------------------


class Gateway:
    """Base: ``send(wakes)`` returns one (wake, Outcome or None) per wake."""

    kind = ""
    batched = False

    def __init__(self, hub):
        self.hub = hub
        self.config = hub.config

    async def start(self) -> None:
        import aiohttp

        self.http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.config.push_request_timeout),
            connector=aiohttp.TCPConnector(ssl=self.hub.ssl_context or True, limit=64),
        )

    async def close(self) -> None:
        await self.http.close()

    def probe(self) -> None:
        """Sign something with the configured key (``validate``); raises if it cannot."""

    def check_token(self, token: bytes) -> str | None:
        """Why ``token`` is not a valid target of this kind (None: it is)."""
        if not token.isascii() or not token.decode().isprintable():
            return "the push token must be printable ASCII"
        return None

    async def _post(self, url: str, **kw):
        import aiohttp

        try:
            # no redirect is followed: a push service (or an open redirect on an
            # allowed host) would point the POST past push-webpush-hosts (probe9)
            async with self.http.post(url, allow_redirects=False, **kw) as resp:
                return resp.status, await resp.read(), resp.headers
        except TimeoutError:
            raise Outcome("timeout", retry=True) from None
        except aiohttp.ClientError as exc:
            raise Outcome(f"connect-{type(exc).__name__}", retry=True) from None


class WebhookGateway(Gateway):
    """POST ``{"wakeups": [{"kind", "token", "id", "quiet"}, ...]}`` to push-webhook-url;
    a 2xx answer may say ``{"gone": [token, ...]}``: those targets are removed."""

    kind = "webhook"
    batched = True

    def __init__(self, hub):
        super().__init__(hub)
        c = self.config
        self.url = c.push_webhook_url
        if urlsplit(self.url).scheme not in ("http", "https"):
            raise ValueError("push-webhook-url must be an http or https URL")
        self.headers = {"Content-Type": "application/json"}
        auth = authorization(c.push_webhook_auth_file, c.push_webhook_auth_env,
                             "push-webhook-auth")  # fmt: skip
        if auth:
            self.headers["Authorization"] = auth

    async def send(self, wakes):
        body = orjson.dumps({"wakeups": [{"kind": "webhook", "token": w.token.decode(),
                                          "id": w.wake_id, "quiet": w.quiet}
                                         for w in wakes]})  # fmt: skip
        status, raw, _ = await self._post(self.url, data=body, headers=self.headers)
        if not 200 <= status < 300:
            raise _status_outcome(status)
        gone = set()
        if raw:
            try:
                doc = orjson.loads(raw)
                gone = {g.encode() for g in doc.get("gone", ()) if isinstance(g, str)}
            except (orjson.JSONDecodeError, AttributeError):
                pass
        return [(w, Outcome("gone", gone=True) if w.token in gone else None) for w in wakes]


class FCMGateway(Gateway):
    """FCM HTTP v1: ``POST {push-fcm-url}/v1/projects/PROJECT/messages:send`` with an
    OAuth 2 access token got with the service account's RS256 JWT assertion."""

    kind = "fcm"

    def __init__(self, hub):
        super().__init__(hub)
        c = self.config
        doc = json.loads(read_private(c.push_fcm_credentials, "push-fcm-credentials"))
        try:
            self.project = doc["project_id"]
            self.email = doc["client_email"]
            self.key = doc["private_key"]
            self.token_uri = doc.get("token_uri", "https://oauth2.googleapis.com/token")
        except (KeyError, TypeError):
            raise ValueError("push-fcm-credentials must be a service account JSON key "
                             "(project_id, client_email, private_key)") from None  # fmt: skip
        self.url = f"{c.push_fcm_url.rstrip('/')}/v1/projects/{self.project}/messages:send"
        self.access = None
        self.access_until = 0.0
        self.lock = asyncio.Lock()

    def probe(self) -> None:
        import jwt

        jwt.encode({"iss": self.email}, self.key, algorithm="RS256")

    async def _token(self, renew: bool = False) -> str:
        async with self.lock:
            if renew or self.access is None or time.time() >= self.access_until:
                import jwt

                now = int(time.time())
                assertion = jwt.encode({"iss": self.email, "scope": FCM_SCOPE,
                                        "aud": self.token_uri, "iat": now, "exp": now + 3600},
                                       self.key, algorithm="RS256")  # fmt: skip
                status, raw, _ = await self._post(
                    self.token_uri, data={"grant_type": JWT_BEARER, "assertion": assertion}
                )
                if status != 200:
                    raise _status_outcome(status, f"oauth-http-{status}")
                try:
                    doc = orjson.loads(raw)
                    self.access = doc["access_token"]
                    self.access_until = time.time() + int(doc.get("expires_in", 3600)) - 60
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                    raise Outcome("oauth-bad-answer") from None
            return self.access

    async def send(self, wakes):
        (w,) = wakes
        body = orjson.dumps({"message": {
            "token": w.token.decode(),
            "data": {"pigeon": "wake", "w": w.wake_id},
            "android": {"priority": "NORMAL" if w.quiet else "HIGH"},
        }})  # fmt: skip
        for renew in (False, True):
            token = await self._token(renew)
            status, raw, _ = await self._post(
                self.url,
                data=body,
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            )
            if status != 401:
                break
        if 200 <= status < 300:
            return [(w, None)]
        code = None
        try:
            err = orjson.loads(raw).get("error", {})
            for d in err.get("details", ()):
                code = d.get("errorCode") or code
            code = code or err.get("status")
        except (orjson.JSONDecodeError, AttributeError, TypeError):
            pass
        if code == "UNREGISTERED":
            raise Outcome("unregistered", gone=True)
        raise _status_outcome(status, code and code.lower())


class APNsGateway(Gateway):
    """APNs over HTTP/2 (httpx with h2): ``POST {push-apns-url}/3/device/TOKEN`` with
    a provider token (ES256 JWT: kid, iss = team, iat), renewed every 50 minutes."""

    kind = "apns"

    def __init__(self, hub):
        super().__init__(hub)
        c = self.config
        self.key = read_private(c.push_apns_key_file, "push-apns-key-file")
        for name in ("push_apns_key_id", "push_apns_team_id", "push_apns_topic"):
            if not getattr(c, name):
                raise ValueError(f"push-apns-key-file needs {name.replace('_', '-')}")
        self.base = c.push_apns_url.rstrip("/")
        self.jwt = None
        self.jwt_at = 0.0

    def probe(self) -> None:
        self._provider_token(True)

    async def start(self) -> None:
        import httpx

        self.client = httpx.AsyncClient(http2=True, verify=self.hub.ssl_context or True,
                                        timeout=self.config.push_request_timeout)  # fmt: skip

    async def close(self) -> None:
        await self.client.aclose()

    def check_token(self, token: bytes) -> str | None:
        try:
            ok = 32 <= len(token) <= 200 and len(bytes.fromhex(token.decode())) * 2 == len(token)
        except (ValueError, UnicodeDecodeError):
            ok = False
        return None if ok else "an APNs device token is 32-200 hex digits"

    def _provider_token(self, renew: bool) -> str:
        if renew or self.jwt is None or time.time() - self.jwt_at > 3000:
            import jwt

            self.jwt_at = time.time()
            self.jwt = jwt.encode({"iss": self.config.push_apns_team_id, "iat": int(self.jwt_at)},
                                  self.key, algorithm="ES256",
                                  headers={"kid": self.config.push_apns_key_id})  # fmt: skip
        return self.jwt

    async def send(self, wakes):
        import httpx

        (w,) = wakes
        if w.quiet:
            aps, kind, prio = {"content-available": 1}, "background", "5"
        else:
            aps, kind, prio = {"alert": {"loc-key": "PIGEON_WAKE"}, "mutable-content": 1}, \
                "alert", "10"  # fmt: skip
        body = orjson.dumps({"aps": aps, "w": w.wake_id})
        url = f"{self.base}/3/device/{w.token.decode()}"
        for renew in (False, True):
            headers = {
                "authorization": f"bearer {self._provider_token(renew)}",
                "apns-topic": self.config.push_apns_topic,
                "apns-push-type": kind,
                "apns-priority": prio,
                "apns-expiration": str(int(time.time()) + self.config.push_ttl),
                "content-type": "application/json",
            }
            try:
                resp = await self.client.post(url, content=body, headers=headers)
            except httpx.TimeoutException:
                raise Outcome("timeout", retry=True) from None
            except httpx.HTTPError as exc:
                raise Outcome(f"connect-{type(exc).__name__}", retry=True) from None
            reason = None
            if resp.status_code != 200:
                try:
                    reason = orjson.loads(resp.content).get("reason")
                except (orjson.JSONDecodeError, AttributeError):
                    pass
            if not (resp.status_code == 403 and reason == "ExpiredProviderToken"):
                break
        if resp.status_code == 200:
            return [(w, None)]
        if resp.status_code == 410 or reason in ("Unregistered", "BadDeviceToken"):
            raise Outcome((reason or "gone").lower(), gone=True)
        raise _status_outcome(resp.status_code, reason and reason.lower())


#: A host name as a resolver reads it: labels of [a-z0-9-], 1-63 long, not
#: starting or ending with '-' (an IPv4 literal matches too); no IPv6 literals.
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOST = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}\.?")


class WebPushGateway(Gateway):
    """Web Push (RFC 8030) with VAPID (RFC 8292, py-vapid): a POST with no payload
    (so no RFC 8291 encryption is needed) to the subscription's endpoint; the
    browser's service worker wakes and connects."""

    kind = "webpush"

    def __init__(self, hub):
        super().__init__(hub)
        from py_vapid import Vapid02

        c = self.config
        read_private(c.push_vapid_key_file, "push-vapid-key-file")  # the mode check
        self.vapid = Vapid02.from_file(c.push_vapid_key_file)
        if not c.push_vapid_subject:
            raise ValueError("push-vapid-key-file needs push-vapid-subject (mailto: or https:)")
        self.hosts = tuple(h.strip().lower() for h in c.push_webpush_hosts.split(",") if h.strip())

    def probe(self) -> None:
        self.vapid.sign({"aud": "https://push.example", "sub": self.config.push_vapid_subject,
                         "exp": int(time.time()) + 60})  # fmt: skip

    def check_token(self, token: bytes) -> str | None:
        why = super().check_token(token)  # printable ASCII: no NUL, no control characters
        if why is not None:
            return why
        try:
            u = urlsplit(token.decode("ascii"))
            host = (u.hostname or "").lower()
            port = u.port
        except (UnicodeDecodeError, ValueError):
            return "a Web Push endpoint is an https URL"
        if u.scheme != "https" or not host or u.username or u.password:
            return "a Web Push endpoint is an https URL"
        # A host is compared as the resolver will read it: DNS labels of letters, digits
        # and hyphens only (or an IP literal's digits and dots).  ``127.0.0.1\x00.push.
        # apple.com`` or ``%00`` ended with an allowed suffix while getaddrinfo
        # stopped at the NUL and connected to 127.0.0.1 (probe, 2026-12-04).
        if not _HOST.fullmatch(host):
            return "a Web Push endpoint's host is a DNS name (letters, digits, '-', '.')"
        for h in self.hosts:
            name, _, want_port = h.partition(":")
            # a host without a port: 443 only (any port let a client aim the
            # server's POSTs at every service of an allowed host)
            if (host == name or (name.startswith(".") and host.endswith(name))) and (
                str(port or 443) == (want_port or "443")
            ):
                return None
        return "this server does not send Web Push to that host (push-webpush-hosts)"

    async def send(self, wakes):
        (w,) = wakes
        # checked again (the check at set_push guards new targets only): one stored
        # before the host check or before push-webpush-hosts lost its host is not
        # POSTed to, and goes as a gone one does
        if self.check_token(w.token) is not None:
            raise Outcome("refused-endpoint", gone=True)
        endpoint = w.token.decode()
        u = urlsplit(endpoint)
        claims = {"aud": f"{u.scheme}://{u.netloc}", "sub": self.config.push_vapid_subject,
                  "exp": int(time.time()) + 12 * 3600}  # fmt: skip
        headers = dict(self.vapid.sign(claims))
        headers["TTL"] = str(self.config.push_ttl)
        headers["Urgency"] = "normal" if w.quiet else "high"
        status, _, _ = await self._post(endpoint, data=b"", headers=headers)
        if 200 <= status < 300:
            return [(w, None)]
        if status in (404, 410):
            raise Outcome(f"http-{status}", gone=True)
        raise _status_outcome(status)


GATEWAYS = {"webhook": WebhookGateway, "fcm": FCMGateway, "apns": APNsGateway,
            "webpush": WebPushGateway}  # fmt: skip


def configured_kinds(config) -> list[str]:
    """The kinds of push this configuration sends."""
    c = config
    out = []
    if c.push_webhook_url:
        out.append("webhook")
    if c.push_fcm_credentials:
        out.append("fcm")
    if c.push_apns_key_file:
        out.append("apns")
    if c.push_vapid_key_file:
        out.append("webpush")
    return out


class _Probe:
    """What a gateway's constructor needs of its hub, for ``validate``."""

    def __init__(self, config):
        self.config = config
        self.ssl_context = None


def validate(config) -> None:
    """Raise ValueError saying what is wrong with the push settings (the supervisor
    calls it before starting workers): unreadable or open key files, missing ids,
    keys that cannot sign."""
    if config.push_ca_file:
        try:
            ssl.create_default_context(cafile=config.push_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load push-ca-file {config.push_ca_file}: {exc}") from None
    for kind in configured_kinds(config):
        g = GATEWAYS[kind](_Probe(config))  # its ValueErrors say what to fix
        try:
            g.probe()
        except Exception as exc:
            raise ValueError(f"the {kind} push key cannot sign: {type(exc).__name__}: "
                             f"{exc}") from None  # fmt: skip


# -- the hub: one per worker ------------------------------------------------------


class _WakeJob:
    """The tick's decision for the offline devices gathered (PushHub.offline)."""

    __slots__ = ("hub", "devices")

    def __init__(self, hub, devices: dict):
        self.hub = hub
        self.devices = devices

    def __call__(self, txn, now: int) -> list:
        return self.hub._decide(txn, now, self.devices)


class PushHub:
    def __init__(self, worker, config):
        self.worker = worker
        self.config = config
        self.store = worker.store
        self.db = worker.store._db
        self.clock = worker.store.clock
        self.stats = worker.stats
        self.window_ms = int(config.push_coalesce * 1000)
        self.ssl_context = ssl.create_default_context(cafile=config.push_ca_file) \
            if config.push_ca_file else None  # fmt: skip
        self.gateways = {k: GATEWAYS[k](self) for k in configured_kinds(config)}
        self.kinds = frozenset(self.gateways)
        self.queue: asyncio.Queue = asyncio.Queue(config.push_queue)
        self.pending: dict[str, int] | None = None  # device -> entries since the last job
        self.recent: dict[str, tuple] = {}  # device -> (until ms, kind or None)
        self.sver = None
        self.sem = asyncio.Semaphore(config.push_concurrency)
        self.task = None
        self.inflight: set[asyncio.Task] = set()

    def count(self, result: str, kind: str | None, reason: str = "", n: int = 1) -> None:
        reason = reason.lower()
        if reason and not _REASON.fullmatch(reason):  # a provider's word: bounded label values
            reason = "other"
        key = f"{result} {kind or '-'} {reason}"
        p = self.stats.push
        p[key] = p.get(key, 0) + n

    def check_token(self, kind: str, token: bytes) -> str | None:
        if len(token) > self.config.push_token_max:
            return f"the push token is longer than {self.config.push_token_max} bytes"
        return self.gateways[kind].check_token(token)

    # -- what the router calls, for offline devices only --------------------------

    def offline(self, device: str) -> None:
        """An entry was committed for ``device``, which nobody holds."""
        sver = self.worker.queues.cached_sver
        if sver is not self.sver:  # some session changed: what ``recent`` knows may be stale
            self.sver = sver
            self.recent.clear()
        hit = self.recent.get(device)
        if hit is not None:
            if hit[0] > self.clock():
                if hit[1] is not None:
                    self.count("coalesced", hit[1])
                return
            del self.recent[device]
        pending = self.pending
        if pending is None:
            pending = self.pending = {}
            self.worker.write(_WakeJob(self, pending), self._decided, failed=self._failed)
        pending[device] = pending.get(device, 0) + 1

    def _decide(self, txn, now: int, devices: dict) -> list:
        if self.pending is devices:
            self.pending = None  # later offline devices start the next job
        sessions, targets, wakes = self.db["sessions"], self.db["push"], self.db["pushwake"]
        recent, window = self.recent, self.window_ms
        if len(recent) > RECENT_MAX:
            recent.clear()
        room = self.queue.maxsize - self.queue.qsize()
        out = []
        count = self.count
        for device, entries in devices.items():
            key = device.encode()
            if txn.get(key, db=sessions) is not None:
                continue  # connected meanwhile: it reads its queue itself
            raw = txn.get(key, db=targets)
            if raw is None:
                recent[device] = (now + window, None)
                continue
            rec = msgpack.unpackb(raw)
            kind = rec["k"]
            if kind not in self.kinds:
                recent[device] = (now + window, None)
                continue
            mute = rec.get("m", 0)
            if mute > now:
                count("muted", kind, n=entries)
                recent[device] = (min(mute, now + window), kind)
                continue
            woken = txn.get(key, db=wakes)
            if woken is not None:
                at = int.from_bytes(woken, "big")
                if 0 <= now - at < window:
                    count("coalesced", kind, n=entries)
                    recent[device] = (at + window, kind)
                    continue
            if len(out) >= room:
                count("dropped", kind, "queue-full")
                continue
            if entries > 1:  # one wake-up for all of them
                count("coalesced", kind, n=entries - 1)
            txn.put(key, now.to_bytes(8, "big"), db=wakes)
            recent[device] = (now + window, kind)
            out.append(Wake(device, kind, rec["t"], rec["w"], bool(rec.get("q"))))
        return out

    def _decided(self, wakes: list) -> None:
        for w in wakes:
            try:
                self.queue.put_nowait(w)
            except asyncio.QueueFull:
                self.count("dropped", w.kind, "queue-full")

    def _failed(self, exc) -> None:
        self.pending = None
        self.recent.clear()  # it may hold decisions the aborted commit did not keep

    # -- registration (the handler's job, in the tick's commit) ---------------------

    def set_txn(self, txn, device: str, kind: str, token: bytes, mute: int, quiet: bool) -> None:
        rec = {"k": kind, "t": token, "w": secrets.token_hex(16), "m": mute, "q": quiet}
        txn.put(device.encode(), msgpack.packb(rec, use_bin_type=True), db=self.db["push"])

    def remove_txn(self, txn, device: str, token: bytes | None = None) -> bool:
        """Remove ``device``'s target (only if it is still ``token``, when given)."""
        key = device.encode()
        if token is not None:
            raw = txn.get(key, db=self.db["push"])
            if raw is None or msgpack.unpackb(raw)["t"] != token:
                return False
        return txn.delete(key, db=self.db["push"])

    def login_txn(self, txn, device: str) -> None:
        """``device`` connected: its next wake-up is not held back by an earlier one."""
        txn.delete(device.encode(), db=self.db["pushwake"])

    # -- the gateway task -----------------------------------------------------------

    async def run(self) -> None:
        for g in self.gateways.values():
            await g.start()
        try:
            while True:
                batch = [await self.queue.get()]
                if self.config.push_linger:  # let a burst gather: one webhook POST for it
                    await asyncio.sleep(self.config.push_linger)
                while len(batch) < self.config.push_batch and not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                batch = self._still_offline(batch)
                by_kind: dict[str, list] = {}
                for w in batch:
                    by_kind.setdefault(w.kind, []).append(w)
                for kind, wakes in by_kind.items():
                    g = self.gateways[kind]
                    groups = [wakes] if g.batched else [[w] for w in wakes]
                    for group in groups:
                        await self.sem.acquire()  # at most push-concurrency in flight
                        t = asyncio.get_running_loop().create_task(self._send(g, group))
                        self.inflight.add(t)
                        t.add_done_callback(self.inflight.discard)
        finally:
            for t in list(self.inflight):
                t.cancel()
            for g in self.gateways.values():
                await g.close()

    def _still_offline(self, batch: list) -> list:
        """The wake-ups whose device has not connected since they were decided."""
        db = self.db["sessions"]
        keep = []
        with self.store.env.begin() as txn:
            for w in batch:
                if txn.get(w.device.encode(), db=db) is None:
                    keep.append(w)
                else:
                    self.count("cancelled", w.kind)
        return keep

    async def _send(self, g: Gateway, wakes: list) -> None:
        c = self.config
        delay = c.push_backoff
        try:
            for attempt in range(c.push_retries + 1):
                try:
                    results = await g.send(wakes)
                    break
                except Outcome as out:
                    if out.retry and attempt < c.push_retries:
                        self.count("retried", g.kind, out.reason)
                        await asyncio.sleep(delay)
                        delay *= 2
                        continue
                    results = [(w, out) for w in wakes]
                    break
                except Exception as exc:  # a bug or a library's surprise: counted, logged
                    log.event(logger, logging.ERROR, "push send failed", kind=g.kind,
                              error=type(exc).__name__)  # fmt: skip
                    results = [(w, Outcome("error")) for w in wakes]
                    break
            for w, out in results:
                if out is None:
                    self.count("sent", w.kind)
                elif out.gone:
                    self.count("gone", w.kind, out.reason)
                    self._gone(w)
                else:
                    self.count("failed", w.kind, out.reason)
        finally:
            self.sem.release()

    def _gone(self, w: Wake) -> None:
        device, token = w.device, w.token
        self.worker.write(lambda txn, now: self.remove_txn(txn, device, token))
        log.event(logger, logging.INFO, "push target gone: removed", device=device, kind=w.kind)
