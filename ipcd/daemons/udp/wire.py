"""
udpd's datagram format, pure: bytes in, values out (L{Malformed} for
anything else), and the receive window that drops duplicates.

Every datagram starts with one kind byte:

    HELLO  'H' version(1) nonce(8) cookie(16) length(1) service(length)
               zero padding
    VERIFY 'V' nonce(8) cookie(16)
    OK     'O' nonce(8) session(8)
    NO     'N' nonce(8) reason (UTF-8, as much as fits)
    DATA   'D' session(8) sequence(8, big-endian) message payload
    CLOSE  'C' session(8)
    PING   'P' session(8)
    PONG   'Q' session(8)

A client's first HELLO has no cookie (zeros); the server answers it with a
VERIFY carrying one (L{ipcd.daemons.udp.cookie}), keeping nothing, and
only a HELLO that repeats that cookie, from the address it was sent to,
opens a session.  A HELLO is padded to at least L{HELLO_SIZE} bytes, so
that the answer to it (a VERIFY, an OK, or a NO cut to fit) is never larger
than the request: the server answers nothing else that is not already bound
to a session, so udpd cannot be used to amplify a spoofed datagram.
docs/protocol.rst describes the exchange.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# 2: the HELLO carries the address check's cookie (1 had none).
VERSION = 2
# The largest UDP payload over IPv4 (65,535 - 8 UDP - 20 IP header bytes).
MAX_UDP_PAYLOAD = 65507
# Every HELLO is at least this long; shorter ones are not answered.
HELLO_SIZE = 300
ID_SIZE = 8  # session ids and nonces: 64 random bits
COOKIE_SIZE = 16
NO_COOKIE = bytes(COOKIE_SIZE)  # a first HELLO's

HELLO, VERIFY, OK, NO, DATA, CLOSE = b"H", b"V", b"O", b"N", b"D", b"C"
# A side that sends DATA but hears nothing asks its peer whether it is
# still there (PING); the peer's udpd answers at once (PONG).
PING, PONG = b"P", b"Q"

_HELLO = struct.Struct("!cB8s16sB")
_VERIFY = struct.Struct("!c8s16s")
# What every version's HELLO starts with.
_HELLO_START = struct.Struct("!cB8s")
_OK = struct.Struct("!c8s8s")
_NO = struct.Struct("!c8s")
_DATA = struct.Struct("!c8sQ")
_CLOSE = struct.Struct("!c8s")

DATA_HEADER_SIZE = _DATA.size
OK_SIZE = _OK.size
VERIFY_SIZE = _VERIFY.size


class Malformed(ValueError):
    """Not a udpd datagram (garbage, truncated, unknown kind or version)."""


@dataclass(frozen=True)
class Hello:
    nonce: bytes
    service: bytes
    cookie: bytes = NO_COOKIE


@dataclass(frozen=True)
class OtherVersion:
    """A HELLO of a version this udpd does not speak: answered with a NO."""

    nonce: bytes
    version: int


@dataclass(frozen=True)
class Verify:
    """The server's answer to a HELLO without a good cookie."""

    nonce: bytes
    cookie: bytes


@dataclass(frozen=True)
class Accepted:
    nonce: bytes
    session: bytes


@dataclass(frozen=True)
class Refusal:
    nonce: bytes
    reason: str


@dataclass(frozen=True)
class Data:
    session: bytes
    sequence: int
    payload: bytes


@dataclass(frozen=True)
class Close:
    session: bytes


@dataclass(frozen=True)
class Ping:
    """Is the peer still there?  Answered by a L{Pong}."""

    session: bytes


@dataclass(frozen=True)
class Pong:
    """The answer to a L{Ping}: this side is still there."""

    session: bytes


Datagram = (
    Hello | OtherVersion | Verify | Accepted | Refusal | Data | Close | Ping | Pong
)
# The datagrams a session takes from its peer, besides DATA.
_SESSION_KINDS = {CLOSE: Close, PING: Ping, PONG: Pong}
SessionDatagram = Close | Ping | Pong  # (as isinstance takes them)


def hello(nonce: bytes, service: bytes, cookie: bytes = NO_COOKIE) -> bytes:
    """A HELLO for C{service}, padded to L{HELLO_SIZE}."""
    if len(nonce) != ID_SIZE or not 0 < len(service) <= 255:
        raise ValueError("a nonce of 8 bytes and a service name of 1-255 bytes")
    if len(cookie) != COOKIE_SIZE:
        raise ValueError(f"a cookie of {COOKIE_SIZE} bytes")
    head = _HELLO.pack(HELLO, VERSION, nonce, cookie, len(service)) + service
    return head.ljust(HELLO_SIZE, b"\0")


def verify(nonce: bytes, cookie: bytes) -> bytes:
    return _VERIFY.pack(VERIFY, nonce, cookie)


