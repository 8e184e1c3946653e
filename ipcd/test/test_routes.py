"""
Tests for L{ipcd.routes}: lookup payloads, C{IPC_NETWORK} values and URIs.
"""

from __future__ import annotations

import socket

from hypothesis import example, given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from ipcd.names import InvalidServiceName
from ipcd.routes import (
    MAX_LOOKUP_ROUTES,
    LocalURI,
    Lookup,
    PathURI,
    RemoteURI,
    Route,
    RouteError,
    check_host,
    encode_lookup,
    host_port,
    parse_lookup,
    parse_network,
    parse_uri,
)


class LookupTests(SynchronousTestCase):
    def test_upstreamTcp(self) -> None:
        """The first lookup of libipc-wire.md, byte for byte."""
        framed = bytes.fromhex("00000023") + b"pong;pong tcp://127.0.0.1:9000/pong"
        self.assertEqual(int.from_bytes(framed[:4], "big"), len(framed) - 4)
        lookup = parse_lookup(framed[4:])
        self.assertEqual(lookup.service, "pong")
        self.assertEqual(
            lookup.routes,
            (
                Route(
                    "pong",
                    RemoteURI(
                        "tcp", "127.0.0.1", 9000, "pong", "tcp://127.0.0.1:9000/pong"
                    ),
                ),
            ),
        )
        self.assertEqual(lookup.route_for("pong"), lookup.routes[0])

    def test_upstreamTwoRoutes(self) -> None:
        """
        The second lookup of libipc-wire.md: the space before C{;} is noise,
        and the route for C{p} is C{unix://pong}.
        """
        framed = (
            bytes.fromhex("00000030")
            + b"p;audio https://example.com/audio ;p unix://pong"
        )
        self.assertEqual(int.from_bytes(framed[:4], "big"), len(framed) - 4)
        lookup = parse_lookup(framed[4:])
        self.assertEqual(lookup.service, "p")
        self.assertEqual(len(lookup.routes), 2)
        audio = lookup.route_for("audio")
        assert audio is not None
        self.assertEqual(
            audio.uri,
            RemoteURI(
                "https", "example.com", None, "audio", "https://example.com/audio"
            ),
        )
        self.assertEqual(lookup.route_for("p"), Route("p", LocalURI("pong")))
        self.assertIsNone(lookup.route_for("pong"))

    def test_encodeLookup(self) -> None:
        self.assertEqual(
            encode_lookup("pong", "pong tcp://127.0.0.1:9000/pong"),
            b"pong;pong tcp://127.0.0.1:9000/pong",
        )
        self.assertEqual(
            encode_lookup("p", "audio https://example.com/audio ;p unix://pong"),
            b"p;audio https://example.com/audio ;p unix://pong",
        )

    def test_noRoutes(self) -> None:
        self.assertEqual(parse_lookup(b"pong;"), Lookup("pong", ()))
        self.assertEqual(parse_lookup(b"pong"), Lookup("pong", ()))

    def test_lastRouteWins(self) -> None:
        lookup = parse_lookup(b"pong;pong unix://a;other unix://b;pong unix://c")
        self.assertEqual(lookup.route_for("pong"), Route("pong", LocalURI("c")))
        self.assertEqual(lookup.route_for("other"), Route("other", LocalURI("b")))

    def test_spacesAreNoise(self) -> None:
        lookup = parse_lookup(b" pong ;  pong unix://x  ; other   unix://y ")
        self.assertEqual(lookup.service, "pong")
        self.assertEqual(
            lookup.routes,
            (Route("pong", LocalURI("x")), Route("other", LocalURI("y"))),
        )

    def test_routesBounded(self) -> None:
        """
        At most L{MAX_LOOKUP_ROUTES} entries: the lookup's parsing work is
        bounded by that, not by the lookup's length.
        """
        most = b"pong" + b";pong unix://x" * MAX_LOOKUP_ROUTES
        self.assertEqual(len(parse_lookup(most).routes), MAX_LOOKUP_ROUTES)
        error = self.assertRaises(RouteError, parse_lookup, most + b";")
        self.assertEqual(str(error), f"more than {MAX_LOOKUP_ROUTES} routes")
        self.assertRaises(RouteError, parse_lookup, b"p" + b";a b" * 250_000)

    def test_trailingSemicolons(self) -> None:
        lookup = parse_lookup(b"pong;pong unix://x;;  ;")
        self.assertEqual(lookup.routes, (Route("pong", LocalURI("x")),))

    def test_malformedRoute(self) -> None:
        """A route with no target is an error naming the route."""
        error = self.assertRaises(RouteError, parse_lookup, b"pong;pong")
        self.assertIn("'pong'", str(error))
        error = self.assertRaises(RouteError, parse_lookup, b"pong;pong   ")
        self.assertEqual(
            str(error), "malformed route 'pong': expected 'SERVICE URI'"
        )  # the route as written, without the spaces around it

    def test_badRouteTarget(self) -> None:
        for payload in [
            b"pong;pong unix://../etc",
            b"pong;pong tcp://h:notaport/pong",
            b"pong;pong ://x",
            b"pong;pong tcp://h:9000/a/b",
            b"pong;pong tcp:/h:9000/pong",  # one slash: a (bad) local name
        ]:
            self.assertRaises(RouteError, parse_lookup, payload)

    def test_invalidNames(self) -> None:
        for payload in [
            b"",
            b";",
            b"../etc",
            b"../etc;",
            b".x;",
            b"a/b",
            b"a\x00b;",
            b"caf\xc3\xa9;",
            b"pong;../etc unix://pong",
            b"pong;.x unix://pong",
        ]:
            self.assertRaises(RouteError, parse_lookup, payload)

    def test_notUtf8(self) -> None:
        error = self.assertRaises(RouteError, parse_lookup, b"pong;pong unix://\xff")
        self.assertIn("UTF-8", str(error))

    def test_errorsAreValueErrors(self) -> None:
        self.assertTrue(issubclass(RouteError, ValueError))

    def test_parseNetwork(self) -> None:
        self.assertEqual(
            parse_network("audio https://example.com/audio ;pong unix://pong"),
            (
                Route(
                    "audio",
                    RemoteURI(
                        "https",
                        "example.com",
                        None,
                        "audio",
                        "https://example.com/audio",
                    ),
                ),
                Route("pong", LocalURI("pong")),
            ),
        )
        self.assertEqual(parse_network(""), ())


