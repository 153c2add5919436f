"""The service layer on SimDM and a real SQLite file: operations, rollback, recovery.

Two kinds of faults are injected at every step of every journaled operation:
an exception (the error path must roll back in-process) and a crash (a child
process ``os._exit``s at the step; a fresh service then recovers). Either way
the kernel and the database must agree afterwards, nothing may be left
suspended, and no record may be lost.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from dmd.engine import DM, DmFlags, TargetLine
from dmd.engine.sim import SimDM
from dmd.service import errors
from dmd.service.devices.operations import DeviceService
from dmd.service.devices.recovery import recover
from dmd.service.events import ChangeKind
from dmd.service.kernel import KernelWorkers
from dmd.state import AsyncStateStore, StateStore

ZERO = [TargetLine(0, 2048, "zero", "")]
TWO = [TargetLine(0, 1024, "zero", ""), TargetLine(1024, 1024, "error", "")]


P = "dmdtest-"  # every device name starts so, for the lab's clean-up


def open_service(tmp: Path, fault: Any = None, kind: str = "sim") -> DeviceService:
    """A service on SimDM (kernel in tmp/kernel.json) or on the lab's kernel."""
    engine: Any
    if kind == "kernel":
        engine = DM()
    else:
        engine = SimDM(tmp / "kernel.json")
        engine.add_disk("/dev/simdisk1", 7, 1, 16 * 2048)
    store = AsyncStateStore(StateStore.open(tmp / "state"))
    return DeviceService(KernelWorkers(engine), store, fault=fault)


@pytest.fixture(params=["sim", pytest.param("kernel", marks=pytest.mark.kernel)])
def kind(request: pytest.FixtureRequest) -> str:
    if request.param == "kernel":
        request.getfixturevalue("clean_dm")  # removes dmdtest- devices before and after
    return str(request.param)


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[DeviceService]:
    svc = open_service(tmp_path)
    yield svc
    svc.close()


async def snapshot(svc: DeviceService) -> dict[str, Any]:
    """Everything that must agree: kernel devices and tables, records, intents."""
    engine = svc.kernel.engine
    kernel = {}
    for dev in engine.list_devices():
        if not dev.name.startswith(P) and isinstance(engine, DM):
            continue  # the lab may hold devices that are not this test's
        info, table = engine.table_status(dev.name, DmFlags.DM_STATUS_TABLE)
        kernel[dev.name] = (info.suspended, info.inactive_present, [tuple(t) for t in table])
    records = {r.name: [tuple(t) for t in r.table] for r in await svc.store.list_devices()}
    pending = [i.operation for i in await svc.store.pending_intents()]  # type: ignore[attr-defined]
    return {"kernel": kernel, "records": records, "pending": pending}


async def test_create_records_publishes_and_is_listed(service: DeviceService) -> None:
    seen = []
    service.events.subscribe(seen.append)
    info = await service.create("vol", ZERO, uuid="UUID-vol", labels={"app": "db"})
    assert info.active_present and not info.suspended
    record = await service.store.get_device("vol")
    assert record is not None and record.uuid == "UUID-vol" and record.labels == {"app": "db"}
    assert [(e.kind, e.name) for e in seen] == [(ChangeKind.ADDED, "vol")]
    state = await snapshot(service)
    assert state["pending"] == [] and state["kernel"]["vol"][0] is False


async def test_create_refusals_change_nothing(service: DeviceService) -> None:
    await service.create("vol", ZERO)
    before = await snapshot(service)
    with pytest.raises(errors.AlreadyExists):
        await service.create("vol", ZERO)
    with pytest.raises(errors.InvalidArgument):
        await service.create("bad/name", ZERO)
    with pytest.raises(errors.InvalidArgument):
        await service.create("gap", [(0, 8, "zero", ""), (9, 8, "zero", "")])
    with pytest.raises(errors.Kernel) as caught:
        await service.create("nodisk", [TargetLine(0, 8, "linear", "/dev/nonexistent 0")])
    assert caught.value.errno == 22 and "EINVAL" in str(caught.value)
    assert await snapshot(service) == before


async def test_reload_failure_keeps_old_table_live_and_resumed(service: DeviceService) -> None:
    await service.create("vol", ZERO)
    before = await snapshot(service)
    too_far = [TargetLine(0, 2048, "linear", f"/dev/simdisk1 {16 * 2048 - 10}")]
    with pytest.raises(errors.Kernel):
        await service.reload("vol", too_far)
    assert await snapshot(service) == before


async def test_reload_swaps_table_and_records_it(service: DeviceService) -> None:
    await service.create("vol", ZERO)
    await service.reload("vol", TWO)
    state = await snapshot(service)
    assert state["kernel"]["vol"] == (False, False, [tuple(t) for t in TWO])
    assert state["records"]["vol"] == [tuple(t) for t in TWO]


async def test_rename_moves_the_record(service: DeviceService) -> None:
    await service.create("vol", ZERO)
    await service.rename("vol", "vol2")
    state = await snapshot(service)
    assert set(state["kernel"]) == {"vol2"} and set(state["records"]) == {"vol2"}


async def test_remove_refuses_a_used_device_naming_its_users(service: DeviceService) -> None:
    await service.create("lower", ZERO)
    await service.create("upper", [TargetLine(0, 2048, "linear", "/dev/mapper/lower 0")])
    before = await snapshot(service)
    with pytest.raises(errors.Busy, match="upper"):
        await service.remove("lower")
    assert await snapshot(service) == before
    gone = await service.remove("lower", deferred=True)
    assert gone.flags & DmFlags.DM_DEFERRED_REMOVE
    await service.remove("upper")
    state = await snapshot(service)
    assert state["kernel"] == {}


