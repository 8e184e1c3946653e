"""
tcpd on real sockets: two in-process ipcd instances ("host A" and "host B",
each with its own RUNDIR and loopback port) and plain TCP peers speaking
upstream's wire format.
"""

from __future__ import annotations

import gc
import hashlib
import os
import socket
import stat
import weakref
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, inlineCallbacks
from twisted.internet.interfaces import IHalfCloseableProtocol, ITCPTransport
from twisted.internet.task import LoopingCall
from twisted.internet.testing import EventLoggingObserver
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.policies import WrappingFactory
from twisted.trial.unittest import SkipTest, TestCase
from zope.interface import declarations, providedBy

from ipcd.daemons.tcp import TcpInbound, dial
from ipcd.errors import Refused
from ipcd.limits import LOG_PERIOD
from ipcd.relay import READ_SIZE
from ipcd.test.support import (
    TIMEOUT,
    assert_logged,
    assert_no_fd_leak,
    assert_refused,
    assert_unexpected_bounded,
    bounce,
    connect_unix,
    fd_baseline,
    free_port,
    logged_lines,
    lookup,
    make_config,
    open_fds,
    short_rundir,
    stale_socket,
    start_ipcd,
    wait_rate_limited,
    wait_until,
)
from ipcd.test.tcpsupport import (
    BAD_PROXY_HEADERS,
    abort,
    digest_service,
    first_bytes,
    inbound_relays,
    proxy_v2_tcp6,
    recv_all,
    recv_eof,
    recv_exactly,
    relay_loop,
    start_host,
    tcp_connect,
)
from ipcd.wire import HEADER, encode

OK = b"ok"
FRAMED_OK = b"\x00\x00\x00\x02ok"
B_RULES = [
    "deny in secret*",
    "allow in pong",
    "allow in missing",
    "allow in stale",
    "allow in sink",
    "allow in digest",
    "allow in stalled",
]


def raw_request(port: int, request: bytes, answer: int = 2) -> tuple[Any, bytes]:
    """Connect to tcpd, send C{request} as is, read C{answer} bytes."""
    sock = tcp_connect(port)
    try:
        sock.sendall(request)
        return sock, recv_exactly(sock, answer)
    except BaseException:
        sock.close()
        raise


def refused(port: int, request: bytes) -> bytes:
    """Send C{request} and read everything tcpd says before closing."""
    with tcp_connect(port) as sock:
        if request:
            sock.sendall(request)
        return recv_eof(sock)


def serves_pong(port: int) -> bytes:
    """A good raw request for pong on C{port}, then one echo."""
    sock, answer = raw_request(port, b"pong")
    with sock:
        if answer != OK:
            return answer
        return bounce(sock, b"still serving")


def framed_reply(sock: socket.socket) -> bytes:
    """Read one framed message (its payload) from a blocking socket."""
    (size,) = HEADER.unpack(recv_exactly(sock, HEADER.size))
    return recv_exactly(sock, size)


class TwoHostsTestCase(TestCase):
    """Host A (a client's ipcd) and host B (pongd, C{allow in pong})."""

    handshake_timeout = 5.0

    @inlineCallbacks
    def setUp(self) -> Any:
        self.a = yield start_host(self, pongd=False)
        self.b = yield start_host(
            self, rules=B_RULES, handshake_timeout=self.handshake_timeout
        )

    def handed(self, reply: Any) -> socket.socket:
        self.assertEqual((reply.first, reply.data, len(reply.fds)), (OK, OK, 1))
        return reply.take_socket(self)

    @inlineCallbacks
    def lookupOnA(self, service: str, remote: str | None = None) -> Any:
        """A client on host A asks for C{service} routed to host B."""
        payload = f"{service};{service} {self.b.route(service, remote)}"
        reply = yield deferToThread(lookup, self.a.rundir, payload.encode())
        return self.handed(reply)

    def assertServing(self) -> Any:
        d = deferToThread(serves_pong, self.b.port)
        d.addCallback(self.assertEqual, encode(b"still serving"))
        return d


