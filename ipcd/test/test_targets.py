"""
What the policy and the logs are told about a lookup's target: its
direction, the destination's labels, and how it is written.
"""

from __future__ import annotations

import socket

from twisted.trial.unittest import SynchronousTestCase

from ipcd.policy import decide, parse_rule
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

    def test_zonedHost(self) -> None:
        """
        A link-local host's link, by name and by index as the kernel has
        them now, and the address alone: each a C{host:} label, so that a
        rule for one spelling is a rule for them all.
        """
        index = socket.if_nametoindex("lo")
        for zone, other in (("lo", str(index)), (str(index), "lo")):
            target = RemoteTarget(parse_uri(f"tcp://[FE80::2%{zone}]:9/x"), "x")
            self.assertEqual(
                sorted(destination_labels(target)),
                sorted(
                    [f"host:fe80::2%{zone}", f"host:fe80::2%{other}"]
                    + ["host:fe80::2", "port:9"]
                ),
            )
        # An interface there is not (now): as written, and the address.
        target = RemoteTarget(parse_uri("tcp://[fe80::2%nosuch0]/x"), "x")
        self.assertEqual(
            destination_labels(target), ["host:fe80::2%nosuch0", "host:fe80::2"]
        )

    def test_zoneCaseInRules(self) -> None:
        """
        A C{host:} rule's zone keeps its case, as the route's label does:
        Linux's interface names are case-sensitive, and a deny for
        C{[fe80::2%Eth0]} lowered to C{%eth0} let that route through.
        """
        target = RemoteTarget(parse_uri("tcp://[FE80::2%Eth0]:9/x"), "x")
        labels = destination_labels(target)
        for text in ("deny out * host:FE80::2%Eth0", "deny out * HOST:fe80::*%Eth0"):
            rule = parse_rule(text)
            self.assertEqual(rule.peer.partition("%")[2], "Eth0")
            self.assertFalse(decide([rule], "out", ["x"], labels).allowed, text)
        # The zone of one interface is not another's (eth0 is not Eth0).
        rule = parse_rule("deny out * host:fe80::2%eth0")
        self.assertTrue(decide([rule], "out", ["x"], labels).allowed)
