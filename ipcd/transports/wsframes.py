"""
Where WebSocket frames end in a read, so that a large read can reach
autobahn's parser one frame at a time.

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

_LENGTH_16 = struct.Struct("!H")
_LENGTH_64 = struct.Struct("!Q")
MAX_HEADER = 14  # 2, 8 bytes of extended length, 4 of mask


def frame_ends(data: bytes, held: bytes = b"", rest: int = 0) -> list[int]:
    """
    The offsets in C{data} where a frame ends, whole frames only, before
    the end of C{data}.  C{data} continues a stream where C{rest} bytes of
    a frame's payload are still due, or (C{rest} 0) where C{held} is the
    start of the next frame's header, already read.
    """
    ends: list[int] = []
    end = len(data)
    pos = rest
    while pos < end:
        if pos:
            ends.append(pos)
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
    return ends
