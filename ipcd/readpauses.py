"""
Why a transport is not read (L{ReadPauses}): several reasons to stop
reading one peer (its other end is full, what is owed to it is, a lookup
runs), each lifted on its own; the peer is read again once none is left.
"""

from __future__ import annotations

from typing import Any


class ReadPauses:
    """
    The reasons a transport is not read: it is read again once none is
    left.  Each reason is a bit; pausing and resuming are idempotent, as
    Twisted's producers may be told either more than once.
    """

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.reasons = 0

    def pause(self, reason: int) -> None:
        if not self.reasons & reason:
            self.reasons |= reason
            self.transport.pauseProducing()

    def resume(self, reason: int) -> None:
        if self.reasons & reason:
            self.reasons &= ~reason
            if not self.reasons:
                self.transport.resumeProducing()
