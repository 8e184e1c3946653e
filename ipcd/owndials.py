"""
Connections ipcd is dialling itself, so that a request that went out
through a protocol daemon and came back in on this very ipcd is known.

A route may send a request to a daemon that is this ipcd's own (a literal
route to its own port, or a DNS zone that names this host among an SRV
owner's targets).  Served here, that is a round trip through loopback and
harmless; routed out again, it is a loop that only the connection limits
end (128 hops from one request, measured).  L{OwnDials} holds the local
end of each connection a dialler has open until the far side has answered
its request, which is when that far side (if it is this ipcd) decides.
Ends are kept by transport, address and port: TCP's ports are not UDP's,
and a TCP peer on this host (another program, another ipcd) whose port is
that of one of udpd's dials is no dial of ours (it was refused as a loop
while ends were kept without their transport).

Ends are kept without their zone (C{fe80::1%eth0} as C{fe80::1}): a dial
may leave by one interface and come back in by another of the same link
(a veth pair with both ends on this host, two NICs on one switch), and
then its two ends' zones differ (measured: out of one end of a veth pair,
in at the other, whose zone the peer has:
L{ipcd.test.test_netns.OwnDialsAcrossLinksTests}).  Kept
with its zone, such a dial would not be known, and a loop through it would
go round until the limits stopped it.  What the zone-blind key costs: a
peer of another link that took a link-local address and port of a dial
in flight is taken for ours, and its own request, if routed on, refused.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import Counter
from typing import Any

# (IP address, port, "tcp" or "udp")
Address = tuple[str, int, str]


def address_of(host: str, port: int, transport: str = "tcp") -> Address:
    """An IP address and port of C{transport}, as both ends see it."""
    return _address(host), port, transport


# Every remote peer's address is parsed (identity.remote_peer): once per
# address, not per connection; bounded, as a peer may have many.
@functools.lru_cache(maxsize=1024)
def _address(host: str) -> str:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    mapped = getattr(ip, "ipv4_mapped", None)  # a dual-stack listener's view
    return str(mapped or ip)


class OwnDials:
    """The local ends (host, port) of this ipcd's connections being dialled."""

    def __init__(self) -> None:
        self._ends: Counter[Address] = Counter()

    def add(self, sockname: Any, transport: str = "tcp") -> Address | None:
        """
        Hold C{sockname} (a socket's C{getsockname()}) of C{transport}
        (C{"tcp"} or C{"udp"}); what to L{discard}.
        """
        try:
            end = address_of(sockname[0], sockname[1], transport)
        except (IndexError, TypeError):
            return None  # not an IP socket: nothing of ours to come back
        self._ends[end] += 1
        return end

    def discard(self, end: Address | None) -> None:
        """The far side has answered (or the dial failed): let C{end} go."""
        if end is None:
            return
        self._ends[end] -= 1
        if self._ends[end] <= 0:
            del self._ends[end]

    def hold_until(self, local: Any, answered: Any) -> None:
        """
        Hold C{local} (a TCP connection's Twisted address: C{host},
        C{port}) until the Deferred C{answered} fires; nothing if it has
        already.
        """
        if answered.called:
            return
        end = self.add((local.host, local.port))

        def let_go(result: Any) -> Any:
            self.discard(end)
            return result

        answered.addBoth(let_go)

    def __contains__(self, end: object) -> bool:
        return end in self._ends

    def __len__(self) -> int:
        return len(self._ends)
