"""
The C{ipc:} endpoints on real sockets: a server endpoint listening at
C{RUNDIR/NAME}; a client endpoint connecting straight there, or through ipcd
and adopting the handed-over fd.
"""

from __future__ import annotations

import os
import stat
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Factory
from twisted.trial.unittest import TestCase

from ipcd.endpoints import IPCClientEndpoint, IPCServerEndpoint
from ipcd.handoff import HandoffError
from ipcd.services.pongd import Pong
from ipcd.test.support import (
    TIMEOUT,
    RunningIpcdTestCase,
    assert_no_fd_leak,
    fd_baseline,
    set_network,
    short_rundir,
    wait_until,
)


class EchoClient(Pong):
    """Sends one message on connect; C{answer} fires with the echo."""

    message = b"hello through ipc"

    def connectionMade(self) -> None:
        self.answer: Deferred[bytes] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self.sendMessage(self.message)

    def messageReceived(self, payload: bytes) -> None:
        self.answer.callback(payload)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


@inlineCallbacks
def round_trip(case: TestCase, endpoint: Any) -> Any:
    """Connect with L{EchoClient}, check the echo, close; the protocol back."""
    protocol = yield endpoint.connect(Factory.forProtocol(EchoClient))
    case.assertIsInstance(protocol, EchoClient)
    echo = yield protocol.answer.addTimeout(TIMEOUT, reactor)
    case.assertEqual(echo, EchoClient.message)
    protocol.transport.loseConnection()
    yield protocol.lost.addTimeout(TIMEOUT, reactor)
    return protocol


class ServerEndpointTests(TestCase):
    def setUp(self) -> None:
        self.rundir = short_rundir(self)
        self.path = os.path.join(self.rundir, "echo")
        set_network(self, None)

    @inlineCallbacks
    def test_listens0660AndRemovesOnStop(self) -> Any:
        endpoint = serverFromString(reactor, f"ipc:echo:rundir={self.rundir}")
        self.assertIsInstance(endpoint, IPCServerEndpoint)
        port = yield endpoint.listen(Factory.forProtocol(Pong))
        self.addCleanup(lambda: port.connected and port.stopListening())
        self.assertTrue(stat.S_ISSOCK(os.lstat(self.path).st_mode))
        self.assertEqual(stat.S_IMODE(os.lstat(self.path).st_mode), 0o660)
        client = clientFromString(reactor, f"ipc:echo:rundir={self.rundir}")
        yield round_trip(self, client)
        yield port.stopListening()
        self.assertFalse(os.path.lexists(self.path))

    @inlineCallbacks
    def test_mode(self) -> Any:
        endpoint = serverFromString(reactor, f"ipc:echo:rundir={self.rundir}:mode=0600")
        port = yield endpoint.listen(Factory.forProtocol(Pong))
        self.addCleanup(port.stopListening)
        self.assertEqual(stat.S_IMODE(os.lstat(self.path).st_mode), 0o600)

    @inlineCallbacks
    def test_secondListenerFails(self) -> Any:
        endpoint = serverFromString(reactor, f"ipc:echo:rundir={self.rundir}")
        port = yield endpoint.listen(Factory.forProtocol(Pong))
        self.addCleanup(port.stopListening)
        error = yield self.assertFailure(
            endpoint.listen(Factory.forProtocol(Pong)), RuntimeError
        )
        self.assertIn(self.path, str(error))


class ClientEndpointTests(RunningIpcdTestCase):
    def client(self, extra: str = "") -> Any:
        endpoint = clientFromString(reactor, f"ipc:pong:rundir={self.rundir}{extra}")
        self.assertIsInstance(endpoint, IPCClientEndpoint)
        return endpoint

    @inlineCallbacks
    def test_direct(self) -> Any:
        """No network: straight to C{RUNDIR/pong}, ipcd not asked."""
        yield round_trip(self, self.client())
        self.assertEqual(self.counters["lookups"], 0)

    @inlineCallbacks
    def test_networkInString(self) -> Any:
        """C{network=} in the endpoint string: through ipcd, fd adopted."""
        before = yield fd_baseline()
        yield round_trip(self, self.client(r":network=pong unix\://pong"))
        self.assertEqual(self.counters["lookups"], 1)
        self.assertEqual(self.counters["connected"], 1)
        yield assert_no_fd_leak(before)

    @inlineCallbacks
    def test_networkFromEnvironment(self) -> Any:
        set_network(self, "pong unix://pong")
        yield round_trip(self, self.client())
        self.assertEqual(self.counters["lookups"], 1)

    @inlineCallbacks
    def test_refusedCarriesReason(self) -> Any:
        """An C{ne} answer: connect() fails with HandoffError and the reason."""
        before = yield fd_baseline()
        endpoint = clientFromString(
            reactor, rf"ipc:nosuch:rundir={self.rundir}:network=x unix\://y"
        )
        error = yield self.assertFailure(
            endpoint.connect(Factory.forProtocol(EchoClient)), HandoffError
        )
        self.assertIn("no route to service 'nosuch'", str(error))
        yield self.assertFailure(
            self.client(r":network=pong bogus\://h").connect(
                Factory.forProtocol(EchoClient)
            ),
            HandoffError,
        )
        yield assert_no_fd_leak(before)

    @inlineCallbacks
    def test_noIpcd(self) -> Any:
        """Network set but no ipcd listening: a connect error."""
        rundir = short_rundir(self)
        endpoint = IPCClientEndpoint(reactor, "pong", rundir, "pong unix://pong")
        yield self.assertFailure(
            endpoint.connect(Factory.forProtocol(EchoClient)), ConnectError
        )

    @inlineCallbacks
    def test_manyAdoptedConnections(self) -> Any:
        protocols = []
        for _ in range(5):
            endpoint = self.client(r":network=pong unix\://pong")
            protocol = yield endpoint.connect(Factory.forProtocol(EchoClient))
            protocols.append(protocol)
        for protocol in protocols:
            self.assertEqual(
                (yield protocol.answer.addTimeout(TIMEOUT, reactor)),
                EchoClient.message,
            )
            protocol.transport.loseConnection()
        yield wait_until(
            lambda: all(p.lost.called for p in protocols), "connections to close"
        )
