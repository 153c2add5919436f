"""Write the introspection XML of dmd's interfaces (shipped in data/, as udisks
ships its own, so clients can generate bindings without a running dmd).

    python -m dmd.dbus.xml data/dbus-interfaces
"""

from __future__ import annotations

import sys
from pathlib import Path
from xml.etree import ElementTree

from dbus_fast import introspection as intr
from dbus_fast.service import ServiceInterface

from dmd.dbus.device import DeviceInterface
from dmd.dbus.job import JobInterface
from dmd.dbus.manager import ManagerInterface
from dmd.dbus.pool import PoolInterface
from dmd.dbus.volume import VolumeInterface


def interfaces() -> list[ServiceInterface]:
    return [ManagerInterface("", ""), DeviceInterface({}), PoolInterface({}),
            VolumeInterface({}), JobInterface({})]


DOCTYPE = ('<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"\n'
           '"http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">\n')


def interface_xml(interface: ServiceInterface) -> str:
    node = intr.Node(None, interfaces=[interface.introspect()]).to_xml()
    ElementTree.indent(node, space="  ")
    return DOCTYPE + ElementTree.tostring(node, encoding="unicode") + "\n"


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for interface in interfaces():
        path = directory / f"{interface.name}.xml"
        path.write_text(interface_xml(interface))
        written.append(path)
    return written


if __name__ == "__main__":
    for written in write(Path(sys.argv[1] if len(sys.argv) > 1 else "data/dbus-interfaces")):
        print(written)
