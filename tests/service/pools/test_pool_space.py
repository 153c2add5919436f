"""A pool's space on SimDM: the room a pool made with data-size keeps, the
extension into it when the pool runs low (data intact, no thin id moved),
LowSpace/Full said once when there is no room, AddDevice letting it go on,
and a crash at every step of an extension."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from dmd.engine import DmFlags
from dmd.service import errors
from dmd.service.journal import PoolExtendStep, PoolGrowStep
from dmd.service.pools.room import HEADER_SECTORS, free_segments
from dmd.service.pools.service import PoolService
from dmd.service.pools.space import Space, SpaceWatch, extend_pool
from dmd.state import Segment
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
from tests.service.pools.kit import (
    sim as sim_of,  # its tests call their simulator sim
)

BLOCK = 64 << 10


spaces: list[SpaceWatch] = []


async def check(space: SpaceWatch, pool: str) -> Space:
    """A check, and the ones its own changes start (they read the same pool)."""
    figures = await space.check(pool)
    await space.settled()
    return figures


def watch(pools: PoolService) -> tuple[SpaceWatch, list[tuple[str, str, Space]]]:
    space = SpaceWatch(pools)
    spaces.append(space)
    said: list[tuple[str, str, Space]] = []
    space.listen(lambda pool, level, figures: said.append((pool, level, figures)))
    return space, said


@pytest.fixture
async def pools(pools: PoolService) -> AsyncIterator[PoolService]:
    """The folder's pool service; every watch a test made has settled
    before it closes."""
    yield pools
    for space in spaces:
        await space.settled()
    spaces.clear()


async def test_data_size_keeps_the_rest_of_the_devices_as_room(pools: PoolService) -> None:
    record = await pools.create_pool("tank", DISKS[:2], data_size=64 * BLOCK)
    assert record.layout.data_sectors * 512 == 64 * BLOCK
    room = sum(s.length for s in free_segments(record.layout)) * 512
    assert room > 400 << 20  # most of two 256 MiB disks
    state_ = await pools.pool_state("tank")
    assert state_.data_total_bytes == 64 * BLOCK
    with pytest.raises(errors.InvalidArgument, match="data-size"):
        await pools.create_pool("small", [DISKS[2]], data_size=100)


async def test_a_pool_running_low_grows_into_its_room(pools: PoolService) -> None:
    await pools.create_pool("tank", DISKS[:1], data_size=64 * BLOCK, low_water_percent=20)
    await pools.create_volume("tank", "v", GIB)
    sim_of(pools).write("tank-v", 0, 50 * 128)  # 50 of 64 blocks: 22% free
    space, said = watch(pools)
    before = await check(space, "tank")
    assert before.data_total == 64 * BLOCK and said == []  # over the mark: nothing
    sim_of(pools).write("tank-v", 50 * 128, 5 * 128)  # 55 of 64: 14% free
    after = await check(space, "tank")
    assert after.data_total >= 64 * BLOCK * 120 // 100  # at least 20% more
    assert 100 * (after.data_total - after.data_used) / after.data_total > 20
    assert after.data_used == 55 * BLOCK  # the data stayed where it was
    assert said == []  # grown, so nothing to tell
    now = await assert_agree(pools)  # records, kernel, description agree
    assert now["pools"]["tank"] == 1  # no thin id moved


async def test_no_room_is_said_once_then_full_then_add_device_lets_it_go_on(
        pools: PoolService) -> None:
    await pools.create_pool("tank", DISKS[:1])  # every byte is data: no room
    total = (await pools.pool_state("tank")).data_total_bytes
    blocks = total // BLOCK
    await pools.create_volume("tank", "v", GIB)
    space, said = watch(pools)
    sim_of(pools).write("tank-v", 0, (blocks - blocks // 10) * 128)  # 10% left
    await check(space, "tank")
    await check(space, "tank")
    assert [level for _, level, _ in said] == ["low"]  # once
    assert said[0][2].room == 0 and said[0][2].data_used == (blocks - blocks // 10) * BLOCK
    with pytest.raises(OSError) as refused:  # queued writes time out: the model fails them
        sim_of(pools).write("tank-v", 0, (blocks + 1) * 128)
    assert refused.value.errno == errno.EIO
    sim_of(pools).write("tank-v", 0, blocks * 128)
    await check(space, "tank")
    assert [level for _, level, _ in said] == ["low", "full"]
    assert (await pools.pool_state("tank")).mode == "out-of-data-space"
    await pools.add_device("tank", DISKS[1])
    await check(space, "tank")
    assert [level for _, level, _ in said] == ["low", "full", "ok"]
    assert (await pools.pool_state("tank")).mode == "ok"
    await assert_agree(pools)


def tpool_features(pools: PoolService, pool: str) -> list[str]:
    _, lines = sim_of(pools).table_status(f"{pool}-tpool", DmFlags.DM_STATUS_TABLE)
    return lines[0].params.split()[5:]


async def test_a_queueing_pool_fails_its_writes_after_its_no_space_timeout(
        pools: PoolService) -> None:
    await pools.create_pool("tank", DISKS[:1], no_space_timeout=1)
    assert (await pools.pool("tank")).no_space_timeout == 1
    blocks = (await pools.pool_state("tank")).data_total_bytes // BLOCK
    await pools.create_volume("tank", "v", GIB)
    await pools.create_volume("tank", "w", GIB)
    space, said = watch(pools)
    sim_of(pools).write("tank-v", 0, (blocks - 1) * 128)
    sim_of(pools).write("tank-w", 0, 128)
    await check(space, "tank")
    assert said[-1][1] == "full" and "error_if_no_space" not in tpool_features(pools, "tank")
    await asyncio.sleep(0.5)
    assert "error_if_no_space" not in tpool_features(pools, "tank")  # still waiting
    await asyncio.sleep(1.0)
    assert "error_if_no_space" in tpool_features(pools, "tank")  # the writes fail now
    with pytest.raises(OSError) as refused:
        sim_of(pools).write("tank-v", blocks * 128, 128)
    assert refused.value.errno == errno.ENOSPC
    record = await pools.pool("tank")
    assert record.on_full == "queue" and record.no_space_timeout == 1  # the policy stays
    # A reload of the pool's table while it is still full (a metadata
    # extension, recovery) makes it queue again: past its time, it fails at once.
    from dmd.service.pools.tables import pool_table

    await pools.devices.reload("tank-tpool", pool_table(record), claim=pools.owner("tank"))
    assert "error_if_no_space" not in tpool_features(pools, "tank")
    await check(space, "tank")
    await asyncio.sleep(0.3)
    await space.settled()
    assert "error_if_no_space" in tpool_features(pools, "tank")
    # Space back without a reload of the pool (a volume deleted): queueing again.
    await pools.delete_volume("tank", "w")
    await check(space, "tank")
    assert said[-1][1] != "full"
    assert "error_if_no_space" not in tpool_features(pools, "tank")
    # Full again: a new timeout, and an AddDevice before it ends.
    sim_of(pools).write("tank-v", (blocks - 1) * 128, 128)
    await check(space, "tank")
    assert said[-1][1] == "full"
    await pools.add_device("tank", DISKS[1])
    await check(space, "tank")
    await asyncio.sleep(1.5)
    assert said[-1][1] == "ok" and "error_if_no_space" not in tpool_features(pools, "tank")
    await assert_agree(pools)


async def test_metadata_size_sets_the_metadata_device(pools: PoolService) -> None:
    record = await pools.create_pool("tank", DISKS[:1], metadata_size=(3 << 20) + 1)
    assert record.layout.metadata_sectors * 512 == (3 << 20) + 4096  # whole 4 KiB blocks
    assert (await pools.pool_state("tank")).metadata_total_bytes == (3 << 20) + 4096
    for bad in (1 << 20, 17 << 30, "2M"):
        with pytest.raises(errors.InvalidArgument, match="metadata-size"):
            await pools.create_pool("other", DISKS[1:2], metadata_size=bad)  # type: ignore[arg-type]
    assert [p.name for p in await pools.pools()] == ["tank"]


async def test_no_space_timeout_is_checked(pools: PoolService) -> None:
    for bad in (-1, 86401, "60"):
        with pytest.raises(errors.InvalidArgument, match="no-space-timeout"):
            await pools.create_pool("tank", DISKS[:1], no_space_timeout=bad)  # type: ignore[arg-type]
    assert await pools.pools() == []


async def test_metadata_is_low_at_the_kernels_mark_or_under_a_fifth_free(
        pools: PoolService) -> None:
    from dmd.service.pools.space import metadata_low

    await pools.create_pool("tank", DISKS[:1])
    state_ = await pools.pool_state("tank")  # the kernel's mark: min(4 MiB, a quarter)
    assert state_.metadata_low_water_bytes == min(4 << 20, state_.metadata_total_bytes // 4)
    mib = 1 << 20

    def space(used: int, total: int, mark: int) -> Space:
        return Space(0, 1, used, total, 0, "ok", mark)

    assert not metadata_low(space(1 * mib, 2 * mib, mib // 2))
    assert metadata_low(space(1 * mib + mib // 2, 2 * mib, mib // 2))  # at the mark: 25%
    assert not metadata_low(space(70 * mib, 100 * mib, 4 * mib))  # 30% free
    assert metadata_low(space(80 * mib, 100 * mib, 4 * mib))  # 20% free, over the mark
    assert metadata_low(space(997 * mib, 1000 * mib, 4 * mib))


def test_what_to_do_names_the_way_out() -> None:
    from dataclasses import replace

    from dmd.service.pools.space import what_to_do
    from dmd.state import PoolLayout, PoolRecord

    record = PoolRecord("tank", "u", 0, 128, "queue", 20, 0, 0, PoolLayout((), (), (), ()),
                        no_space_timeout=60)
    assert what_to_do(record, "ok") == ""
    assert "wait up to 60 s" in what_to_do(record, "out-of-data-space")
    assert "AddDevice" in what_to_do(record, "out-of-data-space")
    assert "fail:" in what_to_do(replace(record, on_full="error"), "out-of-data-space")
    assert "then Repair" in what_to_do(record, "needs-check")
    assert "then Repair" in what_to_do(record, "read-only")
    assert "Repair writes a mended copy" in what_to_do(record, "damaged")


async def test_a_request_during_a_check_makes_another_check(pools: PoolService) -> None:
    """The kernel's event comes once: one that comes while a check runs (which
    may have read the pool before the event's cause) must not be lost."""
    await pools.create_pool("tank", DISKS[:1])
    space, _ = watch(pools)
    checks = 0
    check_once = space.check

    async def counted(pool: str) -> Space:
        nonlocal checks
        checks += 1
        return await check_once(pool)

    space.check = counted  # type: ignore[method-assign]
    space.request("tank")
    space.request("tank")  # while the first is under way
    space.request("tank")  # folded into that second one
    await space.settled()
    assert checks == 2


