"""
The bound on C{ipcd reload}: at most one reload per L{RELOAD_INTERVAL}.

Whoever may use the control socket (ipcd's user, root, C{[control] group})
could otherwise ask for reloads as fast as the reactor runs them: each one
re-reads the file on the reactor's thread and empties every cache (plans,
decisions, labels), and lookups slowed to a sixth under four such clients.
Requests that come within the interval after a reload share the next one,
run once the interval has passed: each is answered by a reload that read
the file after it asked.  A slow reload (tlsd re-reads its files: 44 ms
with the system's CA bundle as C{trust_roots}, against 0.2 ms without) is
followed by a pause of L{SLOW_PAUSE} times as long, so that reloads keep
at most a tenth of the reactor's thread, however often they are asked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

# Seconds between two reloads, at least.
RELOAD_INTERVAL = 0.1
# After a reload that took T seconds, none for SLOW_PAUSE * T; T counted up
# to MAX_TOOK (the reactor's clock is the wall clock: a step forward during
# a reload is no hour-long reload).
SLOW_PAUSE = 9
MAX_TOOK = 0.2

_STOPPING = {"ok": False, "error": "ipcd is stopping"}

log = Logger(namespace="ipcd")


class ReloadGate:
    """
    C{run} (a reload, returning its answer) at most once per C{interval},
    and after a slow one, not for L{SLOW_PAUSE} times as long.
    """

    def __init__(
        self,
        run: Callable[[], dict[str, Any]],
        clock: IReactorTime,
        interval: float = RELOAD_INTERVAL,
    ) -> None:
        self.run = run
        self.clock = clock
        self.interval = interval
        self.runs = 0
        self._last: float | None = None  # when the last reload ended
        self._ready = 0.0  # when the next may start
        self._waiting: list[Deferred[dict[str, Any]]] = []
        self._next: IDelayedCall | None = None
        self._stopped = False

    def request(self) -> Deferred[dict[str, Any]]:
        """The answer of a reload that starts now, or of the next one."""
        if self._stopped:
            # A control connection made before ipcd began to stop may still
            # ask: no reload (nor RELOADING=1 to systemd) while it stops.
            return succeed(dict(_STOPPING))
        now = self.clock.seconds()
        # The reactor's clock is the wall clock: one set back since the last
        # reload (by an hour, say) must not hold every request for an hour.
        if self._next is None and (
            self._last is None or now < self._last or now >= self._ready
        ):
            return succeed(self._run())
        if self._next is None:
            self._next = self.clock.callLater(self._ready - now, self._run_waiting)
        waiting: Deferred[dict[str, Any]] = Deferred()
        self._waiting.append(waiting)
        return waiting

    @property
    def waiting(self) -> int:
        """How many requests wait for the next reload."""
        return len(self._waiting)

    def _run(self) -> dict[str, Any]:
        started = self.clock.seconds()
        self.runs += 1
        try:
            return self.run()
        except Exception:
            # A bug (a daemon's hook, say): every asker is answered, not
            # left waiting for its control deadline, and the gate goes on.
            log.failure("reload failed")
            return {"ok": False, "error": "reload failed: see ipcd's log"}
        finally:
            self._last = ended = self.clock.seconds()
            took = min(max(ended - started, 0.0), MAX_TOOK)
            self._ready = ended + max(self.interval - took, SLOW_PAUSE * took)

    def _run_waiting(self) -> None:
        self._next = None
        waiting, self._waiting = self._waiting, []
        answer = self._run()
        for each in waiting:
            each.callback(answer)

    def stop(self) -> None:
        """
        ipcd stops: the waiting requests, and any asked later, are answered
        that no reload ran.
        """
        self._stopped = True
        if self._next is not None:
            self._next.cancel()
            self._next = None
        waiting, self._waiting = self._waiting, []
        for each in waiting:
            each.callback(dict(_STOPPING))
