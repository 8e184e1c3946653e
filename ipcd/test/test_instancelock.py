"""
One ipcd per RUNDIR (L{ipcd.instancelock}): real ipcd processes started at
the same instant, against a lock file another user planted, and again after
SIGKILL; and the lock itself, in this process, against what may be found at
its name.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import socket
import stat
import subprocess
import time

from twisted.trial.unittest import SynchronousTestCase

from ipcd.instancelock import (
    LOCK_NAME,
    InstanceLocked,
    holder_pid,
    take_instance_lock,
)
from ipcd.placing import PRIVATE_PREFIX, make_private
from ipcd.test.support import (
    TIMEOUT,
    accepts,
    left_in,
    lookup,
    needs_root,
    python_env,
    read_text,
    short_rundir,
    spawn,
)

# Rounds of two ipcds started at once: without the lock, both ran in most.
ROUNDS = 8
NOBODY = 65534
ONLY_RUNDIR = ["--no-tcp", "--no-ws", "--no-tls", "--no-udp"]
# Only ipcd's own two sockets, both moved in with rename(2) (pongd's is
# linked, first come, first served): without the lock, both ipcds run.
OWN_ONLY = [*ONLY_RUNDIR, "--no-pongd"]

# An ipcd command that stops where its first socket (RUNDIR/ipc) is bound
# and listening, checked for a live socket at its name, and about to be
# moved there; says so on fd READY and goes on only when fd GO has a byte.
# Two of them without the lock both get there, and both run.
_GATED = """
import os, sys
import ipcd.placing, ipcd.scripts.ipcd

place = ipcd.placing.Placing.place
ready, go = int(sys.argv[1]), int(sys.argv[2])

def gated(self, *args):
    ipcd.placing.Placing.place = place
    os.write(ready, b"r")
    os.read(go, 1)
    return place(self, *args)

