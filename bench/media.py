"""``pigeon bench media``: upload and download throughput of the media service, and
the server's CPU per GB, beside a plain HTTP download of the same files.

A server with its media process starts (limits lifted, as for every bench);
``--parallel`` provisioned devices log in, each with one file of ``--size``
random bytes standing for a ciphertext (encryption is the client's cost,
not the server's: it is done before the clock starts).  Phase one: every
device asks for a grant and PUTs its file at once (aiohttp, the SDK's
``upload_file``); phase two: every device GETs its file back with its
download token and checks the SHA-256 as it streams (a mismatch counts in
``errors`` and the run exits 1).  MB/s is all bytes over the phase's wall
time; server CPU is user + system of the supervisor, the workers and the
media process over both phases, per GB moved (up and down).

``--baseline`` (on by default) then serves the same files with ``python -m
http.server`` and downloads them with ``--parallel`` concurrent ``curl``
processes: its MB/s and CPU per GB, and the ratios, are in the same JSON.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time

MEDIA_PROFILE = {
    "media_quota_bytes": 1 << 50,
    "media_quota_uploads": 1_000_000,
    "media_request_rate": 1_000_000,
    "media_transfers_per_ip": 10_000,
    "media_max_bytes": 1 << 31,
}


def parse_size(text: str) -> int:
    units = {"": 1, "B": 1, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 1000,
             "MB": 1000**2, "GB": 1000**3}  # fmt: skip
    t = text.strip().upper()
    i = len(t)
    while i and not t[i - 1].isdigit():
        i -= 1
    num, unit = t[:i], t[i:].strip()
    if not num.isdigit() or unit not in units:
        raise ValueError(f"a size is a number with KiB, MiB, GiB, KB, MB or GB, got {text!r}")
    return int(num) * units[unit]


def _cpu(pids) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs = [p, *p.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for q in procs:
            try:
                t = q.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += t.user + t.system
    return total


async def _transfers(opts, server, creds, files) -> dict:
    import aiohttp

    from pigeon.client import Client, Credentials
    from pigeon.client.media import _auth, upload_file

    host, _, port = server.target.rpartition(":")
    clients = []
    for c in creds:
        cl = await Client.connect(host, int(port))
        await cl.login(Credentials(c["device"], bytes.fromhex(c["secret"])))
        clients.append(cl)
    errors: dict[str, int] = {}

    def err(kind: str) -> None:
        errors[kind] = errors.get(kind, 0) + 1

    size = opts.size
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(sock_read=120)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:

        async def up(cl, path, sha):
            g = await cl.request_upload(size, sha, "video")
            return await upload_file(g.url, g.token, path, session=session)

        cpu0 = _cpu([server.pid])
        t0 = time.monotonic()
        done = await asyncio.gather(*(up(cl, p, s) for cl, (p, s) in zip(clients, files,
                                                                          strict=True)),
                                    return_exceptions=True)  # fmt: skip
        t1 = time.monotonic()
        cpu1 = _cpu([server.pid])
        answers = []
        for d in done:
            if isinstance(d, Exception):
                err(f"upload: {type(d).__name__}: {d}"[:120])
            else:
                answers.append(d)

        async def down(d, sha):
            url = f"http://{opts.media_listen}{d['path']}"
            h = hashlib.sha256()
            n = 0
            tok = bytes.fromhex(d["token_hex"])
            async with session.get(url, headers=_auth(tok)) as r:
                if r.status != 200:
                    err(f"download: HTTP {r.status}")
                    return 0
                async for chunk in r.content.iter_chunked(1 << 18):
                    h.update(chunk)
                    n += len(chunk)
            if h.digest() != sha:
                err("download: hash mismatch")
            return n

        import base64

        for d in answers:
            t = d["token"]
            d["token_hex"] = base64.urlsafe_b64decode(t + "=" * (-len(t) % 4)).hex()
        shas = {s.hex(): s for _, s in files}
        t2 = time.monotonic()
        got = await asyncio.gather(*(down(d, shas[d["id"]]) for d in answers))
        t3 = time.monotonic()
        cpu2 = _cpu([server.pid])
        curl = await asyncio.to_thread(_curl_media, opts, server, answers)
    for cl in clients:
        await cl.close()
    up_bytes = size * len(answers)
    down_bytes = sum(got)
    return {
        "upload_s": t1 - t0, "download_s": t3 - t2, "up_bytes": up_bytes,
        "down_bytes": down_bytes, "cpu_up": cpu1 - cpu0, "cpu_down": cpu2 - cpu1,
        "errors": errors, "curl": curl,
    }  # fmt: skip


def _curl_media(opts, server, answers) -> dict | None:
    """The same downloads from the media service by curl (as the baseline's client): the
    token in a header file (-H @FILE), never in curl's argv."""
    curl = shutil.which("curl")
    if curl is None or not answers:
        return None
    tmp = tempfile.mkdtemp(prefix="pigeon-bench-curl-")
    try:
        cmds = []
        for i, d in enumerate(answers):
            hdr = os.path.join(tmp, f"h{i}")
            fd = os.open(hdr, os.O_WRONLY | os.O_CREAT, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(_auth_line(bytes.fromhex(d["token_hex"])) + "\n")
            cmds.append([curl, "-s", "-o", "/dev/null", "-w", "%{size_download}", "-H",
                         "@" + hdr, f"http://{opts.media_listen}{d['path']}"])  # fmt: skip
        return _run_curls(cmds, [server.pid])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _auth_line(token: bytes) -> str:
    from pigeon.client.media import _auth

    return "Authorization: " + _auth(token)["Authorization"]


def _run_curls(cmds, server_pids) -> dict:
    cpu0 = _cpu(server_pids)
    t0 = time.monotonic()
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE) for c in cmds]
    got = 0
    for p in procs:
        out, _ = p.communicate(timeout=600)
        got += int(out or 0)
    elapsed = time.monotonic() - t0
    cpu = _cpu(server_pids) - cpu0
    return {"download_mb_per_s": round(got / elapsed / 1e6, 1),
            "server_cpu_s_per_gb": round(cpu / (got / 1e9), 2) if got else None,
            "bytes": got}  # fmt: skip


