"""
The C{ipc:} endpoints on real sockets: a server endpoint listening at
C{RUNDIR/NAME}; a client endpoint connecting straight there, or through ipcd
and adopting the handed-over fd.
"""

from __future__ import annotations

import errno
import grp
import os
import socket
import stat
import threading
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.address import UNIXAddress
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    TimeoutError,
    inlineCallbacks,
)
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.error import ConnectError, ConnectingCancelledError
from twisted.internet.interfaces import (
    IStreamClientEndpointStringParserWithReactor,
    IStreamServerEndpointStringParser,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from ipcd.client import MAX_TIMEOUT
from ipcd.endpoints import (
    IPCClientEndpoint,
    IPCClientParser,
    IPCServerEndpoint,
    IPCServerParser,
)
from ipcd.handoff import HandoffError, LookupRefused, adopt_into_reactor, scm_rights
from ipcd.services.pongd import Pong
from ipcd.test.support import (
    ARABIC_INDIC,
    TIMEOUT,
    RunningIpcdTestCase,
    assert_no_fd_leak,
    fd_baseline,
    fill_backlog,
    run_python,
    set_network,
    short_rundir,
    wait_until,
)
from ipcd.wire import recv_message


class EchoClient(Pong):
    """Sends one message on connect; C{answer} fires with the echo."""

    message = b"hello through ipc"

    def connectionMade(self) -> None:
        self.answer: Deferred[bytes] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self.sendMessage(self.message)

    def messageReceived(self, payload: bytes) -> None:
        self.answer.callback(payload)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


@inlineCallbacks
def round_trip(case: TestCase, endpoint: Any) -> Any:
    """Connect with L{EchoClient}, check the echo, close; the protocol back."""
    protocol = yield endpoint.connect(Factory.forProtocol(EchoClient))
    case.assertIsInstance(protocol, EchoClient)
    echo = yield protocol.answer.addTimeout(TIMEOUT, reactor)
    case.assertEqual(echo, EchoClient.message)
    protocol.transport.loseConnection()
    yield protocol.lost.addTimeout(TIMEOUT, reactor)
    return protocol


class ParserTests(SynchronousTestCase):
    """The C{ipc:} strings' grammar, without a socket."""

    def test_interfaces(self) -> None:
        """Both parsers provide Twisted's parser interfaces, verifiably."""
        self.assertTrue(
            verifyObject(IStreamServerEndpointStringParser, IPCServerParser())
        )
        self.assertTrue(
            verifyObject(
                IStreamClientEndpointStringParserWithReactor, IPCClientParser()
            )
        )

    def test_serverParameters(self) -> None:
        endpoint = serverFromString(
            reactor, "ipc:authd:rundir=/r:mode=0600:backlog=7:group=wheel"
        )
        self.assertIsInstance(endpoint, IPCServerEndpoint)
        self.assertEqual(endpoint.path, "/r/authd")
        self.assertEqual(
            (endpoint._mode, endpoint._backlog, endpoint._group),
            (0o600, 7, "wheel"),
        )

    def test_clientParameters(self) -> None:
        endpoint = clientFromString(
            reactor, r"ipc:cnt:rundir=/r:network=cnt unix\://counter:timeout=2.5"
        )
        self.assertIsInstance(endpoint, IPCClientEndpoint)
        self.assertEqual(
            (endpoint.service, endpoint.rundir, endpoint.network, endpoint._timeout),
            ("cnt", "/r", "cnt unix://counter", 2.5),
        )

    def test_unescapedColonNamesTheFix(self) -> None:
        """
        An unescaped C{:} in a value is an error saying how to escape it, not
        a C{network='cnt unix'} and a C{rundir='//counter'} read silently.
        """
        error = self.assertRaises(
            ValueError,
            clientFromString,
            reactor,
            "ipc:cnt:network=cnt unix://counter",
        )
        self.assertEqual(
            str(error),
            "ipc: client endpoint: unexpected part '//counter' after the "
            r"service name: a ':' inside a value must be escaped as '\:' (as in "
            r"ipc:cnt:network=cnt unix\://counter); parameters: rundir=, "
            "network=, timeout=",
        )
        error = self.assertRaises(
            ValueError, serverFromString, reactor, "ipc:pong:/run/libipc"
        )
        self.assertIn(r"escaped as '\:'", str(error))
        self.assertIn("'/run/libipc'", str(error))

    def test_unknownParameter(self) -> None:
        error = self.assertRaises(
            ValueError, clientFromString, reactor, "ipc:pong:rundri=/r"
        )
        self.assertEqual(
            str(error),
            "ipc: client endpoint: unknown parameter 'rundri'; parameters: "
            "rundir=, network=, timeout=",
        )
        error = self.assertRaises(
            ValueError, serverFromString, reactor, "ipc:pong:mode=rw"
        )
        self.assertEqual(str(error), "ipc: mode: expected an octal number, got 'rw'")

    def test_numbersInAsciiDigits(self) -> None:
        """
        A mode or backlog in digits other than ASCII ones is refused:
        C{int()} read C{'٦٠٠'} as 600 (mode=٠٦٠٠ was 0o600).
        """
        for key, value, kind in (
            ("mode", "0600", "an octal number"),
            ("backlog", "12", "a number"),
        ):
            other = value.translate(ARABIC_INDIC)
            error = self.assertRaises(
                ValueError, serverFromString, reactor, f"ipc:pong:{key}={other}"
            )
            self.assertEqual(str(error), f"ipc: {key}: expected {kind}, got {other!r}")

    def test_numbersInDigitsOnly(self) -> None:
        """
        Digits only, as the docs say: C{int()} also read a sign, spaces,
        C{_} between digits and C{0o} (C{mode=0o6_00} was 0o600).
        """
        for key, value, kind in (
            ("mode", "0o6_00", "an octal number"),
            ("mode", "+600", "an octal number"),
            ("backlog", " 12", "a number"),
            ("backlog", "1_2", "a number"),
        ):
            error = self.assertRaises(
                ValueError, serverFromString, reactor, f"ipc:pong:{key}={value}"
            )
            self.assertEqual(str(error), f"ipc: {key}: expected {kind}, got {value!r}")

    def test_noServiceName(self) -> None:
        """
        C{ipc} or C{ipc:} alone: an error saying the name is missing, not a
        C{TypeError} about a parser method's arguments.
        """
        for parse, side in ((serverFromString, "server"), (clientFromString, "client")):
            for text in ("ipc", "ipc:", "ipc::rundir=/r"):
                error = self.assertRaises(ValueError, parse, reactor, text)
                self.assertIn(f"ipc: {side} endpoint: no service name", str(error))

    def test_trailingBackslash(self) -> None:
        """
        A C{\\} at the very end escapes nothing: a ValueError saying so, for
        either side (Twisted's own tokenizer, which reads the string before
        asking ipcd's parser, raised C{RuntimeError: generator raised
        StopIteration}); an escaped one there is a backslash.
        """
        for parse in (serverFromString, clientFromString):
            for text in ("ipc:pong\\", "ipc:pong:rundir=/r\\\\\\", "ipc:\\"):
                error = self.assertRaises(ValueError, parse, reactor, text)
                self.assertEqual(
                    str(error),
                    f"endpoint string {text!r} ends in a '\\' that escapes "
                    "nothing (a backslash itself is written '\\\\')",
                )
        escaped = "ipc:pong:rundir=/r\\\\"
        self.assertEqual(serverFromString(reactor, escaped).path, "/r\\/pong")
        self.assertEqual(clientFromString(reactor, escaped).rundir, "/r\\")

    def test_parserArgumentsAsParameters(self) -> None:
        """
        C{reactor=}, C{self=} or C{name=} beside the name: a ValueError
        naming the parameter, not a C{TypeError} about the parser method's
        arguments; C{name=} alone names the service.
        """
        for parse, side in ((serverFromString, "server"), (clientFromString, "client")):
            for key in ("reactor", "self"):
                error = self.assertRaises(
                    ValueError, parse, reactor, f"ipc:pong:{key}=x"
                )
                self.assertIn(
                    f"ipc: {side} endpoint: unknown parameter {key!r}", str(error)
                )
            error = self.assertRaises(ValueError, parse, reactor, "ipc:pong:name=x")
            self.assertEqual(
                str(error),
                f"ipc: {side} endpoint: the service name given twice, as 'pong' "
                "and as name='x'",
            )
        self.assertEqual(serverFromString(reactor, "ipc:name=pong").name, "pong")
        self.assertEqual(clientFromString(reactor, "ipc:name=pong").service, "pong")

    def test_parameterGivenTwice(self) -> None:
        """
        A parameter given twice: a ValueError naming it, on either side,
        however its key is escaped or the type spelt (Twisted's tokenizer
        kept the last one silently: C{timeout=1:timeout=2} was 2 s).
        Other endpoint types' strings are Twisted's to judge.
        """
        for parse, texts in (
            (
                clientFromString,
                [
                    "ipc:pong:timeout=1:timeout=2",
                    "IPC:pong:rundir=/a:network=:rundir=/b",
                    r"ipc:pong:network=x:net\work=y",
                ],
            ),
            (
                serverFromString,
                [
                    "ipc:pong:mode=0600:mode=0666",
                    "ipc:pong:backlog=1:group=a:backlog=2",
                    "ipc:pong:group=a:group=b",
                ],
            ),
        ):
            for text in texts:
                error = self.assertRaises(ValueError, parse, reactor, text)
                key = text.rsplit(":", 1)[1].split("=")[0].replace("\\", "")
                self.assertEqual(
                    str(error),
                    f"ipc: parameter {key!r} given twice: give it once (Twisted "
                    "would keep the last one given)",
                )
        for parse in (clientFromString, serverFromString):
            error = self.assertRaises(ValueError, parse, reactor, "ipc:name=a:name=b")
            self.assertIn("parameter 'name' given twice", str(error))
        # An escaped '=' or ':' is in a value, not a key.
        text = r"ipc:pong:rundir=/a\=rundir\:rundir=b"
        self.assertEqual(clientFromString(reactor, text).rundir, "/a=rundir:rundir=b")
        self.assertEqual(
            serverFromString(reactor, text).path, "/a=rundir:rundir=b/pong"
        )
        client = clientFromString(reactor, "tcp:host=a:port=1:port=2")
        self.assertEqual(client._port, 2)

    def test_trailingBackslashUnderTwistd(self) -> None:
        """
        In a fresh C{twistd}, whose first endpoint string is the bad one
        (C{twistd web --listen}): the ValueError too, since twistd loads
        ipcd's plugin before parsing it.
        """
        out = run_python(
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            "--logfile=-",
            "web",
            "--listen",
            "ipc:www\\",
            "--path",
            ".",
            cwd=short_rundir(self),
        )
        text = out.stdout + out.stderr
        self.assertIn(
            "ValueError: endpoint string 'ipc:www\\\\' ends in a '\\' that "
            "escapes nothing",
            text,
        )
        self.assertNotIn("RuntimeError", text)

    def test_timeoutOutOfRange(self) -> None:
        """
        A timeout no wait can be bounded by is refused when parsed, naming
        it, not by an assertion deep in the reactor when connecting.
        """
        for text in ("-1", "0", "nan", "inf", "1e12"):
            error = self.assertRaises(
                ValueError, clientFromString, reactor, f"ipc:pong:timeout={text}"
            )
            self.assertIn("ipc: timeout: expected seconds, above 0", str(error))
            self.assertIn(repr(text), str(error))
            self.assertRaises(
                ValueError, IPCClientEndpoint, reactor, "pong", timeout=float(text)
            )

    def test_timeoutInAsciiDecimal(self) -> None:
        """
        A timeout is a decimal number in ASCII digits, as C{mode} and
        C{backlog} are: C{float()} read C{1_0} as 10 s, C{١} (Arabic-Indic
        one) as 1 s and C{' 1'} as 1 s.
        """
        for text in ("1_0", "1".translate(ARABIC_INDIC), " 1", "1\n", "0x10", "1e"):
            error = self.assertRaises(
                ValueError, clientFromString, reactor, f"ipc:pong:timeout={text}"
            )
            self.assertEqual(
                str(error),
                "ipc: timeout: expected seconds, above 0 and at most 31536000 "
                f"(a year), got {text!r}",
            )
        for text, seconds in (
            ("2", 2),
            ("0.5", 0.5),
            (".5", 0.5),
            ("2.", 2),
            ("1e3", 1000),
            ("+3", 3),
        ):
            endpoint = clientFromString(reactor, f"ipc:pong:timeout={text}")
            self.assertEqual(endpoint._timeout, seconds)

    def test_modeAndBacklogOutOfRange(self) -> None:
        """
        Permission bits beyond 0777 (set-id, sticky) and a backlog below 1
        are refused, not applied (a mode of 7777777 was once 7777).
        """
        for text, message in (
            ("mode=7777777", "mode: expected permission bits 0-0777, got 0o7777777"),
            ("mode=4660", "mode: expected permission bits 0-0777, got 0o4660"),
            ("backlog=0", "backlog: expected a number from 1 to 2147483647, got 0"),
            ("backlog=-1", "backlog: expected a number from 1 to 2147483647, got -1"),
            (
                "backlog=99999999999",
                "backlog: expected a number from 1 to 2147483647, got 99999999999",
            ),
        ):
            error = self.assertRaises(
                ValueError, serverFromString, reactor, f"ipc:pong:{text}"
            )
            self.assertEqual(str(error), message)
        # In Python, an int: a string of digits is not read as octal.
        error = self.assertRaises(
            TypeError, IPCServerEndpoint, reactor, "p", "/r", "0600"
        )
        self.assertEqual(
            str(error), "mode: expected permission bits (0o660), got '0600'"
        )
        # And a backlog an int: a float failed only when listening, a
        # string at a comparison, and True was a backlog of 1.
        for backlog in (5.5, "5", True):
            error = self.assertRaises(
                TypeError, IPCServerEndpoint, reactor, "p", "/r", backlog=backlog
            )
            self.assertEqual(
                str(error),
                f"backlog: expected a number from 1 to 2147483647, got {backlog!r}",
            )


class RundirTests(SynchronousTestCase):
    """
    A rundir the kernel would not take as it is: refused when the endpoint
    is made, naming it, on either side and whatever the string's type.
    """

    def setUp(self) -> None:
        self.rundir = short_rundir(self)
        self.pong = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(self.pong.close)
        self.pong.bind(os.path.join(self.rundir, "pong"))
        self.pong.listen()
        self.pong.setblocking(False)

    def refused(self, text: str) -> str:
        """C{text}'s error, the same from either side."""
        server = self.assertRaises(ValueError, serverFromString, reactor, text)
        client = self.assertRaises(ValueError, clientFromString, reactor, text)
        self.assertEqual(str(server), str(client))
        return str(client)

    def test_nulReachesNoOtherService(self) -> None:
        """
        A NUL in rundir: an AF_UNIX path ends there, so C{ipc:x} with
        rundir C{RUNDIR/pong\\0} reached pong (and a server's listen failed
        with C{embedded null byte}).
        """
        rundir = f"{self.rundir}/pong\0"
        message = self.refused(f"ipc:x:rundir={rundir}")
        self.assertEqual(
            message,
            f"rundir: {rundir!r} has a NUL character, where a socket path would end",
        )
        for network in ("", "x unix://x"):
            self.assertRaises(
                ValueError, IPCClientEndpoint, reactor, "x", rundir, network
            )
        self.assertRaises(ValueError, IPCServerEndpoint, reactor, "x", rundir)
        self.assertRaises(BlockingIOError, self.pong.accept)  # nobody came

    def test_socketPathTooLong(self) -> None:
        """
        A socket path over AF_UNIX's 107 bytes: refused when parsed (the
        client endpoint's connect logged Twisted's C{TypeError} traceback,
        then failed after its whole timeout; the server made the
        directories, then failed).  Exactly 107 is taken.
        """
        longest = "/tmp/" + "d" * (107 - len("/tmp/") - len("/pong"))
        self.assertEqual(
            clientFromString(reactor, f"ipc:pong:rundir={longest}").rundir, longest
        )
        self.assertEqual(
            serverFromString(reactor, f"ipc:pong:rundir={longest}").path,
            longest + "/pong",
        )
        over = longest + "d"
        message = self.refused(f"ipc:pong:rundir={over}")
        self.assertTrue(
            message.startswith("rundir: the socket path '/tmp/ddd"), message
        )
        self.assertTrue(
            message.endswith(
                "... is 108 bytes; AF_UNIX takes at most 107 "
                "(a shorter rundir, or name)"
            ),
            message,
        )
        self.assertFalse(os.path.lexists(over))
        # Through ipcd, only RUNDIR/ipc is connected to, which fits.
        network = rf"ipc:pong:rundir={over}:network=pong unix\://pong"
        self.assertEqual(clientFromString(reactor, network).rundir, over)


# Pieces of ipc: strings, careless and hostile ones among them.
# The parsers' own argument names among them (reactor=x was a TypeError).
_PIECES = st.sampled_from(
    [*":=\\ ./-0x9a\x00é", "rundir", "mode", "backlog", "group", "network"]
    + ["timeout", "nan", "inf", "-1", "7777", "1e12", "99999999999"]
    + ["reactor", "self", "name"]
)


class AnyStringTests(SynchronousTestCase):
    """
    Whatever follows C{ipc:}, the parsers answer a sane endpoint or say why
    in a ValueError.  A trailing backslash, which Twisted's tokenizer failed
    on with a RuntimeError, was once left out here (an C{x} added after
    it); the examples are the strings that raised something else.
    """

    @settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(_PIECES, max_size=12).map("".join))
    @example("pong\\")
    @example("pong:rundir=/r\\\\\\")
    @example("pong:reactor=x")
    @example("pong:self=x")
    @example("pong:name=x")
    def test_sane_or_ValueError(self, text: str) -> None:  # noqa: N802
        memory = MemoryReactorClock()
        try:
            server = serverFromString(memory, "ipc:" + text)
        except ValueError:
            pass
        else:
            self.assertLessEqual(0, server._mode)
            self.assertLessEqual(server._mode, 0o777)
            self.assertLessEqual(1, server._backlog)
            self.assertLessEqual(server._backlog, 2**31 - 1)
        try:
            client = clientFromString(memory, "ipc:" + text)
        except ValueError:
            pass
        else:
            self.assertLess(0, client._timeout)
            self.assertLessEqual(client._timeout, MAX_TIMEOUT)


