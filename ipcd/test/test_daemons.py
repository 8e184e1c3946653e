"""
The protocol-daemon interface end to end: C{testscheme}, a daemon defined
only in the test suite (L{ipcd.test.daemonplugins.testscheme}), registered
through Twisted's plugin discovery, runs in ipcd with no line of the broker,
the configuration, the command line or the control socket naming it.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import deferToThread
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

import twisted.plugins
from ipcd.broker import Broker
from ipcd.config import ConfigError, load_config
from ipcd.control import format_status, status_report
from ipcd.daemons import IProtocolDaemon, Registry, RegistryError, registry
from ipcd.daemons.tcp import tcpd
from ipcd.daemons.tls.daemon import tlsd
from ipcd.errors import Refused
from ipcd.identity import Peer
from ipcd.options import Options
from ipcd.tap import IPCDService
from ipcd.test import daemonplugins
from ipcd.test.daemonplugins.testscheme import testschemed
from ipcd.test.support import bounce, lookup, short_rundir, start_ipcd, wait_until
from ipcd.testing import FakeProtocolDaemon
from ipcd.wire import encode


def with_testscheme() -> Registry:
    """ipcd's own daemons and the test package's."""
    return registry(twisted.plugins, daemonplugins)


class RegistryTests(SynchronousTestCase):
    def test_foundThroughPlugins(self) -> None:
        """The built-in daemons and the test's daemon come from getPlugins."""
        found = with_testscheme()
        self.assertEqual(list(found), ["tcp", "testscheme", "tls", "udp", "ws"])
        self.assertIs(found["tls"], tlsd)
        self.assertIs(found["tcp"], tcpd)
        # websocketd serves wss:// too, and is listed once.
        self.assertIs(found["wss"], found["ws"])
        self.assertIs(found.by_section("websocketd"), found["ws"])
        self.assertIs(found["testscheme"], testschemed)
        self.assertIs(found.by_section("testschemed"), testschemed)
        self.assertTrue(IProtocolDaemon.providedBy(testschemed))
        self.assertEqual(list(registry(daemonplugins)), ["testscheme"])
        self.assertEqual(list(registry()), ["tcp", "tls", "udp", "ws"])

    def test_conflict(self) -> None:
        """Two daemons claiming one scheme are an error, naming both."""

        class Other:
            scheme, section = "tcp", "othertcpd"

        with self.assertRaises(RegistryError) as caught:
            Registry([tcpd, Other()])
        self.assertIn("'tcp'", str(caught.exception))

    def test_alsoSchemesConflict(self) -> None:
        """A further scheme (C{also_schemes}) conflicts like an own one."""

        class Extra:
            scheme, section, also_schemes = "tcp2", "tcp2d", ("tcp",)

        class Own:
            scheme, section = "tcp2", "other"

        for daemons in ([tcpd, Extra()], [Extra(), tcpd], [Extra(), Own()]):
            with self.assertRaises(RegistryError):
                Registry(daemons)
        registry = Registry([Extra()])
        self.assertEqual(
            (list(registry), registry["tcp"]), (["tcp2"], registry["tcp2"])
        )


