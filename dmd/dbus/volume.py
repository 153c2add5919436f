"""The Volume object (org.example.DeviceMapper.Volume): what a service asked
of a pool, without thin ids. Its declaration, its properties (the one list
of them) and its methods' handlers; (*pool*, *volume*, *uuid*) come from the
object, and the service acts only if the volume of that name is still the
object's."""

# No "from __future__ import annotations": dbus-fast reads the annotations.
from typing import Any

from dbus_fast.service import dbus_method

from dmd.dbus.convert import check_string, kdf_in, options_in, size_in
from dmd.dbus.declare import (
    U64,
    CachedObject,
    Fd,
    Labels,
    ObjectAndJob,
    Options,
    Path,
    Str,
    cached_properties,
    routed,
)
from dmd.dbus.names import (
    NO_OBJECT,
    VOLUME_INTERFACE,
    device_path,
    job_path,
    pool_path,
    volume_path,
)
from dmd.engine import mapper_path
from dmd.service import errors
from dmd.service.auth import Caller
from dmd.service.pools import cache
from dmd.service.pools.crypt import change_key, lock, unlock
from dmd.service.pools.names import cleartext_device, volume_device
from dmd.service.pools.open import open_volume
from dmd.service.pools.service import PoolService
from dmd.service.secrets import read_key
from dmd.state import VolumeRecord

VOLUME_PROPERTIES: dict[str, str] = {
    "Name": "s", "UUID": "s", "Pool": "o", "PoolName": "s", "Size": "t", "Origin": "o",
    "UsedBytes": "t", "State": "s", "Owner": "u", "Labels": "a{ss}", "Device": "o",
    "DevicePath": "s", "Encryption": "s", "Locked": "b", "LockedReason": "s",
    "KeyDescription": "s", "CleartextDevice": "o", "CleartextPath": "s",
    "Thin": "b", "Stripes": "u", "Cache": "s", "CacheDevice": "s",
    "RevertScheduled": "b", "RevertSnapshot": "o",
}


def volume_properties(volume: VolumeRecord, pool_uuid: str, state: str, used_bytes: int,
                      device_minor: int | None, known_uuids: set[str],
                      cleartext_minor: int | None = None, waiting: str = "") -> dict[str, Any]:
    """*state*: creating, active, inactive or deleting. The origin is shown
    while it exists. An encrypted volume is locked while it has no cleartext
    device; *waiting*: what it waits for, if it is to be opened."""
    encryption = volume.encryption
    locked = encryption is not None and cleartext_minor is None
    reason = "" if not locked or encryption is None else (
        "inactive" if device_minor is None else waiting or
        ("locked" if not encryption.unlocked else "waiting for a key: Unlock with one"))
    return {
        "Name": volume.name, "UUID": volume.uuid, "Pool": pool_path(pool_uuid),
        "PoolName": volume.pool, "Size": volume.size_bytes,
        "Origin": volume_path(volume.origin_uuid) if volume.origin_uuid in known_uuids
        else NO_OBJECT,
        "UsedBytes": used_bytes, "State": state, "Owner": volume.owner_uid,
        "Labels": dict(volume.labels),
        "Device": device_path(device_minor) if device_minor is not None else NO_OBJECT,
        "DevicePath": mapper_path(volume_device(volume.pool, volume.name))
        if device_minor is not None else "",
        "Encryption": encryption.kind if encryption is not None else "",
        "Locked": locked, "LockedReason": reason,
        "KeyDescription": (encryption.key_description or "") if encryption is not None else "",
        "CleartextDevice": device_path(cleartext_minor) if cleartext_minor is not None
        else NO_OBJECT,
        "CleartextPath": mapper_path(cleartext_device(volume.pool, volume.name))
        if cleartext_minor is not None else "",
        "Thin": volume.thick is None,
        "Stripes": volume.thick.stripes if volume.thick is not None else 1,
        "Cache": (volume.cache.mode or volume.cache.kind) if volume.cache is not None else "",
        "CacheDevice": volume.cache.device if volume.cache is not None else "",
        "RevertScheduled": volume.revert is not None,
        "RevertSnapshot": volume_path(volume.revert.snapshot_uuid) if (
            volume.revert is not None and volume.revert.snapshot_uuid in known_uuids)
        else NO_OBJECT,
    }


