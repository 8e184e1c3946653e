"""
udpd: libipc messages over UDP, one message per datagram, in sessions.

Outbound (C{udp://HOST:PORT/SERVICE} routes): a UDP socket of its own per
session, connected to the remote udpd; a HELLO (retried, doubling the
interval, until the broker's connect deadline cancels it) answered by an OK
with the session id, or a NO with the reason; a VERIFY on the way has
the HELLO sent again at once, with its cookie.  The client gets one end of a
socketpair and speaks framed messages on it as with any service.

Inbound: one UDP listener; a HELLO without a good cookie gets a VERIFY
with one and nothing else (L{ipcd.daemons.udp.cookie}: no state, no
connection, before the peer has shown it receives at its address); a HELLO
with one goes the shared inbound way (L{ipcd.inboundcore}, through
C{broker.open_inbound}:
redirections, C{in} policy with the peer's C{ip:} label, admin routes),
then one stream connection to the local service per session.
C{RUNDIR/udp} speaks the upstream control protocol.

The datagram format is L{ipcd.daemons.udp.wire}'s, a session's life
L{ipcd.daemons.udp.session}'s; docs/protocol.rst describes both.
L{udpd} is udpd's L{ipcd.daemons.IProtocolDaemon}, registered as a Twisted
plugin by C{twisted/plugins/ipcd_daemons.py}.
"""

from __future__ import annotations

import errno
import ipaddress
import secrets
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.internet.error import MessageLengthError
from twisted.internet.interfaces import IReactorTime, IReactorUDP
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from ipcd import inboundcore, wire
from ipcd.checkers import Expected, positive_number
from ipcd.daemons import (
    IProtocolDaemon,
    ListeningDaemon,
    Setting,
    listener_settings,
    settings_of,
)
from ipcd.daemons.listeners import DaemonService
from ipcd.daemons.udp import wire as udpwire
from ipcd.daemons.udp.cookie import AddressCookies
from ipcd.daemons.udp.session import Session, SessionStats, SessionStream
from ipcd.errors import Refused
from ipcd.handoff import adopt_into_reactor
from ipcd.host import IDaemonHost
from ipcd.identity import Peer, remote_peer
from ipcd.inboundcore import InboundHandshake
from ipcd.limits import network_peer_key
from ipcd.listener import EndpointListener
from ipcd.logs import printable
from ipcd.reactors import IAdoptingReactor, IHostReactor
from ipcd.relay import SocketRelays
from ipcd.routes import RemoteURI
from ipcd.sockets import host_addresses

SCHEME = "udp"
SECTION = "udpd"
DEFAULT_PORT = 9000
DEFAULT_LISTEN = "udp:9000:interface=127.0.0.1"
# What a UDP read takes: any datagram, so that oversized ones are seen
# (and counted) rather than cut by the kernel to fit a smaller buffer.
READ_SIZE = 65536
# The handshake's retries: the first after C{handshake_retry} seconds, each
# next one twice as late, at most this far apart.
MAX_RETRY_INTERVAL = 2.0


# The listener's description.


@dataclass(frozen=True)
class Listen:
    """C{udp:PORT[:interface=ADDRESS]}, parsed."""

    port: int
    interface: str


_LISTEN_FORM = "a listener like 'udp:9000:interface=127.0.0.1'"


def parse_listen(description: str) -> Listen:
    """Parse udpd's listener; L{Expected} when it is not of that form."""
    if not isinstance(description, str):
        raise Expected(_LISTEN_FORM)
    kind, _, rest = description.partition(":")
    port_text, _, options = rest.partition(":")
    if kind != "udp" or not port_text.isdigit() or int(port_text) > 65535:
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


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise Expected("a whole number greater than 0")
    return value


def _stream_factory(reactor: IReactorTime, max_datagram: int) -> wire.MessageFactory:
    """Sessions' local streams: messages up to what one datagram carries."""
    return wire.MessageFactory(
        SessionStream,
        max_datagram - udpwire.DATA_HEADER_SIZE,
        idleTimeout=0,
        clock=reactor,
    )


