"""Linked devices: pairing a companion, linking it from the primary, device lists, unlink.

Theory of operation.  A new device (a companion: a desktop, a tablet)
connects without an account and sends ``pair`` with its Ed25519 identity
public key.  The server writes a pairing record (the ``pairs`` table,
key ``r:<ref>`` for a QR pairing, ``c:<code>`` for a link code) saying
which worker and connection wait, the request id, the key, the name and
the expiry, and answers with the reference (or code).  The connection is
now "pairing": its deadline is ``pair-timeout`` from its connect instead
of ``login-timeout``, at most ``pair-per-address`` connections of one
source address may be pairing on a worker, and ``pair`` requests draw on
``pair-per-ip`` per ``register-window`` (in the store: every worker's
count).  Every ``pair-ttl`` a QR pairing gets a new reference (the old
record is marked expired), ``pair-refreshes`` times; when the last one,
or a code, expires the companion gets 306 and may ask again.

The logged-in primary (the account's first device: device 0 unless the
number was registered again) sends ``link`` with the reference it scanned
(or the code typed), the key it read and its signature over that key
(core/keys.py).  One job of the tick's commit counts the attempt against
``link-per-account`` and the address's limit and checks the record (known,
not expired, not used), the key, the signature against the primary's
stored identity key and ``max-linked-devices``; the companion's SCRAM keys
are then derived off the loop, and a second job checks it all again and
creates the device (``Store._add_device``: numbers never reused) with its
name and the signature, marks it pending and the record used.  After that
commit the primary gets its ack and the companion's worker (the record
says which) gets a PAIRED bus record and sends ``registered`` with the new
device's secret; the companion then logs in as any device does.

No orphan device.  If the waiting connection is gone when PAIRED arrives,
that worker removes the new device again at once.  If the record never
arrives (its worker died), the device stays "pending" (it never logged in)
and the sweep (worker 0, every purge-interval) removes it once its pairing
record is past its expiry: a linked device that never logged in lives at
most about 2 x pair-ttl.  The first login clears "pending" (in the login's
own commit, ``Store.note_login_txn``).

The store stays bounded against strangers: a pairing record is written
only under the per-address rate limit, lives pair-ttl (plus pair-ttl of
grace, so that a late scan is told 306 rather than 305) and is swept
after that.

Companion expiry: the primary's login time is kept in the account
(``last_login``, written at most once an hour); the sweep unlinks the
companions of accounts whose primary has not logged in for
``companion-expiry`` and closes their sessions (304).

Device-list notices.  Every change of an account's devices here (a link,
an unlink, a companion expired, a linked device removed because it never
logged in) queues ``<devices from=user>`` for the account's devices
(``Queues.devices_changed``) in the transaction of the change, and the
pushes go out after its commit (a job's ``done``, or the sweep's
``deliver``).  The list is read when the notice is queued: a link queues it
before the new device exists and an unlink after the device is gone, so
neither gets a notice of its own change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets

import lmdb

from pigeon.core.errors import ErrorCode
from pigeon.core.events import (
    LINK_CODE_ALPHABET,
    LINK_CODE_LENGTH,
    DeviceInfo,
    DeviceList,
    DeviceLists,
    DevicesBatchQuery,
    DevicesQuery,
    Error,
    Link,
    LinkKey,
    Pair,
    PairCode,
    Registered,
    ServerAck,
    Unlink,
)
from pigeon.core.keys import verify_link

from . import keydir, log
from .accounts import device_keys
from .errors import ServiceError
from .limits import net_key, retry_in, window_take
from .store import _pack, _unpack

logger = logging.getLogger("pigeon.worker")

UNLINKED_TEXT = "this device was unlinked"
_SWEEP_BATCH = 1000


class Pairing:
    """A pairing connection's state (``Session.pairing``)."""

    __slots__ = ("rid", "type", "key", "name", "phone", "record", "refreshes", "timer")

    def __init__(self):
        self.rid = None
        self.type = None
        self.key = None
        self.name = None
        self.phone = None
        self.record = None  # the live record's key in the pairs table, once written
        self.refreshes = 0
        self.timer = None


