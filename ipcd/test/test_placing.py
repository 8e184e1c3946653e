"""
Tests for L{ipcd.placing} through L{ipcd.names.listen_unix}: ipcd's sockets
appear at C{RUNDIR/NAME} in one step, already listening with their mode and
group, replacing a squatter's at ipcd's own names, and leave nothing else
behind in RUNDIR.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import os
import signal
import socket
import stat
import subprocess
import threading
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from ipcd import names
from ipcd import placing as placing_module
from ipcd.compat.twisted import PLACED_START, PREEXISTING_SOCKET
from ipcd.names import (
    BROKER_NAME,
    CONTROL_NAME,
    SUN_PATH_MAX,
    SocketInUse,
    listen_unix,
)
from ipcd.placing import (
    PRIVATE_PREFIX,
    Placing,
    make_private,
    remove_abandoned,
    remove_if_same,
    still_at,
)
from ipcd.startup import close_now
from ipcd.tap import IPCDService
from ipcd.test.support import (
    TIMEOUT,
    assert_no_fd_leak,
    fd_baseline,
    left_in,
    make_config,
    needs_root,
    open_fds,
    read_only,
    run_python,
    short_rundir,
    take_descriptors,
    wait_until,
)
from ipcd.test.test_names import short_tempdir

# Starts while a squatter spins on bind: enough for the old unlink-then-bind
# to lose the name within a few (it did in every run on 2 busy cores).
ROUNDS = 40


def _squat(path: str, uid: int, gid: int) -> tuple[int, int]:
    """
    A child process of user C{uid}, group C{gid}, that binds C{path} again
    and again, so that whenever the name is free it is the child's; it
    writes a byte to the returned pipe each time.  Returns (pid, pipe).
    """
    told, tell = os.pipe()
    pid = os.fork()
    if pid:
        os.close(tell)
        return pid, told
    try:  # the child: never back into the test runner
        os.close(told)
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        held = None
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(path)
                sock.listen(1)
            except OSError:
                sock.close()
                continue
            if held is not None:
                held.close()
            held = sock
            os.write(tell, b"b")
    finally:
        os._exit(0)


def _lookup_factory() -> Factory:
    """A factory that gets the lookup port, as the broker's does."""
    factory = Factory.forProtocol(Protocol)
    factory.serve_at_once = lambda skt, close_later: None  # type: ignore[attr-defined]
    return factory


