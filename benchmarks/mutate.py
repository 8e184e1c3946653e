#!/usr/bin/env python3
"""
Mutation testing for ipcd's pure core and the policy-critical parts of its
I/O shell: change one thing in the code, run the tests that should notice,
and report the changes (mutants) no test noticed.

    python3 benchmarks/mutate.py                  # every module, 2 jobs
    python3 benchmarks/mutate.py routes policy    # some modules
    python3 benchmarks/mutate.py --list routes    # the mutants, not run
    python3 benchmarks/mutate.py --show routes:12 # one mutant's diff
    python3 benchmarks/mutate.py --record         # and update the results file
    python3 benchmarks/mutate.py --issue          # issue 14's mutants, each killed
    python3 benchmarks/mutate.py --equivalents    # the listed equivalents survive

Standard library only (plus ipcd's test dependencies).  Each job works in a
private copy of the checkout in a temporary directory: the checkout itself is
never written.  Per mutant the job writes the mutated module into its copy
(``ast.unparse``) and runs only that module's test modules with trial, in a
child forked from a process that has already imported Twisted and trial (no
interpreter start-up per mutant), with ``--exitfirst`` and a timeout; the
unmutated run that sets that timeout is bounded too (a hang is said).

A mutant is killed when the tests fail or time out, survives when they pass.
Mutants judged equivalent (no behaviour to observe) are listed, with the
reason, in ``benchmarks/mutation-equivalents.txt`` and left out of the
score; an entry names the file, the enclosing qualname, the stripped
source line (``@K`` when the qualname has that text on K lines: the Kth),
and the change (``[N]`` when the line has it N times: the Nth), and no
line number, so an edit elsewhere in the file leaves it valid and an entry
never stands for another mutant.  ``--equivalents`` runs the
listed mutants again and fails if a test kills one (or one is gone): a
wrong entry cannot hide.  ``--record`` merges a run's module sections into
``benchmarks/mutation-results.txt``.  Each run ends with a table of the
score per module.

Operators: comparison swaps (``==``/``!=``, ``<``/``<=``, ``in``/``not in``,
``is``/``is not``), ``and``/``or`` and dropping either operand of one,
arithmetic and bitwise swaps, dropping ``not`` and unary minus, negating
``if``/``while``/conditional tests, integer constants +1/-1,
``True``/``False``, ``break``/``continue``, dropping a call statement, an
assignment or a ``raise``; a ``return`` of a value returning ``None`` (and
of a comparison, its negation); string methods swapped (``startswith``/
``endswith``, ``lower``/``upper``, ``strip``/``lstrip``/``rstrip``,
``split``/``rsplit``, ``partition``/``rpartition``, ``fullmatch``/``match``,
...) and ``any``/``all``, ``min``/``max``; boundary strings: a string
compared against, a method's string argument (``split("/")``) or a
string iterated over losing its last character (``""`` becoming ``"x"``),
and each member of a constant collection compared against dropped.
Strings elsewhere (messages) and annotations are not mutated.
"""

from __future__ import annotations

import argparse
import ast
import copy
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENTS = ROOT / "benchmarks" / "mutation-equivalents.txt"
RESULTS = ROOT / "benchmarks" / "mutation-results.txt"

_LOOKUP_TESTS = (  # fastest first: --exitfirst stops at the first failure
    "test_brokerpath",
    "test_protocols",
    "test_testing",
    "test_promises",
    "test_limits",
    "test_helddirs",
    "test_owninodes",
    "test_broker",
    "test_access",
    "test_lookups",
)

