"""
Twisted endpoints for libipc services, and the C{ipc:} endpoint-string
parsers that C{twisted/plugins/ipcd_plugin.py} exposes:

    serverFromString(reactor, "ipc:pong")   # listen at RUNDIR/pong
    clientFromString(reactor, "ipc:pong")   # connect as libipc does

The grammar of both strings is in L{IPCServerParser} and L{IPCClientParser}.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.address import UNIXAddress
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, execute
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    ConnectionDone,
)
from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.internet.interfaces import (
    IFileDescriptorReceiver,
    IProtocolFactory,
    IReactorUNIX,
    IStreamClientEndpoint,
    IStreamClientEndpointStringParserWithReactor,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from ipcd.client import (
    DEFAULT_TIMEOUT,
    EXPECTED_TIMEOUT,
    busy_pauses,
    checked_timeout,
    no_ipcd,
    timeout_option,
)
from ipcd.compat import twisted as compat_twisted
from ipcd.handoff import MAX_REPLY, HandoffError, adopt_into_reactor, check_reply
from ipcd.names import (
    BROKER_NAME,
    MAX_BACKLOG,
    MAX_GID,
    SOCKET_MODE,
    UNIX_BACKLOG,
    checked_socket_path,
    listen_unix,
    socket_path,
    validate_service_name,
)
from ipcd.reactors import IHostReactor
from ipcd.routes import encode_lookup
from ipcd.rundir import resolve_rundir
from ipcd.wire import encode


def _arguments(description: str) -> list[tuple[str | None, str]]:
    """
    Endpoint string C{description}'s parts as Twisted's tokenizer reads
    them, unescaped and in order: C{(key, value)} for C{key=value} (its
    first unescaped C{=}), C{(None, text)} for a part given by position.
    """
    parts: list[tuple[str | None, str]] = []
    key: str | None = None
    text: list[str] = []
    characters = iter(description)
    for character in characters:
        if character == "\\":
            text.append(next(characters, ""))
        elif character == ":":
            parts.append((key, "".join(text)))
            key, text = None, []
        elif character == "=" and key is None:
            key, text = "".join(text), []
        else:
            text.append(character)
    parts.append((key, "".join(text)))
    return parts


def _no_repeated_parameter(description: str | bytes) -> None:
    """
    An C{ipc:} string giving a parameter twice: a ValueError naming it.
    Twisted's tokenizer keeps the last one silently (C{timeout=1:timeout=2}
    was 2 s), before ipcd's parser sees the string.
    """
    if not isinstance(description, str):
        return  # not an ipc: string: its parsers take text
    parts = _arguments(description)
    kind, first = parts[0]
    if kind is not None or first.upper() != IPCClientParser.prefix.upper():
        return
    seen: set[str] = set()
    for key, _ in parts[1:]:
        if key is None:
            continue
        if key in seen:
            raise ValueError(
                f"ipc: parameter {key!r} given twice: give it once (Twisted "
                "would keep the last one given)"
            )
        seen.add(key)


# ipc:pong\ (and any endpoint string ending so): a ValueError saying so,
# not Twisted's tokenizer's RuntimeError; and ipc:pong:timeout=1:timeout=2,
# which it reads as timeout=2.
compat_twisted.refuse_lone_backslash()
compat_twisted.check_endpoint_strings(_no_repeated_parameter)


@implementer(IStreamServerEndpoint)
class IPCServerEndpoint:
    """Listen as service C{name}: C{RUNDIR/NAME}, mode 0660, stale-safe."""

    def __init__(
        self,
        reactor: IReactorUNIX,
        name: str,
        rundir: str | None = None,
        mode: int = SOCKET_MODE,
        backlog: int = UNIX_BACKLOG,
        group: str | int | None = None,
    ) -> None:
        self._reactor = reactor
        self.name = validate_service_name(name)
        self.path = checked_socket_path(resolve_rundir(rundir), self.name)
        if isinstance(mode, bool) or not isinstance(mode, int):
            raise TypeError(f"mode: expected permission bits (0o660), got {mode!r}")
        if not 0 <= mode <= 0o777:
            # Set-id and sticky bits mean nothing on a socket.
            raise ValueError(f"mode: expected permission bits 0-0777, got {mode:#o}")
        expected = f"backlog: expected a number from 1 to {MAX_BACKLOG}"
        if isinstance(backlog, bool) or not isinstance(backlog, int):
            # Else a float failed only when listening, an str at '<='.
            raise TypeError(f"{expected}, got {backlog!r}")
        if not 1 <= backlog <= MAX_BACKLOG:
            raise ValueError(f"{expected}, got {backlog}")
        self._mode = mode
        self._backlog = backlog
        self._group = _checked_group(group)

    def listen(self, factory: IProtocolFactory) -> Deferred[Any]:
        return execute(
            listen_unix,
            self._reactor,
            self.path,
            factory,
            self._mode,
            self._backlog,
            self._group,
        )


def _checked_group(group: str | int | None) -> str | None:
    """
    C{group} as the listen takes it, a name or a number (a gid given as an
    int, its digits); else an error naming it, now: when listening, a gid
    given as an int was a C{TypeError} from C{getgrnam}, a NUL C{embedded
    null byte}, a gid past L{MAX_GID} an C{OverflowError} or (4294967295)
    the socket left in the process's group.
    """
    if group is None:
        return None
    expected = f"group: expected a group name or number, got {group!r}"
    if isinstance(group, bool) or not isinstance(group, str | int):
        raise TypeError(expected)
    if isinstance(group, int):
        if not 0 <= group <= MAX_GID:
            raise ValueError(expected)
        return str(group)
    if not group or "\0" in group:
        raise ValueError(expected)
    return group


@implementer(IFileDescriptorReceiver)
class _LookupClient(Protocol):
    """Sends one lookup and waits for C{ok} + fd (or C{ne ...})."""

    def __init__(self, payload: bytes, result: Deferred[int]) -> None:
        self._payload = payload
        self._result = result
        self._data = b""
        self._fds: list[int] = []

    def connectionMade(self) -> None:
        self.transport.write(encode(self._payload))

    def fileDescriptorReceived(self, descriptor: int) -> None:
        if self._fds or self._result.called:
            # Only the first may be the answer: a server sending more fills
            # no descriptor table.
            os.close(descriptor)
        else:
            self._fds.append(descriptor)

    def dataReceived(self, data: bytes) -> None:
        self._data += data
        if self._data[:2] == b"ok" and self._fds:
            self._finish()
            self.transport.loseConnection()
        elif len(self._data) >= MAX_REPLY:
            # Judged as the blocking client judges it: no answer of ipcd's
            # is that long, and nothing more is held for one.
            self._finish()
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._finish()

    def _finish(self) -> None:
        if self._result.called:
            for fd in self._fds:
                os.close(fd)
            self._fds = []
            return
        fds, self._fds = self._fds, []
        try:
            fd = check_reply(self._data, fds)
        except HandoffError:
            self._result.errback()
        else:
            self._result.callback(fd)


@implementer(IStreamClientEndpoint)
class IPCClientEndpoint:
    """
    Connect to a libipc service as libipc does: straight to C{RUNDIR/NAME},
    or, when C{network} (default: C{$IPC_NETWORK}) is set, through ipcd,
    adopting the connection it hands over.

    C{connect()} may be cancelled, and is after C{timeout} seconds
    (L{twisted.internet.defer.TimeoutError}): either closes the lookup
    connection to ipcd.  A listener whose backlog is full is tried again
    until then.  Cancelled, it fails with C{CancelledError} through ipcd,
    C{ConnectingCancelledError} when direct.
    """

    def __init__(
        self,
        reactor: IHostReactor,
        service: str,
        rundir: str | None = None,
        network: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self._reactor = reactor
        self.service = validate_service_name(service)
        self.rundir = resolve_rundir(rundir)
        self.network = os.environ.get("IPC_NETWORK") if network is None else network
        self._timeout = checked_timeout(timeout)
        # The one socket connect() will reach: judged now, not in the reactor.
        checked_socket_path(self.rundir, BROKER_NAME if self.network else self.service)

    def _unix(
        self, name: str, factory: IProtocolFactory, bounded: bool = True
    ) -> Deferred[Any]:
        """
        Connect to C{RUNDIR/NAME}; a failure names that path.  Not
        C{bounded}, a full backlog is waited on until the caller cancels.
        """
        path = socket_path(self.rundir, name)

        def unreachable(failure: Failure) -> Failure:
            error = failure.value
            if isinstance(error, ConnectError) and error.osError:
                why = error.args[0] if error.args else ""
                if name == BROKER_NAME:
                    text = no_ipcd(path, why)
                else:
                    text = f"cannot reach service {name!r} at {path}: {why}"
                # The same class, as callers trap it, now saying where.
                return Failure(type(error)(error.osError, text))
            return failure

        dialing = Deferred.fromCoroutine(self._dial(name, path, factory, bounded))
        return dialing.addErrback(unreachable)

    async def _dial(
        self, name: str, path: str, factory: IProtocolFactory, bounded: bool
    ) -> Any:
        """
        Connect to C{path}, trying again while its listener's backlog is
        full, as the blocking client does, until the timeout.  AF_UNIX
        refuses such a connect at once (EAGAIN), where Twisted's connector
        failed with C{An error occurred while connecting: [Failure
        instance: ... ConnectionDone ...]}.
        """
        # Started once for all the attempts: Twisted's connector starts and
        # stops the factory for each, and a noisy one (Factory's default)
        # logged "Starting factory" and "Stopping factory" every time, 45
        # lines a second while the backlog stayed full.
        factory.doStart()
        try:
            return await self._attempts(name, path, factory, bounded)
        finally:
            factory.doStop()

    async def _attempts(
        self, name: str, path: str, factory: IProtocolFactory, bounded: bool
    ) -> Any:
        """L{_dial}'s connects, and the pauses between them."""
        timeout, deadline = self._timeout, None
        for pause in busy_pauses():
            endpoint = UNIXClientEndpoint(self._reactor, path, timeout=timeout)
            try:
                return await endpoint.connect(factory)
            except ConnectError as e:
                if not _backlog_full(e):
                    raise
            if bounded:
                now = self._reactor.seconds()  # (only here: a MemoryReactor has none)
                deadline = now + self._timeout if deadline is None else deadline
                if now + pause >= deadline:
                    raise self._busy(name, path)
            try:
                await deferLater(self._reactor, pause, lambda: None)
            except CancelledError:
                # As when cancelled while connecting (Twisted's endpoint's),
                # not a CancelledError for a cancel between two connects.
                raise ConnectingCancelledError(UNIXAddress(path)) from None
            if bounded:
                # A pause can end late on a loaded machine, past the deadline.
                timeout = deadline - self._reactor.seconds()
                if timeout <= 0:
                    raise self._busy(name, path)

    def _busy(self, name: str, path: str) -> ConnectTimeout:
        """The error of a listener busy for the whole timeout."""
        what = "ipcd" if name == BROKER_NAME else f"service {name!r}"
        return ConnectTimeout(
            string=f"cannot reach {what} at {path}: its listener stayed "
            f"busy (backlog full) for {self._timeout:g} s"
        )

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        if not self.network:
            return self._unix(self.service, factory)
        payload = encode_lookup(self.service, self.network)
        clients: list[_LookupClient] = []

        def build() -> _LookupClient:
            clients.append(_LookupClient(payload, received))
            return clients[-1]

        def cancel(_: Deferred[int]) -> None:
            connecting.cancel()  # not connected yet: stop trying
            for client in clients:  # connected: close, and any fd it got
                client.transport.abortConnection()

        received: Deferred[int] = Deferred(cancel)
        asking = Factory.forProtocol(build)
        asking.noisy = False  # no "Starting factory" line per connection
        # Bounded by received's timeout, which says so as documented.
        connecting = self._unix(BROKER_NAME, asking, bounded=False)

        def failed(failure: Failure) -> None:
            # Our own cancel: received fails with CancelledError right after.
            if not failure.check(ConnectingCancelledError):
                received.errback(failure)

        connecting.addErrback(failed)

        def timed_out(result: Any, timeout: float) -> Any:
            if isinstance(result, Failure) and result.check(CancelledError):
                where = socket_path(self.rundir, BROKER_NAME)
                raise TimeoutError(
                    f"no answer from ipcd at {where} within {timeout:g} s"
                )
            return result

        received.addTimeout(self._timeout, self._reactor, onTimeoutCancel=timed_out)
        return received.addCallback(
            lambda fd: adopt_into_reactor(self._reactor, fd, factory)
        )


