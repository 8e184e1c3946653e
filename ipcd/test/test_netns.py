"""
Two hosts for real: each C{twistd -n ipcd} in its own network namespace,
joined by a veth pair (link-local IPv4, or IPv6 ULA, on the veth only).  A
client on host A reaches pongd on host B through a C{tcp://} route.

Needs root and a working C{ip netns}; skipped with the reason otherwise.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from ipcd.test.support import (
    REPO,
    TIMEOUT,
    accepts,
    python_env,
    read_text,
    short_rundir,
)

# twisted.scripts.twistd has no __main__ block: call its run().
TWISTD = ["-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile="]
PORT = 9000
_names = itertools.count()


def ip(*args: str) -> subprocess.CompletedProcess[str]:
    """Run C{ip ARGS}; a failure raises with ip's own message."""
    result = subprocess.run(
        ["ip", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    if result.returncode:
        raise OSError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def poll(predicate: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    """Wait (blocking, bounded) until C{predicate} is true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def spawn_in(case: SynchronousTestCase, ns: str, args: list[str], log_path: str) -> Any:
    """
    C{sys.executable ARGS} in namespace C{ns}, from the repository root (so
    twistd finds C{twisted/plugins/ipcd_plugin.py}); stopped after.
    C{ip netns exec} execs the command: the process is Python itself.
    """
    log = open(log_path, "wb")
    case.addCleanup(log.close)
    process = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, *args],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=python_env(),
        cwd=REPO,
    )

    def stop() -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(TIMEOUT)
                return
            except subprocess.TimeoutExpired:
                process.kill()
        process.wait(TIMEOUT)

    case.addCleanup(stop)
    return process


def pong_in(ns: str, rundir: str, route: str, *words: str) -> Any:
    """The C{pong} command in namespace C{ns} with C{IPC_NETWORK=route}."""
    return subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "ipcd.scripts.pong", *words],
        capture_output=True,
        env=python_env(IPC_NETWORK=route, RUNDIR=rundir),
        cwd=REPO,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


class NamespacePair:
    """
    Namespaces C{A} and C{B} joined by a veth pair; C{ADDRESS_A} and
    C{ADDRESS_B} (with C{PREFIX}) on its two ends, C{link_a} and C{link_b}.
    """

    ADDRESS_A: str
    ADDRESS_B: str
    PREFIX: int

    def setUp(self: Any) -> None:
        if os.geteuid() != 0:
            raise SkipTest("network namespaces need root")
        if shutil.which("ip") is None:
            raise SkipTest("network namespaces need iproute2's ip command")
        tag = f"{os.getpid() % 100000}{next(_names)}"
        self.ns_a, self.ns_b = f"ipcd-a{tag}", f"ipcd-b{tag}"
        try:
            ip("netns", "add", self.ns_a)
        except (OSError, subprocess.SubprocessError) as e:
            raise SkipTest(f"cannot create a network namespace: {e}")
        self.addCleanup(ip, "netns", "del", self.ns_a)
        try:
            ip("netns", "add", self.ns_b)
            self.addCleanup(ip, "netns", "del", self.ns_b)
            # Interface names: at most 15 bytes.
            veth_a = ["link", "add", f"va{tag}", "netns", self.ns_a, "type", "veth"]
            ip(*veth_a, "peer", "name", f"vb{tag}", "netns", self.ns_b)
        except (OSError, subprocess.SubprocessError) as e:
            raise SkipTest(f"cannot join network namespaces with veth: {e}")
        extra = ["nodad"] if ":" in self.ADDRESS_A else []
        for ns, link, address in [
            (self.ns_a, f"va{tag}", self.ADDRESS_A),
            (self.ns_b, f"vb{tag}", self.ADDRESS_B),
        ]:
            ip("-n", ns, "link", "set", "lo", "up")
            cidr = f"{address}/{self.PREFIX}"
            ip("-n", ns, "address", "add", cidr, "dev", link, *extra)
            ip("-n", ns, "link", "set", link, "up")
        self.link_a, self.link_b = f"va{tag}", f"vb{tag}"
        self.work = short_rundir(self, "ipcd-ns-")

    def twistd(self: Any, ns: str, name: str, *options: str) -> Any:
        """C{twistd -n ipcd} in namespace C{ns}, run from the repository."""
        rundir = os.path.join(self.work, name)
        os.mkdir(rundir)
        log = os.path.join(self.work, f"{name}.log")
        args = [*TWISTD, "ipcd", "--rundir", rundir, *options]
        return spawn_in(self, ns, args, log), rundir, log

    def started(self: Any, process: Any, log: str, rundir: str, *names: str) -> None:
        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(
                    f"twistd exited with {process.returncode}:\n{read_text(log)}"
                )
            return all(accepts(os.path.join(rundir, name)) for name in names)

        poll(ready, f"twistd ipcd to listen in {rundir}")


class TwoNamespacesMixin(NamespacePair):
    """A client on host A reaches pongd on host B (both addresses routed)."""

    def start_hosts(self: Any, *options_b: str) -> tuple[str, str, str, str]:
        """
        Host B (pongd; tcpd on its veth address) and host A (no pongd; tcpd
        on its own loopback, for its outbound transport); return the route
        to B's pongd, A's RUNDIR, and both logs.
        """
        escaped = self.ADDRESS_B.replace(":", "\\:")
        kind = "tcp6" if ":" in self.ADDRESS_B else "tcp"
        listen_b = f"{kind}:{PORT}:interface={escaped}"
        b, rundir_b, log_b = self.twistd(self.ns_b, "b", "--tcp", listen_b, *options_b)
        listen_a = f"tcp:{PORT}:interface=127.0.0.1"
        a, rundir_a, log_a = self.twistd(
            self.ns_a, "a", "--no-pongd", "--tcp", listen_a
        )
        self.started(b, log_b, rundir_b, "ipc", "pong", "tcp")
        self.started(a, log_a, rundir_a, "ipc", "tcp")
        host = f"[{self.ADDRESS_B}]" if ":" in self.ADDRESS_B else self.ADDRESS_B
        return f"pong tcp://{host}:{PORT}/pong", rundir_a, log_a, log_b

    def test_pongAcrossNamespaces(self: Any) -> None:
        """
        C{IPC_NETWORK="pong tcp://ADDRESS_B:9000/pong" pong} in namespace A
        reaches host B's pongd (A runs none), and B saw the peer at A's veth
        address.
        """
        route, rundir_a, log_a, log_b = self.start_hosts("--allow", "in pong")
        result = pong_in(self.ns_a, rundir_a, route, "hello", "over", "veth")
        self.assertEqual(
            (result.returncode, result.stdout, result.stderr),
            (0, b"hello over veth\n", b""),
            f"host A:\n{read_text(log_a)}\nhost B:\n{read_text(log_b)}",
        )
        poll(
            lambda: (
                f"for {self.ADDRESS_A}" in read_text(log_b)
                or f"for [{self.ADDRESS_A}]" in read_text(log_b)
            ),
            "host B to log the peer's address",
            TIMEOUT,
        )

    def test_deniedAcrossNamespaces(self: Any) -> None:
        """
        Without C{--allow in pong}, B refuses: A's client says B refused
        (all B tells a remote peer), B's log says why.
        """
        route, rundir_a, log_a, log_b = self.start_hosts()
        result = pong_in(self.ns_a, rundir_a, route, "hello")
        self.assertEqual(result.returncode, 1, result)
        self.assertIn(b"refused 'pong': refused\n", result.stderr)
        poll(
            lambda: "denied by default" in read_text(log_b),
            "host B to log why",
            TIMEOUT,
        )


class IPv4NamespaceTests(TwoNamespacesMixin, SynchronousTestCase):
    ADDRESS_A = "169.254.77.1"
    ADDRESS_B = "169.254.77.2"
    PREFIX = 30


class IPv6NamespaceTests(TwoNamespacesMixin, SynchronousTestCase):
    ADDRESS_A = "fd00:77::1"
    ADDRESS_B = "fd00:77::2"
    PREFIX = 64


# A raw tcpd request from namespace A to B's link-local address, out of A's
# end of the veth (argv: address, port, interface): tcpd's two-byte answer.
_LINK_LOCAL_REQUEST = """
import socket, sys
address, port, link = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with socket.socket(socket.AF_INET6) as s:
    s.settimeout(30)
    s.connect((address, port, 0, socket.if_nametoindex(link)))
    s.sendall(b"pong")
    answer = b""
    while len(answer) < 2:
        chunk = s.recv(2 - len(answer))
        if not chunk:
            break
        answer += chunk
sys.stdout.write(answer.decode("ascii", "replace"))
"""


class LinkLocalZoneTests(NamespacePair, SynchronousTestCase):
    """
    A link-local peer is labelled with its zone (C{ip:fe80::1%vbN}, the
    interface B saw it on), and an C{ip:} network with a zone
    (C{ip:fe80::%eth0/64}) matches only peers of that interface: any host
    on any link may take any link-local address, so the zone is all that
    tells them apart.  It was left out of the match: a rule for one
    interface's peers matched every interface's.
    """

    ADDRESS_A = "fe80::1"
    ADDRESS_B = "fe80::2"
    PREFIX = 64

    def answer(self, port: int, *rules: str) -> tuple[str, str]:
        """Host B's tcpd with C{rules} on C{port}: its answer to A's request."""
        options = [f"--{action}={rule}" for action, rule in rules]
        name = f"b{port}"
        b, rundir_b, log_b = self.twistd(
            self.ns_b, name, "--tcp", f"tcp6:{port}:interface=\\:\\:", *options
        )
        self.started(b, log_b, rundir_b, "ipc", "pong", "tcp")
        done = subprocess.run(
            ["ip", "netns", "exec", self.ns_a, sys.executable, "-c"]
            + [_LINK_LOCAL_REQUEST, self.ADDRESS_B, str(port), self.link_a],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        self.assertEqual(done.stderr, "")
        return done.stdout, read_text(log_b)

    def test_otherInterfacesPeersNotAllowed(self) -> None:
        """C{allow in pong ip:fe80::%lo/64}: a peer on the veth is not let in."""
        answer, log = self.answer(PORT, ("allow", "in pong ip:fe80::%lo/64"))
        self.assertEqual(answer, "ne", log)
        # The zone B saw it on, in the refusal's line: B may write it after
        # its answer, so the log is read again until it has it (bounded).
        zone = f"%{self.link_b}]:"
        deadline = time.monotonic() + TIMEOUT
        while zone not in log and time.monotonic() < deadline:
            time.sleep(0.05)
            log = read_text(os.path.join(self.work, f"b{PORT}.log"))
        self.assertIn(zone, log)

    def test_thisInterfacesPeersMatched(self) -> None:
        """
        A deny for another interface's peers does not refuse this one's; an
        allow for this one's lets it in.
        """
        answer, log = self.answer(
            PORT + 1,
            ("deny", "in pong ip:fe80::%lo/64"),
            ("allow", f"in pong ip:fe80::%{self.link_b}/64"),
        )
        self.assertEqual(answer, "ok", log)


# From namespace A, to B's link-local address out of each of A's two links
# (argv: address, port, link 1, link 2): tcpd's answers to a request on link
# 1 (kept open), another on link 1, and one on link 2.
_TWO_LINKS_REQUESTS = """
import socket, sys
address, port, link1, link2 = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
held = []
def ask(link):
    s = socket.socket(socket.AF_INET6)
    held.append(s)
    s.settimeout(30)
    s.connect((address, port, 0, socket.if_nametoindex(link)))
    s.sendall(b"pong")
    answer = b""
    while len(answer) < 2:
        chunk = s.recv(2 - len(answer))
        if not chunk:
            break
        answer += chunk
    return answer.decode("ascii", "replace")
sys.stdout.write(" ".join([ask(link1), ask(link1), ask(link2)]))
"""


class TwoLinks(NamespacePair):
    """
    Two links between A and B (veth pairs C{link_a}-C{link_b} and
    C{link_a2}-C{link_b2}), A at fe80::1 and B at fe80::2 on both.
    """

    ADDRESS_A = "fe80::1"
    ADDRESS_B = "fe80::2"
    PREFIX = 64

    def setUp(self) -> None:
        super().setUp()
        tag = self.link_a[2:]
        self.link_a2, self.link_b2 = f"wa{tag}", f"wb{tag}"
        ip(
            *["link", "add", self.link_a2, "netns", self.ns_a, "type", "veth"],
            *["peer", "name", self.link_b2, "netns", self.ns_b],
        )
        for ns, link, address in [
            (self.ns_a, self.link_a2, self.ADDRESS_A),
            (self.ns_b, self.link_b2, self.ADDRESS_B),
        ]:
            cidr = f"{address}/{self.PREFIX}"
            ip("-n", ns, "address", "add", cidr, "dev", link, "nodad")
            ip("-n", ns, "link", "set", link, "up")


class LinkLocalPeerKeyTests(TwoLinks, SynchronousTestCase):
    """
    B's tcpd counts a link-local peer on its link (C{ip:fe80::%vbN/64}),
    so A's peer on one link at its C{max_connections_per_peer} leaves the
    other link's its share.  Without the zone both were C{ip:fe80::/64},
    with every link-local peer of every interface: one used up all the
    others' share.
    """

    def test_eachLinkItsShare(self) -> None:
        config = os.path.join(self.work, "b.toml")
        with open(config, "w") as f:
            f.write("[limits]\nmax_connections_per_peer = 1\n")
        b, rundir_b, log_b = self.twistd(
            self.ns_b,
            "b",
            "--config",
            config,
            "--tcp",
            f"tcp6:{PORT}:interface=\\:\\:",
            "--allow=in pong",
        )
        self.started(b, log_b, rundir_b, "ipc", "pong", "tcp")
        done = subprocess.run(
            ["ip", "netns", "exec", self.ns_a, sys.executable, "-c"]
            + [_TWO_LINKS_REQUESTS, self.ADDRESS_B, str(PORT)]
            + [self.link_a, self.link_a2],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        self.assertEqual(done.stderr, "")
        log = read_text(log_b)
        # Its link's share used up; the other link's peer is another peer.
        self.assertEqual(done.stdout, "ok ne ok", log)
        self.assertIn(f"too many connections from ip:fe80::%{self.link_b}/64", log)


# udpd sessions from namespace A to B's udpd (argv: port, then LINK:TO for
# each session, in order: its HELLOs out of LINK to TO, fe80::2 or all
# nodes' ff02::1, its DATA to fe80::2): each answer's kind (OK, NO) and its
# echo or reason; each session is kept open until all are tried, then
# closed.
_UDP_SESSIONS = """
import secrets, socket, sys
from ipcd.daemons.udp import wire
port = int(sys.argv[1])
opened, said = [], []
def session(link, to):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.settimeout(5)
    scope = socket.if_nametoindex(link)
    b = ("fe80::2", port, 0, scope)
    nonce = secrets.token_bytes(8)
    hello = wire.hello(nonce, b"pong")
    for _ in range(10):
        s.sendto(hello, (to, port, 0, scope))
        try:
            answer = wire.decode(s.recv(65536))
        except TimeoutError:
            continue
        if isinstance(answer, wire.Verify):
            hello = wire.hello(nonce, b"pong", answer.cookie)
        elif isinstance(answer, wire.Refusal):
            return "NO:" + answer.reason
        else:
            s.sendto(wire.data(answer.session, 0, b"hi"), b)
            echo = wire.decode(s.recv(65536)).payload.decode()
            opened.append((s, wire.close(answer.session), b))
            return "OK:" + echo
    return "nothing"
for each in sys.argv[2:]:
    said.append(session(*each.split(":", 1)))
for s, close, b in opened:
    s.sendto(close, b)
sys.stdout.write(" ".join(said))
"""


class UdpLinkLocalTests(TwoLinks, SynchronousTestCase):
    """
    udpd keeps a link-local peer's zone, as tcpd does: B's rules for one
    link's peers (C{ip:fe80::%vbN/64}) match them and no others, its limits
    count them on their link, and what answers them goes out that link,
    where Twisted's UDP port gave udpd the address alone: every link's
    peers were one (C{ip:fe80::/64}), a zoned rule matched them all, and
    an answer went out the link the kernel's routes put first.
    """

    def sessions(
        self, allowed: list[str], *sessions: str, interface: str = "::"
    ) -> tuple[str, str]:
        """
        B's udpd on C{interface} (one session per prefix, C{allow in pong}
        for each of the links C{allowed}), then C{sessions} from A: A's
        answers, B's log.
        """
        config = os.path.join(self.work, "b.toml")
        with open(config, "w") as f:
            f.write("[limits]\nmax_connections_per_peer = 1\n")
        rules = [f"--allow=in pong ip:fe80::%{link}/64" for link in allowed]
        b, rundir_b, log_b = self.twistd(
            self.ns_b,
            "b",
            *["--config", config, "--no-tcp"],
            *["--udp", f"udp:{PORT}:interface={interface}"],
            *rules,
        )
        self.started(b, log_b, rundir_b, "ipc", "pong", "udp")
        done = subprocess.run(
            ["ip", "netns", "exec", self.ns_a, sys.executable, "-c"]
            + [_UDP_SESSIONS, str(PORT), *sessions],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
            env=python_env(),
            cwd=REPO,
        )
        self.assertEqual(done.stderr, "")
        return done.stdout, read_text(log_b)

    def test_eachLinkItsShare(self) -> None:
        """
        Allowed on link 1, where the peer's share is soon used up; link 2's
        peer is another, and its HELLO to all nodes is answered out of
        link 2.
        """
        answers, log = self.sessions(
            [self.link_b, self.link_b2],
            f"{self.link_a}:fe80::2",
            f"{self.link_a}:fe80::2",
            f"{self.link_a2}:ff02::1",
        )
        self.assertEqual(answers, "OK:hi NO:busy OK:hi", log)
        self.assertIn(f"too many connections from ip:fe80::%{self.link_b}/64", log)
        self.assertIn(f"%{self.link_b2}]", log)

    def test_otherLinksRuleDoesNotMatch(self) -> None:
        """A rule for link 1's peers lets them in, not link 2's."""
        answers, log = self.sessions(
            [self.link_b], f"{self.link_a2}:fe80::2", f"{self.link_a}:fe80::2"
        )
        self.assertEqual(answers, "NO:refused OK:hi", log)

    def test_listenerOnOneLinksAddress(self) -> None:
        """
        C{udp:PORT:interface=fe80::2%vbN} listens on that link's address
        (Twisted's bind left out the zone's scope id: ipcd did not start,
        'invalid argument'), and its log line and ready line say so, with
        the zone (they said C{[fe80::2]:9000}, any link's address: Twisted's
        UDP port leaves the scope id out of getHost()).
        """
        answers, log = self.sessions(
            [self.link_b2],
            f"{self.link_a2}:fe80::2",
            interface=f"fe80::2%{self.link_b2}",
        )
        self.assertEqual(answers, "OK:hi", log)
        where = f"[fe80::2%{self.link_b2}]:{PORT}"
        self.assertIn(f"udpd listening on {where}\n", log)
        self.assertIn(f"udpd {where}", log)  # the ready line

    def test_linkNamedInDigits(self) -> None:
        """
        A link whose interface is named in digits (link 2's, renamed so)
        is known by its index, as a rule reads such a zone: its peer is
        answered out of it, and matched by a rule for that index.  (Its
        answers went by the interface whose index its name spelled, none
        here: A got nothing.)
        """
        digits = "9" + self.link_b2[2:]
        ip("-n", self.ns_b, "link", "set", self.link_b2, "down")
        ip("-n", self.ns_b, "link", "set", self.link_b2, "name", digits)
        ip("-n", self.ns_b, "link", "set", digits, "up")
        cidr = f"{self.ADDRESS_B}/{self.PREFIX}"
        ip("-n", self.ns_b, "address", "replace", cidr, "dev", digits, "nodad")
        shown = ip("-n", self.ns_b, "-o", "link", "show", digits).stdout
        index = shown.split(":", 1)[0]
        answers, log = self.sessions([index], f"{self.link_a2}:fe80::2")
        self.assertEqual(answers, "OK:hi", log)
        self.assertIn(f"%{index}]", log)


# In one namespace, a dial out of one end of a veth pair to the address of
# its other end (argv: the two ends, the second's address): the zones of
# the dial's local end and of the peer its listener sees, and whether
# ipcd.owndials knows that peer for the dial (tcpd's dial holds its
# getsockname(); the peer is named as Twisted names it, by getnameinfo).
_CROSS_LINK_DIAL = """
import socket, sys
from ipcd.owndials import OwnDials, address_of
out, into, address = sys.argv[1], sys.argv[2], sys.argv[3]
listener = socket.socket(socket.AF_INET6)
listener.bind(("::", 0))
listener.listen(1)
port = listener.getsockname()[1]
dial = socket.socket(socket.AF_INET6)
dial.settimeout(30)
dial.connect((address, port, 0, socket.if_nametoindex(out)))
own = OwnDials()
own.add(dial.getsockname())
listener.settimeout(30)
accepted, peer = listener.accept()
host = socket.getnameinfo(peer, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)[0]
names = {socket.if_nametoindex(out): out, socket.if_nametoindex(into): into}
print(names[dial.getsockname()[3]], host, address_of(host, peer[1]) in own)
"""


class OwnDialsAcrossLinksTests(SynchronousTestCase):
    """
    A self-dial may leave by one interface and come back in by another of
    the same link (a veth pair with both ends here, two NICs on one
    switch): its two ends' zones differ.  ipcd.owndials keeps ends without
    their zone so that such a dial is still known as this ipcd's own (a
    loop through it is refused, not routed round 128 times); a peer of
    another link with the same link-local address and port as a dial in
    flight is taken for one of ours, which costs only that peer's own
    request routed on.
    """

    def setUp(self) -> None:
        if os.geteuid() != 0:
            raise SkipTest("network namespaces need root")
        if shutil.which("ip") is None:
            raise SkipTest("network namespaces need iproute2's ip command")
        tag = f"{os.getpid() % 100000}{next(_names)}"
        self.ns = f"ipcd-o{tag}"
        try:
            ip("netns", "add", self.ns)
        except (OSError, subprocess.SubprocessError) as e:
            raise SkipTest(f"cannot create a network namespace: {e}")
        self.addCleanup(ip, "netns", "del", self.ns)
        self.out, self.into = f"oa{tag}", f"ob{tag}"
        ip("-n", self.ns, "link", "add", self.out, "type", "veth", "peer", self.into)
        for link, address in [(self.out, "fe80::2"), (self.into, "fe80::3")]:
            ip("-n", self.ns, "address", "add", f"{address}/64", "dev", link, "nodad")
            ip("-n", self.ns, "link", "set", link, "up")

    def test_selfDialAcrossLinksKnown(self) -> None:
        done = subprocess.run(
            ["ip", "netns", "exec", self.ns, sys.executable, "-c", _CROSS_LINK_DIAL]
            + [self.out, self.into, "fe80::3"],
            capture_output=True,
            text=True,
            timeout=60,
            env=python_env(),
            stdin=subprocess.DEVNULL,
        )
        self.assertEqual(done.stderr, "")
        # Out of one end, in at the other: two zones, one dial of ours.
        self.assertEqual(
            done.stdout.split(), [self.out, f"fe80::2%{self.into}", "True"]
        )


def _interface_index(ns: str, link: str) -> int:
    """The index of interface C{link} in namespace C{ns}."""
    return int(ip("-n", ns, "-o", "link", "show", "dev", link).stdout.split(":")[0])


class ZonedRouteTests(TwoLinks, SynchronousTestCase):
    """
    Routes to a link-local address name its link: C{tcp://[fe80::2%LINK]},
    C{udp://}, C{tls://}, C{ws://}, by interface name or index.  Host A reaches host
    B's pongd at fe80::2 out of the link the zone names; B lets in only
    the peers of its end of that link, so a route that left by the other
    link (fe80::2 is B's address on both) would be refused.  The route
    parser refused the zone ('invalid host'), and a connect without the
    zone's scope id is refused by the kernel (EINVAL).
    """

    def start_hosts(self) -> tuple[str, str, str]:
        """
        B (tcpd, udpd, tlsd, websocketd on ::) and A (no pongd): A's RUNDIR,
        both logs.
        """
        psk = os.path.join(self.work, "psk")
        with open(psk, "w") as f:
            f.write("alice:00112233445566778899aabbccddeeff\n")
        os.chmod(psk, 0o600)
        any_address = "\\\\:\\\\:"  # (TOML's escape of the endpoint's '\:')
        config_b = os.path.join(self.work, "b.toml")
        with open(config_b, "w") as f:
            f.write(
                f'rules = ["allow in pong ip:fe80::%{self.link_b2}/64"]\n'
                f'[tcpd]\nlisten = "tcp6:{PORT}:interface={any_address}"\n'
                f'[udpd]\nenabled = true\nlisten = "udp:{PORT}:interface=::"\n'
                f'[tlsd]\nenabled = true\npsk_file = "{psk}"\n'
                f'listen = "tcp6:{PORT + 1}:interface={any_address}"\n'
                f'[websocketd]\nlisten = "tcp6:{PORT + 2}:interface={any_address}"\n'
            )
        config_a = os.path.join(self.work, "a.toml")
        with open(config_a, "w") as f:
            f.write(
                f'[tcpd]\nlisten = "tcp:{PORT}:interface=127.0.0.1"\n'
                '[udpd]\nenabled = true\nlisten = "udp:9000"\n'
                f'[tlsd]\nenabled = true\npsk_file = "{psk}"\n'
                'psk_identity = "alice"\n'
                f'listen = "tcp:{PORT + 1}:interface=127.0.0.1"\n'
            )
        b, rundir_b, log_b = self.twistd(self.ns_b, "b", "--config", config_b)
        a, rundir_a, log_a = self.twistd(
            self.ns_a, "a", "--no-pongd", "--config", config_a
        )
        self.started(b, log_b, rundir_b, "ipc", "pong", "tcp", "udp", "tls", "ws")
        self.started(a, log_a, rundir_a, "ipc", "tcp", "udp", "tls", "ws")
        return rundir_a, log_a, log_b

    def assert_over_second_link(self, rundir_a: str, log_a: str, log_b: str) -> None:
        """Every scheme's route by A's second link's name and index leaves by it."""
        index = _interface_index(self.ns_a, self.link_a2)
        schemes = [("tcp", PORT), ("udp", PORT), ("tls", PORT + 1), ("ws", PORT + 2)]
        for scheme, port in schemes:
            for zone in (self.link_a2, str(index)):
                route = f"pong {scheme}://[fe80::2%{zone}]:{port}/pong"
                result = pong_in(self.ns_a, rundir_a, route, "over", zone)
                self.assertEqual(
                    (result.returncode, result.stdout, result.stderr),
                    (0, f"over {zone}\n".encode(), b""),
                    f"{route}\nhost A:\n{read_text(log_a)}\nB:\n{read_text(log_b)}",
                )

    def test_zonedRoutes(self) -> None:
        rundir_a, log_a, log_b = self.start_hosts()
        self.assert_over_second_link(rundir_a, log_a, log_b)
        # The other link's peers are refused: the zone chose the link.
        route = f"pong tcp://[fe80::2%{self.link_a}]:{PORT}/pong"
        result = pong_in(self.ns_a, rundir_a, route, "hello")
        self.assertEqual(result.returncode, 1, result)
        self.assertIn(b"refused 'pong': refused\n", result.stderr)

    def test_interfaceNamedAsAnIndex(self) -> None:
        """
        A's first link named as its second's index: a route by the second's
        name or index still leaves by the second, for every scheme.  tls://
        and ws:// gave getaddrinfo the zone as an index, which it reads as
        an interface's name first: they left by the first link (as ip and
        ping would take '%7'), where tcp:// and the rules read an index,
        and B refused them.
        """
        index = _interface_index(self.ns_a, self.link_a2)
        self.rename(self.ns_a, self.link_a, str(index), self.ADDRESS_A)
        rundir_a, log_a, log_b = self.start_hosts()
        self.assert_over_second_link(rundir_a, log_a, log_b)

    def test_peerOfInterfaceNamedAsAnIndex(self) -> None:
        """
        B's first link named as its second's index: B's rule for its second
        link (C{ip:fe80::%SECOND/64}) still refuses the first link's peers,
        over tcp, tls and ws.  Twisted names a TCP peer's zone by the
        interface's name ('7'), which the rule read as index 7, the second
        link's: A got in by the first link.
        """
        index = _interface_index(self.ns_b, self.link_b2)
        self.rename(self.ns_b, self.link_b, str(index), self.ADDRESS_B)
        rundir_a, log_a, log_b = self.start_hosts()
        for scheme, port in [("tcp", PORT), ("tls", PORT + 1), ("ws", PORT + 2)]:
            route = f"pong {scheme}://[fe80::2%{self.link_a}]:{port}/pong"
            result = pong_in(self.ns_a, rundir_a, route, "hello")
            self.assertEqual(result.returncode, 1, (result, read_text(log_b)))
            self.assertTrue(result.stderr.endswith(b": refused\n"), result)
        self.assert_over_second_link(rundir_a, log_a, log_b)

    def rename(self, ns: str, link: str, name: str, address: str) -> None:
        """Name C{link} of namespace C{ns} C{name}, its C{address} kept."""
        ip("-n", ns, "link", "set", link, "down")
        ip("-n", ns, "link", "set", link, "name", name)
        cidr = f"{address}/{self.PREFIX}"
        ip("-n", ns, "address", "replace", cidr, "dev", name, "nodad")
        ip("-n", ns, "link", "set", name, "up")

    def test_noSuchInterface(self) -> None:
        """A zone that names no interface of A: one line, A keeps serving."""
        rundir_a, log_a, log_b = self.start_hosts()
        route = f"pong tcp://[fe80::2%nosuch0]:{PORT}/pong"
        result = pong_in(self.ns_a, rundir_a, route, "hello")
        self.assertEqual(result.returncode, 1, result)
        self.assertIn(b"no interface 'nosuch0'", result.stderr)
        route = f"pong tcp://[fe80::2%{self.link_a2}]:{PORT}/pong"
        result = pong_in(self.ns_a, rundir_a, route, "again")
        self.assertEqual(result.stdout, b"again\n", result)
