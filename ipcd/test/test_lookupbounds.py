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
