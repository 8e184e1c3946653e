"""
Tests for L{ipcd.config} (the TOML file and its validation) and for the
command-line options of C{twistd ipcd} (L{ipcd.options.Options}).
"""

from __future__ import annotations

import grp
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
from typing import Any

import hypothesis
from hypothesis import HealthCheck, example, settings
from hypothesis import strategies as st
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.python import usage
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from ipcd.checkers import (
    Invalid,
    check_server_endpoint,
    non_negative_number,
    positive_number,
)
from ipcd.config import (
    _SCHEMA,
    MAX_CONFIG_FILE,
    Config,
    ConfigError,
    load_config,
    names_descriptor,
)
from ipcd.daemons import default_registry, settings_of
from ipcd.daemons.tcp import DEFAULT_LISTEN as DEFAULT_TCP_LISTEN
from ipcd.daemons.tcp import tcpd
from ipcd.instancelock import take_instance_lock
from ipcd.routes import LocalURI, PathURI, RemoteURI, parse_uri
from ipcd.test.support import (
    ARABIC_INDIC,
    REPO,
    TIMEOUT,
    calls_to,
    free_port,
    python_env,
    short_rundir,
)
from ipcd.wire import DEFAULT_MAX_MESSAGE_SIZE


def tcp_listen(config: Config) -> str | None:
    """tcpd's listener in C{config}: its C{tcp_listen} status line (None: off)."""
    return tcpd.status(settings_of(config, tcpd))["tcp_listen"]


FULL = """\
rundir = "/srv/ipc"
max_message_size = 4096
rules = []

[ipcd]
lookup_timeout = 2.5
connect_timeout = 3
allow_client_routes = false

[pongd]
enabled = false

[tcpd]
enabled = true
listen = 'tcp:9100:interface=\\:\\:1'
handshake_timeout = 7

[redirects]
authd = "nextversion-authd"
a = "b"
b = "c"

[routes]
pong = "tcp://10.0.0.1:9000/pong"
local = "unix:///var/run/local.sock"
other = "unix://pong"
"""


class ConfigFileMixin:
    def write(self, text: str) -> str:
        path = self.mktemp()  # type: ignore[attr-defined]
        with open(path, "w") as f:
            f.write(text)
        return path

    def error(self, text: str, overrides: dict | None = None) -> str:
        path = self.write(text)
        error = self.assertRaises(  # type: ignore[attr-defined]
            ConfigError, load_config, path, overrides, {}
        )
        message = str(error)
        self.assertTrue(  # type: ignore[attr-defined]
            message.startswith(path + ": "), f"{message!r} does not name {path}"
        )
        return message[len(path) + 2 :]

    def listener_refused(
        self,
        listen: str,
        reason: str,
        sections: tuple[str, ...] = ("tcpd", "tlsd", "websocketd", "metrics"),
    ) -> None:
        """
        Listener C{listen} is refused, C{invalid endpoint 'LISTEN': REASON},
        from a file and from the command line, for each of C{sections}
        (metrics, served over TCP only, refuses a UNIX one all the same).
        """
        for section in sections:
            if section == "metrics" and "unix" in listen.lower():
                continue
            refusal = f"[{section}] listen: invalid endpoint {listen!r}: {reason}"
            file_error = self.error(f"[{section}]\nlisten = '{listen}'\n")
            self.assertIn(refusal, file_error)  # type: ignore[attr-defined]
            error = self.assertRaises(  # type: ignore[attr-defined]
                ConfigError, load_config, None, {section: {"listen": listen}}, {}
            )
            self.assertIn(f"command line: {refusal}", str(error))  # type: ignore[attr-defined]


class DefaultsTests(SynchronousTestCase):
    def test_noFile(self) -> None:
        """With no file, the embedded defaults make a useful local instance."""
        config = load_config(None, None, {})
        self.assertIsInstance(config, Config)
        self.assertEqual(config.rundir, "/tmp/libipc-run")
        self.assertEqual(config.max_message_size, DEFAULT_MAX_MESSAGE_SIZE)
        self.assertEqual(config.lookup_timeout, 5.0)
        self.assertEqual(config.connect_timeout, 5.0)
        self.assertTrue(config.allow_client_routes)
        self.assertEqual(dict(config.redirects), {})
        self.assertEqual(dict(config.routes), {})
        self.assertTrue(config.pongd)
        self.assertEqual(tcp_listen(config), DEFAULT_TCP_LISTEN)
        self.assertEqual(DEFAULT_TCP_LISTEN, "tcp:9000:interface=127.0.0.1")
        self.assertEqual(config.rules, ())
        self.assertIsNone(config.source)

    def test_rundirFromEnvironment(self) -> None:
        self.assertEqual(load_config(None, None, {"RUNDIR": "/env"}).rundir, "/env")

    def test_immutable(self) -> None:
        config = load_config(None, {"redirects": {"a": "b"}}, {})

        def assign(mapping, value) -> None:
            mapping["x"] = value

        self.assertRaises(TypeError, assign, config.redirects, "y")
        self.assertRaises(TypeError, assign, config.routes, LocalURI("y"))
        self.assertRaises(AttributeError, setattr, config, "pongd", False)


class FileTests(ConfigFileMixin, SynchronousTestCase):
    def test_full(self) -> None:
        path = self.write(FULL)
        config = load_config(path, None, {"RUNDIR": "/env"})
        self.assertEqual(config.source, path)
        self.assertEqual(config.rundir, "/srv/ipc")
        self.assertEqual(config.max_message_size, 4096)
        self.assertEqual(config.lookup_timeout, 2.5)
        self.assertEqual(config.connect_timeout, 3.0)
        self.assertIsInstance(config.connect_timeout, float)
        self.assertFalse(config.allow_client_routes)
        self.assertFalse(config.pongd)
        self.assertEqual(tcp_listen(config), r"tcp:9100:interface=\:\:1")
        self.assertEqual(config.daemons["tcpd"]["handshake_timeout"], 7.0)
        self.assertEqual(
            dict(config.redirects),
            {"authd": "nextversion-authd", "a": "b", "b": "c"},
        )
        self.assertEqual(
            dict(config.routes),
            {
                "pong": RemoteURI(
                    "tcp", "10.0.0.1", 9000, "pong", "tcp://10.0.0.1:9000/pong"
                ),
                "local": PathURI("/var/run/local.sock"),
                "other": LocalURI("pong"),
            },
        )

    def test_empty(self) -> None:
        path = self.write("")
        config = load_config(path, None, {})
        self.assertEqual(config.lookup_timeout, 5.0)
        self.assertTrue(config.pongd)
        self.assertEqual(config.source, path)

    def test_rules(self) -> None:
        path = self.write('rules = ["allow in authd", "deny in * *"]\n')
        config = load_config(path, None, {})
        self.assertEqual(
            [str(rule) for rule in config.rules],
            ["allow in authd *", "deny in * *"],
        )

    def test_grantsAndExternalDaemons(self) -> None:
        path = self.write(
            'grants = ["secret group:ops", "db* uid:1000"]\n'
            '[ipcd]\nexternal_daemons = ["tls", "udp", "tls"]\n'
        )
        config = load_config(path, {"grants": ["x *"]}, {})
        self.assertEqual(
            [str(grant) for grant in config.grants],
            ["secret group:ops", "db* uid:1000", "x *"],
        )
        self.assertEqual(config.external_daemons, ("tls", "udp"))
        self.assertEqual(load_config(None, None, {}).grants, ())
        self.assertEqual(load_config(None, None, {}).external_daemons, ())

    def test_limits(self) -> None:
        config = load_config(None, None, {})
        self.assertEqual(
            (config.max_connections, config.max_connections_per_peer),
            (1024, 128),
        )
        self.assertEqual((config.idle_timeout, config.control_timeout), (300, 10))
        path = self.write(
            "[limits]\nidle_timeout = 0\npeer_prefix_ipv6 = 48\n"
            "partial_message_budget = 1000\nmax_connections_per_peer = 7\n"
            "max_connections = 9\npeer_prefix_ipv4 = 20\ncontrol_timeout = 2.5\n"
        )
        config = load_config(path, None, {})
        self.assertEqual(
            (config.max_connections, config.max_connections_per_peer), (9, 7)
        )
        self.assertEqual((config.peer_prefix_ipv4, config.control_timeout), (20, 2.5))
        self.assertEqual(config.idle_timeout, 0)
        self.assertEqual(config.peer_prefix_ipv6, 48)
        self.assertEqual(config.partial_message_budget, 1000)
        for text, why in [
            ("max_connections = 0", "greater than 0"),
            ("peer_prefix_ipv4 = 33", "from 0 to 32"),
            ("idle_timeout = -1", "0 or more"),
            (
                "idle_timeout = true",
                "(0: no deadline) and at most 604800 (a week), got true",
            ),
            (
                'idle_timeout = "5"',
                "(0: no deadline) and at most 604800 (a week), got '5'",
            ),
            ("max_connections_per_peer = true", "greater than 0, got true"),
            ("control_timeout = 0", "greater than 0"),
            # TOML's nan and inf are no numbers of seconds: nan made every
            # connection's timer fail (Twisted's callLater asserts).
            ("control_timeout = nan", "(a week), got nan"),
            ("control_timeout = inf", "(a week), got inf"),
            ("idle_timeout = nan", "(a week), got nan"),
            ("idle_timeout = inf", "(a week), got inf"),
        ]:
            message = self.error(f"[limits]\n{text}\n")
            self.assertTrue(message.startswith("[limits] "), message)
            self.assertIn(why, message)

    def test_badGrant(self) -> None:
        """A grant names both the service and the peer: nothing implicit."""
        message = self.error('grants = ["secret"]\n')
        self.assertTrue(message.startswith("grants[0]: grant 'secret'"), message)
        self.assertIn("SERVICE-GLOB PEER-PATTERN", message)
        message = self.error('grants = ["secret alice"]\n')
        self.assertIn("peer pattern must be '*' or KIND:VALUE", message)
        self.assertTrue(self.error('grants = "x"\n').startswith("grants: expected"))

    def test_badExternalDaemon(self) -> None:
        for value, why in [
            ('["ipcd-control"]', "is ipcd's own socket"),
            ('["ipc"]', "is ipcd's own socket"),
            ('["unix"]', "is not a daemon's scheme"),
            ('["TLS"]', "is not a daemon's scheme"),
            # The whole entry must be a scheme, not only its start.
            ('["t_ls"]', "'t_ls' is not a daemon's scheme"),
            ('["tls "]', "'tls ' is not a daemon's scheme"),
            # Longer than a route's scheme may be: no route could name it.
            ('["' + "a" * 33 + '"]', f"'{'a' * 33}' is not a daemon's scheme"),
            ('"tls"', "expected a list of URI schemes"),
            # Every entry a string, not only some.
            ("[1]", "expected a list of URI schemes"),
            ('["tls", 1]', "expected a list of URI schemes"),
        ]:
            message = self.error(f"[ipcd]\nexternal_daemons = {value}\n")
            self.assertTrue(
                message.startswith("[ipcd] external_daemons: expected"), message
            )
            self.assertIn(why, message)

    def test_sslListenFilesReadWhenListening(self) -> None:
        """
        An C{ssl:} listener's key and certificate files are read when it
        listens (where a missing one is one clear line), not when the
        configuration is checked: loading never opens them.
        """
        listen = "ssl:0:privateKey=/nonexistent/k.pem"
        path = self.write(f'[websocketd]\nlisten = "{listen}"\n')
        config = load_config(path, None, {})
        self.assertEqual(config.daemons["websocketd"]["listen"], listen)

    def test_tcpdDisabled(self) -> None:
        """C{[tcpd] enabled = false} means no TCP listener at all."""
        path = self.write('[tcpd]\nenabled = false\nlisten = "tcp:9100"\n')
        self.assertIsNone(tcp_listen(load_config(path, None, {})))

    def test_tcpdEnabledDefault(self) -> None:
        path = self.write("[tcpd]\nenabled = true\n")
        self.assertEqual(tcp_listen(load_config(path, None, {})), DEFAULT_TCP_LISTEN)