def _start_stream(
    reactor: IAdoptingReactor,
    sock: socket.socket,
    session: Session,
    factory: wire.MessageFactory,
) -> None:
    """Run C{sock} (a connected stream) as C{session}'s local stream."""
    try:
        stream = adopt_into_reactor(reactor, sock.detach(), factory)
    except Exception:
        session.end("cannot adopt the local stream")
        raise
    session.attach(stream)


# Inbound.


@dataclass
class _Bound:
    """A live inbound session: the address and HELLO nonce it belongs to."""

    session: Session
    address: tuple[str, int]
    nonce: bytes


class HelloAnswers:
    """
    udpd's framing of a HELLO's answers (a L{Framing}): an OK with the
    session's id, a NO with the reason, never larger than the HELLO.
    """

    def __init__(self, nonce: bytes, size: int) -> None:
        self.nonce, self.size = nonce, size

    def parse(self, buffer: bytes) -> tuple[bytes, bytes] | None:
        return buffer, b""  # a HELLO's service is whole

    def ok(self) -> Callable[[bytes], bytes]:
        """The OK, once the session has its id."""
        return partial(udpwire.accepted, self.nonce)

    def no(self, reason: str, internal: bool = False) -> bytes:
        return udpwire.refusal(self.nonce, reason, self.size)


@dataclass
class _Asking:
    """A HELLO whose service the broker is connecting."""

    core: InboundHandshake
    pending: Deferred[Any] | None = None


