"""
What tcpd and tlsd build alike around their handshakes: a network listener
under its connection limits, the C{RUNDIR/SCHEME} control socket for
upstream's ipcd, and the one-line start-up checks and hints of a listener.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IServiceCollection
from twisted.internet.endpoints import serverFromString

from ipcd import wire
from ipcd.compat import twisted as compat_twisted
from ipcd.daemons import StartupError, settings_of
from ipcd.inbound import ControlHandshake, HandshakeFactory, Handshaking
from ipcd.limits import LimitedEndpoint, LimitedFactory, network_peer_key
from ipcd.services import IPCService


def handshakes(
    daemon: Any,
    broker: Any,
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


def network_listener(
    broker: Any,
    name: str,
    listen: str,
    factory: Any,
    refusal: Callable[[str], bytes] = lambda reason: b"",
) -> StreamServerEndpointService:
    """
    A listener on endpoint string C{listen} under the connection limits of
    C{name}; peers over them get C{refusal(reason)}.
    """
    limits = broker.limits_for(name)

    def peer_key(transport: Any) -> str:
        config = broker.config  # read per connection: reloads apply
        return network_peer_key(
            transport.getPeer(), config.peer_prefix_ipv4, config.peer_prefix_ipv6
        )

    listener = StreamServerEndpointService(
        LimitedEndpoint(serverFromString(broker.reactor, listen), limits),
        LimitedFactory(factory, limits, peer_key, refusal),
    )
    compat_twisted.listen_errors_raise(listener)
    return listener


def control_socket(
    daemon: Any,
    broker: Any,
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


def listen_flag(value: str | None) -> dict[str, Any]:
    """What C{--SCHEME ENDPOINT} sets in the daemon's section."""
    return {"enabled": True, "listen": value}


def listen_hint(error: Exception, flag: str) -> str:
    """The way out when a listener cannot listen (C{use --tcp ENDPOINT ...})."""
    code = getattr(getattr(error, "socketError", error), "errno", None)
    another = "another ipcd? " if code == errno.EADDRINUSE else ""
    return f"{another}use --{flag} ENDPOINT or --no-{flag}"


def check_listener(reactor: Any, daemon: Any, listen: str) -> None:
    """
    A plugin's parser (systemd:, ...) runs only with a reactor, so the config
    could not: try it here, to say in one line what is wrong (systemd passed
    no socket at that index, say).
    """
    try:
        serverFromString(reactor, listen)
    except Exception as e:
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        raise StartupError(
            f"cannot make {daemon.section}'s listener {listen!r}: {reason} "
            f"({daemon.hint(e)})"
        ) from None
