"""
tlsd, libipc services over TLS: its state, service, settings and plug-in.

Outbound (C{tls://HOST:PORT/SERVICE} routes, L{ipcd.daemons.tls.dialer}):
connect with TLS (PSK when an identity is configured for the host, else
certificates verified against the trust roots with service_identity), send
the raw service name, wait for the raw C{ok}; then the client gets one end of
a socketpair, and tlsd relays the other end to the TLS connection
(L{ipcd.daemons.tls.handover}).

Inbound (L{ipcd.daemons.tls.inbound}): a TLS listener (only when keys or a
certificate are configured) reads the same request as tcpd's, asks the
broker's inbound resolver with the peer's labels (C{ip:}, and
C{psk:IDENTITY} or C{cert:COMMON-NAME} and C{cert-san:DNS-NAME}), answers
C{ok} and relays.  C{RUNDIR/tls} speaks upstream's control protocol, as
C{RUNDIR/tcp} does.

L{tlsd} is tlsd's L{ipcd.daemons.IProtocolDaemon}, registered as a Twisted
plugin by C{twisted/plugins/ipcd_daemons.py}.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from ipcd import outlimits
from ipcd.checkers import Expected, boolean, not_tls, positive_number
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
from ipcd.daemons.tls.dialer import TlsDialer, dial, refused
from ipcd.daemons.tls.handover import TlsRelayStats, relay_over
from ipcd.daemons.tls.inbound import TlsHandshakeFactory, TlsInbound
from ipcd.daemons.tls.kswitch import kernel_tls_here
from ipcd.daemons.tls.material import (
    VERSIONS,
    Material,
    MaterialError,
    ServerCreator,
    read_material,
)
from ipcd.errors import Refused
from ipcd.host import IDaemonHost
from ipcd.reactors import IHostReactor
from ipcd.relay import SocketRelays, TransportRelays
from ipcd.routes import RemoteURI
from ipcd.sockets import unzoned
from ipcd.tlsfactory import TLSFactory

SCHEME = "tls"
SECTION = "tlsd"
DEFAULT_PORT = 9001
DEFAULT_LISTEN = "tcp:9001:interface=127.0.0.1"
# The connection limits tls:// relays are counted in (L{outlimits}).
OUTBOUND = "tls relays out"

log = Logger()


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
        # Why the files of the configuration in force could not be used (the
        # previous keys kept), for the reload's answer; None: they are used.
        self.kept: str | None = None

    def material(self) -> Material:
        """The files as of the current configuration (a reload reads them again)."""
        config = self.broker.config
        if config is not self._config or self._material is None:
            try:
                material = read_material(settings_of(config, tlsd))
            except MaterialError as e:
                if self._material is None:
                    raise
                self.kept = f"tlsd: keeping the previous keys and certificates: {e}"
                log.error("{kept}", kept=self.kept)
            else:
                self._material, self._server = material, None
                self.kept = None
            self._config = config
        assert self._material is not None
        return self._material

    def socket_relay(self) -> bool:
        """Relay on the raw sockets after the handshake (C{[tlsd] socket_relay})?"""
        return bool(settings_of(self.broker.config, tlsd)["socket_relay"])

    def kernel_tls(self) -> bool:
        """
        After the handshake, kernel TLS where it can be (C{[tlsd] kernel_tls},
        on the raw sockets' relay): this kernel has it, and this pyOpenSSL
        lets connections be watched for it.
        """
        return (
            self.socket_relay()
            and bool(settings_of(self.broker.config, tlsd)["kernel_tls"])
            and kernel_tls_here()
        )

    def server_creator(self) -> ServerCreator:
        material = self.material()
        if self._server is None:
            self._server = ServerCreator(material.server_context())
        self._server.watching = self.kernel_tls()
        return self._server


@implementer(IOpenSSLServerConnectionCreator)
class _CurrentServer:
    """The listener's creator: the current one (a reload applies to new peers)."""

    def __init__(self, state: TlsState) -> None:
        self.state = state

    def serverConnectionForTLS(self, protocol: Any) -> Any:  # noqa: N802
        return self.state.server_creator().serverConnectionForTLS(protocol)


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
        self.control_relays = self.socket_relays()
        if state.material().serves:
            inbound = self.handshakes(
                self.relays, TlsInbound, factory=TlsHandshakeFactory
            )
            inbound.state = state
            # Over the limits: closed before TLS, with nothing to say.
            self.listen_on(
                settings["listen"], TLSFactory(_CurrentServer(state), False, inbound)
            )
        self.control(self.control_relays)
        self._listen = settings["listen"]
        # tls:// routes go through this state (not a test double's, if set).
        broker.transports.setdefault(SCHEME, TlsOutbound(state))

    def startService(self) -> None:  # noqa: N802 (Twisted's name)
        super().startService()
        if self.listener is None:
            # Documented, but silent otherwise: an operator who gave --tls
            # without keys would find nothing listening and no word why.
            log.info(
                "tlsd: no listener on {listen}: it listens once [tlsd] has a "
                "certificate and key, or a psk_file (tls:// routes need neither)",
                listen=self._listen,
            )

    def reconfigured(self) -> list[str]:
        """
        Read the files at the reload, so that one that became unusable is
        logged then and said in the reload's answer (the previous keys
        stay); a listener left with no certificate or key is said to fail
        every handshake.
        """
        material = self.state.material()
        if self.listener is not None and not material.serves:
            log.warn(
                "tlsd: no certificate or keys configured any more: its listener "
                "fails every handshake until they are configured again (or ipcd "
                "restarts without it)"
            )
        return [] if self.state.kept is None else [self.state.kept]


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
    # (A TOML array or table is no key of VERSIONS: unhashable, a TypeError.)
    if not isinstance(value, str) or value not in VERSIONS:
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
        *listener_settings(
            SECTION,
            DEFAULT_LISTEN,
            check_listen=not_tls(
                "tlsd speaks TLS on its listener itself, with [tlsd] "
                "certificate and key: write it as tcp:PORT (or unix:PATH), "
                "not ssl: or tls:"
            ),
        ),
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
        Setting(
            "kernel_tls",
            boolean,
            True,
            "after the handshake, the kernel's TLS where it has it (and socket_relay)",
        ),
    )
    default_listen = DEFAULT_LISTEN
    service = TlsService

    def connect(
        self, broker: IDaemonHost, target: Any, client: Any
    ) -> Deferred[socket.socket]:
        # Reached when no TlsService made the broker its TlsOutbound.
        return refused(f"{SECTION} has no service on this broker")

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
            return refused(str(e))
        # Counted from here until the relay ends (its socketpair and the TLS
        # connection are held in ipcd; a kernel TLS socket handed to the
        # client ends it at once), or the dial fails.
        try:
            release = outlimits.admit(broker, OUTBOUND, "tls relays", client)
        except Refused as e:
            return fail(e)
        dialed = dial(
            broker, material, uri.host, port, target.service, state.kernel_tls()
        )

        def joined(result: tuple[TlsDialer, bytes]) -> Deferred[socket.socket]:
            dialer, rest = result
            try:
                ours, theirs = socket.socketpair()
            except OSError as e:  # no descriptor left for it (EMFILE)
                # The TLS connection is closed, not left open uncounted.
                dialer.transport.abortConnection()
                why = f"cannot relay to the service: {e.strerror or e}"
                raise Refused(f"tlsd at {dialer.where}: {why}") from None
            given: Deferred[socket.socket] = Deferred()

            def handed(sock: socket.socket | None) -> None:
                # The TLS socket itself (kernel TLS), or the relay's end.
                if sock is None:
                    given.callback(theirs)
                else:
                    theirs.close()
                    given.callback(sock)

            stats = TlsRelayStats.of(
                client,
                "out",
                target.service,
                uri.text,
                broker.relays,
                daemon=SECTION,
                tls={**dialer.tls, "peer": _server_identity(material, uri.host)},
            )
            stats.on_end = release
            relay_over(
                state,
                dialer.transport,
                ours,
                stats,
                tls_is_a=False,
                greeting=rest,
                idle_timeout=broker.config.idle_timeout,
                handed=handed,
            )
            return given

        return dialed.addCallback(joined).addErrback(outlimits.releasing(release))

    def listens(self, settings: Mapping[str, Any]) -> bool:
        """Whether its listener runs: enabled, with a certificate or keys."""
        return self.enabled(settings) and bool(
            settings["psk_file"] or settings["certificate"]
        )

    def status(self, settings: Mapping[str, Any]) -> Mapping[str, Any]:
        return {
            "tls_listen": settings["listen"] if self.listens(settings) else None,
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
    host = unzoned(host)  # (as the dialer checked it)
    identity = material.identity_for(host)
    return f"psk:{identity}" if identity else f"cert-san:{host}"


tlsd = TlsDaemon()
