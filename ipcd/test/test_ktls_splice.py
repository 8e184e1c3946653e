"""
The service's host relays a kernel TLS socket with splice(2): the relay
engine (L{SocketRelays}) joins a real kTLS socket (keys made up here, as in
L{ipcd.test.test_ktls_vmprobe}) to a service's UNIX socket, and the test
plays the client on the other kTLS end.  No byte goes through ipcd: the
relay's C{bytes_spliced} (C{ipcd status --json}) counts them all, while a
record that is not data (a ticket, the peer's close_notify) is still taken
as before, and the service's EOF still goes out as a close_notify.

Skipped where the kernel has no C{tls} upper-layer protocol; the VM test
(L{ipcd.test.test_kernel_tls_vm}) runs it in a kernel that has it.
"""

from __future__ import annotations

import contextlib
import os
import socket
from types import SimpleNamespace
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread

from ipcd.daemons.tls.kcodec import CONTROL_PER_READ, KernelSecured, KernelTlsCodec
from ipcd.daemons.tls.ktls import (
    ALERT,
    HANDSHAKE,
    SOL_TLS,
    TLS_RX,
    TLS_SET_RECORD_TYPE,
    TLS_TX,
    ktls_available,
    send_close_notify,
)
from ipcd.relay import RelayStats
from ipcd.relay.pipes import _CONTROL_PER_EVENT
from ipcd.test.ktlssupport import NO_ULP, WAIT, tcp_pair, wait_queued
from ipcd.test.support import (
    assert_no_fd_leak,
    logged_lines,
    wait_until,
)
from ipcd.test.test_engines import (
    RunningEngineCase,
    read_exactly,
    read_to_eof,
    send_bulk,
)
from ipcd.test.test_ktls_routes import read_to_end
from ipcd.test.test_ktls_vmprobe import TLS_1_3, crypto_info, recv_exactly, switch

MiB = 1 << 20
# A TLS 1.3 NewSessionTicket (its handshake header and an empty body: the
# relay only looks at its type).
TICKET = b"\x04\x00\x00\x00"
# A TLS 1.3 KeyUpdate, which this kernel's kTLS cannot follow.
KEY_UPDATE = b"\x18\x00\x00\x01\x00"
# A record of data no key opens.
FORGED = b"\x17\x03\x03\x00\x20" + bytes(32)


def send_record(sock: socket.socket, kind: int, body: bytes) -> None:
    """A record of type C{kind} (not data) on kTLS socket C{sock}."""
    sock.sendmsg([body], [(SOL_TLS, TLS_SET_RECORD_TYPE, bytes([kind]))])


def tickets_then_end(
    client: socket.socket, relayed: socket.socket, tickets: int
) -> None:
    """
    C{tickets} NewSessionTickets then C{end}, from C{client} (its send side
    switched here) to C{relayed}, all queued before C{relayed}'s receive
    side is switched (so the kernel reads none of them before).
    """
    key, iv = os.urandom(16), os.urandom(12)
    switch(client, TLS_TX, crypto_info(TLS_1_3, key, iv, 0))
    for _ in range(tickets):
        send_record(client, HANDSHAKE, TICKET)
    client.sendall(b"end")
    size = tickets * (5 + len(TICKET) + 1 + 16) + (5 + 3 + 1 + 16)
    wait_queued(relayed, size)
    switch(relayed, TLS_RX, crypto_info(TLS_1_3, key, iv, 0))


