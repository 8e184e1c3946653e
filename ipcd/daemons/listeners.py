"""
What the protocol daemons build alike around their handshakes: their
service (L{DaemonService}: listener, control sockets, relay engines), a
network listener under its connection limits, and the C{RUNDIR/SCHEME}
control socket for upstream's ipcd.  Each is built, not listening: ipcd's
service tree listens when it starts (L{ipcd.tap.IPCDService}).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from twisted.application.service import IServiceCollection, MultiService
from twisted.internet.defer import Deferred, fail

from ipcd import wire
from ipcd.backlogs import with_backlog
from ipcd.compat import twisted as compat_twisted
from ipcd.daemons import settings_of
from ipcd.host import IDaemonHost
from ipcd.identity import unix_listener_peer
from ipcd.inbound import ControlHandshake, HandshakeFactory, Handshaking
from ipcd.limits import LimitedEndpoint, LimitedFactory, network_peer_key
from ipcd.listener import EndpointListener
from ipcd.listenerkeys import wrapped
from ipcd.proxied import counted_refusals, proxied_endpoint
from ipcd.relay import SocketRelays
from ipcd.services import IPCService
from ipcd.tlsfactory import tls_listens

E = TypeVar("E")


class DaemonService(MultiService):
    """
    A protocol daemon's part of the service tree, named after its section:
    its network listener (L{listen_on}), its control sockets (L{control})
    and the relay engines they use (L{engine}), started and stopped with it.
    A daemon's C{makeService(broker, settings)} builds one
    (L{ipcd.daemons.ListeningDaemon} calls C{service(daemon, broker,
    settings)}); nothing listens until the tree starts.
    """

    def __init__(self, daemon: Any, broker: IDaemonHost) -> None:
        super().__init__()
        self.setName(daemon.section)
        self.daemon = daemon
        self.broker = broker
        self.listener: EndpointListener | None = None
        self._engines: list[Any] = []

    def engine(self, engine: E) -> E:
        """Start C{engine} (a relay engine) with this service, stop it after."""
        self._engines.append(engine)
        return engine

    def socket_relays(self) -> SocketRelays:
        """A socket relay engine (L{engine}): for raw sockets both sides."""
        return self.engine(SocketRelays(self.broker.reactor))

    def handshakes(
        self, relays: Any, protocol: type[Handshaking], **how: Any
    ) -> HandshakeFactory:
        """L{handshakes} for this daemon."""
        return handshakes(self.daemon, self.broker, relays, protocol, **how)

    def listen_on(
        self,
        listen: str,
        factory: Any,
        refusal: Callable[[str], bytes] = lambda reason: b"",
    ) -> EndpointListener:
        """Its network listener: L{network_listener} on C{listen}."""
        self.listener = network_listener(
            self.broker, self.daemon.section, listen, factory, refusal
        )
        self.listener.setServiceParent(self)
        return self.listener

    def control(self, relays: Any, **how: Any) -> IPCService:
        """A control socket (L{control_socket}) relayed by C{relays}."""
        return control_socket(self.daemon, self.broker, relays, self, **how)

    def startService(self) -> None:  # noqa: N802 (Twisted's name)
        for engine in self._engines:
            engine.start()
        super().startService()

    def stopService(self) -> Deferred[None]:  # noqa: N802 (Twisted's name)
        stopped = super().stopService()
        for engine in self._engines:
            engine.stop()  # closes the relayed connections
        return stopped

    def listening(self) -> Deferred[Any]:
        """Fires with the listening port once started (C{getHost()} for it)."""
        if self.listener is None:
            section = self.daemon.section
            return fail(RuntimeError(f"{section} has no network listener"))
        return self.listener.listening()

    def reconfigured(self) -> list[str]:
        """
        A reload replaced the configuration (C{broker.config}): nothing here.
        A daemon that could not apply part of it returns what, each in one
        line, for the reload's answer (C{not_applied}).
        """
        return []

    def settings(self) -> Mapping[str, Any]:
        """The daemon's current settings (read when used: reloads apply)."""
        return settings_of(self.broker.config, self.daemon)


