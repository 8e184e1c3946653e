"""
Hostile WebSocket peers against a real ipcd in a child process: ping
floods that never read, endless fragments, endless request headers.  Its
resident memory is read from /proc; nothing here is timed: a flood lasts
a while, and bounds are on bytes (memory, bytes the peer could send before
ipcd refused it).  What RSS does after the attackers close is logged.
"""

from __future__ import annotations

import itertools
import select
import time
from collections.abc import Iterator
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.python import log
from twisted.trial.unittest import TestCase

from ipcd.daemons.websocket.limits import DEFAULT_MAX_MESSAGE_FRAMES, MAX_HEAD
from ipcd.limits import LOG_BURST, LOG_PERIOD
from ipcd.test.support import TIMEOUT, read_text
from ipcd.test.wssupport import (
    CLOSE,
    PING,
    TEXT,
    ChildIpcd,
    close_code,
    connect_tcp,
    flood_until_answer,
    spawn_ws_ipcd,
    ws_frame,
    ws_message,
    ws_open,
    ws_recv,
    ws_send,
)

KiB = 1024
MiB = 1024 * KiB
# What one peer that pings and never reads may make ipcd grow by, its
# connection included (docs/securing.rst says so too).
PEER_BOUND = 256 * KiB
# How long each ping flood goes on (the peer never reads meanwhile).
ATTACK = 6.0  # a peer that was read on grew ipcd by 68 MiB in 5 s
# The attackers' socket buffers: fixed, so that what the kernel holds for
# them stays small and what ipcd read shows in what they could send.
BUFFERS = 16 * KiB


def _initial_receive_window() -> int:
    """tcp_rmem's default: ipcd's receive buffer while it does not read."""
    with open("/proc/sys/net/ipv4/tcp_rmem") as f:
        return int(f.read().split()[1])


# A peer that sends what it sends and reads nothing can have at most this
# sent when ipcd refuses it after reading C{read} bytes: one more read of
# ipcd's (64 KiB), the two kernel buffers between, and slack.
def _sent_bound(read: int) -> int:
    return read + 64 * KiB + 4 * BUFFERS + 2 * _initial_receive_window() + MiB


def _pings(empty: bool) -> Iterator[bytes]:
    """An endless stream of pings (empty, or of 125 bytes), in batches."""
    batch = ws_frame(b"" if empty else b"p" * 125, PING) * 256
    return itertools.repeat(batch)


def _ping_flood(ipcd: ChildIpcd, peers: int) -> dict[str, Any]:
    """
    C{peers} peers (from 127.0.0.1 to 127.0.0.4, within the per-peer
    limit) open /pong, then ping for L{ATTACK} seconds, half with empty
    pings, half with 125-byte ones, reading nothing.  ipcd's RSS before,
    at its peak, and after they closed.
    """
    before = ipcd.status("VmRSS")
    peak_known = ipcd.reset_peak()
    socks = []
    try:
        for i in range(peers):
            opening = ws_open(
                ipcd.port, "/pong", source=f"127.0.0.{1 + i % 4}", buffers=BUFFERS
            )
            socks.append(opening.sock)
            assert opening.status == 101, (opening.status, opening.reason)
        streams = {sock: _pings(i % 2 == 0) for i, sock in enumerate(socks)}
        pending = {sock: b"" for sock in socks}
        for sock in socks:
            sock.setblocking(False)
        sent, peak = 0, before
        deadline = time.monotonic() + ATTACK
        while time.monotonic() < deadline:
            _, writable, _ = select.select([], socks, [], 0.5)
            for sock in writable:
                data = pending[sock] or next(streams[sock])
                try:
                    count = sock.send(data)
                except BlockingIOError:
                    count = 0
                sent += count
                pending[sock] = data[count:]
            if not peak_known:
                peak = max(peak, ipcd.status("VmRSS"))
        peak = ipcd.status("VmHWM") if peak_known else peak
    finally:
        for sock in socks:
            sock.close()
    return {"before": before, "peak": peak, "sent": sent}


def _rss_after_close(ipcd: ChildIpcd, what: str, before: int) -> None:
    """Log ipcd's RSS once the attackers are gone (for the record)."""
    time.sleep(2)  # not asserted on: only what the log shows
    after = ipcd.status("VmRSS")
    log.msg(f"{what}: RSS {(after - before) / KiB:+.0f} KiB after the peers closed")


