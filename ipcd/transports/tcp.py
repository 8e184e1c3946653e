"""
tcpd: libipc services over TCP.

Outbound (C{tcp://HOST:PORT/SERVICE} routes): connect, send the raw service
name, wait for the raw C{ok}, and give the broker the TCP socket itself, so
after the handoff no process on the client's host relays a byte.

Inbound: a TCP listener reads the service request (upstream's raw name, or a
framed one), asks the broker's inbound resolver, answers C{ok} in the same
form, and relays.  For upstream's ipcd, C{RUNDIR/tcp} speaks the upstream
control protocol (framed URI, framed C{ok}, then relay).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ipcd import wire
from ipcd.errors import Refused
from ipcd.identity import Peer, local_peer, remote_peer
from ipcd.limits import LimitedEndpoint, LimitedFactory, network_peer_key
from ipcd.logs import printable
from ipcd.relay import READ_SIZE, RelayLoop, RelayStats, SocketRelays, take_socket
from ipcd.routes import RemoteURI, RouteError, parse_uri
from ipcd.services import IPCService
from ipcd.sockets import connect_tcp, read_exactly, read_to_eof, write_all
from ipcd.transports import ITransport

SCHEME = "tcp"
DEFAULT_PORT = 9000
OK = b"ok"
# The longest handshake we wait for: a framed name (255) or a control URI.
MAX_HANDSHAKE = 4096


async def _addresses(reactor: Any, host: str, port: int) -> list[tuple[int, Any]]:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        return [(family, (host, port))]
    infos = await deferToThreadPool(
        reactor,
        reactor.getThreadPool(),
        socket.getaddrinfo,
        host,
        port,
        0,
        socket.SOCK_STREAM,
    )
    return [(family, addr) for family, _t, _p, _c, addr in infos]


async def dial(reactor: Any, host: str, port: int, service: str) -> socket.socket:
    """
    Open a TCP connection to the tcpd at C{host:port} and ask it for
    C{service} the upstream way; return the socket, positioned right after
    the C{ok}.
    """
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        addresses = await _addresses(reactor, host, port)
    except OSError as e:  # socket.gaierror among them
        raise Refused(f"cannot resolve {host!r}: {e.strerror or e}")
    except UnicodeError:
        # The IDNA codec getaddrinfo applies; routes.check_host keeps such
        # names out, this keeps any other caller's from being a traceback.
        raise Refused(f"cannot resolve {host!r}: not a valid host name")
    sock = None
    error: OSError | None = None
    for family, address in addresses:
        try:
            sock = await connect_tcp(reactor, address, family)
            break
        except OSError as e:
            error = e
    if sock is None:
        reason = error.strerror if error is not None else "no address"
        raise Refused(f"cannot connect to tcpd at {where}: {reason}")
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await write_all(reactor, sock, service.encode("ascii"))
            reply = await read_exactly(reactor, sock, len(OK))
            if reply != OK:
                detail = await _rest_of_refusal(reactor, sock, reply)
                raise Refused(f"tcpd at {where} refused {service!r}: {detail}")
        except ConnectionLost:
            raise Refused(f"tcpd at {where} closed the connection for {service!r}")
        return sock
    except BaseException:
        sock.close()
        raise


async def _rest_of_refusal(reactor: Any, sock: socket.socket, head: bytes) -> str:
    """
    Read the rest of an C{ne <reason>} answer, up to EOF or a bound.  Any
    other answer is not repeated: the peer need not be a tcpd, and its
    bytes are not the client's to read through ipcd.
    """
    if head != b"ne":
        return "it did not answer ok (not a tcpd?)"
    data = await read_to_eof(reactor, sock, MAX_HANDSHAKE - len(head))
    return printable(data.removeprefix(b" ").decode("utf-8", "replace"))


@implementer(ITransport)
class TcpTransport:
    """The broker's C{tcp://} transport: direct handoff of the TCP socket."""

    scheme = SCHEME

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def connect(self, target: Any, client: Any) -> Deferred[socket.socket]:
        uri: RemoteURI = target.uri
        port = uri.port or DEFAULT_PORT
        return ensureDeferred(dial(self._reactor, uri.host, port, target.service))


