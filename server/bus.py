"""The bus: worker-to-worker channels, with small typed binary records.

Theory of operation.  Every worker listens on a Unix socket in the run
directory (``w<wid>.sock``); a worker that has something for another opens
one connection to it on first use and keeps it.  What a worker has for a
peer during one loop tick is appended to one buffer and written once at the
end of the tick (``Bus.flush``).  A peer that is down (restarting) loses
what was meant for it and nothing else: its devices' connections are gone
with it, and queued entries wait in the store.

Records are not protocol nodes: nothing on the bus comes from a client, and
a delivery crosses it as the stored queue entry (``Codec.queue_entry``)
behind a few bytes of header, so the receiving worker splices the frame
straight into the device's output (one copy of the body, no decode).

    record  := length u32 | type u8 | body          (length counts type and body)
    PUSH     1  dlen u8, device, seq u64, entry      a committed queue entry
    TYPING   2  dlen u8, device, frame               a finished chatstate frame
    PRESENCE 3  user                                  the user's presence changed
    KICK     4  code u16, dlen u8, device, text      close the device's session
    PAIRED   5  conn u64, rlen u8, rid, dlen u8, device, secret (32)
                                                     a companion waiting on connection
                                                     ``conn`` was linked (server/linking.py)

Integers are big-endian; strings are ASCII except ``text`` (UTF-8).  The
supervisor writes KICK records too (``kick_record``), for operators.
"""

from __future__ import annotations

import logging
import os
import struct

from .log import event

logger = logging.getLogger("pigeon.worker")

PUSH, TYPING, PRESENCE, KICK, PAIRED = 1, 2, 3, 4, 5
MAX_RECORD = 1 << 26  # past any entry a frame limit allows: a bigger length is a bug

_HEAD = struct.Struct(">IB")
_SEQ = struct.Struct(">Q")
_CODE = struct.Struct(">H")


def _device_head(kind: int, device: str, extra: int) -> bytes:
    d = device.encode()
    return _HEAD.pack(1 + 1 + len(d) + extra, kind) + bytes((len(d),)) + d


def kick_record(device: str, code: int, text: str = "") -> bytes:
    d, t = device.encode(), text.encode()
    return (
        _HEAD.pack(1 + 2 + 1 + len(d) + len(t), KICK) + _CODE.pack(code) + bytes((len(d),)) + d + t
    )


class BusPeer:
    """One inbound or outbound connection between two workers (an asyncio Protocol)."""

    def __init__(self, bus: Bus):
        self.bus = bus
        self.buf = b""  # the start of a record not wholly received yet
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        # Records are read from an immutable bytes object (the chunk itself,
        # unless a partial record waited), so what a record hands on (a view
        # of its entry) never pins a buffer that must change size.
        buf = self.buf + data if self.buf else data
        pos = 0
        end = len(buf)
        w = self.bus.worker
        view = memoryview(buf)
        try:
            while end - pos >= 5:
                n, kind = _HEAD.unpack_from(buf, pos)
                if n == 0 or n > MAX_RECORD:
                    event(logger, logging.ERROR, "bad record on the bus; link closed", size=n)
                    self.transport.close()
                    pos = end
                    break
                if end - pos < 4 + n:
                    break
                body = pos + 5
                stop = pos + 4 + n
                pos = stop
                if kind == PUSH or kind == TYPING:
                    dlen = buf[body]
                    device = bytes(view[body + 1 : body + 1 + dlen]).decode()
                    at = body + 1 + dlen
                    if kind == PUSH:
                        seq = _SEQ.unpack_from(buf, at)[0]
                        w.offer_local(device, seq, view[at + 8 : stop])
                    else:
                        w.typing_local(device, view[at:stop])
                elif kind == PRESENCE:
                    w.presence.note_remote(bytes(view[body:stop]).decode())
                elif kind == KICK:
                    code = _CODE.unpack_from(buf, body)[0]
                    dlen = buf[body + 2]
                    device = bytes(view[body + 3 : body + 3 + dlen]).decode()
                    text = bytes(view[body + 3 + dlen : stop]).decode("utf-8", "replace") or None
                    w.kick_local(device, code, text)
                elif kind == PAIRED:
                    conn = _SEQ.unpack_from(buf, body)[0]
                    at = body + 8
                    rid = bytes(view[at + 1 : at + 1 + buf[at]]).decode()
                    at += 1 + buf[at]
                    device = bytes(view[at + 1 : at + 1 + buf[at]]).decode()
                    at += 1 + buf[at]
                    w.paired_local(conn, rid, device, bytes(view[at:stop]))
                else:
                    event(logger, logging.WARNING, "unknown record on the bus; ignored", kind=kind)
        finally:
            self.buf = buf[pos:]

    def eof_received(self):
        return False

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass

    def connection_lost(self, exc) -> None:
        self.bus.lost(self)


