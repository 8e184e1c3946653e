"""
One WebSocket connection joined to one libipc connection, message for
message: websocketd's inbound side (a browser and a local service) and its
outbound side (a remote websocketd and the client's end of a socketpair)
are both this.

L{MessageSide} is the libipc end: a L{MessageProtocol} whose messages go out
as WebSocket messages.  L{WebSocketSide} is the mixin for the autobahn
protocol on the other end: its messages go to the libipc end framed.

Backpressure both ways with Twisted's producers: each end's transport is
the streaming producer of the other's, so a full write buffer on either
side pauses reading on the other.  autobahn writes each message it is given
straight to its transport, and hands over whole messages only (bounded by
its C{maxMessagePayloadSize}), so neither side holds more than one message
plus a transport's buffer.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from ipcd.wire import MessageProtocol, encode

# WebSocket close codes (RFC 6455, 7.4.1).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_TOO_BIG = 1009


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
        # Ours replace MessageProtocol's pauser: each end pauses the other.
        transport.unregisterProducer()
        websocket = self.bridge.transport
        transport.registerProducer(websocket, True)
        websocket.registerProducer(transport, True)

    def messageReceived(self, payload: bytes) -> None:  # noqa: N802
        self.bridge.relayMessage(payload)

    def messageTooLarge(self, size: int) -> None:  # noqa: N802
        self.bridge.closeBridge(CLOSE_TOO_BIG, "message too big")
        self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        super().connectionLost(reason)
        self.bridge.messageSideLost()


class WebSocketSide:
    """
    Mixin for an autobahn protocol (server or client) that is one end of a
    bridge: call L{joinSocket} once the WebSocket is open.  Its messages go
    to the libipc end framed; the libipc end's come back through
    L{relayMessage}.
    """

    messageSide: MessageSide | None = None
    replyBinary = True  # binary until the peer has sent a message
    _closing = False

    def joinSocket(
        self, reactor: Any, sock: socket.socket, max_message_size: int, idle: float
    ) -> None:
        """Take C{sock} (a connected AF_UNIX socket) as the libipc end."""
        side = MessageSide(self)
        side.maxMessageSize = max_message_size
        side.idleTimeout = idle
        side.clock = reactor
        factory = Factory.forProtocol(lambda: side)  # type: ignore[arg-type]
        try:
            reactor.adoptStreamConnection(sock.fileno(), socket.AF_UNIX, factory)
        finally:
            sock.close()  # the reactor holds its own duplicate
        self.messageSide = side

    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802, N803
        self.replyBinary = isBinary
        side = self.messageSide
        if side is not None and side.transport is not None:
            side.resetTimeout()
            side.transport.write(encode(payload))

    def relayMessage(self, payload: bytes) -> None:  # noqa: N802
        """A message from the libipc end: out as the peer's last type."""
        if self._closing:
            return
        binary = self.replyBinary or not as_text(payload)
        self.sendMessage(payload, isBinary=binary)  # type: ignore[attr-defined]

    def closeBridge(self, code: int, reason: str) -> None:  # noqa: N802
        """Close the WebSocket (a closing handshake, bounded by autobahn)."""
        if self._closing:
            return
        self._closing = True
        transport = getattr(self, "transport", None)
        if transport is not None and getattr(transport, "producer", None):
            transport.unregisterProducer()
        self.sendClose(code, reason)  # type: ignore[attr-defined]

    def messageSideLost(self) -> None:  # noqa: N802
        """The libipc end is gone: close the WebSocket after what it holds."""
        self.closeBridge(CLOSE_NORMAL, "")

    def webSocketLost(self, reason: Failure | None = None) -> None:  # noqa: N802
        """The WebSocket is gone: close the libipc end after its buffer."""
        self._closing = True
        side = self.messageSide
        if side is not None and side.transport is not None:
            transport = side.transport
            if getattr(transport, "producer", None) is not None:
                transport.unregisterProducer()
            transport.loseConnection()
