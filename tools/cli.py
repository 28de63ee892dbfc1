"""The ``pigeon`` command: ``serve``, ``chat``, ``admin``, ``bench``.

Each subcommand lives with the part of pigeon it drives; this module only
parses arguments and dispatches.  Errors go to stderr as one line,
``pigeon COMMAND ACTION: what to fix``, with exit status 2 for usage errors
(wrong arguments, a bad config file) and 1 for failures (server unreachable,
store missing): see tools/errors.py.
"""

from __future__ import annotations

import argparse
import os
import sys

import orjson

from pigeon.core import __version__
from pigeon.core.errors import CodecError
from pigeon.core.tokens import DICTIONARIES, LATEST_VERSION
from pigeon.core.wire import MAGIC, PREAMBLE_SIZE, PROTOCOL_VERSION
from pigeon.tools.errors import FAILURE, USAGE, Failure, UsageError, command_name


def _serve(args) -> int:
    from pigeon.server.config import OPTIONS, ConfigError, load
    from pigeon.server.supervisor import serve

    overrides = {o.name: getattr(args, o.name) for o in OPTIONS}
    try:
        config = load(args.config, overrides)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    return serve(config, args.config, overrides)


def _admin_gen_cert(args) -> int:
    from pigeon.tools.certs import DEFAULT_NAMES, gen_cert

    try:
        cert, key = gen_cert(args.out_dir, args.name or DEFAULT_NAMES, args.days, args.force)
    except (ValueError, FileExistsError) as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise Failure(f"cannot write to {args.out_dir}: {exc.strerror}") from None
    print(f"wrote {cert} and {key}")
    print(f"serve with: pigeon serve --tls-cert {cert} --tls-key {key}")
    return 0


def _admin_provision(args) -> int:
    from pigeon.server.provision import provision
    from pigeon.server.store import Store, StoreError

    try:
        os.makedirs(args.data_dir, exist_ok=True)
        store = Store(os.path.join(args.data_dir, "store"))
    except (OSError, StoreError) as exc:
        raise Failure(f"cannot open the store in {args.data_dir}: {exc}") from None
    try:
        creds = provision(store, args.count, args.out, prefix=args.prefix,
                          iterations=args.iterations)  # fmt: skip
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise Failure(f"cannot write {args.out}: {exc.strerror}") from None
    finally:
        store.close()
    from pigeon.tools.admin import plural

    first, last = creds[0]["phone"], creds[-1]["phone"]
    print(f"provisioned {plural(len(creds), 'account')} ({first}..{last}); "
          f"credentials in {args.out}")  # fmt: skip
    return 0


def _admin_queues(args) -> int:
    from pigeon.server.queues import Queues
    from pigeon.tools.admin import age_text, open_store, plural, size_text

    if args.top < 0:
        raise UsageError("--top must be 0 or more")
    # a wrong data directory is an error (Failure), never a new empty store
    store = open_store(args)
    try:
        stats = Queues(store).stats(args.top)
        info, stat = store.env.info(), store.env.stat()
        stats["store_used_bytes"] = (info["last_pgno"] + 1) * stat["psize"]
        stats["map_size"] = info["map_size"]
    finally:
        store.close()
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(stats) + b"\n")
        return 0
    print(
        f"{plural(stats['count'], 'queued entry', 'queued entries')} ({size_text(stats['bytes'])}) "
        f"for {plural(stats['devices_with_queue'], 'device')}; oldest {age_text(stats['oldest_s'])}; "
        f"store {size_text(stats['store_used_bytes'])} of {size_text(stats['map_size'])} map"
    )
    if stats["top"]:
        print(f"{'device':<24} {'entries':>9} {'bytes':>11} {'oldest':>9}")
        for d in stats["top"]:
            print(
                f"{d['device']:<24} {d['count']:>9} {size_text(d['bytes']):>11} "
                f"{age_text(d['oldest_s']):>9}"
            )
    return 0


def _dictionary(version: int):
    d = DICTIONARIES.get(version)
    if d is None or version == 0:
        known = ", ".join(str(v) for v in sorted(DICTIONARIES) if v)
        raise UsageError(f"unknown dictionary version {version} (known: {known})")
    return d


