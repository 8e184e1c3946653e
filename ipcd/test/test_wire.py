"""
Tests for L{ipcd.wire}: the libipc framing, for Twisted protocols and for
blocking sockets.
"""

from __future__ import annotations

import mmap
import os
import socket
from collections import Counter
from typing import Any

from twisted.internet import abstract, reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.interfaces import IConsumer
from twisted.internet.testing import (
    EventLoggingObserver,
    MemoryReactorClock,
    StringTransport,
)
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from ipcd import wire
from ipcd.compat.twisted import buffered
from ipcd.test.support import TIMEOUT, short_rundir, wait_until
from ipcd.wire import (
    DEFAULT_MAX_MESSAGE_SIZE,
    HEADER,
    PIECE_OVERHEAD,
    WRITE_BOUND,
    MessageFactory,
    MessageProtocol,
    MessageTooLarge,
    PartialMessageBudget,
    encode,
    recv_exactly,
    recv_message,
    send_message,
)

# The exact bytes upstream's pong sends to pongd (libipc-wire.md).
BOUNCE_ME = bytes.fromhex("00000009") + b"bounce me"


class WriteCountingTransport(StringTransport):
    """A L{StringTransport} that remembers each C{write} separately."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


class Unsent(abstract.FileDescriptor):
    """Twisted's own write buffer and producer pausing; nothing leaves it."""

    def writeSomeData(self, data: bytes) -> int:  # noqa: N802 (Twisted's name)
        return 0


class Recorder(MessageProtocol):
    """Records what the base class delivers."""

    def __init__(self, maxMessageSize: int | None = None) -> None:  # noqa: N803
        self.messages: list[bytes] = []
        self.tooLarge: list[int] = []
        self.clock = MemoryReactorClock()  # the idle timer: not the reactor's
        if maxMessageSize is not None:
            self.maxMessageSize = maxMessageSize

    def messageReceived(self, payload: bytes) -> None:
        self.messages.append(payload)

    def messageTooLarge(self, size: int) -> None:
        self.tooLarge.append(size)


def connected(
    protocol: MessageProtocol,
) -> WriteCountingTransport:
    transport = WriteCountingTransport()
    protocol.makeConnection(transport)
    return transport


class EncodeTests(SynchronousTestCase):
    def test_upstreamBytes(self) -> None:
        """
        C{encode} produces exactly what upstream's pong puts on the wire:
        a u32 big-endian length, then the payload.
        """
        self.assertEqual(encode(b"bounce me"), BOUNCE_ME)
        self.assertEqual(
            BOUNCE_ME, b"\x00\x00\x00\x09\x62\x6f\x75\x6e\x63\x65\x20\x6d\x65"
        )

    def test_empty(self) -> None:
        self.assertEqual(encode(b""), b"\x00\x00\x00\x00")

    def test_bigEndian(self) -> None:
        self.assertEqual(encode(b"x" * 0x0102)[:4], b"\x00\x00\x01\x02")

    def test_defaultLimit(self) -> None:
        self.assertEqual(DEFAULT_MAX_MESSAGE_SIZE, 1024 * 1024)
        self.assertEqual(MessageProtocol.maxMessageSize, 1024 * 1024)

    def test_textSaysEncodeIt(self) -> None:
        """
        Text given as a message (sendMessage("hi") in a service): a
        TypeError saying a message is bytes, not "can't concat str to
        bytes"; bytes-like payloads frame as bytes.
        """
        error = self.assertRaises(TypeError, encode, "hi")
        self.assertEqual(
            str(error),
            "a message is bytes, not str (text is sent encoded: 'text'.encode())",
        )
        transport = StringTransport()
        protocol = MessageProtocol()
        protocol.clock = MemoryReactorClock()
        protocol.makeConnection(transport)
        error = self.assertRaises(TypeError, protocol.sendMessage, "hi")
        self.assertIn("a message is bytes, not str", str(error))
        self.assertEqual(encode(bytearray(b"hi")), encode(memoryview(b"hi")))
        self.assertEqual(encode(bytearray(b"hi")), b"\x00\x00\x00\x02hi")

    def test_overFourGiBSaysTheBound(self) -> None:
        """
        A payload the u32 header cannot announce (a 4 GiB mmap of a file,
        say): a ValueError saying the bound, from C{encode},
        C{send_message} (nothing written) and C{sendMessage}, not
        struct's C{'I' format requires ...}.
        """
        path = self.mktemp()
        with open(path, "wb") as f:
            f.truncate(2**32)  # sparse: no disk, no memory is spent
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
            with memoryview(m) as huge:
                said = "a message is at most 4294967295 bytes"
                error = self.assertRaises(ValueError, encode, huge)
                self.assertEqual(str(error), said)
                a, b = socket.socketpair()
                self.addCleanup(a.close)
                self.addCleanup(b.close)
                error = self.assertRaises(ValueError, send_message, a, huge)
                self.assertEqual(str(error), said)
                b.setblocking(False)
                self.assertRaises(BlockingIOError, b.recv, 1)
                transport = StringTransport()
                protocol = MessageProtocol()
                protocol.clock = MemoryReactorClock()
                protocol.makeConnection(transport)
                error = self.assertRaises(ValueError, protocol.sendMessage, huge)
                self.assertEqual(str(error), said)
                self.assertEqual(transport.value(), b"")

    def test_factoryOfAProtocolClass(self) -> None:
        """
        MessageFactory(Upper()) (an instance): refused when made, not with
        a traceback on every connection.
        """
        error = self.assertRaises(TypeError, MessageFactory, MessageProtocol())
        self.assertIn("MessageFactory: expected a protocol class", str(error))


