"""
Kernel TLS (L{ipcd.daemons.tls.ktls}): the probe for the kernel's C{tls}
upper-layer protocol.  Tests that need it skip, saying so, on a kernel
without it (see L{needs_ktls}); the VM test runs them inside a kernel that
has it.
"""

from __future__ import annotations

import struct
from pathlib import Path

from twisted.trial.unittest import TestCase

from ipcd.daemons.tls.ktls import (
    AES_128_GCM,
    AES_256_GCM,
    APPLICATION_DATA,
    CHACHA20_POLY1305,
    TLS12,
    TLS13,
    Records,
    cipher_of,
    crypto_info,
    ktls_available,
    not_ticket,
    prf,
    tls12_keys,
    tls13_keys,
)

NO_KTLS = (
    "this kernel has no tls upper-layer protocol "
    "(net/ipv4/tcp_available_ulp, CONFIG_TLS); the VM test runs these"
)


def needs_ktls(case: type) -> type:
    """Mark test class C{case} to skip where the kernel has no kTLS."""
    if not ktls_available():
        case.skip = NO_KTLS
    return case


class ProbeTests(TestCase):
    def test_cached(self) -> None:
        """The probe answers a bool, the same each time."""
        first = ktls_available()
        self.assertIsInstance(first, bool)
        self.assertIs(ktls_available(), first)

    def test_agrees_with_kernel(self) -> None:
        """
        After the probe (which loads the module if the kernel can), the
        kernel lists C{tls} among its upper-layer protocols exactly when the
        probe says yes.
        """
        available = ktls_available()
        listed = Path("/proc/sys/net/ipv4/tcp_available_ulp")
        if not listed.exists():
            raise self.skipTest("no /proc/sys/net/ipv4/tcp_available_ulp")
        self.assertEqual("tls" in listed.read_text().split(), available)


# RFC 8448, 3 (Simple 1-RTT Handshake): application traffic secrets, and
# the keys and IVs derived from them.
CLIENT_AP = "9e40646ce79a7f9dc05af8889bce6552875afa0b06df0087f792ebb7c17504a5"
SERVER_AP = "a11af9f05531f856ad47116b45a950328204b4f44bfb6b3a4b4f1f3fcb631643"


class KeyScheduleTests(TestCase):
    def test_tls13_rfc8448(self) -> None:
        """HKDF-Expand-Label gives RFC 8448's application keys and IVs."""
        key, iv = tls13_keys(bytes.fromhex(CLIENT_AP), AES_128_GCM)
        self.assertEqual(key.hex(), "17422dda596ed5d9acd890e3c63f5051")
        self.assertEqual(iv.hex(), "5b78923dee08579033e523d9")
        key, iv = tls13_keys(bytes.fromhex(SERVER_AP), AES_128_GCM)
        self.assertEqual(key.hex(), "9f02283b6c9c07efc26bb9f2ac92e356")
        self.assertEqual(iv.hex(), "cf782b88dd83549aadf1e984")

    def test_tls13_rfc8448_record(self) -> None:
        """
        The server's key and IV decrypt RFC 8448's first application data
        record at sequence number 1 (its NewSessionTicket was 0): the nonce
        the kernel builds from L{crypto_info}'s salt and IV.
        """
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        key, iv = tls13_keys(bytes.fromhex(SERVER_AP), AES_128_GCM)
        info = crypto_info(TLS13, AES_128_GCM, key, iv, 1)
        salt, explicit = info[28:32], info[4:12]
        self.assertEqual(salt + explicit, iv)
        nonce = (int.from_bytes(iv, "big") ^ 1).to_bytes(12, "big")
        plain = AESGCM(key).decrypt(nonce, RFC8448_RECORD[5:], RFC8448_RECORD[:5])
        self.assertEqual(plain[:-1], bytes(range(50)))
        self.assertEqual(plain[-1], APPLICATION_DATA)

    def test_tls12_prf(self) -> None:
        """TLS 1.2's P_SHA256 gives the published test vector."""
        out = prf(
            bytes.fromhex("9bbe436ba940f017b17652849a71db35"),
            b"test label",
            bytes.fromhex("a0ba9f936cda311827a6f796ffd5198c"),
            100,
            "sha256",
        )
        self.assertEqual(
            out.hex(),
            "e3f229ba727be17b8d122620557cd453c2aab21d07c3d495329b52d4e61edb5a"
            "6b301791e90d35c9c9a46b4e14baf9af0fa022f7077def17abfd3797c0564bab"
            "4fbc91666e9def9b97fce34f796789baa48082d122ee42c5a72e5a5110fff701"
            "87347b66",
        )

    def test_tls12_key_block(self) -> None:
        """The key block is cut into client key, server key, client IV, server IV."""
        master, c, s = b"m" * 48, b"c" * 32, b"s" * 32
        block = prf(master, b"key expansion", s + c, 40, "sha256")
        (ck, civ), (sk, siv) = tls12_keys(master, c, s, AES_128_GCM)
        self.assertEqual(ck + sk + civ + siv, block)
        self.assertEqual((len(ck), len(civ)), (16, 4))
        (ck, civ), (sk, siv) = tls12_keys(master, c, s, CHACHA20_POLY1305)
        self.assertEqual(
            ck + sk + civ + siv, prf(master, b"key expansion", s + c, 88, "sha256")
        )
        (ck, civ), _ = tls12_keys(master, c, s, AES_256_GCM)
        self.assertEqual(ck, prf(master, b"key expansion", s + c, 72, "sha384")[:32])


