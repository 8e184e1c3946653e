"""
Tests for L{ipcd.wire}: the libipc framing, for Twisted protocols and for
blocking sockets.
"""

from __future__ import annotations

import socket

from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from ipcd.wire import (
    DEFAULT_MAX_MESSAGE_SIZE,
    HEADER,
    MessageProtocol,
    MessageTooLarge,
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


class Recorder(MessageProtocol):
    """Records what the base class delivers."""

    def __init__(self, maxMessageSize: int | None = None) -> None:  # noqa: N803
        self.messages: list[bytes] = []
        self.tooLarge: list[int] = []
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
        self.assertEqual(warnings[0]["peer"], transport.getPeer())

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
