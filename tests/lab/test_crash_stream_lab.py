"""The seeded crash stream of tests/dbus/test_crash_stream.py on the real
kernel, with data: several volume operations in flight through the system
bus, dmd killed (SIGKILL) every 1 to 4 seconds and started again on the same
state, ten times or more (until ten volumes' data have been read back); each
new volume is written as soon as its create is acknowledged. After every
restart nothing is half-made, every acknowledged effect is there, and every
active volume whose data is known for sure reads back its checksum (a
snapshot, its origin's); at the end, stopped cleanly, the pool's thin ids
(thin_ls on a metadata snapshot) are the recorded ones and its transaction
id the recorded one."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import signal
import sqlite3
import time

import pytest
from lab_daemon import SystemDmd, busctl, dmsetup, unfinished
from test_pools_lab import create_pool, disks, kernel_thin_ids, recorded_thin_ids

from dmd.dbus.names import BUS_NAME
from tests.crash_stream import MIB, Model, check_whole, connect, worker

__all__ = ["disks"]  # the fixture, used by name

pytestmark = [pytest.mark.kernel]

SEED = 2026
KILLS = 10
WORKERS = 3
POOL = "dmdtcs"


def killed(dmd: SystemDmd) -> None:
    assert dmd.proc is not None
    dmd.proc.send_signal(signal.SIGKILL)
    dmd.proc.wait(timeout=60)
    for _ in range(200):  # the bus forgets the name a moment after
        if busctl("status", BUS_NAME).returncode != 0:
            return
        time.sleep(0.05)


def _write(device: str, seed: int) -> str:
    data = random.Random(seed).randbytes(MIB)
    fd = os.open(device, os.O_WRONLY)
    try:
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    return hashlib.sha256(data).hexdigest()


def _read(device: str) -> str:
    fd = os.open(device, os.O_RDONLY)
    try:
        return hashlib.sha256(os.pread(fd, MIB, 0)).hexdigest()
    finally:
        os.close(fd)


@pytest.mark.timeout(900)  # 120-330 s on the CI machine
@pytest.mark.kernel_volumes_late  # the boots' balance: docs/kernel-lab.md
async def test_volumes_and_their_data_are_whole_after_every_kill(
        system_dmd: SystemDmd, disks: list[str]) -> None:
    rng = random.Random(SEED)
    pool = create_pool(POOL, disks[:1])
    model = Model()
    seeds = iter(range(1 << 30))

    async def write(device: str) -> str:
        return await asyncio.to_thread(_write, device, next(seeds))

    async def read(device: str) -> str:
        return await asyncio.to_thread(_read, device)

    kills = 0
    # Ten kills or more: more (up to three times as many) until as many
    # volumes' data have been read back (how many there are to read after a
    # kill depends on where the kills fall).
    while kills < KILLS or (model.data_checked < KILLS and kills < 3 * KILLS):
        kills += 1
        c = await connect()
        workers = [asyncio.create_task(worker(c, pool, w, random.Random(rng.random()), model,
                                              write)) for w in range(WORKERS)]
        await asyncio.sleep(rng.uniform(1, 4))
        await asyncio.to_thread(killed, system_dmd)
        for task in workers:  # each ends with the connection (and nothing else)
            with contextlib.suppress(EOFError, ConnectionError, OSError,
                                     asyncio.CancelledError):
                await task
        c.bus.disconnect()
        await asyncio.to_thread(system_dmd.start)
        c = await connect()
        await check_whole(c, model, read)
        c.bus.disconnect()
    system_dmd.stop()
    assert unfinished(system_dmd.state_dir) == 0
    assert kernel_thin_ids(POOL) == recorded_thin_ids(system_dmd.state_dir)
    with contextlib.closing(sqlite3.connect(system_dmd.state_dir / "dmd.sqlite3")) as db:
        (recorded,) = db.execute("SELECT transaction_id FROM pools WHERE name = ?",
                                 (POOL,)).fetchone()
    assert int(dmsetup("status", f"{POOL}-tpool").split()[3]) == recorded
    print(f"crash stream: {kills} kills, {model.acknowledged} jobs acknowledged, "
          f"{model.data_checked} volumes' data read back")
    assert model.acknowledged >= KILLS and model.data_checked >= KILLS
    system_dmd.start()  # as the fixture left it
