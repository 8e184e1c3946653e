"""
Tests for L{ipcd.testing}: the fakes users' tests are offered work with
ipcd's own protocols, in memory.
"""

from __future__ import annotations

import os
import socket

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from ipcd.broker import Broker, ILookupBroker, LookupFactory
from ipcd.config import Config
from ipcd.identity import Peer
from ipcd.routes import parse_lookup
from ipcd.testing import FakeLookupBroker, FakeUNIXTransport, lookup_connection
from ipcd.wire import encode


class FakeLookupBrokerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.broker = FakeLookupBroker(
            Config(rundir="/r", lookup_timeout=2.0), self.clock
        )
        self.addCleanup(self.broker.close)
        self.factory = LookupFactory(self.broker)

    def connect(self, transport: FakeUNIXTransport | None = None) -> tuple:
        protocol, transport = lookup_connection(self.factory, transport)
        self.addCleanup(transport.close)
        return protocol, transport

    def test_interface(self) -> None:
        """The fake and the real broker both provide L{ILookupBroker}."""
        self.assertTrue(verifyObject(ILookupBroker, self.broker))
        self.assertTrue(
            verifyObject(ILookupBroker, Broker(Config(rundir="/r"), self.clock))
        )

    def test_ok(self) -> None:
        """
        C{ok} and the descriptor: the handed-over socket is connected to
        the broker's peer end; ipcd's copy is closed with the connection.
        """
        protocol, transport = self.connect()
        protocol.dataReceived(encode(b"pong;pong unix://pong"))
        self.assertEqual(transport.value(), b"ok")
        self.assertTrue(transport.disconnecting)
        [(payload, client)] = self.broker.lookups
        self.assertEqual(parse_lookup(payload).service, "pong")
        self.assertEqual(client, Peer("unknown local client"))
        [handed] = transport.handed
        [peer] = self.broker.peers
        handed.sendall(b"through")
        self.assertEqual(peer.recv(16), b"through")
        self.assertIsNone(protocol._handed)  # closed at connectionLost
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_refuse(self) -> None:
        self.broker.refuse("no route to service 'pong'")
        protocol, transport = self.connect()
        protocol.dataReceived(encode(b"pong"))
        self.assertEqual(transport.value(), b"ne no route to service 'pong'")
        self.assertEqual(transport.handed, [])

    def test_refuseOnPlainStringTransport(self) -> None:
        """A refusal needs no descriptor passing: any StringTransport does."""
        self.broker.refuse("denied")
        protocol = self.factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(encode(b"pong"))
        self.assertEqual(transport.value(), b"ne denied")

    def test_deadline(self) -> None:
        """The lookup deadline runs on the broker's (fake) clock."""
        _, transport = self.connect()
        self.clock.advance(1.999)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(0.001)
        self.assertEqual(transport.value(), b"ne no lookup received within 2 s")
        self.assertEqual(self.broker.lookups, [])

    def test_holdThenClientLeaves(self) -> None:
        """A pending lookup is cancelled when its client goes away."""
        self.broker.hold()
        protocol, transport = self.connect()
        protocol.dataReceived(encode(b"pong"))
        self.clock.advance(10)  # the lookup deadline ended with the lookup
        self.assertEqual(transport.value(), b"")
        [pending] = self.broker.pending
        transport.loseConnection()
        self.assertEqual(self.broker.cancelled, [pending])

    def test_holdThenAnswer(self) -> None:
        self.broker.hold()
        protocol, transport = self.connect()
        protocol.dataReceived(encode(b"pong"))
        self.broker.pending[0].callback(self.broker.connected())
        self.assertEqual(transport.value(), b"ok")
        self.assertEqual(len(transport.handed), 1)

    def test_credentialsFromHandle(self) -> None:
        """With a socket as handle, the client is this process."""
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        protocol, _ = self.connect(FakeUNIXTransport(ours))
        protocol.dataReceived(encode(b"pong"))
        [(_, client)] = self.broker.lookups
        self.assertEqual(client.uid, os.getuid())
        self.assertIn(f"uid:{os.getuid()}", client.labels)