def handshakes(
    daemon: Any,
    broker: IDaemonHost,
    relays: Any,
    protocol: type[Handshaking],
    factory: type[HandshakeFactory] = HandshakeFactory,
    scheme: str | None = None,
    timeout_key: str = "handshake_timeout",
) -> HandshakeFactory:
    """
    C{protocol}'s factory for one of C{daemon}'s listeners (for C{scheme},
    default the daemon's), its deadline the setting C{timeout_key}.
    """
    return factory(
        protocol,
        broker,
        relays,
        # Read at each connection, so a reload applies to new ones.
        lambda: settings_of(broker.config, daemon)[timeout_key],
        scheme=scheme or daemon.scheme,
        name=daemon.section,
    )


def in_rundir(description: str, rundir: str) -> str:
    """
    Endpoint string C{description}; an C{ipc:} one that names no
    C{rundir=} with ipcd's C{rundir}: the parser's default, for programs,
    is C{$RUNDIR} or C{/tmp/libipc-run}, another directory than ipcd's
    (perhaps one a user made first).
    """
    try:
        kind, listens = wrapped(description)
        if kind != "ipc" or "rundir" in compat_twisted.endpoint_keywords(listens):
            return description
    except (ValueError, IndexError):
        return description  # (refused where it is checked)
    escaped = "".join(f"\\{c}" if c in ":=\\" else c for c in rundir)
    return f"{description}:rundir={escaped}"


def network_listener(
    broker: IDaemonHost,
    name: str,
    listen: str,
    factory: Any,
    refusal: Callable[[str], bytes] = lambda reason: b"",
) -> EndpointListener:
    """
    A listener on endpoint string C{listen} under the connection limits of
    C{name}; peers over them get C{refusal(reason)}.  An C{ssl:} one speaks
    TLS as tlsd does (L{tls_listens}); the kernel queues
    L{ipcd.backlogs.TCP_BACKLOG} connects for it (a C{unix:} one,
    L{ipcd.backlogs.UNIX_BACKLOG}), unless C{listen} says.  Behind
    C{haproxy:}, ipcd reads the PROXY headers (L{ipcd.proxied}): a bad one
    is a refusal, counted and logged as the limits' are.
    """
    limits = broker.limits_for(name)
    reactor = tls_listens(broker.reactor, listen)

    def peer_key(transport: Any) -> str:
        address = transport.getPeer()
        if not hasattr(address, "host"):  # a UNIX socket's: one key per uid
            return unix_listener_peer(transport).description
        config = broker.config  # read per connection: reloads apply
        return network_peer_key(
            address, config.peer_prefix_ipv4, config.peer_prefix_ipv6
        )

    refused = counted_refusals(limits)
    described = with_backlog(in_rundir(listen, broker.config.rundir))
    endpoint = proxied_endpoint(reactor, described, refused)
    return EndpointListener(
        LimitedEndpoint(endpoint, limits),
        LimitedFactory(factory, limits, peer_key, refusal),
        listen,
    )


def control_socket(
    daemon: Any,
    broker: IDaemonHost,
    relays: Any,
    parent: IServiceCollection,
    scheme: str | None = None,
    timeout_key: str = "handshake_timeout",
) -> IPCService:
    """
    C{RUNDIR/SCHEME} (default: the daemon's scheme): upstream's control
    protocol, relayed by C{relays}.
    """
    scheme = scheme or daemon.scheme
    limits = broker.limits_for(scheme)
    service = IPCService(
        scheme,
        LimitedFactory(
            handshakes(
                daemon,
                broker,
                relays,
                ControlHandshake,
                scheme=scheme,
                timeout_key=timeout_key,
            ),
            limits,
            refusal=lambda reason: wire.encode(b"ne " + reason.encode()),
        ),
        broker.config.rundir,
        broker.reactor,
        limits=limits,
    )
    service.setServiceParent(parent)
    return service
