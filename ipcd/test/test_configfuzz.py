"""
The configuration loader under random but plausible files: every file
either loads or is refused with a L{ConfigError} of one line naming the
file, never another exception; what loads, C{ipcd status} can show.

Files are made of ipcd's own sections and keys (and some that are not),
with values a person might write or mistype: endpoint strings with colons
and escapes, URIs, rules, unicode, huge and odd numbers, dates, arrays,
inline tables, and the same key or section twice.
"""

from __future__ import annotations

import json
import os
from typing import Any

import hypothesis
from hypothesis import HealthCheck, example, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from ipcd.config import (
    _LISTS,
    _NAME_TABLES,
    _SCHEMA,
    MAX_ERROR,
    Config,
    ConfigError,
    load_config,
)
from ipcd.control import config_summary
from ipcd.daemons import default_registry

_REGISTRY = default_registry()

# Each section's keys, ipcd's and each protocol daemon's (None: top level).
_KEYS: dict[str | None, list[str]] = {
    section: list(keys) for section, keys in _SCHEMA.items()
}
for _daemon in _REGISTRY.values():
    _KEYS[_daemon.section] = [setting.key for setting in _daemon.settings]
_SECTIONS = [name for name in _KEYS if name is not None] + list(_NAME_TABLES)


def _basic(text: str) -> str:
    """C{text} as a TOML basic string: escapes for what TOML wants escaped."""
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _literal(text: str) -> str:
    """C{text} as a TOML literal string, where it can be one (else basic)."""
    if "'" in text or any(ord(c) < 0x20 and c != "\t" or ord(c) == 0x7F for c in text):
        return _basic(text)
    return "'" + text + "'"


# Pieces of what people write in ipcd's string values.
_WORDS = [
    *("tcp", "tcp6", "unix", "ssl", "tls", "udp", "systemd", "haproxy", "ipc"),
    *("stdio", "ws", "wss", "autobahn", "0", "9000", "65535", "65536", "99999"),
    *("-1", "127.0.0.1", "::1", "\\:\\:1", "fe80::1%lo", "0.0.0.0", "[::1]"),
    *("interface=", "port=", "backlog=", "domain=INET", "domain=UNIX", "index=0"),
    *("name=tcpd", "mode=660", "path=", "privateKey=/k.pem", "/run/ipc", "."),
    *("..", "pong", "allow", "deny", "in", "out", "local", "*", "uid:0"),
    *("user:root", "group:wheel", "ip:10.0.0.0/8", "host:x", "port:9", "1.2"),
    *("1.3", "x", "é", "\u2028", "\x00", "\\", "\\\\", "=", ":", "/", " ", ""),
]
_SEPARATORS = st.sampled_from([":", ":", ":", " ", "", "/", "://", "\\:", ";"])
_PIECED = st.lists(
    st.tuples(st.sampled_from(_WORDS), _SEPARATORS), min_size=1, max_size=6
).map(lambda pairs: "".join(word + sep for word, sep in pairs))
_STRINGS = st.one_of(
    _PIECED,
    st.text(max_size=40),
    st.builds(
        "{}://{}:{}/{}".format,
        st.sampled_from(["tcp", "tls", "ws", "wss", "udp", "unix", "x", ""]),
        st.sampled_from(["h", "[::1]", "::1", "10.0.0.1", "é", ""]),
        st.sampled_from(["9000", "0", "65536", "x", "", "-1", "1" * 30]),
        st.sampled_from(["pong", "", "a/b", "..", "é"]),
    ),
)
_STRING_VALUES = st.one_of(_STRINGS.map(_basic), _STRINGS.map(_literal))
_NUMBERS = st.one_of(
    st.integers().map(str),
    st.sampled_from(
        ["10" + "0" * 400, "-1" + "0" * 400, str(2**63), str(2**64), "0x7f", "0o17"]
        + ["0b1", "1_000", "+1", "-0", "inf", "-inf", "nan", "+nan", "1e300"]
        + ["1e-320", "-0.0", "0.5", "6.02e23", "604800", "604801", "604800.0001"]
    ),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
)
_OTHER_SCALARS = st.sampled_from(
    ["true", "false", "1979-05-27T07:32:00Z", "1979-05-27", "07:32:00"]
    + ["1979-05-27T00:32:00.999999-07:00", "1979-05-27 07:32:00"]
)
_SCALARS = st.one_of(_STRING_VALUES, _NUMBERS, _OTHER_SCALARS)
_KEY_NAMES = st.one_of(
    st.sampled_from(sorted({k for keys in _KEYS.values() for k in keys})),
    st.sampled_from(["pong", "a", "b", "x", "tcp", "é", "a.b", "1"]),
    st.text(min_size=0, max_size=8),
)


