"""
Twisted's TLS as ipcd speaks it, on tlsd's and websocketd's listeners and
dials and an C{ssl:} metrics listener (L{TLSFactory}): what OpenSSL
answers a peer that reads nothing is bounded (L{ipcd.owedtls}), a relay
cannot half-close it, and on a server OpenSSL's connection waits for the
peer's first byte (L{ipcd.lazytls}).  L{tls_listens} gives C{ssl:}
endpoint strings this TLS in place of Twisted's own.
"""

from __future__ import annotations

from typing import Any

from OpenSSL.SSL import NO_OVERLAPPING_PROTOCOLS, Context
from OpenSSL.SSL import Error as SSLError
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol

from ipcd.daemons.outbox import socket_of
from ipcd.lazytls import LazyStart, lazy_for
from ipcd.listenerkeys import wrapped
from ipcd.owedtls import ASKED, OwedGuard

# What is taken from OpenSSL's memory BIO at once: a TCP read's worth.
_BIO_READ = 64 * 1024


def _no_protocol(connection: Any, offered: list[bytes]) -> Any:
    return NO_OVERLAPPING_PROTOCOLS  # no ALPN extension in the answer


def without_alpn(context: Context) -> Context:
    """
    C{context}, whose server connections answer a client's ALPN offer
    with no protocol, as a server that knows no ALPN would: ipcd speaks
    none.  Twisted's C{CertificateOptions} contexts choose from the
    protocols the application names, and with none answer C{b""}, which
    ends the handshake (an C{internal error} alert): every client that
    offers ALPN, as curl, browsers and Prometheus do, was refused.
    """
    context.set_alpn_select_callback(_no_protocol)
    return context


class _NoHalfClose(TLSMemoryBIOProtocol):
    """
    A TLS connection a relay cannot half-close: TLS has no half-close that
    Twisted's peer would keep (a close_notify ends the connection), and the
    wrapper would otherwise lend the relay its TCP transport's
    C{loseWriteConnection}, which would cut the TLS stream.

    What OpenSSL answers the peer and it leaves unread is bounded
    (L{OwedGuard}, on a TCP transport): pausing and resuming this
    transport, and producers registered with it, go through the guard.
    """

    _guard: OwedGuard | None = None

    def __getattr__(self, name: str) -> Any:
        if name == "loseWriteConnection":
            raise AttributeError(name)
        return super().__getattr__(name)

    def makeConnection(self, transport: Any) -> None:  # noqa: N802
        tcp = socket_of(transport)
        if tcp is not None and tcp.producer is None:
            self._guard = OwedGuard(tcp)
        super().makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        guard = self._guard
        if guard is None:
            super().dataReceived(data)
            return
        guard.reading = True  # what this writes, the peer's records made
        try:
            super().dataReceived(data)
            self._sendAnswers()
        finally:
            guard.reading = False

    def _sendAnswers(self) -> None:
        """
        Send all OpenSSL made: Twisted's TLS sends 32 KiB of it after a
        read, and the rest would wait in OpenSSL's memory BIO until the next
        read or write, growing with each read (the guard does not see it),
        and holding back what is written after it.
        """
        connection = self.getHandle()
        if connection is None:  # TLS not started (LazyStart): nothing made
            return
        while True:
            try:
                records = connection.bio_read(_BIO_READ)
            except SSLError:  # WantReadError: nothing (more) to send
                return
            self.transport.write(records)

    def pauseProducing(self) -> None:  # noqa: N802
        if self._guard is None:
            self.transport.pauseProducing()
        else:
            self._guard.pauses.pause(ASKED)

    def resumeProducing(self) -> None:  # noqa: N802
        if self._guard is None:
            self.transport.resumeProducing()
        else:
            self._guard.pauses.resume(ASKED)

    def registerProducer(self, producer: Any, streaming: bool) -> None:  # noqa: N802
        if self._guard is None:
            super().registerProducer(producer, streaming)
            return
        with self._guard.sharing():
            super().registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:  # noqa: N802
        if self._guard is None:
            super().unregisterProducer()
            return
        with self._guard.sharing():
            super().unregisterProducer()


class _LazyNoHalfClose(_NoHalfClose, LazyStart):
    """A server's L{_NoHalfClose} that starts TLS at the peer's first byte."""


class TLSFactory(TLSMemoryBIOFactory):
    """
    Twisted's TLS as tlsd and websocketd speak it (L{_NoHalfClose}); on a
    server, OpenSSL's connection is made at the peer's first byte, not at
    its connect (L{ipcd.lazytls}): a peer that sends nothing costs
    no OpenSSL state.
    """

    protocol: type[TLSMemoryBIOProtocol] = _NoHalfClose
    noisy = False

    def __init__(
        self,
        contextFactory: Any,  # noqa: N803 (Twisted's name)
        isClient: bool,  # noqa: N803
        wrappedFactory: Any,  # noqa: N803
        clock: Any = None,
    ) -> None:
        self.lazy_creator = None if isClient else lazy_for(contextFactory)
        if self.lazy_creator is not None:
            contextFactory = self.lazy_creator
            self.protocol = _LazyNoHalfClose
        super().__init__(contextFactory, isClient, wrappedFactory, clock)


class GuardedTLSListens:
    """
    C{reactor} for C{serverFromString}, but that its C{ssl:} listeners
    speak TLS through L{TLSFactory} (what OpenSSL answers a peer, and it
    leaves unread, is bounded: L{OwedGuard}), as tlsd's do, in place of
    Twisted's own C{TLSMemoryBIOFactory}, which C{listenSSL} wraps the same
    way around a TCP listener; a client's ALPN offer is answered with no
    protocol (L{without_alpn}).
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def __getattr__(self, name: str) -> Any:
        return getattr(self.reactor, name)

    def listenSSL(  # noqa: N802 (IReactorSSL's name)
        self,
        port: int,
        factory: Any,
        contextFactory: Any,  # noqa: N803
        backlog: int = 50,
        interface: str = "",
    ) -> Any:
        get_context = getattr(contextFactory, "getContext", None)
        if get_context is not None:  # (C{ssl:} gives CertificateOptions)
            without_alpn(get_context())  # the one its connections are made of
        tls = TLSFactory(contextFactory, False, factory)
        return self.reactor.listenTCP(port, tls, backlog, interface)


def tls_listens(reactor: Any, listen: str) -> Any:
    """
    The reactor to make endpoint string C{listen}'s endpoint with: for an
    C{ssl:} one (C{haproxy:ssl:} too), C{reactor} whose C{listenSSL} speaks
    L{TLSFactory}'s TLS (L{GuardedTLSListens}); else C{reactor} itself.
    """
    if wrapped(listen)[0] == "ssl":
        return GuardedTLSListens(reactor)
    return reactor
