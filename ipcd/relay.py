"""
The bidirectional relay: two connections joined byte for byte.

One interface, L{IRelayEngine}, and two engines that provide it, both run
by the reactor (no thread of their own):

  - L{SocketRelays}, the fast path, joins two connected raw sockets.  Each
    socket is a plain non-blocking socket watched by the reactor's own
    poller (C{addReader}/C{addWriter}).  tcpd uses it.
  - L{TransportRelays} joins two Twisted transports (TLS, WebSocket, UDP
    sessions, anything with a transport) through a pair of
    L{RelayProtocol}s that register producers both ways, as Twisted's
    C{portforward} does.

Both behave alike: at most one read (or one transport's buffer) held per
direction, so a slow receiver pushes back on a fast sender instead of
growing ipcd's memory; an EOF is a half-close passed on after the bytes
before it; a reset on either side closes both; a relay on which nothing
moves for its idle deadline is closed; and L{RelayStats} counts the bytes,
lists the relay in its C{registry} while it lives and calls C{on_end} once
when it ends.

L{SocketRelays} in detail.  Each direction reads up to L{READ_SIZE} bytes
and sends them on at once; once a read brings L{SPLICE_AT} bytes or more,
the direction streams, and goes through a pipe with splice(2) instead, so
its bytes are not copied into ipcd (a pipe holds at most one read too).
What the receiver does not take is kept, and the sender is not read again
until it is flushed.  A side is always watched
for a hangup: while it is neither read nor written, it sits in the engine's
own epoll with an empty mask (which reports only hangups and errors), and
that epoll is one more reader in the reactor:

  - an error (a TCP reset; an AF_UNIX peer that closed without reading all
    we sent it) ends the relay at once;
  - a hangup without an error (an AF_UNIX peer that closed; both halves of a
    TCP connection shut) means the far end takes nothing more: the
    direction towards it is over, and what it sent before is still
    delivered, then the relay ends;
  - a plain FIN is a half-close: found by the read that returns 0, in order
    after the data, and passed on as C{shutdown(SHUT_WR)}.

A receiver that never reads, behind a sender that has half-closed or hung
up, is the one case left; the idle deadline (C{join}'s C{idle_timeout})
ends a relay on which no byte has moved for that long.
"""

from __future__ import annotations

import errno
import fcntl
import math
import os
import select
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Self

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IReadDescriptor,
    IWriteDescriptor,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from ipcd.compat import twisted as compat_twisted

# Big reads: fewer passes on bulk transfers.  One buffer per engine, reused
# by every read (all in the reactor's thread), so no per-read allocation.
READ_SIZE = 256 * 1024

# A direction whose read returns at least this much carries a stream: from
# then on its bytes go through a pipe with splice(2), socket to pipe to
# socket, and are never copied into ipcd.  Messages (an RTT's 100 bytes)
# never get there, nor do idle relays: a pipe costs two fds.
SPLICE_AT = 64 * 1024

# Streaming directions with a pipe at once, per engine: the fds they cost
# stay bounded (2 each) however many relays a peer drives to stream, so
# they never take the fds lookups and new connections need.  The rest copy.
MAX_PIPES = 256
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK

# Idle deadlines are checked at most this often (seconds): a sweep looks at
# every relay, and a deadline of minutes needs no finer grain.
SWEEP_INTERVAL = 0.5

# Errors that mean the connection is gone (a reset, a broken pipe): the
# relay ends, quietly.  Anything else is a failure, and is logged.
# Nothing owed: one shared empty view, not one per side (idle relays are
# many, and a memoryview costs about 250 bytes).
_NOTHING = memoryview(b"")

_GONE = frozenset(
    {
        errno.ECONNRESET,
        errno.EPIPE,
        errno.ECONNABORTED,
        errno.ETIMEDOUT,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENOTCONN,
    }
)


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
    moved: float = 0.0  # when a byte last moved (the engine's clock)
    registry: set[RelayStats] | None = None
    # Called in the reactor's thread once the relay has ended.
    on_end: Callable[[], None] | None = None

    @classmethod
    def of(
        cls,
        who: Any,
        direction: str,
        service: str,
        route: str,
        registry: set[RelayStats] | None,
        **extra: Any,
    ) -> Self:
        """
        The stats of a relay for C{who} (a L{ipcd.identity.Peer}): its
        description and labels.  The service and labels are strings shared
        with other relays, since each idle relay keeps them for its life.
        """
        return cls(
            description=str(who),
            direction=direction,
            service=sys.intern(service),
            route=route,
            labels=tuple(sys.intern(label) for label in getattr(who, "labels", ())),
            registry=registry,
            **extra,
        )

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


