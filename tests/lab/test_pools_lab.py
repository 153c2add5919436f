"""Pools and volumes on the real kernel, through dmd as root on the lab's
system bus (busctl as the client), with data written and read back:

- a snapshot keeps the data its origin had, while the origin takes new data;
- dmd killed with SIGKILL while it snapshots a volume under write load comes
  back with the origin resumed, the snapshot whole (a point in time of the
  writes) or absent, and the pool's thin ids and transaction id as recorded;
- (a real reboot, with a pool grown by AddDevice: test_reboot_lab.py);
- bad input gets a named error and changes nothing;
- ImportPool after a crash between the description's copies, the state
  directory lost and the disks renumbered; then both copies broken on every
  device: the pool refused every change, its devices never written.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from lab_daemon import SystemDmd, dmsetup, suspended_attr, unfinished

from dmd.dbus.names import (
    BUS_NAME,
    ERROR_PREFIX,
    JOB_INTERFACE,
    MANAGER_INTERFACE,
    POOL_INTERFACE,
    ROOT_PATH,
    VOLUME_INTERFACE,
)

pytestmark = [pytest.mark.kernel, pytest.mark.kernel_volumes]

MIB = 1 << 20
BLOCK = 4096


def bus(*args: str, timeout: float = 120) -> Any:
    out = subprocess.run(["busctl", "--system", "--json=short", *args], capture_output=True,
                         text=True, timeout=timeout)
    if out.returncode != 0:
        raise BusError(out.stderr.strip())
    return json.loads(out.stdout)["data"] if out.stdout.strip() else None


class BusError(Exception):
    pass


def call(path: str, interface: str, member: str, signature: str, *args: str) -> Any:
    return bus("call", BUS_NAME, path, interface, member, signature, *args)


def error_of(path: str, interface: str, member: str, signature: str, body: list[Any]) -> str:
    """The D-Bus error name a call gets (busctl prints only the message)."""
    async def attempt() -> str:
        client = await MessageBus(bus_type=BusType.SYSTEM).connect()
        try:
            reply = await client.call(Message(destination=BUS_NAME, path=path,
                                              interface=interface, member=member,
                                              signature=signature, body=body))
        finally:
            client.disconnect()
        assert reply is not None
        return (reply.error_name or "").removeprefix(ERROR_PREFIX) \
            if reply.message_type is MessageType.ERROR else ""

    return asyncio.run(attempt())


def prop(path: str, interface: str, name: str) -> Any:
    return bus("get-property", BUS_NAME, path, interface, name)


def wait(job: str) -> None:
    assert call(job, JOB_INTERFACE, "Wait", "d", "120") == [True]
    state = prop(job, JOB_INTERFACE, "State")
    assert state == "completed", (state, prop(job, JOB_INTERFACE, "ErrorMessage"))


def create_pool(name: str, devices: list[str]) -> str:
    pool, job = call(ROOT_PATH, MANAGER_INTERFACE, "CreatePool", "sasa{sv}", name,
                     str(len(devices)), *devices, "0")
    wait(job)
    return str(pool)


def create_pool_forced(name: str, device: str) -> str:
    pool, job = call(ROOT_PATH, MANAGER_INTERFACE, "CreatePool", "sasa{sv}", name, "1",
                     device, "1", "force", "b", "true")
    wait(job)
    return str(pool)


def create_volume(pool: str, name: str, size: int) -> str:
    volume, job = call(pool, POOL_INTERFACE, "CreateVolume", "sta{sv}", name, str(size), "0")
    wait(job)
    return str(volume)


def snapshot(volume: str, name: str) -> tuple[str, str]:
    snap, job = call(volume, VOLUME_INTERFACE, "Snapshot", "sa{sv}", name, "0")
    return str(snap), str(job)


def write_pattern(device: str, seed: bytes, size: int) -> str:
    """Write *size* bytes made from *seed* (O_DIRECT, then fsync); their sha256."""
    data = b"".join(hashlib.sha256(seed + i.to_bytes(8, "little")).digest() * 128
                    for i in range(size // BLOCK))
    subprocess.run(["dd", f"of={device}", "bs=1M", "oflag=direct", "conv=fsync",
                    "status=none"], input=data, check=True)
    return hashlib.sha256(data).hexdigest()


def checksum(device: str, size: int) -> str:
    out = subprocess.run(["dd", f"if={device}", "bs=1M", f"count={size // MIB}",
                          "iflag=direct", "status=none"], capture_output=True, check=True)
    assert len(out.stdout) == size
    return hashlib.sha256(out.stdout).hexdigest()


def settle() -> None:
    subprocess.run(["udevadm", "settle", "--timeout=30"], check=False)


@pytest.fixture
def disks(loop_device: Callable[[int], str]) -> list[str]:
    return [loop_device(128), loop_device(128)]


def test_snapshot_keeps_the_data_of_its_moment(system_dmd: SystemDmd, disks: list[str]) -> None:
    pool = create_pool("dmdtp1", disks)
    volume = create_volume(pool, "data", 64 * MIB)
    device = prop(volume, VOLUME_INTERFACE, "DevicePath")
    assert device == "/dev/mapper/dmdtp1-data" and os.path.exists(device)
    first = write_pattern(device, b"first", 16 * MIB)
    snap, job = snapshot(volume, "data.1")
    wait(job)
    assert prop(snap, VOLUME_INTERFACE, "Origin") == volume
    second = write_pattern(device, b"second", 16 * MIB)
    assert first != second
    assert checksum(device, 16 * MIB) == second
    assert checksum("/dev/mapper/dmdtp1-data.1", 16 * MIB) == first
    # The kernel's view (dmsetup, a tool we did not write) matches the bus.
    status = dmsetup("status", "dmdtp1-tpool").split()
    assert int(status[3]) == prop(pool, POOL_INTERFACE, "TransactionId") == 2
    used = prop(volume, VOLUME_INTERFACE, "UsedBytes")
    assert used >= 16 * MIB, used
    assert dmsetup("table", "dmdtp1-data").split()[2] == "thin"
    # Delete the origin: the snapshot's data stays.
    settle()
    (job,) = call(volume, VOLUME_INTERFACE, "Delete", "a{sv}", "0")
    wait(job)
    assert checksum("/dev/mapper/dmdtp1-data.1", 16 * MIB) == first
    assert not os.path.exists(device)


WRITER = r"""
import mmap, os, struct, sys
path, blocks, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
buf = mmap.mmap(-1, 4096)
generation = 1
while not os.path.exists(stop):
    for index in range(blocks):
        buf.seek(0)
        buf.write(struct.pack("<QQ", generation, index) * 256)
        os.pwrite(fd, buf, index * 4096)
    generation += 1
