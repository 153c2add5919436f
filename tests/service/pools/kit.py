"""What the pool family's service tests share: a pool service on SimDM and
a real SQLite file, the view of everything that must agree after any
operation or crash, and a crash at a chosen step in a forked child. The
fixtures over it (``pools``, ``tank``) are in this folder's conftest.py."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from dmd.engine import DmFlags
from dmd.engine.sim import SimDM
from dmd.service.devices.operations import DeviceService
from dmd.service.devices.recovery import recover
from dmd.service.kernel import KernelWorkers
from dmd.service.pools.names import volume_device
from dmd.service.pools.recovery import recover_pools
from dmd.service.pools.room import HEADER_SECTORS
from dmd.service.pools.service import PoolService
from dmd.state import AsyncStateStore, PoolRecord, StateStore
from dmd.state.pool_description import HEADER_BYTES, Description, read_device

GIB = 1 << 30
DISKS = ["/dev/simdisk1", "/dev/simdisk2", "/dev/simdisk3"]


def sim(pools: PoolService) -> SimDM:
    """The simulator under *pools*: what a test pretends with (opens, writes,
    damage to a pool's metadata)."""
    engine = pools.kernel.engine
    assert isinstance(engine, SimDM)
    return engine


def open_pools(tmp: Path, fault: Any = None) -> PoolService:
    engine = SimDM(tmp / "kernel.json")
    for i, path in enumerate(DISKS, start=1):
        if path not in engine.snapshot()["disks"]:
            engine.add_disk(path, 7, i, 256 * 2048)
    engine.add_disk("/dev/simext4", 7, 9, 256 * 2048, signature="ext4")
    store = AsyncStateStore(StateStore.open(tmp / "state"))
    return PoolService(DeviceService(KernelWorkers(engine), store, fault=fault))


async def recovered(tmp_path: Path, fault: Any = None) -> PoolService:
    """The pools in *tmp_path* opened as dmd starts: recovery run, and none
    of it failed."""
    pools = open_pools(tmp_path, fault)
    pools.fault = fault
    report = await recover(pools.devices)
    await recover_pools(pools, report)
    assert not report.failed, report
    return pools


def close(pools: PoolService) -> None:
    pools.devices.close()
    pools.store.close()


async def state(pools: PoolService) -> dict[str, Any]:
    """Everything that must agree, as plain data."""
    engine: SimDM = pools.kernel.engine  # type: ignore[assignment]
    kernel = {}
    for dev in engine.list_devices():
        info, table = engine.table_status(dev.name, DmFlags.DM_STATUS_TABLE)
        kernel[dev.name] = (info.suspended, info.inactive_present, [tuple(t) for t in table])
    return {
        "kernel": kernel,
        "devices": sorted(r.name for r in await pools.store.list_devices()),
        "pools": {p.name: p.transaction_id for p in await pools.store.list_pools()},
        "layouts": {p.name: (p.layout.devices, p.layout.data_sectors)
                    for p in await pools.store.list_pools()},
        "volumes": sorted((v.pool, v.name, v.thin_id if v.thin_id is not None else -1,
                           v.size_bytes, v.active) for v in await pools.store.list_volumes()),
        "thins": {k: sorted(v["thins"]) for k, v in engine.snapshot()["pools"].items()},
        "pending": [i.operation for i in await pools.store.pending_intents()],
    }


async def assert_agree(pools: PoolService) -> dict[str, Any]:
    now = await state(pools)
    assert now["pending"] == []
    assert sorted(now["kernel"]) == now["devices"], now
    assert not any(s or i for s, i, _ in now["kernel"].values()), "suspended or half-loaded"
    for pool in await pools.store.list_pools():
        if pool.stopped:  # none of its devices is in the kernel; its records stay
            assert not [d for d in now["kernel"] if d.startswith(f"{pool.name}-")], now
            continue  # nor is it described: Start checks its disks before it writes
        pool_state = await pools.pool_state(pool.name)
        assert pool_state.transaction_id == pool.transaction_id, now
        volumes = await pools.store.list_volumes(pool.name)
        thin_ids = {v.thin_id for v in volumes if v.thin_id is not None} | {
            v.revert.thin_id for v in volumes if v.revert is not None}
        assert max(thin_ids, default=-1) < pool.next_thin_id
        [thins] = [t for t in now["thins"].values() if set(t) == thin_ids] or [None]
        assert thins is not None, f"pool thin ids {now['thins']} != records {volumes}"
        for volume in volumes:
            device = volume_device(pool.name, volume.name)
            assert (device in now["kernel"]) == volume.active, (volume, now)
            if volume.active:  # and its size is its device's
                assert sum(line[1] for line in now["kernel"][device][2]) * 512 == \
                    volume.size_bytes, (volume, now["kernel"][device])
        assert_disjoint(pool, volumes)
        await assert_described(pools, pool)
    return now


def assert_disjoint(pool: PoolRecord, volumes: list[Any]) -> None:
    """No two of the pool's metadata, data and thick volumes' segments share
    a sector, and none reaches into a device's header or past its end."""
    pieces = [*pool.layout.metadata, *pool.layout.spare, *pool.layout.data,
              *(s for v in volumes if v.thick is not None for s in v.thick.segments)]
    for index, size in enumerate(pool.layout.sizes):
        mine = sorted((s for s in pieces if s.device == index), key=lambda s: s.start)
        at = HEADER_SECTORS
        for seg in mine:
            assert seg.start >= at and seg.length > 0, (index, mine)
            at = seg.start + seg.length
        assert at <= size // 512, (index, mine)


def _facts(description_or_records: Any) -> Any:
    return sorted((v.uuid, v.name, v.thin_id, v.size_bytes, v.origin_uuid, v.active,
                   tuple(sorted(v.labels.items())), v.encryption, v.thick, v.revert)
                  for v in description_or_records)


async def assert_described(pools: PoolService, pool: PoolRecord) -> Description:
    """Every device of *pool* carries its label and both copies of its
    description at the records' generation, saying what the records say."""
    engine: SimDM = pools.kernel.engine  # type: ignore[assignment]
    volumes = await pools.store.list_volumes(pool.name)
    found = None
    for index, path in enumerate(pool.layout.devices):
        reading = read_device(path, engine.read_disk(path, 0, HEADER_BYTES))
        assert reading.label is not None, f"{path}: no label"
        assert (reading.label.pool_uuid, reading.label.device_uuid, reading.label.index) == \
            (pool.uuid, pool.layout.ids[index], index)
        assert reading.stale(pool.generation) == (), (path, reading.copies, pool.generation)
        found = reading.newest
        assert found is not None
        assert found.pool.transaction_id == pool.transaction_id
        assert found.pool.next_thin_id == pool.next_thin_id
        assert found.pool.layout.data == pool.layout.data
        assert _facts(found.volumes) == _facts(volumes)
    assert found is not None
    return found


def crash_at(tmp: Path, operation: str, step: int,
             run: Callable[[PoolService], Awaitable[Any]]) -> None:
    """*run* in a forked child on the pools in *tmp*, which dies at *step*
    of *operation*."""
    pid = os.fork()
    if pid == 0:
        try:
            def crash(op: str, number: int) -> None:
                if op == operation and number == step:
                    os._exit(42)

            async def child() -> None:
                pools = open_pools(tmp, crash)
                pools.fault = crash
                await pools.start()
                await run(pools)

            asyncio.run(child())
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 42, "the child did not die at that step"


# The pool and volume operations every crash test runs, on the pool
# *prepare* leaves, and how many steps each takes.
OPERATIONS: dict[str, Callable[[PoolService], Awaitable[Any]]] = {
    "pool-create": lambda p: p.create_pool("new", [DISKS[2]]),
    "volume-create": lambda p: p.create_volume("tank", "fresh", GIB),
    "volume-snapshot": lambda p: p.snapshot("tank", "base", "base.snap"),
    "volume-delete": lambda p: p.delete_volume("tank", "base"),
    "pool-destroy": lambda p: p.destroy_pool("tank", force=True),
    "pool-grow": lambda p: p.add_device("tank", DISKS[2]),
    "volume-activate": lambda p: p.set_active("tank", "idle", True),
    "volume-deactivate": lambda p: p.set_active("tank", "base", False),
    "volume-resize": lambda p: p.resize_volume("tank", "base", 2 * GIB),
    "volume-set-labels": lambda p: p.set_labels("tank", "base", {"owner": "backup"}),
    "volume-rename": lambda p: p.rename_volume("tank", "base", "renamed"),
    "volume-revert": lambda p: p.revert("tank", "idle"),
    "pool-stop": lambda p: p.stop_pool("tank"),
}
STEPS = {"pool-create": 4, "volume-create": 4, "volume-snapshot": 6, "volume-delete": 4,
         "pool-destroy": 2, "pool-grow": 5, "volume-activate": 2, "volume-deactivate": 2,
         "volume-resize": 2, "volume-set-labels": 1, "volume-rename": 2, "volume-revert": 10,
         "pool-stop": 2}
# Steps an operation does not take here: pool-grow's METADATA is for a pool
# low on metadata (tests/service/pools/test_pool_space.py).
SKIPPED = {("pool-grow", 2)}
EVERY_STEP = [(op, k) for op, n in STEPS.items() for k in range(1, n + 1)
              if (op, k) not in SKIPPED]
async def prepare(tmp: Path) -> None:
    pools = open_pools(tmp)
    await pools.create_pool("tank", DISKS[:2])
    await pools.create_volume("tank", "base", GIB)
    await pools.snapshot("tank", "base", "idle", activate=False)
    close(pools)
