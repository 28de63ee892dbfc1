"""Push wake-ups (server/push.py) on a real server with two workers, the real SDK,
and local HTTP servers that record every request as the push endpoints (the
webhook, FCM, Web Push: aiohttp; APNs: hypercorn over HTTP/2 with TLS).  The
server's clock is moved through its test clock file, never slept through."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
import urllib.parse
import urllib.request

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pushutil import H2Recorder, Recorder
from serverutil import Server, free_port, until

from pigeon.client import ServerError
from pigeon.core.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from pigeon.core.events import CLIENT_SENT, PushTarget
from pigeon.server.store import Store
from pigeon.tools.certs import gen_cert

ALICE, BOB, CAROL = "491701234567", "4915112345678", "447700900123"


def run(coro, timeout=120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def metrics(port: int) -> dict:
    """{(provider, result, reason): n} from /status."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as r:
        doc = orjson.loads(r.read())
    out = {}
    for key, n in doc["push"].items():
        result, provider, reason = (key.split(" ", 2) + ["", ""])[:3]
        out[(provider, result, reason)] = n
    return out


def total(m: dict, result: str, provider: str | None = None) -> int:
    return sum(n for (p, r, _), n in m.items() if r == result and provider in (None, p))


def target(srv: Server, device: str):
    store = Store(str(srv.data_dir / "store"), map_size=256 << 20, create=False)
    try:
        with store.read() as txn:
            raw = txn.get(device.encode(), db=store._db["push"])
    finally:
        store.close()
    import msgpack

    return None if raw is None else msgpack.unpackb(raw)


def start(tmp_path, **options) -> tuple[Server, int]:
    mport = free_port()
    srv = Server(tmp_path / "data", workers=2, metrics_listen=f"127.0.0.1:{mport}",
                 **options).start()  # fmt: skip
    return srv, mport


async def offline_with_target(srv, phone, kind, token, **kw):
    creds = await srv.register(phone)
    c = await srv.login(creds)
    ack = await c.set_push(kind, token, **kw)
    await c.close()
    await until(lambda: creds.device not in srv.sessions(phone))
    return creds, ack


async def send_many(c, to, n, prefix="m"):
    bodies = []
    for i in range(n):
        body = f"secret-body-{prefix}-{i}".encode()
        bodies.append(body)
        await c.send(to, body, id=f"{prefix}-{i}")
    return bodies


def no_leak(requests, bodies, ids, sender):
    for r in requests:
        raw = r.raw()
        assert sender.encode() not in raw, r.raw()
        for b in bodies:
            assert b not in raw
        for i in ids:
            assert i.encode() not in raw


# -- the webhook: when to push ---------------------------------------------------


