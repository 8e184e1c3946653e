"""pongd, the service template: echo every message back unchanged."""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Factory

from ipcd.services import IPCService
from ipcd.wire import MessageProtocol


class Pong(MessageProtocol):
    def messageReceived(self, payload: bytes) -> None:
        self.sendMessage(payload)


def pongd(
    rundir: str | None = None, name: str = "pong", reactor: Any = None
) -> IPCService:
    """The echo service, listening at C{RUNDIR/pong}."""
    factory = Factory.forProtocol(Pong)
    factory.noisy = False
    return IPCService(name, factory, rundir, reactor)
