"""
Which TLS connections go to the kernel (L{ipcd.daemons.tls.ktls}), and
the switch of one that can.

A connection is watched from its creation (L{watch}, where the kernel has
kTLS): its pyOpenSSL Connection counts the records passing through its
memory BIOs, notes where the handshake ended in each stream, and keeps
the application traffic secrets OpenSSL gives its keylog callback.  After
the tlsd request and answer, L{to_kernel} turns a detached connection
(L{ipcd.daemons.tls.relay.Secured}) into a kTLS socket when the count is
exact: every record received was read by OpenSSL and nothing it decrypted
is waiting, every record it made is sent.  Otherwise it says why, changes
nothing, and the connection stays on the relay.

The count is checked on the stream itself: the last record each way must
open with the keys and sequence number the kernel would get, and be no
handshake step that changes the keys (a TLS 1.3 KeyUpdate, a TLS 1.2
renegotiation), which OpenSSL follows and the count cannot.

Sequence numbers: TLS 1.2 counts records after each side's
ChangeCipherSpec (its Finished is 0).  TLS 1.3's application keys start
where the handshake ends: records received after the peer's Finished; on
a client, records made after its Finished; on a server, records made
after the last handshake step began (its NewSessionTickets go out in that
step, under the application keys).
"""

from __future__ import annotations

import socket
import weakref
from dataclasses import replace
from typing import Any

from OpenSSL.SSL import TLS_METHOD, Connection, Context, WantReadError

from ipcd.compat import pyopenssl as compat_pyopenssl
from ipcd.daemons.tls.ktls import (
    HANDSHAKE,
    TLS13,
    VERSIONS,
    Cipher,
    Direction,
    KernelRefused,
    Records,
    attach,
    cipher_of,
    ktls_available,
    not_ticket,
    open_record,
    switch,
    tls12_keys,
    tls13_keys,
)

_lib, _ffi = compat_pyopenssl.bindings()

_SECRETS = (b"CLIENT_TRAFFIC_SECRET_0", b"SERVER_TRAFFIC_SECRET_0")
# OpenSSL's, through the bindings (see L{watchable}).
_FUNCTIONS = ("BIO_get_mem_data", "SSL_CTX_set_keylog_callback")


class _Watch:
    """A connection's record streams, handshake marks and secrets."""

    def __init__(self) -> None:
        self.into = Records()
        self.out = Records()
        self.secrets: dict[bytes, bytes] = {}
        # Byte offsets when the handshake ended: made before its last step,
        # made after it, received and read by then.
        self.marks: tuple[int, int, int] | None = None


class Watched(Connection):
    """
    A pyOpenSSL Connection that watches itself for L{to_kernel} (see
    L{watch}); Twisted drives it as any other.
    """

    ktls: _Watch

    def bio_write(self, buf: Any) -> int:
        n = super().bio_write(buf)
        self.ktls.into.feed(bytes(buf[:n]))
        return n

    def bio_read(self, bufsiz: int) -> bytes:
        data = super().bio_read(bufsiz)
        self.ktls.out.feed(data)
        return data

    def do_handshake(self) -> None:
        watch = self.ktls
        before = _made(self)
        super().do_handshake()
        if watch.marks is None:
            watch.marks = (before, _made(self), _read(self))


def _pending(bio: Any) -> int:
    """Bytes in memory BIO C{bio} not read from it yet."""
    return int(_lib.BIO_get_mem_data(bio, _ffi.NULL))


def _made(connection: Connection) -> int:
    """Record bytes OpenSSL has made so far (read from its BIO or not)."""
    _, _, out = compat_pyopenssl.raw_tls(connection)
    return connection.ktls.out.total + _pending(out)


def _read(connection: Connection) -> int:
    """Record bytes OpenSSL has taken from its BIO so far."""
    _, into, _ = compat_pyopenssl.raw_tls(connection)
    return connection.ktls.into.total - _pending(into)


_logging: weakref.WeakSet[Context] = weakref.WeakSet()


@_ffi.callback("void (*)(const SSL *, const char *)")
def _keylog(ssl: Any, line: Any) -> None:
    """Keep a watched connection's application traffic secrets (never logged)."""
    connection = compat_pyopenssl.connection_for(ssl)
    watch = getattr(connection, "ktls", None)
    if watch is None:
        return
    label, _, rest = _ffi.string(line).partition(b" ")
    if label in _SECRETS:
        watch.secrets[label] = bytes.fromhex(rest.split(b" ")[-1].decode("ascii"))


def _log_keys(context: Context) -> None:
    """
    C{context}'s connections give their secrets to L{_keylog}.  Set on the
    C{SSL_CTX} itself: pyOpenSSL's C{set_keylog_callback} refuses a Context
    already used (Twisted's certificate client makes its connection first),
    and OpenSSL reads the callback when it logs, not when it makes the SSL.
    """
    if context not in _logging:
        _lib.SSL_CTX_set_keylog_callback(
            compat_pyopenssl.context_pointer(context), _keylog
        )
        _logging.add(context)


