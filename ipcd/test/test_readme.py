"""
README.rst's five-minute tour, run as written: its commands are read from
README.rst itself (so the two cannot drift), run in a shell in order, and
every output the README shows is checked.

The README's commands run unchanged, with two substitutions a shared test
machine needs: RUNDIR is a temporary directory (the README's
C{/tmp/libipc-run} in a shown output stands for it), and the fixed ports
(9000, 9001, 8080, udp 9000) are free ones, given to every C{twistd -n ipcd}
by a C{twistd} wrapper first on PATH.  C{pong}, C{websocketc}, C{ipcd} and
C{python3} on PATH are this tree's.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from ipcd.test.support import (
    REPO,
    TIMEOUT,
    accepts,
    free_port,
    python_env,
    read_text,
    short_rundir,
    spawn,
)

README = os.path.join(REPO, "README.rst")
TOUR = "A five-minute tour"
# The README's default RUNDIR, as its shown outputs spell it.
SHOWN_RUNDIR = "/tmp/libipc-run"
# What ipcd logs once every daemon listens.
READY = "ipcd: ready"


@dataclass
class Step:
    """One thing the tour does, in order."""

    kind: str  # "start" (a server, in a terminal of its own), "run", "shell", "file"
    text: str  # the command, or the file's content
    expected: list[str] = field(default_factory=list)  # "shell": shown output
    name: str = ""  # "file": its name


def _blocks(lines: list[str]) -> list[tuple[str, list[str]]]:
    """
    The literal blocks (after a paragraph ending C{::}) and python code
    blocks of C{lines}, each with the paragraph before it.
    """
    blocks: list[tuple[str, list[str]]] = []
    paragraph: list[str] = []
    previous: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        opens = line.rstrip().endswith("::") or line.startswith(".. code-block::")
        if not opens:
            if not line.strip():
                previous, paragraph = paragraph or previous, []
            else:
                paragraph.append(line)
            i += 1
            continue
        # A directive's paragraph is the one before it.
        intro = " ".join([*(paragraph or previous), line])
        i += 1
        body: list[str] = []
        while i < len(lines) and (not lines[i].strip() or lines[i].startswith("    ")):
            body.append(lines[i][4:])
            i += 1
        while body and not body[-1].strip():
            body.pop()
        while body and not body[0].strip():
            body.pop(0)
        blocks.append((intro, body))
        paragraph = previous = []
    return blocks


def tour_steps(text: str) -> list[Step]:
    """The README tour's steps: servers to start, commands, shown outputs, files."""
    lines = text.splitlines()
    start = lines.index(TOUR)
    end = next(i for i in range(start + 2, len(lines)) if lines[i].startswith("---"))
    steps: list[Step] = []
    for intro, body in _blocks(lines[start : end - 1]):
        if ".. code-block:: python" in intro:
            [name] = re.findall(r"save as ``([^`]+)``", intro)[-1:]
            steps.append(Step("file", "\n".join(body) + "\n", name=name))
        elif body and body[0].startswith("$ "):
            for line in body:
                if line.startswith("$ "):
                    steps.append(Step("shell", line[2:]))
                else:
                    steps[-1].expected.append(line)
        else:
            for line in body:
                kind = "start" if line.startswith("twistd -n") else "run"
                steps.append(Step(kind, line))
    return steps


WRAPPERS = {
    "pong": "from ipcd.scripts.pong import main; sys.exit(main())",
    "websocketc": "from ipcd.scripts.websocketc import main; main()",
    "ipcd": "from ipcd.scripts.ipcd import main; main()",
    "python3": "import runpy; sys.argv[:] = sys.argv[1:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')",
    # The test's ports, after the plugin name, before the README's options.
    "twistd": "i = sys.argv.index('ipcd') + 1 if 'ipcd' in sys.argv else 0\n"
    "if i: sys.argv[i:i] = PORTS\n"
    "from twisted.scripts.twistd import run; run()",
}


class SamplesTests(SynchronousTestCase):
    def test_everyPythonSampleRun(self) -> None:
        """
        Each Python sample of README.rst is a file of the tour that a later
        step of the tour runs (test_tour); docs/quickstart.rst has none.
        """
        from ipcd.test.test_api import python_blocks

        with open(README, encoding="utf-8") as f:
            readme = f.read()
        steps = tour_steps(readme)
        files = [step for step in steps if step.kind == "file"]
        self.assertEqual(
            sorted(python_blocks(readme)), sorted(step.text for step in files)
        )
        for step in files:
            later = steps[steps.index(step) + 1 :]
            self.assertTrue(
                any(step.name in each.text.split() for each in later), step.name
            )
        with open(os.path.join(REPO, "docs", "quickstart.rst"), encoding="utf-8") as f:
            self.assertEqual(python_blocks(f.read()), [])


