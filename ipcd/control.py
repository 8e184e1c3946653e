"""
The operator's control socket, C{RUNDIR/ipcd-control} (0600, or 0660 with
C{[control] group}): one framed command in (C{status} or C{reload}), one
framed JSON answer out.

    ipcd status [--json] [--wide]   what ipcd is doing now
    ipcd reload                     re-read the configuration (as SIGHUP does)
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from ipcd.config import Config
from ipcd.daemons import settings_of
from ipcd.identity import credentials
from ipcd.inboundreach import inbound_reach
from ipcd.logs import printable
from ipcd.names import CONTROL_NAME, socket_path
from ipcd.reloads import instance_lines
from ipcd.routes import host_port
from ipcd.rundir import check_asked_rundir, resolve_rundir
from ipcd.wire import (
    LimitLog,
    MessageFactory,
    MessageProtocol,
    PartialMessageBudget,
    recv_message,
    send_message,
)

CONTROL_MODE = 0o600


def config_summary(
    config: Config, listening: Mapping[str, bool] | None = None
) -> dict[str, Any]:
    """
    The configuration in force, as plain JSON values; each protocol daemon
    adds its own status lines (tcpd: C{tcp_listen}).  C{listening} (by
    section: whether its network listener runs) corrects C{SCHEME_listen}
    of a daemon whose listener runs only with some settings (L{listens}).
    """
    summary = {
        "source": config.source,
        "rundir": config.rundir,
        "max_message_size": config.max_message_size,
        "lookup_timeout": config.lookup_timeout,
        "connect_timeout": config.connect_timeout,
        "allow_client_routes": config.allow_client_routes,
        "label_cache_max_age": config.label_cache_max_age,
        "redirects": dict(config.redirects),
        "routes": {name: str(uri) for name, uri in config.routes.items()},
        "rules": [str(rule) for rule in config.rules],
        "grants": [str(grant) for grant in config.grants],
        "external_daemons": list(config.external_daemons),
        "pongd": config.pongd,
        "metrics": config.metrics,
        "dns": {
            # As [dns] servers writes them; none: /etc/resolv.conf's.
            "servers": [
                host_port(address, port) for address, port in config.dns_servers
            ],
            "target_timeout": config.dns_target_timeout,
            "max_targets": config.dns_max_targets,
            "min_ttl": config.dns_min_ttl,
            "max_ttl": config.dns_max_ttl,
            "negative_ttl": config.dns_negative_ttl,
            "max_names": config.dns_max_names,
        },
    }
    for daemon in config.registry.values():
        settings = settings_of(config, daemon)
        summary.update(daemon.status(settings))
        if listening is not None and getattr(daemon, "listens", None) is not None:
            # Whether it listens was decided at start (tlsd: by the keys
            # then): the keys in force now would say what a restart does,
            # an address nothing listens on, or none while it still does.
            runs = listening.get(daemon.section, False)
            summary[f"{daemon.scheme}_listen"] = settings["listen"] if runs else None
    return summary


def status_report(
    broker: Any,
    listening: Mapping[str, bool] | None = None,
    instance: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """
    Live relayed connections, counters, the connections each of ipcd's
    limits counts now (L{ipcd.limits.ConnectionLimits.status}), what remote
    peers may reach (L{inbound_reach}) and the configuration in force
    (L{config_summary}, with C{listening}); first, when given, the
    C{instance} (L{ipcd.reloads.Reloads.status}: version, pid, uptime,
    reloads).
    """
    now = time.monotonic()
    connections = sorted(
        (stats.as_dict(now) for stats in broker.relays), key=lambda c: -c["age"]
    )
    return {
        **({} if instance is None else {"ipcd": dict(instance)}),
        "connections": connections,
        "counters": dict(sorted(broker.counters.items())),
        "limits": {
            name: limits.status() for name, limits in sorted(broker.limits.items())
        },
        "inbound": inbound_reach(
            broker.config, broker.own_names(), broker.own_inodes()
        ),
        "dns": broker.srv.status(broker.config),
        "config": config_summary(broker.config, listening),
    }


class ControlProtocol(MessageProtocol):
    """
    One command, one answer, then close; all of it within the factory's
    C{timeout} from connecting, or the connection is aborted.  An answer
    that is not there at once (a reload waiting at the reload gate) is
    ipcd's own wait, bounded by the gate, and not counted: the deadline
    stops while it waits, and the answer has a whole C{timeout} to go.
    """

    maxMessageSize = 1024
    idleTimeout = 0  # the deadline below is stricter
    _lost = False

    def connectionMade(self) -> None:
        # TimeoutMixin's timer, never reset: a deadline, not an idle timer.
        self.setTimeout(self._timeout())

    def _timeout(self) -> float:
        timeout = self.factory.timeout
        return timeout() if callable(timeout) else timeout

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        self._lost = True
        super().connectionLost(reason)

    def timeoutConnection(self) -> None:
        self._limitClosed(
            self.factory.timeouts,
            "closing {peer}: no command answered within {timeout:g} s",
            timeout=self.timeOut,
        )

    asked = False

    def messageReceived(self, payload: bytes) -> None:
        if self.asked:
            return  # one command per connection (a reload's answer may wait)
        self.asked = True
        command = payload.decode("utf-8", "replace").strip()
        handler = self.factory.handlers.get(command)
        if handler is None:
            answer: Any = {"ok": False, "error": f"unknown command {command!r}"}
        else:
            answer = handler()
        if isinstance(answer, Deferred):
            if not answer.called:
                # A control_timeout below the gate's wait (0.1 s, or up to
                # 1.8 s after a slow reload) cut a reload that then ran.
                self.setTimeout(None)
                answer.addCallback(self._rearmed)
            answer.addCallback(self._answer)
        else:
            self._answer(answer)

    def _rearmed(self, answer: dict[str, Any]) -> dict[str, Any]:
        """The deadline again, for sending the answer that was waited for."""
        if not self._lost:
            self.setTimeout(self._timeout())
        return answer

    def _answer(self, answer: dict[str, Any]) -> None:
        self.sendMessage(json.dumps(answer).encode())
        self.transport.loseConnection()


class ControlFactory(MessageFactory):
    """
    The control socket's protocols: C{handlers} by command (each returns
    the answer, or a Deferred of it), a C{timeout}
    (seconds, or a callable returning the current one) timed on C{clock}
    (default: the global reactor), partial commands counted against
    C{partialBudget} (default: a private one), timeouts counted in
    C{counters}.
    """

    def __init__(
        self,
        handlers: dict[str, Callable[[], Any]],
        timeout: float | Callable[[], float] = 10.0,
        clock: IReactorTime | None = None,
        partialBudget: PartialMessageBudget | None = None,  # noqa: N803
        counters: Counter[str] | None = None,
    ) -> None:
        super().__init__(
            ControlProtocol,
            ControlProtocol.maxMessageSize,
            idleTimeout=0,
            clock=clock,
            partialBudget=partialBudget,
            counters=counters,
        )
        self.handlers = handlers
        self.timeout = timeout
        self.timeouts = LimitLog("control requests timed out", counters, clock)


def request(
    command: str, rundir: str | None = None, timeout: float = 5.0
) -> dict[str, Any]:
    """
    Send one command to a running ipcd and return its JSON answer.  Raises
    C{ValueError} when RUNDIR is not one this user can trust
    (L{ipcd.rundir.check_asked_rundir}: where only root or this user could
    have put it, as ipcd checks it at start) or the socket is not served by
    RUNDIR's owner (ipcd's user) or root: another user's socket, bound
    there while ipcd was down or in a RUNDIR they made, gets neither the
    command nor the operator's terminal.
    """
    rundir = resolve_rundir(rundir)
    check_asked_rundir(rundir)
    path = socket_path(rundir, CONTROL_NAME)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        # Again once connected: a RUNDIR missing at the first look may be
        # another user's by now (their /tmp/libipc-run, their socket in it).
        check_asked_rundir(rundir)
        _, uid, _ = credentials(sock)
        owner = os.stat(rundir).st_uid
        if uid not in (owner, 0):
            raise ValueError(
                f"served by uid {uid}, not by RUNDIR's owner (uid {owner}): not ipcd"
            )
        send_message(sock, command.encode())
        return json.loads(recv_message(sock))


def _size(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def _details(connection: dict[str, Any]) -> str:
    """
    A connection's own groups of counters, as its daemon reports them
    (udpd's C{datagrams}): C{datagrams: sent 4, received 4, ...}.
    """
    return "; ".join(
        f"{key}: " + ", ".join(f"{name} {count}" for name, count in value.items())
        for key, value in connection.items()
        if isinstance(value, dict)
    )


# What ipcd status prints fits this many columns, unless --wide.
STATUS_WIDTH = 100
_CUT = "\N{HORIZONTAL ELLIPSIS}"
# The columns that give way when the table is too wide: SERVICE, ROUTE, PEER.
_SHRINKABLE = (1, 2, 3)
_MIN_COLUMN = 8


def format_status(report: dict[str, Any], wide: bool = False) -> str:
    """
    A plain-text rendering of L{status_report} for people: within
    L{STATUS_WIDTH} columns (long names cut, with a note saying so), or,
    C{wide}, whole and with each connection's details (TLS, datagrams).
    """
    lines = instance_lines(report["ipcd"]) if "ipcd" in report else []
    cut = False
    connections = report["connections"]
    lines.append(f"connections: {len(connections)}")
    if connections:
        header = ("DIR", "SERVICE", "ROUTE", "PEER", "IN", "OUT", "AGE")
        details = [_details(c) for c in connections] if wide else []
        extra = ("DETAILS",) if any(details) else ()
        rows = [header + extra] + [
            (
                c["direction"],
                c["service"],
                c["route"],
                c["peer"],
                _size(c["bytes_in"]),
                _size(c["bytes_out"]),
                f"{c['age']:.0f}s",
            )
            + ((detail,) if extra else ())
            for c, detail in zip(
                connections, details or [""] * len(connections), strict=True
            )
        ]
        # Escaped before measuring: a cell's width is what the terminal shows.
        rows = [tuple(printable(str(v)) for v in row) for row in rows]
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
        if not wide:
            full = list(widths)
            _shrink(widths)
            cut = widths != full
        for row in rows:
            lines.append(
                "  ".join(
                    _fit(str(v), w).ljust(w) for v, w in zip(row, widths, strict=True)
                ).rstrip()
            )
    lines.append("counters:")
    for name, value in report["counters"].items():
        lines.append(f"  {name}: {value}")
    lines.extend(_limits_lines(report.get("limits", {})))
    lines.append("inbound:")
    for name, why in report.get("inbound", {}).items():
        lines.append(f"  {name}: {why}")
    lines.extend(_dns_lines(report.get("dns", {})))
    lines.append("config:")
    for name, value in report["config"].items():
        lines.append(f"  {name}: {json.dumps(value)}")
    # Whatever the answer holds (a peer's certificate name, a DNS error, or
    # anything a socket in another's RUNDIR answers), no control character
    # reaches the operator's terminal.
    lines = [printable(line) for line in lines]
    if wide:
        return "\n".join(lines)
    fitted = [_fit(line, STATUS_WIDTH) for line in lines]
    if cut or fitted != lines:
        fitted.append(f"(cut to {STATUS_WIDTH} columns: ipcd status --wide or --json)")
    return "\n".join(fitted)


def _limits_lines(limits: dict[str, Any]) -> list[str]:
    """
    How full each of ipcd's limits is: open, of at most how many, and the
    peer with the most open (near its own maximum, it is refused next).
    """
    lines = ["limits:"] if limits else []
    for name, state in limits.items():
        line = (
            f"  {name}: {state['open']} open of {state['max']}, "
            f"{state['max_per_peer']} per peer"
        )
        busiest = state.get("busiest")
        if busiest:
            line += f"; busiest {busiest['peer']} with {busiest['open']}"
            if busiest.get("exempt"):
                # Held to no per-peer maximum: not near one, however many.
                line += " (ipcd's own uid: no per-peer cap)"
        lines.append(line)
    return lines


def _dns_lines(dns: dict[str, Any]) -> list[str]:
    """What each SRV owner resolved to: its targets and TTL left, or why not."""
    lines = ["dns:"] if dns else []
    for owner, state in dns.items():
        ttl = f", ttl {state['ttl_left']:g} s left" if "ttl_left" in state else ""
        if "targets" in state:
            count = len(state["targets"])
            lines.append(f"  {owner}: {count} target{'s' * (count != 1)}{ttl}")
            lines.extend(
                f"    {t['target']}:{t['port']} priority {t['priority']} "
                f"weight {t['weight']}"
                for t in state["targets"]
            )
        elif "error" in state:
            lines.append(f"  {owner}: {state['error']}{ttl}")
        if "last_error" in state:
            lines.append(f"  {owner}: last failure: {state['last_error']}")
    return lines


def _shrink(widths: list[int]) -> None:
    """Narrow the widest shrinkable column until the table fits, or can't."""
    while sum(widths) + 2 * (len(widths) - 1) > STATUS_WIDTH:
        widest = max(_SHRINKABLE, key=lambda i: widths[i])
        if widths[widest] <= _MIN_COLUMN:
            return
        widths[widest] -= 1


def _fit(text: str, width: int) -> str:
    """C{text}, cut to C{width} characters with an ellipsis when longer."""
    return text if len(text) <= width else text[: width - 1] + _CUT
