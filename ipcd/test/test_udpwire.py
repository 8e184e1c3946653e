"""
udpd's datagram format, receive window and address cookies, pure: no
sockets, no reactor.
"""

from __future__ import annotations

import dataclasses

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ipcd.checkers import Expected
from ipcd.daemons.udp import wire as udpwire
from ipcd.daemons.udp.cookie import FULL, PERIOD, RENEWED, SPENT, AddressCookies
from ipcd.daemons.udp.daemon import Listen, parse_listen

NONCE = bytes(range(8))
SESSION = bytes(range(8, 16))
COOKIE = bytes(range(16, 32))
NAME_LENGTH_AT = 26  # 'H', version, nonce(8), cookie(16)


class FormatTests(SynchronousTestCase):
    def test_helloRoundTrip(self) -> None:
        """A HELLO carries the nonce and service, padded to HELLO_SIZE."""
        datagram = udpwire.hello(NONCE, b"pong")
        self.assertEqual(len(datagram), udpwire.HELLO_SIZE)
        self.assertEqual(datagram[:2], b"H\x02")
        self.assertEqual(datagram[10:NAME_LENGTH_AT], udpwire.NO_COOKIE)
        self.assertEqual(udpwire.decode(datagram), udpwire.Hello(NONCE, b"pong"))

    def test_helloWithCookie(self) -> None:
        datagram = udpwire.hello(NONCE, b"pong", COOKIE)
        self.assertEqual(len(datagram), udpwire.HELLO_SIZE)
        self.assertEqual(
            datagram[: NAME_LENGTH_AT + 5], b"H\x02" + NONCE + COOKIE + b"\x04pong"
        )
        self.assertEqual(
            udpwire.decode(datagram), udpwire.Hello(NONCE, b"pong", COOKIE)
        )

    def test_verifyRoundTrip(self) -> None:
        """A VERIFY: 25 bytes, far smaller than the HELLO it answers."""
        datagram = udpwire.verify(NONCE, COOKIE)
        self.assertEqual(datagram, b"V" + NONCE + COOKIE)
        self.assertEqual(len(datagram), udpwire.VERIFY_SIZE)
        self.assertEqual(udpwire.decode(datagram), udpwire.Verify(NONCE, COOKIE))

    def test_helloLongestName(self) -> None:
        name = b"x" * 255
        self.assertEqual(udpwire.decode(udpwire.hello(NONCE, name)).service, name)

    def test_helloNeedsANameAndNonce(self) -> None:
        self.assertRaises(ValueError, udpwire.hello, NONCE, b"")
        self.assertRaises(ValueError, udpwire.hello, NONCE, b"x" * 256)
        self.assertRaises(ValueError, udpwire.hello, b"short", b"pong")
        self.assertRaises(ValueError, udpwire.hello, NONCE, b"pong", b"short")

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

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=40), st.sampled_from(b"DHVONCX"))
    def test_dataHeadAgreesWithDecode(self, rest: bytes, kind: int) -> None:
        """
        The per-message way (C{data_head}) reads a DATA as L{decode} does,
        and says nothing of any other datagram, a truncated DATA included.
        """
        datagram = bytes([kind]) + rest
        head = udpwire.data_head(datagram)
        try:
            parsed = udpwire.decode(datagram)
        except udpwire.Malformed:
            parsed = None
        if isinstance(parsed, udpwire.Data):
            self.assertEqual(head, (parsed.session, parsed.sequence))
            self.assertEqual(datagram[udpwire.DATA_HEADER_SIZE :], parsed.payload)
        else:
            self.assertIsNone(head)

    def test_emptyMessage(self) -> None:
        """An empty libipc message is a DATA with no payload."""
        self.assertEqual(
            udpwire.decode(udpwire.data(SESSION, 0, b"")), udpwire.Data(SESSION, 0, b"")
        )

    def test_closeRoundTrip(self) -> None:
        self.assertEqual(udpwire.decode(udpwire.close(SESSION)), udpwire.Close(SESSION))

    def test_pingAndPong(self) -> None:
        """PING and PONG: their kind byte and the session id, 9 bytes."""
        self.assertEqual(udpwire.ping(SESSION), b"P" + SESSION)
        self.assertEqual(udpwire.pong(SESSION), b"Q" + SESSION)
        self.assertEqual(udpwire.decode(udpwire.ping(SESSION)), udpwire.Ping(SESSION))
        self.assertEqual(udpwire.decode(udpwire.pong(SESSION)), udpwire.Pong(SESSION))

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
        for kind in (b"H", b"O", b"N", b"D", b"C", b"P", b"Q", b"\0", b"x"):
            self.assertMalformed(kind)

    def test_unknownKind(self) -> None:
        self.assertMalformed(b"X" + bytes(40))

    def test_truncatedHeaders(self) -> None:
        self.assertMalformed(udpwire.data(SESSION, 1, b"")[:-1])
        self.assertMalformed(udpwire.close(SESSION)[:-1])
        self.assertMalformed(udpwire.accepted(NONCE, SESSION)[:-1])
        self.assertMalformed(udpwire.verify(NONCE, COOKIE)[:-1])
        self.assertMalformed(b"N" + NONCE[:7])

    def test_trailingBytes(self) -> None:
        self.assertMalformed(udpwire.close(SESSION) + b"x")
        self.assertMalformed(udpwire.accepted(NONCE, SESSION) + b"x")
        self.assertMalformed(udpwire.verify(NONCE, COOKIE) + b"x")

    def test_wrongLengthsSaid(self) -> None:
        """A fixed-size datagram of another size says which, and its size."""
        for datagram, kind in [
            (udpwire.verify(NONCE, COOKIE), "VERIFY"),
            (udpwire.accepted(NONCE, SESSION), "OK"),
            (udpwire.close(SESSION), "CLOSE"),
            (udpwire.ping(SESSION), "PING"),
            (udpwire.pong(SESSION), "PONG"),
        ]:
            longer = datagram + b"x"
            with self.assertRaises(udpwire.Malformed) as caught:
                udpwire.decode(longer)
            self.assertEqual(
                str(caught.exception),
                f"a{'n' if kind == 'OK' else ''} {kind} of {len(longer)} bytes",
            )

    def test_valuesAreImmutable(self) -> None:
        """Decoded datagrams are values: hashable, and not changed in place."""
        values = [
            udpwire.decode(datagram)
            for datagram in [
                udpwire.verify(NONCE, COOKIE),
                udpwire.accepted(NONCE, SESSION),
                udpwire.close(SESSION),
                udpwire.ping(SESSION),
                udpwire.pong(SESSION),
                udpwire.data(SESSION, 1, b"m"),
            ]
        ]
        for value in [*values, udpwire.OtherVersion(NONCE, 3)]:
            hash(value)
            with self.assertRaises(dataclasses.FrozenInstanceError):
                value.nonce = b"x"  # type: ignore[misc]

    def test_shortHello(self) -> None:
        """An unpadded HELLO is not answered: the answer could be larger."""
        self.assertMalformed(udpwire.hello(NONCE, b"pong")[:20])
        self.assertMalformed(udpwire.hello(NONCE, b"pong")[:-1])

    def test_helloEmptyName(self) -> None:
        datagram = bytearray(udpwire.hello(NONCE, b"pong"))
        datagram[NAME_LENGTH_AT] = 0
        self.assertMalformed(bytes(datagram))

    def test_helloNameLongerThanSaid(self) -> None:
        """Bytes after the name must be padding: no hidden second field."""
        datagram = bytearray(udpwire.hello(NONCE, b"pong"))
        datagram[NAME_LENGTH_AT] = 2
        self.assertMalformed(bytes(datagram))


