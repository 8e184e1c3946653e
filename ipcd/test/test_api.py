"""
The storefront: C{ipcd.__all__} and the example that opens docs/api.rst.
"""

from __future__ import annotations

import ast
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time

from twisted.trial.unittest import SynchronousTestCase

import ipcd
from ipcd.framing import recv_message, send_message
from ipcd.test import support
from ipcd.test.support import python_env, short_rundir, spawn
from ipcd.test.test_packaging import source_tree

TIMEOUT = 60


def run_python(code: str, cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    return support.run_python(code, timeout=TIMEOUT, cwd=cwd)


def first_example(rst: str) -> str:
    """The first Python code block of the "Public API" section of C{rst}."""
    section = rst.split("\nPublic API\n", 1)[1]
    block = re.search(r"\.\. code-block:: python\n\n((?:    .*\n|\n)+)", section)
    assert block is not None, "no code block under Public API"
    lines = block.group(1).splitlines()
    return "\n".join(line[4:] for line in lines) + "\n"


class RootTests(SynchronousTestCase):
    def test_everyNameThere(self) -> None:
        """Each name of C{ipcd.__all__} is importable from C{ipcd}."""
        for name in ipcd.__all__:
            self.assertTrue(getattr(ipcd, name), name)
        self.assertEqual(ipcd.IPCService.__module__, "ipcd.services")
        self.assertRaises(AttributeError, getattr, ipcd, "nosuch")
        self.assertLessEqual(set(ipcd.__all__), set(dir(ipcd)))

    def test_importsAsLittleAsAsked(self) -> None:
        """
        C{import ipcd} imports no Twisted, the blocking client's names none
        either, and all of C{__all__} no reactor.
        """
        code = (
            "import json, sys\n"
            "import ipcd\n"
            "bare = 'twisted' in sys.modules\n"
            "from ipcd import connect, send_message, recv_message, HandoffError\n"
            "client = 'twisted' in sys.modules\n"
            "[getattr(ipcd, name) for name in ipcd.__all__]\n"
            "reactor = 'twisted.internet.reactor' in sys.modules\n"
            "print(json.dumps([bare, client, reactor]))\n"
        )
        out = run_python(code)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(json.loads(out.stdout), [False, False, False])


class ExampleTests(SynchronousTestCase):
    def test_apiExampleRuns(self) -> None:
        """docs/api.rst's opening example runs as written and prints its answer."""
        with open(os.path.join(source_tree(), "docs", "api.rst")) as f:
            code = first_example(f.read())
        self.assertLessEqual(len([line for line in code.splitlines() if line]), 18)
        out = run_python(code, cwd="/")
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(out.stdout, "b'HELLO'\n")


# Each Python sample of docs/api.rst past the first, by the text just
# before it: the tests below run each one, and test_everySampleRun checks
# that no sample is left out.
BLOCKING_CLIENT = "name the endpoint classes, importing Twisted"
PONGD = "ipcd's limits):"
UPPER = "``twistd -n\n--pidfile= -y upper.py``):"
ENDPOINTS = "prints ``b'HELLO'`` (``ipcd.test.test_api`` runs it as written):"
IN_MEMORY = (
    "in memory (``ipcd.test.test_api`` runs this as written; no reactor is\nimported):"
)
TESTING = "``FakeUNIXTransport``); returns"
FAKE_IPCD = "asked for (``ipcd.test.test_api`` runs it as written):"
SAMPLES = (BLOCKING_CLIENT, PONGD, UPPER, ENDPOINTS, IN_MEMORY, TESTING, FAKE_IPCD)

# The pongd template defines pongd(); this runs it, and asks it once.
RUN_PONGD = """
from twisted.internet import task, threads

from ipcd import connect, recv_message, send_message


def ask():
    with connect("pong", network="") as sock:
        send_message(sock, b"hi")
        return recv_message(sock)


async def main(reactor):
    service = pongd(reactor=reactor)
    service.startService()
    print(await threads.deferToThread(ask))
    await service.stopService()


task.react(main)
"""


# Around a sample: the descriptors it leaves open (none, for one that
# cleans up as it should).
FDS_BEFORE = "import os\n_before = set(os.listdir('/proc/self/fd'))\n"
FDS_AFTER = "\nprint(sorted(set(os.listdir('/proc/self/fd')) - _before))\n"


def python_blocks(rst: str) -> list[str]:
    """Every C{.. code-block:: python} of C{rst}, dedented."""
    blocks = re.findall(r"\.\. code-block:: python\n\n((?:    .*\n|\n)+)", rst)
    return [textwrap.dedent(block).strip("\n") + "\n" for block in blocks]


def _api_rst() -> str:
    with open(os.path.join(source_tree(), "docs", "api.rst"), encoding="utf-8") as f:
        return f.read()


def example_after(rst: str, intro: str) -> str:
    """The code block (literal or python) that follows the text C{intro}."""
    after = rst.split(intro, 1)[1].split("\n", 1)[1]
    after = re.sub(r"^\n*\.\. code-block:: python\n", "", after)
    indent = re.match(r"\n*( +)", after)
    assert indent is not None, f"no code block after {intro!r}"
    # The block's lines: blank, or indented at least as its first one.
    block = re.match(rf"(?:\n|{indent.group(1)}.*\n)+", after)
    assert block is not None
    return textwrap.dedent(block.group(0)).strip("\n") + "\n"


def pong_server(path: str) -> threading.Thread:
    """An echo service on C{path}, for one connection, in a thread."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen()

    def serve() -> None:
        with server:
            conn, _ = server.accept()
            with conn:
                send_message(conn, recv_message(conn))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


class DocumentedExamplesTests(SynchronousTestCase):
    """docs/api.rst's other examples, run as written."""

    def setUp(self) -> None:
        self.rst = _api_rst()
        self.rundir = short_rundir(self, "ipcd-apidoc-")

    def run_example(self, code: str) -> subprocess.CompletedProcess[str]:
        return support.run_python(
            code, timeout=TIMEOUT, cwd=self.rundir, RUNDIR=self.rundir
        )

    def test_blockingClient(self) -> None:
        """The blocking client's example prints the echo its comment shows."""
        code = example_after(self.rst, BLOCKING_CLIENT)
        server = pong_server(os.path.join(self.rundir, "pong"))
        out = self.run_example(code)
        server.join(TIMEOUT)
        self.assertEqual((out.returncode, out.stdout), (0, "b'hello'\n"), out.stderr)

    def test_testingExample(self) -> None:
        """The Testing section's example: its assertions hold."""
        code = example_after(self.rst, TESTING)
        self.assertIn("FakeLookupBroker()", code)
        out = self.run_example(FDS_BEFORE + code + FDS_AFTER)
        self.assertEqual((out.returncode, out.stderr, out.stdout), (0, "", "[]\n"))

    def test_endpointStrings(self) -> None:
        """Every example endpoint string parses to what its grammar says."""
        from twisted.internet.endpoints import clientFromString, serverFromString

        from ipcd.endpoints import IPCClientEndpoint, IPCServerEndpoint
        from ipcd.testing import FakeLookupBroker

        reactor = FakeLookupBroker().reactor
        servers = example_after(self.rst, "mode=0o660, backlog=128, group=None)``.")
        for text in servers.split():
            self.assertIsInstance(serverFromString(reactor, text), IPCServerEndpoint)
        clients = example_after(self.rst, "network=None, timeout=10.0)``.")
        parsed = [clientFromString(reactor, t) for t in clients.splitlines()]
        self.assertEqual(
            [(e.service, e.network) for e in parsed],
            [
                ("pong", None),
                ("pong", None),
                ("cnt", "cnt unix://counter"),
                ("pong", "pong tcp://10.0.0.2:9000/pong"),
            ],
        )
        self.assertIsInstance(parsed[0], IPCClientEndpoint)

    def test_everySampleRun(self) -> None:
        """
        Each Python sample of docs/api.rst is one a test here runs: a new
        one, or one whose introduction changed, fails this until it has its
        test.
        """
        run = [first_example(self.rst), *(example_after(self.rst, s) for s in SAMPLES)]
        blocks = [block.strip() for block in python_blocks(self.rst)]
        self.assertEqual(sorted(blocks), sorted(block.strip() for block in run))

    def test_connectionLostCallsTheBase(self) -> None:
        """
        A sample (api.rst's, README's) that overrides C{connectionLost}
        calls the base class's, as api.rst tells its readers to.
        """
        with open(os.path.join(source_tree(), "README.rst"), encoding="utf-8") as f:
            samples = python_blocks(self.rst) + python_blocks(f.read())
        overrides = 0
        for sample in samples:
            for node in ast.walk(ast.parse(sample)):
                if isinstance(node, ast.FunctionDef) and node.name == "connectionLost":
                    overrides += 1
                    self.assertIn("super().connectionLost(", ast.unparse(node))
        self.assertGreater(overrides, 0)

    def test_pongdTemplate(self) -> None:
        """The pongd template, called as pongd(): it echoes."""
        code = example_after(self.rst, PONGD)
        self.assertIn("def pongd(", code)
        out = self.run_example(code + RUN_PONGD)
        self.assertEqual((out.returncode, out.stdout), (0, "b'hi'\n"), out.stderr)
        self.assertEqual(os.listdir(self.rundir), [])  # and cleans up

    def test_endpointStringsProgram(self) -> None:
        """Both C{ipc:} endpoints in one program: it prints the answer."""
        code = example_after(self.rst, ENDPOINTS)
        out = self.run_example(code)
        self.assertEqual((out.returncode, out.stdout), (0, "b'HELLO'\n"), out.stderr)
        self.assertEqual(os.listdir(self.rundir), [])

    def test_protocolInMemory(self) -> None:
        """
        The in-memory test of a C{MessageProtocol}: its assertions hold, and
        it imports no reactor, as it says.
        """
        code = example_after(self.rst, IN_MEMORY)
        code += "import sys\nprint('twisted.internet.reactor' in sys.modules)\n"
        out = self.run_example(code)
        self.assertEqual((out.returncode, out.stdout), (0, "False\n"), out.stderr)

    def test_fakeIpcdForARemoteRoute(self) -> None:
        """
        FakeLookupBroker behind a real C{ipc:ipc}: the client of a remote
        route gets its answer from the test, which sees the route asked for.
        """
        code = example_after(self.rst, FAKE_IPCD)
        out = self.run_example(code)
        self.assertEqual(
            (out.returncode, out.stdout),
            (0, "b'HELLO'\ntcp://10.0.0.2:9000/far\n"),
            out.stderr,
        )

    def twistd(self, *args: str) -> subprocess.Popen[bytes]:
        log = os.path.join(self.rundir, "twistd.log")
        twistd = "from twisted.scripts.twistd import run; run()"
        process = spawn(
            self,
            ["-c", twistd, "-n", "--pidfile=", *args],
            log,
            python_env(RUNDIR=self.rundir, PYTHONPATH=self.rundir + ":" + support.REPO),
            self.rundir,
        )
        return process

    def pong(self, *args: str, **env: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "ipcd.scripts.pong", *args],
            capture_output=True,
            text=True,
            timeout=6 * TIMEOUT,
            env=python_env(RUNDIR=self.rundir, **env),
        )
        return done.stdout + done.stderr

    def wait_for(self, process: subprocess.Popen[bytes], path: str) -> None:
        log = os.path.join(self.rundir, "twistd.log")
        deadline = time.monotonic() + 6 * TIMEOUT
        while not support.accepts(path):
            self.assertIsNone(process.poll(), support.read_text(log))
            self.assertLess(time.monotonic(), deadline, support.read_text(log))
            time.sleep(0.05)

    def test_upperService(self) -> None:
        """C{twistd -n --pidfile= -y upper.py}, then C{pong -s upper hello}."""
        code = example_after(self.rst, UPPER)
        self.assertTrue(code.startswith("# upper.py\n"), code)
        with open(os.path.join(self.rundir, "upper.py"), "w") as f:
            f.write(code)
        process = self.twistd("-y", "upper.py")
        self.wait_for(process, os.path.join(self.rundir, "upper"))
        self.assertEqual(self.pong("-s", "upper", "hello"), "HELLO\n")

    def test_upperServiceCannotListen(self) -> None:
        """
        upper.py whose socket another process listens on: twistd exits 1
        with the line saying so, no traceback; daemonizing too (without
        C{-n}), where twistd's parent waited for ever, saying nothing, and
        left the pid file (the daemon's bare SystemExit never reached it).
        """
        code = example_after(self.rst, UPPER)
        with open(os.path.join(self.rundir, "upper.py"), "w") as f:
            f.write(code)
        path = os.path.join(self.rundir, "upper")
        holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(holder.close)
        holder.bind(path)
        holder.listen()
        line = f"upper: another process is listening on {path}"
        pidfile = os.path.join(self.rundir, "twistd.pid")
        twistd = "from twisted.scripts.twistd import run; run()"
        env = python_env(
            RUNDIR=self.rundir, PYTHONPATH=self.rundir + ":" + support.REPO
        )
        for options in (["-n", "--pidfile="], [f"--pidfile={pidfile}"]):
            with self.subTest(options=options):
                done = subprocess.run(
                    [sys.executable, "-c", twistd, *options, "--logfile=twistd.log"]
                    + ["-y", "upper.py"],
                    capture_output=True,
                    text=True,
                    timeout=TIMEOUT,
                    env=env,
                    cwd=self.rundir,
                )
                log = support.read_text(os.path.join(self.rundir, "twistd.log"))
                self.assertEqual(done.returncode, 1, (done.stderr, log))
                self.assertIn(line, done.stderr + log)
                self.assertNotIn("Traceback", done.stderr + log)
                self.assertFalse(os.path.exists(pidfile))
        # What the daemonizing twistd's parent says on the terminal (its
        # first 98 bytes: the whole line is in the log).
        said = "ipcd.listener.CannotListen: upper: another process is listening on"
        self.assertIn(said, done.stderr)

    def test_protocolDaemon(self) -> None:
        """
        The minimal daemon (echod), as a plugin of its own: ipcd runs it with
        C{--echo ENDPOINT}, and an C{echo://} route reaches pong through it.
        """
        code = example_after(self.rst, "in your distribution)::")
        plugins = os.path.join(self.rundir, "twisted", "plugins")
        os.makedirs(plugins)
        with open(os.path.join(plugins, "echod_plugin.py"), "w") as f:
            f.write(code)
        port = support.free_port()
        rundir = os.path.join(self.rundir, "run")
        process = self.twistd(
            "ipcd",
            *("--rundir", rundir, "--no-tcp", "--no-ws", "--no-tls"),
            *("--echo", f"tcp:{port}:interface=127.0.0.1", "--allow", "in pong"),
        )
        self.wait_for(process, os.path.join(rundir, "echo"))
        route = f"pong echo://127.0.0.1:{port}/pong"
        answer = self.pong("--rundir", rundir, "over echo", IPC_NETWORK=route)
        self.assertEqual(answer, "over echo\n")
