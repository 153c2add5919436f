"""ImportPool on SimDM: a pool comes back from its devices alone (state
directory lost, every device-mapper device gone as after a reboot), also
from devices with other names; what is not the whole of one pool, a pool
recorded already, a description no copy vouches for and a pool another
manager changed are refused and change nothing; a crash at any step of an
import leaves it done or undone."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from dmd.engine import DmError
from dmd.engine.sim import SimDM
from dmd.engine.targets.thin import set_transaction_id
from dmd.service import errors
from dmd.service.devices.recovery import recover
from dmd.service.journal import PoolCreateStep, PoolGrowStep, PoolImportStep
from dmd.service.pools.importing import import_pool
from dmd.service.pools.recovery import recover_pools
from dmd.state import Revert
from dmd.state.pool_description import COPY_OFFSETS, HEADER_BYTES, read_device
from tests.service.pools.kit import (
    DISKS,
    EVERY_STEP,
    GIB,
    OPERATIONS,
    assert_agree,
    close,
    crash_at,
    open_pools,
    prepare,
    recovered,
    state,
)


def engine(tmp_path: Path) -> SimDM:
    return SimDM(tmp_path / "kernel.json")


def reboot_and_lose_the_state(tmp_path: Path) -> None:
    """Every dm device gone (users first), the disks kept; no state directory."""
    sim = engine(tmp_path)
    while names := [d.name for d in sim.list_devices()]:
        for name in names:
            with contextlib.suppress(DmError):  # held by one removed later in this pass
                sim.device_remove(name)
    shutil.rmtree(tmp_path / "state")


async def make_pool(tmp_path: Path) -> dict[str, Any]:
    pools = await recovered(tmp_path)
    try:
        await pools.create_pool("tank", DISKS[:1], low_water_percent=30)
        await pools.add_device("tank", DISKS[1])
        await pools.create_volume("tank", "base", 20 * GIB, labels={"role": "image"})
        await pools.snapshot("tank", "base", "vm1")
        await pools.create_volume("tank", "idle", GIB)
        await pools.set_active("tank", "idle", False)
        await pools.delete_volume("tank", "vm1")
        await pools.snapshot("tank", "base", "vm2")
        return await state(pools)
    finally:
        close(pools)


def same_pool(before: dict[str, Any], after: dict[str, Any]) -> None:
    for key in ("kernel", "volumes", "pools", "thins"):
        assert after[key] == before[key], key


async def test_a_pool_comes_back_from_its_devices_alone(tmp_path: Path) -> None:
    before = await make_pool(tmp_path)
    reboot_and_lose_the_state(tmp_path)
    pools = await recovered(tmp_path)
    try:
        assert await pools.pools() == []
        record = await import_pool(pools, list(reversed(DISKS[:2])))  # any order
        assert record.name == "tank" and record.low_water_percent == 30
        after = await assert_agree(pools)
        same_pool(before, after)
        base = await pools.volume("tank", "base")
        assert base.labels == {"role": "image"}
        assert (await pools.volume("tank", "vm2")).origin_uuid == base.uuid
        assert not (await pools.volume("tank", "idle")).active
        again = await pools.create_volume("tank", "new", GIB)
        assert again.thin_id == 4  # never one handed out before the import
    finally:
        close(pools)
    pools = await recovered(tmp_path)  # and the imported pool is dmd's own after a restart
    try:
        now = await assert_agree(pools)
        assert [v[1] for v in now["volumes"]] == ["base", "idle", "new", "vm2"]
    finally:
        close(pools)


async def test_a_pool_comes_back_from_devices_with_other_names(tmp_path: Path) -> None:
    before = await make_pool(tmp_path)
    reboot_and_lose_the_state(tmp_path)
    sim = engine(tmp_path)
    sim.move_disk(DISKS[0], "/dev/simdisk21", 21)
    sim.move_disk(DISKS[1], "/dev/simdisk22", 22)
    pools = await recovered(tmp_path)
    try:
        record = await import_pool(pools, ["/dev/simdisk22", "/dev/simdisk21"])
        assert record.layout.devices == ("/dev/simdisk21", "/dev/simdisk22")
        after = await assert_agree(pools)
        assert after["volumes"] == before["volumes"]
        assert sorted(after["thins"].values()) == sorted(before["thins"].values())
    finally:
        close(pools)


async def test_what_is_not_one_whole_pool_is_refused_and_changes_nothing(
        tmp_path: Path) -> None:
    await make_pool(tmp_path)
    reboot_and_lose_the_state(tmp_path)
    pools = await recovered(tmp_path)
    sim: SimDM = pools.kernel.engine  # type: ignore[assignment]
    try:
        await pools.create_pool("other", [DISKS[2]])
        heads = {p: sim.read_disk(p, 0, HEADER_BYTES) for p in DISKS}
        cases: list[tuple[list[str], type[errors.ServiceError], str]] = [
            ([DISKS[0]], errors.InvalidArgument, "needs every one of its devices"),
            ([DISKS[0], DISKS[1], DISKS[2]], errors.Busy, "a device of pool 'other'"),
            ([DISKS[0], "/dev/simext4"], errors.InvalidArgument, "carries no dmd pool label"),
            (["/dev/nothing"], errors.InvalidArgument, "no such"),
            ([], errors.InvalidArgument, "one or more"),
            ([DISKS[0], DISKS[0]], errors.InvalidArgument, "distinct"),
        ]
        for paths, error, text in cases:
            with pytest.raises(error, match=text):
                await import_pool(pools, paths)
        assert sorted(d.name for d in sim.list_devices()) == ["other-tdata", "other-tmeta",
                                                              "other-tpool"]
        assert {p: sim.read_disk(p, 0, HEADER_BYTES) for p in DISKS} == heads
        await import_pool(pools, DISKS[:2])
        # Recorded already: AlreadyExists, before the in-use check its own
        # devices would fail (issue 26: a client can act on it).
        with pytest.raises(errors.AlreadyExists, match="devices of pool 'tank'"):
            await import_pool(pools, DISKS[:2])
        with pytest.raises(errors.AlreadyExists, match="devices of pool 'tank'"):
            await import_pool(pools, DISKS[1:2])
    finally:
        close(pools)


async def test_a_description_no_copy_vouches_for_is_refused(tmp_path: Path) -> None:
    await make_pool(tmp_path)
    reboot_and_lose_the_state(tmp_path)
    sim = engine(tmp_path)
    for path in DISKS[:2]:
        for offset in COPY_OFFSETS:
            sim.write_disk(path, offset + 64, b"\x00garbage\x00" * 20)
    heads = {p: sim.read_disk(p, 0, HEADER_BYTES) for p in DISKS[:2]}
    pools = await recovered(tmp_path)
    try:
        with pytest.raises(errors.Corrupt, match="nothing was written"):
            await import_pool(pools, DISKS[:2])
        assert {p: sim.read_disk(p, 0, HEADER_BYTES) for p in DISKS[:2]} == heads
        assert sim.list_devices() == []
    finally:
        close(pools)


async def test_one_good_copy_is_enough_and_the_other_is_repaired(tmp_path: Path) -> None:
    before = await make_pool(tmp_path)
    reboot_and_lose_the_state(tmp_path)
    sim = engine(tmp_path)
    sim.write_disk(DISKS[0], COPY_OFFSETS[0] + 64, b"torn" * 100)
    sim.write_disk(DISKS[1], COPY_OFFSETS[1], bytes(4096))
    pools = await recovered(tmp_path)
    try:
        await import_pool(pools, DISKS[:2])
        same_pool(before, await assert_agree(pools))  # assert_agree: every copy whole
    finally:
        close(pools)


async def test_a_pool_another_manager_changed_is_not_imported(tmp_path: Path) -> None:
    before = await make_pool(tmp_path)
    sim = engine(tmp_path)
    sim.target_msg("tank-tpool", 0, set_transaction_id(before["pools"]["tank"], 9))
    reboot_and_lose_the_state(tmp_path)
    pools = await recovered(tmp_path)
    try:
        with pytest.raises(errors.Busy, match="changed without dmd"):
            await import_pool(pools, DISKS[:2])
        assert sim.list_devices() == []  # the pool's devices made for the check are gone
        assert await pools.pools() == []
    finally:
        close(pools)


@pytest.mark.parametrize("step", list(PoolImportStep))
def test_a_crash_at_any_step_of_an_import_leaves_it_done_or_undone(
        tmp_path: Path, step: PoolImportStep) -> None:
    before = asyncio.run(make_pool(tmp_path))
    reboot_and_lose_the_state(tmp_path)
    pid = os.fork()
    if pid == 0:
        try:
            def crash(op: str, number: int) -> None:
                if op == "pool-import" and number == step:
                    os._exit(42)

            async def child() -> None:
                pools = await recovered(tmp_path, crash)
                await import_pool(pools, DISKS[:2])

            asyncio.run(child())
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 42

    async def restart() -> None:
        pools = await recovered(tmp_path)
        try:
            now = await assert_agree(pools)
            if not now["pools"]:  # undone: nothing of the pool in the kernel; again, then
                assert now["kernel"] == {}
                await import_pool(pools, DISKS[:2])
            same_pool(before, await assert_agree(pools))
        finally:
            close(pools)

    asyncio.run(restart())


# Operations whose crash may leave no pool to import: a destroy wipes the
# description (that is what it is for).
NOT_IMPORTED = {"pool-destroy"}


@pytest.mark.parametrize(("operation", "step"),
                         [(op, k) for op, k in EVERY_STEP if op not in NOT_IMPORTED])
def test_a_crash_at_any_step_then_a_lost_state_imports(tmp_path: Path, operation: str,
                                                       step: int) -> None:
    """Killed at any step of any pool or volume operation, the state
    directory then lost: ImportPool brings the pool back from its devices,
    its thin ids the records', nothing half-made."""
    asyncio.run(prepare(tmp_path))
    crash_at(tmp_path, operation, step, OPERATIONS[operation])
    reboot_and_lose_the_state(tmp_path)

    async def imported() -> None:
        pools = await recovered(tmp_path)
        sim = engine(tmp_path)
        # Every device that carries the pool's label, as an admin gives them
        # (a grow labels its new device before the kernel takes it).
        labels = [read_device(p, sim.read_disk(p, 0, HEADER_BYTES)).label for p in DISKS]
        pool_uuid = labels[0].pool_uuid if labels[0] is not None else None
        paths = [p for p, label in zip(DISKS, labels, strict=True)
                 if label is not None and label.pool_uuid == pool_uuid]
        try:
            record = await import_pool(pools, paths)
            assert record.name == "tank"
            await assert_agree(pools)
            await pools.create_volume("tank", "after", GIB)  # and it goes on
            await assert_agree(pools)
        finally:
            close(pools)

    asyncio.run(imported())


