"""locust users that speak the pigeon protocol over raw TCP.

Each locust user is one provisioned device: it connects with a plain socket
(locust runs on gevent, so sockets are cooperative), drives the sans-IO
client core from ``pigeon.client._core`` (the same code as the SDK), logs in
with SCRAM-SHA-256 and sends 1:1 messages to other provisioned users.  What
locust reports as requests:

    login             connect + SCRAM exchange, until <success>
    send-to-ack       a message until the server's ack (it is durable)
    send-to-delivery  a message until a recipient user of this locust process
                      receives it (body stamped with CLOCK_MONOTONIC, one clock
                      for every process of the machine)

Errors from the server count as failures with their code.  Run it against a
server whose store holds provisioned accounts:

    pigeon admin provision --count 1000 --out creds.jsonl --data-dir var
    pigeon serve &
    PIGEON_CREDS=creds.jsonl locust -f bench/locustfile.py --headless \\
        -u 200 -r 50 -t 30s --host tcp://127.0.0.1:7650

(or ``--creds creds.jsonl``; without ``--headless`` locust serves its web UI
on http://127.0.0.1:8089).  Users beyond the number of credentials stop.
"""

from __future__ import annotations

import itertools
import os
import random
import socket
import struct
import time

import gevent
import gevent.lock
from locust import User, between, events, task
from locust.exception import StopUser

from pigeon.client._core import (
    AUTH,
    MESSAGE,
    Answer,
    ClientCore,
    Credentials,
    Deliver,
    Failure,
    Lost,
    ScramLogin,
)
from pigeon.core.events import IncomingMessage, IncomingReceipt

STAMP = struct.Struct("<Q")  # monotonic ns when sent
_next_user = itertools.count()
_creds: list[dict] | None = None


@events.init_command_line_parser.add_listener
def _options(parser):
    parser.add_argument(
        "--creds",
        default=os.environ.get("PIGEON_CREDS", "creds.jsonl"),
        help="credentials from 'pigeon admin provision' (env PIGEON_CREDS)",
    )
    parser.add_argument("--size", type=int, default=100, help="message body bytes")


def _credentials(path: str) -> list[dict]:
    global _creds
    if _creds is None:
        from pigeon.server.provision import load_credentials

        _creds = load_credentials(path)
    return _creds


class PigeonUser(User):
    """One device: logs in once, then sends a message every 0.5-1.5 s."""

    abstract = False
    wait_time = between(0.5, 1.5)

    def on_start(self) -> None:
        creds = _credentials(self.environment.parsed_options.creds)
        index = next(_next_user)
        if index >= len(creds):
            raise StopUser()
        self.me = creds[index]
        self.peers = [c["phone"] for c in creds if c["phone"] != self.me["phone"]]
        self.size = max(STAMP.size, self.environment.parsed_options.size)
        self.sent_at: dict[str, int] = {}
        self.write_lock = gevent.lock.BoundedSemaphore()
        host, _, port = self.host.removeprefix("tcp://").rpartition(":")
        start = time.perf_counter()
        try:
            self.sock = socket.create_connection((host, int(port)), timeout=30)
            self.core = ClientCore()
            self.core.start()
            scram = ScramLogin(Credentials(self.me["device"], bytes.fromhex(self.me["secret"])))
            challenge = self._exchange(scram.first())
            scram.check(self._exchange(scram.final(challenge)))
        except Exception as exc:
            self._fire("login", start, exc)
            raise StopUser() from None
        self._fire("login", start)
        self.sock.settimeout(None)
        self.reader = gevent.spawn(self._read)

    def _write(self) -> None:
        """One writer at a time: a gevent sendall may yield half-way through."""
        with self.write_lock:
            if self.core.has_output:
                self.sock.sendall(self.core.take_output())

    def on_stop(self) -> None:
        reader = getattr(self, "reader", None)
        if reader is not None:
            reader.kill(block=False)
        sock = getattr(self, "sock", None)
        if sock is not None:
            sock.close()

    # -- I/O ------------------------------------------------------------------------

    def _exchange(self, event):
        """Send one login step and read until its answer (before the reader runs)."""
        self.core.expect(AUTH, "")
        self.core.send(event)
        self.sock.sendall(self.core.take_output())
        while True:
            data = self.sock.recv(65536)
            for o in self.core.receive(data):
                if isinstance(o, Answer):
                    return o.value
                if isinstance(o, (Failure, Lost)):
                    raise o.error
            if not data:
                raise ConnectionError("the server closed the connection")

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            for o in self.core.receive(data):
                self._outcome(o)
            try:
                self._write()
            except OSError:
                return
            if not data:
                return

    def _outcome(self, o) -> None:
        now = time.perf_counter_ns()
        if isinstance(o, Answer) and o.key[0] == MESSAGE:
            t = self.sent_at.pop(o.key[1], None)
            if t is not None:
                self._fire_ns("send-to-ack", t, now)
        elif isinstance(o, Failure) and o.key[0] == MESSAGE:
            t = self.sent_at.pop(o.key[1], now)
            self._fire_ns("send-to-ack", t, now, o.error)
        elif isinstance(o, Deliver):
            ev = o.event
            if isinstance(ev, IncomingMessage) and len(ev.body) >= STAMP.size:
                sent = STAMP.unpack_from(ev.body)[0]
                mono = time.monotonic_ns()
                self.environment.events.request.fire(
                    request_type="pigeon", name="send-to-delivery",
                    response_time=(mono - sent) / 1e6, response_length=len(ev.body),
                    exception=None, context={},
                )  # fmt: skip
            if isinstance(ev, (IncomingMessage, IncomingReceipt)):
                self.core.ack(ev.seq, True)

    def _fire(self, name: str, start: float, exc: Exception | None = None) -> None:
        self.environment.events.request.fire(
            request_type="pigeon", name=name,
            response_time=(time.perf_counter() - start) * 1000, response_length=0,
            exception=exc, context={},
        )  # fmt: skip

    def _fire_ns(self, name: str, t0: int, t1: int, exc: Exception | None = None) -> None:
        self.environment.events.request.fire(
            request_type="pigeon", name=name, response_time=(t1 - t0) / 1e6,
            response_length=0, exception=exc, context={},
        )  # fmt: skip

    # -- the task -----------------------------------------------------------------------

    @task
    def send_message(self) -> None:
        body = STAMP.pack(time.monotonic_ns()) + bytes(self.size - STAMP.size)
        key = self.core.message(random.choice(self.peers), body, "text", None)
        self.sent_at[key[1]] = time.perf_counter_ns()
        try:
            self._write()
        except OSError as exc:
            self._fire("send-to-ack", time.perf_counter(), exc)
            raise StopUser() from None
