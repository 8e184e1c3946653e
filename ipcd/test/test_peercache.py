"""
L{ipcd.identity.local_peer} with a L{LabelCache}: the same L{Peer} for the
same credentials while the cache gives the same labels, and a new one, with
the new labels, as soon as it does not; a real peer's credentials and
groups, however many.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from ipcd import identity
from ipcd.client import connect
from ipcd.identity import LabelCache, local_peer
from ipcd.test.support import TIMEOUT, make_config, short_rundir, start_ipcd
from ipcd.test.test_names import short_tempdir


class PeerCacheTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.a, self.b = socket.socketpair()
        self.addCleanup(self.a.close)
        self.addCleanup(self.b.close)
        self.group = "ops"
        self.now = 0.0
        self.cache = LabelCache(
            60.0,
            files=(),
            seconds=lambda: self.now,
            lookup=lambda uid, gid: frozenset({f"uid:{uid}", f"group:{self.group}"}),
        )

    def test_samePeer(self) -> None:
        first = local_peer(self.a, self.cache)
        self.assertIs(local_peer(self.a, self.cache), first)
        self.assertEqual(first.uid, os.getuid())
        self.assertEqual(first.pid, os.getpid())
        self.assertEqual(first.labels, {f"uid:{os.getuid()}", "group:ops"})

    def test_reload(self) -> None:
        """Labels cleared (a reload): the next Peer has the new labels."""
        first = local_peer(self.a, self.cache)
        self.group = "wheel"
        self.cache.clear()
        second = local_peer(self.a, self.cache)
        self.assertIn("group:wheel", second.labels)
        self.assertNotIn("group:ops", second.labels)
        self.assertIsNot(second, first)

    def test_maxAge(self) -> None:
        """Labels past their age: the next Peer has the new labels."""
        local_peer(self.a, self.cache)
        self.group = "wheel"
        self.now = 61.0
        self.assertIn("group:wheel", local_peer(self.a, self.cache).labels)

    def test_otherPeer(self) -> None:
        """Another connection of another process is another Peer."""
        first = local_peer(self.a, self.cache)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            path = f"/tmp/ipcd-peer-{os.getpid()}"
            listener.bind(path)
            self.addCleanup(os.unlink, path)
            listener.listen(1)
            pid = os.fork()
            if pid == 0:
                try:
                    with socket.socket(socket.AF_UNIX) as c:
                        c.connect(path)
                        c.recv(1)
                finally:
                    os._exit(0)
            conn, _ = listener.accept()
            with conn:
                other = local_peer(conn, self.cache)
                conn.send(b"x")
            os.waitpid(pid, 0)
        self.assertEqual(other.pid, pid)
        self.assertIsNot(other, first)


class PeerCredentialsTests(SynchronousTestCase):
    """
    What the kernel says of a real peer process (SO_PEERCRED, SO_PEERGROUPS):
    the credentials a grant is checked by (ipcd.access) and the labels.
    """

    def setUp(self) -> None:
        if os.geteuid() != 0:
            raise SkipTest("a peer of other groups or another user takes root")

    def peer(self, groups: list[int], uid: int | None = None) -> socket.socket:
        """A connection from a child process of C{groups} (and C{uid})."""
        where = short_tempdir(self)
        os.chmod(where, 0o755)
        path = os.path.join(where, "listener")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        listener.bind(path)
        os.chmod(path, 0o777)  # for another user too
        listener.listen(1)
        pid = os.fork()
        if pid == 0:  # the child: never back into the test runner
            try:
                os.setgroups(groups)
                if uid is not None:
                    os.setgid(uid)
                    os.setuid(uid)
                with socket.socket(socket.AF_UNIX) as c:
                    c.connect(path)
                    c.recv(1)
            finally:
                os._exit(0)
        self.addCleanup(os.waitpid, pid, 0)
        listener.settimeout(TIMEOUT)
        conn, _ = listener.accept()
        self.addCleanup(conn.close)
        self.addCleanup(conn.send, b"x")  # the child may go
        return conn

    def test_supplementaryGroups(self) -> None:
        """The peer's own groups, as they were at its connect."""
        conn = self.peer([4242, 4343])
        credentials = local_peer(conn, LabelCache(files=())).credentials
        self.assertEqual(credentials.groups, {4242, 4343})

    def test_moreGroupsThanTheFirstRead(self) -> None:
        """100 groups (more than the first read has room for): every one."""
        groups = list(range(5000, 5100))
        self.assertEqual(local_peer(self.peer(groups)).credentials.groups, set(groups))

    def test_mostGroups(self) -> None:
        """As many groups as Linux allows (NGROUPS_MAX): every one."""
        groups = list(range(100000, 100000 + os.sysconf("SC_NGROUPS_MAX")))
        self.assertEqual(local_peer(self.peer(groups)).credentials.groups, set(groups))

    def test_kernelWithoutPeerGroups(self) -> None:
        """
        A kernel without SO_PEERGROUPS (before 4.13: "protocol not
        available"): the groups the user database gives the peer's user,
        and no Peer kept, as none can be told apart by its groups.
        """
        self.patch(identity, "SO_PEERGROUPS", 9999)  # no such option
        conn = self.peer([4242])
        cache = LabelCache(files=())
        peer = local_peer(conn, cache)
        self.assertEqual(peer.credentials.groups, set(os.getgrouplist("root", 0)))
        self.assertEqual(cache.peers, {})
        unknown = self.peer([], uid=4242424)
        self.assertEqual(local_peer(unknown).credentials.groups, {4242424})

    def test_userUnknown(self) -> None:
        """
        A peer whose uid has no user (a container's, say): labelled by its
        uid and gid, without user: or group: labels.
        """
        labels = local_peer(self.peer([], uid=4242424)).labels
        self.assertEqual(labels, {"uid:4242424", "gid:4242424"})


