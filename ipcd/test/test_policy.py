"""The firewall's rules and decisions: plain function calls, no I/O."""

from __future__ import annotations

import socket
from fnmatch import fnmatchcase

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from ipcd.policy import (
    DEFAULTS,
    Decision,
    Rule,
    RuleError,
    decide,
    names_exactly,
    parse_grant,
    parse_rule,
    peer_matches,
)
from ipcd.test.support import ARABIC_INDIC

ALICE = ("uid:1000", "gid:1000", "user:alice", "group:alice", "group:wheel")


def rules(*texts: str) -> list[Rule]:
    return [parse_rule(text) for text in texts]


class ParseRuleTests(SynchronousTestCase):
    def test_threeWords(self) -> None:
        self.assertEqual(parse_rule("allow in authd"), Rule("allow", "in", "authd"))

    def test_fourWords(self) -> None:
        self.assertEqual(
            parse_rule("deny local pong user:bob"),
            Rule("deny", "local", "pong", "user:bob"),
        )

    def test_peerDefaultsToStar(self) -> None:
        self.assertEqual(parse_rule("deny out *").peer, "*")

    def test_extraSpaces(self) -> None:
        self.assertEqual(
            parse_rule("  allow\tout   pong  \n"), Rule("allow", "out", "pong")
        )

    def test_actionGiven(self) -> None:
        """The C{--allow}/C{--deny} form: the action comes separately."""
        self.assertEqual(
            parse_rule("in authd ip:10.0.0.0/8", "deny"),
            Rule("deny", "in", "authd", "ip:10.0.0.0/8"),
        )

    def test_str(self) -> None:
        self.assertEqual(str(parse_rule("allow in pong")), "allow in pong *")

    def test_allows(self) -> None:
        self.assertTrue(parse_rule("allow in pong").allows)
        self.assertFalse(parse_rule("deny in pong").allows)

    def test_namesExactly(self) -> None:
        """Only a glob-free rule for that very name names it (any peer)."""
        self.assertTrue(names_exactly(parse_rule("allow in secret ip:10.*"), "secret"))
        for text in ("allow in *", "allow in secre?", "allow in [s]ecret"):
            self.assertFalse(names_exactly(parse_rule(text), "secret"), text)
        self.assertFalse(names_exactly(parse_rule("allow in other"), "secret"))
        self.assertFalse(names_exactly(None, "secret"))

    def test_globNeverNamesEvenItsOwnText(self) -> None:
        """
        A glob rule is a glob even when the text asked about is the glob
        itself: C{allow in *} names no service, not even one called C{*}.
        """
        for glob in ("*", "secre?", "[s]ecret"):
            self.assertFalse(names_exactly(parse_rule(f"allow in {glob}"), glob))

    def test_errors(self) -> None:
        for text, expected in [
            ("", "expected"),
            ("allow in", "expected"),
            ("allow in pong * extra", "expected"),
            ("permit in pong", "action must be allow or deny"),
            ("Allow in pong", "action must be allow or deny"),
            ("allow * pong", "direction must be in, out or local"),
            ("allow inbound pong", "direction must be in, out or local"),
            ("allow in pong alice", "KIND:VALUE"),
            ("allow in pong user:", "KIND:VALUE"),
            ("allow in pong :alice", "KIND:VALUE"),
            ("allow in pong ip:300.1.2.3", "not an IP address or CIDR"),
            ("allow in pong ip:10.0.0.0/33", "not an IP address or CIDR"),
            ("allow in pong ip:10.0.0.X", "'10.0.0.X' is not an IP address or CIDR"),
            ("allow in pong ip:::1/129", "not an IP address or CIDR"),
            ("allow in pong ip:example.com", "not an IP address or CIDR"),
        ]:
            with self.subTest(text=text):
                e = self.assertRaises(RuleError, parse_rule, text)
                self.assertIn(expected, str(e))
                self.assertIn(repr(text), str(e))

    def test_errorWithActionGiven(self) -> None:
        self.assertRaises(RuleError, parse_rule, "allow in pong", "deny")
        self.assertRaises(RuleError, parse_rule, "in", "allow")

    def test_hostPatternInLowerCase(self) -> None:
        """
        A C{host:} pattern is matched in lower case, as route hosts are
        spelled (DNS names are the same in any case); others as written.
        """
        for text, peer in [
            ("deny out * host:DB.Example.ORG", "host:db.example.org"),
            ("deny out * HOST:*.Internal", "host:*.internal"),
            ("deny out * user:Alice", "user:Alice"),
        ]:
            self.assertEqual(parse_rule(text).peer, peer)

    def test_hostPatternAsRoutesSpellIt(self) -> None:
        """
        A literal C{host:} pattern that no route's host is labelled is
        refused, saying the label to write or why no route has that host:
        C{deny out * host:0x7f.1} or C{host:0:0:0:0:0:0:0:1} never matched
        (a route is labelled C{host:127.0.0.1}, C{host:::1}), and
        C{host:[::1]} is a glob of one character.  Globs, SRV owners and
        labels as routes spell them are taken.
        """
        for peer, why in [
            ("host:0:0:0:0:0:0:0:1", "write host:::1"),
            ("host:[::1]", "write host:::1"),
            ("host:[fe80::1%eth0]", "write host:fe80::1%eth0"),
            ("host:2001:db8:0::1", "write host:2001:db8::1"),
            ("host:::ffff:127.0.0.1", "is the IPv4 address 127.0.0.1"),
            ("host:0x7f.1", "as the resolver reads it (127.0.0.1)"),
            ("host:127.1", "not a valid IPv4 address"),
            ("host:127.0.0.1.", "not a valid IPv4 address"),
            ("host:0.0.0.0", "0.0.0.0 is no host's address"),
            ("host:db.example.", "empty label"),
            ("host:bücher.example", "write host:xn--bcher-kva.example"),
            ("host:2001:db8::1%eth0", "2001:db8::1 is not one"),
        ]:
            with self.assertRaises(RuleError) as raised:
                parse_rule(f"deny out * {peer}")
            message = str(raised.exception)
            self.assertIn(f"no route's host is labelled {peer!r}: ", message)
            self.assertIn(why, message)
        for peer in (
            "host:127.0.0.1",
            "host:::1",
            "host:2001:db8::1",
            "host:fe80::1%eth0",
            "host:fe80::1%3",
            "host:db.example",
            "host:xn--bcher-kva.example",
            "host:_ipc._tcp.example.org",
            "host:10.*",
            "host:[ab]*.example",
        ):
            self.assertEqual(parse_rule(f"deny out * {peer}").peer, peer)

    def test_ipGlobAccepted(self) -> None:
        """An C{ip:} pattern with glob characters is a glob, not a network."""
        self.assertEqual(parse_rule("allow in pong ip:10.*").peer, "ip:10.*")

    def test_ipMappedGlobRefused(self) -> None:
        """
        An C{ip:} glob in IPv4-mapped form (C{ip:::ffff:10.*}, as the log
        prints a dual-stack listener's peer) is refused, saying how IPv4
        peers are labelled: no label is spelled so, and such a deny would
        let every peer in.  Other IPv6 globs are taken, those of
        IPv4-translated addresses (C{::ffff:0:...}) too.
        """
        for glob in ("ip:::ffff:10.*", "ip:::FFFF:*", "ip:::ffff:0.*"):
            with self.assertRaises(RuleError) as raised:
                parse_rule(f"deny in * {glob}")
            self.assertIn("labelled as IPv4 (ip:10.1.2.3)", str(raised.exception))
            self.assertRaises(RuleError, parse_grant, f"secret {glob}")
        for glob in ("ip:::ffff:0:*", "ip:2001:db8:*", "ip:*ffff*", "ip:::1*"):
            self.assertEqual(parse_rule(f"deny in * {glob}").peer, glob)
        # Only ip: labels are so: a route's host may be (::ffff:0:a01:203).
        self.assertEqual(parse_rule("deny out * host:::ffff:*").peer, "host:::ffff:*")

    def test_unixPatternRefusedUnlessItCanMatch(self) -> None:
        """
        A C{unix:} pattern that no label can match (a UNIX listener's peer
        is C{unix:uid=N}, N in ASCII digits, no leading zero) is refused, a
        rule's and a grant's, saying how such a peer is labelled: taken, it
        matched no one, and a deny of that proxy's (C{deny in * unix:33},
        C{unix:user=www-data}) let it in.  Globs that can match are taken.
        """
        for pattern in (
            "unix:uid=x",
            "unix:33",
            "unix:uid:33",
            "unix:uid=033",
            "unix:uid=+33",
            "unix:uid=" + "33".translate(ARABIC_INDIC),
            "unix:user=www-data",
            "unix:user=*",
            "unix:gid=*",
            "unix:uid=unknown",
        ):
            with self.subTest(pattern=pattern):
                with self.assertRaises(RuleError) as raised:
                    parse_rule(f"deny in * {pattern}")
                self.assertIn(
                    "a peer of a listener on a UNIX socket is labelled "
                    "unix:uid=N (N its uid in ASCII digits: unix:uid=33)",
                    str(raised.exception),
                )
                self.assertRaises(RuleError, parse_grant, f"secret {pattern}")
        for pattern in (
            "unix:uid=0",
            "unix:uid=33",
            "unix:uid=4294967294",
            "unix:uid=*",
            "unix:*",
            "unix:u*",
            "unix:uid=1?",
            "unix:uid=[0-9]*",
            "unix:?id=33",
        ):
            self.assertEqual(parse_rule(f"allow in * {pattern}").peer, pattern)

    def test_ipNonStrictNetwork(self) -> None:
        """Host bits set in a CIDR are accepted (C{10.1.2.3/8} = C{10/8})."""
        self.assertEqual(
            parse_rule("allow in pong ip:10.1.2.3/8").peer, "ip:10.1.2.3/8"
        )


