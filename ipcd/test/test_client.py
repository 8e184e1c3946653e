"""
The blocking client, the C{pong} command, and C{twistd -n ipcd} as a real
process: started, used through ipcd by C{pong}, stopped by SIGTERM; a second
instance on the same RUNDIR refused; a killed one's stale sockets replaced.
"""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from array import array
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ipcd import control
from ipcd.client import DEFAULT_TIMEOUT, connect
from ipcd.handoff import (
    HandoffError,
    LookupRefused,
    check_reply,
    receive_fd,
    scm_rights,
)
from ipcd.scripts import pong
from ipcd.test.support import (
    REPO,
    TIMEOUT,
    RunningIpcdTestCase,
    accepts,
    make_config,
    python_env,
    read_text,
    set_network,
    short_rundir,
    spawn,
    start_ipcd,
    wait_until,
)
from ipcd.wire import recv_message, send_message


def echo_once(sock: Any, payload: bytes) -> bytes:
    with sock:
        sock.settimeout(TIMEOUT)
        send_message(sock, payload)
        return recv_message(sock)


class BlockingClientTests(RunningIpcdTestCase):
    def connect_and_echo(self, payload: bytes = b"hi", **kwargs: Any) -> Any:
        def run() -> bytes:
            sock = connect("pong", rundir=self.rundir, timeout=TIMEOUT, **kwargs)
            self.assertTrue(sock.getblocking())
            self.assertFalse(sock.get_inheritable())
            return echo_once(sock, payload)

        return deferToThread(run)

    @inlineCallbacks
    def test_direct(self) -> Any:
        self.assertEqual((yield self.connect_and_echo(b"direct")), b"direct")
        self.assertEqual(self.counters["lookups"], 0)

    @inlineCallbacks
    def test_throughIpcd(self) -> Any:
        echo = yield self.connect_and_echo(b"via", network="pong unix://pong")
        self.assertEqual(echo, b"via")
        self.assertEqual(self.counters["lookups"], 1)

    @inlineCallbacks
    def test_environment(self) -> Any:
        set_network(self, "pong unix://pong")
        self.assertEqual((yield self.connect_and_echo(b"env")), b"env")
        self.assertEqual(self.counters["lookups"], 1)

    @inlineCallbacks
    def test_refused(self) -> Any:
        error = yield self.assertFailure(
            self.connect_and_echo(network="pong unix://missing"), LookupRefused
        )
        self.assertIn("no route to service 'missing'", error.reason)

    @inlineCallbacks
    def test_lookupTooLong(self) -> Any:
        """
        A lookup longer than ipcd takes (max_message_size, 1 MiB): ipcd
        answers before it has all come, and closes; the client gets that
        answer (it got a BrokenPipeError, or a ConnectionResetError after
        the answer).
        """
        network = "pong unix://pong;" + "x" * (2 << 20)
        error = yield self.assertFailure(
            self.connect_and_echo(network=network), LookupRefused
        )
        self.assertRegex(error.reason, r"^lookup of \d+ bytes exceeds 1048576 bytes$")

    @inlineCallbacks
    def test_noService(self) -> Any:
        """Nothing at RUNDIR/NAME: the error names that socket, as open() would."""
        rundir = short_rundir(self)
        error = yield self.assertFailure(
            deferToThread(connect, "pong", rundir=rundir, timeout=TIMEOUT),
            FileNotFoundError,
        )
        path = os.path.join(rundir, "pong")
        self.assertEqual(error.filename, path)
        self.assertEqual(str(error), f"[Errno 2] No such file or directory: {path!r}")


