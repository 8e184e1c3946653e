"""
The broker's lookup path in process, on real sockets: what a lookup counts,
logs and reaches, before and after ipcd's sockets listen, after a reload,
and for a client whose uid the kernel did not give.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from ipcd import broker as broker_module
from ipcd import decisionlog
from ipcd.access import AccessDenied, Credentials
from ipcd.broker import _MAX_PLANS, Broker, serve_lookup
from ipcd.config import Config
from ipcd.daemons import IOutbound, Registry
from ipcd.errors import Refused
from ipcd.identity import Peer, remote_peer
from ipcd.policy import parse_grant, parse_rule
from ipcd.routes import parse_uri
from ipcd.test.support import (
    assert_no_fd_leak,
    calls_to,
    fd_baseline,
    fill_backlog,
)
from ipcd.test.test_names import short_tempdir

ALICE = Peer(
    "uid 61001",
    frozenset({"uid:61001"}),
    1,
    61001,
    Credentials(61001, 61001),
)


class RundirSockets(SynchronousTestCase):
    """A RUNDIR that others may search, and the sockets listening in it."""

    def setUp(self) -> None:
        self.rundir = short_tempdir(self)
        os.chmod(self.rundir, 0o755)
        self.sockets: list[socket.socket] = []

    def tearDown(self) -> None:
        for sock in self.sockets:
            sock.close()

    def listen(self, name: str, mode: int = 0o666) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sockets.append(sock)
        sock.bind(os.path.join(self.rundir, name))
        sock.listen()
        os.chmod(os.path.join(self.rundir, name), mode)

    def answered(self, answer: Any) -> Any:
        """The broker's C{answer}: a socket is closed after the test."""
        if isinstance(answer, socket.socket):
            self.addCleanup(answer.close)
        return answer

    def assertConnected(self, answer: Any, name: str) -> None:
        self.assertIsInstance(answer, socket.socket, repr(answer))
        self.assertEqual(answer.getpeername(), os.path.join(self.rundir, name))


