"""
Putting a listening socket at C{RUNDIR/NAME} in one step, already with its
mode and group.

Binding at the name itself leaves two gaps: the name is free between the
removal of the old socket and the bind (whoever spins on bind there gets
the connections meant for ipcd), and the socket exists with the wrong
group until a chown, or mode until a chmod, both by path (a link swapped
in meanwhile would make ipcd, often root, change another file).  So
L{Placing} binds in a private directory made for it in RUNDIR (mode 0700,
opened first and then used only through its descriptor: nobody else can
enter it, replace the socket or swap a link in), under the umask that
gives the mode, sets the group there, and once the socket listens puts
it at its name: at ipcd's names by L{ipcd.planted.take_name}, which takes
out whatever is there in one step, or with C{link(2)}, which never
replaces anything (every other name is first come, first served).  The
socket keeps its inode, and so its listener, under the new name; its own
address (C{getsockname}, C{ss -x}) stays the one it was bound at,
C{/proc/self/fd/N/NAME}.

Its maker holds a C{flock} on the private directory until it removes it:
one found unlocked was left by a process killed meanwhile, and
L{remove_abandoned} (ipcd, at start) removes it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import socket
import stat
from collections.abc import Callable
from typing import Any

from ipcd.names import SUN_PATH_MAX
from ipcd.planted import Taken, open_parent, take_name

Inode = tuple[int, int]


class Placing:
    """
    A socket bound in a private directory of C{path}'s directory, with
    C{mode} from the moment it exists, to be moved to C{path} by
    L{place}.  Used as a context manager: leaving it removes the private
    directory and the socket's file there, and closes the socket unless it
    was placed.
    """

    def __init__(self, path: str, mode: int) -> None:
        if len(os.fsencode(path)) > SUN_PATH_MAX:
            # Bound elsewhere it would listen, but nobody could connect.
            raise OSError(errno.ENAMETOOLONG, "AF_UNIX path too long", path)
        self.path = path
        self.directory, self.name = os.path.split(path)
        self.inode: Inode | None = None
        self._parent = os.open(
            self.directory or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
        )
        self._private = -1
        self._private_name = ""
        self._inner = ""
        self.socket: socket.socket | None = None
        try:
            self._private, self._private_name = make_private(self._parent, path)
            # Non-blocking, as Twisted's ports take a socket they did not make.
            self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.socket.setblocking(False)
            self.address = f"/proc/self/fd/{self._private}/{self.name}"
            if len(os.fsencode(self.address)) > SUN_PATH_MAX:
                self.address = f"/proc/self/fd/{self._private}/s"
            self._inner = os.path.basename(self.address)
            old = os.umask(0o777 & ~mode)
            try:
                self.socket.bind(self.address)
            finally:
                os.umask(old)
        except OSError as e:
            self.__exit__(None, None, None)
            if e.errno is None:
                raise
            # Named as the caller asked: our private name means nothing to
            # whoever reads the error (a read-only RUNDIR, say).
            raise OSError(e.errno, e.strerror, path) from None
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def give_group(self, gid: int) -> None:
        """The socket's group: set where nobody else can swap it for a link."""
        os.chown(self._inner, -1, gid, dir_fd=self._private, follow_symlinks=False)

    def place(self, take: bool, make_room: Callable[[], object]) -> list[Taken]:
        """
        Put the socket at C{path}: taking out whatever is there if C{take}
        (L{ipcd.planted.take_name}, which returns what it took out), else
        only if the name is free; C{make_room()} is called when it is not
        (it removes a stale socket, or raises), then the link is tried once
        more.
        """
        st = os.stat(self._inner, dir_fd=self._private, follow_symlinks=False)
        inode = (st.st_dev, st.st_ino)
        taken: list[Taken] = []
        if take:
            taken = take_name(
                self._parent, self.name, self._private, self._inner, self.path
            )
        else:
            for attempt in (1, 2):
                try:
                    os.link(
                        self._inner,
                        self.name,
                        src_dir_fd=self._private,
                        dst_dir_fd=self._parent,
                        follow_symlinks=False,
                    )
                    break
                except FileExistsError:
                    if attempt == 2:
                        raise
                    make_room()
        self.inode = inode
        return taken

    def __enter__(self) -> Placing:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.inode is None and self.socket is not None:
            self.socket.close()  # not placed: nobody else has it
        if self._private != -1:
            if self._inner:  # gone if placed by rename, or never bound
                _quietly(os.unlink, self._inner, dir_fd=self._private)
            remove_private(self._parent, self._private_name, self._private)
            self._private = -1
        os.close(self._parent)


