"""
tlsd's fast relay: a TLS connection and a plain socket, both raw sockets on
the reactor's poller, with no Twisted transport on either side.

Twisted's L{TLSMemoryBIOProtocol} does the handshake and the request; then
L{detach} takes the TCP socket and the pyOpenSSL Connection (with its
memory BIOs and all of OpenSSL's state: keys, sequence numbers, tickets)
out of Twisted.  From there an event costs one C{recv} or C{send} and the
C{SSL_read}s or C{SSL_write} it needs, called straight through the
bindings into one reused buffer, instead of Twisted's TLS and transport
machinery (a memory-BIO round, a transport buffer and two poller changes
per record); a read takes every record the socket holds at once.

L{detach} declines (and the caller keeps Twisted's path) unless the switch
is safe: handshake done, nothing Twisted still holds to encrypt, nothing
decrypted that OpenSSL has not handed out.  Records Twisted made and had
not sent yet go first.

L{TlsSocketRelays} is the engine (an L{IRelayEngine}): at most one read
held per direction (backpressure), an EOF passed on after the bytes before
it (a plain side's EOF as a TLS close_notify, a close_notify or TCP EOF as
C{shutdown(SHUT_WR)} on the plain side), a reset or a TLS error ends the
relay, and so does a TCP EOF without a close_notify (a truncation is not
an EOF), an idle deadline ends a relay on which nothing moved.  A side is
watched for hangups only while it is read or written.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from OpenSSL.SSL import OP_NO_RENEGOTIATION, Connection, WantReadError
from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IReadDescriptor, IWriteDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ipcd.compat import pyopenssl as compat_pyopenssl
from ipcd.compat import twisted as compat_twisted
from ipcd.relay import (
    _GONE,
    _NOTHING,
    READ_SIZE,
    IdleSweep,
    IRelayEngine,
    RelayStats,
    began,
    ended,
    take_socket,
)

_lib, _ffi = compat_pyopenssl.bindings()
# OpenSSL's numbers (ssl.h), should the bindings stop naming them.
_WANT_READ = getattr(_lib, "SSL_ERROR_WANT_READ", 2)
_WANT_WRITE = getattr(_lib, "SSL_ERROR_WANT_WRITE", 3)
_ZERO_RETURN = getattr(_lib, "SSL_ERROR_ZERO_RETURN", 6)
_SYSCALL = getattr(_lib, "SSL_ERROR_SYSCALL", 5)

log = Logger()


def socket_of(transport: Any) -> FileDescriptor | None:
    """The reactor's connection under a transport (TLS, limits wrappers)."""
    while transport is not None and not isinstance(transport, FileDescriptor):
        transport = getattr(transport, "transport", None)
    return transport


@dataclass
class Secured:
    """
    A TCP socket and the TLS connection on it: its C{SSL *} and memory
    BIOs (records C{into} it, records C{out}); C{unsent}: records Twisted
    had made and not sent yet, which go first.
    """

    sock: socket.socket
    connection: Connection
    ssl: Any
    into: Any
    out: Any
    unsent: bytes = b""


def detach(tls: Any) -> Secured | str:
    """
    Take TLS connection C{tls} (a L{TLSMemoryBIOProtocol}) from Twisted:
    its TCP socket leaves the reactor, with the pyOpenSSL Connection and
    the records Twisted has not sent yet.  When that is not safe now: why
    (and nothing has changed).  Everything the relay needs from Twisted's
    and pyOpenSSL's insides is read here, before the socket leaves.
    """
    try:
        why = _not_detachable(tls)
        if why:
            return why
        tcp = socket_of(tls.transport)
        connection = compat_twisted.tls_connection(tls)
        raw = compat_pyopenssl.raw_tls(connection)
        if raw is None:
            return "this pyOpenSSL does not give its SSL pointer and memory BIOs"
        unsent = compat_twisted.unsent(tcp)
        if unsent is None:
            return "this Twisted does not give the records it holds"
        sock = tcp.getHandle()
    except AttributeError as e:  # Twisted or pyOpenSSL changed under us
        return f"cannot look inside this TLS connection ({e})"
    # A renegotiation is refused (TLS 1.2): records go one way at a time.
    connection.set_options(OP_NO_RENEGOTIATION)
    take_socket(tcp)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        # Each record goes out at once: a message's round trip, not Nagle's.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return Secured(sock, connection, *raw, unsent=unsent)


