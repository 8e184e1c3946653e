"""
Twisted endpoints for libipc services, and the C{ipc:} endpoint-string
parsers that C{twisted/plugins/ipcd_plugin.py} exposes:

    serverFromString(reactor, "ipc:pong")   # listen at RUNDIR/pong
    clientFromString(reactor, "ipc:pong")   # connect as libipc does
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import Deferred, execute
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import (
    IFileDescriptorReceiver,
    IProtocolFactory,
    IStreamClientEndpoint,
    IStreamClientEndpointStringParserWithReactor,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from ipcd.handoff import HandoffError, adopt_into_reactor, check_reply
from ipcd.names import (
    BROKER_NAME,
    SOCKET_MODE,
    listen_unix,
    resolve_rundir,
    socket_path,
    validate_service_name,
)
from ipcd.routes import encode_lookup
from ipcd.wire import encode


@implementer(IStreamServerEndpoint)
class IPCServerEndpoint:
    """Listen as service C{name}: C{RUNDIR/NAME}, mode 0660, stale-safe."""

    def __init__(
        self,
        reactor: Any,
        name: str,
        rundir: str | None = None,
        mode: int = SOCKET_MODE,
        backlog: int = 128,
        group: str | None = None,
    ) -> None:
        self._reactor = reactor
        self.name = validate_service_name(name)
        self.path = socket_path(resolve_rundir(rundir), self.name)
        self._mode = mode
        self._backlog = backlog
        self._group = group

    def listen(self, factory: IProtocolFactory) -> Deferred[Any]:
        return execute(
            listen_unix,
            self._reactor,
            self.path,
            factory,
            self._mode,
            self._backlog,
            self._group,
        )


@implementer(IFileDescriptorReceiver)
class _LookupClient(Protocol):
    """Sends one lookup and waits for C{ok} + fd (or C{ne ...})."""

    def __init__(self, payload: bytes, result: Deferred[int]) -> None:
        self._payload = payload
        self._result = result
        self._data = b""
        self._fds: list[int] = []

    def connectionMade(self) -> None:
        self.transport.write(encode(self._payload))

    def fileDescriptorReceived(self, descriptor: int) -> None:
        self._fds.append(descriptor)

    def dataReceived(self, data: bytes) -> None:
        self._data += data
        if self._data[:2] == b"ok" and self._fds:
            self._finish()
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._finish()

    def _finish(self) -> None:
        if self._result.called:
            for fd in self._fds:
                os.close(fd)
            self._fds = []
            return
        fds, self._fds = self._fds, []
        try:
            fd = check_reply(self._data, fds)
        except HandoffError:
            self._result.errback()
        else:
            self._result.callback(fd)


@implementer(IStreamClientEndpoint)
class IPCClientEndpoint:
    """
    Connect to a libipc service as libipc does: straight to C{RUNDIR/NAME},
    or, when C{network} (default: C{$IPC_NETWORK}) is set, through ipcd,
    adopting the connection it hands over.
    """

    def __init__(
        self,
        reactor: Any,
        service: str,
        rundir: str | None = None,
        network: str | None = None,
        timeout: float = 5.0,
    ) -> None:
        self._reactor = reactor
        self.service = validate_service_name(service)
        self.rundir = resolve_rundir(rundir)
        self.network = os.environ.get("IPC_NETWORK") if network is None else network
        self._timeout = timeout

    def _unix(self, name: str) -> UNIXClientEndpoint:
        return UNIXClientEndpoint(
            self._reactor, socket_path(self.rundir, name), timeout=self._timeout
        )

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        if not self.network:
            return self._unix(self.service).connect(factory)
        received: Deferred[int] = Deferred()
        payload = encode_lookup(self.service, self.network)
        lookup = self._unix(BROKER_NAME).connect(
            Factory.forProtocol(lambda: _LookupClient(payload, received))
        )
        lookup.addErrback(received.errback)
        received.addTimeout(self._timeout, self._reactor)
        return received.addCallback(
            lambda fd: adopt_into_reactor(self._reactor, fd, factory)
        )


@implementer(IPlugin, IStreamServerEndpointStringParser)
class IPCServerParser:
    """C{ipc:NAME[:rundir=DIR][:mode=0660][:backlog=N]}"""

    prefix = "ipc"

    def parseStreamServer(  # noqa: N802 (Twisted's name)
        self,
        reactor: Any,
        name: str,
        rundir: str | None = None,
        mode: str = "0660",
        backlog: str = "128",
    ) -> IPCServerEndpoint:
        return IPCServerEndpoint(reactor, name, rundir, int(mode, 8), int(backlog))


@implementer(IPlugin, IStreamClientEndpointStringParserWithReactor)
class IPCClientParser:
    """C{ipc:NAME[:rundir=DIR][:network=ROUTES][:timeout=SECONDS]}"""

    prefix = "ipc"

    def parseStreamClient(  # noqa: N802 (Twisted's name)
        self,
        reactor: Any,
        name: str,
        rundir: str | None = None,
        network: str | None = None,
        timeout: str = "5",
    ) -> IPCClientEndpoint:
        return IPCClientEndpoint(reactor, name, rundir, network, float(timeout))