def began(stats: RelayStats) -> None:
    """A relay has begun: it is in its registry (status lists it) until L{ended}."""
    if stats.registry is not None:
        stats.registry.add(stats)


def ended(stats: RelayStats) -> None:
    """A relay has ended: it leaves its registry, and C{on_end} runs (once)."""
    if stats.registry is not None:
        stats.registry.discard(stats)
    on_end, stats.on_end = stats.on_end, None  # once, however it ended
    if on_end is not None:
        on_end()


def _log_idle(log: Logger, stats: RelayStats, timeout: float) -> None:
    log.info(
        "closing the relay of {peer} for {service!r}: idle for {timeout:g} s",
        peer=stats.description,
        service=stats.service,
        timeout=timeout,
    )


class IdleSweep:
    """
    The idle deadlines of one engine's relays, on one timer: it fires at the
    earliest deadline, and after a sweep not sooner than L{SWEEP_INTERVAL}
    (busy relays, whose deadlines keep moving, need not be looked at on
    every event).  C{relays()} gives each live relay that has a deadline
    once, as (stats, timeout, handle); C{end(handle)} closes it.
    """

    def __init__(
        self,
        clock: Any,
        log: Logger,
        relays: Callable[[], Iterable[tuple[RelayStats, float, Any]]],
        end: Callable[[Any], None],
    ) -> None:
        self._clock = clock
        self._log = log
        self._relays = relays
        self._end = end
        self._call: Any = None  # the DelayedCall of the next sweep
        self._at = math.inf

    def schedule(self, when: float) -> None:
        """A deadline at C{when} (the clock's seconds): sweep by then."""
        if when >= self._at:
            return
        self.cancel()
        self._at = when
        delay = max(0.0, when - self._clock.seconds())
        self._call = self._clock.callLater(delay, self._sweep)

    def start(self, stats: RelayStats, sides: Iterable[Any], timeout: float) -> None:
        """
        A relay starts now: nothing has moved yet; with a C{timeout} (0:
        none), each of its C{sides} gets it and the sweep is due by then.
        """
        stats.moved = now = self._clock.seconds()
        if timeout > 0:
            for side in sides:
                side.timeout = timeout
            self.schedule(now + timeout)

    def cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call, self._at = None, math.inf

    def _sweep(self) -> None:
        """End the relays idle past their deadline; find the next one."""
        self._call, self._at = None, math.inf
        now, earliest = self._clock.seconds(), math.inf
        for stats, timeout, handle in self._relays():
            deadline = stats.moved + timeout
            if deadline > now:
                earliest = min(earliest, deadline)
                continue
            _log_idle(self._log, stats, timeout)
            self._end(handle)
        if earliest < math.inf:
            self.schedule(max(earliest, now + SWEEP_INTERVAL))


class IRelayEngine(Interface):
    """
    Runs relays: joins pairs of connections and owns them until they end.
    Every method is called in the reactor's thread.
    """

    def start() -> None:
        """Start relaying (before the first L{join})."""

    def stop() -> None:
        """
        Close every relay held, without blocking; later joins are refused
        (their connections closed, their stats ended).
        """

    def join(
        a: Any,
        b: Any,
        stats: RelayStats | None = None,
        greeting: bytes = b"",
        early: bytes = b"",
        idle_timeout: float = 0.0,
    ) -> RelayStats:
        """
        Relay between C{a} (the peer that asked: side A) and C{b} (the
        service: side B), which the engine now owns and closes.  What they
        are depends on the engine: connected sockets (L{SocketRelays}),
        L{RelayProtocol}s (L{TransportRelays}).  C{greeting} goes to A
        before anything else (not counted); C{early}, bytes A sent before
        the join, goes to B first and counts as C{forward}.  A relay on
        which no byte moves either way for C{idle_timeout} seconds is
        closed (0: never).  C{stats} (a new L{RelayStats} if None) is
        added to its registry until the relay ends; returns it.
        """

    def abort(stats: RelayStats) -> None:
        """End the relay that C{stats} counts now, closing both sides."""

    def buffered() -> int:
        """Bytes the relays hold, read but not yet delivered."""

    failure = Attribute(
        "None while the engine works; once it has failed, why (a string):"
        " it closed its relays and refuses new ones."
    )


