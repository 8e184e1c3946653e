"""
Tests for the packaging of ipcd: the Twisted plugins (C{twistd ipcd}, the
C{ipc:} endpoint strings) and the files that make them ship.
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import tarfile
from importlib import metadata

from twisted.application.service import IServiceMaker
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.testing import MemoryReactor
from twisted.plugin import getPlugins
from twisted.trial.runner import TestLoader
from twisted.trial.unittest import SkipTest, SynchronousTestCase

import ipcd
from ipcd.endpoints import IPCClientEndpoint, IPCServerEndpoint

# The checkout this ipcd was imported from, if it is one.
SOURCE = os.path.dirname(os.path.dirname(os.path.abspath(ipcd.__file__ or "")))


def source_tree() -> str:
    if not os.path.exists(os.path.join(SOURCE, "setup.cfg")):
        raise SkipTest(f"ipcd was not imported from a source tree ({SOURCE})")
    return SOURCE


class PluginTests(SynchronousTestCase):
    def test_serviceMaker(self) -> None:
        """C{twistd ipcd} exists and takes L{ipcd.tap.Options}."""
        from ipcd.tap import Options

        makers = [m for m in getPlugins(IServiceMaker) if m.tapname == "ipcd"]
        self.assertTrue(makers, "no IServiceMaker plugin with tapname 'ipcd'")
        for maker in makers:
            self.assertIs(maker.options, Options)
            self.assertTrue(maker.description)

    def test_clientFromString(self) -> None:
        reactor = MemoryReactor()
        endpoint = clientFromString(reactor, "ipc:pong")
        self.assertIsInstance(endpoint, IPCClientEndpoint)
        self.assertEqual(endpoint.service, "pong")

    def test_clientFromStringArguments(self) -> None:
        endpoint = clientFromString(
            MemoryReactor(), "ipc:pong:rundir=/x:network=pong unix\\://pong"
        )
        self.assertIsInstance(endpoint, IPCClientEndpoint)
        self.assertEqual(endpoint.rundir, "/x")
        self.assertEqual(endpoint.network, "pong unix://pong")

    def test_serverFromString(self) -> None:
        reactor = MemoryReactor()
        endpoint = serverFromString(reactor, "ipc:pong:rundir=/x")
        self.assertIsInstance(endpoint, IPCServerEndpoint)
        self.assertEqual(endpoint.name, "pong")
        self.assertEqual(endpoint.path, "/x/pong")
        # Nothing happened yet: no listening, no files.
        self.assertEqual(reactor.unixServers, [])
        self.assertFalse(os.path.exists("/x/pong"))

    def test_badNameInString(self) -> None:
        self.assertRaises(
            ValueError, serverFromString, MemoryReactor(), "ipc:..:rundir=/x"
        )

    def test_noReactorImport(self) -> None:
        """
        Importing the plugin module and the service module does not import
        the reactor (that would break C{twistd -r ...}).
        """
        code = (
            "import sys\n"
            "import twisted.plugins.ipcd_plugin, ipcd.tap\n"
            "print('twisted.internet.reactor' in sys.modules)\n"
        )
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p or "." for p in sys.path))
        result = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=SOURCE if os.path.isdir(SOURCE) else None,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.strip(), "False", result.stderr)


class DiscoveryTests(SynchronousTestCase):
    def test_regularPackage(self) -> None:
        """
        C{ipcd} is a regular package: as a namespace package,
        C{python -m twisted.trial ipcd} would quietly run no tests at all.
        """
        self.assertIsNotNone(ipcd.__file__)
        self.assertTrue(ipcd.__file__.endswith("__init__.py"))

    def test_trialFindsTests(self) -> None:
        """C{trial ipcd} finds this very test."""
        suite = TestLoader().loadByName("ipcd", recurse=True)
        found = set()

        def walk(test) -> None:
            if hasattr(test, "_tests"):
                for sub in test._tests:
                    walk(sub)
            else:
                found.add(test.id())

        walk(suite)
        self.assertIn(self.id(), found)


class SourceTreeTests(SynchronousTestCase):
    def test_pluginFile(self) -> None:
        tree = source_tree()
        for name in ("ipcd_plugin.py", "ipcd_daemons.py"):
            self.assertTrue(
                os.path.isfile(os.path.join(tree, "twisted", "plugins", name)), name
            )

    def test_noNamespaceInits(self) -> None:
        """
        C{twisted/} and C{twisted/plugins/} are Twisted's namespace: an
        C{__init__.py} in either would shadow Twisted itself.
        """
        tree = source_tree()
        for path in ["twisted/__init__.py", "twisted/plugins/__init__.py"]:
            self.assertFalse(
                os.path.exists(os.path.join(tree, path)), f"{path} must not exist"
            )

    def test_everyPackageShips(self) -> None:
        """
        Each package in the tree is named in setup.cfg's C{packages} (the
        list is explicit, for C{twisted.plugins}): a package left out would
        be missing from an install.
        """
        tree = source_tree()
        config = configparser.ConfigParser()
        config.read(os.path.join(tree, "setup.cfg"))
        listed = set(config["options"]["packages"].split())
        for top, _, files in os.walk(os.path.join(tree, "ipcd")):
            if "__init__.py" in files:
                name = os.path.relpath(top, tree).replace(os.sep, ".")
                self.assertIn(name, listed, "missing from setup.cfg's packages")


class SdistTests(SynchronousTestCase):
    def test_unitsAndDocsShip(self) -> None:
        """
        The source distribution carries the systemd units and the docs that
        describe them (MANIFEST.in), not only the package.
        """
        tree = source_tree()
        try:
            import setuptools.build_meta  # noqa: F401 (what builds it)
        except ImportError:
            raise SkipTest("setuptools is not installed here") from None
        copy = os.path.join(os.path.abspath(self.mktemp()), "tree")
        shutil.copytree(
            tree,
            copy,
            ignore=shutil.ignore_patterns(
                ".git", "build", "_trial_temp*", "*.egg-info", "__pycache__"
            ),
        )
        out = os.path.join(copy, "dist")
        built = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from setuptools import build_meta; "
                "print(build_meta.build_sdist(sys.argv[1]))",
                out,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=copy,
        )
        self.assertEqual(built.returncode, 0, built.stderr)
        name = built.stdout.split()[-1]
        with tarfile.open(os.path.join(out, name)) as sdist:
            members = {m.split("/", 1)[1] for m in sdist.getnames() if "/" in m}
        for shipped in (
            "docs/ipcd.service",
            "docs/ipcd.socket",
            "docs/ipcd-tcp.socket",
            "docs/operations-systemd.rst",
            "ipcd/daemons/websocket/websocketc.html",
            "twisted/plugins/ipcd_plugin.py",
        ):
            self.assertIn(shipped, members)


class InstalledTests(SynchronousTestCase):
    def test_pluginShips(self) -> None:
        """The installed distribution includes the plugin file."""
        try:
            dist = metadata.distribution("ipcd")
        except metadata.PackageNotFoundError:
            raise SkipTest("ipcd is not installed") from None
        if _editable(dist):
            self.editablePluginFound(dist)
            return
        files = dist.files
        if files is None:
            raise SkipTest("the installed ipcd has no file list")
        names = {str(f).replace(os.sep, "/") for f in files}
        self.assertIn("twisted/plugins/ipcd_plugin.py", names)
        self.assertNotIn("twisted/__init__.py", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)

    def editablePluginFound(self, dist: metadata.Distribution) -> None:  # noqa: N802
        """
        An editable install ships no files: the plugin is found from its
        checkout when that is on C{sys.path} (C{editable_mode=compat}).
        """
        code = (
            "from twisted.plugin import getPlugins\n"
            "from twisted.internet.interfaces import"
            " IStreamServerEndpointStringParser as I\n"
            "print(sorted(p.prefix for p in getPlugins(I)))\n"
        )
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            cwd="/",
            env=env,
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        if "'ipc'" not in out.stdout:
            raise SkipTest(
                f"ipcd is installed editable ({dist.read_text('direct_url.json')})"
                " without editable_mode=compat: Twisted cannot find its plugins"
                " (docs/api.rst, Endpoints, says how to install it)"
            )


def _editable(dist: metadata.Distribution) -> bool:
    """Whether C{dist} was installed with C{pip install -e} (PEP 610)."""
    text = dist.read_text("direct_url.json")
    if not text:
        return False
    return bool(json.loads(text).get("dir_info", {}).get("editable"))


class PluginCacheTests(SynchronousTestCase):
    def test_unwritableCache(self) -> None:
        """
        Discovery works where Twisted cannot write C{dropin.cache} (a
        read-only site-packages).  A directory in the cache's place makes the
        write fail even for root, which ignores file permissions.
        """
        tree = source_tree()
        site = self.mktemp()
        plugins = os.path.join(site, "twisted", "plugins")
        os.makedirs(plugins)
        with open(os.path.join(tree, "twisted", "plugins", "ipcd_plugin.py")) as f:
            source = f.read()
        with open(os.path.join(plugins, "ipcd_plugin.py"), "w") as f:
            f.write(source)
        os.mkdir(os.path.join(plugins, "dropin.cache"))
        code = (
            "from twisted.plugin import getPlugins\n"
            "from twisted.application.service import IServiceMaker\n"
            "print(sorted(m.tapname for m in getPlugins(IServiceMaker)))\n"
        )
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([site, tree]))
        result = subprocess.run(
            [sys.executable, "-c", code],
            cwd=site,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("'ipcd'", result.stdout)