class EndToEndTests(TwoHostsTestCase):
    @inlineCallbacks
    def test_tcpRouteHandsTheTcpSocket(self) -> Any:
        """
        A lookup on A with a C{tcp://} route to B gets C{ok} and an fd that
        is the TCP socket to B's tcpd itself, and echoes through B's pongd.
        """
        sock = yield self.lookupOnA("pong")
        self.assertEqual(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN), socket.AF_INET
        )
        self.assertEqual(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE), socket.SOCK_STREAM
        )
        self.assertEqual(sock.getpeername(), ("127.0.0.1", self.b.port))
        self.assertTrue(stat.S_ISSOCK(os.fstat(sock.fileno()).st_mode))
        # A closed its own copy (a dup: same inode) without shutting the
        # connection down: the client's fd is the only one left, and works.
        link = f"socket:[{os.fstat(sock.fileno()).st_ino}]"
        yield wait_until(
            lambda: list(open_fds().values()).count(link) == 1,
            "host A to close its copy of the socket",
        )
        for payload in (b"bounce me", b"again", b"x" * 70000):
            echo = yield deferToThread(bounce, sock, payload)
            self.assertEqual(echo, encode(payload))
        # No relay on the client's host; one on B.
        self.assertEqual(self.a.broker.relays, set())
        self.assertEqual(len(self.b.broker.relays), 1)

    @inlineCallbacks
    def test_upstreamBytes(self) -> Any:
        """The spec's lookup bytes, with B's port, reach B's pongd."""
        route = f"tcp://127.0.0.1:{self.b.port}/pong".encode()
        payload = b"pong;pong " + route
        reply = yield deferToThread(lookup, self.a.rundir, payload)
        sock = self.handed(reply)
        echo = yield deferToThread(bounce, sock)
        self.assertEqual(echo, b"\x00\x00\x00\x09bounce me")

    @inlineCallbacks
    def test_remoteRefusalReachesTheClient(self) -> Any:
        """B's refusal comes back to A's client as C{ne ...}, without an fd."""
        payload = f"secret;secret {self.b.route('secret')}".encode()
        reply = yield deferToThread(lookup, self.a.rundir, payload)
        fds = len(reply.fds)
        reply.close_fds()
        self.assertEqual(fds, 0)
        # What B's tcpd told A (a remote peer), in A's own reason.
        self.assertEqual(
            reply.data,
            f"ne tcpd at 127.0.0.1:{self.b.port} refused 'secret': refused".encode(),
        )

    @inlineCallbacks
    def test_notATcpdIsNotEchoed(self) -> Any:
        """
        A route to a TCP service that is no tcpd: refused, and what it said
        is not passed on; a real refusal's control characters are escaped.
        """
        answers = [b"SSH-2.0-OpenSSH_9.2 secret banner\r\n", b"ne bad\x1b[2Jthing"]
        server = socket.socket()
        self.addCleanup(server.close)
        server.settimeout(TIMEOUT)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]

        def serve() -> None:
            for answer in answers:
                conn, _ = server.accept()
                with conn:
                    conn.settimeout(TIMEOUT)
                    conn.recv(64)
                    conn.sendall(answer)

        served = deferToThread(serve)
        payload = f"x;x tcp://127.0.0.1:{port}/x".encode()
        first = yield deferToThread(lookup, self.a.rundir, payload)
        second = yield deferToThread(lookup, self.a.rundir, payload)
        yield served
        self.assertEqual((first.fds, second.fds), ([], []))
        self.assertIn(b"did not answer ok", first.data)
        self.assertNotIn(b"SSH", first.data)
        self.assertTrue(second.data.endswith(b"refused 'x': bad\\x1b[2Jthing"))

    @inlineCallbacks
    def test_nobodyListening(self) -> Any:
        """A route to a port where nothing listens: C{ne ...}, A keeps serving."""
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        payload = f"pong;pong tcp://127.0.0.1:{port}/pong".encode()
        reply = yield deferToThread(lookup, self.a.rundir, payload)
        reply.close_fds()
        self.assertTrue(reply.data.startswith(b"ne cannot connect"), reply.data)
        self.assertIn(b"Connection refused", reply.data)
        sock = yield self.lookupOnA("pong")
        echo = yield deferToThread(bounce, sock)
        self.assertEqual(echo, encode(b"bounce me"))


class DialTests(TestCase):
    def test_unresolvableNameIsRefused(self) -> Any:
        """
        A name the resolver call cannot even encode (IDNA) is a refusal
        with a reason, not an internal error, even if no route check ran.
        """
        d = ensureDeferred(dial(reactor, "a..b", 9000, "pong"))
        d = self.assertFailure(d, Refused)
        d.addCallback(
            lambda e: self.assertEqual(
                e.reason, "cannot resolve 'a..b': not a valid host name"
            )
        )
        return d


class WrappersLetGoTests(TestCase):
    @inlineCallbacks
    def test_haproxyListenerKeepsNothing(self) -> Any:
        """
        Once a relay has taken a connection's socket, every protocol
        wrapper above it leaves its factory, as its connectionLost (which
        never comes now) would have made it: on a C{haproxy:} listener,
        the PROXY-header wrapper (Twisted's then, ipcd's now) kept every
        relayed connection, with its transport, for good (about 3 KB each,
        measured).
        """
        made: list[weakref.ref[Any]] = []
        register = WrappingFactory.registerProtocol

        def registering(factory: Any, wrapper: Any) -> None:
            made.append(weakref.ref(wrapper))
            register(factory, wrapper)

        self.patch(WrappingFactory, "registerProtocol", registering)
        b = yield start_host(
            self, rules=B_RULES, listen="haproxy:tcp:0:interface=127.0.0.1"
        )
        header = f"PROXY TCP4 192.0.2.1 127.0.0.1 4000 {b.port}\r\n".encode()
        sock, answer = yield deferToThread(raw_request, b.port, header + b"pong")
        self.assertEqual(answer, OK)
        echo = yield deferToThread(bounce, sock)
        self.assertEqual(echo, encode(b"bounce me"))
        sock.close()
        yield wait_until(
            lambda: not b.broker.relays and not inbound_relays(b.service),
            "the relay to end",
        )
        gc.collect()
        self.assertGreaterEqual(len(made), 2)  # the PROXY header's, the limits'
        self.assertEqual([wrapper() for wrapper in made], [None] * len(made))


def proxied(port: int, source: str, request: bytes) -> bytes:
    """Through a PROXY header naming C{source}: C{request}, all tcpd says."""
    header = f"PROXY TCP4 {source} 127.0.0.1 5555 {port}\r\n".encode()
    with tcp_connect(port) as sock:
        sock.sendall(header + request)
        return recv_eof(sock)


