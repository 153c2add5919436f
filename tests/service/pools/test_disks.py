"""Manager.ListDisks' service side: every disk with its size, what is on it
and why no pool can take it now, as CreatePool would judge it."""

from __future__ import annotations

import asyncio

import pytest

from dmd.engine.sim import SimDM
from dmd.service import errors
from dmd.service.auth import Caller
from dmd.service.pools.core import Disk
from dmd.service.pools.service import PoolService
from tests.service.pools.kit import DISKS


async def test_disks_say_which_a_pool_can_take_and_why_not(pools: PoolService) -> None:
    sim: SimDM = pools.kernel.engine  # type: ignore[assignment]
    sim.add_disk("/dev/simsmall", 7, 20, 8 * 2048)  # 8 MiB
    await pools.create_pool("tank", DISKS[:1])
    await pools.create_volume("tank", "v", 1 << 30)
    found = {d.path: d for d in await pools.disks()}
    assert found[DISKS[0]] == Disk(DISKS[0], 256 << 20, "dmd_pool", "a device of pool tank")
    assert found[DISKS[1]] == Disk(DISKS[1], 256 << 20, "", "")
    assert found["/dev/simext4"].signature == "ext4" and found["/dev/simext4"].busy == ""
    assert found["/dev/simsmall"].busy.startswith("smaller than")
    # Held by another device (as a mount, or another tool's table, would).
    sim.device_create("other")
    sim.table_load("other", [(0, 2048, "linear", f"{DISKS[1]} 0")])
    found = {d.path: d for d in await pools.disks()}
    assert found[DISKS[1]].busy == "in use (mounted, or held by another device)"


async def test_only_who_may_make_pools_may_survey_the_disks(pools: PoolService) -> None:
    """It reads every disk's first bytes: not for every local user."""
    with pytest.raises(errors.NotAuthorized):
        await pools.disks(Caller(uid=1000))
    first, second = await asyncio.gather(pools.disks(), pools.disks())
    assert first == second  # one survey for both
