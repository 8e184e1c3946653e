"""
udpd on real sockets: two in-process ipcd instances ("host A" and "host B",
each with its own RUNDIR and loopback UDP port), a lossy relay between them,
and plain UDP peers sending what no udpd would.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, LoopingCall
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ipcd.compat.twisted import buffered
from ipcd.config import ConfigError, load_config
from ipcd.control import format_status, request
from ipcd.daemons import StartupError
from ipcd.daemons.udp import session as session_module
from ipcd.daemons.udp import wire as udpwire
from ipcd.daemons.udp.cookie import AddressCookies
from ipcd.daemons.udp.session import OUTBOX_BOUND
from ipcd.names import listen_unix
from ipcd.options import Options
from ipcd.test.support import (
    ARABIC_INDIC,
    TIMEOUT,
    RunningIpcdTestCase,
    assert_logged,
    assert_no_fd_leak,
    assert_route_loop,
    assert_unexpected_bounded,
    bounce,
    connect_unix,
    fd_baseline,
    free_port,
    logged_lines,
    lookup,
    recv_upto,
    short_rundir,
    stale_socket,
    wait_until,
)
from ipcd.test.udpsupport import (
    answers,
    burst,
    eof_within,
    handshake,
    lossy_relay,
    next_data,
    probe,
    read_message,
    spend_cookies,
    start_udp_host,
    udp_socket,
)
from ipcd.wire import encode

OK = b"ok"
B_RULES = [
    "deny in secret*",
    "allow in pong",
    "allow in closer",
    "allow in deaf",
    "allow in talker",
    "allow in slammer",
]


class TwoHostsTestCase(TestCase):
    """Host A (a client's ipcd) and host B (pongd, C{allow in pong})."""

    a_settings: dict[str, Any] = {}
    b_settings: dict[str, Any] = {}

    @inlineCallbacks
    def setUp(self) -> Any:
        self.a = yield start_udp_host(self, pongd=False, **self.a_settings)
        self.b = yield start_udp_host(self, rules=B_RULES, **self.b_settings)

    @inlineCallbacks
    def lookupOnA(self, service: str = "pong", port: int | None = None) -> Any:
        """A client on host A asks for C{service} routed to B (or C{port})."""
        payload = f"{service};{service} {self.b.route(service, port)}"
        reply = yield deferToThread(lookup, self.a.rundir, payload.encode())
        self.assertEqual((reply.first, reply.data, len(reply.fds)), (OK, OK, 1))
        return reply.take_socket(self)

    @inlineCallbacks
    def refusedOnA(self, service: str, port: int | None = None) -> Any:
        payload = f"{service};{service} {self.b.route(service, port)}"
        reply = yield deferToThread(lookup, self.a.rundir, payload.encode())
        self.assertEqual(reply.fds, [])
        return reply.data

    @inlineCallbacks
    def assertServing(self) -> Any:
        """B's udpd still opens sessions and carries messages."""
        sock = yield self.lookupOnA()
        echo = yield deferToThread(bounce, sock, b"still serving")
        self.assertEqual(echo, encode(b"still serving"))
        sock.close()

    def logged(self) -> list[str]:
        """Log lines from now until the test ends."""
        lines: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            lines.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        return lines


class EndToEndTests(TwoHostsTestCase):
    @inlineCallbacks
    def test_pongThroughUdp(self) -> Any:
        """
        A lookup on A with a C{udp://} route to B gets C{ok} and one end of
        a socketpair; each message reaches B's pongd and comes back, and
        both hosts count the session's datagrams.
        """
        sock = yield self.lookupOnA()
        self.assertEqual(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN), socket.AF_UNIX
        )
        payloads = [b"bounce me", b"", b"again", b"x" * 60000]
        for payload in payloads:
            echo = yield deferToThread(bounce, sock, payload)
            self.assertEqual(echo, encode(payload))
        out, inbound = self.a.session(), self.b.session()
        self.assertEqual((out.direction, inbound.direction), ("out", "in"))
        self.assertEqual(out.service, "pong")
        self.assertEqual(inbound.labels, ("ip:127.0.0.1",))
        for stats in (out, inbound):
            self.assertEqual(
                (stats.sent, stats.received, stats.dropped, stats.lost), (4, 4, 0, 0)
            )
            self.assertEqual((stats.forward, stats.backward), (60014, 60014))

    @inlineCallbacks
    def test_messagesOfOneWrite(self) -> Any:
        """
        Messages written at once, in runs of equal sizes and lone ones (sent
        in runs, read in runs where the kernel does it): every one comes
        back, in order, each counted once on both hosts.
        """
        sock = yield self.lookupOnA()
        sizes = [100] * 40 + [30] + [1000] * 20 + [5] * 3
        payloads = [b"%03d" % n + b"m" * (size - 3) for n, size in enumerate(sizes)]
        sock.sendall(b"".join(map(encode, payloads)))
        echoes = yield deferToThread(lambda: [read_message(sock) for _ in payloads])
        self.assertEqual(echoes, payloads)
        for stats in (self.a.session(), self.b.session()):
            self.assertEqual(
                (stats.sent, stats.received, stats.dropped, stats.lost),
                (len(sizes), len(sizes), 0, 0),
            )
            self.assertEqual(stats.forward, sum(sizes))
        sock.close()

    @inlineCallbacks
    def test_upstreamBytes(self) -> Any:
        """The spec's bytes: pongd's framed echo, exactly."""
        sock = yield self.lookupOnA()
        echo = yield deferToThread(bounce, sock)
        self.assertEqual(echo, b"\x00\x00\x00\x09bounce me")

    @inlineCallbacks
    def test_statusListsSessions(self) -> Any:
        """C{ipcd status} (the control socket) shows each session's counters."""
        sock = yield self.lookupOnA()
        yield deferToThread(bounce, sock)
        for host, direction in ((self.a, "out"), (self.b, "in")):
            report = yield deferToThread(request, "status", host.rundir)
            [shown] = report["connections"]
            self.assertEqual(shown["direction"], direction)
            self.assertEqual(
                shown["datagrams"], {"sent": 1, "received": 1, "dropped": 0, "lost": 0}
            )
            self.assertEqual(
                report["config"]["udp_listen"], "udp:0:interface=127.0.0.1"
            )
            text = format_status(report, wide=True)
            self.assertIn("DETAILS", text)
            self.assertIn("datagrams: sent 1, received 1, dropped 0, lost 0", text)

    @inlineCallbacks
    def test_remoteRefusalReachesTheClient(self) -> Any:
        """
        B's policy refusal comes back in A's C{ne}, as B told A (a remote
        peer): "refused"; B's decision line has the rule.
        """
        lines = logged_lines(self)
        answer = yield self.refusedOnA("secret")
        self.assertEqual(
            answer,
            f"ne udpd at 127.0.0.1:{self.b.port} refused 'secret': refused".encode(),
        )
        assert_logged(self, lines, "denied by rule 1 (deny in secret* *)")
        answer = yield self.refusedOnA("missing")
        self.assertIn(b"refused 'missing': refused", answer)
        yield self.assertServing()

    @inlineCallbacks
    def test_remotePeerToldNoLocalDetails(self) -> Any:
        """
        A HELLO's NO says exactly "refused", "no such service" or
        "unavailable": never RUNDIR's paths, the rule or errno text, which
        B's decision line keeps.
        """
        b = yield start_udp_host(
            self, rules=["deny in secret", "allow in missing", "allow in stale"]
        )
        stale_socket(os.path.join(b.rundir, "stale"))
        lines = logged_lines(self)
        sock = udp_socket()
        self.addCleanup(sock.close)
        for service, told, logged in (
            (b"secret", "refused", "denied by rule 1 (deny in secret *)"),
            (b"missing", "no such service", f"{b.rundir}/missing does not exist"),
            (b"stale", "unavailable", f"stale socket {b.rundir}/stale"),
        ):
            answer, _ = yield deferToThread(handshake, sock, b.port, service)
            self.assertEqual(answer, udpwire.Refusal(answer.nonce, told))
            assert_logged(self, lines, logged)

    @inlineCallbacks
    def test_nobodyListening(self) -> Any:
        """A port where no udpd listens: refused at once (ICMP), not at the deadline."""
        with udp_socket() as free:
            port = free.getsockname()[1]
        answer = yield self.refusedOnA("pong", port)
        self.assertEqual(
            answer,
            f"ne cannot reach udpd at 127.0.0.1:{port}: connection refused".encode(),
        )

    @inlineCallbacks
    def test_answersCheckedByNonce(self) -> Any:
        """
        A's udpd takes only an answer that echoes its HELLO's nonce, and
        a remote's refusal reaches the client as one printable line.
        """
        fake = udp_socket()
        self.addCleanup(fake.close)
        fake.settimeout(TIMEOUT)

        def remote() -> None:
            hello, client = fake.recvfrom(65536)
            nonce = udpwire.decode(hello).nonce
            fake.sendto(udpwire.accepted(b"x" * 8, b"s" * 8), client)
            fake.sendto(udpwire.refusal(nonce, "no\x1b[2J\nway", 300), client)

        serving = deferToThread(remote)
        answer = yield self.refusedOnA("pong", fake.getsockname()[1])
        yield serving
        self.assertEqual(
            answer,
            f"ne udpd at 127.0.0.1:{fake.getsockname()[1]} refused 'pong': "
            "no\\x1b[2J\\x0away".encode(),
        )

    @inlineCallbacks
    def test_clientRepeatsHelloWithCookie(self) -> Any:
        """
        A's udpd answers a VERIFY that echoes its nonce by sending the same
        HELLO with the cookie (a VERIFY for another nonce changes nothing),
        and the OK to that opens the session.
        """
        fake = udp_socket()
        self.addCleanup(fake.close)
        fake.settimeout(TIMEOUT)
        cookie = bytes(range(1, 17))

        def remote() -> list[udpwire.Hello]:
            datagram, client = fake.recvfrom(65536)
            first = udpwire.decode(datagram)
            fake.sendto(udpwire.verify(b"x" * 8, b"w" * 16), client)
            fake.sendto(udpwire.verify(first.nonce, cookie), client)
            while (second := udpwire.decode(fake.recv(65536))).cookie != cookie:
                # A retry of the first, sent before the VERIFY came.
                assert second.cookie == udpwire.NO_COOKIE, second
            fake.sendto(udpwire.accepted(first.nonce, b"s" * 8), client)
            return [first, second]

        serving = deferToThread(remote)
        sock = yield self.lookupOnA("pong", fake.getsockname()[1])
        first, second = yield serving
        self.assertEqual(first, udpwire.Hello(first.nonce, b"pong"))
        self.assertEqual(second, udpwire.Hello(first.nonce, b"pong", cookie))
        sock.close()

    @inlineCallbacks
    def test_silentPeerTimesOut(self) -> Any:
        """A peer that never answers: retried, then the broker's deadline."""
        self.a.service.broker.config = load_config(
            None,
            {
                "rundir": self.a.rundir,
                "tcpd": {"enabled": False},
                "ipcd": {"connect_timeout": 0.5},
                "udpd": {"enabled": True, "listen": "udp:0:interface=127.0.0.1"},
            },
            {},
        )
        with udp_socket() as silent:
            port = silent.getsockname()[1]
            answer = yield self.refusedOnA("pong", port)
            silent.settimeout(0)
            hellos = []
            try:
                while True:
                    hellos.append(silent.recv(65536))
            except BlockingIOError:
                pass
        self.assertIn(b"timed out after 0.5 s", answer)
        # 0, 0.25 s: two tries at least, all the same HELLO.
        self.assertGreaterEqual(len(hellos), 2)
        self.assertEqual(len(set(hellos)), 1)
        self.assertEqual(udpwire.decode(hellos[0]).service, b"pong")
        yield wait_until(lambda: not self.a.sessions(), "no session left")

    @inlineCallbacks
    def test_controlSocket(self) -> Any:
        """Upstream's ipcd on RUNDIR/udp: a framed URI, a framed ok, then pong."""

        def control() -> bytes:
            with connect_unix(os.path.join(self.a.rundir, "udp")) as sock:
                sock.sendall(encode(self.b.route("pong").encode()))
                answer = recv_upto(sock, 6)
                return answer + bounce(sock)

        answer = yield deferToThread(control)
        self.assertEqual(answer, encode(b"ok") + encode(b"bounce me"))


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


