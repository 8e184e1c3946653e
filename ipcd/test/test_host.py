"""
Tests for L{ipcd.host.IDaemonHost} (what a protocol daemon may ask of ipcd)
and L{ipcd.reactors} (the reactors ipcd's modules are typed with).
"""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

import ipcd
from ipcd import reactors
from ipcd.broker import Broker
from ipcd.config import load_config
from ipcd.daemons import Registry
from ipcd.host import IDaemonHost
from ipcd.identity import Peer
from ipcd.testing import FakeProtocolDaemon

PACKAGE = Path(ipcd.__file__).parent

# The host's own side: modules that build or hold the broker itself, and may
# read all of it.  Every other module of ipcd (the daemons, their helpers,
# the shared handshakes, a third party's daemon as the test plugin shows)
# reads only what IDaemonHost names.
# The host itself: the broker and its lookup path (split out of broker.py),
# the service tree and the control socket.
HOST_SIDE = {
    "broker.py",
    "lookup.py",
    "lookupprotocol.py",
    "ataccept.py",
    "tap.py",
    "control.py",
}


def daemon_modules() -> list[Path]:
    """ipcd's modules but the host's own side and the test modules."""
    found = [
        path
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.relative_to(PACKAGE).parts[0] != "test"
        and path.relative_to(PACKAGE).as_posix() not in HOST_SIDE
    ]
    return found + sorted((PACKAGE / "test" / "daemonplugins").glob("*.py"))


def broker_reads(source: str) -> list[tuple[int, str]]:
    """
    Each C{broker.X} in C{source}, whatever holds the broker: C{broker},
    C{self.broker}, C{self.factory.broker}, C{state.broker}: as
    C{(line, X)}.
    """
    reads = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            held = node.value
            if (isinstance(held, ast.Name) and held.id == "broker") or (
                isinstance(held, ast.Attribute) and held.attr == "broker"
            ):
                reads.append((node.lineno, node.attr))
    return reads


class DaemonHostTests(SynchronousTestCase):
    def test_brokerProvides(self) -> None:
        """ipcd's broker provides L{IDaemonHost}, every member there."""
        config = load_config(None, {"rundir": "/nonexistent"}, {})
        broker = Broker(config, MemoryReactorClock())
        self.assertTrue(verifyObject(IDaemonHost, broker))

    def test_daemonIsGivenHost(self) -> None:
        """What a daemon's outbound half is given provides L{IDaemonHost}."""
        fake = FakeProtocolDaemon()
        config = load_config(
            None, {"rundir": "/nonexistent"}, {}, registry=Registry([fake])
        )
        broker = Broker(config, MemoryReactorClock())
        who = Peer("uid 1000", frozenset({"uid:1000"}), uid=1000)
        d = broker.open(b"x;x fake://h:1/pong", who)
        [call] = fake.connects
        self.assertTrue(verifyObject(IDaemonHost, call.broker))
        call.refuse("done")
        self.failureResultOf(d)

    def test_daemonsReadOnlyTheInterface(self) -> None:
        """
        ipcd's daemons and their helpers read nothing of the broker that
        L{IDaemonHost} does not name, and every name it has is read by one
        of them: the interface says exactly what daemons use.
        """
        names = set(IDaemonHost.names(all=True))
        outside = []
        used = set()
        for path in daemon_modules():
            for line, name in broker_reads(path.read_text()):
                used.add(name)
                if name not in names:
                    where = path.relative_to(PACKAGE.parent)
                    outside.append(f"{where}:{line}: broker.{name}")
        self.assertEqual(outside, [], "read of the broker outside IDaemonHost")
        self.assertEqual(used, names)

    def test_scanFindsEveryHolder(self) -> None:
        """The scan sees the broker however a daemon holds it."""
        source = (
            "broker.config\n"
            "self.broker.reactor\n"
            "self.factory.broker.own_names()\n"
            "state.broker.transports.setdefault('x', 1)\n"
            "other.config\n"
        )
        self.assertEqual(
            broker_reads(source),
            [(1, "config"), (2, "reactor"), (3, "own_names"), (4, "transports")],
        )


class ReactorTypesTests(SynchronousTestCase):
    def test_realReactorProvidesEach(self) -> None:
        """
        The reactor ipcd runs on provides every ability each of
        L{ipcd.reactors}' names asks for.
        """
        from twisted.internet import reactor

        for name in ("IFDReactor", "IAdoptingReactor", "IHostReactor"):
            interface = getattr(reactors, name)
            for base in interface.__bases__:
                self.assertTrue(
                    base.providedBy(reactor), f"{name}: reactor lacks {base}"
                )

    def test_hostReactorServesDaemonHelpers(self) -> None:
        """
        The host's reactor (C{broker.reactor}) has every ability the relay
        engines' and the adopting helpers' reactors have: a daemon may pass
        it to them.
        """
        for narrower in (reactors.IFDReactor, reactors.IAdoptingReactor):
            for base in narrower.__bases__:
                self.assertTrue(reactors.IHostReactor.extends(base), base)
