"""``pigeon chat``: a terminal client on the asyncio SDK.

    pigeon chat register 491701234567     # asks for the code from the SMS, saves the device
    pigeon chat                           # log in with the saved device and chat

In a chat, a line ``PHONE text`` sends ``text`` to PHONE; a line with only
text goes to the last number used (``/to PHONE`` sets it).  Incoming
messages print as ``<- PHONE: text``; sent ones as ``-> PHONE: text [id]``
followed by their ticks: ``✓`` when the server holds the message,
``✓✓`` when it reached a device of the recipient, ``read`` when the
recipient's client showed it.  This client shows what it receives at once,
so it sends ``read`` receipts at once.  ``/quit`` (or end of input) leaves.

An idle chat stays connected: the SDK pings after ``--keepalive`` seconds
(default 30) without sending, well within the server's ``idle-timeout``
(120 s), and reconnects if a ping goes unanswered.

The device's credentials (its address and 32-byte secret) are kept in a
profile file readable by its owner only (default ``~/.config/pigeon/chat.json``).
Bodies travel as UTF-8 bytes: the server never reads them, and end-to-end
encryption is a client's job that arrives with the key directory.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import ssl
import sys
import time

import orjson

from pigeon.client import Client, ConnectionLost, Credentials, ServerError
from pigeon.client._core import DEFAULT_KEEPALIVE
from pigeon.core.events import Error, IncomingMessage, IncomingReceipt
from pigeon.core.node import valid_phone

DEFAULT_PROFILE = os.path.join(
    os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"), "pigeon", "chat.json"
)


class ChatError(Exception):
    """Something the user must fix; the message says what."""


def _hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ChatError(f"--server must be HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def _ssl_context(args) -> ssl.SSLContext | None:
    if not args.tls and not args.cafile:
        return None
    try:
        return ssl.create_default_context(cafile=args.cafile)
    except (OSError, ssl.SSLError) as exc:
        raise ChatError(f"cannot use --cafile {args.cafile}: {exc}") from None


def load_profile(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return orjson.loads(f.read())
    except FileNotFoundError:
        raise ChatError(
            f"no saved device in {path}: run 'pigeon chat register PHONE' first"
        ) from None
    except (OSError, orjson.JSONDecodeError) as exc:
        raise ChatError(f"cannot read {path}: {exc}") from None


def save_profile(path: str, profile: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(orjson.dumps(profile, option=orjson.OPT_INDENT_2))
    os.replace(tmp, path)


async def _connect(args) -> Client:
    host, port = _hostport(args.server)
    try:
        return await Client.connect(
            host,
            port,
            ssl=_ssl_context(args),
            reconnect=True,
            timeout=args.timeout,
            keepalive=args.keepalive or None,
        )
    except (OSError, TimeoutError) as exc:
        raise ChatError(f"cannot reach {args.server}: {exc}") from None


def _out(line: str) -> None:
    print(line, flush=True)


async def _prompt(text: str) -> str:
    _out(text)
    line = await asyncio.to_thread(sys.stdin.readline)
    return line.strip()


async def register(args) -> int:
    if not valid_phone(args.phone):
        raise ChatError(f"{args.phone!r} is not a phone number: E.164 digits without '+', 8-15")
    client = await _connect(args)
    try:
        ttl = await client.register(args.phone, "voice" if args.voice else "sms")
        code = await _prompt(f"a code was sent to {args.phone} (valid {ttl} s); code:")
        creds = await client.verify(args.phone, code, os.urandom(32))
    except ServerError as exc:
        raise ChatError(f"the server refused: {exc.code} {exc.text}") from None
    finally:
        await client.close()
    save_profile(
        args.profile, {"server": args.server, "phone": args.phone, **creds.to_json(), "last_seq": 0}
    )
    _out(f"registered {creds.device}; saved to {args.profile}")
    return 0


class Chat:
    def __init__(self, client: Client, profile: dict, profile_path: str):
        self.client = client
        self.profile = profile
        self.profile_path = profile_path
        self.peer: str | None = profile.get("peer")
        self.sent: dict[str, str] = {}  # message id -> recipient, for ticks

    async def incoming(self) -> None:
        async for ev in self.client:
            if isinstance(ev, IncomingMessage):
                who = ev.sender.partition(":")[0]
                when = time.strftime("%H:%M", time.localtime(ev.t / 1000))
                text = ev.body.decode("utf-8", "replace")
                _out(f"<- {who} [{when}]: {text}")
                await self.client.ack(ev.seq)
                try:
                    await self.client.receipt(who, ev.id, "read", timeout=None)
                except ServerError:
                    pass  # the sender went away; nothing to tell
            elif isinstance(ev, IncomingReceipt):
                await self.client.ack(ev.seq)
                if ev.id in self.sent:
                    tick = "✓✓" if ev.type == "delivered" else ev.type
                    _out(f"   {tick} {ev.id}")
            elif isinstance(ev, Error):
                _out(f"!! server: {ev.code} {ev.text}")
        _out(f"!! disconnected: {self.client.closed}")

    async def send(self, to: str, text: str) -> None:
        mid = self.client.new_id()
        self.sent[mid] = to
        _out(f"-> {to}: {text} [{mid}]")
        try:
            await self.client.send(to, text.encode(), id=mid)
            _out(f"   ✓ {mid}")
        except ServerError as exc:
            _out(f"!! not sent [{mid}]: {exc.code} {exc.text}")
        except (ConnectionLost, TimeoutError) as exc:
            _out(f"!! not sent [{mid}]: {exc}")

    async def typed(self) -> None:
        while True:
            line = await asyncio.to_thread(sys.stdin.readline)
            if not line:
                return
            line = line.strip()
            if not line:
                continue
            if line in ("/quit", "/q"):
                return
            if line.startswith("/to "):
                to = line[4:].strip()
                if valid_phone(to):
                    self.peer = to
                    _out(f"   talking to {to}")
                else:
                    _out(f"!! {to!r} is not a phone number (8-15 digits, no '+')")
                continue
            first, _, rest = line.partition(" ")
            if valid_phone(first) and rest:
                self.peer, text = first, rest
            elif self.peer is not None:
                text = line
            else:
                _out("!! who to? type 'PHONE text' or '/to PHONE'")
                continue
            asyncio.get_running_loop().create_task(self.send(self.peer, text))


async def chat(args) -> int:
    profile = load_profile(args.profile)
    if args.server_given is None:
        args.server = profile.get("server", args.server)
    creds = Credentials.from_json(profile)
    client = await _connect(args)
    client.core.last_seq = profile.get("last_seq", 0)  # deliveries shown in earlier runs
    try:
        await client.login(creds)
    except ServerError as exc:
        await client.close()
        raise ChatError(
            f"login refused ({exc.code} {exc.text}); if this device was replaced or removed, "
            "register again with 'pigeon chat register PHONE'"
        ) from None
    _out(f"logged in as {creds.device} on {args.server}; type 'PHONE text', /to PHONE, /quit")
    session = Chat(client, profile, args.profile)
    reader = asyncio.get_running_loop().create_task(session.incoming())
    try:
        await session.typed()
    finally:
        reader.cancel()
        profile["last_seq"] = client.last_seq
        if session.peer:
            profile["peer"] = session.peer
        save_profile(args.profile, profile)
        await client.close()
    return 0


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not (seconds >= 0 and math.isfinite(seconds)):
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {value!r}")
    return seconds


def add_parser(sub) -> None:
    p = sub.add_parser(
        "chat",
        help="terminal chat client",
        description="A terminal chat client. 'pigeon chat register PHONE' registers this "
        "terminal as a device; 'pigeon chat' logs in with it and chats.",
    )
    p.add_argument(
        "--server",
        dest="server_given",
        metavar="HOST:PORT",
        help="server address (default: the one saved at registration, else 127.0.0.1:7650)",
    )
    p.add_argument("--tls", action="store_true", help="connect with TLS (system trust store)")
    p.add_argument("--cafile", help="trust this CA/self-signed certificate (implies --tls)")
    p.add_argument("--profile", default=DEFAULT_PROFILE, help=f"default: {DEFAULT_PROFILE}")
    p.add_argument("--timeout", type=float, default=10.0, help="connect timeout, seconds")
    p.add_argument(
        "--keepalive",
        type=_seconds,
        default=DEFAULT_KEEPALIVE,
        metavar="SECONDS",
        help="ping after this many seconds without sending (keeps an idle chat connected; "
        f"under the server's idle-timeout); 0 = never (default: {DEFAULT_KEEPALIVE:g})",
    )
    csub = p.add_subparsers(dest="chat_command", metavar="ACTION")
    r = csub.add_parser("register", help="register this terminal as a device of PHONE")
    r.add_argument("phone", help="E.164 digits without '+', e.g. 491701234567")
    r.add_argument("--voice", action="store_true", help="ask for a voice call instead of SMS")
    p.set_defaults(func=run)


def run(args) -> int:
    args.server = args.server_given or "127.0.0.1:7650"
    import uvloop

    try:
        if args.chat_command == "register":
            return uvloop.run(register(args))
        return uvloop.run(chat(args))
    except ChatError as exc:
        print(f"pigeon chat: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
