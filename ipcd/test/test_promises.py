"""
What the core promises, pinned where a mutation run found it unpinned
(issue 14; C{benchmarks/mutate.py}).  Each test names the mutant it kills.
"""

from __future__ import annotations

import dataclasses
import errno
import grp
import os
import socket
import stat
from types import MappingProxyType
from typing import Any

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import (
    EventLoggingObserver,
    MemoryReactor,
    StringTransport,
)
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ipcd import access, names, rundir
from ipcd.access import AccessDenied, Credentials, open_socket
from ipcd.broker import Broker
from ipcd.config import Config, ConfigError, load_config
from ipcd.daemons import settings_of
from ipcd.daemons.tcp import tcpd
from ipcd.decisionlog import Request
from ipcd.errors import Refused
from ipcd.names import SocketInUse, clear_stale_socket, listen_unix
from ipcd.policy import (
    Decision,
    Grant,
    Rule,
    decide,
    find_grant,
    parse_grant,
    parse_rule,
    peer_matches,
)
from ipcd.resolution import MAX_HOPS, LocalTarget, Plan, RemoteTarget, plan
from ipcd.routes import (
    LocalURI,
    Lookup,
    PathURI,
    RemoteURI,
    Route,
    RouteError,
    parse_lookup,
    parse_network,
    parse_uri,
)
from ipcd.services.pongd import Pong, pongd
from ipcd.test.test_config import ConfigFileMixin
from ipcd.test.test_names import mode_of, short_tempdir, umask
from ipcd.wire import (
    HEADER,
    LOG_LINES_DROPPED,
    LimitLog,
    MessageFactory,
    MessageProtocol,
    MessageTooLarge,
    PartialMessageBudget,
    encode,
    recv_exactly,
    recv_message,
    send_message,
)


def other_group() -> grp.struct_group:
    """A group that is not this process's own (gid 0 is never used)."""
    for entry in grp.getgrall():
        if entry.gr_gid not in (0, 1, os.getegid()):
            return entry
    raise AssertionError("no group to test with")


class _FakeReactor:
    """
    C{listenUNIX} binds a real socket and records, at that instant, the
    process umask and the mode the socket file was created with.
    """

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []
        self.sockets: list[socket.socket] = []

    def listenUNIX(self, path: str, factory: Any, backlog: int, mode: int) -> Any:  # noqa: N802
        mask = os.umask(0o022)
        os.umask(mask)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sockets.append(sock)
        sock.bind(path)
        self.seen.append((mask, mode_of(path)))
        return sock


class ListenPermissionTests(SynchronousTestCase):
    """
    Point 1 (C{[control] group}) and point 3 (the umask held while
    binding): the socket never has more permissions, or another group,
    than asked.
    """

    def setUp(self) -> None:
        self.rundir = short_tempdir(self)
        self.path = os.path.join(self.rundir, "ipcd-control")
        self.factory = Factory.forProtocol(Protocol)

    def listen(self, **kwargs: Any) -> _FakeReactor:
        reactor = _FakeReactor()
        listen_unix(reactor, self.path, self.factory, **kwargs)
        for sock in reactor.sockets:
            self.addCleanup(sock.close)
        return reactor

    def test_umaskWhileBinding(self) -> None:
        """
        Under an open umask, the socket is born with the mode asked (0660),
        not more (kills C{os.umask(...)} -> C{os.umask(0)}).
        """
        umask(self, 0)
        reactor = self.listen()
        self.assertEqual(reactor.seen, [(0o117, 0o660)])
        self.assertEqual(os.umask(0), 0, "umask restored")

    def test_umaskFollowsMode(self) -> None:
        """A narrower mode narrows the umask too: 0600 is never 0660."""
        umask(self, 0)
        reactor = self.listen(mode=0o600)
        self.assertEqual(reactor.seen, [(0o177, 0o600)])

    def test_groupGiven(self) -> None:
        """Kills dropping the chown and flipping C{gid != -1}."""
        if os.geteuid() != 0:
            raise self.skipTest("chown to another group needs root")
        group = other_group()
        self.listen(group=group.gr_name)
        self.assertEqual(os.lstat(self.path).st_gid, group.gr_gid)

    def test_noGroupKeepsOwnGroup(self) -> None:
        """
        Without C{group} the socket keeps the creator's group: never group
        1 or any other (kills C{gid = -1} -> C{gid = 1} and the flipped
        test).
        """
        self.listen()
        self.assertEqual(os.lstat(self.path).st_gid, os.getegid())

    def test_noSuchGroup(self) -> None:
        """An unknown group is refused by name, before anything is created."""
        error = self.assertRaises(ValueError, self.listen, group="ipcd-no-such-group")
        self.assertEqual(
            str(error), f"no such group 'ipcd-no-such-group' for {self.path}"
        )
        self.assertFalse(os.path.lexists(self.path))

    def test_configControlGroup(self) -> None:
        """The config's key is C{[control] group}: kills renaming it."""
        name = grp.getgrgid(os.getegid()).gr_name
        config = load_config(None, {"control": {"group": name}}, {})
        self.assertEqual(config.control_group, name)
        self.assertIsNone(load_config(None, None, {}).control_group)
        error = self.assertRaises(
            ConfigError, load_config, None, {"control": {"grup": name}}, {}
        )
        self.assertIn("[control] grup: unknown key (known: group)", str(error))


