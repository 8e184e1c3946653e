"""
Kernel TLS against peers nobody here wrote, in a kernel that has kTLS:

- a near end that did its handshake in pyOpenSSL and gave the record layer
  to the kernel by hand (L{ipcd.daemons.tls.ktls}'s primitives: keys from
  the keylog callback or the master secret, sequence numbers as after a
  handshake, tickets counted) talks to C{openssl s_server} and stunnel as
  a client and to C{openssl s_client} as a server (PSK, TLS 1.3 and 1.2),
  then only reads and writes, as a client handed the socket would; its
  close_notify ends the session cleanly for the peer;
- tlsd itself with stunnel on the far end: stunnel (client mode) dials B's
  tlsd, which relays it on kernel TLS; A's tlsd dials stunnel (server
  mode) and hands the client the kTLS socket.  (tlsd against the openssl
  tool is test_ktls_openssl's.)

Skipped where the kernel has no C{tls} upper-layer protocol; the VM test
(L{ipcd.test.test_kernel_tls_vm}) runs them in a kernel that has it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

from OpenSSL import SSL
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from ipcd.daemons.tls import ktls
from ipcd.daemons.tls.ktls import kernel_settings, ktls_available
from ipcd.daemons.tls.psk import use_client_key, use_server_keys
from ipcd.test.ktlssupport import NO_ULP, WAIT
from ipcd.test.support import exchange, free_port, recv_upto
from ipcd.test.test_ktls import needs_ktls
from ipcd.test.test_ktls_routes import kernel_relays
from ipcd.test.test_tls import TlsTestCase
from ipcd.wire import encode

OPENSSL = shutil.which("openssl")
STUNNEL = shutil.which("stunnel4") or shutil.which("stunnel")
IDENTITY = "alice"
# stunnel takes the key as text (16 bytes at least), openssl as hex.
KEY = b"ipcd-interop-psk-0123456789abcde"
TLS13_SUITE = b"TLS_AES_128_GCM_SHA256"
TLS12_SUITE = b"PSK-AES128-GCM-SHA256"
# A peer process may take this long to listen (a VM under TCG is slow).
START = 120.0


def ktls_connect(port: int, version: int) -> socket.socket:
    """
    A TCP connection to 127.0.0.1:C{port}: PSK handshake in pyOpenSSL
    (TLS C{version}, AES-128-GCM), then the kernel's.  Blocking, with
    kernel send and receive timeouts of L{WAIT}.
    """
    sock = bounded(socket.create_connection(("127.0.0.1", port), timeout=WAIT))
    context, secrets = psk_context(SSL.TLS_CLIENT_METHOD, version)
    conn = SSL.Connection(context, sock)
    conn.set_connect_state()
    conn.do_handshake()
    # With the socket as its BIO, OpenSSL read no record past the
    # handshake's: nothing is left for user space.  No record was sent or
    # read yet under TLS 1.3's application keys.
    assert conn.pending() == 0
    switch(sock, conn, secrets, as_server=False, sent=0)
    return sock


def bounded(sock: socket.socket) -> socket.socket:
    """C{sock} blocking (as OpenSSL wants), with kernel timeouts of L{WAIT}."""
    sock.settimeout(None)
    timeval = struct.pack("ll", int(WAIT), 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    return sock


def psk_context(method: int, version: int) -> tuple[SSL.Context, dict[str, bytes]]:
    """
    A Context for TLS C{version} with AES-128-GCM only, and the secrets
    its keylog callback will have filled in by the handshake's end.
    """
    secrets: dict[str, bytes] = {}

    def keylog(conn: SSL.Connection, line: bytes) -> None:
        label, _random, secret = line.split()
        secrets[label.decode()] = bytes.fromhex(secret.decode())

    context = SSL.Context(method)
    context.set_min_proto_version(version)
    context.set_max_proto_version(version)
    context.set_keylog_callback(keylog)
    context.set_options(SSL.OP_NO_TICKET)  # no TLS 1.2 ticket in the way
    if method == SSL.TLS_SERVER_METHOD:
        use_server_keys(context, {IDENTITY: KEY})
    else:
        use_client_key(context, IDENTITY, KEY)
    context.set_tls13_ciphersuites(TLS13_SUITE)
    context.set_cipher_list(TLS12_SUITE)
    return context, secrets


def switch(
    sock: socket.socket,
    conn: SSL.Connection,
    secrets: dict[str, bytes],
    as_server: bool,
    sent: int,
) -> None:
    """
    Give C{sock} to the kernel with C{conn}'s keys.  Sequence numbers: under
    TLS 1.3, C{sent} records sent under our application keys and none read
    under the peer's; under TLS 1.2, 1 both ways (each side's Finished was
    record 0 under the new keys).
    """
    cipher = ktls.cipher_of(conn.get_cipher_name())
    assert cipher is not None, conn.get_cipher_name()
    version = ktls.VERSIONS[conn.get_protocol_version_name()]
    if version == ktls.TLS13:
        client = ktls.tls13_keys(secrets["CLIENT_TRAFFIC_SECRET_0"], cipher)
        server = ktls.tls13_keys(secrets["SERVER_TRAFFIC_SECRET_0"], cipher)
    else:
        client, server = ktls.tls12_keys(
            conn.master_key(), conn.client_random(), conn.server_random(), cipher
        )
    tx, rx = (server, client) if as_server else (client, server)
    tx_seq, rx_seq = (sent, 0) if version == ktls.TLS13 else (1, 1)
    ktls.attach(sock)
    ktls.switch(
        sock, version, cipher, ktls.Direction(*tx, tx_seq), ktls.Direction(*rx, rx_seq)
    )


def ktls_accept(listener: socket.socket, version: int) -> socket.socket:
    """
    Accept one connection on C{listener}: PSK handshake in pyOpenSSL with
    memory BIOs, so that the records this side sent after the handshake's
    end (TLS 1.3 NewSessionTickets) are counted into its sequence number;
    then the kernel's.  The peer must send nothing before it hears from us.
    """
    listener.settimeout(WAIT)
    sock = bounded(listener.accept()[0])
    context, secrets = psk_context(SSL.TLS_SERVER_METHOD, version)
    conn = SSL.Connection(context, None)
    conn.set_accept_state()
    while True:
        try:
            conn.do_handshake()
            done = True
        except SSL.WantReadError:
            done = False
        out = b""
        with contextlib.suppress(SSL.WantReadError):
            while chunk := conn.bio_read(65536):
                out += chunk
        sock.sendall(out)
        if done:
            break
        data = sock.recv(65536)
        if not data:
            raise EOFError("the peer left during the handshake")
        conn.bio_write(data)
    assert conn.pending() == 0
    # What the last step wrote came after the handshake: the tickets.
    after = ktls.Records()
    after.feed(out)
    assert after.whole
    switch(sock, conn, secrets, as_server=True, sent=after.count)
    return sock


def read_data(sock: socket.socket, want: int) -> bytes:
    """
    C{want} bytes of application data from kTLS socket C{sock}, past any
    TLS 1.3 NewSessionTicket (a handshake record: a plain read would fail).
    """
    data = b""
    while len(data) < want:
        kind, chunk = ktls.recv_record(sock, want - len(data))
        if kind == ktls.HANDSHAKE:
            continue
        if kind != ktls.APPLICATION_DATA or not chunk:
            raise AssertionError(f"record type {kind} ({chunk!r}) after {data!r}")
        data += chunk
    return data


def ended(sock: socket.socket) -> bool:
    """
    Whether the peer ends the session after our close_notify: its own
    close_notify (an alert record) or EOF, before L{WAIT}.
    """
    ktls.send_close_notify(sock)
    while True:
        try:
            kind, chunk = ktls.recv_record(sock, 4096)
        except ConnectionResetError:
            return False
        if not chunk or kind == ktls.ALERT:
            return True
        if kind != ktls.HANDSHAKE:
            raise AssertionError(f"record type {kind} ({chunk!r}) after close")


def start_peer(case: SynchronousTestCase, argv: list[str], port: int) -> None:
    """
    Run peer C{argv} until C{case} ends, and wait until it listens on
    C{port}; its output goes in the failure message if it never does.
    """
    log = case.mktemp()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,  # s_server ends at EOF on its stdin
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    case.addCleanup(stop_peer, proc)
    deadline = time.monotonic() + START
    while not _listening(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            with open(log, errors="replace") as f:
                case.fail(f"{argv[0]} did not listen on {port}:\n{f.read()}")
        time.sleep(0.1)


def _listening(port: int) -> bool:
    # /proc, not a probing connection: that would be s_server's client.
    listen = f"0100007F:{port:04X} 00000000:0000 0A"
    with open("/proc/net/tcp") as f:
        return any(listen in line for line in f)


def stop_peer(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.stdin is not None:
        proc.stdin.close()
    proc.wait(WAIT)


def start_stunnel(case: SynchronousTestCase, port: int, service: str) -> None:
    """
    stunnel with C{service} (its lines: accept on 127.0.0.1:C{port},
    connect, client...) and alice's key, until C{case} ends.
    """
    if STUNNEL is None:
        raise SkipTest("no stunnel (apt-get install stunnel4)")
    directory = case.mktemp()
    os.mkdir(directory)
    secrets = os.path.join(directory, "psk.txt")
    with open(os.open(secrets, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write(f"{IDENTITY}:{KEY.decode()}\n")
    config = os.path.join(directory, "stunnel.conf")
    with open(config, "w") as f:
        f.write(
            f"foreground = yes\npid =\ndebug = 5\n[peer]\n{service}"
            f"accept = 127.0.0.1:{port}\nPSKsecrets = {secrets}\n"
        )
    start_peer(case, [STUNNEL, config], port)


class PeerTestCase(SynchronousTestCase):
    if not ktls_available():
        skip = NO_ULP


class OpenSSLServerTests(PeerTestCase):
    """C{openssl s_server -rev}: each line comes back reversed."""

    if OPENSSL is None:
        skip = "no openssl command (apt-get install openssl)"

    def talk(self, version: int, flags: list[str]) -> None:
        port = free_port()
        assert OPENSSL is not None
        start_peer(
            self,
            [OPENSSL, "s_server", "-accept", f"127.0.0.1:{port}", "-rev", "-nocert"]
            + ["-psk", KEY.hex(), "-psk_identity", IDENTITY, *flags],
            port,
        )
        with ktls_connect(port, version) as sock:
            for line in (b"kernel tls\n", b"x" * 1000 + b"\n"):
                sock.sendall(line)
                self.assertEqual(read_data(sock, len(line)), line[-2::-1] + b"\n")
            self.assertTrue(ended(sock))

    def test_tls13(self) -> None:
        self.talk(
            SSL.TLS1_3_VERSION, ["-tls1_3", "-ciphersuites", TLS13_SUITE.decode()]
        )

    def test_tls12(self) -> None:
        self.talk(SSL.TLS1_2_VERSION, ["-tls1_2", "-cipher", TLS12_SUITE.decode()])


@contextlib.contextmanager
def echo_server(request: bytes = b"") -> Iterator[int]:
    """
    A plain TCP echo on loopback, one connection at a time; its port.  With
    C{request}, each connection must send that first, and is answered
    C{ok} (as a libipc service asked through a tls:// route).
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(WAIT)
                with contextlib.suppress(OSError):
                    if request and recv_upto(conn, len(request)) == request:
                        conn.sendall(b"ok")
                    while data := conn.recv(65536):
                        conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(WAIT)
        listener.close()


class StunnelServerTests(PeerTestCase):
    """stunnel in server mode (PSK) in front of a TCP echo."""

    def test_tls13(self) -> None:
        port = free_port()
        with echo_server() as echo:
            start_stunnel(
                self,
                port,
                f"connect = 127.0.0.1:{echo}\nsslVersion = TLSv1.3\n"
                f"ciphersuites = {TLS13_SUITE.decode()}\n",
            )
            with ktls_connect(port, SSL.TLS1_3_VERSION) as sock:
                data = os.urandom(1024 * 1024)
                writer = threading.Thread(target=sock.sendall, args=(data,))
                writer.start()
                try:
                    self.assertEqual(read_data(sock, len(data)), data)
                finally:
                    writer.join(WAIT)
                self.assertTrue(ended(sock))


class OpenSSLClientTests(PeerTestCase):
    """
    C{openssl s_client} dials a kTLS server: it prints what the server
    writes, sends what its stdin gets, and ends at the server's
    close_notify.
    """

    if OPENSSL is None:
        skip = "no openssl command (apt-get install openssl)"

    def talk(self, version: int, flags: list[str]) -> None:
        assert OPENSSL is not None
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            port = listener.getsockname()[1]
            output = self.mktemp()
            with open(output, "wb") as out:
                client = subprocess.Popen(
                    [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-quiet"]
                    + ["-psk", KEY.hex(), "-psk_identity", IDENTITY, *flags],
                    stdin=subprocess.PIPE,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self.addCleanup(stop_peer, client)
            with ktls_accept(listener, version) as sock:
                sock.sendall(b"from the kernel\n")
                assert client.stdin is not None
                client.stdin.write(b"from s_client\n")
                client.stdin.flush()
                line = b"from s_client\n"
                self.assertEqual(read_data(sock, len(line)), line)
                ktls.send_close_notify(sock)
                status = client.wait(START)
        with open(output, "rb") as f:
            said = f.read()
        self.assertIn(b"from the kernel\n", said)
        # Ended by the close_notify, not by an unexpected EOF.
        self.assertEqual((status, said.count(b"error")), (0, 0), said)

    def test_tls13(self) -> None:
        suites = ["-ciphersuites", TLS13_SUITE.decode()]
        self.talk(SSL.TLS1_3_VERSION, ["-tls1_3", *suites])

    def test_tls12(self) -> None:
        self.talk(SSL.TLS1_2_VERSION, ["-tls1_2", "-cipher", TLS12_SUITE.decode()])


# Stunnel on the far end of tlsd's kernel TLS.  Its PSK is text: tlsd's
# secrets file takes the same bytes in hex.
STUNNEL_VERSIONS = {
    "TLSv1.3": f"ciphersuites = {TLS13_SUITE.decode()}\n",
    "TLSv1.2": f"ciphers = {TLS12_SUITE.decode()}\n",
}


@needs_ktls
class StunnelClientToTlsdTests(TlsTestCase):
    """
    stunnel in client mode dials B's tlsd for pong, as upstream asks: B
    relays it on kernel TLS, and messages bounce off pong through it.
    """

    kernel_tls = True

    @inlineCallbacks
    def bounce(self, version: str) -> Any:
        b = yield self.psk_server(["allow in pong psk:alice"], alice=KEY.hex())
        port = free_port()
        start_stunnel(
            self,
            port,
            f"client = yes\nconnect = 127.0.0.1:{b.port}\n"
            f"PSKidentity = {IDENTITY}\nsslVersion = {version}\n"
            + STUNNEL_VERSIONS[version],
        )
        sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.addCleanup(sock.close)
        answer = yield deferToThread(exchange, sock, b"pong", 2)
        self.assertEqual(answer, b"ok")
        message = encode(b"through stunnel and the kernel")
        echo = yield deferToThread(exchange, sock, message, len(message))
        self.assertEqual(echo, message)
        self.assertEqual(len(kernel_relays(b)), 1)

    def test_tls13(self) -> Any:
        return self.bounce("TLSv1.3")

    def test_tls12(self) -> Any:
        return self.bounce("TLSv1.2")


@needs_ktls
class TlsdToStunnelTests(TlsTestCase):
    """
    A's tlsd dials stunnel in server mode (in front of a service that
    answers C{ok}, then echoes): the client holds the kTLS socket and talks
    through it, and no relay stays in A.
    """

    kernel_tls = True

    @inlineCallbacks
    def hands_over(self, version: str) -> Any:
        port = free_port()
        with echo_server(request=b"pong") as service:
            start_stunnel(
                self,
                port,
                f"connect = 127.0.0.1:{service}\nsslVersion = {version}\n"
                + STUNNEL_VERSIONS[version],
            )
            a = yield self.psk_client(IDENTITY, KEY.hex())
            reply = yield self.lookup_on(a, f"tls://localhost:{port}/pong")
            self.assertEqual((reply.first, len(reply.fds)), (b"ok", 1), reply)
            sock = reply.take_socket(self)
            sock.settimeout(WAIT)
            self.assertEqual(sock.family, socket.AF_INET)
            self.assertEqual(list(a.broker.relays), [])
            message = b"x" * 100_000
            echo = yield deferToThread(exchange, sock, message, len(message))
            self.assertEqual(echo, message)
            return kernel_settings(sock)

    @inlineCallbacks
    def test_tls13(self) -> Any:
        info = yield self.hands_over("TLSv1.3")
        self.assertEqual(info[:2], ktls.TLS13.to_bytes(2, "little"))

    @inlineCallbacks
    def test_tls12(self) -> Any:
        info = yield self.hands_over("TLSv1.2")
        self.assertEqual(info[:2], ktls.TLS12.to_bytes(2, "little"))