# module -> (file, scope: qualnames mutated, None for all; test modules)
MODULES: dict[str, tuple[str, tuple[str, ...] | None, tuple[str, ...]]] = {
    "routes": (
        "ipcd/routes.py",
        None,
        # test_srv: the SRV owner routes' syntax.
        ("test_promises", "test_routes", "test_resolve", "test_config", "test_srv"),
    ),
    "policy": (
        "ipcd/policy.py",
        None,
        ("test_promises", "test_policy", "test_config"),
    ),
    "names": (
        "ipcd/names.py",
        None,
        # Fastest first (--exitfirst).  test_placing, test_planted: the
        # socket placed at its name, plants taken out; test_api's RootTests:
        # the blocking client imports names.py without Twisted; groups
        # refused (test_listener) and given by number (test_endpoints); an
        # ipcd given RUNDIR/ipc by systemd (test_namedSockets).  Not all of
        # test_config, test_api, test_systemd (50 s more, ipcd processes
        # started): what they kill, these kill (session 36).
        (
            "test_promises",
            "test_routes",
            "test_api.RootTests",
            "test_systemd.AdoptedPortTests",
            "test_placing",
            "test_backlogs",
            "test_listener.SocketGroupTests",
            "test_endpoints.ServerEndpointTests",
            "test_names",
            "test_rundir",
            "test_planted",
            "test_systemd.ActivationTests.test_namedSockets",
        ),
    ),
    "config": (
        "ipcd/config.py",
        None,
        # test_srv, test_metrics: the [dns] and [metrics] sections.
        ("test_promises", "test_config", "test_resolve", "test_srv", "test_metrics"),
    ),
    # What config.py and names.py held before they were split.
    "checkers": (
        "ipcd/checkers.py",
        None,
        ("test_promises", "test_config", "test_resolve", "test_metrics"),
    ),
    "rundir": (
        "ipcd/rundir.py",
        None,
        ("test_promises", "test_names", "test_rundir", "test_config"),
    ),
    "wire": (
        "ipcd/wire.py",
        None,
        # test_metrics: the count of log lines dropped (LOG_LINES_DROPPED).
        (
            "test_promises",
            "test_wire",
            "test_protocols",
            "test_limits",
            "test_budgets",
            "test_metrics",
        ),
    ),
    # The same messages on blocking sockets (the client's side of wire).
    "framing": (
        "ipcd/framing.py",
        None,
        ("test_wire", "test_promises", "test_client"),
    ),
    # The descriptor's side: ok + SCM_RIGHTS sent, received and judged,
    # adopted (test_broker: ok in one sendmsg; test_testing: Twisted's way,
    # on ipcd.testing's transports; test_client: receive_fd and check_reply;
    # test_endpoints: adopt_into_reactor).
    "handoff": (
        "ipcd/handoff.py",
        None,
        (
            "test_protocols",
            "test_promises",
            "test_testing",
            "test_nodescriptors",
            "test_broker",
            "test_endpoints",
            "test_client",
        ),
    ),
    "resolution": (
        "ipcd/resolution.py",
        None,
        ("test_targets", "test_promises", "test_resolve"),
    ),
    "access": (
        "ipcd/access.py",
        None,
        # Fastest first: --exitfirst stops at the first failure.
        # test_accessacl: ACLs at their edges (kept, bounded, unreadable).
        (
            "test_accessacl",
            "test_accesswalk",
            "test_helddirs",
            "test_promises",
            "test_access",
        ),
    ),
    # The lookup path, a client's lookup to the socket it may have, across
    # the modules broker.py was split into.
    "lookup": ("ipcd/lookup.py", None, _LOOKUP_TESTS),
    "lookupprotocol": (
        "ipcd/lookupprotocol.py",
        (
            "LookupProtocol.messageReceived",
            "LookupProtocol.answer",
            "LookupProtocol.messageTooLarge",
            "LookupProtocol._answered_later",
            "LookupProtocol._reply",
            "LookupProtocol._answer_no",
            "LookupProtocol._send_no",
            "LookupProtocol.send_rest",
            "LookupProtocol.connectionLost",
            "LookupFactory.serve_at_once",
        ),
        _LOOKUP_TESTS,
    ),
    "ataccept": ("ipcd/ataccept.py", None, _LOOKUP_TESTS),
    "decisionlog": ("ipcd/decisionlog.py", None, ("test_logs", *_LOOKUP_TESTS)),
    "logbatch": ("ipcd/logbatch.py", None, ("test_logbatch",)),
    "ownsockets": ("ipcd/ownsockets.py", None, _LOOKUP_TESTS),
    # Daemons' socket inodes kept while RUNDIR is unchanged: its own tests
    # first (--exitfirst), then the lookup path's.
    "owninodes": (
        "ipcd/owninodes.py",
        None,
        ("test_owninodes", *(t for t in _LOOKUP_TESTS if t != "test_owninodes")),
    ),
    "broker": (
        "ipcd/broker.py",
        (
            "Broker.open",
            "Broker.open_now",
            "Broker._police_and_connect",
            "Broker._police",
            "Broker._refuse",
            "Broker._connect",
            "Broker._open_local",
            "Broker._open_as_client",
            "Broker._open_granted",
            "Broker.own_names",
            "Broker.own_sockets_listening",
            "_closing",
            "_denied",
        ),
        (*_LOOKUP_TESTS, "test_metrics"),  # the decisions counted and timed
    ),
    "psk": (
        "ipcd/daemons/tls/psk.py",
        None,
        # test_compat: PSK refused where pyOpenSSL lacks what it needs.
        ("test_pskfile", "test_tlsmaterial", "test_tls", "test_compat"),
    ),
    "tlsmaterial": (
        "ipcd/daemons/tls/material.py",
        None,
        (
            "test_tlscontexts",
            "test_tlsmaterial",
            "test_pskfile",
            "test_tlsdialer",
            "test_tls",
            "test_compat",
            "test_ktls_plan",  # connections watched for kernel TLS (runs here)
        ),
    ),
    "wsframes": (
        "ipcd/daemons/websocket/frames.py",
        None,
        ("test_wsframes",),
    ),
    # websocketd's own wire code: its small frames and frame-by-frame reads.
    "wsbridge": (
        "ipcd/daemons/websocket/bridge.py",
        (
            "WebSocketSide.dataReceived",
            "WebSocketSide._smallMessageLimit",
            "WebSocketSide._smallMessage",
            "WebSocketSide._sendSmall",
            "WebSocketSide._frameByFrame",
            "WebSocketSide.onMessageEnd",
            "WebSocketSide.onMessage",
            "MessageSide.dataReceived",
            "MessageSide.messageReceived",
            "MessageSide.messageTooLarge",
        ),
        ("test_wsbridge", "test_wsframes", "test_wsbounds", "test_websocket"),
    ),
    # udpd's datagrams and its receive window.
    "udpwire": (
        "ipcd/daemons/udp/wire.py",
        None,
        ("test_udpwirebounds", "test_udpwire", "test_udpsession", "test_udp"),
    ),
    # The bound on 'ipcd reload' (a Clock's tests, then the control socket's).
    "reloadgate": ("ipcd/reloadgate.py", None, ("test_reload",)),
    # A request that left through a daemon and came back: each daemon's
    # route loop, on a real ipcd.
    "owndials": (
        "ipcd/owndials.py",
        None,
        (
            "test_owndials",
            "test_tcp.RouteLoopTests",
            "test_tls.RouteLoopTests",
            "test_udp.RouteLoopTests",
            "test_websocket.RouteLoopTests",
        ),
    ),
    # Peers' labels, which policy matches, and a local peer's credentials,
    # which access checks: SO_PEERCRED and SO_PEERGROUPS of real peer
    # processes (test_peercache), the user and group databases and their
    # cache; a remote peer's address.
    "identity": (
        "ipcd/identity.py",
        None,
        (
            "test_owndials",
            "test_peercache",
            "test_lookups.LabelCacheTests",
            "test_lookups.GroupChangeTests",
            "test_operations",
            "test_protocols",
            "test_inboundcore",
            "test_brokerpath",
        ),
    ),
    # Listeners' connection limits, refusals and their rate-limited log.
    "limits": ("ipcd/limits.py", None, ("test_limits",)),
    # udpd's datagrams in batches (GSO, GRO): its own tests on real sockets
    # first, then sessions end to end (IPv6: the address Twisted's way), and
    # answers from the address each peer wrote to (test_udpsource).
    # Not test_systemd (15 s a run): test_udpbatch checks a socket read
    # with gro=False is left without UDP_GRO, as that test does.
    "batch": (
        "ipcd/daemons/udp/batch.py",
        None,
        (
            "test_udpbatch",
            "test_udp.EndToEndTests",
            "test_udp.IPv6Tests",
            "test_udpsource",
        ),
    ),
    # The PROXY protocol header a haproxy: listener reads: pure, its own tests.
    "proxyheader": ("ipcd/proxyheader.py", None, ("test_proxyheader",)),
    # Outbound relays (udp://, ws://, tls://) counted per client and in all.
    "outlimits": ("ipcd/outlimits.py", None, ("test_outlimits",)),
    # udpd's answers from the address a peer wrote to (IP_PKTINFO).
    "source": ("ipcd/daemons/udp/source.py", None, ("test_udpsource",)),
    # Inbound handshakes without I/O (every daemon's): its own tests.
    "inboundcore": ("ipcd/inboundcore.py", None, ("test_inboundcore",)),
    # SRV answers cached for their TTL, queries in flight bounded.
    "srvcache": ("ipcd/srvcache.py", None, ("test_srv",)),
    # The lookup port: its accept loop and hand-overs, placed and adopted
    # ports (its own tests first, then the lookup path on real ipcds).
    # Not test_lookups.UnexpectedFailureTests (20 s): test_lookupport
    # sends EMFILE to Twisted's loop as it does.
    "lookupport": (
        "ipcd/lookupport.py",
        None,
        (
            "test_lookupport",
            "test_lookups.HandedOverTests",
            "test_lookups.AnsweredAtOnceTests",
            "test_names.ListenTests",
            "test_systemd.AdoptedPortTests",
            "test_planted.TakeNameTests",
            "test_placing",
            "test_broker",
            "test_lookups.ConcurrentLookupTests",
        ),
    ),
    # Sockets put at their names in one step: test_placing's own steps
    # (other processes acting between make_private's, made for real),
    # then the listeners that place.  Not test_instancelock.TwoAtOnceTests
    # (60 s) nor test_planted.PlantedStartTests (ipcd processes).
    "placing": (
        "ipcd/placing.py",
        None,
        (
            "test_placing",
            "test_lookupport.PlacedAddressTests",
            "test_planted.TakeNameTests",
            "test_names.ListenTests",
            "test_instancelock.LockTests",
            "test_planted.SweepTests",
            "test_listener.SocketGroupTests",
            "test_names.HardLinkedSocketTests",
            "test_planted.RacingMemberTests",
        ),
    ),
    # TLS made at a server peer's first byte: its own tests in memory
    # first, then real peers on tlsd, websocketd and metrics' listeners.
    "lazytls": (
        "ipcd/lazytls.py",
        None,
        (
            "test_tlslazy.StartTests",
            "test_tlslazy.HandshakeTests",
            "test_tlscontexts",
            "test_tlslazy",
        ),
    ),
}

