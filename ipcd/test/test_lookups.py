"""
Lookups under load, and identity labels that follow user and group changes.

On real sockets with an in-process ipcd: many clients at once get their
answers and leave no fd behind; a lookup that is whole at accept is answered
there; and a group change reaches policy decisions within the label cache's
maximum age, or at once on a reload.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
import warnings
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from ipcd import errors
from ipcd.ataccept import _carry_on, serve_at_accept
from ipcd.config import Config
from ipcd.errors import Refused
from ipcd.identity import LabelCache, local_labels
from ipcd.limits import ConnectionLimits
from ipcd.lookup import ILookupBroker, reply_to, unexpected
from ipcd.lookupport import HandedOver
from ipcd.tap import IPCDService
from ipcd.test.support import (
    REPO,
    TIMEOUT,
    assert_no_fd_leak,
    assert_unexpected_bounded,
    bounce,
    fd_baseline,
    lookup,
    make_config,
    raw_lookup,
    short_rundir,
    start_ipcd,
    wait_until,
)
from ipcd.testing import FakeLookupBroker
from ipcd.wire import HEADER, encode

CLIENTS = 64
SECONDS = 3.0


class ConcurrentLookupTests(TestCase):
    """Many clients at once: every lookup is answered as it should be."""

    @inlineCallbacks
    def test_sixtyFourClients(self) -> Any:
        """
        64 clients looking up for a few seconds, some for a service the rules
        deny and some for one that does not exist: each gets C{ok} with a
        working connection, or the refusal meant for it; nothing else; and
        ipcd's fds are back to where they were.
        """
        rundir = short_rundir(self)
        yield start_ipcd(self, make_config(rundir, rules=["deny local forbidden"]))
        before = yield fd_baseline()
        expected = {
            b"pong;pong unix://pong": None,
            b"forbidden": b"ne local connection to 'forbidden' denied",
            b"nosuch": b"ne no route to service 'nosuch'",
        }
        unexpected: list[str] = []
        answered = [0]
        done = threading.Event()
        finished: list[int] = []
        deadline = time.monotonic() + SECONDS

        def client(n: int) -> None:
            payloads = list(expected)
            i = n
            try:
                while time.monotonic() < deadline:
                    payload = payloads[i % len(payloads)]
                    i += 1
                    reply = lookup(rundir, payload)
                    refusal = expected[payload]
                    if refusal is None:
                        if reply.data != b"ok" or len(reply.fds) != 1:
                            unexpected.append(f"{payload!r}: {reply.data!r}")
                            reply.close_fds()
                            continue
                        with socket.socket(fileno=reply.fds[0]) as sock:
                            sock.settimeout(TIMEOUT)
                            if bounce(sock, b"x") != encode(b"x"):
                                unexpected.append(f"{payload!r}: no echo")
                    elif not reply.data.startswith(refusal) or reply.fds:
                        unexpected.append(f"{payload!r}: {reply.data!r}")
                        reply.close_fds()
                    answered[0] += 1
            except Exception as e:
                unexpected.append(f"client {n}: {e!r}")
            finally:
                finished.append(n)
                if len(finished) == CLIENTS:
                    done.set()

        threads = [
            threading.Thread(target=client, args=(n,), daemon=True)
            for n in range(CLIENTS)
        ]
        for thread in threads:
            thread.start()
        yield wait_until(done.is_set, "the clients", SECONDS + 4 * TIMEOUT)
        for thread in threads:
            thread.join(TIMEOUT)
        self.assertEqual(unexpected, [])
        self.assertGreaterEqual(answered[0], CLIENTS * len(expected))
        yield assert_no_fd_leak(before)


class AnsweredAtOnceTests(TestCase):
    """A lookup whole in the socket at accept is answered there."""

    @inlineCallbacks
    def test_wholeLookupAnsweredAtOnce(self) -> Any:
        rundir = short_rundir(self)
        service = yield start_ipcd(self, make_config(rundir))
        # Sent before the reactor runs again: whole when ipcd accepts.
        sock = self.connect(rundir)
        sock.sendall(encode(b"pong;"))
        data, fds = yield self.answer(sock)
        self.assertEqual((data, fds), (b"ok", 1))
        counters = service.broker.counters
        self.assertEqual(counters["lookups answered at accept"], 1)
        self.assertEqual(counters["connected"], 1)

    def connect(self, rundir: str) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX)
        self.addCleanup(sock.close)
        sock.settimeout(TIMEOUT)
        sock.connect(os.path.join(rundir, "ipc"))
        return sock

    @inlineCallbacks
    def answer(self, sock: socket.socket) -> Any:
        """Wait (from the reactor, bounded) for ipcd's answer on C{sock}."""
        sock.setblocking(False)

        def answered() -> Any:
            try:
                return socket.recv_fds(sock, 4096, 2)
            except BlockingIOError:
                return None

        data, fds, _flags, _addr = yield wait_until(answered, "the answer")
        for fd in fds:
            os.close(fd)
        return data, len(fds)

    @inlineCallbacks
    def test_splitLookupStillAnswered(self) -> Any:
        """A lookup that arrives in pieces goes the general way, to C{ok}."""
        rundir = short_rundir(self)
        service = yield start_ipcd(self, make_config(rundir))
        limits = service.broker.limits["ipc"]
        sock = self.connect(rundir)
        framed = encode(b"pong;")
        sock.sendall(framed[: HEADER.size + 1])
        # ipcd has accepted it, with a part of the lookup only.
        yield wait_until(lambda: limits.total == 1, "ipcd to accept")
        sock.sendall(framed[HEADER.size + 1 :])
        self.assertEqual((yield self.answer(sock)), (b"ok", 1))
        self.assertEqual(service.broker.counters["lookups answered at accept"], 0)
        self.assertEqual(service.broker.counters["connected"], 1)

    @inlineCallbacks
    def test_sameRefusal(self) -> Any:
        """The at-accept path and the protocol answer alike (reply_to)."""
        rundir = short_rundir(self)
        service = yield start_ipcd(self, make_config(rundir))
        limits = service.broker.limits["ipc"]
        framed = encode(b"nosuch;")
        whole = self.connect(rundir)
        whole.sendall(framed)
        at_accept = yield self.answer(whole)
        self.assertEqual(service.broker.counters["lookups answered at accept"], 1)
        split = self.connect(rundir)
        split.sendall(framed[: HEADER.size + 1])
        yield wait_until(lambda: limits.total == 1, "ipcd to accept")
        split.sendall(framed[HEADER.size + 1 :])
        by_protocol = yield self.answer(split)
        self.assertEqual(service.broker.counters["lookups answered at accept"], 1)
        self.assertEqual(at_accept, by_protocol)
        self.assertTrue(at_accept[0].startswith(b"ne no route to service 'nosuch'"))
        self.assertEqual(at_accept[1], 0)


