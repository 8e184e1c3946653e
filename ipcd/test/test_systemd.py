"""
ipcd under systemd, as systemd runs it: the shipped unit's own command
lines, C{NOTIFY_SOCKET} pointing at a datagram socket the test binds
(readiness, reload, stop), and sockets passed as descriptors 3, 4, ...
with C{LISTEN_FDS}, C{LISTEN_PID} and C{LISTEN_FDNAMES} (socket
activation).  PID 1 here is not systemd, so no real systemd runs ipcd;
C{systemd-analyze} checks the shipped units offline where it is installed.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from ipcd import activation, control
from ipcd.compat import twisted as compat_twisted
from ipcd.daemons.udp import batch as udpbatch
from ipcd.daemons.udp import wire as udpwire
from ipcd.lookupport import adopt
from ipcd.routes import encode_lookup
from ipcd.sdnotify import REFUSED_STATUS, Notifier, notify_address
from ipcd.test.support import (
    REPO,
    TIMEOUT,
    accepts,
    bounce,
    lookup,
    open_fds,
    python_env,
    read_text,
    short_rundir,
    spawn,
)
from ipcd.test.udpsupport import handshake, udp_socket
from ipcd.wire import encode

DOCS = os.path.join(REPO, "docs")
# The shipped unit's RUNDIR and configuration file, replaced in the tests.
UNIT_RUNDIR = "/run/libipc"
UNIT_CONFIG = "/etc/ipcd/ipcd.toml"
# The exposure systemd-analyze measured for docs/ipcd.service (2.2 with
# systemd 252); the bound the docs state.
EXPOSURE_BOUND = 2.5
# An endpoint type that listens (tcp, loopback, any port) only once the
# file it names exists: a listener still on its way, held by the test.
GATE_PLUGIN = """
import os

from twisted.internet import endpoints, task
from twisted.internet.interfaces import IStreamServerEndpointStringParser
from twisted.plugin import IPlugin
from zope.interface import implementer


class Gated:
    def __init__(self, reactor, gate):
        self.reactor, self.gate = reactor, gate

    def listen(self, factory):
        real = endpoints.TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1")

        def poll():
            if os.path.exists(self.gate):
                return real.listen(factory)
            return task.deferLater(self.reactor, 0.02, poll)

        return task.deferLater(self.reactor, 0, poll)


@implementer(IPlugin, IStreamServerEndpointStringParser)
class GateParser:
    prefix = "gate"

    def parseStreamServer(self, reactor, gate):
        return Gated(reactor, gate)


gate = GateParser()
"""


def unit_lines(name: str, key: str) -> list[list[str]]:
    """Each C{KEY=} line of the shipped unit C{name}, split as systemd would."""
    with open(os.path.join(DOCS, name)) as f:
        return [
            shlex.split(line.split("=", 1)[1])
            for line in f
            if line.startswith(f"{key}=")
        ]


def unit_command(key: str, rundir: str, config: str) -> list[str]:
    """
    The shipped ipcd.service's C{ExecStart}/C{ExecReload} line, for
    C{sys.executable}: ipcd from this tree, on C{rundir} and C{config}.
    """
    [line] = unit_lines("ipcd.service", key)
    assert line[0] == "/usr/bin/ipcd", line
    swap = {UNIT_RUNDIR: rundir, UNIT_CONFIG: config}
    return ["-m", "ipcd.scripts.ipcd"] + [swap.get(arg, arg) for arg in line[1:]]


class Manager:
    """The service manager's end of NOTIFY_SOCKET: a datagram socket."""

    def __init__(self, case: SynchronousTestCase, address: str | bytes) -> None:
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        case.addCleanup(self.socket.close)
        self.socket.bind(address)
        self.socket.settimeout(30)

    def receive(self) -> dict[str, str]:
        """The next datagram's C{KEY=value} lines (waits, bounded)."""
        text = self.socket.recv(4096).decode()
        return dict(line.split("=", 1) for line in text.splitlines())

    def pending(self) -> bytes | None:
        """A datagram already sent, or None: never waits."""
        # Not recv(MSG_DONTWAIT): on a socket with a timeout, Python first
        # waits up to that timeout for it to be readable.
        readable, _, _ = select.select([self.socket], [], [], 0)
        return self.socket.recv(4096) if readable else None


