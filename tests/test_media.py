"""Media by link (docs/PROTOCOL.md 9b, server/media.py): real servers (chat workers
plus the media process, over TLS), real HTTP with aiohttp, the real SDK.

Grants over the chat connection (too big, quotas), uploads checked against the
grant (wrong hash refused and deleted, another file's grant, forged grants),
resume after a cut connection, Range downloads, de-duplication, expiry and the
partial purge by the server's clock, tampering seen by the recipient, path
traversal and malformed requests, kill -9 of the media process mid-upload, a
reload with an upload in progress, the metrics, and the media process's peak
RSS across a 100 MiB upload and download.  Every wait is bounded."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import ssl

import aiohttp
import pytest
from serverutil import Server, next_message, until

from pigeon.client import ServerError
from pigeon.client.media import (
    Media,
    MediaError,
    _auth,
    decrypt_file,
    encrypt_file,
    upload_file,
)
from pigeon.core.errors import ErrorCode
from pigeon.server import mediagrant

PHONES = iter(f"4917{n:08d}" for n in range(30_000_000, 30_001_000))
MiB = 1 << 20


def run(coro, timeout=180):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("media") / "data", workers=2, tls=True, media=True,
               register_per_ip=1000, media_quota_uploads=30, media_ttl=3600,
               media_partial_ttl=600, purge_interval=0.2, media_stall_timeout=5,
               media_request_rate=500)  # fmt: skip
    s.start()
    yield s
    assert s.stop() == 0


async def user(srv):
    phone = next(PHONES)
    creds = await srv.register(phone)
    return phone, await srv.login(creds)


def ctx(srv) -> ssl.SSLContext:
    return srv.ssl_context()


def objects(srv) -> list[str]:
    root = srv.data_dir / "media" / "objects"
    return sorted(p.name for p in root.glob("*/*"))


def partials(srv) -> list[str]:
    return sorted(p.name for p in (srv.data_dir / "media" / "partial").iterdir())


def media_pid(srv) -> int:
    pid = None
    for line in srv.log_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("msg") == "media ready":
            pid = rec["pid"]
    assert pid is not None
    return pid


def encrypted(tmp_path, size: int, name="f.bin"):
    """A random plaintext file and its ciphertext: (path, enc path, key, nonce, sha)."""
    src = tmp_path / name
    with open(src, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MiB)
            f.write(os.urandom(n))
            left -= n
    enc = tmp_path / (name + ".enc")
    key, nonce = os.urandom(32), os.urandom(12)
    _, enc_size, sha = encrypt_file(str(src), str(enc), key, nonce)
    return src, enc, key, nonce, sha, enc_size


async def metric(srv, name: str, label: str | None = None) -> float:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{srv.media_url}/metrics", ssl=ctx(srv)) as r:
            assert r.status == 200
            text = await r.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            if label is None or label in line:
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_send_and_download_over_tls(srv, tmp_path):
    async def main():
        pa, a = await user(srv)
        pb, b = await user(srv)
        src = tmp_path / "photo.png"
        from PIL import Image

        Image.new("RGB", (640, 480), (200, 30, 60)).save(src)
        seen = []
        ack, m = await a.send_media(
            pb, str(src), ssl=ctx(srv), progress=lambda d, t: seen.append(d)
        )
        assert m.mime == "image/png" and m.thumbnail and m.thumbnail[:2] == b"\xff\xd8"
        assert seen and seen[-1] == m.enc_size
        ev = await next_message(b)
        assert ev.type == "image" and ev.sender.partition(":")[0] == pa
        got = Media.unpack(ev.body)
        assert (
            got.url.startswith("https://")
            and got.id
            == hashlib.sha256(
                (srv.data_dir / "media" / "objects" / got.id[:2] / got.id).read_bytes()
            ).hexdigest()
        )
        out = tmp_path / "out.png"
        await b.download(ev.body, str(out), ssl=ctx(srv))
        assert out.read_bytes() == src.read_bytes()
        # forwarding reuses the link and the key: no upload, nothing more stored
        pc, c = await user(srv)
        n, uploads = len(objects(srv)), await metric(srv, "pigeon_media_bytes_in_total")
        await b.forward_media(pc, ev.body)
        fwd = await next_message(c)
        assert fwd.type == "image" and Media.unpack(fwd.body) == got
        await c.download(fwd.body, str(tmp_path / "fwd.png"), ssl=ctx(srv))
        assert (tmp_path / "fwd.png").read_bytes() == src.read_bytes()
        assert len(objects(srv)) == n
        assert await metric(srv, "pigeon_media_bytes_in_total") == uploads
        await c.close()
        # the server holds ciphertext only: the plaintext's bytes are nowhere in it
        stored = (srv.data_dir / "media" / "objects" / got.id[:2] / got.id).read_bytes()
        assert src.read_bytes()[:64] not in stored
        await a.close()
        await b.close()

    run(main())


def test_grant_refused_too_big_and_quota(srv):
    async def main():
        _, a = await user(srv)
        with pytest.raises(ServerError) as e:
            await a.request_upload(100 * MiB + 1, os.urandom(32), "video")
        assert e.value.code == ErrorCode.MEDIA_TOO_LARGE
        # ten 100 MiB grants fill the 1 GiB a day (granted bytes count, uploaded or not)
        for _ in range(10):
            g = await a.request_upload(100 * MiB, os.urandom(32), "video")
            assert g.url.startswith(srv.media_url + "/v1/upload/") and g.ttl == 600
        with pytest.raises(ServerError) as e:
            await a.request_upload(100 * MiB, os.urandom(32), "video")
        assert e.value.code == ErrorCode.MEDIA_QUOTA and "media-quota-bytes" in e.value.text
        # small grants up to media-quota-uploads (30), then 421 by count
        for _ in range(20):
            await a.request_upload(10, os.urandom(32), "document")
        with pytest.raises(ServerError) as e:
            await a.request_upload(10, os.urandom(32), "document")
        assert e.value.code == ErrorCode.MEDIA_QUOTA and "media-quota-uploads" in e.value.text
        # the next day the quota is back
        srv.advance_clock(86_401)
        await a.request_upload(100 * MiB, os.urandom(32), "video")
        await a.close()

    run(main())


def test_wrong_hash_refused_and_deleted_and_a_grant_is_good_for_one_upload(srv, tmp_path):
    async def main():
        _, a = await user(srv)
        _, enc, _, _, sha, size = encrypted(tmp_path, 300_000)
        other = bytearray(enc.read_bytes())
        other[1000] ^= 1
        bad = tmp_path / "bad.enc"
        bad.write_bytes(bytes(other))
        refused_before = await metric(srv, "pigeon_media_refusals_total", "hash mismatch")
        g = await a.request_upload(size, sha, "document")
        with pytest.raises(MediaError) as e:
            await upload_file(g.url, g.token, str(bad), ssl=ctx(srv))
        assert e.value.status == 422 and e.value.body["error"] == "hash mismatch"
        assert not any(p.startswith(sha.hex()) for p in partials(srv))
        assert sha.hex() not in objects(srv)
        assert (
            await metric(srv, "pigeon_media_refusals_total", "hash mismatch") == refused_before + 1
        )
        # the grant is spent (one upload per grant: it was sent again and again until it
        # expired, 400 MiB received for a 10 MiB grant in 1.5 s); a new one takes the bytes
        with pytest.raises(MediaError) as e:
            await upload_file(g.url, g.token, str(enc), ssl=ctx(srv))
        assert e.value.status == 403 and e.value.body["error"] == "grant used"
        g = await a.request_upload(size, sha, "document")
        done = await upload_file(g.url, g.token, str(enc), ssl=ctx(srv))
        assert done["id"] == sha.hex() and sha.hex() in objects(srv)
        # a stored grant's upload answers its 201 again and receives nothing more
        bytes_in = await metric(srv, "pigeon_media_bytes_in_total")
        async with aiohttp.ClientSession() as s:
            async with s.head(g.url, headers=_auth(g.token), ssl=ctx(srv)) as r:
                assert int(r.headers["Upload-Offset"]) == size
            for body in (enc.read_bytes(), bytes(other)):
                async with s.put(g.url, data=body, headers=_auth(g.token), ssl=ctx(srv)) as r:
                    assert r.status == 201 and await r.json() == done
        assert await upload_file(g.url, g.token, str(enc), ssl=ctx(srv)) == done
        assert await metric(srv, "pigeon_media_bytes_in_total") == bytes_in
        await a.close()

    run(main())


def test_grant_bound_to_hash_account_and_time(srv, tmp_path):
    async def main():
        phone, a = await user(srv)
        _, enc, _, _, sha, size = encrypted(tmp_path, 1000)
        g = await a.request_upload(size, sha, "document")
        async with aiohttp.ClientSession() as s:
            other = f"{srv.media_url}/v1/upload/{hashlib.sha256(b'x').hexdigest()}"
            async with s.head(other, headers=_auth(g.token), ssl=ctx(srv)) as r:
                assert r.status == 403  # a grant for another file
            # another account's name in the grant breaks its MAC
            forged = bytearray(g.token)
            i = bytes(forged).rindex(phone.encode())
            forged[i + len(phone) - 1] ^= 1
            async with s.put(g.url, data=b"x", headers=_auth(bytes(forged)), ssl=ctx(srv)) as r:
                assert r.status == 403
                assert "not a grant" in (await r.json())["why"]
            async with s.head(g.url, headers=_auth(bytes(forged)), ssl=ctx(srv)) as r:
                assert r.status == 403 and "not a grant" in r.headers["Media-Error"]
            async with s.head(g.url, ssl=ctx(srv)) as r:
                assert r.status == 401
            async with s.put(g.url, data=b"x" * 10, headers={**_auth(g.token),
                             "Content-Range": "bytes 0-9/5"}, ssl=ctx(srv)) as r:  # fmt: skip
                assert r.status == 400
            async with s.put(g.url, data=b"x" * (size + 1), headers=_auth(g.token),
                             ssl=ctx(srv)) as r:  # fmt: skip
                assert r.status == 413
        srv.advance_clock(601)  # past media-grant-ttl
        with pytest.raises(MediaError) as e:
            await upload_file(g.url, g.token, str(enc), ssl=ctx(srv))
        assert e.value.status == 403 and "expired" in e.value.body["why"]
        await a.close()

    run(main())


def test_resume_after_cut_connection(srv, tmp_path):
    async def main():
        _, a = await user(srv)
        _, enc, _, _, sha, size = encrypted(tmp_path, 6 * MiB)
        g = await a.request_upload(size, sha, "video")

        async def half():
            with open(enc, "rb") as f:
                yield f.read(3 * MiB)
            await asyncio.sleep(0.3)
            raise ConnectionResetError("cut")  # the client drops the connection

        async with aiohttp.ClientSession() as s:
            with pytest.raises((aiohttp.ClientError, ConnectionResetError)):
                async with s.put(
                    g.url,
                    data=half(),
                    ssl=ctx(srv),
                    headers={**_auth(g.token), "Content-Length": str(size)},
                ):
                    pass  # fmt: skip
        await until(lambda: any(p.startswith(sha.hex()) for p in partials(srv)))
        async with aiohttp.ClientSession() as s:

            async def offset():
                async with s.head(g.url, headers=_auth(g.token), ssl=ctx(srv)) as r:
                    return int(r.headers["Upload-Offset"])

            deadline = asyncio.get_running_loop().time() + 10
            while (
                have := await offset()
            ) < 3 * MiB and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.1)
            assert 0 < have <= 3 * MiB
            # a part at the wrong offset is refused with the right one
            async with s.put(g.url, data=b"x", ssl=ctx(srv), headers={
                    **_auth(g.token), "Content-Range": f"bytes 0-0/{size}"}) as r:  # fmt: skip
                assert r.status == 416 and (await r.json())["offset"] == have
        sent = []
        done = await upload_file(g.url, g.token, str(enc), ssl=ctx(srv),
                                 progress=lambda d, t: sent.append(d))  # fmt: skip
        assert done["id"] == sha.hex()
        assert sent[-1] - have == size - have and min(sent) > have  # resumed, not restarted
        stored = srv.data_dir / "media" / "objects" / sha.hex()[:2] / sha.hex()
        assert stored.read_bytes() == enc.read_bytes()
        assert oct(stored.stat().st_mode & 0o777) == "0o600"
        await a.close()

    run(main())


def test_range_download_and_refusals(srv, tmp_path):
    async def main():
        _, a = await user(srv)
        _, enc, _, _, sha, size = encrypted(tmp_path, 200_000)
        g = await a.request_upload(size, sha, "document")
        done = await upload_file(g.url, g.token, str(enc), ssl=ctx(srv))
        url = srv.media_url + done["path"]
        tok = mediagrant.unb64(done["token"])
        data = enc.read_bytes()
        async with aiohttp.ClientSession() as s:
            async with s.get(url, headers={**_auth(tok), "Range": "bytes=1000-1999"},
                             ssl=ctx(srv)) as r:  # fmt: skip
                assert r.status == 206 and await r.read() == data[1000:2000]
                assert r.headers["Content-Range"] == f"bytes 1000-1999/{size}"
            async with s.get(url, headers={**_auth(tok), "Range": f"bytes={size - 10}-"},
                             ssl=ctx(srv)) as r:  # fmt: skip
                assert r.status == 206 and await r.read() == data[-10:]
            async with s.get(url, headers={**_auth(tok), "Range": f"bytes={size + 5}-"},
                             ssl=ctx(srv)) as r:  # fmt: skip
                assert r.status == 416
            async with s.get(url, headers=_auth(g.token), ssl=ctx(srv)) as r:
                assert r.status == 403  # an upload grant is not a download token
            async with s.get(url, headers=_auth(os.urandom(32)), ssl=ctx(srv)) as r:
                assert r.status == 403
            async with s.get(url, ssl=ctx(srv)) as r:
                assert r.status == 401 and (await r.json())["error"] == "missing token"
            # the token is not derived from the hash alone
            assert tok != hashlib.sha256(sha).digest() and tok != sha
            for path in ("/v1/media/../../media.key", "/v1/media/..%2F..%2Fmedia.key",
                         "/v1/media/%2e%2e/%2e%2e/media.key", "/v1/media/" + "A" * 64,
                         "/v1/upload/..%2fobjects", "/v1/nothing"):  # fmt: skip
                async with s.get(srv.media_url + path, headers=_auth(tok),
                                 ssl=ctx(srv)) as r:  # fmt: skip
                    assert r.status in (404, 405), path
                    assert "error" in await r.json(content_type=None)
            async with s.get(srv.media_url + "/v1/health", ssl=ctx(srv)) as r:
                assert (await r.json()) == {"status": "ready"}
        await a.close()

    run(main())


def test_dedup_expiry_and_partial_purge(srv, tmp_path):
    async def main():
        _, a = await user(srv)
        _, b = await user(srv)
        _, enc, _, _, sha, size = encrypted(tmp_path, 500_000)
        ga = await a.request_upload(size, sha, "document")
        da = await upload_file(ga.url, ga.token, str(enc), ssl=ctx(srv))
        n = len(objects(srv))
        gb = await b.request_upload(size, sha, "document")
        async with aiohttp.ClientSession() as s:
            async with s.head(gb.url, headers=_auth(gb.token), ssl=ctx(srv)) as r:
                assert r.headers["Upload-Offset"] == "0"  # knowing the hash is no shortcut
        sent = []
        db = await upload_file(gb.url, gb.token, str(enc), ssl=ctx(srv),
                               progress=lambda d, t: sent.append(d))  # fmt: skip
        assert sent[-1] == size and db["id"] == da["id"] and db["token"] == da["token"]
        assert len(objects(srv)) == n  # stored once
        assert await metric(srv, "pigeon_media_uploads_completed_total", 'stored="existing"') >= 1
        # a partial upload of another file, left there
        _, enc2, _, _, sha2, size2 = encrypted(tmp_path, 100_000, "g.bin")
        g2 = await a.request_upload(size2, sha2, "document")
        async with aiohttp.ClientSession() as s:
            async with s.put(
                g2.url,
                data=enc2.read_bytes()[:50_000],
                ssl=ctx(srv),
                headers={**_auth(g2.token), "Content-Range": f"bytes 0-49999/{size2}"},
            ) as r:
                assert r.status == 202 and (await r.json())["offset"] == 50_000  # fmt: skip
        assert any(p.startswith(sha2.hex()) for p in partials(srv))
        srv.advance_clock(601)  # past media-partial-ttl, not media-ttl
        await until(lambda: not any(p.startswith(sha2.hex()) for p in partials(srv)))
        assert sha.hex() in objects(srv)
        # a re-upload renews the file's life: 3,000 s after it, 3,601 s after the first
        srv.advance_clock(2400)
        g3 = await a.request_upload(size, sha, "document")
        await upload_file(g3.url, g3.token, str(enc), ssl=ctx(srv))
        srv.advance_clock(3000)
        await asyncio.sleep(1.0)  # several purges (purge-interval 0.2 s)
        assert sha.hex() in objects(srv)
        srv.advance_clock(700)
        await until(lambda: sha.hex() not in objects(srv))
        async with aiohttp.ClientSession() as s:
            async with s.get(
                srv.media_url + da["path"],
                headers=_auth(mediagrant.unb64(da["token"])),
                ssl=ctx(srv),
            ) as r:
                assert r.status == 404  # fmt: skip
        await a.close()
        await b.close()

    run(main())


def test_tampered_ciphertext_detected(srv, tmp_path):
    async def main():
        pa, a = await user(srv)
        pb, b = await user(srv)
        src = tmp_path / "doc.txt"
        src.write_bytes(os.urandom(100_000))
        _, m = await a.send_media(pb, str(src), ssl=ctx(srv))
        ev = await next_message(b)
        stored = srv.data_dir / "media" / "objects" / m.id[:2] / m.id
        raw = bytearray(stored.read_bytes())
        raw[500] ^= 0x80
        stored.write_bytes(bytes(raw))
        out = tmp_path / "out.txt"
        with pytest.raises(MediaError, match="hash does not match"):
            await b.download(ev.body, str(out), ssl=ctx(srv))
        assert not out.exists()
        # a ciphertext whose hash the attacker also changed: GCM's tag refuses it
        enc = tmp_path / "t.enc"
        enc.write_bytes(bytes(raw))
        with pytest.raises(MediaError, match="tampered"):
            decrypt_file(str(enc), str(tmp_path / "t.out"), m.key, m.nonce)
        assert not (tmp_path / "t.out").exists()
        await a.close()
        await b.close()

    run(main())


def test_metrics_are_for_loopback_and_count(srv, tmp_path):
    async def main():
        before = await metric(srv, "pigeon_media_bytes_in_total")
        _, a = await user(srv)
        _, enc, _, _, sha, size = encrypted(tmp_path, 123_456)
        g = await a.request_upload(size, sha, "document")
        await upload_file(g.url, g.token, str(enc), ssl=ctx(srv))
        assert await metric(srv, "pigeon_media_bytes_in_total") == before + size
        assert await metric(srv, "pigeon_media_stored_bytes") >= size
        assert await metric(srv, "pigeon_media_uploads_in_progress") == 0
        await a.close()

    run(main())


def test_kill_media_mid_upload_then_resume(srv, tmp_path):
    async def main():
        _, a = await user(srv)
        _, enc, _, _, sha, size = encrypted(tmp_path, 8 * MiB)
        g = await a.request_upload(size, sha, "video")
        pid = media_pid(srv)

        async def slow():
            with open(enc, "rb") as f:
                yield f.read(2 * MiB)
                await asyncio.sleep(0.5)
                os.kill(pid, signal.SIGKILL)
                await asyncio.sleep(0.5)
                yield f.read()

        async with aiohttp.ClientSession() as s:
            with pytest.raises((aiohttp.ClientError, ConnectionError)):
                async with s.put(
                    g.url,
                    data=slow(),
                    ssl=ctx(srv),
                    headers={**_auth(g.token), "Content-Length": str(size)},
                ):
                    pass  # fmt: skip
        assert sha.hex() not in objects(srv)  # no partial file at a final name
        await until(lambda: media_pid(srv) != pid, timeout=20)
        # the supervisor's lines name it the media process (they said "worker 2": the
        # index after the 2 workers', though it serves no chats)
        recs = [json.loads(ln) for ln in srv.log_text().splitlines() if ln.startswith("{")]
        assert not [r for r in recs if r.get("worker") == 2 or "worker 2" in r["msg"]]
        started = [r for r in recs if r["msg"] == "media process started"]
        assert pid in [r["pid"] for r in started] and media_pid(srv) == started[-1]["pid"]
        restart = [r for r in recs if r["msg"] == "media process exited; restarting"]
        assert restart and all(r.get("process") == "media" for r in started + restart)
        done = await upload_file(g.url, g.token, str(enc), ssl=ctx(srv), attempts=20)
        assert done["id"] == sha.hex()
        stored = srv.data_dir / "media" / "objects" / sha.hex()[:2] / sha.hex()
        assert stored.read_bytes() == enc.read_bytes()
        await a.close()

    run(main())


def test_reload_with_upload_in_progress(srv, tmp_path):
    async def main():
        _, a = await user(srv)
        _, enc, _, _, sha, size = encrypted(tmp_path, 4 * MiB)
        g = await a.request_upload(size, sha, "video")
        old = media_pid(srv)

        async def slow():
            with open(enc, "rb") as f:
                while chunk := f.read(256 << 10):
                    yield chunk
                    await asyncio.sleep(0.1)

        async def put():
            async with aiohttp.ClientSession() as s:
                async with s.put(
                    g.url,
                    data=slow(),
                    ssl=ctx(srv),
                    headers={**_auth(g.token), "Content-Length": str(size)},
                ) as r:
                    return r.status  # fmt: skip

        task = asyncio.create_task(put())
        await asyncio.sleep(0.5)
        os.kill(srv.proc.pid, signal.SIGHUP)
        await until(lambda: media_pid(srv) != old, timeout=30)
        status = await task  # finished by the draining old process (about 1.6 s of 8)
        assert status == 201
        assert sha.hex() in objects(srv)
        # the new generation serves it
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{srv.media_url}/v1/health", ssl=ctx(srv)) as r:
                assert r.status == 200
        await until(lambda: not os.path.exists(f"/proc/{old}"), timeout=20)
        await a.close()

    run(main())


def rss_peak_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.slow
def test_100_mib_streamed_with_bounded_memory(srv, tmp_path):
    """The media process's peak RSS (VmHWM) grows by far less than the file's size
    across a 100 MiB upload and download (bound: 40 MiB; measured: a few MiB)."""

    async def main():
        pa, a = await user(srv)
        pb, b = await user(srv)
        src = tmp_path / "big.bin"
        with open(src, "wb") as f:
            for _ in range(100):
                f.write(os.urandom(MiB - 16 if _ == 99 else MiB))  # 100 MiB with the tag
        pid = media_pid(srv)
        # warm up: a small transfer first, so the baseline holds aiohttp's buffers
        small = tmp_path / "small.bin"
        small.write_bytes(os.urandom(MiB))
        await a.send_media(pb, str(small), ssl=ctx(srv))
        await b.download((await next_message(b)).body, str(tmp_path / "small.out"), ssl=ctx(srv))
        base = rss_peak_kib(pid)
        _, m = await a.send_media(pb, str(src), ssl=ctx(srv))
        assert m.enc_size == 100 * MiB
        ev = await next_message(b)
        out = tmp_path / "big.out"
        await b.download(ev.body, str(out), ssl=ctx(srv))
        grown = rss_peak_kib(pid) - base
        print(f"media process peak RSS: {base} KiB before, grew {grown} KiB over 100 MiB")
        assert grown < 40 * 1024
        with open(src, "rb") as f1, open(out, "rb") as f2:
            while True:
                x, y = f1.read(MiB), f2.read(MiB)
                assert x == y
                if not x:
                    break
        await a.close()
        await b.close()

    run(main(), timeout=300)


def test_resumed_parts_go_on_from_the_kept_hash_state(srv, tmp_path):
    """A resume hashed the whole partial file again: after 90 MiB each 1-byte part cost
    86 ms of the media process's CPU (at media-request-rate).  Parts now go on from the
    SHA-256 state the previous part left (pigeon_media_rehashed_bytes stays put); only
    a resume without one, after the process restarted, reads the partial again."""

    async def main():
        _, a = await user(srv)
        _, enc, _, _, sha, size = encrypted(tmp_path, 4 * MiB)
        data = enc.read_bytes()
        g = await a.request_upload(size, sha, "video")
        before = await metric(srv, "pigeon_media_rehashed_bytes_total")
        async with aiohttp.ClientSession() as s:

            async def part(start, end):
                h = {**_auth(g.token), "Content-Range": f"bytes {start}-{end - 1}/{size}"}
                async with s.put(g.url, data=data[start:end], headers=h, ssl=ctx(srv)) as r:
                    return r.status

            assert await part(0, MiB) == 202
            for i in range(1, 3):  # more parts, 1 byte and 1 MiB: nothing hashed again
                assert await part(i * MiB, i * MiB + 1) == 202
                assert await part(i * MiB + 1, (i + 1) * MiB) == 202
            assert await metric(srv, "pigeon_media_rehashed_bytes_total") == before
            pid = media_pid(srv)
            os.kill(pid, signal.SIGKILL)
            await until(lambda: media_pid(srv) != pid, timeout=20)
        async with aiohttp.ClientSession() as s:
            for _ in range(100):  # (the new process listens once it said ready)
                try:
                    async with s.get(f"{srv.media_url}/v1/health", ssl=ctx(srv)) as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)

            async def part(start, end):
                h = {**_auth(g.token), "Content-Range": f"bytes {start}-{end - 1}/{size}"}
                async with s.put(g.url, data=data[start:end], headers=h, ssl=ctx(srv)) as r:
                    return r.status

            assert await part(3 * MiB, 3 * MiB + 10) == 202  # no state kept: hashed once
            assert await metric(srv, "pigeon_media_rehashed_bytes_total") == 3 * MiB
            assert await part(3 * MiB + 10, size) == 201
            assert await metric(srv, "pigeon_media_rehashed_bytes_total") == 3 * MiB
        stored = srv.data_dir / "media" / "objects" / sha.hex()[:2] / sha.hex()
        assert stored.read_bytes() == data
        await a.close()

    run(main())


def test_connections_are_capped_and_must_send_their_headers_in_time(tmp_path):
    """Unauthenticated connections to the media port were held without limit, idle or
    sending headers slowly, for aiohttp's default hour: 300 of them with 100 headers of
    8 KB each took the media process from 48 to 531 MB.  Now media-connections-per-ip
    and media-connections are closed at once past them, a connection has
    media-header-timeout to send its headers, and headers are capped in count.
    Past media-connections a new one takes the place of the longest-idle one (32
    addresses filled the 1,024 with connections that never finished a request:
    every other client was refused for media-header-timeout at a time); only when
    every one is in the middle of a request is the new one closed."""
    s = Server(tmp_path / "data", workers=1, media=True, media_connections=6,
               media_connections_per_ip=4, media_header_timeout=4, media_max_headers=8)  # fmt: skip
    s.start()
    head = b"GET /v1/health HTTP/1.1\r\nHost: x\r\n"

    async def connect(src):
        r, w = await asyncio.open_connection("127.0.0.1", s.media_port, local_addr=(src, 0))
        w.write(head)  # and never the blank line
        return r, w

    async def closed(r, timeout):
        try:
            return await asyncio.wait_for(r.read(), timeout) == b""
        except ConnectionError:  # closed with a reset
            return True
        except TimeoutError:
            return False

    async def refusals(reason):
        conn = aiohttp.TCPConnector(local_addr=("127.0.0.9", 0))
        async with aiohttp.ClientSession(connector=conn) as c:
            async with c.get(f"{s.media_url}/metrics") as r:
                text = await r.text()
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
                   if ln.startswith("pigeon_media_refusals_total") and f'"{reason}"' in ln)  # fmt: skip

    async def main():
        await until(lambda: "media ready" in s.log_text(), timeout=20)
        held = [await connect("127.0.0.1") for _ in range(4)]
        r5, _ = await connect("127.0.0.1")
        assert await closed(r5, 5)  # the fifth from one address: closed at once
        assert await refusals("connections per ip") == 1
        held += [await connect("127.0.0.2") for _ in range(2)]
        r7, w7 = await connect("127.0.0.3")  # the seventh in all: the longest-idle goes
        assert await closed(held[0][0], 2)  # well before its header timeout (4 s)
        # r7's, and the metrics request's own (it pushed out the next-longest idle)
        assert await refusals("idle connection closed") == 2
        assert not await closed(r7, 0.5)
        held = held[1:] + [(r7, w7)]
        for r, _ in held:  # media-header-timeout: every one is closed
            assert await closed(r, 10)
        assert await refusals("connections") == 0
        r, w = await asyncio.open_connection("127.0.0.1", s.media_port)
        w.write(head + b"".join(b"X-%d: y\r\n" % i for i in range(9)) + b"\r\n")
        assert b" 400 " in await asyncio.wait_for(r.readline(), 5)  # too many headers
        w.close()
        async with aiohttp.ClientSession() as c:  # and a client is served again
            async with c.get(f"{s.media_url}/v1/health") as resp:
                assert resp.status == 200
        for _, w in held:
            w.close()

    try:
        run(main(), timeout=60)
    finally:
        assert s.stop() == 0


def test_head_of_a_download_and_content_range_digits(srv, tmp_path):
    """HEAD /v1/media/{id} (documented with GET) was 405: aiohttp's GET route has no HEAD.
    A Content-Range in another script's digits ('bytes ٠-٠/N', Arabic-Indic) was read as
    0-0 (re's \\d and int() take any decimal digit): it is 400 now, as any malformed one."""

    async def main():
        _, a = await user(srv)
        _, enc, _, _, sha, size = encrypted(tmp_path, 5000)
        g = await a.request_upload(size, sha, "document")
        async with aiohttp.ClientSession() as s:
            h = {**_auth(g.token), "Content-Range": f"bytes \u0660-\u0660/{size}"}
            async with s.put(g.url, data=b"x", headers=h, ssl=ctx(srv)) as r:
                assert r.status == 400 and (await r.json())["error"] == "malformed Content-Range"
            done = await upload_file(g.url, g.token, str(enc), ssl=ctx(srv))
            url = srv.media_url + done["path"]
            tok = mediagrant.unb64(done["token"])
            async with s.head(url, headers=_auth(tok), ssl=ctx(srv)) as r:
                assert r.status == 200 and r.headers["Content-Length"] == str(size)
            async with s.head(url, headers=_auth(os.urandom(32)), ssl=ctx(srv)) as r:
                assert r.status == 403
        await a.close()

    run(main())


def test_an_upload_that_would_leave_less_than_the_disk_reserve_is_507(tmp_path):
    """Uploads had no bound but the per-account quotas, and a full disk was a 500 (and the
    chat store's LMDB, on the same disk, fails its writes).  With media-disk-reserve
    above what the disk has free, every upload is 507 and nothing is written."""
    st = os.statvfs(tmp_path)
    free = st.f_bavail * st.f_frsize
    s = Server(tmp_path / "data", workers=1, media=True, media_disk_reserve=free + (1 << 40))
    s.start()

    async def main():
        await until(lambda: "media ready" in s.log_text(), timeout=20)
        creds = await s.register("491790000001")
        a = await s.login(creds)
        data = os.urandom(100_000)
        g = await a.request_upload(len(data), hashlib.sha256(data).digest(), "document")
        with pytest.raises(MediaError) as e:
            await upload_file(g.url, g.token, str(_write(tmp_path / "f", data)))
        assert e.value.status == 507 and e.value.body["limit"] == "media-disk-reserve"
        assert not list((s.data_dir / "media" / "partial").iterdir())
        await a.close()

    try:
        run(main(), timeout=60)
    finally:
        assert s.stop() == 0


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_an_upload_trickling_bytes_is_cut_and_resumes(tmp_path):
    """A PUT sending one byte every media-stall-timeout - 0.5 s was held as long as its
    sender liked (30 s in the probe, when it gave up): its connection, its transfer
    slot and its partial file.  Less than media-min-upload-rate over a stall window is
    now 408 with the offset held; the upload resumes from there."""
    s = Server(tmp_path / "data", workers=1, media=True, media_stall_timeout=1,
               media_min_upload_rate=1000)  # fmt: skip
    s.start()

    async def main():
        await until(lambda: "media ready" in s.log_text(), timeout=20)
        creds = await s.register("491790000002")
        a = await s.login(creds)
        data = os.urandom(50_000)
        sha = hashlib.sha256(data).digest()
        g = await a.request_upload(len(data), sha, "document")
        r, w = await asyncio.open_connection("127.0.0.1", s.media_port)
        w.write(f"PUT /v1/upload/{sha.hex()} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                f"{mediagrant.b64(g.token)}\r\nContent-Length: {len(data)}\r\n\r\n".encode())  # fmt: skip
        answer, sent = b"", 0
        for _ in range(40):  # a byte every 0.25 s, for at most 10 s
            w.write(data[sent : sent + 1])
            sent += 1
            try:
                answer = await asyncio.wait_for(r.read(4096), 0.25)
            except TimeoutError:
                continue
            break
        w.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b'"too slow"' in answer and b'"media-min-upload-rate"' in answer
        done = await upload_file(g.url, g.token, str(_write(tmp_path / "f", data)))
        assert done["id"] == sha.hex()
        await a.close()

    try:
        run(main(), timeout=60)
    finally:
        assert s.stop() == 0


def test_a_tls_handshake_gets_the_header_timeout(tmp_path):
    """A TLS connection that never sent a ClientHello was held for asyncio's 60 s
    handshake timeout."""
    s = Server(tmp_path / "data", workers=1, tls=True, media=True, media_header_timeout=1)
    s.start()

    async def main():
        await until(lambda: "media ready" in s.log_text(), timeout=20)
        r, w = await asyncio.open_connection("127.0.0.1", s.media_port)  # no TLS from us
        try:
            assert await asyncio.wait_for(r.read(), 15) == b""
        except ConnectionError:
            pass  # closed with a reset: closed too
        w.close()

    try:
        run(main(), timeout=60)
    finally:
        assert s.stop() == 0


def test_tls_handshakes_count_from_the_accept(tmp_path):
    """A TLS connection was counted only once its handshake was done: 3,000 that never
    sent a ClientHello, from one address, were all held (media RSS 49 -> 473 MB) for
    media-header-timeout.  Now they count against media-connections-per-ip from the
    accept, and a stalled handshake is pushed out like an idle connection when the
    service is full."""
    s = Server(tmp_path / "data", workers=1, tls=True, media=True, media_connections=8,
               media_connections_per_ip=4, media_header_timeout=30)  # fmt: skip
    s.start()

    async def silent(src):
        r, w = await asyncio.open_connection("127.0.0.1", s.media_port, local_addr=(src, 0))
        return r, w

    async def closed(r, timeout):
        try:
            return await asyncio.wait_for(r.read(), timeout) == b""
        except ConnectionError:
            return True
        except TimeoutError:
            return False

    async def main():
        await until(lambda: "media ready" in s.log_text(), timeout=20)
        held = [await silent("127.0.0.1") for _ in range(4)]
        extra = [await silent("127.0.0.1") for _ in range(4)]
        for r, _ in extra:  # past media-connections-per-ip: closed at once, no handshake
            assert await closed(r, 5)
        for r, _ in held:  # the four within it wait for their ClientHello
            assert not await closed(r, 0.2)
        held += [await silent(f"127.0.0.{i}") for i in (2, 2, 2, 2)]  # 8: the service is full
        conn = aiohttp.TCPConnector(local_addr=("127.0.0.3", 0), ssl=s.ssl_context())
        async with aiohttp.ClientSession(connector=conn) as c:  # a client is still served
            async with c.get(f"{s.media_url}/v1/health") as resp:
                assert resp.status == 200
        assert await closed(held[0][0], 5)  # the longest-stalled handshake made room
        for _, w in held + extra:
            w.close()

    try:
        run(main(), timeout=60)
    finally:
        assert s.stop() == 0


def test_a_finished_upload_heads_its_size_and_a_put_again_is_201_with_the_token(srv, tmp_path):
    # PROTOCOL.md 9b "Resume" and "One upload per grant": a client whose 201 was lost
    # asks HEAD (its grant's upload is stored: the whole size) and PUTs the rest (none),
    # or PUTs it all again: the same 201, nothing received
    async def main():
        _, a = await user(srv)
        _, enc, _, _, sha, size = encrypted(tmp_path, 100_000)
        g = await a.request_upload(size, sha, "document")
        done = await upload_file(g.url, g.token, str(enc), ssl=ctx(srv))
        n = len(objects(srv))
        async with aiohttp.ClientSession() as s:
            async with s.head(g.url, headers=_auth(g.token), ssl=ctx(srv)) as r:
                assert r.status == 200 and r.headers["Upload-Offset"] == str(size)
                assert r.headers["Upload-Length"] == str(size)
            async with s.put(g.url, data=enc.read_bytes(), headers=_auth(g.token),
                             ssl=ctx(srv)) as r:  # fmt: skip
                assert r.status == 201
                assert (await r.json())["token"] == done["token"]
        assert len(objects(srv)) == n  # stored once
        await a.close()

    run(main())


async def _stored(srv, tmp_path):
    _, a = await user(srv)
    _, enc, _, _, sha, size = encrypted(tmp_path, 10_000)
    g = await a.request_upload(size, sha, "document")
    done = await upload_file(g.url, g.token, str(enc), ssl=ctx(srv))
    await a.close()
    return srv.media_url + done["path"], mediagrant.unb64(done["token"]), size


def test_head_of_a_media_file_answers_as_get_does(srv, tmp_path):
    async def main():
        url, tok, size = await _stored(srv, tmp_path)
        async with aiohttp.ClientSession() as s:
            async with s.head(url, headers=_auth(tok), ssl=ctx(srv)) as r:
                assert r.status == 200 and r.headers["Content-Length"] == str(size)

    run(main())


def test_a_range_past_the_end_is_416_with_a_json_body(srv, tmp_path):
    async def main():
        url, tok, size = await _stored(srv, tmp_path)
        async with aiohttp.ClientSession() as s:
            async with s.get(url, headers={**_auth(tok), "Range": f"bytes={size + 5}-"},
                             ssl=ctx(srv)) as r:  # fmt: skip
                assert r.status == 416
                assert "error" in await r.json(content_type=None)
                assert r.headers["Content-Range"] == f"bytes */{size}"

    run(main())


def test_an_empty_suffix_range_is_416_with_a_json_body(srv, tmp_path):
    """``Range: bytes=-0`` selects no byte (RFC 9110 14.1.1): aiohttp reads it as
    ``bytes=0-`` and answered 206 with the whole file."""

    async def main():
        url, tok, size = await _stored(srv, tmp_path)
        async with aiohttp.ClientSession() as s:
            for rng in ("bytes=-0", "BYTES=-000"):
                async with s.get(url, headers={**_auth(tok), "Range": rng},
                                 ssl=ctx(srv)) as r:  # fmt: skip
                    assert r.status == 416, rng
                    body = await r.json(content_type=None)
                    assert body["error"] == "empty suffix range" and body["size"] == size
                    assert r.headers["Content-Range"] == f"bytes */{size}"
            # a suffix that is not empty is the file's tail
            async with s.get(url, headers={**_auth(tok), "Range": "bytes=-10"},
                             ssl=ctx(srv)) as r:  # fmt: skip
                assert r.status == 206 and len(await r.read()) == 10
                assert r.headers["Content-Range"] == f"bytes {size - 10}-{size - 1}/{size}"

    run(main())


def test_a_416_under_if_range_has_a_json_body(srv, tmp_path):
    """With ``If-Range`` the service left the Range to aiohttp, whose 416 has no body.
    An If-Range date older than the file makes the Range ignored: 200, whole file."""

    async def main():
        url, tok, size = await _stored(srv, tmp_path)
        now = "Fri, 31 Dec 2100 23:59:59 GMT"  # (after the file's mtime: the Range holds)
        old = "Thu, 01 Jan 1998 00:00:00 GMT"
        async with aiohttp.ClientSession() as s:
            for rng in (f"bytes={size + 5}-", "bytes=-0"):
                h = {**_auth(tok), "Range": rng, "If-Range": now}
                async with s.get(url, headers=h, ssl=ctx(srv)) as r:
                    assert r.status == 416, rng
                    assert "error" in await r.json(content_type=None)
                    assert r.headers["Content-Range"] == f"bytes */{size}"
                h["If-Range"] = old
                async with s.get(url, headers=h, ssl=ctx(srv)) as r:
                    assert r.status == 200 and len(await r.read()) == size
            h = {**_auth(tok), "Range": "bytes=0-9", "If-Range": now}
            async with s.get(url, headers=h, ssl=ctx(srv)) as r:
                assert r.status == 206 and len(await r.read()) == 10

    run(main())


def test_a_payload_of_wrong_types_or_sizes_is_not_media_and_a_big_one_is_not_fetched(tmp_path):
    """A peer's payload is the sender's word: fields of the wrong type ("size": "huge",
    "name": 7) reached the chat's rendering and ended it, and a claimed 120 MiB was
    downloaded to the disk before the hash check (probe6)."""
    import msgpack

    from pigeon.client.media import DOWNLOAD_MAX, Media, MediaError, download

    good = {"v": 1, "url": "http://127.0.0.1:9/x", "id": "ab" * 32, "token": b"t",
            "key": b"k" * 32, "nonce": b"n" * 12, "sha256": b"s" * 32, "size": 10,
            "enc_size": 26, "mime": "text/plain", "name": "x.txt"}  # fmt: skip
    assert Media.unpack(msgpack.packb(good)).size == 10
    for bad in (
        {"size": "huge"},
        {"name": 7},
        {"url": 5},
        {"token": "t"},
        {"thumb": 3},
        {"enc_size": 27},
        {"size": -16, "enc_size": 0},
        {"size": True},
    ):
        with pytest.raises(MediaError, match="not a media payload"):
            Media.unpack(msgpack.packb({**good, **bad}))
    big = Media.unpack(msgpack.packb({**good, "size": DOWNLOAD_MAX, "enc_size": DOWNLOAD_MAX + 16}))
    with pytest.raises(MediaError, match="more than this client downloads"):
        run(download(big, str(tmp_path / "out")))  # (refused before any request)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])  # sendfile(2), and copied
def test_a_download_holds_its_transfer_slot_and_a_stalled_one_is_cut(tmp_path, loop):
    """probe8: a download's body went out after the per-address guard had given
    its slot back (24 at once from one address against media-transfers-per-ip
    16), and one whose reader stopped reading held its connection for the whole
    deadline (media-stall-timeout plus size / media-min-download-rate: 350 s for
    20 MiB), so a few addresses filled every media connection.  Now a download
    counts until its body is sent, and it is cut after media-stall-timeout
    without progress; its slot comes back either way."""
    s = Server(tmp_path / "data", workers=1, media=True, media_stall_timeout=1,
               media_transfers_per_ip=2, media_min_download_rate=1000,
               media_loop=loop)  # fmt: skip
    s.start()

    async def stalled_get(url_path: str, token: bytes):
        r, w = await asyncio.open_connection("127.0.0.1", s.media_port)
        w.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        w.write(f"GET {url_path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                f"{mediagrant.b64(token)}\r\n\r\n".encode())  # fmt: skip
        await w.drain()
        return r, w  # and never read

    async def refusals(reason: str) -> float:
        async with aiohttp.ClientSession() as h:
            async with h.get(f"http://127.0.0.1:{s.media_port}/metrics") as resp:
                text = await resp.text()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("pigeon_media_refusals_total") and f'"{reason}"' in line)  # fmt: skip

    async def main():
        await until(lambda: "media ready" in s.log_text(), timeout=20)
        a = await s.login(await s.register("491790000003"))
        data = os.urandom(24 * MiB)  # far past what the socket buffers hold
        sha = hashlib.sha256(data).digest()
        g = await a.request_upload(len(data), sha, "document")
        done = await upload_file(g.url, g.token, str(_write(tmp_path / "f", data)))
        token = mediagrant.unb64(done["token"])
        url = f"http://127.0.0.1:{s.media_port}{done['path']}"
        held = [await stalled_get(done["path"], token) for _ in range(2)]
        await asyncio.sleep(0.3)  # both are in their body
        async with aiohttp.ClientSession() as h:
            async with h.get(url, headers=_auth(token)) as resp:
                assert resp.status == 429, resp.status
                assert "media-transfers-per-ip" in await resp.text()
        # each is cut a stall timeout after its reader stopped (its deadline is hours)
        for _ in range(150):
            if await refusals("download stalled") >= 2:
                break
            await asyncio.sleep(0.1)
        assert await refusals("download stalled") == 2
        for _, w in held:
            w.close()
        async with aiohttp.ClientSession() as h:  # the slots came back
            for _ in range(2):
                async with h.get(url, headers=_auth(token)) as resp:
                    assert resp.status == 200
                    assert hashlib.sha256(await resp.read()).digest() == sha
        await a.close()

    try:
        run(main(), timeout=90)
    finally:
        assert s.stop() == 0


def test_past_the_request_rate_the_connection_is_closed(tmp_path):
    """Requests pipelined past media-request-rate were each answered 429 (probe8:
    430,000 answers in 3 s to 62 connections that read nothing); the first 429
    now closes the connection."""
    s = Server(tmp_path / "data", workers=1, media=True, media_request_rate=5)
    s.start()

    async def main():
        await until(lambda: "media ready" in s.log_text(), timeout=20)
        r, w = await asyncio.open_connection("127.0.0.1", s.media_port)
        w.write(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n" * 200)
        await w.drain()
        got = b""
        while True:
            chunk = await asyncio.wait_for(r.read(65536), 10)
            if not chunk:
                break  # closed by the server
            got += chunk
        w.close()
        assert got.count(b"HTTP/1.1 429") == 1, got.count(b"HTTP/1.1 429")
        assert 1 <= got.count(b"HTTP/1.1 200") <= 6
        assert b'"media-request-rate"' in got

    try:
        run(main(), timeout=60)
    finally:
        assert s.stop() == 0
