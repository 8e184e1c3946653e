"""
Handing a connected socket over: the C{ok} + SCM_RIGHTS reply that passes its
descriptor (L{send_ok}), receiving and judging that reply (L{receive_fd},
L{check_reply}) and adopting the socket received into the reactor; messages
themselves are L{ipcd.framing}'s (blocking) and L{ipcd.wire}'s (Twisted).
"""

from __future__ import annotations

import os
import socket
import time
from array import array
from typing import TYPE_CHECKING, Any

from ipcd.compat import twisted as compat_twisted

if TYPE_CHECKING:  # the blocking client imports this module: no Twisted
    from twisted.internet.interfaces import IProtocolFactory, IReactorSocket

OK = b"ok"
# The longest lookup reply read: an ne's reason is far shorter.
MAX_REPLY = 4096


def scm_rights(fd: int | None) -> list[tuple[int, int, array[int]]]:
    """The ancillary data of a C{sendmsg} passing C{fd} (none for C{None})."""
    if fd is None:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", (fd,)))]


class HandoffError(ConnectionError):
    """ipcd (or a daemon) did not hand over a connection; the reason is given."""


class LookupRefused(HandoffError):
    """
    ipcd answered the lookup C{ne <reason>}: it refused it, or could not
    serve it (no route, policy, an unreachable hop); C{reason} is its text.
    Other L{HandoffError}s are answers no ipcd gives.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def send_ok(transport: Any, fd: int) -> None:
    """
    Answer C{ok} with C{fd} the way upstream clients need it: ONE sendmsg
    whose data is exactly C{ok}.

    Twisted's C{sendFileDescriptor} sends each fd with a single byte (C{o}),
    then the rest (C{k}) in a later send; an upstream client reads once and
    would see C{o}.  So while nothing else is queued on the transport, send
    it ourselves; fall back to Twisted's way only if the socket is full.
    """
    # Only on Twisted's own UNIX transport, and while it has nothing queued
    # (its attributes, not an interface's): other transports, the fakes of
    # ipcd.testing among them, go Twisted's way.
    if compat_twisted.holds_nothing(transport):
        try:
            sent = transport.getHandle().sendmsg([OK], scm_rights(fd))
        except BlockingIOError:
            pass
        else:
            if sent == len(OK):
                return
            transport.write(OK[sent:])  # the fd went with the first byte
            return
    transport.sendFileDescriptor(fd)
    transport.write(OK)


def check_reply(data: bytes, fds: list[int]) -> int:
    """
    Judge a lookup reply as upstream clients do: exactly C{ok} with one fd.
    Extra fds are closed; the one fd is returned.
    """
    fd = fds[0] if fds else None
    for extra in fds[1:]:
        os.close(extra)
    if data == OK and fd is not None:
        return fd
    if fd is not None:
        os.close(fd)
    if data.startswith(b"ne "):
        raise LookupRefused(data[3:].decode("utf-8", "replace"))
    if data == OK:
        raise HandoffError("ipcd answered ok without a file descriptor")
    if not data:
        raise HandoffError("ipcd closed the connection without an answer")
    raise HandoffError(f"unexpected answer from ipcd: {data[:80]!r}")


# The descriptors received are close-on-exec from the start: no fork in
# another thread can leak one before a later fcntl(), and none is made.
# (socket.recv_fds drops the flags it is given, in Python 3.11.)
_RECV_FLAGS = socket.MSG_CMSG_CLOEXEC
# Room for the ancillary data of up to 4 descriptors; the kernel closes
# any more than that (MSG_CTRUNC).
_MOST_FDS = 4
_ANCILLARY_SIZE = socket.CMSG_LEN(_MOST_FDS * 4)


def receive_fd(sock: socket.socket) -> socket.socket:
    """
    Read a lookup reply on a blocking C{sock} within its timeout, however
    the reply comes in pieces, and return the handed-over connection as a
    socket object (close-on-exec).  No descriptor received stays open if
    it fails.
    """
    data = b""
    fds: list[int] = []
    timeout = sock.gettimeout()
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        # ok comes in one sendmsg and is final; ne <reason> is final at EOF.
        while data[:2] != OK and len(data) < MAX_REPLY:
            try:
                chunk, ancillary, _flags, _addr = sock.recvmsg(
                    4096, _ANCILLARY_SIZE, _RECV_FLAGS
                )
            except ConnectionResetError:
                if not data:
                    raise
                # ipcd closed with some of the lookup unread (too long for
                # it): the kernel says so instead of EOF, after the reply.
                break
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    received = array("i")
                    received.frombytes(payload[: len(payload) - len(payload) % 4])
                    fds.extend(received)
                    # Only the first may be the answer: a server sending
                    # more, piece after piece, fills no descriptor table.
                    _close(fds[1:])
                    del fds[1:]
            if not chunk:
                break
            data += chunk
            if deadline is not None and data[:2] != OK:
                # A reply in pieces (only ne's EOF, from ipcd): the wait for
                # the next is what is left of the timeout, not a new one.
                sock.settimeout(max(deadline - time.monotonic(), 1e-6))
    except BaseException:
        _close(fds)  # a timeout (or ^C) after the reply's first piece
        raise
    return _socket_of(check_reply(data, fds))


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _socket_of(fd: int) -> socket.socket:
    """C{fd} as a socket object; closed if it is none (L{HandoffError})."""
    try:
        return socket.socket(fileno=fd)
    except OSError as e:
        os.close(fd)
        raise HandoffError(
            f"ipcd handed over a descriptor that is not a socket ({e.strerror})"
        ) from None


def adopt_socket(fd: int) -> socket.socket:
    """Wrap a received fd as a socket of the right family, close-on-exec."""
    os.set_inheritable(fd, False)
    return _socket_of(fd)


class _Capturing:
    """
    Builds the adopted connection's protocol with C{factory} and keeps it:
    C{IReactorSocket.adoptStreamConnection} returns nothing to take it from.
    """

    def __init__(self, factory: IProtocolFactory) -> None:
        self._factory = factory
        self.protocol: Any = None

    def buildProtocol(self, addr: Any) -> Any:  # noqa: N802 (Twisted's name)
        self.protocol = self._factory.buildProtocol(addr)
        return self.protocol


def adopt_into_reactor(
    reactor: IReactorSocket, fd: int, factory: IProtocolFactory
) -> Any:
    """
    Adopt a received connected fd into the reactor with C{factory}; returns
    the protocol built for it (C{HandoffError} if the factory built none).
    The original C{fd} is closed (the reactor works on a duplicate).
    """
    sock = adopt_socket(fd)
    capturing = _Capturing(factory)
    try:
        sock.setblocking(False)
        reactor.adoptStreamConnection(sock.fileno(), sock.family, capturing)
    finally:
        sock.close()
    if capturing.protocol is None:
        raise HandoffError("the protocol factory built no protocol for the connection")
    return capturing.protocol
