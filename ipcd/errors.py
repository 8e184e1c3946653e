"""Errors that become a reply a person can read: C{ne <reason>}."""


class Refused(Exception):
    """A lookup or connection that cannot be served, and why (one line)."""

    @property
    def reason(self) -> str:
        return str(self)
