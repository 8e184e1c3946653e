"""
RUNDIR is checked before ipcd creates anything in it: L{check_rundir} case by
case, RUNDIR created 1770, and the real C{ipcd} command (and C{twistd ipcd})
refusing an unsafe RUNDIR in one line, with status 1, leaving it empty.
"""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from ipcd.rundir import (
    UnsafeRundir,
    check_ancestors,
    check_rundir,
    ensure_rundir,
    file_kind,
    prepare_rundir,
)
from ipcd.tap import IPCDService, Options, makeService
from ipcd.test.support import (
    TIMEOUT,
    make_config,
    python_env,
    read_text,
    run_python,
    short_rundir,
    spawn,
    start_ipcd,
)


def mode_of(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def user(uid: int) -> str:
    """How the messages name a user: C{uid 0 (root)}."""
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def other_uid() -> int:
    """The uid of C{nobody}, to own things; skip when that cannot be done."""
    if os.geteuid() != 0:
        raise SkipTest("needs root: only root can give a file to another user")
    try:
        uid = pwd.getpwnam("nobody").pw_uid
    except KeyError:
        raise SkipTest("no 'nobody' user to own the directory") from None
    if uid == os.geteuid():
        raise SkipTest("'nobody' is this process's own user")
    return uid


def umask(case: SynchronousTestCase, mask: int) -> None:
    old = os.umask(mask)
    case.addCleanup(os.umask, old)


class CheckRundirTests(SynchronousTestCase):
    """L{check_rundir}: what is refused, with which one-line message."""

    def setUp(self) -> None:
        self.base = short_rundir(self, "ipcd-rd-")
        self.rundir = os.path.join(self.base, "run")
        os.mkdir(self.rundir)
        self.me = user(os.geteuid())

    def refused(self, path: str | None = None) -> str:
        path = self.rundir if path is None else path
        error = self.assertRaises(UnsafeRundir, check_rundir, path)
        message = str(error)
        self.assertNotIn("\n", message)
        self.assertIn(path, message)
        return message

    def test_otherOwner(self) -> None:
        uid = other_uid()
        os.chmod(self.rundir, 0o700)
        os.chown(self.rundir, uid, -1)
        euid = os.geteuid()
        self.assertEqual(
            self.refused(),
            f"unsafe RUNDIR {self.rundir}: owned by {user(uid)}, not by ipcd's "
            f"user {self.me}; remove it, or chown {euid} {self.rundir}",
        )

    def test_ownerWithoutAName(self) -> None:
        """An owner with no passwd entry is named by its uid alone."""
        other_uid()  # root, to give the directory away
        uid = 54321
        while True:
            try:
                pwd.getpwuid(uid)
            except KeyError:
                break
            uid += 1
        os.chmod(self.rundir, 0o700)
        os.chown(self.rundir, uid, -1)
        self.assertIn(f"owned by uid {uid}, not by", self.refused())

    def test_root(self) -> None:
        """C{/} is checked as the directory C{/}, as any other RUNDIR."""
        if os.geteuid() == 0:
            check_rundir("/")  # root's, written by root alone: safe
        else:
            self.assertIn("owned by uid 0", self.refused("/"))

    def test_otherOwnerEvenWithSticky(self) -> None:
        """The owner may remove anything in it: the sticky bit does not help."""
        uid = other_uid()
        os.chmod(self.rundir, 0o1770)
        os.chown(self.rundir, uid, -1)
        self.assertIn(f"owned by {user(uid)}", self.refused())

    def test_worldWritable(self) -> None:
        os.chmod(self.rundir, 0o777)
        self.assertEqual(
            self.refused(),
            f"unsafe RUNDIR {self.rundir}: mode 0777 lets other users replace "
            f"sockets; chmod 1770 {self.rundir} (sticky bit)",
        )

    def test_otherWritableOnly(self) -> None:
        os.chmod(self.rundir, 0o702)
        self.assertIn("mode 0702 lets other users replace sockets", self.refused())

    def test_groupWritable(self) -> None:
        os.chmod(self.rundir, 0o770)
        self.assertEqual(
            self.refused(),
            f"unsafe RUNDIR {self.rundir}: mode 0770 lets group members replace "
            f"sockets; chmod 1770 {self.rundir} (sticky bit), or 0750 to let "
            "them only connect",
        )

    def test_groupWritableSetgid(self) -> None:
        """Setgid (new sockets get RUNDIR's group) is no substitute for sticky."""
        os.chmod(self.rundir, 0o2770)
        self.assertIn("mode 2770 lets group members", self.refused())

    def test_accepted(self) -> None:
        for mode in (0o1777, 0o1770, 0o3770, 0o700, 0o750, 0o755, 0o2750):
            os.chmod(self.rundir, mode)
            self.assertEqual(mode_of(self.rundir), mode)
            check_rundir(self.rundir)

    def test_notADirectory(self) -> None:
        path = os.path.join(self.base, "file")
        with open(path, "w"):
            pass
        self.assertEqual(
            self.refused(path),
            f"unsafe RUNDIR {path}: not a directory (a regular file); "
            "remove it or choose another --rundir",
        )

    def test_missing(self) -> None:
        path = os.path.join(self.base, "missing")
        self.assertEqual(
            self.refused(path),
            f"unsafe RUNDIR {path}: does not exist; mkdir -m 1770 {path}",
        )

    def test_symlinkOwnedByAnotherUser(self) -> None:
        uid = other_uid()
        os.chmod(self.rundir, 0o1770)
        link = os.path.join(self.base, "link")
        os.symlink(self.rundir, link)
        os.lchown(link, uid, -1)
        self.assertEqual(
            self.refused(link),
            f"unsafe RUNDIR {link}: is a symlink (to {self.rundir}) owned by "
            f"{user(uid)}, not by ipcd's user {self.me}; remove it: rm {link}",
        )

    def test_symlinkWithTrailingSlash(self) -> None:
        """C{link/} is still the link: its owner is checked."""
        uid = other_uid()
        os.chmod(self.rundir, 0o1770)
        link = os.path.join(self.base, "link")
        os.symlink(self.rundir, link)
        os.lchown(link, uid, -1)
        self.assertIn(f"is a symlink (to {self.rundir})", self.refused(link + "/"))

    def test_symlinkTargetOnOneLine(self) -> None:
        """A target with a newline cannot add a line to the message."""
        link = os.path.join(self.base, "link")
        target = os.path.join(self.base, "two\nlines")
        os.symlink(target, link)
        self.assertIn(f"(a symlink to {target!r})", self.refused(link))

    def test_symlinkOfMineToSafeDirectory(self) -> None:
        os.chmod(self.rundir, 0o1770)
        link = os.path.join(self.base, "link")
        os.symlink(self.rundir, link)
        check_rundir(link)

    def test_symlinkTargetChecked(self) -> None:
        """A link of ours is followed: the directory it names is checked."""
        os.chmod(self.rundir, 0o777)
        link = os.path.join(self.base, "link")
        os.symlink(self.rundir, link)
        self.assertEqual(
            self.refused(link),
            f"unsafe RUNDIR {link} (a symlink to {self.rundir}): mode 0777 lets "
            f"other users replace sockets; chmod 1770 {link} (sticky bit)",
        )

    def test_symlinkTargetOwnedByAnotherUser(self) -> None:
        uid = other_uid()
        os.chmod(self.rundir, 0o700)
        os.chown(self.rundir, uid, -1)
        link = os.path.join(self.base, "link")
        os.symlink(self.rundir, link)
        self.assertIn(f"owned by {user(uid)}", self.refused(link))

    def test_danglingSymlink(self) -> None:
        link = os.path.join(self.base, "link")
        target = os.path.join(self.base, "nowhere")
        os.symlink(target, link)
        self.assertEqual(
            self.refused(link),
            f"unsafe RUNDIR {link} (a symlink to {target}): the target does not "
            f"exist; create it or rm {link}",
        )


class PrepareRundirTests(SynchronousTestCase):
    """Creating RUNDIR: 1770 whatever the umask, then checked."""

    def setUp(self) -> None:
        self.base = short_rundir(self, "ipcd-rd-")

    def test_ensureCreates1770(self) -> None:
        for mask in (0o022, 0o077, 0o777):
            umask(self, mask)
            rundir = os.path.join(self.base, f"{mask:o}", "run")
            ensure_rundir(rundir)
            self.assertEqual(mode_of(rundir), 0o1770, f"umask {mask:03o}")

    def test_parentsNeverWritableByOthers(self) -> None:
        """
        The missing directories above RUNDIR are made without group or
        other write permission, whatever the umask (0: they were 0777, and
        anyone could rename RUNDIR away and put their own in its place).
        """
        for mask in (0o000, 0o002, 0o027):
            umask(self, mask)
            top = os.path.join(self.base, f"u{mask:o}")
            ensure_rundir(os.path.join(top, "libipc", "run"))
            for parent in (top, os.path.join(top, "libipc")):
                self.assertEqual(
                    mode_of(parent), 0o777 & ~(mask | 0o022), f"umask {mask:03o}"
                )
            self.assertEqual(os.umask(mask), mask)  # given back

    def test_fileInThePlace(self) -> None:
        """
        A file where RUNDIR should be: "not a directory", naming it (it was
        "file exists", which reads as if all were well).
        """
        path = os.path.join(self.base, "run")
        with open(path, "w"):
            pass
        error = self.assertRaises(NotADirectoryError, ensure_rundir, path)
        self.assertEqual(str(error), f"[Errno 20] not a directory: {path!r}")

    def test_ensureTrailingSlash(self) -> None:
        rundir = os.path.join(self.base, "run") + "/"
        ensure_rundir(rundir)
        self.assertEqual(mode_of(rundir), 0o1770)

    def test_prepareCreatesAndAccepts(self) -> None:
        umask(self, 0o022)
        rundir = os.path.join(self.base, "run")
        prepare_rundir(rundir)
        self.assertEqual(mode_of(rundir), 0o1770)
        self.assertEqual(os.lstat(rundir).st_uid, os.geteuid())

    def test_prepareLeavesExistingAlone(self) -> None:
        """An unsafe RUNDIR is refused, not repaired, and stays empty."""
        rundir = os.path.join(self.base, "run")
        os.mkdir(rundir)
        os.chmod(rundir, 0o777)
        self.assertRaises(UnsafeRundir, prepare_rundir, rundir)
        self.assertEqual(mode_of(rundir), 0o777)
        self.assertEqual(os.listdir(rundir), [])

    def test_prepareFile(self) -> None:
        """A file in RUNDIR's place gets the check's message, not mkdir's."""
        path = os.path.join(self.base, "file")
        with open(path, "w"):
            pass
        error = self.assertRaises(UnsafeRundir, prepare_rundir, path)
        self.assertIn("not a directory (a regular file)", str(error))

    def test_prepareDanglingSymlinkInTheWay(self) -> None:
        """A dangling link where a directory must be made is named as one."""
        link = os.path.join(self.base, "link")
        os.symlink(os.path.join(self.base, "nowhere"), link)
        rundir = os.path.join(link, "run")
        error = self.assertRaises(UnsafeRundir, prepare_rundir, rundir)
        self.assertEqual(
            str(error),
            f"cannot create RUNDIR {rundir}: {link} is not a directory (a "
            "symbolic link); choose another --rundir",
        )

    def test_fileKinds(self) -> None:
        """Every kind by name; one Linux has no name for, by its type bits."""
        self.assertEqual(file_kind(stat.S_IFLNK | 0o777), "a symbolic link")
        self.assertEqual(file_kind(stat.S_IFSOCK), "a socket")
        self.assertEqual(file_kind(0o170000 | 0o644), "file type 170000")

    def test_prepareCannotCreate(self) -> None:
        """Creation failing is one line too."""
        path = os.path.join(self.base, "file")
        with open(path, "w"):
            pass
        rundir = os.path.join(path, "run")
        error = self.assertRaises(UnsafeRundir, prepare_rundir, rundir)
        self.assertEqual(
            str(error),
            f"cannot create RUNDIR {rundir}: {path} is not a directory (a regular "
            "file); choose another --rundir",
        )


def _enter(fd: int, name: str) -> int:
    """The directory C{name} in C{fd}, opened; C{fd} closed."""
    child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
    os.close(fd)
    return child


class AncestorTests(SynchronousTestCase):
    """
    L{check_rundir} on the directories above RUNDIR: nobody but root and
    ipcd's user may be able to rename RUNDIR (or a link or directory on the
    way) away and put their own in its place.
    """

    def setUp(self) -> None:
        self.base = short_rundir(self, "ipcd-rd-")
        self.me = user(os.geteuid())

    def rundir_in(self, *names: str, mode: int = 0o755) -> tuple[str, str]:
        """C{base/NAMES.../run}, the last name's directory given C{mode}."""
        parent = os.path.join(self.base, *names)
        os.makedirs(parent)
        os.chmod(parent, mode)
        rundir = os.path.join(parent, "run")
        os.mkdir(rundir, 0o1770)
        return parent, rundir

    def refused(self, rundir: str) -> str:
        message = str(self.assertRaises(UnsafeRundir, check_rundir, rundir))
        self.assertNotIn("\n", message)
        return message

    def test_parentWorldWritable(self) -> None:
        parent, rundir = self.rundir_in("open", mode=0o777)
        self.assertEqual(
            self.refused(rundir),
            f"unsafe RUNDIR {rundir}: {parent} (mode 0777) lets other users "
            f"rename RUNDIR away and put their own in its place; chmod +t "
            f"{parent} (sticky bit), or choose another --rundir",
        )

    def test_grandparentGroupWritable(self) -> None:
        """Every directory on the way counts, not only RUNDIR's own parent."""
        self.rundir_in("shared", "mine", mode=0o755)
        shared = os.path.join(self.base, "shared")
        os.chmod(shared, 0o770)
        message = self.refused(os.path.join(shared, "mine", "run"))
        self.assertIn(f"{shared} (mode 0770) lets group members rename", message)

    def test_parentOfAnotherUser(self) -> None:
        """Its owner can chmod it, or rename RUNDIR, whatever its mode."""
        uid = other_uid()
        parent, rundir = self.rundir_in("theirs", mode=0o755)
        os.chown(parent, uid, -1)
        self.assertEqual(
            self.refused(rundir),
            f"unsafe RUNDIR {rundir}: {parent} is owned by {user(uid)}, who "
            f"could rename RUNDIR away and put their own in its place; choose a "
            f"--rundir whose parents only root or ipcd's user own",
        )

    def test_stickyParent(self) -> None:
        """As in C{/tmp}: nobody but its owner may rename RUNDIR there."""
        _, rundir = self.rundir_in("tmp", mode=0o1777)
        check_rundir(rundir)

    def test_stickyParentEntryOfAnotherUser(self) -> None:
        """The sticky bit lets a directory's owner rename it, even there."""
        uid = other_uid()
        self.rundir_in("tmp", "theirs", mode=0o755)
        tmp, theirs = (
            os.path.join(self.base, "tmp"),
            os.path.join(self.base, "tmp", "theirs"),
        )
        os.chmod(tmp, 0o1777)
        os.chown(theirs, uid, -1)
        message = self.refused(os.path.join(theirs, "run"))
        self.assertIn(
            f"{theirs} is owned by {user(uid)}, who could replace it", message
        )

    def test_throughALinkIntoAnOpenDirectory(self) -> None:
        """Links are followed as the kernel follows them (from C{/})."""
        parent, _ = self.rundir_in("open", mode=0o777)
        os.mkdir(os.path.join(self.base, "safe"))
        link = os.path.join(self.base, "safe", "link")
        os.symlink(parent, link)
        message = self.refused(os.path.join(link, "run"))
        self.assertIn(f"{parent} (mode 0777) lets other users", message)

    def test_missingInAStickyParent(self) -> None:
        """As the default C{/tmp/libipc-run} the first time: made, and safe."""
        parent = os.path.join(self.base, "tmp")
        os.mkdir(parent)
        os.chmod(parent, 0o1777)
        rundir = os.path.join(parent, "libipc-run")
        prepare_rundir(rundir)
        self.assertEqual(mode_of(rundir), 0o1770)

    def test_missingFromTheTop(self) -> None:
        """Nothing of the path there yet: ipcd will make it all."""
        check_ancestors(f"/ipcd-test-{os.getpid()}-none/a/run")

    def test_linksUpToTheKernelsBound(self) -> None:
        """40 links on the way are followed (as the kernel does), not 41."""
        _, rundir = self.rundir_in("safe", mode=0o755)
        previous = "safe"
        for n in range(41):
            os.symlink(previous, os.path.join(self.base, f"l{n}"))
            previous = f"l{n}"
        check_ancestors(os.path.join(self.base, "l39", "run"))
        error = self.assertRaises(
            UnsafeRundir, check_ancestors, os.path.join(self.base, "l40", "run")
        )
        self.assertIn("too many symbolic links", str(error))

    def test_aLinkInAnOpenDirectory(self) -> None:
        """Whoever can write where a link is can point it elsewhere."""
        _, rundir = self.rundir_in("safe", mode=0o755)
        open_dir = os.path.join(self.base, "open")
        os.mkdir(open_dir)
        os.chmod(open_dir, 0o777)
        os.symlink(rundir, os.path.join(open_dir, "run"))
        message = self.refused(os.path.join(open_dir, "run"))
        self.assertIn(f"{open_dir} (mode 0777) lets other users", message)

    def test_relativeLinkUpwards(self) -> None:
        """C{..} in a link's target is taken from where the link is."""
        parent, _ = self.rundir_in("open", mode=0o777)
        os.makedirs(os.path.join(self.base, "a", "b"))
        os.symlink("../../open", os.path.join(self.base, "a", "b", "up"))
        message = self.refused(os.path.join(self.base, "a", "b", "up", "run"))
        self.assertIn(f"{parent} (mode 0777)", message)

    def test_asAnotherUser(self) -> None:
        """
        ipcd run as an ordinary user: root's directories are trusted on the
        way to its RUNDIR; one it cannot look into is named.
        """
        uid = other_uid()
        _, rundir = self.rundir_in("home", mode=0o755)
        os.chown(rundir, uid, -1)
        os.chmod(self.base, 0o755)
        closed = os.path.join(self.base, "closed")
        os.mkdir(closed, 0o700)
        code = (
            "import os, sys\n"
            "from ipcd.rundir import UnsafeRundir, prepare_rundir\n"
            "uid = int(sys.argv[1])\n"
            "os.setgroups([]); os.setgid(uid); os.setuid(uid)\n"
            "for path in sys.argv[2:]:\n"
            "    try:\n"
            "        prepare_rundir(path)\n"
            "        print('safe')\n"
            "    except UnsafeRundir as e:\n"
            "        print(e)\n"
        )
        hidden = os.path.join(closed, "run")
        out = run_python(code, str(uid), rundir, hidden)
        self.assertEqual(
            out.stdout.splitlines(),
            [
                "safe",
                f"unsafe RUNDIR {hidden}: cannot inspect {hidden}: Permission denied",
            ],
            out.stderr,
        )

    def test_tooLongToInspectIsUnsafe(self) -> None:
        """
        A path whose links expand past PATH_MAX cannot be checked by name:
        refused (it was passed, unchecked, with an open directory past the
        point where names grew too long).
        """
        fd = os.open(self.base, os.O_RDONLY | os.O_DIRECTORY)
        for _ in range(12):  # 12 x 250 characters: the path given stays short
            os.mkdir("d" * 249, dir_fd=fd)
            fd = _enter(fd, "d" * 249)
        os.symlink("/".join(["e" * 249] * 6), "link", dir_fd=fd)
        for n in range(6):  # where the link leads: past 4,096 characters
            os.mkdir("e" * 249, dir_fd=fd)
            os.chmod("e" * 249, 0o777 if n == 5 else 0o755, dir_fd=fd)
            fd = _enter(fd, "e" * 249)
        os.mkdir("run", 0o1770, dir_fd=fd)
        os.close(fd)
        rundir = "/".join([self.base] + ["d" * 249] * 12 + ["link", "run"])
        self.assertLess(len(rundir), 4096)
        message = self.refused(rundir)
        self.assertIn("File name too long", message)

    def test_linkGoneMeanwhile(self) -> None:
        """A link removed between its lstat and its readlink: one line."""
        self.rundir_in("safe", mode=0o755)
        os.symlink("safe", os.path.join(self.base, "link"))

        def gone(path: str) -> str:
            raise FileNotFoundError(2, "No such file or directory", path)

        self.patch(os, "readlink", gone)
        message = self.refused(os.path.join(self.base, "link", "run"))
        self.assertIn("link: No such file or directory", message)

    def test_linkLoopBounded(self) -> None:
        os.symlink("loop", os.path.join(self.base, "loop"))
        error = self.assertRaises(
            UnsafeRundir, check_ancestors, os.path.join(self.base, "loop", "run")
        )
        self.assertIn("too many symbolic links", str(error))

    def test_missingRundirInAnOpenParent(self) -> None:
        """Nothing is created under a parent another user could swap."""
        parent = os.path.join(self.base, "open")
        os.mkdir(parent)
        os.chmod(parent, 0o777)
        rundir = os.path.join(parent, "run")
        error = self.assertRaises(UnsafeRundir, prepare_rundir, rundir)
        self.assertIn(f"{parent} (mode 0777) lets other users", str(error))
        self.assertEqual(os.listdir(parent), [])

    def test_missingParentsMade(self) -> None:
        """Missing parents are ipcd's to make, without write for others."""
        umask(self, 0)
        rundir = os.path.join(self.base, "new", "deeper", "run")
        prepare_rundir(rundir)
        self.assertEqual(mode_of(os.path.dirname(rundir)), 0o755)


class ServiceTests(TestCase):
    """The check where ipcd starts: makeService and IPCDService.startService."""

    def setUp(self) -> None:
        self.base = short_rundir(self, "ipcd-rd-")
        self.rundir = os.path.join(self.base, "run")
        os.mkdir(self.rundir)
        os.chmod(self.rundir, 0o777)

    def test_makeServiceExits(self) -> None:
        options = Options()
        options.parseOptions(["--rundir", self.rundir, "--no-tcp", "--no-ws"])
        error = self.assertRaises(SystemExit, makeService, options, reactor)
        self.assertEqual(
            error.code,
            f"ipcd: unsafe RUNDIR {self.rundir}: mode 0777 lets other users "
            f"replace sockets; chmod 1770 {self.rundir} (sticky bit)",
        )
        self.assertEqual(os.listdir(self.rundir), [])

    def test_startServiceRefuses(self) -> None:
        service = IPCDService(make_config(self.rundir), reactor)
        self.assertRaises(UnsafeRundir, service.startService)
        self.assertFalse(service.running)
        self.assertEqual(os.listdir(self.rundir), [])

    @inlineCallbacks
    def test_startServiceCreates1770(self) -> Any:
        umask(self, 0o022)
        rundir = os.path.join(self.base, "new")
        service = yield start_ipcd(self, make_config(rundir))
        self.assertEqual(mode_of(rundir), 0o1770)
        self.assertTrue(all(os.path.exists(p) for p in service.socket_paths()))


TWISTD = "from twisted.scripts.twistd import run; run()"


class CommandTests(SynchronousTestCase):
    """
    The real command on an unsafe RUNDIR: status 1 within a bounded time, one
    line of output naming the reason, and nothing created in RUNDIR.
    """

    def setUp(self) -> None:
        self.base = short_rundir(self, "ipcd-rd-")
        self.rundir = os.path.join(self.base, "run")
        os.mkdir(self.rundir)
        self.work = short_rundir(self, "ipcd-work-")

    def refused(self, args: list[str]) -> str:
        log = os.path.join(self.work, "out.log")
        process = spawn(self, args, log, python_env(), self.work)
        try:
            code = process.wait(3 * TIMEOUT)
        except subprocess.TimeoutExpired:
            self.fail(
                f"still running after {3 * TIMEOUT:g} s (killed); output:\n"
                + read_text(log)
            )
        output = read_text(log)
        self.assertEqual(code, 1, output)
        self.assertEqual(os.listdir(self.rundir), [], output)
        lines = output.splitlines()
        self.assertEqual(len(lines), 1, output)
        return lines[0]

    def ipcd(self) -> str:
        return self.refused(
            ["-m", "ipcd.scripts.ipcd", "--rundir", self.rundir, "--no-tcp", "--no-ws"]
        )

    def test_otherOwner(self) -> None:
        uid = other_uid()
        os.chmod(self.rundir, 0o1770)
        os.chown(self.rundir, uid, -1)
        euid = os.geteuid()
        self.assertEqual(
            self.ipcd(),
            f"ipcd: unsafe RUNDIR {self.rundir}: owned by {user(uid)}, not by "
            f"ipcd's user {user(euid)}; remove it, or chown {euid} {self.rundir}",
        )

    def test_worldWritable(self) -> None:
        os.chmod(self.rundir, 0o777)
        self.assertEqual(
            self.ipcd(),
            f"ipcd: unsafe RUNDIR {self.rundir}: mode 0777 lets other users "
            f"replace sockets; chmod 1770 {self.rundir} (sticky bit)",
        )

    def test_parentWorldWritable(self) -> None:
        """A parent others may write to stops the real command in one line."""
        os.chmod(self.base, 0o777)
        self.assertEqual(
            self.ipcd(),
            f"ipcd: unsafe RUNDIR {self.rundir}: {self.base} (mode 0777) lets "
            f"other users rename RUNDIR away and put their own in its place; "
            f"chmod +t {self.base} (sticky bit), or choose another --rundir",
        )

    def test_twistdGroupWritable(self) -> None:
        """C{twistd -n ipcd} says the same in the same way."""
        os.chmod(self.rundir, 0o770)
        line = self.refused(
            ["-c", TWISTD, "-n", "--pidfile=", "ipcd", "--rundir", self.rundir]
            + ["--no-tcp", "--no-ws"]
        )
        self.assertEqual(
            line,
            f"ipcd: unsafe RUNDIR {self.rundir}: mode 0770 lets group members "
            f"replace sockets; chmod 1770 {self.rundir} (sticky bit), or 0750 to "
            "let them only connect",
        )
