"""
udpd's datagrams in batches, the kernel batching them where it can.

A session's datagrams cost a system call each on both ends, and in Python
that call and its turn of the reactor are most of what a small message
costs.  Linux batches them below the socket:

    UDP_SEGMENT (GSO)  one sendmsg carries a run of equal-sized datagrams
                       (the last may be shorter); the kernel cuts them apart,
                       so the peer gets ordinary datagrams, whatever it runs
    UDP_GRO            one recvmsg may hand over such a run from one sender,
                       its segment size in a control message

L{DatagramSender} sends a session's datagrams, the messages of one read of
its local stream in runs (L{DatagramSender.send_all}); L{BatchReader}
reads a UDP port in place of Twisted's C{doRead}, splits what GRO joined,
reads at most L{DATAGRAM_BUDGET} datagrams or L{BYTE_BUDGET} bytes a turn,
and then writes what the turn's datagrams left for the local streams, one
send each (L{ipcd.daemons.outbox}).  Where the kernel refuses either
option, one system call per datagram, as before.
"""

from __future__ import annotations

import errno
import socket
import struct
import sys
from collections.abc import Callable
from typing import Any, Protocol

from twisted.logger import Logger

from ipcd.daemons.udp import READ_SIZE
from ipcd.daemons.udp import source as sources
from ipcd.daemons.udp.source import NO_SOURCE, Source
from ipcd.daemons.udp.wire import MAX_UDP_PAYLOAD

SOL_UDP = getattr(socket, "SOL_UDP", 17)
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
UDP_GRO = getattr(socket, "UDP_GRO", 104)
_IP = socket.IPPROTO_IP
_OFFLOAD = sys.platform.startswith("linux")
# The kernel's UDP_MAX_SEGMENTS (64 until Linux 6.11, 128 since).
MAX_SEGMENTS = 64
_SEGMENT_SIZE = struct.Struct("=H")  # UDP_SEGMENT's value: a u16
_GRO_SIZE = struct.Struct("=i")  # UDP_GRO's control message: an int
# A run's segment size, and where the datagram was sent (L{sources}).
_ANCILLARY = socket.CMSG_SPACE(_GRO_SIZE.size) + sources.SPACE
# What one turn of the reactor reads from one port at most (a GRO run read
# last may pass the datagrams by the rest of that run: the kernel joins 64
# at most, or its UDP_MAX_SEGMENTS of a local sender's): Twisted's
# loop counts bytes only (256 KiB), so a flood of empty datagrams kept it
# reading until the socket's buffer ran dry.
DATAGRAM_BUDGET = 256
BYTE_BUDGET = 256 * 1024

# What every reader reads into (one at a time: the reactor's thread), each
# datagram copied out before it is handed over.
_BUFFER = bytearray(READ_SIZE)
_VIEW = memoryview(_BUFFER)

# Not for this segment size (over the path's MTU, say), or not here at all.
_SIZE_REFUSED = frozenset({errno.EINVAL, errno.EMSGSIZE})
_GSO_REFUSED = frozenset({errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.EIO})
_READ_NOTHING = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR})


class Waiting(Protocol):
    """What a read of the port left to write (a session's local stream)."""

    def send_waiting(self) -> None: ...


def enable_gro(sock: socket.socket) -> bool:
    """Whether C{sock} now takes runs of datagrams in one read (UDP_GRO)."""
    if not _OFFLOAD:
        return False
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


def gso_known(sock: socket.socket) -> bool:
    """
    Whether C{sock}'s kernel knows UDP_SEGMENT.  One that does not (Linux
    before 4.18, or a sandbox's network stack) does not refuse the control
    message: it passes over it and sends the run as one datagram, its
    messages run together, so it is asked before the first run.
    """
    if not _OFFLOAD:
        return False
    try:
        sock.getsockopt(SOL_UDP, UDP_SEGMENT)
    except OSError:
        return False
    return True