class LookupPathTests(RundirSockets):
    def setUp(self) -> None:
        super().setUp()
        self.listen("svc", 0o666)
        self.broker = Broker(Config(rundir=self.rundir), reactor)
        self.addCleanup(self.broker.own_sockets_listening, False)
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def open(self, payload: bytes, client: Peer = ALICE) -> Any:
        return self.answered(self.broker.open_now(payload, client))

    def test_beforeAndWhileListening(self) -> None:
        """The same answers with RUNDIR held (listening) and not."""
        self.assertConnected(self.open(b"svc"), "svc")
        self.broker.own_sockets_listening()
        self.assertConnected(self.open(b"svc"), "svc")
        self.broker.own_sockets_listening(False)
        self.assertConnected(self.open(b"svc"), "svc")

    def test_ownSocketsAfterListening(self) -> None:
        """
        ipcd's own sockets, reached through a link, are refused while they
        listen and after (a socket made anew at their name too); nothing
        stays held once they no longer listen.
        """
        before = sorted(os.listdir("/proc/self/fd"))
        self.broker = Broker(Config(rundir=self.rundir, registry=Registry()), reactor)
        self.listen("ipc", 0o666)
        os.symlink("ipc", os.path.join(self.rundir, "alias"))
        self.broker.own_sockets_listening()
        answer = self.open(b"svc")
        self.assertConnected(answer, "svc")
        answer.close()
        self.open(b"alias").trap(Refused)
        self.broker.own_sockets_listening(False)
        # A new socket (a new inode: the old one is still open) at "ipc".
        self.listen("ipc.new", 0o666)
        os.rename(*(os.path.join(self.rundir, n) for n in ("ipc.new", "ipc")))
        self.open(b"alias").trap(Refused)
        self.open(b"svc").close()
        now = sorted(os.listdir("/proc/self/fd"))
        self.assertEqual(len(now), len(before) + 2)  # the two "ipc" sockets

    def test_otherDaemonsLookedUpAgain(self) -> None:
        """
        A daemon's socket that is not ipcd's own in-process one (not running
        here, or external) is own only while it is there: a service's
        socket once linked as one is reached again when the link goes.
        """
        other = sorted(self.broker.own_sockets.names()[2])[0]
        os.link(os.path.join(self.rundir, "svc"), os.path.join(self.rundir, other))
        self.broker.own_sockets_listening()
        self.open(b"svc").trap(Refused)
        os.unlink(os.path.join(self.rundir, other))
        self.assertConnected(self.open(b"svc"), "svc")

    def test_counted(self) -> None:
        """Each lookup counts once; a grant counts as granted."""
        self.open(b"svc")
        self.open(b"svc")
        self.assertEqual(self.broker.counters["lookups"], 2)
        self.listen("secret", 0o600)
        answer = self.open(b"secret")
        self.assertIsInstance(answer, Failure)
        answer.trap(AccessDenied)
        self.assertEqual(self.broker.counters["access denied"], 1)
        self.broker.config = Config(
            rundir=self.rundir, grants=(parse_grant("secret uid:61001"),)
        )
        self.assertConnected(self.open(b"secret"), "secret")
        self.assertEqual(self.broker.counters["granted"], 1)
        self.assertEqual(self.broker.counters["lookups"], 4)

    def test_unknownUid(self) -> None:
        """A client the kernel gave no credentials for reaches nothing itself."""
        stranger = Peer("a stranger")
        answer = self.open(b"svc", stranger)
        self.assertIsInstance(answer, Failure)
        answer.trap(AccessDenied)
        self.assertIn("the client's uid is unknown", answer.getErrorMessage())

    def test_planOncePerConfig(self) -> None:
        """
        A payload is planned once per configuration: again after a reload
        (which may redirect it), and the plans kept are bounded.
        """
        planned = calls_to(self, broker_module, "plan", lambda _c, service, _u: service)
        self.assertConnected(self.open(b"svc"), "svc")
        self.assertConnected(self.open(b"svc"), "svc")
        self.assertEqual(planned, ["svc"])
        self.listen("other", 0o666)
        self.broker.config = Config(rundir=self.rundir, redirects={"svc": "other"})
        self.assertConnected(self.open(b"svc"), "other")
        self.assertEqual(planned, ["svc", "svc"])
        self.listen("secret", 0o600)  # planned, then refused: no sockets kept
        kept = []
        for n in range(_MAX_PLANS + 1):
            self.open(b"secret;r%d unix://secret" % n).trap(AccessDenied)
            kept.append(len(self.broker._plans))
        self.assertEqual(max(kept), _MAX_PLANS)

    def test_decidedOncePerConfig(self) -> None:
        """
        The same request is decided once per configuration, and the
        decisions kept are bounded (the 257th distinct clears them).
        """
        decided = calls_to(self, broker_module, "decide", lambda *args: args)
        self.assertConnected(self.open(b"svc"), "svc")
        self.assertConnected(self.open(b"svc"), "svc")
        self.assertEqual(len(decided), 1)
        kept = []
        for n in range(_MAX_PLANS - 1):  # and "svc"'s
            self.open(b"gone%d" % n).trap(Refused)
            kept.append(len(self.broker._decisions))
        self.assertEqual(max(kept), _MAX_PLANS)
        self.open(b"gone").trap(Refused)
        self.assertEqual(len(self.broker._decisions), 1)

    def test_deniedCountedByRule(self) -> None:
        """A denial counts once, under its decision, and as refused."""
        self.broker.config = Config(
            rundir=self.rundir, rules=(parse_rule("deny local svc"),)
        )
        answer = self.open(b"svc")
        answer.trap(Refused)
        denied = [k for k in self.broker.counters if "rule 1" in k]
        self.assertEqual([self.broker.counters[k] for k in denied], [1])
        self.assertEqual(self.broker.counters["refused"], 1)
        self.broker.config = Config(rundir=self.rundir)
        before = dict(self.broker.counters)
        self.assertConnected(self.open(b"svc"), "svc")
        after = dict(self.broker.counters)
        self.assertEqual(set(after) - set(before), {"connected"})

    def test_loggedByService(self) -> None:
        """The log names the service looked up, or the start of a bad payload."""
        self.open(b"svc;svc unix://svc")
        said = [e["service"] for e in self.events if "service" in e]
        self.assertEqual(said, ["svc"])
        self.open(b"!" * 100).trap(Refused)
        said = [e["service"] for e in self.events if "service" in e]
        self.assertEqual(said[-1], "!" * 80)


class InboundHeldWalkTests(RundirSockets):
    """
    A remote peer's service is opened from RUNDIR's held directories, as a
    local client's is: one C{fstatat} per directory instead of an open, a
    C{fstat} and a close (and RUNDIR's stat, for the own-socket check, is
    that walk's); the same answers.
    """

    def setUp(self) -> None:
        super().setUp()
        self.listen("svc")
        self.listen("open")
        self.listen("root-only", 0o600)
        os.symlink("svc", os.path.join(self.rundir, "linked"))
        rules = ("allow in svc", "allow in linked", "allow in o*", "allow in r*")
        config = Config(rundir=self.rundir, rules=tuple(map(parse_rule, rules)))
        self.broker = Broker(config, reactor)
        self.broker.own_sockets_listening()
        self.addCleanup(self.broker.own_sockets_listening, False)
        self.walked = calls_to(
            self,
            broker_module,
            "open_socket",
            lambda path, *_a, **_k: os.path.basename(path),
        )

    def ask(self, name: str) -> Any:
        peer = remote_peer("192.0.2.1", 4000)
        return self.answered(self.broker._open_inbound(name, peer))

    def test_fromHeldDirectories(self) -> None:
        """
        Named exactly (no permission check) or by a glob (others'): opened
        the held way; a link, or a socket others may not reach, refused.
        """
        self.assertConnected(self.ask("svc"), "svc")
        self.assertConnected(self.ask("open"), "open")
        self.assertEqual(self.walked, [])
        self.assertIn("is a symbolic link", self.ask("linked").getErrorMessage())
        self.assertIn("permission denied", self.ask("root-only").getErrorMessage())


