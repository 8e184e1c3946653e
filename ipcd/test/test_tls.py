"""
tlsd on real sockets: two in-process ipcd instances (host A dials, host B
serves pongd) speaking TLS with certificates from a test CA, mutual TLS and
pre-shared keys (TLS 1.3 and 1.2); refusals cost nothing.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from ipcd.test.support import bounce, lookup, short_rundir
from ipcd.test.tlssupport import (
    ALICE_KEY,
    BOB_KEY,
    TestCA,
    secrets_file,
    start_tls_host,
)
from ipcd.wire import encode

OK = b"ok"


class TlsTestCase(TestCase):
    """A test CA, and helpers to ask for pong through host A."""

    def setUp(self) -> None:
        self.dir = short_rundir(self, "ipcd-tls-files-")
        self.ca = TestCA(self.dir)

    @inlineCallbacks
    def lookup_on(self, a: Any, route: str, service: str = "pong") -> Any:
        payload = f"{service};{service} {route}".encode()
        reply = yield deferToThread(lookup, a.rundir, payload)
        return reply

    @inlineCallbacks
    def assertPong(self, a: Any, route: str) -> Any:
        reply = yield self.lookup_on(a, route)
        self.assertEqual((reply.first, reply.data, len(reply.fds)), (OK, OK, 1))
        sock = reply.take_socket(self)
        for payload in (b"bounce me", b"x" * 70000):
            echo = yield deferToThread(bounce, sock, payload)
            self.assertEqual(echo, encode(payload))
        return sock

    @inlineCallbacks
    def assertRefused(self, a: Any, route: str, *words: str) -> Any:
        reply = yield self.lookup_on(a, route)
        self.assertEqual(reply.fds, [])
        text = reply.data.decode()
        self.assertTrue(text.startswith("ne "), text)
        for word in words:
            self.assertIn(word, text)
        return text


class CertificateTests(TlsTestCase):
    @inlineCallbacks
    def test_certificateMode(self) -> Any:
        """Pong through tls:// with B's certificate from the test CA."""
        server = self.ca.issue("host-b")
        b = yield start_tls_host(
            self,
            {"certificate": server.cert, "key": server.key},
            rules=["allow in pong"],
        )
        a = yield start_tls_host(self, {"trust_roots": self.ca.path}, pongd=False)
        yield self.assertPong(a, b.route("pong"))
