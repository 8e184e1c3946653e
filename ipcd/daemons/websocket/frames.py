"""
Where WebSocket frames end in a read, so that a large read can reach
autobahn's parser one frame at a time; and the one frame shape websocketd
reads and writes without autobahn (L{small_client_message},
L{small_server_frame}).

autobahn keeps unparsed bytes in one C{bytes} buffer and cuts each frame's
header and payload off its front, copying what follows each time: a read
holding many frames costs time quadratic in its size (256 KiB of 100-byte
frames: hundreds of megabytes copied).  Fed frame by frame, each frame is
copied a bounded number of times.

Only lengths are read here (RFC 6455, 5.2); autobahn checks everything
else.  A wrong cut could only make parsing slower, never different: a
stream parser must take any cut of the stream alike.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

_LENGTH_16 = struct.Struct("!H")
_LENGTH_64 = struct.Struct("!Q")
MAX_HEADER = 14  # 2, 8 bytes of extended length, 4 of mask


def frame_ends(data: bytes, held: bytes = b"", rest: int = 0) -> Iterator[int]:
    """
    The offsets in C{data} where a frame ends, whole frames only, before
    the end of C{data}, as they are found (a read of tiny frames has tens
    of thousands, and its reader may stop early).  C{data} continues a
    stream where C{rest} bytes of a frame's payload are still due, or
    (C{rest} 0) where C{held} is the start of the next frame's header,
    already read.
    """
    end = len(data)
    pos = rest
    while pos < end:
        if pos:
            yield pos
        header = data[pos : pos + MAX_HEADER]
        if held:
            header = held + header
        if len(header) < 2:
            break
        size = header[1] & 0x7F
        length = 2 + (4 if header[1] & 0x80 else 0)
        if size == 126:
            length += 2
            if len(header) < length:
                break
            (size,) = _LENGTH_16.unpack_from(header, 2)
        elif size == 127:
            length += 8
            if len(header) < length:
                break
            (size,) = _LENGTH_64.unpack_from(header, 2)
        pos += length + size - len(held)
        held = b""


# The longest payload a frame's 2-byte header can give.
SMALL = 125
_TEXT, _BINARY = 0x81, 0x82  # FIN set, no reserved bits, opcode 1 or 2


def small_client_message(data: bytes) -> tuple[bytes, bool] | None:
    """
    C{data} as one whole message, (payload, binary), when it is exactly one
    frame of the shape small messages from clients have: final, text or
    binary, no reserved bits, masked, at most L{SMALL} bytes of payload,
    and for text valid UTF-8.  Else None: then nothing was decided, and
    autobahn's parser takes C{data} and checks all of it.
    """
    size = len(data) - 6  # header: 2 bytes and the 4-byte mask
    if not 0 <= size <= SMALL or data[0] not in (_TEXT, _BINARY):
        return None
    if data[1] != 0x80 | size:
        return None  # also: unmasked, longer, or not alone in the read
    mask = (data[2:6] * (size // 4 + 1))[:size]
    payload = (int.from_bytes(data[6:], "big") ^ int.from_bytes(mask, "big")).to_bytes(
        size, "big"
    )
    binary = data[0] == _BINARY
    if not binary:
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            return None  # autobahn fails the connection for it
    return payload, binary


def small_server_frame(payload: bytes, binary: bool) -> bytes:
    """A server's frame (unmasked) for a message of at most L{SMALL} bytes."""
    if len(payload) > SMALL:
        raise ValueError(f"{len(payload)} bytes is not a small frame's payload")
    return bytes((_BINARY if binary else _TEXT, len(payload))) + payload
