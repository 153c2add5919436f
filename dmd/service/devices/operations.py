"""The service layer: every change to the kernel goes through here.

Each operation runs the same way: validate -> take the device's lock ->
journal the intent (durably, before the kernel is touched) -> the ioctl
sequence, with rollback -> record -> mark the intent done -> publish a change.
Kernel calls run in worker threads (they may wait on I/O or on udev); SQLite
calls run on the state store's own thread; the event loop only routes.

A fault hook (``fault``) is called before every step with the operation and
the step number, so tests can stop an operation anywhere and check that
recovery puts the kernel and the database back in agreement.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from dmd.engine import (
    DeviceInfo,
    DevId,
    DmError,
    DmFlags,
    TargetLine,
    TargetVersion,
    UdevTimeout,
    UdevWait,
    validate_name,
    validate_table,
    validate_uuid,
)
from dmd.engine import InvalidArgument as EngineInvalidArgument
from dmd.engine.interface import Engine
from dmd.service import errors
from dmd.service.auth import ROOT, Action, Authorizer, Caller, RootOnly
from dmd.service.events import ChangeEvent, ChangeKind, EventBus
from dmd.service.journal import (
    CreateArgs,
    CreateStep,
    FaultHook,
    Journal,
    ReloadArgs,
    ReloadStep,
    RemoveArgs,
    RemoveStep,
    RenameArgs,
    RenameStep,
    intent,
)
from dmd.service.kernel import KernelWorkers
from dmd.service.locks import DeviceLocks
from dmd.state import AsyncStateStore, DeviceRecord

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_LABELS = 64
MAX_LABEL_BYTES = 1024
MAX_LABELS_BYTES = 16 << 10  # all of an object's labels, keys and values, in UTF-8


def check_labels(labels: Mapping[str, str]) -> dict[str, str]:
    if not isinstance(labels, Mapping):
        raise errors.InvalidArgument("labels must be a string-to-string map")
    if len(labels) > MAX_LABELS:
        raise errors.InvalidArgument(f"at most {MAX_LABELS} labels")
    total = 0
    for key, value in labels.items():
        if not isinstance(key, str) or not isinstance(value, str) or not key:
            raise errors.InvalidArgument("labels must map non-empty strings to strings")
        if not _printable(key) or not _printable(value):
            # Control characters cost six bytes each in a pool's description
            # and turn up in logs and terminals.
            raise errors.InvalidArgument(f"label {key!r}: no control characters")
        size = len(key.encode()) + len(value.encode())
        if size > MAX_LABEL_BYTES:
            raise errors.InvalidArgument(f"label {key!r} is longer than {MAX_LABEL_BYTES} bytes")
        total += size
    if total > MAX_LABELS_BYTES:
        raise errors.InvalidArgument(f"labels take {total} bytes; at most {MAX_LABELS_BYTES}")
    return dict(labels)


def _printable(text: str) -> bool:
    return not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or 0xD800 <= ord(c) < 0xE000
                   for c in text)


def udev_done(_: Engine, wait: UdevWait) -> None:
    """For the kernel workers: until udev is done with what *wait* is about."""
    wait.wait()


def validated(call: Callable[[], T]) -> T:
    """*call*'s result; the engine's refusal of an argument as the service's."""
    try:
        return call()
    except EngineInvalidArgument as exc:
        raise errors.InvalidArgument(str(exc)) from None


