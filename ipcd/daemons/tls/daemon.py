"""
tlsd: libipc services over TLS, with X.509 certificates or pre-shared keys.

Outbound (C{tls://HOST:PORT/SERVICE} routes): connect with TLS (PSK when an
identity is configured for the host, else certificates verified against the
trust roots with service_identity), send the raw service name, wait for the
raw C{ok}; then the client gets one end of a socketpair, and tlsd relays the
other end to the TLS connection (L{TransportRelays}).

Inbound: a TLS listener (only when keys or a certificate are configured)
reads the same request as tcpd's, asks the broker's inbound resolver with the
peer's labels (C{ip:}, and C{psk:IDENTITY} or C{cert:COMMON-NAME} and
C{cert-san:DNS-NAME}), answers C{ok} and relays.  C{RUNDIR/tls} speaks
upstream's control protocol, as C{RUNDIR/tcp} does.

L{tlsd} is tlsd's L{ipcd.daemons.IProtocolDaemon}, registered as a Twisted
plugin by C{twisted/plugins/ipcd_daemons.py}.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from service_identity import VerificationError
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from ipcd.checkers import Expected, boolean, positive_number
from ipcd.compat import twisted as compat_twisted
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
from ipcd.daemons.tcp import TcpInbound
from ipcd.daemons.tls import psk
from ipcd.daemons.tls.material import (
    VERSIONS,
    Material,
    MaterialError,
    ServerCreator,
    certificate_labels,
    client_creator,
    read_material,
    verify_error,
)
from ipcd.daemons.tls.relay import detach, socket_of
from ipcd.errors import Refused
from ipcd.handoff import adopt_into_reactor
from ipcd.host import IDaemonHost
from ipcd.identity import Peer
from ipcd.inbound import HandshakeFactory
from ipcd.inboundcore import MAX_HANDSHAKE, OK
from ipcd.logs import printable
from ipcd.reactors import IHostReactor
from ipcd.relay import (
    RelayProtocol,
    RelayStats,
    SocketRelays,
    TransportRelays,
    ended,
)
from ipcd.routes import RemoteURI

SCHEME = "tls"
SECTION = "tlsd"
DEFAULT_PORT = 9001
DEFAULT_LISTEN = "tcp:9001:interface=127.0.0.1"

log = Logger()


# TLS under a relay.


class _NoHalfClose(TLSMemoryBIOProtocol):
    """
    A TLS connection a relay cannot half-close: TLS has no half-close that
    Twisted's peer would keep (a close_notify ends the connection), and the
    wrapper would otherwise lend the relay its TCP transport's
    C{loseWriteConnection}, which would cut the TLS stream.
    """

    def __getattr__(self, name: str) -> Any:
        if name == "loseWriteConnection":
            raise AttributeError(name)
        return super().__getattr__(name)


class _TLSFactory(TLSMemoryBIOFactory):
    protocol = _NoHalfClose
    noisy = False


def tls_summary(connection: Any) -> dict[str, Any]:
    """Protocol version and cipher of a pyOpenSSL Connection."""
    return {
        "version": connection.get_protocol_version_name(),
        "cipher": connection.get_cipher_name(),
    }


@dataclass(eq=False)
class TlsRelayStats(RelayStats):
    """A relay's counters, with its TLS connection's version, cipher and peer."""

    tls: dict[str, Any] = field(default_factory=dict)

    def as_dict(self, now: float | None = None) -> dict[str, Any]:
        shown = super().as_dict(now)
        shown["tls"] = dict(self.tls)  # status --wide's DETAILS column
        return shown


class EagerRelayProtocol(RelayProtocol):
    """
    A relay side that sends what it passes on at once, in the same reactor
    turn, instead of when the reactor next finds the peer's socket
    writable: one turn less per hop, which is most of a small message's
    round trip through two hops of TLS.  Only a plain write is done here;
    anything else (an error, a close after the buffer) stays the reactor's.
    """

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        super().dataReceived(data)
        peer = self.peer
        if not self.started or peer is None:
            return
        connection = socket_of(peer.transport)
        if (
            connection is not None
            and connection.connected
            and not connection.disconnecting
            and compat_twisted.writes_waiting(connection)
        ):
            connection.doWrite()


def _relay_over(
    state: TlsState,
    tls: TLSMemoryBIOProtocol,
    sock: socket.socket,
    stats: RelayStats,
    tls_is_a: bool,
    greeting: bytes = b"",
    early: bytes = b"",
    idle_timeout: float = 0.0,
) -> None:
    """
    Relay TLS connection C{tls} and the connected socket C{sock} (closed
    here): on their raw sockets (L{SocketRelays}, with a TLS codec) when
    the TLS connection can leave Twisted, else through Twisted's transports.

    The switch waits for the reactor's next turn: this is called from
    within Twisted's TLS, which goes on reading its memory BIO when this
    returns.  Meanwhile the TCP socket is not read, and what Twisted's TLS
    still delivers is held, for the plain side first.
    """
    tcp = socket_of(tls.transport)
    if tcp is None or not state.socket_relay():
        _relay_in_twisted(
            state, tls, sock, stats, tls_is_a, greeting, early, idle_timeout
        )
        return
    tcp.stopReading()
    held = _Held()
    tls.wrappedProtocol = held

    def switch() -> None:
        if held.lost:
            sock.close()
            ended(stats)
            return
        data = b"".join(held.data)
        ahead, behind = (
            (greeting, early + data) if tls_is_a else (greeting + data, early)
        )
        secured = detach(tls)
        if isinstance(secured, str):
            log.info("relaying through Twisted's TLS: {why}", why=secured)
            tcp.startReading()
            _relay_in_twisted(
                state, tls, sock, stats, tls_is_a, ahead, behind, idle_timeout
            )
            return
        # It still counts against its listener's limits until the relay ends.
        release = getattr(tls.transport, "handOff", lambda: None)()
        stats.on_end = _both(stats.on_end, release)
        ends = (secured, sock) if tls_is_a else (sock, secured)
        state.socket_relays.join(
            *ends, stats, greeting=ahead, early=behind, idle_timeout=idle_timeout
        )

    state.broker.reactor.callLater(0, switch)


class _Held(Protocol):
    """What Twisted's TLS delivers while a relay switches to raw sockets."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.lost = False

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        self.data.append(data)

    def connectionLost(self, reason: Failure | None = None) -> None:  # noqa: N802
        self.lost = True


