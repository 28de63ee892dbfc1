"""The client SDK against the real server: both drivers, TLS, resume, leaving, limits."""

import asyncio
import contextlib
import os
import signal
import socket
import ssl
import time

import pytest
import trio
from serverutil import Server, next_message, on_other_worker, until

from pigeon.client import Client, ConnectionLost, ServerError
from pigeon.client._core import DEFAULT_KEEPALIVE, DEFAULT_KEEPALIVE_TIMEOUT
from pigeon.client.trio import open_client
from pigeon.core.codec import Codec, FrameReader
from pigeon.core.errors import ErrorCode
from pigeon.core.events import Error, IncomingMessage, IncomingReceipt
from pigeon.server.config import OPTIONS

ALICE, BOB = "491701234567", "4915112345678"


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path / "data", workers=2, tls=True).start()
    yield srv
    assert srv.stop() == 0, srv.log_text()[-3000:]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_tls_exchange_with_a_generated_certificate(server):
    async def main():
        alice_creds, bob_creds = await server.register(ALICE), await server.register(BOB)
        ctx = server.ssl_context()
        alice = await Client.connect("localhost", server.tls_port, plaintext=True, ssl=ctx)
        bob = await Client.connect("127.0.0.1", server.tls_port, plaintext=True, ssl=ctx)
        await alice.login(alice_creds)
        await bob.login(bob_creds)
        await until(lambda: bob_creds.device in server.sessions(BOB))
        ack = await alice.send(BOB, b"over tls")
        ev = await bob.next_event(10)
        assert (ev.id, ev.body, ev.sender) == (ack.id, b"over tls", alice_creds.device)
        assert bob._writer.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
        await alice.close()
        await bob.close()
        # a client that does not trust the certificate refuses the server
        with pytest.raises(ssl.SSLCertVerificationError):
            await Client.connect(
                "127.0.0.1", server.tls_port, plaintext=True, ssl=ssl.create_default_context()
            )
        # plain TCP to the TLS port is not a pigeon session
        with socket.create_connection(("127.0.0.1", server.tls_port), timeout=5) as s:
            s.sendall(b"PGN\x01\x01")
            s.settimeout(5)
            assert b"PGN" not in s.recv(100)

    run(main())


def test_trio_client_registers_logs_in_and_exchanges(server):
    async def main():
        async with open_client("127.0.0.1", server.port, plaintext=True) as c:
            await c.register(ALICE)
            creds = await c.verify(ALICE, server.code_for(ALICE))
        bob_creds = await trio.to_thread.run_sync(
            lambda: asyncio.run(server.register(BOB)), abandon_on_cancel=True
        )
        async with (
            open_client("127.0.0.1", server.port, plaintext=True) as alice,
            open_client(
                "localhost", server.tls_port, plaintext=True, ssl=server.ssl_context()
            ) as bob,
        ):
            await alice.login(creds)
            await bob.login(bob_creds)
            with trio.fail_after(10):
                while bob_creds.device not in server.sessions(BOB):
                    await trio.sleep(0.05)
            ids = []
            for i in range(5):
                ack = await alice.send(BOB, f"trio {i}".encode())
                ev = await bob.next_event(10)
                assert isinstance(ev, IncomingMessage)
                assert (ev.id, ev.body) == (ack.id, f"trio {i}".encode())
                await bob.ack(ev.seq)
                ids.append(ack.id)
            for mid in ids:  # two ticks, in order
                ev = await alice.next_event(10)
                assert isinstance(ev, IncomingReceipt) and (ev.id, ev.type) == (mid, "delivered")
                await alice.ack(ev.seq)
            with pytest.raises(ServerError) as info:
                await alice.send("4400000000000", b"x")
            assert info.value.code == ErrorCode.UNKNOWN_RECIPIENT
            await alice.ping()
            with pytest.raises(TimeoutError):
                await alice.next_event(0.2)

    trio.run(main)


