"""Rate limits: sliding windows kept in LMDB (shared by every worker),
per-connection token buckets (kept in the worker that holds the connection),
and capped in-memory tables for what unauthenticated peers do.

What a peer that has not logged in causes (failed logins, misbehaviour
worth a log line) is counted in a ``LeakyTable``: in the worker's memory,
at most ``cap`` keys, the least recently touched evicted first, so neither
the store nor memory grows with what strangers send.  Source addresses
are counted by ``source_key``: an IPv6 address by its /64 (one subscriber
usually holds a whole /64), an IPv4 one as it is.

A sliding window is a log of ``[time_ms, weight]`` pairs under one key of the
``limits`` table, oldest first; entries older than the window are dropped
whenever the key is touched, so a key whose window has passed disappears.
Use it inside the caller's write transaction, so the check and the change it
guards commit (or abort) together.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict

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


def retry_in(wait_ms: int) -> str:
    """How a refusal says when to try again: "try again in 40 s", "in 12 min", "in 3 h"
    (rounded up: trying at the time said succeeds)."""
    s = -(-wait_ms // 1000)
    if s <= 90:
        return f"try again in {s} s"
    if s <= 90 * 60:
        return f"try again in {-(-s // 60)} min"
    return f"try again in {-(-s // 3600)} h"


def budget_spent(txn, db, key: bytes, now: int, window_ms: int, limit: int) -> float:
    """What is spent of a budget of ``limit`` per ``window_ms`` under ``key`` at ``now``.

    A budget is one ``[spent, stamp_ms]`` pair (a leaky bucket: what was
    charged drains at ``limit`` per ``window_ms``), so it stays one small
    record however many charges it takes, where a ``window_take`` log grows
    with every hit.  Check with it before writing, charge (``budget_charge``)
    after: a refusal writes nothing, and an allowed request is charged what it
    really cost, which may take the budget past ``limit`` once.  Its stamp
    is last, as the sweep expects of a ``limits`` record (Store.sweep).
    """
    raw = txn.get(key, db=db)
    if raw is None:
        return 0.0
    spent, stamp = msgpack.unpackb(raw)
    spent -= (now - stamp) * limit / window_ms
    return spent if spent > 0.0 else 0.0


def budget_charge(txn, db, key: bytes, now: int, window_ms: int, limit: int,
                  cost: float) -> None:  # fmt: skip
    """Charge ``cost`` to the budget under ``key`` (see ``budget_spent``)."""
    spent = budget_spent(txn, db, key, now, window_ms, limit) + cost
    txn.put(key, msgpack.packb([spent, now]), db=db)


class Bucket:
    """A token bucket: ``rate`` per second on average, ``burst`` at once.

    ``rate <= 0`` means no limit.  Time is the caller's (the loop's clock).

    A device's bucket also counts what it sent in a fixed window (``count``:
    messages-per-day), so that count lives as long as the bucket does, across
    the device's connections to a worker, at no cost of its own per message.
    """

    __slots__ = ("rate", "burst", "tokens", "stamp", "day", "day_end")

    def __init__(self, rate: float, burst: int, now: float):
        self.rate = rate
        self.burst = max(1, burst)
        self.tokens = float(self.burst)
        self.stamp = now
        self.day = 0  # counted in the window that ends at day_end
        self.day_end = 0.0

    def count(self, now: float, limit: int, window: float = 86_400.0) -> bool:
        """Count one more in a fixed window of ``window`` seconds (it starts with its
        first count); False (nothing counted) once ``limit`` are counted in it."""
        if now >= self.day_end:
            self.day_end = now + window
            self.day = 0
        if self.day >= limit:
            return False
        self.day += 1
        return True

    def take(self, now: float, n: float = 1.0) -> bool:
        """Take ``n`` tokens (at most ``burst``: a bigger ``n`` takes a full bucket)."""
        if self.rate <= 0:
            return True
        tokens = self.tokens + (now - self.stamp) * self.rate
        self.tokens = tokens if tokens < self.burst else float(self.burst)
        self.stamp = now
        if n > self.burst:
            n = self.burst
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False


def source_key(ip: str) -> str:
    """The unit a source address is limited by: IPv4 as is, IPv6 by its /64."""
    if ":" not in ip:
        return ip  # IPv4 (what the kernel reports is always well-formed): as is
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if addr.version == 6:
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return ip


def net_key(ip: str) -> str:
    """The network a source address is in, for the limits on what strangers may ask
    across many addresses: IPv4 by its /24, IPv6 by its /48 (what one site or one
    free tunnel is given: 65,536 /64s, each a ``source_key`` of its own).  ``ip`` is
    an address or a ``source_key`` /64."""
    try:
        if "/" in ip:
            net = ipaddress.ip_network(ip, strict=False)
        else:
            addr = ipaddress.ip_address(ip)
            if addr.version == 6 and addr.ipv4_mapped is not None:
                addr = addr.ipv4_mapped
            net = ipaddress.ip_network(addr)
    except ValueError:
        return ip
    return str(net.supernet(new_prefix=24 if net.version == 4 else 48))


class LeakyTable:
    """Counters that leak ``limit`` per ``window`` seconds, for at most ``cap`` keys.

    A key is over its limit while its count is ``>= limit``; each hit adds
    one and the count drains linearly to zero over ``window`` (a token
    bucket seen from the other side: ``limit`` hits at once, then one every
    ``window / limit`` seconds).  One small list per key, however many hits.
    When a new key would make ``cap + 1``, the least recently touched goes.
    Time is the caller's (the loop's monotonic clock).
    """

    __slots__ = ("cap", "table", "evicted")

    def __init__(self, cap: int):
        self.cap = cap
        self.table: OrderedDict[str, list] = OrderedDict()
        self.evicted = 0

    def _level(self, key: str, limit: int, window: float, now: float) -> float:
        rec = self.table.get(key)
        if rec is None:
            return 0.0
        level = rec[0] - (now - rec[1]) * limit / window
        return level if level > 0.0 else 0.0

    def over(self, key: str, limit: int, window: float, now: float) -> bool:
        """True if ``key`` has used up its ``limit`` (nothing is counted)."""
        return self._level(key, limit, window, now) > limit - 1

    def hit(self, key: str, limit: int, window: float, now: float) -> None:
        """Count one hit for ``key``."""
        self._put(key, self._level(key, limit, window, now) + 1.0, now)

    def _put(self, key: str, level: float, now: float) -> None:
        table = self.table
        if key in table:
            table.move_to_end(key)
        elif len(table) >= self.cap:
            table.popitem(last=False)
            self.evicted += 1
        table[key] = [level, now]

    def take(self, key: str, limit: int, window: float, now: float) -> bool:
        """Count a hit if it fits under the limit; True if it did."""
        level = self._level(key, limit, window, now)
        if level > limit - 1:
            return False
        self._put(key, level + 1.0, now)
        return True

    def __len__(self) -> int:
        return len(self.table)
