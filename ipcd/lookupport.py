"""
A UNIX listening port whose factory may serve a connection within accept.

Twisted's port builds a transport and a protocol for every connection, and
a lookup then costs three reactor turns (accept, read, writable-then-close).
A lookup is usually whole in the socket when accept returns, and a local
service usually accepts at once: then it is answered and closed right
there, with no transport.  L{LookupPort} asks its factory's
C{serve_at_once(skt)} first; C{None} means served, else it is a function to
call with the protocol built the usual way (C{resume(protocol)}), which
carries on from where the factory stopped (bytes already read, an answer
still to come).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import unix
from twisted.internet.tcp import _accept, _BuffersLogs, _reservedFD
from twisted.logger import Logger

_log = Logger()


class LookupPort(unix.Port):
    """C{twisted.internet.unix.Port}, with its factory's fast path first."""

    def doRead(self) -> None:  # noqa: N802 (Twisted's name)
        # Twisted's own accept loop (tcp.Port.doRead): the same accept
        # batching, and accept errors (EMFILE) logged through the port's
        # logger as before, which ipcd.limits counts.
        try:
            with _BuffersLogs(
                self._logger.namespace, self._logger.observer
            ) as buffering:
                accepted = 0
                clients = _accept(
                    buffering, range(self.numberAccepts), self.socket, _reservedFD
                )
                for skt, addr in clients:
                    accepted += 1
                    self._serve(skt, addr)
            if accepted == self.numberAccepts:
                self.numberAccepts += 20
            else:
                self.numberAccepts = max(1, accepted)
        except BaseException:
            _log.failure("accepting on {port}", port=self.port)

    def _serve(self, skt: Any, addr: Any) -> None:
        try:
            resume = self.factory.serve_at_once(skt)
        except Exception:
            _log.failure("serving a connection on {port}", port=self.port)
            skt.close()
            return
        if resume is None:
            return
        protocol = self.factory.buildProtocol(self._buildAddr(addr))
        if protocol is None:
            skt.close()
            return
        session = self.sessionno
        self.sessionno = session + 1
        transport = self.transport(skt, protocol, addr, self, session, self.reactor)
        protocol.makeConnection(transport)
        resume(protocol)


def listen_fast(
    reactor: Any, path: str, factory: Any, backlog: int, mode: int
) -> LookupPort:
    """C{reactor.listenUNIX}, with a L{LookupPort}."""
    port = LookupPort(path, factory, backlog, mode, reactor)
    port.startListening()
    return port
