"""
TLS 1.3 KeyUpdates that ask for one back, from a peer that reads nothing:
OpenSSL answers each, and what ipcd holds of those answers is bounded, on
tlsd's relay and before a refusal (tlsd's and websocketd's), where the
peer cannot hold its connection for ever.  The peer is the system's
libssl, through ctypes (pyOpenSSL has no C{SSL_key_update}).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import select
import socket
import struct
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from ipcd.compat import twisted as compat_twisted
from ipcd.daemons.outbox import socket_of
from ipcd.test.support import short_rundir, wait_until
from ipcd.test.test_tls import TlsTestCase
from ipcd.test.tlssupport import ALICE_KEY, start_tls_host
from ipcd.test.wssupport import make_ca, start_ws_host
from ipcd.wire import encode

# KeyUpdate's numbers in libssl.
_SSL_CTRL_SET_MIN_PROTO_VERSION = 123
_TLS1_3_VERSION = 0x0304
_SSL_KEY_UPDATE_REQUESTED = 1
_SSL_ERROR_WANT_WRITE = 3


# The PSK client callback: (ssl, hint, identity, its room, key, its room).
_PSK_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_uint,
    ctypes.c_void_p,
    ctypes.c_char_p,
    ctypes.c_void_p,
    ctypes.c_uint,
    ctypes.c_void_p,
    ctypes.c_uint,
)


def _libssl() -> Any:
    """The system's libssl, its functions typed; SkipTest without it."""
    found = ctypes.util.find_library("ssl")
    if found is None:
        raise SkipTest("no libssl to load (apt-get install libssl3)")
    lib = ctypes.CDLL(found)
    p, i = ctypes.c_void_p, ctypes.c_int
    for name, result, args in (
        ("TLS_client_method", p, []),
        ("SSL_CTX_new", p, [p]),
        ("SSL_CTX_ctrl", ctypes.c_long, [p, i, ctypes.c_long, p]),
        ("SSL_CTX_free", None, [p]),
        ("SSL_new", p, [p]),
        ("SSL_free", None, [p]),
        ("SSL_set_fd", i, [p, i]),
        ("SSL_connect", i, [p]),
        ("SSL_do_handshake", i, [p]),
        ("SSL_key_update", i, [p, i]),
        ("SSL_get_error", i, [p, i]),
        ("SSL_write", i, [p, ctypes.c_char_p, i]),
        ("SSL_read", i, [p, ctypes.c_char_p, i]),
        ("SSL_CTX_set_psk_client_callback", None, [p, _PSK_CALLBACK]),
    ):
        function = getattr(lib, name)
        function.restype, function.argtypes = result, args
    return lib


class KeyUpdater:
    """
    A TLS 1.3 connection with alice's key (unless not C{psk}) to C{port},
    asking tlsd for C{service} (None: for nothing): L{flood} sends KeyUpdates without
    reading, L{bounce} reads what came meanwhile and bounces a message.
    Blocking: run it in a thread.
    """

    def __init__(
        self,
        case: TestCase,
        port: int,
        service: bytes | None = b"pong",
        psk: bool = True,
    ) -> None:
        lib = self.lib = _libssl()
        key = bytes.fromhex(ALICE_KEY)

        def give_key(ssl, hint, identity, identity_room, out, room):  # type: ignore[no-untyped-def]
            ctypes.memmove(identity, b"alice\0", 6)
            ctypes.memmove(out, key, len(key))
            return len(key)

        self._callback = _PSK_CALLBACK(give_key)  # kept as long as the context
        self.ctx = lib.SSL_CTX_new(lib.TLS_client_method())
        case.addCleanup(lib.SSL_CTX_free, self.ctx)
        lib.SSL_CTX_ctrl(
            self.ctx, _SSL_CTRL_SET_MIN_PROTO_VERSION, _TLS1_3_VERSION, None
        )
        if psk:  # (else a certificate, not verified)
            lib.SSL_CTX_set_psk_client_callback(self.ctx, self._callback)
        self.sock = socket.socket()
        case.addCleanup(self.sock.close)
        # Small, so that what tlsd sends and this client leaves unread
        # soon fills it: the rest is tlsd's to hold.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        # Blocking (libssl reads the fd itself), each wait bounded.
        bound = struct.pack("ll", 30, 0)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, bound)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, bound)
        self.sock.connect(("127.0.0.1", port))
        self.ssl = lib.SSL_new(self.ctx)
        case.addCleanup(lib.SSL_free, self.ssl)
        lib.SSL_set_fd(self.ssl, self.sock.fileno())
        if lib.SSL_connect(self.ssl) != 1:
            raise AssertionError("the TLS handshake with tlsd failed")
        if service is not None:
            self.write(service)
            if self.read(2) != b"ok":
                raise AssertionError("tlsd did not answer ok")

    def write(self, data: bytes) -> None:
        if self.lib.SSL_write(self.ssl, data, len(data)) != len(data):
            raise AssertionError("SSL_write failed")

    def read(self, size: int) -> bytes:
        data = b""
        buffer = ctypes.create_string_buffer(size)
        while len(data) < size:
            n = self.lib.SSL_read(self.ssl, buffer, size - len(data))
            if n <= 0:
                raise AssertionError(f"SSL_read failed: {n}")
            data += buffer.raw[:n]
        return data

    def bounce(self, message: bytes) -> bytes:
        """Send C{message}, read as much back (what came first, unread)."""
        self.write(message)
        return self.read(len(message))

    def flood(self, most: int, stall: float = 1.0) -> int:
        """
        Send up to C{most} KeyUpdates, each asking for one back, reading
        nothing; stop early once none could go for C{stall} seconds (tlsd
        stopped reading), or tlsd closed.  How many went.
        """
        lib, ssl = self.lib, self.ssl
        self.sock.setblocking(False)
        sent = 0
        try:
            while sent < most:
                # (Refused while the last one waits to go: then retried.)
                lib.SSL_key_update(ssl, _SSL_KEY_UPDATE_REQUESTED)
                result = lib.SSL_do_handshake(ssl)
                if result == 1:
                    sent += 1
                    continue
                if lib.SSL_get_error(ssl, result) != _SSL_ERROR_WANT_WRITE:
                    break  # closed by tlsd
                _, writable, _ = select.select([], [self.sock], [], stall)
                if not writable:
                    break
        finally:
            self.sock.setblocking(True)
        return sent