# The survivors issue 14 named, as written there: (point, file, old, new).
# ``--issue`` checks that each is killed (by its module's tests, which
# include test_promises).
ISSUE_MUTANTS: list[tuple[str, str, str, str]] = [
    ("1", "names", "        os.chown(path, -1, gid)", "        pass"),
    ("1", "names", "    if gid != -1:", "    if gid == -1:"),
    ("1", "names", "    gid = -1\n", "    gid = 1\n"),
    (
        "1",
        "names",
        '            raise ValueError(f"no such group {group!r} for {path}") from None',
        "            pass",
    ),
    ("1", "config", '"control": {"group":', '"control": {"groups":'),
    (
        "2",
        "policy",
        "network = ipaddress.ip_network(value, strict=False)",
        "network = ipaddress.ip_network(value, strict=True)",
    ),
    (
        "3",
        "names",
        "old = os.umask(0o777 & ~mode | _SOCKET_UMASK)",
        "old = os.umask(0)",
    ),
    (
        "4",
        "routes",
        "        if not part:\n            continue",
        "        if not part:\n            break",
    ),
    ("5", "routes", 'text.split("://", 1)', 'text.split("://", 2)'),
    ("6", "wire", "        protocol.maxMessageSize = self.maxMessageSize\n", ""),
    (
        "7",
        "framing",
        "    sock.sendall(encode(payload))",
        "    sock.sendall(HEADER.pack(len(payload)))\n    sock.sendall(payload)",
    ),
    (
        "7",
        "framing",
        '    return b"".join(chunks)',
        '    return chunks[0] if chunks else b""',
    ),
    (
        "8",
        "policy",
        "    labels = tuple(labels)\n    rules = tuple(rules)",
        "    rules = tuple(rules)",
    ),
    (
        "9",
        "checkers",
        "not isinstance(value, int) or value <= 0",
        "not isinstance(value, int)",
    ),
    (
        "9",
        "checkers",
        "if isinstance(value, bool) or not isinstance(value, int) or value <= 0",
        "if not isinstance(value, int) or value <= 0",
    ),
    (
        "9",
        "checkers",
        "    if not isinstance(value, str) or not value:",
        "    if not value:",
    ),
    (
        "9",
        "checkers",
        'if not isinstance(value, str) or ":" not in value:',
        'if ":" not in value:',
    ),
    (
        "9",
        "config",
        "    if not isinstance(value, Mapping):\n"
        "        raise ConfigError(f'{source}: [{table}]",
        "    if False:\n        raise ConfigError(f'{source}: [{table}]",
    ),
    (
        "9",
        "config",
        '_check_redirect_loops(merged["redirects"], path or "command line")',
        '_check_redirect_loops(merged["redirects"], path)',
    ),
    ("10", "routes", r"\[(?P<v6>[0-9A-Fa-f:.]+)\]", r"\[(?P<v6>[^\]]*)\]"),
    ("10", "routes", "if len(digits) <= 5 else 0", "if len(digits) <= 6 else 0"),
    ("10", "policy", 'for c in "*?["', 'for c in "*"'),
    ("10", "framing", "    if size > max_size:", "    if size >= max_size:"),
    ("10", "resolution", "MAX_HOPS = 32", "MAX_HOPS = 31"),
    ("10", "resolution", "MAX_HOPS = 32", "MAX_HOPS = 33"),
    (
        "10",
        "routes",
        "@dataclass(frozen=True)\nclass RemoteURI",
        "@dataclass\nclass RemoteURI",
    ),
    ("10", "policy", "@dataclass(frozen=True)\nclass Rule", "@dataclass\nclass Rule"),
    (
        "10",
        "names",
        'raise SocketInUse(f"another process is listening on {path}")\n        raise',
        "pass\n        raise",
    ),
    (
        "10",
        "names",
        '            raise SocketInUse(f"another process is listening on {path}")\n'
        "        raise\n",
        '            raise SocketInUse(f"another process is listening on {path}")\n',
    ),
]

