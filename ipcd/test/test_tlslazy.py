"""
A TLS peer that connects and sends nothing costs no OpenSSL state: tlsd's
listener and websocketd's C{ssl:} listener make OpenSSL's connection (and
begin its handshake) at the peer's first byte, not at its connect
(L{ipcd.daemons.tls.lazy}).  Its deadline and the listener's limits still
run from the connect.  Real sockets, real in-process ipcd.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

from OpenSSL.SSL import Connection
from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ipcd.daemons.tls.handover import TLSFactory
from ipcd.daemons.tls.material import Material, ServerCreator
from ipcd.framing import recv_exactly
from ipcd.test.support import (
    TIMEOUT,
    assert_no_fd_leak,
    bounce,
    calls_to,
    fd_baseline,
    logged_lines,
    lookup,
    short_rundir,
    wait_until,
)
from ipcd.test.tcpsupport import BAD_PROXY_HEADERS, first_bytes, recv_eof
from ipcd.test.tlssupport import ALICE_KEY, TestCA, secrets_file, start_tls_host
from ipcd.test.wssupport import make_ca, start_ws_host, unverified_context
from ipcd.wire import encode

# Under the per-peer maximum (128) three times over: none is refused.
SILENT = 40


def tls_factory(port: Any) -> TLSMemoryBIOFactory:
    """The TLS factory under listening C{port}'s wrappers (limits, ...)."""
    factory = port.factory
    while not isinstance(factory, TLSMemoryBIOFactory):
        factory = factory.wrappedFactory
    return factory


def connect_silent(port: int, count: int) -> list[socket.socket]:
    """C{count} TCP connections to C{port} that send nothing."""
    socks = []
    try:
        for _ in range(count):
            socks.append(socket.create_connection(("127.0.0.1", port), TIMEOUT))
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


def _one(*args: Any) -> int:
    """What L{calls_to} notes of a call: that it was made."""
    return 1


def _psk_server_context() -> Any:
    return Material(keys={"alice": bytes.fromhex(ALICE_KEY)}).server_context()