ipcd.placing.Placing.place = gated
ipcd.scripts.ipcd.main(sys.argv[3:])
"""


def locked_line(rundir: str, pid: int) -> str:
    return (
        f"ipcd: another ipcd (pid {pid}) is running on RUNDIR {rundir} (it "
        f"holds {rundir}/{LOCK_NAME}); stop it first, or use another --rundir"
    )


def as_nobody() -> None:
    """In a forked child: become user and group nobody for good."""
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)


class TwoAtOnceTests(SynchronousTestCase):
    """Real ipcd commands on one RUNDIR."""

    def setUp(self) -> None:
        self.rundir = short_rundir(self, "ipcd-lk-")
        os.chmod(self.rundir, 0o1770)
        self.work = short_rundir(self, "ipcd-lkw-")

    def start(self, name: str, **popen: object) -> subprocess.Popen[bytes]:
        args = ["-m", "ipcd.scripts.ipcd", "--rundir", self.rundir, *ONLY_RUNDIR]
        log = os.path.join(self.work, name)
        return spawn(self, args, log, python_env(), self.work, **popen)

    def serving(
        self, process: subprocess.Popen[bytes], log: str, name: bytes = b"pong"
    ) -> None:
        """Wait (bounded) until C{process} serves lookups on RUNDIR/ipc."""
        deadline = time.monotonic() + 3 * TIMEOUT
        while not accepts(os.path.join(self.rundir, "ipcd-control")):
            if process.poll() is not None:
                self.fail(f"exited with {process.returncode}:\n{read_text(log)}")
            if time.monotonic() > deadline:
                self.fail(f"not listening after {3 * TIMEOUT:g} s")
            time.sleep(0.05)
        reply = lookup(self.rundir, name)
        self.addCleanup(reply.close_fds)
        self.assertEqual((reply.data, len(reply.fds)), (b"ok", 1))

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        process.send_signal(signal.SIGTERM)
        process.wait(3 * TIMEOUT)

    def gated_pair(self, turn: int) -> list[tuple[subprocess.Popen[bytes], str]]:
        """
        Two ipcd commands started at once, let through the gate together:
        each has checked that nobody listens at RUNDIR/ipc, if it got there.
        """
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()
        try:
            started = []
            for which in "ab":
                log = os.path.join(self.work, f"{turn}{which}.log")
                args = ["-c", _GATED, str(ready_w), str(go_r)]
                args += ["--rundir", self.rundir, *OWN_ONLY]
                env = python_env()
                process = spawn(
                    self, args, log, env, self.work, pass_fds=(ready_w, go_r)
                )
                started.append((process, log))
            os.close(ready_w)
            ready_w = -1
            # Both at the gate, or one there and the other gone (the lock
            # refused it before).
            told = b""
            deadline = time.monotonic() + 3 * TIMEOUT
            while len(told) + sum(p.poll() is not None for p, _ in started) < 2:
                if time.monotonic() > deadline:
                    self.fail("the gated ipcds did not get to the gate")
                if select.select([ready_r], [], [], 0.05)[0]:
                    told += os.read(ready_r, 2)
            os.write(go_w, b"gg")
            return started
        finally:
            for fd in (ready_r, ready_w, go_r, go_w):
                if fd != -1:
                    os.close(fd)

    def test_twoAtTheSameInstant(self) -> None:
        """
        In every round exactly one serves; the other exits with status 1
        and one line naming the survivor's pid; the survivor's RUNDIR/ipc
        answers lookups.
        """
        # A library program's service, to look up.
        service = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(service.close)
        service.bind(os.path.join(self.rundir, "svc"))
        service.listen(ROUNDS)
        for turn in range(ROUNDS):
            pair = self.gated_pair(turn)
            deadline = time.monotonic() + 3 * TIMEOUT
            while all(process.poll() is None for process, _ in pair):
                if time.monotonic() > deadline:
                    logs = "\n".join(read_text(log) for _, log in pair)
                    self.fail(
                        f"turn {turn}: both still run after {3 * TIMEOUT:g} s:\n{logs}"
                    )
                time.sleep(0.02)
            (loser, lost), (survivor, log) = sorted(
                pair, key=lambda started: started[0].poll() is None
            )
            self.assertEqual(loser.wait(), 1, read_text(lost))
            # (Without the lock, the loser's socket had replaced the
            # survivor's RUNDIR/ipc, then went with it: nobody answered.)
            self.serving(survivor, log, b"svc")
            self.assertEqual(
                read_text(lost).splitlines(),
                [locked_line(self.rundir, survivor.pid)],
            )
            self.stop(survivor)
        self.assertEqual(left_in(self.rundir), ["svc"])

    def test_restartAfterSigkill(self) -> None:
        """
        Killed, ipcd's lock goes with it: the next ipcd starts.  The private
        directory a process killed while placing left (with its socket) is
        removed then; one still locked (a library program's, placing) stays.
        """
        first = self.start("first.log")
        self.serving(first, os.path.join(self.work, "first.log"))
        first.kill()
        first.wait(3 * TIMEOUT)
        # What a SIGKILL between mkdir and rmdir leaves: the directory,
        # unlocked, and the socket bound in it.
        abandoned = os.path.join(self.rundir, PRIVATE_PREFIX + "0" * 16)
        os.mkdir(abandoned, 0o700)
        bound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bound.bind(os.path.join(abandoned, "pong"))
        bound.close()
        parent = os.open(self.rundir, os.O_PATH | os.O_DIRECTORY)
        try:
            busy, busy_name = make_private(parent, self.rundir)
        finally:
            os.close(parent)
        self.addCleanup(os.close, busy)
        second = self.start("second.log")
        self.serving(second, os.path.join(self.work, "second.log"))
        self.assertFalse(os.path.lexists(abandoned))
        self.assertTrue(os.path.isdir(os.path.join(self.rundir, busy_name)))
        self.assertIn(
            f"removed 1 temporary directories a killed process left in RUNDIR: "
            f"{os.path.basename(abandoned)}",
            read_text(os.path.join(self.work, "second.log")),
        )
        self.stop(second)

    def planted_start(self, plant: str) -> None:
        """
        User nobody, a member of RUNDIR's group, puts C{plant} at the lock's
        name (and holds a lock on it, a file); ipcd starts all the same.
        """
        needs_root()
        os.chown(self.rundir, 0, NOBODY)
        target = os.path.join(self.work, "root-only")
        with open(target, "w") as f:
            f.write("root's\n")
        os.chmod(target, 0o600)
        path = os.path.join(self.rundir, LOCK_NAME)
        told, tell = os.pipe()
        hold_r, hold_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the member: never back into the test runner
            try:
                os.close(told)
                os.close(hold_w)
                as_nobody()
                if plant == "symlink":
                    os.symlink(target, path)
                elif plant == "fifo":
                    os.mkfifo(path, 0o666)
                else:
                    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
                    os.fchmod(fd, 0o666)
                    fcntl.flock(fd, fcntl.LOCK_EX)
                os.write(tell, b"p")
                os.read(hold_r, 1)  # held until the test ends
            finally:
                os._exit(0)
        os.close(tell)
        os.close(hold_r)

        def release() -> None:
            os.close(hold_w)
            os.waitpid(pid, 0)

        self.addCleanup(release)
        planted = select.select([told], [], [], 3 * TIMEOUT)[0] and os.read(told, 1)
        os.close(told)
        self.assertEqual(planted, b"p")
        before = os.lstat(path)
        self.assertEqual(before.st_uid, NOBODY)
        process = self.start(f"{plant}.log")
        self.serving(process, os.path.join(self.work, f"{plant}.log"))
        now = os.lstat(path)
        self.assertNotEqual(now.st_ino, before.st_ino)
        self.assertEqual((now.st_uid, stat.S_IMODE(now.st_mode)), (0, 0o600))
        self.assertTrue(stat.S_ISREG(now.st_mode))
        # The link's target was neither written nor given away.
        self.assertEqual(read_text(target), "root's\n")
        self.assertEqual(stat.S_IMODE(os.stat(target).st_mode), 0o600)
        # And that lock is ipcd's now: a second ipcd is told so.
        second = self.start(f"{plant}-second.log")
        self.assertEqual(second.wait(3 * TIMEOUT), 1)
        self.assertEqual(
            read_text(os.path.join(self.work, f"{plant}-second.log")).splitlines(),
            [locked_line(self.rundir, process.pid)],
        )
        self.stop(process)

    def test_plantedLockedFile(self) -> None:
        self.planted_start("file")

    def test_plantedSymlink(self) -> None:
        self.planted_start("symlink")

    def test_plantedFifo(self) -> None:
        self.planted_start("fifo")


class LockTests(SynchronousTestCase):
    """L{take_instance_lock} in this process."""

    def setUp(self) -> None:
        self.rundir = short_rundir(self, "ipcd-lk-")
        self.path = os.path.join(self.rundir, LOCK_NAME)

    def take(self) -> int:
        lock = take_instance_lock(self.rundir)
        self.addCleanup(lock.release)
        return lock.fd

    def test_heldOnce(self) -> None:
        """
        Held, it is refused to anyone else (another open, even in this
        process), naming the holder's pid; released, it may be taken.
        """
        lock = take_instance_lock(self.rundir)
        error = self.assertRaises(InstanceLocked, take_instance_lock, self.rundir)
        self.assertEqual(f"ipcd: {error}", locked_line(self.rundir, os.getpid()))
        lock.release()
        self.take()

    def test_closeOnExec(self) -> None:
        """No program ipcd runs keeps the lock held after ipcd is gone."""
        fd = self.take()
        self.assertTrue(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)

    def test_fileAsMade(self) -> None:
        """The file is this user's, 0600, empty: nobody else can lock it."""
        old = os.umask(0o277)  # the mode is set, not left to it
        try:
            self.take()
        finally:
            os.umask(old)
        st = os.lstat(self.path)
        self.assertEqual(
            (st.st_uid, stat.S_IMODE(st.st_mode), st.st_size), (os.geteuid(), 0o600, 0)
        )
        self.assertEqual(left_in(self.rundir), [])

    def test_notLockFilesReplaced(self) -> None:
        """
        A file others may open, or a hard link (to any file of this user),
        is replaced, not used: the other name's file is left as it was.
        """
        with open(self.path, "w") as f:
            f.write("mine")
        os.chmod(self.path, 0o644)
        opened = os.lstat(self.path).st_ino
        fd = self.take()
        self.assertNotEqual(os.fstat(fd).st_ino, opened)
        os.unlink(self.path)
        other = os.path.join(self.rundir, "other")
        with open(other, "w") as f:
            f.write("other")
        os.chmod(other, 0o600)
        os.link(other, self.path)
        fd = self.take()
        self.assertNotEqual(os.fstat(fd).st_ino, os.lstat(other).st_ino)
        self.assertEqual(read_text(other), "other")

    def test_directory(self) -> None:
        """
        A directory at the name is swapped aside in one step (L{ipcd.planted}),
        not entered, and the lock taken; what was taken is told.
        """
        os.mkdir(self.path)
        os.mkdir(os.path.join(self.path, "inside"))
        lock = take_instance_lock(self.rundir)
        self.addCleanup(lock.release)
        [taken] = lock.taken
        self.assertEqual((taken.path, taken.kind), (self.path, "a directory"))
        self.assertTrue(stat.S_ISREG(os.lstat(self.path).st_mode))
        self.assertEqual(os.listdir(taken.aside), ["inside"])

    def test_holderGone(self) -> None:
        """No pid is named for a lock nobody holds any more."""
        fd = os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o600)
        self.addCleanup(os.close, fd)
        self.assertIsNone(holder_pid(os.fstat(fd)))
        fcntl.flock(fd, fcntl.LOCK_EX)
        self.assertEqual(holder_pid(os.fstat(fd)), os.getpid())
