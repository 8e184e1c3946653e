"""
L{ipcd.owninodes}: daemons' socket inodes cached while RUNDIR is unchanged,
and looked up again as soon as it changes.
"""

from __future__ import annotations

import os
import socket

from twisted.trial.unittest import SynchronousTestCase

from ipcd.access import Credentials, HeldDirectories
from ipcd.broker import Broker
from ipcd.config import Config
from ipcd.decisionlog import Request
from ipcd.errors import Refused
from ipcd.identity import Peer
from ipcd.owninodes import RundirInodes
from ipcd.policy import Decision, Rule
from ipcd.resolution import LocalTarget
from ipcd.test.test_names import short_tempdir

# A RUNDIR modification time long settled, and "now", in nanoseconds.
OLD = 1_000_000_000_000_000_000
NOW = OLD + 10 * 10**9


class RundirInodesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.rundir = short_tempdir(self)
        self.now = NOW
        self.inodes = RundirInodes(settled=1.0, now_ns=lambda: self.now)
        self.names = frozenset({"ext", "udp"})
        self.base: set[tuple[int, int]] = {(1, 2)}
        self.sockets: list[socket.socket] = []

    def tearDown(self) -> None:
        for sock in self.sockets:
            sock.close()

    def at(self, name: str) -> str:
        return os.path.join(self.rundir, name)

    def bind(self, path: str) -> tuple[int, int]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sockets.append(sock)
        sock.bind(path)
        st = os.stat(path)
        return st.st_dev, st.st_ino

    def age(self, mtime: int = OLD) -> None:
        """Set RUNDIR's modification time (as if changed at C{mtime})."""
        os.utime(self.rundir, ns=(mtime, mtime))

    def get(self) -> set[tuple[int, int]]:
        return self.inodes(self.rundir, self.names, self.base)

    def test_lookedUp(self) -> None:
        """The sockets present, and the base; absent names are skipped."""
        ext = self.bind(self.at("ext"))
        self.assertEqual(self.get(), {(1, 2), ext})

    def test_socketAppears(self) -> None:
        """A daemon's socket bound after the cache was filled is seen at once."""
        self.age()
        self.assertEqual(self.get(), {(1, 2)})
        ext = self.bind(self.at("ext"))
        self.assertEqual(self.get(), {(1, 2), ext})

    def test_socketReplaced(self) -> None:
        """A daemon that restarts (a new inode) is seen at once."""
        old = self.bind(self.at("ext"))
        self.age()
        self.assertEqual(self.get(), {(1, 2), old})
        os.unlink(self.at("ext"))
        self.sockets.pop().close()
        new = self.bind(self.at("ext"))
        self.assertEqual(self.get(), {(1, 2), new})

    def test_cachedWhileUnchanged(self) -> None:
        """
        Unchanged (here: made to look unchanged) RUNDIR: not looked up again.
        """
        ext = self.bind(self.at("ext"))
        self.age()
        self.assertEqual(self.get(), {(1, 2), ext})
        os.unlink(self.at("ext"))
        self.age()
        self.assertEqual(self.get(), {(1, 2), ext})

    def test_recentChangeNotCached(self) -> None:
        """
        A RUNDIR changed less than C{settled} seconds ago is looked up again
        each time: a change within the same clock tick could leave its time
        unchanged.
        """
        self.now = OLD + 5 * 10**8
        self.age()
        self.assertEqual(self.get(), {(1, 2)})
        ext = self.bind(self.at("ext"))
        self.age()  # the same tick
        self.assertEqual(self.get(), {(1, 2), ext})

    def test_wholeSecondTimes(self) -> None:
        """
        On a filesystem of whole-second times (ext4 with 128-byte inodes) a
        RUNDIR changed in second S reads S; the kernel stamps a change by
        its coarse clock, up to a tick behind this one, so a change just
        after S + 1 s may still read S.  By default a RUNDIR's time is
        trusted once it is 2 s old, as an ACL's ctime is (ipcd.access).
        """
        inodes = RundirInodes(now_ns=lambda: self.now)
        self.now = OLD + 10**9 + 10**6
        self.age()
        self.assertEqual(inodes(self.rundir, self.names, self.base), {(1, 2)})
        ext = self.bind(self.at("ext"))
        self.age()  # stamped in the tick before S + 1
        self.assertEqual(inodes(self.rundir, self.names, self.base), {(1, 2), ext})
        # Two seconds on, kept.
        self.now = OLD + 2 * 10**9
        self.assertEqual(inodes(self.rundir, self.names, self.base), {(1, 2), ext})
        os.unlink(self.at("ext"))
        self.age()
        self.assertEqual(inodes(self.rundir, self.names, self.base), {(1, 2), ext})

    def test_symlinkNeverCached(self) -> None:
        """
        A name that is a link is followed each time: its target can change
        without RUNDIR changing.
        """
        elsewhere = short_tempdir(self)
        os.symlink(os.path.join(elsewhere, "ext.sock"), self.at("ext"))
        old = self.bind(os.path.join(elsewhere, "ext.sock"))
        self.age()
        self.assertEqual(self.get(), {(1, 2), old})
        os.unlink(os.path.join(elsewhere, "ext.sock"))
        new = self.bind(os.path.join(elsewhere, "ext.sock"))
        self.assertEqual(self.get(), {(1, 2), new})

    def test_newNamesOrBase(self) -> None:
        """A new configuration's names, or a new base set, are looked up."""
        ext = self.bind(self.at("ext"))
        other = self.bind(self.at("other"))
        self.age()
        self.assertEqual(self.get(), {(1, 2), ext})
        self.names = frozenset({"other"})
        self.assertEqual(self.get(), {(1, 2), other})
        self.base = {(3, 4)}
        self.assertEqual(self.get(), {(3, 4), other})

    def test_clear(self) -> None:
        ext = self.bind(self.at("ext"))
        self.age()
        self.get()
        os.unlink(self.at("ext"))
        self.age()
        self.inodes.clear()
        self.assertEqual(self.get(), {(1, 2)})
        self.assertNotIn(ext, self.get())

    def test_notKeptForgetsTheKept(self) -> None:
        """
        A lookup whose answer is not kept (RUNDIR just changed) forgets
        the one kept before: with RUNDIR's time set back to the kept one
        (by its owner, or a clock stepped back), the names are looked up.
        """
        ext = self.bind(self.at("ext"))
        self.age()
        self.assertEqual(self.get(), {(1, 2), ext})
        os.unlink(self.at("ext"))
        self.age(NOW)
        self.assertEqual(self.get(), {(1, 2)})
        self.age()
        self.assertEqual(self.get(), {(1, 2)})

    def test_changedMeanwhileNotKept(self) -> None:
        """
        A RUNDIR that changed while its names were looked up (its stat, as
        the lookup's walk took it, is not RUNDIR's now) is not kept: a
        socket bound meanwhile, then gone, is not answered from before.
        """
        self.age()
        taken = os.stat(self.rundir)
        ext = self.bind(self.at("ext"))
        self.age(OLD + 10**9)
        get = lambda: self.inodes(self.rundir, self.names, self.base, taken)  # noqa: E731
        self.assertEqual(get(), {(1, 2), ext})
        os.unlink(self.at("ext"))
        self.assertEqual(get(), {(1, 2)})

    def test_namesKeptWhileKeyed(self) -> None:
        """
        The names are keyed by their set's id: the set is kept alive while
        it is the key, so a new configuration's set never takes its id (and
        its answer).
        """
        ext = self.bind(self.at("ext"))
        other = self.bind(self.at("other"))
        self.age()
        names = frozenset({"ext"})
        self.assertEqual(self.inodes(self.rundir, names, self.base), {(1, 2), ext})
        old = id(names)
        del names
        # CPython soon gives a new set of that size the freed one's memory.
        for _ in range(1000):
            fresh = frozenset({"other"})
            if id(fresh) == old:
                break
        self.assertEqual(self.inodes(self.rundir, fresh, self.base), {(1, 2), other})

    def test_namesStayInRundir(self) -> None:
        """A name that is no service name is not looked up anywhere."""
        self.bind(os.path.join(self.rundir, "sock"))
        self.names = frozenset({"../x", "a/b"})
        self.assertEqual(self.get(), {(1, 2)})