class IPv6Tests(TestCase):
    if not has_ipv6_loopback():
        skip = "no IPv6 loopback (::1) on this machine"

    @inlineCallbacks
    def test_pongOverIPv6(self) -> Any:
        """A C{udp://[::1]:PORT/pong} route, to a udpd listening on ::1."""
        a = yield start_udp_host(self, pongd=False)
        b = yield start_udp_host(self, rules=B_RULES, listen="udp:0:interface=::1")
        payload = f"pong;pong udp://[::1]:{b.port}/pong".encode()
        reply = yield deferToThread(lookup, a.rundir, payload)
        self.assertEqual(reply.data, OK)
        sock = reply.take_socket(self)
        echo = yield deferToThread(bounce, sock)
        self.assertEqual(echo, encode(b"bounce me"))
        self.assertEqual(b.session().labels, ("ip:::1",))


class LossTests(TwoHostsTestCase):
    @inlineCallbacks
    def test_lossyRelay(self) -> Any:
        """
        Through a relay that loses 10% of datagrams each way, duplicates
        some and reorders some (and loses the first HELLO, and the first
        that carries the cookie): the handshake is retried, every message
        that arrives arrives once, and the session survives; the counters
        show the losses and the duplicates.
        """
        relay, port = lossy_relay(self, self.b.port, drop_hellos=1, drop_cookied=1)
        sock = yield self.lookupOnA("pong", port)
        self.assertEqual((relay.drop_hellos, relay.drop_cookied), (0, 0))
        got = yield deferToThread(burst, sock, 400)
        sent = [b"m%05d" % n for n in range(400)]
        self.assertEqual(len(got), len(set(got)), "a duplicate was delivered")
        self.assertTrue(set(got) <= set(sent))
        self.assertLess(len(got), 400)
        self.assertGreater(len(got), 200)
        self.assertNotEqual(got, sorted(got), "nothing was reordered")
        echo = yield deferToThread(probe, sock)
        self.assertIsNotNone(echo, "the session did not survive")
        out, inbound = self.a.session(), self.b.session()
        self.assertGreater(relay.dropped, 0)
        self.assertGreater(relay.duplicated, 0)
        # A's messages lost on the way to B, and B's echoes on the way back.
        self.assertGreater(inbound.lost, 0)
        self.assertGreater(out.lost, 0)
        self.assertGreater(inbound.dropped + out.dropped, 0)  # the duplicates
        self.assertEqual(inbound.received, inbound.sent)  # pongd echoed all
        self.assertLess(out.received, out.sent)
        # A clean network again, so that the CLOSE is not lost (a lost one
        # leaves the session to its idle deadline).
        relay.loss = relay.reorder = relay.duplicate = 0
        sock.close()
        yield wait_until(lambda: not self.b.sessions(), "B's session to end")


