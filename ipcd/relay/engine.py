"""
What a relay engine is (L{IRelayEngine}), what every engine's C{join} does
first (L{RelayEngine}), and what a codec between a socket and its relay is
(L{ICodec}: TLS is one, in L{ipcd.daemons.tls.relay}).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zope.interface import Attribute, Interface

from ipcd.relay.stats import RelayStats, began


class IRelayEngine(Interface):
    """
    Runs relays: joins pairs of connections and owns them until they end.
    Every method is called in the reactor's thread.
    """

    def start() -> None:
        """Start relaying (before the first L{join})."""

    def stop() -> None:
        """
        Close every relay held, without blocking; later joins are refused
        (their connections closed, their stats ended).
        """

    def join(
        a: Any,
        b: Any,
        stats: RelayStats | None = None,
        greeting: bytes = b"",
        early: bytes = b"",
        idle_timeout: float = 0.0,
    ) -> RelayStats:
        """
        Relay between C{a} (the peer that asked: side A) and C{b} (the
        service: side B), which the engine now owns and closes.  What they
        are depends on the engine: connected sockets or secured ones
        (L{SocketRelays}), L{RelayProtocol}s (L{TransportRelays}).
        C{greeting} goes to A before anything else (not counted); C{early},
        bytes A sent before the join, goes to B first and counts as
        C{forward}.  A relay on which no byte moves either way for
        C{idle_timeout} seconds is closed (0: never).  C{stats} (a new
        L{RelayStats} if None) is added to its registry until the relay
        ends; returns it.
        """

    def abort(stats: RelayStats) -> None:
        """End the relay that C{stats} counts now, closing both sides."""

    def buffered() -> int:
        """Bytes the relays hold, read but not yet delivered."""

    failure = Attribute(
        "None while the engine works; once it has failed, why (a string):"
        " it closed its relays and refuses new ones."
    )


class ICodec(Interface):
    """
    What stands between one socket of a L{SocketRelays} relay and the bytes
    relayed (TLS: records on the socket, plaintext in the relay).  Called a
    batch at a time (a read, a write), never per byte, in the reactor's
    thread.  An error that ends the relay is raised: an C{OSError} (a reset
    ends it quietly) or L{RelayEnded} (logged, with why).
    """

    def read(side: Any) -> int:
        """
        Read what C{side}'s socket holds and decode it into the engine's
        buffer: how many bytes of it there are (0: none yet).  At the
        stream's own end (a close_notify) it sets C{side.eof}.
        """

    def made() -> Any:
        """
        What the last read made the codec answer on the same socket (bytes
        or a view of a shared buffer; empty: nothing).
        """

    def seal(data: memoryview) -> memoryview:
        """
        C{data} encoded for the socket (valid until the codec's next call:
        it may be a view of a shared buffer).
        """

    def close() -> Any:
        """The codec's own EOF for the socket (a close_notify), encoded, as L{made}."""

    plaintext = Attribute(
        "True when the socket carries the relay's bytes as they are, both"
        " ways, its own records apart (kernel TLS: the kernel seals and opens"
        " them): the engine then moves them with splice(2), never through"
        " ipcd, and calls L{control} where a splice out of it is refused."
        " False: every byte goes through L{read} and L{seal}."
    )

    def control(side: Any) -> bool:
        """
        Only for a C{plaintext} codec: a splice(2) out of C{side}'s socket
        was refused (EINVAL), as it is when the next record is not data.
        Take that record as L{read} would (its stream's end sets
        C{side.eof}; an error is raised); False if data is next after all
        (splice refused for another reason: the engine copies instead).
        """


class RelayEnded(Exception):
    """A codec ended the relay (a TLS error): logged, with why."""


@dataclass
class Join:
    """One relay an engine was asked for, as it was asked."""

    a: Any
    b: Any
    stats: RelayStats
    greeting: bytes
    early: bytes
    idle_timeout: float


class RelayEngine:
    """
    The start every engine's C{join} shares: a join refused (the engine
    stopped, or failed) closes its ends and ends its stats; one accepted is
    in its registry, with C{early} counted as forward, before the engine
    relays it.  An engine says whether it is C{_accepting}, and what
    C{_refuse} and C{_relay} do with a L{Join}.
    """

    failure: str | None = None

    def join(
        self,
        a: Any,
        b: Any,
        stats: RelayStats | None = None,
        greeting: bytes = b"",
        early: bytes = b"",
        idle_timeout: float = 0.0,
    ) -> RelayStats:
        stats = stats if stats is not None else self._new_stats(a)
        join = Join(a, b, stats, greeting, early, idle_timeout)
        if not self._accepting():
            self._refuse(join)
            return stats
        began(stats)
        stats.forward += len(early)
        self._relay(join)
        return stats

    def _new_stats(self, a: Any) -> RelayStats:
        """The stats of a relay joined without any."""
        return RelayStats()

    def _accepting(self) -> bool:
        raise NotImplementedError

    def _refuse(self, join: Join) -> None:
        """Close the ends of a join refused; its stats end."""
        raise NotImplementedError

    def _relay(self, join: Join) -> None:
        """Relay a join accepted (its stats already in their registry)."""
        raise NotImplementedError
