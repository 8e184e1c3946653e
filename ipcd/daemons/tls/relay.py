"""
tlsd's fast relay: a TLS connection and a plain socket, both raw sockets on
the reactor's poller, with no Twisted transport on either side, relayed by
the one socket engine (L{ipcd.relay.SocketRelays}) with a TLS codec
(L{TlsCodec}) on the TLS side's socket.

Twisted's L{TLSMemoryBIOProtocol} does the handshake and the request; then
L{detach} takes the TCP socket and the pyOpenSSL Connection (with its
memory BIOs and all of OpenSSL's state: keys, sequence numbers, tickets)
out of Twisted.  From there an event costs one C{recv} or C{send} and the
C{SSL_read}s or C{SSL_write} it needs, called straight through the
bindings into the engine's buffer, instead of Twisted's TLS and transport
machinery (a memory-BIO round, a transport buffer and two poller changes
per record); a read takes every record the socket holds at once.

L{detach} declines (and the caller keeps Twisted's path) unless the switch
is safe: handshake done, nothing Twisted still holds to encrypt, nothing
decrypted that OpenSSL has not handed out.  Records Twisted made and had
not sent yet go first.

On the engine, a plain side's EOF goes to the TLS side as a close_notify,
a close_notify on to the plain side as C{shutdown(SHUT_WR)}, and so does
a TCP EOF without one (as on a kernel TLS relay: the far host may have
handed its client the kernel TLS socket, whose close sends none); a TLS
error ends the relay; a relay that ends sends a close_notify if it goes
at once.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

from OpenSSL.SSL import OP_NO_RENEGOTIATION, Connection, WantReadError
from zope.interface import implementer

from ipcd.compat import pyopenssl as compat_pyopenssl
from ipcd.compat import twisted as compat_twisted
from ipcd.daemons.outbox import socket_of
from ipcd.relay import ICodec, RelayEnded, SocketRelays, take_socket
from ipcd.relay.sides import GONE, NOTHING

_lib, _ffi = compat_pyopenssl.bindings()
# OpenSSL's numbers (ssl.h), should the bindings stop naming them.
_WANT_READ = getattr(_lib, "SSL_ERROR_WANT_READ", 2)
_ZERO_RETURN = getattr(_lib, "SSL_ERROR_ZERO_RETURN", 6)
_SYSCALL = getattr(_lib, "SSL_ERROR_SYSCALL", 5)


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

    def relay_end(self, engine: SocketRelays) -> tuple[socket.socket, TlsCodec, bytes]:
        """For C{engine}: the socket, its TLS codec, the records owed first."""
        return self.sock, TlsCodec(self, _buffers(engine)), self.unsent

    def close(self) -> None:
        self.sock.close()


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
    # The TLS connection itself (with its SSL object and buffers, about
    # 50 KB) is one of the wrappers whose factories must let them go.
    take_socket(tcp, top=tls)
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


class _Buffers:
    """
    What the TLS codecs of one engine share: its buffer (what they decrypt
    into), records read (at most half a buffer, so that what they decrypt
    to, with a record begun in an earlier read, always fits) and records
    made (a buffer of plaintext and their overhead).
    """

    def __init__(self, plain: bytearray) -> None:
        self.size = len(plain)
        self.plain = _ffi.from_buffer(plain)
        self.records = bytearray(len(plain) // 2)
        self.records_pointer = _ffi.from_buffer(self.records)
        self.sealed = bytearray(len(plain) + len(plain) // 8)
        self.sealed_pointer = _ffi.from_buffer(self.sealed)


def _buffers(engine: SocketRelays) -> _Buffers:
    shared = engine.shared.get(_Buffers)
    if shared is None:
        shared = engine.shared[_Buffers] = _Buffers(engine.buffer)
    return shared


@implementer(ICodec)
class TlsCodec:
    """
    A L{Secured} TLS connection on a relay's socket: records on the socket,
    plaintext in the relay, through its C{SSL *} and memory BIOs.
    """

    __slots__ = ("connection", "ssl", "into", "out", "buffers")

    plaintext = False  # records on the socket: every byte goes through OpenSSL

    def __init__(self, secured: Secured, buffers: _Buffers) -> None:
        self.connection = secured.connection
        self.ssl, self.into, self.out = secured.ssl, secured.into, secured.out
        self.buffers = buffers

    def read(self, side: Any) -> int:
        """
        One read of records from C{side}'s socket, decrypted into the
        engine's buffer: bytes decrypted.
        """
        shared = self.buffers
        try:
            n = side.sock.recv_into(shared.records)
        except (BlockingIOError, InterruptedError):
            return 0
        if not n:
            # A TCP EOF without a close_notify: an EOF, passed on, as on a
            # kernel TLS relay (a client ends the kernel TLS socket it was
            # handed so; the service sees the same end as after a reset,
            # and a message cut short by libipc's framing).
            side.eof = True
            return 0
        if _lib.BIO_write(self.into, shared.records_pointer, n) != n:
            raise RelayEnded("OpenSSL did not take the records read")
        ssl, plain, got, size = self.ssl, shared.plain, 0, shared.size
        while got < size:
            n = _lib.SSL_read(ssl, plain + got, size - got)
            if n > 0:
                got += n
                continue
            why = _lib.SSL_get_error(ssl, n)
            if why == _WANT_READ:
                break
            if why == _ZERO_RETURN:
                side.eof = True  # close_notify
                break
            raise tls_failure(self.connection, ssl, n, why)
        return got

    def made(self) -> memoryview:
        """What reading made OpenSSL answer (a key update's), to send."""
        return self._take()

    def seal(self, data: Any) -> memoryview:
        """Encrypt C{data} (into the memory BIO, which takes it all): its records."""
        ssl, sent, size = self.ssl, 0, len(data)
        with _ffi.from_buffer(data) as pointer:
            while sent < size:
                n = _lib.SSL_write(ssl, pointer + sent, size - sent)
                if n <= 0:
                    why = _lib.SSL_get_error(ssl, n)
                    raise tls_failure(self.connection, ssl, n, why)
                sent += n
        return self._take()

    def close(self) -> memoryview:
        """A close_notify: TLS's half-close (the TCP stays open for it)."""
        if _lib.SSL_shutdown(self.ssl) < 0:
            _lib.ERR_clear_error()
        return self._take()

    def control(self, side: Any) -> bool:
        """Never called: nothing is spliced out of a socket with records."""
        return False

    def _take(self) -> memoryview:
        """The records OpenSSL made (a view of the shared buffer, if they fit)."""
        shared = self.buffers
        size = len(shared.sealed)
        n = _lib.BIO_read(self.out, shared.sealed_pointer, size)
        if n <= 0:
            return NOTHING
        sealed = memoryview(shared.sealed)[:n]
        if n < size:
            return sealed
        pieces = [bytes(sealed)]  # more than a buffer's worth: the rest behind it
        while True:
            try:
                pieces.append(self.connection.bio_read(size))
            except WantReadError:
                break
        return memoryview(b"".join(pieces))


def tls_failure(connection: Any, ssl: Any, result: int, why: int) -> Exception:
    """
    What to raise for the failed call on C{ssl} that returned C{result}
    (C{SSL_get_error}: C{why}): a connection lost, or a L{RelayEnded}
    saying OpenSSL's reason (its number where pyOpenSSL does not say).
    """
    errno_now = _ffi.errno
    reason: object = compat_pyopenssl.tls_error(connection, ssl, result)
    if reason is None and not compat_pyopenssl.RAISE_SSL_ERROR.usable():
        reason = f"SSL_get_error {why}"
    _lib.ERR_clear_error()
    if why == _SYSCALL and errno_now in GONE:
        return OSError(errno_now, "connection lost")
    return RelayEnded(f"TLS error: {reason!r}")
