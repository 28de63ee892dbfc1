"""`pigeon admin` against a real store and a running server: check-config, stats, user, device,
backup under load and restore."""

import asyncio
import json
import os
import subprocess
import sys

from serverutil import Server, free_port, until

ALICE, BOB = "491701234567", "4915112345678"


def admin(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "pigeon.tools.cli", "admin", *args],
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_check_config(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('workers = 3\nsync = "os"\nqueue-max-count = 500\n')
    proc = admin("check-config", str(good), "--json")
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads(proc.stdout)
    assert (cfg["workers"], cfg["sync"], cfg["queue-max-count"]) == (3, "os", 500)
    assert cfg["listen"] == "127.0.0.1:7650"  # a default
    text = admin("check-config", str(good))
    assert text.returncode == 0 and "queue-max-count = 500" in text.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('sync = "sometimes"\n')
    proc = admin("check-config", str(bad))
    assert proc.returncode == 2 and "sync: must be one of fsync, os" in proc.stderr
    proc = admin("check-config", str(tmp_path / "missing.toml"))
    assert proc.returncode == 2 and "no such file" in proc.stderr


def test_user_device_stats_backup_and_restore(tmp_path):
    mport = free_port()
    srv = Server(tmp_path / "data", workers=2, metrics_listen=f"127.0.0.1:{mport}").start()
    backup_dir = tmp_path / "backup"
    try:

        async def main():
            alice_creds = await srv.register(ALICE)
            bob_creds = await srv.register(BOB)
            alice = await srv.login(alice_creds)
            await until(lambda: alice_creds.device in srv.sessions(ALICE))
            sends = [asyncio.ensure_future(alice.send(BOB, os.urandom(200))) for _ in range(300)]
            # a backup taken while the load runs
            proc = await asyncio.to_thread(admin, "backup", str(backup_dir), "--data-dir",
                                           str(srv.data_dir))  # fmt: skip
            assert proc.returncode == 0, proc.stderr
            await asyncio.gather(*sends)
            shown = admin("user", "show", ALICE, "--data-dir", str(srv.data_dir), "--json")
            assert shown.returncode == 0, shown.stderr
            info = json.loads(shown.stdout)
            assert info["phone"] == ALICE and len(info["devices"]) == 1
            assert info["devices"][0]["device"] == alice_creds.device
            assert info["devices"][0]["online"] and info["devices"][0]["primary"]
            devs = json.loads(admin("device", "list", BOB, "--data-dir", str(srv.data_dir),
                                    "--json").stdout)  # fmt: skip
            assert devs[0]["device"] == bob_creds.device and devs[0]["queued"] == 300
            assert not devs[0]["online"]
            table = admin("device", "list", BOB, "--data-dir", str(srv.data_dir))
            assert bob_creds.device in table.stdout and "300" in table.stdout
            missing = admin("user", "show", "4400000000000", "--data-dir", str(srv.data_dir))
            assert missing.returncode == 1 and "no account" in missing.stderr
            bad = admin("user", "show", "+44", "--data-dir", str(srv.data_dir))
            assert bad.returncode == 2 and "not a phone number" in bad.stderr

            def counted():
                st = admin("stats", "--metrics", f"127.0.0.1:{mport}", "--json")
                return (
                    st.returncode == 0
                    and json.loads(st.stdout).get("pigeon_messages_in_total") == 300
                )

            await until(counted, timeout=15)
            st = admin("stats", "--metrics", f"127.0.0.1:{mport}")
            assert "queued entries: 300" in st.stdout
            await alice.close()
            return bob_creds

        bob_creds = asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        assert srv.stop() == 0
    again = admin("backup", str(backup_dir), "--data-dir", str(srv.data_dir))
    assert again.returncode == 2 and "not empty" in again.stderr
    down = admin("stats", "--metrics", f"127.0.0.1:{mport}")
    assert down.returncode == 1 and "is the server running" in down.stderr
    # restore the backup into a fresh data dir; it starts and serves bob his backlog
    fresh = tmp_path / "restored"
    proc = admin("restore", str(backup_dir), "--data-dir", str(fresh))
    assert proc.returncode == 0, proc.stderr
    refused = admin("restore", str(backup_dir), "--data-dir", str(fresh))
    assert refused.returncode == 2 and "--force" in refused.stderr
    srv2 = Server(fresh, workers=2).start()
    try:

        async def check():
            bob = await srv2.login(bob_creds)
            seqs = []
            while True:
                try:
                    ev = await bob.next_event(2)
                except TimeoutError:
                    break
                seqs.append(ev.seq)
                await bob.ack(ev.seq)
            await bob.close()
            return seqs

        seqs = asyncio.run(asyncio.wait_for(check(), 60))
        # what the backup held (taken mid-load): a consistent prefix, in order
        assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) <= 300
    finally:
        assert srv2.stop() == 0
    forced = admin("restore", str(backup_dir), "--data-dir", str(fresh), "--force")
    assert forced.returncode == 0 and "previous store is in" in forced.stdout


