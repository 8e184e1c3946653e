"""
The bidirectional relay: two connected sockets joined byte for byte.

Relays do not run as Twisted transports in the reactor: a L{RelayLoop} runs
them in a thread of its own, on plain non-blocking sockets and one epoll.
Why: relaying a message is one C{recv} and one C{send}, and in the reactor
each message also paid a reactor turn and the transport and protocol layers.
With Twisted transports a tcp route's 100-byte round trip was about 1.4x a
chain of two socats; raw sockets watched by the reactor still made it 1.1x;
this loop makes it about 0.9x, and moves more bytes per second than either
(C{benchmarks/run.py --cpus 0}).  The reactor's thread waits in
C{epoll_wait}, without the GIL, most of the time, so the two rarely compete.

Ownership: a relay's sockets and state belong to the loop's thread.  Other
threads only queue calls (L{RelayLoop.join}, L{RelayLoop.abort},
L{RelayLoop.stop}); the loop reports back with C{reactor.callFromThread} (a
finished relay leaves its registry).

Each direction reads up to L{READ_SIZE} bytes and sends them on at once.
What the receiver does not take is kept, and the sender is not read again
until it is flushed: at most one read is held per direction, and the
kernel's socket buffers push back on a fast sender.  An EOF is passed on as
C{shutdown(SHUT_WR)} once everything before it is delivered; when both
directions have ended, or on any error on either side, both are closed.

Every side stays in the epoll, even with nothing to read or write, because
a hangup or an error is reported only for a registered fd:

  - C{EPOLLERR} (a TCP reset; an AF_UNIX peer that closed without reading
    all we sent it): the connection is broken and nothing more can be
    delivered either way: the relay ends at once.
  - C{EPOLLHUP} without an error (an AF_UNIX peer that closed; both halves
    of a TCP connection shut): the far end takes nothing more, so the
    direction towards it is over.  What it sent before it went is still in
    the socket and is delivered, like the data before a FIN (a service's
    answer followed by C{close} is how AF_UNIX services end); then the
    relay ends, as the other side's bytes have nowhere to go.
  - A plain FIN (C{EPOLLRDHUP}, reported with C{EPOLLIN}) is a half-close:
    the far end may still read, so the other direction goes on.  It is
    found by the read that returns 0, in order after the data.

A receiver that never reads, behind a sender that has half-closed or hung
up, is the one case left; the idle deadline (C{join}'s C{idle_timeout})
ends a relay on which no byte has moved for that long.
"""

from __future__ import annotations

import collections
import math
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure

# Big reads: fewer passes through the loop on bulk transfers.  One buffer,
# reused by every read (the loop is one thread), so no per-read allocation.
READ_SIZE = 256 * 1024

_IN, _OUT = select.EPOLLIN, select.EPOLLOUT
_HUP, _ERR = select.EPOLLHUP, select.EPOLLERR
# Idle deadlines are checked at most this often (seconds): a sweep looks at
# every relay, and a deadline of minutes needs no finer grain.
SWEEP_INTERVAL = 0.5


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
    moved: float = 0.0  # when a byte last moved (the loop's clock)
    registry: set[RelayStats] | None = None
    # Called in the reactor's thread once the relay has ended.
    on_end: Callable[[], None] | None = None

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


class Side:
    """One socket of a relay (state owned by the loop's thread)."""

    __slots__ = (
        "sock",
        "fd",
        "peer",
        "stats",
        "forward",
        "pending",
        "eof",
        "hup",
        "mask",
        "timeout",
    )

    def __init__(self, sock: socket.socket, stats: RelayStats, forward: bool) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer: Side = self
        self.stats = stats
        self.forward = forward  # what it reads counts as stats.forward (side A)
        self.pending = memoryview(b"")  # bytes for this socket it has not taken
        self.eof = False  # this socket's far end has stopped sending
        self.hup = False  # ... and takes nothing more: it hung up
        self.mask: int | None = None  # what the epoll watches for; None: not in it
        self.timeout = 0.0  # the relay's idle deadline in seconds; 0: none

    @property
    def reading(self) -> bool:
        """
        Read while the far end sends and the peer has taken everything, and
        while there is somewhere to send it.
        """
        return not self.eof and not self.peer.pending and not self.peer.hup

    @property
    def finished(self) -> bool:
        """Nothing more can move on this side's relay: it may end."""
        peer = self.peer
        if self.pending or peer.pending:
            return False
        # Each direction is over once its sender's EOF was passed on, or
        # once its receiver hung up (nothing can reach it any more).
        return (self.eof or peer.hup) and (peer.eof or self.hup)