_COMPARE = {
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
}
_BINARY = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.FloorDiv,
    ast.Div: ast.Mult,
    ast.FloorDiv: ast.Mult,
    ast.Mod: ast.FloorDiv,
    ast.BitOr: ast.BitAnd,
    ast.BitAnd: ast.BitOr,
    ast.BitXor: ast.BitOr,
    ast.LShift: ast.RShift,
    ast.RShift: ast.LShift,
}
_SKIP_FIELDS = {"annotation", "returns", "type_comment"}
# Method swaps: the other end, the other case, the other match.
_METHODS = {
    "startswith": ("endswith",),
    "endswith": ("startswith",),
    "lower": ("upper",),
    "upper": ("lower",),
    "strip": ("lstrip", "rstrip"),
    "lstrip": ("strip",),
    "rstrip": ("strip",),
    "split": ("rsplit",),
    "rsplit": ("split",),
    "partition": ("rpartition",),
    "rpartition": ("partition",),
    "find": ("rfind",),
    "rfind": ("find",),
    "removeprefix": ("removesuffix",),
    "removesuffix": ("removeprefix",),
    "fullmatch": ("match",),
    "match": ("fullmatch",),
    "isprintable": ("isascii",),
    "isascii": ("isprintable",),
}
_FUNCTIONS = {"any": "all", "all": "any", "min": "max", "max": "min"}
# Methods whose first argument, a string, is logic (not a message).
_STRING_ARGUMENTS = {
    "startswith",
    "endswith",
    "split",
    "rsplit",
    "partition",
    "rpartition",
    "strip",
    "lstrip",
    "rstrip",
    "find",
    "rfind",
    "removeprefix",
    "removesuffix",
    "count",
}


@dataclass(frozen=True)
class Mutant:
    module: str
    index: int  # the site's position in the walk
    choice: int  # which replacement at that site
    line: int
    qualname: str
    source_line: str
    change: str

    @property
    def id(self) -> str:
        return f"{self.module}:{self.number}"

    number: int = 0
    ordinal: int = 1  # among this line's mutants with the same change
    occurrence: int = 1  # among the lines of qualname with this text

    @property
    def key(self) -> str:
        """
        What the equivalents file names: the file, the enclosing qualname,
        the line's text (with C{@K}, from 2, when the qualname has that
        text on several lines: the Kth of them), the change (with C{[N]},
        from 2, when the line has that change several times).  No line
        number: an edit elsewhere in the file leaves the key as it was.
        """
        text = self.source_line
        if self.occurrence != 1:
            text = f"{text} @{self.occurrence}"
        change = self.change if self.ordinal == 1 else f"{self.change} [{self.ordinal}]"
        return f"{MODULES[self.module][0]} :: {self.qualname} :: {text} :: {change}"


def _name(node: ast.AST) -> str:
    return ast.unparse(node)


