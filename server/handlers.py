"""What the server does with each request: one table from event class to handler.

``handle(session, event)`` is called for every event a client's connection
yields.  The three hot kinds (message, receipt, device ack) arrive as one
``Hot`` record from the hot path (core/connection.py) and are handled before
anything else; every other event goes through ``HANDLERS``.  Requests in
``RATED`` draw on the connection's message-rate bucket first (typing has its
own).  A handler answers through the session (``send``) or the tick's
commit (messages and receipts are answered after it).

Login and registration live here too: the SCRAM exchange (``auth_start``,
``auth_response``), registration by phone number and code (``register``: its writes join the
tick's commit, the SMS is spawned; ``verify``: spawned, its PBKDF2 off the loop) and
leaving (``leave``: logout or account deletion).  Linked devices (pair,
link, devices, unlink) are server/linking.py's.
"""

from __future__ import annotations

import asyncio
import logging

import lmdb
from scramp import ScramException

from pigeon.core import codec as core_codec
from pigeon.core.errors import ErrorCode, is_fatal
from pigeon.core.events import (
    SCRAM_MAX,
    AuthChallenge,
    AuthResponse,
    AuthStart,
    AuthSuccess,
    Block,
    Blocklist,
    BlocklistQuery,
    ChatState,
    CodeSent,
    ConnectionClosed,
    DeleteAccount,
    DeviceAck,
    DevicesBatchQuery,
    DevicesQuery,
    Discover,
    DiscoverResult,
    Error,
    GroupRequest,
    KeysCountQuery,
    KeysQuery,
    KeysUpload,
    Link,
    Logout,
    Message,
    Pair,
    Ping,
    Pong,
    Presence,
    Privacy,
    PrivacySettings,
    PushTarget,
    Receipt,
    Register,
    Registered,
    ServerAck,
    Unblock,
    Unlink,
    UploadGrant,
    UploadRequest,
    Verify,
)
from pigeon.core.node import address_kind

from . import keydir, linking, log, mediagrant
from .accounts import ServiceError
from .groups import drop_user_groups
from .limits import window_take, window_used

logger = logging.getLogger("pigeon.worker")

HOT = core_codec.Hot
HOT_MESSAGE, HOT_ACK = 1, 3  # Hot.kind (2 is a receipt)

#: Requests that draw on a connection's message-rate bucket (typing has its own).
RATED = frozenset({Message, Receipt, Presence, Privacy, Discover, Block, Unblock, BlocklistQuery,
                   Link, DevicesQuery, DevicesBatchQuery, Unlink, KeysUpload, KeysQuery, KeysCountQuery,
                   UploadRequest, GroupRequest, PushTarget})  # fmt: skip
#: What counts against messages-per-day (each keeps a dedup record: Session.allowed).
COUNTED = frozenset({Message, Receipt})
#: Requests a stranger may send before logging in: they draw on the connection's
#: own bucket (``unauth-rate``), past which the connection is closed unread.
UNAUTH = frozenset({Register, Verify, Pair})


def handle(s, ev) -> None:
    t = type(ev)
    if t is HOT:
        kind = ev.kind
        if kind == HOT_ACK:
            s.device_ack(ev.seq)
        elif s.allowed(ev, 1.0, True):
            # (next_hot checked ``to`` as a user address: no second look at it)
            s.worker.route(s, ev.to, ev.id, "message" if kind == HOT_MESSAGE else "receipt",
                           ev.type, ev.body, ev.payloads, None, "user")  # fmt: skip
        return
    if t in RATED and not s.allowed(ev, _cost(s, ev, t), t in COUNTED):
        return
    if t in UNAUTH and not s.unauth_allowed():
        return
    handler = HANDLERS.get(t)
    if handler is not None:  # Hello, Pong: nothing to do
        handler(s, ev)


#: Requests whose cost grows with the users they name: they draw one more
#: message-rate token per lookup-users-per-token users (a 256-user devices
#: query cost the server 3.25 ms in the probe, 100 of them a second a third of
#: a core, all free for members of one's groups).
LOOKUPS = frozenset({DevicesBatchQuery, KeysQuery})