def test_offline_device_woken_once_per_window_never_when_connected_nor_for_typing(tmp_path):
    hook = Recorder().start()
    srv, mport = start(tmp_path, push_webhook_url=f"{hook.base}/wake", push_coalesce=30)
    try:

        async def main():
            bob, ack = await offline_with_target(srv, BOB, "webhook", "tok-bob")
            assert ack.cls == "push"
            alice = await srv.login(await srv.register(ALICE))
            bodies = await send_many(alice, BOB, 100)
            # every entry is decided: one wake-up, the other 99 coalesced
            await until(lambda: total(metrics(mport), "sent") + total(metrics(mport), "coalesced")
                        >= 100, timeout=20)  # fmt: skip
            m = metrics(mport)
            assert total(m, "sent", "webhook") == 1, m
            assert total(m, "coalesced", "webhook") == 99, m
            reqs = hook.got("/wake")
            assert len(reqs) == 1
            doc = orjson.loads(reqs[0].body)
            assert [w["token"] for w in doc["wakeups"]] == ["tok-bob"]
            assert doc["wakeups"][0]["kind"] == "webhook"
            assert len(doc["wakeups"][0]["id"]) == 32  # the opaque wake id
            assert reqs[0].headers["content-type"] == "application/json"
            # past the window: woken again for the next entry
            srv.advance_clock(31)
            bodies += await send_many(alice, BOB, 1, "late")
            await until(lambda: len(hook.got("/wake")) == 2, timeout=20)
            no_leak(hook.got(), bodies, [f"m-{i}" for i in range(100)] + ["late-0"], ALICE)
            # typing to an offline device never wakes it; a message to Carol does
            carol, _ = await offline_with_target(srv, CAROL, "webhook", "tok-carol")
            srv.advance_clock(31)
            await alice.typing(BOB)
            await alice.send(CAROL, b"hi carol", id="c-1")
            await until(lambda: len(hook.got("/wake")) == 3, timeout=20)
            last = orjson.loads(hook.got("/wake")[-1].body)
            assert [w["token"] for w in last["wakeups"]] == ["tok-carol"]
            # a connected device is never woken: Bob online, 20 messages
            b = await srv.login(bob)
            await until(lambda: bob.device in srv.sessions(BOB))
            before = len(hook.got())
            await send_many(alice, BOB, 20, "online")
            got = 0
            while got < 121:  # the 101 queued while offline and the 20 now
                ev = await b.next_event(10)
                if hasattr(ev, "body"):
                    got += 1
                await b.ack(ev.seq)
            await alice.send(CAROL, b"again", id="c-2")  # a later wake-up, as a marker
            srv.advance_clock(31)
            await alice.send(CAROL, b"again2", id="c-3")
            await until(lambda: len(hook.got()) > before, timeout=20)
            assert all(b"tok-bob" not in r.body for r in hook.got()[before:])
            # a device that connected is woken at once after it leaves again
            await b.close()
            await until(lambda: bob.device not in srv.sessions(BOB))
            n = len(hook.got())
            await alice.send(BOB, b"after", id="after-1")
            await until(lambda: len(hook.got()) == n + 1, timeout=20)
            assert b"tok-bob" in hook.got()[-1].body
            await alice.close()

        run(main())
    finally:
        assert srv.stop() == 0, srv.log_text()[-3000:]
        hook.stop()


def test_offline_group_members_are_woken_once_and_online_ones_never(tmp_path):
    """A group message's copies for offline member devices wake them as a 1:1
    message's do (once per window for a burst); a member online is not woken."""
    hook = Recorder().start()
    srv, mport = start(tmp_path, push_webhook_url=f"{hook.base}/wake", push_coalesce=30)
    try:

        async def main():
            alice = await srv.login(await srv.register(ALICE))
            carol_creds = await srv.register(CAROL)
            carol = await srv.login(carol_creds)
            await carol.set_push("webhook", "tok-carol")
            bob, _ = await offline_with_target(srv, BOB, "webhook", "tok-bob")
            g = (await alice.group("create", subject="wake", members=[BOB, CAROL])).group
            bodies = [f"secret-group-{i}".encode() for i in range(20)]
            for i, body in enumerate(bodies):
                await alice.send(g, body, id=f"g-{i}")
            # the create notice and 20 messages for Bob: one wake-up, the rest coalesced
            await until(lambda: total(metrics(mport), "sent") + total(metrics(mport), "coalesced")
                        >= 21, timeout=20)  # fmt: skip
            m = metrics(mport)
            assert total(m, "sent", "webhook") == 1, m
            reqs = hook.got("/wake")
            assert [w["token"] for r in reqs for w in orjson.loads(r.body)["wakeups"]] == [
                "tok-bob"
            ]
            no_leak(hook.got(), bodies, [f"g-{i}" for i in range(20)], ALICE)
            assert g.encode() not in b"".join(r.raw() for r in hook.got())
            await alice.close()
            await carol.close()

        run(main())
    finally:
        assert srv.stop() == 0, srv.log_text()[-3000:]
        hook.stop()


