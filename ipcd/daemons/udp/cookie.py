"""
udpd's address check: a cookie that proves a HELLO's source address can
receive what is sent to it, kept nowhere (as DTLS's HelloVerifyRequest and
QUIC's Retry token).

A cookie is an HMAC-SHA256, cut to 16 bytes, of the source address and
port, the HELLO's nonce and service name and the current period, under a
random secret of that period.  A new secret is drawn each period (lazily,
at the first use in it); a cookie is good while its period or the next
lasts, so between L{PERIOD} and twice that after it was issued.  Nothing
is stored per peer: a flood of HELLOs from forged addresses costs one HMAC
and one small answer each, and no memory.
"""

from __future__ import annotations

import hmac
import secrets
import struct
from typing import Any

from twisted.internet.interfaces import IReactorTime

from ipcd.daemons.udp.wire import COOKIE_SIZE

# Seconds a secret is used to issue cookies (and then one more to check them).
PERIOD = 30.0

_SECRET_SIZE = 32


class AddressCookies:
    """Issues and checks cookies; C{clock} is an C{IReactorTime}."""

    def __init__(self, clock: IReactorTime, period: float = PERIOD) -> None:
        self.clock = clock
        self.period = period
        self._epoch = -2
        self._current = self._previous = b""

    def issue(self, address: tuple[Any, ...], nonce: bytes, service: bytes) -> bytes:
        epoch = self._rotate()
        return self._mac(self._current, epoch, address, nonce, service)

    def valid(
        self, cookie: bytes, address: tuple[Any, ...], nonce: bytes, service: bytes
    ) -> bool:
        epoch = self._rotate()
        return any(
            hmac.compare_digest(cookie, self._mac(key, at, address, nonce, service))
            for key, at in ((self._current, epoch), (self._previous, epoch - 1))
        )

    def _rotate(self) -> int:
        epoch = int(self.clock.seconds() // self.period)
        if epoch != self._epoch:
            # The previous period's secret stays good for one period more;
            # after a longer pause nothing issued before is.
            fresh = secrets.token_bytes(_SECRET_SIZE)
            kept = self._current if epoch == self._epoch + 1 else b""
            self._previous = kept or secrets.token_bytes(_SECRET_SIZE)
            self._current, self._epoch = fresh, epoch
        return epoch

    @staticmethod
    def _mac(
        key: bytes,
        epoch: int,
        address: tuple[Any, ...],
        nonce: bytes,
        service: bytes,
    ) -> bytes:
        host = str(address[0]).encode("ascii", "replace")
        message = b"".join(
            [
                struct.pack("!qBH", epoch, len(host), address[1] & 0xFFFF),
                host,
                nonce,
                struct.pack("!B", len(service)),
                service,
            ]
        )
        return hmac.digest(key, message, "sha256")[:COOKIE_SIZE]
