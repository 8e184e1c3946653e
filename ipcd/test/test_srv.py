"""
Routes that name a DNS SRV owner, the pure parts: the route syntax, RFC
2782's order, which records of an answer are kept, the C{[dns]} settings.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.names import dns, error
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from ipcd.config import ConfigError, load_config
from ipcd.control import config_summary
from ipcd.routes import RouteError, parse_uri
from ipcd.srv import MAX_RECORDS, SrvRecord, Unavailable, order, records_of
from ipcd.srvcache import SrvCache, TtlBounds, why_not

OWNER = "_ipc._tcp.example.org"


class SyntaxTests(SynchronousTestCase):
    def test_ownerForEachScheme(self) -> None:
        """
        C{_SERVICE._PROTO.DOMAIN} without a port is an SRV owner: C{_tcp}
        for the schemes that ride on TCP, C{_udp} for udp://.
        """
        for scheme, proto in [
            ("tcp", "_tcp"),
            ("tls", "_tcp"),
            ("ws", "_tcp"),
            ("wss", "_tcp"),
            ("udp", "_udp"),
        ]:
            uri = parse_uri(f"{scheme}://_ipc.{proto}.example.org/pong")
            self.assertEqual(
                (uri.host, uri.port, uri.service, uri.is_srv),
                (f"_ipc.{proto}.example.org", None, "pong", True),
            )

    def test_literalHostIsNotAnOwner(self) -> None:
        """A host name or address is never taken for an SRV owner."""
        for text in ["tcp://example.org:9000/pong", "tcp://10.0.0.1/pong"]:
            self.assertFalse(parse_uri(text).is_srv)

    def test_idnaDomain(self) -> None:
        """The domain goes through the host checks: IDNA, in its ASCII form."""
        uri = parse_uri("tls://_ipc._tcp.bücher.example/pong")
        self.assertEqual(uri.host, "_ipc._tcp.xn--bcher-kva.example")

    def test_ownerInLowerCase(self) -> None:
        """An owner has one spelling for rules: DNS names in any case are one."""
        uri = parse_uri("tcp://_IPC._Tcp.Example.ORG/Pong")
        self.assertEqual((uri.host, uri.service), ("_ipc._tcp.example.org", "Pong"))

    def assertBad(self, text: str, *words: str) -> None:
        with self.assertRaises(RouteError) as caught:
            parse_uri(text)
        for word in words:
            self.assertIn(word, str(caught.exception))

    def test_noPort(self) -> None:
        """DNS gives each target's port: an owner with one is an error."""
        self.assertBad(f"tcp://{OWNER}:9000/pong", "takes no port")

    def test_protocolMustFitTheScheme(self) -> None:
        self.assertBad("tcp://_ipc._udp.example.org/pong", "_SERVICE._tcp.DOMAIN")
        self.assertBad("udp://_ipc._tcp.example.org/pong", "_SERVICE._udp.DOMAIN")
        self.assertBad("tcp://_ipc._sctp.example.org/pong", "_SERVICE._tcp.DOMAIN")
        self.assertBad("tcp://_ipc.tcp.example.org/pong", "_SERVICE._tcp.DOMAIN")

    def test_serviceLabel(self) -> None:
        """The service label is an RFC 6335 name: 1-15, a letter, no '--'."""
        for label in ["_", "_1", "_a--b", "_-ab", "_ab-", "_" + "a" * 16, "_a b"]:
            self.assertBad(f"tcp://{label}._tcp.example.org/p", "RFC 6335")
        parse_uri("tcp://_" + "a" * 15 + "._tcp.example.org/p")
        parse_uri("tcp://_x-1._tcp.example.org/p")

    def test_domainAsStrictAsAHost(self) -> None:
        """The domain after the two labels is checked as a literal host is."""
        self.assertBad("tcp://_ipc._tcp/p", "needs a domain")
        self.assertBad("tcp://_ipc._tcp./p", "needs a domain")
        self.assertBad("tcp://_ipc._tcp.exa_mple.org/p", "letters, digits")
        self.assertBad("tcp://_ipc._tcp.xn--zz.example/p", "not valid IDNA")
        self.assertBad("tcp://_ipc._tcp.a..b/p", "empty label")
        self.assertBad("tcp://_ipc._tcp.ex\x00ample/p", "control characters")
        self.assertBad("tcp://_ipc._tcp." + "a." * 126 + "org/p", "at most 253")

    def test_oneLetterService(self) -> None:
        uri = parse_uri("tcp://_a._tcp.example.org/p")
        self.assertEqual(uri.host, "_a._tcp.example.org")

    def test_ownerLength(self) -> None:
        """
        The whole owner, labels included, is a DNS name of at most 253
        characters, though its domain alone may be shorter.
        """

        def domain(length: int) -> str:
            labels = []
            while length > 63:
                labels.append("a" * 62)
                length -= 63
            return ".".join([*labels, "b" * length])

        head = "_ipc._tcp."
        longest = head + domain(253 - len(head))
        self.assertEqual(len(longest), 253)
        self.assertEqual(parse_uri(f"tcp://{longest}/p").host, longest)
        self.assertBad(f"tcp://{head}{domain(254 - len(head))}/p", "at most 253")

    def test_underscoreElsewhereIsStillRefused(self) -> None:
        """Only a first label with '_' makes an owner: other names stay hosts."""
        self.assertBad("tcp://a._ipc._tcp.example.org/p", "letters, digits")