class RelativePathTests(ConfigFileMixin, SynchronousTestCase):
    """
    A relative file name in a configuration file is relative to the file's
    directory, wherever ipcd is started; on the command line, to the
    working directory, as any command's.
    """

    def test_relativeToTheFile(self) -> None:
        path = self.write(
            'rundir = "run"\n[tlsd]\npsk_file = "psk"\ncertificate = "tls/a.pem"\n'
            'key = "/etc/ipcd/a.key"\ntrust_roots = ""\n'
            '[websocketd]\nca = "../ca.pem"\n'
        )
        here = os.path.dirname(os.path.abspath(path))
        config = load_config(path, None, {})
        tlsd = config.daemons["tlsd"]
        self.assertEqual(config.rundir, os.path.join(here, "run"))
        self.assertEqual(tlsd["psk_file"], os.path.join(here, "psk"))
        self.assertEqual(tlsd["certificate"], os.path.join(here, "tls/a.pem"))
        self.assertEqual(tlsd["key"], "/etc/ipcd/a.key")
        self.assertEqual(tlsd["trust_roots"], "")  # none, said in the file, stays none
        self.assertEqual(
            config.daemons["websocketd"]["ca"], os.path.join(here, "../ca.pem")
        )

    def test_commandLineAsGiven(self) -> None:
        path = self.write('[tlsd]\npsk_file = "psk"\n')
        overrides = {"rundir": "run", "tlsd": {"psk_file": "mine"}}
        config = load_config(path, overrides, {})
        self.assertEqual(config.daemons["tlsd"]["psk_file"], "mine")
        self.assertEqual(config.rundir, os.path.join(os.getcwd(), "run"))


class OperatorFormsTests(ConfigFileMixin, SynchronousTestCase):
    """
    The listener strings operators write, in every form Twisted's parsers
    take (by name and by position, each option), load from a file for
    every listener key: the checks made at load refuse none of them.
    """

    def test_operatorFormsLoad(self) -> None:
        key, cert = "/etc/ipcd/key.pem", "/etc/ipcd/cert.pem"
        tcp = (
            "tcp:9000:interface=127.0.0.1",
            "tcp:port=9000:interface=127.0.0.1:backlog=100",
            "tcp:9000:127.0.0.1:64",
            r"tcp:9000:interface=\:\:1",
            "tcp:9000:interface=localhost",
            r"tcp6:9000:interface=\:\:1",
            r"tcp6:9000:20:\:\:1",
            r"tcp6:port=9000:backlog=5:interface=fe80\:\:1%lo",
            "tcp6:9000:interface=127.0.0.1",
            "systemd:domain=INET:index=0",
            "systemd:domain=INET6:index=1",
            "systemd:domain=INET:name=tcpd",
            "systemd:INET:0",
        )
        tls = (
            f"ssl:8443:privateKey={key}:certKey={cert}:interface=0.0.0.0",
            f"ssl:8443:privateKey={key}:certKey={cert}:"
            f"interface=127.0.0.1:backlog=50:extraCertChain=/etc/ipcd/chain.pem:"
            "dhParameters=/etc/ipcd/dh.pem",
            f"ssl:8443:{key}:{cert}:interface=127.0.0.1:backlog=50",
            "tls:/etc/ipcd/pems:port=8443:interface=127.0.0.1",
            r"tls:/etc/ipcd/pems:8443:20:\:\:1",
        )
        unix = (
            "unix:/run/ipcd/ws.sock:mode=660:lockfile=1:backlog=10",
            "unix:address=/run/ipcd/ws.sock:mode=0600:lockfile=0",
            "systemd:domain=UNIX:index=0",
            "ipc:wsd:rundir=/run/libipc:mode=0660:backlog=64:group=wheel",
        )
        for section, forms in (
            ("tcpd", tcp + unix),  # (a TLS one refused: ErrorTests)
            ("tlsd", tcp + unix),
            ("websocketd", tcp + tls + unix),
            ("metrics", tcp + tls),
        ):
            for listen in (*forms, *(f"haproxy:{form}" for form in forms)):
                text = f"[{section}]\nlisten = '{listen}'\n"
                config = load_config(self.write(text), None, {})
                if section == "tcpd":
                    self.assertEqual(tcp_listen(config), listen)


class DocumentedExampleTests(ConfigFileMixin, SynchronousTestCase):
    def test_exampleLoads(self) -> None:
        """docs/configuration.rst's example loads on any system, as written."""
        docs = os.path.join(REPO, "docs", "configuration.rst")
        with open(docs, encoding="utf-8") as f:
            text = f.read()
        example = text.split("\nExample\n-------\n", 1)[1]
        block = example.split(".. code-block:: toml\n", 1)[1]
        block = block.split("\nCommand line\n", 1)[0]
        toml = "\n".join(line[4:] for line in block.splitlines())
        config = load_config(self.write(toml), None, {})
        self.assertEqual(config.rundir, "/run/libipc")
        self.assertEqual(config.routes["echo"], parse_uri("unix://pong"))

    def test_everySnippetLoads(self) -> None:
        """
        Every TOML block of the docs (literal or C{code-block:: toml}) loads
        as written: each is what a reader pastes into ipcd.toml.
        """
        found = 0
        for page in CONFIG_PAGES:
            with open(os.path.join(REPO, "docs", f"{page}.rst"), encoding="utf-8") as f:
                for block in toml_blocks(f.read()):
                    found += 1
                    try:
                        load_config(self.write(block), None, {})
                    except ConfigError as e:
                        self.fail(f"docs/{page}.rst:\n{block}\n{e}")
        self.assertGreaterEqual(found, 10)


# The pages whose TOML blocks are configuration a reader pastes.
CONFIG_PAGES = ("configuration", "securing", "operations-metrics", "operations-dns")


def toml_blocks(rst: str) -> list[str]:
    """The literal and C{code-block:: toml} blocks of C{rst} that are TOML."""
    blocks = []
    lines = rst.splitlines()
    i = 0
    while i < len(lines):
        opens = lines[i].rstrip().endswith("::") or lines[i] == ".. code-block:: toml"
        i += 1
        if not opens:
            continue
        body = []
        while i < len(lines) and (not lines[i].strip() or lines[i][0] == " "):
            body.append(lines[i])
            i += 1
        block = textwrap.dedent("\n".join(body)).strip("\n")
        # A table header or a key = value, after any leading comments.
        if re.match(r"(#.*\n)*(\[[\w.]+\]\n\w+ = |\w+ = )", block):
            blocks.append(block)
    return blocks


class RouteSchemeTests(ConfigFileMixin, SynchronousTestCase):
    """An admin route's scheme is checked when the configuration loads."""

    def test_unknownScheme(self) -> None:
        self.assertEqual(
            self.error('[routes]\nfar = "http://example.net:80/far"\n'),
            "[routes] far: no transport for scheme 'http' (known: tcp, tls, udp, "
            "unix, ws, wss; another needs an external daemon in [ipcd] "
            "external_daemons)",
        )

    def test_unknownSchemeFromCommandLine(self) -> None:
        """A command-line route's bad scheme says it came from there."""
        error = self.assertRaises(
            ConfigError,
            load_config,
            None,
            {"routes": {"far": "http://example.net:80/far"}},
            {},
        )
        self.assertTrue(
            str(error).startswith("command line: [routes] far: no transport"),
            str(error),
        )

    def test_externalDaemonScheme(self) -> None:
        path = self.write(
            '[ipcd]\nexternal_daemons = ["quic"]\n'
            '[routes]\nfar = "quic://example.net:9/far"\n'
        )
        config = load_config(path, None, {})
        self.assertEqual(config.routes["far"].scheme, "quic")
        self.assertIn("quic", config.schemes())


