"""A pure-Python device-mapper library: the kernel's DM ioctl protocol.

Standard library only, usable without the rest of dmd::

    from dmd.engine import DM, DevId, DmFlags, TargetLine
    with DM() as dm:
        dm.device_create("demo")
        dm.table_load(DevId.name("demo"), [TargetLine(0, 2048, "zero", "")])
        dm.device_suspend(DevId.name("demo"), DmFlags(0))   # resume

``dmd.engine.sim.SimDM`` offers the same interface without a kernel.
"""

from dmd.engine.blockdev import BlockDevice, NotABlockDevice
from dmd.engine.dm import CONTROL_PATH, DM, dev_majors, mapper_path
from dmd.engine.keys import carries_key, redact_table
from dmd.engine.thintools import NOT_INSTALLED, MetadataCheck, ThinToolError
from dmd.engine.types import (
    MAX_DEVICE_SECTORS,
    Device,
    DeviceInfo,
    DevId,
    DmError,
    DmFlags,
    InvalidArgument,
    Table,
    TargetLine,
    TargetVersion,
    UdevFlags,
    UnsafeOperation,
    validate_name,
    validate_table,
    validate_uuid,
)
from dmd.engine.udevsync import UdevSync, UdevTimeout, UdevWait

__all__ = [
    "CONTROL_PATH",
    "DM",
    "MAX_DEVICE_SECTORS",
    "NOT_INSTALLED",
    "BlockDevice",
    "DevId",
    "Device",
    "DeviceInfo",
    "DmError",
    "DmFlags",
    "InvalidArgument",
    "MetadataCheck",
    "NotABlockDevice",
    "Table",
    "TargetLine",
    "TargetVersion",
    "ThinToolError",
    "UdevFlags",
    "UdevSync",
    "UdevTimeout",
    "UdevWait",
    "UnsafeOperation",
    "carries_key",
    "dev_majors",
    "mapper_path",
    "redact_table",
    "validate_name",
    "validate_table",
    "validate_uuid",
]