async def test_a_disk_now_under_another_name_is_never_written(tmp_path: Path) -> None:
    """After a reboot that swapped two disks' names, the pool's recorded paths
    name each other's disk: start-up re-creates none of its devices over
    them (the labels say whose disk is whose), refuses the pool, and writes
    nothing; the disks stay as they were."""
    pools = await recovered(tmp_path)
    try:
        await pools.create_pool("tank", DISKS[:2], data_size=64 << 20)
        await pools.create_volume("tank", "thin", GIB)
        await pools.create_volume("tank", "thick", 16 << 20, thin=False)
    finally:
        close(pools)
    sim = engine(tmp_path)
    while names := [d.name for d in sim.list_devices()]:  # a reboot: the state stays
        for name in names:
            with contextlib.suppress(DmError):
                sim.device_remove(name)
    sim.move_disk(DISKS[0], "/dev/simdisk9", 29)
    sim.move_disk(DISKS[1], DISKS[0], 31)
    sim.move_disk("/dev/simdisk9", DISKS[1], 32)
    heads = {p: sim.read_disk(p, 0, HEADER_BYTES) for p in DISKS[:2]}
    pools = open_pools(tmp_path)
    try:
        report = await recover(pools.devices)
        await recover_pools(pools, report)
        assert "tank" in pools.shown.refused, pools.shown.refused
        assert [d.name for d in engine(tmp_path).list_devices()] == []
        assert set(report.failed) >= {"tank-tmeta", "tank-tdata"}
        assert {p: engine(tmp_path).read_disk(p, 0, HEADER_BYTES) for p in DISKS[:2]} == heads
        with pytest.raises(errors.Busy, match="not changed by dmd"):
            await pools.create_volume("tank", "more", GIB)
    finally:
        close(pools)


