"""
The PSK secrets file as the admin writes it, and the keys in it as a TLS
handshake uses them: every line format the docs allow, the size bounds of
identities, keys and the file itself, and identities a peer may offer.
"""

from __future__ import annotations

import os
from typing import Any

from OpenSSL.SSL import (
    TLS1_2_VERSION,
    TLS1_3_VERSION,
    TLS_CLIENT_METHOD,
    TLS_SERVER_METHOD,
    Connection,
    Context,
    Error,
    WantReadError,
)
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from ipcd.compat import pyopenssl as compat_pyopenssl
from ipcd.daemons.tls import psk
from ipcd.daemons.tls.psk import (
    MAX_IDENTITY,
    MAX_KEY_BYTES,
    MAX_SECRETS_FILE,
    SecretsError,
    parse_secrets,
    read_secrets,
)
from ipcd.test.support import count_fds, run_python, short_rundir
from ipcd.test.tlssupport import TestCA

KEY = "00112233445566778899aabbccddeeff"


def _handshake(
    keys: Any,
    offer: Any,
    key: Any,
    version: int = TLS1_3_VERSION,
) -> tuple[bool, Connection]:
    """
    A TLS handshake in memory: a server Context with C{keys}, a client
    offering identity C{offer} (C{str}, or raw C{bytes}) with C{key}.
    Whether it completed, and the server's connection.
    """
    server_context = Context(TLS_SERVER_METHOD)
    psk.use_server_keys(server_context, keys)
    server_context.set_cipher_list(psk.TLS12_PSK_CIPHERS)
    client_context = Context(TLS_CLIENT_METHOD)
    client_context.set_min_proto_version(version)
    client_context.set_max_proto_version(version)
    if isinstance(offer, str):
        psk.use_client_key(client_context, offer, key)
    else:
        _raw_client_key(client_context, offer, key)
    return _pump(client_context, server_context)


def _pump(client_context: Context, server_context: Context) -> tuple[bool, Connection]:
    """Run a handshake between two Contexts in memory: (completed, server)."""
    server = Connection(server_context, None)
    server.set_accept_state()
    client = Connection(client_context, None)
    client.set_connect_state()
    for _ in range(20):
        done = 0
        for connection in (client, server):
            try:
                connection.do_handshake()
                done += 1
            except WantReadError:
                pass
            except Error:
                return False, server
        for one, other in ((client, server), (server, client)):
            try:
                other.bio_write(one.bio_read(1 << 16))
            except WantReadError:
                pass
        if done == 2:
            return True, server
    raise AssertionError("the handshake went on for 20 rounds")


def _raw_client_key(context: Context, identity: bytes, key: bytes) -> None:
    """A client callback offering any bytes as the identity (a hostile peer)."""
    lib, ffi = psk.openssl()

    def client(ssl: Any, hint: Any, out_id: Any, id_room: int, out: Any, room: int):
        ffi.memmove(out_id, identity + b"\0", len(identity) + 1)
        ffi.memmove(out, key, len(key))
        return len(key)

    callback = ffi.callback(
        "unsigned int(SSL *, char *, char *, unsigned int, "
        "unsigned char *, unsigned int)",
        client,
    )
    context._ipcd_test_callback = callback  # type: ignore[attr-defined]
    lib.SSL_CTX_set_psk_client_callback(context._context, callback)
    lib.SSL_CTX_set_ciphersuites(context._context, psk.TLS13_SUITES)


