"""The reconciler keeps the inventory equal to the kernel when another tool
changes it: on SimDM (the other tool is a second SimDM on the same file) and
on the lab's kernel (the other tool is a second control handle).

Syncs and audits are called directly here; what triggers them (kernel events,
uevents, the audit timer) is tested with a real dmd in tests/lab.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from test_service import ZERO, P, open_service

from dmd.engine import DM, DevId, DmFlags, TargetLine
from dmd.engine.sim import SimDM
from dmd.service.devices.inventory import DeviceView, Inventory, UdevInfo
from dmd.service.devices.operations import DeviceService
from dmd.service.devices.reconcile import Reconciler, UdevEvent

OTHER_TABLE = [TargetLine(0, 4096, "error", "")]


@pytest.fixture(params=["sim", pytest.param("kernel", marks=pytest.mark.kernel)])
def kind(request: pytest.FixtureRequest) -> str:
    if request.param == "kernel":
        request.getfixturevalue("clean_dm")
    return str(request.param)


class World:
    """A service, its inventory and reconciler, and another tool on the same kernel."""

    def __init__(self, service: DeviceService, other: Any) -> None:
        self.service, self.other = service, other
        self.inventory = Inventory(service)
        self.reconciler = Reconciler(inventory=self.inventory)

    def mine(self) -> dict[str, DeviceView]:
        return {v.name: v for v in self.inventory if v.name.startswith(P)}

    def other_create(self, name: str, table: list[TargetLine] = ZERO) -> None:
        self.other.device_create(name)
        self.other.table_load(name, table)
        self.other.device_suspend(name, DmFlags(0))


@pytest.fixture
async def world(kind: str, tmp_path: Path) -> AsyncIterator[World]:
    service = open_service(tmp_path, kind=kind)
    other: Any = DM() if kind == "kernel" else SimDM(tmp_path / "kernel.json")
    w = World(service, other)
    await w.inventory.rescan()
    yield w
    await w.reconciler.settled()
    other.close()
    service.close()


async def test_sync_follows_external_create_rename_and_remove(world: World) -> None:
    world.other_create(P + "a")
    world.other_create(P + "b")
    await world.reconciler.sync()
    assert set(world.mine()) == {P + "a", P + "b"}
    device = world.mine()[P + "a"].device

    world.other.device_rename(P + "a", DevId.name(P + "c"))
    world.other.device_remove(P + "b")
    await world.reconciler.sync()
    assert set(world.mine()) == {P + "c"}
    assert world.mine()[P + "c"].device == device  # the same device, renamed
    assert not world.mine()[P + "c"].managed


async def test_audit_finds_what_no_event_reports(world: World) -> None:
    """A suspend or a table load by another tool moves no event number; the
    audit compares each device's flags."""
    world.other_create(P + "a")
    await world.reconciler.sync()
    world.other.device_suspend(P + "a", DmFlags.DM_SUSPEND)
    world.other.table_load(P + "a", OTHER_TABLE)
    await world.reconciler.audit()
    view = world.mine()[P + "a"]
    assert view.suspended
    assert list(view.inactive_table) == OTHER_TABLE
    world.other.device_suspend(P + "a", DmFlags(0))
    await world.reconciler.audit()
    view = world.mine()[P + "a"]
    assert not view.suspended and list(view.live_table) == OTHER_TABLE


async def test_external_reload_of_a_managed_device_is_drift_not_fixed(world: World) -> None:
    await world.service.create(P + "m", ZERO)
    await world.inventory.refresh(P + "m")
    assert not world.mine()[P + "m"].drifted
    world.other.table_load(P + "m", OTHER_TABLE)
    world.other.device_suspend(P + "m", DmFlags(0))
    await world.reconciler.audit()
    view = world.mine()[P + "m"]
    assert view.drifted and list(view.live_table) == OTHER_TABLE  # shown, not undone
    record = await world.service.store.get_device(P + "m")
    assert record is not None and record.drifted
    assert list(record.table) == ZERO  # the record keeps what dmd made


async def test_own_changes_racing_syncs_are_not_drift(world: World) -> None:
    await world.service.create(P + "m", ZERO)
    tables = [[TargetLine(0, 2048 + 8 * i, "zero", "")] for i in range(1, 6)]

    async def syncing() -> None:
        for _ in range(40):
            await world.reconciler.audit()
            await asyncio.sleep(0)

    async def reloading() -> None:
        for table in tables:
            await world.service.reload(P + "m", table)

    await asyncio.gather(syncing(), reloading())
    await world.reconciler.audit()
    view = world.mine()[P + "m"]
    assert list(view.live_table) == tables[-1]
    assert not view.drifted


