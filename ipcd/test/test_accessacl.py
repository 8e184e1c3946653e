"""
L{ipcd.access}'s POSIX ACLs at their edges: the kernel's rule where an ACL
has no mask entry or an empty one, root, an attribute the kernel would not
take, an ACL that cannot be read, and the ACLs kept (read once, bounded).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import sys
import time
from collections.abc import Callable

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from ipcd import access
from ipcd.access import SEARCH, WRITE, Credentials, acl_permits, may, open_socket
from ipcd.test.support import (
    ACL_GROUP_OBJ,
    ACL_MASK,
    ACL_OTHER,
    ACL_USER,
    ACL_USER_OBJ,
    calls_to,
    needs_root,
    set_acl,
    short_rundir,
)

ALICE = Credentials(61001, 61001)
BOB = Credentials(61002, 61002)
ROOT = Credentials(0, 0)


def _stat(mode: int, uid: int = 1, gid: int = 1) -> os.stat_result:
    return os.stat_result((mode, 0, 0, 1, uid, gid, 0, 0, 0, 0))


def in_child(who: Credentials, job: Callable[[], bool]) -> bool:
    """
    What C{job} answers in a child process running as C{who} (uid, gid and
    groups), as the kernel checks it; waited for at most 60 s.
    """
    pid = os.fork()
    if pid == 0:  # the child: only system calls, then _exit
        code = 2
        try:
            os.setgroups(sorted(who.groups))
            os.setresgid(who.gid, who.gid, who.gid)
            os.setresuid(who.uid, who.uid, who.uid)
            code = 0 if job() else 1
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError("the child did not end within 60 s")
        time.sleep(0.01)
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 1):
        raise AssertionError(f"the child failed: exit code {code}")
    return code == 0


def connects(path: str) -> Callable[[], bool]:
    """A job for L{in_child}: whether its own connect() to C{path} works."""

    def job() -> bool:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except PermissionError:
            return False
        finally:
            sock.close()
        return True

    return job


def _raw_acl(version: int, entries: list[tuple[int, int, int]]) -> bytes:
    return struct.pack("<I", version) + b"".join(
        struct.pack("<HHI", *entry) for entry in entries
    )


class AclRuleTests(SynchronousTestCase):
    """The kernel's posix_acl_permission where entries are missing."""

    def test_noMaskEntryMasksNothing(self) -> None:
        """
        Without a mask entry a named user's entry counts whole (the kernel
        looks for a mask after it and, finding none, checks the entry).
        """
        st = _stat(0o660, uid=1, gid=5)
        acl = ((ACL_USER_OBJ, 6, 0), (ACL_USER, 1, 2), (ACL_USER, 7, 3))
        acl += ((ACL_GROUP_OBJ, 6, 0), (ACL_OTHER, 0, 0))
        self.assertTrue(acl_permits(acl, st, Credentials(2, 9), SEARCH))
        self.assertFalse(acl_permits(acl, st, Credentials(2, 9), WRITE))
        self.assertTrue(acl_permits(acl, st, Credentials(3, 9), WRITE | SEARCH))

    def test_ownerEntry(self) -> None:
        """The owner gets the owner entry: what it has, no more."""
        st = _stat(0o660, uid=1, gid=5)
        acl = ((ACL_USER_OBJ, 6, 0), (ACL_GROUP_OBJ, 6, 0), (ACL_OTHER, 0, 0))
        self.assertTrue(acl_permits(acl, st, Credentials(1, 9), WRITE))
        self.assertFalse(acl_permits(acl, st, Credentials(1, 9), WRITE | SEARCH))
        acl = ((ACL_USER_OBJ, 4, 0), (ACL_GROUP_OBJ, 6, 0), (ACL_OTHER, 6, 0))
        self.assertFalse(acl_permits(acl, st, Credentials(1, 9), WRITE))


class ParseAclTests(SynchronousTestCase):
    """An ACL attribute the kernel would not take matches nobody."""

    def test_entries(self) -> None:
        entries = [(ACL_USER_OBJ, 6, 0), (ACL_USER, 2, 61001), (ACL_OTHER, 0, 0)]
        self.assertEqual(access._parse_acl(_raw_acl(2, entries)), tuple(entries))
        self.assertEqual(access._parse_acl(_raw_acl(2, [])), ())

    def test_malformed(self) -> None:
        entries = [(ACL_USER_OBJ, 6, 0), (ACL_OTHER, 6, 0)]
        for raw in (
            b"",
            b"\x02\x00",  # shorter than the version
            _raw_acl(2, entries) + b"\x00",  # a piece of an entry
            _raw_acl(2, entries)[:-4],
            _raw_acl(1, entries),  # a version the kernel does not write
            _raw_acl(3, entries),
        ):
            self.assertEqual(access._parse_acl(raw), (), raw)