class ListenGroupTests(TestCase):
    """Point 1 with the real reactor: the listening socket's group and mode."""

    def test_groupAndMode(self) -> None:
        if os.geteuid() != 0:
            raise self.skipTest("chown to another group needs root")
        from twisted.internet import reactor

        path = os.path.join(short_tempdir(self), "ipcd-control")
        group = other_group()
        factory = Factory.forProtocol(Protocol)
        port = listen_unix(reactor, path, factory, group=group.gr_name)
        self.addCleanup(port.stopListening)
        st = os.lstat(path)
        self.assertTrue(stat.S_ISSOCK(st.st_mode))
        self.assertEqual((st.st_gid, mode_of(path)), (group.gr_gid, 0o660))


class _Socket:
    """A blocking socket double: C{recv} returns at most C{step} bytes."""

    def __init__(self, data: bytes = b"", step: int = 1) -> None:
        self.data = data
        self.step = step
        self.sent: list[bytes] = []
        self.errno: int | None = None

    def recv(self, size: int) -> bytes:
        chunk = self.data[: min(size, self.step)]
        self.data = self.data[len(chunk) :]
        return chunk

    def sendall(self, data: bytes) -> None:
        self.sent.append(bytes(data))

    def send(self, data: bytes) -> int:
        self.sent.append(bytes(data))
        return len(data)


class BlockingFramingTests(SynchronousTestCase):
    """Point 7: writes are whole messages, reads reassemble short reads."""

    def test_sendOneWrite(self) -> None:
        """Kills sending the header and the payload in two C{sendall}s."""
        sock = _Socket()
        send_message(sock, b"bounce me")  # type: ignore[arg-type]
        self.assertEqual(sock.sent, [encode(b"bounce me")])

    def test_recvByteByByte(self) -> None:
        """Kills C{recv_exactly} returning the first chunk only."""
        sock = _Socket(encode(b"bounce me") + encode(b"again"), step=1)
        self.assertEqual(recv_message(sock), b"bounce me")  # type: ignore[arg-type]
        self.assertEqual(recv_message(sock), b"again")  # type: ignore[arg-type]

    def test_recvExactlyShortReads(self) -> None:
        sock = _Socket(b"abcdefg", step=3)
        self.assertEqual(recv_exactly(sock, 7), b"abcdefg")  # type: ignore[arg-type]

    def test_recvEofCountsBytes(self) -> None:
        sock = _Socket(b"abc", step=2)
        error = self.assertRaises(EOFError, recv_exactly, sock, 5)
        self.assertEqual(str(error), "connection closed after 3 of 5 bytes")

    def test_recvAtTheLimit(self) -> None:
        """Point 10: a message exactly at the limit is read; one more is not."""
        sock = _Socket(encode(b"x" * 8), step=5)
        self.assertEqual(recv_message(sock, 8), b"x" * 8)  # type: ignore[arg-type]
        sock = _Socket(encode(b"x" * 9), step=5)
        error = self.assertRaises(MessageTooLarge, recv_message, sock, 8)
        self.assertEqual((error.size, error.limit), (9, 8))

    def test_realSocketShortReads(self) -> None:
        """The same over a socketpair whose reader forces short reads."""
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        payload = bytes(range(256)) * 64
        send_message(a, payload)
        a.shutdown(socket.SHUT_WR)

        class Short:
            def recv(self, size: int) -> bytes:
                return b.recv(min(size, 7))

        self.assertEqual(recv_message(Short(), len(payload)), payload)  # type: ignore[arg-type]


class MessageSizeTests(SynchronousTestCase):
    """Point 6: the factory's (and so pongd's) maximum message size."""

    def connect(self, factory: Any) -> tuple[MessageProtocol, StringTransport]:
        protocol = factory.buildProtocol(None)
        protocol.idleTimeout = 0
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_factoryPassesLimit(self) -> None:
        factory = MessageFactory(Pong, 8, idleTimeout=0)
        protocol, transport = self.connect(factory)
        self.assertEqual(protocol.maxMessageSize, 8)
        protocol.dataReceived(encode(b"x" * 8))
        self.assertEqual(transport.value(), encode(b"x" * 8))
        protocol.dataReceived(HEADER.pack(9))
        self.assertTrue(transport.disconnecting)

    def test_pongdLimit(self) -> None:
        service = pongd("/nonexistent", max_message_size=16, idle_timeout=0)
        protocol, transport = self.connect(service.factory)
        protocol.dataReceived(encode(b"y" * 17))
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)


