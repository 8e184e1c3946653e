"""
The one interface for protocol daemons, and the registry that finds them.

A protocol daemon (tcpd, tlsd, websocketd, udpd, or a third party's) is one
object per URI scheme providing L{IProtocolDaemon}: an outbound half
(connect a route for a local client), an inbound half (its listeners, which
accept remote peers and ask the broker what they may reach through
L{ipcd.inbound}), and what it owns of ipcd: its configuration section, its
command-line flags, its status lines, the settings a reload cannot change,
its control socket C{RUNDIR/SCHEME} and its start-up hints.

Daemons are Twisted plugins: L{registry} finds every object providing
L{IProtocolDaemon} in the plugin package (C{twisted.plugins} by default,
where C{twisted/plugins/ipcd_daemons.py} registers the four built-in ones).
Nothing else in ipcd names a daemon: the broker, the configuration, the
command line, the control socket and the service tree all ask the registry.

Plugin objects are module-level singletons, found by discovery: like Twisted's
endpoint-parser plugins, which are given the reactor, they are given what
they need (the broker, their settings) by each call.

The built-in daemons live beside it, one module or package each:
L{ipcd.daemons.tcp}, L{ipcd.daemons.tls}, L{ipcd.daemons.websocket},
L{ipcd.daemons.udp}, and the external daemon's outbound half on
C{RUNDIR/SCHEME} (L{ipcd.daemons.external}); their listeners share
L{ipcd.daemons.listeners} and L{ipcd.inbound}.  This module imports none of
them: the registry finds them as plugins.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from types import MappingProxyType, ModuleType
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface, implementer

from ipcd.checkers import boolean, endpoint
from ipcd.host import IDaemonHost
from ipcd.listenerkeys import UnsafeKey, check_listener_key
from ipcd.reactors import IHostReactor


class StartupError(RuntimeError):
    """ipcd cannot start; the message is one line: what failed, the way out."""


@dataclass(frozen=True)
class Setting:
    """
    One key of a daemon's configuration section.  C{check(value)} returns the
    value to keep, or raises L{ipcd.checkers.Expected} (C{expected ..., got
    ...}) or L{ipcd.checkers.Invalid} (said as it is).  C{default} is used as
    is (it is not checked).  A C{path} setting names a file: relative in a
    configuration file, it is relative to that file's directory.
    """

    key: str
    check: Callable[[Any], Any]
    default: Any
    doc: str = ""
    path: bool = False


@dataclass(frozen=True)
class Flag:
    """
    A command-line option a daemon contributes to L{ipcd.options.Options}:
    C{--NAME VALUE} when C{takes_value}, else C{--NAME}.  C{apply(value)}
    (C{value} is None for a flag without one) returns the part of the
    daemon's section the option sets, in the configuration file's shape.
    When several of a daemon's flags are given, they apply in the order the
    daemon lists them (so C{--no-tcp}, listed last, wins over C{--tcp}).
    """

    name: str
    doc: str
    apply: Callable[[str | None], Mapping[str, Any]]
    takes_value: bool = False


class IProtocolDaemon(Interface):
    """
    A protocol daemon: one provider per URI scheme, found through the
    registry: a module-level object in a Twisted plugin module that provides
    L{twisted.plugin.IPlugin} too (C{@implementer(IPlugin, IProtocolDaemon)}),
    or Twisted's discovery does not see it.
    """

    scheme: str = Attribute(
        "The URI scheme it serves (C{'tcp'}), also its control socket's name "
        "in RUNDIR (C{RUNDIR/tcp}), which is never a lookup target."
    )
    section: str = Attribute(
        "Its configuration section and service name (C{'tcpd'}); its "
        "listeners' connection limits go by this name too."
    )
    settings: Sequence[Setting] = Attribute(
        "The keys of its section (L{Setting}), with checkers and defaults."
    )
    flags: Sequence[Flag] = Attribute(
        "Its command-line options (L{Flag}), e.g. C{--tcp ENDPOINT}, C{--no-tcp}."
    )
    also_schemes: Sequence[str] = Attribute(
        "Optional: further URI schemes whose routes it serves (websocketd: "
        "C{wss} beside C{ws}); the registry finds it by these too, but "
        "lists it once, under L{scheme}."
    )
    restart_keys: Sequence[str] = Attribute(
        "Keys of its section bound to open sockets: a reload keeps their old "
        "values and reports them (as C{SCHEME_KEY}) as needing a restart."
    )

    def enabled(settings: Mapping[str, Any]) -> bool:
        """
        Whether the daemon runs with these settings (its section's, defaults
        filled in): its outbound half serves routes and its inbound half is
        made only then.
        """

    def connect(
        broker: IDaemonHost, target: Any, client: Any
    ) -> Deferred[socket.socket]:
        """
        The outbound half: connect C{target} (an
        L{ipcd.resolution.RemoteTarget} of this scheme) on behalf of
        C{client} (an L{ipcd.identity.Peer}) for C{broker} (the
        L{ipcd.host.IDaemonHost}: its C{reactor}, its C{config}).  Fires with a
        connected socket that the broker hands to the client as is, or fails
        with L{ipcd.errors.Refused}.  The broker bounds it with its connect
        deadline and cancels the Deferred when that passes: the daemon must
        then close whatever socket it opened.
        """

    def makeService(broker: IDaemonHost, settings: Mapping[str, Any]) -> Any:  # noqa: N802
        """
        The inbound half: its listeners as one
        L{twisted.application.service.IService} named after L{section}
        (including C{RUNDIR/SCHEME}), or None.  Called only when enabled.
        Listeners accept remote peers and ask C{broker.open_inbound} (through
        L{ipcd.inbound}) what they may reach; the control socket asks
        C{broker.open_uri}.
        """

    def status(settings: Mapping[str, Any]) -> Mapping[str, Any]:
        """Its lines in C{ipcd status}'s configuration: plain JSON values."""

    def verify(reactor: IHostReactor, settings: Mapping[str, Any]) -> None:
        """
        Before anything listens: check what only a reactor can (an endpoint
        plugin's parser, say).  Raises L{StartupError} with one line.
        """

    def hint(error: Exception) -> str:
        """
        The way out when one of its network listeners cannot listen
        (C{use --tcp ENDPOINT or --no-tcp}), for a one-line start-up error.
        """


