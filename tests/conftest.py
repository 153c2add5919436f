"""Test-suite wiring shared by the host and the kernel lab.

Tests marked ``kernel`` need a real device-mapper and run only inside the lab
(``lab/run``), which sets DMD_LAB=1. On the host they are deselected, never
skipped: the lab run is a separate, mandatory step of ``scripts/test``, and a
lab that cannot boot fails that step.
"""

from __future__ import annotations

import os

import pytest

IN_LAB = os.environ.get("DMD_LAB") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IN_LAB:
        return
    kept, dropped = [], []
    for item in items:
        (dropped if item.get_closest_marker("kernel") else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
