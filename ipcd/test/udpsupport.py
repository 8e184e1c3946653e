"""
Helpers for udpd's integration tests: in-process "hosts" (an ipcd with udpd
on an ephemeral loopback port and its own RUNDIR), an ipcd subprocess whose
memory and fds can be read from /proc, a lossy relay between two udpds,
plain blocking UDP peers and a sender of forged-source HELLOs (run them in
threads; every wait is bounded).
"""

from __future__ import annotations

import ipaddress
import os
import random
import secrets
import socket
import struct
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import SynchronousTestCase

from ipcd.control import request
from ipcd.daemons.udp import wire as udpwire
from ipcd.daemons.udp.session import SessionStats
from ipcd.test.support import (
    HEADER,
    TIMEOUT,
    accepts,
    make_config,
    open_fds,
    proc_status,
    python_env,
    recv_upto,
    reset_peak,
    short_rundir,
    spawn,
    start_ipcd,
    wait_until,
)
from ipcd.test.tcpsupport import Host
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
    one has passed (C{reorder}); the first C{drop_hellos} HELLOs are lost,
    the first C{drop_cookied} of those carrying the server's cookie, and
    the first C{drop_oks} OKs.
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
        drop_cookied: int = 0,
        seed: int = 13,
        drop_oks: int = 0,
    ) -> None:
        self.target = target
        self.loss, self.reorder, self.duplicate = loss, reorder, duplicate
        self.drop_hellos, self.drop_cookied = drop_hellos, drop_cookied
        self.drop_oks = drop_oks
        self.random = random.Random(seed)
        self.client: Any = None
        self.held: dict[Any, bytes] = {}
        self.dropped = self.reordered = self.duplicated = 0

    def datagramReceived(self, datagram: bytes, address: Any) -> None:
        if address == self.target:
            to = self.client
        else:
            self.client, to = address, self.target
        if datagram[:1] == b"H" and self._lose_hello(datagram):
            self.dropped += 1
            return
        if datagram[:1] == b"O" and self.drop_oks:
            self.drop_oks -= 1
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

    def _lose_hello(self, datagram: bytes) -> bool:
        if self.drop_cookied and udpwire.decode(datagram).cookie != udpwire.NO_COOKIE:
            self.drop_cookied -= 1
            return True
        if self.drop_hellos:
            self.drop_hellos -= 1
            return True
        return False

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


def handshake(
    sock: socket.socket, port: int, service: bytes = b"pong", tries: int = 30
) -> tuple[udpwire.Datagram, list[bytes]]:
    """
    Open a session as a client's udpd does, on a plain socket: a HELLO,
    then the same HELLO with the cookie udpd's VERIFY gave.  Returns udpd's
    final answer (an OK or a NO) and every datagram it answered.  A try
    that gets no answer in a second is made again (C{tries} at most).
    """
    nonce = secrets.token_bytes(udpwire.ID_SIZE)
    hello = udpwire.hello(nonce, service)
    got: list[bytes] = []
    sock.settimeout(1.0)
    try:
        for _ in range(tries):
            sock.sendto(hello, ("127.0.0.1", port))
            try:
                while True:
                    got.append(sock.recv(65536))
                    answer = udpwire.decode(got[-1])
                    if isinstance(answer, udpwire.Verify):
                        hello = udpwire.hello(nonce, service, answer.cookie)
                        break
                    if isinstance(answer, udpwire.Accepted | udpwire.Refusal):
                        return answer, got
            except TimeoutError:
                continue
    finally:
        sock.settimeout(TIMEOUT)
    raise AssertionError(f"udpd at port {port} did not answer {tries} HELLOs")


