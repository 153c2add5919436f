"""Encrypted volumes: LUKS2 on a volume, opened as POOL-VOLUME-crypt.

The header is cryptsetup's (dmd.engine.luks), so any rescue system opens a
volume with ``cryptsetup open /dev/mapper/POOL-VOLUME NAME`` and its key. The
cleartext device is made by ``cryptsetup open`` (DM_SECURE_DATA, the volume
key by keyring reference) and then managed by dmd like a pool's other devices
(claimed, never persistent: it cannot be re-made without a key).

What a volume's record says (``Encryption.unlocked``) is what dmd wants; the
kernel holds a cleartext device, and so the key, only while it is wanted:
Lock records "locked" before it removes the device, Unlock records "unlocked"
after it made it, and at start (``settle_at_start``) a cleartext device whose
volume is recorded locked is removed. So whatever step a crash stops, no key
stays in the kernel for a volume dmd shows as locked. A volume recorded
unlocked whose device is gone (a reboot) is opened again with the key its
description names in the keyring, as soon as that key is there
(``KeyWaiter``); a volume without a description waits for Unlock.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass, replace

from dmd.engine import DmError, luks
from dmd.engine.interface import Engine
from dmd.engine.luks import KdfSettings, Pbkdf
from dmd.service import errors
from dmd.service.auth import ROOT, Action, Caller
from dmd.service.pools.core import PoolCore
from dmd.service.pools.names import cleartext_device, volume_device
from dmd.service.secrets import keyring_key, wipe, wiped
from dmd.state import Encryption, VolumeRecord

log = logging.getLogger(__name__)

KINDS = ("luks2",)
KEY_POLL_SECONDS = 5.0
# A keyslot's derivation runs while its pool is held (a create formats the
# volume in its job), and again at every unlock: its cost is bounded so that
# no caller holds a pool for long. cryptsetup's default is argon2id
# benchmarked to 2 s with up to 1 GiB; these allow 5 times the time, the same
# memory, and iteration counts of about that cost on today's machines.
MIN_PBKDF_MS, MAX_PBKDF_MS = 1, 10_000
MIN_PBKDF_KIB, MAX_PBKDF_KIB = 32, 1 << 20
MIN_PBKDF2_ITERATIONS, MAX_PBKDF2_ITERATIONS = 1000, 10_000_000
MIN_ARGON_ITERATIONS, MAX_ARGON_ITERATIONS = 4, 16


def check_kdf(pbkdf: str = "argon2id", time_ms: int | None = None,
              memory_kib: int | None = None, iterations: int | None = None) -> KdfSettings:
    """The PBKDF of a new keyslot, within cryptsetup's own bounds."""
    try:
        kind = Pbkdf(pbkdf)
    except ValueError:
        raise errors.InvalidArgument(f"pbkdf {pbkdf!r}: one of "
                                     f"{', '.join(k.value for k in Pbkdf)}") from None
    if time_ms is not None and not MIN_PBKDF_MS <= time_ms <= MAX_PBKDF_MS:
        raise errors.InvalidArgument(f"pbkdf-time-ms is {MIN_PBKDF_MS} to {MAX_PBKDF_MS}")
    if memory_kib is not None and (kind is Pbkdf.PBKDF2 or
                                   not MIN_PBKDF_KIB <= memory_kib <= MAX_PBKDF_KIB):
        raise errors.InvalidArgument(f"pbkdf-memory-kib is {MIN_PBKDF_KIB} to {MAX_PBKDF_KIB}, "
                                     "for argon2 only")
    least, most = ((MIN_PBKDF2_ITERATIONS, MAX_PBKDF2_ITERATIONS) if kind is Pbkdf.PBKDF2
                   else (MIN_ARGON_ITERATIONS, MAX_ARGON_ITERATIONS))
    if iterations is not None and not least <= iterations <= most:
        raise errors.InvalidArgument(f"pbkdf-iterations for {kind.value} is {least} to "
                                     f"{most}")
    if iterations is not None and time_ms is not None:
        raise errors.InvalidArgument("pbkdf-iterations and pbkdf-time-ms exclude each other")
    return KdfSettings(kind, time_ms, memory_kib, iterations)