class ProxiedPeerTests(TestCase):
    @inlineCallbacks
    def test_peerIsTheHeadersAddress(self) -> Any:
        """
        On a C{haproxy:tcp:} listener, the peer (its ip: label, for the
        rules) is the address its PROXY header names, as on websocketd's;
        it was the proxy's own (named when it connects, before the header),
        so 'allow in pong ip:10.0.0.0/8' let in no one.  The connection
        limits count the proxy: one key, whatever addresses it names.
        """
        b = yield start_host(
            self,
            rules=["allow in pong ip:10.0.0.0/8"],
            listen="haproxy:tcp:0:interface=127.0.0.1",
        )
        header = f"PROXY TCP4 10.1.2.3 127.0.0.1 5555 {b.port}\r\n".encode()
        sock, answer = yield deferToThread(raw_request, b.port, header + b"pong")
        self.addCleanup(sock.close)
        self.assertEqual(answer, OK)
        echo = yield deferToThread(bounce, sock)
        self.assertEqual(echo, encode(b"bounce me"))
        lines = logged_lines(self)
        answer = yield deferToThread(proxied, b.port, "198.51.100.7", b"pong")
        self.assertEqual(answer, b"ne refused")
        assert_logged(self, lines, "198.51.100.7")
        limits = b.broker.limits_for("tcpd")
        yield wait_until(lambda: limits.total == 1, "the refused one let go")
        self.assertEqual(dict(limits.per_peer), {"ip:127.0.0.1/32": 1})

    @inlineCallbacks
    def test_headerNamingNoAddress(self) -> Any:
        """
        A PROXY v2 header naming a UNIX socket (no ip: address) leaves
        the proxy's own address (Twisted's wrapper's getPeer() said the
        UNIX address, which has no host: tcpd's handshake crashed).
        """
        b = yield start_host(
            self,
            rules=["allow in pong ip:127.0.0.1"],
            listen="haproxy:tcp:0:interface=127.0.0.1",
        )
        path = b"/run/proxy.sock".ljust(108, b"\0")
        header = b"\r\n\r\n\x00\r\nQUIT\n\x21\x31" + (216).to_bytes(2, "big")
        sock, answer = yield deferToThread(
            raw_request, b.port, header + path + path + b"pong"
        )
        self.addCleanup(sock.close)
        self.assertEqual(answer, OK)

    @inlineCallbacks
    def test_badHeadersRefused(self) -> Any:
        """
        A PROXY header whose address is not a plain IP address of its
        family (text, leading zeros, a zone, the other family), or whose
        port is no port, or that is not one line of the protocol: the
        connection is cut, nothing answered, no label made of it; each is
        counted and logged at the rate of [limits] refusals, the limits
        let go, and tcpd serves the next peer.  Twisted's wrapper let all
        in (ip:evil matched 'allow in pong ip:*'), but for two whose bad
        port or bytes escaped it as a traceback each.
        """
        b = yield start_host(
            self,
            rules=["allow in pong ip:*"],
            listen="haproxy:tcp:0:interface=127.0.0.1",
        )
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        for header in BAD_PROXY_HEADERS:
            answer = yield deferToThread(first_bytes, b.port, header + b"pong")
            self.assertEqual(answer, b"", header)
        yield wait_rate_limited(
            b.broker.counters,
            "tcpd: refused, bad PROXY header",
            logged,
            "tcpd: refusing 127.0.0.1:",
            len(BAD_PROXY_HEADERS),
            timeout=LOG_PERIOD + TIMEOUT,
        )
        lines = [formatEvent(e) or "" for e in logged]
        self.assertIn(
            "bad PROXY header: 'evil' is not an IPv4 address", "\n".join(lines)
        )
        self.assertEqual(b.broker.counters["inbound requests"], 0)
        limits = b.broker.limits_for("tcpd")
        yield wait_until(lambda: limits.total == 0, "the refused let go")
        sock, answer = yield deferToThread(
            raw_request,
            b.port,
            f"PROXY TCP4 10.1.2.3 127.0.0.1 5555 {b.port}\r\n".encode() + b"pong",
        )
        self.addCleanup(sock.close)
        self.assertEqual(answer, OK)

    @inlineCallbacks
    def test_refusedAtTheLimitNoBadHeader(self) -> Any:
        """
        A proxy over [limits] sends a good header, has its refusal, then
        sends on: that is one refusal, the limits', not a bad header too.
        The limits' refusal reads and drops what came before it, the
        header among it; the reader then took the proxy's next bytes for
        its header, and refused them again: counted, logged ('bad PROXY
        header: no PROXY header', blaming a good proxy) and cut at once.
        """
        b = yield start_host(
            self,
            rules=["allow in pong"],
            listen="haproxy:tcp:0:interface=127.0.0.1",
            limits={"max_connections_per_peer": 1},
        )
        header = f"PROXY TCP4 10.1.2.3 127.0.0.1 5555 {b.port}\r\n".encode()
        held, answer = yield deferToThread(raw_request, b.port, header + b"pong")
        self.addCleanup(held.close)
        self.assertEqual(answer, OK)
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        # Connected and the header sent before the reactor runs again: it
        # is there to be dropped when the connection is accepted.
        sock = tcp_connect(b.port)
        self.addCleanup(sock.close)
        sock.sendall(header)
        counters = b.broker.counters
        limit = "tcpd: refused, per-peer limit"
        yield wait_until(lambda: counters[limit] == 1, "the refusal")
        # (Not the reason: it named the proxy's address, 127.0.0.1/32.)
        refusal = b"ne busy"
        answer = yield deferToThread(recv_exactly, sock, len(refusal))
        self.assertEqual(answer, refusal)
        sock.sendall(b"pong")
        rest = yield deferToThread(recv_eof, sock)
        self.assertEqual(rest, b"")
        sock.close()
        limits = b.broker.limits_for("tcpd")
        yield wait_until(lambda: not limits._cuts, "the refused connection gone")
        self.assertEqual(counters["tcpd: refused, bad PROXY header"], 0)
        lines = [formatEvent(event) or "" for event in logged]
        self.assertEqual([line for line in lines if "PROXY" in line], [])
        self.assertEqual(counters[limit], 1)

    @inlineCallbacks
    def test_headerAddressesCanonical(self) -> Any:
        """
        An IPv6 address in a PROXY header is labelled as the kernel writes
        it, as a direct peer's is: a v2 header's was written in full
        (ip:2001:db8:0:0:0:0:0:7) and a v1 header's as sent (2001:DB8::7),
        so 'deny in pong ip:2001:db8::*' let both in.
        """
        b = yield start_host(
            self,
            rules=["deny in pong ip:2001:db8::*", "allow in pong"],
            listen="haproxy:tcp:0:interface=127.0.0.1",
        )
        v1 = f"PROXY TCP6 2001:DB8::7 ::1 5555 {b.port}\r\n".encode()
        for header in (proxy_v2_tcp6("2001:db8::7", b.port), v1):
            answer = yield deferToThread(first_bytes, b.port, header + b"pong")
            self.assertEqual(answer, b"ne", header)
        sock, answer = yield deferToThread(
            raw_request, b.port, proxy_v2_tcp6("2001:db9::7", b.port) + b"pong"
        )
        self.addCleanup(sock.close)
        self.assertEqual(answer, OK)