class MessageProtocolTests(SynchronousTestCase):
    def test_sendMessageOneWrite(self) -> None:
        """
        Header and payload go out in a single write: upstream receivers do
        one read per message.
        """
        protocol = Recorder()
        transport = connected(protocol)
        protocol.sendMessage(b"bounce me")
        self.assertEqual(transport.writes, [BOUNCE_ME])
        self.assertEqual(transport.value(), BOUNCE_ME)

    def test_sendSeveral(self) -> None:
        protocol = Recorder()
        transport = connected(protocol)
        protocol.sendMessage(b"a")
        protocol.sendMessage(b"")
        protocol.sendMessage(b"x" * 100_000)
        self.assertEqual(
            transport.writes, [encode(b"a"), encode(b""), encode(b"x" * 100_000)]
        )

    def test_receiveUpstreamBytes(self) -> None:
        protocol = Recorder()
        connected(protocol)
        protocol.dataReceived(BOUNCE_ME)
        self.assertEqual(protocol.messages, [b"bounce me"])

    def test_partialByteByByte(self) -> None:
        """
        A message arriving one byte at a time is delivered once, complete,
        and only when its last byte arrives.
        """
        protocol = Recorder()
        connected(protocol)
        for i, byte in enumerate(BOUNCE_ME):
            self.assertEqual(protocol.messages, [], f"delivered early at byte {i}")
            protocol.dataReceived(bytes([byte]))
        self.assertEqual(protocol.messages, [b"bounce me"])

    def test_partialHeaderThenRest(self) -> None:
        protocol = Recorder()
        connected(protocol)
        protocol.dataReceived(BOUNCE_ME[:3])
        protocol.dataReceived(BOUNCE_ME[3:7])
        self.assertEqual(protocol.messages, [])
        protocol.dataReceived(BOUNCE_ME[7:])
        self.assertEqual(protocol.messages, [b"bounce me"])

    def test_coalesced(self) -> None:
        """Several messages in one C{dataReceived} are all delivered, in order."""
        protocol = Recorder()
        connected(protocol)
        protocol.dataReceived(encode(b"one") + encode(b"") + encode(b"three"))
        self.assertEqual(protocol.messages, [b"one", b"", b"three"])

    def test_coalescedWithPartialTail(self) -> None:
        protocol = Recorder()
        connected(protocol)
        stream = encode(b"one") + encode(b"two") + encode(b"three")
        protocol.dataReceived(stream[:-2])
        self.assertEqual(protocol.messages, [b"one", b"two"])
        protocol.dataReceived(stream[-2:])
        self.assertEqual(protocol.messages, [b"one", b"two", b"three"])

    def test_exactlyAtLimit(self) -> None:
        protocol = Recorder(maxMessageSize=10)
        transport = connected(protocol)
        protocol.dataReceived(encode(b"x" * 10))
        self.assertEqual(protocol.messages, [b"x" * 10])
        self.assertFalse(transport.disconnecting)
        self.assertEqual(protocol.tooLarge, [])

    def test_oversizedClosesConnection(self) -> None:
        """
        A header announcing more than C{maxMessageSize} closes the
        connection, calls the C{messageTooLarge} hook with the announced size
        and logs a warning naming the size and the limit.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        protocol = Recorder(maxMessageSize=10)
        transport = connected(protocol)
        protocol.dataReceived(HEADER.pack(11))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(protocol.tooLarge, [11])
        self.assertEqual(protocol.messages, [])
        warnings = [e for e in events if e.get("log_level").name == "warn"]
        self.assertEqual(len(warnings), 1, list(events))
        self.assertEqual(warnings[0]["log_logger"].namespace, Recorder.log.namespace)
        reason = warnings[0]["reason"]
        self.assertIn("11 bytes", reason)
        self.assertIn("10 bytes", reason)
        self.assertEqual(warnings[0]["peer"], str(transport.getPeer()))

    def test_oversizedOnlyThatConnection(self) -> None:
        """Another connection of the same class carries on."""
        big = Recorder(maxMessageSize=10)
        bigTransport = connected(big)
        other = Recorder(maxMessageSize=10)
        otherTransport = connected(other)
        big.dataReceived(HEADER.pack(1000))
        other.dataReceived(encode(b"fine"))
        self.assertTrue(bigTransport.disconnecting)
        self.assertFalse(otherTransport.disconnecting)
        self.assertEqual(other.messages, [b"fine"])

    def test_messagesBeforeOversizedAreDelivered(self) -> None:
        protocol = Recorder(maxMessageSize=10)
        transport = connected(protocol)
        protocol.dataReceived(encode(b"ok") + HEADER.pack(11) + b"x" * 11)
        self.assertEqual(protocol.messages, [b"ok"])
        self.assertTrue(transport.disconnecting)

    def test_nothingDeliveredAfterOversized(self) -> None:
        """
        Once a message was too large, neither it nor anything after it is
        delivered, and the hook and the log fire only once.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        protocol = Recorder(maxMessageSize=10)
        connected(protocol)
        protocol.dataReceived(HEADER.pack(11) + b"y" * 11 + encode(b"later"))
        protocol.dataReceived(encode(b"even later"))
        protocol.dataReceived(b"z" * 50)
        self.assertEqual(protocol.messages, [])
        self.assertEqual(protocol.tooLarge, [11])
        warnings = [e for e in events if e.get("log_level").name == "warn"]
        self.assertEqual(len(warnings), 1)

    def test_hookRunsBeforeClose(self) -> None:
        """C{messageTooLarge} may still answer before the connection closes."""

        class Answering(Recorder):
            def messageTooLarge(self, size: int) -> None:
                self.sendMessage(b"ne too large")

        protocol = Answering(maxMessageSize=4)
        transport = connected(protocol)
        protocol.dataReceived(HEADER.pack(5))
        self.assertEqual(transport.value(), encode(b"ne too large"))
        self.assertTrue(transport.disconnecting)

    def test_defaultMessageReceived(self) -> None:
        """The base class insists on being subclassed."""
        protocol = MessageProtocol()
        protocol.clock = MemoryReactorClock()
        protocol.makeConnection(StringTransport())
        self.assertRaises(NotImplementedError, protocol.messageReceived, b"x")


