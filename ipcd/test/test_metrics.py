"""
Tests for ipcd's Prometheus metrics (L{ipcd.metrics}, L{ipcd.metricsweb}):
a real ipcd on real sockets, known traffic, then a scrape over HTTP parsed
by prometheus_client's own parser.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from typing import Any

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ipcd import metricsweb
from ipcd.config import ConfigError, load_config
from ipcd.control import config_summary
from ipcd.daemons.udp import wire as udpwire
from ipcd.limits import RateLimitedObserver
from ipcd.metrics import NO_METRICS
from ipcd.metricsweb import MAX_BODY, MAX_CONNECTIONS_PER_PEER
from ipcd.test.support import (
    TIMEOUT,
    bounce,
    free_port,
    logged_lines,
    lookup,
    make_config,
    python_env,
    read_text,
    short_rundir,
    spawn,
    start_ipcd,
    tcp_listeners,
    wait_until,
)
from ipcd.test.tcpsupport import recv_eof
from ipcd.test.tlssupport import ALICE_KEY, secrets_file, start_tls_host
from ipcd.test.udpsupport import handshake, start_udp_host, udp_socket
from ipcd.wire import LOG_LINES_DROPPED, encode

LOOPBACK = "tcp:0:interface=127.0.0.1"


def scrape(
    port: int, path: str = "/metrics"
) -> dict[tuple[str, tuple[Any, ...]], float]:
    """
    GET the metrics at C{port} (blocking: run it in a thread), parsed by
    prometheus_client: C{(sample name, sorted labels)} to value.
    """
    url = f"http://127.0.0.1:{port}{path}"
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
        text = response.read().decode("utf-8")
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def sample(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def listening_port(service: Any, name: str) -> Any:
    return service.getServiceNamed(name).listening()


class ScrapeTests(TestCase):
    """A scrape after known traffic counts exactly that traffic."""

    @inlineCallbacks
    def setUp(self) -> Any:
        self.rundir = short_rundir(self, "ipcd-metrics-")
        config = make_config(
            self.rundir,
            metrics={"listen": LOOPBACK},
            tcpd={"enabled": True, "listen": LOOPBACK, "handshake_timeout": 1.0},
            rules=["deny local secret", "allow in pong"],
            limits={"max_connections_per_peer": 1},
        )
        self.service = yield start_ipcd(self, config)
        tcpd = yield listening_port(self.service, "tcpd")
        self.tcp_port = tcpd.getHost().port
        metrics = yield listening_port(self.service, "metrics")
        self.port = metrics.getHost().port

    def scrape(self) -> Any:
        return deferToThread(scrape, self.port)

    @inlineCallbacks
    def test_lookupsByOutcomeAndScheme(self) -> Any:
        """
        Lookups are counted by outcome and the scheme of their route, timed
        in the latency histogram; a denial by the rule that denied it.
        """
        route = f"tcp://127.0.0.1:{self.tcp_port}/pong"
        payloads = [
            b"pong",  # ok, unix
            f"pong;pong {route}".encode(),  # ok, tcp
            b"secret",  # denied by rule 1, unix
            b"nosuch",  # failed: nothing listens there
            b"bad name!",  # refused: no target at all
            b"pong",  # ok, unix again: from the plan cached the first time
        ]
        for payload in payloads:
            reply = yield deferToThread(lookup, self.rundir, payload)
            reply.close_fds()
        samples = yield self.scrape()
        lookups = {
            key[1]: value
            for key, value in samples.items()
            if key[0] == "ipcd_lookups_total"
        }
        self.assertEqual(
            lookups,
            {
                (("outcome", "ok"), ("scheme", "unix")): 2,
                (("outcome", "ok"), ("scheme", "tcp")): 1,
                (("outcome", "denied"), ("scheme", "unix")): 1,
                (("outcome", "failed"), ("scheme", "unix")): 1,
                (("outcome", "refused"), ("scheme", "none")): 1,
            },
        )
        self.assertEqual(
            sample(samples, "ipcd_refusals_total", direction="local", rule="1"), 1
        )
        self.assertEqual(sample(samples, "ipcd_lookup_duration_seconds_count"), 6)
        self.assertEqual(
            sample(samples, "ipcd_lookup_duration_seconds_bucket", le="+Inf"), 6
        )
        self.assertGreater(sample(samples, "ipcd_lookup_duration_seconds_sum"), 0)

    @inlineCallbacks
    def test_someFamilies(self) -> Any:
        """
        A scrape may ask for some families by name (C{name[]=}, as
        prometheus_client serves it): it gets those, with their samples.
        """
        reply = yield deferToThread(lookup, self.rundir, b"pong")
        reply.close_fds()
        samples = yield deferToThread(
            scrape,
            self.port,
            "/metrics?name[]=ipcd_lookups_total&name[]=ipcd_log_lines_dropped_total",
        )
        self.assertEqual(
            {name for name, _labels in samples},
            {"ipcd_lookups_total", "ipcd_log_lines_dropped_total"},
        )
        self.assertEqual(
            sample(samples, "ipcd_lookups_total", outcome="ok", scheme="unix"), 1
        )

    @inlineCallbacks
    def test_relays(self) -> Any:
        """
        A relay through tcpd is live while it lasts; once it ended, the
        bytes it carried each way are counted for tcpd.
        """
        route = f"tcp://127.0.0.1:{self.tcp_port}/pong"
        reply = yield deferToThread(lookup, self.rundir, f"pong;pong {route}".encode())
        sock = reply.take_socket(self)
        echo = yield deferToThread(bounce, sock, b"bounce me")
        self.assertEqual(echo, encode(b"bounce me"))
        samples = yield self.scrape()
        self.assertEqual(sample(samples, "ipcd_live_relays", daemon="tcpd"), 1)
        sock.close()
        broker = self.service.broker
        yield wait_until(lambda: not broker.relays, "the relay to end")
        samples = yield self.scrape()
        self.assertEqual(sample(samples, "ipcd_live_relays", daemon="tcpd"), 0)
        sent = len(encode(b"bounce me"))
        self.assertEqual(
            sample(
                samples, "ipcd_relayed_bytes_total", daemon="tcpd", **{"from": "client"}
            ),
            sent,
        )
        self.assertEqual(
            sample(
                samples,
                "ipcd_relayed_bytes_total",
                daemon="tcpd",
                **{"from": "service"},
            ),
            sent,
        )

    @inlineCallbacks
    def test_limitsAndHandshakeFailures(self) -> Any:
        """
        A peer over its connection limit counts as that limit hit on tcpd's
        listener; a peer that never asks, as a handshake that timed out.
        """
        idle = socket.create_connection(("127.0.0.1", self.tcp_port), TIMEOUT)
        self.addCleanup(idle.close)
        counters = self.service.broker.counters
        refused = 3
        for _ in range(refused):
            extra = socket.create_connection(("127.0.0.1", self.tcp_port), TIMEOUT)
            self.addCleanup(extra.close)
        yield wait_until(
            lambda: counters["tcpd: refused, per-peer limit"] == refused,
            "the refusals",
        )
        yield wait_until(
            lambda: counters["tcpd: handshakes timed out"] == 1, "the timeout"
        )
        samples = yield self.scrape()
        self.assertEqual(
            sample(
                samples,
                "ipcd_limits_hit_total",
                limit="max_connections_per_peer",
                listener="tcpd",
            ),
            refused,
        )
        self.assertEqual(
            sample(
                samples,
                "ipcd_handshake_failures_total",
                daemon="tcpd",
                reason="timeout",
            ),
            1,
        )
        self.assertEqual(
            sample(samples, "ipcd_log_lines_dropped_total"), counters[LOG_LINES_DROPPED]
        )

    @inlineCallbacks
    def test_ownRegistry(self) -> Any:
        """
        The service's metrics are in its own registry, not the process's
        global one (two services in one process do not collide).
        """
        other = yield start_ipcd(
            self,
            make_config(
                short_rundir(self, "ipcd-metrics-"), metrics={"listen": LOOPBACK}
            ),
        )
        reply = yield deferToThread(lookup, self.rundir, b"pong")
        reply.close_fds()
        self.assertIsNone(REGISTRY.get_sample_value("ipcd_lookups_total"))
        ok = ("ipcd_lookups_total", {"outcome": "ok", "scheme": "unix"})
        self.assertEqual(self.service.metrics_registry.get_sample_value(*ok), 1)
        self.assertIsNone(other.metrics_registry.get_sample_value(*ok))

    @inlineCallbacks
    def test_connectionsBounded(self) -> Any:
        """
        One address may hold only so many connections to the endpoint; a
        request body over the bound closes the connection.
        """
        held = []
        for _ in range(MAX_CONNECTIONS_PER_PEER):
            held.append(socket.create_connection(("127.0.0.1", self.port), TIMEOUT))
            self.addCleanup(held[-1].close)
        counters = self.service.broker.counters
        more = socket.create_connection(("127.0.0.1", self.port), TIMEOUT)
        self.addCleanup(more.close)
        more.settimeout(TIMEOUT)
        gone = yield deferToThread(more.recv, 1)
        self.assertEqual(gone, b"")
        self.assertEqual(counters["metrics: refused, per-peer limit"], 1)
        for sock in held:
            sock.close()
        limits = self.service.getServiceNamed("metrics").factory.limits
        yield wait_until(lambda: limits.total == 0, "the connections to end")
        body = socket.create_connection(("127.0.0.1", self.port), TIMEOUT)
        self.addCleanup(body.close)
        body.settimeout(TIMEOUT)
        size = MAX_BODY * 4
        head = (
            f"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n"
        ).encode()
        answer = yield deferToThread(_send_and_read, body, head + b"x" * size)
        self.assertEqual(answer, b"")

    @inlineCallbacks
    def test_oneResponsePerConnection(self) -> Any:
        """
        A connection gets one response and is closed: a peer that sends
        requests back to back (pipelined) and reads none cannot make ipcd
        hold a response for each (megabytes for a few KiB sent).
        """
        sock = socket.create_connection(("127.0.0.1", self.port), TIMEOUT)
        self.addCleanup(sock.close)
        sock.settimeout(TIMEOUT)
        requests = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 200
        answer = yield deferToThread(_send_and_read, sock, requests)
        self.assertEqual(answer.count(b"HTTP/1.1 200 OK\r\n"), 1)
        self.assertIn(b"\r\nConnection: close\r\n", answer)
        self.assertIn(b"ipcd_lookups_total", answer)


def _send_and_read(sock: socket.socket, data: bytes) -> bytes:
    """Send C{data} (as much as goes), then read what comes until EOF."""
    try:
        sock.sendall(data)
    except OSError:
        pass
    return recv_eof(sock)


class UdpLimitsTests(TestCase):
    """udpd's limits hit, on a real udpd, from peers on plain UDP sockets."""

    @inlineCallbacks
    def test_sessionsOpenedLately(self) -> Any:
        """
        A HELLO refused because too many sessions were opened while their
        cookies are good counts as udpd's C{sessions_opened_lately} limit
        hit, as C{ipcd status} counts it (it was in neither the scrape nor
        any other series).  The bound (4,096 sessions per address prefix
        per cookie period) is lowered to 2 on the running udpd.
        """
        host = yield start_udp_host(
            self, ["allow in pong"], config={"metrics": {"listen": LOOPBACK}}
        )
        host.server.cookies.per_source = 2
        metrics = yield listening_port(host.service, "metrics")
        counters = host.broker.counters
        key = "udp sessions refused: too many opened lately"
        answers = []
        for _ in range(4):
            sock = udp_socket()
            self.addCleanup(sock.close)
            answer, _ = yield deferToThread(handshake, sock, host.port)
            answers.append(type(answer).__name__)
            if isinstance(answer, udpwire.Accepted):
                # Closed, so that only the cookies' bound refuses the next.
                sock.sendto(udpwire.close(answer.session), ("127.0.0.1", host.port))
                yield wait_until(lambda: not host.sessions(), "the session to end")
        self.assertEqual(answers, ["Accepted", "Accepted", "Refusal", "Refusal"])
        self.assertEqual(counters[key], 2)
        samples = yield deferToThread(scrape, metrics.getHost().port)
        self.assertEqual(
            sample(
                samples,
                "ipcd_limits_hit_total",
                limit="sessions_opened_lately",
                listener="udpd",
            ),
            2,
        )


