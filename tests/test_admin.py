"""`pigeon admin` against a real store and a running server: check-config, stats, status, user,
device, backup under load and restore, --config, error prefixes and exit statuses."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

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
    # a key in a URL's password or query is not printed (the file itself is 0600)
    hooks = tmp_path / "hooks.toml"
    hooks.write_text(
        'sms-gateway = "webhook"\n'
        'sms-webhook-url = "https://acct:PASS-SECRET@sms.example:8443/send?key=Q-SECRET#f"\n'
        'push-webhook-url = "http://push.example/wake"\n'
    )
    for form in ((), ("--json",)):
        proc = admin("check-config", str(hooks), *form)
        assert proc.returncode == 0, proc.stderr
        assert "SECRET" not in proc.stdout
        assert "https://REDACTED@sms.example:8443/send?REDACTED#f" in proc.stdout
        assert "http://push.example/wake" in proc.stdout  # nothing to hide: shown whole
    # the TLS files are loaded as pigeon serve loads them (a missing one was "valid")
    tls = tmp_path / "tls.toml"
    tls.write_text('tls-cert = "/nonexistent/cert.pem"\n')
    proc = admin("check-config", str(tls))
    assert proc.returncode == 2, proc
    assert "cannot read tls-cert (with its key) /nonexistent/cert.pem" in proc.stderr
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
         "--metrics-listen", "off", "--media-listen", "off", "--data-dir", str(data),
         "--map-size", str(64 << 20)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "cannot create the control socket" in proc.stderr and "pigeon admin" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- issue 13: disabled accounts, --config, one error scheme, plurals, status -------------


def test_user_show_says_when_and_why_an_account_is_disabled(tmp_path):
    srv = Server(tmp_path / "data", workers=1).start()
    data = str(srv.data_dir)
    try:
        asyncio.run(asyncio.wait_for(srv.register(ALICE), 30))
        shown = json.loads(admin("user", "show", ALICE, "--data-dir", data, "--json").stdout)
        assert shown["disabled"] is False and shown["disabled_ms"] is None
        assert "DISABLED" not in admin("user", "show", ALICE, "--data-dir", data).stdout
        before = int(time.time() * 1000)
        proc = admin("user", "disable", ALICE, "--data-dir", data, "--reason", "spam  reports\n")
        assert proc.returncode == 0, proc.stderr
        shown = json.loads(admin("user", "show", ALICE, "--data-dir", data, "--json").stdout)
        assert shown["disabled"] is True and shown["disabled_reason"] == "spam reports"
        assert before - 1000 <= shown["disabled_ms"] <= int(time.time() * 1000) + 1000
        text = admin("user", "show", ALICE, "--data-dir", data)
        assert text.returncode == 0, text.stderr
        line = text.stdout.splitlines()[1]
        assert line.startswith("DISABLED since ") and ": spam reports" in line
        assert f"user enable {ALICE}" in line
        # without a reason: still disabled, with its time, no reason shown
        assert admin("user", "enable", ALICE, "--data-dir", data).returncode == 0
        shown = json.loads(admin("user", "show", ALICE, "--data-dir", data, "--json").stdout)
        assert (shown["disabled"], shown["disabled_ms"], shown["disabled_reason"]) == (
            False, None, None)  # fmt: skip
        assert admin("user", "disable", ALICE, "--data-dir", data).returncode == 0
        shown = json.loads(admin("user", "show", ALICE, "--data-dir", data, "--json").stdout)
        assert shown["disabled"] and shown["disabled_ms"] and shown["disabled_reason"] is None
        bad = admin("user", "disable", ALICE, "--data-dir", data, "--reason", "x" * 201)
        assert bad.returncode == 2 and "--reason" in bad.stderr
    finally:
        assert srv.stop() == 0


def test_admin_output_counts_in_the_singular_and_the_plural(tmp_path):
    srv = Server(tmp_path / "data", workers=1).start()
    data = str(srv.data_dir)
    try:

        async def main():
            alice = await srv.login(await srv.register(ALICE))
            bob_creds = await srv.register(BOB)
            await alice.send(BOB, b"one")
            await alice.close()
            return bob_creds

        bob_creds = asyncio.run(asyncio.wait_for(main(), 30))
        q = admin("queues", "--data-dir", data)
        assert q.returncode == 0, q.stderr
        assert q.stdout.startswith("1 queued entry (") and " for 1 device; " in q.stdout
        shown = admin("user", "show", BOB, "--data-dir", data)
        assert ", 1 device\n" in shown.stdout
        assert "1 device(s)" not in shown.stdout and "1 devices" not in shown.stdout

        async def online():
            bob = await srv.login(bob_creds)
            await until(lambda: bob_creds.device in srv.sessions(BOB))
            proc = await asyncio.to_thread(admin, "device", "revoke", bob_creds.device,
                                           "--data-dir", data)  # fmt: skip
            await bob.close()
            return proc

        proc = asyncio.run(asyncio.wait_for(online(), 30))
        assert "live sessions closed (1 worker told)" in proc.stdout, proc.stdout
        q = admin("queues", "--data-dir", data)
        assert q.stdout.startswith("0 queued entries (0 B) for 0 devices;"), q.stdout
    finally:
        assert srv.stop() == 0
    out = tmp_path / "one.jsonl"
    proc = admin("provision", "--count", "1", "--out", str(out), "--data-dir", str(tmp_path / "p"))
    assert proc.returncode == 0 and "provisioned 1 account (" in proc.stdout, proc.stdout


def test_admin_commands_take_the_server_config_file(tmp_path):
    mport = free_port()
    data = tmp_path / "data"
    config = tmp_path / "pigeon.toml"
    config.write_text(f'data-dir = "{data}"\nmetrics-listen = "127.0.0.1:{mport}"\n')
    # (serverutil gives the server its data dir and metrics-listen as flags too: the same)
    srv = Server(data, workers=2, config_file=config, metrics_listen=f"127.0.0.1:{mport}").start()
    try:
        creds = asyncio.run(asyncio.wait_for(srv.register(ALICE), 30))
        cfg = ("--config", str(config))
        shown = admin("user", "show", ALICE, *cfg, "--json")
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["devices"][0]["device"] == creds.device
        devs = admin("device", "list", ALICE, *cfg, "--json")
        assert json.loads(devs.stdout)[0]["device"] == creds.device
        q = admin("queues", *cfg, "--json")
        assert q.returncode == 0 and json.loads(q.stdout)["count"] == 0, q.stderr
        st = admin("stats", *cfg, "--json")
        assert st.returncode == 0 and "pigeon_queue_entries" in json.loads(st.stdout), st.stderr
        status = admin("status", *cfg, "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["data_dir"] == str(data)
        backup = admin("backup", str(tmp_path / "backup"), *cfg)
        assert backup.returncode == 0 and str(data) in backup.stdout, backup.stderr
        # a flag beats the file
        elsewhere = tmp_path / "elsewhere"
        q = admin("queues", *cfg, "--data-dir", str(elsewhere))
        assert q.returncode == 1 and f"no store in {elsewhere}" in q.stderr, q.stderr
        st = admin("status", *cfg, "--metrics", f"127.0.0.1:{free_port()}")
        assert st.returncode == 1 and "Connection refused" in st.stderr, st.stderr
        # a wildcard metrics-listen in the file is reached on loopback
        wild = tmp_path / "wild.toml"
        wild.write_text(f'data-dir = "{data}"\nmetrics-listen = "0.0.0.0:{mport}"\n')
        st = admin("status", "--config", str(wild))
        assert st.returncode == 0 and f"at 127.0.0.1:{mport}: ready" in st.stdout, st.stderr
        # metrics off in the file: the commands that need it say so
        off = tmp_path / "off.toml"
        off.write_text(f'data-dir = "{data}"\nmetrics-listen = "off"\n')
        st = admin("stats", "--config", str(off))
        assert st.returncode == 2 and "metrics-listen is off in" in st.stderr, st.stderr
        assert admin("user", "show", ALICE, "--config", str(off)).returncode == 0
    finally:
        assert srv.stop() == 0
    # a bad file is a usage error, whatever else is given
    bad = tmp_path / "bad.toml"
    bad.write_text('sync = "sometimes"\n')
    proc = admin("queues", "--config", str(bad), "--data-dir", str(data))
    assert proc.returncode == 2 and proc.stderr.startswith("pigeon admin queues: "), proc.stderr
    assert "sync" in proc.stderr
    # neither file nor flag: the default, var in the current directory, as before
    here = tmp_path / "cwd"
    here.mkdir()
    proc = subprocess.run([sys.executable, "-m", "pigeon.tools.cli", "admin", "queues"],
                          capture_output=True, text=True, timeout=60, cwd=here)  # fmt: skip
    assert proc.returncode == 1 and "no store in var/store" in proc.stderr, proc.stderr
    assert "the default" in proc.stderr


def test_admin_errors_have_one_prefix_and_two_exit_statuses(tmp_path):
    nowhere = str(tmp_path / "nowhere")
    usage = [
        (("user", "show", "+44"), "pigeon admin user show: '+44' is not a phone number"),
        (("device", "revoke", BOB), "pigeon admin device revoke: "),
        (("status", "--wait", "-1"), "pigeon admin status: error: argument --wait"),
        (("stats", "--metrics", "localhost"), "pigeon admin stats: --metrics must be HOST:PORT"),
        (("check-config", str(tmp_path / "missing.toml")), "pigeon admin check-config: "),
        (("queues", "--top", "-1"), "pigeon admin queues: --top must be 0 or more"),
        (("user", "show"), "pigeon admin user show: error: the following arguments"),
    ]
    for args, prefix in usage:
        proc = admin(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert prefix in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
    failures = [
        (("user", "show", ALICE, "--data-dir", nowhere), "pigeon admin user show: no store in"),
        (("device", "list", ALICE, "--data-dir", nowhere), "pigeon admin device list: no store"),
        (("backup", str(tmp_path / "b"), "--data-dir", nowhere), "pigeon admin backup: no store"),
        (("stats", "--metrics", f"127.0.0.1:{free_port()}"), "pigeon admin stats: cannot read"),
        (("status", "--metrics", f"127.0.0.1:{free_port()}"), "pigeon admin status: cannot read"),
    ]
    for args, prefix in failures:
        proc = admin(*args)
        assert proc.returncode == 1, (args, proc.stderr)
        assert proc.stderr.startswith(prefix), (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    # an account that is not there, in a store that is: a failure too
    from pigeon.server.store import Store

    Store(os.path.join(nowhere, "store")).close()
    proc = admin("user", "show", ALICE, "--data-dir", nowhere)
    assert proc.returncode == 1 and proc.stderr == f"pigeon admin user show: no account {ALICE}\n"


def _kill_worker_and_wait_for_restart(mport: int, index: int) -> None:
    doc = get_status(mport)
    pid = next(w["pid"] for w in doc["workers"] if w["index"] == index)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        doc = get_status(mport)
        w = next(w for w in doc["workers"] if w["index"] == index)
        if w["pid"] not in (None, pid) and doc["ready"]:
            return
        time.sleep(0.05)
    raise AssertionError("the worker did not come back")


def get_status(mport: int) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{mport}/status", timeout=10) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "application/json"
        return json.loads(r.read())


def test_status_endpoint_and_admin_status(tmp_path):
    import urllib.request

    from pigeon.core import __version__

    mport = free_port()
    srv = Server(tmp_path / "data", workers=2, metrics_listen=f"127.0.0.1:{mport}").start()
    try:

        async def main():
            alice = await srv.login(await srv.register(ALICE))
            await srv.register(BOB)
            await alice.send(BOB, b"waits for bob")
            await until(lambda: get_status(mport)["connections"] == 1, timeout=15)
            doc = get_status(mport)
            assert (doc["server"], doc["version"], doc["state"], doc["ready"]) == (
                "pigeon", __version__, "ready", True)  # fmt: skip
            assert doc["codec"] in ("fastpath", "python") and doc["pid"] == srv.proc.pid
            assert doc["protocol"] >= 1 and doc["dictionary"] >= 1
            assert doc["uptime_s"] > 0 and doc["start_ms"] <= doc["now_ms"]
            assert doc["workers_configured"] == 2 and doc["workers_ready"] == 2
            assert doc["generation"] == 0 and doc["reloading"] is False
            ws = doc["workers"]
            assert sorted(w["pid"] for w in ws) == sorted(srv.worker_pids())
            assert [w["index"] for w in ws] == [0, 1]
            for w in ws:
                assert w["state"] == "ready" and w["uptime_s"] > 0 and w["restarts"] == 0
                assert w["loop_lag_s"] is not None
            assert sum(w["connections"] for w in ws) == doc["connections"] == 1
            assert doc["queues"]["entries"] == 1 and doc["queues"]["devices"] == 1
            assert doc["queues"]["bytes"] > 0 and doc["queues"]["oldest_s"] >= 0
            assert 0 < doc["store"]["used_bytes"] <= doc["store"]["map_bytes"]
            assert doc["listeners"] == {
                "chat": f"127.0.0.1:{srv.port}", "tls": None, "metrics": f"127.0.0.1:{mport}",
                "control": str(srv.data_dir / "control.sock"), "media": "off",
            }  # fmt: skip
            assert doc["media"] == []
            assert doc["data_dir"] == str(srv.data_dir)
            await until(lambda: get_status(mport)["totals"]["messages_in"] == 1, timeout=15)
            assert get_status(mport)["totals"]["logins"] == 1
            with urllib.request.urlopen(f"http://127.0.0.1:{mport}/health", timeout=10) as r:
                assert r.read() == b"ready\n"  # the same readiness as /status
            text = await asyncio.to_thread(admin, "status", "--metrics", f"127.0.0.1:{mport}")
            assert text.returncode == 0, text.stderr
            out = text.stdout
            assert out.startswith(f"pigeon {__version__} at 127.0.0.1:{mport}: ready (up ")
            assert "workers: 2 of 2 ready, generation 0" in out
            assert "connections: 1\n" in out
            assert "queues: 1 queued entry (" in out and "for 1 device;" in out
            chat, metrics = f"127.0.0.1:{srv.port}", f"127.0.0.1:{mport}"
            assert f"listeners: chat {chat}; TLS off; metrics {metrics};" in out
            for w in ws:
                assert f"  {w['index']:<7} {w['pid']:<8} ready " in out
            js = await asyncio.to_thread(admin, "status", "--metrics", f"127.0.0.1:{mport}",
                                         "--json")  # fmt: skip
            assert js.returncode == 0 and json.loads(js.stdout)["workers_ready"] == 2
            await alice.close()

        asyncio.run(asyncio.wait_for(main(), 60))
        # A worker that keeps crashing comes back after a growing backoff (1, 2, 4 s):
        # meanwhile the server is up but not ready, and status says so with exit 1.
        _kill_worker_and_wait_for_restart(mport, 0)
        _kill_worker_and_wait_for_restart(mport, 0)
        pid = next(w["pid"] for w in get_status(mport)["workers"] if w["index"] == 0)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while get_status(mport)["workers"][0]["state"] != "restarting":
            assert time.monotonic() < deadline, "the killed worker was never seen restarting"
            time.sleep(0.02)
        down = admin("status", "--metrics", f"127.0.0.1:{mport}")
        assert down.returncode == 1, down.stdout + down.stderr
        assert ": starting (up " in down.stdout and "workers: 1 of 2 ready" in down.stdout
        assert down.stderr.startswith("pigeon admin status: not ready: state starting, 1 of 2")
        assert "worker 0 restarting" in down.stderr
        waited = admin("status", "--metrics", f"127.0.0.1:{mport}", "--wait", "60", "--json")
        assert waited.returncode == 0, waited.stderr
        doc = json.loads(waited.stdout)
        assert doc["ready"] and doc["workers"][0]["restarts"] == 3
        assert doc["workers"][0]["pid"] != pid
    finally:
        assert srv.stop() == 0


def test_status_wait_for_a_starting_server_and_for_nothing(tmp_path):
    # nothing listening: bounded, non-zero, and it says why
    port = free_port()
    started = time.monotonic()
    proc = admin("status", "--metrics", f"127.0.0.1:{port}", "--wait", "1.5")
    assert time.monotonic() - started >= 1.5  # it did wait
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith(f"pigeon admin status: not ready after 1.5 s: cannot read "
                                  f"http://127.0.0.1:{port}/status: Connection refused")  # fmt: skip
    # started before the server: it waits through the start and returns once it is ready
    mport = free_port()
    waiting = subprocess.Popen(
        [sys.executable, "-m", "pigeon.tools.cli", "admin", "status",
         "--metrics", f"127.0.0.1:{mport}", "--wait", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        srv = Server(tmp_path / "data", workers=2, metrics_listen=f"127.0.0.1:{mport}")
        srv.start()
        try:
            out, err = waiting.communicate(timeout=60)
            assert waiting.returncode == 0, err
            doc = json.loads(out)
            assert doc["ready"] and doc["workers_ready"] == 2 and doc["pid"] == srv.proc.pid
        finally:
            assert srv.stop() == 0
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait(5)


def test_status_after_a_reload_counts_the_chat_workers_only(tmp_path):
    """After a SIGHUP, /status said "2 of 3 ready" for --workers 2 with the
    media service on: the new generation's count held the media process."""
    import signal

    mport = free_port()
    srv = Server(tmp_path / "data", workers=2, media=True,
                 metrics_listen=f"127.0.0.1:{mport}").start()  # fmt: skip
    try:

        async def main():
            await until(lambda: get_status(mport)["workers_ready"] == 2, timeout=30)
            srv.proc.send_signal(signal.SIGHUP)

            def reloaded():
                d = get_status(mport)
                return d["generation"] == 1 and not d["reloading"] and len(d["media"]) == 1

            await until(reloaded, timeout=60)  # (the old media process drained away)
            doc = get_status(mport)
            assert (doc["workers_configured"], doc["workers_ready"]) == (2, 2), doc

        asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        assert srv.stop() == 0
