"""Rename and SetLabels: a volume's name and labels changed after its
creation, in the kernel, the records and the pool's description at once;
refused, with nothing changed, where they cannot be (bad labels, another
uid's volume, a name taken, a cache or an open cleartext device); a crash
leaves the old or the new, never a description that disagrees. (A crash at
every step of both is in test_pools.py's every-step tests.)"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from dmd.engine.sim import SimDM
from dmd.service import errors
from dmd.service.auth import Action, Caller
from dmd.service.devices.operations import MAX_LABEL_BYTES, MAX_LABELS
from dmd.service.journal import PoolArgs, VolumeLabelsStep, VolumeRenameStep
from dmd.service.pools import naming
from dmd.service.pools.service import PoolService, volume_uuid
from tests.service.pools.kit import (
    DISKS,
    GIB,
    assert_agree,
    assert_described,
    close,
    crash_at,
    open_pools,
    recovered,
    state,
)


async def labels_of(pools: PoolService, name: str) -> dict[str, str]:
    (volume,) = [v for v in await pools.store.list_volumes("tank") if v.name == name]
    return volume.labels


async def test_labels_are_replaced_and_described(tank: PoolService) -> None:
    await tank.create_volume("tank", "v", GIB, labels={"old": "1"})
    changed = await tank.set_labels("tank", "v", {"containerd.io/snapshot/key": "k1",
                                                  "parent": ""})
    assert changed.labels == {"containerd.io/snapshot/key": "k1", "parent": ""}
    assert await labels_of(tank, "v") == changed.labels
    await assert_described(tank, await tank.pool("tank"))
    await tank.set_labels("tank", "v", {})
    assert await labels_of(tank, "v") == {}
    await assert_agree(tank)


@pytest.mark.parametrize("labels", [
    {"": "empty key"},
    {"k": "a\nb"},
    {f"k{i}": "v" for i in range(MAX_LABELS + 1)},
    {"k": "v" * (MAX_LABEL_BYTES + 1)},
])
async def test_bad_labels_are_refused_and_change_nothing(tank: PoolService,
                                                         labels: dict[str, str]) -> None:
    await tank.create_volume("tank", "v", GIB, labels={"kept": "yes"})
    generation = (await tank.pool("tank")).generation
    with pytest.raises(errors.InvalidArgument):
        await tank.set_labels("tank", "v", labels)
    assert await labels_of(tank, "v") == {"kept": "yes"}
    assert (await tank.pool("tank")).generation == generation
    assert [i for i in await tank.store.pending_intents()] == []


class VolumesOnly:
    """What polkit says to a service given the "volume" action alone."""

    async def authorize(self, caller: Caller, action: Action, device: str) -> None:
        if action is not Action.VOLUME:
            raise errors.NotAuthorized(f"uid {caller.uid}: {action.value} is for admins")


async def test_another_uids_volume_is_not_theirs_to_label(tank: PoolService) -> None:
    tank.devices.authorizer = VolumesOnly()
    await tank.create_volume("tank", "v", GIB, caller=Caller(uid=1000))
    with pytest.raises(errors.NotAuthorized):
        await tank.set_labels("tank", "v", {"mine": "now"}, caller=Caller(uid=1001))
    assert await labels_of(tank, "v") == {}
    await tank.set_labels("tank", "v", {"mine": "yes"}, caller=Caller(uid=1000))
    assert await labels_of(tank, "v") == {"mine": "yes"}


async def test_a_volume_gone_meanwhile_is_not_found(tank: PoolService) -> None:
    created = await tank.create_volume("tank", "v", GIB)
    await tank.delete_volume("tank", "v")
    await tank.create_volume("tank", "v", GIB)  # another volume, the same name
    with pytest.raises(errors.NotFound):
        await tank.set_labels("tank", "v", {"a": "b"}, uuid=created.uuid)
    assert await labels_of(tank, "v") == {}


@pytest.mark.parametrize("written", [False, True])
def test_a_crash_leaves_the_old_labels_or_the_new(tmp_path: Path, written: bool) -> None:
    async def prepare() -> None:
        pools = open_pools(tmp_path)
        await pools.create_pool("tank", DISKS[:2])
        await pools.create_volume("tank", "v", GIB, labels={"old": "1"})
        close(pools)

    asyncio.run(prepare())
    if written:  # the record written, dmd killed before the intent's end
        crash_at(tmp_path, "volume-set-labels-end", 1,
                 lambda p: _labelled_then_crash(p))
    else:
        crash_at(tmp_path, "volume-set-labels", VolumeLabelsStep.RECORD,
                 lambda p: p.set_labels("tank", "v", {"new": "2"}))

    async def restart() -> None:
        pools = await recovered(tmp_path)
        try:
            assert await labels_of(pools, "v") == ({"new": "2"} if written else {"old": "1"})
            await assert_agree(pools)
            await assert_described(pools, await pools.pool("tank"))
        finally:
            close(pools)

    asyncio.run(restart())


async def _labelled_then_crash(pools: PoolService) -> None:
    """SetLabels, then a crash before its intent is finished: the store's
    finish is where the fault hook fires."""
    finish = pools.store.finish_intent

    async def crash_first(intent_id: int, state: str) -> None:
        assert pools.fault is not None
        pools.fault("volume-set-labels-end", 1)
        await finish(intent_id, state)

    pools.store.finish_intent = crash_first  # type: ignore[method-assign]
    await pools.set_labels("tank", "v", {"new": "2"})


async def test_a_rename_keeps_the_volume_and_its_data(tank: PoolService) -> None:
    sim: SimDM = tank.kernel.engine  # type: ignore[assignment]
    base = await tank.create_volume("tank", "base", GIB)
    sim.write("tank-base", 0, 128)
    snap = await tank.snapshot("tank", "base", "base.snap")
    renamed = await tank.rename_volume("tank", "base", "db")
    assert (renamed.uuid, renamed.thin_id, renamed.owner_uid) == \
        (base.uuid, base.thin_id, base.owner_uid)
    names = {d.name for d in sim.list_devices()}
    assert "tank-db" in names and "tank-base" not in names
    assert sim.device_info("tank-db").uuid == volume_uuid(base.uuid)
    # Its snapshot still names it as its origin (by UUID).
    (s,) = [v for v in await tank.store.list_volumes("tank") if v.name == "base.snap"]
    assert s.origin_uuid == renamed.uuid == snap.origin_uuid
    await assert_described(tank, await tank.pool("tank"))
    await assert_agree(tank)
    # An inactive volume: only its record.
    await tank.set_active("tank", "base.snap", False)
    await tank.rename_volume("tank", "base.snap", "db.before")
    assert {v.name for v in await tank.store.list_volumes("tank")} == {"db", "db.before"}
    await tank.set_active("tank", "db.before", True)
    assert "tank-db.before" in {d.name for d in sim.list_devices()}
    await assert_agree(tank)


async def test_a_rename_that_cannot_be_is_refused_and_changes_nothing(
        tank: PoolService) -> None:
    await tank.create_volume("tank", "a", GIB)
    await tank.create_volume("tank", "b", GIB)
    before = await state(tank)
    with pytest.raises(errors.AlreadyExists):
        await tank.rename_volume("tank", "a", "b")
    # Empty, a path, the pool's own devices' names, a newline, too long.
    for bad in ("", "x/y", "-lead", "tpool", "tdata", "tmeta", "nl\n", "a" * 200):
        with pytest.raises(errors.InvalidArgument):
            await tank.rename_volume("tank", "a", bad)
    with pytest.raises(errors.NotFound):
        await tank.rename_volume("tank", "nope", "c")
    assert await state(tank) == before


async def test_a_device_of_that_name_made_by_another_tool_stops_the_rename(
        tank: PoolService) -> None:
    sim: SimDM = tank.kernel.engine  # type: ignore[assignment]
    await tank.create_volume("tank", "a", GIB)
    sim.device_create("tank-b")  # not dmd's: another tool's, or a leftover
    with pytest.raises(errors.ServiceError):
        await tank.rename_volume("tank", "a", "b")
    assert [v.name for v in await tank.store.list_volumes("tank")] == ["a"]
    assert sim.device_info("tank-a").uuid == volume_uuid(
        (await tank.store.list_volumes("tank"))[0].uuid)


@pytest.mark.parametrize("step", [VolumeRenameStep.DEVICE, VolumeRenameStep.RECORD])
def test_a_crash_in_a_rename_leaves_one_name_everywhere(tmp_path: Path, step: int) -> None:
    async def prepare() -> None:
        pools = open_pools(tmp_path)
        await pools.create_pool("tank", DISKS[:2])
        await pools.create_volume("tank", "v", GIB)
        close(pools)

    asyncio.run(prepare())
    crash_at(tmp_path, "volume-rename", step, lambda p: p.rename_volume("tank", "v", "w"))

    async def restart() -> None:
        pools = await recovered(tmp_path)
        try:
            (volume,) = await pools.store.list_volumes("tank")
            sim: SimDM = pools.kernel.engine  # type: ignore[assignment]
            assert volume.name in {d.name.removeprefix("tank-") for d in sim.list_devices()}
            await assert_agree(pools)
            await assert_described(pools, await pools.pool("tank"))
        finally:
            close(pools)

    asyncio.run(restart())


async def test_an_inactive_volume_is_not_renamed_to_a_name_taken_in_the_kernel(
        tank: PoolService) -> None:
    sim: SimDM = tank.kernel.engine  # type: ignore[assignment]
    await tank.create_volume("tank", "a", GIB)
    await tank.set_active("tank", "a", False)
    sim.device_create("tank-b")  # another tool's
    with pytest.raises(errors.AlreadyExists, match="tank-b"):
        await tank.rename_volume("tank", "a", "b")
    assert [v.name for v in await tank.store.list_volumes("tank")] == ["a"]


async def test_recovery_follows_the_device_record_when_the_kernel_has_none(
        tank: PoolService) -> None:
    """A crash after the device's rename, before the record's, and a start
    whose pool is not up yet: the device records say where the device is."""
    sim: SimDM = tank.kernel.engine  # type: ignore[assignment]
    volume = await tank.create_volume("tank", "v", GIB)
    await tank.devices.rename("tank-v", "tank-w", claim=tank.owner("tank"))
    sim.device_remove("tank-w")  # the kernel holds no device of it now
    renamed = replace(volume, name="w")
    intent_id = await tank.store.begin_intent(
        "volume-rename", "tank/v", PoolArgs(pool="tank", volume=renamed.to_json()).to_json())
    (intent,) = [i for i in await tank.store.pending_intents() if i.id == intent_id]
    state_ = await naming.recover_rename(tank, intent, PoolArgs.from_json(intent.args),
                                         await tank.pool("tank"))
    assert state_ == "done"
    assert [v.name for v in await tank.store.list_volumes("tank")] == ["w"]
