"""
Checkers of configuration values, one per kind of value: each takes a value
as TOML gave it and returns the value to keep, or raises L{Expected}
(C{expected <this>, got <value>}) or L{Invalid} (what is wrong).

L{ipcd.config} checks ipcd's own keys with them, and a protocol daemon's
settings (L{ipcd.daemons.Setting}) name them as their C{check}; where the
value came from is L{ipcd.config}'s to say.
"""

from __future__ import annotations

import grp
import ipaddress
import math
import re
from collections.abc import Callable
from typing import Any

from ipcd.compat import twisted as compat_twisted
from ipcd.listenerkeys import wrapped
from ipcd.names import (
    MAX_BACKLOG,
    OWN_NAMES,
    InvalidServiceName,
    validate_service_name,
)
from ipcd.routes import SCHEME, loose_ipv4


class Expected(Exception):
    """A value of the wrong shape: C{expected <this>, got <value>}."""


class Invalid(Exception):
    """A value of the right shape that names nothing usable: said as it is."""


# The longest any configured number of seconds may be: a week.  Far more is
# a mistake (milliseconds for seconds, 1e300), and TOML's integers have no
# bound: 10**400 is no float at all (it made a traceback, not an error).
MAX_SECONDS = 7 * 24 * 3600
_AT_MOST = f"at most {MAX_SECONDS} (a week)"


def _number(value: Any) -> bool:
    """
    A number of seconds up to L{MAX_SECONDS}: TOML's nan and inf are none
    (a timer of nan fails); an int is compared as it is, before any float.
    """
    return (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and value <= MAX_SECONDS  # (False for nan)
        and (isinstance(value, int) or math.isfinite(value))
    )


def positive_number(value: Any) -> float:
    if not _number(value) or value <= 0:
        raise Expected(f"a number of seconds greater than 0 and {_AT_MOST}")
    return float(value)


def positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise Expected("a whole number greater than 0")
    return value


def non_negative_number(value: Any) -> float:
    if not _number(value) or value < 0:
        raise Expected(
            f"a number of seconds, 0 or more (0: no deadline) and {_AT_MOST}"
        )
    return float(value)


def prefix_length(bits: int) -> Any:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise Expected(f"a prefix length from 0 to {bits}")
        if not 0 <= value <= bits:
            raise Expected(f"a prefix length from 0 to {bits}")
        return value

    return check


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Expected("true or false")
    return value


def non_empty_string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise Expected("a non-empty string")
    return value


def endpoint(value: Any) -> str:
    if not isinstance(value, str) or ":" not in value:
        raise Expected("an endpoint string like 'tcp:9000:interface=127.0.0.1'")
    check_server_endpoint(value)
    return value


def not_tls(why: str) -> Callable[[Any], str]:
    """
    The check of a listener that may not speak TLS itself (C{ssl:},
    C{tls:}, inside C{haproxy:} too): refused saying C{why}, and what to
    write instead.
    """

    def check(value: Any) -> str:
        value = endpoint(value)
        if wrapped(value)[0] in ("ssl", "tls"):
            raise Invalid(f"{value!r}: {why}")
        return value

    return check


def metrics_endpoint(value: Any) -> str:
    """
    The metrics listener: a bare port (C{9101}, C{"tcp:9101"}) listens on
    127.0.0.1 only, as nobody should publish ipcd's metrics by accident;
    any other endpoint string is taken as written.
    """
    if isinstance(value, int):
        value = str(value)  # (true becomes "True": refused below all the same)
    if isinstance(value, str) and re.fullmatch(r"(tcp:)?[0-9]+", value):
        value = f"tcp:{value.removeprefix('tcp:')}:interface=127.0.0.1"
    value = endpoint(value)
    if _on_unix_socket(value):
        # twisted.web's WSGI wants a network peer's address: from a UNIX
        # one, every request fails (500, and a traceback logged).
        raise Invalid(f"{value!r}: metrics are served over TCP, not a UNIX socket")
    return value


# A systemd: endpoint string's argument for a UNIX socket.
_UNIX_DOMAIN = re.compile(r":domain=unix(?::|$)", re.IGNORECASE)


def _on_unix_socket(description: str) -> bool:
    """Whether endpoint string C{description} listens on a UNIX socket."""
    kind, description = wrapped(description)
    return kind == "unix" or (
        kind == "systemd" and _UNIX_DOMAIN.search(description) is not None
    )


