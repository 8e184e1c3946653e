"""
What the policy and the logs are told about a lookup's target: its
direction, the destination's labels, and how it is written.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from ipcd.resolution import (
    LocalTarget,
    RemoteTarget,
    destination_labels,
    direction_of,
)
from ipcd.routes import RemoteURI, parse_uri


class TargetTests(SynchronousTestCase):
    def test_local(self) -> None:
        target = LocalTarget("pong", "/run/ipc/pong")
        self.assertEqual(direction_of(target), "local")
        self.assertEqual(destination_labels(target), [])
        self.assertEqual(str(target), "unix:///run/ipc/pong")

    def test_remote(self) -> None:
        target = RemoteTarget(parse_uri("tcp://db.example:5432"), "db")
        self.assertEqual(direction_of(target), "out")
        self.assertEqual(destination_labels(target), ["host:db.example", "port:5432"])
        self.assertEqual(str(target), "tcp://db.example:5432")

    def test_remoteWithoutPort(self) -> None:
        """A route that names no port: the host alone."""
        uri = RemoteURI("ws", "db.example", None, "db", "ws://db.example/db")
        target = RemoteTarget(uri, "db")
        self.assertEqual(destination_labels(target), ["host:db.example"])
