"""
A UNIX listening port whose factory may serve a connection within accept.

Twisted's port builds a transport and a protocol for every connection, and
a lookup then costs three reactor turns (accept, read, writable-then-close).
A lookup is usually whole in the socket when accept returns, and a local
service usually accepts at once: then it is answered and closed right
there, with no transport.  L{LookupPort} asks its factory's
C{serve_at_once(skt, close_later)} first; C{None} means served, else it is
a function to call with the protocol built the usual way
(C{resume(protocol)}), which carries on from where the factory stopped
(bytes already read, an answer still to come).  A connection answered with
a descriptor is given to C{close_later} (L{HandedOver}) rather than closed.
"""

from __future__ import annotations

import socket
from collections import deque
from typing import Any

from twisted.internet import tcp, unix
from twisted.internet.address import UNIXAddress
from twisted.internet.interfaces import IReactorTime
from twisted.internet.posixbase import PosixReactorBase
from twisted.logger import Logger

from ipcd.compat import cpython
from ipcd.compat.twisted import PREEXISTING_SOCKET, adopt_unix_port, start_placed
from ipcd.placing import Inode, Placing, remove_if_same
from ipcd.reactors import IHostReactor

_log = Logger()
_RawSocket = cpython.RawSocket
_FAMILY = socket.AF_UNIX
_TYPE = socket.SOCK_STREAM


