"""
Access as the client would have it: ipcd is nobody's deputy.

A local client may reach through a lookup only a socket it could connect to
itself.  L{open_socket} walks a path one component at a time, as the kernel
would for the client: search permission on every directory, write permission
on the socket, symbolic links followed (at most 40) and checked on the way;
only links of root or ipcd's user (the connection ipcd makes carries its own
credentials, and a link a user made could lend them to any socket that user
may reach), also on a walk without a permission check.
It returns an C{O_PATH} descriptor of the very inode it checked, and
L{connect_path} is that inode's address (C{/proc/self/fd/N}), so a path
swapped after the check cannot send the connection elsewhere.

A file's POSIX access ACL, when it has one, decides as the kernel's does
(L{acl_permits}): an ACL can refuse a user or group that the mode bits let
in, so it cannot be left out.  Kernel rules not modelled: capabilities
other than root's, and LSMs.  They can only make the kernel more generous
than this check, never less, so the check fails closed.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import time
from collections import deque
from dataclasses import dataclass

from ipcd.errors import REFUSED, Refused

# The kernel's own bound on symbolic links in one path walk (ELOOP).
MAX_SYMLINKS = 40

SEARCH = 0o1
WRITE = 0o2

_OPEN_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class Credentials:
    """What the kernel checks a process by: its uid, gid and groups."""

    uid: int
    gid: int
    groups: frozenset[int] = frozenset()

    def __str__(self) -> str:
        return f"uid {self.uid}"


class _Others(Credentials):
    """Nobody's uid and no group: only the bits for others apply."""

    def __str__(self) -> str:
        return "others"


# A remote peer (any listener, loopback included), for a socket's
# permissions: ids no file has (stat's are unsigned), so never its owner or
# in its group.
OTHERS: Credentials = _Others(-1, -1)


# Whose walk meets a symbolic link that is not root's or ipcd's, as its
# refusal says: each follows only theirs (L{open_socket}'s C{asking}).
CLIENT = "a client's lookup"  # as the client, its own permissions
GRANT = "a grant"  # the admin's grant, without a permission check
REMOTE = "a remote peer's request"  # the inbound path (any listener)


class AccessDenied(Refused):
    """
    The client could not connect to this socket itself; C{at_socket}: for
    the socket's own permission, past every directory on the way (False: a
    directory it may not search, and what lies past it is not for it to
    learn).
    """

    public = REFUSED
    at_socket = False


def permitted(st: os.stat_result, who: Credentials, want: int) -> bool:
    """
    Whether C{who} has the C{want} bits (L{SEARCH}, L{WRITE}) on a file of
    mode, owner and group C{st}: owner bits for its owner, group bits for a
    member of its group, other bits for the rest; root passes (it would for
    directories and sockets).
    """
    if who.uid == 0:
        return True
    mode = st.st_mode
    if st.st_uid == who.uid:
        bits = mode >> 6
    elif st.st_gid == who.gid or st.st_gid in who.groups:
        bits = mode >> 3
    else:
        bits = mode
    return bits & want == want


# POSIX ACLs as the kernel keeps them in an extended attribute: a version,
# then entries of (tag, permissions, id), sorted by tag and id.
_ACL_XATTR = "system.posix_acl_access"
_ACL_VERSION = struct.Struct("<I")
_ACL_ENTRY = struct.Struct("<HHI")
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 1, 2, 4, 8, 16, 32
Acl = tuple[tuple[int, int, int], ...]
# A file's ACL (or None) by (device, inode, ctime): any change to an ACL or
# mode changes the ctime.  Only kept for a ctime older than this many
# nanoseconds, so that two changes within one step of the file's ctime
# cannot share one: a tick of the kernel's coarse clock, or a whole second
# where the filesystem keeps no more (ext4 with 128-byte inodes, ext2/3;
# the VFS allows no coarser); at most this many, then all are forgotten.
_ACL_SETTLED = 2_000_000_000
_MAX_ACLS = 1024
_acls: dict[tuple[int, int, int], Acl | None] = {}
_UNREAD: Acl = ((-1, -1, -1),)  # (not in _acls: not read yet)


def _read_acl(fd: int, st: os.stat_result) -> Acl | None:
    """The access ACL of the file C{fd} (stat C{st}); C{None}: it has none."""
    try:
        raw = os.getxattr(f"/proc/self/fd/{fd}", _ACL_XATTR)
    except OSError as e:
        if e.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
            raise
        acl = None
    else:
        acl = _parse_acl(raw)
    if time.time_ns() - st.st_ctime_ns > _ACL_SETTLED:
        if len(_acls) >= _MAX_ACLS:
            _acls.clear()
        _acls[st.st_dev, st.st_ino, st.st_ctime_ns] = acl
    return acl


