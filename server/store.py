"""The LMDB store: accounts, devices, one-time codes, rate-limit windows, sessions.

One LMDB environment in ``<data-dir>/store``, opened by each worker after
fork (never inherited across one).  LMDB allows one writer at a time across
all processes, so every write transaction here is short and none is held
across an await.  Records are msgpack maps; keys are ASCII strings.

Tables (LMDB named databases):

    meta      b"format" -> store format version (checked at open)
              b"ver", b"sver" -> u64s counting the transactions that wrote
              accounts or blocks, and sessions (bump_version: the workers' caches)
              b"secret" -> 32 random bytes made at the first open: the key of
              the store's keyed hashes (``secret(purpose)``), never sent
    accounts  phone -> {devices: [n...], next_device: n, created: ms,
                        last_login: ms (of the primary, device 0)}
    devices   "phone:n" -> {salt, stored_key, server_key, iterations,
                            identity_key, created; a linked companion also
                            name, signature (the primary's link signature)
                            and pending (linked, not yet logged in)}
    codes     phone -> {codes: [[hash, salt, expires, attempts], ...], expires}
    limits    "kind:key" -> [hit times, ms] (sliding-window log, newest last)
    sessions  "phone:n" -> {worker, conn, since}  (which worker holds a device)
    pairs     "r:<ref>" or "c:<code>" -> {worker, conn, rid, key, name, phone,
              expires, refresh, used, device}: a companion waiting to be
              linked (server/linking.py), which worker and connection hold it
    queue, qstate, dedup0, dedup1, fan, conv0, conv1, knote: the device queues,
              the anti-spam pairs and where each device's undelivered "keys
              changed" notice from a user is (server/queues.py)
    presence, contacts, rcontacts, blocks: presence, privacy, contacts and
              blocking (server/social.py)
    keys, otks: the key directory, identity, fallback and one-time keys per
              device (server/keydir.py)
    groups, ugroups, ugcount, invites, gbody: groups, their members, each
              user's group count and invite codes (server/groups.py) and
              the group message bodies, stored once (server/queues.py)
    push, pushwake: each device's push target and when it was last woken
              (server/push.py)

Format history (the ``pairs`` table and the new record fields need no
format change: a missing table is created at open, a missing field has
its default): 1 (accounts, devices, codes, limits, sessions); 2 adds the
queue tables; 3 the presence and contact tables; 4 stores queue entries and
queue states in binary (server/queues.py) instead of msgpack; 5 adds the
entry kind of device-list notices and the sync flag of copies for the
sender's own account (server/queues.py); 6 the entry kind of key-directory
notices (kind 3) and the key tables (server/keydir.py): a format-5 store is
upgraded by writing the number, the bump keeps a format-5 pigeon from
opening a store with entries it cannot read; 7 the group tables and five
entry kinds: group notices (4), group message bodies (5, in ``gbody``), the
queues' references to them (6), a device's own entry with its payload,
which refers to the body too (7), and coalesced group receipts (8): a format-6 store is upgraded by writing
the number (its tables are created at open), and the bump keeps a format-6
pigeon from misreading a reference as a message; 8 shortens the references
to 10 bytes (kind, flags, body number: their ``t`` is the body's), one
record per member device of every group message: a format-7 store's are
rewritten at open (``upgrade_refs``), and the bump keeps a format-7 pigeon
from misreading them.  Format-4 entries are format-5
entries as they are (kinds 0 and 1, the sync bit clear), so 4 is upgraded
by writing the new number; the bump keeps a format-4 pigeon from opening a
store whose entries it would misread (it would answer a sync copy's ack
with a delivered receipt, and fail on a notice).  An older
store is upgraded in place at open, in the open's write transaction (new
tables start empty; queued entries are rewritten); a store newer than this
code is refused.  Changes within a format are upgraded at open too, each
once: the join requests of a store from before the ``grq`` index get their
keys there (server/groups.py, ``index_requests``; meta ``grqidx`` says it
is done), else they never expired.

Writemap (``writemap``, the ``store-writemap`` setting, off by default).
With MDB_WRITEMAP LMDB writes pages in place in its shared map instead of
with write calls; LMDB extends the data file to the map size at open, a
full file system becomes a SIGBUS instead of an error, and without fsync a
machine crash can damage the store (docs/OPERATIONS.md, "Durability and
queues", has the measurement and the caveats).  Processes with and
without it must not share an environment: every opener takes it from the
same configuration.

Room (``over_reserve``).  LMDB fails a write transaction that needs a page
past the map.  Deleting needs pages too (copy on write), and a device ack
also writes delivered receipts, so a store filled to the last page could
not even free itself.  The last ``reserve`` bytes of the map are therefore
kept for what frees space or is bounded by the devices that exist (acks
and their receipts, sessions, presence): writes that add data (messages,
registrations, contacts) are refused with 501 once the pages in use pass
``map_size - reserve``.

Nothing a stranger does grows the store without bound: the registration
and pairing limits, one-time codes and pairing records are the only
records written before a login; all expire, pairing records are bounded by
the pairing caps per address (server/linking.py), and ``sweep`` (run by worker 0 with the queue purge) deletes
the ones whose window or lifetime is over even if their key never comes
back.

Time comes from an injectable clock (milliseconds), so tests cover expiry
and windows without sleeping.  A server started with the environment
variable PIGEON_TEST_CLOCK_FILE reads an offset (ms, added to real time) from
that file: the test suite moves a real server's clock forward with it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time

import lmdb
import msgpack

from . import lmdbfile
from .groups import GROUP_TABLES, index_requests
from .keydir import KEY_TABLES, drop_device_keys
from .push import PUSH_TABLES, drop_device_push
from .queues import QUEUE_TABLES, FrameEncoder, drop_device_queue, upgrade_entries, upgrade_refs
from .social import SOCIAL_TABLES, drop_user, release_device

FORMAT_VERSION = 9
ITERATIONS_KEY = b"iterations"  # meta: [[iteration count, devices], ...]
MAX_CODES = 8  # live codes one number keeps, at least (accounts: register-per-phone-total)
_UPGRADABLE = (1, 2, 3, 4, 5, 6, 7, 8)  # formats opened and upgraded in place
_MSGPACK_QUEUES = (2, 3)  # formats whose queue entries are rewritten (upgrade_entries)
_TABLES = (
    "meta", "accounts", "devices", "codes", "limits", "sessions", "pairs", *QUEUE_TABLES,
    *SOCIAL_TABLES, *KEY_TABLES, *GROUP_TABLES, *PUSH_TABLES,
)  # fmt: skip


# (the write transaction that last bumped a version, the keys it bumped)
_bumped: list = [None, set()]


def bump_version(txn, db: dict, key: bytes = b"ver") -> None:
    """Note in ``txn`` that tables the workers cache changed.

    ``meta[b"ver"]`` moves with every transaction that writes accounts or
    blocks, ``meta[b"sver"]`` with every one that writes sessions; a worker's
    caches of them (server/queues.py) read both once per commit and start
    again when one moved, so they are never stale: the count and the change
    commit together.  Each key moves once per transaction, however many
    writes it holds (a tick of logins writes an account and a session record
    for each: one get and put of meta for each key, not two per login).  LMDB
    has one write transaction at a time, so the last one seen is the only one
    open; a new transaction is a new object (the reference kept here stops an
    old one's identity from being reused)."""
    seen = _bumped
    if seen[0] is not txn:
        seen[0] = txn
        seen[1] = {key}
    elif key in seen[1]:
        return
    else:
        seen[1].add(key)
    raw = txn.get(key, db=db["meta"])
    n = 0 if raw is None else int.from_bytes(raw, "big")
    txn.put(key, (n + 1).to_bytes(8, "big"), db=db["meta"])


class StoreError(Exception):
    """The store cannot be used (wrong format, unwritable, full)."""


class StoreFull(lmdb.MapFullError):
    """Refused before writing: only the reserve is left (``Store.over_reserve``).

    A MapFullError, so every caller that handles a full map handles this too."""


def check_data_file(data: str, advice: str = "restore the store from a backup "
                    "(pigeon admin restore)") -> None:  # fmt: skip
    """StoreError if LMDB would read past the end of ``data`` (a ``data.mdb``): LMDB
    would die of SIGBUS there instead of failing (server/lmdbfile.py).  A file
    that does not exist yet is left to LMDB, which makes a new one."""
    try:
        if os.path.getsize(data) == 0:
            # LMDB would start a new store in it; a store emptied by mistake
            # then comes up empty with no word said, so the operator decides
            raise StoreError(
                f"{data} is empty: if this is a new store whose first start failed, "
                f"delete it; else {advice}"
            )
        lmdbfile.check(data)
    except FileNotFoundError:
        return
    except lmdbfile.Truncated as exc:
        raise StoreError(f"{data} is truncated or corrupt ({exc}): {advice}") from None
    except OSError as exc:
        raise StoreError(f"cannot read {data}: {exc.strerror or exc}") from None


def copy_format(path: str) -> int:
    """The store format of the store copy in ``path`` (a backup), read without writing.

    ``Store`` writes at open (the format, the secret, upgrades), which a
    backup must never see: this opens it read-only and without a lock file
    (a read-only directory is fine), after ``check_data_file``.  StoreError
    if it is no pigeon store (no ``format`` record) or one newer than this
    code."""
    data = os.path.join(path, "data.mdb")
    if not os.path.exists(data):
        raise StoreError(f"no data.mdb in {path}")
    check_data_file(data, "use another backup")
    try:
        env = lmdb.open(path, readonly=True, lock=False, subdir=True, max_dbs=len(_TABLES))
    except lmdb.Error as exc:
        raise StoreError(f"cannot open {data}: {exc}") from None
    try:
        with env.begin() as txn:
            meta = env.open_db(b"meta", txn=txn, create=False)
            raw = txn.get(b"format", db=meta)
    except lmdb.Error:  # no meta table (NotFoundError), or a plain record named so
        raw = None
    finally:
        env.close()
    if raw is None or not raw.isdigit():
        raise StoreError(f"{data} is not a pigeon backup (its store has no format record)")
    if int(raw) != FORMAT_VERSION and int(raw) not in _UPGRADABLE:
        raise StoreError(
            f"{data} holds store format {int(raw)}; this pigeon reads format {FORMAT_VERSION}"
        )
    return int(raw)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class OffsetClock:
    """Real time plus an offset (ms) read from a file: the test suite's clock for a
    real server (PIGEON_TEST_CLOCK_FILE).  The file is re-read when it changes."""

    def __init__(self, path: str):
        self.path = path
        self.stamp = None
        self.offset = 0

    def __call__(self) -> int:
        try:
            st = os.stat(self.path)
            if st.st_mtime_ns != self.stamp:
                with open(self.path) as f:
                    self.offset = int(f.read().strip() or 0)
                self.stamp = st.st_mtime_ns
        except (OSError, ValueError):
            pass
        return now_ms() + self.offset


def default_clock():
    path = os.environ.get("PIGEON_TEST_CLOCK_FILE")
    return OffsetClock(path) if path else now_ms


def make_private(path: str, mode: int) -> bool:
    """chmod ``path`` to ``mode`` if group or others have any access to it.

    Returns False when that was needed but not allowed (the file is someone
    else's): the caller may warn.  A missing file is left alone."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return True
    if not st.st_mode & 0o077:
        return True
    try:
        os.chmod(path, mode)
    except PermissionError:
        return False
    return True


def _pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(raw):
    return None if raw is None else msgpack.unpackb(raw, raw=False)


def _net_tries(code: list) -> dict:
    """The wrong tries per network of one code of a ``codes`` record (added to
    a code written before they were counted)."""
    if len(code) < 5:
        code.append({})
    return code[4]


class Store:
    def __init__(
        self,
        path: str,
        *,
        map_size: int = 8 << 30,
        max_readers: int = 126,
        clock=None,
        sync: str = "fsync",
        create: bool = True,
        reserve: int = 0,
        writemap: bool = False,
    ):
        """``sync``: "fsync" flushes every commit to disk (survives power loss);
        "os" leaves the flush to the OS (survives a crash of pigeon, not of the
        machine).  ``create=False``: a missing store is an error, not a new one.
        ``reserve``: bytes at the end of the map only freeing writes may use
        (``over_reserve``).  ``writemap``: MDB_WRITEMAP (the module doc); every
        process that opens the store must agree on it."""
        if sync not in ("fsync", "os"):
            raise ValueError(f"sync must be 'fsync' or 'os', got {sync!r}")
        if not create and not os.path.exists(os.path.join(path, "data.mdb")):
            raise StoreError(f"no store in {path} (is --data-dir right?)")
        # Private whatever the umask: the store holds queued payloads and the
        # SCRAM keys.  lmdb's mode is the files' creation mode; files left by
        # an older pigeon (0644 under a 022 umask) are tightened here too.
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except OSError as exc:  # a data dir in /proc, read-only, or a file named store
            raise StoreError(f"cannot create the store directory {path}: {exc.strerror}") from None
        make_private(path, 0o700)
        check_data_file(os.path.join(path, "data.mdb"))
        try:
            self.env = lmdb.open(
                path,
                map_size=map_size,
                max_dbs=len(_TABLES),
                max_readers=max_readers,
                subdir=True,
                sync=sync == "fsync",
                writemap=writemap,
                mode=0o600,
            )
        except lmdb.Error as exc:
            raise StoreError(f"cannot open the store in {path}: {exc}") from None
        for name in ("data.mdb", "lock.mdb"):
            make_private(os.path.join(path, name), 0o600)
        self.clock = clock or default_clock()
        # Reader slots of processes that died (kill -9) would pin old pages.
        self.env.reader_check()
        self._db = {name: self.env.open_db(name.encode()) for name in _TABLES}
        with self.env.begin(write=True) as txn:
            raw = txn.get(b"format", db=self._db["meta"])
            if raw is not None and int(raw) in _MSGPACK_QUEUES:
                upgrade_entries(txn, self._db, FrameEncoder())
            if raw is not None and int(raw) == 7:  # 18-byte references
                upgrade_refs(txn, self._db)
            if raw is None or int(raw) in _UPGRADABLE:
                txn.put(b"format", str(FORMAT_VERSION).encode(), db=self._db["meta"])
            elif int(raw) != FORMAT_VERSION:
                raise StoreError(
                    f"{path} holds store format {int(raw)}; this pigeon reads format {FORMAT_VERSION}"
                )
            if txn.get(b"secret", db=self._db["meta"]) is None:
                txn.put(b"secret", os.urandom(32), db=self._db["meta"])
            index_requests(txn, self._db)  # (once: join requests from before grq)
        self.reserve = reserve
        self._main = self.env.open_db(None)
        self._psize = self.env.stat()["psize"]

    def close(self) -> None:
        self.env.close()

    def _count_iterations(self, txn, iterations: int) -> None:
        """Count a new device's PBKDF2 iteration count in the store's tally."""
        tally = self.iteration_tally(txn)
        tally[iterations] = tally.get(iterations, 0) + 1
        txn.put(ITERATIONS_KEY, _pack(sorted(tally.items())), db=self._db["meta"])

    def iteration_tally(self, txn=None) -> dict[int, int]:
        """{iteration count: devices given it} over the devices ever made (since
        the tally was kept; removals are not subtracted)."""
        if txn is None:
            with self.read() as txn:
                return self.iteration_tally(txn)
        raw = txn.get(ITERATIONS_KEY, db=self._db["meta"])
        return {} if raw is None else {int(k): int(n) for k, n in _unpack(raw)}

    def secret(self, purpose: bytes) -> bytes:
        """A key for ``purpose``, derived from the store's secret (the same in every worker)."""
        with self.read() as txn:
            master = txn.get(b"secret", db=self._db["meta"])
        return hmac.new(master, purpose, hashlib.sha256).digest()

    def pages_used(self, txn) -> tuple[int, int]:
        """(pages holding data, page size): every table's tree plus the two meta pages.

        Free pages (LMDB reuses them) are not counted: after a burst the
        file's high-water mark stays up while the data shrinks."""
        pages = 2
        for db in (self._main, *self._db.values()):
            st = txn.stat(db)
            pages += st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
        return pages, self._psize

    def over_reserve(self, txn) -> bool:
        """True when data fills the map past ``map_size - reserve`` (see the module doc)."""
        if not self.reserve:
            return False
        info = self.env.info()
        soft = info["map_size"] - self.reserve
        # Cheap first: the high-water mark bounds what is in use.
        if (info["last_pgno"] + 1) * self._psize <= soft:
            return False
        pages, psize = self.pages_used(txn)
        return pages * psize > soft

    def check_room(self, txn) -> None:
        """Raise StoreFull when a write that adds data must be refused (over_reserve)."""
        if self.over_reserve(txn):
            raise StoreFull("the store is full")

    # -- plumbing ---------------------------------------------------------

    def _get(self, txn, table: str, key: str):
        return _unpack(txn.get(key.encode(), db=self._db[table]))

    def _put(self, txn, table: str, key: str, value) -> None:
        txn.put(key.encode(), _pack(value), db=self._db[table])
        if table == "accounts":
            bump_version(txn, self._db)
        elif table == "sessions":
            bump_version(txn, self._db, b"sver")

    def _delete(self, txn, table: str, key: str) -> None:
        txn.delete(key.encode(), db=self._db[table])
        if table == "accounts":
            bump_version(txn, self._db)
        elif table == "sessions":
            bump_version(txn, self._db, b"sver")

    def read(self):
        return self.env.begin()

    def write(self):
        return self.env.begin(write=True)

    # -- accounts and devices -----------------------------------------------

    def account(self, phone: str) -> dict | None:
        with self.read() as txn:
            return self._get(txn, "accounts", phone)

    def device(self, address: str) -> dict | None:
        with self.read() as txn:
            return self._get(txn, "devices", address)

    def register_device(
        self, phone: str, identity_key: bytes, keys: tuple
    ) -> tuple[str, list[str]]:
        """Give ``phone`` a new primary device, replacing any it had.

        ``keys`` = (salt, stored_key, server_key, iterations) from SCRAM.
        Returns (the new device address, the addresses of removed devices).
        Device numbers are never reused for a phone, so a stale session of a
        removed device can never be mistaken for the new one.
        """
        now = self.clock()
        with self.write() as txn:
            self.check_room(txn)
            acct = self._get(txn, "accounts", phone)
            removed = []
            if acct is None:
                acct = {"devices": [], "next_device": 0, "created": now}
            for n in acct["devices"]:
                addr = f"{phone}:{n}"
                removed.append(addr)
                self._delete(txn, "devices", addr)
                drop_device_queue(txn, self._db, addr)
                drop_device_push(txn, self._db, addr)
                drop_device_keys(txn, self._db, addr)
            acct["devices"] = []
            address = self._add_device(txn, phone, acct, identity_key, keys, now)
        return address, removed

    def link_device(self, phone: str, identity_key: bytes, keys: tuple) -> str:
        """Add a linked device to an existing account (beside its primary); returns its address.

        ``keys`` as for register_device.  Raises StoreError if there is no
        such account.  (The operator, bench and test tooling use this: no
        link signature, no pairing, no device-list notice; the protocol's
        ``link`` is server/linking.py.)
        """
        with self.write() as txn:
            acct = self._get(txn, "accounts", phone)
            if acct is None:
                raise StoreError(f"no account {phone}")
            return self._add_device(txn, phone, acct, identity_key, keys, self.clock())

    def _add_device(self, txn, phone: str, acct: dict, identity_key: bytes, keys, now,
                    extra: dict | None = None) -> str:  # fmt: skip
        """Give ``acct`` its next device number and store the device's keys; returns its address.

        ``extra``: more fields of the device record (a companion's name,
        link signature, pending)."""
        salt, stored_key, server_key, iterations = keys
        self._count_iterations(txn, iterations)
        number = acct["next_device"]
        acct["devices"].append(number)
        acct["next_device"] = number + 1
        address = f"{phone}:{number}"
        self._put(txn, "accounts", phone, acct)
        self._put(
            txn,
            "devices",
            address,
            {
                "salt": salt,
                "stored_key": stored_key,
                "server_key": server_key,
                "iterations": iterations,
                "identity_key": identity_key,
                "created": now,
                **(extra or {}),
            },
        )
        return address

    def note_login_txn(self, txn, address: str, now: int, step_ms: int = 3_600_000) -> None:
        """A device logged in (in the login's commit): a companion is no longer
        pending; the primary's login time goes in the account (``last_login``,
        what companion-expiry counts from), at most once a ``step_ms``: a
        write to accounts moves the workers' cache version."""
        phone, _, n = address.partition(":")
        acct = self._get(txn, "accounts", phone)
        if acct is not None and acct["devices"] and acct["devices"][0] == int(n):  # the primary
            if acct.get("last_login", 0) <= now - step_ms:
                acct["last_login"] = now
                self._put(txn, "accounts", phone, acct)
            return
        dev = self._get(txn, "devices", address)
        if dev is not None and dev.get("pending"):
            del dev["pending"]
            self._put(txn, "devices", address, dev)

    def set_disabled(self, phone: str, disabled: bool, reason: str | None = None) -> bool:
        """Disable (or enable) an account: a disabled one cannot log in. False: no such account.

        Disabling records when (``disabled_at``, the store's clock, ms) and
        the operator's ``reason`` for `pigeon admin user show`; enabling
        drops both.  Disabling a disabled account again keeps its first time.
        """
        with self.write() as txn:
            acct = self._get(txn, "accounts", phone)
            if acct is None:
                return False
            if disabled:
                if not acct.get("disabled") or "disabled_at" not in acct:
                    acct["disabled_at"] = self.clock()
                if reason is not None or not acct.get("disabled"):
                    acct["disabled_reason"] = reason
            else:
                acct.pop("disabled_at", None)
                acct.pop("disabled_reason", None)
            acct["disabled"] = disabled
            self._put(txn, "accounts", phone, acct)
        return True

    def remove_device(self, address: str) -> bool:
        """Log a device out for good (its keys and session go)."""
        with self.write() as txn:
            return self.remove_device_txn(txn, address, self.clock())

    def remove_device_txn(self, txn, address: str, now: int) -> bool:
        """remove_device inside ``txn``."""
        phone, _, n = address.partition(":")
        acct = self._get(txn, "accounts", phone)
        if acct is None or int(n) not in acct["devices"]:
            return False
        acct["devices"].remove(int(n))
        self._put(txn, "accounts", phone, acct)
        self._delete(txn, "devices", address)
        self._delete(txn, "sessions", address)
        release_device(txn, self._db, address, None, None, now)
        drop_device_queue(txn, self._db, address)
        drop_device_push(txn, self._db, address)
        drop_device_keys(txn, self._db, address)
        return True

    def delete_account(self, phone: str) -> list[str]:
        """Remove the account, its devices and their sessions; returns the device addresses."""
        with self.write() as txn:
            return self.delete_account_txn(txn, phone)

    def delete_account_txn(self, txn, phone: str) -> list[str]:
        """delete_account inside ``txn``."""
        acct = self._get(txn, "accounts", phone)
        if acct is None:
            return []
        gone = [f"{phone}:{n}" for n in acct["devices"]]
        for addr in gone:
            self._delete(txn, "devices", addr)
            self._delete(txn, "sessions", addr)
            drop_device_queue(txn, self._db, addr)
            drop_device_push(txn, self._db, addr)
            drop_device_keys(txn, self._db, addr)
        self._delete(txn, "accounts", phone)
        drop_user(txn, self._db, phone)
        return gone

    # -- one-time codes -----------------------------------------------------

    def put_code(self, phone: str, code_hash: bytes, salt: bytes, ttl_ms: int,
                 max_attempts: int = 5) -> None:  # fmt: skip
        with self.write() as txn:
            self.check_room(txn)
            self.put_code_txn(txn, self.clock(), phone, code_hash, salt, ttl_ms, max_attempts)

    @staticmethod
    def _live_codes(rec, now: int, max_attempts: int) -> list:
        """The codes of a record still valid: [[hash, salt, expires, attempts,
        {network: attempts}], ...] (the last missing in a record written before
        wrong tries were counted per network)."""
        if rec is None:
            return []
        if "codes" not in rec:  # a record written before several codes were kept
            rec = {"codes": [[rec["hash"], rec["salt"], rec["expires"], rec["attempts"]]]}
        return [c for c in rec["codes"] if c[2] > now and c[3] < max_attempts]

    def put_code_txn(self, txn, now: int, phone: str, code_hash: bytes, salt: bytes,
                     ttl_ms: int, max_attempts: int = 5,
                     max_codes: int = MAX_CODES) -> None:  # fmt: skip
        """put_code inside ``txn``: the new code joins the number's live ones (a
        new request voids none of them; each keeps its expiry and its count of
        wrong tries), at most ``max_codes``, the oldest dropped first (never, when
        it is at least the requests the rate limits allow within a code's life)."""
        live = self._live_codes(self._get(txn, "codes", phone), now, max_attempts)
        live.append([code_hash, salt, now + ttl_ms, 0, {}])
        live = live[-max_codes:]
        self._put(txn, "codes", phone, {"codes": live, "expires": max(c[2] for c in live)})

    def take_code(self, phone: str, check, max_attempts: int,
                  failures: tuple[str, int, int] | None = None,
                  per_net: tuple[str, int] | None = None) -> str:  # fmt: skip
        """Check a code with ``check(salt, hash) -> bool`` against each live code of
        ``phone``, atomically.

        Returns "ok" (that code is consumed, and the number's others with it),
        "wrong" (a wrong try is counted on every code tried; one with
        max_attempts of them is void), "none" (no live code) or "refused":
        ``failures`` (key, limit, window_ms: the sender's window of wrong
        codes) is full, and no code was tried; a wrong code is counted in it.
        ``per_net`` (network, limit): a code is tried only while fewer than
        ``limit`` wrong tries came from that network (each code keeps a count
        per network), so one network's wrong codes void only its own chance;
        a network none is left for gets "none" and the others keep theirs.
        """
        with self.write() as txn:
            now = self.clock()
            if failures is not None and self.window_full(txn, *failures, now):
                return "refused"
            rec = self._get(txn, "codes", phone)
            live = self._live_codes(rec, now, max_attempts)
            if not live:
                if rec is not None:
                    self._delete(txn, "codes", phone)
                return "none"
            tried = live
            if per_net is not None:
                net, limit = per_net
                tried = [c for c in live if _net_tries(c).get(net, 0) < limit]
                if not tried:  # void for this network only: nothing changes
                    return "none"
            # every code tried is checked (no early exit: the time does not say which)
            hit = [check(c[1], c[0]) for c in tried]
            if any(hit):
                self._delete(txn, "codes", phone)
                return "ok"
            for c in tried:
                c[3] += 1
                if per_net is not None:
                    nets = _net_tries(c)
                    nets[net] = nets.get(net, 0) + 1
            live = [c for c in live if c[3] < max_attempts]
            if live:
                self._put(txn, "codes", phone, {"codes": live, "expires": max(c[2] for c in live)})
            else:
                self._delete(txn, "codes", phone)
            if failures is not None:  # (at most verify-failures times per window)
                self.hit_txn(txn, *failures, now)
            return "wrong"

    # -- rate limits ----------------------------------------------------------

    def hit_txn(self, txn, key: str, limit: int, window_ms: int, now: int) -> bool:
        """A sliding-window limit shared by every worker, inside ``txn`` (a job of the
        tick's commit): True (and the hit recorded) if under ``limit``."""
        hits = [t for t in (self._get(txn, "limits", key) or []) if t > now - window_ms]
        if len(hits) >= limit:
            return False  # refused: nothing written (the sweep drops what went stale)
        hits.append(now)
        self._put(txn, "limits", key, hits)
        return True

    def window_full(self, txn, key: str, limit: int, window_ms: int, now: int) -> bool:
        """Would ``hit_txn`` refuse? (Reads only.)"""
        return self.window_wait(txn, key, limit, window_ms, now) > 0

    def window_wait(self, txn, key: str, limit: int, window_ms: int, now: int) -> int:
        """Milliseconds until ``hit_txn`` would take one more hit: 0 when it would now
        (reads only; the answer of a refusal says it: limits.retry_in)."""
        hits = sorted(t for t in (self._get(txn, "limits", key) or []) if t > now - window_ms)
        if limit <= 0:  # (nothing ever fits)
            return window_ms
        if len(hits) < limit:
            return 0
        return max(1, hits[len(hits) - limit] + window_ms - now)

    def sweep(self, max_window_ms: int, start: tuple[bytes, bytes] = (b"", b""),
              batch: int = 1000) -> tuple[int, tuple[bytes, bytes]]:  # fmt: skip
        """Delete rate-limit logs and one-time codes that can no longer matter.

        A ``limits`` log whose newest hit is older than ``max_window_ms`` (the
        longest window of any limit) is dead, and so is a code past its
        expiry; both are otherwise deleted only when their key is used again.
        Walks at most ``batch`` keys of each table from ``start`` in one short
        write transaction; returns (records deleted, where to go on: (b"",
        b"") when both tables are done).
        """
        now = self.clock()
        deleted = 0
        nxt = []
        with self.write() as txn:
            for table, key in zip(("limits", "codes"), start, strict=True):
                if key is None:
                    nxt.append(None)
                    continue
                cur = txn.cursor(db=self._db[table])
                more = None
                if cur.set_range(key):
                    seen = 0
                    while True:
                        k = cur.key()
                        if not k:  # past the last record
                            break
                        if seen >= batch:
                            more = k
                            break
                        seen += 1
                        rec = _unpack(cur.value())
                        if table == "codes":
                            dead = rec["expires"] <= now
                        else:  # [t, ...] (Store.hit_txn) or [[t, weight], ...] (limits.window_take)
                            last = rec[-1] if rec else 0
                            newest = last[0] if isinstance(last, list) else last
                            dead = newest <= now - max_window_ms
                        if dead:
                            deleted += 1
                            cur.delete()  # and on to the next record
                        elif not cur.next():
                            break
                nxt.append(more)
        if nxt[0] is None and nxt[1] is None:
            return deleted, (b"", b"")
        return deleted, tuple(nxt)

    # -- sessions ---------------------------------------------------------------

    def set_session(self, address: str, worker: int, conn: int) -> tuple[dict | None, bool]:
        """Record that ``worker`` holds ``address``; returns (the session it replaces,
        whether the user went offline): a new login starts unavailable, so an
        availability the device's earlier connection left is dropped here."""
        with self.write() as txn:
            return self.set_session_txn(txn, address, worker, conn, self.clock())

    def set_session_txn(self, txn, address: str, worker: int, conn: int, now: int):
        """set_session inside ``txn`` (the worker's tick commit)."""
        old = self._get(txn, "sessions", address)
        self._put(txn, "sessions", address, {"worker": worker, "conn": conn, "since": now})
        return old, release_device(txn, self._db, address, None, None, now)

    def clear_session(self, address: str, worker: int, conn: int) -> bool:
        """Forget the session (and the device's availability), if it is still this
        worker's connection.  True if the device's user went offline with it."""
        with self.write() as txn:
            return self.clear_session_txn(txn, address, worker, conn, self.clock())

    def clear_session_txn(self, txn, address: str, worker: int, conn: int, now: int) -> bool:
        """clear_session inside ``txn``."""
        cur = self._get(txn, "sessions", address)
        if cur is not None and cur["worker"] == worker and cur["conn"] == conn:
            self._delete(txn, "sessions", address)
        return release_device(txn, self._db, address, worker, conn, now)

    def clear_worker_sessions(self, worker: int) -> tuple[int, list[str]]:
        """Drop every session a (restarted) worker held, and the availability its
        devices had; returns (how many sessions, the users that went offline)."""
        n = 0
        offline = []
        now = self.clock()
        with self.write() as txn:
            cur = txn.cursor(db=self._db["sessions"])
            for key, raw in list(cur):
                rec = _unpack(raw)
                if rec["worker"] == worker:
                    txn.delete(key, db=self._db["sessions"])
                    bump_version(txn, self._db, b"sver")
                    n += 1
                    device = key.decode()
                    if release_device(txn, self._db, device, worker, rec["conn"], now):
                        offline.append(device.partition(":")[0])
        return n, offline

    def sessions_of(self, phone: str) -> dict[str, dict] | None:
        """The live sessions of a user's devices, {device address: session}; None: no such user."""
        with self.read() as txn:
            acct = self._get(txn, "accounts", phone)
            if acct is None:
                return None
            out = {}
            for n in acct["devices"]:
                addr = f"{phone}:{n}"
                s = self._get(txn, "sessions", addr)
                if s is not None:
                    out[addr] = s
            return out