class HostileDatagramTests(TwoHostsTestCase):
    """Datagrams no udpd sends: dropped and counted; B keeps serving."""

    def dropped(self, why: str) -> int:
        return self.b.broker.counters[f"udp datagrams dropped: {why}"]

    @inlineCallbacks
    def test_oneByteHandshake(self) -> Any:
        """The answer to a 1-byte datagram is at most 1 byte: here, none."""
        for datagram in (b"H", b"\0", b"O", b"x"):
            got = yield deferToThread(answers, self.b.port, datagram)
            self.assertTrue(all(len(g) <= 1 for g in got), got)
            self.assertEqual(got, [])
        self.assertEqual(self.dropped("malformed"), 4)
        yield self.assertServing()

    @inlineCallbacks
    def test_noAmplification(self) -> Any:
        """
        Unpadded HELLOs get nothing; a padded one gets a VERIFY, and with
        its cookie (for a refused service) a NO, each no larger than the
        HELLO; no session is opened.
        """
        service = b"secret-" + b"x" * 200
        hello = udpwire.hello(b"n" * 8, service)
        for short in (hello[:12], hello[:17], hello[: udpwire.HELLO_SIZE - 1]):
            got = yield deferToThread(answers, self.b.port, short)
            self.assertEqual(got, [])
        sock = udp_socket()
        self.addCleanup(sock.close)
        refusal, got = yield deferToThread(handshake, sock, self.b.port, service)
        self.assertEqual(len(got), 2)
        self.assertTrue(all(len(answer) <= len(hello) for answer in got))
        self.assertEqual(refusal.reason, "refused")
        self.assertEqual(self.b.sessions(), [])

    @inlineCallbacks
    def test_replayedHelloOpensNothing(self) -> Any:
        """
        A HELLO with its cookie, sent again (as someone on the path who saw
        it would, from the peer's address) while its session lives, gets
        the same OK and opens nothing more; once that session has ended,
        it gets a VERIFY with a new cookie (to the peer's address) and
        opens nothing.  The new cookie, from the peer, opens a session.
        """
        sock = udp_socket()
        self.addCleanup(sock.close)
        answer, got = yield deferToThread(handshake, sock, self.b.port)
        verify = udpwire.decode(got[0])
        replay = udpwire.hello(verify.nonce, b"pong", verify.cookie)
        to = ("127.0.0.1", self.b.port)

        def send(datagram: bytes) -> udpwire.Datagram:
            sock.sendto(datagram, to)
            return udpwire.decode(sock.recv(65536))

        again = yield deferToThread(send, replay)
        self.assertEqual(again, answer)
        self.assertEqual(len(self.b.sessions()), 1)
        sock.sendto(udpwire.close(answer.session), to)
        yield wait_until(lambda: not self.b.sessions(), "B's session to end")

        refused = yield deferToThread(send, replay)
        self.assertIsInstance(refused, udpwire.Verify)
        self.assertNotEqual(refused.cookie, verify.cookie)
        self.assertEqual(self.b.sessions(), [])
        self.assertEqual(self.b.broker.counters["udp hellos with a spent cookie"], 1)
        fresh = udpwire.hello(verify.nonce, b"pong", refused.cookie)
        opened = yield deferToThread(send, fresh)
        self.assertIsInstance(opened, udpwire.Accepted)
        self.assertNotEqual(opened.session, answer.session)
        self.assertEqual(len(self.b.sessions()), 1)
        sock.sendto(udpwire.close(opened.session), to)

    @inlineCallbacks
    def test_okLostAndSessionOverStillConnects(self) -> Any:
        """
        A's udpd does not see B's OK, and B's session ends before A sends
        its HELLO again (the service closed at once): B answers the spent
        cookie with a VERIFY, and A's udpd, as it always has, sends the
        HELLO again with the new cookie and gets its session.
        """
        local_service(self, self.b, "slammer", Slammer)
        relay, port = lossy_relay(
            self, self.b.port, loss=0, reorder=0, duplicate=0, drop_oks=1
        )
        sock = yield self.lookupOnA("slammer", port)
        self.assertEqual(relay.drop_oks, 0)
        closed = yield deferToThread(eof_within, sock)
        self.assertTrue(closed)
        self.assertEqual(self.b.broker.counters["udp hellos with a spent cookie"], 1)

    @inlineCallbacks
    def test_fewPrefixesCannotLockOthersOut(self) -> Any:
        """
        Two addresses (prefixes) that spend cookies as fast as they can
        (on a service they are refused) fill the record of cookies spent
        in all (8 here; 32,768 by default): the next HELLO renews the
        secrets instead of being refused busy, so a client from a third
        address still connects.  A prefix past its own share (4 here) is
        refused busy.  (Before, everyone was refused busy for as long as
        the two kept the record full: 8 loopback addresses did it with
        the default bounds in 11 s of one Python thread.)
        """
        # (Its own clock: no new period of the cookies within the test.)
        self.b.server.cookies = AddressCookies(Clock(), per_source=4, in_all=8)
        for host in ("127.0.0.2", "127.0.0.3"):
            told = yield deferToThread(spend_cookies, self.b.port, host, 4, b"secret-x")
            self.assertEqual(told, {"refused": 4})
        told = yield deferToThread(spend_cookies, self.b.port, "127.0.0.2", 1)
        self.assertEqual(told, {"busy": 1})
        yield self.assertServing()  # (A's udpd, at 127.0.0.1)
        counters = self.b.broker.counters
        self.assertEqual(counters["udp cookie secrets renewed: too many spent"], 1)
        self.assertEqual(counters["udp sessions refused: too many opened lately"], 1)

    @inlineCallbacks
    def test_helloWithoutCookieKeepsNothing(self) -> Any:
        """
        A HELLO without a cookie (or with one that is not this address's)
        gets one 25-byte VERIFY and nothing else: nothing pending, no
        connection to the service, however many come.
        """
        before = yield fd_baseline()
        hello = udpwire.hello(b"n" * 8, b"pong")
        for _ in range(50):
            got = yield deferToThread(answers, self.b.port, hello, 0.05)
            [verify] = got
            self.assertEqual(len(verify), udpwire.VERIFY_SIZE)
            self.assertEqual(udpwire.decode(verify).nonce, b"n" * 8)
        # A cookie is good only from the port it was sent to.
        cookie = udpwire.decode(verify).cookie
        got = yield deferToThread(
            answers, self.b.port, udpwire.hello(b"n" * 8, b"pong", cookie)
        )
        self.assertIsInstance(udpwire.decode(got[0]), udpwire.Verify)
        self.assertEqual(
            self.b.broker.counters["udp hellos answered with a cookie"], 51
        )
        self.assertEqual((self.b.server.hellos, self.b.server.sessions), ({}, {}))
        self.assertEqual(self.b.sessions(), [])
        yield assert_no_fd_leak(before)
        yield self.assertServing()

    @inlineCallbacks
    def test_otherVersionToldWhy(self) -> Any:
        """A version 1 HELLO (an older ipcd's) gets a NO saying why."""
        v1 = (b"H\x01" + b"n" * 8 + b"\x04pong").ljust(udpwire.HELLO_SIZE, b"\0")
        [refusal] = yield deferToThread(answers, self.b.port, v1)
        self.assertEqual(
            udpwire.decode(refusal),
            udpwire.Refusal(
                b"n" * 8,
                "udpd protocol version 1 is not spoken here (only version 2)",
            ),
        )
        self.assertEqual(self.b.sessions(), [])

    @inlineCallbacks
    def test_garbageAndTruncated(self) -> Any:
        junk = [
            b"",
            b"\xff" * 100,
            b"D" + b"\0" * 5,  # a DATA cut in its header
            b"C" + b"\0" * 3,
            b"N12",
            udpwire.accepted(b"n" * 8, b"s" * 8),  # not a server's to get
            b"H\x02" + b"\0" * 400,  # a HELLO without a name
            udpwire.verify(b"n" * 8, b"c" * 16),  # not a server's to get
        ]
        for datagram in junk:
            got = yield deferToThread(answers, self.b.port, datagram, 0.1)
            self.assertEqual(got, [])
        self.assertEqual(self.dropped("malformed"), len(junk))
        yield self.assertServing()

    @inlineCallbacks
    def test_spoofedSessionAndPort(self) -> Any:
        """
        A DATA with a live session's id from another source port, or with
        an unknown id, never reaches the service; the session goes on.
        """
        sock = yield self.lookupOnA()
        yield deferToThread(bounce, sock)
        [session_id] = self.b.server.sessions
        forged = udpwire.data(session_id, 1, b"forged")
        got = yield deferToThread(answers, self.b.port, forged)
        self.assertEqual(got, [])
        got = yield deferToThread(answers, self.b.port, udpwire.data(b"?" * 8, 1, b"x"))
        self.assertEqual(got, [])
        got = yield deferToThread(answers, self.b.port, udpwire.close(session_id))
        self.assertEqual(got, [])
        # A wrong id from the session's own address (A's UDP port).
        a_session = self.a.session().end.__self__
        a_session._send(udpwire.data(b"?" * 8, 7, b"forged"))
        yield wait_until(
            lambda: self.dropped("unknown session") == 2, "the wrong id dropped"
        )
        self.assertEqual(self.dropped("wrong address"), 2)
        self.assertEqual(self.b.session().dropped, 2)
        # Nothing forged reached pongd (its echo would be on the way to A).
        echo = yield deferToThread(bounce, sock, b"after")
        self.assertEqual(echo, encode(b"after"))
        self.assertEqual(self.a.session().received, 2)
        yield self.assertServing()

    @inlineCallbacks
    def test_replayedDatagramDropped(self) -> Any:
        """A DATA sent again (same sequence number) is delivered once."""
        sock = yield self.lookupOnA()
        yield deferToThread(bounce, sock, b"one")
        out = self.a.session()
        [bound] = self.b.server.sessions.values()
        # Replay B's first echo into A's session, from B's own port to A's:
        # as a network that duplicates a datagram would.
        replay = udpwire.data(bound.session.id, 0, b"one")
        self.b.server.transport.write(replay, bound.address)
        yield wait_until(lambda: out.dropped == 1, "the duplicate to be dropped")
        self.assertEqual(out.received, 1)
        echo = yield deferToThread(bounce, sock, b"two")
        self.assertEqual(echo, encode(b"two"))