class FormatTests(SynchronousTestCase):
    """Lines as an admin writes them."""

    def test_linesAdminsWrite(self) -> None:
        """CRLF, indented comments, blank lines with spaces, a ':' in a name."""
        text = (
            "# keys for the cluster\r\n"
            "   # indented comment\r\n"
            "  \t \r\n"
            f"  alice:{KEY}  \r\n"
            f"host:port:{KEY.upper()}\r\n"
            "\r\n"
        )
        self.assertEqual(
            parse_secrets(text),
            {"alice": bytes.fromhex(KEY), "host:port": bytes.fromhex(KEY)},
        )

    def test_identityAndKeyBounds(self) -> None:
        longest = "i" * MAX_IDENTITY
        largest = "ab" * MAX_KEY_BYTES
        self.assertEqual(
            parse_secrets(f"{longest}:{largest}\nk:{'cd' * 16}\n"),
            {longest: bytes.fromhex(largest), "k": bytes.fromhex("cd" * 16)},
        )
        for line, said in [
            (f"{longest}i:{KEY}", "identity longer than 128 bytes"),
            (f"a:{largest}ab", "key of 257 bytes (from 16 to 256)"),
            (f"a:{KEY[:-2]}", "key of 15 bytes (from 16 to 256)"),
            (f"al\tice:{KEY}", "printable ASCII, no spaces"),
            (f"al ice:{KEY}", "printable ASCII, no spaces"),
            (f"alicé:{KEY}", "printable ASCII, no spaces"),
            (f"a:{KEY}0", "the key is not hexadecimal"),
            ("alice:", "key of 0 bytes"),
            (f"#c\n\n a:{KEY}\n a:{KEY}", "line 4: identity 'a' given twice"),
        ]:
            error = self.assertRaises(SecretsError, parse_secrets, line, "f")
            self.assertIn(said, str(error))
            self.assertTrue(str(error).startswith("f line "), str(error))
        error = self.assertRaises(SecretsError, parse_secrets, f"\n\n:{KEY}", "f")
        self.assertEqual(str(error), "f line 3: expected IDENTITY:HEXKEY")


class FileTests(SynchronousTestCase):
    """The file as read: all of it, up to the stated bound, or a clear error."""

    def setUp(self) -> None:
        self.dir = short_rundir(self, "ipcd-psk-")
        self.path = os.path.join(self.dir, "psk")

    def write(self, data: bytes, mode: int = 0o600) -> str:
        with open(self.path, "wb") as f:
            f.write(data)
        os.chmod(self.path, mode)
        return self.path

    def test_everyLineRead(self) -> None:
        """
        8,192 lines of 128 bytes (1 MiB): every key; 8,202 such lines: the
        file is refused as too large (it was cut at 1 MiB, quietly).
        """
        lines = [f"id{n:060}:{n:064x}\n" for n in range(8202)]
        self.assertEqual({len(line) for line in lines}, {128})
        keys = read_secrets(self.write("".join(lines[:8192]).encode()))
        self.assertEqual(len(keys), 8192)
        self.assertEqual(keys[f"id{8191:060}"], (8191).to_bytes(32, "big"))
        error = self.assertRaises(
            SecretsError, read_secrets, self.write("".join(lines).encode())
        )
        self.assertIn("is larger than 1 MiB", str(error))

    def test_sizeBound(self) -> None:
        """Exactly 1 MiB is read whole; a byte more is refused, not cut."""
        line = f"x:{KEY}\n"
        comment = "#" * (MAX_SECRETS_FILE - len(line) - 1) + "\n"
        data = (comment + line).encode()
        self.assertEqual(len(data), MAX_SECRETS_FILE)
        self.assertEqual(read_secrets(self.write(data)), {"x": bytes.fromhex(KEY)})
        error = self.assertRaises(SecretsError, read_secrets, self.write(b"#" + data))
        self.assertEqual(
            str(error),
            f"{self.path} is larger than 1 MiB: not a secrets file, "
            "or too many keys for one",
        )

    def test_notAscii(self) -> None:
        self.write(f"alicé:{KEY}\n".encode())
        error = self.assertRaises(SecretsError, read_secrets, self.path)
        self.assertEqual(str(error), f"{self.path}: not ASCII text")

    def test_cannotRead(self) -> None:
        missing = os.path.join(self.dir, "missing")
        error = self.assertRaises(SecretsError, read_secrets, missing)
        self.assertEqual(
            str(error), f"cannot read {missing}: No such file or directory"
        )

    def test_linkFollowedToThePrivateFile(self) -> None:
        """
        A symbolic link is followed, as tlsd's key is, and as secret volumes
        (Kubernetes') lay files out; the checks are the file's it leads to.
        """
        data = os.path.join(self.dir, "..2026_12_06")
        os.mkdir(data)
        self.path = os.path.join(data, "psk")
        self.write(f"a:{KEY}\n".encode())
        os.symlink("..2026_12_06", os.path.join(self.dir, "..data"))
        link = os.path.join(self.dir, "psk")
        os.symlink("..data/psk", link)
        self.assertEqual(read_secrets(link), {"a": bytes.fromhex(KEY)})
        os.chmod(self.path, 0o644)
        error = self.assertRaises(SecretsError, read_secrets, link)
        self.assertEqual(
            str(error),
            f"{link} is readable by group or others (mode 0644): chmod 600 {link}",
        )

    def test_notAFile(self) -> None:
        """
        A directory or a FIFO is refused in one line, at once: a FIFO does
        not stall ipcd until a writer comes (run apart, so a stall here
        cannot hang the suite).
        """
        error = self.assertRaises(SecretsError, read_secrets, self.dir)
        self.assertEqual(
            str(error), f"{self.dir} is a directory, not a file: name the file itself"
        )
        fifo = os.path.join(self.dir, "fifo")
        os.mkfifo(fifo, 0o600)
        code = (
            "import sys\n"
            "from ipcd.daemons.tls.material import MaterialError, read_file\n"
            "from ipcd.daemons.tls.psk import SecretsError, read_secrets\n"
            "cert = lambda p: read_file('[tlsd] certificate', p)\n"
            "for read in (read_secrets, cert):\n"
            "    try:\n"
            "        read(sys.argv[1])\n"
            "    except (SecretsError, MaterialError) as e:\n"
            "        print(e)\n"
        )
        out = run_python(code, fifo)
        self.assertEqual(
            out.stdout.splitlines(),
            [
                f"{fifo} is a FIFO, not a file: name the file itself",
                f"[tlsd] certificate: {fifo} is a FIFO, not a file: "
                "name the file itself",
            ],
            out.stderr,
        )

    def test_refusedLeavesNoFd(self) -> None:
        self.write(f"a:{KEY}\n".encode(), 0o640)
        before = count_fds()
        for _ in range(5):
            self.assertRaises(SecretsError, read_secrets, self.path)
        self.assertEqual(count_fds(), before)

    def test_private(self) -> None:
        self.write(f"a:{KEY}\n".encode(), 0o640)
        error = self.assertRaises(SecretsError, read_secrets, self.path)
        self.assertIn("(mode 0640): chmod 600", str(error))
        for mode in (0o601, 0o610, 0o620, 0o602):
            os.chmod(self.path, mode)
            self.assertRaises(SecretsError, read_secrets, self.path)
        os.chmod(self.path, 0o604)
        self.assertRaises(SecretsError, read_secrets, self.path)
        os.chmod(self.path, 0o600)
        self.assertEqual(read_secrets(self.path), {"a": bytes.fromhex(KEY)})
        if os.geteuid() == 0:
            os.chown(self.path, 61001, -1)
            error = self.assertRaises(SecretsError, read_secrets, self.path)
            self.assertIn("is owned by uid 61001, not by ipcd's user", str(error))


