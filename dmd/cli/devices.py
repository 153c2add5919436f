"""dmctl's device verbs: dmsetup's, spoken to dmd's Manager and Device
objects."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any

from dbus_fast import Message, MessageType, Variant

from dmd.cli.client import Client, Failure, Verb, plain
from dmd.cli.output import emit, labels_of
from dmd.cli.tables import TableSyntaxError, format_table, parse_table
from dmd.dbus.names import (
    BUS_NAME,
    DEVICE_INTERFACE,
    MANAGER_INTERFACE,
    PROPERTIES_INTERFACE,
    ROOT_PATH,
)


def info_text(p: dict[str, Any]) -> str:
    tables = " & ".join(t for t, present in (("LIVE", p["LiveTable"]),
                                              ("INACTIVE", p["InactiveTable"])) if present)
    labels = ", ".join(f"{k}={v}" for k, v in sorted(p["Labels"].items()))
    rows = [
        ("Name", p["Name"]),
        ("State", "SUSPENDED" if p["Suspended"] else "ACTIVE"),
        ("Read Ahead", "skip"),
        ("Tables present", tables or "None"),
        ("Open count", p["OpenCount"]),
        ("Event number", p["EventNumber"]),
        ("Major, minor", f"{p['Major']}, {p['Minor']}"),
        ("Number of targets", len(p["LiveTable"])),
        ("UUID", p["UUID"]),
        ("Access", "READ-ONLY" if p["ReadOnly"] else "READ-WRITE"),
        ("Managed by dmd", "yes" + (", persistent" if p["Persistent"] else "")
         + (", DRIFTED" if p["Drifted"] else "") if p["Managed"] else "no"),
        ("Labels", labels),
    ]
    return "\n".join(f"{k + ':':<19}{v}" for k, v in rows if v != "")


def read_table(args: argparse.Namespace) -> list[list[Any]]:
    if args.table is not None:
        text = args.table.replace("\\n", "\n")
    elif getattr(args, "table_file", None):
        try:
            with open(args.table_file) as f:
                text = f.read()
        except OSError as exc:
            raise Failure(f"cannot read {args.table_file}: {exc.strerror}") from None
    else:
        text = sys.stdin.read()
    try:
        return [list(line) for line in parse_table(text)]
    except TableSyntaxError as exc:
        raise Failure(str(exc)) from None


async def cmd_ls(c: Client, a: argparse.Namespace) -> None:
    devs = await c.devices(None)
    emit(a, [{"name": d["Name"], "major": d["Major"], "minor": d["Minor"], "uuid": d["UUID"],
              "managed": d["Managed"]} for d in devs],
         "\n".join(f"{d['Name']}\t({d['Major']}:{d['Minor']})" for d in devs)
         or "No devices found")


async def cmd_info(c: Client, a: argparse.Namespace) -> None:
    devs = await c.devices(a.name)
    emit(a, devs if a.name is None else devs[0], "\n\n".join(info_text(d) for d in devs))


async def cmd_table(c: Client, a: argparse.Namespace) -> None:
    devs = await c.devices(a.name)
    if a.name is not None:
        emit(a, devs[0]["LiveTable"], format_table(devs[0]["LiveTable"]))
        return
    emit(a, {d["Name"]: d["LiveTable"] for d in devs},
         "\n".join(f"{d['Name']}: {format_table([line])}" for d in devs for line in d["LiveTable"]))


async def cmd_status(c: Client, a: argparse.Namespace) -> None:
    names = [a.name] if a.name else [d["Name"] for d in await c.devices(None)]
    result = {}
    for name in names:
        (lines,) = await c.on_device(name, "GetStatus", "a{sv}", {})
        result[name] = lines
    if a.name:
        emit(a, result[a.name], format_table(result[a.name]))
    else:
        emit(a, result, "\n".join(f"{n}: {format_table([line])}" for n, lines in result.items()
                                  for line in lines))


async def cmd_deps(c: Client, a: argparse.Namespace) -> None:
    devs = await c.devices(a.name)
    data = {d["Name"]: [list(dep) for dep in d["Dependencies"]] for d in devs}

    def line(deps: list[list[int]]) -> str:
        return f"{len(deps)} dependencies\t: " + " ".join(f"({x}, {y})" for x, y in deps)

    if a.name:
        emit(a, data[a.name], line(data[a.name]))
    else:
        emit(a, data, "\n".join(f"{n}: {line(d)}" for n, d in data.items()))


async def cmd_create(c: Client, a: argparse.Namespace) -> None:
    table = read_table(a)
    options: dict[str, Variant] = {}
    if a.uuid:
        options["uuid"] = Variant("s", a.uuid)
    if a.readonly:
        options["read-only"] = Variant("b", True)
    if a.persistent:
        options["persistent"] = Variant("b", True)
    if a.label:
        options["labels"] = Variant("a{ss}", labels_of(a.label))
    (path,) = await c.call(ROOT_PATH, MANAGER_INTERFACE, "CreateDevice", "sa(ttss)a{sv}",
                           [a.name, table, options], mutating=True)
    emit(a, {"object": path}, "")


async def cmd_load(c: Client, a: argparse.Namespace) -> None:
    table = read_table(a)
    options = {"read-only": Variant("b", True)} if a.readonly else {}
    member = "Reload" if a.command == "reload" else "LoadTable"
    await c.on_device(a.name, member, "a(ttss)a{sv}", table, options)


async def cmd_suspend(c: Client, a: argparse.Namespace) -> None:
    options = {}
    if a.noflush:
        options["noflush"] = Variant("b", True)
    if a.nolockfs:
        options["skip-lockfs"] = Variant("b", True)
    await c.on_device(a.name, "Suspend", "a{sv}", options)


async def cmd_resume(c: Client, a: argparse.Namespace) -> None:
    await c.on_device(a.name, "Resume", "a{sv}", {})


async def cmd_clear(c: Client, a: argparse.Namespace) -> None:
    await c.on_device(a.name, "ClearTable", "a{sv}", {})


async def cmd_rename(c: Client, a: argparse.Namespace) -> None:
    if a.setuuid is not None:
        if a.new_name is not None:
            raise Failure("give a new name or --setuuid, not both")
        await c.on_device(a.name, "SetUUID", "sa{sv}", a.setuuid, {})
    elif a.new_name is None:
        raise Failure("give a new name or --setuuid UUID")
    else:
        await c.on_device(a.name, "Rename", "sa{sv}", a.new_name, {})


async def cmd_message(c: Client, a: argparse.Namespace) -> None:
    (reply,) = await c.on_device(a.name, "Message", "tsa{sv}", a.sector, " ".join(a.message),
                                 {})
    emit(a, {"reply": reply}, reply)


async def cmd_remove(c: Client, a: argparse.Namespace) -> None:
    options = {}
    if a.force:
        options["force"] = Variant("b", True)
    if a.deferred:
        options["deferred"] = Variant("b", True)
    await c.on_device(a.name, "Remove", "a{sv}", options)


async def cmd_remove_all_managed(c: Client, a: argparse.Namespace) -> None:
    (names,) = await c.call(ROOT_PATH, MANAGER_INTERFACE, "RemoveAllManaged", "a{sv}", [{}],
                            mutating=True)
    emit(a, names, "\n".join(names))


async def cmd_adopt(c: Client, a: argparse.Namespace) -> None:
    options = {"persistent": Variant("b", True)} if a.persistent else {}
    await c.on_device(a.name, "Adopt", "a{sv}", options)


async def cmd_label(c: Client, a: argparse.Namespace) -> None:
    await c.on_device(a.name, "SetLabels", "a{ss}a{sv}", labels_of(a.labels), {})


async def cmd_targets(c: Client, a: argparse.Namespace) -> None:
    (targets,) = await c.call(ROOT_PATH, MANAGER_INTERFACE, "ListTargets")
    emit(a, {name: ".".join(map(str, v)) for name, v in targets},
         "\n".join(f"{name:<16} v{'.'.join(map(str, v))}" for name, v in sorted(targets)))


async def cmd_version(c: Client, a: argparse.Namespace) -> None:
    (values,) = await c.call(ROOT_PATH, PROPERTIES_INTERFACE, "GetAll", "s",
                             [MANAGER_INTERFACE])
    emit(a, {"dmd": values["Version"], "driver": values["KernelVersion"]},
         f"dmd version:       {values['Version']}\n"
         f"Driver version:    {values['KernelVersion']}")


async def cmd_monitor(c: Client, a: argparse.Namespace) -> None:
    """One line per signal from dmd until interrupted."""
    done = asyncio.Event()

    def on_message(msg: Message) -> None:
        if msg.message_type is not MessageType.SIGNAL or msg.sender == "org.freedesktop.DBus":
            return
        body = plain(msg.body)
        if a.json:
            print(json.dumps({"signal": msg.member, "path": msg.path, "body": body}),
                  flush=True)
        elif msg.member == "PropertiesChanged":
            changes = " ".join(f"{k}={json.dumps(v)}" for k, v in body[1].items())
            print(f"changed {msg.path} {changes}", flush=True)
        elif msg.member == "InterfacesAdded":
            props = body[1].get(DEVICE_INTERFACE, {})
            print(f"added {body[0]} {props.get('Name', '')}", flush=True)
        elif msg.member == "InterfacesRemoved":
            print(f"removed {body[0]}", flush=True)
        else:
            print(f"{msg.member} {msg.path} {json.dumps(body)}", flush=True)

    c.bus.add_message_handler(on_message)
    await c.bus.call(Message(
        destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus", member="AddMatch", signature="s",
        body=[f"type='signal',sender='{BUS_NAME}'"]))
    await done.wait()


def register(verb: Callable[[str, Verb, str], argparse.ArgumentParser]) -> None:
    """Add the device verbs to dmctl's parser (*verb* makes one)."""
    def table_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("table_file", nargs="?", metavar="TABLE_FILE",
                        help="read the table from this file (default: --table, else stdin)")
        sp.add_argument("--table", metavar="TEXT",
                        help="the table as text, dmsetup's syntax (START LENGTH TARGET "
                             "PARAMS); lines separated by newlines or \\n")
        sp.add_argument("-r", "--readonly", action="store_true",
                        help="load the table read-only")

    def name_arg(sp: argparse.ArgumentParser, optional: bool = False) -> None:
        if optional:
            sp.add_argument("name", nargs="?", metavar="NAME",
                            help="the device (default: every device)")
        else:
            sp.add_argument("name", metavar="NAME", help="the device's name")

    verb("ls", cmd_ls, "list devices")
    for name, fn, what in (("info", cmd_info, "device details"),
                           ("table", cmd_table, "live tables"),
                           ("status", cmd_status, "status lines"),
                           ("deps", cmd_deps, "devices a table uses")):
        name_arg(verb(name, fn, what), optional=True)
    sp = verb("create", cmd_create, "create a device (managed by dmd)")
    name_arg(sp)
    table_args(sp)
    sp.add_argument("-u", "--uuid", help="the device's UUID (default: none)")
    sp.add_argument("--persistent", action="store_true",
                    help="re-create the device when dmd starts and finds it missing "
                         "(after a reboot)")
    sp.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                    help="a label kept with dmd's record of the device (repeatable)")
    for name, what in (("load", "load an inactive table"),
                       ("reload", "replace the live table (load, suspend, resume)")):
        sp = verb(name, cmd_load, what)
        name_arg(sp)
        table_args(sp)
    sp = verb("suspend", cmd_suspend, "suspend a device")
    name_arg(sp)
    sp.add_argument("--noflush", action="store_true",
                    help="do not flush queued I/O first (it stays queued)")
    sp.add_argument("--nolockfs", action="store_true",
                    help="do not freeze a mounted filesystem first")
    name_arg(verb("resume", cmd_resume, "resume a device"))
    name_arg(verb("clear", cmd_clear, "clear the inactive table"))
    sp = verb("rename", cmd_rename, "rename, or set the UUID")
    name_arg(sp)
    sp.add_argument("new_name", nargs="?", metavar="NEW_NAME", help="the new name")
    sp.add_argument("--setuuid", metavar="UUID",
                    help="set the UUID of a device that has none, instead of renaming")
    sp = verb("message", cmd_message, "send a target message")
    name_arg(sp)
    sp.add_argument("sector", type=int, metavar="SECTOR",
                    help="a sector inside the target to send to (0 for most)")
    sp.add_argument("message", nargs="+", metavar="WORD", help="the message")
    sp = verb("remove", cmd_remove, "remove a device")
    name_arg(sp)
    sp.add_argument("-f", "--force", action="store_true",
                    help="if the device is open: make its I/O fail at once (an error "
                         "table), then remove it when its last user closes it")
    sp.add_argument("--deferred", action="store_true",
                    help="if the device is open, remove it when its last user closes it")
    verb("remove-all-managed", cmd_remove_all_managed, "remove every device dmd manages")
    sp = verb("adopt", cmd_adopt, "let dmd manage a device another tool made")
    name_arg(sp)
    sp.add_argument("--persistent", action="store_true",
                    help="re-create the device when dmd starts and finds it missing")
    sp = verb("label", cmd_label, "set a managed device's labels")
    name_arg(sp)
    sp.add_argument("labels", nargs="*", metavar="KEY=VALUE",
                    help="the labels, replacing all the old ones (none: clear them)")
    verb("targets", cmd_targets, "target types the kernel offers")
    verb("version", cmd_version, "dmd and driver versions")
    verb("monitor", cmd_monitor, "print dmd's signals until interrupted")