class FileTests(SynchronousTestCase):
    """ACLs on real files, with the kernel's own answer beside ipcd's."""

    def setUp(self) -> None:
        needs_root()
        self.dir = short_rundir(self, "ipcd-acl-")
        os.chmod(self.dir, 0o755)

    def socket_at(self, directory: str, mode: int = 0o666) -> str:
        path = os.path.join(directory, "s")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.bind(path)
        sock.listen()
        os.chmod(path, mode)
        return path

    def reaches(self, path: str, who: Credentials) -> bool:
        try:
            open_socket(path, who).close()
        except access.AccessDenied:
            return False
        return True

    def test_emptyMaskLeavesTheAclOut(self) -> None:
        """
        A directory whose ACL mask is empty (group bits 0): the kernel does
        not read the ACL, so Alice's own entry refusing her does not count
        and the others' search bit lets her through.
        """
        inner = os.path.join(self.dir, "d")
        os.mkdir(inner)
        path = self.socket_at(inner)
        set_acl(
            inner,
            [
                (ACL_USER_OBJ, 7, 0),
                (ACL_USER, 0, ALICE.uid),
                (ACL_GROUP_OBJ, 0, 0),
                (ACL_MASK, 0, 0),
                (ACL_OTHER, 1, 0),
            ],
        )
        self.assertEqual(os.stat(inner).st_mode & 0o777, 0o701)
        self.assertTrue(in_child(ALICE, connects(path)))
        self.assertTrue(self.reaches(path, ALICE))
        # With a mask, her entry counts (the kernel's answer too).
        os.chmod(inner, 0o711)
        self.assertFalse(in_child(ALICE, connects(path)))
        self.assertFalse(self.reaches(path, ALICE))

    def test_rootPassesAnAclNamingIt(self) -> None:
        """
        Root passes an ACL whose entry for uid 0 gives nothing, as the
        kernel lets it (CAP_DAC_OVERRIDE); Alice, named alike, does not.
        """
        path = self.socket_at(self.dir, 0o660)
        os.chown(path, BOB.uid, BOB.gid)
        owner, group = (ACL_USER_OBJ, 6, 0), (ACL_GROUP_OBJ, 6, 0)
        mask, others = (ACL_MASK, 6, 0), (ACL_OTHER, 0, 0)
        set_acl(
            path,
            [owner, (ACL_USER, 0, 0), (ACL_USER, 0, ALICE.uid), group, mask, others],
        )
        self.assertTrue(in_child(ROOT, connects(path)))
        self.assertTrue(self.reaches(path, ROOT))
        self.assertFalse(self.reaches(path, ALICE))

    def test_unreadableAclRefuses(self) -> None:
        """
        An ACL that cannot be read (an I/O error, injected: no filesystem
        here fails so on demand) is an error, not "no ACL": the mode bits,
        which an ACL may narrow, do not decide.
        """
        path = self.socket_at(self.dir)

        def failing(*args: object, **kwargs: object) -> bytes:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        self.patch(os, "getxattr", failing)
        error = self.assertRaises(OSError, open_socket, path, ALICE)
        self.assertEqual(error.errno, errno.EIO)


class KeptAclTests(SynchronousTestCase):
    """
    An ACL (or its absence) is kept by (device, inode, ctime) once the
    ctime is settled: read once, and at most 1,024 kept.
    """

    def setUp(self) -> None:
        self.kept: dict[tuple[int, int, int], object] = {}
        self.patch(access, "_acls", self.kept)
        # A file long unchanged, with group bits (so its ACL is read for
        # a user who does not own it).
        for path in (sys.executable, os.__file__, "/usr", "/"):
            st = os.stat(path)
            if st.st_mode & 0o070 and st.st_uid != ALICE.uid:
                if time.time_ns() - st.st_ctime_ns > 10 * 10**9:
                    break
        else:
            raise SkipTest("no file here unchanged for 10 s")
        self.fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        self.addCleanup(os.close, self.fd)
        self.st = os.fstat(self.fd)
        self.key = (self.st.st_dev, self.st.st_ino, self.st.st_ctime_ns)

    def test_readOnce(self) -> None:
        reads = calls_to(self, os, "getxattr", lambda *args, **kwargs: args[0])
        first = may(self.fd, self.st, ALICE, SEARCH)
        self.assertEqual(may(self.fd, self.st, ALICE, SEARCH), first)
        self.assertEqual(len(reads), 1)
        self.assertIn(self.key, self.kept)

    def test_bounded(self) -> None:
        """With 1,024 kept, all are forgotten before the next is kept."""
        self.kept.update({(-1, n, 0): None for n in range(1023)})
        may(self.fd, self.st, ALICE, SEARCH)
        self.assertEqual(len(self.kept), 1024)
        self.assertIn(self.key, self.kept)
        del self.kept[self.key]
        self.kept[-1, -1, 0] = None
        may(self.fd, self.st, ALICE, SEARCH)
        self.assertEqual(list(self.kept), [self.key])
