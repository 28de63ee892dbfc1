"""Server configuration: embedded defaults, a TOML file, command-line flags.

Precedence: a flag on the command line beats the file, the file beats the
default; no file is needed to start.  File keys are the flag names without
the leading dashes (``login-timeout = 10``; ``login_timeout`` works too).
Every key, its default and its meaning is in OPTIONS below, which also
builds the ``pigeon serve`` flags and the table in docs/OPERATIONS.md.

Errors say what to fix: ``ConfigError("config.toml: login-timeout: must be
a number > 0, got 'soon'")``.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field


class ConfigError(Exception):
    """A bad setting; the message names the key and what is expected."""


def _listen(v) -> str:
    host, sep, port = str(v).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"must be HOST:PORT (e.g. 127.0.0.1:7650), got {v!r}")
    return str(v)


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
            n = kind(v)
            if kind is int and isinstance(v, float) and v != n:
                raise ValueError
        except (TypeError, ValueError):
            raise ValueError(f"must be {what}, got {v!r}") from None
        if n < minimum or (n == minimum and not inclusive):
            raise ValueError(f"must be {what}, got {v!r}")
        return n

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

    return check


def _listen_or_off(v):
    if str(v).lower() in ("off", ""):
        return "off"
    return _listen(v)


def _bool(v):
    if isinstance(v, bool):
        return v
    if str(v).lower() in ("true", "yes", "on", "1"):
        return True
    if str(v).lower() in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"must be true or false, got {v!r}")


def _opt_str(v):
    return None if v in (None, "") else str(v)


@dataclass(frozen=True)
class Option:
    name: str  # the attribute; the flag is --name-with-dashes
    default: object
    check: object
    help: str


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
        "Prometheus /metrics and /health listener, HOST:PORT, or off",
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
    Option("tls_cert", None, _opt_str, "PEM certificate chain; enables the TLS listener"),
    Option("tls_key", None, _opt_str, "PEM private key for tls-cert (default: the cert file)"),
    Option(
        "data_dir",
        "var",
        str,
        "data directory (LMDB store, SMS outbox); relative to the cwd",
    ),
    Option("workers", 0, _non_negative_int, "worker processes; 0 = one per core"),
    Option("max_frame", 1 << 20, _positive_int, "largest frame payload accepted, bytes"),
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
        "connections one worker accepts; capped at the open-files limit minus files-reserve",
    ),
    Option(
        "files_reserve",
        64,
        _positive_int,
        "file descriptors a worker keeps for its own use (store, sockets between workers); "
        "connections past open-files-limit minus this are refused with error 502",
    ),
    Option("code_ttl", 300, _positive_int, "seconds a one-time registration code stays valid"),
    Option("code_attempts", 5, _positive_int, "wrong codes allowed before a code is void"),
    Option(
        "register_per_phone",
        3,
        _positive_int,
        "code requests per phone number per register-window",
    ),
    Option(
        "register_per_ip",
        20,
        _positive_int,
        "code requests per source address per register-window",
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
        "login_table_size",
        100_000,
        _positive_int,
        "entries in each of a worker's in-memory tables of failed logins (source addresses "
        "and (device, address) pairs) and of client log lines (source addresses); never in "
        "the store, the least recent are forgotten first",
    ),
    Option("scram_iterations", 4096, _positive_int, "PBKDF2 iterations for new device keys"),
    Option(
        "sms_gateway",
        "log",
        _choice("log", "webhook"),
        "how codes are sent: log (outbox file in data-dir) or webhook",
    ),
    Option(
        "sms_webhook_url",
        None,
        _opt_str,
        "URL the webhook gateway POSTs {phone, code, method} JSON to",
    ),
    Option(
        "sms_webhook_auth_file",
        None,
        _opt_str,
        "file (mode 0600 or 0400) holding the value of an Authorization header sent with "
        "each webhook POST, e.g. 'Bearer TOKEN'; read at start and on reload",
    ),
    Option(
        "sms_webhook_auth_env",
        None,
        _opt_str,
        "name of an environment variable holding that Authorization value instead "
        "(the name, not the value, is the setting)",
    ),
    Option("sms_webhook_timeout", 5.0, _positive_float, "seconds per webhook attempt"),
    Option("sms_webhook_retries", 3, _non_negative_int, "webhook retries after the first attempt"),
    Option(
        "map_size",
        8 << 30,
        _positive_int,
        "LMDB map size, bytes (the file is sparse; this is the ceiling)",
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
        "delivered_receipts",
        True,
        _bool,
        "send senders a delivered receipt (two ticks); false only for benchmarks",
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
        "messages, receipts and requests one connection may send per second, on average "
        "(token bucket); past it error 405. 0 = no limit",
    ),
    Option("message_burst", 500, _positive_int, "how many of those a connection may send at once"),
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
        "have it as a contact; past it error 404. 0 = no limit",
    ),
    Option("new_chats_window", 86_400, _positive_float, "sliding window for new-chats, seconds"),
    Option(
        "discover_numbers",
        2000,
        _non_negative_int,
        "phone numbers an account may look up per discover-window (numbers already in its "
        "contact set are free); past it error 302",
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
    Option("blocklist_max", 10_000, _positive_int, "users one account may block; past it 406"),
    Option(
        "client_log_lines",
        10,
        _positive_int,
        "log lines about client misbehaviour (failed logins, client-reported errors) per "
        "source address per minute, per worker; the rest are counted in the metrics",
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
class Config:
    values: dict = field(default_factory=dict)

    def __getattr__(self, name):
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def worker_count(self) -> int:
        return self.values["workers"] or (os.cpu_count() or 1)

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
    """Defaults (or ``base``), then the TOML file at ``path``, then ``overrides``."""
    values = dict(base.values) if base else {o.name: o.default for o in OPTIONS}
    layers = []
    if path is not None:
        try:
            with open(path, "rb") as f:
                layers.append((path, tomllib.load(f)))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    if overrides:
        layers.append(("command line", {k: v for k, v in overrides.items() if v is not None}))
    for origin, layer in layers:
        for key, raw in layer.items():
            name = _normalise(key)
            opt = _BY_NAME.get(name)
            if opt is None:
                known = ", ".join(o.name.replace("_", "-") for o in OPTIONS)
                raise ConfigError(f"{origin}: unknown setting {key!r} (known: {known})")
            try:
                values[name] = opt.check(raw)
            except ValueError as exc:
                raise ConfigError(f"{origin}: {name.replace('_', '-')}: {exc}") from None
    if values["tls_key"] and not values["tls_cert"]:
        raise ConfigError("tls-key is set but tls-cert is not: set both, or neither")
    if values["write_buffer_low"] > values["write_buffer_high"]:
        raise ConfigError("write-buffer-low must not be above write-buffer-high")
    if values["store_reserve"] > 50:
        raise ConfigError("store-reserve must be at most 50 (percent of map-size)")
    if values["discover_batch"] > 1024:
        raise ConfigError("discover-batch must be at most 1024 (the children one node may have)")
    if values["sms_gateway"] == "webhook" and not values["sms_webhook_url"]:
        raise ConfigError("sms-gateway = webhook needs sms-webhook-url")
    if values["sms_webhook_auth_file"] and values["sms_webhook_auth_env"]:
        raise ConfigError("set sms-webhook-auth-file or sms-webhook-auth-env, not both")
    return Config(values)


def add_arguments(parser) -> None:
    """Add one flag per option to an argparse parser (defaults stay None: 'not given')."""
    for o in OPTIONS:
        flag = "--" + o.name.replace("_", "-")
        default = "" if o.default is None else f" (default: {o.default})"
        parser.add_argument(
            flag, dest=o.name, default=None, metavar=o.name.upper(), help=o.help + default
        )


def fields_doc() -> list[tuple[str, object, str]]:
    return [(o.name.replace("_", "-"), o.default, o.help) for o in OPTIONS]