class LimitTests(TwoHostsTestCase):
    a_settings = {"max_datagram": 512}
    b_settings = {"max_sessions": 1, "max_datagram": 1024}

    @inlineCallbacks
    def test_oversizedMessageRefused(self) -> Any:
        """
        A message larger than a datagram carries is not cut: a log line,
        and the session ends on both hosts.
        """
        lines = self.logged()
        sock = yield self.lookupOnA()
        fits = b"x" * (512 - udpwire.DATA_HEADER_SIZE)
        echo = yield deferToThread(bounce, sock, fits)
        self.assertEqual(echo, encode(fits))
        sock.sendall(encode(fits + b"x"))
        closed = yield deferToThread(eof_within, sock)
        self.assertTrue(closed)
        yield wait_until(lambda: not self.b.sessions(), "B's session to end")
        self.assertTrue(
            any(
                "a message of 496 bytes does not fit in a datagram (at most 495" in line
                for line in lines
            ),
            lines,
        )
        yield self.assertServing()

    @inlineCallbacks
    def test_oversizedDatagramDropped(self) -> Any:
        """B drops (and counts) a datagram larger than its maximum."""
        got = yield deferToThread(answers, self.b.port, b"D" + b"\0" * 2000)
        self.assertEqual(got, [])
        self.assertEqual(self.b.broker.counters["udp datagrams dropped: too large"], 1)
        yield self.assertServing()

    @inlineCallbacks
    def test_maxSessions(self) -> Any:
        first = yield self.lookupOnA()
        answer = yield self.refusedOnA("pong")
        self.assertEqual(
            answer,
            f"ne udpd at 127.0.0.1:{self.b.port} refused 'pong': busy".encode(),
        )
        first.close()
        yield wait_until(lambda: not self.b.sessions(), "the first session to end")
        yield self.assertServing()