class PongCommandTests(RunningIpcdTestCase):
    @inlineCallbacks
    def pong(self, *argv: str) -> Any:
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        code = yield deferToThread(
            pong.main, ["--rundir", self.rundir, "--timeout", str(TIMEOUT), *argv]
        )
        return code, out.getvalue(), err.getvalue()

    @inlineCallbacks
    def test_direct(self) -> Any:
        self.assertEqual((yield self.pong("hello", "world")), (0, "hello world\n", ""))
        self.assertEqual(self.service.broker.counters["lookups"], 0)

    @inlineCallbacks
    def test_answerIntoAClosedPipe(self) -> Any:
        """
        C{pong hello | true}: a reader gone before the answer is printed
        makes no traceback (it made a BrokenPipeError's); the status is 1.
        """
        from ipcd.test.test_scripts import into_closed_pipe

        args = ["-m", "ipcd.scripts.pong", "--rundir", self.rundir, "hello"]
        done = yield deferToThread(into_closed_pipe, args)
        self.assertEqual((done.returncode, done.stderr), (1, b""))

    @inlineCallbacks
    def test_throughIpcd(self) -> Any:
        set_network(self, "pong unix://pong")
        self.assertEqual((yield self.pong("hello")), (0, "hello\n", ""))
        self.assertEqual(self.service.broker.counters["lookups"], 1)

    @inlineCallbacks
    def test_refusedByIpcd(self) -> Any:
        set_network(self, "pong unix://missing")
        code, out, err = yield self.pong("hello")
        self.assertEqual((code, out), (1, ""))
        ipc = os.path.join(self.rundir, "ipc")
        self.assertIn(f"pong: cannot reach service 'pong' through ipcd at {ipc}: ", err)
        self.assertIn("no route to service 'missing'", err)

    @inlineCallbacks
    def test_noSuchService(self) -> Any:
        code, out, err = yield self.pong("-s", "nosuch", "hello")
        self.assertEqual((code, out), (1, ""))
        # Which socket: the one the service would listen on.
        path = os.path.join(self.rundir, "nosuch")
        self.assertEqual(  # the path once, as docs/quickstart.rst shows it
            err,
            f"pong: cannot reach service 'nosuch' at {path}: [Errno 2] No such "
            "file or directory\n",
        )

    @inlineCallbacks
    def test_badServiceName(self) -> Any:
        code, out, err = yield self.pong("-s", "../etc", "hello")
        self.assertEqual((code, out), (1, ""))
        self.assertIn("'../etc'", err)

    @inlineCallbacks
    def test_importsNoTwisted(self) -> Any:
        """
        The blocking client and pong import no Twisted (nor zope), even
        when a lookup goes through ipcd; the Twisted endpoint classes are
        still importable from L{ipcd.client}, Twisted with them.
        """
        code = (
            "import sys\n"
            "import ipcd.client\n"
            "from ipcd.scripts import pong\n"
            f"status = pong.main(['--rundir', {self.rundir!r}, 'through'])\n"
            "loaded = sorted(m for m in sys.modules\n"
            "                if m.split('.')[0] in ('twisted', 'zope'))\n"
            "print(status, loaded)\n"
            "from ipcd.client import IPCClientEndpoint\n"
            "print(IPCClientEndpoint.__module__, 'twisted' in sys.modules)\n"
        )
        env = python_env(IPC_NETWORK="pong unix://pong", RUNDIR=self.rundir)
        result = yield deferToThread(
            subprocess.run,
            [sys.executable, "-c", code],
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        self.assertEqual(result.stderr, "")
        self.assertEqual(result.stdout, "through\n0 []\nipcd.endpoints True\n")
        self.assertEqual(self.service.broker.counters["lookups"], 1)


class ExchangeTests(SynchronousTestCase):
    """
    The client's side of a lookup against a bare socket standing in for
    ipcd: the timeout it is given bounds each wait.
    """

    def ipcd_stand_in(self) -> tuple[str, socket.socket]:
        """RUNDIR, and a socket listening as RUNDIR/ipc that never accepts."""
        rundir = short_rundir(self)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        listener.bind(os.path.join(rundir, "ipc"))
        listener.listen(4)
        return rundir, listener

    def test_noAnswerTimesOut(self) -> None:
        """ipcd takes the lookup and never answers: TimeoutError, no fd kept."""
        rundir, listener = self.ipcd_stand_in()
        before = len(os.listdir("/proc/self/fd"))
        with self.assertRaises(TimeoutError):
            connect("pong", rundir=rundir, network="pong unix://pong", timeout=0.2)
        self.assertEqual(len(os.listdir("/proc/self/fd")), before)
        peer, _ = listener.accept()
        with peer:
            peer.settimeout(TIMEOUT)
            self.assertEqual(recv_message(peer), b"pong;pong unix://pong")

    def test_answerInPiecesTimesOut(self) -> None:
        """
        A stand-in that answers one byte at a time, each well within the
        timeout (4096 of them would take 8 s): the timeout bounds the whole
        answer, not each wait.
        """
        rundir, listener = self.ipcd_stand_in()
        stop = threading.Event()

        def trickle() -> None:
            peer, _ = listener.accept()
            with peer:
                recv_message(peer)
                while not stop.wait(0.002):
                    try:
                        peer.sendall(b"n")
                    except OSError:  # the client is gone
                        return

        thread = threading.Thread(target=trickle)
        thread.start()
        self.addCleanup(thread.join, TIMEOUT)
        self.addCleanup(stop.set)
        with self.assertRaises(TimeoutError):
            connect("pong", rundir=rundir, network="pong unix://pong", timeout=1)

    def test_answerAfterAWhile(self) -> None:
        """
        The answer comes in two pieces, the descriptor with the first: the
        client waits for each, and gets a blocking, close-on-exec socket.
        """
        rundir, listener = self.ipcd_stand_in()
        service, kept = socket.socketpair()
        self.addCleanup(kept.close)

        def answer() -> None:
            peer, _ = listener.accept()
            with peer, service:
                recv_message(peer)
                peer.sendmsg([b"o"], scm_rights(service.fileno()))
                threading.Event().wait(0.05)
                peer.sendall(b"k")

        thread = threading.Thread(target=answer)
        thread.start()
        self.addCleanup(thread.join, TIMEOUT)
        handed = connect("pong", rundir=rundir, network="pong unix://pong")
        with handed:
            self.assertTrue(handed.getblocking())
            self.assertFalse(handed.get_inheritable())
            handed.sendall(b"x")
            kept.settimeout(TIMEOUT)
            self.assertEqual(kept.recv(1), b"x")

    def test_refusalInPiecesWithNoTimeout(self) -> None:
        """
        C{timeout=None} (wait as long as it takes) and a refusal in two
        pieces: L{LookupRefused} with the whole reason.
        """
        rundir, listener = self.ipcd_stand_in()

        def answer() -> None:
            peer, _ = listener.accept()
            with peer:
                recv_message(peer)
                peer.sendall(b"ne no ")
                threading.Event().wait(0.05)
                peer.sendall(b"route")

        thread = threading.Thread(target=answer)
        thread.start()
        self.addCleanup(thread.join, TIMEOUT)
        with self.assertRaises(LookupRefused) as caught:
            connect("pong", rundir=rundir, network="pong unix://pong", timeout=None)
        self.assertEqual(caught.exception.reason, "no route")


class HostileReplyTests(SynchronousTestCase):
    """
    A reply from something that is not a well-behaved ipcd, descriptors
    passed for real: whatever it sends, the client keeps none it was given.
    """

    def setUp(self) -> None:
        self.ours, self.theirs = socket.socketpair()
        self.addCleanup(self.ours.close)
        self.addCleanup(self.theirs.close)
        self.ours.settimeout(TIMEOUT)

    def held(self) -> int:
        return len(os.listdir("/proc/self/fd"))

    def test_timeoutAfterTheDescriptor(self) -> None:
        """
        The first piece of an answer brings a descriptor, the rest never
        comes: the client times out and closes it (the far end sees EOF).
        """
        service, kept = socket.socketpair()
        self.addCleanup(kept.close)
        with service:
            self.theirs.sendmsg([b"o"], scm_rights(service.fileno()))
        self.ours.settimeout(0.05)  # only the wait for the rest times out
        before = self.held()
        with self.assertRaises(TimeoutError):
            receive_fd(self.ours)
        self.assertEqual(self.held(), before)
        kept.settimeout(TIMEOUT)
        self.assertEqual(kept.recv(1), b"")

    def test_okWithMoreIsFinal(self) -> None:
        """
        An answer that begins with C{ok} but is more (C{okay}), with a
        descriptor, the connection left open: refused at once as an answer
        no ipcd gives (ipcd's C{ok} comes whole, in one piece), waiting for
        nothing more, and the descriptor closed.
        """
        service, kept = socket.socketpair()
        self.addCleanup(kept.close)
        with service:
            self.theirs.sendmsg([b"okay"], scm_rights(service.fileno()))
        with self.assertRaises(HandoffError) as caught:
            receive_fd(self.ours)
        self.assertEqual(str(caught.exception), "unexpected answer from ipcd: b'okay'")
        kept.settimeout(TIMEOUT)
        self.assertEqual(kept.recv(1), b"")

    def test_okWithoutDescriptor(self) -> None:
        """C{ok} and no descriptor, then EOF: an error saying so, no socket."""
        self.theirs.sendall(b"ok")
        self.theirs.shutdown(socket.SHUT_WR)
        with self.assertRaises(HandoffError) as caught:
            receive_fd(self.ours)
        self.assertEqual(
            str(caught.exception), "ipcd answered ok without a file descriptor"
        )

    def test_neNeedsItsSpace(self) -> None:
        """
        An answer that only begins with C{ne} (C{never}) is no refusal
        (L{LookupRefused} is C{ne REASON}), but an answer no ipcd gives.
        """
        self.theirs.sendall(b"never")
        self.theirs.shutdown(socket.SHUT_WR)
        with self.assertRaises(HandoffError) as caught:
            receive_fd(self.ours)
        self.assertNotIsInstance(caught.exception, LookupRefused)
        self.assertEqual(str(caught.exception), "unexpected answer from ipcd: b'never'")

    def test_endlessAnswerReadUpTo4KiB(self) -> None:
        """
        4 KiB of no answer, the connection left open: the client stops
        reading there and judges what came, as the C{ipc:} endpoint does,
        rather than waiting for more; a byte less is waited on.
        """
        self.theirs.sendall(b"x" * 4095)
        self.ours.settimeout(0.05)  # only the wait for the last byte times out
        self.assertRaises(TimeoutError, receive_fd, self.ours)
        self.ours.settimeout(TIMEOUT)
        self.theirs.sendall(b"x" * 4096)
        with self.assertRaises(HandoffError) as caught:
            receive_fd(self.ours)
        self.assertEqual(
            str(caught.exception), f"unexpected answer from ipcd: {b'x' * 80!r}"
        )

    def test_resetBeforeAnyAnswer(self) -> None:
        """
        The far end closes with the lookup unread and no answer: the
        connection's own error (reset), not a L{HandoffError}, which says
        what ipcd answered.
        """
        self.ours.sendall(b"lookup")
        self.theirs.close()
        self.assertRaises(ConnectionResetError, receive_fd, self.ours)

    def test_extraDescriptorsClosed(self) -> None:
        """
        L{check_reply} given more than one descriptor with C{ok}: the first
        is the answer, the others are closed.
        """
        pairs = [socket.socketpair() for _ in range(3)]
        for a, b in pairs:
            self.addCleanup(a.close)
            self.addCleanup(b.close)
        fds = [os.dup(a.fileno()) for a, _ in pairs]
        answer = check_reply(b"ok", fds)
        self.addCleanup(os.close, answer)
        self.assertEqual(answer, fds[0])
        for a, b in pairs[1:]:
            a.close()
            b.settimeout(TIMEOUT)
            self.assertEqual(b.recv(1), b"")  # EOF: no copy of a is left open

    def test_notASocket(self) -> None:
        """ok with a pipe's end: a clear error, and the pipe's end closed."""
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, write_end)
        self.theirs.sendmsg([b"ok"], scm_rights(read_end))
        os.close(read_end)
        before = self.held()
        with self.assertRaises(HandoffError) as caught:
            receive_fd(self.ours)
        self.assertIn("not a socket", str(caught.exception))
        self.assertEqual(self.held(), before)
        self.assertRaises(BrokenPipeError, os.write, write_end, b"x")

    def test_descriptorsPieceAfterPiece(self) -> None:
        """
        Four descriptors with each of 50 pieces of a reply: the client
        never holds more than one of them at a time.
        """
        held = []

        class Counting(socket.socket):
            def recvmsg(self, *args: Any) -> Any:
                held.append(len(os.listdir("/proc/self/fd")))
                return super().recvmsg(*args)

        counting = Counting(fileno=self.ours.detach())
        self.addCleanup(counting.close)
        counting.settimeout(TIMEOUT)
        service, kept = socket.socketpair()
        self.addCleanup(kept.close)
        with service:
            four = [
                (
                    socket.SOL_SOCKET,
                    socket.SCM_RIGHTS,
                    array("i", [service.fileno()] * 4),
                )
            ]
            for _ in range(50):
                self.theirs.sendmsg([b"n"], four)
        self.theirs.shutdown(socket.SHUT_WR)
        before = self.held()
        with self.assertRaises(HandoffError):
            receive_fd(counting)
        self.assertEqual(len(held), 51)
        self.assertLessEqual(max(held), before + 1)
        self.assertEqual(self.held(), before)


