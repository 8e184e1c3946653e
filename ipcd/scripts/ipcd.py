"""
ipcd: run the same service as `twistd -n ipcd`, in the foreground; or talk
to a running one:

    ipcd status [--json] [--wide] [--rundir DIR]
    ipcd reload [--json] [--rundir DIR]

(usage.Options subcommands).  The options are parsed, and the configuration
loaded, once: twistd is handed them parsed (L{run_twistd}).

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


def control(
    command: str, rundir: str | None = None, as_json: bool = False, wide: bool = False
) -> int:
    """C{ipcd status} and C{ipcd reload}: ask the running instance."""
    import json

    from ipcd.control import request
    from ipcd.logs import printable
    from ipcd.names import CONTROL_NAME, socket_path
    from ipcd.rundir import resolve_rundir
    from ipcd.stdout import stdout_to_devnull

    try:
        answer = request(command, rundir)
    except (OSError, ValueError, EOFError) as e:
        directory = resolve_rundir(rundir)
        path = socket_path(directory, CONTROL_NAME)
        print(
            f"ipcd {command}: cannot reach ipcd's control socket {path}: "
            f"{_unreachable_why(e, directory)}",
            file=sys.stderr,
        )
        return 1
    try:
        if as_json:
            print(json.dumps(answer, indent=2))
        else:
            _show(command, answer, wide)
        sys.stdout.flush()
    except BrokenPipeError:
        # Its reader is gone (ipcd status | head): nothing more to say, and
        # no traceback at exit for what is still buffered.
        stdout_to_devnull()
        return 1
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        # Another version's answer, say: one line, not a traceback.
        print(
            f"ipcd {command}: unexpected answer ({printable(repr(e))}); "
            f"ipcd {command} --json shows it whole",
            file=sys.stderr,
        )
        return 1
    # Every answer of ipcd's is an object; another shape is no success.
    if not isinstance(answer, dict):
        return 1
    # A reload that a daemon could not apply whole (tlsd kept its previous
    # keys) did not do what was asked: ExecReload and scripts see it.
    return 0 if answer.get("ok", True) and not answer.get("not_applied") else 1


def _unreachable_why(error: Exception, rundir: str) -> str:
    """Why the control socket could not be asked, and the way out."""
    if isinstance(error, FileNotFoundError):
        return "no such socket (is ipcd running, with this --rundir?)"
    if isinstance(error, ConnectionRefusedError):
        return "nobody listens on it (ipcd is not running)"
    if isinstance(error, PermissionError):
        closed = _unsearchable(rundir)
        if closed is not None:
            return closed
        return (
            "permission denied (ask as root, as ipcd's user or as a member "
            "of its [control] group)"
        )
    return str(error)


def _unsearchable(rundir: str) -> str | None:
    """
    Why this user may not enter C{rundir}, with the way out; None if it may.
    The [control] group's socket is no use to a member who cannot reach it:
    ipcd makes RUNDIR 1770 for its own group, which the member need not be
    in (and should not be: that group may add services).
    """
    import grp
    import os
    import stat

    effective = os.access in os.supports_effective_ids
    try:
        if os.access(rundir, os.X_OK, effective_ids=effective):
            return None
        info = os.stat(rundir)
    except OSError:
        return None
    try:
        group = grp.getgrgid(info.st_gid).gr_name
    except KeyError:
        group = str(info.st_gid)
    return (
        f"permission denied: this user may not enter RUNDIR {rundir} (mode "
        f"{stat.S_IMODE(info.st_mode):04o}, group {group}): ask as root, as "
        f"ipcd's user or as a member of group {group}; to let ipcd's [control] "
        f"group in, give it search permission alone: setfacl -m g:GROUP:x {rundir}"
    )


def _show(command: str, answer: Any, wide: bool) -> None:
    """An answer for people: raises what another shape of it makes raise."""
    from ipcd.config import changes_text
    from ipcd.control import format_status
    from ipcd.logs import printable

    if command == "status":
        print(format_status(answer, wide))
    elif answer.get("ok"):
        restart = answer.get("restart_needed")
        # (None: an ipcd older than this, which does not say.)
        changed = answer.get("changed")
        not_applied = answer.get("not_applied", [])
        if not isinstance(not_applied, list):
            raise TypeError(f"not_applied: {type(not_applied).__name__}")
        said = "reloaded"
        if changed or (changed is not None and not restart):
            # "nothing changed" alone: one that needs a restart changed that.
            said += ": " + changes_text([str(key) for key in changed])
        if restart:
            said += f"; restart needed for {', '.join(map(str, restart))}"
        print(printable(said))
        # In force, but not all of it: each part a daemon could not apply.
        for why in not_applied:
            print(f"ipcd reload: not applied: {printable(str(why))}", file=sys.stderr)
    else:
        error = printable(str(answer.get("error")))
        print(f"ipcd reload: refused: {error}", file=sys.stderr)


def _command_options() -> Any:
    """
    twistd ipcd's options (L{ipcd.options.Options}), with the C{ipcd} command's
    synopsis, its C{--json-log} flag and its C{status} and C{reload}
    subcommands.  Without a subcommand, parsing loads the configuration,
    once: twistd is then handed these options, not the command line.
    """
    from twisted.python import usage

    from ipcd import version
    from ipcd.options import Options

    class ControlOptions(usage.Options):
        longdesc = ""  # not this module's docstring, Twisted's default
        optFlags = [["json", None, "Print ipcd's answer as JSON."]]
        optParameters = [
            [
                "rundir",
                None,
                None,
                "The socket directory (default: ipcd's --rundir before the "
                "command, else $RUNDIR, else /tmp/libipc-run).",
            ]
        ]

        def getSynopsis(self) -> str:  # noqa: N802
            # Its own alone: Twisted's puts the whole parent's before it.
            return str(self.synopsis)

        def parseArgs(self, *args: str) -> None:  # noqa: N802
            # Twisted's own is "Wrong number of arguments.": say which.
            if args:
                name = self.synopsis.split()[2]  # "Usage: ipcd status ..."
                raise usage.UsageError(
                    f"{name} takes no arguments, only options: got {args[0]!r}"
                )

        def opt_version(self) -> None:
            """Print ipcd's version and exit."""
            print(f"ipcd {version()}")
            sys.exit(0)

    class StatusOptions(ControlOptions):
        synopsis = "Usage: ipcd status [--json] [--wide] [--rundir DIR]"
        longdesc = (
            "Ask the running ipcd how it is: its relayed connections, counters "
            "and the configuration in force."
        )
        optFlags = [["wide", "w", "Every column of the connections (wider than 100)."]]

    class ReloadOptions(ControlOptions):
        synopsis = "Usage: ipcd reload [--json] [--rundir DIR]"
        longdesc = "Make the running ipcd re-read its configuration file."

    class CommandOptions(Options):
        synopsis = (
            "Usage: ipcd [options]         run ipcd in the foreground "
            "(twistd -n ipcd)\n"
            "       ipcd status [--json] [--wide] [--rundir DIR]\n"
            "                              ask the running ipcd how it is\n"
            "       ipcd reload [--json] [--rundir DIR]\n"
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
        subCommands = [
            ["status", None, StatusOptions, "Ask the running ipcd how it is."],
            [
                "reload",
                None,
                ReloadOptions,
                "Make the running ipcd re-read its configuration.",
            ],
        ]

        def parseOptions(self, options: Any = None) -> None:  # noqa: N802
            try:
                super().parseOptions(options)
            except usage.UsageError as e:
                # Twisted's "Unknown command: x" names none that there is.
                unknown = str(e).removeprefix("Unknown command: ")
                if unknown == str(e) or self.subCommand is not None:
                    raise
                raise usage.UsageError(
                    f"unknown command {unknown!r}: ipcd takes options, or the "
                    "command status or reload"
                ) from None

        def postOptions(self) -> None:
            if self.subCommand is None:
                super().postOptions()  # the configuration, loaded here only

    return CommandOptions()


def run_twistd(options: Any) -> None:
    """
    Run C{options} (parsed C{ipcd} options, configuration loaded) as
    C{twistd --nodaemon --pidfile= ipcd} would, without parsing (and
    loading) them again: twistd's options are parsed, then given the
    C{ipcd} subcommand with these as its options, as its parser would.
    """
    from twisted.scripts import twistd

    from twisted.plugins.ipcd_plugin import ipcd as service_maker

    server = twistd.ServerOptions()
    args = ["--nodaemon", "--pidfile="]
    if options["json-log"]:
        args += ["--logger", "ipcd.logs.json_observer"]
    else:
        # twistd's own text log, formatted faster.
        args += ["--logger", "ipcd.logs.text_observer"]
    server.parseOptions(args)
    server.subCommand = service_maker.tapname
    server.subOptions = options
    options.parent = server
    server.loadedPlugins = {service_maker.tapname: service_maker}
    server["no_save"] = True  # what twistd's postOptions does for a subcommand
    sys.argv = ["ipcd", *args, "ipcd"]  # for twistd's messages
    twistd.runApp(server)


def main(argv: list[str] | None = None) -> None:
    from twisted.python import usage

    from ipcd.options import usage_line

    args = join_words(sys.argv[1:] if argv is None else list(argv))
    options = _command_options()
    try:
        options.parseOptions(args)
    except usage.UsageError as e:
        # One line, status 1 as for every other start-up failure (twistd
        # would bury the error under its help).
        command = " ".join(["ipcd", *filter(None, [options.subCommand])])
        sys.exit(f"ipcd: {usage_line(e, command)}")
    if options.subCommand is not None:
        sub = options.subOptions
        rundir = sub["rundir"] or options["rundir"]
        wide = bool(sub.get("wide"))
        sys.exit(control(options.subCommand, rundir, sub["json"], wide))
    run_twistd(options)


if __name__ == "__main__":
    main()
