"""Kernel-lab tests: fixtures live in tests/conftest.py (clean_dm, loop_device,
make_device, dmsetup), shared with the engine conformance suite; the ones here
run dmd itself (lab_daemon.py)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from lab_daemon import SystemDmd, install_policy

from dmd.engine import DM


@pytest.fixture
def stopped_dmd(clean_dm: DM, tmp_path: Path) -> Iterator[SystemDmd]:
    """A dmd the test starts itself (with the fault hook or options it needs:
    a start costs ~15 s under emulation, so no test starts one to stop it);
    stopped at the end, udev's work for it settled."""
    install_policy()
    daemon = SystemDmd(tmp_path / "state", tmp_path / "dmd.log")
    try:
        yield daemon
    finally:
        daemon.stop()
        subprocess.run(["udevadm", "settle", "--timeout=30"], check=False)


@pytest.fixture
def system_dmd(stopped_dmd: SystemDmd) -> SystemDmd:
    """dmd serving on the system bus with its defaults."""
    stopped_dmd.start()
    return stopped_dmd
