"""
The C{ipcd} command's text log: the very lines of twistd's default one.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    eventAsJSON,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
)
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from ipcd import decisionlog, logs
from ipcd.decisionlog import (
    _DECIDED,
    _DECIDED_VERDICT,
    _FAILED_VERDICT,
    DecisionLog,
    Request,
)
from ipcd.identity import Peer, local_peer
from ipcd.logs import ClassicTextFormatter, EventTemplate, json_observer, text_observer
from ipcd.test.support import (
    TIMEOUT,
    accepts,
    lookup,
    python_env,
    read_text,
    recv_upto,
    short_rundir,
    spawn,
    tcp_listeners,
)

WHEN = 1_764_000_000.25


def twisted_line(event: dict[str, Any]) -> str | None:
    return formatEventAsClassicLogText(
        event, formatTime=lambda when: formatTime(when, timeFormatRFC3339)
    )


def events() -> list[dict[str, Any]]:
    base = {
        "log_time": WHEN,
        "log_namespace": "ipcd.broker.Broker",
        "log_level": LogLevel.info,
    }
    failure = Failure(ZeroDivisionError("division by zero"))
    return [
        {
            **base,
            "log_format": "{direction} {service!r} for {who} -> {target}: {outcome}",
            "direction": "local",
            "service": "po\nng",
            "who": "pid 1 uid 0",
            "target": None,
            "outcome": "ok",
        },
        {**base, "log_format": "{timeout:g} s", "timeout": 1.5},
        {**base, "log_format": "{missing}"},
        {**base, "log_format": "{call()}", "call": lambda: "called"},
        {**base, "log_format": "{0} {}"},
        {**base, "log_format": "{a.real}", "a": 3},
        {**base, "log_format": "{x:{w}}", "x": 1, "w": 5},
        {**base, "log_format": "unbalanced {"},
        {**base, "log_format": ""},
        {**base, "log_format": "no time", "log_time": None},
        {"log_format": "no level or namespace", "log_time": WHEN},
        {**base, "log_format": "with a system", "log_system": "tcp,1,x"},
        {**base, "log_format": "oops {x}", "x": 1, "log_failure": failure},
        {**base, "log_format": b"bytes {x}", "x": 1},
        {**base},
    ]


class ClassicTextFormatterTests(SynchronousTestCase):
    def test_sameLinesAsTwisted(self) -> None:
        formatter = ClassicTextFormatter()
        for event in events():
            self.assertEqual(formatter(event), twisted_line(event), event)

    def test_timeOfEachSecond(self) -> None:
        """The time text kept for a second is not shown for the next."""
        formatter = ClassicTextFormatter()
        for when in (WHEN, WHEN + 0.5, WHEN + 0.75, WHEN + 1, WHEN - 7200):
            event = {"log_format": "x", "log_time": when}
            self.assertEqual(formatter(event), twisted_line(event))

    def test_observerWrites(self) -> None:
        out = io.StringIO()
        observer = text_observer(out)
        event = events()[0]
        observer(event)
        self.assertEqual(out.getvalue(), twisted_line(event))


# The decision line of each lookup, as a running ipcd writes it.

_CHILD_LOOKUP = """
import os, socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
s.sendall(struct.pack("!I", 5) + b"pong;")
while s.recv(4096):
    pass
