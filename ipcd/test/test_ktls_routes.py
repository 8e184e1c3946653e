"""
tls:// routes on kernel TLS (L{ipcd.daemons.tls.kswitch}): the client
holds the TLS socket itself, the far tlsd splices a kTLS socket to the
service's.  Real TLS between two in-process ipcd instances; these run where the
kernel has the C{tls} upper-layer protocol (the VM test), and skip, saying
so, elsewhere.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
from dataclasses import replace
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread

from ipcd.daemons.tls import kswitch
from ipcd.daemons.tls.ktls import AES_128_GCM, kernel_settings, recv_record
from ipcd.test.support import assert_no_fd_leak, fd_baseline, wait_until
from ipcd.test.tcpsupport import digest_service
from ipcd.test.test_ktls import needs_ktls
from ipcd.test.test_tls import TlsTestCase
from ipcd.test.test_tlsrelay import fast_sides
from ipcd.test.tlssupport import ALICE_KEY, start_tls_host


def kernel_relays(host: Any) -> list[Any]:
    """The host's relays marked kernel TLS (as C{ipcd status} shows them)."""
    return [s for s in host.broker.relays if s.as_dict().get("tls", {}).get("kernel")]


def read_to_end(sock: socket.socket) -> tuple[bytes, str]:
    """
    What a client reads on a kTLS socket until the end, and how it ended:
    "close_notify" (a plain read fails with EIO on the alert, which is then
    read with its record type), "eof" or "reset".
    """
    sock.setblocking(True)
    sock.settimeout(60)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data, "reset"
        except OSError as e:
            if e.errno != errno.EIO:
                raise
            kind, body = recv_record(sock, 64)
            if (kind, body) == (21, b"\x01\x00"):
                return data, "close_notify"
            raise AssertionError(f"record type {kind}: {body!r}") from None
        if not chunk:
            return data, "eof"
        data += chunk


