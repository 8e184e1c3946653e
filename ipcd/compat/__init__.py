"""
Every private name of another library that ipcd reads, in one place.

A few of ipcd's fast paths need something Twisted, pyOpenSSL, autobahn or
CPython does not promise to keep (a transport's buffer, the SSL pointer
under a pyOpenSSL Connection, ...).  Each such name is read in one module
per library, through small named functions, and nowhere else:

    L{ipcd.compat.twisted}    transports' buffers, TLS, listeners, options,
                              endpoint-string parsing
    L{ipcd.compat.pyopenssl}  a Connection's SSL pointer and memory BIOs,
                              a Context's SSL_CTX pointer, errors
    L{ipcd.compat.autobahn}   the parser's entry, compression, timers, the
                              options line
    L{ipcd.compat.cpython}    the socket type's raw accept

Each name is a L{Name}: probed once (when ipcd starts, L{check}, or at
first use), and if it is gone the fast path that needs it is off, said in
one log line, and the public path serves instead.  Accessors test
C{name.present or name.usable()}: one attribute read once probed.  Tests
make a name missing with C{self.patch(name, "present", False)}.  Importing
these modules imports nothing of the libraries (no reactor either): a
probe does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: Every L{Name} the compat modules rely on, in the order they were made.
NAMES: list[Name] = []


class Name:
    """
    One private name of another library: whether this installation has it.
    C{probe()} is true when it has (an exception counts as not).
    """

    __slots__ = ("library", "name", "fast_path", "fallback", "probe", "present", "said")

    def __init__(
        self,
        library: str,
        name: str,
        fast_path: str,
        fallback: str,
        probe: Callable[[], object],
    ) -> None:
        self.library = library
        self.name = name
        self.fast_path = fast_path
        self.fallback = fallback
        self.probe = probe
        self.present: bool | None = None  # not probed yet
        self.said = False
        NAMES.append(self)

    def __repr__(self) -> str:
        return f"<{self.library} {self.name}: {self.present}>"

    def usable(self) -> bool:
        """Whether the fast path may read this name; the first no is logged."""
        if self.present is None:
            try:
                self.present = bool(self.probe())
            except Exception:
                self.present = False
        if not self.present and not self.said:
            self.said = True
            _log().warn(
                "{library} has no {name}, so ipcd goes without {fast_path}: {fallback}",
                library=self.library,
                name=self.name,
                fast_path=self.fast_path,
                fallback=self.fallback,
            )
        return self.present


def _log() -> Any:
    # Imported here: the blocking client (no Twisted) imports ipcd.handoff.
    from twisted.logger import Logger

    return Logger(namespace="ipcd.compat")


def check() -> list[Name]:
    """
    Probe every name (ipcd's start calls this): those missing, each said in
    one log line.
    """
    from ipcd.compat import autobahn, cpython, pyopenssl, twisted  # noqa: F401

    return [name for name in NAMES if not name.usable()]
