"""
Log observers.  Every ipcd decision is one structured twisted.logger event
(who, what, which rule, outcome as event fields).  L{json_observer} writes
each event as a JSON line a log shipper can read:

    twistd -n --logger ipcd.logs.json_observer ipcd
    ipcd --json-log

L{text_observer} (the C{ipcd} command's default) writes the very lines of
twistd's default text log, at a fraction of the cost per event: one event
per lookup is logged, so its formatting is on the hot path.  That event is
made from an L{EventTemplate}: both observers write it from the template's
texts, worked out once by Twisted's own formatting, with the few fields that
differ per event filled in.

Text that a peer controls goes through L{printable} before it is logged (or
answered), so that it cannot write escape sequences to a terminal or forge
log lines.
"""

from __future__ import annotations

import json
import re
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from json.encoder import encode_basestring_ascii
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

from ipcd.logbatch import BatchedFile


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
    L{TemplateEvent}s are written from their template.  On stdout (no
    C{out}) lines are written a few at a time, each within 10 ms
    (L{ipcd.logbatch}).
    """
    return FileLogObserver(_file(out), json_line)


def _file(out: IO[str] | None) -> IO[str]:
    """C{out}, or stdout with its lines written a few at a time."""
    if out is not None:
        return out
    return BatchedFile(sys.stdout)  # type: ignore[return-value]


def json_line(event: dict[str, Any]) -> str | None:
    """The JSON line of C{event} (see L{json_observer}) and a newline."""
    if type(event) is TemplateEvent:
        line = event.template.json(event)
        if line is not None:
            return line + "\n"
    if _chatter(event):
        return None
    return _json_record(event) + "\n"


def _json_record(event: dict[str, Any]) -> str:
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
    return json.dumps(record, default=str)


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
    stdout, with the same text for every event, formatted faster, and
    written a few at a time, each within 10 ms (L{ipcd.logbatch}).
    """
    return FileLogObserver(_file(out), ClassicTextFormatter())


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
        if type(event) is TemplateEvent:
            line = event.template.classic_line(event, self._time)
            if line is not None:
                return line
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
        system = _system(event)
        if system is None:
            return self._twisted(event)
        line = f"{self._time(event.get('log_time'))} [{system}] {text}"
        return line.replace("\n", "\n\t") + "\n"

    def _twisted(self, event: dict[str, Any]) -> str | None:
        return classic_text(event)

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


def classic_text(event: dict[str, Any]) -> str | None:
    """Twisted's own classic line of C{event}, with the RFC 3339 time."""
    return formatEventAsClassicLogText(
        event, formatTime=lambda when: formatTime(when, timeFormatRFC3339)
    )


def _system(event: dict[str, Any]) -> str | None:
    """The C{[SYSTEM]} of a classic line; C{None} where Twisted's way must say."""
    system = event.get("log_system")
    if system is None:
        level = event.get("log_level")
        return f"{event.get('log_namespace', '-')}#" + (
            "-" if level is None else level.name
        )
    try:
        return str(system)
    except Exception:
        return None


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


# A template's lines are worked out at its second event: the first is
# written Twisted's way, which costs less than working them out (two lines
# formatted and a pattern compiled), for a request seen once (a remote
# peer's made-up name, each its own template).
_ONCE = object()


class TemplateEvent(dict):  # type: ignore[type-arg]
    """A log event made by an L{EventTemplate}, which knows how to write it."""

    __slots__ = ("template",)
    template: EventTemplate