class TourTests(SynchronousTestCase):
    """README.rst's tour, step by step, as a new user runs it."""

    def setUp(self) -> None:
        self.rundir = short_rundir(self, "ipcd-tour-")
        self.work = short_rundir(self, "ipcd-tourw-")
        self.ports = {
            "tcp": free_port(),
            "tls": free_port(),
            "ws": free_port(),
            "udp": free_port(socket.SOCK_DGRAM),
        }
        bin_dir = os.path.join(self.work, "bin")
        os.mkdir(bin_dir)
        ports = [
            *("--tcp", f"tcp:{self.ports['tcp']}:interface=127.0.0.1"),
            *("--tls", f"tcp:{self.ports['tls']}:interface=127.0.0.1"),
            *("--ws", f"tcp:{self.ports['ws']}:interface=127.0.0.1"),
        ]
        for name, body in WRAPPERS.items():
            path = os.path.join(bin_dir, name)
            with open(path, "w") as f:
                f.write(f"#!{sys.executable}\nimport sys\nPORTS = {ports!r}\n{body}\n")
            os.chmod(path, 0o755)
        self.env = python_env(
            RUNDIR=self.rundir, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
        )
        self.ipcd: subprocess.Popen[bytes] | None = None
        self.logs = 0

    def localized(self, text: str) -> str:
        """The README's text with this test's ports."""
        text = re.sub(
            r"udp:(//127\.0\.0\.1:)?9000",
            lambda m: f"udp:{m.group(1) or ''}{self.ports['udp']}",
            text,
        )
        text = text.replace("127.0.0.1:9000", f"127.0.0.1:{self.ports['tcp']}")
        text = text.replace("127.0.0.1:9001", f"127.0.0.1:{self.ports['tls']}")
        return text.replace("127.0.0.1:8080", f"127.0.0.1:{self.ports['ws']}")

    def start(self, command: str) -> None:
        """
        A server in a terminal of its own, once it listens: a new ipcd (the
        README stops the old one, Ctrl-C) once it logs that it is ready,
        another once its socket is in RUNDIR.
        """
        is_ipcd = command.split()[:3] == ["twistd", "-n", "ipcd"]
        if is_ipcd and self.ipcd is not None:
            self.ipcd.send_signal(signal.SIGINT)
            self.ipcd.wait(3 * TIMEOUT)
        before = set(os.listdir(self.rundir))
        self.logs += 1
        log = os.path.join(self.work, f"server{self.logs}.log")
        shell = "import os, sys; os.execvp('bash', ['bash', '-c', sys.argv[1]])"
        process = spawn(
            self, ["-c", shell, f"exec {command}"], log, self.env, self.work
        )
        if is_ipcd:
            self.ipcd = process

        def listening() -> bool:
            if is_ipcd:
                return READY in read_text(log)
            new = set(os.listdir(self.rundir)) - before
            return any(accepts(os.path.join(self.rundir, name)) for name in new)

        deadline = time.monotonic() + 6 * TIMEOUT
        while not listening():
            if process.poll() is not None:
                self.fail(
                    f"{command}: exited with {process.returncode}:\n{read_text(log)}"
                )
            if time.monotonic() > deadline:
                self.fail(
                    f"{command}: not ready after {6 * TIMEOUT:g} s:\n{read_text(log)}"
                )
            time.sleep(0.05)

    def test_tour(self) -> None:
        for tool in ("socat", "openssl"):
            if shutil.which(tool) is None:
                raise SkipTest(f"the tour uses {tool}, which is not installed")
        with open(README, encoding="utf-8") as f:
            steps = tour_steps(f.read())
        self.assertIn("shell", [s.kind for s in steps])
        for step in steps:
            command = self.localized(step.text)
            if step.kind == "file":
                with open(os.path.join(self.work, step.name), "w") as f:
                    f.write(command)
            elif step.kind == "start":
                self.start(command)
            else:
                done = subprocess.run(
                    ["bash", "-c", command],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    cwd=self.work,
                    timeout=6 * TIMEOUT,
                )
                output = done.stdout.decode("utf-8", "replace")
                if step.kind == "shell":
                    expected = "\n".join(step.expected).replace(
                        SHOWN_RUNDIR, self.rundir
                    )
                    self.assertEqual(
                        output.rstrip("\n"), self.localized(expected), f"$ {command}"
                    )
                else:
                    self.assertEqual(done.returncode, 0, f"{command}:\n{output}")
