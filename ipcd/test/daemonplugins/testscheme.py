"""
C{testscheme://HOST:PORT/SERVICE}: a protocol daemon defined entirely in the
test suite, written as a third party would (docs/api.rst): a framed service
name over TCP, the shared handshake of L{ipcd.inbound}, a relay loop, a
control socket C{RUNDIR/testscheme}, the section C{[testschemed]} and the
options C{--testscheme ENDPOINT}/C{--no-testscheme}.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.plugin import IPlugin
from zope.interface import implementer

from ipcd.checkers import Expected, boolean, endpoint
from ipcd.daemons import IProtocolDaemon, ListeningDaemon, Setting
from ipcd.daemons.listeners import DaemonService
from ipcd.errors import Refused
from ipcd.host import IDaemonHost
from ipcd.inbound import ControlHandshake, HandshakeFactory, NetworkHandshake
from ipcd.reactors import IHostReactor
from ipcd.relay import SocketRelays
from ipcd.services import IPCService
from ipcd.sockets import connect_tcp, read_exactly, write_all
from ipcd.wire import encode

SCHEME = "testscheme"
SECTION = "testschemed"
_OK = encode(b"ok")


def _colour(value: Any) -> str:
    if value not in ("red", "green"):
        raise Expected("'red' or 'green'")
    return value


class TestSchemeService(DaemonService):
    """The daemon's listener (a TCP endpoint) and C{RUNDIR/testscheme}."""

    def __init__(
        self, daemon: Any, broker: IDaemonHost, settings: Mapping[str, Any]
    ) -> None:
        super().__init__(daemon, broker)
        reactor = broker.reactor
        self.relays = self.engine(SocketRelays(reactor))

        def handshakes(protocol: Any) -> HandshakeFactory:
            return HandshakeFactory(
                protocol, broker, self.relays, 5.0, scheme=SCHEME, name=SECTION
            )

        self.listen_on(settings["listen"], handshakes(NetworkHandshake))
        IPCService(
            SCHEME, handshakes(ControlHandshake), broker.config.rundir, reactor
        ).setServiceParent(self)


@implementer(IPlugin, IProtocolDaemon)
class TestSchemeDaemon(ListeningDaemon):
    scheme = SCHEME
    section = SECTION
    settings = (
        Setting("enabled", boolean, False),
        Setting("listen", endpoint, "tcp:0:interface=127.0.0.1"),
        Setting("colour", _colour, "red"),
    )
    flag = SCHEME
    default_listen = "tcp:0:interface=127.0.0.1"
    service = TestSchemeService

    def __init__(self) -> None:
        # What the outbound half was asked, for the tests to see.
        self.connects: list[tuple[Any, Any, Any]] = []

    def connect(
        self, broker: IDaemonHost, target: Any, client: Any
    ) -> Deferred[socket.socket]:
        self.connects.append((broker, target, client))
        return ensureDeferred(self._dial(broker.reactor, target))

    async def _dial(self, reactor: IHostReactor, target: Any) -> socket.socket:
        address = (target.uri.host, target.uri.port)
        try:
            sock = await connect_tcp(reactor, address, socket.AF_INET)
        except OSError as e:
            raise Refused(f"cannot connect to testschemed: {e.strerror}") from None
        try:
            await write_all(reactor, sock, encode(target.service.encode()))
            if await read_exactly(reactor, sock, len(_OK)) != _OK:
                raise Refused(f"testschemed refused {target.service!r}")
            return sock
        except BaseException:
            sock.close()
            raise

    def status(self, settings: Mapping[str, Any]) -> Mapping[str, Any]:
        return {
            "testscheme_listen": settings["listen"] if settings["enabled"] else None,
            "testscheme_colour": settings["colour"],
        }


testschemed = TestSchemeDaemon()
