"""
In-memory tests of ipcd's protocols: the lookup protocol, tcpd's handshakes
(up to the hand-over to the relay loop, tested in test_relay), the control
socket, the JSON log observer and the framing over a simulated connection.
No real socket, no real reactor, a fake clock.
"""

from __future__ import annotations

import io
import json
import socket
from collections import Counter
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import (
    MemoryReactorClock,
    StringTransport,
    StringTransportWithDisconnection,
)
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from ipcd import wire
from ipcd.broker import Broker, LookupFactory, LookupProtocol
from ipcd.config import Config
from ipcd.control import ControlFactory, format_status, status_report
from ipcd.daemons import IOutbound
from ipcd.daemons.tcp import TcpInbound
from ipcd.daemons.tls.handover import TlsRelayStats
from ipcd.errors import REFUSED, Refused
from ipcd.identity import Peer
from ipcd.inbound import ControlHandshake, HandshakeFactory
from ipcd.limits import REFUSAL_GRACE
from ipcd.logs import json_observer
from ipcd.policy import parse_rule
from ipcd.relay import READ_SIZE, RelayStats
from ipcd.routes import RemoteURI, parse_uri
from ipcd.testing import MemoryRelays

RUNDIR = "/nonexistent/ipcd-test-rundir"


def config(**overrides: Any) -> Config:
    return Config(rundir=RUNDIR, **overrides)


# Test doubles.


class RecordingTransport(StringTransportWithDisconnection):
    """
    A transport that runs C{connectionLost} when closed and records the
    calls a TCP transport has and L{StringTransport} lacks.
    """

    writeClosed = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.events: list[Any] = []
        self.noDelay: bool | None = None
        self.handle: Any = object()  # the connection's socket

    def stopReading(self) -> None:  # noqa: N802 (Twisted's name)
        self.events.append("stopReading")

    def stopWriting(self) -> None:  # noqa: N802 (Twisted's name)
        self.events.append("stopWriting")

    def getHandle(self) -> Any:  # noqa: N802 (Twisted's name)
        return self.handle

    def write(self, data: bytes) -> None:
        self.events.append(data)
        super().write(data)

    def loseWriteConnection(self) -> None:  # noqa: N802 (Twisted's name)
        self.events.append("loseWriteConnection")
        self.writeClosed = True

    def loseConnection(self) -> None:  # noqa: N802 (Twisted's name)
        self.events.append("loseConnection")
        self.disconnecting = True
        super().loseConnection()

    def setTcpNoDelay(self, enabled: bool) -> None:  # noqa: N802 (Twisted's name)
        self.noDelay = enabled


def connect(protocol: Any, transport: Any = None) -> Any:
    transport = transport if transport is not None else RecordingTransport()
    transport.protocol = protocol
    protocol.makeConnection(transport)
    return transport


class FakeSocket:
    """Stands for a connected socket: a descriptor number and C{close}."""

    family = socket.AF_UNIX

    def __init__(self, fd: int = 42) -> None:
        self.fd = fd
        self.closed = False
        self.blocking = False

    def fileno(self) -> int:
        return self.fd

    def setblocking(self, flag: bool) -> None:
        self.blocking = flag

    def close(self) -> None:
        self.closed = True


@implementer(IOutbound)
class PendingTransport:
    """A C{fake://} transport whose connects never complete on their own."""

    scheme = "fake"

    def __init__(self) -> None:
        self.calls: list[tuple[Any, Any]] = []
        self.cancelled: list[Any] = []

    def connect(self, target: Any, client: Any) -> Deferred[Any]:
        self.calls.append((target, client))
        return Deferred(lambda d: self.cancelled.append(target))


# The lookup protocol.


class LookupProtocolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.fake = PendingTransport()

    def lookup(self, **overrides: Any) -> tuple[Broker, LookupProtocol, Any]:
        broker = Broker(config(**overrides), self.clock, {"fake": self.fake})
        protocol = LookupFactory(broker).buildProtocol(None)
        transport = connect(protocol)
        return broker, protocol, transport

    def test_unknown_client_without_handle(self) -> None:
        """With no socket to ask SO_PEERCRED, the client is still named."""
        _, protocol, _ = self.lookup()
        self.assertEqual(protocol.client, Peer("unknown local client"))

    def test_silent_client_dropped_at_deadline(self) -> None:
        _, _, transport = self.lookup(lookup_timeout=3.0)
        self.clock.advance(2.999)
        self.assertEqual(transport.value(), b"")
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.001)
        self.assertEqual(transport.value(), b"ne no lookup received within 3 s")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_oversized_lookup(self) -> None:
        """
        A header announcing more than C{max_message_size} is answered and
        closed at once; the payload is never parsed.
        """
        broker, _, transport = self.lookup(max_message_size=16)
        payload = b"pong;" + b"x" * 12
        transport.protocol.dataReceived(wire.encode(payload))
        self.assertEqual(transport.value(), b"ne lookup of 17 bytes exceeds 16 bytes")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(broker.counters["lookups"], 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_lookup_at_size_limit_is_read(self) -> None:
        lookup = b"pong;pong fake://h"  # 18 bytes
        broker, protocol, transport = self.lookup(max_message_size=len(lookup))
        protocol.dataReceived(wire.encode(lookup))
        self.assertEqual(broker.counters["lookups"], 1)
        self.assertEqual(len(self.fake.calls), 1)
        self.assertEqual(transport.value(), b"")

    def test_malformed_lookup(self) -> None:
        _, protocol, transport = self.lookup()
        protocol.dataReceived(wire.encode(b"pong;pong"))
        self.assertTrue(transport.value().startswith(b"ne bad lookup: "), transport)
        self.assertIn(b"malformed route", transport.value())
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_lookup_in_pieces(self) -> None:
        """Header and payload may arrive a byte at a time."""
        _, protocol, _ = self.lookup()
        for byte in wire.encode(b"pong;pong fake://h/pong"):
            protocol.dataReceived(bytes([byte]))
        self.assertEqual(len(self.fake.calls), 1)
        target, client = self.fake.calls[0]
        self.assertEqual(target.uri.host, "h")
        self.assertEqual(target.service, "pong")
        self.assertEqual(client, Peer("unknown local client"))

    def test_second_message_ignored_while_pending(self) -> None:
        broker, protocol, transport = self.lookup()
        protocol.dataReceived(
            wire.encode(b"pong;pong fake://h/pong") + wire.encode(b"pong;pong")
        )
        protocol.dataReceived(wire.encode(b"other;other fake://h/other"))
        self.assertEqual(len(self.fake.calls), 1)
        self.assertEqual(broker.counters["lookups"], 1)
        self.assertEqual(transport.value(), b"")

    def test_second_message_ignored_after_answer(self) -> None:
        transport = StringTransport()  # stays open: later bytes still arrive
        broker = Broker(config(), self.clock, {"fake": self.fake})
        protocol = LookupFactory(broker).buildProtocol(None)
        protocol.makeConnection(transport)
        protocol.dataReceived(wire.encode(b"../etc"))
        answer = transport.value()
        self.assertTrue(answer.startswith(b"ne "), answer)
        protocol.dataReceived(wire.encode(b"pong;pong fake://h/pong"))
        self.assertEqual(transport.value(), answer)
        self.assertEqual(self.fake.calls, [])
        self.assertEqual(broker.counters["lookups"], 1)

    def test_lookup_deadline_ends_with_the_lookup(self) -> None:
        """
        Once the lookup is in, the lookup deadline no longer applies; the
        connect has its own.
        """
        _, protocol, transport = self.lookup(lookup_timeout=1.0, connect_timeout=10.0)
        protocol.dataReceived(wire.encode(b"pong;pong fake://h/pong"))
        self.clock.advance(5.0)
        self.assertEqual(transport.value(), b"")
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.fake.cancelled, [])

    def test_connection_lost_cancels_pending_connect(self) -> None:
        broker, protocol, transport = self.lookup()
        protocol.dataReceived(wire.encode(b"pong;pong fake://h/pong"))
        self.assertEqual(self.fake.cancelled, [])
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.fake.cancelled), 1)
        self.assertEqual(transport.value(), b"")
        # Neither the lookup deadline nor the connect deadline is left over.
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(broker.counters["connect failures"], 1)

    def test_connect_deadline(self) -> None:
        """A transport that never answers is cancelled at the connect deadline."""
        _, protocol, transport = self.lookup(connect_timeout=2.0)
        protocol.dataReceived(wire.encode(b"pong;pong fake://h/pong"))
        self.clock.advance(1.999)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(0.001)
        self.assertEqual(len(self.fake.cancelled), 1)
        self.assertEqual(
            transport.value(), b"ne connecting to fake://h/pong timed out after 2 s"
        )
        self.assertTrue(transport.disconnecting)

    def test_ok_hands_the_socket_in_one_sendmsg(self) -> None:
        """
        C{ok} and the fd go in one C{sendmsg}; ipcd's copy of the socket is
        closed only once the connection (and its write buffer) is gone.
        """
        sent: list[Any] = []

        class Handle:
            def sendmsg(self, buffers: Any, ancillary: Any) -> int:
                sent.append((buffers, ancillary))
                return 2

            def getsockopt(self, *args: Any) -> bytes:
                raise OSError("not a unix socket")

        class UnixLikeTransport(RecordingTransport):
            dataBuffer = b""
            _tempDataBuffer: list[bytes] = []

            def getHandle(self) -> Handle:  # noqa: N802 (Twisted's name)
                return Handle()

        sock = FakeSocket(fd=42)
        connected: Deferred[Any] = Deferred()
        self.fake.connect = lambda target, client: connected  # type: ignore[method-assign]
        broker = Broker(config(), self.clock, {"fake": self.fake})
        protocol = LookupFactory(broker).buildProtocol(None)
        transport = connect(protocol, UnixLikeTransport())
        protocol.dataReceived(wire.encode(b"pong;pong fake://h/pong"))
        self.assertEqual(sent, [])
        connected.callback(sock)
        [(buffers, ancillary)] = sent
        self.assertEqual(buffers, [b"ok"])
        [(level, kind, data)] = ancillary
        self.assertEqual((level, kind), (socket.SOL_SOCKET, socket.SCM_RIGHTS))
        self.assertEqual(list(data), [42])
        self.assertTrue(sock.blocking, "clients must get a blocking socket")
        self.assertEqual(transport.value(), b"")  # nothing else written
        self.assertTrue(sock.closed)  # connectionLost ran on loseConnection
        self.assertEqual(broker.counters["connected"], 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class OpenTransport(StringTransport):
    """Stays open when closed (the write buffer still flushing), with a socket."""

    def __init__(self) -> None:
        super().__init__()
        self.drained: list[int] = []

    def getHandle(self) -> Any:  # noqa: N802 (Twisted's name)
        drained = self.drained

        class Handle:
            def recv(self, size: int, flags: int = 0) -> bytes:
                drained.append(size)
                raise BlockingIOError

            def getsockopt(self, *args: Any) -> bytes:
                raise OSError("not a unix socket")

        return Handle()


class LookupAnswerTests(SynchronousTestCase):
    """
    A lookup connection once its answer is decided: nothing left running,
    what the client sent and nobody reads dropped before the close, a
    socket that comes too late closed, errors logged.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.fake = PendingTransport()
        self.connected: Deferred[Any] = Deferred()
        self.fake.connect = lambda target, client: self.connected  # type: ignore[method-assign]
        broker = Broker(config(lookup_timeout=3.0), self.clock, {"fake": self.fake})
        self.broker = broker
        self.protocol = LookupFactory(broker).buildProtocol(None)
        self.transport = connect(self.protocol, OpenTransport())

    def test_refusedWithNothingLeft(self) -> None:
        """A refusal: written, unread input drained, no deadline left."""
        self.protocol.dataReceived(wire.encode(b"pong;pong"))
        self.assertTrue(self.transport.value().startswith(b"ne bad lookup: "))
        self.assertTrue(self.transport.disconnecting)
        self.assertNotEqual(self.transport.drained, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_restOfAnAnswerBegunAtAccept(self) -> None:
        """
        C{send_rest} (what the accept path could not send): written, the
        connection closed, no deadline left, and a lookup after it ignored.
        """
        self.protocol.send_rest(b"ne rest")
        self.assertEqual(self.transport.value(), b"ne rest")
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.protocol.dataReceived(wire.encode(b"pong;pong fake://h/pong"))
        self.assertEqual(self.broker.counters["lookups"], 0)
        self.assertEqual(self.transport.value(), b"ne rest")

    def test_oversizedWithNothingLeft(self) -> None:
        """Too long a lookup: refused, no deadline left."""
        self.protocol.dataReceived(wire.HEADER.pack(1 << 31))
        self.assertTrue(self.transport.value().startswith(b"ne lookup of "))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_lostStopsTheDeadline(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_internalErrorLogged(self) -> None:
        """An error (not a refusal) is answered and logged."""
        self.protocol.dataReceived(wire.encode(b"pong;pong fake://h/pong"))
        self.connected.errback(RuntimeError("boom"))
        self.assertEqual(self.transport.value(), b"ne internal error: boom")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def leaveAsItEnds(self, outcome: Any) -> None:
        """
        A lookup pending, then the client goes: the connect ends with
        C{outcome} as it is cancelled (it completed meanwhile).
        """
        self.connected = Deferred(lambda d: outcome(d))
        self.protocol.dataReceived(wire.encode(b"pong;pong fake://h/pong"))
        self.protocol.connectionLost(Failure(ConnectionDone()))

    def test_lateSocketClosed(self) -> None:
        """A socket that comes once the client is gone is closed."""
        sock = FakeSocket()
        self.leaveAsItEnds(lambda d: d.callback(sock))
        self.assertTrue(sock.closed)

    def test_lateErrorLogged(self) -> None:
        """An error that comes once the client is gone is still logged."""
        self.leaveAsItEnds(lambda d: d.errback(RuntimeError("boom")))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


# tcpd's handshakes.


class StubBroker:
    """
    What tcpd's listeners need of a broker, answering with Deferreds the
    test fires (and whose cancellation it sees).
    """

    def __init__(self, reactor: Any, **overrides: Any) -> None:
        self.config = config(**overrides)
        self.reactor = reactor
        self.relays: set[RelayStats] = set()
        self.counters: Counter[str] = Counter()
        self.inbound: list[tuple[str, Peer, Deferred[Any]]] = []
        self.uris: list[tuple[RemoteURI, Peer, Deferred[Any]]] = []
        self.cancelled: list[Any] = []

    def _pending(self, what: Any) -> Deferred[Any]:
        return Deferred(lambda d: self.cancelled.append(what))

    def open_inbound(self, service: str, peer: Peer) -> Deferred[Any]:
        d = self._pending(service)
        self.inbound.append((service, peer, d))
        return d

    def open_uri(self, uri: RemoteURI, peer: Peer) -> Deferred[Any]:
        d = self._pending(uri)
        self.uris.append((uri, peer, d))
        return d


class HandleTransport(RecordingTransport):
    """A UNIX-socket-like transport whose handle has no SO_PEERCRED."""

    def __init__(self) -> None:
        super().__init__()

        class Handle:
            def getsockopt(self, *args: Any) -> bytes:
                raise OSError("no credentials here")

        self.handle = Handle()


class TcpHandshakeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.broker = StubBroker(
            self.reactor, daemons={"tcpd": {"handshake_timeout": 4.0}}
        )
        self.relays = MemoryRelays()
        self.relays.start()

    def factory(self, protocol: type) -> HandshakeFactory:
        return HandshakeFactory(
            protocol,
            self.broker,
            self.relays,
            lambda: self.broker.config.daemons["tcpd"]["handshake_timeout"],
            scheme="tcp",
            name="tcpd",
        )

    def inbound(self) -> tuple[TcpInbound, RecordingTransport]:
        protocol = self.factory(TcpInbound).buildProtocol(None)
        transport = connect(protocol)
        return protocol, transport

    def control(self) -> tuple[ControlHandshake, RecordingTransport]:
        protocol = self.factory(ControlHandshake).buildProtocol(None)
        transport = connect(protocol, HandleTransport())
        return protocol, transport

    def test_identify_remote_peer(self) -> None:
        protocol, transport = self.inbound()
        self.assertIs(transport.noDelay, True)
        self.assertEqual(str(protocol.who), "192.168.1.1:54321")
        self.assertIn("ip:192.168.1.1", protocol.who.labels)

    def test_raw_request(self) -> None:
        protocol, transport = self.inbound()
        protocol.dataReceived(b"pong")
        [(service, peer, _)] = self.broker.inbound
        self.assertEqual(service, "pong")
        self.assertIs(peer, protocol.who)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_framed_request(self) -> None:
        protocol, _ = self.inbound()
        protocol.dataReceived(bytes.fromhex("00000004") + b"pong")
        [(service, _, _)] = self.broker.inbound
        self.assertEqual(service, "pong")

    def test_framed_request_in_pieces(self) -> None:
        protocol, _ = self.inbound()
        for byte in bytes.fromhex("00000004") + b"pong":
            self.assertEqual(self.broker.inbound, [])
            protocol.dataReceived(bytes([byte]))
        [(service, _, _)] = self.broker.inbound
        self.assertEqual(service, "pong")

    def test_raw_refusal_is_raw(self) -> None:
        protocol, transport = self.inbound()
        protocol.dataReceived(b"secret")
        self.broker.inbound[0][2].errback(Refused("denied by default", public=REFUSED))
        self.assertEqual(transport.value(), b"ne refused")
        self.assertTrue(transport.disconnecting)

    def test_refusal_leaves_one_timer(self) -> None:
        """The refusal's grace, and no deadline of the request besides."""
        for request in (b"secret", b"\x00\x00"):  # asking; still reading
            protocol, transport = self.inbound()
            protocol.dataReceived(request)
            if self.broker.inbound:
                self.broker.inbound.pop()[2].errback(Refused("denied"))
            else:
                self.reactor.advance(4.0)  # no request in time
            [grace] = self.reactor.getDelayedCalls()
            self.assertEqual(grace.getTime(), self.reactor.seconds() + REFUSAL_GRACE)
            protocol.connectionLost(None)
            self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_framed_refusal_is_framed(self) -> None:
        protocol, transport = self.inbound()
        protocol.dataReceived(wire.encode(b"secret"))
        self.broker.inbound[0][2].errback(Refused("denied by default", public=REFUSED))
        self.assertEqual(transport.value(), wire.encode(b"ne refused"))
        self.assertTrue(transport.disconnecting)

    def test_internal_error_is_refused(self) -> None:
        protocol, transport = self.inbound()
        protocol.dataReceived(b"pong")
        self.broker.inbound[0][2].errback(ZeroDivisionError("boom"))
        self.assertEqual(transport.value(), b"ne internal error")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_framed_too_long(self) -> None:
        protocol, transport = self.inbound()
        protocol.dataReceived(wire.HEADER.pack(256))
        self.assertEqual(self.broker.inbound, [])
        answer = transport.value()
        (size,) = wire.HEADER.unpack_from(answer)
        self.assertEqual(answer[4:], b"ne request of 256 bytes is too long")
        self.assertEqual(size, len(answer) - 4)
        self.assertTrue(transport.disconnecting)

    def test_not_ascii(self) -> None:
        protocol, transport = self.inbound()
        protocol.dataReceived("pöng".encode())
        self.assertEqual(self.broker.inbound, [])
        self.assertEqual(transport.value(), b"ne request is not ASCII")

    def test_handshake_deadline(self) -> None:
        protocol, transport = self.inbound()
        self.reactor.advance(3.999)
        self.assertEqual(transport.value(), b"")
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(0.001)
        self.assertTrue(transport.value().endswith(b"ne handshake timed out"))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.broker.inbound, [])
        self.assertEqual(self.broker.counters["tcpd: handshakes timed out"], 1)

    def test_partial_frame_then_deadline(self) -> None:
        protocol, transport = self.inbound()
        protocol.dataReceived(b"\0\0\0\x04po")
        self.reactor.advance(4.0)
        self.assertEqual(transport.value(), wire.encode(b"ne handshake timed out"))
        self.assertEqual(self.broker.inbound, [])

    def test_eof_during_handshake_closes(self) -> None:
        protocol, transport = self.inbound()
        protocol.dataReceived(b"\0\0")
        protocol.readConnectionLost()
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_eof_while_pending_cancels(self) -> None:
        protocol, transport = self.inbound()
        protocol.dataReceived(b"pong")
        protocol.readConnectionLost()
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.broker.cancelled, ["pong"])
        self.assertEqual(transport.value(), b"")

    def test_accepted_raw(self) -> None:
        """
        On success the peer's socket is taken from its transport and handed
        with the service's socket to the relay loop, with a raw C{ok} for
        the raw peer to get first; nothing goes through the transport.
        """
        protocol, transport = self.inbound()
        protocol.dataReceived(b"pong")
        sock = FakeSocket(fd=7)
        self.broker.inbound[0][2].callback(sock)
        [joined] = self.relays.joined
        self.assertIs(joined.a, transport.handle)
        self.assertIs(joined.b, sock)
        self.assertEqual((joined.greeting, joined.early), (b"ok", b""))
        self.assertEqual(transport.events, ["stopReading", "stopWriting"])
        self.assertEqual(transport.value(), b"")
        self.assertFalse(transport.disconnecting)
        self.assertFalse(sock.closed)
        [stats] = self.broker.relays
        self.assertIs(joined.stats, stats)
        self.assertEqual(
            (stats.direction, stats.service, stats.description, stats.labels),
            ("in", "pong", "192.168.1.1:54321", ("ip:192.168.1.1",)),
        )

    def test_idle_timeout_as_of_the_join(self) -> None:
        """
        A relay gets the idle deadline configured when it starts: a reload
        while its request is served applies to it.
        """
        protocol, transport = self.inbound()
        protocol.dataReceived(b"pong")
        self.broker.config = config(idle_timeout=7.5)
        self.broker.inbound[0][2].callback(FakeSocket())
        [joined] = self.relays.joined
        self.assertEqual(joined.idle_timeout, 7.5)

    def test_accepted_framed_with_early_data(self) -> None:
        """
        A framed request gets a framed C{ok}; bytes the peer sent after its
        request, before the relay starts, go to the service first.
        """
        protocol, transport = self.inbound()
        protocol.dataReceived(wire.encode(b"pong") + wire.encode(b"early"))
        protocol.dataReceived(wire.encode(b"late"))
        self.broker.inbound[0][2].callback(FakeSocket())
        [joined] = self.relays.joined
        self.assertEqual(joined.greeting, wire.encode(b"ok"))
        self.assertEqual(joined.early, wire.encode(b"early") + wire.encode(b"late"))
        self.assertEqual(transport.value(), b"")

    def test_early_data_is_bounded(self) -> None:
        """
        While the request is served, the peer's further bytes are held up to
        a read's worth; then reading pauses (the rest waits in the kernel).
        """
        protocol, transport = self.inbound()
        protocol.dataReceived(b"pong")
        protocol.dataReceived(b"x" * (READ_SIZE - 1))
        self.assertEqual(transport.producerState, "producing")
        protocol.dataReceived(b"x")
        self.assertEqual(transport.producerState, "paused")
        self.broker.inbound[0][2].callback(FakeSocket())
        [joined] = self.relays.joined
        self.assertEqual(joined.early, b"x" * READ_SIZE)

    def test_connection_lost_while_pending(self) -> None:
        protocol, transport = self.inbound()
        protocol.dataReceived(b"pong")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.broker.cancelled, ["pong"])
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(transport.value(), b"")

    def test_control_uri(self) -> None:
        protocol, transport = self.control()
        self.assertEqual(protocol.who, Peer("unknown local client"))
        protocol.dataReceived(wire.encode(b"tcp://127.0.0.1:9/pong"))
        [(uri, _, d)] = self.broker.uris
        self.assertIsInstance(uri, RemoteURI)
        self.assertEqual(
            (uri.scheme, uri.host, uri.port, uri.service),
            ("tcp", "127.0.0.1", 9, "pong"),
        )
        sock = FakeSocket()
        d.callback(sock)
        [joined] = self.relays.joined
        self.assertEqual((joined.a, joined.b), (transport.handle, sock))
        self.assertEqual(joined.greeting, wire.encode(b"ok"))
        self.assertEqual(joined.stats.direction, "out")

    def test_control_refuses_other_schemes(self) -> None:
        for request in (b"tls://127.0.0.1:9/pong", b"pong", b"unix:///x/y"):
            protocol, transport = self.control()
            protocol.dataReceived(wire.encode(request))
            answer = transport.value()
            self.assertTrue(
                answer.startswith(wire.HEADER.pack(len(answer) - 4) + b"ne "),
                answer,
            )
            self.assertTrue(transport.disconnecting)
        self.assertEqual(self.broker.uris, [])

    def test_control_refuses_junk(self) -> None:
        protocol, transport = self.control()
        protocol.dataReceived(wire.encode(b"tcp://[nope/pong"))
        answer = transport.value()
        self.assertEqual(wire.HEADER.unpack_from(answer)[0], len(answer) - 4)
        self.assertTrue(answer[4:].startswith(b"ne "), answer)
        self.assertEqual(self.broker.uris, [])

    def test_control_refusal_is_framed(self) -> None:
        protocol, transport = self.control()
        protocol.dataReceived(wire.encode(b"tcp://127.0.0.1:9/pong"))
        self.broker.uris[0][2].errback(Refused("out connection denied"))
        self.assertEqual(transport.value(), wire.encode(b"ne out connection denied"))

    def test_control_deadline(self) -> None:
        _, transport = self.control()
        self.reactor.advance(4.0)
        self.assertEqual(transport.value(), wire.encode(b"ne handshake timed out"))
        self.assertTrue(transport.disconnecting)

    def test_control_eof_closes(self) -> None:
        protocol, transport = self.control()
        protocol.dataReceived(b"\0\0\0\x20tcp://")
        protocol.readConnectionLost()
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.broker.uris, [])