def srv(name: str, priority: int, weight: int, port: int, target: str) -> Any:
    record = dns.Record_SRV(priority, weight, port, target.encode(), ttl=60)
    return dns.RRHeader(name, dns.SRV, dns.IN, 60, record)


class RecordTests(SynchronousTestCase):
    def test_dotTarget(self) -> None:
        """The target '.': the service is decidedly not available."""
        with self.assertRaises(Unavailable) as caught:
            records_of(OWNER, [srv(OWNER, 0, 0, 0, ".")])
        self.assertIn("decidedly not available", str(caught.exception))

    def test_aliasSaidEscaped(self) -> None:
        """
        An owner that is an alias is said to be one: its target, however
        hostile, escaped and cut; records of another name are not used.
        """
        alias = b"_x\x1b[31m._tcp.example.org." + b"a" * 300
        record = dns.Record_SRV(0, 0, 1, b"a.org", ttl=60)
        answers = [
            dns.RRHeader(OWNER, dns.CNAME, dns.IN, 60, dns.Record_CNAME(alias)),
            dns.RRHeader(alias, dns.SRV, dns.IN, 60, record),
        ]
        with self.assertRaises(Unavailable) as caught:
            records_of(OWNER, answers)
        shown = repr(alias[:64].decode())
        self.assertEqual(
            str(caught.exception),
            f"an alias (CNAME) of {shown}, not followed: name the SRV owner "
            "itself in the route",
        )
        self.assertNotIn("\x1b", str(caught.exception))

    def test_noRecords(self) -> None:
        with self.assertRaises(Unavailable) as caught:
            records_of(OWNER, [srv("_other._tcp.example.org", 0, 0, 1, "a.org")])
        self.assertIn("no SRV records", str(caught.exception))

    def test_badTargetsLeftOut(self) -> None:
        """A target that is not a valid host name (or port 0) is never dialed."""
        answers = [
            srv(OWNER, 0, 0, 1, "bad_name.example.org"),
            srv(OWNER, 0, 0, 0, "port0.example.org"),
            srv(OWNER, 5, 0, 9000, "good.example.org"),
        ]
        records, _ = records_of(OWNER, answers)
        self.assertEqual(records, [SrvRecord(5, 0, 9000, "good.example.org")])
        with self.assertRaises(Unavailable) as caught:
            records_of(OWNER, answers[:2])
        self.assertIn("not host names: 'bad_name.example.org':1", str(caught.exception))

    def test_nonAsciiTargetLeftOut(self) -> None:
        """Names in DNS are bytes: a target that is not ASCII is a bad one."""
        record = dns.Record_SRV(0, 0, 9, b"\xff\xfe.example.org", ttl=60)
        header = dns.RRHeader(OWNER, dns.SRV, dns.IN, 60, record)
        with self.assertRaises(Unavailable) as caught:
            records_of(OWNER, [header])
        self.assertIn("no valid target (not host names: ", str(caught.exception))

    def test_keptAtMost(self) -> None:
        """Thousands of records: the lowest priorities' MAX_RECORDS are kept."""
        answers = [
            srv(OWNER, 10000 - i, 1, 1000 + i % 60000, "a.example.org")
            for i in range(10000)
        ]
        records, _ = records_of(OWNER, answers)
        self.assertEqual(len(records), MAX_RECORDS)
        self.assertEqual([r.priority for r in records], list(range(1, 33)))

    def test_smallestTtl(self) -> None:
        answers = [srv(OWNER, 0, 0, 1, "a.org"), srv(OWNER, 0, 0, 2, "b.org")]
        answers[1].ttl = 7
        self.assertEqual(records_of(OWNER, answers)[1], 7)


