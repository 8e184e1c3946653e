"""
One ipcd per RUNDIR: the instance lock, a C{flock} on C{RUNDIR/.ipcd-lock}
held from before ipcd places anything in RUNDIR until it exits.

Two ipcds of one user started at the same instant both find RUNDIR/ipc
free, and the later one's socket would replace the earlier one's
(L{ipcd.placing} moves ipcd's own sockets in with C{rename(2)}): both would
run, one unreachable.  With the lock, the second says so in one line and
exits.

The lock file is ipcd's user's, mode 0600, and stays in RUNDIR: nobody else
can open it (so nobody else can lock it) and, RUNDIR being sticky or
writable by its owner only, nobody else can remove or replace it.  RUNDIR
itself is no lock: its group may open it, and so C{flock} it.  Whatever
else is at the name (a group member's file, held locked or not, a symbolic
link, a FIFO, a hard link to another file) is replaced with ipcd's own in
one step (L{ipcd.planted.take_name}), never opened for writing nor
followed; a file is
the lock only once C{flock} holds it and the name still leads to it.  The
descriptor is close-on-exec, so nothing ipcd runs keeps the lock after
ipcd exits; closing it (at exit, even by SIGKILL) releases the lock.

A member can plant a file there only while the name is free, before the
first ipcd in that RUNDIR: two ipcds starting then at the same instant
might each replace it just after the other's check and both run.  Once the
file is ipcd's that cannot happen again.  A directory there is swapped
out in one step as well, and left beside under an aside name
(L{ipcd.planted}).

Library programs (L{ipcd.services.IPCService}, C{ipc:} endpoints) take no
lock: several may each serve their own names in one RUNDIR, and a name
taken twice already fails with L{ipcd.names.SocketInUse}.
"""

from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Iterable

from ipcd.daemons import StartupError
from ipcd.placing import make_private, mine_alone, remove_private, still_at
from ipcd.planted import Taken, claim, take_name, unclaim

LOCK_NAME = ".ipcd-lock"
_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
# A round ends without the lock only when the name changed meanwhile
# (another ipcd replacing a planted file, a member creating one where the
# name was free); once a file of ipcd's user is there, nobody else can
# replace it: a few rounds do.
_ROUNDS = 16


class InstanceLocked(StartupError):
    """Another ipcd holds RUNDIR's lock; the message says which, in one line."""


class InstanceLock:
    """
    The lock held: C{release} (or exit) gives it up.  C{taken}: what was at
    the lock's name and was taken out of the way, for the log.
    """

    def __init__(self, fd: int, path: str, taken: list[Taken] | None = None) -> None:
        self.fd = fd
        self.path = path
        self.taken = taken or []
        self._claimed: frozenset[str] = frozenset()

    @property
    def held(self) -> bool:
        return self.fd != -1

    def claim(self, paths: Iterable[str]) -> None:
        """The socket C{paths} are ipcd's to take while it holds the lock."""
        if self.fd != -1:
            self._claimed = claim(paths)

    def release(self) -> None:
        """Give the lock up; the file stays, for the next ipcd."""
        if self.fd != -1:
            unclaim(self._claimed)
            self._claimed = frozenset()
            os.close(self.fd)
            self.fd = -1


