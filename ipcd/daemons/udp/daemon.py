"""
udpd, libipc messages over UDP in sessions: its settings, listener and service.

Its halves: L{ipcd.daemons.udp.client} opens sessions with remote udpds
(C{udp://HOST:PORT/SERVICE} routes), L{ipcd.daemons.udp.server} answers
HELLOs on the listener through the shared inbound core; C{RUNDIR/udp} speaks
the upstream control protocol.  The datagram format is
L{ipcd.daemons.udp.wire}'s, a session's life L{ipcd.daemons.udp.session}'s;
docs/protocol.rst describes both.  L{udpd} is udpd's
L{ipcd.daemons.IProtocolDaemon}, registered as a Twisted plugin by
C{twisted/plugins/ipcd_daemons.py}.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.plugin import IPlugin
from zope.interface import implementer

from ipcd.checkers import Expected, positive_int, positive_number
from ipcd.daemons import (
    IProtocolDaemon,
    ListeningDaemon,
    Setting,
    StartupError,
    listener_settings,
    settings_of,
)
from ipcd.daemons.listeners import DaemonService
from ipcd.daemons.udp import READ_SIZE, SCHEME, SECTION
from ipcd.daemons.udp import wire as udpwire
from ipcd.daemons.udp.batch import read_in_batches
from ipcd.daemons.udp.client import dial
from ipcd.daemons.udp.server import UdpServer
from ipcd.daemons.udp.session import SessionStats
from ipcd.daemons.udp.source import sockaddr_of
from ipcd.host import IDaemonHost
from ipcd.listener import EndpointListener
from ipcd.reactors import IHostReactor
from ipcd.relay import SocketRelays
from ipcd.routes import RemoteURI

DEFAULT_PORT = 9000
DEFAULT_LISTEN = "udp:9000:interface=127.0.0.1"


# The listener's description.


@dataclass(frozen=True)
class Listen:
    """C{udp:PORT[:interface=ADDRESS]}, parsed."""

    port: int
    interface: str


@dataclass(frozen=True)
class Adopted:
    """
    C{systemd:domain=INET|INET6:name=NAME} (or C{index=N}): the datagram
    socket systemd passed (C{ListenDatagram=}), as Twisted's C{systemd:}
    strings name stream ones.
    """

    description: str
    family: int


_LISTEN_FORM = (
    "a listener like 'udp:9000:interface=127.0.0.1' or 'systemd:domain=INET:name=udpd'"
)
_FAMILIES = {"INET": socket.AF_INET, "INET6": socket.AF_INET6}


def parse_listen(description: str) -> Listen | Adopted:
    """Parse udpd's listener; L{Expected} when it is not of those forms."""
    if not isinstance(description, str):
        raise Expected(_LISTEN_FORM)
    kind, _, rest = description.partition(":")
    if kind == "systemd":
        return _parse_adopted(description, rest)
    port_text, _, options = rest.partition(":")
    if kind != "udp" or not _port_number(port_text):
        raise Expected(_LISTEN_FORM)
    interface = "127.0.0.1"  # loopback unless told otherwise
    if options:
        key, _, value = options.partition("=")
        if key != "interface":
            raise Expected(_LISTEN_FORM)
        try:
            interface = str(ipaddress.ip_address(value))
        except ValueError:
            raise Expected(f"{_LISTEN_FORM} (interface: an IP address)") from None
    return Listen(int(port_text), interface)


def _ascii_digits(text: str) -> bool:
    # Not str.isdigit alone: it takes '²' (which int() refuses) and '١٢'
    # (which int() reads as 12, and Twisted's systemd: index with it).
    return text.isascii() and text.isdigit()


def _port_number(text: str) -> bool:
    """Whether C{text} is a port number, 0 to 65535, in ASCII digits."""
    # (Its length first: int() refuses more than 4,300 digits, raising.)
    return _ascii_digits(text) and len(text) <= 5 and int(text) <= 65535


