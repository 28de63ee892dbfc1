"""``pigeon admin`` actions for operators: check-config, stats, user, device, backup, restore.

Everything here reads and writes the LMDB store directly (it is
multi-process safe, so these work with the server up or down); ``stats``
reads the running server's metrics listener, and ``user disable`` and
``device revoke`` then ask the running server, through its control socket
(``DATA_DIR/control.sock``, mode 0600, so only the server's user can), to
close the affected sessions at once.  Human tables by default, ``--json`` (orjson) for
scripts; mistakes exit 2 with what to fix, failures exit 1.  What these write
(backups, restored stores) is private: 0700 directories and 0600 files,
whatever the umask (``pigeon admin`` runs with umask 0077).
"""

from __future__ import annotations

import os
import shutil
import sys
import time

import orjson


class AdminError(Exception):
    """A usage mistake, printed as 'pigeon: ...' (exit 2)."""


def _out_json(obj) -> None:
    sys.stdout.buffer.write(orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS) + b"\n")


def _open_store(data_dir: str):
    from pigeon.server.store import Store, StoreError

    try:
        return Store(os.path.join(data_dir, "store"), create=False)
    except StoreError as exc:
        raise AdminError(str(exc)) from None


def _when(ms) -> str:
    return "-" if ms is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


# -- check-config ------------------------------------------------------------------


def check_config(args) -> int:
    from pigeon.server.config import ConfigError, load

    try:
        config = load(args.file)
    except ConfigError as exc:
        raise AdminError(str(exc)) from None
    values = {k.replace("_", "-"): v for k, v in config.as_dict().items()}
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


def user_show(args) -> int:
    from pigeon.core.node import valid_phone

    if not valid_phone(args.phone):
        raise AdminError(f"{args.phone!r} is not a phone number (8-15 digits, no '+')")
    store = _open_store(args.data_dir)
    try:
        acct = store.account(args.phone)
        devices = _devices(store, args.phone)
    finally:
        store.close()
    if acct is None:
        print(f"pigeon admin: no account {args.phone}", file=sys.stderr)
        return 1
    info = {"phone": args.phone, "created_ms": acct.get("created"), "devices": devices}
    if args.json:
        _out_json(info)
        return 0
    print(f"{args.phone}: registered {_when(acct.get('created'))}, {len(devices)} device(s)")
    _print_devices(devices)
    return 0


def device_list(args) -> int:
    from pigeon.core.node import valid_phone

    if not valid_phone(args.phone):
        raise AdminError(f"{args.phone!r} is not a phone number (8-15 digits, no '+')")
    store = _open_store(args.data_dir)
    try:
        devices = _devices(store, args.phone)
    finally:
        store.close()
    if devices is None:
        print(f"pigeon admin: no account {args.phone}", file=sys.stderr)
        return 1
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
    return f"live sessions closed ({reply['workers']} workers told)"


def _phone_arg(phone: str) -> str:
    from pigeon.core.node import valid_phone

    if not valid_phone(phone):
        raise AdminError(f"{phone!r} is not a phone number (8-15 digits, no '+')")
    return phone


def user_disable(args) -> int:
    phone = _phone_arg(args.phone)
    store = _open_store(args.data_dir)
    try:
        ok = store.set_disabled(phone, not args.enable)
        acct = store.account(phone) if ok else None
    finally:
        store.close()
    if not ok:
        print(f"pigeon admin: no account {phone}", file=sys.stderr)
        return 1
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
        _out_json({"phone": phone, "disabled": True, "sessions": notes})
    else:
        print(f"disabled {phone}: its devices cannot log in; " + ("; ".join(notes) or "no devices"))
    return 0


def device_revoke(args) -> int:
    from pigeon.core.node import address_kind

    if address_kind(args.device) != "device":
        raise AdminError(f"{args.device!r} is not a device address (PHONE:N, e.g. 491701234567:0)")
    store = _open_store(args.data_dir)
    try:
        removed = store.remove_device(args.device)
    finally:
        store.close()
    if not removed:
        print(f"pigeon admin: no device {args.device}", file=sys.stderr)
        return 1
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
        raise AdminError(f"{dest} is not empty: give a new or empty directory")
    store = _open_store(args.data_dir)
    try:
        # The copy holds what the store holds (payloads, SCRAM keys): a 0700
        # directory and a 0600 file, whatever the umask (LMDB creates it 0666).
        os.makedirs(dest, mode=0o700, exist_ok=True)
        os.chmod(dest, 0o700)
        started = time.monotonic()
        store.env.copy(dest, compact=True)
        os.chmod(os.path.join(dest, "data.mdb"), 0o600)
    except OSError as exc:
        raise AdminError(f"cannot write the backup to {dest}: {exc.strerror}") from None
    finally:
        store.close()
    size = os.path.getsize(os.path.join(dest, "data.mdb"))
    print(f"backed up {os.path.join(args.data_dir, 'store')} to {dest} "
          f"({size / 1048576:.1f} MiB, {time.monotonic() - started:.2f} s)")  # fmt: skip
    return 0


