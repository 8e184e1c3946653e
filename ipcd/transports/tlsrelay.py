"""
tlsd's fast relay: a TLS connection and a plain socket, both raw sockets on
the reactor's poller, with no Twisted transport on either side.

Twisted's L{TLSMemoryBIOProtocol} does the handshake and the request; then
L{detach} takes the TCP socket out of Twisted and swaps the pyOpenSSL
Connection's memory BIOs for a socket BIO on that socket (C{SSL_set_fd}).
OpenSSL keeps all of its state (keys, sequence numbers, tickets, key
updates) and reads and writes records on the socket itself: an event costs
one C{recv} or one C{SSL_read}/C{SSL_write} called straight through the
bindings, as stunnel does in C, instead of a memory BIO, a transport buffer
and two poller changes per record.

L{detach} declines (and the caller keeps Twisted's path) unless the switch
is safe: handshake done, nothing Twisted still holds to send, nothing
received that OpenSSL has not taken.

L{TlsSocketRelays} is the engine (an L{IRelayEngine}): at most one read
held per direction (backpressure), an EOF passed on after the bytes before
it (a plain side's EOF as a TLS close_notify, a close_notify or TCP EOF as
C{shutdown(SHUT_WR)} on the plain side), a reset or a TLS error ends the
relay, an idle deadline ends a relay on which nothing moved.  A side is
watched for hangups only while it is read or written.
"""

from __future__ import annotations

import errno
import math
import socket
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.bindings.openssl.binding import Binding
from OpenSSL.SSL import Connection
from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IReadDescriptor, IWriteDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ipcd.relay import (
    READ_SIZE,
    SWEEP_INTERVAL,
    IRelayEngine,
    RelayStats,
    _log_idle,
    ended,
    take_socket,
)

_binding = Binding()
_ffi, _lib = _binding.ffi, _binding.lib
_WANT_READ = _lib.SSL_ERROR_WANT_READ
_WANT_WRITE = _lib.SSL_ERROR_WANT_WRITE
_ZERO_RETURN = _lib.SSL_ERROR_ZERO_RETURN
_SYSCALL = _lib.SSL_ERROR_SYSCALL

# Connection-level errors: the relay ends quietly.
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

log = Logger()


def socket_of(transport: Any) -> FileDescriptor | None:
    """The reactor's connection under a transport (TLS, limits wrappers)."""
    while transport is not None and not isinstance(transport, FileDescriptor):
        transport = getattr(transport, "transport", None)
    return transport


@dataclass
class Secured:
    """
    A TCP socket and the TLS connection on it, OpenSSL doing its I/O;
    C{unsent}: records Twisted had made and not sent yet, which go first.
    """

    sock: socket.socket
    connection: Connection
    unsent: bytes = b""


def detach(tls: Any) -> Secured | str:
    """
    Take TLS connection C{tls} (a L{TLSMemoryBIOProtocol}) from Twisted:
    its TCP socket leaves the reactor, and OpenSSL reads and writes it
    directly.  When that is not safe now: why (and nothing has changed).
    """
    why = _not_detachable(tls)
    if why:
        return why
    tcp = socket_of(tls.transport)
    connection = tls._tlsConnection
    sock = tcp.getHandle()
    if _lib.SSL_set_fd(connection._ssl, sock.fileno()) != 1:
        _lib.ERR_clear_error()
        return "OpenSSL refused the socket"
    # The memory BIOs were freed with the switch: pyOpenSSL must not use them.
    connection._into_ssl = connection._from_ssl = None
    _lib.SSL_set_mode(
        connection._ssl,
        _lib.SSL_MODE_ENABLE_PARTIAL_WRITE | _lib.SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER,
    )
    # A renegotiation would make writes wait for reads: refused (TLS 1.2).
    _lib.SSL_set_options(connection._ssl, _lib.SSL_OP_NO_RENEGOTIATION)
    unsent = tcp.dataBuffer[tcp.offset :] + b"".join(tcp._tempDataBuffer)
    take_socket(tcp)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        # Each record goes out at once: a message's round trip, not Nagle's.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return Secured(sock, connection, unsent)


