"""Records of pools and their volumes, as the service layer sees them."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Row


@dataclass(frozen=True, slots=True)
class Segment:
    """*length* sectors of the pool's device number *device* from *start*."""

    device: int
    start: int
    length: int


@dataclass(frozen=True, slots=True)
class PoolLayout:
    """Where a pool lives: its devices (as the admin named them, with their
    size when taken) and the segments of them its metadata and data use."""

    devices: tuple[str, ...]
    sizes: tuple[int, ...]  # bytes
    metadata: tuple[Segment, ...]
    data: tuple[Segment, ...]
    # The UUID each device's label carries (how a device is known whatever
    # its name); empty for a pool recorded before labels were written.
    ids: tuple[str, ...] = ()
    # Room kept for a repair of the metadata (thin_repair writes the mended
    # copy there, and the two swap: dmd.service.pools.repair); empty for a
    # pool made without one.
    spare: tuple[Segment, ...] = ()

    def to_json(self) -> str:
        return json.dumps({
            "devices": list(self.devices), "sizes": list(self.sizes),
            "metadata": [[s.device, s.start, s.length] for s in self.metadata],
            "data": [[s.device, s.start, s.length] for s in self.data],
            "ids": list(self.ids),
            "spare": [[s.device, s.start, s.length] for s in self.spare]})

    @classmethod
    def from_json(cls, raw: str) -> PoolLayout:
        doc = json.loads(raw)
        return cls(tuple(doc["devices"]), tuple(doc["sizes"]),
                   tuple(Segment(*s) for s in doc["metadata"]),
                   tuple(Segment(*s) for s in doc["data"]), tuple(doc.get("ids", ())),
                   tuple(Segment(*s) for s in doc.get("spare", ())))

    @property
    def data_sectors(self) -> int:
        return sum(s.length for s in self.data)

    @property
    def metadata_sectors(self) -> int:
        return sum(s.length for s in self.metadata)

    @property
    def spare_sectors(self) -> int:
        return sum(s.length for s in self.spare)


@dataclass(frozen=True, slots=True)
class PoolRecord:
    name: str
    uuid: str
    owner_uid: int
    block_sectors: int
    on_full: str  # "queue" or "error"
    low_water_percent: int
    transaction_id: int
    next_thin_id: int
    layout: PoolLayout
    created_at: datetime | None = None
    generation: int = 0  # see the pools table's generation (dmd.state.models)
    # on_full "queue": seconds writes wait for space before dmd makes them
    # fail (0: as long as the kernel's module-wide no_space_timeout allows).
    no_space_timeout: int = 60
    # Pool.Stop: its devices removed, its records kept until Pool.Start.
    stopped: bool = False


@dataclass(frozen=True, slots=True)
class Encryption:
    """A volume's LUKS2 layer (the header on the volume says the rest)."""

    luks_uuid: str
    # The description of a "user" key in the keyring that opens it when dmd
    # starts; None: only a key passed to Unlock does.
    key_description: str | None = None
    # Open (unlocked) when dmd last changed it: after a reboot it is opened
    # again when a key is at hand. Lock clears it.
    unlocked: bool = True
    kind: str = "luks2"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "luks_uuid": self.luks_uuid,
                "key_description": self.key_description, "unlocked": self.unlocked}

    @classmethod
    def from_json(cls, doc: dict[str, Any] | None) -> Encryption | None:
        if doc is None:
            return None
        return cls(str(doc["luks_uuid"]), doc.get("key_description"), bool(doc["unlocked"]),
                   str(doc.get("kind", "luks2")))


@dataclass(frozen=True, slots=True)
class Thick:
    """Where a thick volume's data lives: segments of the pool's devices,
    in table order. With *stripes* > 1 they come in runs of *stripes*
    segments of one length on as many devices, each run one striped table
    line of *stripe_sectors* chunks."""

    segments: tuple[Segment, ...]
    stripes: int = 1
    stripe_sectors: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"segments": [[s.device, s.start, s.length] for s in self.segments],
                "stripes": self.stripes, "stripe_sectors": self.stripe_sectors}

    @classmethod
    def from_json(cls, doc: dict[str, Any] | None) -> Thick | None:
        if doc is None:
            return None
        return cls(tuple(Segment(*s) for s in doc["segments"]), int(doc["stripes"]),
                   int(doc["stripe_sectors"]))

    @property
    def sectors(self) -> int:
        return sum(s.length for s in self.segments)