@cached_properties
class VolumeInterface(CachedObject):
    """A volume of a pool: what a service asked for, without thin ids."""

    INTERFACE = VOLUME_INTERFACE
    PROPERTIES = VOLUME_PROPERTIES

    @dbus_method()
    def Snapshot(self, name: Str, options: Options) -> ObjectAndJob:
        routed()

    @dbus_method()
    def Resize(self, size: U64, options: Options) -> Path:
        routed()

    @dbus_method()
    def Delete(self, options: Options) -> Path:
        routed()

    @dbus_method()
    def Activate(self, options: Options) -> Path:
        routed()

    @dbus_method()
    def Deactivate(self, options: Options) -> Path:
        routed()

    @dbus_method()
    def OpenDevice(self, mode: Str, options: Options) -> Fd:
        routed()

    @dbus_method()
    def Unlock(self, options: Options) -> None:
        routed()

    @dbus_method()
    def Lock(self, options: Options) -> None:
        routed()

    @dbus_method()
    def ChangeKey(self, options: Options) -> None:
        routed()

    @dbus_method()
    def AttachCache(self, device: Str, options: Options) -> Path:
        routed()

    @dbus_method()
    def SetLabels(self, labels: Labels, options: Options) -> None:
        routed()

    @dbus_method()
    def Rename(self, name: Str, options: Options) -> None:
        routed()

    @dbus_method()
    def Revert(self, options: Options) -> Path:
        routed()

    @dbus_method()
    def DetachCache(self, options: Options) -> Path:
        routed()


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
                                udev_sync=opts.get("udev-sync", True), uuid=uuid,
                                caller=caller, accept=accept))
        return [volume_path(snap.uuid), job_path(job.id)]

    async def Resize(self, caller: Caller, pool: str, volume: str, uuid: str, size: int,
                     options: dict[str, Any]) -> str:
        opts = options_in("Resize", options)
        job, _ = await self.pools.as_job("volume-resize", caller, lambda accept:
            self.pools.resize_volume(pool, volume, size_in(size, "size"),
                                     shrink=opts.get("shrink", False),
                                     filesystem=opts.get("filesystem", False), uuid=uuid,
                                     caller=caller, accept=accept))
        return job_path(job.id)

    async def Delete(self, caller: Caller, pool: str, volume: str, uuid: str,
                     options: dict[str, Any]) -> str:
        opts = options_in("Delete", options)
        job, _ = await self.pools.as_job("volume-delete", caller, lambda accept:
            self.pools.delete_volume(pool, volume, uuid=uuid, caller=caller, accept=accept,
                                     udev_sync=opts.get("udev-sync", True)))
        return job_path(job.id)

    async def Activate(self, caller: Caller, pool: str, volume: str, uuid: str,
                       options: dict[str, Any]) -> str:
        opts = options_in("Activate", options)
        job, _ = await self.pools.as_job("volume-activate", caller, lambda accept:
            self.pools.set_active(pool, volume, True, uuid=uuid, caller=caller, accept=accept,
                                  udev_sync=opts.get("udev-sync", True)))
        return job_path(job.id)

    async def Deactivate(self, caller: Caller, pool: str, volume: str, uuid: str,
                         options: dict[str, Any]) -> str:
        opts = options_in("Deactivate", options)
        job, _ = await self.pools.as_job("volume-deactivate", caller, lambda accept:
            self.pools.set_active(pool, volume, False, uuid=uuid, caller=caller, accept=accept,
                                  udev_sync=opts.get("udev-sync", True)))
        return job_path(job.id)

    async def OpenDevice(self, caller: Caller, pool: str, volume: str, uuid: str, mode: str,
                         options: dict[str, Any]) -> int:
        opts = options_in("OpenDevice", options)
        return await open_volume(self.pools, pool, volume, check_string(mode, "mode"),
                                 exclusive=opts.get("exclusive", False), uuid=uuid,
                                 caller=caller)



    async def Unlock(self, caller: Caller, pool: str, volume: str, uuid: str,
                     options: dict[str, Any]) -> None:
        opts = options_in("Unlock", options)
        await self.pools.check_volume_authorized(caller, pool, volume, uuid)
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
        await self.pools.check_volume_authorized(caller, pool, volume, uuid)
        kdf = kdf_in(opts)
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

    async def SetLabels(self, caller: Caller, pool: str, volume: str, uuid: str,
                        labels: dict[str, str], options: dict[str, Any]) -> None:
        options_in("SetLabels", options)
        await self.pools.set_labels(pool, volume, labels, uuid=uuid, caller=caller)

    async def Rename(self, caller: Caller, pool: str, volume: str, uuid: str, name: str,
                     options: dict[str, Any]) -> None:
        options_in("Rename", options)
        await self.pools.rename_volume(pool, volume, check_string(name, "name"), uuid=uuid,
                                       caller=caller)

    async def Revert(self, caller: Caller, pool: str, volume: str, uuid: str,
                     options: dict[str, Any]) -> str:
        options_in("Revert", options)
        job, _ = await self.pools.as_job("volume-revert", caller, lambda accept:
            self.pools.revert(pool, volume, uuid=uuid, caller=caller, accept=accept))
        return job_path(job.id)

    async def DetachCache(self, caller: Caller, pool: str, volume: str, uuid: str,
                          options: dict[str, Any]) -> str:
        options_in("DetachCache", options)
        job, _ = await self.pools.as_job("volume-cache-detach", caller, lambda accept:
            cache.detach(self.pools, pool, volume, uuid=uuid, caller=caller,
                         accept=accept))
        return job_path(job.id)
