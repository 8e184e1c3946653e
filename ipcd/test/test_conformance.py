"""
websocketd against a WebSocket conformance suite nobody here wrote: the
Autobahn TestSuite's cases, run by the C{kosoku} package's fuzzing client
against websocketd fronting pongd (an echo: what the cases expect).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from ipcd.test.support import python_env
from ipcd.test.wssupport import start_ws_host

# The cases issue 11 names: framing, pings, reserved bits, opcodes,
# fragmentation, UTF-8, closing, messages up to 1 MiB, auto-fragmentation.
CASES = ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*"]
CASES += ["9.1.1", "9.1.2", "9.1.3", "10.*"]
PASSING = {"OK", "NON-STRICT", "INFORMATIONAL"}
CLOSE_PASSING = {"OK", "INFORMATIONAL"}


def kosoku_command() -> list[str]:
    """The kosoku command beside this Python, or on PATH; skip without it."""
    beside = os.path.join(os.path.dirname(sys.executable), "kosoku")
    found = beside if os.access(beside, os.X_OK) else shutil.which("kosoku")
    if found is None:
        raise SkipTest("kosoku is not installed (pip install kosoku: the test extra)")
    return [found]


class AutobahnCasesTests(TestCase):
    timeout = 300

    @inlineCallbacks
    def _kosoku(
        self, command: list[str], url: str, cases: list[str], parallel: int
    ) -> Any:
        """Run kosoku on C{cases}; its per-case results, and its own output."""
        reports = self.mktemp()
        selection = [arg for case in cases for arg in ("-i", case)]
        result = yield deferToThread(
            subprocess.run,
            [*command, url, *selection, "-p", str(parallel), "-o", reports],
            capture_output=True,
            timeout=240,
            env=python_env(),
            stdin=subprocess.DEVNULL,
        )
        index = os.path.join(reports, "index.json")
        output = (result.stdout + result.stderr).decode("utf-8", "replace")
        self.assertTrue(os.path.exists(index), output)
        with open(index) as f:
            [results] = json.load(f).values()
        return results, result.returncode, output

    @inlineCallbacks
    def test_autobahnCases(self) -> Any:
        """
        Every selected case is OK, NON-STRICT or INFORMATIONAL, and every
        closing handshake OK or INFORMATIONAL.
        """
        command = kosoku_command()
        host = yield start_ws_host(self)
        url = f"ws://127.0.0.1:{host.port}/pong"
        cases, returncode, output = yield self._kosoku(command, url, CASES, 2)
        # The whole selection ran (kosoku 0.1.0: 250 cases).
        self.assertGreaterEqual(len(cases), 250, output)
        # kosoku's case timeouts are fixed (the UTF-8 cases from 6.5 on kill
        # the connection after 0.5 s): on a loaded machine a case can run
        # out of time, seen as "FAILED BY CLIENT" or, when the echo came
        # too late, as "FAILED" (6.6.7 once, at a load of 8).
        # A failing case runs once more, alone; a failure then stands.
        waited = sorted(
            name
            for name, case in cases.items()
            if case["behavior"] not in PASSING
            or case["behaviorClose"] not in CLOSE_PASSING
        )
        if waited:
            again, returncode, output = yield self._kosoku(command, url, waited, 1)
            cases.update(again)
        behaviors = Counter(case["behavior"] for case in cases.values())
        closes = Counter(case["behaviorClose"] for case in cases.values())
        failing = {
            name: (case["behavior"], case["behaviorClose"])
            for name, case in cases.items()
            if case["behavior"] not in PASSING
            or case["behaviorClose"] not in CLOSE_PASSING
        }
        self.assertEqual(failing, {}, f"{behaviors} {closes} run again: {waited}")
        self.assertEqual(returncode, 0, output)
