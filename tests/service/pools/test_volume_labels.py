"""SetLabels: a volume's labels replaced after its creation, in the records
and the pool's description at once; refused, with nothing changed, beyond
the bounds every label has or for another uid; a crash leaves the old
labels or the new, never a description that disagrees."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dmd.service import errors
from dmd.service.auth import Action, Caller
from dmd.service.devices.operations import MAX_LABEL_BYTES, MAX_LABELS
from dmd.service.journal import VolumeLabelsStep
from dmd.service.pools.service import PoolService
from tests.service.pools.kit import (
    DISKS,
    GIB,
    assert_agree,
    assert_described,
    close,
    crash_at,
    open_pools,
    recovered,
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
