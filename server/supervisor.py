"""The supervisor: starts the workers, restarts crashed ones, drains on SIGTERM.

Workers are fresh interpreters (``python -P -m pigeon.server.worker``),
not forks: nothing (no LMDB environment, no event loop) is inherited across
a fork.  ``-P`` keeps the directory the server was started from off their
module path, and each worker checks it runs the very file and codec its
supervisor runs (``code_identity``).  Their settings, secrets among them,
come through a pipe read once at start, never through argv (which ``ps``
shows every local user).  Before any worker starts, ``preflight`` makes
sure nothing else listens on the ports (``check_port_free``): the workers'
SO_REUSEPORT would otherwise share them with whoever does.  Each gets the read end of a pipe whose write end only the supervisor
holds: when the supervisor dies, however (even SIGKILL), the pipe reaches
EOF and the workers exit, so a restarted server never shares its port with
orphans.  This needs no OS-specific call and works alike on Linux and
FreeBSD.

Readiness: when every worker has reported "ready" on its status pipe, the
supervisor prints the banner on stdout in one write: first the line tests
and scripts wait for, ``pigeon: serving on HOST:PORT ...``, then where the
metrics and health answer and, with the ``log`` SMS gateway, the file the
one-time codes go to (``banner``).

Open files: before anything else the supervisor raises its soft
RLIMIT_NOFILE toward the hard limit, as far as a worker needs for
max-connections plus files-reserve (``size_open_files``); the workers
inherit it.  Only if the hard limit leaves less does it warn, once, with
how many connections each worker will take; the workers apply the cap
without a word.  A worker that exits unexpectedly is
restarted after a backoff (1 s doubling to 30 s; reset once it has run 60 s)
and the event is logged.  SIGTERM or SIGINT: the workers drain (stop
accepting, tell clients 503, let output go) and the supervisor exits 0.
Under systemd (Type=notify) the supervisor also sends READY=1 when it
prints that line and STOPPING=1 when it starts draining.

The media service (server/media.py) runs beside the workers when
media-listen is not off: one more process of each generation (index
``count``, ``WorkerProc.media``), started with the same pipes, restarted,
drained and reloaded exactly like a worker, and left out of the workers'
metrics (it has its own on its listener).  Its HMAC key, ``media.key``, is
made by ``preflight`` at the first start, before any process that reads it.

Reload (SIGHUP, what `systemctl reload` and rc.d's `reload` send): the
configuration file is read again (command-line flags still win) and
checked; if it is bad, or data-dir or metrics-listen would change, the
reload is refused with a log line and nothing else happens.  Otherwise a
new generation of workers starts beside the old one (SO_REUSEPORT: both
listen on the same port) and only when every new worker is ready are the
old ones told to drain: they stop accepting, send their clients error 503
(reconnect; the new workers are already listening) and exit.  READY=1 of a
reload comes once every old worker has closed its listening sockets, so a
client that connects after it never reaches one.  Worker ids
(``gen * WID_STRIDE + index``) keep the two generations apart in the
session table and on the bus.
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import orjson

from pigeon.core import codec as core_codec

from . import control as control_mod
from . import log, mediagrant
from . import metrics as metrics_mod
from . import worker as worker_mod
from .bus import kick_record
from .config import split_hostport
from .listeners import listen_socket
from .sdnotify import notify
from .store import Store, StoreError, make_private
from .worker import WID_STRIDE, raise_open_files_limit

logger = logging.getLogger("pigeon.supervisor")

READY_TIMEOUT = 60.0
#: How long a reload's READY=1 waits at most for the old workers to close their listeners.
CLOSE_WAIT = 10.0
CONTROL_SOCKET = control_mod.CONTROL_SOCKET
STOP_TIMEOUT = 10.0


class StartupError(Exception):
    """The server cannot start; the message says what to fix."""


def code_identity() -> dict:
    """What a worker must match: the file of the worker module this supervisor
    imported, and the codec it loaded (the fastpath or pure Python)."""
    return {"worker": os.path.realpath(worker_mod.__file__), "codec": core_codec.IMPLEMENTATION}


def worker_env() -> dict:
    """The workers' environment: the supervisor's own, plus PYTHONPATH naming
    sys.path[0] when that (the cwd of ``python -m``, which a worker's ``-P``
    drops) is where this supervisor's pigeon came from: the workers then run
    that same code, and the identity check in the worker confirms it."""
    env = dict(os.environ)
    if sys.path and not sys.flags.safe_path:
        first = os.path.realpath(sys.path[0] or os.getcwd())
        here = os.path.realpath(worker_mod.__file__)
        if here.startswith(os.path.join(first, "pigeon") + os.sep):
            env["PYTHONPATH"] = os.pathsep.join(p for p in (first, env.get("PYTHONPATH")) if p)
    return env


def _listen_addrs(config) -> list[str]:
    media = [config.media_listen] if config.media_listen != "off" else []
    return [config.listen] + ([config.tls_listen] if config.tls_enabled else []) + media


def generation(gen: int, count: int, config) -> list[WorkerProc]:
    """One generation's processes: ``count`` workers, then the media service (if
    media-listen is not off), index ``count``, run, restarted, reloaded and
    drained like a worker."""
    procs = [WorkerProc(i, gen, count, config) for i in range(count)]
    if config.media_listen != "off":
        procs.append(WorkerProc(count, gen, count, config, media=True))
    return procs


def size_open_files(config) -> int | None:
    """Raise the open-files limit for ``config``'s caps; warn once if it cannot reach them.

    A worker needs ``max-connections + files-reserve`` descriptors; the
    supervisor, which the workers inherit the limit from, needs a few per
    worker and per metrics and control connection.  The soft limit is raised
    that far (never lowered, never past the hard limit), so a default start
    on a machine with the usual hard limits (systemd: 524288) says nothing.
    Returns the connections each worker will take if the limit caps them,
    else None.
    """
    worker_need = config.max_connections + config.files_reserve
    own_need = config.metrics_connections + config.control_connections + 8 * config.worker_count
    limit = raise_open_files_limit(max(worker_need, own_need + 64))
    if limit is None or limit >= worker_need:
        return None
    budget = max(1, limit - config.files_reserve)
    log.event(logger, logging.WARNING, "connections capped by the open-files limit",
              open_files_limit=limit, max_connections=config.max_connections,
              each_worker_accepts=budget,
              hint="raise LimitNOFILE (systemd) or the login class / ulimit -n (FreeBSD), "
                   "or lower max-connections")  # fmt: skip
    return budget


def banner(config, workers: int) -> list[str]:
    """What the supervisor prints when it is ready, a line each (without 'pigeon: ')."""
    tls = f", TLS on {config.tls_listen}" if config.tls_enabled else ""
    data = os.path.abspath(config.data_dir)
    lines = [
        f"serving on {config.listen}{tls} with {workers} workers "
        f"(codec {core_codec.IMPLEMENTATION}, data in {data})"
    ]
    if config.media_listen != "off":
        scheme = "https" if config.tls_enabled else "http"
        lines.append(f"media on {scheme}://{config.media_listen}/v1/")
    if config.metrics_listen != "off":
        where = f"http://{config.metrics_listen}"
        lines.append(f"metrics on {where}/metrics, health on {where}/health")
    if config.sms_gateway == "log":
        lines.append(
            "sms-gateway = log: one-time codes are not sent, they are written to "
            f"{os.path.join(data, 'sms-outbox.txt')} (for development)"
        )
    return lines


def check_port_free(hostport: str) -> None:
    """Raise OSError (EADDRINUSE) if anything listens on ``hostport``.

    The workers bind with SO_REUSEPORT, so their own bind succeeds beside any
    listener of the same user: another pigeon server (another data dir!) or
    any program that set the option would silently share the port with us.
    This probe binds without SO_REUSEPORT (SO_REUSEADDR only, so sockets in
    TIME_WAIT do not count): on Linux and FreeBSD that fails while any
    socket listens on the port, whatever options it set.
    """
    host, port = split_hostport(hostport)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))


class WorkerProc:
    def __init__(self, index: int, gen: int = 0, count: int = 1, config=None,
                 media: bool = False):  # fmt: skip
        self.media = media  # the media service (server/media.py), not a chat worker
        self.index = index
        self.gen = gen
        self.count = count  # the size of its generation
        self.config = config  # the configuration its generation runs
        self.proc: subprocess.Popen | None = None
        self.status_fd: int | None = None
        self.ready = False
        self.started = 0.0
        self.backoff = 1.0
        self.restart_at: float | None = None
        self.restarts = 0  # spawns after the first (crashes it came back from)
        self.buf = b""
        self.fatal: str | None = None  # why it refused to start, from its status pipe
        self.closed = False  # draining: its listening sockets are closed ("closed" line)

    @property
    def wid(self) -> int:
        return self.gen * WID_STRIDE + self.index

    @property
    def kind(self) -> str:
        return "media process" if self.media else "worker"

    @property
    def name(self) -> str:
        """How logs and errors name it: ``worker 1``, or ``media process`` (its index
        follows the workers', and a "worker 2" that serves no chats misled)."""
        return "media process" if self.media else f"worker {self.index}"

    def fields(self, **more) -> dict:
        """Its log fields: ``worker=INDEX``, or ``process="media"``."""
        return {"process": "media", **more} if self.media else {"worker": self.index, **more}


class Supervisor:
    def __init__(self, config, config_path: str | None = None, overrides: dict | None = None):
        self.config = config
        self.config_path = config_path
        self.overrides = overrides or {}
        self.count = config.worker_count
        self.gen = 0
        self.workers = generation(0, self.count, config)
        self.incoming: list[WorkerProc] = []  # a reload's new generation, starting
        self.ready_due: float | None = None  # a reload's READY=1 waits for old listeners to close
        self.ready_gen = 0
        self.retiring: list[WorkerProc] = []  # the old generation, draining
        self.reload_started = 0.0
        self.sel = selectors.DefaultSelector()
        self.stopping = False
        self.run_dir = ""
        self.death_r = self.death_w = -1
        self.wake_r = self.wake_w = -1
        self.hangups = 0
        self.announced = False
        self.aggregate = metrics_mod.Aggregate()
        self.metrics_server = None
        self.control: socket.socket | None = None
        self.control_conns: set[control_mod.ControlConn] = set()
        self.worker_env = worker_env()
        self.start_time = time.time()  # wall clock, for /status
        self.start_mono = time.monotonic()

    # -- startup checks -----------------------------------------------------

    def preflight(self, reload: bool = False) -> None:
        c = self.config
        if not reload and control_mod.server_answers(c.data_dir):
            raise StartupError(
                f"another pigeon server is running with the data directory "
                f"{c.data_dir} (its control socket answers); stop it first"
            )
        try:
            os.makedirs(c.data_dir, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise StartupError(
                f"cannot create the data directory {c.data_dir!r}: {exc.strerror}"
            ) from None
        owner, me = os.stat(c.data_dir).st_uid, os.geteuid() if hasattr(os, "geteuid") else None
        if me is not None and owner != me and me != 0:
            # Its owner could read the store (SCRAM keys, queued payloads) and
            # swap files in it under the server.
            raise StartupError(
                f"the data directory {c.data_dir} belongs to uid {owner}, not to the user "
                f"the server runs as (uid {me}): run the server as its owner, or give "
                f"data-dir a directory inside it that the server makes itself"
            )
        if me == 0 and owner != 0:
            # root in a container on a volume of a host user is fine; root started
            # by hand on a service user's data dir leaves files that user cannot open
            log.event(logger, logging.WARNING, "the data directory belongs to another user "
                      "than root, which the server runs as: files it makes there are root's; "
                      "run the server as the directory's owner if that is its service user",
                      path=c.data_dir, owner_uid=owner)  # fmt: skip
        # Private whatever the umask (run() set 0077 for what is created from
        # now on): tighten what an older pigeon or a 022 umask left readable.
        for path, mode in (
            (c.data_dir, 0o700),
            (os.path.join(c.data_dir, "sms-outbox.txt"), 0o600),
        ):
            if not make_private(path, mode):
                log.event(logger, logging.WARNING, "other users can read this and it is not "
                          "ours to chmod: fix its owner or mode", path=path)  # fmt: skip
        try:
            Store(os.path.join(c.data_dir, "store"), map_size=c.map_size,
                  writemap=c.store_writemap).close()  # fmt: skip
        except StoreError as exc:
            raise StartupError(str(exc)) from None
        listeners = (
            [("listen", c.listen)]
            + ([("tls-listen", c.tls_listen)] if c.tls_enabled else [])
            + ([("media-listen", c.media_listen)] if c.media_listen != "off" else [])
        )
        if not reload:
            try:  # the upload grants' HMAC key (server/mediagrant.py), 0600, made once
                mediagrant.load_key(c.data_dir, create=True)
            except (OSError, ValueError) as exc:
                raise StartupError(f"cannot make or read the media key: {exc}") from None
        if c.metrics_listen != "off" and not reload:
            try:
                check_port_free(c.metrics_listen)
            except OSError as exc:
                raise StartupError(
                    f"cannot listen on {c.metrics_listen} (metrics-listen): {exc.strerror}; "
                    "pick another address or set metrics-listen = off"
                ) from None
        # On a reload the running workers hold the addresses they listen on:
        # only an address new to this generation can be taken by someone else.
        ours = {a for w in self.workers for a in _listen_addrs(w.config)} if reload else set()
        for name, addr in listeners:
            if reload and addr in ours:
                continue
            try:
                check_port_free(addr)
                listen_socket(addr).close()
            except OSError as exc:
                why = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
                raise StartupError(f"cannot listen on {addr} ({name}): {why}") from None
        if c.sms_gateway == "webhook":
            from .accounts import webhook_authorization

            try:
                webhook_authorization(c)
            except ValueError as exc:
                raise StartupError(str(exc)) from None
        from .push import configured_kinds, validate

        if configured_kinds(c):
            try:
                validate(c)
            except ValueError as exc:
                raise StartupError(str(exc)) from None
        if c.tls_enabled:
            from .listeners import tls_context

            try:
                tls_context(c)
            except ValueError as exc:
                raise StartupError(str(exc)) from None

    # -- workers ------------------------------------------------------------

    def spawn(self, w: WorkerProc) -> None:
        # -P: no cwd (or script dir) first on the worker's sys.path, so a
        # pigeon/ folder where the server was started cannot replace the code
        # the supervisor runs; worker_env() puts back the one entry that did
        # provide it, if it was that one.  The settings (secrets among them)
        # go through a pipe, never the command line: every local user can
        # read a process's argv.
        status_r, status_w = os.pipe()
        config_r, config_w = os.pipe()
        cmd = [
            sys.executable, "-P", "-m", "pigeon.server.media" if w.media else "pigeon.server.worker",
            "--index", str(w.index), "--count", str(w.count), "--gen", str(w.gen),
            "--run-dir", self.run_dir, "--config-fd", str(config_r),
            "--parent-fd", str(self.death_r), "--status-fd", str(status_w),
        ]  # fmt: skip
        try:
            w.proc = subprocess.Popen(
                cmd,
                pass_fds=(self.death_r, status_w, config_r),
                stdin=subprocess.DEVNULL,
                env=self.worker_env,
            )
        except BaseException:
            os.close(status_r)
            os.close(config_w)
            raise
        finally:
            os.close(status_w)
            os.close(config_r)
        private = orjson.dumps({"config": w.config.as_dict(), "code": code_identity()})
        try:
            with open(config_w, "wb") as f:  # a few KB: fits the pipe, does not block
                f.write(private)
        except BrokenPipeError:
            pass  # the worker is already gone; _reap sees it
        w.status_fd = status_r
        if w.started:
            w.restarts += 1
        w.ready = False
        w.fatal = None
        w.buf = b""
        w.started = time.monotonic()
        w.restart_at = None
        self.sel.register(status_r, selectors.EVENT_READ, w)
        log.event(logger, logging.INFO, f"{w.kind} started", **w.fields(gen=w.gen, pid=w.proc.pid))

    def _status(self, w: WorkerProc) -> None:
        data = os.read(w.status_fd, 256)
        if not data:
            self.sel.unregister(w.status_fd)
            os.close(w.status_fd)
            w.status_fd = None
            return
        w.buf += data
        *lines, w.buf = w.buf.split(b"\n")
        for line in lines:
            if line.startswith(b"ready"):
                w.ready = True
            elif line.startswith(b"closed"):
                w.closed = True
            elif line.startswith(b"fatal "):
                w.fatal = line[6:].decode(errors="replace")
            elif line.startswith(b"metrics "):
                try:
                    self.aggregate.update(w.wid, orjson.loads(line[8:]))
                except orjson.JSONDecodeError:
                    pass

    def _reap(self) -> None:
        for w in self.workers + self.incoming + self.retiring:
            if w.proc is None or w.proc.poll() is None:
                continue
            code = w.proc.returncode
            w.proc = None
            self.aggregate.retire(w.wid)
            while w.status_fd is not None:  # what it said last (EOF ends this)
                self._status(w)
            if w.fatal and w in self.incoming:
                self._forget_sessions(w)
                self._abort_reload(f"new {w.name} refused to start: {w.fatal}")
                continue
            if w.fatal and not self.announced and not self.stopping:
                raise StartupError(f"{w.name} refused to start: {w.fatal}")
            if w in self.retiring:
                self.retiring.remove(w)
                self._forget_sessions(w)
                log.event(logger, logging.INFO, f"old {w.kind} drained", **w.fields(gen=w.gen))
                continue
            if w in self.incoming:
                self._forget_sessions(w)
                self._abort_reload(f"new {w.name} exited with status {code}")
                continue
            if self.stopping:
                continue
            if time.monotonic() - w.started > 60:
                w.backoff = 1.0
            w.restart_at = time.monotonic() + w.backoff
            log.event(
                logger,
                logging.ERROR,
                f"{w.kind} exited; restarting",
                **w.fields(status=code, in_seconds=w.backoff),
            )
            w.backoff = min(w.backoff * 2, 30.0)

    # -- the loop -----------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True
        elif signum == signal.SIGHUP:
            self.hangups += 1
        os.write(self.wake_w, b"x")

    def run(self, out=sys.stdout) -> int:
        # Everything the server creates (store, outbox, sockets) is private,
        # whatever umask it was started with; the workers inherit it.
        os.umask(0o077)
        size_open_files(self.config)
        self.preflight()
        self.open_control()  # before anything to clean up: it may refuse to start
        self.run_dir = tempfile.mkdtemp(prefix="pigeon-")
        self.death_r, self.death_w = os.pipe()
        os.set_inheritable(self.death_r, True)
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        self.sel.register(self.wake_r, selectors.EVENT_READ, None)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        if self.config.metrics_listen != "off":
            collector = metrics_mod.Collector(
                self.aggregate,
                os.path.join(self.config.data_dir, "store"),
                self.config.map_size,
                self.worker_pids,
                writemap=self.config.store_writemap,
            )
            self.metrics_server = metrics_mod.serve(
                self.config.metrics_listen,
                collector,
                self.health,
                supervisor_status=self.status,
                limit=self.config.metrics_connections,
                timeout=self.config.metrics_timeout,
            )
        started = time.monotonic()
        try:
            for w in self.workers:
                self.spawn(w)
            while not self.stopping:
                for key, _ in self.sel.select(timeout=0.5):
                    if key.data is None:
                        os.read(self.wake_r, 4096)
                    elif key.data == "control":
                        self._control_accept()
                    elif isinstance(key.data, control_mod.ControlConn):
                        self._control_read(key.data)
                    else:
                        self._status(key.data)
                self._control_expire()
                self._reap()
                if self.hangups:
                    self.hangups = 0
                    self.begin_reload()
                self._advance_reload()
                self._announce_reload()
                now = time.monotonic()
                for w in self.workers:
                    if (
                        w.proc is None
                        and w.restart_at is not None
                        and now >= w.restart_at
                        and not self.stopping
                    ):
                        self.spawn(w)
                if not self.announced and all(w.ready for w in self.workers):
                    self.announced = True
                    lines = banner(self.config, self.count)
                    # one write: a reader that stops at the first line still
                    # got the rest in the same chunk
                    out.write("".join(f"pigeon: {line}\n" for line in lines))
                    out.flush()
                    notify(ready=1, status=lines[0], mainpid=os.getpid())
                if not self.announced and now - started > READY_TIMEOUT:
                    raise StartupError(
                        f"workers did not become ready within {READY_TIMEOUT:.0f} s (see the log)"
                    )
            return 0
        finally:
            self.shutdown()

    # -- the control socket ------------------------------------------------------

    def open_control(self) -> None:
        """``DATA_DIR/control.sock`` (mode 0600): how `pigeon admin` reaches live sessions.

        Without it an operator's revoke would leave the device's session
        open, so a socket that cannot be made is a startup error.  A long
        data directory is no reason: see control.at_short_path.
        """
        path = control_mod.socket_path(self.config.data_dir)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            try:
                os.unlink(path)  # left by a server that is gone (preflight checked)
            except FileNotFoundError:
                pass
            control_mod.at_short_path(path, sock.bind)
        except OSError as exc:
            sock.close()
            raise StartupError(
                f"cannot create the control socket {path} (pigeon admin needs it to close "
                f"live sessions): {exc.strerror or exc}"
            ) from None
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(8)
        sock.setblocking(False)
        self.control = sock
        self.sel.register(sock, selectors.EVENT_READ, "control")

    def _control_accept(self) -> None:
        """Take every waiting control connection; never wait for one to speak."""
        for _ in range(64):  # bounded per loop turn; the rest wait for the next one
            try:
                conn, _ = self.control.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of file descriptors: try again next turn
                log.event(logger, logging.WARNING, "control socket accept failed",
                          error=str(exc))  # fmt: skip
                return
            if len(self.control_conns) >= self.config.control_connections:
                conn.close()
                log.event(logger, logging.WARNING, "control connection refused: too many open",
                          limit=self.config.control_connections)  # fmt: skip
                continue
            conn.setblocking(False)
            cc = control_mod.ControlConn(conn, time.monotonic() + self.config.control_timeout)
            self.control_conns.add(cc)
            self.sel.register(conn, selectors.EVENT_READ, cc)

    def _control_done(self, cc: control_mod.ControlConn, reply: dict) -> None:
        self.control_conns.discard(cc)
        self.sel.unregister(cc.sock)
        cc.answer(reply)

    def _control_read(self, cc: control_mod.ControlConn) -> None:
        """One request a connection: a JSON line in, checked whole, a JSON line out."""
        try:
            line = cc.read()
            if line is None:
                return  # not a whole line yet
            req = control_mod.parse_request(line)
        except control_mod.ControlError as exc:
            self._control_done(cc, {"ok": False, "error": str(exc)})
            return
        n = self.kick(req["device"], req["code"], req["text"] or "")
        self._control_done(cc, {"ok": True, "workers": n})

    def _control_expire(self) -> None:
        now = time.monotonic()
        for cc in [cc for cc in self.control_conns if cc.deadline <= now]:
            self._control_done(cc, {"ok": False, "error": "timed out waiting for a request line"})

    def kick(self, device: str, code: int, text: str) -> int:
        """Tell every worker to close ``device``'s session; returns how many were told."""
        frame = kick_record(device, code, text)
        told = 0
        for w in self.workers + self.incoming + self.retiring:
            path = os.path.join(self.run_dir, f"w{w.wid}.sock")
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(2.0)
                    s.connect(path)
                    s.sendall(frame)
                told += 1
            except OSError:
                pass  # not running: it holds no session
        log.event(logger, logging.INFO, "operator closed a device's sessions", device=device,
                  code=code, workers=told)  # fmt: skip
        return told

    # -- reload (SIGHUP) ------------------------------------------------------

    def begin_reload(self) -> None:
        """Re-read and check the configuration; start a new generation of workers.

        The old workers keep serving until every new one listens (SO_REUSEPORT
        lets both generations share the port); only then are they told to
        drain.  A bad configuration, or a new worker that fails, leaves the
        old generation serving.
        """
        from .config import ConfigError, load

        if self.incoming:
            log.event(logger, logging.WARNING, "reload already in progress; SIGHUP ignored")
            return
        try:
            new = load(self.config_path, self.overrides) if self.config_path else self.config
            if os.path.abspath(new.data_dir) != os.path.abspath(self.config.data_dir):
                raise ConfigError(
                    f"data-dir cannot change on reload ({self.config.data_dir} -> "
                    f"{new.data_dir}): restart instead"
                )
            if new.metrics_listen != self.config.metrics_listen:
                raise ConfigError("metrics-listen cannot change on reload: restart instead")
            if new.store_writemap != self.config.store_writemap:
                # both generations write the store during a reload, and LMDB's
                # processes must agree on MDB_WRITEMAP
                raise ConfigError("store-writemap cannot change on reload: restart instead")
            old_config, self.config = self.config, new
            try:
                self.preflight(reload=True)
            finally:
                self.config = old_config
            if (new.max_connections, new.files_reserve) != (
                old_config.max_connections,
                old_config.files_reserve,
            ):
                size_open_files(new)  # the new workers inherit what this sets
        except (ConfigError, StartupError) as exc:
            log.event(logger, logging.ERROR, "reload refused; the running workers keep serving",
                      error=str(exc))  # fmt: skip
            notify(status=f"reload refused: {exc}")
            return
        self.gen += 1
        count = new.worker_count
        self.incoming = generation(self.gen, count, new)
        self.reload_started = time.monotonic()
        log.event(logger, logging.INFO, "reload: starting new workers", gen=self.gen,
                  workers=count, config=self.config_path)  # fmt: skip
        notify(reloading=1, status="reloading")
        for w in self.incoming:
            self.spawn(w)

    def _advance_reload(self) -> None:
        if not self.incoming:
            return
        if all(w.ready for w in self.incoming):
            old, self.workers = self.workers, self.incoming
            self.incoming = []
            self.config = self.workers[0].config
            self.count = sum(1 for w in self.workers if not w.media)  # (the chat workers)
            for w in old:
                if w.proc is not None and w.proc.poll() is None:
                    w.proc.send_signal(signal.SIGTERM)
                    self.retiring.append(w)
            log.event(logger, logging.INFO, "reload: new workers serving; old ones draining",
                      gen=self.gen, seconds=round(time.monotonic() - self.reload_started, 3))  # fmt: skip
            self.ready_due, self.ready_gen = time.monotonic() + CLOSE_WAIT, self.gen
        elif time.monotonic() - self.reload_started > READY_TIMEOUT:
            self._abort_reload(f"new workers not ready within {READY_TIMEOUT:.0f} s")

    def _announce_reload(self) -> None:
        """READY=1 for a reload once no old worker listens any more.

        Until an old worker has closed its listening sockets the kernel may
        still hand it a new connection, which it would answer 503: READY
        means a client that connects now reaches the new generation.  An old
        worker says "closed" on its status pipe when its listeners are shut
        (or exits); one that says neither within CLOSE_WAIT does not hold
        READY back longer.
        """
        if self.ready_due is None:
            return
        if time.monotonic() < self.ready_due and not all(
            w.closed or w.proc is None for w in self.retiring
        ):
            return
        self.ready_due = None
        notify(ready=1, status=f"serving (generation {self.ready_gen})")

    def _abort_reload(self, why: str) -> None:
        for w in self.incoming:
            if w.proc is not None and w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait()
            if w.status_fd is not None:
                self.sel.unregister(w.status_fd)
                os.close(w.status_fd)
                w.status_fd = None
        self.incoming = []
        log.event(logger, logging.ERROR, "reload failed; the running workers keep serving",
                  error=why)  # fmt: skip
        notify(ready=1, status=f"reload failed: {why}")

    def _forget_sessions(self, w: WorkerProc) -> None:
        """A worker id that will not run again: drop its session records.

        A worker clears its own records when it stops cleanly, and a crashed
        one's are cleared by its restart (same id); an old generation killed
        while draining has neither, and its records would send pushes to a
        worker that is gone until those devices log in again.
        """
        try:
            store = Store(
                os.path.join(self.config.data_dir, "store"),
                map_size=self.config.map_size,
                writemap=self.config.store_writemap,
            )
            try:
                store.clear_worker_sessions(w.wid)
            finally:
                store.close()
        except (StoreError, OSError) as exc:
            log.event(logger, logging.WARNING, "could not clear a worker's sessions",
                      **w.fields(gen=w.gen, error=str(exc)))  # fmt: skip

    def worker_pids(self) -> dict[int, int]:
        """{worker id: pid} of the running workers (read by the metrics thread)."""
        pids = {}
        for w in self.workers + self.incoming + self.retiring:
            proc = w.proc  # read once: the main thread may clear it meanwhile
            if proc is not None and not w.media:
                pids[w.wid] = proc.pid
        return pids

    def health(self) -> str:
        """What /health answers: ready, starting or stopping."""
        if self.stopping:
            return "stopping"
        if self.announced and all(w.ready and w.proc is not None for w in self.workers):
            return "ready"
        return "starting"

    def status(self) -> dict:
        """The supervisor's part of /status: state, workers, listeners (see metrics.status_document).

        Read by the metrics thread while the main thread runs: each list and
        each worker's process is read once, as in worker_pids.
        """
        now = time.monotonic()
        rows, media = [], []
        for role, group in (("serving", self.workers), ("incoming", self.incoming),
                            ("retiring", self.retiring)):  # fmt: skip
            for w in list(group):
                proc = w.proc
                if proc is None:
                    state = "restarting" if w.restart_at is not None else "stopped"
                elif role == "retiring":
                    state = "draining"
                else:
                    state = "ready" if w.ready else "starting"
                (media if w.media else rows).append({
                    "id": w.wid, "index": w.index, "generation": w.gen,
                    "pid": proc.pid if proc is not None else None, "state": state,
                    "uptime_s": round(now - w.started, 3) if proc is not None else None,
                    "restarts": w.restarts,
                })  # fmt: skip
        c = self.config
        return {
            "state": self.health(),
            "pid": os.getpid(),
            "start_ms": int(self.start_time * 1000),
            "uptime_s": round(now - self.start_mono, 3),
            "generation": self.gen,
            "reloading": bool(self.incoming),
            "workers_configured": self.count,
            "workers": rows,
            "media": media,  # the media service's process(es): rows like the workers'
            "listeners": {
                "chat": c.listen,
                "tls": c.tls_listen if c.tls_enabled else None,
                "metrics": c.metrics_listen,
                "media": c.media_listen,
                "control": os.path.abspath(control_mod.socket_path(c.data_dir)),
            },
            "data_dir": os.path.abspath(c.data_dir),
        }

    def shutdown(self) -> None:
        self.stopping = True
        notify(stopping=1, status="draining")
        everyone = self.workers + self.incoming + self.retiring
        for w in everyone:
            if w.proc is not None and w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for w in everyone:
            if w.proc is None:
                continue
            try:
                w.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.event(
                    logger, logging.WARNING, f"{w.kind} did not stop; killing it", **w.fields()
                )
                w.proc.kill()
                w.proc.wait()
        for fd in (self.death_r, self.death_w, self.wake_r, self.wake_w):
            if fd >= 0:
                os.close(fd)
        if self.run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
        for cc in list(self.control_conns):
            self._control_done(cc, {"ok": False, "error": "the server is stopping"})
        if self.control is not None:
            self.control.close()
            try:
                os.unlink(os.path.join(self.config.data_dir, CONTROL_SOCKET))
            except OSError:
                pass
        log.event(logger, logging.INFO, "server stopped")


def serve(config, config_path: str | None = None, overrides: dict | None = None) -> int:
    log.setup(config.log_level, config.log_format)
    try:
        return Supervisor(config, config_path, overrides).run()
    except StartupError as exc:
        print(f"pigeon serve: {exc}", file=sys.stderr)
        return 1