class InboundTargetTests(RundirSockets):
    """
    Remote peers' requests and control URIs keep their target per
    configuration once it connected, so the decision log finds the line it
    made for the same request before (it knows targets by identity).
    """

    def setUp(self) -> None:
        super().setUp()
        for name in ("svc", "other"):
            self.listen(name)
        # A glob: peers reach what others may (all here).
        self.config = Config(rundir=self.rundir, rules=(parse_rule("allow in *"),))
        self.broker = Broker(self.config, reactor)
        self.addCleanup(self.broker.own_sockets_listening, False)
        self.made = calls_to(
            self, decisionlog, "_decided_fields", lambda _r, service, *_: service
        )

    def ask(self, name: str, port: int = 1) -> Any:
        peer = remote_peer("127.0.0.1", port)
        return self.answered(self.broker._open_inbound(name, peer))

    def test_decisionLineMadeOnce(self) -> None:
        """
        A name asked again (from another port) is resolved once and its
        decision line's fields made once; after a reload, both again (it
        may be redirected).
        """
        resolved = calls_to(self, broker_module, "resolve", lambda _c, service: service)
        for port in (1, 2, 3):
            self.assertConnected(self.ask("svc", port), "svc")
        self.assertEqual((resolved, self.made), (["svc"], ["svc"]))
        self.broker.config = Config(
            rundir=self.rundir,
            rules=self.config.rules,
            redirects={"svc": "other"},
        )
        for port in (1, 2):
            self.assertConnected(self.ask("svc", port), "other")
        self.assertEqual((resolved, self.made), (["svc"] * 2, ["svc"] * 2))

    def test_decisionSharedAcrossPeers(self) -> None:
        """
        Peers of other addresses, decided alike (by the same rule), share
        one decision, so the line is made once; verdicts kept are bounded.
        """
        peers = [remote_peer(f"127.0.0.{n}", 1) for n in range(1, 6)]
        for peer in peers:
            answer = self.answered(self.broker._open_inbound("svc", peer))
            self.assertConnected(answer, "svc")
        self.assertEqual(self.made, ["svc"])
        self.patch(broker_module, "_MAX_PLANS", 3)
        rules = tuple(parse_rule(f"allow in s{n}") for n in range(4))
        self.broker.config = Config(rundir=self.rundir, rules=rules)
        kept = []
        for n in range(4):
            # Allowed, each by its own rule; not there.
            self.ask(f"s{n}").trap(Refused)
            kept.append(len(self.broker._verdicts))
        self.assertEqual(kept, [1, 2, 3, 1])

    def test_onlyWhatConnectedKept(self) -> None:
        """
        A peer's names that lead nowhere are never kept (however many);
        those that connected are, up to the plans' bound.
        """
        self.patch(broker_module, "_MAX_PLANS", 3)
        for n in range(10):
            self.ask(f"gone{n}").trap(Refused)
        self.assertEqual(self.broker._targets, {})
        for n in range(4):
            self.listen(f"s{n}")
        kept = []
        for n in range(4):
            self.assertConnected(self.ask(f"s{n}"), f"s{n}")
            kept.append(len(self.broker._targets))
        self.assertEqual(kept, [1, 2, 3, 1])
        # A kept name that no longer connects is refused as before.
        self.sockets.pop().close()
        os.unlink(os.path.join(self.rundir, "s3"))
        self.ask("s3").trap(Refused)

    def test_controlURIs(self) -> None:
        """
        A control URI asked again reaches its transport with the same
        target, its line made once; one that failed is not kept, nor one
        that connected under the configuration before a reload.
        """
        transport = HeldTransport()
        self.broker = Broker(self.config, MemoryReactorClock(), {"fake": transport})
        client = Peer("pid 1 uid 0", frozenset({"uid:0"}))
        for _ in range(2):
            answered = self.broker.open_uri(parse_uri("fake://h:1/svc"), client)
            a, b = socket.socketpair()
            self.addCleanup(b.close)
            transport.asked[-1][1].callback(a)
            self.successResultOf(answered).close()
        (first, _), (second, _) = transport.asked
        self.assertIs(first, second)
        self.assertEqual(self.made, ["svc"])
        failed = self.broker.open_uri(parse_uri("fake://h:2/svc"), client)
        transport.asked[-1][1].errback(Refused("far end refused"))
        self.failureResultOf(failed, Refused)
        self.assertEqual(len(self.broker._targets), 1)
        # Connected across a reload: kept for the configuration it began
        # under, not used under the new one.
        late = self.broker.open_uri(parse_uri("fake://h:3/svc"), client)
        self.broker.config = Config(rundir=self.rundir, rules=self.config.rules)
        a, b = socket.socketpair()
        self.addCleanup(b.close)
        transport.asked[-1][1].callback(a)
        self.successResultOf(late).close()
        self.broker.open_uri(parse_uri("fake://h:3/svc"), client)
        self.assertIsNot(transport.asked[-1][0], transport.asked[-2][0])