def selectables() -> set[Any]:
    """The connections and ports the reactor reads or writes now."""
    found = {*reactor.getReaders(), *reactor.getWriters()}
    return {each for each in found if hasattr(each, "protocol")}  # no wakers


class SlowClientTests(TwoHostsTestCase):
    @inlineCallbacks
    def test_clientThatDoesNotReadBounded(self) -> Any:
        """
        A client that writes and never reads: once its socket is full, A
        holds at most one transport buffer (64 KiB and a message) and what
        waits for the end of a read (OUTBOX_BOUND and a message) for it;
        the rest of the echoes are dropped and counted.
        """
        before = selectables()
        sock = yield self.lookupOnA()
        # Then (cleanups run last first) until the streams on both hosts,
        # and pongd's connection, have written what they held and closed.
        self.addCleanup(
            wait_until, lambda: selectables() <= before, "the connections to close"
        )
        self.addCleanup(sock.close)
        message = encode(b"x" * 1000)

        def flood() -> None:
            for _ in range(40):
                sock.sendall(message * 100)

        yield deferToThread(flood)
        stats = self.a.session()
        stream = stats.end.__self__.stream  # type: ignore[union-attr]
        yield wait_until(
            lambda: stream.congested and stats.dropped > 0, "A to drop echoes"
        )
        held = buffered(stream.transport) + stream._waiting
        self.assertLessEqual(held, 64 * 1024 + OUTBOX_BOUND + 2 * len(message))


class InboundPathTests(TwoHostsTestCase):
    """
    B resolves a udp peer's request as every inbound daemon does: admin
    redirections and routes, the C{in} rules with the peer's C{ip:} label.
    """

    @inlineCallbacks
    def setUp(self) -> Any:
        self.a = yield start_udp_host(self, pongd=False)
        self.b = yield start_udp_host(
            self,
            rules=[
                "allow in echo ip:127.0.0.1",
                "allow in far ip:127.0.0.0/8",
                "deny in pong ip:127.0.0.1",
            ],
            config={"redirects": {"echo": "pong"}, "routes": {"far": "unix://pong"}},
        )

    @inlineCallbacks
    def assertEchoes(self, service: str) -> Any:
        sock = yield self.lookupOnA(service)
        echo = yield deferToThread(bounce, sock)
        self.assertEqual(echo, encode(b"bounce me"))
        self.assertEqual(self.b.session().service, service)
        sock.close()
        yield wait_until(lambda: not self.b.sessions(), "the session to end")

    def test_redirection(self) -> Any:
        """An admin redirection, policed by the name asked for."""
        return self.assertEchoes("echo")

    def test_adminRoute(self) -> Any:
        return self.assertEchoes("far")

    @inlineCallbacks
    def test_ruleOnTheAddress(self) -> Any:
        lines = logged_lines(self)
        answer = yield self.refusedOnA("pong")
        self.assertTrue(answer.endswith(b"refused 'pong': refused"), answer)
        assert_logged(self, lines, "denied by rule 3 (deny in pong ip:127.0.0.1)")


class PerPeerLimitTests(TwoHostsTestCase):
    @inlineCallbacks
    def setUp(self) -> Any:
        self.a = yield start_udp_host(self, pongd=False)
        self.b = yield start_udp_host(
            self, rules=B_RULES, config={"limits": {"max_connections_per_peer": 2}}
        )

    @inlineCallbacks
    def test_onePeerCannotTakeEverySession(self) -> Any:
        """[limits] max_connections_per_peer holds per address, for udpd too."""
        first = yield self.lookupOnA()
        second = yield self.lookupOnA()
        lines = logged_lines(self)
        answer = yield self.refusedOnA("pong")
        self.assertTrue(answer.endswith(b"refused 'pong': busy"), answer)
        assert_logged(
            self, lines, "too many connections from ip:127.0.0.1/32 (at most 2)"
        )
        self.assertEqual(self.b.broker.counters["udpd: refused, per-peer limit"], 1)
        first.close()
        yield wait_until(lambda: len(self.b.sessions()) == 1, "a session to end")
        third = yield self.lookupOnA()
        echo = yield deferToThread(bounce, third)
        self.assertEqual(echo, encode(b"bounce me"))
        second.close()
        third.close()


