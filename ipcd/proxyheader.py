"""
The PROXY protocol header (HAProxy's, versions 1 and 2) that a proxy sends
before its client's bytes on a C{haproxy:} listener, read strictly.

The header names the client ipcd labels (C{ip:...}) and logs, so what it
says is checked as HAProxy's own receiver checks it (its
C{doc/proxy-protocol.txt}): a version 1 line of at most 107 bytes with
single spaces, addresses in the text C{inet_pton} takes for the family
the line announces (C{TCP4}: dotted decimal without leading zeros; C{TCP6}:
no zone, no IPv4 text) and ports of 0 to 65535 without leading zeros; a
version 2 block of the version and command, family and transport the
specification defines, long enough for its addresses, and at most
L{V2_MAX} bytes in all.  Anything else is a
L{BadHeader}: the connection is refused, never labelled.

Twisted's own parser took any text as the address (C{ip:evil}, a zone,
C{010.0.0.1}, kilobytes of it), let a non-numeric port or non-UTF-8 text
escape as a traceback per connection, and dropped a header that came in
pieces.

Pure: bytes in, a L{Header} or a L{BadHeader} out; no I/O.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

V1_PREFIX = b"PROXY"
V1_MAX = 107  # the longest line, its CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FIXED = 16  # signature, version and command, family, length
# The longest version 2 header taken, TLVs included: what a peer holds
# while it handshakes stays about 4 KiB (its length field allows 64 KiB,
# which Twisted's reader held; a proxy's TLVs take a few hundred bytes).
V2_MAX = 4096

# Version 2's address families: (socket family, address block length).
_V2_INET = {0x1: (socket.AF_INET, 12), 0x2: (socket.AF_INET6, 36)}
_V2_UNIX_BLOCK = 216
_STREAM = 0x1
_V1_FAMILIES = {b"TCP4": socket.AF_INET, b"TCP6": socket.AF_INET6}


class BadHeader(Exception):
    """A header that is not one the PROXY protocol allows: why, one line."""


@dataclass(frozen=True)
class Header:
    """
    A whole header: the client's address and port (C{source}) and the one
    it reached (C{destination}), each C{(host, port)} with C{host} as
    C{inet_ntop} writes it; both C{None} when the header names no IP
    address (C{UNKNOWN}, C{LOCAL}, a UNIX socket, a datagram transport):
    then the proxy's own address stands, as the specification says.
    C{rest}: the bytes after it, the client's.
    """

    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    rest: bytes


class HeaderReader:
    """
    Reads one header from a stream's first bytes, in as many pieces as they
    come (the specification recommends that): L{feed} says C{None} until it
    is whole.
    """

    def __init__(self) -> None:
        # (A bytearray: a version 2 header may come in many small pieces.)
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Header | None:
        """The header once C{data} completes it; L{BadHeader} if it cannot be."""
        buffer = self._buffer
        buffer += data
        if buffer[:1] == b"P":
            return self._v1(buffer)
        if buffer[:1] == b"\r":
            return self._v2(buffer)
        raise BadHeader("no PROXY header")

    def _v1(self, buffer: bytearray) -> Header | None:
        if not V1_PREFIX.startswith(buffer[:5]):
            raise BadHeader("no PROXY header")
        end = buffer.find(b"\r\n", 0, V1_MAX)
        if end < 0:
            if len(buffer) >= V1_MAX:
                raise BadHeader(f"no end of line in the first {V1_MAX} bytes")
            return None
        source, destination = parse_v1(bytes(buffer[:end]))
        return Header(source, destination, bytes(buffer[end + 2 :]))

    def _v2(self, buffer: bytearray) -> Header | None:
        if len(buffer) < _V2_FIXED:
            if not V2_SIGNATURE.startswith(buffer[:12]):
                raise BadHeader("no PROXY header")
            return None
        if buffer[:12] != V2_SIGNATURE:
            raise BadHeader("no PROXY header")
        end = _V2_FIXED + int.from_bytes(buffer[14:16], "big")
        if end > V2_MAX:
            raise BadHeader(f"a version 2 header of {end} bytes (at most {V2_MAX})")
        if len(buffer) < end:
            return None
        source, destination = parse_v2(bytes(buffer[:end]))
        return Header(source, destination, bytes(buffer[end:]))


Addresses = tuple[tuple[str, int] | None, tuple[str, int] | None]


def parse_v1(line: bytes) -> Addresses:
    """The addresses of version 1 line C{line} (without its CRLF)."""
    fields = line.split(b" ")
    if fields[0] != V1_PREFIX or len(fields) < 2:
        raise BadHeader("not a PROXY line")
    if fields[1] == b"UNKNOWN":
        return None, None  # the rest of the line is to be ignored
    family = _V1_FAMILIES.get(fields[1])
    if family is None:
        raise BadHeader(f"unknown protocol {_shown(fields[1])}")
    if len(fields) != 6:
        raise BadHeader("not five fields separated by single spaces")
    source = _v1_address(family, fields[2], fields[4])
    return source, _v1_address(family, fields[3], fields[5])


def _v1_address(family: int, host: bytes, port: bytes) -> tuple[str, int]:
    try:
        # inet_pton, as HAProxy: no zone, no leading zeros, no IPv4 text
        # under TCP6 (nor the other way round), nothing but an address.
        packed = socket.inet_pton(family, host.decode("ascii"))
    except (UnicodeDecodeError, OSError, ValueError):
        kind = "IPv4" if family == socket.AF_INET else "IPv6"
        raise BadHeader(f"{_shown(host)} is not an {kind} address") from None
    # Decimal digits, no sign, no leading zero ("010": octal to some).
    digits = port.isdigit() and len(port) <= 5 and (port[:1] != b"0" or port == b"0")
    if not digits or int(port) > 65535:
        raise BadHeader(f"{_shown(port)} is not a port")
    number = int(port)
    return socket.inet_ntop(family, packed), number


def parse_v2(block: bytes) -> Addresses:
    """The addresses of version 2 header C{block} (all of it)."""
    version, command = block[12] >> 4, block[12] & 0xF
    if version != 2 or command > 1:
        raise BadHeader(f"version {version} command {command}")
    if command == 0:
        return None, None  # LOCAL, the proxy's own (a check): block ignored
    family, transport = block[13] >> 4, block[13] & 0xF
    if family > 3 or transport > 2:
        raise BadHeader(f"unknown family {family} or transport {transport}")
    length = len(block) - _V2_FIXED
    inet = _V2_INET.get(family)
    needed = inet[1] if inet else _V2_UNIX_BLOCK if family == 3 else 0
    if transport and length < needed:
        raise BadHeader(f"{length} bytes of addresses, {needed} needed")
    # What a TCP listener's client cannot be (a UNIX socket, a datagram
    # transport, unspecified): the proxy stands, as the specification says.
    if inet is None or transport != _STREAM:
        return None, None
    kind, size = inet
    width = (size - 4) // 2
    addresses = block[_V2_FIXED : _V2_FIXED + size]
    ports = addresses[-4:]
    return (
        (socket.inet_ntop(kind, addresses[:width]), int.from_bytes(ports[:2], "big")),
        (
            socket.inet_ntop(kind, addresses[width : 2 * width]),
            int.from_bytes(ports[2:], "big"),
        ),
    )


def _shown(text: bytes) -> str:
    """A field of a header, fit for a log line: quoted, escaped, and short."""
    shown = repr(text[:40])[2:-1]  # (bytes' repr: \\x1b, \\xff)
    return f"'{shown}...'" if len(text) > 40 else f"'{shown}'"