# The control socket.


class ControlTests(SynchronousTestCase):
    def ask(self, command: bytes, handlers: dict[str, Any]) -> tuple[Any, Any]:
        protocol = ControlFactory(handlers, clock=MemoryReactorClock()).buildProtocol(
            None
        )
        transport = connect(protocol)
        protocol.dataReceived(wire.encode(command))
        answer = transport.value()
        (size,) = wire.HEADER.unpack_from(answer)
        self.assertEqual(size, len(answer) - 4)
        return json.loads(answer[4:]), transport

    def test_status(self) -> None:
        answer, transport = self.ask(b"status", {"status": lambda: {"ok": True}})
        self.assertEqual(answer, {"ok": True})
        self.assertTrue(transport.disconnecting)

    def test_unknown_command(self) -> None:
        answer, _ = self.ask(b"explode", {"status": lambda: {"ok": True}})
        self.assertEqual(answer["ok"], False)
        self.assertIn("explode", answer["error"])

    def test_oversized_command(self) -> None:
        protocol = ControlFactory({}, clock=MemoryReactorClock()).buildProtocol(None)
        transport = connect(protocol)
        protocol.dataReceived(wire.HEADER.pack(2048))
        self.assertTrue(transport.disconnecting)

    def test_deadline(self) -> None:
        """
        The command must arrive and be answered within the timeout, counted
        from the connect, whatever arrives meanwhile; then the client is
        aborted and counted.
        """
        clock = MemoryReactorClock()
        counters: Counter[str] = Counter()
        factory = ControlFactory({}, 10.0, clock, counters=counters)
        protocol = factory.buildProtocol(None)
        transport = connect(protocol)
        clock.advance(6)
        protocol.dataReceived(wire.HEADER.pack(6) + b"sta")  # slowly...
        clock.advance(3.9)
        self.assertFalse(transport.disconnecting)
        clock.advance(0.1)
        self.assertTrue(transport.disconnected, "not aborted")
        self.assertEqual(counters["control requests timed out"], 1)
        self.assertEqual(transport.value(), b"")

    def test_deadline_current_value(self) -> None:
        """A callable timeout is read at each connect (reload)."""
        clock = MemoryReactorClock()
        factory = ControlFactory({}, lambda: 2.0, clock)
        transport = connect(factory.buildProtocol(None))
        clock.advance(2)
        self.assertTrue(transport.disconnecting)

    def test_waitedAnswerNotCut(self) -> None:
        """
        An answer that is not there at once (a reload at the reload gate)
        does not count against the deadline; once there, it has a whole
        timeout to be sent.
        """
        clock = MemoryReactorClock()
        counters: Counter[str] = Counter()
        waiting: Deferred[dict[str, Any]] = Deferred()
        factory = ControlFactory(
            {"reload": lambda: waiting}, 1.0, clock, counters=counters
        )
        protocol = factory.buildProtocol(None)
        # Closed once the answer is written (not at once, as some fakes do).
        transport = connect(protocol, StringTransport())
        clock.advance(0.5)
        protocol.dataReceived(wire.encode(b"reload"))
        clock.advance(5)
        self.assertFalse(transport.disconnecting)
        waiting.callback({"ok": True})
        self.assertEqual(json.loads(transport.value()[4:]), {"ok": True})
        self.assertTrue(transport.disconnecting)
        [deadline] = clock.getDelayedCalls()
        self.assertEqual(deadline.getTime(), clock.seconds() + 1.0)
        self.assertEqual(counters["control requests timed out"], 0)

    def test_waitedAnswerAfterClose(self) -> None:
        """A client gone while its answer waits leaves no deadline behind."""
        clock = MemoryReactorClock()
        waiting: Deferred[dict[str, Any]] = Deferred()
        factory = ControlFactory({"reload": lambda: waiting}, 1.0, clock)
        protocol = factory.buildProtocol(None)
        connect(protocol, StringTransport())
        protocol.dataReceived(wire.encode(b"reload"))
        protocol.connectionLost(Failure(ConnectionDone()))
        waiting.callback({"ok": True})
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_deadline_cancelled_when_closed(self) -> None:
        clock = MemoryReactorClock()
        factory = ControlFactory({"status": lambda: {"ok": True}}, 10.0, clock)
        protocol = factory.buildProtocol(None)
        connect(protocol)
        protocol.dataReceived(wire.encode(b"status"))
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(clock.getDelayedCalls(), [])

    def broker(self) -> Broker:
        broker = Broker(
            config(rules=(parse_rule("deny in secret *"),)), MemoryReactorClock()
        )
        broker.counters.update({"lookups": 3, "refused": 1})
        broker.relays.add(
            RelayStats(
                description="10.0.0.2:5555",
                direction="in",
                service="pong",
                route="tcp inbound",
                labels=("ip:10.0.0.2",),
                forward=2048,
                backward=10,
            )
        )
        return broker

    def test_status_report(self) -> None:
        report = status_report(self.broker())
        json.dumps(report)  # plain JSON values only
        [connection] = report["connections"]
        self.assertEqual(connection["service"], "pong")
        self.assertEqual(connection["labels"], ["ip:10.0.0.2"])
        self.assertEqual((connection["bytes_in"], connection["bytes_out"]), (2048, 10))
        self.assertEqual(report["counters"], {"lookups": 3, "refused": 1})
        self.assertEqual(report["config"]["rules"], ["deny in secret *"])
        self.assertEqual(report["config"]["rundir"], RUNDIR)

    def test_format_status(self) -> None:
        broker = self.broker()
        broker.relays.add(RelayStats(description="pid 1 uid 0", service="auth"))
        text = format_status(status_report(broker))
        lines = text.splitlines()
        self.assertIn("connections: 2", lines)
        self.assertIn("counters:", lines)
        self.assertIn("  lookups: 3", lines)
        self.assertIn("  refused: 1", lines)
        [header] = [line for line in lines if line.startswith("DIR")]
        self.assertEqual(
            header.split(), ["DIR", "SERVICE", "ROUTE", "PEER", "IN", "OUT", "AGE"]
        )
        rows = [line for line in lines if "10.0.0.2:5555" in line or "pid 1" in line]
        self.assertEqual(len(rows), 2)
        [pong] = [row for row in rows if "pong" in row]
        self.assertIn("2.0 KiB", pong)
        self.assertIn("10 B", pong)
        self.assertIn("tcp inbound", pong)

    def test_format_status_fits(self) -> None:
        """
        Within 100 columns by default, whatever the names, with a note when
        something was cut; --wide shows everything, TLS details once.
        """
        broker = self.broker()
        long_route = "tls://" + "far-away-host." * 5 + "example.net:9001/" + "s" * 40
        broker.relays.add(
            TlsRelayStats(
                description="[2001:db8:aaaa:bbbb:cccc:dddd:eeee:ffff]:65000 (psk:x)",
                direction="out",
                service="a-rather-long-service-name-" + "x" * 30,
                route=long_route,
                tls={
                    "version": "TLSv1.3",
                    "cipher": "TLS_AES_256_GCM_SHA384",
                    "peer": "psk:alice",
                },
            )
        )
        narrow = format_status(status_report(broker)).splitlines()
        self.assertLessEqual(max(len(line) for line in narrow), 100, narrow)
        self.assertEqual(
            narrow[-1], "(cut to 100 columns: ipcd status --wide or --json)"
        )
        [header] = [line for line in narrow if line.startswith("DIR")]
        self.assertNotIn("DETAILS", header)
        self.assertNotIn("TLSv1.3", "\n".join(narrow))
        wide = format_status(status_report(broker), wide=True)
        self.assertIn(long_route, wide)
        self.assertIn(
            "tls: version TLSv1.3, cipher TLS_AES_256_GCM_SHA384, peer psk:alice", wide
        )
        self.assertEqual(wide.count("TLSv1.3"), 1)
        self.assertNotIn("(cut to", wide)

    def test_format_status_no_connections(self) -> None:
        broker = Broker(config(), MemoryReactorClock())
        text = format_status(status_report(broker))
        self.assertIn("connections: 0", text.splitlines())
        self.assertNotIn("DIR", text)


