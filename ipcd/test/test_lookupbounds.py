"""
What a local client's long lookups can make a real ipcd (a child process)
hold: nothing once it is gone, and no more than a short answer and a short
log line per lookup, whether or not it reads the answer.

Nothing here is timed: bounds are on bytes (resident memory from
/proc/PID/status, reply and log line lengths) and on descriptors; every
wait is bounded.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from twisted.trial.unittest import TestCase

from ipcd.errors import MAX_REASON
from ipcd.routes import MAX_LOOKUP_ROUTES
from ipcd.test.support import (
    TIMEOUT,
    open_fds,
    proc_status,
    python_env,
    read_reply,
    read_text,
    short_rundir,
    spawn,
)
from ipcd.wire import encode

MiB = 1024 * 1024
# A lookup of about 1 MiB: within the default max_message_size.
LONG = 1_000_000
# What ipcd may keep, after the clients have gone, for 40 distinct such
# lookups beyond 40 times the same one (its plans are kept per payload).
KEPT_BOUND = 8 * MiB
# The CPU ipcd may spend on 10 lookups of 1 MB of routes each (it spends
# about 10 ms on each: reading it; parsing them took a second each).
ROUTES_CPU_BOUND = 5.0
# The longest log line a lookup may cost (its reason is at most MAX_REASON
# characters, escaped at most fourfold, plus who, labels and target).
LINE_BOUND = 8 * 1024


class ChildIpcd:
    """An ipcd in a child process (pongd, no network daemons)."""

    def __init__(self, case: TestCase) -> None:
        self.rundir = short_rundir(case, "ipcd-lb-")
        self.log = self.rundir + ".log"
        case.addCleanup(lambda: os.path.exists(self.log) and os.unlink(self.log))
        args = ["-m", "ipcd.scripts.ipcd", "--rundir", self.rundir]
        args += ["--no-tcp", "--no-tls", "--no-ws"]
        self.process = spawn(case, args, self.log, python_env(), self.rundir)
        deadline = time.monotonic() + 3 * TIMEOUT
        while not os.path.exists(os.path.join(self.rundir, "pong")):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"ipcd did not start:\n{read_text(self.log)}")
            time.sleep(0.05)

    def send(self, payload: bytes) -> socket.socket:
        """A client that has sent the lookup C{payload}, its answer unread."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(3 * TIMEOUT)
        sock.connect(os.path.join(self.rundir, "ipc"))
        sock.sendall(encode(payload))
        return sock

    def ask(self, payload: bytes) -> Any:
        """The answer to the lookup C{payload} (its fd closed)."""
        with self.send(payload) as sock:
            reply = read_reply(sock)
        for fd in reply.fds:
            os.close(fd)
        return reply

    def rss(self) -> int:
        return proc_status("VmRSS", self.process.pid)

    def fds(self) -> int:
        return len(open_fds(self.process.pid))

    def cpu_seconds(self) -> float:
        """User and system CPU time ipcd has used."""
        with open(f"/proc/{self.process.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _padded(head: str, pad: str = " ") -> bytes:
    """C{head} made about L{LONG} bytes long with C{pad}."""
    return (head + pad * LONG)[:LONG].encode()


class LongLookupTests(TestCase):
    timeout = 240

    def test_longLookupsNotKept(self) -> None:
        """
        ipcd keeps what it worked out for a lookup it sees again and again,
        but not a long one's bytes: 40 distinct lookups of 1 MB each, from
        clients that have gone, leave ipcd no larger than 40 times the same
        one did (within L{KEPT_BOUND}).
        """
        ipcd = ChildIpcd(self)
        for _ in range(40):
            self.assertEqual(ipcd.ask(_padded("pong;x unix://pong;")).data, b"ok")
        same = ipcd.rss()
        for i in range(40):
            reply = ipcd.ask(_padded(f"pong;x{i} unix://pong;"))
            self.assertEqual(reply.data, b"ok")
        grown = ipcd.rss() - same
        self.assertLess(grown, KEPT_BOUND, f"{grown / MiB:.1f} MiB kept")

    def test_longRefusalsShort(self) -> None:
        """
        A long lookup that is refused is answered in at most L{MAX_REASON}
        characters and logged in one short line, however much of it the
        reason would quote; so the answer fits in the socket at once, and a
        client that never reads it holds nothing in ipcd.
        """
        ipcd = ChildIpcd(self)
        payloads = [
            _padded("pong;pong ", "\x01") + b"://h",  # an invalid scheme
            _padded("pong;pong ", "a") + b"://h",  # a scheme too long
            _padded("pong;pong unix:///", "a/"),  # a client's path route
            _padded("pong;pong", "\x01"),  # a malformed route
            _padded("pong;pong tcp://h/", "\x01"),  # an invalid service
            _padded("pong;pong tcp://h:99999/", "a"),  # an invalid port
            _padded("pong;pong unix://", "\x01"),  # an invalid local name
        ]
        for payload in payloads:
            reply = ipcd.ask(payload)
            self.assertEqual(reply.fds, [])
            self.assertTrue(reply.data.startswith(b"ne "), reply.data[:80])
            self.assertLessEqual(len(reply.data), 3 + MAX_REASON, reply.data[:80])
        before = ipcd.fds()
        unread = [ipcd.send(payloads[i % len(payloads)]) for i in range(30)]
        try:
            deadline = time.monotonic() + 3 * TIMEOUT
            while ipcd.fds() > before and time.monotonic() < deadline:
                time.sleep(0.05)
            self.assertLessEqual(ipcd.fds(), before, "connections still held")
        finally:
            for sock in unread:
                sock.close()
        lines = read_text(ipcd.log).splitlines()
        longest = max(len(line) for line in lines)
        self.assertLess(longest, LINE_BOUND)

    def test_manyRoutesRefused(self) -> None:
        """
        A lookup of more than L{MAX_LOOKUP_ROUTES} routes is refused before
        any is parsed: 10 lookups of 250,000 routes (1 MB) each cost ipcd
        less than L{ROUTES_CPU_BOUND} seconds of CPU in all, not a second
        each during which it served nobody else.
        """
        ipcd = ChildIpcd(self)
        before = ipcd.cpu_seconds()
        for _ in range(10):
            reply = ipcd.ask(_padded("pong", ";a b"))
            expected = f"ne bad lookup: more than {MAX_LOOKUP_ROUTES} routes"
            self.assertEqual(reply.data, expected.encode())
        self.assertLess(ipcd.cpu_seconds() - before, ROUTES_CPU_BOUND)
        self.assertEqual(ipcd.ask(b"pong;").data, b"ok")
