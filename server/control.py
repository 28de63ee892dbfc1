"""The control socket: how `pigeon admin` reaches a running server.

``DATA_DIR/control.sock`` is a Unix stream socket, mode 0600, so only the
server's user (or root) can use it.  One request per connection: a JSON
object on one line in, one JSON line out, ``{"ok": true, ...}`` or
``{"ok": false, "error": "..."}``.  The one request today:

    {"op": "kick", "device": "PHONE:N", "code": 304, "text": "why"}

closes that device's sessions on every worker with error ``code`` (one of
KICK_CODES) and ``text`` (optional, at most MAX_TEXT characters).  A request
is checked whole before it is acknowledged: an answer ``ok`` means every
worker was told something it will act on.

The supervisor serves the socket from its selector loop, so it never waits
for a client: accepted connections are non-blocking, read as data comes,
and closed ``control-timeout`` seconds after they were accepted if no whole
line came by then; at most ``control-connections`` are held at once.

A Unix socket's name must fit ``sun_path`` (108 bytes on Linux, 104 on
FreeBSD), and a data directory can be longer than that.  A path too long
is bound and connected to by its last part from inside its directory
(``at_short_path``): the socket stays where `pigeon admin` looks for it,
whatever the data directory's length.
"""

from __future__ import annotations

import os
import socket

import orjson

from pigeon.core.errors import ErrorCode
from pigeon.core.node import address_kind

CONTROL_SOCKET = "control.sock"
MAX_LINE = 4096
MAX_TEXT = 200
#: Close codes an operator may send: the session ends and the client knows why.
KICK_CODES = frozenset({ErrorCode.REPLACED, ErrorCode.REVOKED, ErrorCode.SHUTTING_DOWN})
#: Paths up to this many bytes are used as they are (sun_path less its NUL, with a margin).
SHORT_PATH = 100


class ControlError(Exception):
    """A request the server refuses; the message says what is wrong with it."""


def socket_path(data_dir: str) -> str:
    return os.path.join(data_dir, CONTROL_SOCKET)


def at_short_path(path: str, op):
    """``op(name)`` with a name for ``path`` that fits a Unix socket address.

    A short path is passed as it is.  A long one is passed as its last part,
    with the working directory changed to its directory for the call and
    changed back after it: the process's working directory is shared, so
    call this only while no other thread uses relative paths (the
    supervisor does it before its metrics thread starts).
    """
    if len(os.fsencode(path)) <= SHORT_PATH:
        return op(path)
    directory, name = os.path.split(path)
    try:
        back = os.open(".", os.O_RDONLY)
    except OSError:  # an unreadable working directory: go back by name
        back = os.getcwd()
    try:
        os.chdir(directory or ".")
        return op(name)
    finally:
        if isinstance(back, int):
            os.fchdir(back)
            os.close(back)
        else:
            os.chdir(back)


def server_answers(data_dir: str) -> bool:
    """Is a server running on ``data_dir``: does its control socket take a connection?

    A socket file no one listens on (left by a server that was killed) is
    not one; neither is a missing file.  Nothing is sent: the server closes
    a connection that sends no line (``ControlConn.read``).
    """
    path = socket_path(data_dir)
    if not os.path.exists(path):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(5)  # a server too busy to accept in 5 s is still one
        try:
            at_short_path(path, probe.connect)
        except (ConnectionRefusedError, FileNotFoundError):
            return False  # a stale socket of a server that is gone
        except OSError:  # EACCES, a timeout...: there may be one; do not guess
            return True
    return True


def parse_request(line: bytes) -> dict:
    """The checked request of one line; ControlError says what is wrong."""
    try:
        req = orjson.loads(line)
    except orjson.JSONDecodeError:
        raise ControlError("not a JSON line") from None
    if not isinstance(req, dict):
        raise ControlError("a request is a JSON object")
    if req.get("op") != "kick":
        raise ControlError(f"unknown op {req.get('op')!r} (known: kick)")
    unknown = set(req) - {"op", "device", "code", "text"}
    if unknown:
        raise ControlError(f"unknown field(s) for kick: {', '.join(sorted(unknown))}")
    device = req.get("device")
    if not isinstance(device, str) or address_kind(device) != "device":
        raise ControlError(f"device must be a device address PHONE:N, got {device!r}")
    code = req.get("code")
    allowed = ", ".join(str(int(c)) for c in sorted(KICK_CODES))
    if type(code) is not int or code not in KICK_CODES:
        raise ControlError(f"code must be one of {allowed} (a number), got {code!r}")
    text = req.get("text")
    if text is not None and (not isinstance(text, str) or len(text) > MAX_TEXT):
        raise ControlError(f"text must be a string of at most {MAX_TEXT} characters")
    return {"op": "kick", "device": device, "code": code, "text": text or None}


def request(data_dir: str, req: dict, timeout: float = 10.0) -> dict:
    """Send one request to the server running on ``data_dir``; its answer.

    OSError (FileNotFoundError, ConnectionRefusedError: no server) when it
    cannot be reached; ``{"ok": False, ...}`` when it refuses.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        at_short_path(socket_path(data_dir), s.connect)
        s.sendall(orjson.dumps(req) + b"\n")
        data = b""
        while not data.endswith(b"\n") and len(data) < MAX_LINE:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    try:
        reply = orjson.loads(data)
    except orjson.JSONDecodeError:
        reply = None
    if not isinstance(reply, dict):
        return {"ok": False, "error": "no answer" if not data else "an answer that is not JSON"}
    return reply


class ControlConn:
    """One accepted control connection: its buffered bytes and its deadline."""

    __slots__ = ("sock", "buf", "deadline")

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock = sock
        self.buf = b""
        self.deadline = deadline

    def read(self) -> bytes | None:
        """Take what arrived; the request line once whole, else None.

        ControlError for a line that is too long or a client that went away
        before finishing it (the caller then answers and closes).
        """
        try:
            chunk = self.sock.recv(MAX_LINE)
        except BlockingIOError:
            return None
        except OSError:
            chunk = b""
        if not chunk:
            raise ControlError("connection closed before a whole line")
        self.buf += chunk
        line, nl, _ = self.buf.partition(b"\n")
        if nl:
            return line
        if len(self.buf) >= MAX_LINE:
            raise ControlError(f"request too long (a line of at most {MAX_LINE} bytes)")
        return None

    def answer(self, reply: dict) -> None:
        """Send the answer if the socket takes it now (it is small) and close."""
        try:
            self.sock.send(orjson.dumps(reply) + b"\n")
        except OSError:
            pass  # the client is not reading or is gone: nothing to wait for
        self.sock.close()
