"""A pool's metadata checked before its thin-pool device is made, and
Repair: a damaged superblock is found at Start and at dmd's start (the pool
shown damaged, every change refused), Repair writes the mended copy into
the spare area and the two areas swap; a repair that loses a volume's thin
id changes nothing; an error and a crash at each step leave the old
metadata or the new, never neither."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from dmd.engine.sim import SimDM
from dmd.service import errors
from dmd.service.auth import Caller
from dmd.service.devices.recovery import recover
from dmd.service.journal import PoolRepairStep
from dmd.service.pools.recovery import recover_pools
from dmd.service.pools.service import PoolService
from dmd.state import PoolRecord
from tests.service.pools.kit import (
    DISKS,
    GIB,
    assert_agree,
    assert_disjoint,
    close,
    crash_at,
    open_pools,
    recovered,
    sim,
)


def damage(pools: PoolService, record: PoolRecord, *, superblock: bool = True,
           lost: tuple[int, ...] = ()) -> None:
    """The pool's metadata damaged where it lies (the pool down)."""
    meta = record.layout.metadata[0]
    sim(pools).damage_metadata(record.layout.devices[meta.device], meta.start * 512,
                               superblock=superblock, lost=lost)


@pytest.fixture
async def stopped(tank: PoolService) -> PoolService:
    await tank.create_volume("tank", "a", GIB)
    await tank.snapshot("tank", "a", "a.1", activate=False)
    await tank.stop_pool("tank")
    return tank


async def test_a_pool_has_a_spare_the_size_of_its_metadata(tank: PoolService) -> None:
    layout = (await tank.pool("tank")).layout
    assert layout.spare_sectors == layout.metadata_sectors
    assert layout.spare[0].start == layout.metadata[0].start + layout.metadata_sectors
    assert layout.data[0].start == layout.spare[0].start + layout.spare_sectors


async def test_start_finds_the_damage_and_repair_swaps_in_a_mended_copy(
        stopped: PoolService) -> None:
    before = await stopped.pool("tank")
    damage(stopped, before)
    with pytest.raises(errors.Corrupt, match=r"metadata is damaged.*superblock"):
        await stopped.start_pool("tank")
    assert (await stopped.pool_state("tank")).mode == "damaged"
    assert sorted(d.name for d in sim(stopped).list_devices()) == []
    for refused in (lambda: stopped.create_volume("tank", "b", GIB),
                    lambda: stopped.set_active("tank", "a.1", True),
                    lambda: stopped.rename_pool("tank", "other")):
        with pytest.raises(errors.Corrupt, match="Repair mends it"):
            await refused()

    repaired = await stopped.repair_pool("tank")
    assert repaired.layout.metadata == before.layout.spare
    assert repaired.layout.spare == before.layout.metadata
    record = await stopped.pool("tank")
    assert record.layout == repaired.layout and record.stopped
    assert "tank" not in stopped.damaged
    await stopped.start_pool("tank")
    # every active volume's thin table loaded: its thin id is in the copy
    assert "tank-a" in [d.name for d in sim(stopped).list_devices()]
    assert (await stopped.pool_state("tank")).transaction_id == record.transaction_id
    await assert_agree(stopped)
    await stopped.create_volume("tank", "b", GIB)  # and it changes again


async def test_a_repair_that_finds_no_mapping_of_a_volume_changes_nothing(
        stopped: PoolService) -> None:
    before = await stopped.pool("tank")
    lost = next(v for v in await stopped.store.list_volumes("tank") if v.name == "a.1")
    damage(stopped, before, superblock=False, lost=(lost.thin_id or 0,))
    with pytest.raises(errors.Corrupt):
        await stopped.start_pool("tank")
    with pytest.raises(errors.Failed, match=r"no mapping of a\.1"):
        await stopped.repair_pool("tank")
    assert await stopped.pool("tank") == before
    assert sorted(d.name for d in sim(stopped).list_devices()) == []
    assert "tank" in stopped.damaged


async def test_repair_is_refused_for_a_pool_whose_metadata_is_not_known_damaged(
        tank: PoolService) -> None:
    await tank.create_volume("tank", "a", GIB)
    with pytest.raises(errors.InvalidArgument, match="not known to be damaged"):
        await tank.repair_pool("tank")


async def test_dmd_start_after_a_reboot_finds_the_damage(tmp_path: Path) -> None:
    pools = open_pools(tmp_path)
    await pools.create_pool("tank", DISKS[:2])
    await pools.create_volume("tank", "a", GIB)
    record = await pools.pool("tank")
    close(pools)
    engine = SimDM(tmp_path / "kernel.json")  # a reboot: no device is left
    for name in ("tank-a", "tank-tpool", "tank-tdata", "tank-tmeta"):
        engine.device_remove(name)
    engine.damage_metadata(record.layout.devices[0], record.layout.metadata[0].start * 512,
                           superblock=True)
    pools = open_pools(tmp_path)
    try:
        report = await recover(pools.devices)
        await recover_pools(pools, report)
        assert sorted(report.failed) == ["tank-a", "tank-tpool"]
        assert (await pools.pool_state("tank")).mode == "damaged"
        with pytest.raises(errors.Corrupt):
            await pools.create_volume("tank", "b", GIB)
        await pools.repair_pool("tank")
        assert sorted(d.name for d in sim(pools).list_devices()) == [
            "tank-a", "tank-tdata", "tank-tmeta", "tank-tpool"]
        assert (await pools.pool_state("tank")).mode == "ok"
        await assert_agree(pools)
    finally:
        close(pools)


