"""Thick volumes over a real dbus-daemon, against dmd --sim: CreateVolume's
thin, stripes and stripe-size options, and the properties that show them."""

from __future__ import annotations

from typing import Any

import pytest
from dbus_fast import Variant
from test_pools_api import create_pool, disks, finished, props  # type: ignore[import-not-found]

from dmd.dbus.names import POOL_INTERFACE, VOLUME_INTERFACE
from tests.dbus.bus_client import CallError, Client

__all__ = ["disks"]  # the fixture, used by name

MIB = 1 << 20


async def test_a_striped_thick_volume_over_the_bus(client: Client, disks: list[str]) -> None:
    pool, job = await create_pool(client, "tank", disks[:2],
                                  **{"data-size": Variant("t", 32 * MIB)})
    assert (await finished(client, job))["State"] == "completed"
    volume, job = await client.call(pool, POOL_INTERFACE, "CreateVolume", "sta{sv}", [
        "db", 20 * MIB, {"thin": Variant("b", False), "stripes": Variant("u", 2),
                         "stripe-size": Variant("t", 128 * 1024)}])
    assert (await finished(client, job))["State"] == "completed"
    shown: dict[str, Any] = await props(client, str(volume), VOLUME_INTERFACE)
    assert (shown["Thin"], shown["Stripes"], shown["Size"]) == (False, 2, 20 * MIB)
    assert shown["UsedBytes"] == 20 * MIB  # a thick volume holds all of its size
    with pytest.raises(CallError) as refused:
        await client.call(str(volume), VOLUME_INTERFACE, "Snapshot", "sa{sv}", ["s", {}])
    assert refused.value.short == "InvalidArgument"
    (job,) = await client.call(str(volume), VOLUME_INTERFACE, "Resize", "ta{sv}",
                               [40 * MIB, {}])
    assert (await finished(client, job))["State"] == "completed"
    assert (await props(client, str(volume), VOLUME_INTERFACE))["Size"] == 40 * MIB
