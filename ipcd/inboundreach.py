"""
For C{ipcd status}: which local services remote peers may reach, and why.

A remote peer (any listener, loopback included) is "others" for a socket's
permissions.  A service is reachable when an C{in} rule allows it (for some
peers) and the rule names it exactly, or others may connect to its socket,
or a grant covers it; the same order the broker follows
(L{ipcd.broker.Broker._open_as_remote}).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Collection, Iterable
from fnmatch import fnmatchcase

from ipcd.access import (
    GRANT,
    OTHERS,
    REMOTE,
    AccessDenied,
    Credentials,
    OpenedSocket,
    open_socket,
    several_names,
)
from ipcd.config import Config
from ipcd.errors import Refused
from ipcd.names import InvalidServiceName, validate_service_name
from ipcd.policy import Rule, names_exactly
from ipcd.resolution import LocalTarget, resolve


def inbound_reach(
    config: Config,
    own_names: Iterable[str],
    own_inodes: Collection[tuple[int, int]] = (),
) -> dict[str, str]:
    """
    Each name a remote peer could ask for (the sockets in RUNDIR, the
    admin's redirections and routes) that an C{in} rule allows, by name:
    C{"reachable: ..."} or C{"not reachable: ..."}, saying why.  A name
    for one of C{own_inodes} (a hard link to ipcd's socket) is ipcd's own.
    """
    own = set(own_names)
    own_inodes = frozenset(own_inodes)
    names = {*_sockets(config.rundir), *config.redirects, *config.routes} - own
    reach = {}
    for name in sorted(names):
        allowing = _allowing_rule(config.rules, name)
        if allowing is not None:
            reach[name] = _why(config, own, own_inodes, name, *allowing)
    return reach


def _sockets(rundir: str) -> list[str]:
    try:
        entries = list(os.scandir(rundir))
    except OSError:
        return []
    names = []
    for entry in entries:
        try:
            if stat.S_ISSOCK(entry.stat(follow_symlinks=False).st_mode):
                names.append(validate_service_name(entry.name))
        except (OSError, InvalidServiceName):
            continue
    return names


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None


def _allowing_rule(rules: Iterable[Rule], name: str) -> tuple[int, Rule] | None:
    """
    The first C{in} rule that allows C{name} for some peers; None if none
    does before a rule that denies it to every peer.
    """
    for index, rule in enumerate(rules, 1):
        if rule.direction != "in" or not fnmatchcase(name, rule.service):
            continue
        if rule.allows:
            return index, rule
        if rule.peer == "*":
            return None
    return None


def _why(
    config: Config,
    own: set[str],
    own_inodes: frozenset[tuple[int, int]],
    name: str,
    index: int,
    rule: Rule,
) -> str:
    try:
        target = resolve(config, name)
    except Refused as e:
        return f"not reachable: {e.reason}"
    if isinstance(target, LocalTarget) and target.name in own:
        return f"not reachable: {target.name!r} is ipcd's own socket"
    st = _lstat(target.path) if isinstance(target, LocalTarget) else None
    if st is not None and (st.st_dev, st.st_ino) in own_inodes:
        return f"not reachable: {target.path} is ipcd's own socket"
    if st is not None and stat.S_ISSOCK(st.st_mode) and st.st_nlink > 1:
        # Refused whichever way (access.one_name): a member's hard link?
        return f"not reachable: {several_names(target.path, st).reason}"
    if not isinstance(target, LocalTarget):
        if names_exactly(rule, name):
            return f"reachable: rule {index} names it"
        return f"reachable: rule {index}, routed to {target}"
    if names_exactly(rule, name):
        refused = _refused_unchecked(target.path, REMOTE)
        if refused is not None:
            return f"not reachable: {refused}"
        return f"reachable: rule {index} names it"
    try:
        opened = _walk(target.path, OTHERS, REMOTE)
    except AccessDenied:
        pass
    else:
        if isinstance(opened, str):
            return f"not reachable: {opened}"
        mode = stat.S_IMODE(opened.stat.st_mode)
        opened.close()
        return f"reachable: rule {index} is a glob and others may connect ({mode:04o})"
    for grant_index, grant in enumerate(config.grants, 1):
        if fnmatchcase(target.name, grant.service):  # for its peers
            refused = _refused_unchecked(target.path, GRANT)
            if refused is not None:
                return f"not reachable: {refused}"
            return f"reachable: grant {grant_index} ({grant})"
    try:
        mode = stat.S_IMODE(os.stat(target.path).st_mode)
        shown = f" ({mode:04o})"
    except OSError:
        shown = ""
    return f"not reachable: rule {index} is a glob and others may not connect{shown}"


def _walk(path: str, who: Credentials | None, asking: str) -> OpenedSocket | str:
    """
    The socket at C{path} as the broker opens it for a remote peer (never
    through a link as the last component), or why not (L{AccessDenied}
    raised: C{who} may not connect); C{asking} as for L{open_socket}.
    """
    try:
        return open_socket(path, who, follow_last_symlink=False, asking=asking)
    except AccessDenied:
        raise
    except FileNotFoundError:
        return f"{path} does not exist"
    except (Refused, OSError) as e:
        return str(getattr(e, "reason", None) or e)


def _refused_unchecked(path: str, asking: str) -> str | None:
    """
    Why the broker's walk without a permission check (a rule naming the
    service: L{REMOTE}, a grant: L{GRANT}) refuses C{path}: only root's or
    ipcd's links on the way, none as the last component; None if it would
    not.
    """
    opened = _walk(path, None, asking)
    if isinstance(opened, str):
        return opened
    opened.close()
    return None