class IdleTests(TestCase):
    @inlineCallbacks
    def test_idleConnectionsClosedSilently(self) -> Any:
        """
        A connection idle for IDLE_TIMEOUT is closed, and costs no log line
        (twisted.web's own says one per connection: a peer could make ipcd
        write them without bound, MAX_CONNECTIONS at a time).
        """
        self.patch(metricsweb, "IDLE_TIMEOUT", 0.1)
        rundir = short_rundir(self, "ipcd-metrics-")
        config = make_config(rundir, metrics={"listen": LOOPBACK})
        service = yield start_ipcd(self, config)
        metrics = yield listening_port(service, "metrics")
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

        def idle(count: int) -> list[bytes]:
            ends = []
            for _ in range(count):
                address = ("127.0.0.1", metrics.getHost().port)
                with socket.create_connection(address, TIMEOUT) as sock:
                    sock.settimeout(TIMEOUT)
                    ends.append(recv_eof(sock))
            return ends

        ends = yield deferToThread(idle, 10)
        self.assertEqual(ends, [b""] * 10)
        limits = service.getServiceNamed("metrics").factory.limits
        yield wait_until(lambda: limits.total == 0, "the connections to end")
        self.assertEqual([formatEvent(e) for e in logged], [])

    @inlineCallbacks
    def test_requestComesWholeInTime(self) -> Any:
        """
        A request must come whole within IDLE_TIMEOUT of the connect: a
        peer that sends its head a byte at a time, each before the idle
        timeout, is cut at it (twisted.web's timer began again at each
        read, so a byte a minute held one of the listener's 16 places for
        days); the place is given back.
        """
        self.patch(metricsweb, "IDLE_TIMEOUT", 0.5)
        rundir = short_rundir(self, "ipcd-metrics-")
        config = make_config(rundir, metrics={"listen": LOOPBACK})
        service = yield start_ipcd(self, config)
        metrics = yield listening_port(service, "metrics")
        limits = service.getServiceNamed("metrics").factory.limits

        def trickle() -> bool:
            """Whether the peer was cut before TIMEOUT's worth of bytes."""
            address = ("127.0.0.1", metrics.getHost().port)
            with socket.create_connection(address, TIMEOUT) as sock:
                sock.sendall(b"GET /metrics HTTP/1.0\r\nX-Slow: ")
                for _ in range(int(TIMEOUT / 0.05)):
                    time.sleep(0.05)  # pacing: each byte well inside 0.5 s
                    try:
                        sock.sendall(b"x")
                    except OSError:  # reset: cut
                        return True
                    if select.select([sock], [], [], 0)[0]:  # (no wait)
                        try:
                            if sock.recv(1) == b"":
                                return True
                        except OSError:  # reset: cut
                            return True
                return False

        cut = yield deferToThread(trickle)
        self.assertTrue(cut)
        yield wait_until(lambda: limits.total == 0, "the peer to be let go")