def _admin_tokens(args) -> int:
    d = _dictionary(args.dictionary)
    entries = d.entries()
    if args.json:
        rows = [{"code": f"{c:02x}" if c < 0x100 else f"{c:04x}", "string": s} for c, s in entries]
        sys.stdout.buffer.write(orjson.dumps({"version": d.version, "tokens": rows}) + b"\n")
    else:
        for c, s in entries:
            print(f"{c:02x}" if c < 0x100 else f"{c:04x}", s, sep="\t")
    return 0


def _node_json(node) -> dict:
    c = node.content
    if isinstance(c, (bytes, bytearray, memoryview)):
        content = {"bytes": bytes(c).hex()}
    elif c is None:
        content = None
    else:
        content = [_node_json(ch) for ch in c]
    return {"tag": node.tag, "attrs": dict(node.attrs), "content": content}


def _admin_decode(args) -> int:
    from pigeon.core.codec import Codec, FrameReader
    from pigeon.core.node import format_node

    text = " ".join(args.hex) if args.hex else sys.stdin.read()
    try:
        data = bytes.fromhex("".join(text.split()))
    except ValueError:
        raise UsageError(
            "input is not hex: give bytes like '00 00 08 f8 03 06 13 fc 02 6b 31'"
        ) from None
    if not data:
        raise UsageError("no bytes given: pass hex as arguments or on stdin")
    codec = Codec(_dictionary(args.dictionary))
    reader = FrameReader()
    out = []
    if data[:3] == MAGIC and len(data) >= PREAMBLE_SIZE:
        out.append((f"preamble: protocol {data[3]}, dictionary {data[4]}", None))
        data = data[PREAMBLE_SIZE:]
    reader.feed(data)
    try:
        while (node := reader.next_node(codec)) is not None:
            out.append((format_node(node, max_bytes=64), node))
    except CodecError as exc:
        print(
            f"pigeon admin decode: error {exc.code.value} {exc.code.name}: {exc.text}",
            file=sys.stderr,
        )
        _print_decoded(out, args.json)
        return 1
    _print_decoded(out, args.json)
    if reader.buffered:
        from pigeon.tools.admin import plural

        left = plural(reader.buffered, "byte")
        print(f"pigeon admin decode: {left} left over (an incomplete frame)", file=sys.stderr)
        return 1
    return 0


def _print_decoded(out, as_json: bool) -> None:
    for text, node in out:
        if as_json:
            obj = {"preamble": text} if node is None else _node_json(node)
            sys.stdout.buffer.write(orjson.dumps(obj) + b"\n")
        else:
            print(text)


