"""
Helpers for tlsd's tests: a test CA and certificates made with
C{cryptography}, secrets files, and in-process ipcd "hosts" with tlsd on an
ephemeral loopback port.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase

from ipcd.tap import IPCDService
from ipcd.test.support import make_config, short_rundir, start_ipcd, wait_until

TLS_LISTEN = "tcp:0:interface=127.0.0.1"
ALICE_KEY = "a1" * 16
BOB_KEY = "b0" * 16


@dataclass
class Issued:
    """A certificate and its key, as PEM files."""

    cert: str
    key: str


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(path: str, data: bytes, mode: int = 0o600) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with open(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
    return path


def _key_pem(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class TestCA:
    """A certificate authority made for one test, writing into C{directory}."""

    def __init__(self, directory: str, name: str = "ipcd test CA") -> None:
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                True,
            )
            .sign(self.key, hashes.SHA256())
        )
        slug = name.replace(" ", "-")
        self.path = _write(
            os.path.join(directory, f"{slug}.pem"),
            self.certificate.public_bytes(serialization.Encoding.PEM),
            0o644,
        )

    def issue(
        self,
        common_name: str,
        dns: tuple[str, ...] = ("localhost",),
        ips: tuple[str, ...] = ("127.0.0.1",),
        expired: bool = False,
    ) -> Issued:
        """A leaf certificate for C{common_name} (and SANs), with its key."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        start = now - datetime.timedelta(days=10 if expired else 1)
        end = (
            now - datetime.timedelta(days=2)
            if expired
            else now + (datetime.timedelta(days=10))
        )
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), False)
        certificate = builder.sign(self.key, hashes.SHA256())
        base = os.path.join(self.directory, common_name)
        return Issued(
            cert=_write(
                f"{base}.crt",
                certificate.public_bytes(serialization.Encoding.PEM),
                0o644,
            ),
            key=_write(f"{base}.key", _key_pem(key)),
        )


def secrets_file(directory: str, lines: dict[str, str], mode: int = 0o600) -> str:
    """A PSK secrets file of C{IDENTITY:HEXKEY} lines."""
    text = "".join(f"{identity}:{key}\n" for identity, key in lines.items())
    return _write(os.path.join(directory, "psk.txt"), text.encode(), mode)


@dataclass
class TlsHost:
    """One in-process ipcd with tlsd, standing for a host."""

    service: IPCDService
    rundir: str
    port: int | None

    @property
    def tls_state(self) -> Any:
        """tlsd's state (L{ipcd.daemons.tls.daemon.TlsState}), owned by its service."""
        return self.service.getServiceNamed("tlsd").state

    @property
    def broker(self) -> Any:
        return self.service.broker

    def route(self, service: str, host: str = "localhost") -> str:
        return f"tls://{host}:{self.port}/{service}"


@inlineCallbacks
def start_tls_host(
    case: SynchronousTestCase,
    tlsd: dict[str, Any],
    rules: list[str] | tuple[str, ...] = (),
    pongd: bool = True,
    **overrides: Any,
) -> Any:
    """
    Start an ipcd with tlsd (C{tlsd}: its section) and pongd; stopped after.
    Kernel TLS only for a test case that says C{kernel_tls = True}: the
    others test the relays, whatever the kernel has.
    """
    rundir = short_rundir(case, "ipcd-tls-")
    tlsd = {"kernel_tls": getattr(case, "kernel_tls", False), **tlsd}

    def load() -> Any:
        # Each call a new configuration, as a reload reads the files again.
        return make_config(
            rundir,
            tlsd={"listen": TLS_LISTEN, **tlsd},
            rules=list(rules),
            pongd={"enabled": pongd},
            **overrides,
        )

    service = yield start_ipcd(case, load(), load)
    tls = service.getServiceNamed("tlsd")
    port = None
    if tls.listener is not None:
        listening = yield tls.listening()
        port = getattr(listening.getHost(), "port", None)  # (None: unix:)
    case.addCleanup(wait_until, lambda: not service.broker.relays, "relays to end")
    return TlsHost(service, rundir, port)
