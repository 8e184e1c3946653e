"""
The local ends of ipcd's own dials (L{ipcd.owndials}): as pure logic, and
a TCP peer and a UDP dial of the same port on a real ipcd.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from ipcd import owndials
from ipcd.identity import remote_peer
from ipcd.owndials import OwnDials, address_of
from ipcd.test.support import (
    TIMEOUT,
    assert_logged,
    assert_refused,
    free_port,
    logged_lines,
    lookup,
    make_config,
    parsed_addresses,
    short_rundir,
    start_ipcd,
    wait_until,
)
from ipcd.test.tcpsupport import TCP_LISTEN, recv_eof
from ipcd.test.udpsupport import UDP_LISTEN


class AddressTests(SynchronousTestCase):
    def test_sameOnBothEnds(self) -> None:
        """
        A dual-stack listener sees an IPv4 dialler as C{::ffff:a.b.c.d}; an
        IPv6 C{getsockname()} has a flow and a scope: all key alike.
        """
        self.assertEqual(address_of("::ffff:127.0.0.1", 5), ("127.0.0.1", 5, "tcp"))
        self.assertEqual(address_of("127.0.0.1", 5), ("127.0.0.1", 5, "tcp"))
        self.assertEqual(address_of("fe80::1%eth0", 5), ("fe80::1", 5, "tcp"))
        self.assertEqual(address_of("::1", 5, "udp"), ("::1", 5, "udp"))

    def test_parsedOncePerAddress(self) -> None:
        """
        Every remote peer's address is parsed (ipaddress: about 10 us): once
        per address, whatever the port; the addresses kept are bounded.
        """
        parsed = parsed_addresses(self, owndials._address)
        for port in (1, 2, 3):
            self.assertEqual(
                address_of("::ffff:192.0.2.7", port), ("192.0.2.7", port, "tcp")
            )
        self.assertEqual(parsed, ["::ffff:192.0.2.7"])
        for n in range(1100):
            address_of(f"10.0.{n // 250}.{n % 250}", 1)
        self.assertEqual(owndials._address.cache_info().currsize, 1024)

    def test_remotePeerKeyed(self) -> None:
        """A remote peer carries its address as the dials are keyed."""
        self.assertEqual(
            remote_peer("::ffff:10.0.0.1", 9).address, ("10.0.0.1", 9, "tcp")
        )
        udp = remote_peer("10.0.0.1", 9, "udp")
        self.assertEqual(udp.address, ("10.0.0.1", 9, "udp"))

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

    def test_notAnAddress(self) -> None:
        """
        A peer's address that is no IP address (websocketd behind haproxy:
        takes the PROXY header's text, whatever it is) is keyed and
        labelled as given.
        """
        peer = remote_peer("proxied", 9)
        self.assertEqual(peer.address, ("proxied", 9, "tcp"))
        self.assertEqual(peer.labels, frozenset({"ip:proxied"}))


class OwnDialsTests(SynchronousTestCase):
    def test_heldUntilDiscarded(self) -> None:
        dials = OwnDials()
        end = dials.add(("::1", 40000, 0, 0))
        self.assertIn(("::1", 40000, "tcp"), dials)
        self.assertNotIn(("::1", 40001, "tcp"), dials)
        dials.discard(end)
        self.assertNotIn(("::1", 40000, "tcp"), dials)
        self.assertEqual(len(dials), 0)

    def test_sharedEnd(self) -> None:
        """
        Two dials from the same local address and port (the kernel may give
        a connect's port again to a connect elsewhere: tcpd and tlsd both
        dialling this ipcd): the first answered, the end is still held for
        the other, whose request coming back here is still known as a loop;
        let go once both are answered.
        """
        dials = OwnDials()
        first = dials.add(("127.0.0.1", 40000))
        second = dials.add(("127.0.0.1", 40000))
        dials.discard(first)
        self.assertIn(remote_peer("127.0.0.1", 40000).address, dials)
        dials.discard(second)
        self.assertNotIn(remote_peer("127.0.0.1", 40000).address, dials)
        self.assertEqual(len(dials), 0)

    def test_transportsApart(self) -> None:
        """A UDP end is no TCP peer's of the same address and port."""
        dials = OwnDials()
        end = dials.add(("127.0.0.1", 40000), "udp")
        self.assertIn(remote_peer("127.0.0.1", 40000, "udp").address, dials)
        self.assertNotIn(remote_peer("127.0.0.1", 40000).address, dials)
        dials.discard(end)
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
        self.assertIn(("127.0.0.1", 40000, "tcp"), dials)
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


class TransportsApartTests(TestCase):
    @inlineCallbacks
    def test_tcpPeerOnAUdpDialsPort(self) -> Any:
        """
        While ipcd's udpd dials from 127.0.0.1:P, a TCP peer on this host
        whose own port is P (TCP's ports are not UDP's: another program's,
        another ipcd's) asks tcpd for a name routed out: it is dialled, not
        refused as a loop of ipcd's own.  Ends were keyed by address and
        port alone, TCP and UDP together: "route loop: 'out' came from this
        ipcd and would go out again".
        """
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(silent.close)
        silent.bind(("127.0.0.1", 0))
        silent.settimeout(TIMEOUT)
        closed = free_port()  # out's target: refused, but tried
        rundir = short_rundir(self, "ipcd-dials-")
        config = make_config(
            rundir,
            tcpd={"enabled": True, "listen": TCP_LISTEN},
            udpd={"enabled": True, "listen": UDP_LISTEN},
            rules=["allow in out"],
            routes={
                "quiet": f"udp://127.0.0.1:{silent.getsockname()[1]}/quiet",
                "out": f"tcp://127.0.0.1:{closed}/out",
            },
        )
        service = yield start_ipcd(self, config)
        tcpd = yield service.getServiceNamed("tcpd").listening()
        # The UDP dial: held while quiet's HELLO goes unanswered.
        asked = deferToThread(lookup, rundir, b"quiet")
        # However it ends: the next HELLO refused ends the dial.
        self.addCleanup(lambda: asked)
        self.addCleanup(silent.close)
        _hello, (_host, port) = yield deferToThread(silent.recvfrom, 65536)
        peer = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(peer.close)
        try:
            peer.bind(("127.0.0.1", port))
        except OSError as e:  # some other program's TCP port, by chance
            raise SkipTest(f"TCP port {port} is taken: {e}")
        peer.settimeout(TIMEOUT)
        peer.connect(("127.0.0.1", tcpd.getHost().port))
        lines = logged_lines(self)
        peer.sendall(b"out")
        answer = yield deferToThread(recv_eof, peer)
        self.assertEqual(answer, b"ne unavailable")  # (all a remote peer is told)
        assert_logged(self, lines, "cannot connect to tcpd at")
        self.assertFalse([line for line in lines if "route loop" in line], lines)
        silent.close()  # the next HELLO is refused: the dial ends
        reply = yield asked
        assert_refused(self, reply, "cannot reach udpd")
        yield wait_until(lambda: not service.broker.own_dials, "the dial to end")
