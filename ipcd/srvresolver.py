"""
The DNS resolver SRV routes ask: twisted.names' client, made quiet.

twisted.names' own resolver logs a line for each message it cannot read
(C{Truncated packet}, C{Invalid packet}) and each one answering nothing it
asked (C{Unexpected message}): on the UDP port a query waits on, bound to
every interface for as long as it waits (4 s with a silent server), and on
the TCP connection a truncated answer opens.  Whoever can send that port a
datagram (any local user, a remote host), or the DNS server itself, wrote
ipcd's log at will.  Here each query's UDP socket is connected to the server
it asks, so the kernel drops anybody else's datagrams; and a message that
answers no query in flight (or cannot be read) is dropped and counted
(C{dns messages ignored}), never logged.
"""

from __future__ import annotations

import errno
from collections import Counter
from collections.abc import Sequence
from typing import Any

from twisted.internet.abstract import isIPv6Address
from twisted.internet.defer import Deferred, TimeoutError, ensureDeferred, fail
from twisted.internet.error import CannotListenError
from twisted.names import client, dns

# What the status counts dropped messages as.
IGNORED = "dns messages ignored"
# Random source ports tried for a query before giving up (twisted.names' bound).
PORT_TRIES = 1000


def answers_a_query(protocol: dns.DNSMixin, data: bytes) -> bool:
    """Whether C{data} is a DNS message answering a query C{protocol} awaits."""
    if int.from_bytes(data[:2], "big") not in protocol.liveMessages:
        return False  # its id (the first two bytes) is none asked: not read
    # Read whole once here, and again by twisted.names for the one answer
    # taken (a few ms for a 20 KiB one, cached for its TTL): it logs what
    # it cannot read.
    message = dns.Message()
    try:
        message.fromStr(data)
    except Exception:
        return False  # whatever a hostile message makes the parser raise
    return message.id in protocol.liveMessages


class _QuietDatagrams(dns.DNSDatagramProtocol):
    noisy = False  # no "Starting protocol" line per query

    def datagramReceived(self, data: bytes, addr: Any) -> None:  # noqa: N802 (Twisted's)
        if answers_a_query(self, data):
            super().datagramReceived(data, addr)
        else:
            self.controller.ignore()


class _QuietStream(dns.DNSProtocol):
    def stringReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's)
        if answers_a_query(self, data):
            super().stringReceived(data)
        else:
            self.controller.ignore()


class _QuietStreams(client.DNSClientFactory):
    noisy = False

    def buildProtocol(self, addr: Any) -> _QuietStream:  # noqa: N802 (Twisted's)
        protocol = _QuietStream(self.controller)
        protocol.factory = self
        return protocol


def _end(protocol: _QuietDatagrams) -> None:
    """
    Close C{protocol}'s port, and end the timeouts of the queries it still
    waits for (one given up, its clients gone): twisted.names would keep
    each until it is due.
    """
    for _answer, timeout in protocol.liveMessages.values():
        if timeout.active():
            timeout.cancel()
    protocol.transport.stopListening()


class QuietResolver(client.Resolver):
    """
    A L{client.Resolver} asking C{servers} (addresses) on C{reactor}, whose
    dropped messages are counted in C{counters}.
    """

    def __init__(
        self,
        servers: Sequence[tuple[str, int]],
        reactor: Any,
        counters: Counter[str] | None = None,
    ) -> None:
        super().__init__(servers=list(servers), reactor=reactor)
        self.factory = _QuietStreams(self, self.timeout)
        self.udp_reactor = reactor
        self.counters: Counter[str] = Counter() if counters is None else counters

    def ignore(self) -> None:
        """A message that answers nothing asked: counted, not logged."""
        self.counters[IGNORED] += 1

    def queryUDP(  # noqa: N802 (Twisted's)
        self, queries: list[dns.Query], timeout: Sequence[float] | None = None
    ) -> Deferred[dns.Message]:
        # As twisted.names': each server in turn, then each again with the
        # next timeout; each try on a new random port.
        servers = [*self.servers, *self.dynServers]
        if not servers:
            return fail(OSError("no DNS servers to ask"))
        return ensureDeferred(self._ask(queries, timeout or self.timeout, servers))

    async def _ask(
        self,
        queries: list[dns.Query],
        timeouts: Sequence[float],
        servers: list[tuple[str, int]],
    ) -> dns.Message:
        asked_id = None  # a try again asks under the first try's id
        for seconds in timeouts:
            for server in servers:
                protocol = self._datagrams(server)
                try:
                    return await protocol.query(server, queries, seconds, asked_id)
                except dns.DNSQueryTimeoutError as e:
                    asked_id = e.id
                finally:
                    _end(protocol)
        raise TimeoutError(queries)

    def _datagrams(self, server: tuple[str, int]) -> _QuietDatagrams:
        """A protocol on a random port, connected to C{server} if it can be."""
        interface = "::" if isIPv6Address(server[0]) else ""
        protocol = self._listening(interface)
        try:
            protocol.transport.connect(*server)
        except OSError:
            # A link-local address with its scope cannot be connected to:
            # unconnected then, as twisted.names' own (messages still sifted).
            protocol.transport.stopListening()
            protocol = self._listening(interface)
        return protocol

    def _listening(self, interface: str) -> _QuietDatagrams:
        protocol = _QuietDatagrams(self, reactor=self.udp_reactor)
        tries = 0
        while True:
            try:
                self.udp_reactor.listenUDP(
                    dns.randomSource(), protocol, interface=interface
                )
                return protocol
            except CannotListenError as e:
                tries += 1
                emfile = getattr(e.socketError, "errno", None) == errno.EMFILE
                if emfile or tries >= PORT_TRIES:
                    raise
