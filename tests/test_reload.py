"""Zero-downtime reload (SIGHUP) of a real server: under load, with a bad and a changed config."""

import asyncio
import signal

import pytest
from serverutil import Server, free_port, until
from test_durable import DEVICES, PER_SENDER_MULTI, crash_load

from pigeon.client import ServerError
from pigeon.core.errors import ErrorCode

ALICE, BOB = "491701234567", "4915112345678"


def drained(srv: Server, n: int) -> bool:
    return srv.log_text().count('"old worker drained"') >= n


# paced (about 4.5 s of load either way), so that the switch happens in the middle of it
@pytest.mark.parametrize(
    "load",
    [{"pause": 0.1}, {"pause": 0.25, "devices": DEVICES, "per_sender": PER_SENDER_MULTI}],
    ids=["1dev", "3dev"],
)
def test_reload_under_load_loses_and_duplicates_nothing(tmp_path, load):
    srv = Server(tmp_path / "data", workers=2).start()
    try:
        before = set(srv.worker_pids())

        async def reload():
            srv.proc.send_signal(signal.SIGHUP)
            await until(lambda: drained(srv, 2), timeout=60)  # the load goes on meanwhile

        report = asyncio.run(asyncio.wait_for(crash_load(srv, reload, **load), 300))
        # crash_load asserted: every acked message reached its application exactly once
        assert report["acked_when_crash_returned"] < report["sent"], "the load ended too soon"
        assert not before & set(srv.worker_pids())
        assert report["reconnects"] >= 1
        # connections refused or reset while reconnecting: the target is zero
        print(f"reload: {report}")
        assert report["reconnect_failures"] == 0
    finally:
        assert srv.stop() == 0


def test_a_bad_config_is_refused_and_a_good_one_applied(tmp_path):
    cfg = tmp_path / "pigeon.toml"
    cfg.write_text("queue-max-count = 100\n")
    srv = Server(tmp_path / "data", workers=2, config_file=cfg).start()
    try:

        async def main():
            alice = await srv.login(await srv.register(ALICE), reconnect=True)
            await srv.register(BOB)
            for _ in range(3):
                await alice.send(BOB, b"x")
            workers = set(srv.worker_pids())
            cfg.write_text('queue-max-count = "lots"\n')
            srv.proc.send_signal(signal.SIGHUP)
            await until(lambda: "reload refused" in srv.log_text())
            assert "queue-max-count: must be an integer" in srv.log_text()
            assert set(srv.worker_pids()) == workers  # untouched, still serving
            await alice.send(BOB, b"x")
            # (on a free port: the default 7651 may be another server's on a shared machine)
            cfg.write_text('queue-max-count = 4\ntls-cert = "/nonexistent/cert.pem"\n'
                           f'tls-listen = "127.0.0.1:{free_port()}"\n')  # fmt: skip
            srv.proc.send_signal(signal.SIGHUP)
            await until(
                lambda: (
                    "cannot read tls-cert (with its key) /nonexistent/cert.pem" in srv.log_text()
                )
            )
            assert set(srv.worker_pids()) == workers
            # both generations write the store during a reload: they must agree on writemap
            cfg.write_text("queue-max-count = 4\nstore-writemap = true\n")
            srv.proc.send_signal(signal.SIGHUP)
            await until(lambda: "store-writemap cannot change on reload" in srv.log_text())
            assert set(srv.worker_pids()) == workers
            cfg.write_text("queue-max-count = 4\n")
            srv.proc.send_signal(signal.SIGHUP)
            await until(lambda: drained(srv, 2), timeout=30)
            # alice was moved to a new worker (503, reconnect) and the new limit holds
            with pytest.raises(ServerError) as info:
                await alice.send(BOB, b"x", timeout=30)
            assert info.value.code == ErrorCode.QUEUE_FULL
            assert alice.reconnects >= 1
            await alice.close()

        asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        assert srv.stop() == 0


def test_a_draining_worker_answers_what_waits_in_its_accept_queue(tmp_path):
    """Connections queued in the kernel while a worker stops get 503, not a reset.

    Whether the loop accepts them before it handles SIGTERM or the drain
    takes them from the accept queue, each must be answered.
    """
    import os
    import socket

    from pigeon.core import codec as core_codec
    from pigeon.core.events import Error

    srv = Server(tmp_path / "data", workers=1).start()
    try:
        (pid,) = srv.worker_pids()
        os.kill(pid, signal.SIGSTOP)  # frozen: the kernel queues new connections for it
        try:
            socks = [socket.create_connection(("127.0.0.1", srv.port), timeout=10)
                     for _ in range(5)]  # fmt: skip
            os.kill(pid, signal.SIGTERM)  # handled once it runs again: drain
        finally:
            os.kill(pid, signal.SIGCONT)
        for s in socks:
            data = b""
            s.settimeout(10)
            while True:
                chunk = s.recv(4096)  # a reset would raise here
                if not chunk:
                    break
                data += chunk
            s.close()
            assert data[:3] == b"PGN"
            reader = core_codec.FrameReader()
            reader.feed(data[5:])
            node = reader.next_node(core_codec.Codec())
            assert Error.from_node(node).code == 503
    finally:
        assert srv.stop() == 0


def test_an_old_worker_killed_while_draining_leaves_no_session_behind(tmp_path):
    import os

    srv = Server(tmp_path / "data", workers=2).start()
    try:

        async def main():
            creds = await srv.register(ALICE)
            alice = await srv.login(creds)
            await until(lambda: creds.device in srv.sessions(ALICE))
            old = srv.worker_pids()
            for pid in old:
                os.kill(pid, signal.SIGSTOP)  # they cannot drain (nor clear their records)
            srv.proc.send_signal(signal.SIGHUP)
            await until(lambda: "old ones draining" in srv.log_text(), timeout=30)
            for pid in old:
                os.kill(pid, signal.SIGKILL)
            await until(lambda: drained(srv, 2), timeout=30)
            # the dead generation's record is gone; nothing points at a worker that left
            assert srv.sessions(ALICE) == {}
            alice._drop_connection()
            await alice.close()

        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        assert srv.stop() == 0
