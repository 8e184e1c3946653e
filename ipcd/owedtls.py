"""
What a TLS peer makes OpenSSL answer, and leaves unread, is bounded while
Twisted's TLS carries its connection: its handshake and request, and its
relay when C{[tlsd] socket_relay} is off (the raw sockets' relay has its
own bound, L{ipcd.relay.sides.MAX_OWED}).

OpenSSL answers some records with records of its own: TLS 1.3 answers each
KeyUpdate that asks for one.  Twisted's TLS writes those answers to its TCP
transport as it reads the peer, and reads on whatever that transport
holds: a peer sending such records and reading nothing grew ipcd without
bound.  L{OwedGuard}, the TCP transport's streaming producer from the
start, stops reading the peer once the transport's buffer is full
(Twisted's C{bufferSize}, 64 KiB) and a read of the peer's own records adds
to it, and reads it again once the buffer has drained.  Bytes relayed to
the peer never stop it: a healthy transfer both ways is not coupled.

The transport has one place for a producer: one registered through the
TLS connection (a relay's, for its backpressure) is kept behind the guard,
which passes every pause, resume and stop on to it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from ipcd.readpauses import ReadPauses

# Why the peer is not read (L{ReadPauses} reasons).
ASKED = 1  # the protocol on the TLS connection paused it (a relay, a lookup)
OWED = 2  # answers to its own records fill the buffer towards it


@implementer(IPushProducer)
class OwedGuard:
    """
    TCP transport C{tcp}'s streaming producer (registered here), under a
    TLS connection: L{reading} is set while the peer's records are read.
    """

    def __init__(self, tcp: FileDescriptor) -> None:
        self.tcp = tcp
        self.pauses = ReadPauses(tcp)
        self.reading = False
        self.inner: Any = None  # the producer registered through TLS
        tcp.registerProducer(self, True)

    # The transport's producer: its buffer is full (each write while it
    # is), has drained, or the connection is lost.

    def pauseProducing(self) -> None:  # noqa: N802 (IPushProducer's names)
        if self.inner is not None:
            self.inner.pauseProducing()
        if self.reading:
            self.pauses.pause(OWED)

    def resumeProducing(self) -> None:  # noqa: N802
        if self.inner is not None:
            self.inner.resumeProducing()
        self.pauses.resume(OWED)
        tcp = self.tcp
        if self.inner is None and tcp.disconnecting and tcp.producer is self:
            # A closing transport resumes its producer rather than close:
            # without one of its own, the connection closes as it would.
            tcp.unregisterProducer()

    def stopProducing(self) -> None:  # noqa: N802
        if self.inner is not None:
            self.inner.stopProducing()

    @contextmanager
    def sharing(self) -> Iterator[None]:
        """
        Around a producer's registration (or unregistration) through TLS:
        whatever it leaves registered goes behind the guard.
        """
        tcp = self.tcp
        if tcp.producer is self:
            tcp.unregisterProducer()
        try:
            yield
        finally:
            self.inner = tcp.producer
            if self.inner is not None:
                tcp.unregisterProducer()
            tcp.registerProducer(self, True)