class UnexpectedFailureTests(TestCase):
    """Lookups that fail unexpectedly: a local client's to repeat."""

    @inlineCallbacks
    def start(self) -> Any:
        rundir = short_rundir(self)
        service = yield start_ipcd(self, make_config(rundir))
        return rundir, service.broker

    def ask(self, rundir: str, split: Any = None) -> Any:
        """
        Peers' lookups, each whole or in two pieces: C{split(n)} waits for
        ipcd to hold C{n} connections (0 before connecting, 1 between).
        """

        def run(peers: int) -> list[bytes]:
            answers = []
            framed = encode(b"pong;")
            for _ in range(peers):
                if split is not None:
                    split(0)
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.settimeout(TIMEOUT)
                    sock.connect(os.path.join(rundir, "ipc"))
                    if split is None:
                        sock.sendall(framed)
                    else:
                        sock.sendall(framed[: HEADER.size + 1])
                        split(1)
                        sock.sendall(framed[HEADER.size + 1 :])
                    answers.append(sock.recv(4096))
            return answers

        return run

    @inlineCallbacks
    def test_atAcceptAtABoundedRate(self) -> Any:
        """
        Once ipcd has no fd left, every lookup fails with an unexpected
        error (C{ne internal error}): its line, with the traceback, goes at
        the lookup listener's bounded rate, and those left out are counted.
        """
        rundir, broker = yield self.start()
        answers = yield assert_unexpected_bounded(
            self, broker.counters, "ipcd.limits.ipc", self.ask(rundir), "lookup for"
        )
        self.assertTrue(all(a.startswith(b"ne internal error") for a in answers))
        # Most whole at accept (one the reactor took in part goes the
        # protocol's way, as the next test's all do).
        self.assertGreater(broker.counters["lookups answered at accept"], 0)

    @inlineCallbacks
    def test_byTheProtocolAtABoundedRate(self) -> Any:
        """The same for lookups that come in pieces (the protocol's path)."""
        rundir, broker = yield self.start()
        limits = broker.limits["ipc"]

        def held(count: int) -> None:
            # Read from the client's thread: a count the reactor keeps.
            deadline = time.monotonic() + TIMEOUT
            while limits.total != count and time.monotonic() < deadline:
                time.sleep(0.001)

        answers = yield assert_unexpected_bounded(
            self,
            broker.counters,
            "ipcd.limits.ipc",
            self.ask(rundir, held),
            "lookup for",
        )
        self.assertTrue(all(a.startswith(b"ne internal error") for a in answers))
        self.assertEqual(broker.counters["lookups answered at accept"], 0)