class CryptoInfoTests(TestCase):
    def test_aes128_tls13(self) -> None:
        """version, cipher 51, IV's last 8 bytes, key, IV's first 4, sequence."""
        info = crypto_info(TLS13, AES_128_GCM, b"K" * 16, bytes(range(12)), 1)
        self.assertEqual(len(info), 40)
        self.assertEqual(info[:4], struct.pack("=HH", 0x0304, 51))
        self.assertEqual(info[4:12], bytes(range(4, 12)))
        self.assertEqual(info[12:28], b"K" * 16)
        self.assertEqual(info[28:32], bytes(range(4)))
        self.assertEqual(info[32:], (1).to_bytes(8, "big"))

    def test_aes_tls12(self) -> None:
        """TLS 1.2: the 4-byte salt, the explicit nonce from the sequence number."""
        info = crypto_info(TLS12, AES_256_GCM, b"K" * 32, b"SALT", 7)
        self.assertEqual(len(info), 56)
        self.assertEqual(info[:4], struct.pack("=HH", 0x0303, 52))
        self.assertEqual(info[4:12], (7).to_bytes(8, "big"))
        self.assertEqual(info[44:48], b"SALT")
        self.assertEqual(info[48:], (7).to_bytes(8, "big"))

    def test_chacha(self) -> None:
        """ChaCha20-Poly1305: the whole 12-byte IV, no salt."""
        info = crypto_info(TLS13, CHACHA20_POLY1305, b"K" * 32, bytes(range(12)), 2)
        self.assertEqual(len(info), 56)
        self.assertEqual(info[4:16], bytes(range(12)))
        self.assertEqual(info[48:], (2).to_bytes(8, "big"))

    def test_wrong_sizes(self) -> None:
        with self.assertRaises(ValueError):
            crypto_info(TLS13, AES_128_GCM, b"K" * 32, bytes(12), 0)
        with self.assertRaises(ValueError):
            crypto_info(TLS12, AES_128_GCM, b"K" * 16, bytes(12), 0)

    def test_cipher_names(self) -> None:
        """OpenSSL's names for the suites the kernel has; None for the others."""
        self.assertIs(cipher_of("TLS_AES_128_GCM_SHA256"), AES_128_GCM)
        self.assertIs(cipher_of("TLS_AES_256_GCM_SHA384"), AES_256_GCM)
        self.assertIs(cipher_of("TLS_CHACHA20_POLY1305_SHA256"), CHACHA20_POLY1305)
        self.assertIs(cipher_of("ECDHE-RSA-AES128-GCM-SHA256"), AES_128_GCM)
        self.assertIs(cipher_of("PSK-AES256-GCM-SHA384"), AES_256_GCM)
        self.assertIs(cipher_of("ECDHE-PSK-CHACHA20-POLY1305"), CHACHA20_POLY1305)
        self.assertIsNone(cipher_of("TLS_AES_128_CCM_SHA256"))
        self.assertIsNone(cipher_of("ECDHE-RSA-AES128-SHA256"))
        self.assertIsNone(cipher_of(None))


def record(kind: int, body: bytes) -> bytes:
    return bytes([kind, 3, 3]) + len(body).to_bytes(2, "big") + body


class RecordsTests(TestCase):
    def test_counts_across_pieces(self) -> None:
        """Records are counted however the stream is cut, with their ends."""
        stream = record(22, b"h" * 10) + record(20, b"\x01") + record(23, b"x" * 300)
        stream += record(23, b"")
        for cut in range(1, len(stream)):
            records = Records()
            records.feed(stream[:cut])
            records.feed(stream[cut:])
            self.assertEqual(records.count, 4)
            self.assertEqual(records.ends, [15, 21, 326, 331])
            self.assertEqual(records.after_ccs, 2)
            self.assertTrue(records.whole)

    def test_partial(self) -> None:
        """A stream that ends inside a record, or a header, is not whole."""
        records = Records()
        records.feed(record(23, b"abc")[:-1])
        self.assertFalse(records.whole)
        self.assertEqual(records.count, 0)
        records.feed(b"c" + record(23, b"")[:3])
        self.assertFalse(records.whole)
        self.assertEqual(records.count, 1)

    def test_last(self) -> None:
        """The last whole record is kept, however it came."""
        records = Records()
        first, second = record(23, b"first"), record(21, b"\x01\x00")
        records.feed(first + second[:3])
        self.assertEqual(records.last, first)
        records.feed(second[3:])
        self.assertEqual(records.last, second)

    def test_not_ticket(self) -> None:
        """The first handshake message that is not a whole NewSessionTicket."""
        ticket, key_update = b"\x04\x00\x00\x02ab", b"\x18\x00\x00\x01\x00"
        self.assertIsNone(not_ticket(ticket))
        self.assertIsNone(not_ticket(ticket * 2))
        self.assertEqual(not_ticket(ticket + key_update), 0x18)
        self.assertEqual(not_ticket(key_update + ticket), 0x18)
        self.assertEqual(not_ticket(ticket[:-1]), 4)  # cut short

    def test_records_before(self) -> None:
        records = Records(limit=2)
        records.feed(record(23, b"a") * 2)
        self.assertEqual(records.records_before(0), 0)
        self.assertEqual(records.records_before(6), 1)
        self.assertEqual(records.records_before(12), 2)
        records.feed(record(23, b"a"))
        self.assertIsNone(records.records_before(18))  # past what it kept
        self.assertEqual(records.records_before(6), 1)


# RFC 8448, 3: the server's first application data record.
RFC8448_RECORD = bytes.fromhex(
    "1703030043 2e937e11ef4ac740e538ad36005fc4a46932fc3225d05f82aa1b36e30efaf97d"
    "90e6dffc602dcb501a59a8fcc49c4bf2e5f0a21c0047c2abf332540dd032e167c2955d".replace(
        " ", ""
    )
)