class HandshakeTests(SynchronousTestCase):
    """The bounds the file allows are bounds a real handshake takes."""

    def test_longestIdentityAndLargestKey(self) -> None:
        identity = "i" * MAX_IDENTITY
        key = bytes(range(256))[:MAX_KEY_BYTES]
        for version in (TLS1_3_VERSION, TLS1_2_VERSION):
            ok, server = _handshake({identity: key}, identity, key, version)
            self.assertTrue(ok)
            self.assertEqual(psk.psk_identity(server), identity)
            self.assertEqual(psk.offered_identity(server), identity)

    def test_wrongKeyOrUnknownIdentityFails(self) -> None:
        key = bytes.fromhex(KEY)
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        ok, server = _handshake({"alice": key}, "alice", key[::-1])
        self.assertFalse(ok)
        self.assertEqual(psk.offered_identity(server), "alice")
        self.assertFalse(psk.offered_unknown(server))
        ok, server = _handshake({"alice": key}, "bob", key)
        self.assertFalse(ok)
        self.assertIsNone(psk.psk_identity(server))
        self.assertEqual(psk.offered_identity(server), "bob")
        self.assertTrue(psk.offered_unknown(server))
        # Said by the listener with the failed handshake, at its bounded
        # rate (test_tls), never here once per handshake.
        self.assertEqual(events, [])

    def test_nonAsciiIdentityFromAPeer(self) -> None:
        """
        Offered bytes that are not ASCII: refused, remembered as text (the
        failed handshake's line quotes it escaped), nothing logged here.
        """
        key = bytes.fromhex(KEY)
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        ok, server = _handshake({"alice": key}, "alicé\x1b".encode(), key)
        self.assertFalse(ok)
        self.assertEqual(psk.offered_identity(server), "alic\ufffd\ufffd\x1b")
        self.assertIsNone(psk.psk_identity(server))
        self.assertTrue(psk.offered_unknown(server))
        self.assertEqual(events, [])


