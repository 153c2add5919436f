"""A seeded stream of volume operations, several in flight, with dmd killed
(SIGKILL) every 1 to 4 seconds and restarted on the same state, ten times
and more: after each restart every acknowledged job's effect is there and
nothing is half-made (a volume is active or inactive, its device there
exactly when it is active, with its size); stopped cleanly, the pool's thin
ids are exactly the recorded volumes', its transaction id the kernel's, and
no intent is left.

Each worker owns its volume names, so the effects it was told of come in
the order they happened. An operation whose reply a kill cut off may or may
not have happened: its volume is read back after the restart, and must be
whole either way."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
from dataclasses import dataclass, field
from typing import Any

from dbus_fast import BusType, Variant
from dbus_fast.aio import MessageBus

from dmd.dbus.names import (
    DEVICE_INTERFACE,
    JOB_INTERFACE,
    MANAGER_INTERFACE,
    NO_OBJECT,
    POOL_INTERFACE,
    ROOT_PATH,
    VOLUME_INTERFACE,
)
from dmd.engine.sim import SimDM
from dmd.state import StateStore
from tests.dbus.conftest import CallError, Client

SEED = 26
KILLS = 10
WORKERS = 3
NAMES = 3  # per worker
MIB = 1 << 20


@dataclass
class Model:
    """What each volume is, as far as acknowledged jobs say."""

    volumes: dict[str, tuple[int, bool]] = field(default_factory=dict)  # name -> (size, active)
    uncertain: set[str] = field(default_factory=set)
    acknowledged: int = 0


async def _connect(address: str) -> Client:
    bus = MessageBus(bus_address=address, bus_type=BusType.SESSION)
    await bus.connect()
    return Client(bus)


async def _volumes(c: Client) -> dict[str, dict[str, Any]]:
    (objects,) = await c.call(ROOT_PATH, "org.freedesktop.DBus.ObjectManager",
                              "GetManagedObjects")
    return {v[VOLUME_INTERFACE]["Name"].value: {k: x.value for k, x in
                                                v[VOLUME_INTERFACE].items()} | {"path": p}
            for p, v in objects.items() if VOLUME_INTERFACE in v}


async def _job(c: Client, job: str) -> bool:
    (done,) = await c.call(job, JOB_INTERFACE, "Wait", "d", [60.0])
    assert done
    (state,) = await c.call(job, "org.freedesktop.DBus.Properties", "Get", "ss",
                            [JOB_INTERFACE, "State"])
    return bool(state.value == "completed")


async def _worker(c: Client, pool: str, worker: int, rng: random.Random, model: Model) -> None:
    names = [f"w{worker}-v{i}" for i in range(NAMES)]
    while True:
        name = rng.choice(names)
        op = rng.choice(["create", "create", "snapshot", "delete", "resize", "activate",
                         "deactivate"])
        model.uncertain.add(name)  # until its reply says
        try:
            known = await _volumes(c)
            path = known.get(name, {}).get("path")
            if op == "create":
                size = rng.choice([4, 8, 16]) * MIB
                _, job = await c.call(pool, POOL_INTERFACE, "CreateVolume", "sta{sv}",
                                      [name, size, {}])
                effect: tuple[int, bool] | None = (size, True)
            elif op == "snapshot":
                origin = rng.choice([n for n in names if n != name])
                if origin not in known:
                    model.uncertain.discard(name)
                    continue
                active = rng.random() < 0.5
                _, job = await c.call(known[origin]["path"], VOLUME_INTERFACE, "Snapshot",
                                      "sa{sv}", [name, {"activate": Variant("b", active)}])
                effect = (known[origin]["Size"], active)
            elif path is None:
                model.uncertain.discard(name)
                continue
            elif op == "delete":
                (job,) = await c.call(path, VOLUME_INTERFACE, "Delete", "a{sv}", [{}])
                effect = None
            elif op == "resize":
                size = known[name]["Size"] + rng.choice([1, 4]) * MIB
                (job,) = await c.call(path, VOLUME_INTERFACE, "Resize", "ta{sv}", [size, {}])
                effect = (size, model.volumes[name][1])
            else:
                active = op == "activate"
                (job,) = await c.call(path, VOLUME_INTERFACE,
                                      "Activate" if active else "Deactivate", "a{sv}", [{}])
                effect = (model.volumes[name][0], active)
            if await _job(c, job):
                if effect is None:
                    model.volumes.pop(name, None)
                else:
                    model.volumes[name] = effect
                model.acknowledged += 1
            model.uncertain.discard(name)
        except CallError as exc:
            if exc.name.rsplit(".", 1)[-1] in ("AlreadyExists", "NotFound", "Busy"):
                model.uncertain.discard(name)  # refused: nothing changed
                continue
            if exc.name in ("org.freedesktop.DBus.Error.NoReply",
                            "org.freedesktop.DBus.Error.ServiceUnknown"):
                return  # dmd was killed: the volume stays uncertain
            raise


async def _check_whole(c: Client, model: Model) -> None:
    """Nothing half-made; what the model knows for sure is there."""
    volumes = await _volumes(c)
    for name, props in volumes.items():
        assert props["State"] in ("active", "inactive"), props
        active = props["State"] == "active"
        assert (props["Device"] != NO_OBJECT) == active, props
        if active:
            (size,) = await c.call(props["Device"], "org.freedesktop.DBus.Properties", "Get",
                                   "ss", [DEVICE_INTERFACE, "Size"])
            assert size.value == props["Size"], (name, size.value, props)
    for name in set(model.volumes) | set(volumes):
        actual = ((volumes[name]["Size"], volumes[name]["State"] == "active")
                  if name in volumes else None)
        if name in model.uncertain:
            if actual is None:
                model.volumes.pop(name, None)
            else:
                model.volumes[name] = actual
        else:
            assert actual == model.volumes.get(name), (name, actual, model.volumes.get(name))
    model.uncertain.clear()


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
    c = await _connect(dmd.address)
    pool, job = await c.call(ROOT_PATH, MANAGER_INTERFACE, "CreatePool", "sasa{sv}",
                             ["tank", ["/dev/simdisk1"], {}])
    assert await _job(c, job)
    c.bus.disconnect()
    model = Model()
    for kill in range(KILLS):
        c = await _connect(dmd.address)
        workers = [asyncio.create_task(_worker(c, pool, w, random.Random(rng.random()),
                                                model)) for w in range(WORKERS)]
        await asyncio.sleep(rng.uniform(1, 4))
        dmd.stop(signal.SIGKILL)
        for task in workers:  # each ends with the connection (and nothing else)
            with contextlib.suppress(EOFError, ConnectionError, OSError,
                                     asyncio.CancelledError):
                await task
        c.bus.disconnect()
        dmd.start()
        c = await _connect(dmd.address)
        await _check_whole(c, model)
        c.bus.disconnect()
        if kill % 3 == 2:  # now and then: stopped cleanly, read off its files
            assert dmd.stop() == 0
            _check_offline(dmd)
            dmd.start()
    assert dmd.stop() == 0
    _check_offline(dmd)
    print("acknowledged", model.acknowledged)
    assert model.acknowledged >= 3 * KILLS, model.acknowledged
