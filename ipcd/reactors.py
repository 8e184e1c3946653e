"""
The reactors ipcd's modules are given, named by what they use of them.

Twisted splits a reactor into one interface per ability (L{IReactorTime},
L{IReactorFDSet}, ...) and a real reactor provides them all; a module that
needs several is annotated with one of these intersections.  No reactor
declares them: they are names for annotations and documentation, checked
against the running reactor by ipcd's tests (each base provided).  A module
that needs one ability only is annotated with Twisted's interface itself
(L{IReactorTime} for every clock).
"""

from __future__ import annotations

from twisted.internet.interfaces import (
    IReactorCore,
    IReactorFDSet,
    IReactorPluggableNameResolver,
    IReactorSocket,
    IReactorTCP,
    IReactorTime,
    IReactorUDP,
    IReactorUNIX,
)


class IFDReactor(IReactorFDSet, IReactorTime):
    """
    A reactor that raw-socket code registers readers and writers with and
    times on: the relay engines, L{ipcd.sockets}' awaitable socket steps.
    """


class IAdoptingReactor(IReactorSocket, IReactorTime):
    """
    A reactor that adopts connected sockets (C{adoptStreamConnection}) and
    times the protocols it gives them: websocketd's bridges, udpd's streams.
    """


class IHostReactor(
    IReactorCore,
    IReactorTime,
    IReactorTCP,
    IReactorUNIX,
    IReactorUDP,
    IReactorFDSet,
    IReactorSocket,
    IReactorPluggableNameResolver,
):
    """
    The reactor ipcd runs on and gives its daemons
    (L{ipcd.host.IDaemonHost.reactor}): endpoint strings are parsed with it
    (C{serverFromString}), so a daemon may ask it for any of these.
    """
