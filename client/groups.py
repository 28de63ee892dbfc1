"""Groups in the SDK: the management requests, group notices, and end-to-end
encrypted group messages (docs/PROTOCOL.md 10g).

Theory of operation.  ``GroupsAPI`` is a part of ``ClientAPI``
(client/_core.py), so the asyncio and the trio client both have every
method.  Each management operation is one ``group`` request answered with
the same id (``GroupResult``) or an error (``ServerError``); operations
about several users answer with the ones that failed (``failed``: (user,
error code)), the others were done.

**Sending.**  ``send("g:N", body)`` on an encrypting client (the default)
encrypts once with this device's Megolm session for the group
(client/group_crypto.py) and sends that one body, plus a key share for
each recipient device that does not hold the session's key yet: every
device of every member and every other device of this account, from the
members of ``group_info`` and the device lists of ``devices`` (both cached,
and dropped when a notice says they changed; the member lists after each
login too, and a group's when a user not in it writes to it or asks for its
key, or when it is older than ``GROUP_MEMBERS_TTL`` (300 s): a server does
not queue a stranger's membership notices for a device whose queue is past
the strangers' share, docs/PROTOCOL.md 10g, and a device that stays connected
would otherwise never learn of a removal it missed).  A key share is an Olm
payload, so the SDK opens an Olm session first with a device it has none
with (keys from the key directory, checked as for 1:1).  When a recipient
device disappears (a member removed or left, a device unlinked) the next
message starts a new session; a member removed therefore cannot read what
follows.  ``plaintext=True`` clients send the body as given.

**Receiving.**  An encrypted group message comes out of the iterator as a
``GroupMessage`` (or ``GroupDecryptionFailed``); a notice as the core's
``GroupNotice``, after the SDK has dropped what it cached about the group.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import msgpack

from pigeon.core.events import GroupMember, GroupNotice, GroupRequest, GroupResult

from . import e2e
from .group_crypto import session_of
from .secure import GroupDecryptionFailed

__all__ = ["GroupInfo", "GroupsAPI"]

logger = logging.getLogger("pigeon.client")

#: notices after which the member list of a group may have shrunk: the next
#: message starts a new Megolm session
_SHRINK = frozenset({"remove", "leave"})
#: the bundles one key-bundle answer may hold (the children of one node); users per
#: request: ``Client._keys_chunk`` (the server's keys-query-max default, smaller once
#: a server answered 406: ``_fetch_keys_chunked``)
KEYS_QUERY_BUNDLES = 1024
#: the application type of a 1:1 plaintext message asking a member device to share
#: its group key with this device again (it lost it): ``[group, session id]``
GROUP_KEY_REQUEST = "gkeyreq"
#: key requests remembered (one per group, sender device and session)
KEY_REQUESTS_KEPT = 256
#: key requests to one sending device per KEY_REQUEST_WINDOW seconds: a sender picks
#: a new session id for every message it likes, and 1,000 such messages made a
#: member's SDK send 981 requests (probe5); a real loss needs one per session
KEY_REQUESTS_PER_DEVICE = 8
KEY_REQUEST_WINDOW = 600.0


@dataclass(frozen=True, slots=True)
class GroupInfo:
    """What ``group_info`` answers: ``members`` are ``GroupMember``s (user, role, t)."""

    group: str
    subject: str
    description: str | None
    creator: str | None
    t: int | None
    announce: bool
    approval: bool
    members: tuple[GroupMember, ...]

    @property
    def admins(self) -> tuple[str, ...]:
        return tuple(m.user for m in self.members if m.role == "admin")

    @property
    def users(self) -> tuple[str, ...]:
        return tuple(m.user for m in self.members)

    @classmethod
    def from_result(cls, r: GroupResult) -> GroupInfo:
        t = r.get("t")
        return cls(r.group, r.get("subject", ""), r.description, r.get("creator"),
                   None if t is None else int(t), r.get("announce") == "1",
                   r.get("approval") == "1", tuple(r.members))  # fmt: skip


class GroupsAPI:
    """The group methods of ``ClientAPI`` (which supplies ``_request``, ``new_id``...)."""

    #: group -> its member users, from the last ``group_info``; dropped on a notice
    _group_members: dict | None = None
    #: group -> when (time.monotonic) its member list was read
    _group_members_at: dict | None = None
    #: seconds a cached member list is used for sending before it is read again: a
    #: removal whose notice this device never got (its queue past the strangers'
    #: share) ends the old Megolm session within this long, even without a login
    GROUP_MEMBERS_TTL: float = 300.0

    async def _group(self, op: str, timeout: float, **fields) -> GroupResult:
        from ._core import REQ

        rid = self.new_id()
        return await self._request(REQ, rid, GroupRequest(rid, op, **fields), timeout)

    # -- life ---------------------------------------------------------------------

    async def group_create(self, subject: str, members=(), timeout: float = 30.0) -> GroupResult:
        """A new group with this user as its admin; ``.group`` is its address and
        ``.failed`` the (user, code) of members that could not be added (433: their
        "who can add me" setting; invite them instead).  A subject of more than 100
        characters is refused here (LocalProtocolError); one within that but past the
        server's group-subject-max gets ServerError 200."""
        return await self._group("create", timeout, subject=subject, members=tuple(members))

    async def group_info(self, group: str, timeout: float = 30.0) -> GroupInfo:
        """Subject, description, creator, settings and members (members only: 430)."""
        info = GroupInfo.from_result(await self._group("info", timeout, group=group))
        self._members_cache()[group] = info.users
        if self._group_members_at is None:
            self._group_members_at = {}
        self._group_members_at[group] = time.monotonic()
        return info

    async def groups(self, timeout: float = 30.0) -> tuple[tuple[str, str, int], ...]:
        """This user's groups: (group, subject, t) each."""
        return (await self._group("list", timeout)).items

    async def group_add(self, group: str, users, timeout: float = 30.0) -> GroupResult:
        return await self._members_op("add", group, users, timeout)

    async def group_remove(self, group: str, users, timeout: float = 30.0) -> GroupResult:
        return await self._members_op("remove", group, users, timeout)

    async def group_promote(self, group: str, users, timeout: float = 30.0) -> GroupResult:
        return await self._members_op("promote", group, users, timeout)

    async def group_demote(self, group: str, users, timeout: float = 30.0) -> GroupResult:
        return await self._members_op("demote", group, users, timeout)

    async def _members_op(self, op, group, users, timeout) -> GroupResult:
        users = (users,) if isinstance(users, str) else tuple(users)
        try:
            return await self._group(op, timeout, group=group, members=users)
        finally:
            self._group_changed(group, shrink=op == "remove")

    async def group_leave(self, group: str, timeout: float = 30.0) -> GroupResult:
        """Leave ``group``; its sessions are forgotten on this device."""
        r = await self._group("leave", timeout, group=group)
        self._members_cache().pop(group, None)
        if self.secure is not None:
            self.secure.groups.forget_group(group)
            self.secure.save()
        return r

    async def group_subject(self, group: str, subject: str, timeout: float = 30.0):
        """Change the subject (admins only: 431); as ``group_create``, 200 past the
        server's group-subject-max."""
        return await self._group("subject", timeout, group=group, subject=subject)

    async def group_description(self, group: str, text: str, timeout: float = 30.0):
        """Change the description (admins only: 431): at most 512 bytes of UTF-8 here
        (LocalProtocolError past it), ServerError 200 past the server's
        group-description-max."""
        return await self._group("description", timeout, group=group, description=text)

    async def group_settings(self, group: str, announce: bool | None = None,
                             approval: bool | None = None, timeout: float = 30.0):  # fmt: skip
        """Announcement mode (only admins send) and admin approval of joins."""
        return await self._group("settings", timeout, group=group, announce=announce,
                                 approval=approval)  # fmt: skip

    # -- invites --------------------------------------------------------------------

    async def group_invite(self, group: str, timeout: float = 30.0) -> str:
        """The group's invite code (made if there is none; admins only)."""
        return (await self._group("invite", timeout, group=group)).get("code")

    async def group_revoke(self, group: str, timeout: float = 30.0) -> str:
        """A new invite code; the old one stops working at once."""
        return (await self._group("revoke", timeout, group=group)).get("code")

    async def group_preview(self, code: str, timeout: float = 30.0) -> GroupResult:
        """What an invite code leads to: ``get("subject")``, ``get("count")`` members."""
        return await self._group("preview", timeout, code=code)

    async def group_join(self, code: str, timeout: float = 30.0) -> GroupResult:
        """Join by invite code: ``.group``; ``get("requested") == "1"`` when the group
        needs an admin's approval first."""
        return await self._group("join", timeout, code=code)

    async def group_requests(self, group: str, timeout: float = 30.0) -> tuple[str, ...]:
        """The users waiting for an admin's approval."""
        return tuple(m.user for m in (await self._group("requests", timeout, group=group)).members)

    async def group_approve(self, group: str, users, timeout: float = 30.0) -> GroupResult:
        return await self._members_op("approve", group, users, timeout)

    async def group_reject(self, group: str, users, timeout: float = 30.0) -> GroupResult:
        return await self._members_op("reject", group, users, timeout)

    # -- caches and notices -------------------------------------------------------------

    def _members_cache(self) -> dict:
        if self._group_members is None:
            self._group_members = {}
        return self._group_members

    def _group_changed(self, group: str, shrink: bool) -> None:
        self._members_cache().pop(group, None)
        if shrink and self.secure is not None:
            self.secure.groups.rotate(group)

    def _group_notice(self, ev: GroupNotice) -> None:
        """Before the application sees a notice: what the SDK keeps about the group."""
        me = None if self._creds is None else self._creds.user
        self._group_changed(ev.group, shrink=ev.op in _SHRINK)
        if me is not None and ev.op in _SHRINK and me in ev.members and self.secure is not None:
            self.secure.groups.forget_group(ev.group)  # this user is out
            self.secure.save()

    async def group_members(self, group: str, fresh: bool = False) -> tuple[str, ...]:
        """The member users of ``group`` (cached; a notice about it drops the cache)."""
        cached = None if fresh else self._members_cache().get(group)
        if cached is not None:
            at = (self._group_members_at or {}).get(group)
            if at is not None and time.monotonic() - at <= self.GROUP_MEMBERS_TTL:
                return cached
        return (await self.group_info(group)).users

    # -- encrypted messages ----------------------------------------------------------------

    async def _group_devices(self, group: str, fresh: bool) -> list[str]:
        """Every device a message to ``group`` goes to: the members' and this account's
        other devices (each checked through its primary's link signature)."""
        me = self._creds.user
        users = list(dict.fromkeys((*await self.group_members(group, fresh), me)))
        lists = await self.devices_of(users, fresh=fresh)  # batched: not one user at a time
        devices = []
        for user in users:
            devices += [d for d in self._trust(user, lists[user]) if d != self.device]
        return devices

    def _key_chunks(self, need) -> list[list[str]]:
        """``need`` (devices) in groups of whole users, each at most ``_keys_chunk``
        users and KEYS_QUERY_BUNDLES devices: one key-bundle request each (a fetch
        takes a key of every device of a user, so a user is never split)."""
        by_user: dict[str, list[str]] = {}
        for d in need:
            by_user.setdefault(d.partition(":")[0], []).append(d)
        chunks, cur, users = [], [], 0
        for devs in by_user.values():
            if cur and (users >= self._keys_chunk or len(cur) + len(devs) > KEYS_QUERY_BUNDLES):
                chunks.append(cur)
                cur, users = [], 0
            cur += devs
            users += 1
        if cur:
            chunks.append(cur)
        return chunks

    async def _send_group_secure(self, group, body: bytes, type: str, mid, timeout):
        from ._core import StaleDevices
        from .secure import GROUP_E2E_TYPE

        mid = mid or self.new_id()
        for attempt in range(3):
            devices = await self._group_devices(group, fresh=attempt > 0)
            need = self.secure.groups.needs_key(group, devices)
            olm = self.secure.device
            for chunk in self._key_chunks(need):
                try:
                    await self._open_sessions(chunk)
                except e2e.NoSession as exc:
                    # a device that published no keys cannot get the key: the others
                    # still can (it sees GroupDecryptionFailed; the next message tries again)
                    logger.info("pigeon client: %s: %s", group, exc)
            keyless = {d for d in need if not olm.has_session(d)}
            devices = [d for d in devices if d not in keyless]
            sealed = self.secure.seal_group(group, devices, type, body)
            try:
                ack = await self._send_raw(group, (sealed.body, sealed.payloads),
                                           GROUP_E2E_TYPE, mid, timeout)  # fmt: skip
            except StaleDevices:
                if attempt == 2:
                    raise
                continue
            self.secure.commit_group(sealed, ack.failed)  # full queues: shared again next time
            return ack
        raise AssertionError("unreachable")

    def _stale_members(self, group: str, device: str) -> None:
        """``device`` wrote to ``group`` (a message, a key request): if its user is not in
        the cached member list, that list is old (a notice this device never got), so
        the next send asks ``info`` again."""
        cached = self._members_cache().get(group)
        if cached is not None and device.partition(":")[0] not in cached:
            self._group_changed(group, shrink=False)

    def _deliver_group(self, ev) -> None:
        self._stale_members(ev.group, ev.sender)
        # the key share this device was named for, if any, rides in the same delivery
        out = self.secure.decrypt_group(ev, getattr(ev, "payload", None))
        if type(out) is GroupDecryptionFailed and out.unknown_session:
            self._ask_group_key(out, ev.body)
        self._push(out)

    # -- recovery: a device that lost a group key asks the sender for it again ---------

    _key_requests: dict | None = None
    #: sender device -> when (time.monotonic) its last key requests went
    _key_request_times: dict | None = None
    #: ids of this device's own key requests (their receipts are not the application's)
    _key_request_ids: dict | None = None

    def _ask_group_key(self, failed, body: bytes) -> None:
        """No key for the session of a message from ``failed.sender``: ask that device,
        in a 1:1 plaintext ``gkeyreq`` message, to share its key again with the next message
        (the failed message itself stays unread).  Once per (group, device, session)."""
        sid = session_of(body)
        if sid is None:
            return
        asked = self._key_requests
        if asked is None:
            asked = self._key_requests = {}
        key = (failed.group, failed.sender, sid)
        if key in asked:
            return
        now = time.monotonic()
        recent = self._key_request_times
        if recent is None:
            recent = self._key_request_times = {}
        times = [t for t in recent.get(failed.sender, ()) if now - t < KEY_REQUEST_WINDOW]
        if len(times) >= KEY_REQUESTS_PER_DEVICE:
            return  # (not remembered: asked again once the window has room)
        times.append(now)
        recent[failed.sender] = times
        while len(recent) > KEY_REQUESTS_KEPT:
            del recent[next(iter(recent))]
        asked[key] = None
        while len(asked) > KEY_REQUESTS_KEPT:
            del asked[next(iter(asked))]
        request = msgpack.packb([failed.group, sid], use_bin_type=True)
        self._spawn(self._send_key_request(failed.sender, request))

    async def _send_key_request(self, device: str, request: bytes) -> None:
        from ._core import ConnectionLost, ServerError

        try:
            # in plaintext: it holds the group and a session id, which every body of
            # the group shows the server anyway; so the server sees its type and does
            # not take it as this user writing to the sender (a stranger in a group
            # got "known", past the strangers' limits, by one message under a new
            # session: docs/PROTOCOL.md 10f)
            mid = self.new_id()
            ids = self._key_request_ids
            if ids is None:
                ids = self._key_request_ids = {}
            ids[mid] = None  # (its receipts are the SDK's, not the application's)
            while len(ids) > KEY_REQUESTS_KEPT:
                del ids[next(iter(ids))]
            await self._send_raw(device.partition(":")[0], request, GROUP_KEY_REQUEST, mid, 30.0)
        except (ServerError, ConnectionLost, e2e.E2EError) as exc:
            logger.info("pigeon client: no group key request to %s: %s", device, exc)

    def _group_key_request(self, msg) -> None:
        """A device asks for this device's key of a group again: the next message to
        the group carries a share for it (if it is still a recipient then: the
        member list decides, not the request)."""
        try:
            group, sid = msgpack.unpackb(msg.body, raw=False)
        except (ValueError, TypeError, msgpack.UnpackException):  # (anyone may send one)
            return
        if isinstance(group, str) and isinstance(sid, str):
            self._stale_members(group, msg.sender)
            if self.secure.groups.reshare(group, sid, msg.sender):
                self.secure.save()
