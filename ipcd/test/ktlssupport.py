"""
Helpers for the kernel TLS tests: why they skip, how long they wait, and
loopback TCP connections to put TLS on.  (Whether this kernel has kTLS:
L{ipcd.daemons.tls.ktls.ktls_available}.)
"""

from __future__ import annotations

import contextlib
import fcntl
import socket
import struct
import termios
import time
from collections.abc import Iterator

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


def wait_queued(sock: socket.socket, size: int) -> None:
    """
    Wait (at most L{WAIT}) until plain TCP socket C{sock} holds C{size}
    bytes unread: every record a test sent is there before the kernel's
    TLS reads any.
    """
    deadline = time.monotonic() + WAIT
    while True:
        queued = fcntl.ioctl(sock, termios.FIONREAD, struct.pack("i", 0))
        if struct.unpack("i", queued)[0] >= size:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{size} bytes not queued in {WAIT} s")
        time.sleep(0.01)
