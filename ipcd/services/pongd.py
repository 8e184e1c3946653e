"""pongd, the service template: echo every message back unchanged."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from ipcd.limits import ConnectionLimits, LimitedFactory
from ipcd.reactors import IHostReactor
from ipcd.services import IPCService
from ipcd.wire import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_MESSAGE_SIZE,
    MessageFactory,
    MessageProtocol,
    PartialMessageBudget,
)


class Pong(MessageProtocol):
    def messageReceived(self, payload: bytes) -> None:
        self.sendMessage(payload)


def pongd(
    rundir: str | None = None,
    name: str = "pong",
    reactor: IHostReactor | None = None,
    max_message_size: int | Callable[[], int] = DEFAULT_MAX_MESSAGE_SIZE,
    idle_timeout: float | Callable[[], float] = DEFAULT_IDLE_TIMEOUT,
    partial_budget: PartialMessageBudget | None = None,
    counters: Counter[str] | None = None,
    limits: ConnectionLimits | None = None,
) -> IPCService:
    """
    The echo service, listening at C{RUNDIR/pong}.  L{MessageFactory} bounds
    each connection (backpressure, idle timeout, C{partial_budget}); with
    C{limits}, at most so many connections in all and per uid.
    """
    factory: Any = MessageFactory(
        Pong,
        max_message_size,
        idleTimeout=idle_timeout,
        clock=reactor,
        partialBudget=partial_budget,
        counters=counters,
    )
    if limits is not None:
        factory = LimitedFactory(factory, limits)
    return IPCService(name, factory, rundir, reactor, limits=limits)