def _backlog_full(error: ConnectError) -> bool:
    """
    Whether a UNIX connect failed as Twisted's connector fails on a full
    backlog: the EAGAIN taken for "in progress", then the unconnected
    socket's hangup, a C{ConnectionDone} in a C{ConnectError} with no errno
    (a refused or missing socket has its errno).
    """
    cause = error.args[0] if error.args else None
    return (
        error.osError is None
        and isinstance(cause, Failure)
        and cause.check(ConnectionDone) is not None
    )


def _named(endpoint: str, name: str, unknown: dict[str, str]) -> str:
    """
    The service name: the positional part, else a C{name=} (as Twisted's
    own parsers take their positional parts).  The parsers' own arguments
    are positional-only, so C{reactor=}, C{self=} and C{name=} come here
    in C{unknown}, not as a C{TypeError} about a method's arguments.
    """
    if "name" not in unknown:
        return name
    if name:
        raise ValueError(
            f"{endpoint}: the service name given twice, as {name!r} and as "
            f"name={unknown['name']!r}"
        )
    return unknown.pop("name")


def _check_parts(
    endpoint: str,
    name: str,
    extra: tuple[str, ...],
    unknown: dict[str, str],
    known: str,
) -> None:
    """
    An C{ipc:} string has one positional part, the name: another one is
    mostly a value whose C{:} was not escaped.  Say so, and how to fix it.
    """
    if not name:
        raise ValueError(
            f"{endpoint}: no service name: expected ipc:NAME, then parameters: " + known
        )
    if extra:
        raise ValueError(
            f"{endpoint}: unexpected part {':'.join(extra)!r} after the service "
            "name: a ':' inside a value must be escaped as '\\:' (as in "
            "ipc:cnt:network=cnt unix\\://counter); parameters: " + known
        )
    if unknown:
        raise ValueError(
            f"{endpoint}: unknown parameter {sorted(unknown)[0]!r}; "
            "parameters: " + known
        )


