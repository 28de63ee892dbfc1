"""The asyncio client: a thin driver of the sans-IO client core.

    client = await Client.connect("127.0.0.1", 7650)
    ttl = await client.register("491701234567")          # a code goes out by SMS
    creds = await client.verify("491701234567", code, identity_key)
    await client.login(creds)
    ack = await client.send("4915112345678", ciphertext)  # returns at one tick
    async for event in client:                            # IncomingMessage, IncomingReceipt, ...
        ...
        await client.ack(event.seq)

One task per connection reads and feeds the core; answers resolve the
waiting call, everything else comes out of the async iterator.  The core
drops deliveries it has handed out before (by per-device sequence), so the
application sees each message once.

With ``reconnect=True`` a lost connection (network, server restart, error
503) is re-opened with exponential backoff, the device logs in again with
the same credentials, and messages and receipts the server had not acked
are sent again with their ids (the server treats a retried id as the same
message).  ``send`` calls waiting across the gap simply return later.  A
removed or replaced device (errors 300, 303, 304) is not reconnected: the
iterator ends and calls raise ``ConnectionLost``.

Each connection also has a keepalive task: it pings after ``keepalive``
seconds (default 30) without anything sent, and closes the connection if
the pong takes longer than ``keepalive_timeout`` (default 20), which a
``reconnect=True`` client then re-opens.  ``keepalive=None`` (or 0) turns it
off; the server then closes an idle connection after its ``idle-timeout``.

``on_disconnect(why)`` and ``on_reconnect()`` (constructor arguments or
attributes) tell the application that a resuming client went offline and
is back: plain callables, run in the client's task.
"""

from __future__ import annotations

import asyncio
import ssl as _ssl

from ._core import (
    DEFAULT_KEEPALIVE,
    DEFAULT_KEEPALIVE_TIMEOUT,
    PLAINTEXT_DEFAULT,
    ClientAPI,
    ClientCore,
    ConnectionLost,
    Credentials,
    ServerError,
    check_keepalive,
)

__all__ = ["Client", "ConnectionLost", "Credentials", "ServerError"]

READ_SIZE = 65536


