"""The trio client: a thin driver of the same sans-IO client core as the asyncio one.

    async with open_client("127.0.0.1", 7650) as client:
        await client.login(creds)
        ack = await client.send("4915112345678", ciphertext)
        async for event in client:
            ...
            await client.ack(event.seq)

``open_client`` owns a nursery for the background reader, so the client
lives exactly as long as the ``async with`` block.  The methods, the resume
behaviour (``reconnect=True``) and the errors are those of
``pigeon.client.aio.Client``; timeouts raise ``TimeoutError`` in both.
So is the keepalive (``keepalive``, ``keepalive_timeout``): a task in the
same nursery per connection, under its own cancel scope, which the reader
cancels when its connection ends.
"""

from __future__ import annotations

import math
import ssl as _ssl
from contextlib import asynccontextmanager

import trio

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

__all__ = ["Client", "ConnectionLost", "Credentials", "ServerError", "open_client"]

READ_SIZE = 65536


class _Future:
    """A one-shot result for trio (trio has no futures by design)."""

    __slots__ = ("event", "value", "error")

    def __init__(self):
        self.event = trio.Event()
        self.value = None
        self.error: BaseException | None = None

    def done(self) -> bool:
        return self.event.is_set()

    def set(self, value=None, error: BaseException | None = None) -> None:
        if not self.event.is_set():
            self.value, self.error = value, error
            self.event.set()

    async def wait(self, timeout: float | None):
        with trio.fail_after(math.inf if timeout is None else timeout):
            await self.event.wait()
        if self.error is not None:
            raise self.error
        return self.value


@asynccontextmanager
async def open_client(
    host: str,
    port: int,
    *,
    ssl: _ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    reconnect: bool = False,
    backoff: tuple[float, float] = (0.05, 5.0),
    timeout: float = 10.0,
    keepalive: float | None = DEFAULT_KEEPALIVE,
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT,
    on_disconnect=None,
    on_reconnect=None,
    plaintext: bool = PLAINTEXT_DEFAULT,
    profile=None,
):
    """Connect (TLS when ``ssl`` is given) and yield a ``Client``; closes it on exit."""
    async with trio.open_nursery() as nursery:
        client = Client(
            nursery, host, port, ssl=ssl, server_hostname=server_hostname,
            reconnect=reconnect, backoff=backoff, connect_timeout=timeout,
            keepalive=keepalive, keepalive_timeout=keepalive_timeout,
            on_disconnect=on_disconnect, on_reconnect=on_reconnect,
            plaintext=plaintext, profile=profile,
        )  # fmt: skip
        await client._open()
        client._live = True
        nursery.start_soon(client._run)
        try:
            yield client
        finally:
            await client.aclose()
            nursery.cancel_scope.cancel()


