"""
The protocol daemons' listeners on a UNIX socket (C{unix:PATH}, behind a
local reverse proxy such as nginx or HAProxy): their peer is a remote peer,
named and counted by the uid that connected (C{unix:uid=N}), or by the
address a PROXY header names; real sockets, an in-process ipcd.
"""

from __future__ import annotations

import os
import socket
import ssl
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from ipcd.framing import encode
from ipcd.test.support import (
    assert_logged,
    assert_refused,
    bounce,
    connect_unix,
    counted_pong,
    logged_lines,
    lookup,
    make_config,
    recv_upto,
    short_rundir,
    start_ipcd,
    wait_until,
)
from ipcd.test.tcpsupport import recv_eof, start_host
from ipcd.test.tlssupport import TestCA, start_tls_host
from ipcd.test.wssupport import read_opening, start_ws_host, upgrade_request

UID = f"unix:uid={os.getuid()}"
HEADER = b"PROXY TCP4 10.1.2.3 10.0.0.1 5555 80\r\n"


def ask(path: str, request: bytes) -> tuple[socket.socket, bytes]:
    """As a proxy on tcpd's UNIX listener: send C{request}, read 2 bytes."""
    sock = connect_unix(path)
    try:
        sock.sendall(request)
        return sock, recv_upto(sock, 2)
    except BaseException:
        sock.close()
        raise


def said(path: str, request: bytes) -> bytes:
    """All tcpd says to C{request} before it closes."""
    with connect_unix(path) as sock:
        sock.sendall(request)
        return recv_eof(sock)


def opening(path: str, head: bytes = b"") -> Any:
    """websocketd's answer to an opening handshake for pong after C{head}."""
    sock = connect_unix(path)
    try:
        sock.sendall(head + upgrade_request("/pong", "localhost"))
        return read_opening(sock)
    except BaseException:
        sock.close()
        raise


class TcpdOnAUnixSocketTests(TestCase):
    def listener(self) -> str:
        return os.path.join(short_rundir(self, "ipcd-unixl-"), "tcpd.sock")

    @inlineCallbacks
    def test_peerIsRemoteByUid(self) -> Any:
        """
        tcpd on C{unix:PATH} serves its peers (each connection was an
        Unhandled Error, C{'UNIXAddress' object has no attribute 'host'},
        and nothing answered), as remote peers: labelled C{unix:uid=N},
        which an C{in} rule may name, and counted by the limits under that
        one key, whatever path the client bound its socket to.
        """
        path = self.listener()
        b = yield start_host(
            self, rules=[f"allow in pong {UID}"], listen=f"unix:{path}"
        )
        lines = logged_lines(self)
        sock, answer = yield deferToThread(ask, path, encode(b"pong"))
        self.addCleanup(sock.close)
        self.assertEqual(answer, b"\x00\x00")  # a framed request: a framed ok
        self.assertEqual((yield deferToThread(recv_upto, sock, 4)), b"\x00\x02ok")
        self.assertEqual((yield deferToThread(bounce, sock)), encode(b"bounce me"))
        assert_logged(self, lines, f"in 'pong' for {UID} ->")
        limits = b.broker.limits_for("tcpd")
        self.assertEqual(dict(limits.per_peer), {UID: 1})

    @inlineCallbacks
    def test_noLocalRights(self) -> None:
        """
        The proxy's uid gives whoever it relays none of that user's local
        rights: a socket others may not connect to is refused although the
        uid could connect to it and a grant names it (C{uid:N} is a local
        client's label), and the peer is told the public word only.
        """
        path = self.listener()
        b = yield start_host(
            self,
            rules=["allow in *"],
            grants=[f"secret uid:{os.getuid()}"],
            listen=f"unix:{path}",
        )
        secret = os.path.join(b.rundir, "secret")
        counted_pong(self, secret)
        yield wait_until(lambda: os.path.exists(secret), "secret's socket")
        os.chmod(secret, 0o600)
        lines = logged_lines(self)
        answer = yield deferToThread(said, path, b"secret")
        # (A remote peer past a glob is told no such service: b82a3cf.)
        self.assertEqual(answer, b"ne no such service")
        assert_logged(self, lines, "others may not connect")

    @inlineCallbacks
    def test_proxyHeader(self) -> Any:
        """
        C{haproxy:unix:}: the peer is the address the PROXY header names
        (it was the UNIX address, read before the header: a crash); a header
        naming none (C{UNKNOWN}) leaves the proxy, C{unix:uid=N}.
        """
        path = self.listener()
        yield start_host(
            self,
            rules=["allow in pong ip:10.0.0.0/8", f"allow in echo {UID}"],
            listen=f"haproxy:unix:address={path}",
        )
        lines = logged_lines(self)
        sock, answer = yield deferToThread(ask, path, HEADER + b"pong")
        self.addCleanup(sock.close)
        self.assertEqual(answer, b"ok")
        assert_logged(self, lines, "in 'pong' for 10.1.2.3:5555 ->")
        answer = yield deferToThread(said, path, b"PROXY UNKNOWN\r\npong")
        self.assertEqual(answer, b"ne refused")
        denied = f"in 'pong' for {UID}: in connection to 'pong' denied"
        assert_logged(self, lines, denied)