class BlockingHelperTests(SynchronousTestCase):
    def pair(self) -> tuple[socket.socket, socket.socket]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        # Bound every wait: a broken helper fails instead of hanging.
        a.settimeout(10)
        b.settimeout(10)
        return a, b

    def test_sendUpstreamBytes(self) -> None:
        a, b = self.pair()
        send_message(a, b"bounce me")
        self.assertEqual(recv_exactly(b, len(BOUNCE_ME)), BOUNCE_ME)

    def test_sendIsOneSegment(self) -> None:
        """
        The whole message is available to a single C{recv} on the other
        side: it went out in one write.
        """
        a, b = self.pair()
        send_message(a, b"bounce me")
        self.assertEqual(b.recv(4096), BOUNCE_ME)

    def test_recvUpstreamBytes(self) -> None:
        a, b = self.pair()
        a.sendall(BOUNCE_ME)
        self.assertEqual(recv_message(b), b"bounce me")

    def test_roundTrip(self) -> None:
        a, b = self.pair()
        for payload in [b"", b"x", bytes(range(256)), b"z" * 100_000]:
            send_message(a, payload)
            self.assertEqual(recv_message(b), payload)

    def test_recvCoalesced(self) -> None:
        a, b = self.pair()
        a.sendall(encode(b"one") + encode(b"two"))
        self.assertEqual(recv_message(b), b"one")
        self.assertEqual(recv_message(b), b"two")

    def test_recvExactlyAcrossWrites(self) -> None:
        a, b = self.pair()
        a.sendall(b"ab")
        a.sendall(b"cd")
        a.sendall(b"e")
        self.assertEqual(recv_exactly(b, 5), b"abcde")

    def test_eofMidHeader(self) -> None:
        a, b = self.pair()
        a.sendall(b"\x00\x00")
        a.close()
        error = self.assertRaises(EOFError, recv_message, b)
        self.assertIn("2 of 4", str(error))

    def test_eofMidPayload(self) -> None:
        a, b = self.pair()
        a.sendall(BOUNCE_ME[:-3])
        a.shutdown(socket.SHUT_WR)
        error = self.assertRaises(EOFError, recv_message, b)
        self.assertIn("6 of 9", str(error))

    def test_eofBeforeAnything(self) -> None:
        a, b = self.pair()
        a.shutdown(socket.SHUT_WR)
        self.assertRaises(EOFError, recv_message, b)

    def test_recvTooLarge(self) -> None:
        """
        A header over the limit raises L{MessageTooLarge} without reading
        the payload.
        """
        a, b = self.pair()
        a.sendall(HEADER.pack(11) + b"x" * 11)
        error = self.assertRaises(MessageTooLarge, recv_message, b, 10)
        self.assertEqual((error.size, error.limit), (11, 10))
        self.assertIn("11", str(error))
        self.assertIsInstance(error, ValueError)

    def test_recvDefaultLimit(self) -> None:
        a, b = self.pair()
        a.sendall(HEADER.pack(DEFAULT_MAX_MESSAGE_SIZE + 1))
        error = self.assertRaises(MessageTooLarge, recv_message, b)
        self.assertEqual(error.limit, DEFAULT_MAX_MESSAGE_SIZE)


