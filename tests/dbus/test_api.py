"""dmd --sim on a private dbus-daemon, driven through dbus-fast: every method,
the errors, the signals."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

import pytest
from dbus_fast import Variant

from dmd.dbus.names import (
    DEVICE_INTERFACE,
    OBJECT_MANAGER_INTERFACE,
    PROPERTIES_INTERFACE,
    ROOT_PATH,
    device_path,
)
from tests.dbus.bus_client import CallError, Client, plain, variants

ZERO = [(0, 2048, "zero", "")]


async def settle(client: Client) -> None:
    """Signals are sent before the reply; one more round trip delivers all."""
    await client.call("/", "org.freedesktop.DBus.Peer", "Ping")


def signals(client: Client, member: str) -> list[Any]:
    return [s for s in client.signals if s.member == member]


async def test_create_returns_object_with_every_property(client: Client) -> None:
    path = await client.create("one", ZERO, uuid="dmd-test-one", labels={"role": "data"},
                               persistent=True)
    assert path == device_path(0)
    props = await client.props(path)
    assert props == {
        "Name": "one", "UUID": "dmd-test-one", "Major": props["Major"], "Minor": 0,
        "DevicePath": "/dev/mapper/one", "Size": 2048 * 512, "Suspended": False,
        "ReadOnly": False, "OpenCount": 0, "EventNumber": props["EventNumber"],
        "LiveTable": [[0, 2048, "zero", ""]], "InactiveTable": [], "Dependencies": [],
        "Managed": True, "Persistent": True, "Labels": {"role": "data"}, "Drifted": False,
        # A simulated kernel has no udev.
        "Symlinks": [], "FilesystemType": "", "FilesystemUUID": "", "UdevReady": False,
    }
    assert await client.manager("GetDevice", "s", "one") == path


async def test_interfaces_added_and_removed_come_from_the_manager_path(client: Client) -> None:
    path = await client.create("one", ZERO)
    await settle(client)
    added = signals(client, "InterfacesAdded")
    assert [(s.path, s.interface, s.body[0]) for s in added] == [
        (ROOT_PATH, OBJECT_MANAGER_INTERFACE, path)]
    sent = {k: plain(v.value) for k, v in added[0].body[1][DEVICE_INTERFACE].items()}
    assert sent == await client.props(path)
    await client.device(path, "Remove", "a{sv}", {})
    await settle(client)
    removed = signals(client, "InterfacesRemoved")
    assert [(s.path, s.body) for s in removed] == [(ROOT_PATH, [path, [DEVICE_INTERFACE]])]
    assert await client.managed_objects() == {}


async def test_managed_objects_lists_every_device(client: Client) -> None:
    paths = [await client.create(f"dev{i}", ZERO) for i in range(5)]
    objects = await client.managed_objects()
    assert sorted(objects) == sorted(paths)
    assert {o["Name"] for o in objects.values()} == {f"dev{i}" for i in range(5)}


async def test_suspend_resume_emit_properties_changed(client: Client) -> None:
    path = await client.create("one", ZERO)
    client.signals.clear()
    await client.device(path, "Suspend", "a{sv}", variants(noflush=True))
    assert (await client.props(path))["Suspended"] is True
    await client.device(path, "Resume", "a{sv}", {})
    assert (await client.props(path))["Suspended"] is False
    await settle(client)
    changes = [(s.path, s.body[0], {k: v.value for k, v in s.body[1].items()})
               for s in signals(client, "PropertiesChanged")]
    suspended = [c[2]["Suspended"] for c in changes if "Suspended" in c[2]]
    assert suspended == [True, False]
    assert all(p == path and i == DEVICE_INTERFACE for p, i, _ in changes)


async def test_reload_load_clear(client: Client) -> None:
    path = await client.create("one", ZERO)
    await client.device(path, "Reload", "a(ttss)a{sv}", [[0, 4096, "error", ""]], {})
    props = await client.props(path)
    assert props["LiveTable"] == [[0, 4096, "error", ""]]
    assert props["Size"] == 4096 * 512
    await client.device(path, "LoadTable", "a(ttss)a{sv}", [[0, 8, "zero", ""]],
                        variants(read_only=True))
    assert (await client.props(path))["InactiveTable"] == [[0, 8, "zero", ""]]
    await client.device(path, "ClearTable", "a{sv}", {})
    assert (await client.props(path))["InactiveTable"] == []


async def test_rename_keeps_the_object_path(client: Client) -> None:
    path = await client.create("one", ZERO)
    await client.device(path, "Rename", "sa{sv}", "two", {})
    props = await client.props(path)
    assert (props["Name"], props["DevicePath"]) == ("two", "/dev/mapper/two")
    assert await client.manager("GetDevice", "s", "two") == path
    with pytest.raises(CallError) as err:
        await client.manager("GetDevice", "s", "one")
    assert err.value.short == "NotFound"


async def test_set_uuid_labels_adopt(client: Client) -> None:
    path = await client.create("one", ZERO)
    await client.device(path, "SetUUID", "sa{sv}", "dmd-uuid-1", {})
    await client.device(path, "SetLabels", "a{ss}a{sv}", {"a": "1", "b": "2"}, {})
    props = await client.props(path)
    assert (props["UUID"], props["Labels"]) == ("dmd-uuid-1", {"a": "1", "b": "2"})
    with pytest.raises(CallError) as err:
        await client.device(path, "Adopt", "a{sv}", {})
    assert err.value.short == "AlreadyExists"


async def test_status_targets_versions(client: Client) -> None:
    path = await client.create("one", ZERO)
    assert await client.device(path, "GetStatus", "a{sv}", {}) == [[0, 2048, "zero", ""]]
    targets = dict((name, tuple(v)) for name, v in await client.manager("ListTargets"))
    assert {"linear", "zero", "error", "striped"} <= set(targets)
    body = await client.call(ROOT_PATH, PROPERTIES_INTERFACE, "GetAll", "s",
                             ["org.example.DeviceMapper.Manager"])
    versions = {k: v.value for k, v in body[0].items()}
    assert versions["KernelVersion"].count(".") == 2
    assert versions["Version"]


async def test_remove_all_managed(client: Client) -> None:
    for i in range(3):
        await client.create(f"dev{i}", ZERO)
    removed = await client.manager("RemoveAllManaged", "a{sv}", {})
    assert sorted(removed) == ["dev0", "dev1", "dev2"]
    assert await client.managed_objects() == {}


# -- errors: named, and a refused call changes nothing ----------------------

async def expect_error(name: str, call: Any) -> CallError:
    with pytest.raises(CallError) as err:
        await call
    assert err.value.short == name, err.value
    return err.value


async def test_errors_are_named_and_change_nothing(client: Client) -> None:
    path = await client.create("one", ZERO)
    before = await client.managed_objects()
    cases: list[tuple[str, Any]] = [
        ("InvalidArgument", client.create("bad/name", ZERO)),
        ("InvalidArgument", client.create("two", [(5, 10, "zero", "")])),
        ("InvalidArgument", client.create("two", [])),
        ("InvalidArgument", client.create("x" * 200, ZERO)),
        ("InvalidArgument", client.create("two", ZERO, bogus=True)),
        ("InvalidArgument", client.manager("CreateDevice", "sa{sv}", "two", {})),
        ("InvalidArgument", client.manager("CreateDevice", "sa(ttss)a{sv}", "two",
                                           [[0, 8, "zero", ""]], {"uuid": Variant("b", True)})),
        ("AlreadyExists", client.create("one", ZERO)),
        ("NotFound", client.manager("GetDevice", "s", "nosuch")),
        ("NotFound", client.device(device_path(99), "Resume", "a{sv}", {})),
        ("Kernel", client.device(path, "Message", "tsa{sv}", 0, "hello", {})),
        ("Kernel", client.create("two", [(0, 8, "nosuchtarget", "")])),
        ("InvalidArgument", client.device(path, "Rename", "sa{sv}", "..", {})),
        ("InvalidArgument", client.device(path, "Suspend", "a{sv}", variants(noflush="yes"))),
    ]
    for name, call in cases:
        await expect_error(name, call)
    assert await client.managed_objects() == before


async def test_kernel_error_names_errno(client: Client) -> None:
    path = await client.create("one", ZERO)
    err = await expect_error("Kernel", client.device(path, "Message", "tsa{sv}", 0, "hi", {}))
    assert "EINVAL" in err.text and "one" in err.text


async def test_busy_names_the_users(client: Client, dmd_session: Any) -> None:
    await client.create("base", ZERO)
    props = await client.props(await client.manager("GetDevice", "s", "base"))
    await client.create("top", [(0, 2048, "linear", f"{props['Major']}:{props['Minor']} 0")])
    base = await client.manager("GetDevice", "s", "base")
    err = await expect_error("Busy", client.device(base, "Remove", "a{sv}", {}))
    assert "top" in err.text
    assert base in await client.managed_objects()


async def test_failed_create_leaves_no_device(client: Client) -> None:
    # The sim refuses a linear target on a device that does not exist.
    await expect_error("Kernel", client.create("two", [(0, 8, "linear", "7:99 0")]))
    assert await client.managed_objects() == {}


# -- other callers ------------------------------------------------------------

def busctl(dmd_session: Any, *args: str, user: str | None = None
           ) -> subprocess.CompletedProcess[str]:
    command = ["busctl", f"--address={dmd_session.address}", *args]
    if user is not None:
        command = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=30)


def test_busctl_create_and_read(dmd_session: Any) -> None:
    out = busctl(dmd_session, "call", "org.example.DeviceMapper", ROOT_PATH,
                 "org.example.DeviceMapper.Manager", "CreateDevice", "sa(ttss)a{sv}",
                 "fromshell", "1", "0", "1024", "zero", "", "1", "read-only", "b", "true")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f'o "{device_path(0)}"'
    got = busctl(dmd_session, "--json=short", "get-property", "org.example.DeviceMapper",
                 device_path(0), DEVICE_INTERFACE, "ReadOnly", "Name")
    assert got.returncode == 0, got.stderr
    values = [json.loads(line)["data"] for line in got.stdout.splitlines()]
    assert values == [True, "fromshell"]


@pytest.mark.skipif(subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip()
                    != "0", reason="needs root to call as another user")
def test_non_root_may_read_but_not_change(dmd_session: Any) -> None:
    """No polkit on this private bus: a non-root caller is refused every change
    and may still read everything."""
    ok = busctl(dmd_session, "call", "org.example.DeviceMapper", ROOT_PATH,
                "org.example.DeviceMapper.Manager", "CreateDevice", "sa(ttss)a{sv}",
                "mine", "1", "0", "8", "zero", "", "0")
    assert ok.returncode == 0, ok.stderr
    refused = busctl(dmd_session, "call", "org.example.DeviceMapper", ROOT_PATH,
                     "org.example.DeviceMapper.Manager", "CreateDevice", "sa(ttss)a{sv}",
                     "theirs", "1", "0", "8", "zero", "", "0", user="65534")
    assert refused.returncode != 0
    assert "polkit is not running" in refused.stderr, refused.stderr
    for member, sig, args in [("Suspend", "a{sv}", ["0"]), ("Remove", "a{sv}", ["0"]),
                              ("Rename", "sa{sv}", ["x", "0"]),
                              ("SetLabels", "a{ss}a{sv}", ["0", "0"])]:
        out = busctl(dmd_session, "call", "org.example.DeviceMapper", device_path(0),
                     DEVICE_INTERFACE, member, sig, *args, user="65534")
        assert out.returncode != 0 and "not root" in out.stderr, (member, out.stderr)
    read = busctl(dmd_session, "get-property", "org.example.DeviceMapper", device_path(0),
                  DEVICE_INTERFACE, "Name", user="65534")
    assert read.returncode == 0 and '"mine"' in read.stdout, read.stderr
    objects = busctl(dmd_session, "call", "org.example.DeviceMapper", ROOT_PATH,
                     OBJECT_MANAGER_INTERFACE, "GetManagedObjects")
    assert "theirs" not in objects.stdout and "mine" in objects.stdout


# -- the daemon's life ----------------------------------------------------------

def test_second_instance_fails_clearly(dmd_session: Any) -> None:
    second = subprocess.run(dmd_session.command(), env=dmd_session.env, capture_output=True,
                            text=True, timeout=30)
    assert second.returncode == 1
    assert "another dmd" in second.stderr, second.stderr


def test_second_instance_on_other_state_dir_fails_on_the_name(dmd_session: Any,
                                                              tmp_path: Any) -> None:
    command = [sys.executable, "-m", "dmd", "--bus", "session", "--sim",
               str(tmp_path / "other.json"), "--state-dir", str(tmp_path / "other")]
    second = subprocess.run(command, env=dmd_session.env, capture_output=True, text=True,
                            timeout=30)
    assert second.returncode == 1
    assert "already owned" in second.stderr, second.stderr


async def test_persistent_devices_come_back_after_a_reboot(dmd_session: Any) -> None:
    from dbus_fast import BusType
    from dbus_fast.aio import MessageBus

    async def connect() -> tuple[MessageBus, Client]:
        bus = MessageBus(bus_address=dmd_session.address, bus_type=BusType.SESSION)
        await bus.connect()
        return bus, Client(bus)

    bus, client = await connect()
    await client.create("keep", ZERO, persistent=True, labels={"k": "v"})
    await client.create("lose", ZERO)
    bus.disconnect()
    assert dmd_session.stop() == 0
    dmd_session.sim.unlink()  # the reboot: the kernel forgets every device
    dmd_session.start()
    bus, client = await connect()
    objects = await client.managed_objects()
    assert [(o["Name"], o["Labels"], o["Managed"]) for o in objects.values()] == [
        ("keep", {"k": "v"}, True)]
    bus.disconnect()


async def test_reads_do_not_wait_behind_a_slow_suspend(make_dmd: Any) -> None:
    from dbus_fast import BusType
    from dbus_fast.aio import MessageBus

    dmd = make_dmd("--sim-flush-delay", "2")
    try:
        bus = MessageBus(bus_address=dmd.address, bus_type=BusType.SESSION)
        await bus.connect()
        client = Client(bus)
        path = await client.create("slow", ZERO)
        suspend = asyncio.ensure_future(client.device(path, "Suspend", "a{sv}", {}))
        await asyncio.sleep(0.2)
        loop = asyncio.get_running_loop()
        started = loop.time()
        objects = await client.managed_objects()
        props = await client.props(path)
        elapsed = loop.time() - started
        assert not suspend.done()
        assert elapsed < 0.5, f"reads took {elapsed:.2f} s behind a 2 s suspend"
        assert objects[path]["Suspended"] is False and props["Suspended"] is False
        await suspend
        assert (await client.props(path))["Suspended"] is True
        bus.disconnect()
    finally:
        assert dmd.stop() == 0


async def test_sigterm_lets_running_calls_finish(make_dmd: Any) -> None:
    from dbus_fast import BusType
    from dbus_fast.aio import MessageBus

    dmd = make_dmd("--sim-flush-delay", "1")
    proc = dmd.proc
    bus = MessageBus(bus_address=dmd.address, bus_type=BusType.SESSION)
    await bus.connect()
    client = Client(bus)
    path = await client.create("slow", ZERO)
    suspend = asyncio.ensure_future(client.device(path, "Suspend", "a{sv}", {}))
    await asyncio.sleep(0.3)
    proc.terminate()
    await suspend  # answered, not dropped
    assert await asyncio.get_running_loop().run_in_executor(None, proc.wait, 20) == 0
    bus.disconnect()
