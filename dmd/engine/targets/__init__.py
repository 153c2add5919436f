"""Typed builders and parsers for device-mapper target params and status lines.

Each target has a frozen dataclass for its table params (``to_params()``
gives the kernel's text, ``from_params()`` reads what ``dmsetup table``
shows) and, where the kernel reports something, one for its status line
(``from_status()``). Targets not known here pass through as plain strings::

    from dmd.engine.targets import LinearParams, line, parse_status
    table = [line(0, 2048, LinearParams("/dev/loop0", 0))]
    parse_status("thin-pool", status_text)  # -> ThinPoolStatus

Devices are kept as given ("/dev/loop0" or "7:0"); the kernel prints them
as "major:minor", so compare with ``same_device`` or ``with_device_numbers``.
"""

from __future__ import annotations

from dataclasses import dataclass

from dmd.engine.targets.base import (
    TargetFailed,
    TargetFailedError,
    TargetFormatError,
    TargetParams,
    TargetStatus,
    device_number,
    device_text,
    same_device,
    with_device_numbers,
)
from dmd.engine.targets.basic import (
    ErrorParams,
    LinearParams,
    Stripe,
    StripedParams,
    StripedStatus,
    ZeroParams,
)
from dmd.engine.targets.cache import CacheParams, CacheStatus
from dmd.engine.targets.crypt import CryptParams
from dmd.engine.targets.delay import DelayClass, DelayParams, DelayStatus
from dmd.engine.targets.dust import DustParams, DustStatus
from dmd.engine.targets.era import EraParams, EraStatus
from dmd.engine.targets.flakey import CorruptBioByte, FlakeyParams
from dmd.engine.targets.integrity import IntegrityAlg, IntegrityParams, IntegrityStatus
from dmd.engine.targets.logwrites import LogWritesParams, LogWritesStatus
from dmd.engine.targets.mirror import MirrorLeg, MirrorLog, MirrorParams, MirrorStatus
from dmd.engine.targets.multipath import (
    MultipathParams,
    MultipathPath,
    MultipathStatus,
    PathGroup,
    PathGroupStatus,
    PathStatus,
)
from dmd.engine.targets.raid import RaidDevice, RaidParams, RaidStatus
from dmd.engine.targets.snapshot import (
    SnapshotMergeParams,
    SnapshotMergeStatus,
    SnapshotOriginParams,
    SnapshotParams,
    SnapshotStatus,
)
from dmd.engine.targets.thin import ThinParams, ThinPoolParams, ThinPoolStatus, ThinStatus
from dmd.engine.targets.verity import VerityFec, VerityParams, VerityStatus
from dmd.engine.targets.writecache import WritecacheParams, WritecacheStatus
from dmd.engine.types import TargetLine

__all__ = [
    "PARAMS",
    "STATUS",
    "CacheParams",
    "CacheStatus",
    "CorruptBioByte",
    "CryptParams",
    "DelayClass",
    "DelayParams",
    "DelayStatus",
    "DustParams",
    "DustStatus",
    "EraParams",
    "EraStatus",
    "ErrorParams",
    "FlakeyParams",
    "IntegrityAlg",
    "IntegrityParams",
    "IntegrityStatus",
    "LinearParams",
    "LogWritesParams",
    "LogWritesStatus",
    "MirrorLeg",
    "MirrorLog",
    "MirrorParams",
    "MirrorStatus",
    "MultipathParams",
    "MultipathPath",
    "MultipathStatus",
    "PathGroup",
    "PathGroupStatus",
    "PathStatus",
    "RaidDevice",
    "RaidParams",
    "RaidStatus",
    "RawParams",
    "SnapshotMergeParams",
    "SnapshotMergeStatus",
    "SnapshotOriginParams",
    "SnapshotParams",
    "SnapshotStatus",
    "Stripe",
    "StripedParams",
    "StripedStatus",
    "TargetFailed",
    "TargetFailedError",
    "TargetFormatError",
    "TargetParams",
    "TargetStatus",
    "ThinParams",
    "ThinPoolParams",
    "ThinPoolStatus",
    "ThinStatus",
    "VerityFec",
    "VerityParams",
    "VerityStatus",
    "WritecacheParams",
    "WritecacheStatus",
    "ZeroParams",
    "device_number",
    "device_text",
    "line",
    "parse_params",
    "parse_status",
    "same_device",
    "with_device_numbers",
]


@dataclass(frozen=True)
class RawParams:
    """Params of a target this module does not model, passed through verbatim."""

    target_type: str
    params: str

    def to_params(self) -> str:
        return self.params


PARAMS: dict[str, type[TargetParams]] = {
    cls.target_type: cls
    for cls in (
        LinearParams, StripedParams, ZeroParams, ErrorParams, CryptParams, DelayParams,
        FlakeyParams, SnapshotParams, SnapshotOriginParams, SnapshotMergeParams,
        ThinPoolParams, ThinParams, CacheParams, EraParams, MirrorParams, RaidParams,
        MultipathParams, VerityParams, IntegrityParams, LogWritesParams, WritecacheParams,
        DustParams,
    )
}

# Targets whose status is empty (linear, zero, error, crypt, flakey,
# snapshot-origin) have no entry: their status passes through as a string.
STATUS: dict[str, type[TargetStatus]] = {
    cls.target_type: cls
    for cls in (
        StripedStatus, DelayStatus, SnapshotStatus, SnapshotMergeStatus, ThinPoolStatus,
        ThinStatus, CacheStatus, EraStatus, MirrorStatus, RaidStatus, MultipathStatus,
        VerityStatus, IntegrityStatus, LogWritesStatus, WritecacheStatus, DustStatus,
    )
}


def parse_params(target_type: str, params: str) -> TargetParams | str:
    """The typed params of a table line, or *params* itself for unknown targets."""
    cls = PARAMS.get(target_type)
    return cls.from_params(params) if cls is not None else params


def parse_status(target_type: str, status: str) -> TargetStatus | TargetFailed | str:
    """The typed status of a status line, ``TargetFailed`` for a bare "Fail" or
    "Error", or *status* itself for targets without a modelled status."""
    cls = STATUS.get(target_type)
    if cls is None:
        return status
    try:
        return cls.from_status(status)
    except TargetFailedError as exc:
        return TargetFailed(exc.target_type, exc.state)


def line(start: int, length: int, params: TargetParams | RawParams) -> TargetLine:
    """A table line (sectors) for a typed params object."""
    return TargetLine(start, length, params.target_type, params.to_params())
