"""The pool's description on its devices against dmd's records, at start-up
(SimDM, a real SQLite file): behind is rewritten, ahead wins (the database
was restored from an old copy), one torn copy is repaired from the other,
and a pool whose devices cannot vouch for it, or that another manager
changed, is refused changes and never written to."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dmd.engine.sim import SimDM
from dmd.engine.targets.thin import set_transaction_id
from dmd.service import errors
from dmd.service.devices.recovery import recover
from dmd.service.pools.recovery import recover_pools
from dmd.service.pools.service import PoolService
from dmd.state.pool_description import COPY_OFFSETS, HEADER_BYTES
from tests.service.pools.kit import (
    DISKS,
    GIB,
    assert_agree,
    assert_described,
    close,
    open_pools,
)


async def started(tmp_path: Path) -> PoolService:
    pools = open_pools(tmp_path)
    report = await recover(pools.devices)
    await recover_pools(pools, report)
    return pools


def engine_of(pools: PoolService) -> SimDM:
    return pools.kernel.engine  # type: ignore[return-value]


def heads(engine: SimDM, paths: list[str]) -> dict[str, bytes]:
    return {p: engine.read_disk(p, 0, HEADER_BYTES) for p in paths}


async def test_a_description_left_behind_by_a_crash_is_written_again(tmp_path: Path) -> None:
    pools = await started(tmp_path)
    await pools.create_pool("tank", DISKS[:2])
    await pools.create_volume("tank", "one", GIB)
    old = heads(engine_of(pools), DISKS[:2])
    await pools.create_volume("tank", "two", GIB)
    for path, head in old.items():  # as if dmd died after the record, before the copies
        engine_of(pools).write_disk(path, 0, head)
    close(pools)
    pools = await started(tmp_path)
    try:
        described = await assert_described(pools, await pools.pool("tank"))
        assert sorted(v.name for v in described.volumes) == ["one", "two"]
    finally:
        close(pools)


async def test_devices_ahead_of_the_database_win(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    pools = await started(tmp_path)
    await pools.create_pool("tank", DISKS[:2])
    await pools.create_volume("tank", "one", GIB)
    close(pools)
    shutil.copytree(tmp_path / "state", tmp_path / "backup")
    pools = await started(tmp_path)
    await pools.create_volume("tank", "two", GIB)
    await pools.snapshot("tank", "one", "one.snap")
    close(pools)
    shutil.rmtree(tmp_path / "state")
    shutil.copytree(tmp_path / "backup", tmp_path / "state")  # the old database comes back
    pools = await started(tmp_path)
    try:
        assert "the devices' description wins" in caplog.text
        assert sorted(v.name for v in await pools.volumes("tank")) == ["one", "one.snap", "two"]
        await assert_agree(pools)  # thin ids, transaction id, devices: all agree
        await pools.create_volume("tank", "three", GIB)  # and the next id is free
        assert (await pools.volume("tank", "three")).thin_id == 3
    finally:
        close(pools)


@pytest.mark.parametrize("copy", [0, 1])
async def test_one_torn_copy_is_repaired_from_the_other(tmp_path: Path, copy: int) -> None:
    pools = await started(tmp_path)
    await pools.create_pool("tank", DISKS[:1])
    await pools.create_volume("tank", "one", GIB)
    engine_of(pools).write_disk(DISKS[0], COPY_OFFSETS[copy] + 100, b"\xff" * 300)
    close(pools)
    pools = await started(tmp_path)
    try:
        await assert_agree(pools)  # both copies whole again, at the records' generation
    finally:
        close(pools)


async def test_a_pool_no_copy_vouches_for_is_refused_and_left_alone(tmp_path: Path) -> None:
    pools = await started(tmp_path)
    await pools.create_pool("tank", DISKS[:2])
    await pools.create_volume("tank", "one", GIB)
    for path in DISKS[:2]:
        for offset in COPY_OFFSETS:
            engine_of(pools).write_disk(path, offset + 100, b"\xff" * 300)
    close(pools)
    pools = await started(tmp_path)
    try:
        before = heads(engine_of(pools), DISKS[:2])
        assert "no copy of its description" in pools.shown.refused["tank"]  # the bus shows it
        with pytest.raises(errors.Busy, match="no copy of its description"):
            await pools.create_volume("tank", "two", GIB)
        with pytest.raises(errors.Busy):
            await pools.destroy_pool("tank", force=True)
        assert heads(engine_of(pools), DISKS[:2]) == before  # never overwritten
        assert [v.name for v in await pools.volumes("tank")] == ["one"]  # reads still work
    finally:
        close(pools)


async def test_a_pool_another_manager_changed_is_refused(tmp_path: Path) -> None:
    pools = await started(tmp_path)
    await pools.create_pool("tank", DISKS[:1])
    close(pools)
    engine = SimDM(tmp_path / "kernel.json")
    engine.target_msg("tank-tpool", 0, set_transaction_id(0, 7))
    pools = await started(tmp_path)
    try:
        with pytest.raises(errors.Busy, match="another manager"):
            await pools.create_volume("tank", "one", GIB)
    finally:
        close(pools)


def test_a_crash_between_the_two_copies_is_repaired(tmp_path: Path) -> None:
    import asyncio
    import os

    async def prepare() -> None:
        pools = await started(tmp_path)
        await pools.create_pool("tank", DISKS[:2])
        close(pools)

    asyncio.run(prepare())
    pid = os.fork()
    if pid == 0:
        try:
            described: list[int] = []

            def crash(op: str, number: int) -> None:
                # The second description: the create's last (its first names
                # the create under way, before the kernel's message).
                if op == "pool-describe":
                    described.append(number)
                    if len(described) == 2:
                        os._exit(42)

            async def child() -> None:
                pools = open_pools(tmp_path, crash)
                await pools.start()
                await pools.create_volume("tank", "one", GIB)

            asyncio.run(child())
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 42

    async def restart() -> None:
        sim = SimDM(tmp_path / "kernel.json")
        from dmd.state.pool_description import read_device

        reading = read_device(DISKS[0], sim.read_disk(DISKS[0], 0, HEADER_BYTES))
        a, b = reading.copies
        assert a is not None and b is not None and not isinstance(a, Exception) and \
            not isinstance(b, Exception) and a.generation > b.generation  # A new, B old
        pools = await started(tmp_path)
        try:
            described = await assert_described(pools, await pools.pool("tank"))
            assert [v.name for v in described.volumes] == ["one"]
        finally:
            close(pools)

    asyncio.run(restart())
