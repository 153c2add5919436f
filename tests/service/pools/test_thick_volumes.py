"""Thick volumes on SimDM: segments taken from the room on the pool's
devices, linear or striped, never shared with the pool's metadata and data
or another volume (assert_agree checks every segment of every test), grown
by appending, freed by a delete; refused with a named error when the room is
not there; a crash at any step of a create, a grow or a delete leaves the
records, the devices and the on-device description agreeing."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest

from dmd.engine import DmError, DmFlags
from dmd.engine.sim import SimDM
from dmd.service import errors
from dmd.service.journal import ThickResizeStep, VolumeCreateStep, VolumeDeleteStep
from dmd.service.pools.service import PoolService
from dmd.service.pools.space import extend_pool
from dmd.state import Segment
from tests.service.pools.kit import (
    DISKS,
    assert_agree,
    close,
    crash_at,
    open_pools,
    recovered,
    state,
)

MIB = 1 << 20
DISK_SECTORS = 256 * 2048  # each simulated disk: 256 MiB


async def pool_with_room(pools: PoolService, disks: int = 2) -> None:
    """A pool whose data starts at 32 MiB: the rest of its devices is room."""
    await pools.create_pool("tank", DISKS[:disks], data_size=32 * MIB)


def table(pools: PoolService, device: str) -> list[tuple[Any, ...]]:
    engine: SimDM = pools.kernel.engine  # type: ignore[assignment]
    _, lines = engine.table_status(device, DmFlags.DM_STATUS_TABLE)
    return [(line.start, line.length, line.target_type, line.params) for line in lines]


@pytest.fixture
async def tank(pools: PoolService) -> PoolService:
    await pool_with_room(pools)
    return pools


async def test_a_linear_thick_volume_takes_room_and_gives_it_back(tank: PoolService) -> None:
    volume = await tank.create_volume("tank", "db", 100 * MIB, thin=False)
    assert volume.thin_id is None and volume.thick is not None
    assert volume.size_bytes == 100 * MIB and volume.thick.stripes == 1
    lines = table(tank, "tank-db")
    assert [line[2] for line in lines] == ["linear"] * len(lines)
    assert sum(line[1] for line in lines) == 100 * MIB // 512
    record = await tank.pool("tank")
    # From the room: after the pool's own data on the first device.
    first = volume.thick.segments[0]
    data_end = max(s.start + s.length for s in record.layout.data if s.device == 0)
    assert first.device == 0 and first.start == data_end
    await assert_agree(tank)
    await tank.delete_volume("tank", "db")
    again = await tank.create_volume("tank", "db2", 50 * MIB, thin=False)
    assert again.thick is not None and again.thick.segments[0] == Segment(
        0, first.start, 50 * MIB // 512), "the hole a delete leaves is filled first"
    await assert_agree(tank)


async def test_a_striped_volume_spreads_over_devices(tank: PoolService) -> None:
    volume = await tank.create_volume("tank", "fast", 63 * MIB, thin=False, stripes=2,
                                      stripe_size=128 * 1024)
    assert volume.thick is not None
    # Whole chunks on each device: 63 MiB over two is 31.5 MiB, a whole
    # number of 128 KiB chunks each (the size is what the table holds).
    assert volume.size_bytes == 63 * MIB
    assert {s.device for s in volume.thick.segments} == {0, 1}
    [(start, length, kind, params)] = table(tank, "tank-fast")
    assert (start, length, kind) == (0, 63 * MIB // 512, "striped")
    assert params.split()[:2] == ["2", "256"]
    odd = await tank.create_volume("tank", "odd", 1 * MIB + 512, thin=False, stripes=2)
    # Half of 1 MiB + 512 B is 512.25 KiB on each device: 9 chunks of 64 KiB.
    assert odd.size_bytes == 2 * 9 * 64 * 1024, "rounded up to whole chunks on each device"
    await assert_agree(tank)


async def test_growing_appends_segments_and_the_pool_grows_around_them(
        tank: PoolService) -> None:
    await tank.create_volume("tank", "v", 40 * MIB, thin=False)
    await tank.create_volume("tank", "w", 40 * MIB, thin=False)
    grown = await tank.resize_volume("tank", "v", 60 * MIB)
    assert grown.thick is not None and len(grown.thick.segments) >= 2
    assert grown.size_bytes == 60 * MIB
    assert sum(line[1] for line in table(tank, "tank-v")) == 60 * MIB // 512
    await extend_pool(tank, "tank", data_bytes=200 * MIB)  # into what the volumes left
    await assert_agree(tank)
    with pytest.raises(errors.InvalidArgument, match="never shrinks"):
        await tank.resize_volume("tank", "v", 10 * MIB, shrink=True)


async def test_bad_requests_are_named_errors_that_change_nothing(tank: PoolService) -> None:
    await tank.create_volume("tank", "thick", 10 * MIB, thin=False)
    before = await state(tank)
    cases = [
        (errors.InvalidArgument, dict(size_bytes=2000 * MIB, thin=False)),  # no room
        (errors.InvalidArgument, dict(size_bytes=MIB, thin=False, stripes=3)),  # 2 devices
        (errors.InvalidArgument, dict(size_bytes=MIB, thin=False, stripes=0)),
        (errors.InvalidArgument, dict(size_bytes=MIB, thin=False, stripes=2,
                                      stripe_size=3 * 4096)),  # not a power of two
        (errors.InvalidArgument, dict(size_bytes=MIB, thin=False, stripe_size=65536)),
        (errors.InvalidArgument, dict(size_bytes=MIB, stripes=2)),  # thin
        # Room for it in all (about 460 MiB), not 225 MiB on each of two devices.
        (errors.InvalidArgument, dict(size_bytes=450 * MIB, thin=False, stripes=2)),
    ]
    for error, kwargs in cases:
        size = kwargs.pop("size_bytes")
        with pytest.raises(error):
            await tank.create_volume("tank", "new", size, **kwargs)
            pytest.fail(f"not refused: {size} {kwargs}")
    with pytest.raises(errors.InvalidArgument, match="thick"):
        await tank.snapshot("tank", "thick", "snap")
    assert await state(tank) == before


async def test_a_thick_volume_comes_back_after_a_reboot(tmp_path: Path) -> None:
    pools = open_pools(tmp_path)
    await pool_with_room(pools)
    await pools.create_volume("tank", "v", 30 * MIB, thin=False, stripes=2)
    lines = table(pools, "tank-v")
    close(pools)
    engine = SimDM(tmp_path / "kernel.json")
    while names := [d.name for d in engine.list_devices()]:
        for name in names:
            with contextlib.suppress(DmError):  # held by one removed later in this pass
                engine.device_remove(name)
    engine.close()
    pools = await recovered(tmp_path)
    try:
        assert table(pools, "tank-v") == lines
        await assert_agree(pools)
    finally:
        close(pools)


def crash_case(tmp_path: Path, operation: str, step: int, run: Any,
               filesystem: str | None = None) -> None:
    async def prepare() -> dict[str, Any]:
        pools = open_pools(tmp_path)
        try:
            await pool_with_room(pools)
            await pools.create_volume("tank", "kept", 20 * MIB, thin=False,
                                      filesystem=filesystem)
            return await state(pools)
        finally:
            close(pools)

    before = asyncio.run(prepare())
    crash_at(tmp_path, operation, step, run)

    async def restart() -> dict[str, Any]:
        pools = await recovered(tmp_path)
        try:
            after = await assert_agree(pools)
            for volume in await pools.volumes("tank"):
                if volume.active:
                    assert sum(line[1] for line in table(pools, f"tank-{volume.name}")) == \
                        volume.size_bytes // 512, "the device has what the record says"
            return {"before": before, "after": after}
        finally:
            close(pools)

    return asyncio.run(restart())  # type: ignore[return-value]


@pytest.mark.parametrize("step", [VolumeCreateStep.RECORD, VolumeCreateStep.ACTIVATE,
                                  VolumeCreateStep.FILESYSTEM])
def test_a_crash_during_a_thick_create_undoes_it(tmp_path: Path, step: int) -> None:
    seen: Any = crash_case(tmp_path, "volume-create-thick", step, lambda pools: (
        pools.create_volume("tank", "half", 20 * MIB, thin=False, filesystem="ext4")))
    assert seen["after"]["volumes"] == seen["before"]["volumes"]
    assert sorted(seen["after"]["kernel"]) == sorted(seen["before"]["kernel"])


@pytest.mark.parametrize("step", list(ThickResizeStep))
def test_a_crash_during_a_thick_grow_leaves_device_and_record_agreeing(
        tmp_path: Path, step: int) -> None:
    # its last step is reached only with a filesystem to grow
    with_fs = step == ThickResizeStep.FILESYSTEM
    crash_case(tmp_path, "volume-resize-thick", step,
               lambda pools: pools.resize_volume("tank", "kept", 50 * MIB, filesystem=with_fs),
               filesystem="ext4" if with_fs else None)


@pytest.mark.parametrize("step", [VolumeDeleteStep.DEACTIVATE, VolumeDeleteStep.RECORD])
def test_a_crash_during_a_thick_delete_finishes_it(tmp_path: Path, step: int) -> None:
    seen: Any = crash_case(tmp_path, "volume-delete-thick", step,
                           lambda pools: pools.delete_volume("tank", "kept"))
    assert [v[1] for v in seen["after"]["volumes"]] == []
    assert "tank-kept" not in seen["after"]["kernel"]


@pytest.mark.parametrize("active", [True, False])
async def test_new_room_is_zeroed_on_the_disks_active_or_not(tank: PoolService,
                                                             active: bool) -> None:
    """What a deleted volume (or whatever the disk held) left in the room is
    zeroed on the pool's devices before a create or a grow maps it: an
    inactive volume grown, then activated, reads nothing of it either."""
    engine: SimDM = tank.kernel.engine  # type: ignore[assignment]
    old = await tank.create_volume("tank", "old", 16 * MIB, thin=False)
    assert old.thick is not None
    left = [(DISKS[s.device], s.start * 512, s.length * 512) for s in old.thick.segments]
    await tank.delete_volume("tank", "old")
    for path, offset, length in left:  # its data, still on the disk
        engine.write_disk(path, offset, b"\xaa" * length)
    small = await tank.create_volume("tank", "v", 4 * MIB, thin=False)
    assert small.thick is not None
    if not active:
        await tank.set_active("tank", "v", False)
    grown = await tank.resize_volume("tank", "v", 16 * MIB)
    assert grown.thick is not None
    for seg in grown.thick.segments:
        data = engine.read_disk(DISKS[seg.device], seg.start * 512, seg.length * 512)
        assert data == bytes(len(data)), seg
    await assert_agree(tank)
