"""
One inbound handshake, whatever the daemon, without I/O: a remote peer's
request for a local service, from its first byte to the relay or the
refusal.  Events go in (methods), actions come out (lists of the small
records below); no reactor, no socket, no broker: the time is passed in,
and the daemon's adapter does what the actions say on its own wire.

    tcpd, tlsd    a libipc request on a stream (L{Framed}, L{Sniffed}):
                  L{InboundHandshake.received}
    tlsd          first a TLS handshake (C{layer="TLS"}): L{secured}
    websocketd    the HTTP upgrade's path: L{InboundHandshake.asked}
    udpd          a HELLO's service: L{InboundHandshake.request}

The life of each: the request is read and checked (a name of at most 255
bytes, ASCII, the whole handshake within L{MAX_HANDSHAKE} bytes and its
deadline); L{Ask}: the adapter asks the broker (C{open_inbound}: the admin's
redirections and routes only, C{in} rules, others' permission) and says
what came back (L{answered}: L{opened} or L{failed}); then L{Join} with the
daemon's C{ok}, or L{Refuse} with its C{ne <reason>}.  Bytes the peer sends
meanwhile are held for the service, up to a read's worth (then L{Pause}).
A peer that goes (L{lost}) is answered nothing, and what was asked for it
is cancelled or closed.

A L{Framing} is how a daemon frames the request and its answers; the
libipc ones are here, websocketd's and udpd's beside their daemons.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.python.failure import Failure

from ipcd import wire
from ipcd.errors import Refused
from ipcd.identity import Peer

OK = b"ok"
# The longest handshake we wait for: a framed name (255) or a control URI.
MAX_HANDSHAKE = 4096
# The longest service name a peer may ask for.
MAX_NAME = 255
# Bytes held for the service while the request is served: a relay's read
# (L{ipcd.relay.READ_SIZE}).
MAX_EARLY = 256 * 1024


def framed(buffer: bytes, limit: int) -> tuple[bytes, bytes] | None:
    """
    C{(request, rest)} once C{buffer} holds a whole framed message, None
    until then; L{Refused} when its header announces more than C{limit}.
    """
    if len(buffer) < wire.HEADER.size:
        return None
    (size,) = wire.HEADER.unpack_from(buffer)
    if size > limit:
        raise Refused(f"request of {size} bytes is too long")
    end = wire.HEADER.size + size
    if len(buffer) < end:
        return None
    return buffer[wire.HEADER.size : end], buffer[end:]


def request_text(request: bytes) -> str:
    """The request as text; L{Refused} when it is not ASCII."""
    try:
        return request.decode("ascii")
    except UnicodeDecodeError:
        raise Refused("request is not ASCII") from None


class Framing(Protocol):
    """How a daemon reads a request off its stream and frames its answers."""

    def parse(self, buffer: bytes) -> tuple[bytes, bytes] | None:
        """C{(request, rest)} once complete, else None; or L{Refused}."""

    def ok(self) -> Any:
        """The answer that accepts (or what the adapter completes into it)."""

    def no(self, reason: str, internal: bool = False) -> Any:
        """The answer that refuses, for C{reason}; C{internal}: ipcd's fault."""


class Framed:
    """libipc's framed request and answers: a service name."""

    limit = MAX_NAME

    def parse(self, buffer: bytes) -> tuple[bytes, bytes] | None:
        return framed(buffer, self.limit)

    def ok(self) -> bytes:
        return wire.encode(OK)

    def no(self, reason: str, internal: bool = False) -> bytes:
        return wire.encode(b"ne " + reason.encode("utf-8", "replace"))


class FramedURI(Framed):
    """Upstream's control protocol: a framed URI."""

    limit = MAX_HANDSHAKE


class Sniffed(Framed):
    """
    tcpd's: upstream's raw name (the first read is all of it) or a framed
    one; the answers are in the request's form, raw until it is known.
    """

    framed = False

    def parse(self, buffer: bytes) -> tuple[bytes, bytes] | None:
        # A NUL first byte can only be a frame header (names have no NUL).
        self.framed = buffer[:1] == b"\0"
        if self.framed:
            return framed(buffer, self.limit)
        return buffer, b""

    def ok(self) -> bytes:
        return super().ok() if self.framed else OK

    def no(self, reason: str, internal: bool = False) -> bytes:
        if self.framed:
            return super().no(reason)
        return b"ne " + reason.encode("utf-8", "replace")


