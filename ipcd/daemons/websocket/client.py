"""
websocketd's outbound half: a C{ws://HOST:PORT/SERVICE} or C{wss://...}
route.  The client gets one end of a socketpair; websocketd joins the other
end to a WebSocket connection to the remote websocketd, message for message.
C{wss} verifies the server's certificate and name (service_identity, through
Twisted's C{optionsForClientTLS}) against the platform's trust roots or the
configured CA file.
"""

from __future__ import annotations

import socket
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import ssl
from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure

from ipcd.compat import autobahn as compat_autobahn
from ipcd.daemons.tls.material import MAX_MATERIAL_FILE
from ipcd.daemons.websocket.bridge import WebSocketSide
from ipcd.daemons.websocket.factories import (
    ReactorTimer,
    bridge_options,
    message_bounds,
    no_delay,
    tls_failure,
)
from ipcd.errors import Refused
from ipcd.logs import printable
from ipcd.owndials import OwnDials
from ipcd.reactors import IHostReactor
from ipcd.regularfile import read_regular
from ipcd.relay import RelayStats
from ipcd.routes import host_port
from ipcd.sockets import stream_endpoint, unzoned
from ipcd.tlsfactory import TLSFactory


class WebSocketOutbound(WebSocketSide, WebSocketClientProtocol):
    """The WebSocket to the remote websocketd, for one client's route."""

    factory: WebSocketOutboundFactory

    def connectionMade(self) -> None:  # noqa: N802
        super().connectionMade()
        no_delay(self.transport)
        own_dials = self.factory.own_dials
        if own_dials is not None:
            # Held until the far side opens the WebSocket or refuses it.
            own_dials.hold_until(self.transport.getHost(), self.factory.result)

    def onOpen(self) -> None:  # noqa: N802
        factory = self.factory
        if factory.result.called:  # cancelled meanwhile
            self.dropConnection(abort=True)
            return
        ours, theirs = factory.pair
        why = self.joinSocket(
            factory.reactor,
            ours,
            factory.max_message_size,
            factory.idle,
            factory.stats,
            factory.bridges,
        )
        if why is None:
            factory.result.callback(theirs)
        else:
            factory.failed(why)

    def connectionLost(self, reason: Failure | None = None) -> None:  # noqa: N802
        why, reason = tls_failure(reason)
        if why is not None:
            # Said once, with the way out, in the client's answer.
            self.factory.failed(
                f"TLS handshake failed: {why} (is the server's certificate for "
                "this host name, and signed by a CA in [websocketd] ca, or the "
                "system's roots without it?)"
            )
        super().connectionLost(reason)  # type: ignore[arg-type]
        self.cancelTimers()

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:  # noqa: N802, N803
        self.webSocketLost(wasClean)
        # Unclean, autobahn's reason wraps its own ("connection was closed
        # uncleanly (...)"): the inner one says why (a refused upgrade's
        # status and the far websocketd's reason).
        why = reason if wasClean else self.wasNotCleanReason or reason
        self.factory.failed(why or "closed")

    def headTooLarge(self, reason: str) -> None:  # noqa: N802
        self.failHandshake(f"response head too large: {reason}")