class Boom(Exception):
    pass


async def _stop_and_damage(tmp_path: Path) -> PoolRecord:
    pools = open_pools(tmp_path)
    await pools.create_pool("tank", DISKS[:2])
    await pools.create_volume("tank", "a", GIB)
    await pools.stop_pool("tank")
    record = await pools.pool("tank")
    damage(pools, record)
    close(pools)
    return record


# FORGET is taken with accept-loss alone (tested below).
STEPS = [step for step in PoolRepairStep if step is not PoolRepairStep.FORGET]


@pytest.mark.parametrize("step", STEPS)
async def test_an_error_at_each_step_leaves_the_old_metadata_or_the_new(
        tmp_path: Path, step: PoolRepairStep) -> None:
    before = await _stop_and_damage(tmp_path)

    def fault(op: str, number: int) -> None:
        if op == "pool-repair" and number == step:
            raise Boom(f"{op} step {number}")

    pools = open_pools(tmp_path)
    try:
        await pools.start()
        pools.devices.fault = pools.fault = fault
        with pytest.raises(Boom):
            await pools.repair_pool("tank")
        pools.devices.fault = pools.fault = None
        await _whole_either_way(pools, before, step >= PoolRepairStep.DEVICES_UP)
    finally:
        close(pools)


@pytest.mark.parametrize("step", STEPS)
def test_a_crash_at_each_step_leaves_the_old_metadata_or_the_new(
        tmp_path: Path, step: PoolRepairStep) -> None:
    before = asyncio.run(_stop_and_damage(tmp_path))
    crash_at(tmp_path, "pool-repair", step, lambda p: p.repair_pool("tank"))

    async def restart() -> None:
        pools = await recovered(tmp_path)
        try:
            await _whole_either_way(pools, before, step >= PoolRepairStep.DEVICES_UP)
        finally:
            close(pools)

    asyncio.run(restart())


async def _whole_either_way(pools: PoolService, before: PoolRecord, switched: bool) -> None:
    """No device of the stopped pool is left; its records name the old
    metadata (a repair then mends it) or the mended copy (Start works)."""
    assert sorted(d.name for d in sim(pools).list_devices()) == []
    record = await pools.pool("tank")
    assert record.stopped
    if switched:
        assert record.layout.metadata == before.layout.spare
    else:
        assert record.layout == before.layout
        await pools.repair_pool("tank")
    await pools.start_pool("tank")
    assert "tank-a" in [d.name for d in sim(pools).list_devices()]
    await assert_agree(pools)  # the kernel's thin ids are the records'


async def test_a_pool_without_a_spare_repairs_into_room_no_thick_volume_holds(
        pools: PoolService) -> None:
    """A pool made before spares (or whose metadata grew past its spare)
    takes the copy's room from what is free, never from a thick volume."""
    await pools.create_pool("tank", DISKS[:1], data_size=64 << 20)
    record = await pools.pool("tank")
    await pools.record_change("tank", layout=replace(record.layout, spare=()))
    thick = await pools.create_volume("tank", "t", 32 << 20, thin=False)
    await pools.create_volume("tank", "a", GIB)
    await pools.stop_pool("tank")
    damage(pools, await pools.pool("tank"))
    repaired = await pools.repair_pool("tank")
    volumes = await pools.store.list_volumes("tank")
    assert_disjoint(repaired, volumes)
    assert thick.thick is not None
    assert not {s.start for s in repaired.layout.metadata} & {s.start for s in
                                                              thick.thick.segments}
    await pools.start_pool("tank")
    await assert_agree(pools)


async def test_a_stopped_pool_repaired_is_described_with_its_new_metadata(
        stopped: PoolService) -> None:
    """Its disks may go to another machine next: their description names
    the mended copy (the old area's superblock is zeroed)."""
    damage(stopped, await stopped.pool("tank"))
    repaired = await stopped.repair_pool("tank")
    found = await stopped.descriptions.read(repaired.layout.devices)
    assert found.newest is not None
    assert found.newest.pool.layout.metadata == repaired.layout.metadata
    assert found.newest.generation == (await stopped.pool("tank")).generation


