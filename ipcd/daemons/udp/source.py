"""
Answers from the address the peer wrote to, on a listener bound to every
address (C{0.0.0.0}, C{::}, or systemd's C{ListenDatagram=PORT}).

The kernel sends a datagram from such a socket from the address its route
to the peer prefers, which on a host of several addresses (a second
address, IPv6's several on one interface, 127.0.0.2) need not be the one
the peer sent to; the peer's udpd, whose socket is connected to that one,
never sees the answer, and its handshake times out.  So the listener asks
for each datagram's destination (C{IP_PKTINFO}, C{IPV6_RECVPKTINFO}), and
what answers a peer (a HELLO's answer, a session's datagrams) goes out
from that address (the same option, sent with it).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Any

from ipcd import policy

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
_IN_PKTINFO = struct.Struct("=i4s4s")  # ifindex, local (spec_dst), destination
_IN6_PKTINFO = struct.Struct("=16si")  # destination, ifindex
# What a read takes for them (both, on a dual-stack socket).
SPACE = socket.CMSG_SPACE(_IN6_PKTINFO.size) + socket.CMSG_SPACE(_IN_PKTINFO.size)
NO_KINDS: frozenset[tuple[int, int]] = frozenset()

# An answer's control messages: none (the kernel chooses), or the source.
Source = tuple[tuple[int, int, bytes], ...]
NO_SOURCE: Source = ()


def ask_destinations(sock: socket.socket) -> frozenset[tuple[int, int]]:
    """
    Have the kernel tell, with each datagram C{sock} reads, the address it
    was sent to, if C{sock} is bound to every address (else it answers
    from its one address anyway): the (level, type) of those control
    messages, none if not asked.  Safe on a socket systemd keeps for the
    next process (unlike UDP_GRO): one that does not ask reads no control
    message, and a datagram is one datagram all the same.
    """
    try:
        host = sock.getsockname()[0]
        if not ipaddress.ip_address(host.partition("%")[0]).is_unspecified:
            return NO_KINDS
        if sock.family != socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            return frozenset({(socket.IPPROTO_IP, IP_PKTINFO)})
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
    except (OSError, ValueError, IndexError):
        return NO_KINDS  # not an IP socket, or no such option: as before
    kinds = {(socket.IPPROTO_IPV6, IPV6_PKTINFO)}
    # An IPv4 peer's datagram, on a dual-stack socket, comes with its
    # destination IPv4-mapped: a broadcast's (192.0.2.255, 255.255.255.255)
    # is no source (the answer fails, EINVAL or ENETUNREACH), so that
    # datagram's IP_PKTINFO too, whose local address is one.
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    except OSError:
        pass  # (IPv6 only: no IPv4 peers)
    else:
        kinds.add((socket.IPPROTO_IP, IP_PKTINFO))
    return frozenset(kinds)


def answer_from(level: int, info: bytes | None) -> Source:
    """
    The control message that sends an answer to a datagram from the
    address it came to (C{info}: its C{IP_PKTINFO} or C{IPV6_PKTINFO}).
    An IPv4 one also serves on a dual-stack socket, to an IPv4-mapped peer.
    """
    if info is None:
        return NO_SOURCE
    if level == socket.IPPROTO_IPV6:
        address, index = _IN6_PKTINFO.unpack(info)
        if address[0] == 0xFF:
            return NO_SOURCE  # multicast: no address to answer from
        if not (address[0] == 0xFE and address[1] & 0xC0 == 0x80):
            index = 0  # the route chooses the way out; a link-local one's is its own
        return ((level, IPV6_PKTINFO, _IN6_PKTINFO.pack(address, index)),)
    # IPv4's local address (not the destination: a broadcast's is no source).
    _, local, _ = _IN_PKTINFO.unpack(info)
    return ((level, IP_PKTINFO, _IN_PKTINFO.pack(0, local, bytes(4))),)


# A link-local peer's zone: the interface it came in by.  Twisted's UDP
# port (and socket's own 2-tuple addresses) drop it, and a link-local
# address names a host only on its link: without it, every link's fe80::1
# was one peer (one limits key, rules for one interface's peers matched
# none), and what answered it went out the link the kernel's routes put
# first.  So a peer's address keeps it in its host, as tcpd's peers do
# (C{fe80::1%eth0}), and what is sent to it is sent with its scope id.


# Interface names by index, as read with datagrams: a link-local peer's
# every datagram names its interface, and one call to the kernel each
# would cost its DATA what its address check costs.  Kept (Linux does not
# give an index again; a rename, rare, is not seen here) and read afresh
# past 256.
_NAMES: dict[int, str] = {}


def zone_name(index: int) -> str:
    """
    The interface C{index} names (its number, when it has none now, or
    when its name is all ASCII digits: a zone of digits is read as an
    index, by L{zone_index} as by rules, so interface C{1} of index 3 was
    sent to by index 1, loopback's).
    """
    name = _NAMES.get(index)
    if name is None:
        try:
            name = socket.if_indextoname(index)
        except OSError:
            return str(index)  # (not kept: it may have one later)
        if name.isascii() and name.isdigit():
            name = str(index)
        if len(_NAMES) >= 256:
            _NAMES.clear()
        _NAMES[index] = name
    return name


def zone_index(zone: str) -> int:
    """
    The index of interface C{zone} (a name, or a number), asked afresh:
    once per session and per HELLO answered, and an interface that goes
    and comes back (a VPN's, a USB adapter's) has another.
    """
    index = policy.zone_index(zone)
    if index is not None:
        return index
    # Renamed since its datagrams named it so: the index they came with.
    # (Its peers keep the old name in their labels until L{_NAMES} is read
    # afresh.)  Else gone: the send fails, as UDP loses a datagram.
    return next((at for at, name in _NAMES.items() if name == zone), 0)


def peer_address(sockaddr: Any) -> tuple[str, int]:
    """
    A peer's address as udpd keeps it, from what C{recvmsg} gives: its
    host (with its zone, for a link-local one) and port.
    """
    host, port = sockaddr[0], sockaddr[1]
    if len(sockaddr) == 4 and sockaddr[3]:
        return f"{host}%{zone_name(sockaddr[3])}", port
    return host, port


def sockaddr_of(address: Any) -> Any:
    """What C{sendto} takes for a peer's address: its scope id, if zoned."""
    host = address[0]
    if "%" not in host:
        return address  # (IPv4, and IPv6 but link-local: as it is)
    bare, _, zone = host.partition("%")
    return bare, address[1], 0, zone_index(zone)
