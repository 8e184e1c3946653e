"""
libipc messages on Twisted: L{MessageProtocol} and L{MessageFactory} read and
write whole messages on a connection, with each connection's bounds (unlike
L{ipcd.framing}, the message format on plain blocking sockets, which it
re-exports; and L{ipcd.handoff}, which passes descriptors, not messages).

A message is its payload length as u32 big-endian, then the payload.
Upstream receivers do one read() per message, so a message's header and
payload always go out in a single write.  Our own receivers treat the stream
as a stream: partial and coalesced messages are both handled, in time linear
in the bytes received whatever the size of each read.

What one connection may hold of the process is bounded: it stops reading
while its write buffer is full (backpressure), its partial message counts
against a L{PartialMessageBudget} shared with other connections, and it is
closed when idle for C{idleTimeout} seconds.
"""

from __future__ import annotations

import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableProtocol,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

# The blocking side of the framing needs no Twisted: it lives in
# ipcd.framing (for ipcd.client), and is this module's too.
from ipcd.framing import DEFAULT_MAX_MESSAGE_SIZE as DEFAULT_MAX_MESSAGE_SIZE
from ipcd.framing import HEADER as HEADER
from ipcd.framing import MessageTooLarge as MessageTooLarge
from ipcd.framing import encode as encode
from ipcd.framing import recv_exactly as recv_exactly
from ipcd.framing import recv_message as recv_message
from ipcd.framing import send_message as send_message
from ipcd.nodescriptors import ClosesDescriptors

DEFAULT_PARTIAL_MESSAGE_BUDGET = 64 * 1024 * 1024
DEFAULT_IDLE_TIMEOUT = 300.0
_UCRED = struct.Struct("3i")  # SO_PEERCRED: pid, uid, gid
# What the budget charges per piece of a partial message besides its bytes:
# a bytes object and its list slot (about 48 bytes in CPython), so a peer
# trickling one byte per read holds no more memory than it is charged for.
PIECE_OVERHEAD = 64
# How much of what we send may wait in a connection's write buffer before it
# stops reading (see MessageProtocol.sendMessage).
WRITE_BOUND = 256 * 1024

# Every copy of received payload bytes goes through here (tests count them).
_join = b"".join


def _current(value: Any) -> Any:
    """A setting given as a value, or as a callable returning the current one."""
    return value() if callable(value) else value


# The counter (C{ipcd status}, and the metrics) of the log lines that rate
# limits left out.
LOG_LINES_DROPPED = "log lines dropped by rate limits"
# The counter of connections closed for a message over their maximum.
TOO_LARGE_CLOSED = "closed over max_message_size"


class LimitLog:
    """
    Reports a limit closing connections: counts each close in
    C{counters[name]} (e.g. the broker's, which C{ipcd status} shows) and
    logs at most one line per C{interval} seconds, saying how many it left
    out since the last, so a flood of closes cannot flood the log.
    """

    def __init__(
        self,
        name: str,
        counters: Counter[str] | None = None,
        clock: IReactorTime | None = None,
        interval: float = 10.0,
    ) -> None:
        self.name = name
        self.counters: Counter[str] = counters if counters is not None else Counter()
        self._seconds = clock.seconds if clock is not None else time.monotonic
        self.interval = interval
        self._next = float("-inf")
        self._unlogged = 0

    def hit(self) -> int | None:
        """
        Count one close.  Whether to log it: C{None} if not, else how many
        were not logged since the last line.
        """
        self.counters[self.name] += 1
        now = self._seconds()
        if now < self._next:
            self._unlogged += 1
            self.counters[LOG_LINES_DROPPED] += 1
            return None
        unlogged, self._unlogged = self._unlogged, 0
        self._next = now + self.interval
        return unlogged


