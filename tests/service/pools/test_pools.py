"""Pools and volumes on SimDM and a real SQLite file: the operations, the
refusals, and faults at every step of every operation (an exception: rolled
back in-process; a crash: a forked child dies there and a fresh service
recovers). Afterwards the pool's thin ids are exactly the recorded volumes',
the recorded transaction id is the kernel's, nothing is suspended, every
active volume has its device, and the description on the pool's devices
(label, both copies) says what the records say, at their generation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from dmd.engine import TargetLine
from dmd.engine.sim import SimDM
from dmd.service import errors
from dmd.service.auth import Caller
from dmd.service.pools.service import PoolService
from dmd.state.pool_description import HEADER_BYTES
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


async def test_pool_volume_snapshot_resize_delete(pools: PoolService) -> None:
    pool = await pools.create_pool("tank", DISKS[:2])
    assert pool.layout.data_sectors % pool.block_sectors == 0
    assert {"tank-tmeta", "tank-tdata", "tank-tpool"} <= set((await state(pools))["kernel"])
    data = await pools.create_volume("tank", "data", 20 * GIB, labels={"app": "db"})
    assert data.thin_id == 0 and data.size_bytes == 20 * GIB
    snap = await pools.snapshot("tank", "data", "data.snap")
    assert snap.thin_id == 1 and snap.origin_uuid == data.uuid
    assert snap.size_bytes == data.size_bytes
    grown = await pools.resize_volume("tank", "data", 30 * GIB)
    assert grown.size_bytes == 30 * GIB
    now = await assert_agree(pools)
    assert now["kernel"]["tank-data"][2] == [(0, 30 * GIB // 512, "thin", "253:2 0")]
    assert (await pools.pool_state("tank")).transaction_id == 2
    await pools.set_active("tank", "data.snap", False)
    assert "tank-data.snap" not in (await assert_agree(pools))["kernel"]
    await pools.set_active("tank", "data.snap", True)
    await pools.delete_volume("tank", "data")
    now = await assert_agree(pools)
    assert [v[1] for v in now["volumes"]] == ["data.snap"]
    # Ids are never handed out twice, even after a delete.
    again = await pools.create_volume("tank", "data", GIB)
    assert again.thin_id == 2
    with pytest.raises(errors.Busy, match="volume"):
        await pools.destroy_pool("tank")
    await pools.destroy_pool("tank", force=True)
    now = await state(pools)
    assert now["kernel"] == {} and now["devices"] == [] and now["pools"] == {}
    assert now["volumes"] == [] and now["thins"] == {}  # the metadata was wiped
    engine: SimDM = pools.kernel.engine  # type: ignore[assignment]
    for path in DISKS[:2]:  # and the description: blank devices again
        assert engine.block_device(path).signature is None
        assert engine.read_disk(path, 0, HEADER_BYTES) == bytes(HEADER_BYTES)
    # The devices are free for a new pool.
    await pools.create_pool("tank", DISKS[:2])


async def test_a_device_added_grows_the_pool(pools: PoolService) -> None:
    await pools.create_pool("tank", DISKS[:1])
    await pools.create_volume("tank", "v", GIB)
    before = await pools.pool_state("tank")
    grown = await pools.add_device("tank", DISKS[1])
    after = await pools.pool_state("tank")
    assert grown.layout.devices == tuple(DISKS[:2])
    assert after.data_total_bytes == grown.layout.data_sectors * 512 > before.data_total_bytes
    assert after.transaction_id == before.transaction_id  # no thin id changed
    await assert_agree(pools)
    with pytest.raises(errors.Busy):
        await pools.add_device("tank", DISKS[1])  # already in it
    with pytest.raises(errors.Busy):
        await pools.add_device("tank", "/dev/simext4")  # a signature
    # The pool comes back grown after the kernel lost its devices.
    recorded = await pools.pool("tank")
    assert recorded.layout == grown.layout


async def test_pool_spans_devices(pools: PoolService) -> None:
    pool = await pools.create_pool("wide", DISKS, block_size=256 << 10)
    assert pool.block_sectors == 512
    assert [s.device for s in pool.layout.data] == [0, 1, 2]
    assert pool.layout.data_sectors % 512 == 0
    state_ = await pools.pool_state("wide")
    assert state_.data_total_bytes == pool.layout.data_sectors * 512
    assert state_.mode == "ok" and state_.transaction_id == 0


Case = tuple[type[Exception], Callable[[], Awaitable[Any]]]


async def bad_inputs(pools: PoolService) -> list[Case]:
    return [
        (errors.InvalidArgument, lambda: pools.create_volume("tank", "v", 0)),
        (errors.InvalidArgument, lambda: pools.create_volume("tank", "v", 1 << 63)),
        (errors.InvalidArgument, lambda: pools.create_volume("tank", "v", -1)),
        (errors.InvalidArgument, lambda: pools.create_volume("tank", "-ab", GIB)),
        (errors.InvalidArgument, lambda: pools.create_volume("tank", "ab-", GIB)),
        (errors.InvalidArgument, lambda: pools.create_volume("tank", "v\n", GIB)),
        (errors.InvalidArgument, lambda: pools.create_volume("tank", "v" * 65, GIB)),
        (errors.InvalidArgument, lambda: pools.create_volume("tank", "tdata", GIB)),
        (errors.InvalidArgument, lambda: pools.create_volume("tank", "tmeta", GIB)),
        (errors.InvalidArgument, lambda: pools.snapshot("tank", "taken", "tpool")),
        (errors.InvalidArgument, lambda: pools.snapshot("tank", "taken", "s\n")),
        (errors.InvalidArgument, lambda: pools.create_volume("tank", "", GIB)),
        (errors.NotFound, lambda: pools.create_volume("nosuch", "v", GIB)),
        (errors.AlreadyExists, lambda: pools.create_volume("tank", "taken", GIB)),
        (errors.AlreadyExists, lambda: pools.snapshot("tank", "taken", "taken")),
        (errors.NotFound, lambda: pools.snapshot("tank", "nosuch", "s")),
        (errors.InvalidArgument, lambda: pools.resize_volume("tank", "taken", GIB // 2)),
        (errors.NotFound, lambda: pools.delete_volume("tank", "nosuch")),
        (errors.Busy, lambda: pools.create_pool("other", [DISKS[0]])),  # in tank
        (errors.Busy, lambda: pools.create_pool("other", ["/dev/simext4"])),  # ext4
        (errors.InvalidArgument, lambda: pools.create_pool("other", ["/dev/nothing"])),
        (errors.InvalidArgument, lambda: pools.create_pool("other", ["relative"])),
        (errors.InvalidArgument, lambda: pools.create_pool("other", [])),
        (errors.InvalidArgument, lambda: pools.create_pool("other", [DISKS[2], DISKS[2]])),
        (errors.InvalidArgument, lambda: pools.create_pool("o", [DISKS[2]], block_size=4096)),
        (errors.InvalidArgument, lambda: pools.create_pool("o", [DISKS[2]], on_full="drop")),
        (errors.AlreadyExists, lambda: pools.create_pool("tank", [DISKS[2]])),
        (errors.InvalidArgument, lambda: pools.create_pool("bad-", [DISKS[2]])),
        (errors.InvalidArgument, lambda: pools.create_pool("bad\n", [DISKS[2]])),
        (errors.InvalidArgument, lambda: pools.create_pool("b/d", [DISKS[2]])),
    ]


async def test_bad_input_gets_a_named_error_and_changes_nothing(pools: PoolService) -> None:
    await pools.create_pool("tank", DISKS[:2])
    await pools.create_volume("tank", "taken", GIB)
    before = await state(pools)
    for kind, call in await bad_inputs(pools):
        with pytest.raises(kind):
            await call()
        assert await state(pools) == before, call
    # With force, a signature does not stop it.
    await pools.create_pool("other", ["/dev/simext4"], force=True)


async def test_raw_calls_on_a_pools_devices_are_refused(pools: PoolService) -> None:
    await pools.create_pool("tank", DISKS[:1])
    await pools.create_volume("tank", "v", GIB)
    before = await state(pools)
    raw = pools.devices
    for call in (lambda: raw.remove("tank-tpool"), lambda: raw.remove("tank-v"),
                 lambda: raw.message("tank-tpool", 0, "delete 0"),
                 lambda: raw.reload("tank-v", [TargetLine(0, 8, "zero", "")]),
                 lambda: raw.suspend("tank-tmeta"), lambda: raw.rename("tank-v", "mine"),
                 lambda: raw.create("tank-new", [TargetLine(0, 8, "zero", "")])):
        with pytest.raises(errors.Busy, match="pool 'tank'"):
            await call()
    assert await raw.remove_all_managed() == []
    assert await state(pools) == before


async def test_only_the_owner_changes_a_volume(pools: PoolService) -> None:
    from dmd.service.auth import Action

    class Allow:
        async def authorize(self, caller: Caller, action: Action, device: str) -> None:
            if action is Action.POOL:
                raise errors.NotAuthorized("pools are for admins")

    pools.devices.authorizer = Allow()
    await pools.create_pool("tank", DISKS[:1])
    alice, bob = Caller(uid=1001), Caller(uid=1002)
    with pytest.raises(errors.NotAuthorized):
        await pools.create_pool("mine", DISKS[1:2], caller=alice)
    await pools.create_volume("tank", "alice", GIB, caller=alice)
    with pytest.raises(errors.NotAuthorized):
        await pools.delete_volume("tank", "alice", caller=bob)
    with pytest.raises(errors.NotAuthorized):
        await pools.snapshot("tank", "alice", "stolen", caller=bob)
    with pytest.raises(errors.NotAuthorized):
        await pools.resize_volume("tank", "alice", 2 * GIB, caller=bob)
    await pools.snapshot("tank", "alice", "alice.1", caller=alice)
    await pools.delete_volume("tank", "alice", caller=alice)


class Boom(Exception):
    pass


# Past these steps an operation rolls forward (the kernel cannot undo it).
ROLLS_FORWARD = {("volume-delete", k) for k in (2, 3, 4)} | {
    ("pool-destroy", 1), ("pool-destroy", 2), ("pool-grow", 5), ("volume-activate", 2),
    ("volume-deactivate", 2), ("volume-resize", 2)} | {
    ("volume-revert", k) for k in (8, 9, 10)}


def outcome(before: dict[str, Any], after: dict[str, Any], done: bool) -> None:
    """The operation either happened whole or not at all."""
    if not done:
        # Undone: the same devices, records and thin ids (the transaction id
        # may have moved on: an undo is a transaction of its own).
        for key in ("kernel", "devices", "volumes", "layouts"):
            assert after[key] == before[key], key
        assert sorted(after["thins"].values()) == sorted(before["thins"].values())


@pytest.mark.parametrize(("operation", "step"), EVERY_STEP)
async def test_error_at_any_step_leaves_all_or_nothing(tmp_path: Path, operation: str,
                                                       step: int) -> None:
    await prepare(tmp_path)

    def fault(op: str, number: int) -> None:
        if op == operation and number == step:
            raise Boom(f"{op} step {number}")

    pools = open_pools(tmp_path)
    await pools.start()
    before = await state(pools)
    pools.devices.fault = pools.fault = fault
    try:
        with pytest.raises(Boom):
            await OPERATIONS[operation](pools)
        pools.devices.fault = pools.fault = None
        after = await assert_agree(pools)
        outcome(before, after, (operation, step) in ROLLS_FORWARD)
    finally:
        close(pools)


@pytest.mark.parametrize(("operation", "step"), EVERY_STEP)
def test_crash_at_any_step_then_recovery_agrees(tmp_path: Path, operation: str,
                                                step: int) -> None:
    asyncio.run(prepare(tmp_path))

    async def before_crash() -> dict[str, Any]:
        pools = open_pools(tmp_path)
        try:
            return await state(pools)
        finally:
            close(pools)

    before = asyncio.run(before_crash())
    crash_at(tmp_path, operation, step, OPERATIONS[operation])

    async def restart() -> dict[str, Any]:
        pools = await recovered(tmp_path)
        try:
            return await assert_agree(pools)
        finally:
            close(pools)

    after = asyncio.run(restart())
    done = after["volumes"] != before["volumes"] or after["layouts"] != before["layouts"]
    outcome(before, after, done)


async def test_pool_state_shows_what_volumes_use(pools: PoolService) -> None:
    await pools.create_pool("tank", DISKS[:1])
    await pools.create_volume("tank", "v", GIB)
    sim: SimDM = pools.kernel.engine  # type: ignore[assignment]
    sim.write("tank-v", 0, 10 * 128)  # ten 64 KiB blocks
    await pools.snapshot("tank", "v", "v.snap")
    sim.write("tank-v", 0, 128)  # one copied on write
    state_ = await pools.pool_state("tank")
    assert state_.data_used_bytes == 11 * (64 << 10) and state_.mode == "ok"
    assert state_.metadata_used_bytes > 0


async def test_an_operation_reads_its_pool_once_and_hands_it_down(pools: PoolService) -> None:
    """Create, snapshot and delete read the pool's record and its volumes
    once each (the description at the end and the bus refresh are made from
    the records in hand), and write them twice: create and snapshot their
    thin id, then the record; delete its description's generation, then the
    record."""
    await pools.create_pool("tank", DISKS[:2])
    await pools.create_volume("tank", "base", GIB)
    shown: list[Any] = []

    async def settler(pool: str, records: Any) -> None:
        shown.append(records)

    pools.add_settler(settler)
    calls: dict[str, int] = {}
    for name in ("get_pool", "list_volumes", "pool_change"):
        def counted(method: Any, name: str = name) -> Any:
            async def call(*args: Any, **kwargs: Any) -> Any:
                calls[name] = calls.get(name, 0) + 1
                return await method(*args, **kwargs)
            return call
        setattr(pools.store, name, counted(getattr(pools.store, name)))
    for operation in (lambda: pools.create_volume("tank", "v", GIB),
                      lambda: pools.snapshot("tank", "base", "s"),
                      lambda: pools.delete_volume("tank", "v")):
        calls.clear()
        shown.clear()
        await operation()
        assert calls == {"get_pool": 1, "list_volumes": 1, "pool_change": 2}, calls
        assert shown and all(records is not None for records in shown), shown
    await assert_agree(pools)


async def test_an_operation_shows_its_thin_pool_device_once_at_its_end(
        tank: PoolService) -> None:
    """Create, snapshot and delete send the thin-pool two messages each
    (the thin id's, the transaction id's); the bus is shown the device's new
    state once, after the last of them, before the operation returns (each
    showing reads the device again), and a message sent outside a change
    is shown at once, as before."""
    await tank.create_volume("tank", "base", GIB)
    settled: list[tuple[str, int]] = []

    async def settler(names: list[str]) -> None:
        for name in names:
            if name == "tank-tpool":
                settled.append((name, await tank.kernel_tid("tank")))

    tank.devices.events.add_settler(settler)
    for operation in (lambda: tank.create_volume("tank", "v", GIB),
                      lambda: tank.snapshot("tank", "base", "s"),
                      lambda: tank.delete_volume("tank", "v")):
        before = await tank.kernel_tid("tank")
        settled.clear()
        await operation()
        after = await tank.kernel_tid("tank")
        assert after == before + 1
        assert settled == [("tank-tpool", after)], settled
    settled.clear()
    await tank.delete_thin("tank", 999, "nobody's")  # no such thin id: fine
    assert len(settled) == 1, settled


async def test_a_change_accepted_reads_nothing_from_the_kernel_to_show_it(
        tank: PoolService) -> None:
    """As a change is accepted (its job answers its caller then), the bus
    shows its subject under way with the pool's figures as last read: no
    thin-pool status read, no mapped-bytes read and no space check before
    the change's work; its end reads them, once for the bus and once for
    the space check. The transaction id is read without a metadata commit."""
    from types import SimpleNamespace

    from dmd.dbus.pool_exporter import PoolExporter
    from dmd.engine.types import DmFlags
    from dmd.service.pools.space import SpaceWatch

    await tank.create_volume("tank", "base", GIB)
    await tank.create_volume("tank", "v", GIB)
    bus = SimpleNamespace(export=lambda path, obj: None, unexport=lambda path, obj: None)
    inventory = SimpleNamespace(get=lambda name: None, subscribe=lambda listener: None)
    exporter = PoolExporter(bus, tank, inventory)  # type: ignore[arg-type]
    space = SpaceWatch(tank)
    await exporter.refresh("tank")
    engine = tank.kernel.engine
    reads: list[DmFlags] = []  # the thin-pool's status
    used_bytes: list[str] = []  # a volume's (its mapped bytes)
    status = engine.table_status

    def counted(id: Any, flags: DmFlags = DmFlags(0)) -> Any:
        if id == "tank-tpool":
            reads.append(flags)
        elif id in ("tank-base", "tank-v", "tank-s"):
            used_bytes.append(id)
        return status(id, flags)

    engine.table_status = counted  # type: ignore[method-assign]
    at_accept: list[tuple[list[DmFlags], int, bool]] = []
    for operation in (lambda accept: tank.delete_volume("tank", "v", accept=accept),
                      lambda accept: tank.snapshot("tank", "base", "s", accept=accept)):
        reads.clear()
        used_bytes.clear()
        await operation(lambda _: at_accept.append(
            (list(reads), len(used_bytes), bool(space._running))))
        await space.settled()
        # The transaction id (no commit), before the accept; no mapped bytes
        # (a snapshot's new volume, under way, was read at its accept before).
        assert at_accept[-1] == ([DmFlags.DM_NOFLUSH], 0, False), at_accept
        assert reads.count(DmFlags(0)) == 2, reads  # the bus's and the space check's


async def test_a_create_is_seven_transactions(tank: PoolService) -> None:
    """Its thin id, its intent begun and ended, its device's intent begun
    and ended, the device's record, the volume's record: its progress marks
    go with those (they were five transactions more)."""
    await tank.create_volume("tank", "base", GIB)
    for operation in (lambda: tank.create_volume("tank", "v", GIB),
                      lambda: tank.snapshot("tank", "base", "s"),
                      lambda: tank.delete_volume("tank", "v")):
        before = tank.store.commits
        await operation()
        assert tank.store.commits - before <= 7, tank.store.commits - before


async def test_records_written_around_a_change_are_read_again(tank: PoolService) -> None:
    """A step that writes the pool's records around a change's records in
    hand (an undo, another module's step) makes the change read them again:
    its own write keeps nothing stale, and the description at its end says
    what the store says."""
    await tank.create_volume("tank", "a", GIB)
    await tank.create_volume("tank", "b", GIB)
    async with tank.change("tank") as change:
        a, b = sorted(await change.volumes(), key=lambda v: v.name)
        await tank.record_change("tank", update=replace(a, labels={"around": "yes"}))
        await change.write(update=replace(b, labels={"mine": "yes"}))
        assert {v.name: v.labels for v in await change.volumes()} == {
            "a": {"around": "yes"}, "b": {"mine": "yes"}}
    await assert_agree(tank)
