"""
The private names of autobahn that ipcd reads: here only.

    L{feed}          bytes to autobahn's WebSocket parser itself
                     (C{_dataReceived}), past its Twisted adapter's
                     C{dataReceived}, which formats a debug line per read
    L{use_timers}    a factory's timers on ipcd's reactor
                     (C{_batched_timer}) rather than txaio's on the global one
    L{no_extensions} whether a connection negotiated no extension (public:
                     C{websocket_extensions_in_use}), for frames of ipcd's own
    L{made_quietly}  a new connection's setup without pretty-printing its
                     options for a debug line before it is known to be
                     written (the C{pformat} autobahn's protocol module
                     calls)

Each answers the public way when its name is gone; see L{ipcd.compat}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ipcd.compat import Name

LIBRARY = "autobahn"


def _protocol_class() -> Any:
    from autobahn.websocket.protocol import WebSocketProtocol

    return WebSocketProtocol


def _protocol_module() -> Any:
    import autobahn.websocket.protocol as module

    return module


def _factory() -> Any:
    from autobahn.twisted.websocket import WebSocketServerFactory

    return WebSocketServerFactory(reactor=object())  # never run


DATA_RECEIVED = Name(
    LIBRARY,
    "WebSocketProtocol._dataReceived",
    "reads straight to autobahn's parser",
    "reads go through autobahn's Twisted adapter",
    lambda: callable(_protocol_class()._dataReceived),
)
BATCHED_TIMER = Name(
    LIBRARY,
    "WebSocketFactory._batched_timer",
    "WebSocket timers (handshake deadlines, pings) on ipcd's reactor",
    "they run on txaio's timers on the global reactor",
    lambda: callable(_factory()._batched_timer.call_later),
)

OPTIONS_LINE = Name(
    LIBRARY,
    "websocket.protocol.pformat",
    "a connection's options are pretty-printed for autobahn's debug line"
    " only when it is written",
    "they are pretty-printed for every connection (about 400 us), written or not",
    lambda: callable(_protocol_module().pformat),
)


def feed(protocol: Any, data: bytes) -> None:
    """Give C{data} read by C{protocol} (a WebSocket protocol) to autobahn."""
    if DATA_RECEIVED.present or DATA_RECEIVED.usable():
        protocol._dataReceived(data)
    else:
        from autobahn.twisted.websocket import WebSocketAdapterProtocol

        WebSocketAdapterProtocol.dataReceived(protocol, data)


def use_timers(factory: Any, timers: Any) -> None:
    """Make C{factory}'s connections set their timers with C{timers.call_later}."""
    if BATCHED_TIMER.present or BATCHED_TIMER.usable():
        factory._batched_timer = timers


def no_extensions(protocol: Any) -> bool:
    """Whether C{protocol}'s connection negotiated no extension (compression)."""
    return not getattr(protocol, "websocket_extensions_in_use", True)


def made_quietly(made: Callable[[], None]) -> None:
    """
    Call C{made} (autobahn's C{connectionMade}): its C{_connectionMade}
    pretty-prints every option of the connection for a debug line, written
    or not (ipcd drops autobahn's debug lines); meanwhile its module's
    C{pformat} gives what works that out only when the line is written.
    """
    if not (OPTIONS_LINE.present or OPTIONS_LINE.usable()):
        made()
        return
    module = _protocol_module()
    real = module.pformat
    module.pformat = lambda *args, **kwargs: Pretty(real, args, kwargs)
    try:
        made()
    finally:
        module.pformat = real


class Pretty:
    """C{pformat(*args, **kwargs)}, worked out when shown (in a log line)."""

    __slots__ = ("_pformat", "_args", "_kwargs")

    def __init__(
        self,
        pformat: Callable[..., str],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        self._pformat = pformat
        self._args = args
        self._kwargs = kwargs

    def __str__(self) -> str:
        return self._pformat(*self._args, **self._kwargs)

    __repr__ = __str__

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)
