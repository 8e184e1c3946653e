"""
The socket directory, RUNDIR: where it is (L{resolve_rundir},
L{normal_rundir}) and the safety audit ipcd runs before creating anything in
it (L{prepare_rundir}, L{check_rundir}, L{ensure_rundir}): nobody but
ipcd's own user may remove or replace the sockets in it.

Service names and the sockets' paths in RUNDIR are L{ipcd.names}'.
"""

from __future__ import annotations

import errno
import os
import pwd
import stat
from collections import deque
from collections.abc import Mapping

DEFAULT_RUNDIR = "/tmp/libipc-run"
# The kernel's own bound on symbolic links followed in one path (MAXSYMLINKS).
_MAX_LINKS = 40
# The longest name of one directory entry (NAME_MAX).
_NAME_MAX = 255
# Sticky, rwx for owner and group: members may add services but not remove
# or replace anybody else's socket.
RUNDIR_MODE = 0o1770


class UnsafeRundir(ValueError):
    """
    RUNDIR is not safe to serve from: another user could remove or replace
    its sockets.  The message is one line naming the problem and the fix.
    """


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
    names = _components(path)
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
        # Parents writable by group or others would let them rename RUNDIR
        # away and put their own in its place: never made so, whatever the
        # umask (makedirs gives them 0777 less the umask).
        old = os.umask(0)
        try:
            os.umask(old | 0o022)
            os.makedirs(parent, exist_ok=True)
        finally:
            os.umask(old)
    try:
        os.mkdir(path, RUNDIR_MODE)
    except FileExistsError:
        if os.path.isdir(path):
            return  # created meanwhile by someone else: not ours to chmod
        # A file (or a link to one) is there: say what is wrong with it.
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", path) from None
    # mkdir's mode is filtered by the umask; say exactly what we mean, on the
    # directory just made (never through a symlink swapped in since).
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.fchmod(fd, RUNDIR_MODE)
    finally:
        os.close(fd)