def _key(name: str) -> str:
    """C{name} as a TOML key: bare where it can be, else quoted."""
    bare = name and all(c.isascii() and (c.isalnum() or c in "_-") for c in name)
    return name if bare else _basic(name)


_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda items: "[" + ", ".join(items) + "]"),
        st.lists(st.tuples(_KEY_NAMES.map(_key), inner), max_size=3).map(
            lambda pairs: "{" + ", ".join(f"{k} = {v}" for k, v in pairs) + "}"
        ),
    ),
    max_leaves=6,
)


def _toml(value: Any) -> str:
    """A Python value (a default, an example) as TOML writes it."""
    if isinstance(value, str):
        return _basic(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        pairs = (f"{_key(k)} = {_toml(v)}" for k, v in value.items())
        return "{" + ", ".join(pairs) + "}"
    return repr(value)


# Values each key takes (its default, and more), to get past one key to the
# next: the loader stops at the first error.
_GOOD: dict[tuple[str | None, str], list[Any]] = {
    (None, "rundir"): ["/run/ipc", "run", "./x/../y", "/tmp/libipc-run"],
    (None, "max_message_size"): [1048576, 1],
    ("ipcd", "external_daemons"): [[], ["quic"], ["quic", "quic"]],
    ("control", "group"): ["root"],
    ("metrics", "listen"): [9101, "9101", "tcp:9101", "systemd:domain=INET:index=0"],
    ("dns", "servers"): [[], ["127.0.0.1:5353", "[::1]"]],
    ("tlsd", "psk_hosts"): [{}, {"h": "id"}],
    ("tlsd", "psk_identity"): ["", "client-1"],
    ("websocketd", "allowed_origins"): [[], ["https://example.com"]],
    ("udpd", "listen"): ["udp:9000:interface=127.0.0.1", "systemd:domain=INET:index=0"],
}
_DEFAULTS = {"rundir": None, **vars(Config(rundir="/run/ipc"))}
for _section, _keys in _SCHEMA.items():
    for _name, (_checker, _attribute) in _keys.items():
        _GOOD.setdefault((_section, _name), [_DEFAULTS[_attribute]])
for _daemon in _REGISTRY.values():
    for _setting in _daemon.settings:
        _GOOD.setdefault((_daemon.section, _setting.key), [_setting.default])
_LISTENERS = [
    "tcp:9000:interface=127.0.0.1",
    "tcp6:9000:interface=\\:\\:1",
    "haproxy:tcp:9000",
    "unix:/run/ipcd/x.sock:mode=660",
    "ssl:8443:privateKey=/k.pem",
    "systemd:domain=INET:index=0",
]
_SERVICES = [
    "pong",
    "a",
    "b",
    "c",
    "x",
    "ipc",
    "tcp",
    ".x",
    "a/b",
    "é",
    "",
    "ipcd-control",
]
_URIS = ["pong", "unix://pong", "unix:///run/x.sock", "tcp://10.0.0.1:9000/pong"]
_URIS += ["tls://[::1]:9001/", "ws://h:80/x", "udp://h:9/p", "quic://h:1/x"]
_RULES = ["allow in pong *", "deny out * host:x", "allow local pong uid:0"]
_RULES += ["allow in *", "allow in pong ip:10.0.0.0/8", "deny in * *"]
_GRANTS = ["pong *", "secret group:wheel", "x ip:::1/128", "a psk:id"]


def _good(section: str | None, name: str) -> st.SearchStrategy[str]:
    """Values key C{name} of C{section} takes (and, as often, what it may not)."""
    if section in _NAME_TABLES:
        return st.sampled_from(_URIS + _SERVICES).map(_basic)
    examples = list(_GOOD.get((section, name), []))
    if name == "listen" and section != "udpd":
        examples += _LISTENERS
    examples = [e for e in examples if e is not None]
    if not examples:
        return _VALUES
    return st.sampled_from(examples).map(_toml)


def _list(name: str) -> st.SearchStrategy[str]:
    """A top-level list of one-line entries: rules or grants."""
    good = st.sampled_from(_RULES if name == "rules" else _GRANTS).map(_basic)
    entries = st.one_of(good, good, good, _STRING_VALUES)
    return st.lists(entries, max_size=4).map(lambda e: "[" + ", ".join(e) + "]")


# How often a value is one the key takes, not any value at all; how
# rarely a key or section is unknown, or given twice (TOML refuses that).
_ODDS = st.sampled_from([True, True, True, True, False])
_RARELY = st.sampled_from([False] * 14 + [True])


@st.composite
def _entries(draw: Any, section: str | None) -> list[str]:
    """
    Lines of C{key = value} for a section: its own keys, each once, most
    with values they take; now and then a key twice, or one unknown.
    """
    if section in _NAME_TABLES:
        names = draw(st.lists(st.sampled_from(_SERVICES), unique=True, max_size=4))
    else:
        known = [*_KEYS.get(section, []), *(_LISTS if section is None else ())]
        names = draw(st.lists(st.sampled_from(known), unique=True, max_size=6))
    if draw(_RARELY):
        names.append(draw(_KEY_NAMES))
    if names and draw(_RARELY):
        names.append(names[0])  # TOML refuses it
    lines = []
    for name in names:
        if name in _LISTS and section is None:
            value = draw(_list(name) if draw(_ODDS) else _VALUES)
        else:
            value = draw(_good(section, name) if draw(_ODDS) else _VALUES)
        lines.append(f"{_key(name)} = {value}")
    return lines


@st.composite
def config_files(draw: Any) -> str:
    """The text of a plausible configuration file."""
    lines = draw(_entries(None))
    sections = draw(st.lists(st.sampled_from(_SECTIONS), unique=True, max_size=6))
    if draw(_RARELY):
        sections.append(draw(_KEY_NAMES))  # one that is not ipcd's
    if sections and draw(_RARELY):
        sections.append(sections[0])  # TOML refuses it
    for section in sections:
        header = "[[{}]]" if draw(_RARELY) else "[{}]"
        lines.append(header.format(_key(section)))
        lines += draw(_entries(section if section in _KEYS else None))
    return "\n".join(lines) + draw(st.sampled_from(["\n", "", "\r\n"]))


class ConfigFuzzTests(SynchronousTestCase):
    def check(self, text: str) -> None:
        """C{text} loads (and C{ipcd status} can show it) or is one line."""
        path = os.path.join(self.directory, "ipcd.toml")
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        try:
            config = load_config(path, None, {}, _REGISTRY)
        except ConfigError as e:
            message = str(e)
            self.assertNotIn("\n", message, text)
            self.assertNotIn("\r", message, text)
            self.assertTrue(message.startswith(f"{path}: "), (message, text))
            self.assertLessEqual(len(message), MAX_ERROR + 50)
            return
        json.dumps(config_summary(config))

    @settings(
        max_examples=int(os.environ.get("IPCD_FUZZ_EXAMPLES", 300)),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @hypothesis.given(config_files())
    @example('[tcpd]\nlisten = "tcp:9000"\nlisten = "tcp:9001"\n')  # a key twice
    @example("[tcpd]\n[tcpd]\n")  # a section twice
    @example("[ipcd]\nlookup_timeout = 1979-05-27T07:32:00Z\n")
    @example("max_message_size = 1" + "0" * 400 + "\n")
    # What it found: each now one line (test_config, test_tlsmaterial).
    @example("[tlsd]\nmax_version = []\n")  # a TypeError (unhashable)
    @example('"\\r" = []\n')  # a key of a carriage return, shown as it was
    @example("a = " + "[" * 5000 + "]" * 5000 + "\n")  # a RecursionError
    @example('[tcpd]\nlisten = "' + "x" * 100_000 + '"\n')  # as long, quoted
    def test_loadsOrOneLine(self, text: str) -> None:
        self.check(text)

    def setUp(self) -> None:
        self.directory = self.mktemp()
        os.makedirs(self.directory)
