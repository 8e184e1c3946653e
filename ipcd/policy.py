"""
The firewall: rules, and decisions as plain function calls (no I/O).

    allow|deny  in|out|local  SERVICE-GLOB  [PEER-PATTERN]

Rules are tried in order, the first match wins; with no match, C{local} and
C{out} are allowed and C{in} is denied.  A PEER-PATTERN matches one of the
peer's identity labels (C{uid:1000}, C{user:alice}, C{ip:10.0.0.0/8}, ...);
C{*} matches anything.
"""

from __future__ import annotations

import ipaddress
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

    def __str__(self) -> str:
        verdict = "allowed" if self.allowed else "denied"
        if self.rule is None:
            return f"{verdict} by default"
        return f"{verdict} by rule {self.index} ({self.rule})"


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
    return Rule(act, direction, service, pattern)


def _check_peer_pattern(pattern: str, text: str) -> None:
    if pattern == "*":
        return
    kind, sep, value = pattern.partition(":")
    if not sep or not kind or not value:
        raise RuleError(f"rule {text!r}: peer pattern must be '*' or KIND:VALUE")
    if kind == "ip" and not _has_glob(value):
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise RuleError(f"rule {text!r}: {value!r} is not an IP address or CIDR")


def _has_glob(value: str) -> bool:
    return any(c in value for c in "*?[")


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def peer_matches(pattern: str, labels: Iterable[str]) -> bool:
    """Does C{pattern} match one of C{labels}?"""
    if pattern == "*":
        return True
    kind, _, value = pattern.partition(":")
    if kind == "ip" and not _has_glob(value):
        network = ipaddress.ip_network(value, strict=False)
        for label in labels:
            if label.startswith("ip:"):
                address = _ip(label[3:])
                if address is not None and address.version == network.version:
                    if address in network:
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
    The first rule of C{direction} whose glob matches one of C{services} and
    whose peer pattern matches one of C{labels} decides; else the default.
    """
    names = tuple(services)
    labels = tuple(labels)
    for index, rule in enumerate(rules, 1):
        if rule.direction != direction:
            continue
        if not any(fnmatchcase(name, rule.service) for name in names):
            continue
        if peer_matches(rule.peer, labels):
            return Decision(rule.allows, rule, index)
    return Decision(DEFAULTS[direction], None)
