"""
Log lines written a few at a time (L{ipcd.logbatch}), through the
very observer ipcd logs with; and every line of a real ipcd is in its log
when it stops.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import FileLogObserver, Logger
from twisted.trial.unittest import SynchronousTestCase

from ipcd import logbatch
from ipcd.client import connect
from ipcd.logbatch import FLUSH_AFTER, BatchedFile, batch_with
from ipcd.logs import ClassicTextFormatter, text_observer
from ipcd.test.support import TIMEOUT, python_env, read_text
from ipcd.test.test_client import TwistdCase


class WritesFile(io.StringIO):
    """A file that remembers each write and each flush."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []
        self.flushes = 0

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)

    def flush(self) -> None:
        self.flushes += 1


class BatchedFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.addCleanup(batch_with, None)
        self.out = WritesFile()
        self.log = Logger(
            namespace="test",
            observer=FileLogObserver(BatchedFile(self.out), ClassicTextFormatter()),
        )

    def lines(self) -> list[str]:
        return [line.split(" ", 1)[1] for line in self.out.getvalue().splitlines()]

    def test_writtenWithinTheDelay(self) -> None:
        """
        Lines are held, not written at the end of the reactor turn they
        were logged in: those logged within L{FLUSH_AFTER} seconds of the
        first are written together, in order, with one write and a flush,
        when that time is up.
        """
        clock = Clock()
        batch_with(clock)
        self.log.info("line 0")
        clock.advance(0)
        self.assertEqual(self.out.writes, [])
        clock.advance(FLUSH_AFTER / 2)
        for n in (1, 2):
            self.log.info("line {n}", n=n)
        self.assertEqual(self.out.writes, [])
        clock.advance(FLUSH_AFTER / 2)
        self.assertEqual(len(self.out.writes), 1)
        self.assertEqual(self.out.flushes, 1)
        self.assertEqual(self.lines(), [f"[test#info] line {n}" for n in range(3)])
        self.log.info("later")
        clock.advance(FLUSH_AFTER)
        self.assertEqual(len(self.out.writes), 2)

    def test_delayIsShort(self) -> None:
        """A line is held for 10 ms at most: the log is read as it grows."""
        self.assertLessEqual(FLUSH_AFTER, 0.01)
        self.assertGreater(FLUSH_AFTER, 0)

    def test_withoutAReactorAtOnce(self) -> None:
        """Without a reactor, each line is written as it is logged."""
        self.log.info("one")
        self.log.info("two")
        self.assertEqual(len(self.out.writes), 2)
        self.assertEqual(self.lines(), ["[test#info] one", "[test#info] two"])

    def test_oneCallPerDelay(self) -> None:
        """However many lines are held, one call of the clock writes them."""
        clock = Clock()
        batch_with(clock)
        for n in range(3):
            self.log.info("line {n}", n=n)
        self.assertEqual(len(clock.getDelayedCalls()), 1)

    def test_madeWhileAReactorRuns(self) -> None:
        """A file made after the reactor was given batches too."""
        clock = Clock()
        batch_with(clock)
        out = WritesFile()
        batched = BatchedFile(out)
        batched.write("line\n")
        batched.flush()
        self.assertEqual(out.writes, [])
        clock.advance(FLUSH_AFTER)
        self.assertEqual(out.writes, ["line\n"])

    def test_heldAtMost(self) -> None:
        """
        More than the bound held is written as the bound is reached,
        and what is held next counts from nothing.
        """
        out = WritesFile()
        batched = BatchedFile(out, most=10)
        clock = Clock()
        batch_with(clock)
        batched.write("123456789")
        batched.flush()
        self.assertEqual(out.writes, [])
        batched.write("0")
        self.assertEqual(out.writes, ["1234567890"])
        batched.write("abcdef")
        batched.flush()
        clock.advance(FLUSH_AFTER)
        batched.write("ghijklmno")
        batched.flush()
        self.assertEqual(out.writes, ["1234567890", "abcdef"])

    def test_defaultBound(self) -> None:
        """By default 64 KiB are held, no more."""
        out = WritesFile()
        batched = BatchedFile(out)
        batch_with(Clock())
        batched.write("x" * (64 * 1024 - 1))
        self.assertEqual(out.writes, [])
        batched.write("x")
        self.assertEqual(len(out.writes), 1)

    def test_noReactorWritesWhatIsHeld(self) -> None:
        """Taking the reactor away writes what was held, then lines at once."""
        batch_with(Clock())
        self.log.info("held")
        self.assertEqual(self.out.writes, [])
        batch_with(None)
        self.assertEqual(self.lines(), ["[test#info] held"])
        self.log.info("after")
        self.assertEqual(self.lines(), ["[test#info] held", "[test#info] after"])

    def test_newReactor(self) -> None:
        """
        A write the old clock never got to (it stopped) does not hold
        the lines logged under the next one.
        """
        batch_with(Clock())
        self.log.info("old")
        batch_with(None)
        clock = Clock()
        batch_with(clock)
        self.log.info("new")
        clock.advance(FLUSH_AFTER)
        self.assertEqual(self.lines(), ["[test#info] old", "[test#info] new"])

    def test_stdoutBatched(self) -> None:
        """ipcd's text observer batches stdout's lines; a file given, not."""
        stdout = WritesFile()
        self.patch(logbatch, "_files", type(logbatch._files)())
        self.patch(sys, "stdout", stdout)
        on_stdout = Logger(namespace="test", observer=text_observer())
        given = WritesFile()
        on_given = Logger(namespace="test", observer=text_observer(given))
        clock = Clock()
        batch_with(clock)
        on_stdout.info("out")
        on_given.info("given")
        self.assertEqual((stdout.writes, len(given.writes)), ([], 1))
        clock.advance(FLUSH_AFTER)
        self.assertEqual(len(stdout.writes), 1)


