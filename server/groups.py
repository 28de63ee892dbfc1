"""Groups: membership, roles, settings, invites and the notices of every change.

Theory of operation.  A group is one record in ``groups`` (msgpack, keyed
by its number, the digits of ``g:N``); its members are a list in join
order, so "the longest-standing member" is the first one.  ``ugroups``
keeps the pairs (user, group) for a user's list and for account deletion;
``invites`` maps a live invite code to its group.  Every request is a job
of the tick's commit (``Worker.write``): it checks first and writes after,
so a refusal writes nothing, and everything a change writes (the record,
the pairs, and a notice in the queue of every member device, the users
just removed included) is in the one transaction; ``meta["gver"]`` moves
with every change of what the workers' membership caches hold (members,
admins, announce), which is what keeps them exact (server/queues.py,
``_Txn.group``).

Notices are queue entries of kind 4 (pigeon.core._pycodec, "queue
entries"): their head (``<group from type by ... t>``) and content
(``<member user/>`` children, a ``description``) are encoded once here,
and the device's ``seq`` is spliced in between when it is delivered, as
for every other entry.  The entry is stored once, as a group message's body
is (``Queues.enqueue_shared``: in ``gbody``, a reference of 18 bytes in each
member device's queue), so an ``add`` of 1,000 members to a group of 1,000
stores one list of 1,000 names, not one per device; the delivery is the
same frame, in order with the messages.

Group messages are Queues' (server/queues.py): the body stored once in
``gbody``, a small reference in each member device's queue.

Tables:

    groups    "N" -> {s: subject, d: description, c: creator, t: created,
                      an: announce (0/1), ap: approval (0/1), inv: invite code or None,
                      m: [[user, admin (0/1), joined(, adder)], ...] (join order; the
                         adder: a user the member did not know who added them, until
                         the member writes to the group or the adder becomes known),
                      rq: [[user, asked], ...] (join requests)}
    ugroups   user NUL "N" -> b"", or the adder's number for a stranger's add (as in m)
    ugcount   user -> u32 (u32): how many ``ugroups`` pairs the user has
              (user-groups-max), then how many of them are a stranger's adds
              (stranger-groups; a 4-byte record: none); a user without one (none
              yet, or a store from before it) is counted once from ``ugroups`` and
              the count kept from then on.  A store from before the adds were
              marked has none marked: its memberships count as the user's own
    invites   code -> "N"
    grq       asked (u64 ms) "N" NUL user -> b"": the join requests by age, for their expiry
              (``expire_requests``: worker 0 drops those past group-request-expiry); a key
              whose request was approved or rejected since is dropped with the rest
    gbody     the group message and notice bodies (server/queues.py)
    meta      b"gid": the last group number given (never reused); b"gver": the
              count of group changes (the caches); b"gmsg": the last body number;
              b"gnotice": the last notice body number (server/queues.py);
              b"grqidx": the join requests of a store from before grq are indexed
              (``index_requests``, at open)
"""

from __future__ import annotations

import secrets
import struct
from dataclasses import dataclass

import msgpack

from pigeon.core.errors import ErrorCode
from pigeon.core.events import GroupMember, GroupResult
from pigeon.core.node import address_kind

from .errors import ServiceError
from .limits import budget_charge, budget_spent, retry_in, window_take
from .queues import GROUP_NOTICE, bump_group_version, notice_store_bytes
from .social import pair

GROUP_TABLES = ("groups", "ugroups", "ugcount", "invites", "gbody", "grq")

_T = struct.Struct(">Q")
GROUP_WINDOW_MS = 86_400_000  # the window of groups-per-day and group-joins-per-day
#: The requests that queue a notice for every member device: they draw on the user's
#: group-notice-bytes budget (a change of a 1,024-member group is up to 5,120 entries).
NOTICE_OPS = frozenset({"create", "add", "remove", "promote", "demote", "leave", "subject",
                        "description", "settings", "join", "approve"})  # fmt: skip

#: The changes that leave the membership as it was (its end-to-end keys too): their
#: notice is not queued for a member device whose queue is past stranger-queue-count
#: or -bytes when that member does not know the changer (that member sees the
#: current subject, description, settings and roles in ``info``).  Without it a
#: stranger's group of one member changing its subject in a loop queued 11,000
#: notices in that member's queue in 20 s, past queue-max-count: the member's
#: contacts then got 402.
SHARE_OPS = frozenset({"subject", "description", "settings", "promote", "demote"})
#: The membership changes are held to the same rule, but for the users the change is
#: about (``_notice``'s ``keep``: those added, removed, or every member of a new group),
#: whose adds were each checked against their queue (``_may_add``) or who asked: a
#: stranger who created a group with a member and added and removed a puppet account
#: in a loop (and in many groups) queued a notice in that member's queue at each step,
#: past queue-max-count.  A member who missed one is not left with wrong end-to-end
#: keys: the SDK asks ``info`` again after a login (client/groups.py), a member added
#: asks for a key it lacks, and a message names only current member devices (408).
MEMBER_OPS = frozenset({"create", "add", "remove", "leave", "join"})