class Bus:
    """Worker-to-worker channels: Unix sockets in the run directory, one write per peer per tick."""

    def __init__(self, worker):
        self.worker = worker
        self.out: dict[int, bytearray] = {}
        self.peers: dict[int, BusPeer] = {}
        self.connecting: set[int] = set()
        self.server = None

    def path(self, wid: int) -> str:
        return os.path.join(self.worker.run_dir, f"w{wid}.sock")

    def peer_ids(self) -> list[int]:
        """Every worker listening now, this generation or another (during a reload)."""
        out = []
        for name in os.listdir(self.worker.run_dir):
            if name.startswith("w") and name.endswith(".sock") and name[1:-5].isdigit():
                out.append(int(name[1:-5]))
        return out

    async def start(self) -> None:
        path = self.path(self.worker.wid)
        if os.path.exists(path):
            os.unlink(path)
        self.server = await self.worker.loop.create_unix_server(lambda: BusPeer(self), path)

    def _buffer(self, wid: int) -> bytearray:
        buf = self.out.get(wid)
        if buf is None:
            buf = self.out[wid] = bytearray()
            self.worker._schedule_tick()
        return buf

    def push(self, wid: int, device: str, seq: int, entry) -> None:
        """A committed queue entry for a device that worker ``wid`` holds."""
        buf = self._buffer(wid)
        buf += _device_head(PUSH, device, 8 + len(entry))
        buf += _SEQ.pack(seq)
        buf += entry

    def typing(self, wid: int, device: str, frame) -> None:
        buf = self._buffer(wid)
        buf += _device_head(TYPING, device, len(frame))
        buf += frame

    def presence(self, wid: int, user: str) -> None:
        u = user.encode()
        buf = self._buffer(wid)
        buf += _HEAD.pack(1 + len(u), PRESENCE)
        buf += u

    def kick(self, wid: int, device: str, code: int, text: str = "") -> None:
        self._buffer(wid).extend(kick_record(device, code, text))

    def paired(self, wid: int, conn: int, rid: str, device: str, secret: bytes) -> None:
        """Hand a linked companion's device and secret to the worker holding its connection."""
        r, d = rid.encode(), device.encode()
        buf = self._buffer(wid)
        buf += _HEAD.pack(1 + 8 + 1 + len(r) + 1 + len(d) + len(secret), PAIRED)
        buf += _SEQ.pack(conn)
        buf += bytes((len(r),)) + r + bytes((len(d),)) + d + secret

    def flush(self) -> None:
        if not self.out:
            return
        for index, buf in list(self.out.items()):
            peer = self.peers.get(index)
            if peer is not None and peer.transport is not None and not peer.transport.is_closing():
                peer.transport.write(buf)
                del self.out[index]
            elif index not in self.connecting:
                self.connecting.add(index)
                self.worker.spawn(self._connect(index))

    async def _connect(self, index: int) -> None:
        try:
            _, peer = await self.worker.loop.create_unix_connection(
                lambda: BusPeer(self), self.path(index)
            )
            self.peers[index] = peer
        except OSError as exc:
            # The peer worker is down (restarting): its devices' connections
            # are gone with it; what was queued for them waits in the store.
            event(logger, logging.WARNING, "cannot reach worker", worker=index, error=str(exc))
            self.out.pop(index, None)
        finally:
            self.connecting.discard(index)
        if self.out.get(index):
            self.flush()

    def lost(self, peer: BusPeer) -> None:
        for index, p in list(self.peers.items()):
            if p is peer:
                del self.peers[index]

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        try:  # no longer a peer for anyone
            os.unlink(self.path(self.worker.wid))
        except OSError:
            pass
        for p in self.peers.values():
            if p.transport is not None:
                p.transport.close()