class ConfigAndOptionsTests(SynchronousTestCase):
    def load(self, layer: dict[str, Any]) -> Any:
        return load_config(None, layer, {}, registry=with_testscheme())

    def test_sectionDefaultsAndValues(self) -> None:
        config = self.load({"testschemed": {"enabled": True, "colour": "green"}})
        self.assertEqual(
            dict(config.daemons["testschemed"]),
            {"enabled": True, "listen": "tcp:0:interface=127.0.0.1", "colour": "green"},
        )
        self.assertTrue(config.daemons["tcpd"]["enabled"])

    def test_sectionValidated(self) -> None:
        for layer, message in [
            (
                {"testschemed": {"colour": "blue"}},
                "command line: [testschemed] colour: expected 'red' or 'green', "
                "got 'blue'",
            ),
            (
                {"testschemed": {"enabled": 1}},
                "command line: [testschemed] enabled: expected true or false, got 1",
            ),
            (
                {"testschemed": {"size": 1}},
                "command line: [testschemed] size: unknown key "
                "(known: colour, enabled, listen)",
            ),
        ]:
            with self.assertRaises(ConfigError) as caught:
                self.load(layer)
            self.assertEqual(str(caught.exception), message)
        with self.assertRaises(ConfigError) as caught:
            self.load({"testschemed": {"listen": "foo:bar"}})
        self.assertTrue(
            str(caught.exception).startswith(
                "command line: [testschemed] listen: unknown endpoint type 'foo'"
            )
        )

    def test_unknownWithoutTheDaemon(self) -> None:
        """The default registry does not know the test's section."""
        with self.assertRaises(ConfigError) as caught:
            load_config(None, {"testschemed": {}}, {})
        self.assertIn("testschemed: unknown key", str(caught.exception))

    def test_flags(self) -> None:
        options = Options(with_testscheme())
        options.parseOptions(["--testscheme", "tcp:0", "--no-tcp", "--no-ws"])
        settings = options.config.daemons
        self.assertEqual(settings["testschemed"]["listen"], "tcp:0")
        self.assertTrue(settings["testschemed"]["enabled"])
        self.assertFalse(settings["tcpd"]["enabled"])
        options = Options(with_testscheme())
        options.parseOptions(["--testscheme", "tcp:0", "--no-testscheme"])
        self.assertFalse(options.config.daemons["testschemed"]["enabled"])
        self.assertIn("--testscheme=", str(options))
        with self.assertRaises(usage.UsageError):
            Options().parseOptions(["--testscheme", "tcp:0"])

    def test_reloadRestartKeys(self) -> None:
        """A running daemon's restart keys keep their old values on reload."""
        rundir = short_rundir(self)
        first = self.load(
            {
                "rundir": rundir,
                "tcpd": {"enabled": False},
                "testschemed": {"enabled": True},
            }
        )
        second = self.load(
            {
                "rundir": rundir,
                "tcpd": {"enabled": False},
                "testschemed": {"enabled": True, "listen": "tcp:1", "colour": "green"},
            }
        )
        service = IPCDService(first, reactor, lambda: second)
        answer = service.reload()
        self.assertEqual(
            answer,
            {
                "ok": True,
                "restart_needed": ["testscheme_listen"],
                "changed": ["[testschemed] colour"],
            },
        )
        settings = service.broker.config.daemons["testschemed"]
        self.assertEqual(settings["listen"], "tcp:0:interface=127.0.0.1")
        self.assertEqual(settings["colour"], "green")


