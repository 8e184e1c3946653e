"""
One udpd session: a local stream of framed messages on one side, datagrams
to and from one peer address on the other.

    L{Session}        the state both ends share: the session id, sequence
                      numbers, the receive window, counters, the idle
                      deadline and the end (a CLOSE datagram either way)
    L{SessionStream}  the local stream's protocol: each framed message it
                      reads becomes one DATA datagram, each DATA received
                      becomes one framed message written to it
    L{SessionStats}   a L{RelayStats} with the session's datagram counters,
                      listed by C{ipcd status}

A message larger than a datagram can carry is never cut: it is refused
with a log line and the session ends.  Datagrams that arrive while the
local stream's write buffer is full are dropped (and counted): a session
never grows ipcd's memory past one buffer.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.error import MessageLengthError
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from ipcd import wire
from ipcd.daemons.udp import wire as udpwire
from ipcd.handoff import adopt_into_reactor
from ipcd.reactors import IAdoptingReactor
from ipcd.relay import RelayStats, began, ended


@dataclass(eq=False)
class SessionStats(RelayStats):
    """A session's bytes (as a relay's) and its datagram counters."""

    sent: int = 0  # DATA datagrams sent
    received: int = 0  # DATA datagrams accepted and delivered
    dropped: int = 0  # duplicates, stale, oversized, undeliverable, spoofed
    window: udpwire.ReceiveWindow = field(default_factory=udpwire.ReceiveWindow)
    # Ends the session (its owner's stop does), with a reason.
    end: Callable[[str], None] | None = None

    @property
    def lost(self) -> int:
        """DATA datagrams missing below the highest one received."""
        return self.window.lost

    def as_dict(self, now: float | None = None) -> dict[str, Any]:
        shown = super().as_dict(now)
        shown["datagrams"] = {
            "sent": self.sent,
            "received": self.received,
            "dropped": self.dropped,
            "lost": self.lost,
        }
        return shown


class Session:
    """
    Both ends of a session are one of these.  C{send} puts a datagram on
    the wire towards the peer; C{clock} (an C{IReactorTime}) runs the idle
    deadline; C{on_end} runs once when the session has ended.
    """

    log = Logger()

    def __init__(
        self,
        session_id: bytes,
        send: Callable[[bytes], None],
        stats: SessionStats,
        clock: IReactorTime,
        idle_timeout: float,
        max_datagram: int,
        on_end: Callable[[Session], None] = lambda session: None,
    ) -> None:
        self.id = session_id
        self._send = send
        self.stats = stats
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.max_datagram = max_datagram
        self._on_end = on_end
        self.stream: SessionStream | None = None
        self.done = False
        self._next = 0  # our next sequence number
        self._last = clock.seconds()
        self._timer = clock.callLater(idle_timeout, self._check_idle)
        stats.end = self.end
        began(stats)

    @property
    def max_payload(self) -> int:
        return self.max_datagram - udpwire.DATA_HEADER_SIZE

    def attach(self, stream: SessionStream) -> None:
        self.stream = stream
        stream.session = self

    # From the local stream.

    def message(self, payload: bytes) -> None:
        """A message read from the local stream: one DATA datagram."""
        if self.done:
            return
        self._last = self.clock.seconds()
        sequence, self._next = self._next, self._next + 1
        if self._transmit(udpwire.data(self.id, sequence, payload)):
            self.stats.sent += 1
            self._count(len(payload), outgoing=True)

    def too_large(self, size: int) -> None:
        self.log.warn(
            "udpd: closing the session of {peer} for {service!r}: a message of "
            "{size} bytes does not fit in a datagram (at most {limit} bytes)",
            peer=self.stats.description,
            service=self.stats.service,
            size=size,
            limit=self.max_payload,
        )
        self.end("message too large")

    # From the peer (already matched to this session by id and address).

    def datagram(self, datagram: udpwire.Data | udpwire.Close, size: int) -> None:
        if self.done:
            return
        if isinstance(datagram, udpwire.Close):
            self.end("closed by the peer", notify=False)
            return
        self._last = self.clock.seconds()
        stream = self.stream
        if size > self.max_datagram or not self.stats.window.accept(datagram.sequence):
            self.stats.dropped += 1
            return
        if stream is None or stream.congested:
            self.stats.dropped += 1  # accepted but nowhere to go: lost
            return
        self.stats.received += 1
        self._count(len(datagram.payload), outgoing=False)
        stream.deliver(datagram.payload)

    def spoofed(self) -> None:
        """A datagram with this session's id from another address."""
        self.stats.dropped += 1

    # The end.

    def end(self, why: str, notify: bool = True) -> None:
        """End the session (once): a CLOSE to the peer, the stream closed."""
        if self.done:
            return
        self.done = True
        if notify:
            self._transmit(udpwire.close(self.id))
        if self._timer.active():
            self._timer.cancel()
        self.log.debug(
            "udpd: session of {peer} for {service!r} ended: {why}",
            peer=self.stats.description,
            service=self.stats.service,
            why=why,
        )
        if self.stream is not None and self.stream.transport is not None:
            self.stream.transport.loseConnection()
        ended(self.stats)
        self._on_end(self)

    def _check_idle(self) -> None:
        left = self._last + self.idle_timeout - self.clock.seconds()
        if left > 0:
            self._timer = self.clock.callLater(left, self._check_idle)
            return
        self.log.info(
            "udpd: closing the session of {peer} for {service!r}: idle for "
            "{timeout:g} s",
            peer=self.stats.description,
            service=self.stats.service,
            timeout=self.idle_timeout,
        )
        self.end("idle")

    def _count(self, size: int, outgoing: bool) -> None:
        # RelayStats.forward counts what the side that asked sends: the
        # local client's messages outbound, the remote peer's inbound.
        if outgoing == (self.stats.direction == "out"):
            self.stats.forward += size
        else:
            self.stats.backward += size

    def _transmit(self, datagram: bytes) -> bool:
        try:
            self._send(datagram)
        except (OSError, MessageLengthError):
            # A full socket buffer, an unreachable peer, a datagram the
            # path cannot carry: UDP loses it.
            self.stats.dropped += 1
            return False
        return True