def listen_flag(value: str | None) -> dict[str, Any]:
    """What C{--FLAG ENDPOINT} sets in the daemon's section."""
    return {"enabled": True, "listen": value}


def listen_off(value: str | None) -> dict[str, Any]:
    """What C{--no-FLAG} sets in the daemon's section."""
    return {"enabled": False}


def listen_hint(error: Exception, flag: str) -> str:
    """The way out when a listener cannot listen (C{use --tcp ENDPOINT ...})."""
    fitting = cause_hint(error, f"use --{flag} ENDPOINT", f"--no-{flag}")
    if fitting is not None:
        return fitting
    code = getattr(getattr(error, "socketError", error), "errno", None)
    another = "another ipcd? " if code == errno.EADDRINUSE else ""
    return f"{another}use --{flag} ENDPOINT or --no-{flag}"


def cause_hint(error: Exception, use: str, off: str) -> str | None:
    """
    The way out that fits the cause when a network listener cannot listen
    (a Twisted C{CannotListenError}), where "use another endpoint" is too
    little to go on: a privileged port without the privilege, or an address
    that is none of this host's.  C{use} is how to name another endpoint
    (C{use --tcp ENDPOINT}), C{off} how to do without (C{--no-tcp}).
    C{None} for any other cause.
    """
    cause = getattr(error, "socketError", error)
    code = getattr(cause, "errno", None)
    port = getattr(error, "port", None)
    if code in (errno.EACCES, errno.EPERM) and isinstance(port, int):
        lowest = unprivileged_port_start()
        if 0 < port < lowest:
            return (
                f"ports below {lowest} take root or CAP_NET_BIND_SERVICE, which "
                "systemd grants with AmbientCapabilities=CAP_NET_BIND_SERVICE, "
                f"or binds for ipcd with socket activation; or {use} with a "
                f"port of {lowest} or more, or {off}"
            )
    if code == errno.EADDRNOTAVAIL or isinstance(cause, socket.gaierror):
        interface = getattr(error, "interface", None)
        name = "names" if isinstance(cause, socket.gaierror) else "is"
        address = f"{interface} {name}" if interface else "that is"
        return (
            f"{address} none of this host's addresses: {use} with one of those "
            f"that ip address lists, or {off}"
        )
    return None


