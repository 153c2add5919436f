"""Revert: a snapshot's data becomes its origin's (its thin id a copy of the
snapshot's), the origin keeping its name, UUID, owner and labels; applied at
once where the origin is closed, scheduled while it is open and applied at
its next Activate or as dmd starts; a scheduled copy is never leaked. (A
crash and an error at every step, and ImportPool after a crash at every step
with the state lost, are in test_pools.py and test_pool_import.py.)

The simulator keeps a volume's bytes by its device, not by thin id, so what
the data is after a revert is checked in the lab (test_revert_lab.py); here,
which thin id each table maps, the records, the description and the pool's
thin ids."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dmd.engine import DmFlags
from dmd.service import errors
from dmd.service.auth import Action, Caller
from dmd.service.pools import cache
from dmd.service.pools.service import PoolService
from dmd.state import VolumeRecord
from tests.service.pools.kit import (
    DISKS,
    GIB,
    assert_agree,
    close,
    open_pools,
    recovered,
    sim,
)

MIB = 1 << 20


def mapped_thin(pools: PoolService, device: str) -> int:
    """The thin id the device's table maps."""
    _, lines = sim(pools).table_status(device, DmFlags.DM_STATUS_TABLE)
    [line] = lines
    return int(str(line.params).split()[-1])


def pool_thins(pools: PoolService) -> list[int]:
    [pool] = sim(pools).snapshot()["pools"].values()
    return sorted(pool["thins"])


async def volume(pools: PoolService, name: str) -> VolumeRecord:
    [found] = [v for v in await pools.store.list_volumes("tank") if v.name == name]
    return found


@pytest.fixture
async def snapped(tank: PoolService) -> PoolService:
    await tank.create_volume("tank", "base", GIB, labels={"role": "db"})
    await tank.snapshot("tank", "base", "base.1", activate=False)
    return tank


async def test_a_closed_origin_takes_a_copy_of_the_snapshot_at_once(
        snapped: PoolService) -> None:
    before, snap = await volume(snapped, "base"), await volume(snapped, "base.1")
    await snapped.resize_volume("tank", "base", 2 * GIB)  # the snapshot's size comes back
    reverted = await snapped.revert("tank", "base.1")
    assert reverted == await volume(snapped, "base")
    assert (reverted.uuid, reverted.name, reverted.owner_uid, reverted.labels,
            reverted.active) == (before.uuid, "base", 0, {"role": "db"}, True)
    assert reverted.size_bytes == snap.size_bytes == GIB and reverted.revert is None
    assert reverted.thin_id not in (before.thin_id, snap.thin_id)
    assert mapped_thin(snapped, "tank-base") == reverted.thin_id
    assert pool_thins(snapped) == sorted([reverted.thin_id, snap.thin_id])  # old one gone
    assert await volume(snapped, "base.1") == snap  # kept: a point to revert to again
    await assert_agree(snapped)
    again = await snapped.revert("tank", "base.1")
    assert pool_thins(snapped) == sorted([again.thin_id, snap.thin_id])


async def test_an_inactive_origin_is_reverted_without_a_device(snapped: PoolService) -> None:
    await snapped.set_active("tank", "base", False)
    reverted = await snapped.revert("tank", "base.1")
    assert not reverted.active and reverted.revert is None
    assert "tank-base" not in {d.name for d in sim(snapped).list_devices()}
    await snapped.set_active("tank", "base", True)
    assert mapped_thin(snapped, "tank-base") == reverted.thin_id
    await assert_agree(snapped)


async def test_an_open_origin_is_scheduled_then_applied_at_its_next_activate(
        snapped: PoolService) -> None:
    old = await volume(snapped, "base")
    sim(snapped).open_device("tank-base")  # mounted, say
    scheduled = await snapped.revert("tank", "base.1")
    assert scheduled.revert is not None and scheduled.thin_id == old.thin_id
    assert scheduled.revert.snapshot_uuid == (await volume(snapped, "base.1")).uuid
    assert mapped_thin(snapped, "tank-base") == old.thin_id  # never under its user
    assert scheduled.revert.thin_id in pool_thins(snapped)
    await assert_agree(snapped)  # the copy is recorded and described
    with pytest.raises(errors.Busy, match="scheduled already"):
        await snapped.revert("tank", "base.1")
    sim(snapped).open_device("tank-base", -1)
    await snapped.set_active("tank", "base", False)
    assert (await volume(snapped, "base")).revert is not None  # not at Deactivate
    await snapped.set_active("tank", "base", True)
    now = await volume(snapped, "base")
    assert now.revert is None and now.thin_id == scheduled.revert.thin_id
    assert mapped_thin(snapped, "tank-base") == now.thin_id
    assert old.thin_id not in pool_thins(snapped)
    await assert_agree(snapped)


