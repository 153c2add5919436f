"""The Pool object (org.example.DeviceMapper.Pool): a thin pool dmd laid out.
Its declaration, its properties (the one list of them, made from the pool's
record and state) and its methods' handlers. Changes run as Jobs: the reply
(the subject's object and the job's) comes once the request is accepted, and
the objects are on the bus by then."""

# No "from __future__ import annotations": dbus-fast reads the annotations.
from typing import Annotated, Any

from dbus_fast.annotations import DBusSignature
from dbus_fast.service import dbus_method, dbus_signal

from dmd.dbus.convert import check_string, encryption_in, options_in, size_in
from dmd.dbus.declare import (
    U64,
    CachedObject,
    ObjectAndJob,
    Options,
    Path,
    Str,
    cached_properties,
    routed,
)
from dmd.dbus.names import POOL_INTERFACE, job_path, volume_path
from dmd.service.auth import Action, Caller
from dmd.service.pools.core import PoolState
from dmd.service.pools.service import PoolService
from dmd.service.pools.space import what_to_do
from dmd.state import PoolRecord

POOL_PROPERTIES: dict[str, str] = {
    "Name": "s", "UUID": "s", "Devices": "as", "BlockSize": "t",
    "DataUsed": "t", "DataTotal": "t", "MetadataUsed": "t", "MetadataTotal": "t",
    "Mode": "s", "State": "s", "TransactionId": "t", "OnFull": "s",
    "LowWaterPercent": "u", "Owner": "u", "ChangesRefused": "s",
    "NoSpaceTimeout": "u", "ModeHelp": "s",
}


def pool_properties(record: PoolRecord, state: PoolState, lifecycle: str,
                    refused: str = "") -> dict[str, Any]:
    """*lifecycle*: "creating", "importing", "active", "stopping", "stopped",
    "starting" or "destroying";
    *refused*: why dmd refuses to change the pool ("" when it does not)."""
    return {
        "Name": record.name, "UUID": record.uuid, "Devices": list(record.layout.devices),
        "BlockSize": record.block_sectors * 512,
        "DataUsed": state.data_used_bytes, "DataTotal": state.data_total_bytes,
        "MetadataUsed": state.metadata_used_bytes,
        "MetadataTotal": state.metadata_total_bytes,
        "Mode": state.mode, "State": lifecycle,
        "TransactionId": state.transaction_id if state.transaction_id is not None
        else record.transaction_id,
        "OnFull": record.on_full, "LowWaterPercent": record.low_water_percent,
        "Owner": record.owner_uid, "ChangesRefused": refused,
        "NoSpaceTimeout": record.no_space_timeout, "ModeHelp": what_to_do(record, state.mode),
    }


@cached_properties
class PoolInterface(CachedObject):
    """A thin pool dmd laid out; its volumes are objects of their own."""

    INTERFACE = POOL_INTERFACE
    PROPERTIES = POOL_PROPERTIES

    @dbus_method()
    def CreateVolume(self, name: Str, size: U64, options: Options) -> ObjectAndJob:
        routed()

    @dbus_method()
    def AddDevice(self, device: Str, options: Options) -> Path:
        routed()

    @dbus_method()
    def Destroy(self, options: Options) -> Path:
        routed()

    @dbus_method()
    def Stop(self, options: Options) -> Path:
        routed()

    @dbus_method()
    def Rename(self, name: Str, options: Options) -> None:
        routed()

    @dbus_method()
    def Start(self, options: Options) -> Path:
        routed()

    @dbus_method()
    def Repair(self, options: Options) -> Path:
        routed()

    @dbus_signal()
    def LowSpace(self, data_used: U64, data_total: U64, metadata_used: U64,
                 metadata_total: U64) -> Annotated[list[Any], DBusSignature("tttt")]:
        """The pool is past its low-water mark with no room left to grow into."""
        return [data_used, data_total, metadata_used, metadata_total]

    @dbus_signal()
    def Full(self, data_used: U64, data_total: U64, metadata_used: U64,
             metadata_total: U64) -> Annotated[list[Any], DBusSignature("tttt")]:
        """The kernel says the pool is out of data space (writes queue or fail)."""
        return [data_used, data_total, metadata_used, metadata_total]


class PoolHandlers:
    """The Pool interface; *pool* is the pool's name, from its object."""

    def __init__(self, pools: PoolService) -> None:
        self.pools = pools


    async def CreateVolume(self, caller: Caller, pool: str, name: str, size: int,
                           options: dict[str, Any]) -> list[str]:
        opts = options_in("CreateVolume", options)
        # Read now: the caller's descriptor is closed once the call is answered.
        # create_volume wipes the key when its job ends. Authorized first: a
        # caller who may not would otherwise hold a reader for seconds.
        if "encryption" in opts:
            await self.pools.check_authorized(caller, Action.VOLUME, f"{pool}/{name}")
        encryption = await encryption_in(opts, caller)
        job, volume = await self.pools.as_job("volume-create", caller, lambda accept:
            self.pools.create_volume(pool, check_string(name, "name"), size_in(size, "size"),
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

    async def Stop(self, caller: Caller, pool: str, options: dict[str, Any]) -> str:
        options_in("Stop", options)
        job, _ = await self.pools.as_job("pool-stop", caller, lambda accept:
            self.pools.stop_pool(pool, caller=caller, accept=accept))
        return job_path(job.id)

    async def Rename(self, caller: Caller, pool: str, name: str,
                     options: dict[str, Any]) -> None:
        options_in("Rename", options)
        await self.pools.rename_pool(pool, check_string(name, "name"), caller=caller)

    async def Start(self, caller: Caller, pool: str, options: dict[str, Any]) -> str:
        opts = options_in("Start", options)
        devices = opts.get("devices")
        paths = None if devices is None else [check_string(d, "a device") for d in devices]
        job, _ = await self.pools.as_job("pool-start", caller, lambda accept:
            self.pools.start_pool(pool, devices=paths, caller=caller, accept=accept))
        return job_path(job.id)

    async def Repair(self, caller: Caller, pool: str, options: dict[str, Any]) -> str:
        opts = options_in("Repair", options)
        devices = opts.get("devices")
        paths = None if devices is None else [check_string(d, "a device") for d in devices]
        job, _ = await self.pools.as_job("pool-repair", caller, lambda accept:
            self.pools.repair_pool(pool, devices=paths,
                                   accept_loss=opts.get("accept-loss", False),
                                   caller=caller, accept=accept))
        return job_path(job.id)

    async def Destroy(self, caller: Caller, pool: str, options: dict[str, Any]) -> str:
        opts = options_in("Destroy", options)
        job, _ = await self.pools.as_job("pool-destroy", caller, lambda accept:
            self.pools.destroy_pool(pool, force=opts.get("force", False), caller=caller,
                                    accept=accept))
        return job_path(job.id)
