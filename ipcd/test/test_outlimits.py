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
import socket
import struct
import subprocess
import sys
import threading
from typing import Any

from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from ipcd.daemons.tls.daemon import OUTBOUND as TLS_OUTBOUND
from ipcd.daemons.udp.client import OUTBOUND as UDP_OUTBOUND
from ipcd.daemons.udp.session import SessionStats
from ipcd.daemons.websocket.daemon import OUTBOUND as WS_OUTBOUND
from ipcd.test.support import (
    TIMEOUT,
    as_user,
    bounce,
    connect_unix,
    lookup,
    needs_root,
    read_reply,
    short_rundir,
    take_descriptors,
    tcp_connecting,
    wait_until,
)
from ipcd.test.test_udp import B_RULES
from ipcd.test.tlssupport import ALICE_KEY, TestCA, secrets_file, start_tls_host
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
        held.pop().close()
        limits = a.broker.limits_for(self.kind)
        yield wait_until(lambda: limits.total == 1, "the closed relay counted out")
        nobody = f"pong;pong {far}/nosuch".encode()
        reply = yield deferToThread(lookup, a.rundir, nobody)
        self.assertTrue(reply.data.endswith(b"no such service"), reply.data)
        self.assertEqual(limits.total, 1)
        reply = yield deferToThread(lookup, a.rundir, route)
        self.assertEqual(reply.data, OK)
        echo = yield deferToThread(bounce, reply.take_socket(self), b"still")
        self.assertEqual(echo, encode(b"still"))


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

    @inlineCallbacks
    def test_noDescriptorForTheBridge(self) -> Any:
        """
        ipcd out of descriptors for the bridge's socketpair (EMFILE, for
        real: RLIMIT_NOFILE, every slot but the lookup's taken): the lookup
        is refused and the place it took is given back.  It was kept for
        good (only a Refused from the dial gave it back), one more each
        time, until every ws:// lookup was refused as too many.
        """
        far = yield self.start_far()
        route = f"pong;pong {far}/pong".encode()
        a = yield self.start_near({})
        limits = a.broker.limits_for(self.kind)
        reply = yield deferToThread(lookup, a.rundir, route)  # (labels cached)
        self.assertEqual(reply.data, OK)
        reply.take_socket(self).close()
        yield wait_until(lambda: limits.total == 0, "that relay counted out")
        # Connected (in ipcd's backlog) before the descriptors run out:
        # accepting it takes the one slot left.
        sock = connect_unix(os.path.join(a.rundir, "ipc"))
        self.addCleanup(sock.close)
        held = take_descriptors(self, 1)
        sock.sendall(encode(route))
        reply = yield deferToThread(read_reply, sock)
        for fd in held:
            os.close(fd)
        held.clear()
        self.assertEqual(reply.fds, [])
        self.assertEqual((limits.total, dict(limits.per_peer)), (0, {}))
        # A refusal that says why (it was an unexpected error, a traceback).
        why = "cannot relay to the service: Too many open files"
        self.assertEqual(reply.data, f"ne websocketd at {far}/pong: {why}".encode())


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

    @inlineCallbacks
    def test_givenUpWhileConnecting(self) -> Any:
        """
        A tls:// lookup given up while its TCP connect is under way (the
        client goes; the broker's deadline is the same): the connect ends
        with it.  It went on (Twisted's own deadline is 30 s), no longer
        counted, and the connection it made was left open (a TLS
        handshake nobody waited for): a client that went at once could
        have ipcd hold any number of them.
        """
        port = _unanswered_port(self)
        a = yield self.start_near({})
        limits = a.broker.limits_for(self.kind)
        sock = connect_unix(os.path.join(a.rundir, "ipc"))
        self.addCleanup(sock.close)
        sock.sendall(encode(f"pong;pong tls://127.0.0.1:{port}/pong".encode()))
        yield wait_until(lambda: tcp_connecting(port), "ipcd connecting")
        self.assertEqual(limits.total, 1)
        sock.close()
        yield wait_until(lambda: limits.total == 0, "the lookup given up")
        # Ended as it was given up (else by Twisted's deadline, 30 s on).
        self.assertEqual(tcp_connecting(port), 0)

    @inlineCallbacks
    def answered_without_descriptors(self, free: int) -> Any:
        """
        A tls:// lookup whose far side says ok when ipcd has C{free}
        descriptors left (EMFILE past them, for real); fires with the reply,
        the far side's connection and the limits, once the descriptors are
        back.
        """
        far = _AnsweringLater()
        ca = TestCA(short_rundir(self, "ipcd-ca-"))
        issued = ca.issue("far")
        with open(issued.cert) as cert, open(issued.key) as key:
            pem = cert.read() + key.read()
        options = ssl.PrivateCertificate.loadPEM(pem).options()
        port = reactor.listenSSL(0, far, options, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        a = yield start_tls_host(self, {"trust_roots": ca.path}, pongd=False)
        limits = a.broker.limits_for(self.kind)
        self.where = f"localhost:{port.getHost().port}"
        sock = connect_unix(os.path.join(a.rundir, "ipc"))
        self.addCleanup(sock.close)
        sock.sendall(encode(f"pong;pong tls://{self.where}/pong".encode()))
        asked = yield far.asked
        self.assertEqual(limits.total, 1)
        held = take_descriptors(self, free)
        asked.transport.write(b"ok")
        reply = yield deferToThread(read_reply, sock)
        for fd in held:
            os.close(fd)
        held.clear()
        return reply, asked, limits

    @inlineCallbacks
    def test_noDescriptorForTheSocketpair(self) -> Any:
        """
        The far side says ok when ipcd has one descriptor left, none for
        the relay's socketpair: the lookup is refused, its place given
        back, and the TLS connection closed.  It was left open (uncounted)
        until the far side closed it.
        """
        reply, asked, limits = yield self.answered_without_descriptors(1)
        self.assertEqual(reply.fds, [])
        yield wait_until(lambda: asked.lost, "the TLS connection closed")
        self.assertEqual((limits.total, dict(limits.per_peer)), (0, {}))
        why = "cannot relay to the service: Too many open files"
        self.assertEqual(reply.data, f"ne tlsd at {self.where}: {why}".encode())

    @inlineCallbacks
    def test_noDescriptorForTheRelayEngine(self) -> Any:
        """
        Two left: the socketpair is made, and the relay engine's first
        join finds none for its epoll.  The relay is refused as a stopped
        engine's are: the client's end sees EOF, the TLS connection is
        closed, the place given back.  The join raised, and left the relay
        listed and counted for good, both connections open.
        """
        reply, asked, limits = yield self.answered_without_descriptors(2)
        self.assertEqual(reply.data, OK)
        sock = reply.take_socket(self)
        eof = yield deferToThread(sock.recv, 1)
        self.assertEqual(eof, b"")
        yield wait_until(lambda: asked.lost, "the TLS connection closed")
        self.assertEqual((limits.total, dict(limits.per_peer)), (0, {}))


def _unanswered_port(case: TestCase) -> int:
    """
    A port on 127.0.0.1 whose listener never accepts, its queue full with
    one connection of the test's: the kernel answers no more SYNs, and a
    connect to it stays under way.
    """
    listener = socket.socket()
    case.addCleanup(listener.close)
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    first = socket.create_connection(("127.0.0.1", port), TIMEOUT)
    case.addCleanup(first.close)
    return port


class _Asked(Protocol):
    """A far tlsd's connection: its request, answered when the test says."""

    lost = False

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        if not self.factory.asked.called:
            self.factory.asked.callback(self)

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        self.lost = True


class _AnsweringLater(Factory):
    """A far tlsd that answers its one request when the test says."""

    protocol = _Asked

    def __init__(self) -> None:
        self.asked: Deferred[_Asked] = Deferred()
