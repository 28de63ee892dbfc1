"""``pigeon admin`` actions for operators: check-config, status, stats, user, device, backup,
restore.

Everything here reads and writes the LMDB store directly (it is
multi-process safe, so these work with the server up or down); ``status``
and ``stats`` read the running server's metrics listener (``/status``, a
JSON document, and ``/metrics``), and ``user disable`` and ``device revoke``
then ask the running server, through its control socket
(``DATA_DIR/control.sock``, mode 0600, so only the server's user can), to
close the affected sessions at once.

Where the server is: ``--data-dir`` and ``--metrics`` when given, else the
server's own TOML file named with ``--config`` (its ``data-dir`` and
``metrics-listen``, read with server/config.py's ``load``), else the
defaults (``var``, 127.0.0.1:7659): ``resolve_server_options`` fills them
in before a command runs.  Human tables by default, ``--json`` (orjson)
for scripts; mistakes raise UsageError (exit 2), failures Failure (exit 1),
printed by tools/cli.py's ``main`` as ``pigeon admin ACTION: ...`` (see
tools/errors.py).  What these write (backups, restored stores) is private:
0700 directories and 0600 files, whatever the umask (``pigeon admin`` runs
with umask 0077).
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time

import orjson

from pigeon.tools.errors import Failure, UsageError

DEFAULT_METRICS = "127.0.0.1:7659"
#: The longest ``user disable --reason`` kept in the store.
MAX_REASON = 200


def _out_json(obj) -> None:
    sys.stdout.buffer.write(orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS) + b"\n")


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 device``, ``2 devices``, ``1 queued entry`` (``many`` for irregular plurals)."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


def size_text(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def age_text(seconds) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def _when(ms) -> str:
    return "-" if ms is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


# -- where the server is: flags, else --config FILE, else the defaults -----------------


def server_options(p, data_dir: bool = True, metrics: bool = False) -> None:
    """Add ``--config`` and the flags it stands in for to an admin command's parser."""
    what = " and ".join(
        n for n, on in (("data-dir", data_dir), ("metrics-listen", metrics)) if on
    )  # fmt: skip
    p.add_argument("--config", metavar="FILE",
                   help=f"the server's TOML config file: its {what} are used "
                   "(a flag given beside it wins)")  # fmt: skip
    if data_dir:
        p.add_argument("--data-dir", metavar="DIR", default=None,
                       help="the server's data directory (default: data-dir from --config, "
                       "else var)")  # fmt: skip
    if metrics:
        p.add_argument("--metrics", metavar="HOST:PORT", default=None,
                       help="the server's metrics-listen (default: from --config, else "
                       f"{DEFAULT_METRICS})")  # fmt: skip


def _connect_address(hostport: str) -> str:
    """Where to connect for a listen address: a wildcard bind is reached on loopback."""
    host, _, port = hostport.rpartition(":")
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host in ("[::]", "::"):
        host = "[::1]"
    return f"{host}:{port}"


def _check_hostport(v: str) -> str:
    from pigeon.server.config import split_hostport

    try:
        split_hostport(v)  # what metrics-listen takes: '[::1' made urllib raise ValueError
    except ValueError as exc:
        why = str(exc)
        raise UsageError(
            f"--metrics {why}" if why.startswith("must") else f"--metrics: {why}"
        ) from None
    return v


def resolve_server_options(args) -> None:
    """Fill in ``args.data_dir`` / ``args.metrics`` left unset from ``--config`` or defaults.

    The file is read whenever it is named (a bad one is a usage error even
    if every flag is given: the operator meant it).  ``args.data_dir_from``
    says where the data directory came from, for error messages.
    """
    if not hasattr(args, "config"):
        return
    from pigeon.server.config import ConfigError, load

    try:
        config = load(args.config)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    where = f"--config {args.config}" if args.config else "the default"
    # open the store as the server does: with writemap LMDB also sizes the file to the map
    args.store_writemap, args.map_size = config.store_writemap, config.map_size
    if hasattr(args, "data_dir"):
        if args.data_dir is None:
            args.data_dir = config.data_dir
            args.data_dir_from = f"data-dir from {where}"
        else:
            args.data_dir_from = "--data-dir"
    if hasattr(args, "metrics"):
        if args.metrics is not None:
            args.metrics = _check_hostport(args.metrics)
        elif config.metrics_listen == "off":
            raise UsageError(
                f"metrics-listen is off in {args.config}: this command reads the server's "
                "metrics listener; turn it on there, or give --metrics HOST:PORT"
            )
        else:
            args.metrics = _connect_address(config.metrics_listen)


