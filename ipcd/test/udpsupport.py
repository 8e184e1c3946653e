"""
Helpers for udpd's integration tests: in-process "hosts" (an ipcd with udpd
on an ephemeral loopback port and its own RUNDIR), a lossy relay between two
udpds, and plain blocking UDP peers (run them in threads; every wait is
bounded).
"""

from __future__ import annotations

import random
import socket
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import SynchronousTestCase

from ipcd.test.support import (
    HEADER,
    TIMEOUT,
    make_config,
    recv_upto,
    short_rundir,
    start_ipcd,
    wait_until,
)
from ipcd.test.tcpsupport import Host
from ipcd.transports.udpsession import SessionStats
from ipcd.wire import encode

UDP_LISTEN = "udp:0:interface=127.0.0.1"


class UdpHost(Host):
    """One in-process ipcd instance with udpd, standing for a host."""

    @property
    def server(self) -> Any:
        """udpd's listening protocol (its sessions, by id)."""
        return self.service.getServiceNamed("udpd").server

    def route(self, service: str, port: int | None = None) -> str:
        return f"udp://127.0.0.1:{port or self.port}/{service}"

    def sessions(self) -> list[SessionStats]:
        return [s for s in self.broker.relays if isinstance(s, SessionStats)]

    def session(self) -> SessionStats:
        [stats] = self.sessions()
        return stats


@inlineCallbacks
def start_udp_host(
    case: SynchronousTestCase,
    rules: list[str] | tuple[str, ...] = (),
    pongd: bool = True,
    config: dict[str, Any] | None = None,
    **udpd: Any,
) -> Any:
    """
    Start an ipcd with pongd (unless disabled) and udpd (C{udpd}: its
    section's keys), C{config} the rest of its configuration; stopped after.
    """
    rundir = short_rundir(case, "ipcd-udp-")
    service = yield start_ipcd(
        case,
        make_config(
            rundir,
            udpd={"enabled": True, "listen": UDP_LISTEN, **udpd},
            rules=list(rules),
            pongd={"enabled": pongd},
            **(config or {}),
        ),
    )
    _, port = service.getServiceNamed("udpd").address()
    # Runs after the test's own cleanups (which close its sockets): the
    # sessions end with their CLOSE datagrams in a turn or two.
    case.addCleanup(wait_until, lambda: not service.broker.relays, "sessions to end")
    return UdpHost(service, rundir, port)


class LossyRelay(DatagramProtocol):
    """
    A lossy network between one client udpd and the server udpd at
    C{target}: each datagram, either way, is dropped with probability
    C{loss}, sent twice with C{duplicate}, or held back until the next
    one has passed (C{reorder}); the first C{drop_hellos} HELLOs are lost.
    Seeded: the same datagrams meet the same fate.
    """

    noisy = False

    def __init__(
        self,
        target: tuple[str, int],
        loss: float = 0.1,
        reorder: float = 0.1,
        duplicate: float = 0.05,
        drop_hellos: int = 0,
        seed: int = 13,
    ) -> None:
        self.target = target
        self.loss, self.reorder, self.duplicate = loss, reorder, duplicate
        self.drop_hellos = drop_hellos
        self.random = random.Random(seed)
        self.client: Any = None
        self.held: dict[Any, bytes] = {}
        self.dropped = self.reordered = self.duplicated = 0

    def datagramReceived(self, datagram: bytes, address: Any) -> None:
        if address == self.target:
            to = self.client
        else:
            self.client, to = address, self.target
        if datagram[:1] == b"H" and self.drop_hellos:
            self.drop_hellos -= 1
            self.dropped += 1
            return
        fate = self.random.random()
        if fate < self.loss:
            self.dropped += 1
            return
        if fate < self.loss + self.reorder and to not in self.held:
            self.held[to] = datagram
            self.reordered += 1
            reactor.callLater(0.05, self.release, to)
            return
        self.transport.write(datagram, to)
        if fate > 1 - self.duplicate:
            self.duplicated += 1
            self.transport.write(datagram, to)
        self.release(to)

    def release(self, to: Any) -> None:
        held = self.held.pop(to, None)
        if held is not None and self.transport is not None:
            self.transport.write(held, to)


def lossy_relay(case: SynchronousTestCase, target: int, **kwargs: Any) -> Any:
    """A L{LossyRelay} to udpd's C{target} port; returns (relay, its port)."""
    relay = LossyRelay(("127.0.0.1", target), **kwargs)
    port = reactor.listenUDP(0, relay, interface="127.0.0.1")
    case.addCleanup(port.stopListening)
    return relay, port.getHost().port


# Plain blocking peers.


def udp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def answers(port: int, datagram: bytes, wait: float = 0.3) -> list[bytes]:
    """Send C{datagram} to udpd from a fresh port; all it answers in C{wait}."""
    with udp_socket() as sock:
        sock.sendto(datagram, ("127.0.0.1", port))
        sock.settimeout(wait)
        got = []
        try:
            while True:
                got.append(sock.recv(65536))
        except TimeoutError:
            return got


def read_message(sock: socket.socket) -> bytes | None:
    """One framed message's payload; None at EOF."""
    header = recv_upto(sock, HEADER.size)
    if len(header) < HEADER.size:
        return None
    (size,) = HEADER.unpack(header)
    return recv_upto(sock, size)


def burst(sock: socket.socket, count: int, quiet: float = 1.0) -> list[bytes]:
    """
    Send C{count} numbered messages, 50 at a time (so that no socket buffer
    on the way overflows: the losses are the relay's); the echoes that come
    back, in order.
    """
    for n in range(count):
        sock.sendall(encode(b"m%05d" % n))
        if n % 50 == 49:
            time.sleep(0.02)
    sock.settimeout(quiet)
    got = []
    try:
        while (message := read_message(sock)) is not None:
            got.append(message)
    except TimeoutError:
        pass
    sock.settimeout(TIMEOUT)
    return got


def probe(sock: socket.socket, tries: int = 30) -> bytes | None:
    """Send messages until one comes back through a lossy path."""
    sock.settimeout(0.2)
    try:
        for n in range(tries):
            sock.sendall(encode(b"probe %d" % n))
            try:
                while (message := read_message(sock)) is not None:
                    if message.startswith(b"probe"):
                        return message
            except TimeoutError:
                continue
        return None
    finally:
        sock.settimeout(TIMEOUT)


def eof_within(sock: socket.socket, timeout: float = TIMEOUT) -> bool:
    """Whether the peer closes C{sock} within C{timeout} (data is skipped)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True
