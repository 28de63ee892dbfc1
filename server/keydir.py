"""The key directory: each device's public identity keys, one-time and fallback keys.

Theory of operation (docs/PROTOCOL.md section 9c).  A logged-in device
uploads its Curve25519 and Ed25519 identity keys (the Ed25519 one must be
the identity key it registered or was linked with), optionally a signed
fallback key, and batches of signed one-time keys.  Every signature is
verified (``cryptography``'s Ed25519) before the commit, over
``signed_key_message``; an upload is stored whole or not at all.  A
``keys`` query hands out, per device of the users asked, the identity keys
and one one-time key, which it deletes in the same write transaction: LMDB
has one writer at a time across every worker, so two fetches never get the
same key.  A device without one-time keys left hands out its fallback key
(flagged; not consumed).

Tables (named databases in the store's environment; msgpack values):

    keys   device -> [curve25519, ed25519, fallback or None, count, t]
           fallback: [key id, key, signature]; count: the one-time keys in
           otks; t: the last upload (ms)
    otks   device NUL key id -> [key, signature]

A device uploads keys at most ``key-uploads`` times per ``keys-fetch-window``
(302 past it, checked before the signatures are: each upload of 50 keys
costs the worker's loop about 9 ms of Ed25519, and at message-rate one
device kept a worker busy).

A user takes at most ``keys-per-device`` one-time keys of another user's
device per ``keys-fetch-window`` (a ``limits`` record ``otkf:<fetcher> NUL
<device>``); past that its fetches of that device carry the fallback key
and consume nothing: one account could otherwise take all of a stranger's
one-time keys in a second (50 fetches, 0.4 s) and leave every other sender
the fallback key.  A user's own devices are not limited.

Notices (queue entry kind 3, ``Queues.notice_devices``): ``low`` for a
device when a fetch takes its count below ``one-time-keys-low`` (once per
crossing: an attacker's fetches do not pile notices up in its queue); ``changed`` (from a user) when the user gets a new device or a device
uploads an identity key other than the one held, to the users of
``changed_audience``: at most one undelivered per (device, user) in a queue
(``Queues.keys_changed``: a newer one deletes the older one still queued and
takes its place at the tail), and none into a queue that is full or holds
the strangers' share from a user who does not know this one.  A link, a new
device's first upload and a registration are not counted against
``key-changes`` (a user's own devices are not refused for it), but a loop of
them (link-per-account allows 10 an hour) queues one notice per
correspondent device, not one per change.  Removing a device (logout, unlink, re-registration,
companion expiry, account deletion: ``Store.remove_device_txn`` and
friends) deletes its keys (``drop_device_keys``).
"""

from __future__ import annotations

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from pigeon.core.errors import ErrorCode
from pigeon.core.events import (
    Error,
    KeyBundle,
    KeyBundles,
    KeysCount,
    KeysCountQuery,
    KeysQuery,
    KeysUpload,
    SignedKey,
    signed_key_message,
)

from .errors import ServiceError
from .limits import window_take, window_used

KEY_TABLES = ("keys", "otks")
KEYS_NOTICE = 3  # the queue entry kind (server/queues.py)


def _pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(raw):
    return msgpack.unpackb(raw, raw=False)


def _prefix(device: str) -> bytes:
    return device.encode() + b"\x00"


def verify_upload(device: str, ed25519: bytes, ev: KeysUpload) -> None:
    """Raise ServiceError 312 unless every key of ``ev`` is signed by ``ed25519``."""
    pub = Ed25519PublicKey.from_public_bytes(bytes(ed25519))
    keys = ([ev.fallback] if ev.fallback is not None else []) + list(ev.one_time_keys)
    for k in keys:
        try:
            pub.verify(bytes(k.signature),
                       signed_key_message(device, k.key_id, k.key, k is ev.fallback))  # fmt: skip
        except InvalidSignature:
            what = "fallback key" if k is ev.fallback else "one-time key"
            raise ServiceError(
                ErrorCode.KEY_SIGNATURE,
                f"the signature of {what} {k.key_id} does not verify against this device's "
                "Ed25519 identity key",
            ) from None


