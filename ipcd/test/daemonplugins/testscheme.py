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

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import serverFromString
from twisted.plugin import IPlugin
from zope.interface import implementer

from ipcd.config import Expected, boolean, endpoint
from ipcd.daemons import Flag, IProtocolDaemon, Setting
from ipcd.errors import Refused
from ipcd.inbound import (
    ControlHandshake,
    HandshakeFactory,
    NetworkHandshake,
    listening,
)
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


class TestSchemeService(MultiService):
    """The daemon's listener (a TCP endpoint) and C{RUNDIR/testscheme}."""

    def __init__(self, broker: Any, listen: str) -> None:
        super().__init__()
        self.setName(SECTION)
        reactor = broker.reactor
        self.relays = SocketRelays(reactor)

        def handshakes(protocol: Any) -> HandshakeFactory:
            return HandshakeFactory(
                protocol, broker, self.relays, 5.0, scheme=SCHEME, name=SECTION
            )

        self.listener = StreamServerEndpointService(
            serverFromString(reactor, listen), handshakes(NetworkHandshake)
        )
        self.listener.setServiceParent(self)
        IPCService(
            SCHEME, handshakes(ControlHandshake), broker.config.rundir, reactor
        ).setServiceParent(self)

    def listening(self) -> Deferred[Any]:
        """Fires with the listening port once started (C{getHost()} for it)."""
        return listening(self.listener)

    def startService(self) -> None:
        self.relays.start()
        super().startService()

    def stopService(self) -> Deferred[None]:
        stopped = super().stopService()
        self.relays.stop()
        return stopped


@implementer(IPlugin, IProtocolDaemon)
class TestSchemeDaemon:
    scheme = SCHEME
    section = SECTION
    settings = (
        Setting("enabled", boolean, False),
        Setting("listen", endpoint, "tcp:0:interface=127.0.0.1"),
        Setting("colour", _colour, "red"),
    )
    flags = (
        Flag(
            "testscheme",
            "testschemed's listener",
            lambda value: {"enabled": True, "listen": value},
            takes_value=True,
        ),
        Flag("no-testscheme", "Do not run testschemed.", lambda _: {"enabled": False}),
    )
    restart_keys = ("enabled", "listen")

    def __init__(self) -> None:
        # What the outbound half was asked, for the tests to see.
        self.connects: list[tuple[Any, Any, Any]] = []

    def enabled(self, settings: Mapping[str, Any]) -> bool:
        return bool(settings["enabled"])

    def connect(self, broker: Any, target: Any, client: Any) -> Deferred[socket.socket]:
        self.connects.append((broker, target, client))
        return ensureDeferred(self._dial(broker.reactor, target))

    async def _dial(self, reactor: Any, target: Any) -> socket.socket:
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

    def makeService(  # noqa: N802 (Twisted's name)
        self, broker: Any, settings: Mapping[str, Any]
    ) -> TestSchemeService:
        return TestSchemeService(broker, settings["listen"])

    def status(self, settings: Mapping[str, Any]) -> Mapping[str, Any]:
        return {
            "testscheme_listen": settings["listen"] if settings["enabled"] else None,
            "testscheme_colour": settings["colour"],
        }

    def verify(self, reactor: Any, settings: Mapping[str, Any]) -> None:
        pass

    def hint(self, error: Exception) -> str:
        return "use --testscheme ENDPOINT or --no-testscheme"


testschemed = TestSchemeDaemon()