def user_text(uid: int) -> str:
    """C{uid 1001 (mallory)}, or C{uid 1001} for a uid without an account."""
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
        nobody but a socket's owner (and RUNDIR's) can remove or replace it;
      - nobody else can replace it by way of its parents
        (L{check_ancestors}).

    Reads only metadata; creates and changes nothing.
    """
    euid = os.geteuid()
    me = user_text(euid)
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
                f"{user_text(link.st_uid)}, not by ipcd's user {me}"
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
            f"{where}: owned by {user_text(st.st_uid)}, not by ipcd's user {me}; "
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
    check_ancestors(rundir)


def check_ancestors(rundir: str, user: str = "ipcd's user") -> None:
    """
    Raise L{UnsafeRundir} if another user could rename RUNDIR (or a
    directory or symbolic link on the way to it) away and put their own in
    its place: each directory whose entry the path goes through, following
    symbolic links as the kernel does, must be owned by root or ipcd's user,
    and be writable by group or others only with the sticky bit and that
    entry owned by root or ipcd's user.  (ipcd's user is this process's
    effective user; C{user} is how the message names it.)
    """
    euid = os.geteuid()
    trusted = (0, euid)
    where = f"unsafe RUNDIR {rundir}"
    pending = deque(_components(rundir))
    current = "/"  # always a real directory's path, without symbolic links
    links = 0
    while pending:
        name = pending.popleft()
        if name == "..":
            current = os.path.dirname(current)
            continue
        entry = os.path.join(current, name)
        try:
            directory = os.stat(current)
            found: os.stat_result | None = os.lstat(entry)
        except FileNotFoundError:
            found = None  # made by ipcd, without write for group or others
        except OSError as e:
            if e.errno == errno.ENAMETOOLONG and len(os.fsencode(name)) > _NAME_MAX:
                return  # a name no directory holds: named when RUNDIR is made
            raise _cannot_inspect(where, entry, e) from None
        _check_parent(where, current, directory, entry, found, trusted, user)
        if found is None:
            return
        if stat.S_ISLNK(found.st_mode):
            links += 1
            if links > _MAX_LINKS:
                raise UnsafeRundir(f"{where}: too many symbolic links on the way")
            try:
                target = os.readlink(entry)
            except OSError as e:
                raise _cannot_inspect(where, entry, e) from None
            if target.startswith("/"):
                current = "/"
            pending.extendleft(reversed(_components(target)))
        elif not stat.S_ISDIR(found.st_mode):
            return  # named by check_rundir, or by ensure_rundir's failure
        else:
            current = entry


def check_asked_rundir(rundir: str) -> None:
    """
    Raise L{UnsafeRundir} unless the user asking the ipcd in C{rundir}
    (C{ipcd status}, C{ipcd reload}) can trust what serves there, from the
    asker's side: nobody but root or the asker could have put RUNDIR where
    it is, or can rename it away (L{check_ancestors}: a /tmp/libipc-run
    another user made before ipcd ever ran is refused there), and it is
    sticky if others may write to it.  Its owner is then the one root (or
    the asker) gave it to: ipcd's user, whose socket alone is asked
    (L{ipcd.control.request}), so that the members of C{[control] group}
    may ask an ipcd running as a user of its own.  A RUNDIR that is
    missing is left for the connection to say so.
    """
    try:
        st = os.stat(rundir)
    except FileNotFoundError:
        return
    check_ancestors(rundir, user="you")
    mode = stat.S_IMODE(st.st_mode)
    if mode & (stat.S_IWGRP | stat.S_IWOTH) and not mode & stat.S_ISVTX:
        raise UnsafeRundir(
            f"RUNDIR {rundir} (mode {mode:04o}) lets others replace its "
            f"sockets: not asked (chmod +t {rundir}, as ipcd requires)"
        )


def _cannot_inspect(where: str, entry: str, error: OSError) -> UnsafeRundir:
    # Unchecked is unsafe: a path too long to inspect by name (links
    # expanded past PATH_MAX) or a link gone meanwhile stops start-up too.
    return UnsafeRundir(
        f"{where}: cannot inspect {_printable(entry)}: {error.strerror}"
    )


def _components(path: str) -> list[str]:
    return [name for name in path.split("/") if name not in ("", ".")]


def _check_parent(
    where: str,
    parent: str,
    directory: os.stat_result,
    entry: str,
    found: os.stat_result | None,
    trusted: tuple[int, int],
    user: str,
) -> None:
    """One step of L{check_ancestors}: C{entry}, found in C{parent}."""
    shown = _printable(parent)
    if directory.st_uid not in trusted:
        raise UnsafeRundir(
            f"{where}: {shown} is owned by {user_text(directory.st_uid)}, who could "
            f"rename RUNDIR away and put their own in its place; choose a "
            f"--rundir whose parents only root or {user} own"
        )
    mode = stat.S_IMODE(directory.st_mode)
    who = "other users" if mode & stat.S_IWOTH else "group members"
    if not mode & (stat.S_IWGRP | stat.S_IWOTH):
        return
    if not mode & stat.S_ISVTX:
        raise UnsafeRundir(
            f"{where}: {shown} (mode {mode:04o}) lets {who} rename RUNDIR away "
            f"and put their own in its place; chmod +t {shown} (sticky bit), "
            f"or choose another --rundir"
        )
    if found is not None and found.st_uid not in trusted:
        raise UnsafeRundir(
            f"{where}: {_printable(entry)} is owned by {user_text(found.st_uid)}, "
            f"who could replace it in {shown}; choose another --rundir"
        )


def _printable(text: str) -> str:
    """C{text}, or its repr when it holds a newline or other control."""
    return text if text.isprintable() else repr(text)


def file_kind(mode: int) -> str:
    """What C{mode} (C{st_mode}) says a file is: C{"a regular file"}, ..."""
    for test, name in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symbolic link"),
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
        # Nothing is made under a parent another user could swap.
        check_ancestors(rundir)
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