class PlacingTests(TestCase):
    """L{listen_unix} with the real reactor."""

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.rundir = short_tempdir(self)
        os.chmod(self.rundir, 0o1770)

    def listen(self, name: str, **kwargs: Any) -> Any:
        path = os.path.join(self.rundir, name)
        port = listen_unix(self.reactor, path, _lookup_factory(), **kwargs)
        self.addCleanup(lambda: port.connected and close_now(port))
        return port

    def temporaries(self) -> list[str]:
        return [name for name in left_in(self.rundir) if name.startswith(".")]

    def squatters(self) -> list[int]:
        """
        Two processes of user nobody, in RUNDIR's group, spinning on bind at
        RUNDIR/ipc and RUNDIR/ipcd-control, each holding its name already.
        """
        if os.geteuid() != 0:
            raise SkipTest("a squatter of another user takes root to start")
        nogroup = 65534
        os.chown(self.rundir, 0, nogroup)
        pids = []
        for name in (BROKER_NAME, CONTROL_NAME):
            pid, told = _squat(os.path.join(self.rundir, name), 65534, nogroup)
            pids.append(pid)
            self.addCleanup(os.waitpid, pid, 0)
            self.addCleanup(os.kill, pid, signal.SIGKILL)
            self.addCleanup(os.close, told)
            self.assertEqual(os.read(told, 1), b"b")
        return pids

    def test_unwritableNamesThePath(self) -> None:
        """
        A RUNDIR nobody may write in: the error names the socket asked
        for, never the private name it is first bound at.
        """
        read_only(self, self.rundir)
        path = os.path.join(self.rundir, "upper")
        error = self.assertRaises(CannotListenError, self.listen, "upper")
        self.assertIn(f"{path}: [Errno", str(error))
        self.assertEqual(error.socketError.filename, path)
        self.assertNotIn(PRIVATE_PREFIX, str(error))

    @inlineCallbacks
    def test_ipcdStartsAgainstSquatters(self) -> Any:
        """
        The same with ipcd's whole service tree, started and stopped again
        and again: every start succeeds, with its own names its own.
        """
        squatters = self.squatters()
        for _ in range(ROUNDS // 4):
            service = IPCDService(make_config(self.rundir), self.reactor)
            service.privilegedStartService()
            try:
                for name in (BROKER_NAME, CONTROL_NAME):
                    st = os.lstat(os.path.join(self.rundir, name))
                    self.assertEqual(st.st_uid, 0)
            finally:
                yield service.stopService()
        for pid in squatters:
            self.assertEqual(os.waitpid(pid, os.WNOHANG), (0, 0))
        self.assertEqual(self.temporaries(), [])

    def test_squatterNeverKeepsTheName(self) -> None:
        """
        Another user spinning on bind at RUNDIR/ipc and RUNDIR/ipcd-control
        (a member of a 1770 RUNDIR's group) while ipcd starts, again and
        again: each start succeeds and the names are ipcd's sockets once it
        listens.  (Removing the squatter's socket and then binding lost
        the name to it in this test.)
        """
        squatters = self.squatters()
        for _ in range(ROUNDS):
            ports = [self.listen(BROKER_NAME), self.listen(CONTROL_NAME, mode=0o600)]
            for port in ports:
                st = os.lstat(port.place)
                self.assertEqual((st.st_dev, st.st_ino), port.inode)
                self.assertEqual(st.st_uid, 0)
            for port in ports:
                close_now(port)
        for pid in squatters:  # spinning all along
            self.assertEqual(os.waitpid(pid, os.WNOHANG), (0, 0))
        self.assertEqual(self.temporaries(), [])

    def test_modeAndGroupFromTheStart(self) -> None:
        """
        Whenever the name exists it is the socket with its mode and group,
        as seen by a tight lstat loop while ipcd starts and stops, again and
        again (binding at the name then chowning it showed root's group).
        """
        group = None
        gid = os.getegid()
        if os.geteuid() == 0:
            entry = grp.getgrgid(65534)
            group, gid = entry.gr_name, entry.gr_gid
        path = os.path.join(self.rundir, CONTROL_NAME)
        seen: set[tuple[int, int]] = set()
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    continue
                seen.add((st.st_mode, st.st_gid))

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            for _ in range(ROUNDS * 5):
                close_now(self.listen(CONTROL_NAME, mode=0o600, group=group))
        finally:
            stop.set()
            watcher.join(60)
        self.assertEqual(seen - {(stat.S_IFSOCK | 0o600, gid)}, set())

    def test_nothingLeftBehind(self) -> None:
        """No temporary name in RUNDIR once listening, once stopped."""
        port = self.listen("pong")
        self.assertEqual(os.listdir(self.rundir), ["pong"])
        close_now(port)
        self.assertEqual(os.listdir(self.rundir), [])

    def test_nothingLeftAfterAFailedStart(self) -> None:
        """A start that fails after the bind leaves RUNDIR as it was."""

        class Failing(Factory):
            def doStart(self) -> None:  # noqa: N802 (Twisted's name)
                raise RuntimeError("cannot start")

        path = os.path.join(self.rundir, "pong")
        self.assertRaises(RuntimeError, listen_unix, self.reactor, path, Failing())
        self.assertEqual(os.listdir(self.rundir), [])

    def bound_meanwhile(self, name: str) -> tuple[Factory, socket.socket]:
        """
        A factory whose start (after the stale-socket check, before the
        move) has a live socket bound at C{name}: another process's.
        """
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(other.close)
        path = os.path.join(self.rundir, name)

        class Meanwhile(Factory):
            def doStart(self) -> None:  # noqa: N802 (Twisted's name)
                other.bind(path)
                other.listen(1)

        return Meanwhile.forProtocol(Protocol), other

    def test_serviceTakenMeanwhile(self) -> None:
        """
        A live socket bound at a service's name while ipcd binds: first
        come, first served; it stays, and ipcd leaves nothing behind.
        """
        factory, other = self.bound_meanwhile("pong")
        path = os.path.join(self.rundir, "pong")
        error = self.assertRaises(SocketInUse, listen_unix, self.reactor, path, factory)
        self.assertIn(path, str(error))
        self.assertEqual(os.listdir(self.rundir), ["pong"])
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(probe.close)
        probe.connect(path)
        self.assertIsNotNone(other.accept())

    @inlineCallbacks
    def test_serviceTakenOnceFree(self) -> Any:
        """
        A stale socket at a service's name when ipcd moves its own there,
        and another process binding the name the moment ipcd's check has
        removed it: refused in one line, the other's socket stays and
        serves, and ipcd keeps no port nor descriptor of that start.
        """
        path = os.path.join(self.rundir, "pong")
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(other.close)

        class StaleMeanwhile(Factory):
            def doStart(self) -> None:  # noqa: N802 (Twisted's name)
                stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                stale.bind(path)
                stale.close()

        real = names.clear_stale_socket

        def then_taken(checked: str) -> Any:
            was = os.path.lexists(checked)
            cleared = real(checked)
            if was:  # the stale one removed: the other is quicker
                other.bind(checked)
                other.listen(1)
            return cleared

        self.patch(names, "clear_stale_socket", then_taken)
        # ipcd serves another name already: Twisted's first port holds a
        # descriptor for good (reserved for accepts past the fd limit).
        self.listen("ipc")
        before = yield fd_baseline()
        error = self.assertRaises(
            SocketInUse,
            listen_unix,
            self.reactor,
            path,
            StaleMeanwhile.forProtocol(Protocol),
        )
        self.assertEqual(str(error), f"another process took {path} meanwhile")
        self.assertEqual(sorted(os.listdir(self.rundir)), ["ipc", "pong"])
        # No port of that start left to the reactor (on a descriptor closed,
        # whose number the next socket opened takes).
        readers = self.reactor.getReaders()
        self.assertEqual([r for r in readers if getattr(r, "place", 0) == path], [])
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.connect(path)
            other.accept()[0].close()
        yield assert_no_fd_leak(before)

    def test_outOfInodesAtTheMove(self) -> None:
        """
        RUNDIR's file system has no inode left when the socket, bound and
        listening, is linked at its name (tmpfs counts each link): the start
        fails in one error naming the path, with no port left to the
        reactor and nothing left in RUNDIR.
        """
        if os.geteuid() != 0:
            raise SkipTest("mounting a tmpfs takes root")
        # Three inodes: RUNDIR, the private directory, the socket bound.
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "nr_inodes=3,mode=1770", "ipcd-full"]
            + [self.rundir],
            capture_output=True,
            timeout=TIMEOUT,
        )
        if mounted.returncode != 0:
            raise SkipTest(f"cannot mount a tmpfs: {mounted.stderr!r}")
        self.addCleanup(
            subprocess.run, ["umount", self.rundir], timeout=TIMEOUT, check=True
        )
        path = os.path.join(self.rundir, "pong")
        error = self.assertRaises(CannotListenError, self.listen, "pong")
        self.assertEqual(error.socketError.errno, errno.ENOSPC)
        self.assertIn(path, str(error))
        readers = self.reactor.getReaders()
        self.assertEqual([r for r in readers if getattr(r, "place", 0) == path], [])
        self.assertEqual(os.listdir(self.rundir), [])

    def test_ownNameTakenMeanwhile(self) -> None:
        """The same at ipcd's own name: replaced by ipcd's socket."""
        factory, _other = self.bound_meanwhile(BROKER_NAME)
        path = os.path.join(self.rundir, BROKER_NAME)
        port = listen_unix(self.reactor, path, factory)
        self.addCleanup(close_now, port)
        st = os.lstat(path)
        self.assertEqual((st.st_dev, st.st_ino), port.inode)
        self.assertEqual(os.listdir(self.rundir), [BROKER_NAME])

    def test_pathTooLong(self) -> None:
        """
        A name clients could not connect to is refused, as a bind there
        was (though bound in the private directory it would listen).
        """
        path = os.path.join(self.rundir, "x" * (108 - len(self.rundir)))
        error = self.assertRaises(
            CannotListenError, listen_unix, self.reactor, path, Factory()
        )
        self.assertEqual(error.socketError.errno, errno.ENAMETOOLONG)
        self.assertEqual(os.listdir(self.rundir), [])

    def test_stopLeavesAnothersSocket(self) -> None:
        """
        Stopping removes the file only if it is still ipcd's socket, not one
        bound at the name since (by another instance, say).
        """
        port = self.listen("pong")
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(other.close)
        aside = os.path.join(self.rundir, "aside")
        other.bind(aside)
        other.listen(1)
        os.rename(aside, port.place)
        close_now(port)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(probe.close)
        probe.connect(port.place)  # the other's, still there and listening

    def test_ownNamesOnlyChecked(self) -> None:
        """
        Placing, a stale socket at ipcd's own names is left for the move to
        replace: still there while ipcd's socket starts (after the check,
        before the move), so the name is never free for another to bind.
        """
        path = os.path.join(self.rundir, BROKER_NAME)
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(path)
        stale.close()
        inode = os.lstat(path).st_ino
        seen = []

        class Looking(Factory):
            def doStart(self) -> None:  # noqa: N802 (Twisted's name)
                seen.append(os.lstat(path).st_ino)

        port = listen_unix(self.reactor, path, Looking.forProtocol(Protocol))
        self.addCleanup(close_now, port)
        self.assertEqual(seen, [inode])
        st = os.lstat(path)
        self.assertEqual((st.st_dev, st.st_ino), port.inode)

    def logged(self, name: str, factory: Factory) -> list[str]:
        """Twisted's lines while a port on C{RUNDIR/name} starts and stops."""
        seen: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            seen.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        port = listen_unix(self.reactor, os.path.join(self.rundir, name), factory)
        close_now(port)
        globalLogPublisher.removeObserver(observe)
        return seen

    def test_logNamesThePlace(self) -> None:
        """
        Twisted's lines for a placed socket's port (a service's log, where
        ipcd's own does not drop them) say where it listens, RUNDIR/NAME,
        not the private path it was bound at first (/proc/self/fd/N/NAME),
        with a lookup port and with Twisted's own.
        """
        for name, factory in (
            ("upper", Factory.forProtocol(Protocol)),
            (BROKER_NAME, _lookup_factory()),
        ):
            path = os.path.join(self.rundir, name)
            seen = self.logged(name, factory)
            self.assertIn(f"Factory starting on {path!r}", seen)
            self.assertIn(f"(UNIX Port {path} Closed)", seen)
            self.assertEqual([line for line in seen if "/proc/self" in line], [])

    @inlineCallbacks
    def test_failureNamesThePlace(self) -> Any:
        """
        A factory failing to serve a connection in accept: the traceback's
        line names the port by RUNDIR/NAME too.
        """

        def serve_at_once(skt: Any, close_later: Any) -> None:
            raise RuntimeError("no lookup today")

        factory = Factory.forProtocol(Protocol)
        factory.serve_at_once = serve_at_once  # type: ignore[attr-defined]
        path = os.path.join(self.rundir, "upper")
        seen: list[str] = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        port = listen_unix(self.reactor, path, factory)
        self.addCleanup(lambda: port.connected and close_now(port))
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(client.close)
        client.connect(path)

        def failures() -> list[str]:
            return [formatEvent(e) for e in seen if "log_failure" in e]

        [line] = yield wait_until(failures, "the failure to be logged")
        self.assertEqual(line, f"serving a connection on <Factory on {path!r}>")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_logWithoutTheNamesToSayThePlace(self) -> None:
        """
        Twisted without the names that take: placed all the same, its
        lines naming the private path.
        """
        self.patch(PLACED_START, "present", False)
        self.patch(PLACED_START, "said", True)  # no log line here
        seen = self.logged("upper", _lookup_factory())
        [line] = [line for line in seen if " starting on " in line]
        self.assertRegex(line, r"^Factory starting on '/proc/self/fd/\d+/upper'$")
        self.assertEqual(os.listdir(self.rundir), [])

    def test_withoutPrivateNames(self) -> None:
        """Twisted without them: bound at the name, as before."""
        self.patch(PREEXISTING_SOCKET, "present", False)
        self.patch(PREEXISTING_SOCKET, "said", True)  # no log line here
        self.listen("pong")
        self.assertEqual(os.listdir(self.rundir), ["pong"])


