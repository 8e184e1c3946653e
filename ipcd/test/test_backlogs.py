"""
The listen backlogs of ipcd's listeners (L{ipcd.backlogs}): what each
endpoint string gets, and that tcpd's listening socket really queues that
many connects (real sockets: a listener that does not accept, and connects
that complete only if the kernel has room for them).
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import subprocess
import time
from typing import Any

import hypothesis
from hypothesis import HealthCheck, example, settings
from hypothesis import strategies as st
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ipcd.backlogs import TCP_BACKLOG, with_backlog
from ipcd.names import UNIX_BACKLOG
from ipcd.test.support import TIMEOUT, short_rundir
from ipcd.test.tcpsupport import start_host
from ipcd.test.tlssupport import TestCA
from ipcd.test.wssupport import start_ws_host

# Connects made to a listener that accepts none: more than Twisted's
# default backlog (50) lets the kernel complete.
PENDING = 200


class WithBacklogTests(SynchronousTestCase):
    def test_added(self) -> None:
        """Where the string gives none: ipcd's, for its type."""
        for given, kind in [
            ("tcp:9000:interface=127.0.0.1", TCP_BACKLOG),
            ("tcp:9000:127.0.0.1", TCP_BACKLOG),
            (r"tcp6:9000:interface=\:\:1", TCP_BACKLOG),
            ("ssl:8443:privateKey=/k.pem:certKey=/c.pem", TCP_BACKLOG),
            ("haproxy:tcp:9000", TCP_BACKLOG),
            ("tls:/etc/ipcd/pems:port=8443", TCP_BACKLOG),
            ("tls:/etc/ipcd/pems:8443", TCP_BACKLOG),
            ("unix:/run/ipcd/tcp.sock:mode=660", UNIX_BACKLOG),
        ]:
            self.assertEqual(with_backlog(given), f"{given}:backlog={kind}")

    def test_kept(self) -> None:
        """A backlog given, by name or position; a type that takes none."""
        for given in [
            "tcp:9000:backlog=10",
            "tcp:9000:127.0.0.1:10",
            "tcp6:9000:10",
            "tls:/d:8443:10",
            "tls:/d:port=8443:backlog=10",
            "unix:/x.sock:660:10",
            "haproxy:tcp:9000:backlog=10",
            "systemd:domain=INET:index=0",
            "tor:80",
            "tcp:9000\\",
        ]:
            self.assertEqual(with_backlog(given), given)


# Endpoint strings of the types that take a backlog (ssl: aside, its
# parser reads files), wrapped or not, with escapes and odd-but-valid
# pieces: empty arguments, keywords before positions, '=' in a value.
_TYPES = st.sampled_from(
    ["tcp:", "tcp6:", "unix:", "haproxy:tcp:", "haproxy:haproxy:unix:", "Tcp6:"]
    + ["HAProxy:tcp6:", "t\\cp:", "systemd:"]
)
# Arguments: values its parsers take or refuse, by position or by name,
# with escapes ('\\:' a colon, '\\\\' a backslash) and odd-but-valid pieces.
_VALUES = ["9000", "0", "10", "127.0.0.1", "\\:\\:1", "660", "/tmp/x\\:y", "", " "]
_NAMES = ["backlog", "interface", "mode", "port", "address", "lockfile", "a"]
_ARGUMENTS = st.one_of(
    st.sampled_from(["9000", "0", "10", "660"]),  # a port, a mode, a backlog
    st.sampled_from(_VALUES + ["/tmp/x\\\\", "a=b=c", "=", "\\="]),
    st.builds("{}={}".format, st.sampled_from(_NAMES), st.sampled_from(_VALUES)),
)


def _listening(description: str) -> dict[str, Any] | None:
    """What Twisted's endpoint for C{description} would listen on, or None."""
    try:
        endpoint = serverFromString(MemoryReactorClock(), description)
    except (ValueError, TypeError, IndexError, KeyError):
        return None
    wrappers = 0
    while hasattr(endpoint, "_wrappedEndpoint"):  # haproxy:
        endpoint, wrappers = endpoint._wrappedEndpoint, wrappers + 1
    found = {k: v for k, v in vars(endpoint).items() if k != "_reactor"}
    return {"type": type(endpoint), "wrappers": wrappers, **found}