@implementer(IPlugin, IStreamServerEndpointStringParser)
class IPCServerParser:
    """
    C{serverFromString(reactor, "ipc:NAME[:rundir=DIR][:mode=OCTAL]
    [:backlog=N][:group=GROUP]")}: listen as libipc service NAME at
    C{RUNDIR/NAME}, with upstream's permissions and stale-socket handling.

      - C{NAME}: the service name, 1-255 of C{[A-Za-z0-9._-]}, the one
        positional part;
      - C{rundir}: the socket directory (default: C{$RUNDIR}, else
        C{/tmp/libipc-run});
      - C{mode}: the socket's permissions, in octal, at most C{0777}
        (default C{0660});
      - C{backlog}: the listen backlog, from 1 to 2147483647 (default 128);
      - C{group}: a group name or number to own the socket (default: the
        process's).

    As in every endpoint string, C{:} separates parts and a C{:} or C{\\}
    inside a value is escaped with a backslash.  Examples::

        ipc:pong
        ipc:upper:rundir=/run/libipc:mode=0600
        ipc:authd:group=wheel:backlog=512
    """

    prefix = "ipc"
    parameters = "rundir=, mode=, backlog=, group="

    def parseStreamServer(  # noqa: N802 (Twisted's name)
        self, reactor: IHostReactor, /, *args: str, **kwargs: str
    ) -> IPCServerEndpoint:
        return self._server(reactor, *args, **kwargs)

    def _server(
        self,
        reactor: IHostReactor,
        name: str = "",
        /,
        *extra: str,
        rundir: str | None = None,
        mode: str = "0660",
        backlog: str = str(UNIX_BACKLOG),
        group: str | None = None,
        **unknown: str,
    ) -> IPCServerEndpoint:
        name = _named("ipc: server endpoint", name, unknown)
        _check_parts("ipc: server endpoint", name, extra, unknown, self.parameters)
        return IPCServerEndpoint(
            reactor,
            name,
            rundir,
            _number("mode", mode, 8),
            _number("backlog", backlog, 10),
            group,
        )