# The actions.


@dataclass(slots=True)
class Deadline:
    """Be woken (L{InboundHandshake.tick}) C{after} seconds; None: never."""

    after: float | None


@dataclass(slots=True)
class Ask:
    """Ask the broker for what C{text} names, on the peer's behalf."""

    text: str


@dataclass(slots=True)
class Join:
    """Relay the peer and C{sock}: C{greeting} to the peer, C{early} on."""

    sock: Any
    greeting: Any
    early: bytes


@dataclass(slots=True)
class Refuse:
    """Send the peer C{answer} (the daemon's refusal), then close."""

    answer: Any
    reason: str


@dataclass(slots=True)
class Abort:
    """Drop the connection, answering nothing (its layer never got going)."""


@dataclass(slots=True)
class Pause:
    """Stop reading the peer: held bytes are at their bound."""


@dataclass(slots=True)
class Cancel:
    """The peer went while the broker was asked: cancel the asking."""


@dataclass(slots=True)
class Discard:
    """The peer went before its service came: close C{sock}."""

    sock: Any


@dataclass(slots=True)
class Failed:
    """A failed handshake: count it under C{counter}, log C{format}."""

    counter: str
    format: str
    fields: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Unexpected:
    """Asking failed otherwise than with a refusal: log C{error}."""

    error: Any


# Actions without news in them: made once (a handshake costs few objects).
STOP, PAUSE, ABORT, CANCEL = Deadline(None), Pause(), Abort(), Cancel()

# What a broker's answer is when it is not a socket.
_ERRORS = (BaseException, Failure)

# The states.
SECURING, READING, ASKING, DONE, GONE = range(5)