class WithBacklogPropertyTests(SynchronousTestCase):
    @settings(
        max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )
    @hypothesis.given(_TYPES, st.lists(_ARGUMENTS, max_size=5).map(":".join))
    @example("unix:", "/tmp/a\\:b\\\\:660")
    @example("tcp:", "interface=127.0.0.1:9000")
    @example("haproxy:tcp:", "9000:127.0.0.1")
    @example("tcp:", "9000: :10")  # a backlog by position, each type
    @example("tcp6:", "9000:10")
    @example("unix:", "/tmp/x:660:10")
    @example("haproxy:tcp:", "9000:interface=127.0.0.1:10")
    def test_sameListenerPlusBacklog(self, kind: str, rest: str) -> None:
        """
        A string Twisted takes listens, with ipcd's backlog, on what it
        named: nothing else changes (escapes, wrappers, arguments given by
        position or name), and a string that gives a backlog is kept.
        """
        description = kind + rest
        before = _listening(description)
        if before is None:
            return
        given = with_backlog(description)
        after = _listening(given)
        self.assertIsNotNone(after, f"{description!r} -> {given!r}")
        assert after is not None
        self.assertEqual(with_backlog(given), given)
        backlog = after.pop("_backlog", None)
        if given != description:
            self.assertEqual(before.pop("_backlog"), 50)  # Twisted's default
            expected = UNIX_BACKLOG if "UNIX" in after["type"].__name__ else TCP_BACKLOG
            self.assertEqual(backlog, expected, given)
        else:
            before.pop("_backlog", None)
        self.assertEqual(after, before, f"{description!r} -> {given!r}")


def _completed(port: int, count: int, seconds: float) -> int:
    """
    How many of C{count} connects to C{port} the kernel completes within
    C{seconds} (one whose SYN found the queue full waits for a retry).
    """
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.setblocking(False)
            socks.append(sock)
            sock.connect_ex(("127.0.0.1", port))
        waiting = {sock.fileno(): sock for sock in socks}
        deadline = time.monotonic() + seconds
        while waiting and time.monotonic() < deadline:
            _, writable, _ = select.select([], list(waiting), [], 0.1)
            for fd in writable:
                del waiting[fd]
        return count - len(waiting)
    finally:
        for sock in socks:
            sock.close()


class ListenerBacklogTests(TestCase):
    @inlineCallbacks
    def test_tcpdQueues(self) -> Any:
        """
        tcpd's listening socket, not accepting, has the kernel complete
        L{PENDING} connects (with Twisted's default of 50, 51 complete and
        the rest wait for SYN retries).
        """
        with open("/proc/sys/net/core/somaxconn") as f:
            ceiling = int(f.read())  # the kernel's cap on any backlog
        count = min(PENDING, ceiling)
        if count <= 60:
            raise self.skipTest(f"net.core.somaxconn is {ceiling}")
        host = yield start_host(self, pongd=False)
        port = yield host.service.getServiceNamed("tcpd").listening()
        port.stopReading()  # accepts nothing: connects stay queued
        done = yield deferToThread(_completed, host.port, count, TIMEOUT)
        self.assertEqual(done, count)

    @inlineCallbacks
    def test_tlsListenerBacklog(self) -> Any:
        """
        A C{tls:} listener (Twisted's, a directory of PEM files) gets ipcd's
        backlog too, as the kernel reports it (C{ss}: a listener's Send-Q):
        it had Twisted's 50, its type missing from ipcd's table.
        """
        ss = shutil.which("ss")
        if ss is None:
            raise self.skipTest("no ss (iproute2) to read a listener's backlog")
        with open("/proc/sys/net/core/somaxconn") as f:
            expected = min(TCP_BACKLOG, int(f.read()))  # (the kernel's cap)
        # (The CA's own .pem stays out of the listener's directory.)
        issued = TestCA(short_rundir(self, "ipcd-ca-")).issue("localhost")
        directory = short_rundir(self, "ipcd-pems-")
        with open(os.path.join(directory, "localhost.pem"), "w") as pem:
            for name in (issued.key, issued.cert):
                with open(name) as part:
                    pem.write(part.read())
        host = yield start_ws_host(
            self, listen=f"tls:{directory}:port=0:interface=127.0.0.1"
        )
        out = subprocess.run(
            [ss, "-lntH", f"sport = :{host.port}"],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=True,
        ).stdout.split()
        self.assertEqual(out[:1], ["LISTEN"], out)
        self.assertEqual(int(out[2]), expected, out)  # Send-Q: the backlog
