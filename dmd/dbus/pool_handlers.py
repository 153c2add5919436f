"""Pool, Volume and Job methods (and the Manager's pool methods): convert,
call the pool service, convert back. Changes run as Jobs: the reply (the
subject's object and the job's) comes once the request is accepted, and the
objects are on the bus by then."""

from __future__ import annotations

from typing import Any

from dmd.dbus.convert import KDF_OPTIONS, check_string, options_in
from dmd.dbus.names import job_path, pool_path, volume_path
from dmd.engine.luks import KdfSettings
from dmd.service import errors
from dmd.service.auth import Action, Caller
from dmd.service.pools import cache
from dmd.service.pools.crypt import (
    KINDS as ENCRYPTION_KINDS,
)
from dmd.service.pools.crypt import (
    EncryptionRequest,
    change_key,
    check_kdf,
    lock,
    request_key,
    unlock,
)
from dmd.service.pools.importing import import_pool
from dmd.service.pools.open import open_volume
from dmd.service.pools.service import PoolService
from dmd.service.secrets import check_key_description, read_key


def _size(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise errors.InvalidArgument(f"{what} must be a number of bytes")
    return value


def _kdf(opts: dict[str, Any]) -> KdfSettings:
    return check_kdf(opts.get("pbkdf", "argon2id"), opts.get("pbkdf-time-ms"),
                     opts.get("pbkdf-memory-kib"), opts.get("pbkdf-iterations"))


def _root_keyring(caller: Caller) -> None:
    if caller.uid != 0:
        raise errors.NotAuthorized("key-description names a key in root's keyring: only "
                                   "root may name one (pass the key itself, key)")


async def _encryption(opts: dict[str, Any], caller: Caller) -> EncryptionRequest | None:
    """CreateVolume's encryption options, with the key read (before the call
    is answered: the caller's descriptor is closed then)."""
    kind = opts.get("encryption")
    keyed = "key" in opts or "key-description" in opts
    if kind is None:
        if keyed or any(k in opts for k in KDF_OPTIONS):
            raise errors.InvalidArgument("key and pbkdf options go with encryption")
        return None
    if kind not in ENCRYPTION_KINDS:
        raise errors.InvalidArgument(f"encryption {kind!r}: one of "
                                     f"{', '.join(ENCRYPTION_KINDS)}")
    kdf = _kdf(opts)
    description = opts.get("key-description")
    if description is not None:
        _root_keyring(caller)
        check_key_description(description)
    key = await read_key(opts["key"], uid=caller.uid) if "key" in opts else None
    return EncryptionRequest(await request_key(key, description), description, kdf)


class PoolHandlers:
    """Manager.CreatePool/ImportPool/GetPool and the Pool interface; *pool* is the
    pool's name, from its object."""

    def __init__(self, pools: PoolService) -> None:
        self.pools = pools

    async def CreatePool(self, caller: Caller, name: str, devices: list[str],
                         options: dict[str, Any]) -> list[str]:
        opts = options_in("CreatePool", options)
        paths = [check_string(d, "a device") for d in devices]
        block = opts.get("block-size")
        job, record = await self.pools.as_job("pool-create", caller, lambda accept:
            self.pools.create_pool(
                check_string(name, "name"), paths, force=opts.get("force", False),
                block_size=block, on_full=opts.get("on-full", "queue"),
                low_water_percent=opts.get("low-water", 20), data_size=opts.get("data-size"),
                no_space_timeout=opts.get("no-space-timeout", 60),
                metadata_size=opts.get("metadata-size"),
                caller=caller, accept=accept))
        return [pool_path(record.uuid), job_path(job.id)]

    async def ImportPool(self, caller: Caller, devices: list[str],
                         options: dict[str, Any]) -> list[str]:
        options_in("ImportPool", options)
        paths = [check_string(d, "a device") for d in devices]
        job, record = await self.pools.as_job("pool-import", caller, lambda accept:
            import_pool(self.pools, paths, caller=caller, accept=accept))
        return [pool_path(record.uuid), job_path(job.id)]

    async def GetPool(self, caller: Caller, name: str) -> str:
        record = await self.pools.pool(check_string(name, "name"))
        return pool_path(record.uuid)

    async def CreateVolume(self, caller: Caller, pool: str, name: str, size: int,
                           options: dict[str, Any]) -> list[str]:
        opts = options_in("CreateVolume", options)
        # Read now: the caller's descriptor is closed once the call is answered.
        # create_volume wipes the key when its job ends. Authorized first: a
        # caller who may not would otherwise hold a reader for seconds.
        if "encryption" in opts:
            await self.pools.check_authorized(caller, Action.VOLUME, f"{pool}/{name}")
        encryption = await _encryption(opts, caller)
        job, volume = await self.pools.as_job("volume-create", caller, lambda accept:
            self.pools.create_volume(pool, check_string(name, "name"), _size(size, "size"),
                                     labels=opts.get("labels"),
                                     filesystem=opts.get("filesystem"),
                                     encryption=encryption, thin=opts.get("thin", True),
                                     stripes=opts.get("stripes", 1),
                                     stripe_size=opts.get("stripe-size"),
                                     caller=caller, accept=accept))
        return [volume_path(volume.uuid), job_path(job.id)]

    async def AddDevice(self, caller: Caller, pool: str, device: str,
                        options: dict[str, Any]) -> str:
        opts = options_in("AddDevice", options)
        job, _ = await self.pools.as_job("pool-grow", caller, lambda accept:
            self.pools.add_device(pool, check_string(device, "device"),
                                  force=opts.get("force", False), caller=caller, accept=accept))
        return job_path(job.id)

    async def Destroy(self, caller: Caller, pool: str, options: dict[str, Any]) -> str:
        opts = options_in("Destroy", options)
        job, _ = await self.pools.as_job("pool-destroy", caller, lambda accept:
            self.pools.destroy_pool(pool, force=opts.get("force", False), caller=caller,
                                    accept=accept))
        return job_path(job.id)


class VolumeHandlers:
    """The Volume interface; (*pool*, *volume*, *uuid*) come from its object:
    the service acts only if the volume of that name is still the object's."""

    def __init__(self, pools: PoolService) -> None:
        self.pools = pools

    async def Snapshot(self, caller: Caller, pool: str, volume: str, uuid: str, name: str,
                       options: dict[str, Any]) -> list[str]:
        opts = options_in("Snapshot", options)
        job, snap = await self.pools.as_job("volume-snapshot", caller, lambda accept:
            self.pools.snapshot(pool, volume, check_string(name, "name"),
                                activate=opts.get("activate", True), labels=opts.get("labels"),
                                uuid=uuid, caller=caller, accept=accept))
        return [volume_path(snap.uuid), job_path(job.id)]

    async def Resize(self, caller: Caller, pool: str, volume: str, uuid: str, size: int,
                     options: dict[str, Any]) -> str:
        opts = options_in("Resize", options)
        job, _ = await self.pools.as_job("volume-resize", caller, lambda accept:
            self.pools.resize_volume(pool, volume, _size(size, "size"),
                                     shrink=opts.get("shrink", False), uuid=uuid, caller=caller,
                                     accept=accept))
        return job_path(job.id)

    async def Delete(self, caller: Caller, pool: str, volume: str, uuid: str,
                     options: dict[str, Any]) -> str:
        options_in("Delete", options)
        job, _ = await self.pools.as_job("volume-delete", caller, lambda accept:
            self.pools.delete_volume(pool, volume, uuid=uuid, caller=caller, accept=accept))
        return job_path(job.id)

    async def Activate(self, caller: Caller, pool: str, volume: str, uuid: str,
                       options: dict[str, Any]) -> str:
        options_in("Activate", options)
        job, _ = await self.pools.as_job("volume-activate", caller, lambda accept:
            self.pools.set_active(pool, volume, True, uuid=uuid, caller=caller, accept=accept))
        return job_path(job.id)

    async def Deactivate(self, caller: Caller, pool: str, volume: str, uuid: str,
                         options: dict[str, Any]) -> str:
        options_in("Deactivate", options)
        job, _ = await self.pools.as_job("volume-deactivate", caller, lambda accept:
            self.pools.set_active(pool, volume, False, uuid=uuid, caller=caller, accept=accept))
        return job_path(job.id)

    async def OpenDevice(self, caller: Caller, pool: str, volume: str, uuid: str, mode: str,
                         options: dict[str, Any]) -> int:
        opts = options_in("OpenDevice", options)
        return await open_volume(self.pools, pool, volume, check_string(mode, "mode"),
                                 exclusive=opts.get("exclusive", False), uuid=uuid,
                                 caller=caller)


    async def _authorized(self, caller: Caller, pool: str, volume: str, uuid: str) -> None:
        owner = (await self.pools.volume(pool, volume, uuid)).owner_uid
        await self.pools.check_authorized(caller, Action.VOLUME, f"{pool}/{volume}", owner)

    async def Unlock(self, caller: Caller, pool: str, volume: str, uuid: str,
                     options: dict[str, Any]) -> None:
        opts = options_in("Unlock", options)
        await self._authorized(caller, pool, volume, uuid)
        key = await read_key(opts["key"], uid=caller.uid) if "key" in opts else None
        await unlock(self.pools, pool, volume, key, uuid=uuid, caller=caller)

    async def Lock(self, caller: Caller, pool: str, volume: str, uuid: str,
                   options: dict[str, Any]) -> None:
        options_in("Lock", options)
        await lock(self.pools, pool, volume, uuid=uuid, caller=caller)

    async def ChangeKey(self, caller: Caller, pool: str, volume: str, uuid: str,
                        options: dict[str, Any]) -> None:
        opts = options_in("ChangeKey", options)
        # Asked first: another's caller learns nothing of the volume or keys.
        await self._authorized(caller, pool, volume, uuid)
        kdf = _kdf(opts)
        if "key" not in opts:
            raise errors.InvalidArgument("ChangeKey needs a key that opens the volume (key)")
        key = await read_key(opts["key"], uid=caller.uid)
        new_key = (await read_key(opts["new-key"], "new-key", uid=caller.uid)
                   if "new-key" in opts else None)
        await change_key(self.pools, pool, volume, key, new_key,
                         remove=opts.get("remove", False), kdf=kdf, uuid=uuid,
                         caller=caller)


    async def AttachCache(self, caller: Caller, pool: str, volume: str, uuid: str, device: str,
                          options: dict[str, Any]) -> str:
        opts = options_in("AttachCache", options)
        job, _ = await self.pools.as_job("volume-cache-attach", caller, lambda accept:
            cache.attach(self.pools, pool, volume, check_string(device, "device"),
                         mode=opts.get("mode", "writeback"), block_size=opts.get("block-size"),
                         force=opts.get("force", False), uuid=uuid, caller=caller,
                         accept=accept))
        return job_path(job.id)

    async def DetachCache(self, caller: Caller, pool: str, volume: str, uuid: str,
                          options: dict[str, Any]) -> str:
        options_in("DetachCache", options)
        job, _ = await self.pools.as_job("volume-cache-detach", caller, lambda accept:
            cache.detach(self.pools, pool, volume, uuid=uuid, caller=caller,
                         accept=accept))
        return job_path(job.id)


class JobHandlers:
    def __init__(self, pools: PoolService) -> None:
        self.pools = pools

    async def Cancel(self, caller: Caller, job_id: int, options: dict[str, Any]) -> None:
        options_in("Cancel", options)
        job = self.pools.jobs.get(job_id)
        if caller.uid not in (0, job.started_by):
            raise errors.NotAuthorized(f"job {job_id} was started by uid {job.started_by}")
        self.pools.jobs.cancel(job_id)

    async def Wait(self, caller: Caller, job_id: int, timeout: float) -> bool:
        if not isinstance(timeout, float) or not 0 <= timeout <= 3600:
            raise errors.InvalidArgument("timeout is 0 to 3600 seconds")
        return await self.pools.jobs.wait(job_id, timeout)
