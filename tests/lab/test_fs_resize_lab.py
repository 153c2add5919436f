"""Resize with `filesystem` on the real kernel, through dmd on the lab's
system bus: ext4 and xfs grown while mounted and while unmounted, ext4 shrunk
unmounted, each time with its files read back by checksum; the refusals
(xfs shrinking, ext4 shrinking mounted, a mount dmd cannot see) change
nothing."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dbus_fast import Variant
from lab_daemon import SystemDmd
from test_pools_lab import call, create_pool, error_of, prop, wait

from dmd.dbus.names import POOL_INTERFACE, VOLUME_INTERFACE

pytestmark = [pytest.mark.kernel, pytest.mark.kernel_volumes_late]

MIB = 1 << 20
SHRINK_FS = {"filesystem": Variant("b", True), "shrink": Variant("b", True)}


def create(pool: str, name: str, size: int, fstype: str) -> str:
    volume, job = call(pool, POOL_INTERFACE, "CreateVolume", "sta{sv}", name, str(size), "1",
                       "filesystem", "s", fstype)
    wait(job)
    return str(volume)


def resize(volume: str, size: int, *, shrink: bool = False) -> None:
    options = ["2", "filesystem", "b", "true", "shrink", "b", "true"] if shrink else \
        ["1", "filesystem", "b", "true"]
    (job,) = call(volume, VOLUME_INTERFACE, "Resize", "ta{sv}", str(size), *options)
    wait(job)


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    points: list[Path] = []

    def mount(device: str) -> Path:
        point = tmp_path / f"m{len(points)}"
        point.mkdir()
        subprocess.run(["mount", device, str(point)], check=True)
        points.append(point)
        return point

    yield mount
    for point in points:
        subprocess.run(["umount", str(point)], check=False, capture_output=True)


def umount(point: Path) -> None:
    subprocess.run(["umount", str(point)], check=True)


def fill(point: Path) -> str:
    data = os.urandom(8 * MIB)
    (point / "data").write_bytes(data)
    subprocess.run(["sync", "-f", str(point / "data")], check=True)
    return hashlib.sha256(data).hexdigest()


def read_back(point: Path) -> str:
    return hashlib.sha256((point / "data").read_bytes()).hexdigest()


def total(point: Path) -> int:
    st = os.statvfs(point)
    return st.f_blocks * st.f_frsize


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_a_filesystem_grows_with_its_volume_mounted_and_unmounted(
        system_dmd: SystemDmd, loop_device: Callable[[int], str],
        mounted: Callable[[str], Path], fstype: str) -> None:
    pool = create_pool(f"fsr{fstype}", [loop_device(256)])
    volume = create(pool, "v", 320 * MIB, fstype)
    device = prop(volume, VOLUME_INTERFACE, "DevicePath")
    point = mounted(device)
    digest, before = fill(point), total(point)

    resize(volume, 400 * MIB)  # mounted: online
    grown = total(point)
    assert grown - before >= 70 * MIB, (before, grown)  # 80 MiB less new groups' tables
    assert read_back(point) == digest
    umount(point)

    resize(volume, 480 * MIB)  # unmounted
    point = mounted(device)
    assert total(point) - grown >= 70 * MIB
    assert read_back(point) == digest
    assert prop(volume, VOLUME_INTERFACE, "Size") == 480 * MIB

    if fstype == "xfs":
        assert error_of(volume, VOLUME_INTERFACE, "Resize", "ta{sv}",
                        [400 * MIB, SHRINK_FS]) == "InvalidArgument"
    else:
        assert error_of(volume, VOLUME_INTERFACE, "Resize", "ta{sv}",
                        [400 * MIB, SHRINK_FS]) == "Busy"  # mounted
        umount(point)
        resize(volume, 352 * MIB, shrink=True)
        assert prop(volume, VOLUME_INTERFACE, "Size") == 352 * MIB
        fsck = subprocess.run(["e2fsck", "-f", "-n", device], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout
        point = mounted(device)
        assert read_back(point) == digest


def test_a_mount_dmd_cannot_see_refuses_the_resize(
        system_dmd: SystemDmd, loop_device: Callable[[int], str]) -> None:
    """An ext4 mounted in another mount namespace only (a container's): not
    in dmd's mountinfo, but it holds the device, so the resize is Busy and
    nothing changes."""
    pool = create_pool("fsrns", [loop_device(256)])
    volume = create(pool, "v", 64 * MIB, "ext4")
    device = prop(volume, VOLUME_INTERFACE, "DevicePath")
    holder = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f"mkdir -p /tmp/fsrns && mount {device} /tmp/fsrns && echo up && sleep 600"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "up"
        for shrink in (False, True):
            options = SHRINK_FS if shrink else {"filesystem": Variant("b", True)}
            assert error_of(volume, VOLUME_INTERFACE, "Resize", "ta{sv}",
                            [(48 if shrink else 96) * MIB, options]) == "Busy"
        assert prop(volume, VOLUME_INTERFACE, "Size") == 64 * MIB
    finally:
        holder.kill()
        holder.wait()
