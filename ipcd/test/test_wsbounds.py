"""
websocketd's bounds at their edges, on real sockets with ipcd in this
process: frames per message, a message's deadline, the opening
handshake's head (a request's, and a remote websocketd's response to a
route); and the pure logic they rest on (L{HeadReader}, L{ReadPauses}).
"""

from __future__ import annotations

import os
import socket
import threading
from itertools import pairwise
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ipcd.compat import twisted as compat_twisted
from ipcd.control import status_report
from ipcd.daemons.outbox import socket_of
from ipcd.daemons.websocket.daemon import OUTBOUND as WS_OUTBOUND
from ipcd.daemons.websocket.limits import (
    MAX_HEAD,
    HeadReader,
    HeadTooLarge,
    ReadPauses,
)
from ipcd.names import listen_unix
from ipcd.test.support import (
    TIMEOUT,
    assert_no_fd_leak,
    bounce,
    fd_baseline,
    lookup,
    wait_until,
)
from ipcd.test.udpsupport import eof_within
from ipcd.test.wssupport import (
    CLOSE,
    TEXT,
    close_code,
    start_ws_host,
    ws_frame,
    ws_message,
    ws_open,
)
from ipcd.wire import encode


def fragmented(port: int, frames: list[bytes]) -> tuple[int, bytes]:
    """Send a text message as C{frames} (payloads); the answer's opcode and payload."""
    opening = ws_open(port, "/pong")
    with opening.sock as sock:
        last = len(frames) - 1
        sock.sendall(
            b"".join(
                ws_frame(payload, TEXT if i == 0 else 0, fin=i == last)
                for i, payload in enumerate(frames)
            )
        )
        return ws_message(sock)


class FramesPerMessageTests(TestCase):
    @inlineCallbacks
    def test_framesCounted(self) -> Any:
        """
        With max_message_frames = 4, a message of 4 frames is echoed
        whole; one of 5 closes the connection with 1009, empty frames
        counting as any other; the daemon serves on, no fd leaks.
        """
        host = yield start_ws_host(self, max_message_frames=4)
        before = yield fd_baseline()
        answer = yield deferToThread(fragmented, host.port, [b"a", b"b", b"", b"c"])
        self.assertEqual(answer, (TEXT, b"abc"))
        opcode, payload = yield deferToThread(
            fragmented, host.port, [b"a", b"", b"", b"", b""]
        )
        self.assertEqual((opcode, close_code(payload)), (CLOSE, 1009))
        self.assertEqual(payload[2:], b"message of more than 4 frames")
        answer = yield deferToThread(fragmented, host.port, [b"ok"])
        self.assertEqual(answer, (TEXT, b"ok"))
        yield assert_no_fd_leak(before)


def unfinished(port: int) -> tuple[Any, int, bytes]:
    """One fragmented message whole, then one begun and never ended."""
    opening = ws_open(port, "/pong")
    with opening.sock as sock:
        sock.sendall(ws_frame(b"whole ", TEXT, fin=False) + ws_frame(b"one", 0))
        first = ws_message(sock)
        sock.sendall(ws_frame(b"never ", TEXT, fin=False))
        opcode, payload = ws_message(sock)  # waits, bounded by TIMEOUT
        return first, opcode, payload


class MessageDeadlineTests(TestCase):
    @inlineCallbacks
    def test_unfinishedMessage(self) -> Any:
        """
        A message not whole within message_timeout closes the connection
        with 1008; messages that end in time are echoed.
        """
        host = yield start_ws_host(self, message_timeout=0.5)
        before = yield fd_baseline()
        first, opcode, payload = yield deferToThread(unfinished, host.port)
        self.assertEqual(first, (TEXT, b"whole one"))
        self.assertEqual((opcode, close_code(payload)), (CLOSE, 1008))
        self.assertEqual(payload[2:], b"message not whole within 0.5 s")
        yield assert_no_fd_leak(before)


