"""End-to-end encryption for the SDK: Olm sessions (vodozemac), saved state, safety numbers.

Theory of operation.  Every device owns one vodozemac ``Account`` (its
Curve25519 and Ed25519 identity keys, its one-time keys and fallback key)
and one Olm ``Session`` per peer device it talks to (``OlmDevice``).  A
sender that has no session with a peer device opens one from that device's
Curve25519 identity key and one of its one-time keys (fetched from the
server's key directory); its first messages are Olm *pre-key* messages,
from which the peer opens the matching inbound session; once the peer has
answered, both sides send *normal* messages.  Nothing here touches the
network: the SDK (client/_core.py) fetches keys and moves payloads.

All cryptography is vodozemac's (the Matrix project's audited Olm
implementation) or ``cryptography``'s (SHA-512 for safety numbers, Ed25519
signature checks); nothing here is a primitive of its own.

**Payload framing** (the content of one per-device ``payload``): one byte,
the Olm message type as vodozemac numbers it (``0`` pre-key, ``1``
normal), then for a pre-key message the sender's 32-byte Curve25519
identity key (the receiver needs it to open the inbound session; vodozemac
refuses it if it is not the key inside the pre-key message), then the Olm
message bytes.  The plaintext inside is the application's: the SDK puts its
own small envelope there (client/_core.py).

**Saved state.** ``OlmDevice.dump(pickle_key)`` gives vodozemac's own
pickles (the account and every session, each encrypted by vodozemac with
the 32-byte pickle key); ``ProfileKeys`` keeps that key in a separate file
beside the profile (``<profile>.key``, 32 random bytes, mode 0600 whatever
the umask), so a copy of the profile alone reveals no key.

**Safety numbers** (``safety_number``, ``safety_qr``), per pair of users,
from the two primaries' Ed25519 identity keys, as Signal's
NumericFingerprintGenerator (version 0) derives them: for each user,
``h = SHA-512(0x0000 || key || user)``, then 5,200 times
``h = SHA-512(h || key)``; the first 30 bytes of ``h`` make 6 chunks of 5
bytes, each a big-endian number taken modulo 100,000 and written as 5
digits: 30 digits per user.  The number shown is the two halves, the
smaller first, so both users see the same 60 digits.  The QR payload
carries the first 32 bytes of both hashes in the same order.
"""

from __future__ import annotations

import base64
import hmac
import os
from dataclasses import dataclass

import vodozemac
from cryptography.hazmat.primitives import hashes

from pigeon.core.keys import verify_link

__all__ = [
    "NORMAL",
    "PRE_KEY",
    "DecryptError",
    "E2EError",
    "KeyMismatch",
    "NoSession",
    "OlmDevice",
    "ProfileKeys",
    "check_device_list",
    "safety_number",
    "safety_qr",
    "verify_signature",
    "verify_safety_qr",
]

PRE_KEY = 0
NORMAL = 1
#: sessions kept per peer device (newest first): a peer that restarted a
#: session may still have messages under way in the older one
MAX_SESSIONS = 4
FINGERPRINT_ITERATIONS = 5200
FINGERPRINT_VERSION = b"\x00\x00"
QR_PREFIX = "PGNV1"
KEY_BYTES = 32


class E2EError(Exception):
    """Something end-to-end encryption could not do."""


class NoSession(E2EError):
    """No Olm session with that device: fetch its keys and ``start_session`` first."""


class DecryptError(E2EError):
    """A payload that does not decrypt: corrupted, not for us, or from a lost session."""


class KeyMismatch(E2EError):
    """A device's identity key is not the one known for it."""


