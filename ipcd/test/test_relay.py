"""
The socket relay engine (L{SocketRelays}) on real socket pairs.  Most tests
run it on a reactor of their own, not running, and turn that reactor one
poll at a time, so every step is deterministic; the last ones run it as
tcpd does, on the running reactor.

Each relay joins socket C{a} (the peer that asked) and C{b} (the service);
the test plays their far ends, C{client} and C{service}.
"""

from __future__ import annotations

import gc
import os
import socket
import weakref
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from ipcd.relay import (
    READ_SIZE,
    SWEEP_INTERVAL,
    IRelayEngine,
    RelayStats,
    SocketRelays,
    take_socket,
)
from ipcd.test.support import (
    TIMEOUT,
    assert_no_fd_leak,
    fd_baseline,
    open_fds,
    wait_until,
)


def pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair: the relay's socket and its far end (non-blocking)."""
    mine, far = socket.socketpair()
    far.setblocking(False)
    return mine, far


def drain(sock: socket.socket) -> tuple[bytes, bool]:
    """What C{sock} can read now, and whether that ends with EOF."""
    data = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return data, False
        if not chunk:
            return data, True
        data += chunk


def send_some(sock: socket.socket, data: memoryview) -> int:
    """Send what C{sock} takes now of C{data}; how much that was."""
    try:
        return sock.send(data)
    except BlockingIOError:
        return 0


def private_reactor(case: SynchronousTestCase) -> EPollReactor:
    """A reactor that is never run: tests turn it (C{doIteration(0)})."""
    private = EPollReactor()

    def close() -> None:
        private.removeAll()
        private.waker.connectionLost(None)
        private._poller.close()

    case.addCleanup(close)
    return private


class StepTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = private_reactor(self)
        self.clock = Clock()  # for idle deadlines
        self.fds = len(open_fds())
        self.loop = SocketRelays(self.reactor, clock=self.clock)
        self.loop.start()
        self.addCleanup(self.loop.stop)
        self.registry: set[RelayStats] = set()

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IRelayEngine, self.loop))

    def join(self, **kwargs: Any) -> RelayStats:
        self.a, self.client = pair()
        self.b, self.service = pair()
        for far in (self.client, self.service):
            self.addCleanup(far.close)
        stats = RelayStats(registry=self.registry)
        self.assertIs(self.loop.join(self.a, self.b, stats, **kwargs), stats)
        self.assertEqual(self.registry, {stats})
        return stats

    def turns(self, count: int = 4) -> None:
        for _ in range(count):
            self.reactor.doIteration(0)

    def quiet(self) -> bool:
        """No event waits in the reactor: the engine does not spin."""
        return self.reactor._poller.poll(0) == []

    def assertEnded(self) -> None:
        """The relay closed both its sockets and left the registry."""
        self.assertEqual((self.a.fileno(), self.b.fileno()), (-1, -1))
        self.assertEqual(self.registry, set())
        self.assertEqual(self.loop.sides(), [])

    def test_both_ways_and_counted(self) -> None:
        stats = self.join()
        self.client.send(b"hello")
        self.service.send(b"hi")
        self.turns()
        self.service.send(b"!")
        self.turns()
        self.assertEqual(drain(self.service), (b"hello", False))
        self.assertEqual(drain(self.client), (b"hi!", False))
        self.assertEqual((stats.forward, stats.backward), (5, 3))
        self.assertEqual(len(self.registry), 1)

    def test_greeting_and_early_data_first(self) -> None:
        """
        The greeting reaches A before anything B says; the early bytes reach
        B before anything A sends later, and count as A's.
        """
        stats = self.join(greeting=b"ok", early=b"early ")
        self.service.send(b"answer")
        self.client.send(b"late")
        self.turns()
        self.assertEqual(drain(self.client), (b"okanswer", False))
        self.assertEqual(drain(self.service), (b"early late", False))
        self.assertEqual((stats.forward, stats.backward), (10, 6))

    def test_backpressure(self) -> None:
        """
        A service that does not read: the relay holds at most one read and
        stops reading the client, whose sends then stall in the kernel.
        Once the service reads, everything arrives intact.
        """
        stats = self.join()
        data = memoryview(os.urandom(8 << 20))
        sent = 0
        for _ in range(100):
            sent += send_some(self.client, data[sent:])
            self.turns(1)
        [side_a] = [s for s in self.loop.sides() if s.forward]
        self.assertFalse(side_a.reading)
        self.assertLess(sent, len(data))
        self.assertLessEqual(self.loop.buffered(), READ_SIZE)
        self.assertEqual(send_some(self.client, data[sent:]), 0)
        received = b""
        while len(received) < len(data):
            sent += send_some(self.client, data[sent:])
            self.turns(1)
            self.assertLessEqual(self.loop.buffered(), READ_SIZE)
            received += drain(self.service)[0]
        self.assertEqual(received, data)
        self.assertEqual(stats.forward, len(data))

    def test_half_close(self) -> None:
        """
        The client's EOF reaches the service as EOF; the service still
        answers; the service's EOF then ends the relay.
        """
        self.join()
        self.client.send(b"question")
        self.client.shutdown(socket.SHUT_WR)
        self.turns()
        self.assertEqual(drain(self.service), (b"question", True))
        self.service.send(b"answer")
        self.turns()
        self.assertEqual(drain(self.client), (b"answer", False))
        self.assertEqual(len(self.registry), 1)
        self.service.shutdown(socket.SHUT_WR)
        self.turns()
        self.assertEqual(drain(self.client), (b"", True))
        self.assertEnded()

    def test_eof_follows_early_data(self) -> None:
        """An EOF the client sent before the join comes after its early bytes."""
        self.join(early=b"last words")
        self.client.shutdown(socket.SHUT_WR)
        self.turns()
        self.assertEqual(drain(self.service), (b"last words", True))

    def test_half_closed_while_paused(self) -> None:
        """
        Both EOFs while the client's bytes wait for a slow service: nothing
        is lost, the loop does not spin on the hangup, and it all ends.
        """
        self.join()
        data = memoryview(os.urandom(4 << 20))
        sent = 0
        for _ in range(50):
            sent += send_some(self.client, data[sent:])
            self.turns(1)
        self.client.shutdown(socket.SHUT_WR)  # EOF after what was sent
        self.service.shutdown(socket.SHUT_WR)
        self.turns()
        self.assertEqual(drain(self.client), (b"", True))
        self.assertTrue(self.quiet())  # no busy loop
        received, eof = b"", False
        while not eof:
            self.turns(1)
            chunk, eof = drain(self.service)
            received += chunk
        self.assertEqual(received, data[:sent])
        self.assertEnded()

    def test_reset_closes_other_side(self) -> None:
        """The client dies (a reset): the service's connection is closed."""
        self.join()
        self.service.send(b"never read")
        self.turns()
        self.client.close()  # unread data: A's socket gets ECONNRESET
        self.turns()
        self.assertEqual(drain(self.service), (b"", True))
        self.assertEnded()

    def fill(self, towards: socket.socket, sender: socket.socket) -> int:
        """
        C{sender} sends until everything between it and C{towards}, which
        does not read, is full: the relay holds a read it cannot pass on.
        """
        data = memoryview(os.urandom(8 << 20))
        sent = 0
        for _ in range(100):
            sent += send_some(sender, data[sent:])
            self.turns(1)
        self.assertLess(sent, len(data))
        self.assertGreater(self.loop.buffered(), 0)
        return sent

    def test_reset_while_backed_up(self) -> None:
        """
        The client dies (a reset: it left bytes unread) while the relay holds
        its bytes for a service that does not read, so the relay is reading
        neither side: the error still ends the relay.
        """
        self.join()
        self.service.send(b"never read")
        self.turns()
        self.fill(self.service, self.client)
        [side_a] = [s for s in self.loop.sides() if s.forward]
        self.assertEqual((side_a.reading, bytes(side_a.pending)), (False, b""))
        self.client.close()
        self.turns()
        self.assertEnded()

    def test_service_reset_while_client_backed_up(self) -> None:
        """The same the other way: the service dies, the client does not read."""
        self.join()
        self.client.send(b"never read")
        self.turns()
        self.fill(self.client, self.service)
        self.service.close()
        self.turns()
        self.assertEnded()

    def test_hangup_delivers_what_was_sent(self) -> None:
        """
        The service sends more than the client takes at once and closes (a
        hangup, not a reset: it read all it was sent).  The client still
        gets every byte, then EOF, and then the relay ends at once, without
        waiting for the client's own EOF: the service is gone.
        """
        stats = self.join()
        self.client.send(b"question")
        self.turns()
        self.assertEqual(drain(self.service), (b"question", False))
        sent = self.fill(self.client, self.service)
        self.service.close()
        self.turns()
        self.assertTrue(self.quiet())  # no busy loop
        received, eof = b"", False
        for _ in range(1000):
            chunk, eof = drain(self.client)
            received += chunk
            if eof:
                break
            self.turns(1)
        self.assertEqual((len(received), eof), (sent, True))
        self.assertEqual(stats.backward, sent)
        self.assertEnded()

    def test_client_gone_ends_relay(self) -> None:
        """
        The client closes (nothing unread): its last bytes and EOF reach the
        service, and the relay ends though the service keeps its side open.
        """
        self.join()
        self.client.send(b"last words")
        self.client.close()
        self.turns()
        self.assertEqual(drain(self.service), (b"last words", True))
        self.assertEnded()

    def test_idle_deadline(self) -> None:
        """
        A relay on which nothing moves for its idle timeout is closed; a byte
        either way starts the wait again.
        """
        self.join(idle_timeout=10)
        self.turns()
        self.clock.advance(6)
        self.service.send(b"x")
        self.turns()
        self.clock.advance(9.9)
        self.turns()
        self.assertEqual(len(self.registry), 1)  # 9.9 s since the byte
        self.clock.advance(0.1 + SWEEP_INTERVAL)  # checked at most this often
        self.turns()
        self.assertEqual(drain(self.client), (b"x", True))
        self.assertEqual(drain(self.service), (b"", True))
        self.assertEnded()

    def test_idle_deadline_while_backed_up(self) -> None:
        """
        A service that never reads behind a client that half-closed: the
        relay could wait forever, and the idle deadline ends it.
        """
        self.join(idle_timeout=10)
        self.fill(self.service, self.client)
        self.client.shutdown(socket.SHUT_WR)
        self.turns()
        self.clock.advance(10 + SWEEP_INTERVAL)
        self.assertEnded()

    def test_no_idle_deadline(self) -> None:
        self.join()
        self.turns()
        self.clock.advance(1e9)
        self.turns()
        self.assertEqual(len(self.registry), 1)

    def test_death_before_join(self) -> None:
        """A client reset before the relay started: it ends at once."""
        a, client = pair()
        b, service = pair()
        self.addCleanup(service.close)
        a.send(b"unread")
        client.close()
        self.loop.join(a, b, RelayStats(registry=self.registry))
        self.turns()
        self.assertEqual(drain(service), (b"", True))
        self.assertEqual((a.fileno(), b.fileno()), (-1, -1))
        self.assertEqual(self.registry, set())

    def test_abort(self) -> None:
        stats = self.join()
        (a, client), (b, service) = pair(), pair()
        for far in (client, service):
            self.addCleanup(far.close)
        other = self.loop.join(a, b)
        self.loop.abort(stats)
        self.turns()
        self.assertEqual(drain(self.client), (b"", True))
        self.assertEqual(drain(self.service), (b"", True))
        self.assertEqual((self.a.fileno(), self.b.fileno()), (-1, -1))
        self.assertEqual(self.registry, set())
        self.assertEqual({side.stats for side in self.loop.sides()}, {other})

    def test_stop_closes_everything(self) -> None:
        """Stopping closes every relay and the engine's own fds."""
        self.join()
        self.turns()
        self.loop.stop()
        self.assertEqual(drain(self.client), (b"", True))
        self.assertEqual(drain(self.service), (b"", True))
        self.assertEqual(self.registry, set())
        self.client.close()
        self.service.close()
        self.assertEqual(len(open_fds()), self.fds)
        # A join after the stop closes its sockets at once.
        a, b = socket.socketpair()
        self.loop.join(a, b)
        self.assertEqual((a.fileno(), b.fileno()), (-1, -1))


