"""
What a WebSocket peer may make websocketd hold, and the mixin bounding it.

Beyond the limits autobahn has options for (the size of a message and of a
frame, the handshakes' deadlines): the opening handshake's head
(L{HeadReader}), and reading the peer only while what is queued for it is
small (L{ReadPauses}).

L{BoundedPeer}, the mixin under the bridge's protocols
(L{ipcd.daemons.websocket.bridge}), reads the head through L{HeadReader},
counts one message's frames and time against L{MessageBounds}, and the
writes and pongs queued for the peer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from ipcd.daemons.outbox import Outbox, queued_nothing
from ipcd.readpauses import ReadPauses

# WebSocket close codes (RFC 6455, 7.4.1).
CLOSE_NORMAL = 1000
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011

# An opening handshake's head (request line or status line, and headers)
# may be this long, its blank line included: nginx's and Node's default
# for a whole request head.  A longer request is refused with HTTP 431.
MAX_HEAD = 16 * 1024
_HEAD_END = b"\r\n\r\n"

# Defaults of [websocketd] max_message_frames and message_timeout.
DEFAULT_MAX_MESSAGE_FRAMES = 1024
DEFAULT_MESSAGE_TIMEOUT = 60.0


@dataclass(frozen=True)
class MessageBounds:
    """The frames one message may have, and the seconds it may take."""

    frames: int = DEFAULT_MAX_MESSAGE_FRAMES
    timeout: float = DEFAULT_MESSAGE_TIMEOUT


class HeadTooLarge(Exception):
    """The head went past its limit without ending."""


class HeadReader:
    """
    An HTTP head gathered until its blank line, in time linear in what
    arrives: each read is searched for the blank line only where it could
    end (the read, and the 3 bytes before it).  C{held} keeps everything
    read, the head and what followed it in its last read; once the head is
    whole, C{end} is its length there (its blank line included).
    """

    def __init__(self, limit: int = MAX_HEAD) -> None:
        self.limit = limit
        self.held = bytearray()
        self.end = 0

    def feed(self, data: bytes) -> bool:
        """
        Take C{data}: whether the head is now whole.  Raises
        L{HeadTooLarge} once it is longer than C{limit}, so that at most
        C{limit} bytes and one read are ever held.
        """
        held = self.held
        start = max(0, len(held) - (len(_HEAD_END) - 1))
        held += data
        end = held.find(_HEAD_END, start)
        if end < 0:
            if len(held) > self.limit:
                raise HeadTooLarge(f"no end of head within {self.limit} bytes")
            return False
        self.end = end + len(_HEAD_END)
        if self.end > self.limit:
            raise HeadTooLarge(f"a head of {self.end} bytes")
        return True


# Why a WebSocket connection is not read (L{ReadPauses} reasons).
SERVICE_FULL = 1  # the service end holds a buffer's worth for the service
PEER_FULL = 2  # this end holds a buffer's worth for the peer (pongs included)
# Frames read but not parsed yet (those sent with the opening handshake
# until it opens): parsed on later turns first.
BACKLOG = 4


@implementer(IPushProducer)
class FullBuffer:
    """
    The producer registered with one end's transport: when its write buffer
    is full (Twisted's C{bufferSize}, 64 KiB), each of C{gates} stops
    reading its transport for C{reason}, until the buffer has drained (then
    C{drained} is called).  Its connection lost, C{stop}'s producing is
    stopped (the other end closes).
    """

    def __init__(
        self,
        reason: int,
        gates: tuple[ReadPauses, ...],
        stop: Any,
        drained: Callable[[], None] | None = None,
    ) -> None:
        self.reason = reason
        self.gates = gates
        self.stop = stop
        self.drained = drained

    def pauseProducing(self) -> None:  # noqa: N802 (IPushProducer's names)
        for gate in self.gates:
            gate.pause(self.reason)

    def resumeProducing(self) -> None:  # noqa: N802
        for gate in self.gates:
            gate.resume(self.reason)
        if self.drained is not None:
            self.drained()

    def stopProducing(self) -> None:  # noqa: N802
        self.stop.stopProducing()


# Twisted pauses a producer by the bytes its transport holds, but a write
# of a few bytes (an empty pong, a 1-byte message's frame) costs some 50
# bytes of Python objects: 64 KiB of them would be a megabyte.  So the
# writes queued since the transport last held nothing are counted too.
MAX_QUEUED_WRITES = 512
# Pongs queued at once: past this, only the latest ping is answered, once
# the earlier pongs are sent (RFC 6455, 5.5.3 allows it).
MAX_QUEUED_PONGS = 16


def pause_until_drained(transport: FileDescriptor) -> None:
    """
    Pause C{transport}'s streaming producer until its buffer has drained,
    as Twisted does itself when the buffer passes C{bufferSize}, if it holds
    anything (else there is nothing to wait for).
    """
    producer = transport.producer
    if producer is None or transport.producerPaused or queued_nothing(transport):
        return
    transport.producerPaused = True
    producer.pauseProducing()


class BoundedPeer:
    """
    Mixin for a bridge's autobahn protocol: the bounds websocketd adds to
    autobahn's on one connection.  The opening handshake's head is read
    bounded (L{HeadReader}) and handed to autobahn once whole; one message's
    frames and time are bounded (L{MessageBounds}); a bound broken closes the
    connection with its code, without reading more.  What is queued for the
    peer is bounded by writes and pongs (L{MAX_QUEUED_WRITES},
    L{MAX_QUEUED_PONGS}): past them neither end is read until it drains.
    """

    # Why the peer is not read now (ReadPauses), from connectionMade.
    readPauses: ReadPauses
    # Writes queued for the peer since its transport last held nothing, the
    # pongs among them, and the latest ping left unanswered meanwhile.
    _writesQueued = 0
    _pongsQueued = 0
    _pongDue: bytes | None = None
    _toWebSocket: Outbox | None  # the bridge's, towards the peer
    # The opening handshake's head, until it is whole (then None).
    _head: HeadReader | None = None
    # The message being read: its frames, when it began, its deadline.
    _frames = 0
    _messageBegan = 0.0
    _messageDeadline: Any = None
    bounds: MessageBounds

    # The opening handshake's head is gathered here, bounded, and handed to
    # autobahn once whole: autobahn adds each read to what it holds and
    # searches all of it again for the blank line, with no limit but the
    # handshake's deadline (megabytes, in time quadratic in them).

    def _readHead(self, head: HeadReader, data: bytes) -> tuple[bytes, bytes] | None:
        """
        Once the head is whole, what to hand autobahn (the head) and what
        followed it in its read; None before.
        """
        if self.state == self.STATE_CLOSED:  # type: ignore[attr-defined]
            return None  # refused already
        try:
            if not head.feed(data):
                return None
        except HeadTooLarge as e:
            self.headTooLarge(str(e))
            return None
        self._head = None
        held = head.held
        return bytes(held[: head.end]), bytes(held[head.end :])

    def headTooLarge(self, reason: str) -> None:  # noqa: N802
        """The peer's opening handshake head is too long: refuse it."""
        raise NotImplementedError

    # One message's frames and time are bounded here; its size is autobahn's
    # (maxMessagePayloadSize, maxFramePayloadSize).  Empty frames count: a
    # peer could otherwise send fragments for ever, each a few bytes of
    # Python objects and microseconds of parsing.

    def onMessageBegin(self, isBinary: bool) -> None:  # noqa: N802, N803
        super().onMessageBegin(isBinary)  # type: ignore[misc]
        self._frames = 0
        self._messageBegan = self.factory.reactor.seconds()  # type: ignore[attr-defined]

    def onMessageFrameBegin(self, length: int) -> None:  # noqa: N802
        super().onMessageFrameBegin(length)  # type: ignore[misc]
        self._frames += 1
        if self._frames > self.bounds.frames and not self.failedByMe:  # type: ignore[attr-defined]
            self.failBound(
                CLOSE_TOO_BIG, f"message of more than {self.bounds.frames} frames"
            )
        elif self._messageDeadline is None:
            self._armMessageDeadline(self.bounds.timeout)

    def _armMessageDeadline(self, delay: float) -> None:
        reactor = self.factory.reactor  # type: ignore[attr-defined]
        self._messageDeadline = reactor.callLater(delay, self._messageTimedOut)

    def _messageTimedOut(self) -> None:
        # Armed by a message's first frame and left armed while messages
        # come whole: at most one timer a deadline, not one a message.
        self._messageDeadline = None
        if self.state != self.STATE_OPEN or not self.inside_message:  # type: ignore[attr-defined]
            return
        timeout = self.bounds.timeout
        now = self.factory.reactor.seconds()  # type: ignore[attr-defined]
        left = self._messageBegan + timeout - now
        if left > 0:
            self._armMessageDeadline(left)
        else:
            self.failBound(CLOSE_POLICY, f"message not whole within {timeout:g} s")

    def failBound(self, code: int, reason: str) -> None:  # noqa: N802
        """
        Fail the connection for one of websocketd's bounds: a close frame
        with C{code}, then the connection is closed without reading more
        (RFC 6455, 7.1.7), and what the message held is let go.
        """
        self.failedByMe = True  # autobahn keeps no more of the message
        self.message_data = None
        self.sendCloseCode(code, reason)
        self.dropConnection(abort=False)  # type: ignore[attr-defined]

    def sendCloseCode(self, code: int, reason: str) -> None:  # noqa: N802
        """
        Send a close frame with any code of RFC 6455's, such as 1009
        (autobahn's sendClose takes only 1000 and 3000-4999, the codes an
        application chooses).
        """
        reason_utf8 = reason.encode()[:123]  # a control frame's payload
        self.sendCloseFrame(code=code, reasonUtf8=reason_utf8, isReply=False)  # type: ignore[attr-defined]

    # What is queued for the peer is bounded by bytes (Twisted's buffer and
    # the producer above), by writes (MAX_QUEUED_WRITES), and for
    # pongs by the pings answered while earlier pongs wait.

    def _queued(self, writes: int) -> None:
        """C{writes} more were queued for the peer (0: it held nothing)."""
        if not writes:
            self._writesQueued = 0
            return
        self._writesQueued += writes
        if self._writesQueued > MAX_QUEUED_WRITES:
            self._writesQueued = 0
            self._pauseUntilDrained()

    def _pauseUntilDrained(self) -> None:
        """Read neither end until the peer's transport has sent what it holds."""
        outbox = self._toWebSocket
        if outbox is not None and outbox.socket_transport is not None:
            pause_until_drained(outbox.socket_transport)

    def peerDrained(self) -> None:  # noqa: N802
        """The peer's transport has sent all it held."""
        self._writesQueued = self._pongsQueued = 0
        if self._pongDue is not None:
            self.onPing(self._pongDue)

    def _peerHoldsNothing(self) -> bool:
        outbox = self._toWebSocket
        transport = outbox and outbox.socket_transport
        return transport is None or queued_nothing(transport)

    def onPing(self, payload: bytes) -> None:  # noqa: N802
        if self.state != self.STATE_OPEN:  # type: ignore[attr-defined]
            return
        if self._pongsQueued >= MAX_QUEUED_PONGS:
            if not self._peerHoldsNothing():
                self._pongDue = payload  # answered when the others are sent
                self._pauseUntilDrained()
                return
            self._pongsQueued = 0
        self._pongDue = None
        self._pongsQueued += 1
        self.sendPong(payload)  # type: ignore[attr-defined]
