"""
Tests for L{ipcd.scripts.ipcd}: L{join_words} (the seed's unquoted flag
style becomes twistd's quoted one), the C{status} and C{reload}
subcommands, what C{ipcd status} says when no ipcd answers, and that the
C{ipcd} command parses its options (and loads the configuration) once;
and what C{ipcd reload} and C{ipcd status} print from a real ipcd, as the
docs show it.
"""

from __future__ import annotations

import grp
import io
import json
import os
import pwd
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.python import usage
from twisted.scripts import twistd
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from ipcd import control as control_module
from ipcd import options as ipcd_options
from ipcd import version
from ipcd.logs import json_observer
from ipcd.scripts import websocketc
from ipcd.scripts.ipcd import control, join_words, main
from ipcd.test.support import (
    REPO,
    TIMEOUT,
    make_config,
    python_env,
    read_text,
    short_rundir,
    spawn,
    start_ipcd,
)
from ipcd.wire import recv_message, send_message

# Serves one forged status, as the uid given, on a socket bound but not yet
# listening, passed by number.
_FAKE_CONTROL = """
import os, socket, sys
server = socket.socket(fileno=int(sys.argv[1]))
os.setgroups([])
os.setgid(int(sys.argv[2]))
os.setuid(int(sys.argv[2]))
server.listen(1)
print("listening", flush=True)
server.settimeout(30)
conn, _ = server.accept()
conn.recv(100)
conn.sendall(b"\\0\\0\\0\\x02{}")
"""


def _end(process: subprocess.Popen[bytes]) -> None:
    process.kill()
    process.wait(TIMEOUT)
    if process.stdout is not None:
        process.stdout.close()


# ipcd status as another user: imported as root (the interpreter's files
# may be root's alone), then the ids dropped.
_STATUS_AS = """
import os, sys
from ipcd import control, logs, names, options, rundir
from ipcd.scripts.ipcd import control as status
uid = int(sys.argv[1])
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
sys.exit(status("status", sys.argv[2]))
"""


class ControlTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.rundir = tempfile.mkdtemp(prefix="ipcd-", dir="/tmp")
        self.addCleanup(os.rmdir, self.rundir)
        self.err = io.StringIO()
        self.patch(sys, "stderr", self.err)
        self.out = io.StringIO()

    def unreachable(self, command: str = "status") -> str:
        path = os.path.join(self.rundir, "ipcd-control")
        return (
            f"ipcd {command}: cannot reach ipcd's control socket {path}: "
            "no such socket (is ipcd running, with this --rundir?)\n"
        )

    def test_noIpcdNamesTheSocket(self) -> None:
        self.assertEqual(control("status", self.rundir), 1)
        self.assertEqual(self.err.getvalue(), self.unreachable())

    def test_staleSocketSaysNotRunning(self) -> None:
        """A socket left by an ipcd that stopped: nobody listens on it."""
        path = os.path.join(self.rundir, "ipcd-control")
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(stale.close)
        stale.bind(path)
        self.addCleanup(os.unlink, path)
        self.assertEqual(control("reload", self.rundir), 1)
        self.assertEqual(
            self.err.getvalue(),
            f"ipcd reload: cannot reach ipcd's control socket {path}: nobody "
            "listens on it (ipcd is not running)\n",
        )

    def ask_as_nobody(self, rundir_mode: int, socket_mode: int) -> tuple[Any, ...]:
        """
        C{ipcd status} asked by nobody of a control socket (C{socket_mode})
        in RUNDIR (C{rundir_mode}): its exit status, output and error.
        """
        if os.geteuid() != 0:
            raise SkipTest("needs root: to ask as another user")
        nobody = pwd.getpwnam("nobody")
        os.chmod(self.rundir, rundir_mode)
        path = os.path.join(self.rundir, "ipcd-control")
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(server.close)
        server.bind(path)
        self.addCleanup(os.unlink, path)
        os.chmod(path, socket_mode)
        server.listen()
        asked = subprocess.run(
            [sys.executable, "-c", _STATUS_AS, str(nobody.pw_uid), self.rundir],
            env=python_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        return (asked.returncode, asked.stdout, asked.stderr)

    def test_notAllowedSaysWhoMayAsk(self) -> None:
        """
        A user who may not connect to the control socket (0660, root's) is
        told who may ask, not "[Errno 13] Permission denied".
        """
        path = os.path.join(self.rundir, "ipcd-control")
        self.assertEqual(
            self.ask_as_nobody(0o755, 0o660),
            (
                1,
                "",
                f"ipcd status: cannot reach ipcd's control socket {path}: "
                "permission denied (ask as root, as ipcd's user or as a member "
                "of its [control] group)\n",
            ),
        )

    def test_closedRundirSaysHowToOpenIt(self) -> None:
        """
        A user who may not enter RUNDIR (ipcd makes it 1770, for its own
        group) is told so, and how to let ipcd's [control] group in, not
        to be a member of the [control] group it may already be in.  The
        socket (0666) would let anybody in: RUNDIR does not.
        """
        path = os.path.join(self.rundir, "ipcd-control")
        group = grp.getgrgid(os.getegid()).gr_name
        self.assertEqual(
            self.ask_as_nobody(0o1770, 0o666),
            (
                1,
                "",
                f"ipcd status: cannot reach ipcd's control socket {path}: "
                f"permission denied: this user may not enter RUNDIR {self.rundir} "
                f"(mode 1770, group {group}): ask as root, as ipcd's user or as "
                f"a member of group {group}; to let ipcd's [control] group in, "
                f"give it search permission alone: setfacl -m g:GROUP:x "
                f"{self.rundir}\n",
            ),
        )

    def test_subcommands(self) -> None:
        """
        C{ipcd status} and C{ipcd reload} are subcommands (exit status 1
        when no ipcd answers); the rundir may come before the command.
        Neither loads a configuration.
        """
        self.patch(ipcd_options, "load_config", lambda *a: self.fail("config loaded"))
        for argv in (
            ["status", "--rundir", self.rundir],
            ["status", "--json", "--rundir", self.rundir],
            ["--rundir", self.rundir, "status"],
            ["reload", "--rundir", self.rundir],
        ):
            self.err.truncate(0)
            self.err.seek(0)
            exit = self.assertRaises(SystemExit, main, argv)
            self.assertEqual(exit.code, 1)
            command = "reload" if "reload" in argv else "status"
            self.assertEqual(self.err.getvalue(), self.unreachable(command))

    def test_answerNeverWritesControlCharacters(self) -> None:
        """
        Whatever answers on RUNDIR/ipcd-control (another user's socket in a
        RUNDIR ipcd refused, or text a peer chose, such as its certificate's
        name), no control character reaches the operator's terminal: an
        escape sequence is shown escaped.
        """
        evil = "\x1b]0;owned\x07\x1b[2J\u202e"
        shown = "\\x1b]0;owned\\x07\\x1b[2J\\u202e"
        status = {
            "connections": [
                {
                    "direction": "in",
                    "service": evil,
                    "route": evil,
                    "peer": evil,
                    "bytes_in": 1,
                    "bytes_out": 2,
                    "age": 3,
                    "tls": {evil: 1},
                }
            ],
            "counters": {evil: 1},
            "inbound": {evil: evil},
            "dns": {evil: {"error": evil, "last_error": evil}},
            "config": {evil: evil},
        }
        # ipcd status, ipcd status --wide, ipcd reload twice.
        answers = [
            status,
            status,
            {"ok": False, "error": evil},
            {"ok": True, "restart_needed": [evil]},
        ]
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        path = os.path.join(self.rundir, "ipcd-control")
        server.bind(path)
        self.addCleanup(os.unlink, path)
        self.addCleanup(server.close)
        server.listen(len(answers))
        server.settimeout(30)

        def answer() -> None:
            for each in answers:
                conn, _ = server.accept()
                with conn:
                    recv_message(conn)
                    send_message(conn, json.dumps(each).encode())

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        control("status", self.rundir)
        control("status", self.rundir, wide=True)
        control("reload", self.rundir)
        control("reload", self.rundir)
        thread.join(30)
        written = out.getvalue() + self.err.getvalue()
        self.assertEqual([c for c in written if not (c.isprintable() or c == "\n")], [])
        self.assertIn(shown, written)
        self.assertIn(f"ipcd reload: refused: {shown}", written)
        self.assertIn(f"reloaded; restart needed for {shown}", written)

    def test_unexpectedStatusAnswer(self) -> None:
        """
        A status answer of another shape (another version's ipcd) is one
        line and status 1, not a traceback; C{--json} still shows it.
        """
        path = os.path.join(self.rundir, "ipcd-control")
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(server.close)
        server.bind(path)
        self.addCleanup(os.unlink, path)
        server.listen(2)
        server.settimeout(30)

        def answer() -> None:
            for _ in range(2):
                conn, _ = server.accept()
                with conn:
                    recv_message(conn)
                    send_message(conn, b'{"connections": 7}')

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        self.assertEqual(control("status", self.rundir), 1)
        self.assertEqual(out.getvalue(), "")
        lines = self.err.getvalue().splitlines()
        self.assertEqual(len(lines), 1)
        self.assertTrue(lines[0].startswith("ipcd status: unexpected answer ("))
        self.assertEqual(control("status", self.rundir, as_json=True), 0)
        thread.join(30)
        self.assertEqual(json.loads(out.getvalue()), {"connections": 7})

    def test_unexpectedAnswersOfAnyShape(self) -> None:
        """
        An answer that is no JSON object, or a reload's of another shape,
        is one line and status 1 too (it was a traceback): for C{reload},
        and for C{status --json}, which shows it.
        """
        cases = [
            ("reload", b"[1]", False),
            ("reload", b'{"ok": true, "restart_needed": 5}', False),
            ("reload", b'{"ok": true, "not_applied": "x"}', False),
            ("status", b'"text"', False),
            ("status", b"[1]", True),
        ]
        path = os.path.join(self.rundir, "ipcd-control")
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(server.close)
        server.bind(path)
        self.addCleanup(os.unlink, path)
        server.listen(len(cases))
        server.settimeout(30)

        def answer() -> None:
            for _command, payload, _as_json in cases:
                conn, _ = server.accept()
                with conn:
                    recv_message(conn)
                    send_message(conn, payload)

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        for command, payload, as_json in cases:
            self.err.truncate(0)
            self.err.seek(0)
            self.assertEqual(control(command, self.rundir, as_json=as_json), 1)
            lines = self.err.getvalue().splitlines()
            if as_json:
                self.assertEqual(lines, [])
                self.assertEqual(json.loads(out.getvalue()), json.loads(payload))
            else:
                self.assertEqual(len(lines), 1, lines)
                self.assertTrue(
                    lines[0].startswith(f"ipcd {command}: unexpected answer ("),
                    lines,
                )
                self.assertEqual(out.getvalue(), "")
        thread.join(30)

    def served_by_nobody(self) -> tuple[int, str]:
        """
        User nobody serves RUNDIR/ipcd-control (one forged answer, if
        asked); returns nobody's uid and the socket's path.
        """
        if os.geteuid() != 0:
            raise SkipTest("needs root: to serve the socket as another user")
        nobody = pwd.getpwnam("nobody").pw_uid
        path = os.path.join(self.rundir, "ipcd-control")
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(server.close)
        server.bind(path)
        self.addCleanup(os.unlink, path)
        # The peer credentials are those of whoever calls listen().
        fake = subprocess.Popen(
            [sys.executable, "-c", _FAKE_CONTROL, str(server.fileno()), str(nobody)],
            pass_fds=[server.fileno()],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.addCleanup(_end, fake)
        self.assertEqual(fake.stdout.readline(), b"listening\n")
        self.patch(sys, "stdout", self.out)
        return nobody, path

    def test_answerOfAnotherUserRefused(self) -> None:
        """
        A socket at RUNDIR/ipcd-control that another user serves (bound
        there while ipcd was down) is not ipcd: it gets no command, and
        nothing it answers is shown as ipcd's status.
        """
        nobody, path = self.served_by_nobody()
        self.assertEqual(control("status", self.rundir), 1)
        self.assertEqual(self.out.getvalue(), "")
        self.assertEqual(
            self.err.getvalue(),
            f"ipcd status: cannot reach ipcd's control socket {path}: served by "
            f"uid {nobody}, not by RUNDIR's owner (uid {os.geteuid()}): not ipcd\n",
        )

    def assertNotAsked(self, command: str, path: str, nobody: int) -> None:  # noqa: N802
        """The one line for a RUNDIR of C{nobody}'s that anyone could make."""
        self.assertEqual(
            self.err.getvalue(),
            f"ipcd {command}: cannot reach ipcd's control socket {path}: unsafe "
            f"RUNDIR {self.rundir}: {self.rundir} is owned by uid {nobody} "
            f"(nobody), who could replace it in /tmp; choose another --rundir\n",
        )

    def test_rundirOfAnotherUserNotAsked(self) -> None:
        """
        A RUNDIR another user made where anyone may make one (the default
        /tmp/libipc-run, before ipcd ever ran), with their socket served
        there by them, its owner: not asked, as ipcd itself would refuse
        to start there.
        """
        nobody, path = self.served_by_nobody()
        os.chown(self.rundir, nobody, -1)
        self.assertEqual(control("reload", self.rundir), 1)
        self.assertEqual(self.out.getvalue(), "")
        self.assertNotAsked("reload", path, nobody)

    def test_rundirMadeByAnotherUserBeforeTheConnectNotAsked(self) -> None:
        """
        RUNDIR missing when the command starts, and made by another user
        (with their socket served there) before it connects: not asked.
        Whenever they made it, it is judged as it is when connected to.
        """
        os.rmdir(self.rundir)  # ipcd never ran: /tmp/libipc-run is free
        self.addCleanup(lambda: os.path.isdir(self.rundir) or os.mkdir(self.rundir))
        made: list[tuple[int, str]] = []

        class Racing:
            """C{socket} for ipcd.control, the other user quick meanwhile."""

            def __getattr__(_, name: str) -> Any:
                return getattr(socket, name)

            def socket(_, *args: Any) -> socket.socket:
                os.mkdir(self.rundir)
                made.append(self.served_by_nobody())
                os.chown(self.rundir, made[0][0], -1)
                return socket.socket(*args)

        self.patch(control_module, "socket", Racing())
        self.assertEqual(control("status", self.rundir), 1)
        self.assertEqual(self.out.getvalue(), "")
        nobody, path = made[0]
        self.assertNotAsked("status", path, nobody)

    def test_rundirGivenToAnotherUserAsked(self) -> None:
        """
        A RUNDIR only root could have made, owned by another user (root
        gave it to an ipcd running as a user of its own, as systemd's
        RuntimeDirectory= does): its owner's socket is asked, so that the
        members of [control] group can ask that ipcd.  (Asked: the forged
        answer reaches the command, which says it is not a status.)
        """
        parent = tempfile.mkdtemp(prefix="ipcd-", dir="/tmp")  # root's, 0700
        self.addCleanup(os.rmdir, parent)
        self.rundir = os.path.join(parent, "run")
        os.mkdir(self.rundir)
        self.addCleanup(os.rmdir, self.rundir)
        nobody, path = self.served_by_nobody()
        os.chown(self.rundir, nobody, -1)
        self.assertEqual(control("status", self.rundir), 1)
        self.assertIn("ipcd status: unexpected answer", self.err.getvalue())

    def test_rundirOthersMayReplaceInNotAsked(self) -> None:
        """Group-writable without the sticky bit: anyone there may serve it."""
        os.chmod(self.rundir, 0o770)
        self.assertEqual(control("status", self.rundir), 1)
        self.assertEqual(
            self.err.getvalue(),
            f"ipcd status: cannot reach ipcd's control socket {self.rundir}/"
            f"ipcd-control: RUNDIR {self.rundir} (mode 0770) lets others replace "
            f"its sockets: not asked (chmod +t {self.rundir}, as ipcd requires)\n",
        )

    def test_parentOfAnotherUserNotAsked(self) -> None:
        """
        RUNDIR in a directory another user owns, who could swap RUNDIR for
        their own: not asked, and the way out is said to the one asking
        (ipcd's user is not who runs the command).
        """
        if os.geteuid() != 0:
            raise SkipTest("needs root: to give the parent to another user")
        nobody = pwd.getpwnam("nobody").pw_uid
        base = tempfile.mkdtemp(prefix="ipcd-", dir="/tmp")  # root's, 0700
        self.addCleanup(os.rmdir, base)
        parent = os.path.join(base, "theirs")
        os.mkdir(parent)
        self.addCleanup(os.rmdir, parent)
        self.rundir = os.path.join(parent, "run")
        os.mkdir(self.rundir)
        self.addCleanup(os.rmdir, self.rundir)
        os.chown(parent, nobody, -1)
        self.assertEqual(control("status", self.rundir), 1)
        self.assertEqual(
            self.err.getvalue(),
            f"ipcd status: cannot reach ipcd's control socket {self.rundir}/"
            f"ipcd-control: unsafe RUNDIR {self.rundir}: {parent} is owned by "
            f"uid {nobody} (nobody), who could rename RUNDIR away and put their "
            f"own in its place; choose a --rundir whose parents only root or "
            f"you own\n",
        )

    def test_helpAndVersion(self) -> None:
        """
        C{ipcd status --help} is status's own help; C{--version} is ipcd's
        everywhere; option help reads as sentences (no docstring indents).
        """
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        exit = self.assertRaises(SystemExit, main, ["status", "--help"])
        self.assertEqual(exit.code, 0)
        text = out.getvalue()
        self.assertTrue(
            text.startswith("Usage: ipcd status [--json] [--wide] [--rundir DIR]\n"),
            text,
        )
        self.assertNotIn("re-read", text)
        self.assertNotIn("usage.Options", text)  # the module's docstring
        self.assertIn("Ask the running ipcd how it is", text)
        for argv in (["status", "--version"], ["reload", "--version"], ["--version"]):
            out.truncate(0)
            out.seek(0)
            self.assertEqual(self.assertRaises(SystemExit, main, argv).code, 0)
            self.assertEqual(out.getvalue(), f"ipcd {version()}\n")
        out.truncate(0)
        out.seek(0)
        self.assertRaises(SystemExit, websocketc.main, ["--version"])
        self.assertEqual(out.getvalue(), f"websocketc (ipcd {version()})\n")
        out.truncate(0)
        out.seek(0)
        self.assertRaises(SystemExit, main, ["--help"])
        self.assertIn("although their own permissions would not", out.getvalue())
        self.assertNotRegex(out.getvalue(), r"[a-z] {2,}[a-z]")

    def test_websocketcTimeout(self) -> None:
        """
        websocketc's --timeout out of range (0, negative, nan, inf) or no
        number: a usage error, as pong's, before connecting; -1 and nan made
        a traceback (Twisted's callLater asserting), 0 a "User timeout
        caused connection failure".
        """
        bound = "expected seconds, above 0 and at most 31536000 (a year)"
        for value, why in [
            ("0", f"{bound}, got '0'"),
            ("-1", f"{bound}, got '-1'"),
            ("nan", f"{bound}, got 'nan'"),
            ("inf", f"{bound}, got 'inf'"),
            ("abc", "expected seconds, got 'abc'"),
        ]:
            argv = ["--timeout", value, "ws://127.0.0.1:1/pong", "x"]
            error = self.assertRaises(
                usage.UsageError, websocketc.Options().parseOptions, argv
            )
            self.assertEqual(str(error), f"--timeout: {why}")
        self.assertEqual(websocketc.Options()["timeout"], 10.0)
        # As the command says it: one line, then the synopsis; status 2.
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        exit = self.assertRaises(SystemExit, websocketc.main, argv)
        self.assertEqual(exit.code, websocketc.USAGE)
        self.assertEqual(
            err.getvalue().splitlines(),
            [f"websocketc: --timeout: {why}", websocketc.Options.synopsis],
        )

    def test_subcommandError(self) -> None:
        exit = self.assertRaises(SystemExit, main, ["status", "--bogus"])
        self.assertEqual(
            exit.code, "ipcd: option --bogus not recognized (see ipcd status --help)"
        )
        exit = self.assertRaises(SystemExit, main, ["restart"])
        self.assertEqual(
            exit.code,
            "ipcd: unknown command 'restart': ipcd takes options, or the command "
            "status or reload (see ipcd --help)",
        )

    def test_subcommandArguments(self) -> None:
        """
        ipcd status and reload take no arguments, and say so: Twisted's
        "Wrong number of arguments." named neither the command nor them.
        """
        for argv in (["status", "extra"], ["reload", "extra", "more"]):
            exit = self.assertRaises(SystemExit, main, argv)
            self.assertEqual(
                exit.code,
                f"ipcd: {argv[0]} takes no arguments, only options: got 'extra' "
                f"(see ipcd {argv[0]} --help)",
            )

    def test_websocketcBadURLOrCA(self) -> None:
        """
        A URL autobahn refuses, or a --ca file that is unreadable, no file
        or no certificate: a usage error before the reactor runs.  Each was
        a traceback inside it and a websocketc that never exited (a port
        out of range, '[::1', a missing file), or one that read /dev/zero
        until memory ran out.
        """
        for argv, why in [
            (["ws://127.0.0.1:99999/pong"], "(Port out of range 0-65535)"),
            (["ws://[::1/pong"], "(Invalid IPv6 URL)"),
            (["ws://x/y#f"], "non-empty fragment 'f'"),
            (["--ca", "/nonexistent", "wss://x/y"], "cannot read: No such file"),
            (["--ca", "/dev/zero", "wss://x/y"], "is a character device"),
            (["--ca", "/etc/passwd", "wss://x/y"], "no PEM certificate in it"),
        ]:
            error = self.assertRaises(
                usage.UsageError, websocketc.Options().parseOptions, argv
            )
            self.assertIn(why, str(error))

    def test_websocketcWithoutURL(self) -> None:
        """websocketc alone: it says a URL is wanted (not "Wrong number...")."""
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        for argv in ([], ["--binary"]):
            err.truncate(0)
            err.seek(0)
            exit = self.assertRaises(SystemExit, websocketc.main, argv)
            self.assertEqual(exit.code, websocketc.USAGE)
            self.assertEqual(
                err.getvalue().splitlines(),
                [
                    "websocketc: no URL: give a ws:// or wss:// URL",
                    websocketc.Options.synopsis,
                ],
            )


def into_closed_pipe(args: list[str]) -> subprocess.CompletedProcess[bytes]:
    """Python with C{args}, its stdout a pipe whose reader is gone already."""
    reader, writer = os.pipe()
    os.close(reader)  # gone before anything is written
    try:
        return subprocess.run(
            [sys.executable, *args],
            stdout=writer,
            stderr=subprocess.PIPE,
            env=python_env(),
            timeout=TIMEOUT,
        )
    finally:
        os.close(writer)


class ReaderGoneTests(TestCase):
    @inlineCallbacks
    def test_statusIntoAClosedPipe(self) -> Any:
        """
        C{ipcd status | head}: a reader that goes before the status is
        written makes no traceback (it made a BrokenPipeError's), and the
        status is 1.
        """
        rundir = short_rundir(self, "ipcd-pipe-")
        yield start_ipcd(self, make_config(rundir))

        for extra in ((), ("--json",)):
            args = ["-m", "ipcd.scripts.ipcd", "status", "--rundir", rundir, *extra]
            done = yield deferToThread(into_closed_pipe, args)
            self.assertEqual((done.returncode, done.stderr), (1, b""), extra)


class HelpReaderGoneTests(SynchronousTestCase):
    def test_helpIntoAClosedPipe(self) -> None:
        """
        C{ipcd --help | head}: a reader gone before the help is written
        makes no traceback (it made a BrokenPipeError's), for the command,
        its subcommands, C{twistd ipcd} and websocketc; the status is 1.
        """
        for args in (
            ["-m", "ipcd.scripts.ipcd", "--help"],
            ["-m", "ipcd.scripts.ipcd", "reload", "--help"],
            ["-c", "from twisted.scripts.twistd import run; run()", "ipcd", "--help"],
            ["-m", "ipcd.scripts.websocketc", "--help"],
            ["-m", "ipcd.scripts.websocketc", "--version"],
            ["-m", "ipcd.scripts.pong", "--version"],
        ):
            done = into_closed_pipe(args)
            self.assertEqual((done.returncode, done.stderr), (1, b""), args)


class PongHelpTests(SynchronousTestCase):
    def test_helpSaysWhatItDoes(self) -> None:
        """
        pong --help names IPC_NETWORK, its exit statuses and the defaults;
        --version as ipcd's and websocketc's (it had none).
        """
        from ipcd.scripts import pong

        out = io.StringIO()
        self.patch(sys, "stdout", out)
        exit = self.assertRaises(SystemExit, pong.main, ["--help"])
        self.assertEqual(exit.code, 0)
        text = " ".join(out.getvalue().split())
        self.assertIn("With IPC_NETWORK set, it asks ipcd (RUNDIR/ipc)", text)
        self.assertIn("Exit status: 0 answered, 1 the service not reached", text)
        self.assertIn("2 bad usage.", text)
        self.assertIn("(default: $RUNDIR, else /tmp/libipc-", text)
        self.assertIn("above 0 and at most a year (default 10)", text)
        out.truncate(0)
        out.seek(0)
        self.assertEqual(pong.main(["--version"]), 0)
        self.assertEqual(out.getvalue(), f"pong (ipcd {version()})\n")

    def test_websocketcHelpWithoutMainDocstring(self) -> None:
        """
        websocketc --help from its console script (a __main__ with no
        docstring) gives its exit statuses; it gave none (Twisted's
        longdesc is __main__'s docstring), and under python -m the
        docstring's examples ran together.
        """
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys.modules["__main__"], "__doc__", None)
        self.assertRaises(SystemExit, websocketc.main, ["--help"])
        text = " ".join(out.getvalue().split())
        self.assertIn("Exit status: 0 done, 2 bad usage, 3 refused", text)


class RunTests(SynchronousTestCase):
    """The C{ipcd} command hands twistd its options parsed once."""

    def test_parsedAndLoadedOnce(self) -> None:
        loads: list[Any] = []
        load_config = ipcd_options.load_config

        def counting(*args: Any, **kwargs: Any) -> Any:
            loads.append(args)
            return load_config(*args, **kwargs)

        ran: list[Any] = []
        self.patch(ipcd_options, "load_config", counting)
        self.patch(twistd, "runApp", ran.append)
        self.patch(sys, "argv", list(sys.argv))
        main(["--rundir", "/r", "--no-tcp", "--allow", "in", "authd", "--json-log"])
        self.assertEqual(len(loads), 1)
        [server] = ran
        self.assertEqual(server.subCommand, "ipcd")
        self.assertEqual(server.loadedPlugins["ipcd"].tapname, "ipcd")
        options = server.subOptions
        self.assertIs(options.parent, server)
        self.assertEqual(options.config.rundir, "/r")
        self.assertEqual([str(r) for r in options.config.rules], ["allow in authd *"])
        self.assertEqual(
            (server["nodaemon"], server["pidfile"], server["no_save"]), (1, "", True)
        )
        self.assertIs(server["logger"], json_observer)


class JoinWordsTests(SynchronousTestCase):
    def test_seedRules(self) -> None:
        """C{ipcd --allow in authd --deny in '*' '*' --allow out pong}"""
        self.assertEqual(
            join_words(
                ["--allow", "in", "authd", "--deny", "in", "*", "*"]
                + ["--allow", "out", "pong"]
            ),
            ["--allow", "in authd", "--deny", "in * *", "--allow", "out pong"],
        )

    def test_seedRedirect(self) -> None:
        """C{ipcd --redirect authd nextversion-authd}"""
        self.assertEqual(
            join_words(["--redirect", "authd", "nextversion-authd"]),
            ["--redirect", "authd nextversion-authd"],
        )

    def test_route(self) -> None:
        self.assertEqual(
            join_words(["--route", "pong", "tcp://127.0.0.1:9000/pong"]),
            ["--route", "pong tcp://127.0.0.1:9000/pong"],
        )

    def test_grant(self) -> None:
        """C{ipcd --grant secret group:ops}"""
        self.assertEqual(
            join_words(["--grant", "secret", "group:ops", "--no-tcp"]),
            ["--grant", "secret group:ops", "--no-tcp"],
        )

    def test_quotedPassesThrough(self) -> None:
        argv = [
            "--redirect",
            "authd nextversion-authd",
            "--allow",
            "in authd",
            "--deny",
            "in * *",
            "--route",
            "pong unix://pong",
        ]
        self.assertEqual(join_words(argv), argv)

    def test_stopsAtMostWords(self) -> None:
        """A redirect takes two words: whatever follows is left alone."""
        self.assertEqual(
            join_words(["--redirect", "a", "b", "--no-pongd"]),
            ["--redirect", "a b", "--no-pongd"],
        )
        self.assertEqual(
            join_words(["--allow", "in", "a", "uid:1000", "--pongd"]),
            ["--allow", "in a uid:1000", "--pongd"],
        )

    def test_otherOptionsUntouched(self) -> None:
        argv = ["--config", "ipcd.toml", "--rundir", "/r", "--no-pongd"]
        self.assertEqual(join_words(argv), argv)
        self.assertEqual(
            join_words(["--config", "x.toml", "--redirect", "a", "b", "--pongd"]),
            ["--config", "x.toml", "--redirect", "a b", "--pongd"],
        )

    def test_mixed(self) -> None:
        self.assertEqual(
            join_words(["--redirect", "a b", "--redirect", "c", "d"]),
            ["--redirect", "a b", "--redirect", "c d"],
        )

    def test_empty(self) -> None:
        self.assertEqual(join_words([]), [])

    def test_joinedParseByOptions(self) -> None:
        """The joined form is what L{ipcd.options.Options} understands."""
        from ipcd.options import Options

        options = Options()
        options.parseOptions(
            ["--rundir", "/r"]
            + join_words(
                ["--redirect", "authd", "nextversion-authd"]
                + ["--allow", "in", "authd", "--deny", "in", "*", "*"]
            )
        )
        self.assertEqual(dict(options.config.redirects), {"authd": "nextversion-authd"})
        self.assertEqual(
            [str(rule) for rule in options.config.rules],
            ["allow in authd *", "deny in * *"],
        )


def _configuration_rst() -> str:
    with open(os.path.join(REPO, "docs", "configuration.rst"), encoding="utf-8") as f:
        return f.read()


class _RunningIpcd(SynchronousTestCase):
    """
    A real ipcd (C{python -m ipcd.scripts.ipcd}, with C{OPTIONS}) in a
    directory of its own, its configuration file C{ipcd.toml} (at first
    L{configuration}), and the C{ipcd} command run against it.
    """

    OPTIONS = ("--no-tcp", "--no-ws", "--no-tls")

    def configuration(self) -> str:
        return ""

    def setUp(self) -> None:
        self.work = short_rundir(self, "ipcd-docout-")
        self.rundir = os.path.join(self.work, "run")
        self.config = os.path.join(self.work, "ipcd.toml")
        self.write(self.configuration())
        log = os.path.join(self.work, "ipcd.log")
        # Named as the docs name it: errors name the file as given.
        args = ["-m", "ipcd.scripts.ipcd", "--config", "ipcd.toml"]
        args += ["--rundir", self.rundir, *self.OPTIONS]
        process = spawn(self, args, log, python_env(), self.work)
        deadline = time.monotonic() + 6 * TIMEOUT
        while "ipcd: ready" not in read_text(log):
            self.assertIsNone(process.poll(), read_text(log))
            self.assertLess(time.monotonic(), deadline, read_text(log))
            time.sleep(0.05)

    def write(self, text: str) -> None:
        with open(self.config, "w") as f:
            f.write(text)

    def ipcd(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ipcd.scripts.ipcd", *args, "--rundir", self.rundir],
            capture_output=True,
            text=True,
            env=python_env(),
            cwd=self.work,
            timeout=6 * TIMEOUT,
        )


class DocumentedOutputTests(_RunningIpcd):
    """
    What C{ipcd reload} and C{ipcd status} print, as docs/configuration.rst
    and docs/quickstart.rst show it, from a real ipcd.
    """

    def test_reload(self) -> None:
        """
        C{reloaded: nothing changed}, C{reloaded: changed rules},
        C{reloaded; restart needed for pongd} (exit 0), and a refusal on
        stderr with exit 1; C{--json} the same as JSON.
        """
        docs = _configuration_rst()
        done = self.ipcd("reload")
        shown = "reloaded: nothing changed"
        self.assertIn(f"``{shown}``", docs)
        self.assertEqual((done.returncode, done.stdout), (0, shown + "\n"))
        self.write('rules = ["deny local x"]\n[limits]\nidle_timeout = 9\n')
        done = self.ipcd("reload")
        shown = "reloaded: changed rules, [limits] idle_timeout"
        self.assertIn(f"``{shown}``", docs)
        self.assertEqual((done.returncode, done.stdout), (0, shown + "\n"))
        self.write(
            'rules = ["deny local x"]\n[limits]\nidle_timeout = 9\n'
            "[pongd]\nenabled = false\n"
        )
        done = self.ipcd("reload")
        shown = "reloaded; restart needed for pongd"
        self.assertIn(f"``{shown}``", docs)
        self.assertEqual((done.returncode, done.stdout), (0, shown + "\n"))
        done = self.ipcd("reload", "--json")
        self.assertEqual(
            json.loads(done.stdout),
            {"ok": True, "restart_needed": ["pongd"], "changed": []},
        )
        # A refused one: the error line of the docs' Errors section.
        self.write("[ipcd]\nlookup_timeot = 5\n")
        error = "ipcd.toml: [ipcd] lookup_timeot: unknown key (known: "
        error += "allow_client_routes, connect_timeout, external_daemons, "
        error += "label_cache_max_age, lookup_timeout)"
        self.assertIn(f"    ipcd: {error}\n", docs)
        done = self.ipcd("reload")
        self.assertEqual(
            (done.returncode, done.stdout, done.stderr),
            (1, "", f"ipcd reload: refused: {error}\n"),
        )
        done = self.ipcd("reload", "--json")
        self.assertEqual(done.returncode, 1)
        self.assertEqual(json.loads(done.stdout), {"ok": False, "error": error})

    def test_reloadOffDaemons(self) -> None:
        """
        ipcd runs with --no-tcp --no-ws --no-tls (and udpd off, its
        default): the file's listeners for them changing is no restart
        needed, as a restart would not open them either.  It said
        C{reloaded; restart needed for tcp_listen, tls_listen, udp_listen,
        ws_listen}.
        """
        self.write(
            "[tcpd]\nlisten = 'tcp:9010'\n[tlsd]\nlisten = 'tcp:9011'\n"
            "[websocketd]\nlisten = 'tcp:9012'\n[udpd]\nlisten = 'udp:9013'\n"
        )
        done = self.ipcd("reload")
        changed = "[tcpd] listen, [tlsd] listen, [udpd] listen, [websocketd] listen"
        self.assertEqual(
            (done.returncode, done.stdout, done.stderr),
            (0, f"reloaded: changed {changed}\n", ""),
        )

    def test_reloadRefusedWithAHugeValue(self) -> None:
        """
        A refused reload's error quotes the bad value: a value of 1 MB (as
        long as a file may be) is cut in the middle, and C{ipcd reload}
        says the refusal (the answer was longer than the control socket
        carries, and the command said it could not reach ipcd's control
        socket).
        """
        self.write('[ipcd]\nlookup_timeout = "' + "x" * 1_000_000 + '"\n')
        done = self.ipcd("reload")
        self.assertEqual((done.returncode, done.stdout), (1, ""), done.stderr[:300])
        said = "ipcd reload: refused: ipcd.toml: [ipcd] lookup_timeout: expected a "
        self.assertTrue(done.stderr.startswith(said), done.stderr[:300])
        self.assertIn("x... (999", done.stderr)
        self.assertEqual(len(done.stderr.splitlines()), 1)
        self.assertLess(len(done.stderr), 1100)

    def test_reloadRefusesAHugeFile(self) -> None:
        """
        A configuration over 1 MiB is refused at the reload in one line, at
        once, the old one kept.  Under the old bound (16 MiB) a 15 MiB file
        of rules was parsed on ipcd's thread, 11 to 15 s with every lookup
        waiting, and 'ipcd reload' timed out.
        """
        rule = '"allow in pong ip:10.0.0.0/8",\n'
        self.write("rules = [\n" + rule * (2 * (1 << 20) // len(rule)) + "]\n")
        done = self.ipcd("reload")
        self.assertEqual(
            (done.returncode, done.stdout, done.stderr),
            (1, "", "ipcd reload: refused: ipcd.toml: larger than 1 MiB\n"),
        )
        self.write("")
        done = self.ipcd("reload")
        self.assertEqual(
            (done.returncode, done.stdout), (0, "reloaded: nothing changed\n")
        )

    def test_status(self) -> None:
        """
        C{ipcd status}: the instance and its reloads, connections,
        counters, limits, inbound, the configuration in force, in 100
        columns; C{--json} has the same keys.
        """
        done = self.ipcd("status")
        self.assertEqual(done.returncode, 0, done.stderr)
        lines = done.stdout.splitlines()
        self.assertTrue(lines[0].startswith("ipcd: version "), lines[0])
        self.assertEqual(lines[1:3], ["reloads: none", "connections: 0"])
        for heading in ("counters:", "limits:", "inbound:", "config:"):
            self.assertIn(heading, lines)
        self.assertIn(f'  rundir: "{self.rundir}"', lines)
        self.assertLessEqual(max(len(line) for line in lines), 100)
        answer = json.loads(self.ipcd("status", "--json").stdout)
        self.assertLessEqual(
            {"ipcd", "connections", "counters", "limits", "inbound", "config"},
            set(answer),
        )
        self.assertEqual(answer["config"]["rundir"], self.rundir)


class TlsKeysKeptTests(_RunningIpcd):
    """
    A reload whose tlsd key file became unusable keeps the previous keys,
    and C{ipcd reload} says so (exit 1): it answered as for a reload in
    force (exit 0), and only the log said that the new keys were not.
    """

    OPTIONS = ("--no-tcp", "--no-ws")

    def configuration(self) -> str:
        self.psk = os.path.join(self.work, "psk")
        with open(self.psk, "w") as f:
            f.write(f"alice:{'00' * 16}\n")
        os.chmod(self.psk, 0o600)
        return '[tlsd]\npsk_file = "psk"\nlisten = "tcp:0:interface=127.0.0.1"\n'

    def test_reloadSaysKeysKept(self) -> None:
        done = self.ipcd("reload")
        self.assertEqual(
            (done.returncode, done.stdout, done.stderr),
            (0, "reloaded: nothing changed\n", ""),
        )
        os.chmod(self.psk, 0o644)
        kept = (
            "tlsd: keeping the previous keys and certificates: [tlsd] psk_file: "
            f"{self.psk} is readable by group or others (mode 0644): chmod 600 "
            f"{self.psk}"
        )
        done = self.ipcd("reload")
        self.assertEqual(
            (done.returncode, done.stdout, done.stderr),
            (1, "reloaded: nothing changed\n", f"ipcd reload: not applied: {kept}\n"),
        )
        self.assertIn(
            "ipcd reload: not applied: tlsd: keeping the previous keys",
            _configuration_rst(),
        )
        done = self.ipcd("reload", "--json")
        self.assertEqual(done.returncode, 1)
        self.assertEqual(
            json.loads(done.stdout),
            {"ok": True, "restart_needed": [], "changed": [], "not_applied": [kept]},
        )
        # Usable again: read, and nothing more said.
        os.chmod(self.psk, 0o600)
        done = self.ipcd("reload")
        self.assertEqual(
            (done.returncode, done.stdout, done.stderr),
            (0, "reloaded: nothing changed\n", ""),
        )


class TlsStatusAfterReloadTests(SynchronousTestCase):
    """
    C{ipcd status}'s C{tls_listen}, from a real ipcd, says where tlsd's
    listener runs, or none, across a reload that configures or removes its
    certificate (whether it listens is decided at start).
    """

    def start(self, text: str) -> str:
        """An ipcd (tlsd only) started with the file C{text}; its RUNDIR."""
        from ipcd.test.wssupport import make_ca

        work = short_rundir(self, "ipcd-tlsstatus-")
        rundir = os.path.join(work, "run")
        self.config = os.path.join(work, "ipcd.toml")
        _ca, cert, key = make_ca(work)
        self.keys = f"[tlsd]\ncertificate = '{cert}'\nkey = '{key}'\n"
        self.keys += "listen = 'tcp:0:interface=127.0.0.1'\n"
        self.write(self.keys if text == "keys" else text)
        log = os.path.join(work, "ipcd.log")
        args = ["-m", "ipcd.scripts.ipcd", "--config", self.config]
        args += ["--rundir", rundir, "--no-tcp", "--no-ws"]
        process = spawn(self, args, log, python_env(), work)
        deadline = time.monotonic() + 6 * TIMEOUT
        while "ipcd: ready" not in read_text(log):
            self.assertIsNone(process.poll(), read_text(log))
            self.assertLess(time.monotonic(), deadline, read_text(log))
            time.sleep(0.05)
        return rundir

    def write(self, text: str) -> None:
        with open(self.config, "w") as f:
            f.write(text)

    def ipcd(self, rundir: str, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "ipcd.scripts.ipcd", *args, "--rundir", rundir],
            capture_output=True,
            text=True,
            env=python_env(),
            timeout=6 * TIMEOUT,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        return done.stdout

    def tls_listen(self, rundir: str) -> Any:
        return json.loads(self.ipcd(rundir, "status", "--json"))["config"]["tls_listen"]

    def test_keysConfigured(self) -> None:
        """
        Keys configured by a reload: nothing listens until a restart, and
        status says none (it said the old listen, tcp:9001).
        """
        rundir = self.start("")
        self.assertIsNone(self.tls_listen(rundir))
        self.write(self.keys)
        answer = self.ipcd(rundir, "reload")
        self.assertEqual(
            answer,
            "reloaded: changed [tlsd] certificate, [tlsd] key; restart needed for "
            "tls_listen\n",
        )
        self.assertIsNone(self.tls_listen(rundir))

    def test_keysRemoved(self) -> None:
        """
        Keys removed by a reload: the listener runs until a restart (failing
        every handshake), and status says where (it said none).
        """
        rundir = self.start("keys")
        self.assertEqual(self.tls_listen(rundir), "tcp:0:interface=127.0.0.1")
        self.write("")
        answer = self.ipcd(rundir, "reload")
        self.assertEqual(
            answer,
            "reloaded: changed [tlsd] certificate, [tlsd] key; restart needed for "
            "tls_listen\n",
        )
        self.assertEqual(self.tls_listen(rundir), "tcp:0:interface=127.0.0.1")
