"""Stop and Start a pool without destroying it (stratisd's StopPool and
StartPool): a stopped pool has no device in the kernel (its volumes', its
own), its records and its description stay, and its disks can be moved
(Start takes their new paths, found by their labels) or taken to another
machine (ImportPool there: the description on them is whole).

Stop removes the devices first, then records the pool stopped: refused,
with nothing changed, while anything outside the pool holds one of its
devices (a mount, an open descriptor, an unlocked volume's user); an
unlocked encrypted volume is closed (its key forgotten: after Start it waits
for its key, as after a reboot). Undone (the devices made again) if it fails
before the record. Start makes the pool's devices from its records, checks
the kernel's transaction id against them, records it started, then applies
scheduled reverts and makes its active volumes' devices, as dmd's start does.
While stopped, every change but Start is refused (NotActive), Destroy too.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence
from dataclasses import replace

from dmd.engine import DmError
from dmd.engine.interface import Engine
from dmd.service import errors
from dmd.service.auth import ROOT, Action, Caller
from dmd.service.journal import Journal, PoolArgs, PoolStartStep, PoolStopStep
from dmd.service.pools import activation, revert
from dmd.service.pools.core import Accept, PoolCore, Recover, ignore
from dmd.service.pools.crypt import settle_at_start
from dmd.service.pools.names import PoolPart, claim_prefix, in_pool, pool_devices
from dmd.state import IntentRecord, PoolLayout, PoolRecord, VolumeRecord

log = logging.getLogger(__name__)


def held_from_outside(engine: Engine, names: Sequence[str]) -> list[str]:
    """Those of *names* (a pool's devices) that something other than the
    pool's own devices holds open: a device's open count beyond the tables
    of *names* that map it."""
    infos = {name: engine.device_info(name) for name in names}
    held: collections.Counter[tuple[int, int]] = collections.Counter()
    for name in names:
        held.update(engine.table_deps(name))
    return [name for name, info in infos.items() if info.open_count > held[info.device]]


async def stop_pool(pools: PoolCore, pool: str, *, caller: Caller = ROOT,
                    accept: Accept = ignore) -> PoolRecord:
    async with pools.change(pool, damaged=True) as change:
        record = await change.record()
        await pools.check_authorized(caller, Action.POOL, pool, record.owner_uid)
        await check_not_held(pools, pool, "stop")
        await check_no_cache(pools, pool, await change.volumes(), "stopping")

        async def undo(_: Journal) -> None:
            await make_devices(pools, record)

        async with change.intent("pool-stop", pool, PoolArgs(pool=pool), undo) as journal:
            change.show(record, "stopping")
            await change.accepted(record, accept)
            await journal.mark(PoolStopStep.DEVICES)
            await pools.remove_pool_devices(pool, closed=True)
            for volume in await change.volumes():
                pools.shown.stop_waiting(volume.uuid)
            await journal.mark(PoolStopStep.RECORD)
            await change.write(stopped=True)
        pools.stopped.add(pool)
    log.info("pool-stop %s: its devices removed, its records kept", pool)
    return replace(record, stopped=True)


async def check_not_held(pools: PoolCore, pool: str, what: str) -> None:
    """Busy while anything outside the pool holds one of its devices (the
    ones Stop and Repair remove: another tool's ``tank-x`` on a volume is
    outside)."""
    names, _ = await pools.own_devices(pool)
    try:
        busy = await pools.kernel(held_from_outside, names)
    except DmError as exc:  # one went meanwhile: ask again later
        raise errors.Busy(f"pool {pool!r}: its devices changed meanwhile ({exc})") from None
    if busy:
        raise errors.Busy(f"pool {pool!r}: {', '.join(sorted(busy))} in use (mounted, "
                          f"open, or an unlocked volume's user): close them to {what} it")


async def check_no_cache(pools: PoolCore, pool: str, volumes: Sequence[VolumeRecord],
                         what: str) -> None:
    """Busy if a volume of *pool* has a cache, or is another volume's: a
    cache's devices are stacked on others, and a cache volume is named by
    its path in its user's record."""
    for volume in volumes:
        pools.check_uncached(volume, what)
        await pools.check_not_a_cache(volume)


async def make_devices(pools: PoolCore, record: PoolRecord, *, volumes: bool = True) -> None:
    """The pool's devices made again where missing, then (*volumes*) its
    active volumes'; a thin-pool device only over metadata thin_check finds
    whole (else the pool is left damaged, with its metadata and data
    devices, or unchecked and without it when the check could not run)."""
    present = {d.name for d in await pools.kernel(Engine.list_devices)}
    tpool_name, tdata, tmeta = pool_devices(record.name)
    missing = [part for part, name in ((PoolPart.TMETA, tmeta), (PoolPart.TDATA, tdata))
               if name not in present]
    await pools.create_pool_devices(record, *missing)
    if tpool_name not in present:
        try:
            await pools.check_metadata(record)
        except (errors.Corrupt, errors.Failed) as exc:
            log.error("pool %s: no thin-pool device made: %s", record.name, exc)
            return
        await pools.create_pool_devices(record, PoolPart.TPOOL)
    if volumes:
        await volumes_up(pools, record.name)


async def volumes_up(pools: PoolCore, pool: str) -> None:
    """Its active volumes' devices, as at dmd's start; a failure is logged,
    and the encrypted volumes' keys are waited for all the same."""
    try:
        await activation.activate_recorded(pools, pool)
    except Exception as exc:
        log.error("pool %s: not every active volume has its device: %s", pool, exc)
    await settle_at_start(pools, pool)


async def start_pool(pools: PoolCore, pool: str, *, devices: Sequence[str] | None = None,
                     caller: Caller = ROOT, accept: Accept = ignore) -> PoolRecord:
    """*devices*: the pool's disks where they are now (each found by its
    label), when they moved since the pool stopped."""
    async with pools.change(pool, stopped=True, damaged=True) as change:
        record = await change.record()
        await pools.check_authorized(caller, Action.POOL, pool, record.owner_uid)
        if not record.stopped:
            raise errors.Busy(f"pool {pool!r} is not stopped")
        if devices is not None:
            record = replace(record, layout=await moved(pools, record, devices))
        await pools.check_devices(record)
        await check_described(pools, record)
        present = {d.name for d in await pools.kernel(Engine.list_devices)}
        taken = [name for name in present if in_pool(name, claim_prefix(pool))]
        if taken:
            raise errors.AlreadyExists(f"pool {pool!r}: {', '.join(sorted(taken))} exist in "
                                       "the kernel: another tool made them")

        async def undo(_: Journal) -> None:
            await pools.remove_pool_devices(pool)

        async with change.intent("pool-start", pool, PoolArgs(pool=pool), undo) as journal:
            change.show(record, "starting")
            await change.accepted(record, accept)
            await journal.mark(PoolStartStep.DEVICES)
            await pools.create_pool_devices(record, PoolPart.TMETA, PoolPart.TDATA)
            await pools.check_metadata(record)
            await journal.mark(PoolStartStep.POOL)
            await pools.create_pool_devices(record, PoolPart.TPOOL)
            tid = (await pools.pool_state(pool, record)).transaction_id
            if tid != record.transaction_id:
                raise errors.Busy(f"pool {pool!r}: its metadata is at transaction id {tid}, "
                                  f"its records at {record.transaction_id}: it was changed "
                                  "without dmd while stopped; not started")
            await journal.mark(PoolStartStep.RECORD)
            await change.write(stopped=False, layout=record.layout)
        pools.stopped.discard(pool)
        await revert.apply_scheduled(change)
        await volumes_up(pools, pool)
    log.info("pool-start %s: started", pool)
    return replace(record, stopped=False)


async def check_described(pools: PoolCore, record: PoolRecord) -> None:
    """Busy unless the description on the disks is this dmd's, or older
    (a stopped pool is not described): disks imported and changed by another
    dmd meanwhile, or one naming an operation under way, are not started
    over their newer state."""
    found = await pools.descriptions.read(record.layout.devices)
    newest = found.newest
    if found.corrupt or newest is None:
        raise errors.Busy(f"pool {record.name!r}: no whole description on its disks; "
                          "not started")
    if newest.generation > record.generation or newest.pool.uuid != record.uuid:
        raise errors.Busy(f"pool {record.name!r}: its disks were changed elsewhere (their "
                          f"description is at generation {newest.generation}, dmd's records "
                          f"at {record.generation}); not started: forget it here and "
                          "ImportPool them")


async def moved(pools: PoolCore, record: PoolRecord, paths: Sequence[str]) -> PoolLayout:
    """The pool's layout with its disks at *paths*: each path a free
    block device whose label names this pool and one of its disks, every
    disk found once."""
    if not isinstance(paths, list | tuple) or len(set(paths)) != len(paths) or not paths:
        raise errors.InvalidArgument("devices: the pool's disks, each once")
    others = {p for other in await pools.store.list_pools() if other.name != record.name
              for p in other.layout.devices}
    mine = set(record.layout.devices)
    for path in paths:
        if path in others:
            raise errors.Busy(f"{path} is a device of another pool")
    # Its own old paths are "taken" by its record: checked as free otherwise.
    await pools.free_devices([p for p in paths if p not in mine])
    found: dict[str, str] = {}
    for path in paths:
        label, why = await pools.descriptions.read_label(path)
        if label is None or label.pool_uuid != record.uuid or \
                label.device_uuid not in record.layout.ids:
            raise errors.InvalidArgument(f"{path} is not a disk of pool {record.name!r} "
                                         f"({why or 'the label of another pool or disk'})")
        found[label.device_uuid] = path
    missing = len(set(record.layout.ids) - set(found))
    if missing:
        raise errors.InvalidArgument(f"pool {record.name!r} has {len(record.layout.ids)} "
                                     f"disks; {missing} of them not among the devices given")
    return replace(record.layout, devices=tuple(found[i] for i in record.layout.ids))


# -- after a crash (dmd.service.pools.recovery) -----------------------------
async def recover_stop(pools: PoolCore, intent: IntentRecord, args: PoolArgs,
                       record: PoolRecord | None) -> str | None:
    """Stopped once recorded (what is left is removed); else made again."""
    if record is None:
        return "rolled_back"
    pools.claim(args.pool)
    if record.stopped:
        await pools.remove_pool_devices(args.pool)
        return "done"
    await make_devices(pools, record)
    return "rolled_back"


async def recover_start(pools: PoolCore, intent: IntentRecord, args: PoolArgs,
                        record: PoolRecord | None) -> str | None:
    """Started once recorded (its volumes follow as dmd starts); else its
    devices are removed again."""
    if record is None:
        return "rolled_back"
    pools.claim(args.pool)
    if not record.stopped:
        return "done"
    await pools.remove_pool_devices(args.pool)
    return "rolled_back"


RECOVERY: dict[str, Recover] = {"pool-stop": recover_stop, "pool-start": recover_start}
