"""A snapshotter in this process, over gRPC on a socket of its own, on a
real bus to ``dmd --sim`` in its own process: containerd's calls as they
arrive, dmd's answers as they leave."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from dbus_fast import BusType
from dbus_fast.aio import MessageBus
from google.protobuf import empty_pb2

from dmd.dbus.names import (
    JOB_INTERFACE,
    MANAGER_INTERFACE,
    OBJECT_MANAGER_INTERFACE,
    ROOT_PATH,
    VOLUME_INTERFACE,
)
from dmd.engine.sim import SimDM
from dmd.snapshotter import snapshots_pb2 as pb
from dmd.snapshotter.dmd_pool import DmdPool
from dmd.snapshotter.grpc_server import SERVICE, Servicer, handlers
from dmd.snapshotter.service import Snapshotter
from tests.dbus.bus_client import Client
from tests.helpers import unvariant

POOL = "ctd"
BASE_SIZE = 64 << 20

REPLIES: dict[str, Any] = {
    "Prepare": pb.PrepareSnapshotResponse, "View": pb.ViewSnapshotResponse,
    "Mounts": pb.MountsResponse, "Commit": empty_pb2.Empty, "Remove": empty_pb2.Empty,
    "Stat": pb.StatSnapshotResponse, "Update": pb.UpdateSnapshotResponse,
    "Usage": pb.UsageResponse, "Cleanup": empty_pb2.Empty}


class Api:
    """containerd's side: one call per method, the namespace as its header."""

    def __init__(self, channel: grpc.aio.Channel, namespace: str | None = "default") -> None:
        self.channel, self.namespace = channel, namespace

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("containerd-namespace", self.namespace),) if self.namespace else ()

    def using(self, namespace: str | None) -> Api:
        return Api(self.channel, namespace)

    async def __call__(self, method: str, request: Any) -> Any:
        call = self.channel.unary_unary(
            f"/{SERVICE}/{method}", request_serializer=type(request).SerializeToString,
            response_deserializer=REPLIES[method].FromString)
        return await call(request, metadata=self.metadata())

    async def prepare(self, key: str, parent: str = "", **labels: str) -> list[Any]:
        reply = await self("Prepare", pb.PrepareSnapshotRequest(key=key, parent=parent,
                                                                labels=labels))
        return list(reply.mounts)

    async def view(self, key: str, parent: str = "", **labels: str) -> list[Any]:
        reply = await self("View", pb.ViewSnapshotRequest(key=key, parent=parent,
                                                          labels=labels))
        return list(reply.mounts)

    async def commit(self, name: str, key: str, **labels: str) -> None:
        await self("Commit", pb.CommitSnapshotRequest(name=name, key=key, labels=labels))

    async def remove(self, key: str) -> None:
        await self("Remove", pb.RemoveSnapshotRequest(key=key))

    async def stat(self, key: str) -> Any:
        return (await self("Stat", pb.StatSnapshotRequest(key=key))).info

    async def walk(self, *filters: str) -> list[Any]:
        call = self.channel.unary_stream(
            f"/{SERVICE}/List", request_serializer=pb.ListSnapshotsRequest.SerializeToString,
            response_deserializer=pb.ListSnapshotsResponse.FromString)
        found: list[Any] = []
        async for reply in call(pb.ListSnapshotsRequest(filters=list(filters)),
                                metadata=self.metadata()):
            found.extend(reply.info)
        return found


@dataclass
class Rig:
    api: Api
    client: Client  # dmd's bus, to see what dmd holds
    snapshotter: Snapshotter
    socket: Path
    restart: Callable[[], Awaitable[None]]  # the snapshotter, from dmd's records alone

    async def volumes(self) -> dict[str, dict[str, Any]]:
        """dmd's volumes in the pool, by name (their properties)."""
        (objects,) = await self.client.call(ROOT_PATH, OBJECT_MANAGER_INTERFACE,
                                            "GetManagedObjects")
        return {props["Name"]: props for props in
                (unvariant(ifaces[VOLUME_INTERFACE]) for ifaces in objects.values()
                 if VOLUME_INTERFACE in ifaces)
                if props["PoolName"] == POOL}


async def _empty_root(device: str) -> None:
    """Without a kernel there is nothing to mount: the base's root is taken
    as emptied (the lab's tests mount it)."""


@pytest.fixture
async def rig(dmd_session: Any, tmp_path: Path) -> AsyncIterator[Rig]:
    sim = SimDM(dmd_session.sim)
    sim.add_disk("/dev/simdisk1", 7, 1, 512 * 2048)
    client = Client(await MessageBus(bus_address=dmd_session.address,
                                     bus_type=BusType.SESSION).connect())
    _, job = await client.call(ROOT_PATH, MANAGER_INTERFACE, "CreatePool", "sasa{sv}",
                               [POOL, ["/dev/simdisk1"], {}])
    assert (await client.call(job, JOB_INTERFACE, "Wait", "d", [30.0]))[0]
    socket = tmp_path / "snapshotter.sock"
    state: dict[str, Any] = {}

    async def start() -> None:
        bus = await MessageBus(bus_address=dmd_session.address, bus_type=BusType.SESSION
                               ).connect()
        pool = DmdPool(bus, POOL, os.getuid())
        await pool.start()
        snapshotter = Snapshotter(pool, BASE_SIZE, empty_root=_empty_root)
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((handlers(Servicer(snapshotter)),))
        server.add_insecure_port(f"unix:{socket}")
        await server.start()
        state.update(bus=bus, server=server, snapshotter=snapshotter)

    async def stop() -> None:
        await state["server"].stop(None)
        state["bus"].disconnect()

    async def restart() -> None:
        await stop()
        await start()
        rig.snapshotter = state["snapshotter"]

    await start()
    channel = grpc.aio.insecure_channel(f"unix:{socket}")
    rig = Rig(Api(channel), client, state["snapshotter"], socket, restart)
    yield rig
    await channel.close()
    await stop()
    client.bus.disconnect()
    await asyncio.sleep(0)