class AbandonedTests(TestCase):
    """
    L{remove_abandoned}: only what a process of this user killed while
    placing left (L{make_private}'s lock is gone with it).
    """

    def setUp(self) -> None:
        self.rundir = short_rundir(self, "ipcd-lk-")

    def test_onlyAbandoned(self) -> None:
        """
        Not one still locked (placing now), a link, or one others may enter.
        """
        parent = os.open(self.rundir, os.O_PATH | os.O_DIRECTORY)
        self.addCleanup(os.close, parent)
        busy, busy_name = make_private(parent, self.rundir)
        self.addCleanup(os.close, busy)
        left = PRIVATE_PREFIX + "1" * 16
        os.mkdir(os.path.join(self.rundir, left), 0o700)
        bound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bound.bind(os.path.join(self.rundir, left, "pong"))  # as a kill leaves it
        bound.close()
        link = PRIVATE_PREFIX + "2" * 16
        os.symlink(os.path.join(self.rundir, left), os.path.join(self.rundir, link))
        wider = PRIVATE_PREFIX + "3" * 16
        os.mkdir(os.path.join(self.rundir, wider), 0o755)
        os.chmod(os.path.join(self.rundir, wider), 0o755)
        self.assertEqual(remove_abandoned(self.rundir), [left])
        self.assertEqual(
            sorted(os.listdir(self.rundir)), sorted([busy_name, link, wider])
        )

    def test_othersLeft(self) -> None:
        """Another user's is not this process's to judge."""
        needs_root()
        theirs = os.path.join(self.rundir, PRIVATE_PREFIX + "4" * 16)
        os.mkdir(theirs, 0o700)
        os.chown(theirs, 65534, 65534)
        self.assertEqual(remove_abandoned(self.rundir), [])
        self.assertTrue(os.path.isdir(theirs))


