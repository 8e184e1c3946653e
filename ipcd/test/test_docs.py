"""
docs/ as Sphinx builds it: every cross-reference leads somewhere, so that
C{sphinx-build -W} (docs/conf.py's command) passes.
"""

from __future__ import annotations

import ast
import fnmatch
import os
import re
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from ipcd.test.test_packaging import source_tree

# :doc:`target` or :doc:`text <target>`; the same for :ref:.
ROLE = r":{role}:`(?:[^`<]*<([^`>]+)>|([^`<]+))`"


def docs_dir() -> str:
    return os.path.join(source_tree(), "docs")


def pages() -> dict[str, str]:
    """Each docs/*.rst by name (without .rst), with its text."""
    found = {}
    for entry in sorted(os.listdir(docs_dir())):
        if entry.endswith(".rst"):
            with open(os.path.join(docs_dir(), entry), encoding="utf-8") as f:
                found[entry[: -len(".rst")]] = f.read()
    return found


def targets(role: str, text: str) -> list[str]:
    return [a or b for a, b in re.findall(ROLE.format(role=role), text)]


def excluded() -> list[str]:
    """docs/conf.py's C{exclude_patterns}, read without running conf.py."""
    with open(os.path.join(docs_dir(), "conf.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "exclude_patterns" for t in node.targets
        ):
            return list(ast.literal_eval(node.value))
    return []


class CrossReferenceTests(SynchronousTestCase):
    def test_docTargetsAreDocuments(self) -> None:
        """
        A C{:doc:} names a page Sphinx builds: one of docs/, not one that
        conf.py excludes (the operations-*.rst pages are included in
        operations.rst, so they are no documents of their own: link to a
        label in them with C{:ref:}).
        """
        built = {
            name
            for name in pages()
            if not any(fnmatch.fnmatch(f"{name}.rst", p) for p in excluded())
        }
        bad = [
            (page, target)
            for page, text in pages().items()
            for target in targets("doc", text)
            if target not in built
        ]
        self.assertEqual(bad, [])
        self.assertIn("securing", built)  # the reading found the documents

    def test_refTargetsAreLabels(self) -> None:
        """A C{:ref:} names a label (C{.. _label:}) of some page."""
        labels = {
            label
            for text in pages().values()
            for label in re.findall(r"^\.\. _([\w-]+):$", text, re.M)
        }
        bad = [
            (page, target)
            for page, text in pages().items()
            for target in targets("ref", text)
            if target not in labels
        ]
        self.assertEqual(bad, [])
        self.assertIn("socket-directory", labels)

    def test_sphinxWithoutWarnings(self) -> None:
        """
        C{sphinx-build -W}, as docs/conf.py says to build, passes (where
        Sphinx is installed: the C{docs} extra).
        """
        try:
            import sphinx  # noqa: F401
        except ImportError:
            raise SkipTest("no sphinx (python3 -m pip install '.[docs]')")
        with tempfile.TemporaryDirectory() as out:
            run = subprocess.run(
                [sys.executable, "-m", "sphinx", "-W", "-q", "-b", "html"]
                + ["-d", os.path.join(out, "doctrees"), docs_dir(), out],
                capture_output=True,
                text=True,
                timeout=300,
            )
        self.assertEqual(run.returncode, 0, run.stderr)