class SpliceTests(RunningEngineCase):
    if not ktls_available():
        skip = NO_ULP

    def join(
        self, client_tx: bool = True
    ) -> tuple[RelayStats, socket.socket, socket.socket]:
        """
        A relay of a kTLS socket (side A, the client's connection) and a
        UNIX socket (side B, the service's): the client's kTLS end and the
        service's end, both blocking with a deadline.  Without C{client_tx},
        what the client writes goes on the wire as it is (forged records).
        """
        with socket.create_server(("127.0.0.1", 0)) as listener:
            client = socket.create_connection(listener.getsockname(), WAIT)
            relayed, _ = listener.accept()  # the engine's, closed by it
        self.addCleanup(client.close)
        keys = [(os.urandom(16), os.urandom(12)) for _ in range(2)]
        up, down = (crypto_info(TLS_1_3, key, iv, 0) for key, iv in keys)
        if client_tx:
            switch(client, TLS_TX, up)
        switch(client, TLS_RX, down)
        switch(relayed, TLS_RX, up)
        switch(relayed, TLS_TX, down)
        b, service = socket.socketpair()
        self.addCleanup(service.close)
        service.settimeout(WAIT)
        stats = RelayStats(registry=self.registry)
        self.engine.join(KernelSecured(relayed), b, stats)
        return stats, client, service

    @inlineCallbacks
    def ended(self, *far: socket.socket, closing: bool = True) -> Any:
        """
        The relay ends (by itself, or once the C{far} ends are closed if
        C{closing}), its pipes and fds with it.
        """
        for sock in far if closing else ():
            sock.close()
        yield wait_until(lambda: not self.registry, "the relay to end", WAIT)
        self.assertEqual(self.engine._pipes, 0)
        for sock in far:
            sock.close()
        yield assert_no_fd_leak(self.before, WAIT)

    @inlineCallbacks
    def test_both_ways_spliced(self) -> Any:
        """
        8 MiB each way at once arrive byte for byte, every byte of them
        spliced (none through ipcd), counted in and out as before; the
        pipes and sockets close with the relay.
        """
        stats, client, service = self.join()
        size = 8 * MiB
        up = deferToThread(send_bulk, client, size, eof=False)
        down = deferToThread(send_bulk, service, size, eof=False)
        at_service = yield deferToThread(read_exactly, service, size)
        at_client = yield deferToThread(read_exactly, client, size)
        self.assertEqual((at_service, at_client), ((yield up), (yield down)))
        self.assertEqual((stats.forward, stats.backward), (size, size))
        self.assertEqual(stats.as_dict()["bytes_spliced"], 2 * size)
        yield self.ended(client, service)

    @inlineCallbacks
    def test_ticket_while_splicing(self) -> Any:
        """
        A NewSessionTicket between data records (a splice out of the
        socket fails on it) is taken and skipped: the service gets the
        data on both sides of it, spliced, and the relay goes on.
        """
        stats, client, service = self.join()
        client.sendall(b"before ")
        send_record(client, HANDSHAKE, TICKET)
        client.sendall(b"after")
        got = yield deferToThread(recv_exactly, service, 12)
        self.assertEqual(got, b"before after")
        service.sendall(b"still up")
        self.assertEqual((yield deferToThread(recv_exactly, client, 8)), b"still up")
        self.assertEqual(stats.spliced, 20)
        self.assertEqual(len(self.registry), 1)
        yield self.ended(client, service)

    @inlineCallbacks
    def test_key_update_ends_the_relay(self) -> Any:
        """
        A KeyUpdate while splicing ends the relay with a line saying why
        (this kernel's kTLS cannot take the new keys); the service sees
        the data before it, then its end.
        """
        said = logged_lines(self)
        stats, client, service = self.join()
        client.sendall(b"data")
        send_record(client, HANDSHAKE, KEY_UPDATE)
        self.assertEqual((yield deferToThread(read_to_eof, service))[0], 4)
        yield self.ended(client, service, closing=False)
        self.assertEqual(stats.spliced, 4)
        self.assertTrue([line for line in said if "handshake message 18" in line], said)

    @inlineCallbacks
    def test_key_update_behind_a_ticket(self) -> Any:
        """
        A KeyUpdate behind a ticket in one record is not skipped with the
        ticket: it ends the relay, saying so.
        """
        said = logged_lines(self)
        stats, client, service = self.join()
        self.engine.max_pipes = 0  # (read with its type either way)
        send_record(client, HANDSHAKE, TICKET + KEY_UPDATE)
        self.assertEqual((yield deferToThread(read_to_eof, service))[0], 0)
        yield self.ended(client, service, closing=False)
        self.assertTrue([line for line in said if "handshake message 18" in line], said)

    @inlineCallbacks
    def forged(self, splicing: bool) -> Any:
        """
        A record the kernel cannot open (a peer's forgery, or wrong keys)
        ends the relay with one line saying so, not a logged failure with a
        traceback (trial fails a test that logs one); the service sees its
        end.
        """
        said = logged_lines(self)
        if not splicing:
            self.engine.max_pipes = 0
        stats, client, service = self.join(client_tx=False)
        client.sendall(FORGED)
        self.assertEqual((yield deferToThread(read_to_eof, service))[0], 0)
        yield self.ended(client, service, closing=False)
        refused = [line for line in said if "refused a TLS record" in line]
        self.assertEqual(len(refused), 1, said)
        self.assertEqual([line for line in said if "failed" in line], [])

    def test_forged_record(self) -> Any:
        """On a relay that copies (no pipe left): the read fails."""
        return self.forged(splicing=False)

    def test_forged_record_while_splicing(self) -> Any:
        """On a relay that splices: the splice fails with EBADMSG."""
        return self.forged(splicing=True)

    @inlineCallbacks
    def test_tickets_while_splicing(self) -> Any:
        """
        A peer sending nothing but tickets to a relay that splices: one
        event of the engine takes at most L{_CONTROL_PER_EVENT} of them, so
        the reactor goes on to others; the data behind them still arrives.
        """
        with socket.create_server(("127.0.0.1", 0)) as listener:
            client = socket.create_connection(listener.getsockname(), WAIT)
            relayed, _ = listener.accept()  # the engine's, closed by it
        self.addCleanup(client.close)
        tickets_then_end(client, relayed, 20 * _CONTROL_PER_EVENT)
        b, service = socket.socketpair()
        self.addCleanup(service.close)
        service.settimeout(WAIT)
        taken = {"now": 0, "most": 0}
        control = KernelTlsCodec.control

        def counted(codec: Any, side: Any) -> bool:
            taken["now"] += 1
            return control(codec, side)

        self.patch(KernelTlsCodec, "control", counted)
        engine = self.engine
        ready = type(engine)._ready

        def one_event(side: Any, writable: bool) -> None:
            taken["now"] = 0
            ready(engine, side, writable)
            taken["most"] = max(taken["most"], taken["now"])

        self.patch(engine, "_ready", one_event)
        engine.join(KernelSecured(relayed), b, RelayStats(registry=self.registry))
        self.assertEqual((yield deferToThread(recv_exactly, service, 3)), b"end")
        self.assertGreater(taken["most"], 0)
        self.assertLessEqual(taken["most"], _CONTROL_PER_EVENT)
        yield self.ended(client, service)

    @inlineCallbacks
    def test_long_alert(self) -> Any:
        """
        An alert record as long as a record gets (16 KiB), a fatal one
        whose last byte is 0: the relay ends with a line that shows its
        two bytes (not 32 KiB of hex), and it is not taken for a
        close_notify.
        """
        said = logged_lines(self)
        stats, client, service = self.join()
        send_record(client, ALERT, b"\x02\x28" + bytes(16 * 1024 - 2))
        self.assertEqual((yield deferToThread(read_to_eof, service))[0], 0)
        yield self.ended(client, service, closing=False)
        [line] = [line for line in said if "TLS alert" in line]
        self.assertIn("TLS alert 0228 from the peer", line)
        self.assertLess(len(line), 200)

    def test_tickets_do_not_hold_the_reactor(self) -> None:
        """
        A peer sending nothing but tickets: one read of its kTLS socket
        (a relay that copies) takes at most L{CONTROL_PER_READ} of them and
        returns, so the reactor goes on to others; the rest, and the data
        behind them, come with the next reads.
        """
        with tcp_pair() as (client, relayed):
            tickets = 5 * CONTROL_PER_READ
            tickets_then_end(client, relayed, tickets)
            relayed.setblocking(False)
            codec, side = KernelTlsCodec(relayed, bytearray(1024)), SimpleNamespace()
            side.eof = False
            reads = [codec.read(side) for _ in range(tickets // CONTROL_PER_READ + 1)]
            self.assertEqual(reads, [0] * (tickets // CONTROL_PER_READ) + [3])
            self.assertEqual(bytes(codec.buffer[:3]), b"end")

    def test_end_with_a_full_send_buffer(self) -> None:
        """
        The relay's EOF towards a client whose socket's buffers are full
        (it reads slowly): no room for the close_notify, so a FIN, which
        the client reads after every byte; not no end at all (the client
        would wait for one while the relay waits for its EOF).
        """
        with tcp_pair() as (client, relayed):
            key, iv = os.urandom(16), os.urandom(12)
            switch(relayed, TLS_TX, crypto_info(TLS_1_3, key, iv, 0))
            switch(client, TLS_RX, crypto_info(TLS_1_3, key, iv, 0))
            relayed.setblocking(False)
            sent = 0
            with contextlib.suppress(BlockingIOError):
                while True:
                    sent += relayed.send(bytes(65536))
            KernelTlsCodec(relayed, bytearray(16)).close()
            got, how = read_to_end(client)
            # (A close_notify if the buffer had room after all.)
            self.assertEqual(len(got), sent)
            self.assertIn(how, ("eof", "close_notify"))

    @inlineCallbacks
    def test_peer_close_notify(self) -> Any:
        """
        The client's close_notify, after its data, is the service's EOF:
        the data spliced, then the EOF passed on; the service's answer
        still reaches the client, then its own close_notify, and the relay
        ends.
        """
        stats, client, service = self.join()
        client.sendall(b"last words")
        send_close_notify(client)
        got = yield deferToThread(read_to_eof_bytes, service)
        self.assertEqual(got, b"last words")
        service.sendall(b"heard")
        service.shutdown(socket.SHUT_WR)
        got, how = yield deferToThread(read_to_end, client)
        self.assertEqual((got, how), (b"heard", "close_notify"))
        self.assertEqual(stats.spliced, 15)
        yield self.ended(client, service, closing=False)

    @inlineCallbacks
    def test_service_eof_sends_close_notify(self) -> Any:
        """
        The service's EOF, after 2 MiB, reaches the client as a
        close_notify once every spliced byte has gone out.
        """
        stats, client, service = self.join()
        data = os.urandom(2 * MiB)

        def answer() -> None:
            service.sendall(data)
            service.shutdown(socket.SHUT_WR)

        answering = deferToThread(answer)
        got, how = yield deferToThread(read_to_end, client)
        yield answering
        self.assertEqual((len(got), got == data), (len(data), True))
        self.assertEqual(how, "close_notify")
        self.assertEqual(stats.spliced, len(data))
        yield self.ended(client, service)


def read_to_eof_bytes(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data
