"""Pools, volumes and jobs over a real dbus-daemon, against dmd --sim: the
replies, the objects on the bus, the jobs and their signals, the refusals;
and busctl, a client we did not write."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Variant

from dmd.dbus.names import (
    BUS_NAME,
    DEVICE_INTERFACE,
    JOB_INTERFACE,
    MANAGER_INTERFACE,
    NO_OBJECT,
    OBJECT_MANAGER_INTERFACE,
    POOL_INTERFACE,
    PROPERTIES_INTERFACE,
    ROOT_PATH,
    VOLUME_INTERFACE,
)
from dmd.dbus.pool_exporter import PROGRESS_INTERVAL
from dmd.engine.sim import SimDM
from tests.dbus.bus_client import CallError, Client
from tests.helpers import plain

GIB = 1 << 30


@pytest.fixture
def disks(dmd_session: Any) -> list[str]:
    sim = SimDM(dmd_session.sim)
    paths = [f"/dev/simdisk{i}" for i in (1, 2)]
    for i, path in enumerate(paths, start=1):
        sim.add_disk(path, 7, i, 512 * 2048)
    sim.add_disk("/dev/simxfs", 7, 9, 512 * 2048, signature="xfs")
    return paths


async def props(client: Client, path: str, interface: str) -> dict[str, Any]:
    body = await client.call(path, PROPERTIES_INTERFACE, "GetAll", "s", [interface])
    return {k: plain(v.value) for k, v in body[0].items()}


async def finished(client: Client, job: str) -> dict[str, Any]:
    """Wait for the job; its properties at the end."""
    (done,) = await client.call(job, JOB_INTERFACE, "Wait", "d", [30.0])
    assert done
    return await props(client, job, JOB_INTERFACE)


async def create_pool(client: Client, name: str, devices: list[str], **opts: Variant
                      ) -> tuple[str, str]:
    pool, job = await client.call(ROOT_PATH, MANAGER_INTERFACE, "CreatePool", "sasa{sv}",
                                  [name, devices, opts])
    return str(pool), str(job)


async def objects(client: Client) -> dict[str, dict[str, Any]]:
    (body,) = await client.call(ROOT_PATH, OBJECT_MANAGER_INTERFACE, "GetManagedObjects")
    return {path: {i: {k: plain(v.value) for k, v in p.items()} for i, p in ifaces.items()}
            for path, ifaces in body.items()}


async def test_pool_volume_snapshot_lifecycle(client: Client, disks: list[str]) -> None:
    pool, job = await create_pool(client, "tank", disks)
    # The reply comes once the request is accepted; the pool is on the bus then.
    assert pool in await objects(client)
    end = await finished(client, job)
    assert end["State"] == "completed" and end["Result"] == pool and end["Objects"] == [pool]
    assert end["Progress"] == 1.0 and not end["Cancellable"] and end["ErrorName"] == ""
    p = await props(client, pool, POOL_INTERFACE)
    assert p["Name"] == "tank" and p["State"] == "active" and p["Mode"] == "ok"
    assert p["Devices"] == disks and p["BlockSize"] == 64 << 10 and p["DataUsed"] == 0
    assert p["DataTotal"] > 900 << 20 and p["TransactionId"] == 0
    (path,) = await client.call(ROOT_PATH, MANAGER_INTERFACE, "GetPool", "s", ["tank"])
    assert path == pool

    volume, job = await client.call(pool, POOL_INTERFACE, "CreateVolume", "sta{sv}",
                                    ["data", 20 * GIB, {"labels": Variant("a{ss}", {"a": "b"})}])
    assert (await finished(client, job))["State"] == "completed"
    v = await props(client, volume, VOLUME_INTERFACE)
    assert v["Name"] == "data" and v["Pool"] == pool and v["Size"] == 20 * GIB
    assert v["State"] == "active" and v["Labels"] == {"a": "b"} and v["Origin"] == NO_OBJECT
    assert v["DevicePath"] == "/dev/mapper/tank-data" and v["Device"] in await objects(client)
    assert "ThinId" not in v  # services never learn thin ids

    snap, job = await client.call(volume, VOLUME_INTERFACE, "Snapshot", "sa{sv}", ["data.1", {}])
    assert (await finished(client, job))["State"] == "completed"
    s = await props(client, snap, VOLUME_INTERFACE)
    assert s["Origin"] == volume and s["Size"] == 20 * GIB and s["State"] == "active"
    assert (await props(client, pool, POOL_INTERFACE))["TransactionId"] == 2

    (job,) = await client.call(volume, VOLUME_INTERFACE, "Resize", "ta{sv}", [30 * GIB, {}])
    assert (await finished(client, job))["State"] == "completed"
    assert (await props(client, volume, VOLUME_INTERFACE))["Size"] == 30 * GIB
    # udev-sync false: done without waiting for udev's work on the removal
    (job,) = await client.call(snap, VOLUME_INTERFACE, "Deactivate", "a{sv}",
                               [{"udev-sync": Variant("b", False)}])
    assert (await finished(client, job))["State"] == "completed"
    s = await props(client, snap, VOLUME_INTERFACE)
    assert s["State"] == "inactive" and s["Device"] == NO_OBJECT and s["DevicePath"] == ""

    (job,) = await client.call(volume, VOLUME_INTERFACE, "Delete", "a{sv}",
                               [{"udev-sync": Variant("b", True)}])
    end = await finished(client, job)
    assert end["State"] == "completed" and end["Result"] == NO_OBJECT
    everything = await objects(client)
    assert volume not in everything and snap in everything
    # The snapshot outlives its origin, which it no longer points to.
    assert (await props(client, snap, VOLUME_INTERFACE))["Origin"] == NO_OBJECT

    with pytest.raises(CallError) as busy:
        await client.call(pool, POOL_INTERFACE, "Destroy", "a{sv}", [{}])
    assert busy.value.short == "Busy"
    (job,) = await client.call(pool, POOL_INTERFACE, "Destroy", "a{sv}",
                               [{"force": Variant("b", True)}])
    assert (await finished(client, job))["State"] == "completed"
    assert not [p for p, i in (await objects(client)).items()
                if POOL_INTERFACE in i or VOLUME_INTERFACE in i]


async def test_job_ends_with_a_completed_signal_and_stays_readable(
        client: Client, disks: list[str]) -> None:
    pool, job = await create_pool(client, "tank", disks[:1])
    await finished(client, job)
    _, job = await client.call(pool, POOL_INTERFACE, "CreateVolume", "sta{sv}",
                               ["v", GIB, {}])
    for _ in range(200):
        done = [m for m in client.signals if m.path == job and m.member == "Completed"]
        if done:
            break
        await asyncio.sleep(0.05)
    assert done and done[0].body == [True, "", ""]
    # Read after the end (a client that looked late).
    assert (await props(client, job, JOB_INTERFACE))["State"] == "completed"
    added = [m for m in client.signals if m.member == "InterfacesAdded" and m.body[0] == job]
    assert added and added[0].path == ROOT_PATH


async def test_a_volumes_labels_are_set_over_the_bus(client: Client, disks: list[str]) -> None:
    await client.watch()
    pool, job = await create_pool(client, "tank", disks[:1])
    await finished(client, job)
    volume, job = await client.call(pool, POOL_INTERFACE, "CreateVolume", "sta{sv}",
                                    ["v", GIB, {"labels": Variant("a{ss}", {"a": "b"})}])
    await finished(client, job)
    client.signals.clear()
    await client.call(volume, VOLUME_INTERFACE, "SetLabels", "a{ss}a{sv}",
                      [{"snapshot/key": "k1"}, {}])
    # Shown when the call returns, and said by a signal.
    assert (await props(client, volume, VOLUME_INTERFACE))["Labels"] == {"snapshot/key": "k1"}
    assert any(m.path == volume and m.member == "PropertiesChanged" and "Labels" in m.body[1]
               for m in client.signals)
    with pytest.raises(CallError) as bad:
        await client.call(volume, VOLUME_INTERFACE, "SetLabels", "a{ss}a{sv}",
                          [{"k": "x" * 5000}, {}])
    assert bad.value.short == "InvalidArgument"
    with pytest.raises(CallError) as unknown:
        await client.call(volume, VOLUME_INTERFACE, "SetLabels", "a{ss}a{sv}",
                          [{}, {"force": Variant("b", True)}])
    assert unknown.value.short == "InvalidArgument"
    assert (await props(client, volume, VOLUME_INTERFACE))["Labels"] == {"snapshot/key": "k1"}


async def test_a_volume_is_renamed_and_keeps_its_object(client: Client,
                                                       disks: list[str]) -> None:
    pool, job = await create_pool(client, "tank", disks[:1])
    await finished(client, job)
    volume, job = await client.call(pool, POOL_INTERFACE, "CreateVolume", "sta{sv}",
                                    ["v", GIB, {}])
    await finished(client, job)
    other, job = await client.call(pool, POOL_INTERFACE, "CreateVolume", "sta{sv}",
                                   ["taken", GIB, {}])
    await finished(client, job)
    await client.call(volume, VOLUME_INTERFACE, "Rename", "sa{sv}", ["db", {}])
    v = await props(client, volume, VOLUME_INTERFACE)
    assert v["Name"] == "db" and v["DevicePath"] == "/dev/mapper/tank-db"
    assert v["Device"] in await objects(client)
    with pytest.raises(CallError) as taken:
        await client.call(volume, VOLUME_INTERFACE, "Rename", "sa{sv}", ["taken", {}])
    assert taken.value.short == "AlreadyExists"
    assert (await props(client, volume, VOLUME_INTERFACE))["Name"] == "db"
    names = {i[VOLUME_INTERFACE]["Name"]: path for path, i in (await objects(client)).items()
             if VOLUME_INTERFACE in i}
    assert names == {"db": volume, "taken": other}


async def test_a_volume_is_reverted_to_its_snapshot_over_the_bus(client: Client,
                                                                 disks: list[str]) -> None:
    pool, job = await create_pool(client, "tank", disks[:1])
    await finished(client, job)
    volume, job = await client.call(pool, POOL_INTERFACE, "CreateVolume", "sta{sv}",
                                    ["v", GIB, {}])
    await finished(client, job)
    snap, job = await client.call(volume, VOLUME_INTERFACE, "Snapshot", "sa{sv}", ["v.1", {}])
    await finished(client, job)
    (job,) = await client.call(volume, VOLUME_INTERFACE, "Resize", "ta{sv}", [2 * GIB, {}])
    await finished(client, job)
    with pytest.raises(CallError) as no_origin:
        await client.call(volume, VOLUME_INTERFACE, "Revert", "a{sv}", [{}])
    assert no_origin.value.short == "NotFound"
    (job,) = await client.call(snap, VOLUME_INTERFACE, "Revert", "a{sv}", [{}])
    await finished(client, job)
    assert (await props(client, job, JOB_INTERFACE))["Operation"] == "volume-revert"
    v = await props(client, volume, VOLUME_INTERFACE)
    assert (v["Name"], v["Size"], v["State"]) == ("v", GIB, "active")
    assert (v["RevertScheduled"], v["RevertSnapshot"]) == (False, "/")
    assert v["Device"] in await objects(client)
    assert (await props(client, snap, VOLUME_INTERFACE))["Origin"] == volume


async def test_a_pool_is_stopped_and_started_over_the_bus(client: Client,
                                                          disks: list[str]) -> None:
    pool, job = await create_pool(client, "tank", disks[:1])
    await finished(client, job)
    volume, job = await client.call(pool, POOL_INTERFACE, "CreateVolume", "sta{sv}",
                                    ["v", GIB, {}])
    await finished(client, job)
    (job,) = await client.call(pool, POOL_INTERFACE, "Stop", "a{sv}", [{}])
    await finished(client, job)
    assert (await props(client, pool, POOL_INTERFACE))["State"] == "stopped"
    v = await props(client, volume, VOLUME_INTERFACE)
    assert (v["State"], v["Device"]) == ("inactive", "/")
    with pytest.raises(CallError) as stopped:
        await client.call(pool, POOL_INTERFACE, "CreateVolume", "sta{sv}", ["w", GIB, {}])
    assert stopped.value.short == "NotActive"
    with pytest.raises(CallError) as bad:
        await client.call(pool, POOL_INTERFACE, "Start", "a{sv}",
                          [{"devices": Variant("as", ["/dev/nothing"])}])
    assert bad.value.short == "InvalidArgument"
    await client.call(pool, POOL_INTERFACE, "Rename", "sa{sv}", ["vault", {}])  # same objects
    assert (await props(client, pool, POOL_INTERFACE))["Name"] == "vault"
    assert (await props(client, volume, VOLUME_INTERFACE))["PoolName"] == "vault"
    (job,) = await client.call(pool, POOL_INTERFACE, "Start", "a{sv}", [{}])
    await finished(client, job)
    assert (await props(client, pool, POOL_INTERFACE))["State"] == "active"
    v = await props(client, volume, VOLUME_INTERFACE)
    assert v["State"] == "active" and v["Device"] in await objects(client)
    assert v["DevicePath"] == "/dev/mapper/vault-v"


async def test_a_quick_job_is_not_a_storm_of_progress_signals(
        client: Client, disks: list[str]) -> None:
    """A create's ten journal steps, over in a moment, are not ten
    PropertiesChanged signals: Progress is published at most every
    PROGRESS_INTERVAL (dmd.dbus.pool_exporter), and the end brings it to 1."""
    await client.watch()
    pool, job = await create_pool(client, "tank", disks[:1])
    await finished(client, job)
    client.signals.clear()
    began = time.monotonic()
    _, job = await client.call(pool, POOL_INTERFACE, "CreateVolume", "sta{sv}",
                               ["v", GIB, {}])
    end = await finished(client, job)
    took = time.monotonic() - began
    assert end["State"] == "completed" and end["Progress"] == 1.0
    await asyncio.sleep(0.5)  # a progress still due would be published by now
    changes = [plain(m.body[1]["Progress"].value) for m in client.signals
               if m.path == job and m.member == "PropertiesChanged"
               and "Progress" in m.body[1]]
    # One per interval the job lasted (however slow this machine), and the end.
    assert changes and changes[-1] == 1.0, changes
    assert len(changes) <= 2 + took / PROGRESS_INTERVAL, (changes, took)


async def test_bad_input_is_an_error_reply_and_changes_nothing(
        client: Client, disks: list[str]) -> None:
    pool, job = await create_pool(client, "tank", disks[:1])
    await finished(client, job)
    volume, job = await client.call(pool, POOL_INTERFACE, "CreateVolume", "sta{sv}",
                                    ["taken", GIB, {}])
    await finished(client, job)
    before = await objects(client)
    cases: list[tuple[str, str, str, str, list[Any], str]] = [
        (pool, POOL_INTERFACE, "CreateVolume", "sta{sv}", ["v", 0, {}], "InvalidArgument"),
        (pool, POOL_INTERFACE, "CreateVolume", "sta{sv}", ["v", 1 << 63, {}], "InvalidArgument"),
        (pool, POOL_INTERFACE, "CreateVolume", "sta{sv}", ["taken", GIB, {}], "AlreadyExists"),
        (pool, POOL_INTERFACE, "CreateVolume", "sta{sv}", ["a/b", GIB, {}], "InvalidArgument"),
        (pool, POOL_INTERFACE, "CreateVolume", "sta{sv}",
         ["v", GIB, {"size": Variant("t", 1)}], "InvalidArgument"),
        (volume, VOLUME_INTERFACE, "Snapshot", "sa{sv}", ["taken", {}], "AlreadyExists"),
        (volume, VOLUME_INTERFACE, "Resize", "ta{sv}", [GIB // 2, {}], "InvalidArgument"),
        (volume, VOLUME_INTERFACE, "Delete", "a{sv}", [{"udev-sync": Variant("s", "no")}],
         "InvalidArgument"),
        (volume, VOLUME_INTERFACE, "Deactivate", "a{sv}", [{"force": Variant("b", True)}],
         "InvalidArgument"),
        (ROOT_PATH, MANAGER_INTERFACE, "GetPool", "s", ["nosuch"], "NotFound"),
        (ROOT_PATH, MANAGER_INTERFACE, "CreatePool", "sasa{sv}", ["other", disks[:1], {}],
         "Busy"),  # a device of tank
        (ROOT_PATH, MANAGER_INTERFACE, "CreatePool", "sasa{sv}",
         ["other", ["/dev/simxfs"], {}], "Busy"),  # an xfs signature
        (ROOT_PATH, MANAGER_INTERFACE, "CreatePool", "sasa{sv}",
         ["other", ["/etc/passwd"], {}], "InvalidArgument"),  # not a block device
        (ROOT_PATH, MANAGER_INTERFACE, "CreatePool", "sasa{sv}",
         ["other", [disks[1]], {"block-size": Variant("t", 4096)}], "InvalidArgument"),
        (pool + "x", POOL_INTERFACE, "CreateVolume", "sta{sv}", ["v", GIB, {}], "NotFound"),
    ]
    for path, interface, member, signature, body, error in cases:
        with pytest.raises(CallError) as caught:
            await client.call(path, interface, member, signature, body)
        assert caught.value.short == error, (member, body, caught.value)
        assert await objects(client) == before, (member, body)


async def test_raw_device_calls_on_a_pool_are_busy(client: Client, disks: list[str]) -> None:
    _, job = await create_pool(client, "tank", disks[:1])
    await finished(client, job)
    tpool = await client.manager("GetDevice", "s", "tank-tpool")
    for member, signature, body in (("Remove", "a{sv}", [{}]),
                                    ("Message", "tsa{sv}", [0, "delete 0", {}])):
        with pytest.raises(CallError) as caught:
            await client.call(tpool, "org.example.DeviceMapper.Device", member, signature, body)
        assert caught.value.short == "Busy" and "pool 'tank'" in caught.value.text


def busctl(address: str, *args: str) -> Any:
    out = subprocess.run(["busctl", f"--address={address}", "--json=short", *args],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def test_busctl_creates_a_volume_and_waits_for_its_job(dmd_session: Any,
                                                       disks: list[str]) -> None:
    address = dmd_session.address
    reply = busctl(address, "call", BUS_NAME, ROOT_PATH, MANAGER_INTERFACE, "CreatePool",
                   "sasa{sv}", "tank", "1", disks[0], "0")
    pool, job = reply["data"]
    assert busctl(address, "call", BUS_NAME, job, JOB_INTERFACE, "Wait", "d", "30")["data"] == [
        True]
    reply = busctl(address, "call", BUS_NAME, pool, POOL_INTERFACE, "CreateVolume", "sta{sv}",
                   "vm1", str(20 * GIB), "0")
    volume, job = reply["data"]
    busctl(address, "call", BUS_NAME, job, JOB_INTERFACE, "Wait", "d", "30")
    state = busctl(address, "get-property", BUS_NAME, job, JOB_INTERFACE, "State")
    assert state["data"] == "completed"
    size = busctl(address, "get-property", BUS_NAME, volume, VOLUME_INTERFACE, "Size")
    assert size["data"] == 20 * GIB
    path = busctl(address, "get-property", BUS_NAME, volume, VOLUME_INTERFACE, "DevicePath")
    assert path["data"] == "/dev/mapper/tank-vm1"





async def test_pools_and_volumes_are_back_after_a_restart(dmd_session: Any,
                                                          disks: list[str]) -> None:
    from dbus_fast import BusType
    from dbus_fast.aio import MessageBus

    async def connect() -> tuple[MessageBus, Client]:
        bus = MessageBus(bus_address=dmd_session.address, bus_type=BusType.SESSION)
        await bus.connect()
        return bus, Client(bus)

    bus, client = await connect()
    pool, job = await create_pool(client, "tank", disks)
    await finished(client, job)
    volume, job = await client.call(pool, POOL_INTERFACE, "CreateVolume", "sta{sv}",
                                    ["vm", GIB, {}])
    await finished(client, job)
    before = {p: i for p, i in (await objects(client)).items()
              if POOL_INTERFACE in i or VOLUME_INTERFACE in i}
    bus.disconnect()
    assert dmd_session.stop() == 0
    dmd_session.start()
    bus, client = await connect()
    try:
        after = {p: i for p, i in (await objects(client)).items()
                 if POOL_INTERFACE in i or VOLUME_INTERFACE in i}
        # The same objects at the same paths; only the device object's path may move.
        for values in (*before.values(), *after.values()):
            values.get(VOLUME_INTERFACE, {}).pop("Device", None)
        assert after == before
        assert (await client.call(ROOT_PATH, MANAGER_INTERFACE, "GetPool", "s", ["tank"])
                ) == [pool]
        assert (await props(client, volume, VOLUME_INTERFACE))["State"] == "active"
    finally:
        bus.disconnect()


async def test_import_pool_after_the_state_is_lost_with_busctl(dmd_session: Any,
                                                               disks: list[str]) -> None:
    """A pool made over the bus, the state directory deleted and every device
    gone (a reboot), brought back by busctl's ImportPool: the same objects
    at the same paths (keyed on UUIDs the description kept)."""
    import shutil

    from dbus_fast import BusType
    from dbus_fast.aio import MessageBus

    async def connect() -> tuple[MessageBus, Client]:
        bus = MessageBus(bus_address=dmd_session.address, bus_type=BusType.SESSION)
        await bus.connect()
        return bus, Client(bus)

    bus, client = await connect()
    pool, job = await create_pool(client, "tank", disks)
    await finished(client, job)
    _, job = await client.call(pool, POOL_INTERFACE, "CreateVolume", "sta{sv}",
                               ["vm", GIB, {"labels": Variant("a{ss}", {"app": "db"})}])
    await finished(client, job)
    before = {p: i for p, i in (await objects(client)).items()
              if POOL_INTERFACE in i or VOLUME_INTERFACE in i}
    bus.disconnect()
    assert dmd_session.stop() == 0
    shutil.rmtree(dmd_session.state_dir)
    sim = SimDM(dmd_session.sim)
    for name in ("tank-vm", "tank-tpool", "tank-tdata", "tank-tmeta"):
        sim.device_remove(name)
    dmd_session.start()
    bus, client = await connect()
    try:
        assert not [p for p in await objects(client) if "/pools/" in p or "/volumes/" in p]
        out = subprocess.run(
            ["busctl", "--address", dmd_session.address, "--json=short", "call", BUS_NAME,
             ROOT_PATH, MANAGER_INTERFACE, "ImportPool", "asa{sv}", "2", disks[1], disks[0],
             "0"], capture_output=True, text=True, check=True)
        imported, job = json.loads(out.stdout)["data"]
        assert imported == pool
        end = await finished(client, job)
        assert end["State"] == "completed" and end["Operation"] == "pool-import"
        after = {p: i for p, i in (await objects(client)).items()
                 if POOL_INTERFACE in i or VOLUME_INTERFACE in i}
        for values in (*before.values(), *after.values()):
            values.get(VOLUME_INTERFACE, {}).pop("Device", None)
        assert after == before
        with pytest.raises(CallError) as caught:
            await client.call(ROOT_PATH, MANAGER_INTERFACE, "ImportPool", "asa{sv}",
                              [disks, {}])
        # A pool dmd has: AlreadyExists (what a client can act on), not the
        # Busy of its devices being in use (by that very pool).
        assert caught.value.name.endswith(".AlreadyExists")
    finally:
        bus.disconnect()


async def test_add_device_grows_the_pool(client: Client, disks: list[str]) -> None:
    pool, job = await create_pool(client, "tank", disks[:1])
    await finished(client, job)
    before = (await props(client, pool, POOL_INTERFACE))["DataTotal"]
    (job,) = await client.call(pool, POOL_INTERFACE, "AddDevice", "sa{sv}", [disks[1], {}])
    assert (await finished(client, job))["Operation"] == "pool-grow"
    after = await props(client, pool, POOL_INTERFACE)
    assert after["Devices"] == disks and after["DataTotal"] > before
    with pytest.raises(CallError) as caught:
        await client.call(pool, POOL_INTERFACE, "AddDevice", "sa{sv}", ["/dev/simxfs", {}])
    assert caught.value.short == "Busy"


async def signal(client: Client, path: str, member: str, timeout: float = 20) -> Any:
    for _ in range(int(timeout / 0.05)):
        found = [m for m in client.signals if m.path == path and m.member == member]
        if found:
            return found[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {member} on {path}; saw "
                         f"{sorted({(m.path, m.member) for m in client.signals})}")


async def test_a_pool_low_on_space_grows_or_says_so(client: Client, dmd_session: Any,
                                                    disks: list[str]) -> None:
    """Writes the simulator is told of cross the low water mark; its event
    reaches dmd through the kernel's event alone: a pool with room grows,
    one without says LowSpace, then Full, on its object."""
    await client.watch()
    roomy, job = await create_pool(client, "roomy", disks[:1],
                                   **{"data-size": Variant("t", 64 << 16)})
    await finished(client, job)
    tight, job = await create_pool(client, "tight", disks[1:])
    await finished(client, job)
    sim = SimDM(dmd_session.sim)
    for name in ("roomy", "tight"):
        path = roomy if name == "roomy" else tight
        _, job = await client.call(path, POOL_INTERFACE, "CreateVolume", "sta{sv}",
                                   ["v", GIB, {}])
        await finished(client, job)
    sim.write("roomy-v", 0, 60 * 128)  # 60 of 64 blocks
    for _ in range(200):
        if (await props(client, roomy, POOL_INTERFACE))["DataTotal"] > 64 << 16:
            break
        await asyncio.sleep(0.05)
    grown = await props(client, roomy, POOL_INTERFACE)
    assert grown["DataTotal"] > 64 << 16 and grown["DataUsed"] == 60 << 16
    blocks = (await props(client, tight, POOL_INTERFACE))["DataTotal"] >> 16
    sim.write("tight-v", 0, (blocks - 2) * 128)
    low = await signal(client, tight, "LowSpace")
    assert low.body[0] == (blocks - 2) << 16 and low.body[1] == blocks << 16
    sim.write("tight-v", 0, blocks * 128)
    # Any change of the pool looks again (as its events do).
    _, job = await client.call(tight, POOL_INTERFACE, "CreateVolume", "sta{sv}",
                               ["w", GIB, {}])
    await finished(client, job)
    full = await signal(client, tight, "Full")
    assert full.body[:2] == [blocks << 16, blocks << 16]
    assert (await props(client, tight, POOL_INTERFACE))["Mode"] == "out-of-data-space"


async def test_used_bytes_follow_writes_at_the_next_change_of_that_volume(
        client: Client, dmd_session: Any, disks: list[str]) -> None:
    """Writes reach UsedBytes when the volume's device next changes (here a
    snapshot suspends and resumes it), or on the pool's events and timer; a
    change reads only the volumes it touched."""
    pool, job = await create_pool(client, "tank", disks[:1])
    await finished(client, job)
    volume, job = await client.call(pool, POOL_INTERFACE, "CreateVolume", "sta{sv}",
                                    ["v", GIB, {}])
    await finished(client, job)
    assert (await props(client, volume, VOLUME_INTERFACE))["UsedBytes"] == 0
    SimDM(dmd_session.sim).write("tank-v", 0, 10 * 128)  # ten 64 KiB blocks
    snap, job = await client.call(volume, VOLUME_INTERFACE, "Snapshot", "sa{sv}",
                                  ["v.snap", {}])
    await finished(client, job)
    assert (await props(client, volume, VOLUME_INTERFACE))["UsedBytes"] == 10 << 16
    assert (await props(client, snap, VOLUME_INTERFACE))["UsedBytes"] == 10 << 16


async def test_list_disks_says_what_a_pool_may_take(client: Client, disks: list[str]) -> None:
    _, job = await create_pool(client, "tank", disks[:1])
    await finished(client, job)
    (listed,) = await client.call(ROOT_PATH, MANAGER_INTERFACE, "ListDisks", "a{sv}", [{}])
    found = {path: (size, signature, busy) for path, size, signature, busy in listed}
    assert found[disks[0]] == (512 << 20, "dmd_pool", "a device of pool tank")
    assert found[disks[1]] == (512 << 20, "", "")
    assert found["/dev/simxfs"][1:] == ("xfs", "")


async def test_a_damaged_pool_is_shown_and_repaired_over_the_bus(
        client: Client, disks: list[str], dmd_session: Any) -> None:
    pool, job = await create_pool(client, "tank", disks[:1])
    await finished(client, job)
    volume, job = await client.call(pool, POOL_INTERFACE, "CreateVolume", "sta{sv}",
                                    ["v", GIB, {}])
    await finished(client, job)
    (job,) = await client.call(pool, POOL_INTERFACE, "Stop", "a{sv}", [{}])
    await finished(client, job)
    SimDM(dmd_session.sim).damage_metadata(disks[0], 4 << 20, superblock=True)  # after the header
    (job,) = await client.call(pool, POOL_INTERFACE, "Start", "a{sv}", [{}])
    end = await finished(client, job)
    assert (end["State"], end["ErrorName"]) == ("failed", "Corrupt"), end
    p = await props(client, pool, POOL_INTERFACE)
    assert p["Mode"] == "damaged" and "Repair" in p["ModeHelp"]
    assert "superblock" in p["ChangesRefused"]
    with pytest.raises(CallError) as refused:
        await client.call(pool, POOL_INTERFACE, "CreateVolume", "sta{sv}", ["w", GIB, {}])
    assert refused.value.short == "Corrupt"
    (job,) = await client.call(pool, POOL_INTERFACE, "Repair", "a{sv}", [{}])
    end = await finished(client, job)
    assert (end["State"], end["Operation"]) == ("completed", "pool-repair"), end
    assert end["Bytes"] == p["MetadataTotal"] > 0
    (job,) = await client.call(pool, POOL_INTERFACE, "Start", "a{sv}", [{}])
    await finished(client, job)
    p = await props(client, pool, POOL_INTERFACE)
    assert (p["Mode"], p["ChangesRefused"], p["State"]) == ("ok", "", "active")
    assert (await props(client, volume, VOLUME_INTERFACE))["State"] == "active"


async def test_sigterm_gives_jobs_a_grace_then_cancels_those_that_can_be_undone(
        dmd_session: Any, client: Client, disks: list[str], tmp_path: Path) -> None:
    """A stop must not wait on a mkfs that never ends (systemd would kill dmd
    and leave the undo to the next start): past --stop-grace, a job that can
    still be undone is cancelled, and dmd exits 0, nothing left of it. A job
    that ends within the grace is not cancelled."""
    pid_file = tmp_path / "mkfs.pid"
    tools = tmp_path / "tools"
    tools.mkdir()
    # Hangs once told to (the file *hang*); else a moment, then the real one.
    (tools / "mkfs.xfs").write_text(
        f"#!/bin/sh\necho $$ > {pid_file}\n"
        f"if [ -e {tools}/hang ]; then exec sleep 120; fi\n"
        "sleep 1\nexec /usr/sbin/mkfs.xfs \"$@\"\n")
    (tools / "mkfs.xfs").chmod(0o755)
    dmd_session.stop()
    dmd_session.env["PATH"] = f"{tools}:{dmd_session.env['PATH']}"
    dmd_session.extra += ["--stop-grace", "3"]
    dmd_session.start()
    pool, job = await create_pool(client, "tank", disks)
    await finished(client, job)

    async def create(name: str, also: str = "") -> tuple[str, float]:
        """CreateVolume *name*, SIGTERM once its mkfs runs; with *also*, a
        second CreateVolume waits for the pool meanwhile (the grace must not
        wait for it)."""
        pid_file.unlink(missing_ok=True)
        _, job = await client.call(pool, POOL_INTERFACE, "CreateVolume", "sta{sv}",
                                   [name, 1 << 30, {"filesystem": Variant("s", "xfs")}])
        while not pid_file.exists() or not pid_file.read_text().strip():
            await asyncio.sleep(0.02)
        if also:
            waiting = asyncio.ensure_future(client.call(
                pool, POOL_INTERFACE, "CreateVolume", "sta{sv}", [also, 1 << 30, {}]))
            await asyncio.sleep(0.5)
            assert not waiting.done()
        assert dmd_session.proc is not None
        started = time.monotonic()
        dmd_session.proc.terminate()
        code = await asyncio.get_running_loop().run_in_executor(None, dmd_session.proc.wait, 30)
        assert code == 0, dmd_session.log.read_text()
        took = time.monotonic() - started
        if also:  # answered once it had the pool: refused, or its job cancelled
            try:
                await waiting
            except CallError as exc:
                assert "dmd is stopping" in str(exc), exc
        return str(job), took

    _, took = await create("quick")  # mkfs ends within the grace: kept
    assert took < 3, f"dmd took {took:.1f} s to stop"
    (tools / "hang").touch()
    dmd_session.start()
    _, took = await create("stuck", also="waiting")
    mkfs = int(pid_file.read_text())
    assert 3 <= took < 15, f"dmd took {took:.1f} s to stop"
    assert not Path(f"/proc/{mkfs}").exists(), "mkfs outlived dmd"
    log = dmd_session.log.read_text()
    assert "(volume-create stuck): to be cancelled, dmd is stopping" in log, log

    (tools / "hang").unlink()
    dmd_session.start()
    names = {o[VOLUME_INTERFACE]["Name"] for o in (await objects(client)).values()
             if VOLUME_INTERFACE in o}
    assert names == {"quick"}
    devices = {o[DEVICE_INTERFACE]["Name"] for o in (await objects(client)).values()
               if DEVICE_INTERFACE in o}
    assert not any("stuck" in d for d in devices), devices
