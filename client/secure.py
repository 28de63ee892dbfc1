"""The SDK's encrypted-messaging state, between the wire and client/e2e.py.

``SecureState`` is what one device's client keeps for end-to-end
encryption, with no I/O of its own beyond its profile file: the
``OlmDevice`` (account and sessions), the identity keys it has seen for
each peer device and primary (to notice a change: ``SafetyNumberChanged``), and
the recent messages it sent (to resend one a peer could not decrypt).
``ClientAPI`` (client/_core.py) drives it: it fetches keys, sends and
receives, and hands the application the events defined here.

**Envelope.** The plaintext inside every Olm message is a msgpack array
``[type, body]`` or ``[type, body, resend_of]``: the application's message
type (``text``, ``media``...), its body, and for a resend the id of the
message it replaces (so a device that had decrypted the original drops the
copy).  The outer ``type`` of the ``message`` node is ``pkmsg`` when any
device's payload is an Olm pre-key message, else ``msg``: the server sees
no more than that.

**Profile.** ``SecureState(profile)`` keeps its state in the file
``profile`` (JSON, mode 0600, replaced atomically after every change), the
vodozemac pickles inside it encrypted with the pickle key of
``<profile>.key`` (``e2e.ProfileKeys``).  With no profile the state lives
in memory and ends with the process.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass

import msgpack

from . import e2e
from .group_crypto import GroupCrypto, Sealed, UnknownSession

__all__ = [
    "DecryptedMessage",
    "DecryptionFailed",
    "GroupDecryptionFailed",
    "GroupMessage",
    "SafetyNumberChanged",
    "SecureState",
]

#: outer message types of an encrypted message (PROTOCOL.md)
E2E_TYPES = frozenset({"pkmsg", "msg"})
#: the outer type of an encrypted group message (Megolm: client/group_crypto.py)
GROUP_E2E_TYPE = "skmsg"
#: messages kept for a resend on a peer's retry receipt, and resend ids remembered
SENT_KEPT = 256
SEEN_KEPT = 1024


@dataclass(frozen=True, slots=True)
class DecryptedMessage:
    """A message this device decrypted: ``type`` and ``body`` are the application's.

    ``sender``, ``id``, ``t``, ``seq``, ``to`` as on ``IncomingMessage``; ack ``seq``
    as usual.  ``resend_of``: the id of the message this one replaces (the sender
    resent it because this device could not decrypt it), else None."""

    sender: str
    id: str
    type: str
    t: int
    seq: int
    body: bytes
    to: str | None = None
    resend_of: str | None = None


@dataclass(frozen=True, slots=True)
class DecryptionFailed:
    """A message this device could not decrypt (corrupted, or its session is lost).

    The SDK has asked the sender's device to open a new session and resend (``receipt type="retry"``): the resend arrives as a new message
    (``DecryptedMessage.resend_of`` == ``id``).  Ack ``seq`` as usual."""

    sender: str
    id: str
    t: int
    seq: int
    reason: str
    to: str | None = None


@dataclass(frozen=True, slots=True)
class GroupMessage:
    """A message to ``group`` this device decrypted (Megolm), from member device
    ``sender``; ``type`` and ``body`` are the application's.  On a sent-sync copy
    (``sender`` another device of this account) it is what that device sent.
    ``id``, ``t``, ``seq`` as on ``IncomingMessage``; ack ``seq`` as usual."""

    group: str
    sender: str
    id: str
    type: str
    t: int
    seq: int
    body: bytes


@dataclass(frozen=True, slots=True)
class GroupDecryptionFailed:
    """A message to ``group`` from ``sender`` this device could not decrypt:
    ``unknown_session`` when the sender's key was never shared with this device
    (it was not a member then, or was removed), else corrupted or replayed.
    Ack ``seq`` as usual."""

    group: str
    sender: str
    id: str
    t: int
    seq: int
    reason: str
    unknown_session: bool = False


@dataclass(frozen=True, slots=True)
class SafetyNumberChanged:
    """``user``'s identity keys changed (re-registration, or a new or replaced device):
    the safety number may have changed; compare it again (``safety_number``)."""

    user: str
    devices: tuple[str, ...]
    primary_changed: bool


class SecureState:
    __slots__ = ("_key", "_profile", "device", "primaries", "device_keys", "sent", "seen",
                 "published", "groups")  # fmt: skip

    def __init__(self, profile: str | os.PathLike | None = None):
        self._profile = None if profile is None else os.fspath(profile)
        self._key = None if profile is None else e2e.ProfileKeys(profile).load_or_create()
        #: user -> the Ed25519 key of their primary as last seen
        self.primaries: dict[str, bytes] = {}
        #: peer device -> its Ed25519 identity key as last seen in a device list
        self.device_keys: dict[str, bytes] = {}
        #: message id -> (to, type, body): recent sends, for a retry receipt
        self.sent: OrderedDict[str, tuple[str, str, bytes]] = OrderedDict()
        #: ids of originals a resend replaced (or that were decrypted), to drop copies
        self.seen: OrderedDict[str, None] = OrderedDict()
        self.device = e2e.OlmDevice()
        #: the Megolm sessions of the groups this device is in (client/group_crypto.py)
        self.groups = GroupCrypto(self.device)
        #: the identity and fallback keys were uploaded
        self.published = False
        if self._profile is not None:
            if os.path.exists(self._profile):
                self._load()
            else:
                self.save()  # the account's keys exist from now on: registration uses them

    # -- profile -------------------------------------------------------------------

    def _load(self) -> None:
        with open(self._profile, "rb") as f:
            data = json.loads(f.read())
        self.device = e2e.OlmDevice.load(data["olm"], self._key)
        self.groups = GroupCrypto(self.device)
        if "groups" in data:
            self.groups.load(data["groups"], self._key)
        self.primaries = {u: bytes.fromhex(k) for u, k in data.get("primaries", {}).items()}
        self.device_keys = {d: bytes.fromhex(k) for d, k in data.get("devices", {}).items()}
        self.published = bool(data.get("published"))

    def save(self) -> None:
        """Write the state (after every change: a ratchet step lost is a message lost)."""
        if self._profile is None:
            return
        data = {
            "olm": self.device.dump(self._key),
            "primaries": {u: k.hex() for u, k in self.primaries.items()},
            "devices": {d: k.hex() for d, k in self.device_keys.items()},
            "published": self.published,
            "groups": self.groups.dump(self._key),
        }
        tmp = f"{self._profile}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, json.dumps(data).encode())
        finally:
            os.close(fd)
        os.replace(tmp, self._profile)

    # -- device lists and keys ---------------------------------------------------

    def note_devices(self, user: str, items) -> tuple[tuple[str, ...], SafetyNumberChanged | None]:
        """A device list of ``user``: the devices to encrypt for (companions whose link
        signature verifies), and a ``SafetyNumberChanged`` if a key differs from the one seen
        before (the sessions with such devices are dropped)."""
        trusted = e2e.check_device_list(user, items)
        changed = []
        primary_changed = False
        if trusted.primary_key:
            old = self.primaries.get(user)
            if old is not None and old != trusted.primary_key:
                primary_changed = True
            self.primaries[user] = trusted.primary_key
        for d in items:
            if d.device not in trusted.devices:
                continue
            old = self.device_keys.get(d.device)
            if old is not None and old != bytes(d.key):
                changed.append(d.device)
                self.device.forget(d.device, identity=True)
            self.device_keys[d.device] = bytes(d.key)
        if changed or primary_changed:
            self.save()
            return trusted.devices, SafetyNumberChanged(user, tuple(changed), primary_changed)
        return trusted.devices, None

    # -- sending -------------------------------------------------------------------

    def seal(self, type: str, body: bytes, resend_of: str | None = None) -> bytes:
        item = [type, bytes(body)] if resend_of is None else [type, bytes(body), resend_of]
        return msgpack.packb(item, use_bin_type=True)

    def encrypt(self, devices, plaintext: bytes) -> tuple[str, dict[str, bytes]]:
        """(outer type, {device: payload}) for ``devices`` (each must have a session)."""
        payloads = {d: self.device.encrypt(d, plaintext) for d in devices}
        pre = any(p[0] == e2e.PRE_KEY for p in payloads.values())
        self.save()
        return ("pkmsg" if pre else "msg"), payloads

    def seal_group(self, group: str, devices, type: str, body: bytes) -> Sealed:
        """One group message for ``devices`` (client/group_crypto.py): the Megolm body,
        key shares for the devices that lack the key; ``commit_group`` after the ack."""
        sealed = self.groups.seal(group, devices, self.seal(type, body))
        self.save()  # the ratchet advanced (and the Olm sessions of the shares)
        return sealed

    def commit_group(self, sealed: Sealed, failed_users=()) -> None:
        self.groups.commit(sealed, failed_users)
        self.save()

    def remember_sent(self, mid: str, to: str, type: str, body: bytes) -> None:
        self.sent[mid] = (to, type, bytes(body))
        while len(self.sent) > SENT_KEPT:
            self.sent.popitem(last=False)

    # -- receiving -------------------------------------------------------------------

    def decrypt(self, ev) -> DecryptedMessage | DecryptionFailed | None:
        """An ``IncomingMessage`` of type pkmsg/msg as the application's event; None
        for a resend of something already decrypted (ack its ``seq`` and drop it)."""
        try:
            plain = self.device.decrypt(ev.sender, ev.body)
            item = msgpack.unpackb(plain, raw=False)
            if not (isinstance(item, list) and 2 <= len(item) <= 3
                    and isinstance(item[0], str) and isinstance(item[1], bytes)):  # fmt: skip
                raise e2e.DecryptError("not a pigeon envelope")
        except (e2e.E2EError, ValueError, msgpack.UnpackException) as err:
            # The sessions stay: a failed decryption does not advance them (a corrupted
            # message leaves a good session good); the sender answers the retry receipt
            # with a new session, which is kept beside them, newest first.
            return DecryptionFailed(ev.sender, ev.id, ev.t, ev.seq, str(err), ev.to)
        self.save()
        resend_of = item[2] if len(item) == 3 and isinstance(item[2], str) else None
        if resend_of is not None:
            if resend_of in self.seen:
                return None
            self._seen(resend_of)
        self._seen(ev.id)
        return DecryptedMessage(ev.sender, ev.id, item[0], ev.t, ev.seq, item[1], ev.to, resend_of)

    def _seen(self, mid: str) -> None:
        self.seen[mid] = None
        while len(self.seen) > SEEN_KEPT:
            self.seen.popitem(last=False)

    def decrypt_group(self, ev, payload: bytes | None) -> GroupMessage | GroupDecryptionFailed:
        """A group ``IncomingMessage`` of type skmsg (``payload``: this device's key
        share from the same message, if any) as the application's event."""
        group, sender = ev.group, ev.sender
        try:
            if payload is not None:
                self.groups.receive_key(group, sender, payload)
            plain = self.groups.decrypt(group, sender, ev.body, ev.id)
            item = msgpack.unpackb(plain, raw=False)
            if not (isinstance(item, list) and 2 <= len(item) <= 3
                    and isinstance(item[0], str) and isinstance(item[1], bytes)):  # fmt: skip
                raise e2e.DecryptError("not a pigeon envelope")
        except (e2e.E2EError, ValueError, msgpack.UnpackException) as err:
            if payload is not None:
                self.save()  # a share may have been kept (the Olm session advanced)
            return GroupDecryptionFailed(group, sender, ev.id, ev.t, ev.seq, str(err),
                                         isinstance(err, UnknownSession))  # fmt: skip
        self.save()
        return GroupMessage(group, sender, ev.id, item[0], ev.t, ev.seq, item[1])
