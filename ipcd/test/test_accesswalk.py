"""
The client access walk where a slip would give a client more than its own
connect() would, or cost ipcd a descriptor: trailing slashes, RUNDIR paths
that cannot be held, a held directory gone or mounted over, and closing
twice.  Each case is checked against L{open_socket}, L{HeldDirectories} and,
where it answers, the kernel's own connect().
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from ipcd import access
from ipcd.access import (
    AccessDenied,
    Credentials,
    HeldDirectories,
    OpenedSocket,
    open_socket,
)
from ipcd.errors import Refused
from ipcd.test.support import needs_root
from ipcd.test.test_helddirs import ALICE, HeldDirectoriesCase, _fds
from ipcd.test.test_names import short_tempdir


def _kernel_connect(path: str) -> int:
    """The errno the kernel's connect() gives for C{path} (0: connected)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(path)
        except OSError as e:
            return e.errno
    return 0


class TrailingSlashTests(HeldDirectoriesCase):
    """C{sock/}, C{sock/.}, C{sock/./}: ENOTDIR, as the kernel says."""

    def test_socketIsNoDirectory(self) -> None:
        for tail in ("/", "/.", "/./", "//"):
            path = self.at("s") + tail
            self.assertEqual(_kernel_connect(path), errno.ENOTDIR, path)
            for who in (ALICE, None):
                error = self.assertRaises(Refused, open_socket, path, who)
                self.assertIn("not a directory", str(error))
            message = self.refuses(path, Refused)
            self.assertIn("not a directory", message)
        # Not listening: refused, but reached.
        self.assertEqual(_kernel_connect(self.at("s")), errno.ECONNREFUSED)
        self.assertEqual(_fds(), self.before)

    def test_throughALink(self) -> None:
        """A link to the socket, then a slash: the link's target must be one."""
        os.symlink("s", self.at("link"))
        path = self.at("link") + "/"
        self.assertEqual(_kernel_connect(path), errno.ENOTDIR)
        self.refuses(path, Refused)
        os.mkdir(self.at("sub"), 0o755)
        inner = self.bind(os.path.join(self.at("sub"), "t"))
        self.reaches(self.at("sub") + "/./t", inner)
        self.reaches(self.at("sub") + "//t", inner)


