"""
What a command does when its standard output's reader is gone (C{ipcd
status | head}, C{pong --version | true}): no traceback at exit for what
is still buffered.  Imports no Twisted: pong uses it too.
"""

from __future__ import annotations

import os
import sys


def stdout_to_devnull() -> None:
    """Point stdout's descriptor at /dev/null (Python's own advice for EPIPE)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a real file (a test's): nothing flushed at exit
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