def test_an_undone_create_or_grow_leaves_its_disk_free(tmp_path: Path) -> None:
    """A pool's disks are labelled before it is recorded (so a pool dmd knows
    always has its labels); a create or a grow undone, by a crash or an
    error, takes its labels back: the disk is free for the next pool."""
    asyncio.run(prepare(tmp_path))
    crash_at(tmp_path, "pool-create", PoolCreateStep.DEVICES,
             lambda p: p.create_pool("new", [DISKS[2]]))

    async def restart() -> None:
        pools = await recovered(tmp_path)
        sim = engine(tmp_path)
        try:
            assert read_device(DISKS[2], sim.read_disk(DISKS[2], 0, HEADER_BYTES)).label is None

            def fail(op: str, number: int) -> None:
                if op == "pool-grow" and number == PoolGrowStep.POOL:
                    raise errors.Failed("boom")

            pools.devices.fault = pools.fault = fail
            with pytest.raises(errors.Failed):
                await pools.add_device("tank", DISKS[2])
            pools.devices.fault = pools.fault = None
            assert read_device(DISKS[2], sim.read_disk(DISKS[2], 0, HEADER_BYTES)).label is None
            await pools.create_pool("new", [DISKS[2]])
            await assert_agree(pools)
        finally:
            close(pools)

    asyncio.run(restart())


