"""
The relay codec of a kernel TLS socket (L{ipcd.daemons.tls.ktls}): the
kernel seals and opens the records, so the bytes pass as they are (it is
C{plaintext}: the engine splices them, socket to pipe to socket, and never
reads them); what is left to the codec is what a plain socket does not say.

  - A record that is not application data makes a plain read fail with
    EIO, and a splice(2) out of the socket with EINVAL (Linux's
    tls_sw_splice_read): it is read with its type (L{control}); a
    close_notify is the stream's end, a NewSessionTicket is skipped,
    another alert or handshake message (a TLS 1.3 KeyUpdate, which this
    kernel's kTLS cannot follow, even behind a ticket in one record) ends
    the relay.
  - A record the kernel cannot take (its MAC, size or version wrong: the
    socket is then dead) ends the relay with a line saying so, as any
    other fault of the peer's.
  - Its own EOF is a close_notify, sent with its record type
    (L{send_close_notify}): a plain close sends none; a TCP FIN where the
    send buffer has no room for it.
  - A TCP EOF is an EOF: the client that holds the other end of a route
    handed over in kTLS ends it by closing its socket, with no close_notify
    (libipc messages are framed, so a cut one is seen by the service).
"""

from __future__ import annotations

import errno
import socket
from typing import Any

from zope.interface import implementer

from ipcd.daemons.tls.ktls import (
    ALERT,
    APPLICATION_DATA,
    CLOSE_NOTIFY,
    HANDSHAKE,
    not_ticket,
    peek_record_type,
    recv_record,
    send_close_notify,
)
from ipcd.relay import ICodec, RelayEnded
from ipcd.relay.sides import NOTHING

# Records that are not data taken by one read, at most (a TLS 1.3 server
# sends a ticket or two; OpenSSL's relay takes one read's worth of records).
CONTROL_PER_READ = 16

# What the kernel says of a record from the peer it could not take (a bad
# MAC, a size or version out of bounds): the peer's doing, not a fault.
_BAD_RECORD = frozenset({errno.EBADMSG, errno.EMSGSIZE, errno.EINVAL})


def _refused(error: OSError) -> OSError | RelayEnded:
    """What to raise for C{error}, from a read of the kTLS socket."""
    if error.errno in _BAD_RECORD:
        why = f"the kernel refused a TLS record from the peer ({error.strerror})"
        return RelayEnded(why)
    return error


class KernelSecured:
    """A kTLS socket, as an end of L{ipcd.relay.SocketRelays}'s C{join}."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def relay_end(self, engine: Any) -> tuple[socket.socket, KernelTlsCodec, bytes]:
        return self.sock, KernelTlsCodec(self.sock, engine.buffer), b""

    def close(self) -> None:
        self.sock.close()


@implementer(ICodec)
class KernelTlsCodec:
    """A kTLS socket's codec: plaintext both ways, its own records apart."""

    __slots__ = ("sock", "buffer")

    plaintext = True

    def __init__(self, sock: socket.socket, buffer: bytearray) -> None:
        self.sock = sock
        self.buffer = buffer

    def read(self, side: Any) -> int:
        """
        One read of data into the engine's buffer: bytes read.  Records
        that are not data before it are taken, at most L{CONTROL_PER_READ}
        (then 0, and the rest on the next turn): a peer sending nothing
        but tickets must not hold the reactor.
        """
        for _ in range(CONTROL_PER_READ):
            try:
                n = self.sock.recv_into(self.buffer)
            except (BlockingIOError, InterruptedError):
                return 0
            except OSError as e:
                if e.errno != errno.EIO:
                    raise _refused(e) from None
                if not self._control_record(side):
                    return 0
                continue
            if not n:
                side.eof = True
            return n
        return 0

    def control(self, side: Any) -> bool:
        """
        A splice(2) out of the socket was refused: take the record that is
        not data, if that is what is next (False: data is, or nothing).
        """
        try:
            if peek_record_type(self.sock) == APPLICATION_DATA:
                return False
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as e:
            raise _refused(e) from None
        self._control_record(side)
        return True

    def _control_record(self, side: Any) -> bool:
        """Read the record that is not data: whether to read on."""
        try:
            kind, data = recv_record(self.sock, len(self.buffer))
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as e:
            raise _refused(e) from None
        if kind == ALERT:
            # Its first alert's level and description: a close_notify's
            # description is 0 (not its record's last byte), and a peer's
            # longer record is not copied to the log.
            alert = data[:2]
            if alert[1:] == CLOSE_NOTIFY[1:]:
                side.eof = True
                return False
            raise RelayEnded(f"TLS alert {alert.hex()} from the peer")
        if kind == HANDSHAKE:
            other = not_ticket(data)
            if other is None:
                return True  # tickets: nothing for the relay
            # A key update (TLS 1.3): this kernel cannot take the new keys.
            raise RelayEnded(f"TLS handshake message {other:02x} on kernel TLS")
        raise RelayEnded(f"a TLS record of type {kind} in the stream")

    def made(self) -> memoryview:
        return NOTHING

    def seal(self, data: Any) -> Any:
        return data

    def close(self) -> memoryview:
        """
        Send the close_notify here (its record type is not the data's).
        When the send buffer is full, a FIN instead: the end without the
        alert (as a client's own close), where nothing would follow (the
        engine sends no FIN of its own on a side with a codec).
        """
        try:
            send_close_notify(self.sock)
        except (BlockingIOError, InterruptedError):
            self.sock.shutdown(socket.SHUT_WR)
        return NOTHING