class UdpServer(DatagramProtocol):
    """
    udpd's listener: HELLOs open sessions; DATA and CLOSE go to the session
    their id names, when they come from the address it is bound to.
    Everything else is dropped and counted in the broker's counters.
    """

    log = Logger()
    noisy = False

    def __init__(
        self, broker: IDaemonHost, settings: Callable[[], Mapping[str, Any]]
    ) -> None:
        self.broker = broker
        self.reactor = broker.reactor
        self.settings = settings  # the current section, read per session
        self.max_datagram: int = settings()["max_datagram"]
        self.streams = _stream_factory(self.reactor, self.max_datagram)
        self.sessions: dict[bytes, _Bound] = {}
        # (address, nonce) of each HELLO served: its session, or the
        # pending request while the broker connects.
        self.hellos: dict[tuple[Any, bytes], Session | _Asking] = {}
        # ... and the key each is counted under in the per-peer limit
        # ([limits] max_connections_per_peer, by address prefix).
        self.limits = broker.limits_for(SECTION)
        self.peer_keys: dict[tuple[Any, bytes], str] = {}
        self.cookies = AddressCookies(self.reactor)
        self.running = True

    def _drop(self, why: str) -> None:
        self.broker.counters[f"udp datagrams dropped: {why}"] += 1

    def datagramReceived(self, datagram: bytes, address: Any) -> None:  # noqa: N802
        if len(datagram) > self.max_datagram:
            self._drop("too large")
            return
        try:
            parsed = udpwire.decode(datagram)
        except udpwire.Malformed:
            self._drop("malformed")
            return
        if isinstance(parsed, udpwire.Hello):
            if self._checked(parsed, address, len(datagram)):
                self._hello(parsed, address, len(datagram))
        elif isinstance(parsed, udpwire.OtherVersion):
            self._other_version(parsed, address, len(datagram))
        elif isinstance(parsed, udpwire.Data | udpwire.Close):
            bound = self.sessions.get(parsed.session)
            if bound is None:
                self._drop("unknown session")
            elif bound.address != address:
                bound.session.spoofed()
                self._drop("wrong address")
            else:
                bound.session.datagram(parsed, len(datagram))
        else:
            self._drop("malformed")  # OK, NO, VERIFY are not a server's to get

    def _answer(self, datagram: bytes, address: Any, limit: int) -> None:
        # Never larger than what it answers: no amplification.
        if len(datagram) > limit:
            return
        try:
            self.transport.write(datagram, address)
        except (OSError, MessageLengthError):
            self._drop("send failed")

    def _checked(self, hello: udpwire.Hello, address: Any, size: int) -> bool:
        """
        Whether C{hello} carries the cookie its address was sent; if not,
        send it one (a VERIFY, smaller than the HELLO) and keep nothing: a
        forged source address never gets past this.
        """
        cookies = self.cookies
        if hello.cookie != udpwire.NO_COOKIE and cookies.valid(
            hello.cookie, address, hello.nonce, hello.service
        ):
            return True
        self.broker.counters["udp hellos answered with a cookie"] += 1
        cookie = cookies.issue(address, hello.nonce, hello.service)
        self._answer(udpwire.verify(hello.nonce, cookie), address, size)
        return False

    def _other_version(
        self, hello: udpwire.OtherVersion, address: Any, size: int
    ) -> None:
        self.broker.counters["udp hellos refused: other version"] += 1
        reason = (
            f"udpd protocol version {hello.version} is not spoken here "
            f"(only version {udpwire.VERSION})"
        )
        self._answer(udpwire.refusal(hello.nonce, reason, size), address, size)

    def _hello(self, hello: udpwire.Hello, address: Any, size: int) -> None:
        key = (address, hello.nonce)
        served = self.hellos.get(key)
        if isinstance(served, Session):  # our OK was lost: say it again
            self._answer(udpwire.accepted(hello.nonce, served.id), address, size)
            return
        if served is not None:
            return  # the broker is still connecting: the OK is on its way
        if len(self.hellos) >= self.settings()["max_sessions"]:
            self.broker.counters["udp sessions refused: too many"] += 1
            refusal = udpwire.refusal(hello.nonce, "too many sessions", size)
            self._answer(refusal, address, size)
            return
        config = self.broker.config
        peer_key = network_peer_key(
            address[0], config.peer_prefix_ipv4, config.peer_prefix_ipv6
        )
        reason = self.limits.admit(peer_key)
        if reason is not None:  # one peer may not take every session
            self._answer(udpwire.refusal(hello.nonce, reason, size), address, size)
            return
        self.peer_keys[key] = peer_key
        peer = remote_peer(address[0], address[1])
        asking = _Asking(InboundHandshake(peer, HelloAnswers(hello.nonce, size)))
        self.hellos[key] = asking
        self._act(asking, key, size, asking.core.request(hello.service))

    def _act(
        self, asking: _Asking, key: tuple[Any, bytes], size: int, actions: list[Any]
    ) -> None:
        """Do what a HELLO's handshake says."""
        for action in actions:
            kind = type(action)
            if kind is inboundcore.Ask:
                d = maybeDeferred(
                    self.broker.open_inbound, action.text, asking.core.who
                )
                asking.pending = d
                d.addBoth(self._answered, asking, key, size)
            elif kind is inboundcore.Join:
                self._session(action, asking.core, key, size)
            elif kind is inboundcore.Refuse:
                self._forget(key)
                self._answer(action.answer, key[0], size)
            elif kind is inboundcore.Cancel and asking.pending is not None:
                asking.pending.cancel()
            elif kind is inboundcore.Discard:
                self._forget(key)
                action.sock.close()
            elif kind is inboundcore.Unexpected:
                who = str(asking.core.who)
                self.log.failure("request from {who} failed", action.error, who=who)

    def _answered(
        self, result: Any, asking: _Asking, key: tuple[Any, bytes], size: int
    ) -> None:
        asking.pending = None
        if isinstance(result, Failure):
            self._forget(key)  # (refused, or cancelled as udpd stops)
        self._act(asking, key, size, asking.core.answered(result))

    def _session(
        self,
        join: inboundcore.Join,
        handshake: InboundHandshake,
        key: tuple[Any, bytes],
        size: int,
    ) -> None:
        """The service is connected: the session, then its OK."""
        address, nonce = key
        session_id = secrets.token_bytes(udpwire.ID_SIZE)
        while session_id in self.sessions:  # 64 random bits: never, really
            session_id = secrets.token_bytes(udpwire.ID_SIZE)
        stats = SessionStats.of(
            handshake.who, "in", handshake.requested, "udp inbound", self.broker.relays
        )
        session = Session(
            session_id,
            lambda datagram: self.transport.write(datagram, address),
            stats,
            self.reactor,
            self.settings()["idle_timeout"],
            self.max_datagram,
            self._ended,
        )
        self.sessions[session_id] = _Bound(session, address, nonce)
        self.hellos[key] = session
        try:
            _start_stream(self.reactor, join.sock, session, self.streams)
        except Exception:
            self.log.failure(
                "udpd: cannot start the session of {peer}", peer=handshake.who
            )
            return  # ended: the peer's retries find nothing, then time out
        if not session.done:
            self._answer(join.greeting(session_id), address, size)

    def _ended(self, session: Session) -> None:
        bound = self.sessions.pop(session.id, None)
        if bound is not None:
            self._forget((bound.address, bound.nonce))

    def _forget(self, key: tuple[Any, bytes]) -> None:
        """A HELLO's session (or request) is over: it counts no more."""
        self.hellos.pop(key, None)
        peer_key = self.peer_keys.pop(key, None)
        if peer_key is not None:
            self.limits.release(peer_key)

    def stop(self) -> None:
        """End every session (a CLOSE to each peer) and pending request."""
        self.running = False
        for key, served in list(self.hellos.items()):
            if isinstance(served, Session):
                served.end("udpd stopped")
            else:
                self._act(served, key, 0, served.core.lost())


