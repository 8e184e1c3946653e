"""Where WebSocket frames end in a read (pure logic: lengths only)."""

from __future__ import annotations

import random

from twisted.trial.unittest import SynchronousTestCase

from ipcd.test.wssupport import BINARY, PING, TEXT, ws_frame
from ipcd.transports.wsframes import frame_ends


def server_frame(size: int) -> bytes:
    """An unmasked frame of C{size} payload bytes (as a server sends)."""
    if size < 126:
        return bytes([0x82, size]) + b"s" * size
    if size < 1 << 16:
        return bytes([0x82, 126]) + size.to_bytes(2, "big") + b"s" * size
    return bytes([0x82, 127]) + size.to_bytes(8, "big") + b"s" * size


class FrameEndsTests(SynchronousTestCase):
    def frames(self) -> list[bytes]:
        sizes = [0, 1, 125, 126, 127, 65535, 65536, 70_000, 3]
        frames = [ws_frame(b"m" * n, BINARY) for n in sizes]
        frames += [ws_frame(b"", PING), ws_frame(b"t", TEXT, fin=False)]
        frames += [server_frame(n) for n in sizes]
        return frames

    def test_wholeFrames(self) -> None:
        """Every frame's end, masked or not, with every length encoding."""
        frames = self.frames()
        stream = b"".join(frames)
        ends, at = [], 0
        for frame in frames[:-1]:
            at += len(frame)
            ends.append(at)
        self.assertEqual(frame_ends(stream), ends)

    def test_anyCut(self) -> None:
        """
        Cut anywhere, the tail's frame ends come out right from where the
        stream stands at the cut: inside a payload (C{rest} due) or inside
        a header (C{held} already read).
        """
        frames = self.frames()
        stream = b"".join(frames)
        starts, at = [], 0
        for frame in frames:
            starts.append(at)
            at += len(frame)
        rng = random.Random(6455)
        cuts = {rng.randrange(len(stream)) for _ in range(200)}
        cuts |= {start + k for start in starts for k in range(15)}
        for cut in sorted(c for c in cuts if 0 < c < len(stream)):
            start = max(s for s in starts if s <= cut)
            frame = frames[starts.index(start)]
            header = 2 + (4 if frame[1] & 0x80 else 0)
            header += {126: 2, 127: 8}.get(frame[1] & 0x7F, 0)
            if cut - start < header:  # inside the header
                held, rest = stream[start:cut], 0
            else:
                held, rest = b"", start + len(frame) - cut
            expected = [s - cut for s in starts if s > cut]
            self.assertEqual(
                frame_ends(stream[cut:], held=held, rest=rest), expected, cut
            )

    def test_incompleteHeader(self) -> None:
        """A header cut short ends the list: nothing is guessed."""
        frame = server_frame(70_000)
        for length in range(1, 10):
            self.assertEqual(frame_ends(server_frame(5) + frame[:length]), [7])
        self.assertEqual(frame_ends(b""), [])
        self.assertEqual(frame_ends(b"\x82"), [])

    def test_payloadLongerThanRead(self) -> None:
        """A frame running past the read has no end in it."""
        self.assertEqual(frame_ends(server_frame(1000)[:500]), [])
        self.assertEqual(frame_ends(b"s" * 10, rest=11), [])
        self.assertEqual(frame_ends(b"s" * 10, rest=10), [])
        self.assertEqual(frame_ends(b"s" * 10 + server_frame(1), rest=10), [10])