TWISTD = "from twisted.scripts.twistd import run; run()"


class TimeoutTests(SynchronousTestCase):
    """A timeout no wait can be bounded by is refused at once, naming it."""

    def test_outOfRange(self) -> None:
        rundir = short_rundir(self)
        for timeout in (-1, 0, float("nan"), float("inf"), 1e12, True):
            error = self.assertRaises(
                ValueError, connect, "pong", rundir=rundir, timeout=timeout
            )
            self.assertIn("timeout: expected seconds, above 0", str(error))
            self.assertIn(repr(timeout), str(error))

    def test_pongSaysUsage(self) -> None:
        """pong --timeout -1: a usage line and status 2, not a traceback."""
        for value in ("-1", "nan", "x"):
            err = io.StringIO()
            self.patch(sys, "stderr", err)
            exited = self.assertRaises(SystemExit, pong.main, ["--timeout", value])
            self.assertEqual(exited.code, 2)
            last = err.getvalue().splitlines()[-1]
            self.assertTrue(
                last.startswith("pong: error: argument --timeout: expected seconds"),
                last,
            )
            self.assertIn(repr(value) if value == "x" else value, last)

    def test_pongTimeoutInAsciiDecimal(self) -> None:
        """
        pong --timeout 1_0 (or ١, Arabic-Indic one): a usage error, not the
        10 s and 1 s Python's float() read them as.
        """
        for value in ("1_0", "\u0661", " 1"):
            err = io.StringIO()
            self.patch(sys, "stderr", err)
            exited = self.assertRaises(SystemExit, pong.main, ["--timeout", value])
            self.assertEqual(exited.code, 2)
            self.assertEqual(
                err.getvalue().splitlines()[-1],
                f"pong: error: argument --timeout: expected seconds, got {value!r}",
            )