def _parse_acl(raw: bytes) -> Acl:
    """The entries of an ACL attribute; one the kernel would not take, none."""
    count, extra = divmod(len(raw) - _ACL_VERSION.size, _ACL_ENTRY.size)
    if count < 0 or extra or _ACL_VERSION.unpack_from(raw)[0] != 2:
        return ()  # (nothing matches: refused, as the kernel says EIO)
    return tuple(_ACL_ENTRY.iter_unpack(raw[_ACL_VERSION.size :]))


def acl_permits(acl: Acl, st: os.stat_result, who: Credentials, want: int) -> bool:
    """
    Whether C{who} has the C{want} bits by C{acl}, the access ACL of a file
    of owner and group C{st}: the kernel's C{posix_acl_permission}.  The
    owner gets the owner entry; a named user its entry within the mask; a
    member of the file's group or of named groups whatever one of those
    entries gives within the mask (and nothing if none does); others the
    other entry.
    """
    groups = who.groups | {who.gid}
    mask = 7
    for tag, perm, _id in acl:
        if tag == _MASK:
            mask = perm
    matched_group = False
    for tag, perm, id_ in acl:
        if tag == _USER_OBJ:
            if st.st_uid == who.uid:
                return perm & want == want
        elif tag == _USER:
            if id_ == who.uid:
                return perm & mask & want == want
        elif tag == _GROUP_OBJ or tag == _GROUP:
            if (st.st_gid if tag == _GROUP_OBJ else id_) in groups:
                if perm & mask & want == want:
                    return True
                matched_group = True
        elif tag == _OTHER:
            return not matched_group and perm & want == want
        elif tag != _MASK:
            return False
    return False


def may(fd: int, st: os.stat_result, who: Credentials, want: int) -> bool:
    """
    L{permitted}, by the file's ACL when it has one: whether C{who} has the
    C{want} bits on the file C{fd} (an C{O_PATH} descriptor), of stat C{st}.
    """
    uid = who.uid
    if uid == 0:
        return True
    # As the kernel: the owner gets the owner bits, and an ACL is not read
    # when the mode's group bits (its mask) are empty.  A remote peer is
    # others, and an ACL's other entry is the mode's.
    if uid < 0 or st.st_uid == uid or not st.st_mode & 0o070:
        return permitted(st, who, want)
    acl = _acls.get((st.st_dev, st.st_ino, st.st_ctime_ns), _UNREAD)
    if acl is _UNREAD:
        acl = _read_acl(fd, st)
    if acl is None:
        return permitted(st, who, want)
    return acl_permits(acl, st, who, want)


class OpenedSocket:
    """An C{O_PATH} descriptor of a checked socket inode; close it after use."""

    def __init__(
        self, fd: int, st: os.stat_result, via_symlink: bool, checked: bool = True
    ) -> None:
        self.fd = fd
        self.stat = st
        self.via_symlink = via_symlink
        # False: opened without a permission check (the admin's word: a
        # grant, a remote peer's exact rule), for L{one_name}.
        self.checked = checked

    @property
    def inode(self) -> tuple[int, int]:
        return self.stat.st_dev, self.stat.st_ino

    def connect_path(self) -> str:
        """The address of exactly this inode, for C{connect()}."""
        return f"/proc/self/fd/{self.fd}"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_socket(
    path: str,
    who: Credentials | None,
    *,
    follow_last_symlink: bool = True,
    asking: str = CLIENT,
) -> OpenedSocket:
    """
    Open the socket at absolute C{path} as C{who} could (C{None}: no
    permission check, for the admin's own grants and remote peers; links
    are still only root's or ipcd's user's).  With
    C{follow_last_symlink} false, a symbolic link as the last component is
    refused: only the directories above it are the admin's.  C{asking}
    (L{CLIENT}, L{GRANT}, L{REMOTE}) is whose walk it is, for the refusal
    of a user's link.

    Raises L{AccessDenied} when C{who} could not connect itself,
    C{FileNotFoundError} when a component is missing, and L{Refused} for
    anything else that is not a socket one may connect to.
    """
    if not path.startswith("/"):
        raise Refused(f"{path} is not an absolute path")
    parts = deque(path.split("/"))
    fd = os.open("/", _OPEN_FLAGS | os.O_DIRECTORY)
    try:
        st = os.fstat(fd)
        links = 0
        via_symlink = False
        while parts:
            name = parts.popleft()
            # A trailing "/" or "." needs a directory too (ENOTDIR).
            if not stat.S_ISDIR(st.st_mode):
                raise Refused(f"{path}: a component is not a directory")
            if not name:
                continue
            # "." is looked up too: the kernel wants search permission for it.
            if who is not None and not may(fd, st, who, SEARCH):
                raise _denied(who, path)
            child = os.open(name, _OPEN_FLAGS, dir_fd=fd)
            child_st = os.fstat(child)
            if stat.S_ISLNK(child_st.st_mode):
                try:
                    last = not any(p not in ("", ".") for p in parts)
                    if last and not follow_last_symlink:
                        raise Refused(
                            f"{path} is a symbolic link; only the socket itself "
                            "may be reached this way",
                            public=REFUSED,
                        )
                    # Whoever asks (a grant's or a remote peer's exact
                    # walk too: the admin's word is for the path as the
                    # admin's, and a user who owns a directory on it could
                    # swap in a link to root's).
                    if not _trusted_link(child_st):
                        raise _untrusted_link(path, child_st, asking)
                    links += 1
                    if links > MAX_SYMLINKS:
                        raise Refused(f"{path}: too many levels of symbolic links")
                    # The link this descriptor holds, not whatever is there now.
                    target = os.readlink("", dir_fd=child)
                finally:
                    os.close(child)
                via_symlink = True
                parts.extendleft(reversed(target.split("/")))
                if target.startswith("/"):
                    os.close(fd)
                    fd = -1
                    fd = os.open("/", _OPEN_FLAGS | os.O_DIRECTORY)
                    st = os.fstat(fd)
                continue
            os.close(fd)
            fd, st = child, child_st
        opened = _socket_at(path, fd, st, who, via_symlink)
        fd = -1
        return opened
    finally:
        if fd >= 0:
            os.close(fd)


