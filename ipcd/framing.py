"""
The libipc message format on plain blocking sockets, with no Twisted (unlike
L{ipcd.wire}, the same messages as a Twisted protocol with per-connection
bounds; and L{ipcd.handoff}, which passes descriptors, not messages).

A message is its payload length as u32 big-endian, then the payload, header
and payload sent in one write (upstream receivers do one read() per
message).  The blocking client (L{ipcd.client}) uses it; L{ipcd.wire}
re-exports all of it.
"""

from __future__ import annotations

import socket
import struct

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
    try:
        return HEADER.pack(len(payload)) + payload
    except (TypeError, struct.error):
        raise _not_a_message(payload) from None


def _not_a_message(payload: object) -> Exception:
    """Why C{payload} cannot be framed, said as the caller's mistake."""
    if not isinstance(payload, bytes | bytearray | memoryview):
        return TypeError(
            f"a message is bytes, not {type(payload).__name__} "
            "(text is sent encoded: 'text'.encode())"
        )
    return ValueError(f"a message is at most {2**32 - 1} bytes")


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
