"""
Protocol daemons, one module per scheme (L{ipcd.transports.tcp}: tcpd), and
the external daemon on C{RUNDIR/SCHEME} (L{ipcd.transports.external}).

Their interface is L{ipcd.daemons.IProtocolDaemon}; their listeners share
L{ipcd.inbound}.
"""
