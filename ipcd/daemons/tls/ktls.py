"""
Kernel TLS (kTLS): after OpenSSL's handshake, the kernel does the record
layer of a TCP socket, so the socket can go to a process that only reads
and writes plaintext (the client, the service) with no relay in between.

pyOpenSSL's OpenSSL does no kTLS itself, so the switch is made here by
hand: the session's traffic keys (TLS 1.3: from the secrets OpenSSL gives
the public keylog callback; TLS 1.2: from the public master key and
randoms), the sequence number of each direction (records already made or
taken under those keys: L{Records} counts them on the record stream), and
the kernel's socket options (linux/tls.h).

The pure parts (key schedules, L{crypto_info}, L{Records}, L{open_record})
are here with the socket parts (L{ktls_available}, L{switch},
L{send_close_notify}, L{recv_record}, L{peek_record_type}); which
connection switches, and when, is L{ipcd.daemons.tls.kswitch}'s.
"""

from __future__ import annotations

import array
import hmac
import socket
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

# linux/tcp.h, linux/tls.h and linux/socket.h: not all in Python's socket.
TCP_ULP = getattr(socket, "TCP_ULP", 31)
SOL_TLS = getattr(socket, "SOL_TLS", 282)
TLS_TX = 1
TLS_RX = 2
TLS_SET_RECORD_TYPE = 1
TLS_GET_RECORD_TYPE = 2

# TLS record content types.
CHANGE_CIPHER_SPEC = 20
ALERT = 21
HANDSHAKE = 22
APPLICATION_DATA = 23

TLS12 = 0x0303
TLS13 = 0x0304
VERSIONS = {"TLSv1.2": TLS12, "TLSv1.3": TLS13}

# An alert record's body: warning (1), close_notify (0).
CLOSE_NOTIFY = b"\x01\x00"


@dataclass(frozen=True)
class Cipher:
    """
    An AEAD the kernel takes: its number (C{TLS_CIPHER_*}), key size, the
    nonce's fixed part (C{salt}) and per-record part (C{iv}) as the kernel
    wants them, and the hash of its key schedule.
    """

    name: str
    kernel: int
    key_size: int
    salt_size: int
    iv_size: int
    hash: str

    @property
    def nonce_size(self) -> int:
        """TLS 1.3's IV, and TLS 1.2's fixed IV when there is no explicit nonce."""
        return 12


AES_128_GCM = Cipher("AES-128-GCM", 51, 16, 4, 8, "sha256")
AES_256_GCM = Cipher("AES-256-GCM", 52, 32, 4, 8, "sha384")
CHACHA20_POLY1305 = Cipher("CHACHA20-POLY1305", 54, 32, 0, 12, "sha256")


def cipher_of(openssl_name: str | None) -> Cipher | None:
    """
    The kernel's cipher for OpenSSL's cipher suite name (C{TLS_AES_128_GCM_SHA256},
    C{ECDHE-RSA-AES128-GCM-SHA256}, C{PSK-CHACHA20-POLY1305}...); None if the
    kernel has none (CBC, CCM...).
    """
    name = (openssl_name or "").upper().replace("_", "-")
    if "AES128-GCM" in name or "AES-128-GCM" in name:
        return AES_128_GCM
    if "AES256-GCM" in name or "AES-256-GCM" in name:
        return AES_256_GCM
    if "CHACHA20-POLY1305" in name:
        return CHACHA20_POLY1305
    return None


# Key schedules.


def expand_label(secret: bytes, label: bytes, length: int, hash: str) -> bytes:
    """TLS 1.3's HKDF-Expand-Label (RFC 8446, 7.1) with an empty context."""
    full = b"tls13 " + label
    info = struct.pack("!HB", length, len(full)) + full + b"\x00"
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(secret, block + info + bytes([counter]), hash).digest()
        out += block
        counter += 1
    return out[:length]


def tls13_keys(secret: bytes, cipher: Cipher) -> tuple[bytes, bytes]:
    """The key and the 12-byte IV of a TLS 1.3 traffic secret."""
    key = expand_label(secret, b"key", cipher.key_size, cipher.hash)
    return key, expand_label(secret, b"iv", cipher.nonce_size, cipher.hash)


def prf(secret: bytes, label: bytes, seed: bytes, length: int, hash: str) -> bytes:
    """TLS 1.2's PRF: P_hash(secret, label + seed) (RFC 5246, 5)."""
    seed = label + seed
    out, a = b"", seed
    while len(out) < length:
        a = hmac.new(secret, a, hash).digest()
        out += hmac.new(secret, a + seed, hash).digest()
    return out[:length]


def tls12_keys(
    master: bytes, client_random: bytes, server_random: bytes, cipher: Cipher
) -> tuple[tuple[bytes, bytes], tuple[bytes, bytes]]:
    """
    TLS 1.2's AEAD keys from the key block (RFC 5246, 6.3; no MAC keys):
    the client's and the server's (key, fixed IV): 4 bytes for GCM (RFC
    5288), 12 for ChaCha20-Poly1305 (RFC 7905).
    """
    fixed = cipher.salt_size or cipher.nonce_size
    size = 2 * (cipher.key_size + fixed)
    block = prf(
        master, b"key expansion", server_random + client_random, size, cipher.hash
    )
    k = cipher.key_size
    client_key, server_key = block[:k], block[k : 2 * k]
    client_iv, server_iv = block[2 * k : 2 * k + fixed], block[2 * k + fixed :]
    return (client_key, client_iv), (server_key, server_iv)


