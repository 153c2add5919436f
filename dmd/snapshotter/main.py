"""dmd-snapshotter: containerd's snapshots API on a unix socket, its
snapshots kept as volumes of one dmd pool (a proxy plugin of containerd's).

    dmd-snapshotter --pool containerd [--socket PATH] [--bus system|session]

It is a D-Bus client of dmd and nothing else (no device-mapper call, no
store of its own). The socket is made mode 0600: a client of it acts with
the snapshotter's rights in the pool, as containerd does.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from dbus_fast import BusType
from dbus_fast.aio import MessageBus

from dmd.snapshotter.dmd_pool import DmdError, DmdPool
from dmd.snapshotter.service import DEFAULT_BASE_SIZE, Snapshotter

log = logging.getLogger("dmd.snapshotter")

DEFAULT_SOCKET = "/run/dmd-snapshotter/snapshotter.sock"
START_WAIT_SECONDS = 30.0  # for dmd to be on the bus


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dmd-snapshotter",
        description="containerd's snapshotter API (a proxy plugin) on dmd's volumes: one thin "
                    "volume per snapshot, in one pool")
    p.add_argument("--pool", required=True, help="the dmd pool that holds the snapshots")
    p.add_argument("--socket", default=DEFAULT_SOCKET,
                   help=f"the unix socket to serve gRPC on (default {DEFAULT_SOCKET})")
    p.add_argument("--bus", default="system",
                   help="system (default), session, or a bus address (unix:path=...)")
    p.add_argument("--base-size", type=int, default=DEFAULT_BASE_SIZE,
                   help="bytes of the base every parentless snapshot starts from (made once "
                        f"in the pool, ext4; default {DEFAULT_BASE_SIZE})")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])
    return p


async def connect(bus_name: str) -> MessageBus:
    if bus_name in ("system", "session"):
        bus = MessageBus(bus_type=BusType.SYSTEM if bus_name == "system" else BusType.SESSION)
    else:
        bus = MessageBus(bus_address=bus_name)
    return await bus.connect()


async def start_pool(bus: MessageBus, pool_name: str) -> DmdPool:
    pool = DmdPool(bus, pool_name, os.getuid())
    deadline = asyncio.get_running_loop().time() + START_WAIT_SECONDS
    while True:
        try:
            await pool.start()
            return pool
        except DmdError as exc:
            if not exc.unreachable or asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.5)


async def serve(args: argparse.Namespace) -> None:
    # gRPC is the optional extra: imported here, so that the man page (made
    # from parser()) needs none of it.
    try:
        import grpc

        from dmd.snapshotter.grpc_server import Servicer, handlers
    except ImportError as exc:
        sys.exit(f"dmd-snapshotter: {exc.name} is missing: install dmd with its "
                 "snapshotter extra (pip install 'dmd[snapshotter]')")
    bus = await connect(args.bus)
    pool = await start_pool(bus, args.pool)
    snapshotter = Snapshotter(pool, args.base_size)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handlers(Servicer(snapshotter)),))
    directory = os.path.dirname(args.socket)
    if directory:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    if os.path.exists(args.socket):
        os.unlink(args.socket)  # a socket a stopped snapshotter left
    old_umask = os.umask(0o177)  # the socket is made 0600 (no window at 0666)
    try:
        server.add_insecure_port("unix:" + args.socket)
        await server.start()
    finally:
        os.umask(old_umask)
    log.info("serving containerd's snapshots API on %s, pool %s (%d snapshot volume(s))",
             args.socket, args.pool, len(pool.volumes))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    stopping = asyncio.create_task(stop.wait())
    bus_lost = asyncio.create_task(bus.wait_for_disconnect())  # type: ignore[no-untyped-call]
    await asyncio.wait((stopping, bus_lost), return_when=asyncio.FIRST_COMPLETED)
    if bus_lost.done():
        # Nothing it holds could be trusted without dmd's signals: the unit
        # starts it again, and it reads everything anew.
        log.error("the bus connection is lost: exiting")
        await server.stop(0)
        sys.exit(1)
    bus_lost.cancel()
    log.info("stopping: calls in flight get 10 s")
    await server.stop(10)
    bus.disconnect()


def run(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    # Only the snapshotter's own messages at the level asked for: grpc's
    # debug output is one line per call.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(args.log_level.upper())
    try:
        asyncio.run(serve(args))
    except DmdError as exc:
        sys.exit(f"dmd-snapshotter: {exc}")