class OtherVersionTests(SynchronousTestCase):
    def test_versionOne(self) -> None:
        """
        Version 1's HELLO (no cookie) is told apart, with its nonce, so that
        the server can answer why.
        """
        v1 = (b"H\x01" + NONCE + b"\x04pong").ljust(udpwire.HELLO_SIZE, b"\0")
        self.assertEqual(udpwire.decode(v1), udpwire.OtherVersion(NONCE, 1))

    def test_laterVersion(self) -> None:
        datagram = bytearray(udpwire.hello(NONCE, b"pong"))
        datagram[1] = 3
        self.assertEqual(
            udpwire.decode(bytes(datagram)), udpwire.OtherVersion(NONCE, 3)
        )

    def test_shortIsStillMalformed(self) -> None:
        """Whatever its version, a HELLO under 300 bytes gets no answer."""
        self.assertRaises(udpwire.Malformed, udpwire.decode, b"H\x01" + NONCE)


class AddressCookieTests(SynchronousTestCase):
    """The address check's cookies, on a fake clock."""

    ADDRESS = ("127.0.0.1", 4000)

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000 * PERIOD + 1)
        self.cookies = AddressCookies(self.clock)

    def test_goodForItsRequest(self) -> None:
        cookie = self.cookies.issue(self.ADDRESS, NONCE, b"pong")
        self.assertEqual(len(cookie), udpwire.COOKIE_SIZE)
        self.assertTrue(self.cookies.valid(cookie, self.ADDRESS, NONCE, b"pong"))

    def test_boundToAddressPortNonceAndName(self) -> None:
        cookie = self.cookies.issue(self.ADDRESS, NONCE, b"pong")
        for address, nonce, service in [
            (("127.0.0.2", 4000), NONCE, b"pong"),
            (("127.0.0.1", 4001), NONCE, b"pong"),
            (self.ADDRESS, SESSION, b"pong"),
            (self.ADDRESS, NONCE, b"ping"),
        ]:
            self.assertFalse(self.cookies.valid(cookie, address, nonce, service))

    def test_noCookieNeverGood(self) -> None:
        self.assertFalse(
            self.cookies.valid(udpwire.NO_COOKIE, self.ADDRESS, NONCE, b"pong")
        )

    def test_anotherServersCookie(self) -> None:
        """Each udpd draws its own secrets."""
        cookie = AddressCookies(self.clock).issue(self.ADDRESS, NONCE, b"pong")
        self.assertFalse(self.cookies.valid(cookie, self.ADDRESS, NONCE, b"pong"))

    def test_goodForItsPeriodAndTheNext(self) -> None:
        """Issued late in a period, good through the next; then not."""
        self.clock.advance(PERIOD - 2)
        cookie = self.cookies.issue(self.ADDRESS, NONCE, b"pong")
        self.clock.advance(3)  # the next period
        self.assertTrue(self.cookies.valid(cookie, self.ADDRESS, NONCE, b"pong"))
        self.assertNotEqual(cookie, self.cookies.issue(self.ADDRESS, NONCE, b"pong"))
        self.clock.advance(PERIOD)
        self.assertFalse(self.cookies.valid(cookie, self.ADDRESS, NONCE, b"pong"))

    def test_notAfterALongPause(self) -> None:
        """
        With no HELLO for two periods or more, the secrets rotate at once
        past both: nothing issued before is good.
        """
        cookie = self.cookies.issue(self.ADDRESS, NONCE, b"pong")
        self.clock.advance(5 * PERIOD)
        self.assertFalse(self.cookies.valid(cookie, self.ADDRESS, NONCE, b"pong"))


