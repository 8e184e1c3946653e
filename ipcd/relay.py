"""
The bidirectional relay: two connections joined byte for byte.

Each side's transport is registered as a streaming producer on the other's,
so a slow receiver pauses reading from a fast sender (bounded memory).  A
half-close (EOF) is passed on as C{shutdown(SHUT_WR)}; when both directions
have ended, or either side dies, both are closed.  Byte counters feed status
reporting.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

# Bigger reads than Twisted's 64 KiB default: fewer trips through the reactor
# on bulk transfers.
READ_SIZE = 256 * 1024


@dataclass(eq=False)
class RelayStats:
    """
    What a relay carries: C{forward} counts bytes from side A (the peer that
    asked) to side B (the service).  While the relay lives it sits in
    C{registry}, which status reporting lists.
    """

    description: str = ""
    direction: str = ""
    service: str = ""
    route: str = ""
    labels: tuple[str, ...] = ()
    forward: int = 0
    backward: int = 0
    started: float = field(default_factory=time.monotonic)
    registry: set[RelayStats] | None = None

    def as_dict(self, now: float | None = None) -> dict[str, Any]:
        now = time.monotonic() if now is None else now
        return {
            "peer": self.description,
            "direction": self.direction,
            "service": self.service,
            "route": self.route,
            "labels": sorted(self.labels),
            "bytes_in": self.forward,
            "bytes_out": self.backward,
            "age": round(now - self.started, 3),
        }


def send_now(transport: Any, data: bytes) -> None:
    """
    Write C{data}, sending it at once when nothing is queued.

    C{transport.write} only queues: the bytes go out on the reactor's next
    pass, after two epoll_ctl calls to watch for writability and stop again.
    On the relay's hot path (one message in, one out) sending straight away
    saves that round; whatever the socket does not take is queued as usual,
    so backpressure (producer pausing) is unchanged.
    """
    writeSomeData = getattr(transport, "writeSomeData", None)  # noqa: N806
    if (
        writeSomeData is not None
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
        and not transport.dataBuffer
        and not transport._tempDataBuffer
    ):
        sent = writeSomeData(data)
        # An exception or a negative count: let Twisted's own write path
        # meet the error and close the connection its usual way.
        if isinstance(sent, int) and sent >= 0:
            if sent == len(data):
                return
            data = data[sent:]
    transport.write(data)


@implementer(IHalfCloseableProtocol)
class RelayProtocol(Protocol):
    """
    One side of a relay.  Until L{join} pairs it with its peer, data is
    buffered; subclasses that run a handshake first override
    L{dataReceived} until they join.
    """

    peer: RelayProtocol | None = None
    stats: RelayStats | None = None
    _outgoing = True  # counts into stats.forward (side A) or .backward (side B)
    _readDone = False
    _buffered: list[bytes] | None = None
    _gone = False

    def relayData(self, data: bytes) -> None:
        """Pass C{data} read from this side to the peer."""
        if self.stats is not None:
            if self._outgoing:
                self.stats.forward += len(data)
            else:
                self.stats.backward += len(data)
        if self.peer is not None:
            send_now(self.peer.transport, data)
        else:
            if self._buffered is None:
                self._buffered = []
            self._buffered.append(data)

    def dataReceived(self, data: bytes) -> None:
        self.relayData(data)

    def readConnectionLost(self) -> None:  # noqa: N802 (Twisted's name)
        self._readDone = True
        if self.peer is not None:
            self.peer.transport.loseWriteConnection()
            if self.peer._readDone:
                self.transport.loseConnection()
                self.peer.transport.loseConnection()

    def writeConnectionLost(self) -> None:  # noqa: N802 (Twisted's name)
        """Our write side was shut down after the peer's EOF: nothing to do."""

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._gone = True
        peer = self.peer
        if peer is not None and not peer._gone:
            peer.transport.loseConnection()
        elif self.stats is not None and self.stats.registry is not None:
            # Both sides are gone: the relay leaves the live list.
            self.stats.registry.discard(self.stats)


def join(
    a: RelayProtocol, b: RelayProtocol, stats: RelayStats | None = None
) -> RelayStats:
    """
    Relay between two connected sides: A's bytes count as C{forward}.  Data
    either side buffered before the join is passed on first.
    """
    stats = stats if stats is not None else RelayStats()
    if stats.registry is not None:
        stats.registry.add(stats)
    a.peer, b.peer = b, a
    a.stats = b.stats = stats
    a._outgoing, b._outgoing = True, False
    for side in (a, b):
        if hasattr(side.transport, "bufferSize"):
            side.transport.bufferSize = READ_SIZE
    a.transport.registerProducer(b.transport, True)
    b.transport.registerProducer(a.transport, True)
    for side in (a, b):
        pending, side._buffered = side._buffered, None
        for data in pending or ():
            side.relayData(data)
        if side._readDone:
            side.readConnectionLost()
        if side._gone:
            side.connectionLost()
    return stats


def relay_factory() -> Factory:
    """A factory of plain relay sides, e.g. for C{adoptStreamConnection}."""
    return Factory.forProtocol(RelayProtocol)


def adopt_relay_side(reactor: Any, sock: Any) -> RelayProtocol:
    """
    Adopt a connected non-blocking socket into the reactor as a relay side;
    the socket object itself is closed (the reactor holds a duplicate).
    """
    try:
        transport = reactor.adoptStreamConnection(
            sock.fileno(), sock.family, relay_factory()
        )
    finally:
        sock.close()
    return transport.protocol