def open_store(args):
    from pigeon.server.store import Store, StoreError

    path = os.path.join(args.data_dir, "store")
    if not os.path.exists(os.path.join(path, "data.mdb")):
        origin = getattr(args, "data_dir_from", "--data-dir")
        raise Failure(f"no store in {path} (data directory {args.data_dir!r}, {origin}; "
                      "give the server's with --data-dir or --config)")  # fmt: skip
    try:
        return Store(path, create=False, map_size=getattr(args, "map_size", 8 << 30),
                     writemap=getattr(args, "store_writemap", False))  # fmt: skip
    except StoreError as exc:
        raise Failure(str(exc)) from None


# -- check-config ------------------------------------------------------------------


def check_config(args) -> int:
    from pigeon.server.config import ConfigError, load, redact_url

    try:
        config = load(args.file)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    if config.tls_enabled:  # the files it names, as pigeon serve loads them
        from pigeon.server.listeners import tls_context

        try:
            tls_context(config)
        except ValueError as exc:
            raise UsageError(f"{args.file}: {exc}") from None
    values = {k.replace("_", "-"): redact_url(v) for k, v in config.as_dict().items()}
    if args.json:
        _out_json(values)
    else:
        print(f"# {args.file}: valid; the effective settings (file over defaults)")
        for k, v in values.items():
            print(f"{k} = {orjson.dumps(v).decode() if v is not None else '(unset)'}")
    return 0


# -- users and devices ----------------------------------------------------------------


def _devices(store, phone: str) -> list[dict] | None:
    from pigeon.server.queues import Queues

    acct = store.account(phone)
    if acct is None:
        return None
    q = Queues(store)
    stats = {d["device"]: d for d in q.stats(top=1 << 30)["top"]}
    out = []
    for n in acct["devices"]:
        address = f"{phone}:{n}"
        dev = store.device(address) or {}
        with store.read() as txn:
            session = store._get(txn, "sessions", address)
        queued = stats.get(address, {})
        out.append(
            {
                "device": address,
                "primary": n == min(acct["devices"]),
                "created_ms": dev.get("created"),
                "online": session is not None,
                "worker": session["worker"] if session else None,
                "queued": queued.get("count", 0),
                "queued_bytes": queued.get("bytes", 0),
                "oldest_s": queued.get("oldest_s"),
            }
        )
    return out


def _phone_arg(phone: str) -> str:
    from pigeon.core.node import valid_phone

    if not valid_phone(phone):
        raise UsageError(f"{phone!r} is not a phone number (8-15 digits, no '+')")
    return phone


def user_show(args) -> int:
    phone = _phone_arg(args.phone)
    store = open_store(args)
    try:
        acct = store.account(phone)
        devices = _devices(store, phone)
    finally:
        store.close()
    if acct is None:
        raise Failure(f"no account {phone}")
    disabled = bool(acct.get("disabled"))
    info = {
        "phone": phone,
        "created_ms": acct.get("created"),
        "disabled": disabled,
        # when and why, as far as the store recorded them (accounts disabled
        # before pigeon kept them have neither: null)
        "disabled_ms": acct.get("disabled_at") if disabled else None,
        "disabled_reason": acct.get("disabled_reason") if disabled else None,
        "devices": devices,
    }
    if args.json:
        _out_json(info)
        return 0
    print(f"{phone}: registered {_when(acct.get('created'))}, {plural(len(devices), 'device')}")
    if disabled:
        since = info["disabled_ms"]
        why = info["disabled_reason"]
        print("DISABLED" + (f" since {_when(since)}" if since is not None else "")
              + (f": {why}" if why else "")
              + f" (its devices cannot log in; pigeon admin user enable {phone} undoes it)")  # fmt: skip
    _print_devices(devices)
    return 0


