"""
A server TLS connection that costs OpenSSL nothing until its peer speaks.

Twisted's L{TLSMemoryBIOProtocol} makes its OpenSSL connection and begins
the handshake when the TCP connection is made: about 46 KiB a peer (the
C{SSL} object, 17 KiB, and the handshake's buffers), held by a peer that
connects and sends nothing until the handshake deadline drops it, 1,024
of them per listener.  L{LazyStart} makes both when the peer's first byte
comes, or when the application writes first.

Everything else still happens when the TCP connection is made: the
application protocol is connected (so its handshake deadline, the
listener's limits and websocketd's opening handshake timer all run from
the connect), and so is this wrapper (its factory's registry, the guard on
what OpenSSL answers).  Until the first byte:

    - the peer's EOF, or an abort, ends it as Twisted's TLS would end a
      handshake that had not begun (the application sees C{ConnectionLost});
    - C{loseConnection} aborts, as Twisted's TLS does before a handshake
      with nothing to send;
    - C{getHandle} gives L{not_started}: one OpenSSL connection for all
      that have not started, which never begins a handshake, so what it
      tells is what any tells before its handshake (autobahn reads the
      handle when a WebSocket connects: its C{get_peer_finished()}, None);
    - C{write} starts TLS at once (what is written goes after the handshake,
      as ever).

Public APIs only: the connection comes from this module's own
L{IOpenSSLServerConnectionCreator} (L{LazyCreator}), and TLS starts by
Twisted's own C{makeConnection}, run a second time with the application
protocol set aside so that it is not connected twice.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from OpenSSL.SSL import TLS_METHOD, Connection, Context
from twisted.internet.interfaces import (
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.main import CONNECTION_LOST
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from ipcd.proxied import HeaderRefused


def lazy_for(context_factory: Any) -> LazyCreator | None:
    """
    A L{LazyCreator} over server C{context_factory} (a connection creator,
    or an old-style context factory as C{ssl:} endpoints give), or None if
    it is neither: then TLS starts with the connection, as Twisted's does.
    """
    if IOpenSSLServerConnectionCreator.providedBy(
        context_factory
    ) or IOpenSSLContextFactory.providedBy(context_factory):
        return LazyCreator(context_factory)
    return None


@implementer(IOpenSSLServerConnectionCreator)
class LazyCreator:
    """Server connections of C{context_factory}, for L{LazyStart}."""

    def __init__(self, context_factory: Any) -> None:
        self.context_factory = context_factory

    def make(self, tls: Any) -> Connection:
        """A new server connection for TLS wrapper C{tls}."""
        factory = self.context_factory
        if IOpenSSLServerConnectionCreator.providedBy(factory):
            connection: Connection = factory.serverConnectionForTLS(tls)
            return connection
        return Connection(factory.getContext(), None)

    def serverConnectionForTLS(self, tls: Any) -> Connection:  # noqa: N802
        return self.make(tls)


@cache
def not_started() -> Connection:
    """
    The handle of every L{LazyStart} whose TLS has not started: an OpenSSL
    connection of a bare context, never given a byte nor a handshake, so
    it has no peer, certificate, cipher or finished message, as no
    connection has before its handshake.  One for all: autobahn reads a
    handle as each WebSocket connects, and each peer's own cost 17 KiB.
    """
    return Connection(Context(TLS_METHOD), None)


class _SetAside(Protocol):
    """Stands for the application protocol while TLS starts: connected already."""


class LazyStart(TLSMemoryBIOProtocol):
    """
    A server L{TLSMemoryBIOProtocol} whose OpenSSL connection is made when
    the peer's first byte comes (see the module); its factory's connection
    creator must be a L{LazyCreator}.
    """

    waiting = False  # TLS not started (yet, or ever: the connection ended first)

    def makeConnection(self, transport: Any) -> None:  # noqa: N802
        # What Twisted's does, but the OpenSSL connection and its handshake.
        self.waiting = True
        ProtocolWrapper.makeConnection(self, transport)

    def start_tls(self) -> None:
        """Make the OpenSSL connection and begin the handshake, now."""
        if not self.waiting:
            return
        application, self.wrappedProtocol = self.wrappedProtocol, _SetAside()
        try:
            TLSMemoryBIOProtocol.makeConnection(self, self.transport)
            # Not before: if no connection could be made (the creator
            # raised), the connection still ends as one that never started.
            self.waiting = False
        finally:
            self.wrappedProtocol = application

    def _open(self) -> bool:
        """Whether TLS may start now: connected, and not closing."""
        return bool(self.connected) and not self.disconnecting

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.waiting:
            if not self._open():
                return
            self.start_tls()
        super().dataReceived(data)

    def write(self, data: bytes) -> None:
        if self.waiting:
            if not self._open():
                return  # as Twisted's TLS drops writes after a close
            self.start_tls()
        super().write(data)

    def getHandle(self) -> Any:  # noqa: N802
        if not self.waiting:
            return super().getHandle()
        # None once it has ended without starting (nothing was made).
        return not_started() if self._open() else None

    def getPeerCertificate(self) -> Any:  # noqa: N802
        return None if self.waiting else super().getPeerCertificate()

    @property
    def negotiatedProtocol(self) -> bytes | None:  # noqa: N802
        return None if self.waiting else super().negotiatedProtocol

    def loseConnection(self) -> None:  # noqa: N802
        if self.waiting:
            # Twisted's TLS aborts a handshake with nothing to send.
            if self._open():
                self.abortConnection()
            return
        super().loseConnection()

    def abortConnection(self) -> None:  # noqa: N802
        if self.waiting:
            self.disconnecting = True
            self.transport.abortConnection()
            return
        super().abortConnection()

    def unregisterProducer(self) -> None:  # noqa: N802
        if self.waiting and self.disconnecting:
            # Twisted's would shut TLS down (there is none): the rest of it.
            self.disconnecting = False
            try:
                super().unregisterProducer()
            finally:
                self.disconnecting = True
            return
        super().unregisterProducer()

    def connectionLost(self, reason: Failure | None = None) -> None:  # noqa: N802
        if not self.waiting:
            super().connectionLost(reason)
            return
        # Waiting for good: not connected, nothing starts TLS now.
        self.connected = False
        # What Twisted's TLS says for a handshake cut before it ended; a
        # refused PROXY header's end, which was said already, as it is.
        if reason is None or not reason.check(HeaderRefused):
            reason = Failure(CONNECTION_LOST)
        ProtocolWrapper.connectionLost(self, reason)