def passing_fds(socks: list[socket.socket]) -> tuple[list[str], dict[str, object]]:
    """
    The arguments to put before C{-m ...}, and Popen's, that start a child
    Python as systemd starts an activated service: C{socks} as descriptors
    3, 4, ... and C{LISTEN_PID} the child's own pid (set just before it
    execs itself, keeping its pid and those descriptors).
    """
    count = len(socks)
    wanted = list(range(3, 3 + count))

    def as_listen_fds() -> None:
        # Out of the way first (a socket may already be on 3 or 4).
        high = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD, 100) for s in socks]
        for fd, target in zip(high, wanted, strict=True):
            os.dup2(fd, target)  # inheritable, as systemd passes them

    exec_self = (
        "import os, sys; os.environ['LISTEN_PID'] = str(os.getpid()); "
        "os.execv(sys.executable, [sys.executable] + sys.argv[1:])"
    )
    return ["-c", exec_self], {"pass_fds": wanted, "preexec_fn": as_listen_fds}


def tcp_pong(address: tuple[str, int]) -> bytes:
    """Ask tcpd at C{address} for pong and echo one message through it."""
    with socket.create_connection(address, timeout=TIMEOUT) as sock:
        sock.sendall(b"pong")
        answer = sock.recv(2)
        if answer != b"ok":
            return answer + sock.recv(4096)
        return bounce(sock)


def pong_through(rundir: str) -> bytes:
    """A real lookup at RUNDIR/ipc for pong, and one echo through it."""
    reply = lookup(rundir, encode_lookup("pong", ""))
    fds = list(reply.fds)
    if reply.data[:2] != b"ok" or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        return reply.data
    with socket.socket(fileno=fds[0]) as sock:
        sock.settimeout(TIMEOUT)
        return bounce(sock)


class _Ipcd:
    """Starting ipcd in a subprocess as the shipped unit does."""

    def setUp(self) -> None:
        self.rundir = short_rundir(self, "ipcd-sd-")  # type: ignore[arg-type]
        self.work = short_rundir(self, "ipcd-sdw-")  # type: ignore[arg-type]
        self.config = os.path.join(self.work, "ipcd.toml")

    def write_config(self, tcp_listen: str) -> None:
        with open(self.config, "w") as f:
            f.write(
                textwrap.dedent(
                    f"""\
                    rules = ["allow in pong"]
                    [tcpd]
                    listen = "{tcp_listen}"
                    [tlsd]
                    enabled = false
                    [websocketd]
                    enabled = false
                    [udpd]
                    enabled = false
                    """
                )
            )

    def start(
        self,
        tcp_listen: str,
        before: list[str] | None = None,
        popen: dict[str, object] | None = None,
        after: tuple[str, ...] = (),
        **env: str,
    ) -> tuple[subprocess.Popen[bytes], str]:
        """
        ipcd as the unit's ExecStart line starts it, tcpd's listener
        C{tcp_listen} in its configuration file; C{before} the module (a
        wrapper's arguments), C{after} more options, C{env} more environment.
        """
        self.write_config(tcp_listen)
        self.log = os.path.join(self.work, "ipcd.log")
        args = [*(before or []), *unit_command("ExecStart", self.rundir, self.config)]
        args += after
        environ = python_env(**env)
        environ.pop("NOTIFY_SOCKET", None)
        environ.update(env)
        process = spawn(self, args, self.log, environ, self.work, **(popen or {}))  # type: ignore[arg-type]
        return process, self.log

    def reload(self) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, *unit_command("ExecReload", self.rundir, self.config)],
            capture_output=True,
            env=python_env(),
            cwd=self.work,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )

    def stop(self, process: subprocess.Popen[bytes]) -> int:
        process.send_signal(signal.SIGTERM)
        return process.wait(60)

    def exited(self, process: subprocess.Popen[bytes]) -> tuple[int, str]:
        """ipcd's exit status and output, once it has exited by itself."""
        code = process.wait(60)
        return code, read_text(self.log)

    def wait_for(
        self,
        predicate: Callable[[], object],
        process: subprocess.Popen[bytes],
        what: str,
    ) -> None:
        """Poll until C{predicate()}, failing if ipcd exits (bounded: 60 s)."""
        for _ in range(6000):
            if process.poll() is not None:
                raise AssertionError(
                    f"ipcd exited ({process.returncode}) before {what}:\n"
                    f"{read_text(self.log)}"
                )
            if predicate():
                return
            time.sleep(0.01)
        raise AssertionError(f"timed out waiting for {what}:\n{read_text(self.log)}")

    def serving(self) -> bool:
        """Whether ipcd answers on its control socket (its reactor runs)."""
        try:
            control.request("status", self.rundir, TIMEOUT)
        except (OSError, ValueError, EOFError):
            return False
        return True


