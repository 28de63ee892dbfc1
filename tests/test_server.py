"""The real server on loopback: registration, login, routing across workers, limits, signals."""

import asyncio
import os
import signal
import socket
import time

import pytest
from serverutil import Server, next_message, on_other_worker, until

from pigeon.client import Client, ServerError
from pigeon.client.aio import ConnectionLost
from pigeon.core.errors import ErrorCode
from pigeon.core.events import Error, IncomingMessage, IncomingReceipt

ALICE, BOB, CAROL = "491701234567", "4915112345678", "447700900123"


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path / "data", workers=2).start()
    yield srv
    assert srv.stop() == 0, srv.log_text()[-3000:]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_two_workers_exchange_messages_both_ways(server):
    async def main():
        alice_creds = await server.register(ALICE)
        bob_creds = await server.register(BOB)
        alice = await server.login(alice_creds)
        await until(lambda: alice_creds.device in server.sessions(ALICE))
        a_worker = server.sessions(ALICE)[alice_creds.device]["worker"]
        bob = await on_other_worker(server, bob_creds, BOB, a_worker)
        for i in range(20):
            ack = await alice.send(BOB, f"hi bob {i}".encode())
            assert ack.id and ack.t > 0
            ev = await next_message(bob)  # after the receipt for his last message
            assert isinstance(ev, IncomingMessage)
            assert (ev.sender, ev.body, ev.id, ev.t) == (
                alice_creds.device,
                f"hi bob {i}".encode(),
                ack.id,
                ack.t,
            )
            await bob.ack(ev.seq)
            await bob.send(ALICE, b"hi alice")
            # bob's ack queued alice a delivered receipt, ahead of his message
            receipt = await alice.next_event(10)
            assert isinstance(receipt, IncomingReceipt)
            assert (receipt.sender, receipt.id, receipt.type) == (BOB, ack.id, "delivered")
            ev = await alice.next_event(10)
            assert ev.sender == bob_creds.device and ev.body == b"hi alice"
            assert ev.seq == receipt.seq + 1
            await alice.ack(ev.seq)
        await alice.close()
        await bob.close()

    run(main())


def test_registration_and_login_errors(server):
    async def main():
        c = await server.client()
        await c.register(ALICE)
        code = server.code_for(ALICE)
        wrong = f"{(int(code) + 1) % 10**6:06d}"
        with pytest.raises(ServerError) as info:
            await c.verify(ALICE, wrong)
        assert info.value.code == ErrorCode.BAD_CODE
        creds = await c.verify(ALICE, code)
        with pytest.raises(ServerError) as info:
            await c.verify(ALICE, code)  # reused
        assert info.value.code == ErrorCode.BAD_CODE
        await c.close()
        # a wrong proof
        c = await server.client()
        with pytest.raises(ServerError) as info:
            await c.login(type(creds)(creds.device, b"\x00" * 32))
        assert info.value.code == ErrorCode.NOT_AUTHORIZED
        await c.close()
        c = await server.login(creds)  # the right one still works
        await c.ping()
        await c.close()

    run(main())


def test_reregistration_revokes_the_old_device(server):
    async def main():
        old = await server.register(ALICE)
        old_client = await server.login(old)
        new = await server.register(ALICE)
        assert new.device != old.device
        ev = await old_client.next_event(10)
        assert isinstance(ev, Error) and ev.code == ErrorCode.REVOKED
        with pytest.raises(ConnectionLost):
            await old_client.next_event(10)
        c = await server.client()
        with pytest.raises(ServerError):
            await c.login(old)
        await c.close()
        await old_client.close()

    run(main())


def test_sender_is_set_by_the_server(server):
    async def main():
        alice_creds, bob_creds = await server.register(ALICE), await server.register(BOB)
        alice, bob = await server.login(alice_creds), await server.login(bob_creds)
        await until(lambda: bob_creds.device in server.sessions(BOB))
        # a hand-made message node claiming to come from Carol
        node = alice.core.conn._impl.Node(
            "message", {"to": BOB, "id": "spoof1", "type": "text", "from": CAROL + ":0"}, b"x"
        )
        alice.core.out += alice.core.conn._codec.encode_frame(node)
        alice._flush()
        ev = await bob.next_event(10)
        assert ev.sender == alice_creds.device and ev.id == "spoof1"
        await alice.close()
        await bob.close()

    run(main())