class Blocking:
    """A collector whose collect waits (bounded) until C{release} is set."""

    def __init__(self) -> None:
        self.entered = 0
        self.release = threading.Event()

    def collect(self) -> Any:
        self.entered += 1
        self.release.wait(6 * TIMEOUT)
        return iter(())


def _in_thread(work: Callable[[], Any]) -> list[Any]:
    """Run C{work} in a thread of its own (not the reactor's pool): its result."""
    done: list[Any] = []
    threading.Thread(target=lambda: done.append(work()), daemon=True).start()
    return done


def _scrape_from(address: str, port: int) -> bytes:
    with socket.socket() as sock:
        sock.settimeout(6 * TIMEOUT)
        sock.bind((address, 0))
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        return recv_eof(sock)


class ThreadTests(TestCase):
    @inlineCallbacks
    def test_scrapesCannotHoldUpNameLookups(self) -> Any:
        """
        Scrapes run in a thread of the metrics' own: however many are under
        way (here 12, from three addresses, each stuck in a collector), a
        lookup whose route names a host still has it looked up (the
        reactor's thread pool, where names are looked up, is free).
        """
        rundir = short_rundir(self, "ipcd-metrics-")
        config = make_config(
            rundir,
            metrics={"listen": LOOPBACK},
            tcpd={"enabled": True, "listen": LOOPBACK},
            rules=["allow in pong"],
        )
        service = yield start_ipcd(self, config)
        tcpd = yield listening_port(service, "tcpd")
        metrics = yield listening_port(service, "metrics")
        blocking = Blocking()
        service.metrics_registry.register(blocking)
        self.addCleanup(blocking.release.set)
        port = metrics.getHost().port
        scrapes = [
            _in_thread(lambda a=address: _scrape_from(a, port))
            for address in ("127.0.0.2", "127.0.0.3", "127.0.0.4")
            for _ in range(MAX_CONNECTIONS_PER_PEER)
        ]
        limits = service.getServiceNamed("metrics").factory.limits
        yield wait_until(lambda: limits.total == len(scrapes), "every scrape")
        yield wait_until(lambda: blocking.entered, "a scrape in the collector")
        route = f"tcp://localhost:{tcpd.getHost().port}/pong"
        looked_up = _in_thread(lambda: lookup(rundir, f"pong;pong {route}".encode()))
        yield wait_until(lambda: looked_up, "the lookup", timeout=3 * TIMEOUT)
        reply = looked_up[0]
        for sock in reply.fds:
            os.close(sock)
        self.assertEqual(reply.first, b"ok", reply.data)
        blocking.release.set()
        yield wait_until(lambda: all(scrapes), "the scrapes to end", 3 * TIMEOUT)


