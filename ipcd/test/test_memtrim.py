"""
After an attack ends, ipcd gives back the memory it took: L{MemoryTrim}'s
logic under a fake clock, and a real ipcd (a child process, its resident
size read from C{/proc}) after two attacks: 1,000 partial lookups, and
large messages relayed by websocketd to peers that do not read.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import time
from collections import Counter
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from ipcd.memtrim import GROWTH, MemoryTrim, glibc_trim
from ipcd.test.support import (
    TIMEOUT,
    accepts,
    lookup,
    python_env,
    read_text,
    short_rundir,
    spawn,
    take_descriptors,
)
from ipcd.test.wssupport import BINARY, ws_frame, ws_open

MiB = 1 << 20
# How close to its baseline ipcd's resident size must come back, and how
# long it has to (its trims come every 5 s).
MARGIN = 16 * MiB
BACK_WITHIN = 30.0
# How much each attack makes ipcd grow before it stops (and how long it may
# take to), so that what comes back shows.
ATTACK_GROWTH = 40 * MiB
ATTACK_WITHIN = 60.0


class MemoryTrimTests(SynchronousTestCase):
    """The logic, on a fake clock and a resident size the test sets."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.rss = 100 * MiB
        self.rounds: list[str] = []
        self.counters: Counter[str] = Counter()
        self.trim = MemoryTrim(
            self.clock,
            self.counters,
            trim=lambda: self.rounds.append("trim"),
            resident=lambda: self.rss,
            collect=lambda: self.rounds.append("collect"),
            interval=5,
            max_interval=60,
        )
        self.trim.startService()
        self.addCleanup(self.trim.stopService)

    def test_collectsAndTrimsOnceGrown(self) -> None:
        self.rss += GROWTH - 1
        self.clock.advance(5)
        self.assertEqual(self.rounds, [])
        self.rss += 1
        self.clock.advance(5)
        self.assertEqual(self.rounds, ["collect", "trim"])
        self.assertEqual(self.counters["memory trims"], 1)

    def test_givenBackCounted(self) -> None:
        self.rss += 50 * MiB
        self.trim.trim = lambda: setattr(self, "rss", self.rss - 48 * MiB)
        self.clock.advance(5)
        self.assertEqual(self.counters["memory given back, KiB"], 48 * 1024)
        # Back near its low-water mark: nothing more to do.
        self.clock.advance(60)
        self.assertEqual(self.counters["memory trims"], 1)

    def test_inUseLooksLessOften(self) -> None:
        """Memory in use: rounds 5, 10, 20, 40, 60, 60 s apart."""
        self.rss += 10 * GROWTH
        times = []
        self.trim.collect = lambda: times.append(self.clock.seconds())
        for _ in range(60 * 4):
            self.clock.advance(1)
        self.assertEqual(times[:7], [5, 15, 35, 75, 135, 195, 255][: len(times[:7])])
        # Freed (the attack ended) and the resident size falls: the next
        # growth is met at once again.
        self.rss -= 10 * GROWTH
        self.clock.advance(5)
        self.rss += GROWTH
        before = len(times)
        self.clock.advance(5)
        self.assertEqual(len(times), before + 1)

    def test_lowWaterMarkFollowsTheResidentSize(self) -> None:
        self.rss -= 20 * MiB
        self.clock.advance(5)
        self.rss += GROWTH
        self.clock.advance(5)
        self.assertEqual(self.counters["memory trims"], 1)

    def test_stops(self) -> None:
        self.trim.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def started_alone(self, trim: MemoryTrim) -> str:
        """Start C{trim} instead of the test's; the one line it logs."""
        self.trim.stopService()
        logged: list[dict[str, Any]] = []
        trim.log = Logger(observer=logged.append)
        trim.startService()
        self.addCleanup(trim.stopService)
        [line] = logged
        return line["log_format"]

    def test_noMallocTrim(self) -> None:
        """Another C library: one line; cycles are still collected."""
        collected = []
        trim = MemoryTrim(
            self.clock,
            resident=lambda: self.rss,
            collect=lambda: collected.append(1),
            interval=5,
        )
        trim.trim = None
        self.assertIn("no malloc_trim", self.started_alone(trim))
        self.rss += GROWTH
        self.clock.advance(5)
        self.assertEqual(collected, [1])

    def test_noResidentSize(self) -> None:
        """No /proc: one line, and no timer."""

        def missing() -> int:
            raise FileNotFoundError(2, "No such file or directory")

        trim = MemoryTrim(self.clock, trim=lambda: None, resident=missing)
        self.assertIn("cannot read the resident size", self.started_alone(trim))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_noDescriptorLeft(self) -> None:
        """
        Out of descriptors when it looks (EMFILE, for real: C{/proc/self/
        statm} cannot be opened): that round is skipped, and counted; the
        next looks again.  The error stopped its timer for good, so memory
        was never given back again (and stopping it raised).
        """
        collected: list[int] = []
        trim = MemoryTrim(
            self.clock,
            self.counters,
            trim=lambda: None,
            collect=lambda: collected.append(1),
            interval=5,
            growth=0,  # every round that reads the size collects
        )
        trim.startService()
        self.addCleanup(trim.stopService)
        held = take_descriptors(self, 0)
        self.clock.advance(5)
        for fd in held:
            os.close(fd)
        held.clear()
        self.assertEqual(collected, [])
        self.assertEqual(self.counters["memory checks skipped"], 1)
        self.clock.advance(5)
        self.assertEqual(collected, [1])

    def test_glibc(self) -> None:
        """This system's C library has malloc_trim, and it runs."""
        trim = glibc_trim()
        if trim is None:
            raise SkipTest("not glibc")
        trim()


