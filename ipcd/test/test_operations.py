"""
Policy and operations on a running instance: the seed's rule set, local
uid/group rules, reload (control command and SIGHUP), status.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from ipcd import control, version
from ipcd.config import ConfigError, load_config
from ipcd.identity import local_labels
from ipcd.options import Options
from ipcd.reloads import Reloads, instance_lines
from ipcd.scripts.ipcd import join_words
from ipcd.services import IPCService
from ipcd.services.pongd import Pong
from ipcd.tap import IPCDService
from ipcd.test.support import as_user, make_config, start_ipcd
from ipcd.wire import encode

TIMEOUT = 10


def _tcp_request(
    port: int, service: bytes, message: bytes | None
) -> tuple[bytes, bytes]:
    """Ask tcpd at C{port} for C{service} (raw, as upstream); echo C{message}."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(service)
        answer = sock.recv(2)
        if answer != b"ok":
            rest = b""
            while chunk := sock.recv(4096):
                rest += chunk
            return answer + rest, b""
        if message is None:
            return answer, b""
        sock.sendall(encode(message))
        echo = b""
        while len(echo) < len(message) + 4:
            chunk = sock.recv(4096)
            if not chunk:
                break
            echo += chunk
        return answer, echo


def _lookup(rundir: str, payload: bytes) -> tuple[bytes, int]:
    """A plain upstream-style lookup: reply bytes and how many fds came."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(os.path.join(rundir, "ipc"))
        sock.sendall(encode(payload))
        data, fds, _flags, _addr = socket.recv_fds(sock, 4096, 4)
        for fd in fds:
            os.close(fd)
        return data, len(fds)


class _Instance:
    """An in-process ipcd (with tcpd on a free loopback port)."""

    def __init__(self, test: TestCase, argv: list[str], config_file: str | None = None):
        self.rundir = tempfile.mkdtemp(prefix="ipcd-ops-", dir="/tmp")
        test.addCleanup(shutil.rmtree, self.rundir, True)
        options = Options()
        args = [
            "--rundir",
            self.rundir,
            "--tcp",
            "tcp:0:interface=127.0.0.1",
            "--no-ws",
        ]
        if config_file:
            args += ["--config", config_file]
        options.parseOptions(args + join_words(argv))
        self.service = IPCDService(
            options.config,
            reactor,
            lambda: load_config(options["config"], options.overrides()),
        )

    @inlineCallbacks
    def start(self, test: TestCase) -> Any:
        self.service.startService()
        test.addCleanup(self.service.stopService)
        test.addCleanup(self.relays_closed)
        port = yield self.service.getServiceNamed("tcpd").listening()
        self.port = port.getHost().port

    @inlineCallbacks
    def relays_closed(self) -> Any:
        """Wait (bounded) until every relayed connection has closed."""
        for _ in range(500):
            if not self.service.broker.relays:
                return
            yield deferLater(reactor, 0.01, lambda: None)
        raise AssertionError(f"relays still open: {self.service.broker.relays}")


class SeedRulesTests(TestCase):
    """`ipcd --allow in authd --deny in '*' '*' --allow out pong`, as written."""

    @inlineCallbacks
    def test_seed_rule_set(self) -> Any:
        # Host B runs the seed's rules and two services: authd and pong.
        b = _Instance(
            self,
            [
                "--allow",
                "in",
                "authd",
                "--deny",
                "in",
                "*",
                "*",
                "--allow",
                "out",
                "pong",
            ],
        )
        authd = IPCService("authd", _pong_factory(), b.rundir, reactor)
        authd.setServiceParent(b.service)
        yield b.start(self)
        self.assertEqual(
            [str(r) for r in b.service.config.rules],
            ["allow in authd *", "deny in * *", "allow out pong *"],
        )
        answer, echo = yield deferToThread(_tcp_request, b.port, b"authd", b"hi")
        self.assertEqual((answer, echo), (b"ok", encode(b"hi")))
        answer, _ = yield deferToThread(_tcp_request, b.port, b"pong", None)
        self.assertEqual(answer, b"ne refused")
        self.assertEqual(b.service.broker.counters["denied by rule 2 (deny in * *)"], 1)
        # A local client of B reaches pong remotely (on host A) through `out`.
        a = _Instance(self, ["--allow", "in", "pong"])
        yield a.start(self)
        route = f"pong;pong tcp://127.0.0.1:{a.port}/pong".encode()
        data, fds = yield deferToThread(_lookup, b.rundir, route)
        self.assertEqual((data, fds), (b"ok", 1))
        self.assertEqual(b.service.broker.counters["denied by rule 2 (deny in * *)"], 1)


def _pong_factory() -> Any:
    from twisted.internet.protocol import Factory

    return Factory.forProtocol(Pong)


@inlineCallbacks
def _open_to_all(test: TestCase, rules: list[str]) -> Any:
    """
    Start an instance with C{rules} whose RUNDIR/ipc and pong any user may
    reach (so the firewall alone decides); fire with C{run_as(uid, gid)},
    which makes one lookup of pong from a child process under those ids (and
    no supplementary groups) and returns its answer line (C{"ok 1"}, or the
    refusal and its fd count).
    """
    inst = _Instance(test, rules)
    yield inst.start(test)
    path = os.path.join(inst.rundir, "ipc")
    os.chmod(inst.rundir, 0o777)
    os.chmod(path, 0o777)
    os.chmod(os.path.join(inst.rundir, "pong"), 0o666)

    @inlineCallbacks
    def run_as(uid: int, gid: int) -> Any:
        answer = yield as_user(path, uid, gid, (), "pong;")
        return f"{answer['reply']} {answer['fds']}"

    return run_as


class LocalIdentityTests(TestCase):
    """`local` rules on uid/user/group labels from SO_PEERCRED."""

    @inlineCallbacks
    def test_one_user_allowed_another_refused(self) -> Any:
        if os.getuid() != 0:
            raise SkipTest("needs root to run a client under a second uid")
        try:
            nobody = pwd.getpwnam("nobody")
        except KeyError:
            raise SkipTest("no 'nobody' user on this machine")
        root_group = __import__("grp").getgrgid(0).gr_name
        rules = [
            "--allow",
            "local",
            "pong",
            "uid:0",
            "--allow",
            "local",
            "pong",
            f"group:{root_group}",
            "--deny",
            "local",
            "pong",
            "*",
        ]
        run_as = yield _open_to_all(self, rules)
        allowed = yield run_as(0, 0)
        self.assertEqual(allowed, "ok 1")
        refused = yield run_as(nobody.pw_uid, nobody.pw_gid)
        self.assertTrue(refused.startswith("ne "), refused)
        self.assertIn("rule 3", refused)
        self.assertTrue(refused.endswith(" 0"), "a refusal carries no fd")


class SupplementaryGroupTests(TestCase):
    """C{group:} labels include the user's supplementary groups."""

    def setUp(self) -> None:
        if os.getuid() != 0 or not shutil.which("useradd"):
            raise SkipTest("needs root and useradd to make a user with a group")
        suffix = f"{os.getpid() % 100000}"
        self.group, self.user = f"ipcdg{suffix}", f"ipcdu{suffix}"
        subprocess.run(["groupadd", self.group], check=True, timeout=TIMEOUT)
        self.addCleanup(subprocess.run, ["groupdel", self.group], timeout=TIMEOUT)
        subprocess.run(
            ["useradd", "-M", "-N", "-G", self.group, self.user],
            check=True,
            timeout=TIMEOUT,
        )
        self.addCleanup(subprocess.run, ["userdel", self.user], timeout=TIMEOUT)
        entry = pwd.getpwnam(self.user)
        self.uid, self.gid = entry.pw_uid, entry.pw_gid

    def test_labels(self) -> None:
        labels = local_labels(self.uid, self.gid)
        self.assertIn(f"uid:{self.uid}", labels)
        self.assertIn(f"user:{self.user}", labels)
        self.assertIn(f"group:{self.group}", labels)
        primary = __import__("grp").getgrgid(self.gid).gr_name
        self.assertNotEqual(primary, self.group, "the group must be supplementary")
        self.assertIn(f"group:{primary}", labels)

    @inlineCallbacks
    def test_rule_on_a_supplementary_group(self) -> Any:
        rules = [
            "--allow",
            "local",
            "pong",
            f"group:{self.group}",
            "--deny",
            "local",
            "pong",
            "*",
        ]
        run_as = yield _open_to_all(self, rules)

        # The child keeps only its primary gid: the label comes from the
        # user's group list, as the product says, not the process's groups.
        self.assertEqual((yield run_as(self.uid, self.gid)), "ok 1")
        refused = yield run_as(0, 0)
        self.assertTrue(refused.startswith("ne "), refused)


