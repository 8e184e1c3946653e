"""
The external-daemon path: a scheme with no in-process transport but a
C{RUNDIR/SCHEME} socket is served with the upstream control protocol
(framed URI, framed C{ok}, then that connection is handed over), against a
fake daemon.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

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


class ExternalDaemonTests(TestCase):
    @inlineCallbacks
    def setUp(self) -> Any:
        self.rundir = short_rundir(self)
        self.service = yield start_ipcd(self, make_config(self.rundir))

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
                rundir, pongd={"enabled": False}, routes={"x": "fake://h:2/svc"}
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
            ("refuse", b"fake daemon answered b'\\x00\\x00\\x00\\x02no'"),
            ("garbage", b"fake daemon"),
            ("close", b"fake daemon refused fake://h:1/pong"),
        ]:
            daemon.mode = mode
            reply = yield deferToThread(lookup, self.rundir, route)
            self.assertRefused(reply, reason)
        self.assertEqual(len(daemon.uris), 4)
        yield assert_no_fd_leak(before)

    @inlineCallbacks
    def test_noDaemonSocket(self) -> Any:
        reply = yield deferToThread(lookup, self.rundir, b"pong;pong fake://h:1/pong")
        self.assertRefused(reply, b"no transport for scheme 'fake'")

    @inlineCallbacks
    def test_notASocket(self) -> Any:
        with open(os.path.join(self.rundir, "fake"), "w"):
            pass
        reply = yield deferToThread(lookup, self.rundir, b"pong;pong fake://h:1/pong")
        self.assertRefused(reply, b"no transport for scheme 'fake'")

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
                rundir, pongd={"enabled": False}, ipcd={"connect_timeout": 0.3}
            ),
        )
        daemon = fake_daemon(self, rundir, mode="hold")
        reply = yield deferToThread(lookup, rundir, b"pong;pong fake://h:1/pong")
        self.assertRefused(reply, b"timed out after 0.3 s")
        [held] = daemon.held
        # ipcd gave up on the daemon's connection too.
        yield wait_until(lambda: held.lost.called, "ipcd to drop the daemon")
