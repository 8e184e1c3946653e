"""
The one interface between the broker and the protocol daemons.

The broker knows a transport only as "connect this route for this client,
give me back a connected socket (or L{ipcd.errors.Refused})".  A transport's
listener, for its part, accepts remote peers and asks the broker's
L{ipcd.broker.Broker.open_inbound} what they may reach.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface


class ITransport(Interface):
    scheme: str = Attribute("The URI scheme this transport serves, e.g. 'tcp'.")

    def connect(target: Any, client: Any) -> Deferred[socket.socket]:
        """
        Connect C{target} (an L{ipcd.broker.RemoteTarget}) on behalf of
        C{client} (an L{ipcd.identity.Peer}).  Fires with a connected socket
        that the broker hands to the client as is, or fails with
        L{ipcd.errors.Refused}.  The broker bounds it with its connect
        deadline and cancels the Deferred when that passes: a transport must
        then close whatever socket it opened.
        """
