"""
How tlsd hands a TLS connection to a relay once its request is answered.

On the raw sockets (L{SocketRelays} with a TLS codec, L{ipcd.daemons.tls.relay})
when the TLS connection can leave Twisted, else through Twisted's transports
(L{TransportRelays}); a TLS connection under a relay cannot half-close.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from ipcd.compat import twisted as compat_twisted
from ipcd.daemons.outbox import socket_of
from ipcd.daemons.tls.kcodec import KernelSecured
from ipcd.daemons.tls.kswitch import to_kernel
from ipcd.daemons.tls.relay import Secured, detach
from ipcd.handoff import adopt_into_reactor
from ipcd.relay import RelayProtocol, RelayStats, ended

if TYPE_CHECKING:
    from ipcd.daemons.tls.daemon import TlsState


log = Logger()


def tls_summary(connection: Any) -> dict[str, Any]:
    """Protocol version and cipher of a pyOpenSSL Connection."""
    return {
        "version": connection.get_protocol_version_name(),
        "cipher": connection.get_cipher_name(),
    }


@dataclass(eq=False)
class TlsRelayStats(RelayStats):
    """A relay's counters, with its TLS connection's version, cipher and peer."""

    tls: dict[str, Any] = field(default_factory=dict)

    def as_dict(self, now: float | None = None) -> dict[str, Any]:
        shown = super().as_dict(now)
        shown["tls"] = dict(self.tls)  # status --wide's DETAILS column
        return shown


class EagerRelayProtocol(RelayProtocol):
    """
    A relay side that sends what it passes on at once, in the same reactor
    turn, instead of when the reactor next finds the peer's socket
    writable: one turn less per hop, which is most of a small message's
    round trip through two hops of TLS.  Only a plain write is done here;
    anything else (an error, a close after the buffer) stays the reactor's.
    """

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        super().dataReceived(data)
        peer = self.peer
        if not self.started or peer is None:
            return
        connection = socket_of(peer.transport)
        if (
            connection is not None
            and connection.connected
            and not connection.disconnecting
            and compat_twisted.writes_waiting(connection)
        ):
            connection.doWrite()


def relay_over(
    state: TlsState,
    tls: TLSMemoryBIOProtocol,
    sock: socket.socket,
    stats: RelayStats,
    tls_is_a: bool,
    greeting: bytes = b"",
    early: bytes = b"",
    idle_timeout: float = 0.0,
    handed: Callable[[socket.socket | None], None] | None = None,
) -> None:
    """
    Relay TLS connection C{tls} and the connected socket C{sock} (closed
    here): on their raw sockets (L{SocketRelays}, with a TLS codec) when
    the TLS connection can leave Twisted, else through Twisted's transports.

    Where the kernel takes TLS (L{TlsState.kernel_tls}) and the connection
    can switch exactly (L{to_kernel}), the kernel does TLS instead: with
    C{handed} (the client's side), the TCP socket itself is given to
    C{handed} and C{sock} is closed; without, the kTLS socket is relayed
    to C{sock} as a plain one.  C{handed} is called with None when the
    relay goes on as before.

    The switch waits for the reactor's next turn: this is called from
    within Twisted's TLS, which goes on reading its memory BIO when this
    returns.  Meanwhile the TCP socket is not read, and what Twisted's TLS
    still delivers is held, for the plain side first.
    """
    tcp = socket_of(tls.transport)
    if tcp is None or not state.socket_relay():
        _relay_in_twisted(
            state, tls, sock, stats, tls_is_a, greeting, early, idle_timeout
        )
        if handed is not None:
            handed(None)
        return
    tls.pauseProducing()
    held = _Held()
    tls.wrappedProtocol = held

    def switch() -> None:
        if held.lost:
            sock.close()
            ended(stats)
            if handed is not None:
                handed(None)
            return
        data = b"".join(held.data)
        ahead, behind = (
            (greeting, early + data) if tls_is_a else (greeting + data, early)
        )
        secured = detach(tls)
        if isinstance(secured, str):
            log.info("relaying through Twisted's TLS: {why}", why=secured)
            tls.resumeProducing()
            _relay_in_twisted(
                state, tls, sock, stats, tls_is_a, ahead, behind, idle_timeout
            )
            if handed is not None:
                handed(None)
            return
        # It still counts against its listener's limits until the relay ends.
        release = getattr(tls.transport, "handOff", lambda: None)()
        stats.on_end = _both(stats.on_end, release)
        end: Secured | KernelSecured = secured
        if state.kernel_tls():
            kernel = _kernel(secured, tls_is_a, ahead, behind, handed is not None)
            if kernel is _LOST or (kernel is not None and handed is not None):
                # Lost, or handed over: no relay.
                sock.close()
                ended(stats)
                if handed is not None:
                    handed(None if kernel is _LOST else secured.sock)
                if kernel is _LOST:
                    secured.close()
                return
            if isinstance(kernel, KernelSecured):
                end = kernel
                if isinstance(stats, TlsRelayStats):
                    stats.tls = {**stats.tls, "kernel": True}
        ends = (end, sock) if tls_is_a else (sock, end)
        state.socket_relays.join(
            *ends, stats, greeting=ahead, early=behind, idle_timeout=idle_timeout
        )
        if handed is not None:
            handed(None)

    state.broker.reactor.callLater(0, switch)


_LOST = object()


def _kernel(
    secured: Secured, tls_is_a: bool, ahead: bytes, behind: bytes, handing: bool
) -> KernelSecured | object | None:
    """
    C{secured} switched to kernel TLS: its end for the relay; None when it
    stays on the relay (logged, with why); L{_LOST} when the kernel failed
    half way.  Handing the socket over needs no bytes held for the client.
    """
    if handing and (ahead or behind):
        log.info("relaying TLS: bytes came with the answer")
        return None
    try:
        why = to_kernel(secured, client=not tls_is_a)
    except OSError as e:
        log.warn("kernel TLS failed: {e}", e=e)
        return _LOST
    if why:
        log.info("relaying TLS, not kernel TLS: {why}", why=why)
        return None
    return KernelSecured(secured.sock)


class _Held(Protocol):
    """What Twisted's TLS delivers while a relay switches to raw sockets."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.lost = False

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        self.data.append(data)

    def connectionLost(self, reason: Failure | None = None) -> None:  # noqa: N802
        self.lost = True


def _relay_in_twisted(
    state: TlsState,
    tls: TLSMemoryBIOProtocol,
    sock: socket.socket,
    stats: RelayStats,
    tls_is_a: bool,
    greeting: bytes,
    early: bytes,
    idle_timeout: float,
) -> None:
    """
    Relay C{tls} and C{sock} through Twisted's transports: the TLS
    connection's application protocol replaced, C{sock} adopted.
    """
    over_tls, over_sock = EagerRelayProtocol(), EagerRelayProtocol()
    a, b = (over_tls, over_sock) if tls_is_a else (over_sock, over_tls)
    state.relays.join(
        a, b, stats, greeting=greeting, early=early, idle_timeout=idle_timeout
    )
    tls.wrappedProtocol = over_tls
    over_tls.makeConnection(tls)
    try:
        adopt_into_reactor(
            state.broker.reactor, sock.detach(), Factory.forProtocol(lambda: over_sock)
        )
    except Exception:
        log.failure("cannot adopt a relayed socket")
        over_tls.abort()


def _both(first: Any, then: Any) -> Any:
    """One callable for two optional ones."""
    if first is None or then is None:
        return first or then

    def both() -> None:
        first()
        then()

    return both
