"""
tlsd's outbound protocol in memory: what it sends inside TLS, and what it
makes of the answers (C{StringTransport} stands for the TLS connection).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from ipcd.daemons.tls.dialer import TlsDialer
from ipcd.errors import Refused


class DialerTests(SynchronousTestCase):
    def dialer(self, handshook: bool = True) -> tuple[TlsDialer, Any, Deferred[Any]]:
        done: Deferred[Any] = Deferred()
        dialer = TlsDialer("pong", "b.example:9001", done)
        transport = StringTransport()
        dialer.makeConnection(transport)
        dialer.handshook = handshook
        return dialer, transport, done

    def refusal(self, done: Deferred[Any]) -> str:
        return str(self.failureResultOf(done, Refused).value)

    def test_rawRequestThenOk(self) -> None:
        """The raw name goes out; C{ok} and what follows it come back."""
        dialer, transport, done = self.dialer()
        self.assertEqual(transport.value(), b"pong")
        dialer.dataReceived(b"o")
        self.assertNoResult(done)
        dialer.dataReceived(b"k\x00\x00\x00\x02hi")
        self.assertEqual(self.successResultOf(done), (dialer, b"\x00\x00\x00\x02hi"))

    def test_refusalRepeated(self) -> None:
        dialer, transport, done = self.dialer()
        dialer.dataReceived(b"ne in connection to 'pong' denied")
        self.assertNoResult(done)
        dialer.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(
            self.refusal(done),
            "tlsd at b.example:9001 refused 'pong': in connection to 'pong' denied",
        )

    def test_notATlsd(self) -> None:
        """Another answer is not repeated, and the connection is dropped."""
        dialer, transport, done = self.dialer()
        dialer.dataReceived(b"HTTP/1.1 400 Bad Request\r\n")
        said = self.refusal(done)
        self.assertIn("it did not answer ok (not a tlsd?)", said)
        self.assertNotIn("HTTP", said)
        self.assertTrue(transport.disconnecting)

    def test_closedBeforeAnswer(self) -> None:
        dialer, _, done = self.dialer()
        dialer.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(
            self.refusal(done),
            "tlsd at b.example:9001 closed the connection for 'pong'",
        )

    def test_handshakeFailed(self) -> None:
        dialer, _, done = self.dialer(handshook=False)
        dialer.connectionLost(Failure(ConnectionDone("gone")))
        self.assertTrue(
            self.refusal(done).startswith("TLS handshake with b.example:9001 failed")
        )
