"""
A listener as a service, with public answers: L{EndpointListener} does
StreamServerEndpointService's job (listen on an endpoint when started, stop
listening when stopped), and tells whoever starts it what came of it
(L{EndpointListener.listen}) and anyone who asks where it listens
(L{EndpointListener.listening}), without Twisted's private bookkeeping.

ipcd's service tree (L{ipcd.tap.IPCDService}) starts every listener itself,
so that one that cannot listen stops the start-up in one line.
"""

from __future__ import annotations

import errno
import os
from typing import Any, Generic, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from ipcd.names import SocketInUse

T = TypeVar("T")


class Outcome(Generic[T]):
    """
    A result that comes once (a value or a L{Failure}) and that any number
    of callers may wait for, each with a Deferred of its own.
    """

    def __init__(self) -> None:
        self._result: T | Failure | None = None
        self.settled = False
        self._waiting: list[Deferred[T]] = []

    def settle(self, result: T | Failure) -> None:
        """The result, once: later ones are ignored."""
        if self.settled:
            return
        self._result, self.settled = result, True
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            self._fire(d)

    def wait(self) -> Deferred[T]:
        """A Deferred of the result: fired now if it came already."""
        d: Deferred[T] = Deferred()
        if self.settled:
            self._fire(d)
        else:
            self._waiting.append(d)
        return d

    def _fire(self, d: Deferred[T]) -> None:
        if isinstance(self._result, Failure):
            d.errback(self._result)
        else:
            d.callback(self._result)  # type: ignore[arg-type]


class CannotListen(SystemExit, Exception):
    """
    A listener outside ipcd's tree cannot listen when twistd starts it: the
    message is the one line.  A C{SystemExit}, so that C{twistd -n} prints
    that line and exits 1, no traceback; an C{Exception} too, so that a
    daemonizing twistd reports it: twistd tells its waiting parent of an
    C{Exception} only, and the parent, which holds the pipe it waits on
    open itself, waited for ever on a bare C{SystemExit}, saying nothing.
    """


class IListener(Interface):
    """A service that listens on one endpoint, started by ipcd's tree."""

    endpoint: Any = Attribute("What it listens on (an IStreamServerEndpoint).")
    port: Any = Attribute("Its listening port once listening, else None.")

    def listen() -> Deferred[Any]:
        """
        Listen, once (later calls answer the same): fires with the port, or
        fails with why it cannot listen (CannotListenError, ...).
        """

    def listening() -> Deferred[Any]:
        """Fires with the port once listening (C{getHost()} for where)."""


@implementer(IListener)
class EndpointListener(Service):
    """
    Listens on C{endpoint} with C{factory}: when privileges are still held
    (C{privilegedStartService}), else when started.  A failure to listen is
    the result of L{listen}; if nobody started it through L{listen}, it is
    logged.
    """

    log = Logger()

    def __init__(
        self, endpoint: Any, factory: Any, description: str | None = None
    ) -> None:
        self.endpoint = endpoint
        self.factory = factory
        # The endpoint string, for messages (an endpoint object may be a
        # wrapper that does not say where it listens).
        self.description = description
        self.port: Any = None
        self._listening: Deferred[Any] | None = None
        self._outcome: Outcome[Any] = Outcome()

    def listen(self) -> Deferred[Any]:
        if self._listening is None:
            outcome = self._outcome

            def listened(result: Any) -> None:
                if outcome is self._outcome and not isinstance(result, Failure):
                    self.port = result
                outcome.settle(result)

            self._listening = maybeDeferred(self.endpoint.listen, self.factory)
            self._listening.addBoth(listened)
        return self._outcome.wait()

    def listening(self) -> Deferred[Any]:
        return self._outcome.wait()

    def privilegedStartService(self) -> None:  # noqa: N802 (Twisted's name)
        super().privilegedStartService()
        if self._listening is not None:
            return
        # Outside ipcd's tree (an application of its own, twistd -y): twistd
        # calls this before its reactor runs.  A socket that cannot be
        # listened on then stops the start in one line, exit status 1, as
        # ipcd's own do, rather than a logged traceback and a process that
        # serves nothing.
        now: list[Failure] = []
        starting = True

        def heard(failure: Failure) -> None:
            if starting:
                now.append(failure)
            else:
                self._unheard(failure)

        self.listen().addErrback(heard)
        starting = False
        if now and not now[0].check(CancelledError):
            raise CannotListen(f"{self.name or 'twistd'}: {self._why(now[0])}")

    def startService(self) -> None:  # noqa: N802 (Twisted's name)
        super().startService()
        if self._listening is None:
            self.listen().addErrback(self._unheard)

    def _why(self, failure: Failure) -> str:
        """Why it cannot listen, in one line naming where, and the way out."""
        path = getattr(self.endpoint, "path", None)
        if failure.check(SocketInUse):  # names the socket itself
            return f"{failure.getErrorMessage()} (stop it, or use another RUNDIR)"
        where = path or self.description
        cause = getattr(failure.value, "socketError", failure.value)
        code = getattr(cause, "errno", None)
        why = os.strerror(code).lower() if code else " ".join(str(cause).split())
        hint = ""
        if path is not None and code in (errno.EACCES, errno.EPERM, errno.EROFS):
            directory = os.path.dirname(path)
            hint = f" (make {directory} writable for this user, or use another RUNDIR)"
        return f"cannot listen on {where or self.endpoint}: {why}{hint}"

    def _unheard(self, failure: Failure) -> None:
        if not failure.check(CancelledError):
            self.log.failure("{why}", failure, why=self._why(failure))

    def stopService(self) -> Deferred[None] | None:  # noqa: N802 (Twisted's name)
        super().stopService()
        listening, self._listening = self._listening, None
        port, self.port = self.port, None
        self._outcome = Outcome()
        if port is not None:
            return maybeDeferred(port.stopListening)
        if listening is not None:
            listening.cancel()  # still on its way: no port to stop
        return None
