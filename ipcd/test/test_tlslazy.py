"""
A TLS peer that connects and sends nothing costs no OpenSSL state: tlsd's
listener, websocketd's C{ssl:} listener and an C{ssl:} metrics listener
make OpenSSL's connection (and begin its handshake) at the peer's first
byte, not at its connect (L{ipcd.lazytls}).  Its deadline and the
listener's limits still run from the connect.  Real sockets, real
in-process ipcd.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import ssl
import subprocess
import time
from typing import Any

from OpenSSL.SSL import TLS_METHOD, VERIFY_PEER, Connection, Context
from twisted.internet.defer import inlineCallbacks
from twisted.internet.interfaces import (
    IOpenSSLContextFactory,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface import implementer

from ipcd import metricsweb
from ipcd.daemons.tls.material import Material, PskClientCreator, ServerCreator
from ipcd.framing import recv_exactly
from ipcd.lazytls import LazyCreator, not_started
from ipcd.metricsweb import MAX_CONNECTIONS_PER_PEER
from ipcd.test.support import (
    TIMEOUT,
    assert_no_fd_leak,
    bounce,
    calls_to,
    fd_baseline,
    logged_lines,
    lookup,
    make_config,
    short_rundir,
    start_ipcd,
    wait_until,
)
from ipcd.test.tcpsupport import BAD_PROXY_HEADERS, abort, first_bytes, recv_eof
from ipcd.test.tlssupport import ALICE_KEY, TestCA, secrets_file, start_tls_host
from ipcd.test.wssupport import make_ca, start_ws_host, unverified_context
from ipcd.tlsfactory import TLSFactory
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
        self.assertEqual(answer, encode(b"ne refused"))
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
    def start(self) -> Any:
        _ca, cert, key = make_ca(short_rundir(self, "ipcd-lazy-ca-"))
        listen = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        self.host = yield start_ws_host(
            self, listen=listen, open_handshake_timeout=60.0
        )
        service = self.host.service.getServiceNamed("websocketd")
        self.tls = tls_factory((yield service.listening()))
        self.websockets = service.listener.factory.wrappedFactory.connections
        # Every OpenSSL connection the listener makes, and every handshake.
        self.made = calls_to(self, LazyCreator, "make", _one)
        self.handshakes = calls_to(self, Connection, "do_handshake", _one)

    def secure_upgrade(self) -> tuple[ssl.SSLSocket, bytes]:
        """
        A WebSocket opened over TLS to pong (blocking): the TLS socket, and
        what the server answered, to the end of its head.
        """
        raw = socket.create_connection(("127.0.0.1", self.host.port), TIMEOUT)
        secured = unverified_context().wrap_socket(raw)
        secured.sendall(
            b"GET /pong HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        head = b""
        while b"\r\n\r\n" not in head and (chunk := secured.recv(4096)):
            head += chunk
        return secured, head

    @inlineCallbacks
    def test_silentPeersHoldNoOpenSSL(self) -> Any:
        """
        On websocketd's C{ssl:} listener, a silent peer has no OpenSSL
        connection of its own nor a handshake: autobahn, which reads a
        TLS connection's handle at every connect, is given
        L{not_started}'s (23 KiB a silent peer when it was each one's
        own); a real peer meanwhile opens its WebSocket.
        """
        yield self.start()
        socks = yield deferToThread(connect_silent, self.host.port, SILENT)
        self.addCleanup(close_all, socks)
        yield wait_until(lambda: len(self.tls.protocols) >= SILENT, "the peers held")
        self.assertEqual((self.made, self.handshakes), ([], []))
        limits = self.host.broker.limits_for("websocketd")
        self.assertEqual(limits.total, SILENT)
        # What autobahn knows of them: TLS, not yet bound to a handshake.
        for websocket in self.websockets:
            details = websocket.transport_details
            self.assertTrue(details.is_secure)
            self.assertEqual(details.channel_id["tls-unique"], b"\0" * 32)

        secured, head = yield deferToThread(self.secure_upgrade)
        self.addCleanup(secured.close)
        self.assertTrue(head.startswith(b"HTTP/1.1 101 "), head[:100])
        self.assertEqual(len(self.made), 1)  # the real peer's alone

    @inlineCallbacks
    def test_channelBindingIsTheConnections(self) -> Any:
        """
        Once its WebSocket opens, autobahn binds a peer to its own TLS
        connection: the tls-unique it reads (the peer's Finished message,
        hashed) is the one the peer sent, not L{not_started}'s nothing.
        """
        yield self.start()
        secured, head = yield deferToThread(self.secure_upgrade)
        self.addCleanup(secured.close)
        self.assertTrue(head.startswith(b"HTTP/1.1 101 "), head[:100])
        finished = secured.get_channel_binding("tls-unique")
        self.assertIsNotNone(finished)
        [websocket] = self.websockets
        yield wait_until(
            lambda: websocket.transport_details.channel_id["tls-unique"] != b"\0" * 32,
            "autobahn to read the channel binding",
        )
        self.assertEqual(
            websocket.transport_details.channel_id["tls-unique"],
            hashlib.sha256(finished).digest(),
        )


def client_hello() -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO, bytes]:
    """A TLS client in memory (SNI localhost), and its ClientHello."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = unverified_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return tls, incoming, outgoing, outgoing.read()