print(os.getpid())
"""


class DecisionLineTests(SynchronousTestCase):
    """
    The real C{ipcd} command's decision lines, text and C{--json-log}, for
    allowed, denied and failed lookups: pinned to what Twisted's own
    formatting gives for these fields (the text of twistd's log; the JSON of
    C{jsonFileLogObserver}), so that a faster way to write them changes no
    byte a log reader sees but the time.
    """

    def start(self, *options: str) -> tuple[subprocess.Popen[bytes], str, str]:
        """
        Run ipcd with C{options} (and a rule denying C{secret} to local
        clients), until RUNDIR/ipc and pongd accept: the process, RUNDIR and
        its log.
        """
        rundir = short_rundir(self, "ipcd-log-")
        work = short_rundir(self, "ipcd-logw-")
        log = os.path.join(work, "ipcd.log")
        args = ["-m", "ipcd.scripts.ipcd", "--rundir", rundir, "--no-ws"]
        process = spawn(
            self, [*args, "--deny", "local secret *", *options], log, python_env(), work
        )
        self.wait(lambda: accepts(os.path.join(rundir, "ipc")), "ipcd's socket", log)
        self.wait(lambda: accepts(os.path.join(rundir, "pong")), "pongd", log)
        return process, rundir, log

    def decided(
        self, process: subprocess.Popen[bytes], log: str, count: int, who: str
    ) -> list[str]:
        """
        The C{count} decision lines of the log (text: those for C{who};
        JSON: those with a C{who}), once written; then ipcd is stopped.
        """

        def decided() -> list[str]:
            lines = read_text(log).splitlines()
            return [line for line in lines if f"for {who}" in line or '"who"' in line]

        lines = self.wait(lambda: len(decided()) >= count and decided(), "lines", log)
        process.terminate()
        process.wait(TIMEOUT)
        self.assertEqual(len(lines), count, read_text(log))
        return lines

    def lookups(self, *options: str) -> tuple[list[str], str, dict[str, Any]]:
        """
        Run ipcd with C{options}; make the lookups of L{expected}; the log's
        decision lines, RUNDIR and the pids and labels of the clients.
        """
        process, rundir, log = self.start("--no-tcp", *options)
        ipc = os.path.join(rundir, "ipc")
        for payload in PAYLOADS:
            lookup(rundir, payload).close_fds()
        child = subprocess.run(
            [sys.executable, "-c", _CHILD_LOOKUP, ipc],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=True,
        )
        a, b = socket.socketpair()
        with a, b:
            labels = sorted(local_peer(a).labels)
        # Text: "... for pid N ..."; JSON: {"direction": ..., "who": "pid N ...
        lines = self.decided(process, log, len(PAYLOADS) + 1, "pid ")
        clients = {"me": os.getpid(), "child": int(child.stdout), "labels": labels}
        return lines, rundir, clients

    def inbound(self, *options: str) -> tuple[list[str], list[dict[str, Any]]]:
        """
        Run ipcd with tcpd on loopback (C{in} rules 2 and 3: C{pong} and
        C{no*}) and C{options}; ask tcpd for each of L{INBOUND} as a remote peer:
        the log's decision lines and the events they are to be.
        """
        rules = ["--allow", "in pong", "--allow", "in no*"]
        listen = ["--tcp", "tcp:0:interface=127.0.0.1"]
        process, rundir, log = self.start(*listen, *rules, *options)
        [(host, port)] = self.wait(lambda: tcp_listeners(process.pid), "tcpd", log)
        ports = []
        for name, answer in INBOUND:
            with socket.create_connection((host, port), TIMEOUT) as sock:
                ports.append(sock.getsockname()[1])
                sock.sendall(name)
                # ok, then pongd's relay (closed here); or ne, then EOF.
                reply = recv_upto(sock, 2 if answer == b"ok" else 4096)
                self.assertEqual(reply[:2], answer, reply)
        lines = self.decided(process, log, len(INBOUND), f"{host}:")
        return lines, inbound_events(rundir, ports)

    def wait(self, ready: Any, what: str, log: str) -> Any:
        deadline = time.monotonic() + 3 * TIMEOUT
        while time.monotonic() < deadline:
            value = ready()
            if value:
                return value
            time.sleep(0.02)
        self.fail(f"no {what} within {3 * TIMEOUT:g} s:\n{read_text(log)}")

    def test_text(self) -> None:
        lines, rundir, clients = self.lookups()
        shown = [line.split(" ", 1)[1] for line in lines]
        expected = [
            formatEvent(event)
            for event in expected_events(rundir, clients["me"], clients["child"])
        ]
        self.assertEqual(
            shown, [f"[ipcd.broker.Broker#info] {text}" for text in expected]
        )
        # The fields as Twisted formats them, and as a reader sees them:
        self.assertEqual(
            expected[0],
            f"local 'pong' for pid {clients['me']} uid {os.getuid()} -> "
            f"unix://{rundir}/pong: ok (allowed by default; the client may "
            "connect itself)",
        )
        self.assertEqual(
            expected[1],
            f"local 'secret' for pid {clients['me']} uid {os.getuid()}: "
            "local connection to 'secret' denied by rule 1 (deny local secret *)",
        )
        for line in lines:
            self.assertRegex(line, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[")

    def test_json(self) -> None:
        lines, rundir, clients = self.lookups("--json-log")
        events = expected_events(rundir, clients["me"], clients["child"])
        self.assertEqual(len(lines), len(events))
        for line, event in zip(lines, events, strict=True):
            written = json.loads(line)
            # A lookup refused before policy has no labels in its event.
            if event["verdict"] != "not policed":
                event["labels"] = clients["labels"]
            want = json.loads(json_shape(event))
            self.assertIsInstance(written.pop("time"), float)
            del want["time"]
            self.assertEqual(written, want)
            # In the same order, too.
            self.assertEqual(list(written), list(want))

    def test_inboundText(self) -> None:
        """
        Remote peers' requests (allowed, the same again, denied, failed, a
        bad name): the same text as Twisted's, the same for a request asked
        again as for the first.
        """
        lines, events = self.inbound()
        shown = [line.split(" ", 1)[1] for line in lines]
        expected = [formatEvent(event) for event in events]
        self.assertEqual(
            shown, [f"[ipcd.broker.Broker#info] {text}" for text in expected]
        )
        who, target = events[0]["who"], events[0]["target"]
        self.assertEqual(
            expected[0],
            f"in 'pong' for {who} -> {target}: ok "
            "(allowed by rule 2 (allow in pong *); rule 2 names 'pong')",
        )

    def test_inboundJSON(self) -> None:
        """The same requests' --json-log lines, field by field, in order."""
        lines, events = self.inbound("--json-log")
        for line, event in zip(lines, events, strict=True):
            written = json.loads(line)
            want = json.loads(json_shape(event))
            self.assertIsInstance(written.pop("time"), float)
            del want["time"]
            self.assertEqual(written, want)
            self.assertEqual(list(written), list(want))


