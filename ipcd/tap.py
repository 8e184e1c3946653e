"""
C{twistd ipcd}: the service tree its options build (L{makeService},
L{IPCDService}).

The plugin in C{twisted/plugins/ipcd_plugin.py} names this module by string,
so C{twistd --help} imports nothing of ours; twistd reads L{Options} (from
L{ipcd.options}) and L{makeService} here.
"""

from __future__ import annotations

import gc
import os
import signal
from collections.abc import Callable, Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.logger import ILogObserver, Logger
from twisted.python.failure import Failure

from ipcd import compat, version
from ipcd.activation import inherited
from ipcd.broker import Broker
from ipcd.config import (
    Config,
    ConfigError,
    changed_keys,
    changes_text,
    one_line,
)
from ipcd.control import CONTROL_MODE, CONTROL_NAME, ControlFactory, status_report
from ipcd.daemons import StartupError, settings_of
from ipcd.endpoints import BROKER_NAME
from ipcd.instancelock import InstanceLock, lock_error, take_instance_lock
from ipcd.limits import LimitedFactory
from ipcd.listener import IListener, Outcome
from ipcd.logbatch import batch_with
from ipcd.logs import text_observer
from ipcd.lookupprotocol import LookupFactory
from ipcd.memtrim import MemoryTrim
from ipcd.metrics import NO_METRICS, Metrics
from ipcd.names import SocketInUse, SocketPathError, refuse_own_live, socket_path
from ipcd.options import Options
from ipcd.ownthread import in_own_thread
from ipcd.placing import remove_abandoned
from ipcd.planted import ASIDE_PREFIX, sweep_aside
from ipcd.reactors import IHostReactor
from ipcd.reloadgate import STOPPING, ReloadGate
from ipcd.reloads import Reloads
from ipcd.rundir import UnsafeRundir, prepare_rundir
from ipcd.sdnotify import Notifier, Readiness
from ipcd.services import IPCService
from ipcd.services.pongd import pongd
from ipcd.startup import (
    OWNERS,
    cannot_listen,
    close_now,
    daemon_of,
    leaves,
    listening_text,
    raise_open_files_limit,
)
from ipcd.wire import PartialMessageBudget

# twistd reads Options and makeService here (the plugin names this module).
__all__ = ["IPCDService", "Options", "makeService"]


