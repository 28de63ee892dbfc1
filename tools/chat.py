"""``pigeon chat``: a terminal client on the asyncio SDK.

    pigeon chat register 491701234567     # asks for the code from the SMS, saves the device
    pigeon chat                           # log in with the saved device and chat
    pigeon chat --profile desk.json link  # link this terminal to an account (a QR code)

Registering: the server sends a one-time code to the number (development
servers with the ``log`` SMS gateway write it to ``<data-dir>/sms-outbox.txt``
instead).  A wrong code asks again, up to 5 tries (the server's default
``code-attempts-per-net``; it voids a code after that many wrong ones from
one network) while the
code is valid; Ctrl-D gives up.  Typing the code may take longer than the
server's login deadline (10 s), which closes an idle connection that has
not logged in: the code is then checked on a new connection, which the
protocol allows.  ``register`` refuses a profile that already holds a
device (replacing it would lose that device's keys), before any code is
sent: give the new one its own ``--profile``, or add ``--force``, which
renames the old profile and its encryption state to
``NAME.replaced-DATE.json`` (``pigeon chat --profile`` that file still uses
it) and registers into the name given.

Chatting: a line ``PHONE text`` sends ``text`` to PHONE (E.164 digits,
no '+'); a line with only text goes to the number in the prompt, the last
one used (``/to PHONE`` sets it).  A number becomes the one bare lines go
to for good only when the server accepts a message to it: if the server
refuses the first one (not a registered user, say), the prompt goes back to
the number before.  Lines starting with '/' are commands, run here and never
sent:

    /help          list the commands
    /to PHONE      talk to PHONE from now on (/to alone: who is it now)
    /link CODE     link a new device (the primary only): CODE is the text under
                   its QR code (PGN1,...) or its 8-character code (ABCD-2345)
    /devices       this account's devices: number, name, when linked
    /send FILE     send a file: encrypted, uploaded to the media service, linked
                   in the message (received ones are saved into --media-dir)
    /save N        save received file N, one on another host than this chat's
                   server (not fetched on arrival: that host would learn this
                   user's address and when it is online), or one whose download
                   failed (said so, with its N)
    /unlink N      unlink device number N (the primary: any companion; a
                   companion: itself)
    /verify PHONE  the safety number with PHONE (60 digits) and its QR text:
                   compare it with PHONE's in person or over another channel
    /group new NAME PHONE...     a group called NAME (one word) with these members;
                                 this user is its admin
    /group add NAME PHONE...     add members (admins only); /group remove NAME PHONE...
    /group leave NAME            leave the group
    /group info NAME             subject, members (admins marked), settings
    /group invite NAME           the group's invite code (admins only)
    /group join CODE             join a group by its invite code
    /groups                      the groups this user is in, by name
    /quit, /q      leave (so does Ctrl-D; Ctrl-C leaves with status 130)
    //text         send "/text": a leading '//' stands for one '/'

Groups: a line ``NAME text`` sends ``text`` to the group called NAME (the
name given at ``/group new``, or for a group someone else added this user
to, its subject with spaces as '-'), and ``/to NAME`` makes bare lines go
there.  Group messages print as ``<- NAME/PHONE [HH:MM]: text`` and
changes to the group as ``** NAME: PHONE added PHONE``; they are end-to-end
encrypted like the others (Megolm sender keys, client/group_crypto.py).
Ticks of a group message name the members: ``✓✓ ID: PHONE...`` when their
devices got it, ``read ID: PHONE...`` when they read it (this chat sends
its own read receipts for what it shows).
The profile keeps which name stands for which group (``g:N``).

An unknown command (a typo such as ``/qiut``) is refused with a pointer to
``/help``.  Incoming messages print as ``<- PHONE [HH:MM]: text``; sent ones
as ``-> PHONE: text [id]`` followed by their ticks: ``✓`` when the server
holds the message, ``✓✓`` when it reached a device of the recipient,
``read`` when the recipient's client showed it.  This client shows what it
receives at once, so it sends ``read`` receipts at once; for a file, once
it is saved (a download that fails is said, with ``/save N`` to try again,
and until then the sender sees ``✓✓``, not ``read``).

In a terminal, input is a line editor (prompt_toolkit: history, editing
keys) whose prompt is redrawn below whatever prints meanwhile, so an
incoming message never lands in the middle of the line being typed.  When
standard input is not a terminal (a pipe, a script) lines are read as they
come, without a prompt.

Connection: an idle chat stays connected: the SDK pings after
``--keepalive`` seconds (default 30) without sending, well within the
server's ``idle-timeout`` (120 s).  A lost connection (a worker or the whole
server restarting, the network) prints ``reconnecting…``; the client
reconnects by itself and says ``back online``.  Messages (and ``/send``
files) typed meanwhile are kept, shown with ``(waiting for the connection)``,
and go out once back online, in the order typed, with their ticks as usual;
up to ``--waiting-max`` (100) wait (more are refused, to be typed again
once back online), and leaving before the connection is back says how many were
not sent.  When the server ends the session for good (the account
disabled, this device removed or replaced, its login refused) the client
says why and exits with status 1.

Linking a device: the account's primary (the phone number's registered
device) can link up to 4 more, each with its own profile.  On the new one,
``pigeon chat --profile desk.json link`` asks the server to pair and shows a
QR code with its text underneath (a camera scans the code; a terminal copies
the text), replaced by a new one every minute for a few minutes; the
primary's chat takes it with ``/link PGN1,...``.  Without a camera,
``pigeon chat link --code PHONE`` shows an 8-character code (``ABCD-2345``)
to type on the primary as ``/link ABCD-2345``.  Once linked, the new device
logs in once (a device that never does is removed again after a minute),
saves its profile and says how to start chatting; an expired code asks to
run ``pigeon chat link`` again; Ctrl-C gives up (status 130, nothing saved).
``link`` refuses a profile that already holds a device, so the primary's
own profile cannot be overwritten by mistake.

The profile (default ``~/.config/pigeon/chat.json``, readable by its owner
only) keeps the device's credentials (its address and 32-byte secret), the
number talked to last, the last delivery shown, and the ids of the last
1,000 sent messages not yet read (with their recipient), so ticks that
arrive after a restart of the chat are still shown; an id leaves it when
its ``read`` comes.  Messages are end-to-end encrypted (the SDK's default,
client/e2e.py): the encryption state (Olm account and sessions) is in
``<profile>.e2e``, its pickle key in ``<profile>.e2e.key`` (both readable
by their owner only).  ``/verify PHONE`` shows the safety number with
PHONE; when a contact's keys change (re-registration, someone in the
middle) the chat warns and asks to compare it again.  ``--plaintext``
sends UTF-8 bytes unencrypted (protocol tests only).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import io
import math
import os
import re
import shutil
import socket
import ssl
import sys
import threading
import time

import orjson

from pigeon.client import Client, ConnectionLost, Credentials, ServerError
from pigeon.client._core import DEFAULT_KEEPALIVE, PairingCode
from pigeon.client.e2e import E2EError, format_safety_number, safety_number, safety_qr
from pigeon.client.identity import Identity, new_identity
from pigeon.client.secure import (
    DecryptedMessage,
    DecryptionFailed,
    GroupDecryptionFailed,
    GroupMessage,
    SafetyNumberChanged,
)
from pigeon.core.errors import ErrorCode, is_fatal
from pigeon.core.events import (
    DevicesChanged,
    Error,
    GroupNotice,
    IncomingMessage,
    IncomingReceipt,
    KeysChanged,
    KeysLow,
    normalize_link_code,
)
from pigeon.core.node import address_kind, valid_phone

DEFAULT_PROFILE = os.path.join(
    os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"), "pigeon", "chat.json"
)
#: Where received media files are saved (--media-dir).
DEFAULT_MEDIA_DIR = os.path.join(
    os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "pigeon", "media"
)
#: Wrong codes tried before giving up: the server's default ``code-attempts-per-net``
#: (it does not say how many are left; past its limit every try fails).
CODE_TRIES = 5
#: Sent messages whose ticks the profile remembers across runs (oldest dropped first).
PENDING_MAX = 1000
#: Files on another host that ``/save`` can still fetch (oldest dropped first).
UNSAVED_MAX = 50
#: Messages and files typed while reconnecting that wait to go out (more are refused):
#: the default of --waiting-max.
WAITING_MAX = 100

COMMANDS = """commands (run here, never sent):
  PHONE text   send text to PHONE (digits, no '+'); bare lines then go there too
  text         send to the number in the prompt
  /to PHONE    talk to PHONE from now on; /to alone says who it is now
  /link CODE   link a new device: the text under its QR code (PGN1,...) or its
               code (ABCD-2345), from 'pigeon chat link' there (the primary only)
  /devices     this account's devices (number, name, when linked)
  /unlink N    unlink device number N (see /devices)
  /verify PHONE  the safety number with PHONE: compare it with theirs
  /send FILE   send a file (encrypted, uploaded to the media service) to the prompt's number
  /save N      fetch and save file N: one on another host (that host sees your address),
               or one whose download failed
  /group new NAME PHONE...  a group (NAME: one word); NAME text sends to it
  /group add|remove NAME PHONE...   /group leave|info|invite NAME   /group join CODE
  /groups      the groups this user is in
  //text       send "/text" (a line starting with one '/' is a command)
  /help        this list
  /quit, /q    leave (so does Ctrl-D)