class ReloadAndStatusTests(TestCase):
    def _write(self, path: str, text: str) -> None:
        with open(path, "w") as f:
            f.write(textwrap.dedent(text))

    @inlineCallbacks
    def test_reload_valid_and_invalid(self) -> Any:
        config = os.path.join(tempfile.mkdtemp(dir="/tmp"), "ipcd.toml")
        self.addCleanup(shutil.rmtree, os.path.dirname(config), True)
        self._write(config, 'rules = ["allow in pong"]\n')
        inst = _Instance(self, [], config)
        yield inst.start(self)

        # A live relayed connection, opened under the old rules.
        live = socket.create_connection(("127.0.0.1", inst.port), timeout=TIMEOUT)
        self.addCleanup(live.close)
        yield deferToThread(live.sendall, b"pong")
        self.assertEqual((yield deferToThread(live.recv, 2)), b"ok")

        # Invalid file: refused, the old config stays.
        self._write(config, 'rules = ["allow sideways pong"]\n')
        answer = yield deferToThread(control.request, "reload", inst.rundir)
        self.assertFalse(answer["ok"])
        self.assertIn("rules[0]", answer["error"])
        answer, echo = yield deferToThread(_tcp_request, inst.port, b"pong", b"x")
        self.assertEqual(answer, b"ok")

        # Valid file, applied by SIGHUP: new inbound connections are denied...
        self._write(config, 'rules = ["deny in pong"]\n')
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(200):
            if str(inst.service.config.rules[0]) == "deny in pong *":
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(
            [str(r) for r in inst.service.broker.config.rules], ["deny in pong *"]
        )
        answer, _ = yield deferToThread(_tcp_request, inst.port, b"pong", None)
        self.assertTrue(answer.startswith(b"ne "), answer)
        # ...and the existing one is untouched.
        yield deferToThread(live.sendall, encode(b"still here"))
        echo = yield deferToThread(live.recv, 100)
        self.assertEqual(echo, encode(b"still here"))

    @inlineCallbacks
    def test_status_lists_live_relay_with_bytes(self) -> Any:
        inst = _Instance(self, ["--allow", "in", "pong"])
        yield inst.start(self)
        live = socket.create_connection(("127.0.0.1", inst.port), timeout=TIMEOUT)
        self.addCleanup(live.close)
        yield deferToThread(live.sendall, b"pong")
        self.assertEqual((yield deferToThread(live.recv, 2)), b"ok")
        yield deferToThread(live.sendall, encode(b"hello"))
        self.assertEqual((yield deferToThread(live.recv, 100)), encode(b"hello"))

        report = yield deferToThread(control.request, "status", inst.rundir)
        [connection] = report["connections"]
        self.assertEqual(connection["direction"], "in")
        self.assertEqual(connection["service"], "pong")
        self.assertIn("ip:127.0.0.1", connection["labels"])
        self.assertEqual((connection["bytes_in"], connection["bytes_out"]), (9, 9))
        self.assertEqual(report["counters"]["inbound requests"], 1)
        self.assertEqual(report["config"]["rules"], ["allow in pong *"])
        text = control.format_status(report)
        self.assertIn("pong", text)
        self.assertIn("9 B", text)
        json.dumps(report)  # the --json form is plain JSON

        # Closed connections leave the list.
        live.close()
        for _ in range(200):
            if not inst.service.broker.relays:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        report = yield deferToThread(control.request, "status", inst.rundir)
        self.assertEqual(report["connections"], [])

    @inlineCallbacks
    def test_status_shows_limits_in_use(self) -> Any:
        """
        How full each limit is: tcpd's listener with two relays from one
        address, its maxima and that peer; in the text, one line each.
        """
        inst = _Instance(self, ["--allow", "in", "pong"])
        yield inst.start(self)
        for _ in range(2):
            live = socket.create_connection(("127.0.0.1", inst.port), timeout=TIMEOUT)
            self.addCleanup(live.close)
            yield deferToThread(live.sendall, b"pong")
            self.assertEqual((yield deferToThread(live.recv, 2)), b"ok")
        report = yield deferToThread(control.request, "status", inst.rundir)
        self.assertEqual(
            report["limits"]["tcpd"],
            {
                "open": 2,
                "max": 1024,
                "max_per_peer": 128,
                "busiest": {"peer": "ip:127.0.0.1/32", "open": 2, "exempt": False},
            },
        )
        # This test's own uid is ipcd's: no per-peer maximum holds it.
        control_socket = report["limits"]["ipcd-control"]["busiest"]
        self.assertEqual((control_socket["open"], control_socket["exempt"]), (1, True))
        lines = control.format_status(report).splitlines()
        self.assertIn(
            "  tcpd: 2 open of 1024, 128 per peer; busiest ip:127.0.0.1/32 with 2",
            lines,
        )
        self.assertIn(
            f"  ipcd-control: 1 open of 1024, 128 per peer; busiest uid:{os.getuid()} "
            "with 1 (ipcd's own uid: no per-peer cap)",
            lines,
        )

    @inlineCallbacks
    def test_control_socket_is_private(self) -> Any:
        inst = _Instance(self, [])
        yield inst.start(self)
        mode = os.stat(os.path.join(inst.rundir, "ipcd-control")).st_mode & 0o777
        self.assertEqual(mode, 0o600)
        answer = yield deferToThread(control.request, "bogus", inst.rundir)
        self.assertEqual(answer, {"ok": False, "error": "unknown command 'bogus'"})