def take_instance_lock(rundir: str) -> InstanceLock:
    """
    Take RUNDIR's instance lock, or raise L{InstanceLocked} when another
    process holds it.  RUNDIR must have passed L{ipcd.rundir.check_rundir}.
    """
    path = os.path.join(rundir, LOCK_NAME)
    parent = os.open(rundir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    taken: list[Taken] = []
    try:
        for _ in range(_ROUNDS):
            fd = _own_lock_file(parent, path, taken)
            if fd == -1:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = holder_pid(os.fstat(fd))
                os.close(fd)
                holder = "another ipcd" if pid is None else f"another ipcd (pid {pid})"
                raise InstanceLocked(
                    f"{holder} is running on RUNDIR {rundir} (it holds {path}); "
                    f"stop it first, or use another --rundir"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            if still_at(parent, LOCK_NAME, os.fstat(fd)):
                return InstanceLock(fd, path, taken)
            os.close(fd)  # replaced or removed meanwhile: again, by name
    finally:
        os.close(parent)
    raise InstanceLocked(
        f"cannot take {path}: it was replaced {_ROUNDS} times while ipcd took "
        f"it; is another ipcd starting on RUNDIR {rundir}?"
    )


def _own_lock_file(parent: int, path: str, taken: list[Taken]) -> int:
    """
    A descriptor of ipcd's user's lock file at the name, made if missing,
    put in place of anything else there (added to C{taken}); -1 when the
    name changed meanwhile.
    """
    try:
        fd = os.open(LOCK_NAME, _OPEN, dir_fd=parent)
    except FileNotFoundError:
        try:
            fd = os.open(
                LOCK_NAME, _OPEN | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=parent
            )
        except FileExistsError:
            return -1
        os.fchmod(fd, 0o600)  # whatever the umask took away
        return fd
    except OSError:
        # A symbolic link (ELOOP), a socket (ENXIO), a file under another's
        # lease (EWOULDBLOCK), or unreadable: not ipcd's.
        return _replace(parent, path, taken)
    if _is_lock_file(os.fstat(fd)):
        return fd
    # A directory, a FIFO (opened without waiting), another's file: not ipcd's.
    os.close(fd)
    return _replace(parent, path, taken)


def _is_lock_file(st: os.stat_result) -> bool:
    """
    Whether C{st} is a lock file as ipcd makes them: a regular file of
    ipcd's user that only it may open, under this one name only (a hard
    link in its place may be any file of that user's, /etc/shadow for root).
    """
    return stat.S_ISREG(st.st_mode) and mine_alone(st) and st.st_nlink == 1


def _replace(parent: int, path: str, taken: list[Taken]) -> int:
    """
    Put a new lock file at the name in one step, taking out what is there
    (RUNDIR's owner may, sticky bit or not): the name is never free for
    another to take meanwhile.  Made in a private directory, so that no
    temporary name is left in RUNDIR if ipcd is killed meanwhile.
    """
    private, name = make_private(parent, path)
    try:
        fd = os.open("lock", _OPEN | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=private)
        try:
            os.fchmod(fd, 0o600)
            if _lock_file_there(parent):
                # Another ipcd replaced it meanwhile: its file is the lock.
                os.close(fd)
                return -1
            taken += take_name(parent, LOCK_NAME, private, "lock", path)
        except FileExistsError:
            os.close(fd)  # changed at every round: again, from the start
            return -1
        except BaseException:
            os.close(fd)
            raise
        finally:
            os.unlink("lock", dir_fd=private)
        return fd
    finally:
        remove_private(parent, name, private)


def _lock_file_there(parent: int) -> bool:
    """Whether the name holds a lock file as ipcd makes them, now."""
    try:
        st = os.stat(LOCK_NAME, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return _is_lock_file(st)


def holder_pid(st: os.stat_result) -> int | None:
    """
    The pid of the live process holding a C{flock} on the file C{st}
    describes, as the kernel tells in C{/proc/locks} (the pid that took
    it); C{None} if none is found, or it has exited since (a daemonizing
    twistd's parent: its child holds the lock on).  Nothing the holder
    wrote is read: the lock file stays empty and is never opened for
    writing.
    """
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as locks:
            for line in locks:
                # "1: FLOCK  ADVISORY  WRITE 4242 fe:00:2146393 0 EOF"; a
                # waiter's line has "->" after the number.
                fields = line.split()
                if fields[1:2] == ["FLOCK"] and fields[5:6] == [device]:
                    pid = int(fields[4])
                    return pid if pid > 0 and os.path.exists(f"/proc/{pid}") else None
    except (OSError, ValueError):
        pass
    return None


def lock_error(rundir: str, error: OSError) -> StartupError:
    """Taking the lock failed with C{error}: one line, with the way out."""
    path = os.path.join(rundir, LOCK_NAME)
    reason = os.strerror(error.errno).lower() if error.errno else str(error)
    return StartupError(
        f"cannot take ipcd's lock {path}: {reason} (make RUNDIR {rundir} "
        f"writable for ipcd, or use another --rundir)"
    )
