"""dmd, the daemon: wiring and start-up order.

1. Options; the engine (the kernel, or SimDM with --sim); the state store
   (refuses a bad database with a message naming the file); a lock on the
   state directory, so two dmds never share one database.
2. Connect to the bus; fail early and clearly when another dmd owns the name.
3. Recovery (finish or roll back interrupted operations, re-create persistent
   devices); then the event sources open (udev's monitor socket, the armed
   control handle), so whatever happens from here on is queued; then a full
   scan of the kernel and of udev's database, then export one object per device.
4. Only then take the name: a client that sees dmd sees a consistent dmd.
5. SIGTERM/SIGINT: refuse new calls, let running ones finish, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import io
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dbus_fast import BusType, Message, NameFlag, RequestNameReply

from dmd import __version__
from dmd.dbus.bus import DmdBus
from dmd.dbus.manager import ManagerInterface
from dmd.dbus.names import BUS_NAME, ROOT_PATH
from dmd.dbus.polkit import PolkitAuthorizer
from dmd.dbus.publish import publish
from dmd.engine.interface import Engine
from dmd.service.devices.inventory import DeviceView, Inventory
from dmd.service.devices.kernel_events import KernelEventWatcher
from dmd.service.devices.operations import DeviceService, default_workers
from dmd.service.devices.reconcile import Reconciler
from dmd.service.devices.recovery import recover
from dmd.service.kernel import KernelWorkers
from dmd.service.pools.crypt import KEY_POLL_SECONDS, KeyWaiter
from dmd.service.pools.names import PoolPart, parts
from dmd.service.pools.recovery import recover_pools
from dmd.service.pools.service import PoolService
from dmd.service.pools.space import SpaceWatch
from dmd.state import AsyncStateStore, StateError, StateStore
from dmd.udev.monitor import RECEIVE_BUFFER, UdevMonitor

log = logging.getLogger("dmd")

# Every pool's space is looked at this often besides on its events (a pool's
# event comes once, and events can be lost).
SPACE_CHECK_SECONDS = 30

DEFAULT_STATE_DIR = Path("/var/lib/dmd")
LOCK_NAME = "dmd.lock"


FAULT_ENV = "DMD_TEST_KILL_AT"


def fault_from_environment() -> Callable[[str, int], None] | None:
    """A test hook: ``DMD_TEST_KILL_AT=reload:2`` makes dmd SIGKILL itself at
    step 2 of a reload, so tests can crash a real dmd mid-operation;
    ``volume-create:2:3`` at step 2 of the third volume-create (a test can
    make the ones it needs first without a restart, which costs seconds in
    the lab)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    operation, step, nth = [*spec.split(":"), "1"][:3]
    left = int(nth)

    def kill_at(op: str, number: int) -> None:
        nonlocal left
        if op == operation and number == int(step):
            left -= 1
            if left == 0:
                log.warning("%s=%s: killing myself", FAULT_ENV, spec)
                os.kill(os.getpid(), signal.SIGKILL)

    return kill_at


class StartupError(Exception):
    """dmd cannot start; the message says why and what to do."""


