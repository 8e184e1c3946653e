"""
A flood of failed TLS handshakes costs ipcd a counter, not the disk: tlsd
logs them at the bounded rate of C{[limits]} refusals, and one more line
says how many it left out.  Real TLS: tlsd's listener with a PSK file, and a
child process that opens 10,000 connections (64 at a time) and sends each
bytes no TLS peer would.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from ipcd.control import format_status, status_report
from ipcd.test.support import (
    TIMEOUT,
    short_rundir,
    wait_rate_limited,
)
from ipcd.test.tlssupport import ALICE_KEY, secrets_file, start_tls_host

FAILURES = 10_000
# Under the listener's per-peer maximum (128), so none is refused for it.
AT_ONCE = 64
MAX_LINES = 50

# Connect, send garbage, read to EOF (or a reset), close; AT_ONCE at a time.
_FLOOD = """
import json, selectors, socket, sys
port, total, at_once = map(int, sys.argv[1:4])
sel = selectors.DefaultSelector()
started = done = errors = 0
def start():
    global started
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex(("127.0.0.1", port))
    sel.register(s, selectors.EVENT_WRITE)
    started += 1
while done < total:
    while started < total and started - done < at_once:
        start()
    for key, events in sel.select(30):
        s = key.fileobj
        try:
            if events & selectors.EVENT_WRITE:
                s.send(b"GET / HTTP/1.0\\r\\n\\r\\n")
                sel.modify(s, selectors.EVENT_READ)
                continue
            if s.recv(65536):
                continue
        except OSError:
            errors += 1
        sel.unregister(s)
        s.close()
        done += 1
print(json.dumps({"done": done, "errors": errors}))
"""


class HandshakeFloodTests(TestCase):
    @inlineCallbacks
    def test_tenThousandFailuresFewLines(self) -> Any:
        keys = secrets_file(short_rundir(self, "ipcd-keys-"), {"alice": ALICE_KEY})
        host = yield start_tls_host(self, {"psk_file": keys}, rules=["allow in pong"])
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        def flood() -> dict[str, int]:
            result = subprocess.run(
                [sys.executable, "-c", _FLOOD, str(host.port)]
                + [str(FAILURES), str(AT_ONCE)],
                capture_output=True,
                text=True,
                timeout=30 * TIMEOUT,
                check=True,
            )
            return json.loads(result.stdout)

        ran = yield deferToThread(flood)
        self.assertEqual(ran["done"], FAILURES)
        failed = "tlsd: TLS handshakes failed"
        # The last summary comes at the end of its period (10 s).
        yield wait_rate_limited(
            host.broker.counters,
            failed,
            events,
            "TLS handshake with",
            FAILURES,
            timeout=3 * TIMEOUT,
        )
        lines = [formatEvent(e) for e in events]
        self.assertLess(len(lines), MAX_LINES, "\n".join(lines))
        summary = "similar log lines left out in 10 s; the last: TLS handshake with"
        self.assertTrue(any(summary in line for line in lines), "\n".join(lines))
        self.assertIn(
            f"  {failed}: {FAILURES}\n", format_status(status_report(host.broker))
        )
