"""Waking an event loop at a monotonic deadline, to the tens of microseconds.

The open-loop latency load (bench/load.py) stamps every message with the
time it was *due*, so any lateness of the sender counts as latency.  The
loop's own timers are too coarse for that: libuv (uvloop) keeps time in
whole milliseconds, so ``asyncio.sleep`` wakes a few hundred microseconds
late on average (about 0.3 ms p50 measured here), and a sleep shorter than
half a millisecond rounds to zero and spins the loop at 100% CPU, which on
a 2-core machine takes a core from the server being measured.

``Pacer`` wakes the loop with a kernel timer instead: a ``timerfd`` armed
for an absolute CLOCK_MONOTONIC deadline (the clock ``time.monotonic_ns``
reads, one clock for every process of the machine) and watched with
``add_reader``, so the loop sleeps in its poll until the kernel fires it.
``os.timerfd_*`` where Python has it (3.13+), else libc's timerfd calls
through ctypes (Linux; FreeBSD 14+); where neither exists it falls back to
``asyncio.sleep`` of at least ``MIN_SLEEP`` (never a spin; the sender then
sends everything due at each wake-up), and says so in ``kind``.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import time

#: The shortest loop sleep of the fallback: shorter ones round to 0 ms in libuv and spin.
MIN_SLEEP = 0.001

TFD_TIMER_ABSTIME = 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class _TimerFD:
    """A non-blocking CLOCK_MONOTONIC timerfd, armed for absolute deadlines."""

    def __init__(self):
        flags = os.O_NONBLOCK | os.O_CLOEXEC  # TFD_NONBLOCK / TFD_CLOEXEC on Linux and FreeBSD
        if hasattr(os, "timerfd_settime_ns"):
            self.fd = os.timerfd_create(time.CLOCK_MONOTONIC, flags=flags)
            self._arm = self._arm_os
            return
        self._libc = ctypes.CDLL(None, use_errno=True)  # the symbols already loaded: libc's
        create, settime = self._libc.timerfd_create, self._libc.timerfd_settime  # AttributeError
        create.argtypes, create.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec),
                            ctypes.c_void_p]  # fmt: skip
        settime.restype = ctypes.c_int
        self._settime = settime
        self.fd = create(time.CLOCK_MONOTONIC, flags)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create failed")
        self._spec = _Itimerspec()
        self._arm = self._arm_ctypes
        self._arm(time.monotonic_ns() + 1)  # fails here, not mid-run, if settime does not work

    def _arm_os(self, due_ns: int) -> None:
        os.timerfd_settime_ns(self.fd, flags=TFD_TIMER_ABSTIME, initial=max(due_ns, 1))

    def _arm_ctypes(self, due_ns: int) -> None:
        v = self._spec.it_value
        v.tv_sec, v.tv_nsec = divmod(max(due_ns, 1), 1_000_000_000)
        if self._settime(self.fd, TFD_TIMER_ABSTIME, ctypes.byref(self._spec), None) != 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime failed")

    def arm(self, due_ns: int) -> None:
        self._arm(due_ns)

    def drain(self) -> bool:
        """Whether the timer fired (re-arming resets a count not yet read)."""
        try:
            return bool(os.read(self.fd, 8))
        except BlockingIOError:
            return False

    def close(self) -> None:
        os.close(self.fd)


class Pacer:
    """``await pacer.until(due_ns)``: return at (or just after) monotonic time ``due_ns``.

    One waiter at a time (the load's one sender loop); ``close()`` when done.
    A caller checks the clock again after it returns: the fallback can wake
    early (never more than a millisecond) and any lateness is the caller's
    to count.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self.loop = loop or asyncio.get_running_loop()
        self._waiter: asyncio.Future | None = None
        try:
            self._tfd: _TimerFD | None = _TimerFD()
        except (AttributeError, OSError, TypeError):
            self._tfd = None
        if self._tfd is not None:
            self.loop.add_reader(self._tfd.fd, self._fired)
        #: "timerfd", or "loop timer" for the millisecond fallback
        self.kind = "timerfd" if self._tfd is not None else "loop timer"

    def _fired(self) -> None:
        if not self._tfd.drain():
            return
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def until(self, due_ns: int) -> None:
        if self._tfd is None:
            await asyncio.sleep(max((due_ns - time.monotonic_ns()) / 1e9, MIN_SLEEP))
            return
        self._waiter = self.loop.create_future()
        self._tfd.arm(due_ns)
        try:
            await self._waiter
        finally:
            self._waiter = None

    def close(self) -> None:
        if self._tfd is not None:
            self.loop.remove_reader(self._tfd.fd)
            self._tfd.close()
            self._tfd = None
