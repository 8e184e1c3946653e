"""
The socket relay engine, L{SocketRelays}: it joins two connected raw
sockets, each a plain non-blocking socket watched by the reactor's own
poller (C{addReader}/C{addWriter}), with no thread of its own.  tlsd's
relays are this engine too: the TLS side's socket carries a codec
(L{ipcd.relay.engine.ICodec}; L{ipcd.daemons.tls.relay}).

Each direction reads up to L{READ_SIZE} bytes and sends them on at once;
once a read between two plain sockets brings L{SPLICE_AT} bytes or more,
the direction goes through a pipe with splice(2) instead
(L{ipcd.relay.pipes}).  A direction with a kernel TLS end (a codec whose
bytes are C{plaintext}) goes through a pipe from its first byte.  What
the receiver does not take is kept, and the sender is not read again
until it is flushed.  A side is always watched for a hangup
(L{ipcd.relay.sides}).  A FIN is a half-close: found by the read that
returns 0, after the data, and passed on as C{shutdown(SHUT_WR)} (or as a
codec's own EOF: TLS's close_notify).  A codec's EOF is passed on
alike, and so is a TCP EOF under TLS without a close_notify (a client
holding a kernel TLS socket ends it so).  A receiver that never reads, behind a
sender that has half-closed or hung up, is the one case left: the idle
deadline (C{join}'s C{idle_timeout}) ends a relay on which no byte has
moved for that long.
"""

from __future__ import annotations

import select
import socket
from collections.abc import Iterator
from typing import Any

from twisted.internet.interfaces import IReactorCore
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ipcd.relay.engine import IRelayEngine, Join, RelayEnded, RelayEngine
from ipcd.relay.idle import IdleSweep
from ipcd.relay.pipes import Pipes
from ipcd.relay.sides import (
    CLOSED,
    GONE,
    MAX_PIPES,
    NOTHING,
    READ,
    READ_SIZE,
    SPLICE_AT,
    WATCH,
    WRITE,
    Side,
    Watch,
)
from ipcd.relay.stats import RelayStats, ended


