"""
Helpers for tcpd's integration tests: in-process "hosts" (an ipcd with tcpd
on an ephemeral loopback port and its own RUNDIR), local test services, and
plain blocking TCP peers (run them in threads; every wait is bounded).
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
from dataclasses import dataclass
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from ipcd.names import listen_unix
from ipcd.relay import Side, SocketRelays
from ipcd.tap import IPCDService
from ipcd.test.support import (
    TIMEOUT,
    bounce,
    make_config,
    recv_upto,
    short_rundir,
    start_ipcd,
    wait_until,
)

# tcpd listens on loopback, on a port the kernel picks.
TCP_LISTEN = "tcp:0:interface=127.0.0.1"


@dataclass
class Host:
    """One in-process ipcd instance standing for a host."""

    service: IPCDService
    rundir: str
    port: int | None  # (None on a unix: listener)

    @property
    def broker(self) -> Any:
        return self.service.broker

    def route(self, service: str, remote: str | None = None) -> str:
        """The C{tcp://} URI of C{remote} (default C{service}) on this host."""
        return f"tcp://127.0.0.1:{self.port}/{remote or service}"


@inlineCallbacks
def start_host(
    case: SynchronousTestCase,
    rules: list[str] | tuple[str, ...] = (),
    pongd: bool = True,
    handshake_timeout: float = 5.0,
    listen: str = TCP_LISTEN,
    **overrides: Any,
) -> Any:
    """Start an ipcd with pongd (unless disabled) and tcpd; stopped after."""
    rundir = short_rundir(case, "ipcd-tcp-")
    config = make_config(
        rundir,
        tcpd={"listen": listen, "handshake_timeout": handshake_timeout},
        rules=list(rules),
        pongd={"enabled": pongd},
        **overrides,
    )
    service = yield start_ipcd(case, config)
    port = yield service.getServiceNamed("tcpd").listening()
    host = Host(service, rundir, getattr(port.getHost(), "port", None))
    # Runs after the test's own cleanups (which close its sockets): relays
    # end in a turn or two of the reactor.
    case.addCleanup(
        wait_until,
        lambda: not service.broker.relays and not inbound_relays(service),
        "relays to end",
    )
    return host


# Local services for the far end of a relay.


@implementer(IHalfCloseableProtocol)
class DigestService(Protocol):
    """
    Hashes everything it reads.  At EOF it answers C{b"COUNT HEXDIGEST"} and
    closes; or, as the factory says, just closes (C{on_eof="close"}) or
    ignores it (C{"ignore"}: a half-closeable service that keeps its side).
    It starts with reading paused when the factory says so (a receiver that
    is not reading).
    """

    def connectionMade(self) -> None:
        self.digest = hashlib.sha256()
        self.count = 0
        self.eof = False
        self.lost: Deferred[None] = Deferred()
        self.factory.connections.append(self)
        if self.factory.start_paused:
            self.transport.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        self.digest.update(data)
        self.count += len(data)

    def readConnectionLost(self) -> None:
        self.eof = True
        if self.factory.on_eof == "answer":
            answer = f"{self.count} {self.digest.hexdigest()}".encode()
            self.transport.write(answer)
        if self.factory.on_eof != "ignore":
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


class DigestFactory(Factory):
    protocol = DigestService
    noisy = False

    def __init__(self, on_eof: str = "answer", start_paused: bool = False) -> None:
        self.on_eof = on_eof
        self.start_paused = start_paused
        self.connections: list[DigestService] = []


def digest_service(
    case: SynchronousTestCase, rundir: str, name: str, **kwargs: Any
) -> DigestFactory:
    """Listen as local service C{name} in C{rundir}; stopped (and closed) after."""
    factory = DigestFactory(**kwargs)
    port = listen_unix(reactor, os.path.join(rundir, name), factory)
    case.addCleanup(port.stopListening)

    def drop_connections() -> Any:
        waits = []
        for protocol in factory.connections:
            protocol.transport.abortConnection()
            waits.append(protocol.lost)
        return gatherResults(waits)

    case.addCleanup(drop_connections)
    return factory


def relay_loop(service: IPCDService) -> SocketRelays:
    """The engine that runs an ipcd's tcpd relays."""
    return service.getServiceNamed("tcpd").relays


def inbound_relays(service: IPCDService) -> list[Side]:
    """
    The remote peers' sides (TCP, side A) of the inbound relays an ipcd's
    tcpd runs; C{side.peer} is the local service's.
    """
    sides = relay_loop(service).sides()
    return [s for s in sides if s.forward and s.stats.direction == "in"]


# Plain blocking peers.


def tcp_connect(port: int, host: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection((host, port), timeout=TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def bounce_through(port: int, service: bytes) -> bytes:
    """
    As a remote peer of tcpd on C{port}: ask for C{service} (which must be
    answered C{ok}), and what an echo service there sends back of a bounce.
    """
    with tcp_connect(port) as sock:
        sock.sendall(service)
        assert recv_upto(sock, 2) == b"ok"
        return bounce(sock)


# Read C{count} bytes (fewer at EOF).
recv_exactly = recv_upto


def recv_all(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    """Read up to EOF (bounded by the socket's timeout and by C{limit})."""
    data = b""
    while len(data) < limit:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def recv_eof(sock: socket.socket) -> bytes:
    """
    What a peer reads until its connection ends: data, then EOF or a reset
    (both mean the other side closed).
    """
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def abort(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0): the connection dies, no FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# PROXY headers a haproxy: listener refuses (ipcd.proxyheader), each of
# which Twisted's wrapper took: as the peer's address (ip:evil, ...), or
# with a traceback (the port 'x', the byte 0xff: not UTF-8).
BAD_PROXY_HEADERS = (
    b"PROXY TCP4 evil 127.0.0.1 5555 9000\r\n",
    b"PROXY TCP4 010.0.0.1 127.0.0.1 5555 9000\r\n",
    b"PROXY TCP4 10.0.0.1%lo 127.0.0.1 5555 9000\r\n",
    b"PROXY TCP6 fe80::1%lo ::1 5555 9000\r\n",
    b"PROXY TCP4 ::1 127.0.0.1 5555 9000\r\n",
    b"PROXY TCP4 10.0.0.1 127.0.0.1 x 9000\r\n",
    b"PROXY TCP4 \xff 127.0.0.1 5555 9000\r\n",
    b"PROXY TCP4 " + b"1" * 2000 + b" 127.0.0.1 5555 9000\r\n",
    b"PROXY TCP4 10.0.0.1 evil 5555 9000\r\n",
)


def first_bytes(port: int, data: bytes, count: int = 2) -> bytes:
    """Send C{data} to a listener: the first C{count} bytes of its answer."""
    with tcp_connect(port) as sock:
        sock.sendall(data)
        try:
            return recv_upto(sock, count)
        except ConnectionResetError:
            return b""


def proxy_v2_tcp6(source: str, port: int) -> bytes:
    """A PROXY v2 header: a TCP client at C{source} (IPv6) to C{[::1]:port}."""
    block = socket.inet_pton(socket.AF_INET6, source) + socket.inet_pton(
        socket.AF_INET6, "::1"
    )
    block += (5555).to_bytes(2, "big") + port.to_bytes(2, "big")
    signature = b"\r\n\r\n\x00\r\nQUIT\n"
    return signature + b"\x21\x21" + len(block).to_bytes(2, "big") + block
