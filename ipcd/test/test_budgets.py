"""
Bounded resources under hostile load, on real sockets with ipcd in this
process: backpressure in pongd, the shared partial-message budget, idle
deadlines on service connections and the control socket's deadline.

Nothing here is timed: bounds are on bytes (resident memory read from
/proc/self/status, bytes accepted, the budget's own accounting) and on
counts; every wait is bounded.
"""

from __future__ import annotations

import os
import select
import socket
import time
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from ipcd.test.support import (
    TIMEOUT,
    assert_no_fd_leak,
    bounce,
    connect_unix,
    fd_baseline,
    logged_lines,
    lookup,
    make_config,
    set_network,
    short_rundir,
    start_ipcd,
    wait_until,
)
from ipcd.wire import HEADER, PIECE_OVERHEAD, encode

MiB = 1024 * 1024
# ipcd's resident memory may grow by at most this while a client floods
# pongd without reading (docs/api.rst says so too).
RSS_BOUND = 32 * MiB
FLOOD = 200 * MiB
# A send that makes no progress for this long means ipcd stopped reading.
# Not a timed assertion: a slow ipcd only makes the client stop earlier.
STALL = 1.0


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), if allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def flood_then_read_back(path: str, message: bytes) -> dict[str, Any]:
    """
    Send C{message} to pongd again and again, reading nothing, until a send
    stalls (or C{FLOOD} bytes went); note ipcd's memory then; then finish
    the message in flight and read every echoed byte back, checking each.
    """
    rss_before = _status("VmRSS")
    peak = _reset_peak()
    sock = connect_unix(path)
    try:
        sock.settimeout(STALL)
        view = memoryview(message)
        sent = 0
        stalled = False
        while sent < FLOOD:
            try:
                sent += sock.send(view[sent % len(message) :])
            except TimeoutError:
                stalled = True
                break
        rss_after = _status("VmHWM" if peak else "VmRSS")
        # Finish the message in flight while reading everything back.
        total = sent + (-sent % len(message))
        sock.setblocking(False)
        received = 0
        while received < total:
            want_write = [sock] if sent < total else []
            readable, writable, _ = select.select([sock], want_write, [], TIMEOUT)
            if not readable and not writable:
                raise AssertionError(f"stalled at {received} of {total} bytes")
            if writable:
                sent += sock.send(view[sent % len(message) : total - sent + 1])
            if readable:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    raise AssertionError(f"EOF after {received} of {total} bytes")
                _check_echo(chunk, received, message)
                received += len(chunk)
    finally:
        sock.close()
    return {
        "stalled": stalled,
        "sent": sent,
        "received": received,
        "growth": rss_after - rss_before,
    }


def _check_echo(chunk: bytes, offset: int, message: bytes) -> None:
    """C{chunk}, at C{offset} of a stream of C{message}s, is what was sent."""
    size = len(message)
    doubled = message + message
    for start in range(0, len(chunk), size):
        piece = chunk[start : start + size]
        at = (offset + start) % size
        if piece != doubled[at : at + len(piece)]:
            raise AssertionError(f"echo differs near byte {offset + start}")


class BackpressureTests(TestCase):
    @inlineCallbacks
    def test_pongdNonReadingClient(self) -> Any:
        """
        A client that sends to pongd and reads nothing: ipcd stops reading
        once its write buffer is full, so the client's send stalls long
        before 200 MB, ipcd's memory grows by less than 32 MiB, and then
        every byte comes back.  (Before: ipcd read all 200 MB, RSS +500 MB.)
        """
        set_network(self, None)
        rundir = short_rundir(self)
        yield start_ipcd(self, make_config(rundir))
        before = yield fd_baseline()
        message = encode(bytes(range(256)) * 256)  # 64 KiB
        result = yield deferToThread(
            flood_then_read_back, os.path.join(rundir, "pong"), message
        )
        self.assertTrue(result["stalled"], f"ipcd read everything: {result}")
        # Kernel buffers both ways and ipcd's 64 KiB write buffer: far less.
        self.assertLess(result["sent"], 16 * MiB, result)
        self.assertLess(result["growth"], RSS_BOUND, result)
        self.assertEqual(result["received"], result["sent"])
        self.assertEqual(result["sent"] % len(message), 0)
        yield assert_no_fd_leak(before)


