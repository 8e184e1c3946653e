"""
A plain TCP byte echo on 127.0.0.1:PORT, for the benchmark's websockify
path (websockify relays WebSocket payloads to a TCP target as bytes).
The same Twisted reactor and buffering as pongd, without the framing.

    python benchmarks/_tcpecho.py PORT
"""

from __future__ import annotations

import sys

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol


class Echo(Protocol):
    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        # Backpressure as pongd has it: stop reading while we cannot write.
        self.transport.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: _tcpecho.py PORT")
    factory = Factory.forProtocol(Echo)
    factory.noisy = False
    reactor.listenTCP(int(argv[0]), factory, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