def test_a_cancel_in_the_turn_its_answer_arrives_is_not_lost(server):
    """The caller cancelled (Ctrl-C: asyncio.Runner cancels the main task) after the answer
    came in but before the call resumed: the call ends cancelled.  With asyncio.wait_for
    (Python 3.11) it returned the answer and dropped the cancel, so the Ctrl-C was lost
    (``pigeon chat link`` interrupted as it connected went on to show a code and wait)."""

    async def main():
        client = await Client.connect("127.0.0.1", server.port, plaintext=True)
        try:
            call = asyncio.ensure_future(client.ping(timeout=30))
            await asyncio.sleep(0)  # one turn: the call waits for its answer
            (key,) = client._futures
            client._settle(key, None, None)  # the pong, as the reader hands it over...
            call.cancel()  # ...and the cancel in the same turn, before the call resumes
            with pytest.raises(asyncio.CancelledError):
                await call
            await client.ping()  # the connection is fine: a cancel is the caller's business
        finally:
            await client.close()

    run(main())


def test_asyncio_client_resumes_after_its_worker_is_killed(server):
    async def main():
        alice_creds, bob_creds = await server.register(ALICE), await server.register(BOB)
        alice = await server.login(alice_creds)
        await until(lambda: alice_creds.device in server.sessions(ALICE))
        a_worker = server.sessions(ALICE)[alice_creds.device]["worker"]
        # bob on the other worker, so killing his leaves alice online
        bob = await on_other_worker(server, bob_creds, BOB, a_worker, reconnect=True)
        await alice.send(BOB, b"before")
        first = await bob.next_event(10)
        await bob.ack(first.seq)
        worker = server.sessions(BOB)[bob_creds.device]["worker"]
        os.kill(server.worker_pid(worker), signal.SIGKILL)
        # a send while bob is cut off waits and goes out after the resume
        pending = asyncio.ensure_future(bob.send(ALICE, b"sent during the gap"))
        ack = await asyncio.wait_for(pending, 30)
        got = await next_message(alice)  # (skipping the receipt for "before", if it came)
        assert (got.id, got.body) == (ack.id, b"sent during the gap")
        assert bob.reconnects >= 1 and bob.closed is None
        # and bob receives again on the new connection
        await until(lambda: bob_creds.device in server.sessions(BOB), timeout=20)
        ack = await alice.send(BOB, b"after")
        ev = await next_message(bob)
        assert (ev.id, ev.body) == (ack.id, b"after") and ev.seq > first.seq
        await alice.close()
        await bob.close()

    run(main())


def test_a_replaced_device_does_not_reconnect(server):
    async def main():
        creds = await server.register(ALICE)
        first = await Client.connect("127.0.0.1", server.port, plaintext=True, reconnect=True)
        await first.login(creds)
        second = await server.login(creds)
        ev = await first.next_event(10)
        assert isinstance(ev, Error) and ev.code == ErrorCode.REPLACED
        with pytest.raises(ConnectionLost):
            await first.next_event(10)
        assert first.reconnects == 0
        await second.ping()
        await first.close()
        await second.close()

    run(main())


def test_logout_removes_only_this_device(server):
    async def main():
        creds = await server.register(ALICE)
        c = await server.login(creds)
        ack = await c.logout()
        assert ack.cls == "logout" and ack.t > 0
        with pytest.raises(ConnectionLost):
            await c.next_event(10)
        await c.close()
        c = await server.client()
        with pytest.raises(ServerError) as info:
            await c.login(creds)
        assert info.value.code == ErrorCode.NOT_AUTHORIZED
        await c.close()
        # the account is still there, with no device: 401, not "unknown" (400)
        bob = await server.login(await server.register(BOB))
        with pytest.raises(ServerError) as info:
            await bob.send(ALICE, b"x")
        assert info.value.code == ErrorCode.NO_DEVICE
        await bob.close()

    run(main())


def test_delete_account_removes_every_device(server):
    async def main():
        creds = await server.register(ALICE)
        bob = await server.login(await server.register(BOB))
        c = await server.login(creds)
        ack = await c.delete_account()
        assert ack.cls == "delete"
        await c.close()
        with pytest.raises(ServerError) as info:
            await bob.send(ALICE, b"x")
        assert info.value.code == ErrorCode.UNKNOWN_RECIPIENT
        assert server.sessions(ALICE) == {}
        c = await server.client()
        with pytest.raises(ServerError):
            await c.login(creds)
        await c.close()
        # the number can register again, as a new account
        again = await server.register(ALICE)
        assert again.device == ALICE + ":0" and again.secret != creds.secret
        await bob.close()

    run(main())