def _socket_at(
    path: str, fd: int, st: os.stat_result, who: Credentials | None, via_symlink: bool
) -> OpenedSocket:
    """The walk's end, C{fd}: a socket C{who} may write to, or refused."""
    if not stat.S_ISSOCK(st.st_mode):
        raise Refused(f"{path} is not a socket")
    if who is not None and not may(fd, st, who, WRITE):
        raise _denied(who, path, at_socket=True)
    if who is not None and st.st_nlink > 1 and st.st_uid != who.uid:
        # A hard link, like a user's symbolic link, could lend ipcd's
        # identity to a socket elsewhere (a user may make one where
        # fs.protected_hardlinks is 0): another's socket has one name.
        raise several_names(path, st)
    return OpenedSocket(fd, st, via_symlink, checked=who is not None)


def one_name(opened: OpenedSocket, path: str) -> OpenedSocket:
    """
    C{opened}, unless it was opened without a permission check (by a
    grant, or a remote peer's exact rule) and its socket has more than one
    name: then closed and refused.  The admin's word is for the service at
    C{path}, not for another socket a member hard-linked there first; every
    socket is another's when there is no client to own it.
    """
    if not opened.checked and opened.stat.st_nlink > 1:
        opened.close()
        raise several_names(path, opened.stat)
    return opened


def several_names(path: str, st: os.stat_result) -> Refused:
    """The refusal of socket C{path} (stat C{st}) for its other names."""
    return Refused(
        f"{path}: a socket of uid {st.st_uid} with {st.st_nlink} names (hard "
        "links); a lookup reaches another user's socket only by its one name",
        public=REFUSED,
    )


def _trusted_link(st: os.stat_result) -> bool:
    """
    Whether a client's walk follows the symbolic link C{st}: root's or
    ipcd's, by its one name (a user may hard-link root's link into a
    directory of theirs where fs.protected_hardlinks is 0).
    """
    return st.st_uid in (0, os.geteuid()) and st.st_nlink == 1


def _untrusted_link(path: str, st: os.stat_result, asking: str) -> Refused:
    # ipcd connects as itself (root), and the service sees that: a link
    # that a user made could lend ipcd's identity to any socket the user
    # may reach (the D-Bus system bus trusts uid 0 by SO_PEERCRED).
    names = one = ""
    if st.st_nlink > 1:
        names, one = f" with {st.st_nlink} names (hard links)", ", by their one name"
    return Refused(
        f"{path}: a symbolic link of uid {st.st_uid}{names} on the way; "
        f"{asking} follows only root's (or ipcd's) links{one}",
        public=REFUSED,
    )


def _denied(who: Credentials, path: str, at_socket: bool = False) -> AccessDenied:
    # The same answer for a directory and the socket: no more is told than
    # the client's own connect() would tell it.
    denied = AccessDenied(f"permission denied: {who} may not connect to {path}")
    denied.at_socket = at_socket
    return denied


# Seconds before a directory that could not be held is tried again.
_RETRY = 1.0