class SpentCookieTests(SynchronousTestCase):
    """A cookie opens one session; the cookies kept are bounded."""

    ADDRESS = ("127.0.0.1", 4000)

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000 * PERIOD + 1)
        self.cookies = AddressCookies(self.clock, per_source=3, in_all=5)

    def good(self, nonce: bytes = NONCE) -> tuple[bytes, int]:
        cookie = self.cookies.issue(self.ADDRESS, nonce, b"pong")
        issued = self.cookies.issued_in(cookie, self.ADDRESS, nonce, b"pong")
        assert issued is not None
        return cookie, issued

    def test_eachVerifyAnotherCookie(self) -> None:
        """Two cookies for the same request differ, and both are good."""
        first, second = self.good(), self.good()
        self.assertNotEqual(first[0], second[0])

    def test_spentOnce(self) -> None:
        cookie, issued = self.good()
        self.assertIsNone(self.cookies.spend(cookie, issued, "ip:a"))
        self.assertEqual(self.cookies.spend(cookie, issued, "ip:a"), SPENT)
        self.assertEqual(self.cookies.spend(cookie, issued, "ip:b"), SPENT)

    def test_boundedPerSource(self) -> None:
        """
        Past its share a prefix is refused (FULL), not let replay; others
        go on.  A spent cookie stays spent.
        """
        spent = [self.good(bytes([n]) * 8) for n in range(5)]
        answers = [self.cookies.spend(c, at, "ip:a") for c, at in spent[:4]]
        self.assertEqual(answers, [None, None, None, FULL])
        self.assertIsNone(self.cookies.spend(*spent[4], "ip:b"))
        self.assertEqual(self.cookies.spend(*spent[0], "ip:a"), SPENT)

    def test_fullInAllRenews(self) -> None:
        """
        The cookie that would pass the bound in all is taken, and the
        secrets drawn anew (it was refused, and so was everyone else, for
        as long as a few prefixes kept the record full): no cookie issued
        before is good any more, spent or not, so none is kept and none can
        be replayed; every prefix spends new ones, one at its share too.
        """
        out = [self.good(bytes([n]) * 8) for n in range(7)]
        answers = [self.cookies.spend(c, at, "ip:a") for c, at in out[:3]]
        answers += [self.cookies.spend(c, at, "ip:b") for c, at in out[3:5]]
        self.assertEqual(answers, [None] * 5)
        self.assertEqual(self.cookies.spend(*out[5], "ip:c"), RENEWED)
        for n, (cookie, _) in enumerate(out):
            nonce = bytes([n]) * 8
            self.assertFalse(self.cookies.valid(cookie, self.ADDRESS, nonce, b"pong"))
        # Room for in_all again (none kept), a prefix's share whole again.
        again = [self.good(bytes([n]) * 8) for n in range(10, 15)]
        answers = [self.cookies.spend(c, at, "ip:a") for c, at in again[:3]]
        answers += [self.cookies.spend(c, at, "ip:d") for c, at in again[3:]]
        self.assertEqual(answers, [None] * 5)

    def test_forgottenOnceExpired(self) -> None:
        """
        A cookie is remembered as long as it is good, no longer: then its
        place is free, and it is not good anyway.
        """
        cookie, issued = self.good()
        self.cookies.spend(cookie, issued, "ip:a")
        self.clock.advance(PERIOD)
        self.assertEqual(self.cookies.spend(cookie, issued, "ip:a"), SPENT)
        self.clock.advance(PERIOD)
        self.assertFalse(self.cookies.valid(cookie, self.ADDRESS, NONCE, b"pong"))
        for n in range(5):
            new, at = self.good(bytes([n]) * 8)
            self.assertIsNone(self.cookies.spend(new, at, f"ip:{n}"))


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

    def test_hugeJumpsAllocateNothing(self) -> None:
        """
        A jump of at least the window starts it afresh: the bitmap stays
        within the window's bits whatever the peer sends (the old one
        shifted by the jump: 2**62 bits).
        """
        window = udpwire.ReceiveWindow()
        window.accept(0)
        for top in (2**62, 2**63 - 1, 2**64 - 1):
            self.assertTrue(window.accept(top))
            self.assertLess(window.seen.bit_length(), window.size + 1)
            self.assertTrue(window.accept(top - 1023))  # the new window's oldest
            self.assertFalse(window.accept(top - 1024))
        # Numbers do not wrap: 0 after 2**64 - 1 is stale.
        self.assertFalse(window.accept(0))
        self.assertEqual(window.lost, 2**64 - 7)

    def test_jumpOfExactlyTheWindow(self) -> None:
        window = udpwire.ReceiveWindow(size=8)
        for n in (0, 1, 2):
            window.accept(n)
        self.assertTrue(window.accept(10))  # 2 + 8: 2 falls out
        self.assertEqual(window.seen, 1)
        self.assertFalse(window.accept(2))
        self.assertTrue(window.accept(3))
        self.assertEqual(window.lost, 10 + 1 - 5)


