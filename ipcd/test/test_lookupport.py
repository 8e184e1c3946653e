"""
Tests for L{ipcd.lookupport}: the lookup port's own accept loop on real
sockets (its batch sizes as Twisted's, what it does with a connection its
factory serves, hands over, fails or leaves to a protocol), the placed
ports' addresses, and which port a listener gets.

The accept loop is driven by calling C{doRead} from the test, with the
connections already in the listener's backlog: what each call accepts is
then known, with no reactor turn in between.
"""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from ipcd.compat import cpython
from ipcd.compat.twisted import PREEXISTING_SOCKET
from ipcd.lookupport import HandedOver, LookupPort, can_place, listen, listen_fast
from ipcd.names import listen_unix
from ipcd.startup import close_now
from ipcd.test.support import take_descriptors, wait_until
from ipcd.test.test_names import short_tempdir

Serve = Callable[[Any, Callable[[Any], None]], Any]


class _Ends(Protocol):
    """A protocol whose end can be waited for (C{ended})."""

    def __init__(self) -> None:
        self.ended: Deferred[None] = Deferred()

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        self.ended.callback(None)


class _Recording(Factory):
    """A factory keeping the protocols it builds (C{built})."""

    protocol = _Ends

    def __init__(self) -> None:
        self.built: list[_Ends] = []

    def buildProtocol(self, addr: Any) -> Any:  # noqa: N802
        protocol = super().buildProtocol(addr)
        self.built.append(protocol)
        return protocol


class _Factory(_Recording):
    """One with a lookup factory's C{serve_at_once}, doing C{serve}."""

    def __init__(self, serve: Serve) -> None:
        super().__init__()
        self.serve = serve

    def serve_at_once(self, skt: Any, close_later: Callable[[Any], None]) -> Any:
        return self.serve(skt, close_later)


def _closed(skt: Any, close_later: Any) -> None:
    skt.close()  # answered and done


def _handed_over(skt: Any, close_later: Callable[[Any], None]) -> None:
    close_later(skt)  # answered with a descriptor


def _to_protocol(skt: Any, close_later: Any) -> Callable[[Any], None]:
    return lambda protocol: None  # the protocol carries on


class _PortTestCase(TestCase):
    """A lookup port on a real socket in a fresh directory."""

    def setUp(self) -> None:
        self.path = os.path.join(short_tempdir(self), "ipc")

    def listen(self, serve: Serve) -> tuple[LookupPort, _Factory]:
        factory = _Factory(serve)
        port = listen_fast(reactor, self.path, factory, 50, 0o600)
        self.addCleanup(lambda: port.connected and close_now(port))
        return port, factory

    def connect(self, count: int = 1) -> list[socket.socket]:
        """C{count} clients, in the port's backlog until it accepts."""
        clients = []
        for _ in range(count):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.addCleanup(client.close)
            client.connect(self.path)  # at once: the backlog has room
            client.setblocking(False)
            clients.append(client)
        return clients

    @inlineCallbacks
    def ended(self, factory: _Recording, clients: list[socket.socket]) -> Any:
        """Close C{clients}; wait for the protocols built to see it."""
        for client in clients:
            client.close()
        for protocol in factory.built:
            yield protocol.ended


