"""Start-up recovery of pools: after the devices' own recovery (which
re-creates every persistent device, a pool's among them), each unfinished
pool or volume operation is finished or undone by the pool's transaction id
(see dmd.service.journal), and every origin a snapshot suspended is resumed.

An intent whose pool is not active, or whose transaction id is neither the
one it moved from nor the one it moved to, is left pending (another
manager touched the pool, or its devices are missing) and reported.

Then each pool's description on its devices is checked against its records
(see dmd.service.pools.descriptions): written where it is behind, taken where
it is ahead, a copy repaired where one is stale or torn; and a pool whose
devices cannot vouch for it, or whose transaction id another manager moved,
is refused changes. Last, every active volume without its device gets one,
and every encrypted volume's cleartext device is brought to its record
(dmd.service.pools.crypt).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace

from dmd.engine import DmError, DmFlags
from dmd.engine.interface import Engine
from dmd.service import errors
from dmd.service.devices.recovery import RecoveryReport
from dmd.service.journal import PoolArgs, PoolExtendStep, PoolGrowStep, VolumeCreateStep
from dmd.service.pools.cache import recover as cache_recover
from dmd.service.pools.crypt import settle_at_start
from dmd.service.pools.names import tpool, volume_device
from dmd.service.pools.service import (
    POOL_OPERATIONS,
    PoolService,
    volume_from_json,
)
from dmd.state import IntentRecord, PoolLayout, PoolRecord

log = logging.getLogger(__name__)


async def recover_pools(pools: PoolService, report: RecoveryReport) -> None:
    for intent in sorted(await pools.store.pending_intents(), key=lambda i: i.id):
        if intent.operation not in POOL_OPERATIONS:
            continue
        label = f"{intent.operation} {intent.device} (intent {intent.id}, step {intent.step})"
        try:
            state = await _settle(pools, intent)
        except errors.ServiceError as exc:
            log.error("recovery: %s: %s", label, exc)
            report.failed.append(label)
            continue
        if state is None:
            report.failed.append(label)
            continue
        await pools.store.finish_intent(intent.id, state)
        (report.finished if state == "done" else report.rolled_back).append(label)
        log.info("recovery: %s -> %s", label, state)
    await pools.start()
    for record in await pools.store.list_pools():
        try:
            await check_description(pools, record)
            await _check_transaction_id(pools, record.name)
            if record.name not in pools.refused:
                await pools.activate_recorded(record.name)
                await settle_at_start(pools, record.name)
        except (errors.ServiceError, OSError) as exc:
            log.error("recovery: pool %s: %s", record.name, exc)
            report.failed.append(f"pool {record.name}")


async def check_description(pools: PoolService, record: PoolRecord) -> None:
    name = record.name
    found = await pools.descriptions.read(record.layout.devices)
    for path, why in found.unreadable:
        pools.refused[name] = f"its device {path} cannot be read ({why})"
    ids = record.layout.ids
    for index, reading in enumerate(found.readings):
        label = reading.label
        if label is not None and (label.pool_uuid != record.uuid or (
                len(ids) == len(record.layout.devices) and label.device_uuid != ids[index])):
            pools.refused[name] = (f"{reading.path} carries the label of another pool's "
                                   "device: the devices were moved; ImportPool finds them")
    if found.corrupt:
        pools.refused[name] = ("no copy of its description on any device is whole; nothing "
                               "is written to it (restore its devices, or ImportPool from a "
                               "copy of them)")
    if name in pools.refused:
        log.error("recovery: pool %s is refused changes: %s", name, pools.refused[name])
        return
    newest = found.newest
    if newest is not None and newest.pending is not None and \
            newest.generation == record.generation:
        # It names an operation recovery has settled above: the records are
        # the pool now, in a generation of their own.
        log.info("recovery: pool %s: its description named a %s under way; written again",
                 name, newest.pending.get("operation"))
        await pools.store.pool_change(name)
        await pools.describe(name)
        return
    if newest is None or newest.generation < record.generation:
        if newest is not None:
            log.info("recovery: pool %s: description at generation %d, records at %d: "
                     "written again", name, newest.generation, record.generation)
        await pools.describe(name)
        return
    if newest.generation > record.generation:
        log.warning("recovery: pool %s: its devices hold generation %d of its description, "
                    "the database generation %d (restored from a backup?): the devices' "
                    "description wins", name, newest.generation, record.generation)
        record = replace(newest.pool, layout=replace(newest.pool.layout,
                                                     devices=record.layout.devices),
                         generation=newest.generation)
        await pools.store.replace_pool(record, list(newest.volumes))
        record = await pools.pool(name)
    await pools.descriptions.repair(record, await pools.store.list_volumes(name), found)


async def _check_transaction_id(pools: PoolService, pool: str) -> None:
    record = await pools.pool(pool)
    tid = (await pools.pool_state(pool)).transaction_id
    if tid is not None and tid != record.transaction_id and pool not in pools.refused:
        pools.refused[pool] = (f"its transaction id is {tid} in the kernel, {record.transaction_id}"
                               " in dmd's records: another manager changed it")
        log.error("recovery: pool %s is refused changes: %s", pool, pools.refused[pool])


async def _resume(pools: PoolService, device: str) -> None:
    with contextlib.suppress(DmError):
        info = await pools.kernel(Engine.device_info, device)
        if info.suspended:
            await pools.kernel(Engine.device_suspend, device, DmFlags(0))
            log.info("recovery: resumed %s, left suspended by an interrupted snapshot", device)


async def _settle(pools: PoolService, intent: IntentRecord) -> str | None:
    args = PoolArgs.from_json(intent.args)
    pool = args.pool
    record = await pools.store.get_pool(pool)
    if intent.operation == "pool-create":
        if record is not None:
            return "done"
        await pools._remove_pool_devices(pool)
        # Its layout is not recorded; the kernel's formatting, if it got
        # that far, lies at the metadata device's start: zeroed again.
        if args.layout is not None:
            plan = PoolLayout.from_json(args.layout)
            await pools._wipe_metadata(plan)
            await pools.descriptions.unlabel(plan.devices, plan.ids)
        return "rolled_back"
    if intent.operation == "pool-import":
        if record is not None:
            return "done"  # its volumes are activated below, as every pool's are
        await pools._remove_pool_devices(pool)  # the devices' data and description stay
        return "rolled_back"
    if intent.operation == "pool-destroy":
        if record is not None:
            pools._claim(pool)
            await pools.finish_destroy(record)  # it began past its way back
        return "done"
    if intent.operation == "pool-extend":
        if record is None:
            return "rolled_back"
        assert args.layout is not None
        larger = replace(record, layout=PoolLayout.from_json(args.layout))
        pools._claim(pool)
        if intent.step >= PoolExtendStep.POOL:  # the kernel may have taken it: forward
            await pools.finish_layout(larger)
            return "done"
        await pools._restore_layout(record)
        return "rolled_back"
    if intent.operation == "pool-grow":
        if record is None:
            return "rolled_back"
        assert args.layout is not None
        grown = PoolLayout.from_json(args.layout)
        pools._claim(pool)
        if intent.step >= PoolGrowStep.METADATA and grown.metadata != record.layout.metadata:
            # The kernel may have taken the larger metadata: forward.
            await pools.finish_layout(replace(record, layout=grown))
            return "done"
        _, table = await pools.kernel(Engine.table_status, tpool(pool), DmFlags.DM_STATUS_TABLE)
        if sum(line.length for line in table) == grown.data_sectors:
            await pools.store.pool_change(pool, layout=grown)  # the pool grew
            return "done"
        await pools._restore_data(record)
        added = len(record.layout.devices)
        await pools.descriptions.unlabel(grown.devices[added:], grown.ids[added:])
        return "rolled_back"
    if record is None:
        return "rolled_back" if intent.operation != "volume-delete" else "done"
    pools._claim(pool)
    assert args.volume is not None
    volume = volume_from_json(args.volume)
    if intent.operation in ("cache-attach", "cache-detach"):
        return await cache_recover(pools, intent.operation, volume)
    if intent.operation == "volume-create-thick":
        await pools.undo_thick(volume)  # a half-made volume is no volume to hand out
        return "rolled_back"
    if intent.operation == "volume-delete-thick":
        await pools.undo_thick(volume)  # rolls forward once begun
        return "done"
    if intent.operation == "volume-resize-thick":
        # The device takes whatever the record says: the grown segments if
        # they were recorded (reserved), else its old ones.
        now = await pools.recorded(volume)
        device = volume_device(pool, volume.name)
        if now is not None and now.active and await pools.store.get_device(device) is not None:
            # (The new segments were zeroed before they were recorded.)
            await pools.devices.reload(device, await pools.volume_table(now),
                                       claim=pools.owner(pool))
        return "done"
    if intent.operation in ("volume-activate", "volume-deactivate"):
        return await pools.match_device(volume)
    if intent.operation == "volume-resize":
        return await pools.match_size(volume)
    if intent.operation == "volume-snapshot":
        volumes = {v.uuid: v for v in await pools.store.list_volumes(pool)}
        origin = volumes.get(args.origin_uuid or "")
        if origin is not None and origin.active:
            await _resume(pools, volume_device(pool, origin.name))
    tid = (await pools.pool_state(pool)).transaction_id
    start = args.transaction_from
    if tid not in (start, start + 1):
        log.error("recovery: pool %s is at transaction id %s, expected %d or %d: it was "
                  "changed outside dmd; %s left for an admin", pool, tid, start, start + 1,
                  intent.device)
        return None
    recorded = {v.uuid for v in await pools.store.list_volumes(pool)}
    if intent.operation in ("volume-create", "volume-snapshot"):
        if intent.operation == "volume-create" and intent.step >= VolumeCreateStep.ENCRYPT:
            # luksFormat, cryptsetup open or mkfs was running: a half-made
            # header or filesystem is no volume to hand out.
            await pools.undo_thin(pool, volume, recorded=volume.uuid in recorded)
            return "rolled_back"
        if tid == start:
            # The thin may exist (create_thin sent, the transaction not):
            # take it back. Nothing was recorded or activated yet.
            await pools.undo_thin(pool, volume, recorded=False)
            # undo_thin moved the pool one transaction on; the records follow.
            return "rolled_back"
        if volume.uuid not in recorded:
            await pools.store.pool_change(pool, transaction_id=tid, add=volume)
        if volume.active and await pools.store.get_device(volume_device(pool, volume.name)) \
                is None:
            await pools._activate(volume)
        return "done"
    # volume-delete rolls forward once begun.
    await pools.finish_delete(volume, start)
    return "done"
