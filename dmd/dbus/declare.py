"""What every object kind's declaration shares: the D-Bus types of its
arguments, the body of a routed method, and the base of an object whose
properties are served from values an exporter keeps current.

Declarations are the single source of the API's shape: introspection, the
shipped XML in data/dbus-interfaces/ and the router's signature checks all
come from them. Method calls never reach their bodies: the router
(dmd.dbus.router) takes every call first, because it needs what dbus-fast
does not give a method: the caller's identity, and control over which error
a wrongly typed call gets. Properties are served by dbus-fast from the cached
values, so reads never touch the kernel and never wait behind a change.
"""

# No "from __future__ import annotations" in a module that declares an
# interface: dbus-fast reads the annotations.
from typing import Annotated, Any, NoReturn

from dbus_fast import Variant
from dbus_fast.annotations import DBusSignature
from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_property

from dmd.dbus.convert import as_variants

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
# Manager.ListDisks: (path, size in bytes, signature or "", why busy or "")
Disks = Annotated[list[list[Any]], DBusSignature("a(stss)")]
EventBody = Annotated[list[Any], DBusSignature("ua(ttss)")]
TypedStatus = Annotated[list[dict[str, Variant]], DBusSignature("aa{sv}")]
StrList = Annotated[list[str], DBusSignature("as")]
ObjectAndJob = Annotated[list[str], DBusSignature("oo")]
Timeout = Annotated[float, DBusSignature("d")]
Fd = Annotated[int, DBusSignature("h")]




def routed() -> NoReturn:
    raise NotImplementedError("dispatched by dmd.dbus.router")


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


def cached_properties(kind: type[CachedObject]) -> type[CachedObject]:
    """Declare *kind*'s read-only properties from its PROPERTIES (the one list
    of them), each served from ``values``."""
    for name, signature in kind.PROPERTIES.items():
        setattr(kind, name, _cached_property(name, signature))
    return kind


def _cached_property(name: str, signature: str) -> Any:
    """A read-only property served from ``values`` (declared from the
    class's PROPERTIES, the one list of them)."""
    def getter(self: CachedObject) -> Any:
        return self.values[name]

    getter.__name__ = getter.__qualname__ = name
    getter.__annotations__ = {"return": signature}
    return dbus_property(access=PropertyAccess.READ)(getter)
