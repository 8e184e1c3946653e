"""
udpd on a listener bound to every address (0.0.0.0, ::) answers from the
address each peer wrote to: a peer's udpd, connected to that address,
takes nothing from another.  127.0.0.2 stands for a host's second address
(the kernel answers 127.0.0.1's peers from 127.0.0.1).
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from ipcd.daemons.udp import source as sources
from ipcd.daemons.udp import wire as udpwire
from ipcd.daemons.udp.batch import DatagramSender
from ipcd.test.support import TIMEOUT, bounce, lookup, wait_until
from ipcd.test.test_udp import B_RULES, OK, has_ipv6_loopback
from ipcd.test.test_udpbatch import offload_missing
from ipcd.test.udpsupport import next_data, start_udp_host
from ipcd.wire import encode


class SecondAddressTests(TestCase):
    @inlineCallbacks
    def dial_second_address(self, listen: str) -> Any:
        """
        A client on host A asks for pong on B at 127.0.0.2, B's udpd
        listening on C{listen}: the lookup's answer, and its echo.
        """
        a = yield start_udp_host(self, pongd=False)
        b = yield start_udp_host(self, rules=B_RULES, listen=listen)
        payload = f"pong;pong udp://127.0.0.2:{b.port}/pong".encode()
        reply = yield deferToThread(lookup, a.rundir, payload)
        self.assertEqual(reply.data, OK)  # (timed out: the answers went astray)
        sock = reply.take_socket(self)
        echo = yield deferToThread(bounce, sock, b"from 127.0.0.2")
        self.assertEqual(echo, encode(b"from 127.0.0.2"))
        return b

    def test_everyIPv4Address(self) -> Any:
        """The VERIFY, the OK and the DATA come from 127.0.0.2."""
        return self.dial_second_address("udp:0:interface=0.0.0.0")

    def test_dualStack(self) -> Any:
        """An IPv4 peer of a listener on ::, its address IPv4-mapped."""
        if not has_ipv6_loopback():
            raise self.skipTest("no IPv6 here")
        return self.dial_second_address("udp:0:interface=::")

    @inlineCallbacks
    def test_oneAddressNotAsked(self) -> Any:
        """A listener bound to one address answers from it: nothing asked."""
        b = yield start_udp_host(self, rules=B_RULES)
        sock = b.server.transport.getHandle()
        level, option = socket.IPPROTO_IP, sources.IP_PKTINFO
        self.assertEqual(sock.getsockopt(level, option), 0)


def broadcasting_socket() -> socket.socket:
    """
    An IPv4 socket that may send to 255.255.255.255 (the kernel loops a
    broadcast back to this host's listeners); skips where there is no
    route for it (a host of loopback only).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        try:  # (connecting sends nothing: a route to it, or not)
            probe.connect(("255.255.255.255", 9))
        except OSError as e:
            raise SkipTest(f"no broadcast here: {e}")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.bind(("0.0.0.0", 0))
    sock.settimeout(TIMEOUT)
    return sock


class BroadcastTests(TestCase):
    """
    An IPv4 peer's HELLO to a broadcast address, to a listener bound to
    every address: answered from this host's own address on the way (the
    kernel's C{ipi_spec_dst}), never from the broadcast, which is no
    source.  On a dual-stack C{::} listener the datagram's IPv6 control
    message names only the IPv4-mapped broadcast: answering from it failed
    (EINVAL), so the VERIFY, the OK and every DATA of the session were lost.
    """

    @inlineCallbacks
    def hello_by_broadcast(self, listen: str) -> Any:
        """A session opened and echoed, the HELLOs sent to the broadcast."""
        b = yield start_udp_host(self, rules=B_RULES, listen=listen)
        sock = broadcasting_socket()
        self.addCleanup(sock.close)
        counters = b.broker.counters
        broadcast = ("255.255.255.255", b.port)
        nonce = b"b" * udpwire.ID_SIZE
        sock.sendto(udpwire.hello(nonce, b"pong"), broadcast)
        yield wait_until(
            lambda: counters["udp hellos answered with a cookie"], "the VERIFY"
        )
        self.assertEqual(counters["udp datagrams dropped: send failed"], 0)
        answer, source = yield deferToThread(sock.recvfrom, 65536)
        self.assertNotEqual(source[0], "255.255.255.255")
        verify = udpwire.decode(answer)
        self.assertIsInstance(verify, udpwire.Verify)
        sock.sendto(udpwire.hello(nonce, b"pong", verify.cookie), broadcast)
        answer, source = yield deferToThread(sock.recvfrom, 65536)
        ok = udpwire.decode(answer)
        self.assertIsInstance(ok, udpwire.Accepted)
        # The session's DATA: from where the OK came (the peer's udpd
        # connects to it), the echo back from there too.
        sock.connect(source)
        sock.send(udpwire.data(ok.session, 0, b"via broadcast"))
        echo = yield deferToThread(next_data, sock)
        self.assertEqual(echo.payload, b"via broadcast")
        sock.send(udpwire.close(ok.session))
        self.assertEqual(counters["udp datagrams dropped: send failed"], 0)

    def test_everyIPv4Address(self) -> Any:
        return self.hello_by_broadcast("udp:0:interface=0.0.0.0")

    def test_dualStack(self) -> Any:
        """(Unanswered before: the answers went out from the broadcast.)"""
        if not has_ipv6_loopback():
            raise self.skipTest("no IPv6 here")
        return self.hello_by_broadcast("udp:0:interface=::")


class RunSourceTests(SynchronousTestCase):
    """
    A session's datagrams sent in runs (UDP_SEGMENT) carry the source with
    the segment size: a peer connected to 127.0.0.2 takes them all.
    """

    def sent_from_second_address(self, family: int, listen: str, info: bytes) -> None:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.bind((listen, 0))
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(peer.close)
        peer.bind(("127.0.0.1", 0))
        peer.connect(("127.0.0.2", sock.getsockname()[1]))  # takes only that
        peer.settimeout(TIMEOUT)
        to = peer.getsockname()
        if family == socket.AF_INET6:
            to = ("::ffff:" + to[0], to[1])
        source = sources.answer_from(socket.IPPROTO_IP, info)
        sender = DatagramSender(sock, to, source=source)
        sent = [b"%02d" % n + b"x" * 98 for n in range(20)]  # a run of 20
        self.assertEqual(sender.send_all(sent), [])
        self.assertEqual([peer.recv(65536) for _ in sent], sent)
        if offload_missing() is None:
            self.assertTrue(sender.gso)  # (one run: the source went with it)

    def test_ipv4(self) -> None:
        info = struct.pack("=i4s4s", 1, bytes([127, 0, 0, 2]), bytes([127, 0, 0, 2]))
        self.sent_from_second_address(socket.AF_INET, "0.0.0.0", info)

    def test_dualStack(self) -> None:
        """An IPv4 peer of a :: socket: IP_PKTINFO on the IPv6 socket."""
        if not has_ipv6_loopback():
            raise self.skipTest("no IPv6 here")
        info = struct.pack("=i4s4s", 1, bytes([127, 0, 0, 2]), bytes([127, 0, 0, 2]))
        self.sent_from_second_address(socket.AF_INET6, "::", info)


class AskDestinationsTests(SynchronousTestCase):
    """
    Which sockets are asked for each datagram's destination, and that the
    kernel then gives it (real sockets, a datagram from a real peer).
    """

    def datagram_to(
        self, family: int, host: str, peer: tuple[int, str]
    ) -> tuple[frozenset[tuple[int, int]], list[tuple[int, int, bytes]]]:
        """
        A socket of C{family} bound to C{host}, asked; a datagram to it
        from C{peer} (family, address): what it was asked for, and the
        control messages the datagram came with.
        """
        sock = socket.socket(family, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.bind((host, 0))
        sock.settimeout(TIMEOUT)
        kinds = sources.ask_destinations(sock)
        sender = socket.socket(peer[0], socket.SOCK_DGRAM)
        self.addCleanup(sender.close)
        sender.sendto(b"x", (peer[1], sock.getsockname()[1]))
        data, ancillary, _, _ = sock.recvmsg(16, sources.SPACE)
        self.assertEqual(data, b"x")
        return kinds, ancillary

    def test_everyIPv4Address(self) -> None:
        kinds, ancillary = self.datagram_to(
            socket.AF_INET, "0.0.0.0", (socket.AF_INET, "127.0.0.2")
        )
        self.assertEqual(kinds, {(socket.IPPROTO_IP, sources.IP_PKTINFO)})
        [(level, kind, _)] = ancillary
        self.assertEqual((level, kind), (socket.IPPROTO_IP, sources.IP_PKTINFO))

    def test_everyIPv6Address(self) -> None:
        """
        On C{::}, an IPv6 peer's datagram names its destination (IPv4
        peers' too, as IP_PKTINFO: L{BroadcastTests}).
        """
        if not has_ipv6_loopback():
            raise self.skipTest("no IPv6 here")
        kinds, ancillary = self.datagram_to(
            socket.AF_INET6, "::", (socket.AF_INET6, "::1")
        )
        self.assertEqual(
            kinds,
            {
                (socket.IPPROTO_IPV6, sources.IPV6_PKTINFO),
                (socket.IPPROTO_IP, sources.IP_PKTINFO),
            },
        )
        [(level, kind, data)] = ancillary
        self.assertEqual((level, kind), (socket.IPPROTO_IPV6, sources.IPV6_PKTINFO))
        self.assertEqual(data[:16], socket.inet_pton(socket.AF_INET6, "::1"))

    def test_oneAddressOrNoIP(self) -> None:
        """
        A socket bound to one address, or no IP socket: nothing asked, an
        empty set (what the reader looks control messages up in).
        """
        one = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(one.close)
        one.bind(("127.0.0.1", 0))
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(unix.close)
        for sock in (one, unix):
            self.assertEqual(sources.ask_destinations(sock), frozenset(), sock)


class AnswerFromTests(SynchronousTestCase):
    """Which source an answer is given, from the destination's control message."""

    def test_ipv4LocalAddress(self) -> None:
        """
        IPv4's local address (C{ipi_spec_dst}), not the destination: a
        broadcast's destination is no source.
        """
        info = struct.pack("=i4s4s", 3, bytes([10, 0, 0, 5]), bytes([10, 0, 0, 255]))
        self.assertEqual(
            sources.answer_from(socket.IPPROTO_IP, info),
            (
                (
                    socket.IPPROTO_IP,
                    sources.IP_PKTINFO,
                    struct.pack("=i4s4s", 0, bytes([10, 0, 0, 5]), bytes(4)),
                ),
            ),
        )

    def test_ipv6(self) -> None:
        """The destination; the interface only for a link-local one."""
        level, option = socket.IPPROTO_IPV6, sources.IPV6_PKTINFO
        for address, index in (
            ("2001:db8::5", 0),
            ("fe80::5", 3),
            ("febf::5", 3),
            ("fec0::5", 0),  # (fe80::/10 only: both of its bytes count)
            ("fd80::5", 0),
        ):
            packed = socket.inet_pton(socket.AF_INET6, address)
            info = struct.pack("=16si", packed, 3)
            self.assertEqual(
                sources.answer_from(level, info),
                ((level, option, struct.pack("=16si", packed, index)),),
            )
        multicast = socket.inet_pton(socket.AF_INET6, "ff02::1")
        info = struct.pack("=16si", multicast, 3)
        self.assertEqual(sources.answer_from(level, info), ())
        self.assertEqual(sources.answer_from(level, None), ())


class ZoneTests(SynchronousTestCase):
    """A peer's zone, kept in its host and given back to sendto (pure)."""

    def test_linkLocalPeerKeepsItsZone(self) -> None:
        self.assertEqual(
            sources.peer_address(("fe80::1", 9000, 0, 1)), ("fe80::1%lo", 9000)
        )
        self.assertEqual(
            sources.sockaddr_of(("fe80::1%lo", 9000)), ("fe80::1", 9000, 0, 1)
        )

    def test_noZoneAsItWas(self) -> None:
        for address in [("2001:db8::1", 9000, 0, 0), ("10.0.0.1", 9000)]:
            kept = sources.peer_address(address)
            self.assertEqual(kept, address[:2])
            self.assertIs(sources.sockaddr_of(kept), kept)

    def test_goneInterfaceByIndex(self) -> None:
        """An interface gone since: its number stands for its name."""
        gone = 2**31 - 1
        self.assertEqual(
            sources.peer_address(("fe80::1", 1, 0, gone)), (f"fe80::1%{gone}", 1)
        )
        self.assertEqual(
            sources.sockaddr_of((f"fe80::1%{gone}", 1)), ("fe80::1", 1, 0, gone)
        )

    def test_renamedInterfaceByItsIndex(self) -> None:
        """A zone no interface has now, but read as one's: that index."""
        self.addCleanup(sources._NAMES.clear)
        sources._NAMES[7] = "renamed0"
        self.assertEqual(sources.sockaddr_of(("fe80::1%renamed0", 1))[3], 7)
        self.assertEqual(sources.sockaddr_of(("fe80::1%nosuch0", 1))[3], 0)

    def test_nameOfDigitsByItsIndex(self) -> None:
        """
        An interface named in digits (C{1}, index 7, a veth so named) is
        known by its index: a zone of digits is read as an index (here as
        by rules), and its peers' answers went out by index 1.
        """
        self.addCleanup(sources._NAMES.clear)
        sources._NAMES.clear()
        names = {7: "1", 8: "\u00b2"}  # ('²' is a name: policy reads it so)
        real = socket.if_indextoname
        self.patch(
            socket, "if_indextoname", lambda index: names.get(index) or real(index)
        )
        kept = sources.peer_address(("fe80::1", 9000, 0, 7))
        self.assertEqual(kept, ("fe80::1%7", 9000))
        self.assertEqual(sources.sockaddr_of(kept), ("fe80::1", 9000, 0, 7))
        kept = sources.peer_address(("fe80::1", 9000, 0, 8))
        self.assertEqual(kept, ("fe80::1%\u00b2", 9000))
        self.assertEqual(sources.sockaddr_of(kept), ("fe80::1", 9000, 0, 8))

    def test_zoneWithAPercent(self) -> None:
        """A zone is all after the host's first '%' (a name may hold one)."""
        self.addCleanup(sources._NAMES.clear)
        sources._NAMES[7] = "a%b"
        self.assertEqual(sources.sockaddr_of(("fe80::1%a%b", 1)), ("fe80::1", 1, 0, 7))

    def test_namesKeptBounded(self) -> None:
        """
        An index's name is kept (read once), and what is kept is read
        afresh past 256 names.
        """
        self.addCleanup(sources._NAMES.clear)
        sources._NAMES.clear()
        self.assertEqual(sources.zone_name(1), "lo")
        self.assertEqual(sources._NAMES, {1: "lo"})
        sources._NAMES[1] = "kept"  # (read from what is kept, not the kernel)
        self.assertEqual(sources.zone_name(1), "kept")
        sources._NAMES.clear()
        sources._NAMES.update({-n: f"x{n}" for n in range(1, 256)})  # 255 kept
        sources.zone_name(1)
        self.assertEqual(len(sources._NAMES), 256)
        sources.zone_name(1)  # (kept: nothing read)
        self.assertEqual(len(sources._NAMES), 256)
        sources._NAMES.pop(1)
        sources._NAMES[-256] = "x256"  # 256 kept: the next read starts afresh
        self.assertEqual(sources.zone_name(1), "lo")
        self.assertEqual(sources._NAMES, {1: "lo"})
