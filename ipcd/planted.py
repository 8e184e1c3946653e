"""
What a member of RUNDIR's group planted at a name ipcd needs, taken out of
the way: C{RUNDIR/.ipcd-lock}, C{ipc}, C{ipcd-control}, pongd's C{pong}
and each daemon's C{RUNDIR/SCHEME}.

In a group-writable RUNDIR (1770) a member may create any name that is
free: a directory, file, FIFO, symbolic link or socket (served or not) at
one of ipcd's names stopped ipcd's start, and under systemd's
C{RuntimeDirectory=} (a fresh RUNDIR at every start) a member could race
for that at each boot.  RUNDIR's owner may rename or remove any entry in
it, sticky bit or not, so ipcd takes its names back:

  - L{take_name} puts ipcd's file (a listening socket, the lock file) at
    the name in one step whatever is there: linked under an aside name in
    RUNDIR first, then swapped with the entry at the name by
    C{renameat2(RENAME_EXCHANGE)}.  The name is never free meanwhile, and
    both names stay in RUNDIR, so RUNDIR's owner may swap them even when
    the entry is another user's directory (moving that to another
    directory would need write permission on it: root's only);
  - what the swap took out is then at the aside name: a directory is left
    there (emptying it would mean walking another user's tree; an empty
    one is removed), anything else is unlinked (never opened nor followed:
    a symbolic link's target, a hard link's file are untouched);
  - nothing is followed, opened or read: every step is by name in the
    directory descriptor ipcd holds, checked with C{fstatat}
    (C{AT_SYMLINK_NOFOLLOW}); what is unlinked or kept is the entry the
    swap took out, or one its owner put at the aside name since.

ipcd's own live socket is no plant: another ipcd holds RUNDIR's lock (and
says so); a program of ipcd's user serving the name stops start-up
(L{ipcd.names.refuse_own_live}).  That program's socket has one name,
there; one of ipcd's user with more names (hard links) after a moment's
wait (a program placing its own has two for an instant) is a plant, taken
out as any other, listened on or not: where C{fs.protected_hardlinks} is
0, a member may link root's live /run/systemd/journal/stdout there.  Only
the name in RUNDIR goes: the socket, its listener and its other names are
untouched.

What repeated plants can make ipcd keep is bounded: nothing of its own (an
aside link of its socket lives between two system calls; one a killed ipcd
left is removed at the next start), and of the member's only directories
with something in them, their own inodes renamed, never copied: as many
as they could have made in RUNDIR themselves.  L{sweep_aside} removes
everything else at aside names at start and counts those, for one line.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ipcd.rundir import file_kind, user_text

ASIDE_PREFIX = ".ipcd-aside-"
# A round ends without the name only when it changed between the link and
# the swap (the member removed what was there, or put it back): the swap
# itself leaves no gap to race, so a few rounds do.
_ROUNDS = 16
_EXCHANGE = 2  # RENAME_EXCHANGE
# renameat2, once looked up: None where the C library or RUNDIR's file
# system has no RENAME_EXCHANGE (then moved aside and linked, L{take_name}).
_renameat2: Callable[..., int] | None = None
_looked_up = False

# The socket paths whose names ipcd, holding RUNDIR's instance lock in this
# process, takes whatever is there (L{claim}): nobody else may serve them,
# as nobody else may run ipcd in that RUNDIR.
_claimed: set[str] = set()


@dataclass(frozen=True)
class Taken:
    """What was at C{path} (C{kind} of C{uid}), and where it went."""

    path: str
    kind: str
    uid: int
    aside: str | None  # where a directory was left; None: removed
    # A file's names (hard links), this one with them: removing it left
    # the file itself, under its other names, untouched.
    names: int = 1

    def __str__(self) -> str:
        what = f"{self.kind} of {user_text(self.uid)}"
        if self.names > 1:
            what += f" with {self.names} names (hard links)"
            if self.aside is None:
                return (
                    f"{self.path} was {what}, not ipcd's: removed this name "
                    "(the others stay)"
                )
        if self.aside is None:
            return f"{self.path} was {what}, not ipcd's: removed it"
        return (
            f"{self.path} was {what}, not ipcd's: moved it to {self.aside} "
            f"(remove it: rm -r {self.aside})"
        )


def claim(paths: Iterable[str]) -> frozenset[str]:
    """ipcd holds RUNDIR's lock: its socket C{paths} are its to take."""
    taken = frozenset(paths)
    _claimed.update(taken)
    return taken


def unclaim(paths: Iterable[str]) -> None:
    """The lock is given up: the names are first come, first served again."""
    _claimed.difference_update(paths)


def claimed(path: str) -> bool:
    """Whether C{path} is one of the names ipcd took RUNDIR's lock for."""
    return path in _claimed


