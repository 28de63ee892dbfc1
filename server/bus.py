"""The bus: worker-to-worker channels, with small typed binary records.

Theory of operation.  Every worker listens on a Unix socket in the run
directory (``w<wid>.sock``); a worker that has something for another opens
one connection to it on first use and keeps it, and says who it is first
(HELLO).  What a worker has for a peer during one loop tick is appended to
one buffer and written once at the end of the tick (``Bus.flush``).  A peer
that is down (restarting) loses what was meant for it and nothing else: its
devices' connections are gone with it, and queued entries wait in the store.

Records are not protocol nodes: nothing on the bus comes from a client, and
a delivery crosses it as the stored queue entry (``Codec.queue_entry``)
behind a few bytes of header, so the receiving worker splices the frame
straight into the device's output (one copy of the body, no decode).

A PUSH is a hint; the device's queue in the store is the truth.  A session
that gets an entry past the next one it expects (``Session.offer``), or a
CATCHUP, reads what it missed from its queue, so a push may be left out
without losing a message, and two cases leave it out:

- the device's session is paused (its client is not reading): the worker
  that holds it drops what is pushed to it, and answers the pushing worker
  with HOLD; pushes to that device are then kept back (only the highest
  sequence is remembered) until RELEASE, sent when the session resumes or
  ends, which the pushing worker answers with a CATCHUP if it kept any.
- the connection to a peer has more than ``bus-buffer-high`` bytes unsent
  (the peer is not reading fast enough): PUSH and TYPING records for it are
  dropped until it drains below ``bus-buffer-low``; then each device with
  dropped pushes gets one CATCHUP.  So a worker's memory for one peer is
  bounded by bus-buffer-high plus one tick's records, whatever the clients do.

In the common case (nothing held, no peer congested) a push costs one
truth test of each of the two tables more than it did.

    record  := length u32 | type u8 | body          (length counts type and body)
    PUSH     1  dlen u8, device, seq u64, entry      a committed queue entry
    TYPING   2  dlen u8, device, frame               a finished chatstate frame
    PRESENCE 3  user                                  the user's presence changed
    KICK     4  code u16, dlen u8, device, text      close the device's session
    HELLO    5  wid u32                               who writes on this connection (first)
    HOLD     6  dlen u8, device                       the device's session is paused: no PUSH
    RELEASE  7  dlen u8, device                       it resumed or ended: PUSH again
    CATCHUP  8  dlen u8, device, seq u64              entries up to seq were committed and not
                                                      pushed: read them from the queue
    PAIRED   9  conn u64, rlen u8, rid, dlen u8, device, secret (32)
                                                      a companion waiting on connection
                                                      ``conn`` was linked (server/linking.py)
    GPUSH   10  elen u32, entry, then (dlen u8, device, seq u64) repeated
                                                      one group message body (kind 5) for
                                                      several devices the peer holds

A group message reaches every member device the peer holds in one GPUSH:
the body crosses once per worker, not once per device (``push`` appends a
device to the record it is still writing for that peer when the entry is
the same object, which it is for every member of one group message).

Integers are big-endian; strings are ASCII except ``text`` (UTF-8).  The
supervisor writes KICK records too (``kick_record``), for operators; a
connection that never sent HELLO (the supervisor's) cannot HOLD.
"""

from __future__ import annotations

import logging
import os
import struct

from .log import event

logger = logging.getLogger("pigeon.worker")

PUSH, TYPING, PRESENCE, KICK, HELLO, HOLD, RELEASE, CATCHUP, PAIRED = 1, 2, 3, 4, 5, 6, 7, 8, 9
GPUSH = 10
_GMESSAGE = 5  # the entry kind of a group message body (server/queues.py)
MAX_RECORD = 1 << 26  # past any entry a frame limit allows: a bigger length is a bug

