"""
Descriptors a local peer sends on ipcd's UNIX sockets, which take none
(L{ipcd.nodescriptors}): closed without a log line, the request served as
if they had not come.  Twisted's transport logged a line for each message
that brought some: any local user wrote ipcd's log at will.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from ipcd.handoff import scm_rights
from ipcd.test.support import (
    TIMEOUT,
    connect_unix,
    free_port,
    logged_lines,
    make_config,
    read_reply,
    set_network,
    short_rundir,
    start_ipcd,
)
from ipcd.test.wssupport import start_ws_host
from ipcd.wire import encode, recv_message


class SentDescriptorsTests(TestCase):
    def setUp(self) -> None:
        set_network(self, None)
        self.lines = logged_lines(self)
        # Each byte a peer sends comes with one end of this pair.
        self.sent, self.far = socket.socketpair()
        self.addCleanup(self.sent.close)
        self.addCleanup(self.far.close)

    def in_pieces(self, sock: socket.socket, raw: bytes) -> None:
        """Send C{raw} a byte at a time, each with a descriptor."""
        for byte in raw:
            sock.sendmsg([bytes([byte])], scm_rights(self.sent.fileno()))

    def assertUnsaid(self) -> None:  # noqa: N802 (trial's style)
        """No line said a word of them, and none of them is kept open."""
        said = [line for line in self.lines if "descriptor" in line]
        self.assertEqual(said, [])
        self.sent.close()
        self.far.settimeout(TIMEOUT)
        self.assertEqual(self.far.recv(1), b"")

    @inlineCallbacks
    def test_lookup(self) -> Any:
        """A lookup for pong a byte at a time: answered ok, as ever."""
        rundir = short_rundir(self)
        yield start_ipcd(self, make_config(rundir))

        def look_up() -> Any:
            with connect_unix(os.path.join(rundir, "ipc")) as sock:
                self.in_pieces(sock, encode(b"pong"))
                return read_reply(sock)

        reply = yield deferToThread(look_up)
        self.assertEqual(reply.data, b"ok")
        for fd in reply.fds:
            os.close(fd)
        self.assertUnsaid()

    @inlineCallbacks
    def test_controlSocket(self) -> Any:
        """tcpd's control socket (behind its connection limits)."""
        rundir = short_rundir(self)
        port = free_port()
        config = make_config(
            rundir,
            tcpd={"listen": f"tcp:{port}:interface=127.0.0.1"},
            rules=["allow in pong"],
        )
        yield start_ipcd(self, config)
        uri = f"tcp://127.0.0.1:{port}/pong".encode()

        def ask() -> bytes:
            with connect_unix(os.path.join(rundir, "tcp")) as sock:
                self.in_pieces(sock, encode(uri))
                return recv_message(sock)

        self.assertEqual((yield deferToThread(ask)), b"ok")
        self.assertUnsaid()

    @inlineCallbacks
    def test_relayedSocket(self) -> Any:
        """
        The socket a ws:// route hands over, whose other end websocketd
        reads: a message sent to pong through it a byte at a time.
        """
        port = free_port()
        host = yield start_ws_host(self, listen=f"tcp:{port}:interface=127.0.0.1")
        route = f"pong;pong ws://127.0.0.1:{port}/pong".encode()
        with connect_unix(os.path.join(host.rundir, "ipc")) as sock:
            sock.sendall(encode(route))
            reply = yield deferToThread(read_reply, sock)
        [fd] = reply.fds
        with socket.socket(fileno=fd) as relayed:
            relayed.settimeout(TIMEOUT)
            yield deferToThread(self.in_pieces, relayed, encode(b"round"))
            self.assertEqual((yield deferToThread(recv_message, relayed)), b"round")
        self.assertUnsaid()
