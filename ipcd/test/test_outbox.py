"""
L{ipcd.daemons.outbox}: a read's relayed bytes sent when the read is
done, on real sockets adopted by the reactor.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ipcd.daemons.outbox import MAX_PIECES, Outbox, unsent
from ipcd.test.support import TIMEOUT


class Lost(Protocol):
    def __init__(self) -> None:
        self.lost: Deferred[None] = Deferred()

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        self.lost.callback(None)


def adopted(case: TestCase) -> tuple[Lost, socket.socket]:
    """One end of a socketpair as a reactor transport; the other, blocking."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    protocol = Lost()
    factory = Factory.forProtocol(lambda: protocol)
    try:
        reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, factory)
    finally:
        ours.close()
    theirs.settimeout(TIMEOUT)
    case.addCleanup(theirs.close)

    def close() -> Any:
        if protocol.transport.connected:
            protocol.transport.abortConnection()
        return protocol.lost

    case.addCleanup(close)
    return protocol, theirs


def read_all(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        data += chunk
    return bytes(data)


class OutboxTests(TestCase):
    def test_sentAtOnce(self) -> None:
        """
        Pieces added during a read go out in order, in the send itself: the
        peer has them before the reactor turns.
        """
        protocol, peer = adopted(self)
        outbox = Outbox(protocol.transport)
        self.assertTrue(outbox.direct)
        outbox.add(b"ab", b"c")
        outbox.add(b"d")
        outbox.send()
        peer.setblocking(False)
        self.assertEqual(peer.recv(100), b"abcd")
        self.assertEqual(outbox.pieces, [])
        outbox.send()  # nothing added: nothing sent
        with self.assertRaises(BlockingIOError):
            peer.recv(100)

    def test_manyPieces(self) -> None:
        """More pieces than one scatter list takes arrive all, in order."""
        protocol, peer = adopted(self)
        outbox = Outbox(protocol.transport)
        pieces = [b"%d," % i for i in range(MAX_PIECES * 20)]
        outbox.add(*pieces)
        outbox.send()
        expected = b"".join(pieces)
        self.assertEqual(read_all(peer, len(expected)), expected)

    @inlineCallbacks
    def test_behindWhatIsQueued(self) -> Any:
        """
        When the transport holds bytes, the pieces queue behind them: never
        sent ahead of what was written before.
        """
        protocol, peer = adopted(self)
        outbox = Outbox(protocol.transport)
        protocol.transport.write(b"first,")  # queued until the reactor turns
        outbox.add(b"second")
        outbox.send()
        peer.setblocking(False)
        with self.assertRaises(BlockingIOError):
            peer.recv(100)
        peer.settimeout(TIMEOUT)
        got = yield deferToThreadRead(peer, 12)
        self.assertEqual(got, b"first,second")

    @inlineCallbacks
    def test_moreThanTheSocketTakes(self) -> Any:
        """What the socket does not take at once is queued and follows."""
        protocol, peer = adopted(self)
        outbox = Outbox(protocol.transport)
        big = os.urandom(8 << 20)
        outbox.add(b"head", big, b"tail")
        outbox.send()
        got = yield deferToThreadRead(peer, len(big) + 8)
        self.assertEqual(got, b"head" + big + b"tail")

    @inlineCallbacks
    def test_brokenPeer(self) -> Any:
        """A peer gone: no exception, and the connection is lost as usual."""
        protocol, peer = adopted(self)
        outbox = Outbox(protocol.transport)
        peer.close()
        outbox.add(b"x" * 100_000)
        outbox.send()
        yield protocol.lost

    @inlineCallbacks
    def test_throughWrappers(self) -> Any:
        """
        A wrapper that only passes writes on (a connection limit's) is gone
        through; TLS is not: the pieces go to TLS, never in the clear to the
        socket under it.
        """
        protocol, peer = adopted(self)
        wrapper = ProtocolWrapper(WrappingFactory(Factory()), Protocol())
        wrapper.makeConnection(protocol.transport)
        self.assertIs(Outbox(wrapper).transport, protocol.transport)
        self.assertTrue(Outbox(wrapper).direct)

        options = ssl.optionsForClientTLS("example.invalid")
        wrapped = Factory.forProtocol(Protocol)
        tls = TLSMemoryBIOFactory(options, True, wrapped).buildProtocol(None)
        tls.makeConnection(protocol.transport)  # sends its ClientHello
        outbox = Outbox(tls)
        self.assertFalse(outbox.direct)
        self.assertIs(outbox.transport, tls)
        self.assertIs(outbox.socket_transport, protocol.transport)
        outbox.add(b"secret")
        outbox.send()
        # The ClientHello went out; "secret" waits for the handshake, in
        # TLS's hands: nothing of it in the clear on the socket.
        hello = yield deferToThreadRead(peer, 5)
        self.assertEqual(hello[0], 0x16)  # a TLS handshake record
        peer.setblocking(False)
        try:
            hello += peer.recv(1 << 16)
        except BlockingIOError:
            pass
        self.assertNotIn(b"secret", hello)


def deferToThreadRead(sock: socket.socket, count: int) -> Deferred[bytes]:  # noqa: N802
    """Read C{count} bytes in a thread while the reactor writes them."""
    return deferToThread(read_all, sock, count)


class UnsentTests(SynchronousTestCase):
    def test_unsent(self) -> None:
        pieces = [b"abc", b"", b"de", b"f"]
        self.assertEqual(unsent(pieces, 0), pieces)
        self.assertEqual(unsent(pieces, 2), [b"c", b"", b"de", b"f"])
        self.assertEqual(unsent(pieces, 3), [b"de", b"f"])
        self.assertEqual(unsent(pieces, 4), [b"e", b"f"])
        self.assertEqual(unsent(pieces, 6), [])
