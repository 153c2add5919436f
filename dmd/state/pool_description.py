"""The pool's description of itself, kept on its own devices.

SQLite is dmd's index and journal; a pool must outlive it (a lost state
directory, the disks moved to another machine). So the first 4 MiB of every
pool device (reserved by the layout) hold:

- at 0, a **label** (one 4 KiB block): magic, format version, the pool's
  UUID, this device's UUID and its index in the pool. It is what a probe
  sees (``dmd_pool``) and how ImportPool knows a device whatever its name;
- at 64 KiB and at 64 KiB + 2016 KiB, two **copies** of the description:
  a header (magic, generation, payload length, SHA-256 of generation, length
  and payload) and the payload, the pool record and every volume record as
  JSON. No key material is ever part of it.

An update writes copy A on every device, then copy B: a crash leaves at
least one whole copy of the newest or the previous generation on every
device; a reader takes the newest whole copy it finds and knows from the
other whether to repair. This module encodes and decodes; the bytes travel
through the engine (``read_block``/``write_block``).
"""

from __future__ import annotations

import hashlib
import json
import struct
import uuid as uuidlib
from dataclasses import dataclass
from typing import Any

from dmd.state.pool_records import (
    Cache,
    Encryption,
    PoolLayout,
    PoolRecord,
    Revert,
    Segment,
    Thick,
    VolumeRecord,
)

LABEL_MAGIC = b"DMDPOOL\x01"  # what dmd.engine.blockdev probes as "dmd_pool"
COPY_MAGIC = b"DMDDESC\x01"
FORMAT_VERSION = 1
BLOCK = 4096
LABEL_OFFSET = 0
COPY_OFFSETS = (64 << 10, (64 << 10) + (2016 << 10))
COPY_SIZE = 2016 << 10  # each copy's room: header and payload
HEADER_BYTES = 4 << 20  # the layout's reserved header (HEADER_SECTORS * 512)

_LABEL = struct.Struct("<8sII16s16sI")  # magic, version, index, pool, device, count
_COPY = struct.Struct("<8sQI32s")  # magic, generation, length, sha256
PAYLOAD_ROOM = COPY_SIZE - _COPY.size  # the most a description's JSON may take


def _volume_order(volume: VolumeRecord) -> tuple[bool, int, str]:
    """Thin volumes by thin id, then thick ones (no thin id) by name."""
    return (volume.thin_id is None, volume.thin_id or 0, volume.name)


class DescriptionError(ValueError):
    """What is on the device is not a description dmd can use."""


@dataclass(frozen=True, slots=True)
class Label:
    pool_uuid: str
    device_uuid: str
    index: int  # the device's place in the pool's layout
    count: int  # how many devices the pool had when this label was written

    def encode(self) -> bytes:
        raw = _LABEL.pack(LABEL_MAGIC, FORMAT_VERSION, self.index,
                          uuidlib.UUID(self.pool_uuid).bytes,
                          uuidlib.UUID(self.device_uuid).bytes, self.count)
        return (raw + hashlib.sha256(raw).digest()).ljust(BLOCK, b"\0")

    @classmethod
    def decode(cls, block: bytes) -> Label | None:
        """The label in *block*, or None when it holds none (any other bytes)."""
        raw = block[:_LABEL.size]
        if len(block) < _LABEL.size + 32 or not raw.startswith(LABEL_MAGIC):
            return None
        if hashlib.sha256(raw).digest() != block[_LABEL.size:_LABEL.size + 32]:
            raise DescriptionError("the pool label fails its checksum")
        _, version, index, pool, device, count = _LABEL.unpack(raw)
        if version != FORMAT_VERSION:
            raise DescriptionError(f"pool label version {version}; this dmd reads "
                                   f"{FORMAT_VERSION}")
        return cls(str(uuidlib.UUID(bytes=pool)), str(uuidlib.UUID(bytes=device)), index, count)


