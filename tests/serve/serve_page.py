"""Drive `oneword serve` in headless Chromium (Playwright): start the server, fill the page.

Shared by tests/serve/test_serve_browser.py and benchmarks/serve_screenshot.py (the screenshot in
docs/img/serve.png is taken by this code). Every request goes to 127.0.0.1, in bounded
loops; every server started here is stopped by `running_server`'s exit.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM_PATHS = ("chromium", "chromium-browser", "/usr/bin/chromium")


def chromium_path() -> str | None:
    """Debian's Chromium (Playwright's own browser download is not used)."""
    for name in CHROMIUM_PATHS:
        found = shutil.which(name)
        if found:
            return found
    return None


def missing_browser() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[dev]')"
    if chromium_path() is None:
        return "no chromium on PATH (Debian: apt-get install -y chromium)"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A running `oneword serve` subprocess and its output so far."""

    def __init__(self, process: subprocess.Popen, url: str, out: Path):
        self.process, self.url, self.out = process, url, out
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_output(self, pattern: str, timeout: float) -> bool:
        """True once `pattern` (a regex) appears in the server's output within `timeout` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.output):
                return True
            time.sleep(0.2)
        return False


@contextlib.contextmanager
def running_server(
    model: str | Path,
    out: Path,
    *,
    encoder: str | Path | None = None,
    concurrency: int = 1,
    start_timeout: float = 120.0,
    env: dict | None = None,
) -> Iterator[Server]:
    """`oneword serve` on a free 127.0.0.1 port; waits until the page answers; stops it after."""
    port = free_port()
    command = [sys.executable, "-m", "oneword.cli", "serve", "--model", str(model)]
    command += ["--port", str(port), "--host", "127.0.0.1", "--out", str(out)]
    command += ["--concurrency", str(concurrency), "--device", "cpu"]
    command += ["--encoder", str(encoder) if encoder else "none"]
    environment = os.environ | {
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "PYTHONUNBUFFERED": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        # A closed tab is noticed at the next heartbeat (15 s by default).
        "GRADIO_HEARTBEAT_INTERVAL": "1",
    }
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=environment | (env or {}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/"
    server = Server(process, url, out)
    try:
        deadline = time.monotonic() + start_timeout
        while True:  # bounded: start_timeout seconds, one request to 127.0.0.1 every 0.5 s
            if process.poll() is not None:
                raise RuntimeError(f"oneword serve exited early:\n{server.output}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"oneword serve did not answer in {start_timeout} s:\n{server.output}"
                )
            time.sleep(0.5)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


@contextlib.contextmanager
def chromium() -> Iterator:
    """A headless Chromium browser (Debian's), closed on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), headless=True)
        try:
            yield browser
        finally:
            browser.close()


# ---------------------------------------------------------------------------------------
# The page


def open_page(browser, url: str, *, viewport=(1400, 1000)):
    """A new user (own browser context, so its own Gradio session) on the page."""
    context = browser.new_context(
        accept_downloads=True, viewport={"width": viewport[0], "height": viewport[1]}
    )
    page = context.new_page()
    page.goto(url)
    page.locator("#learn").wait_for(timeout=30_000)
    return page


def fill(page, elem_id: str, value) -> None:
    """Type into a Gradio textbox or number field."""
    page.locator(f"#{elem_id} textarea, #{elem_id} input").first.fill(str(value))


def upload(page, paths) -> None:
    page.locator("#images input[type=file]").set_input_files([str(p) for p in paths])
    # Gradio lists each uploaded file by name once its upload finished.
    for path in paths:
        page.locator(f'#images td.filename[aria-label="{Path(path).name}"]').wait_for(
            timeout=30_000
        )


def choose_path(page, label: str) -> None:
    page.locator("#path").get_by_text(label).click()


def status(page) -> str:
    return page.locator("#status textarea").input_value()


def wait_status(page, pattern: str, timeout: float = 60.0) -> str:
    """The progress box once it matches `pattern` (a regex); raises after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = status(page)
        if re.search(pattern, text):
            return text
        page.wait_for_timeout(200)
    raise AssertionError(f"progress box never matched {pattern!r}; it says:\n{status(page)}")


def learn(page, images, token: str, *, class_word=None, path="classic inversion", steps=3):
    """Fill the Learn form and press the button (does not wait for the result)."""
    if images:
        upload(page, images)
    fill(page, "token", token)
    if class_word is not None:
        fill(page, "class-word", class_word)
    choose_path(page, path)
    fill(page, "steps", steps)
    start(page)


def start(page) -> None:
    """Press "Learn the token" and wait until the page took it (the progress box changes)."""
    before = status(page)
    page.locator("#learn").click()
    deadline = time.monotonic() + 30
    while status(page) == before and time.monotonic() < deadline:
        page.wait_for_timeout(50)


def download(page, elem_id: str, folder: Path) -> Path:
    """Click a download button; returns the saved file (named as the server named it)."""
    with page.expect_download(timeout=30_000) as info:
        page.locator(f"#{elem_id}").click()
    target = folder / info.value.suggested_filename
    info.value.save_as(target)
    return target
