"""The properties of Pool, Volume and Job objects: one list each (name ->
signature), and how each is made from the service's records. The interface
declarations, the introspection XML and the variants sent in signals and
GetManagedObjects all come from these lists."""

from __future__ import annotations

from typing import Any

from dmd.dbus.names import NO_OBJECT, device_path, pool_path, volume_path
from dmd.service.jobs import Job
from dmd.service.pools.names import cleartext_device, volume_device
from dmd.service.pools.service import PoolState
from dmd.service.pools.space import what_to_do
from dmd.state import PoolRecord, VolumeRecord

POOL_PROPERTIES: dict[str, str] = {
    "Name": "s", "UUID": "s", "Devices": "as", "BlockSize": "t",
    "DataUsed": "t", "DataTotal": "t", "MetadataUsed": "t", "MetadataTotal": "t",
    "Mode": "s", "State": "s", "TransactionId": "t", "OnFull": "s",
    "LowWaterPercent": "u", "Owner": "u", "ChangesRefused": "s",
    "NoSpaceTimeout": "u", "ModeHelp": "s",
}

VOLUME_PROPERTIES: dict[str, str] = {
    "Name": "s", "UUID": "s", "Pool": "o", "PoolName": "s", "Size": "t", "Origin": "o",
    "UsedBytes": "t", "State": "s", "Owner": "u", "Labels": "a{ss}", "Device": "o",
    "DevicePath": "s", "Encryption": "s", "Locked": "b", "LockedReason": "s",
    "KeyDescription": "s", "CleartextDevice": "o", "CleartextPath": "s",
    "Thin": "b", "Stripes": "u", "Cache": "s", "CacheDevice": "s",
}

JOB_PROPERTIES: dict[str, str] = {
    "Operation": "s", "Objects": "ao", "StartedBy": "u", "StartTime": "t", "Progress": "d",
    "State": "s", "ErrorName": "s", "ErrorMessage": "s", "Result": "o", "Cancellable": "b",
}


def pool_properties(record: PoolRecord, state: PoolState, lifecycle: str,
                    refused: str = "") -> dict[str, Any]:
    """*lifecycle*: "creating", "importing", "active" or "destroying";
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
        "DevicePath": f"/dev/mapper/{volume_device(volume.pool, volume.name)}"
        if device_minor is not None else "",
        "Encryption": encryption.kind if encryption is not None else "",
        "Locked": locked, "LockedReason": reason,
        "KeyDescription": (encryption.key_description or "") if encryption is not None else "",
        "CleartextDevice": device_path(cleartext_minor) if cleartext_minor is not None
        else NO_OBJECT,
        "CleartextPath": f"/dev/mapper/{cleartext_device(volume.pool, volume.name)}"
        if cleartext_minor is not None else "",
        "Thin": volume.thick is None,
        "Stripes": volume.thick.stripes if volume.thick is not None else 1,
        "Cache": (volume.cache.mode or volume.cache.kind) if volume.cache is not None else "",
        "CacheDevice": volume.cache.device if volume.cache is not None else "",
    }


def job_properties(job: Job, objects: list[str], result: str) -> dict[str, Any]:
    return {
        "Operation": job.operation, "Objects": objects, "StartedBy": job.started_by,
        "StartTime": int(job.started_at * 1_000_000), "Progress": float(job.progress),
        "State": job.state.value, "ErrorName": job.error_name,
        "ErrorMessage": job.error_message, "Result": result,
        "Cancellable": job.cancellable and job.state.value == "running",
    }