def _pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(raw):
    return msgpack.unpackb(raw, raw=False, use_list=True)


@dataclass(frozen=True)
class GroupLimits:
    max_members: int = 1024
    user_groups_max: int = 1024  # groups one user may be a member of (error 437 past it)
    per_day: int = 100  # groups a user may create per window
    window_ms: int = GROUP_WINDOW_MS
    joins_per_day: int = 200  # invite previews and joins per user per window
    # adding a number that is not the adder's contact is a lookup (the answer says
    # whether it is registered): it costs one of discover-numbers (0: nothing charged)
    discover_numbers: int = 0
    discover_window_ms: int = 86_400_000
    notice_bytes: int = 16 << 20  # store bytes one user's changes may queue as notices per window
    notice_window_ms: int = 3_600_000
    subject_max: int = 100  # characters of a subject (the protocol's own ceiling: 100)
    description_max: int = 512  # bytes of a description (UTF-8; the protocol's: 512)
    request_expiry_ms: int = 7 * 86_400_000  # a join request is dropped after it
    # groups a user is in that a stranger added them to and they have not written to
    # (error 438 for the user past it; 0: no limit)
    stranger_groups: int = 64
    member_changes: int = 200  # add/remove/promote/demote requests per admin per group (0: off)
    member_changes_window_ms: int = 3_600_000


def notice_entry(enc, group: str, op: str, by: str, t: int, members=(), attrs=(),
                 description: str | None = None) -> bytes:  # fmt: skip
    """A queue entry of kind 4: ``<group from=group type=op by=by [attrs]
    [description] t seq>`` with ``<member user/>`` children (the layout:
    pigeon.core._pycodec, "queue entries")."""
    codec, N = enc._codec, enc._node
    a = {"from": group, "type": op, "by": by, **dict(attrs)}
    if description is not None:
        a["description"] = description
    a["t"] = str(t)
    head = bytearray(codec.encode(N("group", a)))
    children = [N("member", {"user": u}) for u in members]
    content = b""
    if children:
        bare = codec.encode(N("group", {}))
        content = codec.encode(N("group", {}, children))[len(bare) :]
    if head[0] != 0xF8 or head[1] + 3 > 0xFF:  # LIST_8: a notice has few attributes
        raise ValueError("a group notice's head must be a short list")
    head[1] += 2 + bool(children)  # the seq the delivery adds, and the content
    o = group.encode()
    out = bytearray((GROUP_NOTICE,))
    out += _T.pack(t)
    out.append(0)
    out.append(len(o))
    out += o
    out.append(0)  # no id
    out += len(head).to_bytes(2, "big")
    out += head
    out += content
    return bytes(out)


def _counts(txn, db, user: str) -> tuple[int, int] | None:
    """(memberships, a stranger's adds among them) of ``user`` from ``ugcount``, or None."""
    raw = txn.get(user.encode(), db=db["ugcount"])
    if raw is None:
        return None
    return int.from_bytes(raw[:4], "big"), int.from_bytes(raw[4:8], "big")


def _set_counts(txn, db, user: str, n: int, strangers: int) -> None:
    if n > 0:
        raw = n.to_bytes(4, "big") + (strangers.to_bytes(4, "big") if strangers else b"")
        txn.put(user.encode(), raw, db=db["ugcount"])
    else:
        txn.delete(user.encode(), db=db["ugcount"])


def accept_membership(txn, db, gid: str, user: str) -> bool:
    """``user`` accepted a group a stranger added it to (wrote to it, or the adder
    became known): the membership no longer counts in stranger-groups.  The group
    caches start again (``gver``: they hold the marked members, _Txn.group).  False
    if it was not marked (done already)."""
    raw = txn.get(gid.encode(), db=db["groups"])
    if raw is None:
        return False
    rec = _unpack(raw)
    for m in rec["m"]:
        if m[0] == user and len(m) > 3:
            del m[3:]
            break
    else:
        return False
    txn.put(gid.encode(), _pack(rec), db=db["groups"])
    bump_group_version(txn, db)
    txn.put(f"{user}\x00{gid}".encode(), b"", db=db["ugroups"])
    counts = _counts(txn, db, user)
    if counts is not None and counts[1]:
        _set_counts(txn, db, user, counts[0], counts[1] - 1)
    return True


