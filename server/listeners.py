"""The worker's listening sockets: binding with SO_REUSEPORT, the TLS accept, the drain.

Every worker binds the listening port itself with SO_REUSEPORT
(SO_REUSEPORT_LB on FreeBSD), so the kernel spreads new connections over
the workers; nothing Python-level is shared between them.

The loop serves a duplicate of each listening socket; the original stays
here so that a drain can empty its accept queue (``drain_accept_queues``).
The plain listener is a loop server.  The TLS one is accepted here
(``accept_tls``): each connection is counted at the TCP accept
(``Session.accepted``) and only then handed to the loop for its handshake,
so that no limit waits for a handshake to end.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import sys

from . import log
from .config import split_hostport

logger = logging.getLogger("pigeon.worker")

FULL_LOG_INTERVAL = 10.0


def _key_mode_problem(st: os.stat_result) -> str | None:
    """Why a private key file's mode is too open, or None.  PostgreSQL's rule:
    a key the server's own user owns is for that user alone (0600/0400); one
    root owns may also be read by its group (0640, Debian's ssl-cert group)."""
    mode = st.st_mode & 0o777
    me = os.geteuid() if hasattr(os, "geteuid") else st.st_uid
    owned_by_root = st.st_uid == 0 and me != 0
    if mode & (0o037 if owned_by_root else 0o077):
        if owned_by_root:
            fix = "chmod it 0640 or 0600 (root owns it)"
        elif st.st_uid == me:
            fix = "chmod it 0600"
        else:  # a third user's: 0600 would lock the server out
            fix = "chown it to the server's user and chmod it 0600"
        return f"may be read or written by other users (mode {mode:04o}): {fix}"
    return None


def tls_context(config) -> ssl.SSLContext:
    """The server's TLS context from tls-cert and tls-key (TLS 1.2 at least).

    Raises ValueError naming the file and what is wrong with it: unreadable,
    a key others may read, not PEM, a key with a passphrase, or a key that is
    not the certificate's."""
    cert = config.tls_cert
    key = config.tls_key or config.tls_cert
    what = {cert: "tls-cert", key: "tls-key"} if key != cert else {cert: "tls-cert (with its key)"}
    for path, name in what.items():
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
        except OSError as exc:
            raise ValueError(f"cannot read {name} {path}: {exc.strerror}") from None
        if path == key:
            problem = _key_mode_problem(st)
            if problem:
                raise ValueError(f"{name} {path} {problem}")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        # a key under a passphrase would make OpenSSL prompt on the terminal
        ctx.load_cert_chain(cert, key, password=_no_passphrase)
    except _Passphrase:
        raise ValueError(f"{what[key]} {key} is protected by a passphrase: the server cannot "
                         "ask for one; store the key without it (mode 0600)") from None  # fmt: skip
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(_diagnose_tls(cert, key, what[key], exc)) from None
    return ctx


class _Passphrase(Exception):
    pass


def _no_passphrase():
    raise _Passphrase


def _diagnose_tls(cert: str, key: str, key_name: str, exc: Exception) -> str:
    """Which of the two files OpenSSL's error is about (it does not say)."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
    try:
        with open(cert, "rb") as f:
            x509.load_pem_x509_certificates(f.read())
    except (OSError, ValueError):
        return f"tls-cert {cert} holds no PEM certificate ({reason})"
    try:
        with open(key, "rb") as f:
            serialization.load_pem_private_key(f.read(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm):
        return f"{key_name} {key} holds no PEM private key ({reason})"
    return f"{key_name} {key} is not the key of the certificate in tls-cert {cert} ({reason})"


def reuseport_option() -> int | None:
    """The socket option that spreads connections over listeners on this OS."""
    if sys.platform.startswith("freebsd"):
        # FreeBSD 12+: plain SO_REUSEPORT lets one socket take every connection.
        return getattr(socket, "SO_REUSEPORT_LB", 0x00010000)
    return getattr(socket, "SO_REUSEPORT", None)


def listen_socket(hostport: str, backlog: int = 1024) -> socket.socket:
    host, port = split_hostport(hostport)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        opt = reuseport_option()
        if opt is not None:
            sock.setsockopt(socket.SOL_SOCKET, opt, 1)
        sock.bind((host, int(port)))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def raise_open_files_limit(want: int | None = None) -> int | None:
    """Lift the soft RLIMIT_NOFILE toward the hard one: to ``want`` descriptors if given
    (never lowering it), else all the way.  Returns the soft limit now in force, or
    None if there is none (or no ``resource`` module to ask)."""
    try:
        import resource
    except ImportError:  # not a Unix
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if want is not None:
        target = min(target, want)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


class Listeners:
    """The chat listeners of one worker (plain TCP, and TLS when configured)."""

    def __init__(self, worker, session_factory):
        self.worker = worker
        self.session = session_factory  # Session(worker, tls=ctx)
        self.raw: list[tuple[socket.socket, ssl.SSLContext | None]] = []
        self.servers = []  # loop servers, and the TLS listeners' duplicates
        self.handshakes: set = set()  # TLS handshakes in progress (Session.handshake)

    def open(self, config) -> None:
        self.raw = [(listen_socket(config.listen), None)]
        if config.tls_enabled:
            self.raw.append((listen_socket(config.tls_listen), tls_context(config)))

    async def start(self) -> None:
        loop = self.worker.loop
        for raw, ctx in self.raw:
            if ctx is None:
                self.servers.append(
                    await loop.create_server(lambda: self.session(self.worker), sock=raw.dup())
                )
            else:
                dup = raw.dup()
                dup.setblocking(False)
                loop.add_reader(dup.fileno(), self.accept_tls, dup, ctx)
                self.servers.append(dup)

    def stop_accepting(self) -> None:
        for srv in self.servers:
            if isinstance(srv, socket.socket):
                self.worker.loop.remove_reader(srv.fileno())
            srv.close()

    def cancel_handshakes(self) -> None:
        for t in list(self.handshakes):
            t.cancel()

    async def drain_accept_queues(self) -> None:
        """Accept what is still queued on the listening sockets, then close them.

        Closing a listener resets the connections waiting in its accept
        queue (Linux, without net.ipv4.tcp_migrate_req).  Emptying the queue
        first leaves a window of microseconds instead; the connections taken
        are served like the others: told 503, so their clients reconnect to
        the workers still listening (a reload's new generation).
        """
        w = self.worker
        waiting = []
        for raw, ctx in self.raw:
            raw.setblocking(False)
            while True:
                try:
                    conn, addr = raw.accept()
                except OSError:  # BlockingIOError: the queue is empty
                    break
                waiting.append((conn, addr, ctx))
            raw.close()
        for conn, addr, ctx in waiting:
            if ctx is not None:
                self.tls_accepted(conn, addr, ctx)
                continue
            try:
                await w.loop.connect_accepted_socket(lambda: self.session(w), conn)
            except OSError:
                conn.close()
        if waiting:
            log.event(logger, logging.INFO, "drained the accept queue", worker=w.index,
                      connections=len(waiting))  # fmt: skip

    def accept_tls(self, sock: socket.socket, ctx: ssl.SSLContext) -> None:
        """The TLS listener is readable: accept what waits (a bounded number a call)."""
        w = self.worker
        for _ in range(64):
            try:
                conn, addr = sock.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:  # out of descriptors: pause accepting for a second
                now = w.loop.time()
                if now - w.full_logged >= FULL_LOG_INTERVAL:
                    w.full_logged = now
                    log.event(logger, logging.WARNING, "cannot accept", worker=w.index,
                              error=str(exc))  # fmt: skip
                w.loop.remove_reader(sock.fileno())
                w.loop.call_later(1.0, self._resume_tls_accept, sock, ctx)
                return
            self.tls_accepted(conn, addr, ctx)

    def _resume_tls_accept(self, sock: socket.socket, ctx: ssl.SSLContext) -> None:
        if not self.worker.draining and sock.fileno() >= 0:
            self.worker.loop.add_reader(sock.fileno(), self.accept_tls, sock, ctx)

    def tls_accepted(self, conn: socket.socket, addr, ctx: ssl.SSLContext) -> None:
        conn.setblocking(False)
        s = self.session(self.worker, tls=ctx)
        if s.accepted(addr[0] if addr else "?"):
            task = self.worker.loop.create_task(s.handshake(conn))
            s.handshaking = task
            self.handshakes.add(task)
            task.add_done_callback(self.handshakes.discard)
        else:
            conn.close()
