"""Rate limits: sliding windows kept in LMDB (shared by every worker) and
per-connection token buckets (kept in the worker that holds the connection).

A sliding window is a log of ``[time_ms, weight]`` pairs under one key of the
``limits`` table, oldest first; entries older than the window are dropped
whenever the key is touched, so a key whose window has passed disappears.
Use it inside the caller's write transaction, so the check and the change it
guards commit (or abort) together.
"""

from __future__ import annotations

import msgpack


def window_used(txn, db, key: bytes, now: int, window_ms: int) -> tuple[list, int]:
    """The live log under ``key`` and the total weight in the window ending at ``now``."""
    raw = txn.get(key, db=db)
    log = [] if raw is None else [e for e in msgpack.unpackb(raw) if e[0] > now - window_ms]
    return log, sum(e[1] for e in log)


def window_take(
    txn, db, key: bytes, now: int, window_ms: int, limit: int, weight: int = 1
) -> tuple[bool, int]:
    """Record ``weight`` hits if they fit under ``limit``; returns (allowed, room left).

    Nothing is recorded when refused; ``room left`` is then what still fits.
    """
    log, used = window_used(txn, db, key, now, window_ms)
    if used + weight > limit:
        return False, max(0, limit - used)
    if weight:
        if log and log[-1][0] == now:
            log[-1][1] += weight
        else:
            log.append([now, weight])
    if log:
        txn.put(key, msgpack.packb(log), db=db)
    else:
        txn.delete(key, db=db)
    return True, limit - used - weight


class Bucket:
    """A token bucket: ``rate`` per second on average, ``burst`` at once.

    ``rate <= 0`` means no limit.  Time is the caller's (the loop's clock).
    """

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: int, now: float):
        self.rate = rate
        self.burst = max(1, burst)
        self.tokens = float(self.burst)
        self.stamp = now

    def take(self, now: float) -> bool:
        if self.rate <= 0:
            return True
        tokens = self.tokens + (now - self.stamp) * self.rate
        self.tokens = tokens if tokens < self.burst else float(self.burst)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False
