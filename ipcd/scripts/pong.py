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
from ipcd.stdout import stdout_to_devnull


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
        prog="pong",
        description="Send a message to an echo service, print the echo.",
        epilog="With IPC_NETWORK set, it asks ipcd (RUNDIR/ipc) for the "
        "service, as a libipc program does. Exit status: 0 answered, 1 the "
        "service not reached or silent, 2 bad usage.",
    )
    parser.add_argument("message", nargs="*", help="the message (default: 'ping')")
    parser.add_argument("-s", "--service", default="pong", help="service name")
    parser.add_argument(
        "--rundir", help="socket directory (default: $RUNDIR, else /tmp/libipc-run)"
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_TIMEOUT,
        help="seconds to connect and for the answer, above 0 and at most a year "
        f"(default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--version", action="store_true", help="print pong's version (ipcd's)"
    )
    args = parser.parse_args(argv)
    if args.version:  # (the package's metadata: read only when asked)
        from ipcd import version

        return _say(f"pong (ipcd {version()})")
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
    return _say(answer.decode("utf-8", "replace"))


def _say(text: str) -> int:
    """Print C{text}: 0, or 1 when stdout's reader is gone (no traceback)."""
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        stdout_to_devnull()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
