"""Volume.OpenDevice: a volume's block device, opened by dmd and handed over.

A service that runs as its own user asks for its volume and gets an open file
descriptor: it needs no write access to /dev, and device nodes stay root's
(as udisks' Block.OpenDevice). The caller must be the volume's owner (or
root) and pass the "volume" authorization, as for any change to its volume.
The open is made under the pool's lock, so it cannot meet the volume half
deactivated or deleted; afterwards the open descriptor is what keeps the
device busy (a Delete or Deactivate then fails with Busy, as for a mount).
"""

from __future__ import annotations

import errno
import logging
import os

from dmd.engine import DmError
from dmd.service import errors
from dmd.service.auth import Action, Caller
from dmd.service.pools.core import PoolCore
from dmd.service.pools.names import cleartext_device, volume_device

log = logging.getLogger(__name__)

MODES = {"r": os.O_RDONLY, "w": os.O_WRONLY, "rw": os.O_RDWR}


def open_flags(mode: str, *, exclusive: bool = False) -> int:
    if mode not in MODES:
        raise errors.InvalidArgument(f"mode {mode!r}: one of {', '.join(MODES)}")
    return MODES[mode] | (os.O_EXCL if exclusive else 0)


async def open_volume(pools: PoolCore, pool: str, name: str, mode: str, *,
                      exclusive: bool = False, uuid: str | None = None,
                      caller: Caller) -> int:
    """An open descriptor of volume *pool*/*name*'s device (the caller's to
    close); *mode* "r", "w" or "rw"; *exclusive* adds O_EXCL (refused with
    Busy while anyone holds the device: a mount, a table, another O_EXCL)."""
    flags = open_flags(mode, exclusive=exclusive)
    subject = f"{pool}/{name}"
    # Authorized before waiting for the pool, and again under its lock: the
    # volume read then may be another one, given the name since.
    first = await pools.volume(pool, name, uuid)
    await pools.check_authorized(caller, Action.VOLUME, subject, first.owner_uid)
    async with pools.locks.hold(pool):
        volume = await pools.volume(pool, name, first.uuid)
        device = volume_device(pool, name)
        if not volume.active or not await pools.own_device(volume):
            raise errors.NotActive(f"volume {subject} is not active: Activate it first")
        if volume.encryption is not None:
            # What a service wants of an encrypted volume is its cleartext.
            device = cleartext_device(pool, name)
            if await pools.store.get_device(device) is None:
                raise errors.Locked(f"volume {subject} is locked: Unlock it first")
        try:
            # By the DM UUID: the descriptor is of this volume's device alone.
            fd = await pools.open_node(volume, flags,
                                       cleartext=volume.encryption is not None)
        except DmError as exc:
            raise errors.from_engine(exc, device, "open") from None
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise errors.Busy(f"open {subject} exclusively: it is in use (mounted, "
                                  "mapped or open exclusively)") from None
            code = exc.errno or 0
            raise errors.Kernel(f"open {subject}: {os.strerror(code)}", code) from None
    log.info("volume-open %s: %s%s for uid %d", subject, mode,
             " exclusive" if exclusive else "", caller.uid)
    return fd