class RundirTests(SynchronousTestCase):
    """A rundir the kernel would not take as it is: refused before connecting."""

    def test_nulReachesNoOtherService(self) -> None:
        """
        An AF_UNIX path ends at a NUL: C{connect("x", rundir=RUNDIR/pong\\0)}
        was connected to pong.
        """
        rundir = short_rundir(self)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as pong:
            pong.bind(os.path.join(rundir, "pong"))
            pong.listen()
            pong.setblocking(False)
            for network in ("", "x unix://x"):
                error = self.assertRaises(
                    ValueError, connect, "x", rundir=f"{rundir}/pong\0", network=network
                )
                self.assertIn("rundir: ", str(error))
                self.assertIn("has a NUL character", str(error))
            self.assertRaises(BlockingIOError, pong.accept)  # nobody came

    def test_socketPathTooLong(self) -> None:
        """
        Over AF_UNIX's 107 bytes: a ValueError naming rundir, not the
        socket module's C{OSError: AF_UNIX path too long}.
        """
        over = "/tmp/" + "d" * (108 - len("/tmp/") - len("/pong"))
        error = self.assertRaises(ValueError, connect, "pong", rundir=over, network="")
        self.assertIn("rundir: the socket path", str(error))
        self.assertIn("is 108 bytes; AF_UNIX takes at most 107", str(error))


