"""What goes on a new volume at the end of its create: a LUKS2 header,
opened (dmd.service.pools.crypt), and a filesystem
(dmd.service.pools.filesystems)."""

from __future__ import annotations

import logging
import os

from dmd.engine.interface import Engine
from dmd.service.jobs import cancel_point, progress, work_bytes
from dmd.service.journal import (
    Journal,
    VolumeCreateStep,
)
from dmd.service.pools import crypt
from dmd.service.pools.core import (
    PoolCore,
)
from dmd.service.pools.crypt import EncryptionRequest
from dmd.service.pools.filesystems import make_filesystem
from dmd.service.pools.names import (
    cleartext_device,
    volume_device,
)
from dmd.state import VolumeRecord

log = logging.getLogger(__name__)


async def prepare(pools: PoolCore, journal: Journal, volume: VolumeRecord,
                   encryption: EncryptionRequest | None, filesystem: str | None) -> None:
    """The last steps of a create: encrypt and open, make a filesystem."""
    if encryption is not None:
        await journal.mark(VolumeCreateStep.ENCRYPT)
        await crypt.format_volume(pools, volume, encryption.key, encryption.kdf)
        await journal.mark(VolumeCreateStep.UNLOCK)
        await crypt.open_cleartext(pools, volume, encryption.key)
    if filesystem is not None:
        await journal.mark(VolumeCreateStep.FILESYSTEM)
        device = (cleartext_device if encryption else volume_device)(volume.pool,
                                                                    volume.name)
        def made(done: float) -> None:
            # mkfs's counters, as the volume's bytes and the part of the job
            # after the mark.
            work_bytes(int(done * volume.size_bytes), volume.size_bytes)
            progress((VolumeCreateStep.FILESYSTEM + done) / (len(VolumeCreateStep) + 1))

        await make_filesystem(
            lambda: pools.kernel(Engine.open_node, device, os.O_RDWR), filesystem,
            volume.name, made, lambda: cancel_point(past_way_back=False),
            zeroed=encryption is None)