def _not_detachable(tls: Any) -> str:
    """Why C{tls} cannot leave Twisted now; empty if it can."""
    tcp = socket_of(tls.transport)
    connection = compat_twisted.tls_connection(tls)
    if tcp is None or connection is None or not hasattr(tcp, "getHandle"):
        return "not a TLS connection over a socket"
    why = compat_twisted.tls_state(tls)
    if why is None:
        return "this Twisted's TLS cannot be looked inside"
    if why:
        return why
    if tls.disconnecting or tcp.disconnecting:
        return "closing"
    if not tcp.connected:
        return "not connected"
    if connection.pending() > 0:
        return "bytes received and not read"
    return ""


class _Failed(Exception):
    """A TLS error: the relay ends, and this says why."""


@implementer(IReadDescriptor, IWriteDescriptor)
class _Side:
    """One socket of a relay: plain, or TLS (C{ssl} set)."""

    __slots__ = (
        "engine",
        "sock",
        "fd",
        "connection",
        "ssl",
        "into",
        "out",
        "peer",
        "stats",
        "forward",
        "pending",
        "raw",
        "eof",
        "hup",
        "shut",
        "reading",
        "writing",
        "closed",
        "timeout",
    )

    def __init__(
        self, engine: TlsSocketRelays, end: Any, stats: RelayStats, forward: bool
    ) -> None:
        self.engine = engine
        if isinstance(end, Secured):
            self.sock, self.connection = end.sock, end.connection
            self.ssl, self.into, self.out = end.ssl, end.into, end.out
            self.raw = memoryview(end.unsent)  # records for the socket
        else:
            self.sock, self.connection, self.ssl = end, None, None
            self.into = self.out = None
            self.raw = _NOTHING
        self.fd = self.sock.fileno()
        self.peer: _Side = self
        self.stats = stats
        self.forward = forward
        self.pending = _NOTHING  # for this socket, not yet taken
        self.eof = False  # its far end sends no more
        self.hup = False  # ... and takes nothing more
        self.shut = False  # the EOF was passed on to it
        self.reading = self.writing = self.closed = False
        self.timeout = 0.0

    @property
    def owed(self) -> bool:
        """Bytes for this socket it has not taken: plaintext, or records."""
        return bool(self.pending) or bool(self.raw)

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:  # noqa: N802 (Twisted's name)
        return "tls relay"

    def doRead(self) -> None:  # noqa: N802 (Twisted's name)
        self.engine._event(self, self.engine._read)

    def doWrite(self) -> None:  # noqa: N802 (Twisted's name)
        self.engine._event(self, self.engine._flush)

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802
        # The poller saw a hangup: the reactor has unregistered this side.
        self.reading = self.writing = False
        self.eof = self.hup = True
        self.pending = _NOTHING
        self.engine._settle(self)


