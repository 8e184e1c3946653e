"""udpd's datagram format and receive window, pure: no sockets, no reactor."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from ipcd.config import Expected
from ipcd.transports import udpwire
from ipcd.transports.udp import Listen, parse_listen

NONCE = bytes(range(8))
SESSION = bytes(range(8, 16))


class FormatTests(SynchronousTestCase):
    def test_helloRoundTrip(self) -> None:
        """A HELLO carries the nonce and service, padded to HELLO_SIZE."""
        datagram = udpwire.hello(NONCE, b"pong")
        self.assertEqual(len(datagram), udpwire.HELLO_SIZE)
        self.assertEqual(datagram[:2], b"H\x01")
        self.assertEqual(udpwire.decode(datagram), udpwire.Hello(NONCE, b"pong"))

    def test_helloLongestName(self) -> None:
        name = b"x" * 255
        self.assertEqual(udpwire.decode(udpwire.hello(NONCE, name)).service, name)

    def test_helloNeedsANameAndNonce(self) -> None:
        self.assertRaises(ValueError, udpwire.hello, NONCE, b"")
        self.assertRaises(ValueError, udpwire.hello, NONCE, b"x" * 256)
        self.assertRaises(ValueError, udpwire.hello, b"short", b"pong")

    def test_okRoundTrip(self) -> None:
        datagram = udpwire.accepted(NONCE, SESSION)
        self.assertEqual(len(datagram), udpwire.OK_SIZE)
        self.assertEqual(udpwire.decode(datagram), udpwire.Accepted(NONCE, SESSION))

    def test_dataRoundTrip(self) -> None:
        datagram = udpwire.data(SESSION, 2**40 + 3, b"bounce me")
        self.assertEqual(len(datagram), udpwire.DATA_HEADER_SIZE + 9)
        self.assertEqual(
            udpwire.decode(datagram), udpwire.Data(SESSION, 2**40 + 3, b"bounce me")
        )

    def test_emptyMessage(self) -> None:
        """An empty libipc message is a DATA with no payload."""
        self.assertEqual(
            udpwire.decode(udpwire.data(SESSION, 0, b"")), udpwire.Data(SESSION, 0, b"")
        )

    def test_closeRoundTrip(self) -> None:
        self.assertEqual(udpwire.decode(udpwire.close(SESSION)), udpwire.Close(SESSION))

    def test_refusalCutToFit(self) -> None:
        """A NO is never larger than the limit (the request it answers)."""
        reason = "in connection to 'x' denied by default"
        whole = udpwire.refusal(NONCE, reason, 1000)
        self.assertEqual(udpwire.decode(whole), udpwire.Refusal(NONCE, reason))
        for limit in (0, 5, 9, 10, 20):
            self.assertLessEqual(
                len(udpwire.refusal(NONCE, reason, limit)), max(limit, 9)
            )
        cut = udpwire.decode(udpwire.refusal(NONCE, reason, 20))
        self.assertEqual(cut.reason, reason[:11])

    def test_refusalNotCutInACharacter(self) -> None:
        """A cut never leaves half a UTF-8 character."""
        datagram = udpwire.refusal(NONCE, "é" * 10, 9 + 5)
        self.assertEqual(udpwire.decode(datagram).reason, "éé")


class MalformedTests(SynchronousTestCase):
    """Anything that is not exactly one of udpd's datagrams is L{Malformed}."""

    def assertMalformed(self, datagram: bytes) -> None:
        self.assertRaises(udpwire.Malformed, udpwire.decode, datagram)

    def test_empty(self) -> None:
        self.assertMalformed(b"")

    def test_oneByte(self) -> None:
        for kind in (b"H", b"O", b"N", b"D", b"C", b"\0", b"x"):
            self.assertMalformed(kind)

    def test_unknownKind(self) -> None:
        self.assertMalformed(b"X" + bytes(40))

    def test_truncatedHeaders(self) -> None:
        self.assertMalformed(udpwire.data(SESSION, 1, b"")[:-1])
        self.assertMalformed(udpwire.close(SESSION)[:-1])
        self.assertMalformed(udpwire.accepted(NONCE, SESSION)[:-1])
        self.assertMalformed(b"N" + NONCE[:7])

    def test_trailingBytes(self) -> None:
        self.assertMalformed(udpwire.close(SESSION) + b"x")
        self.assertMalformed(udpwire.accepted(NONCE, SESSION) + b"x")

    def test_shortHello(self) -> None:
        """An unpadded HELLO is not answered: the answer could be larger."""
        self.assertMalformed(udpwire.hello(NONCE, b"pong")[:20])
        self.assertMalformed(udpwire.hello(NONCE, b"pong")[:-1])

    def test_helloOtherVersion(self) -> None:
        datagram = bytearray(udpwire.hello(NONCE, b"pong"))
        datagram[1] = 2
        self.assertMalformed(bytes(datagram))

    def test_helloEmptyName(self) -> None:
        datagram = bytearray(udpwire.hello(NONCE, b"pong"))
        datagram[10] = 0
        self.assertMalformed(bytes(datagram))

    def test_helloNameLongerThanSaid(self) -> None:
        """Bytes after the name must be padding: no hidden second field."""
        datagram = bytearray(udpwire.hello(NONCE, b"pong"))
        datagram[10] = 2
        self.assertMalformed(bytes(datagram))