class IPCDService(MultiService):
    """
    ipcd and its enabled components, sharing one L{Broker}, plus the control
    socket.  C{reload_config}, when given, re-reads the configuration for
    L{reload} (SIGHUP or C{ipcd reload}).
    """

    log = Logger()

    def __init__(
        self,
        config: Config,
        reactor: IHostReactor,
        reload_config: Callable[[], Config] | None = None,
    ) -> None:
        super().__init__()
        self.setName("ipcd")
        self.config = config
        self.reactor = reactor
        self.metrics = Metrics(config.schemes()) if config.metrics else NO_METRICS
        self.broker = Broker(config, reactor, metrics=self.metrics)
        self._reload_config = reload_config
        self._previous_hup: Any = None
        self._listening = False
        # One ipcd per RUNDIR: held from before anything is placed in it.
        self.instance_lock: InstanceLock | None = None
        self._listeners_up: Outcome[dict[str, list[str]]] = Outcome()
        self._ready: Outcome[dict[str, list[str]]] = Outcome()
        # Under systemd (Type=notify): what tells it ipcd's state.
        self.readiness: Readiness | None = None
        # What twistd should log with, if not its default (see makeService).
        self.log_observer: ILogObserver | None = None
        # Where each part listens ("tcpd": ["127.0.0.1:9000"]), as it starts.
        self.addresses: dict[str, list[str]] = {}
        counters = self.broker.counters
        # One budget for the partial messages of all of ipcd's connections;
        # the limits are read when used, so a reload applies.
        self.partial_budget = budget = PartialMessageBudget(
            lambda: self.config.partial_message_budget, counters, reactor
        )
        limits = self.broker.limits_for(BROKER_NAME)
        IPCService(
            BROKER_NAME,
            LookupFactory(self.broker, reactor, budget, limits=limits),
            config.rundir,
            reactor,
            limits=limits,
        ).setServiceParent(self)
        # Reloads asked on the control socket: one per RELOAD_INTERVAL at most.
        self.reload_gate = ReloadGate(self.reload_in_thread, reactor)
        # Its reloads (and itself), for ipcd status.
        self.reloads = Reloads()
        handlers = {
            "status": lambda: status_report(
                self.broker, self.listening(), self.reloads.status(version())
            ),
            "reload": self.reload_gate.request,
        }
        limits = self.broker.limits_for(CONTROL_NAME)
        IPCService(
            CONTROL_NAME,
            LimitedFactory(
                ControlFactory(
                    handlers,
                    lambda: self.config.control_timeout,
                    reactor,
                    budget,
                    counters,
                ),
                limits,
            ),
            config.rundir,
            reactor,
            mode=CONTROL_MODE if config.control_group is None else 0o660,
            group=config.control_group,
            limits=limits,
        ).setServiceParent(self)
        if config.pongd:
            pongd(
                config.rundir,
                reactor=reactor,
                max_message_size=lambda: self.config.max_message_size,
                limits=self.broker.limits_for("pong"),
                idle_timeout=lambda: self.config.idle_timeout,
                partial_budget=budget,
                counters=counters,
            ).setServiceParent(self)
        # What a burst (an attack) made ipcd allocate goes back to the
        # system once freed.
        MemoryTrim(reactor, counters).setServiceParent(self)
        if config.metrics:
            # Imported only when asked for: prometheus_client, twisted.web.
            from ipcd.metricsweb import serve_metrics

            broker = self.broker
            self.metrics_registry = serve_metrics(
                self, config, self.metrics, counters, lambda: [*broker.limits]
            )
        # The protocol daemons' listeners (tcpd's, ...), as the registry's
        # daemons make them.
        self.daemon_services: dict[str, Any] = {}
        for daemon in config.registry.enabled(config):
            daemon_service = daemon.makeService(
                self.broker, settings_of(config, daemon)
            )
            if daemon_service is not None:
                self.daemon_services[daemon.section] = daemon_service
                daemon_service.setServiceParent(self)

    def socket_paths(self) -> list[str]:
        """The C{RUNDIR} sockets of this instance and its components."""
        names = [BROKER_NAME, CONTROL_NAME]
        if self.config.pongd:
            names.append("pong")
        names += [
            scheme
            for d in self.config.registry.enabled(self.config)
            for scheme in (d.scheme, *getattr(d, "also_schemes", ()))
        ]
        return [socket_path(self.config.rundir, name) for name in names]

    def lock_rundir(self) -> None:
        """
        Take RUNDIR's instance lock (L{ipcd.instancelock}), unless held;
        then, no other ipcd of this user running there, remove what one
        killed while starting left behind.  Raises L{StartupError}.
        """
        if self.instance_lock is not None and self.instance_lock.held:
            return
        rundir = self.config.rundir
        try:
            self.instance_lock = take_instance_lock(rundir)
        except OSError as e:
            raise lock_error(rundir, e) from None
        for taken in self.instance_lock.taken:
            self.log.warn("{taken}", taken=str(taken))
        # Its names are ipcd's now: whatever is there is taken out of the
        # way as its sockets take them (ipcd.planted).
        self.instance_lock.claim(self.socket_paths())
        try:
            abandoned = remove_abandoned(rundir)
            kept = sweep_aside(rundir)
        except OSError:
            abandoned, kept = [], 0  # only litter: it stays
        if kept:
            self.log.warn(
                "RUNDIR holds {count} directories ipcd took from its names "
                "(not emptied: another user's tree); remove them: "
                "rm -r {rundir}/{prefix}*",
                count=kept,
                rundir=rundir,
                prefix=ASIDE_PREFIX,
            )
        if abandoned:
            self.log.info(
                "removed {count} temporary directories a killed process left "
                "in RUNDIR: {names}",
                count=len(abandoned),
                names=" ".join(abandoned),
            )

    def unlock_rundir(self) -> None:
        """Give RUNDIR's instance lock up (another ipcd may start there)."""
        if self.instance_lock is not None:
            self.instance_lock.release()

    def reload(self) -> dict[str, Any]:
        """
        Re-read the configuration.  A valid one applies to new connections
        (existing ones are untouched); an invalid one is refused and the old
        one stays.  Under systemd, told as C{RELOADING=1} then C{READY=1}.
        The file is read and parsed on the caller's thread (see
        L{reload_in_thread}).
        """
        self._reloading()
        return self._apply(self._read())

    def reload_in_thread(self) -> Deferred[dict[str, Any]]:
        """
        L{reload}, the file read, parsed and checked in a thread of its own
        (L{in_own_thread}: in the reactor's pool it queued behind any local
        user's slow host name lookups), then applied on the reactor's
        thread: lookups and relays go on meanwhile (1 MiB of routes took the
        reactor 0.3 to 1 s, every lookup and relay held).  Only through
        L{reload_gate} (SIGHUP and C{ipcd reload}), which never runs two at
        once.
        """
        threads = getattr(self.reactor, "callFromThread", None)
        if threads is None or self._reload_config is None:
            return succeed(self.reload())  # (a test's reactor: no threads)
        self._reloading()
        reading = in_own_thread(self.reactor, self._read, "ipcd-reload")
        return reading.addCallback(self._apply_unless_stopped).addErrback(
            self._reload_failed
        )

    def _reloading(self) -> None:
        if self.readiness is not None:
            self.readiness.reloading()

    def _read(self) -> Config | ConfigError | None:
        """
        The configuration to reload, or why not (None: nothing to reload).
        Pure (files read, parsed, checked; no reactor, nothing shared
        written): run on any thread.
        """
        if self._reload_config is None:
            return None
        try:
            return self._reload_config()
        except ConfigError as e:
            return e

    def _apply_unless_stopped(self, read: Config | ConfigError | None) -> Any:
        if not self.running:
            # Stopped while it was read: nothing applied, nor told (systemd
            # has STOPPING=1 already, its notifier closed), nor counted.
            return dict(STOPPING)
        return self._apply(read)

    def _apply(self, read: Config | ConfigError | None) -> dict[str, Any]:
        """Apply what L{_read} gave, on the reactor's thread; the answer."""
        return self._told(self._reload(read))

    def _told(self, answer: dict[str, Any]) -> dict[str, Any]:
        self.reloads.record(answer)
        if self.readiness is not None:
            self.readiness.reloaded(answer)
        return answer

    def _reload_failed(self, failure: Failure) -> Failure:
        """A bug: systemd is still told that the reload is over."""
        if self.running:
            self._told({"ok": False})
        return failure  # (the gate logs it, and answers)

    def _reload(self, new: Config | ConfigError | None) -> dict[str, Any]:
        if new is None:
            return {
                "ok": False,
                "error": "this instance has no configuration to reload",
            }
        if isinstance(new, ConfigError):
            self.log.error(
                "reload refused, keeping the old configuration: {error}",
                error=str(new),
            )
            return {"ok": False, "error": str(new)}
        restart = [
            key
            for key in _RESTART_KEYS
            if getattr(new, key) != getattr(self.config, key)
        ]
        new = replace(new, **{key: getattr(self.config, key) for key in restart})
        listening = self.listening()
        new, daemon_restart = _keep_daemon_restart_keys(self.config, new, listening)
        restart += daemon_restart
        if restart:
            self.log.warn(
                "reload: changes to {keys} apply after a restart",
                keys=", ".join(restart),
            )
        # What an operator checks first: was the edit seen at all?
        changed = changed_keys(self.config, new)
        self.config = self.broker.config = new
        self.log.info(
            "configuration reloaded from {source}: {changes}",
            source=new.source or "the command line only (no --config file)",
            changes=changes_text(changed),
            changed=changed,
        )
        not_applied: list[str] = []
        for section, service in self.daemon_services.items():
            # A daemon that reads files for its configuration (tlsd's keys)
            # reads them now: what is wrong is said at the reload, not at
            # its next peer, if one ever comes, and in the reload's answer
            # (an unusable key kept the old ones: the log alone said so).
            reconfigured = getattr(service, "reconfigured", None)
            if reconfigured is None:
                continue
            try:
                said = [one_line(str(why)) for why in reconfigured() or ()]
            except Exception:
                # A third party's daemon's bug: the configuration is in force
                # already; the other daemons are told, the reload answered
                # (and systemd told READY=1), not left half done.
                self.log.failure(
                    "reload: [{section}] failed to apply it", section=section
                )
                continue
            not_applied += said
        answer: dict[str, Any] = {
            "ok": True,
            "restart_needed": restart,
            "changed": changed,
        }
        if not_applied:
            answer["not_applied"] = not_applied
        return answer

    def listening(self) -> dict[str, bool]:
        """
        Whose network listener runs now, by section (tlsd's may not, for
        want of keys at start, whatever the keys in force now say).
        """
        return {
            section: getattr(service, "listener", None) is not None
            for section, service in self.daemon_services.items()
        }

    def setServiceParent(self, parent: Any) -> None:  # noqa: N802
        super().setServiceParent(parent)
        if self.log_observer is not None:
            # twistd reads its log observer off the application, when no
            # --logger chose one.
            parent.setComponent(ILogObserver, self.log_observer)

    def privilegedStartService(self) -> None:  # noqa: N802
        """
        Listen on every socket, or on none, as StreamServerEndpointService
        listens when privileged: when one cannot be listened on, close those
        already open (their files leave RUNDIR at once) and raise
        L{StartupError}, one line naming what failed and the way out.
        makeService calls this before twistd daemonizes, so that the line
        reaches the terminal; twistd's own call (or startService) finds it
        done.  RUNDIR's instance lock is taken first (L{lock_rundir}) and
        given up if this fails, or when the service stops.
        """
        if self._listening:
            return
        # Each foreign private name a fast path needs, missing: one line each.
        compat.check()
        # Before any socket is created in it: RUNDIR must be ours and safe.
        # Raises UnsafeRundir (one line).
        prepare_rundir(self.config.rundir)
        self.lock_rundir()
        try:
            self._listen_all()
        except BaseException:
            self.unlock_rundir()
            raise

    def _listen_all(self) -> None:
        """L{privilegedStartService}'s listening, all or none."""
        self._listeners_up = Outcome()
        self._ready = Outcome()
        opened: list[Any] = []
        waits: list[Deferred[Any]] = []
        for leaf in leaves(self):
            if not IListener.providedBy(leaf):
                leaf.privilegedStartService()
                continue
            now: list[Any] = []
            leaf.listen().addBoth(now.append)
            if now and isinstance(now[0], Failure):
                for port in reversed(opened):
                    close_now(port)
                raise StartupError(cannot_listen(now[0].value, leaf, self.config))
            owner = daemon_of(leaf, self.config)
            name = owner.section if owner is not None else OWNERS.get(leaf.name)
            # A daemon's own RUNDIR socket (RUNDIR/tcp, an IPCService) is
            # ipcd's business, not an address to tell: its network listener
            # is, on a UNIX socket too.
            network = owner is not None and not isinstance(leaf, IPCService)
            if owner is not None and not network:
                name = None
            listening = leaf.listening().addCallback(
                self._listener, name, opened, network
            )
            waits.append(listening.addErrback(self._cannot_listen, leaf))
        self._listening = True
        # ipcd's own sockets exist now, and stay what they are while it runs.
        self.broker.own_sockets_listening()
        DeferredList(waits, fireOnOneErrback=True, consumeErrors=True).addCallbacks(
            lambda _: self._listeners_up.settle(self.addresses),
            lambda failure: self._listeners_up.settle(failure.value.subFailure),
        )

    def _listener(
        self, port: Any, name: str | None, opened: list[Any], network: bool
    ) -> Any:
        """
        Note where C{name} (pongd, tcpd, ...) listens, for L{log_ready};
        a daemon's C{network} listener's socket is ipcd's own.
        """
        opened.append(port)
        if network:  # (on a UNIX socket: never a lookup target)
            self.broker.own_listener(port.getHost())
        if name is not None:
            self.addresses.setdefault(name, []).append(listening_text(port))
        return port

    def _cannot_listen(self, failure: Failure, leaf: Any) -> Failure:
        """A listener whose endpoint failed later than start-up: one line."""
        if not failure.check(CancelledError):
            self.log.error(
                "ipcd: {why}", why=cannot_listen(failure.value, leaf, self.config)
            )
        return failure

    def when_listening(self) -> Deferred[dict[str, list[str]]]:
        """
        Fires once every listener listens, with where (L{addresses}); fails
        if one cannot.  Only after L{privilegedStartService}.
        """
        return self._listeners_up.wait()

    def when_ready(self) -> Deferred[dict[str, list[str]]]:
        """
        Fires once ipcd serves: started, and every listener listening (the
        "ipcd: ready" line is logged then), with L{addresses}; fails if a
        listener cannot listen.  The hook for a readiness notification.
        """
        return self._ready.wait()

    def log_ready(self) -> None:
        """One line per daemon with its addresses, then one "ready" line."""
        for name, where in self.addresses.items():
            self.log.info(
                "{daemon} listening on {addresses}",
                daemon=name,
                addresses=" and ".join(where),
            )
        self.log.info(
            "ipcd: ready: {listening}",
            listening=", ".join(
                f"{name} {' and '.join(where)}"
                for name, where in self.addresses.items()
            ),
            daemons=self.addresses,
        )

    def startService(self) -> None:
        self.privilegedStartService()
        # A decision line per lookup: written a few at a time (ipcd.logbatch).
        batch_with(self.reactor)
        super().startService()
        self.when_listening().addCallbacks(self._served, self._ready.settle)

    def _served(self, addresses: dict[str, list[str]]) -> None:
        self.log_ready()
        self._ready.settle(addresses)
        try:
            self._previous_hup = signal.signal(signal.SIGHUP, self._hangup)
        except ValueError:
            self._previous_hup = None  # not the main thread: no signal handling

    def stopService(self) -> Any:
        batch_with(None)  # the lines from now on may be the last ones
        self.reload_gate.stop()
        self._listening = False
        self.broker.own_sockets_listening(False)
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
            self._previous_hup = None
        stopped = super().stopService()
        # Once every socket is closed, as their removal may be a turn later.
        return stopped.addBoth(lambda result: (self.unlock_rundir(), result)[1])

    def _hangup(self, signum: int, frame: Any) -> None:
        # Through the gate, as ipcd reload: never while another is read.
        self.reactor.callFromThread(self.reload_gate.request)