class LinearFramingTests(SynchronousTestCase):
    """
    Assembling a message costs copies linear in its size, whatever the size
    of each read: every copy of payload bytes goes through C{wire._join},
    counted here.  (C{Int32StringReceiver} re-joined the whole partial
    buffer on every read: 1 MiB in 512-byte reads copied about 1 GiB.)
    """

    def countCopies(self) -> list[int]:
        copied: list[int] = []
        real = wire._join

        def counting(pieces: Any) -> bytes:
            joined = real(pieces)
            copied.append(len(joined))
            return joined

        self.patch(wire, "_join", counting)
        return copied

    def test_megabyteIn512BytePieces(self) -> None:
        copied = self.countCopies()
        protocol = Recorder()
        connected(protocol)
        big = bytes(range(256)) * 4096  # 1 MiB, the default limit
        stream = encode(big)
        for start in range(0, len(stream), 512):
            protocol.dataReceived(stream[start : start + 512])
        self.assertTrue(protocol.messages == [big], "1 MiB message corrupted")
        # The first read's tail (it follows the header), then one join of
        # the whole message: each byte copied at most twice, most once.
        self.assertEqual(copied, [512 - HEADER.size, len(big)])

    def test_anyReadSizeAtMostTwoCopies(self) -> None:
        """
        Coalesced messages of several sizes, cut in reads of odd sizes: no
        byte is copied more than twice (a read's tail that starts a message,
        then the message).
        """
        payloads = [bytes([i % 251]) * size for i, size in enumerate([0, 1, 70_000])]
        payloads *= 3
        stream = b"".join(encode(p) for p in payloads)
        for size in (1, 7, 512, 4093, 65536):
            copied = self.countCopies()
            protocol = Recorder()
            connected(protocol)
            for start in range(0, len(stream), size):
                protocol.dataReceived(stream[start : start + size])
            self.assertTrue(protocol.messages == payloads, f"corrupted at {size}")
            self.assertLessEqual(sum(copied), 2 * len(stream), f"reads of {size}")


