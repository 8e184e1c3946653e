"""
What L{ipcd.daemons.tls.kswitch} would give the kernel, checked without a
kernel: two watched pyOpenSSL connections talk through their memory BIOs
(with records coming in pieces), then each one's plan must open the next
record its peer makes, and the peer's plan must open its own: the keys and
sequence numbers are exactly the ones OpenSSL goes on with.  TLS 1.3 and
1.2, each AEAD the kernel takes, certificates and PSK.  And two real ipcd
hosts reach a plan through Twisted's TLS, then fall back to the relay when
the kernel refuses.
"""

from __future__ import annotations

import datetime
import socket
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from OpenSSL.SSL import (
    TLS1_2_VERSION,
    TLS1_3_VERSION,
    TLS_CLIENT_METHOD,
    TLS_SERVER_METHOD,
    Connection,
    Context,
    WantReadError,
)
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from ipcd.daemons.tls import daemon, psk
from ipcd.daemons.tls.kswitch import plan, watch, watchable
from ipcd.daemons.tls.ktls import (
    APPLICATION_DATA,
    HANDSHAKE,
    Direction,
    ktls_available,
    open_record,
)
from ipcd.test.support import wait_until
from ipcd.test.test_tls import TlsTestCase
from ipcd.test.test_tlsrelay import fast_sides
from ipcd.test.tlssupport import ALICE_KEY


def _certificate() -> tuple[Any, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kTLS test")])
    when = datetime.datetime(2020, 1, 1)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(when)
        .not_valid_after(when.replace(year=2100))
        .sign(key, hashes.SHA256())
    )
    return crypto.X509.from_cryptography(cert), crypto.PKey.from_cryptography_key(key)


def open_data(version: int, cipher: Any, way: Direction, record: bytes) -> bytes:
    """Decrypt one TLS record of data as the kernel would with C{way}."""
    kind, plain = open_record(version, cipher, way, record)
    assert kind == APPLICATION_DATA, kind
    return plain


def seal_record(way: Direction, kind: int, content: bytes) -> bytes:
    """A TLS 1.3 AES-GCM record as a peer would make it with C{way}."""
    seq = way.sequence.to_bytes(8, "big")
    nonce = bytes(a ^ b for a, b in zip(way.iv, bytes(4) + seq, strict=True))
    inner = content + bytes([kind])
    header = b"\x17\x03\x03" + (len(inner) + 16).to_bytes(2, "big")
    return header + AESGCM(way.key).encrypt(nonce, inner, header)


# TLS 1.3 handshake messages: a NewSessionTicket (lifetime 3600 s, a
# one-byte nonce, a 4-byte ticket) and a KeyUpdate asking for the peer's.
TICKET = bytes.fromhex("0400001200000e100000000001000004616263640000")
KEY_UPDATE = b"\x18\x00\x00\x01\x01"