class _AtOnceBroker(FakeLookupBroker):
    """A L{FakeLookupBroker} that answers at once (C{open_now}), or fails."""

    error: Exception | None = None

    def open_now(self, payload: bytes, client: Any) -> Any:
        answer = self.open(payload, client)
        if self.error is not None:
            return Failure(self.error)
        if not answer.called:
            return answer
        result: list[Any] = []
        answer.addBoth(result.append)
        return result[0]


class _Protocol:
    """Stands for the L{LookupProtocol} that carries on: what it is asked."""

    def __init__(self, answered: bool = False) -> None:
        self._answered = answered
        self.calls: list[tuple[str, Any]] = []

    def send_rest(self, rest: bytes) -> None:
        self.calls.append(("rest", rest))

    def setTimeout(self, period: Any) -> None:  # noqa: N802 (Twisted's name)
        self.calls.append(("timeout", period))

    def answer(self, answer: Any) -> None:
        self.calls.append(("answer", answer))

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.calls.append(("data", data))


class ServeAtAcceptTests(SynchronousTestCase):
    """
    L{serve_at_accept} on a real socket pair: what it answers at once, and
    what it leaves to the protocol (and how the protocol carries on).
    """

    def setUp(self) -> None:
        self.broker = _AtOnceBroker(Config(rundir="/x", max_message_size=1 << 20))
        self.addCleanup(self.broker.close)
        self.client, self.server = socket.socketpair()
        self.addCleanup(self.client.close)
        self.addCleanup(self.server.close)
        self.later: list[socket.socket] = []

    def serve(self, data: bytes | None = None, limits: Any = None) -> Any:
        if data is not None:
            self.client.sendall(data)
        return serve_at_accept(
            self.broker, limits, Logger(), self.server, self.later.append
        )

    def test_ok(self) -> None:
        """C{ok} and the socket; ours closed, the connection closed later."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            self.assertIsNone(self.serve(encode(b"pong")))
        self.assertEqual([str(w.message) for w in caught], [])  # closed, not lost
        self.assertEqual(self.later, [self.server])
        data, fds, _flags, _addr = socket.recv_fds(self.client, 16, 1)
        self.assertEqual(data, b"ok")
        os.close(fds[0])
        self.broker.peers[0].settimeout(TIMEOUT)
        self.assertEqual(self.broker.peers[0].recv(1), b"")  # no copy left open
        self.assertEqual(self.broker.counters["lookups answered at accept"], 1)

    def test_refused(self) -> None:
        """C{ne}: the connection closed at once, nothing handed on."""
        self.broker.refuse("no")
        self.assertIsNone(self.serve(encode(b"pong")))
        self.assertEqual(self.later, [])
        self.assertEqual(self.server.fileno(), -1)
        self.assertEqual(self.client.recv(16), b"ne no")

    def test_errorLogged(self) -> None:
        self.broker.error = RuntimeError("boom")
        self.assertIsNone(self.serve(encode(b"pong")))
        self.assertEqual(self.client.recv(64), b"ne internal error: boom")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_clientGone(self) -> None:
        """A client gone before its answer: nothing raised, nothing to carry on."""
        self.client.sendall(encode(b"pong"))
        self.client.close()
        self.assertIsNone(self.serve())

    def test_sizes(self) -> None:
        """
        An empty lookup and one of max_message_size bytes are served; one
        longer, or a read of 4096 bytes (more may follow), or a header
        alone are the protocol's, which reads them as received.
        """
        self.assertIsNone(self.serve(encode(b"")))
        self.broker.config = Config(rundir="/x", max_message_size=10)
        for data, served in (
            (encode(b"x" * 10), True),
            (encode(b"x" * 11), False),
            (HEADER.pack(5), False),
        ):
            self.setUp()
            self.broker.config = Config(rundir="/x", max_message_size=10)
            resume = self.serve(data)
            self.assertEqual(resume is None, served, data)
            if resume is not None:
                protocol = _Protocol()
                resume(protocol)
                self.assertEqual(protocol.calls, [("data", data)])
        for size, served in ((4095, True), (4096, False)):
            self.setUp()
            resume = self.serve(encode(b"x" * (size - HEADER.size)))
            self.assertEqual(resume is None, served, size)

    def test_limits(self) -> None:
        """Served at once only with a place to spare within the limits."""
        for total, served in ((0, True), (1, False), (2, False)):
            self.setUp()
            limits = ConnectionLimits("ipc", 3, 5, Clock())
            limits.total = total + 1  # counted in the total already
            data = encode(b"pong")
            resume = self.serve(data, limits)
            self.assertEqual(resume is None, served, total)
        uid = os.getuid()
        self.setUp()
        limits = ConnectionLimits("ipc", 100, 1, Clock())
        limits.per_peer[f"uid:{uid}"] = 1
        resume = self.serve(encode(b"pong"), limits)
        protocol = _Protocol()
        resume(protocol)
        self.assertEqual(protocol.calls, [("data", encode(b"pong"))])

    def test_notALocalClient(self) -> None:
        """A client with no credentials to read (not AF_UNIX): the protocol's."""
        with socket.create_server(("127.0.0.1", 0)) as listening:
            self.client = socket.create_connection(listening.getsockname())
            self.addCleanup(self.client.close)
            self.server, _ = listening.accept()
            self.addCleanup(self.server.close)
        self.client.sendall(encode(b"pong"))
        select.select([self.server], [], [], TIMEOUT)  # arrived
        resume = self.serve()
        protocol = _Protocol()
        resume(protocol)
        self.assertEqual(protocol.calls, [("data", encode(b"pong"))])

    def test_restSentByTheProtocol(self) -> None:
        """What a partial send left is the protocol's to send."""
        protocol = _Protocol()
        _carry_on(b"", None, b"st")(protocol)
        self.assertEqual(protocol.calls, [("rest", b"st")])

    def test_partialSend(self) -> None:
        """
        An answer the socket takes only in part (a long refusal, a small
        send buffer): the protocol sends the rest, and the client gets the
        whole answer, once.
        """
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # least
        # Longer than any reason ipcd gives, so that it cannot fit.
        self.patch(errors, "MAX_REASON", 20000)
        self.broker.refuse("x" * 20000)
        resume = self.serve(encode(b"pong"))
        self.assertIsNotNone(resume)
        protocol = _Protocol()
        resume(protocol)
        [(kind, rest)] = protocol.calls
        self.assertEqual(kind, "rest")
        self.client.setblocking(False)
        sent = b""
        try:
            while True:
                sent += self.client.recv(65536)
        except BlockingIOError:
            pass
        self.assertNotEqual(sent, b"")
        self.assertEqual(sent + rest, b"ne " + b"x" * 20000)

    def test_answerLater(self) -> None:
        """
        An answer that has to wait is the protocol's to give, or to cancel
        if the protocol refused the client at its limits.
        """
        self.broker.hold()
        resume = self.serve(encode(b"pong"))
        protocol = _Protocol()
        resume(protocol)
        [pending] = self.broker.pending
        self.assertEqual(protocol.calls, [("timeout", None), ("answer", pending)])
        self.setUp()
        self.broker.hold()
        self.serve(encode(b"pong"))(_Protocol(answered=True))
        self.assertEqual(self.broker.cancelled, self.broker.pending)
        # Its cancellation handled: no "Unhandled error in Deferred" later.
        [cancelled] = self.broker.cancelled
        self.assertIsNone(cancelled.result)

    def test_lateSocketClosed(self) -> None:
        """
        An answer let go (the protocol refused the client) that still gives
        a socket as it is cancelled: that socket is closed, not leaked.
        """
        late, other = socket.socketpair()
        self.addCleanup(late.close)
        self.addCleanup(other.close)
        answer: Deferred[socket.socket] = Deferred(lambda d: d.callback(late))
        _carry_on(b"", answer)(_Protocol(answered=True))
        self.assertEqual(late.fileno(), -1)

    def test_clientNotReading(self) -> None:
        """
        A client whose socket is full gets its answer from the protocol; if
        the protocol refused it, the socket is closed.
        """
        for answered in (False, True):
            self.setUp()
            self.server.setblocking(False)
            try:
                while True:
                    self.server.send(b"x" * 65536)
            except BlockingIOError:
                pass
            resume = self.serve(encode(b"pong"))
            protocol = _Protocol(answered)
            resume(protocol)
            if answered:
                self.assertEqual(protocol.calls, [])
                self.broker.peers[-1].settimeout(TIMEOUT)
                self.assertEqual(self.broker.peers[-1].recv(1), b"")
            else:
                self.assertEqual(protocol.calls[0], ("timeout", None))
                kind, sock = protocol.calls[1]
                self.assertEqual(kind, "answer")
                self.assertIsInstance(sock, socket.socket)
                sock.close()