def tcp_address(status: str) -> tuple[str, int]:
    """tcpd's address in a C{STATUS=ready: ...} line."""
    match = re.search(r"tcpd 127\.0\.0\.1:(\d+)", status)
    assert match is not None, status
    return "127.0.0.1", int(match.group(1))


class ReadinessTests(_Ipcd, SynchronousTestCase):
    """Type=notify: READY=1 once every listener is up; reload; stop."""

    def start_notified(
        self, notify: str, bind: str | bytes
    ) -> tuple[Manager, subprocess.Popen[bytes]]:
        """
        ipcd with NOTIFY_SOCKET=C{notify} (the manager bound at C{bind}), its
        tcpd on a C{gate:} listener (GATE_PLUGIN) that listens only once
        C{self.gate} exists.
        """
        manager = Manager(self, bind)
        plugins = os.path.join(self.work, "plugins")
        os.makedirs(os.path.join(plugins, "twisted", "plugins"))
        with open(os.path.join(plugins, "twisted", "plugins", "gate.py"), "w") as f:
            f.write(GATE_PLUGIN)
        self.gate = os.path.join(self.work, "open")
        process, _log = self.start(
            f"gate:{self.gate}",
            NOTIFY_SOCKET=notify,
            PYTHONPATH=os.pathsep.join([REPO, plugins]),
        )
        return manager, process

    def ready_once_listening(
        self, manager: Manager, process: subprocess.Popen[bytes]
    ) -> dict[str, str]:
        """
        READY=1 comes only after every listener listens: not while tcpd's
        is held, though ipcd runs and its RUNDIR sockets answer; then, once
        it listens, READY=1 and at that moment both RUNDIR/ipc and tcpd
        serve a real lookup.
        """
        self.wait_for(self.serving, process, "ipcd's control socket")
        # ipcd's reactor runs (the control socket answered), its RUNDIR
        # sockets listen: anything it had sent is already here.
        self.assertIsNone(manager.pending())
        with open(self.gate, "w"):
            pass
        state = manager.receive()
        self.assertEqual(state["READY"], "1", state)
        self.assertEqual(pong_through(self.rundir), encode(b"bounce me"))
        self.assertEqual(tcp_pong(tcp_address(state["STATUS"])), encode(b"bounce me"))
        return state

    def test_readyReloadStop(self) -> None:
        """
        The shipped unit's lines: READY=1 once listening (with a STATUS line
        naming where), RELOADING=1 (with MONOTONIC_USEC) then READY=1 around
        ExecReload's C{ipcd reload}, STOPPING=1 on SIGTERM.
        """
        path = os.path.join(self.work, "notify")
        manager, process = self.start_notified(path, path)
        state = self.ready_once_listening(manager, process)
        self.assertIn(f"ipcd {self.rundir}/ipc", state["STATUS"])

        before = time.monotonic_ns() // 1000
        result = self.reload()
        self.assertEqual(
            (result.returncode, result.stdout), (0, b"reloaded: nothing changed\n")
        )
        reloading = manager.receive()
        self.assertEqual(reloading["RELOADING"], "1", reloading)
        self.assertGreaterEqual(int(reloading["MONOTONIC_USEC"]), before)
        self.assertEqual(manager.receive(), {"READY": "1", "STATUS": "reloaded"})

        self.assertIn(self.stop(process), (0, -signal.SIGTERM))
        self.assertEqual(manager.receive(), {"STOPPING": "1", "STATUS": "stopping"})

    def test_refusedReloadTellsNoDetail(self) -> None:
        """
        A refused reload: READY=1 again with a STATUS every local user may
        read (systemctl status), so without the error, which may quote the
        configuration; ipcd reload's caller gets it.
        """
        path = os.path.join(self.work, "notify")
        manager, process = self.start_notified(path, path)
        self.ready_once_listening(manager, process)
        with open(self.config) as f:
            text = f.read()
        with open(self.config, "w") as f:
            f.write(
                text.replace('"allow in pong"', '"allow in pong", "bogus secret-name"')
            )
        result = self.reload()
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(b"secret-name", result.stdout + result.stderr)
        self.assertEqual(manager.receive()["RELOADING"], "1")
        self.assertEqual(manager.receive(), {"READY": "1", "STATUS": REFUSED_STATUS})
        self.assertIn(self.stop(process), (0, -signal.SIGTERM))

    def test_abstractNotifySocket(self) -> None:
        """NOTIFY_SOCKET=@NAME is an abstract socket name, as systemd's are."""
        name = f"ipcd-test-{os.getpid()}-{id(self)}"
        manager, process = self.start_notified(f"@{name}", b"\0" + name.encode())
        self.ready_once_listening(manager, process)

    def bad_notify(self, notify: str, line: str) -> None:
        """ipcd with NOTIFY_SOCKET=C{notify}: C{line} logged once, serving."""
        process, log = self.start("tcp:0:interface=127.0.0.1", NOTIFY_SOCKET=notify)
        self.wait_for(lambda: line in read_text(log) and self.serving(), process, line)
        self.assertEqual(pong_through(self.rundir), encode(b"bounce me"))
        self.assertIn(self.stop(process), (0, -signal.SIGTERM))
        self.assertEqual(read_text(log).count(line), 1, read_text(log))

    def test_notifySocketNobodyListensOn(self) -> None:
        """READY=1 cannot be sent: one line, and ipcd serves on."""
        nobody = os.path.join(self.work, "nobody")
        self.bad_notify(nobody, "cannot tell systemd 'READY=1")

    def test_notifySocketNoAddress(self) -> None:
        """NOTIFY_SOCKET is no address: one line, and ipcd serves on."""
        self.bad_notify("not-a-path", "is neither an absolute path nor an @abstract")


