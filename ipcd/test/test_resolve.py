"""
Tests for L{ipcd.broker.resolve}: admin redirections and routes, client
routes, loops.  Pure: a L{Config} built directly, no reactor, no sockets.
"""

from __future__ import annotations

from types import MappingProxyType

from twisted.trial.unittest import SynchronousTestCase

from ipcd.broker import LocalTarget, RemoteTarget, resolve
from ipcd.config import Config
from ipcd.errors import Refused
from ipcd.names import InvalidServiceName
from ipcd.routes import URI, LocalURI, PathURI, RemoteURI, parse_lookup, parse_uri

RUNDIR = "/run/ipc-test"


def config(
    redirects: dict[str, str] | None = None, routes: dict[str, str] | None = None
) -> Config:
    return Config(
        rundir=RUNDIR,
        redirects=MappingProxyType(dict(redirects or {})),
        routes=MappingProxyType(
            {name: parse_uri(text) for name, text in (routes or {}).items()}
        ),
    )


def local(name: str) -> LocalTarget:
    return LocalTarget(name, f"{RUNDIR}/{name}")


def remote(text: str, service: str) -> RemoteTarget:
    uri = parse_uri(text)
    assert isinstance(uri, RemoteURI)
    return RemoteTarget(uri, service)


def client(text: str) -> URI:
    return parse_uri(text)


class LocalTests(SynchronousTestCase):
    def test_default(self) -> None:
        """No redirection, no route: the local service of that name."""
        target = resolve(config(), "pong")
        self.assertEqual(target, local("pong"))
        self.assertEqual(str(target), f"unix://{RUNDIR}/pong")

    def test_invalidName(self) -> None:
        self.assertRaises(InvalidServiceName, resolve, config(), "../etc")

    def test_redirect(self) -> None:
        self.assertEqual(
            resolve(config({"authd": "nextversion-authd"}), "authd"),
            local("nextversion-authd"),
        )

    def test_redirectChain(self) -> None:
        self.assertEqual(resolve(config({"a": "b", "b": "c"}), "a"), local("c"))
        self.assertEqual(resolve(config({"a": "b", "b": "c"}), "b"), local("c"))
        self.assertEqual(resolve(config({"a": "b", "b": "c"}), "c"), local("c"))

    def test_redirectLoop(self) -> None:
        """A loop is refused, with the chain in the message."""
        error = self.assertRaises(
            Refused, resolve, config({"a": "b", "b": "c", "c": "a"}), "a"
        )
        self.assertIn("loop", error.reason)
        self.assertIn("a -> b -> c -> a", error.reason)

    def test_redirectSelfLoop(self) -> None:
        error = self.assertRaises(Refused, resolve, config({"a": "a"}), "a")
        self.assertIn("a -> a", error.reason)

    def test_loopThroughRoutes(self) -> None:
        """C{unix://} routes are redirections: loops through them are refused."""
        error = self.assertRaises(
            Refused,
            resolve,
            config(routes={"a": "unix://b", "b": "unix://a"}),
            "a",
        )
        self.assertIn("a -> b -> a", error.reason)
        error = self.assertRaises(
            Refused, resolve, config({"a": "b"}, {"b": "unix://a"}), "a"
        )
        self.assertIn("a -> b -> a", error.reason)

    def test_longChainBounded(self) -> None:
        """A very long (loop-free) chain is cut off rather than followed forever."""
        redirects = {f"s{i}": f"s{i + 1}" for i in range(1000)}
        self.assertRaises(Refused, resolve, config(redirects), "s0")