def _server_endpoint_types() -> list[str]:
    from twisted.internet.interfaces import IStreamServerEndpointStringParser
    from twisted.plugin import getPlugins

    plugins = getPlugins(IStreamServerEndpointStringParser)
    built_in = compat_twisted.server_endpoint_types()
    return sorted({*built_in, *(p.prefix.lower() for p in plugins)} - {"stdio"})


def _known_server_endpoint_type(kind: str) -> list[str] | None:
    """
    None when C{kind} is a known server endpoint type, else the known ones.
    A built-in one (C{tcp}, every listener's default) needs no look at the
    plugins: that scan reads each C{dropin.cache} on C{sys.path}, about 4
    ms on the reactor's thread per listener setting, at each reload.
    """
    if kind in compat_twisted.server_endpoint_types():
        return None
    known = _server_endpoint_types()
    return None if kind in known else known


def check_server_endpoint(description: str) -> None:
    """
    Raise L{Invalid} unless Twisted's C{serverFromString} would accept
    C{description}: a known type (built in or a plugin) and, for the built-in
    C{tcp}, C{unix} and C{ssl} and Twisted's own C{tcp6} and C{tls} (in
    C{haproxy:} or not), arguments their parsers take and that name
    something to listen on.  Needs no reactor and listens on nothing, so a bad listener
    is refused when the configuration loads (and a reload with one keeps
    the old configuration).  Colons left unescaped in a value
    (C{interface=::1}) or at the end are said so, with a string that would
    do: only one this check takes.
    """
    reason = _argument_error(description)
    if reason is None:
        return
    repaired = _repaired(description)
    if repaired is not None:
        how, fixed = repaired
        raise Invalid(f"invalid endpoint {description!r}: {how} (write '{fixed}')")
    if re.search(r"=[^:=]*::", description):  # an IPv6 address, unescaped
        reason += r" (a ':' inside a value is written '\:', as in interface=\:\:1)"
    raise Invalid(f"invalid endpoint {description!r}: {reason}")


def _argument_error(description: str) -> str | None:
    """
    Why the arguments of endpoint string C{description} are not ones its
    parser takes, in a person's words (None: they are); L{Invalid} for
    anything else wrong with it (its type, a port out of range).
    """
    # Twisted's own strports machinery: no reactor is imported by these.
    if compat_twisted.ends_in_lone_backslash(description):
        # Twisted's own tokenizer fails there with a RuntimeError.
        raise Invalid(
            f"invalid endpoint string {description!r}: "
            "a '\\' at the end escapes nothing"
        )
    try:
        # haproxy: Twisted's wrapper; the string it wraps is the listener
        # (haproxy:stdio: is a wrapper around stdio: no listener).
        listens_on, listens = wrapped(description)
    except (ValueError, IndexError) as e:
        raise Invalid(f"invalid endpoint string {description!r}: {e}") from None
    if not listens_on:
        # haproxy: with nothing after it: Twisted says "Unknown endpoint
        # type: ''" only when ipcd starts.
        raise Invalid(
            f"{description!r} wraps no listener: write one after 'haproxy:' "
            "(haproxy:tcp:9000:interface=127.0.0.1)"
        )
    if listens_on == "autobahn":
        # autobahn's plugin (installed with websocketd's autobahn): tcpd and
        # tlsd relayed its raw socket (the peer got nothing), and the
        # listener it wraps went unchecked (other scripts' digits listened).
        raise Invalid(
            f"{description!r}: autobahn: wraps its listener in WebSocket "
            "framing, which no ipcd listener speaks (websocketd serves "
            "WebSockets itself): write the listener it wraps"
        )
    if listens_on == "stdio":
        # Twisted's stdio: "listens" on ipcd's own stdin: one peer, no address.
        raise Invalid(
            f"{description!r} is no listener (it is ipcd's own standard input "
            "and output): give an endpoint peers connect to"
        )
    # The wrapper's type, then the wrapped one's (one parse less: Twisted's
    # is some 50 us, at each reload).
    kind = listens_on if listens == description else "haproxy"
    for each in dict.fromkeys((kind, listens_on)):
        known = _known_server_endpoint_type(each)
        if known is not None:
            raise Invalid(
                f"unknown endpoint type {each!r} in {description!r} "
                f"(known: {', '.join(known)})"
            )
    try:
        port = _checked_arguments(listens_on, listens)
    except (ValueError, TypeError, IndexError) as e:
        return _reason(e)
    if port is not None and not 0 <= port <= 65535:
        raise Invalid(
            f"invalid endpoint {description!r}: port {port} is not 0 to 65535"
        )
    return None


