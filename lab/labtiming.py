"""pytest plugin used only inside the lab (``-p labtiming``, see lab/guest).

Prints the guest kernel's uptime when pytest has started and when collection
is done, so every lab run shows what the boot and the pytest start cost.
"""

from __future__ import annotations

import pytest


def _uptime() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def pytest_report_header(config: pytest.Config) -> str:
    return f"lab: pytest started at guest uptime {_uptime():.1f} s"


def pytest_collection_finish(session: pytest.Session) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(
            f"lab: {len(session.items)} tests collected at guest uptime {_uptime():.1f} s"
        )


def pytest_sessionfinish(session: pytest.Session) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"lab: pytest finished at guest uptime {_uptime():.1f} s")
