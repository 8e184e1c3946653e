"""
C{haproxy:} listeners, read by ipcd (L{ipcd.proxyheader}) rather than by
Twisted's wrapper.

The endpoint string is Twisted's (C{haproxy:tcp:9000}, C{haproxy:ssl:...},
nested or not): L{proxied_endpoint} makes the endpoint it wraps and puts a
L{ProxyHeaderProtocol} above each of its connections for each C{haproxy:}.
That reads the PROXY header before the application sees a byte; from then
on its C{getPeer()} and C{getHost()} are the addresses the header names
(when it names IP addresses; else the proxy's, as before).  A header that
is not one the protocol allows (L{ipcd.proxyheader.BadHeader}) is refused:
the connection cut at once, as the specification asks, without a byte
passed on, and C{refused(proxy, why)} told, once; the protocols above see
it end with L{HeaderRefused}.

Twisted's wrapper took a header's text as the address unchecked (a peer
labelled C{ip:evil}), let a bad port or non-UTF-8 text escape as a
traceback per connection, and said nothing when it dropped one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectionAborted
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from ipcd.listenerkeys import unwrapped
from ipcd.proxyheader import BadHeader, HeaderReader
from ipcd.routes import host_port

# What a listener does with a refused header: (the proxy's address, why).
Refused = Callable[[Any, str], None]


class HeaderRefused(ConnectionAborted):
    """
    Why a connection whose PROXY header was refused ended, for the
    protocols above it: its refusal is said already (tlsd says no failed
    TLS handshake besides).
    """


class ProxyHeaderProtocol(ProtocolWrapper):
    """One connection's PROXY header, read and checked; then a plain wrapper."""

    factory: ProxyHeaderFactory
    _peer: Any = None  # the header's addresses, once read (if it names them)
    _host: Any = None

    def __init__(self, factory: ProxyHeaderFactory, wrapped: Any) -> None:
        super().__init__(factory, wrapped)
        self._reader: HeaderReader | None = HeaderReader()
        self._refused = False
        self._unread = False  # closed from above before the header: not read

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        reader = self._reader
        if reader is None:
            if not (self._refused or self._unread):
                self.wrappedProtocol.dataReceived(data)
            return
        try:
            header = reader.feed(data)
        except BadHeader as e:
            self._reader, self._refused = None, True
            self.factory.refused(self.transport.getPeer(), str(e))
            self.transport.abortConnection()
            return
        if header is None:
            return  # (more to come)
        self._reader = None
        if header.source is not None and header.destination is not None:
            self._peer = _address(*header.source)
            self._host = _address(*header.destination)
        if header.rest:
            self.wrappedProtocol.dataReceived(header.rest)

    def _closing(self) -> None:
        # The protocols above end the connection before its header is
        # whole (the limits refuse it as it connects, a deadline passes):
        # no one reads what comes now, and it is no header to judge.  The
        # limits' refusal reads and drops what came first, the header
        # among it, so the peer's next bytes were refused as a bad header
        # (counted, logged, and cut with a reset in its grace).
        if self._reader is not None:
            self._reader, self._unread = None, True

    def loseConnection(self) -> None:  # noqa: N802 (Twisted's name)
        self._closing()
        super().loseConnection()

    def abortConnection(self) -> None:  # noqa: N802 (Twisted's name)
        self._closing()
        self.transport.abortConnection()

    def __getattr__(self, name: str) -> Any:
        found = getattr(self.transport, name)
        if name != "loseWriteConnection":
            return found

        def lose_write_connection() -> None:  # (only if the transport can)
            self._closing()
            found()

        return lose_write_connection

    def connectionLost(self, reason: Failure | None = None) -> None:  # noqa: N802
        if self._refused:
            reason = Failure(HeaderRefused())
        super().connectionLost(reason)

    def getPeer(self) -> Any:  # noqa: N802 (Twisted's name)
        return self._peer or self.transport.getPeer()

    def getHost(self) -> Any:  # noqa: N802 (Twisted's name)
        return self._host or self.transport.getHost()


def _address(host: str, port: int) -> IPv4Address | IPv6Address:
    if ":" in host:
        return IPv6Address("TCP", host, port)
    return IPv4Address("TCP", host, port)


class ProxyHeaderFactory(WrappingFactory):
    """Puts a L{ProxyHeaderProtocol} above each connection of C{wrapped}."""

    protocol = ProxyHeaderProtocol
    noisy = False  # (Twisted's said "Starting factory" at each start)

    def __init__(self, wrapped: Any, refused: Refused) -> None:
        super().__init__(wrapped)
        self.refused = refused


@implementer(IStreamServerEndpoint)
class ProxiedEndpoint:
    """C{endpoint}, its connections' PROXY headers read first."""

    def __init__(self, endpoint: Any, refused: Refused) -> None:
        self._endpoint = endpoint
        self._refused = refused

    def listen(self, factory: Any) -> Any:
        return self._endpoint.listen(ProxyHeaderFactory(factory, self._refused))


def counted_refusals(limits: Any) -> Refused:
    """
    What a listener under C{limits} (a L{ipcd.limits.ConnectionLimits})
    does with a refused header: as with its limits' refusals, counted
    (C{NAME: refused, bad PROXY header}) and logged at their rate.
    """
    name = limits.name

    def refused(proxy: Any, why: str) -> None:
        limits.counters[f"{name}: refused, bad PROXY header"] += 1
        limits.log.warn(
            "{listener}: refusing {proxy}: bad PROXY header: {why}",
            listener=name,
            proxy=shown_peer(proxy),
            why=why,
        )

    return refused


def shown_peer(address: Any) -> str:
    """A listener's peer, for a log line (a UNIX socket's has no host)."""
    host = getattr(address, "host", None)
    return "a UNIX socket's peer" if host is None else host_port(host, address.port)


def proxied_endpoint(
    reactor: Any,
    description: str,
    refused: Refused,
    make: Callable[[Any, str], Any] = serverFromString,
) -> Any:
    """
    The endpoint of Twisted's endpoint string C{description} (made by
    C{make}), its C{haproxy:} wrappers (any number) ipcd's
    L{ProxiedEndpoint}s, which tell C{refused} of each header refused.
    """
    layers, _, listens = unwrapped(description)
    endpoint = make(reactor, listens)
    for _ in range(layers):
        endpoint = ProxiedEndpoint(endpoint, refused)
    return endpoint