# Settings bound to listeners or sockets already open: a reload keeps the old
# value and says a restart is needed.
_RESTART_KEYS = ("rundir", "pongd", "control_group", "metrics")


def _keep_daemon_restart_keys(
    old: Config, new: Config, listening: Mapping[str, bool] | None = None
) -> tuple[Config, list[str]]:
    """
    C{new}, with the old values of the protocol daemons' restart keys that
    changed, and those keys as reported (C{SCHEME_KEY}: C{tcp_listen}).
    Reported is only what a restart would change: nothing of a daemon off
    before and after (it takes the new values), of one turned on or off,
    the key that turns it (C{tcp_enabled}, not its listener too), and of
    one whose listener runs only with some settings, by C{listening} (by
    section: whether its network listener runs now), L{_listener_keys}.
    """
    changed: list[str] = []
    kept = False
    daemons = {section: dict(values) for section, values in new.daemons.items()}
    for daemon in old.registry.values():
        before, after = settings_of(old, daemon), settings_of(new, daemon)
        on = daemon.enabled(before)
        if not on and not daemon.enabled(after):
            # Off either way (--no-tcp, or udpd's default): nothing is bound
            # to its keys, and a restart would open nothing either.
            continue
        keys = [key for key in daemon.restart_keys if before[key] != after[key]]
        for key in keys:
            daemons.setdefault(daemon.section, {})[key] = before[key]
            kept = True
        if on != daemon.enabled(after):
            turning = [k for k in keys if daemon.enabled({**before, k: after[k]}) != on]
            keys = turning or keys
        elif on:
            was = (listening or {}).get(daemon.section, False)
            keys = _listener_keys(daemon, was, after, keys)
        changed += [f"{daemon.scheme}_{key}" for key in keys]
    if not kept:
        return new, changed
    frozen = {section: MappingProxyType(values) for section, values in daemons.items()}
    return replace(new, daemons=MappingProxyType(frozen)), changed