class WrapperDeclarationTests(TestCase):
    @inlineCallbacks
    def test_noDeclarationWorkedOutPerConnection(self) -> Any:
        """
        The limits wrapper of each connection provides what its transport
        provides, and half-close, without working out a declaration of its
        own: alsoProvides did (zope.interface's directlyProvidedBy, then
        its resolution order: about 30 us a connection, measured).
        """
        worked_out: list[Any] = []
        real = declarations.directlyProvidedBy

        def counting(ob: Any) -> Any:
            worked_out.append(ob)
            return real(ob)

        made: list[Any] = []
        register = WrappingFactory.registerProtocol

        def registering(factory: Any, wrapper: Any) -> None:
            if isinstance(wrapper.wrappedProtocol, TcpInbound):
                made.append(wrapper)
            register(factory, wrapper)

        self.patch(WrappingFactory, "registerProtocol", registering)
        b = yield start_host(self, rules=B_RULES)
        self.patch(declarations, "directlyProvidedBy", counting)
        for _ in range(2):
            sock, answer = yield deferToThread(raw_request, b.port, b"pong")
            sock.close()
            self.assertEqual(answer, OK)
        yield wait_until(lambda: not b.broker.relays, "the relays to end")
        self.assertEqual(worked_out, [])
        self.assertEqual(len(made), 2)
        self.assertTrue(IHalfCloseableProtocol.providedBy(made[0]))
        self.assertTrue(ITCPTransport.providedBy(made[0]))
        self.assertIs(providedBy(made[0]), providedBy(made[1]))


class HandshakeTests(TwoHostsTestCase):
    """B's listener, with a plain TCP socket as the peer (upstream's tcpd)."""

    handshake_timeout = 0.3

    @inlineCallbacks
    def test_rawRequestRawOk(self) -> Any:
        """Upstream's form: raw name in, exactly C{ok} out, then messages."""
        sock, answer = yield deferToThread(raw_request, self.b.port, b"pong")
        self.addCleanup(sock.close)
        self.assertEqual(answer, OK)
        echo = yield deferToThread(bounce, sock)
        self.assertEqual(echo, encode(b"bounce me"))

    @inlineCallbacks
    def test_framedRequestFramedOk(self) -> Any:
        """A framed request gets a framed C{ok}; early data is relayed."""
        request = encode(b"pong") + encode(b"early")
        sock, answer = yield deferToThread(raw_request, self.b.port, request, 6)
        self.addCleanup(sock.close)
        self.assertEqual(answer, FRAMED_OK)
        echo = yield deferToThread(recv_exactly, sock, 4 + 5)
        self.assertEqual(echo, encode(b"early"))
        echo = yield deferToThread(bounce, sock)
        self.assertEqual(echo, encode(b"bounce me"))

    @inlineCallbacks
    def assertRefused(self, request: bytes, told: bytes, *logged: str) -> Any:
        """
        The peer is told exactly C{ne told}; the decision line says each of
        C{logged} (the whole reason, for the operator).
        """
        lines = logged_lines(self)
        answer = yield deferToThread(refused, self.b.port, request)
        self.assertEqual(answer, b"ne " + told)
        for reason in logged:
            assert_logged(self, lines, reason)
        yield self.assertServing()
        return answer

    def test_unknownService(self) -> Any:
        missing = f"{self.b.rundir}/missing does not exist"
        return self.assertRefused(b"missing", b"no such service", missing)

    def test_deniedByDefault(self) -> Any:
        """No rule allows C{ipc}: the default for C{in} denies."""
        return self.assertRefused(b"ipc", b"refused", "denied by default")

    def test_deniedByRule(self) -> Any:
        rule = "denied by rule 1 (deny in secret* *)"
        return self.assertRefused(b"secret", b"refused", rule)

    def test_remotePeerToldNoLocalDetails(self) -> Any:
        """
        A remote peer learns "refused", "no such service", "unavailable"
        or "busy", never RUNDIR's paths, the rules, uids or errno text:
        those stay in the decision line.  A socket nobody listens on.
        """
        stale = os.path.join(self.b.rundir, "stale")
        stale_socket(stale)
        self.addCleanup(os.unlink, stale)
        return self.assertRefused(b"stale", b"unavailable", f"stale socket {stale}")

    def test_invalidName(self) -> Any:
        return self.assertRefused(b"../ipc", b"no such service", "'../ipc'")

    def test_nulInName(self) -> Any:
        return self.assertRefused(b"po\0ng", b"no such service")

    def test_notAscii(self) -> Any:
        return self.assertRefused(b"p\xffng", b"request is not ASCII")

    def test_tooLongRawName(self) -> Any:
        return self.assertRefused(b"p" * 300, b"no such service")

    @inlineCallbacks
    def test_longNameLoggedCut(self) -> Any:
        """
        Upstream's raw form takes a whole read as the name: the decision
        line shows at most its first 255 characters, whatever came (a line
        of bounded size for each request a peer makes).
        """
        lines = logged_lines(self)
        yield self.assertRefused(b"p" * 5000, b"no such service")
        said = [line for line in lines if "longer than 255 bytes" in line]
        self.assertTrue(said, lines)
        for line in said:
            self.assertIn("p" * 255 + "...'", line)
            self.assertLess(len(line), 600, line)

    @inlineCallbacks
    def test_framedRefusalIsFramed(self) -> Any:
        answer = yield deferToThread(refused, self.b.port, encode(b"missing"))
        (size,) = HEADER.unpack(answer[:4])
        self.assertEqual(size, len(answer) - 4)
        self.assertTrue(answer[4:].startswith(b"ne "), answer)
        yield self.assertServing()

    @inlineCallbacks
    def test_framedTooLong(self) -> Any:
        """A framed request announcing more than a name's 255 bytes."""
        answer = yield deferToThread(
            refused, self.b.port, HEADER.pack(256) + b"p" * 256
        )
        self.assertIn(b"ne request of 256 bytes is too long", answer)
        yield self.assertServing()

    @inlineCallbacks
    def test_silentPeerDropped(self) -> Any:
        """A peer that says nothing is dropped at the handshake deadline."""
        answer = yield deferToThread(refused, self.b.port, b"")
        self.assertEqual(answer, b"ne handshake timed out")
        yield self.assertServing()

    @inlineCallbacks
    def test_partialFrameDropped(self) -> Any:
        """Half a framed request, then silence: dropped (framed answer)."""
        answer = yield deferToThread(refused, self.b.port, HEADER.pack(4) + b"po")
        self.assertEqual(answer, encode(b"ne handshake timed out"))
        yield self.assertServing()

    @inlineCallbacks
    def test_eofBeforeRequest(self) -> Any:
        """A peer that connects and half-closes at once is closed."""

        def connect_and_shut() -> bytes:
            with tcp_connect(self.b.port) as sock:
                sock.shutdown(socket.SHUT_WR)
                return recv_eof(sock)

        answer = yield deferToThread(connect_and_shut)
        self.assertEqual(answer, b"")
        yield self.assertServing()

    @inlineCallbacks
    def test_manyRefusalsThenServing(self) -> Any:
        """Refusals of every kind leave no fd behind."""
        before = yield fd_baseline()
        for request in (b"missing", b"ipc", b"secret", b"../x", encode(b"missing")):
            yield deferToThread(refused, self.b.port, request)
        yield self.assertServing()
        yield assert_no_fd_leak(before)


