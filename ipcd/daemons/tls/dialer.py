"""
tlsd's outbound side: dial a remote tlsd with TLS, ask for a service, wait for its ok.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from ipcd.compat import twisted as compat_twisted
from ipcd.daemons.tls.handover import tls_summary
from ipcd.daemons.tls.inbound import why_failed
from ipcd.daemons.tls.material import Material, client_creator, verify_error
from ipcd.errors import Refused
from ipcd.host import IDaemonHost
from ipcd.inboundcore import MAX_HANDSHAKE, OK
from ipcd.logs import printable
from ipcd.owndials import OwnDials
from ipcd.routes import host_port
from ipcd.sockets import stream_endpoint, unzoned
from ipcd.tlsfactory import TLSFactory


@implementer(IHandshakeListener)
class TlsDialer(Protocol):
    """
    The client side of a route, inside TLS: sends the raw service name and
    fires C{done} with the rest of the stream after the raw C{ok}, or fails
    it with L{Refused}.
    """

    def __init__(
        self,
        service: str,
        where: str,
        done: Deferred[Any],
        own_dials: OwnDials | None = None,
    ) -> None:
        self.service = service
        self.where = where
        self.done = done
        # This connection's local end is held there until done fires.
        self.own_dials = own_dials
        self.buffer = b""
        self.tls: dict[str, Any] = {}
        self.handshook = False
        # The PSK identity this route presents, if it presents one.
        self.psk_identity: str | None = None

    def connectionMade(self) -> None:  # noqa: N802
        # Small messages go out at once (as tcpd's inbound side does it).
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        if self.own_dials is not None:
            self.own_dials.hold_until(self.transport.getHost(), self.done)
        self.transport.write(self.service.encode("ascii"))  # sent after the handshake

    def handshakeCompleted(self) -> None:  # noqa: N802
        self.handshook = True
        self.tls = tls_summary(self.transport.getHandle())

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.done.called:
            return
        self.buffer += data
        if len(self.buffer) < len(OK):
            return
        if self.buffer[: len(OK)] == OK:
            rest, self.buffer = self.buffer[len(OK) :], b""
            self.done.callback((self, rest))
        elif self.buffer[:2] != b"ne" or len(self.buffer) > MAX_HANDSHAKE:
            self._fail("it did not answer ok (not a tlsd?)")

    def _fail(self, reason: str) -> None:
        self.done.errback(
            Refused(f"tlsd at {self.where} refused {self.service!r}: {reason}")
        )
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:  # noqa: N802
        if self.done.called:
            return
        if self.buffer.startswith(b"ne"):
            detail = printable(
                self.buffer[2:].removeprefix(b" ").decode("utf-8", "replace")
            )
            self._fail(detail)
        elif not self.handshook:
            why = why_failed(reason) if reason is not None else "closed"
            handle = compat_twisted.tls_connection(self.transport)
            unverified = verify_error(handle) if handle is not None else None
            if unverified is not None and self.psk_identity:
                why = (
                    f"{why} (it answered with a certificate: it takes no "
                    f"pre-shared keys, and this route presents PSK identity "
                    f"{self.psk_identity!r} and accepts no certificate)"
                )
            elif unverified is not None:
                why = f"{why} ({unverified})"
            elif "decrypt error" in why:
                # The far tlsd tells a wrong key from an unknown identity in
                # its own log only.
                why = (
                    f"{why} (its tlsd did not accept our pre-shared key: a wrong "
                    "key, or an identity it does not know; its log says which)"
                )
            self.done.errback(Refused(f"TLS handshake with {self.where} failed: {why}"))
        else:
            self.done.errback(
                Refused(
                    f"tlsd at {self.where} closed the connection for {self.service!r}"
                )
            )


def dial(
    broker: IDaemonHost,
    material: Material,
    host: str,
    port: int,
    service: str,
    watching: bool = False,
) -> Deferred[tuple[TlsDialer, bytes]]:
    """
    Open a TLS connection to the tlsd at C{host:port}, ask for C{service};
    fires with the dialer (its transport: the TLS connection) and the bytes
    after C{ok}.  Cancelling it closes the connection.  C{watching}: the
    connection is watched for kernel TLS.
    """
    where = host_port(host, port)
    connecting: Deferred[Any] | None = None
    dialer: TlsDialer | None = None

    def cancel(_: Any) -> None:
        if dialer is not None and dialer.transport is not None:
            dialer.transport.abortConnection()
        elif connecting is not None:
            # Also once its name is resolved: HostnameEndpoint's Deferred is
            # called then, waiting on its attempts, and cancelling it ends
            # them.  Left alone (it was, when called), a TCP connect went on
            # uncounted, and the connection it made stayed open.
            connecting.cancel()

    done: Deferred[tuple[TlsDialer, bytes]] = Deferred(cancel)

    def build() -> TlsDialer:
        nonlocal dialer
        dialer = TlsDialer(service, where, done, broker.own_dials)
        dialer.psk_identity = material.identity_for(named) or None
        return dialer

    def failed(failure: Failure) -> None:
        if failure.check(CancelledError) or done.called:
            return
        reason = getattr(failure.value, "strerror", None) or why_failed(failure)
        done.errback(Refused(f"cannot connect to tlsd at {where}: {reason}"))

    # A certificate or a PSK identity names the address on every link.
    named = unzoned(host)
    try:
        creator = client_creator(material, named, watching)
    except Exception as e:  # a host name service_identity cannot check
        return refused(f"cannot speak TLS to {host!r}: {e}")
    dialing = Factory.forProtocol(build)
    dialing.noisy = False  # no "Starting factory" line per route
    factory = TLSFactory(creator, True, dialing)
    try:
        endpoint = stream_endpoint(broker.reactor, host, port)
    except Refused as e:  # a zone no interface has
        return refused(e.reason)
    connecting = endpoint.connect(factory)
    connecting.addErrback(failed)
    return done


def refused(reason: str) -> Deferred[Any]:
    failed: Deferred[Any] = Deferred()
    failed.errback(Refused(reason))
    return failed
