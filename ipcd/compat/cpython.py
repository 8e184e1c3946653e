"""
The private name of CPython that ipcd reads: here only.

    L{accept_fd}  a listening socket's accept that gives a bare descriptor
                  (C{socket.socket._accept}, the C method under C{accept}):
                  ipcd's lookup port serves most lookups on the C socket
                  object, without the Python wrapper C{accept} builds

L{RawSocket} is that C socket type (public: C{socket.SocketType}).  When the
name is gone, L{accept_fd} takes the public C{accept}'s socket apart.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from ipcd.compat import Name

#: The C socket type under C{socket.socket}.
RawSocket = socket.SocketType

ACCEPT = Name(
    "CPython",
    "socket.socket._accept",
    "lookups served on the C socket object at accept",
    "accept builds Python's socket wrapper first",
    lambda: callable(socket.SocketType._accept),  # type: ignore[attr-defined]
)


def accept_fd(listening: socket.socket) -> Callable[[], tuple[int, Any]]:
    """C{listening}'s accept, giving C{(descriptor, address)}."""
    if ACCEPT.present or ACCEPT.usable():
        return listening._accept  # type: ignore[attr-defined]

    def accept() -> tuple[int, Any]:
        sock, address = listening.accept()
        return sock.detach(), address

    return accept