def _fds() -> list[int]:
    return sorted(open_fds())


class PlacingStepsTests(SynchronousTestCase):
    """
    L{Placing} itself, on real files: where and how it binds, what it
    leaves (nothing, and no descriptor) when a step fails.
    """

    def setUp(self) -> None:
        self.rundir = short_tempdir(self)
        self.before = _fds()

    def placed(self, path: str) -> Placing:
        """A socket placed at C{path} (its link made: a name nobody has)."""
        with Placing(path, 0o660) as placing:
            self.assertIsInstance(placing, Placing)
            assert placing.socket is not None
            self.addCleanup(placing.socket.close)
            placing.socket.listen(1)
            placing.place(False, lambda: None)
        return placing

    def test_longestPath(self) -> None:
        """A path of SUN_PATH_MAX bytes, the longest clients can connect to."""
        name = "x" * (SUN_PATH_MAX - len(self.rundir) - 1)
        path = os.path.join(self.rundir, name)
        self.placed(path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(path)

    def test_relativePath(self) -> None:
        """A path without a directory: in the current one."""
        here = os.getcwd()
        os.chdir(self.rundir)
        self.addCleanup(os.chdir, here)
        self.placed("pong")
        self.assertEqual(os.listdir(self.rundir), ["pong"])

    def test_boundAtItsName(self) -> None:
        """
        The socket's own address is /proc/self/fd/N/NAME (what ss -x
        shows), or /proc/self/fd/N/s where that would be too long.
        """
        here = os.getcwd()
        os.chdir(self.rundir)
        self.addCleanup(os.chdir, here)
        # The private directory's descriptor: the second one free.
        first, second = os.open("/", os.O_PATH), os.open("/", os.O_PATH)
        os.close(first)
        os.close(second)
        prefix = f"/proc/self/fd/{second}/"
        fits = "f" * (SUN_PATH_MAX - len(prefix))
        for name, bound in ((fits, fits), ("g" + fits, "s")):
            placing = self.placed(name)
            assert placing.socket is not None
            self.assertEqual(placing.socket.getsockname(), prefix + bound)
            placing.socket.close()

    def test_descriptorsNotInherited(self) -> None:
        """No descriptor it holds goes to a program started meanwhile."""
        with Placing(os.path.join(self.rundir, "pong"), 0o660):
            held = set(_fds()) - set(self.before)
            self.assertEqual(len(held), 3)  # RUNDIR, its private one, the socket
            self.assertEqual([fd for fd in held if os.get_inheritable(fd)], [])

    def test_notPlacedClosed(self) -> None:
        """Left without being placed: its socket closed, nothing left behind."""
        with Placing(os.path.join(self.rundir, "pong"), 0o660) as placing:
            sock = placing.socket
            assert sock is not None
        self.assertEqual(sock.fileno(), -1)
        self.assertEqual(os.listdir(self.rundir), [])
        self.assertEqual(_fds(), self.before)

    def test_outOfDescriptors(self) -> None:
        """
        EMFILE (for real) at each step that opens one: the error names the
        path, and nothing is left behind, no descriptor kept or closed.
        """
        path = os.path.join(self.rundir, "pong")
        # 1: RUNDIR opened, not its private directory; 2: not the socket.
        for free in (1, 2):
            held = take_descriptors(self, free)
            error = self.assertRaises(OSError, Placing, path, 0o660)
            while held:
                os.close(held.pop())
            self.assertEqual((error.errno, error.filename), (errno.EMFILE, path))
            self.assertEqual(os.listdir(self.rundir), [])
            self.assertEqual(_fds(), self.before)

    def test_unexpectedError(self) -> None:
        """Any other error (a caller's wrong mode): raised, nothing left."""
        path = os.path.join(self.rundir, "pong")
        self.assertRaises(TypeError, Placing, path, "0660")
        self.assertEqual(os.listdir(self.rundir), [])
        self.assertEqual(_fds(), self.before)

    def test_ownerKept(self) -> None:
        """Its group given, its owner stays this process's user."""
        gid = os.getgroups()[0] if os.getgroups() else os.getegid()
        with Placing(os.path.join(self.rundir, "pong"), 0o660) as placing:
            assert placing.socket is not None
            self.addCleanup(placing.socket.close)
            placing.give_group(gid)
            placing.place(False, lambda: None)
        st = os.lstat(os.path.join(self.rundir, "pong"))
        self.assertEqual((st.st_uid, st.st_gid), (os.geteuid(), gid))

    def test_notRoot(self) -> None:
        """
        As a user that is not root, in a directory it may write and enter
        but not read (mode 0300): placed, with its own group given.
        """
        needs_root()
        os.chown(self.rundir, NOBODY, NOBODY)
        os.chmod(self.rundir, 0o300)
        out = run_python(_AS_NOBODY, str(NOBODY), self.rundir)
        self.assertEqual(out.returncode, 0, out.stderr)
        st = os.lstat(os.path.join(self.rundir, "pong"))
        self.assertEqual((st.st_uid, st.st_gid), (NOBODY, NOBODY))


NOBODY = 65534

# Placing as user NOBODY (argv[1]) in RUNDIR (argv[2]), its group given.
_AS_NOBODY = """
import os, sys
from ipcd.placing import Placing
uid, rundir = int(sys.argv[1]), sys.argv[2]
os.setgroups([])
os.setresgid(uid, uid, uid)
os.setresuid(uid, uid, uid)
with Placing(os.path.join(rundir, "pong"), 0o660) as placing:
    placing.give_group(uid)
    placing.socket.listen(1)
    placing.place(False, lambda: None)
"""


class MakePrivateTests(SynchronousTestCase):
    """
    L{make_private} when another process acts between its steps (a sweeper
    of abandoned directories, or someone who may write RUNDIR): each step
    of the other made, for real, where it would come.
    """

    def setUp(self) -> None:
        self.rundir = short_tempdir(self)
        self.parent = os.open(self.rundir, os.O_PATH | os.O_DIRECTORY)
        self.addCleanup(os.close, self.parent)
        self.before = _fds()
        self.made: list[str] = []

    def after_mkdir(self, then: Any) -> None:
        """Call C{then(name)} right after make_private's first mkdir."""
        mkdir = os.mkdir

        def made(name: str, *args: Any, **kwargs: Any) -> None:
            mkdir(name, *args, **kwargs)
            self.made.append(name)
            if len(self.made) == 1:
                then(name)

        self.patch(placing_module.os, "mkdir", made)

    def make(self) -> str:
        opened, name = make_private(self.parent, "RUNDIR/pong")
        os.close(opened)
        return name

    def test_givesUpAfterEightTaken(self) -> None:
        """Every name it draws taken: eight tries, then an error."""
        drawn: list[None] = []

        def token_hex(size: int) -> str:
            drawn.append(None)
            return "0" * 2 * size

        self.patch(placing_module.secrets, "token_hex", token_hex)
        os.mkdir(os.path.join(self.rundir, PRIVATE_PREFIX + "0" * 16))
        error = self.assertRaises(FileExistsError, self.make)
        self.assertEqual(error.filename, "RUNDIR/pong")
        self.assertEqual(len(drawn), 8)

    def test_sweptBeforeOpened(self) -> None:
        """Removed before it is opened: made afresh."""
        self.after_mkdir(lambda name: os.rmdir(name, dir_fd=self.parent))
        name = self.make()
        self.assertEqual(self.made[1:], [name])
        self.assertEqual(_fds(), self.before)

    def test_lockedBySweeper(self) -> None:
        """Locked by a sweeper before it is locked: made afresh."""
        sweeper: list[int] = []

        def sweep(name: str) -> None:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=self.parent)
            self.addCleanup(os.close, fd)
            sweeper.append(fd)
            fcntl.flock(fd, fcntl.LOCK_EX)

        self.after_mkdir(sweep)
        name = self.make()
        self.assertEqual(self.made[1:], [name])
        self.assertEqual(_fds(), sorted(self.before + sweeper))

    def test_sweptBeforeLocked(self) -> None:
        """Removed between its opening and its lock: made afresh."""
        flock = fcntl.flock
        swept: list[None] = []

        def locked(fd: int, operation: int) -> None:
            if not swept:
                swept.append(None)
                os.rmdir(self.made[0], dir_fd=self.parent)
            flock(fd, operation)

        self.after_mkdir(lambda name: self.patch(placing_module.fcntl, "flock", locked))
        name = self.make()
        self.assertEqual(self.made[1:], [name])
        self.assertEqual(os.listdir(self.rundir), [name])
        self.assertEqual(_fds(), self.before)

    def test_replaced(self) -> None:
        """Replaced by a directory others may enter: refused, not used."""

        mkdir = os.mkdir  # before after_mkdir's

        def replace(name: str) -> None:
            os.rmdir(name, dir_fd=self.parent)
            mkdir(name, dir_fd=self.parent)
            os.chmod(os.path.join(self.rundir, name), 0o755)

        self.after_mkdir(replace)
        error = self.assertRaises(PermissionError, self.make)
        self.assertEqual(error.filename, "RUNDIR/pong")
        self.assertEqual(len(self.made), 1)
        self.assertEqual(_fds(), self.before)