def test_mute_and_removal_are_honoured(tmp_path):
    hook = Recorder().start()
    srv, mport = start(tmp_path, push_webhook_url=f"{hook.base}/wake")
    try:

        async def main():
            creds = await srv.register(BOB)
            c = await srv.login(creds)
            ack = await c.set_push("webhook", "tok-bob", mute=0)
            await c.set_push("webhook", "tok-bob", mute=ack.t + 60_000, quiet=True)
            await c.close()
            await until(lambda: creds.device not in srv.sessions(BOB))
            alice = await srv.login(await srv.register(ALICE))
            await alice.send(BOB, b"muted", id="x-1")
            await until(lambda: total(metrics(mport), "muted") >= 1, timeout=20)
            assert hook.got() == []
            srv.advance_clock(61)
            await alice.send(BOB, b"unmuted", id="x-2")
            await until(lambda: len(hook.got()) == 1, timeout=20)
            assert orjson.loads(hook.got()[0].body)["wakeups"][0]["quiet"] is True
            # removed: no more wake-ups
            c = await srv.login(creds)
            await c.remove_push()
            await c.close()
            await until(lambda: creds.device not in srv.sessions(BOB))
            assert target(srv, creds.device) is None
            srv.advance_clock(61)
            await alice.send(BOB, b"gone", id="x-3")
            await alice.send(BOB, b"gone", id="x-4")
            await asyncio.sleep(0.5)  # nothing to wait for: nothing may come
            assert len(hook.got()) == 1
            # bad registrations: a kind this server does not send, a token too long
            c = await srv.login(creds)
            with pytest.raises(ServerError) as e:
                await c.set_push("fcm", "x")
            assert e.value.code == ErrorCode.UNAVAILABLE
            with pytest.raises(ServerError) as e:
                await c.set_push("webhook", "x" * 1025)
            assert e.value.code == ErrorCode.BAD_REQUEST
            await c.close()
            await alice.close()

        run(main())
    finally:
        assert srv.stop() == 0, srv.log_text()[-3000:]
        hook.stop()


def test_webhook_retries_with_backoff_times_out_and_removes_gone_targets(tmp_path):
    answers = {"n": 0}

    def respond(req):
        answers["n"] += 1
        doc = orjson.loads(req.body)
        tokens = [w["token"] for w in doc["wakeups"]]
        if "tok-slow" in tokens:
            return 200, b"{}", 3.0  # past push-timeout
        if "tok-gone" in tokens:
            return 200, orjson.dumps({"gone": ["tok-gone"]}), 0.0
        if answers["n"] <= 2:
            return 503, b"", 0.0
        return 200, b"{}", 0.0

    hook = Recorder(respond).start()
    srv, mport = start(tmp_path, push_webhook_url=f"{hook.base}/wake", push_retries=2,
                       push_backoff=0.2, push_request_timeout=0.5)  # fmt: skip
    try:

        async def main():
            await offline_with_target(srv, BOB, "webhook", "tok-bob")
            alice = await srv.login(await srv.register(ALICE))
            await alice.send(BOB, b"one", id="r-1")
            await until(lambda: total(metrics(mport), "sent") == 1, timeout=20)
            reqs = hook.got()
            assert len(reqs) == 3  # two 503s, then the answer
            assert reqs[0].body == reqs[1].body == reqs[2].body
            assert reqs[1].at - reqs[0].at >= 0.19 and reqs[2].at - reqs[1].at >= 0.39
            assert total(metrics(mport), "retried") == 2
            # a stalled endpoint: every attempt times out, then it is a failure
            await offline_with_target(srv, CAROL, "webhook", "tok-slow")
            await alice.send(CAROL, b"two", id="r-2")
            await until(lambda: total(metrics(mport), "failed") == 1, timeout=20)
            assert metrics(mport)[("webhook", "failed", "timeout")] == 1
            assert len([r for r in hook.got() if b"tok-slow" in r.body]) == 3
            # the endpoint says a target is gone: removed from the store
            dave = "33612345678"
            creds, _ = await offline_with_target(srv, dave, "webhook", "tok-gone")
            assert target(srv, creds.device) is not None
            await alice.send(dave, b"three", id="r-3")
            await until(lambda: target(srv, creds.device) is None, timeout=20)
            await until(lambda: total(metrics(mport), "gone") == 1)
            await alice.close()

        run(main())
    finally:
        assert srv.stop() == 0, srv.log_text()[-3000:]
        hook.stop()