class ReceiveWindowTests(SynchronousTestCase):
    def test_inOrder(self) -> None:
        window = udpwire.ReceiveWindow()
        self.assertEqual([window.accept(n) for n in range(5)], [True] * 5)
        self.assertEqual(window.lost, 0)

    def test_duplicatesDropped(self) -> None:
        window = udpwire.ReceiveWindow()
        self.assertTrue(window.accept(0))
        self.assertFalse(window.accept(0))
        self.assertTrue(window.accept(3))
        self.assertFalse(window.accept(3))
        self.assertTrue(window.accept(1))
        self.assertFalse(window.accept(1))
        self.assertEqual(window.accepted, 3)

    def test_reorderedAccepted(self) -> None:
        """A late datagram within the window is delivered, once."""
        window = udpwire.ReceiveWindow()
        self.assertEqual(
            [window.accept(n) for n in (0, 2, 1, 4, 3, 3)],
            [True, True, True, True, True, False],
        )
        self.assertEqual(window.lost, 0)

    def test_lostCounted(self) -> None:
        window = udpwire.ReceiveWindow()
        for n in (0, 1, 5, 6, 9):
            window.accept(n)
        self.assertEqual(window.lost, 5)  # 2, 3, 4, 7, 8
        window.accept(3)
        self.assertEqual(window.lost, 4)

    def test_staleDropped(self) -> None:
        """Older than the window: dropped, even if never seen."""
        window = udpwire.ReceiveWindow(size=8)
        window.accept(100)
        self.assertFalse(window.accept(92))
        self.assertTrue(window.accept(93))

    def test_bigJump(self) -> None:
        window = udpwire.ReceiveWindow(size=8)
        window.accept(0)
        self.assertTrue(window.accept(10**6))
        self.assertFalse(window.accept(10**6))
        self.assertTrue(window.accept(10**6 - 1))


class ListenTests(SynchronousTestCase):
    def test_forms(self) -> None:
        self.assertEqual(parse_listen("udp:9000"), Listen(9000, "127.0.0.1"))
        self.assertEqual(parse_listen("udp:0:interface=0.0.0.0"), Listen(0, "0.0.0.0"))
        self.assertEqual(parse_listen("udp:53:interface=::1"), Listen(53, "::1"))

    def test_bad(self) -> None:
        for bad in (
            "tcp:9000",
            "udp:",
            "udp:x",
            "udp:70000",
            "udp:9000:interface=example.com",
            "udp:9000:backlog=5",
            9000,
        ):
            self.assertRaises(Expected, parse_listen, bad)