class KeyUpdateFloodTests(TlsTestCase):
    """
    A peer that sends TLS 1.3 KeyUpdates asking for one back, and never
    reads, makes OpenSSL answer each: tlsd holds at most a bound of those
    answers for it (then reads it no more), not all of them; once it reads,
    the relay goes on.
    """

    @inlineCallbacks
    def test_answersHeldBounded(self) -> Any:
        from ipcd.relay.sides import MAX_OWED, READ, READ_SIZE

        b = yield self.psk_server(["allow in pong psk:alice"], alice=ALICE_KEY)
        relays = b.tls_state.socket_relays
        peer = yield deferToThread(KeyUpdater, self, b.port)
        yield wait_until(lambda: len(relays.sides()) == 2, "the relay on raw sockets")
        [tls_side] = [side for side in relays.sides() if side.codec is not None]
        # A small send buffer on tlsd's end too: its answers soon wait in tlsd.
        tls_side.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        # Rounds until tlsd stops reading (a slow tlsd only takes more), at
        # most 200,000: 5.4 MB of answers, ten times the bound, if tlsd
        # read them all.
        sent = 0
        while tls_side.where & READ and sent < 200_000:
            sent += yield deferToThread(peer.flood, 20_000)
        yield wait_until(
            lambda: not tls_side.where & READ, f"tlsd to stop reading ({sent} sent)"
        )
        self.assertLessEqual(relays.buffered(), MAX_OWED + READ_SIZE)
        # It reads (all tlsd's answers, then the echo): the relay goes on.
        echo = yield deferToThread(peer.bounce, encode(b"after the flood"))
        self.assertEqual(echo, encode(b"after the flood"))

    @inlineCallbacks
    def test_refusedPeerThatReadsNothingCut(self) -> Any:
        """
        A peer that fills tlsd's buffer towards it with the answers to its
        KeyUpdates, and reads nothing, is refused at the handshake deadline
        (it sent no request); it cannot then hold its connection (and its
        place under the listener's limits) for ever: it is cut.
        """
        tlsd = {"psk_file": self.keys(alice=ALICE_KEY), "handshake_timeout": 1.0}
        b = yield start_tls_host(self, tlsd, rules=["allow in pong psk:alice"])
        limits = b.broker.limits_for("tlsd")
        peer = yield deferToThread(KeyUpdater, self, b.port, None)
        listener = b.service.getServiceNamed("tlsd").listener.factory
        [wrapper] = listener.protocols
        # A small send buffer on tlsd's end: its answers soon wait in tlsd.
        tcp = socket_of(wrapper.transport)
        tcp.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        counters, timed_out = b.broker.counters, "tlsd: handshakes timed out"
        sent = 0
        while not counters[timed_out] and sent < 1_000_000:
            sent += yield deferToThread(peer.flood, 5_000)
        self.assertEqual(counters[timed_out], 1)
        yield wait_until(lambda: limits.total == 0, "the refused peer to be cut")
        self.assertEqual(listener.protocols, {})