class WebSocketOutboundFactory(WebSocketClientFactory):
    protocol = WebSocketOutbound
    noisy = False

    def __init__(
        self,
        reactor: IHostReactor,
        url: str,
        max_message_size: int,
        idle: float,
        settings: Any,
        stats: RelayStats,
        bridges: set[WebSocketSide] | None = None,
        own_dials: OwnDials | None = None,
    ) -> None:
        super().__init__(url)
        self.reactor = reactor
        compat_autobahn.use_timers(self, ReactorTimer(reactor))
        self.stats = stats
        self.bridges = bridges
        self.max_message_size = max_message_size
        self.idle = idle
        self.setProtocolOptions(**bridge_options(settings))
        self.bounds = message_bounds(settings)
        self.pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.result: Deferred[socket.socket] = Deferred(self._cancel)
        self.connecting: Deferred[Any] | None = None
        self.protocolInstance: WebSocketOutbound | None = None
        self.own_dials = own_dials  # ipcd.owndials
        self.where = url  # as refusals say it (with a link-local zone)

    def buildProtocol(self, addr: Any) -> WebSocketOutbound:  # noqa: N802
        self.protocolInstance = super().buildProtocol(addr)
        return self.protocolInstance

    def failed(self, reason: str) -> None:
        """The WebSocket did not open (or closed before): refuse the route."""
        if not self.result.called:
            self._close_pair()
            self.result.errback(
                Refused(f"websocketd at {self.where}: {printable(str(reason))}")
            )

    def _close_pair(self) -> None:
        for sock in self.pair:
            sock.close()

    def stop(self, reason: str) -> None:
        """Give the dial up (websocketd stops): the route is refused, C{reason}."""
        self.failed(reason)  # first: said so, whatever the abort makes of it
        self._cancel(self.result)

    def _cancel(self, result: Deferred[Any]) -> None:
        # The broker's connect deadline passed, or the client went away.
        self._close_pair()
        if self.connecting is not None:
            self.connecting.cancel()
        protocol = self.protocolInstance
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abortConnection()


def trust_root(ca_file: str) -> Any:
    """The roots that verify a wss server: C{ca_file}'s, else the platform's."""
    if not ca_file:
        return ssl.platformTrust()
    # Read at every wss:// lookup, in the reactor's thread: only a regular
    # file, bounded (ValueError otherwise), never a FIFO waited on.
    return ssl.Certificate.loadPEM(read_regular(ca_file, MAX_MATERIAL_FILE))


def connect_websocket(
    reactor: IHostReactor,
    scheme: str,
    host: str,
    port: int,
    service: str,
    settings: Any,
    max_message_size: int,
    idle: float,
    stats: RelayStats,
    bridges: set[WebSocketSide] | None = None,
    own_dials: OwnDials | None = None,
    dials: set[WebSocketOutboundFactory] | None = None,
) -> Deferred[socket.socket]:
    """
    Open a WebSocket to C{scheme://host:port/service}; fires with the
    client's end of a socketpair joined to it, or fails with L{Refused}.
    Until then the connection's local end is held in C{own_dials}, and its
    factory in C{dials}; the bridge, once joined, is in C{bridges} while
    it lives (so that a stopping websocketd can end them).
    """
    # A zone is this host's own (RFC 6874): not in the URL the server sees
    # (its Host header), nor what a certificate names.
    named = unzoned(host)
    url = f"{scheme}://{host_port(named, port)}/{service}"
    where = f"{scheme}://{host_port(host, port)}/{service}"
    endpoint = stream_endpoint(reactor, host, port)  # (or Refused: no such link)
    try:
        factory = WebSocketOutboundFactory(
            reactor, url, max_message_size, idle, settings, stats, bridges, own_dials
        )
    except OSError as e:  # no descriptor left for the socketpair (EMFILE)
        why = f"cannot relay to the service: {e.strerror or e}"
        raise Refused(f"websocketd at {where}: {why}") from None
    factory.where = where
    if scheme == "wss":
        try:
            options = ssl.optionsForClientTLS(
                named, trustRoot=trust_root(settings["ca"])
            )
        except (OSError, ssl.SSL.Error, ValueError) as e:
            factory._close_pair()
            raise Refused(f"cannot verify {where}: bad ca {settings['ca']!r}: {e}")
        # tlsd's TLS: what OpenSSL answers the server is bounded (OwedGuard).
        connecting = endpoint.connect(TLSFactory(options, True, factory))
    else:
        connecting = endpoint.connect(factory)
    factory.connecting = connecting
    if dials is not None:
        dials.add(factory)

        def dialed(result: Any) -> Any:
            dials.discard(factory)
            return result

        factory.result.addBoth(dialed)

    def unreachable(failure: Failure) -> None:
        factory.connecting = None
        if not failure.check(CancelledError):
            reason = failure.getErrorMessage()
            factory.failed(f"cannot connect: {reason}")

    def connected(protocol: Any) -> None:
        factory.connecting = None

    connecting.addCallbacks(connected, unreachable)
    return factory.result