class URITests(SynchronousTestCase):
    def test_bareName(self) -> None:
        self.assertEqual(parse_uri("pong"), LocalURI("pong"))
        self.assertEqual(parse_uri("  pong "), LocalURI("pong"))

    def test_unixName(self) -> None:
        self.assertEqual(parse_uri("unix://pong"), LocalURI("pong"))
        self.assertEqual(str(parse_uri("unix://pong")), "unix://pong")

    def test_unixRootedName(self) -> None:
        """C{unix:///NAME} is the local service NAME, not a path."""
        self.assertEqual(parse_uri("unix:///pong"), LocalURI("pong"))

    def test_unixPath(self) -> None:
        uri = parse_uri("unix:///abs/path.sock")
        self.assertEqual(uri, PathURI("/abs/path.sock"))
        self.assertEqual(str(uri), "unix:///abs/path.sock")

    def test_unixBad(self) -> None:
        for text in [
            "unix://",
            "unix:///",
            "unix://a/b",
            "unix://../etc",
            "unix://.x",
            "unix:///.x",
        ]:
            self.assertRaises(RouteError, parse_uri, text)

    def test_schemeCase(self) -> None:
        self.assertEqual(parse_uri("UNIX://pong"), LocalURI("pong"))

    def test_tcp(self) -> None:
        uri = parse_uri("tcp://h:9000/pong")
        self.assertEqual(uri, RemoteURI("tcp", "h", 9000, "pong", "tcp://h:9000/pong"))
        assert isinstance(uri, RemoteURI)
        self.assertEqual(uri.hostport, "h:9000")
        self.assertEqual(str(uri), "tcp://h:9000/pong")

    def test_emptyPath(self) -> None:
        """An empty path means: the requested name (service None)."""
        for text in ["tcp://h:9000/", "tcp://h:9000"]:
            uri = parse_uri(text)
            assert isinstance(uri, RemoteURI)
            self.assertIsNone(uri.service)
            self.assertEqual((uri.host, uri.port), ("h", 9000))

    def test_noPort(self) -> None:
        uri = parse_uri("wss://example.com/pong")
        assert isinstance(uri, RemoteURI)
        self.assertIsNone(uri.port)
        self.assertEqual(uri.hostport, "example.com")

    def test_ipv6(self) -> None:
        uri = parse_uri("tcp://[::1]:9000/pong")
        self.assertEqual(
            uri, RemoteURI("tcp", "::1", 9000, "pong", "tcp://[::1]:9000/pong")
        )
        assert isinstance(uri, RemoteURI)
        self.assertEqual(uri.hostport, "[::1]:9000")

    def test_zones(self) -> None:
        """
        A link-local address names its link (C{%eth0}, or an interface index
        C{%2}), kept in its host for the connect, the labels and the logs;
        for every scheme (one parser).  It was refused: 'invalid host'.
        """
        for text, host in [
            ("udp://[fe80::1%eth0]:9000/pong", "fe80::1%eth0"),
            ("tcp://[FE80::0001%2]:9000/pong", "fe80::1%2"),
            ("tls://[fe80::1%4294967295]/pong", "fe80::1%4294967295"),
            ("ws://[febf::1%br-lan.10@x]/pong", "febf::1%br-lan.10@x"),
            ("tcp://[fe80::1%abcdefghijklmno]/p", "fe80::1%abcdefghijklmno"),
        ]:
            uri = parse_uri(text)
            assert isinstance(uri, RemoteURI)
            self.assertEqual(uri.host, host)
            self.assertEqual(uri.hostport.partition("]")[0], f"[{host}")

    def test_badZones(self) -> None:
        """
        A zone only on a link-local address (fe80::/10: any other is on
        every link), and only an interface name (ASCII, at most 15
        characters, none of '/', ':', '%', brackets or space) or index (1
        to 2**32-1): refused in one line saying so.
        """
        for host, why in [
            ("[2001:db8::1%eth0]", "2001:db8::1 is not one"),
            ("[::1%lo]", "a zone names the link of a link-local address"),
            ("[fec0::1%eth0]", "fec0::1 is not one"),
            ("[ff02::1%eth0]", "ff02::1 is not one"),
            ("[::ffff:169.254.0.1%eth0]", "is not one"),
            ("[fe80::1%]", "zone '' is not an interface name"),
            ("[fe80::1%0]", "zone '0': an interface index is 1 to 4294967295"),
            ("[fe80::1%4294967296]", "an interface index is 1 to"),
            ("[fe80::1%" + "9" * 5000 + "]", "an interface index is 1 to"),
            ("[fe80::1%abcdefghijklmnop]", "is not an interface name"),
            ("[fe80::1%eth 0]", "zone 'eth 0' is not an interface name"),
            ("[fe80::1%et\x00h]", "is not an interface name"),
            ("[fe80::1%\x1b]", "zone '\\x1b' is not an interface name"),
            ("[fe80::1%\u0663]", "is not an interface name"),  # not ASCII digits
            ("[fe80::1%é]", "is not an interface name"),
            ("[fe80::1%a%b]", "is not an interface name"),
            ("[fe80::1%a[b]", "is not an interface name"),
            ("[fe80::1%a:b]", "is not an interface name"),
        ]:
            self.assertBadHost(host, why)
        self.assertRaises(RouteError, parse_uri, "tcp://[fe80::1%a/b]:1/p")
        self.assertRaises(RouteError, parse_uri, "tcp://[fe80::1%a]b]:1/p")

    def test_hostPort(self) -> None:
        """An address and port as a URI writes them (and as logs show them)."""
        self.assertEqual(host_port("::1", 9000), "[::1]:9000")
        self.assertEqual(host_port("10.0.0.2", 9000), "10.0.0.2:9000")
        self.assertEqual(host_port("example.com", 1), "example.com:1")

    def test_ports(self) -> None:
        self.assertEqual(parse_uri("tcp://h:1/p").port, 1)  # type: ignore[union-attr]
        self.assertEqual(parse_uri("tcp://h:65535/p").port, 65535)  # type: ignore[union-attr]
        for text in [
            "tcp://h:0/pong",
            "tcp://h:65536/pong",
            "tcp://h:99999/pong",
            "tcp://h:-1/pong",
            "tcp://h:abc/pong",
            "tcp://h:/pong",
        ]:
            self.assertRaises(RouteError, parse_uri, text)

    def test_hugePort(self) -> None:
        """
        A port of thousands of digits is a L{RouteError}, not Python's
        integer-conversion C{ValueError}.
        """
        self.assertRaises(RouteError, parse_uri, "tcp://h:" + "1" * 5000 + "/pong")

    def test_nonAsciiDigitPort(self) -> None:
        """Only ASCII digits make a port."""
        self.assertRaises(RouteError, parse_uri, "tcp://h:\u0669\u0660\u0660\u0660/p")

    def test_junk(self) -> None:
        for text in [
            "",
            "   ",
            "://x",
            "1tcp://h:9000/p",
            "tcp://",
            "tcp://:9000/p",
            "tcp://[::1/p",
            "tcp://h:9000:1/p",
            "tcp://h:9000/a/b",
            "tcp://h:9000/.x",
            "t_p://h/p",
            "a/b",
            "../etc",
        ]:
            self.assertRaises(RouteError, parse_uri, text)

    def test_hosts(self) -> None:
        """
        IP addresses and DNS names, each in one spelling for rules: names in
        lower case (a non-ASCII one in its IDNA form), IPv6 as Python
        writes it.
        """
        for text, host in [
            ("tcp://127.0.0.1:9000/p", "127.0.0.1"),
            ("tcp://[2001:db8::1]/p", "2001:db8::1"),
            ("tcp://[2001:DB8:0::1]/p", "2001:db8::1"),
            ("tcp://localhost/p", "localhost"),
            ("tcp://a-b.example.COM/p", "a-b.example.com"),
            ("tcp://BÜCHER.Example/p", "xn--bcher-kva.example"),
            ("tcp://9gag.com/p", "9gag.com"),
            ("tcp://xn--bcher-kva.example/p", "xn--bcher-kva.example"),
            ("tcp://Bücher.example/p", "xn--bcher-kva.example"),
            ("tcp://" + "a" * 63 + ".example/p", "a" * 63 + ".example"),
            ("tcp://" + "a." * 126 + "b/p", "a." * 126 + "b"),
        ]:
            uri = parse_uri(text)
            assert isinstance(uri, RemoteURI)
            self.assertEqual(uri.host, host)
            self.assertEqual(str(uri), text)

    def test_badHosts(self) -> None:
        """
        Hosts that no resolver call should see are refused when the route is
        parsed, saying why, with control characters escaped and long input
        cut short.
        """
        x300 = "x" * 300
        for host, why in [
            (x300, "a host name has at most 253 characters, not 300"),
            ("a." * 127 + "b", "at most 253 characters, not 255"),
            (
                "a" * 64 + ".com",
                "label 'aaaaaaaaaaaaaaaa'... (64 characters) is longer",
            ),
            ("a..b", "empty label"),
            ("a.b.", "empty label"),
            (".a", "empty label"),
            ("xn--a.com", "label 'xn--a' is not valid IDNA"),
            # The codec checks only a lower-case prefix: any case is checked.
            ("XN--a.com", "label 'XN--a' is not valid IDNA"),
            ("xN--a.com", "label 'xN--a' is not valid IDNA"),
            ("-a.com", "label '-a' may have only letters, digits and '-'"),
            ("a-.com", "label 'a-' may have only"),
            ("a_b.com", "label 'a_b' may have only"),
            ("a b", "label 'a b' may have only"),
            ("e\x1bvil", "control characters are not allowed"),
            ("e\u202evil", "control characters are not allowed"),
            ("\x00", "control characters are not allowed"),
            ("10.1", "not a valid IPv4 address"),
            ("1.2.3.256", "not a valid IPv4 address"),
            # The resolver's other spellings of an address (inet_aton's:
            # hex, octal, fewer parts): host:0x7f.1 passed a deny written
            # for host:127.0.0.1 and reached 127.0.0.1.
            ("0x7f.1", "an IPv4 address as the resolver reads it"),
            ("0x7f000001", "an IPv4 address as the resolver reads it"),
            ("0X7F.0.0.1", "an IPv4 address as the resolver reads it"),
            ("1.0x2", "an IPv4 address as the resolver reads it"),
            ("0xa.0x0.0.0x1", "an IPv4 address as the resolver reads it"),
            # IDNA maps full-width digits and letters to ASCII: "10.1" and
            # "0x7f.1" were taken as names in that form.
            ("\uff11\uff10.1", "not a valid IPv4 address"),
            ("\uff10x7f.1", "an IPv4 address as the resolver reads it"),
            ("ü" * 300, "not a valid international (IDNA) host name"),
            ("[1.2.3.4]", "not a valid IPv6 address"),
            ("[1::2::3]", "not a valid IPv6 address"),
        ]:
            self.assertBadHost(host, why)

    def test_hostsReachingAnother(self) -> None:
        """
        An address whose connect reaches another host: label's address is
        refused, naming that address: an IPv4-mapped one (the connect is
        to the IPv4 address: C{[::ffff:127.0.0.1]} reached 127.0.0.1 past
        C{deny out * host:127.0.0.1}) and the unspecified ones (Linux
        connects them to the loopback: C{0.0.0.0} reached 127.0.0.1, C{[::]}
        ::1).  Others that spell an address alike are one label already.
        """
        for host, why in [
            ("[::ffff:127.0.0.1]", "::ffff:7f00:1 is the IPv4 address 127.0.0.1"),
            ("[::ffff:7f00:1]", "is the IPv4 address 127.0.0.1: write that"),
            ("[0:0:0:0:0:FFFF:127.0.0.1]", "is the IPv4 address 127.0.0.1"),
            ("[::ffff:10.0.0.1]", "is the IPv4 address 10.0.0.1"),
            ("0.0.0.0", "0.0.0.0 is no host's address"),
            ("[::]", ":: is no host's address: a connect to it reaches this"),
            ("[0::0]", "(write [::1])"),
            ("[::ffff:0.0.0.0]", "no host's address: a connect to it reaches"),
        ]:
            self.assertBadHost(host, why)
        for host, label in [
            ("[0:0:0:0:0:0:0:1]", "::1"),
            ("[::FFFF:0:7f00:1]", "::ffff:0:7f00:1"),  # (translated: unrouted)
            ("[::127.0.0.1]", "::7f00:1"),  # (compatible: unrouted)
        ]:
            self.assertEqual(parse_uri(f"tcp://{host}:9000/p").host, label)
        self.assertBadHost("127.0.0.1.", "not a valid IPv4 address")
        self.assertBadHost("0x7f.1.", "empty label")

    def assertBadHost(self, host: str, why: str) -> None:  # noqa: N802
        """C{host} in a route is refused in one short line, saying C{why}."""
        text = f"tcp://{host}:9000/pong"
        error = self.assertRaises(RouteError, parse_uri, text)
        message = str(error)
        self.assertIn(why, message)
        self.assertTrue(message.startswith("invalid host in URI 'tcp://"), message)
        self.assertTrue(message.isprintable(), message)
        self.assertLess(len(message), 200, message)


