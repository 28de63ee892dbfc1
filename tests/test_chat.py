"""``pigeon chat`` as a user runs it: subprocesses with a terminal-like stdin and stdout."""

import contextlib
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time

import pytest
from serverutil import Server

ALICE, BOB = "491701234567", "4915112345678"


@pytest.fixture
def server(tmp_path):
    # verify-failures lifted: a test here types more wrong codes from 127.0.0.1
    srv = Server(tmp_path / "data", workers=2, verify_failures=100).start()
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
        bob.expect("4400000000000 is not a recipient; talking to " + ALICE + " again")
        bob.type("still you")  # the number the server refused did not stick
        alice.expect("still you")
        # a number typed with '+' (or too short) is refused, not sent as text to alice
        bob.type(f"+{ALICE} with plus")
        line = bob.expect("not sent: ")
        assert f"'+{ALICE}' is no number pigeon takes" in line and f"(type {ALICE})" in line
        bob.type("1234567 too short")
        bob.expect("'1234567' is no number pigeon takes")
        bob.type("100 thanks")  # a small number starts a line of text
        alice.expect("100 thanks")
        assert not any("with plus" in x or "too short" in x for x in alice.lines)
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
    # a wrong code asks again; the end of input gives up
    c = Chat(server, tmp_path / "x.json", "register", ALICE)
    c.expect("code:")
    c.type("000000" if server.code_for(ALICE) != "000000" else "111111")
    c.expect("type it again")
    c.expect("code:")
    assert c.finish() == 1
    assert "no code given: nothing registered" in c.proc.stderr.read().decode()
    # the server voids a code after code-attempts (5) wrong ones: the client stops there
    c = Chat(server, tmp_path / "x.json", "register", ALICE)
    c.expect("code:")
    wrong = "000000" if server.code_for(ALICE) != "000000" else "111111"
    for _ in range(4):
        c.type(wrong)
        c.expect("type it again")
    c.type(wrong)
    assert c.finish() == 1
    err = c.proc.stderr.read().decode()
    assert "the server refused: 301" in err and "5 times" in err and "for a new code" in err
    assert not os.path.exists(tmp_path / "x.json")


def test_register_never_replaces_a_profile_that_holds_a_device(server, tmp_path):
    """A second ``register`` into a profile in use replaced it silently: that account's
    device and its keys were gone.  It refuses now, before any code is sent; --force
    renames the old profile (and its encryption state) aside, still usable."""
    profile = register(server, tmp_path, ALICE)
    before = {p.name: p.read_bytes() for p in tmp_path.glob(f"{ALICE}.json*")}
    assert set(before) == {f"{ALICE}.json", f"{ALICE}.json.e2e", f"{ALICE}.json.e2e.key"}
    outbox = (server.data_dir / "sms-outbox.txt").read_text()
    c = Chat(server, profile, "register", BOB)
    assert c.finish() == 1
    err = c.proc.stderr.read().decode()
    assert f"{profile} already holds {ALICE}:0" in err and "--profile FILE" in err, err
    assert "--force" in err and "code:" not in c.proc.stdout.read().decode()
    assert {p.name: p.read_bytes() for p in tmp_path.glob(f"{ALICE}.json*")} == before
    assert (server.data_dir / "sms-outbox.txt").read_text() == outbox  # no code was sent
    # --force: the new device in the profile, the old one kept beside it, whole
    c = Chat(server, profile, "register", BOB, "--force")
    c.expect("code:")
    c.type(server.code_for(BOB))
    c.expect(f"registered {BOB}:0")
    kept = c.expect("held before is kept in").split(" kept in ", 1)[1].split(" ", 1)[0]
    assert c.finish() == 0
    assert json.loads(profile.read_text())["device"] == f"{BOB}:0"
    old = {p.name: p.read_bytes() for p in tmp_path.glob(os.path.basename(kept) + "*")}
    assert sorted(old.values()) == sorted(before.values()), old.keys()
    assert set(old) == {os.path.basename(kept) + s for s in ("", ".e2e", ".e2e.key")}
    for path, phone in ((kept, ALICE), (profile, BOB)):
        with terminals(Chat(server, path)) as (chat,):
            chat.expect(f"logged in as {phone}:0")
            chat.type("/quit")
            assert chat.finish() == 0


def test_an_idle_chat_stays_connected(tmp_path):
    """The reported symptom: an idle chat was closed with 130 every idle-timeout."""

    srv = Server(tmp_path / "data", workers=2, idle_timeout=2).start()
    alice = None
    try:
        register(srv, tmp_path, BOB)  # encrypted: its chat logs in once, its keys go up
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


# -- in a pseudo-terminal, as a person types: the line editor, commands, the session's end --

ROWS, COLS = 200, 160  # tall enough that nothing scrolls off the emulated screen