class NotifierTests(SynchronousTestCase):
    """The notifier's own logic."""

    def test_takenFromTheEnvironment(self) -> None:
        """
        NOTIFY_SOCKET is taken out of the environment it was read from, so
        that no process ipcd starts sends in its name (sd_notify's
        unset_environment).
        """
        environ = {"NOTIFY_SOCKET": "/run/systemd/notify", "PATH": "/bin"}
        notifier = Notifier.from_environment(environ)
        self.addCleanup(notifier.close)  # type: ignore[union-attr]
        self.assertEqual(environ, {"PATH": "/bin"})
        self.assertEqual(notifier.address, "/run/systemd/notify")  # type: ignore[union-attr]
        self.assertIsNone(Notifier.from_environment(environ))

    def test_pathNotUtf8(self) -> None:
        """
        A STATUS naming a path that is not UTF-8 (RUNDIR as bytes from the
        command line) is sent as those bytes, not an exception that would
        keep READY=1 from being sent.
        """
        path = os.path.join(short_rundir(self, "ipcd-sdn-"), "notify")
        manager = Manager(self, path)
        notifier = Notifier(path)
        self.addCleanup(notifier.close)
        rundir = os.fsdecode(b"/run/\xff")
        self.assertTrue(notifier.send(READY="1", STATUS=f"ready: ipcd {rundir}/ipc"))
        self.assertEqual(
            manager.socket.recv(4096), b"READY=1\nSTATUS=ready: ipcd /run/\xff/ipc\n"
        )

    def test_addresses(self) -> None:
        self.assertEqual(notify_address("@x/y"), b"\0x/y")
        # An abstract name that is not UTF-8, as os.environ decodes it.
        self.assertEqual(notify_address(os.fsdecode(b"@\xff")), b"\0\xff")
        self.assertEqual(notify_address("/run/n"), "/run/n")
        for bad in ("@", "relative", "vsock:2:9"):
            self.assertRaises(ValueError, notify_address, bad)