def take_name(
    parent: int, name: str, source_dir: int, source: str, path: str
) -> list[Taken]:
    """
    Put C{source} (a file of ipcd's in the private directory C{source_dir})
    at C{name} in RUNDIR (descriptor C{parent}) in one step, taking out
    whatever is there; C{source} stays where it is.  Returns what was taken
    out (nothing when the name was free, or held a socket of ipcd's user,
    left by an ipcd that died: replaced without a word).  C{path} is the
    name's path, for messages.
    """
    from ipcd.placing import still_at  # (it imports this module)

    mine = os.stat(source, dir_fd=source_dir, follow_symlinks=False)
    taken: list[Taken] = []
    for _ in range(_ROUNDS):
        try:
            _link(source_dir, source, parent, name)
            return taken
        except FileExistsError:
            pass
        aside = f"{ASIDE_PREFIX}{secrets.token_hex(8)}"
        try:
            _link(source_dir, source, parent, aside)
        except FileExistsError:
            continue  # a member's at that random name: another one
        try:
            swapped = exchange(parent, aside, name)
        except FileNotFoundError:
            swapped = False  # gone meanwhile: the link may do now
        finally:
            # ipcd's link at the aside name, unless the swap put it at name.
            if not still_at(parent, name, mine) and still_at(parent, aside, mine):
                os.unlink(aside, dir_fd=parent)
        if swapped:
            taken += _put_aside(parent, aside, path)
            return taken
        if _renameat2 is None:
            # No exchange on this file system: moved aside, then linked (a
            # member quick enough to plant again in between makes another
            # round).
            taken += take_out(parent, name, path, own_sockets=True)
    raise FileExistsError(
        errno.EEXIST, f"replaced {_ROUNDS} times while ipcd took it", path
    )


def take_out(
    parent: int, name: str, path: str, own_sockets: bool = False
) -> list[Taken]:
    """
    Take out what is at C{name} in RUNDIR (descriptor C{parent}): renamed
    to an aside name in one step, then dealt with there.  A socket of
    ipcd's user by its one name stays unless C{own_sockets}
    (L{ipcd.names} clears those).
    The name is free afterwards, for anyone quicker.
    """
    try:
        found = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return []
    if _own_socket(found) and not own_sockets:
        return []
    aside = f"{ASIDE_PREFIX}{secrets.token_hex(8)}"
    try:
        os.rename(name, aside, src_dir_fd=parent, dst_dir_fd=parent)
    except FileNotFoundError:
        return []
    return _put_aside(parent, aside, path)


def open_parent(path: str) -> tuple[int, str]:
    """
    A descriptor of C{path}'s directory (RUNDIR: a link to it is the
    admin's, and followed) and the name in it, to act on by name there.
    """
    directory, name = os.path.split(path)
    return os.open(directory or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), name


def take_out_path(path: str) -> list[Taken]:
    """L{take_out} by path (RUNDIR followed, the name not)."""
    try:
        parent, name = open_parent(path)
    except FileNotFoundError:
        return []
    try:
        return take_out(parent, name, path)
    finally:
        os.close(parent)


def exchange(parent: int, first: str, second: str) -> bool:
    """
    Swap the entries C{first} and C{second} of directory C{parent} in one
    step (C{renameat2(RENAME_EXCHANGE)}); False when the C library or the
    file system cannot.  Raises FileNotFoundError when either is missing.
    """
    global _renameat2
    call = _exchange()
    if call is None:
        return False
    if call(parent, os.fsencode(first), parent, os.fsencode(second), _EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        _renameat2 = None  # not here: the renames from now on
        return False
    raise OSError(code, os.strerror(code), second)


def _exchange() -> Callable[..., int] | None:
    global _renameat2, _looked_up
    if not _looked_up:
        try:
            call = ctypes.CDLL(None, use_errno=True).renameat2
        except AttributeError:
            call = None
        else:
            call.argtypes = [
                ctypes.c_int,
                ctypes.c_char_p,
                ctypes.c_int,
                ctypes.c_char_p,
                ctypes.c_uint,
            ]
            call.restype = ctypes.c_int
        _renameat2, _looked_up = call, True
    return _renameat2


def _put_aside(parent: int, aside: str, path: str) -> list[Taken]:
    """
    Deal with what was taken out of C{path}, now at C{aside}: a directory
    with something in it stays, anything else is removed.
    """
    try:
        st = os.stat(aside, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return []  # its owner removed it meanwhile
    kept: str | None = os.path.join(os.path.dirname(path), aside)
    try:
        if stat.S_ISDIR(st.st_mode):
            os.rmdir(aside, dir_fd=parent)
        else:
            os.unlink(aside, dir_fd=parent)
        kept = None
    except FileNotFoundError:
        kept = None
    except OSError:
        pass  # not empty (or its owner put a directory there meanwhile)
    if _own_socket(st):
        return []  # ipcd's user's socket, its listener gone
    # A directory's link count is its subdirectories', not its names.
    names = 1 if stat.S_ISDIR(st.st_mode) else st.st_nlink
    return [Taken(path, file_kind(st.st_mode), st.st_uid, kept, names)]


def sweep_aside(directory: str) -> int:
    """
    At start: remove what is at aside names in RUNDIR but the directories
    with something in them (the rest is a killed ipcd's litter, or a
    member's at ipcd's names); returns how many of those stay.
    """
    parent = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    kept = 0
    try:
        with os.scandir(parent) as entries:
            for entry in entries:
                if entry.name.startswith(ASIDE_PREFIX):
                    path = os.path.join(directory, entry.name)
                    for taken in _put_aside(parent, entry.name, path):
                        kept += taken.aside is not None
    finally:
        os.close(parent)
    return kept


def _own_socket(st: os.stat_result) -> bool:
    """
    Whether C{st} is a socket of ipcd's user by its one name: a dead
    ipcd's, replaced without a word (a live one's stops start-up first,
    L{ipcd.names.refuse_own_live}).  One with other names is a plant: a
    member's hard link to, say, root's /run/systemd/journal/stdout.
    """
    return stat.S_ISSOCK(st.st_mode) and st.st_uid == os.geteuid() and st.st_nlink == 1


def _link(source_dir: int, source: str, parent: int, name: str) -> None:
    os.link(
        source, name, src_dir_fd=source_dir, dst_dir_fd=parent, follow_symlinks=False
    )
