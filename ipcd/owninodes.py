"""
The inodes of daemons' sockets in RUNDIR, without a stat per name per lookup.

ipcd refuses to connect a lookup to a daemon's socket, under any name: a
daemon may trust whoever connects as ipcd.  The sockets of daemons that
ipcd does not run itself (external ones, registered ones not enabled) come
and go on their own, so their inodes were looked up on every lookup.

A name in a directory is bound to another inode only by a change to the
directory's entries (bind, create, unlink, rename), and each of those
updates the directory's modification time.  So L{RundirInodes} looks the
names up again only when RUNDIR's (device, inode, modification time) is
not the one they were looked up under: one C{stat} of RUNDIR per lookup,
not one per name.  Two cases are never cached, and are looked up every time
as before: a name that is a symbolic link (its target may change without
RUNDIR changing), and a RUNDIR changed within the last C{settled} seconds
(a change in the same step of the file system's clock could leave the time
as it was: a tick of the kernel's coarse clock, or a whole second where the
filesystem keeps no more, ext4 with 128-byte inodes; the coarse clock runs
up to a tick behind, so 2 s, as for ACLs in L{ipcd.access}).
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Set
from typing import Any

from ipcd.names import InvalidServiceName, socket_path

Inode = tuple[int, int]


class RundirInodes:
    """
    C{(device, inode)} of the sockets C{names} in C{rundir}, plus a C{base}
    set, as they are now; cached while RUNDIR is unchanged.
    """

    def __init__(
        self, settled: float = 2.0, now_ns: Callable[[], int] = time.time_ns
    ) -> None:
        self.settled_ns = int(settled * 1e9)
        self._now_ns = now_ns
        self._key: Any = None
        self._inodes: set[Inode] = set()

    def clear(self) -> None:
        """Forget: the next call looks every name up."""
        self._key = None

    def __call__(
        self,
        rundir: str,
        names: Set[str],
        base: set[Inode],
        rundir_stat: os.stat_result | None = None,
    ) -> set[Inode]:
        """
        The inodes; C{rundir_stat}, when given, is RUNDIR's as it was just
        taken for this lookup (by L{ipcd.access.HeldDirectories}), which
        saves taking it again.
        """
        before = _stamp(rundir) if rundir_stat is None else _stamp_of(rundir_stat)
        # The sets are compared by identity: a new configuration (or set of
        # listening sockets) is a new set, and looks the names up again.
        key = (before, rundir, id(names), id(base))
        if before is not None and key == self._key:
            return self._inodes
        inodes = set(base)
        cacheable = before is not None
        for name in names:
            try:
                path = socket_path(rundir, name)  # never a path out of RUNDIR
                st = os.lstat(path)
                if stat.S_ISLNK(st.st_mode):
                    cacheable = False
                    st = os.stat(path)
            except (OSError, InvalidServiceName):
                continue
            inodes.add((st.st_dev, st.st_ino))
        if (
            cacheable
            and _stamp(rundir) == before
            and self._now_ns() - before[2] >= self.settled_ns  # type: ignore[index]
        ):
            self._key = key
            self._inodes = inodes
            # Keep the sets alive while their ids are in the key.
            self._held = (names, base)
        else:
            self._key = None
        return inodes


def _stamp(rundir: str) -> tuple[int, int, int] | None:
    try:
        return _stamp_of(os.stat(rundir))
    except OSError:
        return None


def _stamp_of(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_dev, st.st_ino, st.st_mtime_ns