def records(*specs: tuple[int, int, str]) -> list[SrvRecord]:
    return [SrvRecord(p, w, 1, target) for p, w, target in specs]


class OrderTests(SynchronousTestCase):
    def test_lowestPriorityFirst(self) -> None:
        ordered = order(
            records((20, 5, "c"), (10, 1, "a"), (15, 0, "b")), random.randint
        )
        self.assertEqual([r.target for r in ordered], ["a", "b", "c"])

    def test_runningSum(self) -> None:
        """
        The random number picks the first record whose running sum reaches
        it, weight-0 records first in the sum (RFC 2782): 0 picks one of
        those, the total the last.
        """
        group = records((1, 0, "zero"), (1, 30, "thirty"), (1, 70, "seventy"))
        lowest = order(group, lambda low, high: low)
        highest = order(group, lambda low, high: high)
        self.assertEqual([r.target for r in lowest], ["zero", "thirty", "seventy"])
        self.assertEqual([r.target for r in highest][0], "seventy")
        middle = order(group, lambda low, high: min(high, 31))
        self.assertEqual(middle[0].target, "seventy")
        middle = order(group, lambda low, high: min(high, 30))
        self.assertEqual(middle[0].target, "thirty")

    def test_allWeightsZero(self) -> None:
        """With every weight 0, each record is still tried, once."""
        group = records((1, 0, "a"), (1, 0, "b"), (1, 0, "c"))
        ordered = order(group, random.Random(1).randint)
        self.assertEqual(sorted(r.target for r in ordered), ["a", "b", "c"])

    def test_weightsShareTheFirstChoice(self) -> None:
        """
        Over many draws the first choice goes by weight (60/30/10, with a
        seeded generator: the counts are the same on every run; the bounds
        are loose), and a weight-0 record is first only when the draw is 0:
        one time in 101.
        """
        group = records((1, 60, "a"), (1, 30, "b"), (1, 10, "c"), (1, 0, "z"))
        draw = random.Random(2782).randint
        firsts = Counter(order(group, draw)[0].target for _ in range(10000))
        self.assertTrue(5600 < firsts["a"] < 6300, firsts)
        self.assertTrue(2700 < firsts["b"] < 3300, firsts)
        self.assertTrue(800 < firsts["c"] < 1200, firsts)
        self.assertTrue(30 < firsts["z"] < 200, firsts)


class SettingsTests(SynchronousTestCase):
    def load(self, **dns: Any) -> Any:
        return load_config(None, {"rundir": "/tmp/x", "dns": dns}, environ={})

    def test_servers(self) -> None:
        config = self.load(servers=["127.0.0.1:5353", "[::1]", "10.0.0.1"])
        self.assertEqual(
            config.dns_servers, (("127.0.0.1", 5353), ("::1", 53), ("10.0.0.1", 53))
        )

    def test_badServers(self) -> None:
        for servers, words in [
            ("127.0.0.1", "expected a list of DNS server addresses"),
            (["ns.example.org"], "expected ADDRESS or ADDRESS:PORT"),
            (["1.2.3"], "not an IP address"),
            (["127.0.0.1:0"], "port must be 1 to 65535"),
        ]:
            with self.assertRaises(ConfigError) as caught:
                self.load(servers=servers)
            self.assertIn("[dns] servers: ", str(caught.exception))
            self.assertIn(words, str(caught.exception))

    def test_defaults(self) -> None:
        config = self.load()
        self.assertEqual(
            (
                config.dns_servers,
                config.dns_target_timeout,
                config.dns_max_targets,
                config.dns_min_ttl,
                config.dns_max_ttl,
                config.dns_negative_ttl,
                config.dns_max_names,
            ),
            ((), 2.0, 8, 5.0, 3600.0, 10.0, 256),
        )

    def test_inStatus(self) -> None:
        """
        C{ipcd status} shows the [dns] settings in force (servers as the
        file writes them; none: /etc/resolv.conf's), as it shows the others.
        """
        config = self.load(servers=["127.0.0.1:5353", "[::1]"], max_targets=3)
        self.assertEqual(
            config_summary(config)["dns"],
            {
                "servers": ["127.0.0.1:5353", "[::1]:53"],
                "target_timeout": 2.0,
                "max_targets": 3,
                "min_ttl": 5.0,
                "max_ttl": 3600.0,
                "negative_ttl": 10.0,
                "max_names": 256,
            },
        )
        self.assertEqual(config_summary(self.load())["dns"]["servers"], [])


