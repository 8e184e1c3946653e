"""
The firewall: rules, and decisions as plain function calls (no I/O).

    allow|deny  in|out|local  SERVICE-GLOB  [PEER-PATTERN]

Rules are tried in order, the first match wins; with no match, C{local} and
C{out} are allowed and C{in} is denied.  A PEER-PATTERN matches one of the
peer's identity labels (C{uid:1000}, C{user:alice}, C{ip:10.0.0.0/8}, ...);
C{*} matches anything.

A request that involves several names (the requested one, and each one the
client's own route names) is decided name by name, and all must allow.

Grants (C{SERVICE-GLOB PEER-PATTERN}) are the admin's explicit word that a
local client may reach a service's socket although its own permissions
would not let it connect (see L{ipcd.access}).
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase

ACTIONS = ("allow", "deny")
DIRECTIONS = ("in", "out", "local")
DEFAULTS = {"local": True, "out": True, "in": False}


class RuleError(ValueError):
    """A rule that cannot be parsed."""


@dataclass(frozen=True)
class Rule:
    action: str
    direction: str
    service: str
    peer: str = "*"

    def __str__(self) -> str:
        return f"{self.action} {self.direction} {self.service} {self.peer}"

    @property
    def allows(self) -> bool:
        return self.action == "allow"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: Rule | None  # None: the direction's default decided
    index: int | None = None  # position of the rule, from 1
    # The name this decision is about, when a request involved several.
    service: str | None = None

    def __str__(self) -> str:
        verdict = "allowed" if self.allowed else "denied"
        if self.rule is None:
            text = f"{verdict} by default"
        else:
            text = f"{verdict} by rule {self.index} ({self.rule})"
        return text if self.service is None else f"{text} for {self.service!r}"


def parse_rule(text: str, action: str | None = None) -> Rule:
    """
    Parse C{"allow in authd"}, or C{"in authd *"} with C{action} given (the
    form of C{--allow}/C{--deny}).
    """
    words = text.split()
    if action is not None:
        words = [action, *words]
    if len(words) not in (3, 4):
        raise RuleError(
            f"rule {text!r}: expected 'allow|deny in|out|local SERVICE-GLOB "
            "[PEER-PATTERN]'"
        )
    act, direction, service, *peer = words
    if act not in ACTIONS:
        raise RuleError(f"rule {text!r}: action must be allow or deny, not {act!r}")
    if direction not in DIRECTIONS:
        raise RuleError(
            f"rule {text!r}: direction must be in, out or local, not {direction!r}"
        )
    pattern = peer[0] if peer else "*"
    _check_peer_pattern(pattern, text)
    if pattern[:5].lower() == "host:":
        # Host names are in lower case (ipcd.routes.check_host), whatever
        # case a route or a zone writes them in: so is the pattern.  Not a
        # link-local address's zone: Linux's interface names keep their
        # case (Eth0 is not eth0), and so does the route's label, which a
        # lowered deny never matched.
        address, percent, zone = pattern.partition("%")
        pattern = address.lower() + percent + zone
    return Rule(act, direction, service, pattern)


def _check_peer_pattern(pattern: str, text: str, what: str = "rule") -> None:
    if pattern == "*":
        return
    # Without a ':' partition leaves value empty: one test covers both.
    kind, _, value = pattern.partition(":")
    if not kind or not value:
        raise RuleError(f"{what} {text!r}: peer pattern must be '*' or KIND:VALUE")
    if kind == "ip" and not _has_glob(value):
        try:
            network = ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise RuleError(f"{what} {text!r}: {value!r} is not an IP address or CIDR")
        zone = getattr(network.network_address, "scope_id", None)
        if zone is not None and not _zone_form(zone):
            raise RuleError(
                f"{what} {text!r}: zone {zone!r} is not an interface name "
                "(at most 15 bytes) or index (ASCII digits)"
            )
    elif kind == "unix" and not _unix_form(value):
        # A UNIX listener's peer (ipcd.identity.unix_listener_peer): a deny
        # written for it otherwise (unix:33, unix:user=www-data) let it in.
        raise RuleError(
            f"{what} {text!r}: no peer's label matches {pattern!r}: a peer "
            "of a listener on a UNIX socket is labelled unix:uid=N (N its "
            "uid in ASCII digits: unix:uid=33)"
        )
    elif kind.lower() == "host" and (spelling := _host_spelling(value)):
        # A deny written so never matched: every route's host: label is
        # spelled as ipcd.routes spells it (host:0x7f.1 no more than
        # host:0:0:0:0:0:0:0:1 or host:[::1], a glob of one character).
        raise RuleError(
            f"{what} {text!r}: no route's host is labelled {pattern!r}: {spelling}"
        )
    elif kind == "ip" and _mapped_glob(value):
        # No label is spelled so: a deny written this way (as the log
        # prints a dual-stack listener's peer) would let that peer in.
        raise RuleError(
            f"{what} {text!r}: no peer is labelled {value!r}: a dual-stack "
            "listener's IPv4 peer (::ffff:10.1.2.3) is labelled as IPv4 "
            "(ip:10.1.2.3): write it for IPv4 (ip:10.*, ip:10.0.0.0/8; "
            "ip:0.0.0.0/0 for every IPv4 peer)"
        )


def _host_spelling(value: str) -> str | None:
    """
    Why no route's C{host:} label is C{value} (a literal one: globs are
    left alone, but an IPv6 address in brackets, itself a glob): the
    spelling a route's host has (C{write host:::1}), or why no route has
    that host; None when a route's label may be C{value}.
    """
    from ipcd.routes import check_host, check_ipv6_host

    value = value.lower()  # (as parse_rule keeps it)
    bracketed = value.startswith("[") and value.endswith("]")
    if value.startswith("_") or (_has_glob(value) and not bracketed):
        return None  # an SRV owner (its own checks), or a glob
    try:
        if bracketed or ":" in value:
            address, _, zone = value.strip("[]").partition("%")
            host = check_ipv6_host(address, zone if "%" in value else None)
        else:
            host = check_host(value)
    except ValueError as e:
        return str(e)
    return None if host == value else f"write host:{host}"


# The text an IPv4-mapped IPv6 address starts with, as the kernel and
# Python print it (::ffff:10.1.2.3); "::ffff:0:" begins other addresses
# (IPv4-translated, ::ffff:0:a01:203), which keep their IPv6 label.
_MAPPED = "::ffff:"


def _mapped_glob(value: str) -> bool:
    """Whether an C{ip:} glob matches only IPv4-mapped text (no label has it)."""
    value = value.lower()
    return value.startswith(_MAPPED) and not value.startswith(_MAPPED + "0:")


# What a unix: pattern's value may be: uid= and the uid, as the label has
# it; a glob, if what comes before its first glob character can begin that.
_UNIX_UID = re.compile(r"uid=(0|[1-9][0-9]*)")
_UNIX_UID_START = re.compile(r"(u(i(d(=(0|[1-9][0-9]*)?)?)?)?)?")


def _unix_form(value: str) -> bool:
    """Whether C{unix:VALUE} can match a label C{unix:uid=N}."""
    if not _has_glob(value):
        return _UNIX_UID.fullmatch(value) is not None
    literal = re.split(r"[*?\[]", value, maxsplit=1)[0]
    return _UNIX_UID_START.fullmatch(literal) is not None


def _has_glob(value: str) -> bool:
    return any(c in value for c in "*?[")


def names_exactly(rule: Rule | None, service: str) -> bool:
    """Does C{rule} name C{service} itself, rather than match it by a glob?"""
    return rule is not None and rule.service == service and not _has_glob(service)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


# Parsed once per pattern, not per decision; bounded, as patterns are few.
@functools.lru_cache(maxsize=1024)
def _network(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """
    The network of an C{ip:} pattern; one written as IPv4-mapped IPv6
    (C{::ffff:10.0.0.0/104}, or C{::ffff:10.1.2.3} as the log prints a
    dual-stack listener's peer) is the IPv4 network it maps, as such a
    peer is an IPv4 peer: in its IPv6 form it would match no one.
    """
    network = ipaddress.ip_network(value, strict=False)
    # Only a prefix of 96 or more keeps an address mapped (::ffff: is bits
    # 80 to 95), so the IPv4 prefix is never negative.
    mapped = getattr(network.network_address, "ipv4_mapped", None)
    if mapped is not None:
        return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def _same_zone(zone: str, wanted: str) -> bool:
    """
    Whether a peer's zone (C{eth0} of C{fe80::1%eth0}, as Twisted names
    it) is the pattern's C{wanted} one, by name or index (C{%2}).  ipaddress
    keeps a pattern's zone but leaves it out of C{in}: C{ip:fe80::%eth0/64}
    let in link-local peers of every interface, whose addresses any host on
    those links may take.  A peer whose zone is not known is matched by its
    address alone, as before, so that a deny with a zone still refuses it
    (every daemon's link-local peers have theirs: udpd reads it with each
    datagram, where Twisted's UDP gives none).
    """
    if zone == wanted or not zone:
        return True
    index = zone_index(zone)  # one interface, by another name or its index
    return index is not None and index == zone_index(wanted)


def _zone_form(zone: str) -> bool:
    """
    Whether C{zone} can name an interface: an index (up to 10 ASCII
    digits), or a name as Linux takes one (under 16 bytes, no NUL, '/' or
    space).  Anything else is refused with the rule: it matched nothing,
    or raised when a peer came (a NUL, or more digits than int() reads).
    """
    if zone.isascii() and zone.isdigit():
        return len(zone) <= 10
    name = zone.encode("utf-8", "surrogateescape")
    return (
        len(name) < 16
        and not any(c in zone for c in "\0/")
        and not any(c.isspace() for c in zone)
    )


def zone_index(zone: str) -> int | None:
    """
    The interface index of C{zone} (a name, or its number in ASCII
    digits); C{None}: no such interface (now).
    """
    if zone.isascii() and zone.isdigit():  # ('²' and '١' are names)
        return int(zone)
    try:
        return socket.if_nametoindex(zone)
    except OSError:
        return None


def zoned_spellings(host: str) -> list[str]:
    """
    The other spellings of a route's zoned link-local C{host}
    (C{fe80::2%eth0}): its interface by index and by name, as it is now
    (C{fe80::2%3}), and the address alone, of every link (C{fe80::2}).
    A C{host:} rule meant for that host matches however the route spells
    its link: a C{deny out * host:fe80::2%eth0} was not a C{%3}'s, and
    a C{deny out * host:fe80::2} no zoned one's.
    """
    bare, _, zone = host.partition("%")
    spellings = {bare}
    index = zone_index(zone)
    if index is not None:
        spellings.add(f"{bare}%{index}")
        try:
            spellings.add(f"{bare}%{socket.if_indextoname(index)}")
        except OSError:
            pass  # (no such interface now: the connect says so)
    spellings.discard(host)
    return sorted(spellings)


def peer_matches(pattern: str, labels: Iterable[str]) -> bool:
    """Does C{pattern} match one of C{labels}?"""
    if pattern == "*":
        return True
    kind, _, value = pattern.partition(":")
    if kind == "ip" and not _has_glob(value):
        network = _network(value)
        zone = getattr(network.network_address, "scope_id", None)
        for label in labels:
            if label.startswith("ip:"):
                address = _ip(label[3:])
                # `in` is False across IP versions: no version test needed.
                if address is not None and address in network:
                    if zone is None or _same_zone(label.partition("%")[2], zone):
                        return True
        return False
    return any(fnmatchcase(label, pattern) for label in labels)


def decide(
    rules: Iterable[Rule],
    direction: str,
    services: Iterable[str],
    labels: Iterable[str],
) -> Decision:
    """
    Decide each of C{services} on its own: the first rule of C{direction}
    whose glob matches the name and whose peer pattern matches one of
    C{labels}, else the default.  All must allow.  The answer is the first
    denial, else the decision for the first name (the one requested); with
    several distinct names it says which name it is about.
    """
    names = tuple(dict.fromkeys(services))
    labels = tuple(labels)
    rules = tuple(rules)
    several = len(names) > 1
    first: Decision | None = None
    for name in names:
        decision = _decide_one(rules, direction, name, labels)
        if several:
            decision = Decision(decision.allowed, decision.rule, decision.index, name)
        if not decision.allowed:
            return decision
        if first is None:
            first = decision
    return first if first is not None else Decision(DEFAULTS[direction], None)


def _decide_one(
    rules: tuple[Rule, ...], direction: str, name: str, labels: tuple[str, ...]
) -> Decision:
    for index, rule in enumerate(rules, 1):
        if rule.direction != direction or not fnmatchcase(name, rule.service):
            continue
        if peer_matches(rule.peer, labels):
            return Decision(rule.allows, rule, index)
    return Decision(DEFAULTS[direction], None)


@dataclass(frozen=True)
class Grant:
    """The admin lets clients matching C{peer} reach C{service}'s socket."""

    service: str
    peer: str

    def __str__(self) -> str:
        return f"{self.service} {self.peer}"


def parse_grant(text: str) -> Grant:
    """Parse C{"SERVICE-GLOB PEER-PATTERN"}: both are required."""
    words = text.split()
    if len(words) != 2:
        raise RuleError(
            f"grant {text!r}: expected 'SERVICE-GLOB PEER-PATTERN' "
            "(both, to grant explicitly)"
        )
    service, peer = words
    _check_peer_pattern(peer, text, "grant")
    return Grant(service, peer)


def find_grant(
    grants: Iterable[Grant], service: str, labels: Iterable[str]
) -> tuple[int, Grant] | None:
    """The first grant (and its position, from 1) for C{service} and C{labels}."""
    labels = tuple(labels)
    for index, grant in enumerate(grants, 1):
        if fnmatchcase(service, grant.service) and peer_matches(grant.peer, labels):
            return index, grant
    return None
