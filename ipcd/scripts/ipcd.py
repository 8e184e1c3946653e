"""
ipcd: run the same service as `twistd -n ipcd`, in the foreground; or talk
to a running one:

    ipcd status [--json] [--rundir DIR]
    ipcd reload [--rundir DIR]

Besides twistd's quoted style (`--redirect "authd nextversion-authd"`), it
takes the seed's unquoted one:

    ipcd --allow in authd --deny in '*' '*' --allow out pong
    ipcd --redirect authd nextversion-authd
    ipcd --grant secret group:ops
"""

from __future__ import annotations

import sys
from typing import Any

# option -> (words it takes, at least, at most); unquoted words after it are
# joined into its one value.
MULTI_WORD = {
    "--redirect": (2, 2),
    "--route": (2, 2),
    "--allow": (2, 3),
    "--deny": (2, 3),
    "--grant": (2, 2),
}


def join_words(argv: list[str]) -> list[str]:
    """Turn C{--redirect a b} into C{--redirect "a b"}; quoted forms pass."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg not in MULTI_WORD:
            out.append(arg)
            continue
        _least, most = MULTI_WORD[arg]
        words: list[str] = []
        while i < len(argv) and len(words) < most and not argv[i].startswith("-"):
            words.extend(argv[i].split())
            i += 1
            if len(words) >= most:
                break
        out.extend([arg, " ".join(words)])
    return out


def control(argv: list[str]) -> int:
    """C{ipcd status} and C{ipcd reload}: ask the running instance."""
    import argparse
    import json

    from ipcd.control import format_status, request
    from ipcd.names import CONTROL_NAME, resolve_rundir, socket_path

    parser = argparse.ArgumentParser(prog=f"ipcd {argv[0]}")
    parser.add_argument("--rundir", help="socket directory (default: $RUNDIR)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv[1:])
    try:
        answer = request(argv[0], args.rundir)
    except (OSError, ValueError, EOFError) as e:
        path = socket_path(resolve_rundir(args.rundir), CONTROL_NAME)
        print(
            f"ipcd {argv[0]}: cannot reach ipcd's control socket {path}: {e}",
            file=sys.stderr,
        )
        return 1
    if args.json:
        print(json.dumps(answer, indent=2))
    elif argv[0] == "status":
        print(format_status(answer))
    elif answer.get("ok"):
        restart = answer.get("restart_needed")
        print(
            "reloaded"
            + (f"; restart needed for {', '.join(restart)}" if restart else "")
        )
    else:
        print(f"ipcd reload: refused: {answer.get('error')}", file=sys.stderr)
    return 0 if answer.get("ok", True) else 1


def _command_options() -> Any:
    """twistd ipcd's options, with the C{ipcd} command's synopsis and flag."""
    from ipcd.tap import Options

    class CommandOptions(Options):
        synopsis = (
            "Usage: ipcd [options]         run ipcd in the foreground "
            "(twistd -n ipcd)\n"
            "       ipcd status [--json] [--rundir DIR]\n"
            "                              ask the running ipcd how it is\n"
            "       ipcd reload [--rundir DIR]\n"
            "                              make it re-read its configuration"
        )
        optFlags = [
            [
                "json-log",
                None,
                "Log one JSON object per line (twistd's --logger "
                "ipcd.logs.json_observer).",
            ]
        ]

    return CommandOptions()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] in ("status", "reload"):
        sys.exit(control(args))
    from twisted.python import usage

    from ipcd.tap import usage_line

    args = join_words(args)
    # Check the options here: twistd would bury the error under its help.
    options = _command_options()
    try:
        options.parseOptions(args)
    except usage.UsageError as e:
        # One line, status 1 as for every other start-up failure.
        sys.exit(f"ipcd: {usage_line(e, 'ipcd')}")
    twistd_options = ["--nodaemon", "--pidfile="]
    if options["json-log"]:
        twistd_options += ["--logger", "ipcd.logs.json_observer"]
    args = [arg for arg in args if arg != "--json-log"]
    from twisted.scripts.twistd import run

    sys.argv = ["ipcd", *twistd_options, "ipcd", *args]
    run()


if __name__ == "__main__":
    main()
