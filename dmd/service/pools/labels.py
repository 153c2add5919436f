"""A volume's labels changed after its creation (SetLabels): what a service
keeps with its volume (a container runtime's snapshot key and parent, a VM
manager's disk name), in the records and the pool's description alike, so
they survive a lost state directory and travel with ImportPool."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace

from dmd.service.auth import ROOT, Action, Caller
from dmd.service.devices.operations import check_labels
from dmd.service.journal import PoolArgs, VolumeLabelsStep
from dmd.service.pools.core import PoolCore, Recover
from dmd.state import IntentRecord, PoolRecord, VolumeRecord

log = logging.getLogger(__name__)


async def set_labels(pools: PoolCore, pool: str, name: str, labels: Mapping[str, str], *,
                     uuid: str | None = None, caller: Caller = ROOT) -> VolumeRecord:
    """Replace the volume's labels with *labels* (within the bounds every
    label has: dmd.service.devices.operations.check_labels), journaled:
    a crash leaves the old labels or the new, in the records and, once dmd
    is back, in the description."""
    clean = check_labels(labels)
    async with pools.change(pool) as change:
        volume = await change.volume(name, uuid)
        await pools.check_authorized(caller, Action.VOLUME, f"{pool}/{name}", volume.owner_uid)
        changed = replace(volume, labels=clean)
        if changed == volume:
            return volume
        pools.check_fits(await change.record(), await change.volumes(), changed)
        async with change.intent("volume-set-labels", f"{pool}/{name}",
                                 PoolArgs(pool=pool, volume=changed.to_json())) as journal:
            await journal.mark(VolumeLabelsStep.RECORD)
            await change.write(update=changed)
    log.info("volume-set-labels %s/%s: %d label(s)", pool, name, len(clean))
    return changed


async def recover(pools: PoolCore, intent: IntentRecord, args: PoolArgs,
                  record: PoolRecord | None) -> str | None:
    """The record was written in one transaction, or not at all: which one
    says how the intent ended."""
    assert args.volume is not None
    wanted = VolumeRecord.from_json(args.volume)
    now = await pools.recorded(wanted) if record is not None else None
    return "done" if now is not None and now.labels == wanted.labels else "rolled_back"


RECOVERY: dict[str, Recover] = {"volume-set-labels": recover}
