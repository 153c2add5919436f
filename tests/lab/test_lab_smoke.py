"""The lab itself works: a real device-mapper, dmsetup, a running udevd."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from dmd.engine import DM

NAME = "dmdtest-smoke"


@pytest.mark.kernel
def test_lab_has_device_mapper_udev_and_dmsetup() -> None:
    with DM() as dm:
        assert dm.version()[0] == 4

    out = subprocess.run(["dmsetup", "version"], check=True, capture_output=True,
                         text=True).stdout
    assert "Driver version:" in out
    assert Path("/run/udev/control").exists()

    subprocess.run(["dmsetup", "create", NAME, "--table", "0 2048 zero"], check=True)
    try:
        node = Path("/dev/mapper") / NAME
        deadline = time.monotonic() + 30
        while not node.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert node.exists(), f"udev made no {node}"
        assert os.path.realpath(node).startswith("/dev/dm-")
    finally:
        subprocess.run(["dmsetup", "remove", NAME], check=False)