def _cost(s, ev, t) -> float:
    if t in LOOKUPS:
        per = s.worker.config.lookup_users_per_token
        if per:
            return 1.0 + len(ev.users) // per
    return 1.0


# -- messaging ----------------------------------------------------------------


def message(s, ev: Message) -> None:
    s.worker.route(s, ev.to, ev.id, "message", ev.type, ev.body, ev.payloads or None)


def receipt(s, ev: Receipt) -> None:
    s.worker.route(s, ev.to, ev.id, "receipt", ev.type, None, participant=ev.participant)


def device_ack(s, ev: DeviceAck) -> None:
    s.device_ack(ev.seq)


def ping(s, ev: Ping) -> None:
    s.send(Pong(ev.id))


def chatstate(s, ev: ChatState) -> None:
    s.worker.chatstate(s, ev)


# -- presence, privacy, contacts, blocking --------------------------------------


def presence(s, ev: Presence) -> None:
    s.worker.presence_request(s, ev)


# Writes join the tick's commit (Worker.write) and are answered after it;
# a request that changes nothing is answered at once from a read transaction.


def privacy(s, ev: Privacy) -> None:
    w = s.worker
    user = s.user
    changes = {k: v for k, v in (("last", ev.last), ("online", ev.online),
                                 ("groupadd", ev.groupadd)) if v}  # fmt: skip

    def answer(result) -> None:
        settings, changed = result
        s.send(PrivacySettings(ev.id, settings["last"], settings["online"],
                               settings.get("groupadd", "everyone")))  # fmt: skip
        if changed:
            w.presence.note(user)

    if not changes:
        with w.store.read() as txn:
            return answer(w.social.privacy_txn(txn, 0, user, changes))
    w.write(lambda txn, now: w.social.privacy_txn(txn, now, user, changes), answer, s, ev.id)


# Groups (server/groups.py): every request is a job of the tick's commit, with the
# notices it queues; ordered, so messages gathered before a membership change
# are stored under the membership they were sent to.


_GROUP_READS = frozenset({"info", "list", "requests"})


def group(s, ev: GroupRequest) -> None:
    w = s.worker
    user = s.user

    def answer(result) -> None:
        res, pushes = result
        w.deliver(pushes)
        s.send(res)

    if ev.op in _GROUP_READS:
        with w.store.read() as txn:
            try:
                return answer(w.groups.handle(txn, 0, user, ev))
            except ServiceError as exc:
                return s.send(Error(exc.code, exc.text, ev.id))
    w.write(lambda txn, now: w.groups.handle(txn, now, user, ev), answer, s, ev.id, ordered=True)


def discover(s, ev: Discover) -> None:
    w = s.worker
    user = s.user

    def answer(result) -> None:
        users, left, changed = result
        s.send(DiscoverResult(ev.id, tuple(users), left))
        if changed:
            w.presence.note(user)  # who counts as a contact changed

    w.write(lambda txn, now: w.social.discover_txn(txn, now, user, ev.type, ev.phones), answer,
            s, ev.id, ordered=True)  # fmt: skip


def block(s, ev: Block) -> None:
    w = s.worker
    user = s.user

    def answer(t: int) -> None:
        s.send(ServerAck(ev.id, t, "block"))
        w.presence.note(user)

    w.write(lambda txn, now: w.social.block_txn(txn, now, user, ev.to), answer, s, ev.id,
            ordered=True)  # fmt: skip


def unblock(s, ev: Unblock) -> None:
    w = s.worker
    user = s.user

    def answer(t: int) -> None:
        s.send(ServerAck(ev.id, t, "unblock"))
        w.presence.note(user)

    w.write(lambda txn, now: w.social.unblock_txn(txn, now, user, ev.to), answer, s, ev.id,
            ordered=True)  # fmt: skip