def json_shape(event: dict[str, Any]) -> str:
    """
    The line --json-log promises for C{event} (docs/configuration.rst): time,
    level, namespace, the text line's text, then the event's own fields.
    """
    record = {
        "time": event["log_time"],
        "level": event["log_level"].name,
        "namespace": event["log_namespace"],
        "text": formatEvent(event),
    }
    record.update((k, v) for k, v in event.items() if not k.startswith("log_"))
    return json.dumps(record)


# Lookups of the decision line tests: allowed, denied, failed (no socket, a
# bad lookup, one with a control character); then "pong" from a child.
PAYLOADS = [b"pong;", b"secret;", b"nothere;", b"x;x bad://", b"po\x1bng;"]


def expected_events(rundir: str, me: int, child: int) -> list[dict[str, Any]]:
    """The decision events of L{PAYLOADS}, with the fields written out."""
    uid = os.getuid()
    logger = object()  # written as {"unpersistable": true}, as a Logger is
    short = "{direction} {service!r} for {who} -> {target}: {outcome}"
    refused = "{direction} {service!r} for {who}: {outcome}"
    default = "allowed by default"
    rows = [
        (me, "pong", "pong", default + "; the client may connect itself", "ok"),
        (
            me,
            "secret",
            None,
            "denied by rule 1 (deny local secret *)",
            "local connection to 'secret' denied by rule 1 (deny local secret *)",
        ),
        (
            me,
            "nothere",
            "nothere",
            default,
            f"no route to service 'nothere': {rundir}/nothere does not exist",
        ),
        (
            me,
            "x;x bad://",
            None,
            "not policed",
            "bad lookup: invalid host in URI 'bad://': expected HOST:PORT",
        ),
        (
            me,
            "po\\x1bng;",
            None,
            "not policed",
            "bad lookup: requested service: invalid service name 'po\\x1bng': "
            "only letters, digits, '.', '_' and '-' are allowed",
        ),
        (child, "pong", "pong", default + "; the client may connect itself", "ok"),
    ]
    events = []
    for pid, service, target, verdict, outcome in rows:
        denied = verdict.startswith("denied")
        events.append(
            {
                "direction": "local",
                "service": service,
                "who": f"pid {pid} uid {uid}",
                "labels": [],
                "target": None if target is None else f"unix://{rundir}/{target}",
                "verdict": verdict,
                "access": (
                    "the client may connect itself" if outcome == "ok" else None
                ),
                "rule": "deny local secret *" if denied else None,
                "allowed": None if verdict == "not policed" else not denied,
                "outcome": outcome,
                "log_logger": logger,
                "log_level": LogLevel.info,
                "log_namespace": "ipcd.broker.Broker",
                "log_source": logger,
                "log_format": (
                    (refused if denied else refused + " ({verdict})")
                    if target is None
                    else short
                    + (" ({verdict})" if outcome == "ok" else " ({verdict} here)")
                ),
                "log_time": WHEN,
            }
        )
    return events