class UsageStatusTests(SynchronousTestCase):
    """Each command's status for a usage error is the one its docs give."""

    def status(self, module: str, *argv: str) -> int:
        done = subprocess.run(
            [sys.executable, "-m", f"ipcd.scripts.{module}", *argv],
            capture_output=True,
            env=python_env(),
            timeout=6 * TIMEOUT,
        )
        self.assertEqual(done.stdout, b"")
        self.assertIn(b"--bogus", done.stderr)
        return done.returncode

    def test_asDocumented(self) -> None:
        """
        pong and websocketc exit 2 on a usage error (argparse's, the common
        convention), ipcd 1 (every start-up failure's, as twistd's own);
        docs/quickstart.rst said only "exits 1" for pong.
        """
        docs = os.path.join(REPO, "docs")
        with open(os.path.join(docs, "quickstart.rst")) as f:
            quickstart = " ".join(f.read().split())
        with open(os.path.join(docs, "api.rst")) as f:
            api = " ".join(f.read().split())
        [pong_says] = re.findall(r"A usage error \(.*?\) exits (\d)", quickstart)
        [ipcd_says] = re.findall(r"usage error too, with status (\d)", quickstart)
        [websocketc_says] = re.findall(r"exit status 0 done, (\d) usage", api)
        self.assertEqual(self.status("pong", "--bogus"), int(pong_says))
        self.assertEqual(self.status("websocketc", "--bogus"), int(websocketc_says))
        self.assertEqual(self.status("ipcd", "--bogus"), int(ipcd_says))


