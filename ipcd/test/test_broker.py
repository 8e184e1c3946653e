"""
ipcd's lookup broker on real sockets: a plain client sends the exact bytes
upstream clients send and gets C{ok} with a working fd, or C{ne <reason>}
with no fd; ipcd keeps serving and leaks no fd.
"""

from __future__ import annotations

import os
import re
import socket
from typing import Any

from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from ipcd.lookupprotocol import LookupProtocol
from ipcd.test.support import (
    Reply,
    assert_no_fd_leak,
    bounce,
    calls_to,
    connect_unix,
    fake_daemon,
    fd_baseline,
    lookup,
    make_config,
    raw_lookup,
    read_reply,
    short_rundir,
    stale_socket,
    start_ipcd,
    wait_until,
)
from ipcd.wire import encode

BOUNCE = b"\x00\x00\x00\x09bounce me"


class BrokerTestCase(TestCase):
    @inlineCallbacks
    def start(self, **overrides: Any) -> Any:
        self.rundir = short_rundir(self)
        self.service = yield start_ipcd(self, make_config(self.rundir, **overrides))
        return self.service

    def assertOk(self, reply: Reply) -> Any:
        """Exactly C{ok}, in one recvmsg, with one fd, then EOF."""
        self.assertEqual((reply.first, reply.data), (b"ok", b"ok"))
        self.assertEqual(len(reply.fds), 1, "ok carries exactly one fd")
        self.assertTrue(reply.closed)
        return reply.take_socket(self)

    def assertRefused(self, reply: Reply, *reason: bytes) -> None:
        """C{ne <reason>}, no fd, connection closed."""
        fds = len(reply.fds)
        reply.close_fds()
        self.assertEqual(fds, 0, f"a refusal carries no fd: {reply.data!r}")
        self.assertTrue(reply.data.startswith(b"ne "), reply.data)
        self.assertTrue(reply.closed)
        for part in reason:
            self.assertIn(part, reply.data)

    @inlineCallbacks
    def assertWorks(self, reply: Reply) -> Any:
        """The handed-over fd is a working connection to pongd."""
        sock = self.assertOk(reply)
        try:
            echo = yield deferToThread(bounce, sock)
        finally:
            sock.close()
        self.assertEqual(echo, BOUNCE)


class UpstreamBytesTests(BrokerTestCase):
    @inlineCallbacks
    def test_exactUpstreamLookup(self) -> Any:
        """C{00 00 00 15 "pong;pong unix://pong"}: ok, one fd, to pongd."""
        yield self.start()
        raw = b"\x00\x00\x00\x15pong;pong unix://pong"
        self.assertEqual(raw, encode(b"pong;pong unix://pong"))
        reply = yield deferToThread(raw_lookup, self.rundir, raw)
        yield self.assertWorks(reply)

    @inlineCallbacks
    def test_routeForAnotherService(self) -> Any:
        """C{p;audio https://example.com/audio ;p unix://pong}: p is pongd."""
        yield self.start()
        payload = b"p;audio https://example.com/audio ;p unix://pong"
        raw = b"\x00\x00\x00\x30" + payload
        self.assertEqual(raw, encode(payload))
        reply = yield deferToThread(raw_lookup, self.rundir, raw)
        yield self.assertWorks(reply)

    @inlineCallbacks
    def test_noRoute(self) -> Any:
        """C{pong;} (no IPC_NETWORK routes): the local pongd."""
        yield self.start()
        reply = yield deferToThread(lookup, self.rundir, b"pong;")
        yield self.assertWorks(reply)

    @inlineCallbacks
    def test_lastRouteWins(self) -> Any:
        yield self.start()
        payload = b"pong;pong unix://missing;pong unix://pong"
        reply = yield deferToThread(lookup, self.rundir, payload)
        yield self.assertWorks(reply)