@dataclass(slots=True)
class EncryptionRequest:
    """What CreateVolume's encryption options asked for: the key itself (read
    from the caller's descriptor, or from the keyring by *key_description*)."""

    key: bytearray
    key_description: str | None
    kdf: KdfSettings

    def wipe(self) -> None:
        wipe(self.key)


async def request_key(key: bytearray | None, key_description: str | None) -> bytearray:
    """The key given, else the one *key_description* names in the keyring."""
    if key is not None:
        return key
    if key_description is None:
        raise errors.InvalidArgument("an encrypted volume needs a key: a key descriptor "
                                     "(h) or a key-description in the keyring")
    found = await keyring_key(key_description)
    if found is None:
        raise errors.NotFound(f"no user key {key_description!r} in dmd's keyring "
                              "(add it to root's user keyring: keyctl padd user DESC @u)")
    return found


# -- the device's side, shared by create, unlock and start-up -------------------
async def format_volume(pools: PoolCore, volume: VolumeRecord, key: bytearray,
                        kdf: KdfSettings) -> None:
    """A LUKS2 header with *key* on the volume's (new, active) device, with
    the UUID its record names."""
    assert volume.encryption is not None
    fd = await pools.kernel(Engine.open_node, volume_device(volume.pool, volume.name),
                            os.O_RDWR)
    try:
        await pools.kernel.run_slow(luks.format_device, fd, key, kdf, volume.name,
                                volume.encryption.luks_uuid)
    except luks.LuksError as exc:
        raise errors.Failed(f"cryptsetup luksFormat exited with status {exc.status}: "
                            f"{exc.message}") from None
    finally:
        os.close(fd)


async def open_cleartext(pools: PoolCore, volume: VolumeRecord, key: bytearray) -> None:
    """Make the volume's cleartext device and manage it."""
    pool, name = volume.pool, volume.name
    device = cleartext_device(pool, name)
    try:
        await pools.kernel.slow(Engine.luks_open, volume_device(pool, name), device, key)
    except luks.WrongKey:
        raise errors.WrongKey(f"volume {pool}/{name}: the key opens no keyslot") from None
    except luks.DeviceBusy as exc:
        raise errors.Busy(f"volume {pool}/{name}: {exc.message}") from None
    except luks.LuksError as exc:
        raise errors.Failed(f"cryptsetup open exited with status {exc.status}: "
                            f"{exc.message}") from None
    except DmError as exc:
        raise errors.from_engine(exc, volume_device(pool, name), "unlock") from None
    try:
        await pools.devices.adopt(device, persistent=False, claim=pools.owner(pool))
    except BaseException:
        with contextlib.suppress(errors.ServiceError):
            await pools.devices.remove_quietly(device)
        raise
    log.info("volume-unlock %s/%s: %s made", pool, name, device)


async def close_cleartext(pools: PoolCore, pool: str, name: str) -> bool:
    """Remove the volume's cleartext device (Busy while it is used); whether
    there was one."""
    device = cleartext_device(pool, name)
    try:
        await pools.devices.remove(device, claim=pools.owner(pool))
    except errors.NotFound:
        if await pools.store.get_device(device) is not None:
            await pools.store.remove_device(device)
        return False
    log.info("volume-lock %s/%s: %s removed", pool, name, device)
    return True


async def cleartext_present(pools: PoolCore, pool: str, name: str) -> bool:
    return await pools.in_kernel(cleartext_device(pool, name))


# -- methods ------------------------------------------------------------------------
async def _subject(pools: PoolCore, pool: str, name: str, caller: Caller,
                   uuid: str | None) -> tuple[VolumeRecord, Encryption]:
    volume = await pools.volume(pool, name, uuid)
    await pools.check_authorized(caller, Action.VOLUME, f"{pool}/{name}", volume.owner_uid)
    if volume.encryption is None:
        raise errors.InvalidArgument(f"volume {pool}/{name} is not encrypted")
    return volume, volume.encryption


