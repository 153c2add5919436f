"""containerd's snapshot model on dmd's volumes.

Each snapshot is one thin volume of the snapshotter's pool; its facts are
the volume's labels (catalog.py). The calls, each one journaled dmd call
that changes both at once:

- Prepare and View snapshot their parent's volume (a parentless one
  snapshots the pool's base, an ext4 volume formatted once), the new
  volume's labels given with the snapshot;
- Commit relabels the active snapshot's volume as the committed one (the
  data stays where it is);
- Remove deletes the volume; Update changes its labels.

A crash anywhere leaves a whole snapshot or none: dmd's journal finishes or
undoes a call it accepted. Calls for different names run at once; two calls
for the same name, or a Remove of a parent while a child is being made from
it, do not (the later one is refused, as containerd's own store refuses
what would race). containerd's well-known labels fit dmd's label bounds (1 KiB a label,
key and value, 16 KiB and 64 labels a volume, six of them the snapshot's
own); a label past them is InvalidArgument and changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import re
import secrets
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

from dbus_fast import Variant

from dmd.snapshotter import filters
from dmd.snapshotter.catalog import BASE_KIND, BASE_UNREADY, KIND, Kind, Snapshot, Volume
from dmd.snapshotter.dmd_pool import DmdError, DmdPool

log = logging.getLogger("dmd.snapshotter")

BASE_NAME = "containerd.base"
VOLUME_PREFIX = "containerd."
DEFAULT_BASE_SIZE = 10 << 30  # as containerd's devmapper snapshotter's base image
# containerd's own rule for a namespace's name
_NAMESPACE = re.compile(r"^[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*$")
MAX_NAMESPACE = 76


class Code(enum.Enum):
    """The outcomes containerd tells apart (its errdefs, as gRPC codes)."""

    NOT_FOUND = "not found"
    ALREADY_EXISTS = "already exists"
    FAILED_PRECONDITION = "failed precondition"
    INVALID_ARGUMENT = "invalid argument"
    UNAVAILABLE = "unavailable"
    PERMISSION_DENIED = "permission denied"
    UNKNOWN = "unknown"


class SnapshotError(Exception):
    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code


_DMD_CODES = {"NotFound": Code.NOT_FOUND, "AlreadyExists": Code.ALREADY_EXISTS,
              "InvalidArgument": Code.INVALID_ARGUMENT, "LimitExceeded": Code.INVALID_ARGUMENT,
              "Busy": Code.FAILED_PRECONDITION, "NotAuthorized": Code.PERMISSION_DENIED}


def from_dmd(error: DmdError, doing: str) -> SnapshotError:
    if error.unreachable:
        return SnapshotError(Code.UNAVAILABLE, f"{doing}: dmd did not answer ({error.name})")
    return SnapshotError(_DMD_CODES.get(error.name, Code.UNKNOWN), f"{doing}: {error}")


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...]


@dataclass(frozen=True)
class Found:
    snapshot: Snapshot
    volume: Volume


def check_namespace(namespace: str) -> str:
    if namespace and (len(namespace) > MAX_NAMESPACE or not _NAMESPACE.match(namespace)):
        raise SnapshotError(Code.INVALID_ARGUMENT, f"namespace {namespace!r} is not valid")
    return namespace


def now_ns() -> int:
    return time.time_ns()


class Snapshotter:
    """The snapshots of one dmd pool, each in the namespace of the call that
    made it: the containerd-namespace header, or "" for a call without one.
    containerd 1.6 sends none (its own keys carry the namespace); a newer
    containerd sends it with every call but those of its garbage collector,
    which must see everything. So a call without one finds a name in every
    namespace (a name in two of them is refused there, FailedPrecondition),
    and what it makes goes into "" (a name found anywhere is taken)."""

    def __init__(self, pool: DmdPool, base_size: int = DEFAULT_BASE_SIZE,
                 empty_root: Callable[[str], Awaitable[None]] | None = None) -> None:
        self.pool, self.base_size = pool, base_size
        # what removes lost+found from the base (tests without a kernel: a fake)
        self.empty_root = empty_root or mounted_empty_root
        self._claimed: set[tuple[str, str]] = set()  # (namespace, name) being changed
        self._children_coming: Counter[tuple[str, str]] = Counter()
        self._base_lock = asyncio.Lock()

    # -- reading -----------------------------------------------------------------
    async def _settled(self) -> None:
        try:
            await self.pool.settled()
        except DmdError as exc:
            # Never NotFound (containerd would take a Remove as done): the
            # pool is not there, or dmd is not.
            raise SnapshotError(Code.UNAVAILABLE,
                                f"reading pool {self.pool.pool}'s volumes from dmd: {exc}"
                                ) from None

    def _all(self, namespace: str) -> Iterator[Found]:
        for volume in list(self.pool.volumes.values()):
            snapshot = volume.snapshot()
            if snapshot is not None and namespace in ("", snapshot.namespace):
                yield Found(snapshot, volume)

    def _find(self, namespace: str, name: str) -> Found | None:
        found = [f for f in self._all(namespace) if f.snapshot.name == name]
        if len(found) > 1:
            raise SnapshotError(Code.FAILED_PRECONDITION,
                                f"snapshot {name!r} is in {len(found)} namespaces: "
                                "name one (the containerd-namespace header)")
        return found[0] if found else None

    def _taken(self, namespace: str, name: str) -> bool:
        return any(f.snapshot.name == name for f in self._all(namespace))

    def _get(self, namespace: str, name: str) -> Found:
        found = self._find(namespace, name)
        if found is None:
            raise SnapshotError(Code.NOT_FOUND, f"snapshot {name!r} does not exist")
        return found

    async def stat(self, namespace: str, name: str) -> Snapshot:
        await self._settled()
        return self._get(namespace, name).snapshot

    async def walk(self, namespace: str, texts: Sequence[str]) -> list[Snapshot]:
        try:
            parsed = filters.parse_all(texts)
        except filters.FilterError as exc:
            raise SnapshotError(Code.INVALID_ARGUMENT, str(exc)) from None
        await self._settled()
        return [f.snapshot for f in self._all(namespace)
                if filters.matches(parsed, _fields(f.snapshot))]

    async def mounts(self, namespace: str, name: str) -> list[Mount]:
        await self._settled()
        found = self._get(namespace, name)
        if found.snapshot.kind is Kind.COMMITTED:
            raise SnapshotError(Code.FAILED_PRECONDITION,
                                f"snapshot {name!r} is committed: it has no mounts")
        return self._mounts(found)

    async def usage(self, namespace: str, name: str) -> tuple[int, int]:
        """(bytes, inodes): the bytes the pool holds for the snapshot's volume
        (shared with its parent where unchanged, as the kernel counts them),
        for a committed one as dmd last read them when it was committed (its
        device is gone since); inodes are not counted (0)."""
        await self._settled()
        found = self._get(namespace, name)
        if found.snapshot.usage_bytes is not None:
            return found.snapshot.usage_bytes, 0
        return found.volume.used_bytes, 0

    # -- changing ---------------------------------------------------------------
    def _check_unclaimed(self, namespace: str, name: str) -> None:
        if (namespace, name) in self._claimed:
            raise SnapshotError(Code.FAILED_PRECONDITION,
                                f"snapshot {name!r} is being changed by another call")

    @contextlib.contextmanager
    def _claim(self, namespace: str, *names: str) -> Iterator[None]:
        keys = [(namespace, name) for name in names]
        taken = [name for (_, name) in keys if (namespace, name) in self._claimed]
        if taken:
            raise SnapshotError(Code.FAILED_PRECONDITION,
                                f"snapshot {taken[0]!r} is being changed by another call")
        self._claimed.update(keys)
        try:
            yield
        finally:
            self._claimed.difference_update(keys)

    async def prepare(self, namespace: str, key: str, parent: str, labels: Mapping[str, str],
                      kind: Kind) -> list[Mount]:
        """Prepare (*kind* ACTIVE) or View (VIEW)."""
        check_namespace(namespace)
        if not key:
            raise SnapshotError(Code.INVALID_ARGUMENT, "a snapshot needs a key")
        await self._settled()
        with self._claim(namespace, key):
            if self._taken(namespace, key):
                raise SnapshotError(Code.ALREADY_EXISTS, f"snapshot {key!r} already exists")
            origin, coming = None, ("", "")
            if parent:
                origin = self._get(namespace, parent)
                coming = (origin.snapshot.namespace, parent)  # as Remove counts them
                self._check_unclaimed(*coming)
                if origin.snapshot.kind is not Kind.COMMITTED:
                    raise SnapshotError(Code.INVALID_ARGUMENT,
                                        f"parent {parent!r} is not a committed snapshot")
            stamp = now_ns()
            snapshot = Snapshot(namespace, key, kind, parent, stamp, stamp, dict(labels))
            self._children_coming[coming] += 1
            try:
                origin_path = origin.volume.path if origin else await self._base()
                path = await self._snapshot(origin_path, snapshot)
            finally:
                self._children_coming[coming] -= 1
                if not self._children_coming[coming]:
                    del self._children_coming[coming]
        volume = self.pool.volumes.get(path)
        if volume is None:
            raise SnapshotError(Code.UNKNOWN, f"snapshot {key!r}: its volume went away")
        log.info("snapshot %s: %s from %s (volume %s)", _where(namespace, key), kind.value,
                 parent or "the base", volume.name)
        return self._mounts(Found(snapshot, volume))

    async def _snapshot(self, origin: str, snapshot: Snapshot) -> str:
        doing = f"{snapshot.kind.value} {snapshot.name!r}"
        for _ in range(3):  # a name taken by chance: another one
            name = VOLUME_PREFIX + secrets.token_hex(8)
            try:
                return await self.pool.snapshot(origin, name, snapshot.volume_labels())
            except DmdError as exc:
                if exc.name != "AlreadyExists":
                    raise from_dmd(exc, doing) from None
        raise SnapshotError(Code.UNKNOWN, f"{doing}: no free volume name")

    async def commit(self, namespace: str, name: str, key: str,
                     labels: Mapping[str, str]) -> None:
        check_namespace(namespace)
        if not name:
            raise SnapshotError(Code.INVALID_ARGUMENT, "a committed snapshot needs a name")
        await self._settled()
        active = self._get(namespace, key)
        # Claimed in the snapshot's own namespace, whatever the call named.
        with self._claim(active.snapshot.namespace, name, key):
            if active.snapshot.kind is not Kind.ACTIVE:
                raise SnapshotError(Code.FAILED_PRECONDITION,
                                    f"snapshot {key!r} is not active")
            if self._taken(namespace, name):
                raise SnapshotError(Code.ALREADY_EXISTS,
                                    f"committed snapshot {name!r} already exists")
            stamp = now_ns()
            committed = Snapshot(active.snapshot.namespace, name, Kind.COMMITTED,
                                 active.snapshot.parent, stamp, stamp, dict(labels),
                                 usage_bytes=active.volume.used_bytes)
            try:
                await self.pool.set_labels(active.volume.path, committed.volume_labels())
            except DmdError as exc:
                raise from_dmd(exc, f"commit {key!r} as {name!r}") from None
            await self._deactivate(active.volume, f"committed {name!r}")
        log.info("snapshot %s: committed as %s (volume %s)", _where(namespace, key), name,
                 active.volume.name)

    async def _deactivate(self, volume: Volume, what: str) -> None:
        """A committed layer's device goes: nothing mounts a committed
        snapshot, tools that scan block devices (blkid, udisks, LVM) do not
        see thousands of layers, and a snapshot of it or its Remove then
        touches no device (no suspend of it, no device to remove). One still
        in use (mounted: containerd commits some mounted) keeps its device."""
        try:
            await self.pool.volume_job(volume.path, "Deactivate", udev_sync=False)
        except DmdError as exc:
            log.info("%s: its volume %s stays active (%s)", what, volume.name, exc)

    async def remove(self, namespace: str, name: str) -> None:
        await self._settled()
        found = self._get(namespace, name)
        ns = found.snapshot.namespace  # the call may name none
        with self._claim(ns, name):
            children = [f.snapshot.name for f in self._all(ns) if f.snapshot.parent == name]
            if children or self._children_coming[(ns, name)]:
                raise SnapshotError(Code.FAILED_PRECONDITION,
                                    f"cannot remove snapshot {name!r} with child "
                                    f"{(children or ['being made'])[0]!r}")
            await self._delete(found.volume, name)
        log.info("snapshot %s: removed (volume %s)", _where(ns, name), found.volume.name)

    async def _delete(self, volume: Volume, name: str) -> None:
        """Delete the volume (dmd waits out a moment's open by udev's probe;
        one still open, mounted say, is Busy: FailedPrecondition)."""
        try:
            await self.pool.volume_job(volume.path, "Delete", udev_sync=False)
        except DmdError as exc:
            raise from_dmd(exc, f"remove {name!r}") from None

    async def update(self, namespace: str, name: str, labels: Mapping[str, str],
                     paths: Sequence[str]) -> Snapshot:
        """Labels only: all of them when *paths* is empty, else ``labels``
        (all) and ``labels.KEY`` (one, removed when absent from *labels*)."""
        await self._settled()
        found = self._get(namespace, name)
        with self._claim(found.snapshot.namespace, name):
            new = dict(found.snapshot.labels)
            if not paths:
                new = dict(labels)
            for path in paths:
                if path == "labels":
                    new = dict(labels)
                elif path.startswith("labels."):
                    label = path[len("labels."):]
                    if label in labels:
                        new[label] = labels[label]
                    else:
                        new.pop(label, None)
                else:
                    raise SnapshotError(Code.INVALID_ARGUMENT,
                                        f"cannot update {path!r} of snapshot {name!r}: "
                                        "only its labels change")
            updated = replace(found.snapshot, labels=new, updated_ns=now_ns())
            try:
                await self.pool.set_labels(found.volume.path, updated.volume_labels())
            except DmdError as exc:
                raise from_dmd(exc, f"update {name!r}") from None
        return updated

    # -- the base ------------------------------------------------------------------
    async def _base(self) -> str:
        """The base volume's path, made (once) when there is none: an ext4
        file system whose root is empty, as a new layer's must be."""
        async with self._base_lock:
            base = self._base_volume()
            try:
                if base is None:
                    log.info("pool %s: making the base volume %s (%d bytes, ext4)",
                             self.pool.pool, BASE_NAME, self.base_size)
                    options = {"filesystem": Variant("s", "ext4"),
                               "labels": Variant("a{ss}", {KIND: BASE_UNREADY})}
                    await self.pool.create_volume(BASE_NAME, self.base_size, options)
                    base = self._base_volume()
                    assert base is not None
                if base.labels.get(KIND) == BASE_UNREADY:
                    if base.state != "active":
                        await self.pool.volume_job(base.path, "Activate")
                        base = self._base_volume()
                        assert base is not None
                    await self.empty_root(base.device_path)
                    await self.pool.set_labels(base.path, {KIND: BASE_KIND})
                if base.state == "active":
                    # snapshots of an inactive origin need no suspend of it
                    await self._deactivate(base, "the base")
            except DmdError as exc:
                raise from_dmd(exc, f"the base volume {BASE_NAME}") from None
            return base.path

    def _base_volume(self) -> Volume | None:
        for volume in self.pool.volumes.values():
            if volume.name == BASE_NAME:
                if volume.labels.get(KIND) not in (BASE_KIND, BASE_UNREADY):
                    raise SnapshotError(Code.FAILED_PRECONDITION,
                                        f"pool {self.pool.pool} has a volume {BASE_NAME} "
                                        "that is not the snapshotter's base: rename it")
                return volume
        return None

    def _mounts(self, found: Found) -> list[Mount]:
        if not found.volume.device_path:
            raise SnapshotError(Code.FAILED_PRECONDITION,
                                f"snapshot {found.snapshot.name!r}: its volume "
                                f"{found.volume.name} is not active")
        # A view never replays the journal of a layer committed while mounted:
        # read-only must mean nothing written.
        options = ("ro", "noload") if found.snapshot.kind is Kind.VIEW else ()
        return [Mount("ext4", self.pool.node(found.volume), options)]


