"""The load floor: a trivial in-memory router for ``pigeon bench latency --floor``.

A latency figure measured with a Python load generator includes the load
generator: its send schedule, its SDK encoding and decoding, its event
loop's queueing before a delivery is time-stamped.  To say how much of a
figure is pigeon's, the bench runs the *same* load (same clients, rate,
load processes) against this server, which does the least any server can:
the reported latencies of that run are the load tool's own floor, and
what pigeon adds is the difference.

Theory of operation.  One process, one uvloop loop, no store, no workers.
Each TCP connection drives the project's sans-IO ``Connection`` (server
role, with the selected codec), so the preamble, framing, tokens and
state machine are exactly the protocol's; the handlers are minimal:

- login: a real SCRAM-SHA-256 exchange (scramp, as the server), so the
  SDK's check of the server's proof passes; the keys are derived from the
  secrets in the credentials file (``--creds``, from ``pigeon admin
  provision``), once per device, the first time it logs in;
- ``message`` to a user: the ``ack`` to the sender at once (nothing is
  made durable) and the delivery, stamped with a per-user sequence, to the
  connection of the recipient's last logged-in device (kept in memory for
  a recipient that is not connected, until it logs in);
- the device ``ack``: every delivery up to that sequence is done; for a
  message, a ``delivered`` receipt goes to its sender (what pigeon does),
  so the load processes do the same work as against the real server
  (``--no-receipts``: none, the floor of ``pigeon bench throughput
  --no-receipts``, whose server sends none either); acks of receipts are
  swallowed;
- ``ping`` gets its ``pong``; any other request an error 201, "not in the
  floor server".

Output is batched like the real server's: frames are appended to a
per-connection buffer and every connection with output is written once
at the end of the loop tick (``call_soon``), one ``write`` each.

Its own CPU per message is reported (``server_cpu_us_per_msg`` of the
floor run) so a reader sees how little of the floor is this server.  It
is a measuring instrument, not a server: nothing is durable, nothing is
limited, and it listens on loopback only by default.

    python -m pigeon.bench.floor --creds creds.jsonl --listen 127.0.0.1:0

prints ``floor: serving on HOST:PORT`` once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import signal
import sys
import time

from scramp import ScramException, ScramMechanism

from pigeon.core.connection import NEED_DATA, Connection, Role, State
from pigeon.core.errors import ErrorCode, RemoteProtocolError
from pigeon.core.events import (
    AuthChallenge,
    AuthResponse,
    AuthStart,
    AuthSuccess,
    ConnectionClosed,
    DeviceAck,
    Error,
    Hello,
    IncomingMessage,
    IncomingReceipt,
    Message,
    Ping,
    Pong,
    ServerAck,
)

MECHANISM = ScramMechanism("SCRAM-SHA-256")
#: The iteration count the provisioned devices were made with (server/provision.py).
ITERATIONS = 4096


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class User:
    """A user's delivery state: its sequence, the deliveries not yet acked, its connection."""

    __slots__ = ("phone", "seq", "outstanding", "session", "waiting")

    def __init__(self, phone: str):
        self.phone = phone
        self.seq = 0
        #: (seq, sender User or None for a receipt, message id), oldest first
        self.outstanding: collections.deque = collections.deque()
        self.session: Session | None = None
        #: deliveries made while no device of the user was connected
        self.waiting: list = []


class Floor:
    """The router: users by phone, device secrets, connections with output this tick."""

    def __init__(self, creds: list[dict], receipts: bool = True):
        self.receipts = receipts
        self.secrets = {c["device"]: c["secret"] for c in creds}
        self.users: dict[str, User] = {}
        self._auth: dict[str, tuple] = {}
        self.dirty: set[Session] = set()
        self._flush_scheduled = False

    def user(self, phone: str) -> User:
        u = self.users.get(phone)
        if u is None:
            u = self.users[phone] = User(phone)
        return u

    def auth_info(self, device: str) -> tuple:
        info = self._auth.get(device)
        if info is None:
            # an unknown device gets random keys: its proof cannot match
            password = self.secrets.get(device) or os.urandom(32).hex()
            info = MECHANISM.make_auth_info(password, iteration_count=ITERATIONS)
            if device in self.secrets:
                self._auth[device] = info
        return info

    def send_to(self, to: User, event) -> None:
        """Push ``event`` to the user's connection, or keep it until the user logs in."""
        if to.session is not None:
            to.session.push(event)
        else:
            to.waiting.append(event)

    def mark(self, session: Session) -> None:
        self.dirty.add(session)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """One write per connection with output, at the end of the tick."""
        self._flush_scheduled = False
        dirty, self.dirty = self.dirty, set()
        for s in dirty:
            s.write_out()


