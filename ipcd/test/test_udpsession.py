"""
One udpd session in memory: a L{Session} whose datagrams go to a list, its
L{SessionStream} on a C{StringTransport}, time on a C{Clock}.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from ipcd.daemons.udp import wire as udpwire
from ipcd.daemons.udp.session import (
    CLOSE_GRACE,
    GATHERED_AT_MOST,
    OUTBOX_BOUND,
    Session,
    SessionStats,
    SessionStream,
)
from ipcd.wire import encode

SESSION = b"S" * 8


class SessionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.sent: list[bytes] = []
        self.registry: set[SessionStats] = set()
        self.ended: list[Session] = []
        self.stats = SessionStats(direction="out", registry=self.registry)
        self.session = Session(
            SESSION,
            self.sent.append,
            self.stats,
            self.clock,
            idle_timeout=10.0,
            max_datagram=100,
            on_end=self.ended.append,
        )
        self.stream = SessionStream()
        self.stream.maxMessageSize = self.session.max_payload
        self.stream.idleTimeout = 0
        self.transport = StringTransport()
        self.stream.makeConnection(self.transport)
        self.session.attach(self.stream)

    def receive(self, sequence: int, payload: bytes) -> None:
        datagram = udpwire.data(SESSION, sequence, payload)
        self.session.datagram(udpwire.decode(datagram), len(datagram))

    def test_messagesBecomeDatagrams(self) -> None:
        """Each framed message read is one DATA, numbered from 0."""
        self.stream.dataReceived(encode(b"one") + encode(b"two")[:5])
        self.stream.dataReceived(encode(b"two")[5:])
        self.assertEqual(
            [udpwire.decode(d) for d in self.sent],
            [udpwire.Data(SESSION, 0, b"one"), udpwire.Data(SESSION, 1, b"two")],
        )
        self.assertEqual((self.stats.sent, self.stats.forward), (2, 6))
        self.assertIn(self.stats, self.registry)

    def test_datagramsBecomeMessages(self) -> None:
        self.receive(0, b"hello")
        self.receive(0, b"hello")  # a duplicate
        self.receive(1, b"")
        self.assertEqual(self.transport.value(), encode(b"hello") + encode(b""))
        self.assertEqual((self.stats.received, self.stats.dropped), (2, 1))
        self.assertEqual(self.stats.backward, 5)

    def test_congestedStreamDrops(self) -> None:
        """While the stream's buffer is full, datagrams are dropped, counted."""
        self.stream.pauseProducing()
        self.receive(0, b"lost")
        self.assertEqual(self.transport.value(), b"")
        self.assertEqual(self.stats.dropped, 1)
        self.stream.resumeProducing()
        self.receive(1, b"kept")
        self.assertEqual(self.transport.value(), encode(b"kept"))

    def test_oversizedMessageEndsSession(self) -> None:
        """A message over the payload limit: a CLOSE, the stream closed."""
        self.stream.dataReceived(encode(b"x" * 83))  # 83 + 17: a full datagram
        self.assertEqual([len(d) for d in self.sent], [100])
        self.stream.dataReceived(encode(b"x" * 84))
        self.assertEqual(self.sent[1:], [udpwire.close(SESSION)])
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.ended, [self.session])
        self.assertNotIn(self.stats, self.registry)

    def test_idleEnds(self) -> None:
        """No datagram either way for idle_timeout: a CLOSE, the end."""
        self.clock.advance(6)
        self.receive(0, b"alive")
        self.clock.advance(6)
        self.assertEqual(self.ended, [])
        self.clock.advance(4)
        self.assertEqual(self.sent, [udpwire.close(SESSION)])
        self.assertEqual(self.ended, [self.session])
        self.assertTrue(self.transport.disconnecting)

    def test_peerGoneWhileThisSideWrites(self) -> None:
        """
        The stream writes every second and the peer sends nothing: a PING
        at each quarter of idle_timeout of the peer's silence, then, at
        idle_timeout, a CLOSE and the end, however recent the writes.
        """
        for _ in range(9):
            self.clock.advance(1)
            self.stream.dataReceived(encode(b"tick"))
        pings = [d for d in self.sent if d == udpwire.ping(SESSION)]
        self.assertEqual(len(pings), 3)  # at 2.5, 5 and 7.5 s
        self.assertEqual(self.ended, [])
        self.clock.advance(1)
        self.assertEqual(self.sent[-1], udpwire.close(SESSION))
        self.assertEqual(self.ended, [self.session])

    def test_pongKeepsAOneWaySession(self) -> None:
        """A PONG is the peer heard: a session that only sends lives on."""
        seen = 0
        for _ in range(40):
            self.clock.advance(1)
            if udpwire.ping(SESSION) in self.sent[seen:]:
                self.session.datagram(udpwire.Pong(SESSION), 9)
            seen = len(self.sent)
            self.stream.dataReceived(encode(b"tick"))
        self.assertEqual(self.ended, [])
        self.assertIn(udpwire.ping(SESSION), self.sent)

    def test_pingAnswered(self) -> None:
        """A PING gets a PONG at once, and is the peer heard."""
        self.session.datagram(udpwire.Ping(SESSION), 9)
        self.assertEqual(self.sent, [udpwire.pong(SESSION)])

    def test_idleSessionNotPinged(self) -> None:
        """With no DATA either way, nobody is asked: it idles out as before."""
        self.clock.advance(10)
        self.assertEqual(self.sent, [udpwire.close(SESSION)])

    def test_peerClose(self) -> None:
        """
        A CLOSE from the peer ends the session without answering it; the
        idle deadline is gone, and the stream's grace ends with the stream.
        """
        self.session.datagram(udpwire.Close(SESSION), 9)
        self.assertEqual(self.sent, [])
        self.assertEqual(self.ended, [self.session])
        [cut] = self.clock.getDelayedCalls()
        self.assertEqual(cut.time, CLOSE_GRACE)
        self.stream.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cutAfterTheGrace(self) -> None:
        """A stream that does not close in CLOSE_GRACE seconds is cut."""
        cut: list[bool] = []
        self.transport.abortConnection = lambda: cut.append(True)  # type: ignore[method-assign]
        self.session.end("test")
        self.clock.advance(CLOSE_GRACE - 0.1)
        self.assertEqual(cut, [])
        self.clock.advance(0.1)
        self.assertEqual(cut, [True])

    def test_streamLostEndsOnce(self) -> None:
        self.stream.connectionLost(None)
        self.session.end("again")
        self.assertEqual(self.sent, [udpwire.close(SESSION)])
        self.assertEqual(self.ended, [self.session])

    def test_sendErrorCounted(self) -> None:
        """A full socket buffer loses the datagram, as UDP does."""

        def full(datagram: bytes) -> None:
            raise BlockingIOError()

        self.session._send = full
        self.stream.dataReceived(encode(b"x"))
        self.assertEqual((self.stats.sent, self.stats.dropped), (0, 1))

    def test_spoofed(self) -> None:
        self.session.spoofed()
        self.assertEqual(self.stats.as_dict()["datagrams"]["dropped"], 1)


