"""
Tests for L{ipcd.proxyheader}: PROXY headers read as HAProxy's receiver
reads them (its doc/proxy-protocol.txt), the rest refused with a reason.
"""

from __future__ import annotations

import socket

import hypothesis
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from ipcd.proxyheader import V2_SIGNATURE, BadHeader, Header, HeaderReader


def v2(command: int, family: int, block: bytes, length: int | None = None) -> bytes:
    """A version 2 header: C{command}, C{family} byte, address C{block}."""
    size = len(block) if length is None else length
    return (
        V2_SIGNATURE + bytes([0x20 | command, family]) + size.to_bytes(2, "big") + block
    )


def v2_tcp6(source: bytes, destination: bytes, sport: int, dport: int) -> bytes:
    ports = sport.to_bytes(2, "big") + dport.to_bytes(2, "big")
    return v2(1, 0x21, source + destination + ports)


def read(data: bytes) -> Header | None:
    return HeaderReader().feed(data)


# Headers and near-headers: v1 lines of fields good and bad, v2 blocks of
# any version, command, family and bytes, and any bytes at all.
_FIELD = st.one_of(
    st.sampled_from(
        [b"10.0.0.1", b"::1", b"::ffff:1.2.3.4", b"fe80::1%eth0", b"010.0.0.1"]
        + [b"0", b"65535", b"65536", b"080", b"-1", b"x", b"", b"\xff", b"\x00"]
    ),
    st.binary(max_size=6),
)
_V1 = st.tuples(
    st.sampled_from([b"TCP4", b"TCP6", b"UNKNOWN", b"TCP5"]),
    st.lists(_FIELD, min_size=3, max_size=5),
).map(lambda t: b" ".join([b"PROXY", t[0], *t[1]]) + b"\r\n")
_V2 = st.tuples(st.integers(0, 255), st.integers(0, 255), st.binary(max_size=60)).map(
    lambda t: V2_SIGNATURE + bytes(t[:2]) + len(t[2]).to_bytes(2, "big") + t[2]
)
_DATA = st.tuples(st.one_of(_V1, _V2, st.binary(max_size=40)), st.binary(max_size=8))


class NoOtherErrorTests(SynchronousTestCase):
    @hypothesis.settings(max_examples=500, deadline=None)
    @hypothesis.given(_DATA, st.integers(1, 16))
    def test_anyBytesAnyPieces(self, data: tuple[bytes, bytes], piece: int) -> None:
        """
        Whatever bytes come, in whatever pieces: more wanted (None), a
        header, or a BadHeader, never another error (Twisted's let a
        ValueError or UnicodeDecodeError out of its v1 parser); a header's
        addresses are as inet_ntop writes them.
        """
        whole = data[0] + data[1]
        reader = HeaderReader()
        header = None
        try:
            for i in range(0, len(whole), piece):
                header = reader.feed(whole[i : i + piece])
                if header is not None:
                    break
        except BadHeader:
            return
        for end in (header.source, header.destination) if header else ():
            if end is not None:
                family = socket.AF_INET6 if ":" in end[0] else socket.AF_INET
                text = socket.inet_ntop(family, socket.inet_pton(family, end[0]))
                self.assertEqual(end[0], text)
                self.assertTrue(0 <= end[1] <= 65535)