class InstanceLinesTests(SynchronousTestCase):
    """L{ipcd.reloads}: the instance's lines, on a clock of the test's."""

    def test_lines(self) -> None:
        now = [1_800_000_000.0]
        reloads = Reloads(lambda: now[0])
        now[0] += 3 * 3600 + 25 * 60 + 7
        self.assertEqual(
            instance_lines(reloads.status("9.9")),
            [
                f"ipcd: version 9.9, pid {os.getpid()}, up 3h 25m (since "
                "2027-01-15 08:00:00 UTC)",
                "reloads: none",
            ],
        )
        reloads.record({"ok": True, "restart_needed": ["pongd", "tcp_listen"]})
        now[0] += 2 * 86400
        reloads.record({"ok": True, "restart_needed": []})
        lines = instance_lines(reloads.status("9.9"))
        self.assertEqual(
            lines[1:], ["reloads: 2, the last at 2027-01-17 11:25:07 UTC: reloaded"]
        )
        self.assertIn(", up 2d 3h (since ", lines[0])
        # In force but not whole: what was not applied stays to be read.
        reloads.record(
            {"ok": True, "restart_needed": [], "not_applied": ["tlsd: keeping"]}
        )
        self.assertEqual(
            instance_lines(reloads.status("9.9"))[1:],
            [
                "reloads: 3, the last at 2027-01-17 11:25:07 UTC: reloaded, "
                "not applied: tlsd: keeping"
            ],
        )


