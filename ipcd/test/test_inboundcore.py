"""
Each daemon's inbound handshake driven through the shared core
(L{ipcd.inboundcore}) without sockets: the events a daemon's adapter feeds
it (bytes, a request, the time, the broker's answer, the peer going) and
the actions it gives back, in each daemon's own framing of the answer.
"""

from __future__ import annotations

from typing import Any

from autobahn.websocket.types import ConnectionDeny
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from ipcd import wire
from ipcd.daemons.tcp import TcpInbound
from ipcd.daemons.tls.inbound import TlsInbound
from ipcd.daemons.udp import wire as udpwire
from ipcd.daemons.udp.server import HelloAnswers
from ipcd.daemons.websocket.server import UpgradeAnswers
from ipcd.errors import BUSY, NO_SUCH_SERVICE, REFUSED, UNAVAILABLE, Refused
from ipcd.identity import Peer, remote_peer
from ipcd.inbound import ControlHandshake
from ipcd.inboundcore import (
    MAX_EARLY,
    MAX_HANDSHAKE,
    STOP,
    Abort,
    Ask,
    Cancel,
    Deadline,
    Discard,
    Failed,
    InboundHandshake,
    Join,
    Pause,
    Refuse,
    Unexpected,
    request_text,
)
from ipcd.relay import READ_SIZE

PEER = remote_peer("192.0.2.7", 40000)
WHO = {"who": "192.0.2.7:40000"}
NOW, TIMEOUT = 1000.0, 5.0
NONCE, HELLO_SIZE = b"n" * 8, udpwire.HELLO_SIZE


class Socket:
    """What the broker connected (the core only passes it on)."""


def tcpd() -> InboundHandshake:
    """tcpd's handshake, framed as its adapter frames it."""
    return InboundHandshake(PEER, TcpInbound(None).framing(), NOW, TIMEOUT)


def tlsd() -> InboundHandshake:
    """tlsd's: tcpd's request, after a TLS handshake, under one deadline."""
    inbound = TlsInbound(None)
    return InboundHandshake(PEER, inbound.framing(), NOW, TIMEOUT, inbound.layer)


def control() -> InboundHandshake:
    """C{RUNDIR/SCHEME}'s: a framed URI, from a local client."""
    control = ControlHandshake(None)
    return InboundHandshake(
        PEER, control.framing(), NOW, TIMEOUT, remote=control.remote
    )


def websocketd() -> InboundHandshake:
    """websocketd's: the upgrade's path (autobahn keeps its own deadline)."""
    return InboundHandshake(PEER, UpgradeAnswers())


def udpd() -> InboundHandshake:
    """udpd's: a HELLO's service (no deadline: the broker's connect one)."""
    return InboundHandshake(PEER, HelloAnswers(NONCE, HELLO_SIZE))


