"""
tlsd's files: the secrets file's format and permissions, and the one-line
errors naming the key and the file when what C{[tlsd]} names cannot be used.
"""

from __future__ import annotations

import os
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    PrivateFormat,
)
from OpenSSL.SSL import TLS_SERVER_METHOD, Connection, Context
from twisted.trial.unittest import SynchronousTestCase

from ipcd.config import ConfigError, load_config
from ipcd.daemons import StartupError
from ipcd.daemons.tls.daemon import tlsd
from ipcd.daemons.tls.material import MaterialError, ServerCreator, read_material
from ipcd.daemons.tls.psk import SecretsError, parse_secrets
from ipcd.options import Options
from ipcd.test.support import short_rundir
from ipcd.test.tlssupport import ALICE_KEY, TestCA, secrets_file


def settings(**given: Any) -> dict[str, Any]:
    """tlsd's section with its defaults, and C{given}."""
    return {**{s.key: s.default for s in tlsd.settings}, **given}


class SecretsFormatTests(SynchronousTestCase):
    def test_parsed(self) -> None:
        text = f"# keys\n\nalice:{ALICE_KEY}\nbob:{'B0' * 32}\n"
        self.assertEqual(
            parse_secrets(text),
            {"alice": bytes.fromhex(ALICE_KEY), "bob": bytes.fromhex("b0" * 32)},
        )

    def test_refused(self) -> None:
        for text, said in [
            ("alice", "expected IDENTITY:HEXKEY"),
            (f":{ALICE_KEY}", "expected IDENTITY:HEXKEY"),
            ("alice:zz", "not hexadecimal"),
            ("alice:" + "ab" * 15, "key of 15 bytes"),
            (f"al ice:{ALICE_KEY}", "printable ASCII, no spaces"),
            (f"alice:{ALICE_KEY}\nalice:{ALICE_KEY}", "given twice"),
        ]:
            with self.assertRaises(SecretsError) as caught:
                parse_secrets(text, "psk.txt")
            message = str(caught.exception)
            self.assertIn(said, message)
            self.assertTrue(message.startswith("psk.txt line "), message)
            self.assertNotIn("\n", message)


class MaterialTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = short_rundir(self, "ipcd-tls-m-")

    def refused(self, **given: Any) -> str:
        with self.assertRaises(MaterialError) as caught:
            read_material(settings(**given))
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        # At start: the same line, and the way out.
        with self.assertRaises(StartupError) as started:
            tlsd.verify(None, settings(**given))
        self.assertEqual(str(started.exception), f"{message} (fix it, or use --no-tls)")
        return message

    def test_secretsModeAndOwner(self) -> None:
        path = secrets_file(self.dir, {"alice": ALICE_KEY}, mode=0o640)
        self.assertEqual(
            self.refused(psk_file=path),
            f"[tlsd] psk_file: {path} is readable by group or others "
            f"(mode 0640): chmod 600 {path}",
        )
        if os.geteuid() == 0:
            os.chmod(path, 0o600)
            os.chown(path, 65534, -1)
            self.assertIn("is owned by uid 65534", self.refused(psk_file=path))

    def test_missingFiles(self) -> None:
        missing = os.path.join(self.dir, "nope")
        self.assertIn("No such file", self.refused(psk_file=missing))
        self.assertIn(
            "[tlsd] trust_roots: cannot read", self.refused(trust_roots=missing)
        )

    def test_certificateNeedsItsKey(self) -> None:
        ca = TestCA(self.dir)
        issued, other = ca.issue("one"), ca.issue("two")
        self.assertIn("give both", self.refused(certificate=issued.cert))
        self.assertIn(
            "is not the PEM private key of",
            self.refused(certificate=issued.cert, key=other.key),
        )
        os.chmod(issued.key, 0o644)
        self.assertIn(
            "[tlsd] key: ", self.refused(certificate=issued.cert, key=issued.key)
        )
        self.assertIn("holds no PEM certificate", self.refused(trust_roots=issued.key))

    def test_keyNotAKey(self) -> None:
        """
        A key file that holds no key, or an encrypted one, says so and the
        way out, not that it is not the certificate's key.
        """
        issued = TestCA(self.dir).issue("one")
        os.chmod(issued.key, 0o600)
        with open(issued.key, "wb") as f:
            f.write(b"not a key\n")
        self.assertEqual(
            self.refused(certificate=issued.cert, key=issued.key),
            f"[tlsd] key: {issued.key} holds no PEM private key",
        )
        key = ec.generate_private_key(ec.SECP256R1())
        with open(issued.key, "wb") as f:
            f.write(
                key.private_bytes(
                    Encoding.PEM,
                    PrivateFormat.PKCS8,
                    BestAvailableEncryption(b"secret"),
                )
            )
        self.assertEqual(
            self.refused(certificate=issued.cert, key=issued.key),
            f"[tlsd] key: {issued.key} is encrypted (ipcd asks no passphrase): "
            f"openssl pkey -in {issued.key} -out KEY.pem, and name KEY.pem",
        )

    def test_keyFileNamedForWhatIsWrong(self) -> None:
        """
        A private key file that cannot be read as a file is refused as such
        (too large, here), not as a key that does not match the certificate.
        """
        issued = TestCA(self.dir).issue("one")
        with open(issued.key, "ab") as f:
            f.write(b"#" * (1 << 20))
        self.assertEqual(
            self.refused(certificate=issued.cert, key=issued.key),
            f"[tlsd] key: {issued.key} is larger than 1 MiB",
        )

    def test_identitiesNeedKeys(self) -> None:
        path = secrets_file(self.dir, {"alice": ALICE_KEY})
        self.assertEqual(
            self.refused(psk_file=path, psk_hosts={"b.example": "bob"}),
            "[tlsd] psk_hosts.b.example: identity 'bob' has no key in the psk_file",
        )
        # No psk_file at all: that is what to fix, not a key missing in it.
        self.assertEqual(
            self.refused(psk_identity="alice"),
            "[tlsd] psk_identity: identity 'alice' needs its key: set psk_file "
            "(IDENTITY:HEXKEY lines)",
        )

    def test_verifyClientsNeedsRoots(self) -> None:
        self.assertIn("needs trust_roots", self.refused(verify_clients=True))

    def test_versions(self) -> None:
        self.assertIn(
            "above max_version", self.refused(min_version="1.3", max_version="1.2")
        )


