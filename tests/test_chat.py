"""``pigeon chat`` as a user runs it: subprocesses with a terminal-like stdin and stdout."""

import os
import selectors
import subprocess
import sys
import time

import pytest
from serverutil import Server

ALICE, BOB = "491701234567", "4915112345678"


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path / "data", workers=2).start()
    yield srv
    assert srv.stop() == 0, srv.log_text()[-3000:]


class Chat:
    def __init__(self, server, profile, *args):
        cmd = [sys.executable, "-m", "pigeon.tools.cli", "chat", "--profile", str(profile),
               "--server", f"127.0.0.1:{server.port}", *args]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.proc.stdout, selectors.EVENT_READ)
        self.lines: list[str] = []
        self.partial = b""

    def expect(self, text: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if text in line:
                    self.lines.remove(line)
                    return line
            if self.sel.select(timeout=0.1):
                # os.read, not readline: a buffered reader would keep lines the
                # selector no longer reports as readable
                data = os.read(self.proc.stdout.fileno(), 65536)
                if not data:
                    break
                *done, self.partial = (self.partial + data).split(b"\n")
                self.lines += [line.decode() for line in done]
        raise AssertionError(f"no line with {text!r}; got {self.lines}; "
                             f"stderr: {self.proc.stderr.read1().decode() if self.proc.poll() is not None else ''}")  # fmt: skip

    def type(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.stdin.close()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise


def register(server, tmp_path, phone):
    profile = tmp_path / f"{phone}.json"
    c = Chat(server, profile, "register", phone)
    c.expect("code:")
    c.type(server.code_for(phone))
    c.expect(f"registered {phone}:0")
    assert c.finish() == 0
    assert profile.stat().st_mode & 0o777 == 0o600
    return profile


def test_two_terminals_chat_with_ticks(server, tmp_path):
    alice_profile = register(server, tmp_path, ALICE)
    bob_profile = register(server, tmp_path, BOB)
    alice = Chat(server, alice_profile)
    bob = Chat(server, bob_profile)
    try:
        alice.expect(f"logged in as {ALICE}:0")
        bob.expect(f"logged in as {BOB}:0")
        alice.type(f"{BOB} hello bob")
        mid = alice.expect("-> " + BOB + ": hello bob").rsplit("[", 1)[1].rstrip("]")
        alice.expect(f"✓ {mid}")
        assert f"<- {ALICE}" in bob.expect("hello bob")
        alice.expect(f"read {mid}")  # bob's terminal showed it
        bob.type("/to " + ALICE)
        bob.type("hi alice, no number needed")
        alice.expect("hi alice, no number needed")
        bob.type(f"{'4400000000000'} anyone?")
        bob.expect("not sent")
        bob.type("/quit")
        assert bob.finish() == 0
        alice.type("/quit")
        assert alice.finish() == 0
    finally:
        for c in (alice, bob):
            if c.proc.poll() is None:
                c.proc.kill()
                c.proc.wait(5)


def test_chat_errors_say_what_to_fix(server, tmp_path):
    c = Chat(server, tmp_path / "none.json")
    assert c.finish() == 1
    assert "run 'pigeon chat register PHONE' first" in c.proc.stderr.read().decode()
    c = Chat(server, tmp_path / "x.json", "register", "+49 170")
    assert c.finish() == 1
    assert "not a phone number" in c.proc.stderr.read().decode()
    c = Chat(server, tmp_path / "x.json", "register", ALICE)
    c.expect("code:")
    c.type("000000" if server.code_for(ALICE) != "000000" else "111111")
    assert c.finish() == 1
    assert "the server refused: 301" in c.proc.stderr.read().decode()
    assert not os.path.exists(tmp_path / "x.json")


def test_an_idle_chat_stays_connected(tmp_path):
    """The reported symptom: an idle chat was closed with 130 every idle-timeout."""
    import asyncio

    srv = Server(tmp_path / "data", workers=2, idle_timeout=2).start()
    alice = None
    try:
        asyncio.run(asyncio.wait_for(srv.register(BOB), 30))
        alice = Chat(srv, register(srv, tmp_path, ALICE), "--keepalive", "0.5")
        alice.expect(f"logged in as {ALICE}:0")
        session = None
        for _ in range(100):
            session = srv.sessions(ALICE).get(f"{ALICE}:0")
            if session is not None:
                break
            time.sleep(0.05)
        time.sleep(6)  # 3x the server's idle timeout, nothing typed
        alice.type(f"{BOB} still here")
        mid = alice.expect(f"-> {BOB}: still here").rsplit("[", 1)[1].rstrip("]")
        alice.expect(f"✓ {mid}")
        assert not [line for line in alice.lines if line.startswith("!!")], alice.lines
        assert srv.sessions(ALICE)[f"{ALICE}:0"] == session  # never reconnected
        alice.type("/quit")
        assert alice.finish() == 0
    finally:
        if alice is not None and alice.proc.poll() is None:
            alice.proc.kill()
            alice.proc.wait(5)
        assert srv.stop() == 0
    c = Chat(srv, tmp_path / "x.json", "--keepalive", "-1")
    assert c.finish() == 2  # a usage error, from argparse
    assert "expected seconds >= 0" in c.proc.stderr.read().decode()