def crypto_info(
    version: int, cipher: Cipher, key: bytes, iv: bytes, sequence: int
) -> bytes:
    """
    The kernel's C{struct tls12_crypto_info_*} for one direction: C{iv}
    is TLS 1.3's IV or TLS 1.2's fixed IV; C{sequence}, the number of the
    next record.
    """
    seq = sequence.to_bytes(8, "big")
    if len(key) != cipher.key_size:
        raise ValueError(f"{cipher.name} takes a {cipher.key_size}-byte key")
    if cipher.salt_size == 0:  # ChaCha20-Poly1305: the whole IV
        salt, explicit = b"", iv
    elif version == TLS13:
        salt, explicit = iv[:4], iv[4:]
    else:  # TLS 1.2 GCM: the explicit nonce goes on from the sequence number
        salt, explicit = iv, seq
    if len(salt) != cipher.salt_size or len(explicit) != cipher.iv_size:
        raise ValueError(f"wrong IV size for {cipher.name}")
    return struct.pack("=HH", version, cipher.kernel) + explicit + key + salt + seq


@dataclass(frozen=True)
class Direction:
    """One direction's key, IV (see L{crypto_info}) and next sequence number."""

    key: bytes
    iv: bytes
    sequence: int


def open_record(
    version: int, cipher: Cipher, way: Direction, record: bytes
) -> tuple[int, bytes]:
    """
    Open one whole TLS record (header and body) as the kernel would with
    C{way} (key, IV, and this record's sequence number): its content type
    (TLS 1.3: the inner one) and plaintext.  L{ValueError} if it does not
    open with them.
    """
    header, body = record[:5], record[5:]
    seq = way.sequence.to_bytes(8, "big")
    aead = (ChaCha20Poly1305 if cipher is CHACHA20_POLY1305 else AESGCM)(way.key)
    if version == TLS13 or not cipher.salt_size:
        nonce = bytes(a ^ b for a, b in zip(way.iv, bytes(4) + seq, strict=True))
    else:  # TLS 1.2 GCM: the salt and the record's explicit nonce
        nonce, body = way.iv + body[:8], body[8:]
    if version == TLS13:
        aad = header
    else:
        aad = seq + header[:3] + max(len(body) - 16, 0).to_bytes(2, "big")
    try:
        plain = aead.decrypt(nonce, body, aad)
    except (InvalidTag, ValueError):
        raise ValueError("the record does not open with these keys") from None
    if version != TLS13:
        return header[0], plain
    inner = plain.rstrip(b"\x00")
    if not inner:
        raise ValueError("a TLS 1.3 record with no content type")
    return inner[-1], inner[:-1]


NEW_SESSION_TICKET = 4  # its handshake message type


def not_ticket(messages: bytes) -> int | None:
    """
    The type of the first message in handshake record C{messages} that is
    not a whole NewSessionTicket (a TLS 1.3 KeyUpdate's: 24), None if all
    are: nothing to act on, no key update, no new handshake.
    """
    at = 0
    while at < len(messages):
        kind = messages[at]
        at += 4 + int.from_bytes(messages[at + 1 : at + 4], "big")
        if kind != NEW_SESSION_TICKET or at > len(messages):
            return kind
    return None


# Counting records.


class Records:
    """
    One direction of a TLS connection's record stream, as bytes pass by:
    how many records have passed whole, where each ended (the first
    C{limit}: a switch is made early, or not at all), how many came after
    the last ChangeCipherSpec (TLS 1.2's count under the new keys), and
    the last whole record (C{last}: the switch checks its keys on it).
    """

    def __init__(self, limit: int = 64) -> None:
        self.limit = limit
        self.total = 0  # bytes seen
        self.count = 0  # records ended
        self.ends: list[int] = []
        self.after_ccs = 0
        self.overflow = False
        self.last = b""
        self._record = bytearray()  # the current record so far
        self._header = b""
        self._left = 0  # body bytes of the current record still to come
        self._type = 0

    def feed(self, data: bytes) -> None:
        view, at, size = memoryview(data), 0, len(data)
        while at < size:
            if self._left:
                step = min(self._left, size - at)
                self._record += view[at : at + step]
                self._left -= step
                at += step
                if not self._left:
                    self._ended(self.total + at)
                continue
            need = 5 - len(self._header)
            self._header += bytes(view[at : at + need])
            at += min(need, size - at)
            if len(self._header) == 5:
                self._type = self._header[0]
                self._left = int.from_bytes(self._header[3:5], "big")
                self._record = bytearray(self._header)
                self._header = b""
                if not self._left:
                    self._ended(self.total + at)
        self.total += size

    def _ended(self, end: int) -> None:
        self.count += 1
        self.last = bytes(self._record)
        if self._type == CHANGE_CIPHER_SPEC:
            self.after_ccs = 0
        else:
            self.after_ccs += 1
        if len(self.ends) < self.limit:
            self.ends.append(end)
        else:
            self.overflow = True

    @property
    def whole(self) -> bool:
        """Whether the bytes seen end where a record ends."""
        return not self._left and not self._header

    def records_before(self, offset: int) -> int | None:
        """How many records had ended by byte C{offset} (None: not counted)."""
        n = sum(1 for end in self.ends if end <= offset)
        if n == len(self.ends) and self.overflow:
            return None
        return n