class HandedOver:
    """
    Connections answered with a descriptor, closed once the client has it.

    Closing an AF_UNIX socket while a descriptor sent on it is still unread
    sets the kernel's collector of in-flight sockets going (about 100 µs
    per close on Linux 6.x, more than the rest of a lookup), and Twisted's
    close came a reactor turn later, when the client had read.  So the
    writing half is shut at once (the client sees EOF after C{ok}, as
    before) and the socket is closed when the client has closed its end,
    or after C{grace} seconds; at most C{most} wait.
    """

    def __init__(
        self, clock: IReactorTime, grace: float = 0.05, most: int = 256
    ) -> None:
        self._clock = clock
        self._grace = grace
        self._most = most
        self._waiting: deque[tuple[float, socket.socket]] = deque()
        self._timer: Any = None

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, sock: socket.socket) -> None:
        """C{sock} has had its answer: close it soon."""
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()  # not shut (not connected, or refused): nothing to wait for
            return
        waiting = self._waiting
        waiting.append((self._clock.seconds(), sock))
        if len(waiting) > self._most:
            waiting.popleft()[1].close()
        if self._timer is None:
            self._timer = self._clock.callLater(self._grace, self._tick)

    def sweep(self) -> None:
        """Close those whose client has closed, or whose grace is over."""
        waiting = self._waiting
        if not waiting:
            return
        now = self._clock.seconds()
        while waiting:
            since, sock = waiting[0]
            if now - since < self._grace:
                try:
                    # EOF: the client has closed (bytes: nobody reads them).
                    sock.recv(1, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    return  # open still, and the ones after it are younger
                except OSError:
                    pass
            waiting.popleft()
            sock.close()

    def close_all(self) -> None:
        """Close every one now (the port stops listening)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        while self._waiting:
            self._waiting.popleft()[1].close()

    def _tick(self) -> None:
        self._timer = None
        self.sweep()
        if self._waiting:
            self._timer = self._clock.callLater(self._grace, self._tick)


class LookupPort(unix.Port):
    """C{twisted.internet.unix.Port}, with its factory's fast path first."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handed_over = HandedOver(self.reactor)

    def connectionLost(self, reason: Any) -> None:  # noqa: N802 (Twisted's name)
        self.handed_over.close_all()
        super().connectionLost(reason)

    def doRead(self) -> None:  # noqa: N802 (Twisted's name)
        # Twisted's accept loop (tcp.Port.doRead) in short: the same batch
        # sizes; an accept error other than "no more" (EMFILE, ...) goes to
        # Twisted's own loop, which handles and logs it as before (and
        # ipcd.limits counts it).
        self.handed_over.sweep()
        accept = cpython.accept_fd(self.socket)
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
                # The C socket object, not socket.socket's Python wrapper
                # (whose creation and close cost more than the rest of the
                # socket's life on this path); the usual wrapper is made if
                # a transport is to have it.
                self._serve(_RawSocket(_FAMILY, _TYPE, 0, fd), addr)
        except BaseException:
            _log.failure("accepting on {port}", port=self)
        if accepted == self.numberAccepts:
            self.numberAccepts += 20
        else:
            self.numberAccepts = max(1, accepted)

    def _serve(self, skt: Any, addr: Any) -> None:
        try:
            resume = self.factory.serve_at_once(skt, self.handed_over.add)
        except Exception:
            _log.failure("serving a connection on {port}", port=self)
            skt.close()
            return
        if resume is None:
            return
        skt = socket.socket(_FAMILY, _TYPE, 0, skt.detach())
        protocol = self.factory.buildProtocol(UNIXAddress(addr))
        if protocol is None:
            skt.close()
            return
        session = self.sessionno
        self.sessionno = session + 1
        transport = self.transport(skt, protocol, addr, self, session, self.reactor)
        protocol.makeConnection(transport)
        resume(protocol)


def _fast(reactor: Any, factory: Any) -> bool:
    """Whether C{factory} may serve within accept on C{reactor}'s ports."""
    return hasattr(factory, "serve_at_once") and isinstance(reactor, PosixReactorBase)


class PlacedServer(unix.Server):
    """A connection accepted by a L{PlacedPort}: its host is the port's."""

    def getHost(self) -> UNIXAddress:  # noqa: N802 (Twisted's name)
        # Twisted's getsockname() is the private path the socket was bound
        # at, /proc/self/fd/N/NAME: another descriptor of the process now.
        return self.server.getHost()


class PlacedPort(unix.Port):
    """
    A port on a socket bound elsewhere and moved to its name when listening
    (L{ipcd.placing}): its address, and its connections' host, is that
    name, and when it stops the file there is removed only if it is still
    this socket's, never another process's socket bound there since.
    """

    transport = PlacedServer
    place = ""
    inode: Inode | None = None

    def getHost(self) -> UNIXAddress:  # noqa: N802 (Twisted's name)
        # The socket's own name is where it was bound before the move.
        return UNIXAddress(self.place)

    def __repr__(self) -> str:
        return f"<{type(self.factory).__name__} on {self.place!r}>"

    def connectionLost(self, reason: Any) -> None:  # noqa: N802 (Twisted's name)
        remove_if_same(self.place, self.inode)
        tcp.Port.connectionLost(self, reason)  # unix.Port's removes by path


class PlacedLookupPort(LookupPort, PlacedPort):
    """A L{LookupPort} placed so."""


def can_place(reactor: Any) -> bool:
    """Whether L{listen_placed} can listen on C{reactor}."""
    return isinstance(reactor, PosixReactorBase) and (
        PREEXISTING_SOCKET.present or PREEXISTING_SOCKET.usable()
    )


def listen_placed(
    reactor: IHostReactor, placing: Placing, factory: Any, backlog: int, mode: int
) -> PlacedPort:
    """
    A listening port on C{placing}'s socket, a L{PlacedLookupPort} for a
    factory that can serve within accept; Twisted's log lines about it
    name C{placing.path}, not the private path it listens at until placed.
    """
    port_class = PlacedLookupPort if _fast(reactor, factory) else PlacedPort
    port = port_class(placing.address, factory, backlog, mode, reactor)
    port.place = placing.path
    return start_placed(port, placing.socket, placing.path)


def listen(reactor: Any, path: str, factory: Any, backlog: int, mode: int) -> Any:
    """
    C{reactor.listenUNIX}; with a L{LookupPort} for a factory that can serve
    connections within accept (C{serve_at_once}), on a reactor whose ports
    are Twisted's own.
    """
    if _fast(reactor, factory):
        return listen_fast(reactor, path, factory, backlog, mode)
    return reactor.listenUNIX(path, factory, backlog=backlog, mode=mode)


def listen_fast(
    reactor: IHostReactor, path: str, factory: Any, backlog: int, mode: int
) -> LookupPort:
    """C{reactor.listenUNIX}, with a L{LookupPort}."""
    port = LookupPort(path, factory, backlog, mode, reactor)
    port.startListening()
    return port


class KeepsFile(unix.Port):
    """
    A port on a listening socket systemd made (socket activation): the file
    is the socket unit's, and stays when the port stops, for the next ipcd.
    """

    def connectionLost(self, reason: Any) -> None:  # noqa: N802 (Twisted's name)
        tcp.Port.connectionLost(self, reason)  # unix.Port's would unlink it


class KeptLookupPort(LookupPort, KeepsFile):
    """A L{LookupPort} on a socket systemd made."""


def adopt(reactor: IHostReactor, sock: Any, factory: Any, mode: int) -> Any:
    """L{listen}, on C{sock}, a listening UNIX socket inherited from systemd."""
    port_class = KeptLookupPort if _fast(reactor, factory) else KeepsFile
    return adopt_unix_port(port_class, reactor, sock, factory, mode)
