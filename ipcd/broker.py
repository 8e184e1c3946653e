"""
ipcd itself: the resolver behind the lookup protocol on C{RUNDIR/ipc}.

Where a lookup goes is decided by the pure L{ipcd.resolution}.  L{Broker}
polices and connects targets, locally (as the client could itself:
L{ipcd.access}; never one of ipcd's own sockets: L{ipcd.ownsockets}) or
through a protocol daemon, and logs each decision (L{ipcd.decisionlog}).  The
protocol that speaks to clients is L{ipcd.lookupprotocol}'s, and
L{ipcd.ataccept} answers within the accept; their names are still
importable from here.
"""

from __future__ import annotations

import os
import socket
import stat
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ipcd.access import (
    CLIENT,
    GRANT,
    OTHERS,
    REMOTE,
    AccessDenied,
    Credentials,
    OpenedSocket,
    one_name,
    open_socket,
)
from ipcd.config import Config
from ipcd.daemons import BoundOutbound, IOutbound, off_reason, settings_of
from ipcd.daemons.external import ExternalDaemon
from ipcd.decisionlog import DecisionLog, Request
from ipcd.errors import NO_SUCH_SERVICE, REFUSED, Refused
from ipcd.host import IDaemonHost
from ipcd.identity import LabelCache, Peer
from ipcd.limits import ConnectionLimits, own_uid_key
from ipcd.logs import printable
from ipcd.lookup import (
    Answer,
    ILookupBroker,
    as_deferred,
    reason_of,
    serve_lookup,
)
from ipcd.lookupprotocol import LookupFactory, LookupProtocol
from ipcd.metrics import NO_METRICS, IMetrics
from ipcd.names import (
    InvalidServiceName,
    socket_path,
    validate_service_name,
)
from ipcd.owndials import OwnDials
from ipcd.ownsockets import OwnSockets
from ipcd.policy import Decision, decide, find_grant, names_exactly
from ipcd.resolution import (
    LocalTarget,
    RemoteTarget,
    Target,
    destination_labels,
    direction_of,
    plan,
    resolve,
)
from ipcd.routes import (
    RemoteURI,
    RouteError,
    parse_lookup,
)
from ipcd.sockets import (
    connect_unix,
    connect_unix_now,
    with_deadline,
)
from ipcd.srvroutes import SrvRoutes

__all__ = [
    "Answer",
    "Broker",
    "ILookupBroker",
    "LookupFactory",
    "LookupProtocol",
    "as_deferred",
    "serve_lookup",
]

# Lookup payloads whose plan (and requests whose decision) is kept; past
# this many, all are forgotten.
_MAX_PLANS = 256
# Only payloads up to this long are kept as keys (a lookup is usually a few
# hundred bytes): so the cache holds at most 1 MiB of them, however long the
# lookups a client sends (up to max_message_size each).
_MAX_PLANNED_PAYLOAD = 4096


def _keep_bounded(store: dict[Any, Any], key: Any, value: Any) -> None:
    """C{store[key] = value}, the store emptied first when it holds L{_MAX_PLANS}."""
    if len(store) >= _MAX_PLANS:
        store.clear()
    store[key] = value


