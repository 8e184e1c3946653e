"""
The kernel's side of kernel TLS, with no handshake: keys made up here are
given to a loopback TCP connection's ends (C{TCP_ULP} C{tls}, then
C{SOL_TLS} C{TLS_TX}/C{TLS_RX}), and what the kernel puts on the wire is
decrypted here by the record layer's rules (RFC 8446 5.2-5.3, RFC 5288).
It pins what the handoff relies on: the crypto_info layout (salt = IV's
first 4 bytes, the rest as C{iv}), the sequence number's meaning, and a TX
end talking to an RX end with the same keys.

Skipped where the kernel has no C{tls} upper-layer protocol; the VM test
(L{ipcd.test.test_kernel_tls_vm}) runs it in a kernel that has it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.trial.unittest import TestCase

from ipcd.daemons.tls.ktls import SOL_TLS, TCP_ULP, TLS_RX, TLS_TX, ktls_available
from ipcd.test.ktlssupport import NO_ULP, WAIT, tcp_pair

TLS_1_2 = 0x0303
TLS_1_3 = 0x0304
AES_GCM_128 = 51  # TLS_CIPHER_AES_GCM_128, linux/tls.h
APPLICATION_DATA = 23


def crypto_info(version: int, key: bytes, iv: bytes, seq: int) -> bytes:
    """linux/tls.h's tls12_crypto_info_aes_gcm_128 for a 12-byte IV."""
    return struct.pack(
        "=HH8s16s4s8s",
        version,
        AES_GCM_128,
        iv[4:],
        key,
        iv[:4],
        seq.to_bytes(8, "big"),
    )


def switch(sock: socket.socket, direction: int, info: bytes) -> None:
    with contextlib.suppress(FileExistsError):  # the second direction
        sock.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
    sock.setsockopt(SOL_TLS, direction, info)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"EOF after {len(data)} of {n} bytes")
        data += chunk
    return data


def read_record(sock: socket.socket) -> tuple[bytes, bytes]:
    """One TLS record from plain socket C{sock}: (header, body)."""
    header = recv_exactly(sock, 5)
    return header, recv_exactly(sock, struct.unpack("!H", header[3:])[0])


class KernelTlsTests(TestCase):
    if not ktls_available():
        skip = NO_ULP

    key = bytes(range(16))
    iv = bytes(range(100, 112))

    def test_tls13_records(self) -> None:
        """
        A TLS 1.3 TX end sends application data records, each sealed with
        nonce = IV xor its sequence number (starting from the one given)
        and the inner content type appended, as a peer in user space opens
        them; no plaintext on the wire.
        """
        with tcp_pair() as (near, far):
            switch(near, TLS_TX, crypto_info(TLS_1_3, self.key, self.iv, 5))
            for seq, text in ((5, b"first record"), (6, b"second")):
                near.sendall(text)
                header, body = read_record(far)
                self.assertEqual(header[:3], bytes([APPLICATION_DATA, 3, 3]))
                self.assertNotIn(text, body)
                pad = seq.to_bytes(12, "big")
                nonce = bytes(a ^ b for a, b in zip(self.iv, pad, strict=True))
                opened = AESGCM(self.key).decrypt(nonce, body, header)
                self.assertEqual(opened, text + bytes([APPLICATION_DATA]))

    def test_tls12_records(self) -> None:
        """
        A TLS 1.2 TX end sends records of explicit nonce (8 bytes) and
        ciphertext, sealed with nonce = salt + explicit nonce and the
        additional data seq, type, version, length (RFC 5246 6.2.3.3).
        """
        with tcp_pair() as (near, far):
            switch(near, TLS_TX, crypto_info(TLS_1_2, self.key, self.iv, 1))
            for seq, text in ((1, b"first record"), (2, b"second")):
                near.sendall(text)
                header, body = read_record(far)
                self.assertEqual(header[:3], bytes([APPLICATION_DATA, 3, 3]))
                explicit, sealed = body[:8], body[8:]
                aad = seq.to_bytes(8, "big") + header[:3]
                aad += struct.pack("!H", len(sealed) - 16)
                opened = AESGCM(self.key).decrypt(self.iv[:4] + explicit, sealed, aad)
                self.assertEqual(opened, text)

    def test_both_ends_both_ways(self) -> None:
        """
        Two kTLS ends with matching keys and sequence numbers (one per
        direction, the server's TX starting at 1 as after a TLS 1.3
        handshake's ticket) carry 1 MiB each way, intact.
        """
        keys = {"up": os.urandom(16), "down": os.urandom(16)}
        ivs = {"up": os.urandom(12), "down": os.urandom(12)}
        for version in (TLS_1_3, TLS_1_2):
            with tcp_pair() as (near, far):
                up = crypto_info(version, keys["up"], ivs["up"], 0)
                down = crypto_info(version, keys["down"], ivs["down"], 1)
                switch(near, TLS_TX, up)
                switch(near, TLS_RX, down)
                switch(far, TLS_RX, up)
                switch(far, TLS_TX, down)
                for sender, receiver in ((near, far), (far, near)):
                    data = os.urandom(2**20)
                    writer = threading.Thread(target=sender.sendall, args=(data,))
                    writer.start()
                    try:
                        received = recv_exactly(receiver, len(data))
                    finally:
                        writer.join(WAIT)
                    self.assertEqual(received, data)