def test_keepalive_closes_silent_connections_and_keeps_pinging_ones(tmp_path):
    srv = Server(tmp_path / "data", workers=1, idle_timeout=1).start()

    async def main():
        silent_creds = await srv.register(ALICE)
        pinger_creds = await srv.register(BOB)
        silent = await srv.login(silent_creds, keepalive=None)  # the SDK would ping for it
        pinger = await srv.login(pinger_creds, keepalive=None)
        await until(lambda: silent_creds.device in srv.sessions(ALICE))
        for _ in range(12):  # 3 s, three times the timeout
            await pinger.ping()
            await asyncio.sleep(0.25)
        ev = await silent.next_event(5)
        assert isinstance(ev, Error) and ev.code == ErrorCode.TIMEOUT
        with pytest.raises(ConnectionLost):
            await silent.next_event(5)
        assert srv.sessions(ALICE) == {}  # not "online" any more
        await pinger.send(BOB, b"still here")  # to itself: it is online
        await silent.close()
        await pinger.close()

    try:
        run(main())
    finally:
        assert srv.stop() == 0


def _raw_connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"PGN\x01\x01")
    return s


def _first_node(s: socket.socket, tag: str):
    """The first node with this tag on a raw connection (after the server's preamble)."""
    reader, codec, head = FrameReader(1 << 20), Codec(), b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            return None
        if len(head) < 5:
            take = 5 - len(head)
            head, chunk = head + chunk[:take], chunk[take:]
        reader.feed(chunk)
        while (node := reader.next_node(codec)) is not None:
            if node.tag == tag:
                return node


def _read_error_code(s: socket.socket) -> int | None:
    node = _first_node(s, "error")
    return None if node is None else int(node.attrs["code"])


def test_per_address_and_per_worker_connection_caps(tmp_path):
    srv = Server(tmp_path / "data", workers=1, max_connections_per_ip=3).start()
    try:
        held = [_raw_connect(srv.port) for _ in range(3)]
        extra = _raw_connect(srv.port)
        assert _read_error_code(extra) == ErrorCode.RATE_LIMITED
        assert extra.recv(100) == b""  # and closed
        extra.close()
        for s in held:  # the others are untouched
            s.sendall(bytes.fromhex("000008f80306" + "13fc026b31"))  # <ping id="k1"/>
            assert _first_node(s, "pong").attrs["id"] == "k1"
            s.close()
    finally:
        assert srv.stop() == 0
    srv = Server(tmp_path / "data2", workers=1, max_connections=2).start()
    try:
        held = [_raw_connect(srv.port) for _ in range(2)]
        extra = _raw_connect(srv.port)
        # none is logged in: the new one takes the place of the oldest (told 502)
        assert _read_error_code(held[0]) == ErrorCode.UNAVAILABLE
        extra.sendall(bytes.fromhex("000008f80306" + "13fc026b31"))  # <ping id="k1"/>
        assert _first_node(extra, "pong").attrs["id"] == "k1"
        extra.close()
        for s in held:
            s.close()
    finally:
        assert srv.stop() == 0


def test_out_of_file_descriptors_refuses_with_an_error_and_recovers(tmp_path):
    """A worker with 160 files and 64 reserved holds 96 connections: each past them
    takes the place of the oldest not logged in (told 502)."""
    srv = Server(
        tmp_path / "data", workers=1, open_files=160, files_reserve=64, login_timeout=120
    ).start()
    try:
        assert "connections capped by the open-files limit" in srv.log_text()
        creds = asyncio.run(srv.register(ALICE))
        held = []
        refused = 0
        conns = [_raw_connect(srv.port) for _ in range(130)]
        time.sleep(1.0)
        for s in conns:
            s.settimeout(0.05)
            try:
                if _read_error_code(s) == ErrorCode.UNAVAILABLE:
                    refused += 1
                    s.close()
                    continue
            except TimeoutError:
                pass  # nothing said: the connection was taken
            held.append(s)
        assert len(held) == 96 and refused == 34
        # the limit is logged by the once-a-second sweeper
        for _ in range(50):
            if "at the connection limit: refusing new connections" in srv.log_text():
                break
            time.sleep(0.1)
        else:
            raise AssertionError("no log line about the connection limit")
        for s in held[:10]:
            s.close()

        async def login_again():
            c = await srv.client()
            await c.login(creds)
            await c.ping()
            await c.close()

        run(login_again())
        for s in held[10:]:
            s.close()
    finally:
        assert srv.stop() == 0