def _as_a_shell_starts_it() -> None:
    """In the child, before exec: SIGINT and SIGQUIT at their defaults, as an interactive
    shell starts a command in the foreground.  pytest may have them ignored (a shell
    without job control ignores them for a command it starts with '&'), and an ignored
    signal stays ignored across exec: Python keeps it so, asyncio.Runner then installs no
    handler of its own, and Ctrl-C typed in the terminal does nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


class Terminal:
    """``pigeon chat`` in a pseudo-terminal (pexpect); what it draws is rendered by a
    terminal emulator (pyte), so a test sees the screen a person would see."""

    def __init__(self, server, profile, *args):
        import pexpect
        import pyte

        cmd = ["-m", "pigeon.tools.cli", "chat", "--profile", str(profile),
               "--server", f"127.0.0.1:{server.port}", *args]  # fmt: skip
        # no cursor-position requests: nothing here answers them as a terminal would
        env = {**os.environ, "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1"}
        self.child = pexpect.spawn(sys.executable, cmd, env=env, encoding="utf-8",
                                   codec_errors="replace", dimensions=(ROWS, COLS),
                                   preexec_fn=_as_a_shell_starts_it)  # fmt: skip
        self.screen = pyte.Screen(COLS, ROWS)
        self.stream = pyte.Stream(self.screen)
        self.eof = False

    def lines(self) -> list[str]:
        return [line.rstrip() for line in self.screen.display if line.strip()]

    def _pump(self, wait: float) -> None:
        import pexpect

        try:
            self.stream.feed(self.child.read_nonblocking(65536, timeout=wait))
        except pexpect.TIMEOUT:
            pass
        except pexpect.EOF:
            self.eof = True

    def wait(self, predicate, what: str, timeout: float = 15.0):
        deadline = time.monotonic() + timeout
        while True:
            found = predicate(self.lines())
            if found:
                return found
            if self.eof or time.monotonic() > deadline:
                raise AssertionError(f"never saw {what}; the screen:\n" + "\n".join(self.lines()))
            self._pump(0.1)

    def expect(self, text: str, timeout: float = 15.0) -> str:
        """The first line on the screen with ``text`` (waiting for it)."""
        return self.wait(
            lambda ls: next((ln for ln in ls if text in ln), None), repr(text), timeout
        )

    def count(self, text: str) -> int:
        return sum(text in line for line in self.lines())

    def type(self, keys: str) -> None:
        self.child.send(keys)

    def enter(self, line: str) -> None:
        self.child.send(line + "\r")

    def finish(self, timeout: float = 15.0) -> int:
        """Wait for the chat to exit on its own; its exit status."""
        deadline = time.monotonic() + timeout
        while not self.eof and time.monotonic() < deadline:
            self._pump(0.2)
        self.child.close(force=not self.eof)
        assert self.eof, "the chat did not exit; the screen:\n" + "\n".join(self.lines())
        return self.child.exitstatus

    def kill(self) -> None:
        if self.child.isalive():
            self.child.close(force=True)


@contextlib.contextmanager
def _sigint_ignored():
    """SIGINT ignored in this (pytest's) process meanwhile, as a shell without job control
    (a script, ``( ... & )``) starts a background command: an ignored disposition is
    inherited across fork and exec."""
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


@contextlib.contextmanager
def terminals(*chats):
    try:
        yield chats
    finally:
        for c in chats:
            c.kill() if isinstance(c, Terminal) else _kill(c)


def _kill(c: Chat) -> None:
    if c.proc.poll() is None:
        c.proc.kill()
        c.proc.wait(5)


def test_commands_are_local_and_the_prompt_is_redrawn_under_incoming_lines(server, tmp_path):
    alice_profile = register(server, tmp_path, ALICE)
    bob_profile = register(server, tmp_path, BOB)
    with terminals(Terminal(server, alice_profile), Chat(server, bob_profile)) as (alice, bob):
        alice.expect(f"logged in as {ALICE}:0")
        bob.expect(f"logged in as {BOB}:0")
        alice.enter("/help")
        for shown in ("/to PHONE", "/quit", "//text", "/help", "✓✓ delivered"):
            alice.expect(shown)
        alice.enter(f"/to {BOB}")
        alice.expect(f"talking to {BOB}")
        # a typo of a command, and any unknown /word, stay here
        alice.enter("/qiut now")
        alice.expect("unknown command '/qiut', not sent: /help lists the commands")
        alice.enter("/hello bob")
        alice.expect("unknown command '/hello'")
        alice.enter("//etc/hosts is a file")  # '//' sends one '/'
        first = bob.expect(f"<- {ALICE}")  # FIFO: the first thing bob ever got
        assert first.endswith(": /etc/hosts is a file"), first
        # half a line typed, then a message comes in: it prints above the prompt,
        # which is drawn again below it with the half line still in it
        alice.type("hel")
        alice.wait(lambda ls: ls[-1] == f"{BOB}> hel", "the half-typed line")
        bob.type(f"{ALICE} ping from bob")
        alice.wait(lambda ls: ls[-1] == f"{BOB}> hel" and ls[-2].startswith(f"<- {BOB} ["),
                   "the message above the redrawn prompt")  # fmt: skip
        assert alice.expect("ping from bob").startswith(f"<- {BOB} [")
        alice.type("lo\r")
        assert bob.expect(f"<- {ALICE}").endswith(": hello")
        assert alice.count("ping from bob") == 1  # shown once, not echoed into the line
        alice.enter("/quit")
        assert alice.finish() == 0
        bob.type("/quit")
        assert bob.finish() == 0
    assert not [ln for ln in bob.lines if "qiut" in ln or "hello bob" in ln], bob.lines


def test_a_disabled_account_ends_the_chat_with_the_reason(server, tmp_path):
    alice_profile = register(server, tmp_path, ALICE)
    with terminals(Terminal(server, alice_profile)) as (alice,):
        alice.expect(f"logged in as {ALICE}:0")
        alice.type("half a line")
        proc = subprocess.run([sys.executable, "-m", "pigeon.tools.cli", "admin", "user",
                               "disable", ALICE, "--data-dir", str(server.data_dir)],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert alice.finish() == 1  # on its own: nothing more typed
        said = alice.expect("pigeon chat:")
        assert "the server ended the session (304" in said and "disabled" in said, said
    # a later start is refused at login, with what to do
    with terminals(Terminal(server, alice_profile)) as (alice,):
        assert alice.finish() == 1
        said = alice.expect("pigeon chat:")
        assert "login refused (300" in said and "disabled" in said, said


def test_reconnects_are_shown(server, tmp_path):
    alice_profile = register(server, tmp_path, ALICE)
    bob_profile = register(server, tmp_path, BOB)
    with terminals(Terminal(server, alice_profile), Chat(server, bob_profile)) as (alice, bob):
        alice.expect(f"logged in as {ALICE}:0")
        bob.expect(f"logged in as {BOB}:0")
        for _ in range(100):
            if f"{ALICE}:0" in server.sessions(ALICE):
                break
            time.sleep(0.05)
        worker = server.sessions(ALICE)[f"{ALICE}:0"]["worker"]
        os.kill(server.worker_pid(worker), signal.SIGKILL)
        assert alice.expect("!! reconnecting…").startswith("!! reconnecting… (")
        alice.expect("back online", timeout=30)
        alice.enter(f"{BOB} after the gap")
        assert bob.expect(f"<- {ALICE}").endswith(": after the gap")
        alice.enter("/quit")
        assert alice.finish() == 0
        bob.type("/quit")
        assert bob.finish() == 0


def test_what_is_typed_while_reconnecting_waits_and_goes_out_in_order(server, tmp_path):
    """A message typed while the chat was reconnecting was refused ("not connected
    (reconnecting)"): the SDK needs the connection to fetch the recipient's device
    list and keys.  It waits now, shown so, and goes out once back online, in the
    order typed, with its ticks; past --waiting-max one is refused, saying so."""
    alice_profile = register(server, tmp_path, ALICE)
    bob_profile = register(server, tmp_path, BOB)
    alice = Chat(server, alice_profile, "--waiting-max", "2")
    with terminals(alice, Chat(server, bob_profile)) as (alice, bob):
        alice.expect(f"logged in as {ALICE}:0")
        bob.expect(f"logged in as {BOB}:0")
        assert server.stop() == 0
        alice.expect("!! reconnecting… (")
        alice.type(f"{BOB} one, typed offline")  # never written to bob: no keys held yet
        alice.type("two, typed offline")
        alice.type("three, one too many")
        shown = [alice.expect(text) for text in ("one, typed offline", "two, typed offline")]
        assert all(ln.endswith("] (waiting for the connection)") for ln in shown), shown
        mids = [ln.split(" [", 1)[1].split("]")[0] for ln in shown]
        alice.expect("!! not sent: 2 message(s) wait for the connection already (--waiting-max)")
        server.start()  # the same port and data
        alice.expect("back online: sending 2 waiting message(s)", timeout=30)
        for text in ("one, typed offline", "two, typed offline"):  # in the order typed
            assert bob.expect(f"<- {ALICE}", timeout=30).endswith(": " + text)
        for mid in mids:  # the ticks, as usual
            alice.expect(f"✓ {mid}")
            alice.expect(f"read {mid}")
        alice.type("four, online again")
        assert bob.expect(f"<- {ALICE}").endswith(": four, online again")
        assert not [ln for ln in alice.lines if "not sent [" in ln], alice.lines
        assert not [ln for ln in bob.lines if "three" in ln], bob.lines
        alice.type("/quit")
        assert alice.finish() == 0
        bob.type("/quit")
        assert bob.finish() == 0


def test_ticks_of_an_earlier_run_show_after_a_restart(server, tmp_path):
    import asyncio

    from pigeon.client import Client, Credentials
    from pigeon.client.secure import DecryptedMessage

    alice_profile = register(server, tmp_path, ALICE)
    bob_profile = register(server, tmp_path, BOB)
    bob_creds = Credentials.from_json(json.loads(bob_profile.read_text()))
    # a profile that already remembers 1,000 unread messages: the oldest goes
    profile = json.loads(alice_profile.read_text())
    profile["pending"] = {f"old{i}": [BOB, "✓"] for i in range(1000)}
    alice_profile.write_text(json.dumps(profile))
    with terminals(Terminal(server, alice_profile)) as (alice,):
        alice.expect(f"logged in as {ALICE}:0")
        alice.enter(f"{BOB} while you were away")  # bob is offline: stored, one tick
        mid = alice.expect(f"-> {BOB}: while you were away").rsplit("[", 1)[1].rstrip("]")
        alice.expect(f"✓ {mid}")
        alice.enter("/quit")
        assert alice.finish() == 0
    assert alice_profile.stat().st_mode & 0o777 == 0o600
    pending = json.loads(alice_profile.read_text())["pending"]
    assert len(pending) == 1000 and "old0" not in pending and pending[mid] == [BOB, "✓"]

    async def bob_reads():  # bob's own client: it acks (two ticks) and reads (blue)
        bob = await Client.connect("127.0.0.1", server.port, plaintext=False,
                                   profile=f"{bob_profile}.e2e")  # fmt: skip
        await bob.login(bob_creds)
        ev = await bob.next_event(10)
        assert type(ev) is DecryptedMessage, ev
        assert ev.id == mid and ev.body == b"while you were away"
        await bob.ack(ev.seq)
        await bob.receipt(ALICE, ev.id, "read")
        await bob.close()

    asyncio.run(asyncio.wait_for(bob_reads(), 30))
    with terminals(Terminal(server, alice_profile)) as (alice,):
        alice.expect(f"logged in as {ALICE}:0")
        alice.expect(f"✓✓ {mid}")
        alice.expect(f"read {mid}")
        alice.enter("/quit")
        assert alice.finish() == 0
    profile = json.loads(alice_profile.read_text())
    assert mid not in profile["pending"] and len(profile["pending"]) == 999  # read: pruned
    assert alice_profile.stat().st_mode & 0o777 == 0o600


def test_register_asks_again_for_a_wrong_code_and_outlives_the_login_deadline(tmp_path):
    """The server's login deadline (1 s here, 10 s by default) closes the connection
    while the person reads the SMS; the code is then checked on a new one."""
    import psutil

    srv = Server(tmp_path / "data", workers=2, login_timeout=1).start()
    try:
        profile = tmp_path / "alice.json"
        with terminals(Terminal(srv, profile, "register", ALICE)) as (c,):
            hint = c.expect("a code was sent to")
            assert "<data-dir>/sms-outbox.txt" in hint or "sms-outbox.txt" in c.expect("outbox")
            c.expect("code:")
            code = srv.code_for(ALICE)
            c.enter("000000" if code != "000000" else "111111")
            c.expect("type it again")
            c.wait(lambda ls: ls[-1].startswith("code:") and len([ln for ln in ls if ln.startswith("code:")]) == 2, "a second code prompt")  # fmt: skip
            chat = psutil.Process(c.child.pid)
            for _ in range(200):  # the server closes the idle, not logged-in connection
                if not [
                    s for s in chat.net_connections("tcp") if s.raddr and s.raddr[1] == srv.port
                ]:
                    break
                time.sleep(0.05)
            else:
                raise AssertionError("the server never closed the registering connection")
            c.enter(code)
            c.expect(f"registered {ALICE}:0")
            assert c.finish() == 0
        assert profile.stat().st_mode & 0o777 == 0o600
        assert json.loads(profile.read_text())["device"] == f"{ALICE}:0"
    finally:
        assert srv.stop() == 0


def test_a_device_list_notice_is_shown_and_acked(server, tmp_path):
    """A companion's chat is told when its account's devices change (a link from
    the primary, here the SDK's), and acks the notice like a message."""
    import asyncio

    from pigeon.tools.chat import save_profile

    async def link_one(alice):
        comp = await server.client()
        it = comp.pair_qr()
        code = await it.__anext__()
        _, creds = await asyncio.gather(alice.link(code.qr), it.__anext__())
        await comp.close()
        return creds

    async def primary_links(creds=None):
        creds = creds or await server.register(ALICE)
        alice = await server.login(creds)
        try:
            return creds, await link_one(alice)
        finally:
            await alice.close()

    primary, desktop = asyncio.run(asyncio.wait_for(primary_links(), 60))
    profile = tmp_path / "desktop.json"
    save_profile(str(profile), desktop.to_json())
    with terminals(Chat(server, profile)) as (desk,):
        desk.expect(f"logged in as {desktop.device}")
        asyncio.run(asyncio.wait_for(primary_links(primary), 60))  # a second companion
        desk.expect("your devices changed")
        deadline = time.monotonic() + 15
        while any(d["device"] == desktop.device for d in server.queue_stats(100)["top"]):
            assert time.monotonic() < deadline, "the notice was not acked"
            time.sleep(0.1)
        desk.type("/quit")
        assert desk.finish() == 0


def test_a_peer_linking_a_device_is_no_alarm(server, tmp_path):
    """Linking a device queues a keys-changed notice to the account's contacts
    (PROTOCOL.md 9c); the chat showed it as "keys changed (a new phone, or
    someone in the middle)" although the primary's key was the same.  Now
    the notice is said plainly until /verify has seen a key, and after that
    the alarm comes only if the primary's key is not that one."""
    import asyncio

    async def link_one(creds):
        alice = await server.login(creds)
        await alice.send(BOB, b"hi bob")  # (the notice goes to those she writes to)
        comp = await server.client()
        it = comp.pair_qr()
        code = await it.__anext__()
        await asyncio.gather(alice.link(code.qr), it.__anext__())
        await comp.close()
        await alice.close()

    alice_creds = asyncio.run(asyncio.wait_for(server.register(ALICE), 30))
    bob_profile = register(server, tmp_path, BOB)
    # (plaintext: alice here is the SDK's, with no encryption keys published)
    with terminals(Chat(server, bob_profile, "--plaintext")) as (bob,):
        bob.expect(f"logged in as {BOB}:0")
        bob.type(f"{ALICE} hi")
        bob.expect(f"-> {ALICE}: hi")
        asyncio.run(asyncio.wait_for(link_one(alice_creds), 60))
        bob.expect("hi bob")
        bob.expect(f"{ALICE}'s devices or keys changed: /verify {ALICE}")
        bob.type(f"/verify {ALICE}")
        bob.expect(f"safety number with {ALICE}")
        asyncio.run(asyncio.wait_for(link_one(alice_creds), 60))
        bob.expect("hi bob")  # her message, then the notice of her second link
        time.sleep(3)  # the key check after the notice is a query away
        bob.type("/to")
        bob.expect("talking to")
        assert not any("someone in the middle" in x for x in bob.lines), bob.lines
        bob.type("/quit")
        assert bob.finish() == 0


def test_what_another_device_of_the_account_sent_shows_as_sent(server, tmp_path):
    """A sync copy (the account's phone wrote to bob) showed on the laptop as
    '<- ALICE: ...', incoming from its own number, and the chat sent a read
    receipt to itself for it.  Now it is '-> BOB (sent from ALICE:0)'."""
    import asyncio

    from pigeon.tools.chat import save_profile

    async def phone_links():
        creds = await server.register(ALICE)
        await server.register(BOB)
        alice = await server.login(creds)
        comp = await server.client()
        it = comp.pair_qr()
        code = await it.__anext__()
        _, laptop = await asyncio.gather(alice.link(code.qr), it.__anext__())
        await comp.close()
        await alice.close()
        return creds, laptop

    async def phone_writes(creds):
        alice = await server.login(creds)
        await alice.send(BOB, b"from the phone")
        await alice.close()

    def phone_queue() -> int:
        top = server.queue_stats(1000)["top"]
        return sum(d["count"] for d in top if d["device"] == f"{ALICE}:0")

    phone, laptop = asyncio.run(asyncio.wait_for(phone_links(), 60))
    profile = tmp_path / "laptop.json"
    save_profile(str(profile), laptop.to_json())
    with terminals(Chat(server, profile, "--plaintext")) as (desk,):
        desk.expect(f"logged in as {laptop.device}")
        asyncio.run(asyncio.wait_for(phone_writes(phone), 60))
        before = phone_queue()
        line = desk.expect("from the phone")
        assert line.startswith(f"-> {BOB} (sent from {ALICE}:0) ["), line
        desk.type("/quit")
        assert desk.finish() == 0
    # no read receipt for it went to the (offline) phone
    assert phone_queue() == before


# -- linking a second device: `pigeon chat link` on it, /link, /devices, /unlink on the primary --


def _qr_text(term: Terminal) -> str:
    """The QR text the companion's terminal shows under its code (for copy and paste)."""
    line = term.expect("/link PGN1,")
    return line.split("/link ", 1)[1].strip()


def _qr_from_screen(term: Terminal) -> str:
    """Read the QR code drawn on the screen back as a camera would: its half-block
    characters become a PNG (zxing-cpp needs pixels), which zxing-cpp decodes."""
    import io

    import zxingcpp
    from PIL import Image

    rows = [ln for ln in term.screen.display if any(ch in ln for ch in "█▀▄")]
    width = max(len(r) for r in rows)
    # compact: each character is two modules high; the border is drawn in the
    # "light" color, so a lit half is light (255) and a blank one dark (0)
    img = Image.new("L", (width, 2 * len(rows)), 0)
    px = img.load()
    for y, row in enumerate(rows):
        for x, ch in enumerate(row.ljust(width)):
            top = ch in "█▀"
            bottom = ch in "█▄"
            px[x, 2 * y] = 255 if top else 0
            px[x, 2 * y + 1] = 255 if bottom else 0
    big = img.resize((width * 6, 2 * len(rows) * 6), Image.NEAREST)
    png = io.BytesIO()
    big.save(png, "PNG")
    png.seek(0)
    found = zxingcpp.read_barcodes(Image.open(png))
    assert len(found) == 1 and found[0].format == zxingcpp.BarcodeFormat.QRCode, found
    return found[0].text


def test_link_a_second_terminal_by_qr_code_then_devices_and_unlink(server, tmp_path):
    alice_profile = register(server, tmp_path, ALICE)
    bob_profile = register(server, tmp_path, BOB)
    desk_profile = tmp_path / "desk.json"
    with terminals(
        Terminal(server, alice_profile),
        Terminal(server, desk_profile, "link", "--name", "desktop"),
    ) as (alice, pairing):
        alice.expect(f"logged in as {ALICE}:0")
        text = _qr_text(pairing)
        assert text.startswith("PGN1,") and text.endswith(f",127.0.0.1:{server.port}")
        assert _qr_from_screen(pairing) == text  # the drawn code holds the same text
        alice.enter(f"/link {text}")
        alice.expect(f"linked {ALICE}:1")
        pairing.expect(f"linked as {ALICE}:1; saved to {desk_profile}")
        pairing.expect(f"pigeon chat --profile {desk_profile}")
        assert pairing.finish() == 0
        alice.expect("your devices changed")  # the notice of the link
    assert desk_profile.stat().st_mode & 0o777 == 0o600
    saved = json.loads(desk_profile.read_text())
    assert saved["device"] == f"{ALICE}:1" and saved["phone"] == ALICE
    for state in (f"{desk_profile}.e2e", f"{desk_profile}.e2e.key"):  # the Olm account: 0600
        assert os.stat(state).st_mode & 0o777 == 0o600
    # a profile that holds a device is never overwritten by a link
    with terminals(Terminal(server, alice_profile, "link")) as (again,):
        assert again.finish() == 1
        assert f"already holds {ALICE}:0" in again.expect("pigeon chat:")
    with terminals(
        Terminal(server, alice_profile), Terminal(server, desk_profile), Chat(server, bob_profile)
    ) as (alice, desk, bob):
        alice.expect(f"logged in as {ALICE}:0")
        desk.expect(f"logged in as {ALICE}:1")
        bob.expect(f"logged in as {BOB}:0")
        desk.enter(f"{BOB} from the desktop")
        assert bob.expect("from the desktop").startswith(f"<- {ALICE} [")
        alice.enter("/devices")
        alice.expect(f"devices of {ALICE}:")
        primary = alice.expect("(this device)")
        assert primary.split()[0] == "0" and "primary" in primary, primary
        companion = alice.expect(" desktop ")
        assert companion.split()[0] == "1" and "linked 20" in companion, companion
        assert "(this device)" not in companion
        desk.enter("/devices")
        assert desk.expect("(this device)").split()[0] == "1"
        # a companion may not unlink the primary, nor anything else but itself
        desk.enter("/unlink 0")
        desk.expect("!! not unlinked:")
        alice.enter("/unlink x")
        alice.expect("N is a device number")
        alice.enter("/unlink 1")
        alice.expect(f"unlinked {ALICE}:1")
        assert desk.finish() == 1  # its session was closed at once
        said = desk.expect("pigeon chat:")
        assert "304 this device was unlinked" in said and "pigeon chat link" in said, said
        alice.enter("/devices")
        alice.wait(lambda ls: ls.count(f"   devices of {ALICE}:") == 2 and " desktop " not in ls[-2],
                   "the second list without the desktop")  # fmt: skip
        alice.enter("/quit")
        assert alice.finish() == 0
        bob.type("/quit")
        assert bob.finish() == 0


def test_link_by_code_and_the_errors_of_linking(server, tmp_path):
    alice_profile = register(server, tmp_path, ALICE)
    tablet_profile = tmp_path / "tablet.json"
    with terminals(
        Terminal(server, alice_profile),
        Terminal(server, tablet_profile, "link", "--code", ALICE),
    ) as (alice, pairing):
        alice.expect(f"logged in as {ALICE}:0")
        shown = pairing.expect("on the primary, type:  /link ").rsplit(" ", 1)[1]
        assert len(shown) == 9 and shown[4] == "-", shown  # ABCD-2345
        alice.enter("/link nonsense")
        alice.expect("!! /link takes the text under the new device's QR code")
        alice.enter("/link ZZZZ-ZZZZ" if shown != "ZZZZ-ZZZZ" else "/link YYYY-YYYY")
        alice.expect("!! not linked: no such code")  # 305, one line
        alice.enter("/link " + shown.replace("-", "").lower())  # no dash, any case
        alice.expect(f"linked {ALICE}:1")
        pairing.expect(f"linked as {ALICE}:1; saved to {tablet_profile}")
        assert pairing.finish() == 0
        alice.enter("/link " + shown)  # used: 307
        alice.expect("!! not linked: that code was used already")
        alice.enter("/quit")
        assert alice.finish() == 0
    # only the primary links
    with terminals(Terminal(server, tablet_profile)) as (tablet,):
        tablet.expect(f"logged in as {ALICE}:1")
        tablet.enter("/link ABCD-2345")
        tablet.expect("!! not linked: only the primary device (number 0) may link")
        tablet.enter("/unlink 1")  # a companion unlinks itself: the chat ends, saying so
        assert tablet.finish() == 1
        said = tablet.expect("pigeon chat:")
        assert f"{ALICE}:1 was unlinked here" in said and "pigeon chat link" in said, said


def test_link_expiry_and_ctrl_c_say_what_to_do(tmp_path):
    srv = Server(tmp_path / "data", workers=2, pair_ttl=1, pair_refreshes=1).start()
    try:
        with terminals(Terminal(srv, tmp_path / "a.json", "link")) as (pairing,):
            first = _qr_text(pairing)
            pairing.wait(lambda ls: any("a new code" in ln for ln in ls), "a refreshed code")
            # while the new code is drawn over the old one the QR line can be off the screen
            pairing.wait(lambda ls: any("/link PGN1," in ln and ln.split("/link ", 1)[1].strip() != first
                                        for ln in ls), "the new QR text")  # fmt: skip
            # drawn over the old one: one code on the screen, the one that works
            assert pairing.count("/link PGN1,") == 1, pairing.lines()
            assert pairing.count("scan it on the primary") == 1, pairing.lines()
            assert pairing.finish() == 1
            said = pairing.expect("pigeon chat:")
            assert "the code expired, run pigeon chat link again" in said, said
        assert not (tmp_path / "a.json").exists()
    finally:
        assert srv.stop() == 0
    # Ctrl-C on a server whose codes live long enough (with pair-ttl 1 a busy
    # machine can let the code expire before the keystroke arrives)
    srv = Server(tmp_path / "data2", workers=1).start()
    try:
        # spawned as when pytest itself ignores SIGINT (started with '&' by a shell without
        # job control): the Ctrl-C must work however the suite was started
        with _sigint_ignored():
            chat = Terminal(srv, tmp_path / "b.json", "link", "--code", ALICE)
        with terminals(chat) as (pairing,):
            pairing.expect("(valid")
            pairing.type("\x03")  # Ctrl-C
            assert pairing.finish() == 130
            pairing.expect("interrupted: nothing linked")
            assert not [ln for ln in pairing.lines() if "Traceback" in ln], pairing.lines()
        # and at register's code prompt (it was a traceback ending in Interrupted)
        with _sigint_ignored():
            chat = Terminal(srv, tmp_path / "c.json", "register", BOB)
        with terminals(chat) as (asking,):
            asking.expect("code:")
            asking.type("\x03")
            assert asking.finish() == 130
            asking.expect("interrupted: nothing registered")
            assert not [ln for ln in asking.lines() if "Traceback" in ln], asking.lines()
        assert not (tmp_path / "c.json").exists()
        assert not (tmp_path / "b.json").exists()
    finally:
        assert srv.stop() == 0


def test_verify_shows_the_same_safety_number_on_both_sides(server, tmp_path):
    alice_profile = register(server, tmp_path, ALICE)
    bob_profile = register(server, tmp_path, BOB)
    alice, bob = Chat(server, alice_profile), Chat(server, bob_profile)
    try:
        alice.expect(f"logged in as {ALICE}:0")
        bob.expect(f"logged in as {BOB}:0")
        alice.type("/verify 12")
        alice.expect("/verify PHONE: PHONE is a number")
        alice.type(f"/verify {BOB}")
        bob.type(f"/verify {ALICE}")
        alice.expect(f"safety number with {BOB}:")
        bob.expect(f"safety number with {ALICE}:")
        digits_a = alice.expect("   ").split()
        digits_b = bob.expect("   ").split()
        assert len(digits_a) == 12 and all(len(g) == 5 and g.isdigit() for g in digits_a)
        assert digits_a == digits_b  # both phones show the same 60 digits
        qr_a, qr_b = alice.expect("QR: PGNV1,"), bob.expect("QR: PGNV1,")
        assert qr_a == qr_b
        # the number is made from the two primaries' identity keys in the profiles
        from pigeon.client.e2e import safety_number
        from pigeon.client.secure import SecureState

        # the identity keys are the Olm accounts' Ed25519 keys, in the encryption state
        keys = [SecureState(f"{p}.e2e").device.ed25519 for p in (alice_profile, bob_profile)]
        assert "".join(digits_a) == safety_number(ALICE, keys[0], BOB, keys[1])
        alice.type("/quit")
        bob.type("/quit")
        assert alice.finish() == 0 and bob.finish() == 0
        assert json.loads(alice_profile.read_text())["keys"][BOB] == keys[1].hex()
    finally:
        for c in (alice, bob):
            if c.proc.poll() is None:
                c.proc.kill()
                c.proc.wait(5)


def test_send_a_file_and_the_recipient_saves_it(tmp_path):
    """/send FILE: a progress line, the ✓; the recipient's terminal saves it into
    --media-dir, decrypted, under the sender's file name; in a group, every member's."""
    srv = Server(tmp_path / "data", workers=2, media=True).start()
    try:
        alice_profile = register(srv, tmp_path, ALICE)
        bob_profile = register(srv, tmp_path, BOB)
        inbox = tmp_path / "inbox"
        alice = Chat(srv, alice_profile)
        bob = Chat(srv, bob_profile, "--media-dir", str(inbox))
        try:
            alice.expect(f"logged in as {ALICE}:0")
            bob.expect(f"logged in as {BOB}:0")
            doc = tmp_path / "report.pdf"
            doc.write_bytes(os.urandom(300_000))
            alice.type(f"/to {BOB}")
            alice.type(f"/send {doc}")
            alice.expect(f"-> {BOB}: sending report.pdf (293.0 KiB)")
            assert "100%" in alice.expect("report.pdf: 100%")
            alice.expect("✓ ")
            assert "[document: report.pdf, 293.0 KiB] saving" in bob.expect("<- " + ALICE)
            bob.expect(f"saved {inbox / 'report.pdf'}")
            assert (inbox / "report.pdf").read_bytes() == doc.read_bytes()
            alice.type("/send /no/such/file")
            alice.expect("no such file")
            alice.type(f"/send {tmp_path}")  # a directory: said so (was "no such file")
            alice.expect(f"{tmp_path} is a directory: /send takes one file")
            # and to a group: its members save it too (it showed as the payload's bytes)
            alice.type(f"/group new team {BOB}")
            alice.expect("group team made (g:")
            bob.expect("you are in the group team")
            alice.type("/to team")
            notes = tmp_path / "notes.txt"
            notes.write_bytes(b"minutes of the meeting\n" * 100)
            alice.type(f"/send {notes}")
            alice.expect("-> team: sending notes.txt (2.2 KiB)")
            line = bob.expect(f"<- team/{ALICE}")
            assert "[document: notes.txt, 2.2 KiB] saving" in line, line
            bob.expect(f"saved {inbox / 'notes.txt'}")
            assert (inbox / "notes.txt").read_bytes() == notes.read_bytes()
            alice.type("/quit")
            bob.type("/quit")
            assert alice.finish() == 0 and bob.finish() == 0
        finally:
            for c in (alice, bob):
                if c.proc.poll() is None:
                    c.proc.kill()
                    c.proc.wait(5)
    finally:
        assert srv.stop() == 0


def test_a_file_that_could_not_be_fetched_is_said_and_not_marked_read(tmp_path):
    """The recipient's chat sent "read" for a file as it showed the line, so the sender
    saw it read when its download had failed.  Now the failure is said, with /save N to
    try again, and "read" goes once the file is saved."""
    srv = Server(tmp_path / "data", workers=2, media=True).start()
    try:
        alice_profile = register(srv, tmp_path, ALICE)
        bob_profile = register(srv, tmp_path, BOB)
        inbox = tmp_path / "inbox"
        doc = tmp_path / "report.pdf"
        doc.write_bytes(os.urandom(50_000))
        with terminals(Chat(srv, alice_profile)) as (alice,):
            alice.expect(f"logged in as {ALICE}:0")
            alice.type(f"/to {BOB}")
            alice.type(f"/send {doc}")  # bob is not online: it waits in his queue
            file_mid = alice.expect("   ✓ ").split()[1]
            [stored] = (srv.data_dir / "media" / "objects").glob("*/*")
            stored.rename(tmp_path / "away")  # the media service lost it (a disk, a purge)
            with terminals(Chat(srv, bob_profile, "--media-dir", str(inbox))) as (bob,):
                assert "[document: report.pdf" in bob.expect(f"<- {ALICE}")
                failed = bob.expect("could not save report.pdf")
                assert "/save 1 tries again" in failed, failed
                alice.expect(f"✓✓ {file_mid}")  # it reached bob's device: true
                alice.type("and a text")
                text_mid = alice.expect("-> " + BOB + ": and a text").split("[")[1].rstrip("]")
                bob.expect("and a text")
                alice.expect(f"read {text_mid}")  # bob's receipts come in order
                assert not [ln for ln in alice.lines if f"read {file_mid}" in ln], alice.lines
                (tmp_path / "away").rename(stored)
                bob.type("/save 1")
                bob.expect("fetching report.pdf")
                bob.expect(f"saved {inbox / 'report.pdf'}")
                assert (inbox / "report.pdf").read_bytes() == doc.read_bytes()
                alice.expect(f"read {file_mid}")  # now it is
                bob.type("/quit")
                assert bob.finish() == 0
            alice.type("/quit")
            assert alice.finish() == 0
    finally:
        assert srv.stop() == 0


# -- groups: /group new, sending by name, notices, /group info|add|remove|invite|leave --------

CAROL = "4915199887766"


def test_groups_by_name_notices_invite_and_leave(server, tmp_path):
    profiles = {p: register(server, tmp_path, p) for p in (ALICE, BOB, CAROL)}
    with terminals(*(Chat(server, profiles[p]) for p in (ALICE, BOB, CAROL))) as (a, b, c):
        for term, phone in ((a, ALICE), (b, BOB), (c, CAROL)):
            term.expect(f"logged in as {phone}:0")
        a.type(f"/group new team {BOB} 12ab")
        a.expect("not phone numbers (8-15 digits, no '+'): 12ab")
        a.type(f"/group new team {BOB}")
        a.expect("group team made (g:")
        # a group this chat has no name for yet: its address, then its subject as name
        assert b.expect(f"{ALICE} made the group").startswith("** g:")
        b.expect("you are in the group team")
        # a line NAME text goes to the group; the members show it under the group's name
        a.type("team hello, team")
        assert b.expect(f"<- team/{ALICE}").endswith("hello, team")
        first = a.expect("-> team: hello, team").rsplit("[", 1)[1].rstrip("]")
        a.expect(f"✓ {first}")  # acked: bob holds alice's key now
        a.type("team and again")  # (no key share in this one)
        mid = a.expect("-> team: and again").rsplit("[", 1)[1].rstrip("]")
        assert b.expect(f"<- team/{ALICE}").endswith("and again")
        assert a.expect(f"✓✓ {mid}:").endswith(BOB)  # the group's receipt names who got it
        assert a.expect(f"read {mid}:").endswith(BOB)  # and who read it
        b.type("team hi alice")
        assert a.expect(f"<- team/{BOB}").endswith("hi alice")
        # only admins add: bob is refused, alice adds carol
        b.type(f"/group add team {CAROL}")
        b.expect("only the group's admins may do that")
        a.type(f"/group add team {CAROL}")
        a.expect(f"team: added {CAROL}")
        b.expect(f"** team: {ALICE} added {CAROL}")
        c.expect("you are in the group team")
        a.type("/to team")
        a.expect("talking to the group team")
        a.type("now three of us")
        for term in (b, c):
            assert term.expect(f"<- team/{ALICE}").endswith("now three of us")
        a.type("/group info team")
        line = a.expect("members (* admin):")
        assert f"{ALICE}*" in line and BOB in line and CAROL in line
        # removed: carol is told, gets nothing after; an invite code brings her back
        a.type(f"/group remove team {CAROL}")
        c.expect(f"** team: {ALICE} removed {CAROL}")
        a.type("team carol is out")
        b.expect("carol is out")
        a.type("/group invite team")
        code = a.expect("invite code of team:").split(":", 1)[1].split()[0]
        c.type(f"/group join {code}")
        c.expect("joined team")
        a.type("team welcome back")
        c.expect("welcome back")
        assert not any("carol is out" in ln for ln in c.lines)
        c.type("/group leave team")
        c.expect("left team")
        a.expect(f"** team: {CAROL} left")
        c.type("/groups")
        c.expect("no groups yet")
        c.type("/group info nosuch")
        c.expect("no group called 'nosuch'")
        for term in (a, b, c):
            term.type("/quit")
            assert term.finish() == 0


def test_groups_lists_each_group_once_by_name_and_the_subject_only_where_it_differs(
    server, tmp_path
):
    """/groups printed "team  (g:1): team", the name and then the same word as the
    subject, on every line; and a second group with the subject "team" showed as
    "team-2  (g:2): team", near the same."""
    import asyncio

    register(server, tmp_path, BOB)
    alice = Chat(server, register(server, tmp_path, ALICE))
    with terminals(alice) as (a,):
        a.expect(f"logged in as {ALICE}:0")
        a.type(f"/group new team {BOB}")
        mine = a.expect("group team made (").split("(", 1)[1].split(")")[0]
        a.type("/groups")
        a.expect("your groups (1)")
        assert a.expect("team  (").strip() == f"team  ({mine})"
        # this chat's own /group new says it once: its notice showed as well, under the
        # group's address, and then "you are in the group team"
        assert not [ln for ln in a.lines if mine in ln or "team" in ln], a.lines

        async def carol_makes_groups():  # subjects this chat can not take as names as they are
            carol = await server.login(await server.register(CAROL))
            made = [(await carol.group_create(subject, [ALICE])).group
                    for subject in ("team", "road trip")]  # fmt: skip
            await carol.close()
            return made

        team, trip = asyncio.run(asyncio.wait_for(carol_makes_groups(), 60))
        a.expect("you are in the group team-2")
        a.expect("you are in the group road-trip")
        a.type("/groups")
        assert a.expect("your groups").endswith("your groups (3); 'NAME text' writes to one:")
        assert a.expect("team  (").strip() == f"team  ({mine})"
        assert a.expect("team-2  (").strip() == f"team-2  ({team}), subject 'team'"
        assert a.expect("road-trip  (").strip() == f"road-trip  ({trip}), subject 'road trip'"
        a.type("/quit")
        assert a.finish() == 0
        listed = [ln for ln in a.lines if re.match(r"   \S+  \(g:", ln)]
        assert not listed, listed  # one line a group


def test_a_peers_bad_or_foreign_media_payload_neither_ends_the_chat_nor_is_fetched(tmp_path):
    """A stranger's document payload with "size": "huge" ended ``pigeon chat`` (the
    reader died on rendering it); one naming a URL on another host was fetched at once,
    telling that host the user's address and when it is online (probe6).  Now the
    first is shown as a text and the second as not saved; nothing connects to it
    until the user types ``/save N``."""
    import asyncio
    import select
    import socket

    import msgpack

    srv = Server(tmp_path / "data", workers=2, media=True).start()
    trap = socket.socket()
    trap.bind(("127.0.0.2", 0))
    trap.listen(8)
    trap.setblocking(False)
    try:
        bob_profile = register(srv, tmp_path, BOB)
        bob = Chat(srv, bob_profile, "--media-dir", str(tmp_path / "inbox"))
        try:
            bob.expect(f"logged in as {BOB}:0")
            good = {"v": 1, "url": f"http://127.0.0.2:{trap.getsockname()[1]}/track",
                    "id": "ab" * 32, "token": b"t", "key": b"k" * 32, "nonce": b"n" * 12,
                    "sha256": b"s" * 32, "size": 10, "enc_size": 26, "mime": "text/plain",
                    "name": "x.txt"}  # fmt: skip

            async def mallory():
                c = await srv.login(await srv.register(CAROL))
                await c.send(BOB, msgpack.packb({**good, "size": "huge"}), type="document")
                await c.send(BOB, msgpack.packb(good), type="document")
                await c.send(BOB, "invoice\u202efdp.exe \x1b]0;owned\x07 👨\u200d👩".encode())
                await c.send(BOB, b"still there?")
                await c.close()

            asyncio.run(asyncio.wait_for(mallory(), 60))
            bob.expect("<- " + CAROL)  # the bad one: shown as a text, not a media file
            assert "on another host (127.0.0.2): not saved" in bob.expect("not saved")
            # a peer's text cannot reorder or restyle the terminal (an emoji's joiner stays)
            line = bob.expect("invoice")
            assert "invoice\\u202efdp.exe \\x1b]0;owned\\x07 👨\u200d👩" in line, line
            bob.expect("still there?")  # the chat goes on
            with pytest.raises(BlockingIOError):
                trap.accept()  # nothing was fetched
            bob.type("/save 7")
            assert "(1)" in bob.expect("/save N: N is the number")  # what can be saved
            bob.type("/save 1")  # the user's choice: now it is fetched from there
            bob.expect("fetching x.txt from 127.0.0.2")
            bob.type("/save 1")  # once: not again while it is under way
            bob.expect("none now")
            readable, _, _ = select.select([trap], [], [], 30)
            assert readable, "/save did not fetch the file"
            trap.accept()[0].close()
            bob.type("/quit")
            assert bob.finish() == 0
        finally:
            if bob.proc.poll() is None:
                bob.proc.kill()
                bob.proc.wait(5)
    finally:
        trap.close()
        assert srv.stop() == 0