@implementer(IPlugin, IStreamClientEndpointStringParserWithReactor)
class IPCClientParser:
    """
    C{clientFromString(reactor, "ipc:NAME[:rundir=DIR][:network=ROUTES]
    [:timeout=SECONDS]")}: connect to libipc service NAME as libipc does.

      - C{NAME}: the service name, the one positional part;
      - C{rundir}: the socket directory (default: C{$RUNDIR}, else
        C{/tmp/libipc-run});
      - C{network}: the C{IPC_NETWORK} routes (default: the variable's
        value); non-empty, the connection is asked of ipcd at C{RUNDIR/ipc}
        and the descriptor it hands over is adopted; empty, straight to
        C{RUNDIR/NAME};
      - C{timeout}: seconds for the connect and the lookup, above 0 and at
        most a year (default 10, more than ipcd's own C{connect_timeout}).

    The routes' C{://} must be escaped as C{\\://} (a bare C{:} separates
    parts, and a stray part is an error saying so).  Examples::

        ipc:pong
        ipc:pong:rundir=/run/libipc:timeout=2
        ipc:cnt:network=cnt unix\\://counter
        ipc:pong:network=pong tcp\\://10.0.0.2\\:9000/pong
        ipc:pong:network=              (direct, whatever $IPC_NETWORK says)
    """

    prefix = "ipc"
    parameters = "rundir=, network=, timeout="

    def parseStreamClient(  # noqa: N802 (Twisted's name)
        self, reactor: IHostReactor, /, *args: str, **kwargs: str
    ) -> IPCClientEndpoint:
        return self._parseClient(reactor, *args, **kwargs)

    def _parseClient(  # noqa: N802 (as Twisted's own parsers)
        self,
        reactor: IHostReactor,
        name: str = "",
        /,
        *extra: str,
        rundir: str | None = None,
        network: str | None = None,
        timeout: str = str(DEFAULT_TIMEOUT),
        **unknown: str,
    ) -> IPCClientEndpoint:
        name = _named("ipc: client endpoint", name, unknown)
        _check_parts("ipc: client endpoint", name, extra, unknown, self.parameters)
        try:
            seconds = timeout_option(timeout)
        except ValueError:
            why = f"ipc: timeout: {EXPECTED_TIMEOUT}, got {timeout!r}"
            raise ValueError(why) from None
        return IPCClientEndpoint(reactor, name, rundir, network, seconds)


def _number(key: str, text: str, base: int) -> int:
    try:
        # Digits only (a minus, for the range's message): int() reads '١٢'
        # as 12, '０６００' and '0o6_00' as 0o600, ' +12' as 12.
        digits = text.removeprefix("-")
        if not (digits.isascii() and digits.isdigit()):
            raise ValueError(text)
        return int(text, base)
    except ValueError:
        kind = "an octal number" if base == 8 else "a number"
        raise ValueError(f"ipc: {key}: expected {kind}, got {text!r}") from None