def _parse_adopted(description: str, arguments: str) -> Adopted:
    """C{systemd:}'s arguments: a domain of INET or INET6, an index or a name."""
    pairs = [argument.partition("=") for argument in arguments.split(":")]
    given = {key: value for key, _, value in pairs}
    family = _FAMILIES.get(given.get("domain", ""))
    which = {"index", "name"} & given.keys()
    if (
        family is None
        or len(given) != len(pairs)  # a key twice
        or len(which) != 1
        or not given.keys() <= {"domain", "index", "name"}
        or not all(value for _, _, value in pairs)
        or ("index" in given and not _ascii_digits(given["index"]))
    ):
        raise Expected(
            f"{_LISTEN_FORM} (systemd: domain=INET or INET6, and index=N or name=NAME)"
        )
    return Adopted(description, family)


def check_adopted(listen: Adopted, way_out: str) -> None:
    """
    Raise L{StartupError} (one line, ending with C{way_out}) unless systemd
    passed a socket for C{listen} that udpd can serve on: a datagram socket
    of that family, bound to a port.
    """
    from ipcd.activation import inherited_fd, unfit_fd

    what = f"cannot make udpd's listener {listen.description!r}"
    fd = inherited_fd(listen.description)
    if fd is None:
        raise StartupError(f"{what}: systemd passed no such socket ({way_out})")
    why = unfit_fd(fd, listen.family, socket.SOCK_DGRAM)
    if why is not None:
        raise StartupError(
            f"{what}: the inherited socket is {why} (give it a bound datagram "
            f"socket: ListenDatagram= in the socket unit; {way_out})"
        )


def listen_setting(value: Any) -> str:
    parse_listen(value)
    return value


def _datagram_size(value: Any) -> int:
    low, high = udpwire.HELLO_SIZE, udpwire.MAX_UDP_PAYLOAD
    if isinstance(value, bool) or not isinstance(value, int):
        raise Expected(f"a number of bytes from {low} to {high}")
    if not low <= value <= high:
        raise Expected(f"a number of bytes from {low} to {high}")
    return value


class UdpEndpoint:
    """udpd's listening address as an endpoint (Twisted has no UDP ones)."""

    def __init__(self, reactor: IHostReactor, listen: Listen | Adopted) -> None:
        self.reactor = reactor
        self.listen_at = listen

    def listen(self, protocol: UdpServer) -> Deferred[Any]:
        """The UDP port, or CannotListenError (said in one line at start)."""
        return maybeDeferred(self._listen, protocol)

    def _listen(self, protocol: UdpServer) -> Any:
        at = self.listen_at
        if isinstance(at, Adopted):
            from ipcd.activation import inherited_fd

            # Checked before anything listened (UdpDaemon.verify).  Twisted
            # listens on a duplicate, leaves systemd's descriptor open, and
            # wants it non-blocking (or its read loop blocks the reactor).
            fd = inherited_fd(at.description)
            os.set_blocking(fd, False)
            port = self.reactor.adoptDatagramPort(fd, at.family, protocol, READ_SIZE)
        elif "%" in at.interface:
            port = self._listen_zoned(at, protocol)
        else:
            port = self.reactor.listenUDP(
                at.port, protocol, interface=at.interface, maxPacketSize=READ_SIZE
            )
        # Read in batches; runs of datagrams (GRO) on udpd's own socket only.
        protocol.reader = read_in_batches(
            port, connected=False, gro=not isinstance(at, Adopted)
        )
        return port

    def _listen_zoned(self, at: Listen, protocol: UdpServer) -> Any:
        """
        A listener on a link-local address of one link (C{fe80::2%eth0}):
        Twisted binds (address, port), which drops the zone's scope id
        (EINVAL), so the socket is bound here, with it, and adopted.
        """
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind(sockaddr_of((at.interface, at.port)))
            return self.reactor.adoptDatagramPort(
                sock.fileno(), socket.AF_INET6, protocol, READ_SIZE
            )
        except OSError as e:
            raise CannotListenError(at.interface, at.port, e) from None
        finally:
            sock.close()  # (Twisted's port holds a duplicate)


