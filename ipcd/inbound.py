"""
The handshake every protocol daemon's listeners share: read a peer's request,
ask the broker what it may reach, answer C{ok} (or C{ne <reason>}) and hand
both sockets to the daemon's relay loop.

    L{Handshaking}       the protocol: subclasses say how a peer is named
                         (C{identify}), how its request ends (C{parse}) and
                         what it asks the broker (C{request}); by default a
                         remote peer's request goes to C{broker.open_inbound},
                         which never follows a route a peer brings
    L{HandshakeFactory}  builds them for one listener: the broker, the relay
                         loop, the handshake deadline (read per connection)
    L{NetworkHandshake}  a remote peer of a network listener (C{ip:} labels),
                         asking for a local service with a framed name
    L{ControlHandshake}  a daemon's C{RUNDIR/SCHEME} control socket for
                         upstream's ipcd: a framed URI of the daemon's scheme,
                         through C{broker.open_uri}
    L{framed}            one framed request out of a buffer
    L{request_text}      a request's bytes as the name they must be (ASCII)
    L{open_inbound}      the whole path for a transport without a stream
                         (udpd's datagrams): request bytes in, a connected
                         socket or L{Refused} out

The handshake deadline is L{TimeoutMixin}'s, on the factory's reactor (a
C{MemoryReactorClock} in tests).  Answers are framed when the request was.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger, globalLogPublisher
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from ipcd import wire
from ipcd.errors import Refused
from ipcd.host import IDaemonHost
from ipcd.identity import Peer, local_peer, remote_peer
from ipcd.limits import RateLimitedObserver
from ipcd.relay import READ_SIZE, RelayStats, take_socket
from ipcd.routes import RemoteURI, RouteError, parse_uri

OK = b"ok"
# The longest handshake we wait for: a framed name (255) or a control URI.
MAX_HANDSHAKE = 4096


def framed(buffer: bytes, limit: int) -> tuple[bytes, bytes] | None:
    """
    C{(request, rest)} once C{buffer} holds a whole framed message, None
    until then; L{Refused} when its header announces more than C{limit}.
    """
    if len(buffer) < wire.HEADER.size:
        return None
    (size,) = wire.HEADER.unpack_from(buffer)
    if size > limit:
        raise Refused(f"request of {size} bytes is too long")
    end = wire.HEADER.size + size
    if len(buffer) < end:
        return None
    return buffer[wire.HEADER.size : end], buffer[end:]


def request_text(request: bytes) -> str:
    """The request as text; L{Refused} when it is not ASCII."""
    try:
        return request.decode("ascii")
    except UnicodeDecodeError:
        raise Refused("request is not ASCII") from None


def open_inbound(
    broker: IDaemonHost, request: bytes, who: Peer
) -> Deferred[socket.socket]:
    """
    A remote peer C{who} asks for the local service C{request} names, as
    L{Handshaking} asks: through C{broker.open_inbound}.  Fails with
    L{Refused} only: anything else is logged and refused as an internal
    error.
    """

    def unexpected(failure: Failure) -> Failure:
        if not failure.check(Refused):
            Handshaking.log.failure("request from {who} failed", failure, who=str(who))
            return Failure(Refused("internal error"))
        return failure

    d = maybeDeferred(lambda: broker.open_inbound(request_text(request), who))
    return d.addErrback(unexpected)


@implementer(IHalfCloseableProtocol)
class Handshaking(Protocol, TimeoutMixin):
    """
    Reads a request, asks for the other side, answers, and hands both
    sockets to the factory's relay loop.  By default a remote peer asking
    for a local service (C{direction = "in"}), framed.
    """

    log = Logger()
    framed = True
    direction = "in"
    requested = ""
    route = ""
    stats_type: type[RelayStats] = RelayStats
    who: Peer

    def __init__(self, factory: HandshakeFactory) -> None:
        self.factory = factory
        self._handshake: bytes | None = b""
        self._pending: Deferred[socket.socket] | None = None
        self._early: list[bytes] = []  # sent after the request, for the service
        self._earlySize = 0
        self._gone = False

    def callLater(self, period: float, func: Callable[[], Any]) -> Any:  # noqa: N802
        """L{TimeoutMixin}'s clock: the factory's reactor."""
        return self.factory.reactor.callLater(period, func)

    def connectionMade(self) -> None:
        self.who = self.identify()
        self.setTimeout(self.factory.handshake_timeout)

    def identify(self) -> Peer:
        """The peer, with its labels for the policy."""
        raise NotImplementedError

    def parse(self, data: bytes) -> tuple[bytes, bytes] | None:
        """C{(request, rest)} once the request is complete, else None."""
        return framed(data, 255)

    def request(self, text: str) -> Deferred[socket.socket]:
        """Ask the broker for what C{text} names: a local service by default."""
        return self.factory.broker.open_inbound(text, self.who)

    def dataReceived(self, data: bytes) -> None:
        if self._handshake is None:
            self._keep(data)
            return
        self._handshake += data
        try:
            parsed = self.parse(self._handshake)
        except Refused as e:
            self._refuse(e.reason)
            return
        if parsed is None:
            if len(self._handshake) > MAX_HANDSHAKE:
                self._refuse("handshake too long")
            return
        request, rest = parsed
        self._handshake = None
        self.setTimeout(None)
        if rest:
            self._keep(rest)
        try:
            text = request_text(request)
        except Refused as e:
            self._refuse(e.reason)
            return
        self.requested = text
        self._pending = maybeDeferred(self.request, text)
        self._pending.addCallbacks(self._joined, self._failed)

    def _keep(self, data: bytes) -> None:
        """Hold data that arrives while the request is served, for the relay."""
        self._early.append(data)
        self._earlySize += len(data)
        if self._earlySize >= READ_SIZE:
            # Bounded: the rest waits in the kernel for the relay to read it.
            self.transport.pauseProducing()

    def _joined(self, sock: socket.socket) -> None:
        self._pending = None
        if self._gone:
            sock.close()
            return
        stats = self.stats_type.of(
            self.who,
            self.direction,
            self.requested,
            self.route,
            self.factory.broker.relays,
        )
        early, self._early = b"".join(self._early), []
        self.relay(sock, stats, wire.encode(OK) if self.framed else OK, early)

    def relay(
        self, sock: socket.socket, stats: RelayStats, greeting: bytes, early: bytes
    ) -> None:
        """
        Join the peer to C{sock} (the other side) in the factory's relay
        loop: by default, the peer's own socket, taken from its transport.
        """
        # The connection counts against its listener's limits until the
        # relay ends (a limits wrapper hands that over, if there is one).
        stats.on_end = getattr(self.transport, "handOff", lambda: None)()
        # From here on the relay loop owns the peer's socket: this protocol
        # and its transport are done with it (and dropped).
        self.factory.relays.join(
            take_socket(self.transport),
            sock,
            stats,
            greeting=greeting,
            early=early,
            idle_timeout=self.factory.idle_timeout,
        )

    def _failed(self, failure: Failure) -> None:
        self._pending = None
        if self._gone:
            return
        if failure.check(Refused):
            self._refuse(failure.value.reason)
        else:
            self.log.failure("request from {who} failed", failure, who=str(self.who))
            self._refuse("internal error")

    def _refuse(self, reason: str) -> None:
        self._handshake = None
        self.setTimeout(None)
        answer = b"ne " + reason.encode("utf-8", "replace")
        self.transport.write(wire.encode(answer) if self.framed else answer)
        self.transport.loseConnection()

    def timeoutConnection(self) -> None:  # noqa: N802 (TimeoutMixin's name)
        self.factory.failed(
            "handshakes timed out",
            "dropping {who}: no request in time",
            who=str(self.who),
        )
        self._refuse("handshake timed out")

    def readConnectionLost(self) -> None:  # noqa: N802 (Twisted's name)
        self.transport.loseConnection()  # EOF before we could answer

    def writeConnectionLost(self) -> None:  # noqa: N802 (Twisted's name)
        pass

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._gone = True
        self.setTimeout(None)
        if self._pending is not None:
            self._pending.cancel()


class NetworkHandshake(Handshaking):
    """A remote peer on a network listener, named by its address (C{ip:...})."""

    def identify(self) -> Peer:
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        address = self.transport.getPeer()
        return remote_peer(address.host, address.port)


class ControlHandshake(Handshaking):
    """
    Upstream's ipcd on a daemon's C{RUNDIR/SCHEME}: a framed URI of the
    factory's scheme, then relay.
    """

    direction = "out"

    def identify(self) -> Peer:
        try:
            return local_peer(self.transport.getHandle())
        except (OSError, AttributeError):
            return Peer("unknown local client")

    def parse(self, data: bytes) -> tuple[bytes, bytes] | None:
        return framed(data, MAX_HANDSHAKE)

    def request(self, text: str) -> Deferred[socket.socket]:
        scheme, name = self.factory.scheme, self.factory.name
        self.route = f"{scheme} control socket"
        try:
            uri = parse_uri(text)
        except RouteError as e:
            raise Refused(str(e)) from None
        if not isinstance(uri, RemoteURI) or uri.scheme != scheme:
            raise Refused(f"{name} serves {scheme}:// URIs only, not {text!r}")
        # For status: the service asked for, and the route it takes.
        self.requested, self.route = uri.service or text, text
        return self.factory.broker.open_uri(uri, self.who)


class HandshakeFactory(Factory):
    """
    Builds C{protocol} (a L{Handshaking}) for one of a daemon's listeners.
    C{handshake_timeout} is in seconds, or a callable giving the current
    value (read at each connection, so a reload applies to new ones).
    C{scheme} and C{name} (the daemon's) are for L{ControlHandshake}.
    """

    noisy = False

    def __init__(
        self,
        protocol: type[Handshaking],
        broker: IDaemonHost,
        relays: Any,
        handshake_timeout: float | Callable[[], float] = 5.0,
        scheme: str = "",
        name: str = "",
    ) -> None:
        self.protocol = protocol
        self.broker = broker
        self.reactor = broker.reactor
        self.relays = relays
        self._handshake_timeout = handshake_timeout
        self.scheme = scheme
        self.name = name or f"{scheme}d"
        # Failed handshakes: a peer can fail them as fast as it connects.
        self._rate_limited = RateLimitedObserver(globalLogPublisher, self.reactor)
        self._failures = Logger(
            namespace=f"ipcd.{self.name}.handshakes", observer=self._rate_limited
        )

    def failed(self, counter: str, format: str, **fields: Any) -> None:
        """
        Count a failed handshake under C{NAME: counter} (C{ipcd status});
        log it, at the bounded rate of C{[limits]} refusals.
        """
        self.broker.counters[f"{self.name}: {counter}"] += 1
        self._failures.info(format, **fields)

    def stopFactory(self) -> None:  # noqa: N802 (Twisted's name)
        self._rate_limited.flush()  # what it left out, said now

    @property
    def handshake_timeout(self) -> float:
        timeout = self._handshake_timeout
        return timeout() if callable(timeout) else timeout

    @property
    def idle_timeout(self) -> float:
        # Read at each join, so a reload applies to new relays.
        return self.broker.config.idle_timeout

    def buildProtocol(self, addr: Any) -> Handshaking:
        return self.protocol(self)
