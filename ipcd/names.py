"""
Service names, the socket directory (RUNDIR) and listening on
C{RUNDIR/NAME} with upstream's permissions and better stale-socket handling.
"""

from __future__ import annotations

import errno
import grp
import os
import re
import socket
import stat
from collections.abc import Mapping
from typing import Any

DEFAULT_RUNDIR = "/tmp/libipc-run"
# Sticky, rwx for owner and group: members may add services but not remove
# or replace anybody else's socket.
RUNDIR_MODE = 0o1770
SOCKET_MODE = 0o660
# Upstream creates its sockets under umask(0o117): 0660 from the first instant.
_SOCKET_UMASK = 0o117

_NAME = re.compile(rb"[A-Za-z0-9._-]{1,255}")


class InvalidServiceName(ValueError):
    """A service name that libipc cannot map to a socket in RUNDIR."""


class SocketInUse(RuntimeError):
    """Another live process already listens on the socket path."""


def validate_service_name(name: str | bytes) -> str:
    """
    Return C{name} as text if it is 1-255 bytes of C{[A-Za-z0-9._-]} not
    starting with a dot; raise L{InvalidServiceName} with the reason otherwise.
    """
    raw = name.encode("utf-8", "surrogatepass") if isinstance(name, str) else name
    if not raw:
        raise InvalidServiceName("empty service name")
    if len(raw) > 255:
        raise InvalidServiceName(f"service name longer than 255 bytes ({len(raw)})")
    if not _NAME.fullmatch(raw):
        raise InvalidServiceName(
            f"invalid service name {_show(raw)}: only letters, digits, '.', '_' "
            "and '-' are allowed"
        )
    if raw.startswith(b"."):
        raise InvalidServiceName(
            f"invalid service name {_show(raw)}: may not start with '.'"
        )
    return raw.decode("ascii")


def _show(raw: bytes) -> str:
    text = raw[:64].decode("utf-8", "backslashreplace")
    return repr(text + ("..." if len(raw) > 64 else ""))


def resolve_rundir(
    configured: str | None = None, environ: Mapping[str, str] | None = None
) -> str:
    """The socket directory: configured, else C{$RUNDIR}, else the default."""
    if configured:
        return configured
    env = os.environ if environ is None else environ
    return env.get("RUNDIR") or DEFAULT_RUNDIR


def ensure_rundir(rundir: str) -> None:
    """
    Create RUNDIR (mode 1770: sticky, rwx for owner and group) when it is
    missing.  An existing directory is left as it is: it is the admin's.
    """
    if os.path.isdir(rundir):
        return
    path = rundir.rstrip(os.sep) or os.sep
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    try:
        os.mkdir(path, RUNDIR_MODE)
    except FileExistsError:
        if os.path.isdir(path):
            return  # created meanwhile by someone else: not ours to chmod
        raise
    # mkdir's mode is filtered by the umask; say exactly what we mean, on the
    # directory just made (never through a symlink swapped in since).
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.fchmod(fd, RUNDIR_MODE)
    finally:
        os.close(fd)


def socket_path(rundir: str, name: str) -> str:
    """The path of service C{name}: C{RUNDIR/NAME}, no suffix."""
    return os.path.join(rundir, validate_service_name(name))


def clear_stale_socket(path: str) -> None:
    """
    Make C{path} free to bind: remove a stale socket left by a dead process,
    refuse (L{SocketInUse}) when a live process still accepts on it, and refuse
    to touch anything that is not a socket.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SocketInUse(f"{path} exists and is not a socket; not removing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            _unlink_quietly(path)
            return
        if e.errno == errno.EAGAIN:
            # Backlog full: somebody is definitely listening.
            raise SocketInUse(f"another process is listening on {path}")
        raise
    finally:
        probe.close()
    raise SocketInUse(f"another process is listening on {path}")


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def listen_unix(
    reactor: Any,
    path: str,
    factory: Any,
    mode: int = SOCKET_MODE,
    backlog: int = 128,
    group: str | None = None,
) -> Any:
    """
    Listen on C{path} with C{mode} (and C{group}, if given), clearing a stale
    socket first.  The returned port removes the socket file when it stops
    listening.
    """
    gid = -1
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ValueError(f"no such group {group!r} for {path}") from None
    ensure_rundir(os.path.dirname(path) or ".")
    clear_stale_socket(path)
    # Narrowest umask while binding: the socket never exists with more
    # permissions than asked, even before the chmod.
    old = os.umask(0o777 & ~mode | _SOCKET_UMASK)
    try:
        port = reactor.listenUNIX(path, factory, backlog=backlog, mode=mode)
    finally:
        os.umask(old)
    if gid != -1:
        os.chown(path, -1, gid)
    return port