def _b64d(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def _b64e(raw: bytes) -> str:
    return base64.b64encode(raw).rstrip(b"=").decode()


class OlmDevice:
    """This device's Olm account and its sessions with peer devices (by address)."""

    __slots__ = ("account", "peer_keys", "sessions")

    def __init__(self, account: vodozemac.Account | None = None):
        self.account = account if account is not None else vodozemac.Account()
        #: peer device address -> [Session, ...], newest first
        self.sessions: dict[str, list] = {}
        #: peer device address -> its Curve25519 identity key (raw), as first seen
        self.peer_keys: dict[str, bytes] = {}

    # -- identity ---------------------------------------------------------

    @property
    def ed25519(self) -> bytes:
        """The raw 32-byte Ed25519 identity (signing) key: the key of ``verify`` and ``pair``."""
        return _b64d(self.account.ed25519_key.to_base64())

    @property
    def curve25519(self) -> bytes:
        """The raw 32-byte Curve25519 identity key."""
        return self.account.curve25519_key.to_bytes()

    @property
    def public(self) -> bytes:  # the Identity interface of client/identity.py
        return self.ed25519

    def sign(self, data: bytes) -> bytes:
        """A raw 64-byte Ed25519 signature by this device's identity key."""
        return _b64d(self.account.sign(bytes(data)).to_base64())

    def sign_link(self, user: str, companion_key: bytes) -> bytes:
        from pigeon.core.keys import link_payload

        return self.sign(link_payload(user, companion_key))

    # -- keys to publish ----------------------------------------------------

    @property
    def max_one_time_keys(self) -> int:
        return self.account.max_number_of_one_time_keys

    def new_one_time_keys(self, count: int) -> list[tuple[str, bytes]]:
        """Make up to ``count`` more one-time keys; every unpublished one as
        (key id, raw Curve25519 key), sorted by key id (vodozemac's ids sort
        in the order the keys were made).  Call ``mark_published`` once the
        server has them."""
        have = len(self.account.one_time_keys)
        count = max(0, min(count, self.max_one_time_keys - have))
        if count:
            self.account.generate_one_time_keys(count)
        return sorted((kid, k.to_bytes()) for kid, k in self.account.one_time_keys.items())

    def fallback_key(self) -> tuple[str, bytes]:
        """The unpublished fallback key (made if there is none) as (key id, raw key)."""
        fk = self.account.fallback_key
        if not fk:
            self.account.generate_fallback_key()
            fk = self.account.fallback_key
        ((kid, key),) = fk.items()
        return kid, key.to_bytes()

    def mark_published(self) -> None:
        self.account.mark_keys_as_published()

    # -- sessions -----------------------------------------------------------

    def has_session(self, device: str) -> bool:
        return bool(self.sessions.get(device))

    def start_session(self, device: str, identity_key: bytes, one_time_key: bytes) -> None:
        """Open an outbound session with ``device`` from its Curve25519 identity key
        and one of its one-time keys (or its fallback key); it becomes the one
        ``encrypt`` uses."""
        known = self.peer_keys.get(device)
        if known is not None and known != bytes(identity_key):
            raise KeyMismatch(f"{device}: identity key changed")
        try:
            session = self.account.create_outbound_session(
                vodozemac.Curve25519PublicKey.from_bytes(bytes(identity_key)),
                vodozemac.Curve25519PublicKey.from_bytes(bytes(one_time_key)),
            )
        except (vodozemac.KeyException, ValueError) as err:
            raise E2EError(f"{device}: not a usable key: {err}") from None
        self.peer_keys[device] = bytes(identity_key)
        self._keep(device, session)

    def forget(self, device: str, identity: bool = False) -> None:
        """Drop the sessions with ``device`` (a lost session: the next send opens a new
        one); with ``identity`` also the identity key known for it (re-registered)."""
        self.sessions.pop(device, None)
        if identity:
            self.peer_keys.pop(device, None)

    def _keep(self, device: str, session) -> None:
        lst = self.sessions.setdefault(device, [])
        lst.insert(0, session)
        del lst[MAX_SESSIONS:]

    def encrypt(self, device: str, plaintext: bytes) -> bytes:
        """One framed payload (module docstring) for ``device``."""
        lst = self.sessions.get(device)
        if not lst:
            raise NoSession(device)
        mtype, body = lst[0].encrypt(bytes(plaintext)).to_parts()
        if mtype == PRE_KEY:
            return b"\x00" + self.curve25519 + body
        return b"\x01" + body

    def decrypt(self, device: str, payload: bytes) -> bytes:
        """The plaintext of a framed payload from ``device``; DecryptError if it has none."""
        payload = bytes(payload)
        if not payload or payload[0] not in (PRE_KEY, NORMAL):
            raise DecryptError(f"{device}: not an Olm payload")
        if payload[0] == PRE_KEY:
            return self._decrypt_pre_key(device, payload)
        try:
            msg = vodozemac.AnyOlmMessage.from_parts(NORMAL, payload[1:])
        except ValueError as err:
            raise DecryptError(f"{device}: malformed Olm message: {err}") from None
        return self._try_sessions(device, msg)

    def _try_sessions(self, device: str, msg) -> bytes:
        lst = self.sessions.get(device) or []
        for i, session in enumerate(lst):
            try:
                plain = session.decrypt(msg)
            except ValueError:
                continue
            if i:
                lst.insert(0, lst.pop(i))
            return plain
        raise DecryptError(f"{device}: no session decrypts it" if lst else f"{device}: no session")

    def _decrypt_pre_key(self, device: str, payload: bytes) -> bytes:
        if len(payload) < 1 + KEY_BYTES + 1:
            raise DecryptError(f"{device}: truncated pre-key payload")
        sender_key = payload[1 : 1 + KEY_BYTES]
        try:
            any_msg = vodozemac.AnyOlmMessage.from_parts(PRE_KEY, payload[1 + KEY_BYTES :])
            pre = any_msg.to_pre_key()
        except ValueError as err:
            raise DecryptError(f"{device}: malformed pre-key message: {err}") from None
        for session in self.sessions.get(device) or []:
            if session.session_matches(pre):  # a pre-key message of a session we have
                return self._try_sessions(device, any_msg)
        known = self.peer_keys.get(device)
        if known is not None and known != sender_key:
            raise KeyMismatch(f"{device}: a pre-key message under another identity key")
        try:
            session, plain = self.account.create_inbound_session(
                vodozemac.Curve25519PublicKey.from_bytes(sender_key), pre
            )
        except ValueError as err:  # SessionCreationException, KeyException...
            raise DecryptError(f"{device}: cannot open a session: {err}") from None
        self.peer_keys[device] = sender_key
        self._keep(device, session)
        return plain

    # -- saved state ----------------------------------------------------------

    def dump(self, pickle_key: bytes) -> dict:
        """The state as JSON-able data, every secret inside vodozemac's encrypted pickles."""
        key = _pickle_key(pickle_key)
        return {
            "account": self.account.pickle(key),
            "sessions": {d: [s.pickle(key) for s in lst] for d, lst in self.sessions.items()},
            "peers": {d: k.hex() for d, k in self.peer_keys.items()},
        }

    @classmethod
    def load(cls, data: dict, pickle_key: bytes) -> OlmDevice:
        key = _pickle_key(pickle_key)
        try:
            dev = cls(vodozemac.Account.from_pickle(data["account"], key))
            for d, lst in data.get("sessions", {}).items():
                dev.sessions[d] = [vodozemac.Session.from_pickle(p, key) for p in lst]
        except (vodozemac.PickleException, ValueError, KeyError, TypeError) as err:
            raise E2EError(
                f"cannot read the saved encryption state (wrong key file?): {err}"
            ) from None
        dev.peer_keys = {d: bytes.fromhex(k) for d, k in data.get("peers", {}).items()}
        return dev

    def __repr__(self) -> str:  # never a secret
        return f"<OlmDevice {self.ed25519.hex()[:16]}... {len(self.sessions)} peers>"


def verify_signature(ed25519_key: bytes, signature: bytes, message: bytes) -> bool:
    """True if ``signature`` (64 raw bytes) is ``ed25519_key``'s over ``message``."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(bytes(ed25519_key)).verify(bytes(signature), message)
    except (InvalidSignature, ValueError):
        return False
    return True


def _pickle_key(key: bytes) -> bytes:
    key = bytes(key)
    if len(key) != KEY_BYTES:
        raise ValueError("a pickle key is 32 bytes")
    return key


class ProfileKeys:
    """The pickle key of a profile: 32 random bytes in ``<profile>.key``, mode 0600.

    Kept apart from the profile so a copy of the profile (a backup, a synced
    folder) alone does not open the encryption state."""

    __slots__ = ("path",)

    def __init__(self, profile_path: str | os.PathLike):
        self.path = os.fspath(profile_path) + ".key"

    def load_or_create(self) -> bytes:
        try:
            with open(self.path, "rb") as f:
                key = f.read(KEY_BYTES + 1)
        except FileNotFoundError:
            key = os.urandom(KEY_BYTES)
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # made by someone else meanwhile: use theirs
                return self.load_or_create()
            try:
                os.fchmod(fd, 0o600)  # whatever the umask
                os.write(fd, key)
                os.fsync(fd)
            finally:
                os.close(fd)
            return key
        if len(key) != KEY_BYTES:
            raise E2EError(f"{self.path} is not a 32-byte key file")
        return key


# -- safety numbers -----------------------------------------------------------


def _fingerprint(user: str, key: bytes) -> bytes:
    key = bytes(key)
    h = hashes.Hash(hashes.SHA512())
    h.update(FINGERPRINT_VERSION + key + user.encode("ascii"))
    digest = h.finalize()
    for _ in range(FINGERPRINT_ITERATIONS):
        h = hashes.Hash(hashes.SHA512())
        h.update(digest + key)
        digest = h.finalize()
    return digest


def _digits(fp: bytes) -> str:
    return "".join(f"{int.from_bytes(fp[i : i + 5], 'big') % 100000:05d}" for i in range(0, 30, 5))


def _halves(user_a: str, key_a: bytes, user_b: str, key_b: bytes) -> list[tuple[str, bytes]]:
    halves = [
        (_digits(fp), fp) for fp in (_fingerprint(user_a, key_a), _fingerprint(user_b, key_b))
    ]
    halves.sort()
    return halves


def safety_number(user_a: str, key_a: bytes, user_b: str, key_b: bytes) -> str:
    """The 60-digit safety number of two users from their primaries' Ed25519 keys;
    the same whichever user is ``a``.  Shown in 12 groups of 5 (``format_safety_number``)."""
    return "".join(d for d, _ in _halves(user_a, key_a, user_b, key_b))


def format_safety_number(number: str) -> str:
    return " ".join(number[i : i + 5] for i in range(0, len(number), 5))


def safety_qr(user_a: str, key_a: bytes, user_b: str, key_b: bytes) -> str:
    """The QR text for in-person verification: ``PGNV1,<fp>,<fp>`` (the first 32
    bytes of each user's fingerprint hash, base64url unpadded, in safety-number order)."""
    parts = [base64.urlsafe_b64encode(fp[:32]).rstrip(b"=").decode()
             for _, fp in _halves(user_a, key_a, user_b, key_b)]  # fmt: skip
    return ",".join([QR_PREFIX, *parts])


def verify_safety_qr(text: str, user_a: str, key_a: bytes, user_b: str, key_b: bytes) -> bool:
    """True if the scanned ``text`` is the QR of these two users and keys."""
    want = safety_qr(user_a, key_a, user_b, key_b)
    return hmac.compare_digest(text.strip().encode(), want.encode())


# -- device lists ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TrustedDevices:
    """A device list checked against its primary: the primary's key and the devices
    whose link signature verifies (``bad``: those whose signature does not)."""

    user: str
    primary_key: bytes
    devices: tuple[str, ...]
    bad: tuple[str, ...]


def check_device_list(user: str, items) -> TrustedDevices:
    """Check every companion of a ``DeviceList``'s ``items`` (primary first) through the
    primary's link signature (core/keys.py): the server cannot add a device the
    primary did not link without the SDK seeing it."""
    if not items:
        return TrustedDevices(user, b"", (), ())
    primary = items[0]
    good, bad = [primary.device], []
    for d in items[1:]:
        ok = d.signature is not None and verify_link(primary.key, user, d.key, d.signature)
        (good if ok else bad).append(d.device)
    return TrustedDevices(user, bytes(primary.key), tuple(good), tuple(bad))