def _repaired(description: str) -> tuple[str, str] | None:
    """
    What is wrong with C{description}'s colons and the string that would
    do, if one this check takes is found: each C{:} in a C{name=value}
    escaped (C{interface=::1} is C{interface=\\:\\:1}), or the C{:} at its
    end (an empty argument: Twisted's backlog of C{''}) left out, or both.
    """
    inside = r"a ':' inside a value is written '\:'"
    at_end = "a ':' at the end is an empty argument"
    trimmed = re.sub(r"(?<!\\)(\\\\)*:+$", r"\1", description)
    for how, fixed in (
        (inside, _colons_escaped(description)),
        (at_end, trimmed),
        (f"{inside}, and {at_end}", _colons_escaped(trimmed)),
    ):
        # (Shown as it is written, not repr'd: a character that is not
        # printable, a newline say, would not be one line.)
        if fixed != description and fixed.isprintable() and _takes(fixed):
            return how, fixed
    return None


def _takes(description: str) -> bool:
    """Whether the check takes C{description} (no suggestion sought)."""
    try:
        return _argument_error(description) is None
    except Invalid:
        return False


def _colons_escaped(description: str) -> str:
    """
    C{description} with each C{:} in a C{name=value} written C{\\:} (all up
    to the next C{name=}).
    """
    parts = re.split(r"(?<!\\):", description)
    joined = [parts[0]]
    in_value = False
    for part in parts[1:]:
        if in_value and "=" not in part:
            joined[-1] += "\\:" + part
        else:
            joined.append(part)
            in_value = "=" in part
    return ":".join(joined)


# What a built endpoint is given for a reactor: it is never listened on.
_NO_REACTOR = object()

# The arguments by position of the parsers checked here (Twisted's names).
_POSITIONS = {
    "tcp": ("port", "interface", "backlog"),
    "tcp6": ("port", "backlog", "interface"),
    "tls": ("path", "port", "backlog", "interface"),
    "unix": ("address", "mode", "backlog", "lockfile"),
    "ssl": (
        *("port", "privateKey", "certKey", "sslmethod", "interface", "backlog"),
        *("extraCertChain", "dhParameters"),
    ),
    "systemd": ("domain", "index", "name"),
}

# The arguments that Twisted's parsers read with int(), and their base.
_NUMBERS = {
    "tcp": {"port": 10, "backlog": 10},
    "tcp6": {"port": 10, "backlog": 10},
    "tls": {"port": 10, "backlog": 10},
    "ssl": {"port": 10, "backlog": 10},
    "unix": {"mode": 8, "backlog": 10, "lockfile": 10},
    "systemd": {"index": 10},
}


def _check_ssl_method(method: str | None) -> None:
    """
    Raise ValueError if C{method} (ssl:'s sslmethod=) is given: Twisted
    then sets no minimum version (its own is TLS 1.2), so TLSv1_METHOD made
    a listener of TLS 1.0 only, and a name OpenSSL has not failed at start
    in Python's words (AttributeError).
    """
    if method is not None:
        raise ValueError(
            f"sslmethod={method!r}: leave it out (with it Twisted sets no "
            "minimum TLS version; without, TLS 1.2 at the least)"
        )


def _arguments(kind: str, listens: str) -> tuple[list[str], dict[str, str]]:
    """
    The arguments of C{listens} (of type C{kind}): those given by position,
    and all by name, unescaped; TypeError (in Python's words, as Twisted's
    parser would raise at start) for arguments its parser does not take.
    """
    names = _POSITIONS[kind]
    given, keywords = compat_twisted.endpoint_arguments(listens)
    if len(given) > len(names):
        raise TypeError(f"takes at most {len(names)} arguments ({', '.join(names)})")
    named = dict(zip(names, given, strict=False))
    for name, value in keywords.items():
        if name not in names:
            raise TypeError(f"got an unexpected keyword argument {name!r}")
        if name in named:
            raise TypeError(f"got multiple values for argument {name!r}")
        named[name] = value
    return given, named


def named_arguments(kind: str, listens: str) -> dict[str, str]:
    """
    The arguments of listener C{listens} of a type checked here (C{kind}:
    C{tcp}, C{ssl}, ...) by their names, whether given by position or
    not; TypeError for arguments its parser does not take.
    """
    return _arguments(kind, listens)[1]