while reconnecting, what you send waits (up to --waiting-max, default 100), then goes out
ticks: ✓ the server has it, ✓✓ delivered to a device of the recipient, read: shown there"""


class ChatError(Exception):
    """Something the user must fix; the message says what."""


class Interrupted(Exception):
    """Ctrl-C at the prompt."""


def _hostport(value: str) -> tuple[str, int]:
    from pigeon.server.config import split_hostport

    try:  # what the server's listen takes: '[::1' was looked up as a host name
        return split_hostport(value)
    except ValueError as exc:
        raise ChatError(f"--server: {exc}") from None


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
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, mode=0o700, exist_ok=True)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a stale .tmp keeps its old mode through O_CREAT
    with os.fdopen(fd, "wb") as f:
        f.write(orjson.dumps(profile, option=orjson.OPT_INDENT_2))
    os.replace(tmp, path)


def e2e_profile(path: str) -> str:
    """Where the SDK keeps this profile's encryption state (its pickle key: ``.key`` beside it)."""
    return path + ".e2e"


async def _connect(args, reconnect: bool = True) -> Client:
    host, port = _hostport(args.server)
    try:
        return await Client.connect(
            host,
            port,
            ssl=_ssl_context(args),
            reconnect=reconnect,
            timeout=args.timeout,
            keepalive=args.keepalive or None,
            plaintext=args.plaintext,
            profile=None if args.plaintext else e2e_profile(args.profile),
        )
    except (OSError, TimeoutError) as exc:
        hint = ""
        if isinstance(exc, ssl.SSLError) and "WRONG_VERSION_NUMBER" in str(exc):
            hint = ("; that is no TLS port: the server's TLS listener is its tls-listen "
                    "(127.0.0.1:7651 by convention), give it with --server")  # fmt: skip
        elif isinstance(exc, ssl.SSLCertVerificationError):
            hint = "; for a self-signed server give its certificate: --cafile var/tls/cert.pem"
        raise ChatError(f"cannot reach {args.server}: {exc}{hint}") from None


def _out(line: str) -> None:
    print(line, flush=True)


#: control characters, and the invisible ones that reorder or hide text (bidi
#: embeddings, overrides and isolates, the zero-width space, the BOM): a peer's
#: "invoice\u202efdp.exe" showed as "invoiceexe.pdf" (probe, 2026-12-04).  Not the
#: joiners (emoji sequences, Persian and Indic scripts) nor the LRM/RLM marks.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200b\u202a-\u202e\u2066-\u2069\ufeff]")


def _printable(text: str) -> str:
    """Someone else's text, safe for a terminal: control characters (escape
    sequences could move the cursor, retitle the window, ...) are shown as \\xNN,
    the invisible ones that reorder text as \\uNNNN."""
    return _CONTROL.sub(_shown, text)


def _shown(m) -> str:
    n = ord(m.group())
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}"


# -- input: a line editor in a terminal, plain lines from a pipe ---------------------


def _text(line: bytes) -> str:
    return line.rstrip(b"\r").decode("utf-8", "replace")


class PlainLines:
    """Lines from a pipe or a file, without a prompt.

    A daemon thread reads file descriptor 0 and hands whole lines to the
    loop: the loop never blocks on input, and the process can exit (on a
    terminal error, say) while the thread still waits for a line.  It reads
    with ``os.read``, not ``sys.stdin``, so it holds no buffered reader's
    lock that would trouble the interpreter's exit.
    """

    def __init__(self):
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._read, args=(loop,), daemon=True, name="stdin").start()

    def _read(self, loop) -> None:
        buf = b""
        try:
            while True:
                try:
                    data = os.read(0, 65536)
                except OSError:
                    data = b""
                if not data:
                    break
                *lines, buf = (buf + data).split(b"\n")
                for line in lines:
                    loop.call_soon_threadsafe(self.queue.put_nowait, _text(line))
            if buf:
                loop.call_soon_threadsafe(self.queue.put_nowait, _text(buf))
            loop.call_soon_threadsafe(self.queue.put_nowait, None)
        except RuntimeError:
            pass  # the loop is closed: nobody is reading any more

    async def ask(self, question: str) -> str | None:
        _out(question)
        return await self.queue.get()

    async def line(self) -> str | None:
        return await self.queue.get()

    def redraw(self) -> None:
        pass

    def stop(self) -> None:
        pass


class TerminalLines:
    """A prompt_toolkit line editor; with ``patch_stdout`` active (see ``_terminal``),
    whatever prints meanwhile goes above the prompt, which is redrawn with the
    text typed so far."""

    def __init__(self, prompt):
        from prompt_toolkit import PromptSession

        self.session = PromptSession()
        self.prompt = prompt  # a callable: the prompt shows the current recipient

    async def _read(self, message) -> str | None:
        try:
            return await self.session.prompt_async(message)
        except EOFError:
            return None
        except KeyboardInterrupt:
            raise Interrupted() from None

    async def ask(self, question: str) -> str | None:
        return await self._read(question + " ")

    async def line(self) -> str | None:
        return await self._read(self.prompt)

    def redraw(self) -> None:
        app = self.session.app
        if app.is_running:
            app.invalidate()

    def stop(self) -> None:
        """End a prompt being read (the chat is over): it returns None."""
        app = self.session.app
        if app.is_running and not app.future.done():
            app.exit(exception=EOFError())


def _is_terminal() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


def _lines(prompt=lambda: "> "):
    return TerminalLines(prompt) if _is_terminal() else PlainLines()


def _terminal():
    """Route prints through the line editor while it runs (terminals only)."""
    if not _is_terminal():
        return contextlib.nullcontext()
    from prompt_toolkit.patch_stdout import patch_stdout

    return patch_stdout()


# -- register ------------------------------------------------------------------------------


async def register(args) -> int:
    if not valid_phone(args.phone):
        raise ChatError(f"{args.phone!r} is not a phone number: E.164 digits without '+', 8-15")
    aside = _keep_aside(args.profile, args.force)
    try:
        with _terminal():
            status = await _register(args, _lines())
    except BaseException:
        _put_back(aside)  # nothing registered: the old device is where it was
        raise
    if aside:
        _out(f"the device {args.profile} held before is kept in {aside[0][1]} "
             f"(pigeon chat --profile {aside[0][1]} uses it)")  # fmt: skip
    return status


def _profile_files(path: str) -> tuple[str, ...]:
    """A profile and what the SDK keeps beside it (its encryption state and pickle key)."""
    return (path, e2e_profile(path), e2e_profile(path) + ".key")