class TlsdSilentPeerTests(TestCase):
    """tlsd's listener (pre-shared keys), a host A dialing it with them."""

    @inlineCallbacks
    def start(self, **tlsd: Any) -> Any:
        keys = secrets_file(short_rundir(self, "ipcd-lazy-keys-"), {"alice": ALICE_KEY})
        self.b = yield start_tls_host(
            self, {"psk_file": keys, **tlsd}, rules=["allow in pong"]
        )
        self.port = yield self.b.service.getServiceNamed("tlsd").listening()
        self.tls = tls_factory(self.port)
        self.limits = self.b.broker.limits_for("tlsd")
        # Every OpenSSL connection tlsd's listener makes, and every handshake.
        self.made = calls_to(self, ServerCreator, "serverConnectionForTLS", _one)
        self.handshakes = calls_to(self, Connection, "do_handshake", _one)

    @inlineCallbacks
    def silent(self, count: int) -> Any:
        """C{count} silent peers, once tlsd holds them all."""
        socks = yield deferToThread(connect_silent, self.b.port, count)
        self.addCleanup(close_all, socks)
        yield wait_until(
            lambda: len(self.tls.protocols) >= count, "tlsd to hold the peers"
        )
        return socks

    @inlineCallbacks
    def test_silentPeersHoldNoOpenSSL(self) -> Any:
        """
        Silent peers hold no OpenSSL connection and began no handshake,
        but count against the listener's limits; a real peer meanwhile
        completes its handshake and is relayed.
        """
        yield self.start(handshake_timeout=60.0)
        yield self.silent(SILENT)
        self.assertEqual(self.limits.total, SILENT)
        self.assertEqual(self.limits.per_peer["ip:127.0.0.1/32"], SILENT)
        self.assertEqual((len(self.made), len(self.handshakes)), (0, 0))

        keys = secrets_file(short_rundir(self, "ipcd-lazy-a-"), {"alice": ALICE_KEY})
        a = yield start_tls_host(
            self, {"psk_file": keys, "psk_identity": "alice"}, pongd=False
        )
        route = self.b.route("pong", host="127.0.0.1")
        reply = yield deferToThread(lookup, a.rundir, f"pong;pong {route}".encode())
        self.assertEqual((reply.first, len(reply.fds)), (b"ok", 1))
        sock = reply.take_socket(self)
        echo = yield deferToThread(bounce, sock, b"past the silent ones")
        self.assertEqual(echo, encode(b"past the silent ones"))
        self.assertEqual(len(self.made), 1)  # the real peer's alone

    @inlineCallbacks
    def test_firstByteKeepsTheDeadline(self) -> Any:
        """
        The handshake deadline is set at the connect: the first byte, which
        starts TLS, neither moves it nor sets another.
        """
        yield self.start(handshake_timeout=60.0)
        [sock] = yield self.silent(1)
        [tls] = self.tls.protocols
        inbound = tls.wrappedProtocol
        deadline = inbound._timer
        self.assertTrue(deadline.active())
        due = deadline.getTime()
        sock.sendall(b"\x16")  # a handshake record's first byte
        yield wait_until(lambda: self.made, "TLS to start")
        self.assertIs(inbound._timer, deadline)
        self.assertEqual((deadline.active(), deadline.getTime()), (True, due))

    @inlineCallbacks
    def test_silentPeerDroppedAtTheDeadline(self) -> Any:
        """
        A peer that never speaks is dropped at the handshake deadline, as
        is one that sends a byte and then nothing; the first never cost an
        OpenSSL connection.
        """
        yield self.start(handshake_timeout=0.5)
        before = yield fd_baseline()
        silent, spoke = yield deferToThread(connect_silent, self.b.port, 2)
        self.addCleanup(close_all, [silent, spoke])
        spoke.sendall(b"\x16")
        answers = yield deferToThread(lambda: (recv_eof(silent), recv_eof(spoke)))
        self.assertEqual(answers, (b"", b""))
        counters = self.b.broker.counters
        yield wait_until(lambda: self.limits.total == 0, "both to be let go")
        self.assertEqual(counters["tlsd: TLS handshakes timed out"], 2)
        self.assertEqual(len(self.made), 1)  # the one that spoke
        close_all([silent, spoke])
        yield assert_no_fd_leak(before)

    @inlineCallbacks
    def test_halfClosedBeforeAnyByte(self) -> Any:
        """
        A peer that ends its side before any byte is closed at once, with
        no OpenSSL connection made, and counted as a failed handshake.
        """
        yield self.start(handshake_timeout=60.0)
        before = yield fd_baseline()
        [sock] = yield self.silent(1)
        sock.shutdown(socket.SHUT_WR)
        answer = yield deferToThread(recv_eof, sock)
        self.assertEqual(answer, b"")
        yield wait_until(lambda: self.limits.total == 0, "the peer to be let go")
        self.assertEqual(self.b.broker.counters["tlsd: TLS handshakes failed"], 1)
        self.assertEqual((len(self.made), len(self.handshakes)), (0, 0))
        sock.close()
        yield assert_no_fd_leak(before)

    @inlineCallbacks
    def test_manyPeersLeaveNothing(self) -> Any:
        """
        Silent peers, peers that sent a byte, and peers that half-closed,
        all gone: no descriptor, no place under the limits, no wrapper left.
        """
        yield self.start(handshake_timeout=60.0)
        before = yield fd_baseline()
        socks = yield self.silent(3 * SILENT)
        for sock in socks[:SILENT]:
            sock.sendall(b"\x16")
        for sock in socks[SILENT : 2 * SILENT]:
            sock.shutdown(socket.SHUT_WR)
        yield wait_until(lambda: len(self.made) == SILENT, "TLS for those that spoke")
        close_all(socks)
        yield wait_until(lambda: self.limits.total == 0, "every peer to be let go")
        self.assertEqual(len(self.tls.protocols), 0)
        yield assert_no_fd_leak(before)


