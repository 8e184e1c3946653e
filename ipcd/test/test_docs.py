"""
docs/ as Sphinx builds it: every cross-reference leads somewhere, so that
C{sphinx-build -W} (docs/conf.py's command) passes.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib
import inspect
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from ipcd.test.support import short_rundir
from ipcd.test.test_config import CONFIG_PAGES, toml_blocks
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


# ``ipcd.module.Name(a, b=1, *, c=None)``, as api.rst gives a signature.
SIGNATURE = r"``(ipcd(?:\.\w+)+)\(([^`]*)\)``"


def resolve(dotted: str) -> Any:
    """The object C{dotted} names: a module, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            found: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            found = getattr(found, part)
        return found
    raise ImportError(dotted)


def documented_default(text: str) -> tuple[bool, Any]:
    """
    (True, the value) for a default api.rst writes as a literal or a dotted
    name (C{1048576}, C{None}, C{time.monotonic}); (False, None) for prose
    (C{8 MiB}, C{...}).
    """
    try:
        value = ast.literal_eval(text)
        return value is not Ellipsis, value  # "...": said, not written
    except (ValueError, SyntaxError):
        pass
    if re.fullmatch(r"[A-Za-z_]\w*(\.\w+)+", text):
        try:
            return True, resolve(text)
        except (ImportError, AttributeError):
            pass
    return False, None


class SignatureTests(SynchronousTestCase):
    def test_apiSignaturesAsCoded(self) -> None:
        """
        Each signature docs/api.rst gives (C{``ipcd.x.Name(a, b=1)``}) names
        parameters the code has, in its order, with the defaults it has
        (where the doc writes a value, not prose).
        """
        with open(os.path.join(docs_dir(), "api.rst"), encoding="utf-8") as f:
            text = re.sub(r"\s*\n\s*", " ", f.read())
        checked = 0
        for dotted, args in re.findall(SIGNATURE, text):
            try:
                parameters = inspect.signature(resolve(dotted)).parameters
            except (TypeError, ValueError):
                continue  # no signature to compare (a builtin's)
            names = [name for name in parameters if name != "self"]
            given = [a.strip() for a in args.split(",") if a.strip() not in ("", "*")]
            # "files=("/etc/passwd", "/etc/group")": a comma inside a value.
            given = [a for a in given if re.match(r"\w+(=|$)", a)]
            where = f"{dotted}({args})"
            order = []
            for arg in given:
                name, _, default = arg.partition("=")
                self.assertIn(name, names, where)
                order.append(names.index(name))
                known, value = documented_default(default) if default else (0, 0)
                if known:
                    self.assertEqual(value, parameters[name].default, where)
                    checked += 1
            self.assertEqual(order, sorted(order), where)
        self.assertGreater(checked, 20)


# Files the examples name that no test machine has: a start that fails on
# one of them, in one line, is the example's honest outcome.
EXAMPLE_FILES = ("/etc/ipcd/",)


class ExampleConfigsStartTests(TestCase):
    @inlineCallbacks
    def test_eachExampleStarts(self) -> Any:
        """
        Each TOML block of the docs, saved as a file, starts ipcd (the
        C{ipcd} command's options and service tree: every daemon's check,
        every listener listening) to its ready line, as an operator pasting
        it would; only RUNDIR and the listeners' ports are this test's
        (free ones, on the command line, which overrides the file).  An
        example that names a file under /etc/ipcd stops the start in one
        line naming it, and nothing else.
        """
        from twisted.internet import reactor

        from ipcd.options import Options
        from ipcd.tap import makeService

        work = short_rundir(self, "ipcd-docex-")
        started = ready = should = 0
        for page in CONFIG_PAGES:
            with open(os.path.join(docs_dir(), f"{page}.rst"), encoding="utf-8") as f:
                blocks = toml_blocks(f.read())
            for block in blocks:
                path = os.path.join(work, f"{started}.toml")
                with open(path, "w", encoding="utf-8") as f:
                    f.write(block + "\n")
                args = ["--config", path]
                args += ["--rundir", os.path.join(work, f"run{started}")]
                args += _free_listeners(tomllib.loads(block))
                started += 1
                should += not any(name in block for name in EXAMPLE_FILES)
                where = f"docs/{page}.rst:\n{block}"
                options = Options()
                options.parseOptions(args)
                try:
                    service = makeService(options, reactor)
                except SystemExit as e:
                    line = str(e.code)
                    self.assertEqual(len(line.splitlines()), 1, f"{where}\n{line}")
                    self.assertTrue(
                        any(name in block and name in line for name in EXAMPLE_FILES),
                        f"{where}\n{line}",
                    )
                    continue
                service.startService()
                try:
                    yield service.when_ready()
                    ready += 1
                finally:
                    yield service.stopService()
        self.assertGreaterEqual(started, 10)
        self.assertEqual(ready, should)  # every one that names no such file


def _free_listeners(config: dict) -> list[str]:
    """Command-line listeners on free ports for what C{config} runs."""
    args = ["--tcp", "tcp:0:interface=127.0.0.1", "--ws", "tcp:0:interface=127.0.0.1"]
    args += ["--tls", "tcp:0:interface=127.0.0.1"]
    if config.get("udpd", {}).get("enabled"):
        args += ["--udp", "udp:0:interface=127.0.0.1"]
    if "metrics" in config:
        args += ["--metrics", "tcp:0:interface=127.0.0.1"]
    return args


class MutationDocsTests(SynchronousTestCase):
    def test_readmeNamesEveryMutatedModule(self) -> None:
        """
        README.rst's "Mutation testing" paragraph names (as C{``name``})
        each module benchmarks/mutate.py mutates, and no other.
        """
        with open(os.path.join(source_tree(), "benchmarks", "mutate.py")) as f:
            tree = ast.parse(f.read())
        modules: set[str] = set()
        for node in tree.body:
            if isinstance(node, ast.AnnAssign | ast.Assign) and "MODULES" in {
                getattr(t, "id", None)
                for t in getattr(node, "targets", [getattr(node, "target", None)])
            }:
                assert isinstance(node.value, ast.Dict)
                modules = {ast.literal_eval(k) for k in node.value.keys if k}
        self.assertIn("routes", modules)
        with open(os.path.join(source_tree(), "README.rst"), encoding="utf-8") as f:
            readme = f.read()
        paragraph = readme.split("**Mutation testing**", 1)[1].split("::\n", 1)[0]
        self.assertEqual(set(re.findall(r"``(\w+)``", paragraph)), modules)