class NoIpcdTests(TestCase):
    def test_noIpcd(self) -> None:
        """IPC_NETWORK set and no ipcd: pong says to start it."""
        rundir = short_rundir(self)
        set_network(self, "pong unix://pong")
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        self.assertEqual(pong.main(["--rundir", rundir, "hi"]), 1)
        ipc = os.path.join(rundir, "ipc")
        self.assertEqual(
            err.getvalue(),
            f"pong: cannot reach service 'pong' through ipcd at {ipc}: no ipcd "
            f"listens on {ipc} (no such file or directory): is ipcd running? "
            "Start it (ipcd), or set RUNDIR to its socket directory\n",
        )
        self.assertRaises(FileNotFoundError, connect, "pong", rundir=rundir)


class SilentHopTests(TestCase):
    """
    A route to a peer that accepts and never answers: with both sides'
    default timeouts, the client gets ipcd's answer naming the hop, not a
    timeout of its own.
    """

    @inlineCallbacks
    def test_ipcdAnswersFirst(self) -> Any:
        set_network(self, None)
        rundir = short_rundir(self)
        config = make_config(rundir, tcpd={"listen": "tcp:0:interface=127.0.0.1"})
        self.assertGreater(DEFAULT_TIMEOUT, config.connect_timeout)
        yield start_ipcd(self, config)
        silent = socket.socket()
        self.addCleanup(silent.close)
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)  # the kernel accepts; nobody answers
        port = silent.getsockname()[1]
        set_network(self, f"pong tcp://127.0.0.1:{port}/pong")
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        code = yield deferToThread(pong.main, ["--rundir", rundir, "hi"])
        self.assertEqual((code, out.getvalue()), (1, ""))
        ipc = os.path.join(rundir, "ipc")
        self.assertEqual(
            err.getvalue(),
            f"pong: cannot reach service 'pong' through ipcd at {ipc}: connecting "
            f"to tcp://127.0.0.1:{port}/pong timed out after 5 s\n",
        )