# Where a side is registered: the reactor's readers, its writers, or the
# engine's own epoll (hangups and errors only).  At most one of those at a
# time besides READ|WRITE; CLOSED once its relay has ended.
_READ, _WRITE, _WATCH, _CLOSED = 1, 2, 4, 8


@implementer(IReadDescriptor, IWriteDescriptor)
class Side:
    """One socket of a relay run by L{SocketRelays}."""

    __slots__ = (
        "engine",
        "sock",
        "fd",
        "peer",
        "stats",
        "forward",
        "pending",
        "eof",
        "hup",
        "where",
        "timeout",
        "pipe",
        "piped",
    )

    def __init__(
        self,
        engine: SocketRelays,
        sock: socket.socket,
        stats: RelayStats,
        forward: bool,
    ) -> None:
        self.engine = engine
        self.sock = sock
        self.fd = sock.fileno()
        self.peer: Side = self
        self.stats = stats
        self.forward = forward  # what it reads counts as stats.forward (side A)
        self.pending = _NOTHING  # bytes for this socket it has not taken
        self.eof = False  # this socket's far end has stopped sending
        self.hup = False  # ... and takes nothing more: it hung up
        self.where = 0  # _READ|_WRITE, _WATCH, or _CLOSED
        self.timeout = 0.0  # the relay's idle deadline in seconds; 0: none
        # Once it streams: the pipe (read end, write end, size) its reads go
        # through to the peer, and how many bytes in it the peer has not taken.
        self.pipe: tuple[int, int, int] | None = None
        self.piped = 0

    @property
    def owed(self) -> bool:
        """Bytes for this socket that it has not taken yet (kept, or in a pipe)."""
        return bool(self.pending) or self.peer.piped > 0

    @property
    def reading(self) -> bool:
        """
        Read while the far end sends and the peer has taken everything, and
        while there is somewhere to send it.
        """
        return not self.eof and not self.peer.owed and not self.peer.hup

    @property
    def finished(self) -> bool:
        """Nothing more can move on this side's relay: it may end."""
        peer = self.peer
        if self.owed or peer.owed:
            return False
        # Each direction is over once its sender's EOF was passed on, or
        # once its receiver hung up (nothing can reach it any more).
        return (self.eof or peer.hup) and (peer.eof or self.hup)

    # IReadDescriptor, IWriteDescriptor: the reactor calls these.

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:  # noqa: N802 (Twisted's name)
        return "relay"

    def doRead(self) -> None:  # noqa: N802 (Twisted's name)
        self.engine._ready(self, writable=False)

    def doWrite(self) -> None:  # noqa: N802 (Twisted's name)
        self.engine._ready(self, writable=True)

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802
        # The reactor saw a hangup or an error on this socket while it was
        # registered (and has unregistered it).
        self.where &= ~(_READ | _WRITE)
        self.engine._hangup(self, None)


@implementer(IReadDescriptor)
class _Watch:
    """
    The engine's own epoll, a reader in the reactor: it holds the sides the
    reactor does not watch (neither read nor written now) with an empty
    mask, so their hangups and errors are still reported.
    """

    def __init__(self, engine: SocketRelays) -> None:
        self.engine = engine
        self.epoll = select.epoll()

    def fileno(self) -> int:
        return self.epoll.fileno()

    def logPrefix(self) -> str:  # noqa: N802 (Twisted's name)
        return "relays"

    def doRead(self) -> None:  # noqa: N802 (Twisted's name)
        self.engine._watched()

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802
        self.engine._broken(reason)


