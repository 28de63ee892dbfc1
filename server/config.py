"""Server configuration: embedded defaults, a TOML file, command-line flags.

Precedence: a flag on the command line beats the file, the file beats the
default; no file is needed to start.  File keys are the flag names without
the leading dashes (``login-timeout = 10``; ``login_timeout`` works too).
Every key, its default and its meaning is in OPTIONS below, which also
builds the ``pigeon serve`` flags (in the argument groups of GROUPS, each
value shown as what it takes: ``HOST:PORT``, ``SECONDS``, ``{fsync,os}``)
and the tables in docs/OPERATIONS.md.

Errors say what to fix, and all of them come at once: ``load`` checks every
key of every layer, then the rules between keys, and raises one ConfigError
whose ``errors`` hold one line per problem, each naming where the value came
from and the key (``config.toml: login-timeout: must be a number > 0, got
'soon'``).  An unknown key is answered with the closest known names, not
with all of them.  ``problems`` returns the same lines as a list, for tools
that check a file without starting anything.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import tomllib
import urllib.parse
from dataclasses import dataclass, field


class ConfigError(Exception):
    """Bad settings: ``errors`` holds one line per problem, each naming the key and what is
    expected; ``str()`` is that line alone, or a count and then the lines."""

    def __init__(self, errors: str | list[str]):
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        super().__init__(self.errors[0] if len(self.errors) == 1 else self.errors)

    def __str__(self) -> str:
        if len(self.errors) == 1:
            return self.errors[0]
        return f"{len(self.errors)} errors in the settings:\n" + "\n".join(self.errors)


#: The most any number setting may be: an integer a float holds exactly, and in
#: milliseconds still a 64-bit one (past 2**64 orjson could not pass the settings to
#: the workers; 1e308 seconds of queue-max-age made int(inf) milliseconds).
MAX_NUMBER = 2**53
MAX_WORKERS = 1024
#: Below 1 MiB LMDB cannot hold the store's tables (MDB_MAP_FULL at start); 64 TiB is
#: half of an x86-64 process's address space (LMDB fails cleanly past what mmap gives,
#: but takes no map of 2**64 at all).
MIN_MAP_SIZE = 1 << 20
MAX_MAP_SIZE = 1 << 46
#: max-frame: a frame's length is 3 bytes; and room past the 256 bytes a delivery adds
#: to a message (server/worker.py, PAYLOAD_HEADROOM) for a body, as login-max-frame's
#: default.
MIN_MAX_FRAME = 4096
MAX_FRAME = 0xFFFFFF
#: RFC 7677's floor for SCRAM-SHA-256, which scramp enforces (it raises below it).
MIN_SCRAM_ITERATIONS = 4096


_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_HOST_NAME = re.compile(rf"{_LABEL}(\.{_LABEL})*\.?")


def split_hostport(v) -> tuple[str, int]:
    """The host (an IPv6 address without its brackets) and port of a HOST:PORT; a
    ValueError saying what to fix if it is not one a socket can bind or reach.

    An IPv6 address must be in brackets: ``::1:7650`` could be [::1]:7650 or
    [::1:7650] with the port left out, and a URL made of it would be wrong.
    """
    text = str(v)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()):
        raise ValueError(f"must be HOST:PORT (e.g. 127.0.0.1:7650), got {v!r}")
    if "[" in host or "]" in host or ":" in host:
        inner = host[1:-1] if host.startswith("[") and host.endswith("]") else ""
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            raise ValueError(
                f"an IPv6 address must be in brackets (e.g. [::1]:7650), got {v!r}"
            ) from None
        host = inner
    elif not _HOST_NAME.fullmatch(host) or (host.replace(".", "").isdigit() and not _is_ipv4(host)):
        raise ValueError(f"host must be an IP address or a host name, got {host!r}")
    if not 0 < int(port) < 65536:
        raise ValueError(f"port must be 1-65535, got {port}")
    return host, int(port)


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def _listen(v) -> str:
    split_hostport(v)
    return str(v)


_listen.metavar = "HOST:PORT"


def _host_key(host: str):
    try:
        return ipaddress.ip_address(host)  # [0:0::1] is [::1]
    except ValueError:
        return host.lower().rstrip(".")  # a host name, compared as written (not resolved)


_WILDCARDS = (ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("::"))


def _overlap(a: str, b: str) -> str | None:
    """Whether listeners on ``a`` and ``b`` would take one port: "same" (one address),
    "wildcard" (0.0.0.0 takes the port on every IPv4 address, a host name's too; [::]
    on every address, IPv4 as well on a dual-stack Linux), or None.  Port 0 (any free
    port) never clashes."""
    (ha, pa), (hb, pb) = split_hostport(a), split_hostport(b)
    if pa != pb or pa == 0:
        return None
    ka, kb = _host_key(ha), _host_key(hb)
    if ka == kb:
        return "same"
    wild = {k for k in (ka, kb) if k in _WILDCARDS}
    other = kb if ka in wild else ka
    if _WILDCARDS[1] in wild or (wild and not isinstance(other, ipaddress.IPv6Address)):
        return "wildcard"
    return None


def _number(kind, minimum: float, inclusive: bool):
    """A checker for an int or float setting; TOML gives numbers, flags give strings."""
    what = (
        ("an integer" if kind is int else "a number")
        + (" >= " if inclusive else " > ")
        + str(minimum)
    )

    def check(v):
        try:
            if isinstance(v, bool):
                raise ValueError
            n = kind(v)  # int(inf), TOML's 1e400, raises OverflowError
            if kind is int and isinstance(v, float) and v != n:
                raise ValueError
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"must be {what}, got {v!r}") from None
        # inf and nan are no number of seconds or bytes (and nan passes any comparison)
        if not math.isfinite(n) or n < minimum or (n == minimum and not inclusive):
            raise ValueError(f"must be {what}, got {v!r}")
        if n > MAX_NUMBER:
            raise ValueError(f"must be at most {MAX_NUMBER} (2**53), got {v!r}")
        return n

    check.metavar = "N"
    return check


_positive_int = _number(int, 0, False)
_positive_float = _number(float, 0, False)
_non_negative_int = _number(int, 0, True)
_non_negative_float = _number(float, 0, True)


def _choice(*allowed):
    def check(v):
        if v not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}, got {v!r}")
        return v

    check.metavar = "{" + ",".join(allowed) + "}"
    return check


def _listen_or_off(v):
    if str(v).lower() in ("off", ""):
        return "off"
    return _listen(v)


_listen_or_off.metavar = "HOST:PORT|off"


def _bool(v):
    if isinstance(v, bool):
        return v
    if str(v).lower() in ("true", "yes", "on", "1"):
        return True
    if str(v).lower() in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"must be true or false, got {v!r}")


_bool.metavar = "{true,false}"


def _opt_str(v):
    return None if v in (None, "") else str(v)


def redact_url(value):
    """A URL setting as it may be shown (check-config, errors): its user part
    (a user and password, or a token in the user's place) and its query
    (where providers put API keys) replaced by REDACTED; any other value as
    it is.  Never raises: a malformed URL is redacted the same way."""
    if not isinstance(value, str) or "://" not in value:
        return value
    scheme, _, rest = value.partition("://")
    rest, hash_, fragment = rest.partition("#")
    rest, q, _query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        netloc = "REDACTED@" + netloc.rpartition("@")[2]
    return (f"{scheme}://{netloc}{slash}{path}" + ("?REDACTED" if q else "")
            + (hash_ + fragment))  # fmt: skip


def _url(v):
    """An http:// or https:// URL with a host: what the webhook, push and media URLs are
    (no file:, ftp: or anything else an HTTP client library might open)."""
    text = str(v)
    try:
        parts = urllib.parse.urlsplit(text)
        parts.port  # noqa: B018 (raises ValueError past 65535)
        ok = parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
    except ValueError:
        ok = False
    if not ok or not text.isprintable() or " " in text:
        raise ValueError(
            f"must be an http:// or https:// URL with a host, got {redact_url(text)!r}"
        )
    return text


_url.metavar = "URL"


def _opt_url(v):
    return None if v in (None, "") else _url(v)


_opt_url.metavar = "URL"


@dataclass(frozen=True)
class Option:
    name: str  # the attribute; the flag is --name-with-dashes
    default: object
    check: object
    help: str
    metavar: str | None = None  # what --help shows for the value; None: derived (_metavar)


OPTIONS: list[Option] = [
    Option("listen", "127.0.0.1:7650", _listen, "plain TCP listener, HOST:PORT"),
    Option(
        "tls_listen",
        "127.0.0.1:7651",
        _listen,
        "TLS listener, HOST:PORT (used only when tls-cert is set)",
    ),
    Option(
        "metrics_listen",
        "127.0.0.1:7659",
        _listen_or_off,
        "Prometheus /metrics, /health and the JSON /status listener, HOST:PORT, or off",
    ),
    Option(
        "metrics_connections",
        64,
        _positive_int,
        "connections the metrics listener serves at once (one thread each); past it a new "
        "connection is closed at once",
    ),
    Option(
        "metrics_timeout",
        5.0,
        _positive_float,
        "seconds a metrics or health client has to send its request and read the answer; "
        "then it is closed",
    ),
    Option(
        "control_connections",
        16,
        _positive_int,
        "connections the control socket (pigeon admin) holds at once; past it a new one is "
        "closed at once",
    ),
    Option(
        "control_timeout",
        2.0,
        _positive_float,
        "seconds a control-socket client has to send its request line; then it is closed",
    ),
    Option("tls_cert", None, _opt_str, "PEM certificate chain; enables the TLS listener", "FILE"),
    Option(
        "tls_key", None, _opt_str, "PEM private key for tls-cert (default: the cert file)", "FILE"
    ),
    Option(
        "data_dir",
        "var",
        str,
        "data directory (LMDB store, SMS outbox); relative to the cwd",
        "DIR",
    ),
    Option("workers", 0, _non_negative_int, "worker processes, at most 1024; 0 = one per core"),
    Option(
        "max_frame", 1 << 20, _positive_int, "largest frame payload accepted, bytes: 4096-16777215"
    ),
    Option(
        "login_max_frame",
        4096,
        _positive_int,
        "largest frame payload accepted from a connection that has not logged in (registration, "
        "pairing, the SCRAM exchange), bytes; past it error 110 and closed: what a peer that "
        "has not logged in can make the server buffer per connection (capped at max-frame)",
    ),
    Option(
        "login_timeout", 10.0, _positive_float, "seconds a new connection has to finish logging in"
    ),
    Option(
        "idle_timeout",
        120.0,
        _positive_float,
        "close a connection silent this many seconds (keepalive)",
    ),
    Option(
        "max_connections_per_ip",
        1000,
        _positive_int,
        "connections one source address may hold, per worker",
    ),
    Option(
        "max_connections",
        100_000,
        _positive_int,
        "connections one worker holds; capped at the open-files limit minus files-reserve. "
        "Past it a new connection takes the place of the oldest one not logged in (told 502), "
        "and is refused only when every one is logged in",
    ),
    Option(
        "files_reserve",
        64,
        _positive_int,
        "file descriptors a worker keeps for its own use (store, sockets between workers); "
        "connections past open-files-limit minus this are refused with error 502",
    ),
    Option(
        "memory_trim_interval",
        60.0,
        _non_negative_float,
        "seconds between a worker's returns of freed heap memory to the system (glibc's "
        "malloc_trim; elsewhere nothing to do): a flood of TLS handshakes leaves hundreds of "
        "MB freed but held otherwise; 0: never",
    ),
    Option("code_ttl", 300, _positive_int, "seconds a one-time registration code stays valid"),
    Option(
        "code_attempts",
        15,
        _positive_int,
        "wrong codes a code allows in all, from every network together, before it is void "
        "for everyone (the bound on guessing it: code-attempts in 10**6)",
    ),
    Option(
        "code_attempts_per_net",
        5,
        _positive_int,
        "wrong codes a code allows from one network (IPv4 /24, IPv6 /48) before it is void "
        "for that network only, so that other networks' wrong codes cannot void the owner's "
        "chance. Keep it below code-attempts, and verify-failures below it",
    ),
    Option(
        "verify_failures",
        3,
        _positive_int,
        "wrong codes one source address (IPv6: its /64) may send per verify-window, for any "
        "numbers, across workers; past it error 302 and the code is not tried. Keep it below "
        "code-attempts-per-net, so that one address cannot void its network's chance at a code",
    ),
    Option("verify_window", 600, _positive_int, "sliding window for verify-failures, seconds"),
    Option(
        "register_per_phone",
        3,
        _positive_int,
        "code requests per phone number from one network (IPv4 /24, IPv6 /48) per "
        "register-window: a network's requests do not use up another's",
    ),
    Option(
        "register_per_phone_total",
        10,
        _positive_int,
        "code requests per phone number from all networks together per register-window "
        "(the bound on the texts one number is sent)",
    ),
    Option(
        "register_per_ip",
        20,
        _positive_int,
        "code requests per source address per register-window",
    ),
    Option(
        "register_per_net",
        200,
        _positive_int,
        "code requests per network (IPv4 /24, IPv6 /48) per register-window, all its "
        "addresses together (each code is a text message and records kept for the window)",
    ),
    Option(
        "unauth_rate",
        1.0,
        _non_negative_float,
        "register, verify and pair requests one connection may send per second before it "
        "logs in, on average (token bucket); past it error 302 and the connection is closed, "
        "the rest of its input unread. 0 = no limit",
    ),
    Option("unauth_burst", 10, _positive_int, "how many of those a connection may send at once"),
    Option(
        "unauth_in_flight",
        1,
        _positive_int,
        "register and verify requests one connection may have unanswered; past it error 405",
    ),
    Option(
        "unauth_worker_in_flight",
        32,
        _positive_int,
        "register and verify requests one worker handles at once, all its connections "
        "together; past it error 502",
    ),
    Option(
        "register_window",
        3600,
        _positive_int,
        "sliding window for the registration limits, seconds",
    ),
    Option(
        "login_failures",
        10,
        _positive_int,
        "failed logins per device from one source address (IPv6: its /64) per login-window "
        "before 302 (per worker; an abandoned login counts)",
    ),
    Option(
        "login_failures_per_ip",
        100,
        _positive_int,
        "failed logins from one source address (IPv6: its /64), whatever the device, per "
        "login-window before 302 (per worker)",
    ),
    Option("login_window", 300, _positive_int, "sliding window for login failures, seconds"),
    Option(
        "device_logins",
        60,
        _non_negative_int,
        "logins of one device (with the right secret) per device-logins-window, per worker, "
        "before 302 (counted after the proof: a stranger cannot use them up); each login "
        "writes the session record, a log line and a presence change. 0 = no limit",
    ),
    Option(
        "device_logins_window",
        60,
        _positive_int,
        "window of device-logins, seconds (what was used drains evenly over it: after a "
        "burst of device-logins, one login per window / device-logins seconds)",
    ),
    Option(
        "login_table_size",
        100_000,
        _positive_int,
        "entries in each of a worker's in-memory tables of failed logins (source addresses "
        "and (device, address) pairs) and of client log lines (source addresses); never in "
        "the store, the least recent are forgotten first",
    ),
    Option(
        "scram_iterations",
        4096,
        _positive_int,
        "PBKDF2 iterations for new device keys, at least 4096 (made-up devices are answered "
        "with a count real devices have)",
    ),
    Option(
        "sms_gateway",
        "log",
        _choice("log", "webhook"),
        "how codes are sent: log (outbox file in data-dir) or webhook",
    ),
    Option(
        "sms_webhook_url",
        None,
        _opt_url,
        "http:// or https:// URL the webhook gateway POSTs {phone, code, method} JSON to",
        "URL",
    ),
    Option(
        "sms_webhook_auth_file",
        None,
        _opt_str,
        "file (mode 0600 or 0400) holding the value of an Authorization header sent with "
        "each webhook POST, e.g. 'Bearer TOKEN'; read at start and on reload",
        "FILE",
    ),
    Option(
        "sms_webhook_auth_env",
        None,
        _opt_str,
        "name of an environment variable holding that Authorization value instead "
        "(the name, not the value, is the setting)",
        "NAME",
    ),
    Option("sms_webhook_timeout", 5.0, _positive_float, "seconds per webhook attempt"),
    Option("sms_webhook_retries", 3, _non_negative_int, "webhook retries after the first attempt"),
    Option(
        "push_coalesce",
        30.0,
        _positive_float,
        "seconds after a wake-up during which an offline device is not woken again, however "
        "many entries reach its queue (a connect starts it again)",
    ),
    Option(
        "push_queue",
        10_000,
        _positive_int,
        "wake-ups waiting for the gateway per worker; past it they are dropped and counted",
    ),
    Option(
        "push_batch",
        100,
        _positive_int,
        "wake-ups the gateway takes at once (one webhook POST carries at most this many)",
    ),
    Option(
        "push_linger",
        0.05,
        _non_negative_float,
        "seconds the gateway waits after a wake-up for more to send with it (one webhook "
        "POST for a burst; 0: each tick's at once)",
    ),
    Option(
        "push_concurrency",
        16,
        _positive_int,
        "push requests in flight per worker (then the gateway waits and its queue fills)",
    ),
    Option("push_request_timeout", 5.0, _positive_float, "seconds per push request attempt"),
    Option(
        "push_retries",
        2,
        _non_negative_int,
        "retries of a push request after the first attempt (unreachable, 429, 5xx)",
    ),
    Option(
        "push_backoff",
        0.5,
        _positive_float,
        "seconds before the first retry of a push request; doubled for each next one",
    ),
    Option(
        "push_ttl",
        3600,
        _positive_int,
        "seconds a provider may keep a wake-up for an unreachable device (APNs, Web Push)",
    ),
    Option(
        "push_token_max",
        1024,
        _positive_int,
        "bytes of a registered push token or endpoint (at most 4096)",
    ),
    Option(
        "push_ca_file",
        None,
        _opt_str,
        "CA bundle (PEM) the push providers' TLS certificates are checked against instead "
        "of the system's (a proxy in between, or a test)",
        "FILE",
    ),
    Option(
        "push_webhook_url",
        None,
        _opt_url,
        "http:// or https:// URL the webhook gateway POSTs wake-ups to as JSON; set: devices "
        "may register webhook targets",
        "URL",
    ),
    Option(
        "push_webhook_auth_file",
        None,
        _opt_str,
        "file (mode 0600 or 0400) holding the Authorization header value of each wake-up POST",
        "FILE",
    ),
    Option(
        "push_webhook_auth_env",
        None,
        _opt_str,
        "name of an environment variable holding that Authorization value instead",
        "NAME",
    ),
    Option(
        "push_fcm_credentials",
        None,
        _opt_str,
        "Firebase service account JSON key (mode 0600); set: devices may register fcm targets",
        "FILE",
    ),
    Option(
        "push_fcm_url", "https://fcm.googleapis.com", _url, "base URL of the FCM HTTP v1 API", "URL"
    ),
    Option(
        "push_apns_key_file",
        None,
        _opt_str,
        "APNs token-auth signing key (.p8, mode 0600); set: devices may register apns targets",
        "FILE",
    ),
    Option("push_apns_key_id", None, _opt_str, "the APNs key's id (the JWT's kid)", "ID"),
    Option(
        "push_apns_team_id", None, _opt_str, "the Apple developer team id (the JWT's iss)", "ID"
    ),
    Option("push_apns_topic", None, _opt_str, "the app's bundle id (apns-topic)", "TOPIC"),
    Option(
        "push_apns_url",
        "https://api.push.apple.com",
        _url,
        "base URL of APNs (https://api.sandbox.push.apple.com for development builds)",
        "URL",
    ),
    Option(
        "push_vapid_key_file",
        None,
        _opt_str,
        "VAPID private key (PEM, P-256, mode 0600); set: devices may register webpush targets",
        "FILE",
    ),
    Option(
        "push_vapid_subject",
        None,
        _opt_str,
        "VAPID subject: a mailto: or https: contact for the push services",
        "URI",
    ),
    Option(
        "push_webpush_hosts",
        "fcm.googleapis.com,updates.push.services.mozilla.com,.push.apple.com,.notify.windows.com",
        str,
        "hosts a Web Push endpoint may name, comma-separated (a leading dot: any "
        "subdomain; port 443 unless given as host:port); the server POSTs to no other",
        "HOSTS",
    ),
    Option(
        "map_size",
        8 << 30,
        _positive_int,
        "LMDB map size, bytes (the file is sparse; this is the ceiling): 1 MiB (1048576) "
        "to 64 TiB (70368744177664)",
    ),
    Option(
        "store_reserve",
        10,
        _number(int, 0, True),
        "percent of map-size kept for what frees space (device acks and their delivered "
        "receipts, sessions): writes that add data get error 501 past map-size minus this",
    ),
    Option(
        "sync",
        "fsync",
        _choice("fsync", "os"),
        "durability of each group commit: fsync (survives power loss) or os (the OS "
        "flushes later: survives a pigeon crash, not a machine crash)",
    ),
    Option(
        "store_writemap",
        False,
        _bool,
        "LMDB writes pages straight into its memory map (MDB_WRITEMAP) instead of with a "
        "write call each; the data file then has map-size as its length, a full disk kills "
        "the worker (SIGBUS), and with sync = os a machine crash can damage the store; "
        "see Durability and queues",
    ),
    Option(
        "queue_max_count",
        10_000,
        _positive_int,
        "entries one device's queue may hold; past it senders get error 402",
    ),
    Option(
        "queue_max_bytes",
        64 << 20,
        _positive_int,
        "bytes one device's queue may hold; past it senders get error 402",
    ),
    Option(
        "stranger_queue_count",
        1000,
        _non_negative_int,
        "entries a device's queue may hold before senders its user does not know (not in "
        "their contacts, not written to lately) get error 402 (a group message: that member "
        "in the ack's failed; a group add: that user in the answer's failed; a group "
        "notice by such a user: not queued for it, unless it is about its user); "
        "0 = queue-max-count",
    ),
    Option(
        "stranger_queue_bytes",
        4 << 20,
        _non_negative_int,
        "bytes a device's queue may hold before senders its user does not know get error "
        "402; 0 = queue-max-bytes",
    ),
    Option(
        "queue_max_age",
        30 * 86_400,
        _positive_float,
        "seconds an entry may wait in a queue before it is purged (30 days)",
    ),
    Option(
        "purge_interval",
        60.0,
        _positive_float,
        "seconds between purges of expired queue entries",
    ),
    Option(
        "dedup_window",
        86_400,
        _positive_float,
        "seconds a message id is remembered per sending device: a retry within it is "
        "acked again and stored once (kept between 1x and 2x this)",
    ),
    Option(
        "ack_delay",
        0.005,
        _non_negative_float,
        "seconds a tick with only device acks waits for more to share its commit (acks "
        "are off the messages' path; a crash in between redelivers); 0: commit at once",
    ),
    Option(
        "commit_max_bytes",
        4 << 20,
        _positive_int,
        "message bytes one group commit gathers at most: past it the tick's commit is "
        "written at once (LMDB holds a commit's pages in memory until it is written)",
    ),
    Option(
        "delivery_window",
        64,
        _positive_int,
        "queue entries pushed to a device past its last ack; the rest wait in the store",
    ),
    Option(
        "write_buffer_high",
        256 << 10,
        _positive_int,
        "bytes buffered for a client that is not reading before pushes and reads pause",
    ),
    Option(
        "write_buffer_low",
        64 << 10,
        _non_negative_int,
        "bytes the buffer must drain to before pushes and reads resume",
    ),
    Option(
        "read_frames_per_turn",
        256,
        _non_negative_int,
        "frames of one connection handled per turn of the worker's loop; past them its "
        "reading pauses until the loop has served the other ready connections (one "
        "client's flood of pings or refused requests held the worker's loop for seconds); "
        "0 = no limit",
    ),
    Option(
        "bus_buffer_high",
        1 << 20,
        _positive_int,
        "bytes waiting to be written to one other worker before pushes to it are left out "
        "(its devices read them from their queues): bounds a worker's memory when another "
        "falls behind",
    ),
    Option(
        "bus_buffer_low",
        256 << 10,
        _non_negative_int,
        "bytes that must drain to before pushes to that worker resume",
    ),
    Option(
        "delivered_receipts",
        True,
        _bool,
        "send senders a delivered receipt (two ticks); false only for benchmarks",
    ),
    Option(
        "messages_per_day",
        50_000,
        _non_negative_int,
        "messages and read receipts one device may send per 24 h, per worker (a device "
        "that reconnects to another worker counts anew there; the count is kept with the "
        "device's message-rate bucket); past it error 302, nothing stored (a retry of one "
        "already stored gets its first ack, uncounted). Each one keeps a "
        "dedup record for the dedup-window, so this bounds the records one device can make "
        "the store hold. 0 = no limit",
    ),
    Option(
        "presence_subscriptions",
        1000,
        _positive_int,
        "presence subscriptions one connection may hold; past it error 406",
    ),
    Option(
        "message_rate",
        100.0,
        _non_negative_float,
        "messages, receipts and requests one device may send per second, on average "
        "(token bucket, per worker: reconnecting to another worker can at most multiply it "
        "by the worker count); past it error 405. 0 = no limit",
    ),
    Option(
        "message_burst",
        500,
        _positive_int,
        "how many of those a device may send at once (the bucket is the device's, kept "
        "across its connections to a worker: logging in again does not refill it)",
    ),
    Option(
        "lookup_users_per_token",
        16,
        _non_negative_int,
        "a devices or keys request about N users draws 1 + N // this from the message-rate "
        "bucket, not 1 (a 256-user devices query costs the server about 3 ms); 0 = one "
        "whatever its size",
    ),
    Option(
        "rate_buckets",
        100_000,
        _positive_int,
        "devices whose message-rate bucket a worker remembers (about 250 bytes each); "
        "past it those that have refilled, then the least recently used, are forgotten",
    ),
    Option(
        "typing_rate",
        5.0,
        _non_negative_float,
        "typing indicators (chatstate) one connection may send per second; the excess is "
        "dropped (error 405 at most once a second). 0 = no limit",
    ),
    Option("typing_burst", 20, _positive_int, "typing indicators a connection may send at once"),
    Option(
        "new_chats",
        100,
        _non_negative_int,
        "new conversations an account may start per new-chats-window with users who do not "
        "have it as a contact (a first message, or adding them to a group); past it error "
        "404. 0 = no limit",
    ),
    Option("new_chats_window", 86_400, _positive_float, "sliding window for new-chats, seconds"),
    Option(
        "discover_numbers",
        2000,
        _non_negative_int,
        "phone numbers an account may look up per discover-window (numbers already in its "
        "contact set and members of its groups are free; a device-list or key query about "
        "a user outside them counts one, and so does each number outside its contact set "
        "that a group create or add names); past it error 302",
    ),
    Option(
        "discover_window", 86_400, _positive_float, "sliding window for discover-numbers, seconds"
    ),
    Option(
        "discover_batch",
        1000,
        _positive_int,
        "phone numbers in one discover request (at most 1,024: a node's children); "
        "past it error 406",
    ),
    Option("contacts_max", 10_000, _positive_int, "contacts one account may hold; past it 406"),
    Option(
        "blocklist_max",
        1024,
        _positive_int,
        "users one account may block (at most 1,024: the blocklist answer is one node, "
        "whose children are capped at 1,024); past it error 406",
    ),
    Option(
        "client_log_lines",
        10,
        _positive_int,
        "log lines about client misbehaviour (failed logins, client-reported errors, answers "
        "dropped because the client had closed) per "
        "source address per minute, per worker; the rest are counted in the metrics",
    ),
    Option(
        "max_linked_devices",
        4,
        _non_negative_int,
        "companion devices an account may link beside its primary (error 310 past it)",
    ),
    Option(
        "pair_ttl",
        60,
        _positive_int,
        "seconds a pairing reference (QR code) or link code stays valid; a reference is "
        "replaced by a new one when it ends",
    ),
    Option(
        "pair_refreshes",
        5,
        _non_negative_int,
        "new pairing references a waiting companion gets before 306 (then it asks again)",
    ),
    Option(
        "pair_timeout",
        360.0,
        _positive_float,
        "seconds from its connect a connection waiting to be paired has to be linked and "
        "log in (instead of login-timeout; error 130)",
    ),
    Option(
        "pair_per_address",
        4,
        _positive_int,
        "connections of one source address (IPv6: its /64) waiting to be paired at once, per "
        "worker (302 past it)",
    ),
    Option(
        "pair_per_ip",
        20,
        _positive_int,
        "pair requests per source address per register-window",
    ),
    Option(
        "pair_per_net",
        200,
        _positive_int,
        "pair requests per network (IPv4 /24, IPv6 /48) per register-window, all its "
        "addresses together",
    ),
    Option(
        "link_per_account",
        10,
        _positive_int,
        "link attempts per account per register-window (the same number per source address)",
    ),
    Option(
        "companion_expiry",
        30 * 86400,
        _positive_int,
        "seconds without a login of the primary after which its companions are unlinked",
    ),
    Option(
        "one_time_keys_max",
        50,
        _positive_int,
        "one-time keys the key directory holds per device, and one upload may carry (error 313 "
        "past it; an upload carrying more is refused before its signatures are checked)",
    ),
    Option(
        "one_time_keys_low",
        10,
        _non_negative_int,
        "a device is told to upload more one-time keys when a fetch takes its count below "
        "this (once per crossing; 0: never)",
    ),
    Option(
        "keys_query_max",
        200,
        _positive_int,
        "users one key-bundle request may name (error 406 past it, and when their devices "
        "are more than 1,024 bundles: the children of one node); at most 1,024",
    ),
    Option(
        "devices_query_max",
        256,
        _positive_int,
        "users one devices request may name (error 406 past it); at most 1,024 (the "
        "children of one node)",
    ),
    Option(
        "keys_fetch_per_account",
        1000,
        _positive_int,
        "device key bundles an account may fetch per keys-fetch-window (error 302 past it; "
        "past it the devices of members of its groups get their fallback keys instead, "
        "consuming nothing)",
    ),
    Option(
        "keys_fetch_window",
        3600,
        _positive_float,
        "sliding window for keys-fetch-per-account, seconds",
    ),
    Option(
        "key_uploads",
        60,
        _positive_int,
        "key uploads one device may make per keys-fetch-window (each has its signatures "
        "verified on the worker's loop); error 302 past it",
    ),
    Option(
        "keys_per_device",
        5,
        _non_negative_int,
        "one-time keys one user may take from one device of another user per "
        "keys-fetch-window; past it that user's fetches of that device carry the fallback "
        "key (not consumed). 0 = no limit",
    ),
    Option(
        "key_changes",
        20,
        _positive_int,
        "times per key-changes-window an account's devices may change their identity key "
        "(each change queues a notice for every user who has the account as a contact); "
        "error 302 past it. Links, first uploads and registrations are not counted: their "
        "notices are coalesced, at most one undelivered per device and changed user",
    ),
    Option(
        "key_changes_window", 86_400, _positive_float, "sliding window for key-changes, seconds"
    ),
    Option(
        "group_max_members",
        1024,
        _positive_int,
        "members a group may have (error 432 past it; each group message is a queue "
        "entry per member device)",
    ),
    Option(
        "user_groups_max",
        1024,
        _positive_int,
        "groups one user may be a member of, at most 1,024 (the group list answer is one "
        "node; each membership is store and per-worker cache work): a create, join or join "
        "request that would put the user past it is refused with error 437, and an add or "
        "approve lists the user in failed with 437",
    ),
    Option(
        "groups_per_day",
        100,
        _positive_int,
        "groups one user may create per 24 h (error 302 past it)",
    ),
    Option(
        "group_window",
        86_400,
        _positive_float,
        "sliding window of groups-per-day and group-joins-per-day, seconds (a day: "
        "their names say per day)",
    ),
    Option(
        "group_joins_per_day",
        200,
        _positive_int,
        "invite codes one user may look up or join with per 24 h, previews and joins "
        "together (error 302 past it)",
    ),
    Option(
        "group_notice_bytes",
        16 << 20,
        _positive_int,
        "store bytes the group notices of one user's group changes may add per "
        "group-notice-window: a notice is stored once, plus a queue key and a reference of "
        "about 40 bytes for each member device (a change in a group of 1,024 members with 5 "
        "devices each is about 210 KB); error 302 past it",
    ),
    Option(
        "group_notice_window",
        3600,
        _positive_float,
        "window of group-notice-bytes, seconds (what was spent drains evenly over it)",
    ),
    Option(
        "group_subject_max",
        100,
        _positive_int,
        "characters a group's subject may have, at most 100 (the protocol's own ceiling): "
        "a create or subject request with a longer one gets error 200, nothing changed",
    ),
    Option(
        "group_description_max",
        512,
        _positive_int,
        "bytes (UTF-8) a group's description may have, at most 512 (the protocol's own "
        "ceiling): a description request with a longer one gets error 200, nothing changed",
    ),
    Option(
        "group_request_expiry",
        7 * 86_400,
        _positive_float,
        "seconds a request to join a group (an invite code with approval on) waits for an "
        "admin; then it is dropped (worker 0, every purge-interval) and the user may ask again",
    ),
    Option(
        "stranger_groups",
        64,
        _non_negative_int,
        "groups one user may be in that someone they do not know (not in their contacts, "
        "not written to lately) added them to and that they have not written to since: "
        "past it such an add fails for that user with error 438 (an invite still works; "
        "a group they write to, or whose adder becomes their contact, stops counting). "
        "0 = no limit",
    ),
    Option(
        "group_member_changes",
        200,
        _non_negative_int,
        "add, remove, promote and demote requests one admin may make in one group per "
        "group-member-changes-window (one request counts once, however many members it "
        "names); error 302 past it, nothing changed. 0 = no limit",
    ),
    Option(
        "group_member_changes_window",
        3600,
        _positive_float,
        "sliding window of group-member-changes, seconds",
    ),
    Option(
        "media_listen",
        "127.0.0.1:7652",
        _listen_or_off,
        "the media service's HTTP listener (HTTPS with tls-cert when TLS is configured), "
        "HOST:PORT or off",
    ),
    Option(
        "media_url",
        None,
        _opt_url,
        "the media service's base http:// or https:// URL as clients reach it (e.g. "
        "https://media.example.com); by default http(s)://media-listen",
        "URL",
    ),
    Option(
        "media_max_bytes", 100 << 20, _positive_int, "largest media upload, bytes (420 past it)"
    ),
    Option(
        "media_ttl",
        30 * 86400,
        _positive_int,
        "seconds a stored media file lives after its last upload; then it is purged",
    ),
    Option(
        "media_partial_ttl",
        86400,
        _positive_int,
        "seconds an unfinished upload is kept for a resume; then its partial file is deleted",
    ),
    Option(
        "media_grant_ttl",
        600,
        _positive_int,
        "seconds an upload grant (its token) stays valid, from when it is issued",
    ),
    Option(
        "media_quota_bytes",
        1 << 30,
        _positive_int,
        "upload bytes granted to one account per day (421 past it)",
    ),
    Option(
        "media_quota_uploads",
        500,
        _positive_int,
        "upload grants to one account per day (421 past it)",
    ),
    Option(
        "media_transfers_per_ip",
        16,
        _positive_int,
        "media requests in progress at once from one source address (429 past it)",
    ),
    Option(
        "media_request_rate",
        50.0,
        _positive_float,
        "media requests a second from one source address on average (429 past it)",
    ),
    Option(
        "media_stall_timeout",
        30.0,
        _positive_float,
        "seconds a media upload or download may make no progress; then it is cut (an "
        "upload keeps what arrived, for a resume)",
    ),
    Option(
        "media_min_upload_rate",
        16 << 10,
        _positive_int,
        "bytes a second a media upload must average over every media-stall-timeout; slower, "
        "it is cut with 408 (what arrived is kept, for a resume)",
    ),
    Option(
        "media_min_download_rate",
        64 << 10,
        _positive_int,
        "bytes a second a media download is given on top of media-stall-timeout: one not "
        "done by then is cut",
    ),
    Option(
        "media_connections",
        1024,
        _positive_int,
        "connections the media service holds at once, TLS handshakes included; past it a new "
        "one takes the place of the longest-idle one (in its handshake, sending its headers "
        "or between requests), or is closed at once when all are in a request "
        "(each may buffer media-max-headers x media-max-header-bytes of headers: 64 MiB in "
        "all by default); capped at half the open-files limit minus files-reserve (each "
        "transfer holds a file too)",
    ),
    Option(
        "media_connections_per_ip",
        32,
        _positive_int,
        "media connections one source address may hold (IPv6 by /64), TLS handshakes "
        "included; past it a new one is closed at once",
    ),
    Option(
        "media_header_timeout",
        10.0,
        _positive_float,
        "seconds a media connection has to send a request's headers, from its connect and "
        "from the end of each answer (an idle keep-alive connection too), and to finish its "
        "TLS handshake; then it is closed",
    ),
    Option(
        "media_max_headers",
        32,
        _positive_int,
        "headers one media request may have (400 past it)",
    ),
    Option(
        "media_max_header_bytes",
        2048,
        _positive_int,
        "bytes of a media request's request line or of one of its headers (400 past it)",
    ),
    Option(
        "media_disk_reserve",
        1 << 30,
        _non_negative_int,
        "bytes the media service leaves free on its file system (the chat store's too, "
        "usually): an upload that would leave less is refused with 507",
    ),
    Option(
        "media_spent_grants",
        100_000,
        _positive_int,
        "upload grants the media service remembers as used (stored, or refused for a wrong "
        "hash) until they expire, about 150 bytes each; past it the oldest is forgotten "
        "(and could upload again until it expires)",
    ),
    Option(
        "media_resume_states",
        10_000,
        _positive_int,
        "unfinished uploads whose running SHA-256 the media service keeps in memory (about "
        "0.5 KB each), so that a resume hashes only its new part; a resume without one "
        "(evicted, or after a restart) reads and hashes the partial file again",
    ),
    Option(
        "media_loop",
        "asyncio",
        _choice("asyncio", "uvloop"),
        "the media process's event loop: asyncio has loop.sendfile (downloads by "
        "sendfile(2)); uvloop does not, and copies through user space",
    ),
    Option("log_level", "info", _choice("debug", "info", "warning", "error"), "log level"),
    Option(
        "log_format",
        "auto",
        _choice("auto", "json", "text"),
        "log lines: json, text, or auto (text on a tty)",
    ),
]
_BY_NAME = {o.name: o for o in OPTIONS}


@dataclass(frozen=True)
class Group:
    title: str  # the heading in --help and in docs/OPERATIONS.md
    description: str
    names: tuple[str, ...]  # its options, in the order shown


# How --help and the docs sort the options: every option is in exactly one
# group (tests/test_config.py checks); a new option goes in the group an
# operator would look in first.
GROUPS: list[Group] = [
    Group(
        "listeners",
        "where the server accepts connections: HOST:PORT, a host name or an IP address, an "
        "IPv6 address in brackets ([::1]:7650, [::]:7650). No two listeners in use (listen, "
        "tls-listen with tls-cert, metrics-listen, media-listen) may take one port of one "
        "address: 0.0.0.0 takes its port on every IPv4 address, [::] on every address",
        ("listen", "tls_listen", "tls_cert", "tls_key", "metrics_listen"),
    ),
    Group(
        "connections and workers",
        "processes, per-worker connection caps, per-connection and worker-to-worker buffers",
        (
            "workers",
            "max_connections",
            "max_connections_per_ip",
            "files_reserve",
            "memory_trim_interval",
            "idle_timeout",
            "max_frame",
            "login_max_frame",
            "write_buffer_high",
            "write_buffer_low",
            "read_frames_per_turn",
            "bus_buffer_high",
            "bus_buffer_low",
        ),
    ),  # fmt: skip
    Group(
        "storage",
        "the LMDB store in data-dir and how durable its commits are",
        ("data_dir", "map_size", "store_reserve", "sync", "store_writemap"),
    ),
    Group(
        "queues and delivery",
        "what waits for offline devices, and how it is delivered",
        (
            "queue_max_count",
            "queue_max_bytes",
            "stranger_queue_count",
            "stranger_queue_bytes",
            "queue_max_age",
            "purge_interval",
            "dedup_window",
            "commit_max_bytes",
            "ack_delay",
            "delivery_window",
            "delivered_receipts",
        ),
    ),  # fmt: skip
    Group(
        "login",
        "logging in with SCRAM-SHA-256, and failed logins",
        (
            "login_timeout",
            "scram_iterations",
            "login_failures",
            "login_failures_per_ip",
            "login_window",
            "device_logins",
            "device_logins_window",
            "login_table_size",
        ),
    ),  # fmt: skip
    Group(
        "push wake-ups",
        "waking offline devices through a webhook, FCM, APNs or Web Push (server/push.py)",
        (
            "push_coalesce",
            "push_queue",
            "push_batch",
            "push_linger",
            "push_concurrency",
            "push_request_timeout",
            "push_retries",
            "push_backoff",
            "push_ttl",
            "push_token_max",
            "push_ca_file",
            "push_webhook_url",
            "push_webhook_auth_file",
            "push_webhook_auth_env",
            "push_fcm_credentials",
            "push_fcm_url",
            "push_apns_key_file",
            "push_apns_key_id",
            "push_apns_team_id",
            "push_apns_topic",
            "push_apns_url",
            "push_vapid_key_file",
            "push_vapid_subject",
            "push_webpush_hosts",
        ),
    ),  # fmt: skip
    Group(
        "registration and SMS",
        "one-time codes and how they are sent",
        (
            "sms_gateway",
            "sms_webhook_url",
            "sms_webhook_auth_file",
            "sms_webhook_auth_env",
            "sms_webhook_timeout",
            "sms_webhook_retries",
            "code_ttl",
            "code_attempts",
            "code_attempts_per_net",
            "verify_failures",
            "verify_window",
            "register_per_phone",
            "register_per_phone_total",
            "register_per_ip",
            "register_per_net",
            "register_window",
            "unauth_rate",
            "unauth_burst",
            "unauth_in_flight",
            "unauth_worker_in_flight",
        ),
    ),  # fmt: skip
    Group(
        "linked devices",
        "companions linked by QR code or link code, and their limits",
        (
            "max_linked_devices",
            "pair_ttl",
            "pair_refreshes",
            "pair_timeout",
            "pair_per_address",
            "pair_per_ip",
            "pair_per_net",
            "link_per_account",
            "companion_expiry",
        ),
    ),  # fmt: skip
    Group(
        "key directory",
        "identity, one-time and fallback keys for end-to-end encryption, and their limits",
        (
            "one_time_keys_max",
            "one_time_keys_low",
            "keys_query_max",
            "devices_query_max",
            "keys_fetch_per_account",
            "keys_fetch_window",
            "key_uploads",
            "keys_per_device",
            "key_changes",
            "key_changes_window",
        ),
    ),  # fmt: skip
    Group(
        "groups",
        "group size, how many groups a user may be in and create, invite look-ups, join "
        "requests, subjects and descriptions, and how fast an admin may change the members",
        (
            "group_max_members",
            "user_groups_max",
            "groups_per_day",
            "group_joins_per_day",
            "group_window",
            "group_notice_bytes",
            "group_notice_window",
            "group_subject_max",
            "group_description_max",
            "group_request_expiry",
            "stranger_groups",
            "group_member_changes",
            "group_member_changes_window",
        ),
    ),
    Group(
        "abuse limits",
        "what one connection or account may do, per second or per window",
        (
            "message_rate",
            "message_burst",
            "messages_per_day",
            "lookup_users_per_token",
            "rate_buckets",
            "typing_rate",
            "typing_burst",
            "new_chats",
            "new_chats_window",
            "discover_numbers",
            "discover_window",
            "discover_batch",
            "presence_subscriptions",
            "contacts_max",
            "blocklist_max",
        ),
    ),  # fmt: skip
    Group(
        "operations",
        "the metrics listener and the control socket of pigeon admin",
        ("metrics_connections", "metrics_timeout", "control_connections", "control_timeout"),
    ),
    Group(
        "media",
        "the HTTP media service: encrypted files uploaded by link, its limits and expiry",
        (
            "media_listen",
            "media_url",
            "media_max_bytes",
            "media_ttl",
            "media_partial_ttl",
            "media_grant_ttl",
            "media_quota_bytes",
            "media_quota_uploads",
            "media_transfers_per_ip",
            "media_request_rate",
            "media_stall_timeout",
            "media_min_upload_rate",
            "media_min_download_rate",
            "media_connections",
            "media_connections_per_ip",
            "media_header_timeout",
            "media_max_headers",
            "media_max_header_bytes",
            "media_disk_reserve",
            "media_spent_grants",
            "media_resume_states",
            "media_loop",
        ),
    ),  # fmt: skip
    Group("logging", "what is logged, and how", ("log_level", "log_format", "client_log_lines")),
]

_SECONDS = ("_timeout", "_window", "_interval", "_age", "_ttl", "_delay", "_expiry")
_BYTES = ("max_frame", "login_max_frame", "map_size", "queue_max_bytes", "write_buffer_high",
          "write_buffer_low", "commit_max_bytes", "bus_buffer_high", "bus_buffer_low",
          "media_max_bytes", "media_quota_bytes", "stranger_queue_bytes",
          "media_disk_reserve", "group_notice_bytes")  # fmt: skip


def _metavar(o: Option) -> str:
    """What --help shows for an option's value: its own, its checker's, a unit."""
    if o.metavar:
        return o.metavar
    shown = getattr(o.check, "metavar", "VALUE")
    if shown == "N" and o.name.endswith(_SECONDS) and "second" in o.help:
        return "SECONDS"
    if shown == "N" and o.name in _BYTES:
        return "BYTES"
    if shown == "N" and o.name == "store_reserve":
        return "PERCENT"
    return shown


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _unknown(key: str) -> str:
    """What to say of an unknown key: the known names closest to it (a typo has one)."""
    typed = _flag(key)
    close = difflib.get_close_matches(typed, [_flag(o.name) for o in OPTIONS], n=3)
    if close:  # only those about as close as the closest: 'listn' is listen, not tls-listen
        score = [difflib.SequenceMatcher(None, typed, c).ratio() for c in close]
        close = [c for c, r in zip(close, score, strict=True) if r >= score[0] - 0.1]
    if close:
        return f"unknown setting {key!r}: did you mean {' or '.join(close)}?"
    return (
        f"unknown setting {key!r} (every setting is listed by pigeon serve --help "
        "and in docs/OPERATIONS.md)"
    )


@dataclass(frozen=True)
class Config:
    values: dict = field(default_factory=dict)

    def __post_init__(self):
        # Each setting is also a plain instance attribute, so ``config.name``
        # is an ordinary lookup: a miss that falls through to __getattr__
        # raises and catches an AttributeError first, a microsecond per read
        # on paths that read settings per connection (accept, login).  A
        # setting never shadows what the class defines (values, properties).
        own = self.__dict__
        for name, value in self.values.items():
            if not hasattr(Config, name):
                own[name] = value

    def __getattr__(self, name):
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def worker_count(self) -> int:
        return self.values["workers"] or min(os.cpu_count() or 1, MAX_WORKERS)

    @property
    def tls_enabled(self) -> bool:
        return self.values["tls_cert"] is not None

    def replace(self, **changes) -> Config:
        return load(overrides=changes, base=self)

    def as_dict(self) -> dict:
        return dict(self.values)


def _normalise(key: str) -> str:
    return key.replace("-", "_")


def load(
    path: str | None = None, overrides: dict | None = None, base: Config | None = None
) -> Config:
    """Defaults (or ``base``), then the TOML file at ``path``, then ``overrides``.

    Raises one ConfigError listing every problem found (``.errors``).
    """
    config, errors = _load(path, overrides, base)
    if errors:
        raise ConfigError(errors)
    return config


def problems(
    path: str | None = None, overrides: dict | None = None, base: Config | None = None
) -> list[str]:
    """Every problem ``load`` would raise, one line each; [] if the settings are good."""
    return _load(path, overrides, base)[1]


def _load(path, overrides, base) -> tuple[Config | None, list[str]]:
    values = dict(base.values) if base else {o.name: o.default for o in OPTIONS}
    layers = []
    if path is not None:
        try:
            with open(path, "rb") as f:
                layers.append((path, tomllib.load(f)))
        except FileNotFoundError:
            return None, [f"{path}: no such file"]
        except OSError as exc:
            return None, [f"{path}: cannot read it: {exc.strerror}"]
        except tomllib.TOMLDecodeError as exc:
            return None, [f"{path}: not valid TOML: {exc}"]
        except UnicodeDecodeError as exc:  # tomllib decodes first, and raises this
            return None, [
                f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                f"{exc.start}): a TOML file must be UTF-8"
            ]
    if overrides:
        layers.append(("command line", {k: v for k, v in overrides.items() if v is not None}))
    errors: list[str] = []
    origin_of: dict[str, str] = {}  # where each value set by a layer came from
    bad: set[str] = set()  # keys whose value was refused: no rule between keys uses them
    for origin, layer in layers:
        for key, raw in layer.items():
            name = _normalise(key)
            opt = _BY_NAME.get(name)
            if opt is None:
                errors.append(f"{origin}: {_unknown(key)}")
                continue
            shown = "--" + _flag(name) if origin == "command line" else _flag(name)
            try:
                values[name] = opt.check(raw)
            except ValueError as exc:
                errors.append(f"{origin}: {shown}: {exc}")
                bad.add(name)
            else:
                origin_of[name] = origin
                bad.discard(name)

    def rule(names: tuple[str, ...], broken: bool, message: str) -> None:
        if broken and not bad.intersection(names):
            where = sorted({origin_of[n] for n in names if n in origin_of})
            errors.append(f"{' and '.join(where)}: {message}" if where else message)

    v = values
    rule(
        ("workers",),
        v["workers"] > MAX_WORKERS,
        f"workers must be at most {MAX_WORKERS} (0: one per core)",
    )
    rule(
        ("map_size",),
        v["map_size"] < MIN_MAP_SIZE,
        f"map-size must be at least {MIN_MAP_SIZE} (1 MiB)",
    )
    rule(
        ("map_size",),
        v["map_size"] > MAX_MAP_SIZE,
        f"map-size must be at most {MAX_MAP_SIZE} (64 TiB)",
    )
    listeners = [
        n
        for n, on in (
            ("listen", True),
            ("tls_listen", bool(v["tls_cert"])),  # unused without a certificate
            ("metrics_listen", v["metrics_listen"] != "off"),
            ("media_listen", v["media_listen"] != "off"),
        )
        if on and n not in bad
    ]
    for i, a in enumerate(listeners):
        for b in listeners[i + 1 :]:
            how = _overlap(v[a], v[b])
            rule(
                (a, b),
                how is not None,
                f"{_flag(a)} {v[a]} and {_flag(b)} {v[b]} "
                + (
                    "are the same address"
                    if how == "same"
                    else "overlap (0.0.0.0 is every IPv4 address, [::] every address)"
                )
                + ": give each listener its own port",
            )
    rule(
        ("scram_iterations",),
        v["scram_iterations"] < MIN_SCRAM_ITERATIONS,
        f"scram-iterations must be at least {MIN_SCRAM_ITERATIONS} (RFC 7677)",
    )
    rule(
        ("max_frame",),
        not MIN_MAX_FRAME <= v["max_frame"] <= MAX_FRAME,
        f"max-frame must be {MIN_MAX_FRAME}-{MAX_FRAME} (a frame's length is 3 bytes)",
    )
    rule(
        ("tls_key", "tls_cert"),
        bool(v["tls_key"] and not v["tls_cert"]),
        "tls-key is set but tls-cert is not: set both, or neither",
    )
    rule(
        ("write_buffer_low", "write_buffer_high"),
        v["write_buffer_low"] > v["write_buffer_high"],
        "write-buffer-low must not be above write-buffer-high",
    )
    rule(
        ("bus_buffer_low", "bus_buffer_high"),
        v["bus_buffer_low"] > v["bus_buffer_high"],
        "bus-buffer-low must not be above bus-buffer-high",
    )
    rule(
        ("store_reserve",),
        v["store_reserve"] > 50,
        "store-reserve must be at most 50 (percent of map-size)",
    )
    rule(
        ("discover_batch",),
        v["discover_batch"] > 1024,
        "discover-batch must be at most 1024 (the children one node may have)",
    )
    rule(
        ("keys_query_max",),
        v["keys_query_max"] > 1024,
        "keys-query-max must be at most 1024 (the children one node may have)",
    )
    rule(
        ("devices_query_max",),
        v["devices_query_max"] > 1024,
        "devices-query-max must be at most 1024 (the children one node may have)",
    )
    rule(
        ("blocklist_max",),
        v["blocklist_max"] > 1024,
        "blocklist-max must be at most 1024 (the blocklist answer is one node, "
        "and a node has at most 1024 children)",
    )
    rule(
        ("user_groups_max",),
        v["user_groups_max"] > 1024,
        "user-groups-max must be at most 1024 (a group list answer is one node, "
        "and a node has at most 1024 children)",
    )
    rule(
        ("group_subject_max",),
        v["group_subject_max"] > 100,
        "group-subject-max must be at most 100 (the protocol's limit on a subject)",
    )
    rule(
        ("group_description_max",),
        v["group_description_max"] > 512,
        "group-description-max must be at most 512 (the protocol's limit on a description)",
    )
    rule(
        ("sms_gateway", "sms_webhook_url"),
        v["sms_gateway"] == "webhook" and not v["sms_webhook_url"],
        "sms-gateway = webhook needs sms-webhook-url",
    )
    rule(
        ("sms_webhook_auth_file", "sms_webhook_auth_env"),
        bool(v["sms_webhook_auth_file"] and v["sms_webhook_auth_env"]),
        "set sms-webhook-auth-file or sms-webhook-auth-env, not both",
    )
    rule(
        ("push_webhook_auth_file", "push_webhook_auth_env"),
        bool(v["push_webhook_auth_file"] and v["push_webhook_auth_env"]),
        "set push-webhook-auth-file or push-webhook-auth-env, not both",
    )
    rule(
        ("push_token_max",),
        v["push_token_max"] > 4096,
        "push-token-max must be at most 4096 (the protocol's limit)",
    )
    return (None if errors else Config(values)), errors


def add_arguments(parser) -> None:
    """Add one flag per option to an argparse parser, in one argument group per GROUPS entry
    (defaults stay None: 'not given'; the help shows the real default)."""
    for g in GROUPS:
        group = parser.add_argument_group(g.title, g.description)
        for name in g.names:
            o = _BY_NAME[name]
            default = "" if o.default is None else f" (default: {_shown(o.default)})"
            group.add_argument(
                "--" + _flag(o.name),
                dest=o.name,
                default=None,
                metavar=_metavar(o),
                help=(o.help + default).replace("%", "%%"),
            )


def _shown(default) -> str:
    if isinstance(default, bool):
        return str(default).lower()  # what a flag or the file takes: true, false
    return str(default)


def fields_doc() -> list[tuple[str, object, str]]:
    """(flag name, default, help) of every option, in OPTIONS order."""
    return [(_flag(o.name), o.default, o.help) for o in OPTIONS]


def grouped_fields_doc() -> list[tuple[Group, list[tuple[str, str, object, str]]]]:
    """Per group of GROUPS: (flag name, metavar, default, help) of its options, in order."""
    return [
        (g, [(_flag(n), _metavar(_BY_NAME[n]), _BY_NAME[n].default, _BY_NAME[n].help)
             for n in g.names])
        for g in GROUPS
    ]  # fmt: skip
