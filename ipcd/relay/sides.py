"""
The sockets of L{ipcd.relay.sockets.SocketRelays}' relays (L{Side}), the
engine's own epoll that watches the idle ones for hangups (L{Watch}), and
the sizes the engine works with.

A side is always watched for a hangup: while it is read or written, by the
reactor's poller; while it is neither, it sits in the engine's own epoll
with an empty mask (which reports only hangups and errors), and that epoll
is one more reader in the reactor:

  - an error (a TCP reset; an AF_UNIX peer that closed without reading all
    we sent it) ends the relay at once;
  - a hangup without an error (an AF_UNIX peer that closed; both halves of a
    TCP connection shut) means the far end takes nothing more: the
    direction towards it is over, and what it sent before is still
    delivered, then the relay ends.
"""

from __future__ import annotations

import errno
import select
import socket
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IReadDescriptor, IWriteDescriptor
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from zope.interface import implementer

from ipcd.relay.stats import RelayStats

if TYPE_CHECKING:
    from ipcd.relay.sockets import SocketRelays

# Big reads: fewer passes on bulk transfers.  One buffer per engine, reused
# by every read (all in the reactor's thread), so no per-read allocation.
READ_SIZE = 256 * 1024

# A direction whose read returns at least this much carries a stream: from
# then on its bytes go through a pipe with splice(2), socket to pipe to
# socket, and are never copied into ipcd.  Messages (an RTT's 100 bytes)
# never get there, nor do idle relays: a pipe costs two fds.  Only between
# two plain sockets: a codec's bytes must go through it (but for a kernel
# TLS socket's, which are plaintext: that direction splices from the start).
SPLICE_AT = 64 * 1024

# Streaming directions with a pipe at once, per engine: the fds they cost
# stay bounded (2 each) however many relays a peer drives to stream, so
# they never take the fds lookups and new connections need.  The rest copy.
MAX_PIPES = 256

# A side owed more than this is not read until it has taken some.  What a
# relay owes a side is at most one read of its peer's (with a codec's
# overhead) and a greeting; past that it is what the side's own codec
# answered it: TLS 1.3 answers each KeyUpdate that asks for one with one of
# its own, and a peer sending them without reading would grow ipcd for ever.
MAX_OWED = 2 * READ_SIZE

# Nothing owed: one shared empty view, not one per side (idle relays are
# many, and a memoryview costs about 250 bytes).
NOTHING = memoryview(b"")

# Errors that mean the connection is gone (a reset, a broken pipe): the
# relay ends, quietly.  Anything else is a failure, and is logged.
GONE = frozenset(
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

# Where a side is registered: the reactor's readers, its writers, or the
# engine's own epoll (hangups and errors only).  At most one of those at a
# time besides READ|WRITE; CLOSED once its relay has ended.
READ, WRITE, WATCH, CLOSED = 1, 2, 4, 8


@implementer(IReadDescriptor, IWriteDescriptor)
class Side:
    """
    One socket of a relay run by L{SocketRelays}: plain, or with a codec
    (L{ipcd.relay.engine.ICodec}: TLS) between it and the relay.
    """

    __slots__ = (
        "engine",
        "sock",
        "fd",
        "codec",
        "peer",
        "stats",
        "forward",
        "pending",
        "eof",
        "hup",
        "shut",
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
        codec: Any = None,
    ) -> None:
        self.engine = engine
        self.sock = sock
        self.fd = sock.fileno()
        self.codec = codec  # None: the bytes go as they are
        self.peer: Side = self
        self.stats = stats
        self.forward = forward  # what it reads counts as stats.forward (side A)
        # Bytes for this socket it has not taken (encoded, with a codec).
        self.pending = NOTHING
        self.eof = False  # this socket's far end has stopped sending
        self.hup = False  # ... and takes nothing more: it hung up
        self.shut = False  # the EOF was passed on to it
        self.where = 0  # READ|WRITE, WATCH, or CLOSED
        self.timeout = 0.0  # the relay's idle deadline in seconds; 0: none
        # Once it streams: the pipe (read end, write end, size) its reads go
        # through to the peer, and how many bytes in it the peer has not taken.
        self.pipe: tuple[int, int, int] | None = None
        self.piped = 0

    @classmethod
    def of(
        cls, engine: SocketRelays, end: Any, stats: RelayStats, forward: bool
    ) -> Side:
        """A side for a socket, or for a secured end (with its codec)."""
        if isinstance(end, socket.socket):
            return cls(engine, end, stats, forward)
        sock, codec, unsent = end.relay_end(engine)
        side = cls(engine, sock, stats, forward, codec)
        if unsent:
            side.pending = memoryview(unsent)  # encoded before the join: first
        return side

    def owe(self, data: Any) -> None:
        """Keep (a copy of) C{data}, encoded, for this socket, after what it is owed."""
        owed = self.pending.tobytes() if self.pending else b""
        self.pending = memoryview(owed + bytes(data))

    @property
    def owed(self) -> bool:
        """Bytes for this socket that it has not taken yet (kept, or in a pipe)."""
        return bool(self.pending) or self.peer.piped > 0

    @property
    def reading(self) -> bool:
        """
        Read while the far end sends and the peer has taken everything, and
        while there is somewhere to send it; and while this side takes what
        its codec answers its far end (L{MAX_OWED}).
        """
        peer = self.peer
        return (
            not self.eof
            and not peer.owed
            and not peer.hup
            and len(self.pending) <= MAX_OWED
        )

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
        self.where &= ~(READ | WRITE)
        self.engine._hangup(self, None)

    def farewell(self) -> None:
        """
        The relay ends: the codec says its own EOF (a close_notify) if it
        goes at once, so the far end sees an end, not a truncation.  What
        the side was still owed is dropped.
        """
        self.shut = True
        try:
            self.sock.send(self.codec.close())
        except OSError:
            pass  # gone already, or full: it is closed anyway


@implementer(IReadDescriptor)
class Watch:
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


def take_socket(transport: Any, top: Any = None) -> socket.socket:
    """
    Take a connected socket away from its Twisted transport, for a relay.

    The reactor stops watching it, and the transport is then simply dropped:
    closing it instead would shut the connection down (a TCP transport calls
    C{shutdown} before C{close}), and the socket object stays open as long as
    the relay holds it.

    Every protocol wrapper from C{top} (default: C{transport}) down to the
    socket's own transport (TLS, limits, C{haproxy:}) leaves its factory's
    registry here: its C{connectionLost}, where it would leave, never comes
    now, and the factory would keep it, and all it holds, for good.
    """
    transport.stopReading()
    transport.stopWriting()
    layer = transport if top is None else top
    while isinstance(layer, ProtocolWrapper):
        registry = getattr(layer.factory, "protocols", None)
        if registry is not None and layer in registry:
            layer.factory.unregisterProtocol(layer)
        layer = layer.transport
    return transport.getHandle()