class HeldDirectories:
    """
    L{open_socket} for a client or a remote peer, without opening every
    directory above the socket on every request: the directories from C{/}
    down to C{directory} (RUNDIR) are held open (C{O_PATH}), and each
    request for a socket in C{directory} re-checks every step of the walk
    from them: one C{fstatat} per directory instead of an open, a C{fstat}
    and a close.

    Each step is checked as L{open_socket} checks it, at the moment of the
    request: the name in the directory above still leads to the very inode
    held (a directory renamed, replaced or mounted over does not), and that
    inode's mode, owner and group, as they are now, let the client search
    it (a remote peer's request named exactly needs no permission).
    Anything else (a name gone or leading to another inode, a symbolic link
    or C{.} or C{..} on the way, a socket elsewhere) goes the uncached way,
    and a chain that no longer holds is let go (and taken again at the next
    request).  L{close} lets every directory go.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._root = -1
        # ((name, fd, device, inode), ...) from "/" down to the directory.
        self._chain: tuple[tuple[str, int, int, int], ...] | None = None
        self._failed_at: float | None = None
        self._directory_stat: os.stat_result | None = None

    @property
    def held(self) -> bool:
        return self._chain is not None

    def hold(self) -> bool:
        """Open the directories now, if the path allows; whether it did."""
        if self._chain is not None:
            return True
        # A path that cannot be held (a link on the way, say) is tried again
        # at most once a second, not on every lookup.
        now = time.monotonic()
        if self._failed_at is not None and now - self._failed_at < _RETRY:
            return False
        self._failed_at = now
        names = self.directory.split("/")
        if names[0] != "" or any(name in ("", ".", "..") for name in names[1:]):
            return False
        chain: list[tuple[str, int, int, int]] = []
        root = os.open("/", _OPEN_FLAGS | os.O_DIRECTORY)
        parent = root
        try:
            for name in names[1:]:
                fd = os.open(name, _OPEN_FLAGS, dir_fd=parent)
                chain.append((name, fd, -1, -1))
                st = os.fstat(fd)
                if not stat.S_ISDIR(st.st_mode):  # a link, or no directory
                    raise NotADirectoryError
                chain[-1] = (name, fd, st.st_dev, st.st_ino)
                parent = fd
        except OSError:
            for _name, fd, _dev, _ino in chain:
                os.close(fd)
            os.close(root)
            return False
        self._root = root
        self._chain = tuple(chain)
        self._failed_at = None
        return True

    def take_directory_stat(self) -> os.stat_result | None:
        """
        The directory's stat as the last L{open_socket} call took it on its
        walk, if it opened a socket that way (else C{None}); given once.
        """
        st, self._directory_stat = self._directory_stat, None
        return st

    def close(self) -> None:
        """Close every held directory."""
        for _name, fd, _dev, _ino in self._chain or ():
            os.close(fd)
        self._chain = None
        if self._root >= 0:
            os.close(self._root)
            self._root = -1

    def open_socket(
        self,
        path: str,
        who: Credentials | None,
        *,
        follow_last_symlink: bool = True,
        asking: str = CLIENT,
    ) -> OpenedSocket:
        """
        L{open_socket}C{(path, who, follow_last_symlink=..., asking=...)},
        with the same answer (C{who} C{None}: no permission check, a remote
        peer's).
        """
        self._directory_stat = None
        head, _, last = path.rpartition("/")
        if head != self.directory or last in ("", ".", "..") or not self.hold():
            return open_socket(
                path, who, follow_last_symlink=follow_last_symlink, asking=asking
            )
        parent = self._root
        st = os.fstat(parent)
        for name, fd, dev, ino in self._chain:  # type: ignore[union-attr]
            if who is not None and not may(parent, st, who, SEARCH):
                raise _denied(who, path)
            try:
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            except OSError:
                self.close()
                return open_socket(
                    path, who, follow_last_symlink=follow_last_symlink, asking=asking
                )
            if st.st_ino != ino or st.st_dev != dev:
                self.close()
                return open_socket(
                    path, who, follow_last_symlink=follow_last_symlink, asking=asking
                )
            parent = fd
        if who is not None and not may(parent, st, who, SEARCH):
            raise _denied(who, path)
        directory_stat = st
        child = os.open(last, _OPEN_FLAGS, dir_fd=parent)
        try:
            st = os.fstat(child)
            if not (stat.S_ISLNK(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                opened = _socket_at(path, child, st, who, False)
                self._directory_stat = directory_stat
                return opened
        except BaseException:
            os.close(child)
            raise
        # A link is followed (or refused), a directory walked into, the
        # uncached way.
        os.close(child)
        return open_socket(
            path, who, follow_last_symlink=follow_last_symlink, asking=asking
        )
