"""Keep one exported object per device in step with the inventory."""

from __future__ import annotations

import logging

from dmd.dbus.bus import DmdBus
from dmd.dbus.convert import table_out
from dmd.dbus.device import DeviceInterface, device_properties
from dmd.dbus.names import device_path
from dmd.engine import TargetLine
from dmd.service.devices.inventory import DeviceView, Inventory
from dmd.service.events import ChangeKind

log = logging.getLogger(__name__)


class Exporter:
    def __init__(self, bus: DmdBus, inventory: Inventory) -> None:
        self.bus = bus
        self.objects: dict[str, DeviceInterface] = {}
        for view in inventory:
            self._add(view)
        inventory.subscribe(self._on_change)

    def name_at(self, path: str) -> str | None:
        obj = self.objects.get(path)
        return None if obj is None else str(obj.values["Name"])

    def _add(self, view: DeviceView) -> None:
        path = device_path(view.device[1])
        stale = self.objects.pop(path, None)
        if stale is not None:
            self.bus.unexport(path, stale)
        interface = DeviceInterface(device_properties(view))
        self.objects[path] = interface
        self.bus.export(path, interface)
        log.debug("export %s at %s", view.name, path)

    def _on_change(self, kind: ChangeKind, before: DeviceView | None,
                   after: DeviceView | None) -> None:
        if kind is ChangeKind.ADDED and after is not None:
            self._add(after)
        elif kind is ChangeKind.CHANGED and after is not None:
            interface = self.objects.get(device_path(after.device[1]))
            if interface is None:
                self._add(after)
                return
            changed = interface.update(device_properties(after))
            if changed:
                interface.emit_properties_changed(changed)
        elif kind is ChangeKind.REMOVED and before is not None:
            path = device_path(before.device[1])
            interface = self.objects.pop(path, None)
            if interface is not None:
                self.bus.unexport(path, interface)
                log.debug("unexport %s at %s", before.name, path)

    def dm_event(self, view: DeviceView, status: list[TargetLine]) -> None:
        """The kernel raised an event on *view*'s device: Event(event_nr, status)."""
        interface = self.objects.get(device_path(view.device[1]))
        if interface is not None:
            interface.Event(view.event_nr & 0xFFFFFFFF, table_out(status))