@implementer(IRelayEngine)
class TlsSocketRelays:
    """
    Relays between a L{Secured} TLS connection and a plain connected socket
    (either may be side A), on the reactor's poller.
    """

    log = log

    def __init__(self, reactor: Any, clock: Any = None) -> None:
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        self._sides: set[_Side] = set()
        self._buffer = bytearray(READ_SIZE)
        self._view = memoryview(self._buffer)
        self._pointer = _ffi.from_buffer(self._buffer)
        # Records read: at most half a buffer, so that what they decrypt to
        # (with a record begun in an earlier read) always fits in _buffer.
        self._records = bytearray(READ_SIZE // 2)
        self._records_pointer = _ffi.from_buffer(self._records)
        # Records made, to send: a buffer of plaintext and their overhead.
        self._sealed = bytearray(READ_SIZE + READ_SIZE // 8)
        self._sealed_pointer = _ffi.from_buffer(self._sealed)
        self._running = False
        self._idle = IdleSweep(self._clock, self.log, self._timed, self._end)
        self.failure: str | None = None

    # IRelayEngine

    def start(self) -> None:
        self._running = True

    def stop(self) -> None:
        self._running = False
        for side in list(self._sides):
            self._end(side)
        self._idle.cancel()

    def join(
        self,
        a: Any,
        b: Any,
        stats: RelayStats | None = None,
        greeting: bytes = b"",
        early: bytes = b"",
        idle_timeout: float = 0.0,
    ) -> RelayStats:
        stats = stats if stats is not None else RelayStats()
        side_a, side_b = _Side(self, a, stats, True), _Side(self, b, stats, False)
        side_a.peer, side_b.peer = side_b, side_a
        if not self._running:
            for side in (side_a, side_b):
                side.sock.close()
            ended(stats)
            return stats
        began(stats)
        stats.forward += len(early)
        self._sides.update((side_a, side_b))
        self._idle.start(stats, (side_a, side_b), idle_timeout)
        try:
            for side, data in ((side_a, greeting), (side_b, early)):
                side.sock.setblocking(False)
                side.pending = memoryview(data) if data else _NOTHING
            for side in (side_a, side_b):
                if side.pending or side.raw:
                    self._flush(side)
        except Exception as e:
            self._error(side_a, e)
            return stats
        self._settle(side_a)
        return stats

    def abort(self, stats: RelayStats) -> None:
        for side in list(self._sides):
            if side.stats is stats:
                self._end(side)

    def buffered(self) -> int:
        return sum(len(side.pending) + len(side.raw) for side in self._sides)

    def sides(self) -> list[_Side]:
        """The relays' sides (a snapshot, for tests and status)."""
        return list(self._sides)

    # Events.

    def _event(self, side: _Side, step: Any) -> None:
        if side.closed:
            return
        try:
            step(side)
        except Exception as e:
            self._error(side, e)
            return
        self._settle(side)

    def _read(self, side: _Side) -> None:
        """Read what C{side} has, and pass it on to its peer."""
        if side.eof or side.peer.owed:
            return
        if side.ssl is None:
            n = side.sock.recv_into(self._buffer)
            if not n:
                side.eof = True
        else:
            n = self._read_tls(side)
        if not n:
            if side.eof and not side.peer.owed:
                self._flush(side.peer)  # the EOF goes on at once
            return
        stats = side.stats
        if side.forward:
            stats.forward += n
        else:
            stats.backward += n
        stats.moved = self._clock.seconds()
        peer = side.peer
        if peer.hup:
            return  # nobody takes it: dropped, as the kernel would
        peer.pending = self._view[:n]
        self._flush(peer)
        if peer.pending:
            # The shared buffer is read into again: keep a copy of the rest.
            peer.pending = memoryview(bytes(peer.pending))

    def _read_tls(self, side: _Side) -> int:
        """
        One read of records from C{side}'s socket, decrypted into the
        buffer: bytes decrypted.
        """
        n = side.sock.recv_into(self._records)
        if not n:
            # A TCP EOF before any close_notify: cut short, as by a reset
            # (not passed on as a clean EOF).
            raise ConnectionResetError(errno.ECONNRESET, "TLS connection cut short")
        if _lib.BIO_write(side.into, self._records_pointer, n) != n:
            raise _Failed("OpenSSL did not take the records read")
        ssl, got, size = side.ssl, 0, len(self._buffer)
        while got < size:
            n = _lib.SSL_read(ssl, self._pointer + got, size - got)
            if n > 0:
                got += n
                continue
            why = _lib.SSL_get_error(ssl, n)
            if why == _WANT_READ:
                break
            if why == _ZERO_RETURN:
                side.eof = True  # close_notify
                break
            self._tls_error(side, n, why)
        # What reading made OpenSSL answer (a key update's), to send.
        self._seal(side)
        if side.raw:
            self._send_raw(side)
        return got

    def _flush(self, side: _Side) -> None:
        """Send what C{side} holds; then pass an EOF on, if it is due."""
        if side.raw:
            self._send_raw(side)
            if side.raw:
                return
        data = side.pending
        if data:
            if side.ssl is None:
                try:
                    sent = side.sock.send(data)
                except BlockingIOError:
                    sent = 0
                rest = data[sent:]
                side.pending = rest if rest else _NOTHING
            else:
                self._write_tls(side, data)
                side.pending = _NOTHING
                self._send_raw(side)
        if not side.owed and side.peer.eof and not side.shut and not side.hup:
            self._shut(side)

    def _send_raw(self, side: _Side) -> None:
        """Send C{side}'s records; keep (a copy of) what the socket did not take."""
        raw = side.raw
        try:
            sent = side.sock.send(raw)
        except BlockingIOError:
            sent = 0
        rest = raw[sent:]
        # The shared buffer is written into again: keep a copy of the rest.
        if not rest:
            side.raw = _NOTHING
        elif rest.obj is self._sealed:
            side.raw = memoryview(bytes(rest))
        else:
            side.raw = rest

    def _write_tls(self, side: _Side, data: memoryview) -> None:
        """Encrypt C{data} (into the memory BIO, which takes it all), then seal."""
        ssl, sent = side.ssl, 0
        with _ffi.from_buffer(data) as pointer:
            while sent < len(data):
                n = _lib.SSL_write(ssl, pointer + sent, len(data) - sent)
                if n <= 0:
                    self._tls_error(side, n, _lib.SSL_get_error(ssl, n))
                sent += n
        self._seal(side)

    def _seal(self, side: _Side) -> None:
        """Take the records OpenSSL made for C{side}, after those it owes."""
        size = len(self._sealed)
        n = _lib.BIO_read(side.out, self._sealed_pointer, size)
        if n <= 0:
            return  # none
        sealed = memoryview(self._sealed)[:n]
        if n == size:  # more than a buffer's worth: the rest behind it
            pieces = [bytes(sealed)]
            while True:
                try:
                    pieces.append(side.connection.bio_read(size))
                except WantReadError:
                    break
            sealed = memoryview(b"".join(pieces))
        side.raw = memoryview(bytes(side.raw) + bytes(sealed)) if side.raw else sealed

    def _shut(self, side: _Side) -> None:
        """The far end of C{side}'s peer sends no more: say so to C{side}."""
        side.shut = True
        if side.ssl is not None:
            # A close_notify: TLS's half-close (the TCP stays open for it).
            if _lib.SSL_shutdown(side.ssl) < 0:
                _lib.ERR_clear_error()
            self._seal(side)
            self._send_raw(side)
            return
        try:
            side.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # already gone: its next read or write ends the relay

    def _tls_error(self, side: _Side, result: int, why: int) -> None:
        errno_now = _ffi.errno
        reason: object = compat_pyopenssl.tls_error(side.connection, side.ssl, result)
        if reason is None and not compat_pyopenssl.RAISE_SSL_ERROR.usable():
            reason = f"SSL_get_error {why}"
        _lib.ERR_clear_error()
        if why == _SYSCALL and errno_now in _GONE:
            raise OSError(errno_now, "connection lost")
        raise _Failed(f"TLS error: {reason!r}")

    # Registrations and the end.

    def _settle(self, side: _Side) -> None:
        """Register both sides for what they wait for; end a finished relay."""
        if side.closed:
            return
        peer = side.peer
        if (
            not side.owed
            and not peer.owed
            and (side.eof or peer.hup)
            and (peer.eof or side.hup)
        ):
            self._end(side)  # both directions are over
            return
        for each in (side, peer):
            other = each.peer
            # Read while the far end sends and the peer has taken everything.
            want_read = not each.eof and not other.owed and not other.hup
            want_write = each.owed or (other.eof and not each.shut and not each.hup)
            self._want(each, want_read, want_write)

    def _want(self, side: _Side, read: bool, write: bool) -> None:
        if side.hup:
            read = write = False
        if read != side.reading:
            side.reading = read
            if read:
                self._reactor.addReader(side)
            else:
                self._reactor.removeReader(side)
        if write != side.writing:
            side.writing = write
            if write:
                self._reactor.addWriter(side)
            else:
                self._reactor.removeWriter(side)

    def _error(self, side: _Side, error: Exception) -> None:
        stats = side.stats
        if isinstance(error, OSError) and error.errno in _GONE:
            pass
        elif isinstance(error, _Failed):
            self.log.info(
                "the relay of {peer} for {service!r} ended: {why}",
                peer=stats.description,
                service=stats.service,
                why=str(error),
            )
        else:
            self.log.failure(
                "the relay of {peer} for {service!r} failed; closing it",
                Failure(error),
                peer=stats.description,
                service=stats.service,
            )
        self._end(side)

    def _end(self, side: _Side) -> None:
        if side.closed:
            return
        for each in (side, side.peer):
            each.closed = True
            self._sides.discard(each)
            if each.reading:
                self._reactor.removeReader(each)
            if each.writing:
                self._reactor.removeWriter(each)
            each.reading = each.writing = False
            each.pending = _NOTHING
            if each.ssl is not None and not each.shut and not each.hup:
                # A close_notify, if it goes at once: not a truncation.
                each.raw = _NOTHING
                try:
                    self._shut(each)
                except OSError:
                    pass  # gone already
            each.raw = _NOTHING
            each.sock.close()
        ended(side.stats)

    # Idle deadlines.

    def _timed(self) -> Iterator[tuple[RelayStats, float, _Side]]:
        """Each live relay with a deadline, once (at side A), for L{IdleSweep}."""
        for side in list(self._sides):
            if side.forward and side.timeout and not side.closed:
                yield side.stats, side.timeout, side
