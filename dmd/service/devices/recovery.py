"""Start-up recovery: make the kernel and dmd's records agree before serving.

Runs before dmd takes its bus name, in this order:
1. every unfinished intent is finished or rolled back against what the kernel
   really holds (the journal says how far the operation got);
2. persistent managed devices missing from the kernel (after a reboot) are
   re-created, each after the devices its table uses;
3. managed devices whose live table differs from the recorded one are
   reported as drifted, never overwritten.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from dmd.engine import DmError, DmFlags, TargetLine, carries_key
from dmd.engine.interface import Engine
from dmd.service.devices.drift import live_differs
from dmd.service.devices.operations import DeviceService
from dmd.service.journal import ReloadArgs, ReloadStep, RenameArgs

log = logging.getLogger(__name__)

# The device family's operations (dmd.service.devices.operations journals them).
DEVICE_OPERATIONS = frozenset({"create", "reload", "rename", "remove"})


@dataclass
class RecoveryReport:
    finished: list[str] = field(default_factory=list)
    rolled_back: list[str] = field(default_factory=list)
    recreated: list[str] = field(default_factory=list)
    drifted: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


async def _kernel_names(service: DeviceService) -> set[str]:
    return {d.name for d in await service.kernel(Engine.list_devices)}


async def _info(service: DeviceService, name: str) -> Any:
    try:
        return await service.kernel(Engine.device_info, name)
    except DmError:
        return None


async def _resume_if_suspended(service: DeviceService, name: str) -> None:
    info = await _info(service, name)
    if info is not None and info.suspended:
        with contextlib.suppress(DmError):
            await service.kernel(Engine.device_suspend, name, DmFlags(0))
        log.info("recovery: resumed %s, left suspended by an interrupted operation", name)


async def _settle_intent(service: DeviceService, intent: Any, report: RecoveryReport) -> None:
    store, name, op = service.store, intent.device, intent.operation
    record = await store.get_device(name)
    label = f"{op} {name} (intent {intent.id}, step {intent.step})"
    if op == "create":
        if record is not None:
            await _resume_if_suspended(service, name)
            state = "done"
        else:
            await service.remove_quietly(name)
            state = "rolled_back"
    elif op == "reload":
        # From ReloadStep.RESUME on, an absent inactive table means the swap
        # happened and the kernel's live table is the new one; before it,
        # the new table is dropped.
        info = await _info(service, name)
        swapped = False
        if info is not None:
            swapped = intent.step >= ReloadStep.RESUME and not info.inactive_present
            if info.inactive_present:
                with contextlib.suppress(DmError):
                    await service.kernel(Engine.table_clear, name)
            if not ReloadArgs.from_json(intent.args).was_suspended:
                await _resume_if_suspended(service, name)
            if record is not None and swapped:
                _, live = await service.kernel(Engine.table_status, name, DmFlags.DM_STATUS_TABLE)
                if not carries_key(live):
                    await store.update_table(name, live, info.read_only)
        state = "done" if swapped else "rolled_back"
    elif op == "rename":
        new_name = RenameArgs.from_json(intent.args).new_name
        names = await _kernel_names(service)
        if new_name in names and name not in names:
            if record is not None:
                await store.rename_device(name, new_name)
            state = "done"
        else:
            state = "rolled_back"
    elif op == "remove":
        if name not in await _kernel_names(service):
            if record is not None:
                await store.remove_device(name)
            state = "done"
        else:
            await _resume_if_suspended(service, name)
            state = "rolled_back"
    else:
        await _resume_if_suspended(service, name)
        state = "rolled_back"
    await store.finish_intent(intent.id, state)
    (report.finished if state == "done" else report.rolled_back).append(label)
    log.info("recovery: %s -> %s", label, state)


def _uses(table: list[TargetLine]) -> set[str]:
    """Names of dm devices a table refers to by /dev/mapper path."""
    return {token.removeprefix("/dev/mapper/") for line in table
            for token in line.params.split() if token.startswith("/dev/mapper/")}


async def _recreate(service: DeviceService, record: Any, report: RecoveryReport) -> None:
    name = record.name
    if getattr(record, "key_withheld", False):
        report.failed.append(name)
        log.error("recovery: %s needs its key, which dmd does not store", name)
        return
    for guard in service.recreate_guards:
        why = await guard(record)
        if why is not None:
            report.failed.append(name)
            log.error("recovery: %s not re-created: %s", name, why)
            return
    try:
        await service.kernel(Engine.device_create, name, record.uuid)
        await service.kernel(Engine.table_load, name, list(record.table),
                             DmFlags.DM_READONLY if record.read_only else DmFlags(0))
        await service.kernel(Engine.device_suspend, name, DmFlags(0))
        report.recreated.append(name)
        log.info("recovery: re-created persistent device %s", name)
    except TimeoutError:  # the kernel has it; udev has not finished its node
        report.recreated.append(name)
        log.warning("recovery: re-created %s; udev did not finish in time", name)
    except DmError as exc:
        await service.remove_quietly(name)
        report.failed.append(name)
        log.error("recovery: could not re-create %s: %s", name, exc)


async def recover(service: DeviceService) -> RecoveryReport:
    report = RecoveryReport()
    store = service.store
    for intent in sorted(await store.pending_intents(), key=lambda i: i.id):
        if intent.operation not in DEVICE_OPERATIONS:
            continue  # another family's: settled by its own recovery, after the devices
        try:
            await _settle_intent(service, intent, report)
        except Exception:
            log.exception("recovery: could not settle intent %s", intent.id)
            report.failed.append(f"intent {intent.id}")

    records = {r.name: r for r in await store.list_devices()}
    present = await _kernel_names(service)
    missing = {n: r for n, r in records.items() if n not in present and r.persistent}
    while missing:
        ready = [n for n, r in missing.items() if not (_uses(list(r.table)) & missing.keys())]
        if not ready:
            report.failed.extend(sorted(missing))
            log.error("recovery: cannot order %s (they use each other)", sorted(missing))
            break
        # One level of the stack at a time, its devices all at once: after a
        # reboot every volume comes back here, and each resume waits for udev.
        level = [missing.pop(name) for name in sorted(ready)]
        for outcome in await asyncio.gather(
                *(_recreate(service, record, report) for record in level),
                return_exceptions=True):
            if isinstance(outcome, BaseException):  # all of the level done first
                raise outcome
    report.recreated.sort()
    report.failed.sort()

    for name, record in records.items():
        info = await _info(service, name)
        if info is None or not info.active_present:
            continue
        _, live = await service.kernel(Engine.table_status, name, DmFlags.DM_STATUS_TABLE)
        if await live_differs(service, live, list(record.table)):
            report.drifted.append(name)
            await store.set_drifted(name, "live table differs from the recorded one")
            log.warning("recovery: %s drifted: its live table is not the one dmd recorded", name)
    return report