def test_unknown_recipient_and_oversized_payload(server):
    async def main():
        alice = await server.login(await server.register(ALICE))
        with pytest.raises(ServerError) as info:
            await alice.send(CAROL, b"x")
        assert info.value.code == ErrorCode.UNKNOWN_RECIPIENT
        await server.register(BOB)
        # the largest payload whose delivery still fits in a frame, and one byte more
        limit = (1 << 20) - 256
        with pytest.raises(ServerError) as info:
            await alice.send(BOB, b"x" * (limit + 1))
        assert info.value.code == ErrorCode.BAD_REQUEST and str(limit) in info.value.text
        await alice.send(BOB, b"x" * limit)
        await alice.ping()  # the connection goes on
        await alice.close()

    run(main())


def test_second_login_replaces_the_first(server):
    async def main():
        creds = await server.register(ALICE)
        first = await server.login(creds)
        second = await server.login(creds)
        ev = await first.next_event(10)
        assert isinstance(ev, Error) and ev.code == ErrorCode.REPLACED
        await second.ping()
        await first.close()
        await second.close()

    run(main())


def test_bad_input_gets_an_error_and_hurts_no_one(server):
    async def main():
        alice_creds, bob_creds = await server.register(ALICE), await server.register(BOB)
        alice, bob = await server.login(alice_creds), await server.login(bob_creds)
        for junk in (b"\x00\x00\x02\xf8\x00", b"\xff\xff\xff", b"\x00\x00\x00"):
            r, w = await asyncio.open_connection("127.0.0.1", server.port)
            w.write(b"PGN\x01\x01" + junk)
            data = await asyncio.wait_for(r.read(), 10)  # until the server closes
            assert data.startswith(b"PGN\x01")  # then the newest dictionary it knows
            w.close()
        # the wrong state: a message before login is refused, the connection lives
        c = await server.client()
        with pytest.raises(ServerError) as info:
            c.core.conn.state = type(c.core.conn.state).AUTHENTICATED  # let the SDK send it anyway
            await c.send(BOB, b"x")
        assert info.value.code == ErrorCode.WRONG_STATE
        await c.ping()
        await c.close()
        # and everyone else is fine
        await alice.send(BOB, b"still here")
        assert (await bob.next_event(10)).body == b"still here"
        await alice.close()
        await bob.close()

    run(main())


def test_login_deadline_closes_a_silent_connection(tmp_path):
    srv = Server(tmp_path / "data", workers=1, login_timeout=1).start()
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(b"PGN\x01\x01")
            t0 = time.monotonic()
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            assert time.monotonic() - t0 < 8
            assert (
                b"PGN" in data and bytes([0x09]) in data
            )  # error code 130 packed = 0x13 0x0... checked below
        from pigeon.core import Codec, FrameReader

        r = FrameReader()
        r.feed(data[5:])
        node = r.next_node(Codec())
        assert node.tag == "error" and node.attrs["code"] == str(int(ErrorCode.TIMEOUT))
    finally:
        assert srv.stop() == 0


def test_worker_crash_is_restarted_and_clients_reconnect(server):
    async def main():
        creds = await server.register(ALICE)
        c = await server.login(creds)
        await until(lambda: creds.device in server.sessions(ALICE))
        victim = server.worker_pid(server.sessions(ALICE)[creds.device]["worker"])
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(ConnectionLost):
            await c.next_event(10)  # its connection died with it
        await until(
            lambda: len(server.worker_pids()) == 2 and victim not in server.worker_pids(), 20
        )
        for _ in range(50):  # reconnect (with backoff) until the restarted worker serves
            try:
                c2 = await server.login(creds)
                await c2.ping()
                break
            except (ConnectionError, ConnectionLost, OSError, ServerError):
                await asyncio.sleep(0.2)
        else:
            raise AssertionError("could not reconnect")
        await c2.close()
        await c.close()
        assert "worker exited; restarting" in server.log_text()

    run(main())


def test_supervisor_kill_takes_the_workers_down(tmp_path):
    srv = Server(tmp_path / "data", workers=2).start()
    pids = srv.worker_pids()
    assert len(pids) == 2
    os.kill(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait(10)
    deadline = time.monotonic() + 15
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        time.sleep(0.1)
    assert not alive, f"orphaned workers: {alive}"
    # and the port is free for a new server
    srv2 = Server(tmp_path / "data2", workers=1)
    srv2.port = srv.port
    srv2.start()
    assert srv2.stop() == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by init) counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return True


def test_sigterm_exits_cleanly_and_tells_clients(server):
    async def main():
        c = await server.login(await server.register(ALICE))
        assert server.stop() == 0
        ev = await c.next_event(10)
        assert isinstance(ev, Error) and ev.code == ErrorCode.SHUTTING_DOWN
        await c.close()

    run(main())


def test_client_class_is_the_sdk():
    assert Client.__module__ == "pigeon.client.aio"
