"""Resize with `filesystem`: ext4 grows and shrinks with its volume (on the
simulator a volume's device is a file, never mounted: the unmounted paths,
checked with e2fsprogs' own tools); what cannot be done is refused before
anything changes; a tool's failure leaves volume and filesystem as they
were, unless the filesystem grew part way (then the volume keeps its size)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from dmd.service import errors
from dmd.service.auth import Action, Caller
from dmd.service.journal import VolumeResizeStep
from dmd.service.pools.crypt import lock
from dmd.service.pools.service import PoolService
from tests.service.pools.kit import (
    DISKS,
    assert_agree,
    close,
    crash_at,
    open_pools,
    recovered,
)
from tests.service.pools.test_thick_volumes import pool_with_room, table
from tests.service.pools.test_volume_encryption import request

MIB = 1 << 20
DATA = os.urandom(300_000)


def tool(pools: PoolService, device: str, *argv: str, check: bool = True,
         ) -> subprocess.CompletedProcess[str]:
    """An e2fsprogs tool on the device ("{dev}" in *argv*)."""
    fd = pools.kernel.engine.open_node(device, os.O_RDONLY)
    try:
        return subprocess.run([a.replace("{dev}", f"/dev/fd/{fd}") for a in argv],
                              pass_fds=(fd,), check=check, capture_output=True, text=True)
    finally:
        os.close(fd)


def fs_bytes(pools: PoolService, device: str) -> int:
    out = tool(pools, device, "dumpe2fs", "-h", "{dev}").stdout
    count = re.search(r"^Block count:\s+(\d+)", out, re.MULTILINE)
    size = re.search(r"^Block size:\s+(\d+)", out, re.MULTILINE)
    assert count and size, out
    return int(count.group(1)) * int(size.group(1))


def put_data(pools: PoolService, device: str, tmp: Path) -> None:
    source = tmp / "data"
    source.write_bytes(DATA)
    tool(pools, device, "debugfs", "-w", "-R", f"write {source} data", "{dev}")


def data_reads_back(pools: PoolService, device: str, tmp: Path) -> bool:
    out = tmp / "out"
    out.unlink(missing_ok=True)
    tool(pools, device, "debugfs", "-R", f"dump data {out}", "{dev}")
    clean = tool(pools, device, "e2fsck", "-f", "-n", "{dev}", check=False)
    assert clean.returncode == 0, clean.stdout
    return out.read_bytes() == DATA


def device_sectors(pools: PoolService, device: str) -> int:
    _, lines = pools.kernel.engine.table_status(device)
    return sum(line.length for line in lines)


@pytest.fixture
async def ext4(tank: PoolService, tmp_path: Path) -> PoolService:
    await tank.create_volume("tank", "v", 64 * MIB, filesystem="ext4")
    put_data(tank, "tank-v", tmp_path)
    return tank


async def test_ext4_grows_with_its_volume(ext4: PoolService, tmp_path: Path) -> None:
    grown = await ext4.resize_volume("tank", "v", 96 * MIB, filesystem=True)
    assert grown.size_bytes == 96 * MIB == fs_bytes(ext4, "tank-v")
    assert device_sectors(ext4, "tank-v") * 512 == 96 * MIB
    assert data_reads_back(ext4, "tank-v", tmp_path)
    await assert_agree(ext4)


async def test_ext4_shrinks_first_then_its_volume(ext4: PoolService, tmp_path: Path) -> None:
    small = await ext4.resize_volume("tank", "v", 40 * MIB, shrink=True, filesystem=True)
    assert small.size_bytes == 40 * MIB == fs_bytes(ext4, "tank-v")
    assert device_sectors(ext4, "tank-v") * 512 == 40 * MIB
    assert data_reads_back(ext4, "tank-v", tmp_path)
    await assert_agree(ext4)


async def test_a_thick_volumes_ext4_grows(pools: PoolService, tmp_path: Path) -> None:
    await pool_with_room(pools)
    await pools.create_volume("tank", "t", 16 * MIB, thin=False, filesystem="ext4")
    put_data(pools, "tank-t", tmp_path)
    grown = await pools.resize_volume("tank", "t", 24 * MIB, filesystem=True)
    assert grown.size_bytes == fs_bytes(pools, "tank-t") == 24 * MIB
    assert data_reads_back(pools, "tank-t", tmp_path)
    await assert_agree(pools)


async def unchanged(pools: PoolService, device: str, tmp: Path, size: int,
                    before: dict[str, Any]) -> None:
    assert fs_bytes(pools, device) == size
    assert data_reads_back(pools, device, tmp)
    after = await assert_agree(pools)
    assert after["volumes"] == before["volumes"]
    assert after["kernel"] == before["kernel"]


async def test_what_cannot_be_done_is_refused_with_nothing_changed(
        ext4: PoolService, tmp_path: Path) -> None:
    before = await assert_agree(ext4)
    with pytest.raises(errors.InvalidArgument, match="cannot shrink"):
        await ext4.create_volume("tank", "x", 320 * MIB, filesystem="xfs")  # xfs's least
        await ext4.resize_volume("tank", "x", 310 * MIB, shrink=True, filesystem=True)
    await ext4.delete_volume("tank", "x")
    await ext4.create_volume("tank", "raw", 64 * MIB)
    with pytest.raises(errors.InvalidArgument, match="no filesystem blkid knows"):
        await ext4.resize_volume("tank", "raw", 96 * MIB, filesystem=True)
    await ext4.delete_volume("tank", "raw")
    await ext4.create_volume("tank", "sealed", 64 * MIB, filesystem="ext4",
                             encryption=request())
    await lock(ext4, "tank", "sealed")
    with pytest.raises(errors.InvalidArgument, match="encrypted"):
        await ext4.resize_volume("tank", "sealed", 96 * MIB, filesystem=True)
    await ext4.delete_volume("tank", "sealed")
    await ext4.set_active("tank", "v", False)
    with pytest.raises(errors.NotActive, match="Activate it"):
        await ext4.resize_volume("tank", "v", 96 * MIB, filesystem=True)
    await ext4.set_active("tank", "v", True)
    before = await assert_agree(ext4)
    with pytest.raises(errors.Failed, match="resize2fs"):  # smaller than its data
        await ext4.resize_volume("tank", "v", 1 * MIB, shrink=True, filesystem=True)
    await unchanged(ext4, "tank-v", tmp_path, 64 * MIB, before)


async def test_only_root_has_an_unmounted_xfs_mounted_to_grow_it(pools: PoolService) -> None:
    class Allow:
        async def authorize(self, caller: Caller, action: Action, device: str) -> None:
            pass

    pools.devices.authorizer = Allow()
    await pools.create_pool("tank", DISKS[:2])
    alice = Caller(uid=1001)
    await pools.create_volume("tank", "x", 320 * MIB, filesystem="xfs", caller=alice)
    before = await assert_agree(pools)
    with pytest.raises(errors.NotAuthorized, match="only root"):
        await pools.resize_volume("tank", "x", 400 * MIB, filesystem=True, caller=alice)
    assert await assert_agree(pools) == before


async def test_an_ext4_that_needs_repair_is_not_touched(ext4: PoolService,
                                                        tmp_path: Path) -> None:
    tool(ext4, "tank-v", "debugfs", "-w", "-R", "sif data links_count 5", "{dev}")
    before = await assert_agree(ext4)
    with pytest.raises(errors.Failed, match="needs repair first"):
        await ext4.resize_volume("tank", "v", 96 * MIB, filesystem=True)
    assert (await assert_agree(ext4))["volumes"] == before["volumes"]
    assert fs_bytes(ext4, "tank-v") == 64 * MIB


def failing(tmp: Path, monkeypatch: pytest.MonkeyPatch, *, after_real: bool) -> None:
    """resize2fs fails: before it writes, or after the real one did its work."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    real = subprocess.run(["sh", "-c", "command -v resize2fs"], capture_output=True,
                          text=True, check=True).stdout.strip()
    script = bin_dir / "resize2fs"
    script.write_text("#!/bin/sh\n" + (f'"{real}" "$@"\n' if after_real else "")
                      + "echo 'resize2fs: I/O error' >&2\nexit 1\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


@pytest.mark.parametrize("thin", [True, False])
async def test_a_failed_grow_gives_the_volume_its_old_size(
        pools: PoolService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        thin: bool) -> None:
    await pool_with_room(pools)
    await pools.create_volume("tank", "v", 16 * MIB, thin=thin, filesystem="ext4")
    put_data(pools, "tank-v", tmp_path)
    before = await assert_agree(pools)
    table_before = table(pools, "tank-v")
    failing(tmp_path, monkeypatch, after_real=False)
    with pytest.raises(errors.Failed, match="I/O error"):
        await pools.resize_volume("tank", "v", 24 * MIB, filesystem=True)
    monkeypatch.undo()
    await unchanged(pools, "tank-v", tmp_path, 16 * MIB, before)
    assert table(pools, "tank-v") == table_before


async def test_a_grow_that_failed_part_way_keeps_the_volumes_size(
        ext4: PoolService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    failing(tmp_path, monkeypatch, after_real=True)
    with pytest.raises(errors.Failed, match="I/O error"):
        await ext4.resize_volume("tank", "v", 96 * MIB, filesystem=True)
    monkeypatch.undo()
    [volume] = await ext4.volumes("tank")
    assert volume.size_bytes == 96 * MIB == fs_bytes(ext4, "tank-v")
    assert device_sectors(ext4, "tank-v") * 512 == 96 * MIB
    assert data_reads_back(ext4, "tank-v", tmp_path)
    await assert_agree(ext4)


async def test_a_failed_volume_shrink_grows_the_filesystem_back(
        ext4: PoolService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = await assert_agree(ext4)
    real = ext4.devices.reload

    async def refused(*args: Any, **kwargs: Any) -> Any:
        raise errors.Kernel("reload tank-v: kernel refused: EIO", 5)

    monkeypatch.setattr(ext4.devices, "reload", refused)
    with pytest.raises(errors.Kernel):
        await ext4.resize_volume("tank", "v", 40 * MIB, shrink=True, filesystem=True)
    monkeypatch.setattr(ext4.devices, "reload", real)
    await unchanged(ext4, "tank-v", tmp_path, 64 * MIB, before)


def test_a_crash_as_the_filesystem_grows_keeps_the_devices_size(tmp_path: Path) -> None:
    """Recovery: the record takes the device's size; the same Resize again
    grows the filesystem to it."""
    async def prepare() -> None:
        pools = open_pools(tmp_path)
        try:
            await pools.create_pool("tank", ["/dev/simdisk1", "/dev/simdisk2"])
            await pools.create_volume("tank", "v", 64 * MIB, filesystem="ext4")
            put_data(pools, "tank-v", tmp_path)
        finally:
            close(pools)

    asyncio.run(prepare())
    crash_at(tmp_path, "volume-resize", VolumeResizeStep.FILESYSTEM,
             lambda pools: pools.resize_volume("tank", "v", 96 * MIB, filesystem=True))

    async def restart() -> None:
        pools = await recovered(tmp_path)
        try:
            await assert_agree(pools)
            [volume] = await pools.volumes("tank")
            assert volume.size_bytes == 96 * MIB
            assert fs_bytes(pools, "tank-v") == 64 * MIB
            await pools.resize_volume("tank", "v", 96 * MIB, filesystem=True)
            assert fs_bytes(pools, "tank-v") == 96 * MIB
            assert data_reads_back(pools, "tank-v", tmp_path)
        finally:
            close(pools)

    asyncio.run(restart())