class ReactorTests(TestCase):
    """The engine on the running reactor, as tcpd runs it."""

    @inlineCallbacks
    def setUp(self) -> Any:
        self.before = yield fd_baseline()
        self.loop = SocketRelays(reactor)
        self.loop.start()
        self.addCleanup(self.loop.stop)
        self.registry: set[RelayStats] = set()

    @inlineCallbacks
    def test_relays_and_ends(self) -> Any:
        a, client = socket.socketpair()
        b, service = socket.socketpair()
        for far in (client, service):
            far.settimeout(TIMEOUT)
        stats = self.loop.join(a, b, RelayStats(registry=self.registry))

        def serve() -> bytes:
            got = b""
            while len(got) < 1_000_000:
                got += service.recv(1 << 20)
            service.sendall(b"done")
            service.close()
            return got

        sending = deferToThread(client.sendall, b"x" * 1_000_000)
        got = yield deferToThread(serve)
        yield sending
        answer = yield deferToThread(client.recv, 100)
        self.assertEqual((len(got), answer), (1_000_000, b"done"))
        # The service's EOF passed on (read in a thread: the reactor relays).
        self.assertEqual((yield deferToThread(client.recv, 100)), b"")
        client.close()
        yield wait_until(lambda: not self.registry, "the relay to end")
        self.assertEqual((stats.forward, stats.backward), (1_000_000, 4))
        self.loop.stop()
        yield assert_no_fd_leak(self.before)


class TakeSocketTests(TestCase):
    @inlineCallbacks
    def test_taken_socket_stays_connected(self) -> Any:
        """
        A socket taken from its Twisted TCP transport: the reactor no longer
        reads it, and dropping the transport neither shuts the connection
        down nor resets it.
        """
        taken: Deferred[tuple[socket.socket, Any]] = Deferred()

        class Taker(Protocol):
            def dataReceived(self, data: bytes) -> None:  # noqa: N802
                transport = self.transport
                taken.callback((take_socket(transport), weakref.ref(transport)))

        port = reactor.listenTCP(0, Factory.forProtocol(Taker), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        address = ("127.0.0.1", port.getHost().port)
        client = socket.create_connection(address, timeout=TIMEOUT)
        self.addCleanup(client.close)
        client.sendall(b"handshake")
        sock, transport = yield taken
        self.addCleanup(sock.close)
        # Out of the transport's own doRead (the Deferred fired in it), and
        # a few reactor turns.
        yield deferLater(reactor, 0.05, lambda: None)
        gc.collect()
        self.assertIsNone(transport())  # the transport is gone
        sock.settimeout(TIMEOUT)
        client.sendall(b"after")
        self.assertEqual(sock.recv(100), b"after")  # not read by the reactor
        sock.sendall(b"back")
        self.assertEqual(client.recv(100), b"back")
        client.setblocking(False)
        self.assertRaises(BlockingIOError, client.recv, 100)  # no EOF, no reset
