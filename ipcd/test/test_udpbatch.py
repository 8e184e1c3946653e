"""
udpd's datagrams in batches on real sockets: runs of datagrams sent in one
sendmsg (GSO) arrive as the datagrams they were, to any receiver; runs read
in one recvmsg (GRO) are cut apart again; a turn reads a bounded number.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ipcd.daemons.udp import batch
from ipcd.daemons.udp import source as sources
from ipcd.daemons.udp.batch import (
    DATAGRAM_BUDGET,
    MAX_SEGMENTS,
    UDP_GRO,
    UDP_SEGMENT,
    BatchReader,
    DatagramSender,
    sender_for,
)
from ipcd.daemons.udp.session import Session, SessionStats
from ipcd.daemons.udp.source import NO_SOURCE
from ipcd.test.support import TIMEOUT
from ipcd.test.udpsupport import can_forge, icmp_prohibited


def offload_missing() -> str | None:
    """Why this kernel cannot be asked for UDP_SEGMENT and UDP_GRO, if not."""
    if not sys.platform.startswith("linux"):
        return "UDP_SEGMENT and UDP_GRO are Linux's"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.setsockopt(batch.SOL_UDP, UDP_GRO, 1)
            sock.setsockopt(batch.SOL_UDP, UDP_SEGMENT, 100)
        except OSError as e:
            return f"this kernel has no UDP GSO/GRO ({e})"
    return None


class CountingSocket(socket.socket):
    """A UDP socket that counts its system calls to send."""

    calls = 0
    refuse: int | None = None  # the errno its sendmsg fails with, if any
    refuse_one: int | None = None  # the errno send and sendto fail with

    def send(self, *args: Any) -> int:
        self.calls += 1
        if self.refuse_one is not None:
            raise OSError(self.refuse_one, "refused for the test")
        return super().send(*args)

    def sendto(self, *args: Any) -> int:
        self.calls += 1
        if self.refuse_one is not None:
            raise OSError(self.refuse_one, "refused for the test")
        return super().sendto(*args)

    def sendmsg(self, *args: Any) -> int:
        self.calls += 1
        if self.refuse is not None:
            raise OSError(self.refuse, "refused for the test")
        return super().sendmsg(*args)


def receiver(gro: bool = False) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    if gro:
        sock.setsockopt(batch.SOL_UDP, UDP_GRO, 1)
    sock.settimeout(TIMEOUT)
    return sock


def receive(sock: socket.socket, count: int) -> list[bytes]:
    return [sock.recv(65536) for _ in range(count)]


def datagrams(*runs: tuple[int, int]) -> list[bytes]:
    """C{count} datagrams of C{size} bytes for each run, each one different."""
    made = []
    for count, size in runs:
        for _ in range(count):
            label = b"%d:" % len(made)
            made.append(label + b"x" * (size - len(label)))
    return made


class SenderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.peer = receiver()
        self.addCleanup(self.peer.close)
        self.sock = CountingSocket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(self.sock.close)
        self.sock.bind(("127.0.0.1", 0))

    def test_runsArriveAsTheirDatagrams(self) -> None:
        """
        Runs of equal sizes (longer than the kernel takes at once, one
        ending shorter, one larger in total than one send may carry) and
        lone ones: a receiver without GRO gets each datagram as it was,
        in order; on Linux in one system call per run.
        """
        sent = datagrams(
            (MAX_SEGMENTS + 6, 100),  # two runs: 64, then 6 and the 50 below
            (1, 50),
            (1, 300),
            (40, 2000),  # 32 fit in one send (65,507 bytes), then 8
            (3, 17),
        )
        sender = DatagramSender(self.sock, self.peer.getsockname())
        self.assertEqual(sender.send_all(sent), [])
        self.assertEqual(receive(self.peer, len(sent)), sent)
        if offload_missing() is None:
            self.assertTrue(sender.gso)
            self.assertEqual(self.sock.calls, 6)

    def test_connected(self) -> None:
        """To the address the socket is connected to."""
        self.sock.connect(self.peer.getsockname())
        sent = datagrams((5, 120))
        self.assertEqual(DatagramSender(self.sock).send_all(sent), [])
        self.assertEqual(receive(self.peer, 5), sent)

    def test_runRefusedForItsSize(self) -> None:
        """
        A run the kernel refuses for its segment size (larger than the
        path's MTU) goes out one by one, and so do runs as large from then
        on; smaller ones still go in runs.
        """
        sender = DatagramSender(self.sock, self.peer.getsockname())
        sender.gso = True  # (so that the fallback is tested anywhere)
        self.sock.refuse = errno.EINVAL
        sent = datagrams((4, 1500))
        self.assertEqual(sender.send_all(sent), [])
        self.assertEqual(receive(self.peer, 4), sent)
        self.assertEqual((sender.gso_below, self.sock.calls), (1500, 1 + 4))
        for size in (1500, 1600):  # that size again, and larger
            self.sock.calls = 0
            sender.send_all(datagrams((4, size)))
            self.assertEqual(self.sock.calls, 4)
            receive(self.peer, 4)

    def test_offloadRefused(self) -> None:
        """A kernel without the option: one by one from then on."""
        sender = DatagramSender(self.sock, self.peer.getsockname())
        sender.gso = True
        self.sock.refuse = errno.ENOPROTOOPT
        sent = datagrams((3, 100))
        self.assertEqual(sender.send_all(sent), [])
        self.assertFalse(sender.gso)
        self.assertEqual(receive(self.peer, 3), sent)
        self.sock.calls = 0
        sender.send_all(datagrams((3, 100)))
        self.assertEqual(self.sock.calls, 3)
        receive(self.peer, 3)

    def test_lostRunReturned(self) -> None:
        """Any other error loses the run: returned, nothing sent."""
        told: list[bool] = []
        sender = DatagramSender(
            self.sock, self.peer.getsockname(), refused=lambda: told.append(True)
        )
        sender.gso = True
        self.sock.refuse = errno.ENOBUFS
        sent = datagrams((3, 100))
        self.assertEqual(sender.send_all(sent), sent)
        self.peer.settimeout(0)
        self.assertRaises(BlockingIOError, self.peer.recv, 65536)
        self.assertEqual(told, [], "not a refusal")

    def test_lostOneByOne(self) -> None:
        """
        A lone datagram lost is returned, and C{send} says so; only
        ECONNREFUSED is a refusal.
        """
        told: list[bool] = []
        sender = DatagramSender(
            self.sock, self.peer.getsockname(), refused=lambda: told.append(True)
        )
        self.sock.refuse_one = errno.ENOBUFS
        lone = datagrams((1, 100))
        self.assertEqual(sender.send_all(lone), lone)
        self.assertIs(sender.send(lone[0]), False)
        self.assertRaises(OSError, sender.write, lone[0])
        self.assertEqual(told, [])
        self.sock.refuse_one = None
        self.assertIs(sender.send(lone[0]), True)
        self.assertEqual(receive(self.peer, 1), lone)

    def test_refusedWithNobodyToTell(self) -> None:
        """A sender with no C{refused} loses what is refused, and goes on."""
        sender = DatagramSender(self.sock, self.peer.getsockname())
        sender.gso = True
        self.sock.refuse = self.sock.refuse_one = errno.ECONNREFUSED
        sent = datagrams((3, 100), (1, 300))
        self.assertEqual(sender.send_all(sent), sent)
        self.assertIs(sender.send(sent[0]), False)

    def test_runsOfOneByte(self) -> None:
        """
        One-byte datagrams go in runs too; an empty one after a run goes
        alone (in the run it would add nothing to the send: lost).
        """
        sender = DatagramSender(self.sock, self.peer.getsockname())
        sent = [b"a", b"b", b"c", b"", b"", b"de", b"fg", b"h"]
        self.assertEqual(sender.send_all(sent), [])
        self.assertEqual(receive(self.peer, len(sent)), sent)
        if offload_missing() is None:
            # a, b, c; the empty ones; de, fg and h (a run's shorter last).
            self.assertEqual(self.sock.calls, 4)

    def refused_peer(self, gso: bool, count: int) -> tuple[list[bool], list[bytes]]:
        """
        Send runs of C{count} datagrams to a closed port, connected, until
        the sender is told of the refusal (at most 10): told, and lost.
        """
        port = self.peer.getsockname()
        self.peer.close()
        told: list[bool] = []
        self.sock.connect(port)
        sender = DatagramSender(self.sock, refused=lambda: told.append(True))
        sender.gso = sender.gso and gso
        lost = []
        for _ in range(10):  # the error is the kernel's to deliver
            lost += sender.send_all(datagrams((count, 100)))
            if told:
                break
        return told, lost

    def test_refusedPeerTold(self) -> None:
        """
        Nobody listening at the connected address: the ICMP error comes
        back on a later send, which calls C{refused} and loses the rest.
        """
        told, lost = self.refused_peer(gso=True, count=3)
        self.assertEqual(told, [True])
        self.assertTrue(lost)

    def test_refusedPeerToldOneByOne(self) -> None:
        """The same, datagrams sent one by one (no runs, or lone ones)."""
        told, lost = self.refused_peer(gso=False, count=1)
        self.assertEqual(told, [True])
        self.assertEqual(lost, datagrams((1, 100)))


def refusal_pending(sock: socket.socket) -> socket.socket:
    """
    Connect C{sock} to a port nobody listens on and leave the kernel's
    "port unreachable" pending on it (the next send fails with it), then
    listen at that port again: the socket returned gets whatever C{sock}
    still sends, as a service back on its port would.
    """
    gone = receiver()
    address = gone.getsockname()
    sock.connect(address)
    gone.close()
    sock.send(b"to nobody")
    poller = select.poll()
    poller.register(sock, select.POLLERR)
    if not poller.poll(TIMEOUT * 1000):
        raise AssertionError("the ICMP error did not come")
    back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    back.bind(address)
    back.settimeout(TIMEOUT)
    return back


def nothing_before(sock: socket.socket, marker: bytes = b"marker") -> bytes:
    """
    What C{sock} receives first once a marker is sent to it last: the
    marker when nothing else came (no time to wait out).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
        other.sendto(marker, sock.getsockname())
    return sock.recv(65536)


class RefusedMidRunTests(SynchronousTestCase):
    """
    A refusal (the ICMP error of a session's peer, gone) that comes back
    while a read's datagrams are being sent ends the session: nothing
    more of them goes out, in runs or one by one.
    """

    def setUp(self) -> None:
        self.sock = CountingSocket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(self.sock.close)
        self.back = refusal_pending(self.sock)
        self.addCleanup(self.back.close)
        self.told: list[bool] = []
        self.sender = DatagramSender(self.sock, refused=lambda: self.told.append(True))

    def test_noRunAfterTheRefusal(self) -> None:
        """The runs after the refused one are not sent: all are lost."""
        sent = datagrams((3, 100), (3, 200), (3, 300))
        self.assertEqual(self.sender.send_all(sent), sent)
        self.assertEqual(self.told, [True])
        self.assertEqual(nothing_before(self.back), b"marker")
        self.assertFalse(self.sender.send(b"later"))
        self.assertEqual(nothing_before(self.back), b"marker")
        self.assertEqual(self.told, [True])

    def test_notTheRestOfARunOneByOne(self) -> None:
        """
        A run refused for its size goes out one by one: a refusal of the
        first of them loses the rest of the run (and what follows it).
        """
        self.sender.gso = True
        self.sock.refuse = errno.EINVAL
        sent = datagrams((4, 1500), (1, 10))
        self.assertEqual(self.sender.send_all(sent), sent)
        self.assertEqual(self.told, [True])
        self.assertEqual(nothing_before(self.back), b"marker")


class RefusedSessionTests(TestCase):
    """
    The same at a session's level, on a port of the reactor's: nothing is
    sent for a session after it has ended.
    """

    def session(self, port: Any, sender: DatagramSender | None) -> Session:
        session = Session(
            b"S" * 8,
            port.write if sender is None else sender.write,
            SessionStats(direction="out", registry=set()),
            Clock(),
            idle_timeout=10.0,
            max_datagram=1000,
            send_all=None if sender is None else sender.send_all,
        )
        self.addCleanup(session.end, "test over", notify=False)
        return session

    def ended_by_refusal(self, sender: bool) -> tuple[Session, socket.socket]:
        protocol = Collect()
        port = reactor.listenUDP(0, protocol, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        back = refusal_pending(port.getHandle())
        self.addCleanup(back.close)
        port.connect(*back.getsockname())  # (its socket already is)

        def refused() -> None:
            session.end("refused", notify=False)

        protocol.connectionRefused = refused  # type: ignore[method-assign]
        batched = sender_for(port, refused=refused) if sender else None
        session = self.session(port, batched)
        session.gather()
        for i in range(6):  # two runs (of 3 and 3) in one read
            session.message(b"m" * (10 + 10 * (i // 3)))
        session.sent()
        return session, back

    def test_inRuns(self) -> None:
        session, back = self.ended_by_refusal(sender=True)
        self.assertTrue(session.done)
        self.assertEqual(nothing_before(back), b"marker")
        self.assertEqual((session.stats.sent, session.stats.dropped), (0, 6))

    def test_oneByOne(self) -> None:
        """
        Twisted's own write (where a port has no socket of its own), which
        tells the protocol of the refusal and raises nothing: the refused
        datagram counts as sent, the rest as dropped.
        """
        session, back = self.ended_by_refusal(sender=False)
        self.assertTrue(session.done)
        self.assertEqual(nothing_before(back), b"marker")
        self.assertEqual((session.stats.sent, session.stats.dropped), (1, 5))


class RefusedPingTests(SynchronousTestCase):
    """A PING refused (its peer's udpd gone) ends the session and its timer."""

    def test_noCheckAfterTheEnd(self) -> None:
        """
        The client's session sent DATA, then its remote udpd went away (the
        kernel's "port unreachable" pending on its connected socket): the
        PING at a quarter of idle_timeout is refused, which ends the
        session, and no check of it is left on the clock (one was, and
        went on PINGing a session over until idle_timeout).
        """
        clock = Clock()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        remote = receiver()
        sock.connect(remote.getsockname())
        session = Session(
            b"S" * 8,
            DatagramSender(sock, refused=lambda: session.end("refused", False)).write,
            SessionStats(direction="out", registry=set()),
            clock,
            idle_timeout=10.0,
            max_datagram=1000,
        )
        self.addCleanup(session.end, "test over", notify=False)
        clock.advance(1)
        session.message(b"to the remote udpd")
        self.assertEqual(receive(remote, 1)[0][:1], b"D")
        remote.close()
        sock.send(b"to nobody")  # the kernel's answer: nobody listens
        poller = select.poll()
        poller.register(sock, select.POLLERR)
        self.assertTrue(poller.poll(TIMEOUT * 1000), "the ICMP error did not come")
        clock.advance(2.5)  # the peer quiet for a quarter: a PING, refused
        self.assertTrue(session.done)
        self.assertEqual(clock.getDelayedCalls(), [])


class OldKernelSocket(socket.socket):
    """
    A UDP socket as a kernel before Linux 4.18 (or another without GSO)
    has it: no UDP_SEGMENT option, and a C{sendmsg} that passes over the
    control message it does not know, sending the run as one datagram.
    """

    def getsockopt(self, level: int, option: int, *args: Any) -> Any:
        if (level, option) == (batch.SOL_UDP, UDP_SEGMENT):
            raise OSError(errno.ENOPROTOOPT, "Protocol not available")
        return super().getsockopt(level, option, *args)

    def setsockopt(self, level: int, option: int, *args: Any) -> None:
        if (level, option) == (batch.SOL_UDP, UDP_GRO):
            raise OSError(errno.ENOPROTOOPT, "Protocol not available")
        super().setsockopt(level, option, *args)

    def sendmsg(self, buffers: Any, ancillary: Any = (), *args: Any) -> int:
        kept = [c for c in ancillary if c[0] != batch.SOL_UDP]
        return super().sendmsg(buffers, kept, *args)


class OldKernelTests(SynchronousTestCase):
    def test_noSegmentOptionNoRuns(self) -> None:
        """
        A kernel without UDP_SEGMENT does not refuse the control message:
        it ignores it and would send a run as one datagram, the messages
        run together.  The sender asks the socket first and sends one by
        one there.
        """
        peer = receiver()
        self.addCleanup(peer.close)
        sock = OldKernelSocket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        self.assertIs(batch.gso_known(sock), False)
        sender = DatagramSender(sock, peer.getsockname())
        sent = datagrams((5, 100))
        self.assertEqual(sender.send_all(sent), [])
        self.assertEqual(receive(peer, 1), sent[:1])
        self.assertEqual(receive(peer, 4), sent[1:])
        self.assertFalse(sender.gso)

    def test_noGro(self) -> None:
        """A kernel that refuses UDP_GRO: no runs to read."""
        with OldKernelSocket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            self.assertIs(batch.enable_gro(sock), False)


class Collect(DatagramProtocol):
    def __init__(self) -> None:
        self.got: list[tuple[bytes, Any]] = []
        self.refused = 0

    def connectionRefused(self) -> None:  # noqa: N802
        self.refused += 1

    def datagramReceived(self, datagram: bytes, address: Any) -> None:  # noqa: N802
        self.got.append((datagram, address))


class ReaderTests(TestCase):
    def setUp(self) -> None:
        self.protocol = Collect()
        self.port = reactor.listenUDP(0, self.protocol, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(self.sender.close)
        self.sender.bind(("127.0.0.1", 0))
        self.sender.connect(("127.0.0.1", self.port.getHost().port))
        self.at = self.sender.getsockname()

    def read(self, reader: Any, expected: int) -> list[int]:
        """
        Call C{reader.doRead} (the reactor not running it) until
        C{expected} datagrams are in: how many each call got.
        """
        calls = []
        sock = self.port.getHandle()
        while len(self.protocol.got) < expected:
            readable, _, _ = select.select([sock], [], [], TIMEOUT)
            self.assertTrue(readable, "the datagrams did not come")
            before = len(self.protocol.got)
            reader.doRead()
            calls.append(len(self.protocol.got) - before)
        return calls

    def test_runCutApart(self) -> None:
        """
        A run sent in one sendmsg is read in one recvmsg (GRO) and handed
        over as the datagrams it was, each with the sender's address.
        """
        why = offload_missing()
        if why is not None:
            raise self.skipTest(why)
        reader = BatchReader(self.port, connected=False)
        self.assertTrue(reader.gro)
        sent = datagrams((MAX_SEGMENTS - 1, 200), (1, 20))
        self.sender.sendmsg(
            sent, [(batch.SOL_UDP, UDP_SEGMENT, batch._SEGMENT_SIZE.pack(200))]
        )
        self.assertEqual(self.read(reader, len(sent)), [len(sent)])
        self.assertEqual(self.protocol.got, [(d, self.at) for d in sent])

    def test_withoutGro(self) -> None:
        """Asked not to: one datagram per read, all of them, empty ones too."""
        reader = BatchReader(self.port, connected=False, gro=False)
        self.assertFalse(reader.gro)
        if offload_missing() is None:
            # Left as it was (a socket systemd keeps, for its next process).
            sock = self.port.getHandle()
            self.assertEqual(sock.getsockopt(batch.SOL_UDP, UDP_GRO), 0)
        sent = [b"", *datagrams((3, 200), (1, 20)), b""]
        sender = DatagramSender(self.sender)
        self.assertEqual(sender.send_all(sent), [])
        self.read(reader, len(sent))
        self.assertEqual(self.protocol.got, [(d, self.at) for d in sent])

    def test_turnBounded(self) -> None:
        """
        A turn of the reactor reads DATAGRAM_BUDGET datagrams at most, even
        tiny ones (Twisted's loop counts bytes only, 256 KiB, and read
        three times as many empty ones in one turn).
        """
        self.port.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        reader = BatchReader(self.port, connected=False, gro=False)
        count = 3 * DATAGRAM_BUDGET
        for _ in range(count):
            self.sender.send(b"")
        calls = self.read(reader, count)
        self.assertEqual(sum(calls), count)
        self.assertEqual(calls[0], DATAGRAM_BUDGET)
        self.assertLessEqual(max(calls), DATAGRAM_BUDGET)

    def test_turnBoundedInBytes(self) -> None:
        """A turn reads until it has BYTE_BUDGET bytes (256 KiB), no further."""
        self.port.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        reader = BatchReader(self.port, connected=False, gro=False)
        # 7 x 32 KiB and 32,512 bytes: 1 KiB short of 256 KiB (255.75 KiB);
        # 255 bytes: one short; the one byte that makes 256 KiB, and more.
        sizes = [32768] * 7 + [32512, 255, 1, 1, 1, 1]
        self.assertEqual(sum(sizes[:10]), batch.BYTE_BUDGET)
        for size in sizes:
            self.sender.send(b"x" * size)
        calls = self.read(reader, len(sizes))
        self.assertEqual(calls[0], 10)

    def test_ipv6AddressAsTwistedGivesIt(self) -> None:
        """An IPv6 sender's address is (host, port), as Twisted's doRead gives."""
        protocol = Collect()
        try:
            port = reactor.listenUDP(0, protocol, interface="::1")
        except Exception as e:
            raise self.skipTest(f"no IPv6 loopback: {e}")
        self.addCleanup(port.stopListening)
        reader = BatchReader(port, connected=False)
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sender:
            sender.bind(("::1", 0))
            sender.sendto(b"six", ("::1", port.getHost().port))
            readable, _, _ = select.select([port.getHandle()], [], [], TIMEOUT)
            self.assertTrue(readable, "the datagram did not come")
            reader.doRead()
            self.assertEqual(protocol.got, [(b"six", sender.getsockname()[:2])])

    def test_failuresLoggedAndPassed(self) -> None:
        """
        A datagram its protocol fails on, or a stream that fails to write,
        is logged; the datagrams after it are still handed over and the
        other streams still written.
        """
        reader = BatchReader(self.port, connected=False, gro=False)
        got = self.protocol.got
        written: list[str] = []

        class Stream:
            def __init__(self, name: str) -> None:
                self.name = name

            def send_waiting(self) -> None:
                written.append(self.name)
                if self.name == "bad":
                    raise ZeroDivisionError("stream")

        def received(datagram: bytes, address: Any) -> None:
            got.append((datagram, address))
            if datagram == b"bad":
                raise ZeroDivisionError("datagram")

        self.protocol.datagramReceived = received  # type: ignore[method-assign]
        reader.pending.extend([Stream("bad"), Stream("good")])
        for datagram in (b"bad", b"good"):
            self.sender.send(datagram)
        self.read(reader, 2)
        self.assertEqual([d for d, _ in got], [b"bad", b"good"])
        self.assertEqual(written, ["bad", "good"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 2)

    def test_budgetCountsSegments(self) -> None:
        """Datagrams read in runs count one each against the budget."""
        why = offload_missing()
        if why is not None:
            raise self.skipTest(why)
        reader = BatchReader(self.port, connected=False)
        segment = batch._SEGMENT_SIZE.pack(20)
        runs = 2 * DATAGRAM_BUDGET // MAX_SEGMENTS
        for _ in range(runs):
            self.sender.sendmsg(
                datagrams((MAX_SEGMENTS, 20)), [(batch.SOL_UDP, UDP_SEGMENT, segment)]
            )
        calls = self.read(reader, runs * MAX_SEGMENTS)
        self.assertLessEqual(max(calls), DATAGRAM_BUDGET)

    def test_flushedAfterTheRead(self) -> None:
        """What the datagrams left in L{pending} is written once they are read."""
        reader = BatchReader(self.port, connected=False)
        got = self.protocol.got
        written: list[int] = []

        class Stream:
            def send_waiting(self) -> None:
                written.append(len(got))

        stream = Stream()

        def received(datagram: bytes, address: Any) -> None:
            got.append((datagram, address))
            if stream not in reader.pending:
                reader.pending.append(stream)

        self.protocol.datagramReceived = received  # type: ignore[method-assign]
        DatagramSender(self.sender).send_all(datagrams((3, 100)))
        self.read(reader, 3)
        self.assertEqual(written, [3])
        self.assertEqual(reader.pending, [])


class ConnectedReaderTests(TestCase):
    def test_unreachableIsARefusal(self) -> None:
        """
        A connected port (a session's, dialled out) on which an ICMP error
        other than "port unreachable" comes back (a firewall's REJECT on
        the way: "administratively prohibited", EHOSTUNREACH) is told to
        its protocol as a refusal, as "port unreachable" is, not raised:
        the reactor would log a traceback for it and close the port.
        """
        why = can_forge()
        if why is not None:
            raise self.skipTest(why)
        protocol = Collect()
        port = reactor.listenUDP(0, protocol, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        peer = receiver()
        self.addCleanup(peer.close)
        port.connect(*peer.getsockname())
        reader = BatchReader(port, connected=True)
        sock = port.getHandle()
        icmp_prohibited(sock.getsockname(), peer.getsockname())
        readable, _, _ = select.select([sock], [], [], TIMEOUT)
        self.assertTrue(readable, "the ICMP error did not come")
        reader.doRead()
        self.assertEqual(protocol.refused, 1)


class _FailingSocket:
    """A UDP socket whose reads fail with C{error}."""

    family = socket.AF_INET

    def __init__(self, error: int) -> None:
        self.error = error

    def recvmsg_into(self, *args: Any) -> Any:
        raise OSError(self.error, os.strerror(self.error))

    def getsockname(self) -> Any:
        return ("127.0.0.1", 9000)  # one address: no destinations asked


class _Port:
    """A UDP port's parts a L{BatchReader} uses, on C{sock}."""

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.protocol = Collect()

    def getHandle(self) -> Any:  # noqa: N802
        return self.sock


class _OneDatagramSocket:
    """An IPv6 socket on one address that reads C{datagram} from C{sockaddr}."""

    family = socket.AF_INET6

    def __init__(self, datagram: bytes, sockaddr: Any) -> None:
        self.datagram, self.sockaddr = datagram, sockaddr

    def recvmsg_into(self, buffers: Any, *args: Any) -> Any:
        if self.datagram is None:
            raise BlockingIOError(errno.EAGAIN, "nothing more")
        size = len(self.datagram)
        buffers[0][:size], self.datagram = self.datagram, None
        return size, [], 0, self.sockaddr

    def getsockname(self) -> Any:
        return ("fe80::2", 9000, 0, 1)  # one address: no destinations asked


class PeerAddressTests(SynchronousTestCase):
    """
    An IPv6 peer's address as the reader hands it over: (host, port), a
    link-local peer's host with its zone (the kernel's scope id, by name).
    """

    def read(self, sockaddr: Any) -> Any:
        port = _Port(_OneDatagramSocket(b"x", sockaddr))
        BatchReader(port, connected=False, gro=False).doRead()
        [(_, address)] = port.protocol.got
        return address

    def test_linkLocalWithItsZone(self) -> None:
        self.assertEqual(self.read(("fe80::1", 5000, 0, 1)), ("fe80::1%lo", 5000))

    def test_otherwiseAsTwistedGivesIt(self) -> None:
        """No scope id: no zone, whatever the flow label."""
        self.assertEqual(self.read(("2001:db8::1", 5000, 7, 0)), ("2001:db8::1", 5000))


class ReadErrorTests(SynchronousTestCase):
    """What a failed read means, on a port that is connected or not."""

    def read(self, error: int, connected: bool) -> Collect:
        port = _Port(_FailingSocket(error))
        BatchReader(port, connected=connected, gro=False).doRead()
        return port.protocol

    def test_nothingToRead(self) -> None:
        for error in (errno.EAGAIN, errno.EINTR):
            self.assertEqual(self.read(error, connected=True).refused, 0)

    def test_connected(self) -> None:
        """Any other error on a connected port is the peer's refusal."""
        for error in (errno.ECONNREFUSED, errno.EHOSTUNREACH):
            self.assertEqual(self.read(error, connected=True).refused, 1)

    def test_notConnected(self) -> None:
        """
        A listener's port: a refusal left from an earlier send is passed
        over; any other error is raised (the reactor's to log).
        """
        self.assertEqual(self.read(errno.ECONNREFUSED, connected=False).refused, 0)
        error = self.assertRaises(OSError, self.read, errno.EBADF, False)
        self.assertEqual(error.errno, errno.EBADF)


class ForPortTests(TestCase):
    """Readers and senders for Twisted's UDP ports, and for ports without a socket."""

    def test_noSocket(self) -> None:
        for port in (object(), _Port(None), _Port("not a socket")):
            self.assertIsNone(batch.read_in_batches(port, connected=False))
            self.assertIsNone(batch.sender_for(port))

    def test_realPort(self) -> None:
        port = reactor.listenUDP(0, Collect(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        reader = batch.read_in_batches(port, connected=True)
        self.assertIsInstance(reader, BatchReader)
        self.assertEqual(port.doRead, reader.doRead)
        self.assertTrue(reader.connected)
        self.assertEqual(reader.gro, offload_missing() is None)
        told = lambda: None  # noqa: E731
        sender = batch.sender_for(port, ("127.0.0.1", 9), told)
        self.assertIsInstance(sender, DatagramSender)
        self.assertEqual(
            (sender.sock, sender.address, sender.refused),
            (port.getHandle(), ("127.0.0.1", 9), told),
        )


class ReaderAnswerFromTests(SynchronousTestCase):
    """
    Which of a datagram's control messages L{BatchReader.answer_from}
    makes the answer's source: only the kinds the socket asked for, and
    IPv4's when a dual-stack socket's IPv4 datagram carries both.
    """

    V4 = (socket.IPPROTO_IP, sources.IP_PKTINFO)
    V6 = (socket.IPPROTO_IPV6, sources.IPV6_PKTINFO)

    def reader(self, *ancillary: tuple[int, int, bytes]) -> BatchReader:
        reader = BatchReader(
            _Port(_OneDatagramSocket(b"", None)), connected=False, gro=False
        )
        reader._where = frozenset({self.V4, self.V6})
        if ancillary:
            reader.ancillary = list(ancillary)
        return reader

    def info(self) -> tuple[tuple[int, int, bytes], tuple[int, int, bytes]]:
        """An IPv4 datagram's both messages on a dual-stack socket."""
        v4 = struct.pack("=i4s4s", 2, bytes([10, 0, 0, 5]), bytes([10, 0, 0, 255]))
        mapped = socket.inet_pton(socket.AF_INET6, "::ffff:10.0.0.255")
        return (*self.V4, v4), (*self.V6, struct.pack("=16si", mapped, 2))

    def test_nothingReadYet(self) -> None:
        """Before any datagram: no source (the kernel chooses)."""
        self.assertEqual(self.reader().answer_from(), NO_SOURCE)

    def test_ipv4FirstWhateverTheOrder(self) -> None:
        v4, v6 = self.info()
        expected = sources.answer_from(socket.IPPROTO_IP, v4[2])
        self.assertNotEqual(expected, NO_SOURCE)
        self.assertEqual(self.reader(v4, v6).answer_from(), expected)
        self.assertEqual(self.reader(v6, v4).answer_from(), expected)

    def test_ipv6Alone(self) -> None:
        """An IPv6 datagram's one message is its source."""
        address = socket.inet_pton(socket.AF_INET6, "2001:db8::5")
        v6 = (*self.V6, struct.pack("=16si", address, 0))
        expected = sources.answer_from(socket.IPPROTO_IPV6, v6[2])
        self.assertNotEqual(expected, NO_SOURCE)
        self.assertEqual(self.reader(v6).answer_from(), expected)

    def test_kindNotAskedForIgnored(self) -> None:
        """A control message the socket did not ask for is no source."""
        v4, _ = self.info()
        other = (socket.SOL_SOCKET, 29, v4[2])  # (SO_TIMESTAMP's level)
        self.assertEqual(self.reader(other).answer_from(), NO_SOURCE)
        self.assertEqual(
            self.reader(other, v4).answer_from(),
            sources.answer_from(socket.IPPROTO_IP, v4[2]),
        )
