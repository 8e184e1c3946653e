"""pongd, the service template: echo every message back unchanged."""

from __future__ import annotations

from typing import Any

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
) -> IPCService:
    """The echo service, listening at C{RUNDIR/pong}."""
    return IPCService(name, MessageFactory(Pong, max_message_size), rundir, reactor)
