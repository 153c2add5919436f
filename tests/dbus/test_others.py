"""Other tools change the (simulated) kernel behind dmd's back: the bus
follows. A second SimDM on dmd's sim file plays the other tool. The simulator
raises device-mapper's global event as the kernel does (through a FIFO beside
its file), so creates, removes, renames and table swaps reach dmd at once;
what no event reports (a suspend) is found by the audit (--audit-interval)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from dbus_fast import BusType
from dbus_fast.aio import MessageBus

from dmd.dbus.names import device_path
from dmd.engine import DevId, DmFlags, TargetLine
from dmd.engine.sim import SimDM
from tests.dbus.bus_client import Client
from tests.helpers import unvariant, wakeups

AUDIT = 0.2  # seconds


@pytest.fixture
async def fast_audit(make_dmd: Callable[..., Any]) -> AsyncIterator[tuple[Any, Client, SimDM]]:
    dmd = make_dmd("--audit-interval", str(AUDIT))
    bus = await MessageBus(bus_address=dmd.address, bus_type=BusType.SESSION).connect()
    client = Client(bus)
    await client.watch()
    yield dmd, client, SimDM(dmd.sim)
    bus.disconnect()


async def until(predicate: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def members(client: Client, member: str) -> list[Any]:
    return [s for s in client.signals if s.member == member]



def create(sim: SimDM, name: str, table: list[TargetLine]) -> None:
    sim.device_create(name)
    sim.table_load(name, table)
    sim.device_suspend(name, DmFlags(0))


async def test_external_create_change_and_remove_reach_the_bus(
        fast_audit: tuple[Any, Client, SimDM]) -> None:
    _, client, sim = fast_audit
    create(sim, "theirs", [TargetLine(0, 2048, "zero", "")])
    await until(lambda: members(client, "InterfacesAdded"))
    added = members(client, "InterfacesAdded")[0]
    assert added.body[0] == device_path(0)
    props = await client.props(device_path(0))
    assert props["Name"] == "theirs" and not props["Managed"]

    sim.device_suspend("theirs", DmFlags.DM_SUSPEND)
    await until(lambda: any(s.member == "PropertiesChanged" and
                            "Suspended" in s.body[1] for s in client.signals))
    assert (await client.props(device_path(0)))["Suspended"] is True

    sim.device_suspend("theirs", DmFlags(0))
    sim.device_remove("theirs")
    await until(lambda: members(client, "InterfacesRemoved"))
    assert await client.managed_objects() == {}


async def test_managed_device_changed_outside_is_drifted_not_fixed(
        fast_audit: tuple[Any, Client, SimDM]) -> None:
    _, client, sim = fast_audit
    path = await client.create("mine", [(0, 2048, "zero", "")])
    sim.table_load("mine", [TargetLine(0, 4096, "error", "")])
    sim.device_suspend("mine", DmFlags(0))
    await until(lambda: any(s.member == "PropertiesChanged" and "Drifted" in s.body[1]
                            for s in client.signals))
    props = await client.props(path)
    assert props["Drifted"] is True
    assert props["LiveTable"] == [[0, 4096, "error", ""]]  # shown as it is, not undone


async def test_kernel_event_is_signalled_with_status(
        fast_audit: tuple[Any, Client, SimDM]) -> None:
    _, client, sim = fast_audit
    path = await client.create("ev", [(0, 2048, "zero", "")])
    sim.trigger_event("ev")
    await until(lambda: members(client, "Event"))
    event = members(client, "Event")[0]
    assert event.path == path
    assert event.body[0] == 1
    assert [list(line) for line in event.body[1]] == [[0, 2048, "zero", ""]]
    assert (await client.props(path))["EventNumber"] == 1


async def test_typed_status(fast_audit: tuple[Any, Client, SimDM]) -> None:
    _, client, sim = fast_audit
    sim.add_disk("/dev/simdisk1", 7, 1, 4096)
    sim.add_disk("/dev/simdisk2", 7, 2, 4096)
    path = await client.create("st", [(0, 4096, "striped", "2 8 7:1 0 7:2 0"),
                                      (4096, 8, "zero", "")])
    lines = unvariant(await client.device(path, "GetTypedStatus", "a{sv}", {}))
    assert lines[0]["target"] == "striped" and lines[0]["state"] == "ok"
    assert lines[0]["devices"] == ["7:1", "7:2"]
    assert lines[0]["raw"] == "2 7:1 7:2 1 AA"
    assert lines[1] == {"start": 4096, "length": 8, "target": "zero", "raw": "",
                        "state": "unparsed"}



async def test_idle_dmd_never_wakes_up(make_dmd: Callable[..., Any]) -> None:
    """With its timers off and nothing happening, dmd sleeps: no polling."""
    dmd = make_dmd("--audit-interval", "0", "--sync-interval", "0")
    await asyncio.sleep(0.5)  # let start-up finish
    before = wakeups(dmd.proc.pid)
    await asyncio.sleep(2.0)
    assert wakeups(dmd.proc.pid) - before == 0


@pytest.mark.parametrize("timer", ["--audit-interval", "--sync-interval"])
async def test_idle_dmd_wakes_up_only_for_its_timers(make_dmd: Callable[..., Any],
                                                     timer: str) -> None:
    others = {"--audit-interval", "--sync-interval"} - {timer}
    dmd = make_dmd(timer, "0.5", *(arg for other in others for arg in (other, "0")))
    await asyncio.sleep(0.5)
    before = wakeups(dmd.proc.pid)
    await asyncio.sleep(2.0)
    assert 0 < wakeups(dmd.proc.pid) - before < 200


async def test_external_changes_arrive_by_kernel_event_without_timers(
        make_dmd: Callable[..., Any]) -> None:
    """With the sync and the audit off, only the simulated kernel's event can
    tell dmd: a create, a rename and a remove by another process reach the bus."""
    dmd = make_dmd("--audit-interval", "0", "--sync-interval", "0", "--no-udev")
    bus = await MessageBus(bus_address=dmd.address, bus_type=BusType.SESSION).connect()
    client = Client(bus)
    await client.watch()
    sim = SimDM(dmd.sim)
    create(sim, "evented", [TargetLine(0, 2048, "zero", "")])
    await until(lambda: members(client, "InterfacesAdded"), timeout=5)
    sim.device_rename("evented", DevId.name("renamed"))
    await until(lambda: any(s.member == "PropertiesChanged" and
                            unvariant(s.body[1]).get("Name") == "renamed"
                            for s in client.signals), timeout=5)
    sim.device_remove("renamed")
    await until(lambda: members(client, "InterfacesRemoved"), timeout=5)
    assert await client.managed_objects() == {}
    bus.disconnect()
