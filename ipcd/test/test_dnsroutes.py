"""
Routes that name a DNS SRV owner, end to end: an authoritative DNS server
in this process on loopback (twisted.names' server, L{dnssupport}), ipcd
host A resolving C{tcp://_ipc._tcp.example.test/pong} (and tls://, ws://)
through it, and hosts B serving pong on the ports its records name.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import struct
import textwrap
import tomllib
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.names import client, dns, error
from twisted.trial.unittest import TestCase

from ipcd import control, srvroutes
from ipcd.control import format_status, status_report
from ipcd.srvresolver import QuietResolver
from ipcd.srvroutes import MAX_REASON, SrvRoutes
from ipcd.test.dnssupport import (
    DnsServer,
    full_backlog_port,
    refused_port,
    silent_port,
)
from ipcd.test.support import (
    TIMEOUT,
    assert_no_fd_leak,
    assert_refused,
    bounce,
    fd_baseline,
    logged_lines,
    lookup,
    make_config,
    short_rundir,
    wait_until,
)
from ipcd.test.tcpsupport import start_host
from ipcd.test.tlssupport import TestCA, start_tls_host
from ipcd.test.udpsupport import start_udp_host
from ipcd.test.wssupport import start_ws_host
from ipcd.wire import encode

OK = b"ok"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OWNER = "_ipc._tcp.example.test"
ROUTE = f"tcp://{OWNER}/pong"


def srv(priority: int, weight: int, port: Any, target: str = "localhost.") -> str:
    """A zone file line: an SRV record of OWNER."""
    return f"_ipc._tcp IN SRV {priority} {weight} {port} {target}\n"


class SrvTestCase(TestCase):
    """A DNS server, and host A asking it (C{[dns] servers}) for its routes."""

    dns_settings: dict[str, Any] = {}

    @inlineCallbacks
    def startA(self, records: str, **overrides: Any) -> Any:
        self.dns = DnsServer(self, records)
        dns = {"servers": [self.dns.address], **self.dns_settings}
        self.a = yield start_host(self, pongd=False, dns=dns, **overrides)
        return self.a

    def inject(self, **kwargs: Any) -> SrvRoutes:
        """A's SRV routes with an injected clock or random (its resolver real)."""
        self.a.broker.srv = SrvRoutes(reactor, **kwargs)
        return self.a.broker.srv

    @inlineCallbacks
    def lookupOnA(self, route: str = ROUTE, rundir: str | None = None) -> Any:
        payload = f"pong;pong {route}".encode()
        reply = yield deferToThread(lookup, rundir or self.a.rundir, payload)
        return reply

    @inlineCallbacks
    def assertPong(self, route: str, rundir: str | None = None) -> Any:
        """A lookup on A (or C{rundir}'s ipcd) through C{route} echoes."""
        reply = yield self.lookupOnA(route, rundir)
        self.assertEqual((reply.first, len(reply.fds)), (OK, 1), reply.data)
        sock = reply.take_socket(self)
        echo = yield deferToThread(bounce, sock)
        self.assertEqual(echo, encode(b"bounce me"))
        return sock

    @inlineCallbacks
    def assertReaches(self, port: int, route: str = ROUTE) -> Any:
        """A lookup on A reaches pongd through B's tcpd at C{port}."""
        sock = yield self.assertPong(route)
        self.assertEqual(sock.getpeername(), ("127.0.0.1", port))

    @inlineCallbacks
    def assertRefused(self, *words: str, route: str = ROUTE) -> Any:
        reply = yield self.lookupOnA(route)
        return assert_refused(self, reply, *words)

    def status(self) -> str:
        return format_status(status_report(self.a.broker), wide=True)


