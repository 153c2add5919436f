"""Caches on SimDM: dm-cache (writeback, writethrough) and dm-writecache
attached under a volume's device and detached through the cleaner. The
simulator keeps a cache's dirty-block count (set by the test: no I/O is
modelled), writes it back while a cleaner table is live, and counts the
dirty blocks a table swap throws away: every test asserts that count is 0,
across cancels, errors and a crash at every step."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest

from dmd.engine import DmError, DmFlags
from dmd.engine.sim import SimDM
from dmd.service import errors
from dmd.service.auth import ROOT
from dmd.service.devices.recovery import recover
from dmd.service.pools import cache
from dmd.service.pools.cache import AttachStep, DetachStep
from dmd.service.pools.recovery import recover_pools
from dmd.service.pools.room import HEADER_SECTORS
from dmd.service.pools.service import PoolService
from dmd.state.pool_description import BLOCK, Label
from tests.service.pools.kit import (
    DISKS,
    GIB,
    assert_agree,
    close,
    crash_at,
    open_pools,
    recovered,
    state,
)

MIB = 1 << 20
CACHE_DISK = DISKS[2]


def engine_of(pools: PoolService) -> SimDM:
    return pools.kernel.engine  # type: ignore[return-value]


def live(pools: PoolService, device: str) -> list[tuple[str, str]]:
    _, lines = engine_of(pools).table_status(device, DmFlags.DM_STATUS_TABLE)
    return [(line.target_type, line.params) for line in lines]


def named(pools: PoolService, device: str) -> list[tuple[str, str]]:
    """live(), with every major:minor of a device-mapper device as its name."""
    engine = engine_of(pools)
    names = {f"{d.device[0]}:{d.device[1]}": d.name for d in engine.list_devices()}
    return [(kind, " ".join(names.get(w, w) for w in params.split()))
            for kind, params in live(pools, device)]


def lost(pools: PoolService) -> int:
    with contextlib.suppress(DmError):
        return engine_of(pools).lost_cache_blocks("tank-v")
    return 0


async def tank_with_volume(pools: PoolService) -> None:
    await pools.create_pool("tank", DISKS[:2])
    await pools.create_volume("tank", "v", GIB)


@pytest.fixture
async def tank(pools: PoolService) -> PoolService:
    await tank_with_volume(pools)
    return pools


@pytest.mark.parametrize("mode", ["writeback", "writethrough", "writecache"])
async def test_attach_then_detach_writes_every_dirty_block_back(tank: PoolService,
                                                               mode: str) -> None:
    thin_table = live(tank, "tank-v")
    cached = await cache.attach(tank, "tank", "v", CACHE_DISK, mode=mode)
    assert cached.cache is not None and cached.cache.device == CACHE_DISK
    [(kind, params)] = live(tank, "tank-v")
    assert kind == ("writecache" if mode == "writecache" else "cache")
    assert live(tank, "tank-v-corig") == thin_table
    if mode != "writecache":
        assert "smq" in params and mode in params
    await assert_agree(tank)
    engine_of(tank).set_cache_dirty("tank-v", 3000)  # 1.5 s of writing back
    job, _ = await tank.as_job("volume-cache-detach", ROOT,
                               lambda accept: cache.detach(tank, "tank", "v", accept=accept))
    seen, rates = [], []
    while job.state.value == "running":
        seen.append(job.progress)
        rates.append(job.rate())
        await asyncio.sleep(0.1)
    assert job.state.value == "completed", job.error_message
    assert seen == sorted(seen) and len({round(p, 2) for p in seen}) > 3, seen
    # The dirty blocks written back are work with a size: Bytes and a rate.
    assert job.size_bytes >= 2000 * 4096 and any(r > 0 for r in rates), (job, rates)
    assert live(tank, "tank-v") == thin_table
    assert lost(tank) == 0
    [volume] = await tank.volumes("tank")
    assert volume.cache is None
    await assert_agree(tank)
    # The device is free again.
    await cache.attach(tank, "tank", "v", CACHE_DISK, mode=mode)


async def test_a_cancelled_detach_leaves_the_cache_attached(tank: PoolService) -> None:
    await cache.attach(tank, "tank", "v", CACHE_DISK)
    attached = live(tank, "tank-v")
    engine_of(tank).set_cache_dirty("tank-v", 10**9)
    job, _ = await tank.as_job("volume-cache-detach", ROOT,
                               lambda accept: cache.detach(tank, "tank", "v", accept=accept))
    while job.progress < DetachStep.FLUSH / (len(DetachStep) + 1):
        await asyncio.sleep(0.05)
    tank.jobs.cancel(job.id)
    assert await tank.jobs.wait(job.id, 10)
    assert job.state.value == "cancelled"
    assert live(tank, "tank-v") == attached  # its policy again, not the cleaner
    assert lost(tank) == 0
    [volume] = await tank.volumes("tank")
    assert volume.cache is not None
    await assert_agree(tank)


async def test_bad_requests_change_nothing(tank: PoolService) -> None:
    engine_of(tank).add_disk("/dev/simsmall", 7, 20, 8 * 2048)
    await tank.create_volume("tank", "other", GIB)
    before = await state(tank)
    cases: list[tuple[type[errors.ServiceError], str, dict[str, Any]]] = [
        (errors.Busy, DISKS[0], {}),  # the pool's own device
        (errors.Busy, "/dev/simext4", {}),  # a filesystem on it
        (errors.InvalidArgument, "/dev/simsmall", {}),  # smaller than the metadata needs
        (errors.InvalidArgument, CACHE_DISK, {"mode": "writearound"}),
        (errors.InvalidArgument, CACHE_DISK, {"block-size": 48 * 1024}),
        (errors.InvalidArgument, CACHE_DISK, {"mode": "writecache", "block-size": 65536}),
        (errors.InvalidArgument, "tank/v", {}),  # itself
        (errors.InvalidArgument, "somewhere", {}),
        (errors.NotFound, "tank/nosuch", {}),
    ]
    for error, source, options in cases:
        with pytest.raises(error):
            await cache.attach(tank, "tank", "v", source, mode=options.get("mode", "writeback"),
                               block_size=options.get("block-size"))
            pytest.fail(f"not refused: {source} {options}")
    with pytest.raises(errors.InvalidArgument):
        await cache.detach(tank, "tank", "v")
    assert await state(tank) == before
    await cache.attach(tank, "tank", "v", CACHE_DISK)
    before = await state(tank)
    with pytest.raises(errors.AlreadyExists):
        await cache.attach(tank, "tank", "v", CACHE_DISK)
    with pytest.raises(errors.Busy, match="cache of volume tank/v"):
        await cache.attach(tank, "tank", "other", CACHE_DISK, block_size=None)
    for refused in (tank.delete_volume("tank", "v"), tank.snapshot("tank", "v", "s"),
                    tank.resize_volume("tank", "v", 2 * GIB),
                    tank.set_active("tank", "v", False)):
        with pytest.raises(errors.Busy, match="DetachCache"):
            await refused
    assert await state(tank) == before


async def test_a_fast_pools_volume_as_the_cache(tank: PoolService) -> None:
    await tank.create_pool("fast", [CACHE_DISK])
    await tank.create_volume("fast", "c", 128 * MIB)
    await cache.attach(tank, "tank", "v", "fast/c", mode="writecache")
    [(_, params)] = live(tank, "tank-v-cdata")
    major, minor = engine_of(tank).device_info("fast-c").device
    assert params == f"{major}:{minor} 0", "the cache is on the fast pool's volume"
    with pytest.raises(errors.Busy):
        await tank.delete_volume("fast", "c")  # held by the cache
    await tank.create_volume("tank", "w", GIB)
    with pytest.raises(errors.Busy, match="cache of volume tank/v"):
        await cache.attach(tank, "tank", "w", "fast/c")
    # Its path is in the cached volume's record and tables: not renamed.
    for refused in (tank.rename_volume("fast", "c", "c2"),
                    tank.resize_volume("fast", "c", 256 * MIB)):
        with pytest.raises(errors.Busy, match="cache of volume tank/v"):
            await refused
    await cache.detach(tank, "tank", "v")
    await tank.delete_volume("fast", "c")
    await assert_agree(tank)


def reboot(tmp_path: Path) -> None:
    sim = SimDM(tmp_path / "kernel.json")
    while names := [d.name for d in sim.list_devices()]:
        for name in names:
            with contextlib.suppress(DmError):
                sim.device_remove(name)
    sim.close()


def test_a_cache_comes_back_after_a_reboot(tmp_path: Path) -> None:
    async def prepare() -> list[tuple[str, str]]:
        pools = open_pools(tmp_path)
        try:
            await tank_with_volume(pools)
            await cache.attach(pools, "tank", "v", CACHE_DISK)
            return named(pools, "tank-v")
        finally:
            close(pools)

    attached = asyncio.run(prepare())
    reboot(tmp_path)

    async def restart() -> None:
        pools = await recovered(tmp_path)
        try:
            assert named(pools, "tank-v") == attached
            await assert_agree(pools)
            await cache.detach(pools, "tank", "v")
            assert lost(pools) == 0
        finally:
            close(pools)

    asyncio.run(restart())


def crash_case(tmp_path: Path, operation: str, step: int, attach_first: bool) -> None:
    async def prepare() -> None:
        pools = open_pools(tmp_path)
        try:
            await tank_with_volume(pools)
            if attach_first:
                await cache.attach(pools, "tank", "v", CACHE_DISK)
                engine_of(pools).set_cache_dirty("tank-v", 100)
        finally:
            close(pools)

    asyncio.run(prepare())
    crash_at(tmp_path, operation, step, lambda pools: (
        cache.detach(pools, "tank", "v") if attach_first
        else cache.attach(pools, "tank", "v", CACHE_DISK)))

    async def restart() -> None:
        pools = await recovered(tmp_path)
        try:
            await assert_agree(pools)
            assert lost(pools) == 0, "a crash lost dirty cache blocks"
            [volume] = await pools.volumes("tank")
            kinds = [kind for kind, _ in live(pools, "tank-v")]
            assert (volume.cache is not None) == (kinds == ["cache"]), (volume.cache, kinds)
            if volume.cache is not None:
                assert "smq" in live(pools, "tank-v")[0][1], "its own policy, not the cleaner"
                await cache.detach(pools, "tank", "v")  # and it still detaches
            else:
                await cache.attach(pools, "tank", "v", CACHE_DISK)  # the device is free
            assert lost(pools) == 0
        finally:
            close(pools)

    asyncio.run(restart())


@pytest.mark.parametrize("step", list(AttachStep))
def test_a_crash_at_any_step_of_an_attach(tmp_path: Path, step: int) -> None:
    crash_case(tmp_path, "cache-attach", step, attach_first=False)


@pytest.mark.parametrize("step", list(DetachStep))
def test_a_crash_at_any_step_of_a_detach_loses_no_write(tmp_path: Path, step: int) -> None:
    crash_case(tmp_path, "cache-detach", step, attach_first=True)


def test_a_detached_volume_comes_back_without_its_cache_after_a_reboot(
        tmp_path: Path) -> None:
    async def prepare() -> list[tuple[str, str]]:
        pools = open_pools(tmp_path)
        try:
            await tank_with_volume(pools)
            plain = named(pools, "tank-v")
            await cache.attach(pools, "tank", "v", CACHE_DISK)
            await cache.detach(pools, "tank", "v")
            return plain
        finally:
            close(pools)

    plain = asyncio.run(prepare())
    reboot(tmp_path)

    async def restart() -> None:
        pools = await recovered(tmp_path)
        try:
            assert named(pools, "tank-v") == plain, "re-made from the record of its own table"
            await assert_agree(pools)
        finally:
            close(pools)

    asyncio.run(restart())


async def test_a_cache_disk_taken_whole_carries_its_label(tank: PoolService) -> None:
    """Its first 4 MiB hold dmd's label (the cache's areas start after it),
    which a detach wipes: the disk is free again."""
    cached = await cache.attach(tank, "tank", "v", CACHE_DISK)
    assert cached.cache is not None and cached.cache.label_uuid is not None
    label = Label.decode(engine_of(tank).read_disk(CACHE_DISK, 0, BLOCK))
    assert label is not None and label.device_uuid == cached.cache.label_uuid
    assert live(tank, "tank-v-cmeta")[0][1].endswith(f" {HEADER_SECTORS}")
    await cache.detach(tank, "tank", "v")
    assert Label.decode(engine_of(tank).read_disk(CACHE_DISK, 0, BLOCK)) is None
    await assert_agree(tank)


def test_a_cache_disk_under_another_name_is_never_mapped(tmp_path: Path) -> None:
    """After a reboot that gave the cache's disk another name and its old
    name to a blank disk, start-up maps none of the cache's areas over the
    blank one (its label is not there), and writes nothing to it."""
    async def prepare() -> None:
        pools = open_pools(tmp_path)
        try:
            await tank_with_volume(pools)
            await cache.attach(pools, "tank", "v", CACHE_DISK)
        finally:
            close(pools)

    asyncio.run(prepare())
    reboot(tmp_path)
    sim = SimDM(tmp_path / "kernel.json")
    sim.move_disk(CACHE_DISK, "/dev/simdisk9", 39)
    sim.add_disk(CACHE_DISK, 7, 40, 256 * 2048)
    blank = sim.read_disk(CACHE_DISK, 0, 8 << 20)

    async def restart() -> None:
        pools = open_pools(tmp_path)
        try:
            report = await recover(pools.devices)
            await recover_pools(pools, report)
            assert {"tank-v-cmeta", "tank-v-cdata"} <= set(report.failed), report
            names = {d.name for d in engine_of(pools).list_devices()}
            assert not names & {"tank-v-cmeta", "tank-v-cdata", "tank-v"}, names
            assert engine_of(pools).read_disk(CACHE_DISK, 0, 8 << 20) == blank
        finally:
            close(pools)

    asyncio.run(restart())
