"""
pong: send one message to a libipc echo service and print the answer.

    pong hello                      # to RUNDIR/pong, or through ipcd when
    IPC_NETWORK="pong unix://pong" pong hello   # IPC_NETWORK is set
"""

from __future__ import annotations

import argparse
import sys

from ipcd.client import connect
from ipcd.names import InvalidServiceName
from ipcd.wire import MessageTooLarge, recv_message, send_message


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pong", description="Send a message to an echo service, print the echo."
    )
    parser.add_argument("message", nargs="*", help="the message (default: 'ping')")
    parser.add_argument("-s", "--service", default="pong", help="service name")
    parser.add_argument("--rundir", help="socket directory (default: $RUNDIR)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds")
    args = parser.parse_args(argv)
    message = " ".join(args.message) if args.message else "ping"
    try:
        with connect(args.service, rundir=args.rundir, timeout=args.timeout) as sock:
            sock.settimeout(args.timeout)
            send_message(sock, message.encode())
            answer = recv_message(sock)
    except (OSError, EOFError, InvalidServiceName, MessageTooLarge) as e:
        print(f"pong: cannot reach service {args.service!r}: {e}", file=sys.stderr)
        return 1
    print(answer.decode("utf-8", "replace"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
