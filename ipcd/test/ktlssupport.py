"""
Helpers for the kernel TLS tests: whether this kernel has the C{tls}
upper-layer protocol, and loopback TCP connections to put it on.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

from ipcd.daemons.tls.ktls import TCP_ULP

WAIT = 30.0  # seconds any read may take (a VM under TCG is slow)

NO_ULP = (
    "this kernel has no tls upper-layer protocol (tcp_available_ulp): "
    "test_kernel_tls_vm runs this in a VM whose kernel has it"
)


@contextlib.contextmanager
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """Two ends of a loopback TCP connection, blocking with a deadline."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        near = socket.create_connection(listener.getsockname(), timeout=WAIT)
        far, _ = listener.accept()
    far.settimeout(WAIT)
    with near, far:
        yield near, far


def kernel_has_tls() -> bool:
    """
    Whether a connected TCP socket here takes the C{tls} upper-layer
    protocol (which loads the module where the kernel can).  Both ends stay
    open: the kernel refuses the ULP on a socket past ESTABLISHED.
    """
    try:
        with tcp_pair() as (near, _far):
            near.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
    except OSError:
        return False
    return True
