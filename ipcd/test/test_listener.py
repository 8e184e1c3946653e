"""
ipcd's listeners: built without listening, listening when the tree starts,
saying where they listen and why they cannot, and the service tree's
"every listener is up" hook (L{IPCDService.when_ready}).
"""

from __future__ import annotations

import errno
import grp
import os
import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from ipcd.daemons import StartupError
from ipcd.listener import EndpointListener, Outcome
from ipcd.services import IPCService
from ipcd.tap import IPCDService
from ipcd.test.support import (
    left_in,
    make_config,
    needs_root,
    run_python,
    short_rundir,
)

FACTORY = Factory.forProtocol(Protocol)


class HeldEndpoint:
    """An endpoint whose listen() answers when the test says."""

    def __init__(self) -> None:
        self.listens: list[Deferred[Any]] = []

    def listen(self, factory: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.listens.append(d)
        return d


def local_endpoint() -> TCP4ServerEndpoint:
    return TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")


def taken_port(case: TestCase) -> int:
    """A port on 127.0.0.1 that a socket of this test holds."""
    held = socket.socket()
    case.addCleanup(held.close)
    held.bind(("127.0.0.1", 0))
    held.listen(1)
    return held.getsockname()[1]


def readies(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The "ipcd: ready" lines among C{events}."""
    return [e for e in events if e.get("log_format", "").startswith("ipcd: ready")]


class OutcomeTests(TestCase):
    def test_everyWaiterGetsTheOneResult(self) -> None:
        outcome: Outcome[int] = Outcome()
        before = outcome.wait()
        outcome.settle(1)
        outcome.settle(2)  # later results are ignored
        self.assertEqual(self.successResultOf(before), 1)
        self.assertEqual(self.successResultOf(outcome.wait()), 1)


class EndpointListenerTests(TestCase):
    def test_builtWithoutListening(self) -> None:
        """Building a listener opens nothing; starting it listens."""
        endpoint = HeldEndpoint()
        listener = EndpointListener(endpoint, FACTORY)
        self.assertEqual(endpoint.listens, [])
        listener.startService()
        self.assertEqual(len(endpoint.listens), 1)

    @inlineCallbacks
    def test_listenGivesThePort(self) -> Any:
        listener = EndpointListener(local_endpoint(), FACTORY)
        waiting = listener.listening()
        port = yield listener.listen()
        self.addCleanup(listener.stopService)
        self.assertIs(listener.port, port)
        self.assertIs((yield waiting), port)
        self.assertIs((yield listener.listening()), port)
        self.assertIs((yield listener.listen()), port)  # once: the same port

    def test_failureIsListensResult(self) -> None:
        """Whoever starts it through listen() learns why it cannot listen."""
        port = taken_port(self)
        endpoint = TCP4ServerEndpoint(reactor, port, interface="127.0.0.1")
        listener = EndpointListener(endpoint, FACTORY)
        failure = self.failureResultOf(listener.listen(), CannotListenError)
        self.assertEqual(failure.value.socketError.errno, errno.EADDRINUSE)
        self.failureResultOf(listener.listening(), CannotListenError)
        self.assertIsNone(listener.port)

    @inlineCallbacks
    def test_stopClosesThePort(self) -> Any:
        listener = EndpointListener(local_endpoint(), FACTORY)
        listener.startService()
        port = yield listener.listening()
        address = port.getHost()
        yield listener.stopService()
        self.assertIsNone(listener.port)
        probe = socket.socket()
        self.addCleanup(probe.close)
        probe.bind((address.host, address.port))  # free again

    def test_stopWhileListeningCancels(self) -> None:
        endpoint = HeldEndpoint()
        listener = EndpointListener(endpoint, FACTORY)
        listener.startService()
        listener.stopService()
        self.assertTrue(endpoint.listens[0].called)  # cancelled


class ReadinessTests(TestCase):
    """
    The tree's hook for "ipcd serves": fired once, after every listener is
    up (what a readiness notification, systemd's say, needs).
    """

    def service(self) -> IPCDService:
        service = IPCDService(make_config(short_rundir(self)), reactor)
        self.addCleanup(lambda: service.running and service.stopService())
        return service

    def started_with_held_listener(
        self,
    ) -> tuple[IPCDService, Deferred[Any], list[dict[str, Any]]]:
        """
        ipcd started with one more listener, whose endpoint has not answered
        (the Deferred to answer it), and the events logged from then on.
        """
        service = self.service()
        endpoint = HeldEndpoint()
        EndpointListener(endpoint, FACTORY).setServiceParent(service)
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        service.startService()
        return service, endpoint.listens[0], events

    def test_builtWithoutListening(self) -> None:
        """The tree is built with nothing open; starting it listens."""
        rundir = short_rundir(self)
        config = make_config(rundir, tcpd={"listen": "tcp:0:interface=127.0.0.1"})
        service = IPCDService(config, reactor)
        self.addCleanup(lambda: service.running and service.stopService())
        self.assertEqual(os.listdir(rundir), [])
        self.assertIsNone(service.getServiceNamed("tcpd").listener.port)
        service.startService()
        self.assertTrue(all(map(os.path.exists, service.socket_paths())))
        self.assertIsNotNone(service.getServiceNamed("tcpd").listener.port)

    def test_readyOnlyOnceEveryListenerIsUp(self) -> None:
        service, answer, lines = self.started_with_held_listener()
        ready = service.when_ready()
        self.assertNoResult(ready)
        self.assertNoResult(service.when_listening())
        self.assertEqual(readies(lines), [])
        answer.callback(FakePort())
        addresses = self.successResultOf(ready)
        self.assertIn("pongd", addresses)
        self.assertEqual(len(readies(lines)), 1)

    def test_daemonOnAUnixSocketIsSaid(self) -> None:
        """
        tcpd listening on a UNIX socket (C{unix:PATH}, behind a proxy, say)
        is named where it listens, as on TCP; its C{RUNDIR/tcp}, ipcd's own
        business, is not.
        """
        rundir = short_rundir(self)
        path = os.path.join(short_rundir(self), "tcpd.sock")
        config = make_config(rundir, tcpd={"enabled": True, "listen": f"unix:{path}"})
        service = IPCDService(config, reactor)
        self.addCleanup(lambda: service.running and service.stopService())
        service.startService()
        addresses = self.successResultOf(service.when_ready())
        self.assertEqual(addresses["tcpd"], [path])

    def test_lateFailureFailsReadiness(self) -> None:
        """A listener that fails after start-up: readiness fails, one line."""
        service, answer, events = self.started_with_held_listener()
        answer.errback(
            CannotListenError("127.0.0.1", 1, OSError(errno.EADDRINUSE, "in use"))
        )
        self.failureResultOf(service.when_ready(), CannotListenError)
        said = [e for e in events if e.get("log_level") and e.get("why")]
        self.assertEqual(len(said), 1)
        self.assertIn("cannot listen on 127.0.0.1:1", said[0]["why"])

    def test_startFailureRaisesOneLine(self) -> None:
        """A listener that cannot listen at start: StartupError, nothing open."""
        service = self.service()
        port = taken_port(self)
        endpoint = TCP4ServerEndpoint(reactor, port, interface="127.0.0.1")
        EndpointListener(endpoint, FACTORY).setServiceParent(service)
        error = self.assertRaises(StartupError, service.privilegedStartService)
        self.assertIn(f"cannot listen on 127.0.0.1:{port}", str(error))
        self.assertNotIn("\n", str(error))
        for path in service.socket_paths():
            self.assertFalse(os.path.exists(path), path)


class SocketGroupTests(TestCase):
    def test_groupRefused(self) -> None:
        """
        [control] group that ipcd may not give the socket (no CAP_CHOWN, not
        a member: the kernel's EPERM, injected here as root has the
        capability): one line saying so and the way out, not "make RUNDIR
        writable", and nothing left in RUNDIR.
        """
        self.check_refused()

    def test_groupRefusedBoundAtTheName(self) -> None:
        """
        The same where ipcd binds at the name, then gives the group (a
        Twisted without what L{ipcd.placing} needs): the socket bound is
        closed and gone again.
        """
        from ipcd.compat.twisted import PREEXISTING_SOCKET

        self.patch(PREEXISTING_SOCKET, "present", False)
        self.patch(PREEXISTING_SOCKET, "said", True)  # no log line here
        self.check_refused()

    def check_refused(self) -> None:
        group = grp.getgrgid(os.getgid()).gr_name
        rundir = short_rundir(self)
        service = IPCDService(make_config(rundir, control={"group": group}), reactor)
        self.addCleanup(lambda: service.running and service.stopService())

        def refused(path: str, uid: int, gid: int, **kwargs: Any) -> None:
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), path)

        self.patch(os, "chown", refused)
        error = self.assertRaises(StartupError, service.privilegedStartService)
        path = os.path.join(rundir, "ipcd-control")
        self.assertEqual(
            str(error),
            f"cannot give {path} to group {group!r}: operation not permitted "
            f"(ipcd needs CAP_CHOWN, or to be a member of {group!r})",
        )
        self.assertEqual(left_in(rundir), [])


class FakePort:
    """A listening port's face: where it listens, and stopping."""

    def getHost(self) -> Any:  # noqa: N802 (Twisted's name)
        from twisted.internet.address import IPv4Address

        return IPv4Address("TCP", "127.0.0.1", 1)

    def stopListening(self) -> None:  # noqa: N802 (Twisted's name)
        pass


class OwnApplicationTests(TestCase):
    """
    An L{IPCService} in an application of its own (C{twistd -y upper.py}):
    twistd calls C{privilegedStartService} before its reactor runs, and a
    socket that cannot be listened on stops the start in one line, exit
    status 1 (docs/api.rst: "A failure to listen stops startup").
    """

    def test_liveSocket(self) -> None:
        rundir = short_rundir(self)
        first = IPCService("upper", FACTORY, rundir, reactor)
        first.privilegedStartService()
        self.addCleanup(first.stopService)
        second = IPCService("upper", FACTORY, rundir, reactor)
        error = self.assertRaises(SystemExit, second.privilegedStartService)
        path = os.path.join(rundir, "upper")
        self.assertEqual(
            error.code,
            f"upper: another process is listening on {path} (stop it, or use "
            "another RUNDIR)",
        )

    def test_rundirNotWritable(self) -> None:
        """
        A user who may not create its socket in RUNDIR is told which
        directory, and the way out (it said only 'permission denied').
        """
        needs_root()
        rundir = short_rundir(self)
        os.chmod(rundir, 0o755)  # root's: others may enter, not write
        code = (
            "import os, sys\n"
            "from twisted.internet import reactor\n"
            "from ipcd.daemons import default_registry\n"
            "from ipcd.services import IPCService\n"
            "from ipcd.wire import MessageFactory, MessageProtocol\n"
            "default_registry()  # read as root: the user may not read it\n"
            "os.setgroups([]); os.setgid(61002); os.setuid(61002)\n"
            "service = IPCService('upper', MessageFactory(MessageProtocol), "
            "sys.argv[1], reactor)\n"
            "try:\n"
            "    service.privilegedStartService()\n"
            "except SystemExit as e:\n"
            "    print(e.code)\n"
        )
        out = run_python(code, rundir)
        self.assertEqual(
            out.stdout,
            f"upper: cannot listen on {rundir}/upper: permission denied (make "
            f"{rundir} writable for this user, or use another RUNDIR)\n",
            out.stderr,
        )

    def test_portTaken(self) -> None:
        port = taken_port(self)
        endpoint = TCP4ServerEndpoint(reactor, port, interface="127.0.0.1")
        listener = EndpointListener(endpoint, FACTORY, f"tcp:{port}")
        error = self.assertRaises(SystemExit, listener.privilegedStartService)
        self.assertEqual(
            error.code, f"twistd: cannot listen on tcp:{port}: address already in use"
        )

    def test_protocolForFactory(self) -> None:
        """
        IPCService("upper", Upper): the class given for its factory is
        refused when the service is made, saying what to give.
        """

        class Upper(Protocol):
            pass

        error = self.assertRaises(TypeError, IPCService, "upper", Upper, "/r", reactor)
        self.assertTrue(
            str(error).startswith(
                "IPCService 'upper': expected a protocol factory "
                "(MessageFactory(Upper), say), got <class "
            ),
            str(error),
        )

    def test_listening(self) -> None:
        """One that listens starts as ever."""
        rundir = short_rundir(self)
        service = IPCService("upper", FACTORY, rundir, reactor)
        service.privilegedStartService()
        self.addCleanup(service.stopService)
        self.assertIsNotNone(service.port)