def proxied_pong(
    port: int, source: str, client: Any = None, keep: list[Any] | None = None
) -> bytes:
    """
    Behind a PROXY header naming C{source}, over TLS (SNI sent; C{client}'s
    certificate, if given): pong's answer, and an echo if ok; or all tlsd
    says.  The connection is closed after, unless C{keep} (a list) is given:
    then it is put there, open (its relay still running).
    """
    header = f"PROXY TCP4 {source} 127.0.0.1 4000 {port}\r\n".encode()
    context = unverified_context()
    if client is not None:
        context.load_cert_chain(client.cert, client.key)
    raw = socket.create_connection(("127.0.0.1", port), TIMEOUT)
    try:
        raw.sendall(header)
        tls = context.wrap_socket(raw, server_hostname="localhost")
    except BaseException:
        raw.close()
        raise
    try:
        tls.sendall(encode(b"pong"))
        answer = recv_exactly(tls, len(encode(b"ok")))
        if answer != encode(b"ok"):
            return answer + recv_eof(tls)
        tls.sendall(encode(b"over tls"))
        return answer + recv_exactly(tls, len(encode(b"over tls")))
    finally:
        if keep is None:
            tls.close()
        else:
            keep.append(tls)


class HaproxyListenerTests(TestCase):
    def start_host(self, rule: str) -> Any:
        """tlsd with a certificate on a haproxy:tcp: listener; C{rule}."""
        issued = TestCA(short_rundir(self, "ipcd-lazy-ca-")).issue("localhost")
        return start_tls_host(
            self,
            {
                "certificate": issued.cert,
                "key": issued.key,
                "listen": "haproxy:tcp:0:interface=127.0.0.1",
            },
            rules=[rule],
        )

    @inlineCallbacks
    def test_silentAfterTheHeader(self) -> Any:
        """
        tlsd behind C{haproxy:} with a certificate: a peer that sends its
        PROXY header and then nothing holds no OpenSSL connection; one
        that goes on has its handshake (SNI sent), request and relay.
        """
        b = yield self.start_host("allow in pong")
        made = calls_to(self, ServerCreator, "serverConnectionForTLS", _one)
        header = f"PROXY TCP4 192.0.2.1 127.0.0.1 4000 {b.port}\r\n".encode()
        [silent] = yield deferToThread(connect_silent, b.port, 1)
        self.addCleanup(silent.close)
        silent.sendall(header)
        limits = b.broker.limits_for("tlsd")
        yield wait_until(lambda: limits.total == 1, "the peer held")
        self.assertEqual(made, [])
        answer = yield deferToThread(proxied_pong, b.port, "192.0.2.1")
        self.assertEqual(answer, encode(b"ok") + encode(b"over tls"))
        self.assertEqual(len(made), 1)

    @inlineCallbacks
    def test_peerIsTheHeadersAddress(self) -> Any:
        """
        tlsd behind C{haproxy:tcp:} (TLS inside the PROXY header): the
        peer's ip: label is the address the header names, as websocketd's;
        it was the proxy's own (named when it connects, before the header),
        so 'allow in pong ip:10.0.0.0/8' let in no one.  The connection
        limits count the proxy: one key, whatever addresses it names.
        """
        b = yield self.start_host("allow in pong ip:10.0.0.0/8")

        # A peer held (its header read, then silent): counted as the proxy.
        [held] = yield deferToThread(connect_silent, b.port, 1)
        self.addCleanup(held.close)
        held.sendall(f"PROXY TCP4 10.9.9.9 127.0.0.1 5555 {b.port}\r\n".encode())
        answer = yield deferToThread(proxied_pong, b.port, "10.1.2.3")
        self.assertEqual(answer, encode(b"ok") + encode(b"over tls"))
        answer = yield deferToThread(proxied_pong, b.port, "198.51.100.7")
        self.assertIn(b"denied", answer)
        limits = b.broker.limits_for("tlsd")
        yield wait_until(lambda: limits.total == 1, "the others to be let go")
        self.assertEqual(dict(limits.per_peer), {"ip:127.0.0.1/32": 1})

    @inlineCallbacks
    def test_badHeaderRefused(self) -> Any:
        """
        tlsd behind C{haproxy:tcp:}: a PROXY header that names no plain
        IP address of its family, or a port that is none, is refused
        before TLS (no OpenSSL connection made): the connection cut,
        counted and said in one line each (no failed TLS handshake said
        besides).  Twisted's wrapper let C{evil} and C{%lo} in as the
        peer's address, and the port C{x} out as a traceback.
        """
        b = yield self.start_host("allow in pong ip:*")
        made = calls_to(self, ServerCreator, "serverConnectionForTLS", _one)
        lines = logged_lines(self)
        headers = BAD_PROXY_HEADERS[:1] + BAD_PROXY_HEADERS[3:6]
        for header in headers:
            hello = unverified_context().wrap_bio(
                ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="x"
            )
            with self.assertRaises(ssl.SSLWantReadError):
                hello.do_handshake()
            answer = yield deferToThread(first_bytes, b.port, header + outgoing.read())
            self.assertEqual(answer, b"", header)
        counter = "tlsd: refused, bad PROXY header"
        yield wait_until(
            lambda: b.broker.counters[counter] == len(headers), "all counted"
        )
        limits = b.broker.limits_for("tlsd")
        yield wait_until(lambda: limits.total == 0, "the refused let go")
        said = [line for line in lines if "tlsd" in line or "TLS" in line]
        self.assertEqual(len(said), len(headers), "\n".join(said))
        self.assertTrue(all("bad PROXY header" in line for line in said), said)
        self.assertEqual(made, [])
        answer = yield deferToThread(proxied_pong, b.port, "192.0.2.1")
        self.assertEqual(answer, encode(b"ok") + encode(b"over tls"))

    @inlineCallbacks
    def test_certificateLabelsKept(self) -> Any:
        """
        Behind C{haproxy:tcp:} with client certificates: the peer is the
        header's address and keeps its certificate's labels (both the
        rules and the relay see them).
        """
        ca = TestCA(short_rundir(self, "ipcd-lazy-ca-"))
        server, client = ca.issue("localhost"), ca.issue("host-a")
        b = yield start_tls_host(
            self,
            {
                "certificate": server.cert,
                "key": server.key,
                "trust_roots": ca.path,
                "verify_clients": True,
                "listen": "haproxy:tcp:0:interface=127.0.0.1",
            },
            rules=["allow in pong cert:host-a"],
        )
        # Its relay read while it runs: once the peer closes, it may have
        # ended before the test looks (seen once in a whole-suite run).
        kept: list[Any] = []
        answer = yield deferToThread(proxied_pong, b.port, "10.1.2.3", client, kept)
        for sock in kept:
            self.addCleanup(sock.close)
        self.assertEqual(answer, encode(b"ok") + encode(b"over tls"))
        [stats] = b.broker.relays
        self.assertLessEqual({"ip:10.1.2.3", "cert:host-a"}, set(stats.labels))