class PolicyTests(SynchronousTestCase):
    def test_cidrWithHostBits(self) -> None:
        """
        Point 2: C{ip:10.1.2.3/8} is accepted by L{parse_rule}, and then
        decides like C{ip:10.0.0.0/8} (kills C{strict=True} in
        L{peer_matches}).
        """
        rule = parse_rule("allow in pong ip:10.1.2.3/8")
        self.assertTrue(peer_matches(rule.peer, ["ip:10.200.0.1"]))
        self.assertFalse(peer_matches(rule.peer, ["ip:11.0.0.1"]))
        decision = decide([rule], "in", ["pong"], ["ip:10.9.9.9"])
        self.assertEqual(decision, Decision(True, rule, 1))

    def test_labelsOnce(self) -> None:
        """
        Point 8: labels given as a generator reach every rule and every
        name (kills consuming it once per rule).
        """
        rules = [parse_rule("allow in pong user:bob"), parse_rule("allow in * *")]
        rules.insert(1, parse_rule("allow in pong user:alice"))
        labels = ("uid:1000", "user:alice")
        decision = decide(rules, "in", ["pong", "pong2"], (x for x in labels))
        self.assertEqual(decision, Decision(True, rules[1], 2, "pong"))
        rules = [parse_rule("deny in a user:bob"), parse_rule("allow in * user:alice")]
        decision = decide(rules, "in", iter(["a", "b"]), (x for x in labels))
        self.assertEqual(decision, Decision(True, rules[1], 2, "a"))

    def test_rulesOnce(self) -> None:
        """Rules given as a generator are tried for every name."""
        rules = [parse_rule("deny local b *")]
        decision = decide((r for r in rules), "local", ["a", "b"], [])
        self.assertEqual(decision, Decision(False, rules[0], 1, "b"))

    def test_zoneIgnored(self) -> None:
        """A label's zone (C{%eth0}) is not part of its address."""
        self.assertTrue(peer_matches("ip:10.0.0.0/8", ["ip:10.1.2.3%lo"]))
        self.assertTrue(peer_matches("ip:fe80::/10", ["ip:fe80::1%eth0"]))

    def test_findGrant(self) -> None:
        """The first grant naming the service and one of the labels."""
        grants = [
            parse_grant("secret user:bob"),
            parse_grant("sec* group:ops"),
            parse_grant("secret *"),
        ]
        labels = ("uid:1000", "group:ops")
        self.assertEqual(
            find_grant(grants, "secret", (x for x in labels)), (2, grants[1])
        )
        self.assertEqual(find_grant(grants, "secret", ["user:bob"]), (1, grants[0]))
        self.assertEqual(find_grant(grants[:2], "other", labels), None)
        self.assertEqual(find_grant(grants[:2], "secret", ["user:eve"]), None)
        self.assertEqual(find_grant(grants[:1], "public", ["user:bob"]), None)

    def test_ipGlobs(self) -> None:
        """Point 10: C{?} and C{[} make an C{ip:} pattern a glob, not a CIDR."""
        for pattern in ("ip:10.0.0.?", "ip:10.0.0.[12]", "ip:10.0.*"):
            rule = parse_rule(f"allow in pong {pattern}")
            self.assertTrue(peer_matches(rule.peer, ["ip:10.0.0.1"]), pattern)
            self.assertFalse(peer_matches(rule.peer, ["ip:10.1.0.3"]), pattern)


class RouteTests(SynchronousTestCase):
    def test_blankEntryInTheMiddle(self) -> None:
        """Point 4: a blank entry is skipped, not the end (kills break)."""
        routes = parse_network("pong unix://x;; ;other unix://y;")
        self.assertEqual(
            routes, (Route("pong", LocalURI("x")), Route("other", LocalURI("y")))
        )
        lookup = parse_lookup(b"pong;;pong unix://x")
        self.assertEqual(lookup.routes, routes[:1])

    def test_twoSchemes(self) -> None:
        """Point 5: C{a://b://c} is a RouteError (kills splitting twice)."""
        error = self.assertRaises(RouteError, parse_uri, "a://b://c")
        self.assertIn("invalid host", str(error))
        self.assertRaises(RouteError, parse_uri, "tcp://h:1/x://y")

    def test_bracketsHoldAnAddress(self) -> None:
        """
        Point 10: C{[...]} holds an IPv6 address, nothing else: a zone only
        on a link-local one, checked (C{IPv6Address} would take any text
        after a '%'; test_routes.URITests.test_badZones).
        """
        for text in (
            "tcp://[foo]:1/x",
            "tcp://[]:1/x",
            "tcp://[10.0.0.1]:1/x",
            "tcp://[::1%eth0]:1/x",
            "tcp://[fe80::1%eth 0]:1/x",
            "tcp://[::1]x:1/x",
        ):
            self.assertRaises(RouteError, parse_uri, text)
        uri = parse_uri("tcp://[::1]:1/x")
        self.assertEqual((uri.host, uri.port), ("::1", 1))  # type: ignore[union-attr]

    def test_emptyURI(self) -> None:
        for text in ("", "  "):
            error = self.assertRaises(RouteError, parse_uri, text)
            self.assertEqual(str(error), "empty URI")

    def test_longURIShownCut(self) -> None:
        """A URI in a message is shown whole up to 64 characters, then cut."""
        for size, shown in ((64, None), (65, "... (65 characters)")):
            text = "tcp://" + "a" * (size - 11) + "_:1/x"
            self.assertEqual(len(text), size)
            error = self.assertRaises(RouteError, parse_uri, text)
            if shown is None:
                self.assertIn(f"invalid host in URI {text!r}: ", str(error))
            else:
                self.assertIn(f"invalid host in URI {text[:64]!r}{shown}", str(error))

    def test_portDigits(self) -> None:
        """Point 10: five digits at most, whatever their value."""
        self.assertEqual(parse_uri("tcp://h:00080/x").port, 80)  # type: ignore[union-attr]
        self.assertEqual(parse_uri("tcp://h:65535/x").port, 65535)  # type: ignore[union-attr]
        for port in ("000080", "065535", "65536", "0", "00000"):
            self.assertRaises(RouteError, parse_uri, f"tcp://h:{port}/x")


