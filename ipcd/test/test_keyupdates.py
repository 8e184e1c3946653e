"""
TLS 1.3 KeyUpdates that ask for one back, from a peer that reads nothing:
OpenSSL answers each, and what ipcd holds of those answers is bounded, on
tlsd's relays and before its request, on websocketd's C{ssl:} listener and
its C{wss://} routes (before and after the WebSocket opens), and before a
refusal (tlsd's and websocketd's), where the peer cannot hold its
connection for ever.  The peer is the system's libssl, through ctypes
(pyOpenSSL has no C{SSL_key_update}), as a client or as a server.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
import select
import socket
import ssl
import struct
import termios
import threading
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from ipcd.compat import twisted as compat_twisted
from ipcd.daemons.outbox import socket_of
from ipcd.test.support import (
    bounce,
    connect_unix,
    lookup,
    make_config,
    read_reply,
    short_rundir,
    start_ipcd,
    wait_until,
)
from ipcd.test.test_tls import TlsTestCase
from ipcd.test.tlssupport import ALICE_KEY, start_tls_host
from ipcd.test.wssupport import BINARY, make_ca, start_ws_host, ws_accepted, ws_frame
from ipcd.wire import encode

# KeyUpdate's numbers in libssl.
_SSL_CTRL_SET_MIN_PROTO_VERSION = 123
_TLS1_3_VERSION = 0x0304
_SSL_KEY_UPDATE_REQUESTED = 1
_SSL_ERROR_WANT_READ = 2
_SSL_ERROR_WANT_WRITE = 3
_SSL_FILETYPE_PEM = 1


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
        ("TLS_server_method", p, []),
        ("SSL_CTX_new", p, [p]),
        ("SSL_CTX_ctrl", ctypes.c_long, [p, i, ctypes.c_long, p]),
        ("SSL_CTX_free", None, [p]),
        ("SSL_new", p, [p]),
        ("SSL_free", None, [p]),
        ("SSL_set_fd", i, [p, i]),
        ("SSL_connect", i, [p]),
        ("SSL_accept", i, [p]),
        ("SSL_CTX_use_certificate_chain_file", i, [p, ctypes.c_char_p]),
        ("SSL_CTX_use_PrivateKey_file", i, [p, ctypes.c_char_p, i]),
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
        lib = self._context(case, "TLS_client_method")
        key = bytes.fromhex(ALICE_KEY)

        def give_key(ssl, hint, identity, identity_room, out, room):  # type: ignore[no-untyped-def]
            ctypes.memmove(identity, b"alice\0", 6)
            ctypes.memmove(out, key, len(key))
            return len(key)

        self._callback = _PSK_CALLBACK(give_key)  # kept as long as the context
        if psk:  # (else a certificate, not verified)
            lib.SSL_CTX_set_psk_client_callback(self.ctx, self._callback)
        sock = socket.socket()
        case.addCleanup(sock.close)
        self._bound_waits(sock)
        sock.connect(("127.0.0.1", port))
        self._secure(case, sock, lib.SSL_connect)
        if service is not None:
            self.write(service)
            if self.read(2) != b"ok":
                raise AssertionError("tlsd did not answer ok")

    def _context(self, case: TestCase, method: str) -> Any:
        """libssl, and a TLS 1.3 context (C{self.ctx}) of C{method}."""
        lib = self.lib = _libssl()
        self.ctx = lib.SSL_CTX_new(getattr(lib, method)())
        case.addCleanup(lib.SSL_CTX_free, self.ctx)
        lib.SSL_CTX_ctrl(
            self.ctx, _SSL_CTRL_SET_MIN_PROTO_VERSION, _TLS1_3_VERSION, None
        )
        return lib

    @staticmethod
    def _bound_waits(sock: socket.socket) -> None:
        # Small, so that what ipcd sends and this end leaves unread soon
        # fills it: the rest is ipcd's to hold.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        # Blocking (libssl reads the fd itself), each wait bounded.
        bound = struct.pack("ll", 30, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, bound)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, bound)

    def _secure(self, case: TestCase, sock: socket.socket, handshake: Any) -> None:
        """TLS on C{sock}, by C{handshake} (C{SSL_connect} or C{SSL_accept})."""
        lib = self.lib
        self.sock = sock
        self.ssl = lib.SSL_new(self.ctx)
        case.addCleanup(lib.SSL_free, self.ssl)
        lib.SSL_set_fd(self.ssl, sock.fileno())
        if handshake(self.ssl) != 1:
            raise AssertionError("the TLS handshake with ipcd failed")

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

    def read_head(self) -> bytes:
        """An HTTP head, through its blank line (byte by byte: no more)."""
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += self.read(1)
        return head

    def drain(self, until: threading.Event) -> None:
        """
        Read what comes (records only: data is not expected) until C{until}
        is set: what ipcd owes this end, when nothing else comes.
        """
        lib, ssl = self.lib, self.ssl
        buffer = ctypes.create_string_buffer(4096)
        self.sock.setblocking(False)
        try:
            while not until.is_set():
                n = lib.SSL_read(ssl, buffer, len(buffer))
                if n > 0:
                    raise AssertionError(f"data while draining: {buffer.raw[:n]!r}")
                if lib.SSL_get_error(ssl, n) != _SSL_ERROR_WANT_READ:
                    raise AssertionError("SSL_read failed while draining")
                select.select([self.sock], [], [], 0.1)
        finally:
            self.sock.setblocking(True)


class KeyUpdatingServer(KeyUpdater):
    """
    A TLS 1.3 server with certificate C{cert} and its C{key}, on a
    loopback port (C{port}) for one connection: L{accept} takes it.
    """

    def __init__(self, case: TestCase, cert: str, key: str) -> None:
        lib = self._context(case, "TLS_server_method")
        if lib.SSL_CTX_use_certificate_chain_file(self.ctx, cert.encode()) != 1:
            raise AssertionError(f"libssl cannot load {cert}")
        if (
            lib.SSL_CTX_use_PrivateKey_file(self.ctx, key.encode(), _SSL_FILETYPE_PEM)
            != 1
        ):
            raise AssertionError(f"libssl cannot load {key}")
        self.case = case
        self.listening = socket.socket()
        case.addCleanup(self.listening.close)
        self.listening.bind(("127.0.0.1", 0))
        self.listening.listen(1)
        self.listening.settimeout(30)
        self.port = self.listening.getsockname()[1]

    def accept(self) -> int:
        """Take the connection, and its TLS handshake: the peer's port."""
        sock, (_, port) = self.listening.accept()
        self.case.addCleanup(sock.close)
        sock.settimeout(None)
        self._bound_waits(sock)
        self._secure(self.case, sock, self.lib.SSL_accept)
        return port


