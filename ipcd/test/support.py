"""
Helpers for integration tests on real sockets: a temporary short RUNDIR, an
in-process ipcd, a plain upstream-style client, a fake external daemon, and
an fd counter.

Blocking clients run in threads (L{deferToThread}) so the reactor keeps
serving ipcd meanwhile; every wait is bounded.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.testing import EventLoggingObserver
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from ipcd import broker as broker_module
from ipcd.config import Config, load_config
from ipcd.instancelock import LOCK_NAME
from ipcd.limits import LOG_BURST, LOG_PERIOD
from ipcd.names import listen_unix
from ipcd.tap import IPCDService
from ipcd.wire import HEADER, LOG_LINES_DROPPED, encode

# Every blocking socket operation and every poll in these tests is bounded.
TIMEOUT = 10.0
# The repository root: twistd finds twisted/plugins/ipcd_plugin.py there.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# ASCII digits to Arabic-Indic ones, which str.isdigit() and int() take
# (int("١٢") is 12): never a number in what ipcd reads.
ARABIC_INDIC = str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")


def short_rundir(case: SynchronousTestCase, prefix: str = "ipcd-") -> str:
    """A fresh directory under /tmp (AF_UNIX paths are short), removed after."""
    path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    case.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path


def left_in(rundir: str) -> list[str]:
    """
    What is in C{rundir} but ipcd's instance lock file, which stays there
    for the next ipcd (L{ipcd.instancelock}), sorted.
    """
    return sorted(name for name in os.listdir(rundir) if name != LOCK_NAME)


def make_config(rundir: str, **overrides: Any) -> Config:
    """
    A validated config for an in-process ipcd on C{rundir}: tcpd and
    websocketd off, and
    C{overrides} in the configuration file's shape (C{redirects={...}},
    C{ipcd={"lookup_timeout": 0.3}}, C{max_message_size=64}, ...).
    """
    layer: dict[str, Any] = {
        "rundir": rundir,
        "tcpd": {"enabled": False},
        "websocketd": {"enabled": False},
    }
    layer.update(overrides)
    return load_config(None, layer, environ={})


@inlineCallbacks
def start_ipcd(
    case: SynchronousTestCase,
    config: Config,
    load_config: Callable[[], Config] | None = None,
) -> Any:
    """
    Start ipcd (and pongd, unless disabled) in this process; stopped after.
    C{load_config}: what a reload reads (none: reloads are refused).
    """
    service = IPCDService(config, reactor, load_config)
    service.startService()
    case.addCleanup(service.stopService)
    yield wait_until(
        lambda: all(os.path.exists(path) for path in service.socket_paths()),
        "ipcd's sockets",
    )
    return service


@inlineCallbacks
def wait_until(
    predicate: Callable[[], Any], what: str, timeout: float = TIMEOUT
) -> Any:
    """Poll C{predicate} from the reactor until it is true; fail after C{timeout}."""
    steps = int(timeout / 0.01)
    for _ in range(steps):
        value = predicate()
        if value:
            return value
        yield deferLater(reactor, 0.01, lambda: None)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def calls_to(
    case: SynchronousTestCase,
    owner: Any,
    name: str,
    noted: Callable[..., Any],
) -> list[Any]:
    """
    C{owner.name} still called, for the rest of C{case}, and what
    C{noted} makes of each call's arguments, in a list that grows.
    """
    calls: list[Any] = []
    real = getattr(owner, name)

    def noting(*args: Any, **kwargs: Any) -> Any:
        calls.append(noted(*args, **kwargs))
        return real(*args, **kwargs)

    case.patch(owner, name, noting)
    return calls


def parsed_addresses(case: SynchronousTestCase, cached: Any) -> list[str]:
    """
    The addresses C{ipaddress.ip_address} parses from now on in C{case};
    C{cached} (an C{lru_cache}d function) starts empty, and ends so.
    """
    parsed = calls_to(case, ipaddress, "ip_address", lambda text: text)
    cached.cache_clear()
    case.addCleanup(cached.cache_clear)
    return parsed


def logged_lines(case: SynchronousTestCase) -> list[str]:
    """The log lines from now until C{case} ends (a list that grows)."""
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event) or "")

    globalLogPublisher.addObserver(observe)
    case.addCleanup(globalLogPublisher.removeObserver, observe)
    return lines


@inlineCallbacks
def wait_rate_limited(
    counters: Mapping[str, int],
    counter: str,
    events: Iterable[dict[str, Any]],
    text: str,
    count: int,
    timeout: float = TIMEOUT,
) -> Any:
    """
    Wait until C{counter} is C{count} and a rate-limited log accounts for
    as many lines containing C{text} among C{events}: each one logged, and
    each summary's count of those it left out (a summary at the end of a
    period repeats the last, not counted); it comes within C{timeout}.
    """

    def accounted() -> int:
        total = 0
        for event in events:
            line = formatEvent(event)
            if text in line:
                last = "; the last: " in line
                total += event.get("ipcd_dropped", 0) + (0 if last else 1)
        return total

    yield wait_until(lambda: counters[counter] == count, f"{count} {counter}")
    yield wait_until(lambda: accounted() == count, "the summary line", timeout)


def fds_run_out(case: SynchronousTestCase) -> None:
    """
    From now on until C{case} ends, the broker's connections to local
    services fail as they do once ipcd has no fd left (C{EMFILE}): not a
    refusal, an unexpected error, for every peer that asks.
    """

    def no_fd_left(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    case.patch(broker_module, "connect_unix_now", no_fd_left)


@inlineCallbacks
def assert_lines_bounded(
    case: SynchronousTestCase,
    counters: Mapping[str, int],
    events: list[dict[str, Any]],
    namespace: str,
    requests: int,
    dropped_before: int,
) -> Any:
    """
    C{requests} peers' doings, each logged under C{namespace} at a bounded
    rate: fewer lines than half as many, and every line left out counted in
    C{counters[LOG_LINES_DROPPED]} (from C{dropped_before}) and said in a
    summary line, which comes at the end of its period (a bounded wait).
    Fires with the events logged under C{namespace}.
    """

    def lines() -> list[dict[str, Any]]:
        return [e for e in events if e.get("log_namespace") == namespace]

    def counted() -> int:
        return counters[LOG_LINES_DROPPED] - dropped_before

    def summarized() -> bool:
        said = sum(e.get("ipcd_dropped", 0) for e in lines())
        return counted() > 0 and said == counted()

    yield wait_until(summarized, "the summary line", LOG_PERIOD + TIMEOUT)
    shown = "\n".join(formatEvent(e) or "" for e in lines())
    case.assertLessEqual(len(lines()), requests // 2, shown)
    return lines()


@inlineCallbacks
def assert_unexpected_bounded(
    case: TestCase,
    counters: Mapping[str, int],
    namespace: str,
    ask: Callable[[int], list[Any]],
    text: str,
) -> Any:
    """
    Once fds have run out (L{fds_run_out}), C{ask(peers)} (blocking, in a
    thread: that many peers' requests) has each fail unexpectedly: counted
    in the broker's C{errors}, said under C{namespace} at the bounded rate
    (L{assert_lines_bounded}), each line C{text} with its traceback.
    Fires with what C{ask} returned.
    """
    fds_run_out(case)
    logged = EventLoggingObserver.createWithCleanup(case, globalLogPublisher)
    dropped = counters[LOG_LINES_DROPPED]
    peers = 10 * LOG_BURST
    answers = yield deferToThread(ask, peers)
    case.assertEqual(counters["errors"], peers)
    lines = yield assert_lines_bounded(
        case, counters, logged, namespace, peers, dropped
    )
    failures = [e for e in lines if "log_failure" in e]
    case.assertTrue(failures, [formatEvent(e) for e in lines])
    case.assertIn(text, formatEvent(failures[0]))
    # Each with its traceback (trial holds those logged as errors).
    case.assertEqual(len(case.flushLoggedErrors(OSError)), len(failures))
    return answers


# File descriptors.


def open_fds(pid: int | str = "self") -> dict[int, str]:
    """This process's (or C{pid}'s) open fds and what they point at."""
    fds = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            pass  # the directory listing's own fd, already closed
    return fds


def count_fds() -> int:
    return len(open_fds())


@inlineCallbacks
def fd_baseline() -> Any:
    """
    The fds open once the reactor runs: trial (re)starts the reactor for each
    test after its first wait, and that installs a signal pipe, so count
    only after one turn of the reactor.
    """
    yield deferLater(reactor, 0, lambda: None)
    return open_fds()


def take_descriptors(case: SynchronousTestCase, free: int) -> list[int]:
    """
    Take every descriptor this process may open but C{free} (a lower soft
    RLIMIT_NOFILE, the holes below it filled), until the returned ones are
    closed (and after the test); the limit is restored after the test.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    case.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(open_fds()) + 1 + free, hard))
    held: list[int] = []
    case.addCleanup(lambda: [os.close(fd) for fd in held])
    try:
        while True:
            held.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
    except OSError as e:
        if e.errno != errno.EMFILE:
            raise
        for _ in range(free):
            os.close(held.pop())
    return held


