"""
Log lines written a few at a time, not with one C{write(2)} each.

Twisted's C{FileLogObserver} writes every event and flushes its file: one
system call per line, and ipcd logs a decision line per lookup.
L{BatchedFile} holds the lines and writes them with one call at most
L{FLUSH_AFTER} seconds after the first of them, once L{batch_with} has
given it a clock (ipcd's service gives its reactor while it runs).  Without
one (before ipcd starts, after it stops) each line is written as it comes,
as Twisted's observer writes it.

Why a short delay and not the end of each reactor turn: one lookup is one
turn when clients come one at a time, and asking for a call at the turn's
end (C{callLater(0)}) cost more than the write it saved.  Measured here,
quiet: a line and a reactor turn in a loop, formatting included, to
C{/dev/null}, 6.2 µs written at each turn's end, 3.8 µs held for up to
10 ms; the broker's whole path for a lookup, with its line to a file,
43.5 against 38.2 µs.

What it costs: a line reaches the file up to L{FLUSH_AFTER} seconds late;
a process killed outright (C{SIGKILL}) loses at most those lines.  At most
L{MOST_HELD} characters are held: more are written as the bound is reached.
Lines that cannot be written (the reader of stdout gone, a full disk) are
lost, as with Twisted's own observer, and nothing more is made of it.

Only the reactor's thread waits on the clock (C{callLater} is not
thread-safe, and would not wake a reactor asleep with no timer): a line
logged in another thread (a metrics scrape's warning, a thread pool's
failure) is written at once, with whatever is held before it.
"""

from __future__ import annotations

import atexit
import threading
import weakref
from typing import IO

from twisted.internet.interfaces import IReactorTime
from twisted.python import threadable

# Characters held before they are written at once.
MOST_HELD = 64 * 1024
# Seconds a line is held at most: short enough for anyone reading the log
# as it grows, long enough to write a busy ipcd's lines a hundred at a time.
FLUSH_AFTER = 0.01

# The clock the lines wait on (None: none, written at once), and every file
# that batches, to write what they hold when it changes.
_clock: IReactorTime | None = None
_files: weakref.WeakSet[BatchedFile] = weakref.WeakSet()


class BatchedFile:
    """
    The file-like object a C{FileLogObserver} writes to: C{write} holds a
    line, C{flush} (after each line) asks for the held lines to be written
    within L{FLUSH_AFTER} seconds.
    """

    def __init__(self, out: IO[str], most: int = MOST_HELD) -> None:
        self._out = out
        self._most = most
        self._held: list[str] = []
        self._size = 0
        self._waiting = False  # for the clock to write them
        # Held lines, taken and written by one thread at a time, in order.
        # Reentrant: a line logged in the thread writing (by a finalizer the
        # garbage collector runs meanwhile) would otherwise hang it for good.
        self._lock = threading.RLock()
        _files.add(self)

    def write(self, text: str) -> None:
        with self._lock:
            self._held.append(text)
            self._size += len(text)
            full = self._size >= self._most
        if full:
            self.write_held()

    def flush(self) -> None:
        clock = _clock
        if clock is None or _in_another_thread():
            self.write_held()
        elif not self._waiting:
            self._waiting = True
            clock.callLater(FLUSH_AFTER, self._time_is_up)

    def _time_is_up(self) -> None:
        self._waiting = False
        self.write_held()

    def write_held(self) -> None:
        """Write the held lines now, with one call, and flush the file."""
        with self._lock:
            if not self._held:
                return
            text = "".join(self._held)
            self._held.clear()
            self._size = 0
            try:
                self._out.write(text)
                self._out.flush()
            except (OSError, ValueError):
                # Lost (EPIPE: the reader of stdout is gone; ENOSPC; closed),
                # as Twisted's observer loses a line it cannot write.  Raised
                # from the clock's call, the reactor would log the error: a
                # line held, failing in turn, 100 times a second for ever.
                pass


def _in_another_thread() -> bool:
    """In a thread other than the reactor's (once a reactor has run)."""
    io = threadable.ioThread
    return io is not None and io != threadable.getThreadID()


def batch_with(clock: IReactorTime | None) -> None:
    """
    From now on, hold log lines for up to L{FLUSH_AFTER} seconds of
    C{clock} (ipcd's reactor); C{None}: write them as they come (what is
    held is written now).
    """
    global _clock
    _clock = clock
    for each in list(_files):
        # A call the old clock was to make may never come.
        each._waiting = False
        if clock is None:
            each.write_held()


def write_all_held() -> None:
    """Write what every L{BatchedFile} holds (at exit, too)."""
    for batched in list(_files):
        batched.write_held()


atexit.register(write_all_held)