@needs_ktls
class KernelRouteTests(TlsTestCase):
    kernel_tls = True

    @inlineCallbacks
    def hosts(self, **a_tlsd: Any) -> Any:
        b = yield start_tls_host(
            self,
            {"psk_file": self.keys(alice=ALICE_KEY)},
            rules=["allow in pong psk:alice", "allow in digest psk:alice"],
        )
        a = yield self.psk_client("alice", ALICE_KEY, **a_tlsd)
        return a, b

    @inlineCallbacks
    def handed_over(self, a: Any, b: Any) -> Any:
        """
        pong through A and B: the client's socket is the TLS connection
        itself (an inet socket whose kernel has the keys), A relays nothing,
        B relays on kernel TLS.
        """
        sock = yield self.assertPong(a, b.route("pong"))
        self.assertEqual(sock.family, socket.AF_INET)
        info = kernel_settings(sock)
        self.assertIn(info[:2], (b"\x04\x03", b"\x03\x03"))  # 1.3, 1.2
        self.assertEqual(fast_sides(a), 0)
        self.assertEqual(list(a.broker.relays), [])
        self.assertEqual(len(kernel_relays(b)), 1)
        return sock

    @inlineCallbacks
    def test_tls13_psk(self) -> Any:
        """TLS 1.3 with a pre-shared key."""
        a, b = yield self.hosts()
        before = yield fd_baseline()
        sock = yield self.handed_over(a, b)
        self.assertEqual(kernel_settings(sock)[:2], b"\x04\x03")
        sock.close()
        yield wait_until(lambda: not b.broker.relays, "B's relay to end")
        yield assert_no_fd_leak(before)

    @inlineCallbacks
    def test_tls12_psk(self) -> Any:
        """TLS 1.2's PSK suites too."""
        a, b = yield self.hosts(max_version="1.2")
        sock = yield self.handed_over(a, b)
        self.assertEqual(kernel_settings(sock)[:2], b"\x03\x03")
        sock.close()

    @inlineCallbacks
    def test_certificates(self) -> Any:
        """Certificates, TLS 1.3 and 1.2."""
        a, b, _ = yield self.certificateHosts()
        sock = yield self.handed_over(a, b)
        sock.close()
        a12 = yield start_tls_host(
            self, {"trust_roots": self.ca.path, "max_version": "1.2"}, pongd=False
        )
        sock = yield self.handed_over(a12, b)
        sock.close()

    @inlineCallbacks
    def test_labels_and_rules(self) -> Any:
        """The far tlsd's rules see the PSK label as before: bob is refused."""
        b = yield self.psk_server(
            ["allow in pong psk:alice"], alice=ALICE_KEY, bob="22" * 16
        )
        a = yield self.psk_client("bob", "22" * 16)
        yield self.assertRefused(a, b.route("pong"), "pong")
        a = yield self.psk_client("alice", ALICE_KEY)
        sock = yield self.handed_over(a, b)
        sock.close()

    @inlineCallbacks
    def test_both_directions_and_clean_end(self) -> Any:
        """
        3 MB through the kernel on both hosts; the client's EOF reaches the
        service, whose answer comes back, then its end as a close_notify
        (B's kTLS relay sends one when it ends).  B's relay splices: status
        shows every byte it moved as spliced, none through ipcd.
        """
        a, b = yield self.hosts()
        digest_service(self, b.rundir, "digest")
        reply = yield self.lookup_on(a, b.route("digest"), "digest")
        sock = reply.take_socket(self)
        self.assertEqual(sock.family, socket.AF_INET)
        yield wait_until(lambda: len(kernel_relays(b)) == 1, "B's kTLS relay")
        [relay] = kernel_relays(b)
        data = os.urandom(3 * 1024 * 1024)

        def send_then_shut() -> tuple[bytes, str]:
            sock.setblocking(True)
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            return read_to_end(sock)

        answer, how = yield deferToThread(send_then_shut)
        expected = f"{len(data)} {hashlib.sha256(data).hexdigest()}".encode()
        self.assertEqual(answer, expected)
        self.assertEqual(how, "close_notify")
        yield wait_until(lambda: not b.broker.relays, "B's relay to end")
        shown = relay.as_dict()
        moved = (len(data), len(expected))
        self.assertEqual((shown["bytes_in"], shown["bytes_out"]), moved)
        self.assertEqual(shown["bytes_spliced"], sum(moved))

    @inlineCallbacks
    def test_cipher_the_kernel_refuses(self) -> Any:
        """
        A cipher the kernel refuses when it is given the keys (as a kernel
        before 5.11 refuses ChaCha20-Poly1305; here, a cipher number no
        kernel has): each host keeps that connection on its relay, which
        works, and says why; no connection is lost.
        """
        unknown = replace(AES_128_GCM, kernel=250)
        self.patch(kswitch, "cipher_of", lambda name: unknown)
        a, b = yield self.hosts()
        sock = yield self.assertPong(a, b.route("pong"))
        self.assertEqual(sock.family, socket.AF_UNIX)
        self.assertEqual((fast_sides(a), fast_sides(b)), (2, 2))
        self.assertEqual(kernel_relays(b), [])
        refused = "relaying TLS, not kernel TLS: the kernel refused TLS on this socket"
        yield wait_until(
            lambda: sum(refused in line for line in self.logged) == 2,
            "both hosts to say the kernel refused the cipher",
        )
        sock.close()

    @inlineCallbacks
    def test_off(self) -> Any:
        """C{kernel_tls = false}: the relays of today, on both hosts."""
        b = yield start_tls_host(
            self,
            {"psk_file": self.keys(alice=ALICE_KEY), "kernel_tls": False},
            rules=["allow in pong psk:alice"],
        )
        a = yield self.psk_client("alice", ALICE_KEY, kernel_tls=False)
        sock = yield self.assertPong(a, b.route("pong"))
        self.assertEqual(sock.family, socket.AF_UNIX)
        self.assertEqual((fast_sides(a), fast_sides(b)), (2, 2))
        self.assertEqual(kernel_relays(b), [])
        sock.close()