def test_disable_and_revoke_close_live_sessions(tmp_path):
    import stat

    from pigeon.client import ConnectionLost, ServerError
    from pigeon.core.errors import ErrorCode
    from pigeon.core.events import Error

    srv = Server(tmp_path / "data", workers=2).start()
    data = str(srv.data_dir)
    try:
        assert stat.S_IMODE(os.stat(srv.data_dir / "control.sock").st_mode) == 0o600

        async def main():
            alice_creds, bob_creds = await srv.register(ALICE), await srv.register(BOB)
            alice, bob = await srv.login(alice_creds), await srv.login(bob_creds)
            proc = await asyncio.to_thread(admin, "user", "disable", ALICE, "--data-dir", data)
            assert proc.returncode == 0, proc.stderr
            assert "live sessions closed" in proc.stdout
            ev = await alice.next_event(10)  # at once, with a reason
            assert isinstance(ev, Error) and ev.code == ErrorCode.REVOKED
            assert "disabled" in ev.text
            c = await srv.client()
            try:
                await c.login(alice_creds)
                raise AssertionError("a disabled account logged in")
            except ServerError as exc:
                assert exc.code == ErrorCode.NOT_AUTHORIZED and "disabled" in exc.text
            await c.close()
            await bob.ping()  # nobody else is touched
            proc = await asyncio.to_thread(admin, "user", "enable", ALICE, "--data-dir", data)
            assert proc.returncode == 0
            alice2 = await srv.login(alice_creds)
            await alice2.ping()
            # revoke bob's device: his session closes, his login fails, the account stays
            proc = await asyncio.to_thread(admin, "device", "revoke", bob_creds.device,
                                           "--data-dir", data)  # fmt: skip
            assert proc.returncode == 0, proc.stderr
            ev = await bob.next_event(10)
            assert isinstance(ev, Error) and ev.code == ErrorCode.REVOKED
            try:
                await bob.next_event(10)
                raise AssertionError("the revoked session stayed open")
            except ConnectionLost:
                pass
            c = await srv.client()
            try:
                await c.login(bob_creds)
                raise AssertionError("a revoked device logged in")
            except ServerError as exc:
                assert exc.code == ErrorCode.NOT_AUTHORIZED
            await c.close()
            again = admin("device", "revoke", bob_creds.device, "--data-dir", data)
            assert again.returncode == 1 and "no device" in again.stderr
            bad = admin("device", "revoke", BOB, "--data-dir", data)
            assert bad.returncode == 2 and "not a device address" in bad.stderr
            for c in (alice, alice2, bob):
                await c.close()

        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        assert srv.stop() == 0
    # with the server down the store changes still apply, and the command says so
    proc = admin("user", "disable", ALICE, "--data-dir", data, "--json")
    assert proc.returncode == 0
    out = json.loads(proc.stdout)
    assert out["disabled"] and "not running" in out["sessions"][0]


