"""
The websocketc page websocketd serves at C{/}, in a real headless Chromium
(Debian's C{chromium}): it loads, connects to pongd, sends text and binary
and shows the echoes, and shows a refusal for an unknown service.

The test drives the page as a person would, through its fields and buttons,
over Chromium's DevTools protocol, and reads what it shows.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from typing import Any
from urllib.parse import urlsplit
from urllib.request import urlopen

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.python import log
from twisted.trial.unittest import SkipTest, TestCase

from ipcd.test.support import TIMEOUT
from ipcd.test.wssupport import TEXT, start_ws_host, ws_message, ws_open, ws_send


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    raise SkipTest("chromium is not installed (Debian package chromium; .ci/run)")


class Browser:
    """
    Headless Chromium driven over the DevTools protocol (JSON over a
    WebSocket, with the test's own minimal client), from a thread.
    """

    def __init__(self, binary: str, work: str) -> None:
        os.makedirs(work)
        self.log = os.path.join(work, "chromium.log")
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    "--headless",
                    "--no-sandbox",  # tests run as root in CI
                    "--disable-gpu",
                    "--no-first-run",
                    "--window-size=900,560",
                    f"--user-data-dir={os.path.join(work, 'profile')}",
                    "--remote-debugging-address=127.0.0.1",
                    "--remote-debugging-port=0",
                    "about:blank",
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.sock: socket.socket | None = None
        self.ids = 0

    def connect(self) -> None:
        port = int(self._poll(self._devtools_port, "DevTools to listen"))
        targets = self._poll(lambda: self._targets(port), "a page target")
        path = urlsplit(targets[0]["webSocketDebuggerUrl"]).path
        opening = ws_open(port, path)
        if opening.status != 101:
            raise AssertionError(f"DevTools refused: {opening.status} {opening.reason}")
        self.sock = opening.sock

    def _poll(self, probe: Any, what: str) -> Any:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            found = probe()
            if found:
                return found
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        with open(self.log, "rb") as f:
            tail = f.read()[-2000:]
        raise AssertionError(f"chromium: no {what}: {tail!r}")

    def _devtools_port(self) -> str | None:
        with open(self.log, "rb") as f:
            match = re.search(rb"DevTools listening on ws://[^:]+:(\d+)/", f.read())
        return match.group(1).decode() if match else None

    def _targets(self, port: int) -> list[dict[str, Any]]:
        with urlopen(f"http://127.0.0.1:{port}/json/list", timeout=TIMEOUT) as answer:
            return [t for t in json.load(answer) if t.get("type") == "page"]

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; its result (events meanwhile are skipped)."""
        assert self.sock is not None
        self.ids += 1
        message = {"id": self.ids, "method": method, "params": params}
        ws_send(self.sock, json.dumps(message).encode(), TEXT)
        while True:
            _, payload = ws_message(self.sock)
            answer = json.loads(payload)
            if answer.get("id") == self.ids:
                if "error" in answer:
                    raise AssertionError(f"{method}: {answer['error']}")
                return answer["result"]

    def evaluate(self, expression: str) -> Any:
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True
        )
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str) -> Any:
        """Poll a JavaScript expression until it is truthy (bounded)."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"the page did not show {what}: {self.page_state()}")

    def page_state(self) -> Any:
        return self.evaluate(PAGE_STATE)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


# What the page shows: its connection state and its log.
PAGE_STATE = """({
  state: document.getElementById("state").className,
  stateText: document.getElementById("state").textContent,
  log: Array.from(document.querySelectorAll("#log li"),
                  (li) => [li.className, li.textContent]),
})"""


class PageTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def setUp(self) -> Any:
        binary = chromium()
        self.host = yield start_ws_host(self)
        self.browser = Browser(binary, self.mktemp())
        self.addCleanup(self.browser.close)
        yield deferToThread(self.browser.connect)

    def open_page(self) -> None:
        url = f"http://127.0.0.1:{self.host.port}/"
        self.browser.call("Page.enable")
        self.browser.call("Page.navigate", url=url)
        self.browser.wait_for(
            "document.readyState === 'complete' && !!document.getElementById('state')",
            "the page",
        )

    def click(self, button: str) -> None:
        self.browser.evaluate(f"document.getElementById({json.dumps(button)}).click()")

    def type_into(self, field: str, text: str) -> None:
        self.browser.evaluate(
            f"document.getElementById({json.dumps(field)}).value = {json.dumps(text)}"
        )

    @inlineCallbacks
    def test_echoesTextAndBinary(self) -> Any:
        """
        The page loads, connects to pongd with its Connect button, sends
        text then binary with its buttons, and shows both echoes, each as
        the type it was sent; a screenshot is taken of it.
        """

        def drive() -> Any:
            self.open_page()
            self.click("connect")
            self.browser.wait_for(
                "document.getElementById('state').className === 'open'", "open"
            )
            self.type_into("message", "hello")
            self.click("send-text")
            self.browser.wait_for(
                "document.querySelectorAll('#log li').length >= 2", ""
            )
            self.type_into("message", "hi")
            self.click("send-binary")
            self.browser.wait_for(
                "document.querySelectorAll('#log li').length >= 4", ""
            )
            shot = self.browser.call("Page.captureScreenshot", format="png")
            return self.browser.page_state(), base64.b64decode(shot["data"])

        page, png = yield deferToThread(drive)
        self.assertEqual(
            page,
            {
                "state": "open",
                "stateText": "connected to pong",
                "log": [
                    ["sent", "sent text: hello"],
                    ["text", "text reply: hello"],
                    ["sent", "sent binary: 68 69"],
                    ["binary", "binary reply: 68 69 (2 bytes)"],
                ],
            },
        )
        self.assertEqual(png[:8], b"\x89PNG\r\n\x1a\n")
        # Kept for people to look at (the path is in the test log).
        screenshot = os.path.abspath(self.mktemp() + ".png")
        with open(screenshot, "wb") as f:
            f.write(png)
        log.msg(f"websocketc page screenshot: {screenshot}")

    @inlineCallbacks
    def test_showsRefusal(self) -> Any:
        """An unknown service: the page shows the refusal and its state."""

        def drive() -> Any:
            self.open_page()
            self.type_into("service", "nosuch")
            self.click("connect")
            self.browser.wait_for(
                "document.getElementById('state').className === 'error'", "error"
            )
            return self.browser.page_state()

        page = yield deferToThread(drive)
        self.assertEqual(page["stateText"], "refused")
        [(kind, text)] = page["log"]
        self.assertEqual(kind, "error")
        self.assertEqual(
            text,
            'refused: websocketd did not open "nosuch" (unknown service, not '
            "allowed, or unreachable; inbound connections are denied unless the "
            'host\'s ipcd allows them: --allow "in nosuch")',
        )