class WebSocketSilentPeerTests(TestCase):
    @inlineCallbacks
    def test_silentPeersBeginNoHandshake(self) -> Any:
        """
        On websocketd's C{ssl:} listener, a silent peer's OpenSSL
        connection is made when it connects (autobahn reads it then) but
        its handshake, and the buffers that go with it, wait for its first
        byte; a real peer meanwhile opens its WebSocket.
        """
        _ca, cert, key = make_ca(short_rundir(self, "ipcd-lazy-ca-"))
        listen = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        host = yield start_ws_host(self, listen=listen, open_handshake_timeout=60.0)
        port = yield host.service.getServiceNamed("websocketd").listening()
        tls = tls_factory(port)
        handshakes = calls_to(self, Connection, "do_handshake", _one)
        socks = yield deferToThread(connect_silent, host.port, SILENT)
        self.addCleanup(close_all, socks)
        yield wait_until(lambda: len(tls.protocols) >= SILENT, "the peers held")
        self.assertEqual(handshakes, [])
        limits = host.broker.limits_for("websocketd")
        self.assertEqual(limits.total, SILENT)

        def secure_upgrade() -> bytes:
            context = unverified_context()
            with socket.create_connection(("127.0.0.1", host.port), TIMEOUT) as raw:
                with context.wrap_socket(raw) as secured:
                    secured.sendall(
                        b"GET /pong HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                        b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                        b"Sec-WebSocket-Version: 13\r\n\r\n"
                    )
                    return secured.recv(12)

        answer = yield deferToThread(secure_upgrade)
        self.assertEqual(answer, b"HTTP/1.1 101")