class PeerMatchesTests(SynchronousTestCase):
    def test_star(self) -> None:
        self.assertTrue(peer_matches("*", []))
        self.assertTrue(peer_matches("*", ["ip:1.2.3.4"]))

    def test_exactLabel(self) -> None:
        self.assertTrue(peer_matches("uid:1000", ALICE))
        self.assertFalse(peer_matches("uid:100", ALICE))
        self.assertFalse(peer_matches("uid:1000", []))

    def test_userAndGroupGlobs(self) -> None:
        self.assertTrue(peer_matches("user:al*", ALICE))
        self.assertTrue(peer_matches("group:whe?l", ALICE))
        self.assertTrue(peer_matches("group:[vw]heel", ALICE))
        self.assertFalse(peer_matches("user:bob*", ALICE))
        self.assertFalse(peer_matches("group:adm", ALICE))

    def test_globIsCaseSensitive(self) -> None:
        self.assertFalse(peer_matches("user:Alice", ALICE))

    def test_kindMatters(self) -> None:
        """C{user:alice} does not match a C{group:alice} pattern's kind."""
        self.assertFalse(peer_matches("user:wheel", ALICE))

    def test_ipv4Cidr(self) -> None:
        self.assertTrue(peer_matches("ip:10.0.0.0/8", ["ip:10.1.2.3"]))
        self.assertTrue(peer_matches("ip:10.1.2.3", ["ip:10.1.2.3"]))
        self.assertTrue(peer_matches("ip:192.168.1.0/24", ["ip:192.168.1.255"]))
        self.assertFalse(peer_matches("ip:192.168.1.0/24", ["ip:192.168.2.1"]))
        self.assertFalse(peer_matches("ip:10.0.0.0/8", ["ip:11.0.0.1"]))
        # A bool, as documented, not merely something false.
        self.assertIs(peer_matches("ip:10.0.0.0/8", ["ip:11.0.0.1"]), False)
        self.assertIs(peer_matches("ip:10.0.0.0/8", ["ip:10.0.0.1"]), True)
        self.assertTrue(peer_matches("ip:0.0.0.0/0", ["ip:203.0.113.9"]))

    def test_ipv6Cidr(self) -> None:
        self.assertTrue(peer_matches("ip:fd00::/8", ["ip:fd12:3456::1"]))
        self.assertTrue(peer_matches("ip:::1", ["ip:::1"]))
        self.assertTrue(peer_matches("ip:2001:db8::/32", ["ip:2001:db8:0:1::5"]))
        self.assertFalse(peer_matches("ip:2001:db8::/32", ["ip:2001:db9::5"]))

    def test_ipv6Scope(self) -> None:
        """A link-local peer's scope (C{%eth0}) does not hide its address."""
        self.assertTrue(peer_matches("ip:fe80::/10", ["ip:fe80::1%eth0"]))

    def test_ipv6ZoneMatters(self) -> None:
        """
        A network with a zone matches only peers of that interface (by name
        or by index); one without, peers of every interface.
        """
        self.assertTrue(peer_matches("ip:fe80::%eth0/64", ["ip:fe80::1%eth0"]))
        self.assertFalse(peer_matches("ip:fe80::%eth0/64", ["ip:fe80::1%eth1"]))
        self.assertFalse(peer_matches("ip:fe80::1%eth0", ["ip:fe80::1%eth1"]))
        # A peer whose zone is not known (udpd's) by its address alone.
        self.assertTrue(peer_matches("ip:fe80::%eth0/64", ["ip:fe80::1"]))
        self.assertTrue(peer_matches("ip:fe80::/64", ["ip:fe80::1%eth1"]))
        lo = socket.if_nametoindex("lo")
        self.assertTrue(peer_matches(f"ip:fe80::%{lo}/64", ["ip:fe80::1%lo"]))
        self.assertTrue(peer_matches("ip:fe80::%lo/64", [f"ip:fe80::1%{lo}"]))
        self.assertFalse(peer_matches(f"ip:fe80::%{lo + 1}/64", ["ip:fe80::1%lo"]))
        self.assertFalse(peer_matches("ip:fe80::%nosuch0/64", ["ip:fe80::1%1"]))
        self.assertFalse(peer_matches("ip:fe80::%nosuch0/64", ["ip:fe80::1%nosuch1"]))
        # The same name, whether or not the interface is there now.
        self.assertTrue(peer_matches("ip:fe80::%nosuch0/64", ["ip:fe80::1%nosuch0"]))

    def test_zoneIndexInAsciiDigits(self) -> None:
        """
        A zone is an index in ASCII digits only; in others (which
        C{str.isdigit()} takes) it is a name: C{%²} raised from C{int()}
        when a peer came, and C{%١} was index 1 (an interface named so is
        not).
        """
        lo = socket.if_nametoindex("lo")
        other = str(lo).translate(ARABIC_INDIC)
        self.assertFalse(peer_matches(f"ip:fe80::%{other}/64", ["ip:fe80::1%lo"]))
        self.assertFalse(peer_matches("ip:fe80::%²/64", ["ip:fe80::1%lo"]))
        self.assertTrue(peer_matches("ip:fe80::%²/64", ["ip:fe80::1%²"]))
        parse_rule(f"allow in * ip:fe80::%{other}/64")  # a name, if there is one

    def test_zoneNoInterfaceCanHave(self) -> None:
        """
        A zone no interface can have is refused with the rule, in one line:
        more digits than C{int()} reads, a NUL, or a name longer than
        Linux's 15 bytes raised or matched nothing when a peer came.
        """
        for zone in ("9" * 5000, "99999999999", "a\0b", "x" * 16, "é" * 8):
            for parse in (parse_rule, parse_grant):
                text = f"allow in * ip:fe80::%{zone}/64"
                if parse is parse_grant:
                    text = f"svc ip:fe80::%{zone}/64"
                with self.assertRaises(RuleError) as caught:
                    parse(text)
                self.assertIn(
                    f"zone {zone!r} is not an interface name", str(caught.exception)
                )
        for zone in ("eth0", "4294967295", "x" * 15, "é" * 7):
            parse_rule(f"allow in * ip:fe80::%{zone}/64")

    def test_ipv4MappedV6(self) -> None:
        """A dual-stack listener's C{::ffff:a.b.c.d} peer is an IPv4 peer."""
        self.assertTrue(peer_matches("ip:127.0.0.0/8", ["ip:::ffff:127.0.0.1"]))
        self.assertTrue(peer_matches("ip:10.1.2.3", ["ip:::ffff:10.1.2.3"]))
        self.assertFalse(peer_matches("ip:10.0.0.0/8", ["ip:::ffff:11.0.0.1"]))

    def test_ipv4MappedPattern(self) -> None:
        """
        A network or address written in IPv4-mapped form (C{::ffff:...},
        as the log prints a dual-stack listener's peer) is the IPv4 one it
        maps: it matches that IPv4 peer, however it is labelled.  (It
        matched no one: a deny so written let its peer in.)
        """
        for label in ("ip:10.1.2.3", "ip:::ffff:10.1.2.3"):
            self.assertIs(peer_matches("ip:::ffff:10.1.2.3", [label]), True)
            self.assertIs(peer_matches("ip:::ffff:10.0.0.0/104", [label]), True)
            self.assertIs(peer_matches("ip:::FFFF:0:0/96", [label]), True)
            self.assertIs(peer_matches("ip:::ffff:11.0.0.0/104", [label]), False)
        # IPv6 peers, and IPv4-translated addresses (not mapped), are not.
        self.assertFalse(peer_matches("ip:::ffff:0:0/96", ["ip:::1"]))
        self.assertFalse(peer_matches("ip:::ffff:0:0/96", ["ip:::ffff:0:a01:203"]))
        self.assertTrue(peer_matches("ip:::ffff:0:0:0/96", ["ip:::ffff:0:a01:203"]))
        self.assertFalse(peer_matches("ip:::ffff:0:0:0/96", ["ip:10.1.2.3"]))

    def test_versionsDoNotMix(self) -> None:
        self.assertFalse(peer_matches("ip:0.0.0.0/0", ["ip:::1"]))
        self.assertFalse(peer_matches("ip:::/0", ["ip:127.0.0.1"]))

    def test_ipPatternIgnoresOtherLabels(self) -> None:
        self.assertFalse(peer_matches("ip:10.0.0.0/8", ["host:10.1.2.3", *ALICE]))
        self.assertFalse(peer_matches("ip:10.0.0.0/8", ["ip:not-an-address"]))

    def test_ipGlob(self) -> None:
        self.assertTrue(peer_matches("ip:10.*", ["ip:10.9.9.9"]))
        self.assertFalse(peer_matches("ip:10.*", ["ip:110.9.9.9"]))

    def test_anyLabelMatches(self) -> None:
        labels = ["ip:192.0.2.1", "cert:client.example", "psk:sensor-7"]
        self.assertTrue(peer_matches("psk:sensor-*", labels))
        self.assertTrue(peer_matches("cert:*.example", labels))
        self.assertTrue(peer_matches("ip:192.0.2.0/24", labels))


class DecideTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        self.assertEqual(DEFAULTS, {"local": True, "out": True, "in": False})
        for direction, allowed in DEFAULTS.items():
            with self.subTest(direction=direction):
                self.assertEqual(
                    decide([], direction, ["pong"], ALICE), Decision(allowed, None)
                )

    def test_firstMatchWins(self) -> None:
        policy = rules("deny in pong ip:10.0.0.9", "allow in pong", "deny in *")
        self.assertFalse(decide(policy, "in", ["pong"], ["ip:10.0.0.9"]).allowed)
        decision = decide(policy, "in", ["pong"], ["ip:10.0.0.8"])
        self.assertEqual(decision, Decision(True, policy[1], 2))
        decision = decide(policy, "in", ["authd"], ["ip:10.0.0.8"])
        self.assertEqual(decision, Decision(False, policy[2], 3))

    def test_otherDirectionsIgnored(self) -> None:
        policy = rules("deny local pong", "deny out pong")
        self.assertEqual(decide(policy, "in", ["pong"], []), Decision(False, None))
        policy = rules("allow in pong", "allow out pong")
        self.assertEqual(decide(policy, "local", ["pong"], ALICE).index, None)

    def test_serviceGlobs(self) -> None:
        policy = rules("allow in auth*", "allow in pong?", "allow in [xy]d")
        for name, allowed in [
            ("authd", True),
            ("auth", True),
            ("pong1", True),
            ("pong", False),
            ("xd", True),
            ("zd", False),
            ("Authd", False),
        ]:
            with self.subTest(name=name):
                self.assertEqual(decide(policy, "in", [name], []).allowed, allowed)

    def test_anyServiceName(self) -> None:
        """For C{out}, the asked name or the remote one: either may deny."""
        policy = rules("deny out authd")
        decision = decide(policy, "out", ["a", "authd"], [])
        self.assertEqual(
            str(decision), "denied by rule 1 (deny out authd *) for 'authd'"
        )
        self.assertTrue(decide(policy, "out", ["a", "b"], []).allowed)

    def test_everyNameOnItsOwn(self) -> None:
        """
        An allow rule for one name does not carry another: each name's own
        first match decides it, and all must allow.
        """
        policy = rules("allow out pong", "deny out * *")
        self.assertTrue(decide(policy, "out", ["pong"], []).allowed)
        decision = decide(policy, "out", ["pong", "secret"], [])
        self.assertEqual(
            (decision.allowed, decision.index, decision.service),
            (False, 2, "secret"),
        )
        decision = decide(policy, "out", ["pong", "pong"], [])
        self.assertEqual((decision.allowed, decision.service), (True, None))
        policy = rules("deny local pong *")
        self.assertFalse(decide(policy, "local", ["x", "pong"], []).allowed)
        self.assertTrue(decide(policy, "local", ["x", "y"], []).allowed)

    def test_peerPattern(self) -> None:
        policy = rules("deny local pong group:wheel", "deny local pong uid:0")
        self.assertFalse(decide(policy, "local", ["pong"], ALICE).allowed)
        self.assertTrue(decide(policy, "local", ["pong"], ["uid:5"]).allowed)
        self.assertFalse(decide(policy, "local", ["pong"], ["uid:0"]).allowed)

    def test_seedRules(self) -> None:
        """C{--allow in authd --deny in '*' '*' --allow out pong}."""
        policy = [
            parse_rule("in authd", "allow"),
            parse_rule("in * *", "deny"),
            parse_rule("out pong", "allow"),
        ]
        self.assertTrue(decide(policy, "in", ["authd"], ["ip:1.2.3.4"]).allowed)
        self.assertFalse(decide(policy, "in", ["pong"], ["ip:1.2.3.4"]).allowed)
        self.assertTrue(decide(policy, "out", ["x"], ALICE).allowed)

    def test_destinationLabels(self) -> None:
        policy = rules("deny out * port:22", "allow out * host:*.example")
        labels = [*ALICE, "host:db.example", "port:22"]
        self.assertEqual(decide(policy, "out", ["db"], labels).index, 1)
        labels = [*ALICE, "host:db.example", "port:5432"]
        self.assertEqual(decide(policy, "out", ["db"], labels).index, 2)

    def test_decisionText(self) -> None:
        policy = rules("allow in pong")
        self.assertEqual(
            str(decide(policy, "in", ["pong"], [])),
            "allowed by rule 1 (allow in pong *)",
        )
        self.assertEqual(str(decide(policy, "in", ["x"], [])), "denied by default")
        self.assertEqual(str(decide(policy, "out", ["x"], [])), "allowed by default")

    def test_iterablesOnce(self) -> None:
        """Generators are fine: each is consumed once."""
        policy = rules("deny in a ip:10.0.0.0/8", "allow in b ip:10.0.0.0/8")
        decision = decide(
            iter(policy), "in", (n for n in ["b"]), (x for x in ["ip:10.1.1.1"])
        )
        self.assertEqual(decision.index, 2)


