"""
A plugin package for ipcd's tests: protocol daemons that only the tests
register, through C{twisted.plugin.getPlugins(IProtocolDaemon, this package)}
(L{ipcd.daemons.registry}).
"""
