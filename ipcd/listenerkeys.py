"""
An C{ssl:} listener's private key is a secret, held to what C{[tlsd] key}
is: a file of ipcd's user that no one else may read, and not encrypted;
its other files (C{certKey=}...) must be regular files of at most 1 MiB.

Twisted's C{ssl:} parser reads whatever file its C{privateKey=} names
(C{server.pem} when none is named), with no regard to who else may read
it, and through OpenSSL's loader, which asks for an encrypted key's
passphrase on ipcd's terminal and waits there.  So a listener's key is
checked before Twisted is given the endpoint string.
"""

from __future__ import annotations

from ipcd.compat import twisted as compat_twisted

# What Twisted's ssl: parser reads when no privateKey= is given.
DEFAULT_PRIVATE_KEY = "server.pem"


class UnsafeKey(Exception):
    """A listener's key that may not be used: the one line that says why."""


def wrapped(description: str) -> tuple[str, str]:
    """
    The type of endpoint string C{description} (lower case) and the string
    that listens: the one Twisted's C{haproxy:} wrapper wraps, if it is one.
    """
    return unwrapped(description)[1:]


def unwrapped(description: str) -> tuple[int, str, str]:
    """
    L{wrapped}'s type and string, after how many C{haproxy:} wrappers
    (each reads a PROXY header of its own).
    """
    layers = 0
    kind = compat_twisted.endpoint_type(description)
    while kind == "haproxy":
        description = description.partition(":")[2]
        kind = compat_twisted.endpoint_type(description)
        layers += 1
    return layers, kind, description


def check_listener_key(description: str) -> None:
    """
    Raise L{UnsafeKey} if endpoint string C{description} is an C{ssl:}
    listener whose private key is not a secret ipcd may use.
    """
    kind, listens = wrapped(description)
    if kind != "ssl":
        return
    from ipcd.daemons.tls.material import (
        MaterialError,
        read_certificates,
        read_file,
        read_private_key,
    )

    keywords = _ssl_arguments(listens)
    key = keywords.get("privateKey", DEFAULT_PRIVATE_KEY)
    try:
        read_private_key("privateKey", key)
        # The other files Twisted's parser reads, with a plain open(): a
        # FIFO would stall ipcd's start until a writer came.
        for name in ("extraCertChain", "dhParameters"):
            if name in keywords:
                read_file(name, keywords[name])
        # Without certKey=, Twisted reads the certificate from the key's
        # file; OpenSSL's "no start line" would not say which file or why.
        read_certificates("certKey", keywords.get("certKey", key))
    except MaterialError as e:
        if "certKey" in keywords or not str(e).startswith("certKey"):
            raise UnsafeKey(str(e)) from None
        raise UnsafeKey(
            f"{e} (without certKey=, the certificate is read from privateKey=: "
            "name its file with certKey=)"
        ) from None


def _ssl_arguments(listens: str) -> dict[str, str]:
    """
    The arguments of C{ssl:} listener C{listens} by their names, given by
    position or not (C{ssl:443:KEY:CERT} is Twisted's too: its key was
    taken for the default, C{server.pem}, and the listener refused).
    """
    from ipcd.checkers import named_arguments

    try:
        return named_arguments("ssl", listens)
    except TypeError:  # arguments Twisted's parser takes not: refused there
        return compat_twisted.endpoint_keywords(listens)