class BrokerOwnInodesTests(SynchronousTestCase):
    """An external daemon's socket is refused under another name, at once."""

    def daemon_starts(self, event: Request) -> None:
        rundir = short_tempdir(self)
        broker = Broker(Config(rundir=rundir, external_daemons=("ext",)), None)
        self.addCleanup(broker.own_sockets_listening, False)
        ipc = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(ipc.close)
        ipc.bind(os.path.join(rundir, "ipc"))
        pong = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(pong.close)
        pong.bind(os.path.join(rundir, "pong"))
        broker.own_sockets_listening()
        os.utime(rundir, ns=(OLD, OLD))
        # The daemon is not running yet: pong is reached (and the inodes of
        # the daemons' sockets kept).
        target = LocalTarget("pong", os.path.join(rundir, "pong"))
        broker._open_local(event, target).close()
        ext = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(ext.close)
        ext.bind(os.path.join(rundir, "ext"))
        alias = os.path.join(rundir, "alias")
        os.link(os.path.join(rundir, "ext"), alias)
        error = self.assertRaises(
            Refused, broker._open_local, event, LocalTarget("alias", alias)
        )
        self.assertEqual(
            str(error), f"{alias} is ipcd's own socket, never a lookup target"
        )

    def test_remotePeer(self) -> None:
        # Let in by a rule that names it: others' permissions do not apply.
        allowed = Decision(True, Rule("allow", "in", "alias"), 1)
        self.daemon_starts(Request("in", Peer("10.0.0.1:5"), "alias", [], allowed))

    def test_localClient(self) -> None:
        """Through the held directories, which give RUNDIR's stat."""
        root = Peer("pid 1 uid 0", credentials=Credentials(0, 0))
        self.daemon_starts(Request("local", root, "alias"))


