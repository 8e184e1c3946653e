"""
C{twistd -n ipcd} stopped with live relays on every kind of route: two real
ipcd processes, A (where the clients ask) and B (the services' host), tcp://,
tls:// (PSK), ws:// and udp:// routes from A to B, and WebSocket peers
straight to B.  A stop is quiet (no failure, no traceback), ends every
relayed connection and exits (each wait bounded, nothing timed); a reload
that turns the daemons in use off leaves their connections alone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from ipcd import client
from ipcd.test.support import (
    TIMEOUT,
    accepts,
    bounce,
    free_port,
    python_env,
    read_text,
    short_rundir,
    spawn,
)
from ipcd.test.tlssupport import secrets_file
from ipcd.test.wssupport import ws_open
from ipcd.wire import encode

TWISTD = "from twisted.scripts.twistd import run; run()"
ROUTES = ("tcp", "tls", "ws", "udp")
# What no line of a normal stop's log may hold.
NOT_QUIET = ("Traceback", "failed", "#critical]", "#error]")
# What pongd answers to support.bounce.
BOUNCED = encode(b"bounce me")


def poll(predicate: Any, what: str, timeout: float = 3 * TIMEOUT) -> None:
    """Wait (blocking, bounded) until C{predicate} is true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def ended(sock: socket.socket) -> None:
    """Read C{sock} up to its end (EOF or a reset); fails after TIMEOUT."""
    sock.settimeout(TIMEOUT)
    with contextlib.suppress(ConnectionResetError):
        while sock.recv(1 << 16):
            pass


def fill(sock: socket.socket) -> None:
    """Send on C{sock} until it takes no more (its relay then holds bytes)."""
    sock.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:
            sock.send(bytes(1 << 16))
    sock.settimeout(TIMEOUT)


class Sink:
    """A service on B that accepts and never reads: its relays stay full."""

    def __init__(self, case: SynchronousTestCase, path: str) -> None:
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(16)
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()
        case.addCleanup(self.close)

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.held.append(self.server.accept()[0])

    def close(self) -> None:
        self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        self.thread.join(TIMEOUT)
        for sock in self.held:
            sock.close()


class Ipcd:
    """One C{twistd -n ipcd} child: its RUNDIR, configuration file and log."""

    def __init__(self, case: SynchronousTestCase, name: str, config: str) -> None:
        self.rundir = short_rundir(case, f"ipcd-stop-{name}-")
        self.config = os.path.join(self.rundir, "ipcd.toml")
        self.log = self.rundir + ".log"
        case.addCleanup(lambda: os.path.exists(self.log) and os.unlink(self.log))
        self.write(config)
        args = ["-c", TWISTD, "-n", "--pidfile=", "ipcd", "--rundir", self.rundir]
        args += ["--config", self.config, "--allow", "in pong", "--allow", "in sink"]
        self.process = spawn(case, args, self.log, python_env(), self.rundir)
        poll(self.ready, f"ipcd {name} to be ready")

    def write(self, config: str) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        with open(os.open(self.config, flags, 0o600), "w") as f:
            f.write(config)

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"ipcd exited:\n{read_text(self.log)}")
        return "ipcd: ready" in read_text(self.log) and accepts(
            os.path.join(self.rundir, "ipc")
        )

    def reload(self, config: str) -> None:
        """Write C{config} and SIGHUP; wait (bounded) for the reload's line."""
        self.write(config)
        self.process.send_signal(signal.SIGHUP)
        poll(lambda: "configuration reloaded" in read_text(self.log), "the reload")

    def stop(self) -> str:
        """SIGTERM; its log, once it has exited (bounded)."""
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(3 * TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"ipcd still runs after SIGTERM:\n{read_text(self.log)}"
            ) from None
        text = read_text(self.log)
        assert code in (0, -signal.SIGTERM), f"exit {code}:\n{text}"
        return text


def daemons(ports: dict[str, int], enabled: bool = True, extra: str = "") -> str:
    """A configuration with tcpd, tlsd, websocketd and udpd on C{ports}."""
    on = "true" if enabled else "false"
    text = ""
    for section, scheme, kind in (
        ("tcpd", "tcp", "tcp"),
        ("tlsd", "tls", "tcp"),
        ("websocketd", "ws", "tcp"),
        ("udpd", "udp", "udp"),
    ):
        listen = f"{kind}:{ports[scheme]}:interface=127.0.0.1"
        text += f'[{section}]\nenabled = {on}\nlisten = "{listen}"\n'
        if section == "tlsd":
            text += extra
    return text