def _at_eof(client: socket.socket) -> bool:
    """Whether ipcd's end of C{client} is closed (without waiting)."""
    try:
        return client.recv(1, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False


class AcceptLoopTests(_PortTestCase):
    """
    The lookup port's accept loop: Twisted's batch sizes, and its end at
    the first "no more".
    """

    def test_batchGrowsWhenFull(self) -> None:
        """A batch that accepted as many as it could: 20 more next time."""
        port, _ = self.listen(_closed)
        port.numberAccepts = 2
        clients = self.connect(3)
        port.doRead()
        self.assertEqual(port.numberAccepts, 22)
        self.assertEqual([_at_eof(c) for c in clients], [True, True, False])

    def test_batchShrinksToWhatCame(self) -> None:
        """
        A batch that found fewer: as many as came next time, never fewer
        than one.
        """
        port, _ = self.listen(_closed)
        port.numberAccepts = 5
        clients = self.connect(3)
        port.doRead()
        self.assertEqual(port.numberAccepts, 3)
        self.assertTrue(all(_at_eof(c) for c in clients))
        port.doRead()
        self.assertEqual(port.numberAccepts, 1)

    def test_stopsAtNoMore(self) -> None:
        """No accept is tried after the first "no more" (EAGAIN)."""
        accept_fd = cpython.accept_fd
        tried: list[None] = []

        def counted(sock: Any) -> Any:
            accept = accept_fd(sock)

            def count() -> Any:
                tried.append(None)
                return accept()

            return count

        self.patch(cpython, "accept_fd", counted)
        port, _ = self.listen(_closed)
        port.numberAccepts = 10
        self.connect()
        port.doRead()
        self.assertEqual(len(tried), 2)  # the connection, then EAGAIN

    def test_acceptErrorToTwisted(self) -> None:
        """
        Out of descriptors (EMFILE, for real): Twisted's accept loop takes
        over, as for any listener: it logs it (which ipcd.limits counts)
        and closes the connection with its reserved descriptor, rather
        than leave the client waiting.
        """
        port, _ = self.listen(_closed)
        [client] = self.connect()
        seen: list[str] = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        held = take_descriptors(self, 0)
        try:
            port.doRead()
        finally:
            while held:
                os.close(held.pop())
        self.assertTrue(_at_eof(client))
        self.assertIn(
            "EMFILE encountered; releasing reserved file descriptor.",
            [formatEvent(e) for e in seen],
        )

    def test_sweptAtAccept(self) -> None:
        """
        Connections handed over are swept as the port accepts: one whose
        client has closed is closed then, not at the end of its grace.
        """
        port, _ = self.listen(_handed_over)
        port.handed_over = HandedOver(Clock())  # a grace that never ends here
        [first] = self.connect()
        port.doRead()
        self.assertEqual(len(port.handed_over), 1)
        first.close()
        self.connect()
        port.doRead()
        self.assertEqual(len(port.handed_over), 1)  # the second only

    def test_failureInAcceptLogged(self) -> None:
        """
        A failure after the factory has served (its protocol failing to
        carry on) is logged, naming the port, and the loop stops there.
        """

        def fails(skt: Any, close_later: Any) -> Callable[[Any], None]:
            def resume(protocol: Any) -> None:
                raise RuntimeError("cannot carry on")

            return resume

        port, factory = self.listen(fails)
        clients = self.connect(2)
        seen: list[str] = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        port.doRead()
        self.assertEqual(
            [formatEvent(e) for e in seen if "log_failure" in e],
            [f"accepting on {port!r}"],
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(len(factory.built), 1)
        close_now(port)  # the second, still to accept, is not
        return self.ended(factory, clients)


class ServeTests(_PortTestCase):
    """What the port does with each connection its factory was offered."""

    def test_failedClosed(self) -> None:
        """
        A factory that fails to serve: the connection is closed at once
        (the client is not left waiting), and the failure logged.
        """

        def fails(skt: Any, close_later: Any) -> None:
            raise RuntimeError("no lookup today")

        port, _ = self.listen(fails)
        [client] = self.connect()
        port.doRead()
        self.assertTrue(_at_eof(client))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_noProtocolClosed(self) -> None:
        """
        Left to a protocol, but the factory builds none: the connection is
        closed, by the port (not lost to the garbage collector).
        """
        port, factory = self.listen(_to_protocol)
        factory.buildProtocol = lambda addr: None  # type: ignore[method-assign]
        [client] = self.connect()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            port.doRead()
        self.assertEqual([str(w.message) for w in caught], [])
        self.assertTrue(_at_eof(client))

    @inlineCallbacks
    def test_protocolsAsTwistedsPort(self) -> Any:
        """
        Connections left to a protocol get what Twisted's port gives: a
        transport on a C{socket.socket} (the type ipcd's relays test for),
        numbered from 0 in the order accepted.
        """
        port, factory = self.listen(_to_protocol)
        clients = self.connect(3)
        port.doRead()
        transports = [protocol.transport for protocol in factory.built]
        self.assertEqual([t.sessionno for t in transports], [0, 1, 2])
        for transport in transports:
            self.assertIsInstance(transport.getHandle(), socket.socket)
        yield self.ended(factory, clients)


class PlacedAddressTests(TestCase):
    """
    A port placed at RUNDIR/NAME (L{ipcd.placing}), and its connections,
    have that name as their address, not the private path it was bound at.
    """

    @inlineCallbacks
    def check(self, factory: _Recording, accept: Callable[[Any], Any]) -> Any:
        path = os.path.join(short_tempdir(self), "pong")
        port = listen_unix(reactor, path, factory)
        self.addCleanup(lambda: port.connected and close_now(port))
        self.assertEqual(port.getHost().name, os.fsencode(path))
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(client.close)
        client.connect(path)
        yield accept(port)
        [protocol] = factory.built
        self.assertEqual(protocol.transport.getHost().name, os.fsencode(path))
        client.close()
        yield protocol.ended

    def test_lookupPort(self) -> Any:
        """The lookup port's connections, left to a protocol."""
        return self.check(_Factory(_to_protocol), lambda port: port.doRead())

    def test_twistedsPort(self) -> Any:
        """Twisted's port's connections (every listener but the lookup one)."""
        factory = _Recording()
        return self.check(
            factory, lambda port: wait_until(lambda: factory.built, "an accept")
        )


class PortKindTests(TestCase):
    """Which port a listener gets, and where it may be placed."""

    def listen(self, the_reactor: Any, factory: Any) -> Any:
        path = os.path.join(short_tempdir(self), "ipc")
        port = listen(the_reactor, path, factory, 50, 0o600)
        self.addCleanup(lambda: getattr(port, "connected", 0) and close_now(port))
        return port

    def test_lookupPortForAFactoryServingAtOnce(self) -> None:
        """On Twisted's own reactor, bound at the name (not placed)."""
        self.assertIsInstance(self.listen(reactor, _Factory(_closed)), LookupPort)

    def test_twistedsPortForOthers(self) -> None:
        port = self.listen(reactor, Factory.forProtocol(Protocol))
        self.assertNotIsInstance(port, LookupPort)

    def test_reactorWithoutTwistedsPorts(self) -> None:
        """
        A reactor whose ports are not Twisted's own (a test double, say):
        its listenUNIX, for a factory serving at once too; never placed.
        """
        memory = MemoryReactorClock()
        factory = _Factory(_closed)
        self.listen(memory, factory)
        self.assertEqual([s[1] for s in memory.unixServers], [factory])
        self.assertFalse(can_place(memory))

    def test_placedOnlyWithTwistedsNames(self) -> None:
        """Twisted without the private names it takes: not placed."""
        self.patch(PREEXISTING_SOCKET, "present", False)
        self.patch(PREEXISTING_SOCKET, "said", True)  # no log line here
        self.assertFalse(can_place(reactor))

    def test_placedBeforeTheNamesAreProbed(self) -> None:
        """Before ipcd's start has probed Twisted's names, they are probed."""
        self.patch(PREEXISTING_SOCKET, "present", None)
        self.assertIs(can_place(reactor), True)
        self.assertTrue(PREEXISTING_SOCKET.present)