async def test_settled_changes_start_a_check(pools: PoolService) -> None:
    space, said = watch(pools)
    await pools.create_pool("tank", DISKS[:1])
    await pools.create_volume("tank", "v", GIB)
    await space.settled()
    total = (await pools.pool_state("tank")).data_total_bytes
    sim_of(pools).write("tank-v", 0, (total // BLOCK - 2) * 128)
    await pools.snapshot("tank", "v", "v.snap")  # any change of the pool looks again
    await space.settled()
    assert [level for _, level, _ in said] == ["low"]


async def test_metadata_grows_into_the_room_too(pools: PoolService) -> None:
    await pools.create_pool("tank", DISKS[:1], data_size=64 * BLOCK)
    before = await pools.pool_state("tank")
    grown = await extend_pool(pools, "tank", metadata_bytes=4 << 20)
    after = await pools.pool_state("tank")
    assert after.metadata_total_bytes == before.metadata_total_bytes + (4 << 20)
    assert len(grown.layout.metadata) == 2
    await assert_agree(pools)
    with pytest.raises(errors.InvalidArgument, match="no room"):
        await extend_pool(pools, "tank", data_bytes=1 << 40)


@pytest.mark.parametrize("step", list(PoolExtendStep))
def test_a_crash_at_any_step_of_an_extension(tmp_path: Path, step: PoolExtendStep) -> None:
    async def prepare() -> dict[str, Any]:
        pools = open_pools(tmp_path)
        try:
            await pools.create_pool("tank", DISKS[:1], data_size=64 * BLOCK)
            await pools.create_volume("tank", "v", GIB)
            sim_of(pools).write("tank-v", 0, 30 * 128)
            return await state(pools)
        finally:
            close(pools)

    before = asyncio.run(prepare())
    crash_at(tmp_path, "pool-extend", step, lambda pools: extend_pool(
        pools, "tank", data_bytes=32 * BLOCK, metadata_bytes=1 << 20))

    async def restart() -> None:
        pools = await recovered(tmp_path)
        try:
            now = await assert_agree(pools)
            record = await pools.pool("tank")
            pool_state = await pools.pool_state("tank")
            grown = step == PoolExtendStep.POOL
            assert (record.layout.data_sectors == 96 * 128) == grown
            assert pool_state.data_total_bytes == record.layout.data_sectors * 512
            assert pool_state.data_used_bytes == 30 * BLOCK
            assert now["volumes"] == before["volumes"]
        finally:
            close(pools)

    asyncio.run(restart())


BIG_DISK = "/dev/simbig"


async def metadata_low_pool(pools: PoolService) -> None:
    """Pool "tank" on a 2 GiB disk with the least metadata the kernel takes
    (2 MiB, no room to grow it), filled until its metadata is past the
    kernel's mark (SimDM's model: a metadata block per 64 data blocks)."""
    sim = sim_of(pools)
    if BIG_DISK not in sim.snapshot()["disks"]:
        sim.add_disk(BIG_DISK, 7, 20, 2 << 21)
    await pools.create_pool("tank", [BIG_DISK], metadata_size=2 << 20)
    await pools.create_volume("tank", "v", 2 * GIB)
    sim.write("tank-v", 0, 24_500 * 128)


async def test_metadata_running_low_without_room_is_said(pools: PoolService) -> None:
    await metadata_low_pool(pools)
    space, said = watch(pools)
    figures = await check(space, "tank")
    assert figures.metadata_total - figures.metadata_used <= figures.metadata_low_water
    assert 100 * (figures.data_total - figures.data_used) / figures.data_total > 20
    assert [level for _, level, _ in said] == ["low"]  # the data is fine; the metadata not


async def test_add_device_to_a_pool_low_on_metadata_grows_the_metadata_first(
        pools: PoolService) -> None:
    await metadata_low_pool(pools)
    before = await pools.pool_state("tank")
    steps: list[int] = []
    seen_at_data: list[tuple[int, int]] = []

    def note(op: str, number: int) -> None:
        if op == "pool-grow":
            steps.append(number)
        if op == "pool-grow" and number == PoolGrowStep.DATA:
            _, lines = sim_of(pools).table_status("tank-tpool")
            words = lines[0].params.split()
            seen_at_data.append((int(words[1].split("/")[1]), int(words[2].split("/")[1])))

    pools.fault = note
    grown = await pools.add_device("tank", DISKS[0])
    pools.fault = None
    assert steps == list(PoolGrowStep)
    # The pool's own resume took the larger metadata before the data grew.
    assert seen_at_data == [(before.metadata_total_bytes // 4096 + 256,
                             before.data_total_bytes // BLOCK)]
    assert grown.layout.metadata[-1] == Segment(1, HEADER_SECTORS, (1 << 20) // 512)
    assert grown.layout.data[-1].start == HEADER_SECTORS + (1 << 20) // 512
    after = await pools.pool_state("tank")
    assert after.metadata_total_bytes == before.metadata_total_bytes + (1 << 20)
    assert after.data_total_bytes > before.data_total_bytes
    assert after.data_used_bytes == before.data_used_bytes
    await assert_agree(pools)


@pytest.mark.parametrize("step", list(PoolGrowStep))
def test_a_crash_at_any_step_of_add_device_low_on_metadata(tmp_path: Path,
                                                           step: PoolGrowStep) -> None:
    async def prepare() -> dict[str, Any]:
        pools = open_pools(tmp_path)
        try:
            await metadata_low_pool(pools)
            return await state(pools)
        finally:
            close(pools)

    before = asyncio.run(prepare())
    crash_at(tmp_path, "pool-grow", step, lambda pools: pools.add_device("tank", DISKS[0]))

    async def restart() -> None:
        pools = await recovered(tmp_path)
        try:
            now = await assert_agree(pools)
            record = await pools.pool("tank")
            pool_state = await pools.pool_state("tank")
            forward = step >= PoolGrowStep.METADATA  # the metadata cannot shrink
            assert (len(record.layout.devices) == 2) == forward
            assert (len(record.layout.metadata) == 2) == forward
            assert pool_state.metadata_total_bytes == record.layout.metadata_sectors * 512
            assert pool_state.data_total_bytes == record.layout.data_sectors * 512
            assert now["volumes"] == before["volumes"]
            if not forward:
                assert now["kernel"] == before["kernel"]
        finally:
            close(pools)

    asyncio.run(restart())


@pytest.mark.parametrize("step", list(PoolGrowStep))
async def test_an_error_at_any_step_of_add_device_low_on_metadata(
        pools: PoolService, step: PoolGrowStep) -> None:
    await metadata_low_pool(pools)
    before = await state(pools)

    def fail(op: str, number: int) -> None:
        if op == "pool-grow" and number == step:
            raise errors.Busy(f"step {number}")

    pools.fault = pools.devices.fault = fail
    with pytest.raises(errors.Busy):
        await pools.add_device("tank", DISKS[0])
    pools.fault = pools.devices.fault = None
    now = await assert_agree(pools)
    record = await pools.pool("tank")
    forward = step > PoolGrowStep.METADATA  # its fault comes before the step it marks
    assert (len(record.layout.devices) == 2) == forward
    assert ((await pools.pool_state("tank")).metadata_total_bytes
            == record.layout.metadata_sectors * 512)
    if not forward:
        assert now["kernel"] == before["kernel"] and now["layouts"] == before["layouts"]