async def test_udev_news_reaches_the_view(world: World) -> None:
    world.other_create(P + "a")
    await world.reconciler.sync()
    device = world.mine()[P + "a"].device
    info = UdevInfo(symlinks=("/dev/disk/by-id/dm-name-" + P + "a",), fs_type="ext4",
                    fs_uuid="u-1", ready=True)
    world.reconciler.udev_event(UdevEvent("change", device, P + "a", info))
    await world.reconciler.settled()
    assert world.mine()[P + "a"].udev == info
    world.other.device_remove(P + "a")
    world.reconciler.udev_event(UdevEvent("remove", device, P + "a", UdevInfo()))
    await world.reconciler.settled()
    assert P + "a" not in world.mine()


# -- simulator only: what the lab tests with real targets and real storms -------

async def test_event_number_move_is_reported_with_status(tmp_path: Path) -> None:
    service = open_service(tmp_path)
    other = SimDM(tmp_path / "kernel.json")
    world = World(service, other)
    seen: list[tuple[str, int, list[TargetLine]]] = []
    world.reconciler.on_dm_event(lambda v, status: seen.append((v.name, v.event_nr, status)))
    world.other_create(P + "a")
    await world.inventory.rescan()
    other.trigger_event(P + "a")
    await world.reconciler.sync()
    await world.reconciler.settled()
    assert seen == [(P + "a", 1, [TargetLine(0, 2048, "zero", "")])]
    service.close()


async def test_a_storm_costs_one_refresh_per_device(tmp_path: Path) -> None:
    service = open_service(tmp_path)
    other = SimDM(tmp_path / "kernel.json")
    world = World(service, other)
    await world.inventory.rescan()
    n = 300
    for i in range(n):
        world.other_create(f"{P}s{i}")
    before = world.inventory.refresh_count
    for _ in range(n):  # one hint per device, as the kernel's events would come
        world.reconciler.kernel_event()
    await world.reconciler.settled()
    assert len(world.mine()) == n
    assert world.reconciler.syncs <= 2
    assert world.inventory.refresh_count - before == n
    for i in range(n):
        other.device_remove(f"{P}s{i}")
        world.reconciler.kernel_event()
    await world.reconciler.settled()
    assert world.mine() == {}
    assert world.inventory.refresh_count - before == n  # drops need no reads
    service.close()


async def test_records_follow_a_managed_device_renamed_or_removed_outside(
        world: World) -> None:
    store = world.service.store
    await world.service.create(P + "keep", ZERO, persistent=True)
    await world.service.create(P + "temp", ZERO)
    await world.service.create(P + "old", ZERO)
    await world.reconciler.sync()
    world.other.device_rename(P + "old", DevId.name(P + "new"))
    world.other.device_remove(P + "keep")
    world.other.device_remove(P + "temp")
    await world.reconciler.sync()
    assert set(world.mine()) == {P + "new"}
    assert world.mine()[P + "new"].managed and world.mine()[P + "new"].drifted
    renamed = await store.get_device(P + "new")
    assert renamed is not None and "renamed outside dmd" in (renamed.drifted or "")
    assert await store.get_device(P + "old") is None
    kept = await store.get_device(P + "keep")  # persistent: comes back at the next start
    assert kept is not None and "removed outside dmd" in (kept.drifted or "")
    assert await store.get_device(P + "temp") is None


async def test_own_renames_and_removes_racing_syncs_leave_records_alone(
        world: World) -> None:
    store = world.service.store
    await world.service.create(P + "r0", ZERO, persistent=True)

    async def syncing() -> None:
        for _ in range(30):
            await world.reconciler.sync()
            await asyncio.sleep(0)

    async def renaming() -> None:
        for i in range(1, 6):
            await world.service.rename(P + f"r{i - 1}", P + f"r{i}")
        await world.service.create(P + "gone", ZERO)
        await world.service.remove(P + "gone")

    await asyncio.gather(syncing(), renaming())
    await world.reconciler.sync()
    record = await store.get_device(P + "r5")
    assert record is not None and not record.drifted
    assert [r.name for r in await store.list_devices()] == [P + "r5"]


@pytest.fixture
async def sim_world(tmp_path: Path) -> AsyncIterator[World]:
    service = open_service(tmp_path, kind="sim")
    w = World(service, SimDM(tmp_path / "kernel.json"))
    await w.inventory.rescan()
    yield w
    await w.reconciler.settled()
    w.other.close()
    service.close()


