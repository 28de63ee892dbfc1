"""Group end-to-end encryption for the SDK: Megolm sender keys (vodozemac), shared over Olm.

Theory of operation.  Each device that sends to a group owns one outbound
Megolm ``GroupSession`` for that group (its *sender key*): one encryption
per message whatever the number of members, so a group message is one
ciphertext the server stores once.  Every member device (and every other
device of the sender's own account, which get the sent-sync copy) needs the
session's key once, at the ratchet index it starts reading from: the key
travels as a per-device payload, encrypted over the pairwise Olm session of
client/e2e.py, in the same ``message`` node as the first body it opens.  A
receiving device keeps one ``InboundGroupSession`` per (group, sender
device, session id); the sender device is the one the Olm payload came from
(Olm authenticates it), and a body names its session: a member cannot pass
a message off as another member's, since only the holder of the outbound
session can sign under its session id (vodozemac checks the Ed25519
signature of every Megolm message).

**Rotation.**  The sender starts a new outbound session, and shares it with
every recipient device again, when a device it had shared the current one
with is no longer a recipient (a member removed or gone, a device unlinked:
the removed device keeps the old key but never sees the new one), after
``rotate_messages`` messages and after ``rotate_seconds`` (Matrix's defaults:
100 messages, one week).  A device that joins gets the current key at the
current index: it reads from there on, not the history.  ``rotate(group)``
forces one (the SDK calls it on a membership notice).

**Framing.**  A group body (the ``body`` the server stores once) is one byte
``0x01`` (this format), the session id (the 32 raw bytes of its Ed25519
key), then vodozemac's Megolm message bytes.  A key share is an Olm payload
(client/e2e.py framing) whose plaintext is the msgpack array
``["gkey", group, session_key]`` (the key as vodozemac's ``SessionKey``,
raw bytes).  The plaintext inside a Megolm message is the application's
(the SDK uses the envelope of client/secure.py).

**Replays.**  Megolm itself decrypts a message as often as it is given; a
device remembers, per inbound session, the message index of what it
decrypted and under which message id, and refuses the same index under
another id (a server replaying a message as a new one).  The memory is
bounded: ``SEEN_INDEXES`` per session, the newest kept.

All cryptography is vodozemac's; nothing here is a primitive of its own.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field

import msgpack
import vodozemac

from . import e2e

__all__ = [
    "BODY_VERSION",
    "GroupCrypto",
    "GroupDecryptError",
    "UnknownSession",
]

BODY_VERSION = 1
SESSION_ID_BYTES = 32
#: Matrix's rotation defaults (m.room.encryption: rotation_period_msgs / _ms)
ROTATE_MESSAGES = 100
ROTATE_SECONDS = 7 * 86400
#: inbound sessions kept per (group, sender device), newest first: messages under
#: way in an older session still decrypt after a rotation
INBOUND_KEPT = 8
#: message indexes remembered per inbound session (replay check)
SEEN_INDEXES = 1024
KEY_SHARE = "gkey"


class GroupDecryptError(e2e.DecryptError):
    """A group body or key share that does not decrypt (corrupted, replayed, not ours)."""


class UnknownSession(GroupDecryptError):
    """A group body under a session whose key this device was not given (not shared
    with it: it was not a member then, or was removed before the rotation)."""


def session_of(body: bytes) -> str | None:
    """The session id a group body names (None if it is not one)."""
    body = bytes(body)
    if len(body) <= 1 + SESSION_ID_BYTES or body[0] != BODY_VERSION:
        return None
    return _b64e(body[1 : 1 + SESSION_ID_BYTES])


def _b64d(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def _b64e(raw: bytes) -> str:
    return base64.b64encode(raw).rstrip(b"=").decode()


@dataclass(slots=True)
class _Outbound:
    session: vodozemac.GroupSession
    created: float
    #: devices that hold this session's key (acknowledged by the server)
    shared: set = field(default_factory=set)


@dataclass(slots=True)
class _Inbound:
    session: vodozemac.InboundGroupSession
    #: message index -> message id, for the replay check (insertion ordered)
    seen: dict = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Sealed:
    """One group message ready to send: the ``body`` (every recipient's), the key
    shares (``payloads``: {device: Olm payload}, only for devices that lack the
    current key), and what to ``commit`` once the server has acked it; ``rotated``:
    the first message of a new session."""

    group: str
    session_id: str
    body: bytes
    payloads: dict
    rotated: bool


class GroupCrypto:
    """This device's Megolm sessions: one outbound per group, inbound per sender device.

    No I/O: the SDK gives it the recipient devices (having opened an Olm session
    with each one ``needs_key`` names) and moves the bytes."""

    __slots__ = ("olm", "outbound", "inbound", "rotate_messages", "rotate_seconds", "clock",
                 "_stale")  # fmt: skip

    def __init__(self, olm: e2e.OlmDevice, *, rotate_messages: int = ROTATE_MESSAGES,
                 rotate_seconds: float = ROTATE_SECONDS, clock=time.time):  # fmt: skip
        if rotate_messages < 1 or rotate_seconds <= 0:
            raise ValueError("rotate_messages must be >= 1 and rotate_seconds > 0")
        self.olm = olm
        self.rotate_messages = rotate_messages
        self.rotate_seconds = rotate_seconds
        self.clock = clock
        #: group -> the outbound session this device sends with
        self.outbound: dict[str, _Outbound] = {}
        #: (group, sender device) -> {session id: _Inbound}, newest last
        self.inbound: dict[tuple[str, str], dict[str, _Inbound]] = {}
        #: groups whose outbound session must not be used again (``rotate``)
        self._stale: set[str] = set()

    # -- sending -------------------------------------------------------------------

    def rotate(self, group: str) -> None:
        """The next message to ``group`` starts a new session (a membership change)."""
        if group in self.outbound:
            self._stale.add(group)

    def _current(self, group: str, devices: frozenset) -> tuple[_Outbound, bool]:
        out = self.outbound.get(group)
        if (
            out is None
            or group in self._stale
            or out.session.message_index >= self.rotate_messages
            or self.clock() - out.created >= self.rotate_seconds
            or not out.shared <= devices  # someone who had the key is no longer a recipient
        ):
            out = _Outbound(vodozemac.GroupSession(), self.clock())
            self.outbound[group] = out
            self._stale.discard(group)
            return out, True
        return out, False

    def needs_key(self, group: str, devices) -> list[str]:
        """The devices of ``devices`` that the next message to ``group`` must carry a key
        share for (all of them after a rotation): open an Olm session with each first.
        Applies a due rotation."""
        devices = frozenset(devices)
        out, _ = self._current(group, devices)
        return sorted(devices - out.shared)

    def seal(self, group: str, devices, plaintext: bytes) -> Sealed:
        """Encrypt ``plaintext`` for ``devices`` (every recipient device: the members'
        and this account's other devices, not this one), with key shares for those
        that lack the key.  Raises e2e.NoSession for a device with no Olm session."""
        devices = frozenset(devices)
        out, _ = self._current(group, devices)
        rotated = out.session.message_index == 0  # the first message of a new session
        need = sorted(devices - out.shared)
        payloads = {}
        if need:
            # the key at the current index, before this message advances the ratchet:
            # a new device reads from this message on
            share = msgpack.packb(
                [KEY_SHARE, group, _b64d(out.session.session_key.to_base64())],
                use_bin_type=True,
            )
            for d in need:
                payloads[d] = self.olm.encrypt(d, share)
        sid = out.session.session_id
        msg = out.session.encrypt(bytes(plaintext))
        body = bytes([BODY_VERSION]) + _b64d(sid) + msg.to_bytes()
        return Sealed(group, sid, body, payloads, rotated)

    def commit(self, sealed: Sealed, failed_users=()) -> None:
        """The server stored ``sealed``: its key shares reached their devices' queues,
        but for the devices of ``failed_users`` (the ack's full queues), which get
        a share again with the next message."""
        out = self.outbound.get(sealed.group)
        if out is not None and out.session.session_id == sealed.session_id:
            failed = frozenset(failed_users)
            out.shared.update(d for d in sealed.payloads if d.partition(":")[0] not in failed)

    def reshare(self, group: str, session_id: str, device: str) -> bool:
        """``device`` lost the key of this device's session ``session_id`` for
        ``group``: the next message carries a share for it again (if it is a
        recipient then).  False if that is not the current session."""
        out = self.outbound.get(group)
        if out is None or out.session.session_id != session_id or device not in out.shared:
            return False
        out.shared.discard(device)
        return True

    # -- receiving -------------------------------------------------------------------

    def receive_key(self, group: str, sender: str, payload: bytes) -> str:
        """A key share from device ``sender`` (Olm-decrypted here): keep its inbound
        session for ``group``; returns the session id.  A second share of a session
        known from an earlier index is ignored."""
        plain = self.olm.decrypt(sender, payload)
        try:
            item = msgpack.unpackb(plain, raw=False)
            ok = (isinstance(item, list) and len(item) == 3 and item[0] == KEY_SHARE
                  and isinstance(item[2], bytes))  # fmt: skip
            if not ok:
                raise GroupDecryptError(f"{sender}: not a group key share")
            if item[1] != group:
                raise GroupDecryptError(f"{sender}: a key share for {item[1]!r}, not {group}")
            session = vodozemac.InboundGroupSession(vodozemac.SessionKey(_b64e(item[2])))
        except (ValueError, msgpack.UnpackException) as err:
            if isinstance(err, GroupDecryptError):
                raise
            raise GroupDecryptError(f"{sender}: bad group key share: {err}") from None
        sessions = self.inbound.setdefault((group, sender), {})
        sid = session.session_id
        have = sessions.get(sid)
        if have is None or session.first_known_index < have.session.first_known_index:
            seen = {} if have is None else have.seen
            sessions.pop(sid, None)
            sessions[sid] = _Inbound(session, seen)
            while len(sessions) > INBOUND_KEPT:
                del sessions[next(iter(sessions))]
        return sid

    def decrypt(self, group: str, sender: str, body: bytes, mid: str | None = None) -> bytes:
        """The plaintext of a group ``body`` from device ``sender``; UnknownSession
        if this device has no key for its session, GroupDecryptError otherwise.
        ``mid``: the message id, for the replay check."""
        body = bytes(body)
        if len(body) <= 1 + SESSION_ID_BYTES or body[0] != BODY_VERSION:
            raise GroupDecryptError(f"{sender}: not a group message body")
        sid = _b64e(body[1 : 1 + SESSION_ID_BYTES])
        inbound = self.inbound.get((group, sender), {}).get(sid)
        if inbound is None:
            raise UnknownSession(f"{sender}: no key for its session {sid[:8]}... in {group}")
        try:
            msg = vodozemac.MegolmMessage.from_bytes(body[1 + SESSION_ID_BYTES :])
            index = msg.message_index()
            first = inbound.seen.get(index)
            if first is not None and first != mid:
                raise GroupDecryptError(f"{sender}: message index {index} replayed as {mid}")
            plain = inbound.session.decrypt(msg).plaintext
        except ValueError as err:  # DecodeException, MegolmDecryptionException
            if isinstance(err, GroupDecryptError):
                raise
            raise GroupDecryptError(f"{sender}: {err}") from None
        inbound.seen[index] = mid
        if len(inbound.seen) > SEEN_INDEXES:
            del inbound.seen[next(iter(inbound.seen))]
        return plain

    def forget_group(self, group: str) -> None:
        """Drop every session of ``group`` (this device left it, or it was deleted)."""
        self.outbound.pop(group, None)
        self._stale.discard(group)
        for key in [k for k in self.inbound if k[0] == group]:
            del self.inbound[key]

    # -- saved state ----------------------------------------------------------------------

    def dump(self, pickle_key: bytes) -> dict:
        """JSON-able state, every key inside vodozemac's encrypted pickles."""
        key = e2e._pickle_key(pickle_key)
        out = {}
        for g, o in self.outbound.items():
            out[g] = [o.session.pickle(key), o.created, sorted(o.shared), g in self._stale]
        inbound = []
        for (g, d), sessions in self.inbound.items():
            kept = [[i.session.pickle(key), list(i.seen.items())] for i in sessions.values()]
            inbound.append([g, d, kept])
        return {"out": out, "in": inbound}

    def load(self, data: dict, pickle_key: bytes) -> None:
        """Replace the state with ``dump``'s (the same pickle key)."""
        key = e2e._pickle_key(pickle_key)
        try:
            outbound, stale = {}, set()
            for g, (p, created, shared, is_stale) in data.get("out", {}).items():
                outbound[g] = _Outbound(vodozemac.GroupSession.from_pickle(p, key), created,
                                        set(shared))  # fmt: skip
                if is_stale:
                    stale.add(g)
            inbound = {}
            for g, d, lst in data.get("in", []):
                sessions = inbound[(g, d)] = {}
                for p, seen in lst:
                    s = vodozemac.InboundGroupSession.from_pickle(p, key)
                    sessions[s.session_id] = _Inbound(s, {n: m for n, m in seen})
        except (vodozemac.PickleException, ValueError, KeyError, TypeError) as err:
            raise e2e.E2EError(f"cannot read the saved group sessions: {err}") from None
        self.outbound, self.inbound, self._stale = outbound, inbound, stale

    def __repr__(self) -> str:  # never a secret
        return f"<GroupCrypto {len(self.outbound)} outbound, {len(self.inbound)} inbound>"