def _where(namespace: str, name: str) -> str:
    """A snapshot as the log names it: NAMESPACE/NAME, or NAME in ""."""
    return f"{namespace}/{name}" if namespace else name


def _fields(snapshot: Snapshot) -> filters.Fields:
    def field(path: Sequence[str]) -> tuple[str, bool]:
        if not path:
            return "", False
        match path[0]:
            case "kind":
                return snapshot.kind.value, True
            case "name":
                return snapshot.name, True
            case "parent":
                return snapshot.parent, True
            case "labels":
                label = ".".join(path[1:])
                return snapshot.labels.get(label, ""), label in snapshot.labels
        return "", False
    return field


async def mounted_empty_root(device: str) -> None:
    """Remove mkfs's lost+found from the base's root (a layer's root holds
    what the image puts there, nothing else)."""
    with tempfile.TemporaryDirectory(prefix="dmd-snapshotter-base-") as where:
        await _run("mount", "-t", "ext4", device, where)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(os.path.join(where, "lost+found"))
            os.chmod(where, 0o755)
        finally:
            await _run("umount", where)


async def _run(*argv: str) -> None:
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    output, _ = await process.communicate()
    if process.returncode != 0:
        raise SnapshotError(Code.UNKNOWN, f"{' '.join(argv)}: exit status "
                            f"{process.returncode}: {output.decode(errors='replace').strip()}")
