"""
What tlsd's settings make: its certificate, trust roots and pre-shared keys
read from their files (L{Material}), and the TLS connections built from them
(L{ServerCreator} for the listener, L{client_creator} for a route).

Reading is separate from use so that a reload reads the files again for new
connections, and a start-up refuses bad files in one line naming the key and
the file (L{MaterialError}).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL.SSL import (
    MODE_RELEASE_BUFFERS,
    TLS_CLIENT_METHOD,
    VERIFY_PEER,
    Connection,
    Context,
)
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    KeyPair,
    PrivateCertificate,
    TLSVersion,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from zope.interface import implementer

from ipcd.compat import pyopenssl as compat_pyopenssl
from ipcd.daemons.tls import psk
from ipcd.daemons.tls.kswitch import watch
from ipcd.regularfile import NotAFile, TooLarge, read_regular
from ipcd.tlsfactory import without_alpn

VERSIONS = {"1.2": TLSVersion.TLSv1_2, "1.3": TLSVersion.TLSv1_3}
_OPENSSL_VERSIONS = {"1.2": 0x0303, "1.3": 0x0304}  # TLS1_2_VERSION, TLS1_3_VERSION
# TLS 1.2 suites for certificates, beside the PSK ones.
CERT_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20"


class MaterialError(ValueError):
    """A file named in C{[tlsd]} cannot be used; one line, naming key and file."""


@dataclass(frozen=True)
class Material:
    """tlsd's certificate, trust roots and keys, as read from their files."""

    certificate: PrivateCertificate | None = None
    chain: tuple[Certificate, ...] = ()
    roots: tuple[Certificate, ...] | None = None  # None: the system's
    keys: Mapping[str, bytes] = field(default_factory=dict)
    min_version: str = "1.2"
    max_version: str = "1.3"
    verify_clients: bool = False
    psk_identity: str = ""
    psk_hosts: Mapping[str, str] = field(default_factory=dict)

    @property
    def serves(self) -> bool:
        """Whether a listener can authenticate itself (keys or a certificate)."""
        return self.certificate is not None or bool(self.keys)

    def identity_for(self, host: str) -> str:
        """The PSK identity to present to C{host} ("" for certificate mode)."""
        return self.psk_hosts.get(host.lower(), self.psk_identity)

    def server_context(self) -> Context:
        """A new server Context: the certificate, client checks, the keys."""
        options: dict[str, Any] = {}
        if self.certificate is not None:
            options.update(
                privateKey=self.certificate.privateKey.original,
                certificate=self.certificate.original,
                extraCertChain=[c.original for c in self.chain],
            )
        if self.verify_clients:
            options.update(
                verify=True,
                caCerts=[c.original for c in self.roots or ()],
                requireCertificate=False,  # PSK clients have none
            )
        context = CertificateOptions(
            raiseMinimumTo=VERSIONS[self.min_version],
            lowerMaximumSecurityTo=VERSIONS[self.max_version],
            **options,
        ).getContext()
        without_alpn(context)  # a client offering ALPN is not refused
        if self.keys:
            psk.use_server_keys(context, self.keys)
            context.set_cipher_list(psk.TLS12_PSK_CIPHERS + b":" + CERT_CIPHERS)
        return context

    def psk_context(self, identity: str) -> Context:
        """A client Context presenting C{identity}, that accepts only PSK."""
        context = Context(TLS_CLIENT_METHOD)
        # OpenSSL's record buffers (about 30 KiB) freed while the connection
        # is idle, as on the Contexts Twisted's CertificateOptions makes.
        context.set_mode(MODE_RELEASE_BUFFERS)
        context.set_min_proto_version(_OPENSSL_VERSIONS[self.min_version])
        context.set_max_proto_version(_OPENSSL_VERSIONS[self.max_version])
        # No trust roots: a server that answers with a certificate instead
        # of the key fails verification.
        context.set_verify(VERIFY_PEER)
        psk.use_client_key(context, identity, self.keys[identity])
        return context


