"""
What a WebSocket peer may make websocketd hold, beyond the limits autobahn
has options for (the size of a message and of a frame, the handshakes'
deadlines): the opening handshake's head (L{HeadReader}), and reading the
peer only while what is queued for it is small (L{ReadPauses}).

The frames of one message and its deadline are counted by the bridge
itself (L{ipcd.daemons.websocket.bridge}); their defaults are here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from ipcd.daemons.outbox import queued_nothing

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
    read, the head and what followed it in its last read.
    """

    def __init__(self, limit: int = MAX_HEAD) -> None:
        self.limit = limit
        self.held = bytearray()

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
        if end + len(_HEAD_END) > self.limit:
            raise HeadTooLarge(f"a head of {end + len(_HEAD_END)} bytes")
        return True


# Why a WebSocket connection is not read (L{ReadPauses} reasons).
SERVICE_FULL = 1  # the service end holds a buffer's worth for the service
PEER_FULL = 2  # this end holds a buffer's worth for the peer (pongs included)
HANDSHAKE = 4  # the opening handshake awaits the service's lookup


class ReadPauses:
    """
    The reasons a transport is not read: it is read again once none is
    left.  Each reason is a bit; pausing and resuming are idempotent, as
    Twisted's producers may be told either more than once.
    """

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.reasons = 0

    def pause(self, reason: int) -> None:
        if not self.reasons & reason:
            self.reasons |= reason
            self.transport.pauseProducing()

    def resume(self, reason: int) -> None:
        if self.reasons & reason:
            self.reasons &= ~reason
            if not self.reasons:
                self.transport.resumeProducing()


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
