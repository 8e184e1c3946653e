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
never grows ipcd's memory past one buffer (and L{OUTBOX_BOUND} waiting
for the end of a read).

In batches both ways (L{ipcd.daemons.udp.batch}): the messages of one read
of the local stream go out together (C{send_all}: runs of them in one
system call where the kernel takes them), and the messages the datagrams
of one read of the UDP port carry are written to the local stream together
when that read is done (C{pending}, the reader's list of streams to write),
straight to its socket when it holds nothing.
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
from ipcd.daemons.outbox import Outbox
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
    the wire towards the peer (raising C{OSError} when it is lost), and
    C{send_all}, when given, several in order (returning those lost);
    C{clock} (an C{IReactorTime}) runs the idle deadline; C{on_end} runs
    once when the session has ended.  C{pending}, when set, is the list
    where the local stream waits to be written at the end of a read of the
    UDP port; without it, each message is written at once.
    """

    pending: list[SessionStream] | None = None

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
        send_all: Callable[[list[bytes]], list[bytes]] | None = None,
    ) -> None:
        self.id = session_id
        self._send = send
        self._send_all = send_all
        # The DATA of the local stream's read under way, sent at its end.
        self._gathered: list[bytes] | None = None
        self.stats = stats
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.max_datagram = max_datagram
        self._on_end = on_end
        self.stream: SessionStream | None = None
        self.done = False
        self._next = 0  # our next sequence number
        # When a DATA last moved either way, and when the peer was last
        # heard from (any of its datagrams): the two deadlines.
        self._moved = self._heard = clock.seconds()
        self._timer = clock.callLater(idle_timeout / PINGS, self._check_idle)
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
        sequence, self._next = self._next, self._next + 1
        datagram = udpwire.data(self.id, sequence, payload)
        gathered = self._gathered
        if gathered is not None:
            gathered.append(datagram)  # sent when the read is done
            if len(gathered) >= GATHERED_AT_MOST:  # (or now: a read of
                self._gathered = []  # tiny messages holds thousands)
                self._send_gathered(gathered)
            return
        self._moved = self.clock.seconds()
        if self._transmit(datagram):
            self.stats.sent += 1
            self._count(len(payload), outgoing=True)

    def gather(self) -> None:
        """Hold the messages of a read of the local stream until L{sent}."""
        if self._gathered is None:
            self._gathered = []

    def sent(self) -> None:
        """Send the messages held since L{gather}, together."""
        gathered, self._gathered = self._gathered, None
        if gathered:
            self._send_gathered(gathered)

    def _send_gathered(self, gathered: list[bytes]) -> None:
        self._moved = self.clock.seconds()
        if self._send_all is None or len(gathered) == 1:
            # One by one; a refusal on the way ends the session (Twisted's
            # write tells it without raising): the rest is lost, not sent.
            lost = []
            for datagram in gathered:
                if self.done:
                    self.stats.dropped += 1
                    lost.append(datagram)
                elif not self._transmit(datagram):
                    lost.append(datagram)
        else:
            lost = self._send_all(gathered)
            self.stats.dropped += len(lost)
        header = udpwire.DATA_HEADER_SIZE
        size = sum(map(len, gathered)) - sum(map(len, lost))
        self.stats.sent += len(gathered) - len(lost)
        self._count(size - header * (len(gathered) - len(lost)), outgoing=True)

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

    def datagram(self, datagram: udpwire.Datagram, size: int) -> None:
        """A DATA, CLOSE, PING or PONG of this session."""
        if self.done:
            return
        kind = type(datagram)
        if kind is udpwire.Close:
            self.end("closed by the peer", notify=False)
        elif kind is udpwire.Ping:
            self._heard = self.clock.seconds()
            self._transmit(udpwire.pong(self.id))
        elif kind is udpwire.Pong:
            self._heard = self.clock.seconds()
        elif kind is udpwire.Data:
            self.data(datagram.sequence, datagram.payload, size)  # type: ignore[union-attr]

    def data(self, sequence: int, payload: bytes, size: int) -> None:
        """A DATA's sequence number and payload; C{size}: the datagram's."""
        if self.done:
            return
        self._moved = self._heard = self.clock.seconds()
        stream = self.stream
        if size > self.max_datagram or not self.stats.window.accept(sequence):
            self.stats.dropped += 1
            return
        if stream is None or stream.congested:
            self.stats.dropped += 1  # accepted but nowhere to go: lost
            return
        self.stats.received += 1
        self._count(len(payload), outgoing=False)
        stream.deliver(payload)

    def spoofed(self) -> None:
        """A datagram with this session's id from another address."""
        self.stats.dropped += 1

    # The end.

    def end(self, why: str, notify: bool = True) -> None:
        """End the session (once): a CLOSE to the peer, the stream closed."""
        if self.done:
            return
        self.sent()  # what the stream's read held: before the CLOSE
        if self.done:
            return  # sending it ended the session (the peer refused it)
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
            self.stream.close(self.clock)
        ended(self.stats)
        self._on_end(self)

    def _check_idle(self) -> None:
        """
        End the session when no DATA moved either way for C{idle_timeout}
        (idle), or when the peer sent nothing for as long, whatever this
        side sends (gone: its host down, its address changed, its udpd
        stopped without a CLOSE).  A side that sends while its peer is
        quiet asks it (a PING, L{PINGS} - 1 times in the timeout) whether
        it is still there: a peer's udpd answers (a PONG), so a session
        that carries messages one way only lives on.
        """
        now = self.clock.seconds()
        timeout = self.idle_timeout
        if now - self._moved >= timeout:
            why, said = "idle", "idle for {timeout:g} s"
        elif now - self._heard >= timeout:
            why, said = "peer gone", "nothing from the peer for {timeout:g} s"
        else:
            step = timeout / PINGS
            if now - self._heard >= step and self._moved > self._heard:
                self._transmit(udpwire.ping(self.id))  # (sent, heard nothing)
                if self.done:
                    # Its refusal ended the session (the client's connected
                    # socket: the remote udpd is gone): no next check.
                    return
            wake = min(
                self._moved + timeout - now,
                self._heard + timeout - now,
                step if now - self._heard >= step else self._heard + step - now,
            )
            self._timer = self.clock.callLater(wake, self._check_idle)
            return
        self.log.info(
            "udpd: closing the session of {peer} for {service!r}: " + said,
            peer=self.stats.description,
            service=self.stats.service,
            timeout=timeout,
        )
        self.end(why)

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
    _waiting = 0  # bytes in the outbox, waiting for the end of a read
    _cut: Any = None  # the end of the grace for what it holds, once closing
    # Called once it has closed, when it outlived its session (L{held}).
    closed: Callable[[], None] | None = None

    def connectionMade(self) -> None:
        # Ours instead of MessageProtocol's reading pauser: what fills this
        # stream's buffer comes from the network, which cannot be paused.
        self.transport.unregisterProducer()
        self.transport.registerProducer(self, True)
        self.outbox = Outbox(self.transport)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        session = self.session
        if session is None:
            return super().dataReceived(data)
        session.gather()  # the read's messages: sent together at its end
        try:
            super().dataReceived(data)
        finally:
            session.sent()

    def messageReceived(self, payload: bytes) -> None:
        if self.session is not None:
            self.session.message(payload)

    def messageTooLarge(self, size: int) -> None:
        if self.session is not None:
            self.session.too_large(size)

    def deliver(self, payload: bytes) -> None:
        """Write C{payload} framed: now, or when the UDP port's read is done."""
        outbox = self.outbox
        outbox.add(wire.encode(payload))
        pending = self.session.pending if self.session is not None else None
        self._waiting += len(payload) + wire.HEADER.size
        if pending is None or self._waiting >= OUTBOX_BOUND:
            # No wait; or, at the bound, now: a full stream is told so by
            # its transport (congested) before more is read for it.
            self.send_waiting()
        elif len(outbox.pieces) == 1:
            pending.append(self)

    def send_waiting(self) -> None:
        """Write what L{deliver} left in the outbox."""
        self._waiting = 0
        self.outbox.send()

    def pauseProducing(self) -> None:  # noqa: N802 (IPushProducer's names)
        self.congested = True

    def resumeProducing(self) -> None:  # noqa: N802
        self.congested = False

    def stopProducing(self) -> None:  # noqa: N802
        pass

    def close(self, clock: IReactorTime) -> None:
        """
        Close once what it holds is written (what waits for the end of a
        read, then the transport's buffer), or after L{CLOSE_GRACE}
        seconds: Twisted stops reading a closing connection, so a service
        that stops reading until its own writes go through (pongd) would
        hold it, out of every count, for as long as it lives.
        """
        self.send_waiting()
        transport = self.transport
        transport.loseConnection()
        if getattr(transport, "connected", False) and self._cut is None:
            self._cut = clock.callLater(CLOSE_GRACE, transport.abortConnection)

    @property
    def held(self) -> bool:
        """Whether it is still open in its grace, its session over."""
        return self._cut is not None and self._cut.active()

    def readConnectionLost(self) -> None:  # noqa: N802 (Twisted's name)
        # The service's EOF ends the stream at once, as before
        # MessageProtocol took half-closes (its producer, ours, would hold a
        # close behind a full buffer).
        self.transport.abortConnection()

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        if self._cut is not None and self._cut.active():
            self._cut.cancel()
        if self.session is not None:
            self.session.end("the local stream closed")
        closed, self.closed = self.closed, None
        if closed is not None:
            closed()


# A session's liveness checks per idle timeout: a side whose peer has been
# quiet for a quarter of it asks it (a PING) at each quarter, three times
# before it gives the peer up.
PINGS = 4
# Seconds a session's local stream has, once the session is over, to take
# what it is still owed before it is cut.
CLOSE_GRACE = 2.0
# How many DATA a read of the local stream gathers at most before they are
# sent (four runs of the kernel's largest, MAX_SEGMENTS).
GATHERED_AT_MOST = 256
# What a session's stream holds at most, delivered but not yet written,
# before it is written at once rather than at the end of the UDP port's
# read.  Small beside the transport's own buffer (64 KiB, past which the
# stream is congested and datagrams for it are dropped), so that a stream
# holds little more than before the batches: 64 KiB and a message then,
# now at most 16 KiB and a message more.  (32 messages of 100 bytes in
# flight take 3.3 KiB.)
OUTBOX_BOUND = 16 * 1024


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
