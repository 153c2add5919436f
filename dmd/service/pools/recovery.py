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

import logging
from dataclasses import replace

from dmd.service import errors
from dmd.service.devices.recovery import RecoveryReport
from dmd.service.journal import PoolArgs
from dmd.service.pools import (
    activation,
    cache,
    importing,
    lifecycle,
    naming,
    repair,
    revert,
    space,
    stopping,
    thick,
    volumes,
)
from dmd.service.pools.core import PoolCore, Recover
from dmd.service.pools.crypt import settle_at_start
from dmd.state import PoolRecord

log = logging.getLogger(__name__)

# Every pool operation, and how it is finished or undone after a crash: each
# module that owns an operation says so.
RECOVERY: dict[str, Recover] = {**lifecycle.RECOVERY, **space.RECOVERY, **importing.RECOVERY,
                                **volumes.RECOVERY, **thick.RECOVERY, **activation.RECOVERY,
                                **cache.RECOVERY, **naming.RECOVERY, **revert.RECOVERY,
                                **stopping.RECOVERY, **repair.RECOVERY}
POOL_OPERATIONS = frozenset(RECOVERY)


async def recover_pools(pools: PoolCore, report: RecoveryReport) -> None:
    for intent in sorted(await pools.store.pending_intents(), key=lambda i: i.id):
        if intent.operation not in POOL_OPERATIONS:
            continue
        label = f"{intent.operation} {intent.device} (intent {intent.id}, step {intent.step})"
        try:
            args = PoolArgs.from_json(intent.args)
            state = await RECOVERY[intent.operation](
                pools, intent, args, await pools.store.get_pool(args.pool))
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
        if record.stopped:
            continue  # no device to check or make until Pool.Start (which checks)
        try:
            await check_description(pools, record)
            if record.name in pools.damaged:
                continue  # its thin-pool device not made (recreate_guard): Repair first
            await _check_transaction_id(pools, record.name)
            if record.name not in pools.shown.refused:
                async with pools.change(record.name) as change:
                    await revert.apply_scheduled(change)
                await activation.activate_recorded(pools, record.name)
                await settle_at_start(pools, record.name)
        except (errors.ServiceError, OSError) as exc:
            log.error("recovery: pool %s: %s", record.name, exc)
            report.failed.append(f"pool {record.name}")


async def check_description(pools: PoolCore, record: PoolRecord) -> None:
    name = record.name
    found = await pools.descriptions.read(record.layout.devices)
    for path, why in found.unreadable:
        pools.shown.refuse(name, f"its device {path} cannot be read ({why})")
    ids = record.layout.ids
    for index, reading in enumerate(found.readings):
        label = reading.label
        if label is not None and (label.pool_uuid != record.uuid or (
                len(ids) == len(record.layout.devices) and label.device_uuid != ids[index])):
            pools.shown.refuse(name, (f"{reading.path} carries the label of another pool's "
                                   "device: the devices were moved; ImportPool finds them"))
    if found.corrupt:
        pools.shown.refuse(name, ("no copy of its description on any device is whole; nothing "
                               "is written to it (restore its devices, or ImportPool from a "
                               "copy of them)"))
    if name in pools.shown.refused:
        log.error("recovery: pool %s is refused changes: %s", name, pools.shown.refused[name])
        return
    newest = found.newest
    if newest is not None and newest.pending is not None and \
            newest.generation == record.generation:
        # It names an operation recovery has settled above: the records are
        # the pool now, in a generation of their own.
        log.info("recovery: pool %s: its description named a %s under way; written again",
                 name, newest.pending.get("operation"))
        await pools.record_change(name)
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


async def _check_transaction_id(pools: PoolCore, pool: str) -> None:
    record = await pools.pool(pool)
    tid = (await pools.pool_state(pool)).transaction_id
    if tid is not None and tid != record.transaction_id and pool not in pools.shown.refused:
        pools.shown.refuse(pool, f"its transaction id is {tid} in the kernel, "
                           f"{record.transaction_id} in dmd's records: another manager changed it")
        log.error("recovery: pool %s is refused changes: %s", pool, pools.shown.refused[pool])