@dataclass(frozen=True, slots=True)
class Cache:
    """A cache in front of a volume: dm-cache ("cache": a metadata and a data
    area, *mode* writeback or writethrough) or dm-writecache ("writecache":
    all data), on *device*, a block device taken whole or a volume's device
    (*volume_uuid* then names the volume)."""

    kind: str
    mode: str
    device: str
    block_sectors: int
    metadata_sectors: int = 0
    data_sectors: int = 0
    volume_uuid: str | None = None
    # A device taken whole keeps its first *header_sectors* for dmd's label,
    # which names it *label_uuid*: how dmd knows the disk whatever its name
    # (caches attached before labels have neither).
    header_sectors: int = 0
    label_uuid: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "mode": self.mode, "device": self.device,
                "block_sectors": self.block_sectors,
                "metadata_sectors": self.metadata_sectors, "data_sectors": self.data_sectors,
                "volume_uuid": self.volume_uuid, "header_sectors": self.header_sectors,
                "label_uuid": self.label_uuid}

    @classmethod
    def from_json(cls, doc: dict[str, Any] | None) -> Cache | None:
        if doc is None:
            return None
        return cls(str(doc["kind"]), str(doc["mode"]), str(doc["device"]),
                   int(doc["block_sectors"]), int(doc["metadata_sectors"]),
                   int(doc["data_sectors"]), doc.get("volume_uuid"),
                   int(doc.get("header_sectors", 0)), doc.get("label_uuid"))


@dataclass(frozen=True, slots=True)
class Revert:
    """A revert scheduled: thin id *thin_id*, a copy of snapshot
    *snapshot_uuid* made when Revert was called, becomes the volume's data
    (and *size_bytes* and *encryption*, the snapshot's then, its size and
    LUKS header) the next time the volume has no device."""

    thin_id: int
    snapshot_uuid: str
    size_bytes: int
    encryption: Encryption | None = None

    def to_json(self) -> dict[str, Any]:
        return {"thin_id": self.thin_id, "snapshot_uuid": self.snapshot_uuid,
                "size_bytes": self.size_bytes,
                "encryption": self.encryption.to_json() if self.encryption else None}

    @classmethod
    def from_json(cls, doc: dict[str, Any] | None) -> Revert | None:
        if doc is None:
            return None
        return cls(int(doc["thin_id"]), str(doc["snapshot_uuid"]), int(doc["size_bytes"]),
                   Encryption.from_json(doc.get("encryption")))


@dataclass(frozen=True, slots=True)
class VolumeRecord:
    uuid: str
    pool: str  # the pool's name
    name: str
    thin_id: int | None  # None for a thick volume
    size_bytes: int
    origin_uuid: str | None
    owner_uid: int
    labels: dict[str, str] = field(default_factory=dict)
    active: bool = True
    created_at: datetime | None = None
    encryption: Encryption | None = None
    thick: Thick | None = None
    cache: Cache | None = None
    revert: Revert | None = None

    def to_json(self) -> dict[str, Any]:
        """The record as the journal keeps it in an intent (and a pool's
        description names an operation under way): every field but when it
        was made."""
        raw = asdict(self)
        raw.pop("created_at", None)
        raw["encryption"] = self.encryption.to_json() if self.encryption else None
        raw["thick"] = self.thick.to_json() if self.thick else None
        raw["cache"] = self.cache.to_json() if self.cache else None
        raw["revert"] = self.revert.to_json() if self.revert else None
        return raw

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> VolumeRecord:
        fields = dict(raw)
        fields["encryption"] = Encryption.from_json(fields.get("encryption"))
        fields["thick"] = Thick.from_json(fields.get("thick"))
        fields["cache"] = Cache.from_json(fields.get("cache"))
        fields["revert"] = Revert.from_json(fields.get("revert"))
        return cls(**fields)


def pool_record(row: Row[Any]) -> PoolRecord:
    """*row*: a row of the pools table (a raw statement's has its time as
    SQLite's text)."""
    created = row.created_at
    return PoolRecord(row.name, row.uuid, row.owner_uid, row.block_sectors, row.on_full,
                      row.low_water_percent, row.transaction_id, row.next_thin_id,
                      PoolLayout.from_json(row.layout_json),
                      datetime.fromisoformat(created) if isinstance(created, str) else created,
                      row.generation, row.no_space_timeout, bool(row.stopped))


def volume_record(row: Row[Any], pool_name: str) -> VolumeRecord:
    return VolumeRecord(row.uuid, pool_name, row.name, row.thin_id, row.size_bytes,
                        row.origin_uuid, row.owner_uid, json.loads(row.labels_json),
                        row.active, row.created_at,
                        Encryption.from_json(json.loads(row.encryption_json or "null")),
                        Thick.from_json(json.loads(row.thick_json or "null")),
                        Cache.from_json(json.loads(row.cache_json or "null")),
                        Revert.from_json(json.loads(row.revert_json or "null")))


def volume_values(record: VolumeRecord) -> dict[str, Any]:
    """The columns of *record* that an update may change (its thin id: a
    revert applied)."""
    return {"name": record.name, "thin_id": record.thin_id, "size_bytes": record.size_bytes,
            "labels_json": json.dumps(record.labels), "active": record.active,
            "owner_uid": record.owner_uid,
            "encryption_json": (json.dumps(record.encryption.to_json())
                                if record.encryption is not None else None),
            "thick_json": (json.dumps(record.thick.to_json())
                           if record.thick is not None else None),
            "cache_json": (json.dumps(record.cache.to_json())
                           if record.cache is not None else None),
            "revert_json": (json.dumps(record.revert.to_json())
                            if record.revert is not None else None)}
