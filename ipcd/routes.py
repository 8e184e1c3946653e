"""
Lookup payloads, C{IPC_NETWORK} values and the URIs in them.

Pure parsing: values in, immutable values or L{RouteError} out.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

from ipcd.names import InvalidServiceName, validate_service_name


class RouteError(ValueError):
    """A lookup, route or URI that cannot be understood."""


@dataclass(frozen=True)
class LocalURI:
    """A local service by name: C{NAME}, C{unix://NAME}, C{unix:///NAME}."""

    name: str

    def __str__(self) -> str:
        return f"unix://{self.name}"


@dataclass(frozen=True)
class PathURI:
    """A UNIX socket by absolute path: C{unix:///abs/path.sock}."""

    path: str

    def __str__(self) -> str:
        return f"unix://{self.path}"


def host_port(host: str, port: int) -> str:
    """C{HOST:PORT} as a URI writes it: an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class RemoteURI:
    """C{SCHEME://HOST:PORT/SERVICE}; C{service} is None for an empty path."""

    scheme: str
    host: str
    port: int | None
    service: str | None
    text: str

    def __str__(self) -> str:
        return self.text

    @property
    def hostport(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port is None else f"{host}:{self.port}"

    @property
    def is_srv(self) -> bool:
        """
        Whether the host is a DNS SRV owner (C{_ipc._tcp.example.org}),
        to be resolved to targets: a host name never starts with C{_}.
        """
        return self.host.startswith("_")


URI = LocalURI | PathURI | RemoteURI


@dataclass(frozen=True)
class Route:
    """C{SERVICE URI}: reach SERVICE through URI."""

    service: str
    uri: URI


@dataclass(frozen=True)
class Lookup:
    """What a client asked ipcd: a service and the routes it brought."""

    service: str
    routes: tuple[Route, ...] = ()

    def route_for(self, name: str) -> Route | None:
        """The last route for C{name}: upstream's rule."""
        for route in reversed(self.routes):
            if route.service == name:
                return route
        return None


# A scheme names a daemon: a few letters (at most 32, so that what quotes
# one, a refusal or a log line, stays short).
SCHEME = re.compile(r"[a-z][a-z0-9+.-]{0,31}")
_AUTHORITY = re.compile(
    r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)(?:%(?P<zone>[^\]]*))?\]|(?P<host>[^:/\[\]]+))"
    r"(?::(?P<port>[0-9]+))?"
)
# A link-local address's zone: an interface index (a 32-bit scope id, not
# 0), or a name as Linux takes one (at most 15 bytes, no '/', ':' or
# space), in ASCII; '%' and brackets would make the URI ambiguous.
_ZONE_NAME = re.compile(r"[!-~]{1,15}")
_ZONE_NOT_IN_NAME = set("/:%[]")
MAX_ZONE_INDEX = 2**32 - 1
# DNS names (RFC 1035, 1123): letters, digits and '-' inside labels.
MAX_HOST_NAME = 253
MAX_LABEL = 63
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")
_DOTTED = re.compile(r"[0-9.]+")


