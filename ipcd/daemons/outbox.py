"""
What one read relays to the other end of a bridge, written when the read is
done: one send for all the messages it carried, at once rather than on the
reactor's next turn.

Twisted's C{transport.write} only queues: the bytes go out on a later turn
of the reactor, after two C{epoll_ctl} calls to watch the socket for
writing, which for a relay that answers one small message at a time is
most of a round trip's cost.  An L{Outbox} gathers the pieces written
during one read (C{add}) and C{send}s them together: straight to the
socket with one C{sendmsg} when the transport has nothing queued before
them (no copy, no reactor turn), else queued behind what it has, as
C{transport.writeSequence} would.  Over TLS the bytes go through the TLS
transport and the socket under it is flushed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.protocols.policies import ProtocolWrapper

from ipcd.compat import twisted as compat_twisted

# More pieces than this are joined first: one buffer instead of a long
# scatter list (the kernel takes at most IOV_MAX, 1024, in one sendmsg).
MAX_PIECES = 64


def _through_wrappers(transport: Any) -> Any:
    """
    C{transport} past the L{ProtocolWrapper}s that only pass writes on (a
    connection limit's); not past one that changes them (TLS).
    """
    while (
        isinstance(transport, ProtocolWrapper)
        and type(transport).write is ProtocolWrapper.write
    ):
        transport = transport.transport
    return transport


def socket_of(transport: Any) -> FileDescriptor | None:
    """The reactor's connection under a transport (TLS, limits wrappers)."""
    while transport is not None and not isinstance(transport, FileDescriptor):
        transport = getattr(transport, "transport", None)
    return transport


def _queued(transport: FileDescriptor) -> bool:
    """
    Whether C{transport} holds bytes or descriptors to write.  (Twisted has
    no public word for this; its buffer attributes have not changed in
    years, and a transport without them is taken as holding some.)
    """
    try:
        held = compat_twisted.queued(transport)
    except AttributeError:
        return True
    return True if held is None else held


def queued_nothing(transport: FileDescriptor) -> bool:
    """
    Whether C{transport} is open and holds nothing to write: then bytes
    sent on its socket now keep their order.
    """
    open_ = transport.connected and not transport.disconnecting
    return open_ and not _queued(transport)


def flush(transport: FileDescriptor) -> None:
    """
    Write what C{transport} (a socket's) holds now rather than on the
    reactor's next turn.  A closing transport is left to the reactor, whose
    C{doWrite} finishes the close; so is a write that fails (the bytes stay
    queued, the reactor writes again and gets the error).
    """
    if transport.connected and not transport.disconnecting and _queued(transport):
        transport.doWrite()


def unsent(pieces: Sequence[bytes], sent: int) -> list[bytes]:
    """What is left of C{pieces} once their first C{sent} bytes went out."""
    for i, piece in enumerate(pieces):
        if sent < len(piece):
            return [piece[sent:], *pieces[i + 1 :]] if sent else list(pieces[i:])
        sent -= len(piece)
    return []


class Outbox:
    """The pieces for C{transport} gathered during one read; L{send} at its end."""

    def __init__(self, transport: Any) -> None:
        self.transport = _through_wrappers(transport)
        self.socket_transport = socket_of(self.transport)
        # Straight to the socket unless TLS (or anything else) is between.
        self.direct = self.socket_transport is self.transport
        self._socket = self.transport.getHandle() if self.direct else None
        self.pieces: list[bytes] = []

    def add(self, *pieces: bytes) -> None:
        self.pieces.extend(pieces)

    def send(self) -> int:
        """
        Write what was added, in order, behind what the transport holds:
        how many writes the transport now holds for it (0: all sent).
        """
        pieces = self.pieces
        if not pieces:
            return 0
        self.pieces = []
        if len(pieces) > MAX_PIECES:
            pieces = [b"".join(pieces)]
        transport = self.transport
        if self.direct and queued_nothing(transport):
            try:
                sent = self._socket.sendmsg(pieces)
            except OSError:
                # Full (EAGAIN), or broken: queued for the reactor, whose
                # write meets the error too and closes the usual way.
                sent = 0
            if sent == sum(map(len, pieces)):
                return 0
            pieces = unsent(pieces, sent)
        transport.writeSequence(pieces)
        if not self.direct and self.socket_transport is not None:
            flush(self.socket_transport)
        return len(pieces)