class CacheBoundTests(SynchronousTestCase):
    """The cache keeps at most max_names owners, and as many queries waiting."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.asked: dict[str, Deferred[Any]] = {}
        self.cache = SrvCache(self.query, self.clock, TtlBounds(max_names=2))

    def query(self, owner: str) -> Deferred[Any]:
        self.asked[owner] = Deferred()
        return self.asked[owner]

    def answer(self, owner: str) -> None:
        self.asked[owner].callback(([srv(owner, 0, 0, 1, "a.org")], [], []))

    def test_oldestAnswerGoes(self) -> None:
        owners = [f"_s{i}._tcp.example.org" for i in range(3)]
        for owner in owners:
            self.cache.resolve(owner)
            self.answer(owner)
        self.assertEqual(list(self.cache.status()), owners[1:])

    def test_queriesInFlightBounded(self) -> None:
        """Past max_names names waiting for DNS, a lookup is refused at once."""
        self.cache.resolve("_a._tcp.example.org")
        self.cache.resolve("_b._tcp.example.org")
        refused = self.failureResultOf(self.cache.resolve("_c._tcp.example.org"))
        self.assertIn("too many DNS lookups in flight", str(refused.value))
        self.assertEqual(len(self.asked), 2)

    def test_waitersShareOneQuery(self) -> None:
        """Lookups of a name DNS is being asked wait for that one answer."""
        first = self.cache.resolve(OWNER)
        second = self.cache.resolve(OWNER.upper())
        self.assertEqual(len(self.asked), 1)
        self.answer(OWNER)
        self.assertEqual(self.successResultOf(first), self.successResultOf(second))

    def test_queryRaising(self) -> None:
        """A resolver that raises at once: the lookup fails, saying why."""

        def query(owner: str) -> Deferred[Any]:
            raise OSError("no network")

        self.cache.query = query
        answer = self.successResultOf(self.cache.resolve(OWNER))
        self.assertEqual(answer.error, "DNS lookup failed: no network")

    def test_waiterGivingUpLeavesOthers(self) -> None:
        """A lookup cancelled while waiting: the others still get the answer."""
        first = self.cache.resolve(OWNER)
        second = self.cache.resolve(OWNER)
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.answer(OWNER)
        self.assertEqual(self.successResultOf(second).records[0].target, "a.org")

    def test_lastWaiterGoneEndsTheQuery(self) -> None:
        """
        When every lookup waiting for a name has given up (their clients
        gone), its query ends: its place in flight is given back, nothing
        is kept for the name, and the next lookup of it asks anew.
        """
        owner = "_a._tcp.example.org"
        first, second = self.cache.resolve(owner), self.cache.resolve(owner)
        self.cache.resolve("_b._tcp.example.org")
        first.cancel()
        self.assertFalse(self.asked[owner].called)  # one still waits
        second.cancel()
        self.assertTrue(self.asked[owner].called)  # ended
        for gone in (first, second):
            self.failureResultOf(gone, CancelledError)
        # Its place is free: a third name is asked (max_names is 2).
        self.assertNoResult(self.cache.resolve("_c._tcp.example.org"))
        self.assertIn("_c._tcp.example.org", self.asked)
        self.assertEqual(self.cache.status(), {})
        self.answer("_c._tcp.example.org")
        ended = self.asked[owner]
        self.assertNoResult(self.cache.resolve(owner))
        self.assertIsNot(self.asked[owner], ended)  # asked anew


class WhyNotTests(SynchronousTestCase):
    def test_eachFailureSaidAsItIs(self) -> None:
        """twisted.names' errors (mostly DomainErrors) are told apart."""
        message = dns.Message()
        for exception, said in [
            (error.DNSNameError(message), "no such name (NXDOMAIN)"),
            (error.DomainError(b"x"), "no such name (NXDOMAIN)"),
            (error.DNSServerError(message), "DNS server failure (SERVFAIL)"),
            (error.DNSQueryRefusedError(message), "the DNS server refused the query"),
            (error.DNSQueryTimeoutError(0), "no answer from DNS (timed out)"),
            (error.DNSFormatError(message), "DNS lookup failed (DNSFormatError)"),
            (OSError("Network is unreachable\x1b"), "DNS lookup failed: Network"),
        ]:
            self.assertTrue(why_not(Failure(exception)).startswith(said), exception)
        self.assertNotIn("\x1b", why_not(Failure(OSError("a\x1b"))))


def answer_of(owner: str, ttl: int, target: str = "a.org") -> Any:
    """twisted.names' answer to an SRV query: one record of C{ttl}."""
    record = dns.Record_SRV(0, 0, 1, target.encode(), ttl=ttl)
    return ([dns.RRHeader(owner, dns.SRV, dns.IN, ttl, record)], [], [])


