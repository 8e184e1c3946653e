"""
The storefront: C{ipcd.__all__} and the example that opens docs/api.rst.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

import ipcd
from ipcd.test.support import python_env
from ipcd.test.test_packaging import source_tree

TIMEOUT = 60


def run_python(code: str, cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=python_env(),
        cwd=cwd,
    )


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
