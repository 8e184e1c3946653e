"""
tlsd's inbound side: a remote peer's TLS handshake, labels and failures.
"""

from __future__ import annotations

import socket
from dataclasses import replace
from typing import TYPE_CHECKING

from service_identity import VerificationError
from twisted.internet.interfaces import IHandshakeListener
from twisted.python.failure import Failure
from zope.interface import implementer

from ipcd.compat import twisted as compat_twisted
from ipcd.daemons.tcp import TcpInbound
from ipcd.daemons.tls import psk
from ipcd.daemons.tls.handover import TlsRelayStats, relay_over, tls_summary
from ipcd.daemons.tls.material import Material, certificate_labels
from ipcd.inbound import HandshakeFactory
from ipcd.logs import printable
from ipcd.proxied import HeaderRefused
from ipcd.relay import RelayStats

if TYPE_CHECKING:
    from ipcd.daemons.tls.daemon import TlsState


@implementer(IHandshakeListener)
class TlsInbound(TcpInbound):
    """A remote peer on tlsd's listener: TLS first, then tcpd's request."""

    route = "tls inbound"
    layer = "TLS"
    stats_type = TlsRelayStats

    def handshakeCompleted(self) -> None:  # noqa: N802 (Twisted's name)
        # TLS's bytes follow any PROXY header: its address is known now.
        self._addressed = True
        self.readdress()
        connection = self.transport.getHandle()
        who = self.who
        labels = set(who.labels)
        identity = psk.psk_identity(connection)
        shown = ""
        if identity is not None:
            labels.add(f"psk:{identity}")
            shown = f"psk:{identity}"
        else:
            certificate = connection.get_peer_certificate()
            if certificate is not None:
                found = certificate_labels(certificate.to_cryptography())
                labels.update(found)
                shown = found[0] if found else "certificate"
        self.tls = {**tls_summary(connection), "peer": shown or None}
        described = f"{who.description} ({shown})" if shown else who.description
        # The same peer (its address among them), known by more labels.
        secured = replace(who, description=described, labels=frozenset(labels))
        self.act(self.core.secured(secured))
        if not shown and self.factory.must_authenticate():
            self.factory.failed(
                "refused, no client certificate or key",
                "refusing {who}: no client certificate or key",
                who=str(self.who),
            )
            self.act(self.core.refuse("client authentication required"))

    def relay(
        self, sock: socket.socket, stats: RelayStats, greeting: bytes, early: bytes
    ) -> None:
        if isinstance(stats, TlsRelayStats):
            stats.tls = self.tls
        # The connection stays in its transport (and under its listener's
        # limits until it closes): only its application protocol changes.
        relay_over(
            self.factory.state,
            self.transport,
            sock,
            stats,
            tls_is_a=True,
            greeting=greeting,
            early=early,
            idle_timeout=self.factory.idle_timeout,
        )

    def connectionLost(self, reason: Failure | None = None) -> None:  # noqa: N802
        # (A TLS handshake that timed out is said already; so is a refused
        # PROXY header, before any TLS.)
        if (
            self.core.securing
            and reason is not None
            and not reason.check(HeaderRefused)
        ):
            if not self._addressed:  # (a header may have come before TLS)
                self.readdress()
            identity = None
            unknown = False
            handle = compat_twisted.tls_connection(self.transport)
            if handle is not None:
                identity = psk.offered_identity(handle)
                unknown = psk.offered_unknown(handle)
            said = f" (PSK identity {identity!r})" if identity else ""
            why = why_failed(reason)
            if identity and unknown:
                why = f"unknown PSK identity {identity!r} ({why})"
            elif identity and any(word in why for word in _WRONG_KEY):
                why = f"wrong key for PSK identity {identity!r} ({why})"
            self.factory.failed(
                "TLS handshakes failed",
                "TLS handshake with {who}{said} failed: {why}",
                who=str(self.who),
                said=said,
                why=why,
            )
        super().connectionLost(reason)


# What OpenSSL says when a PSK's key differs between the peers: the TLS 1.3
# binder, or TLS 1.2's first encrypted record, does not check out.
_WRONG_KEY = ("binder does not verify", "decrypt", "bad record mac")


def why_failed(reason: Failure) -> str:
    value = reason.value
    if isinstance(value, VerificationError):
        return "the certificate is not for this host name"
    args = getattr(value, "args", ())
    if args and isinstance(args[0], list) and args[0]:
        return "; ".join(str(e[-1]) for e in args[0] if isinstance(e, tuple))
    return printable(str(value) or type(value).__name__)


class TlsHandshakeFactory(HandshakeFactory):
    """
    tlsd's listener's L{HandshakeFactory}: must clients prove who they are?
    Its failed handshakes are counted and logged at a bounded rate
    (L{HandshakeFactory.failed}): a peer can fail them as fast as it can
    connect.
    """

    def must_authenticate(self) -> bool:
        return self.material().verify_clients

    # tlsd's state, set by the service that builds this factory.
    state: TlsState

    def material(self) -> Material:
        return self.state.material()