async def unlock(pools: PoolCore, pool: str, name: str, key: bytearray | None, *,
                 uuid: str | None = None, caller: Caller = ROOT,
                 only_if_waiting: bool = False) -> None:
    """Open the volume with *key*, or with its keyring key if None. Already
    open: nothing to do (the key is not checked). *only_if_waiting*: only
    if it still waits to be opened (a Lock meanwhile wins)."""
    with wiped(key):
        async with pools.change(pool):
            volume, encryption = await _subject(pools, pool, name, caller, uuid)
            if only_if_waiting and (volume.uuid not in pools.shown.waiting
                                    or not encryption.unlocked):
                return
            if not volume.active:
                raise errors.NotActive(f"volume {pool}/{name} is not active: Activate it "
                                       "first")
            if not await cleartext_present(pools, pool, name):
                if key is None and encryption.key_description is None:
                    raise errors.InvalidArgument(f"volume {pool}/{name} has no key in the "
                                                 "keyring: pass one (key)")
                used = await request_key(key, encryption.key_description)
                with wiped(used if used is not key else None):
                    await open_cleartext(pools, volume, used)
            pools.shown.stop_waiting(volume.uuid)
            if not encryption.unlocked:
                await _record(pools, volume, replace(encryption, unlocked=True))


async def lock(pools: PoolCore, pool: str, name: str, *, uuid: str | None = None,
               caller: Caller = ROOT) -> None:
    """Remove the cleartext device (Busy while it is mounted or open): the
    key leaves the kernel. The volume stays locked across restarts."""
    async with pools.change(pool):
        volume, encryption = await _subject(pools, pool, name, caller, uuid)
        if encryption.unlocked:
            # Recorded first: a crash before the removal is finished at start.
            volume = await _record(pools, volume, replace(encryption, unlocked=False))
        pools.shown.stop_waiting(volume.uuid)
        try:
            await close_cleartext(pools, pool, name)
        except BaseException:
            if encryption.unlocked:
                await _record(pools, volume, encryption)
            raise


async def change_key(pools: PoolCore, pool: str, name: str, key: bytearray,
                     new_key: bytearray | None, *, remove: bool = False,
                     kdf: KdfSettings | None = None, uuid: str | None = None,
                     caller: Caller = ROOT) -> None:
    """Add a keyslot for *new_key*, authorized by *key*; or, with *remove*,
    remove the keyslot *key* opens (never the last one)."""
    with wiped(key, new_key):
        if remove == (new_key is not None):
            raise errors.InvalidArgument("ChangeKey adds a key (new-key) or removes one "
                                         "(remove), one of the two")
        async with pools.change(pool):
            volume, _ = await _subject(pools, pool, name, caller, uuid)
            if not volume.active:
                raise errors.NotActive(f"volume {pool}/{name} is not active: Activate it "
                                       "first")
            fd = await pools.open_node(volume, os.O_RDWR)
            try:
                await pools.kernel.run_slow(_change_key, fd, key, new_key,
                                            kdf or KdfSettings())
            except luks.WrongKey:
                raise errors.WrongKey(f"volume {pool}/{name}: the key opens no keyslot") \
                    from None
            except luks.LuksError as exc:
                raise errors.Failed(f"cryptsetup exited with status {exc.status}: "
                                    f"{exc.message}") from None
            finally:
                os.close(fd)
    log.info("volume-change-key %s/%s: a keyslot %s", pool, name,
             "removed" if remove else "added")


def _change_key(fd: int, key: bytearray, new_key: bytearray | None,
                kdf: KdfSettings) -> None:
    if new_key is not None:
        luks.add_key(fd, key, new_key, kdf)
        return
    luks.test_key(fd, key)  # a wrong key is WrongKey, not "the last keyslot"
    if len(luks.dump(fd).keyslots) <= 1:
        raise errors.Busy("that is the volume's only key: add another before removing it")
    luks.remove_key(fd, key)


