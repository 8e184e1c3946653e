"""Errors that become a reply a person can read: C{ne <reason>}."""

# The longest reason given, in an C{ne} and in the log, whatever it quotes:
# an C{ne} then fits the 4 KiB a client reads (ipcd.handoff.MAX_REPLY) and
# the socket's buffer, so that it is written at once.
MAX_REASON = 1000


class Refused(Exception):
    """A lookup or connection that cannot be served, and why (one line)."""

    @property
    def reason(self) -> str:
        text = str(self)
        if len(text) <= MAX_REASON:
            return text
        return text[: MAX_REASON - 3] + "..."