class FailureTests(BrokerTestCase):
    @inlineCallbacks
    def test_failuresThenStillServingNoLeak(self) -> Any:
        """
        Every failure gets C{ne ...}, no fd, and a close; afterwards ipcd
        still answers a good lookup and has no more fds open than before.
        """
        yield self.start(
            max_message_size=64,
            ipcd={"lookup_timeout": 0.3},
            redirects={"b": "a"},
            routes={"loop1": "unix://loop2", "loop2": "unix://loop1"},
        )
        stale_socket(os.path.join(self.rundir, "dead"))
        # Warm up (the thread pool, lazy imports), then count.
        yield self.assertWorks((yield deferToThread(lookup, self.rundir, b"pong;")))
        before = yield fd_baseline()

        framed = [
            (b"nosuch;", [b"nosuch", b"does not exist"]),
            (b"../etc", [b"../etc"]),
            (b"../etc;", [b"../etc"]),
            (b"", [b"empty service name"]),
            (b"pong;pong", [b"malformed route"]),
            (b"pong;pong bogus://x", [b"no transport for scheme 'bogus'"]),
            (b"pong;pong unix://../x", [b"../x"]),
            (b"pong;pong unix:///etc/passwd", [b"admin"]),
            (b"\xff\xfe;", [b"UTF-8"]),
            # Client route a -> b, admin redirect b -> a.
            (b"a;a unix://b", [b"redirect loop", b"a -> b -> a"]),
            # Admin routes loop1 -> loop2 -> loop1.
            (b"loop1;", [b"redirect loop"]),
            (b"dead;", [b"not running", b"stale"]),
            (b"pong;pong unix://dead", [b"not running"]),
            (b"missing;", [b"does not exist"]),
        ]
        for payload, reason in framed:
            reply = yield deferToThread(lookup, self.rundir, payload)
            self.assertRefused(reply, *reason)

        # The empty payload, byte for byte.
        reply = yield deferToThread(raw_lookup, self.rundir, b"\x00\x00\x00\x00")
        self.assertRefused(reply, b"empty")
        # A header announcing more than max_message_size.
        reply = yield deferToThread(raw_lookup, self.rundir, b"\x00\x00\x03\xe8pong;")
        self.assertRefused(reply, b"1000 bytes exceeds 64")
        # A client that says nothing; one that sends half a header.
        reply = yield deferToThread(raw_lookup, self.rundir, b"")
        self.assertRefused(reply, b"no lookup received within 0.3 s")
        reply = yield deferToThread(raw_lookup, self.rundir, b"\x00\x00")
        self.assertRefused(reply, b"no lookup received")

        # Still serving, and nothing leaked.
        yield self.assertWorks((yield deferToThread(lookup, self.rundir, b"pong;")))
        yield assert_no_fd_leak(before)
        counters = self.service.broker.counters
        self.assertGreaterEqual(counters["refused"], 10)

    @inlineCallbacks
    def test_clientDisconnectsBeforeAnswer(self) -> Any:
        """
        A client that leaves while ipcd connects: the connection ipcd made
        is closed, nothing leaks, ipcd serves the next client.
        """
        yield self.start(ipcd={"external_daemons": ["fake"]})
        daemon = fake_daemon(self, self.rundir, mode="hold")
        yield self.assertWorks((yield deferToThread(lookup, self.rundir, b"pong;")))
        before = yield fd_baseline()

        def leave() -> None:
            with connect_unix(os.path.join(self.rundir, "ipc")) as sock:
                sock.sendall(encode(b"pong;pong fake://host:1/pong"))

        yield deferToThread(leave)
        yield wait_until(lambda: daemon.held, "the lookup to reach the daemon")
        [held] = daemon.held
        yield wait_until(lambda: held.lost.called, "ipcd to drop the daemon")
        daemon.release()
        yield self.assertWorks((yield deferToThread(lookup, self.rundir, b"pong;")))
        yield assert_no_fd_leak(before)

    @inlineCallbacks
    def test_silentClientDoesNotBlockOthers(self) -> Any:
        yield self.start(ipcd={"lookup_timeout": 5})
        silent = yield deferToThread(connect_unix, os.path.join(self.rundir, "ipc"))
        self.addCleanup(silent.close)
        yield self.assertWorks((yield deferToThread(lookup, self.rundir, b"pong;")))


