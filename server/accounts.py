"""Registration by phone number and one-time code, and SCRAM login.

Registration: ``request_code`` makes a 6-digit code, keeps only a salted
hash of it (valid ``code-ttl`` seconds, single use, ``code-attempts`` wrong
tries in all, ``code-attempts-per-net`` from one network), and hands it to
the SMS gateway.  A new code does not void the number's earlier live ones (a
stranger asking for codes must not void the owner's): each stays valid until
its own expiry or its wrong tries.  ``verify`` checks it in constant
time and creates the device with a fresh 32-byte secret; a number that had
an account moves to the new device and its old devices are removed (their
sessions must then be closed by the caller, as on a phone change).
Requests are rate-limited per source address and network, per number and
network (``register-per-phone``) and per number (``register-per-phone-total``)
over sliding windows kept in the store, so the limits hold across workers;
what a stranger does from his networks does not use up what the owner may
do from the owner's.

Login: SCRAM-SHA-256 through ``scramp`` (RFC 5802/7677).  The store keeps
only StoredKey and ServerKey (and the salt and iteration count), never the
secret.  An unknown device gets a challenge of the same shape as a real
one: its salt is a keyed hash of the device name (HMAC-SHA-256 with the
store's own secret), the same on every try, and its iteration count one of
those real devices have (the store keeps a tally), picked by another keyed
hash of the name as often as devices have it, so probing cannot tell which
devices exist, even after ``scram-iterations`` changed; it then fails at
the proof, like a wrong secret.

Failed logins are counted in the worker's memory (server/limits.py
``LeakyTable``, capped, never in the store: strangers must not be able to
grow it) per source address (IPv6 by /64: ``login-failures-per-ip``) and
per device and source address (``login-failures``), over ``login-window``;
a login started and abandoned (a challenge with no answer) counts as a
failure.  There is deliberately no limit per device alone: that would let
anyone lock the owner out by failing on purpose.  Logins whose proof was
right are counted per device (``device-logins`` per ``device-logins-window``,
the same kind of table): past it the login is refused (302) after the
proof, so only the holder of the device's secret can use them up.  Without
it one device logged in and out 577 times a second, each login a commit of
its session record, a log line and a presence change for its subscribers.

SMS gateways: ``log`` appends "phone code" lines to an outbox file in the
data directory, standing in for the SMS network (the code never goes to the
server log); ``webhook`` POSTs ``{"phone", "code", "method"}`` as JSON to a
URL with a timeout and retries: that is how a real SMS provider plugs in.
The provider's token goes in an Authorization header read from a private
file or the environment (``webhook_authorization``), not in the URL.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
import time
from urllib.parse import urlsplit

import orjson
import scramp.core
import scramp.utils
from scramp import ScramMechanism
from scramp.utils import saslprep

from pigeon.core.errors import ErrorCode

from .errors import ServiceError
from .limits import LeakyTable, net_key, retry_in, source_key
from .log import event as log_event
from .store import MAX_CODES, Store

logger = logging.getLogger("pigeon.worker")

__all__ = [
    "Accounts", "ServiceError", "LogGateway", "WebhookGateway", "make_gateway",
    "webhook_authorization", "device_keys",
]  # fmt: skip

MECHANISM = ScramMechanism("SCRAM-SHA-256")


def _saslprep(source: str) -> str:
    """SASLprep (RFC 4013) that returns printable ASCII unchanged at once.

    For U+0020-U+007E SASLprep is the identity: nothing maps (the mapped
    spaces and the "mapped to nothing" characters are not ASCII), NFKC keeps
    ASCII, none of it is prohibited or right-to-left.  scramp runs every
    character through the stringprep tables, a third of a login's CPU for
    the device addresses that are pigeon's SCRAM user names; anything else
    still goes to scramp's own.  (tests/test_accounts.py checks the two
    agree on printable ASCII.)
    """
    if source.isascii() and source.isprintable():
        return source
    return saslprep(source)


# scramp's server session calls the name it imported; only while that is
# still scramp's own SASLprep (a scramp that changes it keeps its own)
if getattr(scramp.core, "saslprep", None) is saslprep:
    scramp.core.saslprep = _saslprep


# scramp checks every nonce character by character in a generator: four
# nonces of 64 to 128 characters per login (the server's, the client's, both
# joined, the client-final's) were about half of scramp's CPU per login.
# The rule (RFC 5802 "printable": %x21-2B / %x2D-7E, and not empty) is
# checked in C: deleting every allowed byte from the ASCII encoding leaves
# nothing; whatever does not pass goes through scramp's own check, with its
# errors.
_scramp_nonce_init = scramp.core.Nonce.__init__
_NONCE_BYTES = bytes(c for c in range(0x21, 0x7F) if c != 0x2C)


def _nonce_init(self, nonce) -> None:
    if (
        type(nonce) is str
        and nonce
        and nonce.isascii()
        and not nonce.encode("ascii").translate(None, _NONCE_BYTES)
    ):
        self.nonce = nonce
    else:
        _scramp_nonce_init(self, nonce)


def _scramp_nonce_is_plain() -> bool:
    """Does scramp's Nonce still keep only the checked string? (Then the shortcut,
    which sets just that, makes the same object; a scramp that changes it keeps its own.)"""
    try:
        probe = scramp.core.Nonce("pigeon")
    except Exception:
        return False
    return getattr(probe, "__dict__", None) == {"nonce": "pigeon"}


if _scramp_nonce_init.__module__ == "scramp.core" and _scramp_nonce_is_plain():
    scramp.core.Nonce.__init__ = _nonce_init


def _xor(a: bytes, b: bytes) -> bytes:
    """scramp's ``xor`` (ClientKey from the proof) as one integer XOR instead of a
    generator over the 32 bytes; unequal lengths raise ValueError, as its strict
    zip does (scramp turns that into an invalid proof)."""
    n = len(a)
    if len(b) != n:
        raise ValueError("xor of unequal lengths")
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(n, "big")


# scramp's server session calls the name it imported from scramp.utils
if getattr(scramp.core, "xor", None) is scramp.utils.xor:
    scramp.core.xor = _xor


class LogGateway:
    """Development and test gateway: one "phone code" line per code in an outbox file."""

    def __init__(self, path: str):
        self.path = path

    async def send(self, phone: str, code: str, method: str) -> None:
        line = f"{phone} {code}\n".encode()
        # One O_APPEND write per line: whole lines even with several workers.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    async def close(self) -> None:
        pass


class WebhookGateway:
    """POST {"phone", "code", "method"} JSON to ``url`` (aiohttp); retried with backoff.

    ``authorization``: the value of an Authorization header sent with every
    POST (a provider's token), so that it need not sit in the URL.  A
    redirect counts as a failure (the code would go where the provider's
    answer says, and the token with it).  Each failed attempt is logged
    with its reason and the URL's scheme, host and port only: its path or
    query may hold a key, and the phone number and the code never go in a
    log."""

    def __init__(self, url: str, timeout: float, retries: int, authorization: str | None = None):
        self.url = url
        self.timeout = timeout
        self.retries = retries
        self.headers = {"Content-Type": "application/json"}
        if authorization:
            self.headers["Authorization"] = authorization
        self.http = None  # an aiohttp session, made in the loop at the first send
        self.origin = _origin(url)
        self.logged = LeakyTable(1)  # the warnings' own rate: WARN_RATE a minute
        self.unlogged = 0  # failed attempts not logged since the last warning

    def __repr__(self) -> str:  # never the URL or the token: both may be secrets
        return f"<WebhookGateway timeout={self.timeout} retries={self.retries}>"

    async def _post(self, body: bytes) -> None:
        import aiohttp

        if self.http is None:
            self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        async with self.http.post(self.url, data=body, headers=self.headers,
                                  allow_redirects=False) as resp:  # fmt: skip
            if not 200 <= resp.status < 300:
                raise _Failed(f"HTTP {resp.status}")

    async def send(self, phone: str, code: str, method: str) -> None:
        body = orjson.dumps({"phone": phone, "code": code, "method": method})
        delay = 0.25
        for attempt in range(self.retries + 1):
            try:
                await self._post(body)
                return
            except Exception as exc:  # noqa: BLE001 (any failure is a failed attempt;
                # its text is never logged: aiohttp's name the whole URL)
                if isinstance(exc, _Failed):
                    why = str(exc)
                elif isinstance(exc, TimeoutError):
                    why = f"no answer in {self.timeout} s"
                else:
                    why = type(exc).__name__
                last = attempt == self.retries
                self._warn(last, why, attempt)
                if last:
                    raise ServiceError(
                        ErrorCode.UNAVAILABLE, "the SMS gateway is not answering; try again later"
                    ) from None
                await asyncio.sleep(delay)
                delay *= 2

    def _warn(self, last: bool, why: str, attempt: int) -> None:
        """A warning per failed attempt, at most WARN_RATE a minute (a provider's
        outage under load would flood the log); the next one counts the rest."""
        if not self.logged.take("", WARN_RATE, 60.0, time.monotonic()):
            self.unlogged += 1
            return
        extra = {"not_logged_since": self.unlogged} if self.unlogged else {}
        self.unlogged = 0
        log_event(logger, logging.WARNING,
                  "the SMS webhook failed" + ("; the code was not sent" if last else "; retrying"),
                  webhook=self.origin, reason=why, attempt=attempt + 1,
                  attempts=self.retries + 1, **extra)  # fmt: skip

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()
            self.http = None


class _Failed(Exception):
    """A webhook answer that is not a 2xx."""


WARN_RATE = 30  # webhook failure warnings a minute


def _origin(url: str) -> str:
    """scheme://host[:port] of a URL, for the log: never its user, path or query."""
    u = urlsplit(url)
    host = u.netloc.rpartition("@")[2]  # (the port as written: u.port raises on a bad one)
    return f"{u.scheme}://{host}"


MAX_AUTH = 8192  # bytes of an Authorization value: far past any real token


def webhook_authorization(config) -> str | None:
    """The webhook's Authorization header value, or None when none is set.

    It comes from ``sms-webhook-auth-file`` (a file only its owner may read:
    mode 0600 or 0400, the way systemd's LoadCredential= hands one over) or
    from the environment variable that ``sms-webhook-auth-env`` names; never
    from a setting's value, which could end up on a command line.  Raises
    ValueError saying what is wrong, never what the value is.
    """
    path, var = config.sms_webhook_auth_file, config.sms_webhook_auth_env
    if path:
        try:
            with open(path, "rb") as f:
                mode = os.fstat(f.fileno()).st_mode
                if mode & 0o077:
                    raise ValueError(
                        f"sms-webhook-auth-file {path} may be read or written by other users "
                        f"(mode {mode & 0o777:04o}): chmod 600 it"
                    )
                raw = f.read(MAX_AUTH + 1)
        except OSError as exc:
            raise ValueError(f"cannot read sms-webhook-auth-file {path}: {exc.strerror}") from None
        origin = f"sms-webhook-auth-file {path}"
    elif var:
        raw = os.environb.get(var.encode(), b"")
        origin = f"the environment variable {var} (sms-webhook-auth-env)"
    else:
        return None
    value = raw.strip().decode("ascii", errors="replace")
    if not value:
        raise ValueError(f"{origin} is empty or not set")
    if len(raw) > MAX_AUTH or not value.isprintable() or "\ufffd" in value:
        raise ValueError(
            f"{origin} must hold one line of printable ASCII, at most {MAX_AUTH} bytes"
        )
    return value


def make_gateway(config):
    if config.sms_gateway == "webhook":
        return WebhookGateway(
            config.sms_webhook_url,
            config.sms_webhook_timeout,
            config.sms_webhook_retries,
            authorization=webhook_authorization(config),
        )
    return LogGateway(os.path.join(config.data_dir, "sms-outbox.txt"))


def device_keys(secret: bytes, iterations: int, salt: bytes | None = None) -> tuple:
    """(salt, StoredKey, ServerKey, iterations) of a device, all the store keeps.

    The SCRAM password is the secret as 64 lowercase hex characters (what the
    SDK sends, docs/PROTOCOL.md section 8); ``salt``: a fresh random one unless
    given (a worked example fixes it)."""
    return MECHANISM.make_auth_info(secret.hex(), iteration_count=iterations, salt=salt)


def _code_hash(salt: bytes, code: str) -> bytes:
    return hashlib.sha256(salt + code.encode()).digest()


class Accounts:
    def __init__(self, store: Store, config, gateway):
        self.store = store
        self.config = config
        self.gateway = gateway
        self.failures = LeakyTable(config.login_table_size)
        self.logins = LeakyTable(config.login_table_size)  # successful ones, per device
        self._salt_key = store.secret(b"scram-salt")

    # -- registration -------------------------------------------------------

    def code_txn(self, txn, now: int, phone: str, source: str) -> str:
        """A new code for ``phone`` inside ``txn`` (a job of the tick's commit), under
        the rate windows; returns the code, to be sent after the commit.  A refusal
        writes nothing."""
        c = self.config
        store = self.store
        window = c.register_window * 1000
        store.check_room(txn)
        net = net_key(source)
        # per number: from this network (register-per-phone), so that a stranger's
        # requests do not use up the owner's, and from all (register-per-phone-total),
        # the bound on the texts one number gets
        limits = (
            (f"reg-ip:{source_key(source)}", c.register_per_ip,
             "too many registrations from this address"),
            (f"reg-net:{net}", c.register_per_net, "too many registrations from this network"),
            (f"reg-pnet:{phone} {net}", c.register_per_phone,
             "too many codes requested for this number from this network"),
            (f"reg-phone:{phone}", c.register_per_phone_total,
             "too many codes requested for this number"),
        )  # fmt: skip
        for key, limit, text in limits:
            wait = store.window_wait(txn, key, limit, window, now)
            if wait:  # (the newcomer trying again and again learns when it clears)
                raise ServiceError(ErrorCode.RATE_LIMITED, f"{text}; {retry_in(wait)}")
        for key, limit, _text in limits:
            store.hit_txn(txn, key, limit, window, now)
        code = f"{secrets.randbelow(10**6):06d}"
        salt = os.urandom(16)
        # (as many live codes as register-per-phone-total lets be asked for: fewer, and
        # a stranger's requests from other networks pushed the owner's live code out)
        store.put_code_txn(txn, now, phone, _code_hash(salt, code), salt, c.code_ttl * 1000,
                           c.code_attempts, max(MAX_CODES, c.register_per_phone_total))  # fmt: skip
        return code

    async def request_code(self, phone: str, method: str, source: str) -> int:
        """Send a new code to ``phone`` (in a transaction of its own); returns its
        lifetime in seconds."""
        with self.store.write() as txn:
            code = self.code_txn(txn, self.store.clock(), phone, source)
        await self.gateway.send(phone, code, method)
        return self.config.code_ttl

    def verify(self, phone: str, code: str, identity_key: bytes,
               source: str | None = None) -> tuple[str, bytes, list[str]]:  # fmt: skip
        """Check the code; create the device. Returns (address, secret, removed devices).

        ``source``: the sender's address, whose wrong codes are limited
        (``verify-failures``) and counted against each code for its network
        (``code-attempts-per-net``), so that a stranger cannot void the owner's code."""

        def matches(salt: bytes, code_hash: bytes) -> bool:
            return hmac.compare_digest(_code_hash(salt, code), code_hash)

        c = self.config
        failures = None
        if source is not None:
            failures = (f"verify-ip:{source_key(source)}", c.verify_failures,
                        c.verify_window * 1000)  # fmt: skip
        # wrong codes are counted per code and network (code-attempts-per-net): a
        # stranger's void only his own network's chance, not the owner's
        net = net_key(source) if source is not None else ""
        result = self.store.take_code(phone, matches, c.code_attempts, failures,
                                      (net, c.code_attempts_per_net))  # fmt: skip
        if result == "refused":
            raise ServiceError(ErrorCode.RATE_LIMITED, "too many wrong codes from this address; "
                               "try again later")  # fmt: skip
        if result != "ok":
            raise ServiceError(ErrorCode.BAD_CODE, "wrong, expired or already used code")
        secret = os.urandom(32)
        keys = device_keys(secret, self.config.scram_iterations)
        address, removed = self.store.register_device(phone, identity_key, keys)
        return address, secret, removed

    # -- login ----------------------------------------------------------------

    def scram_server(self, s_nonce: str | None = None, known: tuple | None = None):
        """The server half of one login; ``s_nonce`` fixes the server's nonce, only
        for reproducing a worked example (docs/PROTOCOL.md section 8).
        ``known``: (address, its device record or None) already read
        (``login_records``); otherwise the record is read when SCRAM asks."""
        if known is None:
            return MECHANISM.make_server(self._auth_info, s_nonce=s_nonce)
        address, device = known

        def auth_info(name: str):
            return self._auth_info(name, device if name == address else False)

        return MECHANISM.make_server(auth_info, s_nonce=s_nonce)

    def login_records(self, address: str) -> tuple[dict | None, dict | None]:
        """(the account, the device) of a login, in one read transaction."""
        phone = address.partition(":")[0]
        store = self.store
        with store.read() as txn:
            return store._get(txn, "accounts", phone), store._get(txn, "devices", address)

    def _auth_info(self, username: str, dev=False):
        if dev is False:
            dev = self.store.device(username)
        if dev is None:
            # The shape of a real answer, and the same salt every time; the
            # proof cannot match (the keys are random).
            salt = hmac.new(self._salt_key, username.encode(), hashlib.sha256).digest()
            return (salt, os.urandom(32), os.urandom(32), self._likely_iterations(username))
        return (dev["salt"], dev["stored_key"], dev["server_key"], dev["iterations"])

    def _likely_iterations(self, username: str) -> int:
        """The iteration count a made-up device is answered with: one of the counts
        real devices have, chosen for ``username`` by a keyed hash (the same on
        every try), each as often as devices have it; the current setting while
        the store has no device."""
        tally = self.store.iteration_tally()
        total = sum(tally.values())
        if not total:
            return self.config.scram_iterations
        mac = hmac.new(self._salt_key, b"iterations " + username.encode(), hashlib.sha256)
        pick = int.from_bytes(mac.digest()[:8], "big") % total
        for iterations, n in sorted(tally.items()):
            if pick < n:
                return iterations
            pick -= n
        return self.config.scram_iterations  # (not reached)

    def _failure_keys(self, address: str, ip: str) -> tuple[str, str]:
        net = source_key(ip)
        return f"a {net}", f"d {address} {net}"

    def login_allowed(self, address: str, ip: str) -> bool:
        """False while ``ip`` (or ``address`` from ``ip``) is over its failed-login limit."""
        if not self.failures.table:  # no failure counted (or all shed): nothing to check
            return True
        c = self.config
        now, window = self.store.clock() / 1000, c.login_window
        by_ip, by_device = self._failure_keys(address, ip)
        return not (
            self.failures.over(by_ip, c.login_failures_per_ip, window, now)
            or self.failures.over(by_device, c.login_failures, window, now)
        )

    def login_counted(self, device: str) -> bool:
        """Count a login of ``device`` whose proof was right; False past device-logins per
        device-logins-window (then it is refused).  Only proven logins count: a stranger
        failing on purpose cannot use up the owner's."""
        c = self.config
        if not c.device_logins:
            return True
        now = self.store.clock() / 1000
        return self.logins.take(device, c.device_logins, c.device_logins_window, now)

    def login_failed(self, address: str, ip: str) -> None:
        """Count a failed (or abandoned) login of ``address`` from ``ip``."""
        c = self.config
        now, window = self.store.clock() / 1000, c.login_window
        by_ip, by_device = self._failure_keys(address, ip)
        self.failures.hit(by_ip, c.login_failures_per_ip, window, now)
        self.failures.hit(by_device, c.login_failures, window, now)
