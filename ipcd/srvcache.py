"""
SRV answers cached for their TTL: what each owner resolved to, or why not.

A name is asked of DNS once while its answer lives (and once at a time:
lookups waiting for the same name share the query).  Answers live for their
smallest TTL clamped to [min_ttl, max_ttl]; failures (NXDOMAIN, no records,
the target C{.}, a DNS timeout) for negative_ttl.  At most max_names
owners are kept, and as many queries in flight: local clients may name
owners of their own in their routes.  A query that no lookup waits for any
more (their clients gone) ends, giving its place back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.names import error
from twisted.python.failure import Failure

from ipcd.errors import Refused
from ipcd.logs import printable
from ipcd.srv import SrvRecord, Unavailable, clamp, records_of

# What a query returns: twisted.names' (answers, authority, additional).
Query = Callable[[str], Deferred[Any]]


@dataclass(frozen=True)
class TtlBounds:
    """How long answers live: the clamp, failures', and how many names."""

    min_ttl: float = 5.0
    max_ttl: float = 3600.0
    negative_ttl: float = 10.0
    max_names: int = 256


@dataclass(frozen=True)
class SrvAnswer:
    """An owner's records (lowest priority first), or the error; until when."""

    records: tuple[SrvRecord, ...]
    error: str | None
    expires: float

    def as_dict(self, now: float) -> dict[str, Any]:
        shown: dict[str, Any] = {"ttl_left": max(0, round(self.expires - now, 1))}
        if self.error is not None:
            shown["error"] = self.error
        else:
            shown["targets"] = [r.as_dict() for r in self.records]
        return shown


def why_not(failure: Failure) -> str:
    """A DNS failure as a client's answer says it."""
    # Most of twisted.names' errors are DomainErrors: the specific ones first.
    if failure.check(error.DNSServerError):
        return "DNS server failure (SERVFAIL)"
    if failure.check(error.DNSQueryRefusedError):
        return "the DNS server refused the query"
    if failure.check(error.DNSQueryTimeoutError, error.TimeoutError):
        return "no answer from DNS (timed out)"
    if failure.check(
        error.DNSFormatError, error.DNSNotImplementedError, error.DNSUnknownError
    ):
        # Their text is a whole DNS message: the kind says enough.
        return f"DNS lookup failed ({type(failure.value).__name__})"
    if failure.check(error.DNSNameError, error.DomainError):
        return "no such name (NXDOMAIN)"
    return f"DNS lookup failed: {printable(failure.getErrorMessage())[:120]}"


class SrvCache:
    """SRV answers by owner, asked of C{query} and timed on C{clock}."""

    def __init__(self, query: Query, clock: IReactorTime, bounds: TtlBounds) -> None:
        self.query = query
        self.clock = clock
        self.bounds = bounds
        self.answers: dict[str, SrvAnswer] = {}
        self._waiting: dict[str, list[Deferred[SrvAnswer]]] = {}
        self._queries: dict[str, Deferred[Any]] = {}

    def resolve(self, owner: str) -> Deferred[SrvAnswer]:
        """C{owner}'s answer: cached while it lives, else asked of DNS."""
        key = owner.lower()
        answer = self.answers.get(key)
        if answer is not None and answer.expires > self.clock.seconds():
            return succeed(answer)
        waiters = self._waiting.get(key)
        asking = waiters is None
        if waiters is None:
            if len(self._waiting) >= self.bounds.max_names:
                return fail(Refused("too many DNS lookups in flight; try again"))
            waiters = self._waiting[key] = []
        # Each waiter its own Deferred: one giving up cancels nobody else's.
        waiting: Deferred[SrvAnswer] = Deferred(lambda d: self._gave_up(key, d))
        waiters.append(waiting)
        if asking:
            # After the waiter is listed: a resolver may answer at once.
            query = maybeDeferred(self.query, owner)
            if not query.called:
                self._queries[key] = query
            query.addBoth(self._answered, owner)
        return waiting

    def _gave_up(self, key: str, waiting: Deferred[SrvAnswer]) -> None:
        waiters = self._waiting[key]
        waiters.remove(waiting)
        if not waiters:
            # Nobody waits for the answer now (their clients went): the
            # query ends, its socket and its place in flight given back.
            del self._waiting[key]
            self._queries.pop(key).cancel()

    def _answered(self, result: Any, owner: str) -> None:
        key = owner.lower()
        self._queries.pop(key, None)
        if key not in self._waiting:
            return  # ended by L{_gave_up}: nothing learnt, nothing kept
        now = self.clock.seconds()
        try:
            answer = self._answer_of(result, owner, now)
        except Exception:
            # Never leave the waiters (and the name) stuck on a bad answer.
            answer = SrvAnswer((), "DNS answer not understood", now)
            raise
        finally:
            self._keep(key, answer, now)
            for waiting in self._waiting.pop(key):
                waiting.callback(answer)

    def _answer_of(self, result: Any, owner: str, now: float) -> SrvAnswer:
        bounds = self.bounds
        if isinstance(result, Failure):
            return SrvAnswer((), why_not(result), now + bounds.negative_ttl)
        try:
            records, ttl = records_of(owner, result[0])
        except Unavailable as e:
            return SrvAnswer((), str(e), now + bounds.negative_ttl)
        lives = clamp(ttl, bounds.min_ttl, bounds.max_ttl)
        return SrvAnswer(tuple(records), None, now + lives)

    def _keep(self, key: str, answer: SrvAnswer, now: float) -> None:
        self.answers.pop(key, None)
        if len(self.answers) >= self.bounds.max_names:
            for name, old in list(self.answers.items()):
                if old.expires <= now:
                    del self.answers[name]
        while len(self.answers) >= self.bounds.max_names:
            # The oldest answer goes first.
            del self.answers[next(iter(self.answers))]
        self.answers[key] = answer

    def status(self) -> dict[str, Any]:
        """What each cached owner resolved to (or why not), and its TTL left."""
        now = self.clock.seconds()
        return {name: answer.as_dict(now) for name, answer in self.answers.items()}
