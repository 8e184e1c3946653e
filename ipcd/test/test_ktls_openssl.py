"""
Kernel TLS against a peer nobody here wrote (the C{openssl} command-line
tool), where the kernel has kTLS (the VM test): C{openssl s_client} asks
B's tlsd for pong and is relayed by B's kernel; A's tlsd dials C{openssl
s_server} and hands the client the kTLS socket.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread

from ipcd.daemons.tls.ktls import kernel_settings
from ipcd.test.support import wait_until
from ipcd.test.test_ktls import needs_ktls
from ipcd.test.test_ktls_routes import kernel_relays, read_to_end
from ipcd.test.test_tls import TlsTestCase
from ipcd.test.test_tls_openssl import (
    s_client_to_digest,
    s_client_to_pong,
    s_client_with_commands,
    talk_to_s_server,
)
from ipcd.test.tlssupport import ALICE_KEY


@needs_ktls
class ClientInteropTests(TlsTestCase):
    """C{openssl s_client -psk} to B: B relays it on kernel TLS."""

    kernel_tls = True

    @inlineCallbacks
    def serves(self, version: str) -> Any:
        b, _ = yield s_client_to_pong(self, version, messages=3)
        self.assertEqual(len(kernel_relays(b)), 1)
        [stats] = b.broker.relays
        self.assertIn("psk:alice", stats.labels)

    def test_tls13(self) -> Any:
        return self.serves("-tls1_3")

    def test_tls12(self) -> Any:
        return self.serves("-tls1_2")

    @inlineCallbacks
    def test_close_notify(self) -> Any:
        """
        s_client's close_notify (its stdin closed) reaches the service as
        an EOF after the bytes before it.
        """
        # (-quiet ignores the end of its input unless told not to.)
        b, service, client = yield s_client_to_digest(self, "-no_ign_eof")
        yield wait_until(lambda: len(kernel_relays(b)) == 1, "B's kTLS relay")
        client.transport.write(b"ten bytes!")
        client.transport.closeStdin()
        yield wait_until(
            lambda: [(c.count, c.eof) for c in service.connections] == [(10, True)],
            "the bytes, then the EOF, to reach the service",
        )


@needs_ktls
class KeyUpdateTests(TlsTestCase):
    """
    A TLS 1.3 KeyUpdate from C{openssl s_client} (its C{K} command): this
    kernel's kTLS cannot take new keys, so B's relay ends, saying why,
    instead of reading records it cannot open.
    """

    kernel_tls = True

    @inlineCallbacks
    def test_key_update_ends_the_relay(self) -> Any:
        b, client = yield s_client_with_commands(self)
        yield wait_until(lambda: len(kernel_relays(b)) == 1, "B's kTLS relay")
        client.transport.write(b"K\n")
        yield self.assertLogged("ended: TLS handshake message 18 on kernel TLS")
        yield wait_until(lambda: not b.broker.relays, "B's relay to end")


@needs_ktls
class ServerInteropTests(TlsTestCase):
    """
    A's tlsd dials C{openssl s_server}; the test answers C{ok} for it; the
    client holds the kTLS socket and talks to s_server both ways, then
    reads s_server's end.
    """

    kernel_tls = True

    @inlineCallbacks
    def hands_over(self, tlsd: dict[str, Any], *server: str) -> Any:
        process, a, sock = yield talk_to_s_server(self, tlsd, *server)
        self.assertEqual(sock.family, socket.AF_INET)
        self.assertEqual(list(a.broker.relays), [])
        info = kernel_settings(sock)
        # s_server's Q command closes its socket with no close_notify: the
        # client reads an EOF (a close_notify is test_ktls_routes').
        process.transport.write(b"Q\n")
        rest, how = yield deferToThread(read_to_end, sock)
        self.assertEqual((rest, how), (b"", "eof"))
        return info

    @inlineCallbacks
    def test_psk13(self) -> Any:
        info = yield self.hands_over(
            {"psk_file": self.keys(alice=ALICE_KEY), "psk_identity": "alice"},
            *("-psk", ALICE_KEY, "-psk_identity", "alice", "-nocert", "-tls1_3"),
        )
        self.assertEqual(info[:2], b"\x04\x03")

    @inlineCallbacks
    def test_psk12(self) -> Any:
        info = yield self.hands_over(
            {"psk_file": self.keys(alice=ALICE_KEY), "psk_identity": "alice"},
            *("-psk", ALICE_KEY, "-psk_identity", "alice", "-nocert", "-tls1_2"),
        )
        self.assertEqual(info[:2], b"\x03\x03")

    @inlineCallbacks
    def test_certificate(self) -> Any:
        server = self.ca.issue("openssl-server")
        yield self.hands_over(
            {"trust_roots": self.ca.path},
            *("-cert", server.cert, "-key", server.key),
        )

    @inlineCallbacks
    def test_chacha(self) -> Any:
        """ChaCha20-Poly1305, which the kernel has too."""
        server = self.ca.issue("openssl-server")
        info = yield self.hands_over(
            {"trust_roots": self.ca.path},
            *("-cert", server.cert, "-key", server.key),
            *("-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256"),
        )
        self.assertEqual(info[2:4], (54).to_bytes(2, "little"))
