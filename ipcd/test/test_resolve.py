"""
Tests for L{ipcd.resolution}: admin redirections and routes, client
routes, loops.  Pure: a L{Config} built directly, no reactor, no sockets.
"""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from ipcd.config import Config
from ipcd.errors import Refused
from ipcd.names import InvalidServiceName
from ipcd.policy import decide, parse_rule
from ipcd.resolution import (
    LocalTarget,
    RemoteTarget,
    destination_labels,
    direction_of,
    plan,
    resolve,
)
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


class PlanNamesTests(SynchronousTestCase):
    """The names a lookup is policed by: requested, then the client's own."""

    def test_requestedOnly(self) -> None:
        self.assertEqual(plan(config({"a": "b"}), "a").names, ("a",))
        self.assertEqual(plan(config(routes={"a": "unix://b"}), "a").names, ("a",))

    def test_clientLocalRoute(self) -> None:
        where = plan(config({"b": "c"}), "a", client("unix://b"))
        self.assertEqual((where.target, where.names), (local("c"), ("a", "b")))

    def test_clientRemoteService(self) -> None:
        where = plan(config(), "pong", client("tcp://h:1/secret"))
        self.assertEqual(where.names, ("pong", "secret"))
        self.assertEqual(plan(config(), "pong", client("tcp://h:1/")).names, ("pong",))

    def test_adminRouteAfterClientRoute(self) -> None:
        """The admin's route from the client's name is the admin's decision."""
        where = plan(config(routes={"b": "tcp://h:1/z"}), "a", client("unix://b"))
        self.assertEqual(
            (where.target, where.names), (remote("tcp://h:1/z", "z"), ("a", "b"))
        )

    def test_clientNamesTheRedirectedName(self) -> None:
        """C{a;a unix://b} with the admin's C{a -> b}: b is named, so policed."""
        where = plan(config({"a": "b"}), "a", client("unix://b"))
        self.assertEqual((where.target, where.names), (local("b"), ("a", "b")))


# Property: no lookup reaches a name that a direct lookup of that name would
# be refused, unless an admin redirection or route leads there.

P_NAMES = ["a", "b", "c"]
P_LABELS = ["uid:1000", "group:staff", "host:h", "port:1"]
p_name = st.sampled_from(P_NAMES)
p_rule = st.builds(
    lambda action, direction, glob, peer: parse_rule(
        f"{action} {direction} {glob} {peer}"
    ),
    st.sampled_from(["allow", "deny"]),
    st.sampled_from(["local", "out"]),
    st.one_of(p_name, st.sampled_from(["*", "[ab]*", "?"])),
    st.sampled_from(["*", *P_LABELS]),
)
p_uri = st.one_of(
    p_name.map(lambda n: f"unix://{n}"),
    p_name.map(lambda n: f"tcp://h:1/{n}"),
    st.just("tcp://h:1/"),
)


class DeputyPropertyTests(SynchronousTestCase):
    # The walk-arounds found by hand, then whatever hypothesis finds.
    @example({}, {}, [parse_rule("deny local b *")], "a", "unix://b", [])
    @example({"a": "b"}, {}, [parse_rule("deny local b *")], "a", "unix://b", [])
    @example(
        {},
        {},
        [parse_rule("allow out a"), parse_rule("deny out * *")],
        "a",
        "tcp://h:1/b",
        [],
    )
    @settings(max_examples=1000, deadline=None)
    @given(
        st.dictionaries(p_name, p_name, max_size=3),
        st.dictionaries(p_name, p_uri, max_size=3),
        st.lists(p_rule, max_size=6),
        p_name,
        st.one_of(st.none(), p_uri),
        st.lists(st.sampled_from(P_LABELS[:2]), max_size=2),
    )
    def test_clientNamesNothingItCouldNotAskFor(
        self,
        redirects: dict[str, str],
        routes: dict[str, str],
        rules: list[Any],
        service: str,
        route_text: str | None,
        labels: list[str],
    ) -> None:
        cfg = replace(config(redirects, routes), rules=tuple(rules))
        route = None if route_text is None else parse_uri(route_text)
        try:
            where = plan(cfg, service, route)
        except Refused:
            return  # loops are refused outright
        target = where.target
        direction = direction_of(target)
        all_labels = [*labels, *destination_labels(target)]
        if not decide(cfg.rules, direction, where.names, all_labels).allowed:
            return
        # The names the client chose itself: the one it asked for, and the
        # one its own route names.
        chosen = {service}
        if isinstance(route, LocalURI):
            chosen.add(route.name)
        elif isinstance(route, RemoteURI) and route.service is not None:
            chosen.add(route.service)
        reached = target.name if isinstance(target, LocalTarget) else target.service
        for name in chosen:
            # Each, asked for directly, would be allowed (first match only).
            direct = decide(cfg.rules, direction, [name], all_labels)
            self.assertTrue(direct.allowed, (name, direct))
        if reached not in chosen:
            # Then the admin's redirections or routes led there.
            self.assertIn(reached, {*cfg.redirects.values(), *_route_names(cfg)})


def _route_names(cfg: Config) -> set[str]:
    names = set()
    for uri in cfg.routes.values():
        if isinstance(uri, LocalURI):
            names.add(uri.name)
        elif isinstance(uri, RemoteURI):
            names.add(uri.service or "")
    return names
