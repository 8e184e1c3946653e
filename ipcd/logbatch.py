"""
Log lines written once per reactor turn, not with one C{write(2)} each.

Twisted's C{FileLogObserver} writes every event and flushes its file: one
system call per line, and ipcd logs a decision line per lookup (that write
cost about 1.5 µs of a lookup's 110 or so, measured here).
L{TurnBatchedFile} holds the lines of one reactor turn and writes them with
one call when the turn ends, once L{batch_per_turn} has given it the
reactor (ipcd's service does, while it runs).  Without a reactor (before
ipcd starts, after it stops) each line is written as it comes, as Twisted's
observer writes it.

What it costs: a line reaches the file at the end of its turn, not at once;
a process killed outright (C{SIGKILL}) loses at most that turn's lines.  At
most L{MOST_HELD} characters are held: a turn that logs more writes them as
the bound is reached.
"""

from __future__ import annotations

import atexit
import weakref
from typing import IO

from twisted.internet.interfaces import IReactorTime

# Characters held before they are written in the middle of a turn.
MOST_HELD = 64 * 1024

# The reactor whose turns the lines wait for (None: none, written at once),
# and every file that batches, to write what they hold when it changes.
_reactor: IReactorTime | None = None
_files: weakref.WeakSet[TurnBatchedFile] = weakref.WeakSet()


class TurnBatchedFile:
    """
    The file-like object a C{FileLogObserver} writes to: C{write} holds a
    line, C{flush} (after each line) asks for the held lines to be written
    when the current reactor turn ends.
    """

    def __init__(self, out: IO[str], most: int = MOST_HELD) -> None:
        self._out = out
        self._most = most
        self._held: list[str] = []
        self._size = 0
        self._waiting = False  # for the end of a turn
        _files.add(self)

    def write(self, text: str) -> None:
        self._held.append(text)
        self._size += len(text)
        if self._size >= self._most:
            self.write_held()

    def flush(self) -> None:
        reactor = _reactor
        if reactor is None:
            self.write_held()
        elif not self._waiting:
            self._waiting = True
            reactor.callLater(0, self._turn_ended)

    def _turn_ended(self) -> None:
        self._waiting = False
        self.write_held()

    def write_held(self) -> None:
        """Write the held lines now, with one call, and flush the file."""
        if not self._held:
            return
        text = "".join(self._held)
        self._held.clear()
        self._size = 0
        self._out.write(text)
        self._out.flush()


def batch_per_turn(reactor: IReactorTime | None) -> None:
    """
    From now on, write log lines at the end of each of C{reactor}'s turns;
    C{None}: as they come (what is held is written now).
    """
    global _reactor
    _reactor = reactor
    for each in list(_files):
        # A call the old reactor was to make may never come.
        each._waiting = False
        if reactor is None:
            each.write_held()


def write_all_held() -> None:
    """Write what every L{TurnBatchedFile} holds (at exit, too)."""
    for batched in list(_files):
        batched.write_held()


atexit.register(write_all_held)
