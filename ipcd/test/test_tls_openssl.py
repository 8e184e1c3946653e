"""
tlsd against a peer nobody here wrote: the C{openssl} command-line tool.
C{openssl s_client} (PSK, TLS 1.3 and 1.2) asks tlsd for pong; tlsd's
outbound side dials C{openssl s_server} with a PSK and with a certificate.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import struct
from typing import Any

from OpenSSL.SSL import (
    TLS_CLIENT_METHOD,
    Connection,
    Context,
    SysCallError,
    ZeroReturnError,
)
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from ipcd.daemons.tls import psk
from ipcd.test.support import free_port, lookup, recv_upto, wait_until
from ipcd.test.tcpsupport import digest_service
from ipcd.test.test_tls import TlsTestCase
from ipcd.test.tlssupport import ALICE_KEY, start_tls_host
from ipcd.wire import encode

OPENSSL = shutil.which("openssl")


class OpenSSL(ProcessProtocol):
    """An C{openssl} process: its output collected, its input written to."""

    def __init__(self) -> None:
        self.output = b""
        self.ended = False

    def outReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        self.output += data

    errReceived = outReceived  # noqa: N815 (Twisted's name)

    def processEnded(self, reason: Any) -> None:  # noqa: N802 (Twisted's name)
        self.ended = True

    def said(self, text: bytes) -> Any:
        """Wait (bounded) until the output holds C{text}."""
        return wait_until(
            lambda: text in self.output,
            f"openssl to say {text!r}; it said {self.output[-300:]!r}",
        )


def run_openssl(case: TestCase, *args: str) -> OpenSSL:
    """Start C{openssl ARGS}; killed (and waited for) after the test."""
    if OPENSSL is None:
        raise SkipTest("the openssl command is not installed (apt-get install openssl)")
    process = OpenSSL()
    transport = reactor.spawnProcess(
        process, OPENSSL, [OPENSSL, *args], env=dict(os.environ), usePTY=False
    )

    def stop() -> Any:
        # The child may be reaped before processEnded is delivered.
        with contextlib.suppress(ProcessExitedAlready):
            transport.signalProcess("KILL")
        return wait_until(lambda: process.ended, "openssl to end")

    case.addCleanup(stop)
    return process


@inlineCallbacks
def s_client_to_pong(case: TlsTestCase, version: str, messages: int = 1) -> Any:
    """
    C{openssl s_client} (C{version}, alice's key) asks host B for pong,
    raw, as upstream does, then bounces C{messages} messages off it: (B,
    s_client).
    """
    b = yield case.psk_server(["allow in pong psk:alice"], alice=ALICE_KEY)
    client = run_openssl(
        case,
        *("s_client", "-connect", f"127.0.0.1:{b.port}", version),
        *("-psk", ALICE_KEY, "-psk_identity", "alice", "-quiet", "-nocommands"),
    )
    client.transport.write(b"pong")
    yield client.said(b"ok")
    for n in range(messages):
        message = encode(b"from openssl %d" % n)
        client.transport.write(message)
        yield client.said(message)
    return b, client


class ClientInteropTests(TlsTestCase):
    """C{openssl s_client -psk} asks B's tlsd for pong, raw, as upstream does."""

    @inlineCallbacks
    def serves(self, version: str) -> Any:
        b, _ = yield s_client_to_pong(self, version)
        [stats] = b.broker.relays
        self.assertIn("psk:alice", stats.labels)
        # On the raw sockets, OpenSSL doing the I/O (tlsd's fast relay).
        self.assertEqual(len(b.tls_state.socket_relays.sides()), 2)
        return stats.as_dict()["tls"]["version"]

    @inlineCallbacks
    def test_tls13(self) -> Any:
        version = yield self.serves("-tls1_3")
        self.assertEqual(version, "TLSv1.3")

    @inlineCallbacks
    def test_tls12(self) -> Any:
        version = yield self.serves("-tls1_2")
        self.assertEqual(version, "TLSv1.2")


@inlineCallbacks
def s_client_with_commands(case: TlsTestCase) -> Any:
    """
    C{openssl s_client} (TLS 1.3, alice's key, its commands on: C{K} asks
    for a key update) asks host B for pong: (B, s_client) once B said ok.
    """
    b = yield case.psk_server(["allow in pong psk:alice"], alice=ALICE_KEY)
    client = run_openssl(
        case,
        *("s_client", "-connect", f"127.0.0.1:{b.port}", "-tls1_3"),
        *("-psk", ALICE_KEY, "-psk_identity", "alice"),
    )
    yield client.said(b"Verify return code")
    client.transport.write(b"pong")
    yield client.said(b"\nok")
    return b, client


class KeyUpdateTests(TlsTestCase):
    """
    A TLS 1.3 key update from C{openssl s_client} (its C{K} command, which
    asks for one back) in the middle of a relay on raw sockets: OpenSSL
    takes the new keys (and sends with new ones), both ways keep working.
    """

    @inlineCallbacks
    def test_keyUpdate(self) -> Any:
        b, client = yield s_client_with_commands(self)
        yield wait_until(
            lambda: len(b.tls_state.socket_relays.sides()) == 2,
            "the relay on raw sockets",
        )
        for n in range(3):
            client.transport.write(b"K\n")
            yield client.said(b"KEYUPDATE")
            client.output = b""
            message = encode(b"after key update %d" % n)
            client.transport.write(message)
            yield client.said(message)


@inlineCallbacks
def s_client_to_digest(case: TlsTestCase, *options: str) -> Any:
    """
    C{openssl s_client} (TLS 1.3, alice's key, C{options}) asks host B for
    its digest service, which ignores EOFs: (B, the service's factory,
    s_client) once B has answered ok.
    """
    b = yield case.psk_server(["allow in digest psk:alice"], alice=ALICE_KEY)
    service = digest_service(case, b.rundir, "digest", on_eof="ignore")
    client = run_openssl(
        case,
        *("s_client", "-connect", f"127.0.0.1:{b.port}", "-tls1_3"),
        *("-psk", ALICE_KEY, "-psk_identity", "alice", "-quiet", "-nocommands"),
        *options,
    )
    client.transport.write(b"digest")
    yield client.said(b"ok")
    return b, service, client


def bare_fin_client(port: int, data: bytes) -> bytes:
    """
    A TLS client that ends as a client holding a kernel TLS socket does
    (its C{shutdown(SHUT_WR)} or close is a TCP FIN, with no close_notify):
    asks for digest with alice's key, sends C{data}, shuts its sending
    side, and reads until the far end's close_notify or EOF: what it read.
    """
    context = Context(TLS_CLIENT_METHOD)
    psk.use_client_key(context, "alice", bytes.fromhex(ALICE_KEY))
    with socket.create_connection(("127.0.0.1", port)) as sock:
        # Blocking (as pyOpenSSL wants it), each wait bounded.
        bound = struct.pack("ll", 30, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, bound)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, bound)
        tls = Connection(context, sock)
        tls.set_connect_state()
        tls.sendall(b"digest")
        assert recv_upto_tls(tls, 2) == b"ok"
        tls.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return recv_upto_tls(tls, 1 << 20)