class LifetimeTests(TwoHostsTestCase):
    b_settings = {"idle_timeout": 0.3}

    @inlineCallbacks
    def test_idleSessionsExpire(self) -> Any:
        """B ends a session idle for its time; A's client sees the end."""
        lines = self.logged()
        sock = yield self.lookupOnA()
        yield deferToThread(bounce, sock)
        closed = yield deferToThread(eof_within, sock)
        self.assertTrue(closed)
        yield wait_until(lambda: not self.a.sessions(), "A's session to end")
        self.assertTrue(any("idle for 0.3 s" in line for line in lines), lines)


class Talker(Protocol):
    """A local service that writes a message every 50 ms, whoever listens."""

    def connectionMade(self) -> None:
        self.loop = LoopingCall(self.transport.write, encode(b"tick"))
        self.loop.start(0.05)

    def connectionLost(self, reason: Any = None) -> None:
        if self.loop.running:
            self.loop.stop()


def local_service(case: TestCase, host: Any, name: str, protocol: type) -> list[Any]:
    """
    A service C{name} on C{host} whose connections are C{protocol}s: the
    list of them, as they come; each aborted after the test.
    """
    connections: list[Any] = []

    class Connections(Factory):
        def buildProtocol(self, addr: Any) -> Any:  # noqa: N802
            connections.append(protocol())
            return connections[-1]

    port = listen_unix(reactor, os.path.join(host.rundir, name), Connections())
    case.addCleanup(port.stopListening)
    case.addCleanup(lambda: [each.transport.abortConnection() for each in connections])
    return connections


def talker_service(case: TestCase, host: Any) -> list[Talker]:
    """A L{Talker} service C{talker} on C{host}: its connections."""
    return local_service(case, host, "talker", Talker)


def drain(sock: socket.socket) -> list[udpwire.Datagram]:
    """Every datagram waiting on C{sock}, decoded."""
    sock.settimeout(0)
    got = []
    try:
        while True:
            got.append(udpwire.decode(sock.recv(65536)))
    except BlockingIOError:
        return got
    finally:
        sock.settimeout(TIMEOUT)


class PeerGoneTests(TwoHostsTestCase):
    """
    A session whose peer has gone (its host down, its address changed, its
    udpd stopped without a CLOSE) ends once nothing came from the peer for
    the idle timeout, even while this side's stream keeps writing: the
    writes used to keep it, its stream and its place in the limits, for
    as long as they went on.
    """

    a_settings = {"idle_timeout": 1.0}
    b_settings = {"idle_timeout": 1.0}

    @inlineCallbacks
    def test_serviceWritingToAGonePeer(self) -> Any:
        """
        A plain peer opens a session to B's talker, takes a message, and
        falls silent (its socket still open: no ICMP tells B anything).
        B asks it (PINGs, unanswered), ends the session (a CLOSE) and
        closes the talker's stream.
        """
        lines = self.logged()
        talkers = talker_service(self, self.b)
        sock = udp_socket()
        self.addCleanup(sock.close)
        answer, _ = yield deferToThread(handshake, sock, self.b.port, b"talker")
        self.assertIsInstance(answer, udpwire.Accepted)
        first = yield deferToThread(next_data, sock)
        self.assertEqual(first.payload, b"tick")
        yield wait_until(lambda: not self.b.sessions(), "B's session to end", 30)
        yield wait_until(
            lambda: not talkers[0].transport.connected, "the talker's stream to close"
        )
        kinds = [type(datagram) for datagram in drain(sock)]
        self.assertIn(udpwire.Ping, kinds)
        self.assertEqual(kinds[-1], udpwire.Close)
        self.assertTrue(
            any("nothing from the peer for 1 s" in line for line in lines), lines
        )
        self.assertEqual(self.b.broker.limits_for("udpd").total, 0)

    @inlineCallbacks
    def test_clientWritingToAGoneServer(self) -> Any:
        """
        A's client writes on while the udpd that answered its HELLO (a
        plain socket here) has gone silent: A ends the session and the
        client gets EOF.
        """
        with udp_socket() as server:

            def answer_hello() -> bytes:
                datagram, address = server.recvfrom(65536)
                hello = udpwire.decode(datagram)
                session_id = b"S" * udpwire.ID_SIZE
                server.sendto(udpwire.accepted(hello.nonce, session_id), address)
                return session_id

            serving = deferToThread(answer_hello)
            sock = yield self.lookupOnA("pong", server.getsockname()[1])
            yield serving

            def write_until_closed() -> bool:
                sock.settimeout(0.05)
                for _ in range(1200):  # a minute at most
                    try:
                        sock.sendall(encode(b"anyone there?"))
                        if not sock.recv(65536):
                            return True
                    except TimeoutError:
                        continue
                    except OSError:
                        return True
                return False

            closed = yield deferToThread(write_until_closed)
            sock.close()
            self.assertTrue(closed)
            pings = [
                datagram
                for datagram in drain(server)
                if isinstance(datagram, udpwire.Ping)
            ]
            self.assertTrue(pings)
        yield wait_until(lambda: not self.a.sessions(), "A's session to end")


class OneWaySessionTests(TwoHostsTestCase):
    """
    A session that carries messages one way only lives on: the side that
    hears nothing asks (PING) and the other side's udpd answers (PONG).
    """

    b_settings = {"idle_timeout": 2.0}

    @inlineCallbacks
    def test_clientThatOnlyListens(self) -> Any:
        """
        A's client reads B's talker for three idle timeouts and writes
        nothing; B's session is still there and the ticks still come.
        """
        lines = self.logged()
        talker_service(self, self.b)
        sock = yield self.lookupOnA("talker")
        self.addCleanup(sock.close)
        [stats] = self.b.sessions()

        def listen() -> int:
            deadline = reactor.seconds() + 6.0
            count = 0
            while reactor.seconds() < deadline:
                if read_message(sock) != b"tick":
                    return -1
                count += 1
            return count

        ticks = yield deferToThread(listen)
        self.assertGreater(ticks, 0)
        self.assertEqual(self.b.sessions(), [stats])
        self.assertFalse(any("closing the session" in line for line in lines), lines)


