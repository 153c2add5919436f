"""What a snapshot is, read from and written to its volume's labels.

The snapshotter keeps nothing of its own: every fact containerd asks about a
snapshot (its namespace, name, kind, parent, times and labels) is a label on
the dmd volume that holds its data, so it lives in dmd's records and in the
pool's description on its disks, and a volume and its snapshot are made,
changed and removed in one journaled dmd call each.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

PREFIX = "containerd/"
NAMESPACE = PREFIX + "namespace"
NAME = PREFIX + "name"  # the key of an active or view snapshot, a committed one's name
KIND = PREFIX + "kind"
PARENT = PREFIX + "parent"
CREATED = PREFIX + "created"  # nanoseconds since the epoch
UPDATED = PREFIX + "updated"
USAGE = PREFIX + "usage"  # a committed layer's bytes when committed (its device goes)
LABEL = PREFIX + "label/"  # + one of containerd's own labels

# The volume every parentless snapshot starts from: formatted once.
BASE_KIND = "base"
BASE_UNREADY = "base-unready"  # made, lost+found not yet removed


class Kind(enum.Enum):
    VIEW = "view"
    ACTIVE = "active"
    COMMITTED = "committed"


@dataclass(frozen=True)
class Snapshot:
    namespace: str
    name: str
    kind: Kind
    parent: str
    created_ns: int
    updated_ns: int
    labels: Mapping[str, str] = field(default_factory=dict)
    usage_bytes: int | None = None  # committed: what its volume held then

    def volume_labels(self) -> dict[str, str]:
        labels = {NAMESPACE: self.namespace, NAME: self.name, KIND: self.kind.value,
                  PARENT: self.parent, CREATED: str(self.created_ns),
                  UPDATED: str(self.updated_ns)}
        if self.usage_bytes is not None:
            labels[USAGE] = str(self.usage_bytes)
        labels.update({LABEL + key: value for key, value in self.labels.items()})
        return labels


@dataclass(frozen=True)
class Volume:
    """One of dmd's volumes as the bus shows it (the properties used here)."""

    path: str
    name: str
    pool: str
    owner: int
    state: str
    device_path: str
    device: str  # its Device object ("/" when inactive)
    used_bytes: int
    labels: Mapping[str, str]

    @classmethod
    def from_properties(cls, path: str, props: Mapping[str, Any]) -> Volume:
        return cls(path=path, name=str(props.get("Name", "")),
                   pool=str(props.get("PoolName", "")), owner=int(props.get("Owner", -1)),
                   state=str(props.get("State", "")),
                   device_path=str(props.get("DevicePath", "")),
                   device=str(props.get("Device", "/")),
                   used_bytes=int(props.get("UsedBytes", 0)),
                   labels=dict(props.get("Labels", {})))

    def snapshot(self) -> Snapshot | None:
        """The snapshot this volume holds; None for any other volume (the
        base, or one whose labels are not a whole snapshot's)."""
        labels = self.labels
        try:
            kind = Kind(labels.get(KIND, ""))
            created, updated = int(labels[CREATED]), int(labels[UPDATED])
            namespace, name, parent = labels[NAMESPACE], labels[NAME], labels[PARENT]
            usage = int(labels[USAGE]) if USAGE in labels else None
        except (KeyError, ValueError):
            return None
        own = {key[len(LABEL):]: value for key, value in labels.items()
               if key.startswith(LABEL)}
        return Snapshot(namespace, name, kind, parent, created, updated, own, usage)
