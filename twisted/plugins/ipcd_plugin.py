# The ipcd plugins: the `twistd ipcd` service maker and the `ipc:` endpoint
# strings.  The service module is named by string and loaded lazily, so plugin
# discovery imports nothing heavy and no reactor.  No __init__.py here or in
# twisted/: this directory is Twisted's plugin namespace.
from twisted.application.service import ServiceMaker

from ipcd.endpoints import IPCClientParser, IPCServerParser

ipcd = ServiceMaker(
    "ipcd",
    "ipcd.tap",
    "libipc networking: service lookup, routes, policy and fd handoff",
    "ipcd",
)
ipcServer = IPCServerParser()
ipcClient = IPCClientParser()