def restore(args) -> int:
    """Put a backup in place as the data dir's store (the server must be stopped)."""
    from pigeon.server.store import Store, StoreError

    src = os.path.abspath(args.backup)
    if not os.path.exists(os.path.join(src, "data.mdb")):
        raise AdminError(f"{src} holds no backup (no data.mdb): give a 'pigeon admin backup' dir")
    try:  # it must be a store this pigeon reads
        Store(src, create=False).close()
    except StoreError as exc:
        raise AdminError(f"{src}: {exc}") from None
    target = os.path.join(args.data_dir, "store")
    aside = None
    if os.path.exists(os.path.join(target, "data.mdb")):
        if not args.force:
            raise AdminError(
                f"{target} already holds a store: stop the server, then add --force "
                "(the current store is kept beside it, renamed)"
            )
        aside = f"{target}.before-restore-{time.strftime('%Y%m%d-%H%M%S')}"
        os.rename(target, aside)
    os.makedirs(target, mode=0o700, exist_ok=True)
    os.chmod(target, 0o700)
    shutil.copy2(os.path.join(src, "data.mdb"), os.path.join(target, "data.mdb"))
    os.chmod(os.path.join(target, "data.mdb"), 0o600)  # copy2 copied the backup's mode
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


def stats(args) -> int:
    import urllib.error
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://{args.metrics}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
    except (urllib.error.URLError, OSError) as exc:
        print(f"pigeon admin stats: cannot read {url}: {getattr(exc, 'reason', exc)} "
              "(is the server running, with metrics-listen on?)", file=sys.stderr)  # fmt: skip
        return 1
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


# -- the parsers --------------------------------------------------------------------------


def add_parsers(asub) -> None:
    def data_dir(p):
        p.add_argument(
            "--data-dir", default="var", help="the server's data directory (default var)"
        )

    c = asub.add_parser(
        "check-config", help="validate a TOML config and print the effective settings"
    )
    c.add_argument("file", help="the TOML file")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=check_config)

    s = asub.add_parser("stats", help="the running server's main figures (from its metrics)")
    s.add_argument("--metrics", default="127.0.0.1:7659", metavar="HOST:PORT",
                   help="the server's metrics-listen (default 127.0.0.1:7659)")  # fmt: skip
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=stats)

    u = asub.add_parser("user", help="accounts: show, disable, enable PHONE")
    usub = u.add_subparsers(dest="user_command", metavar="ACTION", required=True)
    us = usub.add_parser("show", help="an account and its devices, online state and queues")
    us.add_argument("phone")
    data_dir(us)
    us.add_argument("--json", action="store_true")
    us.set_defaults(func=user_show)
    for name, enable, text in (
        ("disable", False, "refuse the account's logins and close its live sessions"),
        ("enable", True, "let a disabled account log in again"),
    ):
        ud = usub.add_parser(name, help=text)
        ud.add_argument("phone")
        data_dir(ud)
        ud.add_argument("--json", action="store_true")
        ud.set_defaults(func=user_disable, enable=enable)

    d = asub.add_parser("device", help="devices: list PHONE, revoke DEVICE")
    dsub = d.add_subparsers(dest="device_command", metavar="ACTION", required=True)
    dl = dsub.add_parser("list", help="the devices of an account")
    dl.add_argument("phone")
    data_dir(dl)
    dl.add_argument("--json", action="store_true")
    dl.set_defaults(func=device_list)
    dr = dsub.add_parser("revoke", help="remove a device (keys, queue) and close its live session")
    dr.add_argument("device", help="PHONE:N")
    data_dir(dr)
    dr.add_argument("--json", action="store_true")
    dr.set_defaults(func=device_revoke)

    b = asub.add_parser("backup", help="a consistent hot copy of the store, server running or not")
    b.add_argument("dest", help="a new or empty directory")
    data_dir(b)
    b.set_defaults(func=backup)

    r = asub.add_parser("restore", help="put a backup in place (stop the server first)")
    r.add_argument("backup", help="a directory written by 'pigeon admin backup'")
    data_dir(r)
    r.add_argument("--force", action="store_true",
                   help="replace an existing store (it is kept beside, renamed)")  # fmt: skip
    r.set_defaults(func=restore)
