"""Setup traps, on real 2-worker servers: a taken port, a shadowing pigeon/ folder,
secrets on the command line, and the modes of the files the server and admin write."""

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from serverutil import Server, until

import pigeon.server.worker as installed_worker
from pigeon.client import ServerError
from pigeon.core import codec as core_codec
from pigeon.core.errors import ErrorCode
from pigeon.server.listeners import reuseport_option

ALICE, BOB = "491701234567", "4915112345678"


def drained(srv: Server, n: int) -> bool:
    return srv.log_text().count('"old worker drained"') >= n


def refused(srv: Server) -> str:
    """Start ``srv``, which must fail; returns its log (stderr)."""
    try:
        srv.start()
    except RuntimeError:
        pass
    else:
        srv.stop()
        pytest.fail("the server started")
    assert srv.proc.returncode == 1
    return srv.log_text()


def ready_lines(srv: Server, n: int = 2) -> list[dict]:
    """The "worker ready" log lines, once there are ``n`` (a worker logs it just
    after telling the supervisor, so the banner may come first)."""
    deadline = time.monotonic() + 10
    while len(lines := _ready_lines(srv)) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    return lines


def _ready_lines(srv: Server) -> list[dict]:
    out = []
    for line in srv.log_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("msg") == "worker ready":
            out.append(rec)
    return out


def cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode(errors="replace")


# -- item 11: a port already in use -----------------------------------------------------