@dataclass(frozen=True, slots=True)
class Description:
    """One generation of what a pool is: its record (its layout names each
    device by the UUID of its label) and its volumes."""

    generation: int
    pool: PoolRecord
    volumes: tuple[VolumeRecord, ...]
    # An operation that may be moving the pool's transaction id past the
    # records above: {"operation", "transaction_from", "volume"} (the volume's
    # record as the journal carries it). Written before its first kernel
    # message, so that a pool imported after a crash there can be settled.
    pending: dict[str, Any] | None = None

    def payload(self) -> bytes:
        p = self.pool
        doc: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "pool": {
                "name": p.name, "uuid": p.uuid, "owner_uid": p.owner_uid,
                "block_sectors": p.block_sectors, "on_full": p.on_full,
                "low_water_percent": p.low_water_percent,
                "no_space_timeout": p.no_space_timeout,
                "transaction_id": p.transaction_id, "next_thin_id": p.next_thin_id,
                "devices": [{"uuid": u, "path": path, "size": size} for u, path, size in
                            zip(p.layout.ids, p.layout.devices, p.layout.sizes, strict=True)],
                "metadata": [[s.device, s.start, s.length] for s in p.layout.metadata],
                "data": [[s.device, s.start, s.length] for s in p.layout.data],
                "spare": [[s.device, s.start, s.length] for s in p.layout.spare],
            },
            "volumes": [{
                "uuid": v.uuid, "name": v.name, "thin_id": v.thin_id,
                "size_bytes": v.size_bytes, "origin_uuid": v.origin_uuid,
                "owner_uid": v.owner_uid, "labels": v.labels, "active": v.active,
                **({"encryption": v.encryption.to_json()} if v.encryption else {}),
                **({"thick": v.thick.to_json()} if v.thick else {}),
                **({"cache": v.cache.to_json()} if v.cache else {}),
                **({"revert": v.revert.to_json()} if v.revert else {}),
            } for v in sorted(self.volumes, key=_volume_order)],
            **({"pending": self.pending} if self.pending is not None else {}),
        }
        # UTF-8 as it is (no \uXXXX): a label's bytes cost what they are.
        return json.dumps(doc, sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False).encode()

    def encode(self) -> bytes:
        """The copy as written: header then payload, padded to whole blocks."""
        payload = self.payload()
        room = PAYLOAD_ROOM
        if len(payload) > room:
            raise DescriptionError(f"the description takes {len(payload)} bytes; a copy "
                                   f"holds {room}")
        head = _COPY.pack(COPY_MAGIC, self.generation, len(payload),
                          _digest(self.generation, payload))
        raw = head + payload
        return raw.ljust(-(-len(raw) // BLOCK) * BLOCK, b"\0")

    @classmethod
    def decode(cls, raw: bytes) -> Description | None:
        """The copy at the start of *raw*; None where no copy was ever written
        (zeros); DescriptionError where one is torn or corrupt."""
        if raw[:len(COPY_MAGIC)] != COPY_MAGIC:
            if not raw[:_COPY.size].strip(b"\0"):
                return None
            raise DescriptionError("no description header where one belongs")
        _, generation, length, digest = _COPY.unpack(raw[:_COPY.size])
        payload = raw[_COPY.size:_COPY.size + length]
        if length > COPY_SIZE - _COPY.size or len(payload) != length or \
                _digest(generation, payload) != digest:
            raise DescriptionError(f"description generation {generation} fails its checksum")
        return cls.from_payload(generation, payload)

    @classmethod
    def from_payload(cls, generation: int, payload: bytes) -> Description:
        try:
            doc = json.loads(payload)
            if doc["format"] != FORMAT_VERSION:
                raise DescriptionError(f"description format {doc['format']}; this dmd reads "
                                       f"{FORMAT_VERSION}")
            p = doc["pool"]
            devices = p["devices"]
            layout = PoolLayout(tuple(d["path"] for d in devices),
                                tuple(d["size"] for d in devices),
                                tuple(Segment(*s) for s in p["metadata"]),
                                tuple(Segment(*s) for s in p["data"]),
                                tuple(d["uuid"] for d in devices),
                                tuple(Segment(*s) for s in p.get("spare", [])))
            pool = PoolRecord(p["name"], p["uuid"], p["owner_uid"], p["block_sectors"],
                              p["on_full"], p["low_water_percent"], p["transaction_id"],
                              p["next_thin_id"], layout,
                              no_space_timeout=p.get("no_space_timeout", 60))
            volumes = tuple(VolumeRecord(v["uuid"], pool.name, v["name"], v["thin_id"],
                                         v["size_bytes"], v["origin_uuid"], v["owner_uid"],
                                         dict(v["labels"]), v["active"],
                                         encryption=Encryption.from_json(v.get("encryption")),
                                         thick=Thick.from_json(v.get("thick")),
                                         cache=Cache.from_json(v.get("cache")),
                                         revert=Revert.from_json(v.get("revert")))
                            for v in doc["volumes"])
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, DescriptionError):
                raise
            raise DescriptionError(f"description generation {generation} is not "
                                   f"readable: {exc!r}") from None
        pending = doc.get("pending")
        if pending is not None and not isinstance(pending, dict):
            raise DescriptionError(f"description generation {generation}: its pending "
                                   "operation is not readable")
        return cls(generation, pool, volumes, pending)


def _digest(generation: int, payload: bytes) -> bytes:
    return hashlib.sha256(struct.pack("<QI", generation, len(payload)) + payload).digest()


@dataclass(frozen=True, slots=True)
class DeviceReading:
    """What one device holds: its label and each copy (a Description, None
    for never written, or the DescriptionError met reading it)."""

    path: str
    label: Label | None
    copies: tuple[Description | DescriptionError | None, ...]

    @property
    def newest(self) -> Description | None:
        whole = [c for c in self.copies if isinstance(c, Description)]
        return max(whole, key=lambda d: d.generation, default=None)

    def stale(self, generation: int) -> tuple[int, ...]:
        """The copies (by number) that do not hold *generation* whole."""
        return tuple(i for i, c in enumerate(self.copies)
                     if not (isinstance(c, Description) and c.generation == generation))


def read_device(path: str, head: bytes) -> DeviceReading:
    """Parse a device's first HEADER_BYTES (*head*)."""
    label = Label.decode(head[LABEL_OFFSET:LABEL_OFFSET + BLOCK])
    copies: list[Description | DescriptionError | None] = []
    for offset in COPY_OFFSETS:
        try:
            copies.append(Description.decode(head[offset:offset + COPY_SIZE]))
        except DescriptionError as exc:
            copies.append(exc)
    return DeviceReading(path, label, tuple(copies))