@pytest.mark.parametrize("still_open", [False, True])
def test_a_scheduled_revert_is_applied_as_dmd_starts_once_closed(
        tmp_path: Path, still_open: bool) -> None:
    async def schedule() -> int:
        pools = open_pools(tmp_path)
        try:
            await pools.create_pool("tank", DISKS[:2])
            await pools.create_volume("tank", "base", GIB)
            await pools.snapshot("tank", "base", "base.1")
            sim(pools).open_device("tank-base")
            scheduled = await pools.revert("tank", "base.1")
            assert scheduled.revert is not None
            if not still_open:
                sim(pools).open_device("tank-base", -1)
            return scheduled.revert.thin_id
        finally:
            close(pools)

    copy = asyncio.run(schedule())

    async def restart() -> None:
        pools = await recovered(tmp_path)
        try:
            now = await volume(pools, "base")
            assert (now.thin_id == copy) is not still_open
            assert (now.revert is not None) is still_open
            assert mapped_thin(pools, "tank-base") == now.thin_id
            await assert_agree(pools)
        finally:
            close(pools)

    asyncio.run(restart())


async def test_deleting_an_origin_deletes_its_scheduled_copy(snapped: PoolService) -> None:
    sim(snapped).open_device("tank-base")
    await snapped.revert("tank", "base.1")
    sim(snapped).open_device("tank-base", -1)
    await snapped.delete_volume("tank", "base")
    assert pool_thins(snapped) == [(await volume(snapped, "base.1")).thin_id]
    await assert_agree(snapped)


async def test_what_cannot_be_reverted_is_refused_and_changes_nothing(
        snapped: PoolService) -> None:
    before = await assert_agree(snapped)
    with pytest.raises(errors.NotFound, match="no origin"):
        await snapped.revert("tank", "base")  # no snapshot
    with pytest.raises(errors.NotFound):
        await snapped.revert("tank", "nothing")
    assert await assert_agree(snapped) == before
    await snapped.snapshot("tank", "base.1", "base.1.1", activate=False)
    await snapped.delete_volume("tank", "base.1")
    with pytest.raises(errors.NotFound, match="no origin"):
        await snapped.revert("tank", "base.1.1")  # its origin is gone


async def test_only_the_owner_of_both_reverts(pools: PoolService) -> None:
    class Allow:
        async def authorize(self, caller: Caller, action: Action, device: str) -> None:
            pass

    pools.devices.authorizer = Allow()
    await pools.create_pool("tank", DISKS[:2])
    alice, bob = Caller(uid=1001), Caller(uid=1002)
    await pools.create_volume("tank", "a", GIB, caller=alice)
    await pools.snapshot("tank", "a", "a.1", caller=alice)
    await pools.snapshot("tank", "a", "root.1")  # root's, of alice's volume
    before = await assert_agree(pools)
    with pytest.raises(errors.NotAuthorized, match="uid 1001"):
        await pools.revert("tank", "a.1", caller=bob)
    with pytest.raises(errors.NotAuthorized, match="uid 0"):
        await pools.revert("tank", "root.1", caller=alice)  # another's snapshot
    assert await assert_agree(pools) == before
    await pools.revert("tank", "a.1", caller=alice)


async def test_a_cached_origin_is_busy(snapped: PoolService) -> None:
    sim(snapped).add_disk(DISKS[2], 7, 40, 256 * 2048)
    await cache.attach(snapped, "tank", "base", DISKS[2])
    before = await assert_agree(snapped)
    with pytest.raises(errors.Busy, match="cache"):
        await snapped.revert("tank", "base.1")
    assert await assert_agree(snapped) == before


async def test_a_scheduled_revert_and_a_cache_refuse_each_other(snapped: PoolService) -> None:
    """A cache's -corig would keep the old thin id open under the revert."""
    sim(snapped).add_disk(DISKS[2], 7, 40, 256 * 2048)
    sim(snapped).open_device("tank-base")
    await snapped.revert("tank", "base.1")
    before = await assert_agree(snapped)
    with pytest.raises(errors.Busy, match="revert scheduled"):
        await cache.attach(snapped, "tank", "base", DISKS[2])
    await snapped.create_volume("tank", "fast", 64 * MIB)
    with pytest.raises(errors.Busy, match="revert scheduled"):
        await cache.attach(snapped, "tank", "fast", "tank/base")  # as another's cache
    await snapped.delete_volume("tank", "fast")
    assert (await assert_agree(snapped))["volumes"] == before["volumes"]
