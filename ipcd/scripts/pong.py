"""
pong: send one message to a libipc echo service and print the answer.

    pong hello                      # to RUNDIR/pong, or through ipcd when
    IPC_NETWORK="pong unix://pong" pong hello   # IPC_NETWORK is set

Like the blocking client it uses, it imports no Twisted.
"""

from __future__ import annotations

import argparse
import os
import sys

from ipcd.client import DEFAULT_TIMEOUT, connect, timeout_option
from ipcd.framing import MessageTooLarge, recv_message, send_message
from ipcd.names import InvalidServiceName, socket_path
from ipcd.rundir import resolve_rundir


def _where(service: str, rundir: str | None) -> str:
    """The socket pong used, as libipc chooses it, for its error message."""
    try:
        if os.environ.get("IPC_NETWORK"):
            return f" through ipcd at {socket_path(resolve_rundir(rundir), 'ipc')}"
        return f" at {socket_path(resolve_rundir(rundir), service)}"
    except InvalidServiceName:
        return ""  # the name itself is what is wrong, and the error says so


def _seconds(text: str) -> float:
    """C{--timeout}'s value: a usage error, not a traceback, when out of range."""
    try:
        return timeout_option(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pong", description="Send a message to an echo service, print the echo."
    )
    parser.add_argument("message", nargs="*", help="the message (default: 'ping')")
    parser.add_argument("-s", "--service", default="pong", help="service name")
    parser.add_argument("--rundir", help="socket directory (default: $RUNDIR)")
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_TIMEOUT,
        help=f"seconds (default {DEFAULT_TIMEOUT:g})",
    )
    args = parser.parse_args(argv)
    message = " ".join(args.message) if args.message else "ping"
    try:
        with connect(args.service, rundir=args.rundir, timeout=args.timeout) as sock:
            sock.settimeout(args.timeout)
            send_message(sock, message.encode())
            answer = recv_message(sock)
    except (OSError, EOFError, InvalidServiceName, MessageTooLarge) as e:
        if isinstance(e, OSError) and e.filename is not None:
            e = OSError(e.errno, e.strerror)  # the path: said once, in where
        where = _where(args.service, args.rundir)
        print(
            f"pong: cannot reach service {args.service!r}{where}: {e}",
            file=sys.stderr,
        )
        return 1
    print(answer.decode("utf-8", "replace"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