def test_auth_header_from_a_file_and_a_full_queue_drops_and_counts(tmp_path):
    def respond(req):
        return 200, b"{}", 2.0  # slow: the one request in flight holds the gateway

    hook = Recorder(respond).start()
    auth = tmp_path / "auth"
    auth.write_text("Bearer hook-secret\n")
    os.chmod(auth, 0o600)
    srv, mport = start(tmp_path, push_webhook_url=f"{hook.base}/wake",
                       push_webhook_auth_file=str(auth), push_queue=1, push_batch=1,
                       push_concurrency=1, push_retries=0, push_request_timeout=10)  # fmt: skip
    try:

        async def main():
            alice = await srv.login(await srv.register(ALICE))
            phones = [f"4915112340{i:03d}" for i in range(8)]
            for p in phones:
                await offline_with_target(srv, p, "webhook", f"tok-{p}")
            for p in phones:  # each send its own tick, mostly: the gateway is held
                await alice.send(p, b"x", id=f"d-{p}")
            await until(lambda: total(metrics(mport), "dropped") >= 1, timeout=20)
            assert hook.got()[0].headers["authorization"] == "Bearer hook-secret"
            assert b"hook-secret" not in srv.log_text().encode()
            await alice.close()

        run(main())
    finally:
        assert srv.stop() == 0, srv.log_text()[-3000:]
        hook.stop()


# -- FCM, APNs, Web Push: the requests, byte-checked --------------------------------


def _b64url_decode(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


@pytest.fixture
def tls(tmp_path):
    return gen_cert(str(tmp_path / "push-tls"), force=True)


def test_fcm_http_v1_requests_are_well_formed_and_unregistered_is_removed(tmp_path, tls):
    cert, key = tls
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def respond(req):
        if req.path == "/token":
            return 200, orjson.dumps({"access_token": "ya29.test-access", "expires_in": 3600,
                                      "token_type": "Bearer"}), 0.0  # fmt: skip
        doc = orjson.loads(req.body)
        if doc["message"]["token"] == "fcm-gone":
            return 404, orjson.dumps({"error": {"code": 404, "status": "NOT_FOUND", "details": [
                {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                 "errorCode": "UNREGISTERED"}]}}), 0.0  # fmt: skip
        return 200, orjson.dumps({"name": "projects/pigeon-test/messages/1"}), 0.0

    fcm = Recorder(respond, tls=(cert, key)).start()
    creds_file = tmp_path / "sa.json"
    creds_file.write_text(json.dumps({
        "type": "service_account", "project_id": "pigeon-test",
        "client_email": "push@pigeon-test.iam.gserviceaccount.com",
        "private_key": rsa_key.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()).decode(),
        "token_uri": f"{fcm.base}/token",
    }))  # fmt: skip
    os.chmod(creds_file, 0o600)
    srv, mport = start(tmp_path, push_fcm_credentials=str(creds_file), push_fcm_url=fcm.base,
                       push_ca_file=cert)  # fmt: skip
    try:

        async def main():
            await offline_with_target(srv, BOB, "fcm", "fcm-token-bob")
            gone, _ = await offline_with_target(srv, CAROL, "fcm", "fcm-gone")
            alice = await srv.login(await srv.register(ALICE))
            await alice.send(BOB, b"secret fcm body", id="f-1-id-not-in-a-push")
            await until(lambda: total(metrics(mport), "sent", "fcm") == 1, timeout=20)
            tok = fcm.got("/token")[0]
            assert tok.headers["content-type"] == "application/x-www-form-urlencoded"
            form = urllib.parse.parse_qs(tok.body.decode())
            assert form["grant_type"] == ["urn:ietf:params:oauth:grant-type:jwt-bearer"]
            claims = jwt.decode(form["assertion"][0], rsa_key.public_key(), algorithms=["RS256"],
                                audience=f"{fcm.base}/token")  # fmt: skip
            assert claims["iss"] == "push@pigeon-test.iam.gserviceaccount.com"
            assert claims["scope"] == "https://www.googleapis.com/auth/firebase.messaging"
            assert claims["exp"] - claims["iat"] == 3600
            assert abs(claims["iat"] - time.time()) < 60
            (send,) = fcm.got("/v1/")
            assert send.method == "POST"
            assert send.path == "/v1/projects/pigeon-test/messages:send"
            assert send.headers["authorization"] == "Bearer ya29.test-access"
            assert send.headers["content-type"] == "application/json"
            msg = orjson.loads(send.body)["message"]
            assert msg["token"] == "fcm-token-bob"
            assert msg["data"]["pigeon"] == "wake" and len(msg["data"]["w"]) == 32
            assert msg["android"]["priority"] == "HIGH"
            await alice.send(CAROL, b"to a gone token", id="f-2-id-not-in-a-push")
            await until(lambda: target(srv, gone.device) is None, timeout=20)
            await until(lambda: metrics(mport).get(("fcm", "gone", "unregistered")) == 1)
            assert len(fcm.got("/token")) == 1  # the access token is kept
            no_leak(
                fcm.got(),
                [b"secret fcm body", b"to a gone token"],
                ["f-1-id-not-in-a-push", "f-2-id-not-in-a-push"],
                ALICE,
            )
            await alice.close()

        run(main())
    finally:
        assert srv.stop() == 0, srv.log_text()[-3000:]
        fcm.stop()