def unprivileged_port_start() -> int:
    """The lowest port the kernel lets a process without privilege bind."""
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1024  # the kernel's default, and every other Unix's


def check_listener(reactor: IHostReactor, daemon: IProtocolDaemon, listen: str) -> None:
    """
    A plugin's parser (systemd:, ...) runs only with a reactor, so the config
    could not: try it here, to say in one line what is wrong (systemd passed
    no socket at that index, say).
    """
    from twisted.internet.endpoints import serverFromString

    try:
        check_listener_key(listen)
        endpoint = serverFromString(reactor, listen)
    except Exception as e:
        raise StartupError(
            f"cannot make {daemon.section}'s listener {listen!r}: "
            f"{listener_failure(listen, e)} ({daemon.hint(e)})"
        ) from None
    refuse_unfit_adopted(
        endpoint,
        f"{daemon.section}'s listener {listen!r}",
        daemon.hint(ValueError()),
    )


def listener_failure(listen: str, error: Exception) -> str:
    """
    Why Twisted could not make endpoint C{listen}, in one line: a
    C{systemd:} one whose index or name systemd did not pass says so (as
    udpd's does), not in Twisted's C{IndexError}; a file it cannot read
    (an C{ssl:} key) is named.
    """
    if listen.lower().startswith("systemd:") and isinstance(
        error, (IndexError, KeyError)
    ):
        return "systemd passed no such socket"
    if isinstance(error, UnsafeKey):
        return str(error)
    if isinstance(error, OSError) and error.filename:  # ssl:'s key or certificate
        return f"cannot read {error.filename}: {error.strerror}"
    return " ".join(f"{type(error).__name__}: {error}".split())


def refuse_unfit_adopted(endpoint: Any, what: str, hint: str) -> None:
    """
    Raise L{StartupError} (one line: C{what} cannot be made, and C{hint})
    when C{endpoint} adopts a socket unfit to listen on (L{unfit_adopted}).
    """
    why = unfit_adopted(endpoint)
    if why is not None:
        raise StartupError(
            f"cannot make {what}: the inherited socket is {why} (give it a "
            f"listening stream socket: ListenStream= in the socket unit; {hint})"
        )


def unfit_adopted(endpoint: Any) -> str | None:
    """
    Why the socket a C{systemd:} endpoint adopts cannot be listened on as
    it says (not listening, a datagram socket, another family), or None;
    Twisted would take it as it is.
    """
    from twisted.internet.endpoints import AdoptedStreamServerEndpoint

    from ipcd.activation import unfit_fd

    if not isinstance(endpoint, AdoptedStreamServerEndpoint):
        return None
    return unfit_fd(endpoint.fileno, endpoint.addressFamily)


def listener_settings(
    section: str,
    default_listen: str,
    enabled: bool = True,
    check_listen: Callable[[Any], Any] | None = None,
) -> tuple[Setting, Setting]:
    """
    The C{enabled} and C{listen} keys of a L{ListeningDaemon}'s section
    (C{listen} an endpoint string unless C{check_listen} says otherwise).
    """
    return (
        Setting("enabled", boolean, enabled, f"run {section}"),
        Setting(
            "listen", check_listen or endpoint, default_listen, f"{section}'s listener"
        ),
    )


