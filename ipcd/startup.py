"""
What starting ipcd's service tree takes besides the tree itself: its
services in start order, a listener's owner and address in words, closing
a port at once, the one-line reason a listener cannot listen, and the
open-files limit.  L{ipcd.tap.IPCDService} uses these.
"""

from __future__ import annotations

import errno
import os
import resource
import socket
from collections.abc import Iterator
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.error import CannotListenError, ConnectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from ipcd.activation import InheritedSocketError
from ipcd.config import Config
from ipcd.control import CONTROL_NAME
from ipcd.endpoints import BROKER_NAME
from ipcd.names import SocketGroupError, SocketInUse
from ipcd.rundir import UnsafeRundir


def leaves(service: Any) -> Iterator[Any]:
    """The services under C{service} that are no L{MultiService}, in order."""
    for child in service:
        if isinstance(child, MultiService):
            yield from leaves(child)
        else:
            yield child


# The names ipcd's own listeners go by in its log.
OWNERS = {
    BROKER_NAME: "ipcd",
    CONTROL_NAME: "ipcd",
    "pong": "pongd",
    "metrics": "metrics",
}


def address_text(address: Any) -> str:
    """C{127.0.0.1:9000}, C{[::1]:9000}, or a UNIX socket's path."""
    host = getattr(address, "host", None)
    if host is None:
        name = getattr(address, "name", None)
        return os.fsdecode(name) if name is not None else str(address)
    return f"[{host}]:{address.port}" if ":" in host else f"{host}:{address.port}"


def listening_text(port: Any) -> str:
    """
    Where C{port} listens, as L{address_text} says it: a listener on a
    link-local address of one link with its zone (C{[fe80::2%eth0]:9000}),
    which Twisted's UDP port leaves out of C{getHost()} (a TCP port's has
    it): udpd's said C{[fe80::2]:9000}, which every link may have.
    """
    address = port.getHost()
    host = getattr(address, "host", None)
    handle = getattr(port, "getHandle", None)
    if host is None or ":" not in host or "%" in host or handle is None:
        return address_text(address)
    sock = handle()
    if not isinstance(sock, socket.socket) or sock.family != socket.AF_INET6:
        return address_text(address)
    scope = sock.getsockname()[3]
    if not scope:
        return address_text(address)
    try:
        zone = socket.if_indextoname(scope)
    except OSError:
        zone = str(scope)  # (an interface gone since: its index)
    return f"[{host}%{zone}]:{address.port}"


def close_now(port: Any) -> None:
    """
    Close a listening port at once.  stopListening() would close it (and
    remove a UNIX socket's file) on the next reactor turn, which a start-up
    that gives up never reaches.
    """
    lost = getattr(port, "connectionLost", None)
    if lost is None or not getattr(port, "connected", False):
        port.stopListening()  # not a reactor's port (a test double)
        return
    # What stopListening's delayed call would do: close, unlink, doStop.
    lost(Failure(ConnectionDone()))


def daemon_of(leaf: Any, config: Config) -> Any:
    """The protocol daemon whose service holds C{leaf}, if any."""
    service = leaf
    while service is not None:
        daemon = config.registry.by_section(getattr(service, "name", None) or "")
        if daemon is not None:
            return daemon
        service = getattr(service, "parent", None)
    return None


def cannot_listen(error: Exception, leaf: Any, config: Config) -> str:
    """What failed when C{leaf} started, in one line with the way out."""
    rundir = config.rundir
    if isinstance(
        error, UnsafeRundir | SocketInUse | SocketGroupError | InheritedSocketError
    ):
        return str(error)
    endpoint = getattr(leaf, "endpoint", None)
    path = getattr(endpoint, "path", None)
    cause: Any = error
    if isinstance(error, CannotListenError):
        cause = error.socketError
        if path is not None:
            where = path
        elif error.interface is None:  # a UNIX socket: the port is its path
            where = str(error.port)
        else:
            host = error.interface or "*"
            where = f"[{host}]:{error.port}" if ":" in host else f"{host}:{error.port}"
    else:
        described = getattr(leaf, "description", None)
        where = path or leaf.name or described or type(endpoint).__name__
    code = getattr(cause, "errno", None)
    if isinstance(cause, socket.gaierror):
        # getaddrinfo's codes are no errnos (os.strerror(-2): "Unknown error").
        code, reason = None, str(cause.strerror or cause).lower()
    elif code:
        reason = os.strerror(code).lower()
    else:  # one line, whatever the exception says
        reason = " ".join(str(cause).split())
    daemon = daemon_of(leaf, config)
    if path is None and daemon is not None:  # a protocol daemon's listener
        hint = daemon.hint(error)
    elif path is None and hasattr(leaf, "hint"):  # one that knows its way out
        hint = leaf.hint(error)
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = f"make RUNDIR {rundir} writable for ipcd, or use another --rundir"
    else:
        hint = "use another --rundir"
    return f"cannot listen on {where}: {reason} ({hint})"


def raise_open_files_limit(log: Logger) -> tuple[int, int]:
    """
    Raise the soft RLIMIT_NOFILE to the hard limit: every client, relay and
    handed-over socket is an fd, and 1024 is soon reached.  Logged once with
    both numbers; a failure is a warning.  Returns the (soft, hard) in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        log.info("open files: the soft limit is the hard limit, {hard}", hard=hard)
        return soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as e:
        log.warn(
            "open files: cannot raise the soft limit {soft} to the hard "
            "limit {hard}: {error}",
            soft=soft,
            hard=hard,
            error=e,
        )
        return soft, hard
    log.info(
        "open files: raised the soft limit from {soft} to the hard limit {hard}",
        soft=soft,
        hard=hard,
    )
    return hard, hard
