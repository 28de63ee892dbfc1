"""Multi-device fan-out on a real server with 2 workers and the real SDK (issue 15).

Companion devices are written into the store with ``Store.link_device``
(``Server.link_device``): linking itself is the pairing protocol's test.
Each device logs in with its own credentials; the tests place devices on
both workers (``on_other_worker``) and check what each one receives.
"""

import asyncio
import itertools

import pytest
from serverutil import Server, on_other_worker, until

from pigeon.client import ServerError, StaleDevices
from pigeon.core.errors import ErrorCode
from pigeon.core.events import DevicesChanged, IncomingMessage, IncomingReceipt

N = 20
PHONES = (f"4930{n:08d}" for n in itertools.count(20_000_000))


def run(coro, timeout=120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("multi") / "data", workers=2, register_per_ip=1000,
               message_rate=0)  # fmt: skip
    s.start()
    yield s
    assert s.stop() == 0, s.log_text()[-3000:]


def worker_of(srv, creds) -> int:
    phone = creds.device.partition(":")[0]
    return srv.sessions(phone)[creds.device]["worker"]


async def accounts(srv, recipient_devices=3, sender_devices=2):
    """(alice's credentials, bob's), devices logged in on both workers; alice:0 sends."""
    alice_phone, bob_phone = next(PHONES), next(PHONES)
    a = [await srv.register(alice_phone)]
    a += [srv.link_device(alice_phone) for _ in range(sender_devices - 1)]
    b = [await srv.register(bob_phone)]
    b += [srv.link_device(bob_phone) for _ in range(recipient_devices - 1)]
    clients = {}
    for group, phone in ((a, alice_phone), (b, bob_phone)):
        first = await srv.login(group[0])
        await until(lambda g=group, p=phone: g[0].device in srv.sessions(p))
        clients[group[0].device] = first
        for creds in group[1:]:  # each companion on the other worker than the primary
            clients[creds.device] = await on_other_worker(
                srv, creds, phone, worker_of(srv, group[0])
            )
    return alice_phone, bob_phone, a, b, clients


async def take(client, n, timeout=15.0) -> list:
    """The next ``n`` deliveries (messages, receipts, notices) of a client, each acked."""
    out = []
    for _ in range(n):
        ev = await client.next_event(timeout)
        assert isinstance(ev, (IncomingMessage, IncomingReceipt, DevicesChanged)), ev
        out.append(ev)
        await client.ack(ev.seq)
    return out


async def nothing_more(client, wait=0.5) -> None:
    await client.ping()
    with pytest.raises(asyncio.TimeoutError):
        await client.next_event(wait)


async def close_all(clients) -> None:
    for c in clients.values():
        await c.close()


def test_fan_out_to_every_device_of_both_users_in_order_with_one_delivered_receipt_each(srv):
    async def main():
        alice, bob, a, b, clients = await accounts(srv)
        assert {worker_of(srv, c) for c in b} == {0, 1} and len({worker_of(srv, c) for c in a}) == 2
        sender = clients[a[0].device]
        acks = [await sender.send(bob, f"body {i}".encode(), id=f"m{i}") for i in range(N)]
        want = [(f"m{i}", f"body {i}".encode(), acks[i].t) for i in range(N)]
        for creds in b:
            evs = await take(clients[creds.device], N)
            assert [(e.id, e.body, e.t) for e in evs] == want, creds.device
            assert all(e.sender == a[0].device and e.to is None for e in evs)
            assert [e.seq for e in evs] == sorted(e.seq for e in evs)
        evs = await take(clients[a[1].device], N)  # the sync copies, in order, with `to`
        assert [(e.id, e.body, e.t) for e in evs] == want
        assert all(e.sender == a[0].device and e.to == bob for e in evs)
        # delivered: once per message (bob is one user), to both of alice's devices
        for creds in a:
            got = await take(clients[creds.device], N)
            assert all(isinstance(e, IncomingReceipt) and e.sender == bob for e in got)
            assert sorted(e.id for e in got) == sorted(f"m{i}" for i in range(N))
            assert {e.type for e in got} == {"delivered"}
        for c in clients.values():
            await nothing_more(c)
        await until(lambda: srv.queue_stats()["count"] == 0)
        await close_all(clients)

    run(main())


def test_a_stale_device_list_is_refused_with_the_lists_and_nothing_is_stored(srv):
    async def main():
        alice, bob, a, b, clients = await accounts(srv)
        sender = clients[a[0].device]
        before = srv.queue_stats()["count"]
        stale = {b[0].device: b"to b0", b[1].device: b"to b1", f"{bob}:9": b"gone"}
        with pytest.raises(StaleDevices) as info:
            await sender.send(bob, stale, id="p1")
        err = info.value
        assert err.code == ErrorCode.STALE_DEVICES and err.request_id == "p1"
        assert err.missing == (b[2].device, a[1].device) and err.extra == (f"{bob}:9",)
        assert srv.queue_stats()["count"] == before
        # refreshed: the same id, one payload per device, each reaching only its device
        right = {d.device: f"for {d.device}".encode() for d in (*b, a[1])}
        ack = await sender.send(bob, right, id="p1", type="pkmsg")
        for d in (*b, a[1]):
            (ev,) = await take(clients[d.device], 1)
            assert (ev.id, ev.body, ev.t, ev.type) == ("p1", right[d.device], ack.t, "pkmsg")
            assert ev.to == (bob if d is a[1] else None)
        assert (await sender.send(bob, right, id="p1", type="pkmsg")).t == ack.t  # stored once
        (receipt,) = await take(sender, 1)
        assert (receipt.type, receipt.id) == ("delivered", "p1")
        await take(clients[a[1].device], 1)
        for c in clients.values():
            await nothing_more(c)
        await close_all(clients)

    run(main())