class ServerEndpointTests(TestCase):
    def setUp(self) -> None:
        self.rundir = short_rundir(self)
        self.path = os.path.join(self.rundir, "echo")
        set_network(self, None)

    @inlineCallbacks
    def test_listens0660AndRemovesOnStop(self) -> Any:
        endpoint = serverFromString(reactor, f"ipc:echo:rundir={self.rundir}")
        self.assertIsInstance(endpoint, IPCServerEndpoint)
        port = yield endpoint.listen(Factory.forProtocol(Pong))
        self.addCleanup(lambda: port.connected and port.stopListening())
        self.assertTrue(stat.S_ISSOCK(os.lstat(self.path).st_mode))
        self.assertEqual(stat.S_IMODE(os.lstat(self.path).st_mode), 0o660)
        client = clientFromString(reactor, f"ipc:echo:rundir={self.rundir}")
        yield round_trip(self, client)
        yield port.stopListening()
        self.assertFalse(os.path.lexists(self.path))

    @inlineCallbacks
    def test_mode(self) -> Any:
        endpoint = serverFromString(reactor, f"ipc:echo:rundir={self.rundir}:mode=0600")
        port = yield endpoint.listen(Factory.forProtocol(Pong))
        self.addCleanup(port.stopListening)
        self.assertEqual(stat.S_IMODE(os.lstat(self.path).st_mode), 0o600)

    @inlineCallbacks
    def test_group(self) -> Any:
        """
        C{group=} owns the socket (another group than ours when root),
        given by name or by number.
        """
        gid = os.getgid()
        if os.geteuid() == 0:
            gid = next((g.gr_gid for g in grp.getgrall() if g.gr_gid != gid), gid)
        for group in (grp.getgrgid(gid).gr_name, str(gid)):
            endpoint = serverFromString(
                reactor, f"ipc:echo:rundir={self.rundir}:group={group}"
            )
            port = yield endpoint.listen(Factory.forProtocol(Pong))
            self.assertEqual(os.lstat(self.path).st_gid, gid)
            yield port.stopListening()

    @inlineCallbacks
    def test_groupAsAnInt(self) -> Any:
        """
        In Python, a gid may be an int (C{group=0}): it was a C{TypeError}
        from C{getgrnam} when listening.
        """
        gid = os.getgid()
        if os.geteuid() == 0:
            gid = next((g.gr_gid for g in grp.getgrall() if g.gr_gid != gid), gid)
        endpoint = IPCServerEndpoint(reactor, "echo", self.rundir, group=gid)
        port = yield endpoint.listen(Factory.forProtocol(Pong))
        self.addCleanup(port.stopListening)
        self.assertEqual(os.lstat(self.path).st_gid, gid)

    def test_groupCheckedWhenMade(self) -> None:
        """
        A group that names none (empty, a NUL, a negative gid, not text nor
        a number) is refused when the endpoint is made, naming it: an empty
        one was found only when listening, a NUL as C{embedded null byte}.
        """
        for text in ("ipc:echo:group=", "ipc:echo:group=a\0"):
            error = self.assertRaises(ValueError, serverFromString, reactor, text)
            self.assertTrue(str(error).startswith("group: expected a group "), error)
        # 4294967295 is chown's "leave the group": the socket stayed in the
        # process's; past it, an OverflowError when listening.
        refused = ("", -1, 2**32 - 1, 2**32, 2**40)
        for group, kind in (*((g, ValueError) for g in refused), (1.5, TypeError)):
            error = self.assertRaises(
                kind, IPCServerEndpoint, reactor, "echo", self.rundir, group=group
            )
            self.assertEqual(
                str(error), f"group: expected a group name or number, got {group!r}"
            )
        self.assertFalse(os.path.lexists(self.path))

    @inlineCallbacks
    def test_groupNumberNoGidCanBe(self) -> Any:
        """
        A number past the last gid, no group's name, is no such group when
        listening: 4294967295 left the socket in the process's group
        (chown's "leave it"), a larger one was an C{OverflowError}.
        """
        for group in ("4294967295", "99999999999999999999"):
            endpoint = serverFromString(
                reactor, f"ipc:echo:rundir={self.rundir}:group={group}"
            )
            listening = endpoint.listen(Factory.forProtocol(Pong))
            listening.addCallback(lambda port: self.addCleanup(port.stopListening))
            error = yield self.assertFailure(listening, ValueError)
            self.assertEqual(str(error), f"no such group {group!r} for {self.path}")
            self.assertFalse(os.path.lexists(self.path))

    @inlineCallbacks
    def test_connectionsHostIsTheName(self) -> Any:
        """
        A connection's C{getHost()} is the service's socket, as the port's
        is: it was the private path the socket was bound at before it was
        moved to its name, C{/proc/self/fd/N/echo} (another descriptor of
        the process by then).
        """
        hosts: list[Any] = []
        lost: list[bool] = []

        class Host(Protocol):
            def connectionMade(self) -> None:
                hosts.append(self.transport.getHost())

            def connectionLost(self, reason: Any = None) -> None:
                lost.append(True)

        endpoint = serverFromString(reactor, f"ipc:echo:rundir={self.rundir}")
        port = yield endpoint.listen(Factory.forProtocol(Host))
        self.addCleanup(port.stopListening)
        self.assertEqual(port.getHost(), UNIXAddress(self.path))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(self.path)
            yield wait_until(lambda: hosts, "the connection to be accepted")
        yield wait_until(lambda: lost, "the connection to close")
        self.assertEqual(hosts, [UNIXAddress(self.path)])

    @inlineCallbacks
    def test_secondListenerFails(self) -> Any:
        endpoint = serverFromString(reactor, f"ipc:echo:rundir={self.rundir}")
        port = yield endpoint.listen(Factory.forProtocol(Pong))
        self.addCleanup(port.stopListening)
        error = yield self.assertFailure(
            endpoint.listen(Factory.forProtocol(Pong)), RuntimeError
        )
        self.assertIn(self.path, str(error))


