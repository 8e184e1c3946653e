"""
udpd's outbound side: one session with a remote udpd, opened by a retried HELLO.

A UDP socket of its own per session, connected to the remote udpd; a HELLO
(retried, doubling the interval, until the broker's connect deadline cancels
it) answered by an OK with the session id, or a NO with the reason; a VERIFY
on the way has the HELLO sent again at once, with its cookie.
"""

from __future__ import annotations

import errno
import secrets
import socket
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import DatagramProtocol

from ipcd import outlimits
from ipcd.daemons.udp import READ_SIZE, SECTION
from ipcd.daemons.udp import wire as udpwire
from ipcd.daemons.udp.batch import read_in_batches, sender_for
from ipcd.daemons.udp.session import Session, SessionStats, start_stream, stream_factory
from ipcd.errors import Refused
from ipcd.host import IDaemonHost
from ipcd.identity import Peer
from ipcd.logs import printable
from ipcd.routes import host_port
from ipcd.sockets import host_addresses

# The handshake's retries: the first after C{handshake_retry} seconds, each
# next one twice as late, at most this far apart.
MAX_RETRY_INTERVAL = 2.0

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
        session = self.session
        head = udpwire.data_head(datagram)
        if session is not None and head is not None and head[0] == session.id:
            # The common case, the cheap way.
            payload = datagram[udpwire.DATA_HEADER_SIZE :]
            session.data(head[1], payload, len(datagram))
            return
        try:
            parsed = udpwire.decode(datagram)
        except udpwire.Malformed:
            parsed = None
        if session is not None:
            if (
                isinstance(parsed, udpwire.Data | udpwire.SessionDatagram)
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


# The connection limits outbound sessions are counted in (L{ipcd.outlimits}).
OUTBOUND = "udp sessions out"


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
    client's end of the socketpair whose other end is the session.  Counted
    in L{OUTBOUND}'s limits from the start until the session ends, or a
    client could have ipcd hold two descriptors for each session it opens
    (with a peer of its own that answers every HELLO) until ipcd has none.
    """
    release = outlimits.admit(broker, OUTBOUND, "udp sessions", client)

    def ended(session: Session) -> None:
        udp.stopListening()
        stream = session.stream
        if stream is not None and stream.held:
            # Its stream still holds what the client has not read, for up
            # to its grace: counted until it closes (as an inbound
            # session's), or a client not reading could end sessions
            # faster than their streams close.
            stream.closed = release
        else:
            release()

    try:
        reactor = broker.reactor
        where = host_port(host, port)
        family, address = (await host_addresses(reactor, host, port))[0]  # or Refused
        nonce = secrets.token_bytes(udpwire.ID_SIZE)
        protocol = SessionClient(nonce, service.encode("ascii"))
        interface = "::" if family == socket.AF_INET6 else "0.0.0.0"
        udp = reactor.listenUDP(
            0, protocol, interface=interface, maxPacketSize=READ_SIZE
        )
        end = None
        try:
            try:
                if len(address) == 4 and address[3]:
                    # A link-local address's zone: Twisted's connect gives
                    # the socket (address, port), which has none (EINVAL),
                    # so its socket is connected with the scope id first;
                    # that binds it to the link, and Twisted's connect then
                    # keeps it.
                    udp.getHandle().connect(address)
                udp.connect(address[0], address[1])
            except OSError as e:  # (no route, or a link gone: ENODEV)
                raise Refused(f"cannot reach udpd at {where}: {e.strerror}") from None
            reader = read_in_batches(udp, connected=True)
            # Held until answered: a udpd that is this ipcd's own decides on
            # the HELLO then, and must not route it out again (a loop).
            local = udp.getHost()
            end = broker.own_dials.add((local.host, local.port), "udp")
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
            # Stopping fails the answer (SessionClient.stopProtocol), which
            # nothing awaits when the connect failed: not an unhandled error.
            protocol.answer.addErrback(lambda _: None)
            udp.stopListening()
            raise
        finally:
            broker.own_dials.discard(end)
        stats = SessionStats.of(
            client, "out", service, route, broker.relays, daemon=SECTION
        )
        sender = sender_for(udp, refused=protocol.connectionRefused)
        session = Session(
            session_id,
            udp.write if sender is None else sender.write,
            stats,
            reactor,
            settings["idle_timeout"],
            settings["max_datagram"],
            ended,
            send_all=None if sender is None else sender.send_all,
        )
        if reader is not None:
            session.pending = reader.pending
        protocol.session = session
        try:
            start_stream(
                reactor,
                ours,
                session,
                stream_factory(reactor, settings["max_datagram"]),
            )
        except BaseException:
            theirs.close()
            raise
        return theirs
    except BaseException:
        release()  # (once: the session's end may have)
        raise