class StopWithLiveRelaysTests(SynchronousTestCase):
    """SIGTERM, and a reload first, with relays live on every route."""

    def setUp(self) -> None:
        keys = short_rundir(self, "ipcd-stop-keys-")
        psk = secrets_file(keys, {"stop": "00112233445566778899aabbccddeeff"})
        self.b_ports = {scheme: free_port() for scheme in ("tcp", "tls", "ws")}
        self.b_ports["udp"] = free_port(socket.SOCK_DGRAM)
        self.b_config = daemons(self.b_ports, extra=f'psk_file = "{psk}"\n')
        self.b = Ipcd(self, "b", self.b_config)
        self.sink = Sink(self, os.path.join(self.b.rundir, "sink"))
        a_ports = {scheme: free_port() for scheme in ("tcp", "tls", "ws")}
        a_ports["udp"] = free_port(socket.SOCK_DGRAM)
        self.a_config = daemons(
            a_ports, extra=f'psk_file = "{psk}"\npsk_identity = "stop"\n'
        )
        self.a = Ipcd(self, "a", self.a_config)
        # Per route: one relay that has answered and is idle; over tcp://
        # and tls://, one more that holds bytes its service does not read.
        self.idle: dict[str, socket.socket] = {}
        self.ends: list[socket.socket] = []
        for scheme in ROUTES:
            sock = self.route("pong", scheme)
            self.assertEqual(bounce(sock), BOUNCED)
            self.idle[scheme] = sock
        for scheme in ("tcp", "tls"):
            fill(self.route("sink", scheme))
        poll(lambda: len(self.sink.held) == 2, "the sink's two connections")
        # WebSocket peers straight to B's websocketd.
        for _ in range(2):
            opening = ws_open(self.b_ports["ws"], "/pong")
            self.assertEqual(opening.status, 101)
            self.keep(opening.sock)

    def keep(self, sock: socket.socket) -> socket.socket:
        sock.settimeout(TIMEOUT)
        self.addCleanup(sock.close)
        self.ends.append(sock)
        return sock

    def route(self, service: str, scheme: str) -> socket.socket:
        """A client's connection to B's C{service} through A, over C{scheme}."""
        route = f"{service} {scheme}://127.0.0.1:{self.b_ports[scheme]}/{service}"
        sock = client.connect(service, rundir=self.a.rundir, network=route)
        return self.keep(sock)

    def assertQuiet(self, text: str) -> None:  # noqa: N802 (trial's style)
        for line in text.splitlines():
            for word in NOT_QUIET:
                self.assertNotIn(word, line, text)

    def assertAllEnded(self) -> None:  # noqa: N802 (trial's style)
        for sock in self.ends:
            ended(sock)

    def test_farSideStops(self) -> None:
        """
        A reload turns every daemon off on both hosts: a restart is needed
        for that, and the relays live on.  Then B stops with its relays
        live (tcpd's and tlsd's to pong and to the sink, websocketd's,
        udpd's sessions): quiet; every client's connection ends; A, whose
        relays B ended, stops quietly too.
        """
        self.b.reload(daemons(self.b_ports, enabled=False))
        self.a.reload(self.a_config.replace("enabled = true", "enabled = false"))
        for host in (self.a, self.b):
            self.assertIn("apply after a restart", read_text(host.log))
        for scheme in ROUTES:
            self.assertEqual(bounce(self.idle[scheme]), BOUNCED, scheme)
        self.assertQuiet(self.b.stop())
        self.assertAllEnded()
        self.assertQuiet(self.a.stop())

    def test_nearSideStops(self) -> None:
        """
        A stops with its relays live (tlsd's, websocketd's and udpd's near
        ends): quiet; then B, with the relays A did not end (tcp:// routes'
        and the WebSocket peers'): quiet too, and every client's connection
        ends.
        """
        self.assertQuiet(self.a.stop())
        for scheme in ("tls", "ws", "udp"):
            ended(self.idle[scheme])
        self.assertEqual(bounce(self.idle["tcp"]), BOUNCED)
        self.assertQuiet(self.b.stop())
        self.assertAllEnded()
