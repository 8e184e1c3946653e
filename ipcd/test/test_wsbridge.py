"""
websocketd's own wire code (L{ipcd.daemons.websocket.bridge}) fed reads as the
kernel may cut them: a real in-process ipcd and websocketd with pongd
behind it, a real WebSocket client socket, and the server's protocol, once
it has joined its service, handed bytes in the reactor thread as its
transport hands them, so that where one read ends is the test's choice.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from ipcd.compat import autobahn as compat_autobahn
from ipcd.daemons.outbox import Outbox
from ipcd.daemons.websocket.bridge import FRAME_BUDGET, SPLIT_ABOVE
from ipcd.daemons.websocket.frames import SMALL
from ipcd.daemons.websocket.limits import BACKLOG
from ipcd.daemons.websocket.server import WebSocketInbound
from ipcd.test.support import TIMEOUT, calls_to, wait_until
from ipcd.test.wssupport import (
    BINARY,
    CLOSE,
    PING,
    PONG,
    TEXT,
    TurnCounts,
    close_code,
    read_opening,
    start_ws_host,
    upgrade_request,
    ws_frame,
    ws_message,
    ws_open,
    ws_recv,
)
from ipcd.wire import encode

# A 16-bit length whose two bytes read as a small binary frame's first two.
_LOOKS_SMALL = 0x8285


def _masked(first: int, header_length: bytes, payload: bytes, mask: bytes) -> bytes:
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes((first,)) + header_length + mask + body


def _peer_ports_read() -> list[int]:
    """The peers' ports of the connections the reactor reads now."""
    ports = []
    for reader in reactor.getReaders():
        try:
            ports.append(reader.getPeer().port)  # type: ignore[attr-defined]
        except (AttributeError, NotImplementedError):
            pass  # not a connection (the waker, a listening port)
    return ports


