"""
What tlsd's material builds, checked by real in-memory handshakes: a PSK
client that accepts nothing but its key (no certificate, no older TLS than
configured), the names it sends, and what a certificate file gives.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from cryptography import x509
from OpenSSL.SSL import (
    MODE_RELEASE_BUFFERS,
    TLS1_2_VERSION,
    TLS_SERVER_METHOD,
    Connection,
    Context,
)
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from ipcd.compat import pyopenssl as compat_pyopenssl
from ipcd.daemons.tls import psk
from ipcd.daemons.tls.material import (
    Material,
    MaterialError,
    PskClientCreator,
    ServerCreator,
    _is_address,
    certificate_labels,
    client_creator,
    read_material,
    verify_error,
)
from ipcd.lazytls import LazyStart
from ipcd.test.support import short_rundir
from ipcd.test.test_pskfile import KEY, _pump
from ipcd.test.test_tlsmaterial import settings
from ipcd.test.tlssupport import TestCA
from ipcd.tlsfactory import GuardedTLSListens, TLSFactory

ALICE = {"alice": bytes.fromhex(KEY)}


def _psk_server(max_version: int | None = None) -> Context:
    context = Context(TLS_SERVER_METHOD)
    psk.use_server_keys(context, ALICE)
    context.set_cipher_list(psk.TLS12_PSK_CIPHERS)
    if max_version is not None:
        context.set_max_proto_version(max_version)
    return context


class PskClientTests(SynchronousTestCase):
    def test_onlyTheKey(self) -> None:
        """A server with a certificate and no key: refused, under TLS 1.3 too."""
        material = Material(keys=ALICE)
        self.assertTrue(_pump(material.psk_context("alice"), _psk_server())[0])
        issued = TestCA(short_rundir(self, "ipcd-ctx-")).issue("server")
        server = Context(TLS_SERVER_METHOD)
        server.use_certificate_file(issued.cert)
        server.use_privatekey_file(issued.key)
        self.assertFalse(_pump(material.psk_context("alice"), server)[0])

    def test_minimumVersion(self) -> None:
        """min_version 1.3: a server that speaks at most TLS 1.2 is refused."""
        older = _psk_server(TLS1_2_VERSION)
        self.assertTrue(_pump(Material(keys=ALICE).psk_context("alice"), older)[0])
        material = Material(keys=ALICE, min_version="1.3")
        self.assertFalse(_pump(material.psk_context("alice"), older)[0])

    def test_serverNameAndAppData(self) -> None:
        """A host name is sent as SNI, an address is not; the protocol is kept."""
        context = Material(keys=ALICE).psk_context("alice")
        protocol = object()
        named = PskClientCreator(context, "db.example").clientConnectionForTLS(protocol)
        self.assertEqual(named.get_servername(), b"db.example")
        self.assertIs(named.get_app_data(), protocol)
        for address in ("192.0.2.1", "2001:db8::1"):
            bare = PskClientCreator(context, address).clientConnectionForTLS(None)
            self.assertIsNone(bare.get_servername())
        served = ServerCreator(_psk_server()).serverConnectionForTLS(protocol)
        self.assertIs(served.get_app_data(), protocol)

    def test_isAddress(self) -> None:
        for host, expected in [
            ("192.0.2.1", True),
            ("::1", True),
            ("db.example", False),
            ("", False),
        ]:
            self.assertIs(_is_address(host), expected, host)

    def test_verifyErrorOnlyWhenThereIsOne(self) -> None:
        self.assertIsNone(verify_error(Connection(_psk_server(), None)))


class CertificateFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = short_rundir(self, "ipcd-ctx-")
        self.ca = TestCA(self.dir)

    def test_chainKept(self) -> None:
        """Certificates after the first in the file are its chain, in order."""
        issued = self.ca.issue("server")
        with open(issued.cert, "ab") as f, open(self.ca.path, "rb") as ca:
            f.write(ca.read())
        material = read_material(settings(certificate=issued.cert, key=issued.key))
        self.assertEqual(len(material.chain), 1)
        self.assertEqual(material.chain[0].getSubject().commonName, b"ipcd test CA")  # type: ignore[union-attr]
        self.assertRaises(
            dataclasses.FrozenInstanceError, setattr, material, "chain", ()
        )

    def test_sizeBound(self) -> None:
        """A file of 1 MiB is read whole; a byte more is refused, not cut."""
        issued = self.ca.issue("server")
        with open(issued.cert, "rb") as f:
            pem = f.read()
        padding = b"#" * ((1 << 20) - len(pem) - 1) + b"\n"
        with open(issued.cert, "wb") as f:
            f.write(padding + pem)
        given = settings(certificate=issued.cert, key=issued.key)
        self.assertIsNotNone(read_material(given).certificate)
        with open(issued.cert, "wb") as f:
            f.write(b"#" + padding + pem)
        error = self.assertRaises(MaterialError, read_material, given)
        self.assertEqual(
            str(error), f"[tlsd] certificate: {issued.cert} is larger than 1 MiB"
        )

    def test_labelsWithoutNames(self) -> None:
        """A certificate without alternative names: its common name alone."""
        issued = self.ca.issue("plain", dns=(), ips=())
        with open(issued.cert, "rb") as f:
            certificate: Any = x509.load_pem_x509_certificate(f.read())
        self.assertEqual(certificate_labels(certificate), ["cert:plain"])
        issued = self.ca.issue("named", dns=("a.example",), ips=())
        with open(issued.cert, "rb") as f:
            certificate = x509.load_pem_x509_certificate(f.read())
        self.assertEqual(
            certificate_labels(certificate), ["cert:named", "cert-san:a.example"]
        )


def _releases_buffers(connection: Connection) -> bool:
    """Whether C{connection} frees OpenSSL's record buffers while idle."""
    lib, _ = compat_pyopenssl.bindings()
    ssl = compat_pyopenssl.ssl_pointer(connection)
    return bool(lib.SSL_set_mode(ssl, 0) & MODE_RELEASE_BUFFERS)  # (0: reads it)