class BackpressureTests(SynchronousTestCase):
    def test_pausesReadingWhileWriteBufferFull(self) -> None:
        """
        The transport gets a streaming producer that pauses and resumes the
        transport itself: Twisted's transports pause it while their write
        buffer is over their bound, so we stop reading.
        """
        protocol = Recorder()
        transport = connected(protocol)
        self.assertTrue(transport.streaming)
        transport.producer.pauseProducing()
        self.assertEqual(transport.producerState, "paused")
        transport.producer.resumeProducing()
        self.assertEqual(transport.producerState, "producing")

    def test_severalMessagesBeforePausing(self) -> None:
        """
        On Twisted's own write buffering, messages may fill C{writeBound}
        before the connection stops reading (Twisted's 64 KiB bound paused
        it after every 64 KiB message); the read size stays Twisted's, and
        other writes keep Twisted's bound.
        """
        protocol = Recorder()
        transport = Unsent(MemoryReactorClock())
        transport.connected = True
        protocol.makeConnection(transport)
        # Four messages of 64 KiB with their headers: 256 KiB exactly.
        for _ in range(4):
            protocol.sendMessage(b"m" * (64 * 1024 - HEADER.size))
        self.assertFalse(transport.producerPaused)
        self.assertEqual(transport.bufferSize, Unsent.bufferSize)
        protocol.sendMessage(b"")
        self.assertTrue(transport.producerPaused)

        transport = Unsent(MemoryReactorClock())
        transport.connected = True
        protocol.makeConnection(transport)
        transport.write(b"w" * (Unsent.bufferSize + 1))
        self.assertTrue(transport.producerPaused)

    def test_pausedThenClosingUnregisters(self) -> None:
        """
        Resumed while its transport is disconnecting (loseConnection came
        while paused), the producer unregisters itself, so that the
        transport may close; a transport that does not say it is
        disconnecting (no such attribute: not one of Twisted's) is resumed.
        """
        protocol = Recorder()
        transport = connected(protocol)
        producer = transport.producer
        producer.pauseProducing()
        transport.loseConnection()
        producer.resumeProducing()
        self.assertIsNone(transport.producer)
        self.assertEqual(transport.producerState, "paused")

        @implementer(IConsumer)
        class Bare:
            producer: Any = None
            resumed = 0

            def registerProducer(self, producer: Any, streaming: bool) -> None:  # noqa: N802
                self.producer = producer

            def resumeProducing(self) -> None:  # noqa: N802
                self.resumed += 1

        bare = Bare()
        protocol = Recorder()
        protocol.makeConnection(bare)
        bare.producer.resumeProducing()
        self.assertEqual(bare.resumed, 1)
        self.assertIsNotNone(bare.producer)

    def test_restOfAReadWaitsUntilResumed(self) -> None:
        """
        Paused by its transport while delivering a read, the protocol
        delivers nothing more of it (nor of what comes meanwhile) until
        resumed; then the rest, in order, until paused again, and the
        transport is read again once all of it went.
        """

        class Pauses(Recorder):
            def messageReceived(self, payload: bytes) -> None:
                super().messageReceived(payload)
                if payload in (b"b", b"c"):  # its answers fill the buffer
                    self.transport.producer.pauseProducing()

        protocol = Pauses()
        transport = connected(protocol)
        stream = encode(b"a") + encode(b"b") + encode(b"c") + encode(b"dd")
        protocol.dataReceived(stream[:-1])
        self.assertEqual(protocol.messages, [b"a", b"b"])
        protocol.dataReceived(stream[-1:])  # a wrapper's, while paused
        self.assertEqual(protocol.messages, [b"a", b"b"])
        transport.producer.resumeProducing()
        self.assertEqual(protocol.messages, [b"a", b"b", b"c"])
        self.assertEqual(transport.producerState, "paused")
        transport.producer.resumeProducing()
        self.assertEqual(protocol.messages, [b"a", b"b", b"c", b"dd"])
        self.assertEqual(transport.producerState, "producing")

    def test_subclassConnectionMadeKeepsIt(self) -> None:
        class Own(Recorder):
            def connectionMade(self) -> None:
                self.made = True

        protocol = Own()
        transport = connected(protocol)
        self.assertIsNotNone(transport.producer)


class Echo(MessageProtocol):
    def messageReceived(self, payload: bytes) -> None:
        self.sendMessage(payload)


def read_to_eof(sock: socket.socket) -> bytes:
    """All C{sock} receives until EOF, within L{TIMEOUT} (else C{TimeoutError})."""
    sock.settimeout(TIMEOUT)
    received = b""
    while chunk := sock.recv(1 << 20):
        received += chunk
    return received


class Flood(MessageProtocol):
    """Sends 2 MiB at once, which pauses it, then closes."""

    def connectionMade(self) -> None:
        for _ in range(32):
            self.sendMessage(b"x" * 65536)
        self.factory.paused.append(self.transport.producerPaused)
        self.transport.loseConnection()