def _echo(port: int, timeout: float = TIMEOUT) -> tuple[int, bytes]:
    opening = ws_open(port, "/pong", timeout=timeout)
    with opening.sock as sock:
        assert opening.status == 101, (opening.status, opening.reason)
        ws_send(sock, b"still here", TEXT)
        return ws_message(sock)


def _warm_up(ipcd: ChildIpcd) -> None:
    """One ordinary connection first: what any first one allocates is baseline."""
    assert _echo(ipcd.port) == (TEXT, b"still here")


class PingFloodTests(TestCase):
    """Peers that ping and never read: ipcd stops reading them."""

    timeout = 240

    @inlineCallbacks
    def test_onePeer(self) -> Any:
        """
        One peer pinging for ATTACK (6) s and reading nothing grows ipcd by less
        than PEER_BOUND, and ipcd serves others meanwhile and after.
        (Before: +68 MiB in 5 s.)
        """
        ipcd = spawn_ws_ipcd(self)
        yield deferToThread(_warm_up, ipcd)
        result = yield deferToThread(_ping_flood, ipcd, 1)
        log.msg(f"one ping flood: {result}")
        growth = result["peak"] - result["before"]
        self.assertLess(growth, PEER_BOUND, result)
        reply = yield deferToThread(_echo, ipcd.port)
        self.assertEqual(reply, (TEXT, b"still here"))
        yield deferToThread(_rss_after_close, ipcd, "one ping flood", result["before"])
        self.assertIsNone(ipcd.process.poll())

    @inlineCallbacks
    def test_manyPeers(self) -> Any:
        """
        256 such peers at once (websocketd's max_connections) grow ipcd
        by less than 256 times PEER_BOUND.
        """
        ipcd = spawn_ws_ipcd(self)
        yield deferToThread(_warm_up, ipcd)
        result = yield deferToThread(_ping_flood, ipcd, 256)
        growth = result["peak"] - result["before"]
        self.assertLess(growth, 256 * PEER_BOUND, result)
        log.msg(f"256 ping floods: peak RSS {growth / KiB:+.0f} KiB, {result}")
        # ipcd first parses what the 256 left in its receive buffers (a read
        # or two each: seconds of CPU on a loaded machine), then answers.
        reply = yield deferToThread(_echo, ipcd.port, 6 * TIMEOUT)
        self.assertEqual(reply, (TEXT, b"still here"))
        yield deferToThread(_rss_after_close, ipcd, "256 ping floods", result["before"])


