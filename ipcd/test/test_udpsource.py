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
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ipcd.daemons.udp import source as sources
from ipcd.test.support import bounce, lookup
from ipcd.test.test_udp import B_RULES, OK, has_ipv6_loopback
from ipcd.test.udpsupport import start_udp_host
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
        for address, index in (("2001:db8::5", 0), ("fe80::5", 3), ("febf::5", 3)):
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
