"""The intent journal's vocabulary, shared by the operations that write it
and the recovery that reads it after a crash.

An operation records its intent (durably) before touching the kernel, marks
each step before taking it, and ends the intent as done or rolled back. The
steps of each operation are named here, with what recovery may conclude
from the last one marked, and so are the arguments each intent carries: an
operation and recovery cannot disagree on a number or a key.

The fault hook (tests) is called after each mark with the operation's name
and the step's number: ``DMD_TEST_KILL_AT=reload:3`` kills dmd there.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol, TypeVar

from dmd.service.jobs import cancel_point, progress

FaultHook = Callable[[str, int], None]
log = logging.getLogger(__name__)


class CreateStep(enum.IntEnum):
    DEVICE = 1  # DM_DEV_CREATE next
    TABLE = 2  # the device exists; its table is loaded next
    RESUME = 3  # resumed next: the table goes live
    RECORD = 4  # live; the record is written next


class ReloadStep(enum.IntEnum):
    LOAD = 1  # the new table goes into the inactive slot next
    SUSPEND = 2
    # The resume that swaps the new table in is issued next. From here on, a
    # device without an inactive table has the new table live.
    RESUME = 3
    RECORD = 4


class RenameStep(enum.IntEnum):
    RENAME = 1  # DM_DEV_RENAME next
    RECORD = 2  # renamed in the kernel; the record follows next


class RemoveStep(enum.IntEnum):
    PREPARE = 1  # resume (and, with force, an error table) next
    REMOVE = 2  # DM_DEV_REMOVE next
    RECORD = 3  # removed: the kernel cannot undo it, so the record follows


# -- pools and volumes --------------------------------------------------------
# Thin ids are protected by the pool's transaction id, as LVM does it: the
# intent (with the id the pool moves from and to) is durable before the first
# message, the messages go, then set_transaction_id, then the records. After a
# crash, the kernel's transaction id says which side of that line the pool is
# on: the old id means the messages are undone, the new one that they are kept
# and the records are finished. (The kernel commits after every message.)

class PoolCreateStep(enum.IntEnum):
    WIPE = 1  # the devices' first MiB and the metadata's start are zeroed next
    DEVICES = 2  # the metadata and data devices are made next
    POOL = 3  # the thin-pool device is made next
    RECORD = 4


class VolumeCreateStep(enum.IntEnum):
    MESSAGE = 1  # create_thin next
    TRANSACTION = 2  # set_transaction_id next
    RECORD = 3  # the pool is at the new id; the volume's record is written next
    ACTIVATE = 4  # its device is made next
    ENCRYPT = 5  # luksFormat runs next (when asked for): a crash from here undoes it all
    UNLOCK = 6  # cryptsetup open next
    FILESYSTEM = 7  # mkfs runs next (when asked for)


class SnapshotStep(enum.IntEnum):
    SUSPEND = 1  # the origin's device is suspended next (if active)
    MESSAGE = 2  # create_snap next
    TRANSACTION = 3
    RESUME = 4  # the origin resumes next (on every path)
    RECORD = 5
    ACTIVATE = 6


class RevertStep(enum.IntEnum):
    """Revert (dmd.service.pools.revert): a copy of the snapshot taken (a
    thin id of its own) and named by the origin's record (scheduled); then,
    where the origin has no open device, applied: its record takes the copy
    (from there on it rolls forward), its old thin id is deleted. A revert
    applied later (``volume-revert-apply``) takes the steps from DEACTIVATE."""

    SUSPEND = 1  # the snapshot's device is suspended next (if active)
    MESSAGE = 2  # create_snap of the snapshot next
    TRANSACTION = 3
    RESUME = 4  # the snapshot resumes next (on every path)
    RECORD = 5  # the origin's record names the copy next: scheduled
    DEACTIVATE = 6  # the origin's device (not open) is removed next
    SWITCH = 7  # the origin's record takes the copy next
    DELETE = 8  # its old thin id is deleted next
    COMMIT = 9
    ACTIVATE = 10  # the origin's device is made again next (if it had one)


class ThickResizeStep(enum.IntEnum):
    ZERO = 1  # the new segments are zeroed on the pool's devices next
    RECORD = 2  # the grown segments are recorded (reserved) next
    RELOAD = 3  # the device takes them next: recovery reloads the recorded table
    FILESYSTEM = 4  # its filesystem grows next (Resize with `filesystem`): as RELOAD


class VolumeDeleteStep(enum.IntEnum):
    DEACTIVATE = 1  # the volume's device is removed next
    MESSAGE = 2  # delete next: from here on the delete rolls forward
    TRANSACTION = 3
    RECORD = 4


class VolumeActivateStep(enum.IntEnum):
    """Activate and Deactivate: recovery makes the record follow the device
    (there: active; gone: inactive), whichever step was marked."""

    DEVICE = 1  # the volume's device is made (or its cleartext and it removed) next
    RECORD = 2  # the record says so next


class VolumeLabelsStep(enum.IntEnum):
    """SetLabels: one record written (recovery finds it written or not)."""

    RECORD = 1  # the record takes the new labels next


class VolumeRenameStep(enum.IntEnum):
    """Rename: recovery finds the volume's device by its DM UUID; under the
    new name, the record follows it (forward), else it stays (back)."""

    DEVICE = 1  # the volume's device is renamed next (if it is active)
    RECORD = 2  # the record takes the new name next


class VolumeResizeStep(enum.IntEnum):
    """A thin volume's Resize: recovery records the size its device has (an
    inactive volume's: the old one unless the record was written)."""

    RELOAD = 1  # the device is reloaded at the new size next
    RECORD = 2  # the record takes the new size next
    FILESYSTEM = 3  # its filesystem grows next (with `filesystem`): the size stays the device's