class ActivationTests(_Ipcd, SynchronousTestCase):
    """Socket activation: RUNDIR/ipc and tcpd's listener passed in, adopted."""

    def listening_unix(self, name: str = "ipc", listen: bool = True) -> socket.socket:
        """What a socket unit's C{ListenStream=RUNDIR/NAME} makes."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.bind(os.path.join(self.rundir, name))
        if listen:
            sock.listen(16)
        return sock

    def listening_tcp(self, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """What C{ListenStream=127.0.0.1:PORT} makes (any free port)."""
        sock = socket.socket(socket.AF_INET, kind)
        self.addCleanup(sock.close)
        sock.bind(("127.0.0.1", 0))
        if kind == socket.SOCK_STREAM:
            sock.listen(16)
        return sock

    def activated(
        self,
        socks: list[socket.socket],
        names: list[str],
        tcp_listen: str,
        after: tuple[str, ...] = (),
    ) -> tuple[subprocess.Popen[bytes], str]:
        """ipcd started as systemd starts it with C{socks} (LISTEN_FDNAMES C{names})."""
        before, popen = passing_fds(socks)
        return self.start(
            tcp_listen,
            before,
            popen,
            after,
            LISTEN_FDS=str(len(socks)),
            LISTEN_FDNAMES=":".join(names),
        )

    def serves_through(
        self,
        process: subprocess.Popen[bytes],
        unix: socket.socket,
        tcp: socket.socket,
    ) -> None:
        """
        ipcd serves a real lookup at RUNDIR/ipc and a real tcp:// peer on the
        sockets the test made (the file is the very one, now 0660); stopped,
        it leaves RUNDIR/ipc to the socket unit, which still listens.
        """
        path = os.path.join(self.rundir, "ipc")
        made = os.lstat(path).st_ino
        self.wait_for(self.serving, process, "ipcd to serve")
        self.assertEqual(pong_through(self.rundir), encode(b"bounce me"))
        self.assertEqual(tcp_pong(tcp.getsockname()), encode(b"bounce me"))
        st = os.lstat(path)
        self.assertEqual((st.st_ino, st.st_mode & 0o7777), (made, 0o660))
        self.assertIn(self.stop(process), (0, -signal.SIGTERM))
        self.assertEqual(os.lstat(path).st_ino, made)
        # Both sockets still listen for the socket unit (the test's end).
        self.assertTrue(accepts(path))
        socket.create_connection(tcp.getsockname(), timeout=TIMEOUT).close()

    def test_oneSocketUnit(self) -> None:
        """
        One socket unit with two ListenStream= (both named after the unit):
        RUNDIR/ipc is found by its path, tcpd's by --tcp
        systemd:domain=INET:index=1 on the command line.
        """
        unix, tcp = self.listening_unix(), self.listening_tcp()
        names = ["ipcd.socket", "ipcd.socket"]
        process, _log = self.activated(
            [unix, tcp],
            names,
            "tcp:0:interface=127.0.0.1",
            ("--tcp", "systemd:domain=INET:index=1"),
        )
        self.serves_through(process, unix, tcp)

    def test_namedSockets(self) -> None:
        """
        The shipped units' names (FileDescriptorName=): tcpd's socket by
        --tcp systemd:domain=INET:name=tcpd, RUNDIR/ipc named "ipc".
        """
        unix, tcp = self.listening_unix(), self.listening_tcp()
        process, _log = self.activated(
            [tcp, unix], ["tcpd", "ipc"], "systemd:domain=INET:name=tcpd"
        )
        self.serves_through(process, unix, tcp)

    def test_notASocketPassedOver(self) -> None:
        """
        A descriptor that is not a socket (a ListenFIFO=, say) is nobody's
        RUNDIR socket: passed over, and held once, not once more for each
        RUNDIR socket looked for among the inherited ones.
        """
        read, write = os.pipe()
        os.close(write)
        fifo = os.fdopen(read, "rb")
        self.addCleanup(fifo.close)
        unix, tcp = self.listening_unix(), self.listening_tcp()
        process, _log = self.activated(
            [fifo, unix, tcp],  # type: ignore[list-item]
            ["fifo", "ipc", "tcpd"],
            "systemd:domain=INET:name=tcpd",
        )
        self.wait_for(self.serving, process, "ipcd to serve")
        pipe = f"pipe:[{os.fstat(read).st_ino}]"
        held = [fd for fd, what in open_fds(process.pid).items() if what == pipe]
        self.assertEqual(held, [3])
        self.serves_through(process, unix, tcp)

    def refused(
        self,
        socks: list[socket.socket],
        tcp_listen: str,
        line: str,
        after: tuple[str, ...] = (),
    ) -> None:
        """
        ipcd started with C{socks} (and options C{after}) exits 1 with one
        line containing C{line}.
        """
        names = ["ipcd.socket"] * len(socks)
        process, _log = self.activated(socks, names, tcp_listen, after)
        code, output = self.exited(process)
        self.assertEqual(code, 1, output)
        self.assertIn(line, output)
        lines = [text for text in output.splitlines() if text.startswith("ipcd:")]
        self.assertEqual(len(lines), 1, output)
        self.assertNotIn("Traceback", output)

    def test_notListening(self) -> None:
        """An inherited socket at RUNDIR/ipc that does not listen: refused."""
        self.refused(
            [self.listening_unix(listen=False)],
            "tcp:0:interface=127.0.0.1",
            f"ipcd: inherited socket ipc (fd 3) is not listening; give ipcd a "
            f"listening stream socket at {self.rundir}/ipc",
        )

    def test_udpdDatagramSocket(self) -> None:
        """
        udpd's listener as a ListenDatagram= socket, by name: ipcd answers a
        real udpd handshake on the very socket the test made, and leaves it
        as it came (no UDP_GRO: the option would stay on it for the next
        process systemd gives it to, which may not know it).
        """
        udp = self.listening_tcp(socket.SOCK_DGRAM)
        process, _log = self.activated(
            [udp],
            ["udpd"],
            "tcp:0:interface=127.0.0.1",
            ("--udp", "systemd:domain=INET:name=udpd"),
        )
        self.wait_for(self.serving, process, "ipcd to serve")
        client = udp_socket()
        self.addCleanup(client.close)
        answer, _got = handshake(client, udp.getsockname()[1])
        self.assertIsInstance(answer, udpwire.Accepted)
        if sys.platform.startswith("linux"):
            self.assertEqual(udp.getsockopt(udpbatch.SOL_UDP, udpbatch.UDP_GRO), 0)
        self.assertIn(self.stop(process), (0, -signal.SIGTERM))

    def test_udpdGivenAStream(self) -> None:
        """A stream socket where udpd wants a datagram one: one line."""
        self.refused(
            [self.listening_tcp()],
            "tcp:0:interface=127.0.0.1",
            "ipcd: cannot make udpd's listener 'systemd:domain=INET:index=0': "
            "the inherited socket is not a datagram socket (SOCK_STREAM) (give "
            "it a bound datagram socket: ListenDatagram= in the socket unit; "
            "use --udp ENDPOINT or --no-udp)",
            ("--udp", "systemd:domain=INET:index=0"),
        )

    def test_udpdNoSuchSocket(self) -> None:
        """
        A name systemd did not pass, the wrong family, or a socket bound to
        no port: one line each.
        """
        udp = self.listening_tcp(socket.SOCK_DGRAM)
        self.refused(
            [udp],
            "tcp:0:interface=127.0.0.1",
            "ipcd: cannot make udpd's listener 'systemd:domain=INET:name=udp': "
            "systemd passed no such socket (use --udp ENDPOINT or --no-udp)",
            ("--udp", "systemd:domain=INET:name=udp"),
        )
        self.refused(
            [udp],
            "tcp:0:interface=127.0.0.1",
            "ipcd: cannot make udpd's listener 'systemd:domain=INET6:index=0': "
            "the inherited socket is not an AF_INET6 socket (AF_INET) (give "
            "it a bound datagram socket: ListenDatagram= in the socket unit; "
            "use --udp ENDPOINT or --no-udp)",
            ("--udp", "systemd:domain=INET6:index=0"),
        )
        unbound = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(unbound.close)
        self.refused(
            [unbound],
            "tcp:0:interface=127.0.0.1",
            "the inherited socket is not bound to a port",
            ("--udp", "systemd:domain=INET:index=0"),
        )

    def test_namedButElsewhere(self) -> None:
        """
        The socket named "ipc" (FileDescriptorName=ipc) bound outside RUNDIR:
        refused, not served outside RUNDIR nor silently passed over.
        """
        elsewhere = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(elsewhere.close)
        path = os.path.join(self.work, "ipc")
        elsewhere.bind(path)
        elsewhere.listen(16)
        process, _log = self.activated(
            [elsewhere], ["ipc"], "tcp:0:interface=127.0.0.1"
        )
        code, output = self.exited(process)
        self.assertEqual(code, 1, output)
        self.assertIn(
            f"ipcd: inherited socket ipc (fd 3) is bound at '{path}', not at "
            f"{self.rundir}/ipc",
            output,
        )

    def test_notIpcdsFile(self) -> None:
        """RUNDIR/ipc's file belongs to another user: refused."""
        unix = self.listening_unix()
        os.chown(unix.getsockname(), 65534, -1)
        self.refused(
            [unix],
            "tcp:0:interface=127.0.0.1",
            f"ipcd: inherited socket {self.rundir}/ipc: owned by uid 65534",
        )

    def test_tcpNotStream(self) -> None:
        """--tcp systemd:... naming a datagram socket: refused."""
        self.refused(
            [self.listening_tcp(socket.SOCK_DGRAM)],
            "systemd:domain=INET:index=0",
            "ipcd: cannot make tcpd's listener 'systemd:domain=INET:index=0': "
            "the inherited socket is not a stream socket (SOCK_DGRAM)",
        )

    def test_metricsNotStream(self) -> None:
        """--metrics systemd:... naming a datagram socket: refused, as tcpd's."""
        self.refused(
            [self.listening_tcp(socket.SOCK_DGRAM)],
            "tcp:0:interface=127.0.0.1",
            "ipcd: cannot make the metrics listener 'systemd:domain=INET:index=0': "
            "the inherited socket is not a stream socket (SOCK_DGRAM)",
            ("--metrics", "systemd:domain=INET:index=0"),
        )

    def test_oneSocketTwoListeners(self) -> None:
        """
        --tcp and --metrics naming the same systemd socket: the second to
        listen cannot (the first took it), and its line names its listener.
        """
        self.refused(
            [self.listening_tcp()],
            "systemd:domain=INET:index=0",
            "ipcd: cannot listen on systemd:domain=INET:index=0: bad file "
            "descriptor (use --tcp ENDPOINT or --no-tcp)",
            ("--metrics", "systemd:domain=INET:index=0"),
        )

    def test_anotherProcessesSockets(self) -> None:
        """
        LISTEN_PID not ipcd's own: the descriptors are not for ipcd, which
        leaves them alone (and here finds RUNDIR/ipc taken).
        """
        unix = self.listening_unix()
        _before, popen = passing_fds([unix])
        process, _log = self.start(
            "tcp:0:interface=127.0.0.1",
            None,
            popen,
            LISTEN_PID=str(os.getpid()),
            LISTEN_FDS="1",
            LISTEN_FDNAMES="ipc",
        )
        code, output = self.exited(process)
        self.assertEqual(code, 1, output)
        self.assertIn(f"another process is listening on {self.rundir}/ipc", output)


