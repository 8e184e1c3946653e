"""
Kernel TLS (kTLS): after OpenSSL's handshake, the kernel does the record
layer of a TCP socket, so the socket can go to a process that only reads
and writes plaintext (the client, the service) with no relay in between.

This module holds the kernel's side: whether this kernel has the C{tls}
upper-layer protocol (L{ktls_available}), the numbers of its socket options
(linux/tls.h), and the switch of a socket.
"""

from __future__ import annotations

import socket

# linux/tcp.h, linux/tls.h and linux/socket.h: not all in Python's socket.
TCP_ULP = getattr(socket, "TCP_ULP", 31)
SOL_TLS = getattr(socket, "SOL_TLS", 282)
TLS_TX = 1
TLS_RX = 2
TLS_SET_RECORD_TYPE = 1
TLS_GET_RECORD_TYPE = 2

_available: bool | None = None


def ktls_available() -> bool:
    """
    Whether this kernel can put TLS on a TCP socket: a loopback TCP
    connection takes the C{tls} upper-layer protocol (the module loaded, or
    loadable by the kernel on demand).  Probed once, then cached.
    """
    global _available
    if _available is None:
        _available = _probe()
    return _available


def _probe() -> bool:
    try:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return False
    with listener:
        try:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            with socket.create_connection(listener.getsockname(), timeout=10) as sock:
                accepted, _ = listener.accept()
                # The peer stays open: past ESTABLISHED (its FIN in) the
                # kernel refuses the ULP with ENOTCONN.
                with accepted:
                    sock.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
        except OSError:
            return False
    return True