"""


def generations(device: str, blocks: int) -> list[int]:
    """Each block's generation; every block must be whole (one record repeated)."""
    out = subprocess.run(["dd", f"if={device}", "bs=4096", f"count={blocks}", "iflag=direct",
                          "status=none"], capture_output=True, check=True).stdout
    found = []
    for index in range(blocks):
        block = out[index * BLOCK:(index + 1) * BLOCK]
        if block == bytes(BLOCK):  # the fill before the writer's first pass reached it
            found.append(0)
            continue
        generation, at = struct.unpack("<QQ", block[:16])
        assert block == block[:16] * 256 and at == index, f"block {index} is torn"
        found.append(generation)
    return found


def point_in_time(found: list[int]) -> bool:
    """A sequential writer's state at one moment: blocks 0..k of one pass,
    the rest of the pass before."""
    top = found[0]
    cut = next((i for i, g in enumerate(found) if g != top), len(found))
    return all(g == top - 1 for g in found[cut:]) and top >= 1


# Two crashes under one writer, each dmd armed for the next: at step 2 the
# origin is suspended, create_snap not sent (rolled back: no snapshot); at
# step 4 the snapshot and the new transaction id are in the pool's metadata,
# the origin still suspended (rolled forward).
def test_sigkill_while_snapshotting_a_volume_under_writes(stopped_dmd: SystemDmd,
                                                          disks: list[str],
                                                          tmp_path: Path) -> None:
    dmd = stopped_dmd
    dmd.start({"DMD_TEST_KILL_AT": "volume-snapshot:2"})  # not before the snapshot
    pool = create_pool("dmdtp2", disks)
    volume = create_volume(pool, "busy", 16 * MIB)
    device = "/dev/mapper/dmdtp2-busy"
    blocks = 16 * MIB // BLOCK
    subprocess.run(["dd", "if=/dev/zero", f"of={device}", "bs=1M", "count=16",
                    "oflag=direct", "status=none"], check=True)  # all mapped before the race
    stop = tmp_path / "stop"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, device, str(blocks), str(stop)])
    snap_device = Path("/dev/mapper/dmdtp2-busy.snap")
    try:
        for step, following in ((2, {"DMD_TEST_KILL_AT": "volume-snapshot:4"}), (4, None)):
            time.sleep(2)
            with contextlib.suppress(BusError):  # or the connection died with dmd first
                snapshot(volume, "busy.snap")  # the reply comes once accepted
            assert dmd.wait_exit() == -signal.SIGKILL
            attr = dmsetup("info", "-c", "--noheadings", "-o", "attr", "dmdtp2-busy")
            assert suspended_attr(attr), f"step {step}: the origin was not suspended ({attr})"
            dmd.start(following)
            attr = dmsetup("info", "-c", "--noheadings", "-o", "attr", "dmdtp2-busy")
            assert not suspended_attr(attr), f"step {step}: recovery left it suspended ({attr})"
            assert unfinished(dmd.state_dir) == 0
            volumes = {prop(p, VOLUME_INTERFACE, "Name") for p in volume_paths()}
            assert ("busy.snap" in volumes) == (step == 4) == snap_device.exists(), step
            status = dmsetup("status", "dmdtp2-tpool").split()
            assert int(status[3]) == prop(pool, POOL_INTERFACE, "TransactionId")
            assert kernel_thin_ids("dmdtp2") == recorded_thin_ids(dmd.state_dir)
        time.sleep(1)  # the writer goes on
    finally:
        stop.touch()
        writer.wait(timeout=120)
    assert writer.returncode == 0
    assert point_in_time(generations(device, blocks))
    assert point_in_time(generations(str(snap_device), blocks))