def scrape_hello_bytewise(port: int) -> bytes:
    """
    A scrape over TLS whose ClientHello goes one byte a segment (paced, so
    that each comes in a read of its own); the answer, to the server's EOF.
    """
    tls, incoming, outgoing, hello = client_hello()
    with socket.create_connection(("127.0.0.1", port), TIMEOUT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in hello:
            sock.sendall(bytes([byte]))
            time.sleep(0.002)  # pacing only: nothing waits on it
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("closed in the handshake") from None
                incoming.write(data)
        tls.write(b"GET /metrics HTTP/1.0\r\n\r\n")
        sock.sendall(outgoing.read())
        answer = b""
        while data := sock.recv(65536):  # to its close_notify (or EOF)
            incoming.write(data)
            try:
                while chunk := tls.read(65536):
                    answer += chunk
            except ssl.SSLWantReadError:
                continue
            except ssl.SSLZeroReturnError:
                pass
            return answer  # read nothing: the close_notify
        return answer


def scrape_with_openssl(port: int) -> bytes:
    """A scrape by C{openssl s_client} (the real command); what it printed."""
    done = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-quiet"]
        + ["-ign_eof", "-servername", "localhost"],
        input=b"GET /metrics HTTP/1.0\r\n\r\n",
        capture_output=True,
        timeout=3 * TIMEOUT,
        check=False,
    )
    return done.stdout