class DecisionLineTests(BrokerTestCase):
    """
    The decision lines say what happened, and whose verdict: no target for
    a request refused before one was chosen, and a verdict of this ipcd's
    told apart from a refusal further on.
    """

    @inlineCallbacks
    def test_refusedHereAndThere(self) -> Any:
        yield self.start(
            tcpd={"listen": "tcp:0:interface=127.0.0.1"}, rules=["deny in * *"]
        )
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        port = self.service.addresses["tcpd"][0].rsplit(":", 1)[1]
        route = f"tcp://127.0.0.1:{port}/pong"
        reply = yield deferToThread(lookup, self.rundir, f"pong;pong {route}".encode())
        # The inbound side tells its peer (this ipcd's dial) only "refused";
        # its decision line has the rule.
        refused = f"tcpd at 127.0.0.1:{port} refused 'pong': refused"
        self.assertEqual(reply.data.decode(), f"ne {refused}")
        yield wait_until(lambda: len(self.decisions(events)) == 2, "two decisions")
        inbound, outbound = self.decisions(events)
        self.assertRegex(
            inbound,
            r"^in 'pong' for 127\.0\.0\.1:\d+: in connection to 'pong' denied by "
            r"rule 1 \(deny in \* \*\)$",
        )
        self.assertRegex(
            outbound,
            rf"^out 'pong' for pid \d+ uid \d+ -> {route}: "
            rf"{re.escape(refused)} \(allowed by default here\)$",
        )

    def decisions(self, events: list[dict[str, Any]]) -> list[str]:
        return [formatEvent(e) for e in events if "direction" in e]


class CleanLogTests(BrokerTestCase):
    """
    Lookups that a client can make up to abuse ipcd's log: each is refused
    with a clear reason and is one log event, on one printable line, with
    no traceback.
    """

    @inlineCallbacks
    def setUp(self) -> Any:
        yield self.start(tcpd={"listen": "tcp:0:interface=127.0.0.1"})
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    @inlineCallbacks
    def assertOneCleanEvent(self, payload: bytes, *reason: bytes) -> Any:
        del self.events[:]
        reply = yield deferToThread(lookup, self.rundir, payload)
        self.assertRefused(reply, *reason)
        self.assertTrue(reply.data.decode().isprintable(), reply.data)
        yield wait_until(lambda: self.events, "the lookup's log event")
        self.assertEqual([e for e in self.events if "log_failure" in e], [])
        [event] = [e for e in self.events if e["log_namespace"].startswith("ipcd.")]
        text = formatEvent(event)
        self.assertTrue(text.isprintable(), text)
        self.assertNotIn("Traceback", text)
        self.assertIn(reason[-1].decode(), text)
        return text

    @inlineCallbacks
    def test_badHosts(self) -> Any:
        """
        Hosts that used to reach the resolver (and fail there, in IDNA, as
        an internal error with a traceback) are refused when parsed.
        """
        for host, why in [
            (b"x" * 300, b"at most 253 characters, not 300"),
            (b"a" * 64 + b".com", b"longer than 63 characters"),
            (b"xn--a.com", b"label 'xn--a' is not valid IDNA"),
            (b"a..b", b"empty label"),
            (b"\xe2\x98\x83" * 100, b"not a valid international (IDNA) host name"),
        ]:
            yield self.assertOneCleanEvent(
                b"pong;pong tcp://" + host + b":9000/pong",
                b"bad lookup: invalid host in URI",
                why,
            )

    @inlineCallbacks
    def test_controlCharacters(self) -> Any:
        """
        An ESC in a route's host is refused; in a requested name, too; and
        neither reaches the log raw.
        """
        text = yield self.assertOneCleanEvent(
            b"pong;pong tcp://evil\x1bhost:9000/pong",
            b"bad lookup: invalid host in URI 'tcp://evil\\x1bhost:9000/pong': "
            b"control characters are not allowed",
        )
        self.assertIn("\\x1b", text)
        yield self.assertOneCleanEvent(
            b"po\x1bng\x07;", b"invalid service name 'po\\x1bng\\x07'"
        )
        yield self.assertOneCleanEvent(
            b"pong;pong ev\x1bil:9000/pong", b"invalid service name 'ev\\x1bil:9000"
        )


