"""
The daemons' old home, kept so that a plugin file naming it still loads.

ipcd's daemons moved to L{ipcd.daemons} (tcpd in L{ipcd.daemons.tcp}, tlsd,
udpd and websocketd in the C{daemon} module of L{ipcd.daemons.tls},
L{ipcd.daemons.udp} and L{ipcd.daemons.websocket}).  A
C{twisted/plugins/ipcd_daemons.py} left by an earlier install (Twisted finds
the first file of that name on C{twisted.plugins.__path__}) still imports
C{ipcd.transports.tcp} and its siblings: those four names are the new
modules themselves, so the daemons found are the same objects.  Deprecated;
nothing in ipcd imports this package.
"""

import sys
import warnings
from importlib import import_module

warnings.warn(
    "ipcd.transports is deprecated: the daemons are in ipcd.daemons",
    DeprecationWarning,
    stacklevel=2,
)

_MOVED = {
    "tcp": "ipcd.daemons.tcp",
    "tls": "ipcd.daemons.tls.daemon",
    "udp": "ipcd.daemons.udp.daemon",
    "websocket": "ipcd.daemons.websocket.daemon",
}

for _old, _new in _MOVED.items():
    sys.modules[f"{__name__}.{_old}"] = import_module(_new)