def _chain(hops: int) -> Config:
    redirects = {f"s{i}": f"s{i + 1}" for i in range(hops)}
    return Config(rundir="/r", redirects=MappingProxyType(redirects))


class HopTests(SynchronousTestCase):
    def test_maxHops(self) -> None:
        """Point 10: exactly C{MAX_HOPS} redirections are followed, no more."""
        self.assertEqual(MAX_HOPS, 32)
        self.assertEqual(
            plan(_chain(MAX_HOPS), "s0").target, LocalTarget("s32", "/r/s32")
        )
        error = self.assertRaises(Refused, plan, _chain(MAX_HOPS + 1), "s0")
        self.assertTrue(str(error).startswith("redirect loop: s0 -> s1 -> "))
        self.assertTrue(str(error).endswith(" -> s32 -> s33"), str(error))


class FrozenTests(SynchronousTestCase):
    def test_valuesAreImmutable(self) -> None:
        """Point 10: the value types are frozen (kills C{frozen=False})."""
        uri = parse_uri("tcp://h:1/x")
        values = [
            LocalURI("a"),
            PathURI("/a/b"),
            uri,
            Route("a", LocalURI("b")),
            Lookup("a"),
            Rule("allow", "in", "a"),
            Decision(True, None),
            Grant("a", "*"),
            Config(rundir="/r"),
            LocalTarget("a", "/r/a"),
            RemoteTarget(uri, "x"),  # type: ignore[arg-type]
            Plan(LocalTarget("a", "/r/a"), ("a",)),
            Credentials(0, 0),
        ]
        for value in values:
            field = dataclasses.fields(value)[0].name
            self.assertRaises(
                dataclasses.FrozenInstanceError, setattr, value, field, None
            )
        self.assertIsInstance(uri, RemoteURI)


_SOCKET = socket.socket  # names.socket.socket is patched below


class _RefusingSocket:
    """A probe whose C{connect} fails with a given errno."""

    def __init__(self, code: int) -> None:
        self.code = code
        self.closed = False

    blocking = True

    def setblocking(self, flag: bool) -> None:
        self.blocking = flag

    def connect(self, path: str) -> None:
        if self.blocking:
            raise AssertionError("a blocking probe would wait on a full backlog")
        raise OSError(self.code, os.strerror(self.code))

    def close(self) -> None:
        self.closed = True


