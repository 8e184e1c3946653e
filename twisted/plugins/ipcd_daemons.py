# ipcd's built-in protocol daemons, registered as third parties' are: a
# module-level object providing ipcd.daemons.IProtocolDaemon.  ipcd finds
# them with twisted.plugin.getPlugins(IProtocolDaemon).  No __init__.py here
# or in twisted/: this directory is Twisted's plugin namespace.
from ipcd.daemons.tcp import tcpd
from ipcd.daemons.tls.daemon import tlsd
from ipcd.daemons.udp.daemon import udpd
from ipcd.daemons.websocket.daemon import websocketd

__all__ = ["tcpd", "tlsd", "udpd", "websocketd"]
