"""
websocketd's listener: C{ws://HOST:PORT/SERVICE} reaches local SERVICE.

The opening handshake asks the broker's inbound resolver for SERVICE on the
peer's behalf (redirections, the C{in} policy with the peer's C{ip:} label,
admin routes; never a host the peer names); a refusal fails the handshake
with an HTTP status and the reason.  A plain C{GET /} (no upgrade) serves
the websocketc page; any other plain request is a 404.

The origin check is websocketd's, not autobahn's: with no allowed origins
configured, a browser page may connect only from websocketd's own origin
(the page it serves), and clients that send no C{Origin} (not browsers)
are not concerned.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime, ISSLTransport
from twisted.logger import Logger, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from ipcd import inboundcore as core
from ipcd.compat import autobahn as compat_autobahn
from ipcd.daemons.websocket import SECTION
from ipcd.daemons.websocket.bridge import WebSocketSide
from ipcd.daemons.websocket.factories import (
    ReactorTimer,
    bridge_options,
    message_bounds,
    no_delay,
    tls_failure,
)
from ipcd.daemons.websocket.page import page_response
from ipcd.errors import BUSY, NO_SUCH_SERVICE, REFUSED, UNAVAILABLE
from ipcd.host import IDaemonHost
from ipcd.identity import listener_peer
from ipcd.limits import REFUSAL_GRACE, RateLimitedObserver
from ipcd.logs import printable
from ipcd.proxied import shown_peer
from ipcd.relay import RelayStats
from ipcd.startup import address_text

NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

# The HTTP status of each word a remote peer is told (L{ipcd.errors}): what
# may come back later (unavailable, busy) is 503, which clients and proxies
# take for "try again", not 403, which says "never".
STATUS = {REFUSED: 403, NO_SUCH_SERVICE: 404, UNAVAILABLE: 503, BUSY: 503}
# Seconds a busy peer is told to wait (Retry-After): a limit frees as soon
# as a connection ends, so a hint against retrying at once, not a promise.
RETRY_AFTER = 1
RETRY_HEADERS = [("Retry-After", str(RETRY_AFTER))]


def _address_host(host: str) -> bool:
    """Whether a C{Host} header names an IP address or C{localhost}."""
    try:
        name = urlsplit(f"//{host}").hostname or ""
    except ValueError:
        return False
    if name == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def origin_allowed(origin: str, host: str, allowed: Sequence[str]) -> bool:
    """
    Whether a browser page from C{origin} (its C{Origin} header) may connect,
    the request's C{Host} being C{host}: its own origin when websocketd is
    reached by address (or C{localhost}); others, and its own under a DNS
    name, only when they match one of C{allowed} (exact origins, or globs
    like C{https://*.example.com}).  A C{null} origin only when listed.

    A DNS name is not enough for "its own": a page whose name an attacker
    re-points at this host (DNS rebinding) has the same origin as the host.
    """
    origin, host = origin.strip().lower(), host.strip().lower()
    if origin != "null" and _address_host(host):
        parts = urlsplit(origin)
        if parts.scheme in ("http", "https") and parts.netloc == host:
            return True
    return any(fnmatchcase(origin, pattern.lower()) for pattern in allowed)


class PeerLog:
    """
    autobahn's log for the connections of one listener: its debug lines
    dropped (as txaio drops them at its default level), the others (two for
    each refused handshake or failed connection) at a bounded rate, as
    C{[limits]} refusals are: so many peers cannot fill the disk.
    """

    def __init__(
        self, clock: IReactorTime, observer: Any = None, counters: Any = None
    ) -> None:
        self._rate_limited = RateLimitedObserver(
            observer or globalLogPublisher, clock, counters=counters
        )
        logger = Logger(namespace="ipcd.websocketd", observer=self._rate_limited)
        self.info, self.warn, self.error = logger.info, logger.warn, logger.error
        self.failure = logger.failure  # websocketd's own: a request that broke

    def flush(self) -> None:
        """Say now what was left out (the listener stops)."""
        self._rate_limited.flush()

    def debug(self, *args: Any, **kwargs: Any) -> None:
        pass


def _status_reason(reason: str) -> str:
    """A refusal's reason as it can go on an HTTP status line."""
    return " ".join(printable(reason).split())[:200]


class UpgradeAnswers:
    """
    websocketd's framing of the answers (a L{Framing}): autobahn answers
    the upgrade; a refusal is an HTTP status with what a remote peer is
    told (L{STATUS}: 403 refused, 404 no such service, 503 unavailable or
    busy; 500 for ipcd's fault, else 403).
    """

    def parse(self, buffer: bytes) -> tuple[bytes, bytes] | None:
        return buffer, b""  # autobahn reads the request

    def ok(self) -> None:
        return None

    def no(self, reason: str, internal: bool = False) -> ConnectionDeny:
        if internal:
            return ConnectionDeny(500, reason)
        return ConnectionDeny(STATUS.get(reason, 403), _status_reason(reason))


class WebSocketInbound(WebSocketSide, WebSocketServerProtocol):
    """A remote peer asking for a local service over a WebSocket."""

    factory: WebSocketInboundFactory
    _socket: socket.socket | None = None
    _pending: Deferred[Any] | None = None
    _core: core.InboundHandshake | None = None
    _asking: Deferred[Any]
    _opened = False
    _addressed: Any  # the transport as given, for the peer's address
    _connected: Any  # its address at connect (a proxy's, before its header)

    def makeConnection(self, transport: Any) -> None:  # noqa: N802
        # The peer is who the transport as given says: under haproxy:ssl:,
        # the PROXY header's address, which only the wrapper between it and
        # TLS knows (the TLS transport's is the proxy's).
        self._addressed = transport
        self._connected = transport.getPeer()
        # autobahn reads TLS details off the TLS transport itself, not off
        # a wrapper that only says it is one (the connection limits').
        while ISSLTransport.providedBy(transport) and not isinstance(
            transport, TLSMemoryBIOProtocol
        ):
            transport = transport.transport
        super().makeConnection(transport)

    def connectionMade(self) -> None:  # noqa: N802
        super().connectionMade()
        self.factory.connections.add(self)
        no_delay(self.transport)

    def onConnect(self, request: ConnectionRequest) -> Deferred[Any]:  # noqa: N802
        # autobahn answers any other exception "500 Internal server error:"
        # with its text, to the peer: ipcd's trouble is logged, and the
        # peer told the public word only.
        return maybeDeferred(self._connect, request).addErrback(self._internal)

    def _internal(self, failure: Failure) -> Any:
        if failure.check(ConnectionDeny):
            return failure
        core = self._core
        self.factory.peerLog.failure(
            "websocketd: request from {who} failed",
            failure,
            who=str(core.who) if core else shown_peer(self._connected),
        )
        raise ConnectionDeny(ConnectionDeny.INTERNAL_SERVER_ERROR, UNAVAILABLE)

    def _connect(self, request: ConnectionRequest) -> Deferred[Any]:
        settings = self.factory.settings()
        origin = request.origin
        headers = request.headers
        browser = origin or "origin" in headers or "sec-websocket-origin" in headers
        if browser and not origin_allowed(
            origin, request.headers.get("host", ""), settings["allowed_origins"]
        ):
            raise ConnectionDeny(403, f"origin {_status_reason(origin)} not allowed")
        address = self._addressed.getPeer()
        if not hasattr(address, "host"):  # a header's UNIX socket: the proxy
            address = self._connected
        # (On a UNIX listener, the proxy's uid: ipcd.identity.listener_peer.)
        peer = listener_peer(address, self._addressed)
        self._core = handshake = core.InboundHandshake(peer, UpgradeAnswers())
        self.act(handshake.asked(request.path.removeprefix("/")))
        return self._asking  # autobahn's answer: its result, or a denial

    def act(self, actions: list[Any]) -> None:
        """Do what the core says, in autobahn's opening handshake."""
        for action in actions:
            kind = type(action)
            if kind is core.Ask:
                who = self._core.who
                d = self.factory.broker.open_inbound(action.text, who)
                self._pending = self._asking = d
                d.addBoth(self._answered)
            elif kind is core.Join:
                self._socket = action.sock
            elif kind is core.Refuse:
                raise action.answer
            elif kind is core.Cancel and self._pending is not None:
                self._pending.cancel()
            elif kind is core.Discard:
                action.sock.close()
                raise ConnectionDeny(410, "gone")
            elif kind is core.Unexpected:
                # A peer's request (fds run out, say): at the peers' rate.
                self.factory.peerLog.failure(
                    "websocketd: request from {who} failed",
                    action.error,
                    who=str(self._core.who),
                )

    def _answered(self, result: socket.socket | Failure) -> None:
        self._pending = None
        self.act(self._core.answered(result))
        if isinstance(result, Failure):  # the core said nothing: it went
            raise ConnectionDeny(410, "gone")

    def onOpen(self) -> None:  # noqa: N802
        self._opened = True
        sock, self._socket = self._socket, None
        if sock is None:  # cannot happen: onConnect succeeded
            self.dropConnection(abort=True)
            return
        factory = self.factory
        handshake, self._core = self._core, None  # done: not kept per relay
        stats = RelayStats.of(
            handshake.who,
            "in",
            handshake.requested,
            "websocket inbound",
            factory.broker.relays,
            daemon=SECTION,
        )
        why = self.joinSocket(
            factory.reactor,
            sock,
            factory.settings()["max_message_size"],
            factory.broker.config.idle_timeout,
            stats,
            factory.bridges,
        )
        if why is not None:  # ipcd's trouble (no descriptor left), not the peer's
            factory.peerLog.error(
                "websocketd: request from {who} failed: {why}",
                who=str(handshake.who),
                why=why,
            )

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:  # noqa: N802, N803
        self.webSocketLost(wasClean)

    def closeGrace(self) -> float:  # noqa: N802
        # A refusal or the page (before it opened): a refused peer's grace.
        return super().closeGrace() if self._opened else REFUSAL_GRACE

    def failHandshake(  # noqa: N802 (autobahn's name)
        self,
        reason: str,
        code: int = 400,
        responseHeaders: Any = None,  # noqa: N803
    ) -> None:
        # A denial raised in onConnect comes here without headers: a busy
        # peer is told when to try again.
        if (code, reason) == (STATUS[BUSY], BUSY) and responseHeaders is None:
            responseHeaders = RETRY_HEADERS
        super().failHandshake(reason, code, responseHeaders)

    def headTooLarge(self, reason: str) -> None:  # noqa: N802
        self.failHandshake(
            "Request Header Fields Too Large",
            431,
            [("Content-Length", "0"), ("Connection", "close")],
        )

    def connectionLost(self, reason: Failure | None = None) -> None:  # noqa: N802
        why, reason = tls_failure(reason)
        if why is not None:
            self.factory.broker.counters[f"{SECTION}: TLS handshakes failed"] += 1
            # A peer's doing: at the peers' bounded rate, as refusals are.
            self.factory.peerLog.info(
                "websocketd: TLS handshake with {peer} failed: {why}",
                peer=printable(address_text(self.transport.getPeer())),
                why=why,
            )
        self.factory.connections.discard(self)
        if self._core is not None:
            self.act(self._core.lost())
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        super().connectionLost(reason)  # type: ignore[arg-type]
        self.cancelTimers()

    # Plain HTTP (no upgrade): autobahn's status page and ?redirect= are
    # replaced by the websocketc page at / and a 404 elsewhere.

    def sendServerStatus(self, redirectUrl: Any = None, redirectAfter: int = 0) -> None:  # noqa: N802, N803
        if self.http_request_path == "/":
            self.sendData(page_response())
        else:
            self.sendData(NOT_FOUND)
        # A plain HTTP exchange, answered: autobahn's close that follows is
        # no unclean WebSocket close to warn of, once per page view.
        self.wasClean = True

    def sendRedirect(self, url: str) -> None:  # noqa: N802
        self.sendServerStatus()


class WebSocketInboundFactory(WebSocketServerFactory):
    """
    Builds L{WebSocketInbound}s for one listener.  C{settings} gives
    websocketd's section as it is now (read per connection, so a reload
    applies to new ones).
    """

    protocol = WebSocketInbound
    noisy = False
    log = Logger()

    def __init__(
        self,
        broker: IDaemonHost,
        settings: Callable[[], Mapping[str, Any]],
        secure: bool = False,
    ) -> None:
        super().__init__(server="ipcd-websocketd")
        self.broker = broker
        self.reactor = broker.reactor
        self.settings = settings
        self.isSecure = secure
        compat_autobahn.use_timers(self, ReactorTimer(self.reactor))
        self.bridges: set[WebSocketSide] = set()
        # Every live connection, bridged or still in its opening handshake.
        self.connections: set[WebSocketInbound] = set()
        self.peerLog = PeerLog(self.reactor, counters=broker.counters)
        self.apply(settings())

    def apply(self, settings: Mapping[str, Any]) -> None:
        """autobahn's options from websocketd's settings, and websocketd's bounds."""
        self.bounds = message_bounds(settings)
        self.setProtocolOptions(
            **bridge_options(settings),
            maxConnections=settings["max_connections"],
            # websocketd checks origins itself (see origin_allowed).
            allowedOrigins=["*"],
            allowNullOrigin=True,
            webStatus=True,
            # A protocol error or an oversized message closes with a code.
            failByDrop=False,
            # No compression: messages are bounded as they come, and
            # compressed ones would not be (and CRIME/BREACH).
            perMessageCompressionAccept=lambda offers: None,
        )

    def buildProtocol(self, addr: Any) -> WebSocketInbound:  # noqa: N802
        # A reload's settings apply to new connections.
        self.apply(self.settings())
        protocol = super().buildProtocol(addr)
        protocol.log = self.peerLog  # type: ignore[assignment]
        return protocol