class _Events(list):
    """Log events, observed for one test."""

    def __init__(self, case: SynchronousTestCase) -> None:
        super().__init__()
        globalLogPublisher.addObserver(self.append)
        case.addCleanup(globalLogPublisher.removeObserver, self.append)

    def failures(self) -> list[str]:
        return [e["log_format"] for e in self if e.get("log_failure")]


class FailClosedTests(SynchronousTestCase):
    """
    Whatever goes wrong in a callback or at OpenSSL's bounds, the handshake
    fails: no key (of any one byte, say) opens it.
    """

    def test_serverCallbackFails(self) -> None:
        events = _Events(self)

        def keys() -> dict[str, bytes]:
            raise RuntimeError("keys unavailable")

        for byte in range(256):
            ok, _ = _handshake(keys, "alice", bytes([byte]))
            self.assertFalse(ok, byte)
        self.assertEqual(
            set(events.failures()), {"TLS: the PSK server callback failed"}
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 256)

    def test_clientCallbackFails(self) -> None:
        events = _Events(self)
        for byte in range(256):
            ok, server = _handshake({"alice": bytes([byte])}, "alice", None)
            self.assertFalse(ok, byte)
            self.assertIsNone(psk.psk_identity(server))
        self.assertEqual(
            set(events.failures()), {"TLS: the PSK client callback failed"}
        )
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 256)

    def test_noConnectionForThePointer(self) -> None:
        """
        An SSL pointer with no Connection known for it (the reverse mapping
        gone): the handshake fails, and why is logged.
        """
        events = _Events(self)
        self.patch(compat_pyopenssl, "connection_for", lambda ssl: None)
        ok, _ = _handshake({"alice": bytes(32)}, "alice", bytes(32))
        self.assertFalse(ok)
        self.assertEqual(events.failures(), ["TLS: the PSK server callback failed"])
        [error] = self.flushLoggedErrors(LookupError)
        self.assertEqual(error.getErrorMessage(), "no Connection for this SSL pointer")

    def test_unavailable(self) -> None:
        """Without pyOpenSSL's Context pointer, PSK is refused saying why."""
        self.patch(compat_pyopenssl, "context_pointer", lambda context: None)
        self.patch(compat_pyopenssl.CONTEXT, "present", False)
        self.patch(compat_pyopenssl.CONTEXT, "said", False)
        why = "this pyOpenSSL has no Context._context: pre-shared keys are unavailable"
        self.assertEqual(psk.unavailable(), why)
        error = self.assertRaises(
            RuntimeError, psk.use_server_keys, Context(TLS_SERVER_METHOD), {}
        )
        self.assertEqual(str(error), why)

    def test_identityRoom(self) -> None:
        """
        The longest identity OpenSSL has room for (255 bytes and the NUL,
        in OpenSSL 3 and 4) is offered whole; a longer one is not offered
        at all (never cut).  ipcd's own files stop at 128.
        """
        key = bytes.fromhex(KEY)
        ok, server = _handshake({"i" * 255: key}, "i" * 255, key)
        self.assertTrue(ok)
        self.assertEqual(psk.psk_identity(server), "i" * 255)
        ok, server = _handshake({"i" * 256: key}, "i" * 256, key)
        self.assertFalse(ok)
        self.assertIsNone(psk.offered_identity(server))

    def test_keyRoom(self) -> None:
        """A key copies only into room for all of it."""
        _, ffi = psk.openssl()
        out = ffi.new("unsigned char[8]")
        self.assertEqual(psk._copy_key(b"k" * 8, out, 8), 8)
        self.assertEqual(ffi.buffer(out)[:], b"k" * 8)
        out = ffi.new("unsigned char[8]")
        self.assertEqual(psk._copy_key(b"k" * 9, out, 8), 0)
        self.assertEqual(ffi.buffer(out)[:], bytes(8))

    def test_tls12ClientWantsTheKey(self) -> None:
        """
        Under TLS 1.2 the client offers only PSK suites: a server with a
        certificate and no key cannot complete a handshake with it.
        """
        issued = TestCA(short_rundir(self, "ipcd-psk-ca-")).issue("server")
        server_context = Context(TLS_SERVER_METHOD)
        server_context.use_certificate_file(issued.cert)
        server_context.use_privatekey_file(issued.key)
        client_context = Context(TLS_CLIENT_METHOD)
        client_context.set_max_proto_version(TLS1_2_VERSION)
        psk.use_client_key(client_context, "alice", bytes.fromhex(KEY))
        ok, _ = _pump(client_context, server_context)
        self.assertFalse(ok)