def test_apns_requests_go_over_http2_with_an_es256_provider_token(tmp_path, tls):
    cert, key = tls
    signing = ec.generate_private_key(ec.SECP256R1())
    p8 = tmp_path / "AuthKey_ABC123DEFG.p8"
    p8.write_bytes(signing.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))  # fmt: skip
    os.chmod(p8, 0o600)
    bob_token, gone_token = "ab" * 32, "cd" * 32

    def respond(req):
        if req.path.endswith(gone_token):
            return 410, orjson.dumps({"reason": "Unregistered", "timestamp": 1}), 0.0
        return 200, b"", 0.0

    apns = H2Recorder(respond, tls=(cert, key)).start()
    srv, mport = start(tmp_path, push_apns_key_file=str(p8), push_apns_key_id="ABC123DEFG",
                       push_apns_team_id="TEAM123456", push_apns_topic="org.example.pigeon",
                       push_apns_url=apns.base, push_ca_file=cert)  # fmt: skip
    try:

        async def main():
            await offline_with_target(srv, BOB, "apns", bob_token, quiet=True)
            gone, _ = await offline_with_target(srv, CAROL, "apns", gone_token)
            alice = await srv.login(await srv.register(ALICE))
            await alice.send(BOB, b"secret apns body", id="a-1-id-not-in-a-push")
            await until(lambda: total(metrics(mport), "sent", "apns") == 1, timeout=20)
            (req,) = apns.got()
            assert req.version == "2"
            assert req.method == "POST" and req.path == f"/3/device/{bob_token}"
            assert req.headers["apns-topic"] == "org.example.pigeon"
            assert req.headers["apns-push-type"] == "background"
            assert req.headers["apns-priority"] == "5"
            assert int(req.headers["apns-expiration"]) > time.time()
            scheme, token = req.headers["authorization"].split(" ")
            assert scheme == "bearer"
            assert jwt.get_unverified_header(token) == {"alg": "ES256", "kid": "ABC123DEFG",
                                                        "typ": "JWT"}  # fmt: skip
            claims = jwt.decode(token, signing.public_key(), algorithms=["ES256"])
            assert claims["iss"] == "TEAM123456" and abs(claims["iat"] - time.time()) < 60
            body = orjson.loads(req.body)
            assert body["aps"] == {"content-available": 1} and len(body["w"]) == 32
            await alice.send(CAROL, b"to a gone device", id="a-2-id-not-in-a-push")
            await until(lambda: target(srv, gone.device) is None, timeout=20)
            alert = apns.got()[-1]
            assert alert.headers["apns-push-type"] == "alert"
            assert alert.headers["apns-priority"] == "10"
            await until(lambda: metrics(mport).get(("apns", "gone", "unregistered")) == 1)
            no_leak(apns.got(), [b"secret apns body", b"to a gone device"], ["a-1-id-not-in-a-push", "a-2-id-not-in-a-push"],
                    ALICE)  # fmt: skip
            # a token that is not hex is refused at registration
            c = await srv.login(await srv.register("33612345678"))
            with pytest.raises(ServerError) as e:
                await c.set_push("apns", "not-a-token")
            assert e.value.code == ErrorCode.BAD_REQUEST
            await c.close()
            await alice.close()

        run(main())
    finally:
        assert srv.stop() == 0, srv.log_text()[-3000:]
        apns.stop()