_HEAD = struct.Struct(">IB")
_PUSH_HEAD = struct.Struct(">IBB")  # _HEAD and a device's length: a PUSH record's start
_SEQ = struct.Struct(">Q")
_CODE = struct.Struct(">H")
_WID = struct.Struct(">I")


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
        self.index: int | None = None  # outbound: the worker it reaches
        self.origin: int | None = None  # inbound: the worker writing on it (its HELLO)

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
                    device = buf[body + 1 : body + 1 + dlen].decode()  # (buf is bytes)
                    at = body + 1 + dlen
                    if kind == PUSH:
                        seq = _SEQ.unpack_from(buf, at)[0]
                        w.offer_local(device, seq, view[at + 8 : stop], self.origin)
                    else:
                        w.typing_local(device, view[at:stop])
                elif kind == GPUSH:
                    elen = _WID.unpack_from(buf, body)[0]
                    at = body + 4 + elen
                    entry = view[body + 4 : at]
                    while at < stop:
                        dlen = buf[at]
                        device = bytes(view[at + 1 : at + 1 + dlen]).decode()
                        seq = _SEQ.unpack_from(buf, at + 1 + dlen)[0]
                        at += 9 + dlen
                        w.offer_local(device, seq, entry, self.origin)
                elif kind == HOLD or kind == RELEASE or kind == CATCHUP:
                    dlen = buf[body]
                    device = bytes(view[body + 1 : body + 1 + dlen]).decode()
                    if kind == CATCHUP:
                        w.catch_up_local(device, _SEQ.unpack_from(buf, body + 1 + dlen)[0])
                    elif self.origin is not None:
                        self.bus.hold_asked(self.origin, device, kind == HOLD)
                elif kind == HELLO:
                    self.origin = _WID.unpack_from(buf, body)[0]
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
        # (only outbound connections are written to)
        if self.index is not None:
            self.bus.congested(self.index, True)

    def resume_writing(self) -> None:
        if self.index is not None:
            self.bus.congested(self.index, False)

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
        c = worker.config
        self.high, self.low = c.bus_buffer_high, c.bus_buffer_low
        self.counters = worker.stats.counters
        # The slow paths of push(), empty in the common case:
        self.full: set[int] = set()  # peers over bus-buffer-high: no PUSH or TYPING to them
        self.holds: dict[str, int] = {}  # device -> the peer that asked to hold its pushes
        self.missed: dict[int, dict[str, int]] = {}  # peer -> device -> highest seq left out
        # peer -> (entry, buffer, where its GPUSH record starts): the record push()
        # adds devices to while it is the last thing in that buffer
        self.gpush: dict[int, tuple] = {}

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
        if self.full or self.holds:
            if self.holds.get(device) == wid:
                self._miss(wid, device, seq, "bus_pushes_held")
                return
            if wid in self.full:
                self._miss(wid, device, seq, "bus_pushes_dropped")
                return
        buf = self._buffer(wid)
        if entry[0] == _GMESSAGE:  # a group message: one record per peer for its members
            d = device.encode()
            last = self.gpush.get(wid)
            if last is None or last[0] is not entry or last[1] is not buf or last[3] != len(buf):
                start = len(buf)
                buf += _HEAD.pack(1 + 4 + len(entry), GPUSH)
                buf += _WID.pack(len(entry))
                buf += entry
            else:
                start = last[2]
            buf += bytes((len(d),))
            buf += d
            buf += _SEQ.pack(seq)
            buf[start : start + 4] = _WID.pack(len(buf) - start - 4)
            self.gpush[wid] = (entry, buf, start, len(buf))
            return
        d = device.encode()  # (_device_head, written in place)
        buf += _PUSH_HEAD.pack(1 + 1 + len(d) + 8 + len(entry), PUSH, len(d))
        buf += d
        buf += _SEQ.pack(seq)
        buf += entry

    def _miss(self, wid: int, device: str, seq: int, counter: str) -> None:
        """A push left out: remembered, so the peer gets a CATCHUP for it later."""
        m = self.missed.get(wid)
        if m is None:
            m = self.missed[wid] = {}
        if m.get(device, 0) < seq:
            m[device] = seq
        self.counters[counter] += 1

    def _catch_up(self, wid: int, device: str, seq: int) -> None:
        buf = self._buffer(wid)
        buf += _device_head(CATCHUP, device, 8)
        buf += _SEQ.pack(seq)
        self.counters["bus_catchups"] += 1

    def congested(self, wid: int, yes: bool) -> None:
        """The connection to ``wid`` passed bus-buffer-high (yes) or drained below
        bus-buffer-low: stop pushing to it, or start again and tell each of its
        devices with pushes left out (unless they are still held) to catch up."""
        if yes:
            self.full.add(wid)
            self.counters["bus_congested"] += 1
            return
        self.full.discard(wid)
        m = self.missed.get(wid)
        if not m:
            return
        holds = self.holds
        for device, seq in list(m.items()):
            if holds.get(device) != wid:
                del m[device]
                self._catch_up(wid, device, seq)
        if not m:
            del self.missed[wid]

    def hold_asked(self, wid: int, device: str, yes: bool) -> None:
        """Worker ``wid`` asks to hold pushes to ``device`` (HOLD), or to release them."""
        if yes:
            self.holds[device] = wid
            return
        if self.holds.get(device) == wid:
            del self.holds[device]
        m = self.missed.get(wid)
        if m and device in m and wid not in self.full:
            self._catch_up(wid, device, m.pop(device))
            if not m:
                del self.missed[wid]

    def ask_hold(self, wid: int, device: str, yes: bool) -> None:
        """Ask worker ``wid`` to hold (or release) its pushes to ``device``, held here."""
        self._buffer(wid).extend(_device_head(HOLD if yes else RELEASE, device, 0))

    def typing(self, wid: int, device: str, frame) -> None:
        if wid in self.full:
            return  # typing is lossy by design: a congested peer loses it, not memory
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
        self.gpush.clear()  # (its records end with the buffers written now)
        for index, buf in list(self.out.items()):
            peer = self.peers.get(index)
            if peer is not None and peer.transport is not None and not peer.transport.is_closing():
                del self.out[index]
                self.counters["bus_bytes_out"] += len(buf)
                peer.transport.write(buf)  # (may call pause_writing: congested)
            elif index not in self.connecting:
                self.connecting.add(index)
                self.worker.spawn(self._connect(index))

    async def _connect(self, index: int) -> None:
        try:
            transport, peer = await self.worker.loop.create_unix_connection(
                lambda: BusPeer(self), self.path(index)
            )
            peer.index = index
            transport.set_write_buffer_limits(high=self.high, low=self.low)
            transport.write(_HEAD.pack(1 + 4, HELLO) + _WID.pack(self.worker.wid))
            self.peers[index] = peer
        except OSError as exc:
            # The peer worker is down (restarting): its devices' connections
            # are gone with it; what was queued for them waits in the store.
            event(logger, logging.WARNING, "cannot reach worker", worker=index, error=str(exc))
            self.out.pop(index, None)
            self.missed.pop(index, None)
        finally:
            self.connecting.discard(index)
        if self.out.get(index):
            self.flush()

    def lost(self, peer: BusPeer) -> None:
        if peer.index is not None and self.peers.get(peer.index) is peer:
            # gone with its worker (its sessions too): nothing to catch up
            del self.peers[peer.index]
            self.full.discard(peer.index)
            self.missed.pop(peer.index, None)
        if peer.origin is not None:
            # Its holds end with it.  Should the worker live on (a link closed
            # for a bad record), its paused sessions ask again at the next push.
            for device, wid in list(self.holds.items()):
                if wid == peer.origin:
                    del self.holds[device]

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
