"""
C{twistd ipcd}'s command line: L{Options} parses it into the configuration
(L{Options.config}, through L{ipcd.config.load_config}), and
L{usage_line} says an option error in one line.

L{ipcd.tap} builds the service tree from these options and re-exports
L{Options}: twistd's plugin names that module, not this one.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.python import usage

from ipcd import version
from ipcd.compat import twisted as compat_twisted
from ipcd.config import Config, ConfigError, load_config
from ipcd.daemons import Flag, Registry, StartupError, default_registry
from ipcd.stdout import stdout_to_devnull


def _pair(option: str, value: str, shape: str = "FROM TO") -> tuple[str, str]:
    words = value.split()
    if len(words) != 2:
        raise usage.UsageError(f'--{option} takes "{shape}" (two words), got {value!r}')
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
            "The socket directory (else config, else $RUNDIR, else "
            "/tmp/libipc-run).  Under twistd it goes after 'ipcd': "
            "twistd's own --rundir, before it, is twistd's working directory.",
        ],
        [
            "metrics",
            None,
            None,
            "Serve Prometheus metrics on ENDPOINT: a bare port (9101) listens "
            "on 127.0.0.1 only; else a Twisted endpoint string (off by default).",
        ],
    ]

    def __init__(self, registry: Registry | None = None) -> None:
        super().__init__()
        if registry is None:
            try:
                registry = default_registry()
            except StartupError as e:  # two plugins claim one scheme
                raise SystemExit(f"ipcd: {e}") from None
        self.registry = registry
        # A docstring's line breaks and indentation are not the help's.
        self.docs = {name: " ".join(doc.split()) for name, doc in self.docs.items()}
        self["redirects"] = []
        self["rules"] = []
        self["grants"] = []
        self["external-daemons"] = []
        self["routes"] = []
        self["pongd"] = None
        for daemon in self.registry.values():
            for flag in daemon.flags:
                self._add_flag(flag)

    def _add_flag(self, flag: Flag) -> None:
        """A protocol daemon's option, as optParameters/optFlags would add it."""
        name = flag.name
        if name in self.synonyms:
            raise ValueError(f"a protocol daemon's option --{name} is taken")
        self[name] = self.defaults[name] = None

        def given(option: str, value: str) -> None:
            self[name] = value if flag.takes_value else True

        if not compat_twisted.add_option(self, name, given):
            return  # not on this Twisted's command line (see ipcd.compat)
        self.longOpt.append(f"{name}=" if flag.takes_value else name)
        self.docs[name] = flag.doc
        self.synonyms[name] = name

    def parseOptions(self, options: list[str] | None = None) -> None:  # noqa: N802
        try:
            super().parseOptions(options)
        except BrokenPipeError:
            # --help's reader is gone (ipcd --help | head): no traceback.
            stdout_to_devnull()
            raise SystemExit(1) from None
        except usage.UsageError as e:
            if self.parent is None:
                raise
            # Under twistd (our parent): its handler would print all of its
            # help before the one line that matters.  SystemExit with a
            # message prints just that line and exits with status 1.
            raise SystemExit(f"ipcd: {usage_line(e, 'twistd ipcd')}") from None

    def parseArgs(self, *args: str) -> None:  # noqa: N802
        if args:
            # Under twistd, the unquoted style (--allow in pong): say so.
            raise usage.UsageError(
                f"unexpected argument {args[0]!r}: give an option's words as one "
                'quoted value (--allow "in pong")'
            )

    def opt_version(self) -> None:
        """Print ipcd's version and exit."""
        print(f"ipcd {version()}")
        sys.exit(0)

    def opt_redirect(self, value: str) -> None:
        """Admin redirection "FROM TO" (repeatable)."""
        self["redirects"].append(_pair("redirect", value))

    def opt_route(self, value: str) -> None:
        """Admin route "SERVICE URI" (repeatable)."""
        self["routes"].append(_pair("route", value, "SERVICE URI"))

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

    def overrides(self) -> dict[str, Any]:
        """The command line, in the configuration file's shape."""
        layer: dict[str, Any] = {}
        if self["rundir"] is not None:  # "" is refused, not taken as none
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
        if self["metrics"] is not None:
            layer["metrics"] = {"listen": self["metrics"]}
        for daemon in self.registry.values():
            # In the order the daemon lists its flags: --no-tcp wins.
            for flag in daemon.flags:
                value = self[flag.name]
                if value is not None:
                    section = layer.setdefault(daemon.section, {})
                    section.update(flag.apply(value if flag.takes_value else None))
        return layer

    def load_config(self) -> Config:
        """The configuration: the file named by --config, then the options."""
        return load_config(self["config"], self.overrides(), registry=self.registry)

    def postOptions(self) -> None:  # noqa: N802
        if self["config"] == "":
            raise usage.UsageError("--config takes a file name, got ''")
        try:
            self.config = self.load_config()
        except ConfigError as e:
            raise BadConfig(str(e)) from None


class BadConfig(usage.UsageError):
    """The configuration (file or command line) is invalid: the message says
    where and why, so no pointer to the options' help follows it."""


def usage_line(error: usage.UsageError, command: str) -> str:
    """An option error in one line: the error, and where the help is."""
    if isinstance(error, BadConfig):
        return str(error)
    return f"{error} (see {command} --help)"