def test_a_second_pigeon_on_a_taken_port_is_refused_and_reloads_still_work(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = Server(tmp_path / "a" / "data", workers=2).start()
    try:
        second = Server(tmp_path / "b" / "data", workers=2)  # another data dir, same port
        second.port = first.port
        log = refused(second)
        assert f"cannot listen on 127.0.0.1:{first.port} (listen): address already in use" in log

        async def main():
            creds = await first.register(ALICE)
            alice = await first.login(creds, reconnect=True)
            workers = set(first.worker_pids())
            first.proc.send_signal(signal.SIGHUP)
            await until(lambda: drained(first, 2), timeout=30)
            assert not workers & set(first.worker_pids())
            assert "reload refused" not in first.log_text()
            # the drain closed alice's connection: the ping waits for her reconnection
            # (backoff with jitter), or it meets "not connected (reconnecting)"
            await until(lambda: alice.reconnects >= 1 and alice._live, timeout=30)
            await alice.ping()  # served by the new generation
            await alice.close()

        asyncio.run(asyncio.wait_for(main(), 60))
        # the new generation holds the port just as well
        again = Server(tmp_path / "b" / "data", workers=2)
        again.port = first.port
        assert "address already in use" in refused(again)
    finally:
        assert first.stop() == 0


@pytest.mark.parametrize("reuseport", [False, True], ids=["plain", "with-SO_REUSEPORT"])
def test_a_port_held_by_another_program_is_refused(tmp_path, reuseport):
    holder = socket.socket()
    try:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:  # what the old pre-flight bind happily joined
            holder.setsockopt(socket.SOL_SOCKET, reuseport_option(), 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        srv = Server(tmp_path / "data", workers=2)
        srv.port = holder.getsockname()[1]
        log = refused(srv)
        assert f"cannot listen on 127.0.0.1:{srv.port} (listen): address already in use" in log
        assert not srv.worker_pids()
    finally:
        holder.close()


# -- item 12: a pigeon/ folder where the server is started --------------------------------


def decoy_checkout(root: Path) -> Path:
    """The layout of a clone named pigeon: the sources under pigeon/, no compiled codec."""
    src = Path(installed_worker.__file__).resolve().parent.parent
    for name in ("core", "fastpath", "server", "client", "tools", "bench"):
        shutil.copytree(
            src / name,
            root / "pigeon" / name,
            ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__", "*.c"),
        )
    return root / "pigeon"


def installed_command() -> list[str]:
    script = Path(sys.executable).parent / "pigeon"
    return [str(script)] if script.exists() else [sys.executable, "-P", "-m", "pigeon.tools.cli"]


def test_workers_started_beside_a_pigeon_folder_run_the_installed_code(tmp_path):
    if core_codec.IMPLEMENTATION != "fastpath":
        pytest.skip("the installed package has no compiled codec")
    decoy = decoy_checkout(tmp_path / "parent")
    srv = Server(tmp_path / "data", workers=2, cwd=decoy.parent, command=installed_command())
    srv.start()
    try:
        assert "codec fastpath" in srv.banner
        lines = ready_lines(srv)
        assert len(lines) == 2
        for rec in lines:
            assert rec["codec"] == "fastpath", rec
            assert rec["module"] == os.path.realpath(installed_worker.__file__), rec
    finally:
        assert srv.stop() == 0


def test_a_supervisor_run_from_a_checkout_gets_workers_running_that_checkout(tmp_path):
    """``python -m pigeon.tools.cli`` in the clone's parent runs the clone: so do its workers."""
    decoy = decoy_checkout(tmp_path / "parent")
    srv = Server(tmp_path / "data", workers=2, cwd=decoy.parent)
    srv.start()
    try:
        # (pure Python, unless an editable install's finder still supplies the compiled
        # codec: it maps module names, wherever their package came from)
        lines = ready_lines(srv)
        assert len(lines) == 2
        for rec in lines:
            assert f"codec {rec['codec']}," in srv.banner, rec
            assert rec["module"] == str((decoy / "server" / "worker.py").resolve()), rec
    finally:
        assert srv.stop() == 0


def test_a_worker_names_the_code_it_should_have_run():
    from pigeon.server.worker import code_mismatch

    assert code_mismatch({"worker": os.path.realpath(installed_worker.__file__)}) is None
    problem = code_mismatch({"worker": "/elsewhere/pigeon/server/worker.py"})
    assert "/elsewhere/pigeon/server/worker.py" in problem
    other = "python" if core_codec.IMPLEMENTATION == "fastpath" else "fastpath"
    assert f"the {other} one" in code_mismatch({"codec": other})


@pytest.mark.parametrize("module", ["pigeon.server.worker", "pigeon.server.media"])
def test_a_child_process_running_other_code_refuses_to_start_and_says_why(tmp_path, module):
    """Both kinds of child (a worker, the media service) check the supervisor's code identity."""
    config_r, config_w = os.pipe()
    status_r, status_w = os.pipe()
    cmd = [sys.executable, "-P", "-m", module, "--index", "0", "--count", "1",
           "--run-dir", str(tmp_path), "--config-fd", str(config_r),
           "--status-fd", str(status_w)]  # fmt: skip
    proc = subprocess.Popen(cmd, pass_fds=(config_r, status_w), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    os.close(config_r)
    os.close(status_w)
    settings = {"data_dir": str(tmp_path / "data"), "log_format": "json"}
    private = {"config": settings, "code": {"worker": "/elsewhere/pigeon/server/worker.py"}}
    with open(config_w, "wb") as f:
        f.write(json.dumps(private).encode())
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    with open(status_r, "rb") as f:
        status = f.read().decode()
    assert proc.returncode == 1, err
    assert status.startswith("fatal ") and "/elsewhere/pigeon/server/worker.py" in status
    assert "refuses to start" in err.decode()
    assert not (tmp_path / "data").exists()  # it stopped before opening anything


# -- item 13: secrets on the command line; the webhook's Authorization header -----------


class Webhook:
    """A real HTTP server on loopback that records each POST."""

    def __init__(self, answers=()):
        """``answers``: (status, Location or None) for the first POSTs; 204 after them."""
        self.posts: list[dict] = []
        posts = self.posts
        answers = list(answers)

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                posts.append({"path": self.path, "auth": self.headers.get("Authorization"),
                              "body": body})  # fmt: skip
                status, location = answers.pop(0) if answers else (204, None)
                self.send_response(status)
                if location:
                    self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/sms?key=URL-SECRET-3141"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def private_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


@contextlib.contextmanager
def env_token_server(tmp_path, hook: Webhook, token: str, workers: int, **settings):
    """A running server whose SMS gateway is ``hook``, its Authorization header
    ``token`` from the environment (sms-webhook-auth-env); stopped on exit."""
    srv = Server(tmp_path / "data", workers=workers, env={"PIGEON_TEST_SMS_TOKEN": token},
                 sms_gateway="webhook", sms_webhook_url=hook.url,
                 sms_webhook_auth_env="PIGEON_TEST_SMS_TOKEN", **settings).start()  # fmt: skip
    try:
        yield srv
    finally:
        assert srv.stop() == 0


async def request_code(srv: Server, phone: str) -> None:
    c = await srv.client()
    try:
        await c.register(phone)
    finally:
        await c.close()


def test_workers_argv_hold_no_settings_and_the_webhook_token_comes_from_a_file(tmp_path):
    hook = Webhook()
    try:
        auth = private_file(tmp_path / "sms-auth", "Bearer FILE-SECRET-2718\n")
        cfg = private_file(
            tmp_path / "pigeon.toml",
            f'sms-gateway = "webhook"\nsms-webhook-url = "{hook.url}"\n'
            f'sms-webhook-auth-file = "{auth}"\n',
        )
        srv = Server(tmp_path / "data", workers=2, config_file=cfg).start()
        try:
            pids = srv.worker_pids()
            assert len(pids) == 2
            for pid in pids:  # no setting at all, secret or not
                # (the interpreter's path is the checkout's, which may hold any word)
                argv = cmdline(pid).partition(" ")[2]
                for word in ("SECRET", "sms", "{", "login", "data"):
                    assert word not in argv, (word, argv)
            assert "SECRET" not in cmdline(srv.proc.pid)  # its flags are the test's own
            asyncio.run(asyncio.wait_for(request_code(srv, ALICE), 30))
            assert len(hook.posts) == 1
            post = hook.posts[0]
            assert post["auth"] == "Bearer FILE-SECRET-2718"
            assert post["path"] == "/sms?key=URL-SECRET-3141"
            assert post["body"]["phone"] == ALICE
            assert "SECRET" not in srv.log_text()
        finally:
            assert srv.stop() == 0
    finally:
        hook.close()


def test_the_webhook_token_can_come_from_an_environment_variable(tmp_path):
    hook = Webhook()
    try:
        with env_token_server(tmp_path, hook, "Basic ENV-SECRET-1618", workers=2) as srv:
            for pid in srv.worker_pids():
                assert "ENV-SECRET" not in cmdline(pid)
            asyncio.run(asyncio.wait_for(request_code(srv, BOB), 30))
            assert [p["auth"] for p in hook.posts] == ["Basic ENV-SECRET-1618"]
            assert "SECRET" not in srv.log_text()
    finally:
        hook.close()


def test_a_failing_webhook_is_logged_without_its_secrets_and_a_redirect_is_not_followed(
    tmp_path,
):
    """The operator sees why codes are not going out (before: nothing in the
    log, the client only got 502); the log names the webhook's host, never its
    path, query, token, the number or the code, and a redirect is a failure
    (following it would hand the code and the token to where it points)."""
    elsewhere = Webhook()
    hook = Webhook(answers=[(500, None), (302, elsewhere.url), (500, None), (307, elsewhere.url)])
    try:
        token = "Bearer HOOK-SECRET-1414"
        with env_token_server(tmp_path, hook, token, workers=1, sms_webhook_retries=3) as srv:
            with pytest.raises(ServerError) as info:
                asyncio.run(asyncio.wait_for(request_code(srv, ALICE), 60))
            assert info.value.code == ErrorCode.UNAVAILABLE
            assert len(hook.posts) == 4
            assert elsewhere.posts == []
            port = hook.httpd.server_port
            log = srv.log_text()
            failures = [json.loads(line) for line in log.splitlines()
                        if "the SMS webhook failed" in line]  # fmt: skip
            assert [(f["reason"], f["attempt"]) for f in failures] == [
                ("HTTP 500", 1), ("HTTP 302", 2), ("HTTP 500", 3), ("HTTP 307", 4)
            ]  # fmt: skip
            assert all(f["webhook"] == f"http://127.0.0.1:{port}" for f in failures)
            assert "the code was not sent" in failures[-1]["msg"]
            code = hook.posts[0]["body"]["code"]
            for secret in ("SECRET", code, ALICE, "/sms"):
                assert secret not in log, secret
            # the next request goes through: nothing stuck
            asyncio.run(asyncio.wait_for(request_code(srv, ALICE), 60))
            assert len(hook.posts) == 5
    finally:
        hook.close()
        elsewhere.close()


def test_a_webhook_token_file_others_can_read_is_refused(tmp_path):
    auth = private_file(tmp_path / "sms-auth", "Bearer LEAKED-SECRET\n", mode=0o644)
    srv = Server(
        tmp_path / "data",
        workers=2,
        sms_gateway="webhook",
        sms_webhook_url="http://127.0.0.1:9/sms",
        sms_webhook_auth_file=str(auth),
    )
    log = refused(srv)
    assert f"sms-webhook-auth-file {auth} may be read or written by other users (mode 0644)" in log
    assert "LEAKED" not in log
    unset = Server(
        tmp_path / "data2",
        workers=2,
        sms_gateway="webhook",
        sms_webhook_url="http://127.0.0.1:9/sms",
        sms_webhook_auth_env="PIGEON_TEST_UNSET_VARIABLE",
    )
    assert "PIGEON_TEST_UNSET_VARIABLE (sms-webhook-auth-env) is empty or not set" in refused(unset)


# -- item 14: private files whatever the umask ---------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def admin(*args: str) -> subprocess.CompletedProcess:
    """``pigeon admin ...`` run with umask 022, as from a typical login shell."""
    return subprocess.run(
        [sys.executable, "-m", "pigeon.tools.cli", "admin", *args],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=lambda: os.umask(0o022),
    )


def test_the_server_and_admin_write_private_files_under_umask_022(tmp_path):
    import lmdb

    data = tmp_path / "data"
    # what an older pigeon left under a 022 umask: all of it readable by everyone
    (data / "store").mkdir(parents=True)
    data.chmod(0o755)
    (data / "store").chmod(0o755)
    old_umask = os.umask(0o022)  # an in-process `pigeon admin` test may have left 0077
    try:
        lmdb.open(str(data / "store"), max_dbs=32, mode=0o644).close()
    finally:
        os.umask(old_umask)
    private_file(data / "sms-outbox.txt", "", mode=0o644)
    assert mode(data / "store" / "data.mdb") == 0o644
    fresh = tmp_path / "fresh"  # and one the server creates itself
    for d in (data, fresh):
        srv = Server(d, workers=2, umask=0o022).start()
        try:
            asyncio.run(asyncio.wait_for(srv.register(ALICE), 30))
            assert (d / "control.sock").exists()
            modes = {p: mode(d / p) for p in ("", "store", "store/data.mdb", "store/lock.mdb",
                                              "sms-outbox.txt", "control.sock")}  # fmt: skip
            assert modes == {"": 0o700, "store": 0o700, "store/data.mdb": 0o600,
                             "store/lock.mdb": 0o600, "sms-outbox.txt": 0o600,
                             "control.sock": 0o600}, d  # fmt: skip
            dest = tmp_path / f"backup-{d.name}"
            r = admin("backup", str(dest), "--data-dir", str(d))
            assert r.returncode == 0, r.stderr
            assert (mode(dest), mode(dest / "data.mdb")) == (0o700, 0o600)
        finally:
            assert srv.stop() == 0
    restored = tmp_path / "restored"
    r = admin("restore", str(tmp_path / "backup-data"), "--data-dir", str(restored))
    assert r.returncode == 0, r.stderr
    assert (mode(restored / "store"), mode(restored / "store" / "data.mdb")) == (0o700, 0o600)
    r = admin("gen-cert", "--out-dir", str(tmp_path / "tls"))
    assert r.returncode == 0, r.stderr
    tls = tmp_path / "tls"
    assert (mode(tls), mode(tls / "key.pem"), mode(tls / "cert.pem")) == (0o700, 0o600, 0o644)
    r = admin("gen-cert", "--help")
    assert "(mode 0600)" in r.stdout and "(mode 0644" in r.stdout