class EndToEndTests(TestCase):
    """
    One ipcd, tcpd off, testschemed on: a lookup routed through
    C{testscheme://} to itself, then pongd.
    """

    @inlineCallbacks
    def start(self, rules: list[str]) -> Any:
        self.rundir = short_rundir(self)
        options = Options(with_testscheme())
        options.parseOptions(
            [
                "--rundir",
                self.rundir,
                "--no-tcp",
                "--no-ws",
                "--testscheme",
                "tcp:0:interface=127.0.0.1",
            ]
            + [
                arg
                for rule in rules
                for arg in ("--" + rule.split()[0], rule.split(None, 1)[1])
            ]
        )
        self.service = yield start_ipcd(self, options.config)
        self.broker = self.service.broker
        port = yield self.service.getServiceNamed("testschemed").listening()
        self.port = port.getHost().port
        testschemed.connects.clear()

    @inlineCallbacks
    def test_lookupThroughTheDaemon(self) -> Any:
        yield self.start(["allow in pong"])
        route = f"x;x testscheme://127.0.0.1:{self.port}/pong".encode()
        reply = yield deferToThread(lookup, self.rundir, route)
        self.assertEqual(reply.first, b"ok")
        sock = reply.take_socket(self)
        echo = yield deferToThread(bounce, sock, b"through testscheme")
        self.assertEqual(echo, encode(b"through testscheme"))
        # Its outbound half connected, for this broker.
        [(broker, target, client)] = testschemed.connects
        self.assertIs(broker, self.broker)
        self.assertEqual((target.uri.scheme, target.service), ("testscheme", "pong"))
        # Its listener asked the broker (in rules), and relays.
        counters = self.broker.counters
        self.assertEqual(counters["inbound requests"], 1)
        [stats] = self.broker.relays
        self.assertEqual((stats.direction, stats.service), ("in", "pong"))
        # ipcd status: its lines, and the relay.
        report = status_report(self.broker)
        self.assertEqual(
            report["config"]["testscheme_listen"], "tcp:0:interface=127.0.0.1"
        )
        self.assertEqual(report["config"]["testscheme_colour"], "red")
        self.assertIn('testscheme_colour: "red"', format_status(report))
        self.assertEqual(report["config"]["tcp_listen"], None)
        sock.close()
        yield wait_until(lambda: not self.broker.relays, "the relay to end")

    @inlineCallbacks
    def test_outRulesApply(self) -> Any:
        yield self.start(["deny out pong", "allow in pong"])
        route = f"x;x testscheme://127.0.0.1:{self.port}/pong".encode()
        reply = yield deferToThread(lookup, self.rundir, route)
        self.assertTrue(reply.first.startswith(b"ne out connection to 'x'"), reply)
        self.assertIn(b"deny out pong", reply.data)
        self.assertEqual(testschemed.connects, [])

    @inlineCallbacks
    def test_inRulesApply(self) -> Any:
        """No C{allow in}: the daemon's listener is refused by the broker."""
        yield self.start([])
        route = f"x;x testscheme://127.0.0.1:{self.port}/pong".encode()
        reply = yield deferToThread(lookup, self.rundir, route)
        self.assertTrue(reply.first.startswith(b"ne testschemed refused 'pong'"), reply)
        self.assertEqual(self.broker.counters["inbound requests"], 1)

    @inlineCallbacks
    def test_ownSocketNeverATarget(self) -> Any:
        yield self.start(["allow in *"])
        self.assertTrue(os.path.exists(os.path.join(self.rundir, "testscheme")))
        for payload in (b"testscheme", b"x;x testscheme"):
            reply = yield deferToThread(lookup, self.rundir, payload)
            self.assertEqual(
                reply.first,
                b"ne 'testscheme' is ipcd's own socket, never a lookup target",
            )
        # Nor reached by a remote peer, through the daemon's own listener.
        route = f"x;x testscheme://127.0.0.1:{self.port}/testscheme".encode()
        reply = yield deferToThread(lookup, self.rundir, route)
        self.assertTrue(reply.first.startswith(b"ne "), reply)
        self.assertIn("testscheme", self.broker.own_names())


class FakeProtocolDaemonTests(SynchronousTestCase):
    """L{ipcd.testing.FakeProtocolDaemon}, as a user's test would use it."""

    def setUp(self) -> None:
        self.fake = FakeProtocolDaemon()
        self.clock = MemoryReactorClock()
        config = load_config(
            None,
            {"rundir": "/nonexistent", "ipcd": {"connect_timeout": 2}},
            {},
            registry=Registry([self.fake]),
        )
        self.broker = Broker(config, self.clock)
        self.who = Peer("uid 1000", frozenset({"uid:1000"}), uid=1000)

    def test_connectAnswered(self) -> None:
        d = self.broker.open(b"x;x fake://h:1/pong", self.who)
        [call] = self.fake.connects
        self.assertIs(call.broker, self.broker)
        self.assertEqual((call.target.uri.host, call.target.service), ("h", "pong"))
        call.succeed("the socket")
        self.assertEqual(self.successResultOf(d), "the socket")

    def test_refusedAndDeadline(self) -> None:
        d = self.broker.open(b"x;x fake://h:1/pong", self.who)
        self.fake.connects[0].refuse("no")
        self.assertEqual(self.failureResultOf(d, Refused).value.reason, "no")
        d = self.broker.open(b"x;x fake://h:1/pong", self.who)
        self.clock.advance(2)
        self.failureResultOf(d)
        self.assertTrue(self.fake.connects[1].cancelled)

    def test_flagsStatusAndOwnName(self) -> None:
        options = Options(Registry([self.fake]))
        options.parseOptions(["--no-fake"])
        self.assertFalse(options.config.daemons["faked"]["enabled"])
        self.assertEqual(
            status_report(Broker(options.config, self.clock))["config"]["fake_enabled"],
            False,
        )
        self.assertIn("fake", self.broker.own_names())
        d = self.fake.inbound(
            self.broker, "pong", Peer("10.0.0.1:5", frozenset({"ip:10.0.0.1"}))
        )
        self.assertIn("denied", self.failureResultOf(d, Refused).value.reason)
