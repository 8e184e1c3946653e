"""
Fair limits: connections per listener and per peer, so one peer cannot
starve the others; refusals and accept errors logged at a bounded rate.
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time
from collections import Counter
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.interfaces import IFileDescriptorReceiver, IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import Logger, formatEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface import implementer

from ipcd import limits as limits_module
from ipcd.compat import twisted as compat_twisted
from ipcd.limits import (
    LOG_BURST,
    REFUSAL_GRACE,
    ConnectionLimits,
    LimitedEndpoint,
    LimitedFactory,
    RateLimitedObserver,
    network_peer_key,
    unix_peer_key,
)
from ipcd.test.support import (
    TIMEOUT,
    accepts,
    as_user,
    assert_logged,
    assert_no_fd_leak,
    bounce,
    connect_unix,
    fd_baseline,
    logged_lines,
    make_config,
    needs_root,
    open_fds,
    parsed_addresses,
    python_env,
    read_reply,
    read_text,
    recv_upto,
    short_rundir,
    spawn,
    start_ipcd,
    wait_until,
)
from ipcd.test.tcpsupport import recv_eof, start_host
from ipcd.test.wssupport import make_ca, start_ws_host, unverified_context
from ipcd.wire import LOG_LINES_DROPPED, encode


class _Port:
    def __init__(self) -> None:
        self.reading = True
        self.stops = self.starts = 0

    def stopReading(self) -> None:  # noqa: N802
        self.reading = False
        self.stops += 1

    def startReading(self) -> None:  # noqa: N802
        self.reading = True
        self.starts += 1


class _Transport:
    def __init__(self) -> None:
        self.written = b""
        self.halfClosed = self.aborted = False

    def write(self, data: bytes) -> None:
        self.written += data

    def loseWriteConnection(self) -> None:  # noqa: N802
        self.halfClosed = True

    def abortConnection(self) -> None:  # noqa: N802
        self.aborted = True


class _TlsTransport(_Transport):
    """A transport that cannot half-close (TLS)."""

    loseWriteConnection = None  # type: ignore[assignment]
    closed = False

    def loseConnection(self) -> None:  # noqa: N802
        self.closed = True


class ConnectionLimitsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.clock = Clock()
        self.limits = ConnectionLimits(
            "ipc", 4, 2, self.clock, observer=self.events.append
        )
        self.port = _Port()
        self.port.connected = True
        self.limits.listening(self.port)

    def test_perPeer(self) -> None:
        self.assertIsNone(self.limits.admit("uid:1"))
        self.assertIsNone(self.limits.admit("uid:1"))
        reason = self.limits.admit("uid:1")
        self.assertEqual(reason, "too many connections from uid:1 (at most 2)")
        self.assertIsNone(self.limits.admit("uid:2"), "another peer is not affected")
        self.limits.release("uid:1")
        self.assertIsNone(self.limits.admit("uid:1"))
        self.assertEqual(self.limits.counters["ipc: refused, per-peer limit"], 1)

    def test_totalPausesAndResumesAccepting(self) -> None:
        for key in ("uid:1", "uid:2", "uid:3"):
            self.limits.admit(key)
        self.assertTrue(self.port.reading)
        self.limits.admit("uid:4")
        self.assertFalse(self.port.reading, "at the maximum: stop accepting")
        self.limits.release("uid:2")
        self.assertTrue(self.port.reading)
        self.assertEqual(self.limits.total, 3)
        self.assertEqual(
            dict(self.limits.per_peer), {"uid:1": 1, "uid:3": 1, "uid:4": 1}
        )

    def test_serviceMaximumPauses(self) -> None:
        """
        A service's own lower maximum (websocketd's max_connections) pauses
        the listener as the listener's does, read when used; 0 is none.
        """
        most = [2]
        self.limits.service_maximum = lambda: most[0]
        self.limits.admit("uid:1")
        self.assertTrue(self.port.reading)
        self.limits.admit("uid:2")
        self.assertFalse(self.port.reading, "at the service's maximum")
        self.assertFalse(self.limits.has_room("uid:3"))
        self.limits.release("uid:2")
        self.assertTrue(self.port.reading)
        most[0] = 0
        for key in ("uid:2", "uid:3"):
            self.limits.admit(key)
        self.assertTrue(self.port.reading, "0: the listener's maximum (4)")
        self.limits.admit("uid:4")
        self.assertFalse(self.port.reading)

    def test_exemptPeer(self) -> None:
        limits = ConnectionLimits("pong", 4, 1, self.clock, exempt=frozenset({"uid:0"}))
        self.assertIsNone(limits.admit("uid:0"))
        self.assertIsNone(limits.admit("uid:0"), "ipcd's own uid: no per-peer cap")
        self.assertIsNone(limits.admit("uid:1"))
        self.assertIsNotNone(limits.admit("uid:1"))
        self.assertEqual(limits.total, 3)

    def test_hasRoom(self) -> None:
        """
        C{has_room} says what C{admit} would do, leaving C{spare} places,
        and counts nothing.
        """
        limits = ConnectionLimits("ipc", 4, 1, self.clock, exempt=frozenset({"uid:0"}))
        self.assertTrue(limits.has_room("uid:1", spare=1))
        self.assertEqual((limits.total, dict(limits.per_peer)), (0, {}))
        limits.admit("uid:1")
        self.assertFalse(limits.has_room("uid:1"), "at its per-peer maximum")
        self.assertTrue(limits.has_room("uid:2", spare=2))
        limits.admit("uid:0")
        self.assertTrue(limits.has_room("uid:0"), "exempt from the per-peer cap")
        self.assertTrue(limits.has_room("uid:2", spare=1))
        self.assertFalse(limits.has_room("uid:2", spare=2), "too close to 4")
        limits.admit("uid:2")
        limits.admit("uid:3")
        self.assertFalse(limits.has_room("uid:4"), "at the total maximum")

    def test_stoppedPortNotRestarted(self) -> None:
        for key in ("uid:1", "uid:2", "uid:3", "uid:4"):
            self.limits.admit(key)
        self.port.connected = False
        self.limits.release("uid:1")
        self.assertFalse(self.port.reading)

    def test_refusalThenGraceThenCut(self) -> None:
        """A refused peer gets the answer and an EOF, and is cut if it lingers."""
        transport = _Transport()
        self.limits.refuse(transport, b"ne no")
        self.assertEqual((transport.written, transport.halfClosed), (b"ne no", True))
        self.clock.advance(REFUSAL_GRACE)
        self.assertTrue(transport.aborted)
        # One that closes in time is not cut.
        polite = _Transport()
        self.limits.refuse(polite, b"")
        self.limits.refused_gone(polite)
        self.clock.advance(REFUSAL_GRACE)
        self.assertFalse(polite.aborted)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_reloadedMaxima(self) -> None:
        self.limits.max_per_peer = 1
        self.limits.admit("uid:1")
        self.assertIsNotNone(self.limits.admit("uid:1"))

    def test_refusalsLoggedAtABoundedRate(self) -> None:
        self.limits.admit("uid:1")
        self.limits.admit("uid:1")
        for _ in range(1000):
            self.limits.admit("uid:1")
        self.assertEqual(LOG_BURST, 5)  # as docs/configuration.rst says
        self.assertEqual(len(self.events), LOG_BURST)
        self.assertEqual(self.limits.counters["ipc: refused, per-peer limit"], 1000)
        self.assertEqual(self.limits.counters[LOG_LINES_DROPPED], 1000 - LOG_BURST)
        # At the end of the period (10 s), one line says how many were left out.
        self.clock.advance(9.999)
        self.assertEqual(len(self.events), LOG_BURST)
        self.clock.advance(0.001)
        self.assertEqual(len(self.events), LOG_BURST + 1)
        self.assertEqual(self.events[-1]["ipcd_dropped"], 1000 - LOG_BURST)
        self.limits.admit("uid:1")
        self.assertEqual(len(self.events), LOG_BURST + 2)
        self.assertNotIn("ipcd_dropped", self.events[-1])

    def test_documentedRefusalGrace(self) -> None:
        """A refused peer has 1 s (docs/securing.rst) to read and close."""
        transport = _Transport()
        self.limits.refuse(transport, b"ne no")
        self.clock.advance(0.999)
        self.assertFalse(transport.aborted)
        self.clock.advance(0.001)
        self.assertTrue(transport.aborted)

    def test_refusalClosesWithoutHalfClose(self) -> None:
        """A transport that cannot half-close (TLS) is closed once it has sent."""
        transport = _TlsTransport()
        self.limits.refuse(transport, b"ne no")
        self.assertEqual((transport.written, transport.closed), (b"ne no", True))

    def test_lingeringCountedPerPeer(self) -> None:
        """
        At most 8 refused connections of one peer wait out their grace; one
        gone makes room for one more, and a peer with none left is forgotten.
        """
        first = [_Transport() for _ in range(9)]
        for transport in first:
            self.limits.refuse(transport, b"", "uid:1")
        self.assertEqual([t.aborted for t in first], [False] * 8 + [True])
        for transport in first[:7]:
            self.limits.refused_gone(transport)
        second = [_Transport() for _ in range(8)]
        for transport in second:
            self.limits.refuse(transport, b"", "uid:1")
        self.assertEqual([t.aborted for t in second], [False] * 7 + [True])
        for transport in [first[7], *second[:7]]:
            self.limits.refused_gone(transport)
        self.assertEqual(dict(self.limits._lingering), {})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_pausedOnceOverTheMaximum(self) -> None:
        """
        Connections accepted in the same turn may pass the maximum: the
        listener is paused (and that counted and logged) once, and resumes
        only below the maximum again.
        """
        for key in ("uid:1", "uid:2", "uid:3", "uid:4", "uid:5"):
            self.limits.admit(key)
        self.assertEqual(self.port.stops, 1)
        self.assertEqual(self.limits.counters["ipc: paused at the connection limit"], 1)
        self.assertEqual(
            [formatEvent(e) for e in self.events],
            ["ipc: 4 connections, the maximum: not accepting more until one ends"],
        )
        self.limits.release("uid:5")
        self.assertFalse(self.port.reading, "4 connections: still the maximum")
        self.limits.release("uid:4")
        self.assertEqual((self.port.reading, self.port.starts), (True, 1))

    def test_neverPausedNeverResumed(self) -> None:
        """A listener the limits did not pause is not resumed by them."""
        self.limits.admit("uid:1")
        self.limits.release("uid:1")
        self.assertEqual(self.port.starts, 0)

    def test_roomByDefault(self) -> None:
        """Without C{spare}, the last place is room."""
        for key in ("uid:1", "uid:2", "uid:3"):
            self.limits.admit(key)
        self.assertTrue(self.limits.has_room("uid:4"))

    def test_serviceMaximumOfOne(self) -> None:
        """A service's maximum of 1 is a maximum (only 0 is none)."""
        self.limits.service_maximum = lambda: 1
        self.limits.admit("uid:1")
        self.assertFalse(self.port.reading)

    def test_acceptErrorsCounted(self) -> None:
        """The accept errors Twisted logs through the port are counted, and logged."""
        port = _Port()
        port._logger = Logger(namespace="twisted.internet.tcp.Port")  # type: ignore
        if not compat_twisted.count_accept_errors(port, lambda logger: logger):
            raise SkipTest("this Twisted's ports have no _logger")
        self.limits.listening(port)
        port._logger.error("accept error: EMFILE")
        self.assertEqual(self.limits.counters["ipc: accept errors"], 1)
        self.assertEqual(
            [formatEvent(e) for e in self.events], ["accept error: EMFILE"]
        )