async def test_a_damaged_pool_can_be_stopped_and_destroyed(tmp_path: Path) -> None:
    pools = open_pools(tmp_path)
    await pools.create_pool("tank", DISKS[:2])
    await pools.create_volume("tank", "a", GIB)
    await pools.stop_pool("tank")
    damage(pools, await pools.pool("tank"), superblock=False, lost=(0,))
    with pytest.raises(errors.Corrupt):
        await pools.start_pool("tank")
    with pytest.raises(errors.Failed, match="no mapping of a"):
        await pools.repair_pool("tank")  # its one volume's thin id is gone
    await pools.destroy_pool("tank", force=True)
    assert await pools.store.get_pool("tank") is None and "tank" not in pools.damaged
    close(pools)


async def test_accept_loss_forgets_the_volumes_the_repair_lost_and_keeps_the_rest(
        stopped: PoolService) -> None:
    await stopped.start_pool("tank")
    await stopped.create_volume("tank", "b", GIB)
    await stopped.stop_pool("tank")
    before = await stopped.pool("tank")
    lost = next(v for v in await stopped.store.list_volumes("tank") if v.name == "a")
    damage(stopped, before, superblock=False, lost=(lost.thin_id or 0,))
    with pytest.raises(errors.Failed, match="accept-loss"):
        await stopped.repair_pool("tank")
    assert await stopped.pool("tank") == before
    await stopped.repair_pool("tank", accept_loss=True)
    assert sorted(v.name for v in await stopped.store.list_volumes("tank")) == ["a.1", "b"]
    await stopped.start_pool("tank")
    assert "tank-b" in [d.name for d in sim(stopped).list_devices()]
    await assert_agree(stopped)


@pytest.mark.parametrize("step", [PoolRepairStep.FORGET, PoolRepairStep.DEVICES_UP])
def test_a_crash_after_the_swap_with_accept_loss_forgets_the_lost_at_recovery(
        tmp_path: Path, step: PoolRepairStep) -> None:
    async def prepare() -> None:
        pools = open_pools(tmp_path)
        await pools.create_pool("tank", DISKS[:2])
        await pools.create_volume("tank", "a", GIB)
        await pools.create_volume("tank", "b", GIB)
        await pools.stop_pool("tank")
        record = await pools.pool("tank")
        lost = next(v for v in await pools.store.list_volumes("tank") if v.name == "a")
        damage(pools, record, superblock=False, lost=(lost.thin_id or 0,))
        close(pools)

    asyncio.run(prepare())
    crash_at(tmp_path, "pool-repair", step,
             lambda p: p.repair_pool("tank", accept_loss=True))

    async def restart() -> None:
        pools = await recovered(tmp_path)
        try:
            assert [v.name for v in await pools.store.list_volumes("tank")] == ["b"]
            assert sorted(d.name for d in sim(pools).list_devices()) == []
            # the disks' description follows (an import elsewhere finds b alone)
            record = await pools.pool("tank")
            found = await pools.descriptions.read(record.layout.devices)
            assert found.newest is not None
            assert [v.name for v in found.newest.volumes] == ["b"]
            await pools.start_pool("tank")
            await assert_agree(pools)
        finally:
            close(pools)

    asyncio.run(restart())


async def test_accept_loss_keeps_a_volume_whose_scheduled_revert_survived(
        stopped: PoolService) -> None:
    """Its own mappings lost, the copy a revert scheduled for it found: the
    copy becomes its data (the revert is applied as the pool starts)."""
    await stopped.start_pool("tank")
    sim(stopped).open_device("tank-a")  # open: the revert is scheduled
    await stopped.revert("tank", "a.1")
    sim(stopped).open_device("tank-a", -1)
    await stopped.stop_pool("tank")
    record = await stopped.pool("tank")
    a = next(v for v in await stopped.store.list_volumes("tank") if v.name == "a")
    assert a.revert is not None
    damage(stopped, record, superblock=False, lost=(a.thin_id or 0,))
    await stopped.repair_pool("tank", accept_loss=True)
    await stopped.start_pool("tank")
    a = next(v for v in await stopped.store.list_volumes("tank") if v.name == "a")
    assert a.revert is None and "tank-a" in [d.name for d in sim(stopped).list_devices()]
    await assert_agree(stopped)


async def test_repair_refuses_another_uid_and_a_device_taking_the_spare_name(
        stopped: PoolService) -> None:
    """Another uid may not repair a pool it does not own; a device already
    carrying the name the repair's spare device takes (another tool's) is
    AlreadyExists; either way nothing changes."""
    before = await stopped.pool("tank")
    damage(stopped, before)
    with pytest.raises(errors.NotAuthorized):
        await stopped.repair_pool("tank", caller=Caller(uid=1000))
    sim(stopped).device_create("tank-tmeta-spare")
    with pytest.raises(errors.AlreadyExists, match="tank-tmeta-spare"):
        await stopped.repair_pool("tank")
    assert await stopped.pool("tank") == before
    assert [d.name for d in sim(stopped).list_devices()] == ["tank-tmeta-spare"]
