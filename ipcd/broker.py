"""
ipcd itself: the lookup protocol on C{RUNDIR/ipc} and the resolver behind it.

Where a lookup goes is decided by the pure L{ipcd.resolution}.  L{Broker}
polices and connects targets, locally (as the client could itself:
L{ipcd.access}) or through a transport;
L{LookupProtocol} speaks to clients and hands the connected socket over with
C{ok}.
"""

from __future__ import annotations

import os
import socket
import stat
from array import array
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    fail,
    maybeDeferred,
    succeed,
)
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from ipcd.access import (
    OTHERS,
    AccessDenied,
    HeldDirectories,
    OpenedSocket,
    open_socket,
)
from ipcd.config import Config
from ipcd.daemons import BoundOutbound, IOutbound, off_reason, settings_of
from ipcd.errors import Refused
from ipcd.handoff import OK, send_ok
from ipcd.host import IDaemonHost
from ipcd.identity import LabelCache, Peer, local_peer
from ipcd.limits import ConnectionLimits, own_uid_key
from ipcd.logs import EventTemplate, printable
from ipcd.names import (
    OWN_NAMES,
    InvalidServiceName,
    socket_path,
    validate_service_name,
)
from ipcd.owninodes import RundirInodes
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
    discard_unread,
    with_deadline,
)
from ipcd.transports.external import ExternalDaemon
from ipcd.wire import HEADER, MessageProtocol, PartialMessageBudget

# Lookup payloads whose plan (and requests whose decision) is kept; past
# this many, all are forgotten.
_MAX_PLANS = 256

# What serving a request gives, at once or later: the connected socket, a
# Failure (Refused: answered ne), or a Deferred of either.
Answer = Any


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
    (L{Broker.open_now}), else through L{ILookupBroker.open}.
    """
    open_now = getattr(broker, "open_now", None)
    if open_now is not None:
        return open_now(payload, client)
    return broker.open(payload, client)


class ILookupBroker(Interface):
    """
    What L{LookupProtocol} and L{LookupFactory} need of a broker: somebody
    that serves a lookup payload, and says what bounds a lookup connection.
    L{Broker} is one; L{ipcd.testing.FakeLookupBroker} another.
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