class PeersKeptTests(SynchronousTestCase):
    """The Peers a LabelCache keeps: each given again, and bounded."""

    def peer_of(self, pid: int, cache: LabelCache) -> Any:
        raw = struct.pack("3i", pid, 1000, 1000)

        class Handle:  # a socket's face: its peer's credentials and groups
            def getsockopt(self, level: int, option: int, size: int) -> bytes:
                return raw if option == socket.SO_PEERCRED else struct.pack("I", 1000)

        return local_peer(Handle(), cache)

    def cache(self) -> LabelCache:
        return LabelCache(files=(), lookup=lambda uid, gid: frozenset({"uid:1000"}))

    def test_twoClientsEachGivenAgain(self) -> None:
        cache = self.cache()
        first, second = self.peer_of(1, cache), self.peer_of(2, cache)
        self.assertIs(self.peer_of(1, cache), first)
        self.assertIs(self.peer_of(2, cache), second)

    def test_bounded(self) -> None:
        """A client per pid, without end: the Peers kept stay bounded."""
        cache = self.cache()
        for pid in range(1, 6000):
            self.peer_of(pid, cache)
        self.assertLessEqual(len(cache.peers), 4096)


class MaxAgeTests(SynchronousTestCase):
    def test_underASecond(self) -> None:
        """label_cache_max_age 0.5: labels kept for half a second."""
        now = [0.0]
        asked = []

        def lookup(uid: int, gid: int) -> frozenset[str]:
            asked.append(uid)
            return frozenset({f"uid:{uid}"})

        cache = LabelCache(0.5, files=(), seconds=lambda: now[0], lookup=lookup)
        cache(1, 1)
        now[0] = 0.25
        cache(1, 1)
        self.assertEqual(asked, [1])
        now[0] = 0.5
        cache(1, 1)
        self.assertEqual(asked, [1, 1])


def _lookup_in_groups(rundir: str, groups: list[int]) -> bytes:
    """A lookup of pong from a child process in C{groups}: what it got."""
    told, tell = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never back into the test runner
        try:
            os.close(told)
            os.setgroups(groups)
            try:
                connect("pong", network="pong unix://pong", rundir=rundir).close()
                os.write(tell, b"served")
            except Exception as e:
                os.write(tell, str(e).encode()[:500])
        finally:
            os._exit(0)
    os.close(tell)
    try:
        return os.read(told, 1000)
    finally:
        os.close(told)
        os.waitpid(pid, 0)


class ManyGroupsTests(TestCase):
    @inlineCallbacks
    def test_clientInManyGroupsServed(self) -> Any:
        """
        A client in 100 supplementary groups (LDAP users often are) is
        served: SO_PEERGROUPS of more than 64 groups raised in Python
        ("getsockopt buflen out of range"), and every lookup of such a
        client was refused ("the client's uid is unknown").
        """
        if os.geteuid() != 0:
            raise SkipTest("a client of other groups takes root")
        rundir = short_rundir(self)
        yield start_ipcd(self, make_config(rundir))
        groups = list(range(5000, 5100))
        self.assertEqual(
            (yield deferToThread(_lookup_in_groups, rundir, groups)), b"served"
        )
