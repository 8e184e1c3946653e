"""
Configuration: a TOML file and command-line options become one validated,
immutable L{Config}.

Every key is optional: the defaults below make a useful local instance.  The
command line is applied as a second TOML-shaped layer over the file, so both
go through the same validation and errors name where the bad value came from.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from ipcd.checkers import (
    Expected,
    Invalid,
    boolean,
    daemon_schemes,
    group_name,
    metrics_endpoint,
    non_empty_string,
    non_negative_number,
    positive_int,
    positive_number,
    prefix_length,
)
from ipcd.compat import twisted as compat_twisted
from ipcd.daemons import Registry, default_registry
from ipcd.listenerkeys import wrapped
from ipcd.logs import printable
from ipcd.names import (
    BROKER_NAME,
    CONTROL_NAME,
    InvalidServiceName,
    validate_service_name,
)
from ipcd.policy import Grant, Rule, RuleError, parse_grant, parse_rule
from ipcd.regularfile import NotAFile, TooLarge, read_regular
from ipcd.routes import URI, RouteError, parse_uri
from ipcd.rundir import normal_rundir, resolve_rundir
from ipcd.srv import dns_servers
from ipcd.wire import DEFAULT_MAX_MESSAGE_SIZE


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says where and why."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


# The longest configuration error said whole.  A value is quoted in its
# error, and a value may be as long as the file (1 MiB): said whole, that
# was a line as long in the log, and an answer to 'ipcd reload' longer
# than the control socket carries ("cannot reach ipcd's control socket").
MAX_ERROR = 1000


def one_line(message: str) -> str:
    """
    C{message} as one line to print: each character that does not print
    escaped (a file's name may hold a newline or a terminal escape), its
    middle left out if it is longer than L{MAX_ERROR}.
    """
    message = printable(message)
    if len(message) <= MAX_ERROR:
        return message
    head, tail = message[: MAX_ERROR * 2 // 3], message[-MAX_ERROR // 4 :]
    left_out = len(message) - len(head) - len(tail)
    return f"{head}... ({left_out} characters left out) ...{tail}"


@dataclass(frozen=True)
class Config:
    rundir: str
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    lookup_timeout: float = 5.0
    connect_timeout: float = 5.0
    allow_client_routes: bool = True
    # Seconds a client's identity labels (user and group names) are cached
    # at most; changes to /etc/passwd or /etc/group drop them sooner.
    label_cache_max_age: float = 60.0
    redirects: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    routes: Mapping[str, URI] = field(default_factory=lambda: MappingProxyType({}))
    pongd: bool = True
    rules: tuple[Rule, ...] = ()
    grants: tuple[Grant, ...] = ()
    # Schemes served by an external daemon listening on RUNDIR/SCHEME.
    external_daemons: tuple[str, ...] = ()
    control_group: str | None = None
    # [limits]: what one peer, or all of them, may hold of ipcd.
    max_connections: int = 1024  # per listener
    max_connections_per_peer: int = 128  # per uid, or per address prefix
    peer_prefix_ipv4: int = 32
    peer_prefix_ipv6: int = 64
    partial_message_budget: int = 64 * 1024 * 1024  # bytes, all connections
    idle_timeout: float = 300.0  # service connections and relays; 0: none
    control_timeout: float = 10.0  # a control request, start to answer
    # [metrics] listen: the Prometheus endpoint's listener; None: off.
    metrics: str | None = None
    # [dns]: routes that name an SRV owner (ipcd.srvroutes).
    dns_servers: tuple[tuple[str, int], ...] = ()  # (): /etc/resolv.conf's
    dns_target_timeout: float = 2.0  # one target, then the next
    dns_max_targets: int = 8  # tried per connection
    dns_min_ttl: float = 5.0
    dns_max_ttl: float = 3600.0
    dns_negative_ttl: float = 10.0
    dns_max_names: int = 256  # owners cached
    # Each protocol daemon's section (by section name: "tcpd"), as validated;
    # ipcd.daemons.settings_of fills in the defaults.
    daemons: Mapping[str, Mapping[str, Any]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    # The protocol daemons this configuration was validated against.
    registry: Registry = field(
        default_factory=default_registry, compare=False, repr=False
    )
    source: str | None = None

    def schemes(self) -> list[str]:
        """The route schemes something here serves: unix, daemons', external."""
        return sorted({"unix", *self.registry.schemes, *self.external_daemons})


_SCHEMA: dict[str | None, dict[str, tuple[Any, str]]] = {
    None: {
        "rundir": (non_empty_string, "rundir"),
        "max_message_size": (positive_int, "max_message_size"),
    },
    "ipcd": {
        "lookup_timeout": (positive_number, "lookup_timeout"),
        "connect_timeout": (positive_number, "connect_timeout"),
        "allow_client_routes": (boolean, "allow_client_routes"),
        "label_cache_max_age": (non_negative_number, "label_cache_max_age"),
        "external_daemons": (daemon_schemes, "external_daemons"),
    },
    "pongd": {"enabled": (boolean, "pongd")},
    "control": {"group": (group_name, "control_group")},
    "metrics": {"listen": (metrics_endpoint, "metrics")},
    "limits": {
        "max_connections": (positive_int, "max_connections"),
        "max_connections_per_peer": (positive_int, "max_connections_per_peer"),
        "peer_prefix_ipv4": (prefix_length(32), "peer_prefix_ipv4"),
        "peer_prefix_ipv6": (prefix_length(128), "peer_prefix_ipv6"),
        "partial_message_budget": (positive_int, "partial_message_budget"),
        "idle_timeout": (non_negative_number, "idle_timeout"),
        "control_timeout": (positive_number, "control_timeout"),
    },
    "dns": {
        "servers": (dns_servers, "dns_servers"),
        "target_timeout": (positive_number, "dns_target_timeout"),
        "max_targets": (positive_int, "dns_max_targets"),
        "min_ttl": (non_negative_number, "dns_min_ttl"),
        "max_ttl": (non_negative_number, "dns_max_ttl"),
        "negative_ttl": (non_negative_number, "dns_negative_ttl"),
        "max_names": (positive_int, "dns_max_names"),
    },
}
_NAME_TABLES = ("redirects", "routes")
# Each Config field as the file names it ("[limits] max_connections").
_FILE_KEYS = {
    name: key if section is None else f"[{section}] {key}"
    for section, keys in _SCHEMA.items()
    for key, (_, name) in keys.items()
}


def changed_keys(old: Config, new: Config) -> list[str]:
    """
    The keys whose values differ from C{old} to C{new}, as the file names
    them (C{rules}, C{[limits] max_connections}, C{[tcpd] listen}), in the
    file's order: what a reload changed.
    """
    changed = [
        _FILE_KEYS.get(f.name, f.name)
        for f in fields(Config)
        if f.compare
        and f.name not in ("daemons", "source")
        and getattr(old, f.name) != getattr(new, f.name)
    ]
    for section in sorted({*old.daemons, *new.daemons}):
        before = old.daemons.get(section, {})
        after = new.daemons.get(section, {})
        changed += [
            f"[{section}] {key}"
            for key in sorted({*before, *after})
            if before.get(key) != after.get(key)
        ]
    return changed


def changes_text(changed: list[str]) -> str:
    """What a reload changed, in words, as the log and C{ipcd reload} say it."""
    return f"changed {', '.join(changed)}" if changed else "nothing changed"


def _where(source: str, section: str | None, key: str) -> str:
    key = _key_shown(key)
    return f"{source}: [{section}] {key}" if section else f"{source}: {key}"


def _key_shown(key: str) -> str:
    """
    A key as it is, or quoted as TOML quotes it when it is empty or has a
    character that does not print: a key may hold any (a quoted key's
    newline made an error of two lines).
    """
    if key and key.isprintable():
        return key
    quoted = (
        c if c.isprintable() and c not in '"\\' else _TOML_ESCAPES.get(c, _unicode(c))
        for c in key
    )
    return '"' + "".join(quoted) + '"'


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n"}
_TOML_ESCAPES.update({"\f": "\\f", "\r": "\\r"})


def _unicode(char: str) -> str:
    """C{char} as a TOML escape: \\uXXXX, or \\UXXXXXXXX beyond 16 bits."""
    code = ord(char)
    return f"\\u{code:04X}" if code <= 0xFFFF else f"\\U{code:08X}"


def _shown(value: Any) -> str:
    """A value as the TOML file spells it, for error messages."""
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _validate_layer(
    data: Mapping[str, Any], source: str, registry: Registry, base: str | None = None
) -> dict[str, Any]:
    """
    Check one TOML-shaped layer; return Config keyword arguments (protocol
    daemons' sections under C{"daemons"}).  Relative file names (C{rundir},
    a daemon's path settings) are made relative to C{base}, when given: the
    configuration file's directory.
    """
    out: dict[str, Any] = {"daemons": {}}
    for key, value in data.items():
        daemon = registry.by_section(key)
        if daemon is not None:
            out["daemons"][key] = _validate_daemon(daemon, value, source, base)
        elif key in _NAME_TABLES:
            out[key] = _validate_names_table(key, value, source)
        elif key in _LISTS:
            out[key] = _validate_list(key, value, source)
        elif key in _SCHEMA:  # a table: keys are strings, never _SCHEMA's None
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: [{key}]: expected a table")
            for sub, subvalue in value.items():
                out.update(_check(key, sub, subvalue, source))
        else:
            out.update(_check(None, key, value, source, registry))
    if out.get("rundir"):
        out["rundir"] = _relative_to(base, out["rundir"])
    return out


def _relative_to(base: str | None, path: str) -> str:
    """C{path}, relative to directory C{base} (if any) when relative."""
    return os.path.join(base, path) if base is not None and path else path


def _validate_daemon(
    daemon: Any, value: Any, source: str, base: str | None = None
) -> dict[str, Any]:
    """Check a protocol daemon's section against its own settings."""
    section = daemon.section
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: [{section}]: expected a table")
    settings = {setting.key: setting for setting in daemon.settings}
    out = {}
    for key, subvalue in value.items():
        setting = settings.get(key)
        if setting is None:
            known = ", ".join(sorted(settings))
            raise ConfigError(
                f"{_where(source, section, key)}: unknown key (known: {known})"
            )
        out[key] = _checked(setting.check, section, key, subvalue, source)
        if setting.path:
            out[key] = _relative_to(base, out[key])
    return out


def _check(
    section: str | None,
    key: str,
    value: Any,
    source: str,
    registry: Registry | None = None,
) -> dict[str, Any]:
    spec = _SCHEMA.get(section, {}).get(key)
    if spec is None:
        names = [*_SCHEMA.get(section, {})]
        if section is None:  # at the top level, tables are keys too
            names += [*filter(None, _SCHEMA), *_NAME_TABLES, *_LISTS]
            names += registry.sections if registry is not None else []
        known = ", ".join(sorted(names))
        raise ConfigError(
            f"{_where(source, section, key)}: unknown key (known: {known})"
        )
    checker, attribute = spec
    return {attribute: _checked(checker, section, key, value, source)}


def _checked(
    checker: Any, section: str | None, key: str, value: Any, source: str
) -> Any:
    try:
        return checker(value)
    except Expected as e:
        raise ConfigError(
            f"{_where(source, section, key)}: expected {e}, got {_shown(value)}"
        ) from None
    except Invalid as e:
        raise ConfigError(f"{_where(source, section, key)}: {e}") from None


def _validate_names_table(table: str, value: Any, source: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f'{source}: [{table}]: expected a table of NAME = "..."')
    out: dict[str, Any] = {}
    for name, target in value.items():
        where = _where(source, table, name)
        try:
            validate_service_name(name)
        except InvalidServiceName as e:
            raise ConfigError(f"{where}: {e}") from None
        if not isinstance(target, str):
            raise ConfigError(f"{where}: expected a string, got {_shown(target)}")
        try:
            if table == "redirects":
                out[name] = validate_service_name(target)
            else:
                out[name] = parse_uri(target)
        except (InvalidServiceName, RouteError) as e:
            raise ConfigError(f"{where}: {e}") from None
    return out


# Top-level lists of one-line entries: key -> (parser, an example).
_LISTS: dict[str, tuple[Any, str]] = {
    "rules": (parse_rule, "allow in pong *"),
    "grants": (parse_grant, "secret group:ops"),
}


def _validate_list(key: str, value: Any, source: str) -> tuple[Any, ...]:
    parse, example = _LISTS[key]
    expected = f"a list of strings like {example!r}"
    if not isinstance(value, list):
        raise ConfigError(f"{source}: {key}: expected {expected}, got {_shown(value)}")
    entries = []
    for index, text in enumerate(value):
        if not isinstance(text, str):
            raise ConfigError(
                f"{source}: {key}[{index}]: expected {expected}, got {_shown(text)}"
            )
        try:
            entries.append(parse(text))
        except RuleError as e:
            raise ConfigError(f"{source}: {key}[{index}]: {e}") from None
    return tuple(entries)


def _check_redirect_loops(redirects: Mapping[str, str], source: str) -> None:
    for start in redirects:
        seen = [start]
        name = start
        while name in redirects:
            name = redirects[name]
            if name in seen:
                chain = " -> ".join([*seen, name])
                raise ConfigError(f"{source}: [redirects]: loop {chain}")
            seen.append(name)


def _check_route_schemes(
    merged: Mapping[str, Any], registry: Registry, source: str
) -> None:
    """An admin route's scheme must be one something serves."""
    known = Config(
        rundir="",
        registry=registry,
        external_daemons=merged.get("external_daemons", ()),
    ).schemes()
    for name, uri in merged["routes"].items():
        scheme = getattr(uri, "scheme", "unix")
        if scheme not in known:
            raise ConfigError(
                f"{source}: [routes] {name}: no transport for scheme {scheme!r} "
                f"(known: {', '.join(known)}; another needs an external daemon "
                "in [ipcd] external_daemons)"
            )


def _check_listener_names(
    merged: Mapping[str, Any],
    daemons: Mapping[str, Mapping[str, Any]],
    registry: Registry,
    source: str,
) -> None:
    """
    A daemon's C{ipc:NAME} listener in ipcd's RUNDIR takes a name nothing
    else of ipcd's listens at: at one (C{ipc:pong}, C{ipc:tcp}) the start
    failed saying "another process is listening", and that was ipcd.
    """
    rundir = os.path.normpath(merged["rundir"])
    taken = {BROKER_NAME: "ipcd's lookup socket", CONTROL_NAME: "ipcd's control socket"}
    if merged.get("pongd", True):
        taken["pong"] = "pongd's socket"
    for scheme in [*registry.schemes, *merged.get("external_daemons", ())]:
        taken[scheme] = f"the socket of the {scheme}:// routes' daemon"
    for daemon in registry.values():
        settings = daemons[daemon.section]
        listen = settings.get("listen")
        if not isinstance(listen, str) or not daemon.enabled(settings):
            continue
        try:
            kind, listens = wrapped(listen)
            if kind != "ipc":
                continue
            positionals, keywords = compat_twisted.endpoint_arguments(listens)
        except (ValueError, IndexError):
            continue  # (refused where listeners are checked)
        name = positionals[0] if positionals else keywords.get("name")
        where = keywords.get("rundir")
        if name is None or (where and os.path.normpath(where) != rundir):
            continue
        if name in taken:
            raise ConfigError(
                f"{source}: [{daemon.section}] listen: {printable(listen)!r}: "
                f"{printable(name)!r} in RUNDIR is {taken[name]}: give the "
                "listener another name"
            )
        taken[name] = f"[{daemon.section}]'s listener"


# A configuration file larger than this is refused, not cut: ipcd reads and
# parses it whole at start and at each reload (tomllib alone, half the
# time).  At 16 MiB of rules or routes a reload on the reactor's thread
# stopped every lookup and relay for 11 to 15 s, and 'ipcd reload' timed
# out; 1 MiB of routes takes about 0.5 s, read in a thread now (the
# reactor's longest pause meanwhile about 15 ms: the GIL, the collector);
# a real configuration is some kilobytes.
MAX_CONFIG_FILE = 1 << 20


def _guarded(path: str, info: os.stat_result) -> None:
    """
    Refuse a configuration every user may write: whoever can write it
    decides, at the next reload, what everyone reaches through ipcd (its
    rules, grants and routes).  Group write is left alone: under umask 002
    a user's files are writable by the user's own group.
    """
    mode = stat.S_IMODE(info.st_mode)
    if stat.S_ISREG(info.st_mode) and mode & stat.S_IWOTH:
        raise ConfigError(
            f"{path}: writable by every user (mode {mode:04o}): whoever can "
            f"write it decides what ipcd lets everyone reach; chmod o-w {path}"
        )


# The directory every name of an open file descriptor is in, its links
# resolved: /dev/fd, /proc/self/fd and /proc/thread-self/fd are
# /proc/PID/fd or /proc/PID/task/TID/fd.  (bash's <(...) gives /dev/fd/63;
# /dev/stdin is a link to /proc/self/fd/0.)
_DESCRIPTORS = re.compile(r"/proc/[0-9]+(/task/[0-9]+)?/fd")  # (\d: any digit)
# Links the kernel follows in one path walk (ELOOP beyond).
_MAX_LINKS = 40


def names_descriptor(path: str) -> bool:
    """
    Whether C{path} (or a symbolic link it leads through, as /dev/stdin
    does) names an open file descriptor, not a file: reopened, that is the
    very file opened then (the old one, after an editor saved by renaming a
    new one in place) or a pipe that gives nothing twice.
    """
    current = os.path.abspath(path)
    for _link in range(_MAX_LINKS + 1):  # the name, then each link's target
        # Its directory as the kernel finds it: spelled /dev/fd, //dev/fd,
        # or through a link to /dev/fd or /proc/self, it is a descriptor's.
        if _DESCRIPTORS.fullmatch(os.path.realpath(os.path.dirname(current))):
            return True
        try:
            target = os.readlink(current)
        except OSError:  # no link (or nothing): a name of its own
            return False
        current = os.path.normpath(os.path.join(os.path.dirname(current), target))
    return False  # more links than the kernel follows: it opens nothing


def read_toml(path: str) -> dict[str, Any]:
    """
    Read a TOML file; syntax errors become L{ConfigError} naming the file.
    Only a regular file of at most L{MAX_CONFIG_FILE} bytes is read: a FIFO
    would stall start-up or a reload (the reactor's thread) until a writer
    came, a device such as C{/dev/zero} would be read until memory ran out.
    """
    if names_descriptor(path):
        # ipcd reads it again at each reload: a descriptor cannot be.
        raise ConfigError(
            f"{path}: names an open file descriptor: ipcd reads its "
            "configuration again at each reload (ipcd reload, SIGHUP), and a "
            "descriptor gives a pipe's text once, a file as it was when "
            "opened, not as saved since; name the file itself"
        )
    try:
        data = read_regular(
            path, MAX_CONFIG_FILE, check=lambda info: _guarded(path, info)
        )
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except (NotAFile, TooLarge) as e:
        raise ConfigError(f"{path}: {e}") from None
    try:
        return tomllib.loads(data.decode("utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except RecursionError:
        # tomllib parses arrays and inline tables by recursion: some
        # hundred deep (fewer in a reload, deeper in the stack), Python's
        # stack ends first, and that was a traceback.
        raise ConfigError(
            f"{path}: invalid TOML: arrays or inline tables nested too deeply"
        ) from None
    except UnicodeDecodeError as e:  # TOML is UTF-8
        raise ConfigError(
            f"{path}: invalid TOML: not UTF-8 (byte 0x{e.object[e.start]:02x} at "
            f"offset {e.start}): save it as UTF-8"
        ) from None


def load_config(
    path: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    registry: Registry | None = None,
) -> Config:
    """
    Build the L{Config}: embedded defaults, then the file at C{path}, then
    C{overrides} (the command line, in the file's shape).  The sections of
    the protocol daemons in C{registry} (default: those Twisted's plugins
    provide) are checked by their own settings.
    """
    if registry is None:
        registry = default_registry()
    layers = []
    if path is not None:
        base = os.path.dirname(os.path.abspath(path))
        layers.append(_validate_layer(read_toml(path), path, registry, base))
    if overrides:
        layers.append(_validate_layer(overrides, "command line", registry))
    merged: dict[str, Any] = {
        "redirects": {},
        "routes": {},
        "rules": (),
        "grants": (),
    }
    daemons: dict[str, dict[str, Any]] = {
        daemon.section: {s.key: s.default for s in daemon.settings}
        for daemon in registry.values()
    }
    for layer in layers:
        for key, value in layer.items():
            if key == "daemons":
                for section, settings in value.items():
                    daemons[section].update(settings)
            elif key in _NAME_TABLES:
                merged[key].update(value)
            elif key in _LISTS:
                # Command-line rules come after the file's: appended in order.
                merged[key] += value
            else:
                merged[key] = value
    _check_redirect_loops(merged["redirects"], path or "command line")
    _check_route_schemes(merged, registry, path or "command line")
    merged["daemons"] = MappingProxyType(
        {section: MappingProxyType(daemons[section]) for section in sorted(daemons)}
    )
    merged["redirects"] = MappingProxyType(merged["redirects"])
    merged["routes"] = MappingProxyType(merged["routes"])
    configured = merged.get("rundir")
    if configured:
        # Still relative: the command line's, as any of its names, or a file's
        # named from the working directory; either way from the working
        # directory (a file's names were taken from its own directory above).
        configured = os.path.join(os.getcwd(), configured)
    try:
        merged["rundir"] = normal_rundir(resolve_rundir(configured, environ))
    except ValueError as e:
        if configured is None:
            where = "environment variable RUNDIR"
        elif overrides and "rundir" in overrides:
            where = "command line"
        else:
            where = path
        raise ConfigError(f"{where}: rundir: {e}") from None
    _check_listener_names(merged, daemons, registry, path or "command line")
    return Config(source=path, registry=registry, **merged)
