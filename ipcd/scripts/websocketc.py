"""
websocketc: talk to a service behind websocketd, with no libipc.

    websocketc ws://127.0.0.1:8080/pong hello      one message, one reply
    websocketc ws://127.0.0.1:8080/pong            line by line from stdin
    websocketc --binary ws://... hello             send binary messages

Each reply is printed on a line of its own (a binary reply as its raw bytes).
The exit status says what happened: 0 done, 2 bad usage, 3 refused
(websocketd answered, and did not open the service: the HTTP status and
reason are printed), 4 unreachable (no connection, or no answer in time),
5 the connection was lost before every reply came.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.util import parse_url
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.protocols.basic import LineReceiver
from twisted.python import usage

from ipcd.client import DEFAULT_TIMEOUT, timeout_option
from ipcd.reactors import IHostReactor

OK, USAGE, REFUSED, UNREACHABLE, LOST = 0, 2, 3, 4, 5


class Options(usage.Options):
    synopsis = "websocketc [options] ws://HOST:PORT/SERVICE [MESSAGE ...]"
    # Twisted's default is __main__'s docstring: none under the console
    # script, and reflowed into one paragraph (the examples run together)
    # under python -m.  One paragraph of its own, made to be reflowed.
    longdesc = (
        "Talk to a service behind websocketd: each MESSAGE is sent (stdin's "
        "lines when there is none), each reply printed on a line of its own "
        "(a binary reply as its raw bytes). Exit status: 0 done, 2 bad usage, "
        "3 refused (websocketd answered, and did not open the service), "
        "4 unreachable (no connection, or no answer in time), 5 the "
        "connection was lost before every reply came."
    )
    optFlags = [("binary", "b", "Send binary messages (default: text).")]
    optParameters = [
        ("origin", None, None, "An Origin header to send, as a browser would."),
        (
            "ca",
            None,
            None,
            "CA file to verify a wss:// server (default: the platform's).",
        ),
        ("timeout", "t", DEFAULT_TIMEOUT, "Seconds to connect and for each reply."),
    ]

    def opt_version(self) -> None:
        """Print websocketc's version (ipcd's) and exit."""
        from ipcd import version

        print(f"websocketc (ipcd {version()})")
        sys.exit(0)

    def postOptions(self) -> None:  # noqa: N802
        # Bounded as pong's: a timer of nan or -1 would fail in Twisted.
        try:
            self["timeout"] = timeout_option(str(self["timeout"]))
        except ValueError as e:
            raise usage.UsageError(f"--timeout: {e}") from None
        self["trust"] = _trust(self["ca"]) if self["ca"] else None

    def parseArgs(self, *args: str) -> None:  # noqa: N802
        if not args:  # Twisted's own would say "Wrong number of arguments."
            raise usage.UsageError("no URL: give a ws:// or wss:// URL")
        url, *messages = args
        try:
            # autobahn's own check, which its factory makes later, inside
            # the reactor: a port out of range or a broken [::1 raised
            # there, a traceback and a websocketc that never exited.
            parse_url(url)
        except ValueError as e:
            raise usage.UsageError(f"not a ws:// or wss:// URL: {url!r} ({e})")
        self["url"], self["messages"] = url, list(messages)


def _trust(path: str) -> Any:
    """
    C{--ca}'s certificate, read before the reactor runs: a file that cannot
    be read, or is none, is a usage error; read inside, it was a traceback
    and a websocketc that never exited (and /dev/zero was read until memory
    ran out).
    """
    from OpenSSL.crypto import Error as OpenSSLError

    from ipcd.daemons.websocket.client import trust_root
    from ipcd.regularfile import NotAFile, TooLarge

    try:
        return trust_root(path)
    except OSError as e:
        raise usage.UsageError(f"--ca {path}: cannot read: {e.strerror}") from None
    except (NotAFile, TooLarge) as e:
        raise usage.UsageError(f"--ca {path}: {e}") from None
    except OpenSSLError:
        raise usage.UsageError(f"--ca {path}: no PEM certificate in it") from None


class Client(WebSocketClientProtocol):
    """Sends the messages (or stdin's lines), prints each reply."""

    factory: ClientFactory

    def onOpen(self) -> None:  # noqa: N802
        factory = self.factory
        factory.opened = True
        if factory.messages:
            for message in factory.messages:
                self.send(message)
        else:
            from twisted.internet import stdio

            stdio.StandardIO(_Lines(self), reactor=factory.reactor)
        self._deadline()

    def send(self, text: str) -> None:
        self.factory.waiting += 1
        payload = text.encode("utf-8")
        self.sendMessage(payload, isBinary=self.factory.binary)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802, N803
        out = sys.stdout.buffer
        out.write(payload + b"\n")
        out.flush()
        self.factory.waiting -= 1
        self._deadline()
        self.finishIfDone()

    def finishIfDone(self) -> None:  # noqa: N802
        factory = self.factory
        if factory.waiting == 0 and factory.inputDone:
            factory.status = OK
            self.sendClose(1000)

    def _deadline(self) -> None:
        factory = self.factory
        if factory.timer is not None and factory.timer.active():
            factory.timer.cancel()
        if factory.waiting:
            factory.timer = factory.reactor.callLater(factory.timeout, self._late)

    def _late(self) -> None:
        print(
            f"websocketc: no reply within {self.factory.timeout:g} s", file=sys.stderr
        )
        self.factory.status = LOST
        self.dropConnection(abort=True)

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:  # noqa: N802, N803
        factory = self.factory
        if factory.timer is not None and factory.timer.active():
            factory.timer.cancel()
        if not factory.opened:
            why = self.wasNotCleanReason or reason or "closed"
            # (What ipcd tells a remote peer the policy refused; older ones
            # said the rule.)
            if str(why).endswith("[403]: refused") or "denied by default" in str(why):
                service = urlsplit(factory.url).path.removeprefix("/")
                why = (
                    f"{why} (that host's ipcd denies inbound connections unless "
                    f'a rule allows them: --allow "in {service}")'
                )
            print(f"websocketc: {factory.url}: {why}", file=sys.stderr)
            upgrade = "connection upgrade failed" in str(why)
            factory.status = REFUSED if upgrade else UNREACHABLE
        elif factory.status is None:
            print(f"websocketc: connection lost: {reason or code}", file=sys.stderr)
            factory.status = LOST
        if not factory.done.called:
            factory.done.callback(factory.status)


class _Lines(LineReceiver):
    delimiter = b"\n"

    def __init__(self, client: Client) -> None:
        self.client = client

    def lineReceived(self, line: bytes) -> None:  # noqa: N802
        self.client.send(line.decode("utf-8", "replace").removesuffix("\r"))
        self.client._deadline()

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        self.client.factory.inputDone = True
        self.client.finishIfDone()


class ClientFactory(WebSocketClientFactory):
    protocol = Client
    noisy = False

    def __init__(self, reactor: IHostReactor, options: Options) -> None:
        super().__init__(options["url"], origin=options["origin"])
        self.reactor = reactor
        self.messages = options["messages"]
        self.binary = bool(options["binary"])
        self.timeout = options["timeout"]
        self.setProtocolOptions(openHandshakeTimeout=self.timeout)
        self.inputDone = bool(self.messages)
        self.waiting = 0
        self.opened = False
        self.status: int | None = None
        self.timer: Any = None
        self.done: Deferred[int | None] = Deferred()


def run(reactor: IHostReactor, options: Options) -> Deferred[int | None]:
    factory = ClientFactory(reactor, options)
    parts = urlsplit(options["url"])
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    endpoint: Any = HostnameEndpoint(reactor, parts.hostname, port, options["timeout"])
    if parts.scheme == "wss":
        root = options["trust"] or ssl.platformTrust()
        tls = ssl.optionsForClientTLS(parts.hostname, trustRoot=root)
        endpoint = wrapClientTLS(tls, endpoint)

    def unreachable(failure: Any) -> int:
        print(
            f"websocketc: {options['url']}: {failure.getErrorMessage()}",
            file=sys.stderr,
        )
        return UNREACHABLE

    connecting = endpoint.connect(factory)
    connecting.addCallbacks(lambda _: factory.done, unreachable)
    return connecting


def main(argv: Sequence[str] | None = None) -> None:
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else list(argv))
    except usage.UsageError as e:
        print(f"websocketc: {e}\n{options.synopsis}", file=sys.stderr)
        sys.exit(USAGE)
    except BrokenPipeError:  # --help's reader is gone: no traceback
        from ipcd.stdout import stdout_to_devnull

        stdout_to_devnull()
        sys.exit(1)
    from twisted.internet import reactor

    status: list[int | None] = [None]

    def finished(code: int | None) -> None:
        status[0] = code
        if reactor.running:  # type: ignore[attr-defined]
            reactor.stop()  # type: ignore[attr-defined]

    def start() -> None:
        run(reactor, options).addBoth(finished)

    reactor.callWhenRunning(start)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    sys.exit(LOST if status[0] is None else status[0])


if __name__ == "__main__":
    main()
