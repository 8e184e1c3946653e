"""
In-memory fakes of ipcd's parts, for users' tests (as C{treq.testing} does
for treq).  Each part has one titled block below.
"""

from __future__ import annotations

# --- Relays: a fake relay engine -----------------------------------------
from dataclasses import dataclass
from typing import Any

from zope.interface import implementer

from ipcd.relay import IRelayEngine, RelayStats, ended


@dataclass
class JoinedRelay:
    """One relay a L{MemoryRelays} was asked for, as it was asked."""

    a: Any
    b: Any
    stats: RelayStats
    greeting: bytes
    early: bytes
    idle_timeout: float


@implementer(IRelayEngine)
class MemoryRelays:
    """
    A relay engine that relays nothing: it records each join (in
    C{joined}, the live ones in C{live}), keeps the stats in their registry
    and counts C{early} as forward, as a real engine does; L{end} ends a
    relay as if it had closed (registry, C{on_end}).  C{closed} lists the
    ends it was told to close (by L{end}, C{abort}, C{stop} or a refused
    join); it calls C{close()} on those that have one.
    """

    def __init__(self) -> None:
        self.joined: list[JoinedRelay] = []
        self.live: dict[RelayStats, JoinedRelay] = {}
        self.closed: list[Any] = []
        self.running = False
        self.failure: str | None = None

    def start(self) -> None:
        self.running = True

    def stop(self) -> None:
        self.running = False
        for stats in list(self.live):
            self.end(stats)

    def join(
        self,
        a: Any,
        b: Any,
        stats: RelayStats | None = None,
        greeting: bytes = b"",
        early: bytes = b"",
        idle_timeout: float = 0.0,
    ) -> RelayStats:
        stats = stats if stats is not None else RelayStats()
        relay = JoinedRelay(a, b, stats, greeting, early, idle_timeout)
        self.joined.append(relay)
        if not self.running:
            self._close(relay)
            ended(stats)
            return stats
        if stats.registry is not None:
            stats.registry.add(stats)
        stats.forward += len(early)
        self.live[stats] = relay
        return stats

    def abort(self, stats: RelayStats) -> None:
        self.end(stats)

    def buffered(self) -> int:
        return 0

    def end(self, stats: RelayStats) -> None:
        """The relay that C{stats} counts ends (both its ends are closed)."""
        relay = self.live.pop(stats, None)
        if relay is not None:
            self._close(relay)
            ended(stats)

    def _close(self, relay: JoinedRelay) -> None:
        for each in (relay.a, relay.b):
            self.closed.append(each)
            close = getattr(each, "close", None)
            if close is not None:
                close()


# --- End of relays --------------------------------------------------------
