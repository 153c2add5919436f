"""Other tools change the kernel behind dmd's back; the bus follows.

dmd runs as root on the lab's system bus with the real kernel and udevd.
Most tests run it with its timers off (--audit-interval 0 --sync-interval 0),
so what they see came from the kernel's events and udev's uevents alone; a
suspend and a bare table load raise neither, and are found by the audit.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus
from lab_daemon import SystemDmd, dmsetup, install_policy

from dmd.dbus.names import (
    BUS_NAME,
    DEVICE_INTERFACE,
    MANAGER_INTERFACE,
    OBJECT_MANAGER_INTERFACE,
    ROOT_PATH,
)
from dmd.engine import DM, DmFlags, TargetLine, UdevSync
from tests.helpers import plain

pytestmark = pytest.mark.kernel

T = "dmdtest-"


class Watcher:
    """A client on the system bus that keeps every signal dmd sends."""

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus
        self.signals: list[Message] = []
        bus.add_message_handler(self._keep)

    def _keep(self, msg: Message) -> None:
        if msg.message_type is MessageType.SIGNAL:
            self.signals.append(msg)

    async def call(self, path: str, interface: str, member: str, signature: str = "",
                   body: list[Any] | None = None, destination: str = BUS_NAME) -> list[Any]:
        reply = await self.bus.call(Message(destination=destination, path=path,
                                            interface=interface, member=member,
                                            signature=signature, body=body or []))
        assert reply is not None
        assert reply.message_type is MessageType.METHOD_RETURN, (reply.error_name, reply.body)
        return list(reply.body)

    async def objects(self) -> dict[str, dict[str, Any]]:
        """Name -> properties of every device object."""
        (managed,) = await self.call(ROOT_PATH, OBJECT_MANAGER_INTERFACE, "GetManagedObjects")
        out = {}
        for path, interfaces in managed.items():
            props = {k: plain(v.value) for k, v in interfaces[DEVICE_INTERFACE].items()}
            props["path"] = path
            out[props["Name"]] = props
        return out

    async def until(self, predicate: Callable[[dict[str, dict[str, Any]]], bool],
                    timeout: float = 60.0) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            objects = await self.objects()
            if predicate(objects):
                return objects
            assert time.monotonic() < deadline, f"timed out; the bus shows {sorted(objects)}"
            await asyncio.sleep(0.1)



def start_dmd(tmp_path: Path, *args: str) -> SystemDmd:
    install_policy()
    dmd = SystemDmd(tmp_path / "state", tmp_path / "dmd.log")
    dmd.start(args=args)
    return dmd


@pytest.fixture
def quiet_dmd(clean_dm: DM, tmp_path: Path) -> Iterator[SystemDmd]:
    """dmd with audits off: only events move the bus."""
    dmd = start_dmd(tmp_path, "--audit-interval", "0", "--sync-interval", "0")
    try:
        yield dmd
    finally:
        dmd.stop()


@pytest.fixture
async def watcher() -> AsyncIterator[Watcher]:
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    w = Watcher(bus)
    await w.call("/org/freedesktop/DBus", "org.freedesktop.DBus", "AddMatch", "s",
                 [f"type='signal',sender='{BUS_NAME}'"], destination="org.freedesktop.DBus")
    yield w
    bus.disconnect()


def kernel_names() -> set[str]:
    out = dmsetup("ls")
    return set() if out.startswith("No devices") else {line.split()[0]
                                                       for line in out.splitlines()}


async def test_dmsetup_changes_each_reach_the_bus(quiet_dmd: SystemDmd,
                                                  watcher: Watcher) -> None:
    dmsetup("create", T + "ext", "--table", "0 64 zero")
    objects = await watcher.until(lambda o: T + "ext" in o and o[T + "ext"]["LiveTable"])
    ext = objects[T + "ext"]
    assert not ext["Managed"] and ext["LiveTable"] == [[0, 64, "zero", ""]]
    # udev's view comes with it: dmsetup asks udev for the full rules.
    objects = await watcher.until(lambda o: o[T + "ext"]["UdevReady"])
    assert f"/dev/disk/by-id/dm-name-{T}ext" in objects[T + "ext"]["Symlinks"]

    dmsetup("rename", T + "ext", T + "ren")
    objects = await watcher.until(lambda o: T + "ren" in o and T + "ext" not in o)
    assert objects[T + "ren"]["path"] == ext["path"]  # the same object, renamed

    # reload = load + resume: the swap raises a kernel event.
    dmsetup("reload", T + "ren", "--table", "0 128 error")
    dmsetup("resume", T + "ren")
    objects = await watcher.until(
        lambda o: o[T + "ren"]["LiveTable"] == [[0, 128, "error", ""]])
    assert objects[T + "ren"]["Size"] == 128 * 512

    dmsetup("remove", T + "ren")
    await watcher.until(lambda o: T + "ren" not in o)
    removed = [s for s in watcher.signals if s.member == "InterfacesRemoved"]
    assert [s.body[0] for s in removed] == [ext["path"]]


async def test_suspend_and_load_by_others_are_found_by_the_audit(
        clean_dm: DM, tmp_path: Path, watcher: Watcher) -> None:
    dmd = start_dmd(tmp_path, "--audit-interval", "1")
    try:
        dmsetup("create", T + "aud", "--table", "0 64 zero")
        await watcher.until(lambda o: T + "aud" in o)
        dmsetup("suspend", T + "aud")
        await watcher.until(lambda o: o[T + "aud"]["Suspended"])
        dmsetup("load", T + "aud", "--table", "0 64 error")
        await watcher.until(lambda o: o[T + "aud"]["InactiveTable"] == [[0, 64, "error", ""]])
        dmsetup("resume", T + "aud")
        objects = await watcher.until(lambda o: not o[T + "aud"]["Suspended"])
        assert objects[T + "aud"]["LiveTable"] == [[0, 64, "error", ""]]
    finally:
        dmd.stop()


async def test_a_managed_device_changed_outside_is_flagged_drifted(
        quiet_dmd: SystemDmd, watcher: Watcher) -> None:
    await watcher.call(ROOT_PATH, MANAGER_INTERFACE, "CreateDevice", "sa(ttss)a{sv}",
                       [T + "mine", [[0, 64, "zero", ""]], {}])
    dmsetup("reload", T + "mine", "--table", "0 64 error")
    dmsetup("resume", T + "mine")
    objects = await watcher.until(lambda o: o[T + "mine"]["Drifted"])
    assert objects[T + "mine"]["LiveTable"] == [[0, 64, "error", ""]]  # not "fixed"
    assert dmsetup("table", T + "mine") == "0 64 error"


@pytest.mark.timeout(900)  # 120-330 s on the CI machine
async def test_storm_of_500_external_creates_then_removes(quiet_dmd: SystemDmd,
                                                          watcher: Watcher) -> None:
    """Another tool makes 500 devices as fast as the kernel takes them (raw
    ioctls, no waiting for udev), then removes them: the bus ends equal to
    `dmsetup ls` each time."""
    names = [f"{T}storm{i:03}" for i in range(500)]
    with DM(udev_sync=UdevSync.NONE) as other:
        for name in names:
            other.device_create(name)
            other.table_load(name, [TargetLine(0, 8, "zero", "")])
            other.device_suspend(name, DmFlags(0))
        objects = await watcher.until(lambda o: set(names) <= set(o), timeout=600)
        assert set(objects) == kernel_names()
        for name in names:
            other.device_remove(name)
    objects = await watcher.until(lambda o: not set(names) & set(o), timeout=600)
    assert set(objects) == kernel_names()
    subprocess.run(["udevadm", "settle", "--timeout=600"], check=False)


async def test_udev_overflow_is_recovered(clean_dm: DM, tmp_path: Path,
                                          watcher: Watcher) -> None:
    """A receive buffer of a few KiB overflows in a storm of 100 devices: dmd
    says so and audits, and ends agreeing with the kernel."""
    dmd = start_dmd(tmp_path, "--audit-interval", "0", "--sync-interval", "0",
                    "--udev-buffer", "4096")
    names = [f"{T}ovf{i:03}" for i in range(100)]
    try:
        subprocess.run(["udevadm", "control", "--stop-exec-queue"], check=True)
        with DM(udev_sync=UdevSync.NONE) as other:
            for name in names:
                other.device_create(name)
                other.table_load(name, [TargetLine(0, 8, "zero", "")])
                other.device_suspend(name, DmFlags(0))
            # Let udev go: 100 processed uevents arrive at once.
            subprocess.run(["udevadm", "control", "--start-exec-queue"], check=True)
            subprocess.run(["udevadm", "settle", "--timeout=300"], check=False)
            objects = await watcher.until(lambda o: set(names) <= set(o), timeout=300)
            assert set(objects) == kernel_names()
            assert "udev monitor overflowed" in dmd.log.read_text()
            for name in names:
                other.device_remove(name)
        await watcher.until(lambda o: not set(names) & set(o), timeout=300)
        assert dmd.proc is not None and dmd.proc.poll() is None
    finally:
        subprocess.run(["udevadm", "control", "--start-exec-queue"], check=False)
        dmd.stop()


async def test_thin_pool_low_water_mark_raises_event(
        quiet_dmd: SystemDmd, watcher: Watcher, loop_device: Callable[[int], str]) -> None:
    meta, data = loop_device(8), loop_device(64)
    # 64 KiB blocks: 1,024 of them; the pool reports an event when fewer than
    # 1,016 are free, i.e. after 8 blocks (512 KiB) are written.
    dmsetup("create", T + "pool", "--table",
            f"0 131072 thin-pool {meta} {data} 128 1016 1 skip_block_zeroing")
    dmsetup("message", T + "pool", "0", "create_thin 0")
    dmsetup("create", T + "thin", "--table", f"0 131072 thin /dev/mapper/{T}pool 0")
    pool = (await watcher.until(lambda o: T + "pool" in o))[T + "pool"]
    before = pool["EventNumber"]
    subprocess.run(["dd", "if=/dev/urandom", f"of=/dev/mapper/{T}thin", "bs=1M", "count=2",
                    "oflag=direct"], check=True, capture_output=True)
    objects = await watcher.until(lambda o: o[T + "pool"]["EventNumber"] > before)
    events = [s for s in watcher.signals
              if s.member == "Event" and s.path == pool["path"]]
    assert events, "no Event signal on the pool"
    event_nr, status = events[-1].body
    assert event_nr == objects[T + "pool"]["EventNumber"]
    assert status[0][2] == "thin-pool"
    used = int(re.split(r"[ /]", status[0][3])[3])  # transaction, metadata u/t, data used
    assert used >= 8
    # and the typed status reads the same pool
    (typed,) = await watcher.call(pool["path"], DEVICE_INTERFACE, "GetTypedStatus", "a{sv}",
                                  [{}])
    assert typed[0]["target"].value == "thin-pool"
    assert typed[0]["used-data-blocks"].value >= 8
    assert typed[0]["total-data-blocks"].value == 1024
    dmsetup("remove", T + "thin")
    dmsetup("remove", T + "pool")


async def test_killing_udevd_is_survived(quiet_dmd: SystemDmd, watcher: Watcher) -> None:
    """Without udevd, kernel events still bring devices (without udev's view);
    once udevd is back, new devices get it again."""
    subprocess.run(["udevadm", "control", "--exit"], check=True, timeout=60)
    try:
        with DM(udev_sync=UdevSync.NONE) as other:
            other.device_create(T + "noudev")
            other.table_load(T + "noudev", [TargetLine(0, 8, "zero", "")])
            other.device_suspend(T + "noudev", DmFlags(0))
        objects = await watcher.until(lambda o: T + "noudev" in o)
        assert not objects[T + "noudev"]["UdevReady"]
    finally:
        subprocess.run(["/lib/systemd/systemd-udevd", "--daemon"], check=True)
    subprocess.run(["udevadm", "settle", "--timeout=120"], check=False)
    dmsetup("create", T + "udevback", "--table", "0 8 zero")
    objects = await watcher.until(lambda o: T + "udevback" in o and o[T + "udevback"]["UdevReady"])
    assert f"/dev/disk/by-id/dm-name-{T}udevback" in objects[T + "udevback"]["Symlinks"]
    assert quiet_dmd.proc is not None and quiet_dmd.proc.poll() is None
    dmsetup("remove", T + "udevback")
    with DM(udev_sync=UdevSync.NONE) as other:
        other.device_remove(T + "noudev")
    await watcher.until(lambda o: T + "noudev" not in o and T + "udevback" not in o)


async def test_raid1_leg_failing_on_flakey_raises_event(
        quiet_dmd: SystemDmd, watcher: Watcher, loop_device: Callable[[int], str]) -> None:
    """A raid1 whose second leg is a dm-flakey device that fails all I/O: the
    first resync write fails, md marks the leg dead and dm-raid raises an
    event, which reaches the bus as Event with the raid's status."""
    a, b = loop_device(16), loop_device(16)
    dmsetup("create", T + "flaky", "--table", f"0 32768 flakey {b} 0 0 1")
    dmsetup("create", T + "raid", "--table",
            f"0 16384 raid raid1 3 0 region_size 1024 2 - {a} - /dev/mapper/{T}flaky")
    objects = await watcher.until(lambda o: T + "raid" in o)
    raid_path = objects[T + "raid"]["path"]

    def dead_leg(o: dict[str, dict[str, Any]]) -> bool:
        return any(s.member == "Event" and s.path == raid_path and
                   s.body[1][0][3].split()[2] == "AD" for s in watcher.signals)

    objects = await watcher.until(dead_leg, timeout=120)
    assert objects[T + "raid"]["EventNumber"] >= 1
    (typed,) = await watcher.call(raid_path, DEVICE_INTERFACE, "GetTypedStatus", "a{sv}", [{}])
    assert typed[0]["health"].value == "AD"
    dmsetup("remove", T + "raid")
    dmsetup("remove", T + "flaky")
