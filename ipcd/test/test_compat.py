"""
L{ipcd.compat}: the private names of Twisted, pyOpenSSL, autobahn and
CPython that ipcd's fast paths read.

Canaries: every name is there in the installed libraries (a new release
that drops one fails here, by name), no other module reads one, and the
probes import no reactor.  Fallbacks: each fast path, its name made
missing, still serves a real connection (real sockets, real TLS), the
public way, with one log line saying so.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from ipcd import compat
from ipcd.backlogs import TCP_BACKLOG, with_backlog
from ipcd.checkers import Invalid, check_server_endpoint
from ipcd.compat import autobahn as compat_autobahn
from ipcd.compat import cpython as compat_cpython
from ipcd.compat import pyopenssl as compat_pyopenssl
from ipcd.compat import twisted as compat_twisted
from ipcd.daemons import settings_of
from ipcd.daemons.tls import daemon as tls_module
from ipcd.daemons.tls.material import MaterialError, read_material
from ipcd.daemons.tls.relay import tls_failure
from ipcd.listenerkeys import UnsafeKey, check_listener_key
from ipcd.options import Options
from ipcd.relay import RelayEnded
from ipcd.test.support import (
    bounce,
    lookup,
    make_config,
    python_env,
    short_rundir,
    start_ipcd,
)
from ipcd.test.tcpsupport import start_host
from ipcd.test.test_packaging import source_tree
from ipcd.test.test_tls import TlsTestCase
from ipcd.test.test_tlsrelay import fast_sides
from ipcd.test.test_websocket import echo
from ipcd.test.tlssupport import ALICE_KEY, TestCA, start_tls_host
from ipcd.test.wssupport import BINARY, TEXT, start_ws_host
from ipcd.wire import encode

OK = b"ok"

# The foreign private names the issue counted (and the module under each).
FOREIGN = re.compile(
    r"\._(tempDataBuffer|tempDataLen|sendmsgQueue|writeDisconnecting"
    r"|tlsConnection|handshakeDone|lostTLSConnection|appSendBuffer"
    r"|reverse_mapping|context|ssl|into_ssl|from_ssl|raise_ssl_error"
    r"|dataReceived|perMessageCompress|batched_timer|accept|buildAddr"
    r"|raiseSynchronously|waitingForPort|dispatch|logger|serverParsers"
    r"|parseServer|parse|preexistingSocket|shouldShutdown)\b"
    r"|import _socket\b|_socket\.socket|endpoints import _"
)
# ipcd's own attributes that share a name with one of those.
OWN = {}


def of(library: str) -> list[compat.Name]:
    compat.check()  # every compat module imported: every name made
    return [name for name in compat.NAMES if name.library == library]


class CanaryTests(SynchronousTestCase):
    """Every name ipcd.compat relies on is in the installed libraries."""

    def assertAllThere(self, *libraries: str) -> None:  # noqa: N802
        names = [name for library in libraries for name in of(library)]
        self.assertTrue(names, f"no names for {libraries}")
        gone = [name.name for name in names if not name.probe()]
        self.assertEqual(gone, [], f"gone from the installed {libraries}")

    def test_twisted(self) -> None:
        self.assertAllThere("Twisted")

    def test_pyopenssl(self) -> None:
        """pyOpenSSL's names, and the bindings functions ipcd calls."""
        self.assertAllThere("pyOpenSSL", "cryptography")

    def test_autobahn(self) -> None:
        self.assertAllThere("autobahn")

    def test_cpython(self) -> None:
        self.assertAllThere("CPython")

    def test_publicReplacements(self) -> None:
        """The public APIs used in place of private ones (and the floors for them)."""
        from OpenSSL.SSL import OP_NO_RENEGOTIATION, Connection, Context

        self.assertTrue(callable(Connection.set_options))  # pyOpenSSL 26.2
        self.assertTrue(callable(Connection.pending))
        self.assertTrue(callable(Context.set_tls13_ciphersuites))  # pyOpenSSL 25.2
        self.assertTrue(OP_NO_RENEGOTIATION)
        import _socket
        import socket

        self.assertIs(compat_cpython.RawSocket, _socket.socket)
        self.assertIs(socket.SocketType, _socket.socket)

    def test_probeSeesAGoneName(self) -> None:
        """
        A probe is false once its name is gone, and using the name then says
        so in one log line, however often it is used.
        """
        from twisted.internet import endpoints
        from twisted.logger import globalLogPublisher

        logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        name = compat.Name(
            "Twisted",
            "endpoints._parse",
            "a test's fast path",
            "the slow way",
            compat_twisted.ENDPOINT_PARSE.probe,
        )
        compat.NAMES.remove(name)
        parse = endpoints._parse
        del endpoints._parse
        try:
            self.assertRaises(AttributeError, name.probe)
            self.assertFalse(name.usable())
            self.assertFalse(name.usable())
        finally:
            endpoints._parse = parse
        lines = [e for e in logged if e.get("log_namespace") == "ipcd.compat"]
        self.assertEqual(len(lines), 1)
        self.assertEqual(lines[0]["name"], "endpoints._parse")

    def test_noReactorImported(self) -> None:
        """Importing and probing every name imports no reactor."""
        code = (
            "import json, sys\n"
            "from ipcd import compat\n"
            "missing = compat.check()\n"
            "print(json.dumps([len(compat.NAMES), [n.name for n in missing],"
            " 'twisted.internet.reactor' in sys.modules]))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            env=python_env(),
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        count, missing, reactor = json.loads(out.stdout)
        self.assertEqual((missing, reactor), ([], False))
        self.assertGreaterEqual(count, 20)

    def test_onlyCompatReadsThem(self) -> None:
        """No module but ipcd/compat reads a foreign private name."""
        tree = source_tree()
        found = []
        for top in ("ipcd", "twisted"):
            for directory, _dirs, files in os.walk(os.path.join(tree, top)):
                relative = os.path.relpath(directory, tree)
                if relative.startswith(("ipcd/compat", "ipcd/test")):
                    continue
                for file in files:
                    if not file.endswith(".py"):
                        continue
                    path = os.path.join(relative, file)
                    with open(os.path.join(tree, path)) as f:
                        for number, line in enumerate(f, 1):
                            for match in FOREIGN.finditer(line):
                                word = match.group(0).lstrip(".")
                                if (path, word) not in OWN:
                                    found.append(f"{path}:{number}: {line.strip()}")
        self.assertEqual(found, [])


class Missing:
    """Make a compat name missing for one test (and let it log again)."""

    def missing(self, *names: compat.Name) -> None:
        for name in names:
            self.patch(name, "present", False)  # type: ignore[attr-defined]
            self.patch(name, "said", False)  # type: ignore[attr-defined]


class TlsFallbackTests(Missing, TlsTestCase):
    """tlsd's relay on raw sockets, each name it needs missing in turn."""

    @inlineCallbacks
    def pongInTwisted(self, *names: compat.Name) -> Any:  # noqa: N802
        self.missing(*names)
        b = yield start_tls_host(
            self,
            {"psk_file": self.keys(alice=ALICE_KEY)},
            rules=["allow in pong psk:alice"],
        )
        a = yield self.psk_client("alice", ALICE_KEY)
        reply = yield self.lookup_on(a, b.route("pong"))
        self.assertEqual((reply.data, len(reply.fds)), (OK, 1))
        sock = reply.take_socket(self)
        for payload in (b"bounce me", os.urandom(70000)):
            answer = yield deferToThread(bounce, sock, payload)
            self.assertEqual(answer, encode(payload))
        # Both hosts relay through Twisted's TLS, and said why.
        self.assertEqual((fast_sides(a), fast_sides(b)), (0, 0))
        yield self.assertLogged("relaying through Twisted's TLS")
        yield self.assertLogged(f"has no {names[0].name}")
        sock.close()

    def test_noSslPointer(self) -> Any:
        """
        The fix for the stall: the pointers are read before the socket
        leaves Twisted, so a missing one keeps the connection in Twisted.
        """
        return self.pongInTwisted(compat_pyopenssl.SSL)

    def test_noMemoryBios(self) -> Any:
        return self.pongInTwisted(compat_pyopenssl.MEMORY_BIOS)

    def test_noBindings(self) -> Any:
        return self.pongInTwisted(compat_pyopenssl.BINDINGS)

    def test_noTwistedTlsState(self) -> Any:
        return self.pongInTwisted(compat_twisted.TLS_APP_SEND_BUFFER)

    def test_noHandshakeDone(self) -> Any:
        return self.pongInTwisted(compat_twisted.TLS_HANDSHAKE_DONE)

    def test_noTempDataBuffer(self) -> Any:
        """
        Also the lookup's answer: the fd goes Twisted's way (with C{o}, then
        C{k}), which ipcd's own client reads whole.
        """
        return self.pongInTwisted(compat_twisted.TEMP_DATA_BUFFER)

    def test_noWriteDisconnecting(self) -> Any:
        """Twisted's TLS relay without its same-turn writes."""
        return self.pongInTwisted(
            compat_twisted.TLS_LOST, compat_twisted.WRITE_DISCONNECTING
        )

    def test_errorNamedByNumber(self) -> None:
        """Without C{_raise_ssl_error}, a TLS error is named by OpenSSL's number."""
        self.missing(compat_pyopenssl.RAISE_SSL_ERROR)
        error = tls_failure(None, None, -1, 1)
        self.assertIsInstance(error, RelayEnded)
        self.assertEqual(str(error), "TLS error: 'SSL_get_error 1'")

    @inlineCallbacks
    def test_verifyErrorUnsaid(self) -> Any:
        """
        Without C{_ssl}, a certificate refused is still refused in one line,
        which does not say OpenSSL's reason.
        """
        self.missing(compat_pyopenssl.SSL)
        stranger = TestCA(short_rundir(self, "ipcd-tls-other-"), "other CA")
        issued = stranger.issue("host-b")
        b = yield start_tls_host(
            self,
            {"certificate": issued.cert, "key": issued.key},
            rules=["allow in pong"],
        )
        a = yield start_tls_host(self, {"trust_roots": self.ca.path}, pongd=False)
        reply = yield self.lookup_on(a, b.route("pong"))
        self.assertEqual(reply.fds, [])
        self.assertTrue(reply.data.startswith(b"ne TLS handshake"), reply.data)
        self.assertNotIn(b"local issuer", reply.data)

    def test_pskUnavailableInOneLine(self) -> None:
        """Without C{Context._context}, PSK settings are refused in one line."""
        self.missing(compat_pyopenssl.CONTEXT)
        rundir = short_rundir(self)
        config = make_config(rundir, tlsd={"psk_file": self.keys(alice=ALICE_KEY)})
        error = self.assertRaises(
            MaterialError, read_material, settings_of(config, tls_module.tlsd)
        )
        self.assertEqual(
            str(error),
            "[tlsd] psk_file: this pyOpenSSL has no Context._context: "
            "pre-shared keys are unavailable",
        )


class SocketFallbackTests(Missing, TlsTestCase):
    """Lookups, tcpd and websocketd with a name missing: still served."""

    @inlineCallbacks
    def assertServed(self, reply: Any) -> Any:  # noqa: N802
        self.assertEqual((reply.data, len(reply.fds)), (OK, 1))
        sock = reply.take_socket(self)
        answer = yield deferToThread(bounce, sock, b"still served")
        self.assertEqual(answer, encode(b"still served"))
        sock.close()

    @inlineCallbacks
    def test_checkedAtStart(self) -> Any:
        """ipcd's start probes every name: a missing one is said then."""
        self.missing(compat_twisted.OPTIONS_DISPATCH)
        rundir = short_rundir(self)
        yield start_ipcd(self, make_config(rundir))
        yield self.assertLogged(
            "Twisted has no usage.Options._dispatch, so ipcd goes without "
            "protocol daemons' command-line flags: set them in the configuration file"
        )
        reply = yield deferToThread(lookup, rundir, b"pong")
        yield self.assertServed(reply)

    @inlineCallbacks
    def test_noRawAccept(self) -> Any:
        """Lookups at accept take Python's socket apart without C{_accept}."""
        self.missing(compat_cpython.ACCEPT)
        rundir = short_rundir(self)
        yield start_ipcd(self, make_config(rundir))
        for _ in range(3):
            reply = yield deferToThread(lookup, rundir, b"pong")
            yield self.assertServed(reply)
        yield self.assertLogged("has no socket.socket._accept")

    @inlineCallbacks
    def test_noPortLogger(self) -> Any:
        """
        Without C{_logger}, ipcd still starts and serves, and a daemon says
        where it listens.
        """
        self.missing(compat_twisted.PORT_LOGGER)
        rundir = short_rundir(self)
        service = yield start_ipcd(
            self, make_config(rundir, tcpd={"listen": "tcp:0:interface=127.0.0.1"})
        )
        reply = yield deferToThread(lookup, rundir, b"pong")
        yield self.assertServed(reply)
        port = yield service.getServiceNamed("tcpd").listening()
        self.assertEqual(port.getHost().host, "127.0.0.1")

    @inlineCallbacks
    def test_tcpRouteWithoutParserInternals(self) -> Any:
        """
        Without Twisted's endpoint-string internals, a configuration still
        loads (an unknown type still refused), and tcpd serves.
        """
        self.missing(
            compat_twisted.ENDPOINT_PARSE,
            compat_twisted.SERVER_PARSERS,
            compat_twisted.PARSE_SERVER,
            compat_twisted.TEMP_DATA_LEN,
        )
        check_server_endpoint("tcp:0:interface=127.0.0.1")
        self.assertRaises(Invalid, check_server_endpoint, "nosuch:1")
        b = yield start_host(self, rules=["allow in pong"])
        a = yield start_host(self, pongd=False)
        reply = yield deferToThread(
            lookup, a.rundir, f"pong;pong {b.route('pong')}".encode()
        )
        yield self.assertServed(reply)

    def test_listenerKeyWithoutParserInternals(self) -> None:
        """
        Without Twisted's endpoint-string parser, an ssl: listener's key is
        still found, C{\\:} unescaped, and still checked.
        """
        description = r"ssl:0:interface=\:\:1:privateKey=/no\:such/k.pem"
        parsed = compat_twisted.endpoint_keywords(description)
        self.missing(compat_twisted.ENDPOINT_PARSE)
        self.assertEqual(compat_twisted.endpoint_keywords(description), parsed)
        self.assertEqual(parsed["privateKey"], "/no:such/k.pem")
        self.assertRaises(UnsafeKey, check_listener_key, description)

    def test_backlogWithoutParserInternals(self) -> None:
        """
        Without Twisted's endpoint-string parser, a listener's backlog given
        by position is still found, and ipcd's added where none is.
        """
        given, named = r"tcp:0:\:\:1:10", r"tcp:0:interface=\:\:1"
        parsed = [compat_twisted.endpoint_positionals(d) for d in (given, named)]
        self.missing(compat_twisted.ENDPOINT_PARSE)
        self.assertEqual(
            [compat_twisted.endpoint_positionals(d) for d in (given, named)], parsed
        )
        self.assertEqual(parsed, [["0", "::1", "10"], ["0"]])
        self.assertEqual(with_backlog(given), given)
        self.assertEqual(with_backlog(named), f"{named}:backlog={TCP_BACKLOG}")

    @inlineCallbacks
    def wsEcho(self, *names: compat.Name) -> Any:  # noqa: N802
        self.missing(*names)
        host = yield start_ws_host(self)
        big = os.urandom(300_000)  # read in pieces: frame by frame
        replies = yield deferToThread(
            echo, host.port, [(b"hi", TEXT), (big, BINARY), (b"x", BINARY)]
        )
        self.assertEqual(replies, [(TEXT, b"hi"), (BINARY, big), (BINARY, b"x")])
        yield self.assertLogged(f"has no {names[0].name}")

    def test_websocketWithoutDataReceived(self) -> Any:
        return self.wsEcho(compat_autobahn.DATA_RECEIVED)

    def test_websocketWithoutBufferCounts(self) -> Any:
        """The outbox's sendmsg queues behind the transport instead."""
        return self.wsEcho(compat_twisted.TEMP_DATA_LEN)

    def test_websocketWithoutSendmsgQueue(self) -> Any:
        return self.wsEcho(compat_twisted.SENDMSG_QUEUE)

    def test_websocketWithoutReactorTimers(self) -> Any:
        return self.wsEcho(compat_autobahn.BATCHED_TIMER)

    def test_websocketWithoutOptionsLine(self) -> Any:
        """Options pretty-printed per connection, as autobahn does."""
        return self.wsEcho(compat_autobahn.OPTIONS_LINE)


class OptionsFallbackTests(Missing, SynchronousTestCase):
    def test_daemonFlagsOff(self) -> None:
        """
        Without C{usage.Options._dispatch}, the daemons' flags are not on the
        command line (a usage error, one line); the rest parses.
        """
        self.missing(compat_twisted.OPTIONS_DISPATCH)
        options = Options()
        options.parseOptions(["--rundir", "/tmp/x"])
        self.assertEqual(options["rundir"], "/tmp/x")
        self.assertIsNone(options["no-tcp"])
        error = self.assertRaises(UsageError, Options().parseOptions, ["--no-tcp"])
        self.assertIn("no-tcp", str(error))