def kernel_thin_ids(pool: str) -> set[int]:
    """The thin ids in the pool's metadata, as thin_ls (thin-provisioning-tools)
    reads them from a metadata snapshot of the live pool."""
    dmsetup("message", f"{pool}-tpool", "0", "reserve_metadata_snap")
    try:
        out = subprocess.run(["thin_ls", "--no-headers", "-o", "DEV", "--metadata-snap",
                              f"/dev/mapper/{pool}-tmeta"], capture_output=True, text=True,
                             check=True).stdout
    finally:
        dmsetup("message", f"{pool}-tpool", "0", "release_metadata_snap")
    return {int(word) for word in out.split()}


def recorded_thin_ids(state_dir: Path) -> set[int]:
    with contextlib.closing(sqlite3.connect(state_dir / "dmd.sqlite3")) as db:
        return {int(row[0]) for row in db.execute("SELECT thin_id FROM volumes")}


def volume_paths() -> list[str]:
    out = subprocess.run(["busctl", "--system", "--list", "tree", BUS_NAME],
                         capture_output=True, text=True, check=True).stdout
    return [line.strip() for line in out.splitlines()
            if line.strip().startswith(ROOT_PATH + "/volumes/")]


def test_bad_input_is_refused_and_changes_nothing(system_dmd: SystemDmd, disks: list[str],
                                                  loop_device: Callable[[int], str],
                                                  tmp_path: Path) -> None:
    pool = create_pool("dmdtp4", disks[:1])
    volume = create_volume(pool, "taken", 8 * MIB)
    mounted = loop_device(32)
    subprocess.run(["mkfs.ext4", "-q", mounted], check=True)
    formatted = loop_device(32)
    subprocess.run(["mkfs.ext4", "-q", formatted], check=True)
    physical = loop_device(32)  # an LVM physical volume, made by LVM itself
    subprocess.run(["pvcreate", "-q", physical], check=True, capture_output=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", mounted, str(mnt)], check=True)
    try:
        before = dmsetup("table")
        cases: list[tuple[tuple[str, str, str, str, list[Any]], str]] = [
            ((ROOT_PATH, MANAGER_INTERFACE, "CreatePool", "sasa{sv}",
              ["dmdtp5", [mounted], {}]), "Busy"),
            ((ROOT_PATH, MANAGER_INTERFACE, "CreatePool", "sasa{sv}",
              ["dmdtp5", [formatted], {}]), "Busy"),
            ((ROOT_PATH, MANAGER_INTERFACE, "CreatePool", "sasa{sv}",
              ["dmdtp5", [disks[0]], {}]), "Busy"),
            ((ROOT_PATH, MANAGER_INTERFACE, "CreatePool", "sasa{sv}",
              ["dmdtp5", [physical], {}]), "Busy"),
            ((ROOT_PATH, MANAGER_INTERFACE, "CreatePool", "sasa{sv}",
              ["dmdtp5", ["/etc/passwd"], {}]), "InvalidArgument"),
            ((ROOT_PATH, MANAGER_INTERFACE, "CreatePool", "sasa{sv}",
              ["dmdtp5", ["/dev/null"], {}]), "InvalidArgument"),
            ((pool, POOL_INTERFACE, "CreateVolume", "sta{sv}", ["v", 0, {}]),
             "InvalidArgument"),
            ((pool, POOL_INTERFACE, "CreateVolume", "sta{sv}", ["v", 1 << 63, {}]),
             "InvalidArgument"),
            ((volume, VOLUME_INTERFACE, "Snapshot", "sa{sv}", ["taken", {}]), "AlreadyExists"),
            ((ROOT_PATH, MANAGER_INTERFACE, "GetPool", "s", ["nosuch"]), "NotFound"),
        ]
        for args, error in cases:
            assert error_of(*args) == error, args
            assert dmsetup("table") == before, args
        # With force, a signature is no obstacle (a mounted filesystem still is).
        assert error_of(ROOT_PATH, MANAGER_INTERFACE, "CreatePool", "sasa{sv}",
                        ["dmdtp5", [mounted], {"force": Variant("b", True)}]) == "Busy"
        forced = create_pool_forced("dmdtp5", formatted)
        (job,) = call(forced, POOL_INTERFACE, "Destroy", "a{sv}", "0")
        wait(job)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        subprocess.run(["pvremove", "-q", "-y", physical], check=False, capture_output=True)


# One dmd after another, each armed for the next crash and each recovering
# from the one before (a start costs ~15 s under emulation): volume-create 2
# (create_thin sent, the transaction not moved: undone), volume-create 4
# (recorded, its device next: finished), volume-delete 2 (the device removed,
# the thin's delete next: finished, a delete rolls forward once its device
# is gone).
CRASHES = [("volume-create", 2, False), ("volume-create", 4, True),
           ("volume-delete", 2, False)]


@pytest.mark.kernel_volumes_last  # the boots' balance: docs/kernel-lab.md
def test_sigkill_during_volume_create_and_delete(stopped_dmd: SystemDmd,
                                                 disks: list[str]) -> None:
    dmd = stopped_dmd
    # "keep" is the first volume-create: the first crash is at the second.
    dmd.start({"DMD_TEST_KILL_AT": "volume-create:2:2"})
    pool = create_pool("dmdtp6", disks[:1])
    keep = create_volume(pool, "keep", 8 * MIB)
    kept = write_pattern("/dev/mapper/dmdtp6-keep", b"keep", 4 * MIB)
    settle()
    for number, (operation, step, exists_after) in enumerate(CRASHES):
        with contextlib.suppress(BusError):  # the connection dies with dmd
            if operation == "volume-create":
                call(pool, POOL_INTERFACE, "CreateVolume", "sta{sv}", "victim",
                     str(8 * MIB), "0")
            else:
                call(volume_path_of("victim"), VOLUME_INTERFACE, "Delete", "a{sv}", "0")
        assert dmd.wait_exit() == -signal.SIGKILL, (operation, step)
        following = CRASHES[number + 1] if number + 1 < len(CRASHES) else None
        dmd.start({"DMD_TEST_KILL_AT": f"{following[0]}:{following[1]}"} if following
                  else None)
        case = f"after the crash at {operation}:{step}"
        assert unfinished(dmd.state_dir) == 0, case
        names = {prop(p, VOLUME_INTERFACE, "Name") for p in volume_paths()}
        assert ("victim" in names) == exists_after == \
            Path("/dev/mapper/dmdtp6-victim").exists(), case
        assert checksum("/dev/mapper/dmdtp6-keep", 4 * MIB) == kept, case
        status = dmsetup("status", "dmdtp6-tpool").split()
        assert int(status[3]) == prop(pool, POOL_INTERFACE, "TransactionId"), case
        assert kernel_thin_ids("dmdtp6") == recorded_thin_ids(dmd.state_dir), case
    create_volume(pool, "after", 8 * MIB)
    assert prop(keep, VOLUME_INTERFACE, "State") == "active"


def volume_path_of(name: str) -> str:
    return next(p for p in volume_paths() if prop(p, VOLUME_INTERFACE, "Name") == name)


def description_copies(device: str) -> list[int | None]:
    """The generation of each description copy on *device* (None: not whole)."""
    from dmd.state.pool_description import HEADER_BYTES, Description, read_device

    with open(device, "rb") as f:
        reading = read_device(device, f.read(HEADER_BYTES))
    return [c.generation if isinstance(c, Description) else None for c in reading.copies]


def header_bytes(device: str) -> str:
    """The SHA-256 of a pool device's reserved 4 MiB."""
    with open(device, "rb") as f:
        return hashlib.sha256(f.read(4 * MIB)).hexdigest()


@pytest.mark.kernel_volumes_late  # the boots' balance: docs/kernel-lab.md
def test_import_after_a_crash_between_copies_the_state_lost_and_the_disks_renumbered(
        stopped_dmd: SystemDmd, tmp_path: Path) -> None:
    from dmd.state.pool_description import COPY_OFFSETS

    dmd = stopped_dmd
    images = [tmp_path / "a.img", tmp_path / "b.img"]
    for image in images:
        with open(image, "wb") as f:
            f.truncate(128 * MIB)
    attached: list[str] = []

    def attach(image: Path) -> str:
        device = subprocess.run(["losetup", "-f", "--show", str(image)], check=True,
                                capture_output=True, text=True).stdout.strip()
        attached.append(device)
        return device

    try:
        a, b = attach(images[0]), attach(images[1])
        # The 7th description written (the snapshot's last) is cut between its
        # copies: the pool's, then each create's and the snapshot's first
        # (naming the operation under way) and last.
        dmd.start({"DMD_TEST_KILL_AT": "pool-describe:1:7"})
        pool = create_pool("dmdtp7", [a, b])
        one = create_volume(pool, "one", 16 * MIB)
        create_volume(pool, "two", 16 * MIB)
        sums = {name: write_pattern(f"/dev/mapper/dmdtp7-{name}", name.encode(), 8 * MIB)
                for name in ("one", "two")}
        with contextlib.suppress(BusError):
            wait(snapshot(one, "one.snap")[1])
        assert dmd.wait_exit() == -signal.SIGKILL
        sums["one.snap"] = sums["one"]
        for device in (a, b):
            new, old = description_copies(device)
            assert new is not None and old is not None and new > old, (device, new, old)
        dmd.start()  # recovery: copy B rewritten from A
        for device in (a, b):
            new, old = description_copies(device)
            assert new == old is not None, (device, new, old)
        dmd.stop()
        # A reboot, the state directory lost, the disks back under each
        # other's names, and one copy torn on one of them.
        for name in ("one.snap", "one", "two", "tpool", "tdata", "tmeta"):
            dmsetup("remove", f"dmdtp7-{name}")
        shutil.rmtree(dmd.state_dir)
        for device in (a, b):
            subprocess.run(["losetup", "-d", device], check=True)
        attached.clear()
        b2, a2 = attach(images[1]), attach(images[0])
        assert (a2, b2) == (b, a), "the loop devices were not renumbered"
        subprocess.run(["dd", "if=/dev/urandom", f"of={a2}", "bs=512", "count=8",
                        f"seek={COPY_OFFSETS[0] // 512 + 1}", "conv=notrunc,fsync",
                        "status=none"], check=True)
        assert description_copies(a2)[0] is None
        dmd.start()
        imported, job = call(ROOT_PATH, MANAGER_INTERFACE, "ImportPool", "asa{sv}", "2",
                             b2, a2, "0")
        wait(job)
        assert prop(imported, POOL_INTERFACE, "Devices") == [a2, b2]
        for name, expected in sums.items():
            assert checksum(f"/dev/mapper/dmdtp7-{name}", 8 * MIB) == expected, name
        new, old = description_copies(a2)
        assert new == old is not None  # the torn copy repaired
        status = dmsetup("status", "dmdtp7-tpool").split()
        assert int(status[3]) == prop(imported, POOL_INTERFACE, "TransactionId") == 3
        assert kernel_thin_ids("dmdtp7") == recorded_thin_ids(dmd.state_dir) == {0, 1, 2}
        # Both copies broken on every device: the pool is refused every
        # change and nothing is written over what is left.
        dmd.stop()
        for device in (a2, b2):
            for offset in COPY_OFFSETS:
                subprocess.run(["dd", "if=/dev/urandom", f"of={device}", "bs=512", "count=1",
                                f"seek={offset // 512}", "conv=notrunc,fsync", "status=none"],
                               check=True)
        broken = {device: header_bytes(device) for device in (a2, b2)}
        dmd.start()
        refused = prop(imported, POOL_INTERFACE, "ChangesRefused")
        assert "description" in refused, refused
        assert error_of(imported, POOL_INTERFACE, "CreateVolume", "sta{sv}",
                        ["w", 16 * MIB, {}]) == "Busy"
        assert error_of(imported, POOL_INTERFACE, "Destroy", "a{sv}",
                        [{"force": Variant("b", True)}]) == "Busy"  # it would wipe them
        assert {device: header_bytes(device) for device in (a2, b2)} == broken
        for name, expected in sums.items():
            assert checksum(f"/dev/mapper/dmdtp7-{name}", 8 * MIB) == expected, name
    finally:
        dmd.stop()
        for name in ("one.snap", "one", "two", "tpool", "tdata", "tmeta"):
            subprocess.run(["dmsetup", "remove", f"dmdtp7-{name}"], capture_output=True)
        for device in attached:
            subprocess.run(["losetup", "-d", device], check=False)