# -- the pairs table ------------------------------------------------------------


def _get(store, txn, key: str):
    return _unpack(txn.get(key.encode(), db=store._db["pairs"]))


def _put(store, txn, key: str, rec: dict) -> None:
    txn.put(key.encode(), _pack(rec), db=store._db["pairs"])


def _new_key(store, txn, kind: str) -> tuple[str, str]:
    """A fresh ("r:<ref>", ref) or ("c:<code>", code) that no record holds."""
    for _ in range(16):
        if kind == "qr":
            value = secrets.token_bytes(16).hex()
            key = "r:" + value
        else:
            value = "".join(secrets.choice(LINK_CODE_ALPHABET) for _ in range(LINK_CODE_LENGTH))
            key = "c:" + value
        if txn.get(key.encode(), db=store._db["pairs"]) is None:
            return key, value
    raise ServiceError(ErrorCode.UNAVAILABLE, "no free pairing code; try again")


def _expire(store, txn, key: str | None, now: int) -> None:
    """End a live record (refreshed, given up, its connection gone): a scan of it is 306."""
    if key is None:
        return
    rec = _get(store, txn, key)
    if rec is not None and not rec.get("used") and rec["expires"] > now:
        rec["expires"] = now
        _put(store, txn, key, rec)


@contextlib.contextmanager
def _sweep_write(store, queues):
    """A sweep's write transaction; if it aborts after ``devices_changed`` read
    through the queues' caches, they start again (as a commit's do)."""
    try:
        with store.write() as txn:
            yield txn
    except BaseException:
        queues.forget_caches()
        raise


def sweep_pairs(store, queues, now: int, grace_ms: int, deliver) -> list[str]:
    """Delete pairing records past expiry + ``grace_ms``; a device linked through one
    that never logged in (still pending) is removed, and its account's devices are
    told (``Queues.devices_changed``, in the same transaction; ``deliver`` gets the
    pushes after each commit).  Returns the devices removed."""
    removed = []
    start = b""
    while True:
        with _sweep_write(store, queues) as txn:
            cur = txn.cursor(db=store._db["pairs"])
            more = None
            changed, pushes = set(), []
            if cur.set_range(start):
                seen = 0
                while True:
                    k = cur.key()
                    if not k:
                        break
                    if seen >= _SWEEP_BATCH:
                        more = k
                        break
                    seen += 1
                    rec = _unpack(cur.value())
                    if rec["expires"] + grace_ms <= now:
                        device = rec.get("device")
                        if device is not None:
                            dev = store._get(txn, "devices", device)
                            if dev is not None and dev.get("pending"):
                                store.remove_device_txn(txn, device, now)
                                removed.append(device)
                                changed.add(device.partition(":")[0])
                        cur.delete()
                    elif not cur.next():
                        break
            for user in sorted(changed):
                pushes += queues.devices_changed(txn, user, now)
        deliver(pushes)
        if more is None:
            return removed
        start = more


def expire_companions(store, queues, now: int, expiry_ms: int, deliver) -> list[str]:
    """Unlink the companions of accounts whose primary has not logged in for
    ``expiry_ms`` (``last_login``, or the account's creation if it never did
    since this was kept); the primary is told (``Queues.devices_changed``, in
    the same transaction; ``deliver`` gets the pushes after each commit).
    Returns the devices removed."""
    removed = []
    start = b""
    while True:
        pushes = []
        with _sweep_write(store, queues) as txn:
            cur = txn.cursor(db=store._db["accounts"])
            more = None
            stale = []
            if cur.set_range(start):
                for seen, (k, raw) in enumerate(cur):
                    if seen >= _SWEEP_BATCH:
                        more = k
                        break
                    acct = _unpack(raw)
                    devs = acct["devices"]
                    if len(devs) > 1 and acct.get("last_login", acct["created"]) <= now - expiry_ms:
                        stale.append((k.decode(), devs[1:]))
            for phone, numbers in stale:  # not while the cursor walks the table it changes
                for n in numbers:
                    store.remove_device_txn(txn, f"{phone}:{n}", now)
                    removed.append(f"{phone}:{n}")
                pushes += queues.devices_changed(txn, phone, now)
        deliver(pushes)
        if more is None:
            return removed
        start = more