class ReplyTests(SynchronousTestCase):
    """L{reply_to}: the one wire form of an answer, for both paths."""

    def test_ok(self) -> None:
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        self.assertEqual(reply_to(a), (b"ok", a.fileno()))

    def test_refused(self) -> None:
        reply = reply_to(Failure(Refused("no route to service 'x'")))
        self.assertEqual(reply, (b"ne no route to service 'x'", None))

    def test_internalError(self) -> None:
        reply = reply_to(Failure(RuntimeError("boom\n")))
        self.assertEqual(reply, (b"ne internal error: boom\\x0a", None))

    def test_onlyErrorsLogged(self) -> None:
        """A refusal is said to the client; any other failure is also logged."""
        self.assertIs(unexpected(Failure(Refused("no"))), False)
        self.assertIs(unexpected(Failure(RuntimeError("boom"))), True)


class BrokerInterfaceTests(SynchronousTestCase):
    """L{ILookupBroker} names all a lookup factory uses of its broker."""

    def test_names(self) -> None:
        self.assertEqual(
            set(ILookupBroker.names()), {"open", "config", "counters", "reactor"}
        )
        verifyObject(ILookupBroker, FakeLookupBroker())


class _GroupDatabase:
    """The labels of the real databases, plus groups a test adds."""

    def __init__(self) -> None:
        self.extra: set[str] = set()
        self.lookups = 0

    def __call__(self, uid: int, gid: int) -> frozenset[str]:
        self.lookups += 1
        return local_labels(uid, gid) | self.extra


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class LabelCacheTests(SynchronousTestCase):
    """L{LabelCache}: one lookup per (uid, gid), until it must be redone."""

    def setUp(self) -> None:
        self.database = _GroupDatabase()
        self.clock = _Clock()
        self.files = [os.path.join(short_rundir(self), "group")]
        with open(self.files[0], "w") as f:
            f.write("ops:x:1234:\n")

    def cache(self, max_age: float = 60.0) -> LabelCache:
        return LabelCache(max_age, self.files, self.clock, self.database)

    def test_cached(self) -> None:
        cache = self.cache()
        self.assertEqual(cache(1, 2), local_labels(1, 2))
        cache(1, 2)
        self.assertEqual(self.database.lookups, 1)
        cache(3, 4)
        self.assertEqual(self.database.lookups, 2)

    def test_maximumAge(self) -> None:
        """A change the files do not show is seen within C{max_age}."""
        cache = self.cache(max_age=30)
        cache(1, 2)
        self.database.extra.add("group:ops")
        self.clock.now += 29
        self.assertNotIn("group:ops", cache(1, 2))
        self.clock.now += 1
        self.assertIn("group:ops", cache(1, 2))

    def test_filesChange(self) -> None:
        """A change to the group file is seen within a second."""
        cache = self.cache(max_age=3600)
        cache(1, 2)
        self.database.extra.add("group:ops")
        with open(self.files[0], "a") as f:
            f.write("wheel:x:10:alice\n")
        self.assertNotIn("group:ops", cache(1, 2))  # checked a moment ago
        self.clock.now += 1
        self.assertIn("group:ops", cache(1, 2))

    def test_fileRemovedOrReplaced(self) -> None:
        cache = self.cache(max_age=3600)
        cache(1, 2)
        os.unlink(self.files[0])
        self.clock.now += 1
        cache(1, 2)
        self.assertEqual(self.database.lookups, 2)

    def test_clear(self) -> None:
        cache = self.cache(max_age=3600)
        cache(1, 2)
        cache.clear()
        cache(1, 2)
        self.assertEqual(self.database.lookups, 2)

    def test_zeroMaxAgeCachesNothing(self) -> None:
        cache = self.cache(max_age=0)
        cache(1, 2)
        cache(1, 2)
        self.assertEqual(self.database.lookups, 2)


