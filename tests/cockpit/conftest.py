"""dmd's Cockpit page in a real browser (tests/cockpit/page.py): the
bridge's system bus is the test's private bus, with dmd --sim serving
there. Screenshots go to .lab-results/cockpit/ (CI keeps them)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cockpit.page import browsers, serve_cockpit


@pytest.fixture
def cockpit(dmd_session: Any, tmp_path: Path) -> Iterator[str]:
    """cockpit-ws whose bridge's system bus is dmd_session's private bus;
    the page's URL."""
    with serve_cockpit(tmp_path, dict(dmd_session.env,
                                      DBUS_SYSTEM_BUS_ADDRESS=dmd_session.address)) as url:
        yield url


@pytest.fixture
def browser_at() -> Iterator[Callable[[str], Any]]:
    """Headless chromium opened on a URL (``browser_at(url)``), quit at the end."""
    with browsers() as open_at:
        yield open_at


@pytest.fixture
def browser(cockpit: str, browser_at: Callable[[str], Any]) -> Any:
    """Headless chromium on the page, every signal of dmd reaching it."""
    return browser_at(cockpit)
