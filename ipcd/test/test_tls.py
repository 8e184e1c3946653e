"""
tlsd on real sockets: two in-process ipcd instances (host A dials, host B
serves pongd) speaking TLS with certificates from a test CA, mutual TLS and
pre-shared keys (TLS 1.3 and 1.2); refusals cost nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.testing import EventLoggingObserver
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import TestCase

from ipcd.control import format_status, status_report
from ipcd.daemons.tls.material import Material, ServerCreator
from ipcd.limits import LOG_BURST, LOG_PERIOD
from ipcd.test.support import (
    TIMEOUT,
    assert_logged,
    assert_no_fd_leak,
    assert_refused,
    bounce,
    connect_unix,
    fd_baseline,
    free_port,
    logged_lines,
    lookup,
    make_config,
    recv_upto,
    short_rundir,
    stale_socket,
    wait_rate_limited,
    wait_until,
)
from ipcd.test.tcpsupport import digest_service, recv_eof
from ipcd.test.tlssupport import (
    ALICE_KEY,
    BOB_KEY,
    TLS_LISTEN,
    TestCA,
    secrets_file,
    start_tls_host,
)
from ipcd.test.wssupport import unverified_context
from ipcd.wire import encode

OK = b"ok"
MB = 1024 * 1024


class TlsTestCase(TestCase):
    """A test CA, and helpers to ask for pong through host A."""

    def setUp(self) -> None:
        self.dir = short_rundir(self, "ipcd-tls-files-")
        self.ca = TestCA(self.dir)
        self.logged: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            self.logged.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def assertLogged(self, *words: str) -> Any:
        """Wait (bounded) for a log line with all of C{words}."""
        return wait_until(
            lambda: any(all(w in line for w in words) for line in self.logged),
            f"a log line with {words!r}",
        )

    @inlineCallbacks
    def certificateHosts(self) -> Any:  # noqa: N802
        """
        Host B serving pong with a certificate from the test CA, and host A
        trusting that CA: (A, B, B's certificate files).
        """
        server = self.ca.issue("host-b")
        b = yield start_tls_host(
            self,
            {"certificate": server.cert, "key": server.key},
            rules=["allow in pong"],
        )
        a = yield start_tls_host(self, {"trust_roots": self.ca.path}, pongd=False)
        return a, b, server

    def keys(self, **lines: str) -> str:
        """A secrets file with these identities, in a directory of its own."""
        directory = short_rundir(self, "ipcd-tls-keys-")
        return secrets_file(directory, lines)

    def psk_client(self, identity: str, key: str, **tlsd: Any) -> Any:
        """A host A that dials with C{identity}'s C{key} (and C{tlsd} settings)."""
        settings = {"psk_file": self.keys(**{identity: key}), **tlsd}
        settings.setdefault("psk_identity", identity)
        return start_tls_host(self, settings, pongd=False)

    def psk_server(self, rules: list[str], **keys: str) -> Any:
        """A host B with pongd, accepting these identities' keys."""
        return start_tls_host(self, {"psk_file": self.keys(**keys)}, rules=rules)

    @inlineCallbacks
    def lookup_on(self, a: Any, route: str, service: str = "pong") -> Any:
        payload = f"{service};{service} {route}".encode()
        reply = yield deferToThread(lookup, a.rundir, payload)
        return reply

    @inlineCallbacks
    def assertPong(self, a: Any, route: str) -> Any:
        reply = yield self.lookup_on(a, route)
        self.assertEqual((reply.first, reply.data, len(reply.fds)), (OK, OK, 1))
        sock = reply.take_socket(self)
        for payload in (b"bounce me", b"x" * 70000):
            echo = yield deferToThread(bounce, sock, payload)
            self.assertEqual(echo, encode(payload))
        return sock

    @inlineCallbacks
    def assertRefused(self, a: Any, route: str, *words: str) -> Any:
        reply = yield self.lookup_on(a, route)
        return assert_refused(self, reply, *words)


# What a client is told of a key the far tlsd did not accept.
WRONG_PSK = (
    "(its tlsd did not accept our pre-shared key: a wrong key, or an identity "
    "it does not know; its log says which)"
)


class CertificateTests(TlsTestCase):
    @inlineCallbacks
    def test_certificateMode(self) -> Any:
        """Pong through tls:// with B's certificate from the test CA."""
        a, b, _ = yield self.certificateHosts()
        yield self.assertPong(a, b.route("pong"))

    @inlineCallbacks
    def test_mutualTls(self) -> Any:
        """
        B requires client certificates: A's reaches pong, and B's rules see
        C{cert:} and C{cert-san:} labels; a client without one is refused.
        """
        server, client = (
            self.ca.issue("host-b"),
            self.ca.issue("host-a", dns=("a.example",)),
        )
        b = yield start_tls_host(
            self,
            {
                "certificate": server.cert,
                "key": server.key,
                "trust_roots": self.ca.path,
                "verify_clients": True,
            },
            rules=["allow in pong cert-san:a.example"],
        )
        a = yield start_tls_host(
            self,
            {
                "certificate": client.cert,
                "key": client.key,
                "trust_roots": self.ca.path,
            },
            pongd=False,
        )
        yield self.assertPong(a, b.route("pong"))
        [stats] = b.broker.relays
        self.assertIn("cert:host-a", stats.labels)
        self.assertEqual(stats.as_dict()["tls"]["peer"], "cert:host-a")
        anonymous = yield start_tls_host(
            self, {"trust_roots": self.ca.path}, pongd=False
        )
        yield self.assertRefused(
            anonymous, b.route("pong"), "client authentication required"
        )
        yield self.assertLogged("no client certificate or key")

    @inlineCallbacks
    def test_pskTls13(self) -> Any:
        """PSK only (no certificate anywhere): TLS 1.3, C{psk:alice} label."""
        b = yield self.psk_server(["allow in pong psk:alice"], alice=ALICE_KEY)
        a = yield self.psk_client("alice", ALICE_KEY)
        yield self.assertPong(a, b.route("pong"))
        # No line of Twisted's per route.
        self.assertEqual([t for t in self.logged if "Starting factory" in t], [])
        # ipcd status: the relay with its TLS version, cipher and peer.
        report = status_report(b.broker)
        [shown] = report["connections"]
        self.assertEqual(
            shown["tls"],
            {
                "version": "TLSv1.3",
                "cipher": "TLS_AES_128_GCM_SHA256",
                "peer": "psk:alice",
            },
        )
        self.assertIn("psk:alice", shown["labels"])
        self.assertEqual(report["config"]["tls_listen"], "tcp:0:interface=127.0.0.1")
        # Said once, in the wide table's details (not in the route as well).
        table = format_status(report, wide=True)
        self.assertIn(
            "tls: version TLSv1.3, cipher TLS_AES_128_GCM_SHA256, peer psk:alice",
            table,
        )
        self.assertEqual(table.count("TLSv1.3"), 1, table)
        [out] = a.broker.relays
        self.assertEqual(out.as_dict()["tls"]["version"], "TLSv1.3")

    @inlineCallbacks
    def test_pskTls12(self) -> Any:
        """A capped at TLS 1.2: a PSK suite, same label."""
        b = yield self.psk_server(["allow in pong psk:alice"], alice=ALICE_KEY)
        a = yield self.psk_client(
            "alice",
            ALICE_KEY,
            psk_identity="",
            psk_hosts={"localhost": "alice"},
            max_version="1.2",
        )
        yield self.assertPong(a, b.route("pong"))
        [stats] = b.broker.relays
        shown = stats.as_dict()["tls"]
        self.assertEqual(shown["version"], "TLSv1.2")
        self.assertIn("PSK", shown["cipher"])
        self.assertEqual(shown["peer"], "psk:alice")

    @inlineCallbacks
    def test_rulesByIdentity(self) -> Any:
        """C{in} rules allow C{psk:alice} and deny C{psk:bob}."""
        b = yield self.psk_server(
            ["deny in pong psk:bob", "allow in pong psk:*"],
            alice=ALICE_KEY,
            bob=BOB_KEY,
        )
        alice = yield self.psk_client("alice", ALICE_KEY)
        bob = yield self.psk_client("bob", BOB_KEY)
        yield self.assertPong(alice, b.route("pong"))
        yield self.assertRefused(bob, b.route("pong"), "'pong': refused")


class ReloadTests(TlsTestCase):
    @inlineCallbacks
    def test_reloadReadsTheKeysAgain(self) -> Any:
        """
        A reload reads the PSK file again for new connections; relays already
        running keep going; a file that became unusable keeps the old keys.
        """
        secrets = self.keys(alice=ALICE_KEY)
        b = yield start_tls_host(
            self, {"psk_file": secrets}, rules=["allow in pong psk:alice"]
        )
        old = yield self.psk_client("alice", ALICE_KEY)
        new = yield self.psk_client("alice", BOB_KEY)
        running = yield self.assertPong(old, b.route("pong"))
        yield self.assertRefused(new, b.route("pong"), "decrypt error")
        secrets_file(os.path.dirname(secrets), {"alice": BOB_KEY})
        self.assertTrue(b.service.reload()["ok"])
        yield self.assertPong(new, b.route("pong"))
        yield self.assertRefused(old, b.route("pong"), "decrypt error")
        echo = yield deferToThread(bounce, running, b"still here")
        self.assertEqual(echo, encode(b"still here"))
        os.chmod(secrets, 0o644)
        self.assertTrue(b.service.reload()["ok"])
        yield self.assertPong(new, b.route("pong"))
        yield self.assertLogged("keeping the previous keys", "mode 0644")


class ReloadSaysTests(TlsTestCase):
    """What is wrong with tlsd's files is logged at the reload, peer or none."""

    @inlineCallbacks
    def test_unusableCertificate(self) -> Any:
        """A certificate that became unusable: said at once, the old one serves."""
        a, b, server = yield self.certificateHosts()
        with open(server.cert, "w") as f:
            f.write("not a certificate")
        answer = b.service.reload()
        self.assertTrue(answer["ok"])
        [kept] = answer["not_applied"]  # (ipcd reload says it: test_scripts)
        self.assertIn("tlsd: keeping the previous keys and certificates: ", kept)
        self.assertTrue(
            any("keeping the previous keys" in line for line in self.logged),
            self.logged,
        )
        yield self.assertPong(a, b.route("pong"))

    @inlineCallbacks
    def test_noMaterialLeft(self) -> Any:
        """A listener left with no certificate or key: said at the reload."""
        _a, b, _server = yield self.certificateHosts()
        rundir = b.rundir
        b.service._reload_config = lambda: make_config(
            rundir, tlsd={"listen": TLS_LISTEN}, rules=["allow in pong"]
        )
        self.assertTrue(b.service.reload()["ok"])
        self.assertTrue(
            any("fails every handshake" in line for line in self.logged),
            self.logged,
        )


class ListenerTests(TlsTestCase):
    @inlineCallbacks
    def test_noKeysNoListenerSaysSo(self) -> Any:
        """
        tlsd with no certificate and no keys serves tls:// routes and
        listens on nothing (as documented): one line says so and how to
        make it listen; a tlsd with keys says no such thing.
        """
        yield self.psk_server(["allow in pong"], alice=ALICE_KEY)
        said = [line for line in self.logged if "tlsd: no listener" in line]
        self.assertEqual(said, [])
        host = yield start_tls_host(self, {}, pongd=False)
        self.assertIsNone(host.service.getServiceNamed("tlsd").listener)
        said = [line for line in self.logged if "tlsd: no listener" in line]
        self.assertEqual(
            said,
            [
                f"tlsd: no listener on {TLS_LISTEN}: it listens once [tlsd] has "
                "a certificate and key, or a psk_file (tls:// routes need neither)"
            ],
        )


class RefusalTests(TlsTestCase):
    """
    Refused and logged, and B keeps serving with no fd growth.  B serves
    with a certificate and keys; its handshake deadline is short.
    """

    @inlineCallbacks
    def setUp(self) -> Any:
        super().setUp()
        server = self.ca.issue("host-b", dns=("host-b.example",), ips=())
        self.b = yield start_tls_host(
            self,
            {
                "certificate": server.cert,
                "key": server.key,
                "psk_file": self.keys(alice=ALICE_KEY),
                "handshake_timeout": 0.5,
            },
            rules=["allow in pong psk:alice", "allow in pong ip:127.0.0.1"],
        )
        self.good = yield self.psk_client("alice", ALICE_KEY)
        # One good relay first: whatever is made once (contexts, caches)
        # is made before the baseline.
        sock = yield self.assertPong(self.good, self.b.route("pong"))
        sock.close()
        yield wait_until(lambda: not self.b.broker.relays, "the relay to end")
        self.before = yield fd_baseline()

    @inlineCallbacks
    def refusedThenServing(self, a: Any, route: str, *words: str) -> Any:
        for _ in range(3):
            yield self.assertRefused(a, route, *words)
        sock = yield self.assertPong(self.good, self.b.route("pong"))
        sock.close()
        yield wait_until(lambda: not self.b.broker.relays, "the relay to end")
        yield assert_no_fd_leak(self.before)

    @inlineCallbacks
    def client(self, **tlsd: Any) -> Any:
        host = yield start_tls_host(self, tlsd, pongd=False)
        self.before = yield fd_baseline()  # with A's sockets
        return host

    @inlineCallbacks
    def test_wrongKey(self) -> Any:
        a = yield self.client(psk_file=self.keys(alice=BOB_KEY), psk_identity="alice")
        yield self.refusedThenServing(
            a, self.b.route("pong"), "TLS handshake", "decrypt error", WRONG_PSK
        )
        yield self.assertLogged(
            "PSK identity 'alice'", "failed: wrong key for PSK identity 'alice'"
        )

    @inlineCallbacks
    def test_unknownIdentity(self) -> Any:
        """Refused as a wrong key is: the peer cannot tell them apart."""
        a = yield self.client(psk_file=self.keys(carol=ALICE_KEY), psk_identity="carol")
        yield self.refusedThenServing(
            a, self.b.route("pong"), "TLS handshake", "decrypt error", WRONG_PSK
        )
        yield self.assertLogged("unknown PSK identity 'carol'")

    @inlineCallbacks
    def test_unknownIdentitiesLoggedAtABoundedRate(self) -> Any:
        """
        A peer offering identities B does not know costs B log lines at the
        rate of other failed handshakes (LOG_BURST per LOG_PERIOD and a
        summary), not a line for each handshake.
        """
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        a = yield self.client(psk_file=self.keys(carol=ALICE_KEY), psk_identity="carol")
        # Enough that even attempts spread over a few periods leave most out.
        attempts = 10 * LOG_BURST
        route = self.b.route("pong").encode()
        for _ in range(attempts):
            reply = yield deferToThread(lookup, a.rundir, b"pong;pong " + route)
            self.assertEqual(len(reply.fds), 0)
        yield wait_rate_limited(
            self.b.broker.counters,
            "tlsd: TLS handshakes failed",
            logged,
            "unknown PSK identity 'carol'",
            attempts,
            timeout=LOG_PERIOD + 10,
        )
        lines = [formatEvent(e) for e in logged]
        said = [line for line in lines if "PSK identity 'carol'" in line]
        self.assertLessEqual(len(said), attempts // 2, "\n".join(lines))

    @inlineCallbacks
    def test_wrongHostname(self) -> Any:
        """B's certificate (from a CA A trusts) names host-b.example only."""
        a = yield self.client(trust_roots=self.ca.path)
        route = self.b.route("pong", host="localhost")
        yield self.refusedThenServing(
            a, route, "TLS handshake", "not for this host name"
        )

    @inlineCallbacks
    def test_expiredCertificate(self) -> Any:
        expired = self.ca.issue("old-b", expired=True)
        yield self.serverWith(expired.cert, expired.key, self.ca.path, "expired")

    @inlineCallbacks
    def test_untrustedCertificate(self) -> Any:
        other = TestCA(short_rundir(self, "ipcd-tls-other-"), "other CA")
        stranger = other.issue("stranger")
        yield self.serverWith(
            stranger.cert, stranger.key, self.ca.path, "unable to get local issuer"
        )

    @inlineCallbacks
    def test_pskRouteToCertificateServer(self) -> Any:
        """
        A route presenting a PSK accepts no certificate, even one from a CA
        it would otherwise trust, and says why it failed.
        """
        server = self.ca.issue("cert-only")
        only = yield start_tls_host(
            self,
            {"certificate": server.cert, "key": server.key},
            rules=["allow in pong"],
        )
        a = yield self.psk_client("alice", ALICE_KEY, trust_roots=self.ca.path)
        yield self.assertRefused(
            a,
            only.route("pong"),
            "TLS handshake",
            "it answered with a certificate: it takes no pre-shared keys, and this "
            "route presents PSK identity 'alice' and accepts no certificate",
        )

    @inlineCallbacks
    def serverWith(self, cert: str, key: str, roots: str, word: str) -> Any:
        """A server with C{cert} is refused by a client trusting C{roots}."""
        bad = yield start_tls_host(
            self, {"certificate": cert, "key": key}, rules=["allow in pong"]
        )
        a = yield self.client(trust_roots=roots)
        yield self.refusedThenServing(a, bad.route("pong"), "TLS handshake", word)

    @inlineCallbacks
    def test_plaintextClient(self) -> Any:
        """A plaintext request gets no answer in clear, and is logged."""

        def plaintext() -> bytes:
            with socket.create_connection(("127.0.0.1", self.b.port), TIMEOUT) as s:
                s.sendall(b"pong")
                return recv_eof(s)

        for _ in range(3):
            answer = yield deferToThread(plaintext)
            self.assertNotIn(b"ok", answer)
        # Four bytes are no TLS record: the handshake deadline ends each.
        yield self.assertLogged("dropping 127.0.0.1", "no TLS handshake in time")
        yield self.refusedThenServing(self.good, self.b.route("missing"), "refused")

    @inlineCallbacks
    def test_stalledHandshake(self) -> Any:
        """Half a ClientHello, then silence: dropped at the deadline."""

        def stall() -> bytes:
            with socket.create_connection(("127.0.0.1", self.b.port), TIMEOUT) as s:
                s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
                return recv_eof(s)

        answer = yield deferToThread(stall)
        self.assertEqual(answer, b"")
        yield self.assertLogged("no TLS handshake in time")
        # Counted once, as what it was.
        counters = self.b.broker.counters
        self.assertEqual(counters["tlsd: TLS handshakes timed out"], 1)
        self.assertEqual(counters["tlsd: TLS handshakes failed"], 0)
        yield self.refusedThenServing(self.good, self.b.route("missing"), "refused")


class OutboundTests(TlsTestCase):
    @inlineCallbacks
    def test_controlSocket(self) -> Any:
        """Upstream's ipcd on A's C{RUNDIR/tls}: framed URI, framed C{ok}, relay."""
        b = yield self.psk_server(["allow in pong psk:alice"], alice=ALICE_KEY)
        a = yield self.psk_client("alice", ALICE_KEY)

        def control() -> tuple[socket.socket, bytes]:
            sock = connect_unix(os.path.join(a.rundir, "tls"))
            sock.sendall(encode(b.route("pong").encode()))
            return sock, recv_upto(sock, 6)

        sock, answer = yield deferToThread(control)
        self.addCleanup(sock.close)
        self.assertEqual(answer, encode(OK))
        echo = yield deferToThread(bounce, sock, b"via RUNDIR/tls")
        self.assertEqual(echo, encode(b"via RUNDIR/tls"))

    @inlineCallbacks
    def test_deadlineClosesTheConnection(self) -> Any:
        """
        A server that accepts TCP and never speaks, and a tlsd that never
        answers the request: the lookup is refused at the broker's deadline,
        and the TLS connection is closed (no fd left).
        """
        silent = socket.socket()
        self.addCleanup(silent.close)
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        # A TLS server that completes the handshake and never answers.
        material = Material(keys={"alice": bytes.fromhex(ALICE_KEY)})
        mute = reactor.listenTCP(
            0,
            TLSMemoryBIOFactory(
                ServerCreator(material.server_context()),
                False,
                Factory.forProtocol(Protocol),
            ),
            interface="127.0.0.1",
        )
        self.addCleanup(mute.stopListening)
        a = yield start_tls_host(
            self,
            {"psk_file": self.keys(alice=ALICE_KEY), "psk_identity": "alice"},
            pongd=False,
            ipcd={"connect_timeout": 0.3},
        )
        before = yield fd_baseline()
        mute_port = mute.getHost().port
        for route in (
            f"tls://localhost:{port}/pong",
            f"tls://localhost:{mute_port}/pong",
        ):
            yield self.assertRefused(a, route, "timed out")
        yield wait_until(lambda: not a.broker.relays, "no relay on A")
        yield assert_no_fd_leak(before)


def tls_answer(port: int, request: bytes) -> bytes:
    """All tlsd says to a TLS peer asking for C{request} (framed)."""
    with socket.create_connection(("127.0.0.1", port), TIMEOUT) as raw:
        with unverified_context().wrap_socket(raw) as tls:
            tls.sendall(encode(request))
            return recv_eof(tls)


class RemoteRefusalTests(TlsTestCase):
    @inlineCallbacks
    def test_remotePeerToldNoLocalDetails(self) -> Any:
        """
        A TLS peer is told exactly "refused", "no such service" or
        "unavailable": never RUNDIR's paths, the rule or errno text, which
        the decision line keeps.
        """
        server = self.ca.issue("localhost")
        b = yield start_tls_host(
            self,
            {"certificate": server.cert, "key": server.key},
            rules=["deny in secret", "allow in missing", "allow in stale"],
        )
        stale_socket(os.path.join(b.rundir, "stale"))
        lines = logged_lines(self)
        for request, told, logged in (
            (b"secret", b"refused", "denied by rule 1 (deny in secret *)"),
            (b"missing", b"no such service", f"{b.rundir}/missing does not exist"),
            (b"stale", b"unavailable", f"stale socket {b.rundir}/stale"),
        ):
            answer = yield deferToThread(tls_answer, b.port, request)
            self.assertEqual(answer, encode(b"ne " + told))
            assert_logged(self, lines, logged)


class RouteLoopTests(TlsTestCase):
    @inlineCallbacks
    def test_routedOutAgainRefused(self) -> Any:
        """
        A route that leads back into this very ipcd through its own tlsd,
        for a name routed out again: refused as a loop at the first hop.
        """
        port = free_port()
        host = yield start_tls_host(
            self,
            {
                "psk_file": self.keys(alice=ALICE_KEY),
                "psk_identity": "alice",
                "listen": f"tcp:{port}:interface=127.0.0.1",
            },
            rules=["allow in loopy psk:alice", "allow in pong psk:alice"],
            routes={"loopy": f"tls://127.0.0.1:{port}/loopy"},
        )
        lines = logged_lines(self)
        reply = yield deferToThread(lookup, host.rundir, b"loopy")
        assert_refused(self, reply, "'loopy': unavailable")
        assert_logged(self, lines, "route loop: 'loopy'")
        self.assertEqual(host.broker.counters["inbound requests"], 1)
        # The same ipcd, a name served here: a round trip through its tlsd.
        yield self.assertPong(host, f"tls://127.0.0.1:{port}/pong")
        self.assertEqual(len(host.broker.own_dials), 0)


class BulkTests(TlsTestCase):
    @inlineCallbacks
    def test_bulkUnderBackpressure(self) -> Any:
        """
        32 MiB from A's client to a service on B that does not read at
        first: the relays push back instead of buffering (the sender stalls),
        and once the service reads, every byte arrives intact.
        """
        megabytes = 32
        b = yield self.psk_server(["allow in digest psk:alice"], alice=ALICE_KEY)
        a = yield self.psk_client("alice", ALICE_KEY)
        sink = digest_service(self, b.rundir, "digest", start_paused=True)
        reply = yield self.lookup_on(a, b.route("digest"), "digest")
        sock = reply.take_socket(self)
        sock.settimeout(60)  # the bulk send waits on the paused receiver
        block = os.urandom(MB)

        def send() -> str:
            digest = hashlib.sha256()
            for i in range(megabytes):
                chunk = i.to_bytes(8, "big") + block[8:]
                digest.update(chunk)
                sock.sendall(chunk)
            return digest.hexdigest()

        sending = deferToThread(send)
        yield wait_until(lambda: sink.connections, "the service to be connected")
        engines = [h.tls_state.socket_relays for h in (a, b)]
        self.assertEqual([len(e.sides()) for e in engines], [2, 2])
        # Held, not growing: what the relays buffer stays bounded while the
        # sender is stuck.
        yield deferLater(reactor, 0.5, lambda: None)
        self.assertFalse(sending.called)
        for engine in engines:
            self.assertLessEqual(engine.buffered(), 4 * MB)
        sink.connections[0].transport.resumeProducing()
        mine = yield sending
        sock.close()
        service = sink.connections[0]
        yield service.lost
        self.assertEqual(
            (service.count, service.digest.hexdigest()), (megabytes * MB, mine)
        )


class CertificateReloadTests(TlsTestCase):
    @inlineCallbacks
    def test_reloadReadsTheCertificateAgain(self) -> Any:
        """A certificate replaced on disk is presented after a reload."""
        a, b, server = yield self.certificateHosts()
        sock = yield self.assertPong(a, b.route("pong"))
        sock.close()
        stranger = TestCA(short_rundir(self, "ipcd-tls-other-"), "other CA")
        replaced = stranger.issue("host-b")
        shutil.copyfile(replaced.cert, server.cert)
        shutil.copyfile(replaced.key, server.key)
        yield self.assertPong(a, b.route("pong"))  # until the reload
        self.assertTrue(b.service.reload()["ok"])
        yield self.assertRefused(a, b.route("pong"), "unable to get local issuer")
