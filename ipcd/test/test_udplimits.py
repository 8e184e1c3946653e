"""
A local client's outbound udp:// sessions are bounded: each holds a UDP
socket and a stream in ipcd for as long as the client holds its end, so
they count, per client uid, in [limits] max_connections_per_peer, and all
together in max_connections.  Clients under other uids are real child
processes (root drops to them), the remote udpd a real one.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from ipcd.daemons.udp.client import OUTBOUND
from ipcd.daemons.udp.session import SessionStats
from ipcd.test.support import TIMEOUT, as_user, lookup, needs_root, wait_until
from ipcd.test.test_udp import B_RULES, OK
from ipcd.test.udpsupport import start_udp_host
from ipcd.wire import encode

# A child under a uid that opens COUNT sessions (lookups whose sockets it
# keeps), says how many it got, and holds them until its stdin closes.
_HOLD_SESSIONS = """
import json, os, socket, struct, sys
path, uid, count, payload = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
held = []
for _ in range(count):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    s.sendall(struct.pack("!I", len(payload)) + payload.encode())
    data, fds, _, _ = socket.recv_fds(s, 4096, 1)
    s.close()
    held += fds
print(json.dumps(len(held)), flush=True)
sys.stdin.read()
"""


class OutboundSessionLimitTests(TestCase):
    @inlineCallbacks
    def setUp(self) -> Any:
        self.b = yield start_udp_host(self, rules=B_RULES)
        self.route = f"pong;pong udp://127.0.0.1:{self.b.port}/pong"

    @inlineCallbacks
    def test_perClientUid(self) -> Any:
        """
        A uid holding its maximum of sessions gets its next refused, with
        the reason; another uid is served meanwhile; once the first lets
        go, it is served again.  (Unbounded before: 300 sessions of one
        client held 600 descriptors in ipcd.)
        """
        needs_root()
        a = yield start_udp_host(
            self, pongd=False, config={"limits": {"max_connections_per_peer": 3}}
        )
        os.chmod(a.rundir, 0o755)
        ipc = os.path.join(a.rundir, "ipc")
        os.chmod(ipc, 0o666)
        limits = a.broker.limits_for(OUTBOUND)
        holder = subprocess.Popen(
            [sys.executable, "-c", _HOLD_SESSIONS, ipc, "61002", "3", self.route],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )

        def stop() -> None:
            if holder.poll() is None:
                holder.kill()
            holder.wait(TIMEOUT)
            holder.stdin.close()
            holder.stdout.close()

        self.addCleanup(stop)
        got = yield deferToThread(holder.stdout.readline)
        self.assertEqual(json.loads(got), 3)
        self.assertEqual(limits.per_peer["uid:61002"], 3)
        answer = yield as_user(ipc, 61002, 61002, (), self.route)
        self.assertEqual(
            answer,
            {"reply": "ne too many connections from uid:61002 (at most 3)", "fds": 0},
        )
        answer = yield as_user(ipc, 61001, 61001, (), self.route)
        self.assertEqual(answer["reply"], "ok")
        holder.stdin.close()  # its sessions' ends close with it
        holder.wait(TIMEOUT)
        yield wait_until(lambda: not limits.per_peer["uid:61002"], "its sessions end")
        answer = yield as_user(ipc, 61002, 61002, (), self.route)
        self.assertEqual(answer["reply"], "ok")
        yield wait_until(lambda: limits.total == 0, "every session counted out")

    @inlineCallbacks
    def test_allTogether(self) -> Any:
        """
        ipcd's own uid (exempt from the per-peer maximum, as everywhere)
        is still held to max_connections: past it, refused; a session that
        ends gives its place back, and a dial that fails takes none.
        """
        a = yield start_udp_host(
            self, pongd=False, config={"limits": {"max_connections": 2}}
        )
        held = []
        for _ in range(2):
            reply = yield deferToThread(lookup, a.rundir, self.route.encode())
            self.assertEqual(reply.data, OK)
            held.append(reply.take_socket(self))
        reply = yield deferToThread(lookup, a.rundir, self.route.encode())
        self.assertEqual(reply.data, b"ne too many udp sessions (at most 2)")
        held.pop().close()
        limits = a.broker.limits_for(OUTBOUND)
        yield wait_until(lambda: limits.total == 1, "the closed session counted out")
        nobody = f"pong;pong udp://127.0.0.1:{self.b.port}/nosuch"
        reply = yield deferToThread(lookup, a.rundir, nobody.encode())
        self.assertTrue(reply.data.startswith(b"ne udpd at"), reply.data)
        self.assertEqual(limits.total, 1)
        reply = yield deferToThread(lookup, a.rundir, self.route.encode())
        self.assertEqual(reply.data, OK)
        reply.take_socket(self)

    @inlineCallbacks
    def test_heldStreamStillCounted(self) -> Any:
        """
        A session that ends while its stream in ipcd still holds what the
        client has not read (up to the stream's grace) counts until that
        stream closes, as an inbound one does: counted out at the session's
        end, a client not reading could end and open sessions faster than
        their streams close, ipcd holding a descriptor for each.
        """
        a = yield start_udp_host(self, pongd=False)
        limits = a.broker.limits_for(OUTBOUND)
        reply = yield deferToThread(lookup, a.rundir, self.route.encode())
        self.assertEqual(reply.data, OK)
        sock = reply.take_socket(self)
        [stats] = [s for s in a.broker.relays if isinstance(s, SessionStats)]
        session = stats.end.__self__
        message = encode(b"x" * 4000)

        stop = threading.Event()

        def write() -> None:  # pong's echoes, never read, fill the stream
            while not stop.is_set():
                sock.sendall(message)

        writing = deferToThread(write)
        try:
            yield wait_until(lambda: session.stream.congested, "the stream full")
        finally:
            stop.set()
            yield writing
        sock.sendall(struct.pack("!I", 70000))  # too large: the session ends
        yield wait_until(lambda: session.done, "the session's end")
        self.assertTrue(session.stream.held)  # (what this test is about)
        self.assertEqual(limits.total, 1)
        sock.close()  # the stream's write fails: it closes
        yield wait_until(lambda: limits.total == 0, "the stream counted out")
        self.assertEqual(limits.per_peer, {})
        # (B's stream to pongd, as full, closes within its grace too.)
        yield wait_until(lambda: self.b.server.held == 0, "B's streams closed")
