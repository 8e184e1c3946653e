"""
The C{ipcd} command's text log: the very lines of twistd's default one.
"""

from __future__ import annotations

import io
from typing import Any

from twisted.logger import (
    LogLevel,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
)
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from ipcd.logs import ClassicTextFormatter, text_observer

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