class CloseAfterABoundTests(TestCase):
    @inlineCallbacks
    def test_peerThatReadsNothingCut(self) -> Any:
        """
        With no pings (C{ping_interval = 0}), a peer that breaks a bound
        (here, a message not whole in time) and reads nothing cannot hold
        its connection: the close frame waits behind the echoes it left
        unread, and the connection, closed once they are sent, is cut
        C{close_handshake_timeout} later.
        """
        host = yield start_ws_host(
            self, message_timeout=0.5, close_handshake_timeout=0.5
        )
        before = yield fd_baseline()
        opening = yield deferToThread(ws_open, host.port, "/pong", buffers=4096)
        self.assertEqual(opening.status, 101)
        self.addCleanup(opening.sock.close)
        listener = host.service.getServiceNamed("websocketd").listener.factory
        [wrapper] = listener.protocols
        tcp = socket_of(wrapper.transport)
        # A small send buffer on websocketd's end: the echoes soon wait there.
        tcp.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        # 40 KB of echoes, left unread: under Twisted's 64 KiB, so the peer
        # is still read.
        echoes = ws_frame(b"e" * 1000) * 40
        yield deferToThread(opening.sock.sendall, echoes)
        yield wait_until(
            lambda: compat_twisted.buffered(tcp) > 16 * 1024, "echoes to wait"
        )
        # A message begun, never finished: closed at its deadline.
        yield deferToThread(opening.sock.sendall, ws_frame(b"begun", TEXT, fin=False))
        yield wait_until(
            lambda: not listener.protocols, "the peer to be cut", timeout=60
        )
        opening.sock.close()  # (the peer's own)
        yield assert_no_fd_leak(before)


def request_head(size: int, end: bool = True) -> bytes:
    """A WebSocket request for /pong whose head is C{size} bytes long."""
    start = (
        b"GET /pong HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\nX-Padding: "
    )
    closing = b"\r\n\r\n" if end else b""
    return start + b"p" * (size - len(start) - len(closing)) + closing


