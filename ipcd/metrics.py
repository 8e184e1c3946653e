"""
What ipcd counts for its Prometheus metrics (C{--metrics}), as plain
numbers: L{Metrics}.  What it serves, and how, is L{ipcd.metricsweb}'s.

The broker tells L{IMetrics} how each request was decided
(L{IMetrics.decided}, from its one place that logs decisions) and when a
lookup began (L{IMetrics.now}); with metrics off that is L{NO_METRICS},
whose calls do nothing.  Everything else the metrics show is read when
scraped, not counted again: the live relays (L{RelayTally}, the broker's
set of them, which keeps what ended relays carried) and the events
C{ipcd status} counts already (limits hit, handshake failures, log lines
left out).

Label values come from fixed sets only (outcomes, schemes ipcd serves,
rule numbers from the admin's configuration), never from what a client
sends: a client can neither make the metrics grow nor read other clients'
service names in them.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Any

from zope.interface import Interface, implementer

from ipcd.decisionlog import Request
from ipcd.resolution import LocalTarget, Target

# The upper bounds of the lookup latency histogram's buckets, in seconds:
# from a local answer within the accept to a remote connect near its timeout.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
# A lookup refused before it had a target (bad lookup, no route) has no scheme.
NO_SCHEME = "none"
# A scheme ipcd does not serve (a client's route may name any).
OTHER_SCHEME = "other"


class IMetrics(Interface):
    """What the broker tells the metrics, on every lookup."""

    def now() -> float | None:
        """A lookup begins: its start time, or None when nothing is timed."""

    def decided(request: Request, target: Target | None, outcome: str) -> None:
        """
        How C{request} went (C{outcome} is C{"ok"} or the refusal's
        reason), as the decision log says it.
        """

    def relays() -> set[Any]:
        """The set of live relays the broker is to keep (a new one)."""


@implementer(IMetrics)
class NoMetrics:
    """Metrics off: nothing is timed or counted."""

    def now(self) -> None:
        return None

    def decided(self, request: Request, target: Target | None, outcome: str) -> None:
        pass

    def relays(self) -> set[Any]:
        return set()


NO_METRICS = NoMetrics()


class RelayTally(set):  # type: ignore[type-arg]
    """
    The live relays (their L{ipcd.relay.RelayStats}) that keeps what each
    one carried once it ends, by daemon: a relay engine takes a relay out
    with C{discard} (L{ipcd.relay.ended}).  A scrape reads C{carried} and
    the live relays together (L{snapshot}) from another thread: a relay
    that ends meanwhile is then counted once, not twice or never.
    """

    def __init__(self) -> None:
        super().__init__()
        # (daemon, "client" or "service"): bytes from that side.
        self.carried: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def snapshot(self) -> tuple[dict[tuple[str, str], int], list[Any]]:
        """What ended relays carried, and the live relays, as of one moment."""
        with self._lock:
            return self.carried.copy(), list(self)

    def discard(self, stats: Any) -> None:
        if stats not in self:
            return
        with self._lock:
            super().discard(stats)
            add_bytes(self.carried, stats)


def add_bytes(carried: dict[tuple[str, str], int], stats: Any) -> None:
    """Add what relay C{stats} carried each way to C{carried}, by daemon."""
    daemon = stats.daemon
    for key, count in (
        ((daemon, "client"), stats.forward),
        ((daemon, "service"), stats.backward),
    ):
        carried[key] = carried.get(key, 0) + count


def outcome_of(request: Request, target: Target | None, outcome: str) -> str:
    """
    A request's outcome as the metrics count it: C{ok}; C{denied} by a
    rule; C{refused} before it had a target (a bad lookup, no route);
    C{failed}: its target could not be reached.
    """
    if outcome == "ok":
        return "ok"
    decision = request.decision
    if decision is not None and not decision.allowed:
        return "denied"
    return "refused" if target is None else "failed"


@implementer(IMetrics)
class Metrics:
    """
    Metrics on: lookups by outcome and scheme, their latency, refusals by
    rule, as plain numbers the reactor's thread adds to (a scrape reads
    copies).  C{schemes} are those served (other schemes a client's route
    names are counted as C{other}); C{clock} times lookups.
    """

    def __init__(
        self, schemes: Iterable[str], clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.schemes = frozenset(schemes)
        self.now = clock  # IMetrics.now
        # (outcome, scheme): lookups.
        self.lookups: dict[tuple[str, str], int] = {}
        # Lookups by latency bucket (the last: over the largest bound).
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        # (direction, rule number or "default"): requests denied.
        self.refusals: dict[tuple[str, str], int] = {}
        self.tally = RelayTally()

    def relays(self) -> set[Any]:
        return self.tally

    def decided(self, request: Request, target: Target | None, outcome: str) -> None:
        kind = outcome_of(request, target, outcome)
        if kind == "denied":
            decision = request.decision
            rule = "default" if decision.index is None else str(decision.index)  # type: ignore[union-attr]
            key = (request.direction, rule)
            self.refusals[key] = self.refusals.get(key, 0) + 1
        started = request.started
        if started is None:
            return  # not a local client's lookup
        if target is None:
            scheme = NO_SCHEME
        elif type(target) is LocalTarget:
            scheme = "unix"
        else:
            scheme = target.uri.scheme  # type: ignore[union-attr]
            if scheme not in self.schemes:
                scheme = OTHER_SCHEME
        key = (kind, scheme)
        self.lookups[key] = self.lookups.get(key, 0) + 1
        seconds = self.now() - started
        self.latency[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds
