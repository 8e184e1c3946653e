"""
The private names of Twisted that ipcd reads: here only.

    L{queued}, L{unsent}, L{holds_nothing}, L{buffered}, L{writes_waiting}
        what a socket transport holds to write (C{_tempDataBuffer},
        C{_tempDataLen}, C{_sendmsgQueue}, C{_writeDisconnecting}): one
        C{sendmsg} for a lookup's answer, a relay's writes in the same
        turn, the TLS relay's switch to raw sockets, the buffered count
    L{tls_state}
        whether a L{TLSMemoryBIOProtocol} may leave Twisted
        (C{_handshakeDone}, C{_lostTLSConnection}, C{_appSendBuffer})
    L{start_placed}
        a placed socket's port started under its name (C{_reservedFD},
        C{_getLogPrefix}, C{_bindPath})
    L{count_accept_errors}
        a listening port's accept errors through ipcd's logger (C{_logger})
    L{add_option}
        a protocol daemon's command-line flag (C{usage.Options._dispatch})
    L{endpoint_type}, L{server_endpoint_types}, L{check_server_arguments}
        an endpoint string checked without listening (C{_parse},
        C{_serverParsers}, C{_parseServer} of C{twisted.internet.endpoints})
    L{endpoint_keywords}, L{endpoint_positionals}, L{endpoint_arguments}
        an endpoint string's arguments (C{_parse}): an C{ssl:} listener's
        key, whether a listener's string gives its backlog, the arguments
        of a listener checked when the configuration loads
    L{check_endpoint_strings}, L{refuse_lone_backslash}
        checks run on every endpoint string before Twisted's tokenizer
        (C{_parse} wrapped): one ending in a lone backslash refused with a
        ValueError, not its tokenizer's RuntimeError

Each answers the public, slower way (or "cannot tell", which callers take as
the safe answer) when its name is gone; see L{ipcd.compat}.  No reactor is
imported here.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable
from typing import Any

from ipcd.compat import Name

LIBRARY = "Twisted"


class _InertReactor:
    """Enough of a reactor for a probe's transport, which is never run."""

    def addReader(self, reader: Any) -> None:  # noqa: N802 (Twisted's name)
        pass

    def removeReader(self, reader: Any) -> None:  # noqa: N802 (Twisted's name)
        pass


def _unix_transport() -> Any:
    """Twisted's UNIX server transport over a socket pair, for probes."""
    from twisted.internet.protocol import Protocol
    from twisted.internet.unix import Server

    ours, theirs = socket.socketpair()
    theirs.close()
    transport = Server(ours, Protocol(), None, None, 0, _InertReactor())
    ours.close()
    return transport


def _has(make: Callable[[], Any], attribute: str) -> Callable[[], bool]:
    return lambda: hasattr(make(), attribute)


def _tls_protocol() -> Any:
    """A client L{TLSMemoryBIOProtocol} that has begun its handshake, for probes."""
    from OpenSSL.SSL import TLS_CLIENT_METHOD, Connection, Context
    from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport
    from twisted.protocols.tls import TLSMemoryBIOFactory
    from zope.interface import implementer

    @implementer(IOpenSSLClientConnectionCreator)
    class Creator:
        def clientConnectionForTLS(self, tls: Any) -> Connection:  # noqa: N802
            connection = Connection(Context(TLS_CLIENT_METHOD), None)
            connection.set_connect_state()
            return connection

    factory = TLSMemoryBIOFactory(
        Creator(), True, Factory.forProtocol(Protocol), clock=Clock()
    )
    tls = factory.buildProtocol(None)
    tls.makeConnection(StringTransport())
    return tls


TEMP_DATA_BUFFER = Name(
    LIBRARY,
    "FileDescriptor._tempDataBuffer",
    "one sendmsg per lookup answer, and the TLS relay on raw sockets",
    "answers go Twisted's way (fd, then 'ok'); TLS relays stay in Twisted",
    _has(_unix_transport, "_tempDataBuffer"),
)
TEMP_DATA_LEN = Name(
    LIBRARY,
    "FileDescriptor._tempDataLen",
    "writes straight to the socket (relays, websocketd)",
    "writes go through the transport's buffer",
    _has(_unix_transport, "_tempDataLen"),
)
SENDMSG_QUEUE = Name(
    LIBRARY,
    "unix.Server._sendmsgQueue",
    "writes straight to a UNIX socket",
    "writes go through the transport's buffer",
    _has(_unix_transport, "_sendmsgQueue"),
)
WRITE_DISCONNECTING = Name(
    LIBRARY,
    "FileDescriptor._writeDisconnecting",
    "a relay's writes in the same reactor turn",
    "the reactor writes on its next turn",
    _has(_unix_transport, "_writeDisconnecting"),
)
TLS_HANDSHAKE_DONE = Name(
    LIBRARY,
    "TLSMemoryBIOProtocol._handshakeDone",
    "the TLS relay on raw sockets",
    "TLS relays stay in Twisted",
    _has(_tls_protocol, "_handshakeDone"),
)
TLS_LOST = Name(
    LIBRARY,
    "TLSMemoryBIOProtocol._lostTLSConnection",
    "the TLS relay on raw sockets",
    "TLS relays stay in Twisted",
    _has(_tls_protocol, "_lostTLSConnection"),
)
TLS_APP_SEND_BUFFER = Name(
    LIBRARY,
    "TLSMemoryBIOProtocol._appSendBuffer",
    "the TLS relay on raw sockets",
    "TLS relays stay in Twisted",
    _has(_tls_protocol, "_appSendBuffer"),
)


def _port_class() -> Any:
    from twisted.internet.tcp import Port

    return Port


PORT_LOGGER = Name(
    LIBRARY,
    "tcp.Port._logger",
    "counting a listener's accept errors",
    "they are logged by Twisted, not counted",
    _has(_port_class, "_logger"),
)


def _options() -> Any:
    from twisted.python.usage import Options

    return Options()


OPTIONS_DISPATCH = Name(
    LIBRARY,
    "usage.Options._dispatch",
    "protocol daemons' command-line flags",
    "set them in the configuration file",
    lambda: isinstance(getattr(_options(), "_dispatch", None), dict),
)


def _endpoints() -> Any:
    from twisted.internet import endpoints

    return endpoints


ENDPOINT_PARSE = Name(
    LIBRARY,
    "endpoints._parse",
    "checking an endpoint string's type when the configuration loads",
    "the type is the text before its first ':'",
    lambda: callable(_endpoints()._parse),
)
SERVER_PARSERS = Name(
    LIBRARY,
    "endpoints._serverParsers",
    "knowing Twisted's built-in server endpoint types",
    "tcp, unix and ssl are taken as the built-in ones",
    lambda: isinstance(_endpoints()._serverParsers, dict),
)
PARSE_SERVER = Name(
    LIBRARY,
    "endpoints._parseServer",
    "checking a tcp or unix endpoint's arguments when the configuration loads",
    "a bad argument is found when ipcd listens",
    lambda: callable(_endpoints()._parseServer),
)


def ends_in_lone_backslash(description: str | bytes) -> bool:
    """
    Whether endpoint string C{description} ends in a C{\\} that escapes
    nothing (an odd run of them: C{\\\\} is one backslash, escaped).
    """
    backslash = "\\" if isinstance(description, str) else b"\\"
    return (len(description) - len(description.rstrip(backslash))) % 2 == 1


# What every endpoint string goes through before Twisted's tokenizer reads it.
_STRING_CHECKS: list[Callable[[str | bytes], None]] = []


def check_endpoint_strings(check: Callable[[str | bytes], None]) -> None:
    """
    Have C{check(description)} run on every endpoint string before
    Twisted's tokenizer (C{endpoints._parse}, run by C{serverFromString} and
    C{clientFromString} before any plugin is asked) reads it; C{check}
    raises ValueError for a string to refuse.  Once per check, in the order
    given; every other string goes to Twisted's parser as it is.

    Importing L{ipcd.endpoints} installs ipcd's (ipcd's plugin, L{IPCService}
    and C{twistd ipcd} import it; C{twistd} loads every plugin that makes a
    service at start, this one among them).  A process that has not
    imported it yet tokenizes with Twisted's alone: Twisted loads endpoint
    plugins only after tokenizing the string.
    """
    if not (ENDPOINT_PARSE.present or ENDPOINT_PARSE.usable()):
        return
    if check not in _STRING_CHECKS:
        _STRING_CHECKS.append(check)
    endpoints = _endpoints()
    parse = endpoints._parse
    if getattr(parse, "checks_strings", False):
        return  # wrapped already: it runs the list

    def checked(description: str | bytes) -> Any:
        for each in _STRING_CHECKS:
            each(description)
        return parse(description)

    checked.checks_strings = True  # type: ignore[attr-defined]
    endpoints._parse = checked


def refuse_lone_backslash() -> None:
    """
    Have Twisted's endpoint strings refuse one ending in a lone C{\\} with
    a ValueError saying so (L{check_endpoint_strings}).  Twisted's tokenizer
    fails there with C{RuntimeError: generator raised StopIteration}, where
    C{serverFromString} and C{clientFromString} document a ValueError.
    """
    check_endpoint_strings(_no_lone_backslash)


def _no_lone_backslash(description: str | bytes) -> None:
    if ends_in_lone_backslash(description):
        raise ValueError(
            f"endpoint string {description!r} ends in a '\\' that escapes "
            "nothing (a backslash itself is written '\\\\')"
        )


def _unix_port_class() -> Any:
    from twisted.internet.unix import Port

    return Port


PREEXISTING_SOCKET = Name(
    LIBRARY,
    "unix.Port._preexistingSocket",
    "keeping a socket-activated RUNDIR socket as systemd made it, and "
    "putting ipcd's own RUNDIR sockets in place in one step (ipcd.placing)",
    "Twisted adopts it (its file mode 0666 until ipcd sets its own, and "
    "removed when ipcd stops: restart the socket unit after ipcd); ipcd's "
    "sockets are bound at their names after the old one is removed",
    _has(_unix_port_class, "_preexistingSocket"),
)


SHOULD_SHUTDOWN = Name(
    LIBRARY,
    "tcp._SocketCloser._shouldShutdown",
    "leaving systemd's listening sockets listening when ipcd stops",
    "stopping ipcd shuts them down for systemd too: restart the socket "
    "units after ipcd",
    _has(_port_class, "_shouldShutdown"),
)


def share_listening_socket(port: Any) -> Any:
    """
    C{port} (a UNIX port on a socket systemd passed) closes its socket
    without C{shutdown()} first, which would stop it listening for systemd
    too (the socket is one, shared); returns C{port}.  Twisted's TCP ports
    do so for an adopted socket already, its UNIX ports not.
    """
    if SHOULD_SHUTDOWN.present or SHOULD_SHUTDOWN.usable():
        port._shouldShutdown = False
    return port


def adopt_unix_port(
    port_class: Any, reactor: Any, sock: socket.socket, factory: Any, mode: int
) -> Any:
    """
    Listen with C{port_class} (a C{unix.Port} whose C{connectionLost} keeps
    the file) on C{sock}, a listening UNIX socket inherited from systemd,
    chmodding its file to C{mode}: what C{reactor.adoptStreamPort} does,
    without its 0666 and without removing the file when the port stops.
    """
    path = sock.getsockname()
    if not (PREEXISTING_SOCKET.present or PREEXISTING_SOCKET.usable()):
        try:
            port = reactor.adoptStreamPort(sock.fileno(), socket.AF_UNIX, factory)
        finally:
            sock.close()  # the port has its own duplicate
        os.chmod(path, mode)
        return share_listening_socket(port)
    port = share_listening_socket(port_class(path, factory, mode=mode, reactor=reactor))
    return start_on_socket(port, sock)


def start_on_socket(port: Any, sock: socket.socket) -> Any:
    """
    Start C{port} (a C{unix.Port}, not listening yet) on C{sock}, a bound
    socket, rather than on one it binds itself; returns C{port}.  Only
    where L{PREEXISTING_SOCKET} is present.
    """
    port._preexistingSocket = sock
    port.startListening()
    return port


def _tcp_module() -> Any:
    from twisted.internet import tcp

    return tcp


def _placed_start_names() -> bool:
    port = _unix_port_class()("/nowhere", None, reactor=_InertReactor())
    return all(
        hasattr(*where)
        for where in (
            (_tcp_module(), "_reservedFD"),
            (port, "_getLogPrefix"),
            (port, "_bindPath"),
        )
    )


PLACED_START = Name(
    LIBRARY,
    "tcp._reservedFD, unix.Port._getLogPrefix and unix.Port._bindPath",
    "naming a socket placed at its name (ipcd.placing) by that name in "
    "Twisted's 'starting on' and 'Closed' lines",
    "those lines name the private path it was bound at, /proc/self/fd/N/NAME",
    _placed_start_names,
)


def start_placed(port: Any, sock: socket.socket, name: str) -> Any:
    """
    L{start_on_socket} for a socket bound at a private path with its mode,
    to be moved to C{name} (L{ipcd.placing}): Twisted's lines about the
    port say C{name}; returns C{port}.

    Twisted's C{startListening} logs and chmods one path, the one the
    socket was bound at; given C{name} instead, its chmod would land on
    whatever is at C{name} before the move.  So its steps for a socket it
    did not make are taken here, with that line naming C{name} and with no
    chmod (the socket was bound with its mode).
    """
    if not (PLACED_START.present or PLACED_START.usable()):
        return start_on_socket(port, sock)
    from twisted.python import log

    _tcp_module()._reservedFD.reserve()  # as Twisted's: for EMFILE at accept
    log.msg(f"{port._getLogPrefix(port.factory)} starting on {name!r}")
    port.factory.doStart()
    sock.listen(port.backlog)
    port.connected = True
    port.socket = sock
    port.fileno = sock.fileno
    port.numberAccepts = 100
    port.startReading()
    # Read by Twisted from now on only for its "(UNIX Port ... Closed)".
    port._bindPath = os.fsencode(name)
    return port


# Transports' write buffers.


def queued(transport: Any) -> bool | None:
    """
    Whether socket transport C{transport} holds bytes or descriptors to
    write; None when this Twisted does not tell (take it as holding some).
    """
    if not (
        (TEMP_DATA_LEN.present or TEMP_DATA_LEN.usable())
        and (SENDMSG_QUEUE.present or SENDMSG_QUEUE.usable())
    ):
        return None
    return bool(
        transport._tempDataLen
        or transport.offset != len(transport.dataBuffer)
        or getattr(transport, "_sendmsgQueue", None)  # AF_UNIX's only
    )


def unsent(transport: Any) -> bytes | None:
    """
    The bytes socket transport C{transport} holds to write, in order; None
    when this Twisted does not tell.
    """
    if not (TEMP_DATA_BUFFER.present or TEMP_DATA_BUFFER.usable()):
        return None
    return transport.dataBuffer[transport.offset :] + b"".join(
        transport._tempDataBuffer
    )


def holds_nothing(transport: Any) -> bool:
    """
    Whether C{transport} is a socket's that holds no bytes to write: false
    for any other transport, and when this Twisted does not tell.
    """
    data = getattr(transport, "dataBuffer", None)
    if (
        data is None
        or data
        or not (TEMP_DATA_BUFFER.present or TEMP_DATA_BUFFER.usable())
    ):
        return False
    return not transport._tempDataBuffer


def buffered(transport: Any) -> int:
    """Bytes socket transport C{transport} holds to write (0 when not told)."""
    held = len(getattr(transport, "dataBuffer", b""))
    if TEMP_DATA_LEN.present or TEMP_DATA_LEN.usable():
        held += getattr(transport, "_tempDataLen", 0)
    return held


def writes_waiting(transport: Any) -> bool:
    """
    Whether socket transport C{transport}, not closing for writing, holds
    bytes the reactor has not written yet (false when this Twisted does not
    tell: then the reactor writes them on its next turn).
    """
    if not (WRITE_DISCONNECTING.present and TEMP_DATA_LEN.present) and not (
        WRITE_DISCONNECTING.usable() and TEMP_DATA_LEN.usable()
    ):
        return False
    return not transport._writeDisconnecting and bool(
        transport.dataBuffer or transport._tempDataLen
    )


# TLS.


def tls_connection(tls: Any) -> Any:
    """The pyOpenSSL Connection of TLS transport C{tls} (public: getHandle)."""
    from OpenSSL.SSL import Connection

    handle = getattr(tls, "getHandle", None)
    connection = handle() if handle is not None else None
    return connection if isinstance(connection, Connection) else None


