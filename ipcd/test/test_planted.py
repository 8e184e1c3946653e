"""
What a member of RUNDIR's group planted at ipcd's names (L{ipcd.planted}):
real ipcd processes against a real other user's directory, file, FIFO,
symbolic link and socket (stale, and served) at RUNDIR/.ipcd-lock, ipc,
ipcd-control, pong, tcp; ipcd as root and as a user of its own; then the
steps themselves, in this process, with and without RENAME_EXCHANGE.
"""

from __future__ import annotations

import os
import pwd
import re
import select
import signal
import socket
import stat
import subprocess
import sys
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ipcd import planted
from ipcd.compat.twisted import PREEXISTING_SOCKET
from ipcd.instancelock import LOCK_NAME
from ipcd.planted import ASIDE_PREFIX, Taken, sweep_aside, take_name, take_out
from ipcd.tap import IPCDService
from ipcd.test.support import (
    TIMEOUT,
    accepts,
    lookup,
    make_config,
    needs_root,
    python_env,
    read_text,
    run_python,
    short_rundir,
    spawn,
)

NOBODY = 65534
# ipcd's own user where it runs as no root: a uid with no account.
IPCD_UID = 4242
# Every name this ipcd needs: its lock, its two sockets, pongd's, tcpd's.
NAMES = (LOCK_NAME, "ipc", "ipcd-control", "pong", "tcp")
ARGS = ["--tcp", "tcp:0:interface=127.0.0.1", "--no-ws", "--no-tls", "--no-udp"]
KINDS = {
    "directory": "a directory",
    "file": "a regular file",
    "fifo": "a FIFO",
    "symlink": "a symbolic link",
    "stale": "a socket",
    "served": "a socket",
}

# The member: plants KIND at each NAME in RUNDIR as user nobody, says so
# on stdout, and holds what it serves until its stdin closes.
_MEMBER = """
import os, socket, sys
rundir, kind, target, names = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
os.setgroups([])
os.setresgid(65534, 65534, 65534)
os.setresuid(65534, 65534, 65534)
held = []
for name in names:
    path = os.path.join(rundir, name)
    if kind == "directory":
        os.mkdir(path, 0o700)
        with open(os.path.join(path, "inside"), "w") as f:
            f.write("the member's")
        os.symlink(target, os.path.join(path, "link"))
    elif kind == "file":
        with open(path, "w") as f:
            f.write("the member's")
    elif kind == "fifo":
        os.mkfifo(path, 0o666)
    elif kind == "symlink":
        os.symlink(target, path)
    else:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        s.listen(8)
        if kind == "served":
            held.append(s)
        else:
            s.close()
print("planted", flush=True)
sys.stdin.read()
"""


# ipcd's steps as user UID: its lock, then a socket at each NAME, placed.
_NOT_ROOT = """
import os, sys
from ipcd.instancelock import take_instance_lock
from ipcd.placing import Placing
uid, rundir, names = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
os.setgroups([])
os.setresgid(uid, uid, uid)
os.setresuid(uid, uid, uid)
lock = take_instance_lock(rundir)
for taken in lock.taken:
    print(taken)
for name in names:
    with Placing(os.path.join(rundir, name), 0o660) as placing:
        placing.socket.listen(1)
        for taken in placing.place(True, lambda: None):
            print(taken)
"""