def _alternatives(node: ast.AST, parent_field: str) -> list[tuple[str, object]]:
    """The mutations of one node: (description, new node or list of nodes)."""
    out: list[tuple[str, object]] = []
    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            swap = _COMPARE.get(type(op))
            if swap is not None:
                new = copy.deepcopy(node)
                new.ops[i] = swap()
                out.append((f"{_op(op)} -> {_op(new.ops[i])}", new))
        out += _compared_strings(node)
    elif isinstance(node, ast.BoolOp):
        other = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        new = copy.deepcopy(node)
        new.op = other
        out.append((f"{_op(node.op)} -> {_op(other)}", new))
        for i, value in enumerate(node.values):
            rest = [copy.deepcopy(v) for j, v in enumerate(node.values) if j != i]
            kept = rest[0] if len(rest) == 1 else ast.BoolOp(node.op, rest)
            out.append((f"drop {_short(value)} from {_op(node.op)}", kept))
    elif isinstance(node, ast.Call):
        out += _calls(node)
    elif isinstance(node, ast.comprehension | ast.For) and _is_text(node.iter):
        for change, text in _texts(node.iter.value):
            new = copy.deepcopy(node)
            new.iter = ast.Constant(text)
            out.append((change, new))
    elif isinstance(node, ast.Return) and not (
        node.value is None
        or isinstance(node.value, ast.Constant)
        and node.value.value is None
    ):
        out.append(("return None", ast.Return(None)))
        if isinstance(node.value, ast.Compare | ast.BoolOp):
            negated = ast.UnaryOp(ast.Not(), copy.deepcopy(node.value))
            out.append(("negate the return value", ast.Return(negated)))
    elif isinstance(node, ast.BinOp):
        swap = _BINARY.get(type(node.op))
        if swap is not None:
            new = copy.deepcopy(node)
            new.op = swap()
            out.append((f"{_op(node.op)} -> {_op(new.op)}", new))
    elif isinstance(node, ast.UnaryOp) and isinstance(
        node.op, ast.Not | ast.USub | ast.Invert
    ):
        out.append((f"drop {_op(node.op)}", copy.deepcopy(node.operand)))
    elif isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool):
            out.append((f"{value} -> {not value}", ast.Constant(not value)))
        elif isinstance(value, int):
            out.append((f"{value} -> {value + 1}", ast.Constant(value + 1)))
            if value != 0:
                out.append((f"{value} -> {value - 1}", ast.Constant(value - 1)))
        elif isinstance(value, float):
            out.append((f"{value} -> {value + 1}", ast.Constant(value + 1)))
    elif isinstance(node, ast.Break):
        out.append(("break -> continue", ast.Continue()))
    elif isinstance(node, ast.Continue):
        out.append(("continue -> break", ast.Break()))
    if isinstance(node, ast.If | ast.While | ast.IfExp | ast.Assert):
        test = node.test
        constant = isinstance(test, ast.Constant)
        if not constant and not (
            isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not)
        ):
            new = copy.deepcopy(node)
            new.test = ast.UnaryOp(ast.Not(), new.test)
            out.append(("negate the test", new))
    if parent_field in ("body", "orelse", "finalbody", "handlers"):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            out.append(("drop the call", ast.Pass()))
        elif isinstance(node, ast.Raise):
            out.append(("drop the raise", ast.Pass()))
        elif isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
            out.append(("drop the assignment", ast.Pass()))
    return out


def _short(node: ast.AST) -> str:
    text = ast.unparse(node)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_text(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str | bytes)


def _texts(value: str | bytes) -> list[tuple[str, str | bytes]]:
    """A string constant's boundary: one character fewer, or one if empty."""
    if value:
        other = value[:-1]
    else:
        other = b"x" if isinstance(value, bytes) else "x"
    return [(f"{value!r} -> {other!r}", other)]


def _compared_strings(node: ast.Compare) -> list[tuple[str, object]]:
    """Strings compared against, and the members of constant collections."""
    out: list[tuple[str, object]] = []
    operands = [node.left, *node.comparators]
    for i, operand in enumerate(operands):
        if _is_text(operand):
            for change, text in _texts(operand.value):
                new = copy.deepcopy(node)
                _set_operand(new, i, ast.Constant(text))
                out.append((change, new))
        elif isinstance(operand, ast.Tuple | ast.Set | ast.List) and all(
            isinstance(e, ast.Constant) for e in operand.elts
        ):
            if len(operand.elts) < 2:
                continue
            for j, element in enumerate(operand.elts):
                new = copy.deepcopy(node)
                kept = copy.deepcopy(operand)
                del kept.elts[j]
                _set_operand(new, i, kept)
                out.append((f"drop {_short(element)} from {_short(operand)}", new))
    return out


def _set_operand(node: ast.Compare, i: int, value: ast.expr) -> None:
    if i == 0:
        node.left = value
    else:
        node.comparators[i - 1] = value


def _calls(node: ast.Call) -> list[tuple[str, object]]:
    """Swapped string methods and builtins, and their string arguments."""
    out: list[tuple[str, object]] = []
    func = node.func
    if isinstance(func, ast.Attribute):
        swaps = _METHODS.get(func.attr, ())
        if (
            func.attr in ("split", "rsplit")
            and len(node.args) < 2
            and not node.keywords
        ):
            swaps = ()  # without maxsplit, the same list: no mutant
        for other in swaps:
            new = copy.deepcopy(node)
            new.func.attr = other
            out.append((f".{func.attr}() -> .{other}()", new))
        if func.attr in _STRING_ARGUMENTS and node.args and _is_text(node.args[0]):
            for change, text in _texts(node.args[0].value):
                new = copy.deepcopy(node)
                new.args[0] = ast.Constant(text)
                out.append((change, new))
    elif isinstance(func, ast.Name) and func.id in _FUNCTIONS:
        new = copy.deepcopy(node)
        new.func.id = _FUNCTIONS[func.id]
        out.append((f"{func.id}() -> {new.func.id}()", new))
    return out


def _op(op: ast.AST) -> str:
    names = {
        ast.Eq: "==",
        ast.NotEq: "!=",
        ast.Lt: "<",
        ast.LtE: "<=",
        ast.Gt: ">",
        ast.GtE: ">=",
        ast.In: "in",
        ast.NotIn: "not in",
        ast.Is: "is",
        ast.IsNot: "is not",
        ast.And: "and",
        ast.Or: "or",
        ast.Add: "+",
        ast.Sub: "-",
        ast.Mult: "*",
        ast.Div: "/",
        ast.FloorDiv: "//",
        ast.Mod: "%",
        ast.BitOr: "|",
        ast.BitAnd: "&",
        ast.BitXor: "^",
        ast.LShift: "<<",
        ast.RShift: ">>",
        ast.Not: "not",
        ast.USub: "-",
        ast.Invert: "~",
    }
    return names[type(op)]