def spend_cookies(
    port: int, host: str, count: int, service: bytes = b"pong"
) -> dict[str, int]:
    """
    Spend C{count} of udpd's cookies from C{host} (a loopback address):
    HELLOs, each with its own nonce, sent again with their VERIFY's
    cookie, 128 at a time; the NOs' reasons that came back, counted (an
    OK is counted as C{"OK"}, its session closed at once).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((host, 0))
        sock.settimeout(TIMEOUT)
        to = ("127.0.0.1", port)
        told: dict[str, int] = {}
        for start in range(0, count, 128):
            nonces = [secrets.token_bytes(8) for _ in range(min(128, count - start))]
            for nonce in nonces:
                sock.sendto(udpwire.hello(nonce, service), to)
            cookies: dict[bytes, bytes] = {}
            while len(cookies) < len(nonces):
                verify = udpwire.decode(sock.recv(65536))
                assert isinstance(verify, udpwire.Verify), verify
                cookies[verify.nonce] = verify.cookie
            for nonce, cookie in cookies.items():
                sock.sendto(udpwire.hello(nonce, service, cookie), to)
            for _ in cookies:
                answer = udpwire.decode(sock.recv(65536))
                if isinstance(answer, udpwire.Accepted):
                    sock.sendto(udpwire.close(answer.session), to)
                    reason = "OK"
                else:
                    assert isinstance(answer, udpwire.Refusal), answer
                    reason = answer.reason
                told[reason] = told.get(reason, 0) + 1
        return told


def open_session(sock: socket.socket, port: int) -> bytes:
    """A pong session from C{sock} (a plain peer); its id."""
    answer, _ = handshake(sock, port)
    assert isinstance(answer, udpwire.Accepted), answer
    return answer.session


def next_data(sock: socket.socket) -> udpwire.Data:
    """The next DATA datagram C{sock} receives (bounded wait)."""
    while True:
        answer = udpwire.decode(sock.recv(65536))
        if isinstance(answer, udpwire.Data):
            return answer


# Forged sources.


def can_forge() -> str | None:
    """Why forged-source datagrams cannot be sent here, or None."""
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW).close()
    except PermissionError:
        return "sending from forged addresses needs a raw socket (root or CAP_NET_RAW)"
    return None


def forged_hellos(port: int, count: int, service: bytes = b"pong") -> None:
    """
    Send C{count} HELLOs to 127.0.0.1:C{port} from C{count} other loopback
    addresses (127.1.0.1 on), none of which will ever answer: IP and UDP
    headers written here (a raw socket, IP_HDRINCL), as a spoofer would.
    """
    first = ipaddress.IPv4Address("127.1.0.1")
    destination = socket.inet_aton("127.0.0.1")
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        for n in range(count):
            hello = udpwire.hello(secrets.token_bytes(udpwire.ID_SIZE), service)
            udp = struct.pack("!HHHH", 40000 + n % 20000, port, 8 + len(hello), 0)
            # Version 4, 20-byte header, TTL 64; the kernel fills in the
            # length and checksum.  UDP's checksum 0: none (IPv4 allows it).
            ip = struct.pack(
                "!BBHHHBBH4s4s",
                0x45,
                0,
                0,
                0,
                0,
                64,
                socket.IPPROTO_UDP,
                0,
                (first + n).packed,
                destination,
            )
            raw.sendto(ip + udp + hello, ("127.0.0.1", 0))
            if n % 50 == 49:
                time.sleep(0.01)  # as a paced attacker: not lost to a full buffer


def icmp_prohibited(source: tuple[str, int], destination: tuple[str, int]) -> None:
    """
    An ICMP "communication administratively prohibited" (what a firewall's
    REJECT sends) for a UDP datagram from loopback C{source} to
    C{destination}, as the router on the way would send it back to
    C{source}: a raw socket (L{can_forge}).
    """

    def checksum(data: bytes) -> int:
        total = sum(struct.unpack(f"!{len(data) // 2}H", data))
        total = (total >> 16) + (total & 0xFFFF)
        return ~(total + (total >> 16)) & 0xFFFF

    udp = struct.pack("!HHHH", source[1], destination[1], 8, 0)
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(udp),
        0,
        0,
        64,
        socket.IPPROTO_UDP,
        0,
        socket.inet_aton(source[0]),
        socket.inet_aton(destination[0]),
    )
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    icmp = struct.pack("!BBHI", 3, 13, 0, 0) + ip + udp  # unreachable: prohibited
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as raw:
        raw.sendto(icmp, (source[0], 0))


# ipcd in a subprocess, seen from /proc.


@dataclass
class IpcdProcess:
    process: subprocess.Popen[bytes]
    rundir: str
    log: str

    @property
    def pid(self) -> int:
        return self.process.pid

    def memory(self, field: str = "VmRSS") -> int:
        """C{VmRSS} (or C{VmHWM}, ...) of /proc/PID/status, in bytes."""
        return proc_status(field, self.pid)

    def reset_peak(self) -> bool:
        """Reset VmHWM to the current RSS (Linux >= 4.0), if allowed."""
        return reset_peak(self.pid)

    def fds(self) -> dict[int, str]:
        """ipcd's open fds and what they point at."""
        return open_fds(self.pid)

    def settled_fds(self) -> dict[int, str] | None:
        """ipcd's fds if the same twice 0.1 s apart (else None: try again)."""
        first = self.fds()
        time.sleep(0.1)
        return first if self.fds() == first else None

    def udp_sockets(self) -> dict[int, int]:
        """ipcd's IPv4 UDP sockets: local port -> datagrams the kernel dropped."""
        inodes = set(self.fds().values())
        found = {}
        with open(f"/proc/{self.pid}/net/udp") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if f"socket:[{fields[9]}]" in inodes:
                    found[int(fields[1].split(":")[1], 16)] = int(fields[-1])
        return found

    @property
    def port(self) -> int:
        """udpd's listening port (ipcd's only UDP socket at start)."""
        [port] = self.udp_sockets()
        return port

    def status(self) -> dict[str, Any]:
        """C{ipcd status --json}, from the control socket."""
        return request("status", self.rundir, timeout=TIMEOUT)


@inlineCallbacks
def spawn_udp_ipcd(case: SynchronousTestCase) -> Any:
    """
    C{ipcd} (the command) in a subprocess, with pongd and udpd on an
    ephemeral loopback port, C{allow in pong}; killed after the test.
    """
    rundir = short_rundir(case, "ipcd-udpsub-")
    log = os.path.join(short_rundir(case, "ipcd-udplog-"), "ipcd.log")
    args = ["-m", "ipcd.scripts.ipcd", "--rundir", rundir, "--no-tcp", "--no-ws"]
    args += ["--no-tls", "--udp", UDP_LISTEN, "--allow", "in pong"]
    process = spawn(case, args, log, python_env(), rundir)
    ipcd = IpcdProcess(process, rundir, log)

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"ipcd exited: {open(log).read()}")
        return accepts(os.path.join(rundir, "ipc")) and len(ipcd.udp_sockets()) == 1

    yield wait_until(ready, "ipcd to listen", 3 * TIMEOUT)
    return ipcd