class StaleSocketErrnoTests(SynchronousTestCase):
    """Point 10: the errno branches of stale-socket clearing."""

    def setUp(self) -> None:
        self.rundir = short_tempdir(self)
        self.path = os.path.join(self.rundir, "pong")
        self.bind()

    def bind(self) -> None:
        """A stale socket at C{path}."""
        with _SOCKET(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(self.path)

    def probe(self, code: int) -> list[_RefusingSocket]:
        made: list[_RefusingSocket] = []

        def factory(*args: Any) -> _RefusingSocket:
            made.append(_RefusingSocket(code))
            return made[-1]

        self.patch(names.socket, "socket", factory)
        return made

    def test_backlogFull(self) -> None:
        """EAGAIN: somebody listens (backlog full): refused, left alone."""
        made = self.probe(errno.EAGAIN)
        error = self.assertRaises(SocketInUse, clear_stale_socket, self.path)
        self.assertEqual(str(error), f"another process is listening on {self.path}")
        self.assertTrue(os.path.lexists(self.path))
        self.assertTrue(made[0].closed)

    def test_otherError(self) -> None:
        """
        Any other error is raised as it is, and nothing is removed (EACCES
        and EPERM are refusals saying why: test_names' test_mayNotConnect).
        """
        made = self.probe(errno.EPROTOTYPE)  # a datagram socket there
        error = self.assertRaises(OSError, clear_stale_socket, self.path)
        self.assertEqual(error.errno, errno.EPROTOTYPE)
        self.assertNotIsInstance(error, SocketInUse)
        self.assertTrue(os.path.lexists(self.path))
        self.assertTrue(made[0].closed)

    def test_refusedOrGone(self) -> None:
        for code in (errno.ECONNREFUSED, errno.ENOENT):
            self.probe(code)
            clear_stale_socket(self.path)
            self.assertFalse(os.path.lexists(self.path))
            self.bind()


class ConfigValueTests(ConfigFileMixin, SynchronousTestCase):
    """Point 9: values to refuse, as config errors naming file and key."""

    def test_maxMessageSize(self) -> None:
        for value, shown in (("0", "0"), ("-1", "-1"), ("true", "true")):
            self.assertEqual(
                self.error(f"max_message_size = {value}\n"),
                f"max_message_size: expected a whole number greater than 0, "
                f"got {shown}",
            )

    def test_daemonSection(self) -> None:
        """A daemon's section is checked against its own settings."""
        self.assertEqual(self.error("tcpd = 3\n"), "[tcpd]: expected a table")
        self.assertEqual(
            self.error("[tcpd]\nbogus = 1\n"),
            "[tcpd] bogus: unknown key (known: enabled, handshake_timeout, listen)",
        )

    def test_rundirNotString(self) -> None:
        self.assertEqual(
            self.error("rundir = 3\n"), "rundir: expected a non-empty string, got 3"
        )

    def test_listenNotString(self) -> None:
        self.assertEqual(
            self.error("[tcpd]\nlisten = 3\n"),
            "[tcpd] listen: expected an endpoint string like "
            "'tcp:9000:interface=127.0.0.1', got 3",
        )

    def test_redirectsNotTable(self) -> None:
        self.assertEqual(
            self.error("redirects = 3\n"),
            '[redirects]: expected a table of NAME = "..."',
        )
        self.assertEqual(
            self.error("routes = 3\n"), '[routes]: expected a table of NAME = "..."'
        )

    def test_trailingBackslash(self) -> None:
        """Twisted's parser raises RuntimeError on it: a config error here."""
        self.assertEqual(
            self.error("[tcpd]\nlisten = 'tcp:9000\\'\n"),
            "[tcpd] listen: invalid endpoint string 'tcp:9000\\\\': a '\\' at the "
            "end escapes nothing",
        )

    def test_limitsDefaults(self) -> None:
        config = Config(rundir="/r")
        self.assertEqual(
            (
                settings_of(config, tcpd)["handshake_timeout"],
                config.peer_prefix_ipv4,
                config.peer_prefix_ipv6,
                config.partial_message_budget,
            ),
            (5.0, 32, 64, 64 * 1024 * 1024),
        )
        loaded = load_config(None, None, {"RUNDIR": "/r"})
        # Loading fills each daemon's section with its defaults.
        self.assertEqual(settings_of(loaded, tcpd), settings_of(config, tcpd))
        self.assertEqual(dataclasses.replace(loaded, daemons=config.daemons), config)

    def test_boundaries(self) -> None:
        """The smallest and largest values accepted, and the next ones out."""
        good = {
            "lookup_timeout": 1,
            "connect_timeout": 0.5,
        }
        config = load_config(None, {"ipcd": good}, {})
        self.assertEqual((config.lookup_timeout, config.connect_timeout), (1.0, 0.5))
        limits = {"max_connections": 1, "peer_prefix_ipv4": 0, "peer_prefix_ipv6": 128}
        config = load_config(None, {"limits": limits}, {})
        self.assertEqual(
            (config.max_connections, config.peer_prefix_ipv4, config.peer_prefix_ipv6),
            (1, 0, 128),
        )
        config = load_config(None, {"limits": {"peer_prefix_ipv4": 32}}, {})
        self.assertEqual(config.peer_prefix_ipv4, 32)
        for key, value in (
            ("peer_prefix_ipv4", -1),
            ("peer_prefix_ipv4", 33),
            ("peer_prefix_ipv6", 129),
            ("peer_prefix_ipv4", True),
            ("peer_prefix_ipv6", "64"),
        ):
            error = self.assertRaises(
                ConfigError, load_config, None, {"limits": {key: value}}, {}
            )
            bits = 32 if key.endswith("4") else 128
            self.assertIn(f"expected a prefix length from 0 to {bits}, got", str(error))

    def test_schemeNotAName(self) -> None:
        """A scheme that cannot be a RUNDIR name is no external daemon's."""
        self.assertEqual(
            self.error('[ipcd]\nexternal_daemons = ["svn+ssh"]\n'),
            "[ipcd] external_daemons: expected a list of URI schemes like ['tls'] "
            "('svn+ssh' cannot be a socket in RUNDIR), got ['svn+ssh']",
        )

    def test_loopFromCommandLine(self) -> None:
        """With no config file, a loop says it came from the command line."""
        error = self.assertRaises(
            ConfigError, load_config, None, {"redirects": {"a": "b", "b": "a"}}, {}
        )
        self.assertEqual(str(error), "command line: [redirects]: loop a -> b -> a")


class OpenLocalTests(SynchronousTestCase):
    """L{Broker._open_local}: its errors, and never a leaked descriptor."""

    def setUp(self) -> None:
        self.rundir = short_tempdir(self)
        self.broker = Broker(Config(rundir=self.rundir), None)
        with _SOCKET(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(os.path.join(self.rundir, "ipc"))

    def open(self, name: str, path: str) -> Any:
        # A remote peer that a rule naming the service let in.
        allowed = Decision(True, Rule("allow", "in", name), 1)
        event = Request("in", None, name, [], allowed)  # type: ignore[arg-type]
        return self.broker._open_local(event, LocalTarget(name, path))

    def test_otherOSError(self) -> None:
        """An error other than a missing file is a refusal saying what."""
        path = os.path.join(self.rundir, "a" * 300)
        error = self.assertRaises(Refused, self.open, "x", path)
        self.assertEqual(
            str(error), "cannot connect to service 'x': File name too long"
        )

    def test_globReachesWhatOthersMay(self) -> None:
        """Let in by a glob: only a socket others could connect to."""
        os.chmod(self.rundir, 0o755)
        glob = Decision(True, Rule("allow", "in", "*"), 1)
        for name, mode in (("secret", 0o600), ("open", 0o666)):
            path = os.path.join(self.rundir, name)
            with _SOCKET(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.bind(path)
            os.chmod(path, mode)
        event = Request("in", None, "secret", [], glob)  # type: ignore[arg-type]
        secret = LocalTarget("secret", os.path.join(self.rundir, "secret"))
        error = self.assertRaises(AccessDenied, self.broker._open_local, event, secret)
        self.assertIn("others may not connect to", str(error))
        event = Request("in", None, "open", [], glob)  # type: ignore[arg-type]
        target = LocalTarget("open", os.path.join(self.rundir, "open"))
        self.broker._open_local(event, target).close()
        self.assertEqual(event.access, "others may connect")

    def test_ownInodeClosed(self) -> None:
        """ipcd's own socket under another name is refused, its fd closed."""
        alias = os.path.join(self.rundir, "alias")
        os.link(os.path.join(self.rundir, "ipc"), alias)
        before = len(os.listdir("/proc/self/fd"))
        error = self.assertRaises(Refused, self.open, "alias", alias)
        self.assertEqual(
            str(error), f"{alias} is ipcd's own socket, never a lookup target"
        )
        self.assertEqual(len(os.listdir("/proc/self/fd")), before)


def _fds() -> list[str]:
    return sorted(os.listdir("/proc/self/fd"))


class OpenSocketWalkTests(SynchronousTestCase):
    """L{open_socket}'s walk: its refusals, its bounds, no descriptor leaked."""

    def setUp(self) -> None:
        self.dir = short_tempdir(self)
        self.sock = os.path.join(self.dir, "s")
        with _SOCKET(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(self.sock)
        self.before = _fds()

    def at(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def opened(self, path: str, **kwargs: Any) -> None:
        """C{path} opens the socket; every descriptor but its own is closed."""
        opened = open_socket(path, None, **kwargs)
        self.assertEqual(opened.inode[1], os.stat(self.sock).st_ino)
        opened.close()
        self.assertEqual(_fds(), self.before)

    def refused(self, path: str, message: str, **kwargs: Any) -> None:
        error = self.assertRaises(Refused, open_socket, path, None, **kwargs)
        self.assertEqual(str(error), message)
        self.assertEqual(_fds(), self.before)

    def test_relative(self) -> None:
        self.refused("s", "s is not an absolute path")

    def test_notADirectory(self) -> None:
        with open(self.at("file"), "w"):
            pass
        path = self.at("file/s")
        self.refused(path, f"{path}: a component is not a directory")

    def test_notASocket(self) -> None:
        self.refused(self.dir, f"{self.dir} is not a socket")

    def test_fortySymlinks(self) -> None:
        """The kernel's bound: 40 links in one walk are followed, 41 are not."""
        previous = "s"
        for i in range(41):
            os.symlink(previous, self.at(f"l{i}"))
            previous = f"l{i}"
        self.opened(self.at("l39"))
        path = self.at("l40")
        self.refused(path, f"{path}: too many levels of symbolic links")

    def test_absoluteSymlinks(self) -> None:
        """Links to absolute paths restart at /, and close what they leave."""
        os.symlink(self.sock, self.at("abs"))
        os.symlink(self.at("abs"), self.at("abs2"))
        os.symlink(self.dir, self.at("dir"))
        self.opened(self.at("abs2"))
        self.opened(self.at("dir/abs"))

    def test_lastComponentLink(self) -> None:
        """
        Without C{follow_last_symlink} a link is refused as the last
        component, however the path ends, and followed above it.
        """
        os.symlink("s", self.at("link"))
        os.symlink(".", self.at("here"))
        for path in (self.at("link"), self.at("link/"), self.at("link/.")):
            self.refused(
                path,
                f"{path} is a symbolic link; only the socket itself may be "
                "reached this way",
                follow_last_symlink=False,
            )
        self.opened(self.at("here/s"), follow_last_symlink=False)

    def test_rootReopenFails(self) -> None:
        """
        When reopening / fails (no descriptor left), that error is the one
        raised: no descriptor is closed twice, none of stdio closed.
        """
        os.symlink(self.sock, self.at("abs"))
        real = os.open
        opens: list[str] = []

        def failing(path: Any, *args: Any, **kwargs: Any) -> int:
            opens.append(path)
            if path == "/" and len(opens) > 1:
                raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
            return real(path, *args, **kwargs)

        self.patch(access.os, "open", failing)
        error = self.assertRaises(OSError, open_socket, self.at("abs"), None)
        self.assertEqual(error.errno, errno.EMFILE)
        for fd in (0, 1, 2):
            os.fstat(fd)
        self.assertEqual(_fds(), self.before)


class ListenCallTests(SynchronousTestCase):
    """What L{listen_unix} asks of the reactor and of chown, exactly."""

    def setUp(self) -> None:
        self.rundir = short_tempdir(self)
        self.path = os.path.join(self.rundir, "pong")
        self.chowns: list[tuple[Any, ...]] = []
        self.patch(
            names.os,
            "chown",
            lambda *args, **kwargs: self.chowns.append((*args, kwargs)),
        )

    def listen(self, **kwargs: Any) -> Any:
        reactor = MemoryReactor()
        listen_unix(reactor, self.path, Factory.forProtocol(Protocol), **kwargs)
        return reactor.unixServers

    def test_backlogAndMode(self) -> None:
        (server,) = self.listen()
        self.assertEqual(server[0], self.path)
        self.assertEqual((server[2], server[3]), (128, 0o660))
        self.assertEqual(self.chowns, [])

    def test_groupOnly(self) -> None:
        """Only the group changes, to exactly the group named: root too."""
        for name in ("root", grp.getgrgid(1).gr_name, other_group().gr_name):
            del self.chowns[:]
            self.listen(group=name)
            # The socket's own group, never through a link (lchown).
            self.assertEqual(
                self.chowns,
                [
                    (
                        self.path,
                        -1,
                        grp.getgrnam(name).gr_gid,
                        {"follow_symlinks": False},
                    )
                ],
            )


class ServiceNameMessageTests(SynchronousTestCase):
    def test_longNameCut(self) -> None:
        """A bad name is shown whole up to 64 bytes, then cut."""
        error = self.assertRaises(ValueError, names.validate_service_name, "!" * 64)
        self.assertIn(repr("!" * 64) + ":", str(error))
        error = self.assertRaises(ValueError, names.validate_service_name, "!" * 65)
        self.assertIn(repr("!" * 64 + "...") + ":", str(error))


class RundirRaceTests(SynchronousTestCase):
    """L{ensure_rundir} and L{check_rundir} when the path is not as expected."""

    def setUp(self) -> None:
        self.dir = short_tempdir(self)
        self.path = os.path.join(self.dir, "run")
        self.before = _fds()

    def swap_in(self, make: Any) -> None:
        """Make C{mkdir} of RUNDIR find something else there instead."""

        real = os.mkdir

        def mkdir(path: str, mode: int = 0o777) -> None:
            if path != self.path:
                return real(path, mode)
            make(path, real)
            raise FileExistsError(errno.EEXIST, "File exists", path)

        self.patch(rundir.os, "mkdir", mkdir)

    def test_fileInTheWay(self) -> None:
        with open(self.path, "w"):
            pass
        self.assertRaises(NotADirectoryError, rundir.ensure_rundir, self.path)
        self.assertEqual(mode_of(self.path) & 0o7000, 0)

    def test_createdMeanwhile(self) -> None:
        """A directory made by somebody else meanwhile is left as it is."""
        self.swap_in(lambda path, mkdir: mkdir(path, 0o700))
        rundir.ensure_rundir(self.path)
        self.assertEqual(mode_of(self.path), 0o700)

    def test_noFollow(self) -> None:
        """The chmod never goes through a link swapped in, nor to a file."""
        os.mkdir(self.at("elsewhere"), 0o700)
        self.patch(
            rundir.os,
            "mkdir",
            lambda path, mode: os.symlink("elsewhere", path),
        )
        self.assertRaises(OSError, rundir.ensure_rundir, self.path)
        self.assertEqual(mode_of(self.at("elsewhere")), 0o700)
        self.assertEqual(_fds(), self.before)
        os.unlink(self.path)
        self.patch(rundir.os, "mkdir", lambda path, mode: open(path, "w").close())
        self.assertRaises(NotADirectoryError, rundir.ensure_rundir, self.path)
        self.assertEqual(mode_of(self.path) & 0o7000, 0)
        self.assertEqual(_fds(), self.before)

    def test_noDescriptorLeft(self) -> None:
        rundir.ensure_rundir(self.path)
        self.assertEqual(mode_of(self.path), 0o1770)
        self.assertEqual(_fds(), self.before)

    def at(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def unsafe(self, path: str) -> str:
        return str(self.assertRaises(rundir.UnsafeRundir, rundir.check_rundir, path))

    def test_cannotInspect(self) -> None:
        with open(self.at("file"), "w"):
            pass
        path = self.at("file/run")
        self.assertEqual(
            self.unsafe(path),
            f"unsafe RUNDIR {path}: cannot inspect it: Not a directory",
        )

    def test_cannotReadLink(self) -> None:
        os.symlink(self.dir, self.path)

        def readlink(path: str) -> str:
            raise OSError(errno.EIO, "Input/output error")

        self.patch(rundir.os, "readlink", readlink)
        self.assertEqual(
            self.unsafe(self.path),
            f"unsafe RUNDIR {self.path}: cannot read the symlink: Input/output error",
        )

    def test_linkLoop(self) -> None:
        os.symlink("run", self.path)
        self.assertEqual(
            self.unsafe(self.path),
            f"unsafe RUNDIR {self.path} (a symlink to run): cannot inspect the "
            "target: Too many levels of symbolic links",
        )

    def test_linkOfUid1(self) -> None:
        """Only root's and ipcd's own links are followed: uid 1 is neither."""
        if os.geteuid() != 0:
            raise self.skipTest("lchown needs root")
        os.symlink(self.dir, self.path)
        os.lchown(self.path, 1, -1)
        self.assertIn("owned by uid 1", self.unsafe(self.path))

    def test_cannotCreate(self) -> None:
        """The one line names where creating RUNDIR failed, and why."""
        with open(self.at("file"), "w"):
            pass
        path = self.at("file/sub/run")
        error = self.assertRaises(rundir.UnsafeRundir, rundir.prepare_rundir, path)
        self.assertEqual(
            str(error),
            f"cannot create RUNDIR {path}: {self.at('file/sub')}: Not a directory; "
            "choose another --rundir",
        )
        path = self.at("x" * 300)
        error = self.assertRaises(rundir.UnsafeRundir, rundir.prepare_rundir, path)
        self.assertEqual(
            str(error),
            f"cannot create RUNDIR {path}: File name too long; choose another --rundir",
        )


class _Holder:
    """A partial-message holder: records being closed by the budget."""

    def __init__(self) -> None:
        self.closed: list[tuple[int, int]] = []

    def _closeForBudget(self, held: int, limit: int) -> None:  # noqa: N802
        self.closed.append((held, limit))


class BudgetHoldTests(SynchronousTestCase):
    """L{PartialMessageBudget.hold}'s answers and its ties."""

    def test_answers(self) -> None:
        budget = PartialMessageBudget(100)
        a, b, c = _Holder(), _Holder(), _Holder()
        self.assertIs(budget.hold(a, 0), True)
        self.assertIs(budget.hold(a, 60), True)
        self.assertIs(budget.hold(b, 40), True, "exactly at the limit fits")
        self.assertEqual((budget.held, a.closed, b.closed), (100, [], []))
        # A tie with the largest holder: the newcomer is closed.
        self.assertIs(budget.hold(c, 60), False)
        self.assertEqual((c.closed, a.closed, budget.held), ([(60, 100)], [], 100))
        # Smaller than the largest: that one goes, the newcomer stays.
        self.assertIs(budget.hold(c, 30), True)
        self.assertEqual((a.closed, budget.held), ([(60, 100)], 70))


class _NoAbort(StringTransport):
    abortConnection = None  # noqa: N815 (a transport without it)


class _Bare(MessageProtocol):
    """A L{MessageProtocol} made without L{MessageFactory}."""

    def messageReceived(self, payload: bytes) -> None:
        self.received = payload


class ProtocolEdgeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def test_defaults(self) -> None:
        """Idle for 300 s; a factory logs nothing when it starts and stops."""
        factory = MessageFactory(_Bare)
        self.assertEqual(factory.buildProtocol(None).idleTimeout, 300.0)
        factory.doStart()
        factory.doStop()
        self.assertEqual(len(self.events), 0)

    def test_bareProtocolTimesOut(self) -> None:
        """
        Without a factory (no clock, no idle log), the timeout still closes
        the connection, with a plain log line; a transport without
        C{abortConnection} is closed with C{loseConnection}.
        """
        protocol = _Bare()
        protocol.idleTimeout = 5
        transport = _NoAbort()
        protocol.makeConnection(transport)
        protocol.timeoutConnection()
        self.assertTrue(transport.disconnecting)
        (event,) = self.events
        self.assertNotIn("more not logged", formatEvent(event))
        protocol.connectionLost(None)

    def test_unloggedCounted(self) -> None:
        clock = Clock()
        log = LimitLog("closes", clock=clock)
        self.assertEqual([log.hit(), log.hit(), log.hit()], [0, None, None])
        clock.advance(10)
        self.assertEqual(log.hit(), 2)
        protocol = _Bare()
        protocol.idleTimeout = 0
        protocol.makeConnection(StringTransport())
        protocol.idleLog = log
        clock.advance(10)
        log.hit()
        protocol.timeoutConnection()
        self.assertEqual(len(self.events), 0)
        clock.advance(10)
        protocol.timeoutConnection()
        self.assertIn(
            "(1 more not logged since the last such line)", formatEvent(self.events[-1])
        )
        clock.advance(10)
        protocol.timeoutConnection()
        self.assertNotIn("more not logged", formatEvent(self.events[-1]))

    def test_droppedLinesCounted(self) -> None:
        """Each line a LimitLog leaves out counts in LOG_LINES_DROPPED (metrics)."""
        clock = Clock()
        log = LimitLog("closes", clock=clock)
        for _ in range(4):
            log.hit()
        self.assertEqual(log.counters["closes"], 4)
        self.assertEqual(log.counters[LOG_LINES_DROPPED], 3)

    def test_closedForBudgetReadsNothingMore(self) -> None:
        budget = PartialMessageBudget(10)
        factory = MessageFactory(_Bare, idleTimeout=0, partialBudget=budget)
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(HEADER.pack(100) + b"x" * 20)
        self.assertTrue(transport.disconnecting)
        # Its partial message is let go at once, not at connectionLost.
        self.assertEqual((protocol._pieces, protocol._have), ((), 0))
        protocol.dataReceived(encode(b"z") + HEADER.pack(9) + b"partial")
        self.assertEqual((budget.held, len(budget)), (0, 0))
        self.assertFalse(hasattr(protocol, "received"))

    def test_peerNameOnUnixSockets(self) -> None:
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        transport = StringTransport()
        transport.getHandle = lambda: a  # type: ignore[method-assign]
        protocol = _Bare()
        protocol.transport = transport
        self.assertEqual(protocol.peerName(), f"pid {os.getpid()} uid {os.getuid()}")
        self.assertEqual(
            _Bare.peerName(self._tcpProtocol()), str(StringTransport().getPeer())
        )

    def _tcpProtocol(self) -> MessageProtocol:
        a = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(a.close)
        transport = StringTransport()
        transport.getHandle = lambda: a  # type: ignore[method-assign]
        protocol = _Bare()
        protocol.transport = transport
        return protocol

    def test_recvAtMostAMebibyte(self) -> None:
        sock = _Socket(b"x" * (3 << 20), step=4 << 20)
        sizes: list[int] = []
        recv = sock.recv
        sock.recv = lambda size: (sizes.append(size), recv(size))[1]  # type: ignore[method-assign]
        self.assertEqual(len(recv_exactly(sock, 3 << 20)), 3 << 20)  # type: ignore[arg-type]
        self.assertEqual(sizes, [1 << 20] * 3)
