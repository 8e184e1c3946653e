"""
C{twistd ipcd}: command-line options and the service tree they build.

The plugin in C{twisted/plugins/ipcd_plugin.py} names this module by string,
so C{twistd --help} imports nothing of ours.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from twisted.application.service import MultiService
from twisted.logger import Logger
from twisted.python import usage

from ipcd.broker import Broker, LookupFactory
from ipcd.config import Config, ConfigError, load_config
from ipcd.control import CONTROL_MODE, CONTROL_NAME, ControlFactory, status_report
from ipcd.endpoints import BROKER_NAME
from ipcd.names import (
    SocketInUse,
    UnsafeRundir,
    clear_stale_socket,
    prepare_rundir,
    socket_path,
)
from ipcd.services import IPCService
from ipcd.services.pongd import pongd
from ipcd.transports.tcp import SCHEME, TcpService
from ipcd.wire import PartialMessageBudget


def _pair(option: str, value: str) -> tuple[str, str]:
    words = value.split()
    if len(words) != 2:
        raise usage.UsageError(f'--{option} takes "FROM TO" (two words), got {value!r}')
    return words[0], words[1]


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "ipcd: finds libipc services, local or remote, applies the admin's "
        "redirections and routes, and hands the connected socket to the client."
    )
    optParameters = [
        ["config", "c", None, "The TOML configuration file."],
        [
            "rundir",
            None,
            None,
            "The socket directory (else config, else $RUNDIR, else /tmp/libipc-run).",
        ],
        [
            "tcp",
            None,
            None,
            "tcpd's listener, an endpoint string "
            "(default tcp:9000:interface=127.0.0.1).",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["redirects"] = []
        self["rules"] = []
        self["grants"] = []
        self["external-daemons"] = []
        self["routes"] = []
        self["pongd"] = None
        self["no-tcp"] = False

    def opt_redirect(self, value: str) -> None:
        """Admin redirection "FROM TO" (repeatable)."""
        self["redirects"].append(_pair("redirect", value))

    def opt_route(self, value: str) -> None:
        """Admin route "SERVICE URI" (repeatable)."""
        self["routes"].append(_pair("route", value))

    def opt_allow(self, value: str) -> None:
        """Firewall rule "DIRECTION SERVICE [PEER]" (repeatable, in order)."""
        self["rules"].append(f"allow {value}")

    def opt_deny(self, value: str) -> None:
        """Firewall rule "DIRECTION SERVICE [PEER]" (repeatable, in order)."""
        self["rules"].append(f"deny {value}")

    def opt_grant(self, value: str) -> None:
        """
        Let clients matching PEER reach SERVICE's socket although their own
        permissions would not: "SERVICE PEER" (repeatable).
        """
        self["grants"].append(value)

    def opt_external_daemon(self, value: str) -> None:
        """A scheme served by an external daemon on RUNDIR/SCHEME (repeatable)."""
        self["external-daemons"].append(value)

    def opt_pongd(self) -> None:
        """Run pongd, the echo service (the default)."""
        self["pongd"] = True

    def opt_no_pongd(self) -> None:
        """Do not run pongd."""
        self["pongd"] = False

    def opt_no_tcp(self) -> None:
        """Do not run tcpd."""
        self["no-tcp"] = True

    def overrides(self) -> dict[str, Any]:
        """The command line, in the configuration file's shape."""
        layer: dict[str, Any] = {}
        if self["rundir"]:
            layer["rundir"] = self["rundir"]
        if self["redirects"]:
            layer["redirects"] = dict(self["redirects"])
        if self["routes"]:
            layer["routes"] = dict(self["routes"])
        if self["rules"]:
            layer["rules"] = list(self["rules"])
        if self["grants"]:
            layer["grants"] = list(self["grants"])
        if self["external-daemons"]:
            layer["ipcd"] = {"external_daemons": list(self["external-daemons"])}
        if self["pongd"] is not None:
            layer["pongd"] = {"enabled": self["pongd"]}
        if self["tcp"]:
            layer["tcpd"] = {"enabled": True, "listen": self["tcp"]}
        if self["no-tcp"]:
            layer["tcpd"] = {"enabled": False}
        return layer

    def postOptions(self) -> None:
        try:
            self.config = load_config(self["config"], self.overrides())
        except ConfigError as e:
            raise usage.UsageError(str(e))


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
        reactor: Any,
        reload_config: Callable[[], Config] | None = None,
    ) -> None:
        super().__init__()
        self.setName("ipcd")
        self.config = config
        self.reactor = reactor
        self.broker = Broker(config, reactor)
        self._reload_config = reload_config
        self._previous_hup: Any = None
        counters = self.broker.counters
        # One budget for the partial messages of all of ipcd's connections;
        # the limits are read when used, so a reload applies.
        self.partial_budget = budget = PartialMessageBudget(
            lambda: self.config.partial_message_budget, counters, reactor
        )
        IPCService(
            BROKER_NAME,
            LookupFactory(self.broker, reactor, budget),
            config.rundir,
            reactor,
        ).setServiceParent(self)
        handlers = {"status": lambda: status_report(self.broker), "reload": self.reload}
        IPCService(
            CONTROL_NAME,
            ControlFactory(
                handlers,
                lambda: self.config.control_timeout,
                reactor,
                budget,
                counters,
            ),
            config.rundir,
            reactor,
            mode=CONTROL_MODE if config.control_group is None else 0o660,
            group=config.control_group,
        ).setServiceParent(self)
        if config.pongd:
            pongd(
                config.rundir,
                reactor=reactor,
                max_message_size=config.max_message_size,
                idle_timeout=lambda: self.config.idle_timeout,
                partial_budget=budget,
                counters=counters,
            ).setServiceParent(self)
        if config.tcp_listen is not None:
            TcpService(self.broker, config.tcp_listen).setServiceParent(self)

    def socket_paths(self) -> list[str]:
        """The C{RUNDIR} sockets of this instance and its components."""
        names = [BROKER_NAME, CONTROL_NAME]
        if self.config.pongd:
            names.append("pong")
        if self.config.tcp_listen is not None:
            names.append(SCHEME)
        return [socket_path(self.config.rundir, name) for name in names]

    def reload(self) -> dict[str, Any]:
        """
        Re-read the configuration.  A valid one applies to new connections
        (existing ones are untouched); an invalid one is refused and the old
        one stays.
        """
        if self._reload_config is None:
            return {
                "ok": False,
                "error": "this instance has no configuration to reload",
            }
        try:
            new = self._reload_config()
        except ConfigError as e:
            self.log.error(
                "reload refused, keeping the old configuration: {error}", error=str(e)
            )
            return {"ok": False, "error": str(e)}
        restart = [
            key
            for key in _RESTART_KEYS
            if getattr(new, key) != getattr(self.config, key)
        ]
        if restart:
            self.log.warn(
                "reload: changes to {keys} apply after a restart",
                keys=", ".join(restart),
            )
            new = replace(new, **{key: getattr(self.config, key) for key in restart})
        self.config = self.broker.config = new
        self.log.info("configuration reloaded from {source}", source=new.source)
        return {"ok": True, "restart_needed": restart}

    def startService(self) -> None:
        # Before any socket is created in it: RUNDIR must be ours and safe.
        # makeService already checked (and said so in one line); this covers
        # an IPCDService built directly.  Raises UnsafeRundir.
        prepare_rundir(self.config.rundir)
        super().startService()
        try:
            self._previous_hup = signal.signal(signal.SIGHUP, self._hangup)
        except ValueError:
            self._previous_hup = None  # not the main thread: no signal handling

    def stopService(self) -> Any:
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
            self._previous_hup = None
        return super().stopService()

    def _hangup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload)


# Settings bound to listeners or sockets already open: a reload keeps the old
# value and says a restart is needed.
_RESTART_KEYS = ("rundir", "pongd", "tcp_listen", "control_group")


def makeService(options: Options, reactor: Any = None) -> IPCDService:  # noqa: N802
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    service = IPCDService(
        options.config,
        reactor,
        lambda: load_config(options["config"], options.overrides()),
    )
    # Say clearly, in one line, before anything is created in RUNDIR, that it
    # is unsafe or that another instance is running.
    try:
        prepare_rundir(options.config.rundir)
        for path in service.socket_paths():
            clear_stale_socket(path)
    except (UnsafeRundir, SocketInUse) as e:
        raise SystemExit(f"ipcd: {e}")
    return service