def _checked_arguments(kind: str, listens: str) -> int | None:
    """
    Raise ValueError or TypeError unless the parser of C{listens} (of type
    C{kind}) takes its arguments and they name something to listen on,
    where that can be told without listening or reading a file; its port,
    where there is one.
    """
    if kind == "ipc":
        _check_ipc(listens)
        return None
    if kind not in _POSITIONS:
        return None  # a plugin's: told only when it listens
    positionals, given = _arguments(kind, listens)
    if kind == "tcp6":
        # Twisted's own plugin, which only builds a TCP6ServerEndpoint:
        # built here by the public way (no reactor: it is not listened
        # on), so that 'interface=::1' is refused now, not at start.
        from twisted.internet.endpoints import serverFromString

        serverFromString(_NO_REACTOR, listens)
        port: int | None = int(given["port"])
    elif kind in ("tls", "ssl"):
        # Twisted's own too, but their parsers read files: not run here.
        if kind == "tls" and not given.get("path"):
            # Else the working directory's PEM files, on port 443.
            raise ValueError("no directory of PEM files (tls:DIRECTORY:port=N)")
        if kind == "ssl" and "port" not in given:
            raise TypeError("missing 1 required positional argument: 'port'")
        if kind == "ssl":
            _check_ssl_method(given.get("sslmethod"))
        port, _backlog = int(given.get("port", 443)), int(given.get("backlog", 50))
    elif kind == "systemd":
        _check_systemd(given)
        port = None  # its socket is systemd's: told at start
    else:  # tcp, unix: their parsers are Twisted's built-in ones
        port = compat_twisted.check_server_arguments(listens)
    _check_numbers(kind, given)
    if kind == "unix" and not given.get("address"):
        # Twisted would bind '' (the abstract namespace) and leave its lock
        # file, '.lock', in ipcd's working directory.
        raise ValueError("no socket path (unix:/run/ipcd/NAME.sock)")
    if kind == "unix" and not given["address"].startswith("/"):
        # A relative path ('@name' too: Twisted has no such abstract form)
        # is bound in ipcd's working directory; an abstract one (NUL
        # first) has no mode: any local user may connect.
        raise ValueError(
            f"socket path {given['address']!r} is not absolute "
            "(unix:/run/ipcd/NAME.sock)"
        )
    if kind != "unix":
        _check_interface(kind, given.get("interface"))
    if "" in positionals:
        # A ':' too many: 'tcp:9101:' is tcp's interface of '' (every
        # address), where [metrics] listen = 'tcp:9101' is 127.0.0.1.
        raise ValueError("an empty argument (a ':' too many)")
    return port


# The families a systemd: listener may name (Twisted reads AF_ and the word).
_SYSTEMD_DOMAINS = ("INET", "INET6", "UNIX")


def _check_systemd(given: dict[str, str]) -> None:
    """
    Raise ValueError unless a C{systemd:} listener's arguments C{given}
    name a stream socket's family and the socket, by index or by name, one
    of them: Twisted's parser said what was wrong only at start, in
    Python's words (a missing positional argument 'domain').
    """
    domain = given.get("domain")
    if domain is None:
        raise ValueError("no domain= (INET, INET6 or UNIX)")
    if domain not in _SYSTEMD_DOMAINS:
        raise ValueError(f"domain {domain!r} is not INET, INET6 or UNIX")
    if "index" in given and "name" in given:
        raise ValueError("both index= and name= (one of them)")
    if "index" not in given and "name" not in given:
        raise ValueError("neither index= nor name= (one of them)")


def _check_ipc(listens: str) -> None:
    """
    Raise ValueError or TypeError unless ipcd's own C{ipc:} parser takes
    C{listens}: it is pure (no reactor, no socket), so its name, mode and
    backlog are refused now, and by a reload, not only at the next start.
    """
    from ipcd.endpoints import IPCServerParser

    positionals, keywords = compat_twisted.endpoint_arguments(listens)
    IPCServerParser().parseStreamServer(_NO_REACTOR, *positionals, **keywords)


def _check_interface(kind: str, interface: str | None) -> None:
    """
    Raise ValueError if C{interface} is one a TCP port of C{kind} cannot
    listen on as meant: Twisted takes a value with a ':' that is no IPv6
    address for an IPv4 host name (found at start: none), an empty one
    for IPv4's every address, in a tcp6 or tls listener too, and inet_aton's
    other spellings of an address for that address (C{0} for 0.0.0.0), and
    an IPv4-mapped IPv6 address for its IPv4 one (C{::ffff:0:0}: every one).
    """
    if interface is None:
        return
    address = loose_ipv4(interface)
    if address is not None:  # ('0' listened on 0.0.0.0, every address)
        raise ValueError(
            f"interface {interface!r} is {address} as a socket reads it (write that)"
        )
    if ":" in interface and not _ipv6_address(interface):
        raise ValueError(f"interface {interface!r} is no IPv6 address")
    mapped = _ipv4_mapped(interface)
    if mapped is not None:  # ('::ffff:0:0' listened on every IPv4 address)
        raise ValueError(
            f"interface {interface!r} is the IPv4 address {mapped} as a socket "
            "reads it (write that, over IPv4)"
        )
    if not interface and kind in ("tcp6", "tls"):
        raise ValueError(
            "an empty interface= is IPv4's every address (IPv6's is interface=\\:\\:)"
        )


