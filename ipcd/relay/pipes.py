"""
Splice pipes: a direction of L{ipcd.relay.sockets.SocketRelays} between
two plain sockets that streams, or with a kernel TLS end, moves through a
pipe with splice(2), socket to pipe to socket, so its bytes are never
copied into ipcd.  A kernel TLS socket's record that is not data (EINVAL
from splice) is its codec's to take (C{control}); then splicing goes on.
At most C{max_pipes} at a time per engine (2 fds each); where the kernel
refuses splice(2), the engine says so once and copies from then on.
"""

from __future__ import annotations

import errno
import fcntl
import os
from typing import Any

from ipcd.relay.sides import READ_SIZE, Side

_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK

# A whole TLS record's plaintext: a splice out of a kernel TLS socket that
# gives this much may have more records behind it.
_RECORD = 16 * 1024

# What splice(2) says when it cannot join these fds (not a failure of the
# connection): the engine goes back to copying.
_NO_SPLICE = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})

# Records that are not data a codec takes in one event, at most: a peer
# sending nothing but tickets must not hold the reactor (the rest come at
# the next event: the socket is still readable).
_CONTROL_PER_EVENT = 16


class Pipes:
    """
    The splice pipes of an engine (a part of L{SocketRelays}): C{_pipes}
    open now, C{_splice} until the kernel refuses it; C{_count} and C{_eof}
    are the engine's.
    """

    log: Any
    max_pipes: int
    _pipes: int
    _splice: bool

    def _count(self, side: Side, count: int) -> None:
        raise NotImplementedError

    def _eof(self, side: Side) -> None:
        raise NotImplementedError

    def _open_pipe(self, side: Side) -> None:
        """Give a streaming side its pipe, as big as a read; none if fds run out."""
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return  # EMFILE and the like: this side keeps copying
        try:
            size = fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, READ_SIZE)
        except OSError:
            size = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
        side.pipe = (r, w, size)
        self._pipes += 1

    def _close_pipe(self, side: Side) -> None:
        """Close C{side}'s pipe, dropping what it holds."""
        pipe, side.pipe, side.piped = side.pipe, None, 0
        if pipe is not None:
            self._pipes -= 1
            os.close(pipe[0])
            os.close(pipe[1])

    def _splice_in(self, side: Side) -> bool:
        """
        A streaming side's read: into its pipe, and on to the peer; whether
        all of it was passed on (then, as for a copy taken whole, nothing
        about the relay's registration has changed: no EOF, the pipe empty).
        A kernel TLS socket gives one record per splice: while whole ones
        come, the pipe takes more before it is passed on.
        """
        pipe = side.pipe
        assert pipe is not None
        controls = 0
        while True:
            try:
                count = os.splice(
                    side.fd, pipe[1], pipe[2] - side.piped, flags=_SPLICE_FLAGS
                )
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                if e.errno not in _NO_SPLICE:
                    raise _said_by_codec(side, e) from None
                if side.piped:
                    break  # the pipe first: this comes back on the next read
                if e.errno == errno.EINVAL and _took_control(side):
                    if side.eof:  # its stream's own end (a close_notify)
                        self._eof(side)
                        return False
                    controls += 1
                    if controls == _CONTROL_PER_EVENT:
                        break  # the others first; the socket stays readable
                    continue  # splice what follows
                # Not for these sockets after all: back to copying, for good.
                self._splice = False
                self.log.warn("splice(2) refused ({error}); relays copy", error=e)
                self._close_pipe(side)
                return False
            if not count:
                if not side.piped:
                    self._eof(side)
                    return False
                break  # the pipe first: the EOF comes back on the next read
            self._count(side, count)
            side.stats.spliced += count
            side.piped += count
            if count < _RECORD or side.piped >= pipe[2]:
                break
        if side.piped:
            self._splice_out(side)
        return not side.piped

    def _splice_out(self, side: Side) -> int:
        """Move what C{side}'s pipe holds to its peer; the bytes moved."""
        assert side.pipe is not None
        try:
            moved = os.splice(
                side.pipe[0], side.peer.fd, side.piped, flags=_SPLICE_FLAGS
            )
        except (BlockingIOError, InterruptedError):
            return 0
        side.piped -= moved
        return moved


def _said_by_codec(side: Side, error: OSError) -> Exception:
    """
    What a splice out of C{side} that failed with C{error} raises: a codec's
    own end of the relay when it has one for what is next (a kernel TLS
    socket's record the kernel refused: a line, not a failure), else
    C{error}.
    """
    codec = side.codec
    if codec is None:
        return error
    try:
        codec.control(side)
    except Exception as said:
        return said
    return error


def _took_control(side: Side) -> bool:
    """
    Whether C{side}'s codec took a record that is not data, which is why a
    splice out of a kernel TLS socket fails with EINVAL.
    """
    codec = side.codec
    return codec is not None and codec.control(side)
