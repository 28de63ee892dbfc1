"""Presence state, privacy, contacts and blocking, over the store.

Tables (named databases in the store's environment; keys are ASCII):

    presence   user -> {"a": {device number: [worker, conn]},  devices marked available
                        "last": ms or None,                    last seen (went offline)
                        "priv": {"last": v, "online": v}}      v: everyone | contacts | nobody
    contacts   user NUL contact -> b""   the registered users found in the user's address book
    rcontacts  contact NUL user -> b""   the same pairs reversed (for account deletion)
    blocks     blocker NUL blocked -> time blocked (ms, 8 bytes big-endian)

What is kept and why (docs/OPERATIONS.md says the same to operators): a
contact pair is stored only when the number is a registered user at the
time of the lookup, and is deleted when either account is deleted; numbers
that are not users are looked up and forgotten within the request.  The
anti-spam rule (server/queues.py) adds which pairs of users exchanged a
message, for between one and two ``new-chats-window``s.

A user is online while any of their devices is connected and marked
available; each entry of "a" names the worker and connection that marked it,
so a stale disconnect (or a crashed worker's cleanup) removes only its own.
When the last available device goes, "last" becomes the server time.
"""

from __future__ import annotations

import msgpack

from pigeon.core.errors import ErrorCode

from .errors import ServiceError
from .limits import window_take, window_used

SOCIAL_TABLES = ("presence", "contacts", "rcontacts", "blocks")
PRIVACY_KEYS = ("last", "online")
DEFAULT_PRIVACY = {"last": "everyone", "online": "everyone"}

AVAILABLE, UNAVAILABLE = "available", "unavailable"
#: what a viewer who may see nothing is shown (the same as for a non-user)
HIDDEN = (UNAVAILABLE, None)


def _bump(txn, db: dict) -> None:
    """Blocks changed: the workers' caches of them start again (store.bump_version)."""
    from .store import bump_version  # store imports this module

    bump_version(txn, db)


def pair(a: str, b: str) -> bytes:
    return f"{a}\x00{b}".encode()


def _pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(raw):
    return msgpack.unpackb(raw, raw=False)


def load_presence(txn, db: dict, user: str) -> dict:
    raw = txn.get(user.encode(), db=db["presence"])
    if raw is None:
        return {"a": {}, "last": None, "priv": dict(DEFAULT_PRIVACY)}
    return _unpack(raw)


def _prefix_keys(txn, dbi, prefix: bytes) -> list[bytes]:
    out = []
    with txn.cursor(db=dbi) as c:
        if c.set_range(prefix):
            for key in c.iternext(keys=True, values=False):
                if not key.startswith(prefix):
                    break
                out.append(key)
    return out


def groups_of(txn, db: dict, user: str) -> set[bytes]:
    """The numbers of the groups ``user`` is a member of (``ugroups``)."""
    prefix = f"{user}\x00".encode()
    return {k[len(prefix) :] for k in _prefix_keys(txn, db["ugroups"], prefix)}


def shares_group(txn, db: dict, user: str, other: str, groups: set | None = None) -> bool:
    """Are ``user`` and ``other`` (not ``user``) members of one group?  A member
    sees every member's number in the group's ``info`` anyway, and a number is
    a member only if it is registered and was added by an admin (who looked it
    up: ``Groups._may_add``) or joined with an invite itself: its device list
    and keys tell a co-member nothing about which numbers are registered.
    ``groups``: ``groups_of(user)``, when the caller has it."""
    if other == user:
        return False
    if groups is None:
        groups = groups_of(txn, db, user)
    if not groups:
        return False
    prefix = f"{other}\x00".encode()
    with txn.cursor(db=db["ugroups"]) as c:
        if c.set_range(prefix):
            for key in c.iternext(keys=True, values=False):
                if not key.startswith(prefix):
                    break
                if key[len(prefix) :] in groups:
                    return True
    return False


def _count_prefix(txn, dbi, prefix: bytes, cap: int) -> int:
    """How many keys start with ``prefix``, counting no further than ``cap``."""
    n = 0
    with txn.cursor(db=dbi) as c:
        if c.set_range(prefix):
            for key in c.iternext(keys=True, values=False):
                if not key.startswith(prefix) or n >= cap:
                    break
                n += 1
    return n


def _has_prefix(txn, dbi, prefix: bytes) -> bool:
    with txn.cursor(db=dbi) as c:
        return c.set_range(prefix) and c.key().startswith(prefix)