def patient_lookup(rundir: str, payload: bytes) -> Any:
    """A lookup of C{payload} answered within a minute."""
    with connect_unix(os.path.join(rundir, "ipc")) as sock:
        sock.settimeout(60)
        sock.sendall(encode(payload))
        return read_reply(sock)


# A WebSocket over a KeyUpdater, as RFC 6455 has it.
def ws_request(path: str) -> bytes:
    """An opening handshake asking for a WebSocket to C{path}."""
    return (
        f"GET /{path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    ).encode()


def ws_upgrade(peer: KeyUpdater, path: str) -> bytes:
    """Ask for a WebSocket to C{path}: the answer's head."""
    peer.write(ws_request(path))
    return peer.read_head()


def ws_bounce(peer: KeyUpdater, payload: bytes) -> bytes:
    """Send C{payload} (under 126 bytes) in a client's frame: the server's back."""
    peer.write(ws_frame(payload, BINARY))
    head = peer.read(2)
    return peer.read(head[1])


def ws_echo(peer: KeyUpdater) -> None:
    """Send a client's message (under 126 bytes) back, as a server does."""
    first, second = peer.read(2)
    mask = peer.read(4)
    masked = peer.read(second & 0x7F)
    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(masked))
    peer.write(bytes([first, len(payload)]) + payload)


# What Twisted's TLS may hold for a peer it no longer reads: Twisted's
# bufferSize (64 KiB), then the answers to one read (its records, 64 KiB
# at most).
BOUND = 2 * 64 * 1024


