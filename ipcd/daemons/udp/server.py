"""
udpd's inbound side: HELLOs open sessions, each through the shared inbound core.

A HELLO without a good cookie gets a VERIFY with one and nothing else
(L{ipcd.daemons.udp.cookie}); a HELLO with one goes the shared inbound way
(L{ipcd.inboundcore}, through C{broker.open_inbound}), then one stream
connection to the local service per session.  DATA and CLOSE go to the
session their id names, when they come from the address it is bound to.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import MessageLengthError
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger, globalLogPublisher
from twisted.python.failure import Failure

from ipcd import inboundcore
from ipcd.daemons.udp import SECTION
from ipcd.daemons.udp import wire as udpwire
from ipcd.daemons.udp.batch import BatchReader, sender_for
from ipcd.daemons.udp.cookie import FULL, RENEWED, SPENT, AddressCookies
from ipcd.daemons.udp.session import Session, SessionStats, start_stream, stream_factory
from ipcd.daemons.udp.source import NO_SOURCE, Source, sockaddr_of
from ipcd.errors import BUSY
from ipcd.host import IDaemonHost
from ipcd.identity import remote_peer
from ipcd.inboundcore import InboundHandshake
from ipcd.limits import RateLimitedObserver, network_peer_key


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
    source: Source = NO_SOURCE  # where the HELLO came to: answered from there
    pending: Deferred[Any] | None = None


class UdpServer(DatagramProtocol):
    """
    udpd's listener: HELLOs open sessions; DATA and CLOSE go to the session
    their id names, when they come from the address it is bound to.
    Everything else is dropped and counted in the broker's counters.
    """

    noisy = False
    # What reads the listener, once listening (L{ipcd.daemons.udp.batch}).
    reader: BatchReader | None = None

    def __init__(
        self, broker: IDaemonHost, settings: Callable[[], Mapping[str, Any]]
    ) -> None:
        self.broker = broker
        self.reactor = broker.reactor
        self.settings = settings  # the current section, read per session
        self.max_datagram: int = settings()["max_datagram"]
        self.streams = stream_factory(self.reactor, self.max_datagram)
        self.sessions: dict[bytes, _Bound] = {}
        # (address, nonce) of each HELLO served: its session, or the
        # pending request while the broker connects.
        self.hellos: dict[tuple[Any, bytes], Session | _Asking] = {}
        # ... and the key each is counted under in the per-peer limit
        # ([limits] max_connections_per_peer, by address prefix).
        self.limits = broker.limits_for(SECTION)
        self.peer_keys: dict[tuple[Any, bytes], str] = {}
        # Streams of ended sessions still open in their grace (counted).
        self.held = 0
        self.cookies = AddressCookies(self.reactor)
        self.running = True
        # What a peer's HELLO can make it log (an unexpected failure, as
        # when fds run out): at the bounded rate of tcpd's failed handshakes.
        self._rate_limited = RateLimitedObserver(
            globalLogPublisher, self.reactor, counters=broker.counters
        )
        self.peer_log = Logger(namespace="ipcd.udpd", observer=self._rate_limited)

    def _drop(self, why: str) -> None:
        self.broker.counters[f"udp datagrams dropped: {why}"] += 1

    def datagramReceived(self, datagram: bytes, address: Any) -> None:  # noqa: N802
        if len(datagram) > self.max_datagram:
            self._drop("too large")
            return
        head = udpwire.data_head(datagram)
        if head is not None:  # the common case, the cheap way
            session = self._bound(head[0], address)
            if session is not None:
                payload = datagram[udpwire.DATA_HEADER_SIZE :]
                session.data(head[1], payload, len(datagram))
            return
        try:
            parsed = udpwire.decode(datagram)
        except udpwire.Malformed:
            self._drop("malformed")
            return
        if isinstance(parsed, udpwire.Hello):
            source = self._source()
            issued = self._checked(parsed, address, len(datagram), source)
            if issued is not None:
                self._hello(parsed, address, len(datagram), source, issued)
        elif isinstance(parsed, udpwire.OtherVersion):
            self._other_version(parsed, address, len(datagram))
        elif isinstance(parsed, udpwire.SessionDatagram):
            session = self._bound(parsed.session, address)
            if session is not None:
                session.datagram(parsed, len(datagram))
        else:
            self._drop("malformed")  # OK, NO, VERIFY are not a server's to get

    def _bound(self, session_id: bytes, address: Any) -> Session | None:
        """The live session C{session_id} names, if C{address} is its peer's."""
        bound = self.sessions.get(session_id)
        if bound is None:
            self._drop("unknown session")
            return None
        if bound.address != address:
            bound.session.spoofed()
            self._drop("wrong address")
            return None
        return bound.session

    def _source(self) -> Source:
        """Where the datagram being read was sent: its answers' source."""
        reader = self.reader
        return NO_SOURCE if reader is None else reader.answer_from()

    def _answer(
        self, datagram: bytes, address: Any, limit: int, source: Source | None = None
    ) -> None:
        # Never larger than what it answers: no amplification.
        if len(datagram) > limit:
            return
        if source is None:
            source = self._source()  # (answering the datagram being read)
        to = sockaddr_of(address)
        try:
            if source:
                self.transport.getHandle().sendmsg([datagram], source, 0, to)
            else:
                self.transport.write(datagram, to)
        except (OSError, MessageLengthError):
            self._drop("send failed")

    def _checked(
        self, hello: udpwire.Hello, address: Any, size: int, source: Source
    ) -> int | None:
        """
        The period the cookie C{hello} carries was issued in, if it is the
        one its address was sent; if not, send it one (a VERIFY, smaller
        than the HELLO) and keep nothing: a forged source address never
        gets past this.
        """
        if hello.cookie != udpwire.NO_COOKIE:
            issued = self.cookies.issued_in(
                hello.cookie, address, hello.nonce, hello.service
            )
            if issued is not None:
                return issued
        self._verify(hello, address, size, source)
        return None

    def _verify(
        self, hello: udpwire.Hello, address: Any, size: int, source: Source
    ) -> None:
        """Answer C{hello} with a VERIFY carrying a new cookie."""
        self.broker.counters["udp hellos answered with a cookie"] += 1
        cookie = self.cookies.issue(address, hello.nonce, hello.service)
        self._answer(udpwire.verify(hello.nonce, cookie), address, size, source)

    def _busy(
        self,
        counted: str,
        hello: udpwire.Hello,
        address: Any,
        size: int,
        source: Source,
    ) -> None:
        """Refuse C{hello} (a NO busy), counted under C{counted}."""
        self.broker.counters[counted] += 1
        refusal = udpwire.refusal(hello.nonce, BUSY, size)
        self._answer(refusal, address, size, source)

    def _other_version(
        self, hello: udpwire.OtherVersion, address: Any, size: int
    ) -> None:
        self.broker.counters["udp hellos refused: other version"] += 1
        reason = (
            f"udpd protocol version {hello.version} is not spoken here "
            f"(only version {udpwire.VERSION})"
        )
        self._answer(udpwire.refusal(hello.nonce, reason, size), address, size)

    def _hello(
        self,
        hello: udpwire.Hello,
        address: Any,
        size: int,
        source: Source,
        issued: int,
    ) -> None:
        key = (address, hello.nonce)
        served = self.hellos.get(key)
        if isinstance(served, Session):  # our OK was lost: say it again
            ok = udpwire.accepted(hello.nonce, served.id)
            self._answer(ok, address, size, source)
            return
        if served is not None:
            return  # the broker is still connecting: the OK is on its way
        if len(self.hellos) + self.held >= self.settings()["max_sessions"]:
            self._busy("udp sessions refused: too many", hello, address, size, source)
            return
        config = self.broker.config
        peer_key = network_peer_key(
            address[0], config.peer_prefix_ipv4, config.peer_prefix_ipv6
        )
        spent = self.cookies.spend(hello.cookie, issued, peer_key)
        if spent == SPENT:
            # Its session has come and gone: a replay (whose VERIFY goes to
            # the address it forged, and opens nothing), or a client that
            # sends its HELLO again, not having seen our OK (which the new
            # cookie lets in again).
            self.broker.counters["udp hellos with a spent cookie"] += 1
            self._verify(hello, address, size, source)
            return
        if spent == FULL:  # (the cookies kept per prefix are bounded)
            counted = "udp sessions refused: too many opened lately"
            self._busy(counted, hello, address, size, source)
            return
        if spent == RENEWED:  # (and in all: the cookies out are void)
            self.broker.counters["udp cookie secrets renewed: too many spent"] += 1
        reason = self.limits.admit(peer_key)
        if reason is not None:  # one peer may not take every session
            refusal = udpwire.refusal(hello.nonce, BUSY, size)  # (logged)
            self._answer(refusal, address, size, source)
            return
        self.peer_keys[key] = peer_key
        peer = remote_peer(address[0], address[1], "udp")
        handshake = InboundHandshake(peer, HelloAnswers(hello.nonce, size))
        asking = _Asking(handshake, source)
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
                self._session(action, asking, key, size)
            elif kind is inboundcore.Refuse:
                self._forget(key)
                self._answer(action.answer, key[0], size, asking.source)
            elif kind is inboundcore.Cancel and asking.pending is not None:
                asking.pending.cancel()
            elif kind is inboundcore.Discard:
                self._forget(key)
                action.sock.close()
            elif kind is inboundcore.Unexpected:
                who = str(asking.core.who)
                self.peer_log.failure(
                    "udpd: request from {who} failed", action.error, who=who
                )

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
        asking: _Asking,
        key: tuple[Any, bytes],
        size: int,
    ) -> None:
        """The service is connected: the session, then its OK."""
        address, nonce = key
        handshake = asking.core
        session_id = secrets.token_bytes(udpwire.ID_SIZE)
        while session_id in self.sessions:  # 64 random bits: never, really
            session_id = secrets.token_bytes(udpwire.ID_SIZE)
        stats = SessionStats.of(
            handshake.who,
            "in",
            handshake.requested,
            "udp inbound",
            self.broker.relays,
            daemon=SECTION,
        )
        to = sockaddr_of(address)  # (with a link-local peer's scope id)
        sender = sender_for(self.transport, to, source=asking.source)
        session = Session(
            session_id,
            (
                partial(self.transport.write, addr=to)
                if sender is None
                else sender.write
            ),
            stats,
            self.reactor,
            self.settings()["idle_timeout"],
            self.max_datagram,
            self._ended,
            send_all=None if sender is None else sender.send_all,
        )
        if self.reader is not None:
            session.pending = self.reader.pending
        self.sessions[session_id] = _Bound(session, address, nonce)
        self.hellos[key] = session
        try:
            start_stream(self.reactor, join.sock, session, self.streams)
        except Exception:
            self.peer_log.failure(
                "udpd: cannot start the session of {peer}", peer=handshake.who
            )
            return  # ended: the peer's retries find nothing, then time out
        if not session.done:
            self._answer(join.greeting(session_id), address, size, asking.source)

    def _ended(self, session: Session) -> None:
        bound = self.sessions.pop(session.id, None)
        if bound is None:
            return
        key = (bound.address, bound.nonce)
        stream = session.stream
        if stream is None or not stream.held:
            self._forget(key)
            return
        # Its stream still holds what the service has not read, for up to
        # its grace: counted until it closes, in max_sessions and in the
        # peer's share, or a peer could leave one behind per session it
        # opens and ends.
        self.hellos.pop(key, None)
        self.held += 1
        stream.closed = partial(self._released, self.peer_keys.pop(key, None))

    def _released(self, peer_key: str | None) -> None:
        """A stream held past its session's end has closed."""
        self.held -= 1
        if peer_key is not None:
            self.limits.release(peer_key)

    def _forget(self, key: tuple[Any, bytes]) -> None:
        """A HELLO's session (or request) is over: it counts no more."""
        self.hellos.pop(key, None)
        peer_key = self.peer_keys.pop(key, None)
        if peer_key is not None:
            self.limits.release(peer_key)

    def stop(self) -> None:
        """End every session (a CLOSE to each peer) and pending request."""
        self.running = False
        self._rate_limited.flush()  # what it left out, said now
        for key, served in list(self.hellos.items()):
            if isinstance(served, Session):
                served.end("udpd stopped")
            else:
                self._act(served, key, 0, served.core.lost())
