"""snapshot, snapshot-origin, snapshot-merge (drivers/md/dm-snap.c,
dm-snap-persistent.c, dm-snap-transient.c; Documentation/admin-guide/device-mapper/snapshot.rst).

``snapshot <origin> <COW device> <P|PO|N> <chunk size>
[<#features> discard_zeroes_cow [discard_passdown_origin]]``;
``snapshot-origin <origin>``; snapshot-merge takes snapshot's arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Self

from dmd.engine.targets.base import (
    DEV,
    Options,
    TargetFormatError,
    TargetParams,
    TargetStatus,
    Words,
    join,
    optional_counted,
)

_STORE_TYPES = {"P": (True, False), "PO": (True, True), "N": (False, False)}


@dataclass(frozen=True)
class SnapshotParams(TargetParams):
    target_type: ClassVar[str] = "snapshot"
    origin: str = field(metadata=DEV)
    cow_device: str = field(metadata=DEV)
    persistent: bool = True
    overflow: bool = False  # "PO": report Overflow instead of invalidating when full
    chunk_size_sectors: int = 16
    discard_zeroes_cow: bool = False
    discard_passdown_origin: bool = False
    extra_features: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.overflow and not self.persistent:
            raise TargetFormatError(f"{self.target_type}: overflow needs a persistent store")
        if self.discard_passdown_origin and not self.discard_zeroes_cow:
            raise TargetFormatError(
                f"{self.target_type}: discard_passdown_origin needs discard_zeroes_cow")

    @property
    def store_type(self) -> str:
        return ("PO" if self.overflow else "P") if self.persistent else "N"

    def to_params(self) -> str:
        feats = [name for name, on in (("discard_zeroes_cow", self.discard_zeroes_cow),
                                       ("discard_passdown_origin",
                                        self.discard_passdown_origin)) if on]
        return join(self.origin, self.cow_device, self.store_type, self.chunk_size_sectors,
                    *optional_counted(feats + list(self.extra_features)))

    @classmethod
    def _parse(cls, words: Words) -> Self:
        origin = words.word("origin")
        cow = words.word("COW device")
        store = words.word("store type")
        if store.upper() not in _STORE_TYPES:
            raise words.error("store type must be P, PO or N")
        persistent, overflow = _STORE_TYPES[store.upper()]
        chunk = words.uint("chunk size")
        flags: dict[str, bool] = {}
        extra: list[str] = []
        for opt in Options(words.counted("features") if words.more() else (), "snapshot"):
            if opt in ("discard_zeroes_cow", "discard_passdown_origin"):
                flags[opt] = True
            else:
                extra.append(opt)
        return cls(origin, cow, persistent, overflow, chunk, extra_features=tuple(extra),
                   **flags)


@dataclass(frozen=True)
class SnapshotMergeParams(SnapshotParams):
    """snapshot-merge: a snapshot being merged back into its origin."""

    target_type: ClassVar[str] = "snapshot-merge"


@dataclass(frozen=True)
class SnapshotOriginParams(TargetParams):
    target_type: ClassVar[str] = "snapshot-origin"
    origin: str = field(metadata=DEV)

    def to_params(self) -> str:
        return self.origin

    @classmethod
    def _parse(cls, words: Words) -> Self:
        return cls(words.word("origin"))


_STATES = ("Invalid", "Merge failed", "Overflow", "Unknown")


@dataclass(frozen=True)
class SnapshotStatus(TargetStatus):
    """``<allocated>/<total> <metadata>`` sectors, or a state word.

    ``state`` is "valid" with the numbers set, or one of "Invalid" (the COW
    device filled up or failed), "Merge failed", "Overflow", "Unknown"
    with the numbers ``None``.
    """

    target_type: ClassVar[str] = "snapshot"
    state: str = "valid"
    allocated_sectors: int | None = None
    total_sectors: int | None = None
    metadata_sectors: int | None = None
    extra: tuple[str, ...] = ()

    @property
    def valid(self) -> bool:
        return self.state == "valid"

    @classmethod
    def _parse(cls, words: Words) -> Self:
        first = words.peek()
        if first is not None and "/" not in first:
            text = " ".join(words.rest())
            for state in _STATES:
                if text == state or text.startswith(state + " "):
                    return cls(state, extra=tuple(text[len(state):].split()))
            raise TargetFormatError("snapshot status: unknown state")
        allocated, total = words.ratio("allocated/total sectors")
        metadata = words.uint("metadata sectors")
        return cls("valid", allocated, total, metadata, words.rest())

    def __post_init__(self) -> None:
        # "Merge failed" has a blank; it is a kernel word pair, not an argument.
        if self.state not in ("valid", *_STATES):
            raise TargetFormatError("snapshot status: unknown state")
        for name in ("allocated_sectors", "total_sectors", "metadata_sectors"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise TargetFormatError(f"snapshot status: {name} must not be negative")


@dataclass(frozen=True)
class SnapshotMergeStatus(SnapshotStatus):
    target_type: ClassVar[str] = "snapshot-merge"