def primary_of(acct: dict | None) -> int | None:
    """The number of an account's primary: its first device (0 unless registered again)."""
    if not acct or not acct["devices"]:
        return None
    return acct["devices"][0]


# -- the companion's side: pair ---------------------------------------------------


def pair(s, ev: Pair) -> None:
    w = s.worker
    c = w.config
    prev = s.pairing
    if prev is None:
        if w.pairing_per_ip[s.source] >= c.pair_per_address:
            w.stats.counters["rate_limited"] += 1
            return s.fail(
                ErrorCode.RATE_LIMITED,
                "too many connections waiting to be paired from this address",
            )
        w.pairing_per_ip[s.source] += 1
        # the deadline: pair-timeout from the connect, instead of login-timeout
        loop = w.loop
        started = s.deadline.when() - c.login_timeout if s.deadline is not None else loop.time()
        if s.deadline is not None:
            s.deadline.cancel()
        s.deadline = loop.call_at(started + c.pair_timeout, pair_deadline, s)
        old = None
    else:
        # replaced: a new state per request, so that one whose record is still
        # being written (pipelined) ends it itself (_issued: not s.pairing)
        if prev.timer is not None:
            prev.timer.cancel()
            prev.timer = None
        old, prev.record = prev.record, None
    p = s.pairing = Pairing()
    p.rid, p.type, p.key, p.name, p.phone = ev.id, ev.type, ev.identity_key, ev.name, ev.phone
    wid, conn, source = w.wid, s.id, s.source
    net = net_key(source)
    window = c.register_window * 1000

    def run(txn, now):
        w.store.check_room(txn)
        for key, limit, text in (
            (f"pair-net:{net}", c.pair_per_net, "too many pair requests from this network"),
            (f"pair-ip:{source}", c.pair_per_ip, "too many pair requests from this address"),
        ):
            if wait := w.store.window_wait(txn, key, limit, window, now):
                raise ServiceError(ErrorCode.RATE_LIMITED, f"{text}; {retry_in(wait)}")
        w.store.hit_txn(txn, f"pair-ip:{source}", c.pair_per_ip, window, now)
        w.store.hit_txn(txn, f"pair-net:{net}", c.pair_per_net, window, now)
        _expire(w.store, txn, old, now)
        return _write_record(w, txn, now, p, 0, wid, conn)

    w.write(run, lambda result: _issued(s, p, result), s, ev.id)


def _write_record(w, txn, now: int, p: Pairing, refresh: int, wid: int, conn: int):
    key, value = _new_key(w.store, txn, p.type)
    rec = {"worker": wid, "conn": conn, "rid": p.rid, "key": p.key, "name": p.name,
           "phone": p.phone, "expires": now + w.config.pair_ttl * 1000, "refresh": refresh}  # fmt: skip
    _put(w.store, txn, key, rec)
    return key, value


def _issued(s, p: Pairing, result) -> None:
    """A record was written for ``p``: tell the companion, time its end."""
    w = s.worker
    key, value = result
    if s.closing or s.pairing is not p:  # gone (or asked again) meanwhile: end it
        w.write(lambda txn, now: _expire(w.store, txn, key, now))
        return
    p.record = key
    ttl = w.config.pair_ttl
    if p.type == "qr":
        s.send(PairCode(p.rid, ttl, ref=value))
    else:
        s.send(PairCode(p.rid, ttl, code=value))
    p.timer = w.loop.call_later(ttl, _ttl_over, s, p)


