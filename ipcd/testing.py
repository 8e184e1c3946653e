"""
In-memory fakes of ipcd's parts, for the tests of programs that use ipcd
(as treq's C{treq.testing}).  No reactor is imported; each fake is in a block
of its own below.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.plugin import IPlugin
from zope.interface import implementer

from ipcd.config import boolean
from ipcd.daemons import Flag, IProtocolDaemon, Setting
from ipcd.errors import Refused

# --------------------------------------------------------------------------
# Protocol daemons: FakeProtocolDaemon
# --------------------------------------------------------------------------


@dataclass
class FakeConnect:
    """One call of a L{FakeProtocolDaemon}'s outbound half, to answer."""

    broker: Any
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

    def connect(self, broker: Any, target: Any, client: Any) -> Deferred[Any]:
        def cancel(d: Deferred[Any]) -> None:
            call.cancelled = True

        call = FakeConnect(broker, target, client, Deferred(cancel))
        self.connects.append(call)
        return call.deferred

    def makeService(self, broker: Any, settings: Mapping[str, Any]) -> Any:  # noqa: N802
        return self.service

    def status(self, settings: Mapping[str, Any]) -> Mapping[str, Any]:
        return {f"{self.scheme}_enabled": bool(settings["enabled"])}

    def verify(self, reactor: Any, settings: Mapping[str, Any]) -> None:
        pass

    def hint(self, error: Exception) -> str:
        return f"use --no-{self.scheme}"

    def inbound(self, broker: Any, service: str, peer: Any) -> Deferred[Any]:
        """What the daemon's listener does for a remote C{peer}: ask C{broker}."""
        return broker.open_inbound(service, peer)


# --------------------------------------------------------------------------
# End of: Protocol daemons
# --------------------------------------------------------------------------
