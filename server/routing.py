"""Where a device is, and how something reaches it: one interface for every sender.

A device is held by a session on this worker, by another worker (the
store's session table says which: ``Push.worker``), or by nobody (then what
was committed waits in its queue).  Later, by another node.  Callers hand
the router what to deliver and never branch on where the device is:

    deliver(pushes)          committed queue entries (Queues.commit)
    offer / catch_up         what another worker pushed (or left out) for a device here
    typing(device, wid, f)   a typing frame for a connected device
    kick(device, code, text) close the device's session wherever it is
"""

from __future__ import annotations


class Router:
    def __init__(self, worker):
        self.worker = worker
        self.local = worker.by_device  # device -> Session on this worker
        self.wid = worker.wid

    def deliver(self, pushes) -> None:
        """Hand committed entries to the sessions that hold their devices."""
        local, wid, bus, push = self.local, self.wid, self.worker.bus, self.worker.push
        for p in pushes:
            if p.worker is None:  # offline: it waits in the queue; perhaps a wake-up
                if push is not None:
                    push.offline(p.device)
                continue
            if p.worker == wid:
                s = local.get(p.device)
                if s is not None:
                    s.offer(p.seq, p.entry)
            else:
                bus.push(p.worker, p.device, p.seq, p.entry)

    def offer(self, device: str, seq: int, entry, origin: int | None = None) -> None:
        """A committed entry for a device this worker holds, from worker ``origin``."""
        s = self.local.get(device)
        if s is not None:
            if s.paused and origin is not None and not s.closing:
                # dropped here (it is read from the queue on resume): the
                # pushing worker is asked not to send the next ones at all
                s.hold(origin)
            s.offer(seq, entry)

    def catch_up(self, device: str, seq: int) -> None:
        """Entries up to ``seq`` were committed for a device held here and not pushed."""
        s = self.local.get(device)
        if s is not None:
            s.catch_up(seq)

    def typing(self, device: str, wid: int, frame) -> None:
        if wid != self.wid:
            self.worker.bus.typing(wid, device, frame)
            return
        s = self.local.get(device)
        # a client that is not reading loses typing indicators, not memory
        if s is not None and not s.closing and not s.paused:
            s.push(frame)

    def kick(self, device: str, code, text: str, where: int | None = None) -> None:
        """Close ``device``'s session: on worker ``where``, or wherever it is (None)."""
        w = self.worker
        if where is None or where == self.wid:
            s = self.local.get(device)
            if s is not None:
                s.fail(code, text)
        if where is None:
            for peer in w.bus.peer_ids():
                if peer != self.wid:
                    w.bus.kick(peer, device, int(code), text)
        elif where != self.wid:
            w.bus.kick(where, device, int(code), text)
