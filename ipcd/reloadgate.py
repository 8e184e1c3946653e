"""
The bound on C{ipcd reload}: at most one reload per L{RELOAD_INTERVAL}.

Whoever may use the control socket (ipcd's user, root, C{[control] group})
could otherwise ask for reloads as fast as the reactor runs them: each one
re-reads the file (in a thread now, but with the GIL) and empties every
cache (plans, decisions, labels), and lookups slowed to a sixth under four
such clients.  A reload whose file is read in a thread answers later:
requests meanwhile wait for the next, so no two run at once.
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

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

# Seconds between two reloads, at least.
RELOAD_INTERVAL = 0.1
# After a reload that took T seconds, none for SLOW_PAUSE * T; T counted up
# to MAX_TOOK (the reactor's clock is the wall clock: a step forward during
# a reload is no hour-long reload).
SLOW_PAUSE = 9
MAX_TOOK = 0.2

STOPPING = {"ok": False, "error": "ipcd is stopping"}

log = Logger(namespace="ipcd")


Answer = dict[str, Any]


class ReloadGate:
    """
    C{run} (a reload, returning its answer, or a Deferred of it: a reload
    that parses in a thread) at most once per C{interval}, and after a slow
    one, not for L{SLOW_PAUSE} times as long; never two at once: a request
    that comes while one runs waits for the next.
    """

    def __init__(
        self,
        run: Callable[[], Answer | Deferred[Answer]],
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
        self._running = False  # a reload has begun and not ended
        self._stopped = False

    def request(self) -> Deferred[Answer]:
        """The answer of a reload that starts now, or of the next one."""
        if self._stopped:
            # A control connection made before ipcd began to stop may still
            # ask: no reload (nor RELOADING=1 to systemd) while it stops.
            return succeed(dict(STOPPING))
        now = self.clock.seconds()
        # The reactor's clock is the wall clock: one set back since the last
        # reload (by an hour, say) must not hold every request for an hour.
        if (
            self._next is None
            and not self._running
            and (self._last is None or now < self._last or now >= self._ready)
        ):
            return self._run()
        waiting: Deferred[Answer] = Deferred()
        self._waiting.append(waiting)
        if not self._running:
            self._schedule()
        return waiting

    @property
    def waiting(self) -> int:
        """How many requests wait for the next reload."""
        return len(self._waiting)

    def _schedule(self) -> None:
        """The next reload, once the pause after the last one is over."""
        if self._next is None:
            delay = max(self._ready - self.clock.seconds(), 0.0)
            self._next = self.clock.callLater(delay, self._run_waiting)

    def _run(self) -> Deferred[Answer]:
        started = self.clock.seconds()
        self.runs += 1
        self._running = True
        running = maybeDeferred(self.run)
        running.addErrback(self._failed)
        running.addBoth(self._ended, started)
        return running

    def _failed(self, failure: Failure) -> Answer:
        # A bug (a daemon's hook, say): every asker is answered, not left
        # waiting for its control deadline, and the gate goes on.
        log.failure("reload failed", failure)
        return {"ok": False, "error": "reload failed: see ipcd's log"}

    def _ended(self, answer: Answer, started: float) -> Answer:
        self._running = False
        self._last = ended = self.clock.seconds()
        took = min(max(ended - started, 0.0), MAX_TOOK)
        self._ready = ended + max(self.interval - took, SLOW_PAUSE * took)
        if self._waiting and not self._stopped:
            self._schedule()  # asked while it ran: the next one is theirs
        return answer

    def _run_waiting(self) -> None:
        self._next = None
        waiting, self._waiting = self._waiting, []

        def answered(answer: Answer) -> None:
            for each in waiting:
                each.callback(answer)

        self._run().addCallback(answered)

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
            each.callback(dict(STOPPING))