class ClientEndpointTests(RunningIpcdTestCase):
    def client(self, extra: str = "") -> Any:
        endpoint = clientFromString(reactor, f"ipc:pong:rundir={self.rundir}{extra}")
        self.assertIsInstance(endpoint, IPCClientEndpoint)
        return endpoint

    @inlineCallbacks
    def test_direct(self) -> Any:
        """No network: straight to C{RUNDIR/pong}, ipcd not asked."""
        yield round_trip(self, self.client())
        self.assertEqual(self.counters["lookups"], 0)

    @inlineCallbacks
    def test_networkInString(self) -> Any:
        """C{network=} in the endpoint string: through ipcd, fd adopted."""
        before = yield fd_baseline()
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        yield round_trip(self, self.client(r":network=pong unix\://pong"))
        # The lookup's own connection to ipcd logs no line of Twisted's.
        texts = [formatEvent(event) for event in logged]
        self.assertEqual([t for t in texts if "Starting factory" in t], [])
        self.assertEqual(self.counters["lookups"], 1)
        self.assertEqual(self.counters["connected"], 1)
        yield assert_no_fd_leak(before)

    @inlineCallbacks
    def test_networkFromEnvironment(self) -> Any:
        set_network(self, "pong unix://pong")
        yield round_trip(self, self.client())
        self.assertEqual(self.counters["lookups"], 1)

    @inlineCallbacks
    def test_refusedCarriesReason(self) -> Any:
        """
        An C{ne} answer: connect() fails with LookupRefused (a
        HandoffError) and the reason.
        """
        before = yield fd_baseline()
        endpoint = clientFromString(
            reactor, rf"ipc:nosuch:rundir={self.rundir}:network=x unix\://y"
        )
        error = yield self.assertFailure(
            endpoint.connect(Factory.forProtocol(EchoClient)), LookupRefused
        )
        self.assertIsInstance(error, HandoffError)
        self.assertTrue(error.reason.startswith("no route to service 'nosuch'"))
        self.assertEqual(str(error), error.reason)
        yield self.assertFailure(
            self.client(r":network=pong bogus\://h").connect(
                Factory.forProtocol(EchoClient)
            ),
            HandoffError,
        )
        yield assert_no_fd_leak(before)

    @inlineCallbacks
    def test_noIpcd(self) -> Any:
        """Network set but no ipcd listening: a connect error."""
        rundir = short_rundir(self)
        endpoint = IPCClientEndpoint(reactor, "pong", rundir, "pong unix://pong")
        error = yield self.assertFailure(
            endpoint.connect(Factory.forProtocol(EchoClient)), ConnectError
        )
        # Which socket, and what to do, as the blocking client says.
        path = os.path.join(rundir, "ipc")
        self.assertIn(f"no ipcd listens on {path} (no such file or", str(error))
        self.assertIn("is ipcd running?", str(error))
        self.assertEqual(error.osError, errno.ENOENT)

    @inlineCallbacks
    def test_noService(self) -> Any:
        """Direct, nothing at C{RUNDIR/NAME}: the error names that socket."""
        rundir = short_rundir(self)
        endpoint = IPCClientEndpoint(reactor, "nosuch", rundir, "")
        error = yield self.assertFailure(
            endpoint.connect(Factory.forProtocol(EchoClient)), ConnectError
        )
        path = os.path.join(rundir, "nosuch")
        self.assertIn(f"cannot reach service 'nosuch' at {path}: No such", str(error))

    @inlineCallbacks
    def test_manyAdoptedConnections(self) -> Any:
        protocols = []
        for _ in range(5):
            endpoint = self.client(r":network=pong unix\://pong")
            protocol = yield endpoint.connect(Factory.forProtocol(EchoClient))
            protocols.append(protocol)
        for protocol in protocols:
            self.assertEqual(
                (yield protocol.answer.addTimeout(TIMEOUT, reactor)),
                EchoClient.message,
            )
            protocol.transport.loseConnection()
        yield wait_until(
            lambda: all(p.lost.called for p in protocols), "connections to close"
        )