class SweepTests(SynchronousTestCase):
    """
    L{remove_abandoned} touches only private directories (never through a
    link, never one others may enter), L{remove_if_same} only the file it
    placed; neither keeps a descriptor.
    """

    def setUp(self) -> None:
        self.rundir = short_tempdir(self)
        self.before = _fds()

    def at(self, name: str) -> str:
        return os.path.join(self.rundir, name)

    def test_onlyPrivateDirectories(self) -> None:
        other = self.at("other")
        os.mkdir(other, 0o700)
        with open(os.path.join(other, "kept"), "w"):
            pass
        # A link to it, a file and one others may enter, with the prefix.
        os.symlink(other, self.at(PRIVATE_PREFIX + "1" * 16))
        with open(self.at(PRIVATE_PREFIX + "2" * 16), "w"):
            pass
        os.chmod(self.at(PRIVATE_PREFIX + "2" * 16), 0o600)
        wider = self.at(PRIVATE_PREFIX + "3" * 16)
        os.mkdir(wider)
        os.chmod(wider, 0o701)
        everything = sorted(os.listdir(self.rundir))
        self.assertEqual(remove_abandoned(self.rundir), [])
        self.assertEqual(sorted(os.listdir(self.rundir)), everything)
        self.assertEqual(os.listdir(other), ["kept"])
        self.assertEqual(_fds(), self.before)

    def test_stillAtNotThroughALink(self) -> None:
        os.mkdir(self.at("private"))
        os.symlink(self.at("private"), self.at("link"))
        st = os.stat(self.at("private"))
        parent = os.open(self.rundir, os.O_PATH | os.O_DIRECTORY)
        self.addCleanup(os.close, parent)
        self.assertIs(still_at(parent, "private", st), True)
        self.assertIs(still_at(parent, "link", st), False)
        self.assertIs(still_at(parent, "gone", st), False)

    def test_removeIfSameNotThroughALink(self) -> None:
        """A link put at the name, even to the socket placed, is not removed."""
        bound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(bound.close)
        bound.bind(self.at("placed"))
        st = os.lstat(self.at("placed"))
        os.symlink(self.at("placed"), self.at("pong"))
        remove_if_same(self.at("pong"), (st.st_dev, st.st_ino))
        self.assertTrue(os.path.lexists(self.at("pong")))
        remove_if_same(self.at("placed"), (st.st_dev, st.st_ino))
        self.assertFalse(os.path.lexists(self.at("placed")))
        self.assertEqual(_fds(), sorted([*self.before, bound.fileno()]))