def _relay_in_twisted(
    state: TlsState,
    tls: TLSMemoryBIOProtocol,
    sock: socket.socket,
    stats: RelayStats,
    tls_is_a: bool,
    greeting: bytes,
    early: bytes,
    idle_timeout: float,
) -> None:
    """
    Relay C{tls} and C{sock} through Twisted's transports: the TLS
    connection's application protocol replaced, C{sock} adopted.
    """
    over_tls, over_sock = EagerRelayProtocol(), EagerRelayProtocol()
    a, b = (over_tls, over_sock) if tls_is_a else (over_sock, over_tls)
    state.relays.join(
        a, b, stats, greeting=greeting, early=early, idle_timeout=idle_timeout
    )
    tls.wrappedProtocol = over_tls
    over_tls.makeConnection(tls)
    try:
        adopt_into_reactor(
            state.broker.reactor, sock.detach(), Factory.forProtocol(lambda: over_sock)
        )
    except Exception:
        log.failure("cannot adopt a relayed socket")
        over_tls.abort()


def _both(first: Any, then: Any) -> Any:
    """One callable for two optional ones."""
    if first is None or then is None:
        return first or then

    def both() -> None:
        first()
        then()

    return both


# Inbound.


@implementer(IHandshakeListener)
class TlsInbound(TcpInbound):
    """A remote peer on tlsd's listener: TLS first, then tcpd's request."""

    route = "tls inbound"
    layer = "TLS"
    stats_type = TlsRelayStats

    def handshakeCompleted(self) -> None:  # noqa: N802 (Twisted's name)
        connection = self.transport.getHandle()
        who = self.who
        labels = set(who.labels)
        identity = psk.psk_identity(connection)
        shown = ""
        if identity is not None:
            labels.add(f"psk:{identity}")
            shown = f"psk:{identity}"
        else:
            certificate = connection.get_peer_certificate()
            if certificate is not None:
                found = certificate_labels(certificate.to_cryptography())
                labels.update(found)
                shown = found[0] if found else "certificate"
        self.tls = {**tls_summary(connection), "peer": shown or None}
        described = f"{who.description} ({shown})" if shown else who.description
        self.act(self.core.secured(Peer(described, frozenset(labels))))
        if not shown and self.factory.must_authenticate():
            self.factory.failed(
                "refused, no client certificate or key",
                "refusing {who}: no client certificate or key",
                who=str(self.who),
            )
            self.act(self.core.refuse("client authentication required"))

    def relay(
        self, sock: socket.socket, stats: RelayStats, greeting: bytes, early: bytes
    ) -> None:
        if isinstance(stats, TlsRelayStats):
            stats.tls = self.tls
        # The connection stays in its transport (and under its listener's
        # limits until it closes): only its application protocol changes.
        _relay_over(
            self.factory.state,
            self.transport,
            sock,
            stats,
            tls_is_a=True,
            greeting=greeting,
            early=early,
            idle_timeout=self.factory.idle_timeout,
        )

    def connectionLost(self, reason: Failure | None = None) -> None:  # noqa: N802
        # (A TLS handshake that timed out is said already.)
        if self.core.securing and reason is not None:
            identity = None
            handle = compat_twisted.tls_connection(self.transport)
            if handle is not None:
                identity = psk.offered_identity(handle)
            said = f" (PSK identity {identity!r})" if identity else ""
            why = _why(reason)
            if identity and any(word in why for word in _WRONG_KEY):
                # (An unknown identity is logged as such when offered.)
                why = f"wrong key for PSK identity {identity!r} ({why})"
            self.factory.failed(
                "TLS handshakes failed",
                "TLS handshake with {who}{said} failed: {why}",
                who=str(self.who),
                said=said,
                why=why,
            )
        super().connectionLost(reason)