async def _record(pools: PoolCore, volume: VolumeRecord,
                  encryption: Encryption) -> VolumeRecord:
    changed = replace(volume, encryption=encryption)
    await pools.record_change(volume.pool, update=changed)
    return changed


# -- start-up --------------------------------------------------------------------
async def settle_at_start(pools: PoolCore, pool: str) -> None:
    """Bring each encrypted volume's cleartext device to its record: remove
    one recorded locked (an unlock or a lock a crash cut short), manage one
    dmd lost the record of, forget the record of one a reboot took, and
    list the volumes to open again (KeyWaiter opens them)."""
    names = {d.name for d in await pools.kernel(Engine.list_devices)}
    for volume in await pools.store.list_volumes(pool):
        encryption = volume.encryption
        if encryption is None:
            continue
        device = cleartext_device(pool, volume.name)
        present = device in names
        if present and (not encryption.unlocked or not volume.active):
            try:
                await close_cleartext(pools, pool, volume.name)
            except errors.Busy:
                # A Lock cut short while the cleartext was in use: it did
                # not happen. The record says so again.
                await _record(pools, volume, replace(encryption, unlocked=True))
                if await pools.store.get_device(device) is None:
                    await pools.devices.adopt(device, persistent=False,
                                              claim=pools.owner(pool))
                log.warning("volume %s/%s: recorded locked but its cleartext is in use: "
                            "left unlocked", pool, volume.name)
                continue
            log.info("volume %s/%s: recorded locked; its cleartext device removed", pool,
                     volume.name)
        elif present and await pools.store.get_device(device) is None:
            await pools.devices.adopt(device, persistent=False, claim=pools.owner(pool))
        elif not present:
            if await pools.store.get_device(device) is not None:
                await pools.store.remove_device(device)
            if encryption.unlocked and volume.active:
                pools.shown.wait(volume.uuid, (
                    f"waiting for key {encryption.key_description!r} in the keyring"
                    if encryption.key_description is not None
                    else "waiting for a key: Unlock with one"))


class KeyWaiter:
    """Opens volumes that wait for their keyring key, as keys arrive. A key
    that does not open its volume is tried again only once it changes."""

    def __init__(self, pools: PoolCore) -> None:
        self.pools = pools
        self._refused: dict[str, bytes] = {}  # volume uuid -> digest of the key tried

    async def run_once(self) -> None:
        pools = self.pools
        if not pools.shown.waiting:
            return
        for volume in await pools.volumes():
            if volume.uuid not in pools.shown.waiting or volume.encryption is None:
                continue
            description = volume.encryption.key_description
            if description is None:
                continue
            try:
                key = await keyring_key(description)
            except errors.ServiceError as exc:
                log.error("volume %s/%s: %s", volume.pool, volume.name, exc)
                continue
            if key is None:
                continue
            with wiped(key):
                # Fed in parts: "uuid + key" would be an immutable copy of the key.
                hashed = hashlib.sha256(volume.uuid.encode())
                hashed.update(key)
                digest = hashed.digest()
                if self._refused.get(volume.uuid) == digest:
                    continue
                try:
                    await unlock(pools, volume.pool, volume.name, key[:],
                                 only_if_waiting=True)
                except errors.WrongKey:
                    self._refused[volume.uuid] = digest
                    pools.shown.wait(volume.uuid, (f"the key {description!r} in the keyring "
                                                  "does not open it"))
                    log.error("volume %s/%s: key %r opens no keyslot; tried again when it "
                              "changes", volume.pool, volume.name, description)
                    await pools.settle(volume.pool)
                except errors.ServiceError as exc:
                    log.error("volume %s/%s: could not be opened at start: %s", volume.pool,
                              volume.name, exc)
                else:
                    self._refused.pop(volume.uuid, None)
                    log.info("volume %s/%s: opened with key %r from the keyring",
                             volume.pool, volume.name, description)