def release_device(txn, db: dict, device: str, worker: int | None, conn: int | None,
                   now: int) -> bool:  # fmt: skip
    """Drop ``device``'s availability if (worker, conn) marked it (None: whoever did).

    Returns True when its user went offline (then "last" is ``now``).
    """
    user, _, n = device.partition(":")
    raw = txn.get(user.encode(), db=db["presence"])
    if raw is None:
        return False
    rec = _unpack(raw)
    held = rec["a"].get(n)
    if held is None or (worker is not None and held != [worker, conn]):
        return False
    del rec["a"][n]
    offline = not rec["a"]
    if offline:
        rec["last"] = now
    txn.put(user.encode(), _pack(rec), db=db["presence"])
    return offline


def drop_user(txn, db: dict, user: str) -> None:
    """An account is deleted: its presence, its contact pairs (both ways) and its blocks go."""
    txn.delete(user.encode(), db=db["presence"])
    prefix = f"{user}\x00".encode()
    for key in _prefix_keys(txn, db["contacts"], prefix):
        txn.delete(key, db=db["contacts"])
        other = key[len(prefix) :].decode()
        txn.delete(pair(other, user), db=db["rcontacts"])
    for key in _prefix_keys(txn, db["rcontacts"], prefix):
        txn.delete(key, db=db["rcontacts"])
        other = key[len(prefix) :].decode()
        txn.delete(pair(other, user), db=db["contacts"])
    for key in _prefix_keys(txn, db["blocks"], prefix):
        txn.delete(key, db=db["blocks"])
    _bump(txn, db)


