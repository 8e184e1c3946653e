"""
The decision log: one structured event per request ipcd decides, saying who
asked for what, the rule that decided, how the target was reached and how
it went.

Its text and JSON are those of C{log.info} with the formats below; what
does not depend on the client is worked out once per distinct request
(L{ipcd.logs.EventTemplate}), as clients ask the same again and again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.logger import Logger, LogLevel

from ipcd.identity import Peer
from ipcd.logs import EventTemplate, printable
from ipcd.policy import Decision
from ipcd.resolution import Target

_DECIDED = "{direction} {service!r} for {who} -> {target}: {outcome}"
_DECIDED_VERDICT = _DECIDED + " ({verdict})"
# Refused before any target was chosen: there is none to show.
_REFUSED = "{direction} {service!r} for {who}: {outcome}"
# Allowed here, failed further on (the far tlsd's own rule, say): the
# verdict is this ipcd's, not the failure's.
_FAILED_VERDICT = _DECIDED + " ({verdict} here)"
# Distinct requests whose log fields are kept; past this many, all are
# forgotten.
_MAX_SAID = 256
# The most of a requested name a line shows: a valid name is no longer, but
# a refused one may be whatever a peer sent (a whole read of tcpd's, an
# HTTP path): cut, it costs a line and an entry of bounded size.
MAX_SHOWN = 255


@dataclass(slots=True)
class Request:
    """What is known of one request as it is decided, for its log event."""

    direction: str
    who: Peer
    service: str
    labels: list[str] = field(default_factory=list)
    decision: Decision | None = None
    access: str | None = None  # how a local socket was reached, when it was
    # When a local client's lookup began, with metrics on (ipcd.metrics).
    started: float | None = None
    # What the rules were last asked (the broker's decision key), so that a
    # reload while it connects can ask the new rules the same.
    policed: tuple[Any, ...] | None = None
    # What a local client is told of a refusal of its socket instead of the
    # reason, when a grant's walk went past a directory it may not search.
    unseen: str | None = None


class DecisionLog:
    """Logs each decided L{Request} on C{log}, an event per request."""

    def __init__(self, log: Logger) -> None:
        self.log = log
        self._said: dict[Any, tuple[Any, Any, EventTemplate]] = {}

    def record(self, request: Request, target: Target | None, outcome: str) -> None:
        """One structured log event per decision: who, what, rule, outcome."""
        # Targets and decisions are kept per configuration (the broker's
        # plans and decisions): known by identity, they need not be hashed
        # (dataclasses hash in Python); the entry holds them, so their ids
        # stay theirs.
        decision = request.decision
        service = request.service
        if len(service) > MAX_SHOWN:
            service = service[:MAX_SHOWN] + "..."
        key = (
            request.direction,
            service,
            id(target),
            id(decision),
            request.access,
            outcome,
        )
        said = self._said.get(key)
        if said is None or said[0] is not target or said[1] is not decision:
            fields = _decided_fields(request, service, target, outcome, self.log)
            said = (target, decision, EventTemplate(fields, ("who", "labels")))
            if len(self._said) >= _MAX_SAID:
                self._said.clear()
            self._said[key] = said
        # Logger.info's event, built here: one per lookup.
        self.log.observer(
            said[2].event(printable(str(request.who)), sorted(request.labels))
        )


def _decided_fields(
    request: Request, service: str, target: Target | None, outcome: str, log: Logger
) -> dict[str, Any]:
    """
    The fields of a decision's log event, as C{log.info} would make them
    (C{service}: the request's, as shown):
    those that do not depend on the client (service, target, verdict, rule,
    allowed, outcome and format) filled in; who, labels and time not yet.
    """
    decision = request.decision
    verdict = "not policed" if decision is None else str(decision)
    if request.access is not None:
        verdict = f"{verdict}; {request.access}"
    # A refusal's reason already says the verdict: do not say it twice.
    said = verdict in outcome
    return {
        "direction": request.direction,
        "service": printable(service),
        "who": "",
        "labels": [],
        "target": None if target is None else printable(str(target)),
        "verdict": verdict,
        "access": request.access,
        "rule": None
        if decision is None or decision.rule is None
        else str(decision.rule),
        "allowed": None if decision is None else decision.allowed,
        "outcome": printable(outcome),
        "log_logger": log,
        "log_level": LogLevel.info,
        "log_namespace": log.namespace,
        "log_source": log.source,
        "log_format": _decided_format(target is not None, said, outcome == "ok"),
        "log_time": None,
    }


def _decided_format(targeted: bool, said: bool, ok: bool) -> str:
    """The decision line's format: with a target if any, the verdict once."""
    if not targeted:
        return _REFUSED if said else _REFUSED + " ({verdict})"
    if said:
        return _DECIDED
    return _DECIDED_VERDICT if ok else _FAILED_VERDICT