class Closing(Protocol):
    """C{lost} fires when its connection is gone."""

    def __init__(self) -> None:
        self.lost: Deferred[None] = Deferred()

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


class CountingFactory(Factory):
    """Counts its starts and stops."""

    protocol = Closing
    starts = stops = 0

    def startFactory(self) -> None:  # noqa: N802 (Twisted's name)
        self.starts += 1

    def stopFactory(self) -> None:  # noqa: N802 (Twisted's name)
        self.stops += 1


class BusyListenerTests(TestCase):
    """A service whose listen backlog is full: waited for, as by the blocking client."""

    def setUp(self) -> None:
        self.rundir = short_rundir(self)
        self.path = os.path.join(self.rundir, "busy")
        self.listener = self.busy(self.path)

    def busy(self, path: str) -> socket.socket:
        """A listener at C{path} whose backlog is full."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        listener.bind(path)
        listener.listen(0)
        listener.setblocking(False)
        fill_backlog(self, path)
        return listener

    @inlineCallbacks
    def test_connectsOnceThereIsRoom(self) -> Any:
        """
        A connect while the backlog is full waits for room: Twisted's
        connector failed at once with C{An error occurred while connecting:
        [Failure instance: ... ConnectionDone ...]}.  The factory is
        started once for all the connects, and stopped once the connection
        ends: Twisted's connector started and stopped it for each (a
        noisy factory logged both, 45 lines a second).
        """
        timers = LateTimers(reactor, 0.0)  # the pauses between connects
        endpoint = IPCClientEndpoint(timers, "busy", self.rundir, "")
        factory = CountingFactory()
        connecting = endpoint.connect(factory)
        yield wait_until(lambda: len(timers.calls) >= 2, "two connects refused")
        accepted, _ = self.listener.accept()  # room for one more
        self.addCleanup(accepted.close)
        protocol = yield connecting
        self.assertIsInstance(protocol, Closing)
        self.assertEqual((factory.starts, factory.stops), (1, 0))
        protocol.transport.loseConnection()
        yield protocol.lost
        yield wait_until(lambda: factory.stops, "the factory stopped")
        self.assertEqual((factory.starts, factory.stops), (1, 1))

    @inlineCallbacks
    def test_busyIpcdTimesOutAsDocumented(self) -> Any:
        """
        Through ipcd, busy until the timeout: the lookup's documented
        C{twisted.internet.defer.TimeoutError}, not the connect's own.
        """
        self.busy(os.path.join(self.rundir, "ipc"))
        endpoint = IPCClientEndpoint(
            reactor, "pong", self.rundir, "pong unix://pong", 0.2
        )
        error = yield self.assertFailure(
            endpoint.connect(CountingFactory()), TimeoutError
        )
        where = os.path.join(self.rundir, "ipc")
        self.assertEqual(str(error), f"no answer from ipcd at {where} within 0.2 s")

    @inlineCallbacks
    def test_busyForTheWholeTimeout(self) -> Any:
        """Busy until the timeout: an error naming the socket, and why."""
        endpoint = IPCClientEndpoint(
            reactor, "busy", os.path.dirname(self.path), "", 0.2
        )
        error = yield self.assertFailure(
            endpoint.connect(CountingFactory()), ConnectError
        )
        self.assertIn(
            f"cannot reach service 'busy' at {self.path}: its listener stayed busy "
            "(backlog full) for 0.2 s",
            str(error),
        )

    @inlineCallbacks
    def test_busyPastTheDeadlineAfterALatePause(self) -> Any:
        """
        A pause that ends past the deadline (its timer late, on a loaded
        machine) is the same timeout error: the connect was given the
        negative time left, and Twisted's connector failed with an
        AssertionError.
        """
        endpoint = IPCClientEndpoint(
            LateTimers(reactor, 0.3), "busy", os.path.dirname(self.path), "", 0.2
        )
        error = yield self.assertFailure(
            endpoint.connect(CountingFactory()), ConnectError
        )
        self.assertIn("its listener stayed busy (backlog full) for 0.2 s", str(error))

    @inlineCallbacks
    def test_cancelInAPause(self) -> Any:
        """
        Cancelled in a pause between two connects to the full backlog: the
        C{ConnectingCancelledError} of a cancel while connecting (it was a
        C{CancelledError}, the same cancel's error told apart by when it
        came), the pause's timer gone, no descriptor left.
        """
        before = yield fd_baseline()
        timers = LateTimers(reactor, 60.0)  # the pause lasts: cancelled in it
        endpoint = IPCClientEndpoint(timers, "busy", self.rundir, "")
        connecting = endpoint.connect(CountingFactory())
        yield wait_until(lambda: timers.calls, "a pause after a refused connect")
        connecting.cancel()
        error = yield self.assertFailure(connecting, ConnectingCancelledError)
        self.assertEqual(error.address, UNIXAddress(self.path))
        self.assertEqual([call for call in timers.calls if call.active()], [])
        yield assert_no_fd_leak(before)


class LateTimers:
    """A reactor whose timers fire C{late} seconds after they are due."""

    def __init__(self, reactor: Any, late: float) -> None:
        self._reactor, self._late = reactor, late
        self.calls: list[Any] = []  # the timers set through it

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def callLater(self, delay: float, f: Any, *args: Any, **kwargs: Any) -> Any:
        call = self._reactor.callLater(delay + self._late, f, *args, **kwargs)
        self.calls.append(call)
        return call


class SilentBroker(Protocol):
    """Stands for an ipcd that reads a lookup and never answers."""

    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        self.received = b""
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


class CancelTests(TestCase):
    """A lookup that is never answered: connect() can be given up."""

    def setUp(self) -> Any:
        self.rundir = short_rundir(self)
        self.factory = Factory.forProtocol(SilentBroker)
        self.factory.connections = []
        d = IPCServerEndpoint(reactor, "ipc", self.rundir).listen(self.factory)
        return d.addCallback(lambda port: self.addCleanup(port.stopListening))

    @inlineCallbacks
    def lookupSent(self, timeout: float = TIMEOUT) -> Any:
        endpoint = IPCClientEndpoint(
            reactor, "pong", self.rundir, "pong unix://pong", timeout
        )
        connecting = endpoint.connect(Factory.forProtocol(EchoClient))
        yield wait_until(
            lambda: self.factory.connections and self.factory.connections[0].received,
            "the lookup to arrive",
        )
        return connecting, self.factory.connections[0]

    @inlineCallbacks
    def test_cancelClosesTheLookup(self) -> Any:
        before = yield fd_baseline()
        connecting, broker = yield self.lookupSent()
        connecting.cancel()
        yield self.assertFailure(connecting, CancelledError)
        yield broker.lost.addTimeout(TIMEOUT, reactor)
        yield assert_no_fd_leak(before)

    @inlineCallbacks
    def test_timeoutClosesTheLookup(self) -> Any:
        connecting, broker = yield self.lookupSent(timeout=0.2)
        error = yield self.assertFailure(connecting, TimeoutError)
        where = os.path.join(self.rundir, "ipc")
        self.assertEqual(str(error), f"no answer from ipcd at {where} within 0.2 s")
        yield broker.lost.addTimeout(TIMEOUT, reactor)

    def test_cancelWhileConnecting(self) -> None:
        """Before ipcd's socket accepted: the connection attempt stops."""
        memory = MemoryReactorClock()
        endpoint = IPCClientEndpoint(memory, "pong", "/r", "pong unix://pong")
        connecting = endpoint.connect(Factory.forProtocol(EchoClient))
        [(path, *_)] = memory.unixClients
        self.assertEqual(path, "/r/ipc")
        connector = memory.connectors[0]
        connecting.cancel()
        self.failureResultOf(connecting, CancelledError)
        self.assertEqual(connector.stoppedConnecting, True)
        self.assertEqual(memory.getDelayedCalls(), [])