def _handshaking(factory: Any) -> Connection:
    """The connection of a protocol of TLS C{factory}, its handshake begun."""
    tls = factory.buildProtocol(None)
    tls.makeConnection(StringTransport())
    if isinstance(tls, LazyStart):  # a server's: the peer's first byte
        tls.dataReceived(b"\x16")
    connection: Connection = tls.getHandle()
    return connection


def _made(creator: Any, is_client: bool) -> Connection:
    """A connection of C{creator}, as tlsd's TLS makes it."""
    factory = TLSFactory(creator, is_client, Factory.forProtocol(Protocol), Clock())
    return _handshaking(factory)


class IdleBuffersTests(SynchronousTestCase):
    """
    Every TLS connection tlsd and websocketd make frees OpenSSL's record
    buffers (about 30 KiB) while it is idle: an idle relay, or a peer that
    sends nothing, does not hold them.
    """

    def setUp(self) -> None:
        self.dir = short_rundir(self, "ipcd-ctx-")
        self.issued = TestCA(self.dir).issue("server")

    def test_tlsdPsk(self) -> None:
        """tlsd with keys: its listener's connections, and the routes' (PSK)."""
        material = Material(keys=ALICE, psk_identity="alice")
        server = ServerCreator(material.server_context())
        self.assertTrue(_releases_buffers(_made(server, False)))
        for watching in (False, True):
            creator = client_creator(material, "example.com", watching)
            self.assertTrue(_releases_buffers(_made(creator, True)))

    def test_tlsdCertificates(self) -> None:
        """tlsd with a certificate: its listener's connections, and the routes'."""
        material = read_material(
            settings(certificate=self.issued.cert, key=self.issued.key)
        )
        server = ServerCreator(material.server_context())
        self.assertTrue(_releases_buffers(_made(server, False)))
        creator = client_creator(material, "localhost")
        self.assertTrue(_releases_buffers(_made(creator, True)))

    def test_sslListener(self) -> None:
        """An C{ssl:} listener (websocketd's, tcpd's), speaking TLS as tlsd's."""
        reactor = MemoryReactor()
        listen = f"ssl:0:privateKey={self.issued.key}:certKey={self.issued.cert}"
        serverFromString(GuardedTLSListens(reactor), listen).listen(
            Factory.forProtocol(Protocol)
        )
        self.assertTrue(_releases_buffers(_handshaking(reactor.tcpServers[0][1])))