def _resident(pid: int) -> int:
    with open(f"/proc/{pid}/statm", "rb") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class GivenBackTests(SynchronousTestCase):
    """A real ipcd's resident size, before, during and after an attack."""

    def setUp(self) -> None:
        if glibc_trim() is None:
            raise SkipTest("not glibc: ipcd cannot give memory back")
        self.rundir = short_rundir(self)
        self.ws_port = _free_port()
        log = os.path.join(short_rundir(self, "ipcd-log-"), "ipcd.log")
        self.log = log
        config = os.path.join(short_rundir(self, "ipcd-conf-"), "ipcd.toml")
        with open(config, "w") as f:
            # The attack holds its connections for as long as it needs.
            f.write("[ipcd]\nlookup_timeout = 120\n")
        self.process = spawn(
            self,
            ["-m", "ipcd.scripts.ipcd", "--config", config, "--rundir", self.rundir]
            + ["--no-tcp", "--ws", f"tcp:{self.ws_port}:interface=127.0.0.1"]
            + ["--allow", "in pong"],
            log,
            python_env(),
            self.rundir,
        )
        deadline = time.monotonic() + 3 * TIMEOUT
        while not accepts(os.path.join(self.rundir, "ipc")):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.fail(f"ipcd did not start:\n{read_text(log)}")
            time.sleep(0.05)
        # Warm: each kind of request served once before the baseline.
        for _ in range(20):
            lookup(self.rundir, b"pong;").close_fds()
        opening = ws_open(self.ws_port, "/pong")
        self.assertEqual(opening.status, 101)
        opening.sock.close()
        time.sleep(0.5)
        self.baseline = _resident(self.process.pid)

    def assertGivenBack(self, peak: int) -> None:  # noqa: N802
        grown = peak - self.baseline
        # Otherwise this test would show nothing.
        self.assertGreaterEqual(grown, ATTACK_GROWTH, "the attack made ipcd grow")
        deadline = time.monotonic() + BACK_WITHIN
        while (now := _resident(self.process.pid)) > self.baseline + MARGIN:
            if time.monotonic() > deadline:
                self.fail(
                    f"{now / MiB:.0f} MiB {BACK_WITHIN:g} s after the attack; "
                    f"baseline {self.baseline / MiB:.0f} MiB, "
                    f"peak {peak / MiB:.0f} MiB"
                )
            time.sleep(0.2)
        self.assertIsNone(self.process.poll())
        # And it still serves.
        reply = lookup(self.rundir, b"pong;")
        reply.close_fds()
        self.assertEqual(reply.data, b"ok")

    def grown(self) -> bool:
        """Has the attack made ipcd grow by L{ATTACK_GROWTH} yet?"""
        return _resident(self.process.pid) >= self.baseline + ATTACK_GROWTH

    def test_partialLookups(self) -> None:
        """1,000 connections each send 60 KiB of a 1 MiB lookup, then close."""
        ipc = os.path.join(self.rundir, "ipc")
        part = struct.pack("!I", MiB - 1) + b"x" * (60 << 10)
        held = []
        try:
            for _ in range(1000):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                held.append(sock)
                sock.settimeout(TIMEOUT)
                for _ in range(1000):  # a full backlog: wait for accepts
                    try:
                        sock.connect(ipc)
                        break
                    except BlockingIOError:
                        time.sleep(0.01)
                sock.sendall(part)
            # Until ipcd has read enough of them (about 60 MiB in all).
            deadline = time.monotonic() + ATTACK_WITHIN
            while not self.grown() and time.monotonic() < deadline:
                time.sleep(0.05)
            peak = _resident(self.process.pid)
        finally:
            # In no particular order, as peers go: what stays in use here
            # and there keeps the heap from shrinking by itself.
            random.Random(19).shuffle(held)
            for sock in held:
                sock.close()
        self.assertGivenBack(peak)

    def test_largeMessagesRelayed(self) -> None:
        """
        100 WebSocket peers (within the 128 one address may have) each send
        pong up to two 1,000,000-byte messages and read nothing back, then
        close.  (websocketd holds at most about a message each way for a
        peer that does not read: 64 peers no longer make 40 MiB.)
        """
        message = ws_frame(b"m" * 1_000_000, BINARY)
        held = []
        try:
            for _ in range(100):
                opening = ws_open(self.ws_port, "/pong")
                self.assertEqual(opening.status, 101)
                held.append(opening.sock)
                opening.sock.setblocking(False)
            pending = {sock: 2 * message for sock in held}
            # Send what ipcd reads, until it has grown enough: it stops
            # reading a peer that reads nothing back (backpressure), so some
            # of it may stay unsent; all of it sent, ipcd may still be
            # reading it (a loaded machine), so the wait goes on.
            deadline = time.monotonic() + ATTACK_WITHIN
            while not self.grown() and time.monotonic() < deadline:
                for sock, rest in list(pending.items()):
                    try:
                        sent = sock.send(rest[:MiB])
                    except BlockingIOError:
                        continue
                    pending[sock] = rest[sent:]
                    if not pending[sock]:
                        del pending[sock]
                time.sleep(0.01)
            peak = _resident(self.process.pid)
        finally:
            for sock in held:
                sock.close()
        self.assertGivenBack(peak)