@implementer(IOpenSSLServerConnectionCreator)
class ServerCreator:
    """Server connections from the current server Context (a reload swaps it)."""

    def __init__(self, context: Context) -> None:
        self.context = context
        self.watching = False  # for kernel TLS (see kswitch.watch)

    def serverConnectionForTLS(self, protocol: Any) -> Connection:  # noqa: N802
        connection = Connection(self.context)
        connection.set_app_data(protocol)  # for the PSK callback's logs
        return watch(connection) if self.watching else connection


@implementer(IOpenSSLClientConnectionCreator)
class PskClientCreator:
    """Client connections presenting one PSK identity."""

    def __init__(self, context: Context, host: str) -> None:
        self.context = context
        self.host = host

    def clientConnectionForTLS(self, protocol: Any) -> Connection:  # noqa: N802
        connection = Connection(self.context)
        connection.set_app_data(protocol)
        if not _is_address(self.host):
            connection.set_tlsext_host_name(self.host.encode("idna"))
        return connection


@implementer(IOpenSSLClientConnectionCreator)
class _Watching:
    """A client creator whose connections are watched for kernel TLS."""

    def __init__(self, creator: Any) -> None:
        self.creator = creator

    def clientConnectionForTLS(self, protocol: Any) -> Connection:  # noqa: N802
        return watch(self.creator.clientConnectionForTLS(protocol))


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def client_creator(material: Material, host: str, watching: bool = False) -> Any:
    """
    How tlsd's outbound side speaks TLS to C{host}: PSK, or certificates;
    C{watching}: its connections are watched for kernel TLS.
    """
    if watching:
        return _Watching(client_creator(material, host))
    identity = material.identity_for(host)
    if identity:
        return PskClientCreator(material.psk_context(identity), host)
    roots = material.roots
    trust = trustRootFromCertificates(list(roots)) if roots else platformTrust()
    return optionsForClientTLS(
        host,
        trustRoot=trust,
        clientCertificate=material.certificate,
        extraCertificateOptions={
            "raiseMinimumTo": VERSIONS[material.min_version],
            "lowerMaximumSecurityTo": VERSIONS[material.max_version],
        },
    )


# Reading the files.

# A certificate, key or CA file larger than this is refused, not cut
# (tlsd's, an ssl: listener's, websocketd's ca).
MAX_MATERIAL_FILE = 1 << 20


def read_file(
    where: str,
    path: str,
    limit: int = MAX_MATERIAL_FILE,
    check: Callable[[os.stat_result], None] | None = None,
) -> bytes:
    """
    C{path}'s bytes (L{read_regular}: never a FIFO waited on), C{where}
    (C{[tlsd] key}, say) naming it in errors; C{check}: of the very file
    read.
    """
    try:
        return read_regular(path, limit, check)
    except OSError as e:
        raise MaterialError(f"{where}: cannot read {path}: {e.strerror}") from None
    except NotAFile as e:
        raise MaterialError(f"{where}: {path} {e}") from None
    except TooLarge as e:  # refused, not cut
        raise MaterialError(f"{where}: {path} is {e}") from None


def read_certificates(where: str, path: str) -> list[x509.Certificate]:
    """
    The PEM certificates at C{path} (which C{where} names, C{[tlsd]
    certificate} say); L{MaterialError} when it holds none.
    """
    data = read_file(where, path)
    try:
        found = x509.load_pem_x509_certificates(data)
    except ValueError:
        found = []
    if not found:
        raise MaterialError(f"{where}: {path} holds no PEM certificate")
    return found


def _twisted(certificate: x509.Certificate) -> Certificate:
    from cryptography.hazmat.primitives.serialization import Encoding

    return Certificate.loadPEM(certificate.public_bytes(Encoding.PEM))


def read_private_key(where: str, path: str) -> bytes:
    """
    The PEM private key at C{path} (which C{where} names, C{[tlsd] key}
    say), refused with L{MaterialError} unless it is a secret (a file of
    ipcd's user that no one else may read) and an unencrypted PEM private
    key.  Checked with cryptography, which asks for no passphrase: OpenSSL's
    own loader, as Twisted calls it, would prompt for one on ipcd's
    terminal and wait.
    """
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        # Private to ipcd's user: checked on the very file read.  Read
        # first: a file that cannot be read is named as such, not as a key
        # that does not match.
        pem = read_file(where, path, check=lambda info: psk.check_private(path, info))
    except psk.SecretsError as e:
        raise MaterialError(f"{where}: {e}") from None
    try:
        load_pem_private_key(pem, password=None)
    except TypeError:  # encrypted, and no password given
        raise MaterialError(
            f"{where}: {path} is encrypted (ipcd asks no passphrase): "
            f"openssl pkey -in {path} -out KEY.pem, and name KEY.pem"
        ) from None
    except Exception:  # ValueError, UnsupportedAlgorithm: no key it can use
        raise MaterialError(f"{where}: {path} holds no PEM private key") from None
    return pem


