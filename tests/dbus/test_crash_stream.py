"""A seeded stream of volume operations, several in flight, with dmd killed
(SIGKILL) every 1 to 4 seconds and restarted on the same state, ten times
and more (tests/crash_stream.py): after each restart every acknowledged
job's effect is there and nothing is half-made (a volume is active or
inactive, its device there exactly when it is active, with its size);
stopped cleanly, the pool's thin ids are exactly the recorded volumes', its
transaction id the kernel's, and no intent is left. (On fd7ea4d it failed:
a volume's recorded size was not its device's after a kill mid-Resize.)"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
from typing import Any

from dmd.dbus.names import MANAGER_INTERFACE, ROOT_PATH
from dmd.engine.sim import SimDM
from dmd.state import StateStore
from tests.crash_stream import Model, check_whole, connect, job_completed, worker

SEED = 26
KILLS = 10
WORKERS = 3


def _check_offline(dmd: Any) -> None:
    """dmd stopped: thin ids, transaction id and intents agree."""
    store = StateStore.open(dmd.state_dir)
    try:
        assert store.pending_intents() == []
        [pool] = store.list_pools()
        thin_ids = sorted(v.thin_id for v in store.list_volumes("tank") if v.thin_id is not None)
        [kernel] = SimDM(dmd.sim).snapshot()["pools"].values()
        assert sorted(kernel["thins"]) == thin_ids
        assert kernel["tid"] == pool.transaction_id
        assert max(thin_ids, default=-1) < pool.next_thin_id
    finally:
        store.close()


async def test_volumes_are_whole_after_every_kill(make_dmd: Any) -> None:
    rng = random.Random(SEED)
    dmd = make_dmd()
    SimDM(dmd.sim).add_disk("/dev/simdisk1", 7, 1, 1024 * 2048)
    c = await connect(dmd.address)
    pool, job = await c.call(ROOT_PATH, MANAGER_INTERFACE, "CreatePool", "sasa{sv}",
                             ["tank", ["/dev/simdisk1"], {}])
    assert await job_completed(c, job)
    c.bus.disconnect()
    model = Model()
    for kill in range(KILLS):
        c = await connect(dmd.address)
        workers = [asyncio.create_task(worker(c, pool, w, random.Random(rng.random()), model))
                   for w in range(WORKERS)]
        await asyncio.sleep(rng.uniform(1, 4))
        dmd.stop(signal.SIGKILL)
        for task in workers:  # each ends with the connection (and nothing else)
            with contextlib.suppress(EOFError, ConnectionError, OSError,
                                     asyncio.CancelledError):
                await task
        c.bus.disconnect()
        dmd.start()
        c = await connect(dmd.address)
        await check_whole(c, model)
        c.bus.disconnect()
        if kill % 3 == 2:  # now and then: stopped cleanly, read off its files
            assert dmd.stop() == 0
            _check_offline(dmd)
            dmd.start()
    assert dmd.stop() == 0
    _check_offline(dmd)
    assert model.acknowledged >= 10 * KILLS, model.acknowledged