class TcpdTests(SynchronousTestCase):
    """tcpd: upstream's raw name or a framed one, answered in its form."""

    def test_rawSuccess(self) -> None:
        core = tcpd()
        self.assertEqual(core.started(), [Deadline(TIMEOUT)])
        self.assertEqual(core.received(b"pong"), [Deadline(None), Ask("pong")])
        sock = Socket()
        self.assertEqual(core.opened(sock), [Join(sock, b"ok", b"")])

    def test_framedSuccessWithEarlyBytes(self) -> None:
        """Bytes after the request are the service's, in order."""
        core = tcpd()
        first = core.received(wire.encode(b"pong") + wire.encode(b"early"))
        self.assertEqual(first, [Deadline(None), Ask("pong")])
        self.assertEqual(core.received(b"late"), [])
        sock = Socket()
        [join] = core.opened(sock)
        self.assertEqual(join.greeting, wire.encode(b"ok"))
        self.assertEqual(join.early, wire.encode(b"early") + b"late")

    def test_framedInPieces(self) -> None:
        core = tcpd()
        request = wire.encode(b"pong")
        for byte in request[:-1]:
            self.assertEqual(core.received(bytes([byte])), [])
        self.assertEqual(core.received(request[-1:]), [Deadline(None), Ask("pong")])

    def test_refusalInTheRequestsForm(self) -> None:
        raw, framed = tcpd(), tcpd()
        raw.received(b"secret")
        framed.received(wire.encode(b"secret"))
        reason = "denied by default"
        self.assertEqual(
            raw.failed(Refused(reason, public=REFUSED)),
            [Refuse(b"ne refused", reason)],
        )
        self.assertEqual(
            framed.failed(Failure(Refused(reason, public=REFUSED))),
            [Refuse(wire.encode(b"ne refused"), reason)],
        )
        self.assertEqual(raw.opened(Socket())[0].__class__, Discard)

    def test_answeredEitherWay(self) -> None:
        """What a broker's Deferred gives, a socket or a Failure, is told apart."""
        accepted, refused = tcpd(), tcpd()
        accepted.received(b"pong")
        refused.received(b"pong")
        sock = Socket()
        self.assertEqual(accepted.answered(sock), [Join(sock, b"ok", b"")])
        [refuse] = refused.answered(Failure(Refused("denied by default")))
        self.assertEqual(refuse.answer, b"ne unavailable")  # (unless said)

    def test_remotePeerToldOnlyThePublicText(self) -> None:
        """
        The broker's reason (local paths, rules) stays in the Refuse for the
        log; a remote peer is told its public text, one of four.
        """
        for public in (REFUSED, NO_SUCH_SERVICE, UNAVAILABLE, BUSY):
            core = tcpd()
            core.received(b"pong")
            reason = "no route to service 'pong': /run/ipc/pong does not exist"
            [refuse] = core.failed(Refused(reason, public=public))
            self.assertEqual(refuse, Refuse(b"ne " + public.encode(), reason))

    def test_ownReasonsSaidWhole(self) -> None:
        """The core's own reasons name only the peer's bytes: said whole."""
        refuse = tcpd().received("pöng".encode())[-1]
        self.assertEqual(refuse.answer, b"ne request is not ASCII")

    def test_internalError(self) -> None:
        """Anything but a refusal is logged and refused as ipcd's fault."""
        core = tcpd()
        core.received(b"pong")
        error = ZeroDivisionError("boom")
        self.assertEqual(
            core.failed(error),
            [Unexpected(error), Refuse(b"ne internal error", "internal error")],
        )

    def test_tooLong(self) -> None:
        core = tcpd()
        answer = wire.encode(b"ne request of 256 bytes is too long")
        self.assertEqual(
            core.received(wire.HEADER.pack(256)),
            [Deadline(None), Refuse(answer, "request of 256 bytes is too long")],
        )
        self.assertEqual(core.received(b"more"), [])  # refused: nothing more

    def test_longestName(self) -> None:
        """A framed name of 255 bytes is asked for (256: L{test_tooLong})."""
        name = "a" * 255
        self.assertEqual(
            tcpd().received(wire.encode(name.encode())), [Deadline(None), Ask(name)]
        )

    def test_requested(self) -> None:
        """What the peer asked for, kept for the adapter's log lines."""
        core = tcpd()
        self.assertEqual(core.requested, "")
        core.received(b"pong")
        self.assertEqual(core.requested, "pong")

    def test_eventsOnceDone(self) -> None:
        """
        Once a socket came (opened or answered), the peer going cancels
        nothing, a late failure refuses nothing, and a second request is
        not asked: each says so with no action.
        """
        for answer in ("opened", "answered"):
            core = tcpd()
            core.received(b"pong")
            getattr(core, answer)(Socket())
            self.assertEqual(core.failed(Refused("late")), [], answer)
            self.assertEqual(core.asked("again"), [], answer)
            self.assertEqual(core.refuse("late"), [], answer)
            self.assertEqual(core.lost(), [], answer)
            sock = Socket()
            self.assertEqual(core.answered(sock), [Discard(sock)], answer)

    def test_notAscii(self) -> None:
        [_, refuse] = tcpd().received("pöng".encode())
        self.assertEqual(
            refuse, Refuse(b"ne request is not ASCII", "request is not ASCII")
        )

    def test_deadline(self) -> None:
        core = tcpd()
        core.received(b"\0\0\0\x04po")
        self.assertEqual(core.tick(NOW + TIMEOUT - 0.001), [])
        self.assertEqual(
            core.tick(NOW + TIMEOUT),
            [
                Failed(
                    "handshakes timed out", "dropping {who}: no request in time", WHO
                ),
                Deadline(None),
                Refuse(wire.encode(b"ne handshake timed out"), "handshake timed out"),
            ],
        )
        self.assertEqual(core.tick(NOW + 2 * TIMEOUT), [])  # said once

    def test_noDeadlineWhileTheBrokerAnswers(self) -> None:
        """The handshake deadline is the peer's: the broker has its own."""
        core = tcpd()
        core.received(b"pong")
        self.assertEqual(core.tick(NOW + 10 * TIMEOUT), [])

    def test_earlyBytesBounded(self) -> None:
        core = tcpd()
        core.received(b"pong")
        self.assertEqual(MAX_EARLY, READ_SIZE)  # a relay's read
        self.assertEqual(core.received(b"x" * (MAX_EARLY - 1)), [])
        self.assertEqual(core.received(b"x"), [Pause()])
        [join] = core.opened(Socket())
        self.assertEqual(len(join.early), MAX_EARLY)

    def test_goneWhileAsking(self) -> None:
        """The asking is cancelled; a socket that comes anyway is closed."""
        core = tcpd()
        core.received(b"pong")
        self.assertEqual(core.lost(), [Cancel()])
        sock = Socket()
        self.assertEqual(core.opened(sock), [Discard(sock)])
        self.assertEqual(core.failed(Refused("late")), [])
        self.assertEqual(core.failed(ZeroDivisionError()), [])  # not logged

    def test_goneWhileReading(self) -> None:
        core = tcpd()
        core.received(b"\0\0")
        self.assertEqual(core.lost(), [Deadline(None)])
        self.assertEqual(core.tick(NOW + TIMEOUT), [])