class ListeningDaemon:
    """
    A protocol daemon with one network listener at its section's C{listen}
    (an endpoint string) and an C{enabled} key (L{listener_settings} makes
    both).  It declares its C{scheme},
    C{section}, C{settings}, C{default_listen} and
    C{service} (called as C{service(daemon, broker, settings)} by
    L{makeService}); it then has the rest of what the registry asks of
    every daemon alike: the options C{--FLAG ENDPOINT} and C{--no-FLAG}, the
    start-up check of its endpoint string (L{verify}), the way out when it
    cannot listen (L{hint}), its restart keys and its name.
    """

    scheme: str
    section: str
    default_listen: str
    service: Callable[[Any, IDaemonHost, Mapping[str, Any]], Any]
    # What --FLAG's help says the listener is, and --no-FLAG's help.
    listen_doc: str = ""
    off_doc: str = ""
    restart_keys: Sequence[str] = ("enabled", "listen")

    @property
    def flag(self) -> str:
        """Its listener's option, C{--FLAG}: its scheme unless it says."""
        return self.scheme

    @property
    def flags(self) -> tuple[Flag, ...]:
        what = self.listen_doc or (
            f"an endpoint string (default {self.default_listen})"
        )
        return (
            Flag(
                self.flag,
                f"{self.section}'s listener, {what}.",
                listen_flag,
                takes_value=True,
            ),
            Flag(
                f"no-{self.flag}",
                self.off_doc or f"Do not run {self.section}.",
                listen_off,
            ),
        )

    def __repr__(self) -> str:
        return f"<{self.section}>"

    def enabled(self, settings: Mapping[str, Any]) -> bool:
        return bool(settings["enabled"])

    def makeService(  # noqa: N802 (Twisted's name)
        self, broker: IDaemonHost, settings: Mapping[str, Any]
    ) -> Any:
        return self.service(self, broker, settings)

    def verify(self, reactor: IHostReactor, settings: Mapping[str, Any]) -> None:
        check_listener(reactor, self, settings["listen"])  # type: ignore[arg-type]

    def hint(self, error: Exception) -> str:
        return listen_hint(error, self.flag)


class IOutbound(Interface):
    """
    What the broker calls for a route of one scheme: a daemon's outbound
    half bound to a broker, an external daemon on C{RUNDIR/SCHEME}, or a test
    double.
    """

    scheme: str = Attribute("The URI scheme it serves.")

    def connect(target: Any, client: Any) -> Deferred[socket.socket]:
        """As L{IProtocolDaemon.connect}, for the broker it is bound to."""


@implementer(IOutbound)
class BoundOutbound:
    """A daemon's outbound half bound to one broker."""

    def __init__(self, daemon: IProtocolDaemon, broker: IDaemonHost) -> None:
        self.scheme = daemon.scheme
        self.daemon = daemon
        self.broker = broker

    def connect(self, target: Any, client: Any) -> Deferred[socket.socket]:
        return self.daemon.connect(self.broker, target, client)


class RegistryError(StartupError, ValueError):
    """Two daemons claim the same scheme or section."""