class RateLimitedObserverTests(SynchronousTestCase):
    def test_burstThenSummary(self) -> None:
        seen: list[dict[str, Any]] = []
        clock = Clock()
        observer = RateLimitedObserver(seen.append, clock, burst=2, period=10)
        for i in range(5):
            observer({"log_format": "x {i}", "i": i})
        self.assertEqual([e["i"] for e in seen], [0, 1])
        clock.advance(9)
        self.assertEqual(len(seen), 2)
        # The period ends: the last one left out, and how many were.
        clock.advance(1)
        self.assertEqual((seen[-1]["i"], seen[-1]["ipcd_dropped"]), (4, 3))
        self.assertEqual(
            formatEvent(seen[-1]),
            "3 similar log lines left out in 10 s; the last: x 4",
        )
        self.assertEqual(clock.getDelayedCalls(), [])
        observer({"log_format": "x {i}", "i": 9})
        self.assertEqual((seen[-1]["i"], len(seen)), (9, 4))

    def test_eventAtTheEndOfThePeriodCarriesTheSummary(self) -> None:
        """An event in the same turn as the period's end says it instead."""
        seen: list[dict[str, Any]] = []
        clock = Clock()
        observer = RateLimitedObserver(seen.append, clock, burst=1, period=10)
        for i in range(3):
            observer({"log_format": "x {i}", "i": i})
        clock.rightNow += 10  # time passes; the summary's call has not run
        observer({"log_format": "x {i}", "i": 7})
        self.assertEqual(formatEvent(seen[-1]), "2 similar log lines left out; x 7")
        self.assertEqual(clock.getDelayedCalls(), [])

    def observer(self, burst: int) -> tuple[list[dict[str, Any]], Clock, Any]:
        """What a new observer passes on, its clock, and the observer."""
        seen: list[dict[str, Any]] = []
        clock = Clock()
        return seen, clock, RateLimitedObserver(seen.append, clock, burst, period=10)

    def test_firstEventAsItIs(self) -> None:
        """Nothing left out yet: the first events pass unprefixed."""
        seen, _clock, observer = self.observer(burst=2)
        observer({"log_format": "x {i}", "i": 0})
        self.assertEqual([formatEvent(e) for e in seen], ["x 0"])
        self.assertNotIn("ipcd_dropped", seen[0])

    def test_droppedCounted(self) -> None:
        """Each line left out is counted in the counters given."""
        counters: Counter[str] = Counter()
        observer = RateLimitedObserver(
            [].append, Clock(), burst=1, period=10, counters=counters
        )
        for i in range(4):
            observer({"log_format": "x", "i": i})
        self.assertEqual(counters, Counter({LOG_LINES_DROPPED: 3}))

    def test_summaryAtTheEndOfThePeriod(self) -> None:
        """
        The summary comes when the period that began with its first line
        ends, however late in it the lines were left out.
        """
        seen, clock, observer = self.observer(burst=1)
        observer({"log_format": "x"})
        clock.advance(9.5)
        observer({"log_format": "x"})
        clock.advance(0.49)
        self.assertEqual(len(seen), 1)
        clock.advance(0.01)
        self.assertEqual((len(seen), seen[-1]["ipcd_dropped"]), (2, 1))

    def test_summaryCountsInTheBurst(self) -> None:
        """
        A summary carried by an event is one of the new period's lines; the
        period's own summary is due again for the lines left out after it.
        """
        seen, clock, observer = self.observer(burst=2)
        for i in range(3):
            observer({"log_format": "x {i}", "i": i})
        clock.rightNow += 10  # the summary's call has not run
        for i in range(3, 7):
            observer({"log_format": "x {i}", "i": i})
        self.assertEqual(
            [formatEvent(e) for e in seen],
            ["x 0", "x 1", "1 similar log lines left out; x 3", "x 4"],
        )
        clock.advance(10)
        self.assertEqual(
            formatEvent(seen[-1]),
            "2 similar log lines left out in 10 s; the last: x 6",
        )
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_flush(self) -> None:
        """C{flush} says at once what was left out, and only once."""
        seen, clock, observer = self.observer(burst=1)
        for i in range(3):
            observer({"log_format": "x {i}", "i": i})
        observer.flush()
        self.assertEqual(
            formatEvent(seen[-1]),
            "2 similar log lines left out in 10 s; the last: x 2",
        )
        self.assertEqual(clock.getDelayedCalls(), [])
        observer.flush()
        clock.advance(10)
        self.assertEqual(len(seen), 2)