class PoolGrowStep(enum.IntEnum):
    WIPE = 1  # the new device's first MiB is zeroed next
    # Only where the metadata is low: the metadata device is reloaded with a
    # segment of the new device, then the pool's table, next: no way back
    # (the kernel cannot shrink a pool's metadata).
    METADATA = 2
    DATA = 3  # the data device is reloaded with the new segment next
    POOL = 4  # the pool's table is reloaded larger next: no way back after it
    RECORD = 5


class PoolExtendStep(enum.IntEnum):
    DEVICES = 1  # tdata and/or tmeta are reloaded larger next
    POOL = 2  # the pool's table is reloaded next: the kernel takes the space for good


class PoolImportStep(enum.IntEnum):
    DEVICES = 1  # the metadata and data devices are made next
    POOL = 2  # the thin-pool device is made next (the kernel opens its metadata)
    RECORD = 3  # the pool and its volumes are recorded next


class PoolRenameStep(enum.IntEnum):
    RECORD = 1  # the pool's record takes the new name next (one transaction)


class PoolRepairStep(enum.IntEnum):
    DEVICES = 1  # the pool's devices are removed next, its metadata device made
    COPY = 2  # the spare's device is made and the mended copy written next
    SWITCH = 3  # the records name the copy as the metadata next: no way back
    FORGET = 4  # (accept-loss) the volumes the copy lacks are forgotten next
    DEVICES_UP = 5  # the pool's devices are made over the copy next


class PoolStopStep(enum.IntEnum):
    DEVICES = 1  # the pool's devices are removed next (volumes first)
    RECORD = 2  # the pool is recorded stopped next


class PoolStartStep(enum.IntEnum):
    DEVICES = 1  # the metadata and data devices are made next
    POOL = 2  # the thin-pool device is made next
    RECORD = 3  # the pool is recorded started next


class PoolDestroyStep(enum.IntEnum):
    DEVICES = 1  # the pool's devices are removed next
    RECORD = 2


@dataclass(frozen=True)
class IntentArgs:
    """What an intent carries beyond its operation and device."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls: type[A], raw: dict[str, Any] | None) -> A:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (raw or {}).items() if k in known})


A = TypeVar("A", bound=IntentArgs)


@dataclass(frozen=True)
class CreateArgs(IntentArgs):
    uuid: str | None = None
    read_only: bool = False


@dataclass(frozen=True)
class ReloadArgs(IntentArgs):
    was_suspended: bool = False


@dataclass(frozen=True)
class RenameArgs(IntentArgs):
    new_name: str = ""


@dataclass(frozen=True)
class RemoveArgs(IntentArgs):
    force: bool = False
    deferred: bool = False


@dataclass(frozen=True)
class PoolArgs(IntentArgs):
    """A pool operation: the pool, and for thin-id changes the transaction id
    it moves from, the thin id, and the volume's record as it will be."""

    pool: str = ""
    transaction_from: int = 0
    thin_id: int = -1
    volume: dict[str, Any] | None = None  # a VolumeRecord's fields
    origin_uuid: str | None = None
    layout: str | None = None  # pool-create: the PoolLayout's JSON
    old_size: int = 0  # volume-resize-thick: bytes before, zeroed from there on
    snapshot_uuid: str | None = None  # volume-revert: the snapshot copied
    new_name: str | None = None  # pool-rename
    accept_loss: bool = False  # pool-repair: volumes the repair lost are forgotten