class TwistdCase(TestCase):
    """C{twistd -n ipcd} in a subprocess, found through the plugin."""

    def setUp(self) -> None:
        self.rundir = short_rundir(self)
        self.work = short_rundir(self, "ipcd-work-")
        self.env = python_env()
        self.sockets = [
            os.path.join(self.rundir, name) for name in ("ipc", "ipcd-control", "pong")
        ]

    def twistd(self, name: str, *options: str) -> tuple[subprocess.Popen[bytes], str]:
        log = os.path.join(self.work, f"{name}.log")
        args = ["-c", TWISTD, "-n", "--pidfile=", "ipcd"]
        args += ["--rundir", self.rundir, "--no-tcp", "--no-ws", *options]
        return spawn(self, args, log, self.env, self.work), log

    @inlineCallbacks
    def started(self, process: subprocess.Popen[bytes], log: str) -> Any:
        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(
                    f"twistd exited with {process.returncode}:\n{read_text(log)}"
                )
            return all(accepts(path) for path in self.sockets)

        yield wait_until(ready, "twistd ipcd to listen", timeout=30)

    def run_python(self, args: list[str], **env: str) -> Any:
        return deferToThread(
            subprocess.run,
            [sys.executable, *args],
            capture_output=True,
            env=python_env(**env),
            cwd=self.work,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )


class TwistdTests(TwistdCase):
    """C{twistd -n ipcd}: started, used, stopped; two on one RUNDIR."""

    @inlineCallbacks
    def test_runPongStop(self) -> Any:
        process, log = self.twistd("first")
        yield self.started(process, log)
        result = yield self.run_python(
            ["-m", "ipcd.scripts.pong", "hello", "through", "ipcd"],
            IPC_NETWORK="pong unix://pong",
            RUNDIR=self.rundir,
        )
        self.assertEqual(
            (result.returncode, result.stdout, result.stderr),
            (0, b"hello through ipcd\n", b""),
        )
        report = yield deferToThread(control.request, "status", self.rundir, TIMEOUT)
        self.assertEqual(report["counters"]["lookups"], 1)

        # A second instance on the same RUNDIR refuses, naming the first.
        second = yield self.run_python(
            ["-c", TWISTD, "-n", "--pidfile=", "ipcd", "--rundir", self.rundir]
            + ["--no-tcp", "--no-ws"]
        )
        output = (second.stdout + second.stderr).decode("utf-8", "replace")
        self.assertNotEqual(second.returncode, 0, output)
        self.assertIn(
            f"another ipcd (pid {process.pid}) is running on RUNDIR {self.rundir}",
            output,
        )
        # ...and leaves the first one's sockets alone.
        self.assertTrue(all(accepts(path) for path in self.sockets))

        process.send_signal(signal.SIGTERM)
        code = yield deferToThread(process.wait, 30)
        self.assertIn(code, (0, -signal.SIGTERM), read_text(log))
        for path in self.sockets:
            self.assertFalse(os.path.lexists(path), f"{path} left behind")

    @inlineCallbacks
    def test_staleSocketsAfterKill(self) -> Any:
        """A killed instance leaves its sockets; the next one replaces them."""
        process, log = self.twistd("killed")
        yield self.started(process, log)
        process.kill()
        yield deferToThread(process.wait, 30)
        self.assertTrue(all(os.path.lexists(path) for path in self.sockets))

        process, log = self.twistd("next")
        yield self.started(process, log)
        result = yield self.run_python(
            ["-m", "ipcd.scripts.pong", "again"],
            IPC_NETWORK="pong unix://pong",
            RUNDIR=self.rundir,
        )
        self.assertEqual((result.returncode, result.stdout), (0, b"again\n"))
        process.send_signal(signal.SIGTERM)
        code = yield deferToThread(process.wait, 30)
        self.assertIn(code, (0, -signal.SIGTERM), read_text(log))
