"""
Log observers.  Every ipcd decision is one structured twisted.logger event
(who, what, which rule, outcome as event fields).  L{json_observer} writes
each event as a JSON line a log shipper can read:

    twistd -n --logger ipcd.logs.json_observer ipcd
    ipcd --json-log

L{text_observer} (the C{ipcd} command's default) writes the very lines of
twistd's default text log, at a fraction of the cost per event: one event
per lookup is logged, so its formatting is on the hot path.

Text that a peer controls goes through L{printable} before it is logged (or
answered), so that it cannot write escape sequences to a terminal or forge
log lines.
"""

from __future__ import annotations

import json
import re
import sys
from string import Formatter
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
)


def printable(text: str) -> str:
    """
    C{text} with control and other non-printing characters escaped
    (C{\\x1b}, C{\\u202e}), fit for one line of a log.
    """
    if text.isprintable():
        return text  # the usual case, at C speed
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def _escape(c: str) -> str:
    code = ord(c)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def json_observer(out: IO[str] | None = None) -> ILogObserver:
    """
    One JSON object per line on stdout: C{time}, C{level}, C{namespace},
    C{text} (the line the text log shows), C{traceback} for a failure, and
    the event's own fields (ipcd's C{service}, C{who}, C{rule}, ...), as
    plain JSON values; none of Twisted's internals (the logger, the format).
    """
    return FileLogObserver(out if out is not None else sys.stdout, _json_line)


def _json_line(event: dict[str, Any]) -> str | None:
    if _chatter(event):
        return None
    record: dict[str, Any] = {
        "time": event.get("log_time"),
        "level": getattr(event.get("log_level"), "name", None),
        "namespace": event.get("log_namespace"),
        "text": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    for key, value in event.items():
        if not key.startswith("log_") and key not in _LEGACY_KEYS:
            record[key] = value
    return json.dumps(record, default=str) + "\n"


# What twisted.python.log adds to an event besides the text.
_LEGACY_KEYS = frozenset({"message", "isError", "system", "format", "time"})

# Twisted's own lines for every listener that starts or stops and every
# factory that starts or stops: ipcd says once where each daemon listens.
_CHATTER = re.compile(
    r".* starting on \S+|\((?:UNIX |TCP |UDP )?Port \S+ Closed\)"
    r"|(?:Starting|Stopping) factory .*|Starting protocol .*|Stopping protocol .*"
)


def _chatter(event: dict[str, Any]) -> bool:
    """Whether C{event} is one of Twisted's lines in L{_CHATTER}."""
    return event.get("log_format") == "{log_text}" and bool(
        _CHATTER.fullmatch(event.get("log_text", ""))
    )


def text_observer(out: IO[str] | None = None) -> ILogObserver:
    """
    twistd's text log (C{textFileLogObserver}: C{TIME [SYSTEM] TEXT}) on
    stdout, with the same text for every event, formatted faster.
    """
    return FileLogObserver(
        out if out is not None else sys.stdout, ClassicTextFormatter()
    )


class ClassicTextFormatter:
    """
    L{formatEventAsClassicLogText} with the RFC 3339 time, faster where it
    can be: the time text is kept per second, and a format whose fields are
    all plain names (C{"{who} sent {size:d} bytes"}) is filled in by
    C{str.format_map}, which gives the same text as Twisted's formatter for
    such formats.  Anything else (tracebacks, flattened events, C{{f()}}
    fields, a missing field) goes Twisted's way.
    """

    def __init__(self) -> None:
        self._second: int | None = None
        self._time_text = ""
        self._plain: dict[str, bool] = {}

    def __call__(self, event: dict[str, Any]) -> str | None:
        fmt = event.get("log_format")
        if fmt == "{log_text}" and _chatter(event):
            return None
        if (
            type(fmt) is not str
            or "log_failure" in event
            or "log_flattened" in event
            or not self._is_plain(fmt)
        ):
            return self._twisted(event)
        try:
            text = fmt.format_map(event)
        except Exception:
            return self._twisted(event)
        if not text:
            return None
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#" + (
                "-" if level is None else level.name
            )
        else:
            try:
                system = str(system)
            except Exception:
                return self._twisted(event)
        line = f"{self._time(event.get('log_time'))} [{system}] {text}"
        return line.replace("\n", "\n\t") + "\n"

    def _twisted(self, event: dict[str, Any]) -> str | None:
        return formatEventAsClassicLogText(
            event, formatTime=lambda when: formatTime(when, timeFormatRFC3339)
        )

    def _time(self, when: float | None) -> str:
        if when is None:
            return "-"
        # The format shows whole seconds: one strftime per second.
        second = int(when // 1)
        if second != self._second:
            self._time_text = formatTime(second, timeFormatRFC3339)
            self._second = second
        return self._time_text

    def _is_plain(self, fmt: str) -> bool:
        plain = self._plain.get(fmt)
        if plain is None:
            plain = _plain_fields(fmt)
            if len(self._plain) < _MAX_FORMATS:
                self._plain[fmt] = plain
        return plain


# Formats are usually constants: a few dozen.  A program that logs ever new
# ones is served without the cache past this many.
_MAX_FORMATS = 1024


def _plain_fields(fmt: str) -> bool:
    """Whether every field of C{fmt} is a plain name, without nested fields."""
    try:
        for _text, name, spec, _conversion in Formatter().parse(fmt):
            if name is None:
                continue
            if not name.isidentifier() or (spec and "{" in spec):
                return False
    except ValueError:
        return False
    return True
