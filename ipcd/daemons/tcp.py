"""
tcpd: libipc services over TCP.

Outbound (C{tcp://HOST:PORT/SERVICE} routes): connect, send the raw service
name, wait for the raw C{ok}, and give the broker the TCP socket itself, so
after the handoff no process on the client's host relays a byte.

Inbound: a TCP listener reads the service request (upstream's raw name, or a
framed one), asks the broker's inbound resolver, answers C{ok} in the same
form, and relays.  For upstream's ipcd, C{RUNDIR/tcp} speaks the upstream
control protocol (framed URI, framed C{ok}, then relay).  Both listeners
use the shared handshake of L{ipcd.inbound}.

L{tcpd} is tcpd's L{ipcd.daemons.IProtocolDaemon}, registered as a Twisted
plugin by C{twisted/plugins/ipcd_daemons.py}.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IReactorFDSet
from twisted.plugin import IPlugin
from zope.interface import implementer

from ipcd.checkers import not_tls, positive_number
from ipcd.daemons import IProtocolDaemon, ListeningDaemon, Setting, listener_settings
from ipcd.daemons.listeners import DaemonService
from ipcd.errors import BUSY, Refused
from ipcd.host import IDaemonHost
from ipcd.inbound import NetworkHandshake
from ipcd.inboundcore import MAX_HANDSHAKE, OK, Sniffed
from ipcd.logs import printable
from ipcd.owndials import OwnDials
from ipcd.reactors import IHostReactor
from ipcd.routes import RemoteURI, host_port
from ipcd.sockets import (
    connect_tcp,
    host_addresses,
    read_exactly,
    read_to_eof,
    write_all,
)

SCHEME = "tcp"
SECTION = "tcpd"
DEFAULT_PORT = 9000
DEFAULT_LISTEN = "tcp:9000:interface=127.0.0.1"
# What a peer past [limits] is told (ipcd.errors).
_AT_THE_LIMIT = b"ne " + BUSY.encode()


async def dial(
    reactor: IHostReactor,
    host: str,
    port: int,
    service: str,
    own_dials: OwnDials | None = None,
) -> socket.socket:
    """
    Open a TCP connection to the tcpd at C{host:port} and ask it for
    C{service} the upstream way; return the socket, positioned right after
    the C{ok}.  Until then its local end is held in C{own_dials}.
    """
    where = host_port(host, port)
    addresses = await host_addresses(reactor, host, port)  # or Refused
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
    end = None if own_dials is None else own_dials.add(sock.getsockname())
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
    finally:
        if own_dials is not None:
            own_dials.discard(end)


async def _rest_of_refusal(
    reactor: IReactorFDSet, sock: socket.socket, head: bytes
) -> str:
    """
    Read the rest of an C{ne <reason>} answer, up to EOF or a bound.  Any
    other answer is not repeated: the peer need not be a tcpd, and its
    bytes are not the client's to read through ipcd.
    """
    if head != b"ne":
        return "it did not answer ok (not a tcpd?)"
    data = await read_to_eof(reactor, sock, MAX_HANDSHAKE - len(head))
    return printable(data.removeprefix(b" ").decode("utf-8", "replace"))


class TcpInbound(NetworkHandshake):
    """A remote peer on tcpd's listener asking for a local service."""

    route = "tcp inbound"
    framing = Sniffed  # upstream's raw name, or a framed one


class TcpService(DaemonService):
    """tcpd: the TCP listener and the C{RUNDIR/tcp} control socket."""

    def __init__(
        self, daemon: Any, broker: IDaemonHost, settings: Mapping[str, Any]
    ) -> None:
        super().__init__(daemon, broker)
        # tcpd's relays (inbound, and for upstream's control socket).
        self.relays = self.socket_relays()
        self.listen_on(
            settings["listen"],
            self.handshakes(self.relays, TcpInbound),
            # Before any request: upstream's raw form, as for a silent peer.
            # The word a remote peer is told, not the reason, which names
            # the limit and the key counted (behind haproxy:, the proxy's
            # address): the limits log it.
            lambda reason: _AT_THE_LIMIT,
        )
        self.control(self.relays)


@implementer(IPlugin, IProtocolDaemon)
class TcpDaemon(ListeningDaemon):
    """
    tcpd as a protocol daemon: C{tcp://} routes, C{[tcpd]}, C{--tcp
    ENDPOINT}/C{--no-tcp}, C{RUNDIR/tcp}.
    """

    scheme = SCHEME
    section = SECTION
    settings = (
        *listener_settings(
            SECTION,
            DEFAULT_LISTEN,
            # tcpd hands its peer's very socket on: under TLS, its client
            # would read TLS records, and never an answer.
            check_listen=not_tls(
                "tcpd relays the connection's raw socket, so a TLS listener's "
                "peers would never get an answer: listen on tcp: here, and "
                "use tlsd (libipc over TLS) or websocketd's ssl: for TLS"
            ),
        ),
        Setting("handshake_timeout", positive_number, 5.0, "seconds"),
    )
    default_listen = DEFAULT_LISTEN
    service = TcpService

    def connect(
        self, broker: IDaemonHost, target: Any, client: Any
    ) -> Deferred[socket.socket]:
        uri: RemoteURI = target.uri
        port = uri.port or DEFAULT_PORT
        return ensureDeferred(
            dial(broker.reactor, uri.host, port, target.service, broker.own_dials)
        )

    def status(self, settings: Mapping[str, Any]) -> Mapping[str, Any]:
        return {"tcp_listen": settings["listen"] if self.enabled(settings) else None}


tcpd = TcpDaemon()