def _keep_aside(path: str, force: bool) -> list[tuple[str, str]]:
    """Before registering into ``path``: refuse a profile that holds a device, or
    with ``force`` rename it and its encryption state out of the way (the new
    device must not take its keys, nor overwrite them); returns the renames."""
    if not os.path.exists(path):
        return []
    if not force:
        try:
            held = load_profile(path).get("device") or "a device"
        except ChatError:
            held = "something (unreadable)"
        raise ChatError(
            f"{path} already holds {held}: registering would replace it and lose its keys; "
            "give the new registration its own profile (pigeon chat --profile FILE register "
            "PHONE), or add --force to replace it (the old one is kept, renamed)"
        )
    root, ext = os.path.splitext(path)
    new = f"{root}.replaced-{time.strftime('%Y%m%d-%H%M%S')}{ext}"
    moved = []
    for old, aside in zip(_profile_files(path), _profile_files(new), strict=True):
        if os.path.exists(old):
            if os.path.exists(aside):
                _put_back(moved)
                raise ChatError(f"{aside} exists: try again in a second")
            os.rename(old, aside)
            moved.append((old, aside))
    return moved


def _put_back(moved: list[tuple[str, str]]) -> None:
    for old, aside in moved:
        with contextlib.suppress(OSError):
            os.replace(aside, old)


async def _register(args, lines) -> int:
    method = "voice" if args.voice else "sms"
    client = await _connect(args, reconnect=False)
    try:
        try:
            ttl = await client.register(args.phone, method)
        except ServerError as exc:
            raise ChatError(f"the server refused: {exc.code} {exc.text}") from None
        expires = time.monotonic() + ttl
        _out(
            f"a code was sent to {args.phone} by {method} (valid {ttl} s; development servers "
            "with the log gateway write it to <data-dir>/sms-outbox.txt)"
        )
        # Ed25519: plaintext, a new key saved with the credentials; encrypted, the Olm
        # account's (in the encryption state beside the profile)
        identity = new_identity() if args.plaintext else None
        tries = 0
        while True:
            code = await lines.ask("code:")
            if code is None:
                raise ChatError("no code given: nothing registered")
            code = "".join(code.split())  # "123 456" as printed in some SMS
            if not code:
                continue
            if time.monotonic() > expires:
                raise ChatError(
                    "the code has expired: run 'pigeon chat register PHONE' again for a new one"
                )
            try:
                client, creds = await _verify(args, client, code, identity)
            except ServerError as exc:
                if exc.code != ErrorCode.BAD_CODE:
                    raise ChatError(f"the server refused: {exc.code} {exc.text}") from None
                tries += 1
                if tries >= CODE_TRIES:
                    raise ChatError(
                        f"the server refused: {exc.code} {exc.text}, {tries} times; "
                        "run 'pigeon chat register PHONE' again for a new code"
                    ) from None
                _out(f"!! {exc.text}: type it again (Ctrl-D gives up)")
                continue
            break
        if not args.plaintext:  # one login: the device's keys go up, so others can write to it
            with contextlib.suppress(ServerError, ConnectionLost, TimeoutError):
                await client.login(creds)
    finally:
        await client.close()
    save_profile(
        args.profile,
        {"server": args.server, "phone": args.phone, **creds.to_json(), "last_seq": 0},
    )
    _out(f"registered {creds.device}; saved to {args.profile}")
    return 0


async def _verify(args, client: Client, code: str, identity: Identity | None):
    """``verify`` on ``client``'s connection, or on a new one if the server closed it
    (its login deadline runs while a person reads the SMS): returns (client, creds)."""
    for attempt in (1, 2):
        if client.closed is not None or attempt == 2:
            await client.close()
            client = await _connect(args, reconnect=False)
        try:
            return client, await client.verify(args.phone, code, identity)
        except ConnectionLost:
            if attempt == 2:
                raise ChatError(f"lost the connection to {args.server} twice") from None
    raise AssertionError("unreachable")


# -- link (the new device's side) ---------------------------------------------------------

#: What the user is told for the errors of linking (pairing here, /link on the primary).
LINK_ERRORS = {
    ErrorCode.PAIR_UNKNOWN: "no such code: check it, or run 'pigeon chat link' on the new device again",
    ErrorCode.PAIR_EXPIRED: "the code expired, run pigeon chat link again",
    ErrorCode.PAIR_USED: "that code was used already: run 'pigeon chat link' on the new device again",
    ErrorCode.KEY_MISMATCH: "the code does not match the device that showed it (copied wrong?)",
    ErrorCode.BAD_SIGNATURE: "this account's identity key cannot sign links: register the primary again",
    ErrorCode.DEVICE_LIMIT: "this account has the most linked devices already: /unlink one first",
    ErrorCode.NOT_PRIMARY: "only the primary device (number 0) may link or unlink other devices",
    ErrorCode.RATE_LIMITED: "too many linking attempts: try again later",
}  # fmt: skip


#: What the user is told for the errors of groups (PROTOCOL.md 10g).
GROUP_ERRORS = {
    ErrorCode.NOT_MEMBER: "not a member of that group",
    ErrorCode.NOT_ADMIN: "only the group's admins may do that",
    ErrorCode.GROUP_FULL: "the group is full",
    ErrorCode.ADD_REFUSED: "their privacy setting does not let you add them: send them the "
    "invite code (/group invite NAME) instead",
    ErrorCode.ALREADY_MEMBER: "already a member",
    ErrorCode.BAD_INVITE: "that invite code does not work (revoked, or mistyped)",
    ErrorCode.ANNOUNCE_ONLY: "only admins may send to this group (announcements)",
    ErrorCode.TOO_MANY_GROUPS: "in as many groups as the server allows: leave a group first "
    "(/group leave NAME)",
    ErrorCode.STRANGER_GROUPS: "they do not know you and are in as many groups from strangers "
    "as the server allows: send them the invite code (/group invite NAME) instead",
    ErrorCode.UNKNOWN_RECIPIENT: "not a pigeon user",
}


def _link_error(exc: ServerError) -> str:
    why = LINK_ERRORS.get(exc.code)
    return f"{why} ({exc.code} {exc.text})" if why else f"the server refused: {exc.code} {exc.text}"


def _default_name() -> str:
    """The label other devices show: the host's name, at most the server's 64 bytes."""
    return f"chat on {socket.gethostname()}".encode()[:64].decode("utf-8", "ignore")