class MetricsSilentPeerTests(TestCase):
    """The metrics' C{ssl:} listener (L{ipcd.metricsweb}), real TLS peers."""

    @inlineCallbacks
    def start(self) -> Any:
        _ca, cert, key = make_ca(short_rundir(self, "ipcd-lazy-ca-"))
        listen = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        config = make_config(
            short_rundir(self, "ipcd-lazy-metrics-"), metrics={"listen": listen}
        )
        service = yield start_ipcd(self, config)
        listener = service.getServiceNamed("metrics")
        port = yield listener.listening()
        self.port = port.getHost().port
        self.tls = tls_factory(port)
        self.limits = listener.factory.limits
        # Every OpenSSL connection made (the listener's and the tests'
        # clients' are Python's ssl, not pyOpenSSL), and every handshake.
        self.made = calls_to(self, Connection, "__init__", _one)
        self.handshakes = calls_to(self, Connection, "do_handshake", _one)

    @inlineCallbacks
    def test_silentPeersHoldNoOpenSSL(self) -> Any:
        """
        Silent peers on the metrics' C{ssl:} listener hold no OpenSSL
        connection and began no handshake (with Twisted's own TLS, 47 KiB
        each), but count against its limits; a scrape meanwhile is answered.
        """
        yield self.start()
        silent = MAX_CONNECTIONS_PER_PEER - 1  # room left for the scrape
        socks = yield deferToThread(connect_silent, self.port, silent)
        self.addCleanup(close_all, socks)
        yield wait_until(lambda: self.limits.total == silent, "the peers held")
        self.assertEqual((self.made, self.handshakes), ([], []))

        def scrape() -> bytes:
            context = unverified_context()
            with socket.create_connection(("127.0.0.1", self.port), TIMEOUT) as raw:
                with context.wrap_socket(raw) as secured:
                    secured.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                    return recv_eof(secured)

        answer = yield deferToThread(scrape)
        self.assertTrue(answer.startswith(b"HTTP/1.0 200 "), answer[:100])
        self.assertEqual(len(self.made), 1)  # the scrape's alone

    @inlineCallbacks
    def test_silentPeerDroppedAtTheDeadline(self) -> Any:
        """
        A peer that never speaks is dropped at the listener's idle timeout
        (it bounds the TLS handshake too: none of its bytes reach HTTP), as
        is one that sent a byte and then nothing; the first never cost an
        OpenSSL connection.
        """
        self.patch(metricsweb, "IDLE_TIMEOUT", 0.5)
        yield self.start()
        before = yield fd_baseline()
        silent, spoke = yield deferToThread(connect_silent, self.port, 2)
        self.addCleanup(close_all, [silent, spoke])
        spoke.sendall(b"\x16")
        answers = yield deferToThread(lambda: (recv_eof(silent), recv_eof(spoke)))
        self.assertEqual(answers, (b"", b""))
        yield wait_until(lambda: self.limits.total == 0, "both to be let go")
        self.assertEqual(len(self.made), 1)  # the one that spoke
        close_all([silent, spoke])
        yield assert_no_fd_leak(before)

    @inlineCallbacks
    def test_overlongLineAnswered(self) -> Any:
        """
        A request line or header over 16 KiB (twisted.web's bound) is
        answered 400 and closed at once: over TLS it was neither, and held
        its place to the listener's deadline.
        """
        yield self.start()

        def overlong() -> bytes:
            context = unverified_context()
            with socket.create_connection(("127.0.0.1", self.port), TIMEOUT) as raw:
                with context.wrap_socket(raw) as secured:
                    secured.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"x" * 17000)
                    return recv_eof(secured)

        answer = yield deferToThread(overlong)
        self.assertEqual(answer, b"HTTP/1.1 400 Bad Request\r\n\r\n")
        yield wait_until(lambda: self.limits.total == 0, "the peer let go")

    @inlineCallbacks
    def test_hostilePeers(self) -> Any:
        """
        With a silent peer held: a first byte then a reset, half a
        ClientHello then EOF, a ClientHello one byte a segment (then
        served), C{openssl s_client} (served); then nothing is left: no
        place under the limits, no wrapper, no descriptor.
        """
        if shutil.which("openssl") is None:
            raise SkipTest("no openssl command")
        yield self.start()
        before = yield fd_baseline()
        [silent] = yield deferToThread(connect_silent, self.port, 1)
        self.addCleanup(silent.close)

        def reset_after_a_byte() -> None:
            [sock] = connect_silent(self.port, 1)
            sock.sendall(b"\x16")
            abort(sock)

        def half_hello_then_eof() -> bytes:
            hello = client_hello()[3]
            [sock] = connect_silent(self.port, 1)
            with sock:
                sock.sendall(hello[: len(hello) // 2])
                sock.shutdown(socket.SHUT_WR)
                return recv_eof(sock)

        yield deferToThread(reset_after_a_byte)
        answer = yield deferToThread(half_hello_then_eof)
        self.assertEqual(answer, b"")
        answer = yield deferToThread(scrape_hello_bytewise, self.port)
        self.assertTrue(answer.startswith(b"HTTP/1.0 200 "), answer[:100])
        answer = yield deferToThread(scrape_with_openssl, self.port)
        self.assertIn(b"HTTP/1.0 200 ", answer[:200])
        self.assertIn(b"ipcd_lookups_total", answer)
        yield wait_until(lambda: self.limits.total == 1, "the others let go")
        self.assertEqual(len(self.tls.protocols), 1)  # the silent one
        silent.close()
        yield wait_until(lambda: self.limits.total == 0, "the silent one let go")
        self.assertEqual(len(self.tls.protocols), 0)
        yield assert_no_fd_leak(before)


class StartTests(SynchronousTestCase):
    """L{ipcd.lazytls.LazyStart}'s calls before TLS starts."""

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

    def test_handleBeforeTheFirstByte(self) -> None:
        """
        Before the first byte, the handle is L{not_started} (one for all,
        made by no creator), and tells what a connection tells before its
        handshake: no peer's Finished message (what autobahn reads at a
        WebSocket's connect), nor certificate; the first byte gives the
        connection its own.
        """
        made = calls_to(self, self.factory.lazy_creator, "make", _one)
        handle = self.tls.getHandle()
        self.assertIsInstance(handle, Connection)
        self.assertIs(handle, not_started())
        other = self.factory.buildProtocol(None)
        other.makeConnection(StringTransport())
        self.assertIs(other.getHandle(), handle)
        self.assertEqual(
            (handle.get_peer_finished(), handle.get_peer_certificate()), (None, None)
        )
        self.assertEqual(made, [])
        self.tls.dataReceived(b"\x16")
        self.assertEqual(made, [1])
        self.assertIsInstance(self.tls.getHandle(), Connection)
        self.assertIsNot(self.tls.getHandle(), handle)

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

    def test_lostWithoutAReason(self) -> None:
        """connectionLost() with no reason: told ConnectionLost all the same."""
        from twisted.internet.error import ConnectionLost
        from twisted.python.failure import Failure

        reasons: list[Failure] = []
        self.tls.wrappedProtocol.connectionLost = reasons.append
        self.tls.connectionLost()
        self.assertEqual([r.type for r in reasons], [ConnectionLost])

    def producing(self) -> Any:
        """A producer registered with the connection (a relay's)."""
        from twisted.internet.testing import StringTransport as Producer

        producer = Producer()
        self.tls.registerProducer(producer, True)
        self.assertIsNotNone(self.transport.producer)
        return producer

    def test_producerGoneAfterAnAbort(self) -> None:
        """
        Aborted before TLS started, its producer is unregistered without
        TLS's shutdown (there is no TLS to shut), and it stays closing.
        """
        self.producing()
        self.tls.loseConnection()
        self.tls.unregisterProducer()
        self.assertIsNone(self.transport.producer)
        self.assertTrue(self.tls.disconnecting)

    def test_producerGoneWhileOpen(self) -> None:
        """Not closing: its producer unregistered, and it is not closing."""
        self.producing()
        self.tls.unregisterProducer()
        self.assertIsNone(self.transport.producer)
        self.assertFalse(self.tls.disconnecting)


@implementer(IOpenSSLContextFactory)
class _ContextFactory:
    """An old-style context factory only (as some endpoint plugins give)."""

    def __init__(self, context: Context) -> None:
        self.context = context

    def getContext(self) -> Context:  # noqa: N802
        return self.context


class HandshakeTests(SynchronousTestCase):
    """
    A lazy server over an old-style context factory, its handshake with a
    client (in memory, iosim) done: what it tells is its connection's.
    """

    def setUp(self) -> None:
        ca = TestCA(short_rundir(self, "ipcd-lazy-ca-"))
        server_context, client_context = Context(TLS_METHOD), Context(TLS_METHOD)
        for context, name in ((server_context, "server"), (client_context, "peer")):
            issued = ca.issue(name)
            context.use_certificate_file(issued.cert)
            context.use_privatekey_file(issued.key)
        server_context.set_verify(VERIFY_PEER, lambda *args: True)
        server_context.set_alpn_select_callback(lambda connection, offered: b"ipc")
        client_context.set_alpn_protos([b"ipc"])
        self.context = server_context
        factory = _ContextFactory(server_context)
        server = TLSFactory(factory, False, Factory.forProtocol(Protocol), Clock())
        self.assertIsInstance(server.lazy_creator, LazyCreator)
        # ipcd's client creator, on that context (no PSK: an address, no SNI).
        creator = PskClientCreator(client_context, "127.0.0.1")
        client = TLSMemoryBIOFactory(creator, True, Factory.forProtocol(Protocol))
        self.client, self.server, self.pump = connectedServerAndClient(
            lambda: server.buildProtocol(None), lambda: client.buildProtocol(None)
        )
        self.pump.flush()

    def test_itsConnections(self) -> None:
        """Its connection, its context's; the protocol and peer it agreed."""
        self.assertIs(self.server.getHandle().get_context(), self.context)
        self.assertEqual(self.server.negotiatedProtocol, b"ipc")
        peer = self.server.getPeerCertificate()
        self.assertEqual(peer.get_subject().CN, "peer")

    def test_shutAfterItsProducer(self) -> None:
        """
        As Twisted's TLS: closing waits for a producer registered, and TLS
        is shut down (close_notify) when it goes.
        """
        from OpenSSL.SSL import SENT_SHUTDOWN

        self.server.registerProducer(StringTransport(), True)
        self.server.loseConnection()
        self.assertFalse(self.server.getHandle().get_shutdown() & SENT_SHUTDOWN)
        self.server.unregisterProducer()
        self.assertTrue(self.server.getHandle().get_shutdown() & SENT_SHUTDOWN)
        self.pump.flush()