def baseline(opts, folder: str, names: list[str]) -> dict | None:
    curl = shutil.which("curl")
    if curl is None:
        return None
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    httpd = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                              "--directory", folder, str(port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        cmds = [[curl, "-s", "-o", "/dev/null", "-w", "%{size_download}",
                 f"http://127.0.0.1:{port}/{n}"] for n in names]  # fmt: skip
        out = _run_curls(cmds, [httpd.pid])
    finally:
        httpd.terminate()
        httpd.wait(10)
    return {**out, "server": "python -m http.server", "client": "curl"}


def media_bench(opts) -> dict:
    from .harness import BenchError, ServerUnderTest, _free_port, machine

    n, size = opts.parallel, opts.size
    tmp = tempfile.mkdtemp(prefix="pigeon-bench-media-")
    server = ServerUnderTest()
    try:
        creds_path = os.path.join(tmp, "creds.jsonl")
        opts.media_listen = f"127.0.0.1:{_free_port()}"
        server.start(opts.workers, {"media_listen": opts.media_listen, "media_loop": opts.loop,
                                    **MEDIA_PROFILE}, n, creds_path)  # fmt: skip
        from pigeon.server.provision import load_credentials

        creds = load_credentials(creds_path)
        folder = os.path.join(tmp, "files")
        os.makedirs(folder)
        files = []
        for i in range(n):
            path = os.path.join(folder, f"f{i}.bin")
            h = hashlib.sha256()
            with open(path, "wb") as f:
                left = size
                while left:
                    chunk = os.urandom(min(left, 1 << 22))
                    h.update(chunk)
                    f.write(chunk)
                    left -= len(chunk)
            files.append((path, h.digest()))
        r = asyncio.run(_transfers(opts, server, creds, files))
        base = baseline(opts, folder, [os.path.basename(p) for p, _ in files]) \
            if opts.baseline else None  # fmt: skip
    except OSError as exc:
        raise BenchError(str(exc)) from None
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    gb = (r["up_bytes"] + r["down_bytes"]) / 1e9
    out = {
        "bench": "media",
        "size_bytes": size,
        "parallel": n,
        "workers": opts.workers,
        "media_loop": opts.loop,
        "upload_mb_per_s": round(r["up_bytes"] / r["upload_s"] / 1e6, 1) if r["upload_s"] else None,
        "download_mb_per_s": round(r["down_bytes"] / r["download_s"] / 1e6, 1)
        if r["download_s"] else None,
        "server_cpu_s_per_gb": round((r["cpu_up"] + r["cpu_down"]) / gb, 2) if gb else None,
        "server_cpu_s_per_gb_upload": round(r["cpu_up"] / (r["up_bytes"] / 1e9), 2)
        if r["up_bytes"] else None,
        "server_cpu_s_per_gb_download": round(r["cpu_down"] / (r["down_bytes"] / 1e9), 2)
        if r["down_bytes"] else None,
        "errors": r["errors"],
        "note": "plain HTTP on loopback (no TLS); MB = 10^6 bytes; server CPU: supervisor, "
        "workers and the media process, user + system, from the OS",
        "machine": machine(),
    }  # fmt: skip
    if r["curl"] is not None:
        out["download_curl"] = {**r["curl"], "client": "curl", "server": "pigeon media"}
    if base is not None:
        out["baseline"] = base
        # the ratios compare one client (curl) against the two servers
        ours = out.get("download_curl") or {}
        if base["download_mb_per_s"] and ours.get("download_mb_per_s"):
            out["download_ratio_to_baseline"] = round(
                ours["download_mb_per_s"] / base["download_mb_per_s"], 2)  # fmt: skip
        if base["server_cpu_s_per_gb"] and ours.get("server_cpu_s_per_gb"):
            out["download_cpu_ratio_to_baseline"] = round(
                ours["server_cpu_s_per_gb"] / base["server_cpu_s_per_gb"], 2)  # fmt: skip
    return out


def add_parser(parser) -> None:
    """The ``media`` subcommand (``parser``: harness's subparser factory)."""
    from .harness import run

    m = parser(
        "media",
        help="media upload and download MB/s and server CPU per GB, beside curl + http.server",
        description="--parallel devices upload one --size file each to the media service at "
        "once, then download them (hash checked); reports MB/s both ways and the server's "
        "CPU seconds per GB, and the same files downloaded by curl from python -m "
        "http.server in the same run. Exits 1 on any error (a hash mismatch among them).",
    )
    m.add_argument("--size", type=parse_size, default=parse_size("10MiB"), metavar="SIZE",
                   help="bytes per file: 10MiB, 500KiB, 1GB...")  # fmt: skip
    m.add_argument("--parallel", type=int, default=8, metavar="N",
                   help="devices transferring at once, one file each")  # fmt: skip
    m.add_argument("--workers", type=int, default=os.cpu_count() or 1, metavar="N",
                   help="chat workers")  # fmt: skip
    m.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio",
                   help="the media process's event loop (media-loop)")  # fmt: skip
    m.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="skip the curl + http.server download")  # fmt: skip
    m.add_argument("--json", action="store_true", help="print exactly one JSON object")
    m.set_defaults(func=run, bench=media_bench, target=None, server_pid=None, creds=None)
