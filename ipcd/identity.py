"""
Who is on the other end: identity labels for policy and logs.

Local clients are known by SO_PEERCRED (credentials at their connect());
remote peers by address.  Labels are plain strings such as C{uid:1000},
C{user:alice}, C{group:wheel}, C{ip:10.1.2.3}.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import socket
import struct
from dataclasses import dataclass
from typing import Any

from ipcd.access import Credentials

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

    def __str__(self) -> str:
        return self.description


def credentials(sock: socket.socket | Any) -> tuple[int, int, int]:
    """(pid, uid, gid) of a UNIX socket's peer, as they were at connect()."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return _UCRED.unpack(raw)


def peer_groups(sock: socket.socket | Any, uid: int, gid: int) -> frozenset[int]:
    """
    The peer's supplementary groups as the kernel had them at its connect()
    (what its own connect() would have been checked with); the group
    database only where the kernel cannot tell.
    """
    size = 64
    while True:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size * 4)
        except OSError as e:
            if e.errno == errno.ERANGE and size < _MAX_GROUPS:
                size = _MAX_GROUPS
                continue
            if e.errno not in (errno.ENOPROTOOPT, errno.EINVAL):
                raise
            return frozenset(_database_groups(uid, gid))
        return frozenset(struct.unpack(f"{len(raw) // 4}I", raw))


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


def local_peer(sock: socket.socket | Any) -> Peer:
    """The L{Peer} behind a connected AF_UNIX socket (or Twisted handle)."""
    pid, uid, gid = credentials(sock)
    who = Credentials(uid, gid, peer_groups(sock, uid, gid))
    return Peer(
        f"pid {pid} uid {uid}",
        local_labels(uid, gid),
        pid=pid,
        uid=uid,
        credentials=who,
    )


def remote_peer(host: str, port: int) -> Peer:
    """The L{Peer} of a remote address."""
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return Peer(shown, frozenset({f"ip:{host}"}))