class HostileBrokerTests(TestCase):
    """
    A stand-in for ipcd (a thread, real descriptors passed) answering what
    ipcd never would: the endpoint holds no more than an answer's worth.
    """

    def serve(self, answer: Callable[[socket.socket], None]) -> str:
        """RUNDIR whose C{ipc} reads a lookup, then C{answer}s and stays open."""
        rundir = short_rundir(self)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        listener.bind(os.path.join(rundir, "ipc"))
        listener.listen(1)
        done = threading.Event()

        def run() -> None:
            peer, _ = listener.accept()
            with peer:
                peer.settimeout(TIMEOUT)
                recv_message(peer)
                answer(peer)
                done.wait(TIMEOUT * 6)  # longer than the endpoint waits

        thread = threading.Thread(target=run)
        thread.start()
        self.addCleanup(thread.join, TIMEOUT)
        self.addCleanup(done.set)
        return rundir

    def connect(self, rundir: str) -> Deferred[Any]:
        endpoint = IPCClientEndpoint(
            reactor, "pong", rundir, "pong unix://pong", TIMEOUT
        )
        return endpoint.connect(Factory.forProtocol(EchoClient))

    @inlineCallbacks
    def test_endlessAnswer(self) -> Any:
        """
        An answer that goes on and on is judged at 4 KiB, as the blocking
        client judges it, not held (a MiB, here) until the timeout.
        """

        def flood(peer: socket.socket) -> None:
            try:
                peer.sendall(b"x" * (1 << 20))
            except OSError:
                pass  # the endpoint has had enough and closed

        connecting = self.connect(self.serve(flood))
        failure = yield self.assertFailure(connecting, HandoffError)
        self.assertIn("unexpected answer from ipcd: b'xxx", str(failure))

    @inlineCallbacks
    def test_closedMidLookup(self) -> Any:
        """
        ipcd going away mid-answer (half an C{ok}, or nothing, then closed):
        C{HandoffError} saying so, and no descriptor left open.
        """
        before = yield fd_baseline()
        for sent, message in (
            (b"", "ipcd closed the connection without an answer"),
            (b"o", "unexpected answer from ipcd: b'o'"),
        ):
            rundir = short_rundir(self)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(os.path.join(rundir, "ipc"))
            listener.listen(1)

            def answer(sent: bytes = sent, listener: socket.socket = listener) -> None:
                with listener, listener.accept()[0] as peer:
                    peer.settimeout(TIMEOUT)
                    recv_message(peer)
                    peer.sendall(sent)

            answered = deferToThread(answer)
            error = yield self.assertFailure(self.connect(rundir), HandoffError)
            self.assertEqual(str(error), message)
            self.assertNotIsInstance(error, LookupRefused)  # no ipcd says that
            yield answered
        yield assert_no_fd_leak(before)

    @inlineCallbacks
    def test_extraDescriptorClosedAtOnce(self) -> Any:
        """
        A second descriptor, with a second piece of an answer still
        unfinished, is closed as it comes: its far end sees EOF while the
        lookup still waits.
        """
        first, first_far = socket.socketpair()
        extra, extra_far = socket.socketpair()
        for sock in (first, first_far, extra, extra_far):
            self.addCleanup(sock.close)

        def pieces(peer: socket.socket) -> None:
            peer.sendmsg([b"x"], scm_rights(first_far.fileno()))
            peer.sendmsg([b"y"], scm_rights(extra_far.fileno()))
            extra_far.close()

        connecting = self.connect(self.serve(pieces))
        extra.settimeout(TIMEOUT)
        self.assertEqual((yield deferToThread(extra.recv, 1)), b"")
        self.assertFalse(connecting.called)
        connecting.cancel()
        yield self.assertFailure(connecting, CancelledError)


