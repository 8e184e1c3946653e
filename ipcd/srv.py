"""
DNS SRV answers, for routes that name an SRV owner
(C{tcp://_ipc._tcp.example.org/pong}).

Pure: the records of an answer in, the targets to try in RFC 2782's order
out.  No reactor, no sockets; the random choice is injected.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.names import dns

from ipcd.checkers import Expected, Invalid
from ipcd.routes import check_host

# Records of one answer that are kept (the lowest priorities first): a zone
# with thousands of records for a name costs this many, no more.
MAX_RECORDS = 32


class Unavailable(ValueError):
    """An answer that gives no target: said as it is."""


@dataclass(frozen=True)
class SrvRecord:
    """One SRV record: C{target:port}, with its priority and weight."""

    priority: int
    weight: int
    port: int
    target: str

    def as_dict(self) -> dict[str, int | str]:
        return {
            "target": self.target,
            "port": self.port,
            "priority": self.priority,
            "weight": self.weight,
        }


def records_of(
    owner: str, answers: Iterable[dns.RRHeader]
) -> tuple[list[SrvRecord], int]:
    """
    The usable SRV records for C{owner} among C{answers}, the lowest
    priorities first and at most L{MAX_RECORDS} of them, and the smallest TTL
    among them.  A target must be a valid host name (as a literal route's:
    L{check_host}), and its port not 0; others are left out.  Raises
    L{Unavailable} when none is left: the owner is an alias (a CNAME,
    not followed), no SRV records, the target C{.} (RFC 2782: the service
    is decidedly not available), or only bad targets.
    """
    wanted = owner.lower().rstrip(".").encode("ascii")
    kept: list[SrvRecord] = []
    bad: list[str] = []
    decidedly_not = False
    alias: str | None = None
    ttl: int | None = None
    for header in answers:
        if header.name.name.lower().rstrip(b".") != wanted:
            continue
        if header.type == dns.CNAME:
            alias = _shown(header.payload.name.name)
        if header.type != dns.SRV:
            continue
        srv = header.payload
        target = _text(srv.target.name)
        if not target:
            decidedly_not = True
            continue
        try:
            if srv.port == 0:
                raise ValueError("port 0")
            target = check_host(target)
        except ValueError:
            if len(bad) < 3:
                bad.append(f"{target[:64]!r}:{srv.port}")
            continue
        kept.append(SrvRecord(srv.priority, srv.weight, srv.port, target))
        ttl = header.ttl if ttl is None else min(ttl, header.ttl)
    if not kept and alias is not None:
        # SRV records are asked for at the owner; an alias's are not used.
        raise Unavailable(
            f"an alias (CNAME) of {alias}, not followed: name the SRV owner "
            "itself in the route"
        )
    if not kept:
        if bad:
            raise Unavailable(f"no valid target (not host names: {', '.join(bad)})")
        if decidedly_not:
            raise Unavailable("the service is decidedly not available (target '.')")
        raise Unavailable("no SRV records")
    kept.sort(key=lambda r: r.priority)
    assert ttl is not None
    return kept[:MAX_RECORDS], ttl


def _text(name: bytes) -> str:
    """A name from DNS as text: a hostile zone's need not be ASCII."""
    return name.rstrip(b".").decode("ascii", "replace")


def _shown(name: bytes) -> str:
    """A name from DNS, quoted (escaped) and cut, for a message."""
    return repr(_text(name)[:64])


def order(
    records: Sequence[SrvRecord], randint: Callable[[int, int], int]
) -> list[SrvRecord]:
    """
    C{records} in the order to try them (RFC 2782): the lowest priority
    first; within a priority, each next record chosen at random with a
    chance in proportion to its weight.  As the RFC says, weight-0 records
    go first in the running sum, so they are chosen only when the random
    number is 0 (rarely, unless all weigh 0).  C{randint(a, b)} returns an
    integer in [a, b] (C{random.Random.randint}).
    """
    ordered: list[SrvRecord] = []
    for priority in sorted({r.priority for r in records}):
        group = [r for r in records if r.priority == priority]
        group.sort(key=lambda r: r.weight != 0)
        while group:
            chosen = randint(0, sum(r.weight for r in group))
            running = 0
            for index, record in enumerate(group):
                running += record.weight
                if running >= chosen:
                    ordered.append(group.pop(index))
                    break
    return ordered


def clamp(ttl: float, low: float, high: float) -> float:
    """C{ttl} within [C{low}, C{high}]."""
    return max(low, min(high, ttl))


def dns_servers(value: Any) -> tuple[tuple[str, int], ...]:
    """
    A list of DNS server addresses, C{"ADDRESS"} or C{"ADDRESS:PORT"} (an
    IPv6 address in brackets, C{"[::1]:53"}): addresses, as the servers
    themselves cannot be looked up in DNS.
    """
    expected = 'a list of DNS server addresses like "127.0.0.1:5353" or "[::1]"'
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Expected(expected)
    servers = []
    for text in value:
        match = _SERVER.fullmatch(text.strip())
        if match is None:
            raise Invalid(f"DNS server {text!r}: expected ADDRESS or ADDRESS:PORT")
        address = match.group("v6") or match.group("v4")
        port = int(match.group("port") or 53)
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise Invalid(f"DNS server {text!r}: not an IP address") from None
        if not 0 < port < 65536:
            raise Invalid(f"DNS server {text!r}: port must be 1 to 65535")
        servers.append((address, port))
    return tuple(servers)


_SERVER = re.compile(
    r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<v4>[0-9.]+))(?::(?P<port>[0-9]{1,5}))?"
)