class EventTemplate:
    """
    Log events that differ only in their time and a few C{varying} fields
    (strings, or lists of strings), such as ipcd's decision event for one
    distinct request: their text and JSON lines are worked out once, at the
    second event (the first is written Twisted's way: a request seen once
    costs no more), by Twisted's own formatting of that event with
    stand-ins for the varying fields, checked against Twisted's lines for
    it, and then filled in per event.  Nothing is formatted for an event no
    observer of this module writes.

    An event that does not fit (a varying field of another type, a field
    added since it was made, a format that converts a varying field) is
    written Twisted's way.
    """

    def __init__(self, fields: dict[str, Any], varying: Sequence[str]) -> None:
        """
        C{fields}: the event's fields, C{log_time} and the C{varying} ones
        among them (with any value) where they go in its order.
        """
        self._fields = fields
        self._varying = tuple(varying)
        self._size = len(fields)
        # Each line's (pieces, slots) once worked out; False where it cannot
        # be; _ONCE after its first event, which is written Twisted's way.
        self._classic: Any = None
        self._json: Any = None
        self._bare = ""  # a classic line's body when its text is empty

    def event(self, *values: Any) -> TemplateEvent:
        """An event of this template: the varying fields' C{values}, now."""
        event = TemplateEvent(self._fields)
        event.template = self
        event.update(zip(self._varying, values, strict=True))
        event["log_time"] = time.time()
        return event

    def classic_line(
        self, event: TemplateEvent, time_text: Callable[[float | None], str]
    ) -> str | None:
        """
        C{formatEventAsClassicLogText(event)} (with the RFC 3339 time given
        by C{time_text}); C{None} where it must be formatted Twisted's way.
        """
        if len(event) != self._size:
            return None  # a field added by an observer before
        made = self._classic
        if made is None:
            self._classic = _ONCE
            return None
        if made is _ONCE:
            self._bare = f" [{_system(event)}] \n"
            made = self._classic = self._made(
                event, _classic_body, (_text_value,), self._varying
            )
        if made is False:
            return None
        pieces, slots = made
        pieces = pieces.copy()
        for index, key, _show in slots:
            value = event[key]
            if type(value) is not str:
                return None
            pieces[index] = (
                value if value.isprintable() else value.replace("\n", "\n\t")
            )
        body = "".join(pieces)
        if body == self._bare:
            return None  # no text: Twisted writes no line
        return time_text(event["log_time"]) + body

    def json(self, event: TemplateEvent) -> str | None:
        """
        C{event}'s line of L{json_observer} (without the newline); C{None}
        where it must be written the slow way.
        """
        if len(event) != self._size:
            return None
        made = self._json
        if made is None:
            self._json = _ONCE
            return None
        if made is _ONCE:
            made = self._json = self._made(
                event,
                _json_record,
                (_json_value, _json_in_text),
                (*self._varying, "log_time"),
            )
        if made is False:
            return None
        pieces, slots = made
        pieces = pieces.copy()
        try:
            for index, key, show in slots:
                pieces[index] = show(event[key])
        except TypeError:
            return None
        return "".join(pieces)

    def _made(
        self,
        event: TemplateEvent,
        write: Callable[[dict[str, Any]], str | None],
        shows: Sequence[Callable[[Any], str]],
        keys: Sequence[str],
    ) -> Any:
        """
        What C{write} (one of the line formats) gives for this template, cut
        at the fields C{keys}: (pieces, [(index, key, show)]) to be filled in
        with C{show(value)}, C{show} being the one of C{shows} (the ways a
        value may appear in the line) that matched; C{False} when the cut
        pieces, filled in with C{event}'s fields, do not give what C{write}
        gives for C{event}.
        """
        if not _shown_plainly(event.get("log_format"), (*self._varying, "log_time")):
            return False
        token = uuid.uuid4().hex
        stand_ins: dict[str, Any] = {}
        sample = dict(event)
        for key in keys:
            value = event[key]
            if key == "log_time":
                stand_in: Any = _TIME_STAND_IN
            elif type(value) is str:
                stand_in = f"{token}-{key}"
            elif type(value) is list:
                stand_in = [f"{token}-{key}"]
            else:
                return False
            sample[key] = stand_in
            for show in shows:
                try:
                    stand_ins[show(stand_in)] = (key, show)
                except TypeError:
                    pass  # cannot be shown so: it must not be (checked below)
        text = write(sample)
        if text is None or not stand_ins:
            return False
        # The longest first: a quoted value before the same value unquoted.
        alternatives = sorted(stand_ins, key=len, reverse=True)
        cut = re.split("(" + "|".join(map(re.escape, alternatives)) + ")", text)
        pieces, slots = [], []
        for index, piece in enumerate(cut):
            if index % 2:
                slots.append((index, *stand_ins[piece]))
            elif token in piece or repr(_TIME_STAND_IN) in piece:
                return False  # a varying field shown some other way
            pieces.append(piece)
        made = (pieces, slots)
        filled = pieces.copy()
        for index, key, show in slots:
            filled[index] = show(event[key])
        if "".join(filled) != write(dict(event)):
            return False
        return made


def _shown_plainly(fmt: Any, keys: Sequence[str]) -> bool:
    """
    Whether C{fmt} shows each of C{keys} it names as C{{key}} (or
    C{{key!s}}): as the text of its value, which can then be filled in.
    """
    if type(fmt) is not str:
        return False
    try:
        for _text, name, spec, conversion in Formatter().parse(fmt):
            if name is None:
                continue
            base = re.split(r"[.\[(]", name, maxsplit=1)[0]
            if base == "log_time":
                return False  # the time is filled in where the line has it
            if base in keys and (name != base or spec or conversion not in (None, "s")):
                return False
    except ValueError:
        return False
    return True


# A log_time no event has: where it shows, the time goes.
_TIME_STAND_IN = 1.0000000000000002e-300


def _classic_body(event: dict[str, Any]) -> str | None:
    """A classic line but its time: the time is per second, not per template."""
    line = classic_text(event)
    if line is None or event.get("log_time") is None:
        return None
    stamp = formatTime(event["log_time"], timeFormatRFC3339)
    return line[len(stamp) :] if line.startswith(stamp) else None


def _text_value(value: Any) -> str:
    if type(value) is not str:
        raise TypeError("only strings are filled into a line")
    return value.replace("\n", "\n\t")


def _json_value(value: Any) -> str:
    if type(value) is str:
        return encode_basestring_ascii(value)
    if type(value) is float:
        return float.__repr__(value)
    if type(value) is list:
        return "[" + ", ".join(map(_json_str, value)) + "]"
    raise TypeError(f"cannot fill in {type(value).__name__}")


def _json_in_text(value: Any) -> str:
    """A string as it shows inside another JSON string (the line's text)."""
    if type(value) is not str:
        raise TypeError("only strings show in a text")
    return encode_basestring_ascii(value)[1:-1]


def _json_str(value: Any) -> str:
    if type(value) is not str:
        raise TypeError("a list of strings only")
    return encode_basestring_ascii(value)
