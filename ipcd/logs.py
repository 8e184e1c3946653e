"""
Log observers.  Every ipcd decision is one structured twisted.logger event
(who, what, which rule, outcome as event fields); this one writes each event
as a JSON line a log shipper can read:

    twistd -n --logger ipcd.logs.json_observer ipcd
    ipcd --json-log
"""

from __future__ import annotations

import sys
from typing import IO

from twisted.logger import ILogObserver, jsonFileLogObserver


def json_observer(out: IO[str] | None = None) -> ILogObserver:
    """One JSON object per line (record separator omitted) on stdout."""
    return jsonFileLogObserver(
        out if out is not None else sys.stdout, recordSeparator=""
    )
