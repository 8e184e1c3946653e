"""
The private names of autobahn that ipcd reads: here only.

    L{feed}          bytes to autobahn's WebSocket parser itself
                     (C{_dataReceived}), past its Twisted adapter's
                     C{dataReceived}, which formats a debug line per read
    L{use_timers}    a factory's timers on ipcd's reactor
                     (C{_batched_timer}) rather than txaio's on the global one
    L{no_extensions} whether a connection negotiated no extension (public:
                     C{websocket_extensions_in_use}), for frames of ipcd's own

Each answers the public way when its name is gone; see L{ipcd.compat}.
"""

from __future__ import annotations

from typing import Any

from ipcd.compat import Name

LIBRARY = "autobahn"


def _protocol_class() -> Any:
    from autobahn.websocket.protocol import WebSocketProtocol

    return WebSocketProtocol


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
