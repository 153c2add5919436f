"""The schema: what dmd knows that the kernel does not, as SQLAlchemy Core
tables. Core, not the ORM: the store turns rows into its own records
(dmd.state.store, dmd.state.pool_records) and never needed an identity map,
while importing and mapping the ORM was about a seventh of dmd's start."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

devices = Table(
    "devices", metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(127), nullable=False, unique=True),
    Column("uuid", String(128), unique=True),
    Column("table_json", Text, nullable=False),
    Column("read_only", Boolean, nullable=False),
    Column("owner_uid", Integer, nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("persistent", Boolean, nullable=False),
    Column("key_withheld", Boolean, nullable=False),
    Column("drifted", Text),  # revision 0002
)

# One row per label: labels are looked up and replaced one device at a time,
# and a table keeps them queryable (devices with label X) unlike JSON.
labels = Table(
    "labels", metadata,
    Column("device_id", Integer, ForeignKey("devices.id", ondelete="CASCADE"),
           primary_key=True),
    Column("key", String(255), primary_key=True),
    Column("value", Text, nullable=False),
)

intents = Table(
    "intents", metadata,
    Column("id", Integer, primary_key=True),
    Column("operation", String(32), nullable=False),
    Column("device", String(127), nullable=False),
    Column("args_json", Text, nullable=False),
    Column("state", String(16), nullable=False, index=True),
    Column("step", Integer, nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("finished_at", DateTime),
)

# A thin pool dmd laid out and owns (revision 0003). ``layout_json`` holds its
# devices (with the UUIDs their labels carry) and segments.
pools = Table(
    "pools", metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("uuid", String(36), nullable=False, unique=True),
    Column("owner_uid", Integer, nullable=False),
    Column("block_sectors", Integer, nullable=False),
    Column("on_full", String(16), nullable=False),
    Column("low_water_percent", Integer, nullable=False),
    Column("transaction_id", Integer, nullable=False),
    Column("next_thin_id", Integer, nullable=False),
    Column("layout_json", Text, nullable=False),
    Column("created_at", DateTime, nullable=False),
    # Revision 0004: moves by one with every change of the pool or its
    # volumes; the description on the pool's devices carries the generation
    # it was written from, so the two can be compared.
    Column("generation", Integer, nullable=False, default=1, server_default="0"),
    # Revision 0005: PoolRecord.no_space_timeout.
    Column("no_space_timeout", Integer, nullable=False, default=60, server_default="60"),
    # Revision 0010: PoolRecord.stopped (Pool.Stop).
    Column("stopped", Boolean, nullable=False, default=False, server_default="0"),
)

# A volume of a pool (revision 0003); a thin one's thin id is unique in the
# pool and never handed out twice (the pool's next_thin_id only grows).
volumes = Table(
    "volumes", metadata,
    Column("id", Integer, primary_key=True),
    Column("uuid", String(36), nullable=False, unique=True),
    Column("pool_id", Integer, ForeignKey("pools.id", ondelete="RESTRICT"), nullable=False),
    Column("name", String(64), nullable=False),
    Column("thin_id", Integer),  # revision 0007: NULL for a thick volume
    Column("size_bytes", BigInteger, nullable=False),
    Column("origin_uuid", String(36)),
    Column("owner_uid", Integer, nullable=False),
    Column("labels_json", Text, nullable=False),
    Column("active", Boolean, nullable=False),
    Column("created_at", DateTime, nullable=False),
    # Revision 0006: VolumeRecord.encryption as JSON; NULL for a plain volume.
    Column("encryption_json", Text),
    # Revision 0007: VolumeRecord.thick as JSON; NULL for a thin volume.
    Column("thick_json", Text),
    # Revision 0008: VolumeRecord.cache as JSON; NULL without a cache.
    Column("cache_json", Text),
    # Revision 0009: VolumeRecord.revert as JSON; NULL when none is scheduled.
    Column("revert_json", Text),
    UniqueConstraint("pool_id", "name"),
    UniqueConstraint("pool_id", "thin_id"),
)