class ConcurrencyTests(BrokerTestCase):
    @inlineCallbacks
    def test_twoLookupsInFlight(self) -> Any:
        """A slow lookup does not hold up a quick one; both are answered."""
        yield self.start(ipcd={"external_daemons": ["fake"]})
        daemon = fake_daemon(self, self.rundir, mode="hold")
        slow = deferToThread(lookup, self.rundir, b"pong;pong fake://host:1/pong")
        yield wait_until(lambda: daemon.held, "the slow lookup to reach the daemon")
        quick = yield deferToThread(lookup, self.rundir, b"pong;")
        yield self.assertWorks(quick)
        self.assertFalse(slow.called)
        daemon.release()
        reply = yield slow
        sock = self.assertOk(reply)
        echo = yield deferToThread(bounce, sock, b"through the daemon")
        self.assertEqual(echo, encode(b"through the daemon"))

    @inlineCallbacks
    def test_manyConcurrentLookups(self) -> Any:
        yield self.start()
        replies = yield gatherResults(
            [deferToThread(lookup, self.rundir, b"pong;") for _ in range(8)]
        )
        for reply in replies:
            yield self.assertWorks(reply)


class RoutingTests(BrokerTestCase):
    @inlineCallbacks
    def test_redirectFromConfig(self) -> Any:
        """C{--redirect "echo pong"}: a lookup for echo reaches pongd."""
        yield self.start(redirects={"echo": "pong", "old": "echo"})
        for name in (b"echo;", b"old;"):
            reply = yield deferToThread(lookup, self.rundir, name)
            yield self.assertWorks(reply)

    @inlineCallbacks
    def test_adminRoute(self) -> Any:
        """C{--route "p2 unix://pong"}."""
        yield self.start(routes={"p2": "unix://pong"})
        reply = yield deferToThread(lookup, self.rundir, b"p2;")
        yield self.assertWorks(reply)

    @inlineCallbacks
    def test_adminAbsolutePathRoute(self) -> Any:
        rundir = short_rundir(self)
        path = os.path.join(rundir, "pong")
        self.rundir = short_rundir(self)
        # pongd of a first instance, reached by absolute path from a second.
        yield start_ipcd(self, make_config(rundir))
        yield start_ipcd(
            self,
            make_config(
                self.rundir, pongd={"enabled": False}, routes={"far": "unix://" + path}
            ),
        )
        self.assertFalse(os.path.exists(os.path.join(self.rundir, "pong")))
        reply = yield deferToThread(lookup, self.rundir, b"far;")
        yield self.assertWorks(reply)

    @inlineCallbacks
    def test_clientRoutesDisabled(self) -> Any:
        """C{allow_client_routes = false}: the client's route is ignored."""
        yield self.start(ipcd={"allow_client_routes": False}, redirects={"x": "pong"})
        reply = yield deferToThread(lookup, self.rundir, b"pong;pong unix://missing")
        yield self.assertWorks(reply)
        reply = yield deferToThread(lookup, self.rundir, b"y;y unix://pong")
        self.assertRefused(reply, b"'y'", b"does not exist")
        reply = yield deferToThread(lookup, self.rundir, b"x;x unix://missing")
        yield self.assertWorks(reply)

    @inlineCallbacks
    def test_clientRouteOverridesAdminRoute(self) -> Any:
        yield self.start(routes={"p": "unix://missing"})
        reply = yield deferToThread(lookup, self.rundir, b"p;")
        self.assertRefused(reply, b"missing")
        reply = yield deferToThread(lookup, self.rundir, b"p;p unix://pong")
        yield self.assertWorks(reply)


