"""
libipc framing: a message is its payload length as u32 big-endian, then the
payload.

Upstream receivers do one read() per message, so a message's header and
payload always go out in a single write.  Our own receivers treat the stream
as a stream: partial and coalesced messages are both handled.
"""

from __future__ import annotations

import socket
import struct

from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver

DEFAULT_MAX_MESSAGE_SIZE = 1024 * 1024
HEADER = struct.Struct("!I")


class MessageTooLarge(ValueError):
    """A peer announced a message larger than the configured maximum."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"message of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


def encode(payload: bytes) -> bytes:
    """One framed message: header and payload together, ready for one write."""
    return HEADER.pack(len(payload)) + payload


class MessageProtocol(Int32StringReceiver):
    """
    Base class for libipc peers: override L{messageReceived}, call
    L{sendMessage}.

    A message larger than C{maxMessageSize} closes this connection only, after
    a log line naming the peer and the size; L{messageTooLarge} may be
    overridden to answer something first.
    """

    log = Logger()
    maxMessageSize: int = DEFAULT_MAX_MESSAGE_SIZE
    _tooLarge = False

    @property
    def MAX_LENGTH(self) -> int:  # noqa: N802 (Int32StringReceiver's name)
        return self.maxMessageSize

    def stringReceived(self, string: bytes) -> None:
        if not self._tooLarge:
            self.messageReceived(string)

    def lengthLimitExceeded(self, length: int) -> None:
        if self._tooLarge:
            return
        self._tooLarge = True
        self.log.warn(
            "closing {peer}: {reason}",
            peer=self.transport.getPeer(),
            reason=str(MessageTooLarge(length, self.maxMessageSize)),
        )
        self.messageTooLarge(length)
        self.transport.loseConnection()

    def messageTooLarge(self, size: int) -> None:
        """Hook called before the connection closes on an oversized message."""

    def messageReceived(self, payload: bytes) -> None:
        raise NotImplementedError

    def sendMessage(self, payload: bytes) -> None:
        self.transport.write(encode(payload))


class MessageFactory(Factory):
    """
    A factory of L{MessageProtocol}s that share one maximum message size
    (e.g. the configuration's C{max_message_size}).
    """

    noisy = False

    def __init__(
        self,
        protocol: type[MessageProtocol],
        maxMessageSize: int = DEFAULT_MAX_MESSAGE_SIZE,  # noqa: N803
    ) -> None:
        self.protocol = protocol
        self.maxMessageSize = maxMessageSize

    def buildProtocol(self, addr: object) -> MessageProtocol:  # noqa: N802
        protocol = super().buildProtocol(addr)
        protocol.maxMessageSize = self.maxMessageSize
        return protocol


# Blocking helpers for plain sockets.


def send_message(sock: socket.socket, payload: bytes) -> None:
    """Send one framed message on a blocking socket, in one write."""
    sock.sendall(encode(payload))


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    """Read exactly C{count} bytes or raise C{EOFError}."""
    chunks = []
    remaining = count
    while remaining:
        chunk = sock.recv(min(remaining, 1 << 20))
        if not chunk:
            raise EOFError(
                f"connection closed after {count - remaining} of {count} bytes"
            )
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def recv_message(
    sock: socket.socket, max_size: int = DEFAULT_MAX_MESSAGE_SIZE
) -> bytes:
    """Read one framed message from a blocking socket."""
    (size,) = HEADER.unpack(recv_exactly(sock, HEADER.size))
    if size > max_size:
        raise MessageTooLarge(size, max_size)
    return recv_exactly(sock, size)