def drop_device_keys(txn, db: dict, device: str) -> None:
    """Delete every key of ``device`` (it is removed)."""
    if txn.get(device.encode(), db=db["keys"]) is None:
        return
    txn.delete(device.encode(), db=db["keys"])
    prefix = _prefix(device)
    with txn.cursor(db=db["otks"]) as c:
        if c.set_range(prefix):
            while c.key().startswith(prefix):
                if not c.delete():
                    break


def count_txn(txn, db: dict, device: str) -> int:
    raw = txn.get(device.encode(), db=db["keys"])
    return 0 if raw is None else _unpack(raw)[3]


def changed_audience(txn, db: dict, user: str) -> list[str]:
    """Who is told that ``user``'s keys changed: the users who have ``user`` in their
    contact set (rcontacts) and those ``user`` sent a message to in the new-chat
    limit's conversation pairs (conv0, conv1: kept by sender), but not ``user``."""
    prefix = _prefix(user)
    out = set()
    for table in ("rcontacts", "conv0", "conv1"):
        with txn.cursor(db=db[table]) as c:
            if c.set_range(prefix):
                for key in c.iternext(keys=True, values=False):
                    if not key.startswith(prefix):
                        break
                    out.add(key[len(prefix) :].decode())
    out.discard(user)
    return sorted(out)


def changed_txn(queues, txn, user: str, now: int) -> list:
    """Queue ``<keys from=user type=changed>`` for every device of ``changed_audience``,
    at most one undelivered per device and user (``Queues.keys_changed``: a newer
    one replaces it); returns the pushes to deliver after the commit."""
    return queues.keys_changed(txn, changed_audience(txn, queues.db, user), user, now)


# -- handlers --------------------------------------------------------------------


def _uploads_text(c) -> str:
    return (f"a device may upload keys {c.key_uploads} times per {c.keys_fetch_window:g} s "
            "(key-uploads): each upload has its signatures checked")  # fmt: skip


def upload(s, ev: KeysUpload) -> None:
    w = s.worker
    c = w.config
    device, user = s.device, s.user
    dev = w.store.device(device)
    if dev is None:
        return
    if bytes(ev.ed25519) != bytes(dev.get("identity_key") or b""):
        s.send(Error(ErrorCode.KEY_MISMATCH,
                     "the Ed25519 key is not this device's identity key", ev.id))  # fmt: skip
        return
    if len(ev.one_time_keys) > c.one_time_keys_max:
        # before any signature is checked: a frame holds up to max-children keys (ids may
        # repeat), and each verify costs the loop about 0.15 ms
        s.send(Error(ErrorCode.KEYS_FULL,
                     f"an upload carries at most {c.one_time_keys_max} one-time keys "
                     f"({len(ev.one_time_keys)} here); nothing was stored", ev.id))  # fmt: skip
        return
    db = w.store._db
    up_key, up_window = f"keyup:{device}".encode(), int(c.keys_fetch_window * 1000)
    with w.store.read() as txn:  # before the signatures are checked (the commit counts it)
        _, used = window_used(txn, db["limits"], up_key, w.store.clock(), up_window)
    if used >= c.key_uploads:
        s.send(Error(ErrorCode.RATE_LIMITED, _uploads_text(c), ev.id))
        return
    try:
        verify_upload(device, ev.ed25519, ev)  # before the commit: no CPU under the writer lock
    except ServiceError as err:
        s.send(Error(err.code, err.text, ev.id))
        return

    def run(txn, now):
        w.store.check_room(txn)
        if not window_take(txn, db["limits"], up_key, now, up_window, c.key_uploads)[0]:
            raise ServiceError(ErrorCode.RATE_LIMITED, _uploads_text(c))
        raw = txn.get(device.encode(), db=db["keys"])
        old = None if raw is None else _unpack(raw)
        changed = old is not None and old[0] != bytes(ev.curve25519)
        if changed:
            # every check before the first write: a refused job writes nothing (worker.Job)
            ok, _ = window_take(txn, db["limits"], f"keychange:{user}".encode(), now,
                                int(c.key_changes_window * 1000), c.key_changes)  # fmt: skip
            if not ok:
                raise ServiceError(
                    ErrorCode.RATE_LIMITED,
                    f"identity keys may change {c.key_changes} times per "
                    f"{c.key_changes_window:g} s per account (key-changes): each change "
                    "notifies every user who "
                    "has this account as a contact",
                )
            # the old account's one-time and fallback keys are of no use with the new one
            drop_device_keys(txn, db, device)
            old = None
        count = 0 if old is None else old[3]
        prefix = _prefix(device)
        new = {}
        for k in ev.one_time_keys:
            key = prefix + k.key_id.encode()
            if key not in new and txn.get(key, db=db["otks"]) is None:
                count += 1
            new[key] = k
        if count > c.one_time_keys_max:
            raise ServiceError(
                ErrorCode.KEYS_FULL,
                f"a device holds at most {c.one_time_keys_max} one-time keys "
                f"({count} with this upload); nothing was stored",
            )
        for key, k in new.items():
            txn.put(key, _pack([bytes(k.key), bytes(k.signature)]), db=db["otks"])
        fallback = old[2] if old is not None else None
        if ev.fallback is not None:
            f = ev.fallback
            fallback = [f.key_id, bytes(f.key), bytes(f.signature)]
        rec = [bytes(ev.curve25519), bytes(ev.ed25519), fallback, count, now]
        txn.put(device.encode(), _pack(rec), db=db["keys"])
        pushes = []
        if old is None:  # a first upload or a new identity key
            pushes = changed_txn(w.queues, txn, user, now)
        return count, pushes

    def done(result) -> None:
        count, pushes = result
        w.deliver(pushes)
        s.send(KeysCount(ev.id, count))

    w.write(run, done, s, ev.id)