class NetworkPeerKeyTests(SynchronousTestCase):
    def test_prefixes(self) -> None:
        self.assertEqual(network_peer_key("10.1.2.3", 32, 64), "ip:10.1.2.3/32")
        self.assertEqual(network_peer_key("10.1.2.3", 24, 64), "ip:10.1.2.0/24")
        self.assertEqual(network_peer_key("2001:db8::1:2", 32, 64), "ip:2001:db8::/64")
        self.assertEqual(network_peer_key("::ffff:10.0.0.1", 32, 64), "ip:10.0.0.1/32")

    def test_linkLocalOnItsLink(self) -> None:
        """
        A zoned (link-local) peer is counted on its link: fe80::1 of one
        interface and fe80::1 of another are two hosts, and one of them
        used up the other's share (every link-local peer was ip:fe80::/64).
        """
        for host, key in (
            ("fe80::1%lo", "ip:fe80::%lo/64"),
            ("fe80::1%eth0", "ip:fe80::%eth0/64"),
            ("fe80::1%eth1", "ip:fe80::%eth1/64"),
            ("fe80::1:2:3:4%eth1", "ip:fe80::%eth1/64"),
            ("fe80::1", "ip:fe80::/64"),  # (udpd's: no zone)
        ):
            self.assertEqual(network_peer_key(host, 32, 64), key, host)
        self.assertEqual(
            network_peer_key("fe80::1%eth0", 32, 128), "ip:fe80::1%eth0/128"
        )

    def test_notAnAddress(self) -> None:
        """A peer address that is no IP address is its own key."""
        self.assertEqual(network_peer_key("peer-name", 32, 64), "ip:peer-name")

    def test_unixPeerUnknown(self) -> None:
        """A UNIX transport whose peer cannot be told is one peer, C{unknown}."""
        self.assertEqual(unix_peer_key(object()), "uid:unknown")

    def test_parsedOncePerAddress(self) -> None:
        """
        A connection's key is most of its admission's cost (ipaddress: about
        13 us): worked out once per address and prefixes; bounded.
        """
        parsed = parsed_addresses(self, limits_module._prefix_key)
        for _ in range(3):
            self.assertEqual(network_peer_key("192.0.2.7", 24, 64), "ip:192.0.2.0/24")
        self.assertEqual(network_peer_key("192.0.2.7", 32, 64), "ip:192.0.2.7/32")
        self.assertEqual(parsed, ["192.0.2.7"] * 2)
        for n in range(1100):
            network_peer_key(f"10.0.{n // 250}.{n % 250}", 32, 64)
        self.assertEqual(limits_module._prefix_key.cache_info().currsize, 1024)