@dataclass
class Options:
    bus: str
    state_dir: Path
    sim: Path | None
    log_level: str
    sim_flush_delay: float = 0.0
    udev_timeout: float = 10.0
    audit_interval: float = 600.0
    sync_interval: float = 60.0
    udev: bool = True
    udev_buffer: int = RECEIVE_BUFFER
    stop_grace: float = 10.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dmd",
        description=f"The device-mapper daemon: owns /dev/mapper/control and serves every "
        f"mapped device as {BUS_NAME} on D-Bus (one object per device), keeps what it "
        "made in an SQLite database, and follows changes other tools make. Run it as "
        "root on the system bus (systemctl start dmd), or as anyone with --bus session "
        "--sim FILE.",
        epilog="Signals: SIGTERM or SIGINT refuse new calls, let running ones finish, "
        "give running jobs --stop-grace seconds, cancel those that can still be undone, "
        "wait for the rest and exit 0; SIGUSR1 logs where every task is waiting. Exit "
        "status 1: dmd could not start (the message says why) or lost its bus.")
    parser.add_argument("--bus", choices=("system", "session"), default="system",
                        help="bus to serve on (default: system)")
    parser.add_argument("--state-dir", type=Path, default=None, metavar="DIR",
                        help="where dmd keeps its database (default: $STATE_DIRECTORY "
                             f"or {DEFAULT_STATE_DIR}; with --sim: FILE.state)")
    parser.add_argument("--sim", type=Path, default=None, metavar="FILE",
                        help="use the simulated kernel kept in FILE (no root, no "
                             "device-mapper needed)")
    parser.add_argument("--sim-flush-delay", type=float, default=0.0, metavar="SECONDS",
                        help="with --sim: how long a flushing suspend takes (to try "
                             "clients against slow devices)")
    parser.add_argument("--udev-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="how long a create, resume, rename or remove waits for udev "
                             "before failing with Timeout (default: 10)")
    parser.add_argument("--sync-interval", type=float, default=60.0, metavar="SECONDS",
                        help="how often to list the kernel's devices (one ioctl) and "
                             "refresh any that a lost event hid; 0: never (default: 60)")
    parser.add_argument("--audit-interval", type=float, default=600.0, metavar="SECONDS",
                        help="how often to read every device's status and table, for "
                             "what no event reports (a suspend or a table load by another "
                             "tool); 0: never (default: 600)")
    parser.add_argument("--stop-grace", type=float, default=10.0, metavar="SECONDS",
                        help="at SIGTERM, how long running jobs have to end before those "
                             "that can still be undone are cancelled (default: 10)")
    parser.add_argument("--no-udev", action="store_true",
                        help="do not listen to udev (devices lose their udev properties; "
                             "kernel events and audits still follow other tools)")
    parser.add_argument("--udev-buffer", type=int, default=RECEIVE_BUFFER, metavar="BYTES",
                        help=argparse.SUPPRESS)  # tests force overflows with a tiny one
    parser.add_argument("--log-level", default="info",
                        choices=("debug", "info", "warning", "error"),
                        help="the least important messages logged to stderr (the journal "
                             "under systemd) (default: info)")
    parser.add_argument("--version", action="version", version=f"dmd {__version__}",
                        help="print dmd's version and exit")
    return parser


def parse_args(argv: list[str] | None = None) -> Options:
    parser = build_parser()
    args = parser.parse_args(argv)
    state_dir = args.state_dir
    if state_dir is None:
        if args.sim is not None:
            state_dir = args.sim.with_name(args.sim.name + ".state")
        else:
            # systemd's StateDirectory= tells us where it made the directory.
            state_dir = Path(os.environ.get("STATE_DIRECTORY", DEFAULT_STATE_DIR))
    if args.audit_interval < 0 or args.sync_interval < 0 or args.stop_grace < 0:
        parser.error("--audit-interval, --sync-interval and --stop-grace must not be "
                     "negative")
    return Options(args.bus, state_dir, args.sim, args.log_level, args.sim_flush_delay,
                   args.udev_timeout, args.audit_interval, args.sync_interval,
                   not args.no_udev, args.udev_buffer, args.stop_grace)


def open_engine(options: Options) -> Engine:
    if options.sim is not None:
        from dmd.engine.sim import SimDM
        return SimDM(options.sim, flush_delay=options.sim_flush_delay)
    from dmd.engine import DM
    try:
        return DM(udev_timeout=options.udev_timeout)
    except OSError as exc:
        raise StartupError(f"{exc}; to try dmd without device-mapper, use --sim FILE") from None


