"""SIGKILL of dmd, then of the snapshotter, while a storm of Prepare, Commit
and Remove is in flight on the real kernel. Afterwards: every snapshot the
snapshotter lists has its volume and its data (each layer's files, read
back through a View), every call that was answered is in the list as it
answered (made, committed, removed), no volume is left that no snapshot
owns, and the storm goes on."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from lab_daemon import SystemDmd
from test_containerd_lab import pool_volumes
from test_pools_lab import create_pool
from test_snapshotter_lab import RESULTS, Snapshotter, start_snapshotter

from dmd.snapshotter import snapshots_pb2 as pb
from dmd.snapshotter.grpc_server import SERVICE

pytestmark = [pytest.mark.kernel, pytest.mark.kernel_containerd]

POOL = "dmdtpstorm"  # dmdtp*: the lab fixtures remove its devices after the test
WORKERS = 4
HEADER = (("containerd-namespace", "storm"),)


@dataclass
class Ledger:
    """What the snapshotter answered: these must hold after any crash."""

    committed: dict[str, str] = field(default_factory=dict)  # name -> parent
    active: set[str] = field(default_factory=set)
    removed: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    read_back: set[str] = field(default_factory=set)  # layers whose files were checked


class Storm:
    def __init__(self, socket: Path, ledger: Ledger, seed: int) -> None:
        self.channel = grpc.aio.insecure_channel(f"unix:{socket}")
        self.ledger, self.rng = ledger, random.Random(seed)
        self.seed, self.made = seed, 0

    async def close(self) -> None:
        await self.channel.close()

    async def call(self, method: str, request: object, reply: type) -> object:
        rpc = self.channel.unary_unary(
            f"/{SERVICE}/{method}", request_serializer=type(request).SerializeToString,
            response_deserializer=reply.FromString)  # type: ignore[attr-defined]
        return await rpc(request, metadata=HEADER, timeout=120)

    async def worker(self, n: int, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.round(n)
            except grpc.aio.AioRpcError as exc:
                # dmd or the snapshotter went away mid-call: the outcome is
                # unknown, the check after the restart judges it.
                self.ledger.errors.append(f"{exc.code().name}: {exc.details()}")
                await asyncio.sleep(0.5)

    async def round(self, n: int) -> None:
        self.made += 1
        key = f"s{self.seed}w{n}-{self.made}"  # never used twice in a test
        leaves = [c for c in self.ledger.committed if not self._has_children(c)]
        parent = self.rng.choice(["", *sorted(self.ledger.committed)])
        reply = await self.call("Prepare", pb.PrepareSnapshotRequest(key=key, parent=parent),
                                pb.PrepareSnapshotResponse)
        self.ledger.active.add(key)
        (mount,) = reply.mounts  # type: ignore[attr-defined]
        await write_layer(mount.source, key)
        name = f"layer-{key}"
        await self.call("Commit", pb.CommitSnapshotRequest(name=name, key=key),
                        empty())
        self.ledger.active.discard(key)
        self.ledger.committed[name] = parent
        if leaves and self.rng.random() < 0.5:
            victim = self.rng.choice(leaves)
            if not self._has_children(victim):
                self.ledger.committed.pop(victim, None)
                await self.call("Remove", pb.RemoveSnapshotRequest(key=victim), empty())
                self.ledger.removed.add(victim)

    def _has_children(self, name: str) -> bool:
        return name in self.ledger.committed.values()


def empty() -> type:
    from google.protobuf import empty_pb2

    return empty_pb2.Empty  # type: ignore[no-any-return]


async def run(*argv: str) -> None:
    process = await asyncio.create_subprocess_exec(*argv)
    assert await process.wait() == 0, argv


async def write_layer(device: str, key: str) -> None:
    """The layer's own file (its key in it), written and unmounted."""
    with tempfile.TemporaryDirectory() as where:
        await run("mount", "-t", "ext4", device, where)
        try:
            Path(where, key).write_text(key)
        finally:
            await run("umount", where)


async def storm_for(socket: Path, ledger: Ledger, seconds: float, seed: int,
                    kill: Callable[[], None] | None = None) -> None:
    storm = Storm(socket, ledger, seed)
    stop = asyncio.Event()
    workers = [asyncio.create_task(storm.worker(n, stop)) for n in range(WORKERS)]
    await asyncio.sleep(seconds)
    if kill is not None:
        kill()
        await asyncio.sleep(2)  # the calls in flight fail
    stop.set()
    await asyncio.gather(*workers)
    await storm.close()


def listed(socket: Path) -> dict[str, pb.Info]:
    async def walk() -> dict[str, pb.Info]:
        async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
            rpc = channel.unary_stream(
                f"/{SERVICE}/List", request_serializer=pb.ListSnapshotsRequest.SerializeToString,
                response_deserializer=pb.ListSnapshotsResponse.FromString)
            found = {}
            async for reply in rpc(pb.ListSnapshotsRequest(), metadata=HEADER):
                found.update({i.name: i for i in reply.info})
            return found
    return asyncio.run(walk())