class StartTests(SynchronousTestCase):
    """L{ipcd.daemons.tls.lazy.LazyStart}'s calls before TLS starts."""

    def setUp(self) -> None:
        self.factory = TLSFactory(
            ServerCreator(_psk_server_context()),
            False,
            Factory.forProtocol(Protocol),
            Clock(),
        )
        self.transport = StringTransport()
        self.tls = self.factory.buildProtocol(None)
        self.tls.makeConnection(self.transport)

    def test_clientsStartAtOnce(self) -> None:
        """A client's TLS begins with its connection (its ClientHello goes)."""
        from twisted.internet.ssl import optionsForClientTLS

        factory = TLSFactory(
            optionsForClientTLS("example.com"),
            True,
            Factory.forProtocol(Protocol),
            Clock(),
        )
        tls = factory.buildProtocol(None)
        transport = StringTransport()
        tls.makeConnection(transport)
        self.assertIsInstance(tls.getHandle(), Connection)
        self.assertTrue(transport.value().startswith(b"\x16\x03"))

    def test_handleMadeEarlyIsTheOneUsed(self) -> None:
        """
        A handle asked for before the first byte is made then (no
        handshake yet), and is the one TLS goes on with.
        """
        early = self.tls.getHandle()
        self.assertIsInstance(early, Connection)
        self.assertIs(self.tls.getHandle(), early)
        self.tls.dataReceived(b"\x16")
        self.assertIs(self.tls.getHandle(), early)

    def test_writeStartsTls(self) -> None:
        """What the application writes first waits for the handshake."""
        self.tls.write(b"hello")
        self.assertIsInstance(self.tls.getHandle(), Connection)
        self.assertEqual(self.transport.value(), b"")  # a server speaks second

    def test_loseConnectionAborts(self) -> None:
        """As Twisted's TLS with no handshake and nothing to send: an abort."""
        self.tls.loseConnection()
        self.assertTrue(self.transport.disconnecting)
        self.assertTrue(self.transport.disconnected)  # aborted
        self.tls.dataReceived(b"\x16")
        self.tls.write(b"late")
        self.assertIsNone(self.tls.getHandle())
        self.assertEqual(self.transport.value(), b"")

    def test_lostBeforeAnyByte(self) -> None:
        """
        The application is told as Twisted's TLS tells of a handshake cut
        short (ConnectionLost), once; nothing starts TLS afterwards.
        """
        from twisted.internet.error import ConnectionDone, ConnectionLost
        from twisted.python.failure import Failure

        reasons: list[Failure] = []
        self.tls.wrappedProtocol.connectionLost = reasons.append
        self.tls.connectionLost(Failure(ConnectionDone()))
        self.assertEqual([r.type for r in reasons], [ConnectionLost])
        self.assertIsNone(self.tls.getHandle())
        self.tls.write(b"late")
        self.assertIsNone(self.tls.getHandle())
        self.assertEqual(self.factory.protocols, {})

    def test_applicationConnectedOnce(self) -> None:
        """
        The application protocol is connected at the connect, and not again
        when TLS starts (Twisted's makeConnection, run then, connects
        whatever stands in C{wrappedProtocol}).
        """
        application = self.tls.wrappedProtocol
        self.assertIs(application.transport, self.tls)
        made: list[Any] = []
        application.makeConnection = made.append
        application.connectionMade = lambda: made.append("made")
        self.tls.dataReceived(b"\x16")
        self.assertEqual(made, [])
        self.assertIs(self.tls.wrappedProtocol, application)
        self.assertIsInstance(self.tls.getHandle(), Connection)

    def test_creatorFailsAtTheFirstByte(self) -> None:
        """
        No connection could be made when the first byte came: the error is
        the reactor's to log, and the connection ends as one that never
        started TLS (the application told once, the wrapper let go).
        """
        from twisted.internet.error import ConnectionLost
        from twisted.python.failure import Failure

        def fail(tls: Any) -> Connection:
            raise RuntimeError("no keys")

        self.patch(self.factory.lazy_creator, "make", fail)
        self.assertRaises(RuntimeError, self.tls.dataReceived, b"\x16")
        reasons: list[Failure] = []
        self.tls.wrappedProtocol.connectionLost = reasons.append
        self.tls.connectionLost(Failure(RuntimeError("no keys")))
        self.assertEqual([r.type for r in reasons], [ConnectionLost])
        self.assertEqual(self.factory.protocols, {})

    def test_negotiatedNothingYet(self) -> None:
        self.assertIsNone(self.tls.negotiatedProtocol)
        self.assertIsNone(self.tls.getPeerCertificate())
