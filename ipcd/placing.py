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
gives the mode, sets the group there, and once the socket listens moves
it to its name with C{rename(2)}, which replaces the file there, if any,
in one step (ipcd's own names, L{ipcd.names.OWN_NAMES}), or with
C{link(2)}, which never replaces anything (every other name is first come,
first served).  The socket keeps its inode, and so its listener, under the
new name; its own address (C{getsockname}, C{ss -x}) stays the one it was
bound at, C{/proc/self/fd/N/NAME}.
"""

from __future__ import annotations

import errno
import os
import secrets
import socket
import stat
from collections.abc import Callable
from typing import Any

Inode = tuple[int, int]

# sun_path holds 108 bytes with its terminating NUL.
_SUN_PATH = 107


class Placing:
    """
    A socket bound in a private directory of C{path}'s directory, with
    C{mode} from the moment it exists, to be moved to C{path} by
    L{place}.  Used as a context manager: leaving it removes the private
    directory and the socket's file there, and closes the socket unless it
    was placed.
    """

    def __init__(self, path: str, mode: int) -> None:
        if len(os.fsencode(path)) > _SUN_PATH:
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
            self._make_private()
            # Non-blocking, as Twisted's ports take a socket they did not make.
            self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.socket.setblocking(False)
            self.address = f"/proc/self/fd/{self._private}/{self.name}"
            if len(os.fsencode(self.address)) > _SUN_PATH:
                self.address = f"/proc/self/fd/{self._private}/s"
            self._inner = os.path.basename(self.address)
            old = os.umask(0o777 & ~mode)
            try:
                self.socket.bind(self.address)
            finally:
                os.umask(old)
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def _make_private(self) -> None:
        """Make and open the private directory, checking it is the one made."""
        for _ in range(8):
            name = f".ipcd-bind-{secrets.token_hex(8)}"
            try:
                os.mkdir(name, 0o700, dir_fd=self._parent)
            except FileExistsError:
                continue
            break
        else:
            raise FileExistsError(errno.EEXIST, "no free temporary name", self.path)
        try:
            self._private = os.open(
                name,
                os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                dir_fd=self._parent,
            )
        except OSError:
            _quietly(os.rmdir, name, dir_fd=self._parent)
            raise
        self._private_name = name
        st = os.fstat(self._private)
        if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
            # Not the directory just made (replaced by someone who may
            # write RUNDIR): nothing of ours goes in it.
            raise PermissionError(
                errno.EPERM, "temporary directory replaced meanwhile", self.path
            )

    def give_group(self, gid: int) -> None:
        """The socket's group: set where nobody else can swap it for a link."""
        os.chown(self._inner, -1, gid, dir_fd=self._private, follow_symlinks=False)

    def place(self, replace: bool, make_room: Callable[[], object]) -> None:
        """
        Move the socket to C{path}: replacing whatever is there if
        C{replace}, else only if the name is free; C{make_room()} is called
        when it is not (it removes a stale socket, or raises), then the
        move is tried once more.
        """
        st = os.stat(self._inner, dir_fd=self._private, follow_symlinks=False)
        inode = (st.st_dev, st.st_ino)
        if replace:
            os.rename(
                self._inner,
                self.name,
                src_dir_fd=self._private,
                dst_dir_fd=self._parent,
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

    def __enter__(self) -> Placing:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.inode is None and self.socket is not None:
            self.socket.close()  # not placed: nobody else has it
        if self._private != -1:
            if self._inner:  # gone if placed by rename, or never bound
                _quietly(os.unlink, self._inner, dir_fd=self._private)
            _remove_directory(self._parent, self._private_name, self._private)
            os.close(self._private)
            self._private = -1
        os.close(self._parent)


def _quietly(call: Callable[..., object], *args: Any, **kwargs: Any) -> None:
    """Best-effort clean-up: C{call}, whatever it raises."""
    try:
        call(*args, **kwargs)
    except OSError:
        pass


def _remove_directory(parent: int, name: str, opened: int) -> None:
    """Remove directory C{name} in C{parent} if it is still C{opened}'s."""
    mine = os.fstat(opened)
    _remove_if(parent, name, (mine.st_dev, mine.st_ino), os.rmdir)


def remove_if_same(path: str, inode: Inode | None) -> None:
    """
    Remove the socket file at C{path} if it is still the one placed there
    (C{inode}): never a socket another process put in its place since.
    """
    if inode is None:
        return
    directory, name = os.path.split(path)
    try:
        parent = os.open(directory or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
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
