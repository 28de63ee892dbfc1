"""What the server logs: JSON lines off a tty, text on one, and never codes, secrets or bodies."""

import asyncio
import io
import json
import logging

from serverutil import Server, next_message

from pigeon.server import log

ALICE, BOB = "491701234567", "4915112345678"
BODY = b"body-that-must-never-be-logged-7f3a"


def test_a_run_logs_no_code_no_secret_and_no_body(tmp_path):
    srv = Server(tmp_path / "data", workers=2, log_level="debug").start()
    try:

        async def main():
            alice_creds = await srv.register(ALICE)
            bob_creds = await srv.register(BOB)
            alice = await srv.login(alice_creds)
            ack = await alice.send(BOB, BODY)  # bob offline: stored
            bob = await srv.login(bob_creds)
            ev = await next_message(bob)
            assert ev.body == BODY
            await bob.ack(ev.seq)
            await bob.receipt(ALICE, ack.id, "read")
            bad = await srv.client()
            try:
                await bad.login(type(bob_creds)(bob_creds.device, b"\x01" * 32))
            except Exception:
                pass
            await bad.close()
            await alice.close()
            await bob.close()
            return alice_creds, bob_creds

        alice_creds, bob_creds = asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        assert srv.stop() == 0
    text = srv.log_text()
    codes = [srv.code_for(ALICE), srv.code_for(BOB)]
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert any(r["msg"] == "login" for r in lines)  # the run did log
    assert any(r["msg"] == "login failed" for r in lines)
    for secret in (alice_creds.secret, bob_creds.secret, b"\x01" * 32):
        assert secret.hex() not in text and secret.hex().upper() not in text
    for code in codes:
        assert code not in text
    assert BODY.decode() not in text and BODY.hex() not in text


def test_text_on_a_tty_and_json_elsewhere():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    logger = logging.getLogger("pigeon.test")
    root = logging.getLogger("pigeon")
    saved = (root.handlers[:], root.level, root.propagate)
    try:
        _check_formats(logger, Tty)
    finally:
        root.handlers[:], root.level, root.propagate = saved


def _check_formats(logger, Tty):
    tty = Tty()
    log.setup("info", "auto", tty)
    log.event(logger, logging.INFO, "worker ready", worker=1)
    assert "info    pigeon.test: worker ready worker=1" in tty.getvalue()
    pipe = io.StringIO()
    log.setup("info", "auto", pipe)
    log.event(logger, logging.WARNING, "at the connection limit", refused=3)
    rec = json.loads(pipe.getvalue())
    assert (rec["level"], rec["msg"], rec["refused"]) == ("warning", "at the connection limit", 3)
    log.event(logger, logging.DEBUG, "hidden")  # below the level
    assert len(pipe.getvalue().splitlines()) == 1


def logfmt_pairs(line: str) -> dict:
    """The key=value pairs of a logfmt line, as a logfmt reader sees them (go-logfmt's
    grammar: bare words are keys without a value and are skipped; a quoted value is a
    JSON-style string)."""
    pairs, i, n = {}, 0, len(line)
    while i < n:
        if line[i] == " ":
            i += 1
            continue
        start = i
        while i < n and line[i] not in ' ="':
            i += 1
        key = line[start:i]
        if i >= n or line[i] != "=":
            i += 1  # a bare key (or a stray quote): no value
            continue
        i += 1
        if i < n and line[i] == '"':
            j = i + 1
            while j < n and line[j] != '"':
                j += 2 if line[j] == "\\" else 1
            assert j < n, f"unterminated quoted value in {line!r}"
            pairs[key] = json.loads(line[i : j + 1])
            i = j + 1
        else:
            start = i
            while i < n and line[i] != " ":
                i += 1
            value = line[start:i]
            assert '"' not in value and "=" not in value, f"bare value {value!r} in {line!r}"
            pairs[key] = value
    return pairs


def test_text_fields_are_logfmt_quoted(tmp_path):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    logger = logging.getLogger("pigeon.test")
    root = logging.getLogger("pigeon")
    saved = (root.handlers[:], root.level, root.propagate)
    fields = {
        "path": str(tmp_path / "my data" / "store"),
        "error": 'cannot open "store": mode=0644 is wrong',
        "empty": "",
        "count": 3,
        "ready": True,
        "reason": "two\nlines\tand a \\ backslash",
        "plain": "127.0.0.1:7650",
    }
    try:
        tty = Tty()
        log.setup("info", "text", tty)
        log.event(logger, logging.WARNING, "something to say", **fields)
    finally:
        root.handlers[:], root.level, root.propagate = saved
    (line,) = tty.getvalue().splitlines()  # one line, whatever the values hold
    assert logfmt_pairs(line) == {**{k: str(v) for k, v in fields.items()}, "ready": "true"}
    assert " plain=127.0.0.1:7650" in line and " count=3" in line  # bare when they can be
