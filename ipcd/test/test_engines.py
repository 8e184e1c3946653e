"""
Both relay engines against the same expectations: L{SocketRelays} on real
sockets and the running reactor, L{TransportRelays} in memory.  Every wait
is bounded (L{wait_until}); nothing asserts on time.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import signal
import socket
import struct
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.python import log
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from ipcd.relay import (
    READ_SIZE,
    IRelayEngine,
    RelayProtocol,
    RelayStats,
    SocketRelays,
    TransportRelays,
    pipes,
)
from ipcd.relay.sides import Watch
from ipcd.test.support import (
    TIMEOUT,
    assert_no_fd_leak,
    fd_baseline,
    proc_status,
    python_env,
    read_text,
    recv_upto,
    reset_peak,
    short_rundir,
    spawn,
    wait_until,
)
from ipcd.testing import MemoryRelays

MiB = 1 << 20
BULK = 100 * MiB
# What the test process's peak RSS may grow by while BULK bytes go through
# a relay whose receiver does not read at first.  One relay holds at most
# READ_SIZE per direction; the rest is the test's own buffers and threads.
RSS_BOUND = 16 * MiB


def status(field: str) -> int:
    """A field of /proc/self/status, in bytes."""
    return proc_status(field)


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair (blocking, with the test's timeout)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname(), timeout=TIMEOUT)
        accepted, _ = server.accept()
    accepted.settimeout(TIMEOUT)
    return accepted, client


def reset(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def read_to_eof(sock: socket.socket) -> tuple[int, str]:
    """Read up to EOF or a reset: how many bytes, and their digest."""
    digest = hashlib.sha256()
    count = 0
    buffer = bytearray(MiB)
    try:
        while n := sock.recv_into(buffer):
            digest.update(memoryview(buffer)[:n])
            count += n
    except ConnectionResetError:
        pass
    return count, digest.hexdigest()


def read_exactly(sock: socket.socket, count: int) -> str:
    """Read C{count} bytes: their digest."""
    digest = hashlib.sha256()
    buffer = bytearray(MiB)
    view = memoryview(buffer)
    while count:
        n = sock.recv_into(view[: min(count, MiB)])
        if not n:
            raise EOFError(f"EOF with {count} bytes to go")
        digest.update(view[:n])
        count -= n
    return digest.hexdigest()


def send_bulk(sock: socket.socket, total: int, eof: bool = True) -> str:
    """Send C{total} bytes (one reused block), then EOF; their digest."""
    block = bytes(range(256)) * 4096  # 1 MiB
    digest = hashlib.sha256()
    for _ in range(total // len(block)):
        sock.sendall(block)
        digest.update(block)
    if eof:
        sock.shutdown(socket.SHUT_WR)
    return digest.hexdigest()


class FailingSocket(socket.socket):
    """A socket whose C{send} fails in a way the engine does not expect."""

    def send(self, *args: Any) -> int:
        raise RuntimeError("injected send failure")


class RunningEngineCase(TestCase):
    """
    Tests of a L{SocketRelays} (C{engine}) on the running reactor, as tcpd
    runs it, and the fds open before it relays (C{before}).
    """

    @inlineCallbacks
    def setUp(self) -> Any:
        self.engine = SocketRelays(reactor)
        self.engine.start()
        self.addCleanup(self.engine.stop)
        self.before = yield fd_baseline()  # no epoll yet: the engine has no relays
        self.registry: set[RelayStats] = set()


class SocketEngineTests(RunningEngineCase):
    """L{SocketRelays} on the running reactor, as tcpd runs it."""

    def join(
        self, pair: Any = socket.socketpair, **kwargs: Any
    ) -> tuple[RelayStats, socket.socket, socket.socket]:
        """A relay; the far ends of its sides A and B (blocking)."""
        a, client = pair()
        b, service = pair()
        for far in (client, service):
            far.settimeout(TIMEOUT)
            self.addCleanup(far.close)
        stats = self.engine.join(a, b, RelayStats(registry=self.registry), **kwargs)
        return stats, client, service

    def side_a(self, stats: RelayStats) -> Any:
        [side] = [s for s in self.engine.sides() if s.forward and s.stats is stats]
        return side

    @inlineCallbacks
    def test_bulkThroughNonReadingReceiver(self) -> Any:
        """
        100 MiB towards a service that does not read at first: the relay
        stops reading the client and holds at most one read; the test
        process's peak RSS grows by less than RSS_BOUND; once the service
        reads, every byte arrives, then the EOF.
        """
        self.assertTrue(reset_peak(), "VmHWM cannot be reset here")
        rss_before = status("VmRSS")
        stats, client, service = self.join()
        side = self.side_a(stats)
        sending = deferToThread(send_bulk, client, BULK)
        yield wait_until(lambda: not side.reading, "the relay to pause the client")
        self.assertLessEqual(self.engine.buffered(), READ_SIZE)
        self.assertFalse(sending.called)
        count, digest = yield deferToThread(read_to_eof, service)
        sent = yield sending
        growth = status("VmHWM") - rss_before
        self.assertEqual((count, digest), (BULK, sent))
        self.assertEqual(stats.forward, BULK)
        self.assertLess(growth, RSS_BOUND, f"peak RSS grew by {growth / MiB:.1f} MiB")

    @inlineCallbacks
    def test_streamsGoThroughPipes(self) -> Any:
        """
        A stream (reads of SPLICE_AT and more) goes on through a pipe with
        splice(2), each way, over AF_UNIX and TCP: every byte arrives, in
        order, and the EOFs after them; the pipes close with the relay.
        """
        for pair in (socket.socketpair, tcp_pair):
            stats, client, service = self.join(pair)
            side_a = self.side_a(stats)
            for reader, sender, receiver in (
                (side_a, client, service),
                (side_a.peer, service, client),
            ):
                sending = deferToThread(send_bulk, sender, 32 * MiB, eof=False)
                got = yield deferToThread(read_exactly, receiver, 32 * MiB)
                self.assertEqual(got, (yield sending))
                self.assertIsNotNone(reader.pipe)
            client.shutdown(socket.SHUT_WR)
            service.shutdown(socket.SHUT_WR)
            for sock in (client, service):
                self.assertEqual((yield deferToThread(read_to_eof, sock))[0], 0)
            yield wait_until(lambda: not self.registry, "the relay to end")
            self.assertEqual((stats.forward, stats.backward), (32 * MiB, 32 * MiB))
            client.close()
            service.close()
        yield assert_no_fd_leak(self.before)

    @inlineCallbacks
    def test_pipesBounded(self) -> Any:
        """
        Past C{max_pipes} streaming directions, the rest copy: two streams
        at once with room for one pipe both arrive whole, one of them
        through a pipe, and the count is back to nothing once they end.
        """
        self.engine.max_pipes = 1
        relays = [self.join() for _ in range(2)]
        sending = [
            deferToThread(send_bulk, client, 16 * MiB, eof=False)
            for _, client, _ in relays
        ]
        for (_, _, service), sent in zip(relays, sending, strict=True):
            got = yield deferToThread(read_exactly, service, 16 * MiB)
            self.assertEqual(got, (yield sent))
        piped = [self.side_a(stats).pipe is not None for stats, _, _ in relays]
        self.assertEqual(sorted(piped), [False, True])
        self.assertEqual(self.engine._pipes, 1)
        for _, client, service in relays:
            client.close()
            service.close()
        yield wait_until(lambda: not self.registry, "the relays to end")
        self.assertEqual(self.engine._pipes, 0)
        yield assert_no_fd_leak(self.before)

    @inlineCallbacks
    def test_spliceRefused(self) -> Any:
        """
        The kernel refuses splice(2) (EINVAL): the engine says so once and
        copies instead; not a byte is lost.
        """
        refused = []

        def no_splice(*args: Any, **kwargs: Any) -> int:
            refused.append(args)
            raise OSError(errno.EINVAL, "Invalid argument")

        self.patch(pipes.os, "splice", no_splice)
        warnings: list[dict[str, Any]] = []
        log.addObserver(warnings.append)
        self.addCleanup(log.removeObserver, warnings.append)
        stats, client, service = self.join()
        sending = deferToThread(send_bulk, client, 16 * MiB)
        got = yield deferToThread(read_to_eof, service)
        self.assertEqual(got, (16 * MiB, (yield sending)))
        self.assertEqual(len(refused), 1)
        self.assertIsNone(self.side_a(stats).pipe)
        said = [e for e in warnings if "splice(2) refused" in log.textFromEventDict(e)]
        self.assertEqual(len(said), 1)

    @inlineCallbacks
    def test_halfCloseBothWays(self) -> Any:
        """
        Each side's EOF reaches the other after its bytes, and the other
        direction goes on; the relay ends once both have ended.
        """
        for first in ("client", "service"):
            stats, client, service = self.join(tcp_pair)
            ends = {"client": (client, service), "service": (service, client)}
            closer, other = ends[first]
            closer.sendall(b"last words")
            closer.shutdown(socket.SHUT_WR)
            got = yield deferToThread(read_to_eof, other)
            self.assertEqual(got[0], len(b"last words"))
            other.sendall(b"answer")
            self.assertEqual((yield deferToThread(closer.recv, 100)), b"answer")
            self.assertEqual(len(self.registry), 1)
            other.shutdown(socket.SHUT_WR)
            self.assertEqual((yield deferToThread(closer.recv, 100)), b"")
            yield wait_until(lambda: not self.registry, "the relay to end")
            client.close()
            service.close()
        yield assert_no_fd_leak(self.before)

    @inlineCallbacks
    def test_resetEitherSide(self) -> Any:
        """A reset (SO_LINGER 0) on either side closes the other."""
        for which in (1, 2):
            stats, client, service = self.join(tcp_pair)
            client.sendall(b"x")
            self.assertEqual((yield deferToThread(service.recv, 1)), b"x")
            dying, survivor = (client, service) if which == 1 else (service, client)
            reset(dying)
            got = yield deferToThread(read_to_eof, survivor)
            self.assertEqual(got[0], 0)
            yield wait_until(lambda: not self.registry, "the relay to end")
            survivor.close()
        yield assert_no_fd_leak(self.before)

    @inlineCallbacks
    def test_thousandRelaysNoLeak(self) -> Any:
        """1,000 relays, each used and closed: no fd is left open."""
        for _ in range(10):
            fars = []
            for _ in range(100):
                stats, client, service = self.join()
                client.sendall(b"ping")
                fars.append((client, service))
            for client, service in fars:
                self.assertEqual((yield deferToThread(service.recv, 4)), b"ping")
                client.close()
                service.close()
            yield wait_until(lambda: not self.registry, "the relays to end")
        self.assertEqual(self.engine.sides(), [])
        yield assert_no_fd_leak(self.before)

    @inlineCallbacks
    def test_failureInRelay(self) -> Any:
        """
        A send fails unexpectedly: that relay is closed and leaves the
        registry, the failure is logged, and the other relays go on.
        """
        ended = []
        a, client = socket.socketpair()
        b0, service = socket.socketpair()
        b = FailingSocket(fileno=b0.detach())
        for far in (client, service):
            far.settimeout(TIMEOUT)
            self.addCleanup(far.close)
        stats = RelayStats(registry=self.registry, on_end=lambda: ended.append(1))
        self.engine.join(a, b, stats)
        other, client2, service2 = self.join()
        client.sendall(b"boom")
        yield wait_until(lambda: ended, "the failed relay to end")
        self.assertEqual(self.registry, {other})
        self.assertEqual((yield deferToThread(read_to_eof, client))[0], 0)
        self.assertEqual((yield deferToThread(read_to_eof, service))[0], 0)
        [logged] = self.flushLoggedErrors(RuntimeError)
        self.assertIn("injected", logged.getErrorMessage())
        client2.sendall(b"still here")
        self.assertEqual((yield deferToThread(service2.recv, 100)), b"still here")

    @inlineCallbacks
    def test_idleEngineHoldsNothing(self) -> Any:
        """
        Started with no relays, the engine has no reader in the reactor and
        no fd (tlsd's starts with the broker, used or not); its epoll comes
        with the first relay and goes with the last.
        """

        def watching() -> bool:
            return any(isinstance(r, Watch) for r in reactor.getReaders())

        self.assertFalse(watching())
        stats, client, service = self.join()
        self.assertTrue(watching())
        client.close()
        service.close()
        yield wait_until(lambda: not self.registry, "the relay to end")
        self.assertFalse(watching())
        yield assert_no_fd_leak(self.before)

    @inlineCallbacks
    def test_engineFailure(self) -> Any:
        """
        The engine's own epoll fails: every relay it holds is closed and
        leaves the registry, new ones are refused, and it says why.
        """
        stats, client, service = self.join()
        watch = self.engine._watch

        class Broken:
            def __init__(self, epoll: Any) -> None:
                self.epoll = epoll

            def poll(self, *args: Any) -> Any:
                raise OSError(9, "injected epoll failure")

            def __getattr__(self, name: str) -> Any:
                return getattr(self.epoll, name)

        watch.epoll = Broken(watch.epoll)
        side = self.side_a(stats)
        client.shutdown(socket.SHUT_WR)  # side A goes to the engine's epoll
        yield wait_until(lambda: side.eof, "the relay to read the EOF")
        client.close()  # ... which then reports the hangup
        yield wait_until(lambda: not self.registry, "the relays to end")
        self.assertEqual((yield deferToThread(read_to_eof, service))[0], 0)
        self.assertIn("injected epoll failure", self.engine.failure)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        a, b = socket.socketpair()
        refused = RelayStats(registry=self.registry)
        self.engine.join(a, b, refused)
        self.assertEqual((a.fileno(), b.fileno(), self.registry), (-1, -1, set()))
        service.close()  # the test's own (client is closed above)
        yield assert_no_fd_leak(self.before)


# A library's own reactor, stopped with relays live.

# A program of a library user's: an engine on its reactor, COUNT relays
# between pairs of connections to the test's listener, and no stop() call
# (SIGTERM stops the reactor).
LIBRARY_USER = """
import socket, sys
from twisted.internet import reactor
from twisted.logger import globalLogBeginner, textFileLogObserver
from ipcd.relay import SocketRelays

globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
port, count = int(sys.argv[1]), int(sys.argv[2])
engine = SocketRelays(reactor)
engine.start()
for _ in range(count):
    a = socket.create_connection(("127.0.0.1", port))
    b = socket.create_connection(("127.0.0.1", port))
    engine.join(a, b)
reactor.run()
print("stopped with", len(engine.sides()), "sides left")
"""


class ReactorStopTests(SynchronousTestCase):
    """
    A program that stops its reactor with relays live and never calls the
    engine's C{stop()}: the engine stops with the reactor, quietly.
    """

    def test_stopsWithTheReactor(self) -> None:
        """
        Idle relays (in the engine's epoll) and one whose receiver does not
        read (its sides the reactor's): SIGTERM stops the program's reactor;
        it exits, its log has no failure nor traceback, and each far end
        sees its connection end.
        """
        count = 4
        work = short_rundir(self, "ipcd-engine-stop-")
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        listener.settimeout(TIMEOUT)
        out = os.path.join(work, "out.log")
        args = ["-c", LIBRARY_USER, str(listener.getsockname()[1]), str(count)]
        process = spawn(self, args, out, python_env(), work)
        # Accepted in the order they connect: each pair is one relay's ends.
        ends = []
        for _ in range(2 * count):
            far, _ = listener.accept()
            far.settimeout(TIMEOUT)
            self.addCleanup(far.close)
            ends.append(far)
        pairs = list(zip(ends[::2], ends[1::2], strict=True))
        for a, b in pairs:
            a.sendall(b"live")
            self.assertEqual(recv_upto(b, 4), b"live")
        # The last relay holds what its receiver does not read.
        busy = pairs[-1][0]
        busy.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                busy.send(bytes(READ_SIZE))
        busy.settimeout(TIMEOUT)
        process.send_signal(signal.SIGTERM)
        code = process.wait(3 * TIMEOUT)
        text = read_text(out)
        self.assertEqual(code, 0, text)
        self.assertIn("stopped with 0 sides left", text)
        for word in ("failed", "Traceback", "critical", "error"):
            self.assertNotIn(word, text)
        for far in ends:
            read_to_eof(far)  # the end (EOF or reset) comes, or it times out


# TransportRelays, in memory.


class Pipe(FakeTransport):
    """
    iosim's L{FakeTransport} with what a relay needs of a real transport: a
    write buffer that pauses a streaming producer past C{bufferSize},
    C{pauseProducing} that stops delivery to its protocol, half-close, and
    an abort that is a reset.  L{flow} moves the bytes.
    """

    bufferSize = 64 * 1024

    def __init__(self, protocol: Any, isServer: bool) -> None:
        super().__init__(protocol, isServer)
        self.paused = self.producerPaused = False
        self.writeClosed = self.eofSent = self.aborted = self.lost = False

    def write(self, data: bytes) -> None:
        if self.writeClosed or self.disconnecting:
            return
        super().write(data)
        if (
            self.producer is not None
            and self.streamingProducer
            and not self.producerPaused
            and self.buffered() > self.bufferSize
        ):
            self.producerPaused = True
            self.producer.pauseProducing()

    def buffered(self) -> int:
        return sum(map(len, self.stream))

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def loseWriteConnection(self) -> None:
        self.writeClosed = True

    def abortConnection(self) -> None:
        self.aborted = self.disconnecting = True


def lose(transport: Pipe, reason: type[Exception]) -> None:
    if not transport.lost:
        transport.lost = True
        transport.protocol.connectionLost(Failure(reason()))


def connect(left: Any, right: Any) -> tuple[Pipe, Pipe]:
    """Connect two protocols in memory."""
    a, b = Pipe(left, isServer=True), Pipe(right, isServer=False)
    left.makeConnection(a)
    right.makeConnection(b)
    return a, b


def flow(*links: tuple[Pipe, Pipe]) -> None:
    """Move bytes, EOFs and closes until nothing moves (bounded)."""
    for _ in range(1_000_000):
        moved = False
        for pair in links:
            for src, dst in (pair, pair[::-1]):
                if src.lost:
                    continue
                if src.aborted:
                    src.stream = []
                    lose(src, ConnectionLost)
                    lose(dst, ConnectionLost)
                    moved = True
                    continue
                if src.stream and not dst.paused and not dst.lost:
                    data = src.getOutBuffer()
                    try:
                        dst.protocol.dataReceived(data)
                    except Exception:
                        log.err()
                        lose(dst, ConnectionLost)
                        lose(src, ConnectionDone)
                    if src.producerPaused:
                        src.producerPaused = False
                        if src.producer is not None:
                            src.producer.resumeProducing()
                    moved = True
                if dst.lost:
                    if src.stream or src.disconnecting:
                        # Writing to a closed connection: a broken pipe.
                        reason = ConnectionLost if src.stream else ConnectionDone
                        src.stream = []
                        lose(src, reason)
                        moved = True
                    continue
                if src.stream:
                    continue
                if (src.writeClosed or src.disconnecting) and not src.eofSent:
                    src.eofSent = True
                    dst.protocol.readConnectionLost()
                    if src.writeClosed and not src.disconnecting:
                        src.protocol.writeConnectionLost()
                    moved = True
                if src.disconnecting and src.eofSent:
                    lose(src, ConnectionDone)
                    moved = True
        if not moved:
            return
    raise AssertionError("the pipes never settled")


@implementer(IHalfCloseableProtocol)
class Peer(Protocol):
    """A far end: counts and hashes what it reads; can send a bulk."""

    def __init__(self, paused: bool = False) -> None:
        self.received = 0
        self.data = b""
        self.eof = self.gone = False
        self.paused = paused
        self.digest = hashlib.sha256()

    def connectionMade(self) -> None:
        if self.paused:
            self.transport.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.digest.update(data)
        if len(self.data) < 1000:
            self.data += data

    def readConnectionLost(self) -> None:
        self.eof = True

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        self.gone = True


@implementer(IPushProducer)
class Sender(Peer):
    """A far end that sends C{total} bytes as fast as it may, then EOF."""

    def __init__(self, total: int) -> None:
        super().__init__()
        self.total = total
        self.sent = 0
        self.sending = False
        self.block = bytes(range(256)) * 256  # 64 KiB

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self.sending = True
        while self.sending and self.sent < self.total:
            self.transport.write(self.block)
            self.sent += len(self.block)
        if self.sent >= self.total and not self.transport.writeClosed:
            self.transport.unregisterProducer()
            self.transport.loseWriteConnection()

    def pauseProducing(self) -> None:
        self.sending = False

    def stopProducing(self) -> None:
        self.sending = False


class Boom(RelayProtocol):
    def relayed(self, data: bytes) -> None:
        raise RuntimeError("injected relay failure")


class TransportEngineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.engine = TransportRelays(self.clock)
        self.engine.start()
        self.registry: set[RelayStats] = set()

    def relay(
        self,
        client: Any = None,
        service: Any = None,
        side: Any = RelayProtocol,
        **kwargs: Any,
    ) -> tuple[RelayStats, Any, Any, Any]:
        """client <-> A, B <-> service, joined; the stats, ends and links."""
        self.client = client if client is not None else Peer()
        self.service = service if service is not None else Peer()
        a, b = side(), RelayProtocol()
        stats = self.engine.join(a, b, RelayStats(registry=self.registry), **kwargs)
        self.links = (connect(self.client, a), connect(b, self.service))
        self.a, self.b = a, b
        return stats

    def flow(self) -> None:
        flow(*self.links)

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IRelayEngine, self.engine))

    def test_bothWaysCountedGreetingFirst(self) -> None:
        stats = self.relay(greeting=b"ok", early=b"early ")
        self.client.transport.write(b"late")
        self.service.transport.write(b"answer")
        self.flow()
        self.assertEqual(
            (self.client.data, self.service.data), (b"okanswer", b"early late")
        )
        self.assertEqual((stats.forward, stats.backward), (10, 6))
        self.assertEqual(self.registry, {stats})

    def test_bulkThroughNonReadingReceiver(self) -> None:
        """
        100 MiB towards a service that does not read at first: the relay
        pauses the client (producers both ways) instead of buffering; peak
        RSS grows by less than RSS_BOUND; then everything arrives.
        """
        self.assertTrue(reset_peak(), "VmHWM cannot be reset here")
        rss_before = status("VmRSS")
        stats = self.relay(Sender(BULK), Peer(paused=True))
        self.flow()
        self.assertLess(self.client.sent, BULK)
        held = self.links[1][0].buffered() + self.links[0][1].buffered()
        self.assertLessEqual(held, 2 * Pipe.bufferSize)
        self.service.transport.resumeProducing()
        self.flow()
        growth = status("VmHWM") - rss_before
        self.assertEqual((self.service.received, self.service.eof), (BULK, True))
        self.assertEqual(stats.forward, BULK)
        self.assertLess(growth, RSS_BOUND, f"peak RSS grew by {growth / MiB:.1f} MiB")

    def test_halfCloseBothWays(self) -> None:
        for first in ("client", "service"):
            stats = self.relay()
            closer, other = (
                (self.client, self.service)
                if first == "client"
                else (self.service, self.client)
            )
            closer.transport.write(b"last")
            closer.transport.loseWriteConnection()
            self.flow()
            self.assertEqual(
                (other.data, other.eof, other.gone), (b"last", True, False)
            )
            other.transport.write(b"answer")
            self.flow()
            self.assertEqual(closer.data, b"answer")
            self.assertEqual(self.registry, {stats})
            other.transport.loseWriteConnection()
            self.flow()
            self.assertTrue(closer.eof)
            self.assertEqual(self.registry, set())
            self.assertTrue(self.a.transport.lost and self.b.transport.lost)

    def test_resetEitherSide(self) -> None:
        for first in ("client", "service"):
            self.relay()
            dying, survivor = (
                (self.client, self.service)
                if first == "client"
                else (self.service, self.client)
            )
            survivor.transport.write(b"x")
            self.flow()
            dying.transport.abortConnection()
            self.flow()
            self.assertTrue(survivor.gone)
            self.assertEqual(self.registry, set())
            self.assertEqual(self.engine._relays, {})

    def test_idleDeadline(self) -> None:
        stats = self.relay(idle_timeout=10)
        self.clock.advance(6)
        self.client.transport.write(b"x")
        self.flow()
        self.clock.advance(9.9)
        self.flow()
        self.assertEqual(self.registry, {stats})
        self.clock.advance(0.1)
        self.flow()
        self.assertTrue(self.client.gone and self.service.gone)
        self.assertEqual(self.registry, set())

    def test_thousandRelays(self) -> None:
        for _ in range(1000):
            self.relay()
            self.client.transport.write(b"ping")
            self.client.transport.loseConnection()
            self.flow()
            self.assertEqual(self.service.data, b"ping")
            self.service.transport.loseConnection()
            self.flow()
        self.assertEqual(len(self.registry), 0)
        self.assertEqual(len(self.engine._relays), 0)

    def test_failureInRelay(self) -> None:
        ended: list[int] = []
        stats = self.relay(side=Boom)
        stats.on_end = lambda: ended.append(1)
        self.client.transport.write(b"boom")
        self.flow()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(self.client.gone and self.service.gone)
        self.assertEqual((self.registry, ended), (set(), [1]))

    def test_stopClosesEverything(self) -> None:
        self.relay()
        self.engine.stop()
        self.flow()
        self.assertTrue(self.client.gone and self.service.gone)
        self.assertEqual(self.registry, set())


class MemoryRelaysTests(SynchronousTestCase):
    """The fake engine for users' tests keeps the engine's contract."""

    def test_contract(self) -> None:
        engine = MemoryRelays()
        self.assertTrue(verifyObject(IRelayEngine, engine))
        engine.start()
        registry: set[RelayStats] = set()
        ends: list[int] = []
        a, b = socket.socketpair()
        stats = RelayStats(registry=registry, on_end=lambda: ends.append(1))
        self.assertIs(engine.join(a, b, stats, early=b"abc", idle_timeout=5), stats)
        self.assertEqual((registry, stats.forward), ({stats}, 3))
        [joined] = engine.joined
        self.assertEqual(joined.idle_timeout, 5)
        engine.stop()
        self.assertEqual((registry, ends, a.fileno(), b.fileno()), (set(), [1], -1, -1))
        c, d = socket.socketpair()
        refused = engine.join(c, d, RelayStats(registry=registry))
        self.assertEqual((registry, c.fileno(), refused.forward), (set(), -1, 0))