async def test_remove_all_managed_goes_top_down(service: DeviceService) -> None:
    await service.create("lower", ZERO)
    await service.create("upper", [TargetLine(0, 2048, "linear", "/dev/mapper/lower 0")])
    assert sorted(await service.remove_all_managed()) == ["lower", "upper"]
    assert (await snapshot(service))["kernel"] == {}


async def test_labels_and_adopt(service: DeviceService) -> None:
    sim: SimDM = service.kernel.engine  # type: ignore[assignment]
    sim.device_create("foreign")
    sim.table_load("foreign", ZERO)
    sim.device_suspend("foreign", DmFlags(0))
    with pytest.raises(errors.NotFound, match="adopt"):
        await service.set_labels("foreign", {"a": "b"})
    await service.adopt("foreign")
    await service.set_labels("foreign", {"a": "b"})
    record = await service.store.get_device("foreign")
    assert record is not None and record.labels == {"a": "b"}


async def test_many_operations_at_once_equal_a_serial_order(tmp_path: Path, kind: str) -> None:
    service = open_service(tmp_path, None, kind)
    names = [f"{P}vol{i}" for i in range(40)]
    await asyncio.gather(*(service.create(n, ZERO) for n in names))
    tables = [[TargetLine(0, 2048 + i, "zero", "")] for i in range(20)]
    await asyncio.gather(*(service.reload(P + "vol0", t) for t in tables))
    state = await snapshot(service)
    service.close()
    assert set(state["kernel"]) == set(names) == set(state["records"])
    live = state["kernel"][P + "vol0"][2]
    assert live in [[tuple(t) for t in table] for table in tables]
    assert state["records"][P + "vol0"] == live
    assert not any(s or i for s, i, _ in state["kernel"].values())


class Boom(Exception):
    pass


STEPS = {
    "create": (lambda s: s.create(P + "vol", ZERO, persistent=True)),
    "reload": (lambda s: s.reload(P + "base", TWO)),
    "rename": (lambda s: s.rename(P + "base", P + "renamed")),
    "remove": (lambda s: s.remove(P + "base")),
}


# Every journaled step of every operation (create 4, reload 4, remove 3, rename 2).
EVERY_STEP = [(op, k) for op, n in [("create", 4), ("reload", 4), ("remove", 3), ("rename", 2)]
              for k in range(1, n + 1)]


@pytest.mark.parametrize(("operation", "step"), EVERY_STEP)
async def test_error_at_any_step_rolls_back(tmp_path: Path, kind: str, operation: str,
                                            step: int) -> None:
    def fault(op: str, number: int) -> None:
        if op == operation and number == step:
            raise Boom(f"{op} step {number}")

    svc = open_service(tmp_path, None, kind)
    await svc.create(P + "base", ZERO)
    before = await snapshot(svc)
    svc.fault = fault
    try:
        with pytest.raises(Boom):
            await STEPS[operation](svc)
        after = await snapshot(svc)
        if operation == "remove" and step == 3:
            # Past the kernel's remove there is no way back: rolled forward.
            assert after["kernel"] == after["records"] == {} and after["pending"] == []
        else:
            assert after == before, f"{operation} failed at step {step} but changed things"
    finally:
        svc.close()


@pytest.mark.parametrize(("operation", "step"), EVERY_STEP)
def test_crash_at_any_step_then_recovery_agrees(tmp_path: Path, kind: str,
                                                operation: str, step: int) -> None:
    """A forked child runs the operation and dies (os._exit) at the step; a
    fresh service then recovers. Forking, not spawning, keeps the lab fast:
    the child needs no second interpreter start."""
    async def prepare() -> None:
        svc = open_service(tmp_path, None, kind)
        await svc.create(P + "base", ZERO, persistent=True)
        svc.close()
        svc.store.close()  # type: ignore[attr-defined]

    asyncio.run(prepare())
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            def crash(op: str, number: int) -> None:
                if op == operation and number == step:
                    os._exit(42)

            asyncio.run(STEPS[operation](open_service(tmp_path, crash, kind)))
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 42, "the child did not die at that step"

    async def restart() -> tuple[Any, dict[str, Any]]:
        svc = open_service(tmp_path, None, kind)
        report = await recover(svc)
        state = await snapshot(svc)
        svc.close()
        svc.store.close()  # type: ignore[attr-defined]
        return report, state

    report, state = asyncio.run(restart())
    assert state["pending"] == []
    assert not report.failed
    # The kernel and the records agree, nothing is suspended or half-loaded.
    assert set(state["kernel"]) == set(state["records"]), json.dumps(state)
    for name, (suspended, inactive, live) in state["kernel"].items():
        assert not suspended and not inactive, name
        assert live == state["records"][name], name


async def test_recovery_reports_drift_and_keeps_the_record(service: DeviceService) -> None:
    await service.create("lower", ZERO)
    await service.create("upper", [TargetLine(0, 2048, "linear", "/dev/mapper/lower 0")])
    await service.create("disk", [TargetLine(0, 2048, "linear", "/dev/simdisk1 0")])
    report = await recover(service)
    assert report.drifted == []  # paths and major:minor are the same device
    sim: SimDM = service.kernel.engine  # type: ignore[assignment]
    sim.table_load("disk", TWO)  # someone else changes it behind dmd's back
    sim.device_suspend("disk", DmFlags(0))
    report = await recover(service)
    assert report.drifted == ["disk"]
    record = await service.store.get_device("disk")
    assert record is not None and record.drifted and record.table[0].target_type == "linear"
    _, live = sim.table_status("disk", DmFlags.DM_STATUS_TABLE)
    assert live == TWO  # reported, not overwritten