class InheritedNumberTests(SynchronousTestCase):
    """
    Twisted closes the descriptor of a C{systemd:} socket it adopts (tcpd's,
    the metrics'): its number may then be any other socket's.
    """

    def test_numberReused(self) -> None:
        """
        A number systemd passed, closed, and now another socket's (a live
        listener of this process, bound at the very path, even named so in
        LISTEN_FDNAMES) is not taken for the inherited socket, nor closed.
        """
        rundir = short_rundir(self, "ipcd-inh-")
        path = os.path.join(rundir, "svc")
        passed = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        passed.bind(("127.0.0.1", 0))
        passed.listen(1)
        number = passed.detach()
        parsed = {
            "systemd:domain=UNIX:index=0": number,
            "systemd:domain=UNIX:name=svc": number,
        }
        self.patch(activation, "inherited_fd", parsed.get)
        sockets = activation.InheritedSockets()
        self.assertEqual(sockets.fds(), [number])
        live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(live.close)
        live.bind(path)
        live.listen(1)
        # Adopted and closed (as Twisted does), then the number reused.
        os.close(number)
        os.dup2(live.fileno(), number)
        self.addCleanup(os.close, number)
        self.assertIsNone(sockets.take(path, "svc"))
        self.assertFalse(sockets.holds(path, "svc"))
        os.fstat(number)  # still open


