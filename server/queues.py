"""Durable device queues in LMDB: store-and-forward, receipts, dedup, limits.

Theory of operation.  Every device has a FIFO queue in the ``queue`` table,
keyed ``device + NUL + seq`` (seq a big-endian u64), so one device's entries
are contiguous and in sequence order.  ``qstate`` keeps, per device, the
next sequence and the queue's count and bytes (the limits and the operator
view need them without a scan).  An entry is written once, in the binary form of ``Codec.queue_entry``
(pigeon.core._pycodec documents the layout): kind (message or receipt),
``t``, a fan flag, the origin and the id the server needs when the device
acknowledges it, the envelope of the delivery frame already encoded (with
the oldest dictionary version the server accepts: tokens are only ever
appended, so such a frame decodes under every version) and the body.  The
delivery frame is spliced from it only when it is pushed or read
(``Codec.write_entry_frame`` puts the device's ``seq`` between envelope and
body): nothing is re-encoded per device, and the body is copied once into
the entry and once into the connection's output.

    kind   0 message, 1 receipt, 2 device-list notice (``devices_changed``),
           3 key-directory notice (``notice_devices``, ``keys_changed``:
           at most one undelivered "changed" per device and user, its seq
           in ``knote``, device NUL user; server/keydir.py)
    t      server time (ms) the item was accepted
    origin message: the sending device; receipt: the user it comes from (a
           retry receipt: the device); device-list notice: the user whose
           device list changed; key notice: the user (changed) or device (low)
    id     the message id (none for a notice)
    flags  bit 0 (fan), message only: set when the recipient user had several
           devices (then the ``fan`` table holds one record until the first of
           them acks); bit 1 (sync): a copy for the sender's own account (a
           sync copy, a device-to-device message), delivered with ``to`` and
           never answered with a delivered receipt

Fan-out (multi-device accounts).  A message from device S:k to user U goes
to every device of U and, as sync copies (the frame names ``to="U"``), to
every other device of S's account, so each device shows the whole
conversation; a note to self (U = S) goes to S's other devices only.  A
read or played receipt from U:j goes to the devices of the message's
sender and, as a read-sync copy with ``to``, to U's other devices.  With
one body for every device, the recipients share one entry object and the
sync copies another (each entry is a bytes object written to every queue
it goes to): an extra device costs its LMDB put and a ``Push``, nothing
else.  A message may instead carry one payload per device
(``Send.payloads``): its entries are made before the transaction, one per
device, and the transaction checks that the devices they name are exactly
the current lists (recipient's devices plus the sender's other ones);
otherwise it answers 408 with what is missing and what is extra, and
stores nothing.  A message ``to`` a device address of the sender's own
account goes to that device only (device-to-device: history bundles),
flagged sync.  The whole message is one unit for dedup, limits and acks:
every queue it goes to must have room.

``qstate`` values are three big-endian u64: next sequence, count, bytes.

Groups (store format 8).  A group message's body is stored once (``gbody``)
and each member device's queue gets a reference to it (kind 6, 3 to 10
bytes: the layout is with ``_GCOUNT`` below); the body goes when the last
reference is acknowledged.  The member devices' part is batched: the
group's member devices are a cached plan (``_fan_plan``: sorted keys, made
of the group and device-list caches and started again with either), the
queue states the commit lacks are read with one ``getmulti``, and the
compiled ``fan_out`` (fastpath/fanout.pxi; pure Python in core/_pycodec.py)
checks each queue's room, takes its sequence and makes its key and
reference for one ``putmulti``, with no interpreted loop and no Python
object per offline device but its new state and the (key, reference) pair
LMDB takes.  Those states are kept as stored (``_Txn.gstate``, 24 bytes a
device) and written back with the commit's others.  An online device gets
a ``Push``; an offline one only when push wake-ups are configured.

A worker gathers what its connections ask for during one loop tick (messages
and receipts to store, cumulative device acks) and ``commit`` writes it all
in one write transaction; only after it commits are server acks sent and
entries pushed to devices.  A device ack deletes exactly the acknowledged
entries; for a message entry it queues a ``delivered`` receipt for every
device of the sender, once per recipient user.  A commit's device acks and
its plain 1:1 messages (the common case: ``store_plain`` says which) are
each one compiled loop of the codec (``acks``, ``delivered``,
``store_plain``: fastpath/commit.pxi, twins in core/_pycodec.py) that hands
everything else, in order and before writing anything for it, to
``_ack_rest``, ``_delivered`` and ``_store_one``; ``Queues.plain = False``
runs those for everything.

How long each commit's ``begin(write=True)`` waited for LMDB's one writer
(another worker's commit) goes to ``on_write_wait`` once it has committed
(a commit that fails is not counted): the ``pigeon_store_write_wait_seconds``
metric.  docs/STORE.md lists the LMDB operations each kind of item costs
(bench/store_ops.py counts them).

Dedup: a message is remembered by (sending device, id), a read receipt by
(sending device, type, recipient, id), each with the ``t`` of its first
acceptance and a digest of what it was (recipient, type, body: BLAKE2b,
16 bytes), in two generations (``dedup0``/``dedup1``): writes go to the
current one, lookups check both, and when the current one is older than
the window the previous one is emptied and becomes current.  An id is
therefore remembered for at least the window and at most twice it.  A
retry is the same message again (the digests match): it gets the first
ack and is stored once.  The same id with anything else (another
recipient, type or body) is refused with 407 and never acked: acking it
would drop the second message without a word.  (Entries written before
digests were kept hold only ``t``: they are taken as retries.)

Room: a commit whose store is past its reserve (``Store.over_reserve``)
refuses every message and read receipt with 501 but still applies the
device acks and writes their delivered receipts (the reserve is theirs).
Acks can also be applied a few entries at a time (``ack_limit``), so a
map that is full to the last page still frees itself in steps.

Blocking and the new-conversation limit are checked here too, in the same
transaction as the store they guard: a message to a user who blocks the
sender (or a read receipt from them) is acknowledged and not stored for
the recipient (the contract's one stated exception; the sender's own other
devices still get its sync copies, and a stale per-device list its 408, so
the sender's account cannot tell), a
message or receipt to a user the sender blocks is refused (403), and a message that
starts a conversation with a user who does not have the sender as a contact
counts against the sender's ``new-chats`` per window (404 past it).  Which
pairs of users have a conversation is kept like dedup, in two generations
(``conv0``/``conv1``, remembered between one and two windows, refreshed
while the pair keeps talking): nothing else about conversations is kept.

Time (ms) comes from the store's injectable clock.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from functools import partial
from hashlib import blake2b as _blake2b
from operator import itemgetter
from time import perf_counter

import msgpack

from pigeon.core import codec as core_codec
from pigeon.core._pycodec import Push
from pigeon.core.errors import ErrorCode
from pigeon.core.node import Limits
from pigeon.core.tokens import DICTIONARIES

from .limits import window_take
from .social import shares_group

CACHE_MAX = 200_000  # entries of a worker's read caches before they start again

QUEUE_TABLES = ("queue", "qstate", "dedup0", "dedup1", "fan", "conv0", "conv1", "knote")

MESSAGE, RECEIPT, DEVICES, KEYS = 0, 1, 2, 3  # (3: a key-directory notice)
# group notice, group message body, reference to one, group message with a device's
# payload, a group's receipts for one message (coalesced)
GROUP_NOTICE, GMESSAGE, GREF, GPAYLOAD, GRECEIPT = 4, 5, 6, 7, 8
FAN, SYNC = 1, 2  # entry flag bits (Codec.queue_entry)
_CLASS_KIND = {"message": MESSAGE, "receipt": RECEIPT}
_DEDUP_META = b"dedup"
_KEY = itemgetter(0)  # an item's key (flush_state's sort)
_CONV_META = b"conv"
_STORE_FULL = (ErrorCode.STORE_FULL, "the server cannot store this now; retry later")


def _digest(to: str, typ: str, body, payloads=None) -> bytes:
    """What a message was, for telling a retry from an id used again (16 bytes)."""
    if payloads is None and body is not None:  # (a 1:1 message: one call, same digest)
        return _blake2b(f"{to}\x00{typ}\x00".encode() + body, digest_size=16).digest()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{to}\x00{typ}\x00".encode())
    if payloads:
        for device, payload in payloads:
            h.update(f"\x00{device}\x00{len(payload)}\x00".encode())
            h.update(payload)
    if body is not None:  # (a group message has both)
        h.update(body)
    return h.digest()


def spliced_entry(enc, kind: int, t: int, flags: int, origin: str, mid: str, tag: str,
                  attrs: dict, children) -> bytes:  # fmt: skip
    """An entry whose content is written after ``seq`` as it is (kinds 4 and 7):
    ``<tag attrs... t seq>children</tag>`` (pigeon.core._pycodec, "queue entries")."""
    codec, N = enc._codec, enc._node
    head = bytearray(codec.encode(N(tag, {**attrs, "t": str(t)})))
    content = b""
    if children:
        bare = codec.encode(N(tag, {}))
        content = codec.encode(N(tag, {}, children))[len(bare) :]
    if head[0] != 0xF8 or head[1] + 3 > 0xFF:  # LIST_8: such an entry has few attributes
        raise ValueError("an entry's head must be a short list")
    head[1] += 2 + bool(children)  # the seq the delivery adds, and the content
    o, i = origin.encode(), mid.encode()
    out = bytearray((kind,))
    out += _T.pack(t)
    out.append(flags)
    out.append(len(o))
    out += o
    out.append(len(i))
    out += i
    out += len(head).to_bytes(2, "big")
    out += head
    out += content
    return bytes(out)


_packb = msgpack.Packer(use_bin_type=True).pack
_QSTATE = struct.Struct(">QQQ")
_T = struct.Struct(">Q")


def entry_fields(value) -> tuple[int, int, bool, str, str]:
    """(kind, t, fan, origin, id) of a stored queue entry."""
    olen = value[10]
    ilen = value[11 + olen]
    return (
        value[0],
        _T.unpack_from(value, 1)[0],
        bool(value[9] & 1),
        bytes(value[11 : 11 + olen]).decode(),
        bytes(value[12 + olen : 12 + olen + ilen]).decode(),
    )


def _unpackb(raw):
    return msgpack.unpackb(raw, raw=False, use_list=True)


def bump_group_version(txn, db: dict) -> None:
    """Note in ``txn`` that a group changed (``meta["gver"]``: the membership caches)."""
    raw = txn.get(b"gver", db=db["meta"])
    n = 0 if raw is None else int.from_bytes(raw, "big")
    txn.put(b"gver", (n + 1).to_bytes(8, "big"), db=db["meta"])


# A group message's body is stored once, in ``gbody``, under its number (u64) and
# b"b" (the kind-5 entry every member device's delivery is spliced from), with a
# count under the number and b"c": (devices still referring to it, its entry's
# length), two u32, then "group NUL sending device NUL id" (for the delivered
# receipts).  Each member device's queue holds a reference (kind 6):
#     kind u8 (6) | flags u8 | number       (3 to 10 bytes; store format 8)
# where the number is the body's u64 without its leading zero bytes (``ref_bytes``;
# ``body_number`` pads it again).  Its ``t`` is the body's (the kind-5 entry's,
# ``entry_t``).  One record per member device of every group message, so each
# byte counts: format 7's references were 18 bytes (kind, t, flags, number);
# ``upgrade_refs`` rewrites them at open.  Its queue bytes count the body
# entry's length, as if the body were in it.
# The fan flag (bit 0) marks a member with several devices: then the number,
# b"f" and the user is a record until the first of them acks (their delivered
# receipt is the first ack's), dropped with the body at the latest.
# A device named by a per-device payload holds its own entry instead (kind 7:
# the body and its payload, spliced as they are), which refers to the body too:
# its origin field is the body's number in 16 hex digits (``body_number``),
# written with its flags when it is stored, so its ack counts down the body
# and makes the member's delivered receipt as a reference's does.
_GCOUNT = struct.Struct(">II")


def ref_bytes(flags: int, number: bytes) -> bytes:
    """A reference (kind 6) with ``flags`` to body ``number`` (8 bytes, not 0)."""
    return bytes((GREF, flags)) + number.lstrip(b"\x00")


# What LMDB keeps per key besides the key and value bytes (its node header), in
# the charge below.
_NODE_BYTES = 8


def notice_store_bytes(entry: bytes, devices) -> int:
    """The store bytes ``Queues.enqueue_shared`` adds for ``entry`` queued to each
    of ``devices``: the entry once (for one device: in its queue) and, per device,
    the queue key and a reference of at most 10 bytes (what group-notice-bytes
    charges)."""
    devices = list(devices)
    per = sum(len(d) + 9 + _NODE_BYTES for d in devices)
    if len(devices) < 2:
        return per + len(entry) * len(devices)
    return per + 10 * len(devices) + len(entry) + 2 * (9 + _NODE_BYTES) + _GCOUNT.size


def _unref(txn, gdb, number) -> bytes | None:
    """One device fewer refers to body ``number`` (8 bytes); at 0 it is deleted (and
    what is left of its fan records).  Returns its count record as it was (None: no
    such body): ``_GCOUNT`` then group, sending device and id."""
    ckey = number + b"c"
    raw = txn.get(ckey, db=gdb)
    if raw is None:
        return None
    refs, size = _GCOUNT.unpack_from(raw)
    if refs <= 1:
        txn.delete(ckey, db=gdb)
        txn.delete(number + b"b", db=gdb)
        prefix = number + b"f"
        with txn.cursor(db=gdb) as c:
            if c.set_range(prefix):
                while c.key().startswith(prefix):
                    if not c.delete():
                        break
    else:
        txn.put(ckey, _GCOUNT.pack(refs - 1, size) + raw[8:], db=gdb)
    return raw


_UNKNOWN = object()  # a device the session cache does not know (fan_out)
_NO_KEYS = ((), ())  # (_Txn.devkeys of nobody)
_NO_NUMBER = "0" * 16  # a kind-7 entry's origin until it is stored (_store_group)


def body_number(value) -> bytes | None:
    """The body number (8 bytes) a kind-6 or kind-7 entry refers to, else None."""
    if value[0] == GREF:
        n = bytes(value[2:])
        return bytes(8 - len(n)) + n
    if value[0] == GPAYLOAD:
        return bytes.fromhex(bytes(value[11:27]).decode())
    return None


def entry_flags(value) -> int:
    """The flags byte of a stored entry (a reference's is its second byte)."""
    return value[1] if value[0] == GREF else value[9]


def entry_t(txn, gdb, value) -> int:
    """The ``t`` of a stored entry (a reference's is its body's; 0 if that is gone)."""
    if value[0] == GREF:
        value = txn.get(body_number(value) + b"b", db=gdb)
        if value is None:
            return 0
    return _T.unpack_from(value, 1)[0]


def upgrade_refs(txn, db: dict) -> int:
    """Rewrite format-7 references (18 bytes: kind, t, flags, number) in format 8's
    form (``ref_bytes``), inside ``txn``; returns how many."""
    n = 0
    with txn.cursor(db=db["queue"]) as c:  # (in place, one entry at a time: no list of them)
        more = c.first()
        while more:
            value = c.value()
            if value[0] == GREF and len(value) == 18:
                c.put(c.key(), ref_bytes(value[9], bytes(value[10:18])))
                n += 1
            more = c.next()
    return n


def entry_size(txn, gdb, value) -> int:
    """Drop one reference of the entry to its body, if it has one; returns the
    bytes its queue counted for it (a reference counts the body's length)."""
    number = body_number(value)
    if number is None:
        return len(value)
    raw = _unref(txn, gdb, number)
    return _GCOUNT.unpack_from(raw)[1] if raw is not None and value[0] == GREF else len(value)


# A group notice for many devices (``Queues.enqueue_shared``) uses the same
# mechanism: its kind-4 entry is a body in ``gbody``, under a number with the
# top bit set (its own counter, meta b"gnotice": never one of a message's), and
# every device's queue holds a kind-6 reference flagged sync (bit 1), so its ack
# drops the reference and writes no receipt; the count record's tail is
# "group NUL by" (read by nothing: no receipt is made for a notice).  A reader
# cannot tell it from a notice in the queue: the reference is spliced from the
# body as any reference is (``read_into``).
NOTICE_NUMBER_BIT = 1 << 63


def qprefix(device: str) -> bytes:
    return device.encode() + b"\x00"


def qkey(device: str, seq: int) -> bytes:
    return device.encode() + b"\x00" + seq.to_bytes(8, "big")


@dataclass(frozen=True)
class QueueLimits:
    max_count: int = 10_000
    max_bytes: int = 64 << 20
    max_age_ms: int = 30 * 86_400_000
    dedup_window_ms: int = 86_400_000
    new_chats: int = 0  # new conversations per window with non-contacts; 0: no limit
    new_chats_window_ms: int = 86_400_000
    # what a queue may hold before senders who are not known to its user
    # (Queues._known_to) are refused; 0: as max_count / max_bytes
    stranger_count: int = 0
    stranger_bytes: int = 0


class FrameEncoder:
    """Builds the frames stored in queues (oldest accepted dictionary; see the module doc)."""

    def __init__(self, max_frame: int = 0xFFFFFF, impl=core_codec):
        oldest = DICTIONARIES[min(v for v in DICTIONARIES if v > 0)]
        self._codec = impl.Codec(oldest, Limits(max_frame=max_frame))
        self._node = impl.Node
        self.fan_out = impl.fan_out  # (Queues._store_group)
        self.fan_missing = impl.fan_missing
        # (_Txn.copies, Queues._ack: the 1:1 copies and the ack walk)
        self.copies = impl.copies
        self.copies_room = impl.copies_room
        self.ack_walk = impl.ack_walk
        self.store_plain = impl.store_plain  # (Queues.commit: the plain 1:1 messages)
        self.delivered = impl.delivered  # (Queues._ack: the delivered receipts)
        self.acks = impl.acks  # (Queues.commit: the device acks)

    def entry(self, kind: int, t: int, flags: int, origin: str, mid: str, typ: str,
              body=None, to: str | None = None) -> bytes:  # fmt: skip
        """A queue entry (the module doc; Codec.queue_entry)."""
        return self._codec.queue_entry(kind, t, flags, origin, mid, typ, body, to)

    def write(self, out: bytearray, entry, seq: int) -> int:
        """Append the delivery frame of ``entry`` as sequence ``seq``; returns its length."""
        return self._codec.write_entry_frame(out, entry, seq)

    def frame(self, entry, seq: int) -> bytes:
        out = bytearray()
        self._codec.write_entry_frame(out, entry, seq)
        return bytes(out)

    # The frames of IncomingMessage / IncomingReceipt, for tests and tools.
    def message(self, origin: str, mid: str, typ: str, t: int, seq: int, body) -> bytes:
        return self.frame(self.entry(MESSAGE, t, 0, origin, mid, typ, body), seq)

    def receipt(self, origin: str, mid: str, typ: str, t: int, seq: int) -> bytes:
        return self.frame(self.entry(RECEIPT, t, 0, origin, mid, typ), seq)

    # Not queued, but pushed to many connections and across workers alike
    # (PresenceUpdate / IncomingChatState nodes).
    def presence(self, user: str, typ: str, last: int | None) -> bytes:
        attrs = {"from": user, "type": typ}
        if last is not None:
            attrs["last"] = str(last)
        return self._codec.encode_frame(self._node("presence", attrs))

    def chatstate(self, user: str, typ: str) -> bytes:
        return self._codec.encode_frame(self._node("chatstate", {"from": user, "type": typ}))


#: Message types an SDK sends by itself, with no act of its user: the group-key
#: request (client/groups.py).  Their conversation record is ``AUTO``, which does
#: not make the sender know the recipient: a stranger in a group with a user sent
#: one message under a session the user lacked, the user's SDK asked the stranger
#: for the key, and the stranger was "known" from then on (past stranger-groups
#: and the strangers' share of the user's queue: probe, 2026-12-04).
AUTO_TYPES = frozenset({"gkeyreq"})
AUTO = b"a"  # a conversation record made by an AUTO_TYPES message (real ones: b"")


def _real(record) -> bool:
    """A conversation record of the user's own writing (not only an AUTO one)."""
    return record is not None and not record


class Send:
    """A message or client receipt to store; ``commit`` fills in ``t`` or ``error``."""

    __slots__ = ("device", "cls", "id", "to", "type", "body", "t", "error", "session",
                 "dkey", "digest", "entry", "payloads", "failed")  # fmt: skip

    def __init__(self, device, cls, mid, to, typ, body=None, session=None, payloads=None):
        self.device = device  # the sending device
        self.cls = cls  # "message" or "receipt"
        self.id = mid
        self.to = to  # recipient user
        self.type = typ
        self.body = body
        self.payloads = payloads  # ((device, bytes), ...) instead of one body, or None
        self.session = session  # the caller's handle, untouched
        self.t = None
        # (code, text), or (408, text, missing, extra) for stale device lists
        self.error: tuple | None = None
        # made before the transaction begins (Queues._prepare)
        self.dkey = self.digest = self.entry = None
        self.failed = ()  # a group message: member users whose queues were full


class _Txn:
    """One write transaction's working set: cached records, written back once."""

    def __init__(self, q: Queues, txn):
        self.q = q
        self.txn = txn
        self.put = txn.put
        self.qdb = q.db["queue"]
        self.enc = q.encoder
        self.sessions = q.session_cache  # (enqueue: worker_of without its call when cached)
        self.state: dict[str, list] = {}
        # queue states as stored (device key -> 24 bytes), for the compiled loops
        # (group fan-outs, 1:1 copies, acks); a device is in this or in ``state``,
        # never both (fold_state, qstate)
        self.gstate: dict[bytes, bytes] = {}
        self.load = partial(txn.get, db=q.db["qstate"])  # a state ``gstate`` lacks
        # the commit's queue puts, written with one putmulti by flush_state: nothing
        # in a commit reads a queue entry it wrote itself (acks delete what the
        # devices were sent before it)
        self.items: list[tuple[bytes, bytes]] = []
        self.qcursor = None  # on ``queue``, for the acks (Queues._ack)
        self.pushes: list[Push] = []
        self.conv = None  # (current, previous) conversation generations, when needed
        self.full = None  # past the store's reserve? (asked once, when a send needs it)
        self.gchecked = False  # meta "gver" compared with the group cache's this commit
        self.greceipts: dict[bytes, list[str]] = {}  # a message's key -> member users
        self.gmsg = None  # the last group body number (read when a group message needs it)

    def group(self, gid: str):
        """(members in join order, member set, admin set, announce, the members a
        stranger's add put in it who have not written to it: server/groups.py) of
        group ``gid``, or None."""
        q = self.q
        if not self.gchecked:
            self.gchecked = True
            ver = self.txn.get(b"gver", db=q.db["meta"])
            if ver != q.cached_gver or len(q.group_cache) > CACHE_MAX:
                q.cached_gver = ver
                q.group_cache.clear()
                q.fan_plans.clear()
        cache = q.group_cache
        try:
            return cache[gid]
        except KeyError:
            raw = self.txn.get(gid.encode(), db=q.db["groups"])
            g = None
            if raw is not None:
                rec = _unpackb(raw)
                users = tuple(m[0] for m in rec["m"])
                g = (users, frozenset(users), frozenset(m[0] for m in rec["m"] if m[1]),
                     bool(rec["an"]), frozenset(m[0] for m in rec["m"] if len(m) > 3))  # fmt: skip
            cache[gid] = g
            return g

    def devices(self, user: str) -> list[str] | None:
        cache = self.q.device_cache
        try:
            return cache[user]
        except KeyError:
            raw = self.txn.get(user.encode(), db=self.q.db["accounts"])
            devs = None if raw is None else [f"{user}:{n}" for n in _unpackb(raw)["devices"]]
            cache[user] = devs
            return devs

    def devkeys(self, user: str) -> tuple | None:
        """(device keys, devices) of ``user`` (``devices``, with each as bytes), or None."""
        cache = self.q.devkey_cache
        try:
            return cache[user]
        except KeyError:
            devs = self.devices(user)
            keys = cache[user] = None if devs is None else ([d.encode() for d in devs], devs)
            return keys

    def copies(self, dks: list, dstrs: list, entries, skip=None) -> int:
        """Queue ``entries`` (one for all, or one per device) for the devices ``dks``
        (``dstrs`` as str) but ``skip`` (a key): the codec's ``copies``."""
        if self.state:
            self.fold_state()
        return self.enc.copies(dks, dstrs, entries, skip, self.gstate, self.load, self.items,
                               self.pushes, self.sessions, _UNKNOWN, self.worker_of)  # fmt: skip

    def blocks(self, blocker: str, blocked: str) -> bool:
        q = self.q
        anyone = q.blockers.get(blocker)
        if anyone is None:  # most users block nobody: one lookup per user, not per pair
            with self.txn.cursor(db=q.db["blocks"]) as c:
                prefix = f"{blocker}\x00".encode()
                anyone = q.blockers[blocker] = c.set_range(prefix) and c.key().startswith(prefix)
        if not anyone:
            return False
        key = f"{blocker}\x00{blocked}"
        cache = q.block_cache
        try:
            return cache[key]
        except KeyError:
            hit = cache[key] = self.txn.get(key.encode(), db=q.db["blocks"]) is not None
            return hit

    def qstate(self, device: str) -> list:
        """[next_seq, count, bytes] (written back at the end of the transaction)."""
        st = self.state.get(device)
        if st is None:
            dk = device.encode()
            raw = self.gstate.pop(dk, None) if self.gstate else None
            if raw is None:
                raw = self.txn.get(dk, db=self.q.db["qstate"])
            st = [1, 0, 0] if raw is None else list(_QSTATE.unpack(raw))
            self.state[device] = st
        return st

    def fold_state(self) -> None:
        """Move ``state``'s lists into ``gstate`` (before a group fan-out reads it)."""
        if self.state:
            pack, gstate = _QSTATE.pack, self.gstate
            for device, st in self.state.items():
                gstate[device.encode()] = pack(*st)
            self.state.clear()

    def worker_of(self, device: str) -> int | None:
        cache = self.q.session_cache
        try:
            return cache[device]
        except KeyError:
            raw = self.txn.get(device.encode(), db=self.q.db["sessions"])
            w = None if raw is None else _unpackb(raw)["worker"]
            cache[device] = w
            return w

    def enqueue(self, device: str, entry: bytes) -> None:
        st = self.state.get(device) or self.qstate(device)
        seq = st[0]
        self.items.append((device.encode() + b"\x00" + seq.to_bytes(8, "big"), entry))  # qkey
        st[0] = seq + 1
        st[1] += 1
        st[2] += len(entry)
        wid = self.sessions.get(device, _UNKNOWN)
        if wid is _UNKNOWN:
            wid = self.worker_of(device)
        self.pushes.append(Push(device, seq, entry, wid))

    def flush_state(self) -> None:
        """Write the commit's queue entries and queue states (a batch each; one
        record alone is a put: a cursor costs more than it saves)."""
        put = self.txn.put
        items = self.items
        if items:
            if len(items) == 1:
                put(*items[0], db=self.qdb)
            elif self.qcursor is not None:
                self.qcursor.putmulti(items)
            else:
                with self.txn.cursor(db=self.qdb) as c:
                    c.putmulti(items)
            self.items = []
        if self.gmsg is not None:
            put(b"gmsg", _T.pack(self.gmsg), db=self.q.db["meta"])
        db = self.q.db["qstate"]
        pack = _QSTATE.pack
        for device, st in self.state.items():
            put(device.encode(), pack(*st), db=db)
        gstate = self.gstate
        if gstate:
            if len(gstate) < 3:
                for dk, raw in gstate.items():
                    put(dk, raw, db=db)
            else:
                with self.txn.cursor(db=db) as c:
                    # (by key alone: the keys are distinct, so the same order as the
                    # items', at less than half the cost of comparing tuples)
                    c.putmulti(sorted(gstate.items(), key=_KEY))


class Queues:
    """The queue operations over a ``Store``'s environment."""

    #: Called with the seconds each group commit's ``begin(write=True)`` took, once
    #: it has committed: the wait for LMDB's one writer (the worker's metrics).
    on_write_wait = None

    def __init__(self, store, limits: QueueLimits = QueueLimits(), encoder=None, receipts=True):
        self.store = store
        self.env = store.env
        self.db = store._db
        self.limits = limits
        # the stranger limits, with 0 read as "the queue's own limit"
        self.stranger_count = min(limits.stranger_count or limits.max_count, limits.max_count)
        self.stranger_bytes = min(limits.stranger_bytes or limits.max_bytes, limits.max_bytes)
        self.encoder = encoder or FrameEncoder()
        self._entry = self.encoder._codec.queue_entry  # (FrameEncoder.entry without its call)
        self.receipts = receipts
        self.clock = store.clock
        # Exact caches of read-mostly tables, kept across commits: each commit
        # reads meta "ver" (store.bump_version) and starts them again if it moved.
        # "sver" likewise for where each device is connected (sessions).
        self.cached_ver = self.cached_sver = self  # nothing read yet
        self.device_cache: dict[str, list[str] | None] = {}
        self.devkey_cache: dict[str, tuple | None] = {}  # user -> _Txn.devkeys
        self.blockers: dict[str, bool] = {}  # user -> blocks anyone?
        self.block_cache: dict[str, bool] = {}  # "blocker NUL blocked" -> blocks?
        self.session_cache: dict[str, int | None] = {}  # device -> worker holding it
        # A group message's copies for offline devices make no Push unless the
        # router wants them (push wake-ups configured: Worker sets it)
        self.wake_offline = False
        self.cached_gver = self  # meta "gver" (server/groups.py) when group_cache was started
        self.group_cache: dict[str, tuple | None] = {}  # group number -> _Txn.group's answer
        # group number -> its member devices for fan_out (_fan_plan): made of both
        # caches above, so started again with either
        self.fan_plans: dict[str, tuple] = {}
        self.fan_plan_devices = 0
        # the plain 1:1 messages of a commit in the codec's one loop (_store_sends);
        # False: each through _store_one (the tests compare the two)
        self.plain = True

    def forget_caches(self) -> None:
        """Start the caches again: a write transaction that read through them
        (``devices_changed``) was aborted, so what they hold may be its own
        uncommitted writes under a version number a later commit can reuse."""
        self.cached_ver = self.cached_sver = self.cached_gver = self

    def _check_caches(self, txn) -> None:
        meta = self.db["meta"]
        ver = txn.get(b"ver", db=meta)
        size = len(self.device_cache) + len(self.block_cache) + len(self.blockers)
        if ver != self.cached_ver or size > CACHE_MAX:
            self.cached_ver = ver
            self.device_cache.clear()
            self.devkey_cache.clear()
            self.fan_plans.clear()
            self.blockers.clear()
            self.block_cache.clear()
        sver = txn.get(b"sver", db=meta)
        if sver != self.cached_sver or len(self.session_cache) > CACHE_MAX:
            self.cached_sver = sver
            self.session_cache.clear()

    # -- the group commit ----------------------------------------------------

    def commit(
        self,
        sends: list[Send],
        acks: dict[str, int],
        ack_limit: int | None = None,
        left: dict[str, int] | None = None,
        jobs=(),
    ) -> list[Push]:
        """Store ``sends`` and apply ``acks`` ({device: seq}) in one transaction.

        Each Send gets ``t`` (accepted, possibly earlier: a retry) or
        ``error`` (code, text).  Returns the entries to push, after commit.
        With ``ack_limit`` at most that many entries of each device are
        deleted; the acks not fully applied go into ``left`` ({device: seq},
        for a later commit).  ``jobs`` are the tick's other store writes
        (callables of (txn, now): session records, presence, blocks, ...),
        run first, before the acks and the sends.  Raises lmdb.MapFullError (or another
        lmdb.Error) with nothing written; the caller answers the senders and
        may retry the acks alone.
        """
        now = self.clock()
        self._prepare(sends, now)
        started = perf_counter()
        try:
            with self.env.begin(write=True) as txn:
                waited = perf_counter() - started  # for LMDB's one writer (on_write_wait)
                w = _Txn(self, txn)
                if sends:  # only sends look up dedup records (a tick of logins has none)
                    cur, prev = self._generation(txn, now, _DEDUP_META, "dedup",
                                                 self.limits.dedup_window_ms)  # fmt: skip
                # the other writes first (a logout changes whom a message reaches),
                # then acks: they free queue space, and a device that acked and
                # then sent sees its delivered receipts queued ahead of its message
                for job in jobs:
                    job(txn, now)
                if sends or acks:  # what the caches serve (jobs read the store itself)
                    self._check_caches(txn)
                unfinished = []
                if acks and self.plain:  # the acks in the codec's one loop, as _ack does each
                    w.qcursor = txn.cursor(db=w.qdb)
                    unfinished = self.encoder.acks(
                        acks, w, now, -1 if ack_limit is None else ack_limit, self.receipts,
                        self._ack_rest, w.qcursor, w.state, w.gstate, w.load, w.fold_state,
                        self._delivered, txn.delete, self.db["fan"], self.devkey_cache,
                        w.devkeys, w.pushes, w.sessions, _UNKNOWN, w.worker_of, self._entry)  # fmt: skip
                else:
                    for device, upto in acks.items():
                        if not self._ack(w, device, upto, now, ack_limit):
                            unfinished.append((device, upto))
                if w.greceipts:  # the group messages' delivered receipts, coalesced
                    self._group_receipts(w, now)
                if sends:
                    self._store_sends(w, sends, now, cur, prev)
                if w.greceipts:  # and their read receipts
                    self._group_receipts(w, now)
                w.flush_state()
        except BaseException:
            # an aborted transaction may have filled the caches with what it
            # wrote itself (a job's change): they start again
            self.cached_ver = self.cached_sver = self.cached_gver = self
            raise
        if self.on_write_wait is not None:
            self.on_write_wait(waited)
        if left is not None:
            left.update(unfinished)
        return w.pushes

    def _store_sends(self, w: _Txn, sends: list[Send], now: int, cur, prev) -> None:
        """``_store_one`` for each send, in order; the plain 1:1 messages (the
        codec's ``store_plain`` says which) in one compiled loop, the others
        through ``_store_one`` from inside it.  Not past the store's reserve
        (asked here, as the first send new to dedup would: nothing before it
        writes).  With the new-chats limit on,
        its check is ``_chat_allowed``, called by the loop where ``_store_one``
        calls it."""
        lim = self.limits
        if self.plain:
            if w.full is None:
                w.full = self.store.over_reserve(w.txn)
            if not w.full:
                chat = None
                if lim.new_chats:

                    def chat(s, sender, to):
                        if self._chat_allowed(w, sender, to, now, s.type):
                            return True
                        s.error = self._new_chat_limit()
                        return False

                self.encoder.store_plain(
                    sends, self._store_one, w, now, cur, prev, w.txn.get, w.put,
                    self.db["fan"], self.devkey_cache, self.blockers, w.state, w.gstate,
                    w.load, w.items, w.pushes, w.sessions, _UNKNOWN, w.worker_of, self._entry,
                    lim.max_count, lim.max_bytes, self.stranger_count, self.stranger_bytes,
                    chat)  # fmt: skip
                return
        for s in sends:
            self._store_one(w, s, now, cur, prev)

    def _generation(self, txn, now: int, meta_key: bytes, table: str, window_ms: int):
        """(current, previous) of a two-generation table: the previous one is
        emptied and becomes current once the current one is a window old."""
        meta = self.db["meta"]
        raw = txn.get(meta_key, db=meta)
        if raw is None:
            gen, started = 0, now
            txn.put(meta_key, _packb([gen, started]), db=meta)
        else:
            gen, started = _unpackb(raw)
            if now - started >= window_ms:
                gen, started = 1 - gen, now
                txn.drop(self.db[f"{table}{gen}"], delete=False)
                txn.put(meta_key, _packb([gen, started]), db=meta)
        return self.db[f"{table}{gen}"], self.db[f"{table}{1 - gen}"]

    def _chat_allowed(self, w: _Txn, sender: str, to: str, now: int, typ: str = "") -> bool:
        """False if this message starts a conversation past the sender's new-chats limit.

        A message of an AUTO_TYPES type (the SDK's own group-key request, sent with
        no act of its user) is charged as any unless the two share a group
        (``social.shares_group``), and its record says so (``AUTO``):
        it does not make its sender know the recipient (``_known_to``), nor count
        as the sender having written first when the recipient answers."""
        txn = w.txn
        lim = self.limits
        if w.conv is None:
            w.conv = self._generation(txn, now, _CONV_META, "conv", lim.new_chats_window_ms)
        cur, prev = w.conv
        key = f"{sender}\x00{to}".encode()
        auto = typ in AUTO_TYPES
        had = txn.get(key, db=cur)
        if had is not None:
            if had and not auto:  # (the user writes now: a real conversation)
                txn.put(key, b"", db=cur)
            return True
        rkey = f"{to}\x00{sender}".encode()
        if (
            txn.get(key, db=prev) is None
            and not _real(txn.get(rkey, db=cur))
            and not _real(txn.get(rkey, db=prev))
            and txn.get(rkey, db=self.db["contacts"]) is None
            # (the SDK's key request to a co-member: strangers' group messages under
            # new sessions made it use up a victim's new-chats, probe5; to anyone
            # else it is charged, so it cannot tell registered numbers apart)
            and not (auto and shares_group(txn, self.db, sender, to))
        ):
            ok, _ = window_take(txn, self.db["limits"], f"chats:{sender}".encode(), now,
                                lim.new_chats_window_ms, lim.new_chats)  # fmt: skip
            if not ok:
                return False
        txn.put(key, AUTO if auto else b"", db=cur)
        return True

    def chat_allowed_txn(self, txn, sender: str, to: str, now: int) -> bool:
        """``_chat_allowed`` for a caller outside the message path, inside ``txn``: a
        group add, which reaches the added user as a first message would."""
        if not self.limits.new_chats:
            return True
        return self._chat_allowed(_Txn(self, txn), sender, to, now)

    def knows_txn(self, txn, user: str, other: str, now: int) -> bool:
        """Does ``user`` know ``other`` (``_known_to``), inside ``txn``?"""
        return self._known_to(_Txn(self, txn), other, user, now)

    def _new_chat_limit(self) -> tuple:
        lim = self.limits
        return (
            ErrorCode.NEW_CHAT_LIMIT,
            f"new conversation limit: at most {lim.new_chats} new chats per "
            f"{lim.new_chats_window_ms // 1000} s with people who do not have you as a "
            "contact; try again later",
        )

    def _known_to(self, w: _Txn, sender: str, to: str, now: int) -> bool:
        """Does ``to`` know ``sender``: has it written to them lately (the new-chats
        conversation record, when that limit is on) or got them as a contact?"""
        txn = w.txn
        lim = self.limits
        rkey = f"{to}\x00{sender}".encode()
        if lim.new_chats:
            if w.conv is None:
                w.conv = self._generation(txn, now, _CONV_META, "conv", lim.new_chats_window_ms)
            ccur, cprev = w.conv
            if _real(txn.get(rkey, db=ccur)) or _real(txn.get(rkey, db=cprev)):
                return True
        return txn.get(rkey, db=self.db["contacts"]) is not None

    def _receipt_wanted(self, w: _Txn, sender: str, to: str, mid: str, devices, cur, prev,
                        now: int) -> bool:  # fmt: skip
        """May ``sender``'s read/played receipt about message ``mid`` go to ``to``?
        Yes if ``to`` knows ``sender`` (_known_to), or one of ``to``'s devices sent
        a message ``mid`` within the dedup window (``cur``/``prev``: the dedup tables)."""
        if self._known_to(w, sender, to, now):
            return True
        txn = w.txn
        for d in devices:
            key = f"{d}\x00m\x00{mid}".encode()
            if txn.get(key, db=cur) is not None or txn.get(key, db=prev) is not None:
                return True
        return False

    def next_seq(self, device: str) -> int:
        """The seq the device's next queue entry will get (committed state, a read
        transaction): every seq ever delivered to it is below.  For the rare path only
        (Session.device_ack: an ack past what this connection pushed)."""
        with self.env.begin() as txn:
            raw = txn.get(device.encode(), db=self.db["qstate"])
        return 1 if raw is None else _QSTATE.unpack(raw)[0]

    def stored_retry(self, device: str, cls: str, mid: str, to: str, typ: str, body,
                     payloads=None, participant: str | None = None) -> bool:  # fmt: skip
        """Whether the dedup records hold this message or read receipt of ``device``
        as it is (what ``_store_one`` would answer as a retry: the same key and
        digest), from a read transaction.  For the rare path only (Session.allowed
        past messages-per-day): it makes the send's key, digest and entry."""
        if not to or not mid:
            return False
        if payloads and to[0] != "g":  # (Worker.route: the payloads instead of the body)
            body = None
        s = Send(device, cls, mid, to, typ, body, None, payloads)
        if participant is not None:
            s.body = participant
        self._prepare([s], self.clock())
        db = self.db
        with self.env.begin() as txn:
            raw = txn.get(s.dkey, db=db["dedup0"]) or txn.get(s.dkey, db=db["dedup1"])
        if raw is None:
            return False
        return len(raw) <= 8 or raw[8 : 8 + len(s.digest)] == s.digest

    def _prepare(self, sends: list[Send], now: int) -> None:
        """What each send needs that is not a store operation: made before the
        write transaction begins, so the writer lock (one for every worker)
        is held for LMDB's work only.  The entry is made as for one device;
        a recipient with several has its fan flag set in the transaction.
        Per-device payloads get one entry per device named ({device: entry}),
        each with the flags it will need if the names are right."""
        entry = self.encoder._codec.queue_entry
        for s in sends:
            if s.cls == "message":
                s.dkey = f"{s.device}\x00m\x00{s.id}".encode()
                to = s.to
                if to[0] == "g":  # a group: the body entry, stored once (_store_group)
                    s.digest = _digest(to, s.type, s.body, s.payloads)
                    s.entry = entry(GMESSAGE, now, 0, s.device, s.id, s.type, s.body, to)
                    if s.payloads:  # a device's own entry: the body and its payload
                        enc = self.encoder
                        N = enc._node
                        attrs = {"from": to, "participant": s.device, "id": s.id,
                                 "type": s.type}  # fmt: skip
                        s.payloads = {
                            d: spliced_entry(enc, GPAYLOAD, now, 0, _NO_NUMBER, s.id, "message",
                                             attrs, [N("body", None, s.body),
                                                     N("payload", None, p)])
                            for d, p in s.payloads
                        }  # fmt: skip
                    continue
                if s.payloads:
                    s.digest = _digest(to, s.type, None, s.payloads)
                    prefix = to + ":"
                    if s.device.startswith(prefix):  # a note to self: sync copies only
                        prefix = "\x00"
                    fan = FAN if sum(d.startswith(prefix) for d, _ in s.payloads) > 1 else 0
                    s.entry = {
                        d: entry(MESSAGE, now, fan, s.device, s.id, s.type, body)
                        if d.startswith(prefix)
                        else entry(MESSAGE, now, SYNC, s.device, s.id, s.type, body, to)
                        for d, body in s.payloads
                    }
                    continue
                s.digest = _digest(to, s.type, s.body)
                if ":" in to or s.device.startswith(to + ":"):  # device-to-device, note to self
                    s.entry = entry(MESSAGE, now, SYNC, s.device, s.id, s.type, s.body, to)
                else:
                    s.entry = entry(MESSAGE, now, 0, s.device, s.id, s.type, s.body)
            elif s.to[0] == "g":  # a group's read receipt (``body``: whose message it is)
                s.dkey = f"{s.device}\x00r{s.type}\x00{s.to}\x00{s.body}\x00{s.id}".encode()
                s.digest = b""
            else:  # a receipt names the message of another user: the recipient is in the key
                s.dkey = f"{s.device}\x00r{s.type}\x00{s.to}\x00{s.id}".encode()
                s.digest = b""
                user = s.device.partition(":")[0]
                # a retry receipt comes from the device that failed to decrypt
                origin = s.device if s.type == "retry" else user
                if user == s.to:  # to one's own user: a read-sync copy only
                    s.entry = entry(RECEIPT, now, SYNC, origin, s.id, s.type, None, s.to)
                else:
                    s.entry = entry(RECEIPT, now, 0, origin, s.id, s.type)

    def _store_one(self, w: _Txn, s: Send, now: int, cur, prev, raw=_UNKNOWN) -> None:
        """Store one send (``raw``: its dedup record, if already looked up)."""
        txn = w.txn
        dkey, digest = s.dkey, s.digest
        if raw is _UNKNOWN:
            raw = txn.get(dkey, db=cur) or txn.get(dkey, db=prev)
        if raw is not None:
            n = 8 + len(digest)
            if len(raw) > 8 and raw[8:n] != digest:
                s.error = (
                    ErrorCode.ID_REUSED,
                    "this id was used for another message (recipient, type or body differ) "
                    "within the dedup window: send it with a new id",
                )
                return
            s.t = int.from_bytes(raw[:8], "big")  # a retry: the same ack, stored once
            if len(raw) > n:  # a group message's: the members it could not be stored for
                s.failed = tuple(bytes(raw[n:]).decode().split(","))
            return
        if w.full is None:
            w.full = self.store.over_reserve(txn)
        if w.full:
            s.error = _STORE_FULL
            return
        stamp = now.to_bytes(8, "big") + digest
        to = s.to
        me = s.device
        sender = me.partition(":")[0]
        lim = self.limits
        if to[0] == "g":
            if s.cls == "message":
                self._store_group(w, s, now, sender, dkey, stamp, cur)
            else:
                self._store_group_receipt(w, s, now, sender, dkey, stamp, cur, prev)
            return
        if ":" in to:  # device-to-device, inside the sender's own account (Worker.route)
            devices = w.devices(sender)
            if not devices or to not in devices:
                s.error = (ErrorCode.UNKNOWN_RECIPIENT, "not a device of this account")
                return
            st = w.qstate(to)
            if st[1] + 1 > lim.max_count or st[2] + len(s.entry) > lim.max_bytes:
                s.error = (
                    ErrorCode.QUEUE_FULL,
                    f"the device's queue is full ({st[1]} items, {st[2]} bytes); retry later",
                )
                return
            w.enqueue(to, s.entry)
            txn.put(dkey, stamp, db=cur)
            s.t = now
            return
        tkeys = w.devkeys(to)  # (device keys, devices): one cached look-up for both
        devices = None if tkeys is None else tkeys[1]
        if s.cls != "message":
            # a receipt to a number that is not a user (or has no device) is
            # treated as one to a stranger (acked, read-sync copies only): an
            # error would tell which numbers are registered
            devices = devices or ()
        elif devices is None:
            # Costs a new chat, as a message to a user who does not know the
            # sender would (404 past the limit, as for them): else 400 against
            # 404 once the limit is reached would tell which numbers are users.
            if lim.new_chats:
                ok, _ = window_take(txn, self.db["limits"], f"chats:{sender}".encode(), now,
                                    lim.new_chats_window_ms, lim.new_chats)  # fmt: skip
                if not ok:
                    s.error = self._new_chat_limit()
                    return
            s.error = (ErrorCode.UNKNOWN_RECIPIENT, "not a registered user")
            return
        elif not devices:
            s.error = (ErrorCode.NO_DEVICE, "the recipient has no device to deliver to")
            return
        own = sender == to  # a note to self: the sender's other devices only
        blocked = False
        if own:
            mine, skeys = devices, tkeys
        else:
            # The recipient blocks the sender: acked and not stored for the
            # recipient, by design; the sender's own devices see it as any
            # other (sync copies, the 408 check), or the block would show.
            # (``blockers``: False for a user known to block nobody, most of them)
            blockers = self.blockers
            blocked = blockers.get(to) is not False and w.blocks(to, sender)
            if not blocked and blockers.get(sender) is not False and w.blocks(sender, to):
                # refused, not dropped: only a blocked sender is acked for nothing
                s.error = (ErrorCode.BLOCKED, "you block this user: unblock them to send")
                return
            skeys = w.devkeys(sender)
            mine = () if skeys is None else skeys[1]
        # the sender's other devices get sync copies (none for a single-device account)
        nsync = len(mine) - (me in mine)
        if nsync and not own and s.type == "retry":  # a retry goes to the sender only
            nsync = 0
        if own and not nsync:
            # a note to self with no other device: stored for nobody, so no dedup
            # record either (a retry is answered the same way; one record each
            # let a single-device account fill the store with notes)
            s.t = now
            return
        recipients = () if own else devices
        entries = s.entry
        per_device = type(entries) is dict
        if per_device and not self._payloads_match(s, entries, recipients, mine, nsync):
            return
        if blocked:
            if not nsync:
                txn.put(dkey, stamp, db=cur)
                s.t = now
                return
            recipients = ()
        elif (
            not own
            and s.cls != "message"
            and not self._receipt_wanted(w, sender, to, s.id, devices, cur, prev, now)
        ):
            # about no message ``to`` sent: acked and stored for nobody (with
            # no dedup record: a retry is answered the same), or a stranger
            # could fill anyone's queue with receipts for made-up ids
            if not nsync:
                s.t = now
                return
            recipients = ()
        sync_entry = None
        if nsync and not per_device:
            sync_entry = entries if own else self.encoder.entry(
                MESSAGE if s.cls == "message" else RECEIPT, now, SYNC,
                me if s.cls == "message" else sender, s.id, s.type, s.body, to)  # fmt: skip
        # room in every queue it goes to (the whole message is one unit), checked and
        # taken by the codec's compiled loops (copies_room, copies) on the stored states
        rk, rs = tkeys if recipients else _NO_KEYS
        mk, ms = skeys if nsync else _NO_KEYS
        skip = me.encode()
        if per_device:
            rentries = [entries[d] for d in rs]
            mentries = [entries.get(d, b"") for d in ms]
        else:
            rentries, mentries = entries, sync_entry
        if w.state:
            w.fold_state()
        room, states, load = self.encoder.copies_room, w.gstate, w.load
        if rk:
            full = room(rk, rentries, None, states, load, lim.max_count, lim.max_bytes,
                        self.stranger_count, self.stranger_bytes, len(rk))  # fmt: skip
            if full is not None and full[1]:  # a stranger's limit: does ``to`` know the sender?
                if not self._known_to(w, sender, to, now):
                    s.error = (
                        ErrorCode.QUEUE_FULL,
                        "the recipient's queue holds all it takes from senders who are not "
                        "in their contacts; retry later",
                    )
                    return
                full = room(rk, rentries, None, states, load, lim.max_count, lim.max_bytes,
                            0, 0, 0)  # fmt: skip
            if full is not None:
                # (how full a stranger's queue is is not the sender's business)
                s.error = (ErrorCode.QUEUE_FULL, "the recipient's queue is full; retry later")
                return
        if mk:
            full = room(mk, mentries, skip, states, load, lim.max_count, lim.max_bytes, 0, 0, 0)
            if full is not None:
                _, count, size = _QSTATE.unpack(states[mk[full[0]]])
                s.error = (
                    ErrorCode.QUEUE_FULL,
                    f"your device's queue is full ({count} items, {size} bytes); retry later",
                )
                return
        if s.cls == "message" and lim.new_chats and not own and not blocked:
            if not self._chat_allowed(w, sender, to, now, s.type):
                s.error = self._new_chat_limit()
                return
        if s.cls == "message" and len(recipients) > 1:
            if not per_device:
                entry = bytearray(entries)
                entry[9] |= FAN  # the fan flag (Codec.queue_entry's layout)
                rentries = bytes(entry)
            txn.put(self._fan_key(me, s.id, to), b"", db=self.db["fan"])
        # (_Txn.copies without its call: the states were folded above)
        if rk:
            self.encoder.copies(rk, rs, rentries, None, states, load, w.items, w.pushes,
                                w.sessions, _UNKNOWN, w.worker_of)  # fmt: skip
        if mk:
            self.encoder.copies(mk, ms, mentries, skip, states, load, w.items, w.pushes,
                                w.sessions, _UNKNOWN, w.worker_of)  # fmt: skip
        txn.put(dkey, stamp, db=cur)
        s.t = now

    def _store_group_receipt(self, w: _Txn, s: Send, now: int, sender: str, dkey, stamp,
                             cur, prev) -> None:  # fmt: skip
        """A member read (or played) ``s.body``'s message ``s.id`` in group ``s.to``:
        gathered for the commit's coalesced receipts to that user's devices, and a
        read-sync copy for the reader's other devices.  As a 1:1 receipt, it goes
        to the author only if the author knows the reader or one of the author's
        devices sent a message ``s.id`` (``_receipt_wanted``): a member could fill
        another member's queue with receipts about made-up ids (held to no queue
        limit).  Otherwise it is acked and, with no other device to sync, stored
        nowhere (no dedup record either)."""
        g = w.group(s.to[2:])
        if g is None or sender not in g[1]:
            s.error = (ErrorCode.NOT_MEMBER, "you are not a member of this group")
            return
        author = s.body
        others = [d for d in w.devices(sender) or () if d != s.device]
        if author != sender and not self._receipt_wanted(
            w, sender, author, s.id, w.devices(author) or (), cur, prev, now
        ):
            if not others:
                s.t = now
                return
            author = sender  # (the read-sync copies only)
        if author != sender:
            key = f"{s.type}\x00{s.to}\x00{author}\x00{s.id}".encode()
            got = w.greceipts.get(key)
            if got is None:
                w.greceipts[key] = [sender]
            elif sender not in got:
                got.append(sender)
        if others:  # read sync: this user's other devices mark it read too
            N = self.encoder._node
            entry = spliced_entry(self.encoder, GRECEIPT, now, SYNC, s.to, s.id, "receipt",
                                  {"from": s.to, "id": s.id, "type": s.type},
                                  [N("member", {"user": sender})])  # fmt: skip
            for d in others:
                w.enqueue(d, entry)
        w.txn.put(dkey, stamp, db=cur)
        s.t = now

    def _fan_plan(self, w: _Txn, gid: str, users) -> tuple:
        """Group ``gid``'s member devices for ``fan_out`` (cached like the group and
        the device lists it is made of, and started again with either): their keys
        sorted, the same as str, each one's user's place in ``users`` (join
        order), whether that user has several devices, and those users' places."""
        plans = self.fan_plans
        plan = plans.get(gid)
        if plan is not None:
            return plan
        rows = []
        many = []
        for u, user in enumerate(users):
            devs = w.devices(user) or ()
            if len(devs) > 1:
                many.append(u)
            rows += [(d.encode(), d, u, len(devs) > 1) for d in devs]
        rows.sort()
        self.fan_plan_devices += len(rows)
        if self.fan_plan_devices > CACHE_MAX:
            plans.clear()
            self.fan_plan_devices = len(rows)
        plan = plans[gid] = ([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                             bytes(r[3] for r in rows), tuple(many))  # fmt: skip
        return plan

    def _store_group(self, w: _Txn, s: Send, now: int, sender: str, dkey, stamp, cur) -> None:
        """A message to a group from a member: a reference to its body (stored once)
        in every member device's queue but the sending one's; the users whose
        queues are full go in ``s.failed`` (stored for everyone else).

        The member devices' part is ``fan_out`` (the codec's: compiled in the
        fastpath) over the group's cached plan, with the queue states it lacks
        read in one ``getmulti`` and the references written in one ``putmulti``;
        a message with per-device payloads takes ``_fan_payloads`` instead."""
        g = w.group(s.to[2:])
        if g is None or sender not in g[1]:
            s.error = (ErrorCode.NOT_MEMBER, "you are not a member of this group")
            return
        if g[3] and sender not in g[2]:
            s.error = (ErrorCode.ANNOUNCE_ONLY, "only the group's admins send in this group")
            return
        me = s.device
        own = s.payloads  # {device: its entry}: the devices named by a payload
        if own:
            extra = tuple(
                d for d in own
                if d == me or d.partition(":")[0] not in g[1]
                or d not in (w.devices(d.partition(":")[0]) or ())
            )  # fmt: skip
            if extra:
                s.error = (ErrorCode.STALE_DEVICES, "a payload names a device that is not a "
                           "member device (or is the sending one)", (), extra)  # fmt: skip
                return
        txn = w.txn
        if g[4] and sender in g[4]:  # a stranger added the sender: writing accepts the group
            from .groups import accept_membership

            accept_membership(txn, self.db, s.to[2:], sender)
        if w.gmsg is None:
            raw = txn.get(b"gmsg", db=self.db["meta"])
            w.gmsg = 0 if raw is None else _T.unpack(raw)[0]
        w.gmsg += 1
        number = _T.pack(w.gmsg)
        body = s.entry
        size = len(body)
        # the members' reference, a member's with several devices, and the sender's
        # other devices' (no receipt)
        refs = (ref_bytes(0, number), ref_bytes(FAN, number), ref_bytes(SYNC, number))
        gdb = self.db["gbody"]
        users = g[0]
        if own:
            n, failed = self._fan_payloads(w, s, users, sender, number, refs, size, now)
            fans = [u for u in range(len(users)) if users[u] != sender
                    and len(w.devices(users[u]) or ()) > 1]  # fmt: skip
        else:
            dks, dstrs, uidx, multi, fans = self._fan_plan(w, s.to[2:], users)
            sender_place = users.index(sender)
            w.fold_state()
            states = w.gstate
            enc = self.encoder
            lacking = enc.fan_missing(dks, states)
            if lacking:
                with txn.cursor(db=self.db["qstate"]) as c:
                    states.update(c.getmulti(lacking))
            lim = self.limits
            sessions = self.session_cache
            # a queue past the stranger limits takes it only if its user knows the
            # sender (as a 1:1 message): the fan-out stops there, _fan_known goes on
            strict = self.stranger_count < lim.max_count or self.stranger_bytes < lim.max_bytes
            items, failed, online = enc.fan_out(dks, dstrs, uidx, multi, sender_place,
                                                me.encode(), states, refs, size,
                                                self.stranger_count, self.stranger_bytes,
                                                sessions, _UNKNOWN, self.wake_offline)  # fmt: skip
            if failed and strict:
                items, failed, online = self._fan_known(w, now, s, users, sender, dks, dstrs,
                                                        uidx, multi, sender_place, refs, size,
                                                        items, failed, online)  # fmt: skip
            n = len(items)
            if n:
                with txn.cursor(db=w.qdb) as c:
                    c.putmulti(items)
            pushes, wake = w.pushes, self.wake_offline
            for d, seq, wid in online:
                if wid is _UNKNOWN:
                    wid = w.worker_of(d)
                if wid is not None:
                    pushes.append(Push(d, seq, body, wid))
                elif wake:  # offline: it reads its queue later; the router may wake it
                    pushes.append(Push(d, seq, None, None))
            failed = [users[u] for u in sorted(set(failed))] or None
        for u in fans:
            if users[u] != sender:
                w.put(number + b"f" + users[u].encode(), b"", db=gdb)
        if n:
            w.put(number + b"b", body, db=gdb)
            w.put(number + b"c", _GCOUNT.pack(n, size)
                  + f"{s.to}\x00{me}\x00{s.id}".encode(), db=gdb)  # fmt: skip
        elif fans:  # (no reference: no ack will come to drop them)
            with txn.cursor(db=gdb) as c:
                prefix = number + b"f"
                if c.set_range(prefix):
                    while c.key().startswith(prefix):
                        if not c.delete():
                            break
        if failed:  # (kept with the dedup record: a retry's ack says it too)
            s.failed = tuple(failed)
            stamp += ",".join(failed).encode()
        txn.put(dkey, stamp, db=cur)
        s.t = now

    def _fan_known(self, w: _Txn, now: int, s: Send, users, sender: str, dks, dstrs, uidx,
                   multi, sender_place: int, refs, size: int, items, failed, online):  # fmt: skip
        """The fan-out past the stranger limits: ``fan_out`` stored the reference in
        every queue under ``stranger-queue-count``/``-bytes``; the member users whose
        queues were past them (``failed``) and who know ``sender`` (a contact, a
        conversation lately: ``_known_to``; the sender's own devices) get it up to
        the queue's own limits.  The others stay in ``failed``, as for a 1:1 message
        from a stranger: a group (whose adder pays a new chat per stranger) no
        longer fills a whole queue.  Returns (items, failed, online) again."""
        known = {u for u in set(failed)
                 if users[u] == sender or self._known_to(w, sender, users[u], now)}  # fmt: skip
        if not known:
            return items, failed, online
        stored = {k[:-9] for k, _ in items}  # (a queue key: device, NUL, 8-byte seq)
        pick = [i for i, dk in enumerate(dks) if uidx[i] in known and dk not in stored]
        lim = self.limits
        more, failed2, online2 = self.encoder.fan_out(
            [dks[i] for i in pick], [dstrs[i] for i in pick], [uidx[i] for i in pick],
            bytes(multi[i] for i in pick), sender_place, s.device.encode(), w.gstate, refs,
            size, lim.max_count, lim.max_bytes, self.session_cache, _UNKNOWN,
            self.wake_offline)  # fmt: skip
        if more:
            items = sorted(items + more)
        return items, [u for u in failed if u not in known] + failed2, online + online2

    def _fan_payloads(self, w: _Txn, s: Send, users, sender: str, number: bytes, refs,
                      size: int, now: int) -> tuple[int, list | None]:  # fmt: skip
        """``_store_group``'s member devices for a message with per-device payloads
        (a device named by one gets its own entry, which refers to the body):
        returns (entries stored, the users whose queues were full, or None)."""
        me = s.device
        own = s.payloads
        ref, fan_ref, sync_ref = refs
        hex_number = number.hex().encode()  # (a kind-7 entry's origin field)
        body = s.entry
        lim = self.limits
        max_count, max_bytes = lim.max_count, lim.max_bytes
        put, qdb, pushes = w.put, w.qdb, w.pushes
        n = 0
        failed = None
        wake = self.wake_offline
        scount, sbytes = self.stranger_count, self.stranger_bytes
        for user in users:
            mine = user == sender
            devs = w.devices(user) or ()
            entry = sync_ref if mine else (fan_ref if len(devs) > 1 else ref)
            known = mine or None  # does ``user`` know the sender? (asked past a stranger limit)
            for d in devs:
                if d == me:
                    continue
                st = w.qstate(d)
                mine_entry = own.get(d)
                need = size if mine_entry is None else len(mine_entry)
                if (
                    st[1] + 1 > max_count
                    or st[2] + need > max_bytes
                    or (
                        (st[1] + 1 > scount or st[2] + need > sbytes)
                        and not (
                            known := self._known_to(w, sender, user, now)
                            if known is None
                            else known
                        )
                    )
                ):
                    if failed is None:
                        failed = [user]
                    elif failed[-1] != user:
                        failed.append(user)
                    continue
                seq = st[0]
                st[0] = seq + 1
                st[1] += 1
                st[2] += need
                if mine_entry is None:
                    put(qkey(d, seq), entry, db=qdb)
                else:  # its own entry (the body and its payload), referring to the body
                    mine_entry = bytearray(mine_entry)
                    mine_entry[9] = entry[1]  # the reference's flags: sync, fan
                    mine_entry[11:27] = hex_number
                    mine_entry = bytes(mine_entry)
                    put(qkey(d, seq), mine_entry, db=qdb)
                n += 1
                wid = w.worker_of(d)
                if wid is not None:
                    pushes.append(Push(d, seq, body if mine_entry is None else mine_entry, wid))
                elif wake:  # offline: it reads its queue later; the router may wake it
                    pushes.append(Push(d, seq, None, None))
        return n, failed

    @staticmethod
    def _payloads_match(s: Send, entries: dict, recipients, mine, nsync: int) -> bool:
        """Do the per-device payloads name exactly the current devices?  If not,
        ``s.error`` is 408 with the devices missing and the ones extra."""
        me = s.device
        if len(entries) == len(recipients) + nsync:
            for d in recipients:
                if d not in entries:
                    break
            else:
                for d in mine:
                    if d != me and d not in entries:
                        break
                else:
                    return True
        want = [*recipients, *(d for d in mine if d != me)]
        missing = tuple(d for d in want if d not in entries)
        wanted = set(want)
        extra = tuple(d for d in entries if d not in wanted)
        s.error = (
            ErrorCode.STALE_DEVICES,
            "the payloads do not match the device lists: fetch them again (devices) and retry",
            missing,
            extra,
        )
        return False

    @staticmethod
    def _fan_key(origin_device: str, mid: str, to_user: str) -> bytes:
        return f"{origin_device}\x00{mid}\x00{to_user}".encode()

    def _ack(self, w: _Txn, device: str, upto: int, now: int, limit: int | None = None) -> bool:
        """Delete the device's entries up to ``upto`` (at most ``limit`` of them);
        True if none up to ``upto`` is left.  The cursor walk is the codec's
        ``ack_walk`` (compiled in the fastpath); what it lists (group entries,
        messages owed a delivered receipt) is handled here, in order."""
        txn = w.txn
        user = device.partition(":")[0]
        c = w.qcursor
        if c is None:  # (one cursor for every ack of the commit)
            c = w.qcursor = txn.cursor(db=w.qdb)
        if w.items:  # (an ack deletes what this commit queued before it, as ever)
            if len(w.items) == 1:
                c.put(*w.items[0])
            else:
                c.putmulti(w.items)
            w.items = []
        dk = device.encode()
        prefix = dk + b"\x00"
        deleted, nbytes, listed, done = self.encoder.ack_walk(
            c, prefix, prefix + upto.to_bytes(8, "big"), -1 if limit is None else limit,
            self.receipts)  # fmt: skip
        if deleted:
            self._ack_rest(w, dk, user, deleted, nbytes, listed, now)
        return done

    def _ack_rest(self, w: _Txn, dk: bytes, user: str, deleted: int, nbytes: int, listed: list,
                  now: int) -> None:  # fmt: skip
        """What ``_ack`` does once its walk deleted ``deleted`` entries (``nbytes``,
        ``listed``: ack_walk's) of device ``dk`` (of ``user``): the group entries,
        the queue state, the delivered receipts."""
        txn = w.txn
        receipts = None
        for value in listed:
            kind = value[0]
            if kind == GREF or kind == GPAYLOAD:  # a group message: one reference fewer
                number = body_number(value)
                raw = _unref(txn, self.db["gbody"], number)
                if raw is None or kind != GREF:
                    nbytes += len(value)
                else:
                    nbytes += _GCOUNT.unpack_from(raw)[1]
                flags = value[1] if kind == GREF else value[9]
                if raw is not None and self.receipts and not flags & SYNC:
                    self._group_delivered(w, flags, number, raw, user)
            elif receipts is None:
                receipts = [value]
            else:
                receipts.append(value)
        if w.state:
            w.fold_state()
        states = w.gstate
        raw = states.get(dk)
        if raw is None:
            raw = w.load(dk)
        nxt, count, size = (1, 0, 0) if raw is None else _QSTATE.unpack(raw)
        count -= deleted
        size -= nbytes
        states[dk] = _QSTATE.pack(nxt, 0, 0) if count <= 0 else _QSTATE.pack(nxt, count, size)
        if receipts is not None:
            if self.plain:  # (_delivered for each, in the codec's one loop)
                self.encoder.delivered(
                    receipts, w, user, now, self._delivered, w.txn.delete, self.db["fan"],
                    self.devkey_cache, w.devkeys, states, w.load, w.items, w.pushes,
                    w.sessions, _UNKNOWN, w.worker_of, self._entry)  # fmt: skip
            else:
                for value in receipts:
                    self._delivered(w, value, user, now)

    def _group_delivered(self, w: _Txn, flags: int, number: bytes, raw: bytes, user: str) -> None:
        """A member device acked a group message (body ``number``, its count record
        ``raw``): ``user``'s delivered receipt, once per member user, gathered for
        this commit's coalesced receipts."""
        if flags & FAN and not w.txn.delete(number + b"f" + user.encode(),
                                            db=self.db["gbody"]):  # fmt: skip
            return  # another device of this user acked first
        key = b"delivered\x00" + bytes(raw[8:])  # type NUL group NUL sending device NUL id
        got = w.greceipts.get(key)
        if got is None:
            w.greceipts[key] = [user]
        else:
            got.append(user)

    def _group_receipts(self, w: _Txn, now: int) -> None:
        """One receipt entry per message for the sender's devices: every member
        user this commit's acks (or read receipts) are about, as ``member`` children."""
        N = self.encoder._node
        for key, users in w.greceipts.items():
            typ, group, device, mid = key.decode().split("\x00")
            entry = spliced_entry(self.encoder, GRECEIPT, now, 0, group, mid, "receipt",
                                  {"from": group, "id": mid, "type": typ},
                                  [N("member", {"user": u}) for u in users])  # fmt: skip
            keys = w.devkeys(device.partition(":")[0])
            if keys:
                w.copies(keys[0], keys[1], entry)
        w.greceipts.clear()

    def _delivered(self, w: _Txn, value, user: str, now: int) -> None:
        # (entry_fields' origin and id, read here without its tuple, t and fan flag)
        olen = value[10]
        origin = value[11 : 11 + olen].decode()
        mid = value[12 + olen : 12 + olen + value[11 + olen]].decode()
        if value[9] & FAN and not w.txn.delete(self._fan_key(origin, mid, user),
                                               db=self.db["fan"]):  # fmt: skip
            return  # another device of this user acked first
        keys = w.devkeys(origin.partition(":")[0])
        if not keys or not keys[0]:
            return  # the sender's account is gone
        w.copies(keys[0], keys[1], self._entry(RECEIPT, now, 0, user, mid, "delivered"))

    # -- device lists -------------------------------------------------------------

    def devices_changed(self, txn, user: str, now: int) -> list[Push]:
        """Queue a device-list notice (``<devices from=user>``) for every current
        device of ``user``, inside ``txn`` (after the change, in the same
        transaction); returns the pushes for the caller to deliver once it
        has committed (``Worker.deliver``).  Usable from a commit's job (the
        caches are checked against what the job wrote) or any write
        transaction of the store (one that aborts after it calls
        ``forget_caches``, as ``commit`` does for its jobs)."""
        return self.notice_users(txn, (user,), DEVICES, user, "", now)

    def enqueue_devices(self, txn, devices, entry: bytes) -> list:
        """Queue ``entry`` (one object for all) for each of ``devices`` inside ``txn``;
        returns the pushes for the caller to deliver once it has committed."""
        self._check_caches(txn)
        w = _Txn(self, txn)
        for d in devices:
            w.enqueue(d, entry)
        w.flush_state()
        return w.pushes

    def enqueue_shared(self, txn, devices, entry: bytes, tail: bytes = b"") -> list:
        """``enqueue_devices`` with ``entry`` (a group notice) stored once, in ``gbody``,
        and a reference to it in each device's queue (the layout above
        ``NOTICE_NUMBER_BIT``); ``tail`` ends its count record.  One device: the
        entry itself, a reference would only add to it.  Returns the pushes."""
        devices = list(devices)
        if len(devices) < 2:
            return self.enqueue_devices(txn, devices, entry) if devices else []
        self._check_caches(txn)
        w = _Txn(self, txn)
        gdb, meta = self.db["gbody"], self.db["meta"]
        raw = txn.get(b"gnotice", db=meta)
        n = (0 if raw is None else _T.unpack(raw)[0]) + 1
        txn.put(b"gnotice", _T.pack(n), db=meta)
        number = _T.pack(NOTICE_NUMBER_BIT | n)
        ref = ref_bytes(SYNC, number)  # (its t is the notice's: entry_t)
        size = len(entry)
        for d in devices:
            st = w.qstate(d)
            seq = st[0]
            w.put(qkey(d, seq), ref, db=w.qdb)
            st[0] = seq + 1
            st[1] += 1
            st[2] += size  # a reference counts its body (as a message's does)
            w.pushes.append(Push(d, seq, entry, w.worker_of(d)))
        txn.put(number + b"b", entry, db=gdb)
        txn.put(number + b"c", _GCOUNT.pack(len(devices), size) + tail, db=gdb)
        w.flush_state()
        return w.pushes

    def past_strangers_share(self, txn, user_devices, sender: str, size: int,
                             now: int) -> set[str]:  # fmt: skip
        """The devices (``user_devices``: (user, [device, ...]) pairs) whose queue one
        more entry of ``size`` bytes would take past ``stranger-queue-count`` /
        ``-bytes`` and whose user does not know ``sender`` (``_known_to``); the
        sender's own devices are never among them."""
        lim = self.limits
        scount, sbytes = self.stranger_count, self.stranger_bytes
        if scount >= lim.max_count and sbytes >= lim.max_bytes:
            return set()
        db, out, w = self.db["qstate"], set(), None
        for user, devs in user_devices:
            if user == sender:
                continue
            known = None
            for d in devs:
                raw = txn.get(d.encode(), db=db)
                if raw is None:
                    continue
                _, count, nbytes = _QSTATE.unpack(raw)
                if count + 1 > scount or nbytes + size > sbytes:
                    if known is None:
                        w = w or _Txn(self, txn)
                        known = self._known_to(w, sender, user, now)
                    if not known:
                        out.add(d)
        return out

    def notice_devices(self, txn, devices, kind: int, origin: str, typ: str, now: int) -> list:
        """Queue a notice of ``kind`` for each of ``devices`` inside ``txn`` (2: the
        device-list notice, ``typ`` empty; 3: ``<keys from=origin type=typ>``);
        returns the pushes for the caller to deliver once it has committed."""
        self._check_caches(txn)
        w = _Txn(self, txn)
        entry = self.encoder.entry(kind, now, 0, origin, "", typ)
        for d in devices:
            w.enqueue(d, entry)
        w.flush_state()
        return w.pushes

    def keys_changed(self, txn, users, origin: str, now: int) -> list:
        """Queue ``<keys from=origin type=changed>`` for every current device of each of
        ``users``, at most one undelivered per (device, origin): one still in a
        device's queue (``knote``: device NUL origin -> its seq) is deleted and the
        new one, at the tail, takes its place, so the notice comes after the latest
        change and a loop of links, first uploads or registrations queues one
        notice per correspondent device, not one per change.  A device whose queue
        has no room (queue-max-count / -bytes), or holds the strangers' share
        while its user does not know ``origin`` (``_known_to``), gets no new one
        (the 408 check still makes its next per-device send see the new device).
        A row outlives its notice's ack; the purge drops a device's rows once its
        queue is empty (``purge_expired``), the device's removal all of them.
        Returns the pushes for the caller to deliver once it has committed."""
        if not users:
            return []
        self._check_caches(txn)
        w = _Txn(self, txn)
        accounts, kdb, qdb = self.db["accounts"], self.db["knote"], self.db["queue"]
        entry = self.encoder.entry(KEYS, now, 0, origin, "", "changed")
        size = len(entry)
        lim = self.limits
        scount, sbytes = self.stranger_count, self.stranger_bytes
        ob = origin.encode()
        for user in users:
            raw = txn.get(user.encode(), db=accounts)
            if raw is None:
                continue
            known = None
            for n in _unpackb(raw)["devices"]:
                d = f"{user}:{n}"
                st = w.qstate(d)
                ik = f"{d}\x00{origin}".encode()
                old = txn.get(ik, db=kdb)
                replaced = False
                if old is not None:
                    okey = qkey(d, int.from_bytes(old, "big"))
                    value = txn.get(okey, db=qdb)
                    # (the seq's entry is that notice unless it was acked: seqs are not
                    # reused while the queue lives, and ``knote`` goes with the queue)
                    if value is not None and value[0] == KEYS and value[11 : 11 + value[10]] == ob:
                        txn.delete(okey, db=qdb)
                        st[1] -= 1
                        st[2] -= len(value)
                        replaced = True
                if not replaced:
                    if st[1] + 1 > lim.max_count or st[2] + size > lim.max_bytes:
                        continue
                    if st[1] + 1 > scount or st[2] + size > sbytes:
                        if known is None:
                            known = self._known_to(w, origin, user, now)
                        if not known:
                            continue
                txn.put(ik, st[0].to_bytes(8, "big"), db=kdb)
                w.enqueue(d, entry)
        w.flush_state()
        return w.pushes

    def notice_users(self, txn, users, kind: int, origin: str, typ: str, now: int) -> list:
        """``notice_devices`` for every current device of each of ``users``."""
        accounts = self.db["accounts"]
        devices = []
        for user in users:
            raw = txn.get(user.encode(), db=accounts)
            if raw is not None:
                devices += [f"{user}:{n}" for n in _unpackb(raw)["devices"]]
        return self.notice_devices(txn, devices, kind, origin, typ, now) if devices else []

    # -- reading ------------------------------------------------------------------

    def queued_txn(self, txn, device: str) -> int:
        """How many entries the device's queue holds, inside ``txn`` (qstate's count)."""
        raw = txn.get(device.encode(), db=self.db["qstate"])
        return 0 if raw is None else _QSTATE.unpack(raw)[1]

    def head(self, device: str) -> int:
        """The next sequence the device's queue will hand out (1 for a new device)."""
        with self.env.begin() as txn:
            raw = txn.get(device.encode(), db=self.db["qstate"])
        return 1 if raw is None else _QSTATE.unpack(raw)[0]

    def read(
        self, device: str, after: int, limit: int, max_bytes: int | None = None
    ) -> list[tuple[int, bytes]]:
        """Up to ``limit`` (seq, frame) entries of the device's queue with seq > ``after``
        (``read_into``'s frames one by one, for tools and tests)."""
        buf, seqs = bytearray(), []
        self.read_into(buf, device, after, limit, 1 << 62 if max_bytes is None else max_bytes,
                       seqs)  # fmt: skip
        out, pos = [], 0
        for seq in seqs:
            end = pos + 3 + int.from_bytes(buf[pos : pos + 3], "big")
            out.append((seq, bytes(buf[pos:end])))
            pos = end
        return out

    def read_into(
        self, out: bytearray, device: str, after: int, limit: int, max_bytes: int,
        seqs: list | None = None,
    ) -> tuple[int, int, int]:  # fmt: skip
        """Append the delivery frames of up to ``limit`` entries with seq > ``after``
        to ``out``, stopping once they reach ``max_bytes`` (the entry that
        crosses it included, so at least one is written); ``seqs`` gets each
        entry's sequence.

        Returns (entries written, bytes written, the last seq written)."""
        n = size = last = 0
        write = self.encoder._codec.write_entry_frame  # (FrameEncoder.write without its call)
        prefix = qprefix(device)
        gdb = self.db["gbody"]
        with self.env.begin(buffers=True) as txn, txn.cursor(db=self.db["queue"]) as c:
            if not c.set_range(qkey(device, after + 1)):
                return 0, 0, 0
            for key, value in c:
                if n >= limit or bytes(key[: len(prefix)]) != prefix:
                    break
                last = int.from_bytes(key[-8:], "big")
                if value[0] == GREF:  # the group message's body, stored once
                    value = txn.get(body_number(value) + b"b", db=gdb)
                    if value is None:  # (cannot be: it lives while referred to)
                        continue
                size += write(out, value, last)
                n += 1
                if seqs is not None:
                    seqs.append(last)
                if size >= max_bytes:
                    break
        return n, size, last

    # -- housekeeping ---------------------------------------------------------------

    def purge_expired(self, start: bytes = b"", max_devices: int = 500) -> tuple[int, bytes]:
        """Delete entries older than max_age from up to ``max_devices`` queues.

        Walks ``qstate`` from ``start``; returns (entries purged, where to go
        on next time, b"" after the last device).  One short write
        transaction per call, so a big store is purged in slices.
        """
        cutoff = self.clock() - self.limits.max_age_ms
        purged = 0
        qdb, sdb, fdb = self.db["queue"], self.db["qstate"], self.db["fan"]
        gdb, kdb = self.db["gbody"], self.db["knote"]
        with self.env.begin(write=True) as txn:
            sc = txn.cursor(db=sdb)
            if not sc.set_range(start):
                return 0, b""
            kc = txn.cursor(db=kdb)
            updates = []
            seen = 0
            nxt = b""
            for dkey, raw in sc:
                if seen >= max_devices:
                    nxt = dkey
                    break
                seen += 1
                st = list(_QSTATE.unpack(raw))
                if st[1] == 0:
                    # an empty queue holds no "keys changed" notice: its ``knote`` rows
                    # (kept until then, keys_changed) go, so they do not pile up
                    kp = dkey + b"\x00"
                    if kc.set_range(kp):
                        while kc.key().startswith(kp):
                            if not kc.delete():
                                break
                    continue
                device = dkey.decode()
                prefix = qprefix(device)
                user = device.partition(":")[0]
                with txn.cursor(db=qdb) as c:
                    if not c.set_range(prefix):
                        continue
                    while c.key().startswith(prefix):
                        value = c.value()
                        if value[0] == GREF or value[0] == GPAYLOAD:
                            if entry_t(txn, gdb, value) >= cutoff:
                                break
                            st[1] -= 1
                            st[2] -= entry_size(txn, gdb, value)
                            purged += 1
                            if not c.delete():
                                break
                            continue
                        kind, t, fan, origin, mid = entry_fields(value)
                        if t >= cutoff:
                            break
                        st[1] -= 1
                        st[2] -= len(value)
                        purged += 1
                        if kind == MESSAGE and fan:
                            txn.delete(self._fan_key(origin, mid, user), db=fdb)
                        if not c.delete():
                            break
                if st[1] <= 0:
                    st[1], st[2] = 0, 0
                updates.append((dkey, st))
            for dkey, st in updates:
                txn.put(dkey, _QSTATE.pack(*st), db=sdb)
        return purged, nxt

    def stats(self, top: int = 10) -> dict:
        """Queue lengths, bytes and oldest ages: totals and the ``top`` longest queues."""
        now = self.clock()
        devices = []
        total_count = total_bytes = 0
        oldest = None
        with self.env.begin() as txn:
            qc = txn.cursor(db=self.db["queue"])
            for dkey, raw in txn.cursor(db=self.db["qstate"]):
                _, count, size = _QSTATE.unpack(raw)
                if count <= 0:
                    continue
                device = dkey.decode()
                first_t = None
                if qc.set_range(qprefix(device)) and qc.key().startswith(qprefix(device)):
                    first_t = entry_t(txn, self.db["gbody"], qc.value())
                age = None if first_t is None else max(0, now - first_t) / 1000
                total_count += count
                total_bytes += size
                if age is not None and (oldest is None or age > oldest):
                    oldest = age
                devices.append({"device": device, "count": count, "bytes": size, "oldest_s": age})
        devices.sort(key=lambda d: (-d["count"], d["device"]))
        return {
            "devices_with_queue": len(devices),
            "count": total_count,
            "bytes": total_bytes,
            "oldest_s": oldest,
            "top": devices[:top],
        }


def drop_device_queue(txn, db: dict, device: str) -> int:
    """Delete a device's queue and its state inside ``txn`` (the device is gone); returns items."""
    prefix = qprefix(device)
    n = 0
    with txn.cursor(db=db["queue"]) as c:
        if c.set_range(prefix):
            while c.key().startswith(prefix):
                n += 1
                number = body_number(c.value())
                if number is not None:
                    _unref(txn, db["gbody"], number)
                if not c.delete():
                    break
    txn.delete(device.encode(), db=db["qstate"])
    with txn.cursor(db=db["knote"]) as c:  # (its pending key notices: Queues.keys_changed)
        if c.set_range(prefix):
            while c.key().startswith(prefix):
                if not c.delete():
                    break
    return n


def upgrade_entries(txn, db: dict, encoder: FrameEncoder) -> int:
    """Rewrite format-3 queue entries and queue states (msgpack) in this
    module's binary form, inside ``txn``; returns the entries rewritten."""
    codec = encoder._codec
    n = 0
    rewritten = []
    for key, value in txn.cursor(db=db["queue"]):
        kind, t, origin, mid, fan, frame = _unpackb(value)
        node = codec.decode(memoryview(frame)[3:])
        body = node.content if kind == MESSAGE else None
        entry = encoder.entry(kind, t, fan, node.attrs["from"], mid, node.attrs["type"], body)
        rewritten.append((key, entry))
    states = {}
    for key, _ in rewritten:
        device = key[:-9]
        states.setdefault(device, [0, 0])
    for key, entry in rewritten:
        txn.put(key, entry, db=db["queue"])
        st = states[key[:-9]]
        st[0] += 1
        st[1] += len(entry)
        n += 1
    for key, value in list(txn.cursor(db=db["qstate"])):
        nxt, count, size = _unpackb(value)
        count, size = states.get(key, (0, 0))
        txn.put(key, _QSTATE.pack(nxt, count, size), db=db["qstate"])
    return n