def _walk(tree: ast.AST, scope: tuple[str, ...] | None):
    """
    Yield (node, parent, field, index, qualname) for every mutable node in
    scope, in a fixed order; docstrings, strings, annotations and
    C{from __future__} lines are left alone.
    """

    def visit(node, parent, field, index, qualname, inside):
        if isinstance(node, ast.ImportFrom | ast.Import):
            return
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            return  # a docstring
        if isinstance(node, ast.JoinedStr):
            return  # messages
        name = None
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            name = node.name
        elif parent is tree and isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            name = _name(targets[0])
        if name is not None:
            qualname = f"{qualname}.{name}" if qualname else name
            if scope is not None and not inside:
                inside = any(
                    qualname == s or qualname.startswith(s + ".") for s in scope
                )
        elif scope is not None and parent is tree:
            inside = False
        if scope is None or inside:
            yield node, parent, field, index, qualname
        for child_field, value in ast.iter_fields(node):
            if child_field in _SKIP_FIELDS:
                continue
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and (
                child_field == "decorator_list"
            ):
                continue
            if isinstance(value, list):
                for i, item in enumerate(value):
                    if isinstance(item, ast.AST):
                        yield from visit(item, node, child_field, i, qualname, inside)
            elif isinstance(value, ast.AST):
                yield from visit(value, node, child_field, None, qualname, inside)

    yield from visit(tree, None, None, None, "", scope is None)


def mutants(module: str) -> list[Mutant]:
    path, scope, _ = MODULES[module]
    source = (ROOT / path).read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    found = []
    seen: dict[tuple[int, str], int] = {}
    # (qualname, text) -> the lines with that text, for the occurrence.
    places: dict[tuple[str, str], set[int]] = {}
    for site, (node, _parent, field, _i, qualname) in enumerate(_walk(tree, scope)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str | bytes):
            continue
        for choice, (change, _new) in enumerate(_alternatives(node, field or "")):
            # (A comprehension has no line of its own: its iterable's.)
            line = getattr(node, "lineno", 0) or getattr(node.iter, "lineno", 0)
            seen[line, change] = ordinal = seen.get((line, change), 0) + 1
            text = lines[line - 1].strip() if line else ""
            qualname = qualname or "<module>"
            places.setdefault((qualname, text), set()).add(line)
            found.append(
                Mutant(
                    module,
                    site,
                    choice,
                    line,
                    qualname,
                    text,
                    change,
                    len(found) + 1,
                    ordinal,
                )
            )
    return [
        replace(
            m, occurrence=sorted(places[m.qualname, m.source_line]).index(m.line) + 1
        )
        for m in found
    ]


def mutated_source(mutant: Mutant) -> str:
    path, scope, _ = MODULES[mutant.module]
    tree = ast.parse((ROOT / path).read_text())
    for site, (node, parent, field, index, _q) in enumerate(_walk(tree, scope)):
        if site != mutant.index:
            continue
        _change, new = _alternatives(node, field or "")[mutant.choice]
        if index is None:
            setattr(parent, field, new)
        else:
            getattr(parent, field)[index] = new
        break
    else:
        raise LookupError(mutant.id)
    return ast.unparse(ast.fix_missing_locations(tree)) + "\n"


def load_equivalents() -> dict[str, str]:
    """The equivalents file: key -> reason."""
    found: dict[str, str] = {}
    if not EQUIVALENTS.exists():
        return found
    for raw in EQUIVALENTS.read_text().splitlines():
        if not raw.strip() or raw.startswith("#"):
            continue
        key, _, reason = raw.partition(" -- ")
        found[key.strip()] = reason.strip()
    return found


class Worker:
    """A private copy of the checkout, and the trial child running in it."""

    def __init__(self, base: Path, number: int) -> None:
        self.root = base / f"job{number}"
        shutil.copytree(
            ROOT,
            self.root,
            ignore=shutil.ignore_patterns(
                ".git", "__pycache__", "_trial_temp*", "*.egg-info", "build", ".venv"
            ),
        )
        self.pid: int | None = None
        self.mutant: Mutant | None = None
        self.started = 0.0
        self.restore: tuple[Path, str] | None = None

    def start(
        self,
        mutant: Mutant | None,
        tests: tuple[str, ...],
        source: tuple[str, str] | None = None,
    ) -> None:
        """Run C{tests} against C{mutant} (or C{source}: path, text)."""
        if self.restore is not None:
            self.restore[0].write_text(self.restore[1])
            self.restore = None
        if mutant is not None:
            source = (MODULES[mutant.module][0], mutated_source(mutant))
        if source is not None:
            target = self.root / source[0]
            self.restore = (target, target.read_text())
            target.write_text(source[1])
        self.mutant = mutant
        self.started = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the child: run trial in the copy, quietly
            try:
                os.setpgid(0, 0)
                os.chdir(self.root)
                sys.path.insert(0, str(self.root))
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, 1)
                os.dup2(null, 2)
                sys.argv = ["trial", "--exitfirst", *(f"ipcd.test.{t}" for t in tests)]
                from twisted.scripts.trial import run

                run()
            except SystemExit as e:
                os._exit(e.code if isinstance(e.code, int) else 1)
            except BaseException:
                os._exit(3)
            os._exit(0)
        self.pid = pid

    def finish(self, limit: float) -> int | None:
        """
        The exit code of the run started last, or None when it has not
        ended within C{limit} s (a hang: then it is killed).
        """
        assert self.pid is not None
        deadline = time.monotonic() + limit
        while True:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() > deadline:
                self.kill()
                os.waitpid(self.pid, 0)
                return None
            time.sleep(0.05)

    def kill(self) -> None:
        if self.pid is not None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# The unmutated tests of any module take well under a minute: past this