class Client(ClientAPI):
    def __init__(
        self,
        nursery: trio.Nursery,
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
        self._nursery = nursery
        self.host, self.port = host, port
        self.ssl, self.server_hostname = ssl, server_hostname
        self.reconnect = reconnect
        self.backoff = backoff
        self.connect_timeout = connect_timeout
        self.core = ClientCore()
        self.device: str | None = None
        self.reconnects = 0
        self.closed: Exception | None = None
        self._creds: Credentials | None = None
        self._futures: dict[tuple[str, str], _Future] = {}
        self._send_events, self._events = trio.open_memory_channel(math.inf)
        self._stream: trio.abc.Stream | None = None
        self._send_lock = trio.Lock()
        self._pump_done: _Future | None = None
        self._pump_scope: trio.CancelScope | None = None
        self._keeper_scope: trio.CancelScope | None = None
        self._dead: Exception | None = None  # why the keepalive dropped the current connection
        self._live = False
        self._closing = False

    # -- connection life -------------------------------------------------------

    async def _open(self) -> None:
        with trio.fail_after(self.connect_timeout):
            stream = await trio.open_tcp_stream(self.host, self.port)
            if self.ssl is not None:
                stream = trio.SSLStream(
                    stream, self.ssl, server_hostname=self.server_hostname or self.host
                )
                await stream.do_handshake()
        self._stream = stream
        self._dead = None
        self._sent_at = trio.current_time()  # the preamble goes out now: no ping before it
        self.core.start()
        self._pump_done = _Future()
        self._pump_scope = trio.CancelScope()
        keeper = None
        if self.keepalive is not None:
            keeper = self._keeper_scope = trio.CancelScope()
            self._nursery.start_soon(self._keep, keeper)
        self._nursery.start_soon(self._read, stream, self._pump_done, self._pump_scope, keeper)
        await self._flush()

    async def _keep(self, scope: trio.CancelScope) -> None:
        with scope:
            await self._keepalive()

    async def _read(self, stream, done: _Future, scope: trio.CancelScope, keeper) -> None:
        why: Exception = ConnectionLost("the connection was dropped")
        with scope:
            try:
                while True:
                    data = await stream.receive_some(READ_SIZE)
                    lost = self._apply(self.core.receive(data))
                    if lost is not None:
                        why = lost
                        break
                    await self._flush()
                    if not data:
                        why = ConnectionLost("the server closed the connection")
                        break
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                why = ConnectionLost(f"connection lost: {exc}")
        if keeper is not None:
            keeper.cancel()  # the keepalive lives exactly as long as its connection
        if self._dead is not None and self._stream is stream:
            why = self._dead
        if self._stream is stream:
            self._live = False
        self._apply(self.core.lost(why))
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)
        done.set(why)

    RETRY_ERRORS = ClientAPI.RETRY_ERRORS + (trio.TooSlowError,)

    async def _connection_ended(self) -> Exception:
        return await self._pump_done.wait(None)

    async def _sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)

    async def _flush_now(self) -> None:
        await self._flush()

    def _clock(self) -> float:
        return trio.current_time()

    def _connection_dead(self, why: Exception) -> None:
        self._dead = why
        self._drop_connection()

    def _push(self, item) -> None:
        self._send_events.send_nowait(item)

    def _spawn(self, coro) -> None:
        async def run():
            await coro

        self._nursery.start_soon(run)

    def _settle(self, key, value, error) -> None:
        fut = self._futures.get(key)
        if fut is not None:
            fut.set(value, error)

    def _drop_connection(self) -> None:
        for scope in (self._pump_scope, self._keeper_scope):
            if scope is not None:
                scope.cancel()

    # -- output -----------------------------------------------------------------

    async def _flush(self) -> None:
        """Write what the core has queued; concurrent callers coalesce into one write."""
        async with self._send_lock:
            stream = self._stream
            if self.core.has_output and stream is not None:
                try:
                    await stream.send_all(self.core.take_output())
                    self._sent_at = trio.current_time()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass  # the reader sees the loss and says why

    async def _wait(self, key, timeout: float | None):
        fut = _Future()
        self._futures[key] = fut
        try:
            await self._flush()
            return await fut.wait(timeout)
        except trio.TooSlowError:
            raise TimeoutError(f"no answer to {key[0]} {key[1]!r} in {timeout} s") from None
        finally:
            self._futures.pop(key, None)
            self.core.forget(key)

    # -- the SDK's methods are in ClientAPI; the ack is the driver's own --------

    async def ack(self, seq: int) -> None:
        """Acknowledge every delivery up to ``seq`` (remembered across a reconnect)."""
        self.core.ack(seq, self._live)
        if self._live:
            await self._flush()

    # -- incoming -------------------------------------------------------------------

    def __aiter__(self):
        return self

    async def __anext__(self):
        ev = await self._events.receive()
        if isinstance(ev, Exception):
            self._send_events.send_nowait(ev)
            raise StopAsyncIteration
        return ev

    async def next_event(self, timeout: float | None = None):
        try:
            with trio.fail_after(math.inf if timeout is None else timeout):
                ev = await self._events.receive()
        except trio.TooSlowError:
            raise TimeoutError(f"no event in {timeout} s") from None
        if isinstance(ev, Exception):
            self._send_events.send_nowait(ev)
            raise ConnectionLost(str(ev))
        return ev

    async def aclose(self) -> None:
        self._closing = True
        with trio.CancelScope(shield=True):
            await self._flush()
        self._drop_connection()
        if self.closed is None:
            self._finish(ConnectionLost("closed by the application"))