@implementer(IHalfCloseableProtocol, IFileDescriptorReceiver)
class _Wanting(Protocol):
    """A protocol that takes half-closes and descriptors."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    def fileDescriptorReceived(self, descriptor: int) -> None:  # noqa: N802
        self.seen.append(descriptor)

    def readConnectionLost(self) -> None:  # noqa: N802
        self.seen.append("read lost")

    def writeConnectionLost(self) -> None:  # noqa: N802
        self.seen.append("write lost")

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        self.seen.append("lost")


class _Factory(Factory):
    noisy = False

    def __init__(self, protocol: type[Protocol]) -> None:
        self.protocol = protocol
        self.stopped = 0

    def stopFactory(self) -> None:  # noqa: N802
        self.stopped += 1


class LimitedProtocolTests(SynchronousTestCase):
    """A listener's connections through L{LimitedFactory}, on memory transports."""

    def setUp(self) -> None:
        self.limits = ConnectionLimits("ipc", 4, 1, Clock(), observer=[].append)

    def connect(self, protocol: type[Protocol] = _Wanting, key: str = "uid:1") -> Any:
        factory = LimitedFactory(
            _Factory(protocol), self.limits, peer_key=lambda transport: key
        )
        wrapper = factory.buildProtocol(None)
        wrapper.makeConnection(StringTransport())
        return wrapper

    def descriptor(self) -> int:
        read, write = os.pipe()
        os.close(write)
        self.addCleanup(lambda: _close_quietly(read))
        return read

    def test_halfCloseWanted(self) -> None:
        """Half-closes reach a wrapped protocol that takes them."""
        wrapper = self.connect()
        self.assertTrue(IHalfCloseableProtocol.providedBy(wrapper))
        wrapper.readConnectionLost()
        wrapper.writeConnectionLost()
        self.assertEqual(wrapper.wrappedProtocol.seen, ["read lost", "write lost"])
        self.assertFalse(IHalfCloseableProtocol.providedBy(self.connect(Protocol)))

    def test_descriptors(self) -> None:
        """
        An admitted connection's descriptors go to a wrapped protocol that
        takes them; any other's are closed.
        """
        wrapper = self.connect()
        fd = self.descriptor()
        wrapper.fileDescriptorReceived(fd)
        self.assertEqual(wrapper.wrappedProtocol.seen, [fd])
        os.fstat(fd)  # still open: the wrapped protocol's now
        for wrapper in (self.connect(Protocol, "uid:2"), self.connect()):
            fd = self.descriptor()
            wrapper.fileDescriptorReceived(fd)  # the second: refused (1 per peer)
            self.assertRaises(OSError, os.fstat, fd)
            self.assertEqual(getattr(wrapper.wrappedProtocol, "seen", []), [])

    def test_refusedHandOff(self) -> None:
        """A refused connection handed off gives nothing back when it ends."""
        self.connect()
        refused = self.connect()
        self.assertIsNone(refused.key)
        refused.handOff()()
        self.assertEqual(
            (self.limits.total, dict(self.limits.per_peer)), (1, {"uid:1": 1})
        )

    def test_lostOnce(self) -> None:
        """An admitted connection lost twice is released once."""
        wrapper = self.connect()
        wrapped = wrapper.wrappedProtocol
        wrapper.connectionLost(None)
        wrapper.connectionLost(None)
        self.assertEqual((self.limits.total, dict(self.limits.per_peer)), (0, {}))
        self.assertEqual(wrapped.seen, ["lost"])

    def test_releaseIsSmall(self) -> None:
        """What a relay keeps to give a place back has no dict of its own."""
        release = self.connect().handOff()
        self.assertFalse(hasattr(release, "__dict__"))
        release()
        self.assertEqual(self.limits.total, 0)

    def test_factoryQuietAndStopped(self) -> None:
        """
        Starting and stopping is not logged per listener; stopping stops
        the wrapped factory and says at once what the rate limit left out.
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        limits = ConnectionLimits("ipc", 4, 1, Clock(), observer=events.append)
        wrapped = _Factory(Protocol)
        factory = LimitedFactory(wrapped, limits)
        factory.doStart()
        for i in range(LOG_BURST + 2):
            limits.log.warn("line {i}", i=i)
        factory.doStop()
        self.assertEqual(wrapped.stopped, 1)
        self.assertEqual(
            [formatEvent(e) for e in events],
            [f"line {i}" for i in range(LOG_BURST)]
            + ["2 similar log lines left out in 10 s; the last: line 6"],
        )

    def test_endpointAttributes(self) -> None:
        """A limited endpoint shows the wrapped endpoint's attributes."""
        wrapped = Clock()
        wrapped.path = "/run/x"  # type: ignore[attr-defined]
        self.assertEqual(LimitedEndpoint(wrapped, self.limits).path, "/run/x")


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class SilentClientsTests(TestCase):
    @inlineCallbacks
    def test_timeoutsLoggedAtABoundedRate(self) -> Any:
        """50 clients that say nothing: each answered, few lines, all counted."""
        rundir = short_rundir(self)
        service = yield start_ipcd(
            self, make_config(rundir, ipcd={"lookup_timeout": 0.2})
        )
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        held = [connect_unix(os.path.join(rundir, "ipc")) for _ in range(50)]
        self.addCleanup(lambda: [sock.close() for sock in held])
        answers = yield deferToThread(lambda: [read_reply(s).data for s in held])
        self.assertEqual(set(answers), {b"ne no lookup received within 0.2 s"})
        counters = service.broker.counters
        self.assertEqual(counters["ipc: lookups timed out"], 50)
        lines = [formatEvent(e) for e in events if "sent no lookup" in formatEvent(e)]
        self.assertEqual(len(lines), LOG_BURST, "\n".join(lines))