# The marks recovery reads (it settles every other case from what the kernel
# holds): the operation waits until these are committed before the step they
# announce. Any other mark is queued and committed with the next write (a
# record, the intent's end), in order, in that write's transaction: it costs
# no round trip to the store's thread, and no transaction of its own.
RECOVERY_READS: frozenset[tuple[str, int]] = frozenset({
    ("reload", ReloadStep.RESUME), ("pool-extend", PoolExtendStep.POOL),
    ("pool-grow", PoolGrowStep.METADATA), ("volume-create", VolumeCreateStep.FILESYSTEM),
    ("volume-create", VolumeCreateStep.ENCRYPT), ("volume-create", VolumeCreateStep.UNLOCK)})


class IntentStore(Protocol):
    async def begin_intent(self, operation: str, device: str, args: dict[str, Any]) -> int: ...
    async def advance_intent(self, intent_id: int, step: int) -> None: ...
    def advance_intent_soon(self, intent_id: int, step: int) -> asyncio.Future[None]: ...
    async def finish_intent(self, intent_id: int, state: str) -> None: ...


# How many intents the running task is inside (see Journal.outermost).
_depth: contextvars.ContextVar[int] = contextvars.ContextVar("dmd_intent_depth", default=0)


class Journal:
    """One intent's life. ``step`` is the last step marked (0 before any)."""

    def __init__(self, store: IntentStore, fault: FaultHook | None, operation: str,
                 intent_id: int, outermost: bool = True) -> None:
        self.store, self.fault, self.operation = store, fault, operation
        self.intent_id = intent_id
        # Only the outermost journal's steps are its job's progress: the
        # device operations a pool operation runs have journals of their own.
        self.outermost = outermost
        self.step = 0
        self.beyond_undo = False

    def no_way_back(self) -> None:
        """The kernel has done what cannot be undone (a remove): from here on
        the operation rolls forward, and ends as done even if a later step
        fails."""
        self.beyond_undo = True
        cancel_point(past_way_back=True)  # the job says so at once, not at its next mark

    async def mark(self, step: enum.IntEnum) -> None:
        """Mark progress, then give the fault hook its chance to stop us here."""
        self.step = int(step)
        if (self.operation, self.step) in RECOVERY_READS:
            await self.store.advance_intent(self.intent_id, self.step)
        else:
            self.store.advance_intent_soon(self.intent_id, self.step).add_done_callback(
                self._mark_written)
        if self.fault is not None:
            self.fault(self.operation, self.step)
        cancel_point(self.beyond_undo)
        if self.outermost:
            progress(self.step / (len(type(step)) + 1))

    def _mark_written(self, future: asyncio.Future[None]) -> None:
        # Nobody waits for a queued mark: its failure is logged here (the
        # write it went with, awaited, fails the operation if theirs did).
        if not future.cancelled() and future.exception() is not None:
            log.warning("%s (intent %d): a progress mark was not written: %s",
                        self.operation, self.intent_id, future.exception())


@contextlib.asynccontextmanager
async def intent(store: IntentStore, fault: FaultHook | None, operation: str, device: str,
                 args: IntentArgs, rollback: Callable[[Journal], Awaitable[None]] | None = None,
                 roll_forward: Callable[[Journal], Awaitable[None]] | None = None,
                 ) -> AsyncIterator[Journal]:
    """Begin an intent (durable before the body touches the kernel), run the
    body, and end it: done if the body returned; rolled back, after
    *rollback* (which reads ``journal.step`` to know how far it got), if it
    raised. Past ``no_way_back`` a failure is finished by *roll_forward*
    instead (the same steps recovery would take) and the intent is done; if
    that fails too, the intent stays pending for recovery. The body's
    exception is raised either way."""
    depth = _depth.get()
    journal = Journal(store, fault, operation,
                      await store.begin_intent(operation, device, args.to_json()),
                      outermost=depth == 0)
    token = _depth.set(depth + 1)
    try:
        yield journal
    except BaseException:
        # Its undo (or roll forward) runs to its end: a cancel asked now
        # would stop it half done, the intent left for the next start.
        cancel_point(past_way_back=True)
        if journal.beyond_undo:
            if roll_forward is not None:
                try:
                    await roll_forward(journal)
                except Exception:
                    log.exception("%s %s: could not finish; recovery will", operation, device)
                    raise
            await store.finish_intent(journal.intent_id, "done")
        else:
            if rollback is not None:
                await rollback(journal)
            await store.finish_intent(journal.intent_id, "rolled_back")
        raise
    finally:
        _depth.reset(token)
    await store.finish_intent(journal.intent_id, "done")
