"""
Where WebSocket frames end in a read (pure logic: lengths only), and the
small frames websocketd reads and writes itself (against autobahn's parser).
"""

from __future__ import annotations

import random

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from ipcd.daemons.websocket.bridge import as_text
from ipcd.daemons.websocket.frames import (
    SMALL,
    frame_ends,
    small_client_message,
    small_server_frame,
)
from ipcd.test.wssupport import BINARY, PING, TEXT, ws_frame


def server_frame(size: int) -> bytes:
    """An unmasked frame of C{size} payload bytes (as a server sends)."""
    if size < 126:
        return bytes([0x82, size]) + b"s" * size
    if size < 1 << 16:
        return bytes([0x82, 126]) + size.to_bytes(2, "big") + b"s" * size
    return bytes([0x82, 127]) + size.to_bytes(8, "big") + b"s" * size


def list_ends(data: bytes, held: bytes = b"", rest: int = 0) -> list[int]:
    """frame_ends's offsets, all of them."""
    return list(frame_ends(data, held, rest))


class FrameEndsTests(SynchronousTestCase):
    def test_defaultsStartAtAFrame(self) -> None:
        """Without C{held} or C{rest}, C{data} starts at a frame's header."""
        data = ws_frame(b"m", BINARY) + ws_frame(b"", PING)
        self.assertEqual(list(frame_ends(data)), list_ends(data, b"", 0))
        self.assertEqual(list(frame_ends(data)), [7])  # the end itself is not said

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
        self.assertEqual(list_ends(stream), ends)

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
                list_ends(stream[cut:], held=held, rest=rest), expected, cut
            )

    def test_incompleteHeader(self) -> None:
        """A header cut short ends the list: nothing is guessed."""
        frame = server_frame(70_000)
        for length in range(1, 10):
            self.assertEqual(list_ends(server_frame(5) + frame[:length]), [7])
        self.assertEqual(list_ends(b""), [])
        self.assertEqual(list_ends(b"\x82"), [])
        # A 16-bit length cut after its first byte, alone and after a frame.
        self.assertEqual(list_ends(b"\x82\x7e\x00"), [])
        self.assertEqual(list_ends(server_frame(5) + b"\x82\x7e\x00"), [7])
        self.assertEqual(list_ends(b"\x82\x7e"), [])

    def test_payloadLongerThanRead(self) -> None:
        """A frame running past the read has no end in it."""
        self.assertEqual(list_ends(server_frame(1000)[:500]), [])
        self.assertEqual(list_ends(b"s" * 10, rest=11), [])
        self.assertEqual(list_ends(b"s" * 10, rest=10), [])
        self.assertEqual(list_ends(b"s" * 10 + server_frame(1), rest=10), [10])


class _Oracle(WebSocketServerProtocol):
    """autobahn's own parser, in memory: what it makes of some bytes."""

    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802, N803
        self.messages.append((payload, isBinary))


def autobahn_reads(data: bytes) -> tuple[list[tuple[bytes, bool]], bool]:
    """The messages autobahn's server takes from C{data}, and whether it failed."""
    factory = WebSocketServerFactory()
    factory.protocol = _Oracle
    # No timers on the global reactor: nothing is left behind.
    factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0)
    protocol = factory.buildProtocol(None)
    protocol.messages = []
    protocol.makeConnection(_Lenient())
    protocol.dataReceived(HANDSHAKE)
    assert protocol.state == protocol.STATE_OPEN
    protocol.dataReceived(data)
    return protocol.messages, protocol.state != protocol.STATE_OPEN