@implementer(IRelayEngine)
class SocketRelays:
    """
    Relays between pairs of connected sockets, on the reactor's own poller.
    C{reactor} provides C{IReactorFDSet}; C{clock} (default: C{reactor})
    provides C{IReactorTime}, for idle deadlines.
    """

    log = Logger()

    def __init__(self, reactor: Any, clock: Any = None) -> None:
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        self._sides: dict[int, Side] = {}
        self._buffer = bytearray(READ_SIZE)
        self._view = memoryview(self._buffer)
        self._watch: _Watch | None = None
        self._idle = IdleSweep(self._clock, self.log, self._timed, self._end)
        self._splice = True  # until the kernel refuses it
        self.max_pipes = MAX_PIPES
        self._pipes = 0  # pipes open now
        self.failure: str | None = None

    # IRelayEngine

    def start(self) -> None:
        if self._watch is not None:
            return
        self.failure = None
        self._watch = _Watch(self)
        self._reactor.addReader(self._watch)

    def stop(self) -> None:
        """Close every relay; joins from now on are refused."""
        self._close_all()
        self._unwatch()

    def join(
        self,
        a: socket.socket,
        b: socket.socket,
        stats: RelayStats | None = None,
        greeting: bytes = b"",
        early: bytes = b"",
        idle_timeout: float = 0.0,
    ) -> RelayStats:
        stats = stats if stats is not None else RelayStats()
        if self._watch is None:
            if self.failure is not None:
                self.log.warn(
                    "refusing the relay of {peer} for {service!r}: {failure}",
                    peer=stats.description,
                    service=stats.service,
                    failure=self.failure,
                )
            a.close()
            b.close()
            ended(stats)
            return stats
        began(stats)
        stats.forward += len(early)
        side_a, side_b = Side(self, a, stats, True), Side(self, b, stats, False)
        side_a.peer, side_b.peer = side_b, side_a
        self._sides[side_a.fd] = side_a
        self._sides[side_b.fd] = side_b
        self._idle.start(stats, (side_a, side_b), idle_timeout)
        try:
            for side in (side_a, side_b):
                side.sock.setblocking(False)
            # The greeting and the early bytes go at once if they can.
            for side, data in ((side_a, greeting), (side_b, early)):
                side.pending = memoryview(data) if data else _NOTHING
                if data:
                    self._write(side)
        except Exception as e:
            self._error(side_a, e)
            return stats
        self._settle(side_a)
        return stats

    def abort(self, stats: RelayStats) -> None:
        for side in list(self._sides.values()):
            if side.stats is stats:
                self._end(side)

    def buffered(self) -> int:
        return sum(len(side.pending) + side.piped for side in self._sides.values())

    def sides(self) -> list[Side]:
        """The relays' sides (a snapshot, for tests and status)."""
        return list(self._sides.values())

    # Events, from the reactor.

    def _ready(self, side: Side, writable: bool) -> None:
        if side.where & _CLOSED:
            return  # its relay ended earlier in this batch of events
        try:
            if writable:
                if side.owed:
                    self._write(side)
            elif side.reading and self._read(side):
                return  # passed on whole: nothing to register anew
        except Exception as e:
            self._error(side, e)
            return
        self._settle(side)

    def _hangup(self, side: Side, error: bool | None) -> None:
        """
        A hangup or an error on C{side}'s socket (C{error} None: unknown,
        ask the socket).
        """
        if side.where & _CLOSED:
            return
        try:
            if error is None:
                error = bool(side.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
            if error:
                self._end(side)  # a reset: nothing more can be delivered
                return
            if not side.hup:
                # The far end is gone: nothing more goes to it, but what
                # it sent before is read on, up to its EOF.
                side.hup = True
                side.pending = _NOTHING
                self._close_pipe(side.peer)  # what it holds cannot be delivered
            if side.reading:
                self._read(side)
        except Exception as e:
            self._error(side, e)
            return
        self._settle(side)

    def _watched(self) -> None:
        """The engine's epoll has events: hangups and errors."""
        watch = self._watch
        if watch is None:
            return
        try:
            events = watch.epoll.poll(0)
        except Exception:
            self._broken(Failure())
            return
        for fd, mask in events:
            side = self._sides.get(fd)
            if side is not None and side.where & _WATCH:
                self._hangup(side, bool(mask & select.EPOLLERR))

    # Moving bytes.

    def _read(self, side: Side) -> bool:
        """
        Read C{side} and send on what it read: whether it was all taken
        (then nothing about the relay's registration has changed).
        """
        if side.pipe is not None:
            self._splice_in(side)
            return False
        try:
            count = side.sock.recv_into(self._buffer)
        except (BlockingIOError, InterruptedError):
            return False
        peer = side.peer
        if not count:
            self._eof(side)
            return False
        self._count(side, count)
        if count >= SPLICE_AT and self._splice and self._pipes < self.max_pipes:
            self._open_pipe(side)
        data = self._view[:count]
        try:
            sent = peer.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent < count:
            # Keep the rest (a copy: the buffer is reused) and stop reading
            # this side until the peer has taken it.
            peer.pending = memoryview(data[sent:].tobytes())
            return False
        return True

    def _write(self, side: Side) -> None:
        if side.pending:
            try:
                sent = side.sock.send(side.pending)
            except (BlockingIOError, InterruptedError):
                return
            rest = side.pending[sent:]
            side.pending = rest if rest else _NOTHING
        else:
            sent = self._splice_out(side.peer)
        if sent:
            side.stats.moved = self._clock.seconds()
        if not side.owed and side.peer.eof:
            _shut(side)

    def _eof(self, side: Side) -> None:
        """C{side}'s far end sent EOF: pass it on once the peer has the rest."""
        side.eof = True
        if not side.peer.owed:
            _shut(side.peer)

    def _count(self, side: Side, count: int) -> None:
        stats = side.stats
        stats.moved = self._clock.seconds()
        if side.forward:
            stats.forward += count
        else:
            stats.backward += count

    def _splice_in(self, side: Side) -> None:
        """A streaming side's read: into its pipe, and on to the peer."""
        assert side.pipe is not None
        try:
            count = os.splice(side.fd, side.pipe[1], side.pipe[2], flags=_SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            if e.errno not in _NO_SPLICE:
                raise
            # Not for these sockets after all: back to copying, for good.
            self._splice = False
            self.log.warn("splice(2) refused ({error}); relays copy", error=e)
            self._close_pipe(side)
            return
        if not count:
            self._eof(side)
            return
        self._count(side, count)
        side.piped += count
        self._splice_out(side)

    def _splice_out(self, side: Side) -> int:
        """Move what C{side}'s pipe holds to its peer; the bytes moved."""
        assert side.pipe is not None
        try:
            moved = os.splice(
                side.pipe[0], side.peer.fd, side.piped, flags=_SPLICE_FLAGS
            )
        except (BlockingIOError, InterruptedError):
            return 0
        side.piped -= moved
        return moved

    # Registration.

    def _settle(self, side: Side) -> None:
        """After an event on C{side}: end its relay, or watch what it waits for."""
        try:
            if side.finished:
                self._end(side)
            else:
                self._place(side)
                self._place(side.peer)
        except Exception:
            self._fail(side)

    def _place(self, side: Side) -> None:
        """
        Register C{side} for what it waits for now: reading, writing, or
        (neither) a hangup, in the engine's epoll.  A side that hung up and
        waits for its peer to catch up is nowhere: a hangup is reported for
        as long as it lasts, and nothing new can happen to it.
        """
        where = (_READ if side.reading else 0) | (_WRITE if side.owed else 0)
        if not where and not side.hup:
            where = _WATCH
        was = side.where
        if where == was:
            return
        side.where = where
        changed = where ^ was
        reactor = self._reactor
        if changed & _WATCH:
            watch = self._watch
            if watch is None:
                raise RuntimeError("the relay engine is not running")
            if where & _WATCH:
                watch.epoll.register(side.fd, 0)
            else:
                watch.epoll.unregister(side.fd)
        if changed & _READ:
            if where & _READ:
                reactor.addReader(side)
            else:
                reactor.removeReader(side)
        if changed & _WRITE:
            if where & _WRITE:
                reactor.addWriter(side)
            else:
                reactor.removeWriter(side)

    def _open_pipe(self, side: Side) -> None:
        """Give a streaming side its pipe, as big as a read; none if fds run out."""
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return  # EMFILE and the like: this side keeps copying
        try:
            size = fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, READ_SIZE)
        except OSError:
            size = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
        side.pipe = (r, w, size)
        self._pipes += 1

    def _close_pipe(self, side: Side) -> None:
        """Close C{side}'s pipe, dropping what it holds."""
        pipe, side.pipe, side.piped = side.pipe, None, 0
        if pipe is not None:
            self._pipes -= 1
            os.close(pipe[0])
            os.close(pipe[1])

    # Ending.

    def _end(self, side: Side) -> None:
        """Close both sockets of C{side}'s relay; its stats leave the registry."""
        if side.where & _CLOSED:
            return
        for each in (side, side.peer):
            where, each.where = each.where, _CLOSED
            if self._sides.get(each.fd) is each:
                del self._sides[each.fd]
            try:
                if where & _READ:
                    self._reactor.removeReader(each)
                if where & _WRITE:
                    self._reactor.removeWriter(each)
                if where & _WATCH and self._watch is not None:
                    self._watch.epoll.unregister(each.fd)
            except Exception:
                self.log.failure("unregistering a relay's socket", Failure())
            each.pending = _NOTHING
            self._close_pipe(each)
            each.sock.close()
        ended(side.stats)

    def _error(self, side: Side, error: Exception) -> None:
        """
        C{error} was raised in C{side}'s relay: a reset or a broken pipe
        ends it quietly; anything else is a failure.
        """
        if isinstance(error, OSError) and error.errno in _GONE:
            self._end(side)
        else:
            self._fail(side)

    def _fail(self, side: Side) -> None:
        """Something unexpected in C{side}'s relay: log it, and end the relay."""
        stats = side.stats
        self.log.failure(
            "the relay of {peer} for {service!r} failed; closing it",
            Failure(),
            peer=stats.description,
            service=stats.service,
        )
        self._end(side)

    def _broken(self, reason: Failure) -> None:
        """
        The engine itself failed (its epoll): it can no longer see hangups,
        so it closes every relay and refuses new ones.
        """
        if self._watch is None:
            return
        self.failure = f"the relay engine failed: {reason.getErrorMessage()}"
        self.log.failure(
            "the relay engine failed; closing its {count} relays and refusing new ones",
            reason,
            count=len(self._sides) // 2,
        )
        self._close_all()
        self._unwatch()

    def _close_all(self) -> None:
        for side in list(self._sides.values()):
            self._end(side)
        self._idle.cancel()

    def _unwatch(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            self._reactor.removeReader(watch)
            watch.epoll.close()

    # Idle deadlines.

    def _timed(self) -> Iterator[tuple[RelayStats, float, Side]]:
        """Each live relay with a deadline, once (at side A), for L{IdleSweep}."""
        for side in list(self._sides.values()):
            if side.forward and side.timeout and not side.where & _CLOSED:
                yield side.stats, side.timeout, side


# What splice(2) says when it cannot join these fds (not a failure of the
# connection): the engine goes back to copying.
_NO_SPLICE = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})


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


# Relays between Twisted transports.


@implementer(IHalfCloseableProtocol)
class RelayProtocol(Protocol, TimeoutMixin):
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
        self.writeDone = False  # the EOF was passed on to our far end
        self._held: list[bytes] = []  # read before the peer was connected
        self._onEnd: Callable[[], None] | None = None

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
        self.writeDone = True
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
        _log_idle(self.log, self.stats, self.idle_timeout)
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
class TransportRelays:
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

    def join(
        self,
        a: RelayProtocol,
        b: RelayProtocol,
        stats: RelayStats | None = None,
        greeting: bytes = b"",
        early: bytes = b"",
        idle_timeout: float = 0.0,
    ) -> RelayStats:
        stats = stats if stats is not None else a.stats
        a.stats = stats
        if a.clock is None:
            a.clock = self.clock
        pair(a, b)
        if not self._running:
            a.abort()
            if a.lost and b.lost:
                ended(stats)
            return stats
        began(stats)
        stats.forward += len(early)
        a.outgoing, b.outgoing = a.outgoing + greeting, b.outgoing + early
        a.idle_timeout = b.idle_timeout = idle_timeout
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
        return stats

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