class SetWindow:
    """The window's meaning, with a set of every number accepted."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.got: set[int] = set()
        self.top = -1

    def accept(self, sequence: int) -> bool:
        if sequence in self.got or sequence <= self.top - self.size:
            return False
        self.got.add(sequence)
        self.top = max(self.top, sequence)
        return True

    @property
    def lost(self) -> int:
        return self.top + 1 - len(self.got)


# Where the next number lands: near the top (reordering, duplicates, gaps,
# just past the window's edge either way), or anywhere in 64 bits.
def _moves(size: int) -> st.SearchStrategy[tuple[str, int]]:
    return st.one_of(
        st.tuples(st.just("near"), st.integers(-2 * size - 2, 2 * size + 2)),
        st.tuples(st.just("edge"), st.sampled_from([-size - 1, -size, size, size + 1])),
        st.tuples(st.just("at"), st.integers(0, 2**64 - 1)),
    )


class ReceiveWindowModelTests(SynchronousTestCase):
    @settings(
        max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )
    @given(st.data(), st.sampled_from([1, 2, 8, 64, 1024]))
    def test_sameAsASetOfEverySequence(self, data: st.DataObject, size: int) -> None:
        """
        Accept, duplicate and stale decisions, and C{lost}, are those of a
        set of every number accepted, for any sequence of numbers.
        """
        window, model = udpwire.ReceiveWindow(size), SetWindow(size)
        for how, value in data.draw(st.lists(_moves(size), max_size=60)):
            if how == "at":
                sequence = value
            else:
                sequence = min(max(model.top + value, 0), 2**64 - 1)
            self.assertEqual(window.accept(sequence), model.accept(sequence), sequence)
            self.assertEqual((window.top, window.lost), (model.top, model.lost))
            self.assertLess(window.seen.bit_length(), size + 1)


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
            "udp:²",  # str.isdigit()'s, which int() refuses (a traceback)
            "udp:٩٠٠٠",  # Arabic-Indic digits, which int() reads as 9000
            "udp:" + "9" * 5000,  # more digits than int() reads
            "udp:9000:interface=example.com",
            "udp:9000:backlog=5",
            9000,
        ):
            self.assertRaises(Expected, parse_listen, bad)
