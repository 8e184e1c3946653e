"""
An authoritative DNS server run in-process on loopback, for SRV routes'
tests: twisted.names' own server, serving a BIND zone file (the format the
docs' example uses), on UDP and TCP at one port the kernel picks; it counts
the queries it answers.
"""

from __future__ import annotations

import os
import socket
from collections import Counter
from typing import Any

from twisted.internet import reactor
from twisted.internet.error import CannotListenError
from twisted.names import authority, dns, server
from twisted.trial.unittest import SynchronousTestCase

from ipcd.test.support import short_rundir

ORIGIN = "example.test"


class CountingZone(authority.BindAuthority):
    """A zone file's records; C{queries} counts the questions, by name."""

    def __init__(self, path: str) -> None:
        self.queries: Counter[str] = Counter()
        super().__init__(path)

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any = None) -> Any:
        self.queries[name.decode().lower()] += 1
        return super()._lookup(name, cls, type, timeout)


def zone_text(records: str, ttl: int = 60) -> str:
    """A zone file for ORIGIN with C{records} (lines relative to it)."""
    return (
        f"$ORIGIN {ORIGIN}.\n"
        f"$TTL {ttl}\n"
        "@ IN SOA ns.example.test. hostmaster.example.test. 1 3600 600 86400 10\n"
        "@ IN NS ns.example.test.\n"
        "ns IN A 127.0.0.1\n"
        f"{records}"
    )


class _QuietServerDatagrams(dns.DNSDatagramProtocol):
    # The server is the test's: its "Starting/Stopping protocol" lines must
    # not pass for ipcd's (StrayMessageTests counts those), nor arrive in a
    # later test (the port given up in _listen stops a reactor turn late).
    noisy = False


class DnsServer:
    """The running server: its C{port} and C{zone} (swap it with L{serve})."""

    def __init__(self, case: SynchronousTestCase, records: str) -> None:
        self.directory = short_rundir(case, "ipcd-dns-")
        self.factory = server.DNSServerFactory(authorities=[])
        self.serve(records)
        self.port = self._listen(case)

    def serve(self, records: str, ttl: int = 60) -> CountingZone:
        """Serve these records from now on (a new zone: counts start at 0)."""
        return self.serve_zone(zone_text(records, ttl))

    def serve_zone(self, text: str) -> CountingZone:
        """Serve the zone file C{text} from now on."""
        path = os.path.join(self.directory, "zone")
        with open(path, "w") as f:
            f.write(text)
        self.zone = CountingZone(path)
        self.factory.resolver.resolvers = [self.zone]
        self.factory.canRecurse = False
        return self.zone

    def _listen(self, case: SynchronousTestCase) -> int:
        for _ in range(20):
            udp = reactor.listenUDP(
                0, _QuietServerDatagrams(self.factory), interface="127.0.0.1"
            )
            port = udp.getHost().port
            try:
                tcp = reactor.listenTCP(port, self.factory, interface="127.0.0.1")
            except CannotListenError:
                udp.stopListening()
                continue
            case.addCleanup(udp.stopListening)
            case.addCleanup(tcp.stopListening)
            return port
        raise AssertionError("no port free for both UDP and TCP")

    @property
    def address(self) -> str:
        """As C{[dns] servers} names it."""
        return f"127.0.0.1:{self.port}"

    def queries(self, owner: str) -> int:
        return self.zone.queries[owner.lower()]


def refused_port() -> int:
    """A loopback TCP port nobody listens on (connecting is refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def silent_port(case: SynchronousTestCase) -> int:
    """
    A loopback TCP port that accepts connections (the kernel completes
    them) but never answers a byte: a target that does not answer.
    """
    sock = socket.socket()
    case.addCleanup(sock.close)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock.getsockname()[1]


def full_backlog_port(case: SynchronousTestCase) -> int:
    """
    A loopback TCP port whose accept queue is full: connecting does not
    complete (the kernel drops the SYNs), a target that does not answer at all.
    """
    sock = socket.socket()
    case.addCleanup(sock.close)
    sock.bind(("127.0.0.1", 0))
    sock.listen(0)
    filler = socket.create_connection(sock.getsockname(), timeout=10)
    case.addCleanup(filler.close)
    return sock.getsockname()[1]