class UdpListener(EndpointListener):
    """udpd's UDP port, as a service, its sessions ended when it stops."""

    def __init__(
        self, reactor: IHostReactor, listen: Listen | Adopted, protocol: UdpServer
    ) -> None:
        super().__init__(UdpEndpoint(reactor, listen), protocol)
        self.protocol = protocol

    def stopService(self) -> Any:  # noqa: N802 (Twisted's name)
        stopping = super().stopService()
        self.protocol.stop()
        return stopping


class UdpService(DaemonService):
    """udpd: the UDP listener and the C{RUNDIR/udp} control socket."""

    def __init__(
        self, daemon: Any, broker: IDaemonHost, settings: Mapping[str, Any]
    ) -> None:
        super().__init__(daemon, broker)
        reactor = broker.reactor
        self.server = UdpServer(broker, self.settings)
        self.listener = UdpListener(
            reactor, parse_listen(settings["listen"]), self.server
        )
        self.listener.setServiceParent(self)
        # Upstream's ipcd on RUNDIR/udp: relayed to the session's stream.
        self.relays = self.engine(SocketRelays(reactor))
        self.control(self.relays)

    def stopService(self) -> Deferred[None]:  # noqa: N802 (Twisted's name)
        stopped = super().stopService()  # the listener ends inbound sessions
        # And this host's clients' sessions: a CLOSE to each remote udpd.
        for stats in list(self.broker.relays):
            if isinstance(stats, SessionStats) and stats.end is not None:
                stats.end("udpd stopped")
        return stopped

    def address(self) -> tuple[str, int]:
        """Where the listener listens (once started)."""
        host = self.listener.port.getHost()
        return host.host, host.port


# The plug-in.


@implementer(IPlugin, IProtocolDaemon)
class UdpDaemon(ListeningDaemon):
    """
    udpd as a protocol daemon: C{udp://} routes, C{[udpd]}, C{--udp
    ENDPOINT}/C{--no-udp}, C{RUNDIR/udp}.  Off by default.
    """

    scheme = SCHEME
    section = SECTION
    settings = (
        *listener_settings(
            SECTION, DEFAULT_LISTEN, enabled=False, check_listen=listen_setting
        ),
        Setting("max_sessions", positive_int, 256, "inbound sessions at once"),
        Setting(
            "max_datagram",
            _datagram_size,
            udpwire.MAX_UDP_PAYLOAD,
            "bytes per datagram, header included",
        ),
        Setting("idle_timeout", positive_number, 120.0, "seconds"),
        Setting("handshake_retry", positive_number, 0.25, "seconds, then doubling"),
        Setting("handshake_timeout", positive_number, 5.0, "RUNDIR/udp, seconds"),
    )
    default_listen = DEFAULT_LISTEN
    listen_doc = (
        f"'udp:PORT[:interface=ADDRESS]' (e.g. {DEFAULT_LISTEN}; "
        "127.0.0.1 when no interface is given), or "
        "'systemd:domain=INET:name=NAME' for a socket systemd passes"
    )
    off_doc = "Do not run udpd (the default)."
    service = UdpService
    restart_keys = ("enabled", "listen", "max_datagram")

    def connect(
        self, broker: IDaemonHost, target: Any, client: Any
    ) -> Deferred[socket.socket]:
        uri: RemoteURI = target.uri
        return ensureDeferred(
            dial(
                broker,
                uri.host,
                uri.port or DEFAULT_PORT,
                target.service,
                client,
                str(uri),
                settings_of(broker.config, self),
            )
        )

    def status(self, settings: Mapping[str, Any]) -> Mapping[str, Any]:
        if not self.enabled(settings):
            return {"udp_listen": None}
        return {
            "udp_listen": settings["listen"],
            "udp_max_sessions": settings["max_sessions"],
            "udp_max_datagram": settings["max_datagram"],
            "udp_idle_timeout": settings["idle_timeout"],
        }

    def verify(self, reactor: IHostReactor, settings: Mapping[str, Any]) -> None:
        # The form was checked with the configuration; a socket systemd
        # passed can only be looked at now.
        listen = parse_listen(settings["listen"])
        if isinstance(listen, Adopted):
            check_adopted(listen, self.hint(ValueError()))


udpd = UdpDaemon()