def read_material(settings: Mapping[str, Any]) -> Material:
    """Read the files C{[tlsd]} names; L{MaterialError} names what is wrong."""
    certificate, chain = None, ()
    cert_path, key_path = settings["certificate"], settings["key"]
    if bool(cert_path) != bool(key_path):
        raise MaterialError(
            "[tlsd] certificate and key: give both (the key of the certificate) "
            "or neither"
        )
    if cert_path:
        leaf, *rest = read_certificates("[tlsd] certificate", cert_path)
        key_pem = read_private_key("[tlsd] key", key_path)
        try:
            pair = KeyPair.load(key_pem, 1)  # FILETYPE_PEM
            certificate = PrivateCertificate.fromCertificateAndKeyPair(
                _twisted(leaf), pair
            )
        except Exception as e:
            raise MaterialError(
                f"[tlsd] key: {key_path} is not the PEM private key of "
                f"{cert_path} ({type(e).__name__})"
            ) from None
        chain = tuple(_twisted(c) for c in rest)
    roots = None
    if settings["trust_roots"]:
        roots = tuple(
            _twisted(c)
            for c in read_certificates("[tlsd] trust_roots", settings["trust_roots"])
        )
    if settings["verify_clients"] and roots is None:
        raise MaterialError(
            "[tlsd] verify_clients: needs trust_roots (the CA of the clients' "
            "certificates)"
        )
    keys: dict[str, bytes] = {}
    if settings["psk_file"]:
        try:
            keys = psk.read_secrets(settings["psk_file"])
        except psk.SecretsError as e:
            raise MaterialError(f"[tlsd] psk_file: {e}") from None
        why = psk.unavailable()
        if why:
            raise MaterialError(f"[tlsd] psk_file: {why}")
    for key, identity in [("psk_identity", settings["psk_identity"])] + [
        (f"psk_hosts.{host}", name) for host, name in settings["psk_hosts"].items()
    ]:
        if identity and not settings["psk_file"]:
            raise MaterialError(
                f"[tlsd] {key}: identity {identity!r} needs its key: set psk_file "
                "(IDENTITY:HEXKEY lines)"
            )
        if identity and identity not in keys:
            raise MaterialError(
                f"[tlsd] {key}: identity {identity!r} has no key in the psk_file"
            )
    if VERSIONS[settings["min_version"]] > VERSIONS[settings["max_version"]]:
        raise MaterialError("[tlsd] min_version: above max_version")
    return Material(
        certificate=certificate,
        chain=chain,
        roots=roots,
        keys=keys,
        min_version=settings["min_version"],
        max_version=settings["max_version"],
        verify_clients=settings["verify_clients"],
        psk_identity=settings["psk_identity"],
        psk_hosts={h.lower(): i for h, i in settings["psk_hosts"].items()},
    )


def verify_error(connection: Connection) -> str | None:
    """Why OpenSSL did not accept the peer's certificate, if it did not."""
    lib, ffi = psk.openssl()
    ssl = compat_pyopenssl.ssl_pointer(connection)
    if ssl is None:
        return None  # this pyOpenSSL does not say (see ipcd.compat)
    code = lib.SSL_get_verify_result(ssl)
    if code == 0:  # X509_V_OK
        return None
    return ffi.string(lib.X509_verify_cert_error_string(code)).decode()


def certificate_labels(certificate: x509.Certificate) -> list[str]:
    """C{cert:COMMON-NAME} and C{cert-san:DNS-NAME} labels of a peer's certificate."""
    labels = [
        f"cert:{attribute.value}"
        for attribute in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ]
    try:
        names = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    labels.extend(f"cert-san:{name}" for name in names)
    return labels
