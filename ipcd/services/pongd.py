"""pongd, the service template: echo every message back unchanged."""

from __future__ import annotations

from typing import Any

from ipcd.limits import ConnectionLimits, LimitedFactory
from ipcd.services import IPCService
from ipcd.wire import DEFAULT_MAX_MESSAGE_SIZE, MessageFactory, MessageProtocol


class Pong(MessageProtocol):
    def messageReceived(self, payload: bytes) -> None:
        self.sendMessage(payload)


def pongd(
    rundir: str | None = None,
    name: str = "pong",
    reactor: Any = None,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    limits: ConnectionLimits | None = None,
) -> IPCService:
    """
    The echo service, listening at C{RUNDIR/pong}; with C{limits}, at most
    so many connections in all and per uid.
    """
    factory: Any = MessageFactory(Pong, max_message_size)
    if limits is not None:
        factory = LimitedFactory(factory, limits)
    return IPCService(name, factory, rundir, reactor, limits=limits)