def lock_state_dir(state_dir: Path) -> int:
    """Hold an exclusive lock on the state directory for dmd's lifetime."""
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StartupError(f"cannot use the state directory {state_dir}: {exc.strerror}; "
                           "choose another with --state-dir") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StartupError(f"another dmd (pid {holder}) is using {state_dir}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


async def name_owner(bus: DmdBus, name: str) -> str | None:
    reply = await bus.call(Message(
        destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus", member="GetNameOwner", signature="s", body=[name]))
    if reply is None or reply.error_name:
        return None
    return str(reply.body[0])


class Daemon:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.stopping = asyncio.Event()

    async def run(self) -> None:
        options = self.options
        lock_fd = lock_state_dir(options.state_dir)
        try:
            store = StateStore.open(options.state_dir)
        except StateError as exc:
            raise StartupError(str(exc)) from None
        engine = open_engine(options)
        bus_type = BusType.SYSTEM if options.bus == "system" else BusType.SESSION
        try:
            bus = DmdBus(bus_type)
            await bus.connect()
        except Exception as exc:
            raise StartupError(f"cannot connect to the {options.bus} bus: {exc}") from None
        owner = await name_owner(bus, BUS_NAME)
        if owner is not None:
            bus.disconnect()
            raise StartupError(f"{BUS_NAME} is already owned on the {options.bus} bus "
                               f"(by {owner}): is another dmd running?")
        async_store = AsyncStateStore(store)
        service = DeviceService(KernelWorkers(engine, default_workers()), async_store,
                                authorizer=PolkitAuthorizer(bus),
                                fault=fault_from_environment())
        try:
            await self._serve(bus, service)
        finally:
            service.close()
            async_store.close()
            engine.close()
            os.close(lock_fd)

    async def _serve(self, bus: DmdBus, service: DeviceService) -> None:
        pools = PoolService(service)
        report = await recover(service)
        await recover_pools(pools, report)
        space = SpaceWatch(pools)
        for what, names in vars(report).items():
            if names:
                log.info("recovery: %s: %s", what, ", ".join(names))
        inventory = Inventory(service)
        reconciler = Reconciler(inventory)
        async with self._event_sources(service.kernel.engine, reconciler) as udev:
            await inventory.rescan()
            if udev is not None:
                for device, info in await asyncio.get_running_loop().run_in_executor(
                        None, lambda: list(udev.known_devices())):
                    inventory.apply_udev(device, info)
            await self._publish_and_serve(bus, service, pools, space, inventory, reconciler)

    @contextlib.asynccontextmanager
    async def _event_sources(self, engine: Engine, reconciler: Reconciler
                             ) -> AsyncIterator[UdevMonitor | None]:
        """Open the sources of news about other tools' changes: the engine's
        events (the simulator raises them too), udev (not for a simulated
        kernel), the timers."""
        loop = asyncio.get_running_loop()
        udev: UdevMonitor | None = None
        kernel = KernelEventWatcher(engine, reconciler.kernel_event)
        kernel.start(loop)
        if self.options.sim is None and self.options.udev:
            udev = UdevMonitor(reconciler.udev_event, reconciler.overflow,
                               receive_buffer=self.options.udev_buffer)
            udev.start()
            udev.attach(loop)
        timers = [loop.create_task(self._every(interval, request))
                  for interval, request in ((self.options.sync_interval, reconciler.request_sync),
                                            (self.options.audit_interval,
                                             reconciler.request_audit))
                  if interval > 0]
        try:
            yield udev
        finally:
            for timer in timers:
                timer.cancel()
            if udev is not None:
                udev.close()
            kernel.close()

    @staticmethod
    async def _every(interval: float, request: Callable[[], None]) -> None:
        while True:
            await asyncio.sleep(interval)
            request()

    @staticmethod
    async def _every_async(interval: float, work: Callable[[], Awaitable[None]], *,
                           at_once: bool = False) -> None:
        while True:
            if not at_once:
                await asyncio.sleep(interval)
            at_once = False
            try:
                await work()
            except Exception:
                log.exception("a periodic check failed")

    async def _publish_and_serve(self, bus: DmdBus, service: DeviceService, pools: PoolService,
                                 space: SpaceWatch, inventory: Inventory,
                                 reconciler: Reconciler) -> None:
        kernel_version = ".".join(map(str, await service.kernel(Engine.version)))
        manager = ManagerInterface(kernel_version, __version__)
        bus.export(ROOT_PATH, manager)
        router, exporter, pool_exporter = await publish(bus, manager, service, pools, space,
                                                        inventory)
        reconciler.on_dm_event(exporter.dm_event)

        def pool_event(view: DeviceView, _: object) -> None:
            # A thin pool's event: its low water mark, or out of space.
            split = parts(view.name)
            if len(split) == 2 and split[1] == PoolPart.TPOOL:
                space.request(split[0])

        reconciler.on_dm_event(pool_event)

        async def look_at_every_pool() -> None:
            for record in await pools.pools():
                space.request(record.name)

        await look_at_every_pool()  # the event fires once per resume: look now
        # And now and then: a pool's event comes once, and events can be lost.
        space_timer = asyncio.get_running_loop().create_task(
            self._every_async(SPACE_CHECK_SECONDS, look_at_every_pool))
        # Encrypted volumes waiting for their keyring key (after a reboot).
        keys = KeyWaiter(pools)
        key_timer = asyncio.get_running_loop().create_task(
            self._every_async(KEY_POLL_SECONDS, keys.run_once, at_once=True))
        bus.add_message_handler(router.handle)
        bus.quiet = False
        reply = await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
        if reply is not RequestNameReply.PRIMARY_OWNER:
            bus.disconnect()
            raise StartupError(f"could not take {BUS_NAME} ({reply.name}): another dmd "
                               "took it first, or the bus policy does not let this user "
                               "own it (install data/dbus-policy)")
        log.info("dmd %s serving %d device(s) as %s on the %s bus (dm %s)", __version__,
                 len(inventory), BUS_NAME, self.options.bus, kernel_version)
        disconnected = asyncio.ensure_future(bus.wait_for_disconnect())  # type: ignore[no-untyped-call]
        stopping = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait({disconnected, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not stopping.done():
            stopping.cancel()
            raise StartupError(f"lost the connection to the bus ({bus_loss(disconnected)})")
        log.info("stopping: finishing %d call(s) in flight", router.in_flight)
        # From now on the grace runs, also for calls still waiting for a pool
        # that a running job holds.
        pools.jobs.stop_after(self.options.stop_grace)
        await router.drain()
        await pools.jobs.drain()
        space_timer.cancel()
        key_timer.cancel()
        await space.close()
        pool_exporter.close()
        # Closing the connection releases the name (the bus daemon announces
        # it); a ReleaseName call first would only be one more write that fails
        # when the bus is going away too.
        if disconnected.done() or not bus.connected:
            log.warning("stopped; the bus connection had already closed (%s)",
                        bus_loss(disconnected))
        else:
            log.info("stopped")
        bus.disconnect()
        disconnected.cancel()


def bus_loss(disconnected: asyncio.Future[Any]) -> str:
    """Why the bus connection ended, in a few words."""
    if not disconnected.done():
        return "closed"
    if disconnected.cancelled():
        return "cancelled"
    exc = disconnected.exception()
    if exc is None:
        return "closed by the bus"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def log_tasks() -> None:
    """SIGUSR1: log where every task waits, for a dmd that seems stuck
    (thread dumps would show only the idle event loop)."""
    tasks = asyncio.all_tasks()
    log.warning("SIGUSR1: %d tasks", len(tasks))
    for task in tasks:
        out = io.StringIO()
        task.print_stack(limit=8, file=out)
        log.warning("%s", out.getvalue().rstrip())


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    logging.basicConfig(
        level=options.log_level.upper(), stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s")
    daemon = Daemon(options)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for signo in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signo, daemon.stopping.set)
        loop.add_signal_handler(signal.SIGUSR1, log_tasks)
        await daemon.run()

    try:
        asyncio.run(run())
    except StartupError as exc:
        print(f"dmd: {exc}", file=sys.stderr)
        return 1
    return 0


def run() -> None:
    sys.exit(main())