# Remote peers' requests of the inbound decision line tests, through tcpd,
# and the answers' first bytes: allowed by a rule naming it, the same again
# (from another port), denied by default, allowed by a glob but not for
# others, not a name.
INBOUND = [
    (b"pong", b"ok"),
    (b"pong", b"ok"),
    (b"secret", b"ne"),
    (b"nothere", b"ne"),
    (b"po\x1bng", b"ne"),
]


def inbound_events(rundir: str, ports: list[int]) -> list[dict[str, Any]]:
    """The decision events of L{INBOUND}, from C{ports}, written out."""
    logger = object()
    decided = "{direction} {service!r} for {who} -> {target}: {outcome}"
    refused = "{direction} {service!r} for {who}: {outcome}"
    pong = "allowed by rule 2 (allow in pong *)"
    glob = "allowed by rule 3 (allow in no* *)"
    # (RUNDIR is 0700: a glob lets peers reach only what others may.)
    missing = (
        f"service 'nothere': permission denied: others may not connect to "
        f"{rundir}/nothere"
    )
    bad = (
        "invalid service name 'po\\x1bng': only letters, digits, '.', '_' "
        "and '-' are allowed"
    )
    # service, target, verdict, access, rule, outcome, format
    named = "rule 2 names 'pong'"
    ok = (f"{pong}; {named}", named, "allow in pong *", "ok", " ({verdict})")
    rows = [
        ("pong", "pong", *ok),
        ("pong", "pong", *ok),
        (
            "secret",
            None,
            "denied by default",
            None,
            None,
            "in connection to 'secret' denied by default",
            "",
        ),
        (
            "nothere",
            "nothere",
            glob,
            None,
            "allow in no* *",
            missing,
            " ({verdict} here)",
        ),
        ("po\\x1bng", None, "not policed", None, None, bad, " ({verdict})"),
    ]
    events = []
    for port, (service, target, verdict, access, rule, outcome, more) in zip(
        ports, rows, strict=True
    ):
        policed = verdict != "not policed"
        events.append(
            {
                "direction": "in",
                "service": service,
                "who": f"127.0.0.1:{port}",
                "labels": ["ip:127.0.0.1"] if policed else [],
                "target": None if target is None else f"unix://{rundir}/{target}",
                "verdict": verdict,
                "access": access,
                "rule": rule,
                "allowed": verdict.startswith("allowed") if policed else None,
                "outcome": outcome,
                "log_logger": logger,
                "log_level": LogLevel.info,
                "log_namespace": "ipcd.broker.Broker",
                "log_source": logger,
                "log_format": (refused if target is None else decided) + more,
                "log_time": WHEN,
            }
        )
    return events