def _ttl_over(s, p: Pairing) -> None:
    """A reference or code reached its end: a new reference, or 306."""
    w = s.worker
    p.timer = None
    if s.closing or s.pairing is not p or p.record is None:
        return
    old = p.record
    wid, conn = w.wid, s.id
    again = p.type == "qr" and p.refreshes < w.config.pair_refreshes

    def run(txn, now):
        rec = _get(w.store, txn, old)
        if rec is None or rec.get("used"):
            return None  # linked meanwhile: the registered answer is on its way
        _expire(w.store, txn, old, now)
        if not again:
            return False
        return _write_record(w, txn, now, p, p.refreshes + 1, wid, conn)

    def done(result) -> None:
        if result is None:
            return
        live = not s.closing and s.pairing is p
        if live:
            p.record = None
        if result is False:
            if live:
                s.send(Error(ErrorCode.PAIR_EXPIRED, "the pairing code has expired; ask again",
                             p.rid))  # fmt: skip
            return
        if live:
            p.refreshes += 1
        _issued(s, p, result)  # (a new record for a connection gone or replaced: ended)

    w.write(run, done, s, p.rid)


def pair_deadline(s) -> None:
    if s.device is None and not s.closing:
        s.fail(ErrorCode.TIMEOUT, "pairing and login not finished in time")


def release(s) -> None:
    """``s`` stops pairing (it logs in, or it is gone): its count and timer go, and a
    record still live is ended."""
    p = s.pairing
    if p is None:
        return
    w = s.worker
    s.pairing = None
    if p.timer is not None:
        p.timer.cancel()
    n = w.pairing_per_ip[s.source] - 1
    if n > 0:
        w.pairing_per_ip[s.source] = n
    else:
        w.pairing_per_ip.pop(s.source, None)
    if p.record is not None and not w.closed:
        key = p.record
        w.write(lambda txn, now: _expire(w.store, txn, key, now))


def paired_local(w, conn: int, rid: str, device: str, secret: bytes) -> None:
    """A companion waiting on connection ``conn`` here was linked as ``device``."""
    s = w.sessions.get(conn)
    p = None if s is None else s.pairing
    if s is None or s.closing or p is None or p.rid != rid:
        # nobody to hand the secret to: the device must not outlive this
        def run(txn, now):
            if not w.store.remove_device_txn(txn, device, now):
                return []
            return w.queues.devices_changed(txn, device.partition(":")[0], now)

        w.write(run, w.deliver)
        log.event(logger, logging.INFO, "linked device removed: its pairing connection is gone",
                  device=device)  # fmt: skip
        return
    if p.timer is not None:
        p.timer.cancel()
        p.timer = None
    p.record = None  # used: nothing to end
    s.send(Registered(rid, device, secret))


# -- the primary's side: link -------------------------------------------------------


def _check_link(w, txn, now: int, user: str, device: str, ev: Link) -> tuple[str, dict, dict]:
    """Everything a link must pass, in the order the errors are documented;
    returns (record key, record, account)."""
    store = w.store
    acct = store._get(txn, "accounts", user)
    first = primary_of(acct)
    if first is None or device != f"{user}:{first}":
        raise ServiceError(ErrorCode.NOT_PRIMARY, "only the primary device may link devices")
    key = "r:" + ev.ref if ev.ref is not None else "c:" + ev.code
    rec = _get(store, txn, key)
    if rec is None or (ev.code is not None and rec.get("phone") != user):
        raise ServiceError(ErrorCode.PAIR_UNKNOWN, "no such pairing code")
    if rec.get("used"):
        raise ServiceError(ErrorCode.PAIR_USED, "this pairing code was used already")
    if rec["expires"] <= now:
        raise ServiceError(ErrorCode.PAIR_EXPIRED, "the pairing code has expired")
    if ev.key is None:
        return key, rec, acct  # a code's first step: the key is asked for
    if ev.key != rec["key"]:
        raise ServiceError(ErrorCode.KEY_MISMATCH, "the key is not the waiting device's key")
    primary = store._get(txn, "devices", device)
    if primary is None or not verify_link(primary["identity_key"], user, ev.key, ev.signature):
        raise ServiceError(
            ErrorCode.BAD_SIGNATURE,
            "the signature does not verify against this account's identity key "
            "(an account registered without an Ed25519 key must register again)",
        )
    if len(acct["devices"]) - 1 >= w.config.max_linked_devices:
        raise ServiceError(
            ErrorCode.DEVICE_LIMIT,
            f"this account has {w.config.max_linked_devices} linked devices already",
        )
    return key, rec, acct


