"""The local ends of ipcd's own dials (L{ipcd.owndials}), as pure logic."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from ipcd import owndials
from ipcd.identity import remote_peer
from ipcd.owndials import OwnDials, address_of
from ipcd.test.support import parsed_addresses


class AddressTests(SynchronousTestCase):
    def test_sameOnBothEnds(self) -> None:
        """
        A dual-stack listener sees an IPv4 dialler as C{::ffff:a.b.c.d}; an
        IPv6 C{getsockname()} has a flow and a scope: all key alike.
        """
        self.assertEqual(address_of("::ffff:127.0.0.1", 5), ("127.0.0.1", 5))
        self.assertEqual(address_of("127.0.0.1", 5), ("127.0.0.1", 5))
        self.assertEqual(address_of("fe80::1%eth0", 5), ("fe80::1", 5))
        self.assertEqual(address_of("::1", 5), ("::1", 5))

    def test_parsedOncePerAddress(self) -> None:
        """
        Every remote peer's address is parsed (ipaddress: about 10 us): once
        per address, whatever the port; the addresses kept are bounded.
        """
        parsed = parsed_addresses(self, owndials._address)
        for port in (1, 2, 3):
            self.assertEqual(address_of("::ffff:192.0.2.7", port), ("192.0.2.7", port))
        self.assertEqual(parsed, ["::ffff:192.0.2.7"])
        for n in range(1100):
            address_of(f"10.0.{n // 250}.{n % 250}", 1)
        self.assertEqual(owndials._address.cache_info().currsize, 1024)

    def test_remotePeerKeyed(self) -> None:
        """A remote peer carries its address as the dials are keyed."""
        self.assertEqual(remote_peer("::ffff:10.0.0.1", 9).address, ("10.0.0.1", 9))

    def test_remotePeerLabel(self) -> None:
        """
        A dual-stack listener's IPv4 peer is labelled as IPv4 (an ip: glob
        sees it so); IPv6 peers keep their address as the listener gave it.
        """
        for host, label in (
            ("::ffff:10.0.0.1", "ip:10.0.0.1"),
            ("10.0.0.1", "ip:10.0.0.1"),
            ("2001:db8::1", "ip:2001:db8::1"),
            ("fe80::1%eth0", "ip:fe80::1%eth0"),
        ):
            self.assertEqual(remote_peer(host, 9).labels, frozenset({label}))


class OwnDialsTests(SynchronousTestCase):
    def test_heldUntilDiscarded(self) -> None:
        dials = OwnDials()
        end = dials.add(("::1", 40000, 0, 0))
        self.assertIn(("::1", 40000), dials)
        self.assertNotIn(("::1", 40001), dials)
        dials.discard(end)
        self.assertNotIn(("::1", 40000), dials)
        self.assertEqual(len(dials), 0)

    def test_notAnIpSocket(self) -> None:
        """A UNIX socket's name is nothing to hold; discarding it is harmless."""
        dials = OwnDials()
        self.assertIsNone(dials.add(""))
        dials.discard(None)
        self.assertEqual(len(dials), 0)

    def test_heldUntilAnswered(self) -> None:
        """
        hold_until: held until the answer fires, whatever it is, and the
        answer passes on unchanged; an answer given already holds nothing.
        """
        dials = OwnDials()
        local = IPv4Address("TCP", "127.0.0.1", 40000)
        answered: Deferred[str] = Deferred()
        dials.hold_until(local, answered)
        self.assertIn(("127.0.0.1", 40000), dials)
        answered.callback("ok")
        self.assertEqual(self.successResultOf(answered), "ok")
        self.assertEqual(len(dials), 0)
        failed: Deferred[str] = Deferred()
        dials.hold_until(local, failed)
        failed.errback(ValueError("ne"))
        self.failureResultOf(failed, ValueError)
        self.assertEqual(len(dials), 0)
        dials.hold_until(local, succeed("ok"))
        self.assertEqual(len(dials), 0)