class OptionsTests(SynchronousTestCase):
    def test_flags(self) -> None:
        """C{--tls ENDPOINT} sets C{[tlsd] listen}; C{--no-tls} wins."""
        options = Options()
        options.parseOptions(["--tls", "tcp:9443:interface=127.0.0.1"])
        section = options.config.daemons["tlsd"]
        self.assertEqual(section["listen"], "tcp:9443:interface=127.0.0.1")
        self.assertTrue(section["enabled"])
        options = Options()
        options.parseOptions(["--tls", "tcp:9443", "--no-tls"])
        self.assertFalse(options.config.daemons["tlsd"]["enabled"])

    def test_section(self) -> None:
        """C{[tlsd]} keys are checked, in one line naming key and value."""
        config = load_config(
            None, {"tlsd": {"min_version": "1.3", "psk_hosts": {"b": "alice"}}}, {}
        )
        self.assertEqual(config.daemons["tlsd"]["psk_hosts"], {"b": "alice"})
        for section, said in [
            (
                {"min_version": "1.1"},
                "[tlsd] min_version: expected one of '1.2', '1.3'",
            ),
            # A TOML array or table: one line, not a traceback (TypeError:
            # unhashable type, found by test_configfuzz).
            (
                {"max_version": []},
                "[tlsd] max_version: expected one of '1.2', '1.3', got []",
            ),
            (
                {"min_version": {"a": 1}},
                "[tlsd] min_version: expected one of '1.2', '1.3', got {'a': 1}",
            ),
            ({"psk_file": 3}, "[tlsd] psk_file: expected a file name"),
            ({"psk_hosts": {"b": 1}}, "[tlsd] psk_hosts: expected a table of host"),
            ({"cert": "x"}, "[tlsd] cert: unknown key"),
        ]:
            with self.assertRaises(ConfigError) as caught:
                load_config(None, {"tlsd": section}, {})
            self.assertIn(said, str(caught.exception))


class ServerCreatorTests(SynchronousTestCase):
    def test_notWatchedUnlessAsked(self) -> None:
        """
        A server connection is watched for kernel TLS only when tlsd asks
        (kernel TLS on and usable): otherwise it is pyOpenSSL's own.
        """
        creator = ServerCreator(Context(TLS_SERVER_METHOD))
        self.assertIs(type(creator.serverConnectionForTLS(None)), Connection)
