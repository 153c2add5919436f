"""dmd's Cockpit page in a real browser: Debian's cockpit-ws serving it from
the repository (a local session: cockpit-bridge started by cockpit-ws, no
login), the bridge on the test's private bus as its system bus, dmd --sim
serving there, and Debian's chromium driven headless by Selenium through
chromedriver. Screenshots go to .lab-results/cockpit/ (CI keeps them)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

PROJECT = Path(__file__).resolve().parents[2]
PACKAGE = PROJECT / "data" / "cockpit" / "dmd"
COCKPIT_WS = Path("/usr/lib/cockpit/cockpit-ws")
BRIDGE = Path("/usr/bin/cockpit-bridge")
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
        return True
    except OSError:
        return False


@pytest.fixture
def cockpit(dmd_session: Any, tmp_path: Path) -> Iterator[str]:
    """cockpit-ws on a free port, dmd's package found under XDG_DATA_HOME
    (the repository's own files), the bridge's system bus the private one;
    the page's URL."""
    for needed in (COCKPIT_WS, BRIDGE, CHROMIUM, CHROMEDRIVER):
        if not needed.exists():
            pytest.fail(f"{needed} is missing: scripts/setup installs cockpit-ws, "
                        "cockpit-bridge, chromium and chromium-driver")
    data = tmp_path / "xdg"
    (data / "cockpit").mkdir(parents=True)
    (data / "cockpit" / "dmd").symlink_to(PACKAGE)
    # The page runs dmctl (a passphrase goes to dmd through it): this
    # checkout's, as scripts/install would put it on PATH.
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "dmctl").write_text(f"#!/bin/sh\nexec {sys.executable} -m dmd.cli.main \"$@\"\n")
    (tools / "dmctl").chmod(0o755)
    port = _free_port()
    env = dict(dmd_session.env, XDG_DATA_HOME=str(data),
               DBUS_SYSTEM_BUS_ADDRESS=dmd_session.address, XDG_CONFIG_DIRS=str(tmp_path),
               PATH=f"{tools}:{dmd_session.env['PATH']}")
    log = (tmp_path / "cockpit-ws.log").open("wb")
    ws = subprocess.Popen([str(COCKPIT_WS), f"--local-session={BRIDGE}", "--no-tls",
                           "-a", "127.0.0.1", "-p", str(port)], env=env, stdout=log,
                          stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not _listening(port):
            assert ws.poll() is None, (tmp_path / "cockpit-ws.log").read_text()
            assert time.monotonic() < deadline, "cockpit-ws did not listen in 20 s"
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/cockpit/@localhost/dmd/index.html"
    finally:
        ws.terminate()
        try:
            ws.wait(timeout=10)
        except subprocess.TimeoutExpired:
            ws.kill()
            ws.wait()
        log.close()


@pytest.fixture
def browser_at() -> Iterator[Callable[[str], Any]]:
    """Headless chromium opened on a URL (``browser_at(url)``), quit at the end."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opened: list[Any] = []
    profile = tempfile.mkdtemp(prefix="dmd-chromium-")

    def open_at(url: str) -> Any:
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu",
                    "--disable-dev-shm-usage", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--window-size=1280,1000", f"--user-data-dir={profile}"):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)),
                                  options=options)
        opened.append(driver)
        driver.set_page_load_timeout(60)
        driver.get(url)
        return driver

    try:
        yield open_at
    finally:
        for driver in opened:
            driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def browser(cockpit: str, browser_at: Callable[[str], Any]) -> Any:
    """Headless chromium on the page, every signal of dmd reaching it."""
    return browser_at(cockpit)