class Social:
    """Presence, privacy, contacts and blocks for one worker (``config``: the server's)."""

    def __init__(self, store, config):
        self.store = store
        self.env = store.env
        self.db = store._db
        self.clock = store.clock
        self.config = config

    # -- presence -------------------------------------------------------------

    def set_available(self, device: str, worker: int, conn: int, available: bool) -> bool:
        """A device marks itself available or not; True if its user's presence changed."""
        with self.env.begin(write=True) as txn:
            return self.set_available_txn(txn, self.clock(), device, worker, conn, available)

    def set_available_txn(self, txn, now: int, device: str, worker: int, conn: int,
                          available: bool) -> bool:  # fmt: skip
        """set_available inside ``txn`` (the worker's tick commit)."""
        user, _, n = device.partition(":")
        if not available:
            return release_device(txn, self.db, device, None, None, now)
        rec = load_presence(txn, self.db, user)
        was_online = bool(rec["a"])
        if rec["a"].get(n) == [worker, conn]:
            return False
        rec["a"][n] = [worker, conn]
        txn.put(user.encode(), _pack(rec), db=self.db["presence"])
        return not was_online

    def presence(self, user: str) -> dict:
        with self.env.begin() as txn:
            return load_presence(txn, self.db, user)

    def views(self, user: str, viewers) -> dict[str, tuple[str, int | None]]:
        """What each viewer (a user) may see of ``user``'s presence: (type, last or None).

        Blocked viewers and viewers the privacy settings exclude see HIDDEN,
        which is also what a non-user looks like.  Online hidden, last seen
        shown: "unavailable" with the last time the user went offline.
        """
        db = self.db
        with self.env.begin() as txn:
            if txn.get(user.encode(), db=db["accounts"]) is None:
                return dict.fromkeys(viewers, HIDDEN)
            rec = load_presence(txn, db, user)
            online = bool(rec["a"])
            last = rec["last"]
            p_online, p_last = rec["priv"]["online"], rec["priv"]["last"]
            full = (AVAILABLE, None) if online else (UNAVAILABLE, last)
            public = p_online == "everyone" and p_last == "everyone"
            blocks = _has_prefix(txn, db["blocks"], f"{user}\x00".encode())
            out = {}
            for v in viewers:
                if v == user:
                    out[v] = full
                    continue
                if blocks and txn.get(pair(user, v), db=db["blocks"]) is not None:
                    out[v] = HIDDEN
                    continue
                if public:
                    out[v] = full
                    continue
                contact = None
                see = []
                for p in (p_online, p_last):
                    if p == "everyone":
                        see.append(True)
                    elif p == "nobody":
                        see.append(False)
                    else:
                        if contact is None:
                            contact = txn.get(pair(user, v), db=db["contacts"]) is not None
                        see.append(contact)
                typ = AVAILABLE if online and see[0] else UNAVAILABLE
                out[v] = (typ, last if see[1] and typ == UNAVAILABLE else None)
            return out

    def privacy(self, user: str, changes: dict) -> tuple[dict, bool]:
        """Apply ``changes`` ({"last"/"online": value}); returns (settings, changed)."""
        with self.env.begin(write=bool(changes)) as txn:
            return self.privacy_txn(txn, self.clock(), user, changes)

    def privacy_txn(self, txn, now: int, user: str, changes: dict) -> tuple[dict, bool]:
        """privacy inside ``txn`` (a read transaction will do when nothing changes)."""
        rec = load_presence(txn, self.db, user)
        new = {**rec["priv"], **changes}
        if new == rec["priv"]:
            return new, False
        rec["priv"] = new
        txn.put(user.encode(), _pack(rec), db=self.db["presence"])
        return new, True

    # -- typing ---------------------------------------------------------------

    def chatstate_targets(self, sender: str, to: str) -> dict[str, int]:
        """{device: worker} of ``to``'s connected devices.

        Empty when either user blocks the other, or ``to`` is not a user:
        typing is then dropped, the same way (no answer tells which numbers
        are registered).
        """
        db = self.db
        with self.env.begin() as txn:
            raw = txn.get(to.encode(), db=db["accounts"])
            if raw is None:
                return {}
            if (
                txn.get(pair(to, sender), db=db["blocks"]) is not None
                or txn.get(pair(sender, to), db=db["blocks"]) is not None
            ):
                return {}
            out = {}
            for n in _unpack(raw)["devices"]:
                device = f"{to}:{n}"
                s = txn.get(device.encode(), db=db["sessions"])
                if s is not None:
                    out[device] = _unpack(s)["worker"]
            return out

    # -- contact discovery ------------------------------------------------------

    def discover(self, user: str, mode: str, phones) -> tuple[list[str], int, bool]:
        """Look up ``phones`` and update the contact set; returns (users, room left, changed).

        Only numbers not already in the contact set count against the
        sliding window (re-syncing a known address book costs nothing), and
        a refused request changes and records nothing.
        """
        with self.env.begin(write=True) as txn:
            return self.discover_txn(txn, self.clock(), user, mode, phones)

    def discover_txn(self, txn, now: int, user: str, mode: str, phones):
        """discover inside ``txn``: every check comes before the first write, so a
        refusal (ServiceError, StoreFull) leaves ``txn`` as it was."""
        c = self.config
        if len(phones) > c.discover_batch:
            raise ServiceError(
                ErrorCode.TOO_MANY, f"at most {c.discover_batch} numbers per discover request"
            )
        db = self.db
        window_ms = int(c.discover_window * 1000)
        key = f"discover:{user}".encode()
        asked = [p for p in dict.fromkeys(phones) if p != user]
        prefix = f"{user}\x00".encode()
        current = {k[len(prefix) :].decode() for k in _prefix_keys(txn, db["contacts"], prefix)}
        if mode == "remove":
            gone = [p for p in asked if p in current]
            for p in gone:
                txn.delete(pair(user, p), db=db["contacts"])
                txn.delete(pair(p, user), db=db["rcontacts"])
            _, used = window_used(txn, db["limits"], key, now, window_ms)
            return [], max(0, c.discover_numbers - used), bool(gone)
        new = [p for p in asked if p not in current]
        self.store.check_room(txn)
        _, used = window_used(txn, db["limits"], key, now, window_ms)
        if used + len(new) > c.discover_numbers:
            left = max(0, c.discover_numbers - used)
            raise ServiceError(
                ErrorCode.RATE_LIMITED,
                f"contact discovery limit: {left} more new numbers may be looked up in "
                f"this {c.discover_window:g} s window, this request has {len(new)}",
            )
        accounts = db["accounts"]
        found = [p for p in asked if p in current or txn.get(p.encode(), db=accounts)]
        keep = set(found) if mode == "full" else current | set(found)
        if len(keep) > c.contacts_max:
            raise ServiceError(ErrorCode.TOO_MANY, f"at most {c.contacts_max} contacts per account")
        _, left = window_take(txn, db["limits"], key, now, window_ms, c.discover_numbers, len(new))
        for p in current - keep:
            txn.delete(pair(user, p), db=db["contacts"])
            txn.delete(pair(p, user), db=db["rcontacts"])
        for p in keep - current:
            txn.put(pair(user, p), b"", db=db["contacts"])
            txn.put(pair(p, user), b"", db=db["rcontacts"])
        return found, left, keep != current

    def lookup_free(self, txn, user: str, other: str, groups: set | None = None) -> bool:
        """True if ``user`` may look ``other`` up (device list, keys) without cost:
        itself, a number already in its contact set (paid for by discovery), or a
        member of a group ``user`` is in (``shares_group``; ``groups``: ``groups_of``
        ``user``, when the caller asks about many)."""
        return (
            other == user
            or txn.get(pair(user, other), db=self.db["contacts"]) is not None
            or self.shares_group(txn, user, other, groups)
        )

    def groups_of(self, txn, user: str) -> set[bytes]:
        """The numbers of the groups ``user`` is a member of (``ugroups``)."""
        return groups_of(txn, self.db, user)

    def shares_group(self, txn, user: str, other: str, groups: set | None = None) -> bool:
        """``shares_group`` over this worker's store."""
        return shares_group(txn, self.db, user, other, groups)

    def charge_lookup_txn(self, txn, now: int, user: str, other: str) -> None:
        """A lookup of a user outside ``user``'s contact set (``lookup_free`` false)
        costs one number of ``discover-numbers``, like contact discovery: a
        device list or a key bundle also tells whether a number is registered,
        so neither may be used to test numbers past that limit (302)."""
        c = self.config
        window_ms = int(c.discover_window * 1000)
        ok, _ = window_take(txn, self.db["limits"], f"discover:{user}".encode(), now, window_ms,
                            c.discover_numbers)  # fmt: skip
        if not ok:
            raise ServiceError(
                ErrorCode.RATE_LIMITED,
                f"contact discovery limit: a user outside your contacts may be looked up "
                f"{c.discover_numbers} times per {c.discover_window:g} s",
            )

    def contacts(self, user: str) -> list[str]:
        prefix = f"{user}\x00".encode()
        with self.env.begin() as txn:
            return [
                k[len(prefix) :].decode() for k in _prefix_keys(txn, self.db["contacts"], prefix)
            ]

    # -- blocking -----------------------------------------------------------------

    def block(self, user: str, other: str) -> int:
        with self.env.begin(write=True) as txn:
            return self.block_txn(txn, self.clock(), user, other)

    def block_txn(self, txn, now: int, user: str, other: str) -> int:
        """block inside ``txn`` (checks first: a refusal writes nothing)."""
        if other == user:
            raise ServiceError(ErrorCode.BAD_REQUEST, "you cannot block yourself")
        db = self.db
        # A number that is not a user is blocked (and listed) like one that is:
        # a different answer would tell anyone which numbers are registered.
        key = pair(user, other)
        if txn.get(key, db=db["blocks"]) is None:
            self.store.check_room(txn)
            if _count_prefix(txn, db["blocks"], f"{user}\x00".encode(),
                             self.config.blocklist_max) >= self.config.blocklist_max:  # fmt: skip
                raise ServiceError(
                    ErrorCode.TOO_MANY, f"at most {self.config.blocklist_max} blocked users"
                )
            txn.put(key, now.to_bytes(8, "big"), db=db["blocks"])
            _bump(txn, db)
        return now

    def unblock(self, user: str, other: str) -> int:
        with self.env.begin(write=True) as txn:
            return self.unblock_txn(txn, self.clock(), user, other)

    def unblock_txn(self, txn, now: int, user: str, other: str) -> int:
        if txn.delete(pair(user, other), db=self.db["blocks"]):
            _bump(txn, self.db)
        return now

    def blocklist(self, user: str) -> list[str]:
        """The users ``user`` blocks, oldest block first: at most ``blocklist-max``.

        At most that many rows are read (the answer is one node, which may
        carry 1,024 children); a store written when the limit was higher may
        hold more: the answer then has the first ``blocklist-max`` in key
        order, and ``block`` refuses more until the list is below the limit.
        """
        prefix = f"{user}\x00".encode()
        dbi = self.db["blocks"]
        cap = self.config.blocklist_max
        rows = []
        with self.env.begin() as txn, txn.cursor(db=dbi) as c:
            if c.set_range(prefix):
                for key, value in c:
                    if not key.startswith(prefix) or len(rows) >= cap:
                        break
                    rows.append((value, key[len(prefix) :].decode()))
        return [u for _, u in sorted(rows)]