class HeldWalkTests(HeldDirectoriesCase):
    """What the held walk must keep: answers, descriptors, retries."""

    def test_lookupsAgainWithinTheRetryDelay(self) -> None:
        """
        A RUNDIR that cannot be held (a link on the way, as /var/run often
        is) answers every lookup, the second one within the retry delay too.
        """
        link = os.path.join(self.base, "link")
        os.symlink("run", link)
        held = HeldDirectories(link)
        self.addCleanup(held.close)
        for _ in range(3):
            opened = held.open_socket(os.path.join(link, "s"), ALICE)
            self.assertEqual(opened.inode[1], self.inode)
            opened.close()
        self.assertFalse(held.held)
        self.assertEqual(_fds(), self.before)

    def test_retriedAfterTheDelay(self) -> None:
        """
        A path that could not be held is tried again once a second has
        passed since, not before: at the first lookup after that.
        """
        now = [1000.0]
        self.patch(access, "time", _Clock(now))
        later = os.path.join(self.base, "later")
        held = HeldDirectories(later)
        self.addCleanup(held.close)
        self.assertIs(held.hold(), False)  # missing: tried, failed
        os.mkdir(later, 0o755)
        now[0] += 0.999
        self.assertIs(held.hold(), False)  # within the delay: not tried again
        self.assertFalse(held.held)
        now[0] += 0.001
        self.assertIs(held.hold(), True)
        self.assertTrue(held.held)

    def test_heldDirectoryGone(self) -> None:
        """RUNDIR removed after it was held: missing, as the walk says."""
        self.reaches(self.at("s"), self.inode)
        self.assertTrue(self.held.held)
        os.rename(self.rundir, self.rundir + ".gone")
        self.refuses(self.at("s"), FileNotFoundError)
        self.assertFalse(self.held.held)
        # An ancestor gone: the same.
        os.rename(self.rundir + ".gone", self.rundir)
        self.reaches(self.at("s"), self.inode)
        self.assertTrue(self.held.held)
        os.rename(self.base, self.base + ".gone")
        self.addCleanup(os.rename, self.base + ".gone", self.base)
        self.refuses(self.at("s"), FileNotFoundError)
        self.held.close()
        self.assertEqual(_fds(), self.before)

    def test_rundirItselfWithASlash(self) -> None:
        """RUNDIR/ (an empty last name): not a socket, by either way."""
        self.held.hold()
        self.refuses(self.rundir + "/", Refused)
        self.refuses(self.rundir + "/.", Refused)
        self.assertEqual(_kernel_connect(self.rundir + "/"), errno.ECONNREFUSED)

    def test_heldLookupIsNoLink(self) -> None:
        opened = self.held.open_socket(self.at("s"), ALICE)
        opened.close()
        self.assertTrue(self.held.held)
        self.assertFalse(opened.via_symlink)

    def test_noDescriptorKeptForLinksAndDirectories(self) -> None:
        """A link or a directory as the last name: walked, nothing kept."""
        os.mkdir(self.at("sub"), 0o755)
        inner = self.bind(os.path.join(self.at("sub"), "t"))
        os.symlink("s", self.at("link"))
        self.held.hold()
        held = _fds()
        for _ in range(3):
            self.refuses(self.at("sub"), Refused)
            opened = self.held.open_socket(self.at("link"), ALICE)
            self.assertEqual(opened.inode[1], self.inode)
            opened.close()
        self.reaches(os.path.join(self.at("sub"), "t"), inner)
        self.assertEqual(_fds(), held)

    def test_deniedInRundirItself(self) -> None:
        """RUNDIR not searchable by the client, all above it searchable."""
        self.held.hold()
        os.chmod(self.rundir, 0o700)
        self.refuses(self.at("s"), AccessDenied)
        self.refuses(self.at("missing"), AccessDenied)
        os.chmod(self.rundir, 0o711)
        self.reaches(self.at("s"), self.inode)

    def test_unnormalPathsNeverHeld(self) -> None:
        """
        C{/a//b}, C{/a/./b}, C{/a/../b}, a trailing slash or a relative
        path are not held (the config normalises RUNDIR); their lookups are
        answered by the walk all the same.
        """
        head, tail = os.path.split(self.rundir)
        for directory in (
            head + "//" + tail,
            head + "/./" + tail,
            head + "/../" + os.path.basename(head) + "/" + tail,
            self.rundir + "/",
            "/." + self.rundir,
            "/.." + self.rundir,
            self.rundir.lstrip("/"),
            # Relative, and the rest of it a path from "/": not held from "/".
            "x" + self.rundir,
        ):
            held = HeldDirectories(directory)
            self.addCleanup(held.close)
            self.assertIs(held.hold(), False, directory)
            path = directory.rstrip("/") + "/s"
            if directory.startswith("/"):
                opened = held.open_socket(path, ALICE)
                self.assertEqual(opened.inode[1], self.inode)
                opened.close()
            else:
                error = self.assertRaises(Refused, held.open_socket, path, ALICE)
                self.assertIn("not an absolute path", str(error))
            self.assertFalse(held.held)
        self.assertEqual(_fds(), self.before)

    def test_chainHeldToRundir(self) -> None:
        """Held: C{/} and exactly the directories down to RUNDIR, by inode."""
        self.assertTrue(self.held.hold())
        names = self.rundir.strip("/").split("/")
        chain = self.held._chain  # type: ignore[attr-defined]
        self.assertEqual([name for name, *_ in chain], names)
        self.assertEqual(len(set(_fds()) - set(self.before)), len(names) + 1)
        path = "/"
        for name, fd, dev, ino in chain:
            path = os.path.join(path, name)
            st = os.stat(path)
            self.assertEqual((dev, ino), (st.st_dev, st.st_ino))
            self.assertEqual(os.readlink(f"/proc/self/fd/{fd}"), path)
        self.assertTrue(self.held.hold())  # again: the same chain
        self.assertIs(self.held._chain, chain)  # type: ignore[attr-defined]

    def test_directoryStatGivenOnce(self) -> None:
        """The walk's RUNDIR stat, for the broker: given once, then None."""
        self.assertIsNone(self.held.take_directory_stat())
        opened = self.held.open_socket(self.at("s"), ALICE)
        opened.close()
        st = self.held.take_directory_stat()
        self.assertIsNotNone(st)
        self.assertEqual(st.st_ino, os.stat(self.rundir).st_ino)  # type: ignore[union-attr]
        self.assertIsNone(self.held.take_directory_stat())
        # A lookup walked the uncached way gives none, even when the one
        # before it left a stat that nobody took.
        os.symlink("s", self.at("link"))
        self.held.open_socket(self.at("s"), ALICE).close()
        self.held.open_socket(self.at("link"), ALICE).close()
        self.assertIsNone(self.held.take_directory_stat())

    def test_overMountedWithTheSameInode(self) -> None:
        """
        A file system mounted over RUNDIR whose root has the held inode's
        number (every tmpfs root is inode 1 on its own device): the socket
        under the new mount is the one reached.
        """
        mount(self, self.rundir)
        os.chmod(self.rundir, 0o755)
        self.reaches(self.at("s"), self.bind(self.at("s")))
        self.assertTrue(self.held.held)
        mount(self, self.rundir)
        os.chmod(self.rundir, 0o755)
        self.assertEqual(os.stat(self.rundir).st_ino, 1)
        self.bind(self.at("s"))
        # Both sockets are likely the same inode number too: compare devices.
        st = os.stat(self.at("s"))
        for opened in (
            self.held.open_socket(self.at("s"), ALICE),
            open_socket(self.at("s"), ALICE),
        ):
            opened.close()
            self.assertEqual(opened.inode, (st.st_dev, st.st_ino))