class PropertyTests(SynchronousTestCase):
    @given(st.text(max_size=300))
    @example("x" * 300)
    @example("xn--a.com")
    @example("a..b")
    @example("0x7f.1")
    @example("\uff11\uff10.1")
    def test_acceptedHostsResolve(self, host: str) -> None:
        """
        A host that passes is printable ASCII, at most 253 characters, and
        encodes with the codec C{getaddrinfo} applies (no C{UnicodeError}
        later, at lookup time).
        """
        try:
            checked = check_host(host)
        except ValueError:
            return
        self.assertTrue(checked.isascii() and checked.isprintable(), checked)
        self.assertLessEqual(len(checked), 253)
        checked.encode("idna")
        # A name the resolver reads as an IPv4 address is that address as
        # written ("0x7f.1" would be 127.0.0.1 under another host: label).
        try:
            address = socket.inet_aton(checked)
        except OSError:
            return
        self.assertEqual(socket.inet_ntoa(address), checked)

    @given(st.binary(max_size=200))
    @example(b"pong;pong tcp://h:" + b"9" * 5000 + b"/p")
    @example(b"\xff")
    @example(b"pong;pong")
    def test_parseLookupBytes(self, payload: bytes) -> None:
        """
        Whatever a client sends, parsing either succeeds or raises
        L{RouteError}/L{InvalidServiceName}: a junk lookup cannot crash ipcd.
        """
        try:
            lookup = parse_lookup(payload)
        except (RouteError, InvalidServiceName):
            return
        self.assertIsInstance(lookup, Lookup)

    @given(
        st.lists(
            st.text(
                alphabet=st.sampled_from(list("pong:/;[] .9-_tcpunix\x00é1")),
                max_size=40,
            ),
            max_size=6,
        ).map(";".join)
    )
    def test_parseLookupRouteLike(self, text: str) -> None:
        """The same with inputs that look like routes more often."""
        try:
            lookup = parse_lookup(text.encode())
        except (RouteError, InvalidServiceName):
            return
        for route in lookup.routes:
            self.assertIsInstance(route.uri, LocalURI | PathURI | RemoteURI)

    @given(
        st.sampled_from(["pong", "a", "x.y-z_1"]),
        st.lists(
            st.tuples(
                st.sampled_from(["pong", "a", "other"]),
                st.sampled_from(["unix://pong", "b", "tcp://h:9000/x", "ws://h/"]),
            ),
            max_size=5,
        ),
    )
    def test_lastRouteWinsProperty(
        self, service: str, routes: list[tuple[str, str]]
    ) -> None:
        network = ";".join(f"{name} {uri}" for name, uri in routes)
        lookup = parse_lookup(encode_lookup(service, network))
        expected = [uri for name, uri in routes if name == service]
        route = lookup.route_for(service)
        if not expected:
            self.assertIsNone(route)
        else:
            assert route is not None
            self.assertEqual(route.uri, parse_uri(expected[-1]))