class LifetimeTests(TwoHostsTestCase):
    """Either end dying closes the other; no fd leaks."""

    @inlineCallbacks
    def setUp(self) -> Any:
        yield super().setUp()
        self.sink = digest_service(self, self.b.rundir, "sink", on_eof="ignore")
        self.digest = digest_service(self, self.b.rundir, "digest")
        self.before = yield fd_baseline()

    @inlineCallbacks
    def sinkConnection(self) -> Any:
        """A's client connected to B's sink, with a few bytes through."""
        sock = yield self.lookupOnA("sink")
        yield deferToThread(sock.sendall, b"x" * 1000)
        yield wait_until(
            lambda: self.sink.connections and self.sink.connections[0].count == 1000,
            "the sink to read",
        )
        return sock, self.sink.connections[0]

    @inlineCallbacks
    def test_clientResetClosesService(self) -> Any:
        """
        The client dies (reset): B's relay closes the service side, which
        reads EOF, even though that service keeps its own side open.
        """
        sock, service = yield self.sinkConnection()
        abort(sock)
        yield wait_until(lambda: service.eof, "the service to read EOF")
        yield wait_until(lambda: not self.b.broker.relays, "B's relay to end")
        service.transport.loseConnection()
        yield assert_no_fd_leak(self.before)

    @inlineCallbacks
    def test_clientCloseClosesPongd(self) -> Any:
        """The client closes mid-conversation: pongd's side and the relay end."""
        sock = yield self.lookupOnA("pong")
        echo = yield deferToThread(bounce, sock)
        self.assertEqual(echo, encode(b"bounce me"))
        sock.sendall(b"\x00\x00\x00\x10half a mess")  # mid-message
        sock.close()
        yield wait_until(lambda: not self.b.broker.relays, "B's relay to end")
        yield assert_no_fd_leak(self.before)

    @inlineCallbacks
    def test_serviceDeathClosesClient(self) -> Any:
        """The service dies: A's client reads EOF."""
        sock, service = yield self.sinkConnection()
        service.transport.abortConnection()
        data = yield deferToThread(recv_eof, sock)
        self.assertEqual(data, b"")
        sock.close()
        yield wait_until(lambda: not self.b.broker.relays, "B's relay to end")
        yield assert_no_fd_leak(self.before)

    @inlineCallbacks
    def test_relayDeathClosesBoth(self) -> Any:
        """
        B's relay dies (aborted, as on an error on either of its sockets):
        the client and the service both end.
        """
        sock, service = yield self.sinkConnection()
        [inbound] = inbound_relays(self.b.service)
        relay_loop(self.b.service).abort(inbound.stats)
        data = yield deferToThread(recv_eof, sock)
        self.assertEqual(data, b"")
        sock.close()
        yield wait_until(lambda: service.eof, "the service to read EOF")
        yield wait_until(lambda: not self.b.broker.relays, "B's relay to end")
        service.transport.loseConnection()
        yield assert_no_fd_leak(self.before)

    @inlineCallbacks
    def test_halfClose(self) -> Any:
        """
        The client shuts down its sending side: the service sees EOF, and its
        answer still comes back.
        """
        sock = yield self.lookupOnA("digest")

        def send_and_shut() -> bytes:
            sock.sendall(b"hello, half-closed world")
            sock.shutdown(socket.SHUT_WR)
            return recv_all(sock)

        answer = yield deferToThread(send_and_shut)
        expected = hashlib.sha256(b"hello, half-closed world").hexdigest()
        self.assertEqual(answer, f"24 {expected}".encode())
        self.assertTrue(self.digest.connections[0].eof)
        sock.close()
        yield wait_until(lambda: not self.b.broker.relays, "B's relay to end")
        yield assert_no_fd_leak(self.before)