def test_read_receipts_reach_the_sender_and_the_readers_other_devices(srv):
    async def main():
        alice, bob, a, b, clients = await accounts(srv)
        # alice has bob as a contact: his receipts reach her whatever the id
        # (to a stranger, one about no message of hers would be dropped)
        await clients[a[0].device].discover([bob])
        await clients[b[1].device].receipt(alice, "m7", "read")
        for creds in a:
            (ev,) = await take(clients[creds.device], 1)
            assert (ev.sender, ev.id, ev.type, ev.to) == (bob, "m7", "read", None)
        for creds in (b[0], b[2]):
            (ev,) = await take(clients[creds.device], 1)
            assert (ev.sender, ev.id, ev.type, ev.to) == (bob, "m7", "read", alice)
        for c in clients.values():
            await nothing_more(c)
        await close_all(clients)

    run(main())


def test_device_to_device_reaches_that_device_only(srv):
    async def main():
        alice, bob, a, b, clients = await accounts(srv, recipient_devices=1, sender_devices=3)
        primary = clients[a[0].device]
        ack = await primary.send(a[2].device, b"history bundle", type="history", id="h1")
        (ev,) = await take(clients[a[2].device], 1)
        assert (ev.sender, ev.to, ev.type, ev.body, ev.t) == (
            a[0].device, a[2].device, "history", b"history bundle", ack.t
        )  # fmt: skip
        for bad, code in ((f"{bob}:0", ErrorCode.BAD_REQUEST), (a[0].device, ErrorCode.BAD_REQUEST),
                          (f"{alice}:9", ErrorCode.UNKNOWN_RECIPIENT)):  # fmt: skip
            with pytest.raises(ServerError) as info:
                await primary.send(bad, b"x", id=f"bad{code}{bad[-1]}")
            assert info.value.code == code, bad
        for c in clients.values():  # no copy elsewhere, no delivered receipt
            await nothing_more(c)
        await close_all(clients)

    run(main())


def test_a_device_list_notice_waits_for_an_offline_device_and_comes_at_login(srv):
    from pigeon.server.queues import Queues
    from pigeon.server.store import Store

    async def main():
        alice = next(PHONES)
        a0 = await srv.register(alice)
        a1 = srv.link_device(alice)
        c1 = await srv.login(a1)
        store = Store(str(srv.data_dir / "store"), map_size=256 << 20, create=False)
        try:
            q = Queues(store)
            with store.write() as txn:  # what a link or unlink job does, beside its change
                pushes = q.devices_changed(txn, alice, store.clock())
        finally:
            store.close()
        assert sorted(p.device for p in pushes) == sorted([a0.device, a1.device])
        c0 = await srv.login(a0)  # offline until now: the notice waited in its queue
        (ev,) = await take(c0, 1)
        assert isinstance(ev, DevicesChanged) and ev.sender == alice
        await c1.close()
        c1 = await srv.login(a1)  # pushes from another process are not sent live: at login
        (ev,) = await take(c1, 1)
        assert isinstance(ev, DevicesChanged) and ev.sender == alice
        await until(lambda: srv.queue_stats()["count"] == 0)
        await c0.close()
        await c1.close()

    run(main())


def test_a_blocked_sender_cannot_tell_by_its_own_devices_or_by_a_stale_list(srv):
    """The blocked sender is acked and nothing reaches the blocker (section 10e), but
    what the sender's own account sees is as if it were not blocked: its other
    devices get the sync copies (and read-sync copies), and a stale device list is
    refused with 408 as it is for anyone, not acked (a free test of the block)."""

    async def main():
        alice, bob, a, b, clients = await accounts(srv, recipient_devices=2)
        await clients[b[0].device].block(alice)
        sender = clients[a[0].device]
        with pytest.raises(StaleDevices) as info:
            await sender.send(bob, {b[0].device: b"x", f"{bob}:9": b"y"}, id="s1")
        assert info.value.missing == (b[1].device, a[1].device)
        assert info.value.extra == (f"{bob}:9",)
        ack = await sender.send(bob, b"to a blocker", id="s2")
        (ev,) = await take(clients[a[1].device], 1)  # the sync copy, as always
        assert (ev.id, ev.body, ev.t, ev.to) == ("s2", b"to a blocker", ack.t, bob)
        right = {d.device: d.device.encode() for d in (*b, a[1])}
        await sender.send(bob, right, id="s3")
        (ev,) = await take(clients[a[1].device], 1)
        assert (ev.id, ev.body, ev.to) == ("s3", a[1].device.encode(), bob)
        await sender.receipt(bob, "s0", "read")  # read sync for alice's other device
        (ev,) = await take(clients[a[1].device], 1)
        assert (ev.id, ev.type, ev.to) == ("s0", "read", bob)
        for c in clients.values():
            await nothing_more(c)  # the blocker's devices got nothing
        await close_all(clients)

    run(main())