@implementer(IRelayEngine)
class SocketRelays(Pipes, RelayEngine):
    """
    Relays between pairs of connected sockets, on the reactor's own poller.
    Either end of a join may instead be a secured end (one that gives its
    socket and a codec: L{ipcd.daemons.tls.relay.Secured}).  C{reactor}
    provides C{IReactorFDSet}; C{clock} (default: C{reactor}) provides
    C{IReactorTime}, for idle deadlines.  A started engine whose C{reactor}
    also provides C{IReactorCore} stops before the reactor shuts down,
    whether L{stop} was called or not.
    """

    log = Logger()

    def __init__(self, reactor: Any, clock: Any = None) -> None:
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        self._sides: dict[int, Side] = {}
        # What every read goes into, and a codec decodes into.
        self.buffer = bytearray(READ_SIZE)
        self._view = memoryview(self.buffer)
        # What codecs of one kind share on this engine (their buffers): all
        # used in the reactor's thread, one event at a time.
        self.shared: dict[Any, Any] = {}
        # The engine's epoll, a reader in the reactor only while it has
        # relays: an engine started and idle costs the reactor nothing.
        self._watch: Watch | None = None
        self._running = False
        # The reactor's "before shutdown" trigger that stops the engine.
        self._shutdown: Any = None
        self._idle = IdleSweep(self._clock, self.log, self._timed, self._end)
        self._splice = True  # until the kernel refuses it
        self.max_pipes = MAX_PIPES
        self._pipes = 0  # pipes open now
        self.failure: str | None = None

    # IRelayEngine

    def start(self) -> None:
        self._running = True
        self.failure = None
        if self._shutdown is None and IReactorCore.providedBy(self._reactor):
            # A reactor shutting down lets go of every reader it has with a
            # lost connection: the engine's epoll among them, as if it had
            # failed.  An owner that never called stop() (ipcd calls it as
            # its services stop) still has its relays closed quietly.
            self._shutdown = self._reactor.addSystemEventTrigger(
                "before", "shutdown", self._reactor_stopping
            )

    def stop(self) -> None:
        """Close every relay; joins from now on are refused."""
        trigger, self._shutdown = self._shutdown, None
        if trigger is not None:
            self._reactor.removeSystemEventTrigger(trigger)
        self._running = False
        self._close_all()
        self._unwatch()

    def _reactor_stopping(self) -> None:
        self._shutdown = None  # fired: no longer the reactor's to remove
        self.stop()

    def _accepting(self) -> bool:
        return self._running

    def _refuse(self, join: Join) -> None:
        stats = join.stats
        if self.failure is not None:
            self.log.warn(
                "refusing the relay of {peer} for {service!r}: {failure}",
                peer=stats.description,
                service=stats.service,
                failure=self.failure,
            )
        join.a.close()
        join.b.close()
        ended(stats)

    def _relay(self, join: Join) -> None:
        if self._watch is None:
            try:
                self._watch = Watch(self)
            except OSError as e:
                # No descriptor for the engine's epoll (EMFILE): this join
                # is refused as a stopped engine's are, its ends closed
                # and its stats ended (limits given back); the next tries
                # again.  It was left in the registry, counted for good.
                self.log.warn(
                    "refusing the relay of {peer} for {service!r}: {error}",
                    peer=join.stats.description,
                    service=join.stats.service,
                    error=e.strerror or e,
                )
                self._refuse(join)
                return
            self._reactor.addReader(self._watch)
        stats = join.stats
        side_a = Side.of(self, join.a, stats, True)
        side_b = Side.of(self, join.b, stats, False)
        side_a.peer, side_b.peer = side_b, side_a
        self._sides[side_a.fd] = side_a
        self._sides[side_b.fd] = side_b
        self._idle.start(stats, (side_a, side_b), join.idle_timeout)
        try:
            for side in (side_a, side_b):
                side.sock.setblocking(False)
            # The greeting and the early bytes go at once if they can.
            for side, data in ((side_a, join.greeting), (side_b, join.early)):
                if data:
                    codec = side.codec
                    side.owe(data if codec is None else codec.seal(data))
                if side.pending:
                    self._write(side)
        except Exception as e:
            self._error(side_a, e)
            return
        self._settle(side_a)

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
        if side.where & CLOSED:
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
        if side.where & CLOSED:
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
                side.pending = NOTHING
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
            if side is not None and side.where & WATCH:
                self._hangup(side, bool(mask & select.EPOLLERR))

    # Moving bytes.

    def _read(self, side: Side) -> bool:
        """
        Read C{side} and send on what it read: whether it was all taken
        (then nothing about the relay's registration has changed).
        """
        if side.pipe is None and self._streams(side):
            self._open_pipe(side)
        if side.pipe is not None:
            return self._splice_in(side)
        codec = side.codec
        if codec is not None:
            count = codec.read(side)
            made = codec.made()
            if made:  # its answer on the same socket (a TLS key update's)
                side.owe(made)
                self._write(side)
            if not count:
                if side.eof:
                    self._eof(side)
                return False
        else:
            try:
                count = side.sock.recv_into(self.buffer)
            except (BlockingIOError, InterruptedError):
                return False
            if not count:
                self._eof(side)
                return False
            if (
                count >= SPLICE_AT
                and self._splice
                and self._pipes < self.max_pipes
                and _plain(side.peer)
            ):
                self._open_pipe(side)
        self._count(side, count)
        peer = side.peer
        data = self._view[:count]
        if peer.codec is not None:
            data = peer.codec.seal(data)
        try:
            sent = peer.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent < len(data):
            # Keep the rest (a copy: the buffer is reused) and stop reading
            # this side until the peer has taken it.
            peer.pending = memoryview(data[sent:].tobytes())
            return False
        if codec is None:
            return True
        if side.eof:  # the codec's EOF came with the data
            self._eof(side)
        return False

    def _streams(self, side: Side) -> bool:
        """
        Whether C{side}'s direction goes through a pipe from its first
        byte: one with a kernel TLS end (a C{plaintext} codec), so that no
        byte of it passes through ipcd; pipes and splice(2) permitting.
        """
        peer = side.peer
        return (
            (side.codec is not None or peer.codec is not None)
            and _plain(side)
            and _plain(peer)
            and self._splice
            and self._pipes < self.max_pipes
        )

    def _write(self, side: Side) -> None:
        if side.pending:
            try:
                sent = side.sock.send(side.pending)
            except (BlockingIOError, InterruptedError):
                return
            rest = side.pending[sent:]
            side.pending = rest if rest else NOTHING
        else:
            sent = self._splice_out(side.peer)
        if sent:
            side.stats.moved = self._clock.seconds()
        if not side.owed and side.peer.eof:
            self._shut(side)

    def _eof(self, side: Side) -> None:
        """C{side}'s far end sent EOF: pass it on once the peer has the rest."""
        side.eof = True
        if not side.peer.owed:
            self._shut(side.peer)

    def _shut(self, side: Side) -> None:
        """Pass an EOF on: no more bytes for this socket's far end."""
        if side.shut or side.hup:
            return
        side.shut = True
        codec = side.codec
        if codec is None:
            try:
                side.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # already gone: its next read or write ends the relay
            return
        # The codec's own EOF (TLS's half-close: the TCP stays open for it).
        closing = codec.close()
        if closing:
            side.owe(closing)
            self._write(side)

    def _count(self, side: Side, count: int) -> None:
        stats = side.stats
        stats.moved = self._clock.seconds()
        if side.forward:
            stats.forward += count
        else:
            stats.backward += count

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
        where = (READ if side.reading else 0) | (WRITE if side.owed else 0)
        if not where and not side.hup:
            where = WATCH
        was = side.where
        if where == was:
            return
        side.where = where
        changed = where ^ was
        reactor = self._reactor
        if changed & WATCH:
            watch = self._watch
            if watch is None:
                raise RuntimeError("the relay engine is not running")
            if where & WATCH:
                watch.epoll.register(side.fd, 0)
            else:
                watch.epoll.unregister(side.fd)
        if changed & READ:
            if where & READ:
                reactor.addReader(side)
            else:
                reactor.removeReader(side)
        if changed & WRITE:
            if where & WRITE:
                reactor.addWriter(side)
            else:
                reactor.removeWriter(side)

    # Ending.

    def _end(self, side: Side) -> None:
        """Close both sockets of C{side}'s relay; its stats leave the registry."""
        if side.where & CLOSED:
            return
        for each in (side, side.peer):
            where, each.where = each.where, CLOSED
            if self._sides.get(each.fd) is each:
                del self._sides[each.fd]
            try:
                if where & READ:
                    self._reactor.removeReader(each)
                if where & WRITE:
                    self._reactor.removeWriter(each)
                if where & WATCH and self._watch is not None:
                    self._watch.epoll.unregister(each.fd)
            except Exception:
                self.log.failure("unregistering a relay's socket", Failure())
            each.pending = NOTHING
            if each.codec is not None and not each.shut and not each.hup:
                each.farewell()
            self._close_pipe(each)
            each.sock.close()
        if not self._sides:
            self._unwatch()
        ended(side.stats)

    def _error(self, side: Side, error: Exception) -> None:
        """
        C{error} was raised in C{side}'s relay: a reset or a broken pipe
        ends it quietly, a codec's error with a line saying why; anything
        else is a failure.
        """
        if isinstance(error, OSError) and error.errno in GONE:
            self._end(side)
        elif isinstance(error, RelayEnded):
            stats = side.stats
            self.log.info(
                "the relay of {peer} for {service!r} ended: {why}",
                peer=stats.description,
                service=stats.service,
                why=str(error),
            )
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
        self._running = False
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
            if side.forward and side.timeout and not side.where & CLOSED:
                yield side.stats, side.timeout, side


def _plain(side: Side) -> bool:
    """Whether C{side}'s socket carries the relay's bytes as they are."""
    return side.codec is None or side.codec.plaintext