def stalled(sock: socket.socket, inbound: Any) -> Any:
    """
    Send from C{sock} until it blocks with B's relay (side C{inbound})
    holding bytes for a service that does not read; what was sent, hashed.
    """
    sock.setblocking(False)
    chunk = os.urandom(1 << 20)
    digest = hashlib.sha256()
    sent = 0

    def full() -> bool:
        nonlocal sent
        try:
            count = sock.send(chunk)
        except BlockingIOError:
            return not inbound.reading
        digest.update(chunk[:count])
        sent += count
        return False

    d = wait_until(full, "the client's sends to stall")
    d.addCallback(lambda _: (sent, digest))
    return d


class RelayOnBTestCase(TestCase):
    """
    Host B alone, with a sink and a service that does not read (until
    told to), and plain TCP clients of its tcpd.
    """

    limits: dict[str, Any] = {}

    @inlineCallbacks
    def setUp(self) -> Any:
        self.b = yield start_host(self, rules=B_RULES, limits=self.limits)
        self.sink = digest_service(self, self.b.rundir, "sink", on_eof="ignore")
        self.stalled = digest_service(self, self.b.rundir, "stalled", start_paused=True)
        self.before = yield fd_baseline()

    @inlineCallbacks
    def request(self, service: str) -> Any:
        """A raw request on B for C{service}: the client's socket and B's relay."""
        sock, answer = yield deferToThread(raw_request, self.b.port, service.encode())
        self.addCleanup(sock.close)
        self.assertEqual(answer, OK)
        [inbound] = yield wait_until(
            lambda: inbound_relays(self.b.service), "B's relay"
        )
        return sock, inbound

    @inlineCallbacks
    def ended(self, sock: socket.socket, *services: Any) -> Any:
        """
        B's relay ends; once the client and the services close, no fd is
        left open.
        """
        yield wait_until(lambda: not self.b.broker.relays, "B's relay to end")
        self.assertEqual(inbound_relays(self.b.service), [])
        sock.close()
        for service in services:
            service.transport.abortConnection()
            yield service.lost
        yield assert_no_fd_leak(self.before)


class HangupTests(RelayOnBTestCase):
    """
    A hangup or a reset on either side ends B's relay even while it reads
    neither side (its receiver does not read); a half-close does not.
    """

    @inlineCallbacks
    def test_clientResetWhileServiceStalls(self) -> Any:
        """
        The client sends to a service that does not read until everything
        is full, and dies with a reset (SO_LINGER 0): B's relay, which was
        reading neither side, ends.
        """
        sock, inbound = yield self.request("stalled")
        yield stalled(sock, inbound)
        abort(sock)
        yield self.ended(sock, *self.stalled.connections)

    @inlineCallbacks
    def test_serviceDeathWhileClientStalls(self) -> Any:
        """
        The service sends to a client that does not read until the relay
        holds bytes for it, and dies leaving the client's bytes unread (a
        reset on AF_UNIX): B's relay ends, and the client reads EOF.
        """
        sock, inbound = yield self.request("stalled")
        yield deferToThread(sock.sendall, b"never read")
        [service] = yield wait_until(lambda: self.stalled.connections, "the service")
        service.transport.write(b"y" * (16 << 20))
        yield wait_until(lambda: inbound.owed, "the relay to hold bytes")
        service.transport.abortConnection()
        yield wait_until(lambda: not self.b.broker.relays, "B's relay to end")
        yield deferToThread(recv_eof, sock)
        yield self.ended(sock, service)

    @inlineCallbacks
    def test_serviceCloseEndsRelay(self) -> Any:
        """
        The service answers and closes (a hangup): the client gets the
        answer and EOF, and the relay ends without waiting for the client,
        which keeps its socket open (the service is gone).
        """
        sock, inbound = yield self.request("sink")
        [service] = yield wait_until(lambda: self.sink.connections, "the service")
        service.transport.write(b"bye")
        service.transport.loseConnection()
        yield wait_until(lambda: not self.b.broker.relays, "B's relay to end")
        self.assertEqual((yield deferToThread(recv_all, sock)), b"bye")
        yield self.ended(sock)

    @inlineCallbacks
    def test_halfCloseWithPendingData(self) -> Any:
        """
        The client half-closes while the relay holds its bytes for a service
        that does not read yet: once the service reads, every byte arrives,
        then the EOF, and the service's answer comes back.
        """
        sock, inbound = yield self.request("stalled")
        sent, digest = yield stalled(sock, inbound)
        sock.shutdown(socket.SHUT_WR)
        [service] = self.stalled.connections
        service.transport.resumeProducing()
        sock.settimeout(TIMEOUT)
        answer = yield deferToThread(recv_all, sock)
        self.assertEqual(answer, f"{sent} {digest.hexdigest()}".encode())
        yield service.lost
        yield self.ended(sock)


class IdleTests(RelayOnBTestCase):
    """B's relays with a short idle deadline."""

    limits = {"idle_timeout": 1}

    @inlineCallbacks
    def test_idleRelayClosed(self) -> Any:
        """Nothing moves: the relay is closed, and both ends read EOF."""
        sock, inbound = yield self.request("sink")
        yield wait_until(lambda: not self.b.broker.relays, "the relay to end")
        self.assertEqual((yield deferToThread(recv_eof, sock)), b"")
        [service] = self.sink.connections
        yield wait_until(lambda: service.eof, "the service to read EOF")
        yield self.ended(sock, service)

    @inlineCallbacks
    def test_stalledRelayClosed(self) -> Any:
        """A service that never reads: the stalled relay is closed."""
        sock, inbound = yield self.request("stalled")
        try:
            yield stalled(sock, inbound)
        except ConnectionError:
            pass  # the relay was closed first: the deadline's work too
        yield self.ended(sock, *self.stalled.connections)


MB = 1024 * 1024