def user(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


class PlantedStartTests(SynchronousTestCase):
    """Real ipcd commands against a real member's plants."""

    def setUp(self) -> None:
        needs_root()
        self.rundir = short_rundir(self, "ipcd-pl-")
        os.chown(self.rundir, 0, NOBODY)
        os.chmod(self.rundir, 0o1770)
        self.work = short_rundir(self, "ipcd-plw-")
        os.chmod(self.work, 0o755)
        # What a link may point to: root's, readable by root only.
        self.target = os.path.join(self.work, "root-only")
        with open(self.target, "w") as f:
            f.write("root's\n")
        os.chmod(self.target, 0o600)

    def plant(self, kind: str, names: tuple[str, ...] = NAMES) -> None:
        """User nobody, a member of RUNDIR's group, plants C{kind} at C{names}."""
        member = subprocess.Popen(
            [sys.executable, "-c", _MEMBER, self.rundir, kind, self.target, *names],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )

        def done() -> None:
            member.stdin.close()  # type: ignore[union-attr]
            member.wait(3 * TIMEOUT)
            member.stdout.close()  # type: ignore[union-attr]

        self.addCleanup(done)
        out = member.stdout
        assert out is not None
        ready = select.select([out], [], [], 3 * TIMEOUT)[0]
        self.assertEqual(ready and out.readline(), b"planted\n")
        for name in names:
            self.assertEqual(os.lstat(os.path.join(self.rundir, name)).st_uid, NOBODY)

    def start(self, log: str, **popen: object) -> subprocess.Popen[bytes]:
        args = ["-m", "ipcd.scripts.ipcd", "--rundir", self.rundir, *ARGS]
        return spawn(self, args, log, python_env(), self.work, **popen)

    def serving(self, process: subprocess.Popen[bytes], log: str) -> None:
        """Wait (bounded) until C{process} answers lookups on RUNDIR/ipc."""
        deadline = time.monotonic() + 3 * TIMEOUT
        while "ipcd: ready" not in read_text(log):
            if process.poll() is not None:
                self.fail(f"exited with {process.returncode}:\n{read_text(log)}")
            if time.monotonic() > deadline:
                self.fail(f"not ready after {3 * TIMEOUT:g} s:\n{read_text(log)}")
            time.sleep(0.05)
        self.assertTrue(accepts(os.path.join(self.rundir, "ipcd-control")))
        reply = lookup(self.rundir, b"pong")
        self.addCleanup(reply.close_fds)
        self.assertEqual((reply.data, len(reply.fds)), (b"ok", 1))

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        process.terminate()
        process.wait(3 * TIMEOUT)

    def taken_lines(self, log: str) -> list[str]:
        """The log's lines saying what was taken from ipcd's names."""
        return [
            line.split("] ", 1)[1]
            for line in read_text(log).splitlines()
            if "not ipcd's:" in line
        ]

    def expected(self, kind: str, uid: int = NOBODY) -> list[str]:
        """One line per name, as ipcd says it (a directory's aside name, any)."""
        said = []
        for name in NAMES:
            path = os.path.join(self.rundir, name)
            what = f"{path} was {KINDS[kind]} of {user(uid)}, not ipcd's: "
            if kind == "directory":
                aside = os.path.join(self.rundir, ASIDE_PREFIX)
                said.append(f"{what}moved it to {aside}X (remove it: rm -r {aside}X)")
            else:
                said.append(f"{what}removed it")
        return said

    def started_against(self, kind: str) -> None:
        """
        ipcd starts and serves; each name is ipcd's own now, and the log
        has one line per plant naming it and its owner; nothing a link
        named was touched; a directory is beside, as it was.
        """
        self.plant(kind)
        log = os.path.join(self.work, f"{kind}.log")
        process = self.start(log)
        self.serving(process, log)
        lines = [
            re.sub(f"{re.escape(ASIDE_PREFIX)}[0-9a-f]{{16}}", ASIDE_PREFIX + "X", line)
            for line in self.taken_lines(log)
        ]
        self.assertEqual(sorted(lines), sorted(self.expected(kind)), read_text(log))
        for name in NAMES:
            st = os.lstat(os.path.join(self.rundir, name))
            self.assertEqual(st.st_uid, 0)
            want = stat.S_ISREG if name == LOCK_NAME else stat.S_ISSOCK
            self.assertTrue(want(st.st_mode), name)
        self.assertEqual(read_text(self.target), "root's\n")
        self.assertEqual(stat.S_IMODE(os.stat(self.target).st_mode), 0o600)
        self.assertEqual(os.stat(self.target).st_uid, 0)
        aside = sorted(n for n in os.listdir(self.rundir) if n.startswith("."))
        aside.remove(LOCK_NAME)
        if kind == "directory":
            self.assertEqual(len(aside), len(NAMES))
            for name in aside:
                path = os.path.join(self.rundir, name)
                self.assertEqual(os.lstat(path).st_uid, NOBODY)
                self.assertEqual(sorted(os.listdir(path)), ["inside", "link"])
                self.assertEqual(
                    read_text(os.path.join(path, "inside")), "the member's"
                )
        else:
            self.assertEqual(aside, [])
        self.stop(process)

    def test_directories(self) -> None:
        self.started_against("directory")

    def test_files(self) -> None:
        self.started_against("file")

    def test_fifos(self) -> None:
        self.started_against("fifo")

    def test_symlinks(self) -> None:
        self.started_against("symlink")

    def test_staleSockets(self) -> None:
        self.started_against("stale")

    def test_servedSockets(self) -> None:
        """
        Served too: the member's listeners are no longer at ipcd's names
        (clients reach ipcd at RUNDIR/ipc, as the lookup showed).
        """
        self.started_against("served")

    def test_hardLinksToALiveSocket(self) -> None:
        """
        A hard link at each name to a live socket of ipcd's user elsewhere:
        a member's, of root's /run/systemd/journal/stdout, where
        fs.protected_hardlinks is 0 (made here by root itself, whatever
        that setting: the same files) no longer stops the start.  Each is
        taken, one line each; the socket keeps its own name and serves on.
        """
        original = os.path.join(self.work, "stdout")
        journal = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(journal.close)
        journal.bind(original)
        journal.listen(8)
        for name in NAMES:
            os.link(original, os.path.join(self.rundir, name))
        log = os.path.join(self.work, "linked.log")
        process = self.start(log)
        self.serving(process, log)
        lines = self.taken_lines(log)
        # One name fewer at each take: 6 names (5 links), then 5, ...
        counts = sorted(int(n) for n in re.findall(r"with (\d) names", "".join(lines)))
        self.assertEqual(counts, list(range(2, len(NAMES) + 2)), read_text(log))
        self.assertEqual(
            sorted(re.sub(r"with \d names", "with N names", line) for line in lines),
            sorted(
                f"{self.rundir}/{name} was a socket of {user(0)} with N names "
                "(hard links), not ipcd's: removed this name (the others stay)"
                for name in NAMES
            ),
        )
        for name in NAMES:
            st = os.lstat(os.path.join(self.rundir, name))
            self.assertNotEqual(st.st_ino, os.lstat(original).st_ino)
            self.assertEqual(st.st_nlink, 1)
        self.assertEqual(sorted(os.listdir(self.rundir)), sorted(NAMES))
        # The socket itself: by its own one name, still listening there.
        self.assertEqual(os.lstat(original).st_nlink, 1)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(client.close)
        client.settimeout(TIMEOUT)
        client.connect(original)
        journal.settimeout(TIMEOUT)
        journal.accept()[0].close()
        self.stop(process)

    def test_notRoot(self) -> None:
        """
        ipcd's steps as a user of its own, RUNDIR's owner but no root:
        another user's directory (mode 0700, which only root could move to
        another directory) is swapped aside all the same, at the lock's
        name and at its sockets'.  (In a child that drops to that user
        once its modules are in: the interpreter is in root's home.)
        """
        os.chown(self.rundir, IPCD_UID, NOBODY)
        self.plant("directory")
        out = run_python(_NOT_ROOT, str(IPCD_UID), self.rundir, *NAMES[1:])
        self.assertEqual(out.returncode, 0, out.stderr)
        lines = out.stdout.splitlines()
        self.assertEqual(len(lines), len(NAMES), out.stdout)
        for name, line in zip(NAMES, lines, strict=True):
            path = os.path.join(self.rundir, name)
            self.assertTrue(line.startswith(f"{path} was a directory of"), line)
            self.assertEqual(os.lstat(path).st_uid, IPCD_UID)
        aside = [n for n in os.listdir(self.rundir) if n.startswith(ASIDE_PREFIX)]
        self.assertEqual(len(aside), len(NAMES))

    def test_leftAsideAtTheNextStart(self) -> None:
        """
        Directories left beside stay, said in one line at the next start;
        ipcd's own sockets and lock are as ever.
        """
        self.plant("directory", ("ipc", "tcp"))
        first = os.path.join(self.work, "first.log")
        process = self.start(first)
        self.serving(process, first)
        self.stop(process)
        second = os.path.join(self.work, "second.log")
        process = self.start(second)
        self.serving(process, second)
        self.assertIn(
            f"RUNDIR holds 2 directories ipcd took from its names (not emptied: "
            f"another user's tree); remove them: rm -r {self.rundir}/{ASIDE_PREFIX}*",
            read_text(second),
        )
        self.assertEqual(self.taken_lines(second), [])
        self.stop(process)


class TakeNameTests(SynchronousTestCase):
    """L{take_name} and L{take_out} in this process."""

    def setUp(self) -> None:
        self.rundir = short_rundir(self, "ipcd-pt-")
        self.parent = os.open(self.rundir, os.O_PATH | os.O_DIRECTORY)
        self.addCleanup(os.close, self.parent)
        self.private = short_rundir(self, "ipcd-ptp-")
        self.source_dir = os.open(self.private, os.O_PATH | os.O_DIRECTORY)
        self.addCleanup(os.close, self.source_dir)
        self.source = os.path.join(self.private, "mine")
        with open(self.source, "w") as f:
            f.write("ipcd's")
        self.path = os.path.join(self.rundir, "ipc")

    def without_exchange(self) -> None:
        """As on a file system without RENAME_EXCHANGE."""
        planted._exchange()
        self.patch(planted, "_renameat2", None)

    def take(self) -> list[Taken]:
        taken = take_name(self.parent, "ipc", self.source_dir, "mine", self.path)
        self.assertEqual(read_text(self.path), "ipcd's")
        self.assertEqual(os.stat(self.path).st_ino, os.stat(self.source).st_ino)
        return taken

    def leftover(self) -> list[str]:
        return sorted(set(os.listdir(self.rundir)) - {"ipc"})

    def test_free(self) -> None:
        self.assertEqual(self.take(), [])
        self.assertEqual(self.leftover(), [])

    def check_file(self) -> None:
        with open(self.path, "w") as f:
            f.write("another's")
        os.chown(self.path, NOBODY, NOBODY)
        self.assertEqual(
            self.take(), [Taken(self.path, "a regular file", NOBODY, None)]
        )
        self.assertEqual(self.leftover(), [])

    def test_file(self) -> None:
        self.check_file()

    def test_fileWithoutExchange(self) -> None:
        self.without_exchange()
        self.check_file()

    def check_directory(self) -> None:
        os.mkdir(self.path)
        with open(os.path.join(self.path, "inside"), "w") as f:
            f.write("another's")
        [taken] = self.take()
        [aside] = self.leftover()
        self.assertEqual(
            taken,
            Taken(
                self.path, "a directory", os.geteuid(), os.path.join(self.rundir, aside)
            ),
        )
        self.assertTrue(aside.startswith(ASIDE_PREFIX))
        self.assertEqual(os.listdir(os.path.join(self.rundir, aside)), ["inside"])

    def test_directory(self) -> None:
        self.check_directory()

    def test_directoryWithoutExchange(self) -> None:
        self.without_exchange()
        self.check_directory()

    def test_emptyDirectory(self) -> None:
        """Empty: removed, nothing kept."""
        os.mkdir(self.path)
        self.assertEqual(
            self.take(), [Taken(self.path, "a directory", os.geteuid(), None)]
        )
        self.assertEqual(self.leftover(), [])

    def test_symlinkNotFollowed(self) -> None:
        target = os.path.join(self.private, "target")
        with open(target, "w") as f:
            f.write("kept")
        os.symlink(target, self.path)
        [taken] = self.take()
        self.assertEqual(taken.kind, "a symbolic link")
        self.assertEqual(read_text(target), "kept")

    def test_ownStaleSocketSilently(self) -> None:
        """ipcd's user's socket (a dead ipcd's): replaced without a word."""
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(self.path)
        stale.close()
        self.assertEqual(self.take(), [])
        self.assertEqual(self.leftover(), [])

    def test_takeOutLeavesOwnSockets(self) -> None:
        """L{take_out}: ipcd's user's socket is L{ipcd.names}' to judge."""
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(self.path)
        stale.close()
        self.assertEqual(take_out(self.parent, "ipc", self.path), [])
        self.assertTrue(stat.S_ISSOCK(os.lstat(self.path).st_mode))


class SweepTests(SynchronousTestCase):
    """L{sweep_aside}: what stays beside, and what goes."""

    def test_sweep(self) -> None:
        rundir = short_rundir(self, "ipcd-ps-")
        kept = os.path.join(rundir, ASIDE_PREFIX + "a")
        os.mkdir(kept)
        os.mkdir(os.path.join(kept, "inside"))
        os.mkdir(os.path.join(rundir, ASIDE_PREFIX + "b"))  # empty
        with open(os.path.join(rundir, ASIDE_PREFIX + "c"), "w"):
            pass
        litter = socket.socket(socket.AF_UNIX)  # a killed ipcd's link
        litter.bind(os.path.join(rundir, ASIDE_PREFIX + "d"))
        litter.close()
        os.mkdir(os.path.join(rundir, "other"))
        self.assertEqual(sweep_aside(rundir), 1)
        self.assertEqual(sorted(os.listdir(rundir)), [ASIDE_PREFIX + "a", "other"])


# Starts against a member spinning on mkdir at ipcd's names.
ROUNDS = 10


class RacingMemberTests(TestCase):
    """ipcd's service tree, in this process, against a member who races."""

    def setUp(self) -> None:
        needs_root()
        self.rundir = short_rundir(self, "ipcd-pr-")
        os.chown(self.rundir, 0, NOBODY)
        os.chmod(self.rundir, 0o1770)

    def spinning(self, names: tuple[str, ...]) -> None:
        """
        User nobody makes a directory at each of C{names} again and again,
        whenever one is free, from before ipcd starts until the test ends.
        """
        told, tell = os.pipe()
        pid = os.fork()
        if pid == 0:  # the member: never back into the test runner
            try:
                os.close(told)
                os.setgroups([])
                os.setresgid(NOBODY, NOBODY, NOBODY)
                os.setresuid(NOBODY, NOBODY, NOBODY)
                paths = [os.path.join(self.rundir, name) for name in names]
                while True:
                    for path in paths:
                        try:
                            os.mkdir(path)
                        except OSError:
                            pass
                    if tell != -1 and all(map(os.path.isdir, paths)):
                        os.write(tell, b"d")
                        os.close(tell)
                        tell = -1
            finally:
                os._exit(0)
        os.close(tell)
        self.addCleanup(os.waitpid, pid, 0)
        self.addCleanup(os.kill, pid, signal.SIGKILL)
        self.addCleanup(os.close, told)
        ready = select.select([told], [], [], 3 * TIMEOUT)[0]
        self.assertEqual(ready and os.read(told, 1), b"d")

    @inlineCallbacks
    def test_neverLosesItsNames(self) -> Any:
        """
        Every start takes every name (the swap leaves no moment in which
        the name is free), and the member's empty directories do not pile
        up beside.
        """
        names = ("ipc", "ipcd-control", "pong")
        self.spinning(names)
        for _ in range(ROUNDS):
            service = IPCDService(make_config(self.rundir), reactor)
            service.privilegedStartService()
            try:
                for name in names:
                    st = os.lstat(os.path.join(self.rundir, name))
                    self.assertEqual((st.st_uid, stat.S_ISSOCK(st.st_mode)), (0, True))
            finally:
                yield service.stopService()
        beside = [n for n in os.listdir(self.rundir) if n.startswith(ASIDE_PREFIX)]
        self.assertEqual(beside, [])

    def test_withoutPrivateNames(self) -> None:
        """
        Twisted without the names placing needs: ipcd binds at its names
        themselves, after taking out what is there (a member's directory
        and FIFO, as root makes them).
        """
        self.patch(PREEXISTING_SOCKET, "present", False)
        self.patch(PREEXISTING_SOCKET, "said", True)  # no log line here
        ipc = os.path.join(self.rundir, "ipc")
        os.mkdir(ipc)
        os.mkdir(os.path.join(ipc, "inside"))
        os.lchown(ipc, NOBODY, NOBODY)
        control = os.path.join(self.rundir, "ipcd-control")
        os.mkfifo(control)
        os.lchown(control, NOBODY, NOBODY)
        said: list[str] = []
        globalLogPublisher.addObserver(observe := lambda e: said.append(e.get("taken")))
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        service = IPCDService(make_config(self.rundir), reactor)
        service.privilegedStartService()
        self.addCleanup(service.stopService)
        for path in (ipc, control):
            st = os.lstat(path)
            self.assertEqual((st.st_uid, stat.S_ISSOCK(st.st_mode)), (0, True))
        [aside] = [n for n in os.listdir(self.rundir) if n.startswith(ASIDE_PREFIX)]
        aside = os.path.join(self.rundir, aside)
        self.assertEqual(os.listdir(aside), ["inside"])
        self.assertEqual(
            [line for line in said if line],
            [
                f"{ipc} was a directory of {user(NOBODY)}, not ipcd's: moved it "
                f"to {aside} (remove it: rm -r {aside})",
                f"{control} was a FIFO of {user(NOBODY)}, not ipcd's: removed it",
            ],
        )