class AdminRouteTests(SynchronousTestCase):
    def test_unixName(self) -> None:
        self.assertEqual(resolve(config(routes={"a": "unix://b"}), "a"), local("b"))

    def test_unixNameThenRedirect(self) -> None:
        self.assertEqual(
            resolve(config({"b": "c"}, {"a": "unix://b"}), "a"), local("c")
        )

    def test_routeAfterRedirect(self) -> None:
        """Redirections rewrite the name first; the route of the new name applies."""
        self.assertEqual(
            resolve(config({"a": "b"}, {"b": "tcp://h:9000/x"}), "a"),
            remote("tcp://h:9000/x", "x"),
        )

    def test_selfRoute(self) -> None:
        self.assertEqual(
            resolve(config(routes={"pong": "unix://pong"}), "pong"), local("pong")
        )

    def test_absolutePathAllowed(self) -> None:
        """The admin may route to a socket by absolute path."""
        self.assertEqual(
            resolve(config(routes={"db": "unix:///var/run/db.sock"}), "db"),
            LocalTarget("db", "/var/run/db.sock"),
        )

    def test_remote(self) -> None:
        self.assertEqual(
            resolve(config(routes={"pong": "tcp://10.0.0.1:9000/echo"}), "pong"),
            remote("tcp://10.0.0.1:9000/echo", "echo"),
        )

    def test_remoteEmptyPath(self) -> None:
        """An empty remote path means the requested name, after redirection."""
        self.assertEqual(
            resolve(config(routes={"pong": "tcp://h:9000/"}), "pong"),
            remote("tcp://h:9000/", "pong"),
        )
        self.assertEqual(
            resolve(config({"a": "b"}, {"b": "tcp://h:9000/"}), "a"),
            remote("tcp://h:9000/", "b"),
        )


class ClientRouteTests(SynchronousTestCase):
    def test_clientRouteWins(self) -> None:
        cfg = config(routes={"pong": "tcp://admin:9000/pong"})
        self.assertEqual(
            resolve(cfg, "pong", client("tcp://client:9000/pong")),
            remote("tcp://client:9000/pong", "pong"),
        )
        self.assertEqual(resolve(cfg, "pong", client("unix://echo")), local("echo"))

    def test_upstreamSelfRoute(self) -> None:
        """C{IPC_NETWORK="pong unix://pong"} is the local pong."""
        lookup = parse_lookup(b"pong;pong unix://pong")
        route = lookup.route_for("pong")
        assert route is not None
        self.assertEqual(route.uri, LocalURI("pong"))
        self.assertEqual(resolve(config(), "pong", route.uri), local("pong"))

    def test_selfRouteKeepsAdminRedirect(self) -> None:
        """
        A client's C{authd unix://authd} with the admin's C{authd ->
        nextversion-authd}: the admin's redirection applies, it is no loop.
        """
        self.assertEqual(
            resolve(
                config({"authd": "nextversion-authd"}),
                "authd",
                client("unix://authd"),
            ),
            local("nextversion-authd"),
        )

    def test_unixFollowedThenRedirected(self) -> None:
        """A client C{unix://x} is followed, then x is redirected by the admin."""
        self.assertEqual(
            resolve(config({"x": "y"}), "p", client("unix://x")), local("y")
        )
        self.assertEqual(
            resolve(config({"x": "y", "y": "z"}), "p", client("unix:///x")),
            local("z"),
        )

    def test_unixThenAdminRoute(self) -> None:
        self.assertEqual(
            resolve(config(routes={"x": "tcp://h:1/"}), "p", client("unix://x")),
            remote("tcp://h:1/", "x"),
        )

    def test_clientAbsolutePathRefused(self) -> None:
        """Only the admin routes to absolute socket paths."""
        error = self.assertRaises(
            Refused, resolve, config(), "p", client("unix:///tmp/evil.sock")
        )
        self.assertIn("unix:///tmp/evil.sock", error.reason)
        self.assertIsInstance(client("unix:///tmp/evil.sock"), PathURI)

    def test_clientUnixToAdminAbsolute(self) -> None:
        """A client may name a service the admin routes to an absolute path."""
        cfg = config(routes={"db": "unix:///var/run/db.sock"})
        self.assertEqual(
            resolve(cfg, "p", client("unix://db")),
            LocalTarget("db", "/var/run/db.sock"),
        )

    def test_clientRemoteEmptyPath(self) -> None:
        """A client remote route with an empty path asks for the (redirected) name."""
        self.assertEqual(
            resolve(config(), "pong", client("tcp://h:9000/")),
            remote("tcp://h:9000/", "pong"),
        )
        self.assertEqual(
            resolve(config({"a": "b"}), "a", client("tcp://h:9000")),
            remote("tcp://h:9000", "b"),
        )

    def test_clientLoop(self) -> None:
        error = self.assertRaises(
            Refused, resolve, config({"x": "p"}), "p", client("unix://x")
        )
        self.assertIn("p -> x -> p", error.reason)