class Unwritable(WritesFile):
    """A file whose writes fail until C{broken} is false (EPIPE)."""

    broken = True

    def write(self, text: str) -> int:
        if self.broken:
            raise BrokenPipeError(32, "Broken pipe")
        return super().write(text)


class WriteErrorTests(SynchronousTestCase):
    def test_lostNotRaised(self) -> None:
        """
        Held lines that cannot be written are lost, as Twisted's observer
        loses them: the clock's call does not fail (the reactor would log
        that, and the line would fail again), nothing more is asked of the
        clock, and lines are written again once the file takes them.
        """
        self.addCleanup(batch_with, None)
        out = Unwritable()
        batched = BatchedFile(out)
        clock = Clock()
        batch_with(clock)
        batched.write("lost\n")
        batched.flush()
        clock.advance(FLUSH_AFTER)
        self.assertEqual(clock.getDelayedCalls(), [])
        out.broken = False
        batched.write("later\n")
        batched.flush()
        clock.advance(FLUSH_AFTER)
        self.assertEqual(out.writes, ["later\n"])


class LogsWhileWritten(WritesFile):
    """A file whose first write logs a line: what a finalizer run meanwhile
    (a Deferred's unhandled error, collected) does in the writing thread."""

    log: Logger
    logged = False

    def write(self, text: str) -> int:
        if not self.logged:
            self.logged = True
            self.log.info("logged while written")
        return super().write(text)


class ReentryTests(SynchronousTestCase):
    def test_lineLoggedWhileWriting(self) -> None:
        """
        A line logged in the thread that is writing the held lines (by a
        finalizer the garbage collector runs there, say) is taken, not
        waited for: that thread, often the reactor's, does not hang for
        good on its own lock.
        """
        out = LogsWhileWritten()
        out.log = Logger(
            namespace="test",
            observer=FileLogObserver(BatchedFile(out), ClassicTextFormatter()),
        )
        writer = threading.Thread(target=out.log.info, args=("first",), daemon=True)
        writer.start()
        writer.join(TIMEOUT)
        self.assertFalse(writer.is_alive(), "hung on a line logged while written")
        self.assertEqual(
            [line.split(" ", 1)[1] for line in out.getvalue().splitlines()],
            ["[test#info] logged while written", "[test#info] first"],
        )