# -- the SDK's keepalive, with both drivers -----------------------------------------

IDLE_TIMEOUT = 2  # the server's, for these tests; a real one is 120 s


@pytest.fixture
def idle_server(tmp_path):
    srv = Server(tmp_path / "data", workers=2, idle_timeout=IDLE_TIMEOUT).start()
    yield srv
    assert srv.stop() == 0, srv.log_text()[-3000:]


@contextlib.asynccontextmanager
async def sdk_client(driver: str, server, creds, **kw):
    """A logged-in client of ``driver`` (asyncio or trio), closed on exit."""
    if driver == "trio":
        async with open_client("127.0.0.1", server.port, plaintext=True, **kw) as c:
            await c.login(creds)
            yield c
    else:
        c = await Client.connect("127.0.0.1", server.port, plaintext=True, **kw)
        try:
            await c.login(creds)
            yield c
        finally:
            await c.close()


def run_on(driver: str, scenario) -> None:
    """Run ``scenario(sleep)`` under ``driver``, bounded to 60 s."""
    if driver == "trio":

        async def main():
            with trio.fail_after(60):
                await scenario(trio.sleep)

        trio.run(main)
    else:
        run(scenario(asyncio.sleep))


async def wait_for(predicate, sleep, timeout: float = 20.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return
        await sleep(0.05)
    raise AssertionError("condition not met in time")


def test_the_default_keepalive_is_well_under_the_servers_idle_timeout():
    idle = next(o.default for o in OPTIONS if o.name == "idle_timeout")
    assert DEFAULT_KEEPALIVE + DEFAULT_KEEPALIVE_TIMEOUT <= idle / 2
    assert Client("127.0.0.1", 1).keepalive == DEFAULT_KEEPALIVE  # on unless turned off
    for off in (None, 0):
        assert Client("127.0.0.1", 1, keepalive=off, plaintext=True).keepalive is None
    for bad in ({"keepalive": -1}, {"keepalive_timeout": 0}):
        with pytest.raises(ValueError):
            Client("127.0.0.1", 1, plaintext=True, **bad)


@pytest.mark.parametrize("driver", ["asyncio", "trio"])
def test_an_idle_client_is_kept_alive_for_three_idle_timeouts(idle_server, driver):
    creds = run(idle_server.register(ALICE))

    async def scenario(sleep):
        async with sdk_client(driver, idle_server, creds, reconnect=True, keepalive=0.5) as c:
            await wait_for(lambda: creds.device in idle_server.sessions(ALICE), sleep)
            session = idle_server.sessions(ALICE)[creds.device]
            # 3x the server's idle timeout without a word from the application:
            # no event at all, so in particular no error 130
            try:
                ev = await c.next_event(3 * IDLE_TIMEOUT)
            except TimeoutError:
                ev = None
            assert ev is None, f"an idle client got {ev!r}"
            assert c.reconnects == 0 and c.reconnect_failures == 0 and c.closed is None
            assert idle_server.sessions(ALICE)[creds.device] == session  # the same connection
            assert c.keepalive_pings > 0 and c.keepalive_failures == 0
            await c.ping()

    run_on(driver, scenario)
    assert "no traffic within the keepalive timeout" not in idle_server.log_text()


@pytest.mark.parametrize("driver, off", [("asyncio", None), ("trio", 0)])
def test_with_the_keepalive_off_the_server_closes_an_idle_client(idle_server, driver, off):
    creds = run(idle_server.register(ALICE))

    async def scenario(sleep):
        async with sdk_client(driver, idle_server, creds, reconnect=True, keepalive=off) as c:
            ev = await c.next_event(3 * IDLE_TIMEOUT)
            assert isinstance(ev, Error) and ev.code == ErrorCode.TIMEOUT
            await wait_for(lambda: c.reconnects >= 1, sleep)
            assert c.keepalive_pings == 0

    run_on(driver, scenario)


def test_the_keepalive_pings_only_after_an_interval_without_sending(idle_server):
    """Traffic resets the server's idle timer as well as a ping: a busy client never pings."""
    creds = run(idle_server.register(ALICE))
    run(idle_server.register(BOB))  # offline: alice's messages are queued and acked
    interval = 1.5

    async def main():
        c = await idle_server.login(creds, keepalive=interval)
        loop = asyncio.get_running_loop()
        start = last = loop.time()
        longest = 0.0
        while loop.time() - start < 2 * IDLE_TIMEOUT:  # 40 sends, 0.1 s apart
            await c.send(BOB, b"busy")
            longest = max(longest, loop.time() - last)
            last = loop.time()
            await asyncio.sleep(0.1)
        assert longest < interval, f"the test machine stalled for {longest:.2f} s"
        assert c.keepalive_pings == 0
        await asyncio.sleep(3 * interval)  # idle: now it pings
        assert c.keepalive_pings >= 1 and c.reconnects == 0 and c.closed is None
        await c.close()

    run(main())


@pytest.mark.parametrize("driver", ["asyncio", "trio"])
def test_a_ping_without_pong_drops_the_connection_and_reconnects(idle_server, driver):
    """A worker that stops answering (SIGSTOP: the kernel still takes the bytes) is
    what a dead path looks like from the client; it reconnects to the other worker."""
    creds = run(idle_server.register(ALICE))
    stopped: list[int] = []

    async def scenario(sleep):
        kw = dict(reconnect=True, keepalive=0.5, keepalive_timeout=1.0, timeout=1.5)
        async with sdk_client(driver, idle_server, creds, **kw) as c:
            await wait_for(lambda: creds.device in idle_server.sessions(ALICE), sleep)
            worker = idle_server.sessions(ALICE)[creds.device]["worker"]
            pid = idle_server.worker_pid(worker)
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
            await wait_for(lambda: c.reconnects >= 1, sleep, timeout=40)
            assert c.keepalive_failures >= 1 and c.closed is None
            assert idle_server.sessions(ALICE)[creds.device]["worker"] != worker
            await c.ping()

    try:
        run_on(driver, scenario)
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)


