"""The code stays ruff clean (lint and format), checked with the suite."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

from twisted.trial.unittest import SkipTest, TestCase

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class RuffTests(TestCase):
    def setUp(self) -> None:
        if importlib.util.find_spec("ruff") is None:
            raise SkipTest("ruff is not installed (pip install '.[test]')")
        if not os.path.exists(os.path.join(REPO, "pyproject.toml")):
            raise SkipTest("not running from a source checkout")

    def ruff(self, *args: str) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "ruff", *args, "ipcd", "benchmarks", "twisted"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_lint(self) -> None:
        self.ruff("check")

    def test_format(self) -> None:
        self.ruff("format", "--check")