@implementer(ILookupBroker, IDaemonHost)
class Broker:
    """
    Resolves and connects: for local clients through L{open}, for remote
    peers (arriving through a transport's listener) through L{open_inbound}.
    """

    log = Logger()

    def __init__(
        self,
        config: Config,
        reactor: Any,
        transports: Mapping[str, IOutbound] | None = None,
    ) -> None:
        self.reactor = reactor
        # The class's Logger bound to this broker once (Logger.__get__ makes
        # a new one on every access, and one event is logged per lookup).
        self.log = self.log
        # Outbound halves by scheme that take precedence over the protocol
        # daemons of the registry (config.registry): test doubles, say.
        self.transports: dict[str, IOutbound] = dict(transports or {})
        # Live relayed connections (ipcd.relay.RelayStats), for status.
        self.relays: set[Any] = set()
        self.counters: Counter[str] = Counter()
        # Each listener's connection limits, by listener name.
        self.limits: dict[str, ConnectionLimits] = {}
        self._fixed_inodes: set[tuple[int, int]] | None = None
        # Other daemons' socket inodes, while RUNDIR is unchanged.
        self._other_inodes = RundirInodes()
        # RUNDIR and the directories above it, held open while ipcd's own
        # sockets listen (a fixed number of descriptors).
        self._held: HeldDirectories | None = None
        self._names_cache: Any = None
        self._plans: dict[bytes, tuple[Config, str, Any]] = {}
        self._said: dict[Any, tuple[Any, Any, EventTemplate]] = {}
        self._decisions: dict[Any, Decision] = {}
        # Local clients' identity labels, by uid and gid.
        self.labels = LabelCache(config.label_cache_max_age)
        self.config = config

    @property
    def config(self) -> Config:
        return self._config

    @config.setter
    def config(self, config: Config) -> None:
        # A reload's limits apply to new connections at once, and a reload
        # shows group changes at once.
        self._config = config
        self._decisions.clear()
        self.labels.max_age = config.label_cache_max_age
        self.labels.clear()
        self._other_inodes.clear()
        if self._held is not None:
            self._hold_rundir(True)
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
        config = self._config
        planned = self._plans.get(payload)
        if planned is not None and planned[0] is config:
            _config, service, where = planned
            event = _Event("local", client, service)
            return self._police_and_connect(event, where.target, where.names)
        shown = printable(payload[:80].decode("utf-8", "replace"))
        event = _Event("local", client, shown)
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
        if len(self._plans) >= _MAX_PLANS:
            self._plans.clear()
        self._plans[payload] = (config, lookup.service, where)
        return self._police_and_connect(event, where.target, where.names)

    def open_uri(self, uri: RemoteURI, client: Peer) -> Deferred[socket.socket]:
        """
        Connect a remote URI for a local client that named it itself (the
        upstream control protocol on a daemon's C{RUNDIR/SCHEME} socket).
        """
        self.counters["control requests"] += 1
        event = _Event("out", client, uri.service or str(uri))
        if uri.service is None:
            return as_deferred(self._refuse(event, Refused(f"no service in {uri}")))
        target = RemoteTarget(uri, uri.service)
        return as_deferred(self._police_and_connect(event, target, (uri.service,)))

    def open_inbound(self, service: str, peer: Peer) -> Deferred[socket.socket]:
        """Serve a remote peer asking for C{service}: no client routes, ever."""
        return as_deferred(self._open_inbound(service, peer))

    def _open_inbound(self, service: str, peer: Peer) -> Answer:
        self.counters["inbound requests"] += 1
        event = _Event("in", peer, service)
        try:
            name = validate_service_name(service)
        except InvalidServiceName as e:
            return self._refuse(event, Refused(str(e)))
        # Policy first: a denied peer learns nothing about routes.
        if not self._police(event, [name]):
            return self._refuse(event, _denied(event))
        try:
            target = resolve(self.config, name)
        except Refused as e:
            return self._refuse(event, e)
        return self._connect(event, target)

    def _police_and_connect(
        self, event: _Event, target: Target, names: tuple[str, ...]
    ) -> Answer:
        event.direction = direction_of(target)
        if not self._police(event, names, destination_labels(target)):
            return self._refuse(event, _denied(event))
        return self._connect(event, target)

    def _police(
        self, event: _Event, names: Sequence[str], extra: Sequence[str] = ()
    ) -> bool:
        """Apply the rules, once for this connection."""
        who = event.who.labels
        event.labels = [*who, *extra]
        # Deciding is pure: the same request from the same labels is decided
        # once per configuration.
        key = (event.direction, tuple(names), who, tuple(extra))
        decision = self._decisions.get(key)
        if decision is None:
            decision = decide(self.config.rules, event.direction, names, event.labels)
            if len(self._decisions) >= _MAX_PLANS:
                self._decisions.clear()
            self._decisions[key] = decision
        event.decision = decision
        if not event.decision.allowed:
            self.counters[str(event.decision)] += 1
        return event.decision.allowed

    def _refuse(self, event: _Event, error: Refused) -> Failure:
        self.counters["refused"] += 1
        self._record(event, None, error.reason)
        return Failure(error)

    def _connect(self, event: _Event, target: Target) -> Answer:
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
            # The deadline is the broker's, so transports need not keep one
            # and a reload's new timeout applies to the next connection.
            d = with_deadline(
                maybeDeferred(
                    lambda: self.transport_for(target.uri.scheme).connect(
                        target, event.who
                    )
                ),
                self.config.connect_timeout,
                self.reactor,
                f"connecting to {target}",
            )
        return d.addBoth(lambda result: self._connected(event, target, result))

    def _connected(self, event: _Event, target: Target, result: Any) -> Any:
        """Count and log how connecting C{target} went; pass C{result} on."""
        if not isinstance(result, Failure):
            self.counters["connected"] += 1
            self._record(event, target, "ok")
            return result
        if result.check(Refused, CancelledError):
            self.counters["connect failures"] += 1
        else:
            self.counters["errors"] += 1
        self._record(event, target, _reason(result))
        return result

    def _open_local(self, event: _Event, target: LocalTarget) -> OpenedSocket:
        """
        Open C{target}'s socket as the client could itself (remote peers:
        never through a symbolic link), or as an admin's grant lets it;
        never one of ipcd's own sockets.
        """
        name, path = target.name, target.path
        if name in self._names()[0]:
            raise Refused(f"{name!r} is ipcd's own socket, never a lookup target")
        try:
            if event.direction == "in":
                opened = self._open_as_remote(event, target)
            else:
                opened = self._open_as_client(event, target)
        except FileNotFoundError:
            raise Refused(f"no route to service {name!r}: {path} does not exist")
        except Refused:
            raise
        except OSError as e:
            raise Refused(f"cannot connect to service {name!r}: {e.strerror}")
        held = self._held
        rundir_stat = None
        if held is not None and held.directory == self._config.rundir:
            rundir_stat = held.take_directory_stat()
        if opened.inode in self._own_inodes(rundir_stat):
            opened.close()
            raise Refused(f"{path} is ipcd's own socket, never a lookup target")
        return opened

    def _open_as_client(self, event: _Event, target: LocalTarget) -> OpenedSocket:
        who = event.who.credentials
        try:
            if who is None:
                raise AccessDenied("permission denied: the client's uid is unknown")
            held = self._held
            if held is not None:
                opened = held.open_socket(target.path, who)
            else:
                opened = open_socket(target.path, who)
            event.access = "the client may connect itself"
            return opened
        except AccessDenied as denied:
            return self._open_granted(event, target, denied)

    def _open_as_remote(self, event: _Event, target: LocalTarget) -> OpenedSocket:
        """
        A remote peer (any listener, loopback included) is others for the
        socket's permissions, unless the rule that let it in names the
        service exactly or a grant covers it: a glob never widens them.
        Never through a symbolic link in RUNDIR (a local user could plant
        one).
        """
        decision = event.decision
        if decision is not None and names_exactly(decision.rule, event.service):
            opened = open_socket(target.path, None, follow_last_symlink=False)
            event.access = f"rule {decision.index} names {event.service!r}"
            return opened
        try:
            opened = open_socket(target.path, OTHERS, follow_last_symlink=False)
        except AccessDenied as denied:
            return self._open_granted(event, target, denied)
        event.access = "others may connect"
        return opened

    def _open_granted(
        self, event: _Event, target: LocalTarget, denied: AccessDenied
    ) -> OpenedSocket:
        """C{target}'s socket if a grant covers the peer, else L{AccessDenied}."""
        found = find_grant(self.config.grants, target.name, event.labels)
        if found is None:
            self.counters["access denied"] += 1
            raise AccessDenied(f"service {target.name!r}: {denied}") from None
        index, grant = found
        # A grant is for the service's own socket, never through a link
        # that somebody with write access to RUNDIR could plant.
        opened = open_socket(target.path, None, follow_last_symlink=False)
        event.access = f"granted by grant {index} ({grant})"
        self.counters["granted"] += 1
        return opened

    def own_names(self) -> set[str]:
        """
        The RUNDIR names of ipcd's own sockets and its daemons' sockets:
        every registered protocol daemon's C{RUNDIR/SCHEME}, running or not,
        and each external daemon's.
        """
        return set(self._names()[0])

    def _in_process_names(self) -> set[str]:
        """ipcd's own sockets and those of the daemons it runs itself."""
        return set(self._names()[1])

    def _names(self) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
        """
        The own names, the in-process ones, and the others; worked out once
        per configuration (and set of test transports), not per lookup.
        """
        config, transports = self._config, tuple(self.transports)
        cached = self._names_cache
        if cached is None or cached[0] is not config or cached[1] != transports:
            own = frozenset(
                {
                    *OWN_NAMES,
                    *config.registry,
                    *transports,
                    *config.external_daemons,
                }
            )
            running = (d.scheme for d in config.registry.enabled(config))
            in_process = frozenset({*OWN_NAMES, *running})
            cached = (config, transports, (own, in_process, own - in_process))
            self._names_cache = cached
        return cached[2]

    def own_sockets_listening(self, listening: bool = True) -> None:
        """
        ipcd's in-process sockets are listening (or no longer): their inodes
        are fixed while it runs, so they need not be looked up per lookup.
        """
        self._fixed_inodes = None
        self._hold_rundir(listening)
        if listening:
            self._fixed_inodes = self._inodes(self._in_process_names())

    def _hold_rundir(self, hold: bool) -> None:
        """Let RUNDIR's directories go; hold them again if C{hold}."""
        if self._held is not None:
            self._held.close()
            self._held = None
        if hold:
            self._held = HeldDirectories(self._config.rundir)
            self._held.hold()

    def _own_inodes(
        self, rundir_stat: os.stat_result | None = None
    ) -> set[tuple[int, int]]:
        own, _in_process, others = self._names()
        if self._fixed_inodes is None:
            return self._inodes(own)
        if not others:
            return self._fixed_inodes
        # Other daemons (external ones, and registered ones not running
        # here) come and go on their own: their inodes are looked up again
        # whenever RUNDIR has changed since (RundirInodes).
        return self._other_inodes(
            self.config.rundir, others, self._fixed_inodes, rundir_stat
        )

    def _inodes(self, names: Any) -> set[tuple[int, int]]:
        inodes = set()
        for name in names:
            try:
                st = os.stat(socket_path(self.config.rundir, name))
            except (OSError, InvalidServiceName):
                continue
            inodes.add((st.st_dev, st.st_ino))
        return inodes

    def _record(self, event: _Event, target: Target | None, outcome: str) -> None:
        """One structured log event per decision: who, what, rule, outcome."""
        # What depends on the request rather than on the client (service,
        # target, decision, outcome) is worked out once per distinct request,
        # and so is its text (ipcd.logs.EventTemplate): clients ask the same
        # again and again.  Targets and decisions are kept per configuration
        # (plans, decisions): known by identity, they need not be hashed
        # (dataclasses hash in Python); the entry holds them, so their ids
        # stay theirs.
        decision = event.decision
        key = (
            event.direction,
            event.service,
            id(target),
            id(decision),
            event.access,
            outcome,
        )
        said = self._said.get(key)
        if said is None or said[0] is not target or said[1] is not decision:
            fields = _decided_fields(event, target, outcome, self.log)
            said = (target, decision, EventTemplate(fields, ("who", "labels")))
            if len(self._said) >= _MAX_SAID:
                self._said.clear()
            self._said[key] = said
        template = said[2]
        # Logger.info's event, built here: one per lookup.
        self.log.observer(
            template.event(printable(str(event.who)), sorted(event.labels))
        )

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
        try:
            st = os.lstat(path)
        except OSError as e:
            raise Refused(f"the {scheme} daemon is not running: {path}: {e.strerror}")
        if not stat.S_ISSOCK(st.st_mode):
            raise Refused(f"the {scheme} daemon is not running: {path} is not a socket")
        if st.st_uid not in (0, os.geteuid()):
            raise Refused(
                f"{path} belongs to uid {st.st_uid}, not to root or ipcd's user: "
                f"not trusted as the {scheme} daemon"
            )
        return ExternalDaemon(self.reactor, scheme, path)


