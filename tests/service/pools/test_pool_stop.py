"""Stop and Start: a stopped pool has no device in the kernel and keeps its
records and description; every change but Start is refused while stopped;
Stop is refused with nothing changed while something outside the pool holds
one of its devices; a restart keeps it stopped; Start finds its disks by
their labels (where they moved, the paths given) and brings back its active
volumes. (An error and a crash at each step of Stop: test_pools.py; of
Start: here.)"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from dmd.service import errors
from dmd.service.journal import PoolStartStep
from dmd.service.pools.crypt import lock
from dmd.service.pools.service import PoolService
from tests.service.pools.kit import (
    DISKS,
    GIB,
    assert_agree,
    close,
    crash_at,
    open_pools,
    recovered,
    sim,
)
from tests.service.pools.test_volume_encryption import request


def kernel_names(pools: PoolService) -> list[str]:
    return sorted(d.name for d in sim(pools).list_devices())


@pytest.fixture
async def running(tank: PoolService) -> PoolService:
    await tank.create_volume("tank", "a", GIB)
    await tank.snapshot("tank", "a", "a.1", activate=False)
    await tank.create_volume("tank", "sealed", GIB, encryption=request())  # unlocked
    return tank


async def test_stop_removes_every_device_and_start_brings_them_back(
        running: PoolService) -> None:
    before = await assert_agree(running)
    stopped = await running.stop_pool("tank")
    assert stopped.stopped and (await running.pool("tank")).stopped
    assert kernel_names(running) == []
    after = await assert_agree(running)
    assert after["volumes"] == before["volumes"]  # records kept, active ones too
    for refused in (lambda: running.create_volume("tank", "b", GIB),
                    lambda: running.snapshot("tank", "a", "a.2"),
                    lambda: running.set_active("tank", "a.1", True),
                    lambda: running.destroy_pool("tank", force=True),
                    lambda: running.stop_pool("tank")):
        with pytest.raises(errors.NotActive, match="Start it first"):
            await refused()
    await running.start_pool("tank")
    assert not (await running.pool("tank")).stopped
    again = await assert_agree(running)
    assert again["volumes"] == before["volumes"]
    # The unlocked volume's key went with its cleartext device: it waits for it.
    assert "tank-sealed-crypt" not in kernel_names(running)
    assert "tank-sealed" in kernel_names(running) and "tank-a" in kernel_names(running)
    with pytest.raises(errors.Busy, match="not stopped"):
        await running.start_pool("tank")


async def test_stop_is_refused_while_a_device_is_held_from_outside(
        running: PoolService) -> None:
    before = await assert_agree(running)
    for held in ("tank-a", "tank-sealed-crypt"):
        sim(running).open_device(held)  # a mount, say
        with pytest.raises(errors.Busy, match=held):
            await running.stop_pool("tank")
        sim(running).open_device(held, -1)
        assert await assert_agree(running) == before
    await lock(running, "tank", "sealed")
    await running.stop_pool("tank")


async def test_stop_and_destroy_leave_alone_a_device_named_like_the_pools(
        running: PoolService) -> None:
    """Another tool's device whose name begins as the pool's devices do
    (tank-x, holding nothing of the pool): not dmd's, so neither Stop nor
    Destroy removes it, and it never becomes one of dmd's records."""
    sim(running).device_create("tank-x")  # another tool's
    await running.stop_pool("tank")
    assert kernel_names(running) == ["tank-x"]
    # Start refuses while it is there (dmd could not tell it from its own).
    with pytest.raises(errors.AlreadyExists, match="tank-x"):
        await running.start_pool("tank")
    sim(running).device_remove("tank-x")
    await running.start_pool("tank")
    sim(running).device_create("tank-y")  # another tool's, while the pool runs
    await running.destroy_pool("tank", force=True)
    assert kernel_names(running) == ["tank-y"]
    assert "tank-y" not in {d.name for d in await running.store.list_devices()}


async def test_another_tools_device_on_a_volume_makes_stop_busy_with_nothing_changed(
        running: PoolService) -> None:
    """tank-x, another tool's, maps tank-a: tank-a is held from outside
    the pool, so Stop is Busy before it closes or removes anything (the
    unlocked volume keeps its cleartext device and key)."""
    before = await assert_agree(running)
    # A plain mapping, and a user's own LUKS mapping over the plain volume
    # (cryptsetup's UUID, but not the cleartext name of an encrypted volume).
    for name, uuid in (("tank-x", None), ("tank-z", "CRYPT-LUKS2-0123abcd-tank-z")):
        sim(running).device_create(name, uuid)
        sim(running).table_load(name, [(0, 2048, "linear", "/dev/mapper/tank-a 0")])
        sim(running).device_suspend(name)  # without DM_SUSPEND: a resume, the table live
        with pytest.raises(errors.Busy, match="tank-a"):
            await running.stop_pool("tank")
        assert "tank-sealed-crypt" in kernel_names(running)
        sim(running).device_remove(name)
        assert await assert_agree(running) == before


def test_a_stopped_pool_stays_stopped_across_a_restart(tmp_path: Path) -> None:
    async def stop() -> None:
        pools = open_pools(tmp_path)
        try:
            await pools.create_pool("tank", DISKS[:2])
            await pools.create_volume("tank", "a", GIB)
            await pools.stop_pool("tank")
        finally:
            close(pools)

    asyncio.run(stop())

    async def restart() -> None:
        pools = await recovered(tmp_path)
        await pools.start()
        try:
            assert kernel_names(pools) == []
            await assert_agree(pools)
            with pytest.raises(errors.NotActive):
                await pools.create_volume("tank", "b", GIB)
            await pools.start_pool("tank")
            assert "tank-a" in kernel_names(pools)
            await assert_agree(pools)
        finally:
            close(pools)

    asyncio.run(restart())