def device_list(args) -> int:
    phone = _phone_arg(args.phone)
    store = open_store(args)
    try:
        devices = _devices(store, phone)
    finally:
        store.close()
    if devices is None:
        raise Failure(f"no account {phone}")
    if args.json:
        _out_json(devices)
    else:
        _print_devices(devices)
    return 0


def _print_devices(devices: list[dict]) -> None:
    if not devices:
        print("(no devices: every device logged out)")
        return
    print(f"{'device':<20} {'role':<8} {'created':<20} {'online':<10} {'queued':>7}")
    for d in devices:
        online = f"worker {d['worker']}" if d["online"] else "no"
        role = "primary" if d["primary"] else "linked"
        print(f"{d['device']:<20} {role:<8} {_when(d['created_ms']):<20} {online:<10} "
              f"{d['queued']:>7}")  # fmt: skip


# -- actions on live sessions (through the server's control socket) ------------------------


def _close_sessions(data_dir: str, device: str, text: str) -> str:
    """Ask the running server to close ``device``'s sessions (error 304); says what happened."""
    from pigeon.server import control

    req = {"op": "kick", "device": device, "code": 304, "text": text}
    try:
        reply = control.request(data_dir, req)
    except (FileNotFoundError, ConnectionRefusedError):
        return "the server is not running: no live session to close"
    except OSError as exc:
        path = control.socket_path(data_dir)
        return f"could not reach the server at {path}: {exc.strerror or exc}"
    if not reply.get("ok"):
        return f"the server refused: {reply.get('error')}"
    return f"live sessions closed ({plural(reply['workers'], 'worker')} told)"


def user_disable(args) -> int:
    phone = _phone_arg(args.phone)
    reason = getattr(args, "reason", None)
    if reason is not None:
        reason = " ".join(reason.split())  # one line, whatever was pasted
        if not reason or len(reason) > MAX_REASON or not reason.isprintable():
            raise UsageError(f"--reason must be printable text of 1 to {MAX_REASON} characters")
    store = open_store(args)
    try:
        ok = store.set_disabled(phone, not args.enable, reason)
        acct = store.account(phone) if ok else None
    finally:
        store.close()
    if not ok:
        raise Failure(f"no account {phone}")
    if args.enable:
        if args.json:
            _out_json({"phone": phone, "disabled": False})
        else:
            print(f"enabled {phone}: its devices may log in again")
        return 0
    notes = [
        _close_sessions(args.data_dir, f"{phone}:{n}", "this account was disabled by the operator")
        for n in acct["devices"]
    ]
    if args.json:
        _out_json({"phone": phone, "disabled": True, "disabled_ms": acct.get("disabled_at"),
                   "disabled_reason": acct.get("disabled_reason"), "sessions": notes})  # fmt: skip
    else:
        print(f"disabled {phone}: its devices cannot log in; " + ("; ".join(notes) or "no devices"))
    return 0


def device_revoke(args) -> int:
    from pigeon.core.node import address_kind

    if address_kind(args.device) != "device":
        raise UsageError(f"{args.device!r} is not a device address (PHONE:N, e.g. 491701234567:0)")
    store = open_store(args)
    try:
        removed = store.remove_device(args.device)
    finally:
        store.close()
    if not removed:
        raise Failure(f"no device {args.device}")
    note = _close_sessions(args.data_dir, args.device, "this device was revoked by the operator")
    if args.json:
        _out_json({"device": args.device, "revoked": True, "sessions": note})
    else:
        print(f"revoked {args.device} (its keys and queue are gone); {note}")
    return 0


# -- backup and restore ------------------------------------------------------------------


