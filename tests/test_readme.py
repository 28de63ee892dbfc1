"""README.md's commands, run as a new user runs them (those safe to run in a test).

The commands are read out of README.md, not copied into this file: the two
commands at the top, the "Try it" section (serve, register two users with
the code from the outbox file it names, chat between them, the admin
commands it shows), ``pigeon admin decode``/``tokens``/``gen-cert``/
``provision`` wherever the README shows them, and the ``bench report`` line.
A README that drifts from the code (a wrong outbox path, a flag that went,
a number typed to nobody) fails here.

What is changed from the README's text, and why (nothing else is):

- The working directory is a temporary one: it stands for the checkout the
  README's commands run in.  ``var/`` (the server's default data directory,
  relative to the cwd), ``a.json`` and ``b.json`` are relative to it, as in
  the README, so the default data directory itself is what is tested.
- ``.venv/bin/pigeon`` (and a bare ``pigeon``) is the console script of the
  environment running the tests, next to ``sys.executable``: what the first
  command's ``pip install .`` makes.  The setup half of the two commands
  (venv, pip) is not run here: the suite runs inside what it made, and
  ``.ci/run`` runs the second command itself.
- The listeners: the defaults (127.0.0.1:7650, metrics 7659, media 7652)
  may be taken on a shared machine, so ``serve`` gets ``--listen``,
  ``--metrics-listen`` and ``--media-listen`` on free loopback ports and ``chat`` gets
  ``--server`` with that port.
- ``provision --count 1000`` provisions 5 accounts (the same command
  otherwise; 1,000 PBKDF2 derivations are only slower, not different), and
  ``bench report``'s ``--out`` goes to the temporary directory (its
  ``bench/results`` glob is expanded in the checkout, as a shell would).
"""

from __future__ import annotations

import glob
import os
import re
import selectors
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from serverutil import free_port

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SCRIPT = Path(sys.executable).parent / "pigeon"
PIGEON = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "pigeon.tools.cli"]
#: The prefix every "Try it" command must have: the venv the first command makes.
VENV_PIGEON = ".venv/bin/pigeon"


def code_blocks(text: str) -> list[list[str]]:
    """The lines of every fenced code block of ``text``, in order."""
    return [
        block.strip("\n").splitlines()
        for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M)
    ]


def section(title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.S | re.M)
    assert m, f"README.md has no '## {title}' section"
    return m.group(1)


def command(line: str) -> tuple[list[str], str]:
    """A README command line: its argv (the comment dropped) and its comment."""
    code, _, comment = line.partition("  #")
    return shlex.split(code), comment.strip(" #")


def pigeon_argv(argv: list[str], *, venv: bool = True) -> list[str]:
    """The README's ``.venv/bin/pigeon ...`` as the argv to run here."""
    if venv:
        assert argv[0] == VENV_PIGEON, f"{shlex.join(argv)}: not run with {VENV_PIGEON}"
    assert argv[0] in (VENV_PIGEON, "pigeon"), shlex.join(argv)
    return [*PIGEON, *argv[1:]]


def run(argv, cwd, timeout=30, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=ENV, **kw)  # fmt: skip


ENV = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_readme_opens_with_the_two_commands():
    first = code_blocks(README)[0]
    assert len(first) == 2, first
    serve, test = first
    assert serve.startswith("python3 -m venv .venv && ") and serve.endswith(" serve"), serve
    assert command(serve.split(" && ")[-1])[0][:2] == [VENV_PIGEON, "serve"]
    # .ci/run runs the first README line its grep pattern matches: it must be this one
    pattern = re.search(r'grep -m1 -E "([^"]+)" README\.md', (ROOT / ".ci/run").read_text())
    matching = [ln for ln in README.splitlines() if re.search(pattern.group(1), ln)]
    assert matching[:1] == [test]
    # and "Try it" comes right after them
    assert README.index("## Try it") > README.index(test)
    between = README[README.index(test) + len(test) : README.index("## Try it")]
    assert between.strip() == "```", between


