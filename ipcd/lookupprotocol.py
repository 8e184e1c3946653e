"""
The lookup protocol on C{RUNDIR/ipc}, through a Twisted transport: one lookup
per connection, answered C{ok} with the connected fd or C{ne <reason>}.

Most lookups never get here: L{ipcd.ataccept} answers them within the
accept, and hands a L{LookupProtocol} only those that have to wait.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from ipcd.ataccept import serve_at_accept
from ipcd.handoff import send_ok
from ipcd.identity import Peer, local_peer
from ipcd.limits import ConnectionLimits
from ipcd.lookup import Answer, ILookupBroker, reply_to, serve_lookup, unexpected
from ipcd.sockets import discard_unread, peer_closed
from ipcd.wire import (
    TOO_LARGE_CLOSED,
    LimitLog,
    MessageProtocol,
    PartialMessageBudget,
)


class LookupProtocol(MessageProtocol):
    """
    One lookup per connection: read it, answer C{ok} with the connected fd in
    SCM_RIGHTS, or C{ne <reason>} with no fd; then close.  A client that
    sends no whole lookup within C{broker.config.lookup_timeout} seconds is
    answered C{ne no lookup received within N s}: the deadline is
    L{TimeoutMixin}'s (MessageProtocol's), timed on C{clock}.
    """

    # Its log lines keep the namespace they had before the module split.
    log = Logger(namespace="ipcd.broker.LookupProtocol")
    # The lookup deadline (TimeoutMixin's timer) bounds the connection: it
    # is not reset by data, and there is no idle timer besides.
    idleTimeout = 0

    def __init__(
        self,
        broker: ILookupBroker,
        clock: IReactorTime,
        partialBudget: PartialMessageBudget | None = None,  # noqa: N803
    ) -> None:
        self.broker = broker
        self.clock = clock
        self.maxMessageSize = broker.config.max_message_size
        self.partialBudget = partialBudget
        self._pending: Deferred[socket.socket] | None = None
        self._handed: socket.socket | None = None
        self._answered = False
        self._admitted: str | None = None  # the peer key counted in limits
        self._refused_by: ConnectionLimits | None = None

    def connectionMade(self) -> None:
        try:
            self.client = local_peer(
                self.transport.getHandle(), getattr(self.broker, "labels", None)
            )
        except (OSError, AttributeError):
            self.client = Peer("unknown local client")
        limits = self.factory.limits if self.factory is not None else None
        if limits is not None:
            key = f"uid:{self.client.uid}"
            refusal = limits.admit(key)
            if refusal is not None:
                self._answered = True
                self._refused_by = limits
                limits.refuse(self.transport, b"ne " + refusal.encode(), key)
                return
            self._admitted = key
        self.setTimeout(self.broker.config.lookup_timeout)

    def peerName(self) -> str:
        return str(self.client)

    def timeoutConnection(self) -> None:  # noqa: N802 (TimeoutMixin's name)
        timeout = self.timeOut
        limits = self.factory.limits if self.factory is not None else None
        # As the listener's refusals: counted, and logged at a bounded rate.
        log = self.log if limits is None else limits.log
        if limits is not None:
            limits.counters[f"{limits.name}: lookups timed out"] += 1
        log.info(
            "{who} sent no lookup within {timeout:g} s",
            who=str(self.client),
            timeout=timeout,
        )
        self._answer_no(f"no lookup received within {timeout:g} s")

    def messageReceived(self, payload: bytes) -> None:
        if self._answered or self._pending is not None:
            return  # one lookup per connection; anything after it is ignored
        self.setTimeout(None)
        self.answer(serve_lookup(self.broker, payload, self.client))

    def answer(self, answer: Answer) -> None:
        """Answer the lookup with what the broker gave, now or once it fires."""
        if isinstance(answer, Deferred):
            self._pending = answer
            answer.addBoth(self._answered_later)
        else:
            self._reply(answer)

    def readConnectionLost(self) -> None:  # noqa: N802 (Twisted's name)
        """
        The client's EOF.  One that shut only its writing half after the
        lookup (upstream clients may, socat does) still gets the answer the
        broker is preparing: the connection stays open for it.  One that
        closed altogether has nobody to answer: it goes, and with it the
        connect made for it (cancelled in connectionLost).  Half a lookup
        then EOF: C{ne}, which says so.
        """
        if self._pending is not None and not peer_closed(self.transport):
            return  # answered (then closed) when the broker is done
        if not self._answered and self._pending is None:
            self._answer_no("lookup unfinished: the client stopped sending")
            return
        self.transport.loseConnection()

    def messageTooLarge(self, size: int) -> None:
        self._answer_no(f"lookup of {size} bytes exceeds {self.maxMessageSize} bytes")

    def _answered_later(self, result: socket.socket | Failure) -> None:
        self._pending = None
        if isinstance(result, Failure) and result.check(CancelledError):
            if self._answered:
                return  # the client went first: nobody to answer
        self._reply(result)

    def _reply(self, answer: socket.socket | Failure) -> None:
        """Send the broker's C{answer}, as L{reply_to} says it."""
        failed = isinstance(answer, Failure)
        if failed and unexpected(answer):
            log = getattr(self.factory, "failures", self.log)
            log.failure("lookup for {who} failed", answer, who=str(self.client))
        if self._answered:
            if not failed:
                answer.close()
            return
        data, fd = reply_to(answer)
        if fd is None:
            self._send_no(data)
            return
        self._answered = True
        # Keep our copy open until the write buffer (and the fd) is flushed:
        # it is closed in connectionLost.
        self._handed = answer
        # O_NONBLOCK belongs to the shared open file, not to our fd: clients
        # (upstream's do a plain blocking read) must get a blocking socket.
        answer.setblocking(True)
        try:
            send_ok(self.transport, fd)
        except OSError:
            # The client closed after its EOF reached us (EPIPE): nobody to
            # answer, and Twisted, no longer reading, would not notice.
            self.transport.abortConnection()
            return
        self.transport.loseConnection()

    def _answer_no(self, reason: str) -> None:
        if not self._answered:
            self._send_no(b"ne " + reason.encode("utf-8", "replace"))

    def _send_no(self, data: bytes) -> None:
        self._answered = True
        self.setTimeout(None)
        discard_unread(self.transport)
        self.transport.write(data)
        self.transport.loseConnection()

    def send_rest(self, rest: bytes) -> None:
        """Send the C{rest} of an answer begun without a transport."""
        self._answered = True
        self.setTimeout(None)
        self.transport.write(rest)
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        super().connectionLost(reason)  # and the deadline with it
        self._answered = True
        if self._admitted is not None:
            self.factory.limits.release(self._admitted)
            self._admitted = None
        if self._refused_by is not None:
            self._refused_by.refused_gone(self.transport)
        if self._pending is not None:
            self._pending.cancel()
        if self._handed is not None:
            self._handed.close()
            self._handed = None