class DatagramSender:
    """
    Datagrams to one peer on C{sock}: to C{address}, or to the address it
    is connected to (C{None}); from the address C{source} names (a
    L{sources.answer_from}), or from the one the kernel chooses.
    C{refused} is called when the kernel says nobody listens there
    (ECONNREFUSED, on a connected socket): it ends the session, so from
    then on nothing more is sent, not even the rest of the datagrams being
    sent (they are lost).  Every other error loses the datagram, as UDP
    does.
    """

    def __init__(
        self,
        sock: socket.socket,
        address: Any = None,
        refused: Callable[[], None] | None = None,
        source: Source = NO_SOURCE,
    ) -> None:
        self.sock = sock
        self.address = address
        self.refused = refused
        self.source = source
        self.gso = gso_known(sock)
        # Runs of segments this large or larger go out one by one: the
        # kernel refused one (a segment must fit the path's MTU).
        self.gso_below = MAX_UDP_PAYLOAD + 1
        self._to = () if address is None else (address,)
        self.closed = False  # refused: the session has ended

    def write(self, datagram: bytes) -> None:
        """Send one datagram; OSError when it is lost."""
        if self.closed:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "the session has ended")
        try:
            if self.source:
                self.sock.sendmsg([datagram], self.source, 0, *self._to)
            elif self.address is None:
                self.sock.send(datagram)
            else:
                self.sock.sendto(datagram, self.address)
        except OSError as e:
            if e.errno == errno.ECONNREFUSED:
                self._refuse()
            raise

    def send(self, datagram: bytes) -> bool:
        """Send one datagram; whether it went out."""
        try:
            self.write(datagram)
        except OSError:
            return False
        return True

    def send_all(self, datagrams: list[bytes]) -> list[bytes]:
        """Send C{datagrams} in order; those lost (usually none)."""
        lost: list[bytes] = []
        i, count = 0, len(datagrams)
        while i < count:
            if self.closed:  # refused on the way: the rest is not sent
                return lost + datagrams[i:]
            size = len(datagrams[i])
            end = i + 1
            if self.gso and 0 < size < self.gso_below:
                limit = min(count, i + MAX_SEGMENTS, i + MAX_UDP_PAYLOAD // size)
                while end < limit and len(datagrams[end]) == size:
                    end += 1
                if end < limit and 0 < len(datagrams[end]) < size:
                    # A run may end with a shorter one; not an empty one,
                    # which would add nothing to the send and be lost.
                    end += 1
            if end - i == 1:
                if not self.send(datagrams[i]):
                    lost.append(datagrams[i])
            else:
                lost += self._send_run(datagrams[i:end], size)
            i = end
        return lost

    def _send_run(self, run: list[bytes], size: int) -> list[bytes]:
        """One sendmsg for C{run}, cut into C{size}-byte datagrams: the lost."""
        try:
            segments = (SOL_UDP, UDP_SEGMENT, _SEGMENT_SIZE.pack(size))
            self.sock.sendmsg(run, [*self.source, segments], 0, *self._to)
        except OSError as e:
            if e.errno in _SIZE_REFUSED:
                self.gso_below = size
            elif e.errno in _GSO_REFUSED:
                self.gso = False
            else:
                if e.errno == errno.ECONNREFUSED:
                    self._refuse()
                return run
            return [datagram for datagram in run if not self.send(datagram)]
        return []

    def _refuse(self) -> None:
        if self.refused is not None:
            # Before the call: what it does (end the session) sends nothing.
            self.closed = True
            self.refused()


class BatchReader:
    """
    Reads UDP port C{port} (a Twisted C{udp.Port}, its protocol's
    C{datagramReceived} called for each datagram) in place of Twisted's
    C{doRead}; C{connected}: whether its socket is connected (an error
    read there is the peer's refusal or unreachability, told to
    C{connectionRefused}); C{gro}:
    whether to ask the kernel for runs of datagrams.  Not on a socket
    systemd keeps: the option would stay on it for the next process, which
    may not know it.

    What the turn's datagrams left to write (the streams put in
    L{pending}) is written when the reading is done.

    On a socket bound to every address, L{ancillary} holds, while a
    datagram is handed over, where it was sent (L{sources}), which
    L{answer_from} makes the source of an answer.
    """

    ancillary: list[tuple[int, int, bytes]] = []  # (the datagram's)

    log = Logger()

    def __init__(self, port: Any, connected: bool, gro: bool = True) -> None:
        self.port = port
        self.sock: socket.socket = port.getHandle()
        self.connected = connected
        self.gro = gro and enable_gro(self.sock)
        self.ipv6 = self.sock.family == socket.AF_INET6
        # (Not on a connected socket: it sends from one address anyway.)
        self._where = (
            sources.NO_KINDS if connected else sources.ask_destinations(self.sock)
        )
        self.pending: list[Waiting] = []
        port.doRead = self.doRead  # IReadDescriptor's, for the reactor

    def doRead(self) -> None:  # noqa: N802 (Twisted's name)
        try:
            self._read()
        finally:
            self.flush()

    def _read(self) -> None:
        protocol = self.port.protocol
        recvmsg_into, buffers, view = self.sock.recvmsg_into, [_BUFFER], _VIEW
        datagrams = received = 0
        while datagrams < DATAGRAM_BUDGET and received < BYTE_BUDGET:
            try:
                size, ancillary, _, address = recvmsg_into(buffers, _ANCILLARY)
            except OSError as e:
                if e.errno in _READ_NOTHING:
                    return
                if self.connected:
                    # The ICMP error the kernel kept for the peer: "port
                    # unreachable" (ECONNREFUSED), or a firewall's REJECT
                    # (EHOSTUNREACH, EACCES...).  Raised, the reactor would
                    # log a traceback and close the port.
                    protocol.connectionRefused()
                    return
                if e.errno == errno.ECONNREFUSED:
                    return
                raise
            if self.ipv6:
                # As Twisted's (no flow id), but a link-local peer's zone.
                address = sources.peer_address(address) if address[3] else address[:2]
            segment = size
            for level, kind, data in ancillary:
                if kind == UDP_GRO and level == SOL_UDP:
                    segment = _GRO_SIZE.unpack_from(data)[0] or size
            # Where it was sent, read only to answer it (L{answer_from}).
            self.ancillary = ancillary
            received += size
            read = view[:size]
            if segment < size:  # a run: its datagrams, copied out first
                run = [bytes(read[i : i + segment]) for i in range(0, size, segment)]
            else:
                run = [bytes(read)]
            datagrams += len(run)
            for datagram in run:
                try:
                    protocol.datagramReceived(datagram, address)
                except Exception:
                    self.log.failure("udpd: reading a datagram")

    def answer_from(self) -> Source:
        """The source of an answer to the datagram being handed over."""
        where, found = self._where, None
        for level, kind, data in self.ancillary:
            # IPv4's first: a dual-stack socket's IPv4 datagram has both.
            if (level, kind) in where and (found is None or level == _IP):
                found = level, data
        # (None: the kernel chooses.)
        return NO_SOURCE if found is None else sources.answer_from(*found)

    def flush(self) -> None:
        """Send what the datagrams read left for the local streams."""
        pending = self.pending  # the sessions hold this very list
        try:
            for waiting in pending:
                try:
                    waiting.send_waiting()
                except Exception:
                    self.log.failure("udpd: writing to a session's stream")
        finally:
            pending.clear()


def _socket_of(port: Any) -> socket.socket | None:
    """A UDP port's socket; C{None} when it has none (a test reactor's)."""
    handle = getattr(port, "getHandle", None)
    sock = handle() if handle is not None else None
    return sock if isinstance(sock, socket.socket) else None


def read_in_batches(port: Any, connected: bool, gro: bool = True) -> BatchReader | None:
    """Read C{port} with a L{BatchReader}; C{None} when it has no socket."""
    if _socket_of(port) is None:
        return None
    return BatchReader(port, connected, gro)


def sender_for(
    port: Any,
    address: Any = None,
    refused: Callable[[], None] | None = None,
    source: Source = NO_SOURCE,
) -> DatagramSender | None:
    """A L{DatagramSender} on C{port}'s socket; C{None} when it has none."""
    sock = _socket_of(port)
    return None if sock is None else DatagramSender(sock, address, refused, source)