# What OpenSSL says when a PSK's key differs between the peers: the TLS 1.3
# binder, or TLS 1.2's first encrypted record, does not check out.
_WRONG_KEY = ("binder does not verify", "decrypt", "bad record mac")


def _why(reason: Failure) -> str:
    value = reason.value
    if isinstance(value, VerificationError):
        return "the certificate is not for this host name"
    args = getattr(value, "args", ())
    if args and isinstance(args[0], list) and args[0]:
        return "; ".join(str(e[-1]) for e in args[0] if isinstance(e, tuple))
    return printable(str(value) or type(value).__name__)


class TlsHandshakeFactory(HandshakeFactory):
    """
    tlsd's listener's L{HandshakeFactory}: must clients prove who they are?
    Its failed handshakes are counted and logged at a bounded rate
    (L{HandshakeFactory.failed}): a peer can fail them as fast as it can
    connect.
    """

    def must_authenticate(self) -> bool:
        return self.material().verify_clients

    # tlsd's state, set by the service that builds this factory.
    state: TlsState

    def material(self) -> Material:
        return self.state.material()


# Per service: the material (read again after a reload) and the relay engines.


class TlsState:
    """
    tlsd's state, owned by its service (L{TlsService}): its files as read,
    its relays (started and stopped with the service).
    """

    def __init__(self, broker: IDaemonHost) -> None:
        self.broker = broker
        self.relays = TransportRelays(broker.reactor)
        self.socket_relays = SocketRelays(broker.reactor)
        self._config: Any = None
        self._material: Material | None = None
        self._server: ServerCreator | None = None

    def material(self) -> Material:
        """The files as of the current configuration (a reload reads them again)."""
        config = self.broker.config
        if config is not self._config or self._material is None:
            try:
                material = read_material(settings_of(config, tlsd))
            except MaterialError as e:
                if self._material is None:
                    raise
                log.error("tlsd: keeping the previous keys and certificates: {e}", e=e)
            else:
                self._material, self._server = material, None
            self._config = config
        assert self._material is not None
        return self._material

    def socket_relay(self) -> bool:
        """Relay on the raw sockets after the handshake (C{[tlsd] socket_relay})?"""
        return bool(settings_of(self.broker.config, tlsd)["socket_relay"])

    def server_creator(self) -> ServerCreator:
        material = self.material()
        if self._server is None:
            self._server = ServerCreator(material.server_context())
        return self._server