def recv_upto_tls(tls: Connection, size: int) -> bytes:
    """Read C{tls} up to C{size} bytes, its close_notify or its EOF."""
    data = b""
    while len(data) < size:
        try:
            data += tls.recv(size - len(data))
        except (ZeroReturnError, SysCallError):
            break
    return data


class TruncationTests(TlsTestCase):
    """
    A TLS peer's TCP EOF without a close_notify is an EOF (as on a kernel
    TLS relay): a client on a host that handed it the kernel TLS socket
    ends that way, and the service's answer must still reach it when this
    host's connection is on the relay (a kernel without kTLS, a connection
    that could not switch).  C{openssl s_client} killed is the same end.
    """

    @inlineCallbacks
    def test_bareFinIsAnEof(self) -> Any:
        b = yield self.psk_server(["allow in digest psk:alice"], alice=ALICE_KEY)
        self.patch(b.tls_state, "kernel_tls", lambda: False)  # (in the VM too)
        digest_service(self, b.rundir, "digest")
        data = os.urandom(300_000)
        answer = yield deferToThread(bare_fin_client, b.port, data)
        expected = f"{len(data)} {hashlib.sha256(data).hexdigest()}".encode()
        self.assertEqual(answer, expected)
        yield wait_until(lambda: not b.broker.relays, "the relay to end")

    @inlineCallbacks
    def test_killedClient(self) -> Any:
        b, service, client = yield s_client_to_digest(self)
        yield wait_until(
            lambda: len(b.tls_state.socket_relays.sides()) == 2,
            "the relay on raw sockets",
        )
        client.transport.write(b"ten bytes!")
        yield wait_until(
            lambda: sum(c.count for c in service.connections) == 10,
            "the bytes to reach the service",
        )
        client.transport.signalProcess("KILL")
        # The service reads an end; its side closed, the relay ends.
        [digest] = service.connections
        yield wait_until(lambda: digest.eof, "the service to read the end")
        digest.transport.loseConnection()
        yield wait_until(lambda: not b.broker.relays, "the relay to end")
        self.assertEqual(b.tls_state.socket_relays.sides(), [])


