"""
In-memory fakes for testing code built on ipcd, as C{treq.testing} does for
treq: no socket listened on, no reactor running, time on a
C{MemoryReactorClock}.  Each part of ipcd keeps its fakes in a block of its
own below.
"""

from __future__ import annotations

import os
import socket
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime, IUNIXTransport
from twisted.internet.testing import (
    MemoryReactorClock,
    StringTransportWithDisconnection,
)
from twisted.plugin import IPlugin
from zope.interface import implementer

from ipcd.checkers import boolean
from ipcd.config import Config
from ipcd.daemons import Flag, IProtocolDaemon, Setting
from ipcd.errors import Refused
from ipcd.host import IDaemonHost
from ipcd.identity import Peer
from ipcd.lookup import ILookupBroker
from ipcd.lookupprotocol import LookupFactory, LookupProtocol
from ipcd.reactors import IHostReactor
from ipcd.relay import IRelayEngine, Join, RelayEngine, RelayStats, ended

# ---------------------------------------------------------------------------
# Lookups: a fake broker behind ipcd's lookup protocol, and a UNIX transport
# that records the descriptors handed over.
# ---------------------------------------------------------------------------


@implementer(ILookupBroker)
class FakeLookupBroker:
    """
    An L{ILookupBroker} for L{LookupFactory}: answers each lookup C{ok}
    with one end of a new socket pair (the other end is appended to
    C{peers}, for the test to talk through), or, after L{refuse}, C{ne
    <reason>}; after L{hold}, leaves lookups pending in C{pending} until
    the test fires them (or the client leaves: C{cancelled}).

    Every lookup is recorded in C{lookups} as C{(payload, client)}: parse
    a payload with L{ipcd.routes.parse_lookup}.  C{config} defaults to a
    default L{Config}; C{reactor} (the lookup deadline's clock) to a new
    C{MemoryReactorClock}.  L{close} closes the peers' ends.
    """

    def __init__(
        self, config: Config | None = None, clock: IReactorTime | None = None
    ) -> None:
        self.config = config if config is not None else Config(rundir="/nonexistent")
        self.reactor = clock if clock is not None else MemoryReactorClock()
        self.counters: Counter[str] = Counter()
        self.lookups: list[tuple[bytes, Peer]] = []
        self.peers: list[socket.socket] = []
        self.pending: list[Deferred[socket.socket]] = []
        self.cancelled: list[Deferred[socket.socket]] = []
        self._refusal: str | None = None
        self._holding = False

    def refuse(self, reason: str) -> None:
        """Answer the next lookups C{ne <reason>}."""
        self._refusal, self._holding = reason, False

    def hold(self) -> None:
        """Leave the next lookups unanswered, in C{pending}."""
        self._refusal, self._holding = None, True

    def accept(self) -> None:
        """Answer the next lookups C{ok} (the default)."""
        self._refusal, self._holding = None, False

    def connected(self) -> socket.socket:
        """A socket to hand over; its other end joins C{peers}."""
        ours, theirs = socket.socketpair()
        self.peers.append(ours)
        return theirs

    def open(self, payload: bytes, client: Peer) -> Deferred[socket.socket]:
        self.counters["lookups"] += 1
        self.lookups.append((payload, client))
        if self._refusal is not None:
            return fail(Refused(self._refusal))
        if self._holding:
            d: Deferred[socket.socket] = Deferred(self.cancelled.append)
            self.pending.append(d)
            return d
        return succeed(self.connected())

    def close(self) -> None:
        for sock in self.peers:
            sock.close()


@implementer(IUNIXTransport)
class FakeUNIXTransport(StringTransportWithDisconnection):
    """
    A C{StringTransport} for a UNIX socket: C{sendFileDescriptor} keeps a
    duplicate of each descriptor (as the kernel passes one) in C{handed},
    as a socket object the test reads and writes and must close (L{close}
    does); C{loseConnection} runs the protocol's C{connectionLost}.

    C{handle} is what C{getHandle()} returns: a connected AF_UNIX socket
    makes ipcd read its peer's credentials (this process's, through a
    socket pair); C{None} leaves the client unknown.
    """

    def __init__(self, handle: socket.socket | None = None) -> None:
        super().__init__()
        self.handle = handle
        self.handed: list[socket.socket] = []

    def getHandle(self) -> Any:  # noqa: N802 (Twisted's name)
        return self.handle

    def sendFileDescriptor(self, fd: int) -> None:  # noqa: N802 (Twisted's name)
        self.handed.append(socket.socket(fileno=os.dup(fd)))

    def loseConnection(self) -> None:  # noqa: N802 (Twisted's name)
        self.disconnecting = True
        super().loseConnection()

    def abortConnection(self) -> None:  # noqa: N802 (Twisted's name)
        self.loseConnection()

    def close(self) -> None:
        for sock in self.handed:
            sock.close()


def lookup_connection(
    factory: LookupFactory, transport: FakeUNIXTransport | None = None
) -> tuple[LookupProtocol, FakeUNIXTransport]:
    """
    A client connected to C{factory} (a L{LookupFactory}) over C{transport}
    (a new L{FakeUNIXTransport} by default): feed it C{protocol.dataReceived
    (ipcd.wire.encode(payload))}, read C{transport.value()} and
    C{transport.handed}.
    """
    transport = transport if transport is not None else FakeUNIXTransport()
    protocol = factory.buildProtocol(None)
    transport.protocol = protocol
    protocol.makeConnection(transport)
    return protocol, transport