class TlsdTests(SynchronousTestCase):
    """tlsd: a TLS handshake first, then tcpd's request, one deadline."""

    def test_tlsHandshakeDeadline(self) -> None:
        """No TLS handshake in time: dropped, answering nothing."""
        core = tlsd()
        self.assertTrue(core.securing)
        self.assertEqual(
            core.tick(NOW + TIMEOUT),
            [
                Failed(
                    "TLS handshakes timed out",
                    "dropping {who}: no TLS handshake in time",
                    WHO,
                ),
                Abort(),
            ],
        )
        self.assertFalse(core.securing)  # said: not a failed handshake besides

    def test_securedPeerAsks(self) -> None:
        """The broker is asked for the peer as TLS showed it (its labels)."""
        core = tlsd()
        shown = Peer(f"{PEER} (psk:alice)", PEER.labels | {"psk:alice"})
        self.assertEqual(core.secured(shown), [])
        self.assertFalse(core.securing)
        self.assertEqual(core.received(b"pong"), [Deadline(None), Ask("pong")])
        self.assertIs(core.who, shown)
        sock = Socket()
        self.assertEqual(core.opened(sock), [Join(sock, b"ok", b"")])

    def test_nothingAskedBeforeTheTlsHandshake(self) -> None:
        """Bytes before the peer is known wait for its TLS labels."""
        core = tlsd()
        self.assertEqual(core.received(b"pong"), [])
        shown = Peer(f"{PEER} (psk:alice)", PEER.labels | {"psk:alice"})
        self.assertEqual(core.secured(shown), [STOP, Ask("pong")])
        self.assertIs(core.who, shown)

    def test_requestDeadlineAfterTls(self) -> None:
        core = tlsd()
        core.secured(PEER)
        [failed, _, refuse] = core.tick(NOW + TIMEOUT)
        self.assertEqual(failed.counter, "handshakes timed out")
        self.assertEqual(refuse.answer, b"ne handshake timed out")

    def test_clientAuthenticationRequired(self) -> None:
        """tlsd's own refusal, in tcpd's (raw) form."""
        core = tlsd()
        core.secured(PEER)
        reason = "client authentication required"
        self.assertEqual(
            core.refuse(reason),
            [Deadline(None), Refuse(b"ne client authentication required", reason)],
        )
        self.assertEqual(core.received(b"pong"), [])  # never asked


