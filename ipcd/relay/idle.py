"""
Idle deadlines: a relay on which no byte moves for its C{idle_timeout} is
closed.  L{IdleSweep} keeps one engine's deadlines on one timer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from twisted.logger import Logger

from ipcd.relay.stats import RelayStats

# Idle deadlines are checked at most this often (seconds): a sweep looks at
# every relay, and a deadline of minutes needs no finer grain.
SWEEP_INTERVAL = 0.5


def log_idle(log: Logger, stats: RelayStats, timeout: float) -> None:
    """Say that the relay C{stats} counts is closed for idleness."""
    log.info(
        "closing the relay of {peer} for {service!r}: idle for {timeout:g} s",
        peer=stats.description,
        service=stats.service,
        timeout=timeout,
    )


class IdleSweep:
    """
    The idle deadlines of one engine's relays, on one timer: it fires at the
    earliest deadline, and after a sweep not sooner than L{SWEEP_INTERVAL}
    (busy relays, whose deadlines keep moving, need not be looked at on
    every event).  C{relays()} gives each live relay that has a deadline
    once, as (stats, timeout, handle); C{end(handle)} closes it.
    """

    def __init__(
        self,
        clock: Any,
        log: Logger,
        relays: Callable[[], Iterable[tuple[RelayStats, float, Any]]],
        end: Callable[[Any], None],
    ) -> None:
        self._clock = clock
        self._log = log
        self._relays = relays
        self._end = end
        self._call: Any = None  # the DelayedCall of the next sweep
        self._at = math.inf

    def schedule(self, when: float) -> None:
        """A deadline at C{when} (the clock's seconds): sweep by then."""
        if when >= self._at:
            return
        self.cancel()
        self._at = when
        delay = max(0.0, when - self._clock.seconds())
        self._call = self._clock.callLater(delay, self._sweep)

    def start(self, stats: RelayStats, sides: Iterable[Any], timeout: float) -> None:
        """
        A relay starts now: nothing has moved yet; with a C{timeout} (0:
        none), each of its C{sides} gets it and the sweep is due by then.
        """
        stats.moved = now = self._clock.seconds()
        if timeout > 0:
            for side in sides:
                side.timeout = timeout
            self.schedule(now + timeout)

    def cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call, self._at = None, math.inf

    def _sweep(self) -> None:
        """End the relays idle past their deadline; find the next one."""
        self._call, self._at = None, math.inf
        now, earliest = self._clock.seconds(), math.inf
        for stats, timeout, handle in self._relays():
            deadline = stats.moved + timeout
            if deadline > now:
                earliest = min(earliest, deadline)
                continue
            log_idle(self._log, stats, timeout)
            self._end(handle)
        if earliest < math.inf:
            self.schedule(max(earliest, now + SWEEP_INTERVAL))