class InstanceStatusTests(TestCase):
    """
    C{ipcd status} says what runs (version, pid, since when) and how its
    reloads went: a SIGHUP's is answered to nobody, and a refused one left
    the old configuration in force with nothing in the status to say so.
    """

    @inlineCallbacks
    def test_reloadsAsTheyWent(self) -> Any:
        rundir = tempfile.mkdtemp(prefix="ipcd-ops-", dir="/tmp")
        self.addCleanup(shutil.rmtree, rundir, True)
        loads = iter(
            [
                make_config(rundir, pongd={"enabled": False}),
                ConfigError("ipcd.toml: [limits] max_connections: expected ..."),
            ]
        )

        def load() -> Any:
            loaded = next(loads)
            if isinstance(loaded, ConfigError):
                raise loaded
            return loaded

        service = yield start_ipcd(self, make_config(rundir), load)

        def status() -> Any:
            return deferToThread(control.request, "status", rundir)

        report = yield status()
        instance = report["ipcd"]
        self.assertEqual(
            (instance["version"], instance["pid"], instance["reloads"]),
            (version(), os.getpid(), 0),
        )
        self.assertEqual(
            (instance["last_reload"], instance["restart_needed"]), (None, [])
        )
        lines = control.format_status(report).splitlines()
        self.assertTrue(lines[0].startswith(f"ipcd: version {version()}, pid "), lines)
        self.assertEqual(lines[1], "reloads: none")
        self.assertTrue(service.reload()["ok"])  # pongd: a restart's
        self.assertFalse(service.reload()["ok"])  # refused: pongd still waits
        instance = (yield status())["ipcd"]
        self.assertEqual(instance["reloads"], 2)
        last = instance["last_reload"]
        self.assertEqual(
            (last["ok"], last["error"]),
            (False, "ipcd.toml: [limits] max_connections: expected ..."),
        )
        self.assertEqual(instance["restart_needed"], ["pongd"])
        lines = control.format_status({**report, "ipcd": instance}, wide=True)
        self.assertIn(
            f"reloads: 2, the last at {last['at']}: refused: ipcd.toml: [limits] "
            "max_connections: expected ...",
            lines.splitlines(),
        )
        self.assertIn("restart needed for: pongd", lines.splitlines())