@implementer(ILookupBroker, IDaemonHost)
class Broker:
    """
    Resolves and connects: for local clients through L{open}, for remote
    peers (arriving through a protocol daemon's listener) through L{open_inbound}.
    """

    log = Logger()

    def __init__(
        self,
        config: Config,
        reactor: Any,
        transports: Mapping[str, IOutbound] | None = None,
        metrics: IMetrics = NO_METRICS,
    ) -> None:
        self.reactor = reactor
        self.metrics = metrics
        # The class's Logger bound to this broker once (Logger.__get__ makes
        # a new one on every access, and one event is logged per lookup).
        self.log = self.log
        # Outbound halves by scheme that take precedence over the protocol
        # daemons of the registry (config.registry): test doubles, say.
        self.transports: dict[str, IOutbound] = dict(transports or {})
        # Live relayed connections (ipcd.relay.RelayStats), for status (and
        # for the metrics, which keep what ended ones carried).
        self.relays: set[Any] = metrics.relays()
        self.counters: Counter[str] = Counter()
        # Each listener's connection limits, by listener name.
        self.limits: dict[str, ConnectionLimits] = {}
        self.own_sockets = OwnSockets(lambda: self._config, self.transports)
        self._plans: dict[bytes, tuple[Config, str, Any]] = {}
        # Targets of remote peers' names and of control URIs that connected,
        # with their configuration: the same request asked again has the
        # same target, so its decision line's fields are found again (the
        # decision log knows targets by identity, as the plans' are).
        self._targets: dict[str | RemoteURI, tuple[Config, Target]] = {}
        self.decision_log = DecisionLog(self.log)
        self._decisions: dict[Any, Decision] = {}
        # Decisions by value: requests decided alike for other labels (a
        # peer's own ip: label) share one, so the decision log finds their
        # line again (it knows decisions by identity too).
        self._verdicts: dict[Decision, Decision] = {}
        # Local clients' identity labels, by uid and gid.
        self.labels = LabelCache(config.label_cache_max_age)
        # Routes to DNS SRV owners: resolved, cached, dialed in turn.
        self.srv = SrvRoutes(reactor, counters=self.counters)
        # Connections the protocol daemons are dialling (ipcd.owndials).
        self.own_dials = OwnDials()
        self.config = config

    @property
    def config(self) -> Config:
        return self._config

    @config.setter
    def config(self, config: Config) -> None:
        # A reload's limits apply to new connections at once, and a reload
        # shows group changes at once.
        self._config = config
        # Emptied, not only outdated: an entry would keep its whole old
        # configuration alive until its payload came again.
        self._plans.clear()
        self._decisions.clear()
        self._verdicts.clear()
        self._targets.clear()
        self.labels.max_age = config.label_cache_max_age
        self.labels.clear()
        self.own_sockets.reconfigured()
        for limits in self.limits.values():
            limits.max_total = config.max_connections
            limits.max_per_peer = config.max_connections_per_peer

    def limits_for(self, listener: str) -> ConnectionLimits:
        """The connection limits of C{listener} (made on first use)."""
        if listener not in self.limits:
            self.limits[listener] = ConnectionLimits(
                listener,
                self.config.max_connections,
                self.config.max_connections_per_peer,
                self.reactor,
                self.counters,
                exempt=own_uid_key(),
            )
        return self.limits[listener]

    def open(self, payload: bytes, client: Peer) -> Deferred[socket.socket]:
        """Serve one lookup payload for a local client."""
        return as_deferred(self.open_now(payload, client))

    def open_now(self, payload: bytes, client: Peer) -> Answer:
        """
        L{open}, answered at once when nothing has to wait (a local
        service's socket accepting at once): the connected socket, or a
        L{Failure} (L{Refused} for a C{ne}); else a C{Deferred} as L{open}'s.
        """
        self.counters["lookups"] += 1
        started = self.metrics.now()
        config = self._config
        planned = self._plans.get(payload)
        if planned is not None and planned[0] is config:
            _config, service, where = planned
            event = Request("local", client, service)
            event.started = started
            return self._police_and_connect(event, where.target, where.names)
        shown = printable(payload[:80].decode("utf-8", "replace"))
        event = Request("local", client, shown)
        event.started = started
        try:
            lookup = parse_lookup(payload)
            event.service = lookup.service
            route = lookup.route_for(lookup.service)
            uri = route.uri if route and config.allow_client_routes else None
            where = plan(config, lookup.service, uri)
        except (RouteError, InvalidServiceName) as e:
            return self._refuse(event, Refused(f"bad lookup: {e}"))
        except Refused as e:
            return self._refuse(event, e)
        # Parsing and planning are pure: a payload seen before (clients
        # send the same one again and again) is planned once per config.
        if len(payload) <= _MAX_PLANNED_PAYLOAD:
            _keep_bounded(self._plans, payload, (config, lookup.service, where))
        return self._police_and_connect(event, where.target, where.names)

    def open_uri(self, uri: RemoteURI, client: Peer) -> Deferred[socket.socket]:
        """
        Connect a remote URI for a local client that named it itself (the
        upstream control protocol on a daemon's C{RUNDIR/SCHEME} socket).
        """
        self.counters["control requests"] += 1
        event = Request("out", client, uri.service or str(uri))
        if uri.service is None:
            return as_deferred(self._refuse(event, Refused(f"no service in {uri}")))
        names = (uri.service,)
        target = self._kept(uri)
        if target is not None:
            return as_deferred(self._police_and_connect(event, target, names))
        target = RemoteTarget(uri, uri.service)
        answer = self._police_and_connect(event, target, names)
        return as_deferred(self._keep(uri, target, answer))

    def open_inbound(self, service: str, peer: Peer) -> Deferred[socket.socket]:
        """Serve a remote peer asking for C{service}: no client routes, ever."""
        return as_deferred(self._open_inbound(service, peer))

    def _open_inbound(self, service: str, peer: Peer) -> Answer:
        self.counters["inbound requests"] += 1
        event = Request("in", peer, service)
        try:
            name = validate_service_name(service)
        except InvalidServiceName as e:
            return self._refuse(event, Refused(str(e), public=NO_SUCH_SERVICE))
        # Policy first: a denied peer learns nothing about routes.
        if not self._police(event, [name]):
            return self._refuse(event, _denied(event))
        target = self._kept(name)
        fresh = target is None
        if target is None:
            try:
                target = resolve(self._config, name)
            except Refused as e:
                return self._refuse(event, e)
        if peer.address in self.own_dials and not isinstance(target, LocalTarget):
            # This ipcd asked itself, through a route to its own daemon:
            # served here, or it would go round until the limits stop it.
            loop = Refused(
                f"route loop: {name!r} came from this ipcd and would go out again"
            )
            return self._refuse(event, loop, target)
        answer = self._connect(event, target)
        return self._keep(name, target, answer) if fresh else answer

    def _kept(self, key: str | RemoteURI) -> Target | None:
        """The target kept for C{key} under this configuration, if any."""
        kept = self._targets.get(key)
        return kept[1] if kept is not None and kept[0] is self._config else None

    def _keep(self, key: str | RemoteURI, target: Target, answer: Answer) -> Answer:
        """
        Keep C{target} for C{key} (under this configuration) once C{answer}
        says it connected: never a name that led nowhere, or a peer's
        made-up names (C{allow in *}) would push out those that serve.
        Bounded as the plans are.
        """
        config = self._config

        def keep(result: Any) -> Any:
            if config is self._config:  # not reloaded meanwhile
                _keep_bounded(self._targets, key, (config, target))
            return result

        if isinstance(answer, Deferred):
            return answer.addCallback(keep)
        if not isinstance(answer, Failure):
            keep(None)
        return answer

    def _police_and_connect(
        self, event: Request, target: Target, names: tuple[str, ...]
    ) -> Answer:
        event.direction = direction_of(target)
        if not self._police(event, names, destination_labels(target)):
            return self._refuse(event, _denied(event), target)
        return self._connect(event, target, names)

    def _police(
        self, event: Request, names: Sequence[str], extra: Sequence[str] = ()
    ) -> bool:
        """Apply the rules, once for this connection."""
        who = event.who.labels
        event.labels = [*who, *extra]
        # Deciding is pure: the same request from the same labels is decided
        # once per configuration.
        key = (event.direction, tuple(names), who, tuple(extra))
        event.policed = key
        decision = self._decisions.get(key)
        if decision is None:
            decision = decide(self.config.rules, event.direction, names, event.labels)
            if len(self._verdicts) >= _MAX_PLANS:
                self._verdicts.clear()
            decision = self._verdicts.setdefault(decision, decision)
            _keep_bounded(self._decisions, key, decision)
        event.decision = decision
        if not event.decision.allowed:
            self.counters[str(event.decision)] += 1
        return event.decision.allowed

    def _refuse(
        self, event: Request, error: Refused, target: Target | None = None
    ) -> Failure:
        """Refuse C{event}; C{target}: where it was going (for the metrics)."""
        self.counters["refused"] += 1
        self.decision_log.record(event, None, error.reason)
        self.metrics.decided(event, target, error.reason)
        return Failure(error)

    def _connect(
        self, event: Request, target: Target, names: tuple[str, ...] = ()
    ) -> Answer:
        if isinstance(target, LocalTarget):
            try:
                opened = self._open_local(event, target)
            except Refused as e:
                return self._connected(event, target, Failure(e))
            # A local listener usually accepts at once: no waiting then.
            try:
                sock = connect_unix_now(
                    opened.connect_path(), target.name, shown=target.path
                )
            except Exception:
                opened.close()
                return self._connected(event, target, Failure())
            if sock is not None:
                opened.close()
                return self._connected(event, target, sock)
            d: Deferred[Any] = connect_unix(
                self.reactor,
                opened.connect_path(),
                target.name,
                self.config.connect_timeout,
                shown=target.path,
            )
            d.addBoth(_closing(opened))
        else:
            # The deadline is the broker's, so daemons need not keep one
            # and a reload's new timeout applies to the next connection.
            d = with_deadline(
                self._connect_remote(event, target, names),
                self.config.connect_timeout,
                self.reactor,
                f"connecting to {target}",
            )
        return d.addBoth(self._answered, event, target, self._config)

    def _answered(
        self, result: Any, event: Request, target: Target, config: Config
    ) -> Any:
        """
        How connecting C{target} went, under the configuration in force now:
        a reload while it connected (rules or grants that no longer let it
        through) refuses it, as it would a new one (ipcd.test.test_reload).
        """
        if config is not self._config and not isinstance(result, Failure):
            try:
                self._still_allowed(event, target)
            except Refused as e:
                result.close()
                return self._refuse(event, e, target)
        return self._connected(event, target, result)

    def _still_allowed(self, event: Request, target: Target) -> None:
        """Raise L{Refused} unless C{event} may reach C{target} now."""
        if event.policed is not None:
            _direction, names, _who, extra = event.policed
            if (
                event.direction == "out"
                and isinstance(target, RemoteTarget)
                and target.uri.is_srv
            ):
                # The owner too (event.policed is the target that answered),
                # as a new request would be: host:OWNER first.
                if not self._police(event, names, destination_labels(target)):
                    raise _denied(event)
            if not self._police(event, names, extra):
                raise _denied(event)
        if isinstance(target, LocalTarget):
            # The socket's permissions, grants and exact rules, again; a
            # grant found again is for the lookup already counted.
            self._open_local(event, target, again=True).close()

    def _connect_remote(
        self, event: Request, target: RemoteTarget, names: tuple[str, ...]
    ) -> Deferred[socket.socket]:
        """
        Connect through C{target}'s scheme's transport; a route to an SRV
        owner through each of its targets in turn (L{SrvRoutes}), each
        policed for C{out} as a literal route to it would be.
        """

        def dial(one: RemoteTarget) -> Deferred[socket.socket]:
            return self.transport_for(one.uri.scheme).connect(one, event.who)

        if not target.uri.is_srv:
            return maybeDeferred(dial, target)

        def policed(one: RemoteTarget) -> Deferred[socket.socket]:
            # The decision log says which target served (or failed last).
            event.access = f"SRV target {one.uri.hostport}"
            labels = destination_labels(one)
            if event.direction == "out" and not self._police(event, names, labels):
                raise _denied(event)
            return dial(one)

        return self.srv.connect(target, policed, self.config)

    def _connected(self, event: Request, target: Target, result: Any) -> Any:
        """Count and log how connecting C{target} went; pass C{result} on."""
        if not isinstance(result, Failure):
            self.counters["connected"] += 1
            self._record(event, target, "ok")
            return result
        if result.check(Refused, CancelledError):
            self.counters["connect failures"] += 1
        else:
            self.counters["errors"] += 1
        self._record(event, target, reason_of(result))
        return result

    def _open_local(
        self, event: Request, target: LocalTarget, again: bool = False
    ) -> OpenedSocket:
        """
        Open C{target}'s socket as the client could itself (remote peers:
        never through a symbolic link), or as an admin's grant lets it;
        never one of ipcd's own sockets.  C{again}: for a request opened
        before (L{_still_allowed}), whose grant is counted already.
        """
        name, path = target.name, target.path
        own = self.own_sockets
        if name in own.names()[0]:
            raise Refused(
                f"{name!r} is ipcd's own socket, never a lookup target",
                public=REFUSED,
            )
        try:
            try:
                if event.direction == "in":
                    opened = self._open_as_remote(event, target, again)
                else:
                    opened = self._open_as_client(event, target, again)
            except FileNotFoundError:
                raise Refused(
                    f"no route to service {name!r}: {path} does not exist",
                    public=NO_SUCH_SERVICE,
                )
            except Refused:
                raise
            except OSError as e:
                raise Refused(f"cannot connect to service {name!r}: {e.strerror}")
            # ipcd's own first (the clearer answer), then a second name.
            return one_name(own.refuse_own(opened, path), path)
        except Refused as e:
            # The log keeps the reason; the client learns no more than its
            # own walk would have shown it (L{_open_granted}).
            e.told = event.unseen
            raise

    def _open_as_client(
        self, event: Request, target: LocalTarget, again: bool
    ) -> OpenedSocket:
        who = event.who.credentials
        try:
            if who is None:
                raise AccessDenied("permission denied: the client's uid is unknown")
            opened = self._open_socket(target.path, who)
            event.access = "the client may connect itself"
            return opened
        except AccessDenied as denied:
            return self._open_granted(event, target, denied, again)

    def _open_as_remote(
        self, event: Request, target: LocalTarget, again: bool
    ) -> OpenedSocket:
        """
        A remote peer (any listener, loopback included) is others for the
        socket's permissions, unless the rule that let it in names the
        service exactly or a grant covers it: a glob never widens them.
        Never through a symbolic link in RUNDIR (a local user could plant
        one).
        """
        decision = event.decision
        if decision is not None and names_exactly(decision.rule, event.service):
            opened = self._open_socket(
                target.path, None, follow_last_symlink=False, asking=REMOTE
            )
            event.access = f"rule {decision.index} names {event.service!r}"
            return opened
        try:
            try:
                opened = self._open_socket(
                    target.path, OTHERS, follow_last_symlink=False, asking=REMOTE
                )
            except AccessDenied as denied:
                return self._open_granted(event, target, denied, again)
        except Refused as e:
            # Neither a rule naming it nor a grant lets this peer at the
            # socket: what is there (a socket others may not use, a file, a
            # user's link) is told as nothing, or the answers would list
            # what exists behind the permissions.  The reason is logged.
            if find_grant(self.config.grants, target.name, event.labels) is None:
                e.public = NO_SUCH_SERVICE
            raise
        event.access = "others may connect"
        return opened

    def _open_socket(
        self,
        path: str,
        who: Credentials | None,
        *,
        follow_last_symlink: bool = True,
        asking: str = CLIENT,
    ) -> OpenedSocket:
        """
        L{open_socket}, from RUNDIR's directories held open when they are
        (a socket in RUNDIR: one C{fstatat} per directory, no open and close).
        """
        held = self.own_sockets.held
        if held is None:
            return open_socket(
                path, who, follow_last_symlink=follow_last_symlink, asking=asking
            )
        return held.open_socket(
            path, who, follow_last_symlink=follow_last_symlink, asking=asking
        )

    def _open_granted(
        self, event: Request, target: LocalTarget, denied: AccessDenied, again: bool
    ) -> OpenedSocket:
        """C{target}'s socket if a grant covers the peer, else L{AccessDenied}."""
        event.unseen = None
        found = find_grant(self.config.grants, target.name, event.labels)
        if found is None:
            self.counters["access denied"] += 1
            raise AccessDenied(f"service {target.name!r}: {denied}") from None
        index, grant = found
        if event.direction != "in" and not denied.at_socket:
            # The client's walk stopped at a directory it may not search:
            # what the grant's walk meets past it (a user's link and its
            # uid, a second name, nothing at all) is not the client's to
            # learn, or a grant would let it probe others' directories.
            event.unseen = (
                f"service {target.name!r}: {denied}; a grant covers it, but "
                "its walk was refused past a directory the client may not "
                "search (ipcd's log says why)"
            )
        # A grant is for the service's own socket, never through a link
        # that somebody with write access to RUNDIR could plant.
        opened = self._open_socket(
            target.path, None, follow_last_symlink=False, asking=GRANT
        )
        event.access = f"granted by grant {index} ({grant})"
        if not again:
            self.counters["granted"] += 1
        return opened

    def own_names(self) -> set[str]:
        """
        The RUNDIR names of ipcd's own sockets and its daemons' sockets:
        every registered protocol daemon's C{RUNDIR/SCHEME}, running or not,
        and each external daemon's.
        """
        return set(self.own_sockets.names()[0])

    def own_inodes(self) -> set[tuple[int, int]]:
        """The (device, inode) of each of those sockets: any name for them is own."""
        return self.own_sockets.inodes()

    def own_sockets_listening(self, listening: bool = True) -> None:
        """ipcd's in-process sockets are listening (or no longer)."""
        self.own_sockets.listening(listening)

    def own_listener(self, address: Any) -> None:
        """One of ipcd's listeners listens at C{address}: a UNIX one is own."""
        self.own_sockets.add_listener(address)

    def _record(self, event: Request, target: Target | None, outcome: str) -> None:
        self.decision_log.record(event, target, outcome)
        self.metrics.decided(event, target, outcome)

    def transport_for(self, scheme: str) -> IOutbound:
        """
        The outbound half for C{scheme}: the in-process protocol daemon's
        when the configuration enables it, else the external daemon the admin
        configured for it; never a socket a client names by scheme.
        """
        if scheme in self.transports:
            return self.transports[scheme]
        daemon = self.config.registry.get(scheme)
        if daemon is not None and daemon.enabled(settings_of(self.config, daemon)):
            return BoundOutbound(daemon, self)
        if scheme not in self.config.external_daemons:
            if daemon is not None:
                why = off_reason(daemon)
                raise Refused(f"no transport for scheme {scheme!r}: {why}")
            known = ", ".join(self.config.schemes())
            raise Refused(f"no transport for scheme {scheme!r} (known: {known})")
        path = socket_path(self.config.rundir, scheme)
        # The inode checked is the one connected (another user's socket put
        # at the name meanwhile is not), by its O_PATH descriptor.
        try:
            fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise Refused(f"the {scheme} daemon is not running: {path}: {e.strerror}")
        checked = OpenedSocket(fd, os.fstat(fd), via_symlink=False)
        st = checked.stat
        why = None
        if not stat.S_ISSOCK(st.st_mode):
            why = f"the {scheme} daemon is not running: {path} is not a socket"
        elif st.st_uid not in (0, os.geteuid()):
            why = (
                f"{path} belongs to uid {st.st_uid}, not to root or ipcd's user: "
                f"not trusted as the {scheme} daemon"
            )
        if why is not None:
            checked.close()
            raise Refused(why)
        return ExternalDaemon(self.reactor, scheme, path, checked)


def _closing(opened: OpenedSocket) -> Any:
    """A callback that closes C{opened} and passes the result on."""

    def close(result: Any) -> Any:
        opened.close()
        return result

    return close


def _denied(event: Request) -> Refused:
    return Refused(
        f"{event.direction} connection to {event.service!r} {event.decision}",
        public=REFUSED,
    )