class LookupLimitsTests(TestCase):
    """One uid at its maximum does not stop another uid's lookups."""

    @inlineCallbacks
    def test_oneUidAtItsMaximum(self) -> Any:
        needs_root()
        rundir = short_rundir(self)
        os.chmod(rundir, 0o755)
        service = yield start_ipcd(
            self, make_config(rundir, limits={"max_connections_per_peer": 8})
        )
        ipc = os.path.join(rundir, "ipc")
        for name in ("ipc", "pong"):
            os.chmod(os.path.join(rundir, name), 0o666)
        limits = service.broker.limits["ipc"]
        # Mallory (uid 61002) holds 8 silent lookups: her maximum.
        holder = _hold(self, ipc, 61002, 8)
        yield wait_until(lambda: limits.per_peer["uid:61002"] == 8, "8 held lookups")
        # Her ninth is refused at once, with the reason.
        answer = yield as_user(ipc, 61002, 61002, (), "pong;")
        self.assertEqual(
            answer,
            {"reply": "ne too many connections from uid:61002 (at most 8)", "fds": 0},
        )
        # Alice is served meanwhile.
        answer = yield as_user(ipc, 61001, 61001, (), "pong;")
        self.assertEqual(answer, {"reply": "ok", "fds": 1})
        # Once Mallory lets go, she is served again.
        holder.kill()
        holder.wait(TIMEOUT)
        yield wait_until(lambda: not limits.per_peer["uid:61002"], "held to end")
        answer = yield as_user(ipc, 61002, 61002, (), "pong;")
        self.assertEqual(answer, {"reply": "ok", "fds": 1})
        self.assertEqual(limits.total, 0)
        self.assertEqual(service.broker.counters["ipc: refused, per-peer limit"], 1)

    @inlineCallbacks
    def test_listenerMaximumQueuesNewClients(self) -> Any:
        """
        At pongd's maximum a new client waits in the backlog, and is served
        as soon as a connection ends.
        """
        rundir = short_rundir(self)
        service = yield start_ipcd(
            self, make_config(rundir, limits={"max_connections": 3})
        )
        path = os.path.join(rundir, "pong")
        limits = service.broker.limits["pong"]
        first = [connect_unix(path) for _ in range(3)]
        self.addCleanup(lambda: [sock.close() for sock in first])
        yield wait_until(lambda: limits.total == 3, "three connections")
        waiting = connect_unix(path)  # in the kernel's backlog
        self.addCleanup(waiting.close)
        waiting.sendall(encode(b"queued"))
        self.assertEqual(
            service.broker.counters["pong: paused at the connection limit"], 1
        )
        self.assertEqual(limits.total, 3)
        first[0].close()
        echo = yield deferToThread(recv_upto, waiting, 4 + len(b"queued"))
        self.assertEqual(echo, encode(b"queued"))


