"""
ipcd's Prometheus endpoint (C{--metrics ENDPOINT}): L{MetricsCollector}
turns what L{ipcd.metrics.Metrics} counts, the live relays and the status
counters into Prometheus' metric families, in a L{CollectorRegistry} of the
service's own (never the process-wide one: several ipcd services in one
process do not collide); L{metrics_listener} serves it over HTTP with
prometheus_client's WSGI application in a twisted.web L{Site}.

prometheus_client's C{MetricsResource} is that application in a
C{WSGIResource} on the global reactor, imported with it; here it is the
same on the reactor ipcd is given.  The exposition runs in a thread of the
listener's own (C{MetricsResource}'s runs in the reactor's thread pool,
where ipcd's routes have their host names looked up: scrapes, however
many, must not hold those up); the collector reads copies of what the
reactor's thread counts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from io import BytesIO
from threading import Thread
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import make_wsgi_app
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from twisted.web.wsgi import WSGIResource

from ipcd.config import Config
from ipcd.daemons import (
    StartupError,
    cause_hint,
    listener_failure,
    refuse_unfit_adopted,
)
from ipcd.limits import (
    ConnectionLimits,
    LimitedEndpoint,
    LimitedFactory,
    network_peer_key,
)
from ipcd.listener import EndpointListener
from ipcd.listenerkeys import check_listener_key
from ipcd.metrics import LATENCY_BUCKETS, Metrics, add_bytes
from ipcd.proxied import counted_refusals, proxied_endpoint
from ipcd.tlsfactory import tls_listens
from ipcd.wire import LOG_LINES_DROPPED

# The listener's name (in the "ipcd: ready" line, and its limits').
NAME = "metrics"
# The way out when it cannot listen.
HINT = "use --metrics ENDPOINT with another port, or leave --metrics off"
# What one listener serves at once (scrapers are few), and per address.
MAX_CONNECTIONS = 16
MAX_CONNECTIONS_PER_PEER = 4
# Seconds a connection has, from its connect, to send its request whole
# (its TLS handshake included).
IDLE_TIMEOUT = 60.0
# The longest request body read (a scrape is a GET: it has none).
MAX_BODY = 4096

# The status counters (C{ipcd status}) of limits that were hit: the key's
# text after "LISTENER: ", and the setting that was reached.
LISTENER_LIMITS = (
    ("refused, per-peer limit", "max_connections_per_peer"),
    ("paused at the connection limit", "max_connections"),
    ("lookups timed out", "lookup_timeout"),
)
# Counters of limits that are no one listener's: key, listener, setting
# (or the bound's name, where no setting raises it).
OTHER_LIMITS = (
    ("closed over partial-message budget", "all", "partial_message_budget"),
    ("idle connections closed", "all", "idle_timeout"),
    ("control requests timed out", "control", "control_timeout"),
    ("udp sessions refused: too many", "udpd", "max_sessions"),
    # No setting: udpd's bound on sessions opened while their cookies are
    # good (ipcd.daemons.udp.cookie), which keeps a replayed HELLO out.
    (
        "udp sessions refused: too many opened lately",
        "udpd",
        "sessions_opened_lately",
    ),
)
# The status counters of failed handshakes: the key's text after
# "DAEMON: ", and the reason label.
HANDSHAKE_FAILURES = (
    ("handshakes timed out", "timeout"),
    ("TLS handshakes timed out", "tls_timeout"),
    ("TLS handshakes failed", "tls_failed"),
    ("refused, no client certificate or key", "no_client_credentials"),
)


class MetricsCollector:
    """
    A Prometheus collector: C{metrics} (lookups, latency, refusals), the
    live relays of C{metrics.tally}, and from C{counters} the limits hit
    (on the listeners C{listeners()} names), the handshake failures of
    C{daemons} (their sections) and the log lines left out.
    """

    def __init__(
        self,
        metrics: Metrics,
        counters: Counter[str],
        listeners: Callable[[], Iterable[str]],
        daemons: Sequence[str],
    ) -> None:
        self.metrics = metrics
        self.counters = counters
        self.listeners = listeners
        self.daemons = daemons

    def collect(self) -> Iterator[Metric]:
        # Copies, each made in one step: the reactor's thread counts on.
        metrics = self.metrics
        counters = dict(self.counters)
        yield _counter(
            "ipcd_lookups",
            "Local clients' lookups, by outcome (ok, denied, refused, failed) "
            "and the scheme of the route taken.",
            ["outcome", "scheme"],
            metrics.lookups.copy(),
        )
        yield self._latency()
        yield _counter(
            "ipcd_refusals",
            "Requests denied by the rules, by direction and rule number "
            "(as the decision log says it; 'default' when no rule matched).",
            ["direction", "rule"],
            metrics.refusals.copy(),
        )
        yield from self._relays()
        yield self._from_counters(counters)
        failures = CounterMetricFamily(
            "ipcd_handshake_failures",
            "Inbound handshakes that failed, by daemon and reason.",
            labels=["daemon", "reason"],
        )
        for daemon in self.daemons:
            for text, reason in HANDSHAKE_FAILURES:
                count = counters.get(f"{daemon}: {text}")
                if count is not None:
                    failures.add_metric([daemon, reason], count)
        yield failures
        yield CounterMetricFamily(
            "ipcd_log_lines_dropped",
            "Log lines that rate limits left out (each limit says how many).",
            value=counters.get(LOG_LINES_DROPPED, 0),
        )

    def _latency(self) -> Metric:
        buckets = self.metrics.latency.copy()
        cumulative, total = [], 0
        for bound, count in zip(
            [*map(str, LATENCY_BUCKETS), "+Inf"], buckets, strict=True
        ):
            total += count
            cumulative.append((bound, total))
        return HistogramMetricFamily(
            "ipcd_lookup_duration_seconds",
            "Seconds from a local client's lookup to ipcd's answer.",
            buckets=cumulative,
            sum_value=self.metrics.latency_sum,
        )

    def _relays(self) -> Iterator[Metric]:
        # A live relay's counts only grow; once it ends they are carried.
        carried, relays = self.metrics.tally.snapshot()
        live = dict.fromkeys(self.daemons, 0)
        for stats in relays:
            live[stats.daemon] = live.get(stats.daemon, 0) + 1
            add_bytes(carried, stats)
        gauge = GaugeMetricFamily(
            "ipcd_live_relays",
            "Connections relayed now, by daemon.",
            labels=["daemon"],
        )
        for daemon, count in sorted(live.items()):
            gauge.add_metric([daemon], count)
        yield gauge
        yield _counter(
            "ipcd_relayed_bytes",
            "Bytes relayed, by daemon and the side they came from: the client "
            "(the local client or remote peer that asked) or the service.",
            ["daemon", "from"],
            carried,
        )

    def _from_counters(self, counters: dict[str, int]) -> Metric:
        hits = CounterMetricFamily(
            "ipcd_limits_hit",
            "Times a limit was reached, by its setting and listener.",
            labels=["limit", "listener"],
        )
        for listener in sorted(self.listeners()):
            for text, limit in LISTENER_LIMITS:
                count = counters.get(f"{listener}: {text}")
                if count is not None:
                    hits.add_metric([limit, listener], count)
        for key, listener, limit in OTHER_LIMITS:
            count = counters.get(key)
            if count is not None:
                hits.add_metric([limit, listener], count)
        return hits


def _counter(
    name: str, doc: str, labels: list[str], counts: dict[tuple[str, ...], int]
) -> Metric:
    """A counter family: C{counts} by label values, in order."""
    family = CounterMetricFamily(name, doc, labels=labels)
    for values, count in sorted(counts.items()):
        family.add_metric(list(values), count)
    return family


def metrics_registry(collector: MetricsCollector) -> CollectorRegistry:
    """A registry of its own with C{collector} in it."""
    # Described by a collect() at registration (its families are fixed):
    # a scrape for some of them (?name[]=...) finds which to collect.
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)  # type: ignore[arg-type]
    return registry


class _BoundedRequest(Request):
    """A request whose body, if any, is read up to L{MAX_BODY} bytes."""

    _body = 0

    def gotLength(self, length: int | None) -> None:  # noqa: N802 (Twisted's)
        # In memory, never the temporary file twisted.web keeps a long
        # (or chunked) body in.
        self.content = BytesIO()
        if length is not None and length > MAX_BODY:
            self.channel.transport.abortConnection()

    def handleContentChunk(self, data: bytes) -> None:  # noqa: N802 (Twisted's)
        self._body += len(data)
        if self._body > MAX_BODY:
            self.channel.transport.abortConnection()
            return
        super().handleContentChunk(data)


class _QuietChannel(HTTPChannel):
    """
    An HTTP connection that serves one request, which must come within
    L{IDLE_TIMEOUT} of the connect, then closes; it times out without a
    log line.
    """

    def checkPersistence(self, request: Any, version: bytes) -> bool:  # noqa: N802 (Twisted's)
        # Kept alive, a connection's requests sent back to back would each
        # be answered into its buffer whether or not the peer reads (the
        # WSGI response has no back-pressure): megabytes for a few KiB
        # sent.  One response per connection bounds it; a scrape opens one.
        request.responseHeaders.setRawHeaders(b"connection", [b"close"])
        return False

    def resetTimeout(self) -> None:  # noqa: N802 (TimeoutMixin's name)
        # twisted.web's begins the timer again at each read: a peer sending
        # its head a byte a minute held one of the listener's 16 places for
        # days.  The one request must come whole within IDLE_TIMEOUT of the
        # connect (then the timer is off while it is answered).
        pass

    def lineLengthExceeded(self, line: bytes) -> None:  # noqa: N802 (LineReceiver's)
        # LineReceiver's closes the transport with this channel still its
        # producer: over TLS the close waits for the producer to go, and a
        # line over 16 KiB held its place, unanswered, to the deadline.
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        self.loseConnection()  # (the producer first)

    def timeoutConnection(self) -> None:  # noqa: N802 (TimeoutMixin's hook)
        # twisted.web's says a line per connection, two if the peer does not
        # go: a peer's doing, as many as it likes.  After IDLE_TIMEOUT with
        # no whole request, nothing is pending worth a graceful close.
        self.transport.abortConnection()


class _QuietSite(Site):
    """
    A Site that logs no line per request (Prometheus scrapes often), nor
    per idle connection it closes.
    """

    protocol = _QuietChannel
    requestFactory = _BoundedRequest
    noisy = False

    def log(self, request: Any) -> None:
        pass


class MetricsListener(EndpointListener):
    """
    The metrics' listener, and the thread C{pool} its scrapes run in
    (running while it runs); what to do when it cannot listen (L{hint}).
    """

    def __init__(
        self, endpoint: Any, factory: Any, pool: ThreadPool, reactor: Any
    ) -> None:
        super().__init__(endpoint, factory)
        self.pool = pool
        self._reactor = reactor

    def hint(self, error: Exception) -> str:
        # "Another port" fits a port in use, not an address of no interface.
        fitting = cause_hint(error, "use --metrics ENDPOINT", "leave --metrics off")
        return HINT if fitting is None else fitting

    def privilegedStartService(self) -> None:  # noqa: N802 (Twisted's name)
        self._start_pool()  # before it listens: a scrape may come at once
        super().privilegedStartService()

    def startService(self) -> None:  # noqa: N802 (Twisted's name)
        self._start_pool()
        super().startService()

    def _start_pool(self) -> None:
        if not self.pool.started:
            self.pool.start()

    def stopService(self) -> Deferred[Any]:  # noqa: N802 (Twisted's name)
        stopped = maybeDeferred(super().stopService)
        # The pool's thread is joined from a thread of its own, never the
        # reactor's: a scrape under way writes its response through the
        # reactor (WSGI's blockingCallFromThread) and would wait for it
        # forever, and the reactor for the join.
        joined: Deferred[None] = Deferred()

        def join() -> None:
            self.pool.stop()
            self._reactor.callFromThread(joined.callback, None)

        Thread(target=join, name="ipcd-metrics-stop", daemon=True).start()
        return gatherResults([stopped, joined], consumeErrors=True)


class NetworkOnly:
    """
    An endpoint whose listening port must be on the network (IPv4 or IPv6):
    twisted.web's WSGI fails every request from another kind of peer (a
    500, and a traceback logged).  The configuration refuses the UNIX
    endpoints it can name (C{unix:}, C{systemd:domain=UNIX}, C{haproxy:}
    around them); this refuses, once it listens, any other that turns out
    to be one (another plugin's wrapper, say): the port is closed and
    listening fails with L{NotOnTheNetwork}.
    """

    def __init__(self, endpoint: Any) -> None:
        self._endpoint = endpoint

    def listen(self, factory: Any) -> Deferred[Any]:
        def on_the_network(port: Any) -> Any:
            host = port.getHost()
            if isinstance(host, IPv4Address | IPv6Address):
                return port
            refused = NotOnTheNetwork(
                f"metrics are served over TCP, and this endpoint listens on {host}"
            )
            stopped = maybeDeferred(port.stopListening)
            return stopped.addBoth(lambda _: Failure(refused))

        return self._endpoint.listen(factory).addCallback(on_the_network)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._endpoint, name)


class NotOnTheNetwork(ValueError):
    """The metrics' endpoint listens somewhere that is not IPv4 or IPv6."""


def scrape_pool() -> ThreadPool:
    """
    The thread scrapes run in: one (a scrape takes a millisecond or so), of
    their own, so that they queue behind each other, never before the work
    of the reactor's pool (host names looked up for routes).
    """
    return ThreadPool(minthreads=0, maxthreads=1, name="ipcd-metrics")


def metrics_site(reactor: Any, registry: CollectorRegistry, pool: ThreadPool) -> Site:
    """prometheus_client's application for C{registry} at every path."""
    app = make_wsgi_app(registry)
    resource: Resource = WSGIResource(reactor, pool, app)
    return _QuietSite(resource, timeout=IDLE_TIMEOUT, reactor=reactor)


def metrics_listener(
    reactor: Any,
    description: str,
    registry: CollectorRegistry,
    counters: Counter[str],
    peer_prefixes: tuple[int, int],
) -> MetricsListener:
    """
    The listener on C{description} (an endpoint string) serving
    C{registry}, under limits of its own (L{MAX_CONNECTIONS}, per address
    prefix L{MAX_CONNECTIONS_PER_PEER}); a C{ValueError} when Twisted cannot
    make that endpoint, L{ipcd.listenerkeys.UnsafeKey} for an C{ssl:} one
    whose key is no secret, L{StartupError} when it is a C{systemd:} socket
    unfit to listen on (a datagram socket, say).
    """
    check_listener_key(description)
    limits = ConnectionLimits(
        NAME, MAX_CONNECTIONS, MAX_CONNECTIONS_PER_PEER, reactor, counters
    )
    # Behind haproxy:, ipcd reads the PROXY header (Twisted's wrapper let a
    # bad port out as a traceback, and a UNIX socket's header made every
    # scrape a 500 with a traceback: WSGI wants an IP peer).  An ssl: one
    # speaks tlsd's TLS: OpenSSL's connection waits for the peer's first
    # byte (a silent peer held 47 KiB until its deadline).
    endpoint = proxied_endpoint(
        tls_listens(reactor, description), description, counted_refusals(limits)
    )
    refuse_unfit_adopted(
        endpoint,
        f"the metrics listener {description!r}",
        HINT,
    )
    ipv4, ipv6 = peer_prefixes
    pool = scrape_pool()
    factory = LimitedFactory(
        metrics_site(reactor, registry, pool),
        limits,
        peer_key=lambda transport: network_peer_key(transport.getPeer(), ipv4, ipv6),
    )
    listener = MetricsListener(
        NetworkOnly(LimitedEndpoint(endpoint, limits)), factory, pool, reactor
    )
    listener.setName(NAME)
    return listener


def serve_metrics(
    parent: Any,
    config: Config,
    metrics: Metrics,
    counters: Counter[str],
    listeners: Callable[[], Iterable[str]],
) -> CollectorRegistry:
    """
    The metrics' listener on C{config.metrics}, a child of C{parent} (ipcd's
    service tree, on its C{reactor}), serving a registry of its own, which
    is returned; L{StartupError} (one line) when Twisted cannot make that
    endpoint.  C{listeners} names the listeners whose limits are counted.
    """
    collector = MetricsCollector(
        metrics, counters, lambda: [*listeners(), NAME], config.registry.sections
    )
    registry = metrics_registry(collector)
    listen = config.metrics
    try:
        listener = metrics_listener(
            parent.reactor,
            listen,
            registry,
            counters,
            (config.peer_prefix_ipv4, config.peer_prefix_ipv6),
        )
    except StartupError:
        raise
    except Exception as e:
        raise StartupError(
            f"cannot make the metrics listener {listen!r}: "
            f"{listener_failure(listen, e)} (use --metrics ENDPOINT or leave it off)"
        ) from None
    listener.setServiceParent(parent)
    return registry
