"""dmd's own metadata: managed devices, labels, the intent journal (SQLite)."""

from dmd.state.errors import RecordExists, RecordNotFound, StateError
from dmd.state.redact import redact_table
from dmd.state.store import (
    AsyncStateStore,
    DeviceRecord,
    IntentRecord,
    StateStore,
)

__all__ = [
    "AsyncStateStore",
    "DeviceRecord",
    "IntentRecord",
    "RecordExists",
    "RecordNotFound",
    "StateError",
    "StateStore",
    "redact_table",
]