@pytest.mark.parametrize("craft", ["revert-on-a-volumes-thin-id", "thin-id-past-next",
                                   "pending-revert-on-a-volume"])
async def test_a_description_naming_a_thin_id_twice_is_corrupt(tmp_path: Path,
                                                              craft: str) -> None:
    """A description is read from disks anyone may have written: one that
    would have an import delete a volume's thin id (a pending revert's), or
    give a volume another's data (a revert's copy), is refused, nothing
    written."""
    await make_pool(tmp_path)
    reboot_and_lose_the_state(tmp_path)
    pools = await recovered(tmp_path)
    sim: SimDM = pools.kernel.engine  # type: ignore[assignment]
    try:
        found = read_device(DISKS[0], sim.read_disk(DISKS[0], 0, HEADER_BYTES)).newest
        assert found is not None
        record, volumes = replace(found.pool, generation=found.generation + 1), found.volumes
        base = next(v for v in volumes if v.name == "base")
        assert base.thin_id is not None
        pending = None
        if craft == "revert-on-a-volumes-thin-id":
            other = next(v for v in volumes if v.name != "base")
            volumes = tuple(replace(v, revert=Revert(other.thin_id or 0, other.uuid,
                                                     v.size_bytes)) if v is base else v
                            for v in volumes)
        elif craft == "thin-id-past-next":
            volumes = tuple(replace(v, revert=Revert(record.next_thin_id, v.uuid,
                                                     v.size_bytes)) if v is base else v
                            for v in volumes)
        else:
            pending = {"operation": "volume-revert", "thin_id": base.thin_id,
                       "transaction_from": record.transaction_id}
        await pools.descriptions.write(record, volumes, pending)
        heads = {p: sim.read_disk(p, 0, HEADER_BYTES) for p in DISKS[:2]}
        with pytest.raises(errors.Corrupt, match="thin id"):
            await import_pool(pools, DISKS[:2])
        assert {p: sim.read_disk(p, 0, HEADER_BYTES) for p in DISKS[:2]} == heads
        assert sim.list_devices() == [] and await pools.store.list_pools() == []
    finally:
        close(pools)
