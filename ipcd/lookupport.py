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

import socket
from typing import Any

from twisted.internet import unix
from twisted.logger import Logger

_log = Logger()
_FAMILY = socket.AF_UNIX
_TYPE = socket.SOCK_STREAM


class LookupPort(unix.Port):
    """C{twisted.internet.unix.Port}, with its factory's fast path first."""

    def doRead(self) -> None:  # noqa: N802 (Twisted's name)
        # Twisted's accept loop (tcp.Port.doRead) in short: the same batch
        # sizes; an accept error other than "no more" (EMFILE, ...) goes to
        # Twisted's own loop, which handles and logs it as before (and
        # ipcd.limits counts it).
        accept = self.socket._accept
        accepted = 0
        try:
            for _ in range(self.numberAccepts):
                try:
                    fd, addr = accept()
                except BlockingIOError:
                    break
                except OSError:
                    super().doRead()
                    return
                accepted += 1
                # What socket.accept() makes of it, without looking up the
                # family and type of the listener each time.
                self._serve(socket.socket(_FAMILY, _TYPE, 0, fd), addr)
        except BaseException:
            _log.failure("accepting on {port}", port=self.port)
        if accepted == self.numberAccepts:
            self.numberAccepts += 20
        else:
            self.numberAccepts = max(1, accepted)

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
