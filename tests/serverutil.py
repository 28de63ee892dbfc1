"""Start real pigeon servers on loopback for tests; end them by PID."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import selectors
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

from pigeon.client import Client, Credentials
from pigeon.server.store import Store
from pigeon.tools.certs import gen_cert

READY_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``pigeon serve`` in a subprocess (its own session, so signals reach only it)."""

    def __init__(
        self,
        data_dir: Path,
        workers: int = 2,
        tls: bool = False,
        open_files: int | tuple[int, int] | None = None,
        config_file: Path | None = None,
        cwd: Path | None = None,
        command: list[str] | None = None,
        env: dict | None = None,
        umask: int | None = None,
        media: bool = False,
        **options,
    ):
        """``cwd``, ``env`` (added to ours), ``umask``, ``open_files`` (the RLIMIT_NOFILE,
        soft and hard alike or a (soft, hard) pair): how the server process starts;
        ``command``: what runs instead of ``python -m pigeon.tools.cli`` (e.g. the
        installed ``pigeon`` script); ``media``: run the media service too (on a
        free port, ``media_url``; off by default)."""
        self.config_file = config_file
        self.cwd = cwd
        self.command = command or [sys.executable, "-m", "pigeon.tools.cli"]
        self.env = env or {}
        self.umask = umask
        self.open_files = open_files
        self.data_dir = data_dir
        self.port = free_port()
        self.workers = workers
        self.media_port = free_port() if media else None
        self.options = {
            "login_timeout": 10, "idle_timeout": 60, "metrics_listen": "off",
            "media_listen": f"127.0.0.1:{self.media_port}" if media else "off", **options,
        }  # fmt: skip
        self.tls_port = self.cert = None
        if tls:
            self.tls_port = free_port()
            self.cert, key = gen_cert(str(data_dir.parent / "tls"), force=True)
            self.options.update(
                tls_listen=f"127.0.0.1:{self.tls_port}", tls_cert=self.cert, tls_key=key
            )
        self.proc: subprocess.Popen | None = None
        self.banner = ""
        self.banner_lines: list[str] = []  # the whole banner, "pigeon: serving on ..." first
        # the server's clock: real time plus the offset in this file (advance_clock)
        self.clock_file = data_dir.parent / f"clock-{self.port}"
        self.clock_file.write_text("0")

    def start(self) -> Server:
        args = [*self.command, "serve", "--workers", str(self.workers),
                "--listen", f"127.0.0.1:{self.port}", "--data-dir", str(self.data_dir),
                "--log-format", "json", "--map-size", str(256 << 20)]  # fmt: skip
        for k, v in self.options.items():
            args += ["--" + k.replace("_", "-"), str(v)]
        if self.config_file is not None:
            args += ["--config", str(self.config_file)]
        self.log = open(self.data_dir.parent / f"server-{self.port}.log", "ab")
        limit, umask = self.open_files, self.umask
        if isinstance(limit, int):
            limit = (limit, limit)  # (soft, hard)

        def preexec():
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, limit)
            if umask is not None:
                os.umask(umask)

        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=self.log,
            start_new_session=True,
            preexec_fn=preexec,
            env={**os.environ, "PIGEON_TEST_CLOCK_FILE": str(self.clock_file), **self.env},
            cwd=self.cwd,
        )
        # Raw reads, not readline: the banner comes in one write, its first line
        # "pigeon: serving on ..." and then the lines after it (banner_lines).
        fd = self.proc.stdout.fileno()
        sel = selectors.DefaultSelector()
        sel.register(fd, selectors.EVENT_READ)
        deadline = time.monotonic() + READY_TIMEOUT
        out = b""
        while time.monotonic() < deadline:
            if sel.select(timeout=0.2):
                chunk = os.read(fd, 65536)
                out += chunk
                lines = out.decode(errors="replace").split("\n")[:-1]  # whole lines
                for i, line in enumerate(lines):
                    if line.startswith("pigeon: serving on"):
                        self.banner = line + "\n"
                        self.banner_lines = lines[i:]
                        sel.close()
                        return self
                if not chunk and self.proc.poll() is not None:
                    break
        sel.close()
        self.stop(sig=signal.SIGKILL)
        raise RuntimeError(f"server did not become ready; log: {self.log_text()[-2000:]}")

    @property
    def media_url(self) -> str:
        """The media service's base URL (https when the server has TLS)."""
        scheme = "https" if self.tls_port else "http"
        return f"{scheme}://127.0.0.1:{self.media_port}"

    def advance_clock(self, seconds: float) -> None:
        """Move the server's clock (every worker's) forward."""
        offset = int(self.clock_file.read_text()) + int(seconds * 1000)
        tmp = self.clock_file.with_suffix(".tmp")
        tmp.write_text(str(offset))
        os.replace(tmp, self.clock_file)

    def log_text(self) -> str:
        return (self.data_dir.parent / f"server-{self.port}.log").read_text(errors="replace")

    def worker_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def worker_pid(self, index: int) -> int:
        """The PID of worker ``index``, from its latest "worker ready" log line."""
        pid = None
        for line in self.log_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("msg") == "worker ready" and rec.get("worker") == index:
                pid = rec["pid"]
        assert pid is not None, f"no ready line for worker {index}"
        return pid

    def stop(self, sig=signal.SIGTERM, timeout: float = 20.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def sessions(self, phone: str) -> dict:
        store = Store(str(self.data_dir / "store"), map_size=256 << 20)
        try:
            return store.sessions_of(phone) or {}
        finally:
            store.close()

    def link_device(self, phone: str) -> Credentials:
        """A companion device for ``phone``'s account, written straight into the store
        (``Store.link_device``, as the operator tooling does): its credentials."""
        from pigeon.server.accounts import device_keys

        secret = os.urandom(32)
        store = Store(str(self.data_dir / "store"), map_size=256 << 20, create=False)
        try:
            device = store.link_device(phone, os.urandom(32), device_keys(secret, 4096))
        finally:
            store.close()
        return Credentials(device, secret)

    def queue_count(self, device: str) -> int:
        """How many entries ``device``'s queue holds (its qstate record, from LMDB)."""
        store = Store(str(self.data_dir / "store"), map_size=256 << 20, create=False)
        try:
            with store.read() as txn:
                raw = txn.get(device.encode(), db=store._db["qstate"])
        finally:
            store.close()
        return 0 if raw is None else int.from_bytes(raw[8:16], "big")

    def queue_stats(self, top: int = 10) -> dict:
        """The store's queue totals (read straight from LMDB, as `pigeon admin queues` does)."""
        from pigeon.server.queues import Queues

        store = Store(str(self.data_dir / "store"), map_size=256 << 20, create=False)
        try:
            return Queues(store).stats(top)
        finally:
            store.close()

    def anon_kib(self) -> int:
        """Private (anonymous) resident memory of the supervisor and workers, KiB (Linux)."""
        total = 0
        for pid in [self.proc.pid, *self.worker_pids()]:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        total += int(line.split()[1])
        return total

    def code_for(self, phone: str) -> str:
        lines = (self.data_dir / "sms-outbox.txt").read_text().splitlines()
        return [ln.split()[1] for ln in lines if ln.split()[0] == phone][-1]

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts this server's self-signed certificate."""
        return ssl.create_default_context(cafile=self.cert)

    async def client(self, **kw) -> Client:
        kw.setdefault("plaintext", True)  # raw bodies; tests/test_e2e.py encrypts
        return await Client.connect("127.0.0.1", self.port, **kw)

    async def register(self, phone: str):
        c = await self.client()
        try:
            await c.register(phone)
            return await c.verify(phone, self.code_for(phone))
        finally:
            await c.close()

    async def login(self, creds, **kw) -> Client:
        c = await self.client(**kw)
        await c.login(creds)
        return c


async def until(predicate, timeout: float = 10.0, interval: float = 0.05):
    """Wait (bounded) for predicate() to become true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    raise AssertionError("condition not met in time")


async def on_other_worker(server, creds, phone, than, **kw):
    """Log in until this device's session is on a different worker than ``than``."""
    for _ in range(40):
        c = await server.login(creds, **kw)
        await until(lambda: creds.device in server.sessions(phone))
        if server.sessions(phone)[creds.device]["worker"] != than:
            return c
        await c.close()
        await until(lambda: creds.device not in server.sessions(phone))
    raise AssertionError("could not land on another worker in 40 connections")


async def next_message(client, timeout: float = 10.0):
    """The next message delivered to ``client``; receipts, device-list and key
    notices before it are acked and skipped."""
    from pigeon.core.events import DevicesChanged, IncomingReceipt, KeysChanged, KeysLow

    while True:
        ev = await client.next_event(timeout)
        if not isinstance(ev, (IncomingReceipt, DevicesChanged, KeysChanged, KeysLow)):
            return ev
        await client.ack(ev.seq)
