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