class DeviceService:
    def __init__(self, kernel: KernelWorkers, store: AsyncStateStore,
                 events: EventBus | None = None, *, fault: FaultHook | None = None,
                 authorizer: Authorizer | None = None) -> None:
        self.kernel = kernel
        self.authorizer: Authorizer = authorizer or RootOnly()
        self.store = store
        self.events = events or EventBus()
        self.locks = DeviceLocks()
        self.fault = fault
        self._in_flight: set[asyncio.Task[Any]] = set()
        # Device names a higher layer owns (pools): the owner, as named in
        # errors -> whether a device name is one of its own (the owner's
        # naming rule is its own business). Only a call that names the same
        # owner may change such a device, so a raw call cannot corrupt a pool.
        self.claims: dict[str, Callable[[str], bool]] = {}
        # Asked before start-up re-creates a persistent device from its
        # record: a reason not to (the disks its table names are not the ones
        # it was made on), or None. A higher layer (pools) adds its own.
        self.recreate_guards: list[Callable[[DeviceRecord], Awaitable[str | None]]] = []

    def close(self) -> None:
        self.kernel.close()

    def _publish(self, kind: ChangeKind, name: str, device: tuple[int, int] | None,
                 operation: str) -> None:
        self.events.publish(ChangeEvent(kind, name, device, operation))

    def check_claim(self, name: str, claim: str | None) -> None:
        for owner, owns in self.claims.items():
            if owns(name) and claim != owner:
                raise errors.Busy(f"{name!r} belongs to {owner}: change it through the "
                                  "pool's or the volume's object")

    def claimed(self, name: str) -> bool:
        return any(owns(name) for owns in self.claims.values())

    async def authorize(self, caller: Caller, action: Action, device: str) -> None:
        """Ask first, before any validation that could leak what exists.
        Root, and the user dmd runs as (who could ptrace it anyway), need no
        authority's word."""
        if caller.uid not in (0, os.getuid()):
            await self.authorizer.authorize(caller, action, device)

    async def _guard(self, operation: str, device: str, body: Callable[[], Awaitable[T]], *,
                     renamed_to: str | None = None, settle: bool = True) -> T:
        """Run an operation body; map anything it raises into the taxonomy.
        Then, succeeded or not (a failed call may still have moved the
        kernel), let the settlers take in the device: under *renamed_to* if
        the body succeeded; not if *settle* is False (the caller settles it)."""
        succeeded = False
        try:
            result = await body()
            succeeded = True
            return result
        except errors.ServiceError:
            raise
        except (DmError, EngineInvalidArgument, TimeoutError) as exc:
            raise errors.from_engine(exc, device, operation) from None
        finally:
            if settle:
                await self.events.settle(
                    [renamed_to if succeeded and renamed_to is not None else device])

    # -- create ------------------------------------------------------------
    async def create(self, name: str, table: Sequence[Sequence[object]], *,
                     uuid: str | None = None, read_only: bool = False,
                     persistent: bool = False, labels: Mapping[str, str] | None = None,
                     caller: Caller = ROOT, claim: str | None = None,
                     later: list[UdevWait] | None = None) -> DeviceInfo:
        """*later*: udev's work on the new node is added to it (a UdevWait,
        for the caller to wait for) instead of waited for here."""
        await self.authorize(caller, Action.CREATE, name)
        self.check_claim(name, claim)
        validated(lambda: validate_name(name))
        if uuid:
            validated(lambda: validate_uuid(uuid))
        lines = validated(lambda: validate_table(table))
        clean_labels = check_labels(labels or {})
        return await self._guard("create", name, lambda: self._create(
            name, lines, uuid or None, read_only, persistent, clean_labels, caller, later))

    async def _create(self, name: str, lines: list[TargetLine], uuid: str | None,
                      read_only: bool, persistent: bool, clean_labels: dict[str, str],
                      caller: Caller, later: list[UdevWait] | None) -> DeviceInfo:
        async with self.locks.hold(name):
            if await self.store.get_device(name) is not None:
                raise errors.AlreadyExists(f"dmd already manages a device named {name!r}")
            begun = len(later) if later is not None else 0

            async def undo(journal: Journal) -> None:
                if journal.step >= CreateStep.TABLE:  # the device was made
                    if later is not None:
                        # udev may still be probing it: let it finish first.
                        mine = later[begun:]
                        del later[begun:]
                        for wait in mine:
                            with contextlib.suppress(Exception):
                                await self.kernel(udev_done, wait)
                    await self.remove_quietly(name)

            async with intent(self.store, self.fault, "create", name,
                              CreateArgs(uuid, read_only), undo) as journal:
                await journal.mark(CreateStep.DEVICE)
                await self.kernel(Engine.device_create, name, uuid)
                await journal.mark(CreateStep.TABLE)
                flags = DmFlags.DM_READONLY if read_only else DmFlags(0)
                await self.kernel(Engine.table_load, name, lines, flags)
                await journal.mark(CreateStep.RESUME)
                info = await self.kernel(Engine.device_suspend, name, DmFlags(0), later)
                await journal.mark(CreateStep.RECORD)
                await self.store.add_device(DeviceRecord(
                    name, uuid, lines, read_only, caller.uid, persistent, clean_labels))
        log.info("create %s: done (%d:%d)", name, *info.device)
        self._publish(ChangeKind.ADDED, name, info.device, "create")
        return info

    async def remove_quietly(self, name: str) -> None:
        """Undo a half-made device; a half-made device must never stay behind."""
        for _ in range(3):
            try:
                info = await self.kernel(Engine.device_info, name)
                if info.suspended:
                    with contextlib.suppress(DmError):
                        await self.kernel(Engine.device_suspend, name, DmFlags(0))
                await self.kernel(Engine.device_remove, name)
                return
            except UdevTimeout:
                # The kernel removed it; only udev has not caught up.
                log.warning("rollback of %s: removed, but udev has not finished", name)
                return
            except DmError as exc:
                if exc.errno == 6:  # ENXIO: already gone
                    return
                log.warning("rollback of %s: remove failed (%s), retrying", name, exc)
                await asyncio.sleep(0.1)
        log.error("rollback of %s: could not remove the half-made device", name)

    # -- reload ------------------------------------------------------------
    async def reload(self, name: str, table: Sequence[Sequence[object]], *,
                     read_only: bool | None = None, caller: Caller = ROOT,
                     claim: str | None = None) -> DeviceInfo:
        """Replace the live table: load, suspend, resume. On any failure the old
        table is live again and the device is resumed (unless it was suspended
        before we started)."""
        await self.authorize(caller, Action.MODIFY, name)
        self.check_claim(name, claim)
        lines = validated(lambda: validate_table(table))

        async def body() -> DeviceInfo:
            async with self.locks.hold(name):
                before, old_table = await self.kernel(Engine.table_status, name,
                                                      DmFlags.DM_STATUS_TABLE)
                if before.inactive_present:
                    # Loading ours would throw that table away (and a rollback
                    # could not bring it back): someone is mid-way through a
                    # load/resume of their own.
                    raise errors.Busy(
                        f"{name} has an inactive table loaded; resume or clear it first")
                ro = before.read_only if read_only is None else read_only
                async def undo(_: Journal) -> None:
                    await self._undo_reload(name, before, old_table)

                async with intent(self.store, self.fault, "reload", name,
                                  ReloadArgs(before.suspended), undo) as journal:
                    await journal.mark(ReloadStep.LOAD)
                    flags = DmFlags.DM_READONLY if ro else DmFlags(0)
                    await self.kernel(Engine.table_load, name, lines, flags)
                    await journal.mark(ReloadStep.SUSPEND)
                    await self.kernel(Engine.device_suspend, name, DmFlags.DM_SUSPEND)
                    await journal.mark(ReloadStep.RESUME)
                    info = await self.kernel(Engine.device_suspend, name, DmFlags(0))
                    await journal.mark(ReloadStep.RECORD)
                    if await self.store.get_device(name) is not None:
                        await self.store.update_table(name, lines, ro)
                self._publish(ChangeKind.CHANGED, name, info.device, "reload")
                return info

        return await self._guard("reload", name, body)

    async def _undo_reload(self, name: str, before: DeviceInfo,
                           old_table: list[TargetLine]) -> None:
        """Put the device back as it was: old table live, no stray inactive
        table, resumed unless it was suspended before we started."""
        try:
            info, live = await self.kernel(Engine.table_status, name,
                                           DmFlags.DM_STATUS_TABLE)
            if info.inactive_present:
                await self.kernel(Engine.table_clear, name)
            if before.active_present and live != old_table:
                flags = DmFlags.DM_READONLY if before.read_only else DmFlags(0)
                await self.kernel(Engine.table_load, name, old_table, flags)
                await self.kernel(Engine.device_suspend, name, DmFlags.DM_SUSPEND)
                info = await self.kernel(Engine.device_suspend, name, DmFlags(0))
            info = await self.kernel(Engine.device_info, name)
            if info.suspended and not before.suspended:
                await self.kernel(Engine.device_suspend, name, DmFlags(0))
        except DmError as exc:
            log.error("reload %s: could not restore the old table: %s", name, exc)

    # -- load / clear (raw, for clients that manage the sequence) ----------
    async def load(self, name: str, table: Sequence[Sequence[object]], *,
                   read_only: bool = False, caller: Caller = ROOT,
                   claim: str | None = None) -> DeviceInfo:
        await self.authorize(caller, Action.MODIFY, name)
        self.check_claim(name, claim)
        lines = validated(lambda: validate_table(table))

        async def body() -> DeviceInfo:
            async with self.locks.hold(name):
                flags = DmFlags.DM_READONLY if read_only else DmFlags(0)
                info = await self.kernel(Engine.table_load, name, lines, flags)
            self._publish(ChangeKind.CHANGED, name, info.device, "load")
            return info

        return await self._guard("load", name, body)

    async def clear(self, name: str, *, caller: Caller = ROOT,
                    claim: str | None = None) -> DeviceInfo:
        await self.authorize(caller, Action.MODIFY, name)
        self.check_claim(name, claim)
        async def body() -> DeviceInfo:
            async with self.locks.hold(name):
                info = await self.kernel(Engine.table_clear, name)
            self._publish(ChangeKind.CHANGED, name, info.device, "clear")
            return info

        return await self._guard("clear", name, body)

    # -- suspend / resume --------------------------------------------------
    async def suspend(self, name: str, *, noflush: bool = False, skip_lockfs: bool = False,
                      caller: Caller = ROOT,
                      claim: str | None = None) -> DeviceInfo:
        await self.authorize(caller, Action.MODIFY, name)
        self.check_claim(name, claim)
        flags = DmFlags.DM_SUSPEND
        if noflush:
            flags |= DmFlags.DM_NOFLUSH
        if skip_lockfs:
            flags |= DmFlags.DM_SKIP_LOCKFS
        return await self._simple("suspend", name, flags)

    async def resume(self, name: str, *, caller: Caller = ROOT, claim: str | None = None,
                     later: list[UdevWait] | None = None) -> DeviceInfo:
        """Resume. If a loaded table fails to go live, the kernel throws it away
        and leaves the device suspended; dmd resumes the device on its old
        table and loads the refused table back, so the call changes nothing
        but reports the error."""
        await self.authorize(caller, Action.MODIFY, name)
        self.check_claim(name, claim)
        async def body() -> DeviceInfo:
            async with self.locks.hold(name):
                before, pending = await self.kernel(Engine.table_status, name,
                    DmFlags.DM_STATUS_TABLE | DmFlags.DM_QUERY_INACTIVE_TABLE)
                live_before: list[TargetLine] = []
                if before.inactive_present:
                    _, live_before = await self.kernel(Engine.table_status, name,
                                                       DmFlags.DM_STATUS_TABLE)
                try:
                    info = await self.kernel(Engine.device_suspend, name, DmFlags(0), later)
                except DmError:
                    with contextlib.suppress(DmError):
                        await self.kernel(Engine.device_suspend, name, DmFlags(0))
                    if before.inactive_present:
                        await self._restore_inactive(name, pending, before.read_only,
                                                     live_before)
                    raise
            self._publish(ChangeKind.CHANGED, name, info.device, "resume")
            return info

        return await self._guard("resume", name, body)

    async def _restore_inactive(self, name: str, pending: list[TargetLine], read_only: bool,
                                live_before: list[TargetLine]) -> None:
        """Load *pending* back as the inactive table, unless it went live after all
        (a target can refuse in preresume after the swap)."""
        try:
            info, live = await self.kernel(Engine.table_status, name,
                                           DmFlags.DM_STATUS_TABLE)
            if info.inactive_present or live != live_before:
                return
            flags = DmFlags.DM_READONLY if read_only else DmFlags(0)
            await self.kernel(Engine.table_load, name, pending, flags)
        except (DmError, EngineInvalidArgument) as exc:
            log.warning("resume %s: could not load the refused table back: %s", name, exc)

    async def _simple(self, operation: str, name: str, flags: DmFlags) -> DeviceInfo:
        async def body() -> DeviceInfo:
            async with self.locks.hold(name):
                info = await self.kernel(Engine.device_suspend, name, flags)
            self._publish(ChangeKind.CHANGED, name, info.device, operation)
            return info

        return await self._guard(operation, name, body)

    # -- rename / set UUID -------------------------------------------------
    async def rename(self, name: str, new_name: str, *, caller: Caller = ROOT,
                     claim: str | None = None) -> DeviceInfo:
        await self.authorize(caller, Action.MODIFY, name)
        self.check_claim(name, claim)
        validated(lambda: validate_name(new_name))
        self.check_claim(new_name, claim)

        async def body() -> DeviceInfo:
            async with self.locks.hold(name, new_name):
                if await self.store.get_device(new_name) is not None:
                    raise errors.AlreadyExists(f"dmd already manages a device named {new_name!r}")
                async def undo(journal: Journal) -> None:
                    if journal.step >= RenameStep.RECORD:  # renamed in the kernel
                        with contextlib.suppress(DmError):
                            await self.kernel(Engine.device_rename, new_name, DevId.name(name))

                async with intent(self.store, self.fault, "rename", name,
                                  RenameArgs(new_name), undo) as journal:
                    await journal.mark(RenameStep.RENAME)
                    info = await self.kernel(Engine.device_rename, name, DevId.name(new_name))
                    await journal.mark(RenameStep.RECORD)
                    if await self.store.get_device(name) is not None:
                        await self.store.rename_device(name, new_name)
            self._publish(ChangeKind.CHANGED, new_name, info.device, "rename")
            return info

        return await self._guard("rename", name, body, renamed_to=new_name)

    async def set_uuid(self, name: str, uuid: str, *, caller: Caller = ROOT,
                       claim: str | None = None) -> DeviceInfo:
        await self.authorize(caller, Action.MODIFY, name)
        self.check_claim(name, claim)
        validated(lambda: validate_uuid(uuid))

        async def body() -> DeviceInfo:
            async with self.locks.hold(name):
                info = await self.kernel(Engine.device_rename, name, DevId.uuid(uuid))
                if await self.store.get_device(name) is not None:
                    await self.store.set_uuid(name, uuid)
            self._publish(ChangeKind.CHANGED, name, info.device, "set-uuid")
            return info

        return await self._guard("set-uuid", name, body)

    # -- message -----------------------------------------------------------
    async def message(self, name: str, sector: int, text: str, *,
                      caller: Caller = ROOT, claim: str | None = None,
                      settle: bool = True) -> str:
        """*settle* False: returns without the bus showing the device's new
        state; the caller settles it (``events.settle``) before it is done."""
        await self.authorize(caller, Action.MODIFY, name)
        self.check_claim(name, claim)
        async def body() -> str:
            async with self.locks.hold(name):
                info, out = await self.kernel(Engine.target_msg, name, sector, text)
            self._publish(ChangeKind.CHANGED, name, info.device, "message")
            return out or ""

        return await self._guard("message", name, body, settle=settle)

    # -- remove ------------------------------------------------------------
    async def holders(self, device: tuple[int, int]) -> list[str]:
        """Names of the dm devices whose tables use *device*."""
        names: list[str] = []
        for other in await self.kernel(Engine.list_devices):
            with contextlib.suppress(DmError):
                deps = set(await self.kernel(Engine.table_deps, other.name))
                deps |= set(await self.kernel(Engine.table_deps, other.name,
                                              DmFlags.DM_QUERY_INACTIVE_TABLE))
                if device in deps:
                    names.append(other.name)
        return sorted(names)

    async def remove(self, name: str, *, force: bool = False, deferred: bool = False,
                     caller: Caller = ROOT, claim: str | None = None,
                     later: list[UdevWait] | None = None) -> DeviceInfo:
        """Remove a device. An open device, or one other devices use, is refused
        with the names of its users unless *deferred* (the kernel removes it
        when the last user closes it) or *force* (its table is first replaced
        by ``error`` so users fail fast instead of hanging, then deferred).
        *later*: as for create, udev's work on the node going."""
        await self.authorize(caller, Action.REMOVE, name)
        self.check_claim(name, claim)
        async def body() -> DeviceInfo:
            async with self.locks.hold(name):
                info = await self.kernel(Engine.device_info, name)
                if info.open_count and not (force or deferred):
                    users = await self.holders(info.device)
                    who = f"used by {', '.join(users)}" if users else (
                        f"open {info.open_count} time(s)")
                    raise errors.Busy(f"remove {name}: device is {who}")
                async with intent(self.store, self.fault, "remove", name,
                                  RemoveArgs(force, deferred)) as journal:
                    await journal.mark(RemoveStep.PREPARE)
                    if force and info.open_count and info.active_present:
                        size = await self._size(name)
                        await self.kernel(Engine.table_load, name,
                                          [TargetLine(0, size, "error", "")])
                        await self.kernel(Engine.device_suspend, name, DmFlags(0))
                    if info.suspended:
                        await self.kernel(Engine.device_suspend, name, DmFlags(0))
                    await journal.mark(RemoveStep.REMOVE)
                    flags = DmFlags.DM_DEFERRED_REMOVE if (force or deferred) else DmFlags(0)
                    gone = await self.kernel(Engine.device_remove, name, flags, later)
                    journal.no_way_back()
                    try:
                        await journal.mark(RemoveStep.RECORD)
                    finally:
                        if not gone.flags & DmFlags.DM_DEFERRED_REMOVE and \
                                await self.store.get_device(name) is not None:
                            await self.store.remove_device(name)
            kind = (ChangeKind.CHANGED if gone.flags & DmFlags.DM_DEFERRED_REMOVE
                    else ChangeKind.REMOVED)
            self._publish(kind, name, info.device, "remove")
            return gone

        return await self._guard("remove", name, body)

    async def _size(self, name: str) -> int:
        _, table = await self.kernel(Engine.table_status, name, DmFlags.DM_STATUS_TABLE)
        return sum(line.length for line in table)

    async def remove_all_managed(self, *, caller: Caller = ROOT) -> list[str]:
        """Remove every device dmd manages, users before the devices they use."""
        await self.authorize(caller, Action.REMOVE, "*")
        removed: list[str] = []
        # A pool's devices go with the pool (Pool.Destroy), not with this.
        pending = [r.name for r in await self.store.list_devices() if not self.claimed(r.name)]
        for _ in range(len(pending) + 1):
            progress = False
            for name in list(pending):
                try:
                    await self.remove(name, caller=caller)
                except errors.Busy:
                    continue
                except errors.NotFound:
                    if await self.store.get_device(name) is not None:
                        await self.store.remove_device(name)
                pending.remove(name)
                removed.append(name)
                progress = True
            if not pending or not progress:
                break
        if pending:
            raise errors.Busy(f"could not remove {', '.join(sorted(pending))}: still in use")
        return removed

    # -- reads that go to the kernel ----------------------------------------
    async def status(self, name: str) -> list[TargetLine]:
        """The device's status lines, as its targets report them now."""
        try:
            _, lines = await self.kernel(Engine.table_status, name, DmFlags(0))
        except (DmError, EngineInvalidArgument) as exc:
            raise errors.from_engine(exc, name, "status") from None
        return lines

    async def target_versions(self) -> list[TargetVersion]:
        """The target types the kernel offers (loaded modules)."""
        return await self.kernel(Engine.list_versions)

    # -- metadata ----------------------------------------------------------
    async def set_labels(self, name: str, labels: Mapping[str, str], *,
                         caller: Caller = ROOT,
                         claim: str | None = None) -> None:
        await self.authorize(caller, Action.MANAGE, name)
        self.check_claim(name, claim)
        clean = check_labels(labels)
        async with self.locks.hold(name):
            if await self.store.get_device(name) is None:
                raise errors.NotFound(f"{name!r} is not managed by dmd (adopt it first)")
            await self.store.set_labels(name, clean)
        self._publish(ChangeKind.CHANGED, name, None, "set-labels")
        await self.events.settle([name])

    async def adopt(self, name: str, *, persistent: bool = False,
                    caller: Caller = ROOT,
                    claim: str | None = None) -> DeviceInfo:
        """Start managing a device another tool made: record its live table."""
        await self.authorize(caller, Action.MANAGE, name)
        self.check_claim(name, claim)
        async def body() -> DeviceInfo:
            async with self.locks.hold(name):
                if await self.store.get_device(name) is not None:
                    raise errors.AlreadyExists(f"dmd already manages {name!r}")
                info, table = await self.kernel(Engine.table_status, name, DmFlags.DM_STATUS_TABLE)
                if not info.active_present:
                    raise errors.InvalidArgument(f"{name!r} has no live table to adopt")
                await self.store.add_device(DeviceRecord(
                    name, info.uuid or None, table, info.read_only, caller.uid, persistent))
            self._publish(ChangeKind.CHANGED, name, info.device, "adopt")
            return info

        return await self._guard("adopt", name, body)


def default_workers() -> int:
    return min(32, (os.cpu_count() or 1) + 4)