def test_a_stored_web_push_endpoint_is_checked_again_before_each_post(tmp_path, tls):
    """An endpoint is checked when it is set (set_push), but one stored before the
    host check (``127.0.0.1\\x00.push.example``) or before push-webpush-hosts lost
    its host was still POSTed to at every wake-up: the check only guarded new
    targets.  Now the endpoint is checked again before the POST and, refused, the
    target goes as a gone one does."""
    cert, key = tls
    wp = Recorder(lambda req: (201, b"", 0.0), tls=(cert, key)).start()
    vkey = tmp_path / "vapid.pem"
    vkey.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))  # fmt: skip
    os.chmod(vkey, 0o600)
    opts = dict(push_vapid_key_file=str(vkey), push_vapid_subject="mailto:ops@example.org",
                push_ca_file=cert)  # fmt: skip
    srv, _ = start(tmp_path, push_webpush_hosts=f"127.0.0.1:{wp.port}", **opts)
    try:
        bob, _ = run(offline_with_target(srv, BOB, "webpush", f"{wp.base}/sub/bob"))
    finally:
        assert srv.stop() == 0, srv.log_text()[-3000:]
    # the same store, with the host no longer allowed
    mport = free_port()
    srv = Server(tmp_path / "data", workers=2, metrics_listen=f"127.0.0.1:{mport}",
                 push_webpush_hosts="localhost", **opts).start()  # fmt: skip
    try:

        async def main():
            alice = await srv.login(await srv.register(ALICE))
            await alice.send(BOB, b"a wake-up", id="s-1")
            await until(lambda: total(metrics(mport), "sent", "webpush")
                        + total(metrics(mport), "gone", "webpush") >= 1, timeout=20)  # fmt: skip
            assert wp.got() == [] and total(metrics(mport), "sent", "webpush") == 0
            await until(lambda: target(srv, bob.device) is None, timeout=20)
            await alice.close()

        run(main())
    finally:
        assert srv.stop() == 0, srv.log_text()[-3000:]
        wp.stop()


def test_a_push_service_redirect_is_not_followed(tmp_path, tls):
    """probe9: a Web Push endpoint on an allowed host that answered 307 made the
    server POST to the Location, a host and scheme push-webpush-hosts does not
    allow (an open redirect on a push service is an SSRF).  A redirect is now
    a failed wake-up; nothing reaches the other host."""
    cert, key = tls
    inside = Recorder(lambda req: (200, b"", 0.0)).start()  # plain http, not allowed
    wp = Recorder(lambda req: (307, b"", 0.0, {"Location": f"{inside.base}/internal?x=1"}),
                  tls=(cert, key)).start()  # fmt: skip
    vkey = tmp_path / "vapid.pem"
    vkey.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))  # fmt: skip
    os.chmod(vkey, 0o600)
    srv, mport = start(tmp_path, push_vapid_key_file=str(vkey),
                       push_vapid_subject="mailto:ops@example.org",
                       push_webpush_hosts=f"127.0.0.1:{wp.port}", push_ca_file=cert)  # fmt: skip
    try:

        async def main():
            await offline_with_target(srv, BOB, "webpush", f"{wp.base}/redirect/bob")
            alice = await srv.login(await srv.register(ALICE))
            await alice.send(BOB, b"a wake-up", id="r-1-id-not-in-a-push")
            await until(lambda: len(wp.got("/redirect/")) >= 1, timeout=20)
            await until(
                lambda: (
                    sum(
                        n
                        for (p, r, _), n in metrics(mport).items()
                        if p == "webpush" and r != "sent"
                    )
                    >= 1
                ),
                timeout=20,
            )  # fmt: skip (a result that is not "sent": the 307)
            await asyncio.sleep(1)  # a followed redirect would have reached it by now
            assert inside.got() == []
            assert total(metrics(mport), "sent", "webpush") == 0
            await alice.close()

        run(main())
    finally:
        assert srv.stop() == 0, srv.log_text()[-3000:]
        wp.stop()
        inside.stop()