class Client(ClientAPI):
    """One device's connection (and, with ``reconnect``, its successors)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl: _ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        reconnect: bool = False,
        backoff: tuple[float, float] = (0.05, 5.0),
        connect_timeout: float = 10.0,
        keepalive: float | None = DEFAULT_KEEPALIVE,
        keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT,
        on_disconnect=None,
        on_reconnect=None,
        plaintext: bool = PLAINTEXT_DEFAULT,
        profile=None,
    ):
        self.keepalive = check_keepalive(keepalive, keepalive_timeout)
        self._init_secure(plaintext, profile)
        self.on_disconnect, self.on_reconnect = on_disconnect, on_reconnect
        self.keepalive_timeout = keepalive_timeout
        self.host, self.port = host, port
        self.ssl, self.server_hostname = ssl, server_hostname
        self.reconnect = reconnect
        self.backoff = backoff
        self.connect_timeout = connect_timeout
        self.core = ClientCore()
        self.device: str | None = None
        #: how many times the connection was re-established
        self.reconnects = 0
        #: why the client stopped for good (None while it runs)
        self.closed: Exception | None = None
        self._creds: Credentials | None = None
        self._futures: dict[tuple[str, str], asyncio.Future] = {}
        self._events: asyncio.Queue = asyncio.Queue()
        self._writer: asyncio.StreamWriter | None = None
        self._pump: asyncio.Task | None = None
        self._keeper: asyncio.Task | None = None  # the keepalive of the current connection
        self._dead: Exception | None = None  # why the keepalive dropped the current connection
        self._life: asyncio.Task | None = None
        self._live = False  # a connection is up (and logged in, once we have logged in)
        self._flush_scheduled = False
        self._closing = False
        self._tasks: set[asyncio.Task] = set()  # the SDK's own background work (resends)

    @classmethod
    async def connect(cls, host: str, port: int, *, timeout: float = 10.0, **kw) -> Client:
        """Open the connection (TLS when ``ssl`` is given); raises OSError if it cannot."""
        client = cls(host, port, connect_timeout=timeout, **kw)
        await client._open()
        client._live = True
        client._life = asyncio.get_running_loop().create_task(client._run())
        return client

    # -- read-only state ------------------------------------------------------

    # -- connection life -------------------------------------------------------

    async def _open(self) -> None:
        # asyncio.timeout, not wait_for: Python 3.11's wait_for returns what it waited for
        # when the caller is cancelled in the turn that result arrives, and the cancel
        # (Ctrl-C: asyncio.Runner cancels the main task) is lost
        async with asyncio.timeout(self.connect_timeout):
            reader, writer = await asyncio.open_connection(
                self.host, self.port, ssl=self.ssl, server_hostname=self.server_hostname
            )
        self._writer = writer
        self._dead = None
        self.core.start()
        self._flush()
        loop = asyncio.get_running_loop()
        keeper = None if self.keepalive is None else loop.create_task(self._keepalive())
        self._keeper = keeper
        self._pump = loop.create_task(self._read(reader, keeper))

    async def _read(self, reader: asyncio.StreamReader, keeper: asyncio.Task | None) -> Exception:
        """Pump one connection until it is lost; returns why."""
        try:
            return await self._pump_until_lost(reader)
        finally:
            if keeper is not None:
                keeper.cancel()  # the keepalive lives exactly as long as its connection

    async def _pump_until_lost(self, reader: asyncio.StreamReader) -> Exception:
        why: Exception
        try:
            while True:
                data = await reader.read(READ_SIZE)
                lost = self._apply(self.core.receive(data))
                if lost is not None:
                    why = lost
                    break
                self._flush()
                if not data:
                    why = ConnectionLost("the server closed the connection")
                    break
        except (ConnectionError, OSError, _ssl.SSLError) as exc:
            why = ConnectionLost(f"connection lost: {exc}")
        if self._dead is not None:
            why = self._dead  # we closed it: say why, not "the server closed"
        self._live = False
        self._apply(self.core.lost(why))
        if self._writer is not None:
            self._writer.close()
        return why

    async def _connection_ended(self) -> Exception:
        return await self._pump

    async def _sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def _flush_now(self) -> None:
        self._flush()

    def _clock(self) -> float:
        return asyncio.get_running_loop().time()

    def _connection_dead(self, why: Exception) -> None:
        # abort, not close: nothing more will get through, and the reader
        # then ends at once (with ``why``) instead of after a flush that cannot finish
        self._dead = why
        if self._writer is not None:
            self._writer.transport.abort()

    def _push(self, item) -> None:
        self._events.put_nowait(item)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _settle(self, key, value, error) -> None:
        fut = self._futures.get(key)
        if fut is not None and not fut.done():
            if error is None:
                fut.set_result(value)
            else:
                fut.set_exception(error)

    def _drop_connection(self) -> None:
        if self._writer is not None:
            self._writer.close()
        for task in (self._pump, self._keeper):
            if task is not None:
                task.cancel()

    # -- output -----------------------------------------------------------------

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.core.has_output and self._writer is not None and not self._writer.is_closing():
            self._writer.write(self.core.take_output())
            self._sent_at = asyncio.get_running_loop().time()

    async def _wait(self, key, timeout: float | None):
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._futures[key] = fut
        self._schedule_flush()
        # the timeout fails the future itself (it is ours), so a cancel of the caller
        # is never confused with it nor lost (wait_for: see _open)
        expiry = None if timeout is None else loop.call_later(timeout, _expire, fut)
        try:
            return await fut
        finally:
            if expiry is not None:
                expiry.cancel()
            self._futures.pop(key, None)
            self.core.forget(key)

    # -- the SDK's methods are in ClientAPI; the ack is the driver's own --------

    async def ack(self, seq: int) -> None:
        """Acknowledge every delivery up to and including ``seq``.

        While reconnecting it is remembered and sent after the next login;
        the server may redeliver meanwhile, and the client drops (and acks
        again) what it has handed out already.
        """
        self.core.ack(seq, self._live)
        if self._live:
            self._schedule_flush()

    # -- incoming -------------------------------------------------------------------

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
        if timeout is None:
            ev = await self._events.get()
        else:
            async with asyncio.timeout(timeout):  # not wait_for: see _open
                ev = await self._events.get()
        if isinstance(ev, Exception):
            self._events.put_nowait(ev)
            raise ConnectionLost(str(ev))
        return ev

    # -- closing ----------------------------------------------------------------------

    async def close(self) -> None:
        self._closing = True
        self._flush()
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.close()
        if writer is not None:
            try:
                await writer.wait_closed()
            except (ConnectionError, _ssl.SSLError):
                pass
        for task in (self._life, self._pump, self._keeper, *self._tasks):
            if task is not None and not task.done():
                task.cancel()
        for task in (self._life, self._pump, self._keeper):
            if task is not None:
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        if self.closed is None:
            self._finish(ConnectionLost("closed by the application"))

    async def group(self, op: str, group: str | None = None, members=(),
                    timeout: float = 30.0, **fields):  # fmt: skip
        """One group request (PROTOCOL.md 10g): ``op`` create, info, list, add, ...;
        ``fields``: subject, description, code, announce, approval.  Returns the
        GroupResult; raises ServerError if refused.  (A plain request: the
        group API proper is the SDK's.)"""
        from pigeon.core.events import GroupRequest

        from ._core import REQ

        rid = self.new_id()
        req = GroupRequest(rid, op, group, tuple(members), **fields)
        return await self._request(REQ, rid, req, timeout)

    async def group_send(self, group: str, body: bytes, payloads=(), type: str = "text",
                         id: str | None = None, timeout: float | None = 30.0):  # fmt: skip
        """Send ``body`` to ``group`` with per-device ``payloads`` ((device, bytes), ...:
        sender-key distribution, each delivered only to the device it names);
        returns the ServerAck (``failed``: members whose queues were full)."""
        from pigeon.core.events import Message

        from ._core import MESSAGE

        if self.closed is not None:
            raise ConnectionLost(str(self.closed))
        mid = id or self.new_id()
        event = Message(group, mid, type, bytes(body), tuple(payloads))
        if self._live:
            key = self.core.request(MESSAGE, mid, event)
        else:
            event.check()
            key = self.core.expect(MESSAGE, mid, event)
        return await self._wait(key, timeout)

    async def send_media(self, to: str, path: str, **kw):
        """Encrypt the file at ``path``, upload it to the media service and send ``to``
        a message whose body is its media payload; returns (ServerAck, Media).
        ``progress(done, total)``, ``media_class``, ``mime``: see
        pigeon.client.media.send_media (asyncio only: the upload uses aiohttp)."""
        from .media import send_media

        return await send_media(self, to, path, **kw)

    async def forward_media(self, to: str, media, timeout: float | None = 30.0):
        """Send ``media`` (a ``Media`` or the body it came in) on to ``to``: the same
        link, key and token, no upload (the file is stored once)."""
        from .media import Media

        if isinstance(media, (bytes, bytearray, memoryview)):
            media = Media.unpack(bytes(media))
        return await self.send(to, media.pack(), type=class_of_media(media), timeout=timeout)

    async def download(self, media, dest: str, **kw) -> str:
        """Fetch, check and decrypt ``media`` (a ``Media`` or a message body) into
        ``dest``; the chat connection's TLS context is used for an https URL."""
        from .media import Media, download

        if isinstance(media, (bytes, bytearray, memoryview)):
            media = Media.unpack(bytes(media))
        kw.setdefault("ssl", self.ssl)
        return await download(media, dest, **kw)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


def class_of_media(media) -> str:
    from .media import class_of_mime

    return class_of_mime(media.mime)