@implementer(IOpenSSLServerConnectionCreator)
class _CurrentServer:
    """The listener's creator: the current one (a reload applies to new peers)."""

    def __init__(self, state: TlsState) -> None:
        self.state = state

    def serverConnectionForTLS(self, protocol: Any) -> Any:  # noqa: N802
        return self.state.server_creator().serverConnectionForTLS(protocol)


# Outbound.


@implementer(IHandshakeListener)
class TlsDialer(Protocol):
    """
    The client side of a route, inside TLS: sends the raw service name and
    fires C{done} with the rest of the stream after the raw C{ok}, or fails
    it with L{Refused}.
    """

    def __init__(self, service: str, where: str, done: Deferred[Any]) -> None:
        self.service = service
        self.where = where
        self.done = done
        self.buffer = b""
        self.tls: dict[str, Any] = {}
        self.handshook = False
        # The PSK identity this route presents, if it presents one.
        self.psk_identity: str | None = None

    def connectionMade(self) -> None:  # noqa: N802
        # Small messages go out at once (as tcpd's inbound side does it).
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        self.transport.write(self.service.encode("ascii"))  # sent after the handshake

    def handshakeCompleted(self) -> None:  # noqa: N802
        self.handshook = True
        self.tls = tls_summary(self.transport.getHandle())

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.done.called:
            return
        self.buffer += data
        if len(self.buffer) < len(OK):
            return
        if self.buffer[: len(OK)] == OK:
            rest, self.buffer = self.buffer[len(OK) :], b""
            self.done.callback((self, rest))
        elif self.buffer[:2] != b"ne" or len(self.buffer) > MAX_HANDSHAKE:
            self._fail("it did not answer ok (not a tlsd?)")

    def _fail(self, reason: str) -> None:
        self.done.errback(
            Refused(f"tlsd at {self.where} refused {self.service!r}: {reason}")
        )
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:  # noqa: N802
        if self.done.called:
            return
        if self.buffer.startswith(b"ne"):
            detail = printable(
                self.buffer[2:].removeprefix(b" ").decode("utf-8", "replace")
            )
            self._fail(detail)
        elif not self.handshook:
            why = _why(reason) if reason is not None else "closed"
            handle = compat_twisted.tls_connection(self.transport)
            unverified = verify_error(handle) if handle is not None else None
            if unverified is not None and self.psk_identity:
                why = (
                    f"{why} (it answered with a certificate: it takes no "
                    f"pre-shared keys, and this route presents PSK identity "
                    f"{self.psk_identity!r} and accepts no certificate)"
                )
            elif unverified is not None:
                why = f"{why} ({unverified})"
            elif "decrypt error" in why:
                # The far tlsd tells a wrong key from an unknown identity in
                # its own log only.
                why = (
                    f"{why} (its tlsd did not accept our pre-shared key: a wrong "
                    "key, or an identity it does not know; its log says which)"
                )
            self.done.errback(Refused(f"TLS handshake with {self.where} failed: {why}"))
        else:
            self.done.errback(
                Refused(
                    f"tlsd at {self.where} closed the connection for {self.service!r}"
                )
            )


