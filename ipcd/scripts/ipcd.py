"""
ipcd: run the same service as `twistd -n ipcd`, in the foreground.

Besides twistd's quoted style (`--redirect "authd nextversion-authd"`), it
takes the seed's unquoted one:

    ipcd --allow in authd --deny in '*' '*' --allow out pong
    ipcd --redirect authd nextversion-authd
"""

from __future__ import annotations

import sys

# option -> (words it takes, at least, at most); unquoted words after it are
# joined into its one value.
MULTI_WORD = {
    "--redirect": (2, 2),
    "--route": (2, 2),
    "--allow": (2, 3),
    "--deny": (2, 3),
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
        while i < len(argv) and len(words) < most and not argv[i].startswith("--"):
            words.extend(argv[i].split())
            i += 1
            if len(words) >= most:
                break
        out.extend([arg, " ".join(words)])
    return out


def main(argv: list[str] | None = None) -> None:
    from twisted.scripts.twistd import run

    args = join_words(sys.argv[1:] if argv is None else argv)
    sys.argv = ["ipcd", "--nodaemon", "--pidfile=", "ipcd", *args]
    run()


if __name__ == "__main__":
    main()
