"""Many thin volumes in the kernel lab: dmd's re-activation after a reboot,
and its restart, against LVM's ``vgchange -ay`` of as many thin volumes.

Not a test: it measures. Run it with ``bench/run-scale`` (boots the lab once
and runs this inside, as root, with udevd and a system bus). Under emulation
only ratios between programs of the same boot mean anything.

On two loop devices of the same size, one each: LVM (a volume group with a
thin pool and N thin volumes made inactive by ``lvcreate -an``; archives and
backups off and a filter to its one disk, they only slow the making) and
dmd (a pool and N volumes made over the bus, one client, 4 calls in flight). Then:

  reboot     LVM: ``vgchange -an``, then ``vgchange -ay`` timed until it
             returns (its devices made, udev done);
             dmd: stopped, every dm device removed (what a fresh kernel has),
             then a new dmd timed until it owns its name with every volume's
             device there;
  restart    dmd stopped and started with its devices up, until it owns its
             name and answers GetManagedObjects; against the same for a dmd
             with no pool at the start of the run;
  objects    GetManagedObjects with N volumes, per object.

Written to .lab-results/bench-scale.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import BUS_NAME, DMD_LOG, JOB, MANAGER, POOL, ROOT, ROOT_PATH, Dmd, loop, run, settle

VG = "dmdscalevg"
# Every thin device takes metadata blocks of its own, mapped or not (the
# root of its mapping tree): both pools' default metadata (2 and 4 MiB for a
# 1 GiB pool) is full at ~650 volumes. Both get the same.
METADATA_MIB = 16
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"


def lvm_config(device: str) -> str:
    """LVM at its fastest: it looks at its one disk only (without a filter each
    command scans every dm device, a thousand of them by the end), and keeps no
    metadata archives or backups."""
    return (f'devices {{ filter = [ "a|^{device}$|", "r|.*|" ] }} '
            "backup { backup = 0 archive = 0 }")


def lvm_side(device: str, n: int) -> dict[str, float]:
    config = lvm_config(device)

    def lvm(*args: str) -> None:
        run("lvm", *args, "--quiet", "--config", config)

    # The volume group's metadata grows by ~1 KiB a volume: LVM's default
    # 1 MiB metadata area is full at ~650 of them.
    lvm("pvcreate", "--metadatasize", "16m", device)
    lvm("vgcreate", VG, device)
    lvm("lvcreate", "-T", "-L", "1G", "--poolmetadatasize", f"{METADATA_MIB}m", "-n", "pool", VG)
    started = time.perf_counter()
    # Made inactive: the pool's create message is sent all the same, and the
    # making does not wait on udev for each of a thousand devices (only the
    # activation below is compared with dmd's).
    for i in range(n):
        lvm("lvcreate", "-an", "-T", "-V", "64M", "-n", f"lv{i}", f"{VG}/pool")
    made = time.perf_counter() - started
    lvm("vgchange", "-an", VG)
    settle()
    started = time.perf_counter()
    lvm("vgchange", "-ay", VG)
    activate = time.perf_counter() - started
    missing = [i for i in range(n) if not os.path.exists(f"/dev/mapper/{VG}-lv{i}")]
    assert not missing, f"vgchange -ay left {len(missing)} volumes without a device"
    lvm("vgchange", "-an", VG)
    settle()
    return {"create_s": made / n, "vgchange_ay_s": activate}


async def call(bus: MessageBus, path: str, interface: str, member: str, signature: str = "",
               body: list[Any] | None = None) -> list[Any]:
    reply = await bus.call(Message(destination=BUS_NAME, path=path, interface=interface,
                                   member=member, signature=signature, body=body or []))
    assert reply is not None
    if reply.message_type is MessageType.ERROR:
        raise RuntimeError(f"{member}: {reply.error_name}: {reply.body}")
    return list(reply.body)


async def make_dmd_volumes(device: str, n: int) -> float:
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    try:
        pool, job = await call(bus, ROOT_PATH, MANAGER, "CreatePool", "sasa{sv}",
                               ["scale", [device],
                                {"metadata-size": Variant("t", METADATA_MIB << 20)}])
        assert (await call(bus, job, JOB, "Wait", "d", [300.0])) == [True]
        gate = asyncio.Semaphore(4)

        async def one(i: int) -> None:
            async with gate:
                _, job = await call(bus, pool, POOL, "CreateVolume", "sta{sv}",
                                    [f"v{i}", 64 << 20, {}])
                assert (await call(bus, job, JOB, "Wait", "d", [300.0])) == [True]

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return (time.perf_counter() - started) / n
    finally:
        bus.disconnect()


async def managed_objects() -> tuple[float, int]:
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    try:
        started = time.perf_counter()
        (objects,) = await call(bus, ROOT_PATH, OBJECT_MANAGER, "GetManagedObjects")
        return time.perf_counter() - started, len(objects)
    finally:
        bus.disconnect()


def timed_start(dmd: Dmd) -> float:
    started = time.perf_counter()
    dmd.start()
    asyncio.run(managed_objects())
    return time.perf_counter() - started


def dmd_side(device: str, n: int, work: Path) -> dict[str, float]:
    dmd = Dmd(work / "state")
    empty = timed_start(dmd)
    figures: dict[str, float] = {"empty_start_s": empty}
    try:
        figures["create_s"] = asyncio.run(make_dmd_volumes(device, n))
        gmo, objects = asyncio.run(managed_objects())
        figures.update(get_managed_objects_s=gmo, objects=objects)
        dmd.stop()
        figures["restart_s"] = timed_start(dmd)
        dmd.stop()
        run("dmsetup", "remove_all")  # LVM's volume group is inactive by now
        assert not [line for line in run("dmsetup", "ls").splitlines() if "scale" in line]
        started = time.perf_counter()
        dmd.start()
        missing = [i for i in range(n) if not os.path.exists(f"/dev/mapper/scale-v{i}")]
        figures["reboot_s"] = time.perf_counter() - started
        assert not missing, f"dmd left {len(missing)} volumes without a device"
    finally:
        dmd.stop()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="thin volumes on each side")
    args = parser.parse_args()
    DMD_LOG.parent.mkdir(exist_ok=True)
    DMD_LOG.write_text("")
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    lvm_disk, dmd_disk = loop(work, "lvm", 1200), loop(work, "dmd", 1200)
    try:
        print(f"LVM: {args.n} thin volumes, vgchange -an / -ay ...", flush=True)
        lvm_figures = lvm_side(lvm_disk, args.n)
        print(f"dmd: {args.n} volumes, restart, reboot ...", flush=True)
        dmd_figures = dmd_side(dmd_disk, args.n, work)
    finally:
        settle()
        subprocess.run(["dmsetup", "remove_all"], check=False)
        for disk in (lvm_disk, dmd_disk):
            subprocess.run(["losetup", "-d", disk], check=False)
    reboot_ratio = dmd_figures["reboot_s"] / lvm_figures["vgchange_ay_s"]
    print(f"\n{args.n} thin volumes (one lab boot)")
    print(f"  making one:   LVM lvcreate {lvm_figures['create_s']:.2f} s, "
          f"dmd CreateVolume {dmd_figures['create_s']:.2f} s")
    print(f"  reboot:       LVM vgchange -ay {lvm_figures['vgchange_ay_s']:.1f} s, "
          f"dmd start to every device {dmd_figures['reboot_s']:.1f} s ({reboot_ratio:.2f}x)")
    print(f"  restart:      dmd {dmd_figures['restart_s']:.1f} s, "
          f"with no pool {dmd_figures['empty_start_s']:.1f} s "
          f"({dmd_figures['restart_s'] / dmd_figures['empty_start_s']:.2f}x)")
    print(f"  GetManagedObjects: {dmd_figures['get_managed_objects_s'] * 1e3:.0f} ms for "
          f"{dmd_figures['objects']:.0f} objects")
    out = ROOT / ".lab-results" / "bench-scale.json"
    out.write_text(json.dumps({"n": args.n, "lvm": lvm_figures, "dmd": dmd_figures,
                               "reboot_over_vgchange": reboot_ratio}, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
