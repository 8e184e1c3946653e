"""
Tests for L{ipcd.names}: service names, RUNDIR, stale sockets and listening
on C{RUNDIR/NAME}.
"""

from __future__ import annotations

import grp
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from ipcd import names
from ipcd.names import (
    OWN_NAMES,
    InvalidServiceName,
    SocketInUse,
    clear_stale_socket,
    listen_unix,
    socket_path,
    validate_service_name,
)
from ipcd.rundir import DEFAULT_RUNDIR, ensure_rundir, resolve_rundir, user_text
from ipcd.test.support import open_fds, run_python, stale_socket


def short_tempdir(case: SynchronousTestCase) -> str:
    """
    A fresh directory under /tmp, removed after the test: trial's own
    temporary paths can exceed the 108-byte AF_UNIX limit.
    """
    path = tempfile.mkdtemp(prefix="ipcd-", dir="/tmp")
    case.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path


def umask(case: SynchronousTestCase, mask: int) -> None:
    """Set the process umask for the rest of the test."""
    old = os.umask(mask)
    case.addCleanup(os.umask, old)


def mode_of(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


class ServiceNameTests(SynchronousTestCase):
    def test_good(self) -> None:
        for name in ["pong", "ipc", "tcp", "a", "nextversion-authd", "x.y_z-1", "A9"]:
            self.assertEqual(validate_service_name(name), name)

    def test_bytes(self) -> None:
        self.assertEqual(validate_service_name(b"pong"), "pong")
        self.assertIsInstance(validate_service_name(b"pong"), str)

    def test_length(self) -> None:
        """255 bytes is the longest name; 256 is refused."""
        self.assertEqual(validate_service_name("a" * 255), "a" * 255)
        error = self.assertRaises(InvalidServiceName, validate_service_name, "a" * 256)
        self.assertIn("255", str(error))

    def test_bad(self) -> None:
        for name in [
            "",
            b"",
            ".x",
            ".",
            "..",
            "../etc",
            "a/b",
            "/abs",
            "a\x00b",
            b"a\x00",
            "caf\u00e9",
            "caf\u00e9".encode(),
            b"\xff",
            "a b",
            "pong\n",
            "a;b",
            "a:b",
            "*",
        ]:
            self.assertRaises(InvalidServiceName, validate_service_name, name)

    def test_reasons(self) -> None:
        """The message says what is wrong and shows the name."""
        error = self.assertRaises(InvalidServiceName, validate_service_name, "")
        self.assertIn("empty", str(error))
        error = self.assertRaises(InvalidServiceName, validate_service_name, ".x")
        self.assertIn("'.x'", str(error))
        self.assertIn("'.'", str(error))
        error = self.assertRaises(InvalidServiceName, validate_service_name, "a/b")
        self.assertIn("'a/b'", str(error))

    def test_loneSurrogate(self) -> None:
        """
        Text that is not encodable at all is an invalid name, not a
        L{UnicodeEncodeError}.
        """
        for name in ["\ud800", "a\udfff", "\udcff"]:
            self.assertRaises(InvalidServiceName, validate_service_name, name)

    def test_isValueError(self) -> None:
        self.assertTrue(issubclass(InvalidServiceName, ValueError))

    @given(st.text(max_size=300))
    def test_anyText(self, name: str) -> None:
        """
        Any text either validates to itself or raises L{InvalidServiceName}
        (never another exception).
        """
        try:
            result = validate_service_name(name)
        except InvalidServiceName:
            return
        self.assertEqual(result, name)
        self.assertNotIn("/", result)
        self.assertFalse(result.startswith("."))

    @given(st.binary(max_size=300))
    def test_anyBytes(self, name: bytes) -> None:
        try:
            result = validate_service_name(name)
        except InvalidServiceName:
            return
        self.assertEqual(result.encode("ascii"), name)

    def test_socketPath(self) -> None:
        self.assertEqual(socket_path("/run/x", "pong"), "/run/x/pong")
        self.assertRaises(InvalidServiceName, socket_path, "/run/x", "../etc")


class RundirTests(SynchronousTestCase):
    def test_configuredWins(self) -> None:
        self.assertEqual(resolve_rundir("/conf", {"RUNDIR": "/env"}), "/conf")

    def test_environment(self) -> None:
        self.assertEqual(resolve_rundir(None, {"RUNDIR": "/env"}), "/env")

    def test_default(self) -> None:
        self.assertEqual(resolve_rundir(None, {}), "/tmp/libipc-run")
        self.assertEqual(DEFAULT_RUNDIR, "/tmp/libipc-run")

    def test_emptyMeansUnset(self) -> None:
        self.assertEqual(resolve_rundir("", {"RUNDIR": ""}), DEFAULT_RUNDIR)
        self.assertEqual(resolve_rundir("", {"RUNDIR": "/env"}), "/env")

    def test_processEnvironment(self) -> None:
        """Without an injected mapping, C{os.environ} is read."""
        old = os.environ.get("RUNDIR")
        os.environ["RUNDIR"] = "/from-os-environ"
        self.addCleanup(
            lambda: (
                os.environ.pop("RUNDIR", None)
                if old is None
                else os.environ.__setitem__("RUNDIR", old)
            )
        )
        self.assertEqual(resolve_rundir(), "/from-os-environ")

    def test_ensureCreates1770(self) -> None:
        for mask in (0o022, 0o077, 0o000):
            umask(self, mask)
            base = short_tempdir(self)
            rundir = os.path.join(base, "a", "run")
            ensure_rundir(rundir)
            self.assertTrue(os.path.isdir(rundir))
            self.assertEqual(mode_of(rundir), 0o1770, f"umask {mask:03o}")

    def test_ensureLeavesExisting(self) -> None:
        """An existing directory is the admin's: its mode is not changed."""
        rundir = short_tempdir(self)
        os.chmod(rundir, 0o755)
        ensure_rundir(rundir)
        self.assertEqual(mode_of(rundir), 0o755)


class StaleSocketTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.rundir = short_tempdir(self)
        self.path = os.path.join(self.rundir, "pong")

    def bound(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.bind(self.path)
        return sock

    def test_missing(self) -> None:
        clear_stale_socket(self.path)
        self.assertFalse(os.path.lexists(self.path))

    def test_stale(self) -> None:
        """A socket file nobody listens on is removed."""
        sock = self.bound()
        sock.listen(1)
        sock.close()
        self.assertTrue(stat.S_ISSOCK(os.lstat(self.path).st_mode))
        clear_stale_socket(self.path)
        self.assertFalse(os.path.lexists(self.path))

    def test_staleNeverListened(self) -> None:
        self.bound().close()
        clear_stale_socket(self.path)
        self.assertFalse(os.path.lexists(self.path))

    def test_live(self) -> None:
        """A socket somebody accepts on is refused and left alone."""
        self.bound().listen(1)
        error = self.assertRaises(SocketInUse, clear_stale_socket, self.path)
        self.assertIn(self.path, str(error))
        self.assertTrue(os.path.lexists(self.path))

    def test_staleThroughALinkedRundir(self) -> None:
        """RUNDIR itself a symbolic link (/run/libipc -> ...): cleared as ever."""
        link = os.path.join(short_tempdir(self), "rundir")
        os.symlink(self.rundir, link)
        self.bound().close()
        clear_stale_socket(os.path.join(link, "pong"))
        self.assertFalse(os.path.lexists(self.path))

    def test_regularFile(self) -> None:
        """A regular file is refused and not removed."""
        with open(self.path, "w") as f:
            f.write("precious")
        error = self.assertRaises(SocketInUse, clear_stale_socket, self.path)
        self.assertIn(self.path, str(error))
        self.assertIn("not a socket", str(error))
        with open(self.path) as f:
            self.assertEqual(f.read(), "precious")

    def test_directory(self) -> None:
        os.mkdir(self.path)
        self.assertRaises(SocketInUse, clear_stale_socket, self.path)
        self.assertTrue(os.path.isdir(self.path))

    def test_symlink(self) -> None:
        """A symlink (even to a stale socket) is not a socket: refused."""
        target = os.path.join(self.rundir, "target")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.bind(target)
        sock.close()
        os.symlink(target, self.path)
        self.assertRaises(SocketInUse, clear_stale_socket, self.path)
        self.assertTrue(os.path.islink(self.path))
        self.assertTrue(os.path.lexists(target))

    def test_mayNotConnect(self) -> None:
        """
        A socket this process may not connect to (another user's in a
        shared RUNDIR; here mode 0000, under nobody when root): whether it
        is live cannot be told, so it is refused, saying so, and left.  It
        was a bare C{PermissionError: [Errno 13] Permission denied}, which
        C{IPCService} took for a RUNDIR that is not writable.
        """
        os.chmod(self.rundir, 0o1777)
        self.bound().close()
        os.chmod(self.path, 0)
        # Imported, then nobody (when root): modules are not readable then.
        child = run_python(_CLEAR_AS_NOBODY, self.path)
        self.assertEqual(child.stderr, "")
        self.assertEqual(
            child.stdout,
            f"SocketInUse: {self.path} is a socket of uid {os.getuid()} (mode "
            "0000) that this process may not connect to: whether another "
            "process listens on it cannot be told, so it is left there\n",
        )
        self.assertTrue(stat.S_ISSOCK(os.lstat(self.path).st_mode))


_CLEAR_AS_NOBODY = """
import os, sys
from ipcd.names import clear_stale_socket
if os.getuid() == 0:
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)
try:
    clear_stale_socket(sys.argv[1])
except Exception as e:
    print(f"{type(e).__name__}: {e}")
"""


class SquatterTests(SynchronousTestCase):
    """
    A socket of another user at ipcd's own names (RUNDIR/ipc, ipcd-control),
    bound while ipcd was down by a member of RUNDIR's group, would get every
    client's lookups and keep ipcd from starting: removed, live or not.
    """

    def setUp(self) -> None:
        if os.geteuid() != 0:
            raise SkipTest("a socket of another user takes root to make")
        self.rundir = short_tempdir(self)

    def live(self, name: str, uid: int) -> str:
        path = os.path.join(self.rundir, name)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.bind(path)
        sock.listen(1)
        os.chown(path, uid, uid, follow_symlinks=False)
        return path

    def test_ownNamesTakenBack(self) -> None:
        for name in OWN_NAMES:
            path = self.live(name, 65534)
            self.assertEqual(clear_stale_socket(path), 65534)
            self.assertFalse(os.path.lexists(path))

    def test_ownUsersLiveSocketRefused(self) -> None:
        """ipcd's own user listening there: another instance, refused."""
        path = self.live(OWN_NAMES[0], os.geteuid())
        self.assertRaises(SocketInUse, clear_stale_socket, path)
        self.assertTrue(os.path.lexists(path))

    def test_servicesAreFirstComeFirstServed(self) -> None:
        """Any other name is a service's: another user's live one is kept."""
        path = self.live("pong", 65534)
        self.assertRaises(SocketInUse, clear_stale_socket, path)
        self.assertTrue(os.path.lexists(path))


class StaleSocketRaceTests(SynchronousTestCase):
    """
    What happens on the file system while L{clear_stale_socket} probes a
    stale socket (the probe's connect is where these changes are made, so
    that they fall between the check and the removal every time).
    """

    def setUp(self) -> None:
        self.base = short_tempdir(self)
        self.rundir = os.path.join(self.base, "run")
        os.mkdir(self.rundir)
        self.path = os.path.join(self.rundir, "pong")
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(self.path)
        stale.close()
        self.stale = os.lstat(self.path).st_ino

    def during_probe(self, change: Callable[[], None]) -> None:
        """Make C{change} when clear_stale_socket's probe first connects."""
        changes = [change]

        class Probe(socket.socket):
            def connect(self, address: Any) -> None:
                while changes:
                    changes.pop()()
                super().connect(address)

        self.patch(
            names,
            "socket",
            SimpleNamespace(
                socket=Probe, AF_UNIX=socket.AF_UNIX, SOCK_STREAM=socket.SOCK_STREAM
            ),
        )

    def test_directorySwappedForALink(self) -> None:
        """
        RUNDIR renamed away and a link to another directory put in its
        place (what whoever may write to its parent can do): that
        directory's file of the same name is not removed, only the stale
        socket checked, where it now is.
        """
        elsewhere = os.path.join(self.base, "elsewhere")
        os.mkdir(elsewhere)
        precious = os.path.join(elsewhere, "pong")
        with open(precious, "w") as f:
            f.write("precious")
        moved = os.path.join(self.base, "moved")

        def swap() -> None:
            os.rename(self.rundir, moved)
            os.symlink(elsewhere, self.rundir)

        self.during_probe(swap)
        clear_stale_socket(self.path)
        with open(precious) as f:
            self.assertEqual(f.read(), "precious")
        self.assertEqual(os.listdir(moved), [])

    def test_replacedByALiveSocket(self) -> None:
        """
        The stale socket removed and a live one bound in its place (its
        service restarting meanwhile): refused, and the live one stays.
        """
        live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(live.close)

        def restart() -> None:
            os.unlink(self.path)
            live.bind(self.path)
            live.listen(1)

        self.during_probe(restart)
        error = self.assertRaises(SocketInUse, clear_stale_socket, self.path)
        self.assertEqual(
            str(error), f"{self.path} was replaced while checked; not removing it"
        )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(probe.close)
        probe.connect(self.path)  # still there, still listening

    def test_movedAndLinkedTo(self) -> None:
        """
        The stale socket moved away and a symbolic link to it put at the
        name: refused, and the link is not removed (only the socket checked
        is ever removed, never a link that leads to it).
        """
        moved = os.path.join(self.base, "moved")

        def link() -> None:
            os.rename(self.path, moved)
            os.symlink(moved, self.path)

        self.during_probe(link)
        error = self.assertRaises(SocketInUse, clear_stale_socket, self.path)
        self.assertEqual(
            str(error), f"{self.path} was replaced while checked; not removing it"
        )
        self.assertEqual(os.readlink(self.path), moved)


class DescriptorTests(SynchronousTestCase):
    """
    Each socket cleared or checked at start (every listener's) closes what
    it opened to look, whatever it finds there.
    """

    def test_noneKept(self) -> None:
        rundir = short_tempdir(self)
        stale = os.path.join(rundir, "stale")
        live = os.path.join(rundir, "live")
        own = os.path.join(rundir, OWN_NAMES[0])
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(server.close)
        server.bind(live)
        server.listen(1)
        stale_socket(stale)
        stale_socket(own)
        file = os.path.join(rundir, "file")
        open(file, "w").close()
        before = open_fds()
        self.assertIsNone(clear_stale_socket(stale))
        self.assertRaises(SocketInUse, clear_stale_socket, live)
        self.assertRaises(SocketInUse, clear_stale_socket, file)
        names.refuse_own_live(own)
        self.assertRaises(SocketInUse, names.refuse_own_live, live)
        self.assertEqual(open_fds(), before)


class ListenTests(TestCase):
    """L{listen_unix} with the real reactor."""

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.rundir = short_tempdir(self)
        self.path = os.path.join(self.rundir, "pong")
        self.factory = Factory.forProtocol(Protocol)

    def listen(self, path: str | None = None):
        port = listen_unix(self.reactor, path or self.path, self.factory)
        self.addCleanup(lambda: port.connected and port.stopListening())
        return port

    def test_mode0660(self) -> None:
        umask(self, 0o022)
        self.listen()
        self.assertTrue(stat.S_ISSOCK(os.lstat(self.path).st_mode))
        self.assertEqual(mode_of(self.path), 0o660)

    def test_mode0660RestrictiveUmask(self) -> None:
        umask(self, 0o077)
        self.listen()
        self.assertEqual(mode_of(self.path), 0o660)

    def test_umaskRestored(self) -> None:
        umask(self, 0o027)
        self.listen()
        self.assertEqual(os.umask(0o027), 0o027)

    def test_accepts(self) -> None:
        self.listen()
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(client.close)
        client.settimeout(10)
        client.connect(self.path)

    def test_portKind(self) -> None:
        """
        Only a factory that serves within accept (the broker's, with
        C{serve_at_once}) gets the fast lookup port; every other listener
        is Twisted's own UNIX port.
        """
        from ipcd.lookupport import LookupPort, PlacedPort

        plain = self.listen()
        self.assertIs(type(plain), PlacedPort)  # Twisted's, placed (ipcd.placing)
        self.factory.serve_at_once = lambda skt, close_later: None
        fast = self.listen(os.path.join(self.rundir, "ipc"))
        self.assertIsInstance(fast, LookupPort)

    def test_removedOnStop(self) -> None:
        port = self.listen()
        self.assertTrue(os.path.lexists(self.path))
        d = port.stopListening()

        def check(_: object) -> None:
            self.assertFalse(os.path.lexists(self.path))

        return d.addCallback(check) if d is not None else check(None)

    def test_secondInstanceRefused(self) -> None:
        self.listen()
        error = self.assertRaises(
            SocketInUse, listen_unix, self.reactor, self.path, self.factory
        )
        self.assertIn(self.path, str(error))
        # The first instance's socket is untouched and still answers.
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(client.close)
        client.settimeout(10)
        client.connect(self.path)

    def test_staleReplaced(self) -> None:
        old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(old.close)
        old.bind(self.path)
        old.close()
        self.listen()
        self.assertEqual(mode_of(self.path), 0o660)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(client.close)
        client.settimeout(10)
        client.connect(self.path)

    def test_groupOfOtherDigitsRefused(self) -> None:
        """
        A group given by number is ASCII digits, as chgrp takes it: other
        digits (Arabic-Indic "١٢", which int() reads as 12) name no group.
        """
        error = self.assertRaises(
            ValueError,
            listen_unix,
            self.reactor,
            self.path,
            self.factory,
            group="\u0661\u0662",
        )
        self.assertEqual(str(error), f"no such group '\u0661\u0662' for {self.path}")
        self.assertFalse(os.path.lexists(self.path))

    def test_staleReplacedBoundAtTheName(self) -> None:
        """
        Where ipcd binds at the name itself (a Twisted without what
        L{ipcd.placing} needs), a stale socket there is removed first.
        """
        from ipcd.compat.twisted import PREEXISTING_SOCKET

        self.patch(PREEXISTING_SOCKET, "present", False)
        self.patch(PREEXISTING_SOCKET, "said", True)  # no log line here
        stale_socket(self.path)
        self.listen()
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(client.close)
        client.settimeout(10)
        client.connect(self.path)

    def test_groupNeverGivenThroughALink(self) -> None:
        """
        The socket swapped for a link to another file between the bind and
        the chown (whoever may write RUNDIR can, where nothing checked it):
        that file's group is not changed, only the link's.  (Where Twisted
        lets ipcd place its sockets, L{ipcd.placing}, nobody can swap them.)
        """
        if os.geteuid() != 0:
            raise SkipTest("giving a file another group takes root")
        from ipcd.compat.twisted import PREEXISTING_SOCKET

        self.patch(PREEXISTING_SOCKET, "present", False)
        self.patch(PREEXISTING_SOCKET, "said", True)  # no log line here
        victim = os.path.join(short_tempdir(self), "shadow")
        with open(victim, "w") as f:
            f.write("secret")
        os.chmod(victim, 0o640)
        before = os.stat(victim).st_gid
        group = grp.getgrgid(next(g for g in (65534, 1, 2) if g != before)).gr_name

        def listen_then_swap(*args: Any) -> Any:
            port = listen(*args)
            os.unlink(self.path)
            os.symlink(victim, self.path)
            return port

        listen = names._listen
        self.patch(names, "_listen", listen_then_swap)
        port = listen_unix(self.reactor, self.path, self.factory, group=group)
        self.addCleanup(port.stopListening)
        self.assertEqual(os.stat(victim).st_gid, before)
        self.assertEqual(os.lstat(self.path).st_gid, grp.getgrnam(group).gr_gid)

    def test_createsRundir(self) -> None:
        umask(self, 0o022)
        path = os.path.join(self.rundir, "new", "pong")
        self.listen(path)
        self.assertEqual(mode_of(os.path.dirname(path)), 0o1770)
        self.assertTrue(stat.S_ISSOCK(os.lstat(path).st_mode))


class HardLinkedSocketTests(TestCase):
    """
    A socket of this user (ipcd's) at one of ipcd's names under another
    name too: a member's hard link to a live socket elsewhere (root's
    /run/systemd/journal/stdout, where fs.protected_hardlinks is 0; made
    here by this user, the same files), or, for a moment, a program of
    this user placing its own (L{ipcd.placing}: linked, then its private
    name removed).  Real sockets, listen_unix with the real reactor; the
    pauses are recorded, and what happens during the first is the test's.
    """

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.rundir = short_tempdir(self)
        self.path = os.path.join(self.rundir, "ipc")
        # Elsewhere on the same file system (a hard link cannot cross one).
        self.original = os.path.join(short_tempdir(self), "journal")
        self.factory = Factory.forProtocol(Protocol)
        self.paused: list[float] = []
        self.said: list[str] = []
        from twisted.logger import globalLogPublisher

        def observe(event: dict[str, Any]) -> None:
            if "taken" in event:
                self.said.append(event["taken"])

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def listening(self, path: str) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.bind(path)
        sock.listen(8)
        return sock

    def meanwhile(self, action: Callable[[], object]) -> None:
        """C{action} during refuse_own_live's first pause; pauses recorded."""
        real = names.sleep

        def pause(seconds: float) -> None:
            if not self.paused:
                action()
            self.paused.append(seconds)
            real(seconds)

        self.patch(names, "sleep", pause)

    def listen(self) -> Any:
        from ipcd.startup import close_now

        port = listen_unix(self.reactor, self.path, self.factory)
        self.addCleanup(close_now, port)
        # ipcd's socket at the name now, by its one name.
        st = os.lstat(self.path)
        self.assertEqual((stat.S_ISSOCK(st.st_mode), st.st_nlink), (True, 1))
        self.assertNotEqual(st.st_ino, os.lstat(self.original).st_ino)
        if hasattr(port, "inode"):  # placed (ipcd.placing): the one it placed
            self.assertEqual((st.st_dev, st.st_ino), port.inode)
        return port

    def assertUntouched(self, original: socket.socket) -> None:
        """The original socket: at its own path, by its one name, serving."""
        st = os.lstat(self.original)
        self.assertEqual((stat.S_ISSOCK(st.st_mode), st.st_nlink), (True, 1))
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(client.close)
        client.settimeout(10)
        client.connect(self.original)
        original.settimeout(10)
        accepted, _ = original.accept()
        accepted.close()

    def plant(self) -> socket.socket:
        """A live socket elsewhere, hard-linked at ipcd's name."""
        original = self.listening(self.original)
        os.link(self.original, self.path)
        return original

    def check_taken(self) -> None:
        original = self.plant()
        self.meanwhile(lambda: None)
        self.listen()
        self.assertEqual(
            self.said,
            [
                f"{self.path} was a socket of {user_text(os.geteuid())} with 2 "
                "names (hard links), not ipcd's: removed this name (the others "
                "stay)"
            ],
        )
        self.assertEqual(os.listdir(self.rundir), ["ipc"])
        self.assertUntouched(original)
        # Looked at again for a moment, then judged: no endless wait.
        self.assertEqual(self.paused, list(names._PLACING_PAUSES))
        self.assertLessEqual(sum(self.paused), 0.2)

    def test_liveLinkTaken(self) -> None:
        """
        Still two names after the pauses: a plant, taken out as ipcd's
        socket takes the name, said in one line; the socket it named is
        untouched, and still serves at its own path.
        """
        self.check_taken()

    def test_liveLinkTakenBoundAtTheName(self) -> None:
        """The same where ipcd binds at the name itself (no placing)."""
        from ipcd.compat.twisted import PREEXISTING_SOCKET

        self.patch(PREEXISTING_SOCKET, "present", False)
        self.patch(PREEXISTING_SOCKET, "said", True)  # no log line here
        self.check_taken()

    def test_staleLinkTakenAndSaid(self) -> None:
        """A link to a socket nobody listens on: taken out, said too."""
        stale_socket(self.original)
        os.link(self.original, self.path)
        self.listen()
        self.assertEqual(len(self.said), 1)
        self.assertIn("with 2 names (hard links)", self.said[0])
        self.assertEqual(os.lstat(self.original).st_nlink, 1)

    def test_plantRemovedMeanwhile(self) -> None:
        """
        The member removes their link during the wait: the name is free,
        ipcd's socket takes it, nothing is taken aside nor said, and the
        socket the link named (live, by its one name now) is not judged.
        """
        original = self.plant()
        self.meanwhile(lambda: os.unlink(self.path))
        self.listen()
        self.assertEqual(self.paused, [names._PLACING_PAUSES[0]])
        self.assertEqual(self.said, [])
        self.assertEqual(os.listdir(self.rundir), ["ipc"])
        self.assertUntouched(original)

    def test_linkedFileTakenAtOnce(self) -> None:
        """
        A hard link to a file of ipcd's user (root's /etc/passwd, where
        fs.protected_hardlinks is 0) at ipcd's name is no program's socket
        being placed: taken out without waiting for it to go, and the file
        it named is untouched.
        """
        with open(self.original, "w") as f:
            f.write("precious")
        os.link(self.original, self.path)
        self.meanwhile(lambda: None)
        self.listen()
        self.assertEqual(self.paused, [])
        self.assertEqual(len(self.said), 1)
        with open(self.original) as f:
            self.assertEqual(f.read(), "precious")
        self.assertEqual(os.lstat(self.original).st_nlink, 1)

    def test_placingProgramRefused(self) -> None:
        """
        A program of this user placing its live socket at the name: its
        private name goes during the wait, and the one left at ipcd's name
        is a live socket of this user, refused as ever; nothing is taken
        aside, and it serves on.
        """
        private = os.path.join(short_tempdir(self), "s")
        program = self.listening(private)
        os.link(private, self.path)
        self.meanwhile(lambda: os.unlink(private))
        error = self.assertRaises(
            SocketInUse, listen_unix, self.reactor, self.path, self.factory
        )
        self.assertEqual(str(error), f"another process is listening on {self.path}")
        self.assertEqual(self.said, [])
        self.assertEqual(os.listdir(self.rundir), ["ipc"])
        self.assertEqual(os.lstat(self.path).st_nlink, 1)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(client.close)
        client.settimeout(10)
        client.connect(self.path)
        program.settimeout(10)
        program.accept()[0].close()