class ClosingTests(TestCase):
    """How a connection ends, on Twisted's real UNIX sockets."""

    def listen(self, protocol: type[MessageProtocol]) -> socket.socket:
        """A client connected to a new listener of C{protocol}, not accepted yet."""
        path = os.path.join(short_rundir(self), "s")
        factory = MessageFactory(protocol, clock=reactor)
        factory.paused = []  # type: ignore[attr-defined]
        self.factory = factory
        port = reactor.listenUNIX(path, factory)
        self.addCleanup(port.stopListening)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(client.close)
        client.connect(path)
        return client

    @inlineCallbacks
    def test_halfClosedPeerGetsItsAnswers(self) -> Any:
        """
        A peer that half-closes after its request (as socat does), the
        request and the EOF read in one turn: its answers are written, then
        the connection closes.  Twisted closed it at the EOF, the answers
        unsent: socat got nothing from pongd.
        """
        client = self.listen(Echo)
        client.sendall(encode(b"a") + encode(b"b"))
        client.shutdown(socket.SHUT_WR)  # both there before the accept
        received = yield deferToThread(read_to_eof, client)
        self.assertEqual(received, encode(b"a") + encode(b"b"))

    @inlineCallbacks
    def test_closeWhilePausedEnds(self) -> Any:
        """
        C{loseConnection()} while the write buffer is over its bound (the
        producer paused): the peer gets every byte, then EOF.  Twisted
        closes no connection with a producer registered, and resumed ours
        instead: no EOF until the idle timeout.
        """
        client = self.listen(Flood)
        received = yield deferToThread(read_to_eof, client)
        self.assertEqual(received, encode(b"x" * 65536) * 32)
        self.assertEqual(self.factory.paused, [True])  # type: ignore[attr-defined]


