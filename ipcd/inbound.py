"""
The stream adapters of the inbound handshake (L{ipcd.inboundcore}) for the
protocol daemons' listeners: read a peer's request, ask the broker what it
may reach, answer C{ok} (or C{ne <reason>}) and hand both sockets to the
daemon's relay loop.

    L{Handshaking}       the protocol: subclasses say how a peer is named
                         (C{identify}), how requests and answers are framed
                         (C{framing}) and what it asks the broker
                         (C{request}); by default a remote peer's request goes
                         to C{broker.open_inbound}, which never follows a
                         route a peer brings
    L{HandshakeFactory}  builds them for one listener: the broker, the relay
                         loop, the handshake deadline (read per connection)
    L{NetworkHandshake}  a remote peer of a network listener (C{ip:} labels),
                         asking for a local service with a framed name
    L{ControlHandshake}  a daemon's C{RUNDIR/SCHEME} control socket for
                         upstream's ipcd: a framed URI of the daemon's scheme,
                         through C{broker.open_uri}

The handshake deadline is the core's, woken on the factory's reactor (a
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
from twisted.python.failure import Failure
from zope.interface import implementer

from ipcd import inboundcore
from ipcd.errors import Refused
from ipcd.host import IDaemonHost
from ipcd.identity import Peer, listener_peer, local_peer, remote_peer
from ipcd.inboundcore import Framed, FramedURI, Framing, InboundHandshake, Join
from ipcd.limits import REFUSAL_GRACE, RateLimitedObserver
from ipcd.nodescriptors import ClosesDescriptors
from ipcd.relay import RelayStats, take_socket
from ipcd.routes import RemoteURI, RouteError, parse_uri


@implementer(IHalfCloseableProtocol)
class Handshaking(ClosesDescriptors, Protocol):
    """
    The stream adapter of L{InboundHandshake}: bytes and the deadline in,
    its answers written, its relay joined.  By default a remote peer asking
    for a local service (C{direction = "in"}), framed.
    """

    log = Logger()
    direction = "in"
    requested = ""
    route = ""
    layer = ""  # the transport's own handshake first: L{InboundHandshake}'s
    remote = True  # told a refusal's public text only: L{InboundHandshake}'s
    stats_type: type[RelayStats] = RelayStats
    core: InboundHandshake
    _timer: Any = None

    def __init__(self, factory: HandshakeFactory) -> None:
        self.factory = factory
        self._pending: Deferred[socket.socket] | None = None

    # How requests and answers are framed (made per connection): libipc's
    # frames by default.
    framing: Callable[[], Framing] = Framed

    @property
    def who(self) -> Peer:
        return self.core.who

    def connectionMade(self) -> None:
        factory = self.factory
        self.core = InboundHandshake(
            self.identify(),
            self.framing(),
            factory.reactor.seconds(),
            factory.handshake_timeout,
            self.layer,
            self.remote,
        )
        self.act(self.core.started())

    def identify(self) -> Peer:
        """The peer, with its labels for the policy."""
        raise NotImplementedError

    def request(self, text: str) -> Deferred[socket.socket]:
        """Ask the broker for what C{text} names: a local service by default."""
        return self.factory.broker.open_inbound(text, self.core.who)

    def dataReceived(self, data: bytes) -> None:
        self.act(self.core.received(data))

    def act(self, actions: list[Any]) -> None:
        """Do what the core says, on this stream."""
        for action in actions:
            kind = type(action)
            if kind is inboundcore.Deadline:
                self._arm(action.after, self._tick)
            elif kind is inboundcore.Ask:
                self.requested = action.text  # request() may say better
                self._pending = maybeDeferred(self.request, action.text)
                self._pending.addBoth(self._answered)
            elif kind is inboundcore.Join:
                self._join(action)
            elif kind is inboundcore.Refuse:
                self.transport.write(action.answer)
                self.transport.loseConnection()
                # Closed once what it holds is sent: a peer that reads
                # nothing (TLS's own answers can fill its buffer first)
                # would hold the connection for ever.  Cut after a grace
                # (the request's deadline, still set while asking, goes).
                self._arm(REFUSAL_GRACE, self.transport.abortConnection)
            elif kind is inboundcore.Pause:
                self.transport.pauseProducing()
            elif kind is inboundcore.Failed:
                self.factory.failed(action.counter, action.format, **action.fields)
            elif kind is inboundcore.Abort:
                self.transport.abortConnection()
            elif kind is inboundcore.Cancel and self._pending is not None:
                self._pending.cancel()
            elif kind is inboundcore.Discard:
                action.sock.close()
            elif kind is inboundcore.Unexpected:
                self.factory.unexpected(action.error, self.who)

    def _arm(self, after: float | None, call: Any) -> None:
        """The one timer: cancelled, then set to C{call} C{after} seconds on."""
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if after is not None:
            self._timer = self.factory.reactor.callLater(after, call)

    def _tick(self) -> None:
        self._timer = None
        self.act(self.core.tick(self.factory.reactor.seconds()))

    def _answered(self, result: socket.socket | Failure) -> None:
        self._pending = None
        self.act(self.core.answered(result))

    def _join(self, join: Join) -> None:
        stats = self.stats_type.of(
            self.core.who,
            self.direction,
            self.requested,
            self.route,
            self.factory.broker.relays,
            daemon=self.factory.name,
        )
        self.relay(join.sock, stats, join.greeting, join.early)

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

    def readConnectionLost(self) -> None:  # noqa: N802 (Twisted's name)
        self.transport.loseConnection()  # EOF before we could answer

    def writeConnectionLost(self) -> None:  # noqa: N802 (Twisted's name)
        pass

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.act([*self.core.lost(), inboundcore.STOP])


class NetworkHandshake(Handshaking):
    """
    A remote peer on a network listener, named by its address (C{ip:...});
    on a UNIX socket, by the uid that connected (C{unix:uid=N}: still a
    remote peer, L{ipcd.identity.unix_listener_peer}).  Behind a
    C{haproxy:} listener, that is the address the PROXY header names:
    ipcd's reader (L{ipcd.proxied}) passes bytes on only after the header,
    checked, and from then on its C{getPeer()} says that address
    (before, the proxy's, which is what the connection limits count: see
    L{readdress}).
    """

    _connected: Any = None  # the address at connect
    _addressed = False  # the peer's bytes came: any PROXY header was read

    def identify(self) -> Peer:
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        self._connected = address = self.transport.getPeer()
        return listener_peer(address, self.transport)

    def readdress(self) -> None:
        """
        The peer as its transport names it now: a PROXY header's address, if
        one was read since the connect (a header naming none, UNKNOWN or a
        UNIX socket's, leaves the proxy's: L{ipcd.proxied}).
        """
        address = self.transport.getPeer()
        if address != self._connected and hasattr(address, "host"):
            self._connected = address
            self.core.who = remote_peer(address.host, address.port)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        if not self._addressed:
            self._addressed = True
            self.readdress()
        super().dataReceived(data)

    def _tick(self) -> None:
        if not self._addressed:  # (a header may have come, alone)
            self.readdress()
        super()._tick()


class ControlHandshake(Handshaking):
    """
    Upstream's ipcd on a daemon's C{RUNDIR/SCHEME}: a framed URI of the
    factory's scheme, then relay.
    """

    direction = "out"
    remote = False  # a local client: told the reason

    def identify(self) -> Peer:
        try:
            return local_peer(self.transport.getHandle())
        except (OSError, AttributeError):
            return Peer("unknown local client")

    framing = FramedURI

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
        self._rate_limited = RateLimitedObserver(
            globalLogPublisher, self.reactor, counters=broker.counters
        )
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

    def unexpected(self, error: Any, who: Any) -> None:
        """
        Log that C{who}'s request failed unexpectedly (C{error}, a
        C{Failure}), at the same bounded rate: a peer may cause it as
        often as it asks (when fds run out, say).
        """
        self._failures.failure("request from {who} failed", error, who=str(who))

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
