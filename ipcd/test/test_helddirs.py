"""
L{ipcd.access.HeldDirectories}: the walk from held directories gives what
L{ipcd.access.open_socket} gives, as things are at the moment of each
lookup; a chain that no longer holds is let go, and no descriptor leaks.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from ipcd import access
from ipcd.access import (
    OTHERS,
    AccessDenied,
    Credentials,
    HeldDirectories,
    open_socket,
)
from ipcd.broker import Broker
from ipcd.config import Config
from ipcd.errors import Refused
from ipcd.test.support import (
    ACL_GROUP_OBJ,
    ACL_MASK,
    ACL_OTHER,
    ACL_USER,
    ACL_USER_OBJ,
    needs_root,
    set_acl,
)
from ipcd.test.test_names import short_tempdir

ALICE = Credentials(61001, 61001)


def _fds() -> list[str]:
    return sorted(os.listdir("/proc/self/fd"))


class HeldDirectoriesCase(SynchronousTestCase):
    """A RUNDIR with socket C{s} (mode 0666) in it, and its directories held."""

    def setUp(self) -> None:
        self.base = short_tempdir(self)
        os.chmod(self.base, 0o755)
        self.rundir = os.path.join(self.base, "run")
        os.mkdir(self.rundir, 0o755)
        self.sockets: list[socket.socket] = []
        self.inode = self.bind(os.path.join(self.rundir, "s"))
        self.before = _fds()
        self.held = HeldDirectories(self.rundir)
        self.addCleanup(self.held.close)

    def tearDown(self) -> None:
        for sock in self.sockets:
            sock.close()

    def bind(self, path: str, mode: int = 0o666) -> int:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sockets.append(sock)
        sock.bind(path)
        os.chmod(path, mode)
        return os.stat(path).st_ino

    def at(self, name: str) -> str:
        return os.path.join(self.rundir, name)

    def reaches(self, path: str, inode: int, who: Credentials = ALICE) -> None:
        """Both ways reach C{inode} at C{path}."""
        for opened in (self.held.open_socket(path, who), open_socket(path, who)):
            try:
                self.assertEqual(opened.inode[1], inode)
            finally:
                opened.close()

    def refuses(
        self, path: str, error: type[Exception], who: Credentials = ALICE
    ) -> str:
        """Both ways refuse C{path} with C{error}, saying the same."""
        held = self.assertRaises(error, self.held.open_socket, path, who)
        walked = self.assertRaises(error, open_socket, path, who)
        self.assertEqual(str(held), str(walked))
        return str(held)


class HeldDirectoriesTests(HeldDirectoriesCase):
    def test_reached(self) -> None:
        self.reaches(self.at("s"), self.inode)
        self.assertTrue(self.held.held)
        # The chain: "/", every directory down to RUNDIR.
        depth = len(self.rundir.strip("/").split("/"))
        self.assertEqual(len(_fds()), len(self.before) + depth + 1)
        self.held.close()
        self.assertEqual(_fds(), self.before)

    def test_modeChangeSeenAtOnce(self) -> None:
        """A directory above RUNDIR closed to the client: denied at once."""
        self.reaches(self.at("s"), self.inode)
        os.chmod(self.base, 0o700)
        message = self.refuses(self.at("s"), AccessDenied)
        self.assertIn("uid 61001 may not connect", message)
        os.chmod(self.base, 0o755)
        os.chmod(self.rundir, 0o750)
        self.refuses(self.at("s"), AccessDenied)
        os.chown(self.rundir, 0, 61001)
        self.reaches(self.at("s"), self.inode)
        os.chmod(self.at("s"), 0o644)
        self.refuses(self.at("s"), AccessDenied)

    def test_aclChangeSeenAtOnce(self) -> None:
        """
        A directory's ACL that refuses the client search: denied at once,
        on the held walk as on the full one, even where the ACL's absence
        was remembered (ctime tells the ACL changed); one that names the
        client lets it search a directory its mode does not.
        """
        needs_root()
        # Every ACL is remembered, however recent its ctime.
        self.patch(access, "_ACL_SETTLED", -(10**18))
        bob = Credentials(61002, 61002)
        self.reaches(self.at("s"), self.inode)
        owner, group, mask = (
            (ACL_USER_OBJ, 7, 0),
            (ACL_GROUP_OBJ, 5, 0),
            (ACL_MASK, 5, 0),
        )
        # Mode 0755, but Alice's own entry says no.
        set_acl(
            self.base, [owner, (ACL_USER, 0, ALICE.uid), group, mask, (ACL_OTHER, 5, 0)]
        )
        message = self.refuses(self.at("s"), AccessDenied)
        self.assertIn("uid 61001 may not connect", message)
        self.reaches(self.at("s"), self.inode, bob)
        # Mode 0750, and not in its group, but Alice's own entry says yes.
        set_acl(self.base, [owner, group, mask, (ACL_OTHER, 5, 0)])
        set_acl(
            self.rundir,
            [owner, (ACL_USER, 5, ALICE.uid), group, mask, (ACL_OTHER, 0, 0)],
        )
        self.reaches(self.at("s"), self.inode)
        self.refuses(self.at("s"), AccessDenied, bob)

    def test_directoryReplaced(self) -> None:
        """
        RUNDIR renamed and another put in its place: the new one is walked,
        as checked now, and the old one let go.
        """
        self.reaches(self.at("s"), self.inode)
        os.rename(self.rundir, self.rundir + ".old")
        os.mkdir(self.rundir, 0o700)
        other = self.bind(self.at("s"))
        self.refuses(self.at("s"), AccessDenied)
        os.chmod(self.rundir, 0o755)
        self.reaches(self.at("s"), other)
        self.assertTrue(self.held.held)
        self.held.close()
        new_socket = str(self.sockets[-1].fileno())
        self.assertEqual(set(_fds()), {*self.before, new_socket})

    def test_ancestorReplacedByLink(self) -> None:
        """A link in place of a directory above: followed, as the client would."""
        self.reaches(self.at("s"), self.inode)
        elsewhere = short_tempdir(self)
        os.chmod(elsewhere, 0o700)
        moved = os.path.join(elsewhere, "run")
        os.rename(self.rundir, moved)
        os.symlink(moved, self.rundir)
        self.refuses(self.at("s"), AccessDenied)
        os.chmod(elsewhere, 0o755)
        self.reaches(self.at("s"), self.inode)
        self.assertFalse(self.held.held)
        self.held.close()
        self.assertEqual(_fds(), self.before)

    def test_sameAnswers(self) -> None:
        """Missing, not a socket, a link, a subdirectory: as the walk says."""
        self.refuses(self.at("missing"), FileNotFoundError)
        with open(self.at("file"), "w"):
            pass
        self.refuses(self.at("file"), Refused)
        os.mkdir(self.at("sub"), 0o755)
        self.refuses(self.at("sub"), Refused)
        inner = self.bind(os.path.join(self.at("sub"), "t"))
        self.reaches(self.at("sub/t"), inner)
        os.symlink("s", self.at("link"))
        self.reaches(self.at("link"), self.inode)
        self.assertTrue(self.held.open_socket(self.at("link"), ALICE).via_symlink)
        os.symlink(self.at("sub"), self.at("dirlink"))
        self.reaches(self.at("dirlink/t"), inner)
        self.refuses(self.at("."), Refused)
        self.refuses(self.at(".."), Refused)

    def test_remotePeersAnswers(self) -> None:
        """
        For a remote peer (no permission check, or others'; never a link as
        the last component): as the walk says, from the held directories.
        """
        for who in (None, OTHERS):
            opened = self.held.open_socket(self.at("s"), who, follow_last_symlink=False)
            self.addCleanup(opened.close)
            self.assertEqual(opened.inode[1], self.inode)
            self.assertEqual(opened.checked, who is not None)
            # Taken the held way: RUNDIR's stat is there for the own-socket check.
            self.assertIsNotNone(self.held.take_directory_stat())
        os.symlink("s", self.at("link"))
        os.chmod(self.at("s"), 0o660)
        for path, who, error in [
            (self.at("link"), None, Refused),
            (self.at("link"), OTHERS, Refused),
            (self.at("s"), OTHERS, AccessDenied),
            (self.at("missing"), None, FileNotFoundError),
        ]:
            held = self.assertRaises(
                error, self.held.open_socket, path, who, follow_last_symlink=False
            )
            walked = self.assertRaises(
                error, open_socket, path, who, follow_last_symlink=False
            )
            self.assertEqual(str(held), str(walked))
        self.assertTrue(self.held.held)

    def test_elsewhereUncached(self) -> None:
        """A socket in another directory is walked the usual way."""
        other = self.bind(os.path.join(self.base, "t"))
        before = _fds()
        self.reaches(os.path.join(self.base, "t"), other)
        self.assertFalse(self.held.held)
        self.assertEqual(_fds(), before)

    def test_noLeakOnRefusals(self) -> None:
        self.held.hold()
        held = _fds()
        with open(self.at("file"), "w"):
            pass
        for path, error in [
            (self.at("missing"), FileNotFoundError),
            (self.at("file"), Refused),
        ]:
            self.assertRaises(error, self.held.open_socket, path, ALICE)
        os.chmod(self.at("s"), 0o600)
        self.assertRaises(AccessDenied, self.held.open_socket, self.at("s"), ALICE)
        self.assertEqual(_fds(), held)

    def test_unholdable(self) -> None:
        """A RUNDIR path through a link is never held, and still walked."""
        link = os.path.join(self.base, "link")
        os.symlink("run", link)
        held = HeldDirectories(link)
        self.addCleanup(held.close)
        opened: Any = held.open_socket(os.path.join(link, "s"), ALICE)
        opened.close()
        self.assertEqual(opened.inode[1], self.inode)
        self.assertFalse(held.held)
        self.assertEqual(_fds(), self.before)


class BrokerHoldsRundirTests(SynchronousTestCase):
    """The broker holds RUNDIR's directories while listening, and no longer."""

    def test_heldWhileListening(self) -> None:
        rundir = short_tempdir(self)
        before = _fds()
        broker = Broker(Config(rundir=rundir), None)
        self.assertEqual(_fds(), before)
        broker.own_sockets_listening()
        held = len(_fds())
        self.assertEqual(held, len(before) + len(rundir.strip("/").split("/")) + 1)
        # A reload with another RUNDIR: that one's, as many.
        other = short_tempdir(self)
        broker.config = Config(rundir=other)
        self.assertEqual(broker.own_sockets.held.directory, other)  # type: ignore[union-attr]
        self.assertEqual(len(_fds()), held)
        broker.own_sockets_listening(False)
        self.assertEqual(_fds(), before)
