"""
Log observers.  Every ipcd decision is one structured twisted.logger event
(who, what, which rule, outcome as event fields); this one writes each event
as a JSON line a log shipper can read:

    twistd -n --logger ipcd.logs.json_observer ipcd
    ipcd --json-log

Text that a peer controls goes through L{printable} before it is logged (or
answered), so that it cannot write escape sequences to a terminal or forge
log lines.
"""

from __future__ import annotations

import sys
from typing import IO

from twisted.logger import ILogObserver, jsonFileLogObserver


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
    """One JSON object per line (record separator omitted) on stdout."""
    return jsonFileLogObserver(
        out if out is not None else sys.stdout, recordSeparator=""
    )
