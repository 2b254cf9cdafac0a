"""A small Chrome DevTools Protocol client: headless Chromium driven over a loopback WebSocket.

:class:`HeadlessChromium` starts ``chromium --headless=new`` in its own process group with a
throw-away profile and ``--remote-debugging-port=0``, reads the port Chromium chose from
``<profile>/DevToolsActivePort``, finds the page target on ``127.0.0.1`` and talks to it with
``websocket-client``. Events are kept, so a test can read the console errors, uncaught
exceptions and every URL the page requested. The browser resolves no host name (every name
maps to nothing) and is killed with its whole process group on leaving, also after a failure.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
import websocket

from tests.shared_data import in_ci

CHROMIUM = "chromium"
START_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 30.0
LOOPBACK = "127.0.0.1"
WINDOW = (1400, 900)
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--remote-debugging-port=0",
    f"--remote-debugging-address={LOOPBACK}",
    "--no-first-run",
    "--disable-extensions",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--metrics-recording-only",
    "--host-resolver-rules=MAP * ~NOTFOUND",
    f"--window-size={WINDOW[0]},{WINDOW[1]}",
)
LOCAL_SCHEMES = ("file:", "data:", "about:")
"""The only URLs the page may request: it must work from a file share with no network."""


def chromium_binary() -> str:
    """The ``chromium`` binary; fails under CI=true and skips elsewhere when it is missing."""
    found = shutil.which(CHROMIUM)
    if found:
        return found
    message = f"{CHROMIUM} not found: apt-get install chromium (README, Run the tests)"
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


class CdpError(RuntimeError):
    """Chromium answered a call with an error, or did not answer in time."""


class HeadlessChromium:
    """Headless Chromium with one page, driven over CDP (use as a context manager).

    Args:
        binary: the Chromium executable.
        profile: an empty folder for the throw-away user profile (``--user-data-dir``).
    """

    def __init__(self, binary: str, profile: Path) -> None:
        self.binary = binary
        self.profile = profile
        self.events: list[dict[str, Any]] = []
        self._next_id = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._socket: websocket.WebSocket | None = None

    def __enter__(self) -> HeadlessChromium:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _start(self) -> None:
        self.profile.mkdir(parents=True, exist_ok=True)
        log = (self.profile.parent / "chromium.log").open("wb")
        with log:
            self._process = subprocess.Popen(
                [self.binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, killed as one in close()
            )
        port = self._wait_for_port()
        self._socket = websocket.create_connection(
            self._page_socket_url(port), timeout=CALL_TIMEOUT_S, suppress_origin=True
        )
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")

    def _wait_for_port(self) -> int:
        """The DevTools port Chromium chose, from ``DevToolsActivePort``."""
        marker = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise CdpError(f"chromium exited with {self._process.returncode} on start")
            lines = marker.read_text().splitlines() if marker.is_file() else []
            if lines and lines[0].strip().isdigit():
                return int(lines[0])
            time.sleep(0.1)
        raise CdpError(f"chromium wrote no DevToolsActivePort in {START_TIMEOUT_S} s")

    @staticmethod
    def _page_socket_url(port: int) -> str:
        """The WebSocket address of the browser's page (asked on loopback, no proxy)."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            with opener.open(f"http://{LOOPBACK}:{port}/json/list", timeout=5) as answer:
                targets = json.loads(answer.read())
            pages = [t for t in targets if t.get("type") == "page"]
            if pages:
                return str(pages[0]["webSocketDebuggerUrl"])
            time.sleep(0.1)
        raise CdpError("chromium shows no page target")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one CDP command and wait for its answer (events meanwhile are kept)."""
        if self._socket is None:
            raise CdpError("not connected")
        self._next_id += 1
        call_id = self._next_id
        self._socket.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self._socket.recv())
            if message.get("id") == call_id:
                if "error" in message:
                    raise CdpError(f"{method}: {message['error']}")
                return dict(message.get("result", {}))
            if "method" in message:
                self.events.append(message)

    def wait_for_event(self, method: str, timeout_s: float = CALL_TIMEOUT_S) -> dict[str, Any]:
        """The first kept or arriving event named ``method`` (it is consumed)."""
        for index, event in enumerate(self.events):
            if event["method"] == method:
                return self.events.pop(index)
        if self._socket is None:
            raise CdpError("not connected")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            message = json.loads(self._socket.recv())
            if message.get("method") == method:
                return dict(message)
            if "method" in message:
                self.events.append(message)
        raise CdpError(f"no {method} in {timeout_s} s")

    def navigate(self, url: str) -> None:
        """Open ``url`` and wait for its load event."""
        self.events = [e for e in self.events if e["method"] != "Page.loadEventFired"]
        answer = self.call("Page.navigate", url=url)
        if answer.get("errorText"):
            raise CdpError(f"navigation to {url} failed: {answer['errorText']}")
        self.wait_for_event("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        answer = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in answer:
            raise CdpError(f"script failed: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    def screenshot(self, path: Path) -> Path:
        """Save the whole page (beyond the window) as a PNG."""
        size = self.call("Page.getLayoutMetrics")["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        answer = self.call(
            "Page.captureScreenshot", format="png", captureBeyondViewport=True, clip=clip
        )
        path.write_bytes(base64.b64decode(answer["data"]))
        return path

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and error log entries seen so far."""
        found = []
        for event in self.events:
            params = event.get("params", {})
            if event["method"] == "Runtime.exceptionThrown":
                found.append(f"exception: {params.get('exceptionDetails')}")
            elif event["method"] == "Runtime.consoleAPICalled" and params.get("type") == "error":
                found.append(f"console.error: {params.get('args')}")
            elif event["method"] == "Log.entryAdded" and params["entry"].get("level") == "error":
                found.append(f"log: {params['entry'].get('text')} {params['entry'].get('url')}")
        return found

    def requested_urls(self) -> list[str]:
        """Every URL the page requested so far (``Network.requestWillBeSent``)."""
        return [
            e["params"]["request"]["url"]
            for e in self.events
            if e["method"] == "Network.requestWillBeSent"
        ]

    def close(self) -> None:
        """Close the connection and kill Chromium's process group (waits for it)."""
        if self._socket is not None:
            with contextlib.suppress(OSError, websocket.WebSocketException):
                self._socket.close()
            self._socket = None
        process, self._process = self._process, None
        if process is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError):  # children left after the leader exited
            os.killpg(process.pid, signal.SIGKILL)
        if process.poll() is None:
            process.wait(timeout=5)