@inlineCallbacks
def talk_to_s_server(case: TestCase, tlsd: dict[str, Any], *server: str) -> Any:
    """
    Host A (with C{tlsd} settings) asks C{openssl s_server SERVER} for pong,
    the test answering C{ok} for it; then a hello each way through the
    client's socket: (the s_server process, A, the client's socket).
    """
    port = free_port()
    process = run_openssl(
        case, "s_server", "-accept", f"127.0.0.1:{port}", "-naccept", "1", *server
    )
    yield process.said(b"ACCEPT")
    a = yield start_tls_host(case, tlsd, pongd=False)
    route = f"tls://localhost:{port}/pong"
    asked = deferToThread(lookup, a.rundir, f"pong;pong {route}".encode())
    yield process.said(b"pong")
    process.transport.write(b"ok")
    reply = yield asked
    case.assertEqual((reply.first, reply.data, len(reply.fds)), (b"ok", b"ok", 1))
    sock = reply.take_socket(case)
    yield deferToThread(sock.sendall, b"hello server")
    yield process.said(b"hello server")
    process.transport.write(b"hello client")
    answer = yield deferToThread(recv_upto, sock, len(b"hello client"))
    case.assertEqual(answer, b"hello client")
    return process, a, sock


class ServerInteropTests(TlsTestCase):
    """
    tlsd's outbound side dials C{openssl s_server}: it sends the raw service
    name, the test answers C{ok} on the server's behalf, and the client's
    socket then reaches the server both ways.
    """

    @inlineCallbacks
    def relays(self, tlsd: dict[str, Any], *server: str) -> Any:
        _, a, _ = yield talk_to_s_server(self, tlsd, *server)
        [stats] = a.broker.relays
        self.assertEqual(len(a.tls_state.socket_relays.sides()), 2)
        return stats.as_dict()["tls"]

    @inlineCallbacks
    def test_psk13(self) -> Any:
        tls = yield self.relays(
            {"psk_file": self.keys(alice=ALICE_KEY), "psk_identity": "alice"},
            *("-psk", ALICE_KEY, "-psk_identity", "alice", "-nocert", "-tls1_3"),
        )
        self.assertEqual(tls["version"], "TLSv1.3")

    @inlineCallbacks
    def test_psk12(self) -> Any:
        tls = yield self.relays(
            {"psk_file": self.keys(alice=ALICE_KEY), "psk_identity": "alice"},
            *("-psk", ALICE_KEY, "-psk_identity", "alice", "-nocert", "-tls1_2"),
        )
        self.assertEqual(tls["version"], "TLSv1.2")
        self.assertIn("PSK", tls["cipher"])

    @inlineCallbacks
    def test_certificate(self) -> Any:
        server = self.ca.issue("openssl-server")
        tls = yield self.relays(
            {"trust_roots": self.ca.path},
            *("-cert", server.cert, "-key", server.key),
        )
        self.assertEqual(tls["peer"], "cert-san:localhost")