_HOLD = """
import os, socket, sys
path, uid, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
held = []
for _ in range(count):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    held.append(s)
sys.stdin.read()
"""


def _hold(case: TestCase, path: str, uid: int, count: int) -> Any:
    """A child under C{uid} holding C{count} idle connections to C{path}."""
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLD, path, str(uid), str(count)],
        stdin=subprocess.PIPE,
    )

    def stop() -> None:
        if child.poll() is None:
            child.kill()
        child.wait(TIMEOUT)
        child.stdin.close()

    case.addCleanup(stop)
    return child


class TcpLimitsTests(TestCase):
    """tcpd counts peers by address prefix, relays included."""

    @inlineCallbacks
    def test_perAddressAndRelays(self) -> Any:
        host = yield start_host(
            self, ["allow in pong"], limits={"max_connections_per_peer": 2}
        )
        limits = host.broker.limits["tcpd"]

        def relay(source: str) -> socket.socket:
            sock = socket.create_connection(
                ("127.0.0.1", host.port), timeout=TIMEOUT, source_address=(source, 0)
            )
            sock.sendall(b"pong")
            assert sock.recv(2) == b"ok"
            return sock

        def refused(source: str) -> bytes:
            with socket.create_connection(
                ("127.0.0.1", host.port), timeout=TIMEOUT, source_address=(source, 0)
            ) as sock:
                data = b""
                while chunk := sock.recv(4096):
                    data += chunk
                return data

        relays = []
        self.addCleanup(lambda: [sock.close() for sock in relays])
        for _ in range(2):
            relays.append((yield deferToThread(relay, "127.0.0.1")))
        lines = logged_lines(self)
        answer = yield deferToThread(refused, "127.0.0.1")
        # The word a remote peer is told; the reason (the limit, the key)
        # is the operator's.
        self.assertEqual(answer, b"ne busy")
        reason = "too many connections from ip:127.0.0.1/32 (at most 2)"
        assert_logged(self, lines, reason)
        # Another address is not affected.
        other = yield deferToThread(relay, "127.0.0.2")
        self.addCleanup(other.close)
        echo = yield deferToThread(bounce, other)
        self.assertEqual(echo, encode(b"bounce me"))
        # A relay counts until it ends.
        relays.pop().close()
        yield wait_until(
            lambda: limits.per_peer["ip:127.0.0.1/32"] == 1, "the relay to end"
        )
        again = yield deferToThread(relay, "127.0.0.1")
        self.addCleanup(again.close)


