# ipcd's built-in protocol daemons, registered as third parties' are: a
# module-level object providing ipcd.daemons.IProtocolDaemon.  ipcd finds
# them with twisted.plugin.getPlugins(IProtocolDaemon).  No __init__.py here
# or in twisted/: this directory is Twisted's plugin namespace.
from ipcd.transports.tcp import tcpd
from ipcd.transports.tls import tlsd
from ipcd.transports.udp import udpd
from ipcd.transports.websocket import websocketd

__all__ = ["tcpd", "tlsd", "udpd", "websocketd"]
