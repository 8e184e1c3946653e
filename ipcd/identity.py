"""
Who is on the other end: identity labels for policy and logs.

Local clients are known by SO_PEERCRED (credentials at their connect());
remote peers by address.  Labels are plain strings such as C{uid:1000},
C{user:alice}, C{group:wheel}, C{ip:10.1.2.3}.  A peer of a protocol
daemon's listener on a UNIX socket (a local reverse proxy, relaying for a
remote party) is a remote peer named by the uid that connected:
C{unix:uid=33}, never C{uid:33} (L{listener_peer}).
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ipcd.access import Credentials
from ipcd.owndials import address_of
from ipcd.routes import host_port

_UCRED = struct.Struct("3i")
# Linux's SO_PEERGROUPS (4.13+): the peer's supplementary groups at connect().
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_MAX_GROUPS = 65536


@dataclass(frozen=True)
class Peer:
    """A connecting party: how to print it, and its labels."""

    description: str
    labels: frozenset[str] = frozenset()
    pid: int | None = None
    uid: int | None = None
    # What the kernel would check this peer by; None for remote peers.
    credentials: Credentials | None = None
    # A remote peer's IP address, port and transport, as ipcd.owndials
    # keys them.
    address: tuple[str, int, str] | None = None
    # What the limits count a remote peer with no address under (a UNIX
    # listener's: unix:uid=N); None for the others (their uid or address).
    key: str | None = None

    def __str__(self) -> str:
        return self.description


def credentials(sock: socket.socket | Any) -> tuple[int, int, int]:
    """(pid, uid, gid) of a UNIX socket's peer, as they were at connect()."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return _UCRED.unpack(raw)


def _peer_groups_raw(sock: socket.socket | Any) -> bytes | None:
    """SO_PEERGROUPS as the kernel gives it; C{None} where it cannot."""
    try:
        return sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 64 * 4)
    except OSError as e:
        if e.errno == errno.ERANGE:
            # More than 64 groups: Python's getsockopt reads at most 1024
            # bytes (it raised "buflen out of range" for a peer of 65 or more).
            return _getsockopt_large(sock.fileno(), SO_PEERGROUPS, _MAX_GROUPS * 4)
        if e.errno not in (errno.ENOPROTOOPT, errno.EINVAL):
            raise
        return None


def _getsockopt_large(fd: int, option: int, size: int) -> bytes:
    """C{getsockopt(fd, SOL_SOCKET, option)} into C{size} bytes, by libc."""
    import ctypes  # only for a peer of many groups

    libc = ctypes.CDLL(None, use_errno=True)
    buffer = ctypes.create_string_buffer(size)
    length = ctypes.c_uint32(size)  # socklen_t
    if libc.getsockopt(fd, socket.SOL_SOCKET, option, buffer, ctypes.byref(length)):
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    return buffer.raw[: length.value]


def _database_groups(uid: int, gid: int) -> list[int]:
    try:
        return os.getgrouplist(pwd.getpwuid(uid).pw_name, gid)
    except KeyError:
        return [gid]


def local_labels(uid: int, gid: int) -> frozenset[str]:
    """C{uid:}, C{user:} and C{group:} labels, supplementary groups included."""
    labels = {f"uid:{uid}", f"gid:{gid}"}
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = None
    gids = {gid}
    if user is not None:
        labels.add(f"user:{user}")
        gids.update(os.getgrouplist(user, gid))
    for g in gids:
        try:
            labels.add(f"group:{grp.getgrgid(g).gr_name}")
        except KeyError:
            pass
    return frozenset(labels)


# The files behind the user and group databases in the usual setup; other
# sources (LDAP, sssd, ...) are covered by LabelCache's maximum age.
DATABASE_FILES = ("/etc/passwd", "/etc/group")
DEFAULT_LABEL_MAX_AGE = 60.0


class LabelCache:
    """
    L{local_labels} by (uid, gid), without a database lookup per request.

    Everything is dropped when one of C{files} changes (its inode, size or
    modification time; checked at most once per C{check_interval} seconds),
    when L{clear} is called (a reload), and C{max_age} seconds after it was
    filled, for sources that are not files.  C{max_age} 0 turns it off.
    So a user or group change is seen within C{check_interval} seconds when
    it is made in the files, and within C{max_age} seconds otherwise.
    """

    def __init__(
        self,
        max_age: float = DEFAULT_LABEL_MAX_AGE,
        files: Sequence[str] = DATABASE_FILES,
        seconds: Callable[[], float] = time.monotonic,
        lookup: Callable[[int, int], frozenset[str]] | None = None,
        check_interval: float = 1.0,
    ) -> None:
        self.max_age = max_age
        self._files = tuple(files)
        self._seconds = seconds
        self._lookup = lookup if lookup is not None else local_labels
        self._check_interval = check_interval
        self._labels: dict[tuple[int, int], frozenset[str]] = {}
        # local_peer's Peers by raw credentials: each holds labels of this
        # cache, and is given again only while those are the labels given.
        self.peers: dict[bytes, Peer] = {}
        self._filled = 0.0  # when the first entry of this generation came
        self._checked = float("-inf")
        self._stamps: tuple[Any, ...] | None = None

    def clear(self) -> None:
        """Forget every entry: the next request looks its labels up."""
        self._labels.clear()

    def __call__(self, uid: int, gid: int) -> frozenset[str]:
        now = self._seconds()
        if now - self._checked >= self._check_interval:
            self._checked = now
            stamps = self._file_stamps()
            if stamps != self._stamps:
                self._stamps = stamps
                self._labels.clear()
        if self._labels and now - self._filled >= self.max_age:
            self._labels.clear()
        key = (uid, gid)
        labels = self._labels.get(key)
        if labels is None:
            labels = self._lookup(uid, gid)
            if self.max_age > 0:
                if not self._labels:
                    self._filled = now
                if len(self._labels) < _MAX_CACHED:
                    self._labels[key] = labels
        return labels

    def _file_stamps(self) -> tuple[Any, ...]:
        stamps = []
        for path in self._files:
            try:
                st = os.stat(path)
            except OSError:
                stamps.append(None)
            else:
                stamps.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(stamps)


