"""
Service names and their sockets: validating a name, its path C{RUNDIR/NAME},
and listening there with upstream's permissions and better stale-socket
handling.

The directory itself (where it is, and its safety audit) is L{ipcd.rundir}'s.
"""

from __future__ import annotations

import errno
import grp
import os
import re
import socket
import stat
from time import sleep
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the blocking client imports this module: no Twisted
    from twisted.internet.interfaces import IReactorUNIX

from ipcd.planted import Taken, claimed, open_parent
from ipcd.rundir import ensure_rundir

# ipcd's own sockets in RUNDIR: never a lookup, route or inbound target.
BROKER_NAME = "ipc"
CONTROL_NAME = "ipcd-control"
OWN_NAMES = (BROKER_NAME, CONTROL_NAME)
SOCKET_MODE = 0o660
# Connects the kernel queues for a UNIX listener of ipcd's before it
# accepts them: why not more, see ipcd.backlogs.
UNIX_BACKLOG = 128
# The most a listen() takes: an int (the kernel caps it at net.core.somaxconn).
MAX_BACKLOG = 2**31 - 1
# Upstream creates its sockets under umask(0o117): 0660 from the first instant.
_SOCKET_UMASK = 0o117

_NAME = re.compile(rb"[A-Za-z0-9._-]{1,255}")
# The longest socket path: sun_path holds 108 bytes with its terminating NUL.
SUN_PATH_MAX = 107
# The largest gid a file can have: chown(2) takes (gid_t)-1, 4294967295, as
# "leave the group as it is".
MAX_GID = 2**32 - 2


class InvalidServiceName(ValueError):
    """A service name that libipc cannot map to a socket in RUNDIR."""


class SocketPathError(ValueError):
    """A RUNDIR and name the kernel would not take as a socket path; one line."""


class SocketInUse(RuntimeError):
    """Another live process already listens on the socket path."""


class SocketGroupError(RuntimeError):
    """The socket could not be given its group; the message says the way out."""


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


def socket_path(rundir: str, name: str) -> str:
    """The path of service C{name}: C{RUNDIR/NAME}, no suffix."""
    return os.path.join(rundir, validate_service_name(name))


def checked_socket_path(rundir: str, name: str) -> str:
    """
    L{socket_path} in a RUNDIR a program gave (an endpoint's, the blocking
    client's), or L{SocketPathError} naming C{rundir} when the kernel would not
    take that path as it is: a NUL ends an AF_UNIX path there (a rundir
    C{/tmp/libipc-run/pong\\0} reached pong whatever the name asked), and a
    path over L{SUN_PATH_MAX} bytes failed deep in the reactor (a traceback
    logged, then the connect's whole timeout).
    """
    path = socket_path(rundir, name)
    if "\0" in rundir:
        raise SocketPathError(
            f"rundir: {_shown(rundir)} has a NUL character, where a socket "
            "path would end"
        )
    try:
        size = len(os.fsencode(path))
    except UnicodeEncodeError:
        raise SocketPathError(
            f"rundir: {_shown(rundir)} is no file name: it has a lone surrogate"
        ) from None
    if size > SUN_PATH_MAX:
        raise SocketPathError(
            f"rundir: the socket path {_shown(path)} is {size} bytes; AF_UNIX "
            f"takes at most {SUN_PATH_MAX} (a shorter rundir, or name)"
        )
    return path


def _shown(text: str) -> str:
    """C{text}'s repr, its first 80 characters (a path may be any length)."""
    return repr(text[:80]) + ("..." if len(text) > 80 else "")