def _listener_keys(
    daemon: Any, was: bool, after: Mapping[str, Any], keys: list[str]
) -> list[str]:
    """
    C{keys}, as a daemon that runs before and after the reload and whose
    network listener runs only with some settings (its optional
    C{listens(settings)}: tlsd's needs a certificate or keys) needs: no
    C{listen} when it listens neither now (C{was}) nor with C{after} (a
    restart would not open it either), C{listen} when C{after} would start
    or stop it (only a restart does), at every reload until then.
    """
    listens = getattr(daemon, "listens", None)
    if listens is None:
        return keys
    will = listens(after)
    if not was and not will:
        return [key for key in keys if key != "listen"]
    if was != will and "listen" not in keys:
        return [*keys, "listen"]
    return keys


_log = Logger(namespace="ipcd")


def _start_failed(error: Exception) -> SystemExit:
    """
    The exit with C{error}'s one line: printable and bounded.  It quotes
    what the configuration names as it is (a file, a host, a socket path):
    a newline in one made two lines, a terminal escape was written to the
    operator's terminal, and a name of 3 MB made a line as long.
    """
    return SystemExit(f"ipcd: {one_line(str(error))}")


def makeService(options: Options, reactor: IHostReactor | None = None) -> IPCDService:  # noqa: N802
    """
    Build ipcd's service tree (nothing listens while it is built), then
    start its privileged phase, where its listeners listen, here: before
    twistd starts logging or daemonizes, so that a failure is one line on
    the terminal (SystemExit, exit status 1) with nothing left in RUNDIR.
    twistd's own privilegedStartService then finds it done; startService
    logs "ipcd: ready" once every listener is up (L{IPCDService.when_ready}).
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    twistd_rundir = (getattr(options, "parent", None) or {}).get("rundir")
    if not options["rundir"] and twistd_rundir not in (None, "."):
        _log.warn(
            "twistd --rundir {chdir} is twistd's working directory, not ipcd's "
            "RUNDIR, which is {rundir}; put ipcd's after the plugin name: "
            "twistd ipcd --rundir DIR",
            chdir=twistd_rundir,
            rundir=options.config.rundir,
        )
    raise_open_files_limit(_log)
    config = options.config
    # What only a reactor can check (an endpoint plugin's parser, say), each
    # daemon says in one line before anything listens.
    for daemon in config.registry.enabled(config):
        try:
            daemon.verify(reactor, settings_of(config, daemon))
        except StartupError as e:
            raise _start_failed(e) from None
    try:
        service = IPCDService(config, reactor, options.load_config)
    except (StartupError, SocketPathError) as e:
        # SocketPathError: RUNDIR too long (or with a NUL) for its sockets.
        raise _start_failed(e) from None
    twistd = getattr(options, "parent", None) or {}
    chosen = twistd.get("logger") or twistd.get("logfile")
    if twistd.get("nodaemon") and not chosen:
        # twistd -n logs to stdout: ipcd's observer writes the same lines,
        # without Twisted's one per listener and factory.
        service.log_observer = text_observer()
    # Say clearly, in one line, before anything is created in RUNDIR, that it
    # is unsafe or that another instance is running; then listen (what
    # twistd would do after daemonizing, when a failure is no longer said
    # on the terminal).
    notifier = Notifier.from_environment()
    if notifier is not None:
        service.readiness = Readiness(notifier, service)
        service.readiness.setServiceParent(service)
    try:
        prepare_rundir(options.config.rundir)
        # Before anything is removed or placed in RUNDIR: one ipcd there.
        service.lock_rundir()
        # ipcd's sockets take their names whatever another user put there
        # (ipcd.planted): only a live socket of ipcd's user is refused, here
        # before any listens.
        for path in service.socket_paths():
            # systemd's socket (socket activation) is adopted, not cleared.
            if not inherited().holds(path, os.path.basename(path)):
                refuse_own_live(path)
        service.privilegedStartService()
    except (UnsafeRundir, SocketInUse, StartupError) as e:
        service.unlock_rundir()
        raise _start_failed(e) from None
    # What start-up made stays for ipcd's life: the cyclic collector (and
    # MemoryTrim's collections) need not walk it again; a full collection
    # takes about 1 ms instead of 50.
    gc.freeze()
    return service