class UnitFileTests(SynchronousTestCase):
    """The shipped units, as systemd-analyze reads them (offline)."""

    def setUp(self) -> None:
        self.analyze = shutil.which("systemd-analyze")
        if self.analyze is None:
            raise SkipTest("systemd-analyze is not installed")
        # verify wants ExecStart's program to exist: point the copies at one
        # this machine has (the units name /usr/bin/ipcd).
        program = shutil.which("ipcd") or sys.executable
        self.units = short_rundir(self, "ipcd-units-")
        for name in ("ipcd.service", "ipcd.socket", "ipcd-tcp.socket"):
            with open(os.path.join(DOCS, name)) as f:
                text = f.read().replace("/usr/bin/ipcd", program)
            with open(os.path.join(self.units, name), "w") as f:
                f.write(text)

    def run_analyze(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.analyze, *args],  # type: ignore[list-item]
            capture_output=True,
            text=True,
            cwd=self.units,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )

    def test_verify(self) -> None:
        """systemd-analyze verify finds nothing to say of the three units."""
        result = self.run_analyze(
            "verify", "--man=no", "ipcd.service", "ipcd.socket", "ipcd-tcp.socket"
        )
        self.assertEqual(
            (result.returncode, result.stdout + result.stderr), (0, ""), result
        )

    def test_exposure(self) -> None:
        """
        systemd-analyze security rates ipcd.service's exposure at most
        EXPOSURE_BOUND (of 10), as the docs say.
        """
        result = self.run_analyze("security", "--offline=yes", "ipcd.service")
        match = re.search(
            r"Overall exposure level for ipcd\.service: (\d+\.\d+)", result.stdout
        )
        self.assertIsNotNone(match, result)
        self.assertLessEqual(float(match.group(1)), EXPOSURE_BOUND, result.stdout)  # type: ignore[union-attr]
        with open(os.path.join(DOCS, "operations-systemd.rst")) as f:
            self.assertIn(f"at most {EXPOSURE_BOUND}", f.read())


