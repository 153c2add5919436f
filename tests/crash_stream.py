"""A seeded stream of volume operations through the bus, several in flight,
for the crash tests (dmd killed while it runs, on the simulator and in the
lab): what each worker was told happened (its model), and the check that
after a restart nothing is half-made and every acknowledged effect is there.

Each worker owns its volume names, so the effects it was told of come in the
order they happened. An operation whose reply a kill cut off may or may not
have happened: its volume is read back after the restart (it must be whole
either way) and the model takes what is there. With *data* (the lab), a
volume is written when it is made and its checksum kept: an active volume
must read back the data its model says (a snapshot, its origin's at the
moment of the snapshot)."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from dbus_fast import BusType, Variant
from dbus_fast.aio import MessageBus

from dmd.dbus.names import (
    DEVICE_INTERFACE,
    JOB_INTERFACE,
    NO_OBJECT,
    OBJECT_MANAGER_INTERFACE,
    POOL_INTERFACE,
    PROPERTIES_INTERFACE,
    ROOT_PATH,
    VOLUME_INTERFACE,
)
from tests.dbus.bus_client import CallError, Client

MIB = 1 << 20
NAMES = 3  # per worker
GONE = ("org.freedesktop.DBus.Error.NoReply", "org.freedesktop.DBus.Error.ServiceUnknown",
        "org.freedesktop.DBus.Error.Disconnected")

# (device path) -> checksum: writes the volume's first bytes, returns their checksum.
Write = Callable[[str], Awaitable[str]]
# (device path) -> checksum of the same bytes.
Read = Callable[[str], Awaitable[str]]


@dataclass
class Model:
    """What each volume is, as far as acknowledged jobs say."""

    volumes: dict[str, tuple[int, bool]] = field(default_factory=dict)  # name -> (size, active)
    data: dict[str, str] = field(default_factory=dict)  # name -> checksum of its first bytes
    uncertain: set[str] = field(default_factory=set)
    acknowledged: int = 0
    data_checked: int = 0


async def connect(address: str | None = None) -> Client:
    bus = (MessageBus(bus_address=address, bus_type=BusType.SESSION) if address
           else MessageBus(bus_type=BusType.SYSTEM))
    await bus.connect()
    return Client(bus)


async def volumes(c: Client) -> dict[str, dict[str, Any]]:
    (objects,) = await c.call(ROOT_PATH, OBJECT_MANAGER_INTERFACE, "GetManagedObjects")
    return {v[VOLUME_INTERFACE]["Name"].value: {k: x.value for k, x in
                                                v[VOLUME_INTERFACE].items()} | {"path": p}
            for p, v in objects.items() if VOLUME_INTERFACE in v}


async def job_completed(c: Client, job: str) -> bool:
    (done,) = await c.call(job, JOB_INTERFACE, "Wait", "d", [120.0])
    assert done
    (state,) = await c.call(job, PROPERTIES_INTERFACE, "Get", "ss", [JOB_INTERFACE, "State"])
    return bool(state.value == "completed")


async def worker(c: Client, pool: str, number: int, rng: random.Random, model: Model,
                 write: Write | None = None) -> None:
    """Operations on this worker's volumes until dmd goes away."""
    names = [f"w{number}-v{i}" for i in range(NAMES)]
    while True:
        name = rng.choice(names)
        op = rng.choice(["create", "create", "snapshot", "delete", "resize", "activate",
                         "deactivate"])
        model.uncertain.add(name)  # until its reply says
        try:
            known = await volumes(c)
            path = known.get(name, {}).get("path")
            data: str | None = None
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
                data = model.data.get(origin)
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
                data = model.data.get(name)
            else:
                active = op == "activate"
                (job,) = await c.call(path, VOLUME_INTERFACE,
                                      "Activate" if active else "Deactivate", "a{sv}", [{}])
                effect = (model.volumes[name][0], active)
                data = model.data.get(name)
            if await job_completed(c, job):
                model.data.pop(name, None)
                if effect is None:
                    model.volumes.pop(name, None)
                else:
                    model.volumes[name] = effect
                    if op == "create" and write is not None:
                        device = (await volumes(c))[name]["DevicePath"]
                        data = await write(device)
                    if data is not None:
                        model.data[name] = data
                model.acknowledged += 1
            model.uncertain.discard(name)
        except CallError as exc:
            if exc.name.rsplit(".", 1)[-1] in ("AlreadyExists", "NotFound", "Busy"):
                model.uncertain.discard(name)  # refused: nothing changed
                continue
            if exc.name in GONE:
                return  # dmd was killed: the volume stays uncertain
            raise


async def check_whole(c: Client, model: Model, read: Read | None = None) -> None:
    """Nothing half-made; what the model knows for sure is there."""
    found = await volumes(c)
    for name, props in found.items():
        assert props["State"] in ("active", "inactive"), props
        active = props["State"] == "active"
        assert (props["Device"] != NO_OBJECT) == active, props
        if active:
            (size,) = await c.call(props["Device"], PROPERTIES_INTERFACE, "Get", "ss",
                                   [DEVICE_INTERFACE, "Size"])
            assert size.value == props["Size"], (name, size.value, props)
    for name in set(model.volumes) | set(found):
        actual = ((found[name]["Size"], found[name]["State"] == "active")
                  if name in found else None)
        if name in model.uncertain:
            model.data.pop(name, None)  # what it holds is not known for sure
            if actual is None:
                model.volumes.pop(name, None)
            else:
                model.volumes[name] = actual
            continue
        assert actual == model.volumes.get(name), (name, actual, model.volumes.get(name))
        if read is not None and actual is not None and actual[1] and name in model.data:
            assert await read(found[name]["DevicePath"]) == model.data[name], name
            model.data_checked += 1
    model.uncertain.clear()