async def test_start_takes_the_disks_by_their_labels(running: PoolService) -> None:
    await lock(running, "tank", "sealed")
    await running.stop_pool("tank")
    with pytest.raises(errors.InvalidArgument, match="not a disk of pool"):
        await running.start_pool("tank", devices=[DISKS[0], DISKS[2]])
    with pytest.raises(errors.InvalidArgument, match="1 of them not among"):
        await running.start_pool("tank", devices=[DISKS[1]])
    assert (await running.pool("tank")).stopped and kernel_names(running) == []
    await running.start_pool("tank", devices=[DISKS[1], DISKS[0]])  # any order
    assert (await running.pool("tank")).layout.devices == tuple(DISKS[:2])
    await assert_agree(running)


@pytest.mark.parametrize("step", list(PoolStartStep))
@pytest.mark.parametrize("crash", [False, True])
def test_an_error_or_a_crash_during_start_leaves_it_stopped(
        tmp_path: Path, step: int, crash: bool) -> None:
    async def stop() -> dict[str, Any]:
        pools = open_pools(tmp_path)
        try:
            await pools.create_pool("tank", DISKS[:2])
            await pools.create_volume("tank", "a", GIB)
            await pools.stop_pool("tank")
            return await assert_agree(pools)
        finally:
            close(pools)

    before = asyncio.run(stop())

    class Boom(Exception):
        pass

    def fault(op: str, number: int) -> None:
        if op == "pool-start" and number == step:
            raise Boom

    async def start() -> None:
        pools = open_pools(tmp_path)
        await pools.start()
        pools.devices.fault = pools.fault = fault
        try:
            with pytest.raises(Boom):
                await pools.start_pool("tank")
        finally:
            close(pools)

    if crash:
        async def start_in_child(pools: PoolService) -> None:
            await pools.start_pool("tank")
        crash_at(tmp_path, "pool-start", step, start_in_child)
    else:
        asyncio.run(start())

    async def after() -> None:
        pools = await recovered(tmp_path)
        await pools.start()
        try:
            now = await assert_agree(pools)
            assert (await pools.pool("tank")).stopped and kernel_names(pools) == []
            assert now["volumes"] == before["volumes"]
            await pools.start_pool("tank")
            assert "tank-a" in kernel_names(pools)
        finally:
            close(pools)

    asyncio.run(after())


async def test_a_stopped_pool_is_renamed_and_starts_under_its_new_name(
        running: PoolService) -> None:
    with pytest.raises(errors.Busy, match="Stop it to rename it"):
        await running.rename_pool("tank", "vault")
    await lock(running, "tank", "sealed")
    await running.create_pool("other", [DISKS[2]])
    await running.stop_pool("tank")
    before = await assert_agree(running)
    uuid = (await running.pool("tank")).uuid
    for bad, error in (("other", errors.AlreadyExists), ("a/b", errors.InvalidArgument),
                       ("x" * 200, errors.InvalidArgument)):
        with pytest.raises(error):
            await running.rename_pool("tank", bad)
    assert await assert_agree(running) == before
    renamed = await running.rename_pool("tank", "vault")
    assert renamed.name == "vault" and renamed.uuid == uuid
    with pytest.raises(errors.NotFound):
        await running.pool("tank")
    assert {v.pool for v in await running.store.list_volumes("vault")} == {"vault"}
    await assert_agree(running)  # described under its new name
    with pytest.raises(errors.NotActive):
        await running.create_volume("vault", "late", GIB)
    await running.start_pool("vault")
    assert {"vault-tpool", "vault-a"} <= set(kernel_names(running))
    assert not [n for n in kernel_names(running) if n.startswith("tank-")]
    await running.create_volume("vault", "b", GIB)
    await assert_agree(running)


@pytest.mark.parametrize("crash", [False, True])
def test_a_rename_cut_short_leaves_the_old_name_or_the_new(tmp_path: Path,
                                                           crash: bool) -> None:
    async def stop() -> None:
        pools = open_pools(tmp_path)
        try:
            await pools.create_pool("tank", DISKS[:2])
            await pools.create_volume("tank", "a", GIB)
            await pools.stop_pool("tank")
        finally:
            close(pools)

    asyncio.run(stop())

    async def rename(pools: PoolService) -> None:
        await pools.rename_pool("tank", "vault")

    if crash:
        crash_at(tmp_path, "pool-rename", 1, rename)
    else:
        async def fail() -> None:
            pools = open_pools(tmp_path)
            await pools.start()

            def fault(op: str, number: int) -> None:
                if op == "pool-rename":
                    raise RuntimeError("boom")
            pools.fault = fault
            try:
                with pytest.raises(RuntimeError):
                    await rename(pools)
            finally:
                close(pools)
        asyncio.run(fail())

    async def after() -> None:
        pools = await recovered(tmp_path)
        await pools.start()
        try:
            assert [p.name for p in await pools.store.list_pools()] == ["tank"]
            await assert_agree(pools)
            await pools.rename_pool("tank", "vault")
            await pools.start_pool("vault")
            assert "vault-a" in kernel_names(pools)
        finally:
            close(pools)

    asyncio.run(after())