def test_web_push_requests_carry_a_valid_vapid_signature(tmp_path, tls):
    cert, key = tls

    def respond(req):
        return (410, b"", 0.0) if req.path.startswith("/gone") else (201, b"", 0.0)

    wp = Recorder(respond, tls=(cert, key)).start()
    vapid = ec.generate_private_key(ec.SECP256R1())
    vkey = tmp_path / "vapid.pem"
    vkey.write_bytes(vapid.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))  # fmt: skip
    os.chmod(vkey, 0o600)
    srv, mport = start(tmp_path, push_vapid_key_file=str(vkey),
                       push_vapid_subject="mailto:ops@example.org",
                       push_webpush_hosts=f"127.0.0.1:{wp.port},localhost,.push.example",
                       push_ca_file=cert)  # fmt: skip
    try:

        async def main():
            await offline_with_target(srv, BOB, "webpush", f"{wp.base}/sub/bob-endpoint")
            gone, _ = await offline_with_target(srv, CAROL, "webpush", f"{wp.base}/gone/carol",
                                                quiet=True)  # fmt: skip
            alice = await srv.login(await srv.register(ALICE))
            await alice.send(BOB, b"secret webpush body", id="w-1-id-not-in-a-push")
            await until(lambda: total(metrics(mport), "sent", "webpush") == 1, timeout=20)
            (req,) = wp.got("/sub/")
            assert req.method == "POST" and req.body == b""
            assert req.headers["ttl"] == "3600" and req.headers["urgency"] == "high"
            auth = req.headers["authorization"]
            assert auth.startswith("vapid ")
            parts = dict(p.strip().split("=", 1) for p in auth[len("vapid ") :].split(","))
            # the signature, checked with cryptography against the key the header names
            pub = ec.EllipticCurvePublicKey.from_encoded_point(
                ec.SECP256R1(), _b64url_decode(parts["k"])
            )
            assert pub.public_numbers() == vapid.public_key().public_numbers()
            head, payload, sig = parts["t"].split(".")
            raw = _b64url_decode(sig)
            assert len(raw) == 64
            der = encode_dss_signature(
                int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
            )
            pub.verify(der, f"{head}.{payload}".encode(), ec.ECDSA(hashes.SHA256()))
            assert orjson.loads(_b64url_decode(head))["alg"] == "ES256"
            claims = orjson.loads(_b64url_decode(payload))
            assert claims["aud"] == wp.base and claims["sub"] == "mailto:ops@example.org"
            assert time.time() < claims["exp"] <= time.time() + 24 * 3600
            await alice.send(CAROL, b"to a gone subscription", id="w-2-id-not-in-a-push")
            await until(lambda: target(srv, gone.device) is None, timeout=20)
            assert wp.got("/gone")[0].headers["urgency"] == "normal"
            await until(lambda: metrics(mport).get(("webpush", "gone", "http-410")) == 1)
            no_leak(wp.got(), [b"secret webpush body", b"to a gone subscription"],
                    ["w-1-id-not-in-a-push", "w-2-id-not-in-a-push"], ALICE)  # fmt: skip
            # an endpoint on a host not in push-webpush-hosts is refused: no SSRF
            c = await srv.login(await srv.register("33612345678"))
            for bad in (
                "https://127.0.0.1:7659/metrics",
                "https://localhost:7659/metrics",  # an allowed host without a port: 443 only
                f"http://127.0.0.1:{wp.port}/x",
                "https://evil.example/x",
                # a NUL (raw or %-encoded) ended with an allowed suffix, and the
                # resolver stopped at it: the server connected to 127.0.0.1:443
                b"https://127.0.0.1\x00.push.example/x",
                "https://127.0.0.1%00.push.example/x",
                "https://127.0.0.1\t.push.example/x",
                "https://a_b.push.example/x",
            ):
                with pytest.raises(ServerError) as e:
                    await c.set_push("webpush", bad)
                assert e.value.code == ErrorCode.BAD_REQUEST
            await c.set_push("webpush", "https://x-1.push.example/sub/ok")  # a name: taken
            await c.close()
            await alice.close()

        run(main())
    finally:
        assert srv.stop() == 0, srv.log_text()[-3000:]
        wp.stop()


def _refused(srv: Server) -> str:
    """The log of a server that must refuse to start."""
    with pytest.raises(RuntimeError):
        srv.start()
    return srv.log_text()