# The kernel's side.

_available: bool | None = None


def ktls_available() -> bool:
    """
    Whether this kernel can put TLS on a TCP socket: a loopback TCP
    connection takes the C{tls} upper-layer protocol (the module loaded, or
    loadable by the kernel on demand).  Probed once, then cached.
    """
    global _available
    if _available is None:
        _available = _probe()
    return _available


def _probe() -> bool:
    try:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return False
    with listener:
        try:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            with socket.create_connection(listener.getsockname(), timeout=10) as sock:
                accepted, _ = listener.accept()
                # (Its peer still open: the ULP needs an established connection.)
                with accepted:
                    sock.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
        except OSError:
            return False
    return True


def attach(sock: socket.socket) -> None:
    """
    Give connected TCP socket C{sock} the kernel's C{tls} upper-layer
    protocol: nothing changes for its bytes until L{switch}.  L{KernelRefused}
    (a kernel without it, a connection no longer established): nothing
    has changed.
    """
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
    except OSError as e:
        raise KernelRefused(e.errno, e.strerror) from None


def switch(
    sock: socket.socket, version: int, cipher: Cipher, tx: Direction, rx: Direction
) -> None:
    """
    Put TLS in C{sock}'s kernel (its C{tls} upper-layer protocol already
    set: L{attach}): from here, what is written is sealed into records, and
    records read come out as plaintext.  Receiving first: where a kernel
    lacks the cipher, or the version, or TLS on receipt (before Linux
    4.17), that first refusal leaves the socket plain TCP (L{KernelRefused});
    an L{OSError} after it leaves the socket unusable for TLS: close it.
    """
    try:
        sock.setsockopt(
            SOL_TLS, TLS_RX, crypto_info(version, cipher, rx.key, rx.iv, rx.sequence)
        )
    except OSError as e:
        raise KernelRefused(e.errno, e.strerror) from None
    sock.setsockopt(
        SOL_TLS, TLS_TX, crypto_info(version, cipher, tx.key, tx.iv, tx.sequence)
    )


class KernelRefused(OSError):
    """The kernel refused TLS on a socket, which is plain TCP as before."""


def kernel_settings(sock: socket.socket, direction: int = TLS_TX) -> bytes:
    """
    What kTLS socket C{sock}'s kernel holds for C{direction} (L{TLS_TX} or
    L{TLS_RX}), as L{crypto_info} packs it: version, cipher, key and the
    live sequence number.  Whoever holds the socket can read this.
    """
    head = sock.getsockopt(SOL_TLS, direction, 4)  # the kernel wants exact sizes
    kind = struct.unpack("=HH", head)[1]
    for cipher in (AES_128_GCM, AES_256_GCM, CHACHA20_POLY1305):
        if cipher.kernel == kind:
            size = 4 + cipher.iv_size + cipher.key_size + cipher.salt_size + 8
            return sock.getsockopt(SOL_TLS, direction, size)
    return head


def send_close_notify(sock: socket.socket) -> None:
    """A close_notify alert on kTLS socket C{sock} (a plain close sends none)."""
    record_type = array.array("B", [ALERT]).tobytes()
    sock.sendmsg([CLOSE_NOTIFY], [(SOL_TLS, TLS_SET_RECORD_TYPE, record_type)])


def recv_record(sock: socket.socket, size: int) -> tuple[int, bytes]:
    """
    Read from kTLS socket C{sock} with the record type: (type, data).  A
    record that is not application data (a TLS 1.3 NewSessionTicket, an
    alert) can only be read this way; a plain C{recv} fails with EIO on it.
    """
    data, ancillary, _, _ = sock.recvmsg(size, socket.CMSG_SPACE(1))
    return _record_type(ancillary), data


def peek_record_type(sock: socket.socket) -> int:
    """
    The type of the record next on kTLS socket C{sock}, left there: a
    splice(2) out of the socket fails (EINVAL) on one that is not data.
    """
    _, ancillary, _, _ = sock.recvmsg(1, socket.CMSG_SPACE(1), socket.MSG_PEEK)
    return _record_type(ancillary)


def _record_type(ancillary: list[tuple[int, int, bytes]]) -> int:
    """The record type a kTLS C{recvmsg} gave (application data if none)."""
    for level, kind, value in ancillary:
        if level == SOL_TLS and kind == TLS_GET_RECORD_TYPE and value:
            return value[0]
    return APPLICATION_DATA
