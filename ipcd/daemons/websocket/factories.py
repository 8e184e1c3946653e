"""
What websocketd gives autobahn's factories and connections, both ways.

Protocol options and message bounds from C{[websocketd]}, the reactor's
timers (L{ReactorTimer}), TCP no-delay, and how a TLS failure reads.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from ipcd.daemons.websocket.limits import MessageBounds
from ipcd.logs import printable


class ReactorTimer:
    """
    autobahn's timers (handshake deadlines, pings) on an injected reactor,
    in place of txaio's batched timers on the global one.
    """

    def __init__(self, reactor: IReactorTime) -> None:
        self.reactor = reactor

    def call_later(self, delay: float, func: Any, *args: Any, **kwargs: Any) -> Any:
        return _Call(self.reactor.callLater(delay, func, *args, **kwargs))


class _Call:
    """A delayed call that may be cancelled after it ran (autobahn does)."""

    def __init__(self, call: Any) -> None:
        self.call = call

    def cancel(self) -> None:
        if self.call.active():
            self.call.cancel()


def tls_failure(reason: Failure | None) -> tuple[str | None, Failure | None]:
    """
    For a connection lost to a TLS error: OpenSSL's last reason
    (C{certificate verify failed}: the TLS layer's, after its causes deeper
    in the library), and a plain C{ConnectionLost} to hand autobahn in its
    place, which would log it as C{"SSL error: ... (in )"} at error level.
    Else C{(None, reason)}.
    """
    if reason is None or not reason.check(SSL.Error):
        return None, reason
    error = reason.value
    errors = error.args[0] if error.args and isinstance(error.args[0], list) else []
    reasons = [str(e[-1]) for e in errors if isinstance(e, tuple) and e]
    why = reasons[-1] if reasons else printable(str(error)) or "unknown"
    return why, Failure(ConnectionLost(f"TLS handshake failed: {why}"))


def bridge_options(settings: Any) -> dict[str, Any]:
    """autobahn's protocol options from websocketd's settings, both ways."""
    size = settings["max_message_size"]
    return {
        "maxMessagePayloadSize": size,
        "maxFramePayloadSize": size,
        "autoPingInterval": settings["ping_interval"],
        "autoPingTimeout": settings["ping_timeout"],
        "openHandshakeTimeout": settings["open_handshake_timeout"],
        "closeHandshakeTimeout": settings["close_handshake_timeout"],
    }


def message_bounds(settings: Any) -> MessageBounds:
    """websocketd's bounds on one message that autobahn has no options for."""
    return MessageBounds(settings["max_message_frames"], settings["message_timeout"])


def no_delay(transport: Any) -> None:
    """
    TCP_NODELAY on the TCP connection under C{transport} (through TLS):
    autobahn tries before its options are set, and so never does.
    """
    while transport is not None:
        setter = getattr(type(transport), "setTcpNoDelay", None)
        if setter is not None:
            try:
                transport.setTcpNoDelay(True)
            except OSError:
                pass  # not TCP after all
            return
        transport = getattr(transport, "transport", None)