def blocklist(s, ev: BlocklistQuery) -> None:
    s.send(Blocklist(ev.id, tuple(s.worker.social.blocklist(s.user))))


# -- media uploads (PROTOCOL.md 9b, server/media.py) ------------------------------

MEDIA_DAY_MS = 86_400_000
_media_keys: dict[str, bytes] = {}


def media_base(c) -> str:
    """The media service's URL as clients reach it (media-url, or from media-listen)."""
    if c.media_url:
        return c.media_url.rstrip("/")
    return f"{'https' if c.tls_enabled else 'http'}://{c.media_listen}"


def upload(s, ev: UploadRequest) -> None:
    """Grant an upload: checked against media-max-bytes and the account's daily
    quotas (both counted in the tick's commit, so a grant counts whether or not
    the upload follows), answered with the token and the URL."""
    w = s.worker
    c = w.config
    user = s.user
    if c.media_listen == "off":
        s.send(Error(ErrorCode.UNAVAILABLE, "this server runs no media service", ev.id))
        return
    if not 0 < ev.size <= c.media_max_bytes:
        s.send(
            Error(
                ErrorCode.MEDIA_TOO_LARGE,
                f"media must be 1 to {c.media_max_bytes} bytes (media-max-bytes)",
                ev.id,
            )
        )
        return  # fmt: skip
    key = _media_keys.get(c.data_dir)
    if key is None:
        key = _media_keys[c.data_dir] = mediagrant.load_key(c.data_dir)

    def run(txn, now):
        w.store.check_room(txn)
        db = w.store._db["limits"]
        nkey, bkey = f"media-n:{user}".encode(), f"media-b:{user}".encode()
        # both checked before either is written: a refusal writes nothing
        _, count = window_used(txn, db, nkey, now, MEDIA_DAY_MS)
        _, used = window_used(txn, db, bkey, now, MEDIA_DAY_MS)
        if count >= c.media_quota_uploads:
            raise ServiceError(ErrorCode.MEDIA_QUOTA, f"daily upload count reached "
                               f"({c.media_quota_uploads}, media-quota-uploads)")  # fmt: skip
        if used + ev.size > c.media_quota_bytes:
            raise ServiceError(ErrorCode.MEDIA_QUOTA, f"daily upload bytes reached "
                               f"({c.media_quota_bytes}, media-quota-bytes; "
                               f"{max(0, c.media_quota_bytes - used)} left)")  # fmt: skip
        window_take(txn, db, nkey, now, MEDIA_DAY_MS, c.media_quota_uploads)
        window_take(txn, db, bkey, now, MEDIA_DAY_MS, c.media_quota_bytes, ev.size)
        return now

    def answer(now) -> None:
        grant = mediagrant.Grant(user, ev.size, ev.sha256, ev.media_class,
                                 now + c.media_grant_ttl * 1000)  # fmt: skip
        token = mediagrant.issue(key, grant)
        url = f"{media_base(c)}/v1/upload/{ev.sha256.hex()}"
        s.send(UploadGrant(ev.id, url, c.media_grant_ttl, token))

    w.write(run, answer, s, ev.id)


# -- push targets (PROTOCOL.md 9d, server/push.py) -----------------------------------


def push_target(s, ev: PushTarget) -> None:
    """Register or remove this device's push target, in the tick's commit."""
    w = s.worker
    hub = w.push
    device = s.device
    if ev.type == "set":
        if hub is None or ev.kind not in hub.kinds:
            s.send(Error(ErrorCode.UNAVAILABLE, f"this server sends no {ev.kind} push", ev.id))
            return
        problem = hub.check_token(ev.kind, ev.token)
        if problem is not None:
            s.send(Error(ErrorCode.BAD_REQUEST, problem, ev.id))
            return

        def run(txn, now):
            w.store.check_room(txn)
            hub.set_txn(txn, device, ev.kind, ev.token, ev.mute, ev.quiet)
            return now
    else:

        def run(txn, now):
            txn.delete(device.encode(), db=w.store._db["push"])
            return now

    w.write(run, lambda now: s.send(ServerAck(ev.id, now, "push")), s, ev.id)


