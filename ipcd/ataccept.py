"""
Lookups answered within the accept, on the bare socket, without a transport.

L{ipcd.lookupport.LookupPort} offers each accepted connection to
L{serve_at_accept} first.  A lookup usually is whole in the socket by then
and a local service accepts at once: the answer is then the same as
L{ipcd.lookupprotocol.LookupProtocol} would give (the broker's, through
L{ipcd.lookup.reply_to}), sent in one C{sendmsg}.  Anything that has to
wait (a partial lookup, a peer near its limits, a broker answer still to
come, a full socket) is handed to the protocol with what was done so far.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from ipcd.handoff import scm_rights
from ipcd.identity import local_peer
from ipcd.limits import ConnectionLimits
from ipcd.lookup import Answer, reply_to, serve_lookup, unexpected
from ipcd.wire import HEADER

# A lookup is a few hundred bytes; one read this long that comes back full
# is left to the protocol (more may follow).
_READ_AT_ONCE = 4096
_HEADER_SIZE = HEADER.size
_DONTWAIT = socket.MSG_DONTWAIT


def serve_at_accept(
    broker: Any,
    limits: ConnectionLimits | None,
    log: Logger,
    skt: socket.socket,
    close_later: Callable[[socket.socket], None] = socket.socket.close,
) -> Callable[[Any], None] | None:
    """
    Serve C{skt}, just accepted, for C{broker} when nothing has to wait: its
    whole lookup is in the socket, it is within C{limits} with room to
    spare, and the broker answers at once.  C{None} when it was answered
    and closed (answered C{ok}: given to C{close_later}, as the descriptor
    may be in flight still); else how to carry on once a
    L{ipcd.lookupprotocol.LookupProtocol} has the connection, which answers
    as it would have from the start.  Unexpected failures are logged on
    C{log}, as the protocol logs them.
    """
    try:
        data = skt.recv(_READ_AT_ONCE, _DONTWAIT)
    except OSError:
        return _carry_on(b"")  # nothing yet: the protocol waits for it
    size = len(data)
    if size < _HEADER_SIZE or size >= _READ_AT_ONCE:
        return _carry_on(data)
    (length,) = HEADER.unpack_from(data)
    if size != _HEADER_SIZE + length or length > broker.config.max_message_size:
        return _carry_on(data)
    try:
        client = local_peer(skt, getattr(broker, "labels", None))
    except OSError:
        return _carry_on(data)
    # Served and gone before anything else runs, so it holds no place in
    # the limits; close to them, the protocol decides.
    if limits is not None and not limits.has_room(f"uid:{client.uid}", spare=1):
        return _carry_on(data)
    answer = serve_lookup(broker, data[_HEADER_SIZE:], client)
    if isinstance(answer, Deferred):
        return _carry_on(b"", answer)
    failed = isinstance(answer, Failure)
    reply, fd = reply_to(answer)
    if fd is not None:
        # O_NONBLOCK belongs to the shared open file: clients get a blocking
        # socket (see LookupProtocol._reply).
        answer.setblocking(True)
    try:
        sent = skt.sendmsg([reply], scm_rights(fd), _DONTWAIT)
    except BlockingIOError:
        return _carry_on(b"", answer)  # the protocol answers, as usual
    except OSError:
        sent = len(reply)  # the client is gone: nobody to answer
    if failed:
        if unexpected(answer):
            log.failure("lookup for {who} failed", answer, who=str(client))
    else:
        answer.close()
    if sent < len(reply):
        return _carry_on(b"", None, reply[sent:])
    broker.counters["lookups answered at accept"] += 1
    if fd is not None and sent > 0:
        close_later(skt)
    else:
        skt.close()
    return None


def _carry_on(
    data: bytes, answer: Answer = None, rest: bytes = b""
) -> Callable[[Any], None]:
    """
    What a L{ipcd.lookupprotocol.LookupProtocol} does after
    L{serve_at_accept} stopped: read C{data} as received, give an C{answer}
    (the broker's, given already), or send the C{rest} of an answer sent in
    part.
    """

    def resume(protocol: Any) -> None:
        if protocol._answered:  # refused at its limits: nothing to answer
            if isinstance(answer, Deferred):
                # Nobody waits for it: its error (the cancellation) is not
                # an unhandled one, and a socket it may still give is closed.
                answer.addBoth(_let_go)
                answer.cancel()
            elif isinstance(answer, socket.socket):
                answer.close()
            return
        if rest:
            protocol.send_rest(rest)
        elif answer is not None:
            protocol.setTimeout(None)
            protocol.answer(answer)
        elif data:
            protocol.dataReceived(data)

    return resume


def _let_go(result: Any) -> None:
    """An answer nobody waits for any more: a socket closed, errors dropped."""
    if isinstance(result, socket.socket):
        result.close()
