"""Local push endpoints for tests: HTTP servers on 127.0.0.1 that record every request.

``Recorder`` is an aiohttp server (HTTP/1.1, plain or TLS) standing in for a
webhook, FCM's OAuth and send endpoints, or a Web Push service; ``H2Recorder``
is hypercorn with TLS and ALPN h2, standing in for APNs (HTTP/2 only).  Each
runs its own event loop in a thread, so it outlives the tests' asyncio.run
calls; ``respond(record) -> (status, body bytes, delay seconds[, headers])``
decides the answer (the headers: the Recorder's only).  The real services are unreachable from this machine."""

from __future__ import annotations

import asyncio
import ssl
import threading
import time

from serverutil import free_port


class Request:
    __slots__ = ("method", "path", "headers", "body", "version", "at")

    def __init__(self, method, path, headers, body, version):
        self.method = method
        self.path = path
        self.headers = headers  # {lowercased name: value}
        self.body = body
        self.version = version
        self.at = time.monotonic()

    def raw(self) -> bytes:
        """Everything the request carried, for grepping."""
        head = f"{self.method} {self.path}\n" + "".join(
            f"{k}: {v}\n" for k, v in self.headers.items()
        )
        return head.encode() + self.body


def _ok(_req):
    return 200, b"{}", 0.0


class _Base:
    def __init__(self, respond=_ok, tls: tuple[str, str] | None = None):
        self.port = free_port()
        self.respond = respond
        self.tls = tls
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    @property
    def base(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self):
        self.thread.start()
        if not self.ready.wait(15):
            raise RuntimeError("push recorder did not start")
        return self

    def _record(self, req: Request):
        with self.lock:
            self.requests.append(req)
        return self.respond(req)

    def got(self, path_prefix: str = "") -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.path.startswith(path_prefix)]

    def ssl_context(self):
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(*self.tls)
        return ctx

    def stop(self):
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(10)


class Recorder(_Base):
    def _run(self):
        from aiohttp import web

        asyncio.set_event_loop(self.loop)

        async def handle(request):
            body = await request.read()
            rec = Request(request.method, request.path_qs,
                          {k.lower(): v for k, v in request.headers.items()}, body,
                          f"{request.version.major}.{request.version.minor}")  # fmt: skip
            status, out, delay, *headers = self._record(rec)  # (+ a dict of headers)
            if delay:
                await asyncio.sleep(delay)
            return web.Response(status=status, body=out, content_type="application/json",
                                headers=headers[0] if headers else None)  # fmt: skip

        async def main():
            self._stop = asyncio.Event()
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", handle)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", self.port,
                               ssl_context=self.ssl_context() if self.tls else None)  # fmt: skip
            await site.start()
            self.ready.set()
            await self._stop.wait()
            await runner.cleanup()

        self.loop.run_until_complete(main())


class H2Recorder(_Base):
    """hypercorn, TLS with ALPN h2: what APNs speaks."""

    def _run(self):
        from hypercorn.asyncio import serve
        from hypercorn.config import Config

        asyncio.set_event_loop(self.loop)

        async def app(scope, receive, send):
            if scope["type"] == "lifespan":
                while True:
                    msg = await receive()
                    if msg["type"] == "lifespan.startup":
                        await send({"type": "lifespan.startup.complete"})
                    elif msg["type"] == "lifespan.shutdown":
                        await send({"type": "lifespan.shutdown.complete"})
                        return
            body = b""
            while True:
                msg = await receive()
                body += msg.get("body", b"")
                if not msg.get("more_body"):
                    break
            headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
            rec = Request(scope["method"], scope["path"], headers, body, scope["http_version"])
            status, out, delay = self._record(rec)
            if delay:
                await asyncio.sleep(delay)
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json")]})  # fmt: skip
            await send({"type": "http.response.body", "body": out})

        async def main():
            self._stop = asyncio.Event()
            cfg = Config()
            cfg.bind = [f"127.0.0.1:{self.port}"]
            cfg.certfile, cfg.keyfile = self.tls
            cfg.alpn_protocols = ["h2"]
            cfg.accesslog = None
            cfg.errorlog = None
            task = asyncio.ensure_future(serve(app, cfg, shutdown_trigger=self._stop.wait))
            for _ in range(300):  # bounded: until the port takes connections
                try:
                    _, w = await asyncio.open_connection("127.0.0.1", self.port)
                    w.close()
                    break
                except OSError:
                    await asyncio.sleep(0.02)
            self.ready.set()
            await task

        self.loop.run_until_complete(main())