def watchable() -> bool:
    """Whether this pyOpenSSL gives what watching needs (else nothing is watched)."""
    return (
        compat_pyopenssl.raw_tls(Connection(Context(TLS_METHOD))) is not None
        and compat_pyopenssl.context_pointer(Context(TLS_METHOD)) is not None
        and compat_pyopenssl.connection_for(_ffi.NULL) is None
        and compat_pyopenssl.REVERSE_MAPPING.usable()
        and all(hasattr(_lib, f) for f in _FUNCTIONS)
    )


_here: bool | None = None


def kernel_tls_here() -> bool:
    """Whether this kernel and this pyOpenSSL can do kernel TLS (probed once)."""
    global _here
    if _here is None:
        _here = ktls_available() and watchable()
    return _here


def watch(connection: Connection) -> Connection:
    """
    Make C{connection} (new, before its handshake) a L{Watched} one; its
    Context gets the keylog callback.
    """
    connection.__class__ = Watched
    connection.ktls = _Watch()
    _log_keys(connection.get_context())
    return connection


def plan(
    connection: Connection, client: bool
) -> tuple[int, Any, Direction, Direction] | str:
    """
    The kernel's settings for C{connection} (version, cipher, sending,
    receiving) if they are known exactly now; else why not.
    """
    watch: _Watch | None = getattr(connection, "ktls", None)
    if watch is None:
        return "not watched from its start"
    version = VERSIONS.get(connection.get_protocol_version_name())
    cipher = cipher_of(connection.get_cipher_name())
    if version is None or cipher is None:
        return f"the kernel does not take {connection.get_cipher_name()}"
    into = watch.into
    if connection.pending() or not into.whole or _read(connection) != into.total:
        return "records received and not read yet"
    if not watch.out.whole or _made(connection) != watch.out.total:
        return "records made and not sent yet"
    if watch.marks is None or watch.into.overflow or watch.out.overflow:
        return "records not counted"
    before, after, read = watch.marks
    if version == TLS13:
        secrets = watch.secrets
        if any(label not in secrets for label in _SECRETS):
            return "no traffic secrets"
        made = watch.out.records_before(after if client else before)
        taken = watch.into.records_before(read)
        assert made is not None and taken is not None  # (not overflowed)
        sent, received = watch.out.count - made, watch.into.count - taken
        client_key = tls13_keys(secrets[_SECRETS[0]], cipher)
        server_key = tls13_keys(secrets[_SECRETS[1]], cipher)
    else:
        sent, received = watch.out.after_ccs, watch.into.after_ccs
        client_key, server_key = tls12_keys(
            connection.master_key(),
            connection.client_random(),
            connection.server_random(),
            cipher,
        )
    watch.secrets.clear()
    mine, theirs = (client_key, server_key) if client else (server_key, client_key)
    tx, rx = Direction(*mine, sent), Direction(*theirs, received)
    why = _last_opens(version, cipher, tx, watch.out) or _last_opens(
        version, cipher, rx, watch.into
    )
    return why or (version, cipher, tx, rx)


def _last_opens(version: int, cipher: Cipher, way: Direction, records: Records) -> str:
    """
    Why the last record of C{records} says C{way} is not what the kernel
    must take; "" if it opens with its keys at its sequence number, and is
    no handshake step that changes them (a TLS 1.3 KeyUpdate, a TLS 1.2
    renegotiation: OpenSSL followed it, the record count cannot).
    """
    if not way.sequence:
        return ""  # nothing under these keys yet
    last = replace(way, sequence=way.sequence - 1)
    try:
        kind, body = open_record(version, cipher, last, records.last)
    except ValueError:
        return "the keys changed after the handshake"
    if kind == HANDSHAKE and not_ticket(body) is not None:
        if version == TLS13 or records.after_ccs > 1:  # (1.2: not its Finished)
            return "a handshake step after the handshake (key update, renegotiation)"
    return ""


def to_kernel(secured: Any, client: bool) -> str:
    """
    Put detached TLS connection C{secured} (a L{Secured}) in its socket's
    kernel; "" when done (the socket now speaks plaintext), else why not,
    with the connection as it was (the records it owed may have gone out:
    what is left of them is still C{secured.unsent}).  Raises L{OSError}
    when the kernel failed half way: the socket is lost.
    """
    connection = secured.connection
    while True:  # records OpenSSL made that Twisted did not take
        try:
            secured.unsent += connection.bio_read(1 << 16)
        except WantReadError:
            break
    settings = plan(connection, client)
    if isinstance(settings, str):
        return settings
    sock: socket.socket = secured.sock
    while secured.unsent:
        try:
            n = sock.send(secured.unsent)
        except (BlockingIOError, InterruptedError):
            return "the records owed do not fit in the socket now"
        secured.unsent = secured.unsent[n:]
    try:
        attach(sock)
        switch(sock, *settings)
    except KernelRefused as e:  # nothing has changed
        return f"the kernel refused TLS on this socket ({e.strerror})"
    return ""
