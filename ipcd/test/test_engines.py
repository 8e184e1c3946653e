"""
Both relay engines against the same expectations: L{SocketRelays} on real
sockets and the running reactor, L{TransportRelays} in memory.  Every wait
is bounded (L{wait_until}); nothing asserts on time.
"""

from __future__ import annotations

import hashlib
import socket
import struct
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from ipcd.relay import READ_SIZE, RelayStats, SocketRelays
from ipcd.test.support import TIMEOUT, assert_no_fd_leak, fd_baseline, wait_until

MiB = 1 << 20
BULK = 100 * MiB
# What the test process's peak RSS may grow by while BULK bytes go through
# a relay whose receiver does not read at first.  One relay holds at most
# READ_SIZE per direction; the rest is the test's own buffers and threads.
RSS_BOUND = 16 * MiB


def status(field: str) -> int:
    """A field of /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


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


def send_bulk(sock: socket.socket, total: int) -> str:
    """Send C{total} bytes (one reused block), then EOF; their digest."""
    block = bytes(range(256)) * 4096  # 1 MiB
    digest = hashlib.sha256()
    for _ in range(total // len(block)):
        sock.sendall(block)
        digest.update(block)
    sock.shutdown(socket.SHUT_WR)
    return digest.hexdigest()


class FailingSocket(socket.socket):
    """A socket whose C{send} fails in a way the engine does not expect."""

    def send(self, *args: Any) -> int:
        raise RuntimeError("injected send failure")


class SocketEngineTests(TestCase):
    """L{SocketRelays} on the running reactor, as tcpd runs it."""

    @inlineCallbacks
    def setUp(self) -> Any:
        self.engine = SocketRelays(reactor)
        self.engine.start()
        self.addCleanup(self.engine.stop)
        self.before = yield fd_baseline()  # the engine's own epoll included
        self.registry: set[RelayStats] = set()

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
        reset_peak()
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
        yield assert_no_fd_leak(self.before)