@inlineCallbacks
def flood_until_unread(
    case: TestCase,
    tcp: Any,
    flood: Any,
    what: str,
    most: int = 200_000,
    rounds: int = 20_000,
) -> Any:
    """
    Flood the peer of C{tcp} (the reactor's TCP connection) with
    C{flood(count)} (a KeyUpdater's) until C{tcp} is no longer read (in
    C{rounds}: a slow ipcd only takes more), at most C{most} KeyUpdates
    (some 3 MB of answers, were they all held); then what C{tcp} holds is
    within L{BOUND}.  (Smaller rounds leave fewer unread in the kernel's
    buffers when it stops.)
    """
    from twisted.internet import reactor

    # A small send buffer on ipcd's end: its answers soon wait in ipcd.
    tcp.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sent = 0
    while tcp in reactor.getReaders() and sent < most:
        sent += yield deferToThread(flood, rounds)
    yield wait_until(
        lambda: tcp not in reactor.getReaders(),
        f"{what} to stop reading ({sent} sent)",
    )
    case.assertLessEqual(compat_twisted.buffered(tcp), BOUND)


@inlineCallbacks
def flood_listener(case: TestCase, host: Any, section: str, peer: KeyUpdater) -> Any:
    """L{flood_until_unread} on the one connection of C{section}'s listener."""
    listener = host.service.getServiceNamed(section).listener.factory
    [wrapper] = listener.protocols
    yield flood_until_unread(case, socket_of(wrapper.transport), peer.flood, section)


@inlineCallbacks
def drain_until_read(tcp: Any, peer: KeyUpdater, what: str) -> Any:
    """
    C{peer} reads what C{tcp} holds for it until C{tcp} is read again and
    has read all the peer sent.
    """
    from twisted.internet import reactor

    def unread() -> int:
        held = fcntl.ioctl(tcp.fileno(), termios.FIONREAD, b"\0" * 4)
        return int(struct.unpack("i", held)[0])

    read = threading.Event()
    draining = deferToThread(peer.drain, read)
    try:
        yield wait_until(
            lambda: tcp in reactor.getReaders() and not unread(),
            f"{what} to read all again",
            timeout=60,
        )
    finally:
        read.set()
    yield draining


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

    @inlineCallbacks
    def test_beforeTheRequest(self) -> Any:
        """
        Before its request (a deadline that cannot pass first): then it
        reads, sends its request and is relayed.
        """
        tlsd = {"psk_file": self.keys(alice=ALICE_KEY), "handshake_timeout": 60}
        b = yield start_tls_host(self, tlsd, rules=["allow in pong psk:alice"])
        peer = yield deferToThread(KeyUpdater, self, b.port, None)
        yield flood_listener(self, b, "tlsd", peer)
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
        yield flood_listener(self, b, "tlsd", peer)
        echo = yield deferToThread(peer.bounce, encode(b"after the flood"))
        self.assertEqual(echo, encode(b"after the flood"))