class VersionOneTests(SynchronousTestCase):
    def test_accepted(self) -> None:
        """
        Lines as the specification writes them: addresses as inet_ntop
        writes them (an IPv6 one in capitals, compressed and lower case),
        the bytes after the line the client's.
        """
        for line, source, destination in (
            (
                b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443",
                ("192.0.2.1", 56324),
                ("198.51.100.2", 443),
            ),
            (
                b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535",
                ("0.0.0.0", 0),
                ("255.255.255.255", 65535),
            ),
            (
                b"PROXY TCP6 2001:DB8:0:0:0:0:0:7 ::1 1 2",
                ("2001:db8::7", 1),
                ("::1", 2),
            ),
            # A dual-stack proxy's IPv4 client (labelled as IPv4 later).
            (
                b"PROXY TCP6 ::ffff:192.0.2.1 ::1 1 2",
                ("::ffff:192.0.2.1", 1),
                ("::1", 2),
            ),
        ):
            header = read(line + b"\r\nrest")
            self.assertEqual(header, Header(source, destination, b"rest"), line)

    def test_unknown(self) -> None:
        """
        UNKNOWN names no address (the proxy's stands); the rest of its line
        is ignored.
        """
        for line in (b"PROXY UNKNOWN", b"PROXY UNKNOWN ffff::1 ffff::2 65535 65535 x"):
            self.assertEqual(read(line + b"\r\nab"), Header(None, None, b"ab"))

    def test_refused(self) -> None:
        """
        A source (or destination) that is not a plain address of the line's
        family, a port that is not one, any other shape: refused, saying
        what is wrong.  Twisted's parser took every one of these but the
        port 'x' (a traceback) as it was.
        """
        for line, why in (
            (b"PROXY TCP4 evil 192.0.2.2 1 2", "'evil' is not an IPv4 address"),
            (
                b"PROXY TCP4 010.0.0.1 192.0.2.2 1 2",
                "'010.0.0.1' is not an IPv4 address",
            ),
            (b"PROXY TCP4 1.2.3 192.0.2.2 1 2", "'1.2.3' is not an IPv4 address"),
            (b"PROXY TCP4 1.2.3.4%eth0 192.0.2.2 1 2", "'1.2.3.4%eth0' is not an IPv4"),
            (
                b"PROXY TCP6 fe80::1%eth0 ::1 1 2",
                "'fe80::1%eth0' is not an IPv6 address",
            ),
            (b"PROXY TCP6 fe80::1%1 ::1 1 2", "'fe80::1%1' is not an IPv6 address"),
            (b"PROXY TCP4 ::1 192.0.2.2 1 2", "'::1' is not an IPv4 address"),
            (b"PROXY TCP6 192.0.2.1 ::1 1 2", "'192.0.2.1' is not an IPv6 address"),
            (b"PROXY TCP4 192.0.2.1 evil 1 2", "'evil' is not an IPv4 address"),
            (b"PROXY TCP4 \x1b[31m 192.0.2.2 1 2", r"'\x1b[31m' is not an IPv4"),
            (b"PROXY TCP4 \xff\xfe 192.0.2.2 1 2", r"'\xff\xfe' is not an IPv4"),
            (b"PROXY TCP4 192.0.2.1 192.0.2.2 x 2", "'x' is not a port"),
            (b"PROXY TCP4 192.0.2.1 192.0.2.2 -5 2", "'-5' is not a port"),
            (b"PROXY TCP4 192.0.2.1 192.0.2.2 +5 2", "'+5' is not a port"),
            (b"PROXY TCP4 192.0.2.1 192.0.2.2 080 2", "'080' is not a port"),
            (b"PROXY TCP4 192.0.2.1 192.0.2.2 1 65536", "'65536' is not a port"),
            (b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 3", "not five fields"),
            (b"PROXY TCP4 192.0.2.1 192.0.2.2 1", "not five fields"),
            (b"PROXY TCP4  192.0.2.1 192.0.2.2 1 2", "not five fields"),
            (b"PROXY TCP5 192.0.2.1 192.0.2.2 1 2", "unknown protocol 'TCP5'"),
            (b"PROXY", "not a PROXY line"),
            (b"PROXYTCP4", "not a PROXY line"),
            # "PROXY" must be a field of its own, not a word's beginning.
            (b"PROXYX TCP4 192.0.2.1 192.0.2.2 1 2", "not a PROXY line"),
        ):
            with self.assertRaises(BadHeader, msg=line) as caught:
                read(line + b"\r\n")
            self.assertIn(why, str(caught.exception), line)

    def test_fieldShownShort(self) -> None:
        """
        A refused field is named in the log line whole up to 40 bytes, its
        first 40 and "..." past that (a peer's kilobytes do not fill logs).
        """
        for size, shown in ((40, "'" + "Y" * 40 + "'"), (41, "'" + "Y" * 40 + "...'")):
            with self.assertRaises(BadHeader) as caught:
                read(b"PROXY " + b"Y" * size + b" 1.2.3.4 1.2.3.4 1 2\r\n")
            self.assertEqual(str(caught.exception), f"unknown protocol {shown}")

    def test_clientLinesAfter(self) -> None:
        """
        The header ends at its line's first CRLF, whatever the client's
        bytes after it hold in the same read (an HTTP request's own lines).
        """
        rest = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
        self.assertEqual(
            read(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n" + rest),
            Header(("192.0.2.1", 1), ("192.0.2.2", 2), rest),
        )

    def test_long(self) -> None:
        """
        No CRLF in the first 107 bytes: refused, however much comes in one
        read (Twisted's took a line of any length that came at once).
        """
        self.assertIsNone(read(b"PROXY UNKNOWN " + b"x" * 91))  # 105: may end
        for data in (
            b"PROXY UNKNOWN " + b"x" * 93,
            b"PROXY TCP4 " + b"1" * 5000 + b"\r\n",
        ):
            with self.assertRaises(BadHeader) as caught:
                read(data)
            self.assertEqual(
                str(caught.exception), "no end of line in the first 107 bytes"
            )
        self.assertEqual(
            read(b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n"), Header(None, None, b"")
        )

    def test_inPieces(self) -> None:
        """
        A header in any number of pieces (Twisted's wrapper dropped a
        connection whose first read was under 8 bytes, or 16 for v2).
        """
        data = b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\nclient"
        reader = HeaderReader()
        for i in range(len(data) - len(b"client") - 1):
            self.assertIsNone(reader.feed(data[i : i + 1]), i)
        header = reader.feed(data[-len(b"client") - 1 :])
        self.assertEqual(header, Header(("192.0.2.1", 1), ("192.0.2.2", 2), b"client"))

    def test_notAHeader(self) -> None:
        """Anything but a header's first bytes is refused once it shows."""
        for data in (
            b"GET / HTTP/1.1\r\n",
            b"PROXZ",
            b"P\r\n",
            b"\x16\x03\x01",
            b"\r\n\r\n\x01",
            b"\r\n\r\n\x00\r\nQUIT!",  # its 12th byte wrong: no need for 16
        ):
            with self.assertRaises(BadHeader, msg=data) as caught:
                read(data)
            self.assertEqual(str(caught.exception), "no PROXY header")
        for data in (b"P", b"PROX", b"\r\n\r\n\x00\r\nQUI"):
            self.assertIsNone(read(data), data)


class VersionTwoTests(SynchronousTestCase):
    def test_tcp4(self) -> None:
        block = bytes([192, 0, 2, 1, 198, 51, 100, 2]) + b"\x01\x00\x00\x50"
        self.assertEqual(
            read(v2(1, 0x11, block) + b"rest"),
            Header(("192.0.2.1", 256), ("198.51.100.2", 80), b"rest"),
        )

    def test_portsOfTwoBytes(self) -> None:
        """Both ports are 16 bits, big-endian: their high bytes count."""
        block = bytes([192, 0, 2, 1, 198, 51, 100, 2]) + b"\xff\xfe\x1f\x90"
        self.assertEqual(
            read(v2(1, 0x11, block)),
            Header(("192.0.2.1", 65534), ("198.51.100.2", 8080), b""),
        )

    def test_tcp6Canonical(self) -> None:
        """
        An IPv6 address as inet_ntop writes it (Twisted's wrote every
        group, 2001:db8:0:0:0:0:0:7: an ip:2001:db8::* glob missed it).
        """
        source = bytes.fromhex("20010db8000000000000000000000007")
        header = read(v2_tcp6(source, bytes(15) + b"\x01", 1, 2))
        self.assertEqual(header, Header(("2001:db8::7", 1), ("::1", 2), b""))

    def test_tlvsSkipped(self) -> None:
        """Bytes past the addresses (TLVs) are part of the header, skipped."""
        block = bytes([192, 0, 2, 1, 198, 51, 100, 2]) + b"\x00\x01\x00\x02"
        tlv = b"\x04\x00\x03abc"
        header = read(v2(1, 0x11, block + tlv) + b"rest")
        self.assertEqual(header, Header(("192.0.2.1", 1), ("198.51.100.2", 2), b"rest"))

    def test_noAddress(self) -> None:
        """
        LOCAL (whatever its family byte), an unspecified family or
        transport, a UNIX socket, a datagram transport: no IP address of a
        TCP client; the proxy's stands.
        """
        inet = bytes([192, 0, 2, 1, 198, 51, 100, 2]) + b"\x00\x01\x00\x02"
        for data in (
            v2(0, 0x00, b""),
            v2(0, 0xFF, b"xyz"),
            v2(1, 0x00, b""),
            v2(1, 0x01, b""),  # no family: no address block needed
            v2(1, 0x10, inet),
            v2(1, 0x10, inet[:4]),  # no transport: the block is ignored
            v2(1, 0x12, inet),
            v2(1, 0x31, bytes(216)),
            v2(1, 0x32, bytes(216)),
        ):
            self.assertEqual(read(data + b"r"), Header(None, None, b"r"), data)

    def test_refused(self) -> None:
        """
        What the specification says receivers must reject: another version
        or command, an unknown family or transport, a block too short for
        its addresses.
        """
        inet = bytes([192, 0, 2, 1, 198, 51, 100, 2]) + b"\x00\x01\x00\x02"
        for data, why in (
            (V2_SIGNATURE + b"\x11\x11\x00\x0c" + inet, "version 1 command 1"),
            (v2(2, 0x11, inet), "version 2 command 2"),
            (v2(1, 0x41, inet), "unknown family 4 or transport 1"),
            (v2(1, 0x13, inet), "unknown family 1 or transport 3"),
            (v2(1, 0x11, inet[:8]), "8 bytes of addresses, 12 needed"),
            (v2(1, 0x21, inet), "12 bytes of addresses, 36 needed"),
            (v2(1, 0x31, bytes(200)), "200 bytes of addresses, 216 needed"),
            (b"\r\n\r\n\x00\r\nQUIZ\n\x21\x11\x00\x0c" + inet, "no PROXY header"),
        ):
            with self.assertRaises(BadHeader, msg=data) as caught:
                read(data)
            self.assertEqual(str(caught.exception), why)

    def test_long(self) -> None:
        """
        A header of more than 4 KiB (its TLVs) is refused as soon as its
        length says so: Twisted's reader held up to 64 KiB a connection.
        """
        inet = bytes([192, 0, 2, 1, 198, 51, 100, 2]) + b"\x00\x01\x00\x02"
        whole = v2(1, 0x11, inet + bytes(4096 - 16 - len(inet)))
        self.assertEqual(
            read(whole), Header(("192.0.2.1", 1), ("198.51.100.2", 2), b"")
        )
        with self.assertRaises(BadHeader) as caught:
            read(v2(1, 0x11, inet, length=4096 - 16 + 1))
        self.assertEqual(
            str(caught.exception), "a version 2 header of 4097 bytes (at most 4096)"
        )

    def test_sixteenBytesWhole(self) -> None:
        """
        A header of no more than its 16 fixed bytes (a health check's LOCAL)
        is whole when they are, before the client says anything.
        """
        self.assertEqual(read(v2(0, 0x00, b"")), Header(None, None, b""))

    def test_waitsForTheWholeBlock(self) -> None:
        """The header is whole at 16 bytes plus its length, however it comes."""
        inet = bytes([192, 0, 2, 1, 198, 51, 100, 2]) + b"\x00\x01\x00\x02"
        data = v2(1, 0x11, inet + bytes(1000))
        reader = HeaderReader()
        for i in range(0, len(data) - 1, 7):
            self.assertIsNone(reader.feed(data[i : min(i + 7, len(data) - 1)]))
        self.assertEqual(
            reader.feed(data[-1:] + b"x"),
            Header(("192.0.2.1", 1), ("198.51.100.2", 2), b"x"),
        )