def test_bad_push_settings_are_refused_at_start_with_what_to_fix(tmp_path):
    vkey = tmp_path / "vapid.pem"
    vkey.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))  # fmt: skip
    os.chmod(vkey, 0o644)
    log = _refused(Server(tmp_path / "d1", workers=2, push_vapid_key_file=str(vkey),
                          push_vapid_subject="mailto:ops@example.org"))  # fmt: skip
    assert f"push-vapid-key-file {vkey} may be read or written by other users (mode 0644)" in log
    p8 = tmp_path / "key.p8"
    p8.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    os.chmod(p8, 0o600)
    log = _refused(Server(tmp_path / "d2", workers=2, push_apns_key_file=str(p8)))
    assert "push-apns-key-file needs push-apns-key-id" in log
    log = _refused(Server(tmp_path / "d3", workers=2, push_apns_key_file=str(p8),
                          push_apns_key_id="K", push_apns_team_id="T",
                          push_apns_topic="org.example"))  # fmt: skip
    assert "the apns push key cannot sign" in log


def test_a_device_target_goes_with_the_device(tmp_path):
    hook = Recorder().start()
    srv, _ = start(tmp_path, push_webhook_url=f"{hook.base}/wake")
    try:

        async def main():
            creds = await srv.register(BOB)
            c = await srv.login(creds)
            await c.set_push("webhook", "tok-bob")
            assert target(srv, creds.device)["k"] == "webhook"
            await c.logout()
            await until(lambda: target(srv, creds.device) is None)
            creds = await srv.register(CAROL)
            c = await srv.login(creds)
            await c.set_push("webhook", "tok-carol")
            await c.delete_account()
            await until(lambda: target(srv, creds.device) is None)

        run(main())
    finally:
        assert srv.stop() == 0, srv.log_text()[-3000:]
        hook.stop()


# -- the node, on both codecs ------------------------------------------------------

PUSH_SAMPLES = [
    PushTarget("w1", "set", "fcm", b"registration-token", 1763833600123),
    PushTarget("w2", "set", "apns", b"ab" * 32, quiet=True),
    PushTarget("w3", "set", "webpush", b"https://fcm.googleapis.com/fcm/send/x"),
    PushTarget("w4", "remove"),
]


@pytest.mark.parametrize("event", PUSH_SAMPLES, ids=lambda e: e.id)
def test_push_node_roundtrip(impl, event):
    event.check()
    c = impl.Codec()
    back = c.decode(c.encode(event.to_node(impl.Node)))
    assert CLIENT_SENT["push"].from_node(back) == event


@pytest.mark.parametrize(
    "attrs, content, why",
    [
        ({"id": "w1", "type": "set", "kind": "sms"}, b"t", "'kind' must be one of"),
        ({"id": "w1", "type": "add", "kind": "fcm"}, b"t", "'type' must be one of"),
        ({"id": "w1", "type": "set", "kind": "fcm"}, b"", "must not be empty"),
        ({"id": "w1", "type": "set", "kind": "fcm"}, b"t" * 4097, "at most 4096 bytes"),
        ({"id": "w1", "type": "set", "kind": "fcm", "quiet": "yes"}, b"t", "'quiet' must be"),
        ({"id": "w1", "type": "set", "kind": "fcm", "mute": "-1"}, b"t", "'mute' must be"),
        ({"type": "remove"}, None, "missing attribute 'id'"),
    ],
)
def test_malformed_push_nodes_are_refused_with_200(impl, attrs, content, why):
    c = impl.Codec()
    node = c.decode(c.encode(impl.Node("push", attrs, content)))
    with pytest.raises(RemoteProtocolError) as info:
        CLIENT_SENT["push"].from_node(node)
    assert info.value.code == ErrorCode.BAD_REQUEST and why in info.value.text
    assert not info.value.fatal


def test_push_target_check_refuses_what_the_server_would():
    with pytest.raises(LocalProtocolError):
        PushTarget("w1", "set", "sms", b"t").check()
    with pytest.raises(LocalProtocolError):
        PushTarget("w1", "set", "fcm", b"").check()
    with pytest.raises(LocalProtocolError):
        PushTarget("w1", "set", "fcm", b"t", quiet="1").check()