def backup(args) -> int:
    """A consistent copy of the live store (LMDB copies from one read transaction)."""
    dest = os.path.abspath(args.dest)
    if os.path.exists(dest) and os.listdir(dest):
        raise UsageError(f"{dest} is not empty: give a new or empty directory")
    store = open_store(args)
    try:
        # The copy holds what the store holds (payloads, SCRAM keys): a 0700
        # directory and a 0600 file, whatever the umask (LMDB creates it 0666).
        os.makedirs(dest, mode=0o700, exist_ok=True)
        os.chmod(dest, 0o700)
        started = time.monotonic()
        store.env.copy(dest, compact=True)
        os.chmod(os.path.join(dest, "data.mdb"), 0o600)
    except OSError as exc:
        raise Failure(f"cannot write the backup to {dest}: {exc.strerror}") from None
    finally:
        store.close()
    size = os.path.getsize(os.path.join(dest, "data.mdb"))
    print(f"backed up {os.path.join(args.data_dir, 'store')} to {dest} "
          f"({size / 1048576:.1f} MiB, {time.monotonic() - started:.2f} s)")  # fmt: skip
    return 0


def restore(args) -> int:
    """Put a backup in place as the data dir's store (the server must be stopped).

    The backup is only read (``copy_format``: it must be a pigeon store this
    code reads); a server that answers on the data dir's control socket is
    running, and its store is not replaced under it."""
    from pigeon.server.control import server_answers, socket_path
    from pigeon.server.store import StoreError, copy_format

    src = os.path.abspath(args.backup)
    if not os.path.exists(os.path.join(src, "data.mdb")):
        raise UsageError(f"{src} holds no backup (no data.mdb): give a 'pigeon admin backup' dir")
    try:  # it must be a store this pigeon reads
        copy_format(src)
    except StoreError as exc:
        raise UsageError(str(exc)) from None
    if server_answers(args.data_dir):
        # not a mistake on the command line (the same command works once the
        # server is down): a refusal to do the work, exit 1 like the others
        raise Failure(
            f"the server on {args.data_dir} is running (its control socket "
            f"{socket_path(args.data_dir)} answers): stop it first, then restore"
        )
    target = os.path.join(args.data_dir, "store")
    aside = None
    if os.path.exists(os.path.join(target, "data.mdb")):
        if not args.force:
            raise UsageError(
                f"{target} already holds a store: stop the server, then add --force "
                "(the current store is kept beside it, renamed)"
            )
        aside = f"{target}.before-restore-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        if aside:
            os.rename(target, aside)
        os.makedirs(target, mode=0o700, exist_ok=True)
        os.chmod(target, 0o700)
        shutil.copy2(os.path.join(src, "data.mdb"), os.path.join(target, "data.mdb"))
        os.chmod(os.path.join(target, "data.mdb"), 0o600)  # copy2 copied the backup's mode
        owner = os.stat(args.data_dir)
        if hasattr(os, "geteuid") and os.geteuid() == 0 and owner.st_uid != 0:
            # sudo pigeon admin restore into the service user's data dir: what
            # it made is that user's, or the server could not open its store
            for path in (target, os.path.join(target, "data.mdb")):
                os.chown(path, owner.st_uid, owner.st_gid)
    except OSError as exc:
        raise Failure(f"cannot restore into {target}: {exc.strerror or exc}") from None
    print(
        f"restored {src} into {target}" + (f"; the previous store is in {aside}" if aside else "")
    )
    return 0


# -- stats from the running server ------------------------------------------------------

STATS = (
    ("pigeon_queue_entries", "queued entries"),
    ("pigeon_queue_oldest_seconds", "oldest queued, s"),
    ("pigeon_queue_devices", "devices with a queue"),
    ("pigeon_connections", "connections"),
    ("pigeon_logins_total", "logins"),
    ("pigeon_messages_in_total", "messages stored"),
    ("pigeon_entries_out_total", "entries pushed"),
    ("pigeon_errors_total", "errors sent"),
    ("pigeon_store_used_bytes", "store used, bytes"),
    ("pigeon_store_map_bytes", "store map, bytes"),
)


