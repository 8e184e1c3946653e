"""
The external-daemon path: a scheme the admin configured as served by an
external daemon on C{RUNDIR/SCHEME} is served with the upstream control
protocol (framed URI, framed C{ok}, then that connection is handed over),
against a fake daemon.  A socket that is not a configured daemon is never
one, whatever a client's route says.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from ipcd.config import ConfigError
from ipcd.identity import Peer
from ipcd.resolution import RemoteTarget
from ipcd.routes import parse_uri
from ipcd.test.support import (
    assert_no_fd_leak,
    bounce,
    exchange,
    fake_daemon,
    fd_baseline,
    lookup,
    make_config,
    raw_lookup,
    short_rundir,
    stale_socket,
    start_ipcd,
    wait_until,
)
from ipcd.wire import encode

DAEMONS = ["fake", "tcp"]


class ExternalDaemonTests(TestCase):
    @inlineCallbacks
    def setUp(self) -> Any:
        self.rundir = short_rundir(self)
        self.service = yield start_ipcd(
            self, make_config(self.rundir, ipcd={"external_daemons": DAEMONS})
        )

    def assertHanded(self, reply: Any) -> Any:
        self.assertEqual((reply.first, reply.data, len(reply.fds)), (b"ok", b"ok", 1))
        return reply.take_socket(self)

    def assertRefused(self, reply: Any, reason: bytes) -> None:
        count = len(reply.fds)
        reply.close_fds()
        self.assertEqual(count, 0)
        self.assertTrue(reply.data.startswith(b"ne "), reply.data)
        self.assertIn(reason, reply.data)

    @inlineCallbacks
    def test_okAndEcho(self) -> Any:
        """
        The daemon gets exactly the framed URI; the client gets C{ok} + an fd
        on which it talks to the daemon.
        """
        daemon = fake_daemon(self, self.rundir)
        reply = yield deferToThread(
            lookup, self.rundir, b"pong;pong fake://host:1/pong"
        )
        sock = self.assertHanded(reply)
        self.assertEqual(daemon.uris, [b"\x00\x00\x00\x12fake://host:1/pong"])
        echo = yield deferToThread(bounce, sock, b"bounce me")
        self.assertEqual(echo, b"\x00\x00\x00\x09bounce me")

    @inlineCallbacks
    def test_upstreamTcpBytes(self) -> Any:
        """
        The spec's own example, with an external daemon on C{RUNDIR/tcp} (as
        upstream's tcpd): C{00 00 00 23 "pong;pong tcp://127.0.0.1:9000/pong"}
        becomes C{00 00 00 19 "tcp://127.0.0.1:9000/pong"} to the daemon.
        """
        daemon = fake_daemon(self, self.rundir, scheme="tcp")
        raw = b"\x00\x00\x00\x23pong;pong tcp://127.0.0.1:9000/pong"
        reply = yield deferToThread(raw_lookup, self.rundir, raw)
        sock = self.assertHanded(reply)
        self.assertEqual(daemon.uris, [b"\x00\x00\x00\x19tcp://127.0.0.1:9000/pong"])
        echo = yield deferToThread(bounce, sock)
        self.assertEqual(echo, b"\x00\x00\x00\x09bounce me")

    @inlineCallbacks
    def test_bytesAfterOkReachTheClient(self) -> Any:
        """What the daemon sends with its C{ok} is not swallowed by ipcd."""
        greeting = encode(b"welcome")
        fake_daemon(self, self.rundir, greeting=greeting)
        reply = yield deferToThread(
            lookup, self.rundir, b"pong;pong fake://host:1/pong"
        )
        sock = self.assertHanded(reply)
        data = yield deferToThread(exchange, sock, b"", len(greeting))
        self.assertEqual(data, greeting)
        echo = yield deferToThread(bounce, sock, b"after")
        self.assertEqual(echo, encode(b"after"))

    @inlineCallbacks
    def test_emptyPathIsTheRequestedName(self) -> Any:
        daemon = fake_daemon(self, self.rundir)
        reply = yield deferToThread(lookup, self.rundir, b"pong;pong fake://[::1]:7")
        self.assertHanded(reply)
        self.assertEqual(daemon.uris, [encode(b"fake://[::1]:7")])

    @inlineCallbacks
    def test_adminRoute(self) -> Any:
        rundir = short_rundir(self)
        yield start_ipcd(
            self,
            make_config(
                rundir,
                pongd={"enabled": False},
                routes={"x": "fake://h:2/svc"},
                ipcd={"external_daemons": ["fake"]},
            ),
        )
        daemon = fake_daemon(self, rundir)
        reply = yield deferToThread(lookup, rundir, b"x;")
        self.assertHanded(reply)
        self.assertEqual(daemon.uris, [encode(b"fake://h:2/svc")])

    @inlineCallbacks
    def test_daemonRefuses(self) -> Any:
        """Anything but a framed C{ok}, or a close: C{ne ...}, no fd, no leak."""
        daemon = fake_daemon(self, self.rundir)
        route = b"pong;pong fake://h:1/pong"
        # Warm up once, then count.
        reply = yield deferToThread(lookup, self.rundir, route)
        reply.close_fds()
        before = yield fd_baseline()
        for mode, reason in [
            ("refuse", b"fake daemon did not answer ok for fake://h:1/pong"),
            ("garbage", b"fake daemon refused fake://h:1/pong"),
            ("close", b"fake daemon refused fake://h:1/pong"),
        ]:
            daemon.mode = mode
            reply = yield deferToThread(lookup, self.rundir, route)
            self.assertRefused(reply, reason)
        self.assertEqual(len(daemon.uris), 4)
        yield assert_no_fd_leak(before)

    @inlineCallbacks
    def test_refusalNeverEchoesTheDaemon(self) -> Any:
        """What a daemon answers instead of C{ok} is not shown to the client."""
        daemon = fake_daemon(self, self.rundir, mode="leak")
        reply = yield deferToThread(lookup, self.rundir, b"pong;pong fake://h:1/p")
        self.assertRefused(reply, b"did not answer ok")
        self.assertNotIn(b"SECRET", reply.data)
        self.assertEqual(len(daemon.uris), 1)

    @inlineCallbacks
    def test_noDaemonSocket(self) -> Any:
        reply = yield deferToThread(lookup, self.rundir, b"pong;pong fake://h:1/pong")
        self.assertRefused(reply, b"the fake daemon is not running")

    @inlineCallbacks
    def test_notASocket(self) -> Any:
        with open(os.path.join(self.rundir, "fake"), "w"):
            pass
        reply = yield deferToThread(lookup, self.rundir, b"pong;pong fake://h:1/pong")
        self.assertRefused(reply, b"is not a socket")

    @inlineCallbacks
    def test_unconfiguredSchemeIsNoDaemon(self) -> Any:
        """
        A client's C{SCHEME://} route to a socket in RUNDIR that the admin did
        not configure as a daemon is refused, and nothing is written to it
        (pongd would echo a request back as if it were an answer).
        """
        daemon = fake_daemon(self, self.rundir, scheme="other")
        before = yield fd_baseline()
        for route in [b"x;x other://h:1/y", b"x;x pong://h:1/y", b"pong;pong ipc://h/"]:
            reply = yield deferToThread(lookup, self.rundir, route)
            self.assertRefused(reply, b"no transport for scheme")
        self.assertEqual((daemon.uris, daemon.connections), ([], []))
        self.assertEqual(self.service.broker.counters["connected"], 0)
        yield assert_no_fd_leak(before)

    @inlineCallbacks
    def test_daemonSocketOfAnotherUserNotTrusted(self) -> Any:
        """A configured daemon's socket must be root's or ipcd's own."""
        if os.getuid() != 0:
            raise SkipTest("needs root to give the socket to another user")
        daemon = fake_daemon(self, self.rundir)
        os.chown(os.path.join(self.rundir, "fake"), 65534, -1)
        reply = yield deferToThread(lookup, self.rundir, b"pong;pong fake://h:1/p")
        self.assertRefused(reply, b"belongs to uid 65534")
        self.assertIn(b"not trusted as the fake daemon", reply.data)
        self.assertEqual(daemon.uris, [])

    @inlineCallbacks
    def test_checkedSocketIsTheOneConnected(self) -> Any:
        """
        The daemon's socket that was checked is the one connected: another
        user's socket put at its name after the check (say, while the
        daemon's backlog is full) gets nothing.
        """
        if os.getuid() != 0:
            raise SkipTest("needs root to give a socket to another user")
        daemon = fake_daemon(self, self.rundir)
        transport = self.service.broker.transport_for("fake")
        impostor = fake_daemon(self, self.rundir, scheme="impostor")
        path = os.path.join(self.rundir, "impostor")
        os.chown(path, 65534, -1)
        os.rename(path, os.path.join(self.rundir, "fake"))
        uri = parse_uri("fake://h:1/p")
        sock = yield transport.connect(RemoteTarget(uri, "p"), Peer("a client"))
        sock.close()
        self.assertEqual(daemon.uris, [encode(b"fake://h:1/p")])
        self.assertEqual(impostor.uris, [])

    def test_daemonSchemeChecked(self) -> None:
        """Only URI schemes that can be sockets, and not ipcd's own names."""
        for bad in [["ipc"], ["ipcd-control"], ["unix"], ["Tls"], "tls", [3]]:
            self.assertRaises(
                ConfigError,
                make_config,
                self.rundir,
                ipcd={"external_daemons": bad},
            )

    @inlineCallbacks
    def test_staleDaemonSocket(self) -> Any:
        stale_socket(os.path.join(self.rundir, "fake"))
        reply = yield deferToThread(lookup, self.rundir, b"pong;pong fake://h:1/pong")
        self.assertRefused(reply, b"not running")

    @inlineCallbacks
    def test_daemonNeverAnswers(self) -> Any:
        """A daemon that holds the lookup past the connect deadline."""
        rundir = short_rundir(self)
        yield start_ipcd(
            self,
            make_config(
                rundir,
                pongd={"enabled": False},
                ipcd={"connect_timeout": 0.3, "external_daemons": ["fake"]},
            ),
        )
        daemon = fake_daemon(self, rundir, mode="hold")
        reply = yield deferToThread(lookup, rundir, b"pong;pong fake://h:1/pong")
        self.assertRefused(reply, b"timed out after 0.3 s")
        [held] = daemon.held
        # ipcd gave up on the daemon's connection too.
        yield wait_until(lambda: held.lost.called, "ipcd to drop the daemon")