class OwnListenerTests(TestCase):
    """
    A daemon's listener on a UNIX socket is one of ipcd's own sockets: a
    lookup that reached it made ipcd connect to it for the client, and the
    daemon took that client for ipcd's own uid (the connect was ipcd's):
    user nobody, looking up C{RUNDIR/tcpd.sock} (mode 0666, Twisted's), was
    C{unix:uid=0} to tcpd, past a rule for root's proxy.
    """

    @inlineCallbacks
    def start(self) -> Any:
        """tcpd on C{RUNDIR/tcpd.sock} (and a second name for it); RUNDIR."""
        rundir = short_rundir(self, "ipcd-unixl-")
        path = os.path.join(rundir, "tcpd.sock")
        config = make_config(
            rundir,
            tcpd={"listen": f"unix:{path}"},
            rules=["allow in pong unix:uid=0"],  # ipcd's uid, here root
        )
        service = yield start_ipcd(self, config)
        yield service.getServiceNamed("tcpd").listening()
        os.symlink(path, os.path.join(rundir, "another"))
        return rundir

    @inlineCallbacks
    def test_neverALookupTarget(self) -> Any:
        """
        A lookup of the listener's name in RUNDIR, or of another name for
        it, is refused as ipcd's own socket (it was served).
        """
        rundir = yield self.start()
        lines = logged_lines(self)
        for name in ("tcpd.sock", "another"):
            reply = yield deferToThread(lookup, rundir, name.encode())
            for fd in reply.fds:  # (a socket handed over: closed after)
                self.addCleanup(os.close, fd)
            assert_refused(self, reply)
            assert_logged(self, lines, "is ipcd's own socket")


class IpcListenerTests(TestCase):
    @inlineCallbacks
    def test_inIpcdsRundir(self) -> Any:
        """
        A daemon's C{ipc:NAME} listener with no C{rundir=} listens in
        ipcd's RUNDIR: it listened in C{$RUNDIR}, else C{/tmp/libipc-run}
        (the parser's default for programs), wherever ipcd's own was, and
        in a directory a user may have made first.  It is ipcd's own socket
        there too (a lookup of it is refused).
        """
        elsewhere = short_rundir(self, "ipcd-unixl-")
        self.patch(os, "environ", {**os.environ, "RUNDIR": elsewhere})
        b = yield start_host(self, [f"allow in pong {UID}"], listen="ipc:tcpd-in")
        self.assertEqual(os.listdir(elsewhere), [])
        port = yield b.service.getServiceNamed("tcpd").listening()
        path = os.path.join(b.rundir, "tcpd-in")
        self.assertEqual(os.fsdecode(port.getHost().name), path)
        sock, answer = yield deferToThread(ask, path, b"pong")
        self.addCleanup(sock.close)
        self.assertEqual(answer, b"ok")
        reply = yield deferToThread(lookup, b.rundir, b"tcpd-in")
        assert_refused(self, reply)

    def test_rundirWrittenEscaped(self) -> None:
        """
        The RUNDIR given to an C{ipc:} listener is read back as it is, a
        C{:}, C{=} or C{\\} in it too; one that names its own is kept.
        """
        from ipcd.compat import twisted as compat_twisted
        from ipcd.daemons.listeners import in_rundir

        rundir = "/run/a:b=c\\d"
        for listen in ("ipc:x", "haproxy:ipc:x:mode=0600"):
            listens = in_rundir(listen, rundir).removeprefix("haproxy:")
            keywords = compat_twisted.endpoint_keywords(listens)
            self.assertEqual(keywords["rundir"], rundir)
        for listen in ("ipc:x:rundir=/run/y", "unix:/run/x.sock", "tcp:9000"):
            self.assertEqual(in_rundir(listen, rundir), listen)