def _show_pairing(code: PairingCode, drawn: int) -> int:
    """Show a pairing code; returns the lines it took.  ``drawn``: the lines
    the code before it took (0 for the first).  On a terminal a new code is
    drawn over the old one, so only a code that works is on the screen;
    elsewhere (a pipe, a log) it is printed below, saying the one above is void."""
    lines = []
    if drawn:
        lines.append("(a new code: the last one is void)")
    if code.qr is not None:
        import segno

        drawing = io.StringIO()
        segno.make(code.qr, error="m").terminal(out=drawing, compact=True)
        lines += drawing.getvalue().rstrip("\n").split("\n")
        lines.append("scan it on the primary, or type there (the text under the code):")
        lines.append(f"  /link {code.qr}")
    else:
        lines.append(f"on the primary, type:  /link {code.display}")
    lines.append(f"(valid {code.ttl} s; Ctrl-C gives up)")
    if drawn and sys.stdout.isatty():
        sys.stdout.write(f"\x1b[{drawn}F\x1b[J")  # up to the old code's first line, clear below
    elif drawn:
        lines.insert(0, "")
        lines[1] = "(a new code: the one above is void)"
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()
    width = shutil.get_terminal_size().columns
    return sum(max(1, -(-len(line) // width)) for line in lines)  # rows, long lines wrapped


async def link(args) -> int:
    if args.phone is not None and not valid_phone(args.phone):
        raise ChatError(f"{args.phone!r} is not a phone number: E.164 digits without '+', 8-15")
    if os.path.exists(args.profile):
        try:
            held = load_profile(args.profile).get("device")
        except ChatError:
            held = "something"
        raise ChatError(
            f"{args.profile} already holds {held}: give the new device its own "
            "(pigeon chat --profile FILE link)"
        )
    name = args.name if args.name is not None else _default_name()
    if len(name.encode()) > 64:
        raise ChatError("--name is at most 64 bytes")
    client = await _connect(args, reconnect=False)
    try:
        if args.phone is None:
            pairing = client.pair_qr(name=name, server=args.server)
        else:
            pairing = client.pair_code(args.phone, name=name)
        creds, drawn = None, 0
        try:
            async for item in pairing:
                if isinstance(item, Credentials):
                    creds = item
                    break
                drawn = _show_pairing(item, drawn)
        except ServerError as exc:
            raise ChatError(_link_error(exc)) from None
        except ConnectionLost as exc:
            raise ChatError(f"{exc}: nothing linked, run pigeon chat link again") from None
        if creds is None:
            raise ChatError("the server ended the pairing: run pigeon chat link again")
        # one login at once: a linked device that never logs in is removed again
        with contextlib.suppress(ServerError, ConnectionLost, TimeoutError):
            await client.login(creds)  # if not now, `pigeon chat` logs in
    finally:
        await client.close()
    save_profile(
        args.profile,
        {"server": args.server, "phone": creds.user, **creds.to_json(), "last_seq": 0},
    )
    _out(f"linked as {creds.device}; saved to {args.profile}")
    _out(f"start chatting: pigeon chat --profile {args.profile}")
    return 0


# -- chat ----------------------------------------------------------------------------------


MEDIA_TYPES = frozenset({"image", "video", "audio", "document", "sticker"})


def _host_of(url: str) -> str:
    """The host of a media URL, lower-case ("" if it has none)."""
    from urllib.parse import urlsplit

    try:
        return (urlsplit(url).hostname or "").lower()
    except ValueError:
        return ""


def _media_of(ev):
    """The Media a message carries, or None (a text, or a body that is not one)."""
    if ev.type not in MEDIA_TYPES:
        return None
    from pigeon.client.media import Media, MediaError

    try:
        return Media.unpack(ev.body)
    except MediaError:
        return None


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _free_name(folder: str, name: str) -> str:
    """A path in ``folder`` for ``name`` (its last part only, printable) that does not
    exist yet: ``photo.png``, then ``photo-1.png``..."""
    base = "".join(c for c in os.path.basename(name) if c.isprintable() and c not in "/\\")
    base = base.lstrip(".") or "media"
    stem, ext = os.path.splitext(base)
    for i in range(10_000):
        path = os.path.join(folder, base if i == 0 else f"{stem}-{i}{ext}")
        if not os.path.exists(path):
            return path
    raise OSError(f"no free name for {base} in {folder}")


def _user(address: str) -> str:
    return address.partition(":")[0]


class Chat:
    """One chat session: what is typed goes out, what comes in is shown.

    ``target`` is where bare lines go (shown in the prompt); ``peer`` is the
    last number the server accepted a message for.  A new target is tried
    until the server acks a message to it; a refusal before that puts
    ``target`` back to ``peer``.  ``pending`` (message id -> [recipient,
    tick]) is what the profile keeps so that receipts arriving in a later
    run still show.
    """

    def __init__(self, client: Client, profile: dict, profile_path: str):
        self.client = client
        self.profile = profile
        self.profile_path = profile_path
        self.peer: str | None = profile.get("peer")
        self.target: str | None = self.peer
        self.pending: dict[str, list] = {
            mid: list(entry)
            for mid, entry in (profile.get("pending") or {}).items()
            if isinstance(entry, list) and len(entry) == 2  # a hand-edited file: skip the rest
        }
        self.tasks: set[asyncio.Task] = set()
        #: typed while reconnecting: [typed order, "text" or "file", to, text or path, id]
        self.waiting: list[list] = []
        self.waiting_max = WAITING_MAX
        self.typed_count = 0
        self.connected = True  # the SDK's hooks: offline() and online()
        self.flushing = False
        self.lines = _lines(self.prompt)
        self._save_failed = False
        self.unlinked_self = False  # /unlink of this very device: the server closes then
        self.media_dir = DEFAULT_MEDIA_DIR  # where received files go (--media-dir)
        #: files not saved (on another host, not fetched on arrival; or a download that
        #: failed): number -> (Media, what sends its read receipt or None), for /save
        self.unsaved: dict[int, tuple] = {}
        self.unsaved_next = 1
        #: group name -> group address (g:N), as the profile keeps them
        self.creating = 0  # /group new under way
        self.made_here: set[str] = set()  # groups /group new made (their notice is not shown)
        self.groups: dict[str, str] = {
            name: gid for name, gid in (profile.get("groups") or {}).items()
            if isinstance(gid, str) and address_kind(gid) == "group"
        }  # fmt: skip

    def prompt(self) -> str:
        return f"{self.name(self.target)}> " if self.target else "> "

    # -- group names -------------------------------------------------------------------

    def name(self, address: str) -> str:
        """How the chat shows ``address``: a group by its name, anything else as it is."""
        if address_kind(address) == "group":
            for name, gid in self.groups.items():
                if gid == address:
                    return name
        return address

    def name_group(self, gid: str, wanted: str) -> str:
        """Give group ``gid`` a name (``wanted``, made one printable word, unique)."""
        for name, g in self.groups.items():
            if g == gid:
                return name
        base = "".join(c if c.isprintable() and not c.isspace() else "-" for c in wanted)
        base = base.strip("-/") or gid
        name, i = base, 1
        while name in self.groups or valid_phone(name):
            i += 1
            name = f"{base}-{i}"
        self.groups[name] = gid
        self.save()
        return name

    def save(self) -> None:
        p = self.profile
        p["last_seq"] = self.client.last_seq
        p["pending"] = self.pending
        if self.peer:
            p["peer"] = self.peer
        p["groups"] = self.groups
        try:
            save_profile(self.profile_path, p)
        except OSError as exc:
            if not self._save_failed:
                self._save_failed = True
                _out(f"!! cannot save {self.profile_path}: {exc}")

    def spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- the SDK's reconnect hooks ---------------------------------------------------

    def offline(self, why: Exception) -> None:
        self.connected = False
        _out(f"!! reconnecting… ({why}); what you send meanwhile waits for the connection")

    def online(self) -> None:
        self.connected = True
        n = len(self.waiting)
        _out("   back online" + (f": sending {n} waiting message(s)" if n else ""))
        if n and not self.flushing:
            self.spawn(self.flush())

    # -- what waits for the connection -------------------------------------------------

    def wait_for_connection(self, item: list) -> bool:
        """Keep ``item`` (typed order, kind, to, text or path, id) to send once back
        online; False (and said) when WAITING_MAX wait already."""
        if len(self.waiting) >= self.waiting_max:
            _out(f"!! not sent: {self.waiting_max} message(s) wait for the connection "
                 "already (--waiting-max); type it again once back online")  # fmt: skip
            return False
        self.waiting.append(item)
        self.waiting.sort(key=lambda i: i[0])  # one that was under way goes before later ones
        return True

    def must_wait(self) -> bool:
        """Does what is typed now go behind others (offline, or some still waiting)?"""
        return not self.connected or bool(self.waiting) or self.flushing

    def _reconnecting(self) -> bool:
        return self.client.closed is None and not self.unlinked_self

    async def flush(self) -> None:
        """Back online: send what waited, one after the other, in the order typed."""
        self.flushing = True
        try:
            while self.waiting and self.connected:
                order, kind, to, what, mid = self.waiting.pop(0)
                if kind == "file":
                    sent = await self.send_file(to, what, order=order)
                else:
                    sent = await self.send(to, what, mid=mid, order=order)
                if not sent:  # lost again: the next online() goes on
                    break
        finally:
            self.flushing = False

    # -- incoming ----------------------------------------------------------------

    async def incoming(self) -> None:
        async for ev in self.client:
            group = getattr(ev, "group", None)
            if isinstance(ev, GroupMessage) or (isinstance(ev, IncomingMessage) and group):
                name = self.name(group)
                read = None
                if _user(ev.sender) != _user(self.client.device or ""):  # not a sync copy
                    read = functools.partial(self.read, group, ev.id, _user(ev.sender))
                self.show_body(f"{name}/{_user(ev.sender)}", ev, read=read)
                await self.client.ack(ev.seq)
                if name == group:
                    self.spawn(self.learn_group(group))
            elif isinstance(ev, GroupNotice):
                await self.client.ack(ev.seq)
                self.show_notice(ev)
            elif isinstance(ev, GroupDecryptionFailed):
                await self.client.ack(ev.seq)
                _out(f"!! a message in {self.name(ev.group)} from {_user(ev.sender)} did not "
                     f"decrypt [{ev.id}]: {ev.reason}")  # fmt: skip
            elif isinstance(ev, (IncomingMessage, DecryptedMessage)):
                who = _user(ev.sender)
                to = getattr(ev, "to", None)
                if who == _user(self.client.device or "") and to and ":" not in to:
                    # a copy of what another device of this account sent to ``to``:
                    # shown as sent, and no read receipt (it would go to ourselves)
                    self.show_body(f"{to} (sent from {ev.sender})", ev, arrow="->")
                    await self.client.ack(ev.seq)
                else:
                    self.show_body(who, ev, read=functools.partial(self.read, who, ev.id))
                    await self.client.ack(ev.seq)
            elif isinstance(ev, IncomingReceipt):
                await self.client.ack(ev.seq)
                self._tick(ev)
            elif isinstance(ev, DecryptionFailed):
                await self.client.ack(ev.seq)
                _out(f"!! a message from {_user(ev.sender)} did not decrypt [{ev.id}]: "
                     "asked for it again")  # fmt: skip
            elif isinstance(ev, SafetyNumberChanged):
                _out(f"!! {ev.user}'s keys changed (a new phone, or someone in the middle): "
                     f"/verify {ev.user} and compare the safety number again")  # fmt: skip
                continue
            elif isinstance(ev, KeysChanged):  # the server's notice (PROTOCOL.md 9c)
                await self.client.ack(ev.seq)
                # it comes for a linked or unlinked device too: the alarm only if the
                # primary's key is not the one /verify saw (the server could say anything)
                self.spawn(self.check_keys(ev.sender, notice=True))
            elif isinstance(ev, DevicesChanged):  # queued like a message: acked like one
                await self.client.ack(ev.seq)
                mine = ev.sender == (self.client.device or "").partition(":")[0]
                _out("   your devices changed" if mine else f"   {ev.sender}'s devices changed")
                if not mine:
                    self.spawn(self.check_keys(ev.sender))
            elif isinstance(ev, KeysLow):  # plaintext mode (encrypting, the SDK tops up and acks)
                await self.client.ack(ev.seq)
            elif isinstance(ev, Error):
                if not is_fatal(ev.code):  # a fatal one ends or resumes the session: said then
                    _out(f"!! server: {ev.code} {ev.text}")
                continue
            else:
                continue
            self.save()

    def _tick(self, ev: IncomingReceipt) -> None:
        entry = self.pending.get(ev.id)
        who = ev.sender if address_kind(ev.sender) == "group" else _user(ev.sender)
        if entry is None or entry[0] != who:
            return  # not ours (or sent before the last 1,000): nothing to mark
        if ev.members:  # a group's: which members' devices got it (or read it) now
            tick = "✓✓" if ev.type == "delivered" else ev.type
            entry[1] = tick
            _out(f"   {tick} {ev.id}: {' '.join(ev.members)}")
            return
        if ev.type == "delivered":
            if entry[1] != "✓✓":
                entry[1] = "✓✓"
                _out(f"   ✓✓ {ev.id}")
        else:
            _out(f"   {ev.type} {ev.id}")
            if ev.type == "read":
                del self.pending[ev.id]

    def read(self, who: str, mid: str, participant: str | None = None) -> None:
        """The user has seen message ``mid`` (a file: it is saved): its read receipt."""
        self.spawn(self._read_receipt(who, mid, participant))

    async def _read_receipt(self, who: str, mid: str, participant: str | None = None) -> None:
        try:
            await self.client.receipt(who, mid, "read", timeout=None, participant=participant)
        except (ServerError, ConnectionLost):
            pass  # the sender went away, or so did we: nothing to tell

    def _our_media(self, media) -> bool:
        """Is ``media`` on the host this chat is connected to (its media service)?"""
        return _host_of(media.url) == str(getattr(self.client, "host", "")).strip("[]").lower()

    def show_body(self, who: str, ev, arrow: str = "<-", read=None) -> None:
        """``<- WHO [HH:MM]: ...`` for a message from a person or in a group: its text,
        or the file it links (saved now when it is on this chat's server); ``->``
        for one this account sent from another device.  ``read`` sends its read
        receipt: at once for a text, once saved for a file (the sender's ``read``
        said it was seen when its download had failed)."""
        when = time.strftime("%H:%M", time.localtime(ev.t / 1000))
        media = _media_of(ev)
        if media is None:
            _out(f"{arrow} {who} [{when}]: {_printable(ev.body.decode('utf-8', 'replace'))}")
            if read is not None:
                read()
            return
        what = f"[{ev.type}: {_printable(media.name or media.id)}, {_size(media.size)}]"
        if self._our_media(media):
            _out(f"{arrow} {who} [{when}]: {what} saving…")
            self.spawn(self.save_media(media, read))
        else:
            # not this server's media service: fetching it at once told the
            # sender's web server this user's address and when it is online
            n = self.hold_unsaved(media, read)
            _out(f"{arrow} {who} [{when}]: {what} on another host "
                 f"({_printable(_host_of(media.url))}): not saved; /save {n} fetches it "
                 "from there")  # fmt: skip

    def hold_unsaved(self, media, read=None, n: int | None = None) -> int:
        """Keep ``media`` for ``/save`` (under ``n``, else a new number): its number
        (the oldest of UNSAVED_MAX goes)."""
        if n is None:
            n = self.unsaved_next
            self.unsaved_next += 1
        self.unsaved[n] = (media, read)
        if len(self.unsaved) > UNSAVED_MAX:
            del self.unsaved[min(self.unsaved)]
        return n

    def save_unsaved(self, arg: str) -> None:
        held = self.unsaved.pop(int(arg), None) if arg.isdigit() else None
        if held is None:
            known = ", ".join(map(str, sorted(self.unsaved))) or "none now"
            _out(f"!! /save N: N is the number shown with a file not saved ({known})")
            return
        media, read = held
        _out(f"   fetching {_printable(media.name or media.id)} from "
             f"{_printable(_host_of(media.url))}…")  # fmt: skip
        self.spawn(self.save_media(media, read, int(arg)))

    async def save_media(self, media, read=None, n: int | None = None) -> None:
        """Download ``media`` into --media-dir; then ``read`` (its read receipt).  A
        download that fails is said, kept for ``/save`` (as number ``n`` again), and
        not marked read: the sender sees it delivered, not seen."""
        from pigeon.client.media import MediaError

        folder = self.media_dir
        name = _printable(media.name or media.id)
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            dest = _free_name(folder, media.name or media.id)
            await self.client.download(media, dest)
        except (MediaError, OSError) as exc:
            n = self.hold_unsaved(media, read, n)
            _out(f"!! could not save {name}: {exc}; /save {n} tries again (until then "
                 "the sender does not see it read)")  # fmt: skip
            return
        _out(f"   saved {dest}")
        if read is not None:
            read()

    # -- outgoing --------------------------------------------------------------------

    async def send_file(self, to: str, path: str, order: int | None = None) -> bool:
        """Upload and send the file at ``path``; while reconnecting it waits (``order``:
        its place among what waits).  False when it went (back) to wait."""
        from tqdm import tqdm

        from pigeon.client.media import MediaError

        path = os.path.expanduser(path)
        if os.path.isdir(path):
            _out(f"!! {path} is a directory: /send takes one file (zip a folder first)")
            return True
        if not os.path.isfile(path):
            _out(f"!! no such file: {path}")
            return True
        name = os.path.basename(path)
        if order is None:
            self.typed_count += 1
            order = self.typed_count
            if self.must_wait():
                if self.wait_for_connection([order, "file", to, path, None]):
                    _out(f"-> {self.name(to)}: {name} ({_size(os.path.getsize(path))}) "
                         "(waiting for the connection)")  # fmt: skip
                return True
        start, shown = time.monotonic(), [-1]

        def progress(done: int, total: int) -> None:
            step = done * 4 // max(total, 1)  # a line at 25, 50, 75 and 100 %
            if step > shown[0]:
                shown[0] = step
                meter = tqdm.format_meter(done, total, time.monotonic() - start, unit="B",
                                          unit_scale=True, ascii=True, ncols=60)  # fmt: skip
                _out(f"   {name}: {meter}")

        _out(f"-> {self.name(to)}: sending {name} ({_size(os.path.getsize(path))})")
        try:
            ack, media = await self.client.send_media(to, path, progress=progress)
        except ConnectionLost as exc:
            if self._reconnecting():  # it goes again once back online
                self.waiting.append([order, "file", to, path, None])
                self.waiting.sort(key=lambda i: i[0])
                _out(f"   {name} waits for the connection ({exc})")
                return False
            _out(f"!! {name} not sent: {exc}")
            return True
        except (ServerError, MediaError, OSError) as exc:
            code = f"{exc.code} {exc.text}" if isinstance(exc, ServerError) else str(exc)
            _out(f"!! {name} not sent: {code}")
            return True
        self.pending[ack.id] = [to, "✓"]
        _out(f"   ✓ {ack.id} ({media.mime})")
        if to == self.target:
            self.peer = to
        self.save()
        return True

    async def send(self, to: str, text: str, mid: str | None = None,
                   order: int | None = None) -> bool:  # fmt: skip
        """Send ``text`` (typed now, or ``mid`` that waited for the connection);
        False when it went (back) to wait for the connection."""
        if mid is None:
            mid = self.client.new_id()
            self.typed_count += 1
            order = self.typed_count
            self.pending[mid] = [to, ""]
            while len(self.pending) > PENDING_MAX:
                del self.pending[next(iter(self.pending))]
            if self.must_wait():  # offline, or others wait: behind them, in order
                if self.wait_for_connection([order, "text", to, text, mid]):
                    _out(f"-> {self.name(to)}: {text} [{mid}] (waiting for the connection)")
                else:
                    self.pending.pop(mid, None)
                return True
            _out(f"-> {self.name(to)}: {text} [{mid}]")
        try:
            # no timeout: while reconnecting the SDK may hold it and send it after
            await self.client.send(to, text.encode(), id=mid, timeout=None)
        except ServerError as exc:
            self.pending.pop(mid, None)
            _out(f"!! not sent [{mid}]: {exc.code} {exc.text}")
            if to == self.target and to != self.peer:  # never accepted: not a recipient
                self.target = self.peer
                again = f"talking to {self.peer} again" if self.peer else "type 'PHONE text'"
                _out(f"!! {to} is not a recipient; {again}")
                self.lines.redraw()
            return True
        except ConnectionLost as exc:
            if self._reconnecting():  # (it could not get the keys to encrypt with): kept
                self.waiting.append([order, "text", to, text, mid])
                self.waiting.sort(key=lambda i: i[0])
                _out(f"   [{mid}] waits for the connection ({exc})")
                return False
            self.pending.pop(mid, None)
            _out(f"!! not sent [{mid}]: {exc}")
            return True
        except E2EError as exc:  # no keys, an untrusted device
            self.pending.pop(mid, None)
            _out(f"!! not sent [{mid}]: {exc}")
            return True
        entry = self.pending.get(mid)
        if entry is not None and not entry[1]:
            entry[1] = "✓"
            _out(f"   ✓ {mid}")
        if to == self.target:
            self.peer = to
        self.save()
        return True

    async def typed(self) -> int:
        """Read lines until /quit or the end of input; returns the exit status."""
        while True:
            try:
                line = await self.lines.line()
            except Interrupted:
                return 130
            if line is None:
                return 0
            line = line.strip()
            if not line:
                continue
            if line.startswith("//"):
                self.say(line[1:])
            elif line.startswith("/"):
                if self.command(line) == "quit":
                    return 0
            else:
                first, _, rest = line.partition(" ")
                if _looks_like_a_number(first) and not valid_phone(first):
                    # a typo or "+49..." would go to the chat on screen as text
                    digits = first.lstrip("+")
                    hint = f" (type {digits})" if valid_phone(digits) else ""
                    _out(f"!! not sent: {first!r} is no number pigeon takes: 8-15 digits "
                         f"with the country code, no '+'{hint}; to send the line as text, "
                         "put the recipient's number first")  # fmt: skip
                elif valid_phone(first) and rest.strip():
                    self.target = first
                    self.spawn(self.send(first, rest.strip()))
                elif first in self.groups and rest.strip():
                    self.target = self.groups[first]
                    self.spawn(self.send(self.target, rest.strip()))
                else:
                    self.say(line)

    def say(self, text: str) -> None:
        if self.target is None:
            _out("!! who to? type 'PHONE text' or '/to PHONE' (/help lists the commands)")
        else:
            self.spawn(self.send(self.target, text))

    def command(self, line: str) -> str | None:
        word, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        if word in ("quit", "q"):
            return "quit"
        if word == "help":
            _out(COMMANDS)
        elif word == "to" and not arg:
            _out(f"   talking to {self.target}" if self.target else "   talking to nobody yet")
        elif word == "to":
            if valid_phone(arg):
                self.target = arg
                _out(f"   talking to {arg}")
            elif arg in self.groups:
                self.target = self.groups[arg]
                _out(f"   talking to the group {arg}")
            else:
                _out(f"!! {arg!r} is not a phone number (8-15 digits, no '+')")
        elif word == "group":
            self.group_command(arg)
        elif word == "groups":
            self.spawn(self.list_groups())
        elif word == "link":
            self.spawn(self.link(arg))
        elif word == "devices":
            self.spawn(self.devices())
        elif word == "verify":
            if valid_phone(arg):
                self.spawn(self.verify(arg))
            else:
                _out("!! /verify PHONE: PHONE is a number (8-15 digits, no '+')")
        elif word == "send":
            if not arg:
                _out("!! /send FILE: the path of the file to send")
            elif self.target is None:
                _out("!! who to? '/to PHONE' first")
            else:
                self.spawn(self.send_file(self.target, arg))
        elif word == "save":
            self.save_unsaved(arg)
        elif word == "unlink":
            if arg.isdigit():
                self.spawn(self.unlink(f"{_user(self.client.device or '')}:{int(arg)}"))
            else:
                _out("!! /unlink N: N is a device number, as /devices lists them")
        else:
            _out(f"!! unknown command {line.split()[0]!r}, not sent: /help lists the commands")
        return None

    # -- groups ------------------------------------------------------------------------

    GROUP_USAGE = ("!! /group new NAME PHONE... | add NAME PHONE... | remove NAME PHONE... | "
                   "leave NAME | info NAME | invite NAME | join CODE")  # fmt: skip

    def group_command(self, arg: str) -> None:
        op, *words = arg.split()
        if op == "join" and len(words) == 1:
            self.spawn(self.group_join(words[0]))
            return
        if op not in ("new", "add", "remove", "leave", "info", "invite") or not words:
            _out(self.GROUP_USAGE)
            return
        name, phones = words[0], words[1:]
        bad = [p for p in phones if not valid_phone(p)]
        if bad:
            _out(f"!! not phone numbers (8-15 digits, no '+'): {' '.join(bad)}")
            return
        if op == "new":
            if name in self.groups or valid_phone(name) or name.startswith("/"):
                _out(f"!! {name!r} is taken (or a number): choose another group name")
            else:
                self.spawn(self.group_new(name, phones))
            return
        gid = self.groups.get(name)
        if gid is None:
            _out(f"!! no group called {name!r} (/groups lists them)")
        elif op in ("add", "remove") and not phones:
            _out(f"!! /group {op} NAME PHONE...: who to {op}")
        else:
            self.spawn(self.group_op(op, name, gid, phones))

    async def group_new(self, name: str, phones) -> None:
        self.creating += 1
        try:
            r = await self.client.group_create(name, phones)
        except (ServerError, ConnectionLost) as exc:
            _out(f"!! no group made: {exc}")
            return
        finally:
            self.creating -= 1
        self.made_here.add(r.group)
        self.groups[name] = r.group
        self.save()
        _out(f"   group {name} made ({r.group}); type '{name} text' to write to it")
        self._failed(name, "not added", r.failed)

    def _failed(self, name: str, what: str, failed) -> None:
        for user, code in failed:
            why = GROUP_ERRORS.get(code, f"error {code}")
            _out(f"!! {name}: {user} {what}: {why}")

    async def group_op(self, op: str, name: str, gid: str, phones) -> None:
        c = self.client
        try:
            if op == "info":
                info = await c.group_info(gid)
                admins = set(info.admins)
                members = " ".join(u + ("*" if u in admins else "") for u in info.users)
                mode = ", announcements only" if info.announce else ""
                _out(f"   {name} ({gid}): {_printable(info.subject)}{mode}\n"
                     f"   members (* admin): {members}")  # fmt: skip
                if info.description:
                    _out(f"   {_printable(info.description)}")
            elif op == "invite":
                _out(f"   invite code of {name}: {await c.group_invite(gid)}  "
                     "(others join with /group join CODE)")  # fmt: skip
            elif op == "leave":
                await c.group_leave(gid)
                self.groups.pop(name, None)
                if self.target == gid:
                    self.target = self.peer if self.peer != gid else None
                self.save()
                _out(f"   left {name}")
            else:
                r = await (c.group_add if op == "add" else c.group_remove)(gid, phones)
                done = [p for p in phones if p not in {u for u, _ in r.failed}]
                if done:
                    _out(f"   {name}: {'added' if op == 'add' else 'removed'} {' '.join(done)}")
                self._failed(name, "not added" if op == "add" else "not removed", r.failed)
        except ServerError as exc:
            why = GROUP_ERRORS.get(exc.code, exc.text)
            _out(f"!! /group {op} {name}: {why} ({exc.code} {exc.text})")
        except ConnectionLost as exc:
            _out(f"!! /group {op} {name}: {exc}")

    async def group_join(self, code: str) -> None:
        try:
            r = await self.client.group_join(code)
            if r.get("requested") == "1":
                _out("   asked to join: an admin of the group must approve it")
                return
            info = await self.client.group_info(r.group)
        except ServerError as exc:
            _out(f"!! not joined: {GROUP_ERRORS.get(exc.code, exc.text)} ({exc.code} {exc.text})")
            return
        except ConnectionLost as exc:
            _out(f"!! not joined: {exc}")
            return
        _out(f"   joined {self.name_group(r.group, info.subject)} ({r.group})")

    async def list_groups(self) -> None:
        try:
            items = await self.client.groups()
        except (ServerError, ConnectionLost) as exc:
            _out(f"!! no group list: {exc}")
            return
        if not items:
            _out("   no groups yet: /group new NAME PHONE...")
            return
        # the subject only where it is not the name: "team  (g:1): team" said it twice
        lines = [f"   your groups ({len(items)}); 'NAME text' writes to one:"]
        for gid, subject, _t in items:
            name, shown = self.name_group(gid, subject), _printable(subject)
            lines.append(f"   {name}  ({gid})" + ("" if shown == name else f", subject {shown!r}"))
        _out("\n".join(lines))

    async def learn_group(self, gid: str) -> None:
        """A notice or message from a group this chat has no name for: name it."""
        try:
            info = await self.client.group_info(gid)
        except (ServerError, ConnectionLost):
            return  # not a member (any more): it keeps its address as name
        name = self.name_group(gid, info.subject)
        _out(f"   you are in the group {name} ({gid}): type '{name} text' to write to it")

    def show_notice(self, ev: GroupNotice) -> None:
        me = _user(self.client.device or "")
        if ev.op == "create" and ev.by == me and (self.creating or ev.group in self.made_here):
            # this chat's /group new, whose answer says it ("group NAME made"): the
            # notice (often first, under the bare address) and a "you are in the
            # group" line made three lines of one thing
            return
        name = self.name(ev.group)
        who = " ".join(ev.members)
        what = {
            "create": f"{ev.by} made the group" + (f" with {who}" if who else ""),
            "add": f"{ev.by} added {who}",
            "remove": f"{ev.by} removed {who}",
            "leave": f"{who or ev.by} left",
            "promote": f"{ev.by} made {who} admin",
            "demote": f"{ev.by} made {who} a member (no longer admin)",
            "subject": f"{ev.by} changed the subject to {_printable(ev.get('subject') or '')!r}",
            "description": f"{ev.by} changed the description",
            "settings": f"{ev.by} changed the settings",
            "join": f"{who or ev.by} joined by invite link",
            "revoke": f"{ev.by} revoked the invite link",
        }.get(ev.op, f"{ev.by}: {ev.op} {who}")
        _out(f"** {name}: {what}")
        out = ev.op in ("remove", "leave") and me in (ev.members or (ev.by,))
        if out:
            if self.target == ev.group:
                self.target = self.peer if self.peer != ev.group else None
        elif name == ev.group:
            self.spawn(self.learn_group(ev.group))

    # -- linked devices ----------------------------------------------------------------

    async def link(self, arg: str) -> None:
        code = None if arg.upper().startswith("PGN1,") else normalize_link_code(arg)
        if code is None and not arg.upper().startswith("PGN1,"):
            _out("!! /link takes the text under the new device's QR code (PGN1,...) or "
                 "its 8-character code (ABCD-2345), from 'pigeon chat link' there")  # fmt: skip
            return
        try:
            if code is None:
                device = await self.client.link(arg)
            else:
                device = await self.client.link_code(code)
        except ValueError as exc:  # a malformed QR text, or no identity key to sign with
            _out(f"!! not linked: {exc}")
        except ServerError as exc:
            _out(f"!! not linked: {_link_error(exc)}")
        except ConnectionLost as exc:
            _out(f"!! not linked: {exc}")
        else:
            _out(f"   linked {device}: it logs in by itself now")

    async def devices(self) -> None:
        me = self.client.device or ""
        try:
            items = await self.client.devices(_user(me))
        except (ServerError, ConnectionLost) as exc:
            _out(f"!! no device list: {exc}")
            return
        lines = [f"   devices of {_user(me)}:"]
        for d in items:
            n = d.device.partition(":")[2]
            name = "primary" if d.name is None and d is items[0] else (d.name or "")
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(d.t / 1000))
            mark = "  (this device)" if d.device == me else ""
            lines.append(f"   {n:>3}  {_printable(name)[:40]:<40} linked {when}{mark}")
        _out("\n".join(lines))

    async def _primary_key(self, user: str, fresh: bool = False) -> bytes | None:
        items = await self.client.devices(user, fresh=fresh)
        return bytes(items[0].key) if items else None

    async def verify(self, phone: str) -> None:
        """Show the safety number with ``phone`` and remember the key it was made from,
        so a later change of ``phone``'s keys is warned about."""
        me = _user(self.client.device or "")
        try:
            mine, theirs = await self._primary_key(me), await self._primary_key(phone)
        except (ServerError, ConnectionLost) as exc:
            _out(f"!! no safety number: {exc}")
            return
        if mine is None or theirs is None:
            _out(f"!! no safety number: {phone} has no devices")
            return
        number = format_safety_number(safety_number(me, mine, phone, theirs))
        qr = safety_qr(me, mine, phone, theirs)
        _out(f"   safety number with {phone}:\n   {number}\n   QR: {qr}\n"
             f"   the same on both phones: no one is in the middle")  # fmt: skip
        self.profile.setdefault("keys", {})[phone] = theirs.hex()
        self.save()

    async def check_keys(self, user: str, notice: bool = False) -> None:
        """After a device-list notice: warn if ``user``'s primary key is not the one
        seen.  ``notice``: the server said the keys changed; with no key seen (no
        /verify yet) that is said plainly, not as an alarm: linking a device
        sends it too, and the SDK itself tells when an encrypted peer's identity
        key changes."""
        seen = (self.profile.get("keys") or {}).get(user)
        if seen is None:
            if notice:
                _out(f"   {user}'s devices or keys changed: /verify {user} shows the safety "
                     "number to compare")  # fmt: skip
            return
        try:
            key = await self._primary_key(user, fresh=True)
        except (ServerError, ConnectionLost):
            return
        if key is not None and key.hex() != seen:
            _out(f"!! {user}'s keys changed (a new phone, or someone in the middle): "
                 f"/verify {user} and compare the safety number again")  # fmt: skip
            self.profile["keys"][user] = key.hex()
            self.save()

    async def unlink(self, device: str) -> None:
        try:
            await self.client.unlink(device)
        except ServerError as exc:
            why = LINK_ERRORS.get(exc.code, exc.text)
            _out(f"!! not unlinked: {why} ({exc.code} {exc.text})")
        except ConnectionLost as exc:
            _out(f"!! not unlinked: {exc}")
        else:
            if device == self.client.device:
                self.unlinked_self = True
            _out(f"   unlinked {device}")

    async def finish(self, timeout: float) -> None:
        """Before leaving: let messages and read receipts under way get their acks."""
        if self.waiting:
            _out(f"!! leaving with {len(self.waiting)} message(s) not sent: they waited for "
                 "the connection, and are not kept")  # fmt: skip
            for item in self.waiting:
                self.pending.pop(item[4], None)  # (no ticks will come for them)
            self.waiting.clear()
        if self.tasks:
            _, late = await asyncio.wait(set(self.tasks), timeout=timeout)
            if late:
                _out(f"!! leaving with {len(late)} message(s) or receipt(s) not yet accepted")
                for task in late:
                    task.cancel()


def _looks_like_a_number(word: str) -> bool:
    """A phone number was meant: '+' and digits, or six digits or more (not "100
    thanks": a line may start with a small number)."""
    plus = word.startswith("+")
    digits = word[1:] if plus else word
    return digits.isascii() and digits.isdigit() and len(digits) >= (3 if plus else 6)


def _ended(why: Exception | None) -> str:
    """What to tell the user when the server ends the session for good."""
    if isinstance(why, ServerError):
        said = f"{why.code} {why.text}"
        if why.code == ErrorCode.REPLACED:
            return f"the session ended ({said}): this device logged in somewhere else"
        if why.code == ErrorCode.REVOKED and "unlinked" in why.text:
            return f"{said}: link it again with 'pigeon chat link'"
        if why.code == ErrorCode.REVOKED:
            return (
                f"the server ended the session ({said}); ask its operator, or register "
                "again with 'pigeon chat register PHONE'"
            )
        if why.code == ErrorCode.NOT_AUTHORIZED:
            return (
                f"login refused ({said}); if this device was unlinked, link it again with "
                "'pigeon chat link' (registering would replace the account's phone); if it "
                "was the phone and was replaced or removed, register again with "
                "'pigeon chat register PHONE'"
            )
        return f"the server ended the session ({said})"
    return f"disconnected: {why}"


async def chat(args) -> int:
    profile = load_profile(args.profile)
    if args.server_given is None:
        args.server = profile.get("server", args.server)
    creds = Credentials.from_json(profile)
    client = await _connect(args)
    # deliveries shown (and acked) in earlier runs: a redelivery is dropped and acked again
    client.core.last_seq = client.core.acked_seq = profile.get("last_seq", 0)
    try:
        await client.login(creds)
    except ServerError as exc:
        await client.close()
        raise ChatError(_ended(exc)) from None
    with _terminal():
        session = Chat(client, profile, args.profile)
        session.media_dir = os.path.expanduser(args.media_dir)
        session.waiting_max = args.waiting_max
        client.on_disconnect, client.on_reconnect = session.offline, session.online
        _out(f"logged in as {creds.device} on {args.server}; /help lists the commands")
        loop = asyncio.get_running_loop()
        reader = loop.create_task(session.incoming())
        typer = loop.create_task(session.typed())
        try:
            await asyncio.wait({reader, typer}, return_when=asyncio.FIRST_COMPLETED)
            if typer.done():
                status = typer.result()
                await session.finish(args.timeout)
            else:  # the server ended the session for good
                session.lines.stop()  # the line editor puts the terminal back
                await asyncio.wait({typer}, timeout=2)
                status = None
        finally:
            for task in (reader, typer, *session.tasks):
                task.cancel()
            await asyncio.gather(reader, typer, *session.tasks, return_exceptions=True)
            session.save()
            await client.close()
    if status is None and session.unlinked_self:
        raise ChatError(f"{creds.device} was unlinked here: link it again with 'pigeon chat link'")
    if status is None:
        raise ChatError(_ended(client.closed))
    return status


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not (seconds >= 0 and math.isfinite(seconds)):
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {value!r}")
    return seconds


def _count(value: str) -> int:
    if not (value.isascii() and value.isdigit()):
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {value!r}")
    return int(value)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "chat",
        help="terminal chat client",
        description="A terminal chat client. 'pigeon chat register PHONE' registers this "
        "terminal as a device; 'pigeon chat' logs in with it and chats: type 'PHONE text' to "
        "send, /help in the chat lists the commands.",
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
    p.add_argument("--plaintext", action="store_true",
                   help="send bodies unencrypted (protocol tests and benchmarks only; "
                   "the default is end-to-end encryption)")  # fmt: skip
    p.add_argument("--media-dir", default=DEFAULT_MEDIA_DIR,
                   help=f"where received files are saved (default: {DEFAULT_MEDIA_DIR})")  # fmt: skip
    p.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="connect timeout, and how long leaving waits for messages under way (default: 10)",
    )
    p.add_argument(
        "--keepalive",
        type=_seconds,
        default=DEFAULT_KEEPALIVE,
        metavar="SECONDS",
        help="ping after this many seconds without sending (keeps an idle chat connected; "
        f"under the server's idle-timeout); 0 = never (default: {DEFAULT_KEEPALIVE:g})",
    )
    p.add_argument(
        "--waiting-max",
        type=_count,
        default=WAITING_MAX,
        metavar="N",
        help="messages and files typed while reconnecting that wait to go out once back "
        f"online; more are refused (default: {WAITING_MAX})",
    )
    csub = p.add_subparsers(dest="chat_command", metavar="ACTION")
    r = csub.add_parser("register", help="register this terminal as a device of PHONE")
    r.add_argument("phone", help="E.164 digits without '+', e.g. 491701234567")
    r.add_argument("--voice", action="store_true", help="ask for a voice call instead of SMS")
    r.add_argument("--force", action="store_true",
                   help="register even if --profile holds a device already: that profile and its "
                   "keys are renamed to PROFILE.replaced-DATE (default: refuse)")  # fmt: skip
    lk = csub.add_parser(
        "link",
        help="link this terminal to an account as one more device (shows a QR code)",
        description="Link this terminal to an account: shows a QR code (and its text) for "
        "the account's primary to scan or type ('/link TEXT' in its chat); with --code "
        "PHONE, an 8-character code to type there instead.  Use its own --profile.",
    )
    lk.add_argument("--code", dest="phone", metavar="PHONE",
                    help="link by a code typed on the primary of PHONE instead of a QR code")  # fmt: skip
    lk.add_argument("--name", help="how the account's device lists name this device "
                    "(default: 'chat on HOSTNAME')")  # fmt: skip
    p.set_defaults(func=run)


def run(args) -> int:
    args.server = args.server_given or "127.0.0.1:7650"
    import uvloop

    try:
        if args.chat_command == "register":
            return uvloop.run(register(args))
        if args.chat_command == "link":
            return uvloop.run(link(args))
        return uvloop.run(chat(args))
    except ChatError as exc:
        print(f"pigeon chat: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Interrupted):  # (Ctrl-C at a prompt: Interrupted)
        if args.chat_command == "link":
            print("pigeon chat: interrupted: nothing linked", file=sys.stderr)
        elif args.chat_command == "register":
            print("pigeon chat: interrupted: nothing registered", file=sys.stderr)
        return 130
