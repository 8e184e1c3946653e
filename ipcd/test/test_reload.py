"""
Reloads racing requests: a request decided under the old configuration and
still connecting when a reload lands is answered under the configuration in
force when it is answered, never an old decision the new one forbids.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import threading
import weakref
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, gatherResults, inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ipcd import control
from ipcd.config import ConfigError, load_config
from ipcd.identity import Peer
from ipcd.reloadgate import RELOAD_INTERVAL, ReloadGate
from ipcd.sdnotify import Notifier, Readiness
from ipcd.test.support import (
    TIMEOUT,
    as_user,
    assert_no_fd_leak,
    bounce,
    connect_unix,
    fake_daemon,
    fd_baseline,
    fill_backlog,
    lookup,
    make_config,
    needs_root,
    recv_upto,
    short_rundir,
    start_ipcd,
    wait_until,
)
from ipcd.test.test_daemons import with_testscheme
from ipcd.test.test_inboundaccess import MALLORY
from ipcd.test.test_systemd import Manager
from ipcd.test.wssupport import make_ca
from ipcd.wire import encode


def slow_service(case: TestCase, rundir: str, mode: int = 0o777) -> socket.socket:
    """A listener at C{RUNDIR/slow} whose backlog is full: connects wait."""
    path = os.path.join(rundir, "slow")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    case.addCleanup(server.close)
    server.bind(path)
    os.chmod(path, mode)
    server.listen(0)
    fill_backlog(case, path)
    server.setblocking(False)
    return server


def accept_until(server: socket.socket, answer: Any) -> Any:
    """Accept on C{server} (and close) until C{answer} has fired."""

    def accept_all() -> bool:
        try:
            server.accept()[0].close()
        except BlockingIOError:
            pass
        return bool(answer.called)

    return wait_until(accept_all, "ipcd's connection to be accepted")


class InFlightAcrossReloadTests(TestCase):
    @inlineCallbacks
    def start(self, before: list[str], after: list[str], **overrides: Any) -> Any:
        """ipcd with rules C{before}; its next reload reads rules C{after}."""
        self.rundir = short_rundir(self)
        configs = iter([before, after])

        def load() -> Any:
            return make_config(self.rundir, rules=next(configs), **overrides)

        self.service = yield start_ipcd(self, load(), load)
        return self.service

    def assertDenied(self, reply: Any, rule: bytes) -> None:
        count = len(reply.fds)
        reply.close_fds()
        self.assertEqual(count, 0, reply.data)
        self.assertTrue(reply.data.startswith(b"ne "), reply.data)
        self.assertIn(rule, reply.data)

    @inlineCallbacks
    def test_remoteConnectingWhenReloaded(self) -> Any:
        """
        A lookup allowed, then held by its daemon while a reload denies it:
        answered C{ne} by the new rule once the daemon answers, the
        daemon's connection closed, no fd left; a new one is denied too,
        and one the new rules still allow is served.
        """
        yield self.start(
            ["allow out pong"],
            ["deny out pong"],
            ipcd={"external_daemons": ["fake"]},
        )
        daemon = fake_daemon(self, self.rundir, mode="hold")
        before = yield fd_baseline()
        pending = deferToThread(lookup, self.rundir, b"pong;pong fake://h:1/pong")
        yield wait_until(lambda: daemon.held, "the lookup to reach the daemon")
        [held] = daemon.held
        self.assertTrue(self.service.reload()["ok"])
        daemon.release()
        self.assertDenied((yield pending), b"deny out pong")
        yield wait_until(lambda: held.lost.called, "ipcd to close it")
        self.assertDenied(
            (yield deferToThread(lookup, self.rundir, b"pong;pong fake://h:1/pong")),
            b"deny out pong",
        )
        reply = yield deferToThread(lookup, self.rundir, b"pong;")
        self.assertEqual(reply.data, b"ok")
        sock = reply.take_socket(self)
        self.assertEqual((yield deferToThread(bounce, sock)), encode(b"bounce me"))
        sock.close()
        yield assert_no_fd_leak(before)

    @inlineCallbacks
    def test_stillAllowedIsServed(self) -> Any:
        """A reload that still allows the request changes nothing for it."""
        yield self.start(
            ["allow out pong"],
            ["allow out pong", "deny out other"],
            ipcd={"external_daemons": ["fake"]},
        )
        daemon = fake_daemon(self, self.rundir, mode="hold")
        pending = deferToThread(lookup, self.rundir, b"pong;pong fake://h:1/pong")
        yield wait_until(lambda: daemon.held, "the lookup to reach the daemon")
        self.assertTrue(self.service.reload()["ok"])
        daemon.release()
        reply = yield pending
        self.assertEqual(reply.data, b"ok")
        reply.take_socket(self)

    @inlineCallbacks
    def test_localConnectingWhenReloaded(self) -> Any:
        """
        A local service whose backlog is full: the lookup waits for it to
        accept; a reload that denies the service meanwhile wins.
        """
        yield self.start(["allow local slow"], ["deny local slow"])
        server = slow_service(self, self.rundir)
        before = yield fd_baseline()
        pending = deferToThread(lookup, self.rundir, b"slow;")
        yield wait_until(
            lambda: self.service.broker.counters["lookups"] >= 1, "the lookup"
        )
        self.assertTrue(self.service.reload()["ok"])
        self.assertFalse(pending.called)
        yield accept_until(server, pending)
        self.assertDenied((yield pending), b"deny local slow")
        yield assert_no_fd_leak(before)

    @inlineCallbacks
    def test_grantedCountedOnce(self) -> Any:
        """
        A lookup reached by a grant, still connecting when a reload lands:
        asked again (the grant still covers it) and served, and counted
        once as granted (the second look counted it again).
        """
        needs_root()
        grants = {"grants": [f"slow uid:{MALLORY}"]}
        yield self.start(["allow local slow"], ["allow local slow"], **grants)
        # Mallory may use ipcd, not connect to slow (root's, 0600) herself.
        os.chmod(self.rundir, 0o755)
        os.chmod(os.path.join(self.rundir, "ipc"), 0o666)
        server = slow_service(self, self.rundir, 0o600)
        counters = self.service.broker.counters
        pending = as_user(
            os.path.join(self.rundir, "ipc"), MALLORY, MALLORY, (), "slow;"
        )
        yield wait_until(lambda: counters["granted"] >= 1, "the grant to be used")
        self.assertTrue(self.service.reload()["ok"])
        self.assertFalse(pending.called)
        yield accept_until(server, pending)
        self.assertEqual((yield pending), {"reply": "ok", "fds": 1})
        self.assertEqual((counters["lookups"], counters["granted"]), (1, 1))


class SettingsAfterReloadTests(TestCase):
    @inlineCallbacks
    def test_pongdMaxMessageSize(self) -> Any:
        """
        C{max_message_size} is no restart key: after a reload that raises
        it, a new connection to pongd echoes a message the old size closed
        (pongd kept the value it started with).
        """
        rundir = short_rundir(self)
        sizes = iter([64, 4096])

        def load() -> Any:
            return make_config(rundir, max_message_size=next(sizes))

        service = yield start_ipcd(self, load(), load)
        message = encode(b"x" * 1000)

        def echo() -> bytes:
            with connect_unix(os.path.join(rundir, "pong")) as sock:
                sock.sendall(message)
                return recv_upto(sock, len(message))

        self.assertEqual((yield deferToThread(echo)), b"")  # closed: too large
        self.assertEqual(
            service.reload(),
            {"ok": True, "restart_needed": [], "changed": ["max_message_size"]},
        )
        self.assertEqual((yield deferToThread(echo)), message)


class TlsListenerRefusedTests(TestCase):
    @inlineCallbacks
    def test_fileAndReload(self) -> Any:
        """
        A configuration file giving tcpd or tlsd a TLS listener (C{ssl:},
        C{tls:}) is refused at load, and by a reload, which keeps the
        listener running: tcpd's client got no answer on one, ever.
        """
        rundir = short_rundir(self)
        path = os.path.join(rundir, "ipcd.toml")

        def write(section: str, listen: str) -> None:
            with open(path, "w") as f:
                f.write(f'rundir = "{rundir}"\n[websocketd]\nenabled = false\n')
                f.write(f"[{section}]\nlisten = '{listen}'\n")

        def load() -> Any:
            return load_config(path, None, {})

        write("tcpd", "tcp:0:interface=127.0.0.1")
        service = yield start_ipcd(self, load(), load)
        for section, listen in (
            ("tcpd", "ssl:9444:privateKey=/k.pem"),
            ("tcpd", "tls:/d:9444"),
            ("tlsd", "haproxy:tls:/d:9444"),
        ):
            write(section, listen)
            expected = f"{path}: [{section}] listen: {listen!r}: {section} "
            error = self.assertRaises(ConfigError, load)
            self.assertTrue(str(error).startswith(expected), str(error))
            answer = service.reload()
            self.assertFalse(answer["ok"])
            self.assertTrue(answer["error"].startswith(expected), answer)
        self.assertTrue(service.getServiceNamed("tcpd").listener.running)


# A listener that takes no fixed port, for a daemon the file turns on.
ANY_PORT = "tcp:0:interface=127.0.0.1"


class CommandLineReloadTests(SynchronousTestCase):
    """
    A reload reports as needing a restart only what a restart would change:
    not a key the command line sets (it wins over the file, at the reload
    too), nor one of a daemon that is off before and after (--no-tcp, or
    udpd's default), whose listener a restart would not open either.
    """

    def reload(self, argv: list[str], before: str, after: str) -> Any:
        """
        The answer of a reload of C{twistd ipcd ARGV --config FILE} (the
        file C{before} at start, C{after} at the reload), as ipcd's own
        options load it.
        """
        from ipcd.options import Options
        from ipcd.tap import IPCDService

        work = short_rundir(self)
        path = os.path.join(work, "ipcd.toml")
        with open(path, "w") as f:
            f.write(before)
        options = Options()
        rundir = os.path.join(work, "run")
        options.parseOptions(["--rundir", rundir, "--config", path, *argv])
        # Built, not started: a reload reads the file and compares.
        service = IPCDService(options.config, reactor, options.load_config)
        with open(path, "w") as f:
            f.write(after)
        return service.reload()

    def test_switches(self) -> None:
        off = "[tcpd]\nenabled = false\n[websocketd]\nenabled = false\n"
        other = short_rundir(self)
        cases = [
            (["--no-tcp", "--no-ws"], "", f"[tcpd]\nlisten = '{ANY_PORT}'\n"),
            (["--no-tls"], off, off + f"[tlsd]\nlisten = '{ANY_PORT}'\n"),
            (["--no-ws", "--no-tcp"], "", f"[websocketd]\nlisten = '{ANY_PORT}'\n"),
            # udpd is off unless asked for, with or without --no-udp.
            ([], off, off + "[udpd]\nlisten = 'udp:0'\nmax_datagram = 1200\n"),
            (["--no-udp"], off, off + "[udpd]\nenabled = true\nmax_datagram = 1200\n"),
            # The command line's value is kept: nothing changes.
            (["--tcp", ANY_PORT, "--no-ws"], "", "[tcpd]\nenabled = false\n"),
            (["--tcp", ANY_PORT, "--no-ws"], "", "[tcpd]\nlisten = 'tcp:1'\n"),
            (["--no-pongd"], off, off + "[pongd]\nenabled = true\n"),
            (["--metrics", "0"], off, off + "[metrics]\nlisten = '9'\n"),
        ]
        for argv, before, after in cases:
            with self.subTest(argv=argv, after=after):
                answer = self.reload(argv, before, after)
                self.assertEqual((answer["ok"], answer["restart_needed"]), (True, []))
        # --rundir wins over the file's rundir.
        answer = self.reload([], off, f"rundir = '{other}'\n" + off)
        self.assertEqual((answer["ok"], answer["restart_needed"]), (True, []))

    def test_stillReported(self) -> None:
        """What a restart would change is reported as ever."""
        off = "[websocketd]\nenabled = false\n"
        tcpd = f"{off}[tcpd]\nlisten = '{ANY_PORT}'\n"
        cases = [
            ([], tcpd, f"{off}[tcpd]\nlisten = 'tcp:0'\n", ["tcp_listen"]),
            # Turned off (its listener back to the default): the key that
            # turns it, not its listener too.
            ([], tcpd, f"{off}[tcpd]\nenabled = false\n", ["tcp_enabled"]),
            (
                ["--no-pongd"],
                tcpd,
                tcpd + "[control]\ngroup = 'root'\n",
                ["control_group"],
            ),
            (
                [],
                tcpd,
                tcpd + "[udpd]\nenabled = true\nmax_datagram = 1200\n",
                ["udp_enabled"],
            ),
        ]
        for argv, before, after, restart in cases:
            with self.subTest(argv=argv, after=after):
                answer = self.reload(argv, before, after)
                self.assertEqual(
                    (answer["ok"], answer["restart_needed"]), (True, restart)
                )


class TlsListenerReloadTests(SynchronousTestCase):
    """
    tlsd listens only with a certificate or keys, decided at start: a
    reload reports its listener as needing a restart when that would open
    or close it, at every reload until the restart, and not when it would
    not listen either way.
    """

    def setUp(self) -> None:
        self.work = short_rundir(self)
        self.path = os.path.join(self.work, "ipcd.toml")
        _ca, cert, key = make_ca(self.work)
        self.keys = f"[tlsd]\ncertificate = '{cert}'\nkey = '{key}'\n"

    def start(self, text: str) -> Any:
        from ipcd.options import Options
        from ipcd.tap import IPCDService

        self.write(text)
        options = Options()
        rundir = os.path.join(self.work, "run")
        argv = ["--rundir", rundir, "--config", self.path, "--no-tcp", "--no-ws"]
        options.parseOptions(argv)
        # Built, not started: tlsd's listener is made, or not, already.
        return IPCDService(options.config, reactor, options.load_config)

    def write(self, text: str) -> None:
        with open(self.path, "w") as f:
            f.write(text)

    def test_noListenerEitherWay(self) -> None:
        """
        Without keys, its listen changing is nothing a restart would open;
        the old value stays in force, as any restart key's, so that keys
        configured later are reported against what runs.
        """
        service = self.start("")
        self.write(f"[tlsd]\nlisten = '{ANY_PORT}'\n")
        self.assertEqual(
            service.reload(), {"ok": True, "restart_needed": [], "changed": []}
        )
        listen = service.config.daemons["tlsd"]["listen"]
        self.assertEqual(listen, "tcp:9001:interface=127.0.0.1")

    def test_keysConfigured(self) -> None:
        """
        The first certificate and key: its listener runs after a restart,
        said at this reload and the next (it said 'reloaded', and 'ipcd
        status' showed a tls_listen nothing listened on).
        """
        service = self.start("")
        self.write(self.keys)
        for _ in range(2):
            answer = service.reload()
            self.assertEqual(answer["restart_needed"], ["tls_listen"])

    def test_keysRemoved(self) -> None:
        """No certificate or keys any more: its listener stops at a restart."""
        service = self.start(self.keys)
        self.write("")
        answer = service.reload()
        self.assertEqual(
            answer,
            {
                "ok": True,
                "restart_needed": ["tls_listen"],
                "changed": ["[tlsd] certificate", "[tlsd] key"],
            },
        )


class DaemonHookTests(TestCase):
    @inlineCallbacks
    def test_hookRaises(self) -> Any:
        """
        A third party's daemon whose C{reconfigured} raises: logged; the
        reload, in force already, still tells the other daemons (tlsd,
        after it) and is answered ok on the control socket.
        """
        rundir = short_rundir(self)

        def load() -> Any:
            layer = {
                "rundir": rundir,
                "tcpd": {"enabled": False},
                "websocketd": {"enabled": False},
                "testschemed": {"enabled": True},
            }
            return load_config(None, layer, environ={}, registry=with_testscheme())

        service = yield start_ipcd(self, load(), load)
        hooks = service.daemon_services
        self.assertEqual(list(hooks)[:2], ["testschemed", "tlsd"])

        def broken() -> None:
            raise RuntimeError("a third party's bug")

        told = []
        tlsd_hook = hooks["tlsd"].reconfigured
        hooks["testschemed"].reconfigured = broken
        hooks["tlsd"].reconfigured = lambda: (told.append("tlsd"), tlsd_hook())[1]
        answer = yield deferToThread(control.request, "reload", rundir)
        self.assertEqual(answer, {"ok": True, "restart_needed": [], "changed": []})
        self.assertEqual(told, ["tlsd"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class ReloadGateTests(SynchronousTestCase):
    """L{ReloadGate}: at most one reload per interval, the rest share one."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.answers = iter(range(100))
        self.gate = ReloadGate(lambda: {"ok": next(self.answers)}, self.clock, 0.1)

    def answer(self, requested: Deferred[Any]) -> Any:
        return self.successResultOf(requested)["ok"]

    def test_firstAtOnce(self) -> None:
        self.assertEqual(self.answer(self.gate.request()), 0)
        self.clock.advance(0.1)
        self.assertEqual(self.answer(self.gate.request()), 1)

    def test_burstSharesOne(self) -> None:
        """Requests within the interval wait, then share one reload."""
        self.assertEqual(self.answer(self.gate.request()), 0)
        burst = [self.gate.request() for _ in range(50)]
        self.assertEqual([self.assertNoResult(d) for d in burst], [None] * 50)
        self.clock.advance(0.1)
        self.assertEqual({self.answer(d) for d in burst}, {1})
        self.assertEqual(self.gate.runs, 2)
        # The next one, within the interval after that reload, waits too.
        later = self.gate.request()
        self.assertNoResult(later)
        self.clock.advance(0.1)
        self.assertEqual(self.answer(later), 2)

    def test_stop(self) -> None:
        """Stopping answers the waiting requests; no call is left pending."""
        self.gate.request()
        waiting = self.gate.request()
        self.gate.stop()
        self.assertEqual(
            self.successResultOf(waiting),
            {"ok": False, "error": "ipcd is stopping"},
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_askedAfterStop(self) -> None:
        """
        A control connection made before ipcd began to stop may still ask:
        answered that ipcd is stopping, with no reload run or scheduled.
        """
        self.gate.request()
        self.gate.stop()
        self.assertEqual(
            self.successResultOf(self.gate.request()),
            {"ok": False, "error": "ipcd is stopping"},
        )
        self.clock.advance(1)
        self.assertEqual(self.successResultOf(self.gate.request())["ok"], False)
        self.assertEqual((self.gate.runs, self.clock.getDelayedCalls()), (1, []))

    def test_clockSetBack(self) -> None:
        """
        The reactor's clock is the wall clock: set back by an hour after a
        reload, the next request still runs within the interval, not an
        hour later.
        """
        self.clock.advance(7200)
        self.assertEqual(self.answer(self.gate.request()), 0)
        self.clock.rightNow -= 3600
        requested = self.gate.request()
        self.clock.advance(0.1)
        self.assertEqual(self.answer(requested), 1)

    def test_slowReloadPauses(self) -> None:
        """
        A reload that took 50 ms (tlsd reading a CA bundle: 44 ms) is
        followed by 450 ms without one: reloads asked without end keep a
        tenth of the reactor's thread, not half.
        """

        def run() -> dict[str, Any]:
            self.clock.rightNow += 0.05  # the reload's own time
            return {"ok": self.gate.runs}

        self.gate.run = run
        self.assertEqual(self.answer(self.gate.request()), 1)
        self.clock.advance(0.1)
        requested = self.gate.request()
        self.clock.advance(0.33)  # 0.48 s
        self.assertNoResult(requested)
        self.clock.advance(0.03)  # 0.51 s: the pause is over at 0.5 s
        self.assertEqual(self.answer(requested), 2)

    def test_reloadRaises(self) -> None:
        """
        A reload that raises (a bug: a daemon's hook, say) is logged, and
        every request sharing it answered that it failed; the gate goes on.
        """
        raising = [False, True, True, False]

        def run() -> dict[str, Any]:
            if raising.pop(0):
                raise RuntimeError("a daemon's bug")
            return {"ok": True}

        gate = ReloadGate(run, self.clock, 0.1)
        failed = {"ok": False, "error": "reload failed: see ipcd's log"}
        self.assertEqual(self.successResultOf(gate.request()), {"ok": True})
        waiting = [gate.request() for _ in range(3)]
        self.clock.advance(0.1)
        self.assertEqual([self.successResultOf(d) for d in waiting], [failed] * 3)
        self.clock.advance(0.1)
        self.assertEqual(self.successResultOf(gate.request()), failed)
        self.clock.advance(0.1)
        self.assertEqual(self.successResultOf(gate.request()), {"ok": True})
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_dueButNotYetRun(self) -> None:
        """
        A request that comes when the waiting reload is due, before the
        reactor has run it (it handles I/O before timed calls), shares that
        reload: one reload, not two back to back.
        """
        self.assertEqual(self.answer(self.gate.request()), 0)
        waiting = self.gate.request()
        self.clock.rightNow += 0.1  # due; its call not run yet
        late = self.gate.request()
        self.assertNoResult(late)
        self.clock.advance(0)
        self.assertEqual([self.answer(waiting), self.answer(late)], [1, 1])
        self.assertEqual(self.gate.runs, 2)

    def test_clockForwardDuringReload(self) -> None:
        """
        The wall clock set an hour forward during a reload: it is not taken
        for an hour-long reload (nine hours' pause: every ipcd reload timed
        out); the next runs within two seconds.
        """

        def run() -> dict[str, Any]:
            self.clock.rightNow += 3600
            return {"ok": True}

        self.gate.run = run
        self.successResultOf(self.gate.request())
        self.clock.advance(1)
        requested = self.gate.request()
        self.assertNoResult(requested)
        self.clock.advance(1)
        self.successResultOf(requested)

    def test_neverTwoAtOnce(self) -> None:
        """
        A reload that answers later (its file read in a thread): requests
        meanwhile wait, however long it takes, and share the next one, run
        once it has ended and the pause after it is over.
        """
        reading: list[Deferred[Any]] = []

        def run() -> Deferred[Any]:
            reading.append(Deferred())
            return reading[-1]

        self.gate.run = run
        first = self.gate.request()
        self.clock.advance(5)  # long past the interval: still running
        waiting = [self.gate.request() for _ in range(3)]
        self.assertEqual((len(reading), self.clock.getDelayedCalls()), (1, []))
        reading[0].callback({"ok": "first"})
        self.assertEqual(self.successResultOf(first), {"ok": "first"})
        self.assertEqual([self.assertNoResult(d) for d in waiting], [None] * 3)
        # It took 5 s (counted as MAX_TOOK): the pause after it is 1.8 s.
        self.clock.advance(1.7)
        self.assertEqual(len(reading), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(reading), 2)
        reading[1].callback({"ok": "second"})
        self.assertEqual({self.answer(d) for d in waiting}, {"second"})
        self.assertEqual(self.gate.runs, 2)

    def test_failsLater(self) -> None:
        """A reload that fails later is logged and answered, as one that raises."""
        self.gate.run = lambda: fail(RuntimeError("a daemon's bug"))
        self.assertEqual(
            self.successResultOf(self.gate.request()),
            {"ok": False, "error": "reload failed: see ipcd's log"},
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class DocumentedBoundTests(SynchronousTestCase):
    """
    ipcd's gate (its defaults) as docs/configuration.rst gives it: reloads
    at most ten times a second, and after one that reads tlsd's CA bundle
    (44 ms) the next 0.4 s later.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.took = 0.0
        self.starts: list[float] = []

        def run() -> dict[str, Any]:
            self.starts.append(self.clock.seconds())
            self.clock.rightNow += self.took
            return {"ok": True}

        self.gate = ReloadGate(run, self.clock)

    def next_start(self, asked: float) -> float:
        """
        After a reload at 0 that took C{self.took}, when one asked at
        C{asked} starts (the clock steps by 1 ms).
        """
        self.successResultOf(self.gate.request())
        self.clock.rightNow = asked
        requested = self.gate.request()
        while not requested.called:
            self.clock.advance(0.001)
        return self.starts[-1]

    def test_tenASecond(self) -> None:
        """One asked within 0.1 s after a quick reload waits for 0.1 s."""
        self.assertAlmostEqual(self.next_start(0.05), 0.1, delta=0.002)

    def test_tenASecondCountedFromTheStart(self) -> None:
        """
        Each reload taking 8 ms, still ten a second: the next starts 0.1 s
        after the last started, not 0.1 s after it ended.
        """
        self.took = 0.008
        self.assertAlmostEqual(self.next_start(0.05), 0.1, delta=0.002)

    def test_slowReloadPause(self) -> None:
        """After a reload of 44 ms the next starts at 0.44 s: 0.396 s later."""
        self.took = 0.044
        self.assertAlmostEqual(self.next_start(0.1), 0.44, delta=0.002)


class ReloadBoundTests(TestCase):
    @inlineCallbacks
    def test_controlRequestsShareReloads(self) -> Any:
        """
        Reloads asked on the control socket while one has just run wait for
        the next and share it: every asker answered, the file read twice.
        """
        rundir = short_rundir(self)
        loads = []

        def load() -> Any:
            loads.append(None)
            return make_config(rundir)

        service = yield start_ipcd(self, load(), load)
        clock = service.reload_gate.clock = Clock()
        first = yield deferToThread(control.request, "reload", rundir)
        self.assertEqual(first, {"ok": True, "restart_needed": [], "changed": []})
        asking = [deferToThread(control.request, "reload", rundir) for _ in range(4)]
        yield wait_until(lambda: service.reload_gate.waiting == 4, "4 waiting")
        self.assertEqual(len(loads), 2)  # at start, and the first reload
        clock.advance(RELOAD_INTERVAL)
        answers = yield gatherResults(asking)
        self.assertEqual(answers, [first] * 4)
        self.assertEqual(len(loads), 3)

    @inlineCallbacks
    def test_gateWaitNotCutByControlTimeout(self) -> Any:
        """
        A reload waiting at the gate is ipcd's wait, not the client's: a
        control_timeout shorter than the wait (the gate held here) does not
        cut the request (it did: the reload ran later, and the client saw
        its connection closed); a silent client is still closed by it.
        """
        rundir = short_rundir(self)

        def load() -> Any:
            # Time enough to connect and ask, less than the gate's wait.
            return make_config(rundir, limits={"control_timeout": 0.5})

        service = yield start_ipcd(self, load(), load)
        clock = service.reload_gate.clock = Clock()
        counters = service.broker.counters
        # A reload (read in a thread): the next one waits at the gate.
        first = yield service.reload_gate.request()
        self.assertEqual(first, {"ok": True, "restart_needed": [], "changed": []})
        asking = deferToThread(control.request, "reload", rundir)
        yield wait_until(lambda: service.reload_gate.waiting == 1, "1 waiting")
        # Connected after the one waiting, so timed out after its deadline
        # would have passed.
        silent = connect_unix(os.path.join(rundir, "ipcd-control"))
        self.addCleanup(silent.close)
        timed_out = "control requests timed out"
        yield wait_until(lambda: counters[timed_out] >= 1, "the silent one closed")
        self.assertFalse(asking.called)
        clock.advance(RELOAD_INTERVAL)
        self.assertEqual((yield asking), first)
        self.assertEqual(counters[timed_out], 1)


class OldConfigurationFreedTests(TestCase):
    """After a reload nothing of ipcd's keeps the old configuration alive."""

    @inlineCallbacks
    def start(self, **overrides: Any) -> Any:
        self.rundir = short_rundir(self)

        def load() -> Any:
            return make_config(self.rundir, **overrides)

        self.service = yield start_ipcd(self, load(), load)
        return self.service

    def assertFreed(self, old: weakref.ref[Any]) -> None:
        gc.collect()
        self.assertIsNone(old(), "the old configuration is still referenced")

    @inlineCallbacks
    def test_plannedLookups(self) -> Any:
        """Lookups planned under it (each payload its own entry)."""
        yield self.start()
        for payload in (b"pong;", b"other;", b"pong;x unix://y"):
            (yield deferToThread(lookup, self.rundir, payload)).close_fds()
        old = weakref.ref(self.service.config)
        self.assertTrue(self.service.reload()["ok"])
        (yield deferToThread(lookup, self.rundir, b"pong;")).close_fds()
        self.assertFreed(old)

    @inlineCallbacks
    def test_targetConnectedAcrossReload(self) -> Any:
        """A remote peer's target that connected after the reload."""
        yield self.start(rules=["allow in slow"])
        server = slow_service(self, self.rundir)
        peer = Peer("127.0.0.1:1", frozenset({"ip:127.0.0.1"}))
        answer = self.service.broker.open_inbound("slow", peer)
        old = weakref.ref(self.service.config)
        self.assertTrue(self.service.reload()["ok"])
        yield accept_until(server, answer)
        (yield answer).close()
        self.assertFreed(old)


class ReadInAThreadTests(TestCase):
    """
    A reload asked on the control socket (or by SIGHUP) reads and parses the
    file in a thread: ipcd serves on meanwhile (a 1 MiB file held every
    lookup and relay 0.3 to 1 s); the result is applied on the reactor's
    thread, and a reload asked meanwhile waits for the next.
    """

    @inlineCallbacks
    def start(self) -> Any:
        self.rundir = rundir = short_rundir(self)
        self.release = threading.Event()
        self.parsing = threading.Event()
        self.reads: list[str] = []  # the thread each read ran on
        self.held: list[bool] = []  # whether the test let a held read go
        self.hold = False

        def load() -> Any:
            self.reads.append(threading.current_thread().name)
            if self.hold:
                self.hold = False
                self.parsing.set()
                # Let go by the test, once it was served meanwhile; bounded:
                # on the reactor's thread nobody could let it go.
                self.held.append(self.release.wait(2 * TIMEOUT))
            return make_config(rundir, rules=[f"deny local r{len(self.reads)}"])

        self.service = yield start_ipcd(self, load(), load)
        return self.service

    @inlineCallbacks
    def test_servedWhileParsing(self) -> Any:
        """
        While a reload's parse is held, a lookup is answered (a working fd
        to pongd) and a second reload waits; let go, the first is applied,
        then the second, each answered by its own read.
        """
        yield self.start()
        self.hold = True
        first = deferToThread(control.request, "reload", self.rundir, 4 * TIMEOUT)
        yield wait_until(self.parsing.is_set, "the parse to begin")
        reply = yield deferToThread(lookup, self.rundir, b"pong;")
        with reply.take_socket(self) as sock:
            self.assertEqual((yield deferToThread(bounce, sock)), encode(b"bounce me"))
        second = deferToThread(control.request, "reload", self.rundir, 4 * TIMEOUT)
        yield wait_until(lambda: self.service.reload_gate.waiting == 1, "it waits")
        self.assertEqual(str(self.service.config.rules[0]), "deny local r1 *")
        self.release.set()
        reloaded = {"ok": True, "restart_needed": [], "changed": ["rules"]}
        self.assertEqual((yield first), reloaded)
        self.assertEqual((yield second), reloaded)
        self.assertEqual(self.held, [True])
        self.assertEqual(str(self.service.config.rules[0]), "deny local r3 *")
        main = threading.main_thread().name
        self.assertEqual([name == main for name in self.reads], [True, False, False])

    @inlineCallbacks
    def test_stoppedWhileParsing(self) -> Any:
        """
        ipcd stops while a reload's file is read: nothing is applied, and
        the asker is told that ipcd is stopping.
        """
        yield self.start()
        self.hold = True
        asked = self.service.reload_gate.request()
        yield wait_until(self.parsing.is_set, "the parse to begin")
        yield self.service.stopService()
        self.release.set()
        self.assertEqual((yield asked), {"ok": False, "error": "ipcd is stopping"})
        self.assertEqual(str(self.service.config.rules[0]), "deny local r1 *")

    @inlineCallbacks
    def test_hangupWaitsItsTurn(self) -> Any:
        """
        SIGHUP while a reload's file is read waits for the next reload, as
        ipcd reload does: the configuration in force at the end is the one
        read last.  (It reloaded at once, beside the gate: the read held
        then applied last, its older file in force.)
        """
        yield self.start()
        self.hold = True
        first = self.service.reload_gate.request()
        yield wait_until(self.parsing.is_set, "the parse to begin")
        os.kill(os.getpid(), signal.SIGHUP)
        yield wait_until(lambda: self.service.reload_gate.waiting == 1, "it waits")
        self.release.set()
        self.assertTrue((yield first)["ok"])
        # Applied (and counted), not only begun: its read is in a thread.
        yield wait_until(lambda: self.service.reloads.count == 2, "it applied")
        self.assertEqual(len(self.reads), 3)
        self.assertEqual(str(self.service.config.rules[0]), "deny local r3 *")

    @inlineCallbacks
    def test_notQueuedBehindHostLookups(self) -> Any:
        """
        A reload is read in a thread of its own, not of the reactor's pool:
        there, every route's host name is looked up (getaddrinfo), and a
        lookup's deadline does not end that thread; any local user who may
        name a route (allow_client_routes) filled the pool with names whose
        DNS never answers, and each reload (ipcd reload, SIGHUP) waited
        behind them, for as long as the user went on.  The pool's threads
        held here stand in for those lookups.
        """
        service = yield self.start()
        pool = reactor.getThreadPool()
        lookups_end = threading.Event()
        ended_by_timeout: list[bool] = []

        def host_lookup() -> None:
            # Bounded: without the fix the reload waits for these to end.
            if not lookups_end.wait(TIMEOUT):
                ended_by_timeout.append(True)

        self.addCleanup(lookups_end.set)
        for _ in range(pool.max):
            pool.callInThread(host_lookup)
        answer = yield service.reload_gate.request()
        self.assertEqual((answer["ok"], ended_by_timeout), (True, []))
        self.assertEqual(str(service.config.rules[0]), "deny local r2 *")

    @inlineCallbacks
    def test_stoppedWhileParsingUnderSystemd(self) -> Any:
        """
        Under systemd, ipcd stopping while a reload's file is read: the
        manager has RELOADING=1 then STOPPING=1, and nothing after.  The
        late result told the notifier, closed at the stop, that the reload
        was over: a warning 'cannot tell systemd ... Bad file descriptor
        (ipcd serves on ...)' as ipcd stopped, and a refused reload counted
        in ipcd status.
        """
        service = yield self.start()
        path = os.path.join(short_rundir(self, "ipcd-sdn-"), "notify")
        manager = Manager(self, path)
        Readiness(Notifier(path), service).setServiceParent(service)
        service.readiness = service.getServiceNamed("sd_notify")
        self.assertEqual(manager.receive()["READY"], "1")
        said: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(said.append)
        self.addCleanup(globalLogPublisher.removeObserver, said.append)
        self.hold = True
        asked = service.reload_gate.request()
        yield wait_until(self.parsing.is_set, "the parse to begin")
        self.assertIn("RELOADING", manager.receive())
        yield service.stopService()
        self.assertEqual(manager.receive()["STOPPING"], "1")
        self.release.set()
        self.assertEqual((yield asked), {"ok": False, "error": "ipcd is stopping"})
        warned = [e for e in said if "cannot tell systemd" in e.get("log_format", "")]
        self.assertEqual((warned, service.reloads.count), ([], 0))