class ZonedRouteRuleTests(BrokerTestCase):
    @inlineCallbacks
    def test_hostRulesSeeEverySpelling(self) -> Any:
        """
        A route to a link-local host names its link by interface name or
        index: an C{out} rule for one spelling is a rule for the other, and
        one for the address alone is one for every link's.  (Zoned routes
        were refused when parsed; with the zone in the one C{host:} label, a
        client got past C{deny out * host:fe80::2%lo} with C{%1}, and past
        C{deny out * host:fe80::9} with any zone.)  Refused before any
        connect: no link-local address is needed.
        """
        index = socket.if_nametoindex("lo")
        yield self.start(
            rules=["deny out * host:fe80::2%lo", "deny out * host:fe80::9"]
        )
        for payload, rule in [
            (f"x;x tcp://[fe80::2%{index}]:9/x", b"denied by rule 1"),
            ("x;x tcp://[fe80::2%lo]:9/x", b"denied by rule 1"),
            ("x;x udp://[fe80::9%lo]:9/x", b"denied by rule 2"),
            (f"x;x tls://[fe80::9%{index}]:9/x", b"denied by rule 2"),
        ]:
            reply = yield deferToThread(lookup, self.rundir, payload.encode())
            self.assertRefused(reply, rule)

    @inlineCallbacks
    def test_zoneOfNoLink(self) -> Any:
        """
        A zone no interface has, by name or index, is refused in one line
        by every scheme, nothing left open, ipcd serving on (udp:// was
        'internal error: [Errno 101] Network is unreachable' and an
        unhandled error logged; tls:// and ws:// said 'Name or service not
        known').
        """
        listen = "tcp:0:interface=127.0.0.1"
        yield self.start(
            tcpd={"listen": listen},
            websocketd={"enabled": True, "listen": listen},
            udpd={"enabled": True, "listen": "udp:0:interface=127.0.0.1"},
        )
        # A first lookup before the count: nothing lazily opened is counted.
        reply = yield deferToThread(lookup, self.rundir, b"pong;")
        yield self.assertWorks(reply)
        before = yield fd_baseline()
        for scheme in ("tcp", "udp", "tls", "ws"):
            route = f"x;x {scheme}://[fe80::2%nosuch0]:9/x".encode()
            reply = yield deferToThread(lookup, self.rundir, route)
            self.assertEqual(
                reply.data,
                b"ne cannot connect to [fe80::2%nosuch0]:9: no interface 'nosuch0'",
            )
            reply.close_fds()
            # An index: the kernel's word (no route here; no device), one line.
            route = f"x;x {scheme}://[fe80::2%4000000000]:9/x".encode()
            reply = yield deferToThread(lookup, self.rundir, route)
            self.assertRefused(reply, b"[fe80::2%4000000000]:9")
            self.assertNotIn(b"internal error", reply.data)
        yield assert_no_fd_leak(before)
        reply = yield deferToThread(lookup, self.rundir, b"pong;")
        yield self.assertWorks(reply)


class ReplyShapeTests(BrokerTestCase):
    @inlineCallbacks
    def test_okIsOneSendmsg(self) -> Any:
        """The first recvmsg holds all of C{ok} and the fd: upstream reads once."""
        yield self.start()

        def once() -> tuple[bytes, int]:
            with connect_unix(os.path.join(self.rundir, "ipc")) as sock:
                sock.sendall(encode(b"pong;"))
                reply = read_reply(sock)
                first = reply.first
                count = len(reply.fds)
                reply.close_fds()
                return first, count

        for _ in range(20):
            self.assertEqual((yield deferToThread(once)), (b"ok", 1))

    @inlineCallbacks
    def test_secondMessageIgnored(self) -> Any:
        """A lookup and more bytes coalesced: one answer, for the lookup."""
        yield self.start()
        raw = encode(b"pong;") + encode(b"nosuch;")
        reply = yield deferToThread(raw_lookup, self.rundir, raw)
        yield self.assertWorks(reply)