# they hang (a deadlock in the code under test), and the run says so.
BASELINE_LIMIT = 600.0


def run(chosen: list[str], jobs: int, out, recheck: bool = False) -> int:
    """
    Run the mutants of C{chosen}; with C{recheck}, only the listed
    equivalents, each of which must still survive.
    """
    # Import what every child needs once, here (but no reactor, no ipcd).
    import hypothesis  # noqa: F401
    import twisted.scripts.trial  # noqa: F401
    import twisted.trial.runner  # noqa: F401

    assert "twisted.internet.reactor" not in sys.modules
    assert not any(m == "ipcd" or m.startswith("ipcd.") for m in sys.modules)
    sys.dont_write_bytecode = True
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    equivalents = load_equivalents()
    used: set[str] = set()
    base = Path(tempfile.mkdtemp(prefix="ipcd-mutate-"))
    workers = [Worker(base, n) for n in range(jobs)]
    totals = {}
    failed = False
    started = time.monotonic()
    try:
        for module in chosen:
            tests = MODULES[module][2]
            # The unmutated tests must pass: their time sets the timeout.
            workers[0].start(None, tests)
            code = workers[0].finish(BASELINE_LIMIT)
            baseline = time.monotonic() - workers[0].started
            if code is None:
                print(
                    f"{module}: the tests did not end unmutated within"
                    f" {BASELINE_LIMIT:g} s (a hang?); not run",
                    file=out,
                )
                failed = True
                continue
            if code != 0:
                print(f"{module}: the tests fail unmutated; not run", file=out)
                failed = True
                continue
            # Generous: the machine may be busy; a timeout counts as killed.
            timeout = max(30.0, 5 * baseline + 10)
            todo = mutants(module)
            if recheck:
                todo = [m for m in todo if m.key in equivalents]
                used.update(m.key for m in todo)
            queue = list(todo)
            results: dict[str, str] = {}
            busy: dict[int, Worker] = {}
            idle = list(workers)
            while queue or busy:
                while queue and idle:
                    mutant = queue.pop(0)
                    if mutant.key in equivalents and not recheck:
                        used.add(mutant.key)
                        results[mutant.id] = "equivalent"
                        continue
                    worker = idle.pop()
                    worker.start(mutant, tests)
                    busy[worker.pid] = worker
                if not busy:
                    continue  # the queue's last were listed equivalents
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid in busy:
                    worker = busy.pop(pid)
                    code = os.waitstatus_to_exitcode(status)
                    results[worker.mutant.id] = "survived" if code == 0 else "killed"
                    idle.append(worker)
                    continue
                for worker in list(busy.values()):
                    if time.monotonic() - worker.started > timeout:
                        worker.kill()
                        os.waitpid(worker.pid, 0)
                        del busy[worker.pid]
                        results[worker.mutant.id] = "timeout"
                        idle.append(worker)
                time.sleep(0.01)
            counts = {
                k: sum(1 for v in results.values() if v == k)
                for k in ("killed", "timeout", "survived", "equivalent")
            }
            if recheck:
                failed |= _report_recheck(module, todo, results, equivalents, out)
                continue
            totals[module] = (len(todo), counts)
            _report_module(module, todo, results, counts, baseline, out)
        elapsed = time.monotonic() - started
        if totals:
            _report_total(totals, elapsed, out)
        stale = [k for k in equivalents if k not in used]
        chosen_files = {MODULES[m][0] for m in chosen}
        stale = [k for k in stale if k.split(" :: ")[0] in chosen_files]
        if stale:
            print("\nEquivalents file entries that matched no mutant:", file=out)
            for key in stale:
                print(f"  {key}", file=out)
        if recheck and stale:
            failed = True
        return 2 if failed else 0
    finally:
        for worker in workers:
            worker.kill()
        shutil.rmtree(base, ignore_errors=True)


def check_issue(jobs: int, out) -> int:
    """Each of issue 14's mutants must be killed by its module's tests."""
    import hypothesis  # noqa: F401
    import twisted.scripts.trial  # noqa: F401

    sys.dont_write_bytecode = True
    base = Path(tempfile.mkdtemp(prefix="ipcd-mutate-"))
    worker = Worker(base, 0)
    alive = 0
    try:
        for point, module, old, new in ISSUE_MUTANTS:
            path, _, tests = MODULES[module]
            text = (ROOT / path).read_text()
            if text.count(old) != 1:
                print(f"point {point}: {path}: {old!r} not found once", file=out)
                alive += 1
                continue
            worker.start(None, tests, (path, text.replace(old, new)))
            killed = worker.finish(BASELINE_LIMIT) != 0  # a hang (None) too
            alive += not killed
            verdict = "killed" if killed else "SURVIVED"
            print(
                f"point {point}: {verdict}: {path}: {old.strip()!r} -> {new.strip()!r}",
                file=out,
                flush=True,
            )
        return 1 if alive else 0
    finally:
        worker.kill()
        shutil.rmtree(base, ignore_errors=True)


def _report_module(module, todo, results, counts, baseline, out) -> None:
    scored = len(todo) - counts["equivalent"]
    dead = counts["killed"] + counts["timeout"]
    score = 100.0 * dead / scored if scored else 100.0
    print(
        f"{MODULES[module][0]}: {len(todo)} mutants, {counts['equivalent']} "
        f"equivalent, {dead} killed ({counts['timeout']} by timeout), "
        f"{counts['survived']} survived: {score:.1f}% "
        f"(tests: {' '.join(MODULES[module][2])}, {baseline:.1f} s unmutated)",
        file=out,
        flush=True,
    )
    for mutant in todo:
        if results.get(mutant.id) == "survived":
            print(f"  SURVIVED {mutant.id} line {mutant.line}: {mutant.key}", file=out)