class ServeFromReadme:
    """The README's serve command, in ``cwd``, on free loopback ports."""

    def __init__(self, cwd: Path):
        serve_line = code_blocks(README)[0][0].split(" && ")[-1]
        argv, _ = command(serve_line)
        self.port = free_port()
        self.metrics = f"127.0.0.1:{free_port()}"
        self.argv = [*pigeon_argv(argv), "--listen", f"127.0.0.1:{self.port}",
                     "--metrics-listen", self.metrics,
                     "--media-listen", f"127.0.0.1:{free_port()}"]  # fmt: skip
        self.cwd = cwd
        self.log = open(cwd / "serve.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(self.argv, cwd=cwd, stdout=self.log, stderr=self.log,
                                     stdin=subprocess.DEVNULL, start_new_session=True, env=ENV)  # fmt: skip

    def wait_ready(self, timeout: float = 30) -> None:
        """Bounded: until the port takes a connection (the readiness of any server)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"serve exited: {self.log_text()}"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"serve not listening after {timeout} s: {self.log_text()}")

    def log_text(self) -> str:
        return (self.cwd / "serve.log").read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        return self.proc.returncode


def with_server(argv: list[str], port: int) -> list[str]:
    """``pigeon chat ...`` pointed at the test's port (right after ``chat``)."""
    k = argv.index("chat") + 1
    return [*argv[:k], "--server", f"127.0.0.1:{port}", *argv[k:]]


def read_code(outbox: Path, phone: str, timeout: float = 20) -> str:
    """The latest code for ``phone`` in the outbox file the README names (bounded wait)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if outbox.exists():
            codes = [ln.split()[1] for ln in outbox.read_text().splitlines()
                     if ln.split()[:1] == [phone]]  # fmt: skip
            if codes:
                return codes[-1]
        time.sleep(0.1)
    names = sorted(str(p.relative_to(outbox.parents[1])) for p in outbox.parents[1].rglob("*"))
    raise AssertionError(f"no code for {phone} in {outbox} after {timeout} s; files: {names}")


def register(argv: list[str], cwd: Path, outbox: Path, port: int) -> str:
    phone = argv[argv.index("register") + 1]
    proc = subprocess.Popen(with_server(pigeon_argv(argv), port), cwd=cwd, env=ENV, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        code = read_code(outbox, phone)
        out, err = proc.communicate(code + "\n", timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 0, out + err
    return phone


def chat_until(chats: dict[str, subprocess.Popen], expect, timeout: float = 30) -> dict:
    """Read the chats' output until ``expect(lines)`` holds (bounded); their lines."""
    lines = {name: [] for name in chats}
    sel = selectors.DefaultSelector()
    for name, proc in chats.items():
        os.set_blocking(proc.stdout.fileno(), False)
        sel.register(proc.stdout, selectors.EVENT_READ, name)
    bufs = dict.fromkeys(chats, "")
    deadline = time.monotonic() + timeout
    try:
        while not expect(lines):
            left = deadline - time.monotonic()
            assert left > 0, f"not seen within {timeout} s: {lines}"
            for key, _ in sel.select(min(left, 0.5)):
                data = key.fileobj.read()
                if not data:
                    sel.unregister(key.fileobj)
                    continue
                bufs[key.data] += data
                *done, bufs[key.data] = bufs[key.data].split("\n")
                lines[key.data] += done
    finally:
        sel.close()
    return lines


