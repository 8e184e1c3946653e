"""
udpd against hostile peers, on real sockets to a real C{ipcd} subprocess
whose memory and fds are read from /proc: a session's peer sending
sequence numbers far ahead, and HELLOs from forged source addresses.

Nothing here is timed: bounds are on bytes (RSS), fds and sessions, and
every wait is bounded (tens of seconds).
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from ipcd.daemons.udp import wire as udpwire
from ipcd.test.support import TIMEOUT, lookup, wait_until
from ipcd.test.udpsupport import (
    can_forge,
    forged_hellos,
    handshake,
    next_data,
    open_session,
    spawn_udp_ipcd,
    udp_socket,
)

MiB = 1024 * 1024
# What one DATA, whatever its sequence number, may add to ipcd's memory.
RSS_BOUND = 16 * MiB
# A bound on waiting for an answer, not a measure of speed.
ANSWER_WITHIN = 3 * TIMEOUT


def timed_lookup(rundir: str) -> float:
    """A lookup on ipcd's socket, answered; how long the answer took."""
    began = time.monotonic()
    reply = lookup(rundir, b"nosuch;")
    assert reply.data.startswith(b"ne no route"), reply.data
    return time.monotonic() - began


class SequenceJumpTests(TestCase):
    @inlineCallbacks
    def test_oneDatagramFarAhead(self) -> Any:
        """
        DATAs of a live session, from its own address, at +2**30, +2**62,
        2**63 - 1 and 2**64 - 1: each is delivered (pongd echoes it), a
        lookup right after each is answered, and ipcd's peak RSS stays
        within RSS_BOUND of before (the old window shifted a bitmap by the
        jump: +2**31 cost 546 MiB, +2**34 a MemoryError).  A number that
        "wraps" past 2**64 - 1 to 0 is stale: dropped, counted.
        """
        ipcd = yield spawn_udp_ipcd(self)
        sock = udp_socket()
        self.addCleanup(sock.close)
        session = yield deferToThread(open_session, sock, ipcd.port)
        to = ("127.0.0.1", ipcd.port)

        def exchange(sequence: int, payload: bytes) -> float:
            sock.sendto(udpwire.data(session, sequence, payload), to)
            took = timed_lookup(ipcd.rundir)
            assert next_data(sock).payload == payload
            return took

        yield deferToThread(exchange, 0, b"first")
        rss = ipcd.memory()
        peak = ipcd.reset_peak()
        lookups = []
        for sequence in (2**30, 2**62, 2**63 - 1, 2**64 - 1):
            took = yield deferToThread(exchange, sequence, b"at %d" % sequence)
            lookups.append(took)
        grown = ipcd.memory("VmHWM" if peak else "VmRSS") - rss
        self.assertLess(grown, RSS_BOUND, f"ipcd grew by {grown / MiB:.1f} MiB")
        self.assertTrue(all(took < ANSWER_WITHIN for took in lookups), lookups)

        sock.sendto(udpwire.data(session, 0, b"wrapped"), to)

        def counted() -> Any:
            [shown] = ipcd.status()["connections"]
            return shown["datagrams"]["dropped"] == 1 and shown["datagrams"]

        datagrams = yield wait_until(counted, "the wrapped DATA dropped", TIMEOUT)
        self.assertEqual(datagrams["received"], 5)
        # Every number skipped is lost, and the count is one subtraction.
        self.assertEqual(datagrams["lost"], 2**64 - 5)
        with open(ipcd.log) as f:
            self.assertNotIn("Traceback", f.read())


class ForgedHelloTests(TestCase):
    why = can_forge()
    if why is not None:
        skip = why

    @inlineCallbacks
    def test_forgedSourcesKeepNothing(self) -> Any:
        """
        1,000 HELLOs from forged 127.1.x.y sources (which never answer)
        get a VERIFY each and nothing else: no fd opened, no session, no
        request pending; a genuine HELLO right after opens a session at
        once and its message echoes through pongd.  (Without the address
        check each forged HELLO connected to pongd, and past 256 every
        genuine one got "too many sessions".)
        """
        ipcd = yield spawn_udp_ipcd(self)
        ipcd.status()  # the control socket's first request opens what it keeps
        before = yield wait_until(ipcd.settled_fds, "ipcd's fds to settle")
        yield deferToThread(forged_hellos, ipcd.port, 1000)

        def all_seen() -> bool:
            # Each answered, or lost to a full socket buffer and counted.
            answered = ipcd.status()["counters"].get(
                "udp hellos answered with a cookie", 0
            )
            return answered + ipcd.udp_sockets()[ipcd.port] >= 1000

        yield wait_until(all_seen, "ipcd to read the forged HELLOs", ANSWER_WITHIN)
        self.assertEqual(ipcd.status()["connections"], [])
        # The status requests' own connections close soon after.
        yield wait_until(
            lambda: ipcd.fds().items() <= before.items(), "no fd beyond the baseline"
        )

        sock = udp_socket()
        self.addCleanup(sock.close)
        answer, got = yield deferToThread(handshake, sock, ipcd.port)
        self.assertIsInstance(answer, udpwire.Accepted)
        kinds = [type(udpwire.decode(datagram)) for datagram in got]
        self.assertEqual(kinds, [udpwire.Verify, udpwire.Accepted])
        genuine = udpwire.data(answer.session, 0, b"genuine")
        sock.sendto(genuine, ("127.0.0.1", ipcd.port))
        echo = yield deferToThread(next_data, sock)
        self.assertEqual(echo.payload, b"genuine")
        [shown] = ipcd.status()["connections"]
        self.assertEqual(shown["labels"], ["ip:127.0.0.1"])
