"""
A TLS client that offers ALPN protocols (curl, browsers, Prometheus do)
completes its handshake with ipcd's TLS listeners, none of which
negotiates a protocol (L{ipcd.tlsfactory.without_alpn}): Twisted's
contexts answered such an offer with an empty choice, which OpenSSL ends
the handshake on.  Real sockets, real in-process ipcd.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from ipcd.test.support import TIMEOUT, make_config, short_rundir, start_ipcd
from ipcd.test.tcpsupport import recv_eof
from ipcd.test.tlssupport import TestCA, start_tls_host
from ipcd.test.wssupport import make_ca, start_ws_host, unverified_context

# What curl and Go's HTTP client offer.
OFFERED = ["h2", "http/1.1"]


def alpn_client() -> ssl.SSLContext:
    """A TLS client that offers L{OFFERED}, taking any certificate."""
    context = unverified_context()
    context.set_alpn_protocols(OFFERED)
    return context


def exchange(port: int, request: bytes) -> tuple[str | None, bytes]:
    """
    A TLS connection to C{port} offering ALPN (blocking): the protocol
    chosen, and what came back for C{request} to the server's close, or
    up to the end of its head if it keeps the connection.
    """
    with socket.create_connection(("127.0.0.1", port), TIMEOUT) as raw:
        with alpn_client().wrap_socket(raw, server_hostname="localhost") as tls:
            chosen = tls.selected_alpn_protocol()
            tls.sendall(request)
            if b"Upgrade: websocket" not in request:
                return chosen, recv_eof(tls)
            head = b""
            while b"\r\n\r\n" not in head and (chunk := tls.recv(4096)):
                head += chunk
            return chosen, head


class AlpnOfferedTests(TestCase):
    @inlineCallbacks
    def test_metrics(self) -> Any:
        """An C{ssl:} metrics listener serves a scrape that offered ALPN."""
        _ca, cert, key = make_ca(short_rundir(self, "ipcd-alpn-ca-"))
        listen = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        config = make_config(
            short_rundir(self, "ipcd-alpn-"), metrics={"listen": listen}
        )
        service = yield start_ipcd(self, config)
        port = yield service.getServiceNamed("metrics").listening()
        chosen, answer = yield deferToThread(
            exchange, port.getHost().port, b"GET /metrics HTTP/1.0\r\n\r\n"
        )
        self.assertIsNone(chosen)
        self.assertTrue(answer.startswith(b"HTTP/1.0 200 "), answer[:100])
        self.assertIn(b"ipcd_lookups_total", answer)

    @inlineCallbacks
    def test_websocketd(self) -> Any:
        """websocketd's C{ssl:} listener opens a WebSocket that offered ALPN."""
        _ca, cert, key = make_ca(short_rundir(self, "ipcd-alpn-ca-"))
        listen = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        host = yield start_ws_host(self, listen=listen)
        chosen, head = yield deferToThread(
            exchange,
            host.port,
            b"GET /pong HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n",
        )
        self.assertIsNone(chosen)
        self.assertTrue(head.startswith(b"HTTP/1.1 101 "), head[:100])

    @inlineCallbacks
    def test_tlsd(self) -> Any:
        """
        tlsd's listener (certificate mode) completes the handshake of a
        client that offered ALPN, then reads tcpd's request as ever: an
        empty service name is answered C{ne} (a framed refusal, in the one
        word a remote peer is told) and closed.
        """
        server = TestCA(short_rundir(self, "ipcd-alpn-ca-")).issue("server")
        host = yield start_tls_host(
            self, {"certificate": server.cert, "key": server.key}
        )
        chosen, answer = yield deferToThread(exchange, host.port, b"\0" * 64)
        self.assertIsNone(chosen)
        self.assertEqual(answer[4:], b"ne no such service")
