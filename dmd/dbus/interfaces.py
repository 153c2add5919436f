"""The two interfaces dmd exports, as dbus-fast declarations.

These classes are the single source of the API's shape: introspection, the
shipped XML in data/dbus-interfaces/ and the router's signature checks all
come from them. Method calls never reach the method bodies below: the router
(dmd.dbus.router) takes every call first, because it needs what dbus-fast
does not give a method: the caller's identity, and control over which error
a wrongly typed call gets. Properties are served by dbus-fast from the cached
view, so reads never touch the kernel and never wait behind a change.
"""

# No "from __future__ import annotations": dbus-fast reads the annotations.
from typing import Annotated, Any, NoReturn

from dbus_fast import Variant
from dbus_fast.annotations import DBusSignature
from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property, dbus_signal

from dmd.dbus.convert import DEVICE_PROPERTIES, as_variants
from dmd.dbus.names import DEVICE_INTERFACE, MANAGER_INTERFACE

Str = Annotated[str, DBusSignature("s")]
Bool = Annotated[bool, DBusSignature("b")]
U32 = Annotated[int, DBusSignature("u")]
I32 = Annotated[int, DBusSignature("i")]
U64 = Annotated[int, DBusSignature("t")]
Path = Annotated[str, DBusSignature("o")]
Table = Annotated[list[list[Any]], DBusSignature("a(ttss)")]
Options = Annotated[dict[str, Any], DBusSignature("a{sv}")]
Labels = Annotated[dict[str, str], DBusSignature("a{ss}")]
Deps = Annotated[list[list[int]], DBusSignature("a(uu)")]
Targets = Annotated[list[list[Any]], DBusSignature("a(s(uuu))")]
Names = Annotated[list[str], DBusSignature("as")]
EventBody = Annotated[list[Any], DBusSignature("ua(ttss)")]
TypedStatus = Annotated[list[dict[str, Variant]], DBusSignature("aa{sv}")]
StrList = Annotated[list[str], DBusSignature("as")]


def _routed() -> NoReturn:
    raise NotImplementedError("dispatched by dmd.dbus.router")


class ManagerInterface(ServiceInterface):
    def __init__(self, kernel_version: str, version: str) -> None:
        super().__init__(MANAGER_INTERFACE)
        self._kernel_version = kernel_version
        self._version = version

    @dbus_method()
    def CreateDevice(self, name: Str, table: Table, options: Options) -> Path:
        _routed()

    @dbus_method()
    def GetDevice(self, name: Str) -> Path:
        _routed()

    @dbus_method()
    def ListTargets(self) -> Targets:
        _routed()

    @dbus_method()
    def RemoveAllManaged(self, options: Options) -> Names:
        _routed()

    @dbus_property(access=PropertyAccess.READ)
    def KernelVersion(self) -> Str:
        return self._kernel_version

    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> Str:
        return self._version


class DeviceInterface(ServiceInterface):
    """One mapped device; ``values`` holds the current property values."""

    def __init__(self, values: dict[str, Any]) -> None:
        super().__init__(DEVICE_INTERFACE)
        self.values = values
        self._variants: dict[str, Variant] | None = None

    def update(self, values: dict[str, Any]) -> dict[str, Any]:
        """Take new values; return those that changed (for PropertiesChanged)."""
        changed = {k: v for k, v in values.items() if self.values.get(k) != v}
        if changed:
            self.values = values
            self._variants = None
        return changed

    def variants(self) -> dict[str, Variant]:
        """Every property as a Variant, built once per change: GetManagedObjects
        with thousands of devices costs a dictionary lookup per device."""
        if self._variants is None:
            self._variants = as_variants(self.values)
        return self._variants

    @dbus_method()
    def LoadTable(self, table: Table, options: Options) -> None:
        _routed()

    @dbus_method()
    def ClearTable(self, options: Options) -> None:
        _routed()

    @dbus_method()
    def Reload(self, table: Table, options: Options) -> None:
        _routed()

    @dbus_method()
    def Suspend(self, options: Options) -> None:
        _routed()

    @dbus_method()
    def Resume(self, options: Options) -> None:
        _routed()

    @dbus_method()
    def Rename(self, new_name: Str, options: Options) -> None:
        _routed()

    @dbus_method()
    def SetUUID(self, uuid: Str, options: Options) -> None:
        _routed()

    @dbus_method()
    def Message(self, sector: U64, message: Str, options: Options) -> Str:
        _routed()

    @dbus_method()
    def GetStatus(self, options: Options) -> Table:
        _routed()

    @dbus_method()
    def GetTypedStatus(self, options: Options) -> TypedStatus:
        _routed()

    @dbus_method()
    def Remove(self, options: Options) -> None:
        _routed()

    @dbus_method()
    def Adopt(self, options: Options) -> None:
        _routed()

    @dbus_method()
    def SetLabels(self, labels: Labels, options: Options) -> None:
        _routed()

    @dbus_signal()
    def Event(self, event_nr: U32, status: Table) -> EventBody:
        return [event_nr, status]


def _device_property(name: str, signature: str) -> Any:
    """A read-only property served from ``values`` (declared from
    DEVICE_PROPERTIES, the one list of them)."""
    def getter(self: DeviceInterface) -> Any:
        return self.values[name]

    getter.__name__ = getter.__qualname__ = name
    getter.__annotations__ = {"return": signature}
    return dbus_property(access=PropertyAccess.READ)(getter)


for _name, _signature in DEVICE_PROPERTIES.items():
    setattr(DeviceInterface, _name, _device_property(_name, _signature))