# -- the connection's end -------------------------------------------------------


def peer_error(s, ev: Error) -> None:
    if s.worker.client_log(s):
        log.event(logger, logging.INFO, "client reported an error", conn=s.id, ip=s.ip,
                  code=ev.code)  # fmt: skip
    if is_fatal(ev.code):
        s.close_soon()  # the client is closing: so do we (its state is CLOSED)


def closed(s, ev: ConnectionClosed) -> None:
    s.close_soon()


# -- registration and login -------------------------------------------------------


def scram_username(client_first: bytes) -> str | None:
    """The n= field of a SCRAM client-first-message ("n,,n=USER,r=NONCE")."""
    try:
        text = client_first.decode("ascii")
    except UnicodeDecodeError:
        return None
    parts = text.split(",")
    if len(parts) < 4 or not parts[2].startswith("n="):
        return None
    return parts[2][2:].replace("=2C", ",").replace("=3D", "=")


class InFlight:
    """One register or verify request being handled: counted against
    ``unauth-in-flight`` (its connection) and ``unauth-worker-in-flight``
    until ``release`` (which may be called more than once)."""

    __slots__ = ("session", "held")

    def __init__(self, s):
        self.session = s
        self.held = True
        s.in_flight += 1
        s.worker.unauth_in_flight += 1

    def release(self) -> None:
        if self.held:
            self.held = False
            self.session.in_flight -= 1
            self.session.worker.unauth_in_flight -= 1


def admit(s, ev) -> InFlight | None:
    """A register or verify may start: under both in-flight caps (else refused)."""
    w = s.worker
    c = w.config
    if s.in_flight >= c.unauth_in_flight:
        w.stats.counters["rate_limited"] += 1
        s.send(Error(ErrorCode.TOO_FAST, "a registration request is already in progress on this "
                     "connection; wait for its answer", ev.id))  # fmt: skip
        return None
    if w.unauth_in_flight >= c.unauth_worker_in_flight:
        w.stats.counters["rate_limited"] += 1
        s.send(Error(ErrorCode.UNAVAILABLE, "the server is busy with registrations; retry later",
                     ev.id))  # fmt: skip
        return None
    return InFlight(s)


def register(s, ev: Register) -> None:
    """The rate windows and the new code join the tick's commit; the SMS goes after it."""
    ticket = admit(s, ev)
    if ticket is None:
        return
    w = s.worker
    source = s.source

    def run(txn, now):
        try:
            return w.accounts.code_txn(txn, now, ev.phone, source)
        except BaseException:
            ticket.release()  # refused: the Job answers
            raise

    def sent(code: str) -> None:
        w.spawn(send_code(s, ev, code, ticket))

    def failed(exc) -> None:
        ticket.release()
        if not s.closing:
            s.store_failed(exc, ev.id)

    w.write(run, sent, s, ev.id, failed)


async def send_code(s, ev: Register, code: str, ticket: InFlight) -> None:
    try:
        await s.worker.accounts.gateway.send(ev.phone, code, ev.method)
    except ServiceError as err:
        if not s.closing:
            s.send(Error(err.code, err.text, ev.id))
        return
    finally:
        ticket.release()
    if not s.closing:  # a closed connection's answer is dropped
        s.send(CodeSent(ev.id, s.worker.config.code_ttl))


def start_verify(s, ev: Verify) -> None:
    ticket = admit(s, ev)
    if ticket is not None:
        s.worker.spawn(verify(s, ev, ticket))