class Groups:
    """The group requests of one worker, over its store and queues."""

    def __init__(self, store, queues, limits: GroupLimits = GroupLimits()):
        self.store = store
        self.queues = queues
        self.db = store._db
        self.limits = limits
        self.cost = 0  # notice bytes x devices queued by the request being handled
        #: the users ``_may_add`` let in whose adder they do not know -> the adder
        self._stranger_adds: dict[str, str] = {}

    # -- records ---------------------------------------------------------------

    def _load(self, txn, gid: str) -> dict | None:
        raw = txn.get(gid.encode(), db=self.db["groups"])
        return None if raw is None else _unpack(raw)

    def _save(self, txn, gid: str, rec: dict, cached: bool = True) -> None:
        """Write ``rec``; ``cached``: what the workers' group caches hold (members,
        admins, announce: ``_Txn.group``) may have changed, so ``gver`` moves and
        every worker starts its caches again.  A change of only the subject,
        description, invite code or join requests leaves them be (an admin's
        loop of ``revoke`` cleared every worker's caches at each one)."""
        txn.put(gid.encode(), _pack(rec), db=self.db["groups"])
        if cached:
            bump_group_version(txn, self.db)

    def counts(self, txn, user: str) -> tuple[int, int]:
        """(groups ``user`` is a member of, those a stranger's add put it in and it
        has not accepted): its ``ugcount``, or (none kept yet) its pairs in
        ``ugroups`` counted once."""
        got = _counts(txn, self.db, user)
        if got is not None:
            return got
        prefix = f"{user}\x00".encode()
        n = strangers = 0
        with txn.cursor(db=self.db["ugroups"]) as c:
            if c.set_range(prefix):
                for key, value in c:
                    if not key.startswith(prefix):
                        break
                    n += 1
                    strangers += bool(value)
        return n, strangers

    def groups_count(self, txn, user: str) -> int:
        """How many groups ``user`` is a member of (``counts``)."""
        return self.counts(txn, user)[0]

    def _pair(self, txn, user: str, gid: str, adder: str | None = None) -> None:
        """``user`` is now a member of ``gid`` (``adder``: added by a user it does not
        know): its ``ugroups`` pair, and its counts (counted before the pair is
        written: missing counts are counted from them)."""
        n, strangers = self.counts(txn, user)
        value = adder.encode() if adder else b""
        if txn.put(f"{user}\x00{gid}".encode(), value, db=self.db["ugroups"], overwrite=False):
            _set_counts(txn, self.db, user, n + 1, strangers + bool(adder))

    def _unpair(self, txn, user: str, gid: str) -> None:
        n, strangers = self.counts(txn, user)
        key = f"{user}\x00{gid}".encode()
        value = txn.get(key, db=self.db["ugroups"])
        if value is not None and txn.delete(key, db=self.db["ugroups"]):
            _set_counts(txn, self.db, user, n - 1, strangers - bool(value and strangers))

    def _stranger_room(self, txn, user: str, now: int) -> bool:
        """May a user ``user`` does not know add it to one group more (stranger-groups)?
        Past it, the marked memberships whose adder ``user`` knows by now (a contact
        since, a conversation) are accepted first, and counted again."""
        lim = self.limits.stranger_groups
        if not lim or self.counts(txn, user)[1] < lim:
            return True
        prefix = f"{user}\x00".encode()
        marked = []
        with txn.cursor(db=self.db["ugroups"]) as c:
            if c.set_range(prefix):
                for key, value in c:
                    if not key.startswith(prefix):
                        break
                    if value:
                        marked.append((bytes(key[len(prefix) :]).decode(), bytes(value).decode()))
        left = len(marked)
        for gid, adder in marked:
            if self.queues.knows_txn(txn, user, adder, now):
                accept_membership(txn, self.db, gid, user)
                left -= 1
        n, strangers = self.counts(txn, user)
        if strangers != left:  # (kept exact: the marks are what counts)
            _set_counts(txn, self.db, user, n, left)
        return left < lim

    def has_room(self, txn, user: str) -> bool:
        """May ``user`` be in one group more (user-groups-max)?"""
        return self.groups_count(txn, user) < self.limits.user_groups_max

    def _no_room(self) -> ServiceError:
        n = self.limits.user_groups_max
        return ServiceError(ErrorCode.TOO_MANY_GROUPS,
                            f"you are a member of {n} groups, the most one user may be in "
                            f"(user-groups-max): leave one first")  # fmt: skip

    def _devices(self, txn, users) -> list[tuple[str, list[str]]]:
        """(user, its devices) for each of ``users`` that has an account."""
        accounts = self.db["accounts"]
        out = []
        for u in users:
            raw = txn.get(u.encode(), db=accounts)
            if raw is not None:
                out.append((u, [f"{u}:{n}" for n in _unpack(raw)["devices"]]))
        return out

    def _notice(self, txn, now, gid, rec, op, by, members=(), attrs=(), description=None,
                keep=()) -> list:  # fmt: skip
        """Queue one notice for every member device, but (SHARE_OPS, MEMBER_OPS) not
        for one whose queue is past the strangers' share when its user does not know
        ``by``; the users of ``keep`` get it whatever their queue holds."""
        users = [m[0] for m in rec["m"]] if rec is not None else []
        entry = notice_entry(self.queues.encoder, "g:" + gid, op, by, now, members, attrs,
                             description)  # fmt: skip
        pairs = self._devices(txn, users)
        devices = [d for _, devs in pairs for d in devs]
        if op in SHARE_OPS or op in MEMBER_OPS:
            if keep:  # (a set: a new group of 1,024 keeps every member)
                keep = set(keep)
            ask = [p for p in pairs if p[0] not in keep] if keep else pairs
            skip = self.queues.past_strangers_share(txn, ask, by, len(entry), now)
            if skip:
                devices = [d for d in devices if d not in skip]
        self.cost += notice_store_bytes(entry, devices)
        return self.queues.enqueue_shared(txn, devices, entry, f"g:{gid}\x00{by}".encode())

    @staticmethod
    def _member(rec, user):
        for m in rec["m"]:
            if m[0] == user:
                return m
        return None

    def _need(self, txn, gid: str | None, user: str, admin: bool = False) -> dict:
        if gid is None:
            raise ServiceError(ErrorCode.BAD_REQUEST, "this request names a group (group=)")
        rec = self._load(txn, gid)
        m = None if rec is None else self._member(rec, user)
        if m is None:
            raise ServiceError(ErrorCode.NOT_MEMBER, "you are not a member of this group")
        if admin and not m[1]:
            raise ServiceError(ErrorCode.NOT_ADMIN, "only the group's admins may do this")
        return rec

    def _may_add(self, txn, adder: str, user: str, now: int) -> int:
        """0 if ``adder`` may add ``user`` to a group, else the error code for them.

        Adding a user who does not have the adder as a contact (and has not talked
        with them lately) costs a new chat, as a first message to them would: a
        group of 1,023 strangers otherwise reached a thousand times the new-chats
        limit with each message."""
        if address_kind(user) != "user" or txn.get(user.encode(), db=self.db["accounts"]) is None:
            return ErrorCode.UNKNOWN_RECIPIENT
        raw = txn.get(user.encode(), db=self.db["presence"])
        setting = "everyone"
        if raw is not None:
            setting = _unpack(raw).get("priv", {}).get("groupadd", "everyone")
        if setting == "contacts":
            if txn.get(f"{user}\x00{adder}".encode(), db=self.db["contacts"]) is None:
                return ErrorCode.ADD_REFUSED
        elif setting != "everyone":
            return ErrorCode.ADD_REFUSED
        if txn.get(pair(user, adder), db=self.db["blocks"]) is not None:
            # a block stops adds too (433, as the privacy setting: which of the two it
            # is stays the user's business); else a blocked user's add/remove loop
            # queued notices for them
            return ErrorCode.ADD_REFUSED
        if not self.has_room(txn, user):
            return ErrorCode.TOO_MANY_GROUPS
        stranger = not self.queues.knows_txn(txn, user, adder, now)
        if stranger and not self._stranger_room(txn, user, now):
            # a stranger's adds fill no more than stranger-groups of the user's groups:
            # else one account added them to groups-per-day groups a day and left, and
            # in ten days (or with eleven accounts in one) they were in user-groups-max
            # groups and their friends' adds got 437
            return ErrorCode.STRANGER_GROUPS
        if self.queues.past_strangers_share(txn, self._devices(txn, [user]), adder, 0, now):
            # the add notice would take the user's queue past what it holds from
            # senders who are not their contacts (stranger-queue-count / -bytes):
            # a stranger's add/remove loop over many groups filled it to
            # queue-max-count, and the user's contacts then got 402 (checked before
            # the new-chat charge: a refused add costs no new chat)
            return ErrorCode.QUEUE_FULL
        if not self.queues.chat_allowed_txn(txn, adder, user, now):
            return ErrorCode.NEW_CHAT_LIMIT
        if stranger:
            self._stranger_adds[user] = adder
        return 0

    def _check_subject(self, subject: str) -> None:
        n = self.limits.subject_max
        if len(subject) > n:
            raise ServiceError(ErrorCode.BAD_REQUEST,
                               f"a group's subject has at most {n} characters on this server "
                               f"(group-subject-max); this one has {len(subject)}")  # fmt: skip

    def _member_change(self, txn, now: int, user: str, gid: str, count: bool = True) -> None:
        """One more add, remove, promote or demote by ``user`` in ``gid``: 302 past
        group-member-changes per window, checked before anything is written (as
        groups-per-day is); ``count``: record it now (False: the caller checks
        something else first, then calls again to record it)."""
        lim = self.limits
        if not lim.member_changes:
            return
        key, window = f"gchange:{user}\x00{gid}", lim.member_changes_window_ms
        if count:
            self.store.hit_txn(txn, key, lim.member_changes, window, now)
        elif wait := self.store.window_wait(txn, key, lim.member_changes, window, now):
            raise ServiceError(ErrorCode.RATE_LIMITED,
                               f"at most {lim.member_changes} member changes (add, remove, "
                               f"promote, demote) per admin and group in "
                               f"{lim.member_changes_window_ms // 1000} s; {retry_in(wait)}")  # fmt: skip

    def _charge_adds(self, txn, now: int, adder: str, users) -> None:
        """Adding ``users`` tells ``adder`` which of them are registered (433 or 400 in
        the answer), and makes them its co-members, whose device lists and keys it
        then looks up free (``Social.shares_group``): each one outside its contact
        set costs one number of ``discover-numbers``, as a lookup does (302 for the
        whole request past it, checked before anything is written)."""
        lim = self.limits
        if not lim.discover_numbers:
            return
        contacts = self.db["contacts"]
        n = sum(1 for u in users
                if u != adder and txn.get(f"{adder}\x00{u}".encode(), db=contacts) is None)  # fmt: skip
        if not n:
            return
        key = f"discover:{adder}".encode()
        ok, left = window_take(txn, self.db["limits"], key, now, lim.discover_window_ms,
                               lim.discover_numbers, n)  # fmt: skip
        if not ok:
            raise ServiceError(
                ErrorCode.RATE_LIMITED,
                f"contact discovery limit: adding a number outside your contacts is a lookup; "
                f"{left} more may be looked up in this {lim.discover_window_ms // 1000} s "
                f"window, this request has {n}",
            )

    def _join(self, txn, gid: str, rec: dict, user: str, now: int, adder=None) -> None:
        """``user`` joins; ``adder``: a user it does not know added it (stranger-groups)."""
        rec["m"].append([user, 0, now, adder] if adder else [user, 0, now])
        rec["rq"] = [r for r in rec["rq"] if r[0] != user]
        self._pair(txn, user, gid, adder)

    def _drop(self, txn, gid: str, rec: dict, users, now: int, by: str) -> list:
        """Take ``users`` out (they are members); the last-admin rule; the group goes
        when nobody is left.  Returns the pushes of a promotion notice, if any."""
        gone = set(users)
        rec["m"] = [m for m in rec["m"] if m[0] not in gone]
        for u in gone:
            self._unpair(txn, u, gid)
        if not rec["m"]:
            txn.delete(gid.encode(), db=self.db["groups"])
            if rec.get("inv"):
                txn.delete(rec["inv"].encode(), db=self.db["invites"])
            bump_group_version(txn, self.db)
            return []
        if not any(m[1] for m in rec["m"]):
            first = rec["m"][0]  # the longest-standing member (WhatsApp's rule)
            first[1] = 1
            self._save(txn, gid, rec)
            return self._notice(txn, now, gid, rec, "promote", by, (first[0],))
        self._save(txn, gid, rec)
        return []

    # -- requests ----------------------------------------------------------------

    def handle(self, txn, now: int, user: str, req) -> tuple[GroupResult, list]:
        """Do ``req`` (a GroupRequest) for ``user`` inside ``txn``; returns (the answer,
        the pushes of the notices it queued).  Raises ServiceError (nothing written)."""
        op = req.op
        gid = None if req.group is None else req.group[2:]
        self._stranger_adds.clear()
        fn = getattr(self, "_op_" + op)
        if op not in NOTICE_OPS:
            return fn(txn, now, user, req, gid)
        # Checked before, charged after (what the notices really cost): one change
        # of a big group queues a notice in up to 5,120 queues, and nothing else
        # bounds what a loop of them writes (notices are not held to queue limits).
        lim, db, key = self.limits, self.db["limits"], f"gnotice:{user}".encode()
        spent = budget_spent(txn, db, key, now, lim.notice_window_ms, lim.notice_bytes)
        if spent >= lim.notice_bytes and op != "leave":  # leaving is never refused
            raise ServiceError(ErrorCode.RATE_LIMITED,
                               f"your group changes queued {lim.notice_bytes} bytes of notices "
                               f"in {lim.notice_window_ms // 1000} s; try again later")  # fmt: skip
        self.cost = 0
        out = fn(txn, now, user, req, gid)
        if self.cost:
            budget_charge(txn, db, key, now, lim.notice_window_ms, lim.notice_bytes, self.cost)
        return out

    def _answer(self, req, gid=None, attrs=(), **kw) -> GroupResult:
        return GroupResult(req.id, req.op, None if gid is None else "g:" + gid,
                           tuple((k, str(v)) for k, v in attrs), **kw)  # fmt: skip

    def _op_create(self, txn, now, user, req, gid):
        lim = self.limits
        if req.subject is None:
            raise ServiceError(ErrorCode.BAD_REQUEST, "a new group needs a subject")
        self._check_subject(req.subject)
        wanted = list(dict.fromkeys(u for u in req.members if u != user))
        if len(wanted) + 1 > lim.max_members:
            raise ServiceError(ErrorCode.GROUP_FULL,
                               f"a group has at most {lim.max_members} members")  # fmt: skip
        key = f"groups:{user}"
        if wait := self.store.window_wait(txn, key, lim.per_day, lim.window_ms, now):
            raise ServiceError(ErrorCode.RATE_LIMITED,
                               f"at most {lim.per_day} new groups per "
                               f"{lim.window_ms // 1000} s; {retry_in(wait)}")  # fmt: skip
        if not self.has_room(txn, user):
            raise self._no_room()
        self.store.check_room(txn)
        self._charge_adds(txn, now, user, wanted)  # (may refuse: before the first write)
        self.store.hit_txn(txn, key, lim.per_day, lim.window_ms, now)
        meta = self.db["meta"]
        raw = txn.get(b"gid", db=meta)
        n = 1 if raw is None else int.from_bytes(raw, "big") + 1
        txn.put(b"gid", n.to_bytes(8, "big"), db=meta)
        gid = str(n)
        rec = {"s": req.subject, "d": "", "c": user, "t": now, "an": 0, "ap": 0, "inv": None,
               "m": [[user, 1, now]], "rq": []}  # fmt: skip
        self._pair(txn, user, gid)
        failed = []
        for u in wanted:
            code = self._may_add(txn, user, u, now)
            if code:
                failed.append((u, code))
            else:
                self._join(txn, gid, rec, u, now, self._stranger_adds.pop(u, None))
        self._save(txn, gid, rec)
        pushes = self._notice(txn, now, gid, rec, "create", user, (),
                              (("subject", req.subject),), keep=[m[0] for m in rec["m"]])  # fmt: skip
        return self._answer(req, gid, (("subject", req.subject), ("t", now)),
                            failed=tuple(failed)), pushes  # fmt: skip

    def _op_info(self, txn, now, user, req, gid):
        rec = self._need(txn, gid, user)
        attrs = (("subject", rec["s"]), ("creator", rec["c"]), ("t", rec["t"]),
                 ("announce", rec["an"]), ("approval", rec["ap"]))  # fmt: skip
        members = tuple(GroupMember(m[0], "admin" if m[1] else "member", m[2]) for m in rec["m"])
        return self._answer(req, gid, attrs, members=members, description=rec["d"] or None), []

    def _op_list(self, txn, now, user, req, gid):
        prefix = f"{user}\x00".encode()
        items = []
        with txn.cursor(db=self.db["ugroups"]) as c:
            if c.set_range(prefix):
                for key in c.iternext(values=False):
                    if not key.startswith(prefix):
                        break
                    g = key[len(prefix) :].decode()
                    rec = self._load(txn, g)
                    if rec is not None:
                        items.append(("g:" + g, rec["s"], rec["t"]))
        return self._answer(req, items=tuple(items)), []

    def _op_add(self, txn, now, user, req, gid):
        rec = self._need(txn, gid, user, admin=True)
        self.store.check_room(txn)
        have = {m[0] for m in rec["m"]}
        # checked before the first write (a refusal writes nothing), counted once
        # discovery allowed the request too
        self._member_change(txn, now, user, gid, count=False)
        self._charge_adds(txn, now, user, [u for u in dict.fromkeys(req.members) if u not in have])
        self._member_change(txn, now, user, gid)

        def refused(u):
            if self._member(rec, u) is not None:
                return ErrorCode.ALREADY_MEMBER
            if len(rec["m"]) >= self.limits.max_members:
                return None
            return self._may_add(txn, user, u, now)

        return self._add(txn, now, user, req, gid, rec, refused)

    def _add(self, txn, now, user, req, gid, rec, refused):
        """Add the ``req.members`` that ``refused`` (user -> an error code, or a false value) lets
        in, up to the group's limit; one ``add`` notice names them all."""
        failed, added = [], []
        for u in dict.fromkeys(req.members):
            code = refused(u)
            if code:
                failed.append((u, code))
            elif len(rec["m"]) >= self.limits.max_members:
                failed.append((u, ErrorCode.GROUP_FULL))
            elif self._member(rec, u) is None:
                self._join(txn, gid, rec, u, now, self._stranger_adds.pop(u, None))
                added.append(u)
        pushes = []
        if added:
            self._save(txn, gid, rec)
            pushes = self._notice(txn, now, gid, rec, "add", user, added, keep=added)
        return self._answer(req, gid, failed=tuple(failed)), pushes

    def _op_remove(self, txn, now, user, req, gid):
        rec = self._need(txn, gid, user, admin=True)
        self._member_change(txn, now, user, gid, count=False)
        self._member_change(txn, now, user, gid)
        failed, gone = [], []
        for u in dict.fromkeys(req.members):
            if self._member(rec, u) is None:
                failed.append((u, ErrorCode.NOT_MEMBER))
            else:
                gone.append(u)
        pushes = []
        if gone:
            # told first, while they are members: the removed users' devices get it too
            pushes = self._notice(txn, now, gid, rec, "remove", user, gone, keep=gone)
            pushes += self._drop(txn, gid, rec, gone, now, user)
        return self._answer(req, gid, failed=tuple(failed)), pushes

    def _op_leave(self, txn, now, user, req, gid):
        rec = self._need(txn, gid, user)
        pushes = self._notice(txn, now, gid, rec, "leave", user, (user,))
        pushes += self._drop(txn, gid, rec, (user,), now, user)
        return self._answer(req, gid), pushes

    def _role(self, txn, now, user, req, gid, admin: int):
        rec = self._need(txn, gid, user, admin=True)
        self._member_change(txn, now, user, gid, count=False)
        self._member_change(txn, now, user, gid)
        failed, changed = [], []
        for u in dict.fromkeys(req.members):
            m = self._member(rec, u)
            if m is None:
                failed.append((u, ErrorCode.NOT_MEMBER))
            elif m[1] != admin:
                m[1] = admin
                changed.append(u)
        pushes = []
        if changed:
            self._save(txn, gid, rec)
            pushes = self._notice(txn, now, gid, rec, "promote" if admin else "demote", user,
                                  changed)  # fmt: skip
            if not admin:
                pushes += self._drop(txn, gid, rec, (), now, user)  # the last-admin rule
        return self._answer(req, gid, failed=tuple(failed)), pushes

    def _op_promote(self, txn, now, user, req, gid):
        return self._role(txn, now, user, req, gid, 1)

    def _op_demote(self, txn, now, user, req, gid):
        return self._role(txn, now, user, req, gid, 0)

    def _op_subject(self, txn, now, user, req, gid):
        rec = self._need(txn, gid, user, admin=True)
        if req.subject is None:
            raise ServiceError(ErrorCode.BAD_REQUEST, "a subject request names the subject")
        self._check_subject(req.subject)
        rec["s"] = req.subject
        self._save(txn, gid, rec, cached=False)
        pushes = self._notice(txn, now, gid, rec, "subject", user, (), (("subject", req.subject),))
        return self._answer(req, gid, (("subject", req.subject),)), pushes

    def _op_description(self, txn, now, user, req, gid):
        rec = self._need(txn, gid, user, admin=True)
        text = req.description or ""
        n = self.limits.description_max
        if len(text.encode()) > n:
            raise ServiceError(ErrorCode.BAD_REQUEST,
                               f"a group's description has at most {n} bytes (UTF-8) on this "
                               f"server (group-description-max); this one has "
                               f"{len(text.encode())}")  # fmt: skip
        rec["d"] = text
        self._save(txn, gid, rec, cached=False)
        pushes = self._notice(txn, now, gid, rec, "description", user, (), (), text)
        return self._answer(req, gid), pushes

    def _op_settings(self, txn, now, user, req, gid):
        rec = self._need(txn, gid, user, admin=True)
        attrs = []
        if req.announce is not None:
            rec["an"] = int(req.announce)
        if req.approval is not None:
            rec["ap"] = int(req.approval)
        attrs = (("announce", str(rec["an"])), ("approval", str(rec["ap"])))
        self._save(txn, gid, rec)
        pushes = self._notice(txn, now, gid, rec, "settings", user, (), attrs)
        return self._answer(req, gid, attrs), pushes

    # -- invites ---------------------------------------------------------------------

    def _new_code(self, txn, gid: str, rec: dict) -> str:
        code = secrets.token_urlsafe(16)  # 22 characters, 128 bits
        txn.put(code.encode(), gid.encode(), db=self.db["invites"])
        rec["inv"] = code
        self._save(txn, gid, rec, cached=False)
        return code

    def _op_invite(self, txn, now, user, req, gid):
        rec = self._need(txn, gid, user, admin=True)
        code = rec.get("inv") or self._new_code(txn, gid, rec)
        return self._answer(req, gid, (("code", code),)), []

    def _op_revoke(self, txn, now, user, req, gid):
        rec = self._need(txn, gid, user, admin=True)
        if rec.get("inv"):
            txn.delete(rec["inv"].encode(), db=self.db["invites"])
        code = self._new_code(txn, gid, rec)
        return self._answer(req, gid, (("code", code),)), []

    def _by_code(self, txn, now, user, req) -> tuple[str, dict]:
        if req.code is None:
            raise ServiceError(ErrorCode.BAD_REQUEST, "this request names an invite code (code=)")
        lim = self.limits
        key = f"gjoin:{user}"
        if not self.store.hit_txn(txn, key, lim.joins_per_day, lim.window_ms, now):
            raise ServiceError(ErrorCode.RATE_LIMITED, "too many invite codes tried; try later")
        raw = txn.get(req.code.encode(), db=self.db["invites"])
        rec = None if raw is None else self._load(txn, raw.decode())
        if rec is None:
            raise ServiceError(ErrorCode.BAD_INVITE, "this invite code is not valid (revoked?)")
        return raw.decode(), rec

    def _op_preview(self, txn, now, user, req, gid):
        gid, rec = self._by_code(txn, now, user, req)
        return self._answer(req, gid, (("subject", rec["s"]), ("approval", rec["ap"]),
                                       ("count", len(rec["m"])))), []  # fmt: skip

    def _op_join(self, txn, now, user, req, gid):
        gid, rec = self._by_code(txn, now, user, req)
        if self._member(rec, user) is not None:
            raise ServiceError(ErrorCode.ALREADY_MEMBER, "you are a member of this group")
        if len(rec["m"]) >= self.limits.max_members:
            raise ServiceError(ErrorCode.GROUP_FULL, "the group is full")
        if not self.has_room(txn, user):  # (a request too: it could not be approved)
            raise self._no_room()
        if rec["ap"]:
            if not any(r[0] == user for r in rec["rq"]):
                if len(rec["rq"]) >= self.limits.max_members:
                    raise ServiceError(ErrorCode.TOO_MANY, "too many requests wait; try later")
                rec["rq"].append([user, now])
                self._save(txn, gid, rec, cached=False)
                txn.put(_request_key(now, gid, user), b"", db=self.db["grq"])
            return self._answer(req, gid, (("requested", 1),)), []
        self._join(txn, gid, rec, user, now)
        self._save(txn, gid, rec)
        pushes = self._notice(txn, now, gid, rec, "join", user, (user,))
        return self._answer(req, gid), pushes

    def _op_requests(self, txn, now, user, req, gid):
        rec = self._need(txn, gid, user, admin=True)
        return self._answer(req, gid, members=tuple(GroupMember(u, None, t)
                                                    for u, t in rec["rq"])), []  # fmt: skip

    def _op_approve(self, txn, now, user, req, gid):
        rec = self._need(txn, gid, user, admin=True)
        asked = {r[0] for r in rec["rq"]}

        def refused(u):
            if u not in asked:
                return ErrorCode.NOT_MEMBER
            return None if self.has_room(txn, u) else ErrorCode.TOO_MANY_GROUPS

        return self._add(txn, now, user, req, gid, rec, refused)

    def _op_reject(self, txn, now, user, req, gid):
        rec = self._need(txn, gid, user, admin=True)
        drop = set(req.members)
        failed = tuple((u, ErrorCode.NOT_MEMBER) for u in dict.fromkeys(req.members)
                       if not any(r[0] == u for r in rec["rq"]))  # fmt: skip
        before = len(rec["rq"])
        rec["rq"] = [r for r in rec["rq"] if r[0] not in drop]
        if len(rec["rq"]) != before:
            self._save(txn, gid, rec, cached=False)
        return self._answer(req, gid, failed=failed), []


