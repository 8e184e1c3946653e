"""
The bidirectional relay: two connections joined byte for byte.

One interface, L{IRelayEngine}, and two engines that provide it, both run
by the reactor (no thread of their own):

  - L{SocketRelays} (L{ipcd.relay.sockets}), the fast path, joins two
    connected raw sockets on the reactor's own poller; a socket may carry
    a codec (TLS: tlsd's relays are this engine too).  tcpd, tlsd, udpd and
    websocketd use it.
  - L{TransportRelays} (L{ipcd.relay.transports}) joins two Twisted
    transports through a pair of L{RelayProtocol}s.

Both behave alike: at most one read (or one transport's buffer) held per
direction, so a slow receiver pushes back on a fast sender instead of
growing ipcd's memory; an EOF is a half-close passed on after the bytes
before it; a reset on either side closes both; a relay on which nothing
moves for its idle deadline is closed (L{ipcd.relay.idle}); and
L{RelayStats} (L{ipcd.relay.stats}) counts the bytes, lists the relay in
its C{registry} while it lives and calls C{on_end} once when it ends.
Every engine's C{join} starts alike (L{ipcd.relay.engine.RelayEngine}),
the fake one in L{ipcd.testing} too.
"""

from ipcd.relay.engine import ICodec, IRelayEngine, Join, RelayEnded, RelayEngine
from ipcd.relay.idle import SWEEP_INTERVAL, IdleSweep
from ipcd.relay.sides import MAX_PIPES, READ_SIZE, SPLICE_AT, Side, take_socket
from ipcd.relay.sockets import SocketRelays
from ipcd.relay.stats import RelayStats, began, ended
from ipcd.relay.transports import RelayProtocol, TransportRelays, pair

__all__ = [
    "MAX_PIPES",
    "READ_SIZE",
    "SPLICE_AT",
    "SWEEP_INTERVAL",
    "ICodec",
    "IRelayEngine",
    "IdleSweep",
    "Join",
    "RelayEnded",
    "RelayEngine",
    "RelayProtocol",
    "RelayStats",
    "Side",
    "SocketRelays",
    "TransportRelays",
    "began",
    "ended",
    "pair",
    "take_socket",
]