class GroupChangeTests(TestCase):
    """
    A client added to a group reaches what the group may, through a real
    ipcd: within C{label_cache_max_age}, and at once after a reload.
    """

    @inlineCallbacks
    def start(self, max_age: float) -> Any:
        self.rundir = short_rundir(self)
        layer = {
            "rules": ["allow local pong group:ipcd-test-ops", "deny local pong"],
            "ipcd": {"label_cache_max_age": max_age},
        }
        config = make_config(self.rundir, **layer)
        service = IPCDService(config, reactor, reload_config=lambda: config)
        self.database = _GroupDatabase()
        self.clock = _Clock()
        # The real databases have no such group; the test adds it.
        service.broker.labels = LabelCache(
            max_age, files=(), seconds=self.clock, lookup=self.database
        )
        service.startService()
        self.addCleanup(service.stopService)
        yield wait_until(
            lambda: os.path.exists(os.path.join(self.rundir, "ipc")), "ipcd"
        )
        return service

    @inlineCallbacks
    def answer(self) -> Any:
        reply = yield deferToThread(lookup, self.rundir, b"pong;")
        reply.close_fds()
        return reply.data

    @inlineCallbacks
    def test_withinMaximumAge(self) -> Any:
        yield self.start(max_age=30)
        self.assertIn(b"denied", (yield self.answer()))
        self.database.extra.add("group:ipcd-test-ops")
        self.assertIn(b"denied", (yield self.answer()))  # cached still
        self.clock.now += 30
        self.assertEqual((yield self.answer()), b"ok")

    @inlineCallbacks
    def test_atOnceAfterReload(self) -> Any:
        service = yield self.start(max_age=3600)
        self.assertIn(b"denied", (yield self.answer()))
        self.database.extra.add("group:ipcd-test-ops")
        self.assertIn(b"denied", (yield self.answer()))
        self.assertTrue(service.reload()["ok"])
        self.assertEqual((yield self.answer()), b"ok")


