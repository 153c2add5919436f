"""One pool with many thin volumes, on dmd --sim (host): GetManagedObjects,
a restart and a reboot's re-activation as the number of volumes grows.

Not a test: it measures. dmd --sim (file-backed simulator, SQLite) on a
private dbus-daemon; one pool on a 1 TiB simulated disk, volumes made over
the bus (16 CreateVolume jobs in flight). At each step of --steps:

1. GetManagedObjects, median of 5, per object; the largest step's cost per
   object over the smallest's (1.0: linear);
2. a restart: SIGTERM, then a new dmd until it owns its name and answers
   GetManagedObjects; against the same for a dmd with no pool (the ratio)
   and ``python -c "import dmd.daemon"`` (the interpreter and imports);
3. a reboot: dmd stopped, every device removed from the simulated kernel
   (a fresh kernel keeps the disks, not the devices), then a new dmd until
   every volume is active again.

    .venv/bin/python bench/scale.py [--steps 100,300,1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dbus_bench import Lab, dmd_command

from dmd.dbus.names import (
    BUS_NAME,
    JOB_INTERFACE,
    MANAGER_INTERFACE,
    OBJECT_MANAGER_INTERFACE,
    POOL_INTERFACE,
    ROOT_PATH,
)
from dmd.engine.sim import SimDM

ROOT = Path(__file__).resolve().parents[1]
DISK = "/dev/simdisk1"
IN_FLIGHT = 16


async def call(bus: MessageBus, path: str, interface: str, member: str, signature: str = "",
               body: list[Any] | None = None) -> list[Any]:
    reply = await bus.call(Message(destination=BUS_NAME, path=path, interface=interface,
                                   member=member, signature=signature, body=body or []))
    assert reply is not None
    if reply.message_type is MessageType.ERROR:
        raise RuntimeError(f"{member}: {reply.error_name}: {reply.body}")
    return list(reply.body)


async def connect(lab: Lab) -> MessageBus:
    return await MessageBus(bus_address=lab.address, bus_type=BusType.SESSION).connect()


async def wait_job(bus: MessageBus, job: str) -> None:
    (done,) = await call(bus, job, JOB_INTERFACE, "Wait", "d", [120.0])
    assert done, job


async def make_volumes(lab: Lab, pool: str, first: int, last: int) -> None:
    bus = await connect(lab)
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(i: int) -> None:
        async with gate:
            _, job = await call(bus, pool, POOL_INTERFACE, "CreateVolume", "sta{sv}",
                                [f"v{i:05d}", 64 << 20, {}])
            await wait_job(bus, job)

    try:
        await asyncio.gather(*(one(i) for i in range(first, last)))
    finally:
        bus.disconnect()


async def managed_objects(lab: Lab, times: int = 5) -> tuple[float, int]:
    bus = await connect(lab)
    try:
        took = []
        for _ in range(times):
            started = time.perf_counter()
            (objects,) = await call(bus, ROOT_PATH, OBJECT_MANAGER_INTERFACE,
                                    "GetManagedObjects")
            took.append(time.perf_counter() - started)
        return statistics.median(took), len(objects)
    finally:
        bus.disconnect()


def start(lab: Lab, sim: Path, state: Path) -> tuple[Any, float]:
    """A dmd, and the seconds until it owns its name and answers a
    GetManagedObjects."""
    started = time.perf_counter()
    proc, _ = lab.start(dmd_command(sim, state), BUS_NAME)
    asyncio.run(managed_objects(lab, times=1))
    return proc, time.perf_counter() - started


def active_volumes(sim: Path) -> int:
    return sum(1 for d in SimDM(sim).list_devices() if d.name.startswith("tank-v"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", default="100,300,1000")
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    lab = Lab()
    try:
        sim, state = lab.dir / "kernel.json", lab.dir / "state"
        SimDM(sim).add_disk(DISK, 7, 1, 1 << 31)  # 1 TiB
        imports = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import dmd.daemon"], check=True, cwd=ROOT)
        imports = time.perf_counter() - imports
        proc, empty_start = start(lab, sim, state)
        bus_loop = asyncio.new_event_loop()

        async def create_pool() -> str:
            bus = await connect(lab)
            try:
                pool, job = await call(bus, ROOT_PATH, MANAGER_INTERFACE, "CreatePool",
                                       "sasa{sv}", ["tank", [DISK], {}])
                await wait_job(bus, job)
                return str(pool)
            finally:
                bus.disconnect()

        pool = bus_loop.run_until_complete(create_pool())
        bus_loop.close()
        rows = []
        made = 0
        for step in steps:
            started = time.perf_counter()
            asyncio.run(make_volumes(lab, pool, made, step))
            create_rate = (step - made) / (time.perf_counter() - started)
            made = step
            gmo, objects = asyncio.run(managed_objects(lab))
            lab.stop(proc)
            proc, restart = start(lab, sim, state)
            lab.stop(proc)
            SimDM(sim).remove_all()
            assert active_volumes(sim) == 0
            rebooted = time.perf_counter()
            proc, _ = start(lab, sim, state)
            assert active_volumes(sim) == step, active_volumes(sim)
            reboot = time.perf_counter() - rebooted
            rows.append({"volumes": step, "objects": objects, "creates_per_s": create_rate,
                         "get_managed_objects_s": gmo, "per_object_us": gmo / objects * 1e6,
                         "restart_s": restart, "reboot_s": reboot})
        lab.stop(proc)
    finally:
        lab.close()
    first, last = rows[0], rows[-1]
    result = {"imports_s": imports, "empty_start_s": empty_start, "steps": rows,
              "per_object_last_over_first": last["per_object_us"] / first["per_object_us"]}
    print(f"python -c 'import dmd.daemon': {imports:.2f} s; dmd start with no pool "
          f"(name owned, GetManagedObjects answered): {empty_start:.2f} s")
    print(f"{'volumes':>8} {'objects':>8} {'creates/s':>10} {'GMO ms':>8} {'us/obj':>7} "
          f"{'restart s':>10} {'x empty':>8} {'reboot s':>9}")
    for row in rows:
        print(f"{row['volumes']:>8} {row['objects']:>8} {row['creates_per_s']:>10.0f} "
              f"{row['get_managed_objects_s'] * 1e3:>8.1f} {row['per_object_us']:>7.0f} "
              f"{row['restart_s']:>10.2f} {row['restart_s'] / empty_start:>8.2f} "
              f"{row['reboot_s']:>9.2f}")
    print(f"GetManagedObjects per object, {last['volumes']} volumes over {first['volumes']}: "
          f"{result['per_object_last_over_first']:.2f}x (1.0: linear)")
    out = ROOT / ".lab-results" / "bench-scale.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
