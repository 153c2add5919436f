"""A volume is its owner's alone: what a service allowed the "volume" action
(and nothing else) tries against another's volume or the pool itself gets a
named error, never a device that is not its own volume's."""

from __future__ import annotations

import asyncio
import os

import pytest

from dmd.service import errors
from dmd.service.auth import Action, Caller
from dmd.service.pools.open import open_volume
from dmd.service.pools.service import PoolService, volume_uuid
from tests.service.pools.kit import DISKS, GIB

ALICE, BOB = Caller(uid=1001), Caller(uid=1002)


class VolumesOnly:
    """What polkit says to a service given the "volume" action alone."""

    async def authorize(self, caller: Caller, action: Action, device: str) -> None:
        if action is not Action.VOLUME:
            raise errors.NotAuthorized(f"uid {caller.uid}: {action.value} is for admins")


@pytest.fixture
async def tank(pools: PoolService) -> PoolService:
    pools.devices.authorizer = VolumesOnly()
    await pools.create_pool("tank", DISKS[:2])
    return pools


async def test_no_volume_or_snapshot_takes_a_pools_device_name(tank: PoolService) -> None:
    await tank.create_volume("tank", "mine", GIB, caller=ALICE)
    for name in ("tdata", "tmeta", "tpool"):
        with pytest.raises(errors.InvalidArgument, match="pool's own device"):
            await tank.snapshot("tank", "mine", name, activate=False, caller=ALICE)
        with pytest.raises(errors.InvalidArgument, match="pool's own device"):
            await tank.create_volume("tank", name, GIB, caller=ALICE)
    assert [v.name for v in await tank.volumes("tank")] == ["mine"]


async def test_a_call_on_a_deleted_volume_never_reaches_its_namesake(
        tank: PoolService) -> None:
    """A's object stands for A's volume: once it is deleted and B makes a
    volume of the same name, A's calls through the old object find nothing,
    whatever was queued behind the pool's lock."""
    old = await tank.create_volume("tank", "shared", GIB, caller=ALICE)
    async with tank.locks.hold("tank"):
        # A's OpenDevice, queued behind the lock while the volume is gone
        # and made again by B, passes its first owner check now.
        opening = asyncio.create_task(open_volume(tank, "tank", "shared", "rw",
                                                  uuid=old.uuid, caller=ALICE))
        await asyncio.sleep(0.05)
    # The lock went to the open first: A's own volume, still there.
    os.close(await opening)
    await tank.delete_volume("tank", "shared", caller=ALICE)
    new = await tank.create_volume("tank", "shared", GIB, caller=BOB)
    calls = [
        open_volume(tank, "tank", "shared", "rw", uuid=old.uuid, caller=ALICE),
        tank.set_active("tank", "shared", False, uuid=old.uuid, caller=ALICE),
        tank.resize_volume("tank", "shared", 2 * GIB, uuid=old.uuid, caller=ALICE),
        tank.delete_volume("tank", "shared", uuid=old.uuid, caller=ALICE),
        tank.snapshot("tank", "shared", "copy", uuid=old.uuid, caller=ALICE),
    ]
    for call in calls:
        with pytest.raises(errors.NotFound, match="is gone"):
            await call
    assert [(v.uuid, v.size_bytes, v.active) for v in await tank.volumes("tank")] == [
        (new.uuid, GIB, True)]
    with pytest.raises(errors.NotAuthorized):
        await open_volume(tank, "tank", "shared", "rw", caller=ALICE)


async def test_the_open_checks_the_volumes_dm_uuid_before_the_lock_and_in_it(
        tank: PoolService) -> None:
    """The owner read before the lock is read again in it: a volume deleted
    and made again by another while A waits is not A's to open."""
    old = await tank.create_volume("tank", "shared", GIB, caller=ALICE)
    async with tank.locks.hold("tank"):
        opening = asyncio.create_task(open_volume(tank, "tank", "shared", "rw",
                                                  caller=ALICE))
        await asyncio.sleep(0.05)
        # What a queued Delete and B's create do, while A's open waits.
        await tank.store.pool_change("tank", remove=old.uuid)
        for device in ("tank-shared",):
            await tank.devices.remove(device, claim=tank.owner("tank"))
    with pytest.raises(errors.NotFound, match="is gone"):
        await opening


async def test_a_device_of_the_volumes_name_that_is_not_its_own_is_refused(
        tank: PoolService) -> None:
    """Activate and OpenDevice trust no device for its name: its DM UUID must
    be the volume's."""
    volume = await tank.create_volume("tank", "v", GIB, caller=ALICE)
    await tank.set_active("tank", "v", False, caller=ALICE)
    # A device of the volume's name that is not the volume's (whatever made it).
    await tank.devices.create("tank-v", [(0, 8, "zero", "")], uuid="NOT-THE-VOLUME",
                              persistent=True, claim=tank.owner("tank"))
    with pytest.raises(errors.Busy, match="is not volume tank/v's"):
        await tank.set_active("tank", "v", True, caller=ALICE)
    with pytest.raises(errors.NotActive):
        await open_volume(tank, "tank", "v", "rw", caller=ALICE)
    await tank.devices.remove("tank-v", claim=tank.owner("tank"))
    await tank.set_active("tank", "v", True, caller=ALICE)
    info = tank.kernel.engine.device_info("tank-v")  # type: ignore[attr-defined]
    assert info.uuid == volume_uuid(volume.uuid)


async def test_labels_are_bounded_and_the_description_always_fits(tank: PoolService) -> None:
    """Labels cost what their UTF-8 takes in the pool's description; control
    characters are refused; a change whose description would not fit in the
    devices' copy is LimitExceeded before any work, so the pool can always
    be described (and imported): issue 26's 7 volumes of 64 labels of 1 KiB
    of "\\x01" took dmd down."""
    with pytest.raises(errors.InvalidArgument, match="control characters"):
        await tank.create_volume("tank", "v", GIB, caller=ALICE,
                                 labels={f"k{i}": "\x01" * 1000 for i in range(64)})
    with pytest.raises(errors.InvalidArgument, match="at most 16384"):
        await tank.create_volume("tank", "v", GIB, caller=ALICE,
                                 labels={f"k{i:02}": "é" * 500 for i in range(64)})
    labels = {f"k{i:02}": "x" * 252 for i in range(64)}  # 16,384 bytes: the most
    made = 0
    while True:
        before = await tank.volumes("tank")
        record = await tank.pool("tank")
        try:
            await tank.create_volume("tank", f"v{made}", 1 << 20, caller=ALICE, labels=labels)
        except errors.LimitExceeded:
            break
        made += 1
    assert await tank.volumes("tank") == before
    assert await tank.pool("tank") == record  # not even a thin id taken
    assert 100 < made < 130  # a copy holds ~2 MiB: ~120 volumes of 16 KiB of labels
    with pytest.raises(errors.LimitExceeded):
        await tank.snapshot("tank", "v0", "snap", caller=ALICE, labels=labels)
    await tank.snapshot("tank", "v0", "snap", caller=ALICE)  # a label-less one fits
    # Labels set afterwards are held to the same room: refused, nothing changed.
    generation = (await tank.pool("tank")).generation
    with pytest.raises(errors.LimitExceeded):
        await tank.set_labels("tank", "snap", labels, caller=ALICE)
    assert [v.labels for v in await tank.volumes("tank") if v.name == "snap"] == [{}]
    assert (await tank.pool("tank")).generation == generation
    await tank.describe("tank")
    assert tank.descriptions.written[record.uuid] == (await tank.pool("tank")).generation
