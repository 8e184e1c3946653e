"""
udpd's address check: a cookie that proves a HELLO's source address can
receive what is sent to it, kept nowhere (as DTLS's HelloVerifyRequest and
QUIC's Retry token).

A cookie is 4 random bytes (its serial: each VERIFY's cookie is another)
and an HMAC-SHA256, cut to 12 bytes, of the serial, the source address
and port, the HELLO's nonce and service name and the current period,
under a random secret of that period.  A new secret is drawn each period
(lazily, at the first use in it); a cookie is good while its period or the
next lasts, so between L{PERIOD} and twice that after it was issued.
Nothing is stored per peer that has not proved its address: a flood of
HELLOs from forged addresses costs one HMAC and one small answer each, and
no memory.

A cookie is good for one HELLO's answer (L{AddressCookies.spend}): the
cookies spent are kept until they expire, so a HELLO seen on the path and
sent again from the victim's address (a replay) opens nothing.  At most
L{SPENT_PER_SOURCE} per address prefix per period are kept (past them
that prefix's HELLOs are refused, busy), and L{SPENT_IN_ALL} in all: the
one that would pass it draws new secrets instead, so that every cookie
issued until then is no longer good and none need be kept.  The memory is
bounded, a replay never gets through for want of room, and a few prefixes
that spend fast cannot lock the others out (they did, refused busy for as
long as they kept it full): a client whose cookie the renewal took gets a
VERIFY with a new one, one round trip more.
"""

from __future__ import annotations

import hmac
import secrets
import struct
from collections import Counter
from typing import Any

from twisted.internet.interfaces import IReactorTime

from ipcd.daemons.udp.wire import COOKIE_SIZE

# Seconds a secret is used to issue cookies (and then one more to check them).
PERIOD = 30.0

_SECRET_SIZE = 32
_SERIAL_SIZE = 4
# Cookies spent per address prefix in a period of issue, and kept in all
# (those of the two periods whose cookies are good): up to 210 bytes each
# with its prefix's count (each from another prefix), so at most 6.8 MB
# (measured with tracemalloc).
SPENT_PER_SOURCE = 4096
SPENT_IN_ALL = 32768
# What L{AddressCookies.spend} says of a cookie it refuses ...
SPENT, FULL = "spent", "full"
# ... and of one it took that renewed the secrets (none spent is kept).
RENEWED = "renewed"


class AddressCookies:
    """Issues and checks cookies; C{clock} is an C{IReactorTime}."""

    def __init__(
        self,
        clock: IReactorTime,
        period: float = PERIOD,
        per_source: int = SPENT_PER_SOURCE,
        in_all: int = SPENT_IN_ALL,
    ) -> None:
        self.clock = clock
        self.period = period
        self.per_source, self.in_all = per_source, in_all
        self._epoch = -2
        self._current = self._previous = b""
        # Period of issue -> the cookies spent, and how many per prefix.
        self._spent: dict[int, set[bytes]] = {}
        self._spenders: dict[int, Counter[str]] = {}

    def issue(self, address: tuple[Any, ...], nonce: bytes, service: bytes) -> bytes:
        epoch = self._rotate()
        serial = secrets.token_bytes(_SERIAL_SIZE)
        return serial + self._mac(self._current, epoch, serial, address, nonce, service)

    def issued_in(
        self, cookie: bytes, address: tuple[Any, ...], nonce: bytes, service: bytes
    ) -> int | None:
        """The period C{cookie} was issued in, if it is good for the request."""
        epoch = self._rotate()
        serial, mac = cookie[:_SERIAL_SIZE], cookie[_SERIAL_SIZE:]
        for key, at in ((self._current, epoch), (self._previous, epoch - 1)):
            expected = self._mac(key, at, serial, address, nonce, service)
            if hmac.compare_digest(mac, expected):
                return at
        return None

    def valid(
        self, cookie: bytes, address: tuple[Any, ...], nonce: bytes, service: bytes
    ) -> bool:
        return self.issued_in(cookie, address, nonce, service) is not None

    def spend(self, cookie: bytes, issued: int, source: str) -> str | None:
        """
        Spend a good C{cookie} (issued in period C{issued}) on a HELLO from
        address prefix C{source}: C{None} or L{RENEWED} (taken; the latter
        when it would have passed L{in_all}, and the secrets were drawn
        anew), or why not: L{SPENT} (it was spent already) or L{FULL} (the
        prefix spent too many).
        """
        spent = self._spent.setdefault(issued, set())
        if cookie in spent:
            return SPENT
        spenders = self._spenders.setdefault(issued, Counter())
        if spenders[source] >= self.per_source:
            return FULL
        if sum(map(len, self._spent.values())) >= self.in_all:
            # Not refused (everyone else would be, for as long as a few
            # prefixes kept it full): no cookie issued until now is good
            # any more, this one included, so none need be remembered.
            self._renew()
            return RENEWED
        spent.add(cookie)
        spenders[source] += 1
        return None

    def _renew(self) -> None:
        """New secrets for this period and the last: forget what was spent."""
        self._current = secrets.token_bytes(_SECRET_SIZE)
        self._previous = secrets.token_bytes(_SECRET_SIZE)
        self._spent.clear()
        self._spenders.clear()

    def _rotate(self) -> int:
        epoch = int(self.clock.seconds() // self.period)
        if epoch != self._epoch:
            # The previous period's secret stays good for one period more;
            # after a longer pause nothing issued before is.
            fresh = secrets.token_bytes(_SECRET_SIZE)
            kept = self._current if epoch == self._epoch + 1 else b""
            self._previous = kept or secrets.token_bytes(_SECRET_SIZE)
            self._current, self._epoch = fresh, epoch
            # Cookies that can no longer be good need not be remembered.
            for old in [at for at in self._spent if at < epoch - 1]:
                self._spent.pop(old, None)
                self._spenders.pop(old, None)
        return epoch

    @staticmethod
    def _mac(
        key: bytes,
        epoch: int,
        serial: bytes,
        address: tuple[Any, ...],
        nonce: bytes,
        service: bytes,
    ) -> bytes:
        host = str(address[0]).encode("ascii", "replace")
        message = b"".join(
            [
                struct.pack("!qBH", epoch, len(host), address[1] & 0xFFFF),
                serial,
                host,
                nonce,
                struct.pack("!B", len(service)),
                service,
            ]
        )
        return hmac.digest(key, message, "sha256")[: COOKIE_SIZE - _SERIAL_SIZE]
