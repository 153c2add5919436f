"""The API as declared, as shipped (data/dbus-interfaces) and as seen live
agree; every signal dmd sends matches the introspected interface."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dbus_fast import introspection as intr

from dmd.dbus.names import (
    DEVICE_INTERFACE,
    MANAGER_INTERFACE,
    OBJECT_MANAGER_INTERFACE,
    PROPERTIES_INTERFACE,
    ROOT_PATH,
)
from dmd.dbus.xml import interface_xml, interfaces
from tests.dbus.bus_client import Client

SHIPPED = Path(__file__).resolve().parents[2] / "data" / "dbus-interfaces"
ZERO = [(0, 2048, "zero", "")]


def shipped(name: str) -> intr.Interface:
    node = intr.Node.parse((SHIPPED / f"{name}.xml").read_text())
    (interface,) = node.interfaces
    return interface


def same(a: intr.Interface, b: intr.Interface) -> bool:
    return bool(intr.Node(None, interfaces=[a]).tostring()
                == intr.Node(None, interfaces=[b]).tostring())


def test_shipped_xml_is_what_the_declarations_say() -> None:
    for interface in interfaces():
        path = SHIPPED / f"{interface.name}.xml"
        assert path.read_text() == interface_xml(interface), (
            f"{path} is stale: run python -m dmd.dbus.xml data/dbus-interfaces")


async def live(client: Client, path: str) -> dict[str, intr.Interface]:
    (xml,) = await client.call(path, "org.freedesktop.DBus.Introspectable", "Introspect")
    return {i.name: i for i in intr.Node.parse(xml).interfaces}


async def test_live_introspection_matches_the_shipped_xml(client: Client) -> None:
    path = await client.create("one", ZERO)
    root = await live(client, ROOT_PATH)
    device = await live(client, path)
    assert same(root[MANAGER_INTERFACE], shipped(MANAGER_INTERFACE))
    assert same(device[DEVICE_INTERFACE], shipped(DEVICE_INTERFACE))
    assert OBJECT_MANAGER_INTERFACE in root


def check_properties(values: dict[str, Any], declared: dict[str, str], where: str) -> None:
    for name, variant in values.items():
        assert name in declared, f"{where}: undeclared property {name}"
        assert variant.signature == declared[name], (
            f"{where}: {name} sent as {variant.signature}, declared {declared[name]}")


async def test_every_signal_matches_the_interface(client: Client) -> None:
    device = shipped(DEVICE_INTERFACE)
    declared = {p.name: p.signature for p in device.properties}
    signatures = {s.name: "".join(a.signature for a in s.args) for s in device.signals}
    path = await client.create("one", ZERO, labels={"a": "b"})
    await client.device(path, "Suspend", "a{sv}", {})
    await client.device(path, "Resume", "a{sv}", {})
    await client.device(path, "Reload", "a(ttss)a{sv}", [[0, 8, "error", ""]], {})
    await client.device(path, "LoadTable", "a(ttss)a{sv}", [[0, 8, "zero", ""]], {})
    await client.device(path, "Rename", "sa{sv}", "two", {})
    await client.device(path, "SetUUID", "sa{sv}", "u-1", {})
    await client.device(path, "SetLabels", "a{ss}a{sv}", {"c": "d"}, {})
    await client.device(path, "Remove", "a{sv}", {})
    await client.call("/", "org.freedesktop.DBus.Peer", "Ping")
    seen: dict[str, int] = {}
    for signal in client.signals:
        if signal.sender == "org.freedesktop.DBus":
            continue
        seen[signal.member] = seen.get(signal.member, 0) + 1
        where = f"{signal.member} from {signal.path}"
        if signal.member == "PropertiesChanged":
            assert (signal.interface, signal.signature) == (PROPERTIES_INTERFACE, "sa{sv}as")
            assert signal.body[0] == DEVICE_INTERFACE and signal.path == path
            check_properties(signal.body[1], declared, where)
            assert signal.body[2] == []
        elif signal.member == "InterfacesAdded":
            assert (signal.path, signal.signature) == (ROOT_PATH, "oa{sa{sv}}")
            values = signal.body[1][DEVICE_INTERFACE]
            assert set(values) == set(declared), where
            check_properties(values, declared, where)
        elif signal.member == "InterfacesRemoved":
            assert (signal.path, signal.signature) == (ROOT_PATH, "oas")
        elif signal.member in signatures:
            assert signal.signature == signatures[signal.member], where
        else:
            raise AssertionError(f"undeclared signal {where}")
    assert seen["InterfacesAdded"] == 1 and seen["InterfacesRemoved"] == 1
    assert seen["PropertiesChanged"] >= 7
