"""Errors that become a reply a person can read: C{ne <reason>}."""

# The longest reason given, in an C{ne} and in the log, whatever it quotes:
# an C{ne} then fits the 4 KiB a client reads (ipcd.handoff.MAX_REPLY) and
# the socket's buffer, so that it is written at once.
MAX_REASON = 1000

# What a remote peer is told of a refusal (L{Refused.public}): one of these,
# never the reason, which may name RUNDIR's paths, the rules, uids and errno
# text.  The reason goes to ipcd's log (the decision line) for the operator;
# local clients, on the host already, get it whole.
REFUSED = "refused"  # the policy or the socket's permissions say no
NO_SUCH_SERVICE = "no such service"
UNAVAILABLE = "unavailable"  # it exists, or may: it could not be reached
BUSY = "busy"  # a limit: try again later


class Refused(Exception):
    """
    A lookup or connection that cannot be served, and why (one line);
    C{public}: what a remote peer is told (L{UNAVAILABLE} unless said);
    C{told}: what a local client is told, when not the whole reason.
    """

    public = UNAVAILABLE
    # None: the reason.  Set where the reason says more than the client may
    # learn (a grant's walk past a directory it may not search: ipcd.broker).
    told: str | None = None

    def __init__(self, *args: object, public: str | None = None) -> None:
        super().__init__(*args)
        if public is not None:
            self.public = public

    @property
    def reason(self) -> str:
        return _bounded(str(self))

    @property
    def told_locally(self) -> str:
        """What a local client's C{ne} says: L{told}, else the reason."""
        return self.reason if self.told is None else _bounded(self.told)


def _bounded(text: str) -> str:
    if len(text) <= MAX_REASON:
        return text
    return text[: MAX_REASON - 3] + "..."
