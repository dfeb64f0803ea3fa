"""The system's Chromium, headless, driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``):
open a page, wait for its load event, evaluate JavaScript in it, list what it requested. Standard library only;
no browser is downloaded."""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_HINT = (
    "install it with `apt-get install chromium` (Debian, Ubuntu; .ci/run does) or your system's package manager"
)
# No sign-in, sync, updates, metrics or other calls home: the only traffic is the pages a test opens.
FLAGS = (
    "--headless",
    "--disable-gpu",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-extensions",
    "--disable-sync",
    "--no-pings",
    "--mute-audio",
)

MOVE_PIPES_AND_EXEC = (
    "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); os.execvp(sys.argv[3], sys.argv[3:])"
)


def find_chromium() -> str | None:
    """The path of the system's Chromium (or Chrome), or None when there is none on the PATH."""
    return next((path for path in map(shutil.which, NAMES) if path), None)


class BrowserError(RuntimeError):
    """Chromium exited, refused a command, or did not answer in time."""


class Chromium:
    """One headless Chromium process with a fresh profile; a context manager, which always ends the process and
    removes the profile. ``timeout`` (seconds) bounds each wait for Chromium: a guard against a hang only."""

    def __init__(self, binary: str, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self._profile = tempfile.TemporaryDirectory(prefix="chromium-profile-")
        commands_read, self._commands = os.pipe()
        self._replies, replies_write = os.pipe()
        # Chromium's ends above fd 4, so that moving them onto 3 and 4 cannot overwrite one with the other.
        commands_read, replies_write = (self._above_4(fd) for fd in (commands_read, replies_write))
        sandbox = ["--no-sandbox"] if os.geteuid() == 0 else []  # Chromium will not run as root with its sandbox
        chromium = [binary, *FLAGS, *sandbox, "--remote-debugging-pipe", f"--user-data-dir={self._profile.name}"]
        # Chromium reads commands on fd 3 and writes replies on fd 4: a small Python puts the pipes there, then
        # becomes Chromium (no preexec_fn: it is unsafe in a process with threads; sh cannot name fds above 9).
        on_fds_3_and_4 = [sys.executable, "-I", "-S", "-c", MOVE_PIPES_AND_EXEC]
        try:
            self._process = subprocess.Popen(
                [*on_fds_3_and_4, str(commands_read), str(replies_write), *chromium],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(commands_read, replies_write),
                start_new_session=True,  # its own process group, which close() can end with all of Chromium's helpers
            )
        finally:
            os.close(commands_read)
            os.close(replies_write)
        self._buffer = b""
        self._backlog: list[dict] = []
        self._last_id = 0

    @staticmethod
    def _above_4(fd: int) -> int:
        """``fd`` moved to a descriptor number above 4."""
        moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 5)
        os.close(fd)
        return moved

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """End Chromium (politely, then by force) and remove its profile."""
        if self._process.poll() is None:
            try:
                os.write(self._commands, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
                self._process.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait()
        for fd in (self._commands, self._replies):
            os.close(fd)
        self._profile.cleanup()

    def open(self, url: str, width: int = 1280, height: int = 900) -> str:
        """Open ``url`` in a new tab of ``width`` × ``height`` CSS pixels (a phone's when narrower than 500), logging
        its network requests, and wait for its load event; the tab's session."""
        target = self._send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self._send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self._send("Page.enable", session=session)
        self._send("Network.enable", session=session)
        metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 500}
        self._send("Emulation.setDeviceMetricsOverride", metrics, session=session)
        self._send("Page.navigate", {"url": url}, session=session)
        self._receive(lambda m: m.get("method") == "Page.loadEventFired" and m.get("sessionId") == session)
        return session

    def evaluate(self, session: str, expression: str) -> Any:
        """The value of the JavaScript ``expression`` in the tab (awaited if it is a promise)."""
        params = {"expression": expression, "awaitPromise": True, "returnByValue": True}
        result = self._send("Runtime.evaluate", params, session=session)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(
                f"{expression!r} threw {details.get('exception', {}).get('description', details['text'])}"
            )
        return result["result"].get("value")

    def requests(self, session: str) -> list[str]:
        """The URLs the tab has requested so far, in order."""
        return [
            m["params"]["request"]["url"]
            for m in self._backlog
            if m.get("method") == "Network.requestWillBeSent" and m.get("sessionId") == session
        ]

    def _send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._last_id += 1
        message: dict = {"id": self._last_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        reply = self._receive(lambda m, n=self._last_id: m.get("id") == n)
        if "error" in reply:
            raise BrowserError(f"{method} failed: {reply['error']}")
        return reply["result"]

    def _receive(self, wanted: Callable[[dict], bool]) -> dict:
        """The first message, kept or new, that ``wanted`` accepts; the others are kept for later."""
        deadline = time.monotonic() + self.timeout
        while True:
            for i, message in enumerate(self._backlog):
                if wanted(message):
                    return self._backlog.pop(i) if "id" in message else message
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                self._backlog.append(json.loads(raw))
            if any(map(wanted, self._backlog)):
                continue
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._replies], [], [], left)[0]:
                raise BrowserError(f"Chromium did not answer within {self.timeout} s")
            chunk = os.read(self._replies, 1 << 16)
            if not chunk:
                raise BrowserError(f"Chromium exited with status {self._process.wait()}")
            self._buffer += chunk