async def verify(s, ev: Verify, ticket: InFlight) -> None:
    w = s.worker

    def run():
        if s.closing:  # gone while it waited for a thread: not tried at all
            return None
        return w.accounts.verify(ev.phone, ev.code, ev.identity_key, s.source)

    try:
        # PBKDF2 for the new device's SCRAM keys: off the loop.
        result = await asyncio.to_thread(run)
    except ServiceError as err:
        if not s.closing:
            s.send(Error(err.code, err.text, ev.id))
        return
    except lmdb.Error as exc:
        if not s.closing:
            s.store_failed(exc, ev.id)
        return
    finally:
        ticket.release()
    if result is None:
        return
    address, secret, removed = result
    for old in removed:
        w.revoke(old, ErrorCode.REVOKED, "this number was registered on another device")
    log.event(logger, logging.INFO, "device registered", device=address)
    if not s.closing:
        s.send(Registered(ev.id, address, secret))
    # a new device: the users who talk to this one are told, in the next commit
    # (the registration's transaction ran in a thread, outside the worker's queues)
    w.write(lambda txn, now: keydir.changed_txn(w.queues, txn, ev.phone, now), w.deliver)


def leave(s, request_id: str, what: str) -> None:
    """Logout (this device goes) or account deletion (every device goes)."""
    w = s.worker
    device, user = s.device, s.user
    if what == "delete":
        # Only the primary deletes the account (as WhatsApp's phone alone can): a
        # companion (a laptop left logged in, a lost tablet) could otherwise wipe
        # the account, every device's queue with it.  A companion may log out.
        try:
            with w.store.read() as txn:
                acct = w.store._get(txn, "accounts", user)
        except lmdb.Error as exc:
            return s.store_failed(exc, request_id)
        if linking.primary_of(acct) != int(device.rpartition(":")[2]):
            return s.send(Error(ErrorCode.NOT_PRIMARY,
                                "only the primary device may delete the account; a linked "
                                "device may log out (unlink itself)", request_id))  # fmt: skip
    w.detach(s)
    if s.holders:  # the workers holding pushes for it are told while it has a name
        s.release()
    s.device = None
    s.close_soon()  # nothing more is read; the answer goes out before the close

    def run(txn, now):
        if what == "logout":
            acct = w.store._get(txn, "accounts", user)
            if linking.primary_of(acct) == int(device.rpartition(":")[2]):
                # the primary logs out: its companions go with it (as WhatsApp's
                # phone logout does), so no companion becomes the primary
                companions = [f"{user}:{n}" for n in acct["devices"][1:]]
                for d in [device, *companions]:
                    w.store.remove_device_txn(txn, d, now)
                return now, companions, []
            w.store.remove_device_txn(txn, device, now)
            # the account's other devices are told, in the same transaction (after
            # the removal: the device that leaves gets none)
            return now, [], w.queues.devices_changed(txn, user, now)
        # a deleted account has no device left to tell; its groups are told it left
        pushes = drop_user_groups(w.groups, txn, user, now)
        return now, [d for d in w.store.delete_account_txn(txn, user) if d != device], pushes

    def done(result) -> None:
        t, others, pushes = result
        w.deliver(pushes)
        s.send(ServerAck(request_id, t, what))
        why = ("the account was deleted" if what != "logout"
               else "the primary device logged out: link this device again")  # fmt: skip
        for d in others:
            w.revoke(d, ErrorCode.REVOKED, why)
        log.event(
            logger,
            logging.INFO,
            "device logged out" if what == "logout" else "account deleted",
            device=device,
            devices_removed=1 + len(others),
        )

    def failed(exc) -> None:
        s.store_failed(exc, request_id)

    w.write(run, done, s, request_id, failed)