def _request_key(asked: int, gid: str, user: str) -> bytes:
    return _T.pack(asked) + f"{gid}\x00{user}".encode()


#: meta: set once every join request in ``groups`` has its key in ``grq``
REQUESTS_INDEXED = b"grqidx"


def index_requests(txn, db: dict) -> int:
    """At open (server/store.py), once per store: a key in ``grq`` for every join
    request of a store from before ``grq`` (which had none: its requests never
    expired, unless a newer request in the same group did); returns how many."""
    meta = db["meta"]
    if txn.get(REQUESTS_INDEXED, db=meta) is not None:
        return 0
    n = 0
    grq = db["grq"]
    with txn.cursor(db=db["groups"]) as c:
        for key, raw in c:
            for user, asked in _unpack(raw).get("rq") or ():
                n += txn.put(_request_key(asked, bytes(key).decode(), user), b"", db=grq)
    txn.put(REQUESTS_INDEXED, b"1", db=meta)
    return n


def expire_requests(groups: Groups, now: int, batch: int = 1000) -> int:
    """Drop the join requests older than group-request-expiry (worker 0, with the
    queue purge), oldest first, ``batch`` index keys per short write transaction of
    its own; returns how many requests went.  A request's key in ``grq`` is written
    with it (``_op_join``); one whose request was approved, rejected or asked again
    since, or whose group is gone, is dropped and changes nothing."""
    cutoff = now - groups.limits.request_expiry_ms
    dropped = 0
    db = groups.db["grq"]
    with groups.store.read() as txn:  # (nothing due, the usual case: no write transaction)
        with txn.cursor(db=db) as c:
            if not c.first() or _T.unpack_from(c.key())[0] > cutoff:
                return 0
    while True:
        with groups.store.write() as txn:
            keys = []
            with txn.cursor(db=db) as c:
                if c.first():
                    for key in c.iternext(values=False):
                        if _T.unpack_from(key)[0] > cutoff or len(keys) >= batch:
                            break
                        keys.append(bytes(key))
            changed: dict[str, dict] = {}
            for key in keys:
                txn.delete(key, db=db)
                gid, _, user = key[_T.size :].decode().partition("\x00")
                rec = changed.get(gid) or groups._load(txn, gid)
                if rec is None:
                    continue
                # (every request past it, not only this key's: those of a store from
                # before grq have no key of their own)
                left = [r for r in rec["rq"] if r[1] > cutoff]
                if len(left) != len(rec["rq"]):
                    dropped += len(rec["rq"]) - len(left)
                    rec["rq"] = left
                    changed[gid] = rec
            for gid, rec in changed.items():
                groups._save(txn, gid, rec, cached=False)
        if len(keys) < batch:
            return dropped


def drop_user_groups(groups: Groups, txn, user: str, now: int) -> list:
    """An account is deleted: it leaves every group it was in (notices, last-admin rule)."""
    prefix = f"{user}\x00".encode()
    gids = []
    with txn.cursor(db=groups.db["ugroups"]) as c:
        if c.set_range(prefix):
            for key in c.iternext(values=False):
                if not key.startswith(prefix):
                    break
                gids.append(key[len(prefix) :].decode())
    pushes = []
    for gid in gids:
        rec = groups._load(txn, gid)
        if rec is None or groups._member(rec, user) is None:
            groups._unpair(txn, user, gid)
            continue
        pushes += groups._notice(txn, now, gid, rec, "leave", user, (user,))
        pushes += groups._drop(txn, gid, rec, (user,), now, user)
    return pushes