def _check_numbers(kind: str, given: dict[str, str]) -> None:
    """
    Raise ValueError naming the first number of C{given} (the arguments of
    a C{kind} listener) not written in plain ASCII digits, and an
    interface that is not ASCII.  Twisted reads them with int(), which
    also takes other scripts' digits ('\u0669\u0660\u0660\u0660' is
    9000), a sign ('+9000'; a systemd index of '-1' is the last socket),
    '_' ('9_000'), spaces around, and in base 8 '0o'; and Python binds a
    host name after IDNA's mapping ('\uff11\uff12\uff17.0.0.1' is
    127.0.0.1).  A string that only listens as meant is one a person
    reads as it is.
    """
    for name, base in _NUMBERS[kind].items():
        value = given.get(name)
        if value is not None and not _digits(value, base):
            digits = "digits 0-7 (octal)" if base == 8 else "digits 0-9"
            raise ValueError(f"{name} {value!r} is not {digits} only")
    # Bounded as ipc:'s are: listen() takes a C int (more stopped the start
    # in Python's words), and a mode past 777 set a socket's sticky bits.
    backlog = given.get("backlog")
    if backlog is not None and int(backlog) > MAX_BACKLOG:
        raise ValueError(
            f"backlog {backlog} is more than listen() takes ({MAX_BACKLOG})"
        )
    mode = given.get("mode")
    if kind == "unix" and mode is not None and int(mode, 8) > 0o777:
        raise ValueError(f"mode {mode} is more than permission bits (0-777)")
    interface = given.get("interface")
    if interface is not None and not interface.isascii():
        raise ValueError(
            f"interface {interface!r} is not ASCII (an address is written in "
            "ASCII digits; a host name in its xn-- form)"
        )


def _digits(text: str, base: int) -> bool:
    """Whether C{text} is one or more ASCII digits of C{base} (8 or 10)."""
    return re.fullmatch("[0-7]+" if base == 8 else "[0-9]+", text) is not None


def _ipv4_mapped(text: str) -> str | None:
    """The IPv4 address that IPv6 address C{text} maps (C{::ffff:a.b.c.d})."""
    try:
        mapped = ipaddress.IPv6Address(text).ipv4_mapped
    except ValueError:
        return None  # (no IPv6 address; a zoned one is on a link, no IPv4)
    return None if mapped is None else str(mapped)


def _ipv6_address(text: str) -> bool:
    from twisted.internet.abstract import isIPv6Address

    return isIPv6Address(text)


def _reason(error: Exception) -> str:
    """An endpoint parser's error in a person's words, not Python's."""
    # "_parseTCP() got an unexpected keyword argument": not our name.
    reason = re.sub(r"^(\w+\.)?_?\w+\(\) ", "", str(error))
    # A port or backlog that is no number: say so, not in Python's words.
    return re.sub(
        r"^invalid literal for int\(\) with base 10: (.*)$",
        r"\1 is not a whole number",
        reason,
    )


def group_name(value: Any) -> str:
    name = non_empty_string(value)
    try:
        grp.getgrnam(name)
    except KeyError:
        raise Invalid(
            f"no such group {name!r} (create it, or name one that exists: getent group)"
        ) from None
    return name


def daemon_schemes(value: Any) -> tuple[str, ...]:
    expected = "a list of URI schemes like ['tls']"
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Expected(expected)
    for scheme in value:
        if not SCHEME.fullmatch(scheme) or scheme == "unix":
            raise Expected(f"{expected} ({scheme!r} is not a daemon's scheme)")
        if scheme in OWN_NAMES:
            raise Expected(f"{expected} ({scheme!r} is ipcd's own socket)")
        try:
            validate_service_name(scheme)
        except InvalidServiceName:
            raise Expected(f"{expected} ({scheme!r} cannot be a socket in RUNDIR)")
    return tuple(dict.fromkeys(value))
