"""Service-layer figures on the simulator (not a test).

    .venv/bin/python bench/service_bench.py [--ops 300] [--devices 1000 10000]

1. Journaling cost: create+remove of N devices through the service with the
   durable SQLite journal, against the same service with the intent calls
   made no-ops (records still written), in the same run.
2. Start-up recovery time with N managed devices (SimDM file + SQLite file),
   nothing to repair: the cost of the scan itself.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from dmd.engine import TargetLine
from dmd.engine.sim import SimDM
from dmd.service.devices.operations import DeviceService
from dmd.service.devices.recovery import recover
from dmd.service.kernel import KernelWorkers
from dmd.state import AsyncStateStore, DeviceRecord, StateStore

ZERO = [TargetLine(0, 2048, "zero", "")]


async def churn(service: DeviceService, ops: int) -> float:
    start = time.perf_counter()
    for i in range(ops):
        await service.create(f"b{i}", ZERO)
        await service.remove(f"b{i}")
    return (time.perf_counter() - start) / (2 * ops)


def unjournaled(store: AsyncStateStore) -> AsyncStateStore:
    async def begin(*_: Any) -> int:
        return 0

    async def nothing(*_: Any) -> None:
        return None

    store.begin_intent = begin  # type: ignore[method-assign]
    def soon(*_: Any) -> asyncio.Future[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    store.advance_intent = nothing  # type: ignore[method-assign]
    store.advance_intent_soon = soon  # type: ignore[method-assign]
    store.finish_intent = nothing  # type: ignore[method-assign]
    return store


async def journaling(ops: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for label, wrap in (("journal", lambda s: s), ("no journal", unjournaled)):
            work = Path(tmp) / label.replace(" ", "-")
            store = wrap(AsyncStateStore(StateStore.open(work)))
            service = DeviceService(KernelWorkers(SimDM()), store)
            results[label] = await churn(service, ops)
            service.close()
            store.close()
        j, n = results["journal"], results["no journal"]
        print(f"per operation (create or remove, SimDM in memory, {ops} each):")
        print(f"  with the durable journal  {j * 1e3:7.2f} ms")
        print(f"  without it                {n * 1e3:7.2f} ms")
        print(f"  journaling costs {(j - n) * 1e3:.2f} ms an operation = {j / n:.1f}x")


async def recovery(devices: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sim = SimDM()  # filled in memory, then written to its file once
        state = StateStore.open(Path(tmp) / "state")
        # Fill both sides directly: this measures recovery, not creation.
        for i in range(devices):
            sim.device_create(f"m{i:05d}")
            sim.table_load(f"m{i:05d}", ZERO)
            sim.device_suspend(f"m{i:05d}")
        sim.save_as(Path(tmp) / "kernel.json")
        state.add_devices([DeviceRecord(f"m{i:05d}", None, list(ZERO), False, 0, True)
                           for i in range(devices)])
        state.close()
        service = DeviceService(KernelWorkers(SimDM(Path(tmp) / "kernel.json")),
                                AsyncStateStore(StateStore.open(Path(tmp) / "state")))
        start = time.perf_counter()
        report = await recover(service)
        took = time.perf_counter() - start
        assert not report.drifted and not report.failed and not report.recreated
        print(f"recovery with {devices:6d} managed devices: {took:6.2f} s "
              f"({took / devices * 1e3:.2f} ms a device)")
        service.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ops", type=int, default=300)
    parser.add_argument("--devices", type=int, nargs="*", default=[1000, 10000])
    args = parser.parse_args()
    asyncio.run(journaling(args.ops))
    for n in args.devices:
        asyncio.run(recovery(n))


if __name__ == "__main__":
    main()