_DECIDED = "{direction} {service!r} for {who} -> {target}: {outcome}"
_DECIDED_VERDICT = _DECIDED + " ({verdict})"
# Refused before any target was chosen: there is none to show.
_REFUSED = "{direction} {service!r} for {who}: {outcome}"
# Allowed here, failed further on (the far tlsd's own rule, say): the
# verdict is this ipcd's, not the failure's.
_FAILED_VERDICT = _DECIDED + " ({verdict} here)"
# Distinct requests whose log fields are kept; past this many, all are
# forgotten.
_MAX_SAID = 256


def _decided_fields(
    event: _Event, target: Target | None, outcome: str, log: Logger
) -> dict[str, Any]:
    """
    The fields of a decision's log event, as C{log.info} would make them:
    those that do not depend on the client (service, target, verdict, rule,
    allowed, outcome and format) filled in; who, labels and time not yet.
    """
    decision = event.decision
    verdict = "not policed" if decision is None else str(decision)
    if event.access is not None:
        verdict = f"{verdict}; {event.access}"
    # A refusal's reason already says the verdict: do not say it twice.
    said = verdict in outcome
    return {
        "direction": event.direction,
        "service": printable(event.service),
        "who": "",
        "labels": [],
        "target": None if target is None else printable(str(target)),
        "verdict": verdict,
        "access": event.access,
        "rule": None
        if decision is None or decision.rule is None
        else str(decision.rule),
        "allowed": None if decision is None else decision.allowed,
        "outcome": printable(outcome),
        "log_logger": log,
        "log_level": LogLevel.info,
        "log_namespace": log.namespace,
        "log_source": log.source,
        "log_format": _decided_format(target is not None, said, outcome == "ok"),
        "log_time": None,
    }


