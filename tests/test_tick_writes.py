"""Every store write joins the tick's commit (server/worker.py ``Worker.write``).

Session records at login and logout, presence, privacy, discover and block /
unblock are written in the same write transaction as the tick's messages
and acks, and answered after it commits: a burst of logins costs a few
commits, not one transaction per device, and a refused request writes
nothing (it checks before it writes, so it shares a transaction safely).
Real servers on loopback, the real SDK."""

import asyncio
import re
import urllib.request

import pytest
from serverutil import Server, free_port, until

from pigeon.client import ServerError
from pigeon.core.errors import ErrorCode

ALICE, BOB, CAROL, DAVE = "491701234567", "4915112345678", "447700900123", "33612345678"


def run(coro, timeout: float = 90):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def next_message(client, timeout: float = 10.0):
    from pigeon.core.events import IncomingMessage

    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        left = deadline - asyncio.get_running_loop().time()
        assert left > 0, "no message in time"
        ev = await client.next_event(left)
        if isinstance(ev, IncomingMessage):
            return ev


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    m = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def test_a_burst_of_logins_costs_a_few_commits_not_one_each(tmp_path):
    mport = free_port()
    srv = Server(tmp_path / "data", workers=1, metrics_listen=f"127.0.0.1:{mport}",
                 max_connections_per_ip=1000, register_per_ip=1000).start()  # fmt: skip
    n = 120
    try:

        async def main():
            creds = [await srv.register(f"4930{i:08d}") for i in range(n)]
            # the counters reach /metrics with the workers' snapshots: wait for them
            await until(lambda: metric(mport, "pigeon_commits_total") >= 0, timeout=10)
            await asyncio.sleep(2.5)
            before = metric(mport, "pigeon_commits_total")
            clients = await asyncio.gather(*(srv.login(c) for c in creds))
            assert await until(lambda: metric(mport, "pigeon_logins_total") >= n, timeout=20)
            after_login = metric(mport, "pigeon_commits_total")
            # every session is recorded, and every client is served
            for i in range(n):
                assert f"4930{i:08d}:0" in srv.sessions(f"4930{i:08d}")
            await clients[0].send(f"4930{1:08d}", b"hello")
            ev = await next_message(clients[1])
            assert ev.body == b"hello"
            await asyncio.gather(*(c.close() for c in clients))
            return before, after_login

        before, after = run(main())
        # before this change each login wrote its own transaction and none was
        # a tick commit; now the records share the ticks' commits
        assert 1 <= after - before <= n / 4, (before, after)
    finally:
        assert srv.stop() == 0


def test_a_refused_discover_charges_nothing(tmp_path):
    """contacts-max refuses after the window check.  A request used to be undone
    by aborting its own transaction; in the shared commit it must check before
    it writes, so the window stays as it was."""
    srv = Server(tmp_path / "data", workers=1, discover_numbers=10, contacts_max=2).start()
    try:

        async def main():
            creds = [await srv.register(p) for p in (ALICE, BOB, CAROL, DAVE)]
            alice = await srv.login(creds[0])
            res = await alice.discover([BOB])
            assert res.limit == 9
            with pytest.raises(ServerError) as info:
                await alice.discover([BOB, CAROL, DAVE], "add")  # 3 contacts > 2
            assert info.value.code == ErrorCode.TOO_MANY
            res = await alice.discover([BOB], "add")  # nothing new: the window is unchanged
            assert res.limit == 9
            await alice.close()

        run(main())
    finally:
        assert srv.stop() == 0


def test_writes_are_answered_after_their_commit_and_in_effect(tmp_path):
    """Block, unblock, privacy, availability and logout: each answer comes after
    its write is committed, so what the answer says is already true for
    every worker."""
    srv = Server(tmp_path / "data", workers=2).start()
    try:

        async def main():
            a_creds, b_creds = await srv.register(ALICE), await srv.register(BOB)
            alice, bob = await srv.login(a_creds), await srv.login(b_creds)
            await alice.block(BOB)
            await bob.send(ALICE, b"blocked")  # acked and dropped, whatever worker bob is on
            await alice.unblock(BOB)
            await bob.send(ALICE, b"after")
            ev = await next_message(alice)
            assert ev.body == b"after"
            settings = await alice.privacy(last="nobody")
            assert (settings.last, settings.online) == ("nobody", "everyone")
            settings = await alice.privacy()  # nothing changes: answered from a read
            assert (settings.last, settings.online) == ("nobody", "everyone")
            await alice.logout()
            assert a_creds.device not in (srv.sessions(ALICE) or {})
            await bob.close()

        run(main())
    finally:
        assert srv.stop() == 0


def test_a_message_then_a_block_in_one_packet_keep_their_order(tmp_path):
    """The block joins the commit, but the message a client sent before it is
    handled first: it is stored and delivered, not refused with 403."""
    srv = Server(tmp_path / "data", workers=1).start()
    try:

        async def main():
            a_creds, b_creds = await srv.register(ALICE), await srv.register(BOB)
            alice, bob = await srv.login(a_creds), await srv.login(b_creds)
            for i in range(5):  # both requests leave in one write of the SDK's loop turn
                sent = asyncio.create_task(alice.send(BOB, f"before the block {i}".encode()))
                blocked = asyncio.create_task(alice.block(BOB))
                await asyncio.gather(sent, blocked)
                ev = await next_message(bob)
                assert ev.body == f"before the block {i}".encode()
                with pytest.raises(ServerError) as info:  # and after it: refused
                    await alice.send(BOB, b"after the block")
                assert info.value.code == ErrorCode.BLOCKED
                await alice.unblock(BOB)
            await alice.close()
            await bob.close()

        run(main())
    finally:
        assert srv.stop() == 0
