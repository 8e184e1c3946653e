"""
An external protocol daemon listening on C{RUNDIR/SCHEME}, driven by the
upstream control protocol: send the whole URI as one framed message, wait for
a framed C{ok}, then the same UNIX connection carries the service.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.error import ConnectionLost
from twisted.logger import Logger
from zope.interface import implementer

from ipcd import wire
from ipcd.access import OpenedSocket
from ipcd.daemons import IOutbound
from ipcd.errors import Refused
from ipcd.reactors import IFDReactor
from ipcd.sockets import open_unix, read_exactly, write_all

_OK = wire.encode(b"ok")


@implementer(IOutbound)
class ExternalDaemon:
    """
    The daemon whose socket at C{path} (C{RUNDIR/SCHEME}) C{checked} is (an
    L{OpenedSocket}, checked by the broker): its one connection goes to that
    very inode, whatever is at the name by then, and C{checked} is closed
    once it is made.
    """

    log = Logger()

    def __init__(
        self, reactor: IFDReactor, scheme: str, path: str, checked: OpenedSocket
    ) -> None:
        self.scheme = scheme
        self._reactor = reactor
        self._path = path
        self._checked = checked

    def connect(self, target: Any, client: Any) -> Deferred[socket.socket]:
        return ensureDeferred(self._connect(str(target.uri)))

    async def _open(self) -> socket.socket:
        try:
            return await open_unix(
                self._reactor, self._checked.connect_path(), self.scheme, self._path
            )
        finally:
            self._checked.close()

    async def _connect(self, uri: str) -> socket.socket:
        sock = await self._open()
        try:
            try:
                await write_all(self._reactor, sock, wire.encode(uri.encode()))
                reply = await read_exactly(self._reactor, sock, len(_OK))
            except ConnectionLost:
                raise Refused(f"{self.scheme} daemon refused {uri}")
            if reply != _OK:
                # Never echo what came back: it need not be a daemon's.
                raise Refused(f"{self.scheme} daemon did not answer ok for {uri}")
            return sock
        except BaseException:
            sock.close()
            raise