class BatchTests(SessionTests):
    """The same session, its datagrams sent and delivered in batches."""

    def setUp(self) -> None:
        super().setUp()
        self.batches: list[list[bytes]] = []
        self.lose: set[int] = set()  # sequence numbers send_all loses

        def send_all(datagrams: list[bytes]) -> list[bytes]:
            self.batches.append(datagrams)
            lost = [d for d in datagrams if udpwire.decode(d).sequence in self.lose]
            self.sent.extend(d for d in datagrams if d not in lost)
            return lost

        self.session._send_all = send_all

    def test_messagesOfAReadSentTogether(self) -> None:
        """
        The messages of one read of the stream: one call of send_all (a
        lone one goes out by C{send}).
        """
        self.stream.dataReceived(encode(b"one") + encode(b"two") + encode(b"3"))
        self.stream.dataReceived(encode(b"four"))
        self.assertEqual([len(b) for b in self.batches], [3])
        self.assertEqual(
            [udpwire.decode(d).payload for d in self.sent],
            [b"one", b"two", b"3", b"four"],
        )
        self.assertEqual((self.stats.sent, self.stats.forward), (4, 11))

    def test_lostCounted(self) -> None:
        """What send_all loses is counted as dropped, its bytes not as sent."""
        self.lose = {1}
        self.stream.dataReceived(encode(b"one") + encode(b"two") + encode(b"3"))
        self.assertEqual(
            (self.stats.sent, self.stats.dropped, self.stats.forward), (2, 1, 4)
        )

    def test_readOfTinyMessages(self) -> None:
        """A read holds GATHERED_AT_MOST datagrams at most before sending."""
        count = 2 * GATHERED_AT_MOST + 10
        self.stream.dataReceived(encode(b"") * count)
        self.assertEqual(
            [len(b) for b in self.batches],
            [GATHERED_AT_MOST, GATHERED_AT_MOST, 10],
        )
        self.assertEqual(
            [udpwire.decode(d).sequence for d in self.sent], list(range(count))
        )

    def test_heldSentBeforeTheClose(self) -> None:
        """A read that ends the session sends what it held, then the CLOSE."""
        self.stream.dataReceived(encode(b"a") + encode(b"b") + encode(b"x" * 84))
        self.assertEqual(
            self.sent,
            [
                udpwire.data(SESSION, 0, b"a"),
                udpwire.data(SESSION, 1, b"b"),
                udpwire.close(SESSION),
            ],
        )

    def test_endedWhileSendingWhatWasHeld(self) -> None:
        """
        Sending what a read held can end the session (the peer's refusal,
        on the client's connected socket): the end runs once.
        """
        self.session.gather()  # as a read of the stream does
        self.session.message(b"a")
        self.session.message(b"b")

        def refused(datagrams: list[bytes]) -> list[bytes]:
            self.session.end("refused", notify=False)
            return datagrams

        self.session._send_all = refused
        self.session.end("closing")
        self.assertEqual(self.ended, [self.session])
        self.assertEqual(self.sent, [])
        self.assertNotIn(self.stats, self.registry)

    def test_deliveriesWaitForTheRead(self) -> None:
        """
        With a reader's C{pending} list: the messages of the datagrams read
        wait in the stream, listed once, until the read is done.
        """
        self.session.pending = pending = []
        self.receive(0, b"first")
        self.receive(1, b"second")
        self.assertEqual((self.transport.value(), pending), (b"", [self.stream]))
        self.stream.send_waiting()
        self.assertEqual(self.transport.value(), encode(b"first") + encode(b"second"))

    def test_waitingBounded(self) -> None:
        """
        No more than OUTBOX_BOUND bytes wait: past it, they are written at
        once, where a full stream can say it is congested.
        """
        self.session.max_datagram = udpwire.MAX_UDP_PAYLOAD
        self.session.pending = []
        payload = b"x" * (OUTBOX_BOUND // 2)
        self.receive(0, payload)
        self.assertEqual(self.transport.value(), b"")
        self.receive(1, payload)
        self.assertEqual(self.transport.value(), encode(payload) * 2)

    def test_endWritesWhatWaits(self) -> None:
        """Messages waiting for the read's end are written before the close."""
        self.session.pending = []
        self.receive(0, b"last words")
        self.session.end("test")
        self.assertEqual(self.transport.value(), encode(b"last words"))
        self.assertTrue(self.transport.disconnecting)
