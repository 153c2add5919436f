"""Start-up recovery of pools: after the devices' own recovery (which
re-creates every persistent device, a pool's among them), each unfinished
pool or volume operation is finished or undone by the pool's transaction id
(see dmd.service.journal), and every origin a snapshot suspended is resumed.

An intent whose pool is not active, or whose transaction id is neither the
one it moved from nor the one it moved to, is left pending (another
manager touched the pool, or its devices are missing) and reported.
"""

from __future__ import annotations

import contextlib
import logging

from dmd.engine import DmError, DmFlags
from dmd.engine.interface import Engine
from dmd.service import errors
from dmd.service.journal import PoolArgs
from dmd.service.pools import (
    POOL_OPERATIONS,
    PoolService,
    tpool,
    volume_device,
    volume_from_json,
)
from dmd.service.recovery import RecoveryReport
from dmd.state import IntentRecord, PoolLayout

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
            await pools._wipe_metadata(PoolLayout.from_json(args.layout))
        return "rolled_back"
    if intent.operation == "pool-destroy":
        if record is not None:
            pools._claim(pool)
            await pools.finish_destroy(record)  # it began past its way back
        return "done"
    if intent.operation == "pool-grow":
        if record is None:
            return "rolled_back"
        assert args.layout is not None
        grown = PoolLayout.from_json(args.layout)
        pools._claim(pool)
        _, table = await pools.kernel(Engine.table_status, tpool(pool), DmFlags.DM_STATUS_TABLE)
        if sum(line.length for line in table) == grown.data_sectors:
            await pools.store.pool_change(pool, layout=grown)  # the pool grew
            return "done"
        await pools._restore_data(record)
        return "rolled_back"
    if record is None:
        return "rolled_back" if intent.operation != "volume-delete" else "done"
    pools._claim(pool)
    assert args.volume is not None
    volume = volume_from_json(args.volume)
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
        if tid == start:
            # The thin may exist (create_thin sent, the transaction not):
            # take it back. Nothing was recorded or activated yet.
            await pools._undo_thin(pool, volume, recorded=False)
            # _undo_thin moved the pool one transaction on; the records follow.
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
