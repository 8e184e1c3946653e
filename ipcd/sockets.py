"""
Non-blocking socket steps driven by the reactor, on sockets the reactor does
not own.

Sockets that ipcd hands to a client must stay pristine: a Twisted transport
would read past a handshake reply and shut the socket down when it closes.
So connects and handshakes run here on plain sockets, waiting for readiness
with C{addReader}/C{addWriter}, and read exactly the bytes they are owed.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import select
import socket
from typing import Any

from twisted.internet.address import IPv6Address
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import (
    IReactorFDSet,
    IReactorPluggableNameResolver,
    IReactorTime,
    IReadDescriptor,
    IResolutionReceiver,
    IWriteDescriptor,
)
from twisted.internet.task import deferLater
from zope.interface import implementer

from ipcd.errors import Refused
from ipcd.policy import zone_index
from ipcd.reactors import IFDReactor


@implementer(IReadDescriptor, IWriteDescriptor)
class _Readiness:
    """Fires a Deferred once when C{sock} becomes readable or writable."""

    def __init__(
        self, reactor: IReactorFDSet, sock: socket.socket, writing: bool
    ) -> None:
        self._reactor = reactor
        self._sock = sock
        self._writing = writing
        self.deferred: Deferred[None] = Deferred(lambda d: self._stop())
        (reactor.addWriter if writing else reactor.addReader)(self)

    def fileno(self) -> int:
        return self._sock.fileno()

    def logPrefix(self) -> str:  # noqa: N802 (Twisted's name)
        return "ipcd.sockets"

    def _stop(self) -> None:
        (self._reactor.removeWriter if self._writing else self._reactor.removeReader)(
            self
        )

    def _ready(self) -> None:
        self._stop()
        if not self.deferred.called:
            self.deferred.callback(None)

    doRead = doWrite = _ready  # noqa: N815 (Twisted's names)

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        if not self.deferred.called:
            self.deferred.errback(reason)


def wait_readable(reactor: IReactorFDSet, sock: socket.socket) -> Deferred[None]:
    return _Readiness(reactor, sock, writing=False).deferred


def wait_writable(reactor: IReactorFDSet, sock: socket.socket) -> Deferred[None]:
    return _Readiness(reactor, sock, writing=True).deferred


def discard_unread(transport: Any, limit: int = 256 * 1024) -> None:
    """
    Read and drop what the peer of a Twisted C{transport} has sent and
    nobody will read (up to C{limit} bytes): closing a socket with unread
    data resets the connection, and the peer could lose the answer written
    just before.
    """
    handle = getattr(transport, "getHandle", None)
    sock = handle() if handle is not None else None
    recv = getattr(sock, "recv", None)
    if recv is None or hasattr(sock, "bio_read"):
        # Not a socket: an in-memory transport, or TLS (its handle is
        # OpenSSL's memory-BIO connection: what is unread is its handshake).
        return
    try:
        while limit > 0:
            chunk = recv(min(limit, 65536), socket.MSG_DONTWAIT)
            if not chunk:
                return
            limit -= len(chunk)
    except OSError:
        pass  # nothing more now (EAGAIN), or the peer is gone


def peer_closed(transport: Any) -> bool:
    """
    Whether the peer of a Twisted C{transport}'s socket has closed it, not
    only shut its writing half: both read as EOF, but Linux polls a socket
    whose peer is gone (or that shut both halves) as HUP.  C{False} when
    there is no socket to ask.
    """
    try:
        fd = transport.getHandle().fileno()
    except (AttributeError, OSError):
        return False
    if fd < 0:
        return True
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(event & (select.POLLHUP | select.POLLERR) for _, event in poller.poll(0))


def with_deadline(
    d: Deferred[Any], seconds: float, clock: IReactorTime, what: str
) -> Deferred[Any]:
    """Cancel C{d} after C{seconds}; the failure then says C{what} timed out."""

    def on_timeout(result: Any, timeout: float) -> Any:
        raise Refused(f"{what} timed out after {timeout:g} s")

    return d.addTimeout(seconds, clock, onTimeoutCancel=on_timeout)


def new_socket(family: int) -> socket.socket:
    return socket.socket(
        family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
    )


def _try_connect_unix(sock: socket.socket, path: str, service: str, shown: str) -> bool:
    """
    One non-blocking C{connect()}: whether it is done (C{False}: the
    listener's backlog is full); L{Refused} says why it cannot be.
    """
    try:
        sock.connect(path)
        return True
    except FileNotFoundError:
        raise Refused(f"no route to service {service!r}: {shown} does not exist")
    except ConnectionRefusedError:
        raise Refused(f"service {service!r} is not running (stale socket {shown})")
    except BlockingIOError:
        return False
    except OSError as e:
        raise Refused(f"cannot connect to service {service!r}: {e.strerror}")


def connect_unix_now(
    path: str, service: str, shown: str | None = None
) -> socket.socket | None:
    """
    L{open_unix} without waiting: the connected socket, or C{None} when the
    listener's backlog is full and the connect would have to wait.
    """
    sock = new_socket(socket.AF_UNIX)
    try:
        if _try_connect_unix(sock, path, service, path if shown is None else shown):
            return sock
    except BaseException:
        sock.close()
        raise
    sock.close()
    return None


async def open_unix(
    reactor: IFDReactor, path: str, service: str, shown: str | None = None
) -> socket.socket:
    """Connect to C{path}; messages name C{shown} (default: C{path})."""
    shown = path if shown is None else shown
    sock = new_socket(socket.AF_UNIX)
    try:
        delay = 0.001
        while not _try_connect_unix(sock, path, service, shown):
            # The listener's backlog is full; AF_UNIX gives no completion
            # event, so try again shortly (the caller's deadline bounds it).
            await deferLater(reactor, delay, lambda: None)
            delay = min(delay * 2, 0.05)
        return sock
    except BaseException:
        sock.close()
        raise


def connect_unix(
    reactor: IFDReactor,
    path: str,
    service: str,
    timeout: float,
    shown: str | None = None,
) -> Deferred[socket.socket]:
    """
    Connect to the UNIX socket C{path} (service C{service} at C{shown}, for
    messages).
    """
    return with_deadline(
        ensureDeferred(open_unix(reactor, path, service, shown)),
        timeout,
        reactor,
        f"connecting to service {service!r}",
    )


async def read_exactly(
    reactor: IReactorFDSet, sock: socket.socket, count: int
) -> bytes:
    """Read exactly C{count} bytes, not one more, from a non-blocking socket."""
    data = b""
    while len(data) < count:
        try:
            chunk = sock.recv(count - len(data))
        except BlockingIOError:
            await wait_readable(reactor, sock)
            continue
        except OSError as e:
            raise ConnectionLost(e.strerror)
        if not chunk:
            raise ConnectionLost(f"closed after {len(data)} of {count} bytes")
        data += chunk
    return data


async def read_to_eof(reactor: IReactorFDSet, sock: socket.socket, limit: int) -> bytes:
    """Read until the peer closes (or errs), at most C{limit} bytes."""
    data = b""
    while len(data) < limit:
        try:
            chunk = sock.recv(limit - len(data))
        except BlockingIOError:
            await wait_readable(reactor, sock)
            continue
        except OSError:
            break
        if not chunk:
            break
        data += chunk
    return data


async def write_all(reactor: IReactorFDSet, sock: socket.socket, data: bytes) -> None:
    """Write all of C{data} to a non-blocking socket."""
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            await wait_writable(reactor, sock)
            continue
        except OSError as e:
            raise ConnectionLost(e.strerror)
        view = view[sent:]


async def connect_tcp(
    reactor: IReactorFDSet, address: tuple[Any, ...], family: int
) -> socket.socket:
    """Connect a non-blocking TCP socket to a resolved C{address}."""
    sock = new_socket(family)
    try:
        err = sock.connect_ex(address)
        if err == errno.EINPROGRESS:
            try:
                await wait_writable(reactor, sock)
            except ConnectionLost:
                # The reactor saw an error or hangup (a refused connect, under
                # epoll) instead of writability: SO_ERROR says which.
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                err = err or errno.ECONNABORTED
            else:
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
        return sock
    except BaseException:
        sock.close()
        raise


@implementer(IResolutionReceiver)
class _Addresses:
    """
    Collects what C{IHostnameResolver.resolveHostName} finds as socket
    addresses; C{done} fires with them, in the resolver's order.
    """

    def __init__(self) -> None:
        self.found: list[tuple[int, Any]] = []
        self.done: Deferred[list[tuple[int, Any]]] = Deferred()

    def resolutionBegan(self, resolution: Any) -> None:  # noqa: N802
        pass

    def addressResolved(self, address: Any) -> None:  # noqa: N802
        if isinstance(address, IPv6Address):
            where = (address.host, address.port, address.flowInfo, address.scopeID)
            self.found.append((socket.AF_INET6, where))
        else:
            self.found.append((socket.AF_INET, (address.host, address.port)))

    def resolutionComplete(self) -> None:  # noqa: N802
        self.done.callback(self.found)


async def resolve_host(
    reactor: IReactorPluggableNameResolver, host: str, port: int
) -> list[tuple[int, Any]]:
    """
    C{host}'s stream addresses as C{(family, sockaddr)}, by the reactor's
    C{nameResolver} (an C{IHostnameResolver}: getaddrinfo in the reactor's
    thread pool by default, or whatever resolver the application installed).
    None found raises C{OSError("no address found")} (the resolver does not
    say why); a name that the IDNA codec cannot encode, C{UnicodeError}.
    """
    # getaddrinfo would raise it in the resolver's thread, and the resolver
    # would never say that it completed.
    host.encode("idna")
    receiver = _Addresses()
    reactor.nameResolver.resolveHostName(receiver, host, port)
    found = await receiver.done
    if not found:
        raise OSError("no address found")
    return found


def ip6_sockaddr(host: str, port: int) -> tuple[Any, ...]:
    """
    What C{connect} takes for IPv6 address C{host}: with the scope id of
    its zone, if it has one (C{fe80::1%eth0}, C{fe80::1%2}: a route's,
    checked by ipcd.routes).  A 2-tuple drops the zone (CPython sets scope
    id 0), and the kernel refuses a link-local connect without one
    (EINVAL).  L{Refused} when no interface has that name now.
    """
    bare, _, zone = host.partition("%")
    if not zone:
        return host, port
    index = zone_index(zone)
    if index is None:
        raise _no_interface(host, port)
    return bare, port, 0, index


def _no_interface(host: str, port: int) -> Refused:
    """A zoned C{host}'s connect, when no interface has its zone now."""
    zone = host.partition("%")[2]
    return Refused(f"cannot connect to [{host}]:{port}: no interface {zone!r}")


def unzoned(host: str) -> str:
    """
    C{host} without its zone (C{fe80::1} of C{fe80::1%eth0}): what a
    certificate, a PSK identity or an HTTP C{Host} names, the same on
    every link.
    """
    return host.partition("%")[0]


def stream_endpoint(reactor: Any, host: str, port: int) -> Any:
    """
    A TCP client endpoint to C{host:port}: Twisted's C{HostnameEndpoint},
    but C{TCP6ClientEndpoint} for a zoned link-local address, which
    C{HostnameEndpoint} resolves and then connects without its scope id
    (EINVAL), where C{connectTCP} reads the zone itself (C{getaddrinfo},
    in the reactor's thread: a literal is never resolved in a thread).
    L{Refused} (L{ip6_sockaddr}) when no interface has that name now.
    """
    from twisted.internet.endpoints import HostnameEndpoint, TCP6ClientEndpoint

    if "%" in host:
        bare, _, _, index = ip6_sockaddr(host, port)
        # Given by the name of the interface the rules were asked about:
        # getaddrinfo reads a zone as a name first, and an interface may
        # be named as another's index ('3'), which tcp:// and the rules
        # read as an index: ws:// and tls:// went out of the other link.
        try:
            name = socket.if_indextoname(index)
        except OSError:
            raise _no_interface(host, port) from None
        return TCP6ClientEndpoint(reactor, f"{bare}%{name}", port)
    return HostnameEndpoint(reactor, host, port)


async def host_addresses(
    reactor: IReactorPluggableNameResolver, host: str, port: int
) -> list[tuple[int, Any]]:
    """
    C{(family, sockaddr)} for C{host}: an IP address as it is, a name by
    L{resolve_host}; L{Refused} (C{cannot resolve ...}) when none is found.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        if address.version == 4:
            return [(socket.AF_INET, (host, port))]
        return [(socket.AF_INET6, ip6_sockaddr(host, port))]
    try:
        return await resolve_host(reactor, host, port)
    except OSError as e:  # no address found
        raise Refused(f"cannot resolve {host!r}: {e.strerror or e}") from None
    except UnicodeError:
        # The IDNA codec the resolver applies; routes.check_host keeps such
        # names out, this keeps any other caller's from being a traceback.
        raise Refused(f"cannot resolve {host!r}: not a valid host name") from None
