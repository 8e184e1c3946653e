"""
systemd's readiness protocol (C{Type=notify}): L{Notifier} sends state
lines (C{READY=1}, C{RELOADING=1}, C{STOPPING=1}, C{STATUS=...}) as one
datagram each to C{$NOTIFY_SOCKET}, as C{sd_notify(3)} does; L{Readiness}
sends them at the right moments of ipcd's life.

No dependency: a few lines of socket code.  Never blocking: the socket is
non-blocking, and a datagram the manager cannot take now is dropped (with
one log line), never waited for.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, MutableMapping
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger

_log = Logger(namespace="ipcd.sdnotify")

# A refused reload's STATUS: why is in ipcd's log, never in the STATUS.
REFUSED_STATUS = "reload refused, old configuration kept (see the log)"


def notify_address(value: str) -> str | bytes:
    """
    The address in C{$NOTIFY_SOCKET}: a path, or an abstract name
    (C{@name}, sent as a leading NUL).  ValueError for anything else.
    """
    if value.startswith("@") and len(value) > 1:
        # The environment's bytes, as os.environ decoded them (not UTF-8
        # for all it knows).
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return value
    raise ValueError(
        f"NOTIFY_SOCKET={value!r} is neither an absolute path nor an @abstract name"
    )


class Notifier:
    """Sends state lines to the service manager at C{address}."""

    def __init__(self, address: str | bytes) -> None:
        self.address = address
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)
        self._failed = False

    @classmethod
    def from_environment(
        cls, environ: MutableMapping[str, str] | None = None
    ) -> Notifier | None:
        """
        The notifier C{$NOTIFY_SOCKET} names, or None; the variable is taken
        out of the environment (as C{sd_notify}'s C{unset_environment}
        does), so that no process ipcd starts sends in its name.  A bad
        value is one log line, and no notifier.
        """
        env = os.environ if environ is None else environ
        value = env.pop("NOTIFY_SOCKET", None)
        if not value:
            return None
        try:
            return cls(notify_address(value))
        except ValueError as e:
            _log.warn("not telling systemd how ipcd is: {error}", error=str(e))
            return None

    def send(self, **state: str) -> bool:
        """
        One datagram of C{KEY=value} lines (C{send(READY="1")}); False, with
        one log line for the first failure, if it could not be sent now.
        """
        message = "".join(f"{key}={value}\n" for key, value in state.items())
        try:
            # A path from the command line may be bytes that are not UTF-8
            # (surrogate escapes): sent as they came.
            data = message.encode("utf-8", "surrogateescape")
            self._socket.sendto(data, self.address)
        except OSError as e:
            if not self._failed:
                self._failed = True
                _log.warn(
                    "cannot tell systemd {message!r} at NOTIFY_SOCKET {address!r}: "
                    "{error} (ipcd serves on; said once)",
                    message=message.strip(),
                    address=self.address,
                    error=e.strerror or str(e),
                )
            return False
        return True

    def close(self) -> None:
        self._socket.close()


def _one_line(text: str, most: int = 200) -> str:
    """C{text} as a STATUS= value: one line, at most C{most} characters."""
    text = " ".join(text.split())
    return text if len(text) <= most else text[: most - 1] + "\N{HORIZONTAL ELLIPSIS}"


class Readiness(Service):
    """
    Tells systemd, through C{notifier}, that ipcd (C{ipcd}, an
    L{ipcd.tap.IPCDService}) is ready once every listener listens
    (C{ipcd.when_ready()}), reloading around a reload (L{reloading},
    L{reloaded}) and stopping when it stops.  C{monotonic_ns} is the clock
    for C{RELOADING=1}'s C{MONOTONIC_USEC} (systemd's C{CLOCK_MONOTONIC}).
    """

    name = "sd_notify"

    def __init__(
        self,
        notifier: Notifier,
        ipcd: Any,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.notifier = notifier
        self.ipcd = ipcd
        self.monotonic_ns = monotonic_ns

    def startService(self) -> None:  # noqa: N802 (Twisted's name)
        super().startService()
        self.ipcd.when_ready().addCallbacks(self._ready, self._not_ready)

    def _ready(self, addresses: dict[str, list[str]]) -> None:
        where = "; ".join(f"{name} {' '.join(at)}" for name, at in addresses.items())
        self.notifier.send(READY="1", STATUS=_one_line(f"ready: {where}"))

    def _not_ready(self, failure: Any) -> None:
        self.notifier.send(STATUS=_one_line(f"cannot listen: {failure.value}"))

    def reloading(self) -> None:
        self.notifier.send(
            RELOADING="1", MONOTONIC_USEC=str(self.monotonic_ns() // 1000)
        )

    def reloaded(self, answer: dict[str, Any]) -> None:
        # STATUS is shown to every local user (systemctl status); why it was
        # refused may quote the configuration: that goes to the log only
        # (and to ipcd reload's caller).
        status = "reloaded" if answer.get("ok") else REFUSED_STATUS
        self.notifier.send(READY="1", STATUS=status)

    def stopService(self) -> None:  # noqa: N802 (Twisted's name)
        super().stopService()
        self.notifier.send(STOPPING="1", STATUS="stopping")
        self.notifier.close()
