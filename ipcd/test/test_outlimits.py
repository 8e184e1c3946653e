"""
A local client's outbound udp:// sessions, ws:// (wss://) and tls://
relays are bounded: each holds a socket and a stream (a socketpair's end)
in ipcd for as long as the client holds its end, so they count, per
client uid, in [limits] max_connections_per_peer, and all together in
max_connections.  Clients under other uids are real child processes (root
drops to them), the far daemons real ones.  (tcp:// hands the client the
TCP socket itself: ipcd holds nothing for it.)
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
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ipcd.config import Config
from ipcd.daemons.tls.daemon import OUTBOUND as TLS_OUTBOUND
from ipcd.daemons.udp.client import OUTBOUND as UDP_OUTBOUND
from ipcd.daemons.udp.session import SessionStats
from ipcd.daemons.websocket.daemon import OUTBOUND as WS_OUTBOUND
from ipcd.identity import Peer
from ipcd.outlimits import client_key
from ipcd.test.support import (
    TIMEOUT,
    as_user,
    bounce,
    lookup,
    needs_root,
    short_rundir,
    wait_until,
)
from ipcd.test.test_udp import B_RULES
from ipcd.test.tlssupport import ALICE_KEY, secrets_file, start_tls_host
from ipcd.test.udpsupport import start_udp_host
from ipcd.test.wssupport import start_ws_host
from ipcd.wire import encode

OK = b"ok"

# A child under a uid that opens COUNT relays (lookups whose sockets it
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


class OutboundLimitsMixin:
    """The tests, for one kind of relay: C{start_far}, C{start_near}."""

    kind: str  # its connection limits' name
    what: str  # how the refusal names them

    def start_far(self) -> Any:
        """The far daemon, serving pong: C{scheme://127.0.0.1:PORT}."""
        raise NotImplementedError

    def start_near(self, limits: dict[str, int]) -> Any:
        """The client's ipcd, with these C{[limits]}."""
        raise NotImplementedError

    @inlineCallbacks
    def test_perClientUid(self) -> Any:
        """
        A uid holding its maximum of relays gets its next refused, with the
        reason; another uid is served meanwhile; once the first lets go,
        it is served again.  (Unbounded before.)
        """
        needs_root()
        far = yield self.start_far()
        route = f"pong;pong {far}/pong"
        a = yield self.start_near({"max_connections_per_peer": 3})
        os.chmod(a.rundir, 0o755)
        ipc = os.path.join(a.rundir, "ipc")
        os.chmod(ipc, 0o666)
        limits = a.broker.limits_for(self.kind)
        holder = subprocess.Popen(
            [sys.executable, "-c", _HOLD_SESSIONS, ipc, "61002", "3", route],
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
        answer = yield as_user(ipc, 61002, 61002, (), route)
        self.assertEqual(
            answer,
            {"reply": "ne too many connections from uid:61002 (at most 3)", "fds": 0},
        )
        answer = yield as_user(ipc, 61001, 61001, (), route)
        self.assertEqual(answer["reply"], "ok")
        holder.stdin.close()  # its relays' ends close with it
        holder.wait(TIMEOUT)
        yield wait_until(lambda: not limits.per_peer["uid:61002"], "its relays end")
        answer = yield as_user(ipc, 61002, 61002, (), route)
        self.assertEqual(answer["reply"], "ok")
        yield wait_until(lambda: limits.total == 0, "every relay counted out")

    @inlineCallbacks
    def test_allTogether(self) -> Any:
        """
        ipcd's own uid (exempt from the per-peer maximum, as everywhere)
        is still held to max_connections: past it, refused; a relay that
        ends gives its place back, and a dial that fails takes none.
        """
        far = yield self.start_far()
        route = f"pong;pong {far}/pong".encode()
        a = yield self.start_near({"max_connections": 2})
        held = []
        for _ in range(2):
            reply = yield deferToThread(lookup, a.rundir, route)
            self.assertEqual(reply.data, OK)
            held.append(reply.take_socket(self))
        reply = yield deferToThread(lookup, a.rundir, route)
        self.assertEqual(reply.data, f"ne too many {self.what} (at most 2)".encode())
        limits = a.broker.limits_for(self.kind)
        # Counted where 'ipcd status' shows the limits hit.
        self.assertEqual(a.broker.counters[f"{self.kind}: refused, at the maximum"], 1)
        held.pop().close()
        yield wait_until(lambda: limits.total == 1, "the closed relay counted out")
        nobody = f"pong;pong {far}/nosuch".encode()
        reply = yield deferToThread(lookup, a.rundir, nobody)
        self.assertTrue(reply.data.endswith(b"no such service"), reply.data)
        self.assertEqual(limits.total, 1)
        reply = yield deferToThread(lookup, a.rundir, route)
        self.assertEqual(reply.data, OK)
        echo = yield deferToThread(bounce, reply.take_socket(self), b"still")
        self.assertEqual(echo, encode(b"still"))


class ClientKeyTests(SynchronousTestCase):
    """What a client's relays are counted under (pure: L{client_key})."""

    def test_keys(self) -> None:
        """
        A local client: its uid; a remote one (through an inbound daemon):
        its address's prefix, as [limits] peer_prefix_ipv4 and _ipv6 say;
        neither: one key for all of them.
        """
        config = Config(rundir="/r", peer_prefix_ipv4=24, peer_prefix_ipv6=48)
        for peer, key in (
            (Peer("local", uid=61002, address=("192.0.2.7", 5, "tcp")), "uid:61002"),
            (Peer("v4", address=("192.0.2.7", 4000, "tcp")), "ip:192.0.2.0/24"),
            (
                Peer("v6", address=("2001:db8:1:2::9", 4000, "udp")),
                "ip:2001:db8:1::/48",
            ),
            (Peer("neither"), "unknown"),
        ):
            self.assertEqual(client_key(peer, config), key, peer)


class UdpSessionLimitTests(OutboundLimitsMixin, TestCase):
    kind, what = UDP_OUTBOUND, "udp sessions"

    @inlineCallbacks
    def start_far(self) -> Any:
        b = yield start_udp_host(self, rules=[*B_RULES, "allow in nosuch"])
        return f"udp://127.0.0.1:{b.port}"

    def start_near(self, limits: dict[str, int]) -> Any:
        return start_udp_host(self, pongd=False, config={"limits": limits})

    @inlineCallbacks
    def test_heldStreamStillCounted(self) -> Any:
        """
        A session that ends while its stream in ipcd still holds what the
        client has not read (up to the stream's grace) counts until that
        stream closes, as an inbound one does: counted out at the session's
        end, a client not reading could end and open sessions faster than
        their streams close, ipcd holding a descriptor for each.
        """
        b = yield start_udp_host(self, rules=B_RULES)
        route = f"pong;pong udp://127.0.0.1:{b.port}/pong"
        a = yield start_udp_host(self, pongd=False)
        limits = a.broker.limits_for(UDP_OUTBOUND)
        reply = yield deferToThread(lookup, a.rundir, route.encode())
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
        yield wait_until(lambda: b.server.held == 0, "B's streams closed")


class WebSocketRelayLimitTests(OutboundLimitsMixin, TestCase):
    kind, what = WS_OUTBOUND, "websocket relays"

    @inlineCallbacks
    def start_far(self) -> Any:
        b = yield start_ws_host(self, rules=["allow in pong", "allow in nosuch"])
        return f"ws://127.0.0.1:{b.port}"

    def start_near(self, limits: dict[str, int]) -> Any:
        return start_ws_host(self, pongd=False, rules=(), limits=limits)


class TlsRelayLimitTests(OutboundLimitsMixin, TestCase):
    kind, what = TLS_OUTBOUND, "tls relays"

    def keys(self) -> str:
        return secrets_file(short_rundir(self, "ipcd-tls-keys-"), {"alice": ALICE_KEY})

    @inlineCallbacks
    def start_far(self) -> Any:
        rules = ["allow in pong psk:alice", "allow in nosuch psk:alice"]
        b = yield start_tls_host(self, {"psk_file": self.keys()}, rules=rules)
        return f"tls://127.0.0.1:{b.port}"

    def start_near(self, limits: dict[str, int]) -> Any:
        tlsd = {"psk_file": self.keys(), "psk_identity": "alice"}
        return start_tls_host(self, tlsd, pongd=False, limits=limits)