def link(s, ev: Link) -> None:
    w = s.worker
    c = w.config
    user, device, source = s.user, s.device, s.source
    window = c.register_window * 1000

    def attempt(txn, now):
        w.store.check_room(txn)  # (the count is a write)
        # counted first: a refused attempt counts too (guessing codes costs attempts)
        if not (
            w.store.hit_txn(txn, f"link-acct:{user}", c.link_per_account, window, now)
            and w.store.hit_txn(txn, f"link-ip:{source}", c.link_per_account, window, now)
        ):
            raise ServiceError(ErrorCode.RATE_LIMITED, "too many link attempts; try again later")
        _, rec, _ = _check_link(w, txn, now, user, device, ev)
        return rec

    def checked(rec) -> None:
        if s.closing:
            return
        if ev.key is None:
            s.send(LinkKey(ev.id, ev.code, rec["key"]))
            return
        w.spawn(_create(s, ev, user, device))

    w.write(attempt, checked, s, ev.id)


async def _create(s, ev: Link, user: str, device: str) -> None:
    w = s.worker
    secret = os.urandom(32)
    # PBKDF2 for the companion's SCRAM keys: off the loop, outside the commit
    keys = await asyncio.to_thread(device_keys, secret, w.config.scram_iterations)

    def run(txn, now):
        w.store.check_room(txn)
        key, rec, acct = _check_link(w, txn, now, user, device, ev)
        extra = {"signature": ev.signature, "pending": True}
        if rec.get("name") is not None:
            extra["name"] = rec["name"]
        # the account's devices are told first, so that the new one, not yet in
        # the list, gets no notice of its own addition (PROTOCOL.md section 9)
        pushes = w.queues.devices_changed(txn, user, now)
        pushes += keydir.changed_txn(w.queues, txn, user, now)  # a new device: its contacts
        address = w.store._add_device(txn, user, acct, ev.key, keys, now, extra)
        rec["used"] = True
        rec["device"] = address
        rec["expires"] = now + w.config.pair_ttl * 1000  # its time to log in (sweep_pairs)
        _put(w.store, txn, key, rec)
        return now, address, rec, pushes

    def done(result) -> None:
        t, address, rec, pushes = result
        w.deliver(pushes)
        if not s.closing:
            s.send(ServerAck(ev.id, t, "link", address))
        log.event(logger, logging.INFO, "device linked", device=address)
        if rec["worker"] == w.wid:
            paired_local(w, rec["conn"], rec["rid"], address, secret)
        else:
            w.bus.paired(rec["worker"], rec["conn"], rec["rid"], address, secret)

    w.write(run, done, s, ev.id)


# -- device lists and unlink ------------------------------------------------------------


def devices(s, ev: DevicesQuery) -> None:
    """The device list of ``ev.user``, charged as a lookup (``Worker.looked_up``:
    free for the account itself, a contact or a group member; anyone else costs
    one number of the discovery limit, in the tick's commit)."""
    w = s.worker
    store, target = w.store, ev.user

    def answer(items) -> None:
        if items is None:
            s.send(Error(ErrorCode.UNKNOWN_RECIPIENT, "not a registered user", ev.id))
        else:
            s.send(DeviceList(ev.id, target, items))

    w.looked_up(s, target, lambda txn: _device_items(store, txn, target), answer, ev.id)