class HalfCloseTests(BrokerTestCase):
    """
    A client that shuts its writing half after its lookup (upstream clients
    may; C{socat} does) still gets its answer and the descriptor, also when
    the answer comes later; one that closed altogether is let go.
    """

    def half_closed(self, payload: bytes) -> socket.socket:
        """A client that sent C{payload}, framed, and then shut its writing."""
        sock = connect_unix(os.path.join(self.rundir, "ipc"))
        self.addCleanup(sock.close)
        sock.sendall(encode(payload))
        sock.shutdown(socket.SHUT_WR)
        return sock

    @inlineCallbacks
    def test_answerComesLater(self) -> Any:
        """
        The daemon accepts after the client's EOF reached ipcd: C{ok} and a
        working fd all the same, and no fd left behind.
        """
        yield self.start(ipcd={"external_daemons": ["fake"]})
        daemon = fake_daemon(self, self.rundir, mode="hold")
        before = yield fd_baseline()
        eofs = calls_to(self, LookupProtocol, "readConnectionLost", lambda p: p)
        sock = yield deferToThread(self.half_closed, b"pong;pong fake://host:1/pong")
        yield wait_until(lambda: daemon.held, "the lookup to reach the daemon")
        yield wait_until(lambda: eofs, "ipcd to read the client's EOF")
        daemon.release()
        reply = yield deferToThread(read_reply, sock)
        far = self.assertOk(reply)
        echo = yield deferToThread(bounce, far, b"after a half-close")
        self.assertEqual(echo, encode(b"after a half-close"))
        far.close()
        sock.close()
        yield assert_no_fd_leak(before)

    @inlineCallbacks
    def test_answeredAtOnce(self) -> Any:
        """A lookup answered at once (pongd): C{ok} and the fd, as usual."""
        yield self.start()
        for _ in range(5):
            sock = yield deferToThread(self.half_closed, b"pong;")
            yield self.assertWorks((yield deferToThread(read_reply, sock)))
            sock.close()

    @inlineCallbacks
    def test_unfinishedLookup(self) -> Any:
        """Half a lookup, then EOF: C{ne} says so, rather than a bare close."""
        yield self.start()

        def unfinished() -> Reply:
            with connect_unix(os.path.join(self.rundir, "ipc")) as sock:
                sock.sendall(encode(b"pong;")[:6])
                sock.shutdown(socket.SHUT_WR)
                return read_reply(sock)

        reply = yield deferToThread(unfinished)
        self.assertRefused(reply, b"lookup unfinished")
        yield self.assertWorks((yield deferToThread(lookup, self.rundir, b"pong;")))

    @inlineCallbacks
    def test_closedAfterHalfClose(self) -> Any:
        """
        A client that half-closed, then closed before its answer came: the
        socket that comes is closed, nothing is left open, ipcd serves on.
        """
        yield self.start(ipcd={"external_daemons": ["fake"]})
        daemon = fake_daemon(self, self.rundir, mode="hold")
        yield self.assertWorks((yield deferToThread(lookup, self.rundir, b"pong;")))
        before = yield fd_baseline()
        eofs = calls_to(self, LookupProtocol, "readConnectionLost", lambda p: p)
        sock = yield deferToThread(self.half_closed, b"pong;pong fake://host:1/pong")
        yield wait_until(lambda: daemon.held, "the lookup to reach the daemon")
        yield wait_until(lambda: eofs, "ipcd to read the client's EOF")
        [held] = daemon.held
        sock.close()  # the answer then finds nobody (EPIPE)
        daemon.release()
        yield wait_until(lambda: held.lost.called, "ipcd to close the daemon's")
        yield self.assertWorks((yield deferToThread(lookup, self.rundir, b"pong;")))
        yield assert_no_fd_leak(before)