def _control(data_dir, request: bytes, timeout: float = 10) -> dict:
    """One raw request on the server's control socket (from inside the directory: any length)."""
    import socket

    here = os.getcwd()
    os.chdir(data_dir)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect("control.sock")
            s.sendall(request)
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
    finally:
        os.chdir(here)
    return json.loads(data)


def test_revoke_closes_the_live_session_with_a_long_data_dir(tmp_path):
    """A data dir past the AF_UNIX path limit (about 104-108 bytes): the control socket works."""
    from pigeon.client import ConnectionLost
    from pigeon.core.errors import ErrorCode
    from pigeon.core.events import Error

    deep = tmp_path / ("d" * 60) / ("e" * 60) / "data"
    assert len(str(deep / "control.sock")) > 150
    deep.parent.mkdir(parents=True)
    srv = Server(deep, workers=2).start()
    try:

        async def main():
            bob_creds = await srv.register(BOB)
            bob = await srv.login(bob_creds)
            await until(lambda: bob_creds.device in srv.sessions(BOB))
            proc = await asyncio.to_thread(admin, "device", "revoke", bob_creds.device,
                                           "--data-dir", str(deep))  # fmt: skip
            assert proc.returncode == 0, proc.stderr
            assert "live sessions closed (2 workers told)" in proc.stdout, proc.stdout
            ev = await bob.next_event(10)
            assert isinstance(ev, Error) and ev.code == ErrorCode.REVOKED
            try:
                await bob.next_event(10)
                raise AssertionError("the revoked session stayed open")
            except ConnectionLost:
                pass
            await bob.close()

        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        assert srv.stop() == 0
    assert not (deep / "control.sock").exists()


def test_a_silent_control_client_does_not_hold_up_a_kick(tmp_path):
    import socket
    import threading

    from pigeon.core.errors import ErrorCode
    from pigeon.core.events import Error

    srv = Server(tmp_path / "data", workers=2, control_timeout=2).start()
    data = str(srv.data_dir)
    stop = threading.Event()
    closed = threading.Event()

    def trickle():  # connects, then sends a byte now and then and never a whole line
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(os.path.join(data, "control.sock"))
            for _ in range(120):  # bounded: 120 x 0.25 s
                if stop.wait(0.25):
                    return
                try:
                    s.sendall(b"{")
                except OSError:
                    closed.set()  # the server gave up on it
                    return

    try:

        async def main():
            bob_creds = await srv.register(BOB)
            bob = await srv.login(bob_creds)
            await until(lambda: bob_creds.device in srv.sessions(BOB))
            silent = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(3)]
            for s in silent:
                s.connect(os.path.join(data, "control.sock"))
            t = threading.Thread(target=trickle, daemon=True)
            t.start()
            try:
                proc = await asyncio.to_thread(admin, "device", "revoke", bob_creds.device,
                                               "--data-dir", data)  # fmt: skip
                assert proc.returncode == 0, proc.stderr
                assert "live sessions closed" in proc.stdout, proc.stdout
                ev = await bob.next_event(10)
                assert isinstance(ev, Error) and ev.code == ErrorCode.REVOKED
                # the silent ones are closed after control-timeout, the trickler too
                for s in silent:
                    s.settimeout(15)
                    got = b""
                    while chunk := s.recv(4096):  # bounded by the timeout
                        got += chunk
                    reply = json.loads(got)
                    assert reply["ok"] is False and "timed out" in reply["error"]
                await asyncio.to_thread(closed.wait, 20)
                assert closed.is_set(), "the server kept a client that never sent a line"
            finally:
                stop.set()
                for s in silent:
                    s.close()
                await bob.close()

        asyncio.run(asyncio.wait_for(main(), 90))
    finally:
        assert srv.stop() == 0


