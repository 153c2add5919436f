"""ImportPool: a pool brought back from its devices alone (dmd's state
directory lost, or the disks moved to another machine or to other device
names), by the description each of them carries (dmd.state.pool_description).

The devices are known by their labels, not their names: every device of
the pool must be given, and only those. The newest whole copy of the
description found on any of them is the pool; the kernel must agree with it
(the pool's metadata at the description's transaction id), or the import is
refused: another manager, or an operation cut short without its journal,
changed the pool since. Nothing is written to a device before the import is
recorded, so a refused import leaves the devices as they were.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from dmd.engine.interface import Engine
from dmd.service import errors
from dmd.service.auth import ROOT, Action, Caller
from dmd.service.journal import PoolArgs, PoolImportStep
from dmd.service.pools import activation, revert
from dmd.service.pools.core import Accept, PoolChange, PoolCore, Recover, ignore
from dmd.service.pools.crypt import settle_at_start
from dmd.service.pools.names import (
    PoolPart,
    legacy_name,
    pool_devices,
)
from dmd.service.pools.volumes import finish_delete, undo_thin
from dmd.state import IntentRecord, PoolRecord, VolumeRecord
from dmd.state.pool_description import Description

log = logging.getLogger(__name__)


async def import_pool(pools: PoolCore, paths: list[str], *, caller: Caller = ROOT,
                      accept: Accept = ignore) -> PoolRecord:
    await pools.devices.authorize(caller, Action.POOL, "import")
    if not isinstance(paths, list) or not paths or len(set(paths)) != len(paths):
        raise errors.InvalidArgument("an import needs one or more distinct devices")
    # A pool dmd has already is AlreadyExists, what a client can act on,
    # before the check that its devices are free (they are: by that pool).
    for known in await pools.store.list_pools():
        if set(paths) <= set(known.layout.devices):
            raise errors.AlreadyExists(f"{', '.join(paths)}: devices of pool "
                                       f"{known.name!r}, which dmd has already")
    await pools.free_devices(paths)
    description, record = await _read(pools, paths)
    _check_thin_ids(description, record)
    name = record.name
    if await pools.store.get_pool(name) is not None:
        raise errors.AlreadyExists(f"a pool named {name!r} exists")
    if any(p.uuid == record.uuid for p in await pools.store.list_pools()):
        raise errors.AlreadyExists(f"pool {record.uuid} is recorded already")
    present = {d.name for d in await pools.kernel(Engine.list_devices)}
    for device in pool_devices(name):
        if device in present:
            raise errors.AlreadyExists(f"a device named {device} exists")
    async with pools.change(name) as change:
        pools.claim(name)
        try:
            await _activate(change, record, description, accept)
        except BaseException:
            pools.release(name)
            raise
        pools.descriptions.labelled[record.uuid] = record.layout.ids
        if description.pending is not None and "thin_id" in description.pending:
            await _settle_thin(pools, name, description.pending)
        elif description.pending is not None and "volume" in description.pending:
            await _settle_pending(pools, name, description.pending, record.transaction_id,
                                  description.volumes)
        elif description.pending is not None:
            # A growth: the description gave its larger layout, which the
            # devices just made take (the kernel grows a pool on resume).
            log.info("pool-import %s: its %s, cut short, is finished", name,
                     description.pending.get("operation"))
        else:
            await pools.descriptions.repair(
                record, list(description.volumes),
                await pools.descriptions.read(record.layout.devices))
        await revert.apply_scheduled(change)
        await activation.activate_recorded(pools, name)  # settled with the rest: the bus shows them
        # Encrypted volumes wait for their keys (the keyring's, or Unlock).
        await settle_at_start(pools, name)
    log.info("pool-import %s: %d device(s), %d volume(s), generation %d", name, len(paths),
             len(description.volumes), record.generation)
    return record


async def _read(pools: PoolCore, paths: list[str]) -> tuple[Description, PoolRecord]:
    """The newest description on *paths*, and the record it makes with the
    devices where they are now; refused unless the devices are the pool's,
    all of them."""
    found = await pools.descriptions.read(paths)
    for path, why in found.unreadable:
        raise errors.InvalidArgument(f"{path} cannot be read: {why}")
    by_id: dict[str, str] = {}
    pool_uuids = set()
    for reading in found.readings:
        if reading.label is None:
            raise errors.InvalidArgument(f"{reading.path} carries no dmd pool label")
        pool_uuids.add(reading.label.pool_uuid)
        by_id[reading.label.device_uuid] = reading.path
    if len(pool_uuids) > 1:
        raise errors.InvalidArgument("the devices belong to more than one pool")
    description = found.newest
    if description is None:
        if found.corrupt:
            raise errors.Corrupt("no copy of the pool's description on these devices is "
                                 "whole; nothing was written to them")
        raise errors.InvalidArgument("the devices carry no pool description")
    # A description is what a disk says: its names are checked as a
    # caller's are (a crafted disk must not name a volume "tdata").
    legacy_name(description.pool.name, "pool")
    for volume in description.volumes:
        legacy_name(volume.name, "volume", description.pool.name)
    layout = description.pool.layout
    missing = [f"device {i} (last seen as {layout.devices[i]})"
               for i, uid in enumerate(layout.ids) if uid not in by_id]
    if missing:
        raise errors.InvalidArgument(f"pool {description.pool.name!r} needs every one of "
                                     f"its devices; not given: {', '.join(missing)}")
    extra = sorted(p for uid, p in by_id.items() if uid not in layout.ids)
    if extra:
        raise errors.InvalidArgument(f"not devices of pool {description.pool.name!r} "
                                     f"(as of generation {description.generation}): "
                                     f"{', '.join(extra)}")
    moved = replace(layout, devices=tuple(by_id[uid] for uid in layout.ids))
    return description, replace(description.pool, layout=moved,
                                generation=description.generation)


def _check_thin_ids(description: Description, record: PoolRecord) -> None:
    """Corrupt unless every thin id the description names (its volumes',
    their scheduled reverts', an operation's under way) is below the pool's
    next thin id and names one thing only: an import deletes the thin id a
    pending revert names, and a volume takes the one its revert names."""
    named = [v.thin_id for v in description.volumes if v.thin_id is not None] + [
        v.revert.thin_id for v in description.volumes if v.revert is not None]
    pending = description.pending or {}
    if "thin_id" in pending:
        if pending.get("transaction_from") != record.transaction_id:
            raise errors.Corrupt(f"pool {record.name!r}: its description's pending "
                                 "operation moves another transaction id than its own")
        named.append(pending["thin_id"])
    if any(not isinstance(t, int) or not 0 <= t < record.next_thin_id for t in named) or \
            len(set(named)) != len(named):
        raise errors.Corrupt(f"pool {record.name!r}: its description names a thin id twice, "
                             "or one past its next thin id")


async def _settle_thin(pools: PoolCore, name: str, pending: dict[str, Any]) -> None:
    """A revert cut short names one thin id the description's records do
    not: a copy of the snapshot not yet scheduled (taken back), or the thin
    id the origin had before it took its copy (deleted)."""
    operation, thin_id = pending.get("operation"), pending.get("thin_id")
    if operation not in ("volume-revert", "volume-revert-apply") or \
            not isinstance(thin_id, int) or thin_id < 0:
        raise errors.Corrupt(f"pool {name!r}: its description names an operation this dmd "
                             f"does not know ({operation!r}, thin id {thin_id!r})")
    await pools.delete_thin(name, thin_id, f"pool-import {name}")
    tid = await pools.commit_tid(name, await pools.kernel_tid(name))
    await pools.record_change(name, transaction_id=tid)
    log.info("pool-import %s: %s, cut short: thin id %d deleted", name, operation, thin_id)


async def _settle_pending(pools: PoolCore, name: str, pending: dict[str, Any],
                          start: int, volumes: tuple[VolumeRecord, ...]) -> None:
    """The operation the description names was cut short (its caller was
    never told it ended: that comes after the description without it is
    written): a create or snapshot is undone, its thin id deleted if the
    kernel has it; a delete, past its way back once named, is finished. The
    records then match the kernel's thin ids and transaction id, and the
    description is written anew. A delete names its volume by UUID (it is
    among the description's volumes); a create, by its whole record."""
    raw = pending["volume"]
    if set(raw) == {"uuid"}:
        volume = next((v for v in volumes if v.uuid == raw["uuid"]), None)
        if volume is None:
            raise errors.Corrupt(f"pool {name!r}: its description's pending operation names "
                                 f"volume {raw['uuid']}, which it does not hold")
    else:
        volume = VolumeRecord.from_json(raw)
    legacy_name(volume.name, "volume", name)
    if volume.pool != name or volume.thin_id is None:
        raise errors.Corrupt(f"pool {name!r}: its description's pending operation names "
                             "another pool's volume, or none")
    operation = pending.get("operation")
    if operation in ("volume-create", "volume-snapshot"):
        await undo_thin(pools, name, volume, recorded=False)
    elif operation == "volume-delete":
        await finish_delete(pools, volume, start)
    else:
        raise errors.Corrupt(f"pool {name!r}: its description names an operation this dmd "
                             f"does not know ({operation!r})")
    log.info("pool-import %s: %s of %s, cut short, %s", name, operation, volume.name,
             "finished" if operation == "volume-delete" else "undone")


async def _activate(change: PoolChange, record: PoolRecord, description: Description,
                    accept: Accept) -> None:
    pools, name, plan = change.core, record.name, record.layout

    async def undo(_: object) -> None:
        await pools.remove_pool_devices(name)

    async with change.intent("pool-import", name,
                             PoolArgs(pool=name, layout=plan.to_json()), undo) as journal:
        change.show(record, "importing")
        await change.accepted(record, accept)
        await journal.mark(PoolImportStep.DEVICES)
        await pools.create_pool_devices(record, PoolPart.TMETA, PoolPart.TDATA)
        try:
            await pools.check_metadata(record)
        finally:  # an import refused is no damaged pool of this dmd's
            pools.damaged.pop(name, None)
        await journal.mark(PoolImportStep.POOL)
        await pools.create_pool_devices(record, PoolPart.TPOOL)
        tid = (await pools.pool_state(name, record)).transaction_id
        pending = description.pending or {}
        # An operation the description names may have moved it one on.
        moving = pending.get("transaction_from") == record.transaction_id and \
            tid == record.transaction_id + 1
        if tid != record.transaction_id and not moving:
            raise errors.Busy(
                f"pool {name!r}: its metadata is at transaction id {tid}, its description "
                f"(generation {description.generation}) at {record.transaction_id}: it was "
                "changed without dmd since; not imported")
        await journal.mark(PoolImportStep.RECORD)
        await pools.store.import_pool(record, list(description.volumes))


async def recover_import(pools: PoolCore, intent: IntentRecord, args: PoolArgs,
                         record: PoolRecord | None) -> str | None:
    """After a crash (dmd.service.pools.recovery)."""
    if record is not None:
        return "done"  # its volumes are activated by recovery, as every pool's are
    await pools.remove_pool_devices(args.pool)  # the devices' data and description stay
    return "rolled_back"


RECOVERY: dict[str, Recover] = {"pool-import": recover_import}
