"""The asyncio client: a thin driver of the sans-IO ``pigeon.core.Connection``.

    client = await Client.connect("127.0.0.1", 7650)
    ttl = await client.register("491701234567")          # a code goes out by SMS
    creds = await client.verify("491701234567", code, identity_key)
    await client.login(creds)
    ack = await client.send("4915112345678", ciphertext)  # returns at one tick
    async for event in client:                            # IncomingMessage, IncomingReceipt, ...
        ...
        await client.ack(event.seq)

One reader task feeds received bytes to the Connection; answers to requests
(``code``, ``registered``, ``ack``, errors with an id) resolve the waiting
call; everything else comes out of the async iterator.  Deliveries are
at-least-once on the wire: the client remembers the highest sequence it has
handed out and drops anything at or below it, so the application sees each
message once.  ``send`` raises ``ServerError`` (with the protocol error code)
when the server refuses the message.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import ssl as _ssl
from dataclasses import dataclass

from scramp import ScramClient

from pigeon.core.connection import NEED_DATA, Connection, Role
from pigeon.core.errors import ErrorCode, RemoteProtocolError
from pigeon.core.events import (
    AuthChallenge,
    AuthResponse,
    AuthStart,
    AuthSuccess,
    CodeSent,
    ConnectionClosed,
    DeviceAck,
    Error,
    Hello,
    IncomingMessage,
    IncomingReceipt,
    Message,
    Ping,
    Pong,
    Receipt,
    Register,
    Registered,
    ServerAck,
    Verify,
)


@dataclass(frozen=True)
class Credentials:
    """What a device needs to log in: its address and its 32-byte secret."""

    device: str
    secret: bytes


class ServerError(Exception):
    """The server answered with an error node."""

    def __init__(self, code: int, text: str, request_id: str | None = None):
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text
        self.request_id = request_id

    @property
    def name(self) -> str:
        try:
            return ErrorCode(self.code).name
        except ValueError:
            return str(self.code)


class ConnectionLost(Exception):
    """The connection closed before the answer came."""


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader = reader
        self._writer = writer
        self.conn = Connection(Role.CLIENT)
        self._out = bytearray(self.conn.initiate())
        self._waiting: dict[tuple[str, str], asyncio.Future] = {}
        self._auth_step: asyncio.Future | None = None
        self._events: asyncio.Queue = asyncio.Queue()
        self._ids = itertools.count(1)
        self._prefix = os.urandom(4).hex()
        #: highest delivery sequence handed to the application
        self.last_seq = 0
        self.redelivered = 0
        self.closed: Exception | None = None
        self.device: str | None = None
        self.server_hello: Hello | None = None
        self._flush_scheduled = False
        self._task = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        ssl: _ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        timeout: float = 10.0,
    ) -> Client:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ssl, server_hostname=server_hostname), timeout
        )
        client = cls(reader, writer)
        client._flush()
        return client

    def new_id(self) -> str:
        return f"{self._prefix}{next(self._ids):x}"

    # -- output -------------------------------------------------------------

    def _send(self, event) -> None:
        if self.closed is not None:
            raise ConnectionLost(str(self.closed))
        self.conn.send_into(self._out, event)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and not self._writer.is_closing():
            out, self._out = self._out, bytearray()
            self._writer.write(out)

    async def _request(self, event, kind: str, key: str, timeout: float):
        fut = asyncio.get_running_loop().create_future()
        self._waiting[(kind, key)] = fut
        try:
            self._send(event)
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._waiting.pop((kind, key), None)

    # -- registration and login ---------------------------------------------

    async def register(self, phone: str, method: str = "sms", timeout: float = 30.0) -> int:
        """Ask for a one-time code; returns how many seconds it stays valid."""
        rid = self.new_id()
        ev = await self._request(Register(rid, phone, method), "req", rid, timeout)
        return ev.ttl

    async def verify(
        self, phone: str, code: str, identity_key: bytes, timeout: float = 30.0
    ) -> Credentials:
        rid = self.new_id()
        ev = await self._request(Verify(rid, phone, code, identity_key), "req", rid, timeout)
        return Credentials(ev.device, ev.secret)

    async def login(self, creds: Credentials, timeout: float = 30.0) -> int:
        """SCRAM-SHA-256 login; checks the server's signature. Returns the server time (ms)."""
        scram = ScramClient(["SCRAM-SHA-256"], creds.device, creds.secret.hex())
        loop = asyncio.get_running_loop()
        self._auth_step = loop.create_future()
        self._send(AuthStart(scram.get_client_first().encode()))
        challenge = await asyncio.wait_for(self._auth_step, timeout)
        scram.set_server_first(challenge.data.decode("ascii"))
        self._auth_step = loop.create_future()
        self._send(AuthResponse(scram.get_client_final().encode()))
        success = await asyncio.wait_for(self._auth_step, timeout)
        self._auth_step = None
        scram.set_server_final(success.data.decode("ascii"))  # raises if the server is not genuine
        self.device = creds.device
        return success.t

    # -- messaging ------------------------------------------------------------

    async def send(
        self, to: str, body: bytes, type: str = "text", id: str | None = None, timeout: float = 30.0
    ) -> ServerAck:
        """Send and wait for the server's ack (one tick); raises ServerError if refused.

        Retrying with the same ``id`` after a lost connection is safe.
        """
        mid = id or self.new_id()
        return await self._request(Message(to, mid, type, body), "message", mid, timeout)

    async def receipt(
        self, to: str, id: str, type: str = "read", timeout: float = 30.0
    ) -> ServerAck:
        return await self._request(Receipt(to, id, type), "receipt", id, timeout)

    async def ack(self, seq: int) -> None:
        """Acknowledge every delivery up to and including ``seq``."""
        self._send(DeviceAck(seq))

    async def ping(self, timeout: float = 30.0) -> None:
        pid = self.new_id()
        await self._request(Ping(pid), "pong", pid, timeout)

    def __aiter__(self):
        return self

    async def __anext__(self):
        ev = await self._events.get()
        if isinstance(ev, Exception):
            self._events.put_nowait(ev)  # every later call ends too
            raise StopAsyncIteration
        return ev

    async def next_event(self, timeout: float | None = None):
        """The next incoming event (or raise TimeoutError / ConnectionLost)."""
        ev = await asyncio.wait_for(self._events.get(), timeout)
        if isinstance(ev, Exception):
            self._events.put_nowait(ev)
            raise ConnectionLost(str(ev))
        return ev

    async def close(self) -> None:
        self._flush()
        if not self._writer.is_closing():
            self._writer.close()
        try:
            await self._writer.wait_closed()
        except (ConnectionError, _ssl.SSLError):
            pass
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    # -- input ------------------------------------------------------------------

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self._reader.read(65536)
                self.conn.receive_data(data)
                while True:
                    try:
                        ev = self.conn.next_event()
                    except RemoteProtocolError as err:
                        self._fail(err)
                        return
                    if ev is NEED_DATA:
                        break
                    if isinstance(ev, ConnectionClosed):
                        self._fail(ConnectionLost("the server closed the connection"))
                        return
                    self._dispatch(ev)
                if not data:
                    self._fail(ConnectionLost("the server closed the connection"))
                    return
        except (ConnectionError, OSError) as exc:
            self._fail(ConnectionLost(str(exc)))

    def _fail(self, exc: Exception) -> None:
        if self.closed is None:
            self.closed = exc
        for fut in list(self._waiting.values()):
            if not fut.done():
                fut.set_exception(ConnectionLost(str(exc)))
        if self._auth_step is not None and not self._auth_step.done():
            self._auth_step.set_exception(ConnectionLost(str(exc)))
        self._events.put_nowait(exc)

    def _resolve(self, key, value=None, error=None) -> bool:
        fut = self._waiting.get(key)
        if fut is None or fut.done():
            return False
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(value)
        return True

    def _dispatch(self, ev) -> None:
        t = type(ev)
        if t is IncomingMessage or t is IncomingReceipt:
            if ev.seq <= self.last_seq:
                self.redelivered += 1  # seen before: at-least-once on the wire
                return
            self.last_seq = ev.seq
            self._events.put_nowait(ev)
        elif t is ServerAck:
            self._resolve((ev.cls, ev.id), ev)
        elif t is CodeSent or t is Registered:
            self._resolve(("req", ev.id), ev)
        elif t is AuthChallenge or t is AuthSuccess:
            if self._auth_step is not None and not self._auth_step.done():
                self._auth_step.set_result(ev)
        elif t is Hello:
            self.server_hello = ev  # the newest dictionary the server knows
        elif t is Pong:
            self._resolve(("pong", ev.id))
        elif t is Ping:
            self._send(Pong(ev.id))
        elif t is Error:
            err = ServerError(ev.code, ev.text, ev.id)
            handled = False
            if ev.id is not None:
                for kind in ("req", "message", "receipt", "pong"):
                    handled |= self._resolve((kind, ev.id), error=err)
            if not handled and self._auth_step is not None and not self._auth_step.done():
                self._auth_step.set_exception(err)
                handled = True
            if not handled:
                self._events.put_nowait(ev)
        else:
            self._events.put_nowait(ev)
