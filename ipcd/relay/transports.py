"""
Relays between two Twisted transports (TLS, WebSocket, UDP sessions,
anything with a transport): L{TransportRelays} joins a pair of
L{RelayProtocol}s that register producers both ways, as Twisted's
C{portforward} does.  It keeps the promises of every engine: at most one
transport's buffer held per direction, an EOF passed on as a half-close
after the bytes before it, a reset on either side closes both, and an idle
deadline closes a relay on which nothing moves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from ipcd.compat import twisted as compat_twisted
from ipcd.nodescriptors import ClosesDescriptors
from ipcd.relay.engine import IRelayEngine, Join, RelayEngine
from ipcd.relay.idle import log_idle
from ipcd.relay.stats import RelayStats, ended


@implementer(IHalfCloseableProtocol)
class RelayProtocol(ClosesDescriptors, Protocol, TimeoutMixin):
    """
    One side of a relay between two Twisted transports: what its transport
    reads goes to its peer's transport.  Pair two with L{TransportRelays}
    (or L{pair}), and connect them however they connect (a listening
    factory, an endpoint, a TLS or WebSocket wrapper).

    Backpressure: once both are connected, each transport is registered as
    the (streaming) producer of the other, so a transport whose buffer
    fills pauses reading its peer.  Half-close: an EOF on one side is
    passed on with the other's C{loseWriteConnection} after its buffer
    (or C{loseConnection}, for a transport that cannot half-close).
    Teardown: when one side's connection is lost, the other is closed
    (after its buffer on a clean close, at once on an error), and the relay
    ends once both are gone.

    Hooks for subclasses: L{relayed} sees every chunk passed on (it counts
    them, and restarts the idle deadline); L{timeoutConnection} runs when
    the idle deadline passes; L{relayEnded} once the relay has ended.
    """

    log = Logger()

    def __init__(self, stats: RelayStats | None = None, clock: Any = None) -> None:
        self.stats = stats if stats is not None else RelayStats()
        self.peer: RelayProtocol | None = None
        self.forward = False  # what this side reads counts as stats.forward
        self.clock = clock
        self.idle_timeout = 0.0
        self.outgoing = b""  # written to this side first, once both connect
        self.started = False
        self.lost = False
        self.readDone = False  # our far end sent EOF
        self._held: list[bytes] = []  # read before the peer was connected

    def callLater(self, period: float, func: Callable[[], Any]) -> Any:  # noqa: N802
        if self.clock is None:
            return TimeoutMixin.callLater(self, period, func)
        return self.clock.callLater(period, func)

    # Connection.

    def connectionMade(self) -> None:  # noqa: N802 (Twisted's name)
        peer = self.peer
        if peer is None or peer.lost:
            self.transport.loseConnection()
            return
        if peer.transport is not None and not peer.started:
            _start(peer, self)
        else:
            # Until the peer is connected, nothing to send to.
            self.transport.pauseProducing()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        if not self.started:
            self._held.append(data)
            return
        self.relayed(data)
        assert self.peer is not None
        self.peer.transport.write(data)

    def relayed(self, data: bytes) -> None:
        """C{data} goes on to the peer: count it; the relay is not idle."""
        if self.forward:
            self.stats.forward += len(data)
        else:
            self.stats.backward += len(data)
        self.resetTimeout()
        if self.peer is not None:
            self.peer.resetTimeout()

    def readConnectionLost(self) -> None:  # noqa: N802 (Twisted's name)
        """Our far end sent EOF: pass it on after what the peer still holds."""
        self.readDone = True
        peer = self.peer
        if peer is None or peer.lost or peer.transport is None:
            self.transport.loseConnection()
            return
        if not self.started:
            return  # passed on when the relay starts
        _passEOF(self, peer)

    def writeConnectionLost(self) -> None:  # noqa: N802 (Twisted's name)
        """The EOF reached our far end."""
        if self.readDone:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:  # noqa: N802
        self.lost = True
        self.setTimeout(None)
        peer = self.peer
        if peer is not None and not peer.lost and peer.transport is not None:
            transport = peer.transport
            if getattr(transport, "producer", None) is not None:
                transport.unregisterProducer()
            if isinstance(reason, Failure) and reason.check(ConnectionDone):
                transport.loseConnection()  # after what it still holds
            else:
                getattr(transport, "abortConnection", transport.loseConnection)()
            if self.idle_timeout and peer.timeOut is None:
                # Its buffer may never drain: the deadline moves over.
                peer.setTimeout(self.idle_timeout)
            return
        ended(self.stats)
        self.relayEnded()
        if peer is not None and peer is not self:
            peer.relayEnded()

    def timeoutConnection(self) -> None:  # noqa: N802 (Twisted's name)
        log_idle(self.log, self.stats, self.idle_timeout)
        self.abort()

    def relayEnded(self) -> None:  # noqa: N802
        """Hook: the relay has ended (both sides are gone)."""

    def abort(self) -> None:
        """End the relay now: both connections are aborted."""
        for side in (self, self.peer):
            if side is not None and side.transport is not None and not side.lost:
                transport = side.transport
                getattr(transport, "abortConnection", transport.loseConnection)()
            elif side is not None and side.transport is None:
                side.lost = True  # never connected: nothing to close


def pair(a: RelayProtocol, b: RelayProtocol) -> None:
    """Make C{a} (side A: its bytes count as forward) and C{b} one relay."""
    a.peer, b.peer = b, a
    a.forward, b.forward = True, False
    b.stats = a.stats
    b.clock = b.clock if b.clock is not None else a.clock


def _start(a: RelayProtocol, b: RelayProtocol) -> None:
    """Both sides are connected: producers both ways, then relay."""
    for side in (a, b):
        side.started = True
    for side, other in ((a, b), (b, a)):
        side.transport.registerProducer(other.transport, True)
    for side in (a, b):
        if side.outgoing:
            side.transport.write(side.outgoing)
            side.outgoing = b""
    for side, other in ((a, b), (b, a)):
        held, side._held = side._held, []
        for data in held:
            side.relayed(data)
            other.transport.write(data)
    for side, other in ((a, b), (b, a)):
        if side.readDone:
            _passEOF(side, other)
        else:
            side.transport.resumeProducing()
    timed = a if a.forward else b
    if timed.idle_timeout:
        timed.setTimeout(timed.idle_timeout)


def _passEOF(side: RelayProtocol, peer: RelayProtocol) -> None:  # noqa: N802
    transport = peer.transport
    if getattr(transport, "producer", None) is not None:
        # The reader is done: its transport produces nothing more.
        transport.unregisterProducer()
    if peer.readDone:
        # Both directions have ended.
        side.transport.loseConnection()
        transport.loseConnection()
        return
    half = getattr(transport, "loseWriteConnection", None)
    if half is not None:
        half()
    else:
        transport.loseConnection()


@implementer(IRelayEngine)
class TransportRelays(RelayEngine):
    """
    Relays between pairs of L{RelayProtocol}s: C{join} pairs them and owns
    them until they end.  They may be connected before or after the join.
    C{clock} (an C{IReactorTime}) runs the idle deadlines.
    """

    log = Logger()

    def __init__(self, clock: Any = None) -> None:
        self.clock = clock
        self.failure: str | None = None
        self._running = False
        self._relays: dict[RelayStats, RelayProtocol] = {}

    def start(self) -> None:
        self._running = True

    def stop(self) -> None:
        self._running = False
        for side in list(self._relays.values()):
            side.abort()

    def _new_stats(self, a: RelayProtocol) -> RelayStats:
        return a.stats

    def _accepting(self) -> bool:
        return self._running

    def _pair(self, join: Join) -> tuple[RelayProtocol, RelayProtocol]:
        a, b = join.a, join.b
        a.stats = join.stats
        if a.clock is None:
            a.clock = self.clock
        pair(a, b)
        return a, b

    def _refuse(self, join: Join) -> None:
        a, b = self._pair(join)
        a.abort()
        if a.lost and b.lost:
            ended(join.stats)

    def _relay(self, join: Join) -> None:
        a, b = self._pair(join)
        stats = join.stats
        a.outgoing, b.outgoing = a.outgoing + join.greeting, b.outgoing + join.early
        a.idle_timeout = b.idle_timeout = join.idle_timeout
        self._relays[stats] = a
        relays = self._relays
        on_end = stats.on_end

        def forget() -> None:
            relays.pop(stats, None)
            if on_end is not None:
                on_end()

        stats.on_end = forget
        if a.transport is not None and b.transport is not None and not a.started:
            _start(a, b)

    def abort(self, stats: RelayStats) -> None:
        side = self._relays.get(stats)
        if side is not None:
            side.abort()

    def buffered(self) -> int:
        total = 0
        for a in self._relays.values():
            for side in (a, a.peer):
                transport = side and side.transport
                total += compat_twisted.buffered(transport)
        return total