class ControlTests(SynchronousTestCase):
    """C{RUNDIR/SCHEME}: upstream's framed URI, up to 4096 bytes."""

    def test_uri(self) -> None:
        core = control()
        uri = b"tcp://127.0.0.1:9/pong"
        self.assertEqual(
            core.received(wire.encode(uri)), [Deadline(None), Ask(uri.decode())]
        )
        self.assertEqual(
            core.opened(sock := Socket()), [Join(sock, wire.encode(b"ok"), b"")]
        )

    def test_longestHandshake(self) -> None:
        """
        A URI of 4096 bytes, in pieces (4096 bytes held, not yet too many),
        is asked for; one announced longer is refused.
        """
        uri = b"x" * MAX_HANDSHAKE
        data = wire.encode(uri)
        core = control()
        self.assertEqual(core.received(data[:MAX_HANDSHAKE]), [])
        self.assertEqual(
            core.received(data[MAX_HANDSHAKE:]), [Deadline(None), Ask(uri.decode())]
        )
        [_, refuse] = control().received(wire.HEADER.pack(MAX_HANDSHAKE + 1))
        self.assertEqual(refuse.reason, "request of 4097 bytes is too long")

    def test_handshakeTooLong(self) -> None:
        core = control()
        [_, refuse] = core.received(
            wire.HEADER.pack(MAX_HANDSHAKE) + bytes(MAX_HANDSHAKE - 3)
        )
        self.assertEqual(refuse.answer, wire.encode(b"ne handshake too long"))

    def test_localClientToldTheReason(self) -> None:
        """A local client (upstream's ipcd) is on the host: told the reason."""
        core = control()
        core.received(wire.encode(b"tcp://127.0.0.1:9/pong"))
        reason = "cannot connect to tcpd at 127.0.0.1:9: connection refused"
        [refuse] = core.failed(Refused(reason))
        self.assertEqual(refuse.answer, wire.encode(b"ne " + reason.encode()))


class BeforeTheLayerTests(SynchronousTestCase):
    """
    Bytes that come before the transport's own handshake is done (no TLS
    stack delivers any): held up to MAX_HANDSHAKE, read once it is done.
    """

    def core(self) -> InboundHandshake:
        # A framed URI (up to MAX_HANDSHAKE) behind a layer: the bound shows.
        return InboundHandshake(PEER, ControlHandshake(None).framing(), NOW, 5, "TLS")

    def test_heldUpToTheBound(self) -> None:
        """While 4096 bytes are held, more are still taken."""
        core = self.core()
        size = MAX_HANDSHAKE - wire.HEADER.size + 1
        data = wire.encode(b"x" * size)
        self.assertEqual(core.received(data[:MAX_HANDSHAKE]), [])
        self.assertEqual(core.received(data[MAX_HANDSHAKE:]), [])
        self.assertEqual(core.secured(PEER), [Deadline(None), Ask("x" * size)])

    def test_notPastIt(self) -> None:
        """Past 4096 held, the rest is dropped: the handshake is too long."""
        core = self.core()
        data = wire.encode(b"x" * (MAX_HANDSHAKE - wire.HEADER.size + 2))
        self.assertEqual(core.received(data[: MAX_HANDSHAKE + 1]), [])
        self.assertEqual(core.received(data[MAX_HANDSHAKE + 1 :]), [])
        [_, refuse] = core.secured(PEER)
        self.assertEqual(refuse.reason, "handshake too long")
        self.assertEqual(core.secured(PEER), [])  # (secured once)


class NoDeadlineTests(SynchronousTestCase):
    """A handshake without a deadline of its own (websocketd's, udpd's)."""

    def test_tickAndLoss(self) -> None:
        """The time changes nothing; a peer going stops no timer."""
        for make in (websocketd, udpd):
            core = make()
            self.assertEqual(core.tick(NOW), [])
            self.assertEqual(core.lost(), [])


class RequestTextTests(SynchronousTestCase):
    def test_asciiOrRefused(self) -> None:
        """L{request_text} (docs/api.rst): the text, or a refusal."""
        self.assertEqual(request_text(b"pong"), "pong")
        error = self.assertRaises(Refused, request_text, b"p\xf6ng")
        self.assertEqual(error.reason, "request is not ASCII")


