"""
Memory given back after a burst: what an attack made ipcd allocate returns
to the system once the attack ends.

Two things kept it: connections that end as garbage in reference cycles
(Twisted and autobahn protocols and their transports refer to each other),
which CPython's cyclic collector frees only when enough new objects are
allocated, so an idle daemon holds their buffers; and freed buffers, which
glibc's malloc keeps in its heap for later.  L{MemoryTrim} looks every few
seconds: when the resident size is well above its low-water mark, it
collects cycles (C{gc.collect()}) and asks glibc to give free memory back
(C{malloc_trim(0)}, which also releases free pages inside the heap).  While
that gives little back (the memory is in use), it looks again less often,
down to once a minute.  Nothing runs on any connection's path: one timer
and a read of C{/proc/self/statm}.

Without glibc's C{malloc_trim} (another C library), cycles are still
collected; it says so in one line.
"""

from __future__ import annotations

import ctypes
import gc
import os
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

# Seconds between looks at the resident size, and the longest wait between
# two collections while it stays high.
INTERVAL = 5.0
MAX_INTERVAL = 60.0
# How far above its low-water mark the resident size must be before ipcd
# collects and trims.
GROWTH = 8 << 20

_PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    """This process's resident set size, from C{/proc/self/statm}."""
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * _PAGE


def glibc_trim() -> Callable[[], Any] | None:
    """glibc's C{malloc_trim(0)}, or None under another C library."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


def _no_trim() -> None:
    """Without malloc_trim: the cycles are still collected."""


class MemoryTrim(Service):
    """
    Every C{interval} seconds on C{clock}: if the resident size
    (C{resident()}) is C{growth} bytes above the lowest seen, C{collect()}
    and C{trim()}; while that leaves it as high, the next collection waits
    twice as long (up to C{max_interval}).  Each round, and what it gave
    back, is counted in C{counters}.
    """

    log = Logger()
    name = "memory trim"

    def __init__(
        self,
        clock: IReactorTime,
        counters: Counter[str] | None = None,
        trim: Callable[[], Any] | None = None,
        resident: Callable[[], int] = resident_bytes,
        collect: Callable[[], Any] = gc.collect,
        interval: float = INTERVAL,
        max_interval: float = MAX_INTERVAL,
        growth: int = GROWTH,
    ) -> None:
        self.clock = clock
        self.counters: Counter[str] = Counter() if counters is None else counters
        self.trim = trim if trim is not None else glibc_trim()
        self.resident = resident
        self.collect = collect
        self.interval = interval
        self.max_interval = max_interval
        self.growth = growth
        self.low = 0
        self._wait = interval  # before the next round while still high
        self._next = 0.0
        self._looking: LoopingCall | None = None

    def startService(self) -> None:  # noqa: N802 (Twisted's name)
        super().startService()
        if self.trim is None:
            self.log.info(
                "memory: no malloc_trim in this C library: garbage is "
                "collected, but freed memory may stay with ipcd"
            )
            self.trim = _no_trim
        try:
            self.low = self.resident()
        except (OSError, ValueError, IndexError) as e:
            self.log.info(
                "memory: cannot read the resident size ({error}): freed memory "
                "is not given back to the system",
                error=e,
            )
            return
        self._looking = LoopingCall(self.check)
        self._looking.clock = self.clock
        self._looking.start(self.interval, now=False)

    def stopService(self) -> Any:  # noqa: N802 (Twisted's name)
        if self._looking is not None:
            self._looking.stop()
            self._looking = None
        return super().stopService()

    def check(self) -> None:
        """Collect and trim if memory grew, at most as often as it helps."""
        try:
            self._check()
        except OSError:
            # The size unreadable for now (no descriptor left: EMFILE, when
            # ipcd is most likely to need this): the next round looks again.
            # Raised, it stopped the LoopingCall for good.
            self.counters["memory checks skipped"] += 1

    def _check(self) -> None:
        before = self.resident()
        if before - self.low < self.growth:
            self.low = min(self.low, before)
            self._wait, self._next = self.interval, 0.0  # a new burst: at once
            return
        now = self.clock.seconds()
        if now < self._next:
            return
        started = time.perf_counter()
        self.collect()
        self.trim()
        took = time.perf_counter() - started
        after = self.resident()
        self.low = min(self.low, after)
        self.counters["memory trims"] += 1
        self.counters["memory trims, ms"] += round(took * 1000)
        self.counters["memory given back, KiB"] += max(before - after, 0) >> 10
        if after - self.low >= self.growth:  # in use: try again later
            self._wait = min(2 * self._wait, self.max_interval)
        else:
            self._wait = self.interval
        self._next = now + self._wait
