"""
Fair limits on listeners: so many connections in all, so many per peer.

One L{ConnectionLimits} per listener counts its live connections, in all and
per peer key (C{uid:1000} on UNIX listeners, from SO_PEERCRED at accept; the
address prefix on network listeners).  A peer at its maximum is refused at
once, so one peer cannot starve the others.  At the listener's maximum the
listener stops accepting until a connection ends: new clients wait in the
kernel's backlog, within their own deadlines.

Refusals and the accept errors Twisted logs on EMFILE are counted, and logged
at a bounded rate (L{RateLimitedObserver}), so a flood cannot fill the disk.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import (
    IFileDescriptorReceiver,
    IHalfCloseableProtocol,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.logger import ILogObserver, Logger, globalLogPublisher
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import directlyProvides, implementer, providedBy

from ipcd.compat import twisted as compat_twisted
from ipcd.identity import credentials
from ipcd.nodescriptors import ClosesDescriptors
from ipcd.sockets import discard_unread
from ipcd.wire import LOG_LINES_DROPPED

# A refused peer has this long to read its refusal and close; then it is cut.
REFUSAL_GRACE = 1.0
# Refused connections given that grace at once, per listener and per peer
# (they are not counted under the limits meanwhile): past these, a refused
# connection is closed at once, and its refusal may be lost.
MAX_LINGERING = 64
MAX_LINGERING_PER_PEER = 8
# At most this many log lines per listener per LOG_PERIOD seconds.
LOG_BURST = 5
LOG_PERIOD = 10.0


@implementer(ILogObserver)
class RateLimitedObserver:
    """
    Passes events on to C{observer}, at most C{burst} per C{period} seconds.
    Those left out are counted (in all, in C{counters} when given), and
    said in one more line: at the end of the period (timed on C{clock}), or
    with the first event after it.
    """

    def __init__(
        self,
        observer: ILogObserver,
        clock: IReactorTime,
        burst: int = LOG_BURST,
        period: float = LOG_PERIOD,
        counters: Counter[str] | None = None,
    ) -> None:
        self._observer = observer
        self._counters = counters
        self._clock = clock
        self._burst = burst
        self._period = period
        self._window = float("-inf")
        self._passed = 0
        self.dropped = 0  # in the current window, not yet reported
        self._last: dict[str, Any] | None = None  # the last one left out
        self._summary: Any = None  # the end-of-period call, while one is due

    def __call__(self, event: dict[str, Any]) -> None:
        now = self._clock.seconds()
        if now - self._window >= self._period:
            self._window, self._passed = now, 0
            if self.dropped:
                self._say_dropped(event, "{ipcd_dropped} similar log lines left out; ")
                self._passed += 1
                return
        if self._passed < self._burst:
            self._passed += 1
            self._observer(event)
            return
        self.dropped += 1
        if self._counters is not None:
            self._counters[LOG_LINES_DROPPED] += 1
        self._last = event
        if self._summary is None:
            due = self._window + self._period - now
            self._summary = self._clock.callLater(max(due, 0), self._end_of_period)

    def flush(self) -> None:
        """Say now how many were left out, if any (a listener stops)."""
        if self._summary is not None:
            self._summary.cancel()
            self._summary = None
            self._end_of_period()

    def _end_of_period(self) -> None:
        self._summary = None
        if self.dropped and self._last is not None:
            # Said now (log_time), about the last one left out.
            self._say_dropped(
                {**self._last, "log_time": time.time()},
                "{ipcd_dropped} similar log lines left out in {ipcd_period:g} s; "
                "the last: ",
            )

    def _say_dropped(self, event: dict[str, Any], prefix: str) -> None:
        """C{event}, prefixed with how many were left out (and forgotten)."""
        if self._summary is not None:
            self._summary.cancel()
            self._summary = None
        dropped, self.dropped, self._last = self.dropped, 0, None
        self._observer(
            {
                **event,
                "log_format": prefix + event.get("log_format", ""),
                "ipcd_dropped": dropped,
                "ipcd_period": self._period,
            }
        )


class ConnectionLimits:
    """
    The live connections of one listener, in all and per peer key.  The
    maxima are attributes, so a reload can change them for new connections.
    """

    def __init__(
        self,
        name: str,
        max_total: int,
        max_per_peer: int,
        clock: IReactorTime,
        counters: Counter[str] | None = None,
        observer: ILogObserver | None = None,
        exempt: frozenset[str] = frozenset(),
    ) -> None:
        self.name = name
        # Peers counted in the total but never held to the per-peer maximum.
        self.exempt = exempt
        self.max_total = max_total
        # A lower maximum of the listener's service's own (websocketd's
        # max_connections), read when used so a reload applies; 0: none.
        self.service_maximum: Callable[[], int] | None = None
        self.max_per_peer = max_per_peer
        self.total = 0
        self.per_peer: Counter[str] = Counter()
        self.counters: Counter[str] = Counter() if counters is None else counters
        self.clock = clock
        self.rate_limited = RateLimitedObserver(
            observer or globalLogPublisher, clock, counters=self.counters
        )
        self.log = Logger(namespace=f"ipcd.limits.{name}", observer=self.rate_limited)
        self.port: Any = None  # set once listening: paused at max_total
        self._paused = False
        # Refused connections in their grace: their timers and peer keys.
        self._cuts: dict[Any, tuple[Any, str]] = {}
        self._lingering: Counter[str] = Counter()  # of them, per peer key

    def has_room(self, key: str, spare: int = 0) -> bool:
        """
        Whether L{admit} would admit a connection from C{key} now and leave
        at least C{spare} more places in all before the maximum; nothing is
        counted.  For a connection served and gone at once, which need not
        be counted while the limits are far off.
        """
        return self.total + spare < self._maximum() and not self._peer_full(key)

    def status(self) -> dict[str, Any]:
        """
        What C{ipcd status} says of them: connections open now, the maxima
        in force, and the peer with the most (how near it is to its own).
        """
        busiest = max(self.per_peer.items(), key=lambda item: item[1], default=None)
        return {
            "open": self.total,
            "max": self._maximum(),
            "max_per_peer": self.max_per_peer,
            "busiest": None
            if busiest is None
            else {
                "peer": busiest[0],
                "open": busiest[1],
                # ipcd's own uid: not held to max_per_peer.
                "exempt": busiest[0] in self.exempt,
            },
        }

    def _maximum(self) -> int:
        """Connections at once, past which the listener stops accepting."""
        if self.service_maximum is None:
            return self.max_total
        own = self.service_maximum()
        return min(own, self.max_total) if own > 0 else self.max_total

    def _peer_full(self, key: str) -> bool:
        return self.per_peer.get(key, 0) >= self.max_per_peer and key not in self.exempt

    def admit(self, key: str) -> str | None:
        """Count a new connection from C{key}; or say why it is refused."""
        if self._peer_full(key):
            self.counters[f"{self.name}: refused, per-peer limit"] += 1
            reason = f"too many connections from {key} (at most {self.max_per_peer})"
            self.log.warn("{listener}: {reason}", listener=self.name, reason=reason)
            return reason
        self.per_peer[key] += 1
        self.total += 1
        if self.total >= self._maximum() and self.port is not None and not self._paused:
            self._paused = True
            self.port.stopReading()
            self.counters[f"{self.name}: paused at the connection limit"] += 1
            self.log.warn(
                "{listener}: {total} connections, the maximum: not accepting more "
                "until one ends",
                listener=self.name,
                total=self.total,
            )
        return None

    def release(self, key: str) -> None:
        """A connection admitted for C{key} has ended."""
        self.total -= 1
        left = self.per_peer[key] - 1
        if left > 0:
            self.per_peer[key] = left
        else:
            del self.per_peer[key]
        if self._paused and self.total < self._maximum():
            self._paused = False
            if self.port.connected:  # not once it has stopped listening
                self.port.startReading()

    def refuse(self, transport: Any, refusal: bytes, key: str = "") -> None:
        """
        Answer C{refusal} and end the connection without a reset: what the
        peer has sent is read and dropped, the answer is followed by an EOF,
        and the peer has L{REFUSAL_GRACE} seconds to close before it is cut.
        Closing at once with the peer's request unread would reset the
        connection, and the peer could lose the answer.  Past
        L{MAX_LINGERING} such connections (L{MAX_LINGERING_PER_PEER} of
        C{key}'s), it is closed at once: a peer connecting fast would
        otherwise hold a descriptor per connection it opens in a second.
        """
        lingering = self._lingering
        if len(self._cuts) >= MAX_LINGERING or lingering[key] >= MAX_LINGERING_PER_PEER:
            transport.abortConnection()
            return
        discard_unread(transport)
        if refusal:
            transport.write(refusal)
        # TLS (websocketd's ssl: listener, the limits inside it) cannot
        # half-close: it closes once the refusal is sent, after the
        # peer's handshake, or at the cut.
        half_close = getattr(transport, "loseWriteConnection", None)
        if half_close is None:
            transport.loseConnection()
        else:
            half_close()
        cut = self.clock.callLater(REFUSAL_GRACE, transport.abortConnection)
        self._cuts[transport] = (cut, key)
        lingering[key] += 1

    def refused_gone(self, transport: Any) -> None:
        """A refused connection has ended: no need to cut it."""
        held = self._cuts.pop(transport, None)
        if held is None:
            return
        cut, key = held
        if cut.active():
            cut.cancel()
        left = self._lingering[key] - 1
        if left > 0:
            self._lingering[key] = left
        else:
            del self._lingering[key]

    def listening(self, port: Any) -> Any:
        """Watch C{port}: its accept errors are logged at a bounded rate."""
        self.port = port
        observer = self.log.observer
        # Twisted's accept loop logs every EMFILE through the port's logger.
        compat_twisted.count_accept_errors(
            port,
            lambda logger: Logger(
                namespace=logger.namespace, observer=self._accept_error(observer)
            ),
        )
        return port

    def _accept_error(self, observer: ILogObserver) -> Callable[[Any], None]:
        def count(event: dict[str, Any]) -> None:
            self.counters[f"{self.name}: accept errors"] += 1
            observer(event)

        return count


def own_uid_key() -> frozenset[str]:
    """
    ipcd's own uid, as UNIX listeners see it: every connection ipcd makes
    (relays, and the connections it hands over to clients, which keep the
    credentials of the process that connected) comes from it, so it is
    exempt from the per-peer maximum.
    """
    return frozenset({f"uid:{os.geteuid()}"})


def unix_peer_key(transport: Any) -> str:
    """C{uid:N} of a UNIX transport's peer."""
    try:
        return f"uid:{credentials(transport.getHandle())[1]}"
    except (OSError, AttributeError):
        return "uid:unknown"


def network_peer_key(address: Any, ipv4_prefix: int, ipv6_prefix: int) -> str:
    """
    The address prefix a network peer is counted under (C{10.1.2.3/32});
    a link-local peer's on its link (C{fe80::%eth0/64}).
    """
    return _prefix_key(getattr(address, "host", str(address)), ipv4_prefix, ipv6_prefix)


# Parsing an address is most of a connection's admission (ipaddress: about
# 13 us); peers come again and again from few addresses.  Bounded: a peer
# with many addresses only costs each its parse, as before.
@functools.lru_cache(maxsize=1024)
def _prefix_key(host: str, ipv4_prefix: int, ipv6_prefix: int) -> str:
    address, _, zone = host.partition("%")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return f"ip:{host}"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = ipv4_prefix if ip.version == 4 else ipv6_prefix
    network = ipaddress.ip_network(f"{ip}/{prefix}", strict=False)
    if zone:
        # A zoned (link-local) address names a host only on its link, and
        # any host of any link may take any: without the zone, every
        # link-local peer of every interface was one peer (fe80::/64), and
        # one of them could use up the others' share.  Written as an ip:
        # pattern writes a zoned network.
        return f"ip:{network.network_address}%{zone}/{prefix}"
    return f"ip:{network}"


class _Release:
    """
    Gives a handed-off connection's place back: a relay's C{on_end}, kept
    for the relay's life (so small: no closure and its cells).
    """

    __slots__ = ("limits", "key")

    def __init__(self, limits: ConnectionLimits, key: str) -> None:
        self.limits = limits
        self.key = key

    def __call__(self) -> None:
        self.limits.release(self.key)


def _nothing_held() -> None:
    """C{handOff}'s answer for a connection that counts nowhere."""


class _LimitedProtocol(ClosesDescriptors, ProtocolWrapper):
    """Admitted or refused when the connection is made; released when lost."""

    key: str | None = None
    _handedOff = False

    def makeConnection(self, transport: Any) -> None:  # noqa: N802
        factory: LimitedFactory = self.factory
        key = factory.peer_key(transport)
        reason = factory.limits.admit(key)
        if reason is not None:
            self.transport = transport
            factory.limits.refuse(transport, factory.refusal(reason), key)
            return
        # One string per peer, not per connection: relays keep it long.
        self.key = sys.intern(key)
        super().makeConnection(transport)
        # Half-close reaches the wrapped protocol only if it wants it.  As
        # alsoProvides would, but from the transport's declaration again:
        # zope.interface keeps that combination once, where alsoProvides
        # works out this instance's anew (about 30 us per connection).
        if IHalfCloseableProtocol.providedBy(self.wrappedProtocol):
            directlyProvides(self, providedBy(transport), IHalfCloseableProtocol)

    def handOff(self) -> Callable[[], None]:  # noqa: N802
        """
        The connection's socket leaves its Twisted transport (a relay takes
        it): it still counts until the returned function is called.  (It
        leaves the factory's registry with the socket:
        L{ipcd.relay.sides.take_socket}.)
        """
        key, self.key = self.key, None
        self._handedOff = True
        if key is None:
            return _nothing_held
        return _Release(self.factory.limits, key)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.key is not None:
            super().dataReceived(data)

    def fileDescriptorReceived(self, descriptor: int) -> None:  # noqa: N802
        # The wrapped protocol's, if it takes them; else closed unsaid.
        if self.key is not None and IFileDescriptorReceiver.providedBy(
            self.wrappedProtocol
        ):
            self.wrappedProtocol.fileDescriptorReceived(descriptor)
        else:
            super().fileDescriptorReceived(descriptor)

    def readConnectionLost(self) -> None:  # noqa: N802
        self.wrappedProtocol.readConnectionLost()

    def writeConnectionLost(self) -> None:  # noqa: N802
        self.wrappedProtocol.writeConnectionLost()

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        if self.key is None:
            if not self._handedOff:
                self.factory.limits.refused_gone(self.transport)
            return
        self.factory.limits.release(self.key)
        self.key = None
        super().connectionLost(reason)


class LimitedFactory(WrappingFactory):
    """
    Wraps any factory: connections over its L{ConnectionLimits} are refused
    with C{refusal(reason)} (bytes, or nothing) and closed.
    """

    protocol = _LimitedProtocol
    noisy = False

    def stopFactory(self) -> None:  # noqa: N802 (Twisted's name)
        super().stopFactory()
        self.limits.rate_limited.flush()  # what it left out, said now

    def __init__(
        self,
        wrapped: Any,
        limits: ConnectionLimits,
        peer_key: Callable[[Any], str] = unix_peer_key,
        refusal: Callable[[str], bytes] = lambda reason: b"",
    ) -> None:
        super().__init__(wrapped)
        self.limits = limits
        self.peer_key = peer_key
        self.refusal = refusal


@implementer(IStreamServerEndpoint)
class LimitedEndpoint:
    """An endpoint whose listening port its L{ConnectionLimits} may pause."""

    def __init__(self, endpoint: Any, limits: ConnectionLimits) -> None:
        self._endpoint = endpoint
        self.limits = limits

    def listen(self, factory: Any) -> Any:
        return self._endpoint.listen(factory).addCallback(self.limits.listening)

    def __getattr__(self, name: str) -> Any:
        # The wrapped endpoint's other attributes (its socket path, ...).
        return getattr(self._endpoint, name)