def _report_recheck(module, todo, results, equivalents, out) -> bool:
    """The listed equivalents of C{module} a test kills: whether any."""
    killed = [m for m in todo if results.get(m.id) != "survived"]
    print(
        f"{MODULES[module][0]}: {len(todo)} listed equivalents, "
        f"{len(todo) - len(killed)} still survive, {len(killed)} killed",
        file=out,
        flush=True,
    )
    for mutant in killed:
        print(
            f"  KILLED {mutant.id} ({results.get(mutant.id)}): {mutant.key}", file=out
        )
        print(f"    listed because: {equivalents[mutant.key]}", file=out)
    return bool(killed)


def _report_total(totals, elapsed, out) -> None:
    total = sum(t for t, _ in totals.values())
    eq = sum(c["equivalent"] for _, c in totals.values())
    dead = sum(c["killed"] + c["timeout"] for _, c in totals.values())
    survived = sum(c["survived"] for _, c in totals.values())
    score = 100.0 * dead / (total - eq) if total > eq else 100.0
    print(
        f"\n{'module':<32} {'mutants':>7} {'equiv':>5} {'killed':>6} "
        f"{'alive':>5} {'score':>6}",
        file=out,
    )
    for module, (count, c) in totals.items():
        killed = c["killed"] + c["timeout"]
        scored = count - c["equivalent"]
        print(
            f"{MODULES[module][0]:<32} {count:>7} {c['equivalent']:>5} "
            f"{killed:>6} {c['survived']:>5} "
            f"{100.0 * killed / scored if scored else 100.0:>5.1f}%",
            file=out,
        )
    print(
        f"\nTotal: {total} mutants, {eq} equivalent, {dead} killed, "
        f"{survived} survived: {score:.1f}% killed of {total - eq} "
        f"({elapsed / 60:.1f} min)",
        file=out,
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help=f"some of: {' '.join(MODULES)}")
    parser.add_argument("--jobs", "-j", type=int, default=2)
    parser.add_argument("--list", action="store_true", help="list the mutants")
    parser.add_argument("--show", metavar="MODULE:N", help="print one mutant")
    parser.add_argument(
        "--issue", action="store_true", help="check issue 14's mutants are killed"
    )
    parser.add_argument(
        "--equivalents",
        action="store_true",
        help="run only the listed equivalents: each must still survive",
    )
    parser.add_argument(
        "--record",
        action="store_true",
        help=f"update the modules' sections of {RESULTS.relative_to(ROOT)}",
    )
    args = parser.parse_args()
    if args.issue:
        return check_issue(args.jobs, sys.stdout)
    if args.show:
        module, _, number = args.show.partition(":")
        mutant = mutants(module)[int(number) - 1]
        print(f"{mutant.id} line {mutant.line}: {mutant.key}")
        import difflib

        path = MODULES[module][0]
        before = ast.unparse(ast.parse((ROOT / path).read_text())).splitlines()
        after = mutated_source(mutant).splitlines()
        sys.stdout.writelines(
            line + "\n"
            for line in difflib.unified_diff(before, after, lineterm="", n=2)
        )
        return 0
    chosen = args.modules or list(MODULES)
    unknown = [m for m in chosen if m not in MODULES]
    if unknown:
        parser.error(f"unknown module {unknown[0]!r} (known: {' '.join(MODULES)})")
    if args.list:
        for module in chosen:
            for mutant in mutants(module):
                print(f"{mutant.id} line {mutant.line}: {mutant.key}")
        return 0
    if args.equivalents:
        return run(chosen, args.jobs, sys.stdout, recheck=True)
    if not args.record:
        return run(chosen, args.jobs, sys.stdout)
    import io

    class Tee(io.StringIO):
        def write(self, text: str) -> int:
            sys.stdout.write(text)
            sys.stdout.flush()
            return super().write(text)

    out = Tee()
    status = run(chosen, args.jobs, out)
    record(out.getvalue())
    return status


_HEAD = re.compile(
    r"^(?P<file>\S+\.py): (?P<total>\d+) mutants, (?P<eq>\d+) equivalent, "
    r"(?P<dead>\d+) killed \((?P<timeout>\d+) by timeout\), "
    r"(?P<survived>\d+) survived"
)


def _sections(text: str) -> dict[str, list[str]]:
    """A results text's module sections: file -> lines (head, survivors)."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if _HEAD.match(line):
            current = sections.setdefault(_HEAD.match(line)["file"], [])
            current.clear()
            current.append(line)
        elif current is not None and line.startswith("  "):
            current.append(line)
        else:
            current = None
    return sections


def record(output: str) -> None:
    """Merge this run's module sections into the results file; total it."""
    old = _sections(RESULTS.read_text()) if RESULTS.exists() else {}
    old.update(_sections(output))
    order = [path for path, _, _ in MODULES.values()]
    lines = [
        "# benchmarks/mutate.py --record: the last run of each module, merged.",
        f"# Updated {time.strftime('%Y-%m-%d %H:%M')}; the score leaves out the",
        "# mutants benchmarks/mutation-equivalents.txt lists.",
        "",
    ]
    total = eq = dead = timeouts = survived = 0
    for path in sorted(old, key=lambda p: order.index(p) if p in order else 99):
        lines += old[path]
        head = _HEAD.match(old[path][0])
        total += int(head["total"])
        eq += int(head["eq"])
        dead += int(head["dead"])
        timeouts += int(head["timeout"])
        survived += int(head["survived"])
    scored = total - eq
    lines += [
        "",
        f"Total: {total} mutants, {eq} equivalent, {dead} killed ({timeouts} by "
        f"timeout), {survived} survived: {100.0 * dead / scored:.1f}% killed of "
        f"{scored}",
    ]
    RESULTS.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
