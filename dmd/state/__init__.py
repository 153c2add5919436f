"""dmd's own metadata: managed devices, labels, the intent journal (SQLite)."""

from dmd.state.errors import RecordExists, RecordNotFound, StateError
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
from dmd.state.redact import redact_table
from dmd.state.store import (
    AsyncStateStore,
    DeviceRecord,
    IntentRecord,
    StateStore,
)

__all__ = [
    "AsyncStateStore",
    "Cache",
    "DeviceRecord",
    "Encryption",
    "IntentRecord",
    "PoolLayout",
    "PoolRecord",
    "RecordExists",
    "RecordNotFound",
    "Revert",
    "Segment",
    "StateError",
    "StateStore",
    "Thick",
    "VolumeRecord",
    "redact_table",
]