class WebSocketKeyUpdateTests(TestCase):
    """
    websocketd over TLS (its C{ssl:} listener, its C{wss://} routes): a
    peer sending KeyUpdates that ask for one back, and reading nothing, is
    not read once websocketd's buffer towards it is full and its own
    records add to it: websocketd holds at most L{BOUND} for it, not every
    answer, and serves others meanwhile.  Once the peer reads, it is read
    again.
    """

    @inlineCallbacks
    def wss_host(self, **websocketd: Any) -> Any:
        """websocketd on an C{ssl:} listener; its CA is C{self.ca}."""
        self.ca, cert, key = make_ca(short_rundir(self, "ipcd-ca-"))
        listen = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        host = yield start_ws_host(self, listen=listen, **websocketd)
        return host

    @inlineCallbacks
    def test_beforeTheWebSocketOpens(self) -> Any:
        """
        Before its opening handshake (a deadline that cannot pass first):
        meanwhile a route over wss from another host is served; then the
        peer reads, opens its WebSocket and is relayed.
        """
        b = yield self.wss_host(open_handshake_timeout=60)
        peer = yield deferToThread(KeyUpdater, self, b.port, None, False)
        yield flood_listener(self, b, "websocketd", peer)
        a = yield start_ws_host(self, pongd=False, rules=(), ca=self.ca)
        route = f"pong;pong {b.route('pong')}".encode()
        reply = yield deferToThread(lookup, a.rundir, route)
        answer = yield deferToThread(bounce, reply.take_socket(self), b"meanwhile")
        self.assertEqual(answer, encode(b"meanwhile"))
        head = yield deferToThread(ws_upgrade, peer, "pong")
        self.assertTrue(head.startswith(b"HTTP/1.1 101 "), head)
        echo = yield deferToThread(ws_bounce, peer, b"after the flood")
        self.assertEqual(echo, b"after the flood")

    @inlineCallbacks
    def test_afterTheWebSocketOpened(self) -> Any:
        """Once its WebSocket is open, on the bridge: then it reads, and it goes on."""
        b = yield self.wss_host()
        peer = yield deferToThread(KeyUpdater, self, b.port, None, False)
        head = yield deferToThread(ws_upgrade, peer, "pong")
        self.assertTrue(head.startswith(b"HTTP/1.1 101 "), head)
        yield flood_listener(self, b, "websocketd", peer)
        echo = yield deferToThread(ws_bounce, peer, b"after the flood")
        self.assertEqual(echo, b"after the flood")

    @inlineCallbacks
    def test_wssRouteToAFloodingServer(self) -> Any:
        """
        websocketd dialling a C{wss://} route, to a server that floods it
        before and after it opens the WebSocket (deadlines that cannot pass
        first): each time, once the server reads, the route goes on.
        """
        from twisted.internet import reactor, tcp

        ca, cert, key = make_ca(short_rundir(self, "ipcd-ca-"))
        server = KeyUpdatingServer(self, cert, key)
        a = yield start_ws_host(
            self,
            pongd=False,
            rules=(),
            ca=ca,
            open_handshake_timeout=60,
            ipcd={"connect_timeout": 60},
        )
        route = f"pong;pong wss://127.0.0.1:{server.port}/pong".encode()
        asked = deferToThread(patient_lookup, a.rundir, route)
        port = yield deferToThread(server.accept)
        [dialled] = [
            reader
            for reader in reactor.getReaders()
            if isinstance(reader, tcp.Client) and reader.getHost().port == port
        ]
        head = yield deferToThread(server.read_head)
        what = "websocketd's wss client"
        for message in (b"after the first flood", b"after the second"):
            yield flood_until_unread(self, dialled, server.flood, what, rounds=2_000)
            yield drain_until_read(dialled, server, what)
            if not asked.called:  # the first time: open the WebSocket
                yield deferToThread(server.write, ws_accepted(head))
                sock = (yield asked).take_socket(self)
            echoed = deferToThread(ws_echo, server)
            answer = yield deferToThread(bounce, sock, message)
            yield echoed
            self.assertEqual(answer, encode(message))

    @inlineCallbacks
    def test_refusedPeerThatReadsNothingCut(self) -> Any:
        """
        websocketd, on a C{ssl:} listener: a peer that asks for a service
        it may not reach and fills websocketd's buffer towards it with the
        answers to the KeyUpdates it sends in the same read, reading
        nothing, is refused (HTTP 403, then a close once that is sent); it
        cannot then hold its connection for ever: it is cut.
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
        # Read once 32 KiB have come: the request and KeyUpdates in one
        # read (a peer full of KeyUpdates is not read: OwedGuard), whose
        # answers the 403 waits behind.
        tcp.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 32 * 1024)
        yield deferToThread(peer.write, ws_request("secret"))
        yield deferToThread(peer.flood, 20_000)
        yield wait_until(
            lambda: b.broker.counters["refused"] == 1, "the request to be refused"
        )
        yield wait_until(lambda: not listener.protocols, "the refused peer to be cut")
        self.assertEqual(listener.limits.total, 0)


class MetricsKeyUpdateTests(TestCase):
    @inlineCallbacks
    def test_sslListenerBounded(self) -> Any:
        """
        The metrics' C{ssl:} listener speaks TLS as tlsd does: a peer
        sending KeyUpdates and reading nothing is not read once what it
        leaves unread passes the bound (with Twisted's own TLS, every
        answer was held until the idle timeout, 60 s), and a scrape over
        TLS is answered meanwhile.
        """
        _, cert, key = make_ca(short_rundir(self, "ipcd-ca-"))
        listen = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        config = make_config(
            short_rundir(self, "ipcd-metrics-"), metrics={"listen": listen}
        )
        service = yield start_ipcd(self, config)
        port = (yield service.getServiceNamed("metrics").listening()).getHost().port
        peer = yield deferToThread(KeyUpdater, self, port, None, False)
        listener = service.getServiceNamed("metrics").factory
        [wrapper] = listener.protocols
        yield flood_until_unread(
            self, socket_of(wrapper.transport), peer.flood, "the metrics listener"
        )

        def scrape() -> bytes:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
                with context.wrap_socket(raw) as tls:
                    tls.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                    return b"".join(iter(lambda: tls.recv(65536), b""))

        answer = yield deferToThread(scrape)
        self.assertTrue(answer.startswith(b"HTTP/1.0 200 "), answer[:100])
