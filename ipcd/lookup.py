"""
What a lookup is answered with, on either path that answers one.

L{LookupProtocol} (ipcd.lookupprotocol) answers through a Twisted transport,
L{ipcd.ataccept} within the accept, on the bare socket.  Both ask the broker
through L{serve_lookup} and turn its answer into bytes and a descriptor with
the one pure L{reply_to}, so the two cannot say different things.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface

from ipcd.errors import Refused
from ipcd.handoff import OK
from ipcd.identity import Peer
from ipcd.logs import printable

# What serving a request gives, at once or later: the connected socket, a
# Failure (Refused: answered ne), or a Deferred of either.
Answer = Any


class ILookupBroker(Interface):
    """
    What L{LookupProtocol} and L{LookupFactory} need of a broker: somebody
    that serves a lookup payload, and says what bounds a lookup connection.
    L{ipcd.broker.Broker} is one; L{ipcd.testing.FakeLookupBroker} another.
    """

    config = Attribute(
        "The settings in force, read as each connection starts: "
        "C{lookup_timeout} (seconds for the client to send its lookup), "
        "C{max_message_size} (bytes, the longest lookup read) and "
        "C{partial_message_budget} (bytes, for a factory without a shared "
        "budget).  An L{ipcd.config.Config} has them."
    )
    counters = Attribute(
        "A C{collections.Counter} of events (budget closes, refusals at the "
        "connection limit), shown by C{ipcd status}."
    )
    reactor = Attribute(
        "The C{IReactorTime} the lookup deadline runs on when the factory is "
        "given no clock."
    )

    def open(payload: bytes, client: Peer) -> Deferred[socket.socket]:
        """
        Serve one lookup C{payload} (as framed by the client, unframed) for
        C{client} (an L{ipcd.identity.Peer}): a C{Deferred} firing with the
        connected socket to hand over, which the caller then owns and
        closes, or failing with L{ipcd.errors.Refused} whose reason is
        answered as C{ne <reason>}.  Cancelled when the client goes away
        first.
        """


def as_deferred(answer: Answer) -> Deferred[Any]:
    """An L{Answer} as a C{Deferred}."""
    if isinstance(answer, Deferred):
        return answer
    if isinstance(answer, Failure):
        return fail(answer)
    return succeed(answer)


def serve_lookup(broker: Any, payload: bytes, client: Peer) -> Answer:
    """
    C{broker}'s answer to a lookup: at once where it can give one
    (L{ipcd.broker.Broker.open_now}), else through L{ILookupBroker.open}.
    """
    open_now = getattr(broker, "open_now", None)
    if open_now is not None:
        return open_now(payload, client)
    return broker.open(payload, client)


def reply_to(answer: socket.socket | Failure) -> tuple[bytes, int | None]:
    """
    The reply to a lookup the broker has answered: C{ok} and the connected
    socket's descriptor, or C{ne <reason>} and none.  The one place the
    wire form of an answer is decided, for both paths.
    """
    if isinstance(answer, Failure):
        return b"ne " + reason_of(answer, told=True).encode("utf-8", "replace"), None
    return OK, answer.fileno()


def reason_of(failure: Failure, told: bool = False) -> str:
    """
    Why C{failure}, for the log; C{told}: what the client's C{ne} says (a
    refusal's L{Refused.told_locally}: the reason, or less).
    """
    if failure.check(Refused):
        return failure.value.told_locally if told else failure.value.reason
    if failure.check(CancelledError):
        return "cancelled"
    return f"internal error: {printable(failure.getErrorMessage())}"


def unexpected(failure: Failure) -> bool:
    """Whether C{failure} is an error to log (not a refusal: that is said)."""
    return not failure.check(Refused)