class EachOwnSocketTests(SynchronousTestCase):
    """
    Each of ipcd's own sockets is refused under another name, whichever of
    the others are missing (daemons not running, an external daemon gone).
    """

    def test_eachAloneIsRefused(self) -> None:
        rundir = short_tempdir(self)
        broker = Broker(Config(rundir=rundir, external_daemons=("ext",)), None)
        own = sorted(broker.own_sockets.names()[0])
        self.assertGreater(len(own), 2)
        root = Peer("pid 1 uid 0", credentials=Credentials(0, 0))
        event = Request("local", root, "alias")
        alias = os.path.join(rundir, "alias")
        for name in own:
            path = os.path.join(rundir, name)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(path)
            os.link(path, alias)
            try:
                self.assertRaises(
                    Refused, broker._open_local, event, LocalTarget("alias", alias)
                )
            finally:
                sock.close()
                os.unlink(alias)
                os.unlink(path)


class DirectoryStatTests(SynchronousTestCase):
    """L{HeldDirectories.take_directory_stat}: this lookup's, once."""

    def test_once(self) -> None:
        rundir = short_tempdir(self)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.bind(os.path.join(rundir, "s"))
        held = HeldDirectories(rundir)
        self.addCleanup(held.close)
        held.open_socket(os.path.join(rundir, "s"), Credentials(0, 0)).close()
        st = held.take_directory_stat()
        assert st is not None
        self.assertEqual(st.st_ino, os.stat(rundir).st_ino)
        self.assertIsNone(held.take_directory_stat())
        # A walk that failed gives none.
        held.open_socket(os.path.join(rundir, "s"), Credentials(0, 0)).close()
        self.assertRaises(
            FileNotFoundError,
            held.open_socket,
            os.path.join(rundir, "missing"),
            Credentials(0, 0),
        )
        self.assertIsNone(held.take_directory_stat())

    def test_givenStatUsed(self) -> None:
        """RundirInodes takes the stat it is given instead of its own."""
        rundir = short_tempdir(self)
        inodes = RundirInodes(now_ns=lambda: NOW)
        os.utime(rundir, ns=(OLD, OLD))
        names = frozenset({"ext"})
        base: set[tuple[int, int]] = set()
        settled = os.stat(rundir)
        self.assertEqual(inodes(rundir, names, base, settled), set())
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.bind(os.path.join(rundir, "ext"))
        # The stat as it was: the kept answer.
        self.assertEqual(inodes(rundir, names, base, settled), set())
        st = os.stat(os.path.join(rundir, "ext"))
        self.assertEqual(
            inodes(rundir, names, base, os.stat(rundir)), {(st.st_dev, st.st_ino)}
        )