def _held_for(port: int) -> int:
    """
    This process's fds on TCP connections accepted on C{port} (their
    local port; a client's is another), from /proc/net/tcp and /proc/self/fd.
    """
    inodes = set()
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if int(local.split(":")[1], 16) == port and remote != "00000000:0000":
                inodes.add(f"socket:[{inode}]")
    return sum(1 for link in open_fds().values() if link in inodes)


class LingeringRefusalsTests(TestCase):
    """
    Refused connections wait for their refusal to be read (a grace), not
    counted under the limits: at most 8 per peer and 64 per listener wait
    so; the others are closed at once.
    """

    @inlineCallbacks
    def test_boundedPerPeerAndListener(self) -> Any:
        # A grace that cannot pass during the test, however slow the machine.
        self.patch(limits_module, "REFUSAL_GRACE", 600.0)
        host = yield start_host(
            self, handshake_timeout=600, limits={"max_connections_per_peer": 1}
        )
        counters = host.broker.counters
        clients: list[socket.socket] = []
        self.addCleanup(lambda: [sock.close() for sock in clients])

        def connect(source: str) -> None:
            sock = socket.socket()
            clients.append(sock)
            sock.bind((source, 0))
            sock.connect(("127.0.0.1", host.port))

        @inlineCallbacks
        def flood(source: str, refused: int) -> Any:
            # One admitted (it holds its place: it sends nothing), then
            # refused ones that read nothing and stay open.
            for _ in range(1 + refused):
                connect(source)
            total = counters["tcpd: refused, per-peer limit"] + refused
            yield wait_until(
                lambda: counters["tcpd: refused, per-peer limit"] == total,
                f"{refused} refusals",
            )

        @inlineCallbacks
        def held(expected: int) -> Any:
            # Those past the bounds are aborted, their fds closed a reactor
            # turn after their refusal is counted: the count only falls.
            yield wait_until(
                lambda: _held_for(host.port) <= expected,
                f"at most {expected} connections held",
            )
            self.assertEqual(_held_for(host.port), expected)

        yield flood("127.0.0.1", 40)
        yield held(1 + 8)
        # Eleven more addresses, 8 waiting each would be 96: 64 wait.
        for last in range(2, 13):
            yield flood(f"127.0.0.{last}", 10)
        yield held(12 + 64)