def count(s, ev: KeysCountQuery) -> None:
    w = s.worker
    with w.store.read() as txn:
        n = count_txn(txn, w.store._db, s.device)
    s.send(KeysCount(ev.id, n))


def _take(
    txn,
    db: dict,
    device: str,
    low: int,
    queues,
    now: int,
    pushes: list,
    fetcher: str = "",
    per_device: int = 0,
    window_ms: int = 0,
) -> KeyBundle:
    """``device``'s bundle, its first one-time key consumed (queues a low notice).  A
    ``fetcher`` (another user) takes at most ``per_device`` one-time keys of it per
    ``window_ms``; past that its bundle carries the fallback key (nothing consumed)."""
    raw = txn.get(device.encode(), db=db["keys"])
    if raw is None:
        return KeyBundle(device)
    rec = _unpack(raw)
    curve, ed, fallback, n = rec[0], rec[1], rec[2], rec[3]
    otk = None
    if n > 0 and fetcher and per_device:
        key = f"otkf:{fetcher}\x00{device}".encode()
        if not window_take(txn, db["limits"], key, now, window_ms, per_device)[0]:
            n = 0  # this fetcher had its share of this device's keys: the fallback key
    if n > 0:
        prefix = _prefix(device)
        with txn.cursor(db=db["otks"]) as c:
            if c.set_range(prefix) and c.key().startswith(prefix):
                key_id = c.key()[len(prefix) :].decode()
                k, sig = _unpack(c.value())
                c.delete()
                otk = SignedKey(key_id, k, sig)
        rec[3] = n = n - 1 if otk is not None else 0
        txn.put(device.encode(), _pack(rec), db=db["keys"])
        if otk is not None and n == low - 1:  # the fetch that crossed below one-time-keys-low
            pushes += queues.notice_devices(txn, (device,), KEYS_NOTICE, device, "low", now)
    if otk is None and fallback is not None:
        otk = SignedKey(fallback[0], fallback[1], fallback[2], True)
    return KeyBundle(device, curve, ed, otk)


def _fallback(txn, db: dict, device: str) -> KeyBundle:
    """``device``'s bundle with its fallback key (flagged; nothing consumed)."""
    raw = txn.get(device.encode(), db=db["keys"])
    if raw is None:
        return KeyBundle(device)
    curve, ed, fallback = _unpack(raw)[:3]
    otk = None if fallback is None else SignedKey(fallback[0], fallback[1], fallback[2], True)
    return KeyBundle(device, curve, ed, otk)


