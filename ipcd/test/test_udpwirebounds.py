"""
udpd's datagram values and receive window at their bounds: every repeat
within the window dropped, the window's size exact and its memory bounded,
and every malformed length refused.
"""

from __future__ import annotations

import dataclasses

from twisted.trial.unittest import SynchronousTestCase

from ipcd.daemons.udp import wire as udpwire
from ipcd.daemons.udp.wire import Malformed, ReceiveWindow

NONCE = b"n" * 8
SESSION = b"s" * 8


class WindowBoundsTests(SynchronousTestCase):
    def test_everyRepeatDropped(self) -> None:
        """A replay of everything received, in any order: all dropped."""
        window = ReceiveWindow()
        self.assertEqual(window.lost, 0)
        self.assertTrue(all(window.accept(n) for n in range(100)))
        self.assertFalse(any(window.accept(n) for n in range(100)))
        self.assertFalse(any(window.accept(n) for n in reversed(range(100))))
        self.assertEqual((window.accepted, window.lost), (100, 0))

    def test_defaultSizeExact(self) -> None:
        """1,024 numbers: the oldest one still in it is taken, one older not."""
        window = ReceiveWindow()
        window.accept(5000)
        self.assertFalse(window.accept(5000 - 1024))
        self.assertTrue(window.accept(5000 - 1023))

    def test_memoryBounded(self) -> None:
        """The window keeps size bits, however far the numbers go."""
        for step in (1, 3):  # every number (all bits set), or some
            window = ReceiveWindow(size=64)
            for n in range(0, 10_000, step):
                window.accept(n)
            self.assertLessEqual(window.seen.bit_length(), 64)


class ValuesTests(SynchronousTestCase):
    def test_frozen(self) -> None:
        for value in (
            udpwire.Hello(NONCE, b"svc"),
            udpwire.Accepted(NONCE, SESSION),
            udpwire.Refusal(NONCE, "no"),
            udpwire.Data(SESSION, 1, b"x"),
            udpwire.Close(SESSION),
        ):
            field = dataclasses.fields(value)[0].name
            with self.assertRaises(dataclasses.FrozenInstanceError):
                setattr(value, field, b"")

    def test_serviceLengths(self) -> None:
        """A service name of 1 to 255 bytes, round trip; 0 or 256 refused."""
        for service in (b"a", b"s" * 255):
            decoded = udpwire.decode(udpwire.hello(NONCE, service))
            self.assertEqual(decoded, udpwire.Hello(NONCE, service))
        for service in (b"", b"s" * 256):
            self.assertRaises(ValueError, udpwire.hello, NONCE, service)

    def test_wrongLengthsRefused(self) -> None:
        ok = udpwire.accepted(NONCE, SESSION)
        close = udpwire.close(SESSION)
        for datagram in (ok + b"x", ok[:-1], close + b"x", close[:-1], b"D" + b"s" * 7):
            self.assertRaises(Malformed, udpwire.decode, datagram)
        # Each says what was wrong.
        for datagram, said in [
            (ok + b"x", "an OK of 18 bytes"),
            (close[:-1], "a CLOSE of 8 bytes"),
            (b"D" + b"s" * 7, "a truncated datagram of 8 bytes"),
            (b"Z", "unknown datagram kind b'Z'"),
        ]:
            error = self.assertRaises(Malformed, udpwire.decode, datagram)
            self.assertEqual(str(error), said)