def connect_patiently(path: str) -> socket.socket:
    """
    Connect, retrying (bounded) while the listener's backlog is full: a UNIX
    socket with a timeout answers EAGAIN then instead of waiting.
    """
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            return connect_unix(path)
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def hold_partials(paths: list[str], announced: int, partial: bytes) -> list[Any]:
    """
    On each path, connect and send a header announcing C{announced}, then
    C{partial}: a partial message held open.
    """
    socks = []
    try:
        for path in paths:
            sock = connect_patiently(path)
            socks.append(sock)
            sock.sendall(HEADER.pack(announced) + partial)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether ipcd closed C{sock} (never blocks)."""
    poller = select.poll()  # not select(): fds past 1024 are fine
    poller.register(sock, select.POLLIN)
    if not poller.poll(0):
        return False
    try:
        data = sock.recv(4096, socket.MSG_PEEK)
    except ConnectionResetError:
        return True
    return not data  # a lookup has no answer for a partial message


class PartialMessageBudgetTests(TestCase):
    @inlineCallbacks
    def test_manyPartialMessages(self) -> Any:
        """
        1,000 connections (900 lookups, 100 to pongd) each hold 64 KiB of a
        1 MiB message, with a budget of 4 MiB: the bytes held never pass
        it, the connections over it are closed and counted, the others are
        untouched, ipcd still answers a lookup, and nothing leaks.
        """
        set_network(self, None)
        rundir = short_rundir(self)
        budget_size = 4 * MiB
        config = make_config(
            rundir,
            ipcd={"lookup_timeout": 60},
            limits={
                "partial_message_budget": budget_size,
                "max_connections_per_peer": 1024,
            },
        )
        service = yield start_ipcd(self, config)
        budget = service.partial_budget
        counters = service.broker.counters
        held: list[int] = []
        hold = budget.hold

        def checked_hold(holder: Any, size: int) -> bool:
            result = hold(holder, size)
            held.append(budget.held)
            return result

        budget.hold = checked_hold  # type: ignore[method-assign]
        before = yield fd_baseline()

        paths = [os.path.join(rundir, "ipc")] * 900
        paths += [os.path.join(rundir, "pong")] * 100
        partial = b"p" * (64 * 1024)
        socks = yield deferToThread(hold_partials, paths, MiB, partial)
        self.addCleanup(lambda: [sock.close() for sock in socks])
        closes = "closed over partial-message budget"
        # Each connection closed, or holding all its 64 KiB.
        yield wait_until(
            lambda: (
                len(budget) + counters[closes] == len(socks)
                and budget.held >= len(budget) * len(partial)
            ),
            "every connection's partial message to be held or closed",
        )
        yield wait_until(
            lambda: sum(map(closed_by_peer, socks)) == counters[closes],
            "the clients to see the closes",
        )
        alive = len(socks) - counters[closes]
        self.assertLessEqual(max(held), budget_size)
        self.assertLessEqual(budget.held, budget_size)
        self.assertEqual(len(budget), alive)
        # All but about what fits were closed: 4 MiB holds 63 of these in
        # one piece each, and the last to come may have been refused room
        # a closed one left.
        fits = budget_size // (len(partial) + PIECE_OVERHEAD)
        self.assertIn(alive, range(fits - 1, fits + 1))

        reply = yield deferToThread(lookup, rundir, b"pong")
        self.assertEqual(reply.first, b"ok")
        pong = reply.take_socket(self)
        answer = yield deferToThread(bounce, pong)
        self.assertEqual(answer, encode(b"bounce me"))
        pong.close()

        for sock in socks:
            sock.close()
        yield wait_until(lambda: len(budget) == 0, "the partial messages to go")
        self.assertEqual(budget.held, 0)
        yield assert_no_fd_leak(before)


def wait_closed(paths: list[str]) -> int:
    """Connect to each path, send nothing, and count those ipcd closes."""
    socks = [connect_patiently(path) for path in paths]
    closed = 0
    try:
        for sock in socks:
            try:
                if sock.recv(4096) == b"":
                    closed += 1
            except ConnectionResetError:
                closed += 1
    finally:
        for sock in socks:
            sock.close()
    return closed


class DeadlineTests(TestCase):
    @inlineCallbacks
    def test_idleClientsClosed(self) -> Any:
        """
        With short deadlines, 20 silent pongd clients and 100 silent control
        clients are all closed by ipcd (each client waits at most TIMEOUT),
        and counted.
        """
        set_network(self, None)
        rundir = short_rundir(self)
        config = make_config(
            rundir, limits={"idle_timeout": 0.2, "control_timeout": 0.2}
        )
        service = yield start_ipcd(self, config)
        before = yield fd_baseline()
        paths = [os.path.join(rundir, "pong")] * 20
        paths += [os.path.join(rundir, "ipcd-control")] * 100
        closed = yield deferToThread(wait_closed, paths)
        self.assertEqual(closed, 120)
        counters = service.broker.counters
        self.assertEqual(counters["idle connections closed"], 20)
        self.assertEqual(counters["control requests timed out"], 100)
        yield assert_no_fd_leak(before)


def _oversized(path: str | None, port: int | None, count: int) -> list[bytes]:
    """
    C{count} clients each announce a message of 4 GiB: on C{path} (a UNIX
    socket) at once, or through tcpd on C{port} to pongd after its C{ok};
    what each read until ipcd closed it.
    """
    answers = []
    for _ in range(count):
        if path is not None:
            sock = connect_unix(path)
        else:
            sock = socket.create_connection(("127.0.0.1", port), TIMEOUT)
            sock.sendall(b"pong")
            if sock.recv(2) != b"ok":
                raise AssertionError("tcpd did not answer ok")
        with sock:
            sock.settimeout(TIMEOUT)
            sock.sendall(HEADER.pack(0xFFFFFFFF))
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
            answers.append(answer)
    return answers


class TooLargeTests(TestCase):
    @inlineCallbacks
    def test_closesLoggedAtABoundedRate(self) -> Any:
        """
        Clients that each send a message over its maximum, to
        C{RUNDIR/ipc} and (a remote peer, through tcpd) to pongd, are each
        closed (a lookup's with its C{ne}) and counted; the lines saying
        so are a few, not one each, and say how many they left out.
        """
        from ipcd.test.tcpsupport import start_host
        from ipcd.wire import LOG_LINES_DROPPED, TOO_LARGE_CLOSED

        set_network(self, None)
        host = yield start_host(self, ["allow in pong"])
        counters = host.broker.counters
        lines = logged_lines(self)
        before = yield fd_baseline()
        dropped = counters[LOG_LINES_DROPPED]
        clients = 50
        ipc = os.path.join(host.rundir, "ipc")
        answers = yield deferToThread(_oversized, ipc, None, clients)
        self.assertTrue(all(b"ne lookup of 4294967295 bytes" in a for a in answers))
        answers = yield deferToThread(_oversized, None, host.port, clients)
        self.assertEqual(set(answers), {b""})
        yield wait_until(
            lambda: counters[TOO_LARGE_CLOSED] == 2 * clients, "every close counted"
        )
        said = [line for line in lines if "exceeds the limit" in line]
        self.assertLess(len(said), clients // 2, "\n".join(said))
        self.assertEqual(counters[LOG_LINES_DROPPED] - dropped, 2 * clients - len(said))
        self.assertIn("uid", said[0])  # the client's, not an empty address
        yield assert_no_fd_leak(before)