def accepted(nonce: bytes, session: bytes) -> bytes:
    return _OK.pack(OK, nonce, session)


def refusal(nonce: bytes, reason: str, limit: int) -> bytes:
    """A NO of at most C{limit} bytes: the reason is cut to fit."""
    room = max(0, limit - _NO.size)
    text = reason.encode("utf-8", "replace")[:room]
    return _NO.pack(NO, nonce) + text.decode("utf-8", "ignore").encode("utf-8")


def data(session: bytes, sequence: int, payload: bytes) -> bytes:
    return _DATA.pack(DATA, session, sequence) + payload


def close(session: bytes) -> bytes:
    return _CLOSE.pack(CLOSE, session)


def ping(session: bytes) -> bytes:
    return _CLOSE.pack(PING, session)


def pong(session: bytes) -> bytes:
    return _CLOSE.pack(PONG, session)


def data_head(datagram: bytes) -> tuple[bytes, int] | None:
    """
    A DATA's session id and sequence number (its payload follows, from
    L{DATA_HEADER_SIZE}), without making a value of it: the per-message
    way.  C{None} for anything else, a truncated DATA included (L{decode}
    says what it is).
    """
    if datagram[:1] != DATA or len(datagram) < _DATA.size:
        return None
    _, session, sequence = _DATA.unpack_from(datagram)
    return session, sequence


def decode(datagram: bytes) -> Datagram:
    """The datagram as a value; L{Malformed} when it is not one of udpd's."""
    kind = datagram[:1]
    try:
        if kind == DATA:
            _, session, sequence = _DATA.unpack_from(datagram)
            return Data(session, sequence, datagram[_DATA.size :])
        if kind == HELLO:
            return _decode_hello(datagram)
        if kind == VERIFY:
            if len(datagram) != _VERIFY.size:
                raise Malformed(f"a VERIFY of {len(datagram)} bytes")
            _, nonce, cookie = _VERIFY.unpack(datagram)
            return Verify(nonce, cookie)
        if kind == OK:
            if len(datagram) != _OK.size:
                raise Malformed(f"an OK of {len(datagram)} bytes")
            _, nonce, session = _OK.unpack(datagram)
            return Accepted(nonce, session)
        if kind == NO:
            _, nonce = _NO.unpack_from(datagram)
            reason = datagram[_NO.size :].decode("utf-8", "replace")
            return Refusal(nonce, reason)
        made = _SESSION_KINDS.get(kind)
        if made is not None:  # CLOSE, PING, PONG: the session id alone
            if len(datagram) != _CLOSE.size:
                name = made.__name__.upper()
                raise Malformed(f"a {name} of {len(datagram)} bytes")
            return made(_CLOSE.unpack(datagram)[1])
    except struct.error:
        raise Malformed(f"a truncated datagram of {len(datagram)} bytes") from None
    raise Malformed(f"unknown datagram kind {kind!r}")


def _decode_hello(datagram: bytes) -> Hello | OtherVersion:
    if len(datagram) < HELLO_SIZE:
        # Not answered: an answer could be larger than the request.
        raise Malformed(f"a HELLO of {len(datagram)} bytes (at least {HELLO_SIZE})")
    _, version, nonce = _HELLO_START.unpack_from(datagram)
    if version != VERSION:
        return OtherVersion(nonce, version)
    _, _, _, cookie, length = _HELLO.unpack_from(datagram)
    service = datagram[_HELLO.size : _HELLO.size + length]
    if length == 0 or datagram[_HELLO.size + length :].strip(b"\0"):
        raise Malformed("a HELLO with a bad service field")
    return Hello(nonce, service, cookie)


class ReceiveWindow:
    """
    Which sequence numbers a session has received: a new one is accepted
    once; a repeat (a duplicate) or one older than the last C{size} is not.
    C{lost} counts the numbers not (yet) received below the highest seen.

    Each step costs the same whatever the numbers: a jump ahead by at least
    the window starts it afresh (as IPsec's and DTLS's anti-replay windows
    do) instead of shifting the bitmap by the jump, so a peer's DATA at
    2**62 allocates nothing; everything it skipped is lost.
    """

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self._mask = (1 << size) - 1
        self.top = -1  # the highest sequence number accepted
        self.seen = 0  # bit i: top - i was accepted
        self.accepted = 0

    def accept(self, sequence: int) -> bool:
        if sequence > self.top:
            shift = sequence - self.top
            if shift >= self.size:
                self.seen = 1  # nothing of the old window is left in the new
            else:
                self.seen = ((self.seen << shift) | 1) & self._mask
            self.top = sequence
        else:
            offset = self.top - sequence
            if offset >= self.size or self.seen >> offset & 1:
                return False
            self.seen |= 1 << offset
        self.accepted += 1
        return True

    @property
    def lost(self) -> int:
        """Numbers skipped or still missing: less than 2**64, one subtraction."""
        return self.top + 1 - self.accepted