def auth_start(s, ev: AuthStart) -> None:
    w = s.worker
    acc = w.accounts
    if s.pairing is not None:  # a paired companion logs in: it is pairing no more
        linking.release(s)
        # ... nor counted as pairing (pair-per-address), so it keeps pair-timeout
        # no longer: login-timeout from here at most, as for any login
        end = w.loop.time() + w.config.login_timeout
        if s.deadline is not None and s.deadline.when() > end:
            s.deadline.cancel()
            s.deadline = w.loop.call_at(end, linking.pair_deadline, s)
    user = scram_username(ev.data)
    if user is None or address_kind(user) != "device":
        return s.fail(
            ErrorCode.NOT_AUTHORIZED, "login failed: the SCRAM user must be a device address"
        )
    if not acc.login_allowed(user, s.ip):
        w.stats.counters["login_refused"] += 1
        return s.fail(ErrorCode.RATE_LIMITED, "too many failed logins; try again later")
    acct, device = acc.login_records(user)
    if acct is not None and acct.get("disabled"):
        return s.fail(ErrorCode.NOT_AUTHORIZED, "login refused: this account is disabled")
    s.scram = acc.scram_server(known=(user, device))
    try:
        s.scram.set_client_first(ev.data.decode("ascii"))
        first = s.scram.get_server_first()
    except ScramException:
        s.scram = None
        return s.fail(ErrorCode.NOT_AUTHORIZED, "login failed: bad SCRAM message")
    if len(first) > SCRAM_MAX:  # (a client nonce near auth's 1,024 bytes: the
        # challenge echoing it could not be sent, and the login hung to login-timeout)
        s.scram = None
        return s.fail(ErrorCode.NOT_AUTHORIZED,
                      f"login failed: the client nonce is too long (the challenge that "
                      f"repeats it must fit {SCRAM_MAX} bytes; 512 characters always do)")  # fmt: skip
    s.login_user = user
    s.send(AuthChallenge(first.encode()))


def login_failed(s, why: str) -> None:
    """Count a failed or abandoned login (the challenge was sent, no valid proof came)."""
    w = s.worker
    s.scram = None
    w.accounts.login_failed(s.login_user, s.ip)
    w.stats.counters["login_failures"] += 1
    if w.client_log(s):
        log.event(logger, logging.INFO, "login failed", device=s.login_user, ip=s.ip,
                  why=why)  # fmt: skip


def auth_response(s, ev: AuthResponse) -> None:
    w = s.worker
    try:
        s.scram.set_client_final(ev.data.decode("ascii"))
        final = s.scram.get_server_final()
    except (ScramException, UnicodeDecodeError):
        login_failed(s, "bad proof")
        return s.fail(ErrorCode.NOT_AUTHORIZED, "login failed")
    s.scram = None
    if not w.accounts.login_counted(s.login_user):
        # (after the proof: a stranger cannot use up the owner's logins)
        c = w.config
        w.stats.counters["login_refused"] += 1
        return s.fail(ErrorCode.RATE_LIMITED,
                      f"this device logged in too often: at most {c.device_logins} logins "
                      f"per {c.device_logins_window} s (device-logins); try again later")  # fmt: skip
    if s.deadline is not None:
        s.deadline.cancel()
        s.deadline = None

    def logged_in(queued: int) -> None:
        s.send(AuthSuccess(final.encode(), w.store.clock()))
        if queued:  # serve what waited in the queue (an empty one is not read again)
            s.backlog = True
            s.refill()

    # the session record joins this tick's commit; the success goes after it
    w.attach(s, s.login_user, logged_in)


HANDLERS = {
    Message: message,
    Receipt: receipt,
    DeviceAck: device_ack,
    Ping: ping,
    ChatState: chatstate,
    Presence: presence,
    Privacy: privacy,
    Discover: discover,
    Block: block,
    Unblock: unblock,
    BlocklistQuery: blocklist,
    Register: register,
    Verify: start_verify,
    AuthStart: auth_start,
    AuthResponse: auth_response,
    Logout: lambda s, ev: leave(s, ev.id, "logout"),
    DeleteAccount: lambda s, ev: leave(s, ev.id, "delete"),
    Pair: linking.pair,
    Link: linking.link,
    DevicesQuery: linking.devices,
    DevicesBatchQuery: linking.devices_batch,
    Unlink: linking.unlink,
    KeysUpload: keydir.upload,
    KeysQuery: keydir.query,
    KeysCountQuery: keydir.count,
    UploadRequest: upload,
    GroupRequest: group,
    PushTarget: push_target,
    Error: peer_error,
    ConnectionClosed: closed,
}
