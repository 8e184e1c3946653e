"""
websocketd end to end, on real sockets: WebSocket clients with no libipc
(a minimal RFC 6455 client in L{ipcd.test.wssupport}, and the websocketc
command), libipc clients through C{ws://} and C{wss://} routes across two
in-process hosts, C{RUNDIR/ws}, and the limits websocketd enforces.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from typing import Any

from autobahn.websocket import protocol as autobahn_protocol
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import Factory
from twisted.internet.testing import EventLoggingObserver
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from ipcd.compat import autobahn as compat_autobahn
from ipcd.compat.autobahn import Pretty
from ipcd.daemons.websocket.bridge import FRAME_BUDGET
from ipcd.daemons.websocket.client import WebSocketOutbound
from ipcd.daemons.websocket.daemon import OUTBOUND as WS_OUTBOUND
from ipcd.daemons.websocket.frames import small_server_frame
from ipcd.daemons.websocket.limits import BACKLOG
from ipcd.daemons.websocket.server import WebSocketInbound
from ipcd.limits import LOG_BURST, LOG_PERIOD
from ipcd.names import listen_unix
from ipcd.test.support import (
    TIMEOUT,
    assert_lines_bounded,
    assert_logged,
    assert_no_fd_leak,
    assert_route_loop,
    assert_unexpected_bounded,
    bounce,
    calls_to,
    connect_unix,
    fd_baseline,
    free_port,
    logged_lines,
    lookup,
    python_env,
    short_rundir,
    stale_socket,
    wait_rate_limited,
    wait_until,
)
from ipcd.test.tcpsupport import BAD_PROXY_HEADERS, recv_eof
from ipcd.test.wssupport import (
    BINARY,
    CLOSE,
    PING,
    PONG,
    TEXT,
    WS_LISTEN,
    TurnCounts,
    close_code,
    connect_tcp,
    make_ca,
    read_opening,
    start_ws_host,
    unverified_context,
    upgrade_request,
    ws_accepted,
    ws_frame,
    ws_message,
    ws_open,
    ws_recv,
    ws_send,
)
from ipcd.wire import LOG_LINES_DROPPED, MessageProtocol, encode, recv_message

OK = b"ok"


def echo(port: int, messages: list[tuple[bytes, int]], path: str = "/pong") -> Any:
    """Open C{path}, send each message, return the replies and close."""
    opening = ws_open(port, path)
    sock = opening.sock
    try:
        assert opening.status == 101, (opening.status, opening.reason)
        replies = []
        for payload, opcode in messages:
            ws_send(sock, payload, opcode)
            replies.append(ws_message(sock))
        return replies
    finally:
        sock.close()


def early_messages(port: int) -> list[bytes]:
    """
    Open /pong with two messages in the same write as the opening
    handshake; their replies.
    """
    early = ws_frame(b"early", BINARY) + ws_frame(b"bird", TEXT)
    opening = ws_open(port, "/pong", early=early)
    with opening.sock as sock:
        if opening.status != 101:
            raise AssertionError((opening.status, opening.reason))
        return [ws_message(sock)[1], ws_message(sock)[1]]


def accept_request(listener: socket.socket) -> tuple[socket.socket, bytes]:
    """A connection to C{listener}, and the head of the request it sent."""
    listener.settimeout(TIMEOUT)
    conn, _ = listener.accept()
    conn.settimeout(TIMEOUT)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = conn.recv(4096)
        if not chunk:
            raise EOFError(head)
        head += chunk
    return conn, head


def refusal(
    port: int, path: str, origin: str | None = None, host: str | None = None
) -> tuple[int, str]:
    opening = ws_open(port, path, origin, host_header=host)
    opening.sock.close()
    return opening.status, opening.reason


def raw_upgrade(port: int, path: str) -> bytes:
    """All websocketd sends a peer asking to upgrade C{path}, to its EOF."""
    sock = connect_tcp("127.0.0.1", port, None, None, TIMEOUT)
    with sock:
        sock.sendall(upgrade_request(path, f"127.0.0.1:{port}"))
        return recv_eof(sock)


# What a peer asking for a service there is not reads: the status line,
# no header, no body (nothing of RUNDIR's).
NO_SUCH_SERVICE_ANSWER = b"HTTP/1.1 404 no such service\r\n\r\n"


def websocketc(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "ipcd.scripts.websocketc", *args],
        input=stdin,
        capture_output=True,
        timeout=30,
        env=python_env(),
    )


class InboundTests(TestCase):
    """A WebSocket client with no libipc reaches pongd through websocketd."""

    @inlineCallbacks
    def setUp(self) -> Any:
        self.host = yield start_ws_host(self)

    def url(self, service: str = "pong") -> str:
        return f"ws://127.0.0.1:{self.host.port}/{service}"

    @inlineCallbacks
    def test_textAndBinary(self) -> Any:
        """
        One WebSocket message is one libipc message each way, and a reply
        goes out as the type of the client's most recent message; a reply
        that is not UTF-8 goes out binary.
        """
        replies = yield deferToThread(
            echo,
            self.host.port,
            [
                (b"hello", TEXT),
                (b"\x00\xffbin", BINARY),
                ("h\u00e9llo".encode(), BINARY),
                ("h\u00e9llo".encode(), TEXT),
            ],
        )
        self.assertEqual(
            replies,
            [
                (TEXT, b"hello"),
                (BINARY, b"\x00\xffbin"),
                (BINARY, "h\u00e9llo".encode()),
                (TEXT, "h\u00e9llo".encode()),
            ],
        )

    @inlineCallbacks
    def test_optionsNotPrettyPrinted(self) -> Any:
        """
        autobahn pretty-prints a new connection's options for a debug line
        (about 400 us): not for websocketd's connections, whose debug lines
        are dropped; what the line would say is the same when it is written.
        """
        printed: list[Any] = []
        real = autobahn_protocol.pformat

        def counting(*args: Any, **kwargs: Any) -> str:
            printed.append(args)
            return real(*args, **kwargs)

        self.patch(autobahn_protocol, "pformat", counting)
        replies = yield deferToThread(echo, self.host.port, [(b"hello", TEXT)])
        self.assertEqual(replies, [(TEXT, b"hello")])
        self.assertEqual(printed, [])
        options = [
            ("openHandshakeTimeout", 5, "factory"),
            ("utf8validateIncoming", True),
        ]
        later = Pretty(real, (options,), {"width": 20})
        self.assertEqual(f"\n{later}", "\n" + real(options, width=20))
        self.assertEqual(str(later), repr(later))

    @inlineCallbacks
    def test_messagesKeepTheirBounds(self) -> Any:
        """Empty and large messages arrive whole, as sent."""
        big = os.urandom(300_000)
        replies = yield deferToThread(
            echo, self.host.port, [(b"", BINARY), (big, BINARY), (b"x", TEXT)]
        )
        self.assertEqual(replies, [(BINARY, b""), (BINARY, big), (TEXT, b"x")])

    @inlineCallbacks
    def test_streamCutAnywhere(self) -> Any:
        """
        Messages keep their bounds and order however the stream is cut
        into reads: thousands of small messages in a few large writes, a
        fragmented message with a ping between its frames, 64-bit lengths,
        and writes that end inside a frame's header.
        """
        messages = [(os.urandom(i % 300), BINARY) for i in range(3000)]
        messages[1000:1000] = [(b"x" * 70_000, TEXT), (os.urandom(66_000), BINARY)]
        frames = [ws_frame(payload, opcode) for payload, opcode in messages]
        fragmented = [
            ws_frame(b"frag", TEXT, fin=False),
            ws_frame(b"ping", PING),
            ws_frame(b"men" * 3000, 0, fin=False),
            ws_frame(b"ted", 0),
        ]
        frames[2000:2000] = fragmented
        messages.insert(2000, (b"frag" + b"men" * 3000 + b"ted", TEXT))
        stream = b"".join(frames)

        def run() -> list[tuple[int, bytes]]:
            opening = ws_open(self.host.port, "/pong")
            sock = opening.sock
            try:
                self.assertEqual(opening.status, 101)
                # Cuts that fall inside headers (1, 3 and 9 bytes in).
                cuts = [0, 1, 3, 9, 5000, 5003, 70_001, 140_009]
                cuts += range(200_000, len(stream), 150_001)
                ends = [*cuts[1:], None]
                pieces = [stream[a:b] for a, b in zip(cuts, ends, strict=True)]

                def writer() -> None:
                    for piece in pieces:
                        sock.sendall(piece)

                thread = threading.Thread(target=writer, daemon=True)
                thread.start()
                replies = [ws_message(sock) for _ in messages]
                thread.join(TIMEOUT)
                return replies
            finally:
                sock.close()

        replies = yield deferToThread(run)
        # (Each reply's type follows the client's latest message when it
        # goes out, which pipelining leaves open: the payloads are the test.)
        self.assertEqual([p for _, p in replies], [p for p, _ in messages])

    @inlineCallbacks
    def test_smallMessagesSkipAutobahnsParser(self) -> Any:
        """
        A read that is one small whole message (the round trip's case) is
        answered without autobahn's frame parser, its reply in a frame of
        websocketd's own; anything else (here a fragmented message) still
        goes through autobahn's parser, and both answer alike.
        """
        parsed: list[int] = []
        processData = WebSocketInbound.processData  # noqa: N806

        def counted(protocol: Any) -> Any:
            parsed.append(1)
            return processData(protocol)

        self.patch(WebSocketInbound, "processData", counted)

        def run() -> list[tuple[int, bytes]]:
            opening = ws_open(self.host.port, "/pong")
            with opening.sock as sock:
                replies = []
                for payload, opcode in ((b"hi", TEXT), (os.urandom(125), BINARY)):
                    ws_send(sock, payload, opcode)
                    replies.append(ws_recv(sock))
                replies.append(len(parsed))
                sock.sendall(ws_frame(b"frag", TEXT, fin=False) + ws_frame(b"ged", 0))
                replies.append(ws_recv(sock))
                return replies

        hi, binary, parses, fragmented = yield deferToThread(run)
        self.assertEqual(hi, (TEXT, b"hi"))
        self.assertEqual((binary[0], len(binary[1])), (BINARY, 125))
        self.assertEqual(parses, 0)
        self.assertEqual(fragmented, (TEXT, b"fragged"))
        self.assertGreater(len(parsed), 0)

    @inlineCallbacks
    def test_smallFramesStillChecked(self) -> Any:
        """
        A small frame that starts a new message inside a fragmented one is
        a protocol error (1002), a small text frame that is not UTF-8 fails
        with 1007, and one over a small maximum message size with 1009, as
        autobahn answers them; the daemon keeps serving.
        """
        host = yield start_ws_host(self, max_message_size=10)

        def closed_by(*frames: bytes) -> tuple[int, int]:
            opening = ws_open(host.port, "/pong")
            with opening.sock as sock:
                for frame in frames:
                    sock.sendall(frame)
                    if frame[0] & 0x0F == PING:
                        self.assertEqual(ws_recv(sock), (PONG, b"p"))
                opcode, payload = ws_message(sock)
                return opcode, close_code(payload)

        # The ping's answer shows the first fragment was read on its own.
        inside = yield deferToThread(
            closed_by,
            ws_frame(b"a", TEXT, fin=False),
            ws_frame(b"p", PING),
            ws_frame(b"b", TEXT),
        )
        self.assertEqual(inside, (CLOSE, 1002))
        not_utf8 = yield deferToThread(closed_by, ws_frame(b"\xff\xfe", TEXT))
        self.assertEqual(not_utf8, (CLOSE, 1007))
        too_big = yield deferToThread(closed_by, ws_frame(b"x" * 11, BINARY))
        self.assertEqual(too_big, (CLOSE, 1009))
        replies = yield deferToThread(echo, host.port, [(b"still", TEXT)])
        self.assertEqual(replies, [(TEXT, b"still")])

    @inlineCallbacks
    def test_framesWithTheHandshake(self) -> Any:
        """
        Messages sent in the same write as the opening handshake (before
        its answer) are relayed too, and their replies come back.
        """
        replies = yield deferToThread(early_messages, self.host.port)
        self.assertEqual(replies, [b"early", b"bird"])

    @inlineCallbacks
    def test_websocketcCommand(self) -> Any:
        """websocketc sends text, binary, and stdin's lines; 0 when done."""
        text = yield deferToThread(websocketc, self.url(), "hello", "world")
        self.assertEqual((text.returncode, text.stdout), (0, b"hello\nworld\n"))
        binary = yield deferToThread(websocketc, "--binary", self.url(), "hi")
        self.assertEqual((binary.returncode, binary.stdout), (0, b"hi\n"))
        lines = yield deferToThread(websocketc, self.url(), stdin=b"one\ntwo\n")
        self.assertEqual((lines.returncode, lines.stdout), (0, b"one\ntwo\n"))

    @inlineCallbacks
    def test_noDescriptorForTheServiceClosesUnavailable(self) -> Any:
        """
        No descriptor left to take the service's connection when the
        WebSocket opens: the peer's close frame is 1011 "unavailable", no
        errno text (it was "cannot relay to the service: Too many open
        files"); the log says that.
        """
        joining = WebSocketInbound.joinSocket

        def no_descriptor(protocol: Any, reactor: Any, *args: Any, **kw: Any) -> Any:
            return joining(protocol, NoDescriptorLeft(reactor), *args, **kw)

        self.patch(WebSocketInbound, "joinSocket", no_descriptor)
        lines = logged_lines(self)
        opening = yield deferToThread(ws_open, self.host.port, "/pong")
        with opening.sock:
            self.assertEqual(opening.status, 101)
            frame = yield deferToThread(ws_recv, opening.sock)
        self.assertEqual(frame, (CLOSE, struct.pack("!H", 1011) + b"unavailable"))
        yield wait_until(
            lambda: [line for line in lines if "cannot relay to the service" in line],
            "the reason logged",
        )

    @inlineCallbacks
    def test_websocketcTellsRefusedFromUnreachable(self) -> Any:
        """Exit 3 with the reason for a refusal, 4 when nobody listens."""
        refused = yield deferToThread(websocketc, self.url("secret"), "x")
        self.assertEqual(refused.returncode, 3)
        self.assertIn(b"403", refused.stderr)
        self.assertEqual(
            refused.stderr.decode(),
            f"websocketc: {self.url('secret')}: WebSocket connection upgrade failed "
            "[403]: refused (that host's ipcd denies inbound connections unless "
            'a rule allows them: --allow "in secret")\n',
        )
        free = socket.socket()
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
        free.close()  # nobody listens there now
        unreachable = yield deferToThread(
            websocketc, f"ws://127.0.0.1:{port}/pong", "x"
        )
        self.assertEqual(unreachable.returncode, 4)
        self.assertIn(b"refused", unreachable.stderr)

    @inlineCallbacks
    def test_refusedServices(self) -> Any:
        """
        A service the policy denies fails the handshake with 403 and the
        reason, an unknown one with 404; the daemon keeps serving, no fd
        leaks.
        """
        before = yield fd_baseline()
        denied = yield deferToThread(refusal, self.host.port, "/secret")
        self.assertEqual(denied, (403, "refused"))
        bad = yield deferToThread(refusal, self.host.port, "/a/b")
        self.assertEqual(bad, (404, "no such service"))
        for _ in range(20):
            status = yield deferToThread(refusal, self.host.port, "/secret")
            self.assertEqual(status[0], 403)
        replies = yield deferToThread(echo, self.host.port, [(b"still", TEXT)])
        self.assertEqual(replies, [(TEXT, b"still")])
        yield assert_no_fd_leak(before)

    @inlineCallbacks
    def test_plainRequests(self) -> Any:
        """GET / serves the page; other plain requests get 404, no redirect."""

        def get(path: str) -> bytes:
            sock = socket.create_connection(("127.0.0.1", self.host.port), TIMEOUT)
            with sock:
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
                return data

        page = yield deferToThread(get, "/")
        self.assertTrue(page.startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertIn(b"Content-Security-Policy: default-src 'none'", page)
        self.assertIn(b"<title>websocketc</title>", page)
        self.assertNotIn(b"http://", page.split(b"\r\n\r\n", 1)[1])
        self.assertNotIn(b"https://", page.split(b"\r\n\r\n", 1)[1])
        other = yield deferToThread(get, "/pong")
        self.assertTrue(other.startswith(b"HTTP/1.1 404 "))
        redirect = yield deferToThread(get, "/?redirect=http%3A%2F%2Fevil.example%2F")
        self.assertTrue(redirect.startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertNotIn(b"evil.example", redirect)


class InboundPathTests(TestCase):
    @inlineCallbacks
    def test_redirectionAndStatus(self) -> Any:
        """
        The shared inbound path: an admin redirection is followed (echo ->
        pong, the policy checked on both names), and the live bridge is in
        the status with its bytes.
        """
        host = yield start_ws_host(
            self, rules=["allow in echo", "allow in pong"], redirects={"echo": "pong"}
        )
        opening = yield deferToThread(ws_open, host.port, "/echo")
        self.addCleanup(opening.sock.close)
        self.assertEqual(opening.status, 101)
        reply = yield deferToThread(
            lambda: (ws_send(opening.sock, b"12345"), ws_message(opening.sock))[1]
        )
        self.assertEqual(reply, (TEXT, b"12345"))
        [stats] = host.broker.relays
        self.assertEqual(
            (
                stats.direction,
                stats.service,
                stats.route,
                stats.forward,
                stats.backward,
            ),
            ("in", "echo", "websocket inbound", 5, 5),
        )
        self.assertEqual(stats.labels, ("ip:127.0.0.1",))


class UnknownServiceTests(TestCase):
    @inlineCallbacks
    def test_unknownServiceIs404(self) -> Any:
        """
        An allowed name that no service listens on: 404 "no such service",
        exactly what the peer reads (the status line, no body); RUNDIR's
        path only in the decision line.
        """
        host = yield start_ws_host(self, rules=["allow in nosuch"])
        lines = logged_lines(self)
        answer = yield deferToThread(raw_upgrade, host.port, "/nosuch")
        self.assertEqual(answer, NO_SUCH_SERVICE_ANSWER)
        assert_logged(self, lines, f"{host.rundir}/nosuch does not exist")


class StatusTests(TestCase):
    """
    Each word a remote peer is told, as a real client reads it over a real
    socket: 403 refused (never), 404 no such service, 503 unavailable and
    503 busy (try again later; busy with Retry-After), the reason phrase
    the one word, no body; the daemon keeps serving, no fd leaks.
    """

    def opening(self, port: int, path: str) -> Any:
        opening = ws_open(port, path)
        with opening.sock as sock:
            # Nothing after the head: no body, then the close.
            rest = recv_eof(sock)
        return opening.status, opening.reason, opening.headers, rest

    @inlineCallbacks
    def test_eachStatus(self) -> Any:
        far = yield start_ws_host(self)
        host = yield start_ws_host(
            self,
            rules=["allow in gone", "allow in nosuch", "allow in far"],
            routes={"far": far.route("pong")},
            limits={"max_connections": 1},
        )
        stale_socket(os.path.join(host.rundir, "gone"))
        # A local client's ws:// relay takes the one place ws:// relays
        # have on this ipcd: the peer's route to far is over the limit.
        reply = yield deferToThread(
            lookup, host.rundir, f"pong;pong {far.route('pong')}".encode()
        )
        self.assertEqual(reply.first, b"ok")
        held = reply.take_socket(self)
        before = yield fd_baseline()
        answers = {}
        for path in ("/pong", "/nosuch", "/gone", "/far"):
            answers[path] = yield deferToThread(self.opening, host.port, path)
        self.assertEqual(
            answers,
            {
                "/pong": (403, "refused", {}, b""),
                "/nosuch": (404, "no such service", {}, b""),
                "/gone": (503, "unavailable", {}, b""),
                "/far": (503, "busy", {"retry-after": "1"}, b""),
            },
        )
        held.close()
        limits = host.broker.limits_for(WS_OUTBOUND)
        yield wait_until(lambda: limits.total == 0, "the local relay counted out")
        replies = yield deferToThread(echo, host.port, [(b"far", TEXT)], "/far")
        self.assertEqual(replies, [(TEXT, b"far")])
        yield assert_no_fd_leak(before)

    @inlineCallbacks
    def test_busyAtTheListener(self) -> Any:
        """
        Past [limits] max_connections_per_peer, before any request: 503
        busy with Retry-After, as a limit in the handshake's answer.
        """
        host = yield start_ws_host(self, limits={"max_connections_per_peer": 1})
        admitted = socket.create_connection(("127.0.0.1", host.port), TIMEOUT)
        self.addCleanup(admitted.close)
        limits = host.broker.limits_for("websocketd")
        yield wait_until(lambda: limits.total == 1, "the first peer admitted")
        answer = yield deferToThread(raw_upgrade, host.port, "/pong")
        self.assertEqual(
            answer,
            b"HTTP/1.1 503 busy\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n",
        )


class OriginTests(TestCase):
    @inlineCallbacks
    def test_origins(self) -> Any:
        """
        A browser page from another origin is refused (403), its own origin
        and a configured one are served; clients without Origin are too.
        """
        host = yield start_ws_host(self, allowed_origins=["https://*.example.org"])
        port = host.port
        bad = yield deferToThread(refusal, port, "/pong", "http://evil.example")
        self.assertEqual(bad, (403, "origin http://evil.example not allowed"))
        null = yield deferToThread(refusal, port, "/pong", "null")
        self.assertEqual(null[0], 403)
        for origin in (f"http://127.0.0.1:{port}", "https://app.example.org", None):
            status = yield deferToThread(refusal, port, "/pong", origin)
            self.assertEqual(status[0], 101, origin)
        local = yield deferToThread(
            refusal, port, "/pong", f"http://localhost:{port}", f"localhost:{port}"
        )
        self.assertEqual(local[0], 101)
        # DNS rebinding: a page whose name now points here has "our" origin.
        rebound = f"rebound.example:{port}"
        status = yield deferToThread(
            refusal, port, "/pong", f"http://{rebound}", rebound
        )
        self.assertEqual(status, (403, f"origin http://{rebound} not allowed"))


class LimitTests(TestCase):
    @inlineCallbacks
    def test_oversizedMessage(self) -> Any:
        """
        A message over max_message_size closes that connection with 1009;
        the daemon keeps serving, no fd leaks.
        """
        host = yield start_ws_host(self, max_message_size=1000)
        before = yield fd_baseline()

        def oversized() -> tuple[int, bytes]:
            opening = ws_open(host.port, "/pong")
            with opening.sock as sock:
                ws_send(sock, b"x" * 1000, BINARY)
                first = ws_message(sock)
                ws_send(sock, b"x" * 1001, BINARY)
                opcode, payload = ws_message(sock)
                return first, (opcode, close_code(payload))

        first, closed = yield deferToThread(oversized)
        self.assertEqual(first, (BINARY, b"x" * 1000))
        self.assertEqual(closed, (CLOSE, 1009))
        replies = yield deferToThread(echo, host.port, [(b"ok", TEXT)])
        self.assertEqual(replies, [(TEXT, b"ok")])
        yield assert_no_fd_leak(before)

    @inlineCallbacks
    def test_silentClientDropped(self) -> Any:
        """
        A client that never completes the opening handshake is dropped
        after open_handshake_timeout; the daemon keeps serving, no fd leaks.
        """
        host = yield start_ws_host(self, open_handshake_timeout=0.5)
        before = yield fd_baseline()

        def silent() -> bytes:
            sock = socket.create_connection(("127.0.0.1", host.port), TIMEOUT)
            data = b""
            with sock:
                sock.sendall(b"GET /pong HTTP/1.1\r\nHost: x\r\n")  # never ends
                try:
                    while chunk := sock.recv(4096):
                        data += chunk
                except ConnectionResetError:
                    pass  # dropped, as well
            return data

        answer = yield deferToThread(silent)
        self.assertNotIn(b"101", answer)
        replies = yield deferToThread(echo, host.port, [(b"ok", TEXT)])
        self.assertEqual(replies, [(TEXT, b"ok")])
        yield assert_no_fd_leak(before)

    @inlineCallbacks
    def test_maxConnections(self) -> Any:
        """
        At max_connections the listener stops accepting, connections still
        in their opening handshake included: a third peer waits in the
        backlog and is served once one of the two ends.  (autobahn's own
        503 comes only with a whole head: peers that never finish theirs
        were held up to [limits] max_connections at once.)
        """
        host = yield start_ws_host(self, max_connections=2, open_handshake_timeout=3600)
        before = yield fd_baseline()
        unfinished = [
            socket.create_connection(("127.0.0.1", host.port), TIMEOUT)
            for _ in range(2)
        ]
        for sock in unfinished:
            self.addCleanup(sock.close)
            sock.sendall(b"GET /pong HTTP/1.1\r\nHost: x\r\n")  # never ends
        factory = host.service.getServiceNamed("websocketd").factory
        yield wait_until(lambda: len(factory.connections) == 2, "both accepted")
        counters = host.broker.counters
        self.assertEqual(counters["websocketd: paused at the connection limit"], 1)
        third = deferToThread(echo, host.port, [(b"ok", TEXT)])
        unfinished[0].close()
        replies = yield third
        self.assertEqual(replies, [(TEXT, b"ok")])
        unfinished[1].close()
        yield assert_no_fd_leak(before)

    @inlineCallbacks
    def test_pingsBetweenMessages(self) -> Any:
        """
        websocketd pings between relayed messages; a client that answers
        stays connected past many ping timeouts, its messages echoed.
        """
        host = yield start_ws_host(self, ping_interval=0.1, ping_timeout=0.3)

        def run() -> tuple[int, list[bytes]]:
            opening = ws_open(host.port, "/pong")
            with opening.sock as sock:
                pings, replies = 0, []
                for i in range(15):
                    ws_send(sock, b"%d" % i, BINARY)
                    while True:
                        opcode, payload = ws_recv(sock)
                        if opcode == PING:
                            pings += 1
                            ws_send(sock, payload, PONG)
                        else:
                            replies.append(payload)
                            break
                    time.sleep(0.1)
                return pings, replies

        pings, replies = yield deferToThread(run)
        self.assertEqual(replies, [b"%d" % i for i in range(15)])
        self.assertGreaterEqual(pings, 3)

    @inlineCallbacks
    def test_clientThatStopsReading(self) -> Any:
        """
        A client that sends and stops reading: websocketd stops reading it
        once the buffers are full (pongd's echoes have nowhere to go), keeps
        serving others, and drops it when it answers no ping; everything
        it held is freed while the client still holds its socket.
        """
        host = yield start_ws_host(self, ping_interval=0.5, ping_timeout=0.5)
        before = yield fd_baseline()
        opening = yield deferToThread(ws_open, host.port, "/pong")
        sock = opening.sock
        self.addCleanup(sock.close)
        sock.settimeout(0.5)
        payload = os.urandom(60_000)

        def flood() -> int:
            count = 0
            try:
                for _ in range(2000):  # 120 MB if nothing pushed back
                    ws_send(sock, payload, BINARY)
                    count += 1
            except (TimeoutError, ConnectionError):
                pass
            return count

        sent = yield deferToThread(flood)
        self.assertLess(sent, 2000, "websocketd read everything: no backpressure")
        replies = yield deferToThread(echo, host.port, [(b"others", TEXT)])
        self.assertEqual(replies, [(TEXT, b"others")])
        # Dropped for the unanswered pings: back to the fds before it came.
        yield assert_no_fd_leak({**before, sock.fileno(): "the client's socket"})
        self.assertEqual(host.broker.relays, set())


def rss() -> int:
    """This process's resident set size, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Firehose(MessageProtocol):
    """A service that sends C{total} bytes in 64 KiB messages, as fast as allowed."""

    def messageReceived(self, payload: bytes) -> None:
        pass

    total = 100 * 1000 * 1000
    chunk = encode(b"z" * 65536)

    def connectionMade(self) -> None:
        self.left = self.total
        self.paused = False
        self.transport.unregisterProducer()
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.left > 0:
            self.transport.write(self.chunk)
            self.left -= 65536
        if self.left <= 0:
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def stopProducing(self) -> None:
        self.left = 0


class SlowReaderTests(TestCase):
    @inlineCallbacks
    def test_100MBToASlowReader(self) -> Any:
        """
        100 MB from a fast service towards a client that reads slowly
        arrive whole, and the daemon's memory stays bounded meanwhile.
        """
        host = yield start_ws_host(self, rules=["allow in firehose"])
        factory = Factory.forProtocol(Firehose)
        factory.noisy = False
        port = listen_unix(reactor, os.path.join(host.rundir, "firehose"), factory)
        self.addCleanup(port.stopListening)
        start = rss()
        peak = [start]

        def sample() -> None:
            peak[0] = max(peak[0], rss())

        from twisted.internet.task import LoopingCall

        sampler = LoopingCall(sample)
        sampler.start(0.05)
        self.addCleanup(sampler.stop)

        def slow_read() -> int:
            import time

            opening = ws_open(host.port, "/firehose")
            assert opening.status == 101, opening
            received = 0
            with opening.sock as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
                ws_send(sock, b"go", BINARY)
                while received < Firehose.total:
                    opcode, payload = ws_message(sock)
                    if opcode == CLOSE:
                        break
                    received += len(payload)
                    if received % (4 * 1024 * 1024) < 65536:
                        time.sleep(0.01)  # slower than the service
            return received

        received = yield deferToThread(slow_read)
        self.assertGreaterEqual(received, Firehose.total)
        growth = peak[0] - start
        self.assertLess(growth, 48 * 1024 * 1024, f"RSS grew by {growth} bytes")


def proxied_status(
    port: int, source: str, secure: bool, header: bytes | None = None
) -> int:
    """
    The status of an opening handshake for pong on C{port}, after a PROXY
    header naming C{source} (inside TLS when C{secure}, as Twisted reads it),
    or after C{header} if given.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    if secure:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        sock = context.wrap_socket(sock)
    with sock:
        if header is None:
            header = f"PROXY TCP4 {source} 127.0.0.1 4000 {port}\r\n".encode()
        sock.sendall(header + upgrade_request("/pong", f"127.0.0.1:{port}"))
        return read_opening(sock).status


def proxied_answer(port: int, header: bytes, secure: bool) -> bytes:
    """
    websocketd's answer to an opening handshake for pong after C{header}
    (inside TLS when C{secure}): its head, or all it says until it closes
    or cuts the connection.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    if secure:
        sock = unverified_context().wrap_socket(sock)
    answer = b""
    with sock:
        try:
            sock.sendall(header + upgrade_request("/pong", f"127.0.0.1:{port}"))
            while b"\r\n\r\n" not in answer and (chunk := sock.recv(4096)):
                answer += chunk
        except (ConnectionResetError, ssl.SSLEOFError):
            pass
    return answer


class NoDescriptorLeft:
    """A reactor whose C{adoptStreamConnection} fails as at EMFILE."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def adoptStreamConnection(self, fd: int, family: int, factory: Any) -> Any:  # noqa: N802
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


class RouteTests(TestCase):
    """A libipc client on host A reaches pongd on host B through ws:// routes."""

    @inlineCallbacks
    def setUp(self) -> Any:
        self.a = yield start_ws_host(self, pongd=False, rules=())
        self.b = yield start_ws_host(self)

    @inlineCallbacks
    def lookupOnA(self, route: str) -> Any:
        payload = f"pong;pong {route}".encode()
        reply = yield deferToThread(lookup, self.a.rundir, payload)
        return reply

    @inlineCallbacks
    def test_wsRoute(self) -> Any:
        """IPC_NETWORK="pong ws://127.0.0.1:PORT/pong" reaches B's pongd."""
        reply = yield self.lookupOnA(self.b.route("pong"))
        self.assertEqual((reply.first, len(reply.fds)), (OK, 1))
        sock = reply.take_socket(self)
        answer = yield deferToThread(bounce, sock, b"through two instances")
        self.assertEqual(answer, encode(b"through two instances"))
        big = os.urandom(500_000)
        answer = yield deferToThread(bounce, sock, big)
        self.assertEqual(answer, encode(big))

    @inlineCallbacks
    def test_framesWithAHandshakeThatWaits(self) -> Any:
        """
        A's pong is an admin route to B: A's opening handshake waits for
        the WebSocket to B, and the messages that came with it still go
        through, their replies back.
        """
        c = yield start_ws_host(
            self, pongd=False, routes={"pong": self.b.route("pong")}
        )
        replies = yield deferToThread(early_messages, c.port)
        self.assertEqual(replies, [b"early", b"bird"])

    @inlineCallbacks
    def test_floodingServerHeldToTheFrameBudget(self) -> Any:
        """
        A remote server's read of many tiny frames is parsed by A's client
        end FRAME_BUDGET frames a turn of the reactor, the connection not
        read meanwhile, and every message reaches the client, in order.
        """
        outbound: list[Any] = []
        join = WebSocketOutbound.joinSocket

        def caught(protocol: Any, *args: Any, **kwargs: Any) -> None:
            join(protocol, *args, **kwargs)
            outbound.append(protocol)

        self.patch(WebSocketOutbound, "joinSocket", caught)
        reply = yield self.lookupOnA(self.b.route("pong"))
        sock = reply.take_socket(self)
        protocol = outbound[-1]
        fed = calls_to(self, compat_autobahn, "feed", lambda _protocol, data: data)
        count = 4 * FRAME_BUDGET + 3
        protocol.dataReceived(
            b"".join(small_server_frame(b"%d" % i, True) for i in range(count))
        )
        self.assertEqual(len(fed), FRAME_BUDGET)
        self.assertTrue(protocol.readPauses.reasons & BACKLOG)
        got = yield deferToThread(lambda: [recv_message(sock) for _ in range(count)])
        self.assertEqual(got, [b"%d" % i for i in range(count)])
        self.assertEqual(protocol.readPauses.reasons, 0)

    @inlineCallbacks
    def test_framesWithTheServersAnswerOnTheBudget(self) -> Any:
        """
        Tiny frames a remote server sends in the read of its 101 answer are
        parsed by A's client end once the WebSocket is open, at most
        FRAME_BUDGET a turn of the reactor, and every message reaches the
        client, in order.
        """
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        made = calls_to(self, WebSocketOutbound, "connectionMade", lambda p: p)
        route = f"ws://127.0.0.1:{listener.getsockname()[1]}/pong"
        asking = self.lookupOnA(route)
        conn, head = yield deferToThread(accept_request, listener)
        self.addCleanup(conn.close)
        protocol = made[-1]
        turns = TurnCounts(self, protocol)
        count = 4 * FRAME_BUDGET + 3
        frames = b"".join(small_server_frame(b"%d" % i, True) for i in range(count))
        protocol.dataReceived(ws_accepted(head) + frames)  # one read
        reply = yield asking
        sock = reply.take_socket(self)
        got = yield deferToThread(lambda: [recv_message(sock) for _ in range(count)])
        self.assertEqual(got, [b"%d" % i for i in range(count)])
        parsed = turns.parsed()
        self.assertLessEqual(max(parsed), FRAME_BUDGET, parsed)
        self.assertGreater(len(parsed), count // FRAME_BUDGET, parsed)
        self.assertEqual(protocol.readPauses.reasons, 0)

    @inlineCallbacks
    def test_serviceConnectionNotTaken(self) -> Any:
        """
        A's reactor cannot take the client's end of the route (no
        descriptor left: EMFILE) once the WebSocket to B opens: the client
        is answered so at once, and nothing is left listed as a relay.  It
        waited for the connect deadline, and the relay stayed listed.
        """
        joining = WebSocketOutbound.joinSocket

        def no_descriptor(protocol: Any, reactor: Any, *args: Any, **kw: Any) -> Any:
            return joining(protocol, NoDescriptorLeft(reactor), *args, **kw)

        self.patch(WebSocketOutbound, "joinSocket", no_descriptor)
        route = self.b.route("pong")
        reply = yield self.lookupOnA(route)
        self.assertEqual(len(reply.fds), 0)
        self.assertEqual(
            reply.data.decode(),
            f"ne websocketd at {route}: cannot relay to the service: "
            f"{os.strerror(errno.EMFILE)}",
        )
        relays = [r for r in self.a.broker.relays if r.daemon == "websocketd"]
        self.assertEqual(relays, [])

    @inlineCallbacks
    def test_remoteRefusalReachesTheClient(self) -> Any:
        """
        B refuses the service: A's client is refused with B's status and
        reason, as docs/protocol.rst shows them (not wrapped in autobahn's
        'connection was closed uncleanly').
        """
        route = self.b.route("secret")
        reply = yield self.lookupOnA(route)
        self.assertEqual(len(reply.fds), 0)
        self.assertEqual(
            reply.data.decode(),
            f"ne websocketd at {route}: WebSocket connection upgrade failed "
            "[403]: refused",
        )

    @inlineCallbacks
    def test_controlSocket(self) -> Any:
        """RUNDIR/ws speaks upstream's control protocol: framed URI, framed ok."""

        def control() -> bytes:
            sock = connect_unix(os.path.join(self.a.rundir, "ws"))
            with sock:
                sock.sendall(encode(self.b.route("pong").encode()))
                if recv_message(sock) != OK:
                    return b"no ok"
                return bounce(sock, b"via control")

        answer = yield deferToThread(control)
        self.assertEqual(answer, encode(b"via control"))


class SecureRouteTests(TestCase):
    """The same over wss://, verified against a test CA."""

    @inlineCallbacks
    def lookupOverTls(self, trusted: bool) -> Any:
        """
        Host B serves wss with a certificate of a test CA; host A trusts that
        CA (or another one); a client on A asks for B's pongd.
        """
        ca, cert, key = make_ca(short_rundir(self, "ipcd-ca-"))
        if not trusted:
            ca, _, _ = make_ca(short_rundir(self, "ipcd-ca-"))
        listen = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        self.b = b = yield start_ws_host(self, listen=listen)
        a = yield start_ws_host(self, pongd=False, rules=(), ca=ca)
        payload = f"pong;pong {b.route('pong')}".encode()
        self.assertTrue(payload.startswith(b"pong;pong wss://"))
        reply = yield deferToThread(lookup, a.rundir, payload)
        return reply

    @inlineCallbacks
    def test_wssRoute(self) -> Any:
        reply = yield self.lookupOverTls(trusted=True)
        self.assertEqual((reply.first, len(reply.fds)), (OK, 1))
        sock = reply.take_socket(self)
        answer = yield deferToThread(bounce, sock, b"over tls")
        self.assertEqual(answer, encode(b"over tls"))

    @inlineCallbacks
    def test_proxiedPeersAddress(self) -> Any:
        """
        Behind haproxy:ssl:, as behind haproxy:tcp:, the peer is the address
        its PROXY header names (read inside TLS, as Twisted did): an
        ip: rule sees it.  It saw the proxy's own address (TLS's transport),
        so 'allow in pong ip:192.0.2.0/24' let in no one, and a rule for the
        proxy's network would have let in everyone.
        """
        _ca, cert, key = make_ca(short_rundir(self, "ipcd-ca-"))
        tls = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        for listen, secure in (
            (f"haproxy:{tls}", True),
            ("haproxy:" + WS_LISTEN, False),
        ):
            host = yield start_ws_host(
                self, rules=["allow in pong ip:192.0.2.0/24"], listen=listen
            )
            for source, status in (("192.0.2.7", 101), ("198.51.100.7", 403)):
                answer = yield deferToThread(proxied_status, host.port, source, secure)
                self.assertEqual(answer, status, (listen, source))

    @inlineCallbacks
    def test_proxiedUnixPeerIsTheProxy(self) -> Any:
        """
        A PROXY v2 header naming a UNIX socket (no ip: address) leaves the
        proxy's own address, as on tcpd and tlsd (Twisted's wrapper's
        getPeer() said the UNIX address, which has no host).
        """
        host = yield start_ws_host(
            self, rules=["allow in pong ip:127.0.0.1"], listen="haproxy:" + WS_LISTEN
        )
        path = b"/run/proxy.sock".ljust(108, b"\0")
        header = b"\r\n\r\n\x00\r\nQUIT\n\x21\x31" + (216).to_bytes(2, "big")
        answer = yield deferToThread(
            proxied_status, host.port, "", False, header + path + path
        )
        self.assertEqual(answer, 101)

    @inlineCallbacks
    def test_badProxyHeadersRefused(self) -> Any:
        """
        A PROXY header naming no plain IP address of its family (or a port
        that is none) is refused, behind haproxy:tcp: and haproxy:ssl:
        (inside TLS) alike: the connection cut with no answer, counted, and
        said in one line each.  Twisted's wrapper let 'evil' and a zone in
        as the peer's address (ip:evil: 101 under 'allow in pong ip:*'),
        and the port 'x' out as a traceback.
        """
        _ca, cert, key = make_ca(short_rundir(self, "ipcd-ca-"))
        tls = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        yield self.badHeadersRefused("haproxy:" + WS_LISTEN, False)
        yield self.badHeadersRefused(f"haproxy:{tls}", True)

    @inlineCallbacks
    def badHeadersRefused(self, listen: str, secure: bool) -> Any:
        host = yield start_ws_host(self, rules=["allow in pong ip:*"], listen=listen)
        lines = logged_lines(self)
        headers = BAD_PROXY_HEADERS[:1] + BAD_PROXY_HEADERS[3:6]
        for header in headers:
            answer = yield deferToThread(proxied_answer, host.port, header, secure)
            self.assertEqual(answer, b"", (listen, header))
        counters = host.broker.counters
        counter = "websocketd: refused, bad PROXY header"
        yield wait_until(lambda: counters[counter] == len(headers), "all counted")
        limits = host.broker.limits_for("websocketd")
        yield wait_until(lambda: limits.total == 0, "the refused let go")
        said = [line for line in lines if line]
        self.assertEqual(len(said), len(headers), "\n".join(said))
        self.assertTrue(all("bad PROXY header" in line for line in said), said)
        status = yield deferToThread(proxied_status, host.port, "10.1.2.3", secure)
        self.assertEqual(status, 101, listen)

    @inlineCallbacks
    def test_secureListeners(self) -> Any:
        """
        A listener given as haproxy:ssl:... (TLS behind the PROXY protocol)
        is secure to autobahn as an ssl:... one is (isSecure: https for its
        origin check, wss in its URLs); plain ones, behind haproxy: or not,
        are not.
        """
        _ca, cert, key = make_ca(short_rundir(self, "ipcd-ca-"))
        tls = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        for listen, secure in (
            (tls, True),
            (f"haproxy:{tls}", True),
            ("haproxy:" + WS_LISTEN, False),
            (WS_LISTEN, False),
        ):
            host = yield start_ws_host(self, listen=listen)
            websocketd = host.service.getServiceNamed("websocketd")
            self.assertIs(websocketd.factory.isSecure, secure, listen)

    @inlineCallbacks
    def test_wssUnknownCaRefused(self) -> Any:
        """A server whose certificate the CA did not sign is refused."""
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        reply = yield self.lookupOverTls(trusted=False)
        self.assertEqual(len(reply.fds), 0)
        self.assertRegex(
            reply.data.decode(),
            r"^ne websocketd at wss://127\.0\.0\.1:\d+/pong: TLS handshake failed: "
            r"certificate verify failed \(is the server's certificate for this "
            r"host name, and signed by a CA in \[websocketd\] ca, or the system's "
            r"roots without it\?\)$",
        )
        # B says it in a line of its own, once it has seen A go.
        yield wait_until(
            lambda: any(
                "websocketd: TLS handshake with " in formatEvent(event)
                for event in logged
            ),
            "B's line about the handshake",
        )
        texts = [formatEvent(event) for event in logged]
        self.assertEqual([t for t in texts if "SSL error" in t], [])
        # And counts it (ipcd status, the metrics).
        failed = self.b.broker.counters["websocketd: TLS handshakes failed"]
        self.assertEqual(failed, 1)

    @inlineCallbacks
    def test_failedHandshakesLoggedAtABoundedRate(self) -> Any:
        """
        Peers that fail their TLS handshake cost a counter each, and log
        lines at the rate of [limits] refusals (LOG_BURST per LOG_PERIOD),
        with one more line saying how many were left out.
        """
        ca, cert, key = make_ca(short_rundir(self, "ipcd-ca-"))
        listen = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        b = yield start_ws_host(self, listen=listen)
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        # Enough that even a flood spread over a few periods leaves most out.
        peers = 10 * LOG_BURST

        def not_tls() -> None:
            for _ in range(peers):
                with socket.create_connection(("127.0.0.1", b.port), TIMEOUT) as s:
                    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                    while s.recv(4096):
                        pass

        yield deferToThread(not_tls)
        # The last summary comes at the end of its period.
        yield wait_rate_limited(
            b.broker.counters,
            "websocketd: TLS handshakes failed",
            logged,
            "TLS handshake with",
            peers,
            timeout=LOG_PERIOD + TIMEOUT,
        )
        lines = [formatEvent(e) for e in logged if "TLS handshake" in formatEvent(e)]
        self.assertLessEqual(len(lines), peers // 2, "\n".join(lines))
        self.assertTrue(
            any("similar log lines left out" in line for line in lines),
            "\n".join(lines),
        )

    @inlineCallbacks
    def test_realTlsFailuresBoundedAndCounted(self) -> Any:
        """
        Peers that fail a real TLS handshake (the openssl CLI, not trusting
        websocketd's certificate: it aborts with an alert) cost websocketd
        a counter each and lines at the bounded rate; every line left out
        is counted with the others ([limits]', tcpd's, tlsd's) in "log
        lines dropped by rate limits".
        """
        ca, cert, key = make_ca(short_rundir(self, "ipcd-ca-"))
        stranger = make_ca(short_rundir(self, "ipcd-other-ca-"))[0]
        listen = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        b = yield start_ws_host(self, listen=listen)
        counters = b.broker.counters
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        dropped = counters[LOG_LINES_DROPPED]
        peers = 10 * LOG_BURST
        command = ["openssl", "s_client", "-connect", f"127.0.0.1:{b.port}"]
        command += ["-servername", "localhost", "-verify_return_error"]
        command += ["-CAfile", stranger]

        def bad_clients() -> list[int]:
            return [
                subprocess.run(
                    command, stdin=subprocess.DEVNULL, capture_output=True, timeout=30
                ).returncode
                for _ in range(peers)
            ]

        codes = yield deferToThread(bad_clients)
        self.assertNotIn(0, codes)  # each one failed its handshake
        failed = "websocketd: TLS handshakes failed"
        yield wait_until(lambda: counters[failed] == peers, f"{peers} {failed}")
        lines = yield assert_lines_bounded(
            self, counters, logged, "ipcd.websocketd", peers, dropped
        )
        texts = [formatEvent(e) for e in lines]
        # The peer as every other line names it, not Twisted's repr.
        said = r"TLS handshake with 127\.0\.0\.1:\d+ failed: "
        self.assertTrue(all(re.search(said, t) for t in texts), texts)


class UnexpectedErrorTests(TestCase):
    """websocketd's requests that fail unexpectedly: a peer's to repeat."""

    @inlineCallbacks
    def test_loggedAtABoundedRate(self) -> Any:
        """
        Once ipcd has no fd left, each peer's request fails with an
        unexpected error (a 500): its line, with the traceback, goes at the
        peers' bounded rate, and those left out are counted.
        """
        b = yield start_ws_host(self)

        def ask(peers: int) -> list[int]:
            statuses = []
            for _ in range(peers):
                opening = ws_open(b.port, "/pong")
                opening.sock.close()
                statuses.append(opening.status)
            return statuses

        statuses = yield assert_unexpected_bounded(
            self,
            b.broker.counters,
            "ipcd.websocketd",
            ask,
            "websocketd: request from 127.0.0.1:",
        )
        self.assertEqual(set(statuses), {500})


class RouteLoopTests(TestCase):
    @inlineCallbacks
    def test_routedOutAgainRefused(self) -> Any:
        """
        A route that leads back into this very ipcd through its own
        websocketd, for a name routed out again: refused as a loop at the
        first hop; a name served here still goes the round.
        """
        port = free_port()
        host = yield start_ws_host(
            self,
            rules=["allow in loopy", "allow in pong"],
            listen=f"tcp:{port}:interface=127.0.0.1",
            routes={"loopy": f"ws://127.0.0.1:{port}/loopy"},
        )
        yield assert_route_loop(self, host, "ws", port)
