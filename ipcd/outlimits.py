"""
Outbound relays ipcd holds for a client count in C{[limits]}: a udp://
session, a ws:// or wss:// bridge, a tls:// relay each hold descriptors in
ipcd (a socketpair's end, the network socket) for as long as the client
holds its end, and a client with a far side of its own that accepts
everything could open them until ipcd has none.

Each kind is a L{ConnectionLimits} of its own (C{broker.limits_for(kind)}):
per client (its uid; a remote peer's address prefix, one reaching a route
through an inbound daemon) in C{max_connections_per_peer}, all together in
C{max_connections} (ipcd's own uid is exempt from the per-peer maximum, as
everywhere, not from this one).  L{admit} counts one, or refuses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ipcd.errors import BUSY, Refused
from ipcd.host import IDaemonHost
from ipcd.identity import Peer
from ipcd.limits import network_peer_key

if TYPE_CHECKING:
    from twisted.python.failure import Failure


def client_key(client: Peer, config: Any) -> str:
    """
    What C{client}'s relays are counted under: its uid; a remote peer's
    address prefix (a UNIX listener's peer: C{unix:uid=N}).
    """
    if client.uid is not None:
        return f"uid:{client.uid}"
    if client.address is not None:
        ipv4, ipv6 = config.peer_prefix_ipv4, config.peer_prefix_ipv6
        return network_peer_key(client.address[0], ipv4, ipv6)
    return client.key or "unknown"  # (a UNIX listener's peer: unix:uid=N)


def admit(
    broker: IDaemonHost, kind: str, what: str, client: Peer
) -> Callable[[], None]:
    """
    Count one of C{client}'s relays of C{kind} (C{what}: how a refusal
    names them); return what gives its place back (idempotent), or raise
    L{Refused} (C{busy} for a remote peer) at a maximum.
    """
    limits = broker.limits_for(kind)
    if limits.total >= limits.max_total:
        limits.counters[f"{kind}: refused, at the maximum"] += 1
        raise Refused(f"too many {what} (at most {limits.max_total})", public=BUSY)
    key = client_key(client, broker.config)
    reason = limits.admit(key)
    if reason is not None:
        raise Refused(reason, public=BUSY)
    counted = [key]

    def release() -> None:
        if counted:
            limits.release(counted.pop())

    return release


def releasing(release: Callable[[], None]) -> Callable[[Failure], Failure]:
    """An errback that gives the place back (the dial failed) and passes on."""

    def released(failure: Failure) -> Failure:
        release()
        return failure

    return released