class UdpEndpoint:
    """udpd's listening address as an endpoint (Twisted has no UDP ones)."""

    def __init__(self, reactor: IReactorUDP, listen: Listen) -> None:
        self.reactor = reactor
        self.listen_at = listen

    def listen(self, protocol: DatagramProtocol) -> Deferred[Any]:
        """The UDP port, or CannotListenError (said in one line at start)."""
        return maybeDeferred(
            self.reactor.listenUDP,
            self.listen_at.port,
            protocol,
            interface=self.listen_at.interface,
            maxPacketSize=READ_SIZE,
        )


class UdpListener(EndpointListener):
    """udpd's UDP port, as a service, its sessions ended when it stops."""

    def __init__(
        self, reactor: IReactorUDP, listen: Listen, protocol: UdpServer
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


# Outbound.


class SessionClient(DatagramProtocol):
    """
    The outbound end's UDP socket (connected to the remote udpd): first the
    answer to our HELLO, then the session's datagrams.
    """

    noisy = False

    def __init__(self, nonce: bytes, service: bytes) -> None:
        self.nonce = nonce
        self.service = service
        self.hello = udpwire.hello(nonce, service)  # until a VERIFY: no cookie
        self.answer: Deferred[bytes] = Deferred()
        # The handshake's: send the HELLO again now (it has a new cookie).
        self.resend: Callable[[], None] = lambda: None
        self.session: Session | None = None
        self.stopped = False

    def datagramReceived(self, datagram: bytes, address: Any) -> None:  # noqa: N802
        try:
            parsed = udpwire.decode(datagram)
        except udpwire.Malformed:
            parsed = None
        session = self.session
        if session is not None:
            if (
                isinstance(parsed, udpwire.Data | udpwire.Close)
                and parsed.session == session.id
            ):
                session.datagram(parsed, len(datagram))
            elif not isinstance(parsed, udpwire.Accepted | udpwire.Verify):
                session.spoofed()  # a late OK or VERIFY is fine
            return
        if self.answer.called or getattr(parsed, "nonce", None) != self.nonce:
            return
        if isinstance(parsed, udpwire.Verify):
            hello = udpwire.hello(self.nonce, self.service, parsed.cookie)
            if hello != self.hello:  # a repeated VERIFY changes nothing
                self.hello = hello
                self.resend()
        elif isinstance(parsed, udpwire.Accepted):
            self.answer.callback(parsed.session)
        elif isinstance(parsed, udpwire.Refusal):
            # The remote's words, shown to the client and in logs: one line.
            self.answer.errback(Refused(printable(parsed.reason)))

    def connectionRefused(self) -> None:  # noqa: N802 (Twisted's name)
        self.stopProtocol()

    def stopProtocol(self) -> None:  # noqa: N802 (Twisted's name)
        # Besides our own stopListening: Twisted's epoll reactor closes a
        # connected UDP port on the error an ICMP "port unreachable" leaves
        # on it (nobody listens there, or no longer).
        self.stopped = True
        if self.session is None:
            if not self.answer.called:
                self.answer.errback(ConnectionRefusedError(errno.ECONNREFUSED, ""))
        elif not self.session.done:
            self.session.end("the remote udpd is unreachable", notify=False)


async def handshake(
    reactor: IReactorTime, port: Any, client: SessionClient, retry: float
) -> bytes:
    """
    Send C{client}'s HELLO until answered (retrying, doubling the
    interval); when a VERIFY gives it a cookie, at once and from the first
    interval again.
    """
    interval = retry
    timer = None

    def send() -> None:
        nonlocal interval, timer
        # The next try first: an answer (an ICMP refusal, say) may come
        # within this write, and the finally below must see the timer.
        timer = reactor.callLater(interval, send)
        interval = min(interval * 2, MAX_RETRY_INTERVAL)
        if client.stopped:
            return  # the answer has failed already
        try:
            port.write(client.hello)
        except OSError:
            pass  # as if lost: the next try may pass

    def resend() -> None:
        nonlocal interval
        if timer is not None and timer.active():
            timer.cancel()
        interval = retry
        send()

    client.resend = resend
    send()
    try:
        return await client.answer
    finally:
        client.resend = lambda: None
        if timer is not None and timer.active():
            timer.cancel()


async def dial(
    broker: IDaemonHost,
    host: str,
    port: int,
    service: str,
    client: Peer,
    route: str,
    settings: Mapping[str, Any],
) -> socket.socket:
    """
    Open a session with the udpd at C{host:port} for C{service}; return the
    client's end of the socketpair whose other end is the session.
    """
    reactor = broker.reactor
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    family, address = (await host_addresses(reactor, host, port))[0]  # or Refused
    nonce = secrets.token_bytes(udpwire.ID_SIZE)
    protocol = SessionClient(nonce, service.encode("ascii"))
    interface = "::" if family == socket.AF_INET6 else "0.0.0.0"
    udp = reactor.listenUDP(0, protocol, interface=interface, maxPacketSize=READ_SIZE)
    try:
        udp.connect(address[0], address[1])
        try:
            session_id = await handshake(
                reactor, udp, protocol, settings["handshake_retry"]
            )
        except ConnectionRefusedError:
            raise Refused(f"cannot reach udpd at {where}: connection refused")
        except Refused as e:
            raise Refused(f"udpd at {where} refused {service!r}: {e.reason}")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    except BaseException:
        udp.stopListening()
        raise
    stats = SessionStats.of(client, "out", service, route, broker.relays)
    session = Session(
        session_id,
        udp.write,
        stats,
        reactor,
        settings["idle_timeout"],
        settings["max_datagram"],
        lambda session: udp.stopListening(),
    )
    protocol.session = session
    try:
        _start_stream(
            reactor, ours, session, _stream_factory(reactor, settings["max_datagram"])
        )
    except BaseException:
        theirs.close()
        raise
    return theirs


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
        Setting("max_sessions", _count, 256, "inbound sessions at once"),
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
    flag = SCHEME
    default_listen = DEFAULT_LISTEN
    listen_doc = f"'udp:PORT[:interface=ADDRESS]' (e.g. {DEFAULT_LISTEN})"
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
        pass  # the listener's form was checked with the configuration


udpd = UdpDaemon()