#: bundles in one answer: the children one node may have (pigeon.core.node.Limits)
MAX_BUNDLES = 1024


def query(s, ev: KeysQuery) -> None:
    w = s.worker
    c = w.config
    user = s.user
    users = list(dict.fromkeys(ev.users))
    if len(users) > c.keys_query_max:
        s.send(Error(ErrorCode.TOO_MANY,
                     f"at most {c.keys_query_max} users per keys request", ev.id))  # fmt: skip
        return
    db = w.store._db
    social = w.social

    def run(txn, now):
        # every check before the first write: a refused job writes nothing (worker.Job)
        groups = social.groups_of(txn, user)
        strangers = [u for u in users if not social.lookup_free(txn, user, u, groups)]
        if strangers:
            _, used = window_used(txn, db["limits"], f"discover:{user}".encode(), now,
                                  int(c.discover_window * 1000))  # fmt: skip
            if used + len(strangers) > c.discover_numbers:
                social.charge_lookup_txn(txn, now, user, strangers[0])  # raises its 302
                raise ServiceError(ErrorCode.RATE_LIMITED, "contact discovery limit")
        accounts, unknown = [], None
        for u in users:
            raw = txn.get(u.encode(), db=db["accounts"])
            if raw is None:
                unknown = unknown or u
            else:
                accounts.append((u, _unpack(raw)["devices"]))
        # a group's members (not contacts, not this account) are "grouped": past
        # keys-fetch-per-account their bundles carry the fallback key instead of
        # refusing the fetch, so a member can reach every device of a 1,024-member
        # group while no account takes more one-time keys than before
        grouped = {u for u, _ in accounts if u != user and groups
                   and txn.get(f"{user}\x00{u}".encode(), db=db["contacts"]) is None
                   and social.shares_group(txn, user, u, groups)}  # fmt: skip
        n = 0 if unknown else sum(len(d) for _, d in accounts)
        n_grouped = 0 if unknown else sum(len(d) for u, d in accounts if u in grouped)
        if n > MAX_BUNDLES:
            raise ServiceError(ErrorCode.TOO_MANY,
                               f"these users have {n} devices: one answer holds at most "
                               f"{MAX_BUNDLES} bundles; ask for fewer users")  # fmt: skip
        window_ms = int(c.keys_fetch_window * 1000)
        key = f"keys:{user}".encode()
        _, used = window_used(txn, db["limits"], key, now, window_ms)
        if used + n - n_grouped > c.keys_fetch_per_account:
            raise ServiceError(
                ErrorCode.RATE_LIMITED,
                f"key fetch limit: {c.keys_fetch_per_account} device bundles per "
                f"{c.keys_fetch_window:g} s ({max(0, c.keys_fetch_per_account - used)} left)",
            )
        for u in strangers:  # a lookup costs, known or not (as the devices query)
            social.charge_lookup_txn(txn, now, user, u)
        if unknown:
            return unknown, ()
        # the one-time keys the grouped devices may still take in this window
        room = max(0, min(n_grouped, c.keys_fetch_per_account - used - (n - n_grouped)))
        if n - n_grouped + room:
            window_take(txn, db["limits"], key, now, window_ms, c.keys_fetch_per_account,
                        n - n_grouped + room)  # fmt: skip
        pushes, out = [], []
        for u, numbers in accounts:
            for number in numbers:
                d = f"{u}:{number}"
                if u in grouped:
                    if not room:  # past the budget: the fallback key, nothing consumed
                        out.append(_fallback(txn, db, d))
                        continue
                    room -= 1
                out.append(_take(txn, db, d, c.one_time_keys_low, w.queues, now,
                                 pushes, "" if u == user else user,
                                 c.keys_per_device, window_ms))  # fmt: skip
        return out, pushes

    def done(result) -> None:
        bundles, pushes = result
        if isinstance(bundles, str):
            s.send(Error(ErrorCode.UNKNOWN_RECIPIENT, f"{bundles} is not a registered user", ev.id))
            return
        w.deliver(pushes)
        s.send(KeyBundles(ev.id, tuple(bundles)))

    w.write(run, done, s, ev.id)