class BridgeReadTests(TestCase):
    """
    What a bridge does with each read of the WebSocket peer and of the
    service: whole messages relayed, each read's relayed in one send, the
    service connection's idle timer, autobahn's counters.
    """

    @inlineCallbacks
    def setUp(self) -> Any:
        self.host = yield start_ws_host(self)
        self.joined: list[Any] = []
        join = WebSocketInbound.joinSocket

        def caught(protocol: Any, *args: Any, **kwargs: Any) -> None:
            join(protocol, *args, **kwargs)
            self.joined.append(protocol)

        self.patch(WebSocketInbound, "joinSocket", caught)

    @inlineCallbacks
    def open(self) -> Any:
        """A client socket and the server's protocol for it, joined to pongd."""
        opening = yield deferToThread(ws_open, self.host.port, "/pong")
        self.addCleanup(opening.sock.close)
        # The server answers the opening handshake once it has joined.
        return opening.sock, self.joined[-1]

    def recv(self, sock: Any) -> Any:
        return deferToThread(ws_recv, sock)

    def sends(self, outbox: Outbox) -> list[int]:
        """Count C{outbox}'s sends from now on."""
        count: list[int] = []
        send = outbox.send

        def counted() -> Any:
            count.append(len(outbox.pieces))
            return send()

        self.patch(outbox, "send", counted)
        return count

    @inlineCallbacks
    def test_readsCutInsideAFrame(self) -> Any:
        """
        A read that happens to look like one small whole frame, while a
        frame's header or payload is still being read, is that frame's
        bytes, not a message of its own: the message comes back whole.
        """
        sock, protocol = yield self.open()
        mask = os.urandom(4)
        payload = os.urandom(_LOOKS_SMALL)
        frame = _masked(0x82, b"\xfe" + _LOOKS_SMALL.to_bytes(2, "big"), payload, mask)
        # Cut after two bytes: the next 11 start b"\x82\x85" and hold a
        # "mask" and 5 bytes of "payload".
        for read in (frame[:2], frame[2:13], frame[13:]):
            protocol.dataReceived(read)
        self.assertEqual((yield self.recv(sock)), (BINARY, payload))
        # Inside a payload: 1000 bytes read, then 11 on the wire that look
        # small (the payload is what they unmask to).
        wire = b"x" * 1000 + ws_frame(b"hello", BINARY) + b"y" * 13
        unmasked = bytes(b ^ mask[i % 4] for i, b in enumerate(wire))
        inside = b"\x82\xfe\x04\x00" + mask + wire
        for read in (inside[:1008], inside[1008:1019], inside[1019:]):
            protocol.dataReceived(read)
        self.assertEqual((yield self.recv(sock)), (BINARY, unmasked))

    @inlineCallbacks
    def test_readsCutInsideAPing(self) -> Any:
        """
        Inside a ping's payload (no message under way), a read that looks
        like one small whole frame is the ping's: the pong carries it all,
        and the service gets nothing, then the next message.
        """
        sock, protocol = yield self.open()
        mask = os.urandom(4)
        wire = b"x" * 10 + ws_frame(b"hello", BINARY) + b"y" * 9
        unmasked = bytes(b ^ mask[i % 4] for i, b in enumerate(wire))
        ping = bytes((0x89, 0x80 | len(wire))) + mask + wire
        for read in (ping[:16], ping[16:27], ping[27:]):
            protocol.dataReceived(read)
        self.assertEqual((yield self.recv(sock)), (PONG, unmasked))
        protocol.dataReceived(ws_frame(b"next", BINARY))
        self.assertEqual((yield self.recv(sock)), (BINARY, b"next"))

    @inlineCallbacks
    def test_notReadWhileAsking(self) -> Any:
        """
        While the service is being asked for, the peer is not read: what it
        sends after its request waits in the kernel, not in ipcd (autobahn
        would hold it all, searching it again at each read).
        """
        asked: list[Deferred[Any]] = []

        def held(text: str, who: Any) -> Deferred[Any]:
            asked.append(Deferred())
            return asked[-1]

        self.patch(self.host.broker, "open_inbound", held)
        sock = socket.create_connection(("127.0.0.1", self.host.port))
        self.addCleanup(sock.close)
        sock.sendall(
            b"GET /pong HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n" + ws_frame(b"early", BINARY)
        )
        yield wait_until(lambda: asked, "the service asked for")
        self.assertNotIn(sock.getsockname()[1], _peer_ports_read())
        sock.close()  # the peer gone: the pending question is let go
        yield wait_until(lambda: asked[0].called, "the question let go")

    @inlineCallbacks
    def test_oneSendPerRead(self) -> Any:
        """
        The messages of one read go out together, each way: one send to
        the service for three WebSocket messages, one to the peer for
        three service messages.
        """
        sock, protocol = yield self.open()
        to_service = self.sends(protocol._toSocket)
        protocol.dataReceived(b"".join(ws_frame(p, BINARY) for p in (b"a", b"b", b"c")))
        self.assertEqual(to_service, [6])  # three headers, three payloads
        for expected in (b"a", b"b", b"c"):
            self.assertEqual((yield self.recv(sock)), (BINARY, expected))
        to_peer = self.sends(protocol._toWebSocket)
        protocol.messageSide.dataReceived(encode(b"d") + encode(b"e") + encode(b"f"))
        self.assertEqual(to_peer, [3])
        for expected in (b"d", b"e", b"f"):
            self.assertEqual((yield self.recv(sock)), (BINARY, expected))

    @inlineCallbacks
    def test_messagesKeepTheServiceConnection(self) -> Any:
        """
        The service connection's idle timer (on a fake clock) restarts with
        each message relayed to it, small or not, and not with a read that
        relays none (a ping).
        """
        sock, protocol = yield self.open()
        side = protocol.messageSide
        clock = Clock()
        timed_out: list[float] = []
        self.patch(side, "timeoutConnection", lambda: timed_out.append(clock.seconds()))
        side.setTimeout(None)  # off the reactor's clock, onto the fake one
        side.clock, side.idleTimeout = clock, 10
        side.setTimeout(10)
        clock.advance(6)
        protocol.dataReceived(ws_frame(b"small", BINARY))
        clock.advance(6)  # 12: the message at 6 restarted it
        self.assertEqual(timed_out, [])
        yield self.recv(sock)  # the reply read at 12: due at 22
        big = b"b" * 200
        clock.advance(9)
        protocol.dataReceived(ws_frame(big, BINARY))  # at 21
        clock.advance(9)  # 30
        self.assertEqual(timed_out, [])
        self.assertEqual((yield self.recv(sock)), (BINARY, big))  # due at 40
        clock.advance(8)
        protocol.dataReceived(ws_frame(b"p", PING))  # at 38: no message
        self.assertEqual((yield self.recv(sock)), (PONG, b"p"))
        clock.advance(2)  # 40
        self.assertEqual(timed_out, [40])

    @inlineCallbacks
    def test_smallPathKeepsAutobahnsCounts(self) -> Any:
        """
        A message and its reply in websocketd's own small frames count in
        autobahn's traffic statistics as autobahn's own path counts them:
        octets on the wire in; messages, octets on the wire and in
        messages out.
        """
        sock, small = yield self.open()
        other, whole = yield self.open()
        whole._smallMax = 0  # autobahn's own path, both ways
        frame = ws_frame(b"hello", TEXT)
        for protocol, client in ((small, sock), (whole, other)):
            protocol.dataReceived(frame)
            self.assertEqual((yield self.recv(client)), (TEXT, b"hello"))
        for field in (
            "incomingOctetsWireLevel",
            "outgoingWebSocketMessages",
            "outgoingOctetsAppLevel",
            "outgoingOctetsWebSocketLevel",
            "outgoingOctetsWireLevel",
        ):
            self.assertEqual(
                getattr(small.trafficStats, field),
                getattr(whole.trafficStats, field),
                field,
            )
        self.assertEqual(small.trafficStats.outgoingWebSocketMessages, 1)
        # Once closing, autobahn counts no more octets in; nor do small frames.
        small.closeBridge(1000, "")
        before = small.trafficStats.incomingOctetsWireLevel
        small.dataReceived(frame)
        self.assertEqual(small.trafficStats.incomingOctetsWireLevel, before)

    @inlineCallbacks
    def test_smallMessageOverTheLimit(self) -> Any:
        """
        A small frame over this connection's message limit is autobahn's to
        refuse (1009), never relayed.
        """
        sock, protocol = yield self.open()
        self.patch(protocol, "maxMessagePayloadSize", 4)
        protocol._smallMax = protocol._smallMessageLimit()
        protocol.dataReceived(ws_frame(b"12345", BINARY))
        opcode, payload = yield deferToThread(ws_message, sock)
        self.assertEqual((opcode, close_code(payload)), (CLOSE, 1009))

    @inlineCallbacks
    def test_smallMessageLimit(self) -> Any:
        """
        Small frames only on a server's connection whose frames nothing
        changes, each condition alone turning them off; within every
        limit autobahn applies (0: none).
        """
        _sock, protocol = yield self.open()
        self.assertEqual(protocol._smallMessageLimit(), SMALL)
        for name, value in (
            ("websocket_extensions_in_use", ["permessage-deflate"]),
            ("logOctets", True),
            ("applyMask", False),
            ("utf8validateIncoming", False),
        ):
            before = getattr(protocol, name)
            self.patch(protocol, name, value)
            self.assertEqual(protocol._smallMessageLimit(), 0, name)
            self.patch(protocol, name, before)
            self.assertEqual(protocol._smallMessageLimit(), SMALL, name)
        self.patch(protocol.factory, "isServer", False)
        self.assertEqual(protocol._smallMessageLimit(), 0)
        self.patch(protocol.factory, "isServer", True)
        for name in (
            "maxFramePayloadSize",
            "maxMessagePayloadSize",
            "autoFragmentSize",
        ):
            for limit, expected in ((1, 1), (2, 2), (0, SMALL), (SMALL + 1, SMALL)):
                self.patch(protocol, name, limit)
                self.assertEqual(protocol._smallMessageLimit(), expected, (name, limit))

    @inlineCallbacks
    def test_messageLetGo(self) -> Any:
        """Once a message has gone to the service, the bridge holds none of it."""
        sock, protocol = yield self.open()
        protocol.dataReceived(
            ws_frame(b"frag", BINARY, fin=False) + ws_frame(b"ment", 0)
        )
        self.assertIsNone(protocol.message_data)
        self.assertEqual((yield self.recv(sock)), (BINARY, b"fragment"))

    @inlineCallbacks
    def test_largeReadsFrameByFrame(self) -> Any:
        """
        A read of more than SPLIT_ABOVE bytes reaches autobahn's parser a
        frame at a time (the rest of a frame begun in an earlier read
        first); one of SPLIT_ABOVE bytes, whole.
        """
        sock, protocol = yield self.open()
        reads = self.fedFrames()
        # Frames of 58 bytes' payload (6 of header): SPLIT_ABOVE bytes.
        count = SPLIT_ABOVE // 64
        frames = [ws_frame(bytes([i]) * 58, BINARY) for i in range(count)]
        protocol.dataReceived(b"".join(frames))
        self.assertEqual([len(read) for read in reads], [SPLIT_ABOVE])
        for i in range(count):
            self.assertEqual((yield self.recv(sock)), (BINARY, bytes([i]) * 58))
        del reads[:]
        begun = ws_frame(b"z" * 10000, BINARY)  # 8 bytes of header
        protocol.dataReceived(begun[:1008])
        protocol.dataReceived(begun[1008:] + b"".join(frames))
        self.assertEqual([len(read) for read in reads], [1008, 9000, *[64] * count])
        self.assertEqual((yield self.recv(sock)), (BINARY, b"z" * 10000))
        for i in range(count):
            self.assertEqual((yield self.recv(sock)), (BINARY, bytes([i]) * 58))

    def fedFrames(self) -> list[bytes]:
        """What autobahn's parser is fed from now on, a list of the reads."""
        return calls_to(self, compat_autobahn, "feed", lambda _target, data: data)

    def recvMany(self, sock: Any, count: int) -> Any:
        return deferToThread(lambda: [ws_recv(sock) for _ in range(count)])

    def recvUntilClose(self, sock: Any) -> Any:
        return deferToThread(recv_until_close, sock)

    @inlineCallbacks
    def test_frameBudgetPerTurn(self) -> Any:
        """
        A read of many tiny frames (a flooding peer's) is parsed
        FRAME_BUDGET frames a turn of the reactor: the rest waits, the peer
        not read meanwhile, so that other connections are served between;
        every frame is parsed in the end, in order, and the peer read again.
        """
        sock, protocol = yield self.open()
        fed = self.fedFrames()
        count = 8 * FRAME_BUDGET + 5
        messages = [ws_frame(b"%d" % i, BINARY) for i in range(count)]
        protocol.dataReceived(b"".join(messages))
        self.assertEqual(len(fed), FRAME_BUDGET)
        self.assertTrue(protocol.readPauses.reasons & BACKLOG)
        self.assertNotIn(sock.getsockname()[1], _peer_ports_read())
        got = yield self.recvMany(sock, count)
        self.assertEqual(got, [(BINARY, b"%d" % i) for i in range(count)])
        self.assertEqual(protocol.readPauses.reasons, 0)
        self.assertIn(sock.getsockname()[1], _peer_ports_read())

    @inlineCallbacks
    def test_readsWhileHeldBackKeepTheirOrder(self) -> Any:
        """What the transport hands over while a read waits comes after it."""
        sock, protocol = yield self.open()
        count = 2 * FRAME_BUDGET
        protocol.dataReceived(
            b"".join(ws_frame(b"%d" % i, BINARY) for i in range(count))
        )
        protocol.dataReceived(ws_frame(b"last", BINARY))
        got = yield self.recvMany(sock, count + 1)
        want = [(BINARY, b"%d" % i) for i in range(count)]
        self.assertEqual(got, [*want, (BINARY, b"last")])

    @inlineCallbacks
    def test_closeInTheHeldBackRest(self) -> Any:
        """A close frame among the frames parsed on a later turn closes."""
        sock, protocol = yield self.open()
        count = 3 * FRAME_BUDGET
        protocol.dataReceived(
            b"".join([ws_frame(b"", PING)] * count) + ws_frame(b"\x03\xe8", CLOSE)
        )
        got = yield self.recvUntilClose(sock)
        # Pongs (many coalesced: limits.MAX_QUEUED_PONGS), then the close.
        self.assertEqual({opcode for opcode, _ in got[:-1]}, {PONG})
        self.assertEqual(close_code(got[-1][1]), 1000)
        yield wait_until(lambda: protocol.state == protocol.STATE_CLOSED, "closed")

    @inlineCallbacks
    def test_lostWhileHeldBack(self) -> Any:
        """The connection lost with frames held back: no call left behind."""
        sock, protocol = yield self.open()
        lost = Deferred()
        connection_lost = protocol.connectionLost

        def caught(reason: Any = None) -> None:
            connection_lost(reason)
            lost.callback(None)

        protocol.connectionLost = caught
        protocol.dataReceived(b"".join([ws_frame(b"", PING)] * (3 * FRAME_BUDGET)))
        self.assertIsNotNone(protocol._backlogCall)
        protocol.transport.abortConnection()
        yield lost
        self.assertIsNone(protocol._backlogCall)
        self.assertIsNone(protocol._backlog)
        pending = [call.func for call in reactor.getDelayedCalls()]
        self.assertNotIn(protocol._parseBacklog, pending)


