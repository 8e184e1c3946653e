"""
Socket activation: the listening sockets systemd passes ipcd
(C{LISTEN_FDS}, C{LISTEN_PID}, C{LISTEN_FDNAMES}).

Twisted reads those variables itself, once, when C{twisted.internet.endpoints}
is first imported (and only if C{LISTEN_PID} is this process's), and takes
them out of the environment; its C{systemd:} endpoint strings then name the
sockets by index or name.  L{InheritedSockets} asks Twisted's own parser for
them (public API, so ipcd and the daemons' C{systemd:} listeners agree on
which socket is which) and gives ipcd's C{RUNDIR/NAME} listeners the one
bound at their path, or named like them in C{LISTEN_FDNAMES}
(L{InheritedSockets.take}).

An inherited socket is adopted only if it is what ipcd would have made: a
listening C{AF_UNIX} stream socket bound at C{RUNDIR/NAME}, whose file is a
socket owned by ipcd's own user (RUNDIR itself is audited as ever, before).
Anything else is refused in one line (L{InheritedSocketError}).
"""

from __future__ import annotations

import os
import socket
import stat
from typing import Any

from ipcd.rundir import user_text


class InheritedSocketError(ValueError):
    """An inherited socket ipcd will not adopt: one line, with the way out."""


def inherited_fd(description: str) -> int | None:
    """
    The descriptor Twisted's C{systemd:} parser gives for C{description}
    (C{systemd:domain=INET:name=udpd}, ...), or None: no such socket.
    """
    from twisted.internet.endpoints import serverFromString

    try:
        return int(serverFromString(None, description).fileno)
    except (IndexError, KeyError, ValueError):
        return None


def _same_path(bound: Any, path: str) -> bool:
    if not isinstance(bound, str) or not bound.startswith("/"):
        return False  # abstract, unnamed, or not a UNIX socket
    return os.path.realpath(bound) == os.path.realpath(path)


def socket_copy(fd: int) -> socket.socket:
    """
    A socket on a duplicate of C{fd}, to look at (close it after); OSError
    when C{fd} is not open or not a socket, and then no duplicate is left
    open (C{socket.socket(fileno=...)} does not close one it refuses).
    """
    copy = os.dup(fd)
    try:
        return socket.socket(fileno=copy)
    except BaseException:
        os.close(copy)
        raise


def unfit(
    sock: socket.socket, family: int, kind: int = socket.SOCK_STREAM
) -> str | None:
    """
    Why C{sock} cannot be listened on as a C{family} stream (C{kind}
    C{SOCK_DGRAM}: served as a datagram socket bound to a port), or None.
    """
    name = "UNIX" if family == socket.AF_UNIX else socket.AddressFamily(family).name
    if sock.family != family:
        return f"not an {name} socket ({socket.AddressFamily(sock.family).name})"
    if sock.type != kind:
        what = "stream" if kind == socket.SOCK_STREAM else "datagram"
        return f"not a {what} socket ({socket.SocketKind(sock.type).name})"
    if kind == socket.SOCK_STREAM:
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return "not listening"
    elif sock.getsockname()[1] == 0:
        return "not bound to a port"
    return None


def unfit_fd(fd: int, family: int, kind: int = socket.SOCK_STREAM) -> str | None:
    """L{unfit} for the socket at descriptor C{fd}, or why it is not one."""
    try:
        sock = socket_copy(fd)
    except OSError as e:
        return f"not usable (fd {fd}: {e.strerror})"
    with sock:
        return unfit(sock, family, kind)