def send_bulk(sock: socket.socket, megabytes: int) -> tuple[str, bytes]:
    """Send C{megabytes} MiB, half-close, read the answer; return our digest."""
    block = os.urandom(MB)
    digest = hashlib.sha256()
    for i in range(megabytes):
        chunk = i.to_bytes(8, "big") + block[8:]
        digest.update(chunk)
        sock.sendall(chunk)
    sock.shutdown(socket.SHUT_WR)
    return digest.hexdigest(), recv_all(sock)


class BulkTests(TwoHostsTestCase):
    @inlineCallbacks
    def test_100MBUnderBackpressure(self) -> Any:
        """
        100 MiB from A's client to a service on B that does not read at
        first: B's relay pauses reading from TCP instead of buffering, and
        once the service reads, everything arrives intact.
        """
        megabytes = 100
        sink = digest_service(self, self.b.rundir, "digest", start_paused=True)
        sock = yield self.lookupOnA("digest")
        sock.settimeout(60)  # the bulk send waits on the paused receiver
        sending = deferToThread(send_bulk, sock, megabytes)
        yield wait_until(lambda: sink.connections, "the service to be connected")
        [inbound] = inbound_relays(self.b.service)
        relays = relay_loop(self.b.service)
        samples: list[int] = []

        def sample() -> None:
            samples.append(relays.buffered())

        sampler = LoopingCall(sample)
        sampler.start(0.005)
        self.addCleanup(lambda: sampler.running and sampler.stop())
        # The receiver does not read: the relay pauses its TCP side.
        yield wait_until(lambda: not inbound.reading, "the relay to pause TCP")
        paused_at = sum(c.count for c in sink.connections)
        self.assertEqual(paused_at, 0)
        self.assertFalse(sending.called)
        sink.connections[0].transport.resumeProducing()
        mine, answer = yield sending
        sampler.stop()
        self.assertEqual(answer, f"{megabytes * MB} {mine}".encode())
        # Never more than one read's worth held by the relay per direction.
        self.assertLessEqual(max(samples), 2 * READ_SIZE)
        yield wait_until(lambda: not self.b.broker.relays, "B's relay to end")
        stats = sink.connections[0]
        self.assertEqual(stats.count, megabytes * MB)


class ControlSocketTests(TwoHostsTestCase):
    """A fake upstream ipcd on A's C{RUNDIR/tcp}."""

    def control(self, uri: bytes) -> tuple[socket.socket, bytes]:
        sock = connect_unix(os.path.join(self.a.rundir, "tcp"))
        try:
            sock.sendall(encode(uri))
            return sock, framed_reply(sock)
        except BaseException:
            sock.close()
            raise

    @inlineCallbacks
    def test_uriOkThenRelay(self) -> Any:
        uri = self.b.route("pong").encode()
        sock, answer = yield deferToThread(self.control, uri)
        self.addCleanup(sock.close)
        self.assertEqual(answer, OK)
        for payload in (b"bounce me", b"second", b"y" * 100000):
            echo = yield deferToThread(bounce, sock, payload)
            self.assertEqual(echo, encode(payload))
        [stats] = self.a.broker.relays
        self.assertEqual(
            (stats.direction, stats.service, stats.route), ("out", "pong", uri.decode())
        )
        self.assertEqual(stats.forward, stats.backward)
        self.assertEqual(stats.forward, 3 * 4 + 9 + 6 + 100000)

    @inlineCallbacks
    def test_upstreamBytes(self) -> Any:
        """Exactly C{00 00 00 02 6f 6b} once the remote side accepted."""

        def exchange() -> bytes:
            with connect_unix(os.path.join(self.a.rundir, "tcp")) as sock:
                sock.sendall(encode(self.b.route("pong").encode()))
                return recv_exactly(sock, 6)

        answer = yield deferToThread(exchange)
        self.assertEqual(answer, b"\x00\x00\x00\x02\x6f\x6b")

    @inlineCallbacks
    def assertControlRefused(self, uri: bytes, reason: bytes) -> Any:
        sock, answer = yield deferToThread(self.control, uri)
        with sock:
            rest = yield deferToThread(recv_eof, sock)
        self.assertEqual(rest, b"")
        self.assertTrue(answer.startswith(b"ne "), answer)
        self.assertIn(reason, answer)
        sock, answer = yield deferToThread(self.control, self.b.route("pong").encode())
        sock.close()
        self.assertEqual(answer, OK)

    def test_badUri(self) -> Any:
        return self.assertControlRefused(b"not a uri", b"ne ")

    def test_otherScheme(self) -> Any:
        return self.assertControlRefused(b"udp://127.0.0.1:9/pong", b"tcp:// URIs only")

    def test_remoteRefusal(self) -> Any:
        # B told this ipcd's tcpd (a remote peer) "refused"; the control
        # socket's client (local) is told that whole.
        port = self.b.port
        told = f"tcpd at 127.0.0.1:{port} refused 'secret': refused".encode()
        return self.assertControlRefused(self.b.route("secret").encode(), told)


class StatsTests(TwoHostsTestCase):
    @inlineCallbacks
    def test_countersAfterRoundTrip(self) -> Any:
        """B's relay counts bytes after the handshake, each way."""
        sock, answer = yield deferToThread(raw_request, self.b.port, b"pong")
        self.addCleanup(sock.close)
        self.assertEqual(answer, OK)
        for payload in (b"bounce me", b"z" * 1000):
            yield deferToThread(bounce, sock, payload)
        [stats] = self.b.broker.relays
        self.assertEqual((stats.forward, stats.backward), (13 + 1004, 13 + 1004))
        self.assertEqual((stats.direction, stats.service), ("in", "pong"))
        self.assertEqual(stats.labels, ("ip:127.0.0.1",))
        report = stats.as_dict()
        self.assertEqual((report["bytes_in"], report["bytes_out"]), (1017, 1017))
        sock.close()
        yield wait_until(lambda: not self.b.broker.relays, "the relay to end")

    @inlineCallbacks
    def test_oneWayCounts(self) -> Any:
        """Bytes only one way: the other counter stays 0."""
        sink = digest_service(self, self.b.rundir, "sink", on_eof="ignore")
        sock, answer = yield deferToThread(raw_request, self.b.port, b"sink")
        self.addCleanup(sock.close)
        self.assertEqual(answer, OK)
        yield deferToThread(sock.sendall, b"q" * 5000)
        yield wait_until(
            lambda: sink.connections and sink.connections[0].count == 5000,
            "the sink to read",
        )
        [stats] = self.b.broker.relays
        self.assertEqual((stats.forward, stats.backward), (5000, 0))