class PlanTests(TestCase):
    if not watchable():
        skip = "this pyOpenSSL does not let connections be watched"

    def pair(
        self, version: int, tls13: bytes = b"", tls12: bytes = b"", key: bool = False
    ) -> tuple[Connection, Connection]:
        server_context = Context(TLS_SERVER_METHOD)
        client_context = Context(TLS_CLIENT_METHOD)
        for context in (server_context, client_context):
            context.set_max_proto_version(version)
            if tls13:
                context.set_tls13_ciphersuites(tls13)
            if tls12:
                context.set_cipher_list(tls12)
        if key:
            psk.use_server_keys(server_context, {"alice": b"k" * 32})
            psk.use_client_key(client_context, "alice", b"k" * 32)
        else:
            cert, private = _certificate()
            server_context.use_certificate(cert)
            server_context.use_privatekey(private)
        server = watch(Connection(server_context))
        client = watch(Connection(client_context))
        server.set_accept_state()
        client.set_connect_state()
        return client, server

    def exchange(self, client: Connection, server: Connection) -> None:
        """
        The handshake, then tlsd's request and answer, records fed 7 bytes
        at a time and read as they come (as Twisted's TLS does).
        """
        self.got: dict[Connection, bytes] = {client: b"", server: b""}
        for _ in range(20):
            for end in (client, server):
                try:
                    end.do_handshake()
                except WantReadError:
                    pass
            self.pump(client, server)
        client.send(b"pong")
        self.pump(client, server)
        self.assertEqual(self.got[server], b"pong")
        server.send(b"ok")
        self.pump(client, server)
        self.assertEqual(self.got[client], b"ok")

    def pump(self, client: Connection, server: Connection) -> None:
        for a, b in ((client, server), (server, client)):
            try:
                data = a.bio_read(1 << 16)
            except WantReadError:
                continue
            for at in range(0, len(data), 7):
                b.bio_write(data[at : at + 7])
                if b.get_state_string() == b"SSL negotiation finished successfully":
                    try:
                        self.got[b] += b.recv(1 << 16)
                    except WantReadError:
                        pass

    def check(self, client: Connection, server: Connection) -> None:
        self.exchange(client, server)
        on_client, on_server = plan(client, True), plan(server, False)
        self.assertNotIsInstance(on_client, str)
        self.assertNotIsInstance(on_server, str)
        version, cipher, client_tx, client_rx = on_client
        _, _, server_tx, server_rx = on_server
        self.assertEqual((client_tx, client_rx), (server_rx, server_tx))
        # The next record each makes opens with the other's plan.
        server.send(b"to the client")
        self.assertEqual(
            open_data(version, cipher, client_rx, server.bio_read(1 << 16)),
            b"to the client",
        )
        client.send(b"to the server")
        self.assertEqual(
            open_data(version, cipher, server_rx, client.bio_read(1 << 16)),
            b"to the server",
        )

    def test_tls13_aes128(self) -> None:
        self.check(*self.pair(TLS1_3_VERSION, tls13=b"TLS_AES_128_GCM_SHA256"))

    def test_tls13_aes256(self) -> None:
        self.check(*self.pair(TLS1_3_VERSION, tls13=b"TLS_AES_256_GCM_SHA384"))

    def test_tls13_chacha(self) -> None:
        self.check(*self.pair(TLS1_3_VERSION, tls13=b"TLS_CHACHA20_POLY1305_SHA256"))

    def test_tls13_psk(self) -> None:
        self.check(*self.pair(TLS1_3_VERSION, key=True))

    def test_tls12_aes128(self) -> None:
        self.check(*self.pair(TLS1_2_VERSION, tls12=b"ECDHE-ECDSA-AES128-GCM-SHA256"))

    def test_tls12_aes256(self) -> None:
        self.check(*self.pair(TLS1_2_VERSION, tls12=b"ECDHE-ECDSA-AES256-GCM-SHA384"))

    def test_tls12_chacha(self) -> None:
        self.check(*self.pair(TLS1_2_VERSION, tls12=b"ECDHE-ECDSA-CHACHA20-POLY1305"))

    def test_tls12_psk(self) -> None:
        self.check(*self.pair(TLS1_2_VERSION, tls12=psk.TLS12_PSK_CIPHERS, key=True))

    def test_not_exact(self) -> None:
        """Bytes of a record not read yet, or decrypted and not read: no plan."""
        client, server = self.pair(TLS1_3_VERSION)
        self.exchange(client, server)
        server.send(b"x" * 100)
        record = server.bio_read(1 << 16)
        client.bio_write(record[:10])
        self.assertEqual(plan(client, True), "records received and not read yet")
        client.bio_write(record[10:])
        self.assertEqual(client.recv(1), b"x")
        self.assertEqual(plan(client, True), "records received and not read yet")
        self.assertEqual(client.recv(1000), b"x" * 99)
        self.assertNotIsInstance(plan(client, True), str)

    def test_key_update(self) -> None:
        """
        A TLS 1.3 KeyUpdate from the peer before the switch (OpenSSL took
        the new keys, and answered with its own): no plan, where the count
        of records would have given the kernel the old keys.  A ticket at
        the same place changes nothing.
        """
        for message, planned in ((TICKET, True), (KEY_UPDATE, False)):
            client, server = self.pair(TLS1_3_VERSION, tls13=b"TLS_AES_128_GCM_SHA256")
            self.exchange(client, server)
            _, _, server_tx, _ = plan(server, False)
            client.bio_write(seal_record(server_tx, HANDSHAKE, message))
            with self.assertRaises(WantReadError):
                client.recv(1)
            self.pump(client, server)  # its answer, if it has one, went out
            on_client = plan(client, True)
            if planned:
                self.assertNotIsInstance(on_client, str)
            else:
                self.assertEqual(
                    on_client,
                    "a handshake step after the handshake (key update, renegotiation)",
                )

    def test_renegotiation(self) -> None:
        """
        A TLS 1.2 server asks for a renegotiation before the switch: its
        client has begun a new handshake (a new client random, the old keys
        still in use), so no plan.
        """
        client, server = self.pair(
            TLS1_2_VERSION, tls12=b"ECDHE-ECDSA-AES128-GCM-SHA256"
        )
        self.exchange(client, server)
        server.renegotiate()
        server.do_handshake()  # its HelloRequest
        client.bio_write(server.bio_read(1 << 16))
        with self.assertRaises(WantReadError):
            client.recv(1)
        client.bio_read(1 << 16)  # its ClientHello, sent as to_kernel sends it
        self.assertEqual(plan(client, True), "the keys changed after the handshake")

    def test_cipher_the_kernel_lacks(self) -> None:
        client, server = self.pair(TLS1_3_VERSION, tls13=b"TLS_AES_128_CCM_SHA256")
        self.exchange(client, server)
        self.assertIn("does not take TLS_AES_128_CCM_SHA256", plan(client, True))

    def test_unwatched(self) -> None:
        self.assertEqual(
            plan(Connection(Context(TLS_CLIENT_METHOD)), True),
            "not watched from its start",
        )


