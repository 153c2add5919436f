"""SQLAlchemy models: what dmd knows that the kernel does not."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Integer, String, Text
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
