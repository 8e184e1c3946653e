"""
What C{ipcd status} says of the running instance itself: its version and
process, since when it runs, and its reloads.

A reload asked by SIGHUP (C{systemctl reload}) is answered to nobody: its
outcome was in the log only, and a refused one left the old configuration
in force while the file said otherwise, with nothing in C{ipcd status} to
tell.  Likewise the keys a reload could not apply (C{restart needed for
pongd}) and what a daemon could not apply (tlsd's unusable new keys) were
said once, to whoever asked then.  L{Reloads} keeps them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any


def _at(seconds: float) -> str:
    """A wall-clock time as people read it in the logs: UTC, to the second."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


class Reloads:
    """
    The reloads of one ipcd: how many, the last one's outcome, and the keys
    a successful reload left for a restart (the latest such list: a later
    reload compares the file with what runs, so it says all that still
    waits).  C{clock}: the wall clock.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.started = clock()
        self.count = 0
        self.last: dict[str, Any] | None = None
        self.restart_needed: list[str] = []

    def record(self, answer: dict[str, Any]) -> None:
        """A reload was answered C{answer} (as C{ipcd reload} is)."""
        self.count += 1
        self.last = {"at": _at(self._clock()), "ok": bool(answer.get("ok"))}
        if "error" in answer:
            self.last["error"] = str(answer["error"])
        if answer.get("not_applied"):
            # In force but not whole (tlsd kept its old keys): a SIGHUP's
            # was in the log only.
            self.last["not_applied"] = [str(why) for why in answer["not_applied"]]
        if answer.get("ok"):
            self.restart_needed = [str(key) for key in answer["restart_needed"]]

    def status(self, version: str) -> dict[str, Any]:
        """The instance, for C{ipcd status} (plain JSON values)."""
        return {
            "version": version,
            "pid": os.getpid(),
            "started": _at(self.started),
            "uptime": round(max(self._clock() - self.started, 0.0)),
            "reloads": self.count,
            "last_reload": self.last,
            "restart_needed": list(self.restart_needed),
        }


def _duration(seconds: int) -> str:
    """C{3d 4h}, C{2h 5m}, C{7m 3s}, C{12s}: the two largest units."""
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size or (unit == "s" and not parts):
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return " ".join(parts[:2])


def instance_lines(state: dict[str, Any]) -> list[str]:
    """L{Reloads.status}'s lines in C{ipcd status}."""
    lines = [
        f"ipcd: version {state['version']}, pid {state['pid']}, up "
        f"{_duration(state['uptime'])} (since {state['started']})"
    ]
    last = state.get("last_reload")
    if last is None:
        lines.append("reloads: none")
    else:
        outcome = "reloaded" if last["ok"] else f"refused: {last.get('error')}"
        if last.get("not_applied"):
            outcome += ", not applied: " + "; ".join(last["not_applied"])
        lines.append(
            f"reloads: {state['reloads']}, the last at {last['at']}: {outcome}"
        )
    if state.get("restart_needed"):
        lines.append(f"restart needed for: {', '.join(state['restart_needed'])}")
    return lines