class UnexpectedErrorTests(TestCase):
    """tcpd's requests that fail unexpectedly: a peer's to repeat."""

    @inlineCallbacks
    def test_loggedAtABoundedRate(self) -> Any:
        """
        Once ipcd has no fd left, each peer's request fails with an
        unexpected error (C{ne internal error}): its line, with the
        traceback, goes at the bounded rate of failed handshakes, and those
        left out are counted.
        """
        b = yield start_host(self, ["allow in pong"])

        def ask(peers: int) -> list[bytes]:
            answers = []
            for _ in range(peers):
                with tcp_connect(b.port) as sock:
                    sock.sendall(b"pong")
                    answers.append(recv_eof(sock))
            return answers

        answers = yield assert_unexpected_bounded(
            self,
            b.broker.counters,
            "ipcd.tcpd.handshakes",
            ask,
            "request from 127.0.0.1:",
        )
        for answer in answers:
            self.assertIn(b"internal error", answer)


class RouteLoopTests(TestCase):
    """A route that leads back into this very ipcd, through its own tcpd."""

    @inlineCallbacks
    def start(self) -> Any:
        """ipcd whose admin route for C{loopy} is its own tcpd's C{loopy}."""
        port = free_port()
        rundir = short_rundir(self, "ipcd-loop-")
        config = make_config(
            rundir,
            tcpd={"listen": f"tcp:{port}:interface=127.0.0.1"},
            rules=["allow in loopy", "allow in pong"],
            routes={"loopy": f"tcp://127.0.0.1:{port}/loopy"},
        )
        service = yield start_ipcd(self, config)
        yield service.getServiceNamed("tcpd").listening()
        return rundir, port, service.broker

    @inlineCallbacks
    def test_routedOutAgainRefused(self) -> Any:
        """
        A request that came back in from this ipcd and would go out again
        is refused as a loop at once: one hop, not one per connection the
        limits allow (128 from one lookup before).
        """
        rundir, _port, broker = yield self.start()
        lines = logged_lines(self)
        reply = yield deferToThread(lookup, rundir, b"loopy")
        assert_refused(self, reply, "'loopy': unavailable")
        assert_logged(self, lines, "route loop: 'loopy'")
        self.assertEqual(broker.counters["inbound requests"], 1)
        self.assertEqual(len(broker.own_dials), 0)

    @inlineCallbacks
    def test_servedHere(self) -> Any:
        """A route to this ipcd's own tcpd for a local service still works."""
        rundir, port, broker = yield self.start()
        route = f"pong;pong tcp://127.0.0.1:{port}/pong"
        reply = yield deferToThread(lookup, rundir, route.encode())
        sock = reply.take_socket(self)
        answer = yield deferToThread(bounce, sock, b"round")
        self.assertEqual(answer, encode(b"round"))
        self.assertEqual(broker.counters["inbound requests"], 1)
        self.assertEqual(len(broker.own_dials), 0)


class DualStackTests(TestCase):
    """
    A dual-stack listener (C{tcp6:...:interface=::}) sees an IPv4 peer as
    C{::ffff:a.b.c.d}: every C{ip:} pattern sees it as the IPv4 peer it is,
    a glob (C{ip:127.*}) as well as a network (C{ip:127.0.0.0/8}).
    """

    @inlineCallbacks
    def test_ipGlobSeesAnIPv4Peer(self) -> Any:
        try:
            socket.socket(socket.AF_INET6).close()
        except OSError as e:
            raise SkipTest(f"no IPv6 here: {e}") from None
        host = yield start_host(
            self,
            ["deny in pong ip:127.*", "allow in pong"],
            listen="tcp6:0:interface=\\:\\:",
        )
        sock, answer = yield deferToThread(raw_request, host.port, b"pong")
        sock.close()
        self.assertEqual(answer, b"ne", "let in over IPv4 past 'deny in pong ip:127.*'")
        lines = logged_lines(self)
        answer = yield deferToThread(refused, host.port, b"pong")
        self.assertEqual(answer, b"ne refused")
        assert_logged(self, lines, "denied by rule 1 (deny in pong ip:127.*)")

    @inlineCallbacks
    def test_mappedAddressSeesAnIPv4Peer(self) -> Any:
        """
        A rule naming the peer as the log prints it (C{[::ffff:127.0.0.1]}),
        an address or network in IPv4-mapped form, matches it: it matched
        no one, and the deny let it in.
        """
        try:
            socket.socket(socket.AF_INET6).close()
        except OSError as e:
            raise SkipTest(f"no IPv6 here: {e}") from None
        for pattern in ("ip:::ffff:127.0.0.1", "ip:::ffff:127.0.0.0/104"):
            host = yield start_host(
                self,
                [f"deny in pong {pattern}", "allow in pong"],
                listen="tcp6:0:interface=\\:\\:",
            )
            sock, answer = yield deferToThread(raw_request, host.port, b"pong")
            sock.close()
            self.assertEqual(answer, b"ne", f"let in over IPv4 past {pattern}")
            lines = logged_lines(self)
            answer = yield deferToThread(refused, host.port, b"pong")
            self.assertEqual(answer, b"ne refused")
            assert_logged(self, lines, f"denied by rule 1 (deny in pong {pattern})")
