"""
Tests for L{ipcd.scripts.ipcd}: L{join_words} (the seed's unquoted flag
style becomes twistd's quoted one), and what C{ipcd status} says when no
ipcd answers.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from ipcd.scripts.ipcd import control, join_words


class ControlTests(SynchronousTestCase):
    def test_noIpcdNamesTheSocket(self) -> None:
        rundir = tempfile.mkdtemp(prefix="ipcd-", dir="/tmp")
        self.addCleanup(os.rmdir, rundir)
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        self.assertEqual(control(["status", "--rundir", rundir]), 1)
        path = os.path.join(rundir, "ipcd-control")
        self.assertEqual(
            err.getvalue(),
            f"ipcd status: cannot reach ipcd's control socket {path}: "
            "[Errno 2] No such file or directory\n",
        )


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
        """The joined form is what L{ipcd.tap.Options} understands."""
        from ipcd.tap import Options

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