def answer_to(port: int, head: bytes, pieces: int = 1) -> bytes:
    """Send C{head} in C{pieces} writes; the status line of the answer."""
    with socket.create_connection(("127.0.0.1", port), TIMEOUT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        step = -(-len(head) // pieces)
        for start in range(0, len(head), step):
            sock.sendall(head[start : start + step])
        answer = b""
        while b"\r\n" not in answer and (chunk := sock.recv(4096)):
            answer += chunk
        return answer.split(b"\r\n", 1)[0]


class RequestHeadTests(TestCase):
    @inlineCallbacks
    def test_atTheLimit(self) -> Any:
        """
        A request head of exactly 16 KiB opens, in one write or many; one
        byte more gets 431, and so does 16 KiB and a byte without an end,
        at once (not at the handshake's deadline: a minute here).
        """
        host = yield start_ws_host(self, open_handshake_timeout=60)
        before = yield fd_baseline()
        switching = b"HTTP/1.1 101 Switching Protocols"
        too_large = b"HTTP/1.1 431 Request Header Fields Too Large"
        for pieces in (1, 7, 200):
            status = yield deferToThread(
                answer_to, host.port, request_head(MAX_HEAD), pieces
            )
            self.assertEqual(status, switching, pieces)
        status = yield deferToThread(answer_to, host.port, request_head(MAX_HEAD + 1))
        self.assertEqual(status, too_large)
        status = yield deferToThread(
            answer_to, host.port, request_head(MAX_HEAD + 1, end=False)
        )
        self.assertEqual(status, too_large)
        yield assert_no_fd_leak(before)


def endless_response(server: socket.socket) -> None:
    """Answer one WebSocket request with a status line and headers without end."""
    conn, _ = server.accept()
    with conn:
        conn.settimeout(TIMEOUT)
        request = b""
        while b"\r\n\r\n" not in request and (chunk := conn.recv(4096)):
            request += chunk
        try:
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\n")
            for _ in range(2000):  # 2 MB, if it were all read
                conn.sendall(b"X-Padding: " + b"p" * 1000 + b"\r\n")
        except OSError:
            pass  # closed by websocketd: as expected


class ResponseHeadTests(TestCase):
    @inlineCallbacks
    def test_remoteEndlessHead(self) -> Any:
        """
        A ws:// route to a server whose response head never ends is
        refused once 16 KiB came, naming why.
        """
        host = yield start_ws_host(self, pongd=False, rules=())
        server = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(server.close)
        server.settimeout(TIMEOUT)
        port = server.getsockname()[1]
        thread = threading.Thread(target=endless_response, args=(server,))
        thread.start()
        self.addCleanup(thread.join, TIMEOUT)
        payload = f"pong;pong ws://127.0.0.1:{port}/pong".encode()
        reply = yield deferToThread(lookup, host.rundir, payload)
        self.assertEqual(len(reply.fds), 0)
        self.assertIn(b"response head too large", reply.data)


class HeadReaderTests(SynchronousTestCase):
    """Pure logic: where a head ends, however it is cut into reads."""

    @settings(deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        size=st.integers(4, 300),
        after=st.binary(max_size=20),
        cuts=st.lists(st.integers(0, 330), max_size=12),
    )
    def test_anyCut(self, size: int, after: bytes, cuts: list[int]) -> None:
        """
        The head is whole exactly when its blank line has come, in any cut;
        then C{end} is where it ends in what is held.
        """
        head = b"h" * (size - 4) + b"\r\n\r\n"
        stream = head + after
        reader = HeadReader(limit=1000)
        bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
        for start, end in pairwise(bounds):
            whole = reader.feed(stream[start:end])
            self.assertEqual(whole, end >= len(head), (start, end))
            if whole:
                break
        self.assertEqual(bytes(reader.held), stream[:end])
        self.assertEqual(reader.end, len(head))

    def test_limit(self) -> None:
        """
        A head up to the limit is taken; past it, or past it without an
        end, HeadTooLarge, with at most the limit and one read held.
        """
        self.assertTrue(HeadReader(limit=10).feed(b"123456\r\n\r\n"))
        self.assertRaises(HeadTooLarge, HeadReader(limit=10).feed, b"1234567\r\n\r\n")
        reader = HeadReader(limit=10)
        self.assertFalse(reader.feed(b"1234567890"))
        self.assertRaises(HeadTooLarge, reader.feed, b"x")


class PausedTransport:
    """A transport's producer half: whether it is being read."""

    reading = True
    calls = 0

    def pauseProducing(self) -> None:  # noqa: N802
        self.reading = False
        self.calls += 1

    def resumeProducing(self) -> None:  # noqa: N802
        self.reading = True
        self.calls += 1


class ReadPausesTests(SynchronousTestCase):
    def test_readAgainWhenNoReasonIsLeft(self) -> None:
        """Each reason pauses once; reading resumes when the last one goes."""
        transport = PausedTransport()
        pauses = ReadPauses(transport)
        pauses.pause(1)
        pauses.pause(2)
        pauses.pause(2)
        self.assertFalse(transport.reading)
        pauses.resume(1)
        pauses.resume(1)
        self.assertFalse(transport.reading)
        pauses.resume(2)
        self.assertTrue(transport.reading)
        pauses.resume(2)
        self.assertEqual(transport.calls, 3)


class Oversized(Protocol):
    """A service that sends one message of 2000 bytes on connecting."""

    def connectionMade(self) -> None:  # noqa: N802
        self.transport.write(encode(b"x" * 2000))


def first_answer(port: int, path: str) -> tuple[int, int]:
    opening = ws_open(port, path)
    with opening.sock as sock:
        assert opening.status == 101, (opening.status, opening.reason)
        opcode, payload = ws_message(sock)
        return opcode, close_code(payload)


class ServiceMessageTests(TestCase):
    @inlineCallbacks
    def test_oversizedFromTheService(self) -> Any:
        """
        A message from the service over max_message_size closes the
        WebSocket with 1009 (message too big).
        """
        host = yield start_ws_host(self, rules=["allow in big"], max_message_size=1000)
        factory = Factory.forProtocol(Oversized)
        factory.noisy = False
        port = listen_unix(reactor, os.path.join(host.rundir, "big"), factory)
        self.addCleanup(port.stopListening)
        answer = yield deferToThread(first_answer, host.port, "/big")
        self.assertEqual(answer, (CLOSE, 1009))


def eof_after_partial_head(port: int, stopped: threading.Event) -> bytes:
    """Begin a request head, wait until websocketd stops, read what comes."""
    with socket.create_connection(("127.0.0.1", port), TIMEOUT) as sock:
        sock.sendall(b"GET /pong HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        stopped.wait(TIMEOUT)
        try:
            return sock.recv(4096)
        except ConnectionResetError:
            return b""


class StopTests(TestCase):
    @inlineCallbacks
    def test_handshakesDroppedOnStop(self) -> Any:
        """
        Stopping websocketd drops connections still in their opening
        handshake, as it does bridged ones (not at their deadline: a
        minute here).
        """
        host = yield start_ws_host(self, open_handshake_timeout=60)
        websocketd = host.service.getServiceNamed("websocketd")
        stopped = threading.Event()
        reading = deferToThread(eof_after_partial_head, host.port, stopped)
        yield wait_until(lambda: websocketd.factory.connections, "the connection")
        yield websocketd.stopService()
        stopped.set()
        answer = yield reading
        self.assertEqual(answer, b"")

    @inlineCallbacks
    def test_outboundBridgesEndOnStop(self) -> Any:
        """
        Stopping websocketd ends the ws:// bridges it holds for local
        clients too, as it does the WebSocket peers': each client sees EOF,
        the relays leave C{ipcd status} (and the live relays of the
        metrics: the same set), and their places in C{[limits]} are given
        back.  They stayed, counted, until each client closed its end.
        """
        far = yield start_ws_host(self)
        near = yield start_ws_host(self, pongd=False, rules=())
        limits = near.broker.limits_for(WS_OUTBOUND)
        route = f"pong;pong {far.route('pong')}".encode()
        clients = []
        for _ in range(2):
            reply = yield deferToThread(lookup, near.rundir, route)
            self.assertEqual(reply.data, b"ok")
            sock = reply.take_socket(self)
            self.assertEqual((yield deferToThread(bounce, sock)), encode(b"bounce me"))
            clients.append(sock)
        self.assertEqual(limits.total, 2)
        self.assertEqual(len(status_report(near.broker)["connections"]), 2)
        yield near.service.getServiceNamed("websocketd").stopService()
        for sock in clients:
            self.assertTrue((yield deferToThread(eof_within, sock)))
        yield wait_until(lambda: limits.total == 0, "their places given back")
        self.assertEqual(dict(limits.per_peer), {})
        self.assertEqual(status_report(near.broker)["connections"], [])
        self.assertEqual(set(near.broker.relays), set())

    @inlineCallbacks
    def test_dialsGivenUpOnStop(self) -> Any:
        """
        A ws:// dial still in its opening handshake when websocketd stops
        is given up: the lookup is refused (it would have opened a bridge
        on the stopped websocketd, counted until its client closed), its
        place given back, the far connection closed; a ws:// lookup after
        the stop is refused.
        """
        silent: list[Protocol] = []
        far = reactor.listenTCP(
            0, Factory.forProtocol(lambda: _Silent(silent)), interface="127.0.0.1"
        )
        self.addCleanup(far.stopListening)
        route = f"pong;pong ws://127.0.0.1:{far.getHost().port}/pong".encode()
        near = yield start_ws_host(self, pongd=False, rules=())
        limits = near.broker.limits_for(WS_OUTBOUND)
        asking = deferToThread(lookup, near.rundir, route)
        yield wait_until(lambda: silent, "the dial to connect")
        self.assertEqual(limits.total, 1)
        yield near.service.getServiceNamed("websocketd").stopService()
        reply = yield asking
        self.assertEqual(reply.fds, [])
        self.assertTrue(reply.data.endswith(b": websocketd stopped"), reply.data)
        self.assertEqual((limits.total, dict(limits.per_peer)), (0, {}))
        yield wait_until(lambda: silent[0].transport is None, "the far side closed")
        reply = yield deferToThread(lookup, near.rundir, route)
        self.assertEqual(reply.data, b"ne websocketd has stopped")


class _Silent(Protocol):
    """A far side that accepts and never answers; lost: transport None."""

    def __init__(self, made: list[Protocol]) -> None:
        self.made = made

    def connectionMade(self) -> None:  # noqa: N802
        self.made.append(self)

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        self.transport = None
