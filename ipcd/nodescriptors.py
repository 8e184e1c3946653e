"""
Descriptors a local peer sends where ipcd takes none: closed, and unsaid.

Twisted's UNIX transport reads with C{recvmsg}; for a protocol that does
not provide C{IFileDescriptorReceiver} it closes each descriptor received
with a log line for each message that brought some.  Any local user could
write ipcd's log at will that way: a lookup sent a byte at a time, each
byte with a descriptor, one line each.  ipcd's protocols on UNIX sockets
take no descriptors, and close any they are sent as a peer's other unread
bytes are dropped: without a word.
"""

from __future__ import annotations

import os

from twisted.internet.interfaces import IFileDescriptorReceiver
from zope.interface import implementer


@implementer(IFileDescriptorReceiver)
class ClosesDescriptors:
    """A protocol that closes any descriptor its peer sends, unlogged."""

    def fileDescriptorReceived(self, descriptor: int) -> None:  # noqa: N802 (Twisted's)
        os.close(descriptor)