# A metrics listener stopped while a scrape is under way: the scrape's
# collector is let go just after stopService began, so the scrape's thread
# writes its response through the reactor while the listener stops.
STOP_DURING_SCRAPE = """
import socket, sys, threading
from collections import Counter
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from twisted.internet import reactor
from ipcd.metricsweb import metrics_listener

entered, release = threading.Event(), threading.Event()

class Blocking:
    def collect(self):
        entered.set()
        release.wait(60)
        return iter([GaugeMetricFamily("held", "a scrape's one value", value=1)])

registry = CollectorRegistry()
registry.register(Blocking())
listener = metrics_listener(
    reactor, "tcp:0:interface=127.0.0.1", registry, Counter(), (32, 128)
)

def scrape(port):
    with socket.create_connection(("127.0.0.1", port), 60) as sock:
        sock.sendall(b"GET /metrics HTTP/1.0\\r\\n\\r\\n")
        while sock.recv(65536):
            pass

def stop():
    threading.Timer(0.5, release.set).start()
    stopping = listener.stopService()
    stopping.addBoth(lambda _: (print("stopped", flush=True), reactor.stop()))

def listening(port):
    threading.Thread(target=scrape, args=(port.getHost().port,), daemon=True).start()
    threading.Thread(
        target=lambda: entered.wait(60) and reactor.callFromThread(stop), daemon=True
    ).start()

listener.privilegedStartService()
listener.startService()
listener.listening().addCallback(listening)
reactor.run()
"""


