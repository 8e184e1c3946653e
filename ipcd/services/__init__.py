"""
Writing a libipc service: a protocol on L{ipcd.wire.MessageProtocol} and an
L{IPCService} that listens on C{RUNDIR/NAME}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import Protocol

from ipcd.endpoints import IPCServerEndpoint
from ipcd.limits import ConnectionLimits, LimitedEndpoint
from ipcd.listener import EndpointListener
from ipcd.names import SOCKET_MODE
from ipcd.reactors import IHostReactor


class IPCService(EndpointListener):
    """
    A Twisted service listening as libipc service C{name} (socket
    C{RUNDIR/NAME}, 0660, stale sockets cleared, removed on stop).
    """

    def __init__(
        self,
        name: str,
        factory: IProtocolFactory,
        rundir: str | None = None,
        reactor: IHostReactor | None = None,
        mode: int = SOCKET_MODE,
        group: str | int | None = None,
        limits: ConnectionLimits | None = None,
    ) -> None:
        if not IProtocolFactory.providedBy(factory):
            # A protocol class given for its factory: refused now, not with a
            # traceback on every connection.
            hint = ""
            if isinstance(factory, type) and issubclass(factory, Protocol):
                hint = f" (MessageFactory({factory.__name__}), say)"
            raise TypeError(
                f"IPCService {name!r}: expected a protocol factory{hint}, "
                f"got {factory!r}"
            )
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        endpoint: Any = IPCServerEndpoint(reactor, name, rundir, mode, group=group)
        if limits is not None:
            # So that the listener can stop accepting at its maximum.
            endpoint = LimitedEndpoint(endpoint, limits)
        super().__init__(endpoint, factory)
        self.setName(name)