# Events made from a template: the same lines, formatted once per template.

DECIDED = "{direction} {service!r} for {who} -> {target}: {outcome}"


def template(fmt: str = DECIDED, **extra: Any) -> EventTemplate:
    fields = {
        "direction": "local",
        "service": "po\nng",
        "who": "",
        "labels": [],
        "target": None,
        "outcome": "ok",
        **extra,
        "log_level": LogLevel.info,
        "log_namespace": "ipcd.broker.Broker",
        "log_logger": object(),
        "log_format": fmt,
        "log_time": None,
    }
    return EventTemplate(fields, ("who", "labels"))


class Counted:
    """Twisted's two formatting functions in ipcd.logs, counted."""

    def __init__(self, case: SynchronousTestCase) -> None:
        self.calls = 0
        for name, real in (
            ("formatEventAsClassicLogText", formatEventAsClassicLogText),
            ("formatEvent", formatEvent),
        ):
            case.patch(logs, name, self.counting(real))

    def counting(self, real: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return real(*args, **kwargs)

        return call


def written(event: dict[str, Any]) -> tuple[str, str]:
    """The text and JSON lines of C{event}, by ipcd's observers."""
    text, json_out = io.StringIO(), io.StringIO()
    text_observer(text)(event)
    json_observer(json_out)(event)
    return text.getvalue(), json_out.getvalue()


def twistds(event: dict[str, Any]) -> tuple[str, str]:
    """
    The same, by Twisted's own formatting of the event as it is made, and
    the JSON line's promised shape.
    """
    return twisted_line(dict(event)) or "", json_shape(dict(event)) + "\n"


FORMATS = [DECIDED, DECIDED + " ({outcome})", "{who}{who}", "{who!s} as {labels!r}"]
FORMATS_NOT_FILLED = [
    "{who!r}",
    "{who:>20}",
    "{who.upper}",
    "{who[0]}",
    "{labels}",
    "at {log_time}",
]


class EventTemplateTests(SynchronousTestCase):
    @settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(who=st.text(), labels=st.lists(st.text()), fmt=st.sampled_from(FORMATS))
    def test_sameLinesAsTwisted(self, who: str, labels: list[str], fmt: str) -> None:
        """Whatever the varying fields hold, the lines are Twisted's."""
        made = template(fmt)
        # The first event makes the template's lines; the second is filled in.
        for value in ("pid 1 uid 0", who):
            event = made.event(value, labels)
            expected = twistds(event)
            self.assertEqual(written(event), expected)

    def test_formattedOncePerTemplate(self) -> None:
        """
        A template's first event is written Twisted's way, as any event;
        at the second its lines are worked out once by Twisted (its
        stand-ins, then the check against that event), then filled in.
        """
        counted = Counted(self)
        made = template()
        calls = []
        for i in range(50):
            event = made.event(f"pid {i} uid 0\x1b", [f"uid:{i}", "user:\u00e9"])
            expected = twistds(event)
            before = counted.calls
            self.assertEqual(written(event), expected)
            calls.append(counted.calls - before)
        before = counted.calls
        written(dict(event))  # not a template's: Twisted's way
        twisted_way = counted.calls - before
        # Twisted's way; then formatEventAsClassicLogText twice, formatEvent
        # (the JSON text) twice; then none.
        self.assertEqual(calls, [twisted_way, 4] + [0] * 48)

    def test_seenOnceNotWorkedOut(self) -> None:
        """
        Requests each seen once (a remote peer's made-up names) cost their
        lines Twisted's way only: working a template out costs more (two
        lines formatted, a pattern compiled), and would never pay.
        """
        worked_out: list[Any] = []
        real = EventTemplate._made

        def counting(template: EventTemplate, *args: Any) -> Any:
            worked_out.append(template)
            return real(template, *args)

        self.patch(EventTemplate, "_made", counting)
        for n in range(20):
            event = template(service=f"ghost{n}").event("1.2.3.4:5", ["ip:1.2.3.4"])
            self.assertEqual(written(event), twistds(event))
        self.assertEqual(worked_out, [])

    def test_nothingFormattedWhenDropped(self) -> None:
        """An observer that drops the event costs it no formatting."""
        counted = Counted(self)
        out = io.StringIO()
        predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
        for observer in (text_observer(out), json_observer(out)):
            dropping = FilteringLogObserver(observer, [predicate])
            for i in range(10):
                dropping(template().event(f"pid {i}", []))
        self.assertEqual((out.getvalue(), counted.calls), ("", 0))

    def test_otherwiseTwistedsWay(self) -> None:
        """
        Formats that show a varying field otherwise than as its text, the
        time in the text, and an event an observer added a field to: each
        event is formatted as any other event, with Twisted's lines.
        """
        events = [
            template(fmt).event(who, ["a'b"])
            for fmt in FORMATS_NOT_FILLED
            for who in ("pid 1 uid 0", "o'\"x\n")
        ]
        flattened = template().event("pid 2", [])
        eventAsJSON(flattened)  # as Twisted's JSON observer before this one
        events.append(flattened)
        for event in events:
            expected = twistds(event)
            self.assertEqual(written(event), expected)


class DecisionLogTests(SynchronousTestCase):
    """L{DecisionLog}'s bounded memory and the formats of its lines."""

    def test_fieldsKeptForAtMost256Requests(self) -> None:
        """
        The fields of up to 256 distinct requests are kept for reuse; the
        257th forgets them all (what a peer's stream of new names can make
        ipcd keep is bounded).
        """
        events: list[dict[str, Any]] = []
        log = DecisionLog(Logger(observer=events.append))
        peer = Peer("pid 1 uid 0")
        for n in range(256):
            log.record(Request("local", peer, f"s{n}"), None, "no route")
        self.assertEqual(len(log._said), 256)
        log.record(Request("local", peer, "s256"), None, "no route")
        self.assertEqual(len(log._said), 1)
        self.assertEqual(len(events), 257)
        self.assertIn("s256", formatEvent(events[-1]))

    def test_longNamesCut(self) -> None:
        """
        A refused name as long as a peer sent it is shown (and kept among
        the fields reused) as its first 255 characters and C{...}.
        """
        events: list[dict[str, Any]] = []
        log = DecisionLog(Logger(observer=events.append))
        peer = Peer("10.0.0.1:1")
        log.record(Request("in", peer, "x" * 65536), None, "too long")
        (event,) = events
        self.assertEqual(event["service"], "x" * 255 + "...")
        ((_, service, *_),) = log._said
        self.assertEqual(service, "x" * 255 + "...")
        # A name of the longest valid length is shown whole.
        log.record(Request("in", peer, "y" * 255), None, "no route")
        self.assertEqual(events[-1]["service"], "y" * 255)

    def test_requestHasNoDict(self) -> None:
        """A request per lookup: slots, no per-instance dict."""
        self.assertFalse(hasattr(Request("local", Peer("x"), "s"), "__dict__"))

    def test_formats(self) -> None:
        """With a target: the verdict said once (in the outcome, or added)."""
        self.assertEqual(decisionlog._decided_format(True, True, True), _DECIDED)
        self.assertEqual(decisionlog._decided_format(True, True, False), _DECIDED)
        self.assertEqual(
            decisionlog._decided_format(True, False, True), _DECIDED_VERDICT
        )
        self.assertEqual(
            decisionlog._decided_format(True, False, False), _FAILED_VERDICT
        )
