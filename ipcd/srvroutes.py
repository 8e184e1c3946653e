"""
Routes that name a DNS SRV owner: resolve it, then dial its targets in turn.

One place for every scheme: the broker gives L{SrvRoutes.connect} the
route and a C{dial} that connects one concrete C{SCHEME://TARGET:PORT/SERVICE}
target (through the scheme's daemon, policed as a literal route would be),
so protocol daemons never see DNS.  Targets are tried in RFC 2782's order
(L{ipcd.srv.order}); a target that refuses, or does not answer within
C{[dns] target_timeout}, gives way to the next, at most C{[dns]
max_targets} of them; the broker's C{connect_timeout} bounds the whole.
"""

from __future__ import annotations

import ipaddress
import random
import socket
from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime

from ipcd.config import Config
from ipcd.errors import Refused
from ipcd.resolution import RemoteTarget
from ipcd.routes import RemoteURI
from ipcd.sockets import with_deadline
from ipcd.srv import SrvRecord, order
from ipcd.srvcache import SrvCache, TtlBounds

# Where the system's resolver reads its servers when [dns] servers is empty.
RESOLV_CONF = "/etc/resolv.conf"
# Seconds waited for each DNS server's answer before asking the next, then
# (all asked) for each again before giving up: a dead DNS server costs a
# lookup 4 s, two 8 s (and the broker's connect_timeout bounds it too).
QUERY_TIMEOUTS = (1, 3)
# A failed attempt names at most this many targets' reasons.
MAX_REASONS = 3
# Each cut to this many characters: a target's refusal is its own text.
MAX_REASON = 200

Dial = Callable[[RemoteTarget], Deferred[socket.socket]]


def concrete(target: RemoteTarget, record: SrvRecord) -> RemoteTarget:
    """C{target}'s route with its SRV owner replaced by one record's target."""
    uri = target.uri
    text = f"{uri.scheme}://{record.target}:{record.port}/{target.service}"
    return RemoteTarget(
        RemoteURI(uri.scheme, record.target, record.port, target.service, text),
        target.service,
    )


def resolv_conf_servers(path: str) -> list[tuple[str, int]]:
    """
    The C{nameserver} addresses of a C{resolv.conf(5)} file; as the C
    library does, 127.0.0.1 when it names none (or cannot be read).
    """
    servers = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                words = line.split()
                if len(words) >= 2 and words[0] == "nameserver":
                    try:
                        servers.append((str(ipaddress.ip_address(words[1])), 53))
                    except ValueError:
                        continue
    except OSError:
        pass
    return servers or [("127.0.0.1", 53)]


class SrvRoutes:
    """
    SRV owners resolved through C{resolver} (an L{twisted.names} resolver
    with C{lookupService}; default: an L{ipcd.srvresolver.QuietResolver}
    asking C{[dns] servers}, or the system's C{/etc/resolv.conf}, counting
    what it drops in C{counters}), cached on C{clock}, ordered with
    C{randint}, and dialed on C{reactor}.
    """

    def __init__(
        self,
        reactor: Any,
        resolver: Any = None,
        clock: IReactorTime | None = None,
        randint: Callable[[int, int], int] | None = None,
        counters: Counter[str] | None = None,
    ) -> None:
        self.reactor = reactor
        self.counters = counters
        self.clock = clock if clock is not None else reactor
        self.randint = randint if randint is not None else random.SystemRandom().randint
        self._resolver = resolver
        self._made_for: Config | None = None
        self.cache: SrvCache | None = None
        # The last failure to reach any target, by owner (for status).
        self.last_errors: dict[str, str] = {}

    def cache_for(self, config: Config) -> SrvCache:
        """
        The cache for C{config}: made anew by the first SRV route after
        start and after each reload (which so re-reads C{/etc/resolv.conf}
        and forgets what names resolved to).
        """
        if self.cache is None or self._made_for is not config:
            resolver = self._resolver
            if resolver is None:
                resolver = self._system_resolver(config)
            self.cache = SrvCache(
                lambda owner: resolver.lookupService(owner, timeout=QUERY_TIMEOUTS),
                self.clock,
                TtlBounds(
                    config.dns_min_ttl,
                    config.dns_max_ttl,
                    config.dns_negative_ttl,
                    config.dns_max_names,
                ),
            )
            self._made_for = config
            self.last_errors.clear()
        return self.cache

    def _system_resolver(self, config: Config) -> Any:
        from ipcd.srvresolver import QuietResolver

        servers = [*config.dns_servers] or resolv_conf_servers(RESOLV_CONF)
        return QuietResolver(servers, self.reactor, self.counters)

    def connect(
        self, target: RemoteTarget, dial: Dial, config: Config
    ) -> Deferred[socket.socket]:
        """
        Connect C{target} (a route to an SRV owner) by dialing its targets
        in turn: fires with the first connected socket, or fails with
        L{Refused} saying what DNS said or why each target tried failed.
        Cancelling it cancels the dial under way.
        """
        return ensureDeferred(self._connect(target, dial, config))

    async def _connect(
        self, target: RemoteTarget, dial: Dial, config: Config
    ) -> socket.socket:
        owner = target.uri.host
        answer = await self.cache_for(config).resolve(owner)
        if answer.error is not None:
            raise Refused(f"SRV {owner}: {answer.error}")
        tried = order(answer.records, self.randint)[: config.dns_max_targets]
        reasons = []
        for record in tried:
            one = concrete(target, record)
            try:
                sock = await with_deadline(
                    maybeDeferred(dial, one),
                    config.dns_target_timeout,
                    self.reactor,
                    f"connecting to {one}",
                )
            except Refused as e:
                reason = e.reason
                if len(reason) > MAX_REASON:
                    reason = reason[: MAX_REASON - 1] + "\N{HORIZONTAL ELLIPSIS}"
                reasons.append(reason)
                continue
            self.last_errors.pop(owner.lower(), None)
            return sock
        shown = "; ".join(reasons[:MAX_REASONS])
        more = len(reasons) - MAX_REASONS
        if more > 0:
            shown += f"; and {more} more"
        why = f"SRV {owner}: none of its {len(tried)} targets tried answered: {shown}"
        if len(self.last_errors) >= config.dns_max_names:
            del self.last_errors[next(iter(self.last_errors))]
        self.last_errors[owner.lower()] = why
        raise Refused(why)

    def status(self, config: Config) -> dict[str, Any]:
        """
        By owner: the targets each resolved to (or the error) and their TTL
        left, the last failure to reach any of them; the admin's SRV routes
        not resolved yet say so.
        """
        shown: dict[str, Any] = {}
        if self.cache is not None and self._made_for is config:  # else reloaded
            shown = self.cache.status()
            for owner, why in self.last_errors.items():
                shown.setdefault(owner, {})["last_error"] = why
        for uri in config.routes.values():
            if isinstance(uri, RemoteURI) and uri.is_srv:
                shown.setdefault(uri.host.lower(), {"error": "not resolved yet"})
        return dict(sorted(shown.items()))
