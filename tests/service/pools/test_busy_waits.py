"""A volume's device opened for a moment (udev's probe of a device just made
or just closed) does not make its Delete or Deactivate fail: dmd waits that
out (PROBE_WAITS); a device that stays open is Busy, nothing changed."""

from __future__ import annotations

import asyncio

import pytest

from dmd.service import errors
from dmd.service.pools.core import PROBE_WAITS
from dmd.service.pools.service import PoolService
from tests.service.pools.kit import GIB, sim


async def closed_after(pools: PoolService, device: str, seconds: float) -> None:
    await asyncio.sleep(seconds)
    sim(pools).open_device(device, -1)


@pytest.mark.parametrize("operation", ["delete", "deactivate"])
async def test_a_moments_open_is_waited_out(tank: PoolService, operation: str) -> None:
    await tank.create_volume("tank", "v", GIB)
    sim(tank).open_device("tank-v")  # udev's blkid, say
    closing = asyncio.create_task(closed_after(tank, "tank-v", 0.1))
    if operation == "delete":
        await tank.delete_volume("tank", "v")
        assert [v.name for v in await tank.store.list_volumes("tank")] == []
    else:
        await tank.set_active("tank", "v", False)
        assert not (await tank.store.list_volumes("tank"))[0].active
    await closing


async def test_a_device_that_stays_open_is_busy(tank: PoolService) -> None:
    await tank.create_volume("tank", "v", GIB)
    sim(tank).open_device("tank-v")  # mounted, say
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(errors.Busy, match="open"):
        await tank.delete_volume("tank", "v")
    assert loop.time() - start >= sum(PROBE_WAITS)
    assert [v.name for v in await tank.store.list_volumes("tank")] == ["v"]
    sim(tank).open_device("tank-v", -1)