class Registry(Mapping[str, IProtocolDaemon]):
    """
    The protocol daemons by scheme (an immutable mapping).  C{origins} says
    where each came from (by C{id}), for the error when two collide.
    """

    def __init__(
        self,
        daemons: Iterable[IProtocolDaemon] = (),
        origins: Mapping[int, str] | None = None,
    ) -> None:
        origins = origins or {}

        def where(daemon: IProtocolDaemon) -> str:
            return origins.get(id(daemon), type(daemon).__module__)

        by_scheme: dict[str, IProtocolDaemon] = {}
        by_section: dict[str, IProtocolDaemon] = {}
        # Schemes a daemon serves besides its own: found, not listed.
        extra: dict[str, IProtocolDaemon] = {}
        for daemon in daemons:
            schemes = [daemon.scheme, *getattr(daemon, "also_schemes", ())]
            claims = [(by_section, daemon.section)] + [(None, s) for s in schemes]
            for table, name in claims:
                if table is None:  # a scheme: its own or another's extra
                    other = by_scheme.get(name) or extra.get(name)
                else:
                    other = table.get(name)
                if other is not None and other is not daemon:
                    raise RegistryError(
                        f"two protocol daemons claim {name!r}: {other!r} from "
                        f"{where(other)} and {daemon!r} from {where(daemon)} "
                        "(remove one of those plugins)"
                    )
            by_scheme[daemon.scheme] = by_section[daemon.section] = daemon
            for scheme in getattr(daemon, "also_schemes", ()):
                extra[scheme] = daemon
        self._by_scheme = by_scheme
        self._extra = extra
        self._by_section = by_section

    def __getitem__(self, scheme: str) -> IProtocolDaemon:
        if scheme in self._by_scheme:
            return self._by_scheme[scheme]
        return self._extra[scheme]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._by_scheme))

    def __len__(self) -> int:
        return len(self._by_scheme)

    def __repr__(self) -> str:
        return f"Registry({', '.join(self)})"

    def by_section(self, section: str) -> IProtocolDaemon | None:
        """The daemon whose configuration section is C{section}, if any."""
        return self._by_section.get(section)

    @property
    def sections(self) -> list[str]:
        return sorted(self._by_section)

    @property
    def schemes(self) -> list[str]:
        """Every scheme a daemon serves: its own and its others (C{wss})."""
        return sorted([*self._by_scheme, *self._extra])

    def enabled(self, config: Any) -> list[IProtocolDaemon]:
        """The daemons C{config} enables, by scheme."""
        return [d for d in self.values() if d.enabled(settings_of(config, d))]


def off_reason(daemon: IProtocolDaemon) -> str:
    """That C{daemon} does not run here, and how to run it."""
    listen = next((f for f in daemon.flags if f.takes_value), None)
    how = f"--{listen.name} ENDPOINT" if listen is not None else "its section"
    return f"{daemon.section} is off on this ipcd (start it with {how})"


def settings_of(config: Any, daemon: IProtocolDaemon) -> Mapping[str, Any]:
    """C{daemon}'s section of C{config} (a L{ipcd.config.Config}), with defaults."""
    given = config.daemons.get(daemon.section, {})
    return MappingProxyType(
        {s.key: given.get(s.key, s.default) for s in daemon.settings}
    )


def registry(*packages: ModuleType) -> Registry:
    """
    The protocol daemons that Twisted plugins provide in C{packages}
    (default: C{twisted.plugins}).
    """
    from twisted.plugin import getPlugins

    if not packages:
        import twisted.plugins

        packages = (twisted.plugins,)
    found: list[IProtocolDaemon] = []
    for package in packages:
        found.extend(getPlugins(IProtocolDaemon, package))
    return Registry(found, _origins(found, packages))


def _origins(
    daemons: Sequence[IProtocolDaemon], packages: Sequence[ModuleType]
) -> dict[int, str]:
    """The plugin module (in C{packages}) that holds each of C{daemons}, by C{id}."""
    import sys

    wanted = {id(daemon) for daemon in daemons}
    prefixes = tuple(package.__name__ + "." for package in packages)
    origins: dict[int, str] = {}
    for name, module in list(sys.modules.items()):
        if name.startswith(prefixes):
            for value in vars(module).values():
                if id(value) in wanted:
                    origins.setdefault(id(value), name)
    return origins


@cache
def default_registry() -> Registry:
    """L{registry}() of C{twisted.plugins}, found once per process."""
    return registry()
