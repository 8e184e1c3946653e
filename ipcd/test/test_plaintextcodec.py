"""
The relay engine (L{SocketRelays}) with a codec whose bytes are plaintext
(C{ICodec.plaintext}, as kernel TLS's are): its directions splice from the
first byte, and the codec is asked only for what a splice cannot do (its
records that are not data, its own EOF).  Pure engine behaviour, on plain
sockets here with a stand-in codec; L{ipcd.test.test_ktls_splice} runs the
real kernel TLS codec in a kernel that has kTLS.

Where a splice out of the codec's socket fails with EINVAL (a kTLS
socket's control record), the failure is injected: the kernel's part of it
is checked in the VM.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from zope.interface import implementer
from zope.interface.verify import verifyObject

from ipcd.relay import ICodec, RelayStats, pipes
from ipcd.relay.sides import NOTHING
from ipcd.test.support import (
    TIMEOUT,
    assert_no_fd_leak,
    logged_lines,
    wait_until,
)
from ipcd.test.test_engines import RunningEngineCase, read_exactly, send_bulk

MiB = 1 << 20
END = b"<its own EOF>"  # what the stand-in codec sends as its EOF
RECORD = 16 * 1024  # a TLS record's plaintext at most


@implementer(ICodec)
class Passthrough:
    """
    A codec whose bytes are plaintext, on a plain socket: it counts the
    reads the engine asks of it (none, while the engine splices), says
    L{END} as its own EOF, and answers C{control} as told (True: a record
    taken; "eof": its stream's end; False: data is next).
    """

    plaintext = True

    def __init__(self, sock: socket.socket, buffer: bytearray) -> None:
        self.sock = sock
        self.buffer = buffer
        self.reads = 0
        self.answers: list[Any] = []
        self.asked = 0
        # Splices out of the socket before a record that is not data is
        # next (None: none is), on which they fail until it is taken.
        self.record_after: int | None = None

    def splice_fails(self) -> bool:
        """A splice out of the socket: whether a record not data stops it."""
        if self.record_after is None:
            return False
        if self.record_after:
            self.record_after -= 1
            return False
        return True

    def read(self, side: Any) -> int:
        self.reads += 1
        try:
            n = self.sock.recv_into(self.buffer)
        except BlockingIOError:
            return 0
        if not n:
            side.eof = True
        return n

    def made(self) -> memoryview:
        return NOTHING

    def seal(self, data: Any) -> Any:
        return data

    def close(self) -> memoryview:
        return memoryview(END)

    def control(self, side: Any) -> bool:
        self.asked += 1
        answer = self.answers.pop(0)
        if answer:  # taken
            self.record_after = None
        if answer == "eof":
            side.eof = True
        return bool(answer)


class PassthroughEnd:
    """A socket with a L{Passthrough} codec, as an end of C{join}."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.codec: Passthrough | None = None

    def relay_end(self, engine: Any) -> tuple[socket.socket, Passthrough, bytes]:
        self.codec = Passthrough(self.sock, engine.buffer)
        return self.sock, self.codec, b""

    def close(self) -> None:
        self.sock.close()


class PlaintextCodecTests(RunningEngineCase):
    @inlineCallbacks
    def setUp(self) -> Any:
        yield super().setUp()
        real = os.splice

        def splice(src: int, dst: int, count: int, **kwargs: Any) -> int:
            # Out of the codec's socket as out of a kTLS one: a record (16
            # KiB at most) per call, EINVAL on a record that is not data.
            if src == self.codec_fd:
                if self.codec.splice_fails():
                    raise OSError(errno.EINVAL, "Invalid argument")
                count = min(count, RECORD)
            return real(src, dst, count, **kwargs)

        self.patch(pipes.os, "splice", splice)

    def join(
        self, service_buffer: int = 0
    ) -> tuple[RelayStats, Passthrough, socket.socket, socket.socket]:
        """
        A relay of a socket with the stand-in codec (side A) and a plain
        one (side B): the codec, and the far ends (blocking, with deadlines).
        C{service_buffer}: what side B's socket holds for the service (its
        send buffer; 0: the system's default).
        """
        a, client = socket.socketpair()
        b, service = socket.socketpair()
        if service_buffer:
            b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, service_buffer)
        for far in (client, service):
            far.settimeout(TIMEOUT)
            self.addCleanup(far.close)
        end = PassthroughEnd(a)
        self.codec_fd = a.fileno()
        stats = self.engine.join(end, b, RelayStats(registry=self.registry))
        assert end.codec is not None
        self.codec = end.codec
        self.assertTrue(verifyObject(ICodec, end.codec))
        return stats, end.codec, client, service

    @inlineCallbacks
    def refused_once(self, answer: Any) -> Any:
        """
        A relay whose first splice out of the codec's socket fails with
        EINVAL, the codec answering C{answer}: b"abc" still reaches the
        service.  The relay, as L{join} gives it.
        """
        stats, codec, client, service = self.join()
        codec.answers = [answer]
        codec.record_after = 0
        client.sendall(b"abc")
        self.assertEqual((yield deferToThread(service.recv, 64)), b"abc")
        return stats, codec, client, service

    @inlineCallbacks
    def ended(self, client: socket.socket, service: socket.socket) -> Any:
        """Both far ends close: the relay ends, with its pipes and fds."""
        client.close()
        service.close()
        yield wait_until(lambda: not self.registry, "the relay to end")
        self.assertEqual(self.engine._pipes, 0)
        yield assert_no_fd_leak(self.before)

    @inlineCallbacks
    def test_splicedFromTheFirstByte(self) -> Any:
        """
        A message each way (far below the size at which plain sockets
        start to splice) goes through pipes: spliced, counted as before,
        and never read through the codec.
        """
        stats, codec, client, service = self.join()
        client.sendall(b"hello")
        self.assertEqual((yield deferToThread(service.recv, 64)), b"hello")
        service.sendall(b"world!")
        self.assertEqual((yield deferToThread(client.recv, 64)), b"world!")
        self.assertEqual((stats.forward, stats.backward, stats.spliced), (5, 6, 11))
        self.assertEqual(stats.as_dict()["bytes_spliced"], 11)
        self.assertEqual(codec.reads, 0)
        self.assertEqual(self.engine._pipes, 2)
        yield self.ended(client, service)

    @inlineCallbacks
    def test_slowServiceGetsWhatThePipeHolds(self) -> Any:
        """
        A service that takes less at a time than the client sent: what its
        socket cannot take waits in the pipe, and reaches it as it reads,
        though the client sends nothing more to wake the relay.
        """
        stats, codec, client, service = self.join(service_buffer=4096)
        sending = deferToThread(send_bulk, client, MiB, eof=False)
        got = yield deferToThread(read_exactly, service, MiB)
        self.assertEqual(got, (yield sending))
        self.assertEqual((stats.forward, stats.spliced), (MiB, MiB))
        yield self.ended(client, service)

    @inlineCallbacks
    def test_codecEofAfterSplicedData(self) -> Any:
        """
        The service's EOF, behind 4 MiB, goes out as the codec's own EOF
        after every spliced byte.
        """
        stats, codec, client, service = self.join()
        sending = deferToThread(send_bulk, service, 4 * MiB)
        got = yield deferToThread(read_exactly, client, 4 * MiB)
        self.assertEqual(got, (yield sending))
        tail = yield deferToThread(client.recv, 64)
        self.assertEqual(tail, END)
        self.assertEqual(stats.spliced, 4 * MiB)
        yield self.ended(client, service)

    @inlineCallbacks
    def test_controlRecordThenSplicing(self) -> Any:
        """
        A splice out of the codec's socket refused with EINVAL: the codec
        takes its record, and the engine splices on.
        """
        stats, codec, client, service = yield self.refused_once(True)
        self.assertEqual((codec.asked, codec.reads, stats.spliced), (1, 0, 3))
        self.assertTrue(self.engine._splice)
        yield self.ended(client, service)

    @inlineCallbacks
    def test_controlRecordEndsTheStream(self) -> Any:
        """The record the codec takes is its stream's end: the service's EOF."""
        stats, codec, client, service = self.join()
        client.sendall(b"abc")
        self.assertEqual((yield deferToThread(service.recv, 64)), b"abc")
        codec.answers = ["eof"]
        codec.record_after = 0
        client.sendall(b"not after the end")
        self.assertEqual((yield deferToThread(service.recv, 64)), b"")
        self.assertEqual((codec.asked, stats.forward), (1, 3))
        yield self.ended(client, service)

    @inlineCallbacks
    def test_refusedForAnotherReason(self) -> Any:
        """
        EINVAL with data next (the codec took nothing): splice(2) refused,
        said once, and the relay copies through the codec; no byte lost.
        """
        said = logged_lines(self)
        stats, codec, client, service = yield self.refused_once(False)
        self.assertEqual((codec.asked, codec.reads, stats.spliced), (1, 1, 0))
        self.assertFalse(self.engine._splice)
        self.assertEqual(len([s for s in said if "splice(2) refused" in s]), 1)
        yield self.ended(client, service)

    @inlineCallbacks
    def test_pipesBounded(self) -> Any:
        """
        With room for one pipe, one direction splices and the other copies
        (through the codec on its side); both arrive whole.
        """
        self.engine.max_pipes = 1
        stats, codec, client, service = self.join()
        client.sendall(b"first")
        self.assertEqual((yield deferToThread(service.recv, 64)), b"first")
        service.sendall(b"second")
        self.assertEqual((yield deferToThread(client.recv, 64)), b"second")
        self.assertEqual((stats.spliced, self.engine._pipes), (5, 1))
        yield self.ended(client, service)

    @inlineCallbacks
    def test_recordBehindDataInOneRead(self) -> Any:
        """
        A record not data right behind whole records read in one go: what
        the pipe holds goes on first, then the record is the codec's (here
        it says data is next: splice(2) refused, the relay copies); no
        byte lost.
        """
        stats, codec, client, service = self.join()
        codec.answers = [False]
        codec.record_after = 1
        sent = b"r" * RECORD + b"tail"
        client.sendall(sent)
        got = yield deferToThread(read_exactly, service, len(sent))
        self.assertEqual(got, hashlib.sha256(sent).hexdigest())
        self.assertEqual((codec.asked, stats.spliced), (1, RECORD))
        self.assertEqual(stats.forward, len(sent))
        self.assertFalse(self.engine._splice)
        yield self.ended(client, service)