class AdoptTests(SynchronousTestCase):
    """
    adoptStreamConnection returns nothing by its interface
    (C{IReactorSocket}): the protocol is taken from the factory's call.
    """

    def adopt(self, factory: Any) -> Any:
        built: list[Any] = []

        class Reactor:
            def adoptStreamConnection(  # noqa: N802 (Twisted's name)
                self, fd: int, family: int, factory: Any
            ) -> None:
                built.append(factory.buildProtocol(None))

        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        return adopt_into_reactor(Reactor(), theirs.detach(), factory), built

    def test_protocolFromTheFactory(self) -> None:
        protocol, built = self.adopt(Factory.forProtocol(EchoClient))
        self.assertIsInstance(protocol, EchoClient)
        self.assertEqual(built, [protocol])

    def test_noProtocol(self) -> None:
        factory = Factory()
        factory.buildProtocol = lambda addr: None  # type: ignore[method-assign]
        self.assertRaises(HandoffError, self.adopt, factory)

    def test_notASocket(self) -> None:
        """
        A descriptor handed over that is no socket (a pipe's end): a clear
        error, and the descriptor closed, never adopted nor kept.
        """
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, write_end)
        factory = Factory.forProtocol(EchoClient)
        with self.assertRaises(HandoffError) as caught:
            adopt_into_reactor(object(), read_end, factory)  # type: ignore[arg-type]
        self.assertIn("not a socket", str(caught.exception))
        self.assertRaises(BrokenPipeError, os.write, write_end, b"x")
