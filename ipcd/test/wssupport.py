"""
Helpers for websocketd's integration tests: in-process hosts with websocketd
on an ephemeral loopback port, a test CA for C{wss}, and a minimal blocking
WebSocket client written here from RFC 6455 (no autobahn, no libipc), to
run in threads; every wait is bounded.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
import select
import socket
import ssl
import struct
import time
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase

from ipcd.tap import IPCDService
from ipcd.test.support import (
    TIMEOUT,
    calls_to,
    make_config,
    proc_status,
    reset_peak,
    short_rundir,
    start_ipcd,
    tcp_listeners,
    wait_until,
)

WS_LISTEN = "tcp:0:interface=127.0.0.1"
TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA


@dataclass
class WsHost:
    """One in-process ipcd with websocketd, standing for a host."""

    service: IPCDService
    rundir: str
    port: int
    scheme: str = "ws"

    @property
    def broker(self) -> Any:
        return self.service.broker

    def route(self, service: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/{service}"


@inlineCallbacks
def start_ws_host(
    case: SynchronousTestCase,
    rules: list[str] | tuple[str, ...] = ("allow in pong",),
    pongd: bool = True,
    listen: str = WS_LISTEN,
    redirects: dict[str, str] | None = None,
    routes: dict[str, str] | None = None,
    dns: dict[str, Any] | None = None,
    ipcd: dict[str, Any] | None = None,
    limits: dict[str, Any] | None = None,
    **websocketd: Any,
) -> Any:
    """
    Start an ipcd with websocketd (and pongd); stopped after the test.
    C{ipcd}, C{limits}: its C{[ipcd]}, C{[limits]} settings.
    """
    rundir = short_rundir(case, "ipcd-ws-")
    settings = {"listen": listen, "ping_interval": 0, **websocketd}
    config = make_config(
        rundir,
        websocketd=settings,
        rules=list(rules),
        pongd={"enabled": pongd},
        redirects=redirects or {},
        routes=routes or {},
        dns=dns or {},
        ipcd=ipcd or {},
        limits=limits or {},
    )
    service = yield start_ipcd(case, config)
    port = yield service.getServiceNamed("websocketd").listening()
    host = WsHost(
        service,
        rundir,
        getattr(port.getHost(), "port", None),  # (None: unix:)
        "wss" if listen.startswith("ssl:") else "ws",
    )
    case.addCleanup(wait_until, lambda: not service.broker.relays, "relays to end")
    return host


# A test CA and a certificate for 127.0.0.1 / localhost.


def unverified_context() -> ssl.SSLContext:
    """A TLS client context that takes any certificate (the tests' own)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def make_ca(directory: str) -> tuple[str, str, str]:
    """Write a CA and a server certificate it signs; their paths (ca, cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    def build(subject: str, key: Any, issuer: str, signer: Any, ca: bool) -> Any:
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name(issuer))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), True)
        )
        if not ca:
            import ipaddress

            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                False,
            )
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = build("ipcd test CA", ca_key, "ipcd test CA", ca_key, True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = build("localhost", key, "ipcd test CA", ca_key, False)
    paths = tuple(os.path.join(directory, n) for n in ("ca.pem", "cert.pem", "key.pem"))
    pem = serialization.Encoding.PEM
    with open(paths[0], "wb") as f:
        f.write(ca_cert.public_bytes(pem))
    with open(paths[1], "wb") as f:
        f.write(cert.public_bytes(pem))
    # A secret, as ipcd wants a key: its user's alone.
    secret = os.open(paths[2], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(secret, "wb") as f:
        f.write(
            key.private_bytes(
                pem,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return paths  # type: ignore[return-value]


# A minimal blocking WebSocket client.


@dataclass
class Opening:
    """The answer to an opening handshake."""

    sock: socket.socket
    status: int
    reason: str
    headers: dict[str, str]


def ws_open(
    port: int,
    path: str,
    origin: str | None = None,
    host: str = "127.0.0.1",
    host_header: str | None = None,
    early: bytes = b"",
    source: str | None = None,
    buffers: int | None = None,
    timeout: float = TIMEOUT,
) -> Opening:
    """
    Connect (from address C{source}, with socket buffers of C{buffers}
    bytes each way if given) and send an opening handshake (and C{early}
    bytes in the same write); the socket and the answer, each wait bounded
    by C{timeout}.
    """
    sock = connect_tcp(host, port, source, buffers, timeout)
    sock.sendall(upgrade_request(path, host_header or f"{host}:{port}", origin) + early)
    return read_opening(sock)


def upgrade_request(path: str, host: str, origin: str | None = None) -> bytes:
    """An opening handshake's request for C{path}, with a fresh key."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if origin is not None:
        lines.append(f"Origin: {origin}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_opening(sock: socket.socket) -> Opening:
    """The server's answer to an opening handshake sent on C{sock}."""
    head = b""
    while b"\r\n\r\n" not in head:
        byte = sock.recv(1)
        if not byte:
            break
        head += byte
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2) + ["", "", ""]
    headers = {}
    for line in header_lines:
        if ":" in line:
            key_, value = line.split(":", 1)
            headers[key_.strip().lower()] = value.strip()
    status = int(parts[1]) if parts[1].isdigit() else 0
    return Opening(sock, status, parts[2], headers)


_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455, 1.3


def ws_accepted(head: bytes) -> bytes:
    """The answer that opens the WebSocket a client's head C{head} asks for."""
    [key] = [
        line.split(b":", 1)[1].strip()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"sec-websocket-key:")
    ]
    accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )


class TurnCounts:
    """
    The messages a bridge's protocol parses in each turn of the reactor
    from the one its WebSocket opens in (L{parsed}): the count so far is
    noted at the start of every later turn, until the test ends.
    """

    def __init__(self, case: SynchronousTestCase, protocol: Any) -> None:
        self.messages = calls_to(case, protocol, "onMessage", lambda *args: None)
        self.counts: list[int] = []
        self._call: Any = None
        calls_to(case, protocol, "joinSocket", self._opened)
        case.addCleanup(self._stop)

    def _opened(self, *args: Any, **kwargs: Any) -> None:
        # From its end on: every call due after this one is a later turn's.
        self._call = reactor.callLater(0, self._note)

    def _note(self) -> None:
        self.counts.append(len(self.messages))
        self._call = reactor.callLater(0, self._note)

    def _stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()

    def parsed(self) -> list[int]:
        """The messages parsed in each turn that parsed any, in order."""
        # The turn under way counts too: a test resumed from a thread runs
        # before that turn's note (Twisted runs thread calls first).
        now = len(self.messages)
        turns = [after - before for before, after in pairwise([0, *self.counts, now])]
        return [count for count in turns if count]


def connect_tcp(
    host: str,
    port: int,
    source: str | None = None,
    buffers: int | None = None,
    timeout: float = TIMEOUT,
) -> socket.socket:
    """
    A TCP connection to C{host}:C{port} with C{timeout}, from C{source} and
    with SO_SNDBUF and SO_RCVBUF of C{buffers} if given (set before
    connecting: fixed, not grown by the kernel's autotuning).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        if buffers is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffers)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffers)
        if source is not None:
            sock.bind((source, 0))
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def ws_frame(payload: bytes, opcode: int = TEXT, fin: bool = True) -> bytes:
    """One masked frame, as a client sends it."""
    mask = os.urandom(4)
    size = len(payload)
    first = (0x80 if fin else 0) | opcode
    if size < 126:
        head = struct.pack("!BB", first, 0x80 | size)
    elif size < 1 << 16:
        head = struct.pack("!BBH", first, 0x80 | 126, size)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, size)
    body = (
        bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        if size < 4096
        else (_mask_big(payload, mask))
    )
    return head + mask + body


def ws_send(sock: socket.socket, payload: bytes, opcode: int = TEXT) -> None:
    """Send one masked frame (a whole message)."""
    sock.sendall(ws_frame(payload, opcode))


def _mask_big(payload: bytes, mask: bytes) -> bytes:
    n = len(payload)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")


def _exactly(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(min(count - len(data), 1 << 16))
        if not chunk:
            raise EOFError(f"connection closed after {len(data)} of {count} bytes")
        data += chunk
    return bytes(data)


def ws_recv(sock: socket.socket) -> tuple[int, bytes]:
    """One whole frame from the server (unmasked): C{(opcode, payload)}."""
    first, second = _exactly(sock, 2)
    size = second & 0x7F
    if size == 126:
        (size,) = struct.unpack("!H", _exactly(sock, 2))
    elif size == 127:
        (size,) = struct.unpack("!Q", _exactly(sock, 8))
    return first & 0x0F, _exactly(sock, size)


def ws_message(sock: socket.socket) -> tuple[int, bytes]:
    """The next data or close frame, answering pings."""
    while True:
        opcode, payload = ws_recv(sock)
        if opcode == PING:
            ws_send(sock, payload, PONG)
        elif opcode != PONG:
            return opcode, payload


def close_code(payload: bytes) -> int:
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 0


# A real ipcd in a child process, for what only /proc can tell of it.


@dataclass
class ChildIpcd:
    """An ipcd subprocess with websocketd (and pongd); killed after the test."""

    process: Any
    rundir: str
    port: int
    log: str

    def status(self, field: str) -> int:
        """A size from C{/proc/PID/status} (C{VmRSS}, C{VmHWM}), in bytes."""
        return proc_status(field, self.process.pid)

    def reset_peak(self) -> bool:
        """Reset VmHWM to the current RSS (Linux >= 4.0), if allowed."""
        return reset_peak(self.process.pid)

    def cpu_seconds(self) -> float:
        """User and system CPU time ipcd has used."""
        with open(f"/proc/{self.process.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _listening_tcp_ports(pid: int) -> list[int]:
    """The TCP ports process C{pid} listens on."""
    return [port for _host, port in tcp_listeners(pid)]


def spawn_ws_ipcd(case: SynchronousTestCase, *options: str) -> ChildIpcd:
    """
    Start C{python -m ipcd.scripts.ipcd} with websocketd on an ephemeral
    loopback port and pongd, C{allow in pong}, and C{options}; wait (bounded)
    until websocketd listens.
    """
    from ipcd.test.support import python_env, read_text, spawn

    rundir = short_rundir(case, "ipcd-wsh-")
    log = rundir + ".log"
    case.addCleanup(lambda: os.path.exists(log) and os.unlink(log))
    args = ["-m", "ipcd.scripts.ipcd", "--rundir", rundir, "--no-tcp", "--no-tls"]
    args += ["--ws", WS_LISTEN, "--allow", "in pong", *options]
    process = spawn(case, args, log, python_env(), rundir)
    deadline = time.monotonic() + 3 * TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"ipcd exited:\n{read_text(log)}")
        ports = _listening_tcp_ports(process.pid)
        if ports and os.path.exists(os.path.join(rundir, "pong")):
            return ChildIpcd(process, rundir, ports[0], log)
        time.sleep(0.05)
    raise AssertionError(f"websocketd did not listen:\n{read_text(log)}")


def flood_until_answer(sock: socket.socket, chunks: Any, total: int) -> int:
    """
    Send C{chunks} (an iterable of bytes, C{total} in all) as fast as
    C{sock} takes them, until the other end answers (or closes): how many
    bytes had gone then.  The answer is left to read (C{sock} blocking
    again, with L{TIMEOUT}).  Fails if neither could go on for three times
    L{TIMEOUT} (ipcd may be busy: the bound is generous).
    """
    sock.setblocking(False)
    sent, pending = 0, b""
    chunks = iter(chunks)
    try:
        while True:
            if not pending:
                pending = next(chunks, b"")
            wanted = [sock] if pending else []
            readable, writable, _ = select.select([sock], wanted, [], 3 * TIMEOUT)
            if readable:
                return sent
            if not writable:
                raise AssertionError(f"no answer after {sent} of {total} bytes")
            try:
                count = sock.send(pending)
            except (BrokenPipeError, ConnectionResetError):
                return sent  # closed: its answer (if any) waits to be read
            sent += count
            pending = pending[count:]
    finally:
        sock.settimeout(TIMEOUT)
