"""dmd's Cockpit page in a real browser, for the host's tests (dmd --sim on a
private bus) and the lab's (dmd on the real kernel and system bus): Debian's
cockpit-ws serving the page from the repository (a local session:
cockpit-bridge started by cockpit-ws, no login), Debian's chromium driven
headless by Selenium through chromedriver; and what a test reads from the
page or does to it, as a person would."""

from __future__ import annotations

import contextlib
import json
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
SHOTS = PROJECT / ".lab-results" / "cockpit"  # kept by CI
AXE = PROJECT / ".cache" / "axe-4.14.1.min.js"  # scripts/setup fetches it
WAIT = 30  # seconds a page has to show a change


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


@contextlib.contextmanager
def serve_cockpit(tmp_path: Path, env: dict[str, str]) -> Iterator[str]:
    """cockpit-ws on a free port with *env* (its bridge's system bus is
    DBUS_SYSTEM_BUS_ADDRESS, or the machine's), dmd's package found under
    XDG_DATA_HOME (the repository's own files); yields the page's URL."""
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
    env = dict(env, XDG_DATA_HOME=str(data), XDG_CONFIG_DIRS=str(tmp_path),
               PATH=f"{tools}:{env['PATH']}")
    log_path = tmp_path / "cockpit-ws.log"
    log = log_path.open("wb")
    ws = subprocess.Popen([str(COCKPIT_WS), f"--local-session={BRIDGE}", "--no-tls",
                           "-a", "127.0.0.1", "-p", str(port)], env=env, stdout=log,
                          stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not _listening(port):
            assert ws.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "cockpit-ws did not listen in 60 s"
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


@contextlib.contextmanager
def browsers(emulated: bool = False) -> Iterator[Callable[[str], Any]]:
    """Headless chromium opened on a URL (``open_at(url)``), each quit at
    the end. *emulated*: in the lab's TCG guest, where a page takes minutes
    to load: V8 without its JIT (code that writes code makes the emulator
    translate it again and again), and ``open_at`` returns once the page is
    asked for (the caller waits for what it needs to see; selenium's own
    call would give up after 120 s)."""
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
        if emulated:
            options.add_argument("--js-flags=--jitless")
            options.page_load_strategy = "none"
        driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)),
                                  options=options)
        opened.append(driver)
        driver.set_page_load_timeout(600 if emulated else 60)
        driver.get(url)
        return driver

    try:
        yield open_at
    finally:
        for driver in opened:
            driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def screenshot(driver: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SHOTS / f"{name}.png"))


def until(driver: Any, check: Any, what: str, wait: float = WAIT) -> Any:
    """*check(driver)*, asked until true (an element gone, or not there yet,
    as the page redraws or reloads: asked again)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, wait, poll_frequency=0.1,
                         ignored_exceptions=(NoSuchElementException,
                                             StaleElementReferenceException)).until(
        lambda d: check(d), message=f"the page never showed {what}")


def text(driver: Any) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.TAG_NAME, "main").text)


def pool_card(driver: Any, name: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f"article[data-pool='{name}']")


def volume_names(driver: Any, pool: str) -> list[str]:
    return list(driver.execute_script(
        "return [...document.querySelectorAll(`article[data-pool='${arguments[0]}'] "
        "tr[data-volume]`)].map(r => r.dataset.volume)", pool))


def texts(driver: Any, selector: str) -> list[str]:
    """The text of each element *selector* finds, read in one go (the page
    redraws what it shows at each of dmd's signals: an element held across
    calls may be gone)."""
    return list(driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(e => e.innerText)",
        selector))


def row_text(driver: Any, volume: str) -> str:
    return "".join(texts(driver, f"tr[data-volume='{volume}']"))


def job_text(driver: Any, what: str) -> str:
    """The text of the newest job whose words start with *what*."""
    return next((t for t in texts(driver, "li.job") if t.startswith(what)), "")


def cells(driver: Any, volume: str) -> list[str]:
    """The texts of a volume's row, cell by cell ([] when it has none)."""
    return list(driver.execute_script(
        "const row = document.querySelector(`tr[data-volume='${arguments[0]}']`);"
        "return row ? [...row.children].map(c => c.innerText.trim()) : []", volume))


def button(driver: Any, label: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f"button[aria-label='{label}']")


def press(driver: Any, label: str) -> None:
    """Click the button named *label*, found again if a redraw replaced it."""
    from selenium.common.exceptions import StaleElementReferenceException

    for _ in range(3):
        try:
            button(driver, label).click()
            return
        except StaleElementReferenceException:
            continue
    button(driver, label).click()


def fill(form: Any, **fields: str) -> None:
    from selenium.webdriver.common.by import By

    for name, value in fields.items():
        field = form.find_element(By.NAME, name)
        field.clear()
        field.send_keys(value)


def create_volume(driver: Any, pool: str, *, encrypt: bool = False, filesystem: str = "",
                  **fields: str) -> Any:
    from selenium.webdriver.common.by import By

    form = pool_card(driver, pool).find_element(By.CSS_SELECTOR, "form")
    fill(form, **fields)
    if filesystem:
        form.find_element(By.CSS_SELECTOR,
                          f"select[name=filesystem] option[value={filesystem}]").click()
    if encrypt:
        form.find_element(By.NAME, "encrypt").click()
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    return form


def disk_box(driver: Any, path: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f"input[name=disk][value='{path}']")


def accessible(driver: Any, view: str) -> None:
    """axe-core's WCAG A/AA rules on the page as it is: no violation."""
    if not AXE.exists():
        pytest.fail(f"{AXE} is missing: scripts/setup fetches axe-core")
    driver.execute_script(AXE.read_text())
    result = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "axe.run(document, {runOnly: ['wcag2a', 'wcag2aa']})"
        ".then(r => done(JSON.stringify(r.violations.map(v => ({id: v.id, help: v.help,"
        " nodes: v.nodes.map(n => n.target.join(' '))})))))"
        ".catch(e => done(JSON.stringify([{id: 'axe', help: String(e), nodes: []}])));")
    violations = json.loads(result)
    assert violations == [], f"{view}: {violations}"