def build_parser() -> argparse.ArgumentParser:
    from pigeon.core.codec import IMPLEMENTATION

    p = argparse.ArgumentParser(
        prog="pigeon",
        description="pigeon: a compact binary chat server (protocol: docs/PROTOCOL.md).",
    )
    p.add_argument(
        "--version",
        action="version",
        version=(
            f"pigeon {__version__} (protocol {PROTOCOL_VERSION}, dictionary {LATEST_VERSION}, "
            f"codec {IMPLEMENTATION})"
        ),
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    from pigeon.server.config import add_arguments

    serve = sub.add_parser(
        "serve",
        help="run the server",
        # the settings, grouped, follow in the help; 60 of them in the usage line hide it
        usage="%(prog)s [-h] [--config FILE] [--SETTING VALUE ...]",
        description="Run the server: a supervisor and worker processes. Every flag can also be "
        "set in the TOML file given with --config (same names, without the dashes); "
        "flags override the file, the file overrides the defaults. "
        "docs/OPERATIONS.md explains each setting.",
    )
    serve.add_argument("--config", metavar="FILE", help="TOML configuration file")
    add_arguments(serve)
    serve.set_defaults(func=_serve)
    from pigeon.tools import chat

    chat.add_parser(sub)
    from pigeon.bench import harness

    harness.add_parser(sub)

    admin = sub.add_parser("admin", help="operator and developer tools")
    asub = admin.add_subparsers(dest="admin_command", metavar="ACTION", required=True)
    t = asub.add_parser("tokens", help="print the token dictionary")
    t.add_argument(
        "--dictionary",
        type=int,
        default=LATEST_VERSION,
        metavar="N",
        help=f"dictionary version (default {LATEST_VERSION})",
    )
    t.add_argument("--json", action="store_true", help="one JSON object")
    t.set_defaults(func=_admin_tokens)
    d = asub.add_parser(
        "decode",
        help="decode frames given in hex (a preamble first is recognised)",
        description="Decode hex-dumped frames, as captured from a connection, into nodes.",
    )
    d.add_argument("hex", nargs="*", help="hex bytes (default: read stdin)")
    d.add_argument(
        "--dictionary",
        type=int,
        default=LATEST_VERSION,
        metavar="N",
        help=f"dictionary version of the connection (default {LATEST_VERSION})",
    )
    d.add_argument("--json", action="store_true", help="one JSON object per node")
    d.set_defaults(func=_admin_decode)
    g = asub.add_parser(
        "gen-cert",
        help="make a self-signed TLS certificate for development",
        description="Write DIR/key.pem, the private key (mode 0600), and DIR/cert.pem, the "
        "certificate (mode 0644: it is public, clients need it to trust the server), into DIR "
        "(created mode 0700 if missing) for the TLS listener: "
        "pigeon serve --tls-cert DIR/cert.pem --tls-key DIR/key.pem. "
        "For production use a certificate from a real CA.",
    )
    g.add_argument("--out-dir", default="var/tls", metavar="DIR", help="default: var/tls")
    g.add_argument(
        "--name",
        action="append",
        metavar="NAME",
        help="host name or IP address the certificate is for; repeat for several "
        "(default: localhost, 127.0.0.1, ::1)",
    )
    g.add_argument("--days", type=int, default=365, help="validity in days, 1-36500 (default 365)")
    g.add_argument("--force", action="store_true", help="replace existing files")
    g.set_defaults(func=_admin_gen_cert)
    pv = asub.add_parser(
        "provision",
        help="create N accounts directly in the store, for load tools",
        description="Create N accounts with one device each straight in the store (no codes, "
        "no SMS) and write their credentials, one JSON object a line, to --out (mode 0600). "
        "For benchmarks and load tests: the file logs in as those devices.",
    )
    pv.add_argument("--count", type=int, required=True, metavar="N")
    pv.add_argument("--out", required=True, metavar="FILE", help="credentials, JSON lines")
    from pigeon.tools import admin as admin_tools

    admin_tools.server_options(pv)
    pv.add_argument("--prefix", default="999", help="phone numbers are PREFIX + index, 12 digits")
    pv.add_argument("--iterations", type=int, default=4096, help="SCRAM PBKDF2 iterations")
    pv.set_defaults(func=_admin_provision)
    q = asub.add_parser(
        "queues",
        help="queue lengths, bytes and oldest ages, longest queues first",
        description="Queue totals and the devices with the longest queues, read straight from "
        "the LMDB store: works with the server running or stopped.",
    )
    admin_tools.server_options(q)
    q.add_argument("--top", type=int, default=10, metavar="N", help="devices listed (default 10)")
    q.add_argument("--json", action="store_true", help="one JSON object")
    q.set_defaults(func=_admin_queues)
    admin_tools.add_parsers(asub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse's own usage errors exit 2 here
    name = command_name(args)
    try:
        if args.command == "admin":
            from pigeon.tools.admin import resolve_server_options

            # What admin commands write (backups, stores, credentials, keys) is
            # private, whatever the caller's umask; files meant to be public
            # (gen-cert's certificate) set their mode explicitly.
            os.umask(0o077)
            resolve_server_options(args)
            try:
                return args.func(args)
            except OSError as exc:
                if isinstance(exc, BrokenPipeError):
                    raise
                # an admin command reached something it could not read or write
                where = f"{exc.filename}: " if exc.filename else ""
                raise Failure(f"{where}{exc.strerror or exc}") from None
        return args.func(args)
    except UsageError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return USAGE
    except Failure as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return FAILURE
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