def _http_get(url: str, timeout: float) -> bytes:
    """The body of GET ``url``; OSError (urllib's errors are OSErrors) with a short reason."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read()
    except urllib.error.HTTPError as exc:
        raise OSError(f"HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        raise OSError(getattr(reason, "strerror", None) or str(reason)) from None
    except OSError as exc:  # a timeout or reset while reading
        raise OSError(exc.strerror or str(exc) or type(exc).__name__) from None


def _unreachable(url: str, why: str) -> str:
    return f"cannot read {url}: {why} (is the server running, with metrics-listen on?)"


def stats(args) -> int:
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://{args.metrics}/metrics"
    try:
        text = _http_get(url, timeout=10).decode()
    except OSError as exc:
        raise Failure(_unreachable(url, str(exc))) from None
    totals: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.endswith(("_bucket", "_created")):
                continue
            totals[s.name] = totals.get(s.name, 0) + s.value
    if args.json:
        _out_json(totals)
        return 0
    for name, label in STATS:
        if name in totals:
            print(f"{label:>24}: {totals[name]:,.0f}")
    return 0


# -- status: the running server's /status document ------------------------------------

#: Seconds ``--wait`` waits when given without a number.
WAIT_DEFAULT = 30.0
#: Seconds between two looks while waiting.
WAIT_POLL = 0.25


def _wait_seconds(v: str) -> float:
    import argparse

    try:
        n = float(v)
    except ValueError:
        n = math.nan
    if not math.isfinite(n) or n < 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {v!r}")
    return n


def _fetch_status(url: str, timeout: float) -> tuple[dict | None, str]:
    """(the /status document, "") or (None, why it could not be had)."""
    try:
        body = _http_get(url, timeout)
    except OSError as exc:
        return None, str(exc)
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    if not isinstance(doc, dict) or doc.get("server") != "pigeon":
        return None, "the answer is not a pigeon status document (another program on that port?)"
    return doc, ""


def _not_ready(doc: dict) -> str:
    workers = doc.get("workers") or []
    ready = sum(w.get("state") == "ready" for w in workers)
    others = ", ".join(
        f"worker {w['index']} {w['state']}" for w in workers if w.get("state") != "ready"
    )
    return (f"state {doc.get('state')}, {ready} of {doc.get('workers_configured')} workers ready"
            + (f" ({others})" if others else ""))  # fmt: skip


def status(args) -> int:
    """Is the server up and ready; with ``--wait``, wait (bounded) until it is."""
    url = f"http://{args.metrics}/status"
    wait = args.wait
    deadline = time.monotonic() + (wait or 0.0)
    while True:
        left = deadline - time.monotonic()
        # each look is bounded too, so the whole wait ends near the deadline
        timeout = 10.0 if wait is None else max(0.1, min(5.0, left))
        doc, why = _fetch_status(url, timeout)
        if (doc is not None and doc.get("ready")) or wait is None:
            break
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(WAIT_POLL, left))
    after = f"not ready after {wait:g} s: " if wait is not None else ""
    if doc is None:
        raise Failure(after + _unreachable(url, why))
    if args.json:
        _out_json(doc)
    else:
        _print_status(doc, args.metrics)
    if not doc.get("ready"):
        raise Failure((after or "not ready: ") + _not_ready(doc))
    return 0


def _print_status(doc: dict, metrics: str) -> None:
    print(f"pigeon {doc['version']} at {metrics}: {doc['state']} (up {age_text(doc['uptime_s'])}, "
          f"supervisor pid {doc['pid']}, codec {doc['codec']}, protocol {doc['protocol']}, "
          f"dictionary {doc['dictionary']})")  # fmt: skip
    workers = doc["workers"]
    reload = "; reloading" if doc.get("reloading") else ""
    print(f"workers: {doc['workers_ready']} of {doc['workers_configured']} ready, "
          f"generation {doc['generation']}{reload}")  # fmt: skip
    print(f"  {'worker':<7} {'pid':<8} {'state':<11} {'up':<9} {'connections':<12} restarts")
    for w in workers:
        conns = "-" if w["connections"] is None else w["connections"]
        print(f"  {w['index']:<7} {w['pid'] or '-':<8} {w['state']:<11} "
              f"{age_text(w['uptime_s']):<9} {conns:<12} {w['restarts']}")  # fmt: skip
    print(f"connections: {doc['connections']}")
    q, st = doc.get("queues"), doc.get("store")
    if q is not None:
        print(f"queues: {plural(q['entries'], 'queued entry', 'queued entries')} "
              f"({size_text(q['bytes'])}) for {plural(q['devices'], 'device')}; "
              f"oldest {age_text(q['oldest_s'])}; store {size_text(st['used_bytes'])} of "
              f"{size_text(st['map_bytes'])} map")  # fmt: skip
    else:
        print("queues: (the store could not be read)")
    ls = doc["listeners"]
    print(f"listeners: chat {ls['chat']}; TLS {ls['tls'] or 'off'}; metrics {ls['metrics']}; "
          f"control {ls['control']}; media {ls.get('media', 'off')}")  # fmt: skip
    for m in doc.get("media") or ():
        print(f"media process: pid {m['pid']}, {m['state']}, generation {m['generation']}, "
              f"restarts {m['restarts']}")  # fmt: skip


# -- the parsers --------------------------------------------------------------------------


def add_parsers(asub) -> None:
    c = asub.add_parser(
        "check-config", help="validate a TOML config and print the effective settings"
    )
    c.add_argument("file", help="the TOML file")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=check_config)

    st = asub.add_parser(
        "status",
        help="is the server up and ready: version, workers, connections, queues, listeners",
        description="Read the running server's /status (on its metrics listener) and print "
        "it. Exits 0 when the server is ready (every worker listens: what /health answers "
        "200 for), 1 when it is not or cannot be reached. --wait: look again until it is "
        "ready, for at most SECONDS, then exit 1 with the reason.",
    )
    server_options(st, data_dir=False, metrics=True)
    st.add_argument("--wait", nargs="?", const=WAIT_DEFAULT, type=_wait_seconds,
                    metavar="SECONDS", help="wait until the server is ready, at most SECONDS "
                    f"(default {WAIT_DEFAULT:g} when no number is given)")  # fmt: skip
    st.add_argument("--json", action="store_true", help="the /status document as it came")
    st.set_defaults(func=status)

    s = asub.add_parser("stats", help="the running server's main figures (from its metrics)")
    server_options(s, data_dir=False, metrics=True)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=stats)

    u = asub.add_parser("user", help="accounts: show, disable, enable PHONE")
    usub = u.add_subparsers(dest="user_command", metavar="ACTION", required=True)
    us = usub.add_parser("show", help="an account (disabled or not) and its devices, online "
                         "state and queues")  # fmt: skip
    us.add_argument("phone")
    server_options(us)
    us.add_argument("--json", action="store_true")
    us.set_defaults(func=user_show)
    for name, enable, text in (
        ("disable", False, "refuse the account's logins and close its live sessions"),
        ("enable", True, "let a disabled account log in again"),
    ):
        ud = usub.add_parser(name, help=text)
        ud.add_argument("phone")
        server_options(ud)
        if not enable:
            ud.add_argument("--reason", metavar="TEXT",
                            help="why, kept with the account for 'user show' (at most "
                            f"{MAX_REASON} characters; not sent to the user)")  # fmt: skip
        ud.add_argument("--json", action="store_true")
        ud.set_defaults(func=user_disable, enable=enable)

    d = asub.add_parser("device", help="devices: list PHONE, revoke DEVICE")
    dsub = d.add_subparsers(dest="device_command", metavar="ACTION", required=True)
    dl = dsub.add_parser("list", help="the devices of an account")
    dl.add_argument("phone")
    server_options(dl)
    dl.add_argument("--json", action="store_true")
    dl.set_defaults(func=device_list)
    dr = dsub.add_parser("revoke", help="remove a device (keys, queue) and close its live session")
    dr.add_argument("device", help="PHONE:N")
    server_options(dr)
    dr.add_argument("--json", action="store_true")
    dr.set_defaults(func=device_revoke)

    b = asub.add_parser("backup", help="a consistent hot copy of the store, server running or not")
    b.add_argument("dest", help="a new or empty directory")
    server_options(b)
    b.set_defaults(func=backup)

    r = asub.add_parser("restore", help="put a backup in place (stop the server first)")
    r.add_argument("backup", help="a directory written by 'pigeon admin backup'")
    server_options(r)
    r.add_argument("--force", action="store_true",
                   help="replace an existing store (it is kept beside, renamed)")  # fmt: skip
    r.set_defaults(func=restore)