class LookupFactory(Factory):
    """
    Builds a L{LookupProtocol} per client of C{RUNDIR/ipc}, for any
    L{ILookupBroker}.  Their partial lookups count against C{partialBudget}:
    ipcd's shared one, else a private one of the configured size.
    Deadlines run on C{clock}, by default the broker's reactor.
    """

    noisy = False

    def __init__(
        self,
        broker: ILookupBroker,
        clock: IReactorTime | None = None,
        partialBudget: PartialMessageBudget | None = None,  # noqa: N803
        limits: ConnectionLimits | None = None,
    ) -> None:
        self.broker = broker
        self.clock = clock if clock is not None else broker.reactor
        if partialBudget is None:
            partialBudget = PartialMessageBudget(
                lambda: self.broker.config.partial_message_budget,
                broker.counters,
                self.clock,
            )
        self.partialBudget = partialBudget
        # Counted here rather than by a wrapping factory: lookups are the hot
        # path, and the protocol reads the peer's uid anyway.
        self.limits = limits
        # Where unexpected failures are said: a client may cause them as
        # often as it asks (when fds run out, say), so at the listener's
        # bounded rate when it has limits.  (Logger is a descriptor that
        # makes a new Logger at each access: taken once, not per lookup.)
        self.failures = LookupProtocol.log if limits is None else limits.log
        # Lookups over max_message_size: a client may send them as often as
        # it connects.
        self.tooLargeLog = LimitLog(TOO_LARGE_CLOSED, broker.counters, self.clock)

    def stopFactory(self) -> None:  # noqa: N802 (Twisted's name)
        if self.limits is not None:
            self.limits.rate_limited.flush()  # what it left out, said now

    def buildProtocol(self, addr: Any) -> LookupProtocol:
        protocol = LookupProtocol(self.broker, self.clock, self.partialBudget)
        protocol.factory = self
        protocol.tooLargeLog = self.tooLargeLog
        return protocol

    def serve_at_once(
        self,
        skt: socket.socket,
        close_later: Callable[[socket.socket], None] = socket.socket.close,
    ) -> Callable[[Any], None] | None:
        """
        Serve a just-accepted client of a L{ipcd.lookupport.LookupPort}
        without a transport when nothing has to wait (L{serve_at_accept});
        C{None} when it was answered, else how a L{LookupProtocol} carries
        on.
        """
        return serve_at_accept(
            self.broker, self.limits, self.failures, skt, close_later
        )