def _not_detachable(tls: Any) -> str:
    """Why C{tls} cannot leave Twisted now; empty if it can."""
    tcp = socket_of(tls.transport)
    connection = getattr(tls, "_tlsConnection", None)
    if tcp is None or connection is None or not hasattr(tcp, "getHandle"):
        return "not a TLS connection over a socket"
    if not getattr(tls, "_handshakeDone", False):
        return "handshake not done"
    if tls._lostTLSConnection or tls.disconnecting or tcp.disconnecting:
        return "closing"
    if not tcp.connected:
        return "not connected"
    if tls._appSendBuffer:
        return "bytes still to encrypt"
    if _lib.SSL_pending(connection._ssl) > 0:
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
        "peer",
        "stats",
        "forward",
        "pending",
        "raw",
        "eof",
        "hup",
        "shut",
        "blocked",
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
            self.ssl = end.connection._ssl
            self.raw = memoryview(end.unsent)  # records to send first
        else:
            self.sock, self.connection, self.ssl = end, None, None
            self.raw = memoryview(b"")
        self.fd = self.sock.fileno()
        self.peer: _Side = self
        self.stats = stats
        self.forward = forward
        self.pending = memoryview(b"")  # for this socket, not yet taken
        self.eof = False  # its far end sends no more
        self.hup = False  # ... and takes nothing more
        self.shut = False  # the EOF was passed on to it
        self.blocked = False  # a TLS read waits for the socket's writability
        self.reading = self.writing = self.closed = False
        self.timeout = 0.0

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
        self.pending = memoryview(b"")
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
        self._running = False
        self._sweep: Any = None
        self._sweep_at = math.inf
        self.failure: str | None = None

    # IRelayEngine

    def start(self) -> None:
        self._running = True

    def stop(self) -> None:
        self._running = False
        for side in list(self._sides):
            self._end(side)
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep, self._sweep_at = None, math.inf

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
        if stats.registry is not None:
            stats.registry.add(stats)
        stats.forward += len(early)
        self._sides.update((side_a, side_b))
        stats.moved = now = self._clock.seconds()
        if idle_timeout > 0:
            side_a.timeout = side_b.timeout = idle_timeout
            self._schedule(now + idle_timeout)
        try:
            for side, data in ((side_a, greeting), (side_b, early)):
                side.sock.setblocking(False)
                side.pending = memoryview(data)
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
        if side.eof or side.peer.pending:
            return
        if side.ssl is None:
            n = side.sock.recv_into(self._buffer)
            if not n:
                side.eof = True
        else:
            n = self._read_tls(side)
        if not n:
            if side.eof and not side.peer.pending:
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
        """Records from C{side}'s TLS connection into the buffer: bytes read."""
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
            if why == _WANT_WRITE:
                # OpenSSL must send first (a key update's answer): the
                # socket's writability calls this again.
                side.blocked = True
                break
            self._tls_error(side, n, why)
        return got

    def _flush(self, side: _Side) -> None:
        """Send what C{side} holds; then pass an EOF on, if it is due."""
        if side.raw:
            try:
                side.raw = side.raw[side.sock.send(side.raw) :]
            except BlockingIOError:
                pass
            if side.raw:
                return
        data = side.pending
        if data:
            if side.ssl is None:
                try:
                    sent = side.sock.send(data)
                except BlockingIOError:
                    sent = 0
            else:
                sent = self._write_tls(side, data)
            side.pending = data[sent:]
        if side.blocked:
            side.blocked = False
            self._read(side)
        if not side.pending and side.peer.eof and not side.shut and not side.hup:
            self._shut(side)

    def _write_tls(self, side: _Side, data: memoryview) -> int:
        ssl, sent = side.ssl, 0
        with _ffi.from_buffer(data) as pointer:
            while sent < len(data):
                n = _lib.SSL_write(ssl, pointer + sent, len(data) - sent)
                if n > 0:
                    sent += n
                    continue
                why = _lib.SSL_get_error(ssl, n)
                if why == _WANT_WRITE:
                    break
                self._tls_error(side, n, why)
        return sent

    def _shut(self, side: _Side) -> None:
        """The far end of C{side}'s peer sends no more: say so to C{side}."""
        if side.ssl is not None:
            result = _lib.SSL_shutdown(side.ssl)
            if result < 0:
                why = _lib.SSL_get_error(side.ssl, result)
                if why == _WANT_WRITE:
                    return  # again once writable
                _lib.ERR_clear_error()
        side.shut = True
        try:
            side.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # already gone: its next read or write ends the relay

    def _tls_error(self, side: _Side, result: int, why: int) -> None:
        errno_now = _ffi.errno
        try:
            side.connection._raise_ssl_error(side.ssl, result)
        except Exception as e:
            reason = e
        else:
            reason = None
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
        for each in (side, peer):
            if each.ssl is not None and not each.pending and not each.eof:
                if not each.peer.pending and not each.peer.hup:
                    # Decrypted bytes OpenSSL holds: no socket event will come.
                    if _lib.SSL_pending(each.ssl) > 0:
                        try:
                            self._read(each)
                        except Exception as e:
                            self._error(each, e)
                            return
        if (
            not side.pending
            and not peer.pending
            and (side.eof or peer.hup)
            and (peer.eof or side.hup)
        ):
            self._end(side)  # both directions are over
            return
        for each in (side, peer):
            other = each.peer
            # Read while the far end sends and the peer has taken everything.
            want_read = not each.eof and not other.pending and not other.hup
            want_write = (
                bool(each.pending)
                or bool(each.raw)
                or each.blocked
                or (other.eof and not each.shut and not each.hup)
            )
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
            each.pending = memoryview(b"")
            if each.ssl is not None and not each.shut and not each.hup:
                # A close_notify if it goes at once: not a truncation.
                if _lib.SSL_shutdown(each.ssl) < 0:
                    _lib.ERR_clear_error()
            # No OpenSSL call may reach this fd number once it is closed.
            each.ssl = None
            each.sock.close()
        ended(side.stats)

    # Idle deadlines.

    def _schedule(self, when: float) -> None:
        if when >= self._sweep_at:
            return
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep_at = when
        self._sweep = self._clock.callLater(
            max(0.0, when - self._clock.seconds()), self._expire
        )

    def _expire(self) -> None:
        self._sweep, self._sweep_at = None, math.inf
        now, earliest = self._clock.seconds(), math.inf
        for side in list(self._sides):
            if not side.forward or not side.timeout or side.closed:
                continue
            deadline = side.stats.moved + side.timeout
            if deadline > now:
                earliest = min(earliest, deadline)
                continue
            _log_idle(self.log, side.stats, side.timeout)
            self._end(side)
        if earliest < math.inf:
            self._schedule(max(earliest, now + SWEEP_INTERVAL))