class WebsocketdOnAUnixSocketTests(TestCase):
    @inlineCallbacks
    def test_peerIsRemoteByUid(self) -> Any:
        """
        websocketd on C{unix:PATH} opens WebSockets (each upgrade was
        answered C{500 Internal server error: 'UNIXAddress' object has no
        attribute 'host'}), for a C{unix:uid=N} peer; behind C{haproxy:unix:}
        too, with a PROXY header naming no address (the same 500 before).
        """
        for listen in ("unix:{}", "haproxy:unix:address={}"):
            path = os.path.join(short_rundir(self, "ipcd-unixl-"), "ws.sock")
            yield start_ws_host(
                self, rules=[f"allow in pong {UID}"], listen=listen.format(path)
            )
            head = b"PROXY UNKNOWN\r\n" if listen.startswith("haproxy") else b""
            lines = logged_lines(self)
            answer = yield deferToThread(opening, path, head)
            self.addCleanup(answer.sock.close)
            self.assertEqual(answer.status, 101, answer)
            assert_logged(self, lines, f"in 'pong' for {UID} ->")

    @inlineCallbacks
    def test_noExceptionTextToThePeer(self) -> Any:
        """
        An unexpected error in websocketd's opening handshake is logged,
        and the peer told C{500 unavailable}: autobahn sent the exception's
        text (C{Internal server error: ...}), which may name paths.
        """
        from ipcd.daemons.websocket import server

        def broken(address: Any, transport: Any) -> Any:
            raise RuntimeError("/secret/path/in/the/text")

        self.patch(server, "listener_peer", broken)
        path = os.path.join(short_rundir(self, "ipcd-unixl-"), "ws.sock")
        yield start_ws_host(self, listen=f"unix:{path}")
        lines = logged_lines(self)
        answer = yield deferToThread(opening, path)
        self.addCleanup(answer.sock.close)
        self.assertEqual((answer.status, answer.reason), (500, "unavailable"))
        assert_logged(self, lines, "websocketd: request from a UNIX socket's peer")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class TlsdOnAUnixSocketTests(TestCase):
    @inlineCallbacks
    def test_peerIsRemoteByUid(self) -> Any:
        """
        tlsd on C{unix:PATH}: a TLS peer is served and relayed (its request
        was an Unhandled Error, and the handshake cut), as C{unix:uid=N}
        (read under the TLS transport, whose handle is no socket).
        """
        directory = short_rundir(self, "ipcd-unixl-")
        issued = TestCA(directory).issue("host-b")
        path = os.path.join(directory, "tls.sock")
        yield start_tls_host(
            self,
            {"certificate": issued.cert, "key": issued.key, "listen": f"unix:{path}"},
            rules=[f"allow in pong {UID}"],
        )
        lines = logged_lines(self)

        def exchange() -> tuple[bytes, bytes]:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            with context.wrap_socket(connect_unix(path)) as sock:
                sock.sendall(encode(b"pong"))
                answer = recv_upto(sock, 6)
                return answer, bounce(sock)  # type: ignore[arg-type]

        answer, echo = yield deferToThread(exchange)
        self.assertEqual((answer, echo), (encode(b"ok"), encode(b"bounce me")))
        assert_logged(self, lines, f"in 'pong' for {UID} ->")