@inlineCallbacks
def assert_no_fd_leak(before: dict[int, str], timeout: float = TIMEOUT) -> Any:
    """Wait (bounded) until no fd is open beyond those of C{before}."""

    def settled() -> bool:
        return len(open_fds()) <= len(before)

    try:
        yield wait_until(settled, "fds to be closed", timeout)
    except AssertionError:
        now = open_fds()
        extra = {fd: now[fd] for fd in now.keys() - before.keys()}
        raise AssertionError(
            f"fds leaked: {len(now)} open, {len(before)} before; new ones: {extra}"
        )


# A plain upstream-style client.


@dataclass
class Reply:
    """What ipcd answered: the first recvmsg, everything, and the fds."""

    first: bytes
    data: bytes
    fds: list[int] = field(default_factory=list)
    closed: bool = False

    def take_socket(self, case: SynchronousTestCase) -> socket.socket:
        """The one handed-over fd as a blocking socket, closed after the test."""
        [fd] = self.fds
        # Upstream clients read with plain blocking read()s.
        case.assertTrue(os.get_blocking(fd), "the handed-over fd is non-blocking")
        sock = socket.socket(fileno=fd)
        sock.settimeout(TIMEOUT)
        case.addCleanup(sock.close)
        self.fds = []
        return sock

    def close_fds(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def connect_unix(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    try:
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock


def read_reply(sock: socket.socket) -> Reply:
    """Read a lookup reply as an upstream client would, then on to EOF."""
    first, fds, _flags, _addr = socket.recv_fds(sock, 4096, 4)
    reply = Reply(first, first, list(fds))
    while first:
        chunk, more, _flags, _addr = socket.recv_fds(sock, 4096, 4)
        reply.fds.extend(more)
        if not chunk:
            break
        reply.data += chunk
    reply.closed = True
    return reply


def raw_lookup(rundir: str, raw: bytes) -> Reply:
    """Send C{raw} bytes (a framed lookup, or not) to RUNDIR/ipc; read the reply."""
    with connect_unix(os.path.join(rundir, "ipc")) as sock:
        if raw:
            sock.sendall(raw)
        return read_reply(sock)


def lookup(rundir: str, payload: bytes) -> Reply:
    """A framed lookup of C{payload}, exactly as upstream sends it."""
    return raw_lookup(rundir, encode(payload))


def assert_refused(case: SynchronousTestCase, reply: Reply, *words: str) -> str:
    """C{reply} is an C{ne} with each of C{words} and no fd; its text."""
    case.assertEqual(reply.fds, [])
    text = reply.data.decode()
    case.assertTrue(text.startswith("ne "), text)
    for word in words:
        case.assertIn(word, text)
    return text


def assert_logged(case: SynchronousTestCase, lines: list[str], text: str) -> None:
    """One of C{lines} (L{logged_lines}') says C{text}."""
    case.assertTrue([line for line in lines if text in line], (text, lines))


def recv_upto(sock: socket.socket, count: int) -> bytes:
    """Read C{count} bytes (fewer at EOF)."""
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            break
        data += chunk
    return data


def exchange(sock: socket.socket, raw: bytes, expected: int) -> bytes:
    """Send C{raw} and read C{expected} bytes back (fewer at EOF)."""
    sock.sendall(raw)
    return recv_upto(sock, expected)


def bounce(sock: socket.socket, payload: bytes = b"bounce me") -> bytes:
    """Send one framed message, return the framed answer of the same size."""
    return exchange(sock, encode(payload), HEADER.size + len(payload))


@inlineCallbacks
def assert_route_loop(case: TestCase, host: Any, scheme: str, port: int) -> Any:
    """
    C{host} (its C{rundir} and C{broker}) has the admin route C{loopy ->
    SCHEME://127.0.0.1:PORT/loopy}, PORT its own daemon's: that lookup is
    refused as a loop at the first hop, C{pong} routed the same way still
    goes the round, and nothing stays held in C{own_dials}.
    """
    lines = logged_lines(case)
    reply = yield deferToThread(lookup, host.rundir, b"loopy")
    # The daemon told its dialer, a remote peer for it, no more than this;
    # the decision line says why.
    told = assert_refused(case, reply, "loopy")
    case.assertTrue(told.endswith(": unavailable"), told)
    assert_logged(case, lines, "route loop: 'loopy'")
    case.assertEqual(host.broker.counters["inbound requests"], 1)
    route = f"pong;pong {scheme}://127.0.0.1:{port}/pong".encode()
    reply = yield deferToThread(lookup, host.rundir, route)
    sock = reply.take_socket(case)
    answer = yield deferToThread(bounce, sock, b"round")
    case.assertEqual(answer, encode(b"round"))
    sock.close()
    case.assertEqual(len(host.broker.own_dials), 0)


def accepts(path: str) -> bool:
    """Whether something listens on the UNIX socket C{path} (never blocks long)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.connect(path)
    except BlockingIOError:
        return True  # a full backlog: somebody listens
    except OSError:
        return False
    finally:
        sock.close()
    return True


def fill_backlog(case: SynchronousTestCase, path: str) -> list[socket.socket]:
    """
    Connect to the listener at C{path} until its backlog is full (the next
    connect has to wait); the connections, closed after the test.
    """
    fillers = []
    while True:
        filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        case.addCleanup(filler.close)
        filler.setblocking(False)
        try:
            filler.connect(path)
        except BlockingIOError:
            return fillers
        fillers.append(filler)


def stale_socket(path: str) -> None:
    """Leave a socket file at C{path} with nothing listening on it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    finally:
        sock.close()


# A fake external daemon speaking the upstream control protocol.


class FakeDaemonProtocol(Protocol):
    """
    Reads one framed URI, then answers as C{factory.mode} says: C{ok} (a
    framed C{ok}, then C{factory.greeting} in the same write, then echo),
    C{hold} (answer C{ok} only when C{factory.release()} is called),
    C{refuse} (a framed C{no}), C{garbage} (unframed C{ne x}), C{leak} (what
    a service that is no daemon might say) or C{close}.
    """

    def connectionMade(self) -> None:
        self._buffer = b""
        self.uri: bytes | None = None
        self.lost: Deferred[None] = Deferred()
        self.factory.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        if self.uri is not None:
            self.transport.write(data)  # echo, byte for byte
            return
        self._buffer += data
        if len(self._buffer) < HEADER.size:
            return
        (size,) = HEADER.unpack(self._buffer[: HEADER.size])
        if len(self._buffer) < HEADER.size + size:
            return
        self.raw = self._buffer[: HEADER.size + size]
        self.uri = self._buffer[HEADER.size : HEADER.size + size]
        rest = self._buffer[HEADER.size + size :]
        self.factory.uris.append(self.raw)
        mode = self.factory.mode
        if mode == "ok":
            self.accept()
            if rest:
                self.transport.write(rest)
        elif mode == "hold":
            self.factory.held.append(self)
        elif mode == "refuse":
            self.transport.write(encode(b"no"))
            self.transport.loseConnection()
        elif mode == "garbage":
            self.transport.write(b"ne x")
            self.transport.loseConnection()
        elif mode == "leak":
            self.transport.write(b"SECRET BYTES OF A SERVICE")
            self.transport.loseConnection()
        else:
            self.transport.loseConnection()

    def accept(self) -> None:
        self.transport.write(encode(b"ok") + self.factory.greeting)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


class FakeDaemonFactory(Factory):
    protocol = FakeDaemonProtocol
    noisy = False

    def __init__(self, mode: str = "ok", greeting: bytes = b"") -> None:
        self.mode = mode
        self.greeting = greeting
        self.uris: list[bytes] = []
        self.connections: list[FakeDaemonProtocol] = []
        self.held: list[FakeDaemonProtocol] = []

    def release(self) -> None:
        held, self.held = self.held, []
        for protocol in held:
            if protocol.transport.connected:
                protocol.accept()


def fake_daemon(
    case: SynchronousTestCase, rundir: str, scheme: str = "fake", **kwargs: Any
) -> FakeDaemonFactory:
    """Listen as an external daemon on C{RUNDIR/SCHEME}; stopped after."""
    factory = FakeDaemonFactory(**kwargs)
    port = listen_unix(reactor, os.path.join(rundir, scheme), factory)
    case.addCleanup(port.stopListening)

    def drop_connections() -> Any:
        for protocol in factory.connections:
            protocol.transport.loseConnection()
        return wait_until(
            lambda: all(p.lost.called for p in factory.connections),
            "the fake daemon's connections to close",
        )

    case.addCleanup(drop_connections)
    return factory


# Subprocesses.


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port on 127.0.0.1 nothing listens on now (TCP, or C{SOCK_DGRAM})."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def counted_pong(case: SynchronousTestCase, path: str) -> Factory:
    """
    An echo service listening at C{path} (stopped after the test), its
    factory counting the connections it got in C{connections}.
    """
    from ipcd.services.pongd import Pong

    factory = Factory.forProtocol(Pong)
    factory.noisy = False
    factory.connections = 0
    build = factory.buildProtocol

    def counted(addr: Any) -> Any:
        factory.connections += 1
        return build(addr)

    factory.buildProtocol = counted
    port = listen_unix(reactor, path, factory)
    case.addCleanup(port.stopListening)
    return factory


def proc_status(field: str, pid: int | str = "self") -> int:
    """A size from C{/proc/PID/status} (C{VmRSS}, C{VmHWM}), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def reset_peak(pid: int | str = "self") -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), if allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def python_env(**extra: str) -> dict[str, str]:
    """The environment for a child Python that imports ipcd from the tree."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [REPO, *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    env.pop("IPC_NETWORK", None)
    env.update(extra)
    return env


def run_python(
    code: str,
    *args: str,
    timeout: float = TIMEOUT,
    cwd: str | None = None,
    **env: str,
) -> subprocess.CompletedProcess[str]:
    """Run C{code} in a child Python that imports ipcd from the tree, to its end."""
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=python_env(**env),
        cwd=cwd,
    )


def spawn(
    case: SynchronousTestCase,
    args: list[str],
    log_path: str,
    env: Mapping[str, str],
    cwd: str,
    **popen: Any,
) -> subprocess.Popen[bytes]:
    """
    Start C{sys.executable ARGS}, output to C{log_path}; killed after.
    C{popen}: more arguments for C{subprocess.Popen} (C{preexec_fn}, ...).
    """
    log = open(log_path, "wb")
    case.addCleanup(log.close)
    then = popen.pop("preexec_fn", None)

    def prepare() -> None:
        # A suite started in the background of a shell ignores SIGINT, and
        # exec keeps that: Python then installs no handler and twistd none
        # either, so the tests' SIGINT (a terminal's ^C) would be lost.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if then is not None:
            then()

    process = subprocess.Popen(
        [sys.executable, *args],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(env),
        cwd=cwd,
        preexec_fn=prepare,
        **popen,
    )

    def kill() -> None:
        if process.poll() is None:
            process.kill()
        process.wait(TIMEOUT)

    case.addCleanup(kill)
    return process


def _tcp_rows(pid: int | str) -> Iterator[tuple[str, str, str, int]]:
    """
    Process C{pid}'s TCP sockets, from C{/proc}: (local address, remote
    address, state, size of an address in bytes), addresses as the kernel
    writes them (hex C{ADDRESS:PORT}).
    """
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    for table, size in (("tcp", 4), ("tcp6", 16)):
        with open(f"/proc/{pid}/net/{table}") as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[9] in inodes:
                    yield fields[1], fields[2], fields[3], size


def tcp_listeners(pid: int) -> list[tuple[str, int]]:
    """The TCP sockets process C{pid} listens on: (address, port)."""
    found = []
    for local, _remote, state, size in _tcp_rows(pid):
        if state != "0A":
            continue
        address, port = local.split(":")
        raw = bytes.fromhex(address)
        if size == 4:
            host = socket.inet_ntop(socket.AF_INET, raw[::-1])
        else:
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
            host = socket.inet_ntop(socket.AF_INET6, words)
        found.append((host, int(port, 16)))
    return found


def tcp_connecting(port: int, pid: int | str = "self") -> int:
    """How many of process C{pid}'s TCP sockets are connecting to C{port} (SYN_SENT)."""
    return sum(
        1
        for _local, remote, state, _size in _tcp_rows(pid)
        if state == "02" and int(remote.split(":")[1], 16) == port
    )


def read_text(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8", "replace")


# Clients under other uids: a child process that drops to the ids given
# (setgroups, setgid, setuid) and then does one thing on a UNIX socket.

_AS_USER = """
import json, os, socket, struct, sys
path, uid, gid, groups, what = sys.argv[1:6]
os.setgroups([int(g) for g in groups.split(",") if g])
os.setgid(int(gid))
os.setuid(int(uid))
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
try:
    s.connect(path)
except OSError as e:
    print(json.dumps({"error": e.strerror}))
    sys.exit()
if what == "connect":
    print(json.dumps({"connected": True}))
    sys.exit()
payload = what.encode()
s.sendall(struct.pack("!I", len(payload)) + payload)
data, fds, _, _ = socket.recv_fds(s, 4096, 4)
while True:
    more, extra, _, _ = socket.recv_fds(s, 4096, 4)
    fds += extra
    if not more:
        break
    data += more
print(json.dumps({"reply": data.decode("utf-8", "replace"), "fds": len(fds)}))
"""


# POSIX ACL entry tags, as the kernel's extended attribute writes them.
ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = (
    1,
    2,
    4,
    8,
    16,
    32,
)


def set_acl(path: str, entries: Iterable[tuple[int, int, int]]) -> None:
    """
    Give C{path} the access ACL of C{(tag, permissions, id)} C{entries} (in
    the kernel's order: by tag, then id), as C{setfacl} would; skip the
    test where the filesystem has no ACLs.
    """
    raw = struct.pack("<I", 2) + b"".join(
        struct.pack("<HHI", tag, perm, ident) for tag, perm, ident in entries
    )
    try:
        os.setxattr(path, "system.posix_acl_access", raw)
    except OSError as e:
        if e.errno == errno.EOPNOTSUPP:
            raise SkipTest(f"no POSIX ACLs on {path}'s filesystem") from None
        raise


def needs_root() -> None:
    """Skip unless root: running clients under other uids needs it."""
    if os.getuid() != 0:
        raise SkipTest("needs root to run clients under other uids")


def as_user(
    path: str, uid: int, gid: int, groups: tuple[int, ...], what: str
) -> Deferred[dict[str, Any]]:
    """
    In a child under C{uid}, C{gid} and C{groups}: connect to C{path}, then
    send the framed lookup C{what} and read the reply to EOF (C{{"reply":
    ..., "fds": N}}), or with C{what="connect"} only connect
    (C{{"connected": True}}); C{{"error": strerror}} when connect fails.
    """

    def child() -> dict[str, Any]:
        import json

        result = subprocess.run(
            [sys.executable, "-c", _AS_USER, path, str(uid), str(gid)]
            + [",".join(map(str, groups)), what],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=True,
        )
        return json.loads(result.stdout)

    return deferToThread(child)


def set_network(case: TestCase, value: str | None) -> None:
    """Set (or unset) C{IPC_NETWORK} for the rest of the test."""
    old = os.environ.get("IPC_NETWORK")

    def restore() -> None:
        if old is None:
            os.environ.pop("IPC_NETWORK", None)
        else:
            os.environ["IPC_NETWORK"] = old

    case.addCleanup(restore)
    if value is None:
        os.environ.pop("IPC_NETWORK", None)
    else:
        os.environ["IPC_NETWORK"] = value


class RunningIpcdTestCase(TestCase):
    """A test with ipcd and pongd running in a fresh RUNDIR, IPC_NETWORK unset."""

    @inlineCallbacks
    def setUp(self) -> Any:
        set_network(self, None)
        self.rundir = short_rundir(self)
        self.service = yield start_ipcd(self, make_config(self.rundir))
        self.counters = self.service.broker.counters


def read_only(case: SynchronousTestCase, directory: str) -> str:
    """
    Make C{directory} unwritable for this process until C{case} ends, and
    return the reason a write there fails: permissions do not stop root, so
    as root a read-only tmpfs is mounted on it (skipped where that fails).
    """
    if os.geteuid() != 0:
        os.chmod(directory, 0o500)
        case.addCleanup(os.chmod, directory, 0o700)
        return "permission denied"
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,mode=1770", "ipcd-ro", directory],
        capture_output=True,
        timeout=TIMEOUT,
    )
    if mounted.returncode != 0:
        raise SkipTest(f"cannot mount a read-only tmpfs: {mounted.stderr!r}")
    case.addCleanup(subprocess.run, ["umount", directory], timeout=TIMEOUT, check=True)
    return "read-only file system"
