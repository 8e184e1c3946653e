"""
Service names, the socket directory (RUNDIR) and listening on
C{RUNDIR/NAME} with upstream's permissions and better stale-socket handling.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import re
import socket
import stat
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the blocking client imports this module: no Twisted
    from twisted.internet.interfaces import IReactorUNIX

DEFAULT_RUNDIR = "/tmp/libipc-run"
# ipcd's own sockets in RUNDIR: never a lookup, route or inbound target.
BROKER_NAME = "ipc"
CONTROL_NAME = "ipcd-control"
OWN_NAMES = (BROKER_NAME, CONTROL_NAME)
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


class UnsafeRundir(ValueError):
    """
    RUNDIR is not safe to serve from: another user could remove or replace
    its sockets.  The message is one line naming the problem and the fix.
    """


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


def normal_rundir(path: str) -> str:
    """
    RUNDIR as the held-directory walk takes it: absolute, without C{.}
    components, repeated or trailing slashes.  A relative path or one with
    C{..} (which the kernel resolves through symbolic links, not by text) is
    refused with C{ValueError}: ipcd runs as root from any directory.
    """
    if not path.startswith("/"):
        raise ValueError(f"{path!r} is a relative path: give an absolute one")
    names = [name for name in path.split("/") if name not in ("", ".")]
    if ".." in names:
        raise ValueError(f"{path!r} has a '..' component: give the path without it")
    return "/" + "/".join(names)


def ensure_rundir(rundir: str) -> None:
    """
    Create RUNDIR (mode 1770: sticky, rwx for owner and group) when it is
    missing.  An existing directory is left as it is: it is the admin's (and
    L{check_rundir}'s to judge).
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


def _user(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def check_rundir(rundir: str) -> None:
    """
    Raise L{UnsafeRundir} unless C{rundir} is a directory that only this
    process's effective user and, with the sticky bit, its group and others
    can write to:

      - it must be a directory (a symlink to one is followed only when the
        link itself belongs to this user or root);
      - it must be owned by this process's effective uid;
      - group or other write permission needs the sticky bit, so that
        nobody but a socket's owner (and RUNDIR's) can remove or replace it.

    Reads only metadata; creates and changes nothing.
    """
    euid = os.geteuid()
    me = _user(euid)
    where = f"unsafe RUNDIR {rundir}"
    # "link/" would follow the link: look at the name itself.
    path = rundir.rstrip(os.sep) or os.sep
    try:
        link = os.lstat(path)
    except FileNotFoundError:
        raise UnsafeRundir(f"{where}: does not exist; mkdir -m 1770 {rundir}") from None
    except OSError as e:
        raise UnsafeRundir(f"{where}: cannot inspect it: {e.strerror}") from None
    if stat.S_ISLNK(link.st_mode):
        try:
            target = _printable(os.readlink(path))
        except OSError as e:
            raise UnsafeRundir(
                f"{where}: cannot read the symlink: {e.strerror}"
            ) from None
        if link.st_uid not in (euid, 0):
            raise UnsafeRundir(
                f"{where}: is a symlink (to {target}) owned by "
                f"{_user(link.st_uid)}, not by ipcd's user {me}"
                f"{'' if euid == 0 else ' or root'}; "
                f"remove it: rm {rundir}"
            )
        where = f"unsafe RUNDIR {rundir} (a symlink to {target})"
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise UnsafeRundir(
                f"{where}: the target does not exist; create it or rm {rundir}"
            ) from None
        except OSError as e:
            raise UnsafeRundir(
                f"{where}: cannot inspect the target: {e.strerror}"
            ) from None
    else:
        st = link
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeRundir(
            f"{where}: not a directory ({file_kind(st.st_mode)}); "
            f"remove it or choose another --rundir"
        )
    if st.st_uid != euid:
        raise UnsafeRundir(
            f"{where}: owned by {_user(st.st_uid)}, not by ipcd's user {me}; "
            f"remove it, or chown {euid} {rundir}"
        )
    mode = stat.S_IMODE(st.st_mode)
    if not mode & stat.S_ISVTX:
        if mode & stat.S_IWOTH:
            raise UnsafeRundir(
                f"{where}: mode {mode:04o} lets other users replace sockets; "
                f"chmod 1770 {rundir} (sticky bit)"
            )
        if mode & stat.S_IWGRP:
            raise UnsafeRundir(
                f"{where}: mode {mode:04o} lets group members replace sockets; "
                f"chmod 1770 {rundir} (sticky bit), or 0750 to let them only "
                f"connect"
            )


def _printable(text: str) -> str:
    """C{text}, or its repr when it holds a newline or other control."""
    return text if text.isprintable() else repr(text)


def file_kind(mode: int) -> str:
    """What C{mode} (C{st_mode}) says a file is: C{"a regular file"}, ..."""
    for test, name in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return f"file type {stat.S_IFMT(mode):o}"


def prepare_rundir(rundir: str) -> None:
    """
    What ipcd does at start, before it creates anything in RUNDIR: create
    RUNDIR (1770) when nothing is at that path, then L{check_rundir}.
    Raises L{UnsafeRundir} (one line) when RUNDIR cannot be created or used.
    """
    if not os.path.lexists(rundir):
        try:
            ensure_rundir(rundir)
        except OSError as e:
            where = e.filename if e.filename not in (None, rundir) else None
            if where and os.path.lexists(where) and not os.path.isdir(where):
                # makedirs says "File exists" of a file in the way.
                detail = (
                    f"{where} is not a directory ({file_kind(os.lstat(where).st_mode)})"
                )
            else:
                detail = f"{where}: {e.strerror}" if where else e.strerror
            raise UnsafeRundir(
                f"cannot create RUNDIR {rundir}: {detail}; choose another --rundir"
            ) from None
    check_rundir(rundir)


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


def _listen(
    reactor: IReactorUNIX, path: str, factory: Any, backlog: int, mode: int
) -> Any:
    """C{reactor.listenUNIX}, or the lookup port where it applies."""
    from ipcd.lookupport import listen

    return listen(reactor, path, factory, backlog, mode)


def listen_unix(
    reactor: IReactorUNIX,
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
        port = _listen(reactor, path, factory, backlog, mode)
    finally:
        os.umask(old)
    if gid != -1:
        os.chown(path, -1, gid)
    return port