class RelayLoop:
    """
    Relays between pairs of sockets, in a thread started by L{start}.
    L{start}C{(threaded=False)} starts no thread; L{turn} then runs the loop
    one step at a time (for tests).  C{clock} gives the time in seconds for
    idle deadlines (tests pass a fake one).
    """

    log = Logger()

    def __init__(
        self, reactor: Any, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._reactor = reactor
        self._clock = clock
        self._now = clock()  # as of the current turn: one clock read per turn
        self._sweep_at = math.inf  # when the next idle deadline may be due
        self._sides: dict[int, Side] = {}
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        self._buffer = bytearray(READ_SIZE)
        self._view = memoryview(self._buffer)
        self._epoll: Any = None
        self._wake = -1
        self._thread: threading.Thread | None = None
        self._running = False  # the loop runs (in its thread)
        self._stopped = False  # stop() was called

    def start(self, threaded: bool = True) -> None:
        self._epoll = select.epoll()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll.register(self._wake, _IN)
        self._running, self._stopped = True, False
        if threaded:
            self._report: Callable[..., Any] = self._reactor.callFromThread
            self._thread = threading.Thread(
                target=self._run, name="ipcd relays", daemon=True
            )
            self._thread.start()
        else:
            self._report = lambda f, *args, **kwargs: f(*args, **kwargs)

    def stop(self) -> None:
        """Close every relay and end the loop (and its thread)."""
        if self._stopped or self._epoll is None:
            return
        self._stopped = True  # no more calls for the loop from here on
        if self._thread is None:
            self._stop()
        else:
            self._calls.append(self._stop)
            os.eventfd_write(self._wake, 1)
            self._thread.join(10)
            if self._thread.is_alive():
                return  # stuck: leave its fds alone rather than pull them away
        # Joins the loop did not get to: _add closes their sockets.
        while self._calls:
            self._calls.popleft()()
        self._epoll.close()
        os.close(self._wake)
        self._epoll = None

    def join(
        self,
        a: socket.socket,
        b: socket.socket,
        stats: RelayStats | None = None,
        greeting: bytes = b"",
        early: bytes = b"",
        idle_timeout: float = 0.0,
    ) -> RelayStats:
        """
        Relay between connected sockets C{a} and C{b}, which the loop now
        owns (and closes).  C{greeting} goes to A before anything else (not
        counted: tcpd's C{ok}); C{early}, bytes A sent before the join, goes
        to B first and counts as C{forward}.  A relay on which no byte moves
        either way for C{idle_timeout} seconds is closed (0: never).
        """
        stats = stats if stats is not None else RelayStats()
        if self._stopped:
            a.close()
            b.close()
            return stats
        if stats.registry is not None:
            stats.registry.add(stats)
        stats.forward += len(early)
        for sock in (a, b):
            sock.setblocking(False)
        self._call(lambda: self._add(a, b, stats, greeting, early, idle_timeout))
        return stats

    def abort(self, stats: RelayStats) -> None:
        """End the relay that C{stats} counts now, closing both sockets."""
        self._call(lambda: self._abort(stats))

    def buffered(self) -> int:
        """Bytes the relays hold, read but not yet sent (an estimate)."""
        return sum(len(side.pending) for side in list(self._sides.values()))

    def sides(self) -> list[Side]:
        """The relays' sides (a snapshot, for tests and status)."""
        return list(self._sides.values())

    # The reactor's thread (whichever thread calls join, abort and stop).

    def _call(self, f: Callable[[], None]) -> None:
        if not self._stopped:
            self._calls.append(f)
            os.eventfd_write(self._wake, 1)

    # The loop's thread from here on.

    def _run(self) -> None:
        try:
            while self._running:
                self.turn()
        except BaseException:
            self._report(self.log.failure, "the relay loop failed", Failure())
            self._stop()

    def turn(self, timeout: float = -1) -> None:
        """
        Wait up to C{timeout} seconds (-1: until something happens) for
        events and handle them; end relays whose idle deadline has passed.
        """
        if self._sweep_at < math.inf:
            due = max(0.0, self._sweep_at - self._clock())
            timeout = due if timeout < 0 else min(timeout, due)
        ready = self._epoll.poll(timeout)
        self._now = self._clock()
        for fd, events in ready:
            if fd == self._wake:
                os.eventfd_read(self._wake)
                while self._calls:
                    self._calls.popleft()()
                continue
            side = self._sides.get(fd)
            if side is None:
                continue  # its relay ended earlier in this batch
            if events & _ERR:
                self._end(side)  # a reset: nothing more can be delivered
                continue
            try:
                if events & _HUP and not side.hup:
                    # The far end is gone: nothing more goes to it, but
                    # what it sent before is read on, up to its EOF.
                    side.hup = True
                    side.pending = memoryview(b"")
                if events & (_IN | _HUP) and side.reading:
                    self._read(side)
                if events & _OUT and side.pending:
                    self._write(side)
            except OSError:
                self._end(side)  # a reset, a broken pipe: the relay is over
                continue
            except Exception:
                self._report(self.log.failure, "relay failed", Failure())
                self._end(side)
                continue
            if side.finished:
                self._end(side)
            else:
                self._watch(side)
                self._watch(side.peer)
        if self._now >= self._sweep_at:
            self._expire()

    def _read(self, side: Side) -> None:
        try:
            count = side.sock.recv_into(self._buffer)
        except (BlockingIOError, InterruptedError):
            return
        peer = side.peer
        if not count:
            side.eof = True
            if not peer.pending:
                _shut(peer)
            return
        stats = side.stats
        stats.moved = self._now
        if side.forward:
            stats.forward += count
        else:
            stats.backward += count
        data = self._view[:count]
        try:
            sent = peer.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent < count:
            # Keep the rest (a copy: the buffer is reused) and stop reading
            # this side until the peer has taken it.
            peer.pending = memoryview(data[sent:].tobytes())

    def _write(self, side: Side) -> None:
        try:
            sent = side.sock.send(side.pending)
        except (BlockingIOError, InterruptedError):
            return
        if sent:
            side.stats.moved = self._now
        side.pending = side.pending[sent:]
        if not side.pending and side.peer.eof:
            _shut(side)

    def _watch(self, side: Side) -> None:
        """
        Make the epoll watch for what C{side} waits for now.  With an empty
        mask a side stays registered: its hangup or error is still reported.
        """
        mask: int | None = (_IN if side.reading else 0) | (_OUT if side.pending else 0)
        if not mask and side.hup:
            # Hung up and waiting for its peer to catch up: a hangup is
            # reported for as long as it lasts, so out of the epoll until
            # it can be read again (nothing new can happen to it).
            mask = None
        if mask == side.mask:
            return
        if mask is None:
            self._epoll.unregister(side.fd)
        elif side.mask is None:
            self._epoll.register(side.fd, mask)
        else:
            self._epoll.modify(side.fd, mask)
        side.mask = mask

    def _add(
        self,
        a: socket.socket,
        b: socket.socket,
        stats: RelayStats,
        greeting: bytes,
        early: bytes,
        idle_timeout: float,
    ) -> None:
        side_a, side_b = Side(a, stats, True), Side(b, stats, False)
        side_a.peer, side_b.peer = side_b, side_a
        side_a.pending, side_b.pending = memoryview(greeting), memoryview(early)
        if not self._running:
            self._end(side_a)
            return
        stats.moved = self._now = self._clock()
        if idle_timeout > 0:
            side_a.timeout = side_b.timeout = idle_timeout
            self._sweep_at = min(self._sweep_at, self._now + idle_timeout)
        for side in (side_a, side_b):
            self._sides[side.fd] = side
            self._watch(side)

    def _end(self, side: Side) -> None:
        """Close both sockets of C{side}'s relay; its stats leave the registry."""
        for each in (side, side.peer):
            if self._sides.get(each.fd) is each:
                del self._sides[each.fd]
                if each.mask is not None:
                    self._epoll.unregister(each.fd)
            each.sock.close()
        self._report(_ended, side.stats)

    def _expire(self) -> None:
        """End the relays idle past their deadline; find the next one."""
        now, earliest = self._now, math.inf
        for side in list(self._sides.values()):
            if not side.forward or not side.timeout or side.fd not in self._sides:
                continue  # one look per relay (at side A), if it has a deadline
            deadline = side.stats.moved + side.timeout
            if deadline > now:
                earliest = min(earliest, deadline)
                continue
            stats = side.stats
            self._report(
                self.log.info,
                "closing the relay of {peer} for {service!r}: idle for {timeout:g} s",
                peer=stats.description,
                service=stats.service,
                timeout=side.timeout,
            )
            self._end(side)
        # Not sooner than SWEEP_INTERVAL from now: busy relays whose
        # deadlines keep moving need not be looked at on every turn.
        if earliest < math.inf:
            earliest = max(earliest, now + SWEEP_INTERVAL)
        self._sweep_at = earliest

    def _abort(self, stats: RelayStats) -> None:
        for side in list(self._sides.values()):
            if side.stats is stats and side.fd in self._sides:
                self._end(side)

    def _stop(self) -> None:
        self._running = False
        for side in list(self._sides.values()):
            if side.fd in self._sides:
                self._end(side)


def _ended(stats: RelayStats) -> None:
    if stats.registry is not None:
        stats.registry.discard(stats)
    on_end, stats.on_end = stats.on_end, None  # once, however it ended
    if on_end is not None:
        on_end()


def _shut(side: Side) -> None:
    """Pass an EOF on: no more bytes for this socket's far end."""
    try:
        side.sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # already gone: its next read or write ends the relay


def take_socket(transport: Any) -> socket.socket:
    """
    Take a connected socket away from its Twisted transport, for a relay.

    The reactor stops watching it, and the transport is then simply dropped:
    closing it instead would shut the connection down (a TCP transport calls
    C{shutdown} before C{close}), and the socket object stays open as long as
    the relay holds it.
    """
    transport.stopReading()
    transport.stopWriting()
    return transport.getHandle()