def clear_stale_socket(path: str) -> int | None:
    """
    Make C{path} free to bind: remove a stale socket left by a dead process,
    refuse (L{SocketInUse}) when a live process still accepts on it, and refuse
    to touch anything that is not a socket.

    At ipcd's own names (L{OWN_NAMES}) a socket of another user than this
    process's is a squatter's, live or not (a member of RUNDIR's group may
    bind one while ipcd is down, and would get every client's lookups): it
    is removed, and its owner's uid returned, for a warning; else C{None}.

    All of it happens in the directory opened first, on the inode checked:
    a directory on the way renamed or replaced by a link meanwhile cannot
    make ipcd remove a file of that name elsewhere.
    """
    try:
        # RUNDIR may be a link (the admin's, check_rundir says): followed.
        parent, name = open_parent(path)
    except FileNotFoundError:
        return None  # nothing to clear; the bind says what is missing
    try:
        try:
            fd = os.open(name, _PATH_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            return None
        try:
            probed = os.fstat(fd)
            if not stat.S_ISSOCK(probed.st_mode):
                raise SocketInUse(f"{path} exists and is not a socket; not removing it")
            squatter = name in OWN_NAMES and probed.st_uid != os.geteuid()
            if not squatter:
                # The inode just checked, whatever the path leads to now.
                _refuse_live(f"/proc/self/fd/{fd}", path)
        finally:
            os.close(fd)
        try:
            now = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if (now.st_dev, now.st_ino) != (probed.st_dev, probed.st_ino):
            raise SocketInUse(f"{path} was replaced while checked; not removing it")
        try:
            os.unlink(name, dir_fd=parent)
        except FileNotFoundError:
            pass
        return probed.st_uid if squatter else None
    finally:
        os.close(parent)


_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


# A socket of this user with other names (hard links) at one of ipcd's is
# a plant, unless a program of this user is placing its own there
# (ipcd.placing links it at the name, then removes its private name: two
# system calls apart): looked at again after each pause, 155 ms in all.
_PLACING_PAUSES = (0.005, 0.01, 0.02, 0.04, 0.08)


def refuse_own_live(path: str) -> None:
    """
    Raise L{SocketInUse} if a process listens on a socket of this user at
    C{path}, its one name: a program serving one of ipcd's names (another
    ipcd would hold RUNDIR's lock, and say so).  Anything else there is a
    plant, taken out when ipcd's socket takes the name (L{ipcd.planted}),
    and so is a socket of this user that still has other names after the
    pauses of L{_PLACING_PAUSES}: a member's hard link to a live socket
    elsewhere (root's /run/systemd/journal/stdout, where
    C{fs.protected_hardlinks} is 0).  The pauses block, only when such a
    link is there: ipcd runs this at start, before the reactor does (a
    library program listening at C{ipc} may, under it).
    """
    try:
        parent, name = open_parent(path)
    except FileNotFoundError:
        return
    try:
        for pause in (*_PLACING_PAUSES, None):
            # Looked up by name each time: what is at the name now, not the
            # inode seen first.  Were that link gone (a member cannot remove
            # it from a sticky RUNDIR: the file is not theirs), its socket's
            # one name left is elsewhere, and none of ipcd's business.
            try:
                fd = os.open(name, _PATH_FLAGS, dir_fd=parent)
            except OSError:
                return  # nothing there, or a symbolic link: not a socket
            try:
                probed = os.fstat(fd)
                if not stat.S_ISSOCK(probed.st_mode) or probed.st_uid != os.geteuid():
                    return
                if probed.st_nlink == 1:
                    # The inode just checked, whatever the path leads to now.
                    _refuse_live(f"/proc/self/fd/{fd}", path)
                    return
            finally:
                os.close(fd)
            if pause is not None:
                sleep(pause)
    finally:
        os.close(parent)


def _refuse_live(address: str, path: str) -> None:
    """
    Raise L{SocketInUse} if a process accepts on the socket at C{address},
    or if this process may not connect to it, so cannot tell.
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(address)
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return  # stale
        if e.errno == errno.EAGAIN:
            # Backlog full: somebody is definitely listening.
            raise SocketInUse(f"another process is listening on {path}") from None
        if e.errno in (errno.EACCES, errno.EPERM):
            # Another user's socket without write permission for us (in a
            # shared RUNDIR): it was a bare "[Errno 13] Permission denied",
            # which IPCService read as RUNDIR not writable.
            st = os.stat(address)
            raise SocketInUse(
                f"{path} is a socket of uid {st.st_uid} (mode "
                f"{stat.S_IMODE(st.st_mode):04o}) that this process may not "
                "connect to: whether another process listens on it cannot be "
                "told, so it is left there"
            ) from None
        raise
    finally:
        probe.close()
    raise SocketInUse(f"another process is listening on {path}")


def _listen(
    reactor: IReactorUNIX, path: str, factory: Any, backlog: int, mode: int
) -> Any:
    """C{reactor.listenUNIX}, or the lookup port where it applies."""
    from ipcd.lookupport import listen

    return listen(reactor, path, factory, backlog, mode)


def _adopt_inherited(reactor: IReactorUNIX, path: str, factory: Any, mode: int) -> Any:
    """
    A port on the socket systemd passed for C{path} (socket activation,
    L{ipcd.activation}), or None when it passed none.
    """
    from ipcd.activation import inherited
    from ipcd.lookupport import adopt

    sock = inherited().take(path, os.path.basename(path))
    return None if sock is None else adopt(reactor, sock, factory, mode)


def listen_unix(
    reactor: IReactorUNIX,
    path: str,
    factory: Any,
    mode: int = SOCKET_MODE,
    backlog: int = UNIX_BACKLOG,
    group: str | None = None,
) -> Any:
    """
    Listen on C{path} with C{mode} (and C{group}, if given), clearing a stale
    socket first.  The returned port removes the socket file when it stops
    listening, unless systemd made it: an inherited listening socket bound
    at C{path} is adopted instead (L{ipcd.activation}).

    On a reactor of Twisted's own, the socket appears at C{path} in one
    step, already listening with its mode and group (L{ipcd.placing}),
    replacing another user's at ipcd's own names (L{OWN_NAMES}).
    """
    gid = -1
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            # No group of that name: a number is a gid, as chgrp takes it.
            if not (group.isascii() and group.isdigit()) or int(group) > MAX_GID:
                # (4294967295 left the socket's group as it was; more was an
                # OverflowError, "gid is less than minimum".)
                raise ValueError(f"no such group {group!r} for {path}") from None
            gid = int(group)
    ensure_rundir(os.path.dirname(path) or ".")
    port = _adopt_inherited(reactor, path, factory, mode)
    if port is None:
        from ipcd.lookupport import can_place

        if can_place(reactor):
            return _listen_placed(reactor, path, factory, backlog, mode, gid, group)
        if _takes(path):
            # Bound at the name itself: what is there is taken out first
            # (the name is then free for a moment: anyone quicker wins it).
            from ipcd.planted import take_out_path

            refuse_own_live(path)
            _tell(take_out_path(path))
        clear_stale_socket(path)
        # Narrowest umask while binding: the socket never exists with more
        # permissions than asked, even before the chmod.
        old = os.umask(0o777 & ~mode | _SOCKET_UMASK)
        try:
            port = _listen(reactor, path, factory, backlog, mode)
        finally:
            os.umask(old)
    if gid != -1:
        try:
            # The socket's own group, never that of a file a link put in its
            # place since the bind points to (/etc/shadow...).
            os.chown(path, -1, gid, follow_symlinks=False)
        except OSError as e:
            from ipcd.startup import close_now  # (it imports this module)

            # Not left listening, nor in RUNDIR, under another group.
            close_now(port)
            raise _group_error(path, group, e) from None
    return port


def _group_error(path: str, group: str | None, e: OSError) -> SocketGroupError:
    return SocketGroupError(
        f"cannot give {path} to group {group!r}: {e.strerror.lower()} "
        f"(ipcd needs CAP_CHOWN, or to be a member of {group!r})"
    )


def _listen_placed(
    reactor: IReactorUNIX,
    path: str,
    factory: Any,
    backlog: int,
    mode: int,
    gid: int,
    group: str | None,
) -> Any:
    """L{listen_unix} by L{ipcd.placing}: bound, listening, then moved."""
    from twisted.internet.error import CannotListenError

    from ipcd.lookupport import listen_placed
    from ipcd.placing import Placing
    from ipcd.startup import close_now  # (it imports this module)

    # At ipcd's names only a live socket of this user is refused: the move
    # takes out whatever else is there (ipcd.planted).
    own = _takes(path)
    if own:
        refuse_own_live(path)
    else:
        # Refused before anything is bound; the link's make_room checks again.
        clear_stale_socket(path)
    try:
        placing = Placing(path, mode)
    except OSError as e:
        raise CannotListenError(None, path, e) from None
    with placing:
        if gid != -1:
            try:
                placing.give_group(gid)
            except OSError as e:
                raise _group_error(path, group, e) from None
        port = listen_placed(reactor, placing, factory, backlog, mode)
        try:
            taken = placing.place(own, lambda: clear_stale_socket(path))
        except FileExistsError:
            close_now(port)
            raise SocketInUse(f"another process took {path} meanwhile") from None
        except OSError as e:
            close_now(port)
            raise CannotListenError(None, path, e) from None
        except BaseException:
            close_now(port)
            raise
        port.inode = placing.inode
    _tell(taken)
    return port


def _takes(path: str) -> bool:
    """
    Whether C{path} is one of ipcd's names, taken whatever is there: its
    own, and those ipcd took RUNDIR's lock for (its daemons', pongd's).
    """
    return os.path.basename(path) in OWN_NAMES or claimed(path)


def _tell(taken: list[Taken]) -> None:
    """Log what was taken out of ipcd's names, one line each."""
    if taken:
        from twisted.logger import Logger

        log = Logger(namespace="ipcd")
        for entry in taken:
            log.warn("{taken}", taken=str(entry))