class ProcessTests(SynchronousTestCase):
    """ipcd's stdout log in a process of its own, as twistd's --logger."""

    def run_python(self, code: str) -> str:
        result = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            env=python_env(),
            timeout=TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout.decode("utf-8")

    def test_beforeAnyReactor(self) -> None:
        """
        Before ipcd gives it a reactor (twistd's first lines), a line is
        written as it is logged: it is there even if the process then ends
        without any clean-up.
        """
        out = self.run_python(
            "import os\n"
            "from twisted.logger import Logger\n"
            "from ipcd.logs import text_observer\n"
            "Logger(namespace='t', observer=text_observer()).info('early')\n"
            "os._exit(0)\n"
        )
        self.assertTrue(out.endswith("[t#info] early\n"), out)

    def test_heldLinesAtExit(self) -> None:
        """Lines still held when the process exits are written then."""
        out = self.run_python(
            "from twisted.internet.task import Clock\n"
            "from twisted.logger import Logger\n"
            "from ipcd.logbatch import batch_with\n"
            "from ipcd.logs import json_observer\n"
            "batch_with(Clock())  # whose time never comes\n"
            "Logger(namespace='t', observer=json_observer()).info('held')\n"
        )
        self.assertIn('"text": "held"', out)

    def test_anotherThreadWritesAtOnce(self) -> None:
        """
        A line logged in a thread other than the reactor's is written at
        once, with anything the reactor's thread still holds: a call on the
        reactor's clock from there would be unsafe, and a reactor asleep
        with no timer (its first line written) would never make it; the
        process here ends without clean-up while the reactor sleeps.
        """
        out = self.run_python(
            "import os, threading, time\n"
            "from twisted.internet import reactor\n"
            "from twisted.logger import Logger\n"
            "from ipcd.logbatch import batch_with\n"
            "from ipcd.logs import text_observer\n"
            "log = Logger(namespace='t', observer=text_observer())\n"
            "def elsewhere():\n"
            "    time.sleep(0.5)  # (on a slow machine, both lines held)\n"
            "    log.info('from a thread')\n"
            "    time.sleep(1)\n"
            "    os._exit(0)\n"
            "def started():\n"
            "    batch_with(reactor)\n"
            "    log.info('held first')\n"
            "    threading.Thread(target=elsewhere).start()\n"
            "reactor.callWhenRunning(started)\n"
            "reactor.run()\n"
        )
        lines = [line.split(" ", 1)[1] for line in out.splitlines()]
        self.assertEqual(lines, ["[t#info] held first", "[t#info] from a thread"])

    def test_readerGone(self) -> None:
        """
        A real reactor whose stdout's reader is gone (EPIPE): one line is
        lost and that is all; the failed write was logged, held, failed
        again, 100 times a second, for ever (4 % of a core).
        """
        code = (
            "import os, sys\n"
            "from twisted.internet import reactor\n"
            "from twisted.logger import Logger, globalLogBeginner\n"
            "from ipcd.logbatch import batch_with\n"
            "from ipcd.logs import text_observer\n"
            "globalLogBeginner.beginLoggingTo([text_observer()], False, False)\n"
            "batch_with(reactor)\n"
            "reactor.callLater(0, Logger(namespace='t').info, 'decided')\n"
            "def end():\n"
            "    calls = len(reactor.getDelayedCalls())\n"
            "    os.write(2, b'calls pending: %d\\n' % calls)\n"
            "    reactor.stop()\n"
            "reactor.callLater(0.5, end)\n"
            "reactor.run()\n"
        )
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            result = subprocess.run(
                [sys.executable, "-c", code],
                stdout=write_end,
                stderr=subprocess.PIPE,
                env=python_env(),
                timeout=TIMEOUT,
                stdin=subprocess.DEVNULL,
            )
        finally:
            os.close(write_end)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(b"calls pending: 0\n", result.stderr)


class StopTests(TwistdCase):
    """A real C{twistd -n ipcd}: its lines are all written when it stops."""

    @inlineCallbacks
    def test_everyDecisionLineAtStop(self) -> Any:
        """
        Lookups made right before SIGTERM each have their decision line in
        the log once ipcd has stopped.
        """
        process, log = self.twistd("stopped")
        yield self.started(process, log)

        def lookups() -> None:
            for _ in range(50):
                connect(
                    "pong",
                    rundir=self.rundir,
                    network="pong unix://pong",
                    timeout=TIMEOUT,
                ).close()

        yield deferToThread(lookups)
        process.send_signal(signal.SIGTERM)
        code = yield deferToThread(process.wait, 30)
        text = read_text(log)
        self.assertIn(code, (0, -signal.SIGTERM), text)
        decided = [line for line in text.splitlines() if "'pong' for pid" in line]
        self.assertEqual(len(decided), 50, text)
        self.assertTrue(text.rstrip().endswith("Server Shut Down."), text[-500:])
