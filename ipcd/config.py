"""
Configuration: a TOML file and command-line options become one validated,
immutable L{Config}.

Every key is optional: the defaults below make a useful local instance.  The
command line is applied as a second TOML-shaped layer over the file, so both
go through the same validation and errors name where the bad value came from.
"""

from __future__ import annotations

import grp
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ipcd.names import (
    OWN_NAMES,
    InvalidServiceName,
    resolve_rundir,
    validate_service_name,
)
from ipcd.policy import Grant, Rule, RuleError, parse_grant, parse_rule
from ipcd.routes import URI, RouteError, parse_uri
from ipcd.wire import DEFAULT_MAX_MESSAGE_SIZE

DEFAULT_TCP_LISTEN = "tcp:9000:interface=127.0.0.1"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says where and why."""


@dataclass(frozen=True)
class Config:
    rundir: str
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    lookup_timeout: float = 5.0
    connect_timeout: float = 5.0
    allow_client_routes: bool = True
    redirects: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    routes: Mapping[str, URI] = field(default_factory=lambda: MappingProxyType({}))
    pongd: bool = True
    tcp_listen: str | None = DEFAULT_TCP_LISTEN
    tcp_handshake_timeout: float = 5.0
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
    source: str | None = None


# section -> key -> (checker, Config attribute); checkers return the value to
# keep or raise _Bad(expectation).
class _Bad(Exception):
    pass


class _Invalid(Exception):
    """A value of the right shape that names nothing usable: said as it is."""


def _positive_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise _Bad("a number of seconds greater than 0")
    return float(value)


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _Bad("a whole number greater than 0")
    return value


def _non_negative_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise _Bad("a number of seconds, 0 or more (0: no deadline)")
    return float(value)


def _prefix(bits: int) -> Any:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad(f"a prefix length from 0 to {bits}")
        if not 0 <= value <= bits:
            raise _Bad(f"a prefix length from 0 to {bits}")
        return value

    return check


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Bad("true or false")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _Bad("a non-empty string")
    return value


def _endpoint(value: Any) -> str:
    if not isinstance(value, str) or ":" not in value:
        raise _Bad("an endpoint string like 'tcp:9000:interface=127.0.0.1'")
    check_server_endpoint(value)
    return value


def _server_endpoint_types() -> list[str]:
    from twisted.internet.endpoints import _serverParsers
    from twisted.internet.interfaces import IStreamServerEndpointStringParser
    from twisted.plugin import getPlugins

    plugins = getPlugins(IStreamServerEndpointStringParser)
    return sorted({*_serverParsers, *(p.prefix.lower() for p in plugins)})


def check_server_endpoint(description: str) -> None:
    """
    Raise L{_Invalid} unless Twisted's C{serverFromString} would accept
    C{description}: a known type (built in or a plugin) and, for the built-in
    C{tcp} and C{unix}, arguments their parsers take.  Needs no reactor and
    listens on nothing, so a bad listener is refused when the configuration
    loads (and a reload with one keeps the old configuration).
    """
    # Twisted's own strports machinery: no reactor is imported by these.
    from twisted.internet.endpoints import _parse, _parseServer

    try:
        kind = _parse(description)[0][0].lower()
    except (ValueError, IndexError, RuntimeError) as e:
        # RuntimeError: Twisted's tokenizer on a trailing backslash.
        why = "a '\\' at the end escapes nothing" if isinstance(e, RuntimeError) else e
        raise _Invalid(f"invalid endpoint string {description!r}: {why}") from None
    known = _server_endpoint_types()
    if kind not in known:
        raise _Invalid(
            f"unknown endpoint type {kind!r} in {description!r} "
            f"(known: {', '.join(known)})"
        )
    if kind == "ssl":
        return  # its parser reads the key and certificate files: not here
    try:
        _parseServer(description, None)
    except (ValueError, TypeError) as e:
        # "_parseTCP() got an unexpected keyword argument": not our name.
        reason = re.sub(r"^_?\w+\(\) ", "", str(e))
        if "::" in description:
            reason += r" (a ':' inside a value is written '\:', as in interface=\:\:1)"
        raise _Invalid(f"invalid endpoint {description!r}: {reason}") from None


def _group(value: Any) -> str:
    name = _string(value)
    try:
        grp.getgrnam(name)
    except KeyError:
        raise _Invalid(
            f"no such group {name!r} (create it, or name one that exists: getent group)"
        ) from None
    return name


_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")


def _schemes(value: Any) -> tuple[str, ...]:
    expected = "a list of URI schemes like ['tls']"
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Bad(expected)
    for scheme in value:
        if not _SCHEME.fullmatch(scheme) or scheme == "unix":
            raise _Bad(f"{expected} ({scheme!r} is not a daemon's scheme)")
        if scheme in OWN_NAMES:
            raise _Bad(f"{expected} ({scheme!r} is ipcd's own socket)")
        try:
            validate_service_name(scheme)
        except InvalidServiceName:
            raise _Bad(f"{expected} ({scheme!r} cannot be a socket in RUNDIR)")
    return tuple(dict.fromkeys(value))


_SCHEMA: dict[str | None, dict[str, tuple[Any, str]]] = {
    None: {
        "rundir": (_string, "rundir"),
        "max_message_size": (_positive_int, "max_message_size"),
    },
    "ipcd": {
        "lookup_timeout": (_positive_number, "lookup_timeout"),
        "connect_timeout": (_positive_number, "connect_timeout"),
        "allow_client_routes": (_boolean, "allow_client_routes"),
        "external_daemons": (_schemes, "external_daemons"),
    },
    "pongd": {"enabled": (_boolean, "pongd")},
    "control": {"group": (_group, "control_group")},
    "limits": {
        "max_connections": (_positive_int, "max_connections"),
        "max_connections_per_peer": (_positive_int, "max_connections_per_peer"),
        "peer_prefix_ipv4": (_prefix(32), "peer_prefix_ipv4"),
        "peer_prefix_ipv6": (_prefix(128), "peer_prefix_ipv6"),
        "partial_message_budget": (_positive_int, "partial_message_budget"),
        "idle_timeout": (_non_negative_number, "idle_timeout"),
        "control_timeout": (_positive_number, "control_timeout"),
    },
    "tcpd": {
        "enabled": (_boolean, "_tcp_enabled"),
        "listen": (_endpoint, "tcp_listen"),
        "handshake_timeout": (_positive_number, "tcp_handshake_timeout"),
    },
}
_NAME_TABLES = ("redirects", "routes")


def _where(source: str, section: str | None, key: str) -> str:
    return f"{source}: [{section}] {key}" if section else f"{source}: {key}"


def _shown(value: Any) -> str:
    """A value as the TOML file spells it, for error messages."""
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _validate_layer(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Check one TOML-shaped layer; return Config keyword arguments."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in _NAME_TABLES:
            out[key] = _validate_names_table(key, value, source)
        elif key in _LISTS:
            out[key] = _validate_list(key, value, source)
        elif key in _SCHEMA and key is not None:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: [{key}]: expected a table")
            for sub, subvalue in value.items():
                out.update(_check(key, sub, subvalue, source))
        else:
            out.update(_check(None, key, value, source))
    return out


def _check(section: str | None, key: str, value: Any, source: str) -> dict[str, Any]:
    spec = _SCHEMA.get(section, {}).get(key)
    if spec is None:
        names = [*_SCHEMA.get(section, {})]
        if section is None:  # at the top level, tables are keys too
            names += [*filter(None, _SCHEMA), *_NAME_TABLES, *_LISTS]
        known = ", ".join(sorted(names))
        raise ConfigError(
            f"{_where(source, section, key)}: unknown key (known: {known})"
        )
    checker, attribute = spec
    try:
        return {attribute: checker(value)}
    except _Bad as e:
        raise ConfigError(
            f"{_where(source, section, key)}: expected {e}, got {_shown(value)}"
        ) from None
    except _Invalid as e:
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


def read_toml(path: str) -> dict[str, Any]:
    """Read a TOML file; syntax errors become L{ConfigError} naming the file."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None


def load_config(
    path: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """
    Build the L{Config}: embedded defaults, then the file at C{path}, then
    C{overrides} (the command line, in the file's shape).
    """
    layers = []
    if path is not None:
        layers.append(_validate_layer(read_toml(path), path))
    if overrides:
        layers.append(_validate_layer(overrides, "command line"))
    merged: dict[str, Any] = {"redirects": {}, "routes": {}, "rules": (), "grants": ()}
    for layer in layers:
        for key, value in layer.items():
            if key in _NAME_TABLES:
                merged[key].update(value)
            elif key in _LISTS:
                # Command-line rules come after the file's: appended in order.
                merged[key] += value
            else:
                merged[key] = value
    _check_redirect_loops(merged["redirects"], path or "command line")
    if merged.pop("_tcp_enabled", True) is False:
        merged["tcp_listen"] = None
    merged["redirects"] = MappingProxyType(merged["redirects"])
    merged["routes"] = MappingProxyType(merged["routes"])
    merged["rundir"] = resolve_rundir(merged.get("rundir"), environ)
    return Config(source=path, **merged)
