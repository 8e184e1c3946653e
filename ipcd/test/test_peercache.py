"""
L{ipcd.identity.local_peer} with a L{LabelCache}: the same L{Peer} for the
same credentials while the cache gives the same labels, and a new one, with
the new labels, as soon as it does not.
"""

from __future__ import annotations

import os
import socket

from twisted.trial.unittest import SynchronousTestCase

from ipcd.identity import LabelCache, local_peer


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