HANDSHAKE = (
    b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def masked(
    first: int,
    payload: bytes,
    mask: bytes,
    length: int | None = None,
    mask_bit: bool = True,
) -> bytes:
    """
    A client frame with the given first byte and mask (C{length}: the
    length it says; without C{mask_bit}, the mask is read as payload).
    """
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    said = len(payload) if length is None else length
    return bytes((first, (0x80 if mask_bit else 0) | said)) + mask + body


class _Lenient(StringTransport):
    """autobahn unregisters a producer it never registered when it fails."""

    def unregisterProducer(self) -> None:  # noqa: N802 (Twisted's name)
        self.producer = None


class SmallFrameTests(SynchronousTestCase):
    """
    The one frame shape websocketd reads and writes without autobahn: read
    as autobahn reads it, or not at all.
    """

    @settings(max_examples=400, deadline=None)
    @given(
        st.sampled_from([0x81, 0x82, 0x01, 0x02, 0x80, 0x88, 0x89, 0x8A, 0xC2, 0x83]),
        st.binary(min_size=0, max_size=127),
        st.binary(min_size=4, max_size=4),
        st.integers(min_value=-1, max_value=2),
        st.binary(min_size=0, max_size=3),
        st.booleans(),
    )
    def test_framesAsAutobahnReadsThem(
        self,
        first: int,
        payload: bytes,
        mask: bytes,
        skew: int,
        extra: bytes,
        mask_bit: bool,
    ) -> None:
        """
        Near-frames (other opcodes, lengths said wrong, bytes after the
        frame, no mask, non-UTF-8 text): a message taken is the one
        autobahn takes, and a whole small masked text or binary frame alone
        is always taken.
        """
        length = min(127, max(0, len(payload) + skew))
        if not mask_bit:
            length = min(127, length + 4)  # the mask bytes count as payload
        data = masked(first, payload, mask, length, mask_bit) + extra
        taken = self._agrees(data)
        whole = length == len(payload) <= SMALL and not extra
        if first in (0x81, 0x82) and mask_bit and whole:
            if first == 0x82 or as_text(payload):
                self.assertEqual(taken, (payload, first == 0x82))

    def _agrees(self, data: bytes) -> tuple[bytes, bool] | None:
        taken = small_client_message(data)
        if taken is not None:
            messages, failed = autobahn_reads(data)
            self.assertEqual((messages, failed), ([taken], False), data.hex())
        return taken

    def test_takenAtTheBounds(self) -> None:
        """Payloads of 0 and 125 bytes, any mask: taken, as autobahn takes them."""
        for mask in (b"\x01\x02\x03\x04", b"\xff\x00\xa5\x5a"):
            for payload in (b"", b"y", b"y" * 124, bytes(range(125))):
                data = masked(0x82, payload, mask)
                self.assertEqual(self._agrees(data), (payload, True), len(payload))
            text = "é".encode() * 62 + b"z"  # 125 bytes of UTF-8
            self.assertEqual(self._agrees(masked(0x81, text, mask)), (text, False))

    def test_notTaken(self) -> None:
        """Unmasked, fragmented, control, reserved bits, bad UTF-8, two frames."""
        mask = b"\x01\x02\x03\x04"
        for data in (
            bytes((0x82, 9)) + b"unmasked!",
            masked(0x01, b"frag", mask),  # not final
            masked(0x89, b"ping", mask),
            masked(0xC1, b"rsv1", mask),
            masked(0x81, b"\xff\xfe", mask),  # text, not UTF-8
            masked(0x82, b"a", mask) + masked(0x82, b"b", mask),
            masked(0x82, b"x" * 126, mask, 126),  # a 16-bit length follows
            masked(0x82, b"abc", mask)[:-1],  # short
        ):
            self.assertIsNone(small_client_message(data), data.hex())

    def test_serverFrame(self) -> None:
        """Unmasked, final, of the message's type; nothing longer than 125 bytes."""
        self.assertEqual(small_server_frame(b"hi", False), b"\x81\x02hi")
        self.assertEqual(small_server_frame(b"\x00" * 125, True)[:2], b"\x82\x7d")
        self.assertEqual(small_server_frame(b"", True), b"\x82\x00")
        with self.assertRaises(ValueError):
            small_server_frame(b"x" * 126, True)