def test_bad_control_requests_are_refused_and_applied_ones_are_checked(tmp_path):
    from pigeon.core.errors import ErrorCode
    from pigeon.core.events import Error

    srv = Server(tmp_path / "data", workers=2).start()
    data = srv.data_dir
    try:

        async def main():
            bob_creds = await srv.register(BOB)
            bob = await srv.login(bob_creds)
            await until(lambda: bob_creds.device in srv.sessions(BOB))
            dev = bob_creds.device
            bad = {
                b'{"op": "kick", "device": "%s", "code": 999}\n' % dev.encode(): "code",
                b'{"op": "kick", "device": "%s", "code": "304"}\n' % dev.encode(): "code",
                b'{"op": "kick", "device": "%s", "code": 200}\n' % dev.encode(): "code",
                b'{"op": "kick", "device": "%s", "code": true}\n' % dev.encode(): "code",
                b'{"op": "kick", "device": "nobody", "code": 304}\n': "device",
                b'{"op": "kick", "device": "%s", "code": 304, "text": "%s"}\n'
                % (dev.encode(), b"x" * 1000): "text",
                b'{"op": "kick", "device": "%s", "code": 304, "text": 5}\n' % dev.encode(): "text",
                b'{"op": "kick", "device": "%s", "code": 304, "why": 1}\n' % dev.encode(): "why",
                b'{"op": "reboot"}\n': "op",
                b"[1, 2]\n": "object",
                b"not json\n": "JSON",
                b"{" + b" " * 5000: "long",
            }
            for request, word in bad.items():
                reply = await asyncio.to_thread(_control, data, request)
                assert reply["ok"] is False and word in reply["error"], (request, reply)
            await bob.ping()  # none of them touched the session; the server still serves
            reply = await asyncio.to_thread(
                _control, data, b'{"op": "kick", "device": "%s", "code": 303, "text": "moved"}\n'
                % dev.encode(),
            )  # fmt: skip
            assert reply == {"ok": True, "workers": 2}
            ev = await bob.next_event(10)
            assert isinstance(ev, Error) and ev.code == ErrorCode.REPLACED and ev.text == "moved"
            await bob.close()

        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        assert srv.stop() == 0


def test_a_worker_survives_a_bad_kick_on_its_bus_socket(tmp_path):
    """The supervisor checks kicks; a worker still must not drop its bus link over a bad one."""
    import socket
    import struct

    from pigeon.core.errors import ErrorCode
    from pigeon.core.events import Error
    from pigeon.server.bus import kick_record

    srv = Server(tmp_path / "data", workers=1).start()
    try:

        async def main():
            bob_creds = await srv.register(BOB)
            bob = await srv.login(bob_creds)
            await until(lambda: bob_creds.device in srv.sessions(BOB))
            wid = srv.sessions(BOB)[bob_creds.device]["worker"]
            with open(f"/proc/{srv.worker_pid(0)}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            run_dir = argv[argv.index(b"--run-dir") + 1].decode()
            frames = b"".join(
                (
                    kick_record(bob_creds.device, 999),  # not an error code
                    struct.pack(">IB", 4, 77) + b"???",  # a record type nobody knows
                    kick_record("", 304),  # no device
                    kick_record(bob_creds.device, 304, "after the bad ones"),
                )
            )
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                s.connect(os.path.join(run_dir, f"w{wid}.sock"))
                s.sendall(frames)
                ev = await bob.next_event(10)  # the good kick after the bad ones still applies
            assert isinstance(ev, Error) and ev.code == ErrorCode.REVOKED
            assert ev.text == "after the bad ones"
            await bob.close()

        asyncio.run(asyncio.wait_for(main(), 60))
        assert "bad kick" in srv.log_text()
    finally:
        assert srv.stop() == 0


def test_a_control_socket_that_cannot_be_made_is_a_startup_error(tmp_path):
    data = tmp_path / "data"
    (data / "control.sock").mkdir(parents=True)  # in the way, and not ours to remove
    proc = subprocess.run(
        [sys.executable, "-m", "pigeon.tools.cli", "serve", "--listen", f"127.0.0.1:{free_port()}",
         "--metrics-listen", "off", "--data-dir", str(data), "--map-size", str(64 << 20)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "cannot create the control socket" in proc.stderr and "pigeon admin" in proc.stderr
    assert "Traceback" not in proc.stderr
