"""
Tests for L{ipcd.sockets.resolve_host}: names resolved by the reactor's
C{nameResolver}, and what tcpd's L{dial} says when there is no address.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import ensureDeferred
from twisted.internet.interfaces import IHostnameResolver
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from ipcd.daemons.tcp import dial
from ipcd.errors import Refused
from ipcd.sockets import resolve_host


@implementer(IHostnameResolver)
class FakeResolver:
    """Resolves every name to C{addresses}, at once; records the asks."""

    def __init__(self, *addresses: Any) -> None:
        self.addresses = addresses
        self.asked: list[tuple[str, int]] = []

    def resolveHostName(  # noqa: N802 (Twisted's name)
        self,
        receiver: Any,
        hostName: str,  # noqa: N803
        portNumber: int = 0,  # noqa: N803
        addressTypes: Any = None,  # noqa: N803
        transportSemantics: str = "TCP",  # noqa: N803
    ) -> Any:
        self.asked.append((hostName, portNumber))
        receiver.resolutionBegan(None)
        for address in self.addresses:
            receiver.addressResolved(address)
        receiver.resolutionComplete()


class FakeReactor:
    def __init__(self, resolver: FakeResolver) -> None:
        self.nameResolver = resolver


class ResolveHostTests(SynchronousTestCase):
    def test_addressesInOrder(self) -> None:
        resolver = FakeResolver(
            IPv6Address("TCP", "::1", 9000, 0, 0), IPv4Address("TCP", "10.0.0.2", 9000)
        )
        found = self.successResultOf(
            ensureDeferred(resolve_host(FakeReactor(resolver), "h.example", 9000))
        )
        self.assertEqual(
            found,
            [
                (socket.AF_INET6, ("::1", 9000, 0, 0)),
                (socket.AF_INET, ("10.0.0.2", 9000)),
            ],
        )
        self.assertEqual(resolver.asked, [("h.example", 9000)])

    def test_noAddress(self) -> None:
        """tcpd's dial says which name, as before: C{cannot resolve 'x': ...}."""
        resolver = FakeResolver()
        failure = self.failureResultOf(
            ensureDeferred(dial(FakeReactor(resolver), "nosuch.invalid", 9000, "p")),
            Refused,
        )
        self.assertEqual(
            failure.value.reason, "cannot resolve 'nosuch.invalid': no address found"
        )

    def test_idnaCheckedFirst(self) -> None:
        """A name the resolver's codec cannot encode never reaches it."""
        resolver = FakeResolver()
        self.failureResultOf(
            ensureDeferred(resolve_host(FakeReactor(resolver), "a..b", 1)),
            UnicodeError,
        )
        self.assertEqual(resolver.asked, [])


class RealResolverTests(TestCase):
    def test_localhost(self) -> Any:
        """The reactor's own resolver (getaddrinfo in its thread pool)."""
        d = ensureDeferred(resolve_host(reactor, "localhost", 9))
        d.addCallback(
            lambda found: self.assertIn(
                found[0],
                [(socket.AF_INET, ("127.0.0.1", 9))]
                + [(socket.AF_INET6, ("::1", 9, 0, 0))],
            )
        )
        return d
