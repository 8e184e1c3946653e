"""
Reading a file the admin names (the configuration, a CA file): only a
regular file, and at most a bound, so that a FIFO or a device named by
mistake costs one line, not an ipcd stalled until a writer comes or reading
C{/dev/zero} until memory runs out.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

from ipcd.rundir import file_kind


class NotAFile(ValueError):
    """The path names a FIFO, a device, a directory...: not a regular file."""


class TooLarge(ValueError):
    """The file is larger than the bound: refused, not cut."""


def read_regular(
    path: str,
    limit: int,
    check: Callable[[os.stat_result], None] | None = None,
) -> bytes:
    """
    The content of regular file C{path} (a symbolic link to one is
    followed).  Raises C{OSError} when it cannot be
    opened or read, L{NotAFile} or L{TooLarge}, whose messages ("is a FIFO,
    not a file: ...", "larger than 1 MiB") follow the path, or what
    C{check} raises: it is given the stat of the very file read, first.
    """
    # O_NONBLOCK: opening a FIFO does not wait for a writer.
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK
    fd = os.open(path, flags)
    try:
        info = os.fstat(fd)
        if check is not None:
            check(info)
        mode = info.st_mode
        if not stat.S_ISREG(mode):
            raise NotAFile(f"is {file_kind(mode)}, not a file: name the file itself")
    except BaseException:
        os.close(fd)
        raise
    with open(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(f"larger than {limit >> 20} MiB")
    return data