def _fragments(payload: bytes, count: int) -> Iterator[bytes]:
    """A text message of C{count} frames of C{payload}, never ended."""
    yield ws_frame(payload, TEXT, fin=False)
    batch = 1000
    frame = ws_frame(payload, 0, fin=False)  # the mask may repeat: still valid
    for _ in range((count - 1) // batch):
        yield frame * batch


def _fragment_flood(ipcd: ChildIpcd, payload: bytes) -> dict[str, Any]:
    """1,000,000 fragments of C{payload}: what went before ipcd answered, and how."""
    before = ipcd.status("VmRSS")
    peak_known = ipcd.reset_peak()
    count = 1_000_000
    opening = ws_open(ipcd.port, "/pong", buffers=BUFFERS)
    with opening.sock as sock:
        assert opening.status == 101, (opening.status, opening.reason)
        total = count * len(ws_frame(payload, 0))
        sent = flood_until_answer(sock, _fragments(payload, count), total)
        opcode, reason = ws_recv(sock)
        peak = ipcd.status("VmHWM" if peak_known else "VmRSS")
    return {
        "sent": sent,
        "total": total,
        "answer": (opcode, close_code(reason)),
        "reason": reason[2:],
        "growth": peak - before,
    }


class FragmentTests(TestCase):
    """Messages that never end are refused early, by their frames."""

    timeout = 120

    @inlineCallbacks
    def check(self, payload: bytes) -> Any:
        ipcd = spawn_ws_ipcd(self)
        yield deferToThread(_warm_up, ipcd)
        result = yield deferToThread(_fragment_flood, ipcd, payload)
        log.msg(f"{len(payload)}-byte fragments: {result}")
        self.assertEqual(result["answer"], (CLOSE, 1009), result)
        frame = len(ws_frame(payload, 0))
        read = (DEFAULT_MAX_MESSAGE_FRAMES + 1) * frame
        self.assertLess(result["sent"], _sent_bound(read), result)
        self.assertLess(result["sent"], result["total"] // 2, result)
        self.assertLess(result["growth"], PEER_BOUND, result)
        reply = yield deferToThread(_echo, ipcd.port)
        self.assertEqual(reply, (TEXT, b"still here"))

    def test_oneByteFragments(self) -> Any:
        """
        1,000,000 one-byte fragments: closed with 1009 after 1024 frames,
        ipcd having read a few KiB of them.  (Before: +48 MiB, 9.6 s CPU.)
        """
        return self.check(b"a")

    def test_emptyContinuations(self) -> Any:
        """
        1,000,000 empty continuation frames count as frames too: closed with
        1009.  (Before: never refused.)
        """
        return self.check(b"")


def _head_flood(ipcd: ChildIpcd) -> dict[str, Any]:
    """An opening handshake with 20 MiB of headers; what came back."""
    before = ipcd.status("VmRSS")
    peak_known = ipcd.reset_peak()
    total = 20 * MiB
    line = b"X-Padding: " + b"a" * 1000 + b"\r\n"
    lines = itertools.repeat(line * 64, total // (len(line) * 64))
    start = [b"GET /pong HTTP/1.1\r\nHost: 127.0.0.1\r\n"]
    with connect_tcp("127.0.0.1", ipcd.port, buffers=BUFFERS) as sock:
        sent = flood_until_answer(sock, itertools.chain(start, lines), total)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass  # closed with our bytes unread: as good as an EOF here
        peak = ipcd.status("VmHWM" if peak_known else "VmRSS")
    return {"sent": sent, "answer": answer, "growth": peak - before}


class HeadTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def test_20MiBOfHeaders(self) -> Any:
        """
        20 MiB of request headers get HTTP 431 once 16 KiB have come
        without their end, and the connection is closed; ipcd serves on.
        (Before: read for 5 s, quadratic CPU, +3.7 MiB a connection.)
        """
        ipcd = spawn_ws_ipcd(self)
        yield deferToThread(_warm_up, ipcd)
        result = yield deferToThread(_head_flood, ipcd)
        log.msg(f"20 MiB of headers: sent {result['sent']}, RSS +{result['growth']}")
        status = result["answer"].split(b"\r\n", 1)[0]
        self.assertEqual(status, b"HTTP/1.1 431 Request Header Fields Too Large")
        self.assertLess(result["sent"], _sent_bound(MAX_HEAD), result["sent"])
        self.assertLess(result["growth"], PEER_BOUND, result["growth"])
        reply = yield deferToThread(_echo, ipcd.port)
        self.assertEqual(reply, (TEXT, b"still here"))
        self.assertIsNone(ipcd.process.poll())

    @inlineCallbacks
    def test_refusalsLoggedAtABoundedRate(self) -> Any:
        """
        200 handshakes refused (431) write at most 5 of autobahn's lines
        per 10 s, and one saying how many were left out (before: 400).
        """
        ipcd = spawn_ws_ipcd(self)
        head = b"GET /pong HTTP/1.1\r\nX-Padding: " + b"p" * MAX_HEAD

        def refused() -> float:
            started = time.monotonic()
            for _ in range(200):
                with connect_tcp("127.0.0.1", ipcd.port) as sock:
                    sock.sendall(head)
                    status = b""
                    while len(status) < 12 and (chunk := sock.recv(12 - len(status))):
                        status += chunk
                    assert status == b"HTTP/1.1 431", status
            return time.monotonic() - started

        took = yield deferToThread(refused)
        reply = yield deferToThread(_echo, ipcd.port)  # logged after the others
        self.assertEqual(reply, (TEXT, b"still here"))
        autobahns = ("opening handshake", "dropping connection", "left out")
        lines = [
            line
            for line in read_text(ipcd.log).splitlines()
            if any(words in line for words in autobahns)
        ]
        windows = int(took // LOG_PERIOD) + 2  # windows the refusals spanned
        self.assertLessEqual(len(lines), (LOG_BURST + 1) * windows, "\n".join(lines))
        self.assertGreater(len(lines), 0)