class WebSocketdTests(SynchronousTestCase):
    """websocketd: the upgrade's path, answered with an HTTP status."""

    def test_success(self) -> None:
        core = websocketd()
        self.assertEqual(core.started(), [])  # autobahn's deadline
        self.assertEqual(core.asked("pong"), [Ask("pong")])
        sock = Socket()
        self.assertEqual(core.opened(sock), [Join(sock, None, b"")])

    def deny(self, error: Any) -> ConnectionDeny:
        core = websocketd()
        core.asked("pong")
        refuse = core.failed(error)[-1]
        self.assertIsInstance(refuse, Refuse)
        deny: ConnectionDeny = refuse.answer
        return deny

    def test_noSuchService(self) -> None:
        deny = self.deny(Refused("no route to service 'pong'", public=NO_SUCH_SERVICE))
        self.assertEqual((deny.code, deny.reason), (404, "no such service"))

    def test_denied(self) -> None:
        deny = self.deny(Refused("denied by rule 2", public=REFUSED))
        self.assertEqual((deny.code, deny.reason), (403, "refused"))

    def test_reasonFitsAStatusLine(self) -> None:
        """A peer's name in the reason cannot add a header or run on."""
        deny = self.deny(Refused("no\r\nSet-Cookie: x " + "y" * 300))
        self.assertNotIn("\r", deny.reason)
        self.assertNotIn("\n", deny.reason)
        self.assertLessEqual(len(deny.reason), 200)

    def test_internalError(self) -> None:
        deny = self.deny(ZeroDivisionError())
        self.assertEqual((deny.code, deny.reason), (500, "internal error"))

    def test_goneWhileAsking(self) -> None:
        core = websocketd()
        core.asked("pong")
        self.assertEqual(core.lost(), [Cancel()])
        sock = Socket()
        self.assertEqual(core.opened(sock), [Discard(sock)])


class UdpdTests(SynchronousTestCase):
    """udpd: a HELLO's service, answered with an OK or a NO datagram."""

    def test_success(self) -> None:
        core = udpd()
        self.assertEqual(core.started(), [])
        self.assertEqual(core.request(b"pong"), [Ask("pong")])
        sock = Socket()
        [join] = core.opened(sock)
        self.assertIs(join.sock, sock)
        session = b"s" * udpwire.ID_SIZE
        # The OK, once udpd has the session's id.
        self.assertEqual(
            udpwire.decode(join.greeting(session)), udpwire.Accepted(NONCE, session)
        )

    def test_refusal(self) -> None:
        core = udpd()
        core.request(b"pong")
        reason = "denied by default"
        [refuse] = core.failed(Refused(reason, public=REFUSED))
        self.assertEqual(udpwire.decode(refuse.answer), udpwire.Refusal(NONCE, REFUSED))
        self.assertLessEqual(len(refuse.answer), HELLO_SIZE)  # no amplification

    def test_notAscii(self) -> None:
        [refuse] = udpd().request("pöng".encode())
        self.assertEqual(
            udpwire.decode(refuse.answer),
            udpwire.Refusal(NONCE, "request is not ASCII"),
        )

    def test_longReasonFitsTheHello(self) -> None:
        # (A local one's: a remote peer's reasons are short.)
        core = InboundHandshake(PEER, HelloAnswers(NONCE, 40), remote=False)
        core.request(b"pong")
        [refuse] = core.failed(Refused("x" * 500))
        self.assertLessEqual(len(refuse.answer), 40)

    def test_stoppedWhileAsking(self) -> None:
        core = udpd()
        core.request(b"pong")
        self.assertEqual(core.lost(), [Cancel()])
        self.assertEqual(core.failed(Refused("cancelled")), [])


class PropertyTests(SynchronousTestCase):
    """Whatever the bytes and however they come: one answer at most."""

    @settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        name=st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=255),
        early=st.binary(max_size=64),
        cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
    )
    def test_framedRequestInAnyPieces(
        self, name: str, early: bytes, cuts: list[int]
    ) -> None:
        stream = wire.encode(name.encode()) + early
        core = tcpd()
        actions = []
        for start, end in _pieces(len(stream), cuts):
            actions += core.received(stream[start:end])
        self.assertEqual([a for a in actions if isinstance(a, Ask)], [Ask(name)])
        [join] = core.opened(Socket())
        self.assertEqual(join.early, early)

    @settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(chunks=st.lists(st.binary(max_size=600), max_size=12))
    def test_anyBytesAtMostOneAnswer(self, chunks: list[bytes]) -> None:
        for core in (tcpd(), control()):
            actions = [a for chunk in chunks for a in core.received(chunk)]
            actions += core.tick(NOW + TIMEOUT)
            answers = [a for a in actions if isinstance(a, Ask | Refuse)]
            self.assertLessEqual(len(answers), 1)


def _pieces(size: int, cuts: list[int]) -> list[tuple[int, int]]:
    points = sorted({0, size, *(cut for cut in cuts if cut < size)})
    return list(zip(points, points[1:], strict=False))
