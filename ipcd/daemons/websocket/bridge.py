"""
The bridge: one WebSocket connection joined to one libipc connection.

Message for message: websocketd's inbound side (a browser and a local
service) and its outbound side (a remote websocketd and the client's end of
a socketpair) are both this.

L{MessageSide} is the libipc end: a L{MessageProtocol} whose messages go out
as WebSocket messages.  L{WebSocketSide} is the mixin for the autobahn
protocol on the other end: its messages go to the libipc end framed.

Backpressure both ways with Twisted's producers (L{FullBuffer}): a full
write buffer towards the service pauses reading the WebSocket peer;
a full one towards the peer pauses reading both ends, since the peer makes
websocketd write too (pongs, a close).  autobahn hands over whole messages
only (bounded by its C{maxMessagePayloadSize}, and here by their frames and
a deadline: L{BoundedPeer}'s), so neither side holds more than one read's
messages plus a transport's buffer.

The messages of one read go out together when the read is done, straight
to the socket when its transport holds nothing (L{Outbox}): a relayed
message costs no extra turn of the reactor.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.protocol import Factory

from ipcd.compat import autobahn as compat_autobahn
from ipcd.daemons.outbox import Outbox
from ipcd.daemons.websocket.frames import (
    SMALL,
    frame_ends,
    small_client_message,
    small_server_frame,
)
from ipcd.daemons.websocket.limits import (
    BACKLOG,
    CLOSE_INTERNAL,
    CLOSE_NORMAL,
    CLOSE_TOO_BIG,
    PEER_FULL,
    SERVICE_FULL,
    BoundedPeer,
    FullBuffer,
    HeadReader,
    ReadPauses,
)
from ipcd.errors import UNAVAILABLE
from ipcd.reactors import IAdoptingReactor
from ipcd.relay import RelayStats, began, ended
from ipcd.wire import HEADER, MessageProtocol

# At most this many frames of one connection are parsed in a turn of the
# reactor; the rest of the read waits for a later turn, its transport not
# read meanwhile.  A peer sending tiny frames (empty pings: 6 bytes) puts
# about 11,000 in a 64 KiB read, all parsed in one turn otherwise: a few
# such peers starved every other connection of seconds.  Frames sent in the
# opening handshake's read, before its answer, wait until the WebSocket is
# open and are held to the same budget.  Reads longer than the smallest
# frames of a budget reach autobahn frame by frame (see frames).  Against
# 64 and 256 (a real ipcd, 40 peers flooding empty pings): another client's
# lookup and round trip took about 0.3, 0.4 and 0.9 s at the median, and the
# WebSocket RTT and bulk benchmarks did not tell them apart; but with 64 a
# client pipelining tiny messages got about half as many through in the
# quietest runs (each turn's own cost paid twice as often).
FRAME_BUDGET = 128
SPLIT_ABOVE = 2 * FRAME_BUDGET  # 2 bytes: an empty unmasked frame


def as_text(payload: bytes) -> bool:
    """Whether C{payload} can go out as a text message (valid UTF-8)."""
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class MessageSide(MessageProtocol):
    """
    The libipc end of a bridge: framed messages in and out.  Each message
    read goes to the WebSocket end (C{bridge}), as text when the peer's most
    recent message was text and the payload is UTF-8, else binary.
    """

    def __init__(self, bridge: WebSocketSide) -> None:
        self.bridge = bridge

    def makeConnection(self, transport: Any) -> None:  # noqa: N802
        super().makeConnection(transport)
        # Ours replace MessageProtocol's pauser: each end pauses the other,
        # and a WebSocket peer is not read either while what is queued for
        # it (relayed messages, pongs, a close) fills its buffer.
        transport.unregisterProducer()
        # Twisted's 64 KiB buffers: what each end reads at once, and holds
        # before it pauses the other.  (Relayed messages go straight to the
        # socket, so a bulk message does not pause at each write; reads of
        # 256 KiB cost more than they save: large allocations each.)
        bridge = self.bridge
        websocket = bridge.transport
        peer = bridge.readPauses
        transport.registerProducer(FullBuffer(SERVICE_FULL, (peer,), websocket), True)
        service = ReadPauses(transport)
        websocket.registerProducer(
            FullBuffer(PEER_FULL, (peer, service), transport, bridge.peerDrained),
            True,
        )

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        bridge = self.bridge
        bridge._inSocketRead = True
        try:
            super().dataReceived(data)
        finally:
            bridge._inSocketRead = False
        bridge.sendRelayed()  # the messages of this read, in one send

    def messageReceived(self, payload: bytes) -> None:  # noqa: N802
        self.bridge.stats.backward += len(payload)
        self.bridge.relayMessage(payload)

    def messageTooLarge(self, size: int) -> None:  # noqa: N802
        self.bridge.closeBridge(CLOSE_TOO_BIG, "message too big")
        self.transport.loseConnection()

    def readConnectionLost(self) -> None:  # noqa: N802 (Twisted's name)
        # The service's EOF ends its end at once, as before MessageProtocol
        # took half-closes: what is queued for it is not waited for (the
        # bridge's producers would hold a close behind a full buffer).
        self.transport.abortConnection()

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        super().connectionLost(reason)
        self.bridge.messageSideLost()


class WebSocketSide(BoundedPeer):
    """
    Mixin for an autobahn protocol (server or client) that is one end of a
    bridge: call L{joinSocket} once the WebSocket is open.  Its messages go
    to the libipc end framed; the libipc end's come back through
    L{relayMessage}.
    """

    messageSide: MessageSide | None = None
    replyBinary = True  # binary until the peer has sent a message
    stats: RelayStats
    bridges: set[WebSocketSide] | None = None  # the live ones, to stop them
    _closing = False
    _lostSides = 0
    # What one read relays, each way: sent when the read is done.
    _toSocket: Outbox | None = None
    _toWebSocket: Outbox | None = None
    _relaying = False  # autobahn's writes now are a relayed message's frames
    # Within a read of either end: what it relays is sent at its end.
    _inSocketRead = False
    _smallMax = 0  # see _smallMessageLimit: set once the bridge is joined
    _cut: Any = None  # aborts a connection closed after what it holds is sent
    # Read but beyond a turn's FRAME_BUDGET, or sent with the opening
    # handshake: parsed by _parseBacklog's call (once the WebSocket is open).
    _backlog: bytes | None = None
    _backlogCall: Any = None

    def connectionMade(self) -> None:  # noqa: N802
        self.readPauses = ReadPauses(self.transport)  # type: ignore[attr-defined]
        self._head = HeadReader()
        self.bounds = self.factory.bounds  # type: ignore[attr-defined]
        compat_autobahn.made_quietly(super().connectionMade)  # type: ignore[misc]

    def joinSocket(  # noqa: N802
        self,
        reactor: IAdoptingReactor,
        sock: socket.socket,
        max_message_size: int,
        idle: float,
        stats: RelayStats,
        bridges: set[WebSocketSide] | None = None,
    ) -> str | None:
        """
        Take C{sock} (a connected AF_UNIX socket) as the libipc end.  The
        bridge is listed in C{stats.registry} (for status) and C{bridges}
        while it lives.  C{None} once joined; else why it could not (the
        reactor could not take C{sock}: no descriptor left), the WebSocket
        closed with 1011 and C{sock} too.
        """
        side = MessageSide(self)
        side.maxMessageSize = max_message_size
        side.idleTimeout = idle
        side.clock = reactor
        factory = Factory.forProtocol(lambda: side)  # type: ignore[arg-type]
        self._toWebSocket = Outbox(self.transport)  # type: ignore[attr-defined]
        try:
            reactor.adoptStreamConnection(sock.fileno(), socket.AF_UNIX, factory)
        except OSError as e:
            # Not left open (its reads paused until joined, for ever) nor
            # listed as a relay that never ends.
            why = f"cannot relay to the service: {e.strerror or e}"
            # The far side is a remote peer: told no errno text (why is
            # logged, or told the local client, by the caller).
            self.failBound(CLOSE_INTERNAL, UNAVAILABLE)
            return why
        finally:
            sock.close()  # the reactor holds its own duplicate
        self.stats, self.bridges = stats, bridges
        began(stats)
        if bridges is not None:
            bridges.add(self)
        self.messageSide = side
        self._toSocket = Outbox(side.transport)
        self._smallMax = self._smallMessageLimit()
        if self._backlog:
            self._parseLater()  # what came after the opening handshake's head
        else:
            self._backlog = None
            self.readPauses.resume(BACKLOG)
        return None

    # autobahn's per-message path, less what a bridge does not use: its
    # Twisted adapter's dataReceived and its sendData format a debug line
    # (click styles) for every read and write, logged or not, and its
    # onMessageEnd fires the "message" event (a Deferred per message) for
    # observers a bridge never has.  The protocol (framing and its checks,
    # UTF-8 validation, masks, limits, pings, closes) stays autobahn's, but
    # for small whole messages on a plain server connection (below).

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self._backlog is not None:
            # Still parsing an earlier read, or the WebSocket not open yet
            # (the transport may hand over what it already held after the
            # pause): after it, in order.
            self._backlog += data
            return
        head = self._head
        if head is not None:
            read = self._readHead(head, data)
            if read is None:
                return
            data, early = read
            # autobahn gets the head alone.  Frames sent with it, before its
            # answer, wait until the WebSocket is open, then are parsed on
            # the budget of any read's: autobahn would parse them all at once
            # (11,000 empty pings in a 64 KiB read).  Anything else handed
            # over before it opens waits too (TLS hands over a read's
            # records one after another, its transport paused or not).  Not
            # read meanwhile: a server awaiting the service's lookup would
            # otherwise hold it all, searching it again each read.
            self._backlog = early
            self.readPauses.pause(BACKLOG)
        self._parseRead(data)

    def _parseRead(self, data: bytes) -> None:
        # Every frame is parsed here (those sent with the opening handshake
        # too): the messages of a read go to the service when it is done.
        if len(data) <= SMALL + 6 and self._smallMessage(data):
            pass  # taken whole
        elif len(data) > SPLIT_ABOVE and self.state in (
            self.STATE_OPEN,  # type: ignore[attr-defined]
            self.STATE_CLOSING,  # type: ignore[attr-defined]
        ):
            self._frameByFrame(data)
        else:
            compat_autobahn.feed(self, data)
        outbox = self._toSocket
        if outbox is not None and outbox.pieces:
            outbox.send()
            self.messageSide.resetTimeout()  # type: ignore[union-attr]

    def _holdBack(self, rest: bytes) -> None:
        """Parse C{rest} on a later turn, not reading the peer until then."""
        self._backlog = rest
        self.readPauses.pause(BACKLOG)
        self._parseLater()

    def _parseLater(self) -> None:
        self._backlogCall = self.factory.reactor.callLater(0, self._parseBacklog)  # type: ignore[attr-defined]

    def _parseBacklog(self) -> None:
        self._backlogCall = None
        data, self._backlog = self._backlog, None
        if data is None or self.state == self.STATE_CLOSED:  # type: ignore[attr-defined]
            return  # failed meanwhile: nothing more is parsed
        self._parseRead(data)
        if self._backlog is None:
            self.readPauses.resume(BACKLOG)

    # Small messages, the round trips' case, skip autobahn's frame parser and
    # builder (about 20 us of Python a round trip; websocketd's 100-byte
    # round trip went from 1.30x websockify's to about 1.07x): a read that
    # is one whole small frame, while autobahn's parser stands between
    # messages and nothing negotiated changes frames, and replies of at most
    # 125 bytes.  Everything else, and anything unusual in these, is
    # autobahn's (frames.small_client_message takes only what autobahn's
    # parser takes alike; its tests hold it to that).

    def _smallMessageLimit(self) -> int:
        """
        The largest message this connection's small frames may carry: 0
        unless it is a server's whose frames nothing changes (no
        compression, no octet logging, autobahn's checks on), within every
        limit autobahn applies to messages and frames.
        """
        if not (
            self.factory.isServer  # type: ignore[attr-defined]
            and compat_autobahn.no_extensions(self)
            and not self.logOctets  # type: ignore[attr-defined]
            and self.applyMask  # type: ignore[attr-defined]
            and self.utf8validateIncoming  # type: ignore[attr-defined]
        ):
            return 0
        limits = (
            self.maxFramePayloadSize,  # type: ignore[attr-defined]
            self.maxMessagePayloadSize,  # type: ignore[attr-defined]
            self.autoFragmentSize,  # type: ignore[attr-defined]
        )
        return min([SMALL, *(limit for limit in limits if limit > 0)])

    def _smallMessage(self, data: bytes) -> bool:
        """Take C{data} as one small message, if it is one: whether it was."""
        if not (
            self._smallMax
            and self.state == self.STATE_OPEN  # type: ignore[attr-defined]
            and self.current_frame is None  # type: ignore[attr-defined]
            and not self.data  # type: ignore[has-type]
            and not self.inside_message  # type: ignore[attr-defined]
        ):
            return False
        message = small_client_message(data)
        if message is None or len(message[0]) > self._smallMax:
            return False  # autobahn's to check (and refuse)
        self.trafficStats.incomingOctetsWireLevel += len(data)  # type: ignore[attr-defined]
        self.onMessage(*message)
        return True

    def _sendSmall(self, payload: bytes, binary: bool) -> bool:
        """Send C{payload} in a small frame of our own, if it fits: whether it did."""
        size = len(payload)
        if size > self._smallMax:
            return False
        stats = self.trafficStats  # type: ignore[attr-defined]
        stats.outgoingWebSocketMessages += 1
        stats.outgoingOctetsAppLevel += size
        stats.outgoingOctetsWebSocketLevel += size
        self.sendData(small_server_frame(payload, binary))
        return True

    def _frameByFrame(self, data: bytes) -> None:
        # Where the stream is, from autobahn's parser: inside a frame's
        # payload (it holds none of it: it takes payload as it comes), or
        # holding the start of the next header.
        frame = self.current_frame  # type: ignore[attr-defined]
        if frame is None:
            ends = frame_ends(data, held=self.data)  # type: ignore[has-type]
        else:
            due = frame.length - self.current_frame_masker.pointer()  # type: ignore[attr-defined]
            ends = frame_ends(data, rest=due)
        start = 0
        budget = FRAME_BUDGET
        closed = self.STATE_CLOSED  # type: ignore[attr-defined]
        for end in ends:
            compat_autobahn.feed(self, data[start:end])
            if self.state == closed:  # type: ignore[attr-defined]
                return  # failed (a bound): nothing more is read
            start = end
            budget -= 1
            if not budget:
                self._holdBack(data[start:])
                return
        compat_autobahn.feed(self, data[start:] if start else data)

    def onMessageEnd(self) -> None:  # noqa: N802
        if not self.failedByMe:  # type: ignore[attr-defined]
            payload = b"".join(self.message_data)  # type: ignore[has-type]
            self.onMessage(payload, self.message_is_binary)  # type: ignore[attr-defined]
        self.message_data = None

    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802, N803
        self.replyBinary = isBinary
        outbox = self._toSocket
        if outbox is not None and self.messageSide is not None:
            self.stats.forward += len(payload)
            outbox.add(HEADER.pack(len(payload)), payload)  # one send: one write

    def relayMessage(self, payload: bytes) -> None:  # noqa: N802
        """A message from the libipc end: out as the peer's last type."""
        if self._closing or self.state != self.STATE_OPEN:  # type: ignore[attr-defined]
            return  # the WebSocket is closing: nobody to send it to
        binary = self.replyBinary or not as_text(payload)
        self._relaying = True
        try:
            if not self._sendSmall(payload, binary):
                self.sendMessage(payload, isBinary=binary)  # type: ignore[attr-defined]
        finally:
            self._relaying = False
        if not self._inSocketRead:
            self.sendRelayed()

    def sendRelayed(self) -> None:  # noqa: N802
        """Send the frames of the messages relayed since the last call."""
        outbox = self._toWebSocket
        if outbox is not None and outbox.pieces:
            self._queued(outbox.send())

    def sendData(  # noqa: N802
        self, data: bytes, sync: bool = False, chopsize: int | None = None
    ) -> None:
        outbox = self._toWebSocket
        simple = not (sync or chopsize or self.send_queue or self.logOctets)  # type: ignore[attr-defined]
        if outbox is not None and simple and self._relaying:
            outbox.add(data)  # a relayed message's frame, sent with its read's
        else:
            self.sendRelayed()  # what was relayed before goes first
            if not simple:
                super().sendData(data, sync, chopsize)  # type: ignore[misc]
                return
            self.transport.write(data)  # type: ignore[attr-defined]
            self._queued(1)
        # autobahn's counters, as its sendData keeps them.
        state = self.state  # type: ignore[attr-defined]
        if state == self.STATE_OPEN:  # type: ignore[attr-defined]
            self.trafficStats.outgoingOctetsWireLevel += len(data)  # type: ignore[attr-defined]
        elif state in (self.STATE_CONNECTING, self.STATE_PROXY_CONNECTING):  # type: ignore[attr-defined]
            self.trafficStats.preopenOutgoingOctetsWireLevel += len(data)  # type: ignore[attr-defined]

    def closeBridge(self, code: int, reason: str) -> None:  # noqa: N802
        """Close the WebSocket (a closing handshake, bounded by autobahn)."""
        if self._closing:
            return
        self._closing = True
        transport = getattr(self, "transport", None)
        if transport is not None and getattr(transport, "producer", None):
            transport.unregisterProducer()
            self.readPauses.resume(PEER_FULL)  # to read the peer's close
        self.sendCloseCode(code, reason)

    def messageSideLost(self) -> None:  # noqa: N802
        """The libipc end is gone: close the WebSocket after what it holds."""
        self.closeBridge(CLOSE_NORMAL, "")
        self._sideEnded()

    def _sideEnded(self) -> None:
        self._lostSides += 1
        if self._lostSides == 2:  # both gone: the bridge has ended
            ended(self.stats)
            if self.bridges is not None:
                self.bridges.discard(self)

    def dropConnection(self, abort: bool = False) -> None:  # noqa: N802
        closing = self.state != self.STATE_CLOSED  # type: ignore[attr-defined]
        super().dropConnection(abort)  # type: ignore[misc]
        if closing and not abort and self._cut is None:
            # Closed once what it holds is sent (after a bound broken, a
            # closing handshake, a refusal): a peer that reads nothing would
            # hold the connection for ever, autobahn's closing deadline being
            # over once it drops, and its pings maybe off.  Cut after a grace.
            self._cut = self.factory.reactor.callLater(  # type: ignore[attr-defined]
                self.closeGrace(),
                self.transport.abortConnection,  # type: ignore[attr-defined]
            )

    def closeGrace(self) -> float:  # noqa: N802
        """How long a connection closed once what it holds is sent may take."""
        return self.closeHandshakeTimeout  # type: ignore[attr-defined, no-any-return]

    def cancelTimers(self) -> None:  # noqa: N802
        """
        After the connection is lost: autobahn leaves its closing handshake
        deadline pending (harmless on txaio's timers, a stray call on ours),
        and the cut after a drop is not needed.
        """
        if self._cut is not None:
            if self._cut.active():
                self._cut.cancel()
            self._cut = None
        if self._backlogCall is not None:
            if self._backlogCall.active():
                self._backlogCall.cancel()
            self._backlogCall = None
        self._backlog = None
        call = getattr(self, "closeHandshakeTimeoutCall", None)
        if call is not None:
            call.cancel()
            self.closeHandshakeTimeoutCall = None
        if self._messageDeadline is not None:
            if self._messageDeadline.active():
                self._messageDeadline.cancel()
            self._messageDeadline = None

    def abortBridge(self) -> None:  # noqa: N802
        """Close both ends now (websocketd is stopping)."""
        for transport in (
            getattr(self, "transport", None),
            self.messageSide and self.messageSide.transport,
        ):
            if transport is not None:
                transport.abortConnection()

    def webSocketLost(self, clean: bool) -> None:  # noqa: N802
        """
        The WebSocket is gone.  After a clean close the libipc end gets what
        it is still owed, then EOF (its replies are read and dropped
        meanwhile); after an unclean one (a reset, a ping timeout) it is
        closed at once, as a relay passes a reset on.
        """
        self._closing = True
        side, self.messageSide = self.messageSide, None  # once
        if side is None:
            return  # never joined
        if self._toSocket is not None:
            self._toSocket.send()  # what the WebSocket delivered before it went
        if side.transport is not None:
            transport = side.transport
            if getattr(transport, "producer", None) is not None:
                transport.unregisterProducer()
            if clean:
                transport.resumeProducing()
                transport.loseConnection()
            else:
                transport.abortConnection()
        self._sideEnded()