# Property tests.

DIRECTIONS = st.sampled_from(["in", "out", "local"])
NAMES = st.sampled_from(["pong", "authd", "a", "ab", "tcp", "x.y", "P"])
GLOBS = st.one_of(NAMES, st.sampled_from(["*", "a*", "?", "[ap]*", "*d", "p?ng"]))
LABELS = st.sampled_from(
    [
        "uid:0",
        "uid:1000",
        "user:alice",
        "group:wheel",
        "ip:10.1.2.3",
        "ip:192.168.0.7",
        "ip:::1",
        "ip:::ffff:10.9.9.9",
        "ip:fd00::5",
        "host:db.example",
        "port:22",
        "psk:sensor-1",
    ]
)
PEERS = st.one_of(
    st.just("*"),
    LABELS,
    st.sampled_from(
        [
            "ip:10.0.0.0/8",
            "ip:192.168.0.0/16",
            "ip:::/0",
            "ip:0.0.0.0/0",
            "ip:fd00::/8",
            "user:*",
            "group:wh*",
            "uid:1*",
            "host:*.example",
            "psk:*",
        ]
    ),
)
RULES = st.builds(Rule, st.sampled_from(["allow", "deny"]), DIRECTIONS, GLOBS, PEERS)


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=500, deadline=None)
    @given(st.text())
    def test_parseOnlyRaisesRuleError(self, text: str) -> None:
        """Whatever the text, parse_rule returns a Rule or raises RuleError."""
        try:
            rule = parse_rule(text)
        except RuleError:
            return
        self.assertIsInstance(rule, Rule)
        # A parsed rule can be used: its pattern never crashes a match.
        peer_matches(rule.peer, ["ip:10.1.2.3", "ip:::1", "user:x"])
        self.assertEqual(parse_rule(str(rule)), rule)

    @settings(max_examples=500, deadline=None)
    @given(
        st.lists(
            st.sampled_from(["allow", "deny", "in", "out", "local", "*", "pong"])
            | st.sampled_from(["ip:", "ip:10.0.0.0/8", "ip:::1/200", "user:a", ":"])
            | st.text(min_size=1, max_size=12),
            max_size=5,
        )
    )
    def test_parseWordsOnlyRaisesRuleError(self, words: list[str]) -> None:
        """Near-valid rules, word by word: a Rule or RuleError."""
        try:
            rule = parse_rule(" ".join(words))
        except RuleError:
            return
        peer_matches(rule.peer, ["ip:10.1.2.3", "ip:fe80::1%lo"])

    @settings(max_examples=500, deadline=None)
    @given(
        st.lists(RULES, max_size=8),
        DIRECTIONS,
        st.lists(NAMES, min_size=1, max_size=2),
        st.lists(LABELS, max_size=4),
    )
    def test_finalDenyAllowsOnlyWhatAnAllowRuleMatches(
        self,
        policy: list[Rule],
        direction: str,
        names: list[str],
        labels: list[str],
    ) -> None:
        """
        With C{deny in|out|local * *} last, each name is decided by the first
        rule (of the direction) that matches it; the request is allowed only
        if every name's rule is an allow rule, and the decision names the
        first name whose rule denies.
        """
        final = rules("deny in * *", "deny out * *", "deny local * *")
        full = [*policy, *final]
        decision = decide(full, direction, names, labels)
        self.assertIsNotNone(decision.rule)

        def first(name: str) -> int:
            return next(
                i
                for i, rule in enumerate(full, 1)
                if rule.direction == direction
                and fnmatchcase(name, rule.service)
                and peer_matches(rule.peer, labels)
            )

        deciding = {name: first(name) for name in names}
        allowed = all(full[i - 1].allows for i in deciding.values())
        self.assertEqual(decision.allowed, allowed)
        if allowed:
            self.assertEqual(decision.index, deciding[names[0]])
        else:
            denier = next(n for n in names if not full[deciding[n] - 1].allows)
            self.assertEqual(decision.index, deciding[denier])
            if len(set(names)) > 1:
                self.assertEqual(decision.service, denier)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(RULES, max_size=8), DIRECTIONS, NAMES, st.lists(LABELS))
    def test_noMatchMeansDefault(
        self, policy: list[Rule], direction: str, name: str, labels: list[str]
    ) -> None:
        """Rules of other directions never decide."""
        others = [rule for rule in policy if rule.direction != direction]
        self.assertEqual(
            decide(others, direction, [name], labels),
            Decision(DEFAULTS[direction], None),
        )