@implementer(IHalfCloseableProtocol)
class _Handshaking(Protocol):
    """
    Reads a request, asks for the other side, answers, and hands both
    sockets to the factory's relay loop; common to the TCP listener and the
    control socket.
    """

    log = Logger()
    framed = True
    direction = ""
    requested = ""
    route = ""
    who: Peer

    def __init__(self, factory: _HandshakeFactory) -> None:
        self.factory = factory
        self._handshake: bytes | None = b""
        self._deadline: Any = None
        self._pending: Deferred[socket.socket] | None = None
        self._early: list[bytes] = []  # sent after the request, for the service
        self._earlySize = 0
        self._gone = False

    def connectionMade(self) -> None:
        self.who = self.identify()
        timeout = self.factory.handshake_timeout
        self._deadline = self.factory.reactor.callLater(timeout, self._timedOut)

    def identify(self) -> Peer:
        raise NotImplementedError

    def parse(self, data: bytes) -> tuple[bytes, bytes] | None:
        """C{(request, rest)} once the request is complete, else None."""
        raise NotImplementedError

    def request(self, text: str) -> Deferred[socket.socket]:
        raise NotImplementedError

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
        self._cancelDeadline()
        if rest:
            self._keep(rest)
        try:
            text = request.decode("ascii")
        except UnicodeDecodeError:
            self._refuse("request is not ASCII")
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
        stats = RelayStats(
            description=str(self.who),
            direction=self.direction,
            service=self.requested,
            route=self.route,
            labels=tuple(self.who.labels),
            registry=self.factory.broker.relays,
        )
        # The connection counts against its listener's limits until the
        # relay ends (a limits wrapper hands that over, if there is one).
        stats.on_end = getattr(self.transport, "handOff", lambda: None)()
        # From here on the relay loop owns the peer's socket: this protocol
        # and its transport are done with it (and dropped).
        early, self._early = b"".join(self._early), []
        self.factory.relays.join(
            take_socket(self.transport),
            sock,
            stats,
            greeting=wire.encode(OK) if self.framed else OK,
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
        self._cancelDeadline()
        answer = b"ne " + reason.encode("utf-8", "replace")
        self.transport.write(wire.encode(answer) if self.framed else answer)
        self.transport.loseConnection()

    def _timedOut(self) -> None:
        self._deadline = None
        self.log.info("dropping {who}: no request in time", who=str(self.who))
        self._refuse("handshake timed out")

    def _cancelDeadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def readConnectionLost(self) -> None:  # noqa: N802 (Twisted's name)
        self.transport.loseConnection()  # EOF before we could answer

    def writeConnectionLost(self) -> None:  # noqa: N802 (Twisted's name)
        pass

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._gone = True
        self._cancelDeadline()
        if self._pending is not None:
            self._pending.cancel()


def _framed(buffer: bytes, limit: int) -> tuple[bytes, bytes] | None:
    if len(buffer) < wire.HEADER.size:
        return None
    (size,) = wire.HEADER.unpack_from(buffer)
    if size > limit:
        raise Refused(f"request of {size} bytes is too long")
    end = wire.HEADER.size + size
    if len(buffer) < end:
        return None
    return buffer[wire.HEADER.size : end], buffer[end:]


class TcpInbound(_Handshaking):
    """A remote peer on tcpd's listener asking for a local service."""

    direction = "in"
    route = "tcp inbound"
    framed = False  # until a request says otherwise: upstream speaks raw

    def identify(self) -> Peer:
        self.transport.setTcpNoDelay(True)
        address = self.transport.getPeer()
        return remote_peer(address.host, address.port)

    def parse(self, data: bytes) -> tuple[bytes, bytes] | None:
        # A NUL first byte can only be a frame header (names have no NUL);
        # otherwise upstream's form: the first read is the raw name.
        self.framed = data[:1] == b"\0"
        if self.framed:
            return _framed(data, 255)
        return data, b""

    def request(self, text: str) -> Deferred[socket.socket]:
        return self.factory.broker.open_inbound(text, self.who)


class TcpControl(_Handshaking):
    """Upstream's ipcd on C{RUNDIR/tcp}: a framed URI, then relay."""

    direction = "out"
    route = "tcp control socket"

    def identify(self) -> Peer:
        try:
            return local_peer(self.transport.getHandle())
        except (OSError, AttributeError):
            return Peer("unknown local client")

    def parse(self, data: bytes) -> tuple[bytes, bytes] | None:
        return _framed(data, MAX_HANDSHAKE)

    def request(self, text: str) -> Deferred[socket.socket]:
        try:
            uri = parse_uri(text)
        except RouteError as e:
            raise Refused(str(e)) from None
        if not isinstance(uri, RemoteURI) or uri.scheme != SCHEME:
            raise Refused(f"tcpd serves tcp:// URIs only, not {text!r}")
        # For status: the service asked for, and the route it takes.
        self.requested, self.route = uri.service or text, text
        return self.factory.broker.open_uri(uri, self.who)


class _HandshakeFactory(Factory):
    noisy = False

    def __init__(
        self, protocol: type[_Handshaking], broker: Any, relays: RelayLoop
    ) -> None:
        self.protocol = protocol
        self.broker = broker
        self.reactor = broker.reactor
        self.relays = relays

    @property
    def handshake_timeout(self) -> float:
        # Read at each connection, so a reload applies to new ones.
        return self.broker.config.tcp_handshake_timeout

    @property
    def idle_timeout(self) -> float:
        # Read at each join, so a reload applies to new relays.
        return self.broker.config.idle_timeout

    def buildProtocol(self, addr: Any) -> _Handshaking:
        return self.protocol(self)


class TcpService(MultiService):
    """tcpd: the TCP listener and the C{RUNDIR/tcp} control socket."""

    def __init__(self, broker: Any, listen: str) -> None:
        super().__init__()
        self.setName("tcpd")
        config = broker.config
        reactor = broker.reactor
        broker.transports[SCHEME] = TcpTransport(reactor)
        # tcpd's relays (inbound, and for upstream's control socket).
        self.relays = SocketRelays(reactor)
        limits = broker.limits_for("tcpd")

        def peer_key(transport: Any) -> str:
            config = broker.config  # read per connection: reloads apply
            return network_peer_key(
                transport.getPeer(), config.peer_prefix_ipv4, config.peer_prefix_ipv6
            )

        self.listener = listener = StreamServerEndpointService(
            LimitedEndpoint(serverFromString(reactor, listen), limits),
            LimitedFactory(
                _HandshakeFactory(TcpInbound, broker, self.relays),
                limits,
                peer_key,
                # Before any request: upstream's raw form, as for a silent peer.
                lambda reason: b"ne " + reason.encode(),
            ),
        )
        listener._raiseSynchronously = True
        listener.setServiceParent(self)
        limits = broker.limits_for(SCHEME)
        IPCService(
            SCHEME,
            LimitedFactory(
                _HandshakeFactory(TcpControl, broker, self.relays),
                limits,
                refusal=lambda reason: wire.encode(b"ne " + reason.encode()),
            ),
            config.rundir,
            reactor,
            limits=limits,
        ).setServiceParent(self)

    def startService(self) -> None:
        self.relays.start()
        super().startService()

    def stopService(self) -> Deferred[None]:
        stopped = super().stopService()
        self.relays.stop()  # closes the relayed connections
        return stopped

    def listening(self) -> Deferred[Any]:
        """Fires with the listening port once started (C{getHost()} for it)."""
        result: Deferred[Any] = Deferred()

        def passOn(port: Any) -> Any:
            result.callback(port)
            return port

        self.listener._waitingForPort.addCallback(passOn)
        return result