# Bounds the cache's memory: each distinct (uid, gid) is one entry.
_MAX_CACHED = 4096


def local_peer(
    sock: socket.socket | Any,
    labels: Callable[[int, int], frozenset[str]] | None = None,
) -> Peer:
    """
    The L{Peer} behind a connected AF_UNIX socket (or Twisted handle); its
    labels from C{labels} (a L{LabelCache}, which also keeps the L{Peer}s it
    was asked for), else from the databases.
    """
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    groups = _peer_groups_raw(sock)
    found = (labels or local_labels)(uid, gid)
    peers = getattr(labels, "peers", None)
    # The same credentials and groups, and the very labels: the same Peer.
    key = None if peers is None or groups is None else raw + groups
    if key is not None:
        peer = peers.get(key)
        if peer is not None and peer.labels is found:
            return peer
    if groups is None:
        supplementary = frozenset(_database_groups(uid, gid))
    else:
        supplementary = frozenset(struct.unpack(f"{len(groups) // 4}I", groups))
    peer = Peer(
        f"pid {pid} uid {uid}",
        found,
        pid=pid,
        uid=uid,
        credentials=Credentials(uid, gid, supplementary),
    )
    if key is not None:
        if len(peers) >= _MAX_CACHED:
            peers.clear()
        peers[key] = peer
    return peer


def remote_peer(host: str, port: int, transport: str = "tcp") -> Peer:
    """The L{Peer} of a remote address of C{transport} ("tcp" or "udp")."""
    if transport == "tcp" and "%" in host:
        host = _zone_as_rules_read(host)
    address = address_of(host, port, transport)
    # A dual-stack listener's IPv4 peer (::ffff:10.1.2.3) is labelled as the
    # IPv4 address it is: an ip: glob (deny in * ip:10.*) sees it as a
    # network pattern does.  An IPv6 address keeps its text (and scope).
    labels = frozenset({f"ip:{host if ':' in address[0] else address[0]}"})
    return Peer(host_port(host, port), labels, address=address)


def _zone_as_rules_read(host: str) -> str:
    """
    A TCP peer's link-local C{host} with its zone as the rules read it.
    Twisted names it by getnameinfo, which gives an interface's name, and
    rules read a zone of digits as an index (L{ipcd.policy.zone_index}):
    a peer of interface C{7} of index 3 matched C{ip:fe80::/64%7} and not
    C{%3}.  Such a name is its index here, as udpd's peers have it
    (ipcd.daemons.udp.source.zone_name); only a zone of digits is asked.
    """
    bare, _, zone = host.partition("%")
    if not (zone.isascii() and zone.isdigit()):
        return host
    try:
        return f"{bare}%{socket.if_nametoindex(zone)}"
    except OSError:
        return host  # (no interface so named: an index already)


def unix_listener_peer(transport: Any) -> Peer:
    """
    The peer of a protocol daemon's listener on a UNIX socket (C{unix:},
    C{systemd:domain=UNIX}): a local reverse proxy (nginx, HAProxy) that
    relays for a remote party, so a remote peer (no credentials: "others"
    for a socket, told a refusal's public word only), labelled and counted
    by the uid that connected, C{unix:uid=33}.  Never C{uid:33}: a rule or
    grant for local user 33 gives nothing to whoever that proxy relays.
    One key per uid keeps what the limits hold bounded (a client's bound
    path, which its address carries, is any name it likes).
    """
    from ipcd.daemons.outbox import socket_of  # (only for such a listener)

    try:
        # The socket's transport, under TLS and the other wrappers.
        uid: int | str = credentials(socket_of(transport).getHandle())[1]
    except (OSError, AttributeError):  # (not a socket's transport)
        uid = "unknown"
    label = f"unix:uid={uid}"
    return Peer(label, frozenset({label}), key=label)


def listener_peer(address: Any, transport: Any) -> Peer:
    """
    The remote peer of a protocol daemon's listener at C{address} (its
    C{transport}'s C{getPeer()}, or a PROXY header's): by its IP address,
    or a UNIX socket's peer (L{unix_listener_peer}).
    """
    host = getattr(address, "host", None)
    if host is None:
        return unix_listener_peer(transport)
    return remote_peer(host, address.port)