class HandedOverTests(SynchronousTestCase):
    """
    L{HandedOver}: a connection answered with a descriptor ends for the
    client at once (EOF), and is closed by ipcd when the client has closed,
    within its grace, or when too many wait.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.handed = HandedOver(self.clock, grace=0.05, most=2)

    def pair(self) -> tuple[socket.socket, socket.socket]:
        ours, client = socket.socketpair(socket.AF_UNIX)
        self.addCleanup(ours.close)
        self.addCleanup(client.close)
        client.settimeout(TIMEOUT)
        return ours, client

    def test_clientSeesEof(self) -> None:
        ours, client = self.pair()
        self.handed.add(ours)
        self.assertEqual(client.recv(10), b"")
        self.assertEqual(len(self.handed), 1)

    def test_closedOnceTheClientCloses(self) -> None:
        ours, client = self.pair()
        self.handed.add(ours)
        self.handed.sweep()
        self.assertNotEqual(ours.fileno(), -1, "the client has not closed yet")
        client.close()
        self.handed.sweep()
        self.assertEqual(ours.fileno(), -1)
        self.assertEqual(len(self.handed), 0)

    def test_closedAfterGrace(self) -> None:
        ours, _client = self.pair()
        self.handed.add(ours)
        self.clock.advance(0.05)
        self.assertEqual(ours.fileno(), -1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_atMost(self) -> None:
        socks = [self.pair()[0] for _ in range(3)]
        for sock in socks:
            self.handed.add(sock)
        self.assertEqual([s.fileno() == -1 for s in socks], [True, False, False])

    def test_closeAll(self) -> None:
        ours, _client = self.pair()
        self.handed.add(ours)
        self.handed.close_all()
        self.assertEqual(ours.fileno(), -1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_graceFromItsAdding(self) -> None:
        """The grace runs from when a socket was added, not from time 0."""
        self.clock.advance(1)
        ours, _client = self.pair()
        self.handed.add(ours)
        self.handed.sweep()
        self.assertNotEqual(ours.fileno(), -1)

    def test_laterOnesWaitTheirGrace(self) -> None:
        """
        One added later is kept when the first's grace ends, and closed at
        the end of its own (the timer set again), its client still open.
        """
        first, _ = self.pair()
        second, _ = self.pair()
        self.handed.add(first)
        self.clock.advance(0.03)
        self.handed.add(second)
        self.clock.advance(0.02)
        self.assertEqual((first.fileno(), len(self.handed)), (-1, 1))
        self.assertNotEqual(second.fileno(), -1)
        self.clock.advance(0.05)
        self.assertEqual((second.fileno(), len(self.handed)), (-1, 0))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_addedAfterCloseAll(self) -> None:
        """After close_all, one added is still closed after its grace."""
        self.handed.add(self.pair()[0])
        self.handed.close_all()
        ours, _client = self.pair()
        self.handed.add(ours)
        self.clock.advance(0.05)
        self.assertEqual(ours.fileno(), -1)

    def test_notShutClosedAtOnce(self) -> None:
        """
        One whose writing half cannot be shut (a socket not connected; on
        AF_UNIX, an LSM refusing the shutdown) is closed at once, not kept.
        """
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        self.handed.add(sock)
        self.assertEqual((sock.fileno(), len(self.handed)), (-1, 0))

    def test_addedAfterTheTimerRanOut(self) -> None:
        """
        One added after the timer has closed every one (and so not been
        set again) is still closed after its own grace.
        """
        self.handed.add(self.pair()[0])
        self.clock.advance(0.05)
        self.assertEqual((len(self.handed), self.clock.getDelayedCalls()), (0, []))
        ours, _client = self.pair()
        self.handed.add(ours)
        self.clock.advance(0.05)
        self.assertEqual(ours.fileno(), -1)

    def test_defaults(self) -> None:
        """
        The lookup port's: 50 ms of grace (docs/api.rst), at most 256
        waiting.
        """
        handed = HandedOver(self.clock)
        socks = [self.pair()[0] for _ in range(257)]
        for sock in socks:
            handed.add(sock)
        self.assertEqual([s.fileno() == -1 for s in socks[:2]], [True, False])
        self.assertEqual(len(handed), 256)
        self.clock.advance(0.049)
        self.assertNotEqual(socks[-1].fileno(), -1)
        self.clock.advance(0.001)
        self.assertEqual(len(handed), 0)


# docs/protocol.rst's "Reasons include" block: how to provoke each line
# (None: pinned elsewhere, as it needs DNS, a loop through tcpd or a 5 s wait).
_REASONS: dict[str, bytes | None] = {
    "requested service: empty service name": b";",
    "malformed route 'pong'": b"pong;pong",
    "route target: invalid service name '../etc'": b"x;x ../etc",
    "lookup is not valid UTF-8": b"\xff;",
    "more than 256 routes": b"pong" + b";" * 257,
    "'tcp://a..b:9000/pong'": b"pong;pong tcp://a..b:9000/pong",
    "evil\\x1bhost": b"pong;pong tcp://evil\x1bhost/pong",
    "cannot resolve 'nosuch.example'": None,
    "no route to service 'x'": b"x;",
    "redirect loop": b"a;",
    "route loop": None,
    "absolute socket paths": b"pong;pong unix:///etc/passwd",
    "scheme 'bogus'": b"pong;pong bogus://x",
    "scheme 'udp'": b"pong;pong udp://127.0.0.1:9000/pong",
    "lookup of 2097152 bytes": HEADER.pack(2097152),
    "no lookup received within 5 s": None,
    "denied by rule 1 (deny local secret *)": b"secret;",
}


class DocumentedReasonsTests(TestCase):
    """docs/protocol.rst's list of reasons, each provoked and read as shown."""

    @inlineCallbacks
    def test_reasonsAsShown(self) -> Any:
        with open(os.path.join(REPO, "docs", "protocol.rst"), encoding="utf-8") as f:
            block = f.read().split("Reasons include::\n\n", 1)[1].split("\n\n")[0]
        shown = [line.strip() for line in block.splitlines()]
        self.assertEqual(len(shown), len(_REASONS), shown)
        rundir = short_rundir(self)
        config = make_config(
            rundir,
            redirects={"a": "b"},
            routes={"b": "unix://a"},
            rules=["deny local secret *"],
        )
        yield start_ipcd(self, config)
        compared = 0
        for line in shown:
            [key] = [k for k in _REASONS if k in line]
            raw = _REASONS[key]
            if raw is None:
                continue
            compared += 1
            if not raw.startswith(b"\0"):
                raw = encode(raw)
            reply = yield deferToThread(raw_lookup, rundir, raw)
            self.assertEqual(reply.fds, [])
            said = reply.data.decode().replace(rundir, "/tmp/libipc-run")
            self.assertEqual(said, line)
        self.assertEqual(compared, 14)