class Greeter(Protocol):
    def connectionMade(self) -> None:
        self.transport.write(b"hi")
        self.transport.loseConnection()


class AdoptedPortTests(TestCase):
    """
    The port on an inherited RUNDIR socket (L{ipcd.lookupport.adopt}), in
    this process: with Twisted's private names, and without them (the
    fallback: Twisted's adoptStreamPort, whose port removes the file).
    """

    def listening(self) -> socket.socket:
        rundir = short_rundir(self, "ipcd-adopt-")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.bind(os.path.join(rundir, "ipc"))
        sock.listen(16)
        return sock

    @inlineCallbacks
    def adopted(self) -> Any:
        """Adopt a copy of a listening socket; greet one client; stop."""
        systemds = self.listening()
        path = systemds.getsockname()
        ours = socket.socket(fileno=os.dup(systemds.fileno()))
        ours.setblocking(False)
        factory = Factory.forProtocol(Greeter)
        port = adopt(reactor, ours, factory, 0o600)
        self.assertEqual(os.lstat(path).st_mode & 0o7777, 0o600)
        greeting = yield deferToThread(_greeting, path)
        self.assertEqual(greeting, b"hi")
        yield port.stopListening()
        # Stopped as any port (its copy closed, its factory stopped), the
        # file and systemd's socket aside.
        stopped = (port.connected, factory.numPorts, ours.fileno())
        self.assertEqual(stopped, (False, 0, -1))
        return systemds, path

    @inlineCallbacks
    def test_keptForSystemd(self) -> Any:
        """The file stays, and the socket listens on for systemd."""
        _systemds, path = yield self.adopted()
        self.assertTrue(accepts(path))

    @inlineCallbacks
    def test_withoutPrivateNames(self) -> Any:
        """Twisted without the names: served all the same, with the mode."""
        for name in (compat_twisted.PREEXISTING_SOCKET, compat_twisted.SHOULD_SHUTDOWN):
            self.patch(name, "present", False)
            self.patch(name, "said", True)  # no log line in this test's output
        _systemds, path = yield self.adopted()
        self.assertFalse(os.path.lexists(path))  # the fallback's cost


def _greeting(path: str) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(TIMEOUT)
        client.connect(path)
        return client.recv(16)
