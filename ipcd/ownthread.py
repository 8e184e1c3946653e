"""
L{in_own_thread}: blocking work in a thread of its own, its result on the
reactor's thread.

For work that must not queue in the reactor's thread pool, where every
route's host name is looked up (getaddrinfo, which no deadline ends): ten
slow ones hold the whole pool for as long as whoever starts them likes.
"""

from __future__ import annotations

from collections.abc import Callable
from threading import Thread
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

T = TypeVar("T")


def in_own_thread(reactor: Any, work: Callable[[], T], name: str) -> Deferred[T]:
    """
    C{work()} in a new daemon thread named C{name} (never waited for at
    exit: it must write nothing that outlives the process); its result, or
    its exception as a Failure, fires the Deferred on the reactor's thread.
    """
    done: Deferred[T] = Deferred()

    def run() -> None:
        try:
            result = work()
        except BaseException:
            reactor.callFromThread(done.errback, Failure())
        else:
            reactor.callFromThread(done.callback, result)

    Thread(target=run, name=name, daemon=True).start()
    return done