@implementer(IPushProducer)
class SessionStream(wire.MessageProtocol):
    """
    The local stream of a session, as a message protocol: its messages go
    to the session; the session's messages are written to it.  Its write
    buffer's fullness (Twisted pausing its producer) marks it C{congested}.
    """

    idleTimeout = 0  # the session keeps the idle deadline
    session: Session | None = None
    congested = False

    def connectionMade(self) -> None:
        # Ours instead of MessageProtocol's reading pauser: what fills this
        # stream's buffer comes from the network, which cannot be paused.
        self.transport.unregisterProducer()
        self.transport.registerProducer(self, True)

    def messageReceived(self, payload: bytes) -> None:
        if self.session is not None:
            self.session.message(payload)

    def messageTooLarge(self, size: int) -> None:
        if self.session is not None:
            self.session.too_large(size)

    def deliver(self, payload: bytes) -> None:
        self.transport.write(wire.encode(payload))

    def pauseProducing(self) -> None:  # noqa: N802 (IPushProducer's names)
        self.congested = True

    def resumeProducing(self) -> None:  # noqa: N802
        self.congested = False

    def stopProducing(self) -> None:  # noqa: N802
        pass

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        if self.session is not None:
            self.session.end("the local stream closed")


# A session's local stream.


def stream_factory(reactor: IReactorTime, max_datagram: int) -> wire.MessageFactory:
    """Sessions' local streams: messages up to what one datagram carries."""
    return wire.MessageFactory(
        SessionStream,
        max_datagram - udpwire.DATA_HEADER_SIZE,
        idleTimeout=0,
        clock=reactor,
    )


def start_stream(
    reactor: IAdoptingReactor,
    sock: socket.socket,
    session: Session,
    factory: wire.MessageFactory,
) -> None:
    """Run C{sock} (a connected stream) as C{session}'s local stream."""
    try:
        stream = adopt_into_reactor(reactor, sock.detach(), factory)
    except Exception:
        session.end("cannot adopt the local stream")
        raise
    session.attach(stream)
