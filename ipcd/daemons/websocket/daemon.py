"""
websocketd: libipc services over WebSockets (autobahn).

Inbound: a listener (an endpoint string: C{tcp:...}, or C{ssl:...} for
C{wss}) where C{ws://HOST:PORT/SERVICE} reaches local SERVICE through the
shared inbound path, one WebSocket message per libipc message
(L{ipcd.daemons.websocket.server}); a plain C{GET /} serves the websocketc page.

Outbound: C{ws://} and C{wss://} routes (L{ipcd.daemons.websocket.client}), and
for upstream's ipcd the control sockets C{RUNDIR/ws} and C{RUNDIR/wss}
(framed URI, framed C{ok}, then a byte relay to the joined socketpair).

L{websocketd} is its L{ipcd.daemons.IProtocolDaemon}, registered as a
Twisted plugin by C{twisted/plugins/ipcd_daemons.py}.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.plugin import IPlugin
from zope.interface import implementer

from ipcd import outlimits
from ipcd.checkers import Expected, non_negative_number, positive_int, positive_number
from ipcd.daemons import (
    IOutbound,
    IProtocolDaemon,
    ListeningDaemon,
    Setting,
    StartupError,
    listener_settings,
    settings_of,
)
from ipcd.daemons.listeners import DaemonService
from ipcd.daemons.websocket import SECTION
from ipcd.daemons.websocket.bridge import WebSocketSide
from ipcd.daemons.websocket.client import (
    WebSocketOutboundFactory,
    connect_websocket,
    trust_root,
)
from ipcd.daemons.websocket.limits import (
    DEFAULT_MAX_MESSAGE_FRAMES,
    DEFAULT_MESSAGE_TIMEOUT,
)
from ipcd.daemons.websocket.server import RETRY_AFTER, WebSocketInboundFactory
from ipcd.errors import Refused
from ipcd.host import IDaemonHost
from ipcd.listenerkeys import wrapped
from ipcd.reactors import IHostReactor
from ipcd.regularfile import NotAFile, TooLarge
from ipcd.relay import RelayStats
from ipcd.routes import RemoteURI

SCHEME = "ws"
SECURE_SCHEME = "wss"
DEFAULT_LISTEN = "tcp:8080:interface=127.0.0.1"
DEFAULT_PORTS = {SCHEME: 80, SECURE_SCHEME: 443}
# The connection limits ws:// and wss:// relays are counted in (L{outlimits}).
OUTBOUND = "websocket relays out"
DEFAULT_MAX_MESSAGE_SIZE = 1024 * 1024
# What a peer reads at the connection limit, before any request: busy, as
# a limit is in the handshake's answer.
BUSY = (
    f"HTTP/1.1 503 busy\r\nRetry-After: {RETRY_AFTER}\r\nContent-Length: 0\r\n\r\n"
).encode()


def _origins(value: Any) -> tuple[str, ...]:
    expected = "a list of origins like ['https://app.example.com'] (globs allowed)"
    if not isinstance(value, list) or not all(
        isinstance(o, str) and o.strip() for o in value
    ):
        raise Expected(expected)
    return tuple(o.strip() for o in value)


def _non_negative_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise Expected("a whole number, 0 or more (0: no limit)")
    return value


def _path(value: Any) -> str:
    if not isinstance(value, str):
        raise Expected("a file path (empty: the platform's trust roots)")
    return value


class WebSocketService(DaemonService):
    """websocketd: the WebSocket listener, C{RUNDIR/ws} and C{RUNDIR/wss}."""

    def __init__(
        self, daemon: Any, broker: IDaemonHost, settings: Mapping[str, Any]
    ) -> None:
        super().__init__(daemon, broker)
        # Relays for upstream's control sockets (raw sockets both sides).
        self.relays = self.socket_relays()
        listen = settings["listen"]
        # TLS on ssl: listeners, haproxy:ssl: ones too (autobahn's
        # isSecure: https for its origin check, wss in its URLs).
        self.factory = WebSocketInboundFactory(
            broker, self.settings, secure=wrapped(listen)[0] == "ssl"
        )
        self.listen_on(listen, self.factory, lambda reason: BUSY)
        # The listener stops accepting at max_connections, handshakes
        # included: autobahn's own 503 comes only with a whole head, so
        # peers that never finish theirs were held, up to [limits]
        # max_connections (1024) at once.
        broker.limits_for(self.daemon.section).service_maximum = lambda: (
            self.settings()["max_connections"]
        )
        for scheme in (SCHEME, SECURE_SCHEME):
            self.control(
                self.relays, scheme=scheme, timeout_key="open_handshake_timeout"
            )
        # ws:// and wss:// routes go through this service (not a test
        # double's, if set), which ends their bridges and dials when it
        # stops: they held their places in [limits] until each client
        # closed its end.
        self.outbound = OutboundHalf(self)
        for scheme in (SCHEME, SECURE_SCHEME):
            broker.transports.setdefault(scheme, self.outbound)

    def stopService(self) -> Deferred[None]:  # noqa: N802
        stopped = super().stopService()
        self.factory.peerLog.flush()
        self.outbound.stop()
        for bridge in list(self.factory.bridges):
            bridge.abortBridge()
        for connection in list(self.factory.connections):
            if connection.transport is not None:
                connection.transport.abortConnection()  # in its handshake
        return stopped


@implementer(IOutbound)
class OutboundHalf:
    """
    websocketd's ws:// and wss:// routes, with the bridges it holds for
    local clients and its dials towards them, which L{stop} ends.
    """

    scheme = SCHEME

    def __init__(self, service: WebSocketService) -> None:
        self.broker = service.broker
        self.bridges: set[WebSocketSide] = set()
        self.dials: set[WebSocketOutboundFactory] = set()
        self.stopped = False

    def connect(self, target: Any, client: Any) -> Deferred[socket.socket]:
        if self.stopped:
            return fail(Refused("websocketd has stopped"))
        return websocketd.connect_with(self.broker, target, client, self)

    def stop(self) -> None:
        """End every bridge (both ends: the client sees EOF) and dial."""
        self.stopped = True
        for factory in list(self.dials):
            factory.stop("websocketd stopped")
        for bridge in list(self.bridges):
            bridge.abortBridge()


@implementer(IPlugin, IProtocolDaemon)
class WebSocketDaemon(ListeningDaemon):
    """
    websocketd as a protocol daemon: C{ws://} and C{wss://} routes,
    C{[websocketd]}, C{--ws ENDPOINT}/C{--no-ws}, C{RUNDIR/ws}.
    """

    scheme = SCHEME
    also_schemes = (SECURE_SCHEME,)
    section = SECTION
    settings = (
        *listener_settings(SECTION, DEFAULT_LISTEN),
        Setting(
            "max_message_size",
            positive_int,
            DEFAULT_MAX_MESSAGE_SIZE,
            "bytes: the largest message either way",
        ),
        Setting(
            "max_message_frames",
            positive_int,
            DEFAULT_MAX_MESSAGE_FRAMES,
            "frames one message from the peer may have",
        ),
        Setting(
            "message_timeout",
            positive_number,
            DEFAULT_MESSAGE_TIMEOUT,
            "seconds a message from the peer may take to arrive whole",
        ),
        Setting("ping_interval", non_negative_number, 30.0, "seconds (0: no pings)"),
        Setting("ping_timeout", non_negative_number, 10.0, "seconds for the pong"),
        Setting("open_handshake_timeout", positive_number, 5.0, "seconds"),
        Setting("close_handshake_timeout", positive_number, 2.0, "seconds"),
        Setting("max_connections", _non_negative_int, 256, "at once (0: no limit)"),
        Setting(
            "allowed_origins", _origins, (), "browser origins besides websocketd's own"
        ),
        Setting(
            "ca", _path, "", "CA file for wss routes (empty: the platform's)", path=True
        ),
    )
    default_listen = DEFAULT_LISTEN
    service = WebSocketService

    def connect(
        self, broker: IDaemonHost, target: Any, client: Any
    ) -> Deferred[socket.socket]:
        return self.connect_with(broker, target, client, None)

    def connect_with(
        self,
        broker: IDaemonHost,
        target: Any,
        client: Any,
        half: OutboundHalf | None,
    ) -> Deferred[socket.socket]:
        """The outbound half, its bridges and dials kept in C{half}'s."""
        uri: RemoteURI = target.uri
        settings = settings_of(broker.config, self)
        stats = RelayStats.of(
            client, "out", target.service, str(uri), broker.relays, daemon=SECTION
        )
        try:
            # Counted from here until the bridge ends (its socketpair and
            # connection are held in ipcd), or the dial fails.
            release = outlimits.admit(broker, OUTBOUND, "websocket relays", client)
        except Refused as e:
            return fail(e)
        stats.on_end = release
        try:
            dialed = connect_websocket(
                broker.reactor,
                uri.scheme,
                uri.host,
                uri.port or DEFAULT_PORTS[uri.scheme],
                target.service,
                settings,
                settings["max_message_size"],
                broker.config.idle_timeout,
                stats,
                None if half is None else half.bridges,
                own_dials=broker.own_dials,
                dials=None if half is None else half.dials,
            )
        except Exception:
            release()  # whatever stopped it before it began
            return fail()
        return dialed.addErrback(outlimits.releasing(release))

    def status(self, settings: Mapping[str, Any]) -> Mapping[str, Any]:
        on = self.enabled(settings)
        return {"ws_listen": settings["listen"] if on else None}

    def verify(self, reactor: IHostReactor, settings: Mapping[str, Any]) -> None:
        super().verify(reactor, settings)
        if settings["ca"]:
            # Read at start too: a bad file is one line now, not a failure
            # at every wss:// lookup.
            try:
                trust_root(settings["ca"])
            except Exception as e:
                if isinstance(e, (NotAFile, TooLarge)):
                    why = str(e)
                else:
                    why = getattr(e, "strerror", None) or type(e).__name__
                raise StartupError(
                    f"[websocketd] ca: cannot read {settings['ca']} as a PEM "
                    f"certificate: {why} (fix it, or leave ca empty for the "
                    "system's roots)"
                ) from None


websocketd = WebSocketDaemon()
