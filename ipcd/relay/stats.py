"""
What a relay carries (L{RelayStats}), and the registry of live relays that
status reporting lists: L{began} puts a relay's stats in it, L{ended} takes
them out and runs C{on_end} once.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self


@dataclass(eq=False)
class RelayStats:
    """
    What a relay carries: C{forward} counts bytes from side A (the peer that
    asked) to side B (the service).  While the relay lives it sits in
    C{registry}, which status reporting lists.
    """

    description: str = ""
    direction: str = ""
    service: str = ""
    route: str = ""
    labels: tuple[str, ...] = ()
    # The protocol daemon relaying (its section: "tcpd"), for the metrics.
    daemon: str = ""
    forward: int = 0
    backward: int = 0
    # Of those, bytes moved with splice(2): never copied into ipcd.
    spliced: int = 0
    started: float = field(default_factory=time.monotonic)
    moved: float = 0.0  # when a byte last moved (the engine's clock)
    registry: set[RelayStats] | None = None
    # Called in the reactor's thread once the relay has ended.
    on_end: Callable[[], None] | None = None

    @classmethod
    def of(
        cls,
        who: Any,
        direction: str,
        service: str,
        route: str,
        registry: set[RelayStats] | None,
        **extra: Any,
    ) -> Self:
        """
        The stats of a relay for C{who} (a L{ipcd.identity.Peer}): its
        description and labels.  The service and labels are strings shared
        with other relays, since each idle relay keeps them for its life.
        """
        return cls(
            description=str(who),
            direction=direction,
            service=sys.intern(service),
            route=route,
            labels=tuple(sys.intern(label) for label in getattr(who, "labels", ())),
            registry=registry,
            **extra,
        )

    def as_dict(self, now: float | None = None) -> dict[str, Any]:
        now = time.monotonic() if now is None else now
        return {
            "peer": self.description,
            "direction": self.direction,
            "service": self.service,
            "route": self.route,
            "labels": sorted(self.labels),
            "bytes_in": self.forward,
            "bytes_out": self.backward,
            "bytes_spliced": self.spliced,
            "age": round(now - self.started, 3),
        }


def began(stats: RelayStats) -> None:
    """A relay has begun: it is in its registry (status lists it) until L{ended}."""
    if stats.registry is not None:
        stats.registry.add(stats)


def ended(stats: RelayStats) -> None:
    """A relay has ended: it leaves its registry, and C{on_end} runs (once)."""
    if stats.registry is not None:
        stats.registry.discard(stats)
    on_end, stats.on_end = stats.on_end, None  # once, however it ended
    if on_end is not None:
        on_end()
