"""
ipcd's own sockets are never a lookup's target.

A lookup that reached C{RUNDIR/ipc}, a daemon's C{RUNDIR/SCHEME} or any
name for their inodes (a link, a bind mount) could make ipcd talk to itself
or to a daemon with ipcd's authority.  L{OwnSockets} knows their names and
inodes, cheaply: names per configuration, the inodes of the sockets ipcd
listens on itself fixed while it runs, the others' looked up again whenever
RUNDIR has changed (L{ipcd.owninodes.RundirInodes}).  It also holds RUNDIR
and the directories above it open while ipcd listens, for the access walk
(L{ipcd.access.HeldDirectories}).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ipcd.access import HeldDirectories, OpenedSocket
from ipcd.config import Config
from ipcd.errors import REFUSED, Refused
from ipcd.names import OWN_NAMES, InvalidServiceName, socket_path
from ipcd.owninodes import Inode, RundirInodes

Names = tuple[frozenset[str], frozenset[str], frozenset[str]]


class OwnSockets:
    """
    The own sockets of the broker whose configuration C{config()} gives and
    whose test transports (outbound halves by scheme) are the keys of
    C{transports}, a mapping that may change.
    """

    def __init__(
        self, config: Callable[[], Config], transports: Mapping[str, Any]
    ) -> None:
        self._config = config
        self._transports = transports
        self._fixed_inodes: set[Inode] | None = None
        # The protocol daemons' listeners on UNIX sockets (L{add_listener}).
        self._listeners: set[Inode] = set()
        # Other daemons' socket inodes, while RUNDIR is unchanged.
        self._other_inodes = RundirInodes()
        # RUNDIR and the directories above it, held open while ipcd's own
        # sockets listen (a fixed number of descriptors).
        self.held: HeldDirectories | None = None
        self._names_cache: tuple[Config, frozenset[str], Names] | None = None

    def reconfigured(self) -> None:
        """A new configuration: RUNDIR may have moved, daemons changed."""
        self._other_inodes.clear()
        if self.held is not None:
            self._hold(True)

    def names(self) -> Names:
        """
        The own names, the in-process ones, and the others: every registered
        protocol daemon's C{RUNDIR/SCHEME}, running or not, and each
        external daemon's; worked out once per configuration (and set of
        test transports), not per lookup.
        """
        config, transports = self._config(), self._transports.keys()
        cached = self._names_cache
        if cached is None or cached[0] is not config or cached[1] != transports:
            transports = frozenset(transports)
            own = frozenset(
                {
                    *OWN_NAMES,
                    # Every scheme's socket: websocketd's RUNDIR/wss too.
                    *config.registry.schemes,
                    *transports,
                    *config.external_daemons,
                }
            )
            running = (
                scheme
                for d in config.registry.enabled(config)
                for scheme in (d.scheme, *getattr(d, "also_schemes", ()))
            )
            in_process = frozenset({*OWN_NAMES, *running})
            cached = (config, transports, (own, in_process, own - in_process))
            self._names_cache = cached
        return cached[2]

    def listening(self, listening: bool = True) -> None:
        """
        ipcd's in-process sockets are listening (or no longer): their inodes
        are fixed while it runs, so they need not be looked up per lookup.
        """
        self._fixed_inodes = None
        self._hold(listening)
        if listening:
            self._fixed_inodes = self._inodes(self.names()[1]) | self._listeners
        else:
            self._listeners.clear()

    def add_listener(self, address: Any) -> None:
        """
        A listener of ipcd's listens at C{address} (its port's C{getHost()}):
        on a UNIX socket (a protocol daemon's C{unix:PATH}), that socket is
        ipcd's own too.  A lookup of it (in RUNDIR, or by any name for it)
        made ipcd connect to it for the client, and the daemon took the
        client for ipcd's own uid (C{unix:uid=0}), past rules for that uid.
        """
        name = getattr(address, "name", None)
        if getattr(address, "host", None) is not None or not name:
            return  # a network address, or an unnamed socket
        try:
            st = os.stat(name)  # (an abstract name, starting with NUL: none)
        except (OSError, ValueError):
            return
        inode = (st.st_dev, st.st_ino)
        self._listeners.add(inode)
        if self._fixed_inodes is not None:
            self._fixed_inodes.add(inode)

    def refuse_own(self, opened: OpenedSocket, path: str) -> OpenedSocket:
        """C{opened}, unless it is one of ipcd's own sockets: then refused."""
        held = self.held
        rundir_stat = None
        if held is not None and held.directory == self._config().rundir:
            rundir_stat = held.take_directory_stat()
        if opened.inode in self._own_inodes(rundir_stat):
            opened.close()
            raise Refused(
                f"{path} is ipcd's own socket, never a lookup target", public=REFUSED
            )
        return opened

    def inodes(self) -> set[Inode]:
        """The inodes of ipcd's own sockets now (for C{ipcd status})."""
        return self._own_inodes()

    def _hold(self, hold: bool) -> None:
        """Let RUNDIR's directories go; hold them again if C{hold}."""
        if self.held is not None:
            self.held.close()
            self.held = None
        if hold:
            self.held = HeldDirectories(self._config().rundir)
            self.held.hold()

    def _own_inodes(self, rundir_stat: os.stat_result | None = None) -> set[Inode]:
        own, _in_process, others = self.names()
        if self._fixed_inodes is None:
            return self._inodes(own)
        if not others:
            return self._fixed_inodes
        # Other daemons (external ones, and registered ones not running
        # here) come and go on their own: their inodes are looked up again
        # whenever RUNDIR has changed since (RundirInodes).
        return self._other_inodes(
            self._config().rundir, others, self._fixed_inodes, rundir_stat
        )

    def _inodes(self, names: Iterable[str]) -> set[Inode]:
        rundir = self._config().rundir
        inodes = set()
        for name in names:
            try:
                st = os.stat(socket_path(rundir, name))
            except (OSError, InvalidServiceName):
                continue
            inodes.add((st.st_dev, st.st_ino))
        return inodes
