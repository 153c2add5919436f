"""udev's work on a change's nodes runs while the change goes on: a create,
snapshot or delete waits for it once, at its end, before its caller hears
of it (under emulation udev's rules took longer than the rest of a
create); a change that fails gives the waits up instead."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from dmd.engine import DmFlags, UdevWait
from dmd.engine.sim import SimDM
from dmd.service.pools.service import PoolService
from dmd.service.pools.volumes import VolumeDeleteStep
from tests.service.pools.kit import GIB, assert_agree


class SlowUdev:
    """The sim's resumes and removes hand their udev wait on (as the kernel's
    engine does); each wait blocks until ``done`` is set."""

    def __init__(self, sim: SimDM, fails: Exception | None = None) -> None:
        self.fails = fails
        self.done = threading.Event()
        self.waiting: list[str] = []  # what a wait began on, in order
        self.closed: list[str] = []  # closed (after a wait, or given up)
        for name in ("device_suspend", "device_remove"):
            setattr(sim, name, self._slow(getattr(sim, name)))

    async def begun(self) -> None:
        """Until a wait has begun (or 2 s have gone: the test's asserts judge)."""
        for _ in range(200):
            if self.waiting:
                return
            await asyncio.sleep(0.01)

    def _slow(self, call: Any) -> Any:
        def slowed(id: Any, flags: DmFlags = DmFlags(0),
                   later: list[UdevWait] | None = None) -> Any:
            info = call(id, flags)
            if later is not None and not flags & DmFlags.DM_SUSPEND:
                what = f"{call.__name__} {id}"

                def wait(_: Any) -> None:
                    self.waiting.append(what)
                    if self.fails is not None:
                        raise self.fails
                    assert self.done.wait(30), "never released"

                # Named by its device as the kernel engine names them: a
                # resume's wait, not a remove's (test_conformance).
                named = isinstance(id, str) and call.__name__ == "device_suspend"
                wait_ = UdevWait(wait, None, what, id if named else "")
                close = wait_.close

                def closed() -> None:
                    self.closed.append(what)
                    close()

                wait_.close = closed  # type: ignore[method-assign]
                later.append(wait_)
            return info
        return slowed


async def test_a_create_goes_on_while_udev_works_and_ends_after_it(
        tank: PoolService) -> None:
    udev = SlowUdev(tank.kernel.engine)  # type: ignore[arg-type]
    shown: list[Any] = []

    async def settler(pool: str, records: Any) -> None:
        shown.append(list(udev.waiting))

    tank.add_settler(settler)
    task = asyncio.create_task(tank.create_volume("tank", "v", GIB))
    await udev.begun()
    # udev's wait is the last step: the volume is recorded and described.
    assert udev.waiting == ["device_suspend tank-v"]
    assert [v.name for v in await tank.store.list_volumes("tank")] == ["v"]
    assert not task.done()
    udev.done.set()
    await task
    # The bus was shown the change only once udev was done.
    assert shown[-1] == ["device_suspend tank-v"]
    await assert_agree(tank)


async def test_a_snapshot_and_a_delete_wait_at_their_end(tank: PoolService) -> None:
    await tank.create_volume("tank", "v", GIB)
    udev = SlowUdev(tank.kernel.engine)  # type: ignore[arg-type]
    udev.done.set()
    await tank.snapshot("tank", "v", "s")
    # The origin's resume and the snapshot's new device.
    assert udev.waiting == ["device_suspend tank-v", "device_suspend tank-s"]
    udev.waiting.clear()
    await tank.delete_volume("tank", "s")
    assert udev.waiting == ["device_remove tank-s"]
    await assert_agree(tank)


async def test_a_change_that_fails_gives_its_udev_waits_up(tmp_path: Any) -> None:
    from tests.service.pools.kit import DISKS, close, open_pools

    class Failed(Exception):
        pass

    def fault(operation: str, step: int) -> None:
        if operation == "volume-delete" and step == VolumeDeleteStep.MESSAGE:
            raise Failed("the disk went away")

    pools = open_pools(tmp_path)
    try:
        await pools.create_pool("tank", DISKS[:2])
        await pools.create_volume("tank", "v", GIB)
        udev = SlowUdev(pools.kernel.engine)  # type: ignore[arg-type]
        pools.fault = fault
        with pytest.raises(Failed):
            await asyncio.wait_for(pools.delete_volume("tank", "v"), 10)
        # Not waited for (it would block until released): closed.
        assert udev.waiting == [] and udev.closed == ["device_remove tank-v"]
    finally:
        close(pools)


async def test_a_udev_wait_that_fails_is_logged_and_the_change_stands(
        tank: PoolService, caplog: pytest.LogCaptureFixture) -> None:
    """The change is recorded and described when udev is waited for: a wait
    that fails (a broken monitor socket) is the log's, and the bus is still
    shown the change."""
    SlowUdev(tank.kernel.engine, OSError("the monitor socket broke"))  # type: ignore[arg-type]
    shown: list[Any] = []

    async def settler(pool: str, records: Any) -> None:
        shown.append(records)

    tank.add_settler(settler)
    await tank.create_volume("tank", "v", GIB)
    assert shown and [v.name for v in await tank.store.list_volumes("tank")] == ["v"]
    assert "the monitor socket broke" in caplog.text
    await assert_agree(tank)


async def test_a_create_undone_lets_udev_finish_before_removing_its_device(
        tmp_path: Any) -> None:
    """udev may still be probing the new device when a later step fails:
    the undo waits for it (a remove while blkid holds the device is EBUSY)."""
    from dmd.service.journal import CreateStep
    from tests.service.pools.kit import DISKS, close, open_pools

    class Failed(Exception):
        pass

    def fault(operation: str, step: int) -> None:
        if operation == "create" and step == CreateStep.RECORD:
            raise Failed("the store went away")

    pools = open_pools(tmp_path)
    try:
        await pools.create_pool("tank", DISKS[:2])
        udev = SlowUdev(pools.kernel.engine)  # type: ignore[arg-type]
        udev.done.set()
        pools.devices.fault = fault
        with pytest.raises(Failed):
            await pools.create_volume("tank", "v", GIB)
        # Waited for by the undo (the change would only have given it up).
        assert udev.waiting == ["device_suspend tank-v"]
        pools.devices.fault = None
        await assert_agree(pools)
    finally:
        close(pools)


async def test_a_snapshot_without_udev_sync_ends_before_udev(tank: PoolService) -> None:
    """udev_sync False (lvcreate --noudevsync): the snapshot is done when the
    kernel and the records hold it; its udev work is kept, not waited for,
    until the device is removed: its delete waits for it first (udev's probe
    of a new device holds it open)."""
    await tank.create_volume("tank", "origin", GIB)
    udev = SlowUdev(tank.kernel.engine)  # type: ignore[arg-type]
    await asyncio.wait_for(tank.snapshot("tank", "origin", "quick", udev_sync=False), 10)
    # the origin's resume (it was suspended for the copy) and the new device's: kept
    assert udev.waiting == [] and udev.closed == []
    assert "quick" in [v.name for v in await tank.store.list_volumes("tank")]
    deleting = asyncio.create_task(tank.delete_volume("tank", "quick"))
    await udev.begun()
    assert udev.waiting == ["device_suspend tank-quick"] and not deleting.done()
    udev.done.set()
    await deleting
    udev.done.clear()
    udev.waiting.clear()
    # Without the option it waits, as before.
    task = asyncio.create_task(tank.snapshot("tank", "origin", "synced"))
    await udev.begun()
    assert udev.waiting == ["device_suspend tank-origin"] and not task.done()
    udev.done.set()
    await task


async def test_a_delete_or_deactivate_without_udev_sync_ends_before_udev(
        tank: PoolService) -> None:
    """udev_sync False (lvremove --noudevsync): a delete or a deactivate is
    done when the device is gone from the kernel and the records say so;
    udev's work on the removal is given up at once, not waited for and not
    kept (nothing waits for a removed node later: no monitor socket stays
    open for it). Without it, both wait, as before."""
    for name in ("a", "b", "c", "d"):
        await tank.create_volume("tank", name, GIB)
    udev = SlowUdev(tank.kernel.engine)  # type: ignore[arg-type]
    await asyncio.wait_for(tank.delete_volume("tank", "a", udev_sync=False), 10)
    await asyncio.wait_for(tank.set_active("tank", "b", False, udev_sync=False), 10)
    assert udev.waiting == [] and udev.closed == ["device_remove tank-a",
                                                  "device_remove tank-b"]
    udev.closed.clear()
    names = {v.name: v.active for v in await tank.store.list_volumes("tank")}
    assert names == {"b": False, "c": True, "d": True}
    for synced in (tank.delete_volume("tank", "c"), tank.set_active("tank", "d", False)):
        task = asyncio.create_task(synced)
        await udev.begun()
        assert len(udev.waiting) == 1 and udev.waiting[0].startswith("device_remove"), \
            udev.waiting
        assert not task.done()
        udev.done.set()
        await task
        udev.done.clear()
        udev.waiting.clear()
    udev.done.set()
    await assert_agree(tank)
