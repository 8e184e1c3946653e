"""
Resolution: where a lookup goes, and which names the policy decides.

Pure: a config, a service name and maybe the client's route in; a
L{LocalTarget} or L{RemoteTarget} (or L{Refused}) out, with the names the
policy must decide.  No reactor, no sockets (a zoned link-local route's
labels ask the kernel its interface's other name: L{destination_labels}).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ipcd.config import Config
from ipcd.errors import Refused
from ipcd.names import socket_path
from ipcd.policy import zoned_spellings
from ipcd.routes import URI, LocalURI, PathURI, RemoteURI

# Redirections and unix:// hops a lookup may take before it is called a loop.
MAX_HOPS = 32


@dataclass(frozen=True)
class LocalTarget:
    """A local UNIX socket: service C{name} at C{path}."""

    name: str
    path: str

    def __str__(self) -> str:
        return f"unix://{self.path}"


@dataclass(frozen=True)
class RemoteTarget:
    """A remote route: ask the daemon at C{uri} for C{service}."""

    uri: RemoteURI
    service: str

    def __str__(self) -> str:
        return str(self.uri)


Target = LocalTarget | RemoteTarget


def _follow_redirects(name: str, redirects: Mapping[str, str], chain: list[str]) -> str:
    while name in redirects:
        name = redirects[name]
        _visit(name, chain)
    return name


def _visit(name: str, chain: list[str]) -> None:
    if name in chain or len(chain) > MAX_HOPS:
        raise Refused(f"redirect loop: {' -> '.join([*chain, name])}")
    chain.append(name)


@dataclass(frozen=True)
class Plan:
    """
    Where a lookup goes, and the names the policy decides for it: the
    requested one, then each name the client's own route names.  Names that
    only the admin's redirections and routes lead to are the admin's
    decision and are not in C{names}.
    """

    target: Target
    names: tuple[str, ...]


def plan(config: Config, service: str, client_route: URI | None = None) -> Plan:
    """
    Where C{service} is: admin redirections rewrite the name (chained), then
    the client's route (if given) or the admin's route for the name decides;
    with no route, it is the local service of that name.  A C{unix://NAME}
    route is a redirection and is followed in turn.
    """
    chain = [service]
    names = [service]
    name = service
    route = client_route
    from_client = route is not None
    while True:
        name = _follow_redirects(name, config.redirects, chain)
        if route is None:
            route = config.routes.get(name)
            from_client = False
        match route:
            case None:
                target: Target = LocalTarget(name, socket_path(config.rundir, name))
                break
            case LocalURI(name=next_name) if next_name == name or (
                from_client and next_name == service
            ):
                # Itself (a client's "pong unix://pong", after any redirect).
                if from_client:
                    names.append(next_name)
                target = LocalTarget(name, socket_path(config.rundir, name))
                break
            case LocalURI(name=next_name):
                if from_client:
                    names.append(next_name)
                _visit(next_name, chain)
                name, route = next_name, None
            case PathURI(path=path):
                if from_client:
                    raise Refused(
                        "routes to absolute socket paths are for the admin's "
                        f"configuration only: {route}"
                    )
                target = LocalTarget(name, path)
                break
            case RemoteURI():
                if from_client and route.service is not None:
                    names.append(route.service)
                target = RemoteTarget(route, route.service or name)
                break
    return Plan(target, tuple(dict.fromkeys(names)))


def resolve(config: Config, service: str, client_route: URI | None = None) -> Target:
    """Where C{service} is (see L{plan})."""
    return plan(config, service, client_route).target


def direction_of(target: Target) -> str:
    """The policy direction of a local client's lookup that goes to C{target}."""
    return "local" if isinstance(target, LocalTarget) else "out"


def destination_labels(target: Target) -> list[str]:
    """
    For C{out}: the route's host and port, as labels besides the client's;
    a zoned link-local host in each of its spellings (L{zoned_spellings}:
    the one place this asks the kernel, for its interface's other name).
    """
    if isinstance(target, LocalTarget):
        return []
    host = target.uri.host
    labels = [f"host:{host}"]
    if "%" in host:
        labels += [f"host:{other}" for other in zoned_spellings(host)]
    if target.uri.port is not None:
        labels.append(f"port:{target.uri.port}")
    return labels
