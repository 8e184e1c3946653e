"""
The private names of pyOpenSSL that ipcd reads: here only.

    L{raw_tls}         a Connection's C{SSL *} and memory BIOs (C{_ssl},
                       C{_into_ssl}, C{_from_ssl}): tlsd's relay on raw
                       sockets calls OpenSSL on them directly; kernel TLS
                       reads how much they hold (L{ipcd.daemons.tls.kswitch})
    L{tls_error}       pyOpenSSL's exception for a failed call
                       (C{_raise_ssl_error}): the relay's log line
    L{ssl_pointer}     a Connection's C{SSL *} (C{_ssl}): the reason a peer's
                       certificate was refused
    L{context_pointer} a Context's C{SSL_CTX *} (C{_context}): PSK callbacks,
                       and kernel TLS's keylog callback
    L{connection_for}  the Connection of an C{SSL *} (C{_reverse_mapping}):
                       the PSK server callback's, and the keylog callback's

and L{bindings}: cryptography's OpenSSL bindings (public, but only as long
as pyOpenSSL needs the functions ipcd calls; L{BINDINGS} checks them).
Each answers None when its name is gone; see L{ipcd.compat}.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.bindings.openssl.binding import Binding
from OpenSSL.SSL import TLS_METHOD, Connection, Context

from ipcd.compat import Name

LIBRARY = "pyOpenSSL"

_binding = Binding()
_ffi, _lib = _binding.ffi, _binding.lib

# What tlsd's raw relay and the PSK callbacks call through the bindings.
RELAY_FUNCTIONS = (
    "SSL_read",
    "SSL_write",
    "SSL_get_error",
    "SSL_shutdown",
    "SSL_pending",
    "BIO_read",
    "BIO_write",
    "ERR_clear_error",
)
PSK_FUNCTIONS = (
    "SSL_CTX_set_psk_server_callback",
    "SSL_CTX_set_psk_client_callback",
)


def _connection() -> Connection:
    return Connection(Context(TLS_METHOD), None)


BINDINGS = Name(
    "cryptography",
    "OpenSSL bindings " + ", ".join(RELAY_FUNCTIONS),
    "tlsd's relay on raw sockets",
    "TLS relays stay in Twisted",
    lambda: all(hasattr(_lib, f) for f in RELAY_FUNCTIONS),
)
SSL = Name(
    LIBRARY,
    "Connection._ssl",
    "tlsd's relay on raw sockets, and the reason a certificate was refused",
    "TLS relays stay in Twisted; the reason is not given",
    lambda: _ffi.typeof(_connection()._ssl).cname == "SSL *",
)
MEMORY_BIOS = Name(
    LIBRARY,
    "Connection._into_ssl and _from_ssl",
    "tlsd's relay on raw sockets",
    "TLS relays stay in Twisted",
    lambda: all(
        _ffi.typeof(bio).cname == "BIO *"
        for connection in [_connection()]
        for bio in (connection._into_ssl, connection._from_ssl)
    ),
)
RAISE_SSL_ERROR = Name(
    LIBRARY,
    "Connection._raise_ssl_error",
    "naming OpenSSL's error when a raw TLS relay fails",
    "the error is named by its number",
    lambda: callable(_connection()._raise_ssl_error),
)
CONTEXT = Name(
    LIBRARY,
    "Context._context",
    "TLS pre-shared keys",
    "PSK is unavailable: use certificates",
    lambda: (
        _ffi.typeof(Context(TLS_METHOD)._context).cname == "SSL_CTX *"
        and all(hasattr(_lib, f) for f in PSK_FUNCTIONS)
    ),
)
REVERSE_MAPPING = Name(
    LIBRARY,
    "Connection._reverse_mapping",
    "TLS pre-shared keys on a server",
    "PSK is unavailable: use certificates",
    lambda: _reverse_mapping_works(),
)


def _reverse_mapping_works() -> bool:
    connection = _connection()
    return Connection._reverse_mapping[connection._ssl] is connection


def bindings() -> tuple[Any, Any]:
    """cryptography's OpenSSL bindings (C{lib}, C{ffi}): the ones pyOpenSSL uses."""
    return _lib, _ffi


def raw_tls(connection: Connection) -> tuple[Any, Any, Any] | None:
    """
    C{connection}'s C{SSL *}, and its memory BIOs (records in, records
    out); None when this pyOpenSSL (or its bindings) does not give them.
    """
    if not (
        (BINDINGS.present or BINDINGS.usable())
        and (SSL.present or SSL.usable())
        and (MEMORY_BIOS.present or MEMORY_BIOS.usable())
    ):
        return None
    return connection._ssl, connection._into_ssl, connection._from_ssl


def ssl_pointer(connection: Connection) -> Any:
    """C{connection}'s C{SSL *}, or None when this pyOpenSSL does not give it."""
    if not (SSL.present or SSL.usable()):
        return None
    return connection._ssl


def tls_error(connection: Connection, ssl: Any, result: int) -> Exception | None:
    """
    pyOpenSSL's exception for the failed call on C{ssl} that returned
    C{result} (None if there is none, or this pyOpenSSL does not say).
    """
    if not (RAISE_SSL_ERROR.present or RAISE_SSL_ERROR.usable()):
        return None
    try:
        connection._raise_ssl_error(ssl, result)
    except Exception as e:
        return e
    return None


def context_pointer(context: Context) -> Any:
    """C{context}'s C{SSL_CTX *}, or None when this pyOpenSSL does not give it."""
    if not (CONTEXT.present or CONTEXT.usable()):
        return None
    return context._context


def connection_for(ssl: Any) -> Connection | None:
    """The Connection whose C{SSL *} is C{ssl}, or None."""
    if not (REVERSE_MAPPING.present or REVERSE_MAPPING.usable()):
        return None
    return Connection._reverse_mapping.get(ssl)