class RouteFallbackTests(TlsTestCase):
    """
    Two real ipcd hosts told kernel TLS is here when it is not: their
    connections are watched through Twisted's TLS, the exchange leaves
    each exactly countable (the plan is made), the kernel then refuses the
    ULP, and each connection stays on the relay, which works.
    """

    kernel_tls = True

    if ktls_available():
        skip = "this kernel has kTLS: the switch would succeed"
    elif not watchable():
        skip = "this pyOpenSSL does not let connections be watched"

    def setUp(self) -> None:
        super().setUp()
        self.patch(daemon, "kernel_tls_here", lambda: True)

    @inlineCallbacks
    def falls_back(self, a: Any, b: Any) -> Any:
        sock = yield self.assertPong(a, b.route("pong"))
        self.assertEqual(sock.family, socket.AF_UNIX)
        self.assertEqual((fast_sides(a), fast_sides(b)), (2, 2))
        refused = "relaying TLS, not kernel TLS: the kernel refused TLS on this socket"
        yield wait_until(
            lambda: sum(refused in line for line in self.logged) == 2,
            "both hosts to plan the switch and be refused by the kernel",
        )
        sock.close()

    @inlineCallbacks
    def test_psk13(self) -> Any:
        b = yield self.psk_server(["allow in pong psk:alice"], alice=ALICE_KEY)
        a = yield self.psk_client("alice", ALICE_KEY)
        yield self.falls_back(a, b)

    @inlineCallbacks
    def test_psk12(self) -> Any:
        b = yield self.psk_server(["allow in pong psk:alice"], alice=ALICE_KEY)
        a = yield self.psk_client("alice", ALICE_KEY, max_version="1.2")
        yield self.falls_back(a, b)

    @inlineCallbacks
    def test_certificates(self) -> Any:
        a, b, _ = yield self.certificateHosts()
        yield self.falls_back(a, b)
