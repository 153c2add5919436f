"""dmd's decision about the clear-rename-remove kernel bug (see docs/kernel-lab.md).

Loading a table, clearing it, renaming the device and removing it double-frees
in dm_ima_measure_on_device_remove on Debian's 6.1 and 6.12 kernels. The engine
refuses the rename of a device whose inactive table it cleared, before any
ioctl, and the device can still be removed safely. The kernel variant runs at the
end of the lab's last boot: if the guard ever failed, the corruption would
not spill into another test.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from dmd.engine import DevId, DmFlags, TargetLine, UnsafeOperation
from dmd.engine.sim import SimDM

P = "dmdtest-"


@pytest.fixture(params=["sim", pytest.param(
    "kernel", marks=[pytest.mark.kernel, pytest.mark.kernel_last])])
def engine(request: pytest.FixtureRequest) -> Iterator[Any]:
    yield request.getfixturevalue("clean_dm") if request.param == "kernel" else SimDM()


def test_rename_after_clear_is_refused_and_remove_is_safe(engine: Any) -> None:
    engine.device_create(P + "bug")
    engine.table_load(P + "bug", [TargetLine(0, 2048, "zero", "")])
    engine.table_clear(P + "bug")
    before = engine.ioctl_count
    with pytest.raises(UnsafeOperation, match="double free"):
        engine.device_rename(P + "bug", DevId.name(P + "bug-renamed"))
    assert engine.ioctl_count - before <= 1  # at most the DEV_STATUS lookup
    assert engine.device_info(P + "bug").name == P + "bug"
    engine.device_remove(P + "bug")
    # The kernel is still healthy: a full device life cycle works afterwards.
    engine.device_create(P + "after")
    engine.table_load(P + "after", [TargetLine(0, 2048, "zero", "")])
    engine.device_suspend(P + "after", DmFlags(0))
    engine.device_rename(P + "after", DevId.name(P + "after2"))
    engine.device_remove(P + "after2")
    if request_is_kernel(engine):
        dmesg = subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout
        assert "BUG" not in dmesg and "double free" not in dmesg


def test_renaming_a_device_cleared_then_removed_and_recreated_is_allowed(engine: Any) -> None:
    engine.device_create(P + "x")
    engine.table_load(P + "x", [TargetLine(0, 2048, "zero", "")])
    engine.table_clear(P + "x")
    engine.device_remove(P + "x")
    engine.device_create(P + "y")  # may reuse the same minor
    engine.device_rename(P + "y", DevId.name(P + "z"))
    engine.device_remove(P + "z")


def request_is_kernel(engine: Any) -> bool:
    return not isinstance(engine, SimDM)