class StopTests(SynchronousTestCase):
    def test_stopDuringAScrape(self) -> None:
        """
        Stopping the listener while a scrape writes its response ends: the
        scrapes' thread is not joined from the reactor's, which that write
        waits for (run in a child, so that a deadlock fails the test).
        """
        try:
            result = subprocess.run(
                [sys.executable, "-c", STOP_DURING_SCRAPE],
                env=python_env(),
                capture_output=True,
                timeout=3 * TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            self.fail("stopping the metrics listener during a scrape never ended")
        self.assertEqual(
            (result.returncode, result.stdout), (0, b"stopped\n"), result.stderr
        )


class TlsHandshakeTests(TestCase):
    @inlineCallbacks
    def test_tlsFailure(self) -> Any:
        """A TLS handshake that fails on tlsd counts as tlsd's, tls_failed."""
        keys = secrets_file(short_rundir(self, "ipcd-keys-"), {"alice": ALICE_KEY})
        host = yield start_tls_host(
            self, {"psk_file": keys}, metrics={"listen": LOOPBACK}
        )
        metrics = yield listening_port(host.service, "metrics")
        with socket.create_connection(("127.0.0.1", host.port), TIMEOUT) as sock:
            sock.settimeout(TIMEOUT)
            yield deferToThread(_send_and_read, sock, b"not TLS at all\r\n" * 10)
        counters = host.service.broker.counters
        yield wait_until(
            lambda: counters["tlsd: TLS handshakes failed"] == 1, "the failure"
        )
        samples = yield deferToThread(scrape, metrics.getHost().port)
        self.assertEqual(
            sample(
                samples,
                "ipcd_handshake_failures_total",
                daemon="tlsd",
                reason="tls_failed",
            ),
            1,
        )


class OffTests(TestCase):
    """Metrics are off unless asked for."""

    @inlineCallbacks
    def test_offByDefault(self) -> Any:
        """No metrics listener, and the broker counts nothing for them."""
        rundir = short_rundir(self, "ipcd-metrics-")
        service = yield start_ipcd(self, make_config(rundir))
        self.assertIsNone(service.config.metrics)
        self.assertIs(service.broker.metrics, NO_METRICS)
        self.assertNotIn("metrics", [child.name for child in service])


class ReloadTests(TestCase):
    @inlineCallbacks
    def test_restartNeeded(self) -> Any:
        """A reload keeps the metrics listener, and says a restart is needed."""
        rundir = short_rundir(self, "ipcd-metrics-")
        listen = [LOOPBACK]

        def load() -> Any:
            return make_config(rundir, metrics={"listen": listen[0]})

        service = yield start_ipcd(self, load(), load)
        listen[0] = "tcp:0:interface=127.0.0.2"
        self.assertEqual(service.reload()["restart_needed"], ["metrics"])
        self.assertEqual(service.config.metrics, LOOPBACK)


class EndpointTests(SynchronousTestCase):
    """What --metrics and [metrics] listen take."""

    def listen(self, value: Any) -> str | None:
        return load_config(
            None, {"rundir": "/x", "metrics": {"listen": value}}, {}
        ).metrics

    def test_barePort(self) -> None:
        """A bare port, or tcp:PORT, listens on 127.0.0.1 only."""
        for value in (9101, "9101", "tcp:9101"):
            self.assertEqual(self.listen(value), "tcp:9101:interface=127.0.0.1")

    def test_inStatus(self) -> None:
        """C{ipcd status} shows where the metrics are served, or None: off."""
        config = load_config(None, {"rundir": "/x", "metrics": {"listen": 9101}}, {})
        self.assertEqual(config_summary(config)["metrics"], config.metrics)
        off = load_config(None, {"rundir": "/x"}, {})
        self.assertIsNone(config_summary(off)["metrics"])

    def test_fullEndpoint(self) -> None:
        """Any other endpoint string is taken as written."""
        for value in ("tcp:9101:interface=0.0.0.0", "tcp6:9101:interface=\\:\\:1"):
            self.assertEqual(self.listen(value), value)

    def test_bad(self) -> None:
        """
        A bad one is a configuration error naming the key; so is a UNIX
        socket, systemd's too (twisted.web's WSGI fails every request from
        one, logging a traceback each time); systemd's INET ones are taken.
        """
        error = self.assertRaises(ConfigError, self.listen, "nonsense:1")
        self.assertIn("[metrics] listen", str(error))
        for unix in (
            "unix:/run/m",
            "systemd:domain=UNIX:index=0",
            "haproxy:unix:/run/m",
            "haproxy:systemd:domain=UNIX:index=0",
        ):
            error = self.assertRaises(ConfigError, self.listen, unix)
            self.assertIn("over TCP, not a UNIX socket", str(error))
        # Only systemd's own domain argument says UNIX (not an interface's
        # name that has the same words in it: an IPv6 address's scope here,
        # as an interface with a ':' that is no IPv6 address is refused).
        for taken in (
            "systemd:domain=INET:index=0",
            "haproxy:tcp:9101:interface=127.0.0.1",
            "tcp:9101:interface=fe80\\:\\:1%a\\:domain=unix",
        ):
            self.assertEqual(self.listen(taken), taken)

    def test_notAString(self) -> None:
        """Neither a port nor a string: a configuration error, not a traceback."""
        for value in (True, 9101.5, [9101], {"port": 9101}):
            error = self.assertRaises(ConfigError, self.listen, value)
            self.assertIn("expected an endpoint string", str(error))


class NetworkOnlyTests(TestCase):
    """
    The metrics' listener, made from an endpoint string the configuration
    would have refused: it listens only on the network, whatever wraps what.
    """

    def listener(self, description: str) -> Any:
        from twisted.internet import reactor

        return metricsweb.metrics_listener(
            reactor, description, metricsweb.CollectorRegistry(), Counter(), (32, 64)
        )

    @inlineCallbacks
    def test_unixRefusedAndClosed(self) -> Any:
        """On a UNIX socket it fails to listen, and nothing is left listening."""
        path = os.path.join(short_rundir(self), "m")
        listener = self.listener(f"unix:{path}")
        error = yield self.assertFailure(listener.listen(), metricsweb.NotOnTheNetwork)
        self.assertIn("served over TCP", str(error))
        self.assertIn(path, str(error))
        probe = socket.socket(socket.AF_UNIX)
        self.addCleanup(probe.close)
        self.assertRaises(OSError, probe.connect, path)

    @inlineCallbacks
    def test_tcpListens(self) -> Any:
        """On TCP it listens, as ever."""
        listener = self.listener("tcp:0:interface=127.0.0.1")
        port = yield listener.listen()
        self.addCleanup(port.stopListening)
        self.assertEqual(port.getHost().host, "127.0.0.1")


def proxied_get(port: int, header: bytes) -> bytes:
    """A scrape at C{port} after PROXY C{header}: all it answers (b"" if cut)."""
    with socket.create_connection(("127.0.0.1", port), TIMEOUT) as sock:
        sock.sendall(header + b"GET /metrics HTTP/1.0\r\n\r\n")
        try:
            return recv_eof(sock)
        except ConnectionResetError:
            return b""


class ProxiedScrapeTests(TestCase):
    """The metrics' listener behind haproxy:tcp: reads PROXY headers as tcpd's."""

    @inlineCallbacks
    def test_headers(self) -> Any:
        """
        A header naming a UNIX socket (no IP address) leaves the proxy's,
        and the scrape is served: Twisted's wrapper made the peer that UNIX
        address, and WSGI answered every such scrape 500 with a traceback.
        A bad header is cut, counted and logged in one line: Twisted's let
        a port 'x' out as a traceback, and took 'evil' as the address.
        """
        from twisted.internet import reactor

        counters: Counter[str] = Counter()
        listener = metricsweb.metrics_listener(
            reactor,
            "haproxy:tcp:0:interface=127.0.0.1",
            metricsweb.CollectorRegistry(),
            counters,
            (32, 64),
        )
        listener.startService()
        self.addCleanup(listener.stopService)
        port = (yield listener.listening()).getHost().port
        lines = logged_lines(self)
        path = b"/run/proxy.sock".ljust(108, b"\0")
        unix = b"\r\n\r\n\x00\r\nQUIT\n\x21\x31" + (216).to_bytes(2, "big")
        answer = yield deferToThread(proxied_get, port, unix + path + path)
        self.assertTrue(answer.startswith(b"HTTP/1.0 200 "), answer[:100])
        for header in (
            b"PROXY TCP4 10.0.0.1 127.0.0.1 x 9101\r\n",
            b"PROXY TCP4 evil 127.0.0.1 5555 9101\r\n",
        ):
            answer = yield deferToThread(proxied_get, port, header)
            self.assertEqual(answer, b"", header)
        self.assertEqual(counters["metrics: refused, bad PROXY header"], 2)
        said = [line for line in lines if "PROXY" in line]
        self.assertEqual(len(said), 2, said)


class DroppedLinesTests(SynchronousTestCase):
    """Log lines a rate limit leaves out are counted."""

    def test_counted(self) -> None:
        counters: Counter[str] = Counter()
        seen: list[Any] = []
        observer = RateLimitedObserver(
            seen.append, Clock(), burst=2, period=10, counters=counters
        )
        for _ in range(5):
            observer({"log_format": "x"})
        self.assertEqual(len(seen), 2)
        self.assertEqual(counters[LOG_LINES_DROPPED], 3)


class CommandLineTests(SynchronousTestCase):
    """The ipcd command with --metrics: where it listens, and its errors."""

    def setUp(self) -> None:
        self.rundir = short_rundir(self, "ipcd-metrics-")
        self.env = python_env()

    def start(self, *args: str) -> tuple[subprocess.Popen[bytes], str]:
        log = os.path.join(self.rundir, "log")
        argv = ["-m", "ipcd.scripts.ipcd", "--rundir", self.rundir, "--no-tcp"]
        argv += ["--no-ws", "--no-tls", *args]
        return spawn(self, argv, log, self.env, self.rundir), log

    def test_barePortOnLoopback(self) -> None:
        """C{--metrics PORT} listens on 127.0.0.1:PORT, and is scraped there."""
        port = free_port()
        process, log = self.start("--metrics", str(port))
        wait_for(lambda: "ipcd: ready" in read_text(log), process, log)
        self.assertIn(f"metrics 127.0.0.1:{port}", read_text(log))
        self.assertEqual(tcp_listeners(process.pid), [("127.0.0.1", port)])
        samples = scrape(port)
        self.assertEqual(sample(samples, "ipcd_log_lines_dropped_total"), 0)

    def test_offListensNowhere(self) -> None:
        """Without --metrics, ipcd (tcpd and websocketd off) has no TCP listener."""
        process, log = self.start()
        wait_for(lambda: "ipcd: ready" in read_text(log), process, log)
        self.assertEqual(tcp_listeners(process.pid), [])

    def test_badEndpoint(self) -> None:
        """A bad endpoint: one line, no traceback, exit status 1."""
        process, log = self.start("--metrics", "nonsense:1")
        self.assertEqual(process.wait(TIMEOUT), 1)
        lines = read_text(log).strip().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("[metrics] listen", lines[0])

    def test_endpointNotMade(self) -> None:
        """
        An endpoint Twisted cannot make at start (systemd passed no socket):
        one line naming it and the way out.
        """
        for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            self.env.pop(name, None)
        process, log = self.start("--metrics", "systemd:domain=INET:index=0")
        self.assertEqual(process.wait(TIMEOUT), 1)
        lines = read_text(log).strip().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertEqual(
            lines[0],
            "ipcd: cannot make the metrics listener 'systemd:domain=INET:index=0': "
            "systemd passed no such socket (use --metrics ENDPOINT or leave it off)",
        )

    def test_portTaken(self) -> None:
        """A port in use: one line naming it and the way out."""
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process, log = self.start("--metrics", str(port))
        self.assertEqual(process.wait(TIMEOUT), 1)
        lines = read_text(log).strip().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn(f"cannot listen on 127.0.0.1:{port}", lines[0])
        self.assertIn("--metrics", lines[0])


def wait_for(predicate: Any, process: subprocess.Popen[bytes], log: str) -> None:
    """Wait (blocking, bounded) until C{predicate}; fail if ipcd exits."""
    deadline = time.monotonic() + TIMEOUT * 3
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"ipcd exited: {read_text(log)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out: {read_text(log)}")
        time.sleep(0.05)
