"""
TLS pre-shared keys (TLS 1.3 and 1.2) on a pyOpenSSL Context.

pyOpenSSL has no PSK API; cryptography's OpenSSL bindings (the ones
pyOpenSSL uses) declare C{SSL_CTX_set_psk_server_callback} and
C{SSL_CTX_set_psk_client_callback}.  L{use_server_keys} and
L{use_client_key} wire them to a Context through cffi callbacks, kept on
the Context so they live as long as it does.

    L{read_secrets}      the secrets file: C{IDENTITY:HEXKEY} lines, refused
                         unless private to the daemon's user
    L{use_server_keys}   a server Context that accepts these identities
    L{use_client_key}    a client Context that presents one identity
    L{psk_identity}      the identity a server connection was offered

What OpenSSL does with these callbacks under TLS 1.3: they work only with
SHA-256 suites, and the client's hint is NULL.  An exception inside a
callback fails the handshake silently, so each one catches and logs.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Mapping
from typing import Any
from weakref import WeakKeyDictionary, WeakSet

from OpenSSL.SSL import Connection, Context
from twisted.logger import Logger

from ipcd.compat import pyopenssl as compat_pyopenssl
from ipcd.regularfile import TooLarge, read_regular
from ipcd.rundir import file_kind

log = Logger()

MIN_KEY_BYTES = 16
MAX_IDENTITY = 128  # bytes: OpenSSL's PSK_MAX_IDENTITY_LEN
MAX_KEY_BYTES = 256  # OpenSSL's PSK_MAX_PSK_LEN
# A secrets file larger than this is refused, not cut: 1 MiB holds 1,600
# lines of the longest identity and key, 13,000 of 32-byte keys.
MAX_SECRETS_FILE = 1 << 20

# TLS 1.3 suites these callbacks work with, and the TLS 1.2 PSK suites
# (forward secret first).
TLS13_SUITES = b"TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256"
TLS12_PSK_CIPHERS = (
    b"ECDHE-PSK-CHACHA20-POLY1305:ECDHE-PSK-AES128-CBC-SHA256:"
    b"DHE-PSK-AES128-GCM-SHA256:DHE-PSK-CHACHA20-POLY1305:"
    b"PSK-AES128-GCM-SHA256:PSK-CHACHA20-POLY1305"
)

_lib, _ffi = compat_pyopenssl.bindings()

# The identity each server connection was offered (for logs), and the one
# it was given a key for (for labels: it holds once the handshake completes).
_offered: WeakKeyDictionary[Connection, str] = WeakKeyDictionary()
_accepted: WeakKeyDictionary[Connection, str] = WeakKeyDictionary()
# Server connections offered an identity they have no key for.
_unknown: WeakSet[Connection] = WeakSet()


class SecretsError(ValueError):
    """The secrets file cannot be used; the message is one line."""


def check_private(path: str, info: os.stat_result) -> None:
    """Refuse a secret whose stat C{info} says others could read or replace it."""
    if not stat.S_ISREG(info.st_mode):
        raise SecretsError(
            f"{path} is {file_kind(info.st_mode)}, not a file: name the file itself"
        )
    if info.st_uid != os.geteuid():
        raise SecretsError(
            f"{path} is owned by uid {info.st_uid}, not by ipcd's user "
            f"(uid {os.geteuid()}): chown it"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise SecretsError(
            f"{path} is readable by group or others (mode {mode:04o}): chmod 600 {path}"
        )


def parse_secrets(text: str, path: str = "secrets") -> dict[str, bytes]:
    """C{IDENTITY:HEXKEY} lines (C{#} comments, blank lines) to a mapping."""
    keys: dict[str, bytes] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path} line {number}"
        identity, sep, hexkey = line.rpartition(":")
        if not sep or not identity:
            raise SecretsError(f"{where}: expected IDENTITY:HEXKEY")
        if not identity.isascii() or not identity.isprintable() or " " in identity:
            raise SecretsError(f"{where}: identity must be printable ASCII, no spaces")
        if len(identity) > MAX_IDENTITY:
            raise SecretsError(f"{where}: identity longer than {MAX_IDENTITY} bytes")
        try:
            key = bytes.fromhex(hexkey)
        except ValueError:
            raise SecretsError(f"{where}: the key is not hexadecimal") from None
        if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
            raise SecretsError(
                f"{where}: key of {len(key)} bytes "
                f"(from {MIN_KEY_BYTES} to {MAX_KEY_BYTES})"
            )
        if identity in keys:
            raise SecretsError(f"{where}: identity {identity!r} given twice")
        keys[identity] = key
    return keys


def read_secrets(path: str) -> dict[str, bytes]:
    """
    The keys of secrets file C{path} by identity.  Refused (L{SecretsError})
    unless it is owned by this process's user and private to it: the file
    read, a symbolic link's target (as secret volumes are laid out), like
    tlsd's key.
    """
    try:
        # Checked on the very file read; a FIFO named here is refused, not
        # waited on until a writer comes.
        data = read_regular(
            path, MAX_SECRETS_FILE, check=lambda info: check_private(path, info)
        )
    except OSError as e:
        raise SecretsError(f"cannot read {path}: {e.strerror}") from None
    except TooLarge:
        raise SecretsError(
            f"{path} is larger than {MAX_SECRETS_FILE >> 20} MiB: "
            "not a secrets file, or too many keys for one"
        ) from None
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise SecretsError(f"{path}: not ASCII text") from None
    return parse_secrets(text, path)


def openssl() -> tuple[Any, Any]:
    """cryptography's OpenSSL bindings (C{lib}, C{ffi}): the ones pyOpenSSL uses."""
    return _lib, _ffi


def unavailable() -> str | None:
    """Why this pyOpenSSL cannot do pre-shared keys here; None if it can."""
    for name in (compat_pyopenssl.CONTEXT, compat_pyopenssl.REVERSE_MAPPING):
        if not name.usable():
            return f"this pyOpenSSL has no {name.name}: pre-shared keys are unavailable"
    return None


def psk_identity(connection: Connection) -> str | None:
    """
    The PSK identity a server connection was given a key for, if any: once
    its handshake has completed, the identity the peer proved.
    """
    return _accepted.get(connection)


def offered_identity(connection: Connection) -> str | None:
    """The PSK identity a server connection was offered, known or not."""
    return _offered.get(connection)


def offered_unknown(connection: Connection) -> bool:
    """Whether a server connection was offered an identity it has no key for."""
    return connection in _unknown


def _keep(context: Context, callback: Any) -> None:
    # The cffi callback must outlive every connection made from the Context.
    kept = getattr(context, "_ipcd_psk_callbacks", None)
    if kept is None:
        kept = []
        context._ipcd_psk_callbacks = kept  # type: ignore[attr-defined]
    kept.append(callback)


def _pointer(context: Context) -> Any:
    pointer = compat_pyopenssl.context_pointer(context)
    if pointer is None:  # read_material refuses PSK settings first
        raise RuntimeError(unavailable())
    return pointer


def _copy_key(key: bytes, out: Any, room: int) -> int:
    if len(key) > room:
        return 0
    _ffi.memmove(out, key, len(key))
    return len(key)


def use_server_keys(
    context: Context,
    keys: Callable[[], Mapping[str, bytes]] | Mapping[str, bytes],
) -> None:
    """
    Make C{context} accept the identities of C{keys} (a mapping, or a
    callable giving the current one).  An unknown identity is refused (and
    remembered: L{offered_unknown}); the identity offered is remembered for
    L{offered_identity}, the one accepted for L{psk_identity} (a wrong key
    fails the handshake later, and an unknown identity fails it the same
    way).
    """

    def server(ssl: Any, identity: Any, out: Any, room: int) -> int:
        try:
            connection = compat_pyopenssl.connection_for(ssl)
            if connection is None:
                raise LookupError("no Connection for this SSL pointer")
            name = _ffi.string(identity).decode("ascii", "replace")
            _offered[connection] = name
            current = keys() if callable(keys) else keys
            key = current.get(name)
            if key is None:
                # Said with the failed handshake, at its bounded rate (a
                # line here would be one per handshake a peer starts).
                _unknown.add(connection)
                # A key nobody has: the handshake fails exactly as with a
                # wrong key, so a peer cannot probe for known identities
                # (and a server with a certificate does not fall back to it).
                return _copy_key(os.urandom(32), out, room)
            _accepted[connection] = name
            return _copy_key(key, out, room)
        except Exception:
            log.failure("TLS: the PSK server callback failed")
            return 0

    callback = _ffi.callback(
        "unsigned int(SSL *, char *, unsigned char *, unsigned int)", server
    )
    _keep(context, callback)
    _lib.SSL_CTX_set_psk_server_callback(_pointer(context), callback)
    context.set_tls13_ciphersuites(TLS13_SUITES)


def use_client_key(context: Context, identity: str, key: bytes) -> None:
    """
    Make C{context} present C{identity} with C{key}, and accept only PSK
    suites under TLS 1.2 (a server that does not know the key cannot pass).
    """
    name = identity.encode("ascii")

    def client(
        ssl: Any, hint: Any, out_identity: Any, identity_room: int, out: Any, room: int
    ) -> int:
        try:
            if len(name) + 1 > identity_room:
                return 0
            _ffi.memmove(out_identity, name + b"\0", len(name) + 1)
            return _copy_key(key, out, room)
        except Exception:
            log.failure("TLS: the PSK client callback failed")
            return 0

    callback = _ffi.callback(
        "unsigned int(SSL *, char *, char *, unsigned int, "
        "unsigned char *, unsigned int)",
        client,
    )
    _keep(context, callback)
    _lib.SSL_CTX_set_psk_client_callback(_pointer(context), callback)
    context.set_tls13_ciphersuites(TLS13_SUITES)
    context.set_cipher_list(TLS12_PSK_CIPHERS)