class Amplifier(MessageProtocol):
    """Answers each request with 1 KiB: its payload, repeated."""

    def connectionMade(self) -> None:
        self.factory.protocols.append(self)

    def messageReceived(self, payload: bytes) -> None:
        self.sendMessage(payload * (1024 // len(payload)))


class AmplifyingTests(TestCase):
    """A service whose answers are larger than the requests."""

    @inlineCallbacks
    def test_restOfAReadWaitsWhilePaused(self) -> Any:
        """
        A peer that sends a read's worth of small requests and does not
        read: their answers are buffered up to C{writeBound}, the rest of
        the read waits until they drain, then every answer goes out, in
        order.  All of the read's requests were answered at once (here 11
        MiB for 64 KiB of requests; 256 MiB for empty requests answered
        with 16 KiB).
        """
        path = os.path.join(short_rundir(self), "s")
        factory = MessageFactory(Amplifier, clock=reactor)
        factory.protocols = []  # type: ignore[attr-defined]
        port = reactor.listenUNIX(path, factory)
        self.addCleanup(port.stopListening)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(client.close)
        client.connect(path)
        requests = [i.to_bytes(2, "big") for i in range(65536 // 6)]
        # All there before the accept: the service's first read has them.
        client.sendall(b"".join(encode(request) for request in requests))
        protocols = factory.protocols  # type: ignore[attr-defined]
        yield wait_until(lambda: protocols, "the accept")
        transport = protocols[0].transport
        yield wait_until(lambda: transport.producerPaused, "the service paused")
        held = buffered(transport)
        self.assertLessEqual(held, WRITE_BOUND + 1028, "answers buffered")

        def read_answers() -> list[bytes]:
            client.settimeout(TIMEOUT)
            return [recv_message(client) for _ in requests]

        answers = yield deferToThread(read_answers)
        self.assertEqual(answers, [request * 512 for request in requests])


class IdleTimeoutTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.counters: Counter[str] = Counter()
        self.factory = MessageFactory(
            Echo, idleTimeout=5.0, clock=self.clock, counters=self.counters
        )

    def connect(self) -> tuple[MessageProtocol, StringTransport]:
        protocol = self.factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_closedWhenNothingMoves(self) -> None:
        _, transport = self.connect()
        self.clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnected, "not aborted")
        self.assertEqual(self.counters["idle connections closed"], 1)

    def test_bytesInEitherDirectionRestartIt(self) -> None:
        protocol, transport = self.connect()
        self.clock.advance(4)
        protocol.dataReceived(encode(b"x")[:2])  # in: part of a message
        self.clock.advance(4)
        protocol.sendMessage(b"unsolicited")  # out
        self.clock.advance(4)
        transport.producer.resumeProducing()  # out: the write buffer drained
        self.clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)

    def test_zeroMeansNever(self) -> None:
        self.factory.idleTimeout = 0
        _, transport = self.connect()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_currentValue(self) -> None:
        """A callable timeout is read for each new connection (reload)."""
        timeouts = iter([2.0, 7.0])
        self.factory.idleTimeout = lambda: next(timeouts)
        self.assertEqual(self.connect()[0].idleTimeout, 2.0)
        self.assertEqual(self.connect()[0].idleTimeout, 7.0)

    def test_cancelledWhenLost(self) -> None:
        """
        Also when a subclass's connectionLost forgets ours: the transport
        stops its producer as the connection is lost.
        """
        protocol, transport = self.connect()
        protocol.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])

        class Forgetful(Echo):
            def connectionLost(self, reason: Any = None) -> None:
                pass

        self.factory.protocol = Forgetful
        protocol, transport = self.connect()
        transport.producer.stopProducing()  # what FileDescriptor does
        protocol.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_reactorClockCancelled(self) -> None:
        """
        Without a C{clock}, the reactor's: its idle call is cancelled with
        the connection, never left to fire on a connection long gone.
        """
        from twisted.internet import reactor

        before = set(reactor.getDelayedCalls())
        self.factory.clock = None
        protocol, _ = self.connect()
        [idle] = set(reactor.getDelayedCalls()) - before
        protocol.connectionLost(None)
        self.assertFalse(idle.active())
        self.assertEqual(set(reactor.getDelayedCalls()), before)

    def test_logBounded(self) -> None:
        """100 idle closes at once: all counted, one log line."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        for _ in range(100):
            self.connect()
        self.clock.advance(5)
        self.assertEqual(self.counters["idle connections closed"], 100)
        lines = [e for e in events if "nothing moved" in e["log_format"]]
        self.assertEqual(len(lines), 1)
        self.connect()
        self.clock.advance(10)
        [_, second] = [e for e in events if "nothing moved" in e["log_format"]]
        self.assertEqual(second["unlogged"], 99)


class Holder(MessageProtocol):
    """Holds partial messages; records being closed for the budget."""

    idleTimeout = 0

    def messageReceived(self, payload: bytes) -> None:
        self.messages = [*getattr(self, "messages", []), payload]


class PartialMessageBudgetTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.counters: Counter[str] = Counter()
        self.budget = PartialMessageBudget(1000, self.counters)

    def holder(self, partial: int = 0) -> tuple[Holder, StringTransport]:
        protocol = Holder()
        protocol.partialBudget = self.budget
        transport = StringTransport()
        protocol.makeConnection(transport)
        if partial:
            protocol.dataReceived(HEADER.pack(10_000) + b"p" * partial)
        return protocol, transport

    def charge(self, payload: int, pieces: int = 1) -> int:
        return payload + PIECE_OVERHEAD * pieces

    def test_accounting(self) -> None:
        """Each connection is charged its partial message, released when whole."""
        a, _ = self.holder(100)
        b, _ = self.holder(200)
        self.assertEqual(self.budget.holding(a), self.charge(100))
        self.assertEqual(self.budget.held, self.charge(100) + self.charge(200))
        a.dataReceived(b"q" * 50)
        self.assertEqual(self.budget.holding(a), self.charge(150, 2))
        a.dataReceived(b"q" * 9_850)
        self.assertEqual(a.messages, [b"p" * 100 + b"q" * 9_900])
        self.assertEqual(self.budget.holding(a), 0)
        self.assertEqual(self.budget.held, self.charge(200))
        b.connectionLost(None)
        self.assertEqual((self.budget.held, len(self.budget)), (0, 0))

    def test_wholeMessagesCostNothing(self) -> None:
        protocol, _ = self.holder()
        protocol.dataReceived(encode(b"x" * 5000))
        self.assertEqual(protocol.messages, [b"x" * 5000])
        self.assertEqual(len(self.budget), 0)

    def test_largestClosed(self) -> None:
        """Over the budget, the largest holder is closed, not the newcomer."""
        small, smallTransport = self.holder(100)
        large, largeTransport = self.holder(500)
        newcomer, newTransport = self.holder(300)
        self.assertTrue(largeTransport.disconnected, "largest not aborted")
        self.assertFalse(smallTransport.disconnecting)
        self.assertFalse(newTransport.disconnecting)
        self.assertEqual(self.budget.holding(large), 0)
        self.assertEqual(self.budget.held, self.charge(100) + self.charge(300))
        self.assertEqual(self.counters["closed over partial-message budget"], 1)
        large.dataReceived(b"p" * 9_500)  # what was in flight: ignored
        self.assertEqual(getattr(large, "messages", []), [])
        self.assertEqual(self.budget.holding(large), 0)

    def test_growingHolderClosedWhenLargest(self) -> None:
        other, otherTransport = self.holder(300)
        grower, growerTransport = self.holder(300)
        grower.dataReceived(b"p" * 400)
        self.assertTrue(growerTransport.disconnected)
        self.assertFalse(otherTransport.disconnecting)
        self.assertEqual(self.budget.held, self.charge(300))

    def test_neverOver(self) -> None:
        """Many connections growing by small reads: the sum stays within."""
        holders = [self.holder(10) for _ in range(30)]
        for round in range(20):
            for protocol, _ in holders:
                protocol.dataReceived(b"r" * (round + 1))
                self.assertLessEqual(self.budget.held, self.budget.limit)
        alive = [p for p, t in holders if not t.disconnecting]
        self.assertEqual(self.budget.held, sum(self.budget.holding(p) for p in alive))
        self.assertEqual(
            self.counters["closed over partial-message budget"],
            len(holders) - len(alive),
        )

    def test_tricklingIsCharged(self) -> None:
        """A byte per read costs a piece's overhead, not a byte."""
        protocol, transport = self.holder()
        protocol.dataReceived(HEADER.pack(10_000))
        for _ in range(15):
            protocol.dataReceived(b"t")
        self.assertEqual(self.budget.held, self.charge(15, 15))  # 975 bytes
        protocol.dataReceived(b"t")
        self.assertTrue(transport.disconnecting)

    def test_currentLimit(self) -> None:
        limits = [1000]
        budget = PartialMessageBudget(lambda: limits[0])
        self.assertEqual(budget.limit, 1000)
        limits[0] = 5
        self.assertEqual(budget.limit, 5)

    def test_factoryDefaultIsPrivate(self) -> None:
        one, two = MessageFactory(Holder), MessageFactory(Holder)
        self.assertIsNot(one.partialBudget, two.partialBudget)
        self.assertEqual(one.partialBudget.limit, 64 * 1024 * 1024)
        shared = PartialMessageBudget(10)
        self.assertIs(
            MessageFactory(Holder, partialBudget=shared)
            .buildProtocol(None)
            .partialBudget,
            shared,
        )


