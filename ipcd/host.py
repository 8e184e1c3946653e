"""
What a protocol daemon may ask of ipcd: L{IDaemonHost}.

A daemon (L{ipcd.daemons.IProtocolDaemon}) is given the host with each call
(C{connect(broker, ...)}, C{makeService(broker, ...)}); the parameter keeps
the name C{broker} because L{ipcd.broker.Broker} is the host ipcd gives.  A
daemon reads nothing of it but these members (a test scans ipcd's own
daemons for that), so the broker's other parts stay its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    import socket

    from twisted.internet.defer import Deferred

    from ipcd.identity import Peer
    from ipcd.limits import ConnectionLimits
    from ipcd.routes import RemoteURI


class IDaemonHost(Interface):
    """
    ipcd as its protocol daemons see it: configuration, reactor, relays,
    counters, limits, and the two ways in (a remote peer's service, a local
    client's own URI).
    """

    config = Attribute(
        "The L{ipcd.config.Config} in force.  A reload replaces it: read it "
        "when used (per connection), not once at start.  "
        "C{ipcd.daemons.settings_of(config, daemon)} is the daemon's section."
    )
    reactor = Attribute(
        "The reactor ipcd runs on (an L{ipcd.reactors.IHostReactor}): a "
        "daemon's listeners, dials, relay engines and deadlines use it."
    )
    relays = Attribute(
        "The live relayed connections' stats (a C{set} of "
        "L{ipcd.relay.RelayStats}), shown by C{ipcd status}: a relay engine "
        "is given it with each join and removes a relay when it ends."
    )
    counters = Attribute(
        "A C{collections.Counter} of events, shown by C{ipcd status}: a "
        "daemon counts what it refuses or drops (C{'udp datagrams dropped: "
        "...'})."
    )
    own_dials = Attribute(
        "An L{ipcd.owndials.OwnDials}: a daemon dialling a remote daemon "
        "holds its connection's local end there from connect until the far "
        "side has answered, so that a request this ipcd sent itself is not "
        "routed out again (a loop)."
    )
    transports = Attribute(
        "The outbound halves by scheme (L{ipcd.daemons.IOutbound}) that take "
        "precedence over the registry's C{connect}.  A daemon whose outbound "
        "half needs state its service owns (tlsd's certificates and session "
        "cache) registers that half here when its service is built, with "
        "C{setdefault} (a test double given first stays)."
    )

    def limits_for(listener: str) -> ConnectionLimits:
        """
        The connection limits (L{ipcd.limits.ConnectionLimits}) of the
        listener named C{listener} (a daemon's section for its network
        listener, its scheme for C{RUNDIR/SCHEME}), made on first use.
        """

    def open_inbound(service: str, peer: Peer) -> Deferred[socket.socket]:
        """
        A remote C{peer} (an L{ipcd.identity.Peer} with C{ip:} labels) asks
        for the local C{service}: fires with the connected socket to relay
        (the caller owns and closes it), or fails with
        L{ipcd.errors.Refused} whose reason the peer may be told.  The
        C{in} rules apply; a peer never names a route.
        """

    def open_uri(uri: RemoteURI, client: Peer) -> Deferred[socket.socket]:
        """
        A local C{client} of the daemon's C{RUNDIR/SCHEME} control socket
        (upstream's ipcd) names the remote C{uri} itself: as
        L{open_inbound}, under the C{out} rules.
        """