def dial(
    broker: IDaemonHost, material: Material, host: str, port: int, service: str
) -> Deferred[tuple[TlsDialer, bytes]]:
    """
    Open a TLS connection to the tlsd at C{host:port}, ask for C{service};
    fires with the dialer (its transport: the TLS connection) and the bytes
    after C{ok}.  Cancelling it closes the connection.
    """
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    connecting: Deferred[Any] | None = None
    dialer: TlsDialer | None = None

    def cancel(_: Any) -> None:
        if connecting is not None and not connecting.called:
            connecting.cancel()
        elif dialer is not None and dialer.transport is not None:
            dialer.transport.abortConnection()

    done: Deferred[tuple[TlsDialer, bytes]] = Deferred(cancel)

    def build() -> TlsDialer:
        nonlocal dialer
        dialer = TlsDialer(service, where, done)
        dialer.psk_identity = material.identity_for(host) or None
        return dialer

    def failed(failure: Failure) -> None:
        if failure.check(CancelledError) or done.called:
            return
        reason = getattr(failure.value, "strerror", None) or _why(failure)
        done.errback(Refused(f"cannot connect to tlsd at {where}: {reason}"))

    try:
        creator = client_creator(material, host)
    except Exception as e:  # a host name service_identity cannot check
        return _refused(f"cannot speak TLS to {host!r}: {e}")
    dialing = Factory.forProtocol(build)
    dialing.noisy = False  # no "Starting factory" line per route
    factory = _TLSFactory(creator, True, dialing)
    endpoint = HostnameEndpoint(broker.reactor, host, port)
    connecting = endpoint.connect(factory)
    connecting.addErrback(failed)
    return done


def _refused(reason: str) -> Deferred[Any]:
    failed: Deferred[Any] = Deferred()
    failed.errback(Refused(reason))
    return failed


# The service: listener and control socket.


class TlsService(DaemonService):
    """
    tlsd: the TLS listener (when it can serve), C{RUNDIR/tls}, and the
    state its outbound half shares (L{TlsOutbound}, the broker's for tls).
    """

    def __init__(
        self, daemon: Any, broker: IDaemonHost, settings: Mapping[str, Any]
    ) -> None:
        super().__init__(daemon, broker)
        self.state = state = TlsState(broker)
        self.relays = self.engine(state.relays)
        self.engine(state.socket_relays)
        # For upstream's control socket: raw sockets both sides.
        self.control_relays = self.engine(SocketRelays(broker.reactor))
        if state.material().serves:
            inbound = self.handshakes(
                self.relays, TlsInbound, factory=TlsHandshakeFactory
            )
            inbound.state = state
            # Over the limits: closed before TLS, with nothing to say.
            self.listen_on(
                settings["listen"], _TLSFactory(_CurrentServer(state), False, inbound)
            )
        self.control(self.control_relays)
        # tls:// routes go through this state (not a test double's, if set).
        broker.transports.setdefault(SCHEME, TlsOutbound(state))


@implementer(IOutbound)
class TlsOutbound:
    """tlsd's outbound half with its service's state."""

    scheme = SCHEME

    def __init__(self, state: TlsState) -> None:
        self.state = state

    def connect(self, target: Any, client: Any) -> Deferred[socket.socket]:
        return tlsd.connect_with(self.state, target, client)


# Settings.


def _path(value: Any) -> str:
    if not isinstance(value, str):
        raise Expected("a file name (a string; empty for none)")
    return value


def _version(value: Any) -> str:
    if value not in VERSIONS:
        raise Expected(f"one of {', '.join(repr(v) for v in VERSIONS)}")
    return value


