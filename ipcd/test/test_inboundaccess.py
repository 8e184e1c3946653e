"""
A remote peer is "others" for a socket's permissions, whichever listener it
arrives through (tcpd, tlsd, websocketd, udpd; loopback included): a glob in
an C{in} rule never widens them.  A local user who may not connect to a
root-only socket cannot reach it through a loop route to ipcd's own
listeners; a rule naming the service exactly, or a grant, lets peers in.

The clients run as another uid, so these tests need root.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from ipcd.control import format_status, status_report
from ipcd.test.support import (
    as_user,
    assert_logged,
    counted_pong,
    logged_lines,
    make_config,
    needs_root,
    recv_upto,
    short_rundir,
    start_ipcd,
    wait_until,
)
from ipcd.test.tcpsupport import TCP_LISTEN, bounce_through, tcp_connect
from ipcd.test.tlssupport import ALICE_KEY, TLS_LISTEN, secrets_file
from ipcd.test.udpsupport import UDP_LISTEN
from ipcd.test.wssupport import WS_LISTEN

# A local user with no claim on root's sockets (numeric: no passwd entry).
MALLORY = 61002


class LoopRoutesTests(TestCase):
    """Every loop route through ipcd's own listeners, as another uid."""

    @inlineCallbacks
    def start(
        self, rules: list[str], grants: tuple[str, ...] = (), **config: Any
    ) -> Any:
        needs_root()
        self.rundir = rundir = short_rundir(self)
        keys = secrets_file(short_rundir(self, "ipcd-keys-"), {"alice": ALICE_KEY})
        config = make_config(
            rundir,
            rules=rules,
            grants=list(grants),
            tcpd={"listen": TCP_LISTEN},
            tlsd={"listen": TLS_LISTEN, "psk_file": keys, "psk_identity": "alice"},
            websocketd={"listen": WS_LISTEN, "ping_interval": 0},
            udpd={"enabled": True, "listen": UDP_LISTEN},
            **config,
        )
        self.service = service = yield start_ipcd(self, config)
        tcp = yield service.getServiceNamed("tcpd").listening()
        tls = yield service.getServiceNamed("tlsd").listening()
        ws = yield service.getServiceNamed("websocketd").listening()
        _, udp = service.getServiceNamed("udpd").address()
        self.tcp_port = tcp.getHost().port
        self.ports = {
            "tcp": self.tcp_port,
            "tls": tls.getHost().port,
            "ws": ws.getHost().port,
            "udp": udp,
        }
        self.addCleanup(wait_until, lambda: not service.broker.relays, "relays to end")
        # Mallory may use ipcd, and connect to what others may connect to.
        os.chmod(rundir, 0o755)
        os.chmod(os.path.join(rundir, "ipc"), 0o666)
        self.secret = self.serve("secret", 0o600)  # root's alone
        self.public = self.serve("public", 0o666)

    def serve(self, name: str, mode: int) -> Factory:
        path = os.path.join(self.rundir, name)
        factory = counted_pong(self, path)
        os.chmod(path, mode)
        return factory

    def loop(self, scheme: str, service: str) -> Any:
        """Mallory's lookup of C{service} through ipcd's own SCHEME listener."""
        route = f"{scheme}://127.0.0.1:{self.ports[scheme]}/{service}"
        ipc = os.path.join(self.rundir, "ipc")
        return as_user(ipc, MALLORY, MALLORY, (), f"{service};{service} {route}")

    @inlineCallbacks
    def test_globReachesOnlyWhatOthersMay(self) -> Any:
        """
        With C{allow in *}, Mallory gets C{ne} for root's 0600 C{secret}
        through every listener, as she does directly; C{public} (0666)
        she reaches through each.
        """
        yield self.start(["allow in *"])
        direct = yield as_user(
            os.path.join(self.rundir, "secret"), MALLORY, MALLORY, (), "connect"
        )
        self.assertEqual(direct, {"error": "Permission denied"})
        for scheme in self.ports:
            answer = yield self.loop(scheme, "secret")
            self.assertEqual(answer["fds"], 0, f"{scheme}: {answer}")
            self.assertTrue(answer["reply"].startswith("ne "), f"{scheme}: {answer}")
            answer = yield self.loop(scheme, "public")
            self.assertEqual(answer, {"reply": "ok", "fds": 1}, scheme)
        self.assertEqual(self.secret.connections, 0)
        self.assertEqual(self.public.connections, 4)
        self.assertEqual(self.service.broker.counters["access denied"], 4)

    @inlineCallbacks
    def test_globTellsNothingOfWhatIsThere(self) -> Any:
        """
        Past C{allow in *}, a name the peer may not connect to is answered
        as a name with nothing there, through every listener: root's 0600
        socket, a file, a user's link.  They were C{refused} and
        C{unavailable} against C{no such service}: a list of what RUNDIR
        holds behind its permissions.  The decision line says why.
        """
        yield self.start(["allow in *"])
        afile = os.path.join(self.rundir, "afile")
        with open(afile, "w"):
            os.chmod(afile, 0o600)
        ulink = os.path.join(self.rundir, "ulink")
        os.symlink("public", ulink)
        os.lchown(ulink, MALLORY, MALLORY)
        lines = logged_lines(self)
        hidden = ("secret", "afile", "ulink")
        for scheme in self.ports:
            nothing = yield self.loop(scheme, "nosuch")
            self.assertEqual(nothing["fds"], 0, nothing)
            for name in hidden:
                answer = yield self.loop(scheme, name)
                told = answer["reply"].replace(name, "nosuch")
                self.assertEqual(told, nothing["reply"], f"{scheme}: {name}")
        for name in hidden:
            answer = yield deferToThread(ask_tcpd, self.tcp_port, name.encode())
            self.assertEqual(answer, b"ne no such service", name)
        assert_logged(self, lines, f"others may not connect to {self.rundir}/secret")
        assert_logged(self, lines, f"{afile} is not a socket")
        assert_logged(self, lines, f"{ulink} is a symbolic link")
        self.assertEqual(self.secret.connections, 0)

    @inlineCallbacks
    def test_exactRuleLetsPeersIn(self) -> Any:
        """C{allow in secret} is the admin's word: remote peers get in."""
        yield self.start(["allow in secret", "allow in *"])

        answer = yield deferToThread(bounce_through, self.tcp_port, b"secret")
        self.assertEqual(answer, b"\0\0\0\x09bounce me")
        for scheme in self.ports:
            answer = yield self.loop(scheme, "secret")
            self.assertEqual(answer, {"reply": "ok", "fds": 1}, scheme)
        self.assertEqual(self.secret.connections, 5)

    @inlineCallbacks
    def test_grantLetsPeersIn(self) -> Any:
        yield self.start(["allow in *"], grants=("secret ip:127.0.0.1",))
        answer = yield self.loop("tcp", "secret")
        self.assertEqual(answer, {"reply": "ok", "fds": 1})
        self.assertEqual(self.service.broker.counters["granted"], 1)

    @inlineCallbacks
    def test_statusSaysWhatPeersReach(self) -> Any:
        """C{ipcd status} lists the inbound services, and why they are reached."""
        yield self.start(
            ["allow in public", "allow in *"],
            grants=("pong *",),
            redirects={"control": "ipcd-control"},
        )
        os.chmod(os.path.join(self.rundir, "public"), 0o600)
        report = status_report(self.service.broker)
        inbound = report["inbound"]
        self.assertEqual(inbound["public"], "reachable: rule 1 names it")
        self.assertEqual(inbound["pong"], "reachable: grant 1 (pong *)")
        self.assertEqual(
            inbound["secret"],
            "not reachable: rule 2 is a glob and others may not connect (0600)",
        )
        self.assertEqual(
            inbound["control"], "not reachable: 'ipcd-control' is ipcd's own socket"
        )
        text = format_status(report)
        self.assertIn("inbound:\n", text)
        self.assertIn("  public: reachable: rule 1 names it\n", text)

    @inlineCallbacks
    def test_statusSaysWhatTheWalkRefuses(self) -> Any:
        """
        A name an exact rule or a grant lets peers reach, whose walk is
        refused (a user's link on the admin's route, a link as the socket
        itself, no socket there): C{ipcd status} says why, as the peer is
        answered.  It said "reachable" for all three.
        """
        home = short_rundir(self, "ipcd-home-")
        os.chmod(home, 0o755)
        os.chown(home, MALLORY, MALLORY)
        app = os.path.join(home, "app")
        yield self.start(
            ["allow in app", "allow in alias", "allow in gone", "allow in *"],
            grants=("granted *",),
            routes={
                "app": f"unix://{app}/root.sock",
                "granted": f"unix://{app}/root.sock",
                "gone": f"unix://{home}/gone.sock",
            },
            redirects={"alias": "link"},
        )
        os.symlink(self.rundir, app)  # Mallory's link, to root's directory
        os.lchown(app, MALLORY, MALLORY)
        os.symlink("secret", os.path.join(self.rundir, "link"))
        inbound = status_report(self.service.broker)["inbound"]
        users_link = (
            f"not reachable: {app}/root.sock: a symbolic link of uid {MALLORY} "
            "on the way; a remote peer's request follows only root's (or "
            "ipcd's) links"
        )
        self.assertEqual(inbound["app"], users_link)
        # Its walk as others (allow in *: Mallory's home is 0755) meets the
        # link before any grant is asked.
        self.assertEqual(inbound["granted"], users_link)
        self.assertEqual(
            inbound["alias"],
            f"not reachable: {self.rundir}/link is a symbolic link; only the "
            "socket itself may be reached this way",
        )
        self.assertEqual(
            inbound["gone"], f"not reachable: {home}/gone.sock does not exist"
        )
        # As the decision lines say; the peers are told no more than this
        # (it told them the paths, the link's owner).
        lines = logged_lines(self)
        for name in ("app", "granted", "alias"):
            answer = yield deferToThread(ask_tcpd, self.tcp_port, name.encode())
            self.assertEqual(answer, b"ne refused")
            assert_logged(self, lines, inbound[name].removeprefix("not reachable: "))
        answer = yield deferToThread(ask_tcpd, self.tcp_port, b"gone")
        self.assertEqual(answer, b"ne no such service")
        assert_logged(self, lines, f"'gone': {home}/gone.sock does not exist")


def ask_tcpd(port: int, service: bytes) -> bytes:
    """As a remote peer of tcpd on C{port}: the answer to C{service}."""
    with tcp_connect(port) as sock:
        sock.sendall(service)
        return recv_upto(sock, 4096)