def _quietly(call: Callable[..., object], *args: Any, **kwargs: Any) -> None:
    """Best-effort clean-up: C{call}, whatever it raises."""
    try:
        call(*args, **kwargs)
    except OSError:
        pass


PRIVATE_PREFIX = ".ipcd-bind-"
_PRIVATE_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def make_private(parent: int, path: str) -> tuple[int, str]:
    """
    Make a private directory in C{parent} (C{.ipcd-bind-<16 hex>}, 0700)
    and return its descriptor and name.  The descriptor holds a C{flock}
    on it for the directory's life: one found unlocked was left by a
    process killed meanwhile (L{remove_abandoned}).  C{path} is what it is
    for, named in errors.
    """
    for _ in range(8):
        name = f"{PRIVATE_PREFIX}{secrets.token_hex(8)}"
        try:
            os.mkdir(name, 0o700, dir_fd=parent)
        except FileExistsError:
            continue
        try:
            opened = os.open(name, _PRIVATE_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            continue  # swept away as abandoned before it was locked
        except OSError:
            _quietly(os.rmdir, name, dir_fd=parent)
            raise
        try:
            st = os.fstat(opened)
            if not mine_alone(st):
                # Not the directory just made (replaced by someone who may
                # write RUNDIR): nothing of ours goes in it.
                raise PermissionError(
                    errno.EPERM, "temporary directory replaced meanwhile", path
                )
            try:
                fcntl.flock(opened, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(opened)  # being swept as abandoned: made afresh
                continue
            if still_at(parent, name, st):
                return opened, name
            os.close(opened)  # swept before it was locked: made afresh
        except BaseException:
            remove_private(parent, name, opened)
            raise
    raise FileExistsError(errno.EEXIST, "no free temporary name", path)


def mine_alone(st: os.stat_result) -> bool:
    """Whether the file C{st} describes is this user's, and nobody else's to use."""
    return st.st_uid == os.geteuid() and not stat.S_IMODE(st.st_mode) & 0o077


def still_at(parent: int, name: str, st: os.stat_result) -> bool:
    """Whether C{name} in C{parent} still leads to the inode C{st} describes."""
    try:
        now = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def remove_private(parent: int, name: str, opened: int) -> None:
    """
    Remove private directory C{name} in C{parent} if it is still
    C{opened}'s, then close C{opened} (which releases its lock).
    """
    mine = os.fstat(opened)
    _remove_if(parent, name, (mine.st_dev, mine.st_ino), os.rmdir)
    os.close(opened)


def remove_abandoned(directory: str) -> list[str]:
    """
    Remove the private directories in C{directory} that a process of this
    user made and was killed before removing (SIGKILL between its C{mkdir}
    and its C{rmdir}), with the socket left in them; returns their names.
    One still locked is in use (a start under way, ipcd's or a library
    program's) and stays; one of another user is not this process's to
    judge.
    """
    parent = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    removed = []
    try:
        for name in os.listdir(directory):
            if name.startswith(PRIVATE_PREFIX) and _sweep(parent, name):
                removed.append(name)
    finally:
        os.close(parent)
    return removed


def _sweep(parent: int, name: str) -> bool:
    """Remove private directory C{name}, its files first, if abandoned."""
    try:
        opened = os.open(name, _PRIVATE_FLAGS | os.O_NONBLOCK, dir_fd=parent)
    except OSError:
        return False  # not a directory, a link, or not readable: not ours
    try:
        st = os.fstat(opened)
        if not mine_alone(st):
            return False
        try:
            fcntl.flock(opened, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # its maker is alive
        # Only its maker could put anything in it (0700, this user's):
        # the socket it was binding, if it got that far.
        for inner in os.listdir(opened):
            _quietly(os.unlink, inner, dir_fd=opened)
        _remove_if(parent, name, (st.st_dev, st.st_ino), os.rmdir)
        return not still_at(parent, name, st)
    finally:
        os.close(opened)


def remove_if_same(path: str, inode: Inode | None) -> None:
    """
    Remove the socket file at C{path} if it is still the one placed there
    (C{inode}): never a socket another process put in its place since.
    """
    if inode is None:
        return
    try:
        parent, name = open_parent(path)
    except OSError:
        return
    try:
        _remove_if(parent, name, inode, os.unlink)
    finally:
        os.close(parent)


def _remove_if(
    parent: int, name: str, inode: Inode, remove: Callable[..., object]
) -> None:
    """C{remove} C{name} in C{parent} if it is still C{inode}; else leave it."""
    try:
        there = os.stat(name, dir_fd=parent, follow_symlinks=False)
        if (there.st_dev, there.st_ino) == inode:
            remove(name, dir_fd=parent)
    except OSError:
        pass  # gone, or another's: not ours to remove