def test_try_it_as_written(tmp_path):
    """Serve, register both users with the codes from the outbox file, chat each way
    with the lines the README says to type, then the admin commands it shows."""
    try_it = section("Try it")
    outboxes = re.findall(r"`([^`\s]*outbox[^`\s]*)`", try_it)
    assert outboxes, "Try it does not say where the code is"
    outbox = tmp_path / outboxes[0]
    lines = [ln for block in code_blocks(try_it) for ln in block]
    registers = [command(ln)[0] for ln in lines if " register " in ln]
    chats = [command(ln) for ln in lines if " chat " in ln and " register " not in ln]
    assert len(registers) == 2 and len(chats) == 2, lines

    def profile(argv):
        return argv[argv.index("--profile") + 1]

    srv = ServeFromReadme(tmp_path)
    procs: dict[str, subprocess.Popen] = {}
    try:
        srv.wait_ready()
        phones = {profile(argv): register(argv, tmp_path, outbox, srv.port) for argv in registers}
        assert len(set(phones.values())) == 2, phones
        for name in phones:
            assert (tmp_path / name).stat().st_mode & 0o777 == 0o600
        typed = {}  # profile -> (recipient, text) the README says to type there
        for argv, comment in chats:
            m = re.search(r"type: (\d+) (.+)$", comment)
            assert m, f"{shlex.join(argv)}: the README does not say what to type"
            typed[profile(argv)] = (m.group(1), m.group(2))
            procs[profile(argv)] = subprocess.Popen(
                with_server(pigeon_argv(argv), srv.port), cwd=tmp_path, env=ENV, text=True,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
        assert set(typed) == set(phones), (typed, phones)
        by_phone = {phone: name for name, phone in phones.items()}
        for name, (to, text) in typed.items():
            assert to in by_phone and to != phones[name], f"{name} types to {to}: nobody there"
            procs[name].stdin.write(f"{to} {text}\n")
            procs[name].stdin.flush()

        def everyone_got_theirs(seen) -> bool:
            # the recipient prints a line with the sender's number and then the text
            # (the sender's own echo names the recipient instead; colours stripped)
            return all(
                any(re.search(rf"\b{phones[sender]}\b.*\b{re.escape(text)}\b", ANSI.sub("", ln))
                    for ln in seen[by_phone[to]])
                for sender, (to, text) in typed.items()
            )  # fmt: skip

        chat_until(procs, everyone_got_theirs)
        for proc in procs.values():
            proc.stdin.close()  # end of input leaves
        for name, proc in procs.items():
            assert proc.wait(15) == 0, f"{name}: {proc.stderr.read()}"

        # the admin commands "Try it" shows, on the running server's store
        admin = re.findall(r"`(\.venv/bin/pigeon admin [^`]+)`", try_it)
        assert admin, "Try it shows no admin command"
        for text in admin:
            argv, _ = command(text)
            if argv[2] in ("status", "stats"):  # they read the metrics listener: the test's
                argv = [*argv, "--metrics", srv.metrics]
            out = run(pigeon_argv(argv), tmp_path)
            assert out.returncode == 0, (text, out.stderr)
            if argv[2:4] == ["user", "show"]:
                assert argv[4] in out.stdout, out.stdout
            if argv[2] == "status":
                assert "ready" in out.stdout, out.stdout
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        assert srv.stop() == 0, srv.log_text()


def admin_commands() -> list[str]:
    """Every ``pigeon admin ...`` the README shows, in code spans or code blocks."""
    found = re.findall(r"`((?:\.venv/bin/)?pigeon admin [^`]+)`", README)
    for block in code_blocks(README):
        found += [ln for ln in block if re.match(r"(\.venv/bin/)?pigeon admin ", ln)]
    return found


#: Admin commands that are safe in an empty test directory (no server or store needed,
#: nothing outside the cwd touched): checked wherever the README shows them; the ones
#: on a live server's store ("Try it") run in test_try_it_as_written.
SAFE_ADMIN = ("decode", "tokens", "gen-cert", "provision")


def test_readme_admin_commands(tmp_path):
    ran = set()
    for text in admin_commands():
        argv, _ = command(text)
        if argv[2] not in SAFE_ADMIN or (argv[2] == "provision" and "--count" not in argv):
            continue  # (a bare "pigeon admin provision" in prose names it, it is no command)
        if argv[2] == "provision":
            argv[argv.index("--count") + 1] = "5"
        out = run(pigeon_argv(argv, venv=False), tmp_path, timeout=60)
        assert out.returncode == 0, (text, out.stderr)
        ran.add(argv[2])
        if argv[2] == "decode":
            # "`pigeon admin decode ...` prints `<ping id="k1"/>`"
            said = re.search(re.escape(text) + r"`\s+prints\s+`([^`]+)`", README)
            assert said and out.stdout.strip() == said.group(1), out.stdout
        if argv[2] == "provision":
            creds = tmp_path / argv[argv.index("--out") + 1]
            assert len(creds.read_text().splitlines()) == 5
    assert {"decode", "tokens", "provision"} <= ran, ran


def test_readme_bench_report(tmp_path):
    lines = [ln for block in code_blocks(README) for ln in block if "pigeon bench report" in ln]
    assert lines, "README shows no pigeon bench report"
    argv, _ = command(lines[0])
    args = []
    for arg in argv[3:]:
        args += sorted(glob.glob(arg, root_dir=ROOT)) if "*" in arg else [arg]
    files = [a for a in args if a.endswith(".json")]
    assert len(files) > 1, "the README's glob matches no results"
    out_png = tmp_path / args[args.index("--out") + 1]
    args[args.index("--out") + 1] = str(out_png)
    proc = run([*pigeon_argv(argv[:3], venv=False), *args], ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # every file is drawn or skipped with a one-line note naming it
    drawn = int(re.search(r"\((\d+) results\)", proc.stdout).group(1))
    notes = [ln for ln in proc.stderr.splitlines() if "skipped" in ln]
    assert drawn >= 1 and drawn + len(notes) == len(files), (proc.stdout, proc.stderr)


@pytest.mark.parametrize("line", [ln for b in code_blocks(README) for ln in b
                                  if re.match(r"(\.venv/bin/)?pigeon bench \w+ ", ln)])  # fmt: skip
def test_readme_bench_command_lines_parse(line):
    """Every ``pigeon bench`` line the README shows has options that exist (parsed, not run)."""
    from pigeon.tools.cli import build_parser

    argv, _ = command(line)
    build_parser().parse_args(argv[1:])
