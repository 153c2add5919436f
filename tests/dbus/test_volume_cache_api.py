"""Caches over a real dbus-daemon, against dmd --sim: AttachCache and
DetachCache as jobs, the properties that show the cache, named errors."""

from __future__ import annotations

import pytest
from dbus_fast import Variant
from test_pools_api import create_pool, disks, finished, props  # type: ignore[import-not-found]

from dmd.dbus.names import POOL_INTERFACE, VOLUME_INTERFACE
from tests.dbus.bus_client import CallError, Client

__all__ = ["disks"]  # the fixture, used by name

MIB = 1 << 20


async def test_attach_and_detach_over_the_bus(client: Client, disks: list[str]) -> None:
    pool, job = await create_pool(client, "tank", disks[:1])
    assert (await finished(client, job))["State"] == "completed"
    volume, job = await client.call(pool, POOL_INTERFACE, "CreateVolume", "sta{sv}",
                                    ["v", 64 * MIB, {}])
    assert (await finished(client, job))["State"] == "completed"
    with pytest.raises(CallError) as refused:
        await client.call(str(volume), VOLUME_INTERFACE, "AttachCache", "sa{sv}",
                          [disks[1], {"mode": Variant("s", "writearound")}])
    assert refused.value.short == "InvalidArgument"
    (job,) = await client.call(str(volume), VOLUME_INTERFACE, "AttachCache", "sa{sv}",
                               [disks[1], {"mode": Variant("s", "writethrough")}])
    state = await finished(client, job)
    assert (state["State"], state["Operation"]) == ("completed", "volume-cache-attach")
    shown = await props(client, str(volume), VOLUME_INTERFACE)
    assert (shown["Cache"], shown["CacheDevice"]) == ("writethrough", disks[1])
    with pytest.raises(CallError) as busy:
        await client.call(str(volume), VOLUME_INTERFACE, "Deactivate", "a{sv}", [{}])
    assert busy.value.short == "Busy"
    (job,) = await client.call(str(volume), VOLUME_INTERFACE, "DetachCache", "a{sv}", [{}])
    assert (await finished(client, job))["State"] == "completed"
    assert (await props(client, str(volume), VOLUME_INTERFACE))["Cache"] == ""