class Session(asyncio.Protocol):
    """One client connection: the sans-IO Connection and the minimal handlers."""

    def __init__(self, floor: Floor):
        self.floor = floor
        self.conn = Connection(Role.SERVER)
        self.out = bytearray()
        self.transport: asyncio.Transport | None = None
        self.scram = None
        self.user: User | None = None
        self.device = ""
        self.closing = False

    # -- transport --------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.conn.initiate())

    def connection_lost(self, exc) -> None:
        self.closing = True
        self.floor.dirty.discard(self)
        if self.user is not None and self.user.session is self:
            self.user.session = None

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        conn.receive_data(data)
        while not self.closing:
            try:
                ev = conn.next_event()
            except RemoteProtocolError as err:
                self.error(err.code, err.text, err.request_id)
                if conn.state is State.ERROR or err.fatal:
                    self.close()
                continue
            if ev is NEED_DATA:
                break
            self.handle(ev)

    def eof_received(self):
        self.close()
        return False

    def push(self, event) -> None:
        self.conn.send_into(self.out, event)
        self.floor.mark(self)

    def write_out(self) -> None:
        if self.out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.out)
        self.out = bytearray()
        if self.closing and self.transport is not None:
            self.transport.close()

    def error(self, code: int, text: str, rid: str | None = None) -> None:
        self.push(Error(int(code), text, rid))

    def close(self) -> None:
        self.closing = True
        self.floor.mark(self)  # what is buffered goes out first, then the close

    # -- the protocol -------------------------------------------------------------

    def handle(self, ev) -> None:
        t = type(ev)
        if t is Message:
            self.message(ev)
        elif t is DeviceAck:
            self.ack(ev.seq)
        elif t is Ping:
            self.push(Pong(ev.id))
        elif t is AuthStart:
            self.scram = MECHANISM.make_server(self.auth_info)
            try:
                self.scram.set_client_first(ev.data.decode("ascii"))
            except (ScramException, UnicodeDecodeError) as exc:
                return self.refuse(str(exc))
            self.push(AuthChallenge(self.scram.get_server_first().encode()))
        elif t is AuthResponse:
            try:
                self.scram.set_client_final(ev.data.decode("ascii"))
            except (ScramException, UnicodeDecodeError):
                return self.refuse("login failed")
            self.push(AuthSuccess(self.scram.get_server_final().encode(), now_ms()))
            self.login(self.floor.user(self.device.partition(":")[0]))
        elif t is ConnectionClosed:
            self.close()
        elif t is Hello or t is Error:
            pass
        else:
            self.error(ErrorCode.UNKNOWN_NODE, f"<{ev.TAG}> is not in the floor server",
                       getattr(ev, "id", None))  # fmt: skip

    def auth_info(self, device: str) -> tuple:
        self.device = device  # scramp calls this with the client-first's username
        return self.floor.auth_info(device)

    def refuse(self, why: str) -> None:
        self.error(ErrorCode.NOT_AUTHORIZED, why)
        self.close()

    def login(self, user: User) -> None:
        old = user.session
        if old is not None and old is not self:
            old.close()
        user.session = self
        self.user = user
        for ev in user.waiting:
            self.push(ev)
        user.waiting.clear()

    def message(self, m: Message) -> None:
        t = now_ms()
        self.push(ServerAck(m.id, t))
        to = self.floor.user(m.to)
        to.seq += 1
        self.floor.send_to(to, IncomingMessage(self.device, m.id, m.type, t, to.seq, m.body))
        to.outstanding.append((to.seq, self.user, m.id))

    def ack(self, upto: int) -> None:
        me = self.user
        out = me.outstanding
        while out and out[0][0] <= upto:
            _, sender, mid = out.popleft()
            if sender is not None and self.floor.receipts:  # a message: its delivered receipt
                sender.seq += 1
                self.floor.send_to(
                    sender, IncomingReceipt(me.phone, mid, "delivered", now_ms(), sender.seq)
                )
                sender.outstanding.append((sender.seq, None, mid))


def write_credentials(count: int, path: str, prefix: str = "999") -> list[dict]:
    """Credentials for ``count`` devices only the floor knows (``pigeon bench floor``
    without ``--creds``): the shape of ``pigeon admin provision``'s, mode 0600."""
    import orjson

    from pigeon.server.provision import phone_number

    width = 12 - len(prefix)
    creds = []
    for i in range(count):
        phone = phone_number(prefix, i, width)
        creds.append({"phone": phone, "device": f"{phone}:0", "secret": os.urandom(32).hex()})
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.writelines(orjson.dumps(c) + b"\n" for c in creds)
    return creds


async def serve(host: str, port: int, creds: list[dict], receipts: bool = True) -> None:
    loop = asyncio.get_running_loop()
    floor = Floor(creds, receipts)
    server = await loop.create_server(lambda: Session(floor), host, port, backlog=4096)
    bound = server.sockets[0].getsockname()
    print(f"floor: serving on {bound[0]}:{bound[1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="pigeon-bench-floor",
        description="The load floor: a trivial in-memory router (see the module's doc).",
    )
    p.add_argument("--creds", required=True, help="credentials from pigeon admin provision")
    p.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT",
                   help="where to listen (port 0: any free one, printed when ready)")  # fmt: skip
    p.add_argument("--no-receipts", action="store_true",
                   help="send no delivered receipts (the floor of a --no-receipts bench)")  # fmt: skip
    args = p.parse_args(argv)
    from pigeon.server.provision import load_credentials

    from .load import raise_open_files

    creds = load_credentials(args.creds)
    raise_open_files(len(creds) + 64)
    host, _, port = args.listen.rpartition(":")
    import uvloop

    uvloop.run(serve(host, int(port), creds, receipts=not args.no_receipts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