class _Clock:
    """A monotonic clock that moves when the test says."""

    def __init__(self, now: list[float]) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now[0]


_CONNECT_AS = """
import os, socket, sys
uid = int(sys.argv[2])
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
    try:
        sock.connect(sys.argv[1])
    except OSError as e:
        print(e.errno)
    else:
        print(0)
"""


def _connect_as(path: str, uid: int) -> int:
    """The errno of connect(C{path}) by a process of C{uid} (0: connected)."""
    done = subprocess.run(
        [sys.executable, "-c", _CONNECT_AS, path, str(uid)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return int(done.stdout)


def mount(case: SynchronousTestCase, directory: str) -> None:
    """Mount a small tmpfs on C{directory}, unmounted after the test."""
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "ipcd-test", directory],
        capture_output=True,
        check=False,
        timeout=60,
    )
    if done.returncode != 0:
        raise SkipTest(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    case.addCleanup(
        subprocess.run, ["umount", "-l", directory], check=False, timeout=60
    )


class OpenedSocketTests(SynchronousTestCase):
    def test_closeTwiceClosesOnce(self) -> None:
        """A second close() closes nothing: not a number reused, not stdin."""
        directory = short_tempdir(self)
        path = os.path.join(directory, "s")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(path)
            opened: OpenedSocket = open_socket(path, None)
        fd = opened.fd
        opened.close()
        # The number reused, as the next open() anywhere in ipcd would.
        spare = os.open(directory, os.O_RDONLY)
        self.addCleanup(os.close, spare)
        os.dup2(spare, fd)
        self.addCleanup(os.close, fd)
        stdin = os.dup(0)
        self.addCleanup(os.close, stdin)
        self.addCleanup(os.dup2, stdin, 0)  # should a close take it
        opened.close()
        os.fstat(fd)  # still open
        os.fstat(0)

    def test_dotNeedsSearchPermission(self) -> None:
        """
        C{DIR/.} and C{DIR/./s}: "." is looked up in DIR, as the kernel
        does, so searching DIR must be allowed.
        """
        needs_root()
        directory = short_tempdir(self)
        os.chmod(directory, 0o700)
        path = os.path.join(directory, "s")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(path)
            os.chmod(path, 0o666)
            who = Credentials(61005, 61005)
            for each in (directory + "/.", directory + "/./s"):
                self.assertEqual(_connect_as(each, who.uid), errno.EACCES)
                self.assertRaises(AccessDenied, open_socket, each, who)
            os.chmod(directory, 0o711)
            reached = _connect_as(directory + "/./s", who.uid)
            self.assertEqual(reached, errno.ECONNREFUSED)  # not listening
            open_socket(directory + "/./s", who).close()
            self.assertRaises(Refused, open_socket, directory + "/.", who)

    def test_refusedWithoutPermissionAsTheKernelWould(self) -> None:
        """No search permission on RUNDIR: refused, and nothing kept."""
        directory = short_tempdir(self)
        os.chmod(directory, 0o700)
        path = os.path.join(directory, "s")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(path)
            os.chmod(path, 0o666)
            before = _fds()
            who = Credentials(61005, 61005)
            self.assertRaises(AccessDenied, open_socket, path, who)
            self.assertEqual(_fds(), before)