async def test_an_audit_of_many_devices_is_a_few_worker_jobs(sim_world: World) -> None:
    """An idle dmd's timers must stay cheap: an audit reads its devices in
    batches, one worker hand-over per batch, not one per device. (The count
    does not depend on the engine: SimDM only.)"""
    world = sim_world
    names = [f"{P}many{i:03}" for i in range(300)]
    for name in names:
        world.other_create(name)
    await world.reconciler.sync()
    assert set(names) <= set(world.mine())
    world.other.device_suspend(names[-1], DmFlags.DM_SUSPEND)
    calls = 0
    kernel = world.service.kernel

    async def counting(call: Any, *args: Any) -> Any:
        nonlocal calls
        calls += 1
        return await kernel(call, *args)

    world.service.kernel = counting  # type: ignore[assignment]
    try:
        await world.reconciler.audit()
    finally:
        world.service.kernel = kernel
    assert world.mine()[names[-1]].suspended  # the audit still finds what changed
    # one listing, ceil(300 / 128) = 3 status batches, one refresh of the
    # suspended device (a few ioctls), and nothing per unchanged device
    assert calls < 10, calls


async def test_each_change_reads_the_device_once_and_is_shown_on_return(
        sim_world: World) -> None:
    """The service settles the inventory before an operation returns (no
    front end has to), with one read of the device per change."""
    world = sim_world
    service, inventory = world.service, world.inventory
    for step, call in [
        ("create", lambda: service.create(P + "once", ZERO)),
        ("reload", lambda: service.reload(P + "once", [TargetLine(0, 4096, "zero", "")])),
        ("suspend", lambda: service.suspend(P + "once")),
        ("resume", lambda: service.resume(P + "once")),
        ("rename", lambda: service.rename(P + "once", P + "twice")),
    ]:
        before = inventory.refresh_count
        await call()
        assert inventory.refresh_count - before == 1, step
    view = inventory.get(P + "twice")
    assert view is not None and view.size_bytes == 4096 * 512 and not view.suspended
    assert inventory.get(P + "once") is None
    before = inventory.refresh_count
    await service.remove(P + "twice")
    assert inventory.refresh_count - before == 1
    assert inventory.get(P + "twice") is None


async def test_back_to_back_syncs_take_at_most_their_duty_share() -> None:
    """A job asked for again while it runs rests between runs, so a listing
    whose cost grows with the device count cannot take over the loop."""
    from dmd.service.devices.reconcile import Coalesced

    busy = 0.0
    runs: list[float] = []

    async def job() -> None:
        nonlocal busy
        runs.append(asyncio.get_running_loop().time())
        if len(runs) < 4:
            coalesced.request()  # an event arrives during every run
        started = asyncio.get_running_loop().time()
        await asyncio.sleep(0.02)
        busy += asyncio.get_running_loop().time() - started

    coalesced = Coalesced(job, "test", duty=0.25)
    began = asyncio.get_running_loop().time()
    coalesced.request()
    await coalesced.idle()
    elapsed = asyncio.get_running_loop().time() - began
    assert coalesced.runs == 4
    assert busy / elapsed <= 0.25 * 1.2 + 0.05  # 3 rests of 3x each run
    assert elapsed >= 4 * 0.02 + 3 * 0.06 - 0.01


async def test_only_the_overhead_a_job_reports_is_bounded() -> None:
    """A sync's refreshes are the work it exists for: only its listing (the
    overhead it returns) makes it rest."""
    from dmd.service.devices.reconcile import Coalesced

    runs = 0

    async def job() -> float:
        nonlocal runs
        runs += 1
        if runs < 3:
            coalesced.request()
        await asyncio.sleep(0.05)  # refreshing: useful
        return 0.001  # the listing

    coalesced = Coalesced(job, "test", duty=0.1)
    began = asyncio.get_running_loop().time()
    coalesced.request()
    await coalesced.idle()
    assert runs == 3
    assert asyncio.get_running_loop().time() - began < 3 * 0.05 + 0.1  # rests of 9 ms


async def test_a_single_request_runs_at_once_and_does_not_rest() -> None:
    from dmd.service.devices.reconcile import Coalesced

    ran = asyncio.Event()

    async def job() -> None:
        ran.set()

    coalesced = Coalesced(job, "test", duty=0.01)
    began = asyncio.get_running_loop().time()
    coalesced.request()
    await coalesced.idle()
    assert ran.is_set() and asyncio.get_running_loop().time() - began < 0.05
