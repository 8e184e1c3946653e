"""
tlsd's fast relay (L{ipcd.daemons.tls.relay}): after the handshake, the
TLS connection leaves Twisted and OpenSSL reads and writes its socket.
Real TLS between two in-process ipcd instances, with either engine on
either side; the Twisted path when C{[tlsd] socket_relay} is off.
"""

from __future__ import annotations

import gc
import hashlib
import os
import socket
import weakref
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread

from ipcd import tlsfactory
from ipcd.daemons.tls import handover
from ipcd.daemons.tls.relay import detach
from ipcd.test.support import assert_no_fd_leak, fd_baseline, wait_until
from ipcd.test.tcpsupport import digest_service, recv_eof
from ipcd.test.test_tls import TlsTestCase
from ipcd.test.tlssupport import ALICE_KEY, start_tls_host


def fast_sides(host: Any) -> int:
    """How many sockets the host's fast TLS relays hold."""
    return len(host.tls_state.socket_relays.sides())


class SocketRelayTests(TlsTestCase):
    @inlineCallbacks
    def hosts(self, a_fast: bool = True, b_fast: bool = True, **a_tlsd: Any) -> Any:
        b = yield start_tls_host(
            self,
            {"psk_file": self.keys(alice=ALICE_KEY), "socket_relay": b_fast},
            rules=["allow in pong psk:alice", "allow in digest psk:alice"],
        )
        a = yield self.psk_client("alice", ALICE_KEY, socket_relay=a_fast, **a_tlsd)
        return a, b

    @inlineCallbacks
    def pong_on_engines(self, a_fast: bool, b_fast: bool, **a_tlsd: Any) -> Any:
        a, b = yield self.hosts(a_fast, b_fast, **a_tlsd)
        before = yield fd_baseline()
        sock = yield self.assertPong(a, b.route("pong"))
        # Each host relays on the engine it was told to use.
        self.assertEqual((fast_sides(a), fast_sides(b)), (2 * a_fast, 2 * b_fast))
        sock.close()
        for host in (a, b):
            yield wait_until(lambda h=host: not h.broker.relays, "the relays to end")
        self.assertEqual((fast_sides(a), fast_sides(b)), (0, 0))
        yield assert_no_fd_leak(before)
        return a, b

    def test_tls13(self) -> Any:
        """TLS 1.3 PSK, both hosts relaying on raw sockets."""
        return self.pong_on_engines(True, True)

    @inlineCallbacks
    def test_nothingKeptAfterTheRelay(self) -> Any:
        """
        Once a relay on raw sockets ends, nothing of its TLS connection is
        kept, on either host: the connection that left Twisted never hears
        a connectionLost, and its factory kept it (with OpenSSL's SSL object
        and buffers, about 50 KB) for the life of tlsd's listener.
        """
        made: list[weakref.ref[Any]] = []
        register = tlsfactory.TLSFactory.registerProtocol

        def registering(factory: Any, tls: Any) -> None:
            made.append(weakref.ref(tls))
            register(factory, tls)

        self.patch(tlsfactory.TLSFactory, "registerProtocol", registering)
        a, b = yield self.pong_on_engines(True, True)
        listener = b.service.getServiceNamed("tlsd").listener.factory
        self.assertEqual(list(listener.wrappedFactory.protocols), [])
        gc.collect()
        self.assertGreaterEqual(len(made), 2)  # A's dial, B's accepted one
        self.assertEqual([tls() for tls in made], [None] * len(made))

    def test_tls12(self) -> Any:
        """TLS 1.2 PSK suites too."""
        return self.pong_on_engines(True, True, max_version="1.2")

    def test_fastToTwisted(self) -> Any:
        """A on raw sockets, B on Twisted's TLS: the same TLS on the wire."""
        return self.pong_on_engines(True, False)

    def test_twistedToFast(self) -> Any:
        return self.pong_on_engines(False, True)

    def test_off(self) -> Any:
        """C{socket_relay = false}: Twisted's TLS relays, as before."""
        return self.pong_on_engines(False, False)

    @inlineCallbacks
    def test_halfClose(self) -> Any:
        """
        A client's EOF crosses TLS as a close_notify, reaches the service as
        an EOF, and the service's answer still comes back, then its EOF.
        """
        a, b = yield self.hosts()
        digest_service(self, b.rundir, "digest")
        reply = yield self.lookup_on(a, b.route("digest"), "digest")
        sock = reply.take_socket(self)
        data = os.urandom(3 * 1024 * 1024)

        def send_then_shut() -> bytes:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            return recv_eof(sock)

        answer = yield deferToThread(send_then_shut)
        expected = f"{len(data)} {hashlib.sha256(data).hexdigest()}".encode()
        self.assertEqual(answer, expected)

    @inlineCallbacks
    def test_idleRelayClosed(self) -> Any:
        """The idle deadline ends a fast relay on which nothing moves."""
        b = yield start_tls_host(
            self,
            {"psk_file": self.keys(alice=ALICE_KEY)},
            rules=["allow in pong psk:alice", "allow in digest psk:alice"],
            limits={"idle_timeout": 0.3},
        )
        a = yield self.psk_client("alice", ALICE_KEY)
        digest_service(self, b.rundir, "digest", on_eof="close")
        before = yield fd_baseline()
        reply = yield self.lookup_on(a, b.route("digest"), "digest")
        sock = reply.take_socket(self)
        yield wait_until(lambda: fast_sides(b) == 2, "the fast relay on B")
        yield self.assertLogged("idle for 0.3 s")
        # B closed its relay (with a close_notify): A's ends, the client sees EOF.
        eof = yield deferToThread(recv_eof, sock)
        self.assertEqual(eof, b"")
        sock.close()
        for host in (a, b):
            yield wait_until(lambda h=host: not h.broker.relays, "the relays to end")
        yield assert_no_fd_leak(before)


class DeclinedTests(TlsTestCase):
    @inlineCallbacks
    def test_declinedSwitchKeepsTwistedPath(self) -> Any:
        """
        When a connection cannot leave Twisted safely (L{detach} says why:
        here it is made to decline every time), the relay stays on
        Twisted's TLS, says so, and works.
        """
        self.patch(handover, "detach", lambda tls: "made to decline")
        b = yield self.psk_server(["allow in pong psk:alice"], alice=ALICE_KEY)
        a = yield self.psk_client("alice", ALICE_KEY)
        yield self.assertPong(a, b.route("pong"))
        self.assertEqual((fast_sides(a), fast_sides(b)), (0, 0))
        yield self.assertLogged("relaying through Twisted's TLS: made to decline")

    @inlineCallbacks
    def test_noDetachBeforeTheHandshake(self) -> Any:
        """
        L{detach} on a real TLS connection whose handshake has not happened
        says so and changes nothing: the connection stays in the reactor.
        """
        b = yield self.psk_server(["allow in pong psk:alice"], alice=ALICE_KEY)
        sock = socket.create_connection(("127.0.0.1", b.port), timeout=5)
        self.addCleanup(sock.close)
        wrapping = b.service.getServiceNamed("tlsd").listener.factory
        yield wait_until(lambda: wrapping.protocols, "the connection accepted")
        [limited] = wrapping.protocols
        tls = limited.wrappedProtocol
        self.assertEqual(detach(tls), "handshake not done")
        self.assertIn(limited.transport, reactor.getReaders())