# The JSON log.


class JsonLogTests(SynchronousTestCase):
    def test_policy_decision_as_json(self) -> None:
        out = io.StringIO()
        observer = json_observer(out)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        broker = Broker(
            config(
                rules=(
                    parse_rule("allow local pong uid:0"),
                    parse_rule("deny local pong *"),
                )
            ),
            MemoryReactorClock(),
        )
        client = Peer("pid 9 uid 1000", frozenset({"uid:1000", "user:alice"}), 9, 1000)
        self.failureResultOf(broker.open(b"pong;", client), Refused)

        events = [json.loads(line) for line in out.getvalue().splitlines() if line]
        [event] = [e for e in events if "direction" in e]
        self.assertEqual(event["direction"], "local")
        self.assertEqual(event["service"], "pong")
        self.assertEqual(event["who"], "pid 9 uid 1000")
        self.assertEqual(event["labels"], ["uid:1000", "user:alice"])
        self.assertEqual(event["rule"], "deny local pong *")
        self.assertIs(event["allowed"], False)
        self.assertEqual(event["verdict"], "denied by rule 2 (deny local pong *)")
        self.assertIsNone(event["target"])
        self.assertIn("denied", event["outcome"])
        for key in ("direction", "service", "who", "labels", "rule", "allowed"):
            # Plain values, not {"unpersistable": true}.
            self.assertIsInstance(event[key], (str, list, bool))
        # The text says the verdict once, although the outcome holds it.
        text = event["text"]
        self.assertEqual(text.count("denied by rule 2"), 1, text)
        self.assertTrue(text.endswith(" denied by rule 2 (deny local pong *)"), text)

    # The framing over a simulated connection.

    def test_peer_text_escaped(self) -> None:
        """
        Text a peer controls (a requested name, an error's message) reaches
        the log with its control characters escaped, in the text and the
        JSON form alike.
        """
        out = io.StringIO()
        observer = json_observer(out)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

        class Broken:
            scheme = "fake"

            def connect(self, target: Any, client: Any) -> Deferred[Any]:
                raise ValueError("bo\x1b[2Jom")

        routes = {"x": parse_uri("fake://h:1/x")}
        broker = Broker(config(routes=routes), MemoryReactorClock(), {"fake": Broken()})
        client = Peer("pid 9 uid 0", frozenset({"uid:0"}), 9, 0)
        self.failureResultOf(broker.open(b"x;", client), ValueError)
        self.failureResultOf(broker.open(b"\x1b[2J;", client), Refused)
        remote = Peer("10.0.0.1:1", frozenset({"ip:10.0.0.1"}))
        self.failureResultOf(broker.open_inbound("po\x1bng", remote), Refused)

        events = [json.loads(line) for line in out.getvalue().splitlines() if line]
        events = [e for e in events if "direction" in e]
        self.assertEqual(len(events), 3)
        for event in events:
            for key in ("service", "who", "target", "outcome", "verdict"):
                self.assertTrue(str(event[key]).isprintable(), (key, event[key]))
            self.assertTrue(event["text"].isprintable(), event["text"])
        self.assertEqual(events[0]["outcome"], "internal error: bo\\x1b[2Jom")
        self.assertEqual(events[1]["service"], "\\x1b[2J;")
        self.assertIn("po\\x1bng", events[2]["outcome"])