@pytest.mark.parametrize("driver", ["asyncio", "trio"])
def test_reconnect_hooks_say_offline_and_back_online(server, driver):
    """``on_disconnect`` when a connection is lost and a reconnect starts, ``on_reconnect``
    once logged in again; neither when the client ends for good (replaced)."""
    creds = run(server.register(ALICE))
    seen: list[tuple[str, str | None]] = []

    def lost(why):
        seen.append(("lost", str(why)))

    def back():
        seen.append(("back", None))
        raise RuntimeError("an application's bug")  # logged; the client goes on

    async def scenario(sleep):
        kw = dict(reconnect=True, on_disconnect=lost, on_reconnect=back)
        async with sdk_client(driver, server, creds, **kw) as c:
            await wait_for(lambda: creds.device in server.sessions(ALICE), sleep)
            worker = server.sessions(ALICE)[creds.device]["worker"]
            os.kill(server.worker_pid(worker), signal.SIGKILL)
            await wait_for(lambda: c.reconnects >= 1, sleep, timeout=30)
            assert [kind for kind, _ in seen] == ["lost", "back"], seen
            assert seen[0][1]  # with the reason
            await c.ping()
            async with sdk_client(driver, server, creds):  # replaces c: the end for good
                await wait_for(lambda: c.closed is not None, sleep)
            assert isinstance(c.closed, ServerError) and c.closed.code == ErrorCode.REPLACED
            assert len(seen) == 2, seen

    run_on(driver, scenario)