def check(socket: Path, ledger: Ledger) -> None:
    snapshots = listed(socket)
    # Answered calls hold.
    missing = set(ledger.committed) - set(snapshots)
    assert not missing, missing
    assert not ledger.removed & set(snapshots)
    for name, parent in ledger.committed.items():
        assert snapshots[name].kind == pb.COMMITTED and snapshots[name].parent == parent
    # 0 leaked: every volume but the base holds one of the listed snapshots.
    volumes = pool_volumes(POOL)
    assert sorted(volumes) != [] and "containerd.base" in volumes
    held = {labels["containerd/name"] for name, labels in volumes.items()
            if name != "containerd.base"}
    assert held == set(snapshots) and len(volumes) == len(snapshots) + 1
    # Every committed layer holds its files and its ancestors' (a committed
    # layer never changes: each is read back once).
    for name, info in snapshots.items():
        if info.kind != pb.COMMITTED or name in ledger.read_back:
            continue
        expected, up = [], name
        while up:
            expected.append(up.removeprefix("layer-"))
            up = snapshots[up].parent
        assert sorted(read_view(socket, name)) == sorted(expected), name
        ledger.read_back.add(name)


def read_view(socket: Path, name: str) -> list[str]:
    """The layer's files (name == content checked), through a View of it."""
    async def view() -> list[str]:
        async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
            async def call(method: str, request: object, reply: type) -> object:
                rpc = channel.unary_unary(
                    f"/{SERVICE}/{method}", request_serializer=type(request).SerializeToString,
                    response_deserializer=reply.FromString)  # type: ignore[attr-defined]
                return await rpc(request, metadata=HEADER, timeout=120)
            key = f"check-{name}"
            reply = await call("View", pb.ViewSnapshotRequest(key=key, parent=name),
                               pb.ViewSnapshotResponse)
            (mount,) = reply.mounts  # type: ignore[attr-defined]
            with tempfile.TemporaryDirectory() as where:
                await run("mount", "-t", "ext4", "-o", ",".join(mount.options),
                          mount.source, where)
                try:
                    files = {p.name: p.read_text() for p in Path(where).iterdir()}
                finally:
                    await run("umount", where)
            await call("Remove", pb.RemoveSnapshotRequest(key=key), empty())
            assert all(name == text for name, text in files.items()), files
            return list(files)
    return asyncio.run(view())


@pytest.fixture
def pool(stopped_dmd: SystemDmd, loop_device: Callable[[int], str]) -> Iterator[SystemDmd]:
    stopped_dmd.start()
    create_pool(POOL, [loop_device(2048)])
    yield stopped_dmd


@pytest.mark.timeout(900)  # 120-330 s on the CI machine
def test_sigkill_of_dmd_and_of_the_snapshotter_in_a_storm(pool: SystemDmd,
                                                         tmp_path: Path) -> None:
    dmd = pool
    socket = tmp_path / "snapshotter.sock"
    RESULTS.mkdir(parents=True, exist_ok=True)
    snapshotter: Snapshotter = start_snapshotter(POOL, socket, RESULTS / "snapshotter-crash.log")
    ledger = Ledger()
    try:
        asyncio.run(storm_for(socket, ledger, 10, seed=1))
        check(socket, ledger)

        def kill_dmd() -> None:
            assert dmd.proc is not None
            dmd.proc.send_signal(signal.SIGKILL)

        asyncio.run(storm_for(socket, ledger, 8, seed=2, kill=kill_dmd))
        dmd.wait_exit()
        dmd.start()
        check(socket, ledger)  # the same snapshotter: it read dmd again

        def kill_snapshotter() -> None:
            os.kill(snapshotter.proc.pid, signal.SIGKILL)

        asyncio.run(storm_for(socket, ledger, 8, seed=3, kill=kill_snapshotter))
        snapshotter.proc.wait(timeout=30)
        snapshotter = start_snapshotter(POOL, socket, RESULTS / "snapshotter-crash.log")
        check(socket, ledger)

        made = len(ledger.committed)
        asyncio.run(storm_for(socket, ledger, 8, seed=4))  # and it goes on
        check(socket, ledger)
        assert len(ledger.committed) > made
        print(f"storm: {len(ledger.committed)} layers, {len(ledger.removed)} removed, "
              f"{len(ledger.errors)} calls cut off by the kills")
        cut_off = [e for e in ledger.errors if e.startswith("UNAVAILABLE")]
        assert cut_off, f"the kills cut no call off: the test tested nothing ({ledger.errors})"
    finally:
        snapshotter.stop()
        subprocess.run(["udevadm", "settle", "--timeout=30"], check=False)