class SmallWrites(iosim.FakeTransport):
    """Hands at most C{chunk} bytes to the pump at a time."""

    chunk = 4093  # odd-sized: headers land across reads

    def getOutBuffer(self) -> bytes | None:  # noqa: N802 (iosim's name)
        data = b"".join(self.stream)
        if not data:
            return None
        out, rest = data[: self.chunk], data[self.chunk :]
        self.stream = [rest] if rest else []
        return out


class FramingOverIOSimTests(SynchronousTestCase):
    def test_large_message_in_small_pieces(self) -> None:
        class Peer(wire.MessageProtocol):
            clock = MemoryReactorClock()  # the idle timers: not the reactor's

            def __init__(self) -> None:
                self.received: list[bytes] = []

            def messageReceived(self, payload: bytes) -> None:
                self.received.append(payload)

        client, server, pump = iosim.connectedServerAndClient(
            Peer,
            Peer,
            clientTransportFactory=lambda p: SmallWrites(p, isServer=False),
            serverTransportFactory=lambda p: SmallWrites(p, isServer=True),
        )
        big = bytes(range(256)) * 4096  # 1 MiB: exactly the default limit
        client.sendMessage(big)
        client.sendMessage(b"after")
        server.sendMessage(b"small")
        pumps = 0
        while pump.pump():
            pumps += 1
        self.assertGreater(pumps, 200)
        self.assertEqual(len(server.received), 2)
        self.assertTrue(server.received[0] == big, "1 MiB message corrupted")
        self.assertEqual(server.received[1], b"after")
        self.assertEqual(client.received, [b"small"])
        self.assertFalse(server.transport.disconnecting)