def _file_of(fd: int) -> tuple[int, int] | None:
    """Which open file C{fd} is (device and inode), or None: not open."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_socket_file(path: str) -> None:
    """
    Raise L{InheritedSocketError} unless C{path} is a socket (not a symbolic
    link) owned by this process's effective user: the socket unit made it
    (C{SocketUser=}), and nobody else may own a socket ipcd answers on.
    """
    try:
        st = os.lstat(path)
    except OSError as e:
        raise InheritedSocketError(
            f"inherited socket {path}: cannot inspect its file: {e.strerror}"
        ) from None
    if not stat.S_ISSOCK(st.st_mode):
        raise InheritedSocketError(
            f"inherited socket {path}: the file there is not a socket; "
            "let the socket unit create it (ListenStream=)"
        )
    euid = os.geteuid()
    if st.st_uid != euid:
        raise InheritedSocketError(
            f"inherited socket {path}: owned by {user_text(st.st_uid)}, not by "
            f"ipcd's user {user_text(euid)}; set SocketUser= in the socket unit"
        )


class InheritedSockets:
    """
    The sockets systemd passed this process, as Twisted parsed them; each is
    taken at most once.  An empty one when ipcd was not socket-activated.
    """

    def __init__(self) -> None:
        self._taken: set[int] = set()
        self._fds: list[int] | None = None
        # What each descriptor was when first listed (see L{_passed}).
        self._files: dict[int, tuple[int, int] | None] = {}

    def fds(self) -> list[int]:
        """Every inherited descriptor, in C{LISTEN_FDS} order."""
        if self._fds is None:
            fds: list[int] = []
            while (
                fd := inherited_fd(f"systemd:domain=UNIX:index={len(fds)}")
            ) is not None:
                fds.append(fd)
            self._fds = fds
            self._files = {fd: _file_of(fd) for fd in fds}
        return self._fds

    def _passed(self, fd: int) -> bool:
        """
        Whether C{fd} is still what systemd passed: Twisted closes the
        descriptor of a C{systemd:} socket it adopts (tcpd's, say), whose
        number may since be any socket's, even a listener of ours.
        """
        return fd not in self._taken and _file_of(fd) == self._files.get(fd)

    def find(self, path: str, name: str) -> int | None:
        """
        The untaken inherited descriptor for C{RUNDIR/NAME} at C{path}: the
        one named C{name} in C{LISTEN_FDNAMES} if it is a UNIX socket, else
        one bound at C{path}.
        """
        if not self.fds():
            return None
        named = inherited_fd(f"systemd:domain=UNIX:name={name}")
        for fd in self.fds():
            if not self._passed(fd):
                continue
            try:
                sock = socket_copy(fd)
            except OSError:
                continue  # not a socket: nobody's RUNDIR/NAME
            with sock:
                if fd == named and sock.family == socket.AF_UNIX:
                    return fd
                try:
                    bound = sock.getsockname()
                except OSError:
                    continue
                if _same_path(bound, path):
                    return fd
        return None

    def take(self, path: str, name: str) -> socket.socket | None:
        """
        The inherited listening socket for C{RUNDIR/NAME}, now the caller's
        (its descriptor is closed when the returned socket is), or None.
        Raises L{InheritedSocketError} when the one found is unfit: not a
        listening stream, bound elsewhere, or its file not ipcd's.
        """
        fd = self.find(path, name)
        if fd is None:
            return None
        self._taken.add(fd)
        sock = socket.socket(fileno=fd)
        try:
            why = unfit(sock, socket.AF_UNIX)
            bound = sock.getsockname() if why is None else None
            if why is None and not _same_path(bound, path):
                why = f"bound at {bound!r}, not at {path}"
            if why is not None:
                raise InheritedSocketError(
                    f"inherited socket {name} (fd {fd}) is {why}; give ipcd a "
                    f"listening stream socket at {path} (ListenStream={path} "
                    "in the socket unit), or none"
                )
            check_socket_file(path)
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        return sock

    def holds(self, path: str, name: str) -> bool:
        """Whether C{path} is (or will be) served by an inherited socket."""
        try:
            return self.find(path, name) is not None
        except OSError:
            return False


_inherited: InheritedSockets | None = None


def inherited() -> InheritedSockets:
    """This process's inherited sockets (one set: the environment is one)."""
    global _inherited
    if _inherited is None:
        _inherited = InheritedSockets()
    return _inherited