class TwistedTlsKeyUpdateTests(TlsTestCase):
    """
    While Twisted's TLS carries a connection (its handshake and request,
    and its relay when C{socket_relay} is off), a peer sending KeyUpdates
    that ask for one back, and reading nothing, is not read once tlsd's
    buffer towards it is full (Twisted's C{bufferSize}) and its own records
    add to it: tlsd holds at most twice that, not every answer.  Once the
    peer reads, it is read again.
    """

    # Twisted's bufferSize (64 KiB), then the answers to one read (its
    # records, 64 KiB at most).
    BOUND = 2 * 64 * 1024

    @inlineCallbacks
    def flood_until_unread(self, b: Any, peer: KeyUpdater) -> Any:
        """
        Flood tlsd's one connection from C{peer} until tlsd stops reading
        it (in rounds: a slow tlsd only takes more), at most 200,000
        KeyUpdates (some 3 MB of answers, were they all held): its TCP
        transport.
        """
        from twisted.internet import reactor

        listener = b.service.getServiceNamed("tlsd").listener.factory
        [wrapper] = listener.protocols
        tcp = socket_of(wrapper.transport)
        # A small send buffer on tlsd's end: its answers soon wait in tlsd.
        tcp.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sent = 0
        while tcp in reactor.getReaders() and sent < 200_000:
            sent += yield deferToThread(peer.flood, 20_000)
        yield wait_until(
            lambda: tcp not in reactor.getReaders(),
            f"tlsd to stop reading ({sent} sent)",
        )
        self.assertLessEqual(compat_twisted.buffered(tcp), self.BOUND)
        return tcp

    @inlineCallbacks
    def test_beforeTheRequest(self) -> Any:
        """
        Before its request (a deadline that cannot pass first): then it
        reads, sends its request and is relayed.
        """
        tlsd = {"psk_file": self.keys(alice=ALICE_KEY), "handshake_timeout": 60}
        b = yield start_tls_host(self, tlsd, rules=["allow in pong psk:alice"])
        peer = yield deferToThread(KeyUpdater, self, b.port, None)
        yield self.flood_until_unread(b, peer)
        yield deferToThread(peer.write, b"pong")
        answer = yield deferToThread(peer.read, 2)
        self.assertEqual(answer, b"ok")
        echo = yield deferToThread(peer.bounce, encode(b"after the flood"))
        self.assertEqual(echo, encode(b"after the flood"))

    @inlineCallbacks
    def test_relayThroughTwisted(self) -> Any:
        """C{socket_relay = false}: on the relay; then it reads, and it goes on."""
        tlsd = {"psk_file": self.keys(alice=ALICE_KEY), "socket_relay": False}
        b = yield start_tls_host(self, tlsd, rules=["allow in pong psk:alice"])
        peer = yield deferToThread(KeyUpdater, self, b.port)
        # (It has its ok: the relay is on, through Twisted.)
        self.assertEqual(b.tls_state.socket_relays.sides(), [])
        yield self.flood_until_unread(b, peer)
        echo = yield deferToThread(peer.bounce, encode(b"after the flood"))
        self.assertEqual(echo, encode(b"after the flood"))


class WebSocketKeyUpdateTests(TestCase):
    @inlineCallbacks
    def test_refusedPeerThatReadsNothingCut(self) -> Any:
        """
        websocketd, on a C{ssl:} listener: a peer that fills its buffer
        towards it with the answers to its KeyUpdates, reading nothing, then
        asks for a service it may not reach, is refused (HTTP 403, then a
        close once that is sent); it cannot then hold its connection for
        ever: it is cut.
        """
        _, cert, key = make_ca(short_rundir(self, "ipcd-ca-"))
        listen = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        # (A deadline that cannot pass first, however slow the machine.)
        b = yield start_ws_host(self, listen=listen, open_handshake_timeout=60)
        peer = yield deferToThread(KeyUpdater, self, b.port, None, False)
        listener = b.service.getServiceNamed("websocketd").listener.factory
        [wrapper] = listener.protocols
        # A small send buffer on websocketd's end: its answers soon wait there.
        tcp = socket_of(wrapper.transport)
        tcp.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        yield deferToThread(peer.flood, 20_000)
        request = (
            b"GET /secret HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        yield deferToThread(peer.write, request)
        yield wait_until(
            lambda: b.broker.counters["refused"] == 1, "the request to be refused"
        )
        yield wait_until(lambda: not listener.protocols, "the refused peer to be cut")
        self.assertEqual(listener.limits.total, 0)