def tls_state(tls: Any) -> str | None:
    """
    Why L{TLSMemoryBIOProtocol} C{tls} cannot leave Twisted now (empty if it
    can), or None when this Twisted does not tell.
    """
    if not (
        (TLS_HANDSHAKE_DONE.present or TLS_HANDSHAKE_DONE.usable())
        and (TLS_LOST.present or TLS_LOST.usable())
        and (TLS_APP_SEND_BUFFER.present or TLS_APP_SEND_BUFFER.usable())
    ):
        return None
    if not tls._handshakeDone:
        return "handshake not done"
    if tls._lostTLSConnection:
        return "closing"
    if tls._appSendBuffer:
        return "bytes still to encrypt"
    return ""


# Listeners.


def count_accept_errors(port: Any, make_logger: Callable[[Any], Any]) -> bool:
    """
    Route listening C{port}'s accept errors through C{make_logger(its
    logger)}; whether it could be done.
    """
    if not (PORT_LOGGER.present or PORT_LOGGER.usable()):
        return False
    logger = getattr(port, "_logger", None)
    if logger is None:
        return False
    port._logger = make_logger(logger)
    return True


# Command-line options.


def add_option(options: Any, name: str, handler: Callable[[str, Any], None]) -> bool:
    """
    Dispatch long option C{--name} of C{options} (a usage.Options) to
    C{handler(name, value)}; whether it could be done.
    """
    if not (OPTIONS_DISPATCH.present or OPTIONS_DISPATCH.usable()):
        return False
    options._dispatch[name] = handler
    return True


# Endpoint strings.

BUILT_IN_SERVER_TYPES = ("tcp", "unix", "ssl")


def endpoint_type(description: str) -> str:
    """
    The type of endpoint string C{description}, in lower case; ValueError
    (or IndexError) if none.
    """
    if ENDPOINT_PARSE.present or ENDPOINT_PARSE.usable():
        return _endpoints()._parse(description)[0][0].lower()
    kind = description.split(":", 1)[0]
    if not kind:
        raise ValueError("no endpoint type")
    return kind.lower()


def endpoint_keywords(description: str) -> dict[str, str]:
    """
    The C{name=value} arguments of endpoint string C{description}, unescaped
    (C{\\:} is C{:}); ValueError as for L{endpoint_type}.
    """
    if ENDPOINT_PARSE.present or ENDPOINT_PARSE.usable():
        return dict(_endpoints()._parse(description)[1])
    found = {}
    for part in re.split(r"(?<!\\):", description)[1:]:
        name, sep, value = part.partition("=")
        if sep:
            found[name] = value.replace("\\:", ":")
    return found


def endpoint_positionals(description: str) -> list[str]:
    """
    The arguments of endpoint string C{description} given by position,
    after its type, unescaped; ValueError as for L{endpoint_type}.
    """
    if ENDPOINT_PARSE.present or ENDPOINT_PARSE.usable():
        return list(_endpoints()._parse(description)[0][1:])
    parts = re.split(r"(?<!\\):", description)[1:]
    return [part.replace("\\:", ":") for part in parts if "=" not in part]


def endpoint_arguments(description: str) -> tuple[list[str], dict[str, str]]:
    """
    L{endpoint_positionals} and L{endpoint_keywords} of C{description}
    from one parse (Twisted's tokenizer is slow: some 50 us a string).
    """
    if ENDPOINT_PARSE.present or ENDPOINT_PARSE.usable():
        positionals, keywords = _endpoints()._parse(description)
        return list(positionals[1:]), dict(keywords)
    return endpoint_positionals(description), endpoint_keywords(description)


def server_endpoint_types() -> set[str]:
    """Twisted's built-in server endpoint types."""
    if SERVER_PARSERS.present or SERVER_PARSERS.usable():
        return set(_endpoints()._serverParsers)
    return set(BUILT_IN_SERVER_TYPES)


def check_server_arguments(description: str) -> int | None:
    """
    Raise ValueError or TypeError if built-in endpoint C{description}'s
    arguments are not ones its parser takes (nothing when not told); the
    port of a C{tcp} one, as parsed, else None.
    """
    if PARSE_SERVER.present or PARSE_SERVER.usable():
        kind, args, _ = _endpoints()._parseServer(description, None)
        if kind == "TCP":
            return int(args[0])
    return None