def _show(text: str, limit: int = 64) -> str:
    """C{text} quoted for a message: escaped (repr), and cut if long."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def check_host(host: str) -> str:
    """
    C{host} as a route may name it (IPv6 addresses go in brackets, and are
    checked by L{parse_uri}): an IPv4 address, or a DNS name
    of at most 253 characters in labels of 1 to 63 letters, digits and
    C{-} (not first or last), where a C{xn--} label must be valid IDNA.  A
    name with non-ASCII letters is converted to IDNA (Python's C{idna}
    codec, as the resolver call would) and must then fit the same rules;
    its ASCII form is returned, in lower case (DNS names are the same in
    any case), so that one name has one spelling for rules and logs.
    Raises L{ValueError} saying what is wrong.
    """
    if not host.isprintable():
        raise ValueError("control characters are not allowed")
    if _DOTTED.fullmatch(host):
        return _ipv4(host)
    name = host
    if not host.isascii():
        try:
            name = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError("not a valid international (IDNA) host name") from None
        if _DOTTED.fullmatch(name):  # ('\uff11\uff10.1' is 10.1)
            return _ipv4(name)
    address = loose_ipv4(name)
    if address is not None:
        # inet_aton's other spellings, which the resolver reads so too: a
        # host:0x7f.1 label passed a deny for host:127.0.0.1, and the
        # connection went to 127.0.0.1.
        raise ValueError(
            f"{_show(name)} is an IPv4 address as the resolver reads it "
            f"({address}): write that"
        )
    if len(name) > MAX_HOST_NAME:
        raise ValueError(
            f"a host name has at most {MAX_HOST_NAME} characters, not {len(name)}"
        )
    for label in name.split("."):
        if not label:
            raise ValueError("empty label (two dots, or a dot first or last)")
        if len(label) > MAX_LABEL:
            raise ValueError(
                f"label {_show(label, 16)} is longer than {MAX_LABEL} characters"
            )
        if not _LABEL.fullmatch(label):
            raise ValueError(
                f"label {_show(label)} may have only letters, digits and '-' "
                "(not first or last)"
            )
        if label[:4].lower() == "xn--":
            try:
                # The codec checks only a lower-case prefix as IDNA.
                label.lower().encode("ascii").decode("idna")
            except UnicodeError:
                raise ValueError(f"label {_show(label)} is not valid IDNA") from None
    return name.lower()


def _ipv4(host: str) -> str:
    """
    C{host}, digits and dots, if it is an IPv4 address as written: such a
    host is never a name, and the resolver would take "10.1" as 10.0.0.1.
    """
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        raise ValueError("not a valid IPv4 address (a.b.c.d)") from None
    if address.is_unspecified:
        raise ValueError(_UNSPECIFIED.format(host, "127.0.0.1"))
    return host


# A route to "any address" connects to this host's loopback (Linux): its
# host: label was not the address reached, and passed a deny for that.
_UNSPECIFIED = (
    "{} is no host's address: a connect to it reaches this host's loopback (write {})"
)


def check_ipv6_host(text: str, zone: str | None) -> str:
    """
    The host a route's C{[TEXT%ZONE]} names, in one spelling for rules
    (C{host:2001:db8::1}, its zone as written).  Raises L{ValueError}
    saying what is wrong.
    """
    try:
        address = ipaddress.IPv6Address(text)
    except ValueError as e:
        raise ValueError(f"not a valid IPv6 address ({e})") from None
    zone = None if zone is None else check_zone(zone, address)
    host = _ipv6(address)
    return host if zone is None else f"{host}%{zone}"


def _ipv6(address: ipaddress.IPv6Address) -> str:
    """
    C{address} as a route's host, unless another host: label is the one
    connected to: an IPv4-mapped address (C{::ffff:127.0.0.1}) is that
    IPv4 address, and C{::} is the loopback, each past a deny written for
    it (C{host:127.0.0.1}, C{host:::1}).
    """
    mapped = address.ipv4_mapped
    if mapped is not None and mapped.is_unspecified:
        raise ValueError(_UNSPECIFIED.format(address, "127.0.0.1"))
    if mapped is not None:
        raise ValueError(f"{address} is the IPv4 address {mapped}: write that")
    if address.is_unspecified:
        raise ValueError(_UNSPECIFIED.format(address, "[::1]"))
    return str(address)


# What inet_aton's numbers are written in (C's: 0x7f, 0177, 127), and dots:
# a name of other characters is no address (asked before inet_aton).
_C_NUMBERS = re.compile(r"[0-9][0-9a-fA-FxX.]*")


def loose_ipv4(text: str) -> str | None:
    """
    The IPv4 address the resolver (and a socket's bind) reads C{text} as,
    if C{text} is not that address as written: inet_aton's hex, octal and
    short forms (C{0x7f.1}, C{010.0.0.1} is 8.0.0.1, C{0} is 0.0.0.0); else
    None (an address as written, or no address).
    """
    if not _C_NUMBERS.fullmatch(text):
        return None
    try:
        address = socket.inet_ntoa(socket.inet_aton(text))
    except OSError:
        return None
    return None if address == text else address


def check_zone(zone: str, address: ipaddress.IPv6Address) -> str:
    """
    C{zone} as a route names the link of link-local C{address}
    (C{[fe80::1%eth0]}, C{[fe80::1%2]}): an interface name or index, as
    L{_ZONE_NAME} and L{MAX_ZONE_INDEX} say.  Any other address is on every
    link alike, and a zone there would say nothing (the kernel ignores it).
    Raises L{ValueError} saying what is wrong.
    """
    if not address.is_link_local:
        raise ValueError(
            f"a zone names the link of a link-local address (fe80::/10), and "
            f"{address} is not one"
        )
    if zone.isascii() and zone.isdigit():
        # Bounded before int(), as a port is.
        if len(zone) > 10 or not 0 < int(zone) <= MAX_ZONE_INDEX:
            raise ValueError(
                f"zone {_show(zone, 16)}: an interface index is 1 to {MAX_ZONE_INDEX}"
            )
        return zone
    if not _ZONE_NAME.fullmatch(zone) or _ZONE_NOT_IN_NAME & set(zone):
        raise ValueError(
            f"zone {_show(zone, 16)} is not an interface name (1 to 15 ASCII "
            "letters, digits or marks, no '/', ':' or '%') or index"
        )
    return zone


# An SRV owner's service label (RFC 6335 5.1): 1 to 15 letters, digits and
# '-', at least one letter, no '-' first, last or twice in a row.
_SRV_SERVICE = re.compile(r"(?=[A-Za-z0-9-]*[A-Za-z])[A-Za-z0-9](?:-?[A-Za-z0-9])*")
MAX_SRV_SERVICE = 15
# The SRV protocol label a scheme's routes ride on; others may use either.
SRV_PROTOCOLS = {
    "tcp": ("_tcp",),
    "tls": ("_tcp",),
    "ws": ("_tcp",),
    "wss": ("_tcp",),
    "udp": ("_udp",),
}


def check_srv_owner(owner: str, scheme: str) -> str:
    """
    C{owner} as an SRV route names it: C{_SERVICE._PROTO.DOMAIN} (RFC
    2782), where SERVICE is an RFC 6335 service name, PROTO is C{_tcp} or
    C{_udp} (the one the scheme rides on: C{_udp} for C{udp://}, C{_tcp}
    for C{tcp}, C{tls}, C{ws}, C{wss}), and DOMAIN a host name as
    L{check_host} takes it.  Returns the owner with DOMAIN in its ASCII
    form, all in lower case; raises L{ValueError} saying what is wrong.
    """
    service, _, rest = owner.partition(".")
    proto, _, domain = rest.partition(".")
    name = service[1:]
    # The pattern needs a character: no test for an empty name.
    if not (len(name) <= MAX_SRV_SERVICE and _SRV_SERVICE.fullmatch(name)):
        raise ValueError(
            f"SRV service label {_show(service, 20)} must be '_' and 1 to "
            f"{MAX_SRV_SERVICE} letters, digits and '-' (RFC 6335)"
        )
    allowed = SRV_PROTOCOLS.get(scheme, ("_tcp", "_udp"))
    if proto.lower() not in allowed:
        raise ValueError(
            f"an SRV owner for {scheme}:// is _SERVICE.{' or '.join(allowed)}."
            f"DOMAIN, not {_show(owner)}"
        )
    if not domain:
        raise ValueError("an SRV owner needs a domain after _SERVICE._PROTO.")
    name = f"{service}.{proto}.{check_host(domain)}".lower()
    if len(name) > MAX_HOST_NAME:
        raise ValueError(
            f"an SRV owner has at most {MAX_HOST_NAME} characters, not {len(name)}"
        )
    return name


def parse_uri(text: str) -> URI:
    """Parse one route target."""
    text = text.strip()
    if not text:
        raise RouteError("empty URI")
    if "://" not in text:
        return LocalURI(_name(text, "route target"))
    scheme, rest = text.split("://", 1)
    scheme = scheme.lower()
    if not SCHEME.fullmatch(scheme):
        raise RouteError(f"invalid scheme in URI {_show(text)}")
    if scheme == "unix":
        return _parse_unix(rest, text)
    authority, slash, path = rest.partition("/")
    match = _AUTHORITY.fullmatch(authority)
    if not match:
        raise RouteError(f"invalid host in URI {_show(text)}: expected HOST:PORT")
    host = match.group("v6")
    try:
        if host is not None:
            host = check_ipv6_host(host, match.group("zone"))
        elif match.group("host").startswith("_"):
            host = check_srv_owner(match.group("host"), scheme)
            if match.group("port") is not None:
                raise ValueError("an SRV owner takes no port (DNS gives each target's)")
        else:
            host = check_host(match.group("host"))
    except ValueError as e:
        raise RouteError(f"invalid host in URI {_show(text)}: {e}") from None
    port = None
    if match.group("port") is not None:
        digits = match.group("port")
        # Bounded before int(): thousands of digits would raise ValueError.
        port = int(digits) if len(digits) <= 5 else 0
        if not 0 < port < 65536:
            raise RouteError(f"invalid port in URI {_show(text)}")
    service = _name(path, f"service in URI {_show(text)}") if path else None
    return RemoteURI(scheme, host, port, service, text)


def _parse_unix(rest: str, text: str) -> URI:
    if rest.startswith("/"):
        inner = rest[1:]
        if "/" in inner:
            return PathURI(rest)
        rest = inner
    return LocalURI(_name(rest, f"service in URI {_show(text)}"))


def _name(text: str, what: str) -> str:
    try:
        return validate_service_name(text)
    except InvalidServiceName as e:
        raise RouteError(f"{what}: {e}") from None


def parse_routes(parts: list[str] | tuple[str, ...]) -> tuple[Route, ...]:
    """Parse C{NAME URI} entries; blank entries (a trailing C{;}) are noise."""
    routes = []
    for part in parts:
        part = part.strip()
        if not part:
            continue
        name, _, target = part.partition(" ")
        if not target.strip():
            raise RouteError(f"malformed route {_show(part)}: expected 'SERVICE URI'")
        routes.append(Route(_name(name, f"route {_show(part)}"), parse_uri(target)))
    return tuple(routes)


def parse_network(value: str) -> tuple[Route, ...]:
    """Parse an C{IPC_NETWORK} value: routes separated by C{;}."""
    return parse_routes(value.split(";"))


# The most C{;}-separated entries a lookup's C{IPC_NETWORK} may have: a
# route costs microseconds to parse, and a lookup of 1 MiB of them stalled
# every connection of ipcd for a second.
MAX_LOOKUP_ROUTES = 256


def parse_lookup(payload: bytes) -> Lookup:
    """
    Parse a lookup payload: C{SERVICE;} followed by C{IPC_NETWORK}, of at
    most L{MAX_LOOKUP_ROUTES} entries.
    """
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise RouteError("lookup is not valid UTF-8") from None
    if text.count(";") > MAX_LOOKUP_ROUTES:
        raise RouteError(f"more than {MAX_LOOKUP_ROUTES} routes")
    head, *parts = text.split(";")
    return Lookup(_name(head.strip(), "requested service"), parse_routes(parts))


def encode_lookup(service: str, network: str) -> bytes:
    """The lookup payload an upstream client sends."""
    return f"{service};{network}".encode()
