"""
ipcd's pongd on its own, for the benchmark: one process serving
C{DIR/pong} in each directory named on the command line.

    python benchmarks/_pongd.py RUNDIR [RUNDIR ...]

Every measured path ends at this one echo process, so the paths differ only
by what sits between the client and pongd, and the ipcd instances under test
(run with --no-pongd) hold no service-side connections of their own.  SIGTERM
or SIGINT stops it and removes the sockets.
"""

from __future__ import annotations

import sys

from twisted.internet import reactor

from ipcd.services.pongd import pongd


def main(rundirs: list[str]) -> None:
    if not rundirs:
        raise SystemExit("usage: _pongd.py RUNDIR [RUNDIR ...]")
    services = [pongd(rundir, reactor=reactor) for rundir in rundirs]
    for service in services:
        service.startService()

    def stop() -> None:
        for service in services:
            service.stopService()

    reactor.addSystemEventTrigger("before", "shutdown", stop)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