class CacheTtlTests(SynchronousTestCase):
    """How long answers and failures are kept, and what status shows of them."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)  # (expiries are times: not from 0)
        self.asked: dict[str, list[Deferred[Any]]] = {}
        bounds = TtlBounds(min_ttl=1, max_ttl=100, negative_ttl=10, max_names=2)
        self.cache = SrvCache(self.query, self.clock, bounds)

    def query(self, owner: str) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.asked.setdefault(owner, []).append(d)
        return d

    def resolved(self, owner: str, result: Any) -> Any:
        """C{owner} resolved, DNS answering C{result} (or failing with it)."""
        waiting = self.cache.resolve(owner)
        query = self.asked[owner][-1]
        if isinstance(result, Exception):
            query.errback(result)
        else:
            query.callback(result)
        return self.successResultOf(waiting)

    def test_answerLivesItsTtl(self) -> None:
        """
        Kept while its TTL lasts (status shows the time left, to a tenth of
        a second, never below 0), asked again from the moment it ends.
        """
        self.resolved(OWNER, answer_of(OWNER, 60))
        target = {"target": "a.org", "port": 1, "priority": 0, "weight": 0}
        self.assertEqual(
            self.cache.status(), {OWNER: {"ttl_left": 60.0, "targets": [target]}}
        )
        self.assertEqual(self.cache._queries, {})  # nothing held once answered
        # (Steps exact in binary: the clock's sums are exact too.)
        self.clock.advance(0.25)
        self.assertEqual(self.cache.status()[OWNER]["ttl_left"], 59.8)
        self.clock.advance(59.5)
        self.successResultOf(self.cache.resolve(OWNER))  # cached: not asked
        self.assertEqual(len(self.asked[OWNER]), 1)
        self.clock.advance(0.25)  # 60 s: ended
        self.assertNoResult(self.cache.resolve(OWNER))
        self.assertEqual(len(self.asked[OWNER]), 2)
        self.clock.advance(1)
        self.assertEqual(self.cache.status()[OWNER]["ttl_left"], 0)

    def test_failuresLiveNegativeTtl(self) -> None:
        """
        A DNS failure, or an answer with no service in it, is kept for
        negative_ttl, its reason shown instead of targets.
        """
        for result, said in (
            (error.DNSNameError(dns.Message()), "no such name (NXDOMAIN)"),
            (answer_of(OWNER, 60, "."), "decidedly not available"),
        ):
            self.asked.clear()
            self.cache.answers.clear()
            answer = self.resolved(OWNER, result)
            self.assertIn(said, answer.error)
            shown = self.cache.status()[OWNER]
            self.assertEqual(
                (shown["ttl_left"], set(shown)), (10, {"ttl_left", "error"})
            )
            self.clock.advance(9.75)
            self.successResultOf(self.cache.resolve(OWNER))
            self.clock.advance(0.25)
            self.assertNoResult(self.cache.resolve(OWNER))
            self.assertEqual(len(self.asked[OWNER]), 2)
            self.asked[OWNER][-1].errback(error.DNSNameError(dns.Message()))

    def test_answerNotUnderstood(self) -> None:
        """
        An answer the cache cannot read: the lookups waiting for it are
        told so (never left waiting); the error goes on to be logged.
        """
        waiting = self.cache.resolve(OWNER)
        query = self.asked[OWNER][0]
        query.callback(None)  # (not twisted.names' answer tuple)
        self.assertEqual(
            self.successResultOf(waiting).error, "DNS answer not understood"
        )
        self.failureResultOf(query, TypeError)

    def test_expiredGoFirst(self) -> None:
        """
        At max_names, answers that have ended go before the oldest live
        one (including one ending this very moment); an owner answered
        again is the newest.
        """
        a, b, c = (f"_{n}._tcp.example.org" for n in "abc")
        self.resolved(a, answer_of(a, 100))
        self.resolved(b, answer_of(b, 5))
        self.clock.advance(5)  # b's last moment
        self.resolved(c, answer_of(c, 100))
        self.assertEqual(list(self.cache.status()), [a, c])
        self.clock.advance(100)  # a and c ended
        self.resolved(a, answer_of(a, 100))  # (a, answered again, newest)
        self.assertEqual(list(self.cache.status()), [c, a])
        self.resolved(b, answer_of(b, 100))
        self.assertEqual(list(self.cache.status()), [a, b])

    def test_defaults(self) -> None:
        """TtlBounds' own defaults are [dns]'s (test_defaults above)."""
        self.assertEqual(TtlBounds(), TtlBounds(5.0, 3600.0, 10.0, 256))
