"""
The client side, blocking: connect to a libipc service the way libipc does,
and exchange framed messages.

    sock = connect("pong")
    send_message(sock, b"hello")
    assert recv_message(sock) == b"hello"

It imports no Twisted: a program that only connects need not have it
loaded.  For Twisted programs, see L{ipcd.endpoints.IPCClientEndpoint} (or
the C{ipc:} endpoint strings); C{ipcd.client.IPCClientEndpoint} and
C{IPCServerEndpoint} still name them, imported when first used.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

from ipcd.framing import recv_message, send_message
from ipcd.handoff import HandoffError, LookupRefused, receive_fd
from ipcd.names import BROKER_NAME, checked_socket_path, validate_service_name
from ipcd.routes import encode_lookup
from ipcd.rundir import resolve_rundir

__all__ = [
    "HandoffError",
    "LookupRefused",
    "connect",
    "recv_message",
    "send_message",
]

# Seconds a client waits to connect and for ipcd's answer: longer than
# ipcd's default connect_timeout (5 s), so that a hop that does not answer
# is reported by ipcd, naming it, rather than as the client's own timeout.
DEFAULT_TIMEOUT = 10.0
# The longest a wait may be bounded by: a year (far longer, and the kernel's
# or the reactor's timers overflow with an error from deep inside).
MAX_TIMEOUT = 365 * 24 * 3600.0
# What a timeout out of range is told, before "got ...".
EXPECTED_TIMEOUT = f"expected seconds, above 0 and at most {MAX_TIMEOUT:.0f} (a year)"

_TWISTED_NAMES = ("IPCClientEndpoint", "IPCServerEndpoint")
# Seconds as written: ASCII digits, a point, an exponent (and the words
# float() takes, which checked_timeout then refuses, saying the range).
# float() also reads '١' (Arabic-Indic one) as 1, '1_0' as 10, ' 1\n' as 1.
_SECONDS = re.compile(
    r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?(?i:nan|inf|infinity)"
)


def __getattr__(name: str) -> Any:
    """The Twisted endpoint classes, imported (with Twisted) on first use."""
    if name in _TWISTED_NAMES:
        from ipcd import endpoints

        return getattr(endpoints, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def checked_timeout(timeout: float) -> float:
    """
    C{timeout} as seconds, if a wait can be bounded by it: a number above 0
    and at most L{MAX_TIMEOUT}; else C{ValueError}, naming it (not the
    socket's or the reactor's error, later and from deep inside).
    """
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 < timeout <= MAX_TIMEOUT  # (False for NaN)
    ):
        raise ValueError(f"timeout: {EXPECTED_TIMEOUT}, got {timeout!r}")
    return float(timeout)


def timeout_option(text: str) -> float:
    """
    A C{--timeout} option's value (L{checked_timeout}): C{ValueError}
    saying what was expected, for the command's usage error.
    """
    if not _SECONDS.fullmatch(text):
        raise ValueError(f"expected seconds, got {text!r}")
    try:
        return checked_timeout(float(text))
    except ValueError:
        # As typed: "got '-1'", not the float's "got -1.0".
        raise ValueError(f"{EXPECTED_TIMEOUT}, got {text!r}") from None


def no_ipcd(path: str, error: OSError | str) -> str:
    """What a client says when no ipcd answers at C{path}, and what to do."""
    reason = error.strerror if isinstance(error, OSError) else error
    return (
        f"no ipcd listens on {path} ({str(reason).lower()}): is ipcd running? "
        "Start it (ipcd), or set RUNDIR to its socket directory"
    )


def busy_pauses() -> Iterator[float]:
    """
    The pauses between connects to a listener whose backlog is full, here
    and in L{ipcd.endpoints}: doubling from 0.5 ms to at most 50 ms.
    """
    pause = 0.0005
    while True:
        yield pause
        pause = min(pause * 2, 0.05)


def _connect_unix(sock: socket.socket, path: str, timeout: float | None) -> None:
    """
    connect(), waiting while the listener's backlog is full: AF_UNIX reports
    that as EAGAIN at once instead of waiting out the timeout.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    for delay in busy_pauses():
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            if deadline is not None and time.monotonic() + delay > deadline:
                raise TimeoutError(f"{path}: listener busy (backlog full)") from None
            time.sleep(delay)


def _connect_ipcd(sock: socket.socket, path: str, timeout: float | None) -> None:
    """connect() to ipcd's socket; its absence says what to do."""
    try:
        _connect_unix(sock, path, timeout)
    except (FileNotFoundError, ConnectionRefusedError) as e:
        raise type(e)(no_ipcd(path, e)) from None


def _connect_service(sock: socket.socket, path: str, timeout: float | None) -> None:
    """connect() to a service's socket; a failure names it, as open() would."""
    try:
        _connect_unix(sock, path, timeout)
    except OSError as e:
        if e.errno is None or e.filename is not None:
            raise
        raise type(e)(e.errno, e.strerror, path) from None


def connect(
    service: str,
    *,
    rundir: str | None = None,
    network: str | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
) -> socket.socket:
    """
    A blocking socket connected to C{service}.

    libipc's rule: when C{network} (default: C{$IPC_NETWORK}) is set, ask ipcd
    at C{RUNDIR/ipc} and use the connection it hands over; otherwise connect
    straight to C{RUNDIR/NAME}.  Failures raise C{OSError} (a
    L{HandoffError} says what ipcd answered).  C{timeout} bounds the connect
    and the lookup; the returned socket is blocking with no timeout.
    """
    validate_service_name(service)
    if timeout is not None:
        timeout = checked_timeout(timeout)
    directory = resolve_rundir(rundir)
    if network is None:
        network = os.environ.get("IPC_NETWORK", "")
    # The one socket connected to, judged before anything is opened.
    path = checked_socket_path(directory, BROKER_NAME if network else service)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        if not network:
            _connect_service(sock, path, timeout)
            sock.settimeout(None)
            return sock
        _connect_ipcd(sock, path, timeout)
        try:
            send_message(sock, encode_lookup(service, network))
        except (BrokenPipeError, ConnectionResetError):
            pass  # ipcd answered before it all came (too long): its answer says
        handed = receive_fd(sock)
    except BaseException:
        sock.close()
        raise
    sock.close()
    handed.setblocking(True)
    return handed
