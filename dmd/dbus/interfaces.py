"""The interfaces dmd exports, as dbus-fast declarations.

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
from dmd.dbus.names import (
    DEVICE_INTERFACE,
    JOB_INTERFACE,
    MANAGER_INTERFACE,
    POOL_INTERFACE,
    VOLUME_INTERFACE,
)
from dmd.dbus.pool_convert import JOB_PROPERTIES, POOL_PROPERTIES, VOLUME_PROPERTIES

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
ObjectAndJob = Annotated[list[str], DBusSignature("oo")]
Timeout = Annotated[float, DBusSignature("d")]
Fd = Annotated[int, DBusSignature("h")]


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

    @dbus_method()
    def CreatePool(self, name: Str, devices: StrList, options: Options) -> ObjectAndJob:
        _routed()

    @dbus_method()
    def GetPool(self, name: Str) -> Path:
        _routed()

    @dbus_method()
    def ImportPool(self, devices: StrList, options: Options) -> ObjectAndJob:
        _routed()

    @dbus_property(access=PropertyAccess.READ)
    def KernelVersion(self) -> Str:
        return self._kernel_version

    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> Str:
        return self._version


class CachedObject(ServiceInterface):
    """An object whose properties are served from ``values`` (kept current
    by an exporter); PROPERTIES maps each name to its signature."""

    INTERFACE = ""
    PROPERTIES: dict[str, str] = {}

    def __init__(self, values: dict[str, Any]) -> None:
        super().__init__(self.INTERFACE)
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
            self._variants = as_variants(self.values, self.PROPERTIES)
        return self._variants


class DeviceInterface(CachedObject):
    """One mapped device."""

    INTERFACE = DEVICE_INTERFACE
    PROPERTIES = DEVICE_PROPERTIES

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


class PoolInterface(CachedObject):
    """A thin pool dmd laid out; its volumes are objects of their own."""

    INTERFACE = POOL_INTERFACE
    PROPERTIES = POOL_PROPERTIES

    @dbus_method()
    def CreateVolume(self, name: Str, size: U64, options: Options) -> ObjectAndJob:
        _routed()

    @dbus_method()
    def AddDevice(self, device: Str, options: Options) -> Path:
        _routed()

    @dbus_method()
    def Destroy(self, options: Options) -> Path:
        _routed()

    @dbus_signal()
    def LowSpace(self, data_used: U64, data_total: U64, metadata_used: U64,
                 metadata_total: U64) -> Annotated[list[Any], DBusSignature("tttt")]:
        """The pool is past its low-water mark with no room left to grow into."""
        return [data_used, data_total, metadata_used, metadata_total]

    @dbus_signal()
    def Full(self, data_used: U64, data_total: U64, metadata_used: U64,
             metadata_total: U64) -> Annotated[list[Any], DBusSignature("tttt")]:
        """The kernel says the pool is out of data space (writes queue or fail)."""
        return [data_used, data_total, metadata_used, metadata_total]


class VolumeInterface(CachedObject):
    """A volume of a pool: what a service asked for, without thin ids."""

    INTERFACE = VOLUME_INTERFACE
    PROPERTIES = VOLUME_PROPERTIES

    @dbus_method()
    def Snapshot(self, name: Str, options: Options) -> ObjectAndJob:
        _routed()

    @dbus_method()
    def Resize(self, size: U64, options: Options) -> Path:
        _routed()

    @dbus_method()
    def Delete(self, options: Options) -> Path:
        _routed()

    @dbus_method()
    def Activate(self, options: Options) -> Path:
        _routed()

    @dbus_method()
    def Deactivate(self, options: Options) -> Path:
        _routed()

    @dbus_method()
    def OpenDevice(self, mode: Str, options: Options) -> Fd:
        _routed()

    @dbus_method()
    def Unlock(self, options: Options) -> None:
        _routed()

    @dbus_method()
    def Lock(self, options: Options) -> None:
        _routed()

    @dbus_method()
    def ChangeKey(self, options: Options) -> None:
        _routed()

    @dbus_method()
    def AttachCache(self, device: Str, options: Options) -> Path:
        _routed()

    @dbus_method()
    def DetachCache(self, options: Options) -> Path:
        _routed()


class JobInterface(CachedObject):
    """Work that outlives its call: its end is the Completed signal and the
    State property (a finished job stays readable for a while)."""

    INTERFACE = JOB_INTERFACE
    PROPERTIES = JOB_PROPERTIES

    @dbus_method()
    def Cancel(self, options: Options) -> None:
        _routed()

    @dbus_method()
    def Wait(self, timeout: Timeout) -> Bool:
        _routed()

    @dbus_signal()
    def Completed(self, success: Bool, error_name: Str, error_message: Str
                  ) -> Annotated[list[Any], DBusSignature("bss")]:
        return [success, error_name, error_message]


def _cached_property(name: str, signature: str) -> Any:
    """A read-only property served from ``values`` (declared from the
    class's PROPERTIES, the one list of them)."""
    def getter(self: CachedObject) -> Any:
        return self.values[name]

    getter.__name__ = getter.__qualname__ = name
    getter.__annotations__ = {"return": signature}
    return dbus_property(access=PropertyAccess.READ)(getter)


for _cls in (DeviceInterface, PoolInterface, VolumeInterface, JobInterface):
    for _name, _signature in _cls.PROPERTIES.items():
        setattr(_cls, _name, _cached_property(_name, _signature))