def _identity(value: Any) -> str:
    if not isinstance(value, str) or (value and not value.isprintable()):
        raise Expected("a PSK identity (a string; empty for none)")
    return value


def _identities(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in value.items()
    ):
        raise Expected("a table of host names to PSK identities")
    return dict(value)


@implementer(IPlugin, IProtocolDaemon)
class TlsDaemon(ListeningDaemon):
    """
    tlsd as a protocol daemon: C{tls://} routes, C{[tlsd]}, C{--tls
    ENDPOINT}/C{--no-tls}, C{RUNDIR/tls}.
    """

    scheme = SCHEME
    section = SECTION
    settings = (
        *listener_settings(SECTION, DEFAULT_LISTEN),
        Setting("certificate", _path, "", "PEM certificate (and chain)", path=True),
        Setting("key", _path, "", "PEM private key of the certificate", path=True),
        Setting(
            "trust_roots", _path, "", "PEM CA certificates (default: system)", path=True
        ),
        Setting("verify_clients", boolean, False, "clients need a certificate or key"),
        Setting("psk_file", _path, "", "IDENTITY:HEXKEY lines, mode 0600", path=True),
        Setting("psk_identity", _identity, "", "identity to present to any host"),
        Setting("psk_hosts", _identities, {}, "identity to present, by host"),
        Setting("min_version", _version, "1.2", "lowest TLS version"),
        Setting("max_version", _version, "1.3", "highest TLS version"),
        Setting("handshake_timeout", positive_number, 5.0, "seconds"),
        Setting(
            "socket_relay",
            boolean,
            True,
            "after the handshake, OpenSSL on the raw socket (else Twisted's TLS)",
        ),
    )
    flag = SCHEME
    default_listen = DEFAULT_LISTEN
    service = TlsService

    def connect(
        self, broker: IDaemonHost, target: Any, client: Any
    ) -> Deferred[socket.socket]:
        # Reached when no TlsService made the broker its TlsOutbound.
        return _refused(f"{SECTION} has no service on this broker")

    def connect_with(
        self, state: TlsState, target: Any, client: Any
    ) -> Deferred[socket.socket]:
        """The outbound half, with the state of tlsd's service."""
        broker = state.broker
        uri: RemoteURI = target.uri
        port = uri.port or DEFAULT_PORT
        try:
            material = state.material()
        except MaterialError as e:
            return _refused(str(e))
        dialed = dial(broker, material, uri.host, port, target.service)

        def joined(result: tuple[TlsDialer, bytes]) -> socket.socket:
            dialer, rest = result
            ours, theirs = socket.socketpair()
            stats = TlsRelayStats.of(
                client,
                "out",
                target.service,
                uri.text,
                broker.relays,
                tls={**dialer.tls, "peer": _server_identity(material, uri.host)},
            )
            _relay_over(
                state,
                dialer.transport,
                ours,
                stats,
                tls_is_a=False,
                greeting=rest,
                idle_timeout=broker.config.idle_timeout,
            )
            return theirs

        return dialed.addCallback(joined)

    def status(self, settings: Mapping[str, Any]) -> Mapping[str, Any]:
        serves = self.enabled(settings) and bool(
            settings["psk_file"] or settings["certificate"]
        )
        return {
            "tls_listen": settings["listen"] if serves else None,
            "tls_min_version": settings["min_version"],
            "tls_psk": bool(settings["psk_file"]),
            "tls_certificate": settings["certificate"] or None,
        }

    def verify(self, reactor: IHostReactor, settings: Mapping[str, Any]) -> None:
        try:
            material = read_material(settings)
        except MaterialError as e:
            raise StartupError(f"{e} (fix it, or use --no-tls)") from None
        if material.serves:
            super().verify(reactor, settings)


def _server_identity(material: Material, host: str) -> str:
    identity = material.identity_for(host)
    return f"psk:{identity}" if identity else f"cert-san:{host}"


tlsd = TlsDaemon()
