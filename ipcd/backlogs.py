"""
How many connections the kernel queues for each of ipcd's listeners
before ipcd accepts them (the listen backlog), where the endpoint string
does not say (C{tcp:9000:backlog=N} is kept as written).

A TCP connect that finds the queue full is dropped, and the client's
kernel sends it again only after a second (then three, then seven): a
burst of connects past Twisted's default of 50, a flood or many honest
clients at once, costs each good client behind it a second or more.  So
the listeners of tcpd, tlsd and websocketd (C{tcp:}, C{tcp6:}, C{ssl:},
C{tls:}) queue L{TCP_BACKLOG}, as many
as the listener itself holds (C{[limits] max_connections}): measured
behind bursts of 1,000 connects from one peer, 22 of 30 good connects
took a second or more with 50, 20 of 30 with 128, none with 1,024 (the
slowest 9 ms; its request answered within 0.8 s).  What that may make
the kernel hold: a socket (about 3 KiB) per queued connection, and what
its peer sends before ipcd accepts it (at most its receive window),
as for each connection the listener accepts.

A UNIX connect that finds the queue full fails at once (C{EAGAIN}) or
sleeps until there is room, with no timer to wait out: there a longer
queue only puts a good client behind more of a flood (a lookup behind a
burst of 1,000 connects from another user: 33 ms, at most 60, with 128;
152 ms, at most 276, with 1,024).  So C{RUNDIR}'s sockets, and a
listener's C{unix:} endpoint, queue L{UNIX_BACKLOG}.

The metrics' listener keeps Twisted's 50: it serves 16 connections at
most, to a scraper that waits seconds.  A C{systemd:} socket keeps the
backlog systemd gave it (C{Backlog=}).
"""

from __future__ import annotations

from ipcd.compat import twisted as compat_twisted
from ipcd.listenerkeys import wrapped
from ipcd.names import UNIX_BACKLOG

TCP_BACKLOG = 1024

# The endpoint types whose parsers take a backlog: the one they get, and
# how many arguments they take by position before it.
_BACKLOGS = {
    "tcp": (TCP_BACKLOG, 2),  # port, interface
    "tcp6": (TCP_BACKLOG, 1),  # port
    "ssl": (TCP_BACKLOG, 5),  # port, privateKey, certKey, sslmethod, interface
    "tls": (TCP_BACKLOG, 2),  # path (of PEM files), port
    "unix": (UNIX_BACKLOG, 2),  # address, mode
}


def with_backlog(description: str) -> str:
    """
    Endpoint string C{description} with ipcd's backlog for its type, unless
    it gives one (by name or by position), or is of a type that takes none
    (C{systemd:}, a plugin's): then as it is.  A C{haproxy:} wrapper's
    listener gets its own type's.
    """
    if compat_twisted.ends_in_lone_backslash(description):
        return description  # (refused where it is checked)
    try:
        kind, listens = wrapped(description)
        if kind not in _BACKLOGS:
            return description
        backlog, before = _BACKLOGS[kind]
        given = compat_twisted.endpoint_keywords(listens)
        if (
            "backlog" in given
            or len(compat_twisted.endpoint_positionals(listens)) > before
        ):
            return description
    except (ValueError, IndexError):
        return description  # Twisted says what is wrong with it, as before
    return f"{description}:backlog={backlog}"