def devices_batch(s, ev: DevicesBatchQuery) -> None:
    """The device lists of ``ev.users`` (at most ``devices-query-max``, 406 past it):
    free for the account itself, its contacts and its groups' members
    (``Social.lookup_free``); each other user costs one number of
    ``discover-numbers``, charged in the tick's commit before anything is read
    (302 for the whole request past it).  A user who is not registered is 400
    for the whole request (its text names the number)."""
    w = s.worker
    store, user, c = w.store, s.user, w.config
    users = list(dict.fromkeys(ev.users))
    if len(users) > c.devices_query_max:
        s.send(Error(ErrorCode.TOO_MANY,
                     f"at most {c.devices_query_max} users per devices request", ev.id))  # fmt: skip
        return

    def lists(txn):
        out = []
        for u in users:
            items = _device_items(store, txn, u)
            if items is None:
                return u
            out.append((u, items))
        return tuple(out)

    def answer(result) -> None:
        if isinstance(result, str):
            s.send(Error(ErrorCode.UNKNOWN_RECIPIENT, f"{result} is not a registered user",
                         ev.id))  # fmt: skip
        else:
            s.send(DeviceLists(ev.id, result))

    social = w.social
    with store.read() as txn:
        groups = social.groups_of(txn, user)
        strangers = [u for u in users if not social.lookup_free(txn, user, u, groups)]
        if not strangers:
            answer(lists(txn))
            return

    def run(txn, now):
        # every check before the first write: a refused job writes nothing (worker.Job)
        window_ms = int(c.discover_window * 1000)
        key = f"discover:{user}".encode()
        ok, left = window_take(txn, store._db["limits"], key, now, window_ms,
                               c.discover_numbers, len(strangers))  # fmt: skip
        if not ok:
            raise ServiceError(
                ErrorCode.RATE_LIMITED,
                f"contact discovery limit: {left} more users outside your contacts may be "
                f"looked up in this {c.discover_window:g} s window, this request has "
                f"{len(strangers)}",
            )
        return lists(txn)

    w.write(run, answer, s, ev.id)


def _device_items(store, txn, user: str):
    """``user``'s DeviceInfo tuple, or None if it is not a registered user."""
    acct = store._get(txn, "accounts", user)
    if acct is None:
        return None
    items = []
    for n in acct["devices"]:
        address = f"{user}:{n}"
        dev = store._get(txn, "devices", address)
        if dev is None or len(dev["identity_key"]) != 32:
            continue
        items.append(DeviceInfo(address, dev["created"], dev["identity_key"],
                                dev.get("name"), dev.get("signature")))  # fmt: skip
    return tuple(items)


def unlink(s, ev: Unlink) -> None:
    w = s.worker
    user, device, target = s.user, s.device, ev.device

    def run(txn, now):
        acct = w.store._get(txn, "accounts", user)
        phone, _, n = target.partition(":")
        first = primary_of(acct)
        if phone != user:
            raise ServiceError(ErrorCode.BAD_REQUEST, "not a device of this account")
        if int(n) == first:
            raise ServiceError(ErrorCode.BAD_REQUEST, "the primary device cannot be unlinked")
        if device != f"{user}:{first}" and target != device:
            raise ServiceError(ErrorCode.NOT_PRIMARY, "only the primary may unlink other devices")
        if not w.store.remove_device_txn(txn, target, now):
            raise ServiceError(ErrorCode.NO_DEVICE, "no such device")
        # after the removal: the unlinked device gets none
        return now, w.queues.devices_changed(txn, user, now)

    def done(result) -> None:
        t, pushes = result
        w.deliver(pushes)
        s.send(ServerAck(ev.id, t, "unlink"))
        log.event(logger, logging.INFO, "device unlinked", device=target, by=device)
        if target == device:  # a companion unlinked itself: as a logout
            if w.by_device.get(device) is s:
                del w.by_device[device]
            if s.holders:  # told while the session still has its device's name
                s.release()
            s.device = None
            s.close_soon()
        else:
            w.revoke(target, ErrorCode.REVOKED, UNLINKED_TEXT)

    w.write(run, done, s, ev.id)


def housekeeping(w) -> None:
    """Worker 0's sweep: pairing records past their end, companions past companion-expiry."""
    c = w.config
    now = w.store.clock()
    try:
        gone = sweep_pairs(w.store, w.queues, now, c.pair_ttl * 1000, w.deliver)
        expired = expire_companions(w.store, w.queues, now, c.companion_expiry * 1000, w.deliver)
    except lmdb.Error as exc:
        log.event(logger, logging.ERROR, "pairing sweep failed", error=str(exc))
        return
    if gone:
        log.event(logger, logging.INFO, "linked devices that never logged in removed",
                  devices=len(gone))  # fmt: skip
    for device in expired:
        w.revoke(device, ErrorCode.REVOKED, UNLINKED_TEXT)
    if expired:
        log.event(logger, logging.INFO, "companions of long-absent primaries unlinked",
                  devices=len(expired))  # fmt: skip