# --------------------------------------------------------------------------
# Protocol daemons: FakeProtocolDaemon
# --------------------------------------------------------------------------


@dataclass
class FakeConnect:
    """One call of a L{FakeProtocolDaemon}'s outbound half, to answer."""

    broker: IDaemonHost
    target: Any
    client: Any
    deferred: Deferred[socket.socket]
    cancelled: bool = False

    def succeed(self, sock: Any) -> None:
        """Answer with C{sock} (a socket, or anything the test hands over)."""
        self.deferred.callback(sock)

    def refuse(self, reason: str) -> None:
        """Answer C{ne <reason>}."""
        self.deferred.errback(Refused(reason))


@implementer(IPlugin, IProtocolDaemon)
@dataclass(eq=False)
class FakeProtocolDaemon:
    """
    A scriptable protocol daemon for C{scheme} (default C{fake}): section
    C{[SCHEMEd]} with an C{enabled} key (default C{enabled}), options
    C{--SCHEME}/C{--no-SCHEME}, a status line C{SCHEME_enabled}.  Its
    outbound half records each call in L{connects} and answers when the test
    says (L{FakeConnect.succeed}, L{FakeConnect.refuse}); a cancelled one
    (the broker's connect deadline) is marked.  C{service}, if given, is
    what L{makeService} returns; L{inbound} asks a broker for a service as a
    remote peer of its listener would.

    Register it with C{ipcd.daemons.Registry([fake])}, given to
    C{load_config(..., registry=...)} or C{Config(registry=...)}.
    """

    scheme: str = "fake"
    enabled_by_default: bool = True
    service: Any = None
    connects: list[FakeConnect] = field(default_factory=list)

    @property
    def section(self) -> str:
        return f"{self.scheme}d"

    @property
    def settings(self) -> tuple[Setting, ...]:
        return (Setting("enabled", boolean, self.enabled_by_default),)

    @property
    def flags(self) -> tuple[Flag, ...]:
        return (
            Flag(self.scheme, f"Run {self.section}.", lambda _: {"enabled": True}),
            Flag(
                f"no-{self.scheme}",
                f"Do not run {self.section}.",
                lambda _: {"enabled": False},
            ),
        )

    restart_keys = ("enabled",)

    def enabled(self, settings: Mapping[str, Any]) -> bool:
        return bool(settings["enabled"])

    def connect(self, broker: IDaemonHost, target: Any, client: Any) -> Deferred[Any]:
        def cancel(d: Deferred[Any]) -> None:
            call.cancelled = True

        call = FakeConnect(broker, target, client, Deferred(cancel))
        self.connects.append(call)
        return call.deferred

    def makeService(self, broker: IDaemonHost, settings: Mapping[str, Any]) -> Any:  # noqa: N802
        return self.service

    def status(self, settings: Mapping[str, Any]) -> Mapping[str, Any]:
        return {f"{self.scheme}_enabled": bool(settings["enabled"])}

    def verify(self, reactor: IHostReactor, settings: Mapping[str, Any]) -> None:
        pass

    def hint(self, error: Exception) -> str:
        return f"use --no-{self.scheme}"

    def inbound(self, broker: IDaemonHost, service: str, peer: Any) -> Deferred[Any]:
        """What the daemon's listener does for a remote C{peer}: ask C{broker}."""
        return broker.open_inbound(service, peer)


# --------------------------------------------------------------------------
# End of: Protocol daemons
# --------------------------------------------------------------------------


# --- Relays: a fake relay engine -----------------------------------------
# One relay a MemoryRelays was asked for, as it was asked (a, b, stats,
# greeting, early, idle_timeout).
JoinedRelay = Join


@implementer(IRelayEngine)
class MemoryRelays(RelayEngine):
    """
    A relay engine that relays nothing: it records each join (in
    C{joined}, the live ones in C{live}), keeps the stats in their registry
    and counts C{early} as forward, as a real engine does (its C{join} is
    theirs); L{end} ends a relay as if it had closed (registry,
    C{on_end}).  C{closed} lists the ends it was told to close (by L{end},
    C{abort}, C{stop} or a refused join); it calls C{close()} on those that
    have one.
    """

    def __init__(self) -> None:
        self.joined: list[JoinedRelay] = []
        self.live: dict[RelayStats, JoinedRelay] = {}
        self.closed: list[Any] = []
        self.running = False
        self.failure: str | None = None

    def start(self) -> None:
        self.running = True

    def stop(self) -> None:
        self.running = False
        for stats in list(self.live):
            self.end(stats)

    def _accepting(self) -> bool:
        return self.running

    def _refuse(self, join: JoinedRelay) -> None:
        self.joined.append(join)
        self._close(join)
        ended(join.stats)

    def _relay(self, join: JoinedRelay) -> None:
        self.joined.append(join)
        self.live[join.stats] = join

    def abort(self, stats: RelayStats) -> None:
        self.end(stats)

    def buffered(self) -> int:
        return 0

    def end(self, stats: RelayStats) -> None:
        """The relay that C{stats} counts ends (both its ends are closed)."""
        relay = self.live.pop(stats, None)
        if relay is not None:
            self._close(relay)
            ended(stats)

    def _close(self, relay: JoinedRelay) -> None:
        for each in (relay.a, relay.b):
            self.closed.append(each)
            close = getattr(each, "close", None)
            if close is not None:
                close()


# --- End of relays --------------------------------------------------------