class HandshakeReadTests(TestCase):
    """
    Frames a peer sends in the opening handshake's read, not awaiting its
    answer: held until the WebSocket is open, then parsed as any read's,
    FRAME_BUDGET frames a turn of the reactor.  The server's protocol is
    handed that read in the reactor thread, as its transport hands it, so
    that it is one read whatever the kernel would have made of it.
    """

    @inlineCallbacks
    def setUp(self) -> Any:
        self.host = yield start_ws_host(self)
        self.made = calls_to(self, WebSocketInbound, "connectionMade", lambda p: p)
        self.joined = calls_to(
            self, WebSocketInbound, "joinSocket", lambda p, *a, **k: p
        )

    @inlineCallbacks
    def connect(self) -> Any:
        """A client socket that has sent nothing, and the server's protocol."""
        sock = socket.create_connection(("127.0.0.1", self.host.port), timeout=TIMEOUT)
        self.addCleanup(sock.close)
        yield wait_until(lambda: self.made, "the connection made")
        return sock, self.made[-1]

    def request(self) -> bytes:
        return upgrade_request("/pong", f"127.0.0.1:{self.host.port}")

    @inlineCallbacks
    def parsedOnTheBudget(self, cut: int | None) -> Any:
        """
        The opening handshake and many tiny frames handed over in one read
        (C{cut} None) or in two, cut C{cut} bytes after the head, while the
        service is asked for: the frames are parsed once the WebSocket is
        open, at most FRAME_BUDGET a turn, the peer not read meanwhile;
        every message reaches the service and comes back, in order, and
        the peer is read again.
        """
        asked: list[tuple[Deferred[Any], str, Any]] = []
        ask = self.host.broker.open_inbound

        def held(text: str, who: Any) -> Deferred[Any]:
            asked.append((Deferred(), text, who))
            return asked[-1][0]

        self.patch(self.host.broker, "open_inbound", held)
        sock, protocol = yield self.connect()
        turns = TurnCounts(self, protocol)
        count = 8 * FRAME_BUDGET + 5
        frames = b"".join(ws_frame(b"%d" % i, BINARY) for i in range(count))
        request = self.request()
        if cut is None:
            protocol.dataReceived(request + frames)
        else:
            protocol.dataReceived(request + frames[:cut])
            protocol.dataReceived(frames[cut:])
        self.assertTrue(protocol.readPauses.reasons & BACKLOG)
        [(answer, text, who)] = asked
        ask(text, who).chainDeferred(answer)  # the service, asked now
        opening = yield deferToThread(read_opening, sock)
        self.assertEqual(opening.status, 101)
        got = yield deferToThread(lambda: [ws_recv(sock) for _ in range(count)])
        self.assertEqual(got, [(BINARY, b"%d" % i) for i in range(count)])
        self.assertEqual(self.joined, [protocol])
        # Parsed over many turns, none parsing more than the budget (all in
        # the turn the WebSocket opened in, without it).
        parsed = turns.parsed()
        self.assertLessEqual(max(parsed), FRAME_BUDGET, parsed)
        self.assertGreater(len(parsed), count // FRAME_BUDGET, parsed)
        self.assertEqual(protocol.readPauses.reasons, 0)
        self.assertIn(sock.getsockname()[1], _peer_ports_read())

    def test_framesWithTheHandshakeOnTheBudget(self) -> Any:
        """Frames in the opening handshake's read are held to the budget."""
        return self.parsedOnTheBudget(None)

    def test_framesAfterTheHeadOnTheBudget(self) -> Any:
        """
        So are frames handed over after a read that ends with the head,
        before the WebSocket opens, as TLS hands over a read's records,
        one after another, its transport paused or not.
        """
        return self.parsedOnTheBudget(0)

    def test_framesCutAfterTheHeadOnTheBudget(self) -> Any:
        """And the rest of the head's read cut inside a frame."""
        return self.parsedOnTheBudget(3)

    @inlineCallbacks
    def test_closeWithTheHandshake(self) -> Any:
        """
        A close frame after many pings in the opening handshake's read is
        honoured once they are parsed: pongs, then the closing handshake.
        """
        sock, protocol = yield self.connect()
        pings = b"".join([ws_frame(b"", PING)] * (3 * FRAME_BUDGET))
        protocol.dataReceived(self.request() + pings + ws_frame(b"\x03\xe8", CLOSE))
        opening = yield deferToThread(read_opening, sock)
        self.assertEqual(opening.status, 101)
        got = yield deferToThread(recv_until_close, sock)
        self.assertEqual({opcode for opcode, _ in got[:-1]}, {PONG})
        self.assertEqual(close_code(got[-1][1]), 1000)
        yield wait_until(lambda: protocol.state == protocol.STATE_CLOSED, "closed")

    @inlineCallbacks
    def test_lostWithFramesOfTheHandshake(self) -> Any:
        """
        The connection lost while its handshake awaits the service, frames
        held from its read: the question let go, nothing held, no call
        left behind, nothing ever joined.
        """
        asked: list[Deferred[Any]] = []

        def held(text: str, who: Any) -> Deferred[Any]:
            asked.append(Deferred())
            return asked[-1]

        self.patch(self.host.broker, "open_inbound", held)
        sock, protocol = yield self.connect()
        lost = calls_to(self, protocol, "connectionLost", lambda reason=None: None)
        pings = b"".join([ws_frame(b"", PING)] * (3 * FRAME_BUDGET))
        protocol.dataReceived(self.request() + pings)
        self.assertTrue(asked)
        self.assertIsNotNone(protocol._backlog)
        protocol.transport.abortConnection()
        yield wait_until(lambda: lost, "the connection lost")
        self.assertTrue(asked[0].called)
        self.assertIsNone(protocol._backlog)
        self.assertIsNone(protocol._backlogCall)
        pending = [call.func for call in reactor.getDelayedCalls()]
        self.assertNotIn(protocol._parseBacklog, pending)
        self.assertEqual(self.joined, [])

    @inlineCallbacks
    def test_refusedWithFramesOfTheHandshake(self) -> Any:
        """
        A refused handshake's frames are never parsed: the refusal is
        answered, the connection closed, nothing held once it is lost.
        """
        sock, protocol = yield self.connect()
        lost = calls_to(self, protocol, "connectionLost", lambda reason=None: None)
        fed = calls_to(self, compat_autobahn, "feed", lambda _target, data: data)
        request = upgrade_request("/secret", f"127.0.0.1:{self.host.port}")
        protocol.dataReceived(request + ws_frame(b"x", BINARY) * (3 * FRAME_BUDGET))
        opening = yield deferToThread(read_opening, sock)
        self.assertEqual(opening.status, 403)
        yield wait_until(lambda: lost, "the connection lost")
        self.assertEqual(fed, [request])
        self.assertIsNone(protocol._backlog)
        self.assertEqual(self.joined, [])

    @inlineCallbacks
    def test_serviceConnectionNotTaken(self) -> Any:
        """
        The service's connection that the reactor cannot take when the
        WebSocket opens (no descriptor left: EMFILE) closes the WebSocket
        with 1011, and nothing is left of it: no relay in status, no bridge,
        the connection lost.  It stayed open, the peer never read again,
        and listed as a live relay for ever.
        """
        adopt = reactor.adoptStreamConnection
        failed: list[int] = []

        def no_descriptor(fd: int, family: int, factory: Any) -> Any:
            if family != socket.AF_UNIX or failed:
                return adopt(fd, family, factory)
            failed.append(fd)
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

        self.patch(reactor, "adoptStreamConnection", no_descriptor)
        sock, protocol = yield self.connect()
        lost = calls_to(self, protocol, "connectionLost", lambda reason=None: None)
        protocol.dataReceived(self.request() + ws_frame(b"early", BINARY))
        opening = yield deferToThread(read_opening, sock)
        self.assertEqual(opening.status, 101)
        self.assertTrue(failed)
        got = yield deferToThread(recv_until_close, sock)
        self.assertEqual(close_code(got[-1][1]), 1011, got)
        yield wait_until(lambda: lost, "the connection lost")
        websocketd = self.host.service.getServiceNamed("websocketd")
        self.assertEqual(websocketd.factory.bridges, set())
        relays = [r for r in self.host.broker.relays if r.daemon == "websocketd"]
        self.assertEqual(relays, [])
        self.assertIsNone(protocol._backlog)
        # The next request is served.
        answer = yield deferToThread(bounce_once, self.host.port)
        self.assertEqual(answer, (BINARY, b"again"))


def bounce_once(port: int) -> tuple[int, bytes]:
    """A WebSocket to pong on C{port}: one message, its echo."""
    with ws_open(port, "/pong").sock as sock:
        sock.sendall(ws_frame(b"again", BINARY))
        return ws_recv(sock)


def recv_until_close(sock: socket.socket) -> list[tuple[int, bytes]]:
    """The server's frames up to its close frame, that included."""
    got = [ws_recv(sock)]
    while got[-1][0] != CLOSE:
        got.append(ws_recv(sock))
    return got
