"""SQLAlchemy models: what dmd knows that the kernel does not."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


class DeviceRow(Base):
    __tablename__ = "devices"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(127), unique=True)
    uuid: Mapped[str | None] = mapped_column(String(128), unique=True)
    table_json: Mapped[str] = mapped_column(Text)
    read_only: Mapped[bool]
    owner_uid: Mapped[int]
    created_at: Mapped[datetime]
    persistent: Mapped[bool]
    key_withheld: Mapped[bool]
    drifted: Mapped[str | None] = mapped_column(Text)  # revision 0002
    labels: Mapped[list[LabelRow]] = relationship(
        back_populates="device", cascade="all, delete-orphan", lazy="selectin")


class LabelRow(Base):
    """One row per label: labels are looked up and replaced one device at a
    time, and a table keeps them queryable (devices with label X) unlike JSON."""

    __tablename__ = "labels"

    device_id: Mapped[int] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    device: Mapped[DeviceRow] = relationship(back_populates="labels")


class IntentRow(Base):
    __tablename__ = "intents"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    operation: Mapped[str] = mapped_column(String(32))
    device: Mapped[str] = mapped_column(String(127))
    args_json: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), index=True)
    step: Mapped[int]
    created_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]


class PoolRow(Base):
    """A thin pool dmd laid out and owns (revision 0003). ``layout_json``
    holds its devices (with the UUIDs their labels carry) and segments."""

    __tablename__ = "pools"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    uuid: Mapped[str] = mapped_column(String(36), unique=True)
    owner_uid: Mapped[int]
    block_sectors: Mapped[int]
    on_full: Mapped[str] = mapped_column(String(16))
    low_water_percent: Mapped[int]
    transaction_id: Mapped[int]
    next_thin_id: Mapped[int]
    layout_json: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime]
    # Revision 0004: moves by one with every change of the pool or its
    # volumes; the description on the pool's devices carries the generation
    # it was written from, so the two can be compared.
    generation: Mapped[int] = mapped_column(Integer, default=1, server_default="0")
    # Revision 0005: PoolRecord.no_space_timeout.
    no_space_timeout: Mapped[int] = mapped_column(Integer, default=60, server_default="60")


class VolumeRow(Base):
    """A thin volume of a pool (revision 0003); its thin id is unique in the
    pool and never handed out twice (the pool's next_thin_id only grows)."""

    __tablename__ = "volumes"
    __table_args__ = (UniqueConstraint("pool_id", "name"), UniqueConstraint("pool_id", "thin_id"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    uuid: Mapped[str] = mapped_column(String(36), unique=True)
    pool_id: Mapped[int] = mapped_column(ForeignKey("pools.id", ondelete="RESTRICT"))
    name: Mapped[str] = mapped_column(String(64))
    thin_id: Mapped[int | None]  # revision 0007: NULL for a thick volume
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    origin_uuid: Mapped[str | None] = mapped_column(String(36))
    owner_uid: Mapped[int]
    labels_json: Mapped[str] = mapped_column(Text)
    active: Mapped[bool]
    created_at: Mapped[datetime]
    # Revision 0006: VolumeRecord.encryption as JSON; NULL for a plain volume.
    encryption_json: Mapped[str | None] = mapped_column(Text)
    # Revision 0007: VolumeRecord.thick as JSON; NULL for a thin volume.
    thick_json: Mapped[str | None] = mapped_column(Text)
    # Revision 0008: VolumeRecord.cache as JSON; NULL without a cache.
    cache_json: Mapped[str | None] = mapped_column(Text)