class ErrorTests(ConfigFileMixin, SynchronousTestCase):
    def test_sslMethodRefused(self) -> None:
        """
        An C{ssl:} listener's C{sslmethod=} is refused, by name or by
        position: given one, Twisted sets no minimum TLS version (its own is
        TLS 1.2), so C{TLSv1_METHOD} made websocketd's listener speak TLS
        1.0 only, and a name OpenSSL has not failed at start in Python's
        words.
        """
        files = "privateKey=/etc/ipcd/key.pem:certKey=/etc/ipcd/cert.pem"
        for listen in (
            f"ssl:8443:{files}:sslmethod=TLSv1_METHOD",
            f"ssl:8443:{files}:sslmethod=TLS_METHOD",
            f"ssl:8443:{files}:sslmethod=NO_SUCH_METHOD",
            "ssl:8443:/etc/ipcd/key.pem:/etc/ipcd/cert.pem:TLSv1_METHOD",
        ):
            method = listen.rpartition(":")[2].partition("=")[2] or "TLSv1_METHOD"
            self.listener_refused(
                listen,
                f"sslmethod={method!r}: leave it out (with it Twisted sets no "
                "minimum TLS version; without, TLS 1.2 at the least)",
                sections=("websocketd",),
            )

    def test_ipcListenerNotAtIpcdsNames(self) -> None:
        """
        A daemon's C{ipc:} listener in RUNDIR at a name ipcd listens at
        itself is refused at load, saying whose: the start failed saying
        "another process is listening", which was ipcd.  Elsewhere, or
        once the other is off, it is taken.
        """
        whose = {
            "ipc:pong": "'pong' in RUNDIR is pongd's socket",
            "ipc:ipc": "'ipc' in RUNDIR is ipcd's lookup socket",
            "ipc:tcp": "'tcp' in RUNDIR is the socket of the tcp:// routes' daemon",
            "haproxy:ipc:wss": "'wss' in RUNDIR is the socket of the wss://",
        }
        for listen, said in whose.items():
            error = self.error(f"[tcpd]\nlisten = '{listen}'\n")
            self.assertIn(f"[tcpd] listen: {listen!r}: {said}", error)
        error = self.error(
            "[tcpd]\nlisten = 'ipc:in'\n[websocketd]\nlisten = 'ipc:in'\n"
        )
        self.assertIn(
            "[websocketd] listen: 'ipc:in': 'in' in RUNDIR is [tcpd]'s listener",
            error,
        )
        error = self.assertRaises(
            ConfigError, load_config, None, {"tcpd": {"listen": "ipc:pong"}}, {}
        )
        self.assertIn("command line: [tcpd] listen: 'ipc:pong'", str(error))
        for taken in (
            {"tcpd": {"listen": "ipc:pong"}, "pongd": {"enabled": False}},
            {"tcpd": {"listen": "ipc:pong:rundir=/run/elsewhere"}},
            {"tcpd": {"listen": "ipc:tcpd-in"}},
        ):
            config = load_config(None, taken, {})
            self.assertEqual(config.daemons["tcpd"]["listen"], taken["tcpd"]["listen"])

    def test_notANumber(self) -> None:
        """The message names file, key, expectation and the value."""
        self.assertEqual(
            self.error('[ipcd]\nlookup_timeout = "x"\n'),
            "[ipcd] lookup_timeout: expected a number of seconds greater than 0 "
            "and at most 604800 (a week), got 'x'",
        )

    def test_notPositive(self) -> None:
        self.assertEqual(
            self.error("[ipcd]\nconnect_timeout = 0\n"),
            "[ipcd] connect_timeout: expected a number of seconds greater than 0 "
            "and at most 604800 (a week), got 0",
        )
        self.assertIn(
            "(a week), got -1.5",
            self.error("[tcpd]\nhandshake_timeout = -1.5\n"),
        )

    def test_websocketdMessageBounds(self) -> None:
        """websocketd's bounds on one message: errors name the key and the range."""
        self.assertEqual(
            self.error("[websocketd]\nmax_message_frames = 0\n"),
            "[websocketd] max_message_frames: expected a whole number greater "
            "than 0, got 0",
        )
        self.assertEqual(
            self.error('[websocketd]\nmessage_timeout = "1m"\n'),
            "[websocketd] message_timeout: expected a number of seconds greater "
            "than 0 and at most 604800 (a week), got '1m'",
        )

    def test_websocketdMaxConnections(self) -> None:
        """0 is taken (no limit), so the error says so, not "greater than 0"."""
        load_config(self.write("[websocketd]\nmax_connections = 0\n"), None, {})
        self.assertEqual(
            self.error("[websocketd]\nmax_connections = -1\n"),
            "[websocketd] max_connections: expected a whole number, 0 or more "
            "(0: no limit), got -1",
        )

    def test_secondsAtMostAWeek(self) -> None:
        """
        Every number of seconds, ipcd's and each protocol daemon's, is at
        most a week: 1e300 was taken (a timer for never), and an integer
        beyond a float (TOML's have no bound) made a traceback
        (OverflowError: int too large to convert to float).
        """
        huge = "9" * 400
        keys = [
            (section, key)
            for section, table in _SCHEMA.items()
            for key, (check, _attribute) in table.items()
            if check in (positive_number, non_negative_number)
        ]
        keys += [
            (daemon.section, setting.key)
            for daemon in default_registry().values()
            for setting in daemon.settings
            if setting.check in (positive_number, non_negative_number)
        ]
        self.assertGreater(len(keys), 15)  # 19 today
        for section, key in keys:
            at = f"[{section}]\n" if section else ""
            load_config(self.write(f"{at}{key} = 604800\n"), None, {})
            for value in ("604800.5", "1e300", huge):
                message = self.error(f"{at}{key} = {value}\n")
                self.assertIn(f"{key}: expected a number of seconds", message)
                self.assertIn("at most 604800 (a week), got ", message)

    def test_boolIsNotANumber(self) -> None:
        self.assertIn("got true", self.error("[ipcd]\nlookup_timeout = true\n"))

    def test_notBoolean(self) -> None:
        self.assertEqual(
            self.error('[pongd]\nenabled = "yes"\n'),
            "[pongd] enabled: expected true or false, got 'yes'",
        )

    def test_topLevel(self) -> None:
        self.assertEqual(
            self.error("max_message_size = 1.5\n"),
            "max_message_size: expected a whole number greater than 0, got 1.5",
        )
        self.assertEqual(
            self.error('rundir = ""\n'),
            "rundir: expected a non-empty string, got ''",
        )

    def test_rundirNormalised(self) -> None:
        """
        RUNDIR is taken absolute, without C{.}, C{//} or a trailing slash,
        wherever it is given; with C{..}, or relative in C{$RUNDIR}, a
        one-line error.  (Relative in a file or on the command line, it is
        taken from the file's directory or the working directory:
        L{RelativePathTests}.)
        """
        for given in ("/run//ipc/", "/run/./ipc", "//run/ipc/.", "/run/ipc"):
            self.assertEqual(
                load_config(None, {"rundir": given}, {}).rundir, "/run/ipc"
            )
            self.assertEqual(
                load_config(None, None, {"RUNDIR": given}).rundir, "/run/ipc"
            )
        self.assertEqual(
            self.error('rundir = "/run/../ipc"\n'),
            "rundir: '/run/../ipc' has a '..' component: give the path without it",
        )
        for overrides, environ, where in [
            ({"rundir": "a/../b"}, {}, "command line"),
            (None, {"RUNDIR": "x"}, "environment variable RUNDIR"),
        ]:
            error = self.assertRaises(
                ConfigError, load_config, None, overrides, environ
            )
            self.assertTrue(str(error).startswith(f"{where}: rundir: "), error)

    def test_badEndpoint(self) -> None:
        message = self.error('[tcpd]\nlisten = "9000"\n')
        self.assertTrue(message.startswith("[tcpd] listen: expected an endpoint"))
        self.assertIn("got '9000'", message)

    def test_unknownEndpointType(self) -> None:
        """
        An endpoint type Twisted does not know is refused when the config
        loads (not when tcpd listens), naming the types it knows.
        """
        error = self.assertRaises(
            ConfigError, load_config, None, {"tcpd": {"listen": "foo:bar"}}, {}
        )
        message = str(error)
        self.assertTrue(
            message.startswith(
                "command line: [tcpd] listen: unknown endpoint type 'foo' in "
                "'foo:bar' (known: "
            ),
            message,
        )
        # Built-in types and plugins (ipcd's own ipc:) are both listed.
        self.assertIn("tcp", message)
        self.assertIn("ipc", message)
        self.assertNotIn("\n", message)

    def test_stdioIsNoListener(self) -> None:
        """
        C{stdio:} serves ipcd's own standard input, not peers: refused when
        the config loads, and not offered among the types a listener may
        be (as a listener it failed at start with "'PipeAddress' object has
        no attribute 'host'").
        """
        error = self.assertRaises(
            ConfigError, load_config, None, {"tcpd": {"listen": "stdio:"}}, {}
        )
        self.assertEqual(
            str(error),
            "command line: [tcpd] listen: 'stdio:' is no listener (it is ipcd's "
            "own standard input and output): give an endpoint peers connect to",
        )
        # Nor behind Twisted's haproxy: wrapper.
        error = self.assertRaises(
            ConfigError, load_config, None, {"tcpd": {"listen": "haproxy:stdio:"}}, {}
        )
        self.assertIn("'haproxy:stdio:' is no listener", str(error))
        error = self.assertRaises(
            ConfigError, load_config, None, {"tcpd": {"listen": "foo:bar"}}, {}
        )
        self.assertNotIn("stdio", str(error))

    def test_autobahnIsNoListener(self) -> None:
        """
        autobahn's C{autobahn:} endpoint (installed with autobahn, which
        websocketd needs) wraps its listener in WebSocket framing, which no
        ipcd listener speaks, and the listener it wraps was never checked:
        refused when the config loads, for every listener.  It was taken:
        tcpd on C{autobahn:tcp\\:...:url=...} answered its peers nothing,
        logged nothing, and C{tcp\\:\u0661\u0669\u0660\u0660\u0660} in it listened on
        port 19000, backlog 50.
        """
        inner = "tcp\\:\u0661\u0669\u0660\u0660\u0660\\:interface\\=127.0.0.1"
        for listen in (
            f"autobahn:{inner}:url=ws\\://localhost\\:19000",
            "haproxy:autobahn:tcp\\:9000:url=ws\\://localhost\\:9000",
            "AutoBahn:tcp\\:9000:url=ws\\://localhost\\:9000",
        ):
            for section in ("tcpd", "tlsd", "websocketd", "metrics"):
                error = self.assertRaises(
                    ConfigError, load_config, None, {section: {"listen": listen}}, {}
                )
                self.assertEqual(
                    str(error),
                    f"command line: [{section}] listen: {listen!r}: autobahn: "
                    "wraps its listener in WebSocket framing, which no ipcd "
                    "listener speaks (websocketd serves WebSockets itself): "
                    "write the listener it wraps",
                )

    def test_systemdArgumentsChecked(self) -> None:
        """
        A C{systemd:} listener names its socket's family (C{INET},
        C{INET6} or C{UNIX}, as Twisted reads it: C{AF_} and the word) and
        the socket, by index or by name, one of them: else refused when the
        config loads.  They were taken, and ipcd's start failed in Python's
        words (C{TypeError: _SystemdParser._parseServer() missing 1
        required positional argument: 'domain'}, C{ValueError: Specify
        exactly one of descriptor index or name}, C{AttributeError: module
        'socket' has no attribute 'AF_inet'}), or a reload took them.
        """
        for listen, reason in (
            ("systemd:index=0", "no domain= (INET, INET6 or UNIX)"),
            ("systemd:name=tcpd", "no domain= (INET, INET6 or UNIX)"),
            ("systemd:domain=inet:index=0", "domain 'inet' is not INET, INET6 or UNIX"),
            ("systemd:domain=FOO:name=x", "domain 'FOO' is not INET, INET6 or UNIX"),
            ("systemd:domain=PACKET:index=0", "domain 'PACKET' is not INET, INET6"),
            ("systemd:domain=", "domain '' is not INET, INET6 or UNIX"),
            ("systemd:domain=INET", "neither index= nor name= (one of them)"),
            ("systemd:INET", "neither index= nor name= (one of them)"),
            ("systemd:domain=UNIX:index=0:name=x", "both index= and name="),
            ("systemd:INET:0:x", "both index= and name="),
            ("haproxy:systemd:domain=INET6", "neither index= nor name="),
        ):
            self.listener_refused(listen, reason)
        for listen in (
            "systemd:domain=INET:index=0",
            "systemd:domain=INET6:name=tcpd",
            "systemd:UNIX:0",
            "haproxy:systemd:domain=UNIX:name=tcpd",
        ):
            config = load_config(None, {"tcpd": {"listen": listen}}, {})
            self.assertEqual(config.daemons["tcpd"]["listen"], listen)

    def test_interfaceAsWritten(self) -> None:
        """
        An interface that a socket's bind reads as another IPv4 address
        than it writes (inet_aton's short, octal and hex forms) is refused,
        saying that address: C{tcp:9000:interface=0} listened on 0.0.0.0,
        every address, and C{interface=010.0.0.1} is 8.0.0.1; so is an
        IPv4-mapped IPv6 one (C{tcp6:9000:interface=::ffff:0:0} listened on
        every IPv4 address: a connect to 127.0.0.1 reached it).
        """
        for listen, reason in (
            ("tcp:9000:interface=0", "interface '0' is 0.0.0.0 as a socket"),
            ("tcp:9000:interface=127.1", "interface '127.1' is 127.0.0.1 as"),
            ("tcp:9000:interface=010.0.0.1", "interface '010.0.0.1' is 8.0.0.1"),
            ("tcp:9000:interface=0x7f.1", "interface '0x7f.1' is 127.0.0.1"),
            ("ssl:443:privateKey=/k:interface=0", "interface '0' is 0.0.0.0"),
            ("haproxy:tcp6:9000:interface=0", "interface '0' is 0.0.0.0"),
            ("tls:/d:443:interface=2130706433", "interface '2130706433' is 127"),
            # IPv4-mapped: '::ffff:0:0' listened on every IPv4 address.
            (
                "tcp6:9000:interface=\\:\\:ffff\\:0\\:0",
                "interface '::ffff:0:0' is the IPv4 address 0.0.0.0 as a socket",
            ),
            (
                "tls:/d:443:interface=\\:\\:FFFF\\:127.0.0.1",
                "interface '::FFFF:127.0.0.1' is the IPv4 address 127.0.0.1",
            ),
        ):
            self.listener_refused(listen, reason, ("tcpd", "websocketd"))
        for listen in (
            "tcp:9000:interface=127.0.0.1",
            "tcp:9000:interface=0.0.0.0",
            "tcp:9000:interface=localhost",
            "tcp:9000:interface=host-0x7f.1",
            "tcp6:9000:interface=\\:\\:1",
            "tcp6:9000:interface=\\:\\:",
        ):
            config = load_config(None, {"tcpd": {"listen": listen}}, {})
            self.assertEqual(config.daemons["tcpd"]["listen"], listen)

    def test_unixPathAbsolute(self) -> None:
        """
        A C{unix:} listener's path is absolute: a relative one (C{@name}
        too, which Twisted takes for no abstract name) was bound in ipcd's
        working directory, its lock file beside it, and an abstract one (a
        NUL first, from a file) had no mode to say who may connect: any
        local user named any address behind C{haproxy:unix:}.  Refused when
        the configuration loads, from a file and the command line.
        """
        reason = "is not absolute"
        for listen in (
            "unix:tcpd.sock",
            "unix:./tcpd.sock",
            "unix:@tcpd",
            "unix:address=run/tcpd.sock:mode=600",
            "haproxy:unix:tcpd.sock",
        ):
            path = listen.rpartition("unix:")[2].removeprefix("address=")
            path = path.partition(":")[0]
            self.listener_refused(
                listen, f"socket path {path!r} {reason}", ("tcpd", "websocketd")
            )
        error = self.assertRaises(
            ConfigError, load_config, None, {"tcpd": {"listen": "unix:\0tcpd"}}, {}
        )
        self.assertIn(f"socket path '\\x00tcpd' {reason}", str(error))
        self.assertTrue(str(error).isprintable(), str(error))

    def test_backlogAndModeBounded(self) -> None:
        """
        A backlog is at most what listen() takes (a C int), and a C{unix:}
        mode is permission bits (at most 777, as C{ipc:}'s): taken, a larger
        backlog stopped the start in Python's words (C{signed integer is
        greater than maximum}), a mode of C{77777} made a socket of mode
        7777 (anyone may connect), and a longer one C{Python int too large
        to convert to C int}.
        """
        backlog = "backlog 2147483648 is more than listen() takes (2147483647)"
        mode = "is more than permission bits (0-777)"
        for listen, reason in (
            ("tcp:9000:backlog=2147483648", backlog),
            ("tcp:9000:127.0.0.1:2147483648", backlog),
            (r"tcp6:9000:backlog=2147483648:interface=\:\:1", backlog),
            ("tls:/d:443:backlog=2147483648", backlog),
            ("ssl:443:privateKey=/k:backlog=2147483648", backlog),
            ("unix:/run/t.sock:backlog=2147483648", backlog),
            ("unix:/run/t.sock:mode=77777", f"mode 77777 {mode}"),
            ("unix:/run/t.sock:mode=1777", f"mode 1777 {mode}"),
            ("unix:/run/t.sock:" + "7" * 22, f"mode {'7' * 22} {mode}"),
        ):
            self.listener_refused(listen, reason, ("tcpd", "websocketd"))
        for listen in (
            "tcp:9000:backlog=2147483647",
            "unix:/run/t.sock:mode=777:backlog=2147483647",
            "unix:/run/t.sock:0000",
        ):
            config = load_config(None, {"tcpd": {"listen": listen}}, {})
            self.assertEqual(config.daemons["tcpd"]["listen"], listen)

    def test_badEndpointArguments(self) -> None:
        """The built-in tcp and unix parsers check their arguments too."""
        self.assertEqual(
            self.error('[tcpd]\nlisten = "tcp:x"\n'),
            "[tcpd] listen: invalid endpoint 'tcp:x': 'x' is not a whole number",
        )
        self.assertEqual(
            self.error("[metrics]\nlisten = 99999\n"),
            "[metrics] listen: invalid endpoint 'tcp:99999:interface=127.0.0.1': "
            "port 99999 is not 0 to 65535",
        )
        self.assertEqual(
            self.error('[tcpd]\nlisten = "tcp:9000:colour=red"\n'),
            "[tcpd] listen: invalid endpoint 'tcp:9000:colour=red': got an "
            "unexpected keyword argument 'colour'",
        )

    def test_unescapedColon(self) -> None:
        """
        An IPv6 address's colons must be escaped: the message says how, with
        the string that would do, for tcp, for Twisted's tcp6 plugin (it
        passed the check and failed at start quoting Python's TypeError),
        and inside Twisted's haproxy wrapper.
        """
        for listen, fixed in (
            ("tcp:9000:interface=::1", r"tcp:9000:interface=\:\:1"),
            ("tcp6:9000:interface=::2", r"tcp6:9000:interface=\:\:2"),
            (
                "haproxy:tcp6:9000:interface=fe80::1%lo:backlog=5",
                r"haproxy:tcp6:9000:interface=fe80\:\:1%lo:backlog=5",
            ),
        ):
            self.assertEqual(
                self.error(f"[tcpd]\nlisten = '{listen}'\n"),
                f"[tcpd] listen: invalid endpoint '{listen}': a ':' inside a "
                f"value is written '\\:' (write '{fixed}')",
            )
            load_config(None, {"tcpd": {"listen": fixed}}, {})
        # None does (a port after the address): the rule, as an example.
        self.assertEqual(
            self.error("[tcpd]\nlisten = 'tcp6:interface=::1:9000'\n"),
            "[tcpd] listen: invalid endpoint 'tcp6:interface=::1:9000': got "
            "multiple values for argument 'interface' (a ':' inside a value is "
            "written '\\:', as in interface=\\:\\:1)",
        )

    def test_colonAtTheEnd(self) -> None:
        """
        A ':' at the end is an empty argument (tcp6's backlog of ''): the
        string suggested leaves it out, colons escaped or not; it suggested
        escaping it into the address (C{interface=\\:\\:1\\:}), which the
        check took and which failed at start.
        """
        for listen, how, fixed in (
            (
                r"tcp6:0:interface=\:\:1:",
                "a ':' at the end is an empty argument",
                r"tcp6:0:interface=\:\:1",
            ),
            (
                "tcp6:0:interface=::1:",
                "a ':' inside a value is written '\\:', and a ':' at the end is "
                "an empty argument",
                r"tcp6:0:interface=\:\:1",
            ),
            (
                "tcp:0:interface=127.0.0.1::",
                "a ':' at the end is an empty argument",
                "tcp:0:interface=127.0.0.1",
            ),
        ):
            self.assertEqual(
                self.error(f"[tcpd]\nlisten = '{listen}'\n"),
                f"[tcpd] listen: invalid endpoint {listen!r}: {how} (write '{fixed}')",
            )
            load_config(None, {"tcpd": {"listen": fixed}}, {})
        # An address with a ':' that is no IPv6 one: Twisted takes it for
        # an IPv4 host name, found at start (no such name).
        listen = r"tcp6:0:interface=\:\:1\:"
        self.assertEqual(
            self.error(f"[tcpd]\nlisten = '{listen}'\n"),
            f"[tcpd] listen: invalid endpoint {listen!r}: "
            "interface '::1:' is no IPv6 address",
        )
        # A suggestion is shown as written: none where that is not one line.
        listen = "tcp6:0:interface=::1:backlog=5\n"  # (int() takes "5\n")
        self.assertEqual(
            self.error('[tcpd]\nlisten = "tcp6:0:interface=::1:backlog=5\\n"\n'),
            f"[tcpd] listen: invalid endpoint {listen!r}: got multiple values for "
            "argument 'interface' (a ':' inside a value is written '\\:', as in "
            "interface=\\:\\:1)",
        )

    def test_emptyArgument(self) -> None:
        """
        An empty argument by position (a ':' too many) is refused: for tcp
        it was an interface of '', every address, so that a metrics
        listener of 'tcp:9101:' was served on every address where
        'tcp:9101' is on 127.0.0.1 only.
        """
        self.assertEqual(
            self.error("[metrics]\nlisten = 'tcp:9101:'\n"),
            "[metrics] listen: invalid endpoint 'tcp:9101:': a ':' at the end is "
            "an empty argument (write 'tcp:9101')",
        )
        self.assertEqual(
            load_config(None, {"metrics": {"listen": "tcp:9101"}}, {}).metrics,
            "tcp:9101:interface=127.0.0.1",
        )
        for listen in ("tcp:9000::backlog=5", "haproxy:tcp:9000::5"):
            self.assertEqual(
                self.error(f"[tcpd]\nlisten = '{listen}'\n"),
                f"[tcpd] listen: invalid endpoint '{listen}': an empty argument "
                "(a ':' too many)",
            )

    def test_nothingToListenOn(self) -> None:
        """
        Strings that name nothing to listen on are refused when the
        configuration loads, for every listener key, naming what is
        missing: they passed, and failed at start (haproxy: with nothing
        after it), or failed there leaving C{.lock} in ipcd's working
        directory (a unix: listener with no path), or listened where the
        string did not say (tls: with no directory: the working
        directory's PEM files on every address's port 443; tcp6 with an
        empty interface: IPv4's every address).
        """
        wraps_nothing = "wraps no listener: write one after 'haproxy:' (haproxy:tcp:"
        no_path = "no socket path (unix:/run/ipcd/NAME.sock)"
        for listen, reason in (
            ("haproxy:", f"'haproxy:' {wraps_nothing}9000:interface=127.0.0.1)"),
            ("haproxy:haproxy:", f"'haproxy:haproxy:' {wraps_nothing}"),
            ("haproxy:unix:", f"invalid endpoint 'haproxy:unix:': {no_path}"),
            ("unix:", f"invalid endpoint 'unix:': {no_path}"),
            ("unix:address=", no_path),
            ("unix::mode=660", f"invalid endpoint 'unix::mode=660': {no_path}"),
            (
                "tls:",
                "invalid endpoint 'tls:': no directory of PEM files "
                "(tls:DIRECTORY:port=N)",
            ),
            (
                "tcp6:9000:interface=",
                "an empty interface= is IPv4's every address (IPv6's is "
                "interface=\\:\\:)",
            ),
            ("haproxy:foo:1", "unknown endpoint type 'foo' in 'haproxy:foo:1'"),
        ):
            for section in ("tcpd", "tlsd", "websocketd", "metrics"):
                error = self.assertRaises(
                    ConfigError, load_config, None, {section: {"listen": listen}}, {}
                )
                message = str(error)
                self.assertTrue(
                    message.startswith(f"command line: [{section}] listen: "), message
                )
                self.assertIn(reason, message)
                self.assertNotIn("\n", message)
        # What each names, given: taken.
        for listen in (
            "haproxy:tcp:9000",
            "unix:/run/ipcd/tcpd.sock",
            r"unix:/run/ipcd/\:",  # a socket named ':' (a relative one: refused)
            r"tcp6:9000:interface=\:\:",
            "tcp:9000:interface=",  # tcp's default: IPv4's every address
        ):
            config = load_config(None, {"tcpd": {"listen": listen}}, {})
            self.assertEqual(tcp_listen(config), listen)
        # (A TLS listener is websocketd's: tcpd and tlsd refuse one.)
        load_config(
            None, {"websocketd": {"listen": "tls:/etc/ipcd/pems:port=8443"}}, {}
        )

    def test_tlsAndSslArguments(self) -> None:
        """
        Twisted's tls: listener (a directory of PEM files, by SNI) and its
        ssl: one have their arguments checked as tcp6's are, without
        reading a file or directory (they failed at start).
        """
        for listen, reason in (
            ("tls:/d:port=99999", "port 99999 is not 0 to 65535"),
            ("tls:/d:x", "'x' is not a whole number"),
            ("tls:/d:colour=red", "got an unexpected keyword argument 'colour'"),
            ("tls:/d:443:port=443", "got multiple values for argument 'port'"),
            ("tls:/d:1:2:3:4", "takes at most 4 arguments (path, port, backlog, "),
            (r"tls:/d:interface=1.2.3.4\:", "interface '1.2.3.4:' is no IPv6"),
            ("ssl:x:privateKey=/k", "'x' is not a whole number"),
            ("ssl:99999", "port 99999 is not 0 to 65535"),
            ("ssl:0:colour=red", "got an unexpected keyword argument 'colour'"),
            ("ssl:privateKey=/k", "missing 1 required positional argument: 'port'"),
            (r"ssl:0:interface=1.2.3.4\:", "interface '1.2.3.4:' is no IPv6"),
        ):
            self.assertIn(
                f"[tcpd] listen: invalid endpoint {listen!r}: {reason}",
                self.error(f"[tcpd]\nlisten = '{listen}'\n"),
            )

    def test_numbersInAsciiDigits(self) -> None:
        """
        Every number of a listener string is plain ASCII digits (ipcd's own
        ipc: said so only at start: it is checked at load too), and an
        interface is ASCII: Twisted reads the numbers with int(), which
        took other scripts' digits ('tcp:\u0669\u0660\u0660\u0660' listened on
        9000), a sign (a systemd index of -1 is the last socket passed),
        '_', spaces and, in a mode, '0o'; and Python bound an interface
        after IDNA's mapping ('\uff11\uff12\uff17.0.0.1' is 127.0.0.1).
        Refused when the configuration loads, naming the argument and its
        value, from a file and from the command line, for every listener.
        """
        digits, octal = "is not digits 0-9 only", "is not digits 0-7 (octal) only"
        for listen, reason in (
            (
                "tcp:\u0669\u0660\u0660\u0660",
                f"port '\u0669\u0660\u0660\u0660' {digits}",
            ),
            (
                "tcp:\uff19\uff10\uff10\uff10",
                f"port '\uff19\uff10\uff10\uff10' {digits}",
            ),
            ("tcp:+9000", f"port '+9000' {digits}"),
            ("tcp:9_000", f"port '9_000' {digits}"),
            ("tcp: 9000", f"port ' 9000' {digits}"),
            ("tcp:9000:backlog=\u0665\u0660", f"backlog '\u0665\u0660' {digits}"),
            ("tcp:9000:127.0.0.1:+50", f"backlog '+50' {digits}"),
            (r"tcp6:port=9_000:interface=\:\:1", f"port '9_000' {digits}"),
            ("haproxy:tcp6:9000:backlog=-0", f"backlog '-0' {digits}"),
            (
                "tls:/d:port=\u0669\u0660\u0660\u0660",
                f"port '\u0669\u0660\u0660\u0660' {digits}",
            ),
            ("tls:/d:443: 50", f"backlog ' 50' {digits}"),
            ("ssl:+443:privateKey=/k", f"port '+443' {digits}"),
            ("ssl:443:backlog=5_0", f"backlog '5_0' {digits}"),
            (
                "unix:/run/t.sock:mode=\u0666\u0666\u0660",
                f"mode '\u0666\u0666\u0660' {octal}",
            ),
            ("unix:/run/t.sock:mode=0o660", f"mode '0o660' {octal}"),
            ("unix:/run/t.sock:660:+5", f"backlog '+5' {digits}"),
            ("unix:/run/t.sock:lockfile=\u0661", f"lockfile '\u0661' {digits}"),
            ("systemd:domain=INET:index=\u0660", f"index '\u0660' {digits}"),
            ("systemd:domain=INET:index=-1", f"index '-1' {digits}"),
            ("haproxy:systemd:INET:+0", f"index '+0' {digits}"),
            (
                "ipc:wsd:mode=\u0666\u0666\u0660",
                "ipc: mode: expected an octal number, got '\u0666\u0666\u0660'",
            ),
            ("haproxy:ipc:wsd:backlog=+5", "ipc: backlog: expected a number, got '+5'"),
            (
                "tcp:9000:interface=\uff11\uff12\uff17.0.0.1",
                "interface '\uff11\uff12\uff17.0.0.1' is not ASCII (an address is "
                "written in ASCII digits; a host name in its xn-- form)",
            ),
            (
                "tcp:9000:interface=127\u30020\u30020\u30021",
                "interface '127\u30020\u30020\u30021' is not",
            ),
        ):
            self.listener_refused(listen, reason, ("tcpd", "websocketd", "metrics"))
        # The same in plain digits: taken.
        for listen in (
            "tcp:9000",
            "tcp:09000:127.0.0.1:50",
            r"tcp6:port=9000:interface=\:\:1:backlog=0",
            "unix:/run/t.sock:0660:5:0",
            "unix:/run/t.sock:mode=777:lockfile=1",
            "systemd:domain=INET:index=10",
            "haproxy:systemd:INET:0",
            "tcp:9000:interface=localhost",
            "ipc:wsd:mode=0660:backlog=64",
        ):
            config = load_config(None, {"tcpd": {"listen": listen}}, {})
            self.assertEqual(tcp_listen(config), listen)
        for listen in ("tls:/d:443:50", "ssl:443:privateKey=/k:backlog=50"):
            load_config(None, {"websocketd": {"listen": listen}}, {})

    def test_tcp6Arguments(self) -> None:
        """
        Twisted's tcp6 plugin's arguments are checked when the configuration
        loads, as tcp's are (it is built, not listened on), wrapped in
        haproxy or not.
        """
        for listen, reason in (
            ("tcp6:9000:colour=red", "got an unexpected keyword argument 'colour'"),
            ("tcp6:x", "'x' is not a whole number"),
            ("tcp6:99999", "port 99999 is not 0 to 65535"),
            ("tcp6:port=70000", "port 70000 is not 0 to 65535"),
            (
                "haproxy:tcp:9000:colour=red",
                "got an unexpected keyword argument 'colour'",
            ),
        ):
            self.assertEqual(
                self.error(f"[tcpd]\nlisten = '{listen}'\n"),
                f"[tcpd] listen: invalid endpoint '{listen}': {reason}",
            )
        for listen in ("tcp6:9000:interface=\\:\\:1", "tcp6:port=9000:backlog=5"):
            config = load_config(None, {"tcpd": {"listen": listen}}, {})
            self.assertEqual(tcp_listen(config), listen)

    def test_pluginEndpointAccepted(self) -> None:
        """
        A plugin's type is accepted without building it (no reactor);
        Twisted's tcp6 and ipcd's own ipc: are built, with no reactor
        (test_tcp6Arguments, test_numbersInAsciiDigits).
        """
        for listen in ("systemd:domain=INET:index=0", "tcp6:9000", "ipc:tcpd-in"):
            config = load_config(None, {"tcpd": {"listen": listen}}, {})
            self.assertEqual(tcp_listen(config), listen)

    def test_builtInEndpointsScanNoPlugins(self) -> None:
        """
        Listeners of Twisted's built-in types (tcp, every default) are
        checked without scanning Twisted's plugins: that scan reads every
        C{dropin.cache} on C{sys.path}, and it was made once per listener
        at each reload (nine tenths of a reload's time, on the reactor).
        """
        import twisted.plugin
        from twisted.internet.interfaces import IStreamServerEndpointStringParser

        calls = calls_to(self, twisted.plugin, "getPlugins", lambda *a: a[0])

        def scans() -> int:
            return calls.count(IStreamServerEndpointStringParser)

        listen = {"listen": "tcp:9000:interface=127.0.0.1"}
        load_config(None, {"tcpd": listen, "websocketd": listen}, {})
        self.assertEqual(scans(), 0)
        # A plugin's type still is one, found by the scan.
        load_config(None, {"tcpd": {"listen": "tcp6:9000"}}, {})
        self.assertEqual(scans(), 1)

    def test_unknownGroup(self) -> None:
        self.assertEqual(
            self.error('[control]\ngroup = "nosuchgroup"\n'),
            "[control] group: no such group 'nosuchgroup' (create it, or name one "
            "that exists: getent group)",
        )

    def test_knownGroup(self) -> None:
        name = grp.getgrgid(os.getgid()).gr_name
        path = self.write(f'[control]\ngroup = "{name}"\n')
        self.assertEqual(load_config(path, None, {}).control_group, name)

    def test_unknownKey(self) -> None:
        message = self.error("[ipcd]\nlookup_timout = 3\n")
        self.assertTrue(message.startswith("[ipcd] lookup_timout: unknown key"))
        self.assertIn("lookup_timeout", message)

    def test_unknownTopLevelKey(self) -> None:
        message = self.error("bogus = 1\n")
        self.assertTrue(message.startswith("bogus: unknown key"), message)
        self.assertIn("rundir", message)

    def test_unknownSection(self) -> None:
        """A misspelt section lists the real sections among the known keys."""
        message = self.error("[ipdc]\nlookup_timeout = 3\n")
        self.assertTrue(message.startswith("ipdc: unknown key"), message)
        for name in ["ipcd", "pongd", "tcpd", "redirects", "routes", "rules", "grants"]:
            self.assertIn(name, message)

    def test_keyThatDoesNotPrint(self) -> None:
        """
        A quoted key may hold any character: one that does not print (a
        newline, a line separator) is shown escaped, as TOML quotes it, so
        that the error stays one line (the key was shown as it was: two
        lines, found by test_configfuzz); an empty key is shown quoted.
        """
        for text, where in (
            ('"a\\nb" = 1\n', '"a\\nb": unknown key (known: '),
            ('[tcpd]\n"\\r" = 1\n', '[tcpd] "\\r": unknown key (known: '),
            ('"x\\u2028y\\"" = 1\n', '"x\\u2028y\\"": unknown key (known: '),
            ('"" = 1\n', '"": unknown key (known: '),
            ('"é \\t" = 1\n', '"é \\t": unknown key (known: '),
            ('"é" = 1\n', "é: unknown key (known: "),
        ):
            message = self.error(text)
            self.assertTrue(message.startswith(where), (text, message))
            self.assertEqual(message.splitlines(), [message])
        message = self.error('[redirects]\n"a\\u2028b" = "x"\n')
        self.assertTrue(message.startswith('[redirects] "a\\u2028b": '), message)
        self.assertEqual(message.splitlines(), [message])

    def test_sectionNotATable(self) -> None:
        self.assertIn("[ipcd]", self.error("ipcd = 3\n"))

    def test_badRedirect(self) -> None:
        self.assertTrue(
            self.error('[redirects]\nauthd = "../etc"\n').startswith(
                "[redirects] authd: "
            )
        )
        self.assertTrue(
            self.error('[redirects]\n".x" = "b"\n').startswith("[redirects] .x: ")
        )
        self.assertIn(
            "expected a string, got 3", self.error("[redirects]\nauthd = 3\n")
        )

    def test_badRoute(self) -> None:
        message = self.error('[routes]\npong = "tcp://h:notaport/pong"\n')
        self.assertTrue(message.startswith("[routes] pong: "), message)
        self.assertIn("tcp://h:notaport/pong", message)

    def test_badRule(self) -> None:
        message = self.error('rules = ["allow sideways pong"]\n')
        self.assertTrue(message.startswith("rules[0]: "), message)
        self.assertIn("sideways", message)
        self.assertTrue(self.error("rules = [3]\n").startswith("rules[0]: expected"))
        self.assertTrue(self.error('rules = "x"\n').startswith("rules: expected"))

    def test_badToml(self) -> None:
        message = self.error("[ipcd\nlookup_timeout = 3\n")
        self.assertTrue(message.startswith("invalid TOML"), message)

    def test_nestedTooDeeply(self) -> None:
        """
        Arrays or inline tables nested some hundred deep: one line, not
        tomllib's RecursionError (found by test_configfuzz).
        """
        for opened, closed in (("[", "]"), ("{a = ", "}")):
            self.assertEqual(
                self.error(f"a = {opened * 100_000}1{closed * 100_000}\n"),
                "invalid TOML: arrays or inline tables nested too deeply",
            )

    def test_notUtf8(self) -> None:
        """A file in another encoding: one line, not tomllib's traceback."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b'# caf\xe9\nrundir = "/run/libipc"\n')
        error = self.assertRaises(ConfigError, load_config, path, None, {})
        self.assertEqual(
            str(error),
            f"{path}: invalid TOML: not UTF-8 (byte 0xe9 at offset 5): "
            "save it as UTF-8",
        )

    def test_missingFile(self) -> None:
        path = self.mktemp()
        error = self.assertRaises(ConfigError, load_config, path, None, {})
        self.assertTrue(str(error).startswith(path + ": cannot read"), str(error))

    def test_directory(self) -> None:
        path = self.mktemp()
        os.mkdir(path)
        error = self.assertRaises(ConfigError, load_config, path, None, {})
        self.assertTrue(str(error).startswith(path + ": "))

    def test_redirectLoop(self) -> None:
        message = self.error('[redirects]\na = "b"\nb = "c"\nc = "a"\n')
        self.assertIn("loop", message)
        self.assertIn("a -> b -> c -> a", message)

    def test_redirectSelfLoop(self) -> None:
        self.assertIn("a -> a", self.error('[redirects]\na = "a"\n'))

    def test_fileRundirErrorNamesFile(self) -> None:
        """
        A file's bad rundir is the file's fault, even when the command line
        set other things.
        """
        message = self.error('rundir = "../run"\n', {"pongd": {"enabled": True}})
        self.assertIn("rundir", message)

    def test_commandLineErrorsNamed(self) -> None:
        """Bad values from the command line say they came from there."""
        error = self.assertRaises(
            ConfigError, load_config, None, {"redirects": {"a": "../x"}}, {}
        )
        self.assertTrue(str(error).startswith("command line: [redirects] a: "))


# Listeners on loopback with a colon too many or too few: IPv6's written
# with each colon escaped or not, arguments by name or by position, and
# ':' (or '\:') at the end.
_IPV6_LOOPBACK = st.lists(st.sampled_from([":", "\\:"]), min_size=2, max_size=2).map(
    lambda colons: f"{colons[0]}{colons[1]}1"
)
_LOOPBACK_LISTENERS = st.builds(
    "{}{}{}".format,
    st.sampled_from(["tcp", "tcp6", "haproxy:tcp", "haproxy:tcp6"]),
    st.one_of(
        st.builds(":0:interface={}".format, _IPV6_LOOPBACK),
        st.just(":0:interface=127.0.0.1"),
        st.builds(":interface={}:port=0".format, _IPV6_LOOPBACK),
        st.builds(":0:interface={}:backlog=5".format, _IPV6_LOOPBACK),
        st.builds(":port=0:backlog=5:interface={}".format, _IPV6_LOOPBACK),
    ),
    st.sampled_from(["", ":", "::", "\\:", ":\\:", "\\::"]),
)


class SuggestionListensTests(TestCase):
    """
    The string an endpoint error suggests (C{(write '...')}) is one that
    listens: each is taken from the message and listened on, with
    Twisted's C{serverFromString}, on loopback.
    """

    @inlineCallbacks
    def test_suggestionListens(self) -> Any:
        suggested: dict[str, str] = {}

        @settings(
            max_examples=300,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        @hypothesis.given(_LOOPBACK_LISTENERS)
        @example(r"tcp6:0:interface=\:\:1:")  # suggested '...=\:\:1\:'
        @example("tcp6:0:interface=::1:")
        @example("tcp:0:interface=127.0.0.1:")  # suggested '...=127.0.0.1\:'
        def collect(listen: str) -> None:
            try:
                check_server_endpoint(listen)
            except Invalid as e:
                found = re.search(r" \(write '(.*)'\)$", str(e))
                if found is not None:
                    suggested.setdefault(found.group(1), listen)

        collect()
        self.assertIn(r"tcp6:0:interface=\:\:1", suggested)
        from twisted.internet import reactor
        from twisted.internet.protocol import Factory, Protocol

        for fixed, listen in sorted(suggested.items()):
            endpoint = serverFromString(reactor, fixed)
            try:
                port = yield endpoint.listen(Factory.forProtocol(Protocol))
            except Exception as e:
                self.fail(f"{listen!r}: suggested {fixed!r}, which fails: {e}")
            try:
                self.assertIn(port.getHost().host, ("127.0.0.1", "::1"), fixed)
            finally:
                yield port.stopListening()


class NamesDescriptorTests(SynchronousTestCase):
    """
    Which names of --config are an open descriptor's: those in /proc/PID/fd
    however the name reaches it (its spellings, links to it, links to
    /dev/fd), through as many links as the kernel follows.
    """

    def setUp(self) -> None:
        self.work = short_rundir(self, "ipcd-fdnames-")
        self.file = os.path.join(self.work, "ipcd.toml")
        with open(self.file, "w") as f:
            f.write("")
        fd = os.open(self.file, os.O_RDONLY)
        self.addCleanup(os.close, fd)
        self.fd = str(fd)

    def link(self, name: str, target: str) -> str:
        path = os.path.join(self.work, name)
        os.symlink(target, path)
        return path

    def test_spellings(self) -> None:
        fds = self.link("fds", "/dev/fd")
        me = self.link("me", "/proc/self")
        for path in (
            f"/dev/fd/{self.fd}",
            f"//dev/fd/{self.fd}",
            f"/dev/./fd/{self.fd}",
            f"/proc/self/fd/{self.fd}",
            f"/proc/thread-self/fd/{self.fd}",
            f"/proc/{os.getpid()}/fd/{self.fd}",
            "/dev/stdin",
            f"{fds}/{self.fd}",
            f"{me}/fd/{self.fd}",
            self.link("to-fd", f"/dev/fd/{self.fd}"),
            self.link("relative", f"fds/{self.fd}"),
        ):
            self.assertIs(names_descriptor(path), True, path)
        for path in (
            self.file,
            self.link("to-file", "ipcd.toml"),
            fds,
            "/proc/self/fd",
            f"/proc/self/fdinfo/{self.fd}",  # a file of its own
            # Digits of another script: no process has such a number.
            f"/proc/{str(os.getpid()).translate(ARABIC_INDIC)}/fd/{self.fd}",
        ):
            self.assertIs(names_descriptor(path), False, path)

    def test_asManyLinksAsTheKernelFollows(self) -> None:
        """
        At the end of 40 links, a descriptor's name is found; past them the
        kernel opens nothing (ELOOP), and nothing more is read.
        """
        target = f"/dev/fd/{self.fd}"
        for count in range(1, 42):
            target = self.link(f"l{count}", target)
            if count == 40:
                self.assertIs(names_descriptor(target), True)
        self.assertIs(names_descriptor(target), False)
        self.assertRaises(OSError, open, target)


class FileKindTests(SynchronousTestCase):
    """
    Only a regular file of bounded size is read as the configuration: what
    else the path may name costs one line, not a stalled or exhausted ipcd
    (a reload reads it again, in the reactor's thread).
    """

    def load_within(self, path: str) -> ConfigError:
        """load_config(path)'s error; a call still blocked after 30 s fails."""
        outcome: list[BaseException | None] = []

        def load() -> None:
            try:
                load_config(path, None, {})
            except BaseException as e:
                outcome.append(e)
            else:
                outcome.append(None)

        thread = threading.Thread(target=load, daemon=True)
        thread.start()
        thread.join(30)
        if thread.is_alive():
            # Let the blocked open go (a writer comes) before failing.
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            thread.join(30)
            self.fail(f"load_config({path!r}) still blocked after 30 s")
        [error] = outcome
        self.assertIsInstance(error, ConfigError)
        return error  # type: ignore[return-value]

    def test_fifoWithoutWriter(self) -> None:
        """A FIFO is refused at once, not waited on until a writer comes."""
        path = self.mktemp()
        os.mkfifo(path, 0o600)
        self.assertEqual(
            str(self.load_within(path)),
            f"{path}: is a FIFO, not a file: name the file itself",
        )

    def test_device(self) -> None:
        """/dev/zero would be read until memory ran out: refused unread."""
        self.assertEqual(
            str(self.load_within("/dev/zero")),
            "/dev/zero: is a character device, not a file: name the file itself",
        )

    def test_sizeBound(self) -> None:
        """
        A file over 1 MiB is refused, not read whole (nor cut): it is
        parsed on the reactor's thread, at each reload (16 MiB of rules
        took 11 s there, every lookup waiting).
        """
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"# padding\n")
            f.truncate(MAX_CONFIG_FILE + 1)  # sparse: costs no disk
        self.assertEqual(
            str(self.load_within(path)),
            f"{path}: larger than 1 MiB",
        )
        with open(path, "r+b") as f:
            f.truncate(MAX_CONFIG_FILE)
            f.seek(MAX_CONFIG_FILE - 1)
            f.write(b"\n")
        self.assertIn("invalid TOML", str(self.load_within(path)))

    def test_writableByOthers(self) -> None:
        """
        A file every user may write is refused (at a reload too): whoever
        can write it would decide, at the next reload, what ipcd lets
        everyone reach (a grant of every socket, say).  Group write is
        allowed (umask 002 makes a user's files so, for the user's group).
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('grants = ["* *"]\n')
        for mode in (0o666, 0o602):
            os.chmod(path, mode)
            self.assertEqual(
                str(self.load_within(path)),
                f"{path}: writable by every user (mode {mode:04o}): whoever can "
                f"write it decides what ipcd lets everyone reach; chmod o-w {path}",
            )
        os.chmod(path, 0o664)
        self.assertEqual(len(load_config(path, None, {}).grants), 1)

    def test_openDescriptor(self) -> None:
        """
        --config <(...), /dev/fd/N or /dev/stdin: refused at start in one
        line.  A pipe's was (as a FIFO, without the why); a file's started,
        and each reload re-read the file as it was opened: after an editor
        saved it by renaming a new one in place, "reloaded", with the old
        rules in force.
        """
        work = short_rundir(self, "ipcd-fd-")
        path = os.path.join(work, "ipcd.toml")
        with open(path, "w") as f:
            f.write('[redirects]\na = "pong"\n')
        reader, writer = os.pipe()
        self.addCleanup(os.close, reader)
        os.close(writer)
        # A link to /dev/fd, and a doubled slash: the same directory.
        os.symlink("/dev/fd", os.path.join(work, "fds"))
        with open(path) as opened:
            fd = opened.fileno()
            for name, stdin in [
                (f"/dev/fd/{reader}", None),
                (f"/proc/self/fd/{fd}", None),
                ("/dev/stdin", opened),
                (os.path.join(work, "fds", str(fd)), None),
                (f"//dev/fd/{fd}", None),
            ]:
                args = ["--config", name, "--no-tcp", "--rundir", work + "/run"]
                done = subprocess.run(
                    [sys.executable, "-c", "from ipcd.scripts.ipcd import main; main()"]
                    + args,
                    stdin=stdin,
                    pass_fds=(reader, fd),
                    capture_output=True,
                    text=True,
                    env=python_env(),
                    timeout=6 * TIMEOUT,
                )
                self.assertEqual(
                    (done.returncode, done.stderr),
                    (
                        1,
                        f"ipcd: {name}: names an open file descriptor: ipcd reads "
                        "its configuration again at each reload (ipcd reload, "
                        "SIGHUP), and a descriptor gives a pipe's text once, a "
                        "file as it was when opened, not as saved since; name "
                        "the file itself\n",
                    ),
                )
        self.assertFalse(os.path.exists(work + "/run"))

    def test_throughASymlink(self) -> None:
        """A symbolic link to the file is read as the file."""
        target = self.mktemp()
        with open(target, "w") as f:
            f.write("max_message_size = 4096\n")
        link = self.mktemp()
        os.symlink(os.path.abspath(target), link)
        self.assertEqual(load_config(link, None, {}).max_message_size, 4096)


class OverrideTests(ConfigFileMixin, SynchronousTestCase):
    def test_overridesBeatFile(self) -> None:
        path = self.write(FULL)
        config = load_config(
            path,
            {
                "rundir": "/cmd",
                "pongd": {"enabled": True},
                "redirects": {"authd": "authd2"},
                "routes": {"pong": "unix://pong"},
                "tcpd": {"enabled": False},
            },
            {},
        )
        self.assertEqual(config.rundir, "/cmd")
        self.assertTrue(config.pongd)
        self.assertIsNone(tcp_listen(config))
        # Tables merge name by name: the file's other entries stay.
        self.assertEqual(
            dict(config.redirects), {"authd": "authd2", "a": "b", "b": "c"}
        )
        self.assertEqual(config.routes["pong"], LocalURI("pong"))
        self.assertEqual(config.routes["local"], PathURI("/var/run/local.sock"))
        # Untouched file values stay.
        self.assertEqual(config.lookup_timeout, 2.5)

    def test_commandLineEnablesTcp(self) -> None:
        path = self.write("[tcpd]\nenabled = false\n")
        config = load_config(path, {"tcpd": {"enabled": True, "listen": "tcp:1"}}, {})
        self.assertEqual(tcp_listen(config), "tcp:1")

    def test_rulesAppended(self) -> None:
        path = self.write('rules = ["allow in authd"]\n')
        config = load_config(path, {"rules": ["deny in * *"]}, {})
        self.assertEqual(
            [str(rule) for rule in config.rules],
            ["allow in authd *", "deny in * *"],
        )

    def test_loopAcrossLayers(self) -> None:
        """A loop made of a file redirect and a command-line one is refused."""
        path = self.write('[redirects]\na = "b"\n')
        error = self.assertRaises(
            ConfigError, load_config, path, {"redirects": {"b": "a"}}, {}
        )
        self.assertIn("a -> b -> a", str(error))


class OptionsTests(ConfigFileMixin, SynchronousTestCase):
    def parse(self, *argv: str):
        from ipcd.options import Options

        options = Options()
        options.parseOptions(list(argv))
        return options

    def test_defaults(self) -> None:
        config = self.parse("--rundir", "/r").config
        self.assertEqual(config.rundir, "/r")
        self.assertTrue(config.pongd)
        self.assertEqual(dict(config.redirects), {})
        # docs/configuration.rst and docs/securing.rst: labels are at most
        # a minute old by default.
        self.assertEqual(config.label_cache_max_age, 60.0)

    def test_redirect(self) -> None:
        config = self.parse(
            "--rundir", "/r", "--redirect", "a b", "--redirect", "c  d"
        ).config
        self.assertEqual(dict(config.redirects), {"a": "b", "c": "d"})

    def test_redirectOneWord(self) -> None:
        error = self.assertRaises(usage.UsageError, self.parse, "--redirect", "a")
        self.assertIn("--redirect", str(error))

    def test_emptyRundirOrConfig(self) -> None:
        """
        C{--rundir ""} (an unset variable in a unit's ExecStart=, say) is
        refused as C{rundir = ""} is, not taken as no option (ipcd on the
        default /tmp/libipc-run); C{--config ""} says so, not ": cannot read".
        """
        error = self.assertRaises(usage.UsageError, self.parse, "--rundir", "")
        self.assertEqual(
            str(error), "command line: rundir: expected a non-empty string, got ''"
        )
        error = self.assertRaises(
            usage.UsageError, self.parse, "--rundir", "/r", "--config", ""
        )
        self.assertEqual(str(error), "--config takes a file name, got ''")

    def test_unquotedUnderTwistd(self) -> None:
        """
        twistd takes one quoted value per option: the words past the first
        (C{twistd ipcd --allow in pong}) are said as such, not as Twisted's
        "Wrong number of arguments."
        """
        error = self.assertRaises(
            usage.UsageError, self.parse, "--rundir", "/r", "--allow", "in", "pong"
        )
        self.assertEqual(
            str(error),
            "unexpected argument 'pong': give an option's words as one quoted "
            'value (--allow "in pong")',
        )

    def test_redirectBadName(self) -> None:
        self.assertRaises(usage.UsageError, self.parse, "--redirect", "a ../b")

    def test_route(self) -> None:
        config = self.parse(
            "--rundir", "/r", "--route", "pong tcp://127.0.0.1:9000/pong"
        ).config
        self.assertEqual(
            config.routes["pong"],
            RemoteURI("tcp", "127.0.0.1", 9000, "pong", "tcp://127.0.0.1:9000/pong"),
        )

    def test_routeBad(self) -> None:
        self.assertRaises(usage.UsageError, self.parse, "--route", "pong")
        self.assertRaises(
            usage.UsageError, self.parse, "--route", "pong tcp://h:x/pong"
        )

    def test_noPongd(self) -> None:
        self.assertFalse(self.parse("--rundir", "/r", "--no-pongd").config.pongd)
        self.assertTrue(
            self.parse("--rundir", "/r", "--no-pongd", "--pongd").config.pongd
        )

    def test_configFile(self) -> None:
        path = self.write("[pongd]\nenabled = false\n[ipcd]\nlookup_timeout = 2\n")
        config = self.parse("--config", path).config
        self.assertFalse(config.pongd)
        self.assertEqual(config.lookup_timeout, 2.0)
        self.assertEqual(config.source, path)

    def test_commandLineBeatsConfig(self) -> None:
        path = self.write('rundir = "/file"\n[pongd]\nenabled = false\n')
        config = self.parse("--config", path, "--rundir", "/cmd", "--pongd").config
        self.assertEqual(config.rundir, "/cmd")
        self.assertTrue(config.pongd)

    def test_configError(self) -> None:
        """A bad config file is a usage error naming file, key and expectation."""
        path = self.write('[ipcd]\nlookup_timeout = "x"\n')
        error = self.assertRaises(usage.UsageError, self.parse, "--config", path)
        self.assertIn(path, str(error))
        self.assertIn("[ipcd] lookup_timeout: expected", str(error))

    def test_configMissing(self) -> None:
        path = self.mktemp()
        error = self.assertRaises(usage.UsageError, self.parse, "--config", path)
        self.assertIn(path, str(error))

    def test_grantsAndDaemonsOptions(self) -> None:
        config = self.parse(
            "--rundir",
            "/r",
            "--grant",
            "secret group:ops",
            "--external-daemon",
            "tls",
            "--external-daemon",
            "udp",
        ).config
        self.assertEqual([str(g) for g in config.grants], ["secret group:ops"])
        self.assertEqual(config.external_daemons, ("tls", "udp"))
        self.assertRaises(usage.UsageError, self.parse, "--grant", "secret")

    def test_rules(self) -> None:
        config = self.parse(
            "--rundir",
            "/r",
            "--allow",
            "in authd",
            "--deny",
            "in * *",
            "--allow",
            "out pong",
        ).config
        self.assertEqual(
            [str(rule) for rule in config.rules],
            ["allow in authd *", "deny in * *", "allow out pong *"],
        )


def _errors_section() -> list[str]:
    """The lines of docs/configuration.rst's Errors section's literal blocks."""
    with open(os.path.join(REPO, "docs", "configuration.rst"), encoding="utf-8") as f:
        section = f.read().split("\nErrors\n------\n", 1)[1]
    return [line[4:] for line in section.splitlines() if line.startswith("    ipcd: ")]


# How to provoke each line of the Errors section: the configuration file's
# text (None: no file), the command line after "ipcd", and which command
# (the ipcd command or twistd).  "/run/ipc" (or "/tmp/libipc-run") and
# "127.0.0.1:9000" in a line stand for the test's own directory and port.
_PROVOKED = {
    "[tcpd] listen: expected an endpoint string": ("[tcpd]\nlisten = 9000\n", []),
    "unknown endpoint type 'foo'": (None, ["--tcp", "foo:bar"]),
    "tcp6:9000:interface=::2": (None, ["--tcp", "tcp6:9000:interface=::2"]),
    "'haproxy:' wraps no listener": (None, ["--tcp", "haproxy:"]),
    "port '+9000' is not digits": (None, ["--tcp", "tcp:+9000"]),
    "no such group 'nosuchgroup'": ('[control]\ngroup = "nosuchgroup"\n', []),
    "lookup_timeot": ("[ipcd]\nlookup_timeot = 5\n", []),
    "(a week), got 1e+300": ("[limits]\nidle_timeout = 1e300\n", []),
    "loop a -> b -> a": ('[redirects]\na = "b"\nb = "a"\n', []),
    "sideways": ('rules = ["allow sideways pong"]\n', []),
    "invalid TOML": ("a = =\n", []),
    "cannot read": (None, ["--config", "ipcd.toml"]),
    "[routes] x": (None, ["--route", "x y://"]),
    "--redirect takes": (None, ["--redirect", "a"]),
    "--bogus": (None, ["--bogus"], "twistd"),
    "cannot listen on 127.0.0.1:9000": (
        None,
        ["--tcp", "tcp:9000:interface=127.0.0.1"],
    ),
    "systemd:domain=INET:index=0": (None, ["--tcp", "systemd:domain=INET:index=0"]),
    # Needs a process without CAP_NET_BIND_SERVICE: test_privilegedPort.
    "permission denied (ports below 1024": None,
    "192.0.2.1 is none of this host's": (
        None,
        ["--metrics", "tcp:9101:interface=192.0.2.1"],
    ),
    "read-only file system": None,  # needs a read-only mount: test_startup's
    "unsafe RUNDIR": (None, ["--rundir", "/run/ipc"]),
    "cannot create RUNDIR": (None, ["--rundir", "/run/ipc/x"]),
    "another ipcd (pid": (None, []),
    "another process is listening": (None, []),
}


class DocumentedErrorsTests(SynchronousTestCase):
    """docs/configuration.rst's Errors section, each line provoked as shown."""

    def test_eachLineAsShown(self) -> None:
        lines = _errors_section()
        self.assertEqual(len(lines), len(_PROVOKED), lines)
        for shown in lines:
            [key] = [k for k in _PROVOKED if k in shown]
            if _PROVOKED[key] is not None:
                self.assertEqual(self.provoke(*_PROVOKED[key], shown=shown), shown)

    def test_privilegedPort(self) -> None:
        """
        A port below 1024 without the privilege: the way out names the
        privilege, not just "use --tcp ENDPOINT" (as root, run without
        CAP_NET_BIND_SERVICE in its bounding set).
        """
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
            if int(f.read()) != 1024:
                raise SkipTest("this kernel lets anyone bind ports below 1024")
        prefix: list[str] = []
        if os.geteuid() == 0:
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                raise SkipTest("no setpriv(1) to drop CAP_NET_BIND_SERVICE")
            prefix = [setpriv, "--bounding-set=-net_bind_service"]
        [shown] = [line for line in _errors_section() if "ports below" in line]
        args = ["--tcp", "tcp:80:interface=127.0.0.1"]
        self.assertEqual(self.provoke(None, args, shown=shown, prefix=prefix), shown)

    def provoke(
        self,
        toml: str | None,
        args: list[str],
        command: str = "ipcd",
        shown: str = "",
        prefix: list[str] | None = None,
    ) -> str:
        work = short_rundir(self, "ipcd-errors-")
        rundir = os.path.join(work, "run")
        if "/run/ipc" in shown:  # a regular file in RUNDIR's place
            rundir = os.path.join(work, "ipc")
            with open(rundir, "w"):
                pass
        args = [a.replace("/run/ipc", rundir) for a in args]
        if toml is not None:
            with open(os.path.join(work, "ipcd.toml"), "w") as f:
                f.write(toml)
            args = ["--config", "ipcd.toml", *args]
        if "--rundir" not in args:
            args += ["--rundir", rundir]
        if "--tcp" not in args:
            args.append("--no-tcp")
        held = socket.socket(socket.AF_INET if "9000" in shown else socket.AF_UNIX)
        self.addCleanup(held.close)
        port = free_port()
        if "9000" in shown:  # the port, taken
            held.bind(("127.0.0.1", port))
            held.listen()
            args = [a.replace("9000", str(port)) for a in args]
        if "another process" in shown:  # RUNDIR/ipc, live
            os.mkdir(rundir, 0o1770)
            held.bind(os.path.join(rundir, "ipc"))
            held.listen()
        if "another ipcd (pid" in shown:  # RUNDIR's lock, held (by this process)
            os.mkdir(rundir, 0o1770)
            self.addCleanup(take_instance_lock(rundir).release)
        run = "from ipcd.scripts.ipcd import main; main()"
        if command == "twistd":
            run = "from twisted.scripts.twistd import run; run()"
            args = ["--nodaemon", "ipcd", *args]
        done = subprocess.run(
            [*(prefix or []), sys.executable, "-c", run, *args],
            capture_output=True,
            text=True,
            env=python_env(),
            cwd=work,
            timeout=6 * TIMEOUT,
        )
        self.assertEqual((done.returncode, done.stdout), (1, ""), done.stderr)
        said = done.stderr.rstrip("\n")
        self.assertNotIn("\n", said)
        default = "/tmp/libipc-run" if "/tmp/libipc-run" in shown else "/run/ipc"
        said = said.replace(rundir, default).replace(str(port), "9000")
        said = said.replace(f"(pid {os.getpid()})", "(pid 4242)")
        if "(known: " in shown and "endpoint type" in shown:
            # Twisted's and its installed plugins' types: those of this host.
            return re.sub(r"\(known: [^)]*\)", "(" + shown.rsplit("(", 1)[1], said)
        return said