class CloseTests(TwoHostsTestCase):
    """Sessions end by CLOSE datagrams (idle_timeout is 120 s here)."""

    @inlineCallbacks
    def test_clientCloseEndsRemoteSession(self) -> Any:
        """A's client closing: a CLOSE ends B's session (and pongd's stream)."""
        sock = yield self.lookupOnA()
        yield deferToThread(bounce, sock)
        sock.close()
        yield wait_until(lambda: not self.b.sessions(), "B's session to end", 5)

    @inlineCallbacks
    def test_serviceCloseEndsClient(self) -> Any:
        """B's service closing its stream: A's client gets EOF."""
        factory = Factory.forProtocol(Closer)
        port = listen_unix(reactor, os.path.join(self.b.rundir, "closer"), factory)
        self.addCleanup(port.stopListening)
        sock = yield self.lookupOnA("closer")
        sock.sendall(encode(b"bye"))
        message = yield deferToThread(read_message, sock)
        self.assertIsNone(message)
        yield wait_until(lambda: not self.a.sessions(), "A's session to end", 5)

    @inlineCallbacks
    def test_stoppingEndsSessions(self) -> Any:
        """Stopping A's ipcd closes its clients' sessions on B too."""
        sock = yield self.lookupOnA()
        yield deferToThread(bounce, sock)
        yield self.a.service.stopService()
        closed = yield deferToThread(eof_within, sock)
        self.assertTrue(closed)
        yield wait_until(lambda: not self.b.sessions(), "B's session to end", 5)


class Closer(Protocol):
    """A local service that closes at the first byte."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.loseConnection()


class Slammer(Protocol):
    """A local service that closes as soon as it is connected."""

    def connectionMade(self) -> None:
        self.transport.loseConnection()


class Deaf(Protocol):
    """A local service that never reads, and never closes."""

    def connectionMade(self) -> None:
        self.transport.pauseProducing()


def deaf_service(case: TestCase, host: Any) -> list[Deaf]:
    """A L{Deaf} service C{deaf} on C{host}: its connections, as they come."""
    return local_service(case, host, "deaf", Deaf)


class ClosingWhatIsHeldTests(TwoHostsTestCase):
    b_settings = {"max_sessions": 1}

    @inlineCallbacks
    def endWhileHeld(self) -> Any:
        """
        A session to B's deaf service whose stream B has filled, then ended
        from A: B's stream, still holding what it was sent.
        """
        sock = yield self.lookupOnA("deaf")
        self.addCleanup(sock.close)
        stream = self.b.session().end.__self__.stream  # type: ignore[union-attr]
        message = encode(b"x" * 1000)

        def flood() -> None:
            for _ in range(10):
                sock.sendall(message * 100)

        yield deferToThread(flood)
        yield wait_until(lambda: stream.congested, "B's stream to fill")
        sock.close()
        yield wait_until(lambda: not self.b.sessions(), "B's session to end")
        return stream

    @inlineCallbacks
    def test_streamToADeafServiceCut(self) -> Any:
        """
        A session ends while B's stream holds what a service that does not
        read was sent: B gives it a grace, then cuts the stream, rather
        than hold it (a descriptor, a buffer) for as long as the service
        lives, out of every count: a peer could leave one behind per
        session it opens.  (pongd, which stops reading while its echoes
        wait, was held so until its idle timeout.)
        """
        deaf = deaf_service(self, self.b)
        stream = yield self.endWhileHeld()
        yield wait_until(lambda: not stream.transport.connected, "B's stream to close")
        self.assertEqual(len(deaf), 1)

    @inlineCallbacks
    def test_streamHeldIsCounted(self) -> Any:
        """
        While its grace lasts, the stream of a session that ended still
        counts against B's limits (max_sessions here, and its peer's
        share): a peer that opens and ends sessions as fast as it can,
        leaving each stream full, would otherwise hold a descriptor and up
        to 144 KiB each for every session of the last two seconds.  Once
        the stream is closed, its place is free.
        """
        self.patch(session_module, "CLOSE_GRACE", 3600.0)  # for as long as needed
        deaf = deaf_service(self, self.b)
        stream = yield self.endWhileHeld()
        self.assertTrue(stream.transport.connected)
        answer = yield self.refusedOnA("pong")
        self.assertEqual(
            answer,
            f"ne udpd at 127.0.0.1:{self.b.port} refused 'pong': busy".encode(),
        )
        self.assertEqual(self.b.broker.limits_for("udpd").total, 1)  # its peer's
        deaf[0].transport.abortConnection()
        yield wait_until(lambda: not stream.transport.connected, "B's stream to close")
        yield self.assertServing()


class FdTests(TwoHostsTestCase):
    @inlineCallbacks
    def test_noFdGrowthAfter1000Sessions(self) -> Any:
        before = yield fd_baseline()

        def sessions() -> None:
            payload = f"pong;pong {self.b.route('pong')}".encode()
            for n in range(1000):
                reply = lookup(self.a.rundir, payload)
                assert reply.data == OK, reply.data
                with socket.socket(fileno=reply.fds[0]) as sock:
                    sock.settimeout(TIMEOUT)
                    assert bounce(sock, b"%d" % n) == encode(b"%d" % n)

        yield deferToThread(sessions)
        yield wait_until(
            lambda: not self.a.sessions() and not self.b.sessions(), "sessions to end"
        )
        yield assert_no_fd_leak(before)


class OffByDefaultTests(RunningIpcdTestCase):
    @inlineCallbacks
    def test_noUdpRoutesWhenOff(self) -> Any:
        """Without --udp, a udp:// route is refused and nothing listens."""
        payload = b"pong;pong udp://127.0.0.1:9000/pong"
        reply = yield deferToThread(lookup, self.rundir, payload)
        self.assertEqual(
            reply.data,
            (
                b"ne no transport for scheme 'udp': udpd is off on this ipcd (start it "
                b"with --udp ENDPOINT)"
            ),
        )
        self.assertFalse(os.path.exists(os.path.join(self.rundir, "udp")))
        self.assertNotIn("udpd", self.service.namedServices)