class _SizeAtWrite(StringTransport):
    """A transport recording its C{bufferSize} at each write."""

    def __init__(self, bufferSize: int) -> None:  # noqa: N803 (Twisted's name)
        super().__init__()
        self.bufferSize = bufferSize
        self.sizes: list[int] = []

    def write(self, data: bytes) -> None:
        self.sizes.append(self.bufferSize)
        super().write(data)


class PinnedFiguresTests(SynchronousTestCase):
    """The figures the docs state, as numbers (not recomputed from constants)."""

    def test_partialMessageCharge(self) -> None:
        """A partial message costs its bytes plus 64 per piece held."""
        budget = PartialMessageBudget(10_000)
        protocol = Holder()
        protocol.partialBudget = budget
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(HEADER.pack(1000) + b"p" * 100)
        self.assertEqual(budget.holding(protocol), 100 + 64)
        protocol.dataReceived(b"p")
        self.assertEqual(budget.holding(protocol), 101 + 128)
        protocol.dataReceived(b"p" * 3)
        self.assertEqual(budget.holding(protocol), 104 + 192)
        self.assertEqual(WRITE_BOUND, 256 * 1024)

    def test_writeBoundOnlyRaises(self) -> None:
        """
        A message's write may fill up to writeBound; a transport whose own
        bound is that or more keeps it, and every bound is given back.
        """
        for own, during in [
            (64 * 1024, WRITE_BOUND),
            (WRITE_BOUND, WRITE_BOUND),
            (WRITE_BOUND + 1, WRITE_BOUND + 1),
            (4 * WRITE_BOUND, 4 * WRITE_BOUND),
        ]:
            protocol = Recorder()
            transport = _SizeAtWrite(own)
            protocol.makeConnection(transport)
            protocol.sendMessage(b"m")
            self.assertEqual(transport.sizes, [during], own)
            self.assertEqual(transport.bufferSize, own)
            self.assertEqual(transport.value(), encode(b"m"))