@implementer(IOutbound)
class HeldTransport:
    """A C{fake://} transport: each connect's target and its Deferred, held."""

    scheme = "fake"

    def __init__(self) -> None:
        self.asked: list[tuple[Any, Deferred[Any]]] = []

    def connect(self, target: Any, client: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.asked.append((target, d))
        return d


class OwnNamesTests(SynchronousTestCase):
    def test_followConfigAndTransports(self) -> None:
        """
        ipcd's own names follow a reload (a new external daemon's name is
        its at once) and the transports given (a test double's scheme).
        """
        rundir = short_tempdir(self)
        broker = Broker(Config(rundir=rundir), reactor)
        self.assertNotIn("xd", broker.own_names())
        broker.config = Config(rundir=rundir, external_daemons=("xd",))
        self.assertIn("xd", broker.own_names())
        self.assertNotIn("zz", broker.own_names())
        broker.transports["zz"] = object()  # type: ignore[assignment]
        self.assertIn("zz", broker.own_names())
        self.assertIn("xd", broker.own_names())
        self.assertNotIn("xd", broker.own_sockets.names()[1])  # in process
        broker.config = Config(rundir=rundir)
        self.assertNotIn("xd", broker.own_names())


class ServeLookupTests(SynchronousTestCase):
    def test_openNowWhenThereIsOne(self) -> None:
        """serve_lookup answers at once through open_now, else through open."""

        class Later:
            def open(self, payload: bytes, client: Peer) -> Any:
                return ("open", payload)

        class AtOnce(Later):
            def open_now(self, payload: bytes, client: Peer) -> Any:
                return ("open_now", payload)

        self.assertEqual(serve_lookup(Later(), b"x", ALICE), ("open", b"x"))
        self.assertEqual(serve_lookup(AtOnce(), b"x", ALICE), ("open_now", b"x"))


class WaitingListenerTests(TestCase):
    """
    A local service's socket, answered at once or waited for: the
    descriptor that reached the socket's path is closed in every case.
    """

    def service(self, backlog: int | None) -> tuple[Broker, str, socket.socket]:
        """A broker, and RUNDIR/svc listening with C{backlog} (None: bound only)."""
        rundir = short_tempdir(self)
        os.chmod(rundir, 0o755)
        path = os.path.join(rundir, "svc")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.bind(path)
        if backlog is None:
            sock.close()  # the file stays; nothing listens
        else:
            sock.listen(backlog)
        os.chmod(path, 0o666)
        return Broker(Config(rundir=rundir), reactor), path, sock

    @inlineCallbacks
    def test_connectedAtOnceLeavesNoFd(self) -> Any:
        """A listener with room: the socket at once, no descriptor left."""
        broker, _path, listener = self.service(8)
        before = yield fd_baseline()
        for _ in range(3):
            sock = broker.open_now(b"svc", ALICE)
            self.assertIsInstance(sock, socket.socket)
            listener.accept()[0].close()
            sock.close()
        yield assert_no_fd_leak(before)

    @inlineCallbacks
    def test_refusedAtOnceLeavesNoFd(self) -> Any:
        """A socket nobody listens on: refused at once, no descriptor left."""
        broker, _path, _dead = self.service(None)
        before = yield fd_baseline()
        for _ in range(3):
            answer = broker.open_now(b"svc", ALICE)
            self.assertIsInstance(answer, Failure)
            self.assertIn("is not running", answer.getErrorMessage())
        yield assert_no_fd_leak(before)

    @inlineCallbacks
    def test_connectWaitsForTheBacklog(self) -> Any:
        """
        A listener whose backlog is full: the socket comes once it has
        room, and no descriptor is left then.
        """
        broker, path, listener = self.service(0)
        fillers = fill_backlog(self, path)
        before = yield fd_baseline()
        answer = broker.open_now(b"svc", ALICE)
        self.assertIsInstance(answer, Deferred)
        for _ in fillers:
            listener.accept()[0].close()
        sock = yield answer
        self.assertEqual(sock.getpeername(), path)
        listener.accept()[0].close()
        sock.close()
        yield assert_no_fd_leak(before)