class ConfigTests(SynchronousTestCase):
    def test_offByDefault(self) -> None:
        config = load_config(None, {}, {})
        self.assertFalse(config.daemons["udpd"]["enabled"])
        self.assertEqual(
            config.daemons["udpd"]["listen"], "udp:9000:interface=127.0.0.1"
        )

    def test_flags(self) -> None:
        options = Options()
        options.parseOptions(["--udp", "udp:9001:interface=0.0.0.0"])
        udpd = options.config.daemons["udpd"]
        self.assertEqual(
            (udpd["enabled"], udpd["listen"]), (True, "udp:9001:interface=0.0.0.0")
        )
        options = Options()
        options.parseOptions(["--udp", "udp:9001", "--no-udp"])
        self.assertFalse(options.config.daemons["udpd"]["enabled"])
        with self.assertRaises(usage.UsageError) as caught:
            Options().parseOptions(["--udp", "tcp:9001"])
        self.assertIn("[udpd] listen: expected a listener like", str(caught.exception))

    def test_portInAsciiDigits(self) -> None:
        """
        A port in digits other than ASCII ones is refused when the
        configuration loads, in one line: C{'²'} passed C{str.isdigit()}
        and then raised from C{int()}, and C{'٩٠٠٠'} listened on 9000.
        """
        for listen in ("udp:²", "udp:٩٠٠٠", "udp:9000".translate(ARABIC_INDIC)):
            with self.assertRaises(ConfigError) as caught:
                load_config(None, {"udpd": {"listen": listen}}, {})
            message = str(caught.exception)
            self.assertIn("[udpd] listen: expected a listener like", message)
            self.assertIn(repr(listen), message)
            self.assertNotIn("\n", message)

    def test_systemdForms(self) -> None:
        """
        A socket systemd passes (ListenDatagram=), named as Twisted's
        systemd: strings name stream ones: INET or INET6, an index or a name.
        """
        for taken in ("systemd:domain=INET:name=udpd", "systemd:domain=INET6:index=2"):
            config = load_config(None, {"udpd": {"listen": taken}}, {})
            self.assertEqual(config.daemons["udpd"]["listen"], taken)
        for refused in (
            "systemd:domain=UNIX:index=0",
            "systemd:domain=INET",
            "systemd:index=0",
            "systemd:domain=INET:index=0:name=udpd",
            "systemd:domain=INET:index=x",
            "systemd:domain=INET:index=²",
            "systemd:domain=INET:index=١",  # (Twisted's int() reads it as 1)
            "systemd:domain=INET:index=",
            "systemd:domain=INET:domain=INET6:index=0",
            "systemd:domain=INET:index=0:interface=127.0.0.1",
        ):
            with self.assertRaises(ConfigError) as caught:
                load_config(None, {"udpd": {"listen": refused}}, {})
            self.assertIn(
                "systemd: domain=INET or INET6, and index=N or name=NAME",
                str(caught.exception),
            )

    def test_section(self) -> None:
        config = load_config(
            None,
            {"udpd": {"max_sessions": 3, "max_datagram": 1400, "idle_timeout": 9}},
            {},
        )
        self.assertEqual(config.daemons["udpd"]["max_sessions"], 3)
        for key, value, expected in [
            ("max_datagram", 65508, "a number of bytes from 300 to 65507"),
            ("max_datagram", 100, "a number of bytes from 300 to 65507"),
            ("max_sessions", 0, "a whole number greater than 0"),
            ("idle_timeout", -1, "a number of seconds greater than 0"),
        ]:
            with self.assertRaises(ConfigError) as caught:
                load_config(None, {"udpd": {key: value}}, {})
            self.assertIn(f"[udpd] {key}: expected {expected}", str(caught.exception))

    def test_startupErrorIsOneLine(self) -> None:
        """A port in use: one line naming it and the way out."""
        from ipcd.tap import IPCDService

        with udp_socket() as taken:
            port = taken.getsockname()[1]
            rundir = short_rundir(self)
            config = load_config(
                None,
                {
                    "rundir": rundir,
                    "tcpd": {"enabled": False},
                    "pongd": {"enabled": False},
                    "udpd": {"enabled": True, "listen": f"udp:{port}"},
                },
                {},
            )
            service = IPCDService(config, reactor)
            with self.assertRaises(StartupError) as caught:
                service.privilegedStartService()
        self.assertEqual(
            str(caught.exception),
            f"cannot listen on 127.0.0.1:{port}: address already in use "
            "(another ipcd? use --udp ENDPOINT or --no-udp)",
        )


class UnexpectedErrorTests(TestCase):
    """udpd's requests that fail unexpectedly: a peer's to repeat."""

    @inlineCallbacks
    def test_loggedAtABoundedRate(self) -> Any:
        """
        Once ipcd has no fd left, each peer's HELLO fails with an unexpected
        error (a NO saying so): its line, with the traceback, goes at the
        bounded rate of tcpd's failed handshakes, and those left out are
        counted.
        """
        b = yield start_udp_host(self, rules=B_RULES)

        def ask(peers: int) -> list[Any]:
            refusals = []
            for _ in range(peers):
                with udp_socket() as sock:
                    refusals.append(handshake(sock, b.port)[0])
            return refusals

        answers = yield assert_unexpected_bounded(
            self, b.broker.counters, "ipcd.udpd", ask, "udpd: request from 127.0.0.1:"
        )
        for answer in answers:
            self.assertIsInstance(answer, udpwire.Refusal)
            self.assertIn("internal error", answer.reason)


class RouteLoopTests(TestCase):
    @inlineCallbacks
    def test_routedOutAgainRefused(self) -> Any:
        """
        A route that leads back into this very ipcd through its own udpd,
        for a name routed out again: the HELLO is refused as a loop at the
        first hop; a name served here still goes the round.
        """
        port = free_port(socket.SOCK_DGRAM)
        host = yield start_udp_host(
            self,
            rules=["allow in loopy", "allow in pong"],
            listen=f"udp:{port}:interface=127.0.0.1",
            config={"routes": {"loopy": f"udp://127.0.0.1:{port}/loopy"}},
        )
        yield assert_route_loop(self, host, "udp", port)
