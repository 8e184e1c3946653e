"""
Who is on the other end: identity labels for policy and logs.

Local clients are known by SO_PEERCRED (credentials at their connect());
remote peers by address.  Labels are plain strings such as C{uid:1000},
C{user:alice}, C{group:wheel}, C{ip:10.1.2.3}.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
from dataclasses import dataclass
from typing import Any

_UCRED = struct.Struct("3i")


@dataclass(frozen=True)
class Peer:
    """A connecting party: how to print it, and its labels."""

    description: str
    labels: frozenset[str] = frozenset()
    pid: int | None = None
    uid: int | None = None

    def __str__(self) -> str:
        return self.description


def credentials(sock: socket.socket | Any) -> tuple[int, int, int]:
    """(pid, uid, gid) of a UNIX socket's peer, as they were at connect()."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return _UCRED.unpack(raw)


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
    return Peer(f"pid {pid} uid {uid}", local_labels(uid, gid), pid=pid, uid=uid)


def remote_peer(host: str, port: int) -> Peer:
    """The L{Peer} of a remote address."""
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return Peer(shown, frozenset({f"ip:{host}"}))