class TlsRefusalTests(TestCase):
    """
    On websocketd's C{ssl:} listener the limits sit inside TLS: a refused
    peer has its refusal over TLS, or, silent, is cut after the grace.
    """

    @inlineCallbacks
    def test_overThePerPeerLimit(self) -> Any:
        _ca, cert, key = make_ca(short_rundir(self, "ipcd-refusal-ca-"))
        listen = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        host = yield start_ws_host(self, listen=listen, open_handshake_timeout=600.0)
        limits = host.broker.limits_for("websocketd")
        limits.max_per_peer = 1
        before = yield fd_baseline()
        admitted = socket.create_connection(("127.0.0.1", host.port), TIMEOUT)
        self.addCleanup(admitted.close)
        yield wait_until(lambda: limits.total == 1, "the first peer admitted")

        def refused_over_tls() -> bytes:
            context = unverified_context()
            with socket.create_connection(("127.0.0.1", host.port), TIMEOUT) as raw:
                with context.wrap_socket(raw) as secured:
                    return recv_eof(secured)

        answer = yield deferToThread(refused_over_tls)
        self.assertTrue(answer.startswith(b"HTTP/1.1 503 "), answer)
        silent = socket.create_connection(("127.0.0.1", host.port), TIMEOUT)
        self.addCleanup(silent.close)
        answer = yield deferToThread(recv_eof, silent)  # cut after the grace
        self.assertEqual(answer, b"")
        refused = host.broker.counters["websocketd: refused, per-peer limit"]
        self.assertEqual(refused, 2)
        self.assertEqual(limits.total, 1)  # refused ones are never counted
        admitted.close()
        silent.close()
        yield wait_until(lambda: limits.total == 0, "the admitted peer let go")
        yield assert_no_fd_leak(before)


class AcceptErrorTests(TestCase):
    """Out of file descriptors: ipcd keeps serving and logs at a bounded rate."""

    @inlineCallbacks
    def test_emfileFlood(self) -> Any:
        rundir = short_rundir(self)
        config = os.path.join(short_rundir(self, "ipcd-conf-"), "ipcd.toml")
        with open(config, "w") as f:
            f.write(
                "[limits]\nmax_connections = 100000\n"
                "max_connections_per_peer = 100000\n"
                "[ipcd]\nlookup_timeout = 60\n"
            )
        log = os.path.join(rundir + ".log")
        self.addCleanup(lambda: os.path.exists(log) and os.unlink(log))
        limit = 64

        def low_fd_limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        process = spawn(
            self,
            [
                "-m",
                "ipcd.scripts.ipcd",
                "--config",
                config,
                "--rundir",
                rundir,
                "--no-tcp",
                "--no-ws",
                "--no-pongd",
            ],
            log,
            python_env(),
            rundir,
            preexec_fn=low_fd_limit,
        )
        ipc = os.path.join(rundir, "ipc")
        # Listening, not just bound: the file exists a moment before listen().
        yield wait_until(lambda: accepts(ipc), "ipcd to listen")
        held: list[socket.socket] = []
        self.addCleanup(lambda: [sock.close() for sock in held])

        def flood() -> None:
            for _ in range(3 * limit):
                for _ in range(1000):  # a full backlog: wait for accepts
                    try:
                        held.append(connect_unix(ipc))
                        break
                    except BlockingIOError:
                        time.sleep(0.01)

        yield deferToThread(flood)
        # Each connection past the limit is accepted and closed by Twisted's
        # reserved descriptor, and each would log; give it time to try all.
        yield wait_until(
            lambda: read_text(log).count("EMFILE") > 0, "ipcd to run out of fds"
        )
        for sock in held:
            sock.close()
        held.clear()

        def served() -> bool:
            # Until ipcd has seen the flood's connections end, a new one may
            # still meet the limit (accepted and closed): try again then.
            try:
                with connect_unix(ipc) as sock:
                    sock.sendall(encode(b"nosuch;"))
                    return read_reply(sock).data.startswith(b"ne no route")
            except (ConnectionResetError, BrokenPipeError):
                return False

        for _ in range(200):  # bounded: 10 s
            if (yield deferToThread(served)):
                break
            yield deferLater(reactor, 0.05, lambda: None)
        else:
            self.fail("ipcd did not serve a lookup again after the flood")
        self.assertIsNone(process.poll(), "ipcd is still running")
        lines = [line for line in read_text(log).splitlines() if "EMFILE" in line]
        self.assertLessEqual(len(lines), LOG_BURST + 1, "\n".join(lines))