class InboundHandshake:
    """
    One peer's handshake.  C{who} is the peer (its labels for the policy);
    C{timeout} (seconds, or None) bounds the whole handshake from C{now};
    C{layer} names a handshake of the transport's own that comes first
    (C{"TLS"}): until L{secured}, nothing is read.  C{remote}: a remote
    peer, told only a refusal's L{Refused.public} (a local client, on a
    daemon's control socket, is told the reason).
    """

    def __init__(
        self,
        who: Peer,
        framing: Framing,
        now: float = 0.0,
        timeout: float | None = None,
        layer: str = "",
        remote: bool = True,
    ) -> None:
        self.who = who
        self.remote = remote
        self.framing = framing
        self.layer = layer
        self.state = SECURING if layer else READING
        self.requested = ""
        self._timeout = timeout
        self._deadline = now + timeout if timeout else None
        self._buffer = b""
        self._early: list[bytes] = []
        self._held = 0

    def started(self) -> list[Any]:
        """The connection is up: the deadline to keep."""
        return [Deadline(self._timeout)] if self._deadline is not None else []

    @property
    def securing(self) -> bool:
        """Whether the transport's own handshake is still under way."""
        return self.state == SECURING

    def secured(self, who: Peer) -> list[Any]:
        """The transport's handshake is done; C{who} is the peer as it showed."""
        self.who = who
        if self.state != SECURING:
            return []
        self.state = READING
        # What came before (no TLS stack delivers any): read now, as the peer.
        return self.received(b"") if self._buffer else []

    def received(self, data: bytes) -> list[Any]:
        """Bytes from the peer's stream."""
        if self.state != READING:
            if self.state == SECURING and len(self._buffer) <= MAX_HANDSHAKE:
                self._buffer += data  # the request waits for the peer's name
            return self._hold(data)
        self._buffer += data
        try:
            parsed = self.framing.parse(self._buffer)
        except Refused as e:
            return self.refuse(e.reason)
        if parsed is None:
            if len(self._buffer) > MAX_HANDSHAKE:
                return self.refuse("handshake too long")
            return []
        request, rest = parsed
        self._buffer = b""
        try:
            asking = self.asked(request.decode("ascii"))
        except UnicodeDecodeError:
            return self.refuse("request is not ASCII")
        if not rest:
            return asking
        # What came after the request is the service's: held before asking
        # (the answer may come at once).
        return [*self._hold(rest), *asking]

    def request(self, request: bytes) -> list[Any]:
        """A whole request, as bytes (a stream's, a datagram's)."""
        try:
            text = request.decode("ascii")  # (request_text's, inlined)
        except UnicodeDecodeError:
            return self.refuse("request is not ASCII")
        return self.asked(text)

    def asked(self, text: str) -> list[Any]:
        """A whole request, as text (an HTTP path's)."""
        if self.state not in (SECURING, READING):
            return []
        self.state = ASKING
        self.requested = text
        ask = Ask(text)
        return [STOP, ask] if self._deadline is not None else [ask]

    def _hold(self, data: bytes) -> list[Any]:
        if self.state != ASKING:
            return []
        self._early.append(data)
        self._held += len(data)
        # Bounded: the rest waits in the kernel for the relay to read it.
        return [PAUSE] if self._held >= MAX_EARLY else []

    def answered(self, result: Any) -> list[Any]:
        """
        The broker's answer, whatever it is: a socket (L{opened}), or an
        exception or a Twisted C{Failure} (L{failed}).
        """
        if isinstance(result, _ERRORS):
            return self.failed(result)
        if self.state != ASKING:
            return [Discard(result)]
        self.state = DONE  # (opened's, inlined: one call per connection)
        early, self._early = b"".join(self._early), []
        return [Join(result, self.framing.ok(), early)]

    def opened(self, sock: Any) -> list[Any]:
        """The broker connected the service: C{sock}."""
        if self.state != ASKING:
            return [Discard(sock)]
        self.state = DONE
        early, self._early = b"".join(self._early), []
        return [Join(sock, self.framing.ok(), early)]

    def failed(self, error: Any) -> list[Any]:
        """
        Asking failed with C{error}: a L{Refused} (or a Twisted C{Failure}
        of one) is a refusal, anything else unexpected.
        """
        value = error.value if isinstance(error, Failure) else error
        if isinstance(value, Refused):
            return self.refused(value.reason, value.public)
        return self.broke(error)

    def refused(self, reason: str, public: str | None = None) -> list[Any]:
        """The broker refused, for C{reason} (C{public}: what a peer is told)."""
        return self.refuse(reason, public=public) if self.state == ASKING else []

    def broke(self, error: Any) -> list[Any]:
        """Asking the broker failed unexpectedly (C{error}, for the log)."""
        if self.state != ASKING:
            return []
        return [Unexpected(error), *self.refuse("internal error", internal=True)]

    def refuse(
        self, reason: str, internal: bool = False, public: str | None = None
    ) -> list[Any]:
        """
        Refuse the peer now, for C{reason} (the adapter's own, or ours);
        a remote peer is told C{public} when there is one: the broker's
        reasons name local paths, rules, uids (the decision line has them).
        Ours name nothing but the peer's own bytes.
        """
        if self.state in (DONE, GONE):
            return []
        stop = [STOP] if self.state != ASKING and self._deadline else []
        self.state = DONE
        told = public if public and self.remote else reason
        return [*stop, Refuse(self.framing.no(told, internal), reason)]

    def tick(self, now: float) -> list[Any]:
        """The time is C{now}: refuse if the handshake is past its deadline."""
        if self._deadline is None or now < self._deadline:
            return []
        who = {"who": str(self.who)}
        if self.state == SECURING:
            self.state = DONE
            layer = self.layer
            said = f"dropping {{who}}: no {layer} handshake in time"
            return [Failed(f"{layer} handshakes timed out", said, who), ABORT]
        if self.state != READING:
            return []
        said = "dropping {who}: no request in time"
        failed = Failed("handshakes timed out", said, who)
        return [failed, *self.refuse("handshake timed out")]

    def lost(self) -> list[Any]:
        """The peer went."""
        state, self.state = self.state, GONE
        self._early = []
        actions: list[Any] = []
        if self._deadline is not None and state in (SECURING, READING):
            actions.append(STOP)
        if state == ASKING:
            actions.append(CANCEL)
        return actions