def _decided_format(targeted: bool, said: bool, ok: bool) -> str:
    """The decision line's format: with a target if any, the verdict once."""
    if not targeted:
        return _REFUSED if said else _REFUSED + " ({verdict})"
    if said:
        return _DECIDED
    return _DECIDED_VERDICT if ok else _FAILED_VERDICT


@dataclass
class _Event:
    """What is known of one request as it is decided, for its log event."""

    direction: str
    who: Peer
    service: str
    labels: list[str] = field(default_factory=list)
    decision: Decision | None = None
    access: str | None = None  # how a local socket was reached, when it was


def _closing(opened: OpenedSocket) -> Any:
    """A callback that closes C{opened} and passes the result on."""

    def close(result: Any) -> Any:
        opened.close()
        return result

    return close


def _denied(event: _Event) -> Refused:
    return Refused(
        f"{event.direction} connection to {event.service!r} {event.decision}"
    )


def _reason(failure: Failure) -> str:
    if failure.check(Refused):
        return failure.value.reason
    if failure.check(CancelledError):
        return "cancelled"
    return f"internal error: {printable(failure.getErrorMessage())}"


class LookupProtocol(MessageProtocol):
    """
    One lookup per connection: read it, answer C{ok} with the connected fd in
    SCM_RIGHTS, or C{ne <reason>} with no fd; then close.  A client that
    sends no whole lookup within C{broker.config.lookup_timeout} seconds is
    answered C{ne no lookup received within N s}: the deadline is
    L{TimeoutMixin}'s (MessageProtocol's), timed on C{clock}.
    """

    log = Logger()
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
                limits.refuse(self.transport, b"ne " + refusal.encode())
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
            answer.addCallbacks(self._answer_ok, self._answer_failure)
        elif isinstance(answer, Failure):
            self._answer_failure(answer)
        else:
            self._answer_ok(answer)

    def messageTooLarge(self, size: int) -> None:
        self._answer_no(f"lookup of {size} bytes exceeds {self.maxMessageSize} bytes")

    def _answer_ok(self, sock: socket.socket) -> None:
        self._pending = None
        if self._answered:
            sock.close()
            return
        self._answered = True
        # Keep our copy open until the write buffer (and the fd) is flushed:
        # it is closed in connectionLost.
        self._handed = sock
        # O_NONBLOCK belongs to the shared open file, not to our fd: clients
        # (upstream's do a plain blocking read) must get a blocking socket.
        sock.setblocking(True)
        send_ok(self.transport, sock.fileno())
        self.transport.loseConnection()

    def _answer_failure(self, failure: Failure) -> None:
        self._pending = None
        if failure.check(CancelledError) and self._answered:
            return
        if not failure.check(Refused):
            self.log.failure("lookup for {who} failed", failure, who=str(self.client))
        self._answer_no(_reason(failure))

    def _answer_no(self, reason: str) -> None:
        if self._answered:
            return
        self._answered = True
        self.setTimeout(None)
        discard_unread(self.transport)
        self.transport.write(b"ne " + reason.encode("utf-8", "replace"))
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

    def stopFactory(self) -> None:  # noqa: N802 (Twisted's name)
        if self.limits is not None:
            self.limits.rate_limited.flush()  # what it left out, said now

    def buildProtocol(self, addr: Any) -> LookupProtocol:
        protocol = LookupProtocol(self.broker, self.clock, self.partialBudget)
        protocol.factory = self
        return protocol

    def serve_at_once(
        self,
        skt: socket.socket,
        close_later: Callable[[socket.socket], None] = socket.socket.close,
    ) -> Callable[[Any], None] | None:
        """
        Serve a just-accepted client of a L{ipcd.lookupport.LookupPort}
        without a transport, when nothing has to wait: its whole lookup is
        in the socket, it is within its limits, and the broker answers at
        once.  C{None} when it was answered and closed (answered C{ok}:
        given to C{close_later}); else how to carry on once a
        L{LookupProtocol} has the connection, which answers as it would
        have from the start.
        """
        try:
            data = skt.recv(_READ_AT_ONCE, socket.MSG_DONTWAIT)
        except OSError:
            return _carry_on(b"")  # nothing yet: the protocol waits for it
        size = len(data)
        if size < HEADER.size or size >= _READ_AT_ONCE:
            return _carry_on(data)
        (length,) = HEADER.unpack_from(data)
        if size != HEADER.size + length or length > self.broker.config.max_message_size:
            return _carry_on(data)
        labels = getattr(self.broker, "labels", None)
        try:
            client = local_peer(skt, labels)
        except OSError:
            return _carry_on(data)
        limits = self.limits
        if limits is not None:
            key = f"uid:{client.uid}"
            # Served and gone before anything else runs, so it holds no
            # place in the limits; close to them, the protocol decides.
            if limits.total + 1 >= limits.max_total or (
                limits.per_peer.get(key, 0) >= limits.max_per_peer
                and key not in limits.exempt
            ):
                return _carry_on(data)
        answer = serve_lookup(self.broker, data[HEADER.size :], client)
        if isinstance(answer, Deferred):
            return _carry_on(b"", answer)
        if isinstance(answer, Failure):
            reply = b"ne " + _reason(answer).encode("utf-8", "replace")
            ancillary = []
        else:
            # O_NONBLOCK belongs to the shared open file: clients get a
            # blocking socket (see LookupProtocol._answer_ok).
            answer.setblocking(True)
            reply = OK
            fds = array("i", [answer.fileno()])
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)]
        try:
            sent = skt.sendmsg([reply], ancillary, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return _carry_on(b"", answer)  # the protocol answers, as usual
        except OSError:
            sent = len(reply)  # the client is gone: nobody to answer
        if not ancillary and not answer.check(Refused):
            # As LookupProtocol._answer_failure says it.
            LookupProtocol.log.failure(
                "lookup for {who} failed", answer, who=str(client)
            )
        if ancillary:
            answer.close()
        if sent < len(reply):
            return _carry_on(b"", None, reply[sent:])
        self.broker.counters["lookups answered at accept"] += 1
        if ancillary and sent > 0:
            close_later(skt)  # the descriptor may be in flight still
        else:
            skt.close()
        return None


# A lookup is a few hundred bytes; one read this long that comes back full
# is left to the protocol (more may follow).
_READ_AT_ONCE = 4096


def _carry_on(
    data: bytes, answer: Answer = None, rest: bytes = b""
) -> Callable[[LookupProtocol], None]:
    """
    What a L{LookupProtocol} does after L{LookupFactory.serve_at_once}
    stopped: read C{data} as received, give an C{answer} (the broker's,
    given already), or send the C{rest} of an answer sent in part.
    """

    def resume(protocol: LookupProtocol) -> None:
        if protocol._answered:  # refused at its limits: nothing to answer
            if isinstance(answer, Deferred):
                answer.cancel()
            elif isinstance(answer, socket.socket):
                answer.close()
            return
        if rest:
            protocol._answered = True
            protocol.setTimeout(None)
            protocol.transport.write(rest)
            protocol.transport.loseConnection()
        elif answer is not None:
            protocol.setTimeout(None)
            protocol.answer(answer)
        elif data:
            protocol.dataReceived(data)

    return resume