class TcpRouteTests(SrvTestCase):
    @inlineCallbacks
    def test_clientRoute(self) -> Any:
        """
        A client's C{tcp://_ipc._tcp.DOMAIN/pong} reaches the target's
        pongd; the decision log names the target that served.
        """
        logged: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            logged.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        b = yield start_host(self, rules=["allow in pong"])
        yield self.startA(srv(10, 0, b.port))
        yield self.assertReaches(b.port)
        decided = f"-> {ROUTE}: ok (allowed by default; SRV target localhost:{b.port})"
        yield wait_until(
            lambda: any(decided in line for line in logged), "the decision line"
        )

    @inlineCallbacks
    def test_adminRoute(self) -> Any:
        """
        An admin's route names the owner too; before any lookup, status says
        it is not resolved yet, after it what it resolved to.
        """
        b = yield start_host(self, rules=["allow in pong"])
        yield self.startA(srv(10, 5, b.port), routes={"pong": ROUTE})
        self.assertIn(f"  {OWNER}: not resolved yet", self.status())
        reply = yield deferToThread(lookup, self.a.rundir, b"pong;")
        self.assertEqual((reply.first, len(reply.fds)), (OK, 1), reply.data)
        reply.close_fds()
        self.assertIn(
            f"    localhost:{b.port} priority 10 weight 5", self.status().splitlines()
        )
        # And as `ipcd status --json` gets it, through the control socket.
        report = yield deferToThread(control.request, "status", self.a.rundir)
        target = {"target": "localhost", "port": b.port, "priority": 10, "weight": 5}
        self.assertEqual(report["dns"][OWNER]["targets"], [target])
        self.assertGreater(report["dns"][OWNER]["ttl_left"], 0)
        # A reload forgets what names resolved to.
        self.a.broker.config = dataclasses.replace(self.a.broker.config)
        self.assertIn(f"  {OWNER}: not resolved yet", self.status())

    @inlineCallbacks
    def test_injectedResolver(self) -> Any:
        """
        The resolver is injectable: here the zone itself, which answers at
        once (no DNS message), instead of one asking [dns] servers.
        """
        b = yield start_host(self, rules=["allow in pong"])
        yield self.startA(srv(10, 0, b.port))
        zone = self.dns.zone
        self.dns.serve("")  # the server knows the name no more
        self.inject(resolver=zone)
        yield self.assertReaches(b.port)
        self.assertEqual(zone.queries[OWNER.lower()], 1)

    @inlineCallbacks
    def test_lowestPriorityFirst(self) -> Any:
        """Of two live targets, the one with the lowest priority is used."""
        b1 = yield start_host(self, rules=["allow in pong"])
        b2 = yield start_host(self, rules=["allow in pong"])
        yield self.startA(srv(20, 100, b2.port) + srv(10, 0, b1.port))
        for _ in range(3):
            yield self.assertReaches(b1.port)

    @inlineCallbacks
    def test_weightPicksWithinAPriority(self) -> Any:
        """
        Within a priority, the (injected) random number picks by the
        running sum of weights: 0 picks the weight-0 record, the total the
        other.
        """
        b1 = yield start_host(self, rules=["allow in pong"])
        b2 = yield start_host(self, rules=["allow in pong"])
        yield self.startA(srv(10, 0, b1.port) + srv(10, 10, b2.port))
        self.inject(randint=lambda low, high: low)
        yield self.assertReaches(b1.port)
        self.inject(randint=lambda low, high: high)
        yield self.assertReaches(b2.port)

    @inlineCallbacks
    def test_targetDownGivesWay(self) -> Any:
        """A target that refuses connections: the next one is used."""
        b = yield start_host(self, rules=["allow in pong"])
        yield self.startA(srv(10, 0, refused_port()) + srv(20, 0, b.port))
        yield self.assertReaches(b.port)

    @inlineCallbacks
    def test_silentTargetGivesWay(self) -> Any:
        """
        Targets that do not answer, one whose connection never completes
        (a full accept queue) and one that accepts but never answers, each
        give way after [dns] target_timeout (1 s here; the whole lookup may
        take 30).
        """
        b = yield start_host(self, rules=["allow in pong"])
        self.dns_settings = {"target_timeout": 1}
        full, silent = full_backlog_port(self), silent_port(self)
        yield self.startA(
            srv(10, 0, full) + srv(20, 0, silent) + srv(30, 0, b.port),
            ipcd={"connect_timeout": 30},
        )
        yield self.assertReaches(b.port)

    @inlineCallbacks
    def test_wholeAttemptBounded(self) -> Any:
        """
        Targets that never answer: [ipcd] connect_timeout bounds the whole
        attempt, not each target, and the sockets to them are closed.
        """
        self.dns_settings = {"target_timeout": 1}
        ports = [silent_port(self), full_backlog_port(self)]
        yield self.startA(
            "".join(srv(i, 0, ports[i % 2]) for i in range(8)),
            ipcd={"connect_timeout": 2.5},
        )
        before = yield fd_baseline()
        yield self.assertRefused(f"connecting to {ROUTE} timed out after 2.5 s")
        yield assert_no_fd_leak(before)

    @inlineCallbacks
    def test_remoteRefusalGivesWay(self) -> Any:
        """A tcpd that refuses the service (its ne): the next target is tried."""
        closed = yield start_host(self)  # denies every inbound service
        b = yield start_host(self, rules=["allow in pong"])
        yield self.startA(srv(10, 0, closed.port) + srv(20, 0, b.port))
        yield self.assertReaches(b.port)

    @inlineCallbacks
    def test_allTargetsDown(self) -> Any:
        """None answers: the client hears why, per target; status keeps it."""
        down = [refused_port(), refused_port()]
        yield self.startA(srv(10, 0, down[0]) + srv(20, 0, down[1]))
        text = yield self.assertRefused(
            f"SRV {OWNER}: none of its 2 targets tried answered",
            f"cannot connect to tcpd at localhost:{down[0]}",
            f"cannot connect to tcpd at localhost:{down[1]}",
        )
        self.assertIn(f"  {OWNER}: last failure: {text[3:]}", self.status())

    @inlineCallbacks
    def test_targetsReasonsCut(self) -> Any:
        """
        What each target says is cut to MAX_REASON characters: targets a
        zone names cannot make the client's answer, the log line or what
        status keeps per owner (max_names of them) long.
        """
        port = reactor.listenTCP(0, Factory.forProtocol(Verbose), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        verbose = port.getHost().port
        yield self.startA("".join(srv(i, 0, verbose) for i in range(3)))
        text = yield self.assertRefused(
            f"SRV {OWNER}: none of its 3 targets tried answered",
            f"tcpd at localhost:{verbose} refused 'pong': xxx",
        )
        self.assertLess(len(text), 4 * MAX_REASON)
        last_error = self.a.broker.srv.last_errors[OWNER]
        self.assertEqual(last_error, text[3:])


class Verbose(Protocol):
    """A tcpd that refuses every service at length (4,000 bytes of reason)."""

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's)
        self.transport.write(b"ne " + b"x" * 4000)
        self.transport.loseConnection()


class AnswerTests(SrvTestCase):
    @inlineCallbacks
    def test_dotTarget(self) -> Any:
        """The target '.' (RFC 2782): a clear refusal, no connection tried."""
        yield self.startA(srv(0, 0, 0, "."))
        yield self.assertRefused(
            f"SRV {OWNER}: the service is decidedly not available (target '.')"
        )

    @inlineCallbacks
    def test_nxdomain(self) -> Any:
        """A name that does not exist: said so, and in the status."""
        yield self.startA("")
        yield self.assertRefused(f"SRV {OWNER}: no such name (NXDOMAIN)")
        self.assertIn(f"  {OWNER}: no such name (NXDOMAIN), ttl", self.status())

    @inlineCallbacks
    def test_dnsSilent(self) -> Any:
        """A DNS server that never answers: said so (after 1 + 3 s)."""
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(silent.close)
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        yield self.startA("", ipcd={"connect_timeout": 30})
        self.a.broker.config = dataclasses.replace(
            self.a.broker.config, dns_servers=(("127.0.0.1", port),)
        )
        yield self.assertRefused(f"SRV {OWNER}: no answer from DNS (timed out)")

    @inlineCallbacks
    def test_aliasAtTheOwner(self) -> Any:
        """
        An owner that is an alias (CNAME) is said to be one, with what it
        points at; ipcd asks for SRV records at the owner itself and does
        not follow it (the answer may hold the alias's records: unused).
        """
        yield self.startA(
            "_ipc._tcp IN CNAME _pong._tcp.example.test.\n"
            "_pong._tcp IN SRV 0 0 9 localhost.\n"
        )
        yield self.assertRefused(
            f"SRV {OWNER}: an alias (CNAME) of '_pong._tcp.example.test', "
            "not followed: name the SRV owner itself in the route"
        )

    @inlineCallbacks
    def test_invalidTargetRefused(self) -> Any:
        """A target that is not a valid host name is never dialed."""
        yield self.startA(srv(0, 0, 9, "bad_name.example.test."))
        yield self.assertRefused(
            "no valid target (not host names: 'bad_name.example.test':9)"
        )

    @inlineCallbacks
    def test_hostileZone(self) -> Any:
        """
        Hundreds of records for the owner (all down): ipcd tries [dns]
        max_targets of them (3 here), keeps 32, and says so.
        """
        self.dns_settings = {"max_targets": 3}
        records = "".join(srv(i % 7, i % 5, 1000 + i) for i in range(2000))
        yield self.startA(records)
        yield self.assertRefused(f"SRV {OWNER}: none of its 3 targets tried answered")
        kept = self.a.broker.srv.status(self.a.broker.config)[OWNER]["targets"]
        self.assertEqual(len(kept), 32)
        self.assertEqual({t["priority"] for t in kept}, {0})


def _received(sock: socket.socket, size: int = 65536) -> Any:
    """What a non-blocking C{sock} has to read now (data and sender), or None."""
    try:
        return sock.recvfrom(size)
    except BlockingIOError:
        return None


class DnsSocketTestCase(SrvTestCase):
    """A, asking DNS at a UDP socket of the test's, which answers as told."""

    @inlineCallbacks
    def startOn(self, server: socket.socket) -> Any:
        """A, asking DNS at C{server}."""
        self.addCleanup(server.close)
        if server.getsockname()[1] == 0:  # not bound yet
            server.bind(("127.0.0.1", 0))
        server.setblocking(False)
        yield self.startA("", ipcd={"connect_timeout": 30})
        self.a.broker.config = dataclasses.replace(
            self.a.broker.config, dns_servers=(server.getsockname(),)
        )
        self.lines = logged_lines(self)

    def nxdomain(self, asked: dns.Message, **flags: Any) -> bytes:
        answer = dns.Message(id=asked.id, answer=1, rCode=dns.ENAME, **flags)
        answer.queries = asked.queries
        return answer.toStr()


class StrayMessageTests(DnsSocketTestCase):
    """
    While ipcd waits for a DNS answer, messages that answer nothing it asked
    (the server's, or anyone's who can reach the query's port) cost no log
    line, and the real answer is still taken.
    """

    NOISE = ("Unexpected message", "Truncated packet", "Invalid packet")
    # Twisted's lines for each query's port under twistd's own log observer
    # (ipcd's leave out those for ports starting and stopping).
    NOISE += ("Starting protocol", "Stopping protocol")

    def stray(self, asked: dns.Message) -> list[bytes]:
        """
        Messages that answer nothing: cut short and unreadable ones under
        the query's own id, and a well-formed answer to no query of ipcd's.
        """
        live = struct.pack("!H", asked.id)
        # A question whose name points at itself: a compression loop.
        looped = live + struct.pack("!5H", 0x8180, 1, 0, 0, 0) + b"\xc0\x0c"
        other = dns.Message(id=(asked.id + 1) % 65536, answer=1)
        return [live, looped + b"\x00\x21\x00\x01", b"\x00", other.toStr()] * 10

    def assertQuiet(self) -> None:
        noise = [line for line in self.lines if any(n in line for n in self.NOISE)]
        self.assertEqual(noise, [])

    @inlineCallbacks
    def test_overUdp(self) -> Any:
        """On the UDP port a query waits on."""
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        yield self.startOn(server)
        replied = self.lookupOnA()
        query, source = yield wait_until(lambda: _received(server), "a DNS query")
        asked = dns.Message()
        asked.fromStr(query)
        other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(other.close)
        for sender in (server, other):
            for data in self.stray(asked):
                sender.sendto(data, source)
        server.sendto(self.nxdomain(asked), source)
        reply = yield replied
        assert_refused(self, reply, f"SRV {OWNER}: no such name (NXDOMAIN)")
        self.assertQuiet()
        # The server's were read and dropped; the other sender's never reach
        # ipcd (the query's socket is connected to the server).
        self.assertEqual(self.a.broker.counters["dns messages ignored"], 40)

    @inlineCallbacks
    def test_overTcp(self) -> Any:
        """The same on the TCP connection a truncated answer makes ipcd open."""
        server, listening = _tcp_and_udp()
        self.addCleanup(listening.close)
        yield self.startOn(server)
        listening.listen(1)
        listening.setblocking(False)
        replied = self.lookupOnA()
        query, source = yield wait_until(lambda: _received(server), "a DNS query")
        asked = dns.Message()
        asked.fromStr(query)
        server.sendto(self.nxdomain(asked, trunc=1), source)
        accepted = yield wait_until(lambda: _received_connection(listening), "TCP")
        self.addCleanup(accepted.close)
        first, _ = yield wait_until(lambda: _received(accepted, 2), "a query")
        framed = first + _exactly(accepted, 2 - len(first))
        (size,) = struct.unpack("!H", framed)
        accepted.setblocking(True)
        asked.fromStr(_exactly(accepted, size))
        for data in [*self.stray(asked), self.nxdomain(asked)]:
            accepted.sendall(struct.pack("!H", len(data)) + data)
        reply = yield replied
        assert_refused(self, reply, f"SRV {OWNER}: no such name (NXDOMAIN)")
        self.assertQuiet()
        self.assertEqual(self.a.broker.counters["dns messages ignored"], 40)


class GoneClientTests(DnsSocketTestCase):
    dns_settings = {"max_names": 2}

    @inlineCallbacks
    def test_queryEndsWithItsLastClient(self) -> Any:
        """
        Clients that go while DNS is asked for owners of their own end those
        queries: their sockets closed, their places among the [dns]
        max_names names in flight given back, nothing cached for them
        (else two lookups, their clients gone at once, would hold both
        places here for as long as DNS takes).
        """
        self.patch(srvroutes, "QUERY_TIMEOUTS", (300,))  # DNS takes that long
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        yield self.startOn(server)
        before = yield fd_baseline()
        clients = []
        for i in range(2):
            client = socket.socket(socket.AF_UNIX)
            clients.append(client)
            client.connect(os.path.join(self.a.rundir, "ipc"))
            client.sendall(encode(f"x;x tcp://_s{i}._tcp.example.test/x".encode()))
            yield wait_until(lambda: _received(server), "the DNS query")
        for client in clients:
            client.close()
        yield assert_no_fd_leak(before, timeout=30)
        replied = self.lookupOnA()
        query, source = yield wait_until(lambda: _received(server), "a DNS query")
        asked = dns.Message()
        asked.fromStr(query)
        server.sendto(self.nxdomain(asked), source)
        reply = yield replied
        assert_refused(self, reply, f"SRV {OWNER}: no such name (NXDOMAIN)")
        self.assertEqual(list(self.a.broker.srv.status(self.a.broker.config)), [OWNER])


class QuietResolverTests(TestCase):
    @inlineCallbacks
    def test_eachServerInTurn(self) -> Any:
        """
        Silent servers: each is asked, then each again with the next timeout
        (under the first query's id), then the lookup times out.
        """
        servers = []
        for _ in range(2):
            server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.addCleanup(server.close)
            server.bind(("127.0.0.1", 0))
            server.setblocking(False)
            servers.append(server)
        resolver = QuietResolver([s.getsockname() for s in servers], reactor)
        asked = resolver.lookupService(OWNER, timeout=(0.1, 0.2))
        yield self.assertFailure(asked, error.TimeoutError)
        ids = []
        for index, server in enumerate(servers):
            while (received := _received(server)) is not None:
                ids.append((index, received[0][:2]))
        self.assertEqual([index for index, _ in ids], [0, 0, 1, 1])
        self.assertEqual(len({query_id for _, query_id in ids}), 1)

    @inlineCallbacks
    def test_unconnectableServer(self) -> Any:
        """
        A server that the query's socket cannot be connected to (a link-local
        address with its scope) is asked as twisted.names' own resolver asks
        it, with the same outcome; no fd is left open.
        """
        before = yield fd_baseline()
        server = ("fe80::1%lo", 53)
        outcomes = []
        for resolver in (
            client.Resolver(servers=[server], reactor=reactor),
            QuietResolver([server], reactor),
        ):
            result = yield resolver.lookupService(OWNER, timeout=(0.1,)).addErrback(
                lambda failure: failure.value
            )
            outcomes.append(type(result))
        self.assertEqual(outcomes[1], outcomes[0])
        yield assert_no_fd_leak(before)


def _tcp_and_udp() -> tuple[socket.socket, socket.socket]:
    """
    A UDP socket and a TCP one bound to the same loopback port, as a DNS
    server's: a port free for UDP may be taken for TCP (EADDRINUSE).
    """
    for _ in range(100):
        tcp = socket.socket()
        tcp.bind(("127.0.0.1", 0))
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            udp.bind(tcp.getsockname())
        except OSError:  # taken for UDP: another port
            udp.close()
            tcp.close()
            continue
        return udp, tcp
    raise AssertionError("no loopback port free for both UDP and TCP")


def _received_connection(sock: socket.socket) -> socket.socket | None:
    """A connection C{sock} has accepted now, non-blocking, or None."""
    try:
        accepted = sock.accept()[0]
    except BlockingIOError:
        return None
    # As _received expects: a blocking read here, before the in-process
    # ipcd has written its query, would hold the reactor for good.
    accepted.setblocking(False)
    return accepted


def _exactly(sock: socket.socket, size: int) -> bytes:
    sock.settimeout(30)
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise AssertionError("the connection ended")
        data += chunk
    return data


class PolicyTests(SrvTestCase):
    @inlineCallbacks
    def test_ownerPolicedBeforeDns(self) -> Any:
        """C{out} rules see the owner as C{host:}: a denial asks no DNS."""
        yield self.startA(srv(0, 0, 9), rules=[f"deny out pong host:{OWNER}"])
        yield self.assertRefused("denied by rule 1")
        self.assertEqual(self.dns.queries(OWNER), 0)

    @inlineCallbacks
    def test_targetsPolicedAsLiteralRoutes(self) -> Any:
        """
        Each target is policed as a literal route to it would be (C{host:}
        and C{port:}): DNS cannot lead a client where the rules deny it.
        """
        b1 = yield start_host(self, rules=["allow in pong"])
        b2 = yield start_host(self, rules=["allow in pong"])
        rule = f"deny out pong port:{b1.port}"
        yield self.startA(srv(10, 0, b1.port) + srv(20, 0, b2.port), rules=[rule])
        yield self.assertReaches(b2.port)
        # As a literal route to that target is.
        yield self.assertRefused(
            "denied by rule 1", route=f"tcp://localhost:{b1.port}/pong"
        )

    @inlineCallbacks
    def test_targetNamesInAnyCase(self) -> Any:
        """
        DNS names are the same in any case: a zone's C{LOCALHOST} is the
        C{host:localhost} a rule denies, and so is a client's own spelling
        of a host or an owner.
        """
        b1 = yield start_host(self, rules=["allow in pong"])
        b2 = yield start_host(self, rules=["allow in pong"])
        rules = ["deny out pong host:localhost", f"deny out pong host:{OWNER}"]
        yield self.startA(
            srv(10, 0, b1.port, "LocalHost.") + srv(20, 0, b2.port, "127.0.0.1."),
            rules=rules[:1],
        )
        yield self.assertReaches(b2.port)
        yield self.assertRefused(
            "denied by rule 1", route=f"tcp://LOCALHOST:{b1.port}/pong"
        )
        self.a.broker.config = dataclasses.replace(
            self.a.broker.config, rules=make_config("/x", rules=rules).rules
        )
        yield self.assertRefused(
            "denied by rule 2", route=f"tcp://{OWNER.upper()}/pong"
        )
        self.assertEqual(self.dns.queries(OWNER), 1)


class ReloadWhileConnectingTests(SrvTestCase):
    @inlineCallbacks
    def test_ownerPolicedAgain(self) -> Any:
        """
        A lookup through an SRV owner whose target answers C{ok} only after
        a reload that denies the owner (C{host:OWNER}, not its target) is
        refused, as a new one would be, and its connection closed.
        """
        server = socket.socket()
        self.addCleanup(server.close)
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.settimeout(TIMEOUT)
        yield self.startA(srv(10, 0, server.getsockname()[1]))
        pending = self.lookupOnA()
        peer, _ = yield deferToThread(server.accept)
        self.addCleanup(peer.close)
        peer.settimeout(TIMEOUT)
        self.assertEqual((yield deferToThread(peer.recv, 64)), b"pong")
        self.a.broker.config = dataclasses.replace(  # what a reload sets
            self.a.broker.config,
            rules=make_config("/x", rules=[f"deny out pong host:{OWNER}"]).rules,
        )
        peer.sendall(b"ok")
        assert_refused(self, (yield pending), "denied by rule 1")
        self.assertEqual((yield deferToThread(peer.recv, 1)), b"")  # closed


class CacheTests(SrvTestCase):
    dns_settings = {"min_ttl": 5, "max_ttl": 100, "negative_ttl": 10}

    @inlineCallbacks
    def startWithClock(self, records: str) -> Any:
        """Host B, and A whose cache runs on an injected clock: (B, clock)."""
        b = yield start_host(self, rules=["allow in pong"])
        yield self.startA(records.format(port=b.port))
        clock = Clock()
        self.inject(clock=clock)
        return b, clock

    @inlineCallbacks
    def test_answerCachedForItsTtl(self) -> Any:
        """
        Within the records' TTL (60 s) a second lookup asks DNS nothing;
        after it, DNS is asked again (the clock is injected).
        """
        b, clock = yield self.startWithClock(srv(10, 0, "{port}"))
        yield self.assertReaches(b.port)
        self.assertEqual(self.dns.queries(OWNER), 1)
        clock.advance(59)
        yield self.assertReaches(b.port)
        self.assertEqual(self.dns.queries(OWNER), 1)
        self.assertIn(f"  {OWNER}: 1 target, ttl 1 s left", self.status())
        clock.advance(2)
        yield self.assertReaches(b.port)
        self.assertEqual(self.dns.queries(OWNER), 2)

    @inlineCallbacks
    def test_ttlClamped(self) -> Any:
        """A TTL of 1 s lives [dns] min_ttl (5 s); one of a day max_ttl (100 s)."""
        b, clock = yield self.startWithClock("")
        for ttl, within, after in [(1, 4.5, 1), (86400, 99, 2)]:
            zone = self.dns.serve(srv(10, 0, b.port), ttl=ttl)
            clock.advance(1000)  # what was cached is gone
            yield self.assertReaches(b.port)
            clock.advance(within)
            yield self.assertReaches(b.port)
            self.assertEqual(zone.queries[OWNER.lower()], 1)
            clock.advance(after)
            yield self.assertReaches(b.port)
            self.assertEqual(zone.queries[OWNER.lower()], 2)

    @inlineCallbacks
    def test_negativeCachedBriefly(self) -> Any:
        """NXDOMAIN is cached for [dns] negative_ttl, then asked again."""
        b, clock = yield self.startWithClock("")
        yield self.assertRefused("NXDOMAIN")
        clock.advance(9)
        yield self.assertRefused("NXDOMAIN")
        self.assertEqual(self.dns.queries(OWNER), 1)
        self.dns.serve(srv(10, 0, b.port))
        clock.advance(2)
        yield self.assertReaches(b.port)
        self.assertEqual(self.dns.queries(OWNER), 1)  # the new zone's first


class OtherSchemeTests(SrvTestCase):
    @inlineCallbacks
    def test_tlsRoute(self) -> Any:
        """C{tls://_ipc._tcp.DOMAIN/pong}: TLS to the target, verified by its name."""
        ca = TestCA(short_rundir(self, "ipcd-ca-"))
        server = ca.issue("localhost")
        b = yield start_tls_host(
            self, {"certificate": server.cert, "key": server.key}, ["allow in pong"]
        )
        self.dns = DnsServer(self, srv(10, 0, refused_port()) + srv(20, 0, b.port))
        a = yield start_tls_host(
            self,
            {"trust_roots": ca.path},
            pongd=False,
            dns={"servers": [self.dns.address]},
        )
        yield self.assertPong(f"tls://{OWNER}/pong", a.rundir)

    @inlineCallbacks
    def test_wsRoute(self) -> Any:
        """C{ws://_ipc._tcp.DOMAIN/pong} reaches a websocketd's pongd."""
        b = yield start_ws_host(self)
        self.dns = DnsServer(self, srv(10, 0, refused_port()) + srv(20, 0, b.port))
        dns = {"servers": [self.dns.address]}
        a = yield start_ws_host(self, pongd=False, rules=(), dns=dns)
        yield self.assertPong(f"ws://{OWNER}/pong", a.rundir)

    @inlineCallbacks
    def test_udpRoute(self) -> Any:
        """C{udp://_ipc._udp.DOMAIN/pong}: the owner's C{_udp} records."""
        b = yield start_udp_host(self, rules=["allow in pong"])
        udp_srv = srv(10, 0, b.port).replace("_tcp", "_udp")
        self.dns = DnsServer(self, udp_srv)
        dns = {"servers": [self.dns.address]}
        a = yield start_udp_host(self, pongd=False, config={"dns": dns})
        yield self.assertPong("udp://_ipc._udp.example.test/pong", a.rundir)


class DocsExampleTests(TestCase):
    """docs/operations-dns.rst's example zone and configuration, as written."""

    def setUp(self) -> None:
        path = os.path.join(REPO, "docs", "operations-dns.rst")
        with open(path) as f:
            text = f.read().split("\nAn example zone\n", 1)[1]
        zone, rest = text.split("::\n\n", 1)[1].split("\nand the configuration", 1)
        self.zone = textwrap.dedent(zone)
        toml = rest.split(".. code-block:: toml\n", 1)[1].split("\nWrite ", 1)[0]
        self.toml = textwrap.dedent(toml)

    @inlineCallbacks
    def test_zoneResolves(self) -> Any:
        """The zone loads in twisted.names' server and resolves as it says."""
        server = DnsServer(self, "")
        server.serve_zone(self.zone)
        layer = tomllib.loads(self.toml)
        layer["dns"]["servers"] = [server.address]
        config = make_config(short_rundir(self), **layer)
        self.assertEqual(str(config.routes["pong"]), "tcp://_ipc._tcp.example.org/pong")
        routes = SrvRoutes(reactor)
        for owner in ["_ipc._tcp.example.org", "_ipc._tcp.old.example.org"]:
            routes.cache_for(config).resolve(owner)
        yield wait_until(
            lambda: (
                len(routes.status(config)) == 2
                and all("ttl_left" in v for v in routes.status(config).values())
            ),
            "both answers",
        )
        status = routes.status(config)
        self.assertEqual(
            sorted(
                (t["priority"], t["target"], t["weight"], t["port"])
                for t in status["_ipc._tcp.example.org"]["targets"]
            ),
            [
                (10, "node1.example.org", 60, 9000),
                (10, "node2.example.org", 40, 9000),
                (20, "backup.example.org", 0, 9443),
            ],
        )
        # The zone's $TTL (300 s), less the moments since.
        self.assertTrue(200 < status["_ipc._tcp.example.org"]["ttl_left"] <= 300)
        self.assertIn(
            "decidedly not available", status["_ipc._tcp.old.example.org"]["error"]
        )