class PartialMessageBudget:
    """
    The bytes held in partial (incomplete) messages by all the connections
    that share this budget, kept within C{limit}: when a connection's new
    bytes would pass it, the connection holding the largest partial message
    is closed (it may be that one), then the next largest, until they fit.

    Accounting is O(1) per read; only going over the limit scans the holders
    for the largest, and each such scan closes a connection.  C{limit} may be
    a callable returning the current limit (so a reload applies).
    """

    def __init__(
        self,
        limit: int | Callable[[], int] = DEFAULT_PARTIAL_MESSAGE_BUDGET,
        counters: Counter[str] | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        self._limit = limit
        self.held = 0
        self._holders: dict[MessageProtocol, int] = {}
        self.closes = LimitLog("closed over partial-message budget", counters, clock)

    @property
    def limit(self) -> int:
        return _current(self._limit)

    def holding(self, holder: MessageProtocol) -> int:
        """What C{holder} is charged for now."""
        return self._holders.get(holder, 0)

    def __len__(self) -> int:
        """How many connections hold a partial message."""
        return len(self._holders)

    def hold(self, holder: MessageProtocol, size: int) -> bool:
        """
        Charge C{holder} C{size} bytes from now on (its whole partial
        message; 0 when it holds none).  Over the limit, larger holders are
        closed first; C{False} means C{holder} itself was closed.
        """
        self.held -= self._holders.pop(holder, 0)
        if not size:
            return True
        limit = None
        while True:
            if limit is None:
                limit = self.limit
            if self.held + size <= limit:
                break
            victim = max(self._holders, key=self._holders.__getitem__, default=None)
            if victim is None or self._holders[victim] <= size:
                holder._closeForBudget(size, limit)
                return False
            victimSize = self._holders.pop(victim)
            self.held -= victimSize
            victim._closeForBudget(victimSize, limit)
        self._holders[holder] = size
        self.held += size
        return True


@implementer(IPushProducer)
class _ReadPauser:
    """
    A connection's transport's streaming producer: the transport pauses it
    (we stop reading, and delivering what was read) while its write buffer
    holds more than its bound (64 KiB for Twisted's sockets), so a peer that
    does not read what we answer cannot make us buffer without bound.
    """

    def __init__(self, transport: Any, protocol: MessageProtocol) -> None:
        self.transport = transport
        self.protocol = protocol

    def pauseProducing(self) -> None:  # noqa: N802 (IPushProducer's names)
        # The rest of the read being delivered waits too (see dataReceived).
        self.protocol._paused = True
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:  # noqa: N802
        protocol = self.protocol
        protocol._notIdle()  # our answers went out: bytes moved
        transport = self.transport
        if getattr(transport, "disconnecting", False):
            # loseConnection() came while we were paused: Twisted closes no
            # connection with a producer registered (it resumes us instead),
            # so the peer got every byte, then no EOF until the idle timeout.
            transport.unregisterProducer()
            return
        protocol._paused = False
        protocol._deliverUnread()
        if not protocol._paused:  # its answers may have filled the buffer again
            transport.resumeProducing()

    def stopProducing(self) -> None:  # noqa: N802
        # Twisted's transports call this as the connection is lost, even for
        # a subclass whose connectionLost forgets to call ours.
        self.protocol._release()


@implementer(IHalfCloseableProtocol)
class MessageProtocol(ClosesDescriptors, Protocol, TimeoutMixin):
    """
    Base class for libipc peers: override L{messageReceived}, call
    L{sendMessage}.

    A message larger than C{maxMessageSize} closes this connection only, after
    a log line naming the peer and the size (at most one per C{tooLargeLog}'s
    interval, when set); L{messageTooLarge} may be overridden to answer
    something first.

    Bounded by default: the connection stops reading, and delivering the
    messages it has read, while its write buffer is full; it is closed
    after C{idleTimeout} seconds (0: never) with no byte in either
    direction, timed on C{clock} (default: the global reactor); its
    partial message counts against C{partialBudget} if set.
    L{MessageFactory} sets all four.  A subclass that overrides
    C{connectionLost} calls this one; one that registers its own producer
    with the transport unregisters ours first.
    """

    log = Logger()
    maxMessageSize: int = DEFAULT_MAX_MESSAGE_SIZE
    idleTimeout: float = DEFAULT_IDLE_TIMEOUT
    clock: IReactorTime | None = None
    partialBudget: PartialMessageBudget | None = None
    idleLog: LimitLog | None = None
    tooLargeLog: LimitLog | None = None
    writeBound: int = WRITE_BOUND

    # The message being assembled, as class defaults: subclasses need not
    # call our __init__.  Pieces are joined once, when the message is whole.
    _discarding = False
    _header = b""
    _size: int | None = None
    _pieces: list[bytes] | tuple[()] = ()
    _have = 0
    _held = 0
    # Paused by the transport (its write buffer full), and what is left of
    # the read that was being delivered then: (the read, where the rest
    # begins).  Delivered when resumed.
    _paused = False
    _unread: tuple[bytes, int] | None = None

    def makeConnection(self, transport: Any) -> None:  # noqa: N802
        # Here rather than in connectionMade, which subclasses override.
        if IConsumer.providedBy(transport):
            transport.registerProducer(_ReadPauser(transport, self), True)
        if self.idleTimeout:
            self.setTimeout(self.idleTimeout)
        super().makeConnection(transport)

    def callLater(self, period: float, func: Callable[[], Any]) -> Any:  # noqa: N802
        """L{TimeoutMixin}'s clock: C{clock}, else the global reactor."""
        if self.clock is None:
            return super().callLater(period, func)
        return self.clock.callLater(period, func)

    def _notIdle(self) -> None:
        if self.idleTimeout:
            self.resetTimeout()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self._discarding:
            return
        self._notIdle()
        if self._unread is not None:
            # Read while paused (a wrapper's own buffer): after the rest.
            unread, offset = self._unread
            self._unread = (unread[offset:] + data, 0)
            if not self._paused:
                self._deliverUnread()
            return
        self._deliver(data, 0)

    def _deliverUnread(self) -> None:
        """Deliver the rest of the read left when the transport paused us."""
        if self._unread is not None and not self._discarding:
            data, offset = self._unread
            self._unread = None
            self._deliver(data, offset)

    def _deliver(self, data: bytes, offset: int) -> None:
        """The messages in C{data} from C{offset} on, until paused."""
        view = memoryview(data)
        end = len(data)
        while True:
            if self._size is None:
                if offset == end:
                    return
                if not self._header and end - offset >= HEADER.size:
                    (size,) = HEADER.unpack_from(data, offset)
                    offset += HEADER.size
                else:  # a header split across reads
                    need = HEADER.size - len(self._header)
                    self._header += data[offset : offset + need]
                    offset = min(end, offset + need)
                    if len(self._header) < HEADER.size:
                        return
                    (size,) = HEADER.unpack(self._header)
                    self._header = b""
                if size > self.maxMessageSize:
                    self._tooLarge(size)
                    return
                self._size = size
            missing = self._size - self._have
            if end - offset < missing:
                break
            payload = _join([*self._pieces, view[offset : offset + missing]])
            offset += missing
            self._dropPartial()
            self.messageReceived(payload)
            if self._discarding:
                return
            if self._paused and offset < end:
                # Our answers fill the write buffer: the rest of this read
                # waits until they drain.  Else one read of small requests
                # (16384 empty ones in 64 KiB) made its answers buffered
                # all at once, whatever their size, from a peer not reading.
                self._unread = (data, offset)
                return
        if offset == end:
            return
        # The whole read when it is all ours; else a copy of our part, since
        # a view would keep the whole read alive.
        piece = data if offset == 0 else _join([view[offset:]])
        if not self._pieces:
            self._pieces = []
        self._pieces.append(piece)
        self._have += len(piece)
        if self.partialBudget is not None:
            self._held = self._have + PIECE_OVERHEAD * len(self._pieces)
            self.partialBudget.hold(self, self._held)

    def _dropPartial(self) -> None:
        """Forget the partial message, and release its charge."""
        self._size = None
        self._pieces = ()
        self._have = 0
        if self._held:
            self._held = 0
            if self.partialBudget is not None:
                self.partialBudget.hold(self, 0)

    def _tooLarge(self, size: int) -> None:
        self._discarding = True
        self._dropPartial()
        self._report(
            self.tooLargeLog,
            "closing {peer}: {reason}",
            reason=str(MessageTooLarge(size, self.maxMessageSize)),
        )
        self.messageTooLarge(size)
        self.transport.loseConnection()

    def _closeForBudget(self, held: int, limit: int) -> None:
        """The partial-message budget closes this connection."""
        self._discarding = True
        self._held = 0  # the budget has let go of it already
        self._dropPartial()
        budget = self.partialBudget
        closes = budget.closes if budget is not None else None
        self._limitClosed(
            closes,
            "closing {peer}: its partial message ({held} bytes) is the largest "
            "and partial messages would pass their budget of {limit} bytes",
            held=held,
            limit=limit,
        )

    def timeoutConnection(self) -> None:  # noqa: N802 (TimeoutMixin's name)
        self._limitClosed(
            self.idleLog,
            "closing {peer}: nothing moved for {timeout:g} s",
            timeout=self.idleTimeout,
        )

    def _limitClosed(self, report: LimitLog | None, format: str, **fields: Any) -> None:
        """Report a limit's close (L{_report}), then abort."""
        self._report(report, format, **fields)
        # Abort: a graceful close waits for a peer that may never read.
        abort = getattr(self.transport, "abortConnection", None)
        if abort is None:
            self.transport.loseConnection()
        else:
            abort()

    def _report(self, report: LimitLog | None, format: str, **fields: Any) -> None:
        """A limit's close: counted, and logged at C{report}'s bounded rate."""
        unlogged = 0 if report is None else report.hit()
        if unlogged is not None:
            if unlogged:
                format += " ({unlogged} more not logged since the last such line)"
            self.log.warn(format, peer=self.peerName(), unlogged=unlogged, **fields)

    def peerName(self) -> str:  # noqa: N802
        """
        The peer, for log lines: pid and uid on a UNIX socket (whose
        address has no name), else its address.
        """
        try:
            handle = self.transport.getHandle()
            if handle.family == socket.AF_UNIX:
                pid, uid, _ = _UCRED.unpack(
                    handle.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                )
                return f"pid {pid} uid {uid}"
        except (AttributeError, OSError):
            pass
        return str(self.transport.getPeer())

    def readConnectionLost(self) -> None:  # noqa: N802 (Twisted's name)
        """
        The peer half-closed: it sends nothing more (socat does so after its
        request).  The connection closes once what was written has gone;
        Twisted closed it at once, the answers to that request unsent.
        """
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:  # noqa: N802 (Twisted's name)
        """Our side was half-closed (C{loseWriteConnection}): nothing to do."""

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        self._release()

    def _release(self) -> None:
        """Stop the idle timer and give the partial message's charge back."""
        self._discarding = True
        self.setTimeout(None)
        self._unread = None
        self._dropPartial()

    def messageTooLarge(self, size: int) -> None:
        """Hook called before the connection closes on an oversized message."""

    def messageReceived(self, payload: bytes) -> None:
        raise NotImplementedError

    def sendMessage(self, payload: bytes) -> None:
        self._notIdle()
        transport = self.transport
        # Twisted's sockets pause their producer (we stop reading) once more
        # than their bufferSize waits to be written.  That is also their read
        # size, 64 KiB, so a 64 KiB message paused us every time (bulk echo
        # through pongd ran about 30% slower).  Our messages may fill
        # writeBound first; reads stay at 64 KiB, since a bigger read costs
        # CPython an mmap(2) each.  Other writes keep Twisted's bound.
        size = getattr(transport, "bufferSize", None)
        if type(size) is not int or size >= self.writeBound:
            transport.write(encode(payload))
            return
        transport.bufferSize = self.writeBound
        try:
            transport.write(encode(payload))
        finally:
            transport.bufferSize = size


class MessageFactory(Factory):
    """
    A factory of L{MessageProtocol}s that share one maximum message size
    (e.g. the configuration's C{max_message_size}), idle timeout, clock and
    partial-message budget (by default a private one, of 64 MiB); closes for
    idleness and for messages over the maximum are counted in C{counters}
    and logged at a bounded rate.
    C{maxMessageSize} and C{idleTimeout} may be callables returning the
    current value (read per connection: a reload applies to new ones).
    """

    noisy = False

    def __init__(
        self,
        protocol: type[MessageProtocol],
        maxMessageSize: int | Callable[[], int] = DEFAULT_MAX_MESSAGE_SIZE,  # noqa: N803
        *,
        idleTimeout: float | Callable[[], float] = DEFAULT_IDLE_TIMEOUT,  # noqa: N803
        clock: IReactorTime | None = None,
        partialBudget: PartialMessageBudget | None = None,  # noqa: N803
        counters: Counter[str] | None = None,
    ) -> None:
        if not callable(protocol):
            # Else every connection would fail, each with a traceback.
            raise TypeError(
                "MessageFactory: expected a protocol class (MessageFactory(Upper)),"
                f" got {protocol!r}"
            )
        self.protocol = protocol
        self.maxMessageSize = maxMessageSize
        self.idleTimeout = idleTimeout
        self.clock = clock
        if partialBudget is None:
            partialBudget = PartialMessageBudget(counters=counters, clock=clock)
        self.partialBudget = partialBudget
        self.idleLog = LimitLog("idle connections closed", counters, clock)
        self.tooLargeLog = LimitLog(TOO_LARGE_CLOSED, counters, clock)

    def buildProtocol(self, addr: object) -> MessageProtocol:  # noqa: N802
        protocol = super().buildProtocol(addr)
        protocol.maxMessageSize = _current(self.maxMessageSize)
        protocol.idleTimeout = _current(self.idleTimeout)
        protocol.clock = self.clock
        protocol.partialBudget = self.partialBudget
        protocol.idleLog = self.idleLog
        protocol.tooLargeLog = self.tooLargeLog
        return protocol
